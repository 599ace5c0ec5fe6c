"""Training settings: the paper's Sec. 8 defaults, a YAML preset (``--config``) over them, and
command-line flags over both.

``settings()`` are the ones that shape the model (hashed into ``OUTPUT/train_config.json``):
rerunning the same command resumes only when they are unchanged. Where the job runs (ranks,
SLURM settings, checkpoint cadence) is not part of them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..errors import UserError

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DEEPSPEED = str(REPO / "jobs" / "deepspeed-zero3.json")
# attention and MLP projections of LLaMA-style models (LLaMA, Mistral, Qwen, SmolLM2)
DEFAULT_LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass
class TrainConfig:
    base_model: str | None = "meta-llama/Llama-2-13b-hf"
    revision: str | None = None
    # optimisation (paper Sec. 8)
    global_batch_size: int = 128
    per_device_batch_size: int = 4
    epochs: float = 2.0
    max_steps: int = -1                 # > 0 overrides epochs
    learning_rate: float = 1e-5
    lr_scheduler: str = "cosine"        # cosine to 0 at the last step
    warmup_steps: int = 500
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    precision: str = "auto"             # auto: bf16 on GPU, fp32 on CPU
    gradient_checkpointing: bool = False
    deepspeed: str | None = DEFAULT_DEEPSPEED   # None: plain Trainer (DDP when ranks > 1)
    # data
    mask_prompt: bool = True            # loss only on the fused caption
    eval_fraction: float = 0.01
    max_eval_rows: int = 2000
    max_prompt_tokens: int | None = None  # default: as `capsfus fuse` (256, or less)
    chat_template: str = "auto"         # as `capsfus fuse --chat-template`
    prompt_file: str | None = None
    gguf_file: str | None = None        # load the base from this GGUF file in its folder
    # LoRA (PEFT): lora_r > 0 trains a low-rank adapter on the frozen base instead of every
    # weight; the export is then the adapter (safetensors) + what is needed to use it
    lora_r: int = 0
    lora_alpha: float | None = None     # default 2 x lora_r
    lora_dropout: float = 0.05
    lora_target_modules: str = DEFAULT_LORA_TARGETS
    # bookkeeping (do not shape the model)
    save_steps: int = 500
    save_total_limit: int = 3
    eval_steps: int = 500
    logging_steps: int = 10
    samples_per_eval: int = 4
    sample_max_new_tokens: int = 80
    heldout_loss_rows: int = 0          # rows of the held-out set for the final loss (0: all)

    def __post_init__(self):
        if self.global_batch_size < 1 or self.per_device_batch_size < 1:
            raise UserError("global_batch_size and per_device_batch_size must be at least 1")
        if not 0 < self.eval_fraction < 1:
            raise UserError(f"--eval-fraction {self.eval_fraction}: use a fraction in (0, 1)")
        if self.save_steps < 1 or self.eval_steps < 1 or self.save_total_limit < 1:
            raise UserError("save_steps, eval_steps and save_total_limit must be at least 1")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise UserError(f"precision {self.precision!r}: choose auto, bf16, fp16 or fp32")
        if self.chat_template not in ("auto", "on", "off"):
            raise UserError(f"chat_template {self.chat_template!r}: choose auto, on or off")
        if self.lora_r < 0:
            raise UserError(f"--lora {self.lora_r}: the adapter's rank must be 1 or more "
                            f"(0: full finetuning)")
        if self.lora_r and not 0 <= self.lora_dropout < 1:
            raise UserError(f"--lora-dropout {self.lora_dropout}: use a fraction in [0, 1)")
        if self.lora_r and not self.target_modules():
            raise UserError("--lora-target-modules: name at least one module (e.g. q_proj)")
        if self.lora_r and self.lora_alpha is None:
            self.lora_alpha = float(2 * self.lora_r)

    def target_modules(self) -> list[str]:
        return [m.strip() for m in (self.lora_target_modules or "").split(",") if m.strip()]

    @classmethod
    def load(cls, path: str | None, overrides: dict) -> "TrainConfig":
        """Defaults ← YAML file ← overrides (None values are "not given")."""
        data: dict = {}
        if path:
            import yaml
            try:
                data = yaml.safe_load(open(path, encoding="utf-8")) or {}
            except (OSError, yaml.YAMLError) as e:
                raise UserError(f"cannot read --config {path}: {e}") from None
            if not isinstance(data, dict):
                raise UserError(f"--config {path}: a mapping of setting names to values")
            data = {k.replace("-", "_"): v for k, v in data.items() if k != "description"}
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(data) - known)
            if unknown:
                raise UserError(f"--config {path}: unknown setting(s) {', '.join(unknown)} "
                                f"(known: {', '.join(sorted(known))})")
            if data.get("deepspeed") and not Path(data["deepspeed"]).is_absolute():
                # relative to the repository (jobs/…) or to the YAML file
                for base in (Path.cwd(), REPO, Path(path).resolve().parent):
                    if (base / data["deepspeed"]).is_file():
                        data["deepspeed"] = str((base / data["deepspeed"]).resolve())
                        break
        data.update({k: v for k, v in overrides.items() if v is not None})
        cfg = cls(**_coerce(cls, data))
        cfg.deepspeed = cfg.deepspeed or None
        if cfg.deepspeed == DEFAULT_DEEPSPEED and not Path(cfg.deepspeed).is_file():
            raise UserError("jobs/deepspeed-zero3.json is not here (capsfus installed without "
                            "its source checkout): pass --deepspeed FILE or --no-deepspeed")
        if cfg.deepspeed and not Path(cfg.deepspeed).is_file():
            raise UserError(f"deepspeed config {cfg.deepspeed} not found")
        if cfg.deepspeed:
            _check_deepspeed(cfg.deepspeed)
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)

    def settings(self) -> dict:
        """What shapes the model: a change means another training, not a resume."""
        skip = {"save_steps", "save_total_limit", "eval_steps", "logging_steps",
                "samples_per_eval", "sample_max_new_tokens", "max_eval_rows",
                "heldout_loss_rows"}
        d = {k: v for k, v in asdict(self).items() if k not in skip}
        if not d["lora_r"]:
            # full finetuning: the LoRA knobs shape nothing (and old outputs keep their hash)
            for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"):
                d.pop(k)
        if not d["gguf_file"]:
            d.pop("gguf_file")
        if d["deepspeed"]:
            d["deepspeed"] = json.loads(Path(d["deepspeed"]).read_text())
        return d

    def grad_accumulation(self, world_size: int) -> int:
        per_step = self.per_device_batch_size * world_size
        if self.global_batch_size % per_step:
            raise UserError(f"global batch {self.global_batch_size} is not a multiple of "
                            f"per-device batch {self.per_device_batch_size} x {world_size} "
                            f"rank(s): change per_device_batch_size or the number of GPUs")
        return self.global_batch_size // per_step


def _check_deepspeed(path: str) -> None:
    """Before training, not at the export after it: ZeRO-3 must gather the full weights."""
    try:
        ds = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"deepspeed config {path}: not readable JSON ({e})") from None
    zero = ds.get("zero_optimization") if isinstance(ds, dict) else None
    if not isinstance(zero, dict):
        return
    if zero.get("stage") == 3 and zero.get("stage3_gather_16bit_weights_on_model_save") \
            not in (True, "true"):
        raise UserError(f"deepspeed config {path}: ZeRO-3 without "
                        f"stage3_gather_16bit_weights_on_model_save: true cannot export the "
                        f"full weights; set it to true")


def _coerce(cls, data: dict) -> dict:
    """YAML 1.1 reads ``1e-5`` as a string: numbers are converted by the field's type."""
    types = {f.name: f.type for f in fields(cls)}
    out = dict(data)
    for k, v in data.items():
        t = str(types.get(k))
        if isinstance(v, str) and (t.startswith("float") or t.startswith("int")):
            try:
                out[k] = float(v) if t.startswith("float") else int(v)
            except ValueError:
                raise UserError(f"setting {k}: {v!r} is not a number") from None
        elif isinstance(v, int) and not isinstance(v, bool) and t.startswith("float"):
            out[k] = float(v)
    return out


def settings_hash(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class TrainJob:
    """What every rank reads (``OUTPUT/job.json``): plain data, no secrets."""

    output: str
    model_path: str                     # resolved local folder
    model_revision: str
    config: dict = field(default_factory=dict)
    data_dir: str = ""
    world_size: int = 1

    def save(self) -> None:
        from ..rundir.io import atomic_write_json
        atomic_write_json(Path(self.output) / "job.json", asdict(self))

    @classmethod
    def load(cls, output: str | Path) -> "TrainJob":
        from ..rundir.io import read_json
        return cls(**read_json(Path(output) / "job.json"))

    def cfg(self) -> TrainConfig:
        return TrainConfig(**self.config)
