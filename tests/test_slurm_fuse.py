"""`capsfus submit fuse`, `resume`, `status`, `cancel` against a real single-node SLURM cluster
(slurm/cluster.sh: 4 fake GPUs through GRES, MaxArraySize=8, 8 logical CPUs)."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
from runhelp import REPO, assert_exactly_once, capsfus, echo_log_counts, write_rows

from capsfus.executors.slurm import submissions, submitted_job_ids
from capsfus.rundir.manifest import Run
from capsfus.rundir.stage import StageDir

pytestmark = pytest.mark.slurm


def make_run(tmp: Path, n: int, per_shard: int, name: str = "run") -> Path:
    run = tmp / name
    capsfus("shard", write_rows(tmp / f"{name}.jsonl", n), "--out", run,
            "--rows-per-shard", per_shard)
    return run


def wait_jobs(cluster, run: Path, stage: str = "fuse", timeout: float = 120) -> None:
    """Until no job of the run's submissions (there must be some) is left in squeue."""
    assert submitted_job_ids(run / stage)
    wait_gone(cluster, run, stage, timeout)


def wait_gone(cluster, run: Path, stage: str = "fuse", timeout: float = 120) -> None:
    """Until no job of the run's submissions is left in squeue (scancelled after timeout)."""
    deadline = time.time() + timeout
    while True:
        bases = sorted({i.split("_")[0] for i in submitted_job_ids(run / stage)})
        if not any(cluster.active(b) for b in bases):
            return
        if time.time() > deadline:
            cluster.run("scancel", *bases, check=False)
            raise TimeoutError(cluster.run("squeue", check=False).stdout)
        time.sleep(0.3)


def worker_summaries(run: Path, stage: str = "fuse") -> list[dict]:
    return [json.loads(p.read_text()) for p in (run / stage / "logs").glob("worker-*.json")]


def states(run: Path, stage: str = "fuse") -> dict[int, dict]:
    return StageDir(Run(run), stage).all_states()


def test_submit_fuse_on_fake_gpus_exactly_once_one_device_each(slurm_cluster, tmp_path):
    run = make_run(tmp_path, n=240, per_shard=20)  # 12 shards
    log = tmp_path / "echo.log"
    p = capsfus("submit", "fuse", run, "--engine", "echo", "--chunk-size", 5, "--nodes", 1,
                "--gpus-per-node", 4, "--cpus-per-gpu", 1, "--time", "00:10:00",
                CAPSFUS_ECHO_LOG=log, CAPSFUS_ECHO_SLEEP=0.005, SLURM_CONF=slurm_cluster.conf)
    assert "4 worker(s)" in p.stdout + p.stderr
    st = json.loads(capsfus("status", run, "--json", SLURM_CONF=slurm_cluster.conf).stdout)
    assert st["stages"][0]["slurm"]["submitted"] == 4
    wait_jobs(slurm_cluster, run)
    out, rej = assert_exactly_once(run)
    assert len(out) == 240 and not rej
    counts = echo_log_counts(log)
    assert len(counts) == 240 and max(counts.values()) == 1  # nothing generated twice
    devices = [w["cuda_visible_devices"] for w in worker_summaries(run)]
    assert len(devices) == 4
    assert all(d is not None and "," not in d for d in devices), devices
    assert len(set(devices)) == 4, devices   # each worker saw only its own GPU


