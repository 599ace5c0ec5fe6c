"""The teacher stage keeps the run directory's guarantees (docs/run-directory.md), through the
real CLI in real subprocesses against the local OpenAI-compatible server:

- fencing: a teacher frozen with SIGSTOP (at an injected point, even between its fencing check
  and its write, or inside an atomic write) and taken over by later `capsfus teacher` runs
  changes nothing when it wakes: the stage folder is byte-for-byte the same, it starts no new
  request, and every row is in the output exactly once, with its own answer;
- done means current: a teacher shard records the checksum of the upstream output it read, so
  a caption shard redone between the teacher's read and its write leaves the teacher shard
  stale, never done.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import pytest
from runhelp import assert_exactly_once, capsfus, popen, stage_rows, write_rows
from test_rundir_guarantees import _changed, _snapshot, _wait_stopped

from capsfus.prompt import PromptTemplate, clean_caption
from capsfus.rundir.manifest import Run
from capsfus.rundir.stage import StageDir

sys.path.insert(0, str(Path(__file__).parent))
from openai_server import fusion_answer, start_server  # noqa: E402

KEY = "sk-test-fencing-3c1d"
MODEL = "gpt-3.5-turbo"
TTL = 2.0


@pytest.fixture
def server(tmp_path):
    servers = []

    def make(**opts):
        s = start_server(tmp_path / f"srv{len(servers)}", key=KEY, **opts)
        servers.append(s)
        return s
    yield make
    for s in servers:
        s.stop()


def _teacher(run: Path, srv) -> tuple:
    return ("teacher", run, "--endpoint", srv.url, "--model", MODEL, "--concurrency", 2,
            "--backoff-base", 0.05, "--lease-ttl", TTL)


def _own_answers(rows: list[dict]) -> None:
    t = PromptTemplate()
    for r in rows:
        prompt = t.render_text(clean_caption(r["raw"]), clean_caption(r["synthetic"]))
        assert r["fused"] == fusion_answer(prompt), r


@pytest.mark.parametrize("point,takeovers", [
    ("fenced_write:4", 1),              # between the fencing check and a shard state write
    ("fenced_write:4", 3),              # … woken three epochs behind
    ("teacher_mid_materialize", 2),     # its out file renamed in, not yet listed in the state
    ("teacher_after_send_record:5", 1),  # a request journaled, about to be sent
    ("before_rename:7", 2),             # inside an atomic write, temp file complete
])
def test_frozen_teacher_wakes_after_takeovers_and_changes_nothing(tmp_path, server, point,
                                                                  takeovers):
    run = tmp_path / "run"
    capsfus("shard", write_rows(tmp_path / "in.jsonl", 60), "--out", run,
            "--rows-per-shard", 30)
    srv = server(delay_s=0.05)
    args = _teacher(run, srv)
    frozen = popen(*args, OPENAI_API_KEY=KEY, CAPSFUS_FREEZE_AT=point)
    try:
        _wait_stopped(frozen)
        time.sleep(TTL + 0.5)      # its heartbeats (run and shard leases) are older than the TTL
        for _ in range(takeovers):
            # each takeover gets some answers on disk, then dies (a dead pid's leases are
            # stale at once)
            p = capsfus(*args, check=False, OPENAI_API_KEY=KEY,
                        CAPSFUS_CRASH_AT="teacher_after_result:5")
            assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
        capsfus(*args, OPENAI_API_KEY=KEY)
        stage = StageDir(Run(run), "teacher")
        done = stage.all_states()
        assert sorted(done) == [0, 1] and all(s["status"] == "done" for s in done.values())
        before = _snapshot(run / "teacher")
        sent = len(srv.requests())
    finally:
        frozen.send_signal(signal.SIGCONT)
    frozen.wait(timeout=60)
    err = frozen.stderr.read()
    changed = _changed(before, run / "teacher")
    assert not changed, f"the woken teacher changed the run directory: {changed}\n{err[-2000:]}"
    assert stage.all_states() == done
    # no new request: at most the attempts that had passed their lease check when it froze
    # (one per --concurrency slot) still go out when it wakes; their answers land nowhere
    assert len(srv.requests()) - sent <= 2, "the woken teacher kept sending requests"
    assert frozen.returncode == 2 and "was taken over" in err and "Traceback" not in err, err
    out, rej = assert_exactly_once(run, "teacher")
    assert len(out) == 60 and not rej
    _own_answers(out)
    # the journal still has every answer the output was made from
    journal = [json.loads(line) for p in sorted((run / "teacher" / "journal").glob("*.jsonl"))
               for line in p.read_text().splitlines()]
    answered = {r["text"] for r in journal if r["k"] == "ok"}
    assert {r["fused"] for r in out} <= answered


def test_a_live_teacher_is_not_taken_over(tmp_path, server):
    """The run lease replaces the old lock: a second teacher on a run whose teacher is alive
    and heartbeating is refused with one line, and the first one finishes."""
    run = tmp_path / "run"
    capsfus("shard", write_rows(tmp_path / "in.jsonl", 30), "--out", run)
    srv = server(delay_s=0.2)
    args = _teacher(run, srv)
    first = popen(*args, OPENAI_API_KEY=KEY)
    try:
        deadline = time.time() + 60
        while not srv.requests() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(TTL + 0.5)          # longer than the TTL: only heartbeats keep it alive
        p = capsfus(*args, check=False, OPENAI_API_KEY=KEY)
        assert p.returncode == 2 and "another `capsfus teacher` is running" in p.stderr, p.stderr
    finally:
        assert first.wait(timeout=120) == 0, first.stderr.read()[-2000:]
    out, _ = assert_exactly_once(run, "teacher")
    assert len(out) == 30


@pytest.fixture(scope="module")
def blip(tmp_path_factory) -> Path:
    from test_caption import build_tiny_blip
    folder = tmp_path_factory.mktemp("tiny-blip")
    build_tiny_blip(folder)
    return folder


@pytest.mark.slow     # a (tiny, random) BLIP captions the rows, twice
def test_caption_redone_between_the_teachers_read_and_write_leaves_the_shard_stale(
        tmp_path, server, blip):
    """The teacher reads caption shard 0 and is frozen (``teacher_after_read``); meanwhile the
    caption shard is redone with other settings, so its output changes. Woken, the teacher
    finishes, but it must record the checksum of the captions it *read*: `status` reports the
    teacher shard stale (input changed), not done, and the next teacher run redoes it from the
    new captions."""
    from test_caption import captioned_run
    run, cap = captioned_run(tmp_path, blip)
    caption = StageDir(Run(run), "caption")
    read_sha = caption.read_state(0)["final"]["out"]["sha256"]
    srv = server()
    args = _teacher(run, srv)
    frozen = popen(*args, OPENAI_API_KEY=KEY, CAPSFUS_FREEZE_AT="teacher_after_read:1")
    try:
        _wait_stopped(frozen)
        capsfus(*cap, "--overwrite", "--force", "--shards", 0)    # rewrites caption shard 0
    finally:
        frozen.send_signal(signal.SIGCONT)
    assert frozen.wait(timeout=120) == 0, frozen.stderr.read()[-2000:]
    new_sha = caption.read_state(0)["final"]["out"]["sha256"]
    assert new_sha != read_sha
    teacher = StageDir(Run(run), "teacher")
    assert teacher.read_state(0)["input_sha256"] == read_sha      # what it read, not new_sha
    st = json.loads(capsfus("status", run, "--json").stdout)
    t = next(s for s in st["stages"] if s["stage"] == "teacher")
    why = {x["shard"]: x["why"] for x in t["stale"]}
    assert why.get(0) == "input", t
    assert t["counts"]["done"] == 0 and t["counts"]["stale"] == 2, t   # shard 1: upstream
    # once the captions are current again, the teacher redoes its stale shards from them
    capsfus(*cap, "--overwrite")
    capsfus(*args, OPENAI_API_KEY=KEY)
    t = next(s for s in json.loads(capsfus("status", run, "--json").stdout)["stages"]
             if s["stage"] == "teacher")
    assert t["counts"]["done"] == 2 and not t["stale"], t
    captions = {r["id"]: r["synthetic"] for r in assert_exactly_once(run, "caption")[0]}
    out, rej = stage_rows(run, "teacher")       # every caption out row once, new captions
    assert not rej and sorted(r["id"] for r in out) == sorted(captions)
    assert all(r["synthetic"] == captions[r["id"]] for r in out)
    assert teacher.read_state(0)["input_sha256"] == caption.read_state(0)["final"]["out"][
        "sha256"]
