"""The teacher stage against a real local OpenAI-compatible server (tests/openai_server.py, a
subprocess on a free port) through the real CLI (subprocesses): answers per row, faults,
kill -9 and rerun, budget, keys."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import jsonschema
import pytest
from runhelp import capsfus, env, stage_rows, write_rows

from capsfus.prompt import PromptTemplate, clean_caption
from capsfus.rundir.manifest import Run
from capsfus.rundir.stage import StageDir

sys.path.insert(0, str(Path(__file__).parent))
from openai_server import fusion_answer, start_server  # noqa: E402

KEY = "sk-test-teacher-5b1e0c9d7f"
MODEL = "gpt-3.5-turbo"
SCHEMA = json.loads((Path(__file__).parents[1] / "manifests" / "state.schema.json").read_text())


@pytest.fixture
def run_dir(tmp_path):
    src = write_rows(tmp_path / "in.jsonl", 120)
    out = tmp_path / "run"
    capsfus("shard", src, "--out", out, "--rows-per-shard", 50)
    return out


@pytest.fixture
def server(tmp_path):
    servers = []

    def make(**opts):
        s = start_server(tmp_path / "srv", key=KEY, **opts)
        servers.append(s)
        return s
    yield make
    for s in servers:
        s.stop()


def teacher(run_dir, srv, *args, check=True, key=KEY, **kw):
    extra = {"OPENAI_API_KEY": key} if key is not None else {}
    env_extra = {**extra, **kw}
    return capsfus("teacher", run_dir, "--endpoint", srv.url if hasattr(srv, "url") else srv,
                   "--model", MODEL, "--backoff-base", "0.05", *args, check=check, **env_extra)


def expected_prompt(row: dict, api: str = "chat") -> str:
    t = PromptTemplate()
    text = t.render_text(clean_caption(row["raw"]), clean_caption(row["synthetic"]))
    return text if api == "chat" else text + t.cue


def check_answers(run_dir, n_expected: int, api: str = "chat") -> list[dict]:
    """Every sampled row exactly once, each with the answer to its own prompt."""
    out, rej = stage_rows(run_dir, "teacher")
    assert not rej, rej[:3]
    ids = [r["id"] for r in out]
    assert len(ids) == len(set(ids)) == n_expected
    for r in out:
        assert r["fused"] == fusion_answer(expected_prompt(r, api)), r
    for s in StageDir(Run(Path(run_dir)), "teacher").all_states().values():
        assert s["status"] == "done"
        jsonschema.validate(s, SCHEMA)      # the same state files as every stage
    return out


def no_key_anywhere(run_dir: Path, *texts: str, key: str = KEY) -> None:
    for t in texts:
        assert key not in t
    for p in Path(run_dir).rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            if p.suffix == ".zst":
                import zstandard
                data = zstandard.ZstdDecompressor().stream_reader(data).read()
            assert key.encode() not in data, p


def test_happy_path_chat_sample_cat_status_and_no_key_on_disk(run_dir, server):
    srv = server()
    p = teacher(run_dir, srv, "--sample", 40, "--seed", 3, "--concurrency", 6,
                "--price-in", 1, "--price-out", 2)
    out = check_answers(run_dir, 40)
    reqs = srv.requests()
    assert len(reqs) == 40 and all(r["status"] == 200 and r["auth"] == "bearer" for r in reqs)
    assert len({r["prompt_sha"] for r in reqs}) == 40
    assert all(r["model"] == MODEL and r["max_tokens"] == 128 for r in reqs)
    usage = json.loads((run_dir / "teacher" / "usage.json").read_text())
    toks = sum(r["teacher"]["usage"]["prompt_tokens"] for r in out), \
        sum(r["teacher"]["usage"]["completion_tokens"] for r in out)
    assert (usage["tokens"]["prompt"], usage["tokens"]["completion"]) == toks
    assert usage["cost_usd"]["known"] == pytest.approx((toks[0] * 1 + toks[1] * 2) / 1e6)
    assert "40/40 rows" in p.stderr
    cat = capsfus("cat", run_dir, "--stage", "teacher").stdout.splitlines()
    assert sorted(json.loads(x)["id"] for x in cat) == sorted(r["id"] for r in out)
    st = json.loads(capsfus("status", run_dir, "--json").stdout)
    t = next(s for s in st["stages"] if s["stage"] == "teacher")
    assert t["rows"] == {"total": 40, "done": 40, "out": 40, "rejected": 0}
    cfg = json.loads((run_dir / "teacher" / "config.json").read_text())
    assert cfg["settings"]["model"] == MODEL and cfg["settings"]["sample"] == 40
    # a rerun sends nothing
    p2 = teacher(run_dir, srv, "--sample", 40, "--seed", 3, "--concurrency", 6,
                 "--price-in", 1, "--price-out", 2)
    assert len(srv.requests()) == 40
    no_key_anywhere(run_dir, p.stdout, p.stderr, p2.stdout, p2.stderr)


def test_completions_api_and_azure_style_url(run_dir, server):
    srv = server()
    teacher(run_dir, srv, "--sample", 10, "--api", "completions")
    check_answers(run_dir, 10, api="completions")
    assert {r["path"] for r in srv.requests()} == {"/v1/completions"}
    azure = (f"http://127.0.0.1:{srv.port}/openai/deployments/fuser?api-version=2024-10-21")
    teacher(run_dir, azure, "--sample", 10, "--force")
    check_answers(run_dir, 10, api="chat")
    az = [r for r in srv.requests() if r["path"].startswith("/openai/")]
    assert len(az) == 10
    assert all(r["path"] == "/openai/deployments/fuser/chat/completions"
               and r["query"] == "api-version=2024-10-21" and r["auth"] == "api-key" for r in az)


@pytest.mark.parametrize("fault", ["429", "500", "slow", "malformed", "drop"])
def test_every_fault_kind_is_retried(run_dir, server, fault):
    """The first attempt of every prompt faults; every row still gets its own answer on the
    second, and a 429's Retry-After is waited out."""
    srv = server(faults=fault, fail_first=1, retry_after=1.0, slow_s=3)
    p = teacher(run_dir, srv, "--sample", 12, "--concurrency", 4, "--timeout", 1,
                "--price-in", 1, "--price-out", 1)
    check_answers(run_dir, 12)
    by_prompt: dict[str, list] = {}
    for r in srv.requests():
        by_prompt.setdefault(r["prompt_sha"], []).append(r)
    assert len(by_prompt) == 12
    for reqs in by_prompt.values():
        assert [r["fault"] for r in reqs] == [fault, None], reqs
        if fault == "429":
            assert reqs[1]["t"] - reqs[0]["t"] >= 1.0   # Retry-After honoured
    usage = json.loads((run_dir / "teacher" / "usage.json").read_text())
    assert usage["requests"]["retries"] == 12
    if fault in ("slow", "malformed", "drop"):  # may have been billed: counted as worst case
        assert usage["cost_usd"]["upper_bound"] > usage["cost_usd"]["known"]
    no_key_anywhere(run_dir, p.stderr)


