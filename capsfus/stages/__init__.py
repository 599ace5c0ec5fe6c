"""Stages. Each is a *job*: plain, picklable data that an executor hands to workers.

A job has ``run_dir``, ``stage`` (its folder name), ``chunk_size``, and:
- ``resolve(run) -> (job, input_stage, settings)``: done once before workers start (resolve a
  model's revision, choose the input stage); ``settings`` are the output-shaping ones;
- ``open() -> Opened``: in each worker, once (load the model): the processor plus what to
  record about it;
- ``to_dict()`` / ``from_dict()``: for submission records, so ``resume`` can rebuild it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol


@dataclass
class Opened:
    processor: Any                      # runner.Processor
    describe: dict = field(default_factory=dict)
    runtime: dict = field(default_factory=dict)
    close: Callable[[], None] = lambda: None


class StageJob(Protocol):
    run_dir: str
    stage: str
    chunk_size: int

    def resolve(self, run) -> tuple["StageJob", str, dict]: ...
    def open(self) -> Opened: ...
    def to_dict(self) -> dict: ...


def job_from_dict(d: dict) -> StageJob:
    """Rebuilds a job from its ``to_dict()`` (the ``kind`` key says which)."""
    from ..errors import UserError
    kind = d.get("kind")
    if kind == "fuse":
        from .fuse import FuseJob
        return FuseJob.from_dict(d)
    if kind == "filter":
        from .filter import FilterJob
        return FilterJob.from_dict(d)
    if kind == "caption":
        from .caption import CaptionJob
        return CaptionJob.from_dict(d)
    raise UserError(f"a submission record names an unknown stage kind {kind!r}")
