"""The `openai` text backend against real HTTP servers on loopback that speak the chat-completions
protocol: good, erroring, flaky, hanging, malformed, refused; retries, cache, concurrency."""
from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from datagen.candidate import Candidate, candidate_seed
from datagen.edits import build_edits
from datagen.recipe import load_gen_recipe
from datagen.base.errors import CirgenError
from datagen.text.llm import Request, TextServerError
from datagen.text.openai_backend import OpenAIGenerator
from datagen.text.prompt import EDIT_SCHEMA

HANG_S = 1.5


class Server:
    """Behaviour by URL prefix: /ok /err /flaky /hang /garbage /badjson /reject /slow /echo."""

    def __init__(self):
        self.requests: list[tuple[str, dict, dict]] = []
        self.hits = Counter()
        self.in_flight, self.max_in_flight = Counter(), Counter()   # per mode
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                mode = self.path.split("/")[1]
                with server.lock:
                    server.requests.append((self.path, body, dict(self.headers)))
                    server.hits[mode] += 1
                    n = server.hits[mode]
                    server.in_flight[mode] += 1
                    server.max_in_flight[mode] = max(server.max_in_flight[mode], server.in_flight[mode])
                self.counted = mode
                try:
                    self.respond(mode, body, n)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    self.done()

            def done(self):
                # A request stops being in flight before its reply is written: the client may send
                # its next one as soon as it reads the reply, before this handler returns.
                if getattr(self, "counted", None):
                    with server.lock:
                        server.in_flight[self.counted] -= 1
                    self.counted = None

            def send(self, code, payload):
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.done()
                self.end_headers()
                self.wfile.write(data)

            def reply(self, body, content):
                if self.path.endswith("/chat/completions"):
                    choice = {"index": 0, "message": {"role": "assistant", "content": content},
                              "finish_reason": "stop"}
                else:
                    choice = {"index": 0, "text": content, "finish_reason": "stop"}
                self.send(200, {"id": "x", "object": "chat.completion", "model": body["model"], "choices": [choice]})

            def good(self, body):
                seed = body["seed"]
                if "messages" in body:
                    cap = body["messages"][-1]["content"]
                    return json.dumps({"instruction": f"add a tree {seed % 97}",
                                       "edited_caption": f"{cap} and a tree"})
                cap = body["prompt"].rsplit("\n##\n", 2)[-2].rsplit("\n", 1)[-1]
                return f"add a tree\n%%\n{cap} and a tree"

            def respond(self, mode, body, n):
                if mode == "ok" or mode == "echo":
                    self.reply(body, self.good(body))
                elif mode == "err":
                    self.send(500, {"error": "boom"})
                elif mode == "flaky":                  # fails twice, then works
                    if n <= 2:
                        self.send(503, {"error": "busy"})
                    else:
                        self.reply(body, self.good(body))
                elif mode == "hang":
                    time.sleep(HANG_S)
                    self.reply(body, self.good(body))
                elif mode == "garbage":                # a body that is not JSON at all
                    self.send(200, b"<html>proxy error</html>")
                elif mode == "badjson":                # valid protocol, model wrote no JSON
                    self.reply(body, "Sure! The edit is: make it blue")
                elif mode == "reject":                 # a 4xx: not retried
                    self.send(400, {"object": "error", "code": 400,
                                    "message": "response_format of type json_schema is not supported"})
                elif mode == "auth":                   # wrong key, OpenAI's error body
                    self.send(401, {"error": {"message": "Incorrect API key provided",
                                              "type": "invalid_request_error", "code": "invalid_api_key"}})
                elif mode == "invalid":                # FastAPI's validation error body
                    self.send(422, {"detail": [{"loc": ["body", "seed"], "msg": "value is not an integer"}]})
                elif mode == "ratelimit":              # 429 asking for 0.3 s, then works
                    if n <= 1:
                        data = json.dumps({"error": {"message": "slow down"}}).encode()
                        self.send_response(429)
                        self.send_header("Retry-After", "0.3")
                        self.send_header("Content-Length", str(len(data)))
                        self.end_headers()
                        self.wfile.write(data)
                    else:
                        self.reply(body, self.good(body))
                elif mode == "slow":
                    time.sleep(0.15)
                    self.reply(body, self.good(body))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, mode):
        return f"http://127.0.0.1:{self.port}/{mode}/v1"