def test_a_row_that_keeps_failing_is_rejected_and_the_run_goes_on(run_dir, server):
    srv = server(faults="500", always_fail="row 7 alt")
    teacher(run_dir, srv, "--max-retries", 2, "--concurrency", 4)
    out, rej = stage_rows(run_dir, "teacher")
    assert len(out) == 119 and [r["id"] for r in rej] == ["in.jsonl:7"]
    assert rej[0]["reason"] == "server_error" and "3 attempts" in rej[0]["detail"]
    bad = [r for r in srv.requests() if r["fault"]]
    assert len(bad) == 3 and len({r["prompt_sha"] for r in bad}) == 1
    # --retry-rejected resends just that row (the server still refuses it)
    teacher(run_dir, srv, "--max-retries", 0, "--retry-rejected", "--concurrency", 4)
    assert len([r for r in srv.requests() if r["fault"]]) == 4
    assert len(srv.requests()) == 119 + 4


def test_sample_is_reproducible_nested_and_layout_independent(tmp_path, server):
    src = write_rows(tmp_path / "in.jsonl", 120)
    a, b = tmp_path / "a", tmp_path / "b"
    capsfus("shard", src, "--out", a, "--rows-per-shard", 50)
    capsfus("shard", src, "--out", b, "--rows-per-shard", 17)
    srv = server()
    teacher(a, srv, "--sample", 15, "--seed", 7)
    teacher(b, srv, "--sample", 15, "--seed", 7)
    ids_a = {r["id"] for r in stage_rows(a, "teacher")[0]}
    ids_b = {r["id"] for r in stage_rows(b, "teacher")[0]}
    assert ids_a == ids_b and len(ids_a) == 15
    sent = len(srv.requests())
    # a larger sample keeps the smaller one and pays only for the new rows
    p = teacher(a, srv, "--sample", 25, "--seed", 7, check=False)
    assert p.returncode == 2 and "--force" in p.stderr
    teacher(a, srv, "--sample", 25, "--seed", 7, "--force")
    ids_a25 = {r["id"] for r in stage_rows(a, "teacher")[0]}
    assert ids_a < ids_a25 and len(ids_a25) == 25
    assert len(srv.requests()) == sent + 10
    c = tmp_path / "c"
    capsfus("shard", src, "--out", c, "--rows-per-shard", 50)
    teacher(c, srv, "--sample", 15, "--seed", 8)
    assert {r["id"] for r in stage_rows(c, "teacher")[0]} != ids_a


