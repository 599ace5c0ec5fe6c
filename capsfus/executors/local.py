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
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..rundir.io import atomic_write_json
from ..rundir.job import StageJob
from ..rundir.lease import DEFAULT_HEARTBEAT, DEFAULT_TTL, LeaseDir
from ..rundir.manifest import Run
from ..rundir.runner import StageContext, run_shard
from ..rundir.stage import StageDir

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


def prepare(job: StageJob, shards: list[int] | None, force: bool = False) -> Prepared:
    """Resolves the job (e.g. the model's revision), applies the settings rule and writes the
    stage config: done once, before any worker starts."""
    run = Run(Path(job.run_dir))
    manifest = run.manifest()
    if not manifest["shards"]:
        raise UserError(f"{run.root} has no rows (every input row was rejected at ingest: see "
                        f"`capsfus cat {run.root} --stage input --rejected`)")
    job, input_stage, settings = job.resolve(run)
    h = StageDir(run, job.stage).ensure_config(manifest["run_id"], input_stage, settings, force)
    if shards is None:
        shards = list(range(len(manifest["shards"])))
    return Prepared(job, h, input_stage, shards)


def shard_is_finished(stage: StageDir, shard: int, settings_hash: str) -> bool:
    """Done with these settings, its final files trusted and nothing left over: a worker
    skips it."""
    st = stage.read_state(shard)
    return bool(st and st.get("status") == "done" and stage.final_is_trusted(st, settings_hash)
                and not stage.has_leftovers(shard, st))


def shards_with_work(prep: Prepared) -> list[int]:
    """Selected shards a worker would run (not finished with these settings); empty when there
    is nothing to do, so a command can say so before loading any model. The state files are
    read first; the final files' checksums are verified only when every shard looks done (so
    a run with work left is not hashed twice, and a corrupted final file still counts as
    work)."""
    stage = StageDir(Run(Path(prep.job.run_dir)), prep.job.stage)
    looks_todo = []
    for i in prep.shards:
        st = stage.read_state(i)
        if not (st and st.get("status") == "done" and st.get("final")
                and st.get("settings_hash") == prep.settings_hash):
            looks_todo.append(i)
    if looks_todo:
        return looks_todo
    return [i for i in prep.shards if not shard_is_finished(stage, i, prep.settings_hash)]


def worker_main(prep: Prepared, worker_id: str, lease_ttl: float = DEFAULT_TTL,
                heartbeat: float = DEFAULT_HEARTBEAT, child: bool = False,
                job_alive=None) -> dict:
    """One worker: load the engine once, then lease and run shards until none is left.

    Passes over the shard list repeat while the last pass ran something, so a shard whose
    holder died while this worker was busy elsewhere is taken over; a worker stops when a
    whole pass finds nothing to do (every shard done, held by a live worker, or failed here).
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
                       worker={"id": worker_id, "log": str(log_path)})
    summary = {"worker": worker_id, "host": socket.gethostname(), "pid": os.getpid(),
               "cuda_visible_devices": devices, "engine": opened.describe,
               "runtime": opened.runtime, "load_s": round(load_s, 3), "gen_s": 0.0,
               "busy_wall_s": 0.0, "shards": {}}
    t_loaded = time.time()
    failed_here: set[int] = set()
    while True:
        ran = False
        for shard in _rotate(prep.shards, worker_id):
            if shard in failed_here:
                continue
            if shard_is_finished(stage, shard, prep.settings_hash):
                continue
            res = run_shard(ctx, shard)
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
        if not ran:
            break
    # also when this worker found nothing left to do (the others were faster): every worker
    # that started leaves its summary
    atomic_write_json(logs / f"worker-{worker_id}.json", summary)
    opened.close()
    log.info("worker %s finished: %s", worker_id, summary["shards"])
    root.removeHandler(handler)
    handler.close()
    return summary


def _rotate(shards: list[int], worker_id: str) -> list[int]:
    """Workers start at different places in the shard list so they rarely race for a lease."""
    try:
        k = int(worker_id.rsplit("-", 1)[-1])
    except ValueError:
        k = 0
    n = len(shards)
    if n == 0:
        return shards
    off = (k * max(1, n // 8)) % n
    return shards[off:] + shards[:off]


def _child_entry(prep: Prepared, worker_id: str, lease_ttl: float, heartbeat: float) -> None:
    worker_main(prep, worker_id, lease_ttl, heartbeat, child=True)


def run_local(prep: Prepared, workers: int = 1, lease_ttl: float = DEFAULT_TTL,
              heartbeat: float = DEFAULT_HEARTBEAT) -> list[dict]:
    """Runs the stage here; returns the worker summaries. Workers > 1 are child processes."""
    tag = f"{socket.gethostname()}-{os.getpid()}"
    if workers <= 1:
        return [worker_main(prep, f"{tag}-0", lease_ttl, heartbeat)]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_child_entry, args=(prep, f"{tag}-{i}", lease_ttl, heartbeat),
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
