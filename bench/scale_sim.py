"""Orchestration at the paper's scale, simulated: a run laid out as 1,280 shards (the shard
count of 127.9M rows at 100k rows per shard), half of them done, a few failed, a few held by
live leases; then the wall time of `submit fuse --dry-run` (16 nodes x 8 GPUs), `status` and
`resume --dry-run`, each as a fresh process, as a user would run them.

The shards hold 10 rows each (the commands never read rows, only the manifest, the state
files and the leases folder, whose sizes do not depend on rows per shard).

    python bench/scale_sim.py [--shards 1280] [--repeat 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def sh(*args, env=None) -> float:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "capsfus.cli", *map(str, args)],
                       capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"capsfus {' '.join(map(str, args))} failed:\n{p.stderr[-2000:]}")
    return dt


def build(folder: Path, shards: int) -> Path:
    data = folder / "rows.jsonl"
    with open(data, "w") as f:
        for i in range(shards * 10):
            f.write(json.dumps({"TEXT": f"alt text {i}", "top_caption": f"a thing {i}.",
                                "URL": f"u{i}"}) + "\n")
    run = folder / "run"
    sh("shard", data, "--out", run, "--rows-per-shard", 10)
    # half the shards done (real fusion with the echo engine)
    sh("fuse", run, "--engine", "echo", "--shards", f"0-{shards // 2 - 1}")
    # fake a SLURM submission record and a few failed / interrupted shards
    from capsfus.engines import EngineSpec
    from capsfus.executors.local import prepare
    from capsfus.executors.slurm import ExecutorSettings, submit
    from capsfus.rundir.manifest import Run
    from capsfus.stages.fuse import FuseJob
    job = FuseJob(run_dir=str(run), stage="fuse", spec=EngineSpec("echo"))
    prep = prepare(job, None)
    rec = submit(prep, ExecutorSettings(nodes=16, gpus_per_node=8), Run(run).manifest()["run_id"],
                 dry_run=True, max_array_size=1001)
    rec.pop("scripts")
    rec["dry_run"] = False
    rec["arrays"] = [{"size": 128, "throttle": 128, "job_id": "999999",
                      "elements": [f"999999_{i}" for i in range(128)]}]
    sub = run / "fuse" / "submissions"
    sub.mkdir(parents=True, exist_ok=True)
    (sub / "00000000-000000.json").write_text(json.dumps(rec))
    for i in range(shards // 2, shards // 2 + 20):
        (run / "fuse" / "state" / f"{i:05d}.json").write_text(json.dumps({
            "shard": i, "stage": "fuse", "status": "failed", "epoch": 1, "settings_hash": "x",
            "rows_total": 10, "rows_done": 5, "rows_out": 5, "rows_rejected": 0, "chunks": [],
            "attempts": 1, "timings": {"gen_s": 1, "wall_s": 2, "rows": 5}, "final": None,
            "last_error": {"message": "RuntimeError: simulated"}, "log": None}))
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=1280)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run = build(Path(tmp), a.shards)
        build_s = time.perf_counter() - t0
        env = dict(os.environ)
        cmds = {
            "submit fuse --dry-run (16x8)": ["submit", "fuse", run, "--engine", "echo",
                                             "--nodes", 16, "--gpus-per-node", 8, "--dry-run",
                                             "--max-array-size", 1001],
            "status": ["status", run],
            "status --json": ["status", run, "--json"],
            "resume --dry-run": ["resume", run, "--dry-run", "--max-array-size", 1001],
            "capsfus --help (interpreter + import floor)": ["--help"],
        }
        results = {}
        for name, args in cmds.items():
            times = [sh(*args, env=env) for _ in range(a.repeat)]
            results[name] = {"median_s": round(statistics.median(times), 3),
                             "max_s": round(max(times), 3)}
    info = {"shards": a.shards, "machine": f"{platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores", "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "build_s": round(build_s, 1), "results": results}
    print(f"| command ({a.shards} shards) | median s | max s |\n|---|---:|---:|")
    for name, r in results.items():
        print(f"| `{name}` | {r['median_s']:.2f} | {r['max_s']:.2f} |")
    if a.out:
        Path(a.out).write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
