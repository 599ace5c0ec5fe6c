"""Images of image-caption rows: where their bytes are, decoding, validation and resizing.

A row never carries image bytes: ingest leaves a small reference in its ``image`` column:

- ``{"tar": PATH, "member": NAME, "offset": BYTE, "size": N}``: a member of a webdataset tar
  (img2dataset's ``webdataset`` output); read with one ``pread`` of the member's header
  block and data, the header checked against the reference (a rewritten tar is refused);
- ``{"parquet": PATH, "column": COL, "row": N}``: row N of an image-bytes column of a parquet
  file (img2dataset's ``parquet`` output, or a Hugging Face ``Image`` struct column);
- ``None``: the source row has no image (the caption stage rejects it: ``image_missing``).

Decoding uses Pillow and numpy only (no torchvision: DESIGN.md). ``load_image`` returns a
``Loaded`` with an RGB ``PIL.Image`` or a reason code; ``resize_uint8`` makes the model's
input size as uint8 so a chunk of decoded images stays small in memory (normalisation is done
per batch, on the accelerator).
"""

from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

IMAGE = "image"
IMAGE_EXT = ("jpg", "jpeg", "png", "webp")

# Reason codes for rows whose image cannot be captioned (the caption stage's rejected/).
IMAGE_REJECT_REASONS = {
    "image_missing": "the row has no image (no image member or a null image cell)",
    "image_unreadable": "the image bytes could not be read (file gone, moved or changed)",
    "image_undecodable": "the bytes are not an image Pillow can decode",
    "image_truncated": "the image file is cut off (truncated download)",
    "image_too_small": "the image is smaller than the minimum side",
    "image_too_large": "the image has more pixels than allowed (decompression-bomb guard)",
}

DEFAULT_MIN_SIDE = 8
DEFAULT_MAX_PIXELS = 64_000_000


@dataclass
class Loaded:
    image: object | None          # PIL.Image.Image (RGB) when ok
    reason: str | None = None
    detail: str = ""


class ImageReader:
    """Reads the bytes behind image references. Thread-safe: tar members are read with
    ``os.pread`` on shared descriptors; the image column of the last ``max_groups`` parquet
    row groups is kept (the rows of a shard arrive in order; a chunk may straddle two files),
    so a worker's memory does not grow with the files it has read."""

    def __init__(self, max_open: int = 32, max_groups: int = 2,
                 sizes: dict[str, int] | None = None):
        self._sizes = sizes or {}     # path -> size at ingest (the manifest's sources)
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._groups: OrderedDict[tuple[str, str, int], object] = OrderedDict()
        self._lock = threading.Lock()
        self._max_open = max_open
        self._max_groups = max_groups

    def _fd(self, path: str) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is not None:
                self._fds.move_to_end(path)
                return fd
            fd = os.open(path, os.O_RDONLY)
            try:
                self._check_size(path, os.fstat(fd).st_size)
            except ValueError:
                os.close(fd)
                raise
            self._fds[path] = fd
            while len(self._fds) > self._max_open:
                _, old = self._fds.popitem(last=False)
                os.close(old)
            return fd

    def _check_size(self, path: str, size: int) -> None:
        want = self._sizes.get(path)
        if want is not None and size != want:
            raise ValueError(f"{path} changed since ingest ({want} bytes then, {size} now): "
                             f"its rows no longer point at their images; shard it again")

    def read(self, ref: dict) -> bytes | None:
        """The image bytes (None for a null parquet cell). Raises OSError/ValueError when the
        reference cannot be followed."""
        if "tar" in ref:
            if ref.get("offset") is None:
                import tarfile
                with tarfile.open(ref["tar"]) as tf:
                    f = tf.extractfile(ref["member"])
                    if f is None:
                        raise ValueError(f"{ref['member']} is not a file")
                    return f.read()
            # the member's header block (just before its data) comes along, so a tar that
            # was rewritten since ingest is noticed instead of captioning other bytes
            fd = self._fd(ref["tar"])
            size, offset = ref["size"], ref["offset"]
            data = os.pread(fd, size + 512, offset - 512)
            if len(data) != size + 512:
                raise ValueError(f"{ref['tar']} ends before member {ref['member']}")
            if not _tar_header_matches(data[:512], ref["member"], size):
                raise ValueError(f"{ref['tar']} changed since ingest: no member "
                                 f"{ref['member']} of {size} bytes at byte {offset}")
            return data[512:]
        if "parquet" in ref:
            return self._parquet_cell(ref["parquet"], ref["column"], int(ref["row"]))
        raise ValueError(f"unknown image reference {sorted(ref)}")

    def _parquet_cell(self, path: str, column: str, row: int) -> bytes | None:
        import pyarrow.parquet as pq
        with self._lock:
            for (p, c, start), values in self._groups.items():
                if p == path and c == column and start <= row < start + len(values):
                    self._groups.move_to_end((p, c, start))
                    break
            else:
                self._check_size(path, os.path.getsize(path))
                pf = pq.ParquetFile(path)
                start = 0
                for g in range(pf.metadata.num_row_groups):
                    n = pf.metadata.row_group(g).num_rows
                    if start <= row < start + n:
                        # kept as Arrow (one buffer), converted a cell at a time
                        values = pf.read_row_group(g, columns=[column]).column(0)
                        self._groups[(path, column, start)] = values
                        while len(self._groups) > self._max_groups:
                            self._groups.popitem(last=False)
                        break
                    start += n
                else:
                    raise ValueError(f"{path} has no row {row}")
            value = values[row - start].as_py()
        if isinstance(value, dict):          # Hugging Face Image struct {bytes, path}
            value = value.get("bytes")
        return value

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._groups.clear()