def test_missing_key_and_wrong_key_are_clear_errors(run_dir, server, monkeypatch):
    srv = server()
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    p = teacher(run_dir, srv, key=None, check=False)
    assert p.returncode == 2 and "OPENAI_API_KEY" in p.stderr and "Traceback" not in p.stderr
    p = teacher(run_dir, srv, "--api-key-env", "MY_KEY", key=None, check=False)
    assert p.returncode == 2 and "MY_KEY" in p.stderr
    wrong = "sk-wrong-0123456789abcdef"
    p = teacher(run_dir, srv, "--concurrency", 4, key=wrong, check=False)
    assert p.returncode == 2 and "refused the API key (401)" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    assert len(srv.requests()) <= 4     # no retry storm: one request per worker at most
    no_key_anywhere(run_dir, p.stdout, p.stderr, key=wrong)
    # the right key from another variable
    teacher(run_dir, srv, "--api-key-env", "MY_KEY", "--sample", 5, "--force", key=None,
            MY_KEY=KEY)
    check_answers(run_dir, 5)


def test_max_cost_stops_before_the_budget_and_continues(run_dir, server):
    srv = server(delay_s=0.02)
    # worst case per request: (prompt bytes + 16) * 10 + 128 * 10 USD/1M ≈ 0.0077 USD
    args = ["--sample", 40, "--concurrency", 3, "--price-in", 10, "--price-out", 10]
    p = teacher(run_dir, srv, *args, "--max-cost", 0.05, check=False)
    assert p.returncode == 4, p.stderr
    assert "larger --max-cost" in p.stderr
    u = json.loads((run_dir / "teacher" / "usage.json").read_text())
    assert u["stopped"] == "budget" and u["cost_usd"]["upper_bound"] <= 0.05
    done = u["rows"]["done"]
    assert 0 < done < 40 and len(srv.requests()) == done
    # the server's own usage counts: what was really spent stays under the budget
    assert u["cost_usd"]["known"] <= 0.05
    teacher(run_dir, srv, *args, "--max-cost", 1.0)
    check_answers(run_dir, 40)
    assert len(srv.requests()) == 40          # nothing paid twice


def test_answers_without_usage_count_at_worst_case_against_max_cost(run_dir, server):
    """An endpoint that reports no token usage has still billed the answer: it counts at its
    worst case, so --max-cost stops the run instead of treating the answers as free."""
    srv = server(omit_usage=1)
    p = teacher(run_dir, srv, "--sample", 40, "--concurrency", 3, "--price-in", 10,
                "--price-out", 10, "--max-cost", 0.05, check=False)
    assert p.returncode == 4, p.stderr
    u = json.loads((run_dir / "teacher" / "usage.json").read_text())
    assert u["stopped"] == "budget" and 0 < u["cost_usd"]["upper_bound"] <= 0.05
    assert 0 < len(srv.requests()) == u["rows"]["done"] < 40


