"""Orchestration overhead on the local single-node SLURM cluster (slurm/cluster.sh): N shards
fused by W workers with the echo engine sleeping a fixed time per row, so the useful work is
known. Reports wall time from `submit` to the last job leaving squeue against the sum of the
per-shard task time (from the state files), as a ratio.

Needs root and `bash slurm/cluster.sh install`. Starts its own cluster in
/tmp/capsfus-slurm-bench and stops it at the end.

    python bench/slurm_overhead.py [--shards 200] [--rows-per-shard 10] [--workers 8]
        [--sleep 0.02] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=200)
    ap.add_argument("--rows-per-shard", type=int, default=10)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--sleep", type=float, default=0.02, help="echo seconds per row")
    ap.add_argument("--out")
    a = ap.parse_args()
    folder = "/tmp/capsfus-slurm-bench"
    env = {**os.environ, "CAPSFUS_SLURM_DIR": folder, "CAPSFUS_SLURM_CPUS": str(a.workers),
           "SLURM_CONF": f"{folder}/slurm.conf", "CAPSFUS_ECHO_SLEEP": str(a.sleep)}
    subprocess.run(["bash", str(REPO / "slurm" / "cluster.sh"), "start"], env=env, check=True,
                   capture_output=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "rows.jsonl"
            with open(data, "w") as f:
                for i in range(a.shards * a.rows_per_shard):
                    f.write(json.dumps({"TEXT": f"alt {i}", "top_caption": f"a thing {i}.",
                                        "URL": "u"}) + "\n")
            run = Path(tmp) / "run"
            cli = [sys.executable, "-m", "capsfus.cli"]
            subprocess.run([*cli, "shard", data, "--out", run, "--rows-per-shard",
                            str(a.rows_per_shard)], check=True, env=env, capture_output=True)
            t0 = time.perf_counter()
            subprocess.run([*cli, "submit", "fuse", run, "--engine", "echo", "--nodes", "1",
                            "--gpus-per-node", "0", "--workers-per-node", str(a.workers),
                            "--time", "01:00:00"], check=True, env=env, capture_output=True)
            from capsfus.executors.slurm import submitted_job_ids
            bases = sorted({j.split("_")[0] for j in submitted_job_ids(run / "fuse")})
            while subprocess.run(["squeue", "-h", "-j", ",".join(bases)], env=env,
                                 capture_output=True, text=True).stdout.strip():
                time.sleep(0.1)
            wall = time.perf_counter() - t0
            states = [json.loads(p.read_text()) for p in (run / "fuse" / "state").glob("*.json")]
            assert len(states) == a.shards and all(s["status"] == "done" for s in states)
            task = sum(s["timings"]["wall_s"] for s in states)
            gen = sum(s["timings"]["gen_s"] for s in states)
            workers = [json.loads(p.read_text()) for p in (run / "fuse" / "logs").glob(
                "worker-*.json")]
            nominal = a.shards * a.rows_per_shard * a.sleep
    finally:
        subprocess.run(["bash", str(REPO / "slurm" / "cluster.sh"), "stop"], env=env,
                       capture_output=True)
    res = {"shards": a.shards, "rows_per_shard": a.rows_per_shard, "workers": len(workers),
           "echo_sleep_per_row_s": a.sleep, "nominal_work_s": round(nominal, 2),
           "sum_task_wall_s": round(task, 2), "sum_generate_s": round(gen, 2),
           "wall_s": round(wall, 2), "ideal_wall_s": round(task / max(1, len(workers)), 2),
           "efficiency": round(task / (wall * max(1, len(workers))), 3),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(res, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
