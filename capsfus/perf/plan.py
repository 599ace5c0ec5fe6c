"""``capsfus plan``: how long, how many GPU-hours, how many shards and arrays, how many bytes,
for fusion, filter and export, before a 1,500-GPU-day run is started.

Fusion time is rows / (GPUs x captions/s/GPU), rounded up to whole waves of shards (a worker
runs one shard at a time, so the last wave may leave GPUs idle). Worker and array layout are
the SLURM executor's own (``executors.slurm.split_arrays``), so the plan says what ``capsfus
submit fuse`` will submit. Filter and export throughputs, the share the filter keeps and the
bytes per row are measured on real rows: ``--sample FILE`` measures them now (through the
same shard writer, filter rules and a parquet writer); without it the figures below, measured
that way on ``capsfusion_example_10k.json``, are used.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

from ..errors import UserError
from ..executors.slurm import split_arrays

PAPER = {"rows": 127_897_754, "gpus": 128, "days": 12, "kept": 120_724_312}

# Measured by ``measure_sample`` on capsfusion_example_10k.json (tests/data/) (10,000 real rows,
# no URL column), 2026-11-22, AMD EPYC 2 cores: see docs/benchmarks.md. tests/test_plan.py
# re-measures and checks the byte and share figures stay within 10%.
MEASURED = {
    "source": "capsfusion_example_10k.json (10,000 rows, no URLs), 2026-11-22",
    "rows": 10_000,
    "bytes_per_row_input": 57.9,
    "bytes_per_row_fused": 95.0,
    "bytes_per_row_filtered": 94.2,
    "bytes_per_row_parquet": 197.7,
    "keep_share": 0.9749,
    # one process each, `capsfus plan --sample` at 19:08 UTC (load average 4 on 2 cores);
    # speeds vary with the load of the shared machine (filter 1,300-5,800 rows/s, export
    # 3,700-16,800 rows/s in four runs). Export: `export --schema capsfusion120m`, zstd
    # parquet, without stats.
    "filter_rows_per_s": 3300.0,
    "export_rows_per_s": 16800.0,
}


def sample_rows(path: str, limit: int | None = None, fused_col: str | None = None
                ) -> tuple[list[dict], str | None]:
    """The first ``limit`` rows of any file ``capsfus shard`` reads, with the internal names
    (``id, raw, synthetic, ...``), and the column holding a fused caption (None if none)."""
    from ..ingest.shard import shard
    from ..rundir.manifest import Run
    from ..rundir.rows import KNOWN_FUSED_COLUMNS
    from ..rundir.stage import input_rows
    if not Path(path).exists():
        raise UserError(f"{path}: no such file")
    with tempfile.TemporaryDirectory(prefix="capsfus-sample-") as tmp:
        m = shard([path], Path(tmp) / "run", rows_per_shard=10**9)
        run = Run(Path(tmp) / "run")
        rows: list[dict] = []
        for i in range(len(m["shards"])):
            for row in input_rows(run, m, "input", i):
                rows.append(row)
                if limit and len(rows) >= limit:
                    break
            if limit and len(rows) >= limit:
                break
    if not rows:
        raise UserError(f"{path}: no rows")
    if fused_col and fused_col not in rows[0]:
        raise UserError(f"{path}: no column {fused_col!r}")
    col = fused_col or next((c for c in KNOWN_FUSED_COLUMNS if c in rows[0]), None)
    return rows, col


def measure_sample(path: str, fused_col: str | None = None) -> dict:
    """Bytes per row of each stage's compressed output, the filter's keep share and speed, and
    export speed, measured on real rows (any file ``capsfus shard`` reads, with a fused column)
    through the real code: ``shard``, the ``filter`` stage with its default rules, and
    ``export --schema capsfusion120m`` (zstd parquet, what ``push`` uploads). Input and fuse
    outputs are written with the stages' own writer (``JsonlZstWriter``)."""
    from ..executors.local import prepare, run_local
    from ..hub.export import ExportOptions, export_run
    from ..ingest.shard import shard
    from ..rundir.io import JsonlZstWriter
    from ..rundir.manifest import Run
    from ..rundir.rows import KNOWN_FUSED_COLUMNS
    from ..rundir.stage import StageDir, input_rows
    from ..stages.filter import FilterJob
    if not Path(path).exists():
        raise UserError(f"--sample {path}: no such file")
    with tempfile.TemporaryDirectory(prefix="capsfus-plan-") as tmp:
        root = Path(tmp) / "run"
        m = shard([path], root, rows_per_shard=10**9)
        run = Run(root)
        shards = list(range(len(m["shards"])))
        rows = [r for i in shards for r in input_rows(run, m, "input", i)]
        if not rows:
            raise UserError(f"--sample {path}: no rows")
        col = fused_col or next((c for c in KNOWN_FUSED_COLUMNS if c in rows[0]), None)
        if col is None or col not in rows[0]:
            raise UserError(f"--sample {path}: no fused caption column (pass "
                            f"--sample-fused-col)")
        sizes = {}
        for name, items in (
                ("input", ({k: v for k, v in r.items() if k != col} for r in rows)),
                ("fused", ({**{k: v for k, v in r.items() if k != col}, "fused": r[col],
                            "fused_hit_max_tokens": None, "raw_truncated": False}
                           for r in rows))):
            with JsonlZstWriter(Path(tmp) / f"{name}.jsonl.zst") as w:
                w.write_many(items)
            sizes[name] = w.nbytes
        job = FilterJob(run_dir=str(root), stage="filter", fused_col=col)
        t0 = time.perf_counter()
        run_local(prepare(job, shards))
        filter_s = time.perf_counter() - t0
        sd = StageDir(run, "filter")
        kept = sum(1 for i in shards for _ in sd.iter_rows(i))
        filtered = sum(p.stat().st_size for p in (root / "filter" / "out").rglob("*.zst"))
        t0 = time.perf_counter()
        export_run(root, Path(tmp) / "export", ExportOptions(schema="capsfusion120m",
                                                             stats=False))
        export_s = time.perf_counter() - t0
        parquet = sum(p.stat().st_size for p in (Path(tmp) / "export").rglob("*.parquet"))
    n, k = len(rows), max(1, kept)
    return {"source": f"{Path(path).name} ({n:,} rows"
                      + (", no URLs" if not any(r.get("url") for r in rows) else "") + ")",
            "rows": n,
            "bytes_per_row_input": sizes["input"] / n,
            "bytes_per_row_fused": sizes["fused"] / n,
            "bytes_per_row_filtered": filtered / k,
            "bytes_per_row_parquet": parquet / k,
            "keep_share": kept / n,
            "filter_rows_per_s": n / filter_s,
            "export_rows_per_s": kept / export_s}


