"""The local executor: workers in this process (``--workers 1``) or in child processes that
die with their parent (PR_SET_PDEATHSIG). Each worker loads its engine once and pulls shards:
it skips shards that are done, leases the next free one, and goes on until none is left.
"""

from __future__ import annotations

import ctypes
import json
import logging
import multiprocessing as mp
import os
import re
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..rundir.fresh import stale_message, state_is_current, upstream_sha
from ..rundir.io import atomic_write_json
from ..rundir.job import StageJob
from ..rundir.lease import DEFAULT_HEARTBEAT, DEFAULT_TTL, LeaseDir
from ..rundir.manifest import Run
from ..rundir.runner import StageContext, run_shard, wants_retry
from ..rundir.stage import StageDir, settings_hash

log = logging.getLogger("capsfus.worker")


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class Prepared:
    """A stage checked and configured for a run, ready for workers (picklable)."""

    job: StageJob
    settings_hash: str
    input_stage: str
    shards: list[int]
    # --retry-rejected: the reasons whose rows get another try, once per invocation (retry_id)
    retry_reasons: frozenset = frozenset()
    retry_id: str | None = None


def prepare(job: StageJob, shards: list[int] | None, force: bool = False,
            dry_run: bool = False, retry_rejected: bool = False) -> Prepared:
    """Resolves the job (e.g. the model's revision), applies the settings rule and writes the
    stage config: done once, before any worker starts.

    ``dry_run``: the same checks and the same refusal (settings diff, --force/--tag advice), but
    nothing is written. A revision the job could not resolve without downloading (None: a Hub
    model not in the local cache) is taken from the stage's config, so the plan compares like
    with like (a changed model still shows in the diff). ``retry_rejected``: rows the stage
    rejected for a transient reason (its ``transient_reasons``) get another try."""
    run = Run(Path(job.run_dir))
    manifest = run.manifest()
    if not manifest["shards"]:
        raise UserError(f"{run.root} has no rows (every input row was rejected at ingest: see "
                        f"`capsfus cat {run.root} --stage input --rejected`)")
    job, input_stage, settings = job.resolve(run)
    if input_stage != "input":
        # a stage never reads a stale upstream shard: the user redoes that stage first
        msg = stale_message(run, input_stage, manifest, reading=f"{job.stage} reads {input_stage}"
                                                                f", and ")
        if msg:
            raise UserError(msg)
    stage = StageDir(run, job.stage)
    if dry_run:
        old = stage.config()
        recorded = (old or {}).get("settings") or {}
        for key in [k for k, v in settings.items() if "revision" in k and v is None]:
            if recorded.get(key) is not None:   # a Hub model not in the local cache
                settings = {**settings, key: recorded[key]}
        h = settings_hash(settings)
        # ensure_config writes only when there is no config, or with force and a change:
        # elsewhere it returns the hash or refuses, exactly as the real command does
        if old is not None and (not force or old.get("settings_hash") == h):
            h = stage.ensure_config(manifest["run_id"], input_stage, settings, force)
    else:
        h = stage.ensure_config(manifest["run_id"], input_stage, settings, force)
    if shards is None:
        shards = list(range(len(manifest["shards"])))
    reasons = frozenset(getattr(job, "transient_reasons", ()) or ()) if retry_rejected \
        else frozenset()
    if retry_rejected and not reasons:
        raise UserError(f"stage {job.stage} rejects no row for a transient reason: "
                        f"--retry-rejected has nothing to retry there")
    import uuid
    return Prepared(job, h, input_stage, shards, reasons,
                    uuid.uuid4().hex if reasons else None)


def final_looks_done(stage: StageDir, state: dict | None, current_hash: str) -> bool:
    """A done shard as a worker's scan sees it: done with the current settings, its final
    files present with the sizes the state lists and not modified since the state said done.
    One stat per file, no read: the checksum was verified when the final file was written
    (compaction), and is verified again by whoever reads it (a worker that takes the shard,
    ``cat``, downstream stages, export). Re-hashing every final on every scan read the whole
    output again and again (issue 13). A final whose mtime is later than the state's (written
    over, or copied without its times) is hashed in full, as before."""
    if not state or state.get("status") != "done" or not state.get("final"):
        return False
    if state.get("settings_hash") != current_hash:
        return False
    shard = state["shard"]
    written = state.get("finished") or state.get("updated") or 0
    for key, folder in (("out", stage.out_dir(shard)), ("rejected", stage.rejected_dir(shard))):
        meta = state["final"].get(key)
        if not meta:
            continue
        try:
            st = os.stat(folder / meta["file"])
        except OSError:
            return False
        if meta.get("bytes") is not None and st.st_size != meta["bytes"]:
            return False
        if st.st_mtime > written:
            return stage.final_is_trusted(state, current_hash)
    return True


