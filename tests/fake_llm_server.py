"""A fake vLLM / SGLang server for the server-engine tests: the same command line (the flags
capsfus passes, parsed as the real CLIs name them; anything else is ignored) and the same
HTTP API (``tests/openai_server.py``: ``/v1/models``, ``/v1/completions``, … with fusion
answers), plus the faults a real server shows, driven by environment variables:

- ``CAPSFUS_FAKE_SERVER_DIR`` (required): each start writes ``start-N.json`` there (argv,
  parsed flags, pid, pgid, cache variables, CUDA_VISIBLE_DEVICES) and appends its requests
  to ``requests.jsonl``;
- ``CAPSFUS_FAKE_SERVER_START_DELAY`` seconds of "loading weights" before listening;
- ``CAPSFUS_FAKE_SERVER_NEVER_READY=1``: loads forever (never listens);
- ``CAPSFUS_FAKE_SERVER_FAIL_START=1``: exits 1 at start with a CUDA-like error line;
- ``CAPSFUS_FAKE_SERVER_DELAY`` seconds before each answer (a busy GPU);
- ``CAPSFUS_FAKE_SERVER_CRASH="S:N,…"``: in start number S, the N-th completion request
  kills the server (``os._exit(1)``, no answer), as a CUDA error or OOM kill does.

Run as ``vllm serve MODEL …`` (a wrapper script on PATH) or ``python -m sglang.launch_server
…`` (a wrapper package on PYTHONPATH); :func:`install` writes both wrappers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _parse(kind: str, argv: list[str]) -> dict:
    p = argparse.ArgumentParser(add_help=False)
    if kind == "vllm":
        p.add_argument("command", choices=["serve"])
        p.add_argument("model")
        p.add_argument("--tensor-parallel-size", type=int, default=1)
        p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
        p.add_argument("--max-num-seqs", type=int, default=256)
        p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction)
        p.add_argument("--max-model-len", type=int)
    else:
        p.add_argument("--model-path", required=True)
        p.add_argument("--tp-size", "--tp", dest="tp", type=int, default=1)
        p.add_argument("--mem-fraction-static", type=float)
        p.add_argument("--max-running-requests", type=int)
        p.add_argument("--disable-radix-cache", action="store_true")
        p.add_argument("--context-length", type=int)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--served-model-name")
    p.add_argument("--dtype", default="auto")
    args, unknown = p.parse_known_args(argv)
    return {**vars(args), "unknown": unknown}


def main(kind: str, argv: list[str]) -> None:
    sys.path.insert(0, str(HERE))
    import openai_server
    folder = Path(os.environ["CAPSFUS_FAKE_SERVER_DIR"])
    folder.mkdir(parents=True, exist_ok=True)
    flags = _parse(kind, argv)
    start = len(list(folder.glob("start-*.json"))) + 1
    rec = {"kind": kind, "argv": argv, "flags": flags, "pid": os.getpid(),
           "pgid": os.getpgrp(), "ppid": os.getppid(),
           "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
           "env": {k: os.environ.get(k) for k in ("VLLM_CACHE_ROOT", "TRITON_CACHE_DIR",
                                                  "TORCHINDUCTOR_CACHE_DIR", "XDG_CACHE_HOME",
                                                  "HF_HUB_CACHE", "HF_HUB_OFFLINE")}}
    (folder / f"start-{start}.json").write_text(json.dumps(rec))
    print(f"INFO fake {kind} server start {start}: loading {flags.get('model') or flags.get('model_path')}",
          flush=True)
    if os.environ.get("CAPSFUS_FAKE_SERVER_FAIL_START") == "1":
        print("RuntimeError: CUDA error: no kernel image is available (fake)", flush=True)
        sys.exit(1)
    if os.environ.get("CAPSFUS_FAKE_SERVER_NEVER_READY") == "1":
        while True:
            print("INFO still loading weights…", flush=True)
            time.sleep(1)
    time.sleep(float(os.environ.get("CAPSFUS_FAKE_SERVER_START_DELAY", "0")))
    crash_at = None
    for item in filter(None, os.environ.get("CAPSFUS_FAKE_SERVER_CRASH", "").split(",")):
        s, n = item.split(":")
        if int(s) == start:
            crash_at = int(n)
    count = [0]
    lock = threading.Lock()

    class Handler(openai_server.Handler):
        def do_POST(self):
            with lock:
                count[0] += 1
                n = count[0]
            if crash_at is not None and n >= crash_at:
                print(f"FATAL fake {kind} server: crashing at request {n}", flush=True)
                os._exit(1)
            return super().do_POST()

    args = openai_server.parse_args(["--port", str(flags["port"]), "--log",
                                     str(folder / "requests.jsonl"), "--answer", "fusion",
                                     "--delay-s",
                                     os.environ.get("CAPSFUS_FAKE_SERVER_DELAY", "0")])
    args.key = None
    openai_server.Handler = Handler
    openai_server.serve(args)


VLLM = """#!{python}
import sys
sys.path.insert(0, {here!r})
from fake_llm_server import main
main("vllm", sys.argv[1:])
"""
SGLANG = """import sys
sys.path.insert(0, {here!r})
from fake_llm_server import main
main("sglang", sys.argv[1:])
"""


def install(folder: Path) -> dict:
    """Writes ``folder/bin/vllm`` and ``folder/py/sglang/launch_server.py``; returns the
    environment additions (PATH, PYTHONPATH) that put them first."""
    folder = Path(folder)
    (folder / "bin").mkdir(parents=True, exist_ok=True)
    (folder / "py" / "sglang").mkdir(parents=True, exist_ok=True)
    v = folder / "bin" / "vllm"
    v.write_text(VLLM.format(python=sys.executable, here=str(HERE)))
    v.chmod(0o755)
    (folder / "py" / "sglang" / "__init__.py").write_text("")
    (folder / "py" / "sglang" / "launch_server.py").write_text(SGLANG.format(here=str(HERE)))
    return {"PATH": f"{folder / 'bin'}:{os.environ['PATH']}",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(folder / "py"),
                                                         os.environ.get("PYTHONPATH")]))}
