"""The local SLURM cluster from slurm/cluster.sh: jobs run, arrays run concurrently, fake GPUs
bind CUDA_VISIBLE_DEVICES, MaxArraySize is applied, restarts are clean, submitit works."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(60)]


def alive(pid) -> bool:
    """Running and not a zombie (an exited daemon may linger as one until init reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def read_when_done(cluster, job_id, paths):
    cluster.wait(job_id)
    missing = [p for p in paths if not p.exists()]
    assert not missing, f"job {job_id} left no {missing}"
    return [p.read_text() for p in paths]


def test_trivial_job(slurm_cluster, tmp_path):
    out = tmp_path / "hello.out"
    job = slurm_cluster.sbatch("-o", str(out), "--wrap", "echo hello from $SLURM_JOB_ID")
    (text,) = read_when_done(slurm_cluster, job, [out])
    assert text.strip() == f"hello from {job}"


def test_array_tasks_run_concurrently(slurm_cluster, tmp_path):
    # 4 one-CPU tasks on a 2-core machine: the node declares 8 logical CPUs
    script = (f"date +%s.%N > {tmp_path}/start_$SLURM_ARRAY_TASK_ID; sleep 3; "
              f"date +%s.%N > {tmp_path}/end_$SLURM_ARRAY_TASK_ID")
    job = slurm_cluster.sbatch("--array=0-3", "-c", "1", "-o", "/dev/null", "--wrap", script)
    starts = [float(t) for t in read_when_done(slurm_cluster, job,
                                               [tmp_path / f"start_{i}" for i in range(4)])]
    ends = [float((tmp_path / f"end_{i}").read_text()) for i in range(4)]
    assert max(starts) < min(ends), f"tasks did not overlap: starts {starts}, ends {ends}"


def test_fake_gpus_bind_cuda_visible_devices(slurm_cluster, tmp_path):
    # the 4 tasks hold their GPU at the same time, so each must get a different one
    script = (f"echo ${{CUDA_VISIBLE_DEVICES-unset}} > {tmp_path}/cvd_$SLURM_ARRAY_TASK_ID; "
              "sleep 2")
    job = slurm_cluster.sbatch(f"--array=0-{slurm_cluster.gpus - 1}", "--gres=gpu:1",
                               "-o", "/dev/null", "--wrap", script)
    values = [t.strip() for t in read_when_done(
        slurm_cluster, job, [tmp_path / f"cvd_{i}" for i in range(slurm_cluster.gpus)])]
    assert "unset" not in values, (
        "SLURM did not set CUDA_VISIBLE_DEVICES for the fake GRES gpus (are the "
        f"{slurm_cluster.dir}/dev/fakegpu* files character devices?): {values}")
    assert all(re.fullmatch(r"\d+", v) for v in values), values
    assert sorted(values) == [str(i) for i in range(slurm_cluster.gpus)], values


def test_gpus_per_task_binding(slurm_cluster, tmp_path):
    out = tmp_path / "gpt.out"
    job = slurm_cluster.sbatch(
        "-n", "2", "--gpus-per-task=1", "-o", str(out), "--wrap",
        'echo batch $CUDA_VISIBLE_DEVICES; srun bash -c "echo task \\$SLURM_PROCID '
        '\\$CUDA_VISIBLE_DEVICES"')
    (text,) = read_when_done(slurm_cluster, job, [out])
    lines = dict(line.rsplit(" ", 1) for line in text.strip().splitlines())
    assert len(lines["batch"].split(",")) == 2, text
    tasks = {lines["task 0"], lines["task 1"]}
    assert len(tasks) == 2 and all(re.fullmatch(r"\d+", v) for v in tasks), text


def test_max_array_size(slurm_cluster):
    config = slurm_cluster.run("scontrol", "show", "config").stdout
    assert re.search(rf"^MaxArraySize\s*=\s*{slurm_cluster.max_array}$", config, re.M), config
    ok = slurm_cluster.sbatch("-H", f"--array=0-{slurm_cluster.max_array - 1}", "-o", "/dev/null",
                              "--wrap", "true")
    slurm_cluster.run("scancel", ok)
    too_big = slurm_cluster.run("sbatch", "-H", f"--array=0-{slurm_cluster.max_array}",
                                "-o", "/dev/null", "--wrap", "true", check=False)
    assert too_big.returncode != 0 and "array" in too_big.stderr.lower(), too_big


def test_submitit_job_array(slurm_cluster, tmp_path):
    submitit = pytest.importorskip("submitit")

    def square(x):           # local: cloudpickle ships it by value to the job
        import os
        return x * x, os.environ["SLURM_ARRAY_TASK_ID"]

    executor = submitit.AutoExecutor(folder=tmp_path / "submitit")
    executor.update_parameters(timeout_min=2, slurm_partition="debug", cpus_per_task=1,
                               slurm_array_parallelism=4)
    jobs = executor.map_array(square, range(4))
    assert len({job.job_id.split("_")[0] for job in jobs}) == 1      # one array
    results = [job.result() for job in jobs]
    assert [r[0] for r in results] == [0, 1, 4, 9]
    assert sorted(r[1] for r in results) == ["0", "1", "2", "3"]


def test_refuses_next_to_a_cluster_it_did_not_start(slurm_cluster, tmp_path):
    other = tmp_path / "other"
    res = slurm_cluster.cluster_sh("start", check=False, CAPSFUS_SLURM_DIR=str(other),
                                   SLURM_CONF=str(other / "slurm.conf"))
    assert res.returncode == 2 and "refusing" in res.stderr, res
    assert not other.exists()
    assert "UP" in slurm_cluster.run("scontrol", "ping").stdout       # ours untouched


def test_status_and_env(slurm_cluster):
    status = slurm_cluster.cluster_sh("status")
    assert "idle" in status.stdout, status.stdout
    env = slurm_cluster.cluster_sh("env").stdout.strip()
    assert env == f"export SLURM_CONF={slurm_cluster.conf}"


def test_start_again_is_idempotent_and_clean(slurm_cluster):
    # runs last in this file: it restarts the session's cluster (same settings)
    old_ctld = (slurm_cluster.dir / "run" / "slurmctld.pid").read_text().strip()
    held = [slurm_cluster.sbatch("-H", "-o", "/dev/null", "--wrap", "true") for _ in range(2)]
    (slurm_cluster.dir / "state" / "leftover").write_text("x")
    t0 = time.monotonic()
    slurm_cluster.cluster_sh("start")
    restart_s = time.monotonic() - t0
    new_ctld = (slurm_cluster.dir / "run" / "slurmctld.pid").read_text().strip()
    assert new_ctld != old_ctld
    assert not alive(old_ctld)
    assert not (slurm_cluster.dir / "state" / "leftover").exists()
    assert slurm_cluster.run("squeue", "-h").stdout.strip() == ""     # held jobs are gone
    assert slurm_cluster.run("sinfo", "-h", "-o", "%T").stdout.split() == ["idle"]
    config = slurm_cluster.run("scontrol", "show", "config").stdout
    assert re.search(rf"^MaxArraySize\s*=\s*{slurm_cluster.max_array}$", config, re.M)
    fresh = slurm_cluster.sbatch("-H", "-o", "/dev/null", "--wrap", "true")
    assert int(fresh) < int(held[-1])                                 # job ids start over
    slurm_cluster.run("scancel", fresh)
    assert restart_s < 30, restart_s
