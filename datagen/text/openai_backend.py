"""`openai` text backend: any OpenAI-compatible server (e.g. `vllm serve`) over plain HTTP (stdlib).

Chat models: POST {base_url}/chat/completions with `response_format` json_schema; base models:
POST {base_url}/completions with the `\\nEND` stop. Requests run concurrently (thread pool), each
with a timeout.

Failures come in two kinds:

* transient (connection errors, timeouts, 408/409/425/429, 5xx, unreadable bodies): retried with
  deterministic exponential backoff (`backoff_s * 2**k`, no jitter), waiting at least what the
  server's `Retry-After` asks, at most `_MAX_BACKOFF_S` per wait. A request that still fails
  becomes a `server_error` or `timeout` reply carrying the server's words (`Reply.detail`); the
  caller counts it as a reject. `_GIVE_UP_AFTER` such requests in a row (no success between)
  stop the run with `TextServerError`: a dead server must not be asked 50 x unit_size times.
* permanent (any other 4xx: 400 bad request or unsupported parameter, 401/403 auth, 404 unknown
  model or path, 422 invalid body): no retry can fix them and every other request would get the
  same answer, so the first one stops the run with `TextServerError`, one line naming the URL,
  the status and the message from the JSON error body. Requests still queued are not sent.

Successful replies can be cached on disk, keyed by everything that decides the reply (model,
messages or prompt, seed, sampling settings, schema), so reruns do not re-query (hosted models
drift). The API key is read from an environment variable, never from a recipe.
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
from email.utils import parsedate_to_datetime
from pathlib import Path

from ..base.io import write_atomic
from .protocol import Reply, Request, TextServerError

_RETRY_STATUS = {408, 409, 425, 429}
_MAX_BACKOFF_S = 60.0
_GIVE_UP_AFTER = 16      # requests in a row that failed after all their retries: the server is down
_MESSAGE_CHARS = 300     # of the server's message kept in an error line


class _Retry(Exception):
    def __init__(self, kind: str, detail: str, retry_after: float | None = None):
        super().__init__(detail)
        self.kind = kind
        self.retry_after = retry_after


def server_message(raw: bytes) -> str:
    """The server's own words from an error body, as one line: `error.message` (OpenAI),
    `message` (vLLM), `detail` (FastAPI, also its 422 list), `error` as a string, else the body
    text itself; empty when there is nothing readable."""
    text = raw.decode("utf-8", "replace")
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    msg = None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            msg = err.get("message")
        elif isinstance(err, str):
            msg = err
        msg = msg or body.get("message") or body.get("detail")
        if isinstance(msg, list):        # FastAPI validation errors: [{"loc": ..., "msg": ...}, ...]
            msg = "; ".join(str(m.get("msg", m)) if isinstance(m, dict) else str(m) for m in msg)
    if not isinstance(msg, str) or not msg.strip():
        msg = text if body is None else (json.dumps(body) if body else "")
    return " ".join(msg.split())[:_MESSAGE_CHARS]


def retry_after_s(value: str | None) -> float | None:
    """Seconds asked by a `Retry-After` header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def backoff_wait(attempt: int, first_s: float, retry_after: float | None) -> float:
    """Seconds to wait before retry `attempt` (1, 2, ...): `first_s * 2**(attempt-1)`, at least the
    server's `Retry-After`, at most `_MAX_BACKOFF_S`. Deterministic (no jitter)."""
    wait = first_s * 2 ** (attempt - 1)
    if retry_after is not None:
        wait = max(wait, retry_after)
    return min(wait, _MAX_BACKOFF_S)


class ReplyCache:
    """One small JSON file per reply, written atomically (temp file + rename)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> Reply | None:
        """The cached reply for `key`, or None when it is absent or unreadable."""
        try:
            d = json.loads(self._path(key).read_text())
            return Reply(text=d["text"], finish_reason=d["finish_reason"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: str, reply: Reply) -> None:
        """Store `reply`'s text and finish reason under `key` (OSError if the folder is not writable)."""
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(p, json.dumps({"text": reply.text, "finish_reason": reply.finish_reason}))


