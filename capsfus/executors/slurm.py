"""The SLURM executor (submitit): workers pull shards.

``--nodes 16 --gpus-per-node 8`` means at most 128 one-GPU workers (fewer with
``--gpus-per-task``, and never more than there are shards to do), submitted as job-array
elements. Each element loads its model once and leases shards until none is left (see
local.worker_main). Arrays larger than the cluster's MaxArraySize are split into several
arrays whose throttles add up to the requested concurrency, never more.

On SIGUSR2 (sent ``signal_delay_s`` before the time limit, or on preemption) submitit calls
``SlurmWorker.checkpoint``: the worker abandons the chunk in flight and is requeued; the
requeued element takes its shard over and continues after the last committed chunk.

Each submission is recorded in ``RUN/<stage>/submissions/*.json`` (settings, job ids, plan,
the shards asked for and those left to do; never a secret) so that ``resume`` can replay it:
written as soon as the first array is accepted and after each further one, so a later refusal
never leaves a running array untracked. ``resume`` covers only the recorded selections, less
the shards of submissions whose workers are still queued.

A dry run builds the same sbatch scripts without submitit's executor, so it works where there
is no SLURM at all.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from ..errors import UserError
from ..rundir.io import atomic_write_json, read_json
from ..rundir.lease import DEFAULT_HEARTBEAT, DEFAULT_TTL
from .local import Prepared, worker_main

TIME_RE = re.compile(r"^(?:(\d+)-)?(\d{1,3}):(\d{2}):(\d{2})$")


@dataclass
class ExecutorSettings:
    """Where and how workers run. These never shape the output: change them freely."""

    nodes: int = 1
    gpus_per_node: int = 0          # 0: a CPU cluster
    gpus_per_task: int = 1
    workers_per_node: int = 1       # CPU clusters only
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "24:00:00"
    mem: str | None = None
    cpus_per_gpu: int = 8
    cpus_per_task: int | None = None  # CPU clusters (default 1)
    slurm_args: dict = field(default_factory=dict)
    signal_delay_s: int = 120
    lease_ttl: float = DEFAULT_TTL

    def __post_init__(self):
        if self.nodes < 1:
            raise UserError("--nodes must be at least 1")
        if self.gpus_per_node < 0 or self.gpus_per_task < 1:
            raise UserError("--gpus-per-node must be >= 0 and --gpus-per-task >= 1")
        if self.gpus_per_node and self.gpus_per_task > self.gpus_per_node:
            raise UserError("--gpus-per-task cannot exceed --gpus-per-node")
        if not TIME_RE.match(self.time):
            raise UserError(f"--time {self.time!r}: use HH:MM:SS or D-HH:MM:SS")

    @property
    def time_minutes(self) -> int:
        d, h, m, s = TIME_RE.match(self.time).groups()
        return (int(d or 0) * 24 + int(h)) * 60 + int(m) + math.ceil(int(s) / 60)

    def max_workers(self) -> int:
        if self.gpus_per_node:
            return self.nodes * (self.gpus_per_node // self.gpus_per_task)
        return self.nodes * self.workers_per_node

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ExecutorSettings":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def split_arrays(workers: int, max_array_size: int) -> list[int]:
    """Array sizes (each also its throttle) that add up to ``workers``: no array may have more
    elements than MaxArraySize allows (indices 0..MaxArraySize-1)."""
    if workers <= 0:
        return []
    cap = max(1, max_array_size)
    n = math.ceil(workers / cap)
    base, extra = divmod(workers, n)
    return [base + (1 if i < extra else 0) for i in range(n)]


def submitit_parameters(es: ExecutorSettings, job_name: str, size: int) -> dict:
    """Parameters for submitit.SlurmExecutor.update_parameters, for one array of ``size``."""
    p: dict = {"job_name": job_name, "time": es.time_minutes, "nodes": 1,
               "ntasks_per_node": 1, "array_parallelism": size,
               "signal_delay_s": es.signal_delay_s, "stderr_to_stdout": True}
    if es.gpus_per_node:
        p["gres"] = f"gpu:{es.gpus_per_task}"
        p["cpus_per_task"] = es.cpus_per_gpu * es.gpus_per_task
    else:
        p["cpus_per_task"] = es.cpus_per_task or 1
    for key in ("partition", "account", "qos", "mem"):
        if getattr(es, key):
            p[key] = getattr(es, key)
    if es.slurm_args:
        p["additional_parameters"] = dict(es.slurm_args)
    return p


class SlurmWorker:
    """The callable each array element runs (pickled by submitit: plain data, no secrets).
    ``index`` (the map_array argument) is the element's number among all ``workers`` of the
    submission, across split arrays, so workers start at evenly spread shards."""

    def __init__(self, prep: Prepared, lease_ttl: float = DEFAULT_TTL,
                 heartbeat: float = DEFAULT_HEARTBEAT, workers: int | None = None):
        self.prep = prep
        self.lease_ttl = lease_ttl
        self.heartbeat = heartbeat
        self.workers = workers

    def __call__(self, index: int = 0) -> dict:
        import signal

        from .slurm_queue import JobLiveness
        # submitit ignores SIGTERM (it waits for SIGUSR2); SLURM sends SIGTERM on scancel and
        # on preemption: stop at once, giving the shard back (committed chunks stay).
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
        job = os.environ.get("SLURM_ARRAY_JOB_ID")
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        worker_id = f"{job}_{task}" if job and task else os.environ.get("SLURM_JOB_ID", "local")
        return worker_main(self.prep, worker_id, self.lease_ttl, self.heartbeat,
                           job_alive=JobLiveness(ttl=min(30.0, self.lease_ttl / 4)),
                           index=index, workers=getattr(self, "workers", None))

    def checkpoint(self, *args, **kwargs):
        """SIGUSR2 / time limit: give the shard back now (the chunk in flight is abandoned,
        committed chunks stay) and requeue the same worker."""
        import submitit

        from ..rundir.lease import release_all_held
        release_all_held()
        return submitit.helpers.DelayedSubmission(
            SlurmWorker(self.prep, self.lease_ttl, self.heartbeat,
                        getattr(self, "workers", None)), *args, **kwargs)


def _stop_on_sigterm(signum, frame):
    from ..rundir.lease import release_all_held
    release_all_held()
    raise SystemExit(128 + signum)


def _job_name(prep: Prepared, run_id: str) -> str:
    return f"capsfus-{run_id[:8]}-{prep.job.stage}"


def shard_spec(shards: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8" (the --shards syntax, compact in records)."""
    out, run = [], []
    for i in sorted(set(shards)):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def parse_spec(spec: str | None) -> list[int]:
    out = []
    for part in (spec or "").split(","):
        if "-" in part:
            lo, hi = part.split("-")
            out += range(int(lo), int(hi) + 1)
        elif part:
            out.append(int(part))
    return out


