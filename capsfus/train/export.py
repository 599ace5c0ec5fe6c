"""The finished model as a plain HF folder, ``OUTPUT/model``, that ``capsfus fuse --engine
transformers --model OUTPUT/model`` (and vLLM) load as is:

- ``model.safetensors`` + ``config.json``: full weights, gathered from the ZeRO-3 shards on
  rank 0 (``stage3_gather_16bit_weights_on_model_save: true`` in the DeepSpeed config);
  with ``--lora`` instead ``adapter_model.safetensors`` + ``adapter_config.json`` naming the
  base as given to ``--base-model`` (lora.py);
- the tokenizer; a neutral ``generation_config.json`` (special token ids only: decoding is
  chosen by ``capsfus fuse`` flags);
- ``prompt.txt``: the exact prompt the model was trained on, in ``--prompt-file`` form (the
  default template's text plus its ``New Sentence:`` cue: ``capsfus fuse --prompt-file`` then
  renders the very same prompt); ``heldout_ids.txt``; ``capsfus_training.json`` (settings,
  data counts, held-out loss).

Written into a temp folder and renamed into place: a crash mid-export leaves no ``model/``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..rundir.io import _fsync_dir, atomic_write_bytes, atomic_write_json, read_json
from .config import TrainJob

INFO = "capsfus_training.json"


def prompt_file_text(template: dict) -> str:
    return template["body"] + template["cue"] + "\n"


def export(trainer, tokenizer, job: TrainJob, metrics: dict) -> Path:
    """All ranks call it (the gather is collective); rank 0 writes."""
    import os

    from transformers import GenerationConfig

    from .ranks import barrier, rank
    out = Path(job.output)
    final = out / "model"
    tmp = out / ".model.tmp"
    if rank() == 0 and tmp.exists():
        shutil.rmtree(tmp)
    barrier()
    trainer.save_model(str(tmp))
    if rank() == 0:
        if not any(tmp.glob("*.safetensors")):
            raise RuntimeError(f"no safetensors weights in {tmp}: the DeepSpeed config needs "
                               f"stage3_gather_16bit_weights_on_model_save: true")
        cfg = job.cfg()
        if cfg.lora_r:
            from .lora import finish_export
            finish_export(tmp, cfg.base_model)
        tokenizer.save_pretrained(str(tmp))
        GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id).save_pretrained(str(tmp))
        data = read_json(Path(job.data_dir) / "data.json")
        atomic_write_bytes(tmp / "prompt.txt", prompt_file_text(data["template"]).encode())
        shutil.copyfile(Path(job.data_dir) / "heldout_ids.txt", tmp / "heldout_ids.txt")
        atomic_write_json(tmp / INFO, {
            "base_model": job.config["base_model"], "base_revision": job.model_revision,
            "gguf_file": cfg.gguf_file,
            "adapter": ({"type": "lora", "r": cfg.lora_r, "alpha": cfg.lora_alpha,
                         "dropout": cfg.lora_dropout, "target_modules": cfg.target_modules()}
                        if cfg.lora_r else None),
            "config": job.config, "world_size": job.world_size,
            "data": {k: data[k] for k in ("counts", "seq_len", "max_prompt_tokens", "chat")},
            "prompt_sha256": data["template"]["sha256"],
            "settings_hash": read_json(out / "train_config.json")["settings_hash"], **metrics})
        for p in tmp.iterdir():
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(out)
    return final


def exported(output: Path) -> dict | None:
    try:
        return read_json(Path(output) / "model" / INFO)
    except (OSError, ValueError):
        return None
