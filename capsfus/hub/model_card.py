"""The model card (README.md) of a pushed checkpoint, rendered from ``hub/model_card.md``.

YAML header: ``pipeline_tag: text-generation``, ``library_name: transformers``, tags,
``base_model`` (a Hub id only, from ``--base-model`` or the checkpoint's
``capsfus_training.json``), and ``license`` only when it is known: ``--license``, else the
licence stated in the base model's own card (a local folder, or the copy in the Hugging Face
cache), else in the checkpoint's existing README.md. It is never guessed: when unknown the field
is left out and the card says so.

The prompt is the checkpoint's ``prompt.txt`` when it has one (``capsfus train`` writes it),
else capsfus' default (the paper's). The transformers snippet is plain runnable Python (the
tests execute it against the pushed model); the vLLM one uses ``LLM.generate`` and
``LLM.beam_search`` (vLLM cannot be installed here: that snippet is only syntax-checked).
"""

from __future__ import annotations

import json
import os
import re
import string
import time
from pathlib import Path

from ..errors import UserError

TRAINING_INFO = "capsfus_training.json"   # written by capsfus.train.export
PROMPT_FILE = "prompt.txt"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TRAINING_KEYS = ("global_batch_size", "per_device_batch_size", "epochs", "max_steps",
                 "learning_rate", "lr_scheduler", "warmup_steps", "adam_beta1", "adam_beta2",
                 "adam_epsilon", "weight_decay", "max_grad_norm", "precision", "mask_prompt",
                 "seed")


def templates_dir() -> Path:
    d = Path(os.environ.get("CAPSFUS_HUB_TEMPLATES")
             or Path(__file__).resolve().parents[2] / "hub")
    if not (d / "model_card.md").exists():
        raise UserError(f"card templates not found in {d}: set CAPSFUS_HUB_TEMPLATES to the "
                        f"capsfus checkout's hub/ folder")
    return d


def card_yaml(text: str) -> dict | None:
    """The YAML header of a card, or None."""
    import yaml
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not m:
        return None
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def _card_license(text: str | None) -> str | None:
    meta = card_yaml(text or "") or {}
    lic = meta.get("license")
    return lic if isinstance(lic, str) and lic.strip() else None


def base_model_card(base: str | None, revision: str | None) -> tuple[str | None, str]:
    """The base model's README.md text, from a local folder or the HF cache (no download)."""
    if not base:
        return None, ""
    p = Path(base)
    if (p / "README.md").is_file():
        return (p / "README.md").read_text(encoding="utf-8", errors="replace"), str(p)
    if HUB_ID.match(base):
        try:
            from huggingface_hub import try_to_load_from_cache
            hit = try_to_load_from_cache(base, "README.md", revision=revision)
        except Exception:
            hit = None
        if isinstance(hit, str) and os.path.isfile(hit):
            return Path(hit).read_text(encoding="utf-8", errors="replace"), f"{base}'s card"
    return None, ""


def find_license(ckpt: Path, base: str | None, revision: str | None,
                 given: str | None) -> tuple[str | None, str]:
    """(licence id or None, where it came from / why it is missing)."""
    if given:
        return given, "given with --license"
    text, where = base_model_card(base, revision)
    if (lic := _card_license(text)):
        return lic, f"from the base model's card ({where})"
    own = ckpt / "README.md"
    if own.is_file() and (lic := _card_license(own.read_text(encoding="utf-8", errors="replace"))):
        return lic, "from the checkpoint's own README.md"
    return None, ("the base model's card was not available where this was pushed and no "
                  "--license was given")


def read_prompt(ckpt: Path) -> tuple[str, str]:
    """(prompt text with {raw}/{synthetic}, where it came from). ``push model`` ships this
    text as ``prompt.txt`` either way."""
    from ..prompt import PromptTemplate
    p = ckpt / PROMPT_FILE
    if p.is_file():
        t = PromptTemplate.from_file(str(p))
        return t.body + t.cue, f"the checkpoint's `{PROMPT_FILE}`"
    t = PromptTemplate()
    return t.body + t.cue, "capsfus' default, the paper's fusion prompt"


