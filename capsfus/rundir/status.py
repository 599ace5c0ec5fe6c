"""What is done, running, failed and pending in a stage, from the run directory alone.

Reads one state file per shard and one listing of the leases folder; never opens output files
(checksums are verified by the workers and by ``cat``), so it stays fast at 1,000+ shards.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from .fresh import STALE_WHY, redo_hint, shard_list, stale_map
from .lease import LeaseDir
from .manifest import Run
from .stage import StageDir

SHARD_STATES = ("done", "stale", "running", "failed", "interrupted", "pending")


def shard_status(state: dict | None, lease, leases: LeaseDir, now: float,
                 stale: bool = False) -> str:
    """``stale``: the shard is done but not with today's settings or input (fresh.py); it is
    not done, and shows as ``stale`` until a worker takes it."""
    if state and state.get("status") == "done":
        if not stale:
            return "done"
        return "running" if lease is not None and leases.is_live(lease, now) else "stale"
    if lease is not None and leases.is_live(lease, now):
        return "running"
    if state and state.get("status") == "failed":
        return "failed"
    if state and state.get("rows_done", 0) > 0:
        return "interrupted"  # a worker died or stopped mid-shard: `resume` continues it
    return "pending"


def _tail(path: str | None, shard: int, n: int = 3) -> list[str]:
    """The last lines of a worker log that speak of ``shard`` (a worker log holds many
    shards), else its last lines."""
    if not path:
        return []
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 65536))
            lines = [ln for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return []
    mine = [ln for ln in lines if f"shard {shard} " in ln or f"shard {shard}:" in ln]
    return (mine or lines)[-n:]




def stage_status(run: Run, stage_name: str, job_alive=None, queue=None) -> dict:
    """The stage's shard counts, rows, rates, failures and running shards. ``job_alive`` (job id ->
    bool) and ``queue`` (stage folder -> the scheduler's view, e.g.
    ``executors.slurm.slurm_jobs``) come from the caller: the run directory knows no scheduler."""
    manifest = run.manifest()
    stage = StageDir(run, stage_name)
    if not stage.root.exists():
        return {"stage": stage_name, "exists": False}
    states = stage.all_states()
    leases = LeaseDir(stage.root / "leases", job_alive=job_alive)
    current = leases.scan()
    now = time.time()
    n = len(manifest["shards"])
    counts: Counter = Counter()
    reasons: Counter = Counter()
    rows_total = rows_done = rows_out = rows_rejected = 0
    running_rate = 0.0
    rates = []
    failed, running = [], []
    stale = stale_map(run, stage_name, manifest, states=states)
    for i in range(n):
        st = states.get(i)
        lease = current.get(i)
        s = shard_status(st, lease, leases, now, stale=i in stale)
        counts[s] += 1
        total = (st or {}).get("rows_total", manifest["shards"][i]["rows"])  # e.g. a sample
        rows_total += total
        if st:
            rows_done += total if s == "done" else 0 if s == "stale" else st.get("rows_done", 0)
            rows_out += st.get("rows_out", 0)
            rows_rejected += st.get("rows_rejected", 0)
            reasons.update(st.get("reasons", {}))
            t = st.get("timings") or {}
            if t.get("wall_s") and t.get("rows"):
                rate = t["rows"] / t["wall_s"]
                rates.append(rate)
                if s == "running":
                    running_rate += rate
        if s == "failed":
            failed.append({"shard": i, "error": (st.get("last_error") or {}).get("message"),
                           "attempts": st.get("attempts"), "log": st.get("log"),
                           "log_tail": _tail(st.get("log"), i)})
        if s == "running":
            t = (st or {}).get("timings") or {}
            running.append({"shard": i, "rows_done": st.get("rows_done", 0) if st else 0,
                            "rows": total,
                            "job_id": (lease.data or {}).get("job_id") if lease else None,
                            "worker": (lease.data or {}).get("worker") if lease else None,
                            "rows_per_s": round(t["rows"] / t["wall_s"], 3)
                            if t.get("wall_s") and t.get("rows") else None})
    remaining = rows_total - rows_done
    rate = running_rate or (sum(rates) if rates else 0.0)
    workers = _worker_summaries(stage.root / "logs")
    gen = sum(w.get("gen_s", 0) for w in workers)
    busy = sum(w.get("busy_wall_s", 0) for w in workers)
    config = stage.config() or {}
    return {
        "stage": stage_name, "exists": True, "run_id": manifest["run_id"],
        "settings": config.get("settings"), "input_stage": config.get("input_stage"),
        "shards": n, "counts": {k: counts.get(k, 0) for k in SHARD_STATES},
        "rows": {"total": rows_total, "done": rows_done, "out": rows_out,
                 "rejected": rows_rejected},
        "reasons": dict(reasons),
        "throughput_rows_per_s": round(rate, 3) if rate else None,
        # the caption stage reads one image per row
        **({"throughput_images_per_s": round(rate, 3) if rate else None}
           if stage_name.partition("@")[0] == "caption" else {}),
        "per_shard_rows_per_s": round(sum(rates) / len(rates), 3) if rates else None,
        "eta_s": round(remaining / running_rate) if running_rate and remaining else None,
        "generation_share": round(gen / busy, 4) if busy else None,
        "failed": failed, "running": running,
        "stale": [{"shard": i, "why": w, "detail": STALE_WHY[w]} for i, w in sorted(stale.items())
                  if i < n],
        "stale_hint": (f"{len(stale)} shard(s) stale ({shard_list(stale)}): not done with "
                       f"today's settings or input; redo them with {redo_hint(run, stage_name)}")
        if stale else None,
        "slurm": queue(stage.root) if queue else None,
    }


def _worker_summaries(folder: Path) -> list[dict]:
    out = []
    if folder.exists():
        for p in sorted(folder.glob("worker-*.json")):
            try:
                out.append(json.loads(p.read_text()))
            except ValueError:
                continue
    return out


def format_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d{h:02d}h" if d else f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s")
