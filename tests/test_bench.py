"""capsfus bench fuse on a tiny random LLaMA built on the spot (the --random-weights path that
times LLaMA-2-13B on a GPU), feeding capsfus plan --from-bench."""

from __future__ import annotations

import json

import pytest
from runhelp import SHARED_SAMPLE, capsfus



def test_bench_random_weights_tiny_arch_then_plan(tmp_path, tiny_llama_dir):
    out = tmp_path / "bench.json"
    p = capsfus("bench", "fuse", "--random-weights", "--arch", "tiny", "--model", tiny_llama_dir,
                "--rows", 4, "--output-tokens", 5, "--json-out", out, "--device", "cpu")
    r = json.loads(out.read_text())
    assert r["format"] == "capsfus-bench-fuse" and r["random_weights"] and r["arch"] == "tiny"
    assert set(r["results"]) == {"a", "b", "c"} and r["recommended"] == "c"
    for name, res in r["results"].items():
        # random weights never stop by themselves: every output is exactly 5 tokens
        assert res["generated_tokens"] == 4 * 5, name
        assert res["captions_per_s"] == pytest.approx(4 / res["wall_s"])
        assert res["tokens_per_s"] == pytest.approx(20 / res["wall_s"])
    assert r["ratios"]["b_over_a"] == pytest.approx(
        r["results"]["b"]["captions_per_s"] / r["results"]["a"]["captions_per_s"])
    assert "random weights" in r["caveat"] and "CPU" in r["caveat"]
    assert "random weights" in p.stdout and "| (a) released settings" in p.stdout
    assert r["prompt_tokens"]["max"] <= 256 and r["rows"] == 4     # the released cut rule
    plan = json.loads(capsfus("plan", "--rows", 1000, "--gpus", 2, "--from-bench", out,
                              "--json").stdout)
    assert plan["fuse"]["throughput_per_gpu"] == pytest.approx(
        r["results"]["c"]["captions_per_s"])
    assert "random weights" in plan["fuse"]["throughput_source"]


def test_bench_random_weights_output_length_is_the_measured_mean(tmp_path, tiny_llama_dir):
    from transformers import AutoTokenizer

    from capsfus.perf.bench import bench_fuse
    from capsfus.perf.plan import sample_rows
    r = bench_fuse(model=str(tiny_llama_dir), random_arch="tiny", rows=3, variants="c",
                   device="cpu", log=lambda s: None)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    rows, col = sample_rows(str(SHARED_SAMPLE), 3)
    mean = sum(len(tok(x[col], add_special_tokens=False).input_ids) for x in rows) / 3
    assert r["output_tokens_fixed"] == round(mean)
    assert r["results"]["c"]["generated_tokens"] == 3 * round(mean)


def test_bench_real_weights_stop_by_themselves(tmp_path, tiny_llama_dir):
    from capsfus.perf.bench import bench_fuse
    r = bench_fuse(model=str(tiny_llama_dir), rows=3, variants="a,b", device="cpu",
                   log=lambda s: None)
    assert r["output_tokens_fixed"] is None and not r["random_weights"]
    assert r["caveat"] == "small model (0M parameters); CPU"
    for res in r["results"].values():
        assert 0 < res["generated_tokens"] <= 3 * 80
    # same model, same decoding (3 beams), same prompts: the same captions
    assert r["results"]["b"]["identical_to_a"] == 3


def test_bench_errors(tmp_path):
    model = tmp_path / "never-loaded"
    for args, msg in ((["--random-weights"], "--arch"),
                      (["--engine", "vllm", "--model", model], "vllm"),
                      (["--random-weights", "--arch", "llama9", "--model", model],
                       "llama2-13b"),
                      (["--model", model, "--variants", "a,z"], "--variants")):
        p = capsfus("bench", "fuse", *args, check=False)
        assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr, p.stderr
