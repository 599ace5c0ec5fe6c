"""The 10,000 real rows of the CapsFusion release that the repository carries (zstd,
``tests/data/capsfusion_example_10k.json.zst``; provenance in ``tests/data/README.md``), for
tests, benchmarks, ``capsfus bench fuse`` and ``capsfus eval`` defaults, and the demo.

``example_data()`` decompresses it once into a cache folder (``$CAPSFUS_CACHE_DIR``, else
``~/.cache/capsfus``), atomically and checked against its sha256, and returns the path of the
plain JSON list. The file keeps its release name, so row ids stay
``capsfusion_example_10k.json:<row>`` whichever copy is read.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..errors import UserError

NAME = "capsfusion_example_10k.json"
SHA256 = "c892b6e233c72ef9a11669a9893b0e281ff5f3b45674454e660dddd39defa8b7"
ROWS = 10_000
# the release's column names (sic: "capsfuion")
RAW_COL, SYNTHETIC_COL, FUSED_COL = "laion_2b", "laion_coco", "capsfuion_official"
COMPRESSED = Path(__file__).resolve().parents[2] / "tests" / "data" / f"{NAME}.zst"


def cache_dir() -> Path:
    return Path(os.environ.get("CAPSFUS_CACHE_DIR") or Path.home() / ".cache" / "capsfus")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def example_data() -> Path:
    """The plain JSON file of the carried rows (decompressed on first use)."""
    out = cache_dir() / "data" / SHA256[:12] / NAME
    if out.exists() and out.stat().st_size > 0 and _sha256(out) == SHA256:
        return out
    if not COMPRESSED.exists():
        raise UserError(f"{COMPRESSED} is missing: the example data ships with the repository "
                        "(run from a clone with an editable install: pip install -e .)")
    import zstandard
    from ..rundir.io import atomic_write_bytes
    data = zstandard.ZstdDecompressor().decompress(COMPRESSED.read_bytes(),
                                                   max_output_size=64 << 20)
    if hashlib.sha256(data).hexdigest() != SHA256:
        raise UserError(f"{COMPRESSED} is corrupted (sha256 mismatch): restore it with "
                        f"`git checkout -- {COMPRESSED.name}`")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, data)
    return out


def example_rows() -> list[dict]:
    import json
    return json.loads(example_data().read_text(encoding="utf-8"))
