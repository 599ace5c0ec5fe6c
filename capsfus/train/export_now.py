"""``capsfus train --export-now``: the latest complete checkpoint as ``OUTPUT/model`` without
training further (a time-boxed run stopped early, on purpose or not). The export is the same
as a finished run's (export.py), plus ``stopped_at_step`` and ``planned_steps``; a later plain
``capsfus train`` with the same flags resumes the training and replaces it."""

from __future__ import annotations

import json
from pathlib import Path


def export_checkpoint(job, console=None) -> Path:
    """``capsfus train --export-now``: OUTPUT/model from the latest complete checkpoint, without
    training further (a time-boxed run stopped early, on purpose or not). The export records the
    step it holds and that the schedule did not finish (``stopped_at_step``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..errors import UserError
    from . import checkpoints as ck
    from .data import load_rows
    from .export import export
    from .trainer import heldout_loss
    out = Path(job.output)
    cfg = job.cfg()
    last = ck.latest_complete(out / "checkpoints")
    if last is None:
        raise UserError(f"{out}: no complete checkpoint to export yet")
    extra = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(job.model_path, **extra)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.lora_r:
        from peft import PeftModel
        base = AutoModelForCausalLM.from_pretrained(job.model_path, dtype=torch.float32, **extra)
        model = PeftModel.from_pretrained(base, str(last))
    elif any(last.glob("*.safetensors")):
        model = AutoModelForCausalLM.from_pretrained(str(last), dtype=torch.float32)
    else:
        raise UserError(f"{last} holds DeepSpeed shards, not weights: resume the training to "
                        f"export (or convert with DeepSpeed's zero_to_fp32.py)")
    step = json.loads((last / "trainer_state.json").read_text())["global_step"]
    rows = load_rows(Path(job.data_dir) / "eval.jsonl")
    rows = rows[:cfg.heldout_loss_rows] if cfg.heldout_loss_rows else rows
    loss = heldout_loss(model, rows, cfg.per_device_batch_size, tokenizer.pad_token_id)

    class Saver:                      # what export() needs of a Trainer
        def save_model(self, folder):
            model.save_pretrained(folder)
    return export(Saver(), tokenizer, job, {
        "heldout": loss, "global_step": step, "stopped_at_step": step,
        "planned_steps": cfg.max_steps, "exported_from": last.name, "resumed_from": None})
