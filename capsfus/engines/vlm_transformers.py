"""A LLaVA-style vision-language chat model through transformers, for
``capsfus caption --engine vlm`` (CPU or GPU).

Each image becomes one user turn of the model's chat template: the image placeholder, then
the ``--format`` instruction (``stages.caption.FORMATS``) or ``--prompt``. The placeholder is
repeated once per image feature the vision tower yields (LlavaProcessor does the same; the
count is measured once at load with a blank image, so the feature-selection strategy and CLS
handling are the model's own). Prompts are batched (padded on the left, as decoder-only
generation needs, should they ever differ in length); decoding is greedy or
beam search (no sampling), so a resumed chunk gives the same captions.

Preprocessing is ours, as for BLIP (``engines.blip``): images arrive as uint8 arrays of the
model's input size, resized (and centre-cropped, as CLIPImageProcessor does) in the decode
threads; ``images.normalize`` applies the ``image_mean`` / ``image_std`` of the folder's
``preprocessor_config.json``. No transformers processor, so torchvision is never imported.

Supported: models whose config has an ``image_token_id`` (or ``image_token_index``) and whose
``get_image_features`` takes fixed-size ``pixel_values`` (LlavaForConditionalGeneration and
its kin). Models with dynamic resolution (Qwen2-VL, LLaVA-NeXT tiles) need ``--engine vllm``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .blip import Caption, _preprocessing, in_batches, pick_device_dtype


def _chat_template(folder: str, tokenizer) -> str | None:
    """The tokenizer's chat template, else the processor's (chat_template.jinja / .json)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    jinja = Path(folder) / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    js = Path(folder) / "chat_template.json"
    if js.exists():
        return json.loads(js.read_text()).get("chat_template")
    return None


def render_prompt(tokenizer, template: str, instruction: str, image_token: str,
                  n_image_tokens: int) -> str:
    """The text of one caption request: a user turn of [image, instruction] through the
    chat template, its image placeholder repeated ``n_image_tokens`` times."""
    conv = [{"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": instruction}]}]
    text = tokenizer.apply_chat_template(conv, chat_template=template, tokenize=False,
                                         add_generation_prompt=True)
    if text.count(image_token) != 1:
        from ..errors import UserError
        raise UserError(f"the chat template renders {text.count(image_token)} {image_token!r} "
                        f"placeholders for one image: it must render content items of type "
                        f"'image' as {image_token!r} once (LLaVA style)")
    return text.replace(image_token, image_token * n_image_tokens)


class VlmCaptioner:
    """``caption(images, ids) -> [Caption]`` with an image-text-to-text chat model."""

    clip_input_size = None
    crop = True                  # CLIP-style vision towers: short side, then centre crop

    def __init__(self, folder: str, *, instruction: str, max_new_tokens: int,
                 min_new_tokens: int = 1, num_beams: int = 1, batch_size: int = 8,
                 dtype: str = "auto"):
        import torch
        from transformers import AutoModelForImageTextToText, AutoTokenizer

        from ..errors import UserError
        self._torch = torch
        self.device, self.dtype = pick_device_dtype(dtype)
        self.model = AutoModelForImageTextToText.from_pretrained(
            folder, dtype=self.dtype).to(self.device).eval()
        cfg = self.model.config
        token_id = getattr(cfg, "image_token_id", None)
        if token_id is None:
            token_id = getattr(cfg, "image_token_index", None)
        if token_id is None or not hasattr(self.model, "get_image_features"):
            raise UserError(f"{folder}: --engine vlm takes LLaVA-style models (an image token "
                            f"and fixed-size images); use --engine vllm for this one")
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        template = _chat_template(folder, self.tokenizer)
        if not template:
            raise UserError(f"{folder} has no chat template (tokenizer_config.json, "
                            f"chat_template.jinja or chat_template.json): --engine vlm needs "
                            f"one to put the --format instruction in a user turn")
        self.input_size, self.mean, self.std = _preprocessing(folder,
                                                              cfg.vision_config.image_size)
        self.image_token = self.tokenizer.convert_ids_to_tokens(token_id)
        self.n_image_tokens = self._count_image_tokens()
        self.instruction = instruction
        self.prompt = render_prompt(self.tokenizer, template, instruction, self.image_token,
                                    self.n_image_tokens)
        # a template that writes BOS itself must not get a second one (as transformers does)
        bos = self.tokenizer.bos_token
        self._add_bos = not (bos and self.prompt.startswith(bos))
        self.batch_size = batch_size
        self.gen = {"max_new_tokens": max_new_tokens,
                    "min_new_tokens": min(min_new_tokens, max_new_tokens),
                    "num_beams": num_beams, "do_sample": False}

    def _count_image_tokens(self) -> int:
        torch = self._torch
        h, w = self.input_size
        with torch.inference_mode():
            px = torch.zeros(1, 3, h, w, dtype=self.dtype, device=self.device)
            feats = self.model.get_image_features(pixel_values=px)
        feats = getattr(feats, "pooler_output", feats)
        return int(feats[0].reshape(-1, feats[0].shape[-1]).shape[0])

    def describe(self) -> dict:
        import torch
        return {"engine": "vlm", "architecture": self.model.config.model_type,
                "device": self.device, "dtype": str(self.dtype).replace("torch.", ""),
                "batch_size": self.batch_size, "torch": torch.__version__,
                "image_tokens": self.n_image_tokens}

    def caption(self, images: np.ndarray, ids: list[str], clip_images=None) -> list[Caption]:
        return in_batches(lambda i, j: self._batch(images[i:j]), len(ids), self.batch_size)

    def _batch(self, images: np.ndarray) -> list[Caption]:
        from .blip import normalize
        torch = self._torch
        tok = self.tokenizer([self.prompt] * len(images), return_tensors="pt", padding=True,
                             add_special_tokens=self._add_bos).to(self.device)
        with torch.inference_mode():
            px = normalize(images, self.mean, self.std).to(self.device, self.dtype)
            seqs = self.model.generate(input_ids=tok["input_ids"],
                                       attention_mask=tok["attention_mask"],
                                       pixel_values=px, **self.gen)
        texts = self.tokenizer.batch_decode(seqs[:, tok["input_ids"].shape[1]:],
                                            skip_special_tokens=True)
        return [Caption(t.strip()) for t in texts]

    def close(self) -> None:
        self.model = None
