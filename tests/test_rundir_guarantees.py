"""The run directory's guarantees, through the real CLI in real subprocesses: a frozen worker
(SIGSTOP at an injected point, even between its fencing check and its write) that wakes after
any number of takeovers changes nothing; run-dir files follow the umask."""

from __future__ import annotations

import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from runhelp import REPO, assert_exactly_once, capsfus, env, popen, write_rows

from capsfus.rundir.manifest import Run
from capsfus.rundir.stage import StageDir

TTL = 2.0


def _make_run(tmp: Path, n: int = 200, per_shard: int = 200) -> Path:
    run = tmp / "run"
    capsfus("shard", write_rows(tmp / "in.jsonl", n), "--out", run, "--rows-per-shard", per_shard)
    return run


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _wait_stopped(p: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if _proc_state(p.pid) == "T":
            return
        if p.poll() is not None:
            raise AssertionError(f"worker exited {p.returncode} before freezing: "
                                 f"{p.stderr.read()[-2000:]}")
        time.sleep(0.02)
    raise AssertionError("worker never reached its freeze point")


def _snapshot(stage_root: Path) -> dict[str, bytes]:
    """Every file of the stage but the worker logs: state, out, rejected, leases, config."""
    snap = {}
    for p in sorted(stage_root.rglob("*")):
        rel = p.relative_to(stage_root)
        if rel.parts[0] == "logs":
            continue
        snap[str(rel)] = p.read_bytes() if p.is_file() else b"<dir>"
    return snap


def _changed(before: dict[str, bytes], stage_root: Path) -> list[str]:
    """The files of the stage added, removed or rewritten since the ``before`` snapshot."""
    after = _snapshot(stage_root)
    return sorted(k for k in set(after) | set(before) if after.get(k) != before.get(k))


@pytest.mark.parametrize("point,takeovers", [
    ("fenced_write:3", 1),      # frozen between the fencing check and the state write
    ("fenced_write:3", 3),      # … while its epoch's lease files were deleted by acquire
    ("after_state:2", 3),       # frozen between chunks: epoch+1 is gone, epoch+3 is not
    ("before_rename:5", 2),     # frozen inside an atomic write, temp file complete
])
def test_frozen_worker_wakes_after_takeovers_and_changes_nothing(tmp_path, point, takeovers):
    run = _make_run(tmp_path)
    fuse = ("fuse", run, "--engine", "echo", "--chunk-size", 20, "--lease-ttl", TTL)
    frozen = popen(*fuse, CAPSFUS_FREEZE_AT=point, CAPSFUS_ECHO_SLEEP=0.002)
    try:
        _wait_stopped(frozen)
        time.sleep(TTL + 0.5)     # its heartbeat is now older than the TTL: stale
        stage = StageDir(Run(run), "fuse")
        for k in range(takeovers):
            # each takeover commits chunks, then dies (a dead pid's lease is stale at once)
            p = capsfus(*fuse, check=False, CAPSFUS_CRASH_AT="after_state:2")
            assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
        capsfus(*fuse)
        done = stage.read_state(0)
        assert done["status"] == "done" and done["epoch"] == takeovers + 2
        before = _snapshot(run / "fuse")
    finally:
        frozen.send_signal(signal.SIGCONT)
    frozen.wait(timeout=60)
    changed = _changed(before, run / "fuse")
    assert not changed, f"the woken worker changed the run directory: {changed}"
    assert stage.read_state(0) == done
    out, rej = assert_exactly_once(run)
    assert len(out) == 200 and not rej
    logs = "".join(p.read_text() for p in (run / "fuse" / "logs").glob("worker-*.log"))
    assert "lease epoch 1 was taken over" in logs


@pytest.mark.parametrize("point", ["mid_compaction", "after_compaction"])
def test_worker_frozen_while_compacting_changes_nothing_when_it_wakes(tmp_path, point):
    """Frozen with its final file written but not listed (mid_compaction), or with the done
    state written but its chunk files not yet deleted (after_compaction): the next worker
    takes the shard over, and the woken one neither lists nor deletes anything."""
    run = _make_run(tmp_path)
    fuse = ("fuse", run, "--engine", "echo", "--chunk-size", 20, "--lease-ttl", TTL)
    frozen = popen(*fuse, CAPSFUS_FREEZE_AT=point)
    try:
        _wait_stopped(frozen)
        time.sleep(TTL + 0.5)
        capsfus(*fuse)
        stage = StageDir(Run(run), "fuse")
        done = stage.read_state(0)
        assert done["status"] == "done"
        assert {p.name for p in stage.out_dir(0).iterdir()} == {done["final"]["out"]["file"]}
        before = _snapshot(run / "fuse")
    finally:
        frozen.send_signal(signal.SIGCONT)
    frozen.wait(timeout=60)
    changed = _changed(before, run / "fuse")
    assert not changed, f"the woken worker changed the run directory: {changed}"
    out, rej = assert_exactly_once(run)
    assert len(out) == 200 and not rej


def _umask_run(tmp: Path, umask: int) -> Path:
    """shard + fuse in a child whose umask is ``umask``."""
    data = write_rows(tmp / "in.jsonl", 30)
    run = tmp / "run"
    code = (f"import os, sys, runpy; os.umask({umask:#o}); sys.argv = ['capsfus'] + sys.argv[1:]; "
            f"runpy.run_module('capsfus.cli', run_name='__main__')")
    for args in (["shard", data, "--out", run, "--rows-per-shard", 10],
                 ["fuse", run, "--engine", "echo", "--chunk-size", 4]):
        p = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                           text=True, env=env(), cwd=REPO, timeout=240)
        assert p.returncode == 0, p.stderr[-2000:]
    return run


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_run_dir_files_follow_the_umask(tmp_path, umask):
    run = _umask_run(tmp_path, umask)
    files = [p for p in run.rglob("*") if p.is_file()]
    dirs = [p for p in run.rglob("*") if p.is_dir()]
    assert any("state" in p.parts for p in files) and any(".jsonl.zst" in p.name for p in files)
    bad = {str(p.relative_to(run)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files
           if stat.S_IMODE(p.stat().st_mode) != 0o666 & ~umask}
    assert not bad, f"files not {oct(0o666 & ~umask)}: {bad}"
    bad = {str(p.relative_to(run)): oct(stat.S_IMODE(p.stat().st_mode)) for p in dirs
           if stat.S_IMODE(p.stat().st_mode) != 0o777 & ~umask}
    assert not bad, f"folders not {oct(0o777 & ~umask)}: {bad}"
