"""Shard ingest and I/O throughput, and the memory the ingest needs as its input grows.

Inputs are made from the 10,000 real rows of ``capsfusion_example_10k.json`` (tests/data/),
repeated with a unique ``uid`` and ``image_url`` per row, in the CapsFusion-120M layout
(``image_url, laion_2b, laion_coco, capsfusion``), as parquet (snappy, no dictionary encoding,
row groups of 100k rows) and as ``.jsonl.zst``. Each is ingested with ``--id-col uid`` so the
duplicate-id detection runs at full size. Every measurement runs in a fresh child process,
whose peak RSS (``ru_maxrss`` and ``VmHWM``) is the figure reported: the point is that it
stays roughly flat while the input grows 16x.

Also measured: reading the written shards back (``capsfus.rundir.io.iter_jsonl_zst``) and a plain
``JsonlZstWriter`` write + read round trip.

    python bench/shard_io.py --out bench/shard_io.json                 # about 3-4 minutes
    python bench/shard_io.py --sizes 20000,80000 --formats parquet --out /tmp/quick.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHUNK = 100_000


# --- measurements, each in its own child process ---------------------------------------------
def _mem() -> dict:
    """Peak and current RSS of this process. VmHWM is the figure to use: Linux carries
    ``ru_maxrss`` across fork + exec, so a child's ru_maxrss starts at its parent's size."""
    status = Path("/proc/self/status").read_text()
    vals = {line.split(":")[0]: int(line.split()[1]) for line in status.splitlines()
            if line.startswith(("VmHWM", "VmRSS"))}
    return {"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "vmhwm_mb": vals.get("VmHWM", 0) / 1024, "vmrss_mb": vals.get("VmRSS", 0) / 1024}


def child_ingest(inp: str, run: str, rows_per_shard: int) -> dict:
    import pyarrow.parquet  # noqa: F401  (imported by the ingest anyway: not row memory)
    import zstandard  # noqa: F401

    from capsfus.ingest.shard import shard
    base = _mem()  # interpreter + capsfus + pyarrow + zstandard, before any row
    t0 = time.perf_counter()
    m = shard([inp], run, rows_per_shard=rows_per_shard, id_col="uid")
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "baseline_rss_mb": base["vmrss_mb"], **_mem(),
            "records": m["counts"]["records"], "accepted": m["counts"]["accepted"],
            "rejected": m["counts"]["rejected"], "shards": len(m["shards"]),
            "shard_bytes": sum(s["bytes"] for s in m["shards"])}


def child_read(run: str) -> dict:
    from capsfus.rundir.io import iter_jsonl_zst
    m = json.loads((Path(run) / "manifest.json").read_text())
    t0 = time.perf_counter()
    rows = 0
    for s in m["shards"]:
        for _ in iter_jsonl_zst(Path(run) / s["file"]):
            rows += 1
    wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    for s in m["shards"]:  # the checked path a stage uses: sha256 first, then the rows
        for _ in iter_jsonl_zst(Path(run) / s["file"], expect_sha256=s["sha256"]):
            pass
    wall_checked = time.perf_counter() - t0
    return {"rows": rows, "wall_s": wall, "wall_checked_s": wall_checked,
            "shard_bytes": sum(s["bytes"] for s in m["shards"]), **_mem()}


def child_writer(rows: int, folder: str) -> dict:
    from capsfus.rundir.io import JsonlZstWriter, dumps, iter_jsonl_zst
    from capsfus.ingest.example_data import example_rows
    sample = example_rows()
    made = [{"id": f"{i:09d}", "raw": r["laion_2b"], "synthetic": r["laion_coco"],
             "url": f"https://img.example.invalid/{i:09d}.jpg",
             "capsfusion": r["capsfuion_official"]} for i, r in enumerate(sample)]
    text_bytes = sum(len(dumps(r).encode()) + 1 for r in made) * rows / len(made)
    path = Path(folder) / "writer.jsonl.zst"
    t0 = time.perf_counter()
    with JsonlZstWriter(path) as w:
        for i in range(rows):
            w.write(made[i % len(made)])
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = sum(1 for _ in iter_jsonl_zst(path))
    read_s = time.perf_counter() - t0
    assert n == rows
    return {"rows": rows, "write_s": write_s, "read_s": read_s, "json_bytes": text_bytes,
            "file_bytes": path.stat().st_size, **_mem()}


def run_child(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- inputs ----------------------------------------------------------------------------------
def _columns(sample: list[dict], start: int, stop: int) -> dict[str, list]:
    n = len(sample)
    rows = [sample[i % n] for i in range(start, stop)]
    return {"image_url": [f"https://img.example.invalid/{i:09d}.jpg" for i in range(start, stop)],
            "laion_2b": [r["laion_2b"] for r in rows],
            "laion_coco": [r["laion_coco"] for r in rows],
            "capsfusion": [r["capsfuion_official"] for r in rows],
            "uid": [f"{i:09d}" for i in range(start, stop)]}


def make_input(sample: list[dict], fmt: str, rows: int, folder: Path) -> Path:
    path = folder / f"input-{rows}.{fmt}"
    if path.exists():
        return path
    tmp = path.with_name(path.name + ".part")
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        writer = None
        for start in range(0, rows, CHUNK):
            table = pa.table(_columns(sample, start, min(rows, start + CHUNK)))
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema, use_dictionary=False)
            writer.write_table(table, row_group_size=CHUNK)
        writer.close()
    elif fmt == "jsonl.zst":
        import zstandard
        with open(tmp, "wb") as f, zstandard.ZstdCompressor(level=3).stream_writer(f) as z:
            for start in range(0, rows, CHUNK):
                cols = _columns(sample, start, min(rows, start + CHUNK))
                keys = list(cols)
                z.write("".join(json.dumps(dict(zip(keys, vals)), ensure_ascii=False) + "\n"
                                for vals in zip(*cols.values())).encode("utf-8"))
    else:
        raise SystemExit(f"unknown format {fmt}")
    os.replace(tmp, path)
    return path


# --- main ------------------------------------------------------------------------------------
def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100000,400000,1600000")
    ap.add_argument("--formats", default="parquet,jsonl.zst")
    ap.add_argument("--rows-per-shard", type=int, default=100_000)
    ap.add_argument("--writer-rows", type=int, default=400_000)
    ap.add_argument("--workdir", help="where inputs and runs go (default: a temp folder, "
                                      "removed at the end)")
    ap.add_argument("--out", default="shard_io.json", help="JSON results file")
    args = ap.parse_args()
    from capsfus.ingest.example_data import example_rows   # the rows in tests/data/
    sample = example_rows()
    sizes = [int(s) for s in args.sizes.split(",")]
    formats = args.formats.split(",")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="capsfus-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    results = []
    try:
        for fmt in formats:
            for n in sizes:
                t0 = time.time()
                inp = make_input(sample, fmt, n, work)
                make_s = time.time() - t0
                run = work / f"run-{fmt}-{n}"
                shutil.rmtree(run, ignore_errors=True)
                ing = run_child("ingest", str(inp), str(run), str(args.rows_per_shard))
                assert ing["records"] == n and ing["accepted"] == n, ing
                rd = run_child("read", str(run))
                size = inp.stat().st_size
                r = {"format": fmt, "rows": n, "input_bytes": size, "make_input_s": make_s,
                     "ingest": ing, "read": rd,
                     "ingest_rows_per_s": n / ing["wall_s"],
                     "ingest_mb_per_s": size / 1e6 / ing["wall_s"],
                     "read_rows_per_s": rd["rows"] / rd["wall_s"],
                     "read_mb_per_s": rd["shard_bytes"] / 1e6 / rd["wall_s"],
                     "read_checked_rows_per_s": rd["rows"] / rd["wall_checked_s"]}
                results.append(r)
                print(f"{fmt:9s} {n:>9,} rows: ingest {r['ingest_rows_per_s']:,.0f} rows/s, "
                      f"peak RSS {ing['vmhwm_mb']:.0f} MB; read {r['read_rows_per_s']:,.0f} "
                      f"rows/s", file=sys.stderr, flush=True)
                shutil.rmtree(run, ignore_errors=True)
        wr = run_child("writer", str(args.writer_rows), str(work))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    doc = {"benchmark": "shard_io", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(
        timespec="seconds"), "cpu": cpu_model(), "cores": os.cpu_count(),
        "python": platform.python_version(), "rows_per_shard": args.rows_per_shard,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "total_s": time.time() - t_all, "results": results, "writer": wr}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(markdown(doc))


def markdown(doc: dict) -> str:
    lines = ["| input | rows | input MB | ingest rows/s | ingest MB/s | peak RSS MB "
             "(baseline) | shards | read rows/s | read MB/s (zst) | read rows/s, sha256 "
             "checked |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in doc["results"]:
        ing = r["ingest"]
        lines.append(
            f"| {r['format']} | {r['rows']:,} | {r['input_bytes'] / 1e6:.0f} | "
            f"{r['ingest_rows_per_s']:,.0f} | {r['ingest_mb_per_s']:.1f} | "
            f"{ing['vmhwm_mb']:.0f} ({ing['baseline_rss_mb']:.0f}) | {ing['shards']} | "
            f"{r['read_rows_per_s']:,.0f} | {r['read_mb_per_s']:.1f} | "
            f"{r['read_checked_rows_per_s']:,.0f} |")
    w = doc["writer"]
    lines += ["", "| JsonlZstWriter | rows | write rows/s | write MB/s (JSON) | read rows/s | "
                  "read MB/s (JSON) | compression | peak RSS MB |",
              "|---|---:|---:|---:|---:|---:|---:|---:|",
              f"| write + iter_jsonl_zst | {w['rows']:,} | {w['rows'] / w['write_s']:,.0f} | "
              f"{w['json_bytes'] / 1e6 / w['write_s']:.1f} | {w['rows'] / w['read_s']:,.0f} | "
              f"{w['json_bytes'] / 1e6 / w['read_s']:.1f} | "
              f"{w['json_bytes'] / w['file_bytes']:.1f}x | {w['vmhwm_mb']:.0f} |"]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "ingest":
            out = child_ingest(rest[0], rest[1], int(rest[2]))
        elif kind == "read":
            out = child_read(rest[0])
        else:
            out = child_writer(int(rest[0]), rest[1])
        print(json.dumps(out))
    else:
        main()
