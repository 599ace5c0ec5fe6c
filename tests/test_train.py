"""``capsfus train``: formatting and masking, data preparation, complete-only checkpoints, and
real runs: DeepSpeed ZeRO-3 on 2 CPU ranks over gloo (killed with SIGKILL, resumed, exported,
reloaded, fused), and a learning test on a rule-defined fusion task.

The DeepSpeed run compiles DeepSpeed's CPU shared-memory op once per machine (cached in
~/.cache/torch_extensions): the first run on a fresh machine takes a minute longer.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import EXTRAS, PLACES, SUBJECTS, caption_corpus
from runhelp import REPO, assert_exactly_once, capsfus, env

from capsfus.errors import UserError
from capsfus.prompt import PromptTemplate


def fusion_rows(n_repeat: int = 1, seed: int = 0) -> list[dict]:
    """The rule-defined task: the fused caption takes the sentence structure of the synthetic
    caption ("There is …") and the details of the raw one (its place, not the synthetic's
    wrong one), and drops the raw caption's junk. No baseline copy gets it right."""
    rng = random.Random(seed)
    rows = []
    for i, (s, p, e) in enumerate(list(itertools.product(SUBJECTS, PLACES, EXTRAS)) * n_repeat):
        wrong = rng.choice([x for x in PLACES if x != p])
        rows.append({"key": f"k{i}", "raw": f"{s} {p} {e}",
                     "synthetic": f"There is {s} {wrong}.", "fused": f"There is {s} {p}."})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_config(path: Path, **settings) -> Path:
    import yaml
    path.write_text(yaml.safe_dump(settings))
    return path


def read_log(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if x.strip()]


# ------------------------------------------------------------------------------ formatting
@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def _engine(model_dir, **kw):
    from capsfus.engines import EngineSpec, load_engine
    return load_engine(EngineSpec(engine="transformers", model=str(model_dir), **kw))


