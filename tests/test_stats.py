"""capsfus stats: word and trigram counts against a brute-force count, the bounded-memory
merge of per-shard sorted runs, HyperLogLog's error, the paper's means on the real 10k sample,
and the command on runs and on outside files (--input)."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from runhelp import capsfus, env, write_rows

from capsfus.ingest.example_data import example_data
from capsfus.ingest.shard import shard
from capsfus.quality.stats import (
    HyperLogLog,
    compute_stats,
    count_unique_sorted_runs,
    mix64,
    table3_markdown,
    trigram_hashes,
    words,
)
from capsfus.rundir.manifest import Run

REPO = Path(__file__).resolve().parents[1]
SAMPLE = example_data()   # the release rows the repository carries (tests/data/)
COLS = {"raw": "raw", "synthetic": "synthetic", "fused": "fused"}


def cq(*args, check=True, **env_extra) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "capsfus.cli", *map(str, args)],
                       capture_output=True, text=True, timeout=240, env=env(**env_extra),
                       cwd=REPO)
    if check and p.returncode != 0:
        raise AssertionError(f"exited {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return p


def brute(captions) -> dict:
    """The definition, done the obvious way: str.split() words, sets of word triples."""
    caps = [c for c in captions if isinstance(c, str)]
    tri = set()
    for c in caps:
        w = c.split()
        tri.update(zip(w, w[1:], w[2:]))
    return {"rows": len(caps), "words": sum(len(c.split()) for c in caps), "unique": len(tri)}


def random_rows(n: int, seed: int = 0) -> list[dict]:
    rnd = random.Random(seed)
    vocab = [f"w{i}" for i in range(300)] + ["Dog.", "dog", "DOG", "a", "the", "é", "日本",
                                             "x\u00a0y"]
    rows = []
    for i in range(n):
        def cap(lo, hi):
            return " ".join(rnd.choice(vocab) for _ in range(rnd.randint(lo, hi)))
        fused = cap(0, 30)
        if i % 17 == 0:
            fused = "  \t" + fused + "\n  "          # odd whitespace
        rows.append({"raw": cap(1, 25), "synthetic": cap(0, 12) if i % 11 else None,
                     "fused": fused if i % 13 else "", "uid": f"r{i}"})
    return rows


@pytest.fixture(scope="module")
def random_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stats")
    rows = random_rows(3000)
    src = tmp / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shard([str(src)], tmp / "run", rows_per_shard=700, raw_col="raw", synthetic_col="synthetic",
          id_col="uid")
    return Run(tmp / "run"), rows


# ------------------------------------------------------------------------------ definition
def test_words_are_whitespace_tokens_with_case_and_punctuation():
    assert words("A  dog.\tThe\ndog\u00a0runs ") == ["A", "dog.", "The", "dog", "runs"]
    assert words("   ") == []
    h = trigram_hashes([["a", "b", "c", "d"], ["a", "b"], ["b", "c", "d"]])
    assert len(h) == 3 and h[1] == h[2] and h[0] != h[1]      # b c d twice, a b c once
    assert trigram_hashes([["b", "a", "c"]])[0] != trigram_hashes([["a", "b", "c"]])[0]


def test_mix64_is_a_bijection_on_a_sample():
    x = np.arange(1 << 16, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    assert len(np.unique(mix64(x))) == len(x)


def test_exact_counts_match_brute_force_across_shards(random_run):
    run, rows = random_run
    s = compute_stats(run, "input", COLS, budget=5000)
    # the input stage strips the raw caption and empties synthetic to null: same words
    for f in ("raw", "synthetic", "fused"):
        want = brute([r[f] for r in rows] if f != "synthetic" else
                     [r[f] if r[f] and r[f].strip() else None for r in rows])
        got = s["fields"][f]
        assert got["rows"] == want["rows"], f
        assert got["words"] == want["words"], f
        assert got["unique_trigrams"] == got["unique_trigrams_exact"] == want["unique"], f
        assert math.isclose(got["mean_words"], want["words"] / want["rows"])
        assert sum(got["length_hist"]["counts"]) == want["rows"]
    assert s["shards_measured"] == 5 and s["rows"] == 3000


def test_merge_with_tiny_budget_and_many_runs_is_exact(tmp_path):
    rnd = np.random.default_rng(0)
    runs, allv = [], []
    for i in range(40):
        v = np.unique(rnd.integers(0, 1 << 63, size=rnd.integers(0, 3000), dtype=np.uint64)
                      * np.uint64(2))
        if i % 3 == 0 and allv:
            v = np.unique(np.concatenate([v, allv[-1][:500]]))   # overlaps between shards
        p = tmp_path / f"{i}.npy"
        np.save(p, v)
        runs.append(p)
        allv.append(v)
    want = len(np.unique(np.concatenate(allv)))
    for budget in (500, 10_000, 10**9):
        assert count_unique_sorted_runs(runs, budget) == want
    assert count_unique_sorted_runs([], 10) == 0


def test_stats_are_cached_per_shard_and_stable(random_run):
    run, _ = random_run
    a = compute_stats(run, "input", COLS)
    b = compute_stats(run, "input", COLS, workers=2)
    for f in a["fields"]:
        assert a["fields"][f] == b["fields"][f]


# ------------------------------------------------------------------------------ HyperLogLog
@pytest.mark.parametrize("n", [10, 1000, 50_000, 400_000])
def test_hll_error_within_three_standard_errors(n):
    h = HyperLogLog(14)
    vals = mix64(np.arange(n, dtype=np.uint64) + np.uint64(12345))     # n distinct hashes
    for chunk in np.array_split(vals, 4):
        h.add(chunk)
        h.add(chunk[: len(chunk) // 2])                                 # duplicates: no effect
    err = abs(h.estimate() - n) / n
    assert err < 3 * h.std_error, (n, err)


def test_hll_merge_is_the_sketch_of_the_union():
    a, b, u = HyperLogLog(12), HyperLogLog(12), HyperLogLog(12)
    x = mix64(np.arange(0, 30_000, dtype=np.uint64))
    y = mix64(np.arange(20_000, 60_000, dtype=np.uint64))
    a.add(x), b.add(y), u.add(np.concatenate([x, y]))
    a.merge(b)
    assert np.array_equal(a.reg, u.reg)
    assert abs(a.estimate() - 60_000) / 60_000 < 3 * a.std_error


def test_hll_precision_bounds():
    from capsfus.errors import UserError
    with pytest.raises(UserError):
        HyperLogLog(3)
    assert HyperLogLog(18).std_error < 0.0021


def test_approx_mode_writes_no_runs_and_estimates(random_run):
    run, rows = random_run
    s = compute_stats(run, "input", COLS, approx=True)
    cache = run.root / "stats" / "cache" / "input"
    assert s["mode"] == "approx"
    for f in ("raw", "fused"):
        e = s["fields"][f]
        assert e["unique_trigrams_exact"] is None
        want = brute([r[f] for r in rows])["unique"]
        assert abs(e["unique_trigrams"] - want) / want < 3 * s["hll_std_error"]
    meta = json.loads((cache / "00000.json").read_text())
    assert all("run_file" not in e for e in meta["fields"].values())


# ------------------------------------------------------------------------------ real sample
def test_real_sample_reproduces_the_published_means_and_hll_error(tmp_path):
    """Whitespace words give 10.82 / 8.96 / 22.75 on the 10k sample (the paper's full-data
    figures are 10.95 / 8.99 / 22.74); exact trigrams match brute force; HLL within 3 sigma."""
    run_dir = tmp_path / "run"
    shard([str(SAMPLE)], run_dir, rows_per_shard=3000)
    s = compute_stats(Run(run_dir), "input",
                      {"raw": "raw", "synthetic": "synthetic", "fused": "capsfuion_official"})
    data = json.loads(SAMPLE.read_text())
    means = {f: round(e["mean_words"], 2) for f, e in s["fields"].items()}
    assert means == {"raw": 10.82, "synthetic": 8.96, "fused": 22.75}
    for f, col in (("raw", "laion_2b"), ("synthetic", "laion_coco"),
                   ("fused", "capsfuion_official")):
        e = s["fields"][f]
        assert e["unique_trigrams"] == brute([r[col] for r in data])["unique"]
        assert abs(e["hll_relative_error"]) < 3 * s["hll_std_error"]
    u = {f: e["unique_trigrams"] for f, e in s["fields"].items()}
    assert u["fused"] > u["raw"] > u["synthetic"]         # the paper's ordering
    md = table3_markdown(s)
    assert "| 10.82 |" in md and "| 8.96 |" in md and "| 22.75 |" in md


def test_stats_input_mode_on_the_real_json_list(tmp_path):
    out = tmp_path / "run"
    p = cq("stats", "--input", SAMPLE, "--out", out, "--fused-col", "capsfuion_official",
           "--json")
    s = json.loads(p.stdout)
    assert s["stage"] == "input" and s["rows"] == 10_000
    assert s["fields"]["fused"]["column"] == "capsfuion_official"
    assert s["fields"]["raw"]["column"] == "laion_2b"
    assert round(s["fields"]["fused"]["mean_words"], 2) == 22.75
    for name in ("stats.json", "table3.md", "lengths.png"):
        assert (out / "stats" / name).exists()
    assert (out / "stats" / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stats_input_mode_finds_known_fused_columns(tmp_path):
    rows = [{"laion_2b": f"raw {i} text here", "laion_coco": f"a synthetic caption {i}",
             "capsfusion": f"the fused caption number {i} is here", "image_url": f"u{i}"}
            for i in range(50)]
    src = tmp_path / "c120m.json"
    src.write_text(json.dumps(rows))
    p = cq("stats", "--input", src, "--out", tmp_path / "run", "--json")
    s = json.loads(p.stdout)
    assert s["fields"]["fused"]["column"] == "capsfusion"
    assert s["fields"]["fused"]["mean_words"] == 7.0
    assert s["fields"]["fused"]["unique_trigrams"] == brute(r["capsfusion"] for r in rows)["unique"]
    p = cq("stats", "--input", src, "--out", tmp_path / "run", "--fused-col", "nope",
           check=False)
    assert p.returncode == 2 and "--fused-col 'nope'" in p.stderr


def test_stats_on_a_run_after_fuse_and_filter(tmp_path):
    data = write_rows(tmp_path / "rows.jsonl", 120)
    run = tmp_path / "run"
    capsfus("shard", data, "--out", run, "--rows-per-shard", 50)
    p = cq("stats", run, "--json")                        # no fusion yet: raw and synthetic
    s = json.loads(p.stdout)
    assert s["stage"] == "input" and set(s["fields"]) == {"raw", "synthetic"}
    capsfus("fuse", run, "--engine", "echo")
    cq("filter", run)
    p = cq("stats", run, "--json")                         # default: the filter stage
    s = json.loads(p.stdout)
    rep = json.loads((run / "filter" / "report.json").read_text())
    assert s["stage"] == "filter" and s["rows"] == rep["kept"]
    assert (run / "stats" / "filter_reasons.png").exists()
    p = cq("stats", run, "--stage", "fuse", "--json", "--approx")
    s = json.loads(p.stdout)
    assert s["stage"] == "fuse" and s["rows"] == 120 and s["mode"] == "approx"
    assert "unique_trigrams" in (run / "stats" / "stats.json").read_text()
    p = cq("stats", run, "--stage", "fuse@nope", check=False)
    assert p.returncode == 2 and "does not exist" in p.stderr