def _json_file(p: Path) -> dict | None:
    """The file's JSON, None when it is absent; a broken file is a user error."""
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except ValueError:
        raise UserError(f"{p} is not valid JSON") from None


def _adapter_config(ckpt: Path) -> dict | None:
    return _json_file(ckpt / "adapter_config.json")


def training_info(ckpt: Path) -> dict | None:
    return _json_file(ckpt / TRAINING_INFO)


def _training_section(info: dict | None) -> str:
    if not info:
        return ("No training summary (`capsfus_training.json`) was found in the checkpoint, so "
                "this card does not describe the training.")
    cfg = info.get("config") or {}
    lines = [f"Fine-tuned from `{info.get('base_model')}`"
             + (f" (revision `{info['base_revision']}`)" if info.get("base_revision") else "")
             + f" with `capsfus train` on {info.get('world_size', '?')} rank(s)."]
    data = info.get("data") or {}
    if data:
        counts = data.get("counts") or {}
        if counts:
            lines.append("\nTraining data: " + ", ".join(f"{k}: {v:,}" if isinstance(v, int)
                                                           else f"{k}: {v}"
                                                           for k, v in counts.items()) + ".")
        if data.get("seq_len"):
            lines.append(f"Sequence length: {data['seq_len']}; loss on the fused caption only."
                         if cfg.get("mask_prompt", True) else
                         f"Sequence length: {data['seq_len']}.")
    rows = [(k, cfg[k]) for k in TRAINING_KEYS if k in cfg]
    if rows:
        lines.append("\n| setting | value |\n|---|---|")
        lines += [f"| {k} | {v} |" for k, v in rows]
    metrics = {k: v for k, v in info.items()
               if k not in ("base_model", "base_revision", "config", "world_size", "data",
                            "prompt_sha256") and isinstance(v, (int, float, str))}
    if metrics:
        lines.append("\nResults: " + ", ".join(f"{k} = {v:.4g}" if isinstance(v, float)
                                               else f"{k} = {v}" for k, v in metrics.items()))
    if info.get("prompt_sha256"):
        lines.append(f"\nPrompt sha256: `{info['prompt_sha256']}`.")
    return "\n".join(lines)


def transformers_snippet(repo_id: str, prompt: str, chat: bool) -> str:
    fill = "text = fill(raw, synthetic)"
    if chat:
        fill = ("text = tokenizer.apply_chat_template([{\"role\": \"user\", \"content\": "
                "fill(raw, synthetic)}],\n                                         tokenize=False,"
                " add_generation_prompt=True)")
    return f'''import re

from transformers import AutoModelForCausalLM, AutoTokenizer

repo = "{repo_id}"
tokenizer = AutoTokenizer.from_pretrained(repo, padding_side="left")
if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token
model = AutoModelForCausalLM.from_pretrained(repo, dtype="auto")

PROMPT = {prompt!r}


def fill(raw, synthetic):
    """One pass, so a caption that itself contains "{{synthetic}}" is not expanded."""
    slots = {{"{{raw}}": " ".join(raw.split()), "{{synthetic}}": " ".join(synthetic.split())}}
    return re.sub(r"\\{{raw\\}}|\\{{synthetic\\}}", lambda m: slots[m.group(0)], PROMPT)


pairs = [("Acme Roadster 2019 red convertible for sale | Free Shipping",
          "a red car parked on the street")]
prompts = []
for raw, synthetic in pairs:
    {fill}
    prompts.append(text)
batch = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
out = model.generate(**batch, num_beams=3, max_new_tokens=80, do_sample=False)
fused = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
print([f.strip() for f in fused])'''


def adapter_snippet(repo_id: str, prompt: str, chat: bool, base: str,
                    gguf_file: str | None) -> str:
    """The transformers snippet for a LoRA adapter: the base, then the adapter merged in."""
    plain = transformers_snippet(repo_id, prompt, chat)
    gguf = f", gguf_file={gguf_file!r}" if gguf_file else ""
    head = f'''import re

from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = "{base}"   # the base this adapter was trained on (LoRA: the adapter alone is no model)
repo = "{repo_id}"
tokenizer = AutoTokenizer.from_pretrained(repo, padding_side="left")
if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token
model = AutoModelForCausalLM.from_pretrained(base{gguf}, dtype="auto")
model = PeftModel.from_pretrained(model, repo).merge_and_unload()
'''
    return head + plain.split('dtype="auto")\n', 1)[1]