def test_scancel_and_kill9_then_resume_redoes_only_unfinished(slurm_cluster, tmp_path):
    run = make_run(tmp_path, n=320, per_shard=20)  # 16 shards
    log = tmp_path / "echo.log"
    env = dict(CAPSFUS_ECHO_LOG=log, CAPSFUS_ECHO_SLEEP=0.05, SLURM_CONF=slurm_cluster.conf)
    capsfus("submit", "fuse", run, "--engine", "echo", "--chunk-size", 5, "--nodes", 4,
            "--gpus-per-node", 0, "--time", "00:10:00", "--lease-ttl", 30, **env)
    elements = submitted_job_ids(run / "fuse")
    assert len(elements) == 4
    # let some shards finish, then kill -9 one worker's process and scancel the others
    deadline = time.time() + 60
    while sum(s.get("status") == "done" for s in states(run).values()) < 4:
        assert time.time() < deadline, "no progress"
        time.sleep(0.1)
    victim = None
    for lease_file in (run / "fuse" / "leases").glob("*.json"):
        d = json.loads(lease_file.read_text() or "{}")
        if d.get("job_id") == elements[2] and not d.get("released"):
            victim = d["pid"]
    assert victim, "worker 2 holds no shard"
    os.kill(victim, signal.SIGKILL)
    slurm_cluster.run("scancel", elements[0], elements[1], elements[3])
    wait_jobs(slurm_cluster, run)
    before = {i: s for i, s in states(run).items()}
    done_before = {i for i, s in before.items() if s["status"] == "done"}
    assert len(done_before) < 16, "everything finished before the faults: test is too fast"
    gen_before = echo_log_counts(log)
    p = capsfus("resume", run, **env)
    assert "submitted" in p.stdout + p.stderr
    rec = submissions(run / "fuse")[-1]
    assert rec["shards"] == 16 - len(done_before)      # only unfinished shards
    assert rec["workers"] <= rec["shards"]
    wait_jobs(slurm_cluster, run)
    out, rej = assert_exactly_once(run)
    assert len(out) + len(rej) == 320
    after = echo_log_counts(log)
    # rows of shards done before the resume were not generated again
    done_ids = {r["id"] for r in out if int(r["id"].split(":")[1]) // 20 in done_before}
    assert done_ids
    assert sum(after.values()) - sum(gen_before.values()) <= (16 - len(done_before)) * 20
    for i in done_before:
        assert states(run)[i]["final"] == before[i]["final"]  # untouched


def test_max_array_size_splits_arrays_and_holds_concurrency(slurm_cluster, tmp_path):
    run = make_run(tmp_path, n=120, per_shard=10)  # 12 shards
    p = capsfus("submit", "fuse", run, "--engine", "echo", "--nodes", 12, "--gpus-per-node", 0,
                "--time", "00:10:00", SLURM_CONF=slurm_cluster.conf)
    rec = submissions(run / "fuse")[-1]
    assert rec["max_array_size"] == slurm_cluster.max_array
    sizes = [a["size"] for a in rec["arrays"]]
    assert sizes == [6, 6] and sum(a["throttle"] for a in rec["arrays"]) == 12
    assert "2 array(s)" in p.stdout + p.stderr
    # the throttle SLURM holds is the one we asked for
    for a in rec["arrays"]:
        out = slurm_cluster.run("scontrol", "show", "job", a["job_id"], check=False).stdout
        if out:
            m = re.search(r"ArrayTaskThrottle=(\d+)", out)
            assert m is None or int(m.group(1)) == a["throttle"]
    wait_jobs(slurm_cluster, run)
    assert_exactly_once(run)


def test_two_overlapping_submissions_never_process_a_shard_twice(slurm_cluster, tmp_path):
    run = make_run(tmp_path, n=160, per_shard=20)  # 8 shards
    log = tmp_path / "echo.log"
    env = dict(CAPSFUS_ECHO_LOG=log, CAPSFUS_ECHO_SLEEP=0.005, SLURM_CONF=slurm_cluster.conf)
    for _ in range(2):
        capsfus("submit", "fuse", run, "--engine", "echo", "--chunk-size", 5, "--nodes", 3,
                "--gpus-per-node", 0, "--time", "00:10:00", **env)
    wait_jobs(slurm_cluster, run)
    assert_exactly_once(run)
    counts = echo_log_counts(log)
    assert len(counts) == 160 and max(counts.values()) == 1


def test_scontrol_requeue_resumes_from_last_chunk(slurm_cluster, tmp_path):
    run = make_run(tmp_path, n=200, per_shard=200)  # 1 shard
    log = tmp_path / "echo.log"
    env = dict(CAPSFUS_ECHO_LOG=log, CAPSFUS_ECHO_SLEEP=0.02, SLURM_CONF=slurm_cluster.conf)
    capsfus("submit", "fuse", run, "--engine", "echo", "--chunk-size", 10, "--nodes", 1,
            "--gpus-per-node", 0, "--time", "00:10:00", **env)
    job = submitted_job_ids(run / "fuse")[0]
    deadline = time.time() + 60
    while len((StageDir(Run(run), "fuse").read_state(0) or {}).get("chunks", [])) < 3:
        assert time.time() < deadline
        time.sleep(0.1)
    committed = StageDir(Run(run), "fuse").read_state(0)["rows_done"]
    slurm_cluster.run("scontrol", "requeue", job)
    # SLURM holds a requeued job back ~2 minutes (its BeginTime); start it now to keep the
    # test short. The worker that restarts is the same array element, as in production.
    time.sleep(0.5)
    slurm_cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
    wait_jobs(slurm_cluster, run, timeout=180)
    out, _ = assert_exactly_once(run)
    st = StageDir(Run(run), "fuse").read_state(0)
    assert st["epoch"] >= 2 and st["attempts"] >= 2
    counts = echo_log_counts(log)
    # rows committed before the requeue were not generated again (2 chunks may be in flight)
    assert sum(counts.values()) - 200 <= 2 * 10
    assert committed >= 30


def test_dry_run_16_nodes_8_gpus_matches_golden(tmp_path):
    run = make_run(tmp_path, n=1300, per_shard=10)  # 130 shards: 128 workers
    p = capsfus("submit", "fuse", run, "--engine", "vllm", "--model", "BAAI/CapsFus-LLaMA",
                "--nodes", 16, "--gpus-per-node", 8, "--partition", "gpu", "--account", "vision",
                "--qos", "normal", "--time", "2-00:00:00", "--mem", "120G", "--cpus-per-gpu", 10,
                "--slurm-arg", "constraint=a100", "--dry-run", "--max-array-size", 1001)
    text = p.stdout.replace(str(run.resolve()), "RUN").replace(os.sys.executable, "PYTHON")
    text = re.sub(r"capsfus-[0-9a-f]{8}-fuse", "capsfus-RUNID-fuse", text)
    golden = REPO / "tests" / "golden" / "submit_fuse_16x8.sbatch"
    if os.environ.get("CAPSFUS_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()
    assert not (run / "fuse").exists()  # a dry run writes nothing


def test_secrets_never_reach_the_run_dir(slurm_cluster, tmp_path):
    run = make_run(tmp_path, n=40, per_shard=20)
    secret = "hf_SECRETtoken1234567890"
    capsfus("submit", "fuse", run, "--engine", "echo", "--nodes", 1, "--gpus-per-node", 0,
            "--time", "00:05:00", HF_TOKEN=secret, OPENAI_API_KEY="sk-" + secret,
            SLURM_CONF=slurm_cluster.conf)
    wait_jobs(slurm_cluster, run)
    assert_exactly_once(run)
    for p in run.rglob("*"):
        if p.is_file():
            assert secret.encode() not in p.read_bytes(), p


def test_a_cluster_that_says_no_gives_one_clear_line(slurm_cluster, tmp_path):
    run = make_run(tmp_path, n=20, per_shard=10)
    p = capsfus("submit", "fuse", run, "--engine", "echo", "--partition", "no-such-partition",
                check=False, SLURM_CONF=slurm_cluster.conf)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "sbatch refused" in p.stderr and "partition" in p.stderr.lower()
    p = capsfus("resume", run, check=False, SLURM_CONF=slurm_cluster.conf)
    assert p.returncode == 2 and "no SLURM submission recorded" in p.stderr


def test_failed_shard_shows_in_status_with_its_log_and_resume_dry_run(slurm_cluster, tmp_path):
    run = make_run(tmp_path, n=40, per_shard=10)  # 4 shards
    shard1 = run / "input" / "out" / "00001.jsonl.zst"
    shard1.write_bytes(shard1.read_bytes()[:-7])  # corrupt: its checksum no longer matches
    capsfus("submit", "fuse", run, "--engine", "echo", "--nodes", 2, "--gpus-per-node", 0,
            "--time", "00:05:00", SLURM_CONF=slurm_cluster.conf)
    wait_jobs(slurm_cluster, run)
    st = json.loads(capsfus("status", run, "--json", SLURM_CONF=slurm_cluster.conf).stdout)
    s = st["stages"][0]
    assert s["counts"]["done"] == 3 and s["counts"]["failed"] == 1
    failed = s["failed"][0]
    assert failed["shard"] == 1 and "checksum" in failed["error"]
    assert failed["log_tail"] and any("checksum" in line for line in failed["log_tail"])
    text = capsfus("status", run, SLURM_CONF=slurm_cluster.conf).stdout
    assert "shard 1 failed" in text and "checksum" in text
    logs = capsfus("logs", run, 1, SLURM_CONF=slurm_cluster.conf).stdout
    assert "checksum" in logs and "==>" in logs
    p = capsfus("resume", run, "--dry-run", SLURM_CONF=slurm_cluster.conf)
    assert "1 shard(s) to do, 1 worker(s)" in " ".join((p.stdout + p.stderr).split())
    assert len(submissions(run / "fuse")) == 1  # a dry run records nothing


def test_sigusr2_checkpoints_requeues_and_continues(slurm_cluster, tmp_path):
    """Preemption / time limit: SIGUSR2 -> submitit checkpoint -> the shard is given back and
    the same element requeued; it continues after the last committed chunk."""
    run = make_run(tmp_path, n=200, per_shard=200)
    log = tmp_path / "echo.log"
    env = dict(CAPSFUS_ECHO_LOG=log, CAPSFUS_ECHO_SLEEP=0.02, SLURM_CONF=slurm_cluster.conf)
    capsfus("submit", "fuse", run, "--engine", "echo", "--chunk-size", 10, "--nodes", 1,
            "--gpus-per-node", 0, "--time", "00:10:00", **env)
    job = submitted_job_ids(run / "fuse")[0]
    stage = StageDir(Run(run), "fuse")
    deadline = time.time() + 60
    while len((stage.read_state(0) or {}).get("chunks", [])) < 3:
        assert time.time() < deadline
        time.sleep(0.1)
    slurm_cluster.run("scancel", "--signal=USR2", job)
    deadline = time.time() + 30
    while True:  # the lease is released at once, not left to expire
        lease = json.loads(sorted((run / "fuse" / "leases").glob("00000.e*.json"))[-1]
                           .read_text())
        if lease.get("released"):
            break
        assert time.time() < deadline, lease
        time.sleep(0.1)
    time.sleep(0.5)
    slurm_cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
    wait_jobs(slurm_cluster, run, timeout=120)
    assert_exactly_once(run)
    st = stage.read_state(0)
    assert st["epoch"] >= 2
    assert sum(echo_log_counts(log).values()) - 200 <= 2 * 10
    out_log = next((run / "fuse" / "slurm").rglob("*_log.out")).read_text()
    assert "USR2" in out_log


def test_transformers_engine_on_slurm_with_a_tiny_model(slurm_cluster, tmp_path, tiny_llama_dir):
    """One scenario with a real model: 2 GPU-bound workers (fake GPUs, so CPU torch), the
    same output as a local run of the same settings."""
    run = make_run(tmp_path, n=24, per_shard=6)
    local = make_run(tmp_path, n=24, per_shard=6, name="local")
    flags = ["--engine", "transformers", "--model", tiny_llama_dir, "--max-new-tokens", 6,
             "--chunk-size", 3, "--batch-size", 3]
    capsfus("submit", "fuse", run, *flags, "--nodes", 1, "--gpus-per-node", 2,
            "--cpus-per-gpu", 1, "--time", "00:10:00", SLURM_CONF=slurm_cluster.conf)
    wait_jobs(slurm_cluster, run, timeout=240)
    out, rej = assert_exactly_once(run)
    capsfus("fuse", local, *flags)
    ref, _ = assert_exactly_once(local)
    assert {r["id"].split(":")[1]: r["fused"] for r in out} == \
        {r["id"].split(":")[1]: r["fused"] for r in ref}
    summaries = worker_summaries(run)
    assert len(summaries) == 2
    assert all(w["engine"]["engine"] == "transformers" for w in summaries)
    assert {w["cuda_visible_devices"] for w in summaries} == {"0", "1"}
    cfg = json.loads((run / "fuse" / "config.json").read_text())
    assert cfg["settings"]["revision"].startswith("local:")


def test_submit_filter_runs_the_same_machinery(slurm_cluster, tmp_path):
    """Every stage goes through the same executor: filter on SLURM, then resume of it."""
    run = make_run(tmp_path, n=60, per_shard=10)
    capsfus("fuse", run, "--engine", "echo")
    capsfus("submit", "filter", run, "--nodes", 2, "--gpus-per-node", 0, "--chunk-size", 4,
            "--time", "00:05:00", SLURM_CONF=slurm_cluster.conf)
    wait_jobs(slurm_cluster, run, stage="filter")
    out, rej = assert_exactly_once(run, "filter")
    assert len(out) + len(rej) == 60
    p = capsfus("resume", run, "--stage", "filter", SLURM_CONF=slurm_cluster.conf)
    assert "nothing to resume" in p.stdout + p.stderr
    capsfus("filter", run)  # finished shards: a no-op that writes the report
    report = json.loads((run / "filter" / "report.json").read_text())
    assert report
