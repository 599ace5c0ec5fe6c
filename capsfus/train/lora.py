"""LoRA (PEFT): a low-rank adapter trained on a frozen base model.

The base stays as loaded (a Hub model, a local folder or a GGUF file, dequantized by
transformers); ``wrap`` adds rank-``lora_r`` adapters to the target modules (default: the
attention and MLP projections) and freezes everything else. HF Trainer saves and restores a
PEFT model's checkpoints itself (``adapter_model.safetensors`` + optimizer, scheduler, RNG and
data position), so resume, the completion markers and retention are the same as for full
finetuning. Under DeepSpeed ZeRO-3 the base is partitioned at load like any model and the
adapters when the engine starts (under ZeRO-2 only optimizer state and gradients are); the
optimizer holds the adapter alone. Resume reads the engine's shards; each checkpoint and the
export also hold the adapter gathered whole (only the trainable weights are gathered:
megabytes, not the base), which ``--export-now`` reads.

The export (``OUTPUT/model``, see export.py) is the adapter folder: ``adapter_config.json``
(its ``base_model_name_or_path`` is the base as it was given to ``--base-model``, not a
machine-local path), ``adapter_model.safetensors``, the tokenizer, ``generation_config.json``,
``prompt.txt`` and ``capsfus_training.json`` (which also records the base's revision and GGUF
file, so ``capsfus fuse --model OUTPUT/model`` finds the base by itself).
"""

from __future__ import annotations

import json
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def wrap(model, cfg):
    """The model with LoRA adapters on ``cfg.target_modules()``; only they train."""
    from peft import LoraConfig, get_peft_model

    from ..errors import UserError
    targets = cfg.target_modules()
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise UserError(f"--lora-target-modules: {', '.join(missing)} not in the model "
                        f"(its linear layers include: "
                        f"{', '.join(sorted(_linear_names(model))[:12])})")
    lc = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                    target_modules=targets, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lc)
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()   # frozen embeddings: checkpointed blocks need grads
    return model


def _linear_names(model) -> set[str]:
    import torch
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)}


def is_adapter(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def finish_export(folder: Path, base_model: str) -> None:
    """Names the base as given (the saved config holds the local folder it was loaded from)."""
    from ..rundir.io import atomic_write_json
    p = folder / ADAPTER_CONFIG
    conf = json.loads(p.read_text(encoding="utf-8"))
    conf["base_model_name_or_path"] = base_model
    atomic_write_json(p, conf)