def test_unknown_price_is_reported_and_max_cost_needs_one(run_dir, server):
    srv = server()
    p = capsfus("teacher", run_dir, "--endpoint", srv.url, "--model", "my-local-llm",
                "--sample", 3, OPENAI_API_KEY=KEY)
    assert "no price known" in p.stderr and "cost unknown" in p.stderr
    u = json.loads((run_dir / "teacher" / "usage.json").read_text())
    assert u["cost_usd"]["known"] is None
    p = capsfus("teacher", run_dir, "--endpoint", srv.url, "--model", "my-local-llm",
                "--sample", 3, "--max-cost", 1, check=False, OPENAI_API_KEY=KEY)
    assert p.returncode == 2 and "--prices" in p.stderr


def _journaled_answers(run_dir) -> int:
    done = set()
    for p in (run_dir / "teacher" / "journal").glob("*.jsonl"):
        for line in p.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if r["k"] in ("ok", "rej"):
                done.add((p.name, r["i"]))
    return len(done)


def _persisted_prompts(run_dir) -> set[str]:
    """Prompt hashes (8 hex) of the answers in the journal (the server tags each answer)."""
    out = set()
    for p in (run_dir / "teacher" / "journal").glob("*.jsonl"):
        for line in p.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if r["k"] == "ok":
                out.add(r["text"].rsplit("[", 1)[1].rstrip("]"))
    return out


def _count_repeats(srv) -> int:
    answered = Counter(r["prompt_sha"] for r in srv.requests() if r["status"] == 200)
    return sum(n - 1 for n in answered.values())


