"""capsfus eval: metric values against hand and brute-force computations, eval on a real run
and on outside files (join on id, unpartnered rows counted), the pairwise judge through the
local OpenAI-compatible test server (both orders, position bias cancelled, "not run" when it
cannot be reached)."""

from __future__ import annotations

import itertools
import json
import math
import random
import socket
import textwrap

import pytest
from openai_server import start_server
from runhelp import SHARED_SAMPLE, capsfus

from capsfus.quality import metrics as M
from capsfus.quality.judge import PROMPT, combine, parse_verdict, run_judge
from capsfus.rundir.io import iter_jsonl_zst


# ---------------------------------------------------------------------------------- metrics
def brute_lcs(a, b):
    """Longest common subsequence by trying every subsequence of a (small inputs only)."""
    best = 0
    for k in range(len(a) + 1):
        for idx in itertools.combinations(range(len(a)), k):
            sub = [a[i] for i in idx]
            it = iter(b)
            if all(any(x == y for y in it) for x in sub):
                best = max(best, k)
    return best


def test_lcs_matches_brute_force():
    rng = random.Random(1)
    for _ in range(200):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 7))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 7))]
        assert M.lcs_length(a, b) == brute_lcs(a, b), (a, b)


def test_rouge_l_by_hand():
    # LCS of "the cat sat on the mat" / "the cat is on the mat" = "the cat on the mat" (5)
    r = M.rouge_l("The cat sat on the mat.", "the cat is on the mat")
    assert r == pytest.approx({"p": 5 / 6, "r": 5 / 6, "f": 5 / 6})
    r = M.rouge_l("a red car", "a red car parked in Paris")     # LCS 3, lengths 3 and 6
    assert r["p"] == 1 and r["r"] == 0.5 and r["f"] == pytest.approx(2 * 0.5 / 1.5)
    assert M.rouge_l("", "a car") == {"p": 0.0, "r": 0.0, "f": 0.0}


