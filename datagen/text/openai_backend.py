"""`openai` text backend: any OpenAI-compatible server (e.g. `vllm serve`) over plain HTTP (stdlib).

Chat models: POST {base_url}/chat/completions with `response_format` json_schema; base models:
POST {base_url}/completions with the `\\nEND` stop. Requests run concurrently (thread pool), each
with a timeout, retried with exponential backoff on connection errors, timeouts, 408/429/5xx and
unreadable bodies. A request that still fails becomes a `server_error` or `timeout` reply, which
the caller counts as a reject: a crashed or hung server never crashes the run and never drops a
candidate silently. Successful replies can be cached on disk, keyed by everything that decides the
reply (model, messages or prompt, seed, sampling settings, schema), so reruns do not re-query
(hosted models drift). The API key is read from an environment variable, never from a recipe.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .llm import Reply, Request

_RETRY_STATUS = {408, 409, 425, 429}
_MAX_BACKOFF_S = 60.0


class _Retry(Exception):
    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


class ReplyCache:
    """One small JSON file per reply, written atomically (temp file + rename)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> Reply | None:
        try:
            d = json.loads(self._path(key).read_text())
            return Reply(text=d["text"], finish_reason=d["finish_reason"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: str, reply: Reply) -> None:
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.{id(reply)}.tmp")
        tmp.write_text(json.dumps({"text": reply.text, "finish_reason": reply.finish_reason}))
        os.replace(tmp, p)


class OpenAIGenerator:
    name = "openai"

    def __init__(self, cfg):
        self.cfg = cfg
        rt = cfg.runtime
        self.base = rt.base_url.rstrip("/")
        self.cache = ReplyCache(rt.cache_dir) if rt.cache_dir else None
        self.calls = 0      # HTTP attempts made (tests and logs)
        self._lock = threading.Lock()

    @property
    def format(self) -> str:
        return "chat" if self.cfg.format == "auto" else self.cfg.format

    def describe(self) -> dict:
        c = self.cfg
        return {"model": c.model, "temperature": c.temperature, "top_p": c.top_p,
                "max_new_tokens": c.max_new_tokens}

    def payload(self, r: Request) -> tuple[str, dict]:
        c = self.cfg
        body = {"model": c.model, "temperature": c.temperature, "top_p": c.top_p,
                "max_tokens": c.max_new_tokens, "seed": r.seed, "n": 1}
        if c.repetition_penalty != 1.0:
            body["repetition_penalty"] = c.repetition_penalty      # vLLM extension
        if r.messages is not None:
            body["messages"] = r.messages
            if r.schema is not None:
                body["response_format"] = {"type": "json_schema", "json_schema": {
                    "name": "reply", "schema": r.schema, "strict": True}}
            if c.chat_template_kwargs:
                body["chat_template_kwargs"] = dict(c.chat_template_kwargs)   # vLLM extension
            return "/chat/completions", body
        body["prompt"] = r.prompt
        if r.stop:
            body["stop"] = list(r.stop)
        return "/completions", body

    @staticmethod
    def cache_key(path: str, body: dict) -> str:
        return hashlib.sha256(json.dumps([path, body], sort_keys=True).encode()).hexdigest()

    def _post(self, path: str, body: dict) -> Reply:
        """One HTTP attempt; raises _Retry for what a retry may fix."""
        rt = self.cfg.runtime
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(rt.api_key_env) if rt.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.base + path, data=json.dumps(body).encode(), headers=headers,
                                     method="POST")
        with self._lock:
            self.calls += 1
        try:
            with urllib.request.urlopen(req, timeout=rt.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            if e.code in _RETRY_STATUS or e.code >= 500:
                raise _Retry("server_error", f"HTTP {e.code}") from None
            return Reply(error="server_error")           # 4xx: the request itself is wrong
        except (TimeoutError, socket.timeout) as e:
            raise _Retry("timeout", str(e)) from None
        except urllib.error.URLError as e:
            kind = "timeout" if isinstance(e.reason, (TimeoutError, socket.timeout)) else "server_error"
            raise _Retry(kind, str(e.reason)) from None
        except (ConnectionError, OSError, ValueError) as e:   # reset, remote closed, bad status line
            raise _Retry("server_error", str(e)) from None
        try:
            choice = json.loads(raw)["choices"][0]
            text = choice["message"]["content"] if path == "/chat/completions" else choice["text"]
            if not isinstance(text, str):
                raise TypeError("content is not text")
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise _Retry("server_error", f"unreadable reply body ({e})") from None
        return Reply(text=text, finish_reason="length" if choice.get("finish_reason") == "length" else "stop")

    def _one(self, r: Request) -> Reply:
        path, body = self.payload(r)
        key = self.cache_key(path, body) if self.cache else None
        if key:
            hit = self.cache.get(key)
            if hit is not None:
                return hit
        rt = self.cfg.runtime
        kind = "server_error"
        for attempt in range(rt.retries + 1):
            if attempt:
                time.sleep(min(rt.backoff_s * 2 ** (attempt - 1), _MAX_BACKOFF_S))
            try:
                reply = self._post(path, body)
            except _Retry as e:
                kind = e.kind
                continue
            if key and reply.error is None:
                self.cache.put(key, reply)
            return reply
        return Reply(error=kind)

    def generate(self, requests: list[Request]) -> list[Reply]:
        if not requests:
            return []
        workers = min(self.cfg.runtime.concurrency, len(requests))
        if workers == 1:
            return [self._one(r) for r in requests]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(self._one, requests))