@pytest.mark.slow
def test_kill_9_at_random_moments_then_rerun(tmp_path, server):
    """SIGKILL the teacher at random moments, several times; the rerun finishes every row
    with its own answer, and repeats stay within the requests in flight at each kill."""
    src = write_rows(tmp_path / "in.jsonl", 150)
    run_dir = tmp_path / "run"
    capsfus("shard", src, "--out", run_dir, "--rows-per-shard", 40)
    srv = server(delay_s=0.15, faults="500", fault_rate=0.1)
    conc = 4
    args = ["teacher", run_dir, "--endpoint", srv.url, "--model", MODEL, "--sample", 120,
            "--concurrency", conc, "--backoff-base", "0.05", "--price-in", 1, "--price-out", 1]
    rng = random.Random(int(os.environ.get("TEACHER_KILL_SEED", "1")))
    kills, progress, snapshots = 0, [], []
    for _ in range(5):
        p = subprocess.Popen([sys.executable, "-m", "capsfus.cli", *map(str, args)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=env(OPENAI_API_KEY=KEY), cwd=Path(__file__).parents[1])
        # a random moment once this process has started sending (its start-up varies)
        before = len(srv.requests())
        deadline = time.time() + 60
        while len(srv.requests()) == before and p.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            kills += 1
        p.wait()
        progress.append(_journaled_answers(run_dir))
        for st in StageDir(Run(run_dir), "teacher").all_states().values():
            jsonschema.validate(st, SCHEMA)  # also the states a kill left behind
        snapshots.append((len(srv.requests()), _persisted_prompts(run_dir)))
    mid_run = [d for d in progress if 0 < d < 120]
    assert kills >= 3 and len(set(mid_run)) >= 2, (kills, progress)   # killed mid-run
    # injected crash points too: right after a result is on disk, and mid-materialization
    for point in ("teacher_after_result:7", "teacher_after_send_record:5",
                  "teacher_mid_materialize:1"):
        p = capsfus(*args, check=False, OPENAI_API_KEY=KEY, CAPSFUS_CRASH_AT=point)
        kills += p.returncode == -9
    capsfus(*args, OPENAI_API_KEY=KEY)
    check_answers(run_dir, 120)
    # never re-sent once its answer was on disk: the server's log after each kill holds no
    # prompt whose answer the journal had at that moment (answers end with the prompt's hash)
    log = srv.requests()
    for n_before, persisted in snapshots:
        resent = [r for r in log[n_before:] if r["prompt_sha"] and r["prompt_sha"][:8] in persisted]
        assert not resent, resent[:3]
    assert sum(len(p) for _, p in snapshots) > 0
    repeats = _count_repeats(srv)
    print(f"kills {kills}, rows done at each random kill {progress}, repeats {repeats}")
    assert repeats <= kills * conc, (repeats, kills, progress)
    u = json.loads((run_dir / "teacher" / "usage.json").read_text())
    assert u["requests"]["orphaned_at_crash"] <= kills * conc
    # the journal is the record of every answer: no row answered twice in it without a crash
    assert len({r["prompt_sha"] for r in srv.requests() if r["prompt_sha"]}) == 120


def test_client_is_not_picklable_and_rpm_is_respected(tmp_path, server):
    import asyncio

    from capsfus.engines.openai_client import ClientSettings, OpenAIClient
    srv = server()

    async def go():
        c = OpenAIClient(ClientSettings(endpoint=srv.url, model="m", concurrency=8, rpm=300),
                         KEY)
        with pytest.raises(TypeError):
            pickle.dumps(c)
        t0 = time.monotonic()
        replies = await asyncio.gather(*[c.complete(f"Sentence 1: r{i}\nSentence 2: s{i}",
                                                    max_tokens=20) for i in range(15)])
        dt = time.monotonic() - t0
        await c.aclose()
        return replies, dt

    replies, dt = asyncio.run(go())
    assert all(r.ok for r in replies)
    assert [r.text for r in replies] == [fusion_answer(f"Sentence 1: r{i}\nSentence 2: s{i}")
                                         for i in range(15)]
    assert dt >= (15 - 5) / 5 - 0.2     # 300 rpm = 5/s after a burst of one second's worth


def test_exhausted_quota_and_a_dead_endpoint_stop_the_run_instead_of_rejecting_it(
        run_dir, server):
    srv = server(faults="quota", fault_rate=1.0)
    p = teacher(run_dir, srv, "--concurrency", 3, check=False)
    assert p.returncode == 2 and "quota is exhausted" in p.stderr and "Traceback" not in p.stderr
    assert len(srv.requests()) <= 3
    assert not stage_rows(run_dir, "teacher")[1]           # nothing rejected for it
    srv = server(faults="500", fault_rate=1.0)
    p = teacher(run_dir, srv, "--concurrency", 2, "--max-retries", 1,
                "--max-consecutive-failures", 4, check=False)
    assert p.returncode == 2 and "failed" in p.stderr and "rows in a row" in p.stderr
    assert "--retry-rejected" in p.stderr
    assert len(srv.requests()) <= (4 + 2) * 2       # stopped after ~4 rows, not 120
    usage = json.loads((run_dir / "teacher" / "usage.json").read_text())
    assert usage["stopped"] == "failures" and usage["rows"]["to_do"] >= 120 - 6


def test_max_cost_holds_while_answers_wait_for_a_slow_disk(run_dir, server, monkeypatch):
    """An answer's reservation is released only together with its recorded cost: while its
    journal record is being fsynced (a slow disk), other workers must not see the budget free.
    Answers cut at --max-tokens cost exactly the reserved worst case (input priced 0)."""
    from capsfus.engines.prices import Price
    from capsfus.stages.teacher import Teacher, TeacherOptions
    from capsfus.stages.teacher_journal import Journal
    write = Journal._write

    def slow_write(self, batch):
        time.sleep(0.3)
        write(self, batch)
    monkeypatch.setattr(Journal, "_write", slow_write)
    srv = server()
    opts = TeacherOptions(run_dir=str(run_dir), endpoint=srv.url, model=MODEL, sample=30,
                          concurrency=4, max_tokens=5, max_cost=2.2, backoff_base=0.05)
    price = Price(MODEL, 0.0, 100_000.0, "test")    # 5 output tokens: $0.50 a request
    u = Teacher(opts, KEY, price).execute()
    assert u["stopped"] == "budget"
    answered = [r for r in srv.requests() if r["status"] == 200]
    assert len(answered) == 4, len(answered)        # 4 x $0.50 fit in $2.20, a 5th does not
    assert u["cost_usd"]["known"] == pytest.approx(2.0)
    assert u["cost_usd"]["upper_bound"] <= 2.2
