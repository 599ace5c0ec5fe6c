"""Injected fault points for kill and freeze tests. Off unless set.

- ``CAPSFUS_CRASH_AT=NAME[:N]`` SIGKILLs the process the N-th time (default 1st) execution
  reaches ``crashpoint(NAME)``;
- ``CAPSFUS_FREEZE_AT=NAME[:N]`` SIGSTOPs it there instead (a worker frozen at that exact
  point, as by a debugger, a swapping node or a hung NFS mount); SIGCONT wakes it.

Points: ``after_chunk_file``, ``after_state``, ``mid_compaction``, ``after_compaction``
(runner), ``fenced_write`` (between a lease holder's fencing check and its state write, the
teacher's too), ``before_rename`` (an atomic write's temp file is complete, not yet renamed
into place); teacher: ``teacher_after_read`` (a shard's rows read, nothing written),
``teacher_after_send_record``, ``teacher_after_result``, ``teacher_mid_materialize``.
"""

from __future__ import annotations

import os
import signal

_hits: dict[tuple[str, str], int] = {}


def _hit(var: str, name: str) -> bool:
    spec = os.environ.get(var)
    if not spec:
        return False
    target, _, nth = spec.partition(":")
    if target != name:
        return False
    key = (var, name)
    _hits[key] = _hits.get(key, 0) + 1
    return _hits[key] == int(nth or 1) if var == "CAPSFUS_FREEZE_AT" else \
        _hits[key] >= int(nth or 1)


def crashpoint(name: str) -> None:
    if _hit("CAPSFUS_CRASH_AT", name):
        os.kill(os.getpid(), signal.SIGKILL)
    if _hit("CAPSFUS_FREEZE_AT", name):
        os.kill(os.getpid(), signal.SIGSTOP)
