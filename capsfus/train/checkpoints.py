"""Checkpoints that are either complete or ignored.

HF Trainer writes ``checkpoints/checkpoint-N/`` (weights, DeepSpeed shards of every rank,
optimizer, scheduler, RNG states, trainer state with the data position). When every rank has
finished writing, rank 0 fsyncs the files and writes ``COMPLETE.json`` last, atomically, with
the step and every file's size. Resume picks the newest checkpoint whose marker matches its
step and whose files are all there at those sizes; anything else is half-written (a crash
while saving) and never picked: rank 0 deletes it before training resumes.

Retention is ours, not HF's (``save_total_limit`` is left unset there): HF would count a
half-written checkpoint among the newest and could delete a complete one in its favour. A
checkpoint being deleted loses its marker first, so a crash mid-delete leaves one more
incomplete folder, never a damaged "complete" one.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from ..rundir.io import _fsync_dir, atomic_write_json, read_json

MARKER = "COMPLETE.json"
NAME = re.compile(r"^checkpoint-(\d+)$")


def _files(folder: Path) -> dict[str, int]:
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            p = Path(root) / n
            rel = str(p.relative_to(folder))
            if rel != MARKER and not n.startswith(".tmp-"):
                out[rel] = p.stat().st_size
    return out


def checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := NAME.match(p.name))]
    return sorted(found)


def is_complete(step: int, folder: Path) -> bool:
    try:
        marker = read_json(folder / MARKER)
    except (OSError, ValueError):
        return False
    if marker.get("step") != step:
        return False
    for rel, size in marker.get("files", {}).items():
        try:
            if (folder / rel).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def latest_complete(root: Path) -> Path | None:
    for step, folder in reversed(checkpoints(root)):
        if is_complete(step, folder):
            return folder
    return None


def mark_complete(step: int, folder: Path) -> None:
    """Rank 0, after every rank has written its part."""
    files = _files(folder)
    for rel in files:
        with open(folder / rel, "rb") as f:
            os.fsync(f.fileno())
    for root, dirs, _ in os.walk(folder):
        for d in dirs:
            _fsync_dir(Path(root) / d)
    atomic_write_json(folder / MARKER, {"step": step, "files": files})


def _delete(folder: Path) -> None:
    try:
        (folder / MARKER).unlink()
    except FileNotFoundError:
        pass
    _fsync_dir(folder)
    shutil.rmtree(folder, ignore_errors=True)


def remove_incomplete(root: Path) -> list[Path]:
    gone = [f for s, f in checkpoints(root) if not is_complete(s, f)]
    for f in gone:
        _delete(f)
    return gone


def retain(root: Path, limit: int) -> list[Path]:
    """Keeps the newest ``limit`` complete checkpoints."""
    complete = [f for s, f in checkpoints(root) if is_complete(s, f)]
    gone = complete[:-limit] if limit > 0 else []
    for f in gone:
        _delete(f)
    return gone
