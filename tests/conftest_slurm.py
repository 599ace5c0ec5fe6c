"""The ``slurm_cluster`` fixture: one private single-node SLURM cluster per test session.

It runs ``bash slurm/cluster.sh start`` once (4 fake GPUs through GRES, ``MaxArraySize=8``,
8 logical CPUs), sets ``SLURM_CONF`` in ``os.environ`` for the session (so ``sbatch``,
``squeue`` and submitit find it), yields a :class:`SlurmCluster`, and stops it at the end.

Register it with either of:
- ``pytest_plugins = ["conftest_slurm"]`` in the rootdir ``tests/conftest.py``;
- ``from conftest_slurm import slurm_cluster  # noqa: F401`` in a test module.

Without SLURM installed (``bash slurm/cluster.sh install``) or without root the tests that use
it are skipped, unless ``CAPSFUS_SLURM_REQUIRED=1``, which turns the skip into a failure (CI).
``CAPSFUS_SLURM_DIR`` picks the cluster's folder (default ``/tmp/capsfus-slurm-pytest``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "cluster.sh"
GPUS = 4          # fake GPUs declared through GRES
MAX_ARRAY = 8     # MaxArraySize: small, so array splitting can be tested
CPUS = 8          # logical CPUs on the node (oversubscribes a 2-core machine)


@dataclass
class SlurmCluster:
    dir: Path
    conf: Path
    gpus: int = GPUS
    max_array: int = MAX_ARRAY
    cpus: int = CPUS
    script: Path = SCRIPT
    env: dict = field(default_factory=dict)        # os.environ + SLURM_CONF + CAPSFUS_SLURM_*

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a command (``sbatch``, ``squeue``, …) against this cluster."""
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True,
                              check=check, timeout=timeout)

    def sbatch(self, *args: str) -> str:
        """``sbatch --parsable ARGS``; returns the job id."""
        out = self.run("sbatch", "--parsable", *args).stdout.strip()
        return out.split(";")[0]

    def active(self, job_id: str) -> list[str]:
        """States of the job's (array) elements still in squeue; [] once all have left."""
        res = self.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False)
        if res.returncode != 0:       # "Invalid job id specified": purged already
            return []
        return res.stdout.split()

    def wait(self, job_id: str, timeout: float = 30) -> None:
        """Wait until every element of ``job_id`` has left squeue (no sacct here)."""
        deadline = time.monotonic() + timeout
        while self.active(job_id):
            if time.monotonic() > deadline:
                self.run("scancel", job_id, check=False)
                raise TimeoutError(f"job {job_id} still in squeue after {timeout}s:\n"
                                   + self.run("squeue", check=False).stdout)
            time.sleep(0.2)

    def cluster_sh(self, command: str, check: bool = True, timeout: float = 120,
                   **extra_env: str) -> subprocess.CompletedProcess:
        env = {**self.env, **extra_env}
        res = subprocess.run(["bash", str(self.script), command], env=env, capture_output=True,
                             text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise RuntimeError(f"cluster.sh {command} failed ({res.returncode}):\n"
                               f"{res.stdout}\n{res.stderr}")
        return res


def _unavailable(reason: str):
    if os.environ.get("CAPSFUS_SLURM_REQUIRED") == "1":
        pytest.fail(f"SLURM cluster required (CAPSFUS_SLURM_REQUIRED=1) but {reason}")
    pytest.skip(reason)


_shared: dict = {"cluster": None, "users": 0, "saved_conf": None}


def _start() -> SlurmCluster:
    if not all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        _unavailable("SLURM is not installed: run `bash slurm/cluster.sh install` (as root)")
    if os.geteuid() != 0:
        _unavailable("the local SLURM cluster needs root")
    folder = Path(os.environ.get("CAPSFUS_SLURM_DIR", "/tmp/capsfus-slurm-pytest"))
    cluster = SlurmCluster(dir=folder, conf=folder / "slurm.conf")
    cluster.env = {**os.environ, "SLURM_CONF": str(cluster.conf),
                   "CAPSFUS_SLURM_DIR": str(folder), "CAPSFUS_SLURM_GPUS": str(GPUS),
                   "CAPSFUS_SLURM_MAX_ARRAY": str(MAX_ARRAY), "CAPSFUS_SLURM_CPUS": str(CPUS)}
    res = cluster.cluster_sh("start", check=False)
    if res.returncode == 2:           # refused: another cluster is running / configured here
        _unavailable(f"cluster.sh refused to start:\n{res.stderr}")
    if res.returncode != 0:
        pytest.fail(f"cluster.sh start failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return cluster


@pytest.fixture(scope="session")
def slurm_cluster():
    # One cluster per session even if this fixture is registered twice (pytest_plugins in
    # conftest.py and an import in a test module give two fixture definitions).
    if _shared["cluster"] is None:
        cluster = _start()
        _shared.update(cluster=cluster, saved_conf=os.environ.get("SLURM_CONF"))
        os.environ["SLURM_CONF"] = str(cluster.conf)
    _shared["users"] += 1
    try:
        yield _shared["cluster"]
    finally:
        _shared["users"] -= 1
        if _shared["users"] == 0:
            cluster, saved = _shared["cluster"], _shared["saved_conf"]
            _shared.update(cluster=None, saved_conf=None)
            if saved is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = saved
            cluster.cluster_sh("stop", check=False)
