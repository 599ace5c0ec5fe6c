"""The run directory and its manifest: the single source of truth of a run.

```
RUN/manifest.json            run id, sources, column mapping, shard list (rows, sha256), counts
RUN/input/out/00000.jsonl.zst
RUN/input/rejected/…
RUN/<stage>/…                see stage.py
```
The manifest is written last and atomically by ``capsfus shard``: a run without one is not a
run (an interrupted ingest leaves none, and is started over).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .. import SCHEMA_VERSION
from ..errors import UserError
from .io import atomic_write_json, read_json

MANIFEST = "manifest.json"
STAGE_NAME_RE = re.compile(r"^(input|caption|fuse|teacher|filter)(@[A-Za-z0-9_.-]{1,64})?$")


def stage_name(stage: str, tag: str | None = None) -> str:
    name = f"{stage}@{tag}" if tag else stage
    if not STAGE_NAME_RE.match(name):
        raise UserError(f"bad stage name {name!r}: a stage is input, caption, fuse, teacher or "
                        f"filter, optionally with @TAG (letters, digits, _ . -)")
    return name


@dataclass
class Run:
    root: Path

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def exists(self) -> bool:
        return self.manifest_path.exists()

    def manifest(self) -> dict:
        if not self.root.exists():
            raise UserError(f"{self.root}: no such run directory (create one with "
                            f"`capsfus shard INPUT --out {self.root}`)")
        if not self.manifest_path.exists():
            raise UserError(f"{self.root}: not a capsfus run (no manifest.json); create it with "
                            f"`capsfus shard INPUT --out {self.root}`")
        try:
            m = read_json(self.manifest_path)
        except (OSError, ValueError) as e:
            raise UserError(f"{self.manifest_path}: unreadable manifest ({e})") from None
        if m.get("format") != "capsfus-run":
            raise UserError(f"{self.manifest_path}: not a capsfus manifest")
        if m.get("schema_version", 0) > SCHEMA_VERSION:
            raise UserError(f"{self.root} was made by a newer capsfus (schema "
                            f"{m.get('schema_version')}); upgrade capsfus")
        return m

    def write_manifest(self, manifest: dict) -> None:
        atomic_write_json(self.manifest_path, manifest)

    def stage_dir(self, name: str) -> Path:
        return self.root / name

    def input_shard_path(self, shard: dict) -> Path:
        return self.root / shard["file"]

    def stages(self) -> list[str]:
        """Stage folders present in the run, in pipeline order."""
        if not self.root.exists():
            return []
        found = [p.name for p in self.root.iterdir() if p.is_dir() and STAGE_NAME_RE.match(p.name)]
        order = ["input", "caption", "teacher", "fuse", "filter"]
        return sorted(found, key=lambda n: (order.index(n.split("@")[0]), n))


def parse_shard_spec(spec: str | None, n_shards: int) -> list[int]:
    """``None`` → all; ``"0-9,12,20-"`` → those indices (validated against the run)."""
    if spec is None or spec.strip() in ("", "all"):
        return list(range(n_shards))
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d*)-(\d*)|(\d+)", part)
        if not m:
            raise UserError(f"--shards {spec!r}: use e.g. 0-9,12,20-")
        if m.group(3) is not None:
            lo = hi = int(m.group(3))
        else:
            lo = int(m.group(1)) if m.group(1) else 0
            hi = int(m.group(2)) if m.group(2) else n_shards - 1
        if lo > hi or hi >= n_shards:
            raise UserError(f"--shards {spec!r}: the run has shards 0-{n_shards - 1}")
        out.update(range(lo, hi + 1))
    return sorted(out)
