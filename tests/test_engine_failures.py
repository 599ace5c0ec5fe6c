"""A failing engine versus a poison row, and --retry-rejected, through the real CLI: an engine
that fails every batch (or dies mid-shard) leaves the rows unrejected, fails the shard with
the error, stops the worker and exits non-zero; a rerun once the fault is gone fuses every
row exactly once; --retry-rejected gives transiently rejected rows another try."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from runhelp import assert_exactly_once, capsfus, echo_log_counts, stage_rows, write_rows

from capsfus.rundir.manifest import Run
from capsfus.rundir.stage import StageDir


def _run(tmp: Path, n: int, per_shard: int, rows: Path | None = None) -> Path:
    data = rows or write_rows(tmp / "in.jsonl", n)
    run = tmp / "run"
    capsfus("shard", data, "--out", run, "--rows-per-shard", per_shard)
    return run


def test_failing_engine_rejects_nothing_stops_the_worker_and_a_rerun_fuses(tmp_path):
    run = _run(tmp_path, 400, 100)
    bad_log = tmp_path / "bad.log"
    p = capsfus("fuse", run, "--engine", "echo", "--chunk-size", 40, check=False,
                CAPSFUS_ECHO_FAIL_ON="Sentence 1", CAPSFUS_ECHO_LOG=bad_log)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "engine is failing" in p.stderr
    st = json.loads(capsfus("status", run, "--json").stdout)["stages"][0]
    # the worker stopped after the first shard instead of failing (or rejecting) them all
    assert st["counts"]["failed"] == 1 and st["counts"]["pending"] == 3
    assert st["counts"]["done"] == 0
    assert st["rows"]["rejected"] == 0 and st["reasons"] == {}
    assert "engine is failing" in st["failed"][0]["error"]
    assert "engine is failing" in capsfus("status", run).stdout
    out, rej = stage_rows(run)
    assert not out and not rej
    # the fault is gone: a plain rerun fuses every row, each generated once
    log = tmp_path / "good.log"
    capsfus("fuse", run, "--engine", "echo", "--chunk-size", 40, CAPSFUS_ECHO_LOG=log)
    out, rej = assert_exactly_once(run)
    assert len(out) == 400 and not rej
    counts = echo_log_counts(log)
    assert len(counts) == 400 and max(counts.values()) == 1


def test_engine_dying_mid_shard_keeps_committed_chunks_and_rejects_nothing(tmp_path):
    data = tmp_path / "in.jsonl"
    with open(data, "w") as f:
        for i in range(200):
            state = "dead" if i >= 100 else "fine"
            f.write(json.dumps({"TEXT": f"{state} row {i} alt text", "top_caption": f"thing {i}.",
                                "URL": f"https://example.org/{i}.jpg"}) + "\n")
    run = _run(tmp_path, 200, 200, rows=data)
    p = capsfus("fuse", run, "--engine", "echo", "--chunk-size", 20, check=False,
                CAPSFUS_ECHO_FAIL_ON="dead row")
    assert p.returncode == 1
    st = StageDir(Run(run), "fuse").read_state(0)
    assert st["status"] == "failed" and st["last_error"].get("engine_failing")
    assert st["rows_done"] == 100 and st["rows_out"] == 100 and st["rows_rejected"] == 0
    log = tmp_path / "echo.log"
    capsfus("fuse", run, "--engine", "echo", "--chunk-size", 20, CAPSFUS_ECHO_LOG=log)
    out, rej = assert_exactly_once(run)
    assert len(out) == 200 and not rej
    counts = echo_log_counts(log)
    assert len(counts) == 100 and max(counts.values()) == 1     # only the rows not done


def test_retry_rejected_gives_transient_rejections_another_try_exactly_once(tmp_path):
    data = write_rows(tmp_path / "in.jsonl", 120)
    lines = data.read_text().splitlines()
    row = json.loads(lines[50])
    row["top_caption"] = None                  # no_synthetic: not transient, never retried
    lines[50] = json.dumps(row)
    data.write_text("\n".join(lines) + "\n")
    run = _run(tmp_path, 120, 60, rows=data)
    fuse = ("fuse", run, "--engine", "echo", "--chunk-size", 20, "--max-attempts", 2)
    capsfus(*fuse, CAPSFUS_ECHO_FAIL_ON="row 37 alt text")
    _, rej = assert_exactly_once(run)
    assert {r["id"]: r["reason"] for r in rej} == {"in.jsonl:37": "generation_error",
                                                   "in.jsonl:50": "no_synthetic"}
    before_out, _ = stage_rows(run)
    # a kill between the new final files and the state switch changes nothing
    p = capsfus(*fuse, "--retry-rejected", check=False, CAPSFUS_CRASH_AT="fenced_write:1")
    assert p.returncode == -signal.SIGKILL
    _, rej = assert_exactly_once(run)
    assert len(rej) == 2
    # the fault is gone: the poison row is fused, the no_synthetic row stays rejected
    log = tmp_path / "echo.log"
    capsfus(*fuse, "--retry-rejected", CAPSFUS_ECHO_LOG=log)
    out, rej = assert_exactly_once(run)
    assert [(r["id"], r["reason"]) for r in rej] == [("in.jsonl:50", "no_synthetic")]
    assert len(out) == 119 and "in.jsonl:37" in {r["id"] for r in out}
    assert sum(echo_log_counts(log).values()) == 1          # only that row was generated
    # earlier rows are untouched and the shard keeps input order
    assert [r for r in out if r["id"] != "in.jsonl:37"] == before_out
    assert [r["id"] for r in out][:40] == [f"in.jsonl:{i}" for i in range(40)]
    st = json.loads(capsfus("status", run, "--json").stdout)["stages"][0]
    assert st["reasons"] == {"no_synthetic": 1} and st["counts"]["done"] == 2
    # nothing transient left: a second retry generates nothing
    log2 = tmp_path / "echo2.log"
    capsfus(*fuse, "--retry-rejected", CAPSFUS_ECHO_LOG=log2)
    assert not log2.exists()
    assert_exactly_once(run)
    leftovers = [p.name for p in (run / "fuse").rglob("*.jsonl.zst")]
    assert len(leftovers) == 3, leftovers     # two out finals, one rejected final


def test_retry_rejected_while_the_row_still_fails_tries_it_once_per_invocation(tmp_path):
    run = _run(tmp_path, 60, 60)
    fuse = ("fuse", run, "--engine", "echo", "--chunk-size", 20, "--max-attempts", 2)
    capsfus(*fuse, CAPSFUS_ECHO_FAIL_ON="row 7 alt text")
    log = tmp_path / "echo.log"
    capsfus(*fuse, "--retry-rejected", "--workers", 2, CAPSFUS_ECHO_FAIL_ON="row 7 alt text",
            CAPSFUS_ECHO_LOG=log)
    out, rej = assert_exactly_once(run)
    assert [(r["id"], r["reason"]) for r in rej] == [("in.jsonl:7", "generation_error")]
    assert not log.exists()      # the row failed again: no generation succeeded, none repeated


# ------------------------------------------------------------------------- the caption stage
@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> Path:
    from test_caption import build_tiny_blip
    folder = tmp_path_factory.mktemp("tiny-blip")
    build_tiny_blip(folder)
    return folder


def _caption_run(tmp: Path) -> tuple[Path, dict]:
    from test_caption import write_wds
    expected = write_wds(tmp / "wds")
    run = tmp / "run"
    capsfus("shard", tmp / "wds", "--out", run, "--rows-per-shard", 12)
    return run, expected


def test_failing_captioner_fails_the_shard_bad_images_still_rejected(tmp_path, tiny_blip):
    from test_caption import FAST
    run, expected = _caption_run(tmp_path)
    args = ("caption", run, "--model", tiny_blip, "--chunk-size", 12, *FAST)
    p = capsfus(*args, check=False, CAPSFUS_CAPTION_FAIL_ON="*")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    st = json.loads(capsfus("status", run, "--json").stdout)["stages"][0]
    assert st["counts"]["failed"] == 1 and st["counts"]["done"] == 0
    assert st["rows"]["rejected"] == 0 and "captioner is failing" in st["failed"][0]["error"]
    capsfus(*args)
    out, rej = assert_exactly_once(run, "caption")
    assert sorted(r["reason"] for r in rej) == sorted(r for r in expected.values() if r)


def test_poison_image_is_rejected_then_retried(tmp_path, tiny_blip):
    from test_caption import FAST
    run, expected = _caption_run(tmp_path)
    args = ("caption", run, "--model", tiny_blip, "--chunk-size", 12, *FAST)
    capsfus(*args, CAPSFUS_CAPTION_FAIL_ON="00001.tar:7")
    out, rej = assert_exactly_once(run, "caption")
    errs = [r for r in rej if r["reason"] == "caption_error"]
    assert [r["key"] for r in errs] == ["000010007"] and "injected" in errs[0]["detail"]
    n_out = len(out)
    capsfus(*args, "--retry-rejected")
    out, rej = assert_exactly_once(run, "caption")
    assert len(out) == n_out + 1 and "000010007" in {r["key"] for r in out}
    assert sorted(r["reason"] for r in rej) == sorted(r for r in expected.values() if r)


# ------------------------------------------------------------------------- on SLURM
@pytest.mark.slurm
def test_failing_engine_on_slurm_stops_workers_and_resume_finishes(slurm_cluster, tmp_path):
    from test_slurm_fuse import wait_jobs
    run = _run(tmp_path, 80, 10)                                     # 8 shards
    capsfus("submit", "fuse", run, "--engine", "echo", "--nodes", 2, "--gpus-per-node", 0,
            "--time", "00:05:00", SLURM_CONF=slurm_cluster.conf,
            CAPSFUS_ECHO_FAIL_ON="Sentence 1")
    wait_jobs(slurm_cluster, run)
    st = json.loads(capsfus("status", run, "--json", SLURM_CONF=slurm_cluster.conf).stdout)
    s = st["stages"][0]
    # two workers, each failed one shard and stopped: 6 shards left untouched, none rejected
    assert s["counts"]["failed"] == 2 and s["counts"]["done"] == 0, s["counts"]
    assert s["counts"]["pending"] == 6 and s["rows"]["rejected"] == 0
    assert all("engine is failing" in f["error"] for f in s["failed"])
    # the fault is gone (the resume's environment has no injected failure)
    capsfus("resume", run, SLURM_CONF=slurm_cluster.conf)
    wait_jobs(slurm_cluster, run)
    out, rej = assert_exactly_once(run)
    assert len(out) == 80 and not rej
