"""A local OpenAI-compatible server for tests: real HTTP on a free port, run as a subprocess.

It stands in for the paid API (the only fake in the teacher tests) and behaves like it where
it matters: ``POST …/chat/completions`` and ``POST …/completions`` under any prefix (``/v1``,
Azure's ``/openai/deployments/NAME?api-version=…``), OpenAI-shaped bodies with ``usage``,
401 on a wrong key (``Authorization: Bearer KEY`` or Azure's ``api-key: KEY``; the error text
echoes the key it got, as a careless server might, so tests can check the client redacts it),
``max_tokens`` honoured (``finish_reason: "length"``), and injectable faults.
``--omit-usage 1`` leaves ``usage`` out of answers, as some proxies do.

Start it from Python (tests)::

    from tests.openai_server import start_server
    srv = start_server(tmp_path, key="sk-test", faults="429,500", fault_rate=0.3)
    srv.url            # "http://127.0.0.1:PORT/v1": pass as --endpoint
    srv.requests()     # every request received, as dicts (see LOG below)
    srv.stop()

or by hand: ``python tests/openai_server.py --port 0 --key sk-test --log /tmp/log.jsonl``; it
prints ``READY <port>`` on stdout once listening.

Answers (``--answer``):
- ``fusion`` (default): a deterministic "fused" caption computed from the prompt's
  ``Sentence 1:`` / ``Sentence 2:`` lines by :func:`fusion_answer`, ending with the prompt's hash
  (so a test can check every row got its own answer, no mix-ups under concurrency);
- ``echo``: the last user message (or the prompt) back;
- ``judge``: :func:`judge_answer`, a scripted LLM-judge reply (a JSON score) for eval tests;
- ``MODULE:FUNC`` or ``path/to/file.py:FUNC``: any function ``f(prompt_text, body) -> str``.

Faults (``--faults`` comma list, each request draws one with probability ``--fault-rate``
from a generator seeded by ``--seed`` and the request's prompt and attempt number, so runs
are reproducible even under concurrency; ``--fail-first N`` makes the first N attempts of
every prompt fault; ``--always-fail SUBSTR`` makes every attempt of prompts containing SUBSTR
fault):
- ``429``: Too Many Requests with ``Retry-After: --retry-after`` seconds;
- ``500``: Internal Server Error (JSON error body);
- ``slow``: answers correctly but only after ``--slow-s`` seconds (past the client's timeout);
- ``malformed``: 200 with a body that is not JSON;
- ``drop``: reads the request, then resets the connection without answering;
- ``quota``: 429 ``insufficient_quota`` (retrying does not help).

LOG (``--log FILE``, one JSON line per request, written before the answer is sent): ``t``,
``path``, ``query``, ``auth`` (``bearer`` / ``api-key`` / null, never the key), ``key_ok``,
``model``, ``prompt_sha`` (sha256 of the prompt text, first 16 hex), ``attempt`` (1-based count
of requests with that prompt so far), ``fault`` (null or its name), ``status``. A request
whose client died before its body arrived is logged with ``fault: "client_gone"``, status
null.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import os
import random
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

FAULTS = ("429", "500", "slow", "malformed", "drop", "quota")


# --- answers -------------------------------------------------------------------------------
def prompt_sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _sentence(text: str, n: int) -> str:
    m = re.search(rf"^Sentence {n}: (.*)$", text, re.M)
    return m.group(1).strip() if m else ""


def fusion_answer(prompt_text: str) -> str:
    """The test server's "fused caption" for a fusion prompt: sentence 2 with sentence 1's
    details, tagged with the prompt's hash. Tests recompute it to check each row's answer."""
    raw, syn = _sentence(prompt_text, 1), _sentence(prompt_text, 2)
    return f"{syn.rstrip('.')}, with {raw} [{prompt_sha(prompt_text)[:8]}]"


def judge_answer(prompt_text: str) -> str:
    """A scripted LLM-judge reply: a JSON object with a score 1-10 derived from the prompt
    (stable per prompt), for eval tests that need a judge endpoint."""
    score = int(prompt_sha(prompt_text), 16) % 10 + 1
    return json.dumps({"score": score,
                       "reason": f"scripted judge for {prompt_sha(prompt_text)[:8]}"})


def _load_answer(spec: str):
    if spec == "fusion":
        return lambda text, body: fusion_answer(text)
    if spec == "judge":
        return lambda text, body: judge_answer(text)
    if spec == "echo":
        return lambda text, body: text
    mod, _, func = spec.rpartition(":")
    if mod.endswith(".py"):
        s = importlib.util.spec_from_file_location("answer_module", mod)
        m = importlib.util.module_from_spec(s)
        s.loader.exec_module(m)
    else:
        m = importlib.import_module(mod)
    return getattr(m, func)


def count_tokens(text: str) -> int:
    """The server's token count: whitespace-separated words (never more than UTF-8 bytes)."""
    return len(text.split())