def vllm_snippet(repo_id: str) -> str:
    return f'''from vllm import LLM, SamplingParams
from vllm.sampling_params import BeamSearchParams

llm = LLM(model="{repo_id}")
# prompts: built exactly as in the transformers example above
outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=80))
print([o.outputs[0].text.strip() for o in outputs])

# beam search, as the paper's released inference (3 beams, 80 new tokens)
tok = llm.get_tokenizer()
beams = llm.beam_search([{{"prompt": p}} for p in prompts],
                        BeamSearchParams(beam_width=3, max_tokens=80))
for p, b in zip(prompts, beams):
    n = len(tok(p)["input_ids"])   # sequences hold the prompt's tokens too
    print(tok.decode(b.sequences[0].tokens[n:], skip_special_tokens=True).strip())'''


def render_model_card(ckpt: Path, repo_id: str, base_model: str | None = None,
                      license: str | None = None) -> tuple[str, dict]:
    """(README.md text, facts: license, license_note, base_model, prompt_source)."""
    import yaml

    from .. import __version__
    info = training_info(ckpt)
    adapter = _adapter_config(ckpt)
    base = base_model or (info or {}).get("base_model") or \
        (adapter or {}).get("base_model_name_or_path")
    revision = (info or {}).get("base_revision")
    lic, lic_note = find_license(ckpt, base, revision, license)
    hub_base = base if base and HUB_ID.match(base) and not Path(base).exists() else None
    meta: dict = {}
    if lic:
        meta["license"] = lic
    if hub_base:
        meta["base_model"] = hub_base
    meta.update({"pipeline_tag": "text-generation",
                 "library_name": "peft" if adapter else "transformers", "language": ["en"],
                 "tags": ["capsfusion", "caption-fusion", "image-captioning", "capsfus"]
                 + (["lora"] if adapter else [])})
    prompt, prompt_source = read_prompt(ckpt)
    chat = bool(((info or {}).get("data") or {}).get("chat"))
    if lic:
        lic_section = f"`{lic}` ({lic_note}). The base model's licence terms apply."
    else:
        lic_section = (f"No licence is declared in this card's header: {lic_note}. The "
                       f"base model's licence{f' (`{base}`)' if base else ''} governs the use "
                       f"of these weights; check it before use.")
    base_sentence = (f"It was fine-tuned from [`{hub_base}`](https://huggingface.co/{hub_base})."
                     if hub_base else f"It was fine-tuned from `{base}`." if base else "")
    if adapter:
        gguf = (info or {}).get("gguf_file")
        named = f"[`{hub_base}`](https://huggingface.co/{hub_base})" if hub_base else f"`{base}`"
        base_sentence = (f"It is a LoRA adapter (rank {adapter.get('r')}, alpha "
                         f"{adapter.get('lora_alpha')}, on "
                         f"{', '.join(sorted(adapter.get('target_modules') or []))}) for the "
                         f"base model {named}" + (f" loaded from its GGUF file `{gguf}`"
                                                  if gguf else "")
                         + ": load the base, then this adapter (merged for speed).")
    values = {
        "yaml": yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip(),
        "model_name": repo_id.split("/")[-1], "repo_id": repo_id,
        "base_model_sentence": base_sentence,
        "capsfus_version": __version__,
        "created": time.strftime("%Y-%m-%d", time.gmtime()),
        "prompt_source": prompt_source, "prompt_text": prompt,
        "transformers_snippet": (adapter_snippet(repo_id, prompt, chat, base or "BASE",
                                                 (info or {}).get("gguf_file"))
                                 if adapter else transformers_snippet(repo_id, prompt, chat)),
        "vllm_snippet": vllm_snippet(repo_id),
        "training_section": _training_section(info),
        "license_section": lic_section,
    }
    tmpl = string.Template((templates_dir() / "model_card.md").read_text(encoding="utf-8"))
    text = tmpl.substitute(values)
    return text, {"license": lic, "license_note": lic_note, "base_model": hub_base,
                  "prompt_source": prompt_source}