@pytest.mark.parametrize("chat", [False, True])
def test_training_prompt_is_the_fusion_prompt_and_is_masked(tiny_llama_dir, tiny_llama_chat_dir,
                                                            chat):
    from transformers import AutoTokenizer

    from capsfus.stages.fuse import make_builder
    from capsfus.train.data import Formatter
    model = tiny_llama_chat_dir if chat else tiny_llama_dir
    tok = AutoTokenizer.from_pretrained(model)
    engine = _engine(model)
    builder = make_builder(engine, PromptTemplate())
    fmt = Formatter(tok, PromptTemplate(), "auto", str(model), None, 512)
    assert fmt.chat is chat and fmt.max_prompt_tokens == engine.max_prompt_tokens
    raw, syn = "a red car\n on the street for sale", "There is a red car."
    fused = "There is a red car on the street."
    enc = fmt.encode(raw, syn, fused)
    n = enc["n_prompt"]
    # the prompt tokens are exactly what `capsfus fuse` feeds this model for this row
    assert enc["input_ids"][:n] == engine.encode([builder.build(raw, syn).text])[0]
    assert enc["labels"][:n] == [-100] * n
    assert enc["labels"][n:] == enc["input_ids"][n:]
    assert enc["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(enc["input_ids"][n:-1]).strip() == fused
    if not chat:
        assert tok.decode(enc["input_ids"][:n]).endswith(
            "Sentence 2: There is a red car.\nNew Sentence:")
    unmasked = Formatter(tok, PromptTemplate(), "auto", str(model), None, 512,
                         mask_prompt=False).encode(raw, syn, fused)
    assert unmasked["labels"] == unmasked["input_ids"] == enc["input_ids"]


def test_prompt_budget_cuts_only_the_raw_caption_as_fusion_does(tiny_llama_dir, tokenizer):
    from capsfus.stages.fuse import make_builder
    from capsfus.train.data import Formatter
    engine = _engine(tiny_llama_dir, max_prompt_tokens=200)
    fmt = Formatter(tokenizer, PromptTemplate(), "auto", "tiny", 200, 512)
    raw = " ".join(["a vintage poster in Paris"] * 12)
    enc = fmt.encode(raw, "There is a poster.", "A vintage poster in Paris.")
    assert enc["raw_cut"] and enc["n_prompt"] <= 200
    built = make_builder(engine, PromptTemplate()).build(raw, "There is a poster.")
    assert enc["input_ids"][:enc["n_prompt"]] == engine.encode([built.text])[0]
    assert fmt.encode("x", "", "y") == {"reject": "no_synthetic"}
    assert fmt.encode("x", "y", " ") == {"reject": "no_fused"}
    tight = Formatter(tokenizer, PromptTemplate(), "auto", "tiny", 20, 512)
    assert tight.encode("x", "y", "z")["reject"] == "prompt_over_budget"
    # a dense synthetic caption overflowing the default budget: fusion gives the row the
    # model's room (context - 80 new tokens); training must render the same prompt, not skip it
    fuse_default = _engine(tiny_llama_dir)
    dense = " ".join(["There is a red car on the street."] * 12)
    built = make_builder(fuse_default, PromptTemplate()).build("a red car", dense)
    assert built.text and fuse_default.max_prompt_tokens < built.n_tokens <= 512 - 80
    enc = Formatter(tokenizer, PromptTemplate(), "auto", "tiny", None, 512).encode(
        "a red car", dense, "There is a red car.")
    assert enc["input_ids"][:enc["n_prompt"]] == fuse_default.encode([built.text])[0]
    # a context too short for the target: the fused caption is cut, never the prompt
    short = Formatter(tokenizer, PromptTemplate(), "auto", "tiny", 200, 230)
    e = short.encode("a cat", "There is a cat.", " ".join(["a cat in the kitchen"] * 40))
    assert len(e["input_ids"]) == 230 and e["labels"][:e["n_prompt"]] == [-100] * e["n_prompt"]


def test_prepare_split_skips_and_rerun(tmp_path, tiny_llama_dir, tokenizer):
    from capsfus.train.config import TrainConfig
    from capsfus.train.data import is_heldout, load_rows, prepare, resolve_source
    rows = fusion_rows()
    rows[3]["synthetic"] = None
    rows[4]["fused"] = ""
    rows[5]["raw"] = " ".join(["words"] * 300)   # cut to fit, still used
    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "out"
    source = resolve_source(str(src), out, None, None, None, None)
    assert source.stage == "input" and source.fused_col == "fused"
    cfg = TrainConfig(base_model="tiny", eval_fraction=0.2, deepspeed=None)
    info = prepare(source, tokenizer, "tiny", 512, cfg, out / "data")
    c = info["counts"]
    assert c["skipped"] == {"no_synthetic": 1, "no_fused": 1}
    assert c["train"] + c["eval"] + 2 == c["rows"] == len(rows)
    assert c["raw_cut"] == 1
    train, ev = load_rows(out / "data" / "train.jsonl"), load_rows(out / "data" / "eval.jsonl")
    held = (out / "data" / "heldout_ids.txt").read_text().split("\n")[:-1]
    assert held == [r["id"] for r in ev] and not set(held) & {r["id"] for r in train}
    assert all(is_heldout(i, 0.2, cfg.seed) for i in held)
    assert 0.1 < len(held) / len(rows) < 0.3
    skipped = [json.loads(x) for x in (out / "data" / "skipped.jsonl").read_text().splitlines()]
    assert sorted(s["reason"] for s in skipped) == ["no_fused", "no_synthetic"]
    assert info["seq_len"] == max(len(r["input_ids"]) for r in train + ev)
    before = (out / "data" / "train.jsonl").stat().st_mtime_ns
    assert prepare(source, tokenizer, "tiny", 512, cfg, out / "data") == info   # kept
    assert (out / "data" / "train.jsonl").stat().st_mtime_ns == before
    with pytest.raises(UserError, match="no fused caption column"):
        resolve_source(str(src), out, None, "nope", None, None)


# ----------------------------------------------------------------------------- checkpoints
def _fake_checkpoint(root: Path, step: int, complete: bool) -> Path:
    from capsfus.train.checkpoints import mark_complete
    d = root / f"checkpoint-{step}"
    (d / f"global_step{step}").mkdir(parents=True)
    (d / f"global_step{step}" / "zero_pp_rank_0_model_states.pt").write_bytes(b"x" * 100)
    (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if complete:
        mark_complete(step, d)
    return d


def test_only_complete_checkpoints_are_picked_and_retained(tmp_path):
    from capsfus.train import checkpoints as ck
    root = tmp_path / "checkpoints"
    assert ck.latest_complete(root) is None
    for s in (2, 4, 6):
        _fake_checkpoint(root, s, True)
    half = _fake_checkpoint(root, 8, False)                  # crash before the marker
    truncated = _fake_checkpoint(root, 10, True)             # marker, then a file damaged
    (truncated / "global_step10" / "zero_pp_rank_0_model_states.pt").write_bytes(b"x" * 10)
    wrong = _fake_checkpoint(root, 12, True)                 # marker copied from elsewhere
    (wrong / ck.MARKER).write_text(json.dumps({"step": 6, "files": {}}))
    assert ck.latest_complete(root).name == "checkpoint-6"
    gone = ck.remove_incomplete(root)
    assert sorted(p.name for p in gone) == ["checkpoint-10", "checkpoint-12", "checkpoint-8"]
    assert not half.exists()
    ck.retain(root, 2)
    assert [p.name for _, p in ck.checkpoints(root)] == ["checkpoint-4", "checkpoint-6"]


def test_dist_env_from_slurm():
    from capsfus.train.launch import dist_env_from_slurm
    e = dist_env_from_slurm({"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "gpu[03-04]",
                             "SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1",
                             "SLURM_TASKS_PER_NODE": "8(x2)", "PATH": os.environ["PATH"],
                             # exported by sbatch from the submitting shell: must not win
                             "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"})
    assert e["MASTER_ADDR"] == "gpu03" and e["RANK"] == "9" and e["WORLD_SIZE"] == "16"
    assert e["LOCAL_RANK"] == "1" and e["LOCAL_WORLD_SIZE"] == "8"
    assert e["MASTER_PORT"] == dist_env_from_slurm({"SLURM_JOB_ID": "77"})["MASTER_PORT"] \
        != dist_env_from_slurm({"SLURM_JOB_ID": "78"})["MASTER_PORT"]


# --------------------------------------------------------------------------------- the CLI
def test_cli_errors_are_one_line(tmp_path, tiny_llama_dir):
    src = write_jsonl(tmp_path / "rows.jsonl", fusion_rows()[:40])
    bad = write_config(tmp_path / "bad.yaml", global_batch_size=6, per_device_batch_size=4)
    p = capsfus("train", "--data", src, "--base-model", tiny_llama_dir, "--config", bad,
                "--output", tmp_path / "o", "--nproc", 2, check=False)
    assert p.returncode == 2 and "not a multiple" in p.stderr and "Traceback" not in p.stderr
    unknown = write_config(tmp_path / "unknown.yaml", learning_rat=1e-4)
    p = capsfus("train", "--data", src, "--base-model", tiny_llama_dir, "--config", unknown,
                check=False)
    assert p.returncode == 2 and "learning_rat" in p.stderr
    p = capsfus("train", "--data", tmp_path / "missing", "--base-model", tiny_llama_dir,
                "--output", tmp_path / "o2", check=False)
    assert p.returncode == 2 and "neither a run directory" in p.stderr


def test_deepspeed_config_that_cannot_export_is_refused_before_training(tmp_path):
    from capsfus.train.config import TrainConfig
    ds = json.loads((REPO / "jobs" / "deepspeed-zero3.json").read_text())
    ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    with pytest.raises(UserError, match="stage3_gather_16bit_weights_on_model_save"):
        TrainConfig.load(None, {"deepspeed": str(tmp_path / "ds.json")})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not readable JSON"):
        TrainConfig.load(None, {"deepspeed": str(tmp_path / "bad.json")})
    ds["zero_optimization"]["stage"] = 2                       # ZeRO-2 saves full weights
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    assert TrainConfig.load(None, {"deepspeed": str(tmp_path / "ds.json")}).deepspeed


def test_paper_preset_and_submit_dry_run(tmp_path, tiny_llama_dir):
    from capsfus.train.config import TrainConfig
    cfg = TrainConfig.load(str(REPO / "jobs" / "train-capsfus-llama-13b.yaml"), {})
    assert (cfg.base_model, cfg.global_batch_size, cfg.epochs, cfg.learning_rate,
            cfg.lr_scheduler, cfg.warmup_steps, cfg.adam_beta1, cfg.adam_beta2,
            cfg.adam_epsilon, cfg.weight_decay) == ("meta-llama/Llama-2-13b-hf", 128, 2.0, 1e-5,
                                                    "cosine", 500, 0.9, 0.95, 1e-8, 0.0)
    ds = json.loads(Path(cfg.deepspeed).read_text())["zero_optimization"]
    assert ds["stage"] == 3 and ds["stage3_gather_16bit_weights_on_model_save"] is True
    assert cfg.grad_accumulation(16) == 2
    src = write_jsonl(tmp_path / "rows.jsonl", fusion_rows()[:40])
    p = capsfus("submit", "train", "--data", src, "--base-model", tiny_llama_dir,
                "--output", tmp_path / "o", "--nodes", 2, "--gpus-per-node", 8, "--partition",
                "a100", "--time", "2-00:00:00", "--eval-fraction", 0.2, "--dry-run")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gres=gpu:8",
                 "#SBATCH --partition=a100", "#SBATCH --signal=USR2@120"):
        assert line in p.stdout, p.stdout
    assert "16 rank(s)" in p.stderr
    assert json.loads((tmp_path / "o" / "job.json").read_text())["world_size"] == 16


# -------------------------------------------------------------------- DeepSpeed, 2 ranks
def _expected_lr(step: int, peak: float, warmup: int, total: int) -> float:
    """HF's cosine schedule as logged at ``step`` (the rate the step was taken with)."""
    x = step - 1
    if x < warmup:
        return peak * x / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (x - warmup) / (total - warmup)))