def throughput_from_bench(path: str, variant: str | None = None) -> tuple[float, str]:
    """(captions/s per GPU, label) from a ``capsfus bench fuse`` JSON result."""
    from ..rundir.io import read_json
    try:
        b = read_json(path)
    except (OSError, ValueError) as e:
        raise UserError(f"--from-bench {path}: cannot read it ({e})") from None
    if b.get("format") != "capsfus-bench-fuse":
        raise UserError(f"--from-bench {path}: not a `capsfus bench fuse` result")
    name = variant or b["recommended"]
    res = b["results"].get(name)
    if res is None:
        raise UserError(f"--from-bench: no variant {name!r} (has: {', '.join(b['results'])})")
    gpus = max(1, b.get("devices") or 1)
    label = (f"{res['label']} on {b['machine'].get('gpu') or 'CPU'}, model {b['model']}"
             + (f" [{b['caveat']}]" if b.get("caveat") else ""))
    return res["captions_per_s"] / gpus, label


def _days(s: float) -> float:
    return s / 86400


def make_plan(rows: int, gpus: int, throughput: float, *, rows_per_shard: int = 100_000,
              gpus_per_node: int = 8, max_array_size: int = 1001, time_limit_h: float = 24.0,
              filter_workers: int | None = None, export_workers: int | None = None,
              measured: dict | None = None, throughput_label: str = "given") -> dict:
    """The plan as a dict (every figure the CLI prints, and the inputs it came from)."""
    if rows < 1 or gpus < 1:
        raise UserError("--rows and --gpus must be at least 1")
    if throughput <= 0:
        raise UserError("the throughput must be > 0 captions/s per GPU")
    for flag, v in (("--rows-per-shard", rows_per_shard), ("--gpus-per-node", gpus_per_node),
                    ("--max-array-size", max_array_size), ("--filter-workers", filter_workers),
                    ("--export-workers", export_workers)):
        if v is not None and v < 1:
            raise UserError(f"{flag} must be at least 1")
    if not time_limit_h > 0:
        raise UserError("--time-limit-h must be > 0")
    m = dict(MEASURED if measured is None else measured)
    shards = math.ceil(rows / rows_per_shard)
    workers = min(gpus, shards)
    arrays = split_arrays(workers, max_array_size)
    shard_s = rows_per_shard / throughput
    ideal_s = rows / (gpus * throughput)
    waves = math.ceil(shards / workers)
    # every wave but the last is full shards; the last holds the remainder
    last_rows = rows - (waves - 1) * workers * rows_per_shard
    wall_s = (waves - 1) * shard_s + min(rows_per_shard, last_rows) / throughput
    fuse = {"throughput_per_gpu": throughput, "throughput_source": throughput_label,
            "gpus": gpus, "nodes": math.ceil(gpus / gpus_per_node), "workers": workers,
            "shards": shards, "rows_per_shard": rows_per_shard,
            "shard_hours": shard_s / 3600, "waves": waves,
            "ideal_wall_days": _days(ideal_s), "wall_days": _days(wall_s),
            "gpu_hours": rows / throughput / 3600,
            "arrays": arrays, "max_array_size": max_array_size,
            "time_limit_h": time_limit_h,
            "jobs_per_worker": math.ceil(wall_s / (time_limit_h * 3600)),
            "output_bytes": rows * m["bytes_per_row_fused"],
            "input_bytes": rows * m["bytes_per_row_input"]}
    if shard_s > time_limit_h * 3600:
        fuse["note"] = (f"a shard takes {shard_s / 3600:.1f} h, over the {time_limit_h:g} h "
                        f"time limit: workers are requeued mid-shard and continue after the "
                        f"last committed chunk")
    kept = round(rows * m["keep_share"])
    fw = filter_workers or gpus
    filt = {"workers": fw, "rows_per_s_per_worker": m["filter_rows_per_s"],
            "wall_hours": rows / (fw * m["filter_rows_per_s"]) / 3600,
            "cpu_hours": rows / m["filter_rows_per_s"] / 3600,
            "keep_share": m["keep_share"], "kept_rows": kept,
            "output_bytes": kept * m["bytes_per_row_filtered"]}
    ew = export_workers or min(gpus, shards)
    export = {"workers": ew, "rows_per_s_per_worker": m["export_rows_per_s"],
              "wall_hours": kept / (ew * m["export_rows_per_s"]) / 3600,
              "parquet_bytes": kept * m["bytes_per_row_parquet"],
              "hub_bytes": kept * m["bytes_per_row_parquet"]}
    return {"format": "capsfus-plan", "rows": rows, "fuse": fuse, "filter": filt,
            "export": export, "measured": m,
            "disk_bytes_total": fuse["input_bytes"] + fuse["output_bytes"]
            + filt["output_bytes"] + export["parquet_bytes"]}


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    return f"{n:.1f} PB"
