"""What one worker's scan for work reads, at 1,280 done shards (issue 13, item 7).

Builds a run directory of N shards whose fuse stage is done (real compacted final files made
by the runner with the echo engine would take minutes at this size; the finals here are
written with the same writer and state layout as compaction does), then measures one scan
over every shard as a worker does it:

- before: ``StageDir.final_is_trusted`` (sha256 of every final file, every scan);
- after:  ``executors.local.final_looks_done`` (one stat per final file; the checksum was
  verified at compaction and is verified by whoever reads the rows).

Bytes read come from ``rchar`` in /proc/self/io (every byte read through read(2), page cache
or not), so the figure is what a shared filesystem would serve.

    OMP_NUM_THREADS=1 python bench/scan_reads.py [--shards 1280] [--rows-per-shard 2000]
        [--workers 128] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path


def rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def _word(i: int, j: int, salt: str) -> str:
    import hashlib
    return hashlib.md5(f"{salt}{i}:{j}".encode()).hexdigest()[:12]


def build(root: Path, shards: int, rows: int) -> tuple:
    """A run whose fuse stage has ``shards`` done shards, each with a final out file."""
    from capsfus.rundir.io import JsonlZstWriter, atomic_write_json
    from capsfus.rundir.manifest import Run
    from capsfus.rundir.stage import StageDir
    root.mkdir(parents=True)
    atomic_write_json(root / "manifest.json", {
        "run_id": "bench-scan", "shards": [{"file": f"input/out/{i:05d}.jsonl.zst",
                                            "rows": rows, "sha256": "-"} for i in range(shards)],
        "counts": {"records": shards * rows, "accepted": shards * rows, "rejected": {},
                   "flagged": {}}})
    run = Run(root)
    stage = StageDir(run, "fuse")
    h = "0123456789abcdef"
    for i in range(shards):
        w = JsonlZstWriter(stage.out_dir(i) / "shard.e000001.jsonl.zst")
        # about the size of a LAION-COCO row fused (URL, three captions), not all repetitive
        w.write_many({"id": f"src:{i * rows + j}",
                      "url": f"https://img.example.org/{_word(i, j, 'u')}/{j}.jpg",
                      "raw": f"{_word(i, j, 'r')} alt text {j} Acme {_word(i, j, 'm')[:6]}",
                      "synthetic": f"a photo of a {_word(i, j, 's')[:5]} on a table",
                      "fused": f"A {_word(i, j, 'f')[:8]} Acme product photographed on a "
                               f"wooden table in {_word(i, j, 'c')[:6]}, model {j}."}
                     for j in range(rows))
        meta = w.commit()
        stage.write_state(i, {"shard": i, "stage": "fuse", "status": "done", "epoch": 1,
                              "settings_hash": h, "rows_total": rows, "rows_done": rows,
                              "rows_out": rows, "rows_rejected": 0, "chunks": [],
                              "final": {"out": meta, "rejected": None},
                              "finished": time.time() + 1})
    return run, stage, h


def scan(stage, h: str, shards: int, check) -> tuple[int, float, int]:
    """One pass over every shard as worker_main does it: read the state, decide if done."""
    t0, r0 = time.perf_counter(), rchar()
    done = 0
    for i in range(shards):
        st = stage.read_state(i)
        if check(st) and not stage.has_leftovers(i, st):
            done += 1
    return rchar() - r0, time.perf_counter() - t0, done


def measure(shards: int, rows: int, tmp: Path) -> dict:
    from capsfus.executors.local import final_looks_done
    _, stage, h = build(tmp / "run", shards, rows)
    output = sum(p.stat().st_size for p in (tmp / "run" / "fuse" / "out").rglob("*.zst"))
    states = sum(p.stat().st_size for p in (tmp / "run" / "fuse" / "state").glob("*.json"))
    before = scan(stage, h, shards, lambda st: stage.final_is_trusted(st, h))
    after = scan(stage, h, shards, lambda st: final_looks_done(stage, st, h))
    assert before[2] == after[2] == shards, (before, after)
    return {"shards": shards, "rows_per_shard": rows, "final_bytes": output,
            "state_bytes": states,
            "before": {"bytes_read": before[0], "seconds": round(before[1], 3)},
            "after": {"bytes_read": after[0], "seconds": round(after[1], 3)},
            "bytes_ratio_before_over_after": round(before[0] / max(1, after[0]), 1),
            "time_ratio_before_over_after": round(before[1] / max(1e-9, after[1]), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=1280)
    ap.add_argument("--rows-per-shard", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=128,
                    help="Workers that each scan at least once at the end (for the total).")
    ap.add_argument("--out", help="Also write the result as JSON here.")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="capsfus-scan-") as tmp:
        r = measure(a.shards, a.rows_per_shard, Path(tmp))
    r["machine"] = f"{platform.node()} {platform.processor() or platform.machine()}"
    r["per_final_scan_by_all_workers"] = {
        "before_bytes": r["before"]["bytes_read"] * a.workers,
        "after_bytes": r["after"]["bytes_read"] * a.workers}
    print(json.dumps(r, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