def test_sentence_bleu_by_hand():
    # clipped n-gram matches / candidate n-grams: 1: 5/6, 2: 3/5, 3: 1/4, 4: 0/3; equal lengths
    # (brevity penalty 1); add-one smoothing from n = 2
    want = (5 / 6 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25
    assert M.sentence_bleu("the cat sat on the mat", "the cat is on the mat") == \
        pytest.approx(want)
    assert M.sentence_bleu("a b c d e", "a b c d e") == pytest.approx(1.0)
    assert M.sentence_bleu("x y z", "a b c") == 0.0


def test_corpus_bleu_by_hand():
    b = M.CorpusBleu()
    b.add("the cat sat on", "the cat sat on the mat")    # every n-gram matches; 4 vs 6 words
    assert b.score() == pytest.approx(math.exp(1 - 6 / 4))
    b.add("a dog runs fast", "a dog runs fast")          # 8 vs 10 words now
    assert b.score() == pytest.approx(math.exp(1 - 10 / 8))
    b.add("blue green", "red yellow")                    # 2 unigrams + 1 bigram, no match
    # summed: 1-grams 8/10, 2-grams 6/7, 3-grams 4/4, 4-grams 2/2; 10 vs 12 words
    p = [8 / 10, 6 / 7, 4 / 4, 2 / 2]
    want = math.exp(1 - 12 / 10) * math.exp(sum(math.log(x) for x in p) / 4)
    assert b.score() == pytest.approx(want)

def test_cider_d_by_hand():
    """Two rows: idf weight log(2) for every n-gram (each in one row's reference, or none)."""
    c = M.CorpusCider()
    c.add("c d", "C, d.")                      # identical: cosine 1 for 1- and 2-grams, no 3/4
    assert c.scores() == [0.0]                 # one row: log(1) - log(1) = 0, every weight 0
    c.add("a b a", "a b")
    # row "a b a" vs "a b", weights in units of log 2: 1-grams (a 2, b 1) . (a 1, b 1), clipped
    # min(2,1)*1 + 1*1 = 2 over |(2,1)| |(1,1)| = sqrt(5) sqrt(2); 2-grams ("a b" 1, "b a" 1)
    # . ("a b" 1) = 1 over sqrt(2) * 1; no 3-gram in the reference: 0; bigram counts 2 vs 1
    row = (2 / math.sqrt(10) + 1 / math.sqrt(2)) * math.exp(-1 / 72) / 4 * 10
    assert c.scores() == pytest.approx([5.0, row], abs=1e-12)
    assert c.score() == pytest.approx((5.0 + row) / 2, abs=1e-12)
    # clipping: repeating a matched word more often than the reference does adds nothing
    rep, once = M.CorpusCider(), M.CorpusCider()
    for cider, cand in ((rep, "dog dog dog dog"), (once, "dog")):
        cider.add(cand, "a dog")
        cider.add("x", "a cat")
    assert rep.scores()[0] < once.scores()[0]
    assert M.CorpusCider().score() is None



def test_knowledge_retention_and_novel_words_by_hand():
    raw = "Nike Air Max 90 running shoes for sale"
    syn = "a pair of red shoes on a white background"
    every, named = M.knowledge_tokens(raw, syn)
    # content words of raw absent from syn: nike air max 90 running sale ("shoes" is in syn,
    # "for" is a stopword); written with a capital or digit: nike air max 90
    assert every == {"nike", "air", "max", "90", "running", "sale"}
    assert named == {"nike", "air", "max", "90"}
    fused = "A pair of red Nike Air running shoes, size 10, on a white background."
    assert M.retention(every, fused) == pytest.approx(3 / 6)
    assert M.retention(named, fused) == pytest.approx(2 / 4)
    # content words of fused: pair red nike air running shoe size 10 white background;
    # in neither input: size, 10
    assert M.novel_share(fused, raw, syn) == pytest.approx(2 / 10)
    assert M.retention(set(), fused) is None
    assert M.novel_share("the of a", raw, syn) is None


def test_rule_flags_reuse_the_filter_rules():
    f = M.RuleFlags()
    raw, syn = "Vintage Eiffel Tower poster 1950", "a poster of a tower in paris"
    assert f.flags(f"{raw} {syn}", raw, syn) == {"concatenation": True, "leak": False}
    assert f.flags("Sentence 1 shows a vintage Eiffel Tower poster.", raw, syn)["leak"]
    assert f.flags("Here is a refined and merged sentence: A 1950 poster of the Eiffel Tower.",
                   raw, syn)["leak"]
    assert f.flags("A vintage 1950 poster of the Eiffel Tower in Paris.", raw, syn) == \
        {"concatenation": False, "leak": False}


@pytest.mark.slow
def test_embedder_loads_offline_and_ranks_meaning():
    e = M.Embedder()
    s = e.similarity(["a dog runs on the beach", "a dog runs on the beach"],
                     ["a puppy running along the sand", "a spreadsheet of quarterly taxes"])
    assert s[0] > 0.5 > s[1]
    assert e.similarity(["a red car"], ["a red car"])[0] == pytest.approx(1.0, abs=1e-5)


# ------------------------------------------------------------------------------------- eval
def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [("Nike Air Max 90 shoes", "a pair of red shoes", "Red Nike Air Max 90 shoes."),
        ("IMG_2231 Eiffel Tower Paris 1889", "a tall tower", "The Eiffel Tower in Paris."),
        ("Acme Model-7 blender", "a kitchen blender", "Sentence 1: Acme Model-7 blender"),
        ("Lake Tahoe sunset 2019", "a lake at sunset", "Lake Tahoe sunset 2019 a lake at sunset"),
        ("Vintage Ford Mustang", "an old car", "A vintage Ford Mustang car."),
        ("Golden Gate Bridge fog", "a bridge in fog", "The Golden Gate Bridge in fog.")]


def test_eval_outside_files_joined_on_id_with_unpartnered_counted(tmp_path):
    cand = write_jsonl(tmp_path / "cand.jsonl", [
        {"uid": f"u{i}", "raw": r, "synthetic": s, "fused": f} for i, (r, s, f) in enumerate(ROWS)])
    # the reference lacks u5 and has an extra u9; u0 is word for word the candidate
    refs = [{"uid": "u0", "caption": ROWS[0][2]}] + [
        {"uid": f"u{i}", "caption": f"{ROWS[i][1]} {ROWS[i][0]}"} for i in range(1, 5)] + [
        {"uid": "u9", "caption": "nothing"}]
    ref = write_jsonl(tmp_path / "ref.jsonl", refs)
    out = tmp_path / "ev"
    capsfus("eval", "-c", cand, "-r", ref, "--reference-col", "caption", "--id-col", "uid",
            "--raw-col", "raw", "--synthetic-col", "synthetic", "--out", out, "--no-embeddings")
    rep = json.loads((out / "report.json").read_text())
    c = rep["counts"]
    assert (c["candidate_rows"], c["joined"], c["evaluated"]) == (6, 5, 5)
    assert c["candidate_without_reference"] == 1 and c["reference_without_candidate"] == 1
    # aggregates recomputed here from the rows, metric by metric
    joined = [ROWS[i] for i in range(5)]
    ref_text = {0: ROWS[0][2], **{i: f"{ROWS[i][1]} {ROWS[i][0]}" for i in range(1, 5)}}
    s = rep["systems"]["fused"]
    want_rouge = sum(M.rouge_l(f, ref_text[i])["f"] for i, (_, _, f) in enumerate(joined)) / 5
    assert s["rouge_l"] == pytest.approx(want_rouge)
    want_cider = M.CorpusCider()
    for i, (_, _, f) in enumerate(joined):
        want_cider.add(f, ref_text[i])
    assert 0 < s["cider"] == pytest.approx(want_cider.score())
    assert M.rouge_l(ROWS[0][2], ref_text[0])["f"] == 1.0
    assert s["leak"] == pytest.approx(1 / 5)              # "Sentence 1: ..."
    assert s["concatenation"] == pytest.approx(1 / 5)     # the Lake Tahoe row
    assert s["words"] == pytest.approx(sum(len(f.split()) for _, _, f in joined) / 5)
    assert rep["systems"]["raw + synthetic"]["concatenation"] == 1.0
    assert rep["systems"]["raw only"]["retention"] == 1.0
    assert rep["systems"]["synthetic only"]["retention"] == 0.0
    assert rep["judge"] is None
    md = (out / "report.md").read_text()
    assert "## Pairwise judge\n\nnot run" in md and "| raw + synthetic |" in md
    assert "Golden Gate" not in md                        # u5 has no reference: not shown
    assert "CIDEr-D (1 ref.)" in md and "not with COCO's 5-reference figures" in md
    per_row = list(iter_jsonl_zst(out / "per_row.jsonl.zst"))
    assert [r["id"] for r in per_row] == [f"u{i}" for i in range(5)]
    assert per_row[3]["metrics"]["fused"]["concatenation"] is True


def test_eval_of_a_fused_run_counts_rejected_rows(tmp_path):
    rows = [{"TEXT": r, "top_caption": s, "gold": f} for r, s, f in ROWS]
    rows.append({"TEXT": "Orphan alt text 42", "top_caption": "", "gold": "x"})  # no synthetic
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    run = tmp_path / "run"
    capsfus("shard", src, "--out", run)
    capsfus("fuse", run, "--engine", "echo")
    p = capsfus("eval", "-c", run, "-r", run, "--reference-stage", "input",
                "--reference-col", "gold", "--no-embeddings", "--sample", "3")
    rep = json.loads((run / "eval" / "fuse" / "report.json").read_text())
    c = rep["counts"]
    assert c["candidate_rejected"] == 1 and c["evaluated"] == 6
    assert c["reference_without_candidate"] == 0
    assert rep["candidate"]["stage"] == "fuse" and rep["reference"]["column"] == "gold"
    # the echo engine joins raw and synthetic: the concatenation rule must see it
    assert rep["systems"]["fuse"]["concatenation"] == 1.0
    assert len(rep["sample"]) == 3
    assert "6 rows" in p.stderr


def test_eval_errors_are_one_line(tmp_path):
    p = capsfus("eval", "-c", tmp_path / "missing.jsonl", "--out", tmp_path / "o", check=False)
    assert p.returncode == 2 and "error:" in p.stderr and "Traceback" not in p.stderr
    f = write_jsonl(tmp_path / "a.jsonl", [{"raw": "a b", "synthetic": "c d", "fused": "a c"}])
    p = capsfus("eval", "-c", f, check=False)
    assert p.returncode == 2 and "--out" in p.stderr
    p = capsfus("eval", "-c", f, "--out", tmp_path / "o2", "--judge-endpoint", "http://x",
                check=False)
    assert p.returncode == 2 and "--judge-model" in p.stderr
    p = capsfus("eval", "-c", f, "--out", tmp_path / "o3", "--no-embeddings", "--judge-endpoint",
                "http://127.0.0.1:9/v1", "--judge-model", "m", "--judge-rows", -1, check=False)
    assert p.returncode == 2 and "--judge-rows" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_eval_on_the_shared_sample_with_embeddings(tmp_path):
    out = tmp_path / "ev"
    capsfus("eval", "-c", SHARED_SAMPLE, "--out", out, "--limit", "20")
    rep = json.loads((out / "report.json").read_text())
    s = rep["systems"]
    assert rep["counts"]["joined"] == 10_000 and rep["counts"]["evaluated"] == 20
    assert s["raw only"]["sim_raw"] == pytest.approx(1.0, abs=1e-4)
    assert s["synthetic only"]["sim_synthetic"] == pytest.approx(1.0, abs=1e-4)
    off = s["capsfuion_official"]
    assert 0.3 < off["sim_raw"] < 1 and 0.3 < off["sim_synthetic"] < 1
    assert off["retention"] > s["synthetic only"]["retention"]
    assert off["words"] > s["raw only"]["words"]


# ------------------------------------------------------------------------------------ judge
def test_verdict_parsing_and_combination():
    assert parse_verdict("B") == "B" and parse_verdict("Similar.") == "similar"
    assert parse_verdict("I think caption A is better") == "A"
    assert parse_verdict("no idea") is None
    assert combine("A", "B") == ("win", False)          # candidate first, then second
    assert combine("B", "A") == ("lose", False)
    assert combine("A", "A") == ("similar", True)       # position bias: cancelled
    assert combine("identical", "identical") == ("identical", False)
    assert combine("similar", "B") == ("similar", False)


JUDGES = textwrap.dedent('''
    import re
    def _captions(text):
        a = re.search(r"^Caption A: (.*)$", text, re.M).group(1)
        b = re.search(r"^Caption B: (.*)$", text, re.M).group(1)
        return a, b
    def longer(text, body):
        a, b = _captions(text)
        return "A" if len(a) > len(b) else "B" if len(b) > len(a) else "similar"
    def first(text, body):
        return "A"
''')


def _pairs():
    return [{"id": f"r{i}", "raw": r, "synthetic": s, "candidate": f, "reference": None}
            for i, (r, s, f) in enumerate(ROWS)]


def test_judge_both_orders_with_a_content_judge(tmp_path, monkeypatch):
    (tmp_path / "judges.py").write_text(JUDGES)
    monkeypatch.setenv("CAPSFUS_TEST_JUDGE_KEY", "sk-judge")
    srv = start_server(tmp_path, key="sk-judge", answer=f"{tmp_path / 'judges.py'}:longer")
    try:
        res = run_judge(_pairs(), "fused", "raw + synthetic", srv.url, "judge-model",
                        api_key_env="CAPSFUS_TEST_JUDGE_KEY", rows=100)
        reqs = srv.requests()
    finally:
        srv.stop()
    assert res["status"] == "done" and res["prompt"] == PROMPT
    # the longer caption wins in both orders; count it here from the rows themselves
    want = {"win": 0, "lose": 0, "similar": 0, "identical": 0}
    for r, s, f in ROWS:
        concat = f"{r} {s}"
        want["identical" if f == concat else "win" if len(f) > len(concat) else
             "lose" if len(f) < len(concat) else "similar"] += 1
    assert want["identical"] == 1 and want["lose"] == 5     # the rows are what we think
    assert res["totals"] == want and res["order_disagreements"] == 0
    sent = len(ROWS) - want["identical"]                    # identical texts are not sent
    assert len(reqs) == 2 * sent and all(q["status"] == 200 for q in reqs)
    assert len({q["prompt_sha"] for q in reqs}) == 2 * sent  # two different orders


def test_judge_position_bias_cancels(tmp_path):
    (tmp_path / "judges.py").write_text(JUDGES)
    srv = start_server(tmp_path, key=None, answer=f"{tmp_path / 'judges.py'}:first")
    try:
        pairs = _pairs()
        pairs[0]["candidate"] = f" {pairs[0]['raw']}  {pairs[0]['synthetic']} "   # identical
        res = run_judge(pairs, "fused", "raw + synthetic", srv.url, "m")
        n_req = len(srv.requests())
    finally:
        srv.stop()
    # a judge that always says "A" prefers nobody once both orders are asked
    same = sum(" ".join(p["candidate"].split()) == f"{p['raw']} {p['synthetic']}"
               for p in pairs)
    assert same == 2                                     # row 0 (made so) and row 3
    assert res["totals"] == {"win": 0, "lose": 0, "similar": len(ROWS) - same,
                             "identical": same}
    assert res["order_disagreements"] == len(ROWS) - same
    assert n_req == 2 * (len(ROWS) - same)               # identical texts are not sent


_HELD: list = []


def _free_port() -> int:
    """A port where nothing listens and nothing else can start listening during the test
    session: bound here and never listened on, so connecting is refused."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    _HELD.append(s)
    return s.getsockname()[1]


def test_unreachable_or_refusing_judge_is_not_run(tmp_path, monkeypatch):
    url = f"http://127.0.0.1:{_free_port()}/v1"            # nothing listens there
    res = run_judge(_pairs(), "fused", "raw + synthetic", url, "m", max_retries=1, timeout=5)
    assert res["status"] == "not run" and "unreachable" in res["reason"]
    assert "totals" not in res
    srv = start_server(tmp_path, key="sk-right")
    try:
        monkeypatch.setenv("CAPSFUS_TEST_JUDGE_KEY", "sk-wrong-secret")
        res = run_judge(_pairs(), "fused", "raw + synthetic", srv.url, "m",
                        api_key_env="CAPSFUS_TEST_JUDGE_KEY")
    finally:
        srv.stop()
    assert res["status"] == "not run" and "401" in res["reason"]
    assert "sk-wrong-secret" not in json.dumps(res)


def test_eval_cli_with_judge_and_without_reachable_judge(tmp_path):
    (tmp_path / "judges.py").write_text(JUDGES)
    f = write_jsonl(tmp_path / "c.jsonl", [{"raw": r, "synthetic": s, "fused": x}
                                           for r, s, x in ROWS])
    srv = start_server(tmp_path, key=None, answer=f"{tmp_path / 'judges.py'}:longer")
    try:
        capsfus("eval", "-c", f, "--out", tmp_path / "ev", "--no-embeddings",
                "--judge-endpoint", srv.url, "--judge-model", "m")
    finally:
        srv.stop()
    rep = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert rep["judge"]["status"] == "done" and sum(rep["judge"]["totals"].values()) == 6
    md = (tmp_path / "ev" / "report.md").read_text()
    assert "| fused vs raw + synthetic | rows | share |" in md
    capsfus("eval", "-c", f, "--out", tmp_path / "ev2", "--no-embeddings",
            "--judge-endpoint", f"http://127.0.0.1:{_free_port()}/v1", "--judge-model", "m")
    md = (tmp_path / "ev2" / "report.md").read_text()
    judge_section = md.split("## Pairwise judge")[1].split("##")[0]
    assert "not run" in judge_section and "%" not in judge_section


def test_judge_survives_endpoint_faults_and_counts_unparsable_answers(tmp_path):
    (tmp_path / "judges.py").write_text(JUDGES + textwrap.dedent('''
        def babble(text, body):
            return "Both captions have merit."
    '''))
    # 429 (with Retry-After) and 500 on 40% of attempts: the shared client retries them
    srv = start_server(tmp_path, key=None, answer=f"{tmp_path / 'judges.py'}:longer",
                       faults="429,500", fault_rate=0.4, retry_after=0.05, seed=3)
    try:
        res = run_judge(_pairs(), "fused", "raw + synthetic", srv.url, "m", max_retries=6)
        reqs = srv.requests()
    finally:
        srv.stop()
    assert any(q["fault"] for q in reqs)                    # faults did happen
    assert res["status"] == "done" and res["failed"] == 0
    assert res["totals"]["lose"] == 5 and res["totals"]["identical"] == 1
    srv = start_server(tmp_path, key=None, answer=f"{tmp_path / 'judges.py'}:babble")
    try:
        res = run_judge(_pairs(), "fused", "raw + synthetic", srv.url, "m")
    finally:
        srv.stop()
    # only the identical row (decided here, never sent) has an outcome; the judge said nothing
    # usable, so no numbers: "not run", the unparsable answers kept for inspection
    assert res["status"] == "not run" and "unparsed" in res["reason"] and "totals" not in res
    assert sum(r.get("error") == "unparsed" for r in res["rows"]) == len(ROWS) - 1


def test_client_refuses_zero_concurrency():
    """--judge-concurrency 0 would be a semaphore nobody can take: a hang, not a judge."""
    from capsfus.engines.openai_client import ClientSettings, OpenAIClient
    from capsfus.errors import UserError
    with pytest.raises(UserError, match="concurrency"):
        OpenAIClient(ClientSettings(endpoint="http://127.0.0.1:9/v1", model="m", concurrency=0),
                     "k")


def test_unreachable_judge_is_not_run_even_when_the_first_row_is_identical(tmp_path):
    pairs = _pairs()
    pairs[0]["candidate"] = f"{pairs[0]['raw']} {pairs[0]['synthetic']}"   # identical texts
    url = f"http://127.0.0.1:{_free_port()}/v1"            # nothing listens there
    res = run_judge(pairs, "fused", "raw + synthetic", url, "m", max_retries=0, timeout=5)
    assert res["status"] == "not run" and "unreachable" in res["reason"]
    assert "totals" not in res
    res = run_judge(pairs, "fused", "raw + synthetic", url, "m", rows=0)
    assert res["status"] == "not run" and "totals" not in res