def dry_run_sbatch(folder: Path, params: dict, size: int) -> str:
    """The sbatch script submitit would submit for one array, built without submitit's
    executor (which refuses to start where there is no ``srun``): a dry run works anywhere."""
    import shlex
    import sys

    from submitit.slurm.slurm import _make_sbatch_string
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit",
                        shlex.quote(str(folder))])
    params = dict(params)
    if size > 1:
        params["map_count"] = size
    return _make_sbatch_string(command=command, folder=folder, **params)


def submit(prep: Prepared, es: ExecutorSettings, run_id: str, *, dry_run: bool = False,
           max_array_size: int | None = None, selection: list[int] | None = None) -> dict:
    """Submits (or, dry, describes) the workers; returns the submission record.

    ``selection``: the shards the user asked for (``--shards``, or what ``resume`` was asked
    to cover); ``prep.shards`` are those of them left to do. Both are recorded, so ``resume``
    relaunches no more than was asked. The record is written as soon as the first array is
    accepted and rewritten after each one, so an array that runs is never untracked, even
    when sbatch refuses a later one."""
    import submitit

    from .slurm_queue import max_array_size as cluster_max_array
    stage_root = Path(prep.job.run_dir) / prep.job.stage
    workers = min(es.max_workers(), len(prep.shards))
    note = None
    from .slurm_queue import NoCluster
    try:
        # a real submission first checks that a cluster answers (even with --max-array-size)
        cluster_max = cluster_max_array()
    except NoCluster:
        if not dry_run:
            raise
        cluster_max = None
        note = ("no SLURM cluster found here: the plan assumes MaxArraySize "
                f"{max_array_size or 1001} (--max-array-size N for your cluster's); nothing "
                f"was submitted")
    except UserError:
        if not dry_run:
            raise
        cluster_max = None
    if max_array_size is None:
        max_array_size = cluster_max or 1001  # SLURM's default
    sizes = split_arrays(workers, max_array_size)
    spec = getattr(prep.job, "spec", None)  # stages with an engine
    if spec is not None and es.gpus_per_node and es.gpus_per_task > 1 and spec.engine == "vllm":
        prep = replace(prep, job=replace(prep.job, spec=replace(
            spec, tensor_parallel_size=es.gpus_per_task)))
    name = _job_name(prep, run_id)
    folder = stage_root / "slurm" / "%j"
    worker = SlurmWorker(prep, es.lease_ttl, heartbeat=min(DEFAULT_HEARTBEAT, es.lease_ttl / 4),
                         workers=workers)
    selection = list(prep.shards) if selection is None else list(selection)
    record = {
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "stage": prep.job.stage, "settings_hash": prep.settings_hash,
        "executor": es.to_dict(), "job": prep.job.to_dict(),
        "selection": shard_spec(selection), "todo": shard_spec(prep.shards),
        "shards": len(prep.shards), "workers": workers, "max_array_size": max_array_size,
        "arrays": [], "planned_arrays": sizes, "complete": False, "dry_run": dry_run,
        # --retry-rejected, replayed by `resume` (same retry id: the same invocation, so a
        # row already retried by this submission is not retried twice)
        "retry_rejected": {"reasons": sorted(prep.retry_reasons), "retry_id": prep.retry_id}
        if prep.retry_reasons else None,
    }
    if note:
        record["note"] = note
    scripts = []
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    rec_path = stage_root / "submissions" / f"{stamp}.json"
    first = 0
    for size in sizes:
        params = submitit_parameters(es, name, size)
        if dry_run:
            scripts.append(dry_run_sbatch(folder, params, size))
            record["arrays"].append({"size": size, "throttle": size, "job_id": None,
                                     "first_index": first})
            first += size
            continue
        try:
            ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=1000)
        except RuntimeError as e:   # submitit finds no `srun` on PATH
            from .slurm_queue import NO_CLUSTER_HINT, NoCluster
            raise NoCluster(f"no SLURM cluster found ({e}); {NO_CLUSTER_HINT}") from None
        try:
            ex.update_parameters(**params)
            jobs = ex.map_array(worker, range(first, first + size))
        except Exception as e:  # sbatch said no: partition, account, limits…
            reason = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            if record["arrays"]:
                record["refused"] = reason
                atomic_write_json(rec_path, record)
                ids = ", ".join(a["job_id"] for a in record["arrays"])
                raise UserError(
                    f"sbatch refused array {len(record['arrays']) + 1} of {len(sizes)}: "
                    f"{reason}; the {len(record['arrays'])} array(s) already accepted (job "
                    f"{ids}) run and are recorded: `capsfus status`/`cancel` see them, and "
                    f"`capsfus resume {prep.job.run_dir}` adds workers for what they leave"
                ) from None
            raise UserError(f"sbatch refused the submission: {reason} (check --partition/"
                            f"--account/--qos/--time against `sinfo` and your limits)"
                            ) from None
        base = jobs[0].job_id.split("_")[0]
        record["arrays"].append({"size": size, "throttle": size, "job_id": base,
                                 "first_index": first, "elements": [j.job_id for j in jobs]})
        first += size
        atomic_write_json(rec_path, record)   # tracked from the moment it is accepted
    if not dry_run and record["arrays"]:
        record["complete"] = True
        atomic_write_json(rec_path, record)
    record["scripts"] = scripts
    return record


