"""What every rank runs: HF Trainer (+ DeepSpeed ZeRO-3 when configured) on the prepared data.

The same code runs on GPUs and on CPU: on CPU ``DS_ACCELERATOR=cpu``, gloo, fp32 and
``TrainingArguments(use_cpu=True)`` (without it each rank thinks it is alone). The torch
distributed environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) comes from the
launcher (``launch.py``: local ranks or SLURM tasks).

Resume: the newest *complete* checkpoint (checkpoints.py) holds model, optimizer, scheduler,
RNG states and the trainer state; HF Trainer skips the batches already seen in the epoch, so
the data position continues too.

``python -m capsfus.train.trainer OUTPUT`` runs one rank of the job in ``OUTPUT/job.json``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from . import checkpoints as ck
from .config import TrainJob
from .data import TokenDataset, collate, load_rows
from .ranks import barrier, rank, world

log = logging.getLogger("capsfus.train")


def _setup_env() -> bool:
    """Returns True on GPU. Must run before deepspeed is imported."""
    import warnings

    import torch
    # torch 2.13 deprecates the collectives DeepSpeed calls, once per call
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    gpu = torch.cuda.is_available()
    if not gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return gpu








def training_arguments(job: TrainJob, gpu: bool, output_dir: str):
    from transformers import TrainingArguments
    cfg = job.cfg()
    prec = cfg.precision if cfg.precision != "auto" else ("bf16" if gpu else "fp32")
    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=cfg.per_device_batch_size,
        per_device_eval_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.grad_accumulation(world()),
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps, adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2,
        adam_epsilon=cfg.adam_epsilon, weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm, seed=cfg.seed, data_seed=cfg.seed,
        bf16=prec == "bf16", fp16=prec == "fp16",
        activation_checkpointing=cfg.gradient_checkpointing,
        optim="adamw_torch_fused" if gpu else "adamw_torch",
        eval_strategy="steps", eval_steps=cfg.eval_steps,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=None,
        logging_strategy="steps", logging_steps=cfg.logging_steps, logging_first_step=True,
        report_to="none", use_cpu=not gpu, ddp_backend=None if gpu else "gloo",
        deepspeed=cfg.deepspeed, dataloader_num_workers=0, remove_unused_columns=False,
        disable_tqdm=rank() != 0,
    )


def make_callbacks(job: TrainJob, tokenizer, eval_rows: list[dict], zero3: bool):
    from transformers import TrainerCallback
    out = Path(job.output)
    cfg = job.cfg()
    ckpt_root = out / "checkpoints"

    class Checkpoints(TrainerCallback):
        """Completion marker (after every rank wrote its part) and retention."""

        def on_save(self, args, state, control, **kw):
            barrier()
            if rank() == 0:
                folder = ckpt_root / f"checkpoint-{state.global_step}"
                ck.mark_complete(state.global_step, folder)
                ck.retain(ckpt_root, cfg.save_total_limit)
            barrier()

    class Log(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if rank() == 0 and logs:
                with open(out / "log.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": state.global_step, "time": time.time(),
                                        **logs}) + "\n")

    class Samples(TrainerCallback):
        """A few held-out rows generated at each evaluation (every rank must generate under
        ZeRO-3: the weights are gathered collectively)."""

        def on_evaluate(self, args, state, control, model=None, **kw):
            rows = eval_rows[:cfg.samples_per_eval]
            if not rows or model is None:
                return
            got = generate(model, tokenizer, [r["input_ids"][:r["n_prompt"]] for r in rows],
                           cfg.sample_max_new_tokens, synced=zero3 and world() > 1)
            if rank() == 0:
                with open(out / "samples.jsonl", "a", encoding="utf-8") as f:
                    for r, text in zip(rows, got):
                        target = tokenizer.decode(r["input_ids"][r["n_prompt"]:],
                                                  skip_special_tokens=True).strip()
                        f.write(json.dumps({"step": state.global_step, "id": r["id"],
                                            "target": target, "generated": text},
                                           ensure_ascii=False) + "\n")
                        log.info("sample %s: %r (target %r)", r["id"], text, target)

    return [Checkpoints(), Log(), Samples()]


def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int,
             synced: bool = False) -> list[str]:
    """Greedy, one prompt at a time (a handful of samples: no padding subtleties)."""
    import torch
    was_training = model.training
    model.eval()
    out = []
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for p in prompts:
                ids = torch.tensor([p], device=device)
                seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                     max_new_tokens=max_new_tokens, do_sample=False,
                                     num_beams=1, synced_gpus=synced,
                                     pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.eos_token_id)
                out.append(tokenizer.decode(seq[0, len(p):], skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return out


def heldout_loss(model, rows: list[dict], batch_size: int, pad_id: int) -> dict:
    """Token-weighted mean loss on the labelled tokens of ``rows`` (independent of batching
    and of the number of ranks, up to float rounding). Every rank must call it: each does its
    stride of the rows, padded with empty batches to the same count (ZeRO-3 gathers weights
    collectively)."""
    import math

    import torch
    import torch.nn.functional as F
    r, w = rank(), world()
    mine = rows[r::w]
    n_batches = math.ceil(math.ceil(len(rows) / w) / batch_size)
    fn = collate(pad_id)
    device = next(model.parameters()).device
    total = torch.zeros(2, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for b in range(n_batches):
            chunk = mine[b * batch_size:(b + 1) * batch_size]
            weight = 1.0 if chunk else 0.0
            batch = fn([{"input_ids": x["input_ids"], "labels": x["labels"]}
                        for x in (chunk or rows[:1])])
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"][:, 1:]
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                  labels.reshape(-1), ignore_index=-100, reduction="sum")
            total += torch.tensor([nll.item() * weight, (labels != -100).sum().item() * weight],
                                  dtype=torch.float64, device=device)
    model.train(was_training)
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    return {"loss": total[0].item() / max(1.0, total[1].item()), "tokens": int(total[1].item())}


def _is_peft(model) -> bool:
    return type(model).__module__.startswith("peft.")


def param_counts(model) -> dict:
    """Trainable and frozen parameters (full sizes), and the frozen ones this rank holds: under
    ZeRO-3 the base is partitioned at load (each rank holds about 1/world of it)."""
    out = {"trainable": 0, "frozen": 0, "frozen_on_this_rank": 0}
    for p in model.parameters():
        full = getattr(p, "ds_numel", None) or p.numel()
        here = p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
        out["trainable" if p.requires_grad else "frozen"] += full
        if not p.requires_grad:
            out["frozen_on_this_rank"] += here
    return out


def trainer_class():
    from transformers import Trainer

    class CapsfusTrainer(Trainer):
        def save_model(self, output_dir=None, _internal_call=False):
            """Checkpoints under DeepSpeed skip the gathered 16-bit copy of the weights: the
            engine's own shards (written with the optimizer) are what resume loads, and a 13B
            gather is 26 GB per checkpoint. The export gathers once, at the end. A LoRA
            adapter is the exception: only the trainable (adapter) weights are gathered, a few
            MB, so each checkpoint holds ``adapter_model.safetensors`` too (``--export-now``
            reads it; resume reads the engine's shards)."""
            if _internal_call and self.is_deepspeed_enabled and not _is_peft(self.model):
                return
            super().save_model(output_dir, _internal_call)
    return CapsfusTrainer


def main(output: str | Path) -> int:
    gpu = _setup_env()
    logging.basicConfig(level=logging.INFO if rank() == 0 else logging.WARNING,
                        format=f"%(asctime)s rank{rank()} %(name)s: %(message)s")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    job = TrainJob.load(output)
    cfg = job.cfg()
    if world() != job.world_size:
        raise SystemExit(f"job prepared for {job.world_size} rank(s), started with {world()}")
    out = Path(job.output)
    ckpt_root = out / "checkpoints"
    data_dir = Path(job.data_dir)
    args = training_arguments(job, gpu, str(ckpt_root))   # before the model: ZeRO-3 init
    _ = args.device   # initialises torch.distributed (accelerate)
    if cfg.deepspeed:
        # zero.Init (model loading) asks deepspeed.comm for the world size: it must wrap the
        # process group before the model is built, or each rank partitions for itself alone
        import deepspeed
        deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")
    extra = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(job.model_path, **extra)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if args.bf16 else (torch.float16 if args.fp16 else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(job.model_path, dtype=dtype, **extra)
    if cfg.gguf_file:
        # transformers dequantizes GGUF weights into plain tensors but keeps the model marked
        # "quantized", which Trainer refuses to train: the weights are ordinary ones now
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if cfg.gradient_checkpointing:
        model.config.use_cache = False
    if cfg.lora_r:
        from .lora import wrap
        model = wrap(model, cfg)
    train_rows = load_rows(data_dir / "train.jsonl")
    eval_rows = load_rows(data_dir / "eval.jsonl")
    zero3 = bool(cfg.deepspeed) and json.loads(Path(cfg.deepspeed).read_text()).get(
        "zero_optimization", {}).get("stage") == 3
    trainer = trainer_class()(model=model, args=args, train_dataset=TokenDataset(train_rows),
                              eval_dataset=TokenDataset(eval_rows),
                              data_collator=collate(tokenizer.pad_token_id),
                              callbacks=make_callbacks(job, tokenizer, eval_rows, zero3))
    if rank() == 0:
        for f in ck.remove_incomplete(ckpt_root):
            log.warning("ignored and removed half-written checkpoint %s", f.name)
    barrier()
    resume = ck.latest_complete(ckpt_root)
    if resume is not None:
        log.info("resuming from %s", resume)
    if rank() == 0:
        with open(out / "log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"event": "start", "time": time.time(), "world_size": world(),
                                "params": param_counts(model),
                                "resume_from": resume.name if resume else None}) + "\n")
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    loss_rows = eval_rows[:cfg.heldout_loss_rows] if cfg.heldout_loss_rows else eval_rows
    loss = heldout_loss(trainer.model, loss_rows, cfg.per_device_batch_size,
                        tokenizer.pad_token_id)
    log.info("held-out loss %.4f over %d tokens", loss["loss"], loss["tokens"])
    from .export import export
    export(trainer, tokenizer, job, {"heldout": loss, "train": result.metrics,
                                     "global_step": trainer.state.global_step,
                                     "resumed_from": resume.name if resume else None})
    barrier()
    return 0


def _leave(code: int) -> None:
    """Exit without the interpreter's teardown of C++ objects: DeepSpeed's CPU communication op
    and gloo can abort there ("terminate called without an active exception") while joining
    their threads, turning a rank that finished its work into exit -6 (seen once in a full CI
    run). Everything a rank writes is already on disk by then (atomic, fsynced writes)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    from ..errors import UserError
    try:
        code = main(sys.argv[1])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        _leave(2)
    _leave(code or 0)
