"""``--retry-rejected``: another try for rows a stage rejected for a transient reason.

A done shard holds its final out file and its final rejected file. The retry pass reads the
rejected rows whose reason the stage calls transient (fuse: ``generation_error``), takes
those rows afresh from the stage's input, runs them through the processor, and writes a new
pair of final files: the old out rows plus the newly made ones (merged back into input
order), the other rejections plus the rows that failed again. The switch is one state write
(through the lease's token, after the fencing check), so a kill at any moment leaves either
the old finals or the new ones: a row is in out/ or in rejected/, never both, never twice.
The state records the invocation (``retried_in``) so one invocation tries a row once.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from typing import Callable

from .io import JsonlZstWriter, iter_jsonl_zst
from .lease import Lease
from .stage import input_rows

log = logging.getLogger("capsfus.runner")


def transient_ids(ctx, shard: int, chunks: list[dict]) -> set[str]:
    """Ids of the rows the trusted ``chunks`` rejected for a reason in ``ctx.retry_reasons``."""
    ids: set[str] = set()
    folder = ctx.stage.rejected_dir(shard)
    for c in chunks:
        if c.get("rejected") and set(c.get("reasons") or {}) & ctx.retry_reasons:
            for r in iter_jsonl_zst(folder / c["rejected"]["file"], c["rejected"]["sha256"]):
                if r.get("reason") in ctx.retry_reasons:
                    ids.add(r["id"])
    return ids


def retry_rejected(ctx, shard: int, lease: Lease, state: dict, only: set[str] | None,
                   write_state: Callable[[dict], None]) -> tuple[int, float]:
    """Runs the retry pass on a done shard (see the module docstring); ``only`` limits it to
    those row ids. Returns (rows retried, seconds generating)."""
    stage = ctx.stage
    fin = state["final"]
    rej_file = fin.get("rejected")
    old_rej = list(iter_jsonl_zst(stage.rejected_dir(shard) / rej_file["file"],
                                  rej_file["sha256"])) if rej_file else []
    again = {r["id"] for r in old_rej if r.get("reason") in ctx.retry_reasons
             and (only is None or r["id"] in only)}
    if not again:
        state["retried_in"] = ctx.retry_id
        write_state(state)
        return 0, 0.0
    log.info("shard %d: retrying %d row(s) rejected for %s", shard, len(again),
             ", ".join(sorted(ctx.retry_reasons)))
    order: dict[str, int] = {}
    fresh = []
    for pos, row in enumerate(input_rows(ctx.run, ctx.manifest, ctx.input_stage, shard)):
        order[row["id"]] = pos
        if row["id"] in again:
            fresh.append(row)
    if len(fresh) != len(again):
        raise RuntimeError(f"shard {shard}: {len(again) - len(fresh)} rejected row(s) are no "
                           f"longer in the stage's input")
    new_out, new_rej = [], []
    gen_s = 0.0
    it = iter(fresh)
    while batch := list(itertools.islice(it, ctx.chunk_size)):
        t0 = time.time()
        o, r = ctx.processor.process(ctx.processor.prepare(batch))
        gen_s += time.time() - t0
        if len(o) + len(r) != len(batch):
            raise RuntimeError(f"shard {shard}: the stage returned {len(o)} + {len(r)} rows "
                               f"for {len(batch)}")
        new_out += o
        new_rej += r
    k = state.get("retries", 0) + 1
    name = f"shard.e{lease.epoch:06d}.retry{k}.jsonl.zst"
    old_out = iter_jsonl_zst(stage.out_dir(shard) / fin["out"]["file"], fin["out"]["sha256"])
    # both streams are in input order: merge them back into it
    merged = sorted(((order[r["id"]], 0, r) for r in new_out), key=lambda t: t[0])
    kept_rej = [r for r in old_rej if r["id"] not in again]
    rejected = sorted(kept_rej + new_rej, key=lambda r: order.get(r["id"], -1))
    final: dict = {}
    with lease.writing() as token:
        w = JsonlZstWriter(stage.out_dir(shard) / name, tmp_dir=token)
        try:
            w.write_many(_merge(old_out, merged, order))
            final["out"] = w.commit()
        except BaseException:
            w.abort()
            raise
        if rejected:
            w = JsonlZstWriter(stage.rejected_dir(shard) / name, tmp_dir=token)
            try:
                w.write_many(rejected)
                final["rejected"] = w.commit()
            except BaseException:
                w.abort()
                raise
        else:
            final["rejected"] = None
    n_out, n_rej = final["out"]["rows"], len(rejected)
    if n_out + n_rej != state["rows_total"]:
        raise RuntimeError(f"shard {shard}: the retry holds {n_out}+{n_rej} rows, expected "
                           f"{state['rows_total']}")
    old_files = stage.final_files(state)
    state.update(final=final, rows_out=n_out, rows_rejected=n_rej, retries=k,
                 reasons=dict(Counter(r.get("reason", "unknown") for r in rejected)),
                 retried_in=ctx.retry_id, finished=time.time())
    write_state(state)
    for f in old_files - stage.final_files(state):
        for folder in (stage.out_dir(shard), stage.rejected_dir(shard)):
            lease.remove(folder / f)
    log.info("shard %d: retry made %d row(s), %d rejected again", shard, len(new_out),
             len(new_rej))
    return len(again), gen_s


def _merge(old_out, new: list[tuple[int, int, dict]], order: dict[str, int]):
    """Old out rows and newly made ones, in input order (both already sorted by it)."""
    new_it = iter(new)
    nxt = next(new_it, None)
    for row in old_out:
        pos = order[row["id"]]
        while nxt is not None and nxt[0] < pos:
            yield nxt[2]
            nxt = next(new_it, None)
        yield row
    while nxt is not None:
        yield nxt[2]
        nxt = next(new_it, None)
