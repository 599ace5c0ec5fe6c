"""`capsfus resume` continues an interrupted `submit … --retry-rejected`: the submission records
that it retries (and its retry id), and resume replays it, so the rows it was asked to retry get
their try; a row the same submission already retried does not get a second one."""

from __future__ import annotations

import json

import pytest
from runhelp import assert_exactly_once, capsfus, echo_log_counts, write_rows


@pytest.mark.slurm
def test_resume_replays_retry_rejected_of_the_interrupted_submission(slurm_cluster, tmp_path):
    from test_slurm_fuse import wait_jobs
    run = tmp_path / "run"
    capsfus("shard", write_rows(tmp_path / "in.jsonl", 40), "--out", run,
            "--rows-per-shard", 10)                                       # 4 shards
    fuse = ("--engine", "echo", "--chunk-size", 10, "--max-attempts", 2)
    env = {"SLURM_CONF": slurm_cluster.conf}
    # a poison row in every shard (rows 7, 17, 27, 37): rejected (generation_error)
    capsfus("fuse", run, *fuse, CAPSFUS_ECHO_FAIL_ON="7 alt text")
    _, rej = assert_exactly_once(run)
    assert sorted(r["id"] for r in rej) == [f"in.jsonl:{i}" for i in (17, 27, 37, 7)], rej
    # the retry is submitted, then cancelled before it starts
    capsfus("submit", "fuse", run, *fuse, "--retry-rejected", "--nodes", 1, "--gpus-per-node", 0,
            "--time", "00:05:00", "--slurm-arg", "begin=now+3600", **env)
    recs = sorted((run / "fuse" / "submissions").glob("*.json"))
    first = json.loads(recs[-1].read_text())
    assert first["retry_rejected"]["reasons"] == ["generation_error"]
    assert first["todo"] == "0-3"
    capsfus("cancel", run, **env)
    wait_jobs(slurm_cluster, run, timeout=60)
    # resume replays it: the four rows are fused, nothing else is generated again
    log = tmp_path / "echo.log"
    p = capsfus("resume", run, "--slurm-arg", "begin=now", CAPSFUS_ECHO_LOG=log, **env)
    said = p.stdout + p.stderr
    assert "--retry-rejected" in said and "4 shard(s) to do" in said, said
    wait_jobs(slurm_cluster, run, timeout=180)
    out, rej = assert_exactly_once(run)
    assert len(out) == 40 and not rej
    assert sum(echo_log_counts(log).values()) == 4, log.read_text()
    recs = sorted((run / "fuse" / "submissions").glob("*.json"))
    second = json.loads(recs[-1].read_text())
    assert second["retry_rejected"]["retry_id"] == first["retry_rejected"]["retry_id"]
    # the same invocation again: every row it was asked to retry has had its try
    p = capsfus("resume", run, **env)
    assert "nothing to resume" in p.stdout + p.stderr
