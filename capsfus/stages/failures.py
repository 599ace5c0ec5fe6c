"""A poison row or a failing engine: how a stage tells them apart.

A batch that fails is split in halves until the failing rows are alone; a row that still
fails alone ``max_attempts`` times is the row's fault (a *poison row*): it is rejected with a
transient reason and its neighbours go on. But when the engine itself is broken (a GPU that
fell off the bus, a sticky CUDA error, a server that went away) *every* row fails alone, and
rejecting them all would empty the run while reporting success. So the failures are counted:

- ``streak`` rows in a row failed alone with no success in between (across chunks), or
- most of a chunk failed (more than half of its rows, and at least ``min(streak, rows)``)

means the engine is failing: ``EngineFailing`` is raised, the chunk's rows are *not*
rejected, the runner marks the shard failed with the error and the worker takes no more
shards. A rerun once the fault is gone does those rows; ``--retry-rejected`` also gives the
rows rejected earlier for a transient reason another try.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

from ..errors import UserError
from ..rundir.runner import EngineFailing

log = logging.getLogger("capsfus.failures")

ENGINE_FAILURE_STREAK = 8
# errors that say what is wrong with the setup, never with a row: passed on at once
NEVER_A_ROW = (EngineFailing, UserError, MemoryError, KeyboardInterrupt)


class RowFailures:
    """Runs ``call(indices) -> results`` over ``n`` rows with bisection and the rule above.
    One per worker: the streak carries over from chunk to chunk."""

    def __init__(self, errors: tuple[type[BaseException], ...], max_attempts: int = 3,
                 streak: int = ENGINE_FAILURE_STREAK, what: str = "the engine"):
        self.errors = errors
        self.max_attempts = max(1, max_attempts)
        self.streak_limit = max(2, streak)
        self.what = what
        self.streak = 0

    def run(self, n: int, call: Callable[[list[int]], Sequence]) -> list:
        """One result per row, or the row's exception when it failed alone every attempt."""
        results: list = [None] * n
        failed = 0

        def gave_up(i: int, e: BaseException) -> None:
            nonlocal failed
            failed += 1
            self.streak += 1
            results[i] = e
            if self.streak >= self.streak_limit:
                raise EngineFailing(f"{self.what} is failing: {self.streak} rows in a row failed "
                                    f"alone with no success between (last error: "
                                    f"{type(e).__name__}: {str(e)[:300]})") from e
            log.warning("row rejected after %d attempts: %s", self.max_attempts, e)

        def solve(idx: list[int]) -> None:
            if not idx:
                return
            try:
                got = call(idx)
            except self.errors as e:
                if isinstance(e, NEVER_A_ROW):
                    raise
                if len(idx) == 1:
                    for _ in range(2, self.max_attempts + 1):
                        try:
                            results[idx[0]] = call(idx)[0]
                            self.streak = 0
                            return
                        except self.errors as again:
                            if isinstance(again, NEVER_A_ROW):
                                raise
                            e = again
                    gave_up(idx[0], e)
                    return
                log.warning("batch of %d failed (%s): bisecting", len(idx), e)
                mid = len(idx) // 2
                solve(idx[:mid])
                solve(idx[mid:])
                return
            self.streak = 0
            for i, g in zip(idx, got):
                results[i] = g

        solve(list(range(n)))
        if failed >= 2 and failed * 2 > n and failed >= min(self.streak_limit, n):
            last = next(r for r in reversed(results) if isinstance(r, BaseException))
            raise EngineFailing(f"{self.what} is failing: {failed} of the chunk's {n} rows "
                                f"failed (last error: {type(last).__name__}: "
                                f"{str(last)[:300]})") from last
        return results
