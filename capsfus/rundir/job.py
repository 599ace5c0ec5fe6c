"""A stage job as executors see it: plain, picklable data with a small protocol.

A job has ``run_dir``, ``stage`` (its folder name), ``chunk_size``, and:
- ``resolve(run) -> (job, input_stage, settings)``: done once before workers start (resolve a
  model's revision, choose the input stage); ``settings`` are the output-shaping ones;
- ``open() -> Opened``: in each worker, once (load the model): the processor plus what to
  record about it;
- ``to_dict()`` / ``from_dict()``: for submission records, so ``resume`` can rebuild it.

The protocol lives here, beside the runner that drives it, so executors know stage jobs only
through it and never import a stage (or the engines a stage loads).
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