def _group_alive(pgid: int) -> list[int]:
    alive = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                alive.append(int(d.name))
    return alive


def kill_a_step_past_a_checkpoint(args: list[str], out: Path, timeout: float,
                                  poll: float = 0.05, jitter: float = 0.5) -> int:
    """Runs ``capsfus train`` in its own process group and SIGKILLs the whole group (every
    rank) at a random moment after a complete checkpoint and a logged step past it; waits up
    to 10 s for the group to be gone and returns its id."""
    p = subprocess.Popen(args, cwd=REPO, env=env(), start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while not _stepped_past_a_checkpoint(out):
        assert p.poll() is None, f"training ended early: {p.stderr.read()[-3000:]}"
        assert time.time() < deadline, "no complete checkpoint in time"
        time.sleep(poll)
    time.sleep(random.uniform(0, jitter))
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    t = time.time()
    while _group_alive(p.pid) and time.time() < t + 10:
        time.sleep(0.1)
    return p.pid


@pytest.mark.slow
def test_zero3_two_ranks_kill_resume_export_fuse(tmp_path, tiny_llama_dir):
    from capsfus.train.checkpoints import MARKER, checkpoints, latest_complete
    steps, peak, warmup = 24, 2e-3, 3
    src = write_jsonl(tmp_path / "rows.jsonl", fusion_rows())
    cfg = write_config(tmp_path / "tiny.yaml", global_batch_size=4, per_device_batch_size=2,
                       max_steps=steps, learning_rate=peak, warmup_steps=warmup,
                       eval_fraction=0.1, save_steps=4, save_total_limit=2, eval_steps=12,
                       logging_steps=1, samples_per_eval=2, sample_max_new_tokens=6,
                       deepspeed="jobs/deepspeed-zero3.json")
    out = tmp_path / "out"
    args = [sys.executable, "-m", "capsfus.cli", "train", "--data", str(src), "--base-model",
            str(tiny_llama_dir), "--config", str(cfg), "--output", str(out), "--nproc", "2"]

    # 1. run, and SIGKILL the whole process group once a checkpoint is complete
    pgid = kill_a_step_past_a_checkpoint(args, out, timeout=400, jitter=1.0)
    assert not _group_alive(pgid), "ranks survived the kill"
    assert not (out / "model").exists(), "the run finished before the kill: test is void"
    killed_at = max(e.get("step", 0) for e in read_log(out))

    # a half-written newest checkpoint (files there, no marker) must never be picked
    last = latest_complete(out / "checkpoints")
    fake = out / "checkpoints" / "checkpoint-20000"
    shutil.copytree(last, fake)
    (fake / MARKER).unlink()

    # 2. the same command resumes
    p2 = subprocess.run(args, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert p2.returncode == 0, p2.stderr[-4000:]
    assert not fake.exists()
    log = read_log(out)
    starts = [e for e in log if e.get("event") == "start"]
    assert starts[0]["resume_from"] is None and starts[0]["world_size"] == 2
    resumed = starts[-1]["resume_from"]
    assert resumed is not None and resumed != fake.name
    resumed_step = int(resumed.split("-")[1])
    assert 4 <= resumed_step <= killed_at
    second = log[log.index(starts[-1]) + 1:]
    assert [e["step"] for e in second if "loss" in e] == list(range(resumed_step + 1, steps + 1))
    assert_redone_steps_identical(log)

    # global step and the LR schedule continue: every logged step, both runs, on the curve
    final = json.loads((out / "checkpoints" / f"checkpoint-{steps}" / "trainer_state.json")
                       .read_text())
    assert final["global_step"] == steps
    lrs = {e["step"]: e["learning_rate"] for e in final["log_history"] if "learning_rate" in e}
    assert sorted(lrs) == list(range(1, steps + 1))
    for s, lr in lrs.items():
        assert lr == pytest.approx(_expected_lr(s, peak, warmup, steps), rel=1e-6, abs=1e-12), s
    # loss falls
    losses = [e["loss"] for e in final["log_history"] if "loss" in e]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5, losses
    # retention: the newest two complete checkpoints
    assert [c.name for _, c in checkpoints(out / "checkpoints")] == \
        [f"checkpoint-{steps - 4}", f"checkpoint-{steps}"]
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} >= {12, 24} and all("generated" in s for s in samples)

    # 3. the export: full weights gathered from ZeRO-3, reloaded → the same held-out loss
    model_dir = out / "model"
    info = json.loads((model_dir / "capsfus_training.json").read_text())
    assert info["global_step"] == steps and info["world_size"] == 2
    for f in ("model.safetensors", "config.json", "tokenizer.json", "generation_config.json",
              "prompt.txt", "heldout_ids.txt"):
        assert (model_dir / f).is_file(), f
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from capsfus.train.data import load_rows
    from capsfus.train.trainer import heldout_loss
    weights = load_file(model_dir / "model.safetensors")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert all(weights[k].shape == v.shape for k, v in base.state_dict().items()
               if k in weights) and len(weights) >= len(base.state_dict()) - 1
    assert any(not torch.equal(weights[k], v) for k, v in base.state_dict().items()
               if k in weights)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ev = load_rows(out / "data" / "eval.jsonl")
    again = heldout_loss(model, ev, 3, tok.pad_token_id)
    assert again["tokens"] == info["heldout"]["tokens"]
    assert again["loss"] == pytest.approx(info["heldout"]["loss"], rel=1e-4)
    assert base_loss(base, ev, tok) > again["loss"] + 0.5

    # 4. it fuses through `capsfus fuse`, with the exported prompt file, exactly once
    run = out / "data-run"
    capsfus("fuse", run, "--engine", "transformers", "--model", model_dir, "--prompt-file",
            model_dir / "prompt.txt", "--max-new-tokens", 6, "--tag", "trained")
    fused, rejected = assert_exactly_once(run, "fuse@trained")
    assert len(fused) == len(fusion_rows()) and not rejected

    # 5. the same command once more: nothing to do
    p3 = subprocess.run(args, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert p3.returncode == 0 and "already trained" in p3.stderr, p3.stderr[-2000:]


def _stepped_past_a_checkpoint(out: Path) -> bool:
    """A complete checkpoint and a logged step after it: a kill now makes the resumed run
    redo at least one step the killed run took."""
    from capsfus.train.checkpoints import latest_complete
    last = latest_complete(out / "checkpoints")
    if last is None:
        return False
    try:
        log = read_log(out)
    except ValueError:               # a line being appended right now
        return False
    return any(e.get("step", 0) > int(last.name.split("-")[1]) for e in log if "loss" in e)


def assert_redone_steps_identical(log: list[dict]) -> None:
    """Model, optimizer, RNG and data position came back exactly: the steps taken both before
    the interruption and after the resume (all those the first run logged past the checkpoint
    resumed from: none only when it stopped right after writing it) have the same loss and
    gradient norm."""
    starts = [i for i, e in enumerate(log) if e.get("event") == "start"]
    before = {e["step"]: e for e in log[starts[-2]:starts[-1]] if "loss" in e}
    resumed = int(log[starts[-1]]["resume_from"].split("-")[1])
    redone = [e for e in log[starts[-1]:] if "loss" in e and e["step"] in before]
    assert [e["step"] for e in redone] == list(range(resumed + 1, max(before) + 1))
    for e in redone:
        old = before[e["step"]]
        assert (e["loss"], e["grad_norm"]) == pytest.approx((old["loss"], old["grad_norm"]),
                                                            rel=1e-6), e["step"]


def base_loss(model, rows, tok) -> float:
    from capsfus.train.trainer import heldout_loss
    return heldout_loss(model, rows, 3, tok.pad_token_id)["loss"]


# -------------------------------------------------------------------------------- learning
def build_scratch_model(folder: Path) -> None:
    """A LLaMA with random weights and a tokenizer whose words are single tokens (short
    sequences: a fast test)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(caption_corpus() * 20, trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = bpe.token_to_id("<s>")
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", bos)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", model_max_length=256)
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        bos_token_id=bos, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )).save_pretrained(folder)


def token_f1(a: str, b: str) -> float:
    a, b = a.split(), b.split()
    common = sum((Counter(a) & Counter(b)).values())
    return 0.0 if not common else 2 * common / (len(a) + len(b))


def prompt_token_loss(model_dir: Path, rows: list[dict]) -> float:
    """Mean loss on the prompt tokens: what masking keeps out of training."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from capsfus.train.trainer import heldout_loss
    tok = AutoTokenizer.from_pretrained(model_dir)
    as_prompt = [{"input_ids": r["input_ids"],
                  "labels": r["input_ids"][:r["n_prompt"]] + [-100] * (len(r["input_ids"])
                                                                       - r["n_prompt"])}
                 for r in rows]
    return heldout_loss(AutoModelForCausalLM.from_pretrained(model_dir), as_prompt, 8,
                        tok.pad_token_id)["loss"]


@pytest.mark.slow
def test_learns_the_fusion_rule_and_masking_matters(tmp_path):
    from capsfus.engines import Decoding, EngineSpec, load_engine
    from capsfus.stages.fuse import FuseProcessor
    from capsfus.train.data import load_rows
    base = tmp_path / "scratch"
    build_scratch_model(base)
    rows = fusion_rows(n_repeat=2)
    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    results = {}
    for mask in (True, False):
        cfg = write_config(tmp_path / f"cfg-{mask}.yaml", global_batch_size=16,
                           per_device_batch_size=16, max_steps=100, learning_rate=3e-3,
                           warmup_steps=20, eval_fraction=0.1, save_steps=1000, eval_steps=1000,
                           logging_steps=20, samples_per_eval=0, mask_prompt=mask,
                           deepspeed=None)
        out = tmp_path / f"out-{mask}"
        capsfus("train", "--data", src, "--base-model", base, "--config", cfg, "--output", out,
                "--fused-col", "fused", timeout=600)
        held = {r["id"]: r for r in load_rows(out / "data" / "eval.jsonl")}
        # held-out rows, fused through the fusion stage's own processor and engine
        source = {f"rows.jsonl:{i}": r for i, r in enumerate(rows)}
        todo = [{"id": i, **source[i]} for i in held]
        engine = load_engine(EngineSpec(engine="transformers", model=str(out / "model"),
                                        decoding=Decoding(max_new_tokens=16)))
        proc = FuseProcessor(engine, PromptTemplate.from_file(str(out / "model" / "prompt.txt")))
        fused, rejected = proc.process(proc.prepare(todo))
        assert not rejected and len(fused) == len(held) >= 100
        gold = [r["fused"] for r in todo]
        candidates = {"model": [r["fused"] for r in fused], "copy-raw": [r["raw"] for r in todo],
                      "copy-synthetic": [r["synthetic"] for r in todo],
                      "concatenation": [f"{r['raw']} {r['synthetic']}" for r in todo]}
        results[mask] = {
            name: {"em": sum(p == g for p, g in zip(preds, gold)) / len(gold),
                   "f1": sum(token_f1(p, g) for p, g in zip(preds, gold)) / len(gold)}
            for name, preds in candidates.items()}
        results[mask]["prompt_loss"] = prompt_token_loss(out / "model", list(held.values()))
    print(json.dumps(results, indent=1))
    m = results[True]
    for baseline in ("copy-raw", "copy-synthetic", "concatenation"):
        assert m["model"]["em"] > m[baseline]["em"] + 0.1, (baseline, m)
        assert m["model"]["f1"] > m[baseline]["f1"] + 0.05, (baseline, m)
    # masking off, same run otherwise: the model spends itself on the prompt (its loss there
    # falls far below the masked model's, which never saw a gradient from the prompt) and
    # fuses worse (measured: exact match 0.28 masked, 0.03 unmasked)
    assert results[False]["prompt_loss"] < results[True]["prompt_loss"] - 1.0, results
    assert results[False]["model"]["em"] < m["model"]["em"] - 0.1, results


def test_reads_the_teacher_stage_of_a_run(tmp_path, tokenizer):
    """Triplets straight from `capsfus teacher` (against the local OpenAI-compatible server)."""
    from openai_server import start_server

    from capsfus.rundir.manifest import Run
    from capsfus.rundir.stage import StageDir
    from capsfus.train.config import TrainConfig
    from capsfus.train.data import load_rows, prepare, resolve_source
    run = tmp_path / "run"
    capsfus("shard", write_jsonl(tmp_path / "rows.jsonl", fusion_rows()[:60]), "--out", run,
            "--rows-per-shard", 25)
    srv = start_server(tmp_path / "srv", key="sk-test")
    try:
        capsfus("teacher", run, "--endpoint", srv.url, "--model", "gpt-3.5-turbo", "--sample",
                30, OPENAI_API_KEY="sk-test")
    finally:
        srv.stop()
    source = resolve_source(str(run), tmp_path / "out", None, None, None, None)
    assert (source.stage, source.fused_col) == ("teacher", "fused")
    info = prepare(source, tokenizer, "tiny", 512, TrainConfig(base_model="tiny",
                                                               eval_fraction=0.2,
                                                               deepspeed=None),
                   tmp_path / "out" / "data")
    teacher_rows = []
    for i in range(3):
        teacher_rows += list(StageDir(Run(run), "teacher").iter_rows(i))
    assert info["counts"]["rows"] == len(teacher_rows) == 30
    got = load_rows(tmp_path / "out" / "data" / "train.jsonl") + \
        load_rows(tmp_path / "out" / "data" / "eval.jsonl")
    by_id = {r["id"]: r for r in teacher_rows}
    for r in got:
        target = tokenizer.decode(r["input_ids"][r["n_prompt"]:-1]).strip()
        assert target == " ".join(by_id[r["id"]]["fused"].split())
