"""Input discovery and streaming readers: parquet, JSON lines (plain or .zst), JSON lists,
webdataset tars (img2dataset; images stay in the tar or parquet and rows get a reference:
ingest/images.py) and Hugging Face datasets (a ``save_to_disk`` folder, or a Hub id when online).

Readers stream with bounded memory and never raise on a bad record: they yield a ``BadRecord``
with a reason code instead, so the ingest can reject it with a reason. A file that cannot be
opened at all raises ``UserError`` (one clear line for the user).
"""

from __future__ import annotations

import glob
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import UserError
from .records import BadRecord

PARQUET_EXT = (".parquet",)
JSONL_EXT = (".jsonl", ".ndjson", ".jsonl.zst", ".ndjson.zst", ".jsonl.zstd")
JSON_EXT = (".json",)
TAR_EXT = (".tar",)    # webdataset shards (img2dataset): KEY.jpg|png|webp + KEY.txt + KEY.json
DATA_EXT = PARQUET_EXT + JSONL_EXT + JSON_EXT + TAR_EXT
PARQUET_BATCH_ROWS = 8192
_UNDECODABLE = object()  # a parquet value whose strings are not valid UTF-8




def _has_surrogates(obj) -> str | None:
    """The first key whose string value cannot be encoded to UTF-8, if any."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return ""
        return None
    if isinstance(obj, dict):
        for k, v in obj.items():
            if _has_surrogates(k) is not None:
                return str(k).encode("utf-8", "backslashreplace").decode()
            bad = _has_surrogates(v)
            if bad is not None:
                return k if not bad else f"{k}.{bad}"
    if isinstance(obj, list):
        for v in obj:
            bad = _has_surrogates(v)
            if bad is not None:
                return bad
    return None


def _safe_text(s: str, limit: int = 2000) -> str:
    return s[:limit].encode("utf-8", "backslashreplace").decode("utf-8")


class _ZstdReader(io.RawIOBase):
    """Decompresses a zstd file of one or more frames, and raises ``ZstdError`` when the file
    ends inside a frame. (zstandard's ``stream_reader`` just returns a short read there, so a
    truncated ``.jsonl.zst`` would lose its last rows without a word.)"""

    def __init__(self, f, chunk: int = 1 << 17):
        import zstandard
        self._zstd = zstandard
        self._f = f
        self._chunk = chunk
        self._dctx = zstandard.ZstdDecompressor()
        self._frame = None            # decompressobj of the current frame
        self._out = memoryview(b"")   # decompressed bytes not yet read
        self._at_end = False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._out:
            if self._at_end:
                return 0
            data = self._f.read(self._chunk)
            if not data:
                self._at_end = True
                if self._frame is not None and not self._frame.eof:
                    raise self._zstd.ZstdError("the file ends inside a zstd frame (truncated)")
                return 0
            parts = []
            while data:
                if self._frame is None or self._frame.eof:
                    self._frame = self._dctx.decompressobj()
                parts.append(self._frame.decompress(data))
                data = self._frame.unused_data if self._frame.eof else b""
            self._out = memoryview(b"".join(parts))
        n = min(len(b), len(self._out))
        b[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


@dataclass
class Source:
    path: str          # absolute path, or the Hub id
    kind: str          # parquet | jsonl | json | tar | hf-disk | hf-hub
    name: str          # what row ids are built from: "<name>:<row number>"
    size: int
    mtime: float
    split: str | None = None

    def fingerprint(self) -> dict:
        return {"path": self.path, "kind": self.kind, "size": self.size,
                "mtime": round(self.mtime, 3), **({"split": self.split} if self.split else {})}

    # --- columns -------------------------------------------------------------------------
    def columns(self) -> set[str]:
        if self.kind == "parquet":
            import pyarrow.parquet as pq
            try:
                schema = pq.ParquetFile(self.path).schema_arrow
                from .images import IMAGE, image_column
                # an image-bytes column reaches rows as an `image` reference (images.py)
                return set(schema.names) | ({IMAGE} if image_column(schema) else set())
            except Exception as e:
                raise UserError(f"cannot read parquet file {self.path}: {e}") from None
        if self.kind in ("hf-disk", "hf-hub"):
            ds = self._hf_dataset()
            return set(ds.column_names or [])
        cols: set[str] = set()
        for n, rec in enumerate(self.records()):
            if isinstance(rec, dict):
                cols.update(rec.keys())
            if n >= 100:
                break
        return cols

    # --- records -------------------------------------------------------------------------
    def records(self) -> Iterator[dict | BadRecord]:
        if self.kind == "parquet":
            yield from self._parquet_records()
        elif self.kind == "jsonl":
            yield from self._jsonl_records()
        elif self.kind == "json":
            yield from self._json_list_records()
        elif self.kind == "tar":
            from .images import tar_records
            yield from tar_records(self.path)
        else:
            yield from self._hf_records()

    def _open_binary(self):
        try:
            f = open(self.path, "rb")
        except OSError as e:
            raise UserError(f"cannot open {self.path}: {e.strerror}") from None
        if self.path.endswith((".zst", ".zstd")):
            return _ZstdReader(f)
        return f

    def _jsonl_records(self):
        import zstandard
        with self._open_binary() as f:
            buffered = io.BufferedReader(f, 1 << 20) if not hasattr(f, "peek") else f
            try:
                for line in buffered:
                    if not line.strip():
                        continue  # blank lines are not rows
                    line = line.rstrip(b"\r\n")  # the rejected file keeps the line, not its end
                    try:
                        text = line.decode("utf-8")
                    except UnicodeDecodeError as e:
                        yield BadRecord("invalid_utf8", f"byte {e.start} of the line",
                                        line[:2000].decode("utf-8", "backslashreplace"))
                        continue
                    try:
                        obj = json.loads(text)
                    except json.JSONDecodeError as e:
                        yield BadRecord("unparseable", f"JSON: {e.msg} at column {e.colno}",
                                        _safe_text(text))
                        continue
                    # decoded UTF-8 holds no surrogates: only a JSON \uXXXX escape can make one
                    bad = _has_surrogates(obj) if "\\u" in text else None
                    if bad is not None:
                        yield BadRecord("invalid_utf8", f"lone surrogate in {bad!r}",
                                        _safe_text(text))
                        continue
                    yield obj
            except zstandard.ZstdError as e:
                yield BadRecord("unparseable", f"zstd stream broken: {e}; rest of file unread",
                                "")

    def _json_list_records(self):
        """Streams the elements of a top-level JSON array without loading it whole."""
        decoder = json.JSONDecoder()
        with self._open_binary() as fb:
            f = io.TextIOWrapper(fb, encoding="utf-8", errors="surrogateescape")
            buf = f.read(1 << 20)
            pos = 0
            consumed = 0  # characters dropped from the front of buf so far

            def grow() -> bool:
                """Appends the next block to buf; False at end of file."""
                nonlocal buf, pos, consumed
                more = f.read(1 << 20)
                if not more:
                    return False
                buf = buf[pos:] + more
                consumed += pos
                pos = 0
                return True

            def need(more_pos: int) -> bool:
                """At least ``more_pos`` unread characters in buf; False at end of file."""
                while len(buf) - pos < more_pos:
                    if not grow():
                        return False
                return True

            def skip_ws():
                nonlocal pos
                while True:
                    while pos < len(buf) and buf[pos] in " \t\r\n":
                        pos += 1
                    if pos < len(buf) or not need(1):
                        return

            skip_ws()
            if pos >= len(buf):
                raise UserError(f"{self.path} is empty (no rows): give a file with rows "
                                f"([{{...}}, ...])")
            if buf[pos] != "[":
                raise UserError(f"{self.path}: not a JSON list (a .json input must hold "
                                f"[{{...}}, ...]; use .jsonl for one object per line)")
            pos += 1
            first = True
            while True:
                skip_ws()
                if pos >= len(buf):
                    yield BadRecord("unparseable", "the JSON list is cut off (no closing ])", "")
                    return
                if buf[pos] == "]":
                    return
                if not first:
                    if buf[pos] != ",":
                        yield BadRecord("unparseable", f"expected ',' at character "
                                        f"{consumed + pos}; rest of file unread",
                                        _safe_text(buf[pos:pos + 200]))
                        return
                    pos += 1
                    skip_ws()
                first = False
                while True:
                    try:
                        obj, end = decoder.raw_decode(buf, pos)
                        break
                    except json.JSONDecodeError as e:
                        if grow():
                            continue  # the element may just continue past the buffer
                        yield BadRecord("unparseable", f"JSON: {e.msg} at character "
                                        f"{consumed + e.pos}; rest of file unread",
                                        _safe_text(buf[pos:pos + 200]))
                        return
                pos = end
                bad = _has_surrogates(obj)
                if bad is not None:
                    yield BadRecord("invalid_utf8", f"undecodable bytes in {bad!r}",
                                    _safe_text(json.dumps(obj, ensure_ascii=True)))
                    continue
                yield obj

    def _parquet_records(self):
        import pyarrow.parquet as pq

        from .images import image_column, parquet_ref
        try:
            # pre_buffer (on by default in recent pyarrow) keeps the read-ahead of every row
            # group until the file is done: memory then grows with the file. Stream instead.
            pf = pq.ParquetFile(self.path, pre_buffer=False, buffer_size=1 << 20)
            image_col = image_column(pf.schema_arrow)
        except Exception as e:
            raise UserError(f"cannot read parquet file {self.path}: {e}") from None
        if not image_col:
            yield from self._parquet_rows(pf, None)
            return
        # an image-bytes column (img2dataset) stays in the file: rows get a reference to it
        names = [n for n in pf.schema_arrow.names if n != image_col]
        yield from parquet_ref(self.path, image_col, self._parquet_rows(pf, names))

    def _parquet_rows(self, pf, columns: list[str] | None):
        """One record (or BadRecord) per row, in order."""
        import pyarrow as pa
        try:
            batches = pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns)
        except Exception as e:
            raise UserError(f"cannot read parquet file {self.path}: {e}") from None
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except Exception as e:
                yield BadRecord("unparseable", f"parquet row group unreadable: {e}; "
                                "rest of file unread", "")
                return
            try:
                yield from batch.to_pylist()
                continue
            except UnicodeDecodeError:
                pass
            # A batch with undecodable strings: convert column by column, and row by row in the
            # columns that fail (plain strings as bytes, to show what was there).
            names = batch.schema.names
            cols = []
            for i in range(batch.num_columns):
                col = batch.column(i)
                try:
                    cols.append(("value", col.to_pylist()))
                    continue
                except UnicodeDecodeError:
                    pass
                if pa.types.is_dictionary(col.type):
                    col = col.dictionary_decode()
                if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                    col = col.cast(pa.binary() if pa.types.is_string(col.type)
                                   else pa.large_binary())
                    cols.append(("bytes", col.to_pylist()))
                else:  # nested (list, struct, map …) holding a bad string somewhere
                    values = []
                    for r in range(len(col)):
                        try:
                            values.append(col[r].as_py())
                        except UnicodeDecodeError:
                            values.append(_UNDECODABLE)
                    cols.append(("value", values))
            for r in range(batch.num_rows):
                rec, bad = {}, None
                for name, (how, values) in zip(names, cols):
                    v = values[r]
                    if how == "bytes" and v is not None:
                        try:
                            v = v.decode("utf-8")
                        except UnicodeDecodeError:
                            bad = name
                            v = v.decode("utf-8", "backslashreplace")
                    elif v is _UNDECODABLE:
                        bad, v = name, "<not valid UTF-8>"
                    rec[name] = v
                if bad is not None:
                    yield BadRecord("invalid_utf8", f"column {bad!r}",
                                    json.dumps(rec, ensure_ascii=False, default=str)[:2000])
                else:
                    yield rec

    def _hf_dataset(self):
        try:
            import datasets
        except ImportError:
            raise UserError("reading Hugging Face datasets needs the `datasets` package: "
                            "pip install datasets") from None
        if self.kind == "hf-disk":
            try:
                ds = datasets.load_from_disk(self.path)
            except Exception as e:
                raise UserError(f"cannot load dataset folder {self.path}: {e}") from None
            if isinstance(ds, datasets.DatasetDict):
                split = self.split or ("train" if "train" in ds else next(iter(ds)))
                self.split = split
                ds = ds[split]
            return ds
        try:
            return datasets.load_dataset(self.path, split=self.split or "train", streaming=True)
        except Exception as e:
            raise UserError(f"cannot load Hub dataset {self.path!r}: "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                            ) from None

    def _hf_records(self):
        ds = self._hf_dataset()
        if self.kind == "hf-disk":
            for batch in ds.iter(batch_size=PARQUET_BATCH_ROWS):
                keys = list(batch.keys())
                n = len(batch[keys[0]]) if keys else 0
                for i in range(n):
                    yield {k: batch[k][i] for k in keys}
        else:
            yield from ds


def _kind_of(path: str) -> str | None:
    low = path.lower()
    if low.endswith(PARQUET_EXT):
        return "parquet"
    if low.endswith(JSONL_EXT):
        return "jsonl"
    if low.endswith(JSON_EXT):
        return "json"
    if low.endswith(TAR_EXT):
        return "tar"
    return None


def _is_hf_disk(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or \
        (path / "state.json").exists()


def _file_source(path: str, kind: str) -> Source:
    st = os.stat(path)
    return Source(path=os.path.abspath(path), kind=kind, name=os.path.basename(path),
                  size=st.st_size, mtime=st.st_mtime)


def _dir_stats(path: Path) -> tuple[int, float]:
    size, mtime = 0, 0.0
    for p in sorted(path.rglob("*")):
        if p.is_file():
            st = p.stat()
            size += st.st_size
            mtime = max(mtime, st.st_mtime)
    return size, mtime


def _data_files(files: list[str]) -> list[str]:
    """Leaves out img2dataset's metadata about rows that are elsewhere: ``NNNNN.parquet``
    beside ``NNNNN.tar`` (webdataset output: the rows are the tar's samples) and
    ``NNNNN_stats.json`` beside either (a JSON object, not rows)."""
    have = set(files)

    def metadata(f: str) -> bool:
        if f.endswith(".parquet"):
            return f[:-len(".parquet")] + ".tar" in have
        if f.endswith("_stats.json"):
            stem = f[:-len("_stats.json")]
            return stem + ".tar" in have or stem + ".parquet" in have
        return False

    return [f for f in files if not metadata(f)]


def discover(inputs: list[str], split: str | None = None) -> list[Source]:
    """Expands files, folders and globs into an ordered list of sources (sorted per input,
    input order kept), so the same inputs always give the same row ids and order."""
    sources: list[Source] = []
    for spec in inputs:
        p = Path(spec)
        if p.is_dir():
            if _is_hf_disk(p):
                size, mtime = _dir_stats(p)
                sources.append(Source(path=str(p.resolve()), kind="hf-disk", name=p.name,
                                      size=size, mtime=mtime, split=split))
                continue
            files = _data_files(sorted(str(f) for f in p.rglob("*") if f.is_file()
                                       and _kind_of(str(f)) and not f.name.startswith(".")))
            if not files:
                raise UserError(f"{spec}: folder has no .parquet, .jsonl[.zst], .json or .tar "
                                f"files")
            sources += [_file_source(f, _kind_of(f)) for f in files]
        elif p.is_file():
            kind = _kind_of(spec)
            if kind is None:
                raise UserError(f"{spec}: unknown format (expected .parquet, .jsonl, .jsonl.zst,"
                                f" .json, .tar (webdataset), or a datasets folder)")
            sources.append(_file_source(spec, kind))
        elif any(ch in spec for ch in "*?["):
            files = _data_files(sorted(f for f in glob.glob(spec, recursive=True)
                                       if os.path.isfile(f) and _kind_of(f)))
            if not files:
                raise UserError(f"{spec}: the pattern matches no data files")
            sources += [_file_source(f, _kind_of(f)) for f in files]
        elif spec.count("/") == 1 and not spec.startswith((".", "/")) and not _kind_of(spec) \
                and not os.path.exists(os.path.dirname(spec)):
            # looks like a Hub dataset id (org/name) and is not a local path
            sources.append(Source(path=spec, kind="hf-hub", name=spec.replace("/", "__"),
                                  size=0, mtime=0.0, split=split))
        else:
            raise UserError(f"{spec}: no such file or folder")
    _disambiguate_names(sources)
    return sources


def _disambiguate_names(sources: list[Source]) -> None:
    """Two files with the same basename would give the same ids: use the path relative to
    their common folder for those instead, so ids stay unique and stable."""
    by_name: dict[str, list[Source]] = {}
    for s in sources:
        by_name.setdefault(s.name, []).append(s)
    for same in by_name.values():
        if len(same) < 2:
            continue
        common = os.path.commonpath([os.path.dirname(s.path) for s in same])
        for s in same:
            s.name = os.path.relpath(s.path, common)
