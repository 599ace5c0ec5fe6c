"""Runs one shard of a stage in chunks, exactly once, safe to call twice (``run_shard``).

Three threads overlap I/O with generation: a reader prepares the next chunk (reads rows,
renders prompts) while the main thread generates the current one and a writer commits the
previous one. A chunk is committed by (1) writing its out/rejected files atomically, each named
with the lease epoch, then (2) after the fencing check, rewriting the shard state to list them
with their checksums. A kill at any moment loses at most the chunks in flight; the next holder
continues after the last listed chunk. When every row is done the chunks are compacted into
one file per shard.

A stage plugs in through a *processor* with two methods:
``prepare(rows) -> prepared`` (reader thread, cheap) and
``process(prepared) -> (out_rows, rejected_rows)`` (main thread, the expensive part), where
every input row comes back exactly once, in ``out_rows`` or in ``rejected_rows`` with a
``reason``.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

from .faults import crashpoint
from .fresh import upstream_sha
from .io import JsonlZstWriter, iter_jsonl_zst
from .lease import Fenced, Lease, LeaseDir
from .manifest import Run
from .retry import retry_rejected, transient_ids
from .stage import StageDir, input_rows

log = logging.getLogger("capsfus.runner")


class Processor(Protocol):
    def prepare(self, rows: list[dict]) -> Any: ...
    def process(self, prepared: Any) -> tuple[list[dict], list[dict]]: ...


__all__ = ["EngineFailing", "Fenced", "Processor", "ShardResult", "StageContext", "run_shard",
           "wants_retry", "write_rows_fenced", "write_state_fenced"]


class EngineFailing(Exception):
    """Raised by a processor when its engine, not a row, is failing (stages/failures.py):
    the chunk's rows are not rejected, the shard is marked failed with this error, and the
    worker takes no more shards. An engine's own exception that says the same without
    importing the run dir (e.g. a server that died twice) carries ``engine_failing = True``."""


def _engine_failing(err: BaseException) -> bool:
    return isinstance(err, EngineFailing) or getattr(err, "engine_failing", False) is True


@dataclass
class StageContext:
    run: Run
    manifest: dict
    stage: StageDir
    input_stage: str
    settings_hash: str
    processor: Processor
    leases: LeaseDir
    chunk_size: int = 1000
    heartbeat: float = 30.0
    worker: dict = field(default_factory=dict)
    # --retry-rejected: rows rejected earlier for one of these reasons get another try, once
    # per invocation (``retry_id``)
    retry_reasons: frozenset = frozenset()
    retry_id: str | None = None


@dataclass
class ShardResult:
    shard: int
    status: str                 # done | busy | failed | fenced | already_done
    rows: int = 0
    gen_seconds: float = 0.0
    wall_seconds: float = 0.0
    error: str | None = None
    fatal: bool = False         # the engine is failing: the worker must stop taking shards


def rows_total(ctx: StageContext, shard: int) -> int:
    if ctx.input_stage == "input":
        return ctx.manifest["shards"][shard]["rows"]
    st = StageDir(ctx.run, ctx.input_stage).read_state(shard) or {}
    return st.get("rows_out", 0)


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.2)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue, stop: threading.Event):
    while True:
        try:
            return q.get(timeout=0.2)
        except queue.Empty:
            if stop.is_set():
                return None


def run_shard(ctx: StageContext, shard: int) -> ShardResult:
    """Leases the shard and brings it to done, continuing from its last trusted chunk."""
    lease = ctx.leases.acquire(shard, extra={"worker_log": ctx.worker.get("log")})
    if lease is None:
        return ShardResult(shard, "busy")
    lease.start_heartbeat(ctx.heartbeat)
    try:
        return _run_leased(ctx, shard, lease)
    except Fenced as e:
        log.warning("%s", e)
        return ShardResult(shard, "fenced", error=str(e))
    finally:
        lease.release()


def write_state_fenced(stage: StageDir, lease: Lease, shard: int, state: dict) -> None:
    """The fencing check, then the write through the lease's token: a holder frozen between
    the two (``fenced_write``) and taken over meanwhile writes nothing when it wakes. Every
    shard state of every stage is written through here (the teacher too)."""
    if not lease.still_mine():
        raise Fenced(f"shard {shard}: lease epoch {lease.epoch} was taken over")
    crashpoint("fenced_write")
    with lease.writing() as token:
        stage.write_state(shard, state, tmp_dir=token)


def _write_state(ctx: StageContext, lease: Lease, shard: int, state: dict) -> None:
    write_state_fenced(ctx.stage, lease, shard, state)


def wants_retry(state: dict | None, reasons: frozenset, retry_id: str | None) -> bool:
    """True when ``--retry-rejected`` still has rows of this shard to give another try."""
    return bool(reasons and state and set(state.get("reasons") or {}) & reasons
                and state.get("retried_in") != retry_id)


def _run_leased(ctx: StageContext, shard: int, lease: Lease) -> ShardResult:
    stage, h = ctx.stage, ctx.settings_hash
    old = stage.read_state(shard) or {}
    # done means current: today's settings and today's upstream output (see fresh.py)
    in_sha = upstream_sha(ctx.run, ctx.manifest, ctx.input_stage, shard)
    if stage.final_is_trusted(old, h) and old.get("input_sha256") == in_sha \
            and in_sha is not None:
        stage.remove_untrusted(shard, stage.final_files(old), unlink=lease.remove)  # leftovers
        if wants_retry(old, ctx.retry_reasons, ctx.retry_id):
            old.update(epoch=lease.epoch,
                       owner={k: lease.data.get(k) for k in ("host", "pid", "job_id", "worker")})
            return _guarded_retry(ctx, shard, lease, old, None)
        return ShardResult(shard, "already_done", old.get("rows_out", 0))
    if old.get("status") == "done":
        why = ("its input changed (upstream shard redone)"
               if stage.final_is_trusted(old, h) else
               "made with other settings" if old.get("settings_hash") != h else
               "final output missing or corrupted")
        log.warning("shard %d: %s: redoing the shard", shard, why)
        old = {**old, "chunks": []}
    chunks = stage.trusted_prefix(old, h, in_sha)
    if len(chunks) < len(old.get("chunks", [])):
        log.warning("shard %d: %d chunk(s) untrusted (missing, corrupted, other settings or "
                    "other input): redoing them", shard, len(old["chunks"]) - len(chunks))
    total = rows_total(ctx, shard)
    start_row = chunks[-1]["end"] if chunks else 0
    state = {
        "shard": shard, "stage": stage.name, "status": "running", "epoch": lease.epoch,
        "settings_hash": h, "input_sha256": in_sha, "rows_total": total, "rows_done": start_row,
        "rows_out": sum(c["out"]["rows"] for c in chunks),
        "rows_rejected": sum(c["rejected"]["rows"] if c.get("rejected") else 0 for c in chunks),
        "reasons": dict(sum((Counter(c.get("reasons", {})) for c in chunks), Counter())),
        "chunks": chunks, "attempts": old.get("attempts", 0) + 1,
        "owner": {k: lease.data.get(k) for k in ("host", "pid", "job_id", "worker")},
        "log": ctx.worker.get("log"), "last_error": old.get("last_error"),
        "timings": {"gen_s": 0.0, "wall_s": 0.0, "rows": 0},
        "timings_history": (old.get("timings_history", []) + [old["timings"]])[-5:]
        if old.get("timings") else [],
        "final": None,
    }
    keep = {c["out"]["file"] for c in chunks} | {c["rejected"]["file"] for c in chunks
                                                  if c.get("rejected")}
    # --retry-rejected on a shard not done yet: the rows rejected (transiently) by an earlier
    # invocation, not those this one rejects
    retry_ids = transient_ids(ctx, shard, chunks) \
        if wants_retry({"reasons": state["reasons"]}, ctx.retry_reasons, ctx.retry_id) \
        and old.get("retried_in") != ctx.retry_id else None
    stage.remove_untrusted(shard, keep, unlink=lease.remove)
    _write_state(ctx, lease, shard, state)

    t_start = time.time()
    stop = threading.Event()
    errors: list[BaseException] = []
    in_q: queue.Queue = queue.Queue(maxsize=2)
    out_q: queue.Queue = queue.Queue()
    # One chunk may be committing while the next is generated, never more: a kill loses at
    # most those two chunks of generation work.
    commit_slot = threading.Semaphore(1)

    def reader():
        try:
            rows = input_rows(ctx.run, ctx.manifest, ctx.input_stage, shard,
                              expect_sha=in_sha)
            rows = itertools.islice(rows, start_row, None)
            pos = start_row
            while not stop.is_set():
                batch = list(itertools.islice(rows, ctx.chunk_size))
                if not batch:
                    break
                prepared = ctx.processor.prepare(batch)
                if not _put(in_q, (pos, pos + len(batch), len(batch), prepared), stop):
                    return
                pos += len(batch)
            if pos != total and not stop.is_set():
                raise RuntimeError(f"shard {shard}: read {pos} input rows, expected {total}")
            _put(in_q, None, stop)
        except BaseException as e:  # handed to the main thread
            errors.append(e)
            stop.set()

    def writer():
        try:
            while True:
                item = _get(out_q, stop)
                if item is None:
                    return
                _commit_chunk(ctx, lease, shard, state, *item, t_start=t_start)
                commit_slot.release()
        except BaseException as e:
            errors.append(e)
            stop.set()

    threads = [threading.Thread(target=reader, name=f"reader-{shard}", daemon=True),
               threading.Thread(target=writer, name=f"writer-{shard}", daemon=True)]
    for t in threads:
        t.start()
    gen_s = 0.0
    try:
        while True:
            item = _get(in_q, stop)
            if item is None:
                break
            start, end, n, prepared = item
            t0 = time.time()
            out_rows, rej_rows = ctx.processor.process(prepared)
            gen_s += time.time() - t0
            state["timings"]["gen_s"] = round(gen_s, 4)
            if len(out_rows) + len(rej_rows) != n:
                raise RuntimeError(f"shard {shard} rows {start}-{end}: the stage returned "
                                   f"{len(out_rows)} + {len(rej_rows)} rows for {n}")
            while not commit_slot.acquire(timeout=0.2):
                if stop.is_set():
                    break
            if stop.is_set():
                break
            out_q.put((start, end, out_rows, rej_rows))
        out_q.put(None)
        threads[1].join()
        stop.set()
        threads[0].join(timeout=10)
        if errors:
            raise errors[0]
        _compact(ctx, lease, shard, state)
        wall = time.time() - t_start
        if retry_ids:
            return _guarded_retry(ctx, shard, lease, state, retry_ids)
        return ShardResult(shard, "done", state["rows_done"] - start_row, gen_s, wall)
    except Exception as e:
        stop.set()
        for t in threads:
            t.join(timeout=10)
        err = next((x for x in errors if isinstance(x, Fenced)), e)
        if isinstance(err, Fenced):
            log.warning("%s", err)
            return ShardResult(shard, "fenced", error=str(err))
        from ..errors import UserError
        msg = f"{type(err).__name__}: {err}"
        fatal = _engine_failing(err)
        if isinstance(err, UserError) or fatal:   # a clear cause: no traceback
            log.error("shard %d failed: %s", shard, err)
        else:
            log.error("shard %d failed: %s\n%s", shard, msg,
                      "".join(traceback.format_exception(err)))
        state["status"] = "failed"
        state["last_error"] = {"message": msg[:2000], "time": time.time(), "epoch": lease.epoch,
                               **({"engine_failing": True} if fatal else {})}
        try:
            _write_state(ctx, lease, shard, state)
        except Fenced:
            return ShardResult(shard, "fenced", error=msg)
        return ShardResult(shard, "failed", error=msg, fatal=fatal)
    finally:
        stop.set()


def _guarded_retry(ctx: StageContext, shard: int, lease: Lease, state: dict,
                   only: set[str] | None) -> ShardResult:
    """The retry pass on a done shard (retry.py). If it fails, the shard stays done with its
    old finals (nothing was switched); the error is reported, and an engine failure stops
    the worker as anywhere else."""
    t0 = time.time()
    try:
        n, gen_s = retry_rejected(ctx, shard, lease, state, only,
                                  lambda st: _write_state(ctx, lease, shard, st))
    except Fenced:
        raise
    except Exception as e:
        msg = f"{type(e).__name__}: {e}"
        log.error("shard %d: retrying its rejected rows failed (the shard keeps its earlier "
                  "output): %s", shard, msg)
        return ShardResult(shard, "failed", error=msg, fatal=_engine_failing(e))
    return ShardResult(shard, "done", n, gen_s, time.time() - t0)


def _commit_chunk(ctx: StageContext, lease: Lease, shard: int, state: dict, start: int,
                  end: int, out_rows: list[dict], rej_rows: list[dict], t_start: float) -> None:
    stage = ctx.stage
    name = f"c{start:09d}-{end:09d}.e{lease.epoch:06d}.jsonl.zst"
    if not lease.still_mine():      # cheap early exit; the token is what makes it safe
        raise Fenced(f"shard {shard}: lease epoch {lease.epoch} was taken over")
    out_meta = write_rows_fenced(lease, stage.out_dir(shard) / name, out_rows)
    rej_meta = write_rows_fenced(lease, stage.rejected_dir(shard) / name, rej_rows) if rej_rows \
        else None
    crashpoint("after_chunk_file")
    reasons = Counter(r.get("reason", "unknown") for r in rej_rows)
    state["chunks"].append({"start": start, "end": end, "epoch": lease.epoch,
                            "settings_hash": ctx.settings_hash,
                            "input_sha256": state.get("input_sha256"), "out": out_meta,
                            "rejected": rej_meta, "reasons": dict(reasons)})
    state["reasons"] = dict(Counter(state.get("reasons", {})) + reasons)
    state["rows_done"] = end
    state["rows_out"] += len(out_rows)
    state["rows_rejected"] += len(rej_rows)
    state["timings"].update(wall_s=round(time.time() - t_start, 4),
                            rows=state["timings"]["rows"] + (end - start))
    _write_state(ctx, lease, shard, state)
    crashpoint("after_state")


def write_rows_fenced(lease: Lease, path, rows) -> dict:
    """An output file of rows (atomic, checksummed: its meta for the state) written through
    the lease's token: it cannot land once the lease is taken over."""
    with lease.writing() as token:
        w = JsonlZstWriter(path, tmp_dir=token)
        try:
            w.write_many(rows)
            return w.commit()
        except BaseException:
            w.abort()
            raise