# --- server --------------------------------------------------------------------------------
@dataclass
class Config:
    key: str | None
    log: str | None
    faults: tuple[str, ...]
    fault_rate: float
    seed: int
    fail_first: int
    always_fail: str | None
    retry_after: float
    slow_s: float
    delay_s: float
    answer: object
    omit_usage: bool = False


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "capsfus-test-openai/1"
    cfg: Config
    lock = threading.Lock()
    attempts: dict[str, int] = {}

    def log_message(self, *args):  # quiet
        pass

    def _send(self, status: int, obj=None, raw: bytes | None = None, headers: dict | None = None):
        body = raw if raw is not None else json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def _log(self, rec: dict) -> None:
        if self.cfg.log:
            with self.lock, open(self.cfg.log, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
                f.flush()

    def do_GET(self):
        if self.path.split("?")[0].rstrip("/").endswith("/models"):
            return self._send(200, {"object": "list", "data": [{"id": "test-model",
                                                                "object": "model"}]})
        self._send(404, {"error": {"message": "not found", "type": "invalid_request_error"}})

    def do_POST(self):
        cfg = self.cfg
        path, _, query = self.path.partition("?")
        n = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(n)
        if len(data) < n:   # the client died mid-request: nothing to answer (logged as such)
            self._log({"t": time.time(), "path": self.path, "status": None,
                       "fault": "client_gone", "prompt_sha": None})
            self.close_connection = True
            return
        try:
            body = json.loads(data or b"{}")
        except ValueError:
            return self._send(400, {"error": {"message": "invalid JSON body",
                                              "type": "invalid_request_error"}})
        if path.endswith("/chat/completions"):
            kind = "chat"
            msgs = body.get("messages") or []
            text = "\n".join(m.get("content") or "" for m in msgs if isinstance(m, dict))
        elif path.endswith("/completions"):
            kind = "completions"
            text = body.get("prompt") or ""
            text = text if isinstance(text, str) else "\n".join(text)
        else:
            return self._send(404, {"error": {"message": f"unknown path {path}",
                                              "type": "invalid_request_error"}})
        auth_hdr = self.headers.get("Authorization") or ""
        api_key_hdr = self.headers.get("api-key")
        given = (auth_hdr[7:] if auth_hdr.startswith("Bearer ") else None) or api_key_hdr
        auth = "bearer" if auth_hdr.startswith("Bearer ") else "api-key" if api_key_hdr else None
        key_ok = cfg.key is None or given == cfg.key
        sha = prompt_sha(text)
        with self.lock:
            attempt = self.attempts[sha] = self.attempts.get(sha, 0) + 1
        fault = None
        if key_ok and cfg.faults:
            rng = random.Random(f"{cfg.seed}:{sha}:{attempt}")
            if attempt <= cfg.fail_first or (cfg.always_fail and cfg.always_fail in text) \
                    or rng.random() < cfg.fault_rate:
                fault = rng.choice(cfg.faults)
        status = 401 if not key_ok else {"429": 429, "quota": 429, "500": 500}.get(fault, 200)
        self._log({"t": time.time(), "path": path, "query": query, "auth": auth,
                   "key_ok": key_ok, "model": body.get("model"), "kind": kind,
                   "prompt_sha": sha, "attempt": attempt, "fault": fault, "status": status,
                   "max_tokens": body.get("max_tokens")})
        if not key_ok:
            return self._send(401, {"error": {
                "message": f"Incorrect API key provided: {given}. You can find your API key "
                           f"at https://platform.example/account/api-keys.",
                "type": "invalid_request_error", "code": "invalid_api_key"}})
        if fault == "429":
            return self._send(429, {"error": {"message": "Rate limit reached, retry later",
                                              "type": "requests", "code": "rate_limit_exceeded"}},
                              headers={"Retry-After": f"{cfg.retry_after:g}"})
        if fault == "quota":
            return self._send(429, {"error": {"message": "You exceeded your current quota",
                                              "type": "insufficient_quota",
                                              "code": "insufficient_quota"}})
        if fault == "500":
            return self._send(500, {"error": {"message": "The server had an error",
                                              "type": "server_error"}})
        if fault == "malformed":
            return self._send(200, raw=b'{"id": "cmpl-x", "choices": [{"message": ')
        if fault == "drop":
            # RST instead of an answer: what a proxy or a crashing backend does
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return
        if fault == "slow":
            time.sleep(cfg.slow_s)
        elif cfg.delay_s:
            time.sleep(cfg.delay_s)
        answer = cfg.answer(text, body)
        words = answer.split()
        finish = "stop"
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        if max_tokens is not None and len(words) > int(max_tokens):
            answer, finish = " ".join(words[:int(max_tokens)]), "length"
        usage = {"prompt_tokens": count_tokens(text), "completion_tokens": count_tokens(answer)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        common = {"id": f"cmpl-{sha}-{attempt}", "created": int(time.time()),
                  "model": body.get("model"), **({} if cfg.omit_usage else {"usage": usage})}
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": answer},
                      "finish_reason": finish}
            return self._send(200, {**common, "object": "chat.completion", "choices": [choice]})
        return self._send(200, {**common, "object": "text_completion",
                                "choices": [{"index": 0, "text": answer,
                                             "finish_reason": finish}]})


def serve(args) -> None:
    cfg = Config(key=args.key, log=args.log,
                 faults=tuple(f for f in (args.faults or "").split(",") if f),
                 fault_rate=args.fault_rate, seed=args.seed, fail_first=args.fail_first,
                 always_fail=args.always_fail, retry_after=args.retry_after, slow_s=args.slow_s,
                 delay_s=args.delay_s, answer=_load_answer(args.answer),
                 omit_usage=bool(args.omit_usage))
    bad = [f for f in cfg.faults if f not in FAULTS]
    if bad:
        sys.exit(f"unknown fault(s) {bad}; known: {', '.join(FAULTS)}")
    Handler.cfg = cfg
    ThreadingHTTPServer.request_queue_size = 512   # no refused connections under bursts
    httpd = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    httpd.daemon_threads = True
    print(f"READY {httpd.server_address[1]}", flush=True)
    httpd.serve_forever()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=0, help="0: a free port (printed)")
    p.add_argument("--key", default=os.environ.get("TEST_SERVER_KEY"),
                   help="required API key (default: $TEST_SERVER_KEY; none: accept any)")
    p.add_argument("--log", help="append every request as a JSON line to this file")
    p.add_argument("--faults", default="", help=f"comma list of {', '.join(FAULTS)}")
    p.add_argument("--fault-rate", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fail-first", type=int, default=0)
    p.add_argument("--always-fail", help="prompts containing this substring always fault")
    p.add_argument("--retry-after", type=float, default=1.0)
    p.add_argument("--slow-s", type=float, default=5.0)
    p.add_argument("--delay-s", type=float, default=0.0, help="delay of every normal answer")
    p.add_argument("--answer", default="fusion", help="fusion | echo | judge | MODULE:FUNC")
    p.add_argument("--omit-usage", type=int, default=0,
                   help="1: answers carry no `usage` (as some proxies and servers send them)")
    return p.parse_args(argv)


# --- for tests -----------------------------------------------------------------------------
class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc, self.port, self.log = proc, port, log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def requests(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(ln) for ln in self.log.read_text().splitlines() if ln.strip()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(folder: Path, key: str | None = "sk-test", **opts) -> Server:
    """Starts the server as a subprocess on a free port; ``opts`` are the CLI flags
    (``faults="429,500"``, ``fault_rate=0.3``, ``answer="judge"`` …)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / f"openai-server-{time.time_ns()}.jsonl"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--port", "0", "--log", str(log)]
    if key is not None:
        cmd += ["--key", key]
    for k, v in opts.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={k: v for k, v in os.environ.items() if k != "TEST_SERVER_KEY"})
    line = proc.stdout.readline()
    if not line.startswith("READY "):
        proc.kill()
        raise RuntimeError(f"test server did not start: {line!r} {proc.stderr.read()}")
    return Server(proc, int(line.split()[1]), log)


if __name__ == "__main__":
    serve(parse_args())