@pytest.fixture(scope="module")
def server():
    s = Server()
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def recipe(url, *extra):
    return load_gen_recipe("shapes-high", [
        "captions.source=file", "captions.path=unused.txt", "edits.backend=openai",
        "edits.llm.model=served-model", f"edits.llm.runtime.base_url={url}", "edits.llm.examples=2",
        "edits.llm.max_new_tokens=99", "edits.llm.runtime.retries=2", "edits.llm.runtime.backoff_s=0.01",
        "edits.llm.runtime.timeout_s=5", *extra])


def candidates(n, prefix="a red car"):
    out = []
    for j in range(n):
        c = Candidate(0, j, candidate_seed(0, 0, j))
        c.source_caption = f"{prefix} {j}"
        out.append(c)
    return out


def test_chat_completions_with_json_schema(server, monkeypatch):
    monkeypatch.setenv("TEST_KEY", "sk-test")
    ed = build_edits(recipe(server.url("ok"), "edits.llm.runtime.api_key_env=TEST_KEY"))
    batch = candidates(5)
    ed(batch)
    assert all(c.kept for c in batch)
    assert [c.target_caption for c in batch] == [f"a red car {j} and a tree" for j in range(5)]
    mine = [r for r in server.requests if r[0].startswith("/ok/")]
    path, body, headers = mine[0]
    assert path == "/ok/v1/chat/completions" and headers["Authorization"] == "Bearer sk-test"
    assert body["model"] == "served-model" and body["max_tokens"] == 99 and body["n"] == 1
    assert body["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "reply", "schema": EDIT_SCHEMA, "strict": True}}
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert sorted(b["seed"] for _, b, _ in mine) == sorted(c.generator["edits"]["seed"] for c in batch)


def test_completion_format_for_base_models(server):
    ed = build_edits(recipe(server.url("echo"), "edits.llm.format=completion"))
    batch = candidates(2)
    ed(batch)
    assert all(c.kept for c in batch), [c.reject_reason for c in batch]
    path, body, _ = [r for r in server.requests if r[0].startswith("/echo/")][0]
    assert path == "/echo/v1/completions" and body["stop"] == ["\nEND"] and "response_format" not in body


def test_erroring_server_gives_counted_rejects_after_retries(server):
    ed = build_edits(recipe(server.url("err")))
    batch = candidates(3)
    ed(batch)
    assert [c.reject_reason for c in batch] == ["text_server_error"] * 3
    assert server.hits["err"] == 3 * 3                  # first try + 2 retries each


def test_flaky_server_is_retried_with_backoff(server):
    gen = OpenAIGenerator(recipe(server.url("flaky"), "edits.llm.runtime.concurrency=1").edits.llm)
    t0 = time.perf_counter()
    r = gen.generate([Request(seed=1, messages=[{"role": "user", "content": "a cat"}], schema=EDIT_SCHEMA)])
    assert r[0].error is None and "a cat and a tree" in r[0].text
    assert gen.calls == 3 and time.perf_counter() - t0 >= 0.01 + 0.02   # waited 0.01 then 0.02


def test_hanging_server_times_out_and_is_counted(server):
    ed = build_edits(recipe(server.url("hang"), "edits.llm.runtime.timeout_s=0.3",
                            "edits.llm.runtime.retries=1"))
    batch = candidates(2)
    t0 = time.perf_counter()
    ed(batch)
    assert [c.reject_reason for c in batch] == ["text_timeout"] * 2
    assert time.perf_counter() - t0 < HANG_S * 2         # never waited for the hung replies


def test_refused_connection_is_a_counted_server_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]                    # closed again: nothing listens there
    ed = build_edits(recipe(f"http://127.0.0.1:{port}/v1", "edits.llm.runtime.retries=1"))
    batch = candidates(2)
    ed(batch)
    assert [c.reject_reason for c in batch] == ["text_server_error"] * 2


def test_malformed_replies(server):
    ed = build_edits(recipe(server.url("garbage")))
    batch = candidates(1)
    ed(batch)
    assert batch[0].reject_reason == "text_server_error" and server.hits["garbage"] == 3
    ed = build_edits(recipe(server.url("badjson")))
    batch = candidates(2)
    ed(batch)
    assert [c.reject_reason for c in batch] == ["text_malformed"] * 2
    assert batch[0].generator["edits"]["raw"].startswith("Sure!")


