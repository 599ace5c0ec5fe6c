"""Export throughput: rows/s of `capsfus export` against reading the same stage rows (the
floor: decompress + JSON parse), in the same run on the same machine.

    python bench/export_throughput.py --rows 100000 [--workers 2] [--keep DIR]

Builds a run of synthetic LAION-like rows fused by the echo engine (output text is not what is
measured: the export's work is reading, choosing, writing parquet and counting trigrams).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_run(folder: Path, rows: int, rows_per_shard: int) -> Path:
    src = folder / "in.jsonl"
    with open(src, "w") as f:
        for i in range(rows):
            f.write(json.dumps({
                "TEXT": f"photo {i} of the Acme Rocket-{i} at Cape Town in 20{i % 90:02d} buy now",
                "top_caption": f"a rocket standing on a launch pad near the sea {i % 977}",
                "URL": f"https://img.example/{i}.jpg", "punsafe": (i % 10) / 10,
                "pwatermark": 0.05, "similarity": 0.3}) + "\n")
    run = folder / "run"
    cli = [sys.executable, "-m", "capsfus.cli"]
    subprocess.run(cli + ["shard", str(src), "--out", str(run), "--rows-per-shard",
                          str(rows_per_shard)], check=True, capture_output=True)
    subprocess.run(cli + ["fuse", str(run), "--engine", "echo", "--workers", "2"], check=True,
                   capture_output=True)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--rows-per-shard", type=int, default=25_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", help="keep the run and exports in this folder")
    args = ap.parse_args()
    from capsfus.hub.export import ExportOptions, export_run
    from capsfus.rundir.manifest import Run
    from capsfus.rundir.stage import StageDir
    folder = Path(args.keep or tempfile.mkdtemp(prefix="capsfus-export-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    run = make_run(folder, args.rows, args.rows_per_shard)
    sd = StageDir(Run(run), "fuse")
    n_shards = len(Run(run).manifest()["shards"])
    res = {}
    t = time.perf_counter()
    n = sum(1 for i in range(n_shards) for _ in sd.iter_rows(i))
    res["read stage rows (baseline)"] = time.perf_counter() - t
    cases = [("export, no stats, 1 process", ExportOptions(stats=False)),
             ("export + exact Table-3 stats, 1 process", ExportOptions()),
             (f"export + exact Table-3 stats, {args.workers} processes",
              ExportOptions(workers=args.workers))]
    for i, (name, opts) in enumerate(cases):
        t = time.perf_counter()
        s = export_run(run, folder / f"exp{i}", opts)
        res[name] = time.perf_counter() - t
        assert s["rows"]["exported"] + sum(s["rows"]["excluded"].values()) == n
    base = res["read stage rows (baseline)"]
    print(f"{n:,} rows, {n_shards} shards; machine: {platform.machine()}, "
          f"{__import__('os').cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| what | seconds | rows/s | time vs reading the rows |")
    print("|---|---:|---:|---:|")
    for name, sec in res.items():
        print(f"| {name} | {sec:.2f} | {n / sec:,.0f} | {sec / base:.2f}x |")
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
