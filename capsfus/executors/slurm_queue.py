"""What the cluster says: ``squeue`` (never ``sacct``: many clusters have no accounting) and
``scontrol show config``. Every call has a timeout and turns failures into UserError."""

from __future__ import annotations

import re
import shutil
import subprocess
import time

from ..errors import UserError

# pending array ranges look like 1234_[5-9,12%4]
_RANGE_RE = re.compile(r"^(\d+)_\[([^\]]+)\]$")


NO_CLUSTER_HINT = ("on a SLURM login node check `scontrol ping`; for the local test cluster run "
                   "`bash slurm/cluster.sh start` and `eval \"$(bash slurm/cluster.sh env)\"`")
# what the SLURM commands say when there is no controller to talk to
_UNREACHABLE = ("Could not establish a configuration source", "Unable to contact slurm",
                "Unable to process configuration file", "Connection refused",
                "Zero Bytes were transmitted", "Socket timed out")


class NoCluster(UserError):
    """No SLURM cluster here: the commands are missing, or no controller can be reached."""


def _run(args: list[str], timeout: float = 30) -> str:
    if shutil.which(args[0]) is None:
        raise NoCluster(f"no SLURM cluster found: `{args[0]}` is not installed here; "
                        f"{NO_CLUSTER_HINT}")
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UserError(f"`{' '.join(args)}` did not answer within {timeout:.0f}s: the SLURM "
                        f"controller may be down or overloaded; try again") from None
    # scontrol may print "fatal" and still exit 0
    msg = [ln for ln in (p.stderr or p.stdout or "").strip().splitlines() if ln.strip()]
    text = "\n".join(msg)
    if any(k in text for k in _UNREACHABLE) and (p.returncode != 0 or "fatal" in text):
        last = next((ln for ln in reversed(msg) if "fatal" in ln), msg[-1])
        raise NoCluster(f"no SLURM cluster reachable (`{' '.join(args[:2])}`: {last.strip()});"
                        f" {NO_CLUSTER_HINT}")
    if p.returncode != 0:
        raise UserError(f"`{' '.join(args[:2])}` failed: {msg[-1] if msg else p.returncode}")
    return p.stdout


def expand_job_ids(token: str) -> list[str]:
    """``123_[1-3,7%2]`` -> 123_1 123_2 123_3 123_7; other ids come back unchanged."""
    m = _RANGE_RE.match(token)
    if not m:
        return [token]
    base, spec = m.group(1), m.group(2).split("%")[0]
    out = []
    for part in spec.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            out += [f"{base}_{i}" for i in range(int(lo), int(hi) + 1)]
        elif part:
            out.append(f"{base}_{part}")
    return out


def squeue(job_ids: list[str] | None = None, name: str | None = None) -> dict[str, str]:
    """{job id: state} for jobs still known to squeue (array elements expanded)."""
    args = ["squeue", "-h", "-o", "%i|%T|%j"]
    if job_ids:
        bases = sorted({j.split("_")[0] for j in job_ids})
        args += ["-j", ",".join(bases)]
    if name:
        args += ["--name", name]
    try:
        out = _run(args)
    except UserError as e:
        # squeue -j with only finished jobs answers "Invalid job id specified"
        if "Invalid job id" in str(e):
            return {}
        raise
    states = {}
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 2:
            continue
        for jid in expand_job_ids(parts[0]):
            states[jid] = parts[1]
    return states


class JobLiveness:
    """``alive(job_id)`` for lease checks, from one squeue call cached for ``ttl`` seconds.
    Unknown (squeue failing) answers None, so a lease is then judged by its heartbeat only."""

    def __init__(self, ttl: float = 30.0):
        self.ttl = ttl
        self._at = 0.0
        self._states: dict[str, str] | None = None

    def __call__(self, job_id: str) -> bool | None:
        if self._states is None or time.time() - self._at > self.ttl:
            try:
                self._states = squeue()
            except UserError:
                self._states = None
            self._at = time.time()
        if self._states is None:
            return None
        return self._states.get(job_id, "") in ("RUNNING", "COMPLETING", "CONFIGURING",
                                               "PENDING", "REQUEUED", "RESIZING", "SUSPENDED")


def max_array_size() -> int:
    """The cluster's MaxArraySize: array indices must stay below it."""
    out = _run(["scontrol", "show", "config"])
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.M)
    return int(m.group(1)) if m else 1001


def scancel(job_ids: list[str]) -> None:
    if job_ids:
        _run(["scancel", *job_ids])