@pytest.mark.parametrize("mode, words", [
    ("reject", "HTTP 400 from http://127.0.0.1:{port}/reject/v1/chat/completions: "
               "response_format of type json_schema is not supported"),
    ("auth", "HTTP 401 from http://127.0.0.1:{port}/auth/v1/chat/completions: Incorrect API key provided"),
    ("invalid", "HTTP 422 from http://127.0.0.1:{port}/invalid/v1/chat/completions: value is not an integer"),
])
def test_permanent_4xx_stops_at_once_with_the_servers_words(server, mode, words):
    """A 4xx no retry can fix (bad parameter, wrong key, invalid body) is not a per-candidate
    reject: every request would get it. The first one stops the stage with one line quoting the
    status and the server's message; queued requests are not sent."""
    ed = build_edits(recipe(server.url(mode), "edits.llm.runtime.concurrency=2"))
    with pytest.raises(TextServerError) as e:
        ed(candidates(20))
    assert str(e.value) == words.format(port=server.port)
    assert isinstance(e.value, CirgenError)
    assert server.hits[mode] <= 2                       # no retry, nothing more sent after the first answer


def test_retry_after_is_honoured(server):
    gen = OpenAIGenerator(recipe(server.url("ratelimit"), "edits.llm.runtime.concurrency=1").edits.llm)
    t0 = time.perf_counter()
    r = gen.generate([Request(seed=1, messages=[{"role": "user", "content": "a cat"}], schema=EDIT_SCHEMA)])
    assert r[0].error is None and gen.calls == 2
    assert time.perf_counter() - t0 >= 0.3              # the server's 0.3 s, not backoff_s 0.01


def test_backoff_is_deterministic_and_bounded():
    from datagen.text.openai_backend import _MAX_BACKOFF_S, backoff_wait, retry_after_s

    assert [backoff_wait(k, 1.0, None) for k in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert backoff_wait(1, 1.0, 5.0) == 5.0 and backoff_wait(3, 1.0, 0.5) == 4.0
    assert backoff_wait(20, 1.0, None) == _MAX_BACKOFF_S and backoff_wait(1, 1.0, 1e6) == _MAX_BACKOFF_S
    assert retry_after_s("7") == 7.0 and retry_after_s("soon") is None and retry_after_s(None) is None
    assert 0 <= retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") <= 0.0 + 1e-9   # a past date: no wait


def test_a_server_failing_every_request_stops_the_run(server):
    """Transient failures are per-candidate rejects (with the server's words kept), but a server
    that fails _GIVE_UP_AFTER requests in a row after their retries stops the run."""
    from datagen.text.openai_backend import _GIVE_UP_AFTER

    ed = build_edits(recipe(server.url("err"), "edits.llm.runtime.retries=0", "edits.llm.runtime.concurrency=1"))
    few = candidates(2)
    ed(few)
    assert few[0].generator["edits"]["error"] == f"HTTP 500 from http://127.0.0.1:{server.port}/err/v1/chat/completions: boom"
    with pytest.raises(TextServerError, match=f"{_GIVE_UP_AFTER} requests in a row failed.*HTTP 500.*boom"):
        ed(candidates(_GIVE_UP_AFTER))


def test_requests_run_concurrently(server):
    gen = OpenAIGenerator(recipe(server.url("slow"), "edits.llm.runtime.concurrency=4").edits.llm)
    reqs = [Request(seed=i, messages=[{"role": "user", "content": f"cap {i}"}], schema=EDIT_SCHEMA)
            for i in range(8)]
    replies = gen.generate(reqs)
    assert [json.loads(r.text)["edited_caption"] for r in replies] == [f"cap {i} and a tree" for i in range(8)]
    assert 2 <= server.max_in_flight["slow"] <= 4


def test_reply_cache_means_reruns_do_not_requery(server, tmp_path):
    r = recipe(server.url("ok"), f"edits.llm.runtime.cache_dir={tmp_path / 'cache'}")
    before = server.hits["ok"]
    a = candidates(4, "a blue bus")
    build_edits(r)(a)
    assert server.hits["ok"] - before == 4
    b = candidates(4, "a blue bus")
    build_edits(r)(b)                                   # a rerun: all from the cache
    assert server.hits["ok"] - before == 4
    assert [c.target_caption for c in a] == [c.target_caption for c in b]
    c = candidates(1, "a green bus")                    # another prompt: a new query
    build_edits(r)(c)
    assert server.hits["ok"] - before == 5
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 5
    # a changed sampling setting is another key
    build_edits(recipe(server.url("ok"), f"edits.llm.runtime.cache_dir={tmp_path / 'cache'}",
                       "edits.llm.temperature=0.1"))(candidates(1, "a blue bus"))
    assert server.hits["ok"] - before == 6
    # errors are never cached
    build_edits(recipe(server.url("err"), f"edits.llm.runtime.cache_dir={tmp_path / 'c2'}",
                       "edits.llm.runtime.retries=0"))(candidates(1))
    assert not (tmp_path / "c2").exists()
