"""A stage's folder: its config (the settings rule), per-shard state files and trusted files.

```
RUN/<stage>/config.json            input stage, output-shaping settings + their hash, run id
RUN/<stage>/state/00000.json       status, rows done, trusted chunk files with checksums,
                                   epoch, attempts, timings, last error
RUN/<stage>/leases/00000.e…json    see lease.py
RUN/<stage>/out/00000/…            chunk files c<start>-<end>.e<epoch>.jsonl.zst, compacted to
                                   shard.e<epoch>.jsonl.zst when the shard is done
RUN/<stage>/rejected/00000/…       the same for rows the stage refused (each with a reason)
RUN/<stage>/logs/…                 per worker
```
A file is trusted only when the shard's state lists it with a matching sha256 and the
current settings hash. The state file is written (atomically) only by the lease holder after
its fencing check.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Iterator

from .. import SCHEMA_VERSION
from ..errors import UserError
from .io import CorruptFile, atomic_write_json, iter_jsonl_zst, read_json, verify_file
from .manifest import Run


def settings_hash(settings: dict) -> str:
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


class StageDir:
    def __init__(self, run: Run, name: str):
        self.run = run
        self.name = name
        self.root = run.stage_dir(name)

    # --- config and the settings rule ----------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.root / "config.json"

    def config(self) -> dict | None:
        return read_json(self.config_path) if self.config_path.exists() else None

    def settings_hash(self) -> str | None:
        c = self.config()
        return c["settings_hash"] if c else None

    def ensure_config(self, run_id: str, input_stage: str, settings: dict, force: bool,
                      tmp_dir: Path | None = None) -> str:
        """Writes the config, or checks the existing one. Output-shaping settings are fixed per
        stage: a change needs ``force`` (then chunks made with the old settings are redone).
        Returns the settings hash. ``tmp_dir``: a lease token the write must go through."""
        h = settings_hash(settings)
        old = self.config()
        if old is not None:
            if old.get("run_id") != run_id:
                raise UserError(f"{self.root} belongs to another run ({old.get('run_id', '?')[:8]}"
                                f", this run is {run_id[:8]}); it was copied from elsewhere: "
                                f"remove it or use another run directory")
            if old["settings_hash"] == h and old.get("input_stage") == input_stage:
                return h
            if not force:
                changes = _diff(old.get("settings", {}), settings)
                if old.get("input_stage") != input_stage:
                    changes.append(f"input_stage: {old.get('input_stage')} -> {input_stage}")
                raise UserError(
                    f"stage {self.name} was made with other settings ("
                    f"{'; '.join(changes[:4])}{' …' if len(changes) > 4 else ''}). "
                    f"Rerun with --force to redo it with the new settings, or use --tag NAME "
                    f"to keep both fusions side by side")
        atomic_write_json(self.config_path, {
            "stage": self.name, "run_id": run_id, "input_stage": input_stage,
            "settings": settings, "settings_hash": h, "schema_version": SCHEMA_VERSION,
            "updated": time.time()}, tmp_dir=tmp_dir)
        return h

    # --- state ---------------------------------------------------------------------------
    def state_path(self, shard: int) -> Path:
        return self.root / "state" / f"{shard:05d}.json"

    def read_state(self, shard: int) -> dict | None:
        try:
            return read_json(self.state_path(shard))
        except FileNotFoundError:
            return None
        except ValueError:
            return None  # cannot happen with atomic writes, but never crash a reader on it

    def all_states(self) -> dict[int, dict]:
        folder = self.root / "state"
        out = {}
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return out
        for name in names:
            if name.endswith(".json") and name[:5].isdigit() and len(name) == 10:
                st = self.read_state(int(name[:5]))
                if st is not None:
                    out[int(name[:5])] = st
        return out

    def write_state(self, shard: int, state: dict, tmp_dir: Path | None = None) -> None:
        """``tmp_dir``: the writer's lease token (lease.py), so a fenced-off writer cannot."""
        state["updated"] = time.time()
        if tmp_dir is not None:
            self.state_path(shard).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.state_path(shard), state, tmp_dir=tmp_dir)

    def out_dir(self, shard: int) -> Path:
        return self.root / "out" / f"{shard:05d}"

    def rejected_dir(self, shard: int) -> Path:
        return self.root / "rejected" / f"{shard:05d}"

    # --- trust ---------------------------------------------------------------------------
    def trusted_prefix(self, state: dict, current_hash: str,
                       input_sha: str | None = None) -> list[dict]:
        """The leading chunks of ``state`` whose files exist with matching checksums, the
        current settings and (when given) made from the current upstream output ``input_sha``:
        everything after the first bad one is redone."""
        good = []
        expect = 0
        for c in state.get("chunks", []):
            if c.get("start") != expect or c.get("settings_hash") != current_hash:
                break
            if input_sha is not None and c.get("input_sha256") != input_sha:
                break
            if not verify_file(self.out_dir(state["shard"]) / c["out"]["file"], c["out"]["sha256"]):
                break
            rej = c.get("rejected")
            if rej and not verify_file(self.rejected_dir(state["shard"]) / rej["file"],
                                       rej["sha256"]):
                break
            good.append(c)
            expect = c["end"]
        return good

    def final_is_trusted(self, state: dict, current_hash: str | None = None) -> bool:
        if state.get("status") != "done" or not state.get("final"):
            return False
        if current_hash is not None and state.get("settings_hash") != current_hash:
            return False
        f = state["final"]
        shard = state["shard"]
        return verify_file(self.out_dir(shard) / f["out"]["file"], f["out"]["sha256"]) and (
            not f.get("rejected") or verify_file(self.rejected_dir(shard) / f["rejected"]["file"],
                                                 f["rejected"]["sha256"]))

    def final_files(self, state: dict) -> set[str]:
        f = state.get("final") or {}
        return {x["file"] for x in (f.get("out"), f.get("rejected")) if x}

    def has_leftovers(self, shard: int, state: dict) -> bool:
        """True when a done shard's folders hold files its state does not list."""
        keep = self.final_files(state)
        for folder in (self.out_dir(shard), self.rejected_dir(shard)):
            if folder.exists() and any(n not in keep for n in os.listdir(folder)):
                return True
        return False

    def remove_untrusted(self, shard: int, keep: set[str], unlink=None) -> None:
        """Deletes files of a shard that its state does not list (crash leftovers, a stale
        worker's chunks). Called only by the current lease holder, with its ``Lease.remove``
        as ``unlink`` so that a holder fenced off meanwhile deletes nothing."""
        for folder in (self.out_dir(shard), self.rejected_dir(shard)):
            if not folder.exists():
                continue
            for p in folder.iterdir():
                if p.name not in keep:
                    if unlink is not None:
                        unlink(p)
                        continue
                    try:
                        p.unlink()
                    except FileNotFoundError:
                        pass

    # --- reading outputs -----------------------------------------------------------------
    def trusted_files(self, shard: int, rejected: bool = False,
                      state: dict | None = None) -> list[tuple[Path, str]]:
        """(path, sha256) of a shard's trusted outputs, in row order."""
        st = state if state is not None else self.read_state(shard)
        if not st:
            return []
        folder = self.rejected_dir(shard) if rejected else self.out_dir(shard)
        key = "rejected" if rejected else "out"
        if st.get("status") == "done" and st.get("final"):
            f = st["final"].get(key)
            return [(folder / f["file"], f["sha256"])] if f else []
        return [(folder / c[key]["file"], c[key]["sha256"]) for c in st.get("chunks", [])
                if c.get(key)]

    def iter_rows(self, shard: int, rejected: bool = False, verify: bool = True,
                  state: dict | None = None) -> Iterator[dict]:
        for path, sha in self.trusted_files(shard, rejected, state=state):
            try:
                yield from iter_jsonl_zst(path, expect_sha256=sha if verify else None)
            except CorruptFile:
                # workers' scans only stat a done shard's final file (its checksum was checked
                # when written): move a corrupt one aside so the next run sees it missing and
                # redoes the shard (its holder then deletes the .corrupt file)
                try:
                    os.replace(path, path.with_name(path.name + ".corrupt"))
                except OSError:
                    pass
                raise


def input_rows(run: Run, manifest: dict, input_stage: str, shard: int,
               expect_sha: str | None = None) -> Iterator[dict]:
    """The rows a stage reads for one shard, checksum-verified before the first row. With
    ``expect_sha``, the upstream output must still be that one (it was not redone since)."""
    if input_stage == "input":
        entry = manifest["shards"][shard]
        path = run.root / entry["file"]
        if not path.exists():
            raise CorruptFile(f"{path}: input shard is missing")
        return iter_jsonl_zst(path, expect_sha256=entry["sha256"])
    src = StageDir(run, input_stage)
    st = src.read_state(shard)
    if not st or st.get("status") != "done":
        raise UserError(f"shard {shard} of stage {input_stage} is not done yet")
    if expect_sha is not None and (st.get("final") or {}).get("out", {}).get("sha256") \
            != expect_sha:
        raise UserError(f"shard {shard} of stage {input_stage} changed while it was read: "
                        f"run the command again")
    return src.iter_rows(shard, state=st)
