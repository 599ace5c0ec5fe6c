"""Reading a run for ``capsfus export``: every accepted input row once, with what the chosen
stage (and the stages it read from) made of it, and which shards are not finished."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from ..errors import UserError
from ..rundir.manifest import Run
from ..rundir.rows import FUSED


# --------------------------------------------------------------------------- reading
@dataclass
class SourceRow:
    row: dict
    fused_ok: bool                      # the fused caption exists and the filter kept it
    why_not: str | None                 # why there is no usable fused caption
    unusable: bool = False              # the row itself is out (its image failed captioning)


def stage_of(run: Run, stage: str | None) -> str:
    if stage:
        if stage != "input" and not (run.root / stage / "config.json").exists():
            raise UserError(f"--stage {stage}: no such stage in {run.root} (stages: "
                            f"{', '.join(run.stages()) or 'none'})")
        return stage
    for base in ("filter", "fuse"):
        if (run.root / base / "config.json").exists():
            return base
    return "input"


def not_done(sd, shards: int) -> list[int]:
    states = sd.all_states()
    return [i for i in range(shards) if states.get(i, {}).get("status") != "done"]


def finish_command(run: Run, stage: str) -> str:
    """The local command that finishes ``stage`` (``fuse@x`` -> ``capsfus fuse RUN --tag x``)."""
    base, _, tag = stage.partition("@")
    return f"capsfus {base} {run.root}" + (f" --tag {tag}" if tag else "")


def _unfinished_error(sd, todo: list[int], shards: int) -> UserError:
    return UserError(
        f"stage {sd.name}: {len(todo)} of {shards} shard(s) are not done (first: {todo[0]}). "
        f"Finish them first: here with `{finish_command(sd.run, sd.name)}` (the command that "
        f"made the stage: it goes on where it stopped), or on SLURM with `capsfus resume "
        f"{sd.run.root} --stage {sd.name}` (`capsfus status {sd.run.root}` shows which); or "
        f"export the finished shards only with --allow-partial")


class RowReader:
    """Every accepted input row of a run, once, with what the chosen stage made of it."""

    def __init__(self, run: Run, stage: str, allow_partial: bool = False):
        from ..rundir.stage import StageDir
        self.run = run
        self.stage = stage
        self.manifest = run.manifest()
        self.n_shards = len(self.manifest["shards"])
        self.base = stage.split("@")[0]
        self.fused_key = FUSED
        self.chain: list[StageDir] = []          # the stage, then the stages it read from
        # shard -> the stage that has not finished it (with allow_partial; else an error)
        self.unfinished: dict[int, str] = {}
        name = stage
        while name != "input":
            sd = StageDir(run, name)
            cfg = sd.config() or {}
            todo = not_done(sd, self.n_shards)
            if todo and not allow_partial:
                raise _unfinished_error(sd, todo, self.n_shards)
            for i in todo:
                self.unfinished.setdefault(i, sd.name)
            self.chain.append(sd)
            if name.split("@")[0] == "filter":
                self.fused_key = (cfg.get("settings") or {}).get("fused_col", FUSED)
            name = cfg.get("input_stage") or "input"
        from ..rundir.fresh import stale_message
        stale = stale_message(run, stage, self.manifest, reading="not exported: ")
        if stale:         # done means current: never ship rows made with other settings/input
            raise UserError(stale)
        self.has_fused_stage = any(sd.name.split("@")[0] in ("fuse", "filter")
                                   for sd in self.chain)
        if self.base == "input":
            self.fused_key = None

    def describe(self) -> list[dict]:
        out = []
        for sd in self.chain:
            cfg = sd.config() or {}
            out.append({"stage": sd.name, "input_stage": cfg.get("input_stage"),
                        "settings": cfg.get("settings"),
                        "settings_hash": cfg.get("settings_hash")})
        return out

    def shard_rows(self, shard: int) -> Iterator[SourceRow]:
        from ..rundir.stage import input_rows
        if not self.chain:
            for row in input_rows(self.run, self.manifest, "input", shard):
                yield SourceRow(row, False, "no_fused_stage")
            return
        top = self.chain[0]
        fk = self.fused_key
        for row in top.iter_rows(shard):
            text = row.get(fk) if fk else None
            ok = isinstance(text, str) and bool(text.strip())
            yield SourceRow(row, ok, None if ok else "fused_empty")
        for row in top.iter_rows(shard, rejected=True):
            yield SourceRow(row, False, f"{top.name.split('@')[0]}:{row.get('reason', 'unknown')}")
        # rows an earlier stage refused never reached the top stage; a caption stage refuses
        # rows whose image is missing or broken: no caption mix can make those a pair
        for sd in self.chain[1:]:
            base = sd.name.split("@")[0]
            for row in sd.iter_rows(shard, rejected=True):
                yield SourceRow(row, False, f"{base}:{row.get('reason', 'unknown')}",
                                unusable=base == "caption")
