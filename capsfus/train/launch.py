"""Starting the ranks: here (``capsfus train --nproc N``) or as SLURM tasks (``capsfus submit
train``, one task per GPU). Either way each rank runs ``trainer.main(OUTPUT)`` with the torch
distributed environment set: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE.

Local ranks are child processes in this process's group that die with it (PR_SET_PDEATHSIG):
killing the group, or this process, leaves no rank behind; rank 0 prints to this terminal,
the others log to ``OUTPUT/logs/rankN.log``. If one rank fails the others are stopped.

On SLURM, SIGUSR2 (time limit or preemption notice) makes submitit call
``TrainTask.checkpoint``: the job is requeued and the same command resumes from the latest
complete checkpoint (at most ``save_steps`` of work is redone). SIGTERM (scancel, preemption)
exits at once; a preempted job with requeue does the same on its next start.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``node[01-04,07],gpu5`` → ``node01``)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        return prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return head


def dist_env_from_slurm(env: dict | None = None) -> dict:
    """The torch distributed variables for this SLURM task (one task per GPU)."""
    e = os.environ if env is None else env
    job = e.get("SLURM_JOB_ID", "0")
    nodelist = e.get("SLURM_JOB_NODELIST") or e.get("SLURM_NODELIST") or "localhost"
    ntasks = e.get("SLURM_NTASKS") or "1"
    local_world = (e.get("SLURM_NTASKS_PER_NODE") or e.get("SLURM_TASKS_PER_NODE") or "1")
    local_world = local_world.split("(")[0].split(",")[0]
    # never MASTER_ADDR/PORT from the environment: sbatch exports the submitting shell's, and
    # a "localhost" from there sends the ranks of other nodes looking for rank 0 on themselves
    return {"MASTER_ADDR": _first_host(nodelist),
            # the same port on every task, from the job id (requeues keep the id: the old
            # processes are gone by then)
            "MASTER_PORT": str(20000 + zlib.crc32(job.encode()) % 20000),
            "RANK": e.get("SLURM_PROCID", "0"), "WORLD_SIZE": ntasks,
            "LOCAL_RANK": e.get("SLURM_LOCALID", "0"), "LOCAL_WORLD_SIZE": local_world}


def _die_with_parent() -> None:
    from ..executors.local import die_with_parent
    die_with_parent()


def run_local(output: Path, nproc: int, quiet_rank0: bool = False) -> int:
    """Runs ``nproc`` ranks here; returns the first non-zero exit code (or 0)."""
    logs = Path(output) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
            "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
            "PYTHONUNBUFFERED": "1"}
    procs = []
    files = []
    for r in range(nproc):
        env = {**base, "RANK": str(r), "LOCAL_RANK": str(r)}
        if r == 0 and not quiet_rank0:
            out = None
        else:
            out = open(logs / f"rank{r}.log", "ab")
            files.append(out)
        procs.append(subprocess.Popen([sys.executable, "-m", "capsfus.train.trainer",
                                       str(output)], env=env, stdout=out, stderr=out,
                                      preexec_fn=_die_with_parent))

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)
    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = 0
        while any(p.poll() is None for p in procs):
            bad = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if bad:
                code = bad[0]
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
                deadline = time.time() + 30
                while time.time() < deadline and any(p.poll() is None for p in procs):
                    time.sleep(0.2)
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                break
            time.sleep(0.2)
        for p in procs:
            p.wait()
        return code or next((p.returncode for p in procs if p.returncode), 0)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for f in files:
            f.close()


class TrainTask:
    """What each SLURM task runs (pickled by submitit: a path, nothing secret)."""

    def __init__(self, output: str):
        self.output = output

    def __call__(self) -> int:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        os.environ.update(dist_env_from_slurm())
        from .trainer import main
        code = main(self.output)
        if code:
            raise RuntimeError(f"training exited with {code}")
        return code

    def checkpoint(self, *args, **kwargs):
        """SIGUSR2: requeue; the requeued job resumes from the latest complete checkpoint."""
        import submitit
        return submitit.helpers.DelayedSubmission(TrainTask(self.output))


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)
