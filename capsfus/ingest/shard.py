"""``capsfus shard``: stream sources into a run's ``input`` stage, with every row accounted for.

Three phases, memory bounded by one dedupe partition plus one shard's duplicate list:
1. stream every record; check it (rows.check_record); accepted rows go, in input order, to
   provisional shard files; refused ones to ``input/rejected/`` with their reason; each id is
   spilled to a hash partition (dedupe.IdDeduper);
2. find duplicate ids partition by partition (first occurrence wins);
3. finalise each provisional shard: rows whose id came earlier move to ``rejected/`` as
   ``duplicate_id``; the shard is renamed into ``input/out/`` with its sha256.
The manifest is written last; until it exists the ingest is not done, and a rerun restarts it.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Callable

from .. import SCHEMA_VERSION, __version__
from ..errors import UserError
from ..rundir.io import JsonlZstWriter, iter_jsonl_zst, sha256_file
from ..rundir.manifest import Run
from ..rundir.rows import FLAG_NO_SYNTHETIC, SYNTHETIC, check_record, json_safe, resolve_mapping
from .dedupe import IdDeduper, partitions_for
from .records import BadRecord
from .sources import discover

DEFAULT_ROWS_PER_SHARD = 100_000
REJECTED_ROWS_PER_FILE = 1_000_000


class _RejectedWriter:
    """Rejected rows, rotated into ``input/rejected/00000.jsonl.zst``, ``00001…``."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files: list[dict] = []
        self._w: JsonlZstWriter | None = None

    def write(self, row: dict) -> None:
        if self._w is None or self._w.rows >= REJECTED_ROWS_PER_FILE:
            self._rotate()
        self._w.write(row)

    def _rotate(self) -> None:
        if self._w is not None:
            self.files.append(self._w.commit())
        self._w = JsonlZstWriter(self.folder / f"{len(self.files):05d}.jsonl.zst")

    def close(self) -> list[dict]:
        if self._w is not None:
            self.files.append(self._w.commit())
            self._w = None
        return self.files


def _same_sources(manifest: dict, sources: list, mapping: dict, rows_per_shard: int) -> bool:
    return (manifest.get("sources") == [s.fingerprint() for s in sources]
            and manifest.get("mapping") == mapping
            and manifest.get("rows_per_shard") == rows_per_shard)


def _columns_of_a_nonempty_source(sources: list) -> set[str]:
    """The columns of the first source that has rows; an input with no rows at all is named
    as empty (instead of "columns: none")."""
    for src in sources:
        cols = src.columns()
        if cols:
            return cols
    if all(next(iter(src.records()), None) is None for src in sources):
        what = sources[0].path if len(sources) == 1 else f"all {len(sources)} input files"
        raise UserError(f"{what} {'is' if len(sources) == 1 else 'are'} empty (no rows): "
                        f"nothing to shard; check the path, or that the download finished")
    return set()


