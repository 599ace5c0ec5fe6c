"""Local fusion through the real CLI in real subprocesses: exactly-once under kill -9 at random
moments and at injected crash points, corrupted chunks, stale writers, the settings rule,
poison rows, and the generation log of the echo engine."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from runhelp import assert_exactly_once, capsfus, echo_log_counts, popen, write_rows

from capsfus.rundir.manifest import Run
from capsfus.rundir.stage import StageDir

N_ROWS = 600
CHUNK = 40


def make_run(tmp: Path, n: int = N_ROWS, per_shard: int = 200, name: str = "run") -> Path:
    data = write_rows(tmp / f"{name}.jsonl", n)
    run = tmp / name
    capsfus("shard", data, "--out", run, "--rows-per-shard", per_shard)
    return run


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """An uninterrupted echo fusion of the same rows: id -> fused."""
    tmp = tmp_path_factory.mktemp("ref")
    run = make_run(tmp)
    capsfus("fuse", run, "--engine", "echo", "--chunk-size", CHUNK)
    out, rej = assert_exactly_once(run)
    assert not rej
    return {r["id"]: r["fused"] for r in out}


def test_uninterrupted_run_fuses_every_row(tmp_path, reference):
    assert len(reference) == N_ROWS
    row = next(iter(reference.items()))
    # the echo engine joins synthetic and raw: the output belongs to its own row
    assert "alt text" in row[1] and "a picture of thing number" in row[1]


def _kill_loop(run: Path, log: Path, kills: int, seed: int, **env) -> int:
    """Starts the fuse command and SIGKILLs it at random moments, `kills` times."""
    rnd = random.Random(seed)
    done = 0
    for _ in range(kills):
        p = popen("fuse", run, "--engine", "echo", "--chunk-size", CHUNK,
                  CAPSFUS_ECHO_LOG=log, CAPSFUS_ECHO_SLEEP=0.002, **env)
        time.sleep(rnd.uniform(0.3, 2.0))  # interpreter start is ~0.3 s; a run ~2.5 s
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            done += 1
        p.wait()
    return done


@pytest.mark.slow
def test_kill9_at_random_moments_then_same_command_is_exactly_once(tmp_path, reference):
    run = make_run(tmp_path)
    log = tmp_path / "echo.log"
    kills = _kill_loop(run, log, kills=6, seed=1)
    capsfus("fuse", run, "--engine", "echo", "--chunk-size", CHUNK, CAPSFUS_ECHO_LOG=log)
    out, rej = assert_exactly_once(run)
    assert {r["id"]: r["fused"] for r in out} == reference  # identical to an uninterrupted run
    counts = echo_log_counts(log)
    assert len(counts) == N_ROWS
    extra = sum(counts.values()) - N_ROWS
    # at a kill, at most the chunk being generated and the one being committed are lost
    assert extra <= kills * 2 * CHUNK, (extra, kills)
    assert kills >= 1


@pytest.mark.parametrize("point", ["after_chunk_file", "after_state", "mid_compaction",
                                   "after_compaction"])
def test_injected_crash_points(tmp_path, reference, point):
    run = make_run(tmp_path)
    log = tmp_path / "echo.log"
    p = capsfus("fuse", run, "--engine", "echo", "--chunk-size", CHUNK, check=False,
                CAPSFUS_CRASH_AT=f"{point}:2", CAPSFUS_ECHO_LOG=log)
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr[-2000:])
    capsfus("fuse", run, "--engine", "echo", "--chunk-size", CHUNK, CAPSFUS_ECHO_LOG=log)
    out, _ = assert_exactly_once(run)
    assert {r["id"]: r["fused"] for r in out} == reference
    extra = sum(echo_log_counts(log).values()) - N_ROWS
    assert extra <= 2 * CHUNK
    # nothing left over that is not listed in a state file
    stage = StageDir(Run(run), "fuse")
    for shard, st in stage.all_states().items():
        listed = {st["final"]["out"]["file"]}
        assert {p.name for p in stage.out_dir(shard).iterdir()} == listed


def test_corrupted_chunk_is_detected_and_redone(tmp_path, reference):
    run = make_run(tmp_path)
    # stop in the middle of shard 0, after 3 committed chunks
    p = capsfus("fuse", run, "--engine", "echo", "--chunk-size", CHUNK, "--shards", "0",
                check=False, CAPSFUS_CRASH_AT="after_state:3")
    assert p.returncode == -signal.SIGKILL
    stage = StageDir(Run(run), "fuse")
    st = stage.read_state(0)
    assert len(st["chunks"]) == 3
    victim = stage.out_dir(0) / st["chunks"][1]["out"]["file"]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # truncated
    log = tmp_path / "echo.log"
    capsfus("fuse", run, "--engine", "echo", "--chunk-size", CHUNK, CAPSFUS_ECHO_LOG=log)
    out, _ = assert_exactly_once(run)
    assert {r["id"]: r["fused"] for r in out} == reference
    # chunk 0 stayed trusted; chunks 1 and 2 (after the bad one) were redone
    assert sum(echo_log_counts(log).values()) == N_ROWS - CHUNK


def test_corrupted_final_file_is_detected_by_cat_and_redone(tmp_path, reference):
    run = make_run(tmp_path)
    capsfus("fuse", run, "--engine", "echo", "--chunk-size", CHUNK)
    stage = StageDir(Run(run), "fuse")
    final = stage.out_dir(1) / stage.read_state(1)["final"]["out"]["file"]
    raw = bytearray(final.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte
    final.write_bytes(bytes(raw))
    p = capsfus("cat", run, check=False)
    assert p.returncode == 3 and "checksum mismatch" in p.stderr and "Traceback" not in p.stderr
    capsfus("fuse", run, "--engine", "echo", "--chunk-size", CHUNK)
    out, _ = assert_exactly_once(run)
    assert {r["id"]: r["fused"] for r in out} == reference


def test_stale_writer_with_old_epoch_is_fenced(tmp_path, reference):
    """A worker frozen past its lease TTL loses the shard; when it wakes it must not commit."""
    run = make_run(tmp_path, n=200, per_shard=200)
    stale = popen("fuse", run, "--engine", "echo", "--chunk-size", 20, "--lease-ttl", 2,
                  CAPSFUS_ECHO_SLEEP=0.01)
    stage = StageDir(Run(run), "fuse")
    deadline = time.time() + 60
    while time.time() < deadline:
        st = stage.read_state(0)
        if st and len(st.get("chunks", [])) >= 2:
            break
        time.sleep(0.05)
    stale.send_signal(signal.SIGSTOP)
    try:
        time.sleep(2.5)  # past the TTL: the frozen worker's heartbeat is stale
        capsfus("fuse", run, "--engine", "echo", "--chunk-size", 20, "--lease-ttl", 2)
        done = stage.read_state(0)
        assert done["status"] == "done" and done["epoch"] == 2
    finally:
        stale.send_signal(signal.SIGCONT)
    stale.wait(timeout=60)
    after = stage.read_state(0)
    assert after == done, "the stale worker changed the state after losing its lease"
    out, rej = assert_exactly_once(run)
    assert len(out) + len(rej) == 200
    assert "lease epoch 1 was taken over" in (Path(run) / "fuse" / "logs").joinpath(
        next(p.name for p in (run / "fuse" / "logs").glob("worker-*.log")
             if "taken over" in p.read_text())).read_text()


def test_settings_rule_force_and_tags(tmp_path):
    run = make_run(tmp_path, n=80, per_shard=40)
    capsfus("fuse", run, "--engine", "echo", "--max-new-tokens", 80)
    p = capsfus("fuse", run, "--engine", "echo", "--max-new-tokens", 5, check=False)
    assert p.returncode == 2 and "--force" in p.stderr and "max_new_tokens" in p.stderr
    assert "Traceback" not in p.stderr
    capsfus("fuse", run, "--engine", "echo", "--max-new-tokens", 5, "--force")
    out, _ = assert_exactly_once(run)
    assert all(r["fused_hit_max_tokens"] for r in out)  # made with the new settings
    capsfus("fuse", run, "--engine", "echo", "--tag", "long")
    out_tag, _ = assert_exactly_once(run, "fuse@long")
    assert not any(r["fused_hit_max_tokens"] for r in out_tag)
    st = json.loads(capsfus("status", run, "--json").stdout)
    assert {s["stage"] for s in st["stages"]} == {"fuse", "fuse@long"}


def test_stage_from_another_run_is_refused(tmp_path):
    a = make_run(tmp_path, n=20, per_shard=20, name="a")
    b = make_run(tmp_path, n=20, per_shard=20, name="b")
    capsfus("fuse", a, "--engine", "echo")
    shutil.copytree(a / "fuse", b / "fuse")
    p = capsfus("fuse", b, "--engine", "echo", check=False)
    assert p.returncode == 2 and "belongs to another run" in p.stderr


def test_poison_row_is_bisected_and_rejected(tmp_path):
    run = make_run(tmp_path, n=100, per_shard=100)
    log = tmp_path / "echo.log"
    capsfus("fuse", run, "--engine", "echo", "--chunk-size", 50, "--max-attempts", 2,
            CAPSFUS_ECHO_FAIL_ON="row 37 alt text", CAPSFUS_ECHO_LOG=log)
    out, rej = assert_exactly_once(run)
    assert [r["id"] for r in rej] == ["run.jsonl:37"]
    assert rej[0]["reason"] == "generation_error" and "injected failure" in rej[0]["detail"]
    assert len(out) == 99
    # rows of the good halves were generated once each
    assert max(echo_log_counts(log).values()) == 1


def test_prompt_over_budget_and_no_synthetic_rejected(tmp_path):
    data = tmp_path / "in.jsonl"
    with open(data, "w") as f:
        f.write(json.dumps({"TEXT": "short raw", "top_caption": "word " * 300, "URL": "u"}) + "\n")
        f.write(json.dumps({"TEXT": "long raw " * 200, "top_caption": "ok.", "URL": "u"}) + "\n")
        f.write(json.dumps({"TEXT": "no synthetic here", "top_caption": None, "URL": "u"}) + "\n")
    run = tmp_path / "run"
    capsfus("shard", data, "--out", run)
    capsfus("fuse", run, "--engine", "echo", "--max-prompt-tokens", 120)
    out, rej = assert_exactly_once(run)
    reasons = {r["id"]: r["reason"] for r in rej}
    assert reasons == {"in.jsonl:0": "prompt_over_budget", "in.jsonl:2": "no_synthetic"}
    assert out[0]["raw_truncated"] is True and out[0]["raw"].startswith("long raw")
    p = capsfus("status", run)
    assert "prompt_over_budget 1" in p.stdout and "no_synthetic 1" in p.stdout


@pytest.mark.slow
def test_two_local_workers_share_shards_and_die_with_parent(tmp_path, reference):
    run = make_run(tmp_path)
    log = tmp_path / "echo.log"
    p = popen("fuse", run, "--engine", "echo", "--chunk-size", CHUNK, "--workers", 2,
              CAPSFUS_ECHO_LOG=log, CAPSFUS_ECHO_SLEEP=0.003)
    deadline = time.time() + 60
    while time.time() < deadline and len({line.split()[1] for line in (
            log.read_text().splitlines() if log.exists() else [])}) < 2:
        time.sleep(0.05)
    children = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True,
                              text=True).stdout.split()
    assert len(children) >= 2
    p.send_signal(signal.SIGKILL)
    p.wait()
    time.sleep(1.0)
    alive = [c for c in children if Path(f"/proc/{c}").exists()
             and "Z" not in Path(f"/proc/{c}/stat").read_text().rsplit(")", 1)[1].split()[0]]
    assert not alive, "worker processes outlived their parent"
    before = {line.split()[1] for line in log.read_text().splitlines()}
    assert len(before) >= 2                   # both workers of the first invocation generated
    capsfus("fuse", run, "--engine", "echo", "--chunk-size", CHUNK, "--workers", 2,
            CAPSFUS_ECHO_LOG=log)
    out, _ = assert_exactly_once(run)
    assert {r["id"]: r["fused"] for r in out} == reference
    pids = {line.split()[1] for line in log.read_text().splitlines()}
    # the rerun's workers did the rest (one of them may find nothing left under load)
    assert pids - before
    extra = sum(echo_log_counts(log).values()) - N_ROWS
    assert extra <= 2 * 2 * CHUNK  # two workers, each losing at most two chunks in flight


def test_status_and_cat_pipe(tmp_path):
    run = make_run(tmp_path, n=50, per_shard=25)
    p = capsfus("status", run)
    assert "no stage started yet" in p.stdout
    capsfus("fuse", run, "--engine", "echo")
    st = json.loads(capsfus("status", run, "--json").stdout)
    s = st["stages"][0]
    assert s["counts"]["done"] == 2 and s["rows"]["out"] == 50
    # `capsfus cat RUN | head -1` ends cleanly
    proc = subprocess.run(f"{os.sys.executable} -m capsfus.cli cat {run} | head -1",
                          shell=True, capture_output=True, text=True)
    assert proc.returncode == 0 and json.loads(proc.stdout)["fused"]
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr
    assert len(capsfus("cat", run, "--stage", "input").stdout.splitlines()) == 50