def _tar_header_matches(block: bytes, member: str, size: int) -> bool:
    """Whether a tar header block describes ``member`` (its stored name: a longer name is
    held in a pax/GNU record before it, the block keeps a cut form) of ``size`` bytes."""
    import tarfile
    try:
        ti = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return False
    return ti.size == size and (ti.name == member or len(member.encode()) > 100)


def decode(data: bytes, min_side: int = DEFAULT_MIN_SIDE,
           max_pixels: int = DEFAULT_MAX_PIXELS, draft: int | None = None) -> Loaded:
    """Bytes -> RGB image, or the reason it is refused. The size is checked from the header
    before the pixels are decoded, so a huge image costs nothing. ``draft``: a JPEG is
    decoded at a reduced scale (1/2, 1/4, 1/8, in the DCT) as long as both sides stay at
    least ``draft`` pixels, which is several times cheaper for large photos."""
    from PIL import Image, UnidentifiedImageError
    try:
        im = Image.open(io.BytesIO(data))
        w, h = im.size
        if w * h > max_pixels:
            return Loaded(None, "image_too_large", f"{w}x{h}")
        if min(w, h) < min_side:
            return Loaded(None, "image_too_small", f"{w}x{h}")
        if draft and im.format == "JPEG":
            im.draft("RGB", (draft, draft))
        im.load()
        im = _rgb(im)      # inside: a mode Pillow cannot convert is a reject, not a crash
    except Image.DecompressionBombError as e:   # Pillow's own guard, at open()
        return Loaded(None, "image_too_large", str(e)[:200])
    except UnidentifiedImageError as e:
        return Loaded(None, "image_undecodable", str(e)[:200])
    except OSError as e:  # Pillow: "image file is truncated", "broken data stream", …
        msg = str(e)
        code = "image_truncated" if "truncat" in msg.lower() else "image_undecodable"
        return Loaded(None, code, msg[:200])
    except Exception as e:  # malformed files also raise ValueError, SyntaxError, struct.error…
        return Loaded(None, "image_undecodable", f"{type(e).__name__}: {str(e)[:200]}")
    return Loaded(im)


def _rgb(im):
    from PIL import Image
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        im = im.convert("RGBA")
        bg = Image.new("RGB", im.size, (255, 255, 255))   # transparent -> white
        bg.paste(im, mask=im.getchannel("A"))
        return bg
    return im.convert("RGB")


def load_image(reader: ImageReader, ref, min_side: int = DEFAULT_MIN_SIDE,
               max_pixels: int = DEFAULT_MAX_PIXELS, draft: int | None = None) -> Loaded:
    if not isinstance(ref, dict):
        return Loaded(None, "image_missing", "")
    try:
        data = reader.read(ref)
    except (OSError, ValueError, KeyError) as e:
        return Loaded(None, "image_unreadable", f"{type(e).__name__}: {str(e)[:200]}")
    if not data:
        return Loaded(None, "image_missing", "null or empty image bytes")
    return decode(data, min_side, max_pixels, draft)


def resize_uint8(im, size: tuple[int, int], crop: bool = False) -> np.ndarray:
    """An RGB image as a (H, W, 3) uint8 array of ``size`` = (height, width), bicubic.
    ``crop``: resize the short side then centre-crop (CLIP); else stretch (BLIP)."""
    from PIL import Image
    h, w = size
    if crop:
        # the centre crop of the short-side resize, taken from the source (``box``): a banner
        # of extreme aspect ratio never becomes a huge intermediate image
        scale = max(h / im.height, w / im.width)
        nw, nh = max(w, round(im.width * scale)), max(h, round(im.height * scale))
        left, top = (nw - w) // 2, (nh - h) // 2
        sx, sy = im.width / nw, im.height / nh
        box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
        im = im.resize((w, h), Image.BICUBIC, box=box)
    else:
        im = im.resize((w, h), Image.BICUBIC)
    return np.asarray(im, dtype=np.uint8)