def _done_and_current(run: Run, manifest: dict, prep: Prepared, shard: int,
                      st: dict | None) -> bool:
    """Done with these settings from today's upstream output, and not wanted by
    ``--retry-rejected``: what the state file alone can tell."""
    return bool(st and st.get("status") == "done" and st.get("final")) and state_is_current(
        st, prep.settings_hash, upstream_sha(run, manifest, prep.input_stage, shard)) and \
        not wants_retry(st, prep.retry_reasons, prep.retry_id)


def shards_with_work(prep: Prepared) -> list[int]:
    """Selected shards a worker would run (not finished and current with these settings);
    empty when there is nothing to do, so a command can say so before loading any model. The
    state files are read first; the final files' checksums are verified only when every shard
    looks done (so a run with work left is not hashed twice, and a corrupted final file still
    counts as work)."""
    run = Run(Path(prep.job.run_dir))
    manifest = run.manifest()
    stage = StageDir(run, prep.job.stage)
    states = {i: stage.read_state(i) for i in prep.shards}
    looks_todo = [i for i in prep.shards
                  if not _done_and_current(run, manifest, prep, i, states[i])]
    if looks_todo:
        return looks_todo
    return [i for i in prep.shards
            if not (stage.final_is_trusted(states[i], prep.settings_hash)
                    and not stage.has_leftovers(i, states[i]))]


def worker_main(prep: Prepared, worker_id: str, lease_ttl: float = DEFAULT_TTL,
                heartbeat: float = DEFAULT_HEARTBEAT, child: bool = False,
                job_alive=None, index: int | None = None, workers: int | None = None) -> dict:
    """One worker: load the engine once, then lease and run shards until none is left.

    Passes over the shard list repeat while the last pass ran something, so a shard whose
    holder died while this worker was busy elsewhere is taken over. When a pass finds only
    shards held by others (busy), the worker does not exit at once: their holder may still
    die (a node failure, a requeue) and leave the shard to nobody, so it polls until they are
    done, or until ``lease_ttl`` passes with nothing to run (by then a dead holder's lease has
    expired and been taken over, or a live holder is making progress). It stops when a pass
    finds nothing to do (every shard done or failed here) or that wait runs out.

    ``index`` of ``workers``: this worker's place among all workers of the submission, so
    workers start at evenly spread places in the shard list.
    """
    if child:
        die_with_parent()
    job = prep.job
    run = Run(Path(job.run_dir))
    stage = StageDir(run, job.stage)
    logs = stage.root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"worker-{worker_id}.log"
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("capsfus")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    os.environ["CAPSFUS_WORKER_ID"] = worker_id
    devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    t0 = time.time()
    log.info("worker %s on %s pid %d (CUDA_VISIBLE_DEVICES=%s): loading %s", worker_id,
             socket.gethostname(), os.getpid(), devices, job.stage)
    opened = job.open()
    load_s = time.time() - t0
    leases = LeaseDir(stage.root / "leases", ttl=lease_ttl, job_alive=job_alive)
    ctx = StageContext(run=run, manifest=run.manifest(), stage=stage,
                       input_stage=prep.input_stage, settings_hash=prep.settings_hash,
                       processor=opened.processor, leases=leases,
                       chunk_size=job.chunk_size, heartbeat=heartbeat,
                       worker={"id": worker_id, "log": str(log_path)},
                       retry_reasons=prep.retry_reasons, retry_id=prep.retry_id)
    summary = {"worker": worker_id, "host": socket.gethostname(), "pid": os.getpid(),
               "cuda_visible_devices": devices, "engine": opened.describe,
               "runtime": opened.runtime, "load_s": round(load_s, 3), "gen_s": 0.0,
               "busy_wall_s": 0.0, "shards": {}, "waited_s": 0.0}
    t_loaded = time.time()
    failed_here: set[int] = set()
    order = _rotate(prep.shards, worker_id, index, workers)
    poll = max(0.2, min(heartbeat, lease_ttl / 10, 10.0))
    idle_since: float | None = None
    stopped = None
    while stopped is None:
        ran = False
        busy = 0
        for shard in order:
            if shard in failed_here:
                continue
            st = stage.read_state(shard)
            if final_looks_done(stage, st, prep.settings_hash) and \
                    _done_and_current(run, ctx.manifest, prep, shard, st) and \
                    not stage.has_leftovers(shard, st):
                continue
            res = run_shard(ctx, shard)
            if res.status == "busy":
                busy += 1
                continue
            summary["shards"][str(shard)] = res.status
            summary["gen_s"] += res.gen_seconds
            ran |= res.status in ("done", "failed", "fenced")
            if res.status == "failed":
                failed_here.add(shard)
            if res.status in ("done", "failed"):
                log.info("shard %d %s: %d rows, %.1fs generating of %.1fs", shard, res.status,
                         res.rows, res.gen_seconds, res.wall_seconds)
            summary["busy_wall_s"] = round(time.time() - t_loaded, 3)
            summary["gen_s"] = round(summary["gen_s"], 3)
            summary["generation_share"] = round(summary["gen_s"] / summary["busy_wall_s"], 4) \
                if summary["busy_wall_s"] else None
            atomic_write_json(logs / f"worker-{worker_id}.json", summary)
            if res.fatal:
                # the engine, not a row, is failing: taking more shards would only fail them
                stopped = f"shard {shard}: {res.error}"
                summary["stopped"] = stopped
                log.error("worker %s stops taking shards: %s", worker_id, stopped)
                break
        if stopped is not None:
            break
        if ran:
            idle_since = None
            continue
        if not busy:
            break
        # only shards held by others are left: wait for them (their holder may still fail)
        now = time.time()
        if idle_since is None:
            idle_since = now
            log.info("worker %s: %d shard(s) held by other workers; waiting up to %.0fs in "
                     "case a holder dies", worker_id, busy, lease_ttl)
        if now - idle_since >= lease_ttl:
            log.info("worker %s: %d shard(s) still held by live workers after %.0fs: leaving "
                     "them to their holders", worker_id, busy, lease_ttl)
            break
        time.sleep(poll)
        summary["waited_s"] = round(summary["waited_s"] + poll, 3)
    # also when this worker found nothing left to do (the others were faster): every worker
    # that started leaves its summary
    atomic_write_json(logs / f"worker-{worker_id}.json", summary)
    opened.close()
    log.info("worker %s finished: %s", worker_id, summary["shards"])
    root.removeHandler(handler)
    handler.close()
    return summary


