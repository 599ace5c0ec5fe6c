"""`--engine vllm-server|sglang-server`: each worker starts its own inference server, talks to
it through the OpenAI client, restarts it once when it dies and never leaves it orphaned.
Driven through the real CLI against fake server executables with the real servers' command
lines and HTTP API (tests/fake_llm_server.py); real vLLM/SGLang are untested here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_llm_server import install
from openai_server import fusion_answer
from runhelp import REPO, assert_exactly_once, capsfus, env, write_rows

from capsfus.prompt import PromptTemplate, clean_caption


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] not in "ZX"
    except (FileNotFoundError, IndexError):
        return False


def _wait_dead(pid: int, timeout: float = 20.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.2)
    return False


def _starts(fake: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(fake.glob("start-*.json"))]


@pytest.fixture
def fake(tmp_path):
    """(fake server folder, environment with the fake `vllm` / `sglang` first)."""
    d = tmp_path / "fake"
    extra = install(tmp_path / "fakebin")
    extra.update(CAPSFUS_FAKE_SERVER_DIR=str(d), CAPSFUS_SERVER_GRACE_S="3",
                 TMPDIR=str(tmp_path / "node-tmp"))
    (tmp_path / "node-tmp").mkdir()
    return d, extra


def _run(tmp_path, n=24, per_shard=12):
    run = tmp_path / "run"
    capsfus("shard", write_rows(tmp_path / "in.jsonl", n), "--out", run,
            "--rows-per-shard", per_shard)
    return run


def _answer(row: dict) -> str:
    t = PromptTemplate()
    return fusion_answer(t.render_text(clean_caption(row["raw"]), clean_caption(row["synthetic"]))
                         + t.cue)


def test_vllm_server_engine_fuses_every_row_and_stops_its_server(tmp_path, fake, tiny_llama_dir):
    d, extra = fake
    run = _run(tmp_path)
    p = capsfus("fuse", run, "--engine", "vllm-server", "--model", tiny_llama_dir,
                "--chunk-size", 5, "--server-max-seqs", 7, "--dtype", "bfloat16",
                "--server-arg=--enforce-eager", CAPSFUS_FAKE_SERVER_START_DELAY="1.5", **extra)
    out, rej = assert_exactly_once(run)
    assert not rej and len(out) == 24
    for r in out:
        assert r["fused"] == _answer(r)
    [start] = _starts(d)
    f = start["flags"]
    assert f["model"] == str(tiny_llama_dir) and f["served_model_name"] == str(tiny_llama_dir)
    assert (f["tensor_parallel_size"], f["max_num_seqs"], f["dtype"]) == (1, 7, "bfloat16")
    assert f["enable_prefix_caching"] is True and f["unknown"] == ["--enforce-eager"]
    # per-task caches on node-local disk, the Hub cache shared and offline
    assert start["env"]["VLLM_CACHE_ROOT"].startswith(str(tmp_path / "node-tmp"))
    assert start["env"]["TRITON_CACHE_DIR"].startswith(str(tmp_path / "node-tmp"))
    assert start["env"]["HF_HUB_OFFLINE"] == "1" and start["env"]["HF_HUB_CACHE"]
    assert not list((tmp_path / "node-tmp").glob("capsfus-server-*"))   # removed at exit
    # its own process group, dead after the command (no orphan)
    assert start["pgid"] != os.getpgrp() and not _alive(start["pid"])
    logs = list((run / "fuse" / "logs").glob("server-*.log"))
    assert logs and "fake vllm server start 1" in logs[0].read_text()
    cfg = json.loads((run / "fuse" / "config.json").read_text())
    assert cfg["settings"]["engine"] == "vllm-server" and cfg["settings"]["dtype"] == "bfloat16"
    summary = json.loads(next((run / "fuse" / "logs").glob("worker-*.json")).read_text())
    assert summary["runtime"]["max_num_seqs"] == 7 and summary["runtime"]["server"] == "vllm"
    assert "Traceback" not in p.stderr


def test_sglang_server_engine_command_line(tmp_path, fake, tiny_llama_dir):
    d, extra = fake
    run = _run(tmp_path, n=6, per_shard=6)
    capsfus("fuse", run, "--engine", "sglang-server", "--model", tiny_llama_dir,
            "--no-server-prefix-caching", "--server-mem-fraction", "0.8",
            "--tensor-parallel-size", "2", **extra)
    out, _ = assert_exactly_once(run)
    assert len(out) == 6 and all(r["fused"] == _answer(r) for r in out)
    [start] = _starts(d)
    f = start["flags"]
    assert (f["model_path"], f["tp"], f["mem_fraction_static"], f["max_running_requests"]) == \
        (str(tiny_llama_dir), 2, 0.8, 256)
    assert f["disable_radix_cache"] is True and not _alive(start["pid"])


def test_tensor_parallel_follows_the_task_gpus(tmp_path, fake, tiny_llama_dir):
    d, extra = fake
    run = _run(tmp_path, n=4, per_shard=4)
    capsfus("fuse", run, "--engine", "vllm-server", "--model", tiny_llama_dir,
            CUDA_VISIBLE_DEVICES="2,3", **extra)
    [start] = _starts(d)
    assert start["flags"]["tensor_parallel_size"] == 2
    assert start["cuda_visible_devices"] == "2,3"


def test_a_server_that_never_answers_times_out_with_its_log(tmp_path, fake, tiny_llama_dir):
    d, extra = fake
    run = _run(tmp_path, n=4, per_shard=4)
    p = capsfus("fuse", run, "--engine", "vllm-server", "--model", tiny_llama_dir,
                "--server-startup-timeout", "3", check=False,
                CAPSFUS_FAKE_SERVER_NEVER_READY="1", **extra)
    assert p.returncode != 0
    assert "did not answer within 3s" in p.stderr and "still loading weights" in p.stderr
    assert "Traceback" not in p.stderr
    [start] = _starts(d)
    assert _wait_dead(start["pid"], 10)


def test_a_server_that_fails_to_start_says_why(tmp_path, fake, tiny_llama_dir):
    _, extra = fake
    run = _run(tmp_path, n=4, per_shard=4)
    p = capsfus("fuse", run, "--engine", "vllm-server", "--model", tiny_llama_dir, check=False,
                CAPSFUS_FAKE_SERVER_FAIL_START="1", **extra)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "exited with code 1 before it answered" in p.stderr
    assert "no kernel image is available" in p.stderr


def test_a_server_dying_mid_shard_is_restarted_once(tmp_path, fake, tiny_llama_dir):
    d, extra = fake
    run = _run(tmp_path)
    capsfus("fuse", run, "--engine", "vllm-server", "--model", tiny_llama_dir,
            "--chunk-size", 4, "--server-max-seqs", 2, CAPSFUS_FAKE_SERVER_CRASH="1:9", **extra)
    out, rej = assert_exactly_once(run)
    assert not rej and all(r["fused"] == _answer(r) for r in out)
    starts = _starts(d)
    assert len(starts) == 2 and starts[0]["flags"]["port"] != 0
    assert not any(_alive(s["pid"]) for s in starts)
    log = next((run / "fuse" / "logs").glob("server-*.log")).read_text()
    assert "crashing at request 9" in log and "start 2" in log


def test_a_second_death_fails_the_shard_without_rejecting_rows(tmp_path, fake, tiny_llama_dir):
    d, extra = fake
    run = _run(tmp_path, n=12, per_shard=12)
    p = capsfus("fuse", run, "--engine", "vllm-server", "--model", tiny_llama_dir,
                "--chunk-size", 4, "--server-max-seqs", 2, check=False,
                CAPSFUS_FAKE_SERVER_CRASH="1:3,2:3", **extra)
    assert p.returncode == 1
    state = json.loads((run / "fuse" / "state" / "00000.json").read_text())
    assert state["status"] == "failed" and "EngineServerDied" in state["last_error"]["message"]
    assert state["rows_rejected"] == 0 and not list((run / "fuse").glob("rejected/*/*"))
    assert len(_starts(d)) == 2 and not any(_alive(s["pid"]) for s in _starts(d))
    # the next run (a healthy server) finishes the shard: nothing lost
    capsfus("fuse", run, "--engine", "vllm-server", "--model", tiny_llama_dir,
            **{**extra, "CAPSFUS_FAKE_SERVER_DIR": str(d) + "-2"})
    out, rej = assert_exactly_once(run)
    assert len(out) == 12 and not rej


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_no_orphan_server_when_the_worker_is_killed(tmp_path, fake, tiny_llama_dir, sig):
    d, extra = fake
    run = _run(tmp_path, n=40, per_shard=40)
    proc = subprocess.Popen([sys.executable, "-m", "capsfus.cli", "fuse", str(run), "--engine",
                             "vllm-server", "--model", str(tiny_llama_dir), "--chunk-size", "2",
                             "--server-max-seqs", "1"],
                            cwd=REPO, env=env(**extra, CAPSFUS_FAKE_SERVER_START_DELAY="0.5"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (d / "requests.jsonl").exists():
            time.sleep(0.1)
        assert (d / "requests.jsonl").exists(), proc.stderr.read() if proc.poll() else ""
        [start] = _starts(d)
        assert _alive(start["pid"])
        proc.send_signal(sig)
        proc.wait(30)
        assert _wait_dead(start["pid"], 20), f"server {start['pid']} outlived its worker ({sig})"
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slurm
def test_sigusr2_on_slurm_stops_the_server_and_the_requeued_worker_finishes(
        slurm_cluster, tmp_path, fake, tiny_llama_dir):
    """A 2-GPU worker (fake GRES) runs its server with tensor parallelism 2; SIGUSR2 (time
    limit / preemption) gives the shard back, the server dies with the worker, and the
    requeued element starts a new server and finishes exactly once."""
    from test_slurm_fuse import wait_jobs

    from capsfus.executors.slurm import submitted_job_ids
    d, extra = fake
    run = _run(tmp_path, n=40, per_shard=40)
    capsfus("submit", "fuse", run, "--engine", "vllm-server", "--model", tiny_llama_dir,
            "--chunk-size", 2, "--server-max-seqs", 1, "--nodes", 1, "--gpus-per-node", 2,
            "--gpus-per-task", 2, "--cpus-per-gpu", 1, "--time", "00:10:00",
            SLURM_CONF=slurm_cluster.conf, CAPSFUS_FAKE_SERVER_DELAY="0.2", **extra)
    job = submitted_job_ids(run / "fuse")[0]
    deadline = time.time() + 120
    while len(list((run / "fuse" / "out").rglob("*.zst"))) < 2:
        assert time.time() < deadline, slurm_cluster.run("squeue", check=False).stdout
        time.sleep(0.2)
    [first] = _starts(d)
    assert first["flags"]["tensor_parallel_size"] == 2
    assert first["cuda_visible_devices"] == "0,1"
    slurm_cluster.run("scancel", "--signal=USR2", job)
    assert _wait_dead(first["pid"], 30), "the server outlived its preempted worker"
    deadline = time.time() + 150   # the requeued element waits for its begin time: skip it
    while len(_starts(d)) < 2 and time.time() < deadline:
        slurm_cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
        time.sleep(1)
    wait_jobs(slurm_cluster, run, timeout=180)
    out, rej = assert_exactly_once(run)
    assert len(out) == 40 and not rej and all(r["fused"] == _answer(r) for r in out)
    starts = _starts(d)
    assert len(starts) == 2 and not any(_alive(s["pid"]) for s in starts)
    out_log = next((run / "fuse" / "slurm").rglob("*_log.out")).read_text()
    assert "USR2" in out_log


def test_the_13b_server_preset_runs_with_a_local_model(tmp_path, fake, tiny_llama_dir):
    """jobs/fuse-capsfus-llama-13b-vllm-server.yaml is a valid preset of `fuse` (the model
    overridden by a tiny one): its server settings reach the server's command line."""
    d, extra = fake
    run = _run(tmp_path, n=4, per_shard=4)
    capsfus("fuse", run, "--preset", REPO / "jobs" / "fuse-capsfus-llama-13b-vllm-server.yaml",
            "--model", tiny_llama_dir, **extra)
    assert len(assert_exactly_once(run)[0]) == 4
    f = _starts(d)[0]["flags"]
    assert (f["max_num_seqs"], f["gpu_memory_utilization"], f["max_model_len"], f["dtype"]) == \
        (256, 0.9, 512, "bfloat16")
