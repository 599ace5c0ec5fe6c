"""Parquet files of an export: one Arrow type per column for the whole export, files and row
groups cut by size (the Hub's advice), names in the Hub's ``train-00000-of-000NN`` form."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from ..rundir.faults import crashpoint


# --------------------------------------------------------------------------- writing
def _kind(v) -> str | None:
    """What a passthrough value needs from its column's type."""
    if v is None:
        return None
    t = type(v)
    if t is bool or t is float or t is str:
        return t.__name__
    if t is int:
        return "int" if -2 ** 63 <= v < 2 ** 63 else "json"
    if t is list and all(x is None or type(x) is str for x in v):
        return "list"
    return "json"


def arrow_type_of(kinds: set):
    """The column type for the kinds of value seen in it (from every row, see ``export_run``):
    ints and floats together are floats; anything mixed or nested is JSON text."""
    import pyarrow as pa
    kinds = kinds - {None}
    if kinds == {"bool"}:
        return pa.bool_()
    if kinds == {"int"}:
        return pa.int64()
    if kinds and kinds <= {"int", "float"}:
        return pa.float64()
    if kinds == {"list"}:
        return pa.list_(pa.string())
    return pa.string()


def observe_types(columns: dict[str, set], row: dict, skip: set) -> None:
    """Adds the row's passthrough columns and the kinds of their values to ``columns``."""
    for k, v in row.items():
        if k not in skip:
            columns.setdefault(k, set()).add(_kind(v))


class ParquetShards:
    """Writes rows into numbered parquet files of at most ``max_bytes`` (checked after each
    row group), each row group holding about ``row_group_bytes`` of uncompressed data. Files
    get their final ``train-XXXXX-of-YYYYY`` names in ``finish()``."""

    def __init__(self, folder: Path, schema, max_bytes: int, row_group_bytes: int,
                 prefix: str = ""):
        self.folder = folder
        self.prefix = prefix
        self.schema = schema
        self.max_bytes = max_bytes
        self.row_group_bytes = row_group_bytes
        self.rows_per_group: int | None = None
        self.buf: list[dict] = []
        self.parts: list[dict] = []
        self.writer = None
        self.coerced: Counter = Counter()

    def add(self, row: dict) -> None:
        self.buf.append(row)
        if self.rows_per_group is None and len(self.buf) >= 256:
            self._size_groups()
        if self.rows_per_group is not None and len(self.buf) >= self.rows_per_group:
            self._flush()

    def _size_groups(self) -> None:
        table = self._table(self.buf)
        per_row = max(1, table.nbytes // max(1, table.num_rows))
        self.rows_per_group = max(1, self.row_group_bytes // per_row)

    def _column(self, name: str, typ, values: list):
        """One column; a value that does not fit the column's type becomes null and is
        counted (passthrough columns only: caption columns are always strings)."""
        import json

        import pyarrow as pa
        try:
            return pa.array(values, type=typ)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
            pass
        fixed = []
        for v in values:
            if v is None:
                fixed.append(None)
            elif pa.types.is_string(typ):
                fixed.append(v if isinstance(v, str) else json.dumps(v, ensure_ascii=False))
            elif pa.types.is_floating(typ) and isinstance(v, (int, float)) \
                    and not isinstance(v, bool):
                fixed.append(float(v))
            elif pa.types.is_integer(typ) and isinstance(v, float) and v.is_integer():
                fixed.append(int(v))
            else:
                try:
                    pa.array([v], type=typ)
                    fixed.append(v)
                except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
                    fixed.append(None)
                    self.coerced[name] += 1
        return pa.array(fixed, type=typ)

    def _table(self, rows: list[dict]):
        import pyarrow as pa
        cols = [self._column(f.name, f.type, [r.get(f.name) for r in rows])
                for f in self.schema]
        return pa.Table.from_arrays(cols, schema=self.schema)

    def _open(self) -> None:
        import pyarrow.parquet as pq
        path = self.folder / f"{self.prefix}part-{len(self.parts):05d}.parquet.tmp"
        self.writer = pq.ParquetWriter(str(path), self.schema, compression="zstd")
        self.parts.append({"tmp": path, "rows": 0})

    def _flush(self) -> None:
        if not self.buf:
            return
        if self.writer is None:
            self._open()
        table = self._table(self.buf)
        self.writer.write_table(table, row_group_size=len(self.buf))
        self.parts[-1]["rows"] += len(self.buf)
        self.buf = []
        crashpoint("export_row_group")
        if self.parts[-1]["tmp"].stat().st_size >= self.max_bytes:  # unbuffered native file
            self._close()

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            fd = os.open(self.parts[-1]["tmp"], os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self.writer = None

    def finish(self) -> list[dict]:
        """The parts written, in order: [{"tmp": path, "rows": n}]."""
        if self.rows_per_group is None and self.buf:
            self._size_groups()
        self._flush()
        self._close()
        return self.parts


def name_parts(parts: list[dict]) -> list[dict]:
    """Renames the parts, in order, to ``train-XXXXX-of-YYYYY.parquet``."""
    from ..rundir.io import sha256_file
    n = len(parts)
    files = []
    for i, part in enumerate(parts):
        tmp = Path(part["tmp"])
        final = tmp.parent / f"train-{i:05d}-of-{n:05d}.parquet"
        tmp.replace(final)
        files.append({"file": f"data/{final.name}", "rows": part["rows"],
                      "bytes": final.stat().st_size, "sha256": sha256_file(final)})
    return files