def shard(inputs: list[str], out: str | os.PathLike, rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
          raw_col: str | None = None, synthetic_col: str | None = None,
          url_col: str | None = None, id_col: str | None = None, split: str | None = None,
          progress: Callable[[dict], None] | None = None) -> dict:
    """Creates ``out`` as a run (or checks that it already holds exactly these sources).

    Returns the manifest. Raises UserError for anything the user must fix.
    """
    if rows_per_shard < 1:
        raise UserError("--rows-per-shard must be at least 1")
    if not inputs:
        raise UserError("give at least one INPUT (file, folder, glob or Hub dataset id)")
    run = Run(Path(out))
    sources = discover(inputs, split=split)
    columns = sources[0].columns()
    if not columns:
        columns = _columns_of_a_nonempty_source(sources)
    mapping = resolve_mapping(columns, raw_col, synthetic_col, url_col, id_col)
    if id_col and columns and id_col not in columns:
        raise UserError(f"--id-col {id_col!r} is not a column of {sources[0].path} "
                        f"(columns: {', '.join(sorted(columns))})")
    if raw_col and columns and raw_col not in columns:
        raise UserError(f"--raw-col {raw_col!r} is not a column of {sources[0].path} "
                        f"(columns: {', '.join(sorted(columns))})")
    for src in sources[1:]:
        if src.kind in ("parquet", "hf-disk"):  # cheap to check: schema only
            cols = src.columns()
            if mapping.raw not in cols:
                raise UserError(f"{src.path}: missing the raw caption column {mapping.raw!r} "
                                f"(columns: {', '.join(sorted(cols))})")

    if run.exists():
        m = run.manifest()
        if _same_sources(m, sources, mapping.to_dict(), rows_per_shard):
            return m  # already sharded from exactly these sources: nothing to do
        raise UserError(f"{run.root} already holds run {m['run_id'][:8]} made from other sources "
                        f"or settings; choose a new --out, or delete {run.root} to start over")
    if run.root.exists() and any(p.name != "input" for p in run.root.iterdir()):
        raise UserError(f"{run.root} exists and is not an empty folder or a capsfus run; "
                        f"choose a new --out")
    input_dir = run.root / "input"
    if input_dir.exists():  # an ingest interrupted before its manifest: start it over
        shutil.rmtree(input_dir)
    work = input_dir / ".ingest"
    (input_dir / "out").mkdir(parents=True)
    t0 = time.time()

    total_bytes = sum(s.size for s in sources) or (8 << 30)
    deduper = IdDeduper(work / "dedupe", partitions_for(total_bytes), rows_per_shard)
    rejected = _RejectedWriter(input_dir / "rejected")
    counts: Counter = Counter()
    flagged: Counter = Counter()
    provisional: list[dict] = []
    writer: JsonlZstWriter | None = None
    seq = 0
    records = 0
    no_syn = 0  # rows without a synthetic caption in the open provisional shard
    stats = {"records": 0, "accepted": 0, "rejected": 0, "source": "", "sources_done": 0,
             "sources": len(sources)}

    def report(force: bool = False) -> None:
        if progress and (force or records % 5000 == 0):
            stats.update(records=records, accepted=seq, rejected=sum(counts.values()))
            progress(dict(stats))

    try:
        for src_i, src in enumerate(sources):
            stats["source"] = src.name
            for row_number, rec in enumerate(src.records()):
                records += 1
                default_id = f"{src.name}:{row_number}"
                if isinstance(rec, BadRecord):
                    counts[rec.reason] += 1
                    rejected.write({"id": default_id, "reason": rec.reason, "detail": rec.detail,
                                    "source": src.name, "row_number": row_number,
                                    "record_text": rec.text})
                    report()
                    continue
                checked = check_record(rec, mapping, default_id)
                if checked.row is None:
                    counts[checked.reason] += 1
                    rejected.write({"id": checked.id, "reason": checked.reason,
                                    "detail": checked.detail, "source": src.name,
                                    "row_number": row_number, "record": json_safe(rec)})
                    report()
                    continue
                if writer is None or writer.rows >= rows_per_shard:
                    if writer is not None:
                        provisional.append({**writer.commit(), FLAG_NO_SYNTHETIC: no_syn})
                    writer = JsonlZstWriter(work / f"{len(provisional):05d}.jsonl.zst")
                    no_syn = 0
                writer.write(checked.row)
                no_syn += checked.row[SYNTHETIC] is None
                deduper.add(checked.row["id"], seq)
                seq += 1
                report()
            stats["sources_done"] = src_i + 1
            report(force=True)
        if writer is not None:
            provisional.append({**writer.commit(), FLAG_NO_SYNTHETIC: no_syn})
            writer = None

        dup_counts = deduper.find_duplicates()
        shards = []
        for i, prov in enumerate(provisional):
            src_path = work / prov["file"]
            index = len(shards)  # a provisional shard left empty by duplicates is dropped
            dst = input_dir / "out" / f"{index:05d}.jsonl.zst"
            dups = deduper.duplicates_in(i) if dup_counts.get(i) else set()
            no_syn = 0
            if dups:
                base = i * rows_per_shard
                with JsonlZstWriter(dst) as w:
                    for j, row in enumerate(iter_jsonl_zst(src_path)):
                        if base + j in dups:
                            counts["duplicate_id"] += 1
                            rejected.write({"id": row["id"], "reason": "duplicate_id",
                                            "detail": "an earlier row has this id",
                                            "row": row})
                            continue
                        no_syn += row[SYNTHETIC] is None
                        w.write(row)
                    if w.rows == 0:
                        w.abort()  # every row was a duplicate: no empty shard
                src_path.unlink()
                if w.rows == 0:
                    continue
                entry = {"rows": w.rows, "sha256": w.sha256, "bytes": w.nbytes}
            else:
                no_syn = prov[FLAG_NO_SYNTHETIC]
                os.replace(src_path, dst)
                entry = {"rows": prov["rows"], "sha256": prov["sha256"], "bytes": prov["bytes"]}
            flagged[FLAG_NO_SYNTHETIC] += no_syn
            shards.append({"index": index, "file": f"input/out/{index:05d}.jsonl.zst", **entry,
                           FLAG_NO_SYNTHETIC: no_syn})
        rejected_files = rejected.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    shutil.rmtree(work, ignore_errors=True)

    accepted = sum(s["rows"] for s in shards)
    manifest = {
        "format": "capsfus-run",
        "schema_version": SCHEMA_VERSION,
        "run_id": uuid.uuid4().hex,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "capsfus_version": __version__,
        "sources": [s.fingerprint() for s in sources],
        "mapping": mapping.to_dict(),
        "rows_per_shard": rows_per_shard,
        "counts": {"records": records, "accepted": accepted,
                   "rejected": dict(sorted(counts.items())),
                   "flagged": dict(flagged)},
        "rejected_files": [{**f, "file": f"input/rejected/{f['file']}"} for f in rejected_files],
        "shards": shards,
        "ingest_seconds": round(time.time() - t0, 3),
    }
    assert accepted + sum(counts.values()) == records, "ingest lost or duplicated rows"
    run.write_manifest(manifest)
    report(force=True)
    return manifest


def verify_input_shard(run: Run, shard_entry: dict) -> None:
    """Raises CorruptFile when an input shard no longer matches its manifest checksum."""
    from ..rundir.io import CorruptFile
    path = run.root / shard_entry["file"]
    if not path.exists():
        raise CorruptFile(f"{path}: input shard is missing")
    if sha256_file(path) != shard_entry["sha256"]:
        raise CorruptFile(f"{path}: input shard does not match the manifest checksum")
