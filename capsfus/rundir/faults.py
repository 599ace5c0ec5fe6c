"""Injected crash points for kill tests: ``CAPSFUS_CRASH_AT=NAME[:N]`` SIGKILLs the process
the N-th time (default 1st) execution reaches ``crashpoint(NAME)``. Off unless set."""

from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def crashpoint(name: str) -> None:
    spec = os.environ.get("CAPSFUS_CRASH_AT")
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
