"""The guard between a worker and its inference server: ``python -m
capsfus.engines.server_guard -- CMD...``.

The worker starts the guard in a new session (its own process group) with a pipe on its
stdin; the guard starts the server in that same group, with PR_SET_PDEATHSIG so the server
dies if the guard does. When the pipe reaches end of file (the worker exited for any reason:
normal exit, Ctrl-C, SIGTERM, SIGUSR2 requeue, ``kill -9``) the guard sends SIGTERM to the
whole group (the server and every process it spawned: vLLM's engine cores, SGLang's
schedulers), waits ``CAPSFUS_SERVER_GRACE_S`` seconds and then SIGKILLs the group, itself
included. When the server exits on its own, the guard exits with its exit code, so the worker
sees the death. No orphan server outlives its worker.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time


def _in_child() -> None:
    """In the server, before exec: default signal handling (the guard ignores SIGTERM and
    SIGINT, which exec would pass on) and death with the guard."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _kill_group(child: subprocess.Popen, grace: float) -> None:
    pgid = os.getpgrp()
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.time() + grace
    while time.time() < deadline and child.poll() is None:
        time.sleep(0.1)
    os.killpg(pgid, signal.SIGKILL)   # the group, this guard included


def main(argv: list[str]) -> int:
    if "--" in argv:
        argv = argv[argv.index("--") + 1:]
    if not argv:
        print("usage: python -m capsfus.engines.server_guard -- CMD...", file=sys.stderr)
        return 2
    # the worker stops the group with SIGTERM first: the guard outlives it to finish the job
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    grace = float(os.environ.get("CAPSFUS_SERVER_GRACE_S", "10"))
    try:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, preexec_fn=_in_child)
    except OSError as e:
        print(f"capsfus server guard: cannot start {argv[0]}: {e}", file=sys.stderr, flush=True)
        return 127

    def watch_parent() -> None:
        try:
            while sys.stdin.buffer.read(4096):
                pass
        except OSError:
            pass
        print("capsfus server guard: the worker is gone: stopping the server", flush=True)
        _kill_group(child, grace)

    threading.Thread(target=watch_parent, daemon=True).start()
    rc = child.wait()
    print(f"capsfus server guard: the server exited with {rc}", flush=True)
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    os._exit(code)   # not sys.exit: the stdin watcher thread blocks interpreter shutdown
