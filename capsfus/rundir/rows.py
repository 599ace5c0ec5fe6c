"""Row names, source layouts and the ingest checks that accept, flag or reject one row.

Inside capsfus every row is ``{id, raw, synthetic, url, ...source columns passed through}``.
Sources are mapped to these names at ingest (``ColumnMapping``) and mapped back at export.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

# The internal names (DESIGN.md "Rows").
ID, RAW, SYNTHETIC, FUSED, URL = "id", "raw", "synthetic", "fused", "url"

MAX_CAPTION_CHARS = 4000

# Reason codes for rows refused at ingest. Each one is counted in the manifest.
REJECT_REASONS = {
    "unparseable": "the line or record could not be parsed as a JSON object",
    "raw_missing": "the raw caption column is absent from this row",
    "raw_null": "the raw caption is null",
    "raw_not_string": "the raw caption is not a string",
    "raw_empty": "the raw caption is empty after stripping whitespace",
    "synthetic_not_string": "the synthetic caption is neither null nor a string",
    "invalid_utf8": "a caption is not valid UTF-8 (or holds lone surrogates)",
    "control_chars": "a caption holds control characters other than ordinary whitespace",
    "too_long": f"a caption is longer than {MAX_CAPTION_CHARS} characters",
    "id_missing": "the id column is absent, null or empty in this row",
    "duplicate_id": "an earlier row has the same id (the first one wins)",
}

# Flags for rows that are accepted but need a later stage (counted, not rejected).
FLAG_NO_SYNTHETIC = "no_synthetic"


@dataclass(frozen=True)
class ColumnMapping:
    """Which source column feeds each internal name. ``id`` None means ``<file>:<row>``."""

    raw: str
    synthetic: str | None
    url: str | None
    id: str | None = None
    layout: str = "custom"

    def to_dict(self) -> dict:
        return asdict(self)

    def source_columns(self) -> set[str]:
        return {c for c in (self.raw, self.synthetic, self.url, self.id) if c}


# The layouts known by default: detected from the columns of the first source.
LAYOUTS: dict[str, dict[str, str | None]] = {
    "laion-coco": {"raw": "TEXT", "synthetic": "top_caption", "url": "URL"},
    "capsfusion120m": {"raw": "laion_2b", "synthetic": "laion_coco", "url": "image_url"},
    # The CapsFusion example release (the 10k sample): no URL column.
    "capsfusion-example": {"raw": "laion_2b", "synthetic": "laion_coco", "url": None},
    "capsfus": {"raw": "raw", "synthetic": "synthetic", "url": "url"},
    # img2dataset output (webdataset tars or parquet): alt-text only, images referenced in
    # the `image` column (ingest/images.py); `capsfus caption` fills `synthetic`.
    "img2dataset": {"raw": "caption", "synthetic": None, "url": "url"},
}


def resolve_mapping(columns: set[str] | None, raw_col: str | None, synthetic_col: str | None,
                    url_col: str | None, id_col: str | None) -> ColumnMapping:
    """Explicit flags win; otherwise the first known layout whose raw column is present.

    ``columns`` is the set of columns seen in the first rows of the first source (None when it
    could not be read, which the caller reports separately).
    """
    from ..errors import UserError

    cols = columns or set()
    layout_name = "custom"
    base: dict[str, str | None] = {}
    if raw_col is None:
        for name, layout in LAYOUTS.items():
            if name == "img2dataset" and "image" not in cols:
                continue  # a bare `caption` column is not enough: images must be there
            if layout["raw"] in cols and (layout["synthetic"] in cols or name == "capsfus"
                                          or name == "img2dataset"):
                if layout["url"] is not None and layout["url"] not in cols:
                    continue
                layout_name, base = name, dict(layout)
                break
        else:
            for name, layout in LAYOUTS.items():  # raw present but not the rest: still usable
                if layout["raw"] in cols and (name != "img2dataset" or "image" in cols):
                    layout_name, base = name, dict(layout)
                    break
        if not base:
            known = ", ".join(f"{n} ({l['raw']}/{l['synthetic']})" for n, l in LAYOUTS.items())
            raise UserError(
                f"cannot tell which column holds the raw caption (columns: "
                f"{', '.join(sorted(cols)) or 'none'}); known layouts: {known}. "
                f"Pass --raw-col and --synthetic-col.")
    raw = raw_col or base["raw"]
    synthetic = synthetic_col if synthetic_col is not None else base.get("synthetic")
    url = url_col if url_col is not None else base.get("url")
    if url is not None and cols and url not in cols:
        url = None
    if synthetic is not None and cols and synthetic not in cols and synthetic_col is None:
        synthetic = None
    if raw_col or synthetic_col or url_col:
        layout_name = "custom" if not base else layout_name
    return ColumnMapping(raw=raw, synthetic=synthetic, url=url, id=id_col, layout=layout_name)


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats (NaN, ±inf) replaced by None, at any depth.

    Parquet and pandas write NaN for a missing number (LAION's ``punsafe``, ``similarity``) and
    Python's json reads ``NaN`` from JSON lines, but capsfus files are strict JSON (io.dumps
    refuses NaN): null is the faithful JSON for "no value".
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


# Unicode category Cc is exactly U+0000-U+001F and U+007F-U+009F; tab, LF and CR are allowed.
_BAD_CONTROLS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _has_bad_controls(text: str) -> bool:
    return _BAD_CONTROLS.search(text) is not None


def _is_valid_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from JSON "\ud800" escapes
        return False
    return True


def check_caption(value: str) -> str | None:
    """The reason a present string caption is refused, or None."""
    if not _is_valid_utf8(value):
        return "invalid_utf8"
    if len(value) > MAX_CAPTION_CHARS:
        return "too_long"
    if _has_bad_controls(value):
        return "control_chars"
    return None


@dataclass
class Checked:
    row: dict | None          # the internal row when accepted
    reason: str | None        # reject reason code when refused
    detail: str = ""
    flags: tuple[str, ...] = ()
    id: str | None = None     # the row's id when it could be read (also for refused rows)


def check_record(record: Any, mapping: ColumnMapping, default_id: str) -> Checked:
    """Maps one source record to an internal row, or says why it is refused.

    ``Checked.id`` is the row's id, refused rows included: the source's id when the mapping has
    an id column and the row a usable value there, else ``default_id``.
    """
    if not isinstance(record, dict):
        return Checked(None, "unparseable", f"expected an object, got {type(record).__name__}",
                       id=default_id)
    rid = default_id
    if mapping.id:
        value = json_safe(record.get(mapping.id))
        if value is None or (isinstance(value, str) and not value.strip()):
            return Checked(None, "id_missing", f"column {mapping.id!r}", id=default_id)
        value = str(value)
        if not _is_valid_utf8(value):
            return Checked(None, "invalid_utf8", "in the id", id=default_id)
        rid = value
    checked = _check_fields(record, mapping, rid)
    checked.id = rid
    return checked


def _check_fields(record: dict, mapping: ColumnMapping, rid: str) -> Checked:
    if mapping.raw not in record:
        return Checked(None, "raw_missing", f"column {mapping.raw!r}")
    raw = record[mapping.raw]
    if isinstance(raw, float):
        raw = json_safe(raw)  # NaN (pandas' null) counts as null
    if raw is None:
        return Checked(None, "raw_null")
    if not isinstance(raw, str):
        return Checked(None, "raw_not_string", type(raw).__name__)
    reason = check_caption(raw)
    if reason:
        return Checked(None, reason, "raw caption")
    if not raw.strip():
        return Checked(None, "raw_empty")
    synthetic = record.get(mapping.synthetic) if mapping.synthetic else None
    if isinstance(synthetic, float):
        synthetic = json_safe(synthetic)
    flags: tuple[str, ...] = ()
    if synthetic is not None and not isinstance(synthetic, str):
        return Checked(None, "synthetic_not_string", type(synthetic).__name__)
    if isinstance(synthetic, str):
        reason = check_caption(synthetic)
        if reason:
            return Checked(None, reason, "synthetic caption")
        synthetic = synthetic.strip() or None
    if synthetic is None:
        flags = (FLAG_NO_SYNTHETIC,)
    url = json_safe(record.get(mapping.url)) if mapping.url else None
    row = {ID: rid, RAW: raw.strip(), SYNTHETIC: synthetic,
           URL: url if url is None or isinstance(url, str) else str(url)}
    used = mapping.source_columns()
    for key, value in record.items():
        if key in used:
            continue
        # a source column that clashes with an internal name is kept under another name
        if value is not None and not isinstance(value, (str, int)):
            value = json_safe(value)
        row[key if key not in row else f"source_{key}"] = value
    return Checked(row, None, "", flags)


# Column names that hold a fused caption in files from outside a run (ours, the CapsFusion-120M
# release, its example file with the release's spelling), tried in this order.
KNOWN_FUSED_COLUMNS = ("fused", "capsfusion", "capsfuion_official", "capsfusion_official")
