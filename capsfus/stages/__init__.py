"""Stages: caption, teacher, fuse, filter. Each is a *job*: plain, picklable data that an
executor hands to workers (the protocol is ``rundir.job.StageJob``)."""

from __future__ import annotations

from ..rundir.job import StageJob


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