def map_threaded(fn: Callable, items: Iterable, threads: int) -> list:
    """``[fn(x) for x in items]``, on ``threads`` worker threads when > 1 (Pillow releases
    the GIL while decoding and resizing, so threads overlap)."""
    items = list(items)
    if threads <= 1 or len(items) < 2:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode") as pool:
        return list(pool.map(fn, items))


# ------------------------------------------------------------------------ ingest: img2dataset
def tar_records(path: str):
    """The samples of a webdataset tar, one record per key, in file order: the ``.json``
    member's fields, ``caption`` from the ``.txt`` member, and ``image`` (a reference to the
    first ``jpg``/``jpeg``/``png``/``webp`` member, None when the sample has none). Members
    of one sample are adjacent (webdataset's rule); the key is the member name up to the
    first dot of its base name."""
    import json
    import tarfile

    from .records import BadRecord

    def finish(key, parts):
        rec: dict = {}
        meta = parts.get("json")
        if meta is not None:
            try:
                obj = json.loads(meta.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                return BadRecord("unparseable", f"{key}.json: {str(e)[:200]}", key)
            if not isinstance(obj, dict):
                return BadRecord("unparseable", f"{key}.json is not an object", key)
            rec.update(obj)
        if "txt" in parts:
            try:
                rec["caption"] = parts["txt"].decode("utf-8")
            except UnicodeDecodeError as e:
                return BadRecord("invalid_utf8", f"{key}.txt byte {e.start}", key)
        rec[IMAGE] = parts.get("image")
        return rec

    try:
        tf = tarfile.open(path, "r:")
    except (OSError, tarfile.TarError) as e:
        from ..errors import UserError
        raise UserError(f"cannot read tar file {path}: {e}") from None
    key, parts = None, {}
    with tf:
        try:
            for m in tf:
                if not m.isfile():
                    continue
                d, _, base = m.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot or base.startswith("."):
                    continue
                k = f"{d}/{stem}" if d else stem
                if k != key:
                    if key is not None:
                        yield finish(key, parts)
                    key, parts = k, {}
                ext = ext.lower()
                if ext in IMAGE_EXT:
                    parts.setdefault("image", {"tar": path, "member": m.name,
                                               "offset": m.offset_data, "size": m.size})
                elif ext in ("txt", "json"):
                    f = tf.extractfile(m)
                    parts[ext] = f.read() if f else b""
        except (OSError, tarfile.TarError, EOFError) as e:
            if key is not None:
                parts = {}  # the sample being read may be incomplete: drop it with the rest
            yield BadRecord("unparseable", f"tar broken after {key!r}: {e}; rest of file "
                            "unread", "")
            return
        # tarfile stops quietly at the end of the data; a whole tar ends with two zero blocks
        truncated = os.path.getsize(path) < tf.offset + 1024
    if key is not None:
        yield finish(key, parts)
    if truncated:
        yield BadRecord("unparseable", f"tar ends without its end-of-archive blocks after "
                        f"{key!r} (a truncated download or copy?); samples after it are lost", "")


_IMAGE_COL_NAMES = ("jpg", "jpeg", "png", "webp", "image", "img", "image_bytes", "bytes")


def image_column(schema) -> str | None:
    """The image-bytes column of a parquet schema: a binary column (img2dataset: ``jpg``) or a
    ``{bytes, path}`` struct (Hugging Face ``Image``), by preferred name first."""
    import pyarrow as pa

    def is_image(t) -> bool:
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return True
        return pa.types.is_struct(t) and any(
            t.field(i).name == "bytes" for i in range(t.num_fields))

    cands = [f.name for f in schema if is_image(f.type)]
    for name in _IMAGE_COL_NAMES:
        if name in cands:
            return name
    return cands[0] if cands else None


def parquet_ref(path: str, column: str, records):
    """Adds ``image`` = a reference to each record's cell of ``column``. ``records`` holds
    one item per row of the file, in order (a bad record passes as it is)."""
    for i, rec in enumerate(records):
        if isinstance(rec, dict):
            if column != IMAGE and IMAGE in rec:
                rec[f"source_{IMAGE}"] = rec.pop(IMAGE)
            rec[IMAGE] = {"parquet": path, "column": column, "row": i}
        yield rec
