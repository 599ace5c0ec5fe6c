"""``capsfus export``: a run's captions as a Hugging Face dataset folder.

```
OUT/README.md                          dataset card (hub/dataset_card.md), YAML header parsed by the Hub
OUT/data/train-00000-of-000NN.parquet  zstd, files <= max_shard_bytes, row groups ~row_group_bytes
OUT/capsfus-export.json                what was exported, from what, and every count
OUT/stats/…                            Table-3 statistics of the exported captions, plots
```

Which rows: the run's last caption stage, ``filter`` when it exists (its kept rows, and the rows
it dropped with their reasons), else ``fuse``, else ``input``. Rows a stage refused (``fuse``'s
``no_synthetic``, ``generation_error``…) are read too, so every input row is accounted for: it
is exported, or counted under the reason it is not (``filter:<rule>``, ``fuse:<reason>``,
``caption:<reason>`` (a missing or broken image: never exported, whatever the mix),
``excluded_id``, ``excluded_url``, ``punsafe``, ``pwatermark``, ``no_caption``). The counts must
add up to the rows the run accepted at ingest, or the export fails.

The ``caption`` column (issue 8): ``--caption SOURCE`` (default ``fused``) or a mix such as
``fused=0.6,raw=0.4``. A row's source is drawn from a hash of (seed, id), so the same seed gives
the same dataset whatever the order of the shards; when the drawn source is missing for that row
(empty, or the fused caption dropped by the filter) the next source in the fallback order is
used and the fallback counted. Without a mix, a row with no fused caption is not exported.
All source columns stay in the parquet, so users can re-mix downstream; in a mix the ``fused``
column holds only captions the filter kept (``filter_reasons`` says why one is null).

Source columns are passed through with one type per column for the whole export, taken from
every row (ints and floats together become floats, mixed or nested values JSON text); a source
column named like one of ours (``caption``…) is kept as ``source_<name>``.

The whole folder is written beside OUT and renamed into place at the end: an interrupted export
leaves no half dataset behind (the next export removes what it left). ``--overwrite`` replaces
only a folder that ``capsfus export`` wrote.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..rundir.faults import crashpoint
from ..rundir.manifest import Run
from ..rundir.rows import FUSED, ID, RAW, SYNTHETIC, URL
from .export_rows import RowReader, stage_of
from .mix import SOURCES, Mixer
from .parquet import ParquetShards, arrow_type_of, name_parts, observe_types

EXPORT_VERSION = 1
SUMMARY_FILE = "capsfus-export.json"
MB = 1_000_000
# The Hub's advice for parquet datasets: files of at most ~500 MB, row groups of ~100 MB
# (small enough for the dataset viewer to read one group at a time).
DEFAULT_MAX_SHARD_BYTES = 500 * MB
DEFAULT_ROW_GROUP_BYTES = 100 * MB

# Keys the stages add to a row; everything else beside id/raw/synthetic/url/fused is a source
# column passed through from ingest (LAION's punsafe, pwatermark, similarity, …).
STAGE_KEYS = {
    "fused_hit_max_tokens", "raw_truncated",                          # fuse
    "filter_reasons", "filter_stripped", "fused_raw",                 # filter
    "reason", "reasons", "details", "detail",                         # any rejected row
}

# The published CapsFusion-120M column names (DESIGN.md "Rows").
SCHEMAS = {
    "capsfus": {},
    "capsfusion120m": {URL: "image_url", RAW: "laion_2b", SYNTHETIC: "laion_coco",
                       FUSED: "capsfusion"},
}


@dataclass
class ExportOptions:
    schema: str = "capsfus"
    stage: str | None = None            # None: filter, else fuse, else input
    mix: dict[str, float] | None = None  # None: the fused caption only, no fallback
    mix_name: str | None = None
    fallback: list[str] | None = None   # None: the mix's other sources by weight, then the rest
    seed: int = 0
    max_punsafe: float | None = None
    max_pwatermark: float | None = None
    exclude: str | None = None          # file of ids or URLs, one per line
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES
    overwrite: bool = False
    license: str | None = None
    pretty_name: str | None = None
    language: list[str] = field(default_factory=lambda: ["en"])
    repo_id: str | None = None          # only for the card's loading snippet
    stats: bool = True
    workers: int = 1                    # processes, each exporting a contiguous run of shards
    allow_partial: bool = False         # export finished shards only; the rest are counted


# --------------------------------------------------------------------------- export
def _load_exclusions(path: str | None) -> tuple[set[str], set[str]]:
    if not path:
        return set(), set()
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UserError(f"--exclude {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise UserError(f"--exclude {path}: not UTF-8 text (one id or URL per line)") from None
    ids, urls = set(), set()
    for line in lines:
        v = line.strip()
        if not v or v.startswith("#"):
            continue
        (urls if "://" in v else ids).add(v)
    return ids, urls


def _sample_columns(reader: RowReader, skip: set, limit: int = 10_000) -> dict[str, set]:
    """Passthrough columns and their kinds in the first rows: the schema's first guess; the
    workers check it against every row."""
    columns: dict[str, set] = {}
    first = next((i for i in range(reader.n_shards) if i not in reader.unfinished), None)
    for n, sr in enumerate(reader.shard_rows(first) if first is not None else []):
        observe_types(columns, sr.row, skip)
        if n >= limit:
            break
    return columns


def _threshold(row: dict, key: str, limit: float | None) -> bool:
    """True when the row is over ``limit`` for ``key`` (a missing value is not over)."""
    if limit is None:
        return False
    v = row.get(key)
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > limit


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike,
               options: ExportOptions | None = None,
               progress: Callable[[int, int], None] | None = None) -> dict:
    """Writes the HF dataset folder ``out_dir`` from the run; returns the summary (also
    written to ``OUT/capsfus-export.json``)."""
    import pyarrow as pa

    from .. import __version__
    from ..rundir.io import atomic_write_json
    opts = options or ExportOptions()
    if opts.schema not in SCHEMAS:
        raise UserError(f"--schema {opts.schema!r}: one of {', '.join(SCHEMAS)}")
    if opts.max_shard_bytes < 1 or opts.row_group_bytes < 1:
        raise UserError("--max-shard-mb and --row-group-mb must be positive")
    t0 = time.time()
    run = Run(Path(run_dir))
    manifest = run.manifest()
    stage = stage_of(run, opts.stage)
    reader = RowReader(run, stage, allow_partial=opts.allow_partial)
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a folder")
    if out == run.root.resolve() or out in run.root.resolve().parents:
        raise UserError(f"--out {out} holds the run {run.root}: choose a folder outside it")
    if out.exists() and any(out.iterdir()):
        if not opts.overwrite:
            raise UserError(f"{out} exists and is not empty: choose another --out or pass "
                            f"--overwrite")
        if not is_export_folder(out):
            raise UserError(f"--overwrite replaces only a folder `capsfus export` wrote, and {out} "
                            f"has no {SUMMARY_FILE}: choose another --out")
    mixing = opts.mix is not None
    if not mixing and not reader.has_fused_stage and reader.fused_key is None:
        raise UserError(f"{run.root} has no fused captions (no fuse or filter stage): run "
                        f"`capsfus fuse` first, or export another caption with --caption raw "
                        f"or --mix")
    mix = opts.mix if mixing else {FUSED: 1.0}
    mixer = Mixer(mix, opts.seed, opts.fallback)
    for name in list(mix) + (opts.fallback or []):
        if name not in SOURCES and not name.isidentifier():
            raise UserError(f"caption source {name!r}: use fused, raw, synthetic or a column "
                            f"name")
    ex_ids, ex_urls = _load_exclusions(opts.exclude)
    names = SCHEMAS[opts.schema]
    fk = reader.fused_key
    skip = {ID, RAW, SYNTHETIC, URL, FUSED, fk} | STAGE_KEYS
    core = [ID, URL, RAW, SYNTHETIC, FUSED] if opts.schema == "capsfus" else \
        [URL, RAW, SYNTHETIC, FUSED, ID]
    fields = [pa.field(names.get(c, c), pa.string()) for c in core]
    fields += [pa.field("caption", pa.string()), pa.field("caption_source", pa.string())]
    if mixing and reader.has_fused_stage:
        fields.append(pa.field("filter_reasons", pa.list_(pa.string())))
    own = {f.name for f in fields}

    def schema_for(columns: dict[str, set]):
        # a source column named like one of ours (`caption`…) is kept as `source_<name>`
        return pa.schema(fields + [pa.field(f"source_{c}" if c in own else c, arrow_type_of(k))
                                   for c, k in columns.items()])

    _remove_dead_partials(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "data").mkdir(parents=True)
    total = sum(s["rows"] for s in manifest["shards"])
    stats_cols = {"raw": names.get(RAW, RAW), "synthetic": names.get(SYNTHETIC, SYNTHETIC),
                  "fused": names.get(FUSED, FUSED), "caption": "caption"}
    # passthrough types are guessed from the first rows; the workers see every row, and when
    # a later row brings a new column or a value the guess cannot hold, the export is redone
    # once with the schema of every row, so all files share one schema that loses nothing
    columns = _sample_columns(reader, skip)
    for attempt in (1, 2):
        schema = schema_for(columns)
        passthrough = dict(zip(columns, schema.names[len(fields):]))   # row key -> column
        plan = _Plan(run_dir=str(run.root), stage=stage, folder=str(tmp), schema=schema,
                     names=names, passthrough=passthrough, skip=skip, fused_key=fk,
                     mixing=mixing, with_reasons=mixing and reader.has_fused_stage, mix=mix,
                     seed=opts.seed, fallback=opts.fallback, ex_ids=ex_ids, ex_urls=ex_urls,
                     max_punsafe=opts.max_punsafe, max_pwatermark=opts.max_pwatermark,
                     max_shard_bytes=opts.max_shard_bytes, row_group_bytes=opts.row_group_bytes,
                     stats_columns=stats_cols if opts.stats else None,
                     unfinished=reader.unfinished)
        results = _run_groups(plan, reader.n_shards, opts.workers, total, progress)
        for r in results:
            for c, kinds in r["columns"].items():
                columns.setdefault(c, set()).update(kinds)
        if schema_for(columns) == schema:
            break
        if attempt == 2:
            raise RuntimeError("the passthrough columns changed between two reads of the run")
        for sub in ("data", "stats-cache"):
            shutil.rmtree(tmp / sub, ignore_errors=True)
        (tmp / "data").mkdir()
    unknown = [n for n in dict.fromkeys([*mix, *(opts.fallback or [])])
               if n not in SOURCES and n not in columns]
    if unknown:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"caption source {unknown[0]!r}: no row has such a column (columns: "
                        f"{', '.join([*SOURCES, *columns])}); nothing was exported")
    excluded: Counter = Counter()
    seen = exported = 0
    coerced: Counter = Counter()
    for r in results:
        seen += r["seen"]
        exported += r["exported"]
        excluded.update(r["excluded"])
        coerced.update(r["coerced"])
        mixer.drawn.update(r["drawn"])
        mixer.used.update(r["used"])
        mixer.fallbacks.update(r["fallbacks"])
    parts = [p for r in results for p in r["parts"]]
    if seen != total or exported + sum(excluded.values()) != seen:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"the run's stages hold {seen:,} rows but its shards list "
                        f"{total:,}: the run is inconsistent (check `capsfus status "
                        f"{run.root}`); nothing was exported")
    if sum(p["rows"] for p in parts) != exported:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError("parquet row count does not match the rows exported")
    if not parts:       # no row at all: one empty file keeps the layout loadable
        empty = ParquetShards(tmp / "data", schema, 1, 1, prefix="empty-")
        empty._open()
        empty.writer.write_table(empty._table([]))
        empty._close()
        parts = empty.parts
    files = name_parts(parts)
    accepted = manifest.get("counts", {}).get("accepted", total)
    realised = {k: v / exported for k, v in sorted(mixer.used.items())} if exported else {}
    summary = {
        "format": "capsfus-export", "version": EXPORT_VERSION, "capsfus_version": __version__,
        "run_id": manifest["run_id"], "run_dir": str(run.root), "stage": stage,
        "stages": reader.describe(), "schema": opts.schema,
        "columns": [f.name for f in schema], "passthrough_columns": list(passthrough.values()),
        "caption": {"mix": mix, "mix_name": opts.mix_name, "seed": opts.seed,
                    "fallback_order": mixer.order, "drawn": dict(mixer.drawn),
                    "used": dict(mixer.used), "realised_shares": realised,
                    "fallbacks": dict(mixer.fallbacks)},
        "rows": {"ingested_records": manifest.get("counts", {}).get("records"),
                 "rejected_at_ingest": manifest.get("counts", {}).get("rejected", {}),
                 "accepted": accepted, "read": seen, "exported": exported,
                 "excluded": dict(sorted(excluded.items()))},
        "safety": {"max_punsafe": opts.max_punsafe, "max_pwatermark": opts.max_pwatermark,
                   "exclusion_list": {"ids": len(ex_ids), "urls": len(ex_urls)}
                   if opts.exclude else None},
        "partial": _partial_summary(reader, manifest) if opts.allow_partial else None,
        "coerced_values": dict(coerced), "workers": opts.workers,
        "files": files, "bytes": sum(f["bytes"] for f in files),
        "max_shard_bytes": opts.max_shard_bytes, "row_group_bytes": opts.row_group_bytes,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if opts.stats and exported:
        from ..quality.stats import merge_fields
        st = [x for r in results for x in r["stats"]]
        summary["stats"] = {"rows": exported, "files": len(files), "mode": "exact",
                            "fields": merge_fields(st, {f: c for f, c in stats_cols.items()
                                                        if c in schema.names},
                                                   tmp / "stats-cache", approx=False)}
        shutil.rmtree(tmp / "stats-cache", ignore_errors=True)
    from .dataset_card import render_dataset_card
    card = render_dataset_card(run, summary, opts, tmp)
    (tmp / "README.md").write_text(card, encoding="utf-8")
    summary["seconds"] = round(time.time() - t0, 3)
    atomic_write_json(tmp / SUMMARY_FILE, summary)
    crashpoint("export_before_swap")
    _swap_into_place(tmp, out)
    return summary


@dataclass
class _Plan:
    """What every export worker needs: plain, picklable."""
    run_dir: str
    stage: str
    folder: str
    schema: object
    names: dict
    passthrough: dict
    skip: set
    fused_key: str | None
    mixing: bool
    with_reasons: bool
    mix: dict
    seed: int
    fallback: list | None
    ex_ids: set
    ex_urls: set
    max_punsafe: float | None
    max_pwatermark: float | None
    max_shard_bytes: int
    row_group_bytes: int
    stats_columns: dict | None
    unfinished: dict = field(default_factory=dict)   # shard -> stage that has not finished it


def _partial_summary(reader: RowReader, manifest: dict) -> dict:
    """What --allow-partial left out: the unfinished shards and their rows."""
    shards = sorted(reader.unfinished)
    return {"unfinished_shards": shards, "shards": reader.n_shards,
            "rows_left_out": sum(manifest["shards"][i]["rows"] for i in shards),
            "stages": sorted(set(reader.unfinished.values()))}


def _run_groups(plan: _Plan, n_shards: int, workers: int, total: int,
                progress: Callable[[int, int], None] | None) -> list[dict]:
    """Exports the run's shards in contiguous groups: in this process when ``workers`` is 1
    (one group, so files are as full as they can be), else in a process pool with about four
    groups per worker (each group's last file is a partial one)."""
    if workers <= 1 or n_shards <= 1:
        done = [0]

        def tick(rows: int) -> None:
            done[0] += rows
            if progress:
                progress(done[0], total)
        return [_export_group(plan, 0, list(range(n_shards)), tick)]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed
    k = min(n_shards, workers * 4)
    bounds = [round(i * n_shards / k) for i in range(k + 1)]
    groups = [list(range(bounds[i], bounds[i + 1])) for i in range(k)]
    results: dict[int, dict] = {}
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
        futs = {ex.submit(_export_group, plan, i, g, None): i for i, g in enumerate(groups)}
        seen = 0
        for f in as_completed(futs):
            results[futs[f]] = f.result()
            seen += results[futs[f]]["seen"]
            if progress:
                progress(seen, total)
    return [results[i] for i in range(k)]


def _export_group(plan: _Plan, index: int, shards: list[int],
                  tick: Callable[[int], None] | None) -> dict:
    """Exports ``shards`` into parts ``g<index>-part-*.parquet.tmp``; returns its counts and,
    when asked, the Table-3 stats of each part."""
    from ..quality.stats import shard_stats
    run = Run(Path(plan.run_dir))
    reader = RowReader(run, plan.stage, allow_partial=bool(plan.unfinished))
    names, fk, mixing = plan.names, plan.fused_key, plan.mixing
    mixer = Mixer(plan.mix, plan.seed, plan.fallback)
    writer = ParquetShards(Path(plan.folder) / "data", plan.schema, plan.max_shard_bytes,
                           plan.row_group_bytes, prefix=f"g{index:05d}-")
    excluded: Counter = Counter()
    columns: dict[str, set] = {}
    seen = exported = 0
    for shard in shards:
        before = seen
        if shard in plan.unfinished:        # --allow-partial: counted, not read
            rows = reader.manifest["shards"][shard]["rows"]
            seen += rows
            excluded[f"not_done:{plan.unfinished[shard]}"] += rows
            if tick:
                tick(rows)
            continue
        for sr in reader.shard_rows(shard):
            seen += 1
            row = sr.row
            observe_types(columns, row, plan.skip)
            rid = str(row.get(ID))
            if sr.unusable:
                excluded[sr.why_not] += 1
                continue
            if rid in plan.ex_ids:
                excluded["excluded_id"] += 1
                continue
            if row.get(URL) and row[URL] in plan.ex_urls:
                excluded["excluded_url"] += 1
                continue
            if _threshold(row, "punsafe", plan.max_punsafe):
                excluded["punsafe"] += 1
                continue
            if _threshold(row, "pwatermark", plan.max_pwatermark):
                excluded["pwatermark"] += 1
                continue
            fused_text = row.get(fk) if (fk and sr.fused_ok) else None

            def available(name: str, row=row, fused_text=fused_text) -> str | None:
                v = fused_text if name == FUSED else row.get(name)
                return v if isinstance(v, str) and v.strip() else None

            if mixing:
                picked = mixer.choose(rid, available)
                if picked is None:
                    excluded["no_caption"] += 1
                    continue
            else:
                if fused_text is None:
                    excluded[sr.why_not or "fused_empty"] += 1
                    continue
                mixer.drawn[FUSED] += 1
                mixer.used[FUSED] += 1
                picked = (FUSED, fused_text)
            rec = {names.get(ID, ID): rid, names.get(URL, URL): row.get(URL),
                   names.get(RAW, RAW): row.get(RAW),
                   names.get(SYNTHETIC, SYNTHETIC): row.get(SYNTHETIC),
                   names.get(FUSED, FUSED): fused_text,
                   "caption": picked[1], "caption_source": picked[0]}
            if plan.with_reasons:
                rec["filter_reasons"] = list(row.get("reasons") or row.get("filter_reasons")
                                             or ([sr.why_not] if sr.why_not and
                                                 not sr.why_not.startswith("filter:") else []))
            for c, col in plan.passthrough.items():
                rec[col] = row.get(c)
            writer.add(rec)
            exported += 1
        if tick:
            tick(seen - before)
    parts = writer.finish()
    stats = []
    if plan.stats_columns:
        import pyarrow.parquet as pq
        cols = {f: c for f, c in plan.stats_columns.items() if c in plan.schema.names}
        read = list(dict.fromkeys(cols.values()))
        cache = Path(plan.folder) / "stats-cache"
        for part in parts:
            pf = pq.ParquetFile(part["tmp"])
            rows = (r for b in pf.iter_batches(batch_size=20_000, columns=read)
                    for r in b.to_pylist())
            stats.append(shard_stats(rows, cols, cache / Path(part["tmp"]).name.split(".")[0]))
    return {"seen": seen, "exported": exported, "excluded": dict(excluded),
            "coerced": dict(writer.coerced), "drawn": dict(mixer.drawn),
            "used": dict(mixer.used), "fallbacks": dict(mixer.fallbacks),
            "parts": [{"tmp": str(p["tmp"]), "rows": p["rows"]} for p in parts],
            "stats": stats, "columns": columns}


def _remove_dead_partials(out: Path) -> None:
    """Removes what killed exports to ``out`` left behind (their pid is gone): partial
    folders, and the old export of one killed between the two renames of the swap."""
    for p in [*out.parent.glob(f".{out.name}.partial-*"), *out.parent.glob(f".{out.name}.old-*")]:
        try:
            pid = int(p.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
            if pid != os.getpid():
                continue          # another export of the same folder is running
        except (ValueError, ProcessLookupError):
            pass
        except PermissionError:
            continue
        shutil.rmtree(p, ignore_errors=True)


def _swap_into_place(tmp: Path, out: Path) -> None:
    from ..rundir.io import _fsync_dir
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.replace(old)
        crashpoint("export_mid_swap")
    tmp.replace(out)
    _fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def is_export_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / SUMMARY_FILE).exists()
