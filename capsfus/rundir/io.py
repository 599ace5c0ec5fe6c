"""Atomic files, checksums and the JSON-lines + zstd format every stage reads and writes.

Every file capsfus trusts is written as: temp file in the same folder -> fsync -> rename ->
fsync of the folder. A reader therefore sees either the old file or the whole new one, never a
half-written one; a crash leaves at most a ``.tmp-*`` file that nothing lists or trusts.
"""

from __future__ import annotations

import base64
import datetime as _dt
import decimal
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import zstandard

from .faults import crashpoint

ZSTD_LEVEL = 3


def _json_default(value: Any) -> Any:
    """Make the odd types parquet and datasets hand us JSON-safe, losslessly where we can."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"__bytes_b64__": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, _dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy arrays
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def dumps(obj: Any) -> str:
    """One compact JSON line. Non-ASCII stays readable; NaN is refused (not valid JSON)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=_json_default,
                      allow_nan=False)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process umask, read without changing it (Linux: /proc/self/status), else the
    classic set-and-restore."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def mkstemp_shared(path: Path, tmp_dir: str | os.PathLike | None = None) -> tuple[int, str]:
    """``tempfile.mkstemp`` for a file that becomes ``path``, but with the mode any other tool
    would give it (0666 & ~umask) instead of mkstemp's private 0600: run-dir files are read by
    teammates (status, outputs) and hold no secrets. The temp file lives in ``tmp_dir`` (a
    lease's write token, see lease.py) or beside ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=tmp_dir or path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp)
        raise
    return fd, tmp


def atomic_write_bytes(path: str | os.PathLike, data: bytes,
                       tmp_dir: str | os.PathLike | None = None) -> None:
    """Writes ``path`` atomically. With ``tmp_dir`` the temp file is made there and renamed
    into place from there: if ``tmp_dir`` has been removed meanwhile, nothing is written
    (FileNotFoundError); this is how a fenced-off lease holder is kept from writing."""
    path = Path(path)
    if tmp_dir is None:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = mkstemp_shared(path, tmp_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        crashpoint("before_rename")
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_replace_open(path: str | os.PathLike, data: bytes,
                        tmp_dir: str | os.PathLike | None = None):
    """``atomic_write_bytes``, then the new file stays open for appending (binary). The
    returned file is bound to the inode now named ``path``: once anyone replaces ``path``
    again, what is appended through it lands in an unlinked file, never at ``path``."""
    path = Path(path)
    if tmp_dir is None:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = mkstemp_shared(path, tmp_dir)
    f = os.fdopen(fd, "ab")
    try:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        crashpoint("before_rename")
        os.replace(tmp, path)
    except BaseException:
        f.close()
        _unlink_quietly(tmp)
        raise
    _fsync_dir(path.parent)
    return f


def atomic_write_json(path: str | os.PathLike, obj: Any,
                      tmp_dir: str | os.PathLike | None = None) -> None:
    text = json.dumps(obj, ensure_ascii=False, indent=1, sort_keys=False, default=_json_default)
    atomic_write_bytes(path, (text + "\n").encode("utf-8"), tmp_dir)


def read_json(path: str | os.PathLike) -> Any:
    with open(path, "rb") as f:
        return json.loads(f.read().decode("utf-8"))


def _unlink_quietly(path: str | os.PathLike) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def sha256_file(path: str | os.PathLike, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


class _HashingFile(io.RawIOBase):
    """A write-only file wrapper that hashes and counts every byte that passes through."""

    def __init__(self, f):
        self._f = f
        self.sha = hashlib.sha256()
        self.nbytes = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sha.update(b)
        self.nbytes += len(b)
        return self._f.write(b)


class JsonlZstWriter:
    """Writes JSON lines through zstd into a temp file; ``commit()`` fsyncs and renames it.

    The sha256 and byte size of the compressed file are computed while writing, so a chunk's
    checksum costs no second read. Nothing is visible under the final name before ``commit``.
    """

    def __init__(self, path: str | os.PathLike, level: int = ZSTD_LEVEL,
                 tmp_dir: str | os.PathLike | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = mkstemp_shared(self.path, tmp_dir)
        self._raw = os.fdopen(fd, "wb")
        self._hashing = _HashingFile(self._raw)
        self._zw = zstandard.ZstdCompressor(level=level).stream_writer(self._hashing, closefd=False)
        self.rows = 0
        self.sha256: str | None = None
        self.nbytes = 0
        self._done = False

    def write(self, row: dict) -> None:
        self._zw.write((dumps(row) + "\n").encode("utf-8"))
        self.rows += 1

    def write_many(self, rows: Iterable[dict]) -> None:
        for row in rows:
            self.write(row)

    def commit(self) -> dict:
        """Finish, fsync, rename into place; returns ``{file, rows, sha256, bytes}``."""
        self._zw.flush(zstandard.FLUSH_FRAME)
        self._zw.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        crashpoint("before_rename")
        os.replace(self._tmp, self.path)
        _fsync_dir(self.path.parent)
        self._done = True
        self.sha256 = self._hashing.sha.hexdigest()
        self.nbytes = self._hashing.nbytes
        return {"file": self.path.name, "rows": self.rows, "sha256": self.sha256,
                "bytes": self.nbytes}

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            self._zw.close()
        except Exception:
            pass
        try:
            self._raw.close()
        except Exception:
            pass
        _unlink_quietly(self._tmp)

    def __enter__(self) -> "JsonlZstWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.commit()


class CorruptFile(Exception):
    """A file that capsfus wrote does not read back as it should (checksum, zstd, JSON)."""


def iter_jsonl_zst(path: str | os.PathLike, expect_sha256: str | None = None) -> Iterator[dict]:
    """Yields the rows of a ``.jsonl.zst`` file. With ``expect_sha256`` the whole file is
    verified *before* the first row is yielded, so a corrupt file never leaks rows."""
    path = Path(path)
    if expect_sha256 is not None:
        actual = sha256_file(path)
        if actual != expect_sha256:
            raise CorruptFile(f"{path}: checksum mismatch (expected {expect_sha256[:12]}…, "
                              f"found {actual[:12]}…)")
    try:
        with open(path, "rb") as f:
            reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
            text = io.TextIOWrapper(reader, encoding="utf-8", newline="\n")
            for line in text:
                if line.strip():
                    yield json.loads(line)
    except (zstandard.ZstdError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFile(f"{path}: {type(e).__name__}: {e}") from e


def verify_file(path: str | os.PathLike, sha256: str) -> bool:
    try:
        return sha256_file(path) == sha256
    except OSError:
        return False