_GOLDEN = (5 ** 0.5 - 1) / 2


def worker_number(worker_id: str) -> int:
    """The trailing number of a worker id: ``987654_17`` (a SLURM array element) -> 17,
    ``host-1234-3`` (a local worker) -> 3, anything else -> 0."""
    m = re.search(r"(\d+)$", worker_id)
    if not m:
        return 0
    head = worker_id[:m.start()]
    return int(m.group(1)) if head.endswith(("_", "-")) else 0


def _rotate(shards: list[int], worker_id: str, index: int | None = None,
            workers: int | None = None) -> list[int]:
    """Workers start at different places in the shard list so they rarely race for a lease.

    With ``index`` of ``workers`` known (SLURM arrays pass their global element number, local
    pools their worker number), worker k starts at ``k * n / workers``: evenly spread, and all
    different while workers <= shards. Otherwise the worker id's trailing number k (the array
    task id) picks ``frac(k * golden ratio) * n``, a low-discrepancy spread for any count."""
    n = len(shards)
    if n == 0:
        return shards
    if index is not None and workers:
        off = (index % workers) * n // workers
    else:
        k = worker_number(worker_id)
        off = int(((k * _GOLDEN) % 1.0) * n) % n
    return shards[off:] + shards[:off]


def _child_entry(prep: Prepared, worker_id: str, lease_ttl: float, heartbeat: float,
                 index: int = 0, workers: int = 1) -> None:
    worker_main(prep, worker_id, lease_ttl, heartbeat, child=True, index=index,
                workers=workers)


def run_local(prep: Prepared, workers: int = 1, lease_ttl: float = DEFAULT_TTL,
              heartbeat: float = DEFAULT_HEARTBEAT) -> list[dict]:
    """Runs the stage here; returns the worker summaries. Workers > 1 are child processes."""
    tag = f"{socket.gethostname()}-{os.getpid()}"
    if workers <= 1:
        return [worker_main(prep, f"{tag}-0", lease_ttl, heartbeat)]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_child_entry, args=(prep, f"{tag}-{i}", lease_ttl, heartbeat, i,
                                                           workers),
                         name=f"capsfus-worker-{i}") for i in range(workers)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except BaseException:
        for p in procs:
            p.kill()
        raise
    bad = [p for p in procs if p.exitcode != 0]
    if bad:
        log.error("%d worker(s) exited abnormally: %s", len(bad),
                  ", ".join(f"{p.name}={p.exitcode}" for p in bad))
    summaries = []
    logs = StageDir(Run(Path(prep.job.run_dir)), prep.job.stage).root / "logs"
    for i in range(workers):
        f = logs / f"worker-{tag}-{i}.json"
        if f.exists():
            summaries.append(json.loads(f.read_text()))
    return summaries
