"""``capsfus submit train`` on the local SLURM cluster: one job of 2 tasks (one per fake GPU),
the torch distributed environment from SLURM, DeepSpeed ZeRO-3 over gloo; then the same job
requeued by SIGUSR2 (as at a time limit or on preemption) resumes from its latest complete
checkpoint.

Run under the shared lock: ``flock /tmp/capsfus-slurm.lock env OMP_NUM_THREADS=1
python -m pytest tests/test_train_slurm.py -m slurm -x -q``.
"""

from __future__ import annotations

import json
import time

import pytest
from runhelp import capsfus
from test_train import (
    _stepped_past_a_checkpoint,
    assert_redone_steps_identical,
    fusion_rows,
    read_log,
    write_config,
    write_jsonl,
)


def _wait_for(pred, timeout: float, what: str, cluster=None, job=None):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            if cluster and job:
                cluster.run("scancel", job, check=False)
            raise TimeoutError(what)
        time.sleep(0.2)


def _start_requeued_now(cluster, job: str, timeout: float = 120) -> None:
    """SLURM holds a requeued job back ~2 minutes (BeginTime); once it is pending again, let
    it start at once (as test_slurm_fuse does), so the test does not sit out the delay."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = cluster.active(job)
        if not states:
            raise AssertionError(f"job {job} left the queue instead of being requeued")
        if states == ["PENDING"]:
            show = cluster.run("scontrol", "show", "job", job, check=False).stdout
            assert "Restarts=0" not in show, show      # requeued, not a fresh pending job
            cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
            return
        time.sleep(0.2)
    cluster.run("scancel", job, check=False)
    raise TimeoutError(f"job {job} was not requeued")


@pytest.mark.slurm
@pytest.mark.slow
def test_submit_train_two_tasks_gloo_requeue_resumes(slurm_cluster, tmp_path, tiny_llama_dir):
    steps = 40   # ~5 s of steps after the first checkpoint: room for the signal to land
    src = write_jsonl(tmp_path / "rows.jsonl", fusion_rows())
    cfg = write_config(tmp_path / "tiny.yaml", global_batch_size=4, per_device_batch_size=2,
                       max_steps=steps, learning_rate=2e-3, warmup_steps=3, eval_fraction=0.1,
                       save_steps=4, save_total_limit=2, eval_steps=100, logging_steps=1,
                       samples_per_eval=0, deepspeed="jobs/deepspeed-zero3.json")
    out = tmp_path / "out"
    p = capsfus("submit", "train", "--data", src, "--base-model", tiny_llama_dir, "--config",
                cfg, "--output", out, "--nodes", 1, "--gpus-per-node", 2, "--cpus-per-gpu", 1,
                "--time", "00:20:00", SLURM_CONF=slurm_cluster.conf)
    job = json.loads(next((out / "submissions").glob("*.json")).read_text())["job_id"]
    assert f"submitted job {job}" in p.stderr

    # once a checkpoint is complete and a step past it taken, SIGUSR2 the job: submitit
    # requeues it
    _wait_for(lambda: _stepped_past_a_checkpoint(out), 400, "no complete checkpoint",
              slurm_cluster, job)
    assert not (out / "model").exists()
    slurm_cluster.run("scancel", "--signal=USR2", job, check=False)
    _start_requeued_now(slurm_cluster, job)
    slurm_cluster.wait(job, timeout=400)

    info = json.loads((out / "model" / "capsfus_training.json").read_text())
    assert info["world_size"] == 2 and info["global_step"] == steps
    log = read_log(out)
    starts = [e for e in log if e.get("event") == "start"]
    assert len(starts) == 2 and all(s["world_size"] == 2 for s in starts)
    assert starts[0]["resume_from"] is None and starts[1]["resume_from"] is not None
    # the requeued job continued from its checkpoint's step, not from 0 and not past it
    resumed_step = int(starts[1]["resume_from"].split("-")[1])
    first = log[:log.index(starts[1])]
    assert 4 <= resumed_step <= max(e.get("step", 0) for e in first)
    second = log[log.index(starts[1]) + 1:]
    assert [e["step"] for e in second if "loss" in e] == list(range(resumed_step + 1, steps + 1))
    assert_redone_steps_identical(log)
    # both tasks ran in the job's folder, one rank each; rank 0 caught the signal
    logs = "".join(f.read_text(errors="replace") for f in (out / "slurm").rglob("*.out"))
    errs = "".join(f.read_text(errors="replace") for f in (out / "slurm").rglob("*.err"))
    assert "rank0" in logs and "resuming from" in logs
    assert "Caught signal SIGUSR2" in logs + errs