def submissions(stage_root: Path) -> list[dict]:
    folder = Path(stage_root) / "submissions"
    if not folder.exists():
        return []
    return [read_json(p) for p in sorted(folder.glob("*.json"))]


def submitted_job_ids(stage_root: Path) -> list[str]:
    ids = []
    for rec in submissions(stage_root):
        for arr in rec.get("arrays", []):
            ids += arr.get("elements") or ([arr["job_id"]] if arr.get("job_id") else [])
    return ids


def slurm_jobs(stage_root: Path) -> dict | None:
    """{job id: state} from squeue for the stage's recorded submissions; None when the stage
    was never submitted to SLURM, {"error": …} when squeue cannot be asked."""
    from .slurm_queue import squeue
    ids = submitted_job_ids(stage_root)
    if not ids:
        return None
    try:
        live = squeue(ids)
    except UserError as e:
        return {"error": str(e)}
    wanted = set(ids) | {i.split("_")[0] for i in ids}
    partial = [{"time": r.get("time"), "arrays": len(r.get("arrays", [])),
                "planned": len(r.get("planned_arrays", [])), "refused": r["refused"]}
               for r in submissions(stage_root) if r.get("refused")]
    return {"jobs": {j: st for j, st in live.items() if j in wanted or j.split("_")[0] in wanted},
            "submitted": len(ids), **({"partly_refused": partial} if partial else {})}


def recorded_selection(recs: list[dict], n_shards: int) -> list[int]:
    """Every shard some recorded submission asked for (a record without a selection, from
    before selections were recorded, asked for all)."""
    chosen: set[int] = set()
    for rec in recs:
        if "selection" not in rec:
            return list(range(n_shards))
        chosen.update(i for i in parse_spec(rec["selection"]) if 0 <= i < n_shards)
    return sorted(chosen)


# a worker in one of these states has not started pulling shards yet: it will take any
# shard of its submission's list that is still free when it starts
QUEUED = ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING")


def queued_coverage(recs: list[dict], quiet: bool = False) -> set[int]:
    """Shards that workers still queued in SLURM will take: the to-do list of every recorded
    submission with an element still waiting in squeue. ``resume`` leaves them out, so
    repeated resumes do not stack arrays for the same shards."""
    from .slurm_queue import squeue
    ids = [e for rec in recs for a in rec.get("arrays", []) for e in a.get("elements") or []]
    if not ids:
        return set()
    try:
        states = squeue(ids)
    except UserError:
        if quiet:
            return set()
        raise
    covered: set[int] = set()
    for rec in recs:
        if "todo" not in rec:
            continue
        elements = [e for a in rec.get("arrays", []) for e in a.get("elements") or []]
        if any(states.get(e) in QUEUED for e in elements):
            covered.update(parse_spec(rec["todo"]))
    return covered