def _compact(ctx: StageContext, lease: Lease, shard: int, state: dict) -> None:
    """Concatenates the shard's chunks into one out file (and one rejected file), each
    verified against its checksum on the way, then lists them in the state as final."""
    stage = ctx.stage
    name = f"shard.e{lease.epoch:06d}.jsonl.zst"
    final: dict = {}
    for key, folder in (("out", stage.out_dir(shard)), ("rejected", stage.rejected_dir(shard))):
        parts = [c[key] for c in state["chunks"] if c.get(key)]
        if key == "rejected" and not parts:
            final[key] = None
            continue
        with lease.writing() as token:
            w = JsonlZstWriter(folder / name, tmp_dir=token)
            try:
                for p in parts:
                    w.write_many(iter_jsonl_zst(folder / p["file"], expect_sha256=p["sha256"]))
                final[key] = w.commit()
            except BaseException:
                w.abort()
                raise
    n_out = final["out"]["rows"]
    n_rej = final["rejected"]["rows"] if final["rejected"] else 0
    if n_out + n_rej != state["rows_total"]:
        raise RuntimeError(f"shard {shard}: compaction holds {n_out}+{n_rej} rows, "
                           f"expected {state['rows_total']}")
    crashpoint("mid_compaction")
    chunk_files = [(c["out"]["file"], c.get("rejected") and c["rejected"]["file"])
                   for c in state["chunks"]]
    state.update(status="done", final=final, n_chunks=len(state["chunks"]), chunks=[],
                 rows_out=n_out, rows_rejected=n_rej, finished=time.time())
    _write_state(ctx, lease, shard, state)
    crashpoint("after_compaction")
    for out_f, rej_f in chunk_files:
        for p in (stage.out_dir(shard) / out_f, rej_f and stage.rejected_dir(shard) / rej_f):
            if p:
                lease.remove(p)