class OpenAIGenerator:
    """`openai` text backend: concurrent HTTP requests with retries, an optional reply cache
    (`runtime.cache_dir`) and the API key from the `runtime.api_key_env` variable."""

    name = "openai"

    def __init__(self, cfg):
        self.cfg = cfg
        rt = cfg.runtime
        self.base = rt.base_url.rstrip("/")
        self.cache = ReplyCache(rt.cache_dir) if rt.cache_dir else None
        self.calls = 0      # HTTP attempts made (tests and logs)
        self._lock = threading.Lock()
        self._stop = threading.Event()           # set once a request failed for good
        self._error: TextServerError | None = None
        self._failed_in_row = 0

    @property
    def format(self) -> str:
        """The prompt format: as configured, "chat" for `auto` (no tokenizer to ask)."""
        return "chat" if self.cfg.format == "auto" else self.cfg.format

    def describe(self) -> dict:
        """Model and sampling settings recorded per triplet."""
        c = self.cfg
        return {"model": c.model, "temperature": c.temperature, "top_p": c.top_p,
                "max_new_tokens": c.max_new_tokens}

    def payload(self, r: Request) -> tuple[str, dict]:
        """(endpoint path, JSON body) of request `r`: /chat/completions (with a strict json_schema
        `response_format` when `r.schema`) for chat requests, else /completions with the stops."""
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
        """SHA-256 hex digest of the endpoint path and the JSON body (sorted keys)."""
        return hashlib.sha256(json.dumps([path, body], sort_keys=True).encode()).hexdigest()

    def _post(self, path: str, body: dict) -> Reply:
        """One HTTP attempt; raises _Retry for what a retry may fix, TextServerError for what
        it cannot."""
        rt = self.cfg.runtime
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(rt.api_key_env) if rt.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.base + path, data=json.dumps(body).encode(), headers=headers,
                                     method="POST")
        with self._lock:
            self.calls += 1
        url = self.base + path
        try:
            with urllib.request.urlopen(req, timeout=rt.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            try:
                body = e.read()
            except (OSError, ValueError):
                body = b""
            msg = server_message(body) or (e.reason if isinstance(e.reason, str) else "")
            line = f"HTTP {e.code} from {url}" + (f": {msg}" if msg else "")
            if e.code in _RETRY_STATUS or e.code >= 500:
                raise _Retry("server_error", line, retry_after_s((e.headers or {}).get("Retry-After"))) from None
            # Any other 4xx: the request itself is refused (bad parameter, auth, unknown model);
            # every other request would get the same answer.
            raise TextServerError(line) from None
        except (TimeoutError, socket.timeout) as e:
            raise _Retry("timeout", f"timed out after {rt.timeout_s:g} s: {url} ({e})") from None
        except urllib.error.URLError as e:
            kind = "timeout" if isinstance(e.reason, (TimeoutError, socket.timeout)) else "server_error"
            raise _Retry(kind, f"{url}: {e.reason}") from None
        except (ConnectionError, OSError, ValueError) as e:   # reset, remote closed, bad status line
            raise _Retry("server_error", f"{url}: {type(e).__name__}: {e}") from None
        try:
            choice = json.loads(raw)["choices"][0]
            text = choice["message"]["content"] if path == "/chat/completions" else choice["text"]
            if not isinstance(text, str):
                raise TypeError("content is not text")
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise _Retry("server_error", f"unreadable reply body from {url} ({e})") from None
        return Reply(text=text, finish_reason="length" if choice.get("finish_reason") == "length" else "stop")

    def _one(self, r: Request) -> Reply:
        path, body = self.payload(r)
        key = self.cache_key(path, body) if self.cache else None
        if key:
            hit = self.cache.get(key)
            if hit is not None:
                return hit
        rt = self.cfg.runtime
        kind, detail, wait_hint = "server_error", None, None
        for attempt in range(rt.retries + 1):
            if self._stop.is_set():          # another request hit a permanent error: send no more
                return Reply(error="server_error", detail="not sent: the run is stopping")
            if attempt:
                time.sleep(backoff_wait(attempt, rt.backoff_s, wait_hint))
            try:
                reply = self._post(path, body)
            except _Retry as e:
                kind, detail, wait_hint = e.kind, str(e), e.retry_after
                continue
            except TextServerError as e:
                self._fail(e)
                return Reply(error="server_error", detail=str(e))
            with self._lock:
                self._failed_in_row = 0
            if key and reply.error is None:
                self.cache.put(key, reply)
            return reply
        with self._lock:
            self._failed_in_row += 1
            give_up = self._failed_in_row >= _GIVE_UP_AFTER
        if give_up:
            self._fail(TextServerError(f"{self._failed_in_row} requests in a row failed after "
                                       f"{rt.retries} retries each; last: {detail}"))
        return Reply(error=kind, detail=detail)

    def _fail(self, e: TextServerError) -> None:
        with self._lock:
            if self._error is None:
                self._error = e
        self._stop.set()

    def generate(self, requests: list[Request]) -> list[Reply]:
        """One reply per request, in order. Raises `TextServerError` when the server refused a
        request permanently (4xx other than 408/409/425/429) or failed `_GIVE_UP_AFTER` requests
        in a row after their retries."""
        if self._error is not None:
            raise self._error
        if not requests:
            return []
        workers = min(self.cfg.runtime.concurrency, len(requests))
        if workers == 1:
            replies = [self._one(r) for r in requests]
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                replies = list(pool.map(self._one, requests))
        if self._error is not None:
            raise self._error
        return replies
