"""SLURM at scale (issue 13, items 5-9) and dry runs / cluster errors (issue 14).

The tests without the ``slurm`` mark run the real CLI where no cluster can be found (PATH
without the SLURM commands, or no SLURM_CONF); the ``slurm`` ones use the session's local
cluster (tests/conftest_slurm.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest_slurm import slurm_cluster  # noqa: F401
from runhelp import (
    REPO,
    assert_exactly_once,
    capsfus,
    echo_log_counts,
    env,
    popen,
    write_rows,
)
from test_slurm_fuse import wait_gone

from capsfus.executors.local import _rotate, worker_number
from capsfus.executors.slurm import (
    parse_spec,
    shard_spec,
    submissions,
    submitted_job_ids,
)
from capsfus.rundir.lease import LeaseDir
from capsfus.rundir.manifest import Run
from capsfus.rundir.stage import StageDir

NO_TRACEBACK = "Traceback"


def make_run(tmp: Path, n: int, per_shard: int, name: str = "run") -> Path:
    run = tmp / name
    capsfus("shard", write_rows(tmp / f"{name}.jsonl", n), "--out", run,
            "--rows-per-shard", per_shard)
    return run


def cli_no_cluster(*args, path: str | None = None, timeout: float = 120):
    """The real CLI where no SLURM cluster is configured: no SLURM_CONF (so the SLURM
    commands find no configuration source), and with ``path`` a PATH without them at all."""
    e = env()
    e.pop("SLURM_CONF", None)
    if path is not None:
        e["PATH"] = path
    return subprocess.run([sys.executable, "-m", "capsfus.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=e, cwd=REPO)


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


# --- item 9: workers spread over the shard list --------------------------------------------
def test_worker_number_reads_the_array_task_id():
    assert worker_number("987654_17") == 17
    assert worker_number("host-1234-3") == 3
    assert worker_number("local") == 0 and worker_number("987654") == 0


def test_128_array_workers_start_at_128_different_shards():
    shards = list(range(1280))
    # without the global index: the task id of each element spreads them
    starts = [_rotate(shards, f"987654_{k}")[0] for k in range(128)]
    assert len(set(starts)) == 128, len(set(starts))
    gaps = sorted(b - a for a, b in zip(sorted(starts), sorted(starts)[1:]))
    assert gaps[0] >= 3 and gaps[-1] <= 30, (gaps[0], gaps[-1])   # even spread, ~10 apart
    # with it (what SlurmWorker passes, across split arrays): exactly evenly spaced
    starts = [_rotate(shards, "x", index=k, workers=128)[0] for k in range(128)]
    assert starts == [10 * k for k in range(128)]
    # two split arrays (task ids 0-5 twice) still start 12 workers at 12 different shards
    twelve = list(range(12))
    assert sorted(_rotate(twelve, f"{j}_{k}", index=i, workers=12)[0]
                  for i, (j, k) in enumerate([(1, k) for k in range(6)] +
                                             [(2, k) for k in range(6)])) == twelve
    # a rotation keeps every shard exactly once
    assert sorted(_rotate(shards, "987654_77")) == shards


def test_shard_spec_round_trip():
    for shards in ([], [0], [0, 1, 2, 5, 7, 8], list(range(1280)), [3, 1, 2]):
        assert parse_spec(shard_spec(shards)) == sorted(set(shards))
    assert shard_spec([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


# --- item 6: a requeued element's own old lease ------------------------------------------
def test_own_old_lease_of_a_requeued_element_is_dead(tmp_path, monkeypatch):
    """Same element (job id 777_3), another host or pid: our previous incarnation, dead even
    while squeue says the job runs (it does: it is us). Other elements' leases, and leases of a
    local pool inside one SLURM job (several workers, one job id), stay live."""
    leases = LeaseDir(tmp_path / "leases", ttl=300, job_alive=lambda job: True)
    leases.folder.mkdir()
    monkeypatch.setenv("SLURM_JOB_ID", "780")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "777")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("CAPSFUS_WORKER_ID", "777_3")

    def lease(shard, **data):
        now = time.time()
        leases.path(shard, 1).write_text(json.dumps({"shard": shard, "epoch": 1,
                                                     "heartbeat": now, **data}))
        return leases.current(shard)

    other_host = lease(0, host="node-that-died", pid=4242, job_id="777_3", worker="777_3")
    assert not leases.is_live(other_host)
    sleeper = subprocess.Popen(["sleep", "60"])          # same host, another live pid
    try:
        import socket
        same_host = lease(1, host=socket.gethostname(), pid=sleeper.pid, job_id="777_3",
                          worker="777_3")
        assert not leases.is_live(same_host)
        other_element = lease(2, host="node-b", pid=4242, job_id="777_4", worker="777_4")
        assert leases.is_live(other_element)
        pool = lease(3, host="node-b", pid=4242, job_id="777_3", worker="node-b-4242-1")
        assert leases.is_live(pool)
        monkeypatch.setenv("CAPSFUS_WORKER_ID", "node-a-99-0")   # we are a pool worker
        assert leases.is_live(other_host)
        assert leases.acquire(0) is None
        monkeypatch.setenv("CAPSFUS_WORKER_ID", "777_3")
        taken = leases.acquire(0)                                # the element takes it over
        assert taken is not None and taken.epoch == 2
        taken.release()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_idle_worker_waits_for_a_busy_shard_and_takes_it_when_its_holder_dies(tmp_path):
    """A worker that finds only busy shards waits (up to the TTL) instead of exiting: here the
    holder of shard 0 is frozen, its lease expires, and the waiting worker finishes it."""
    run = make_run(tmp_path, n=200, per_shard=100)   # 2 shards
    log = tmp_path / "echo.log"
    frozen = popen("fuse", run, "--engine", "echo", "--chunk-size", 10, "--shards", 0,
                   "--lease-ttl", 6, CAPSFUS_ECHO_SLEEP=0.02, CAPSFUS_ECHO_LOG=log)
    stage = StageDir(Run(run), "fuse")
    try:
        deadline = time.time() + 60
        while len((stage.read_state(0) or {}).get("chunks", [])) < 2:
            assert time.time() < deadline and frozen.poll() is None, "no progress"
            time.sleep(0.05)
        os.kill(frozen.pid, signal.SIGSTOP)
        t0 = time.time()
        p = capsfus("fuse", run, "--engine", "echo", "--chunk-size", 10, "--lease-ttl", 6,
                    CAPSFUS_ECHO_LOG=log)
        waited = time.time() - t0
    finally:
        os.kill(frozen.pid, signal.SIGKILL)
        frozen.wait()
    assert "2/2 shards done" in " ".join((p.stdout + p.stderr).split()), p.stderr
    assert waited < 60
    out, rej = assert_exactly_once(run)
    assert len(out) + len(rej) == 200
    # only the frozen worker's uncommitted chunks were generated twice
    assert sum(echo_log_counts(log).values()) - 200 <= 2 * 10
    summary = [json.loads(f.read_text()) for f in (run / "fuse" / "logs").glob("worker-*.json")
               if "0" in json.loads(f.read_text())["shards"]]
    assert any(s.get("waited_s", 0) > 0 for s in summary), summary


# --- item 7: a scan for work reads no final file ------------------------------------------
def test_a_scan_stats_finals_instead_of_reading_them(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import scan_reads
    finally:
        sys.path.pop(0)
    r = scan_reads.measure(64, 200, tmp_path)
    assert r["before"]["bytes_read"] >= r["final_bytes"]          # every final hashed
    # after: the state files, and nothing of the finals
    assert r["after"]["bytes_read"] < r["state_bytes"] + 64 * 1024
    assert r["after"]["bytes_read"] * 5 < r["before"]["bytes_read"]


# --- issue 14: dry runs and cluster errors ------------------------------------------------
def test_dry_run_without_slurm_prints_the_plan_and_one_line(tmp_path):
    run = make_run(tmp_path, n=40, per_shard=10)
    p = cli_no_cluster("submit", "fuse", run, "--engine", "echo", "--nodes", 2, "--dry-run",
                       path="/nonexistent")
    assert p.returncode == 0, p.stderr
    assert NO_TRACEBACK not in p.stderr
    assert "#SBATCH --array=0-1%2" in p.stdout and "submitit.core._submit" in p.stdout
    text = " ".join(p.stderr.split())
    assert "no SLURM cluster found" in text
    assert "plan: 4 shard(s) to do, 2 worker(s)" in text
    assert not (run / "fuse").exists()          # a dry run writes nothing
    # the same with SLURM installed but no cluster configured
    p = cli_no_cluster("submit", "fuse", run, "--engine", "echo", "--nodes", 2, "--dry-run")
    assert p.returncode == 0 and NO_TRACEBACK not in p.stderr, p.stderr
    assert "#SBATCH --array=0-1%2" in p.stdout
    assert "no SLURM cluster found" in " ".join(p.stderr.split())


@pytest.mark.parametrize("path", [None, "/nonexistent"], ids=["no-config", "no-commands"])
def test_real_submit_without_a_cluster_says_what_to_do(tmp_path, path):
    run = make_run(tmp_path, n=20, per_shard=10)
    p = cli_no_cluster("submit", "fuse", run, "--engine", "echo", path=path)
    assert p.returncode == 2, p.stderr
    assert NO_TRACEBACK not in p.stderr
    (line,) = error_lines(p.stderr)
    assert "no SLURM cluster" in line
    assert "bash slurm/cluster.sh start" in line
    assert 'eval "$(bash slurm/cluster.sh env)"' in line
    assert not submissions(run / "fuse")
    p = cli_no_cluster("submit", "fuse", run, "--engine", "echo", "--max-array-size", 8,
                       path=path)
    assert p.returncode == 2 and "no SLURM cluster" in p.stderr, p.stderr


def test_dry_run_plans_and_refuses_exactly_like_submit(tmp_path):
    run = make_run(tmp_path, n=40, per_shard=10)   # 4 shards
    capsfus("fuse", run, "--engine", "echo", "--shards", "0-2")
    p = cli_no_cluster("submit", "fuse", run, "--engine", "echo", "--nodes", 4, "--dry-run")
    text = " ".join(p.stderr.split())
    assert p.returncode == 0 and "plan: 1 shard(s) to do, 1 worker(s)" in text, text
    assert "3 done" in text
    config = (run / "fuse" / "config.json").read_bytes()
    # other settings: the dry run refuses as the real submit does, same line, same exit code
    dry = cli_no_cluster("submit", "fuse", run, "--engine", "echo", "--max-new-tokens", 5,
                         "--dry-run")
    real = cli_no_cluster("submit", "fuse", run, "--engine", "echo", "--max-new-tokens", 5)
    assert dry.returncode == real.returncode == 2
    assert error_lines(dry.stderr) == error_lines(real.stderr)
    (line,) = error_lines(dry.stderr)
    assert "max_new_tokens: 80 -> 5" in line and "--force" in line and "--tag" in line
    assert "#SBATCH" not in dry.stdout
    # with --force it plans every shard again, and still writes nothing
    p = cli_no_cluster("submit", "fuse", run, "--engine", "echo", "--max-new-tokens", 5,
                       "--force", "--nodes", 4, "--dry-run")
    assert p.returncode == 0 and "plan: 4 shard(s) to do" in " ".join(p.stderr.split())
    assert (run / "fuse" / "config.json").read_bytes() == config
    # a selection of done shards: nothing to plan
    p = cli_no_cluster("submit", "fuse", run, "--engine", "echo", "--shards", "0-1",
                       "--dry-run")
    assert p.returncode == 0 and "nothing to plan" in p.stderr and "#SBATCH" not in p.stdout


def test_submit_without_model_takes_the_recorded_model(tmp_path, tiny_llama_dir):
    run = make_run(tmp_path, n=8, per_shard=4)     # 2 shards
    flags = ["--max-new-tokens", 4, "--chunk-size", 4, "--batch-size", 4]
    capsfus("fuse", run, "--engine", "transformers", "--model", tiny_llama_dir,
            "--shards", 0, *flags)
    p = cli_no_cluster("submit", "fuse", run, *flags, "--dry-run")
    text = " ".join(p.stderr.split())
    assert p.returncode == 0, p.stderr
    assert f"model {tiny_llama_dir}" in text
    assert "plan: 1 shard(s) to do" in text
    assert not submissions(run / "fuse")
    # the local command too: the same model finishes the run
    p = capsfus("fuse", run, *flags)
    assert "2/2 shards done" in " ".join((p.stdout + p.stderr).split())
    assert_exactly_once(run)
    # a model given explicitly still wins (and differs: refused with the settings diff)
    p = cli_no_cluster("submit", "fuse", run, "--engine", "echo", *flags, "--dry-run")
    assert p.returncode == 2 and "engine: 'transformers' -> 'echo'" in p.stderr, p.stderr


# --- SLURM: items 5 and 8 ---------------------------------------------------------------
@pytest.mark.slurm
def test_resume_relaunches_only_the_selection_and_never_stacks(slurm_cluster, tmp_path):
    run = make_run(tmp_path, n=40, per_shard=2)    # 20 shards
    e = dict(SLURM_CONF=slurm_cluster.conf)
    later = ("--slurm-arg", "begin=now+3600")      # queued, not started
    capsfus("submit", "fuse", run, "--engine", "echo", "--shards", "0-1", "--nodes", 2,
            "--gpus-per-node", 0, "--time", "00:05:00", *later, **e)
    (rec,) = submissions(run / "fuse")
    assert rec["selection"] == "0-1" and rec["todo"] == "0-1" and rec["complete"]
    # its workers are still queued: they will take shards 0-1, so resume adds nothing
    p = capsfus("resume", run, **e)
    assert "nothing to resume" in p.stdout + p.stderr
    assert "2 covered by queued jobs" in " ".join(p.stderr.split())
    assert len(submissions(run / "fuse")) == 1
    capsfus("cancel", run, **e)
    wait_gone(slurm_cluster, run)
    p = capsfus("resume", run, "--dry-run", **e)
    assert "plan: 2 shard(s) to do, 2 worker(s)" in " ".join(p.stderr.split())
    p = capsfus("resume", run, *later, **e)
    recs = submissions(run / "fuse")
    assert len(recs) == 2 and recs[-1]["todo"] == "0-1" and recs[-1]["shards"] == 2
    p = capsfus("resume", run, **e)                # again: covered, no second array
    assert "nothing to resume" in p.stdout + p.stderr
    assert len(submissions(run / "fuse")) == 2
    capsfus("cancel", run, **e)
    wait_gone(slurm_cluster, run)
    # without the hold the resumed workers fuse the two shards, and only them
    capsfus("resume", run, "--time", "00:05:00", "--slurm-arg", "begin=now", **e)
    wait_gone(slurm_cluster, run)
    states = StageDir(Run(run), "fuse").all_states()
    assert sorted(i for i, s in states.items() if s["status"] == "done") == [0, 1]
    assert set(states) == {0, 1}


@pytest.mark.slurm
def test_a_refused_second_array_leaves_the_first_recorded(slurm_cluster, tmp_path):
    """sbatch accepts the first array and refuses the second (a wrapper on PATH fails its 2nd
    call, as a per-user job limit would); the first array runs and is tracked."""
    run = make_run(tmp_path, n=120, per_shard=10)  # 12 shards: 2 arrays of 6 (MaxArraySize 8)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    real = subprocess.run(["bash", "-c", "command -v sbatch"], capture_output=True,
                          text=True, env=slurm_cluster.env).stdout.strip()
    count = tmp_path / "sbatch-calls"
    (bindir / "sbatch").write_text(
        "#!/bin/bash\n"
        f'n=$(( $(cat {count} 2>/dev/null || echo 0) + 1 )); echo $n > {count}\n'
        'if [ "$n" -eq 2 ]; then\n'
        '  echo "sbatch: error: AssocMaxSubmitJobLimit" >&2\n'
        '  echo "sbatch: error: Batch job submission failed: Job violates accounting/QOS '
        'policy (job submit limit, user\'s size and/or time limits)" >&2\n'
        "  exit 1\nfi\n"
        f'exec {real} "$@"\n')
    (bindir / "sbatch").chmod(0o755)
    p = capsfus("submit", "fuse", run, "--engine", "echo", "--nodes", 12, "--gpus-per-node", 0,
                "--time", "00:05:00", check=False, SLURM_CONF=slurm_cluster.conf,
                PATH=f"{bindir}:{os.environ['PATH']}")
    assert p.returncode == 2 and NO_TRACEBACK not in p.stderr, p.stderr
    (line,) = error_lines(p.stderr)
    assert "refused array 2 of 2" in line and "job submit limit" in line
    (rec,) = submissions(run / "fuse")
    assert len(rec["arrays"]) == 1 and rec["arrays"][0]["job_id"] in line
    assert not rec["complete"] and "job submit limit" in rec["refused"]
    assert len(submitted_job_ids(run / "fuse")) == 6
    st = json.loads(capsfus("status", run, "--json", SLURM_CONF=slurm_cluster.conf).stdout)
    assert st["stages"][0]["slurm"]["submitted"] == 6
    (partial,) = st["stages"][0]["slurm"]["partly_refused"]
    assert partial["arrays"] == 1 and partial["planned"] == 2
    text = " ".join(capsfus("status", run, SLURM_CONF=slurm_cluster.conf).stdout.split())
    assert "1 of 2 array(s) accepted, then sbatch refused" in text
    wait_gone(slurm_cluster, run)                  # the 6 workers of array 1 do all 12 shards
    out, rej = assert_exactly_once(run)
    assert len(out) + len(rej) == 120


def test_silent_corruption_of_a_final_is_caught_by_its_reader_then_redone(tmp_path):
    """Scans no longer hash finals: a flipped byte that keeps size and mtime (bit rot) is
    found by the reader's checksum, and the next run redoes that shard (and only it)."""
    run = make_run(tmp_path, n=40, per_shard=10)
    capsfus("fuse", run, "--engine", "echo")
    stage = StageDir(Run(run), "fuse")
    final = stage.out_dir(2) / stage.read_state(2)["final"]["out"]["file"]
    st = final.stat()
    raw = bytearray(final.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    final.write_bytes(bytes(raw))
    os.utime(final, ns=(st.st_atime_ns, st.st_mtime_ns))
    log = tmp_path / "echo.log"
    p = capsfus("fuse", run, "--engine", "echo", CAPSFUS_ECHO_LOG=log)
    assert not log.exists()                      # the scan saw a done shard: nothing redone
    p = capsfus("cat", run, check=False)
    assert p.returncode == 3 and "checksum mismatch" in p.stderr and NO_TRACEBACK not in p.stderr
    p = capsfus("fuse", run, "--engine", "echo", CAPSFUS_ECHO_LOG=log)
    assert sum(echo_log_counts(log).values()) == 10   # shard 2 only
    out, rej = assert_exactly_once(run)
    assert len(out) + len(rej) == 40
    assert not list(stage.out_dir(2).glob("*.corrupt"))


@pytest.mark.slurm
def test_requeued_element_takes_over_its_own_lease_from_a_dead_node(slurm_cluster, tmp_path):
    """A node dies under an array element (its worker never releases the lease) and SLURM
    requeues the element, which keeps its job id. The lease names the same job id on another
    host, with a fresh heartbeat and the job RUNNING again in squeue: the requeued worker must
    take it over at once, not after the 300 s TTL."""
    run = make_run(tmp_path, n=200, per_shard=200)   # 1 shard
    log = tmp_path / "echo.log"
    e = dict(CAPSFUS_ECHO_LOG=log, CAPSFUS_ECHO_SLEEP=0.02, SLURM_CONF=slurm_cluster.conf)
    capsfus("submit", "fuse", run, "--engine", "echo", "--chunk-size", 10, "--nodes", 1,
            "--gpus-per-node", 0, "--time", "00:10:00", "--lease-ttl", 300, **e)
    job = submitted_job_ids(run / "fuse")[0]
    stage = StageDir(Run(run), "fuse")
    deadline = time.time() + 60
    while len((stage.read_state(0) or {}).get("chunks", [])) < 3:
        assert time.time() < deadline, "no progress"
        time.sleep(0.1)
    lease_file = sorted((run / "fuse" / "leases").glob("00000.e*.json"))[-1]
    lease = json.loads(lease_file.read_text())
    assert lease["job_id"] == lease["worker"] == job, lease
    # the node dies: the worker stops dead (no SIGTERM handler, no release) and its lease
    # says it was on another host
    os.kill(lease["pid"], signal.SIGSTOP)
    lease.update(host="node-that-died", heartbeat=time.time())
    lease_file.write_text(json.dumps(lease))
    os.kill(lease["pid"], signal.SIGKILL)
    deadline = time.time() + 30
    while True:
        r = slurm_cluster.run("scontrol", "requeue", job, check=False)
        if r.returncode == 0:
            break
        assert time.time() < deadline, r.stderr
        time.sleep(0.5)
    time.sleep(0.5)
    slurm_cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
    t0 = time.time()
    wait_gone(slurm_cluster, run, timeout=150)
    assert time.time() - t0 < 120            # well under the 300 s TTL
    out, rej = assert_exactly_once(run)
    assert len(out) + len(rej) == 200
    st = stage.read_state(0)
    assert st["epoch"] >= 2 and st["owner"]["job_id"] == job
    assert sum(echo_log_counts(log).values()) - 200 <= 2 * 10


@pytest.mark.slurm
def test_submit_from_a_host_without_srun_says_so_in_one_line(slurm_cluster, tmp_path):
    """scontrol answers (a cluster is configured) but submitit cannot find `srun`."""
    import shutil
    run = make_run(tmp_path, n=20, per_shard=10)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for cmd in ("scontrol", "squeue", "sbatch"):
        (bindir / cmd).symlink_to(shutil.which(cmd, path=slurm_cluster.env["PATH"]))
    p = capsfus("submit", "fuse", run, "--engine", "echo", check=False,
                SLURM_CONF=slurm_cluster.conf, PATH=bindir)
    assert p.returncode == 2 and NO_TRACEBACK not in p.stderr, p.stderr
    (line,) = error_lines(p.stderr)
    assert "no SLURM cluster found" in line and "srun" in line and "cluster.sh" in line
    assert not submissions(run / "fuse")


def test_train_submit_dry_run_without_slurm(tmp_path, tiny_llama_dir):
    """`submit train --dry-run` builds its sbatch script the same way: no SLURM needed."""
    from test_train import fusion_rows, write_jsonl
    src = write_jsonl(tmp_path / "rows.jsonl", fusion_rows()[:40])
    p = cli_no_cluster("submit", "train", "--data", src, "--base-model", tiny_llama_dir,
                       "--output", tmp_path / "o", "--nodes", 2, "--gpus-per-node", 8,
                       "--eval-fraction", 0.2, "--dry-run", path="/nonexistent")
    assert p.returncode == 0 and NO_TRACEBACK not in p.stderr, p.stderr[-2000:]
    assert "#SBATCH --nodes=2" in p.stdout and "#SBATCH --gres=gpu:8" in p.stdout
    assert "submitit.core._submit" in p.stdout
