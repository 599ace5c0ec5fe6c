"""BLIP captioning through transformers, and the CLIP reranker of candidate mode.

Images arrive already decoded and resized to the model's input size as uint8 arrays
(``ingest.images``, in worker threads); here they are stacked, normalised on the device and
captioned in batches. transformers' image processors are not used: transformers 5 prefers
torchvision-based "fast" processors, and torchvision is not part of the CPU install. The
preprocessing is BLIP's own (bicubic resize to ``image_size`` square, rescale, normalise with
the ``image_mean`` / ``image_std`` of the model's ``preprocessor_config.json``).

Candidate mode (LAION-COCO): ``k`` sampled captions per image, the one CLIP scores highest is
kept (``synthetic_clip_score`` records its cosine similarity). Sampling is seeded per batch
from its first row id, so a resumed chunk draws the same captions.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("capsfus.blip")

# BLIP's and CLIP's defaults (OpenAI CLIP statistics) when a folder has no preprocessor config
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Caption:
    text: str
    score: float | None = None        # CLIP cosine similarity (candidate mode)
    candidates: int = 1


def _preprocessing(folder: str, image_size) -> tuple[tuple[int, int], tuple, tuple]:
    """(height, width), mean, std from the folder's preprocessor_config.json, else defaults."""
    size = image_size if isinstance(image_size, (list, tuple)) else (image_size, image_size)
    mean, std = CLIP_MEAN, CLIP_STD
    p = Path(folder) / "preprocessor_config.json"
    if p.exists():
        cfg = json.loads(p.read_text())
        mean = tuple(cfg.get("image_mean") or mean)
        std = tuple(cfg.get("image_std") or std)
        # CLIP resizes the short side, then centre-crops to crop_size: the model's input
        s = cfg.get("crop_size") or cfg.get("size")
        if isinstance(s, dict) and "height" in s and "width" in s:
            size = (s["height"], s["width"])
        elif isinstance(s, dict) and "shortest_edge" in s:
            size = (s["shortest_edge"], s["shortest_edge"])
    return (int(size[0]), int(size[1])), mean, std


def pick_device_dtype(dtype: str):
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        if device == "cuda":
            return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return device, torch.float32
    return device, {"float32": torch.float32, "bfloat16": torch.bfloat16,
                    "float16": torch.float16}[dtype]


def in_batches(run, n: int, batch_size: int) -> list:
    """``run(i, j)`` over [0, n) in slices of ``batch_size``, halved on CUDA out-of-memory."""
    import torch
    out: list = []
    bs, i = batch_size, 0
    while i < n:
        try:
            out += run(i, min(n, i + bs))
            i += bs
        except torch.cuda.OutOfMemoryError:
            if bs == 1:
                raise
            torch.cuda.empty_cache()
            bs = max(1, bs // 2)
            log.warning("out of memory: batch size now %d", bs)
    return out


def batch_seed(seed: int, first_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{first_id}".encode()).digest()[:4], "big")


class ClipScorer:
    """Cosine similarity of image and text embeddings with a CLIP model."""

    def __init__(self, folder: str, dtype: str = "auto"):
        import torch
        from transformers import AutoTokenizer, CLIPModel
        self.device, self.dtype = pick_device_dtype(dtype)
        self.model = CLIPModel.from_pretrained(folder, dtype=self.dtype).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        vc = self.model.config.vision_config
        self.input_size, self.mean, self.std = _preprocessing(folder, vc.image_size)
        self.max_len = min(self.model.config.text_config.max_position_embeddings,
                           getattr(self.tokenizer, "model_max_length", 77) or 77)
        self._torch = torch

    @staticmethod
    def _features(out):
        return out if hasattr(out, "norm") else out.pooler_output

    def scores(self, images: np.ndarray, texts: list[list[str]]) -> list[list[float]]:
        """images (N, H, W, 3) uint8; texts[i]: candidates of image i -> their similarities."""
        torch = self._torch
        with torch.inference_mode():
            px = normalize(images, self.mean, self.std).to(self.device, self.dtype)
            img = self._features(self.model.get_image_features(pixel_values=px)).float()
            flat = [t for ts in texts for t in ts]
            tok = self.tokenizer(flat, padding=True, truncation=True, max_length=self.max_len,
                                 return_tensors="pt").to(self.device)
            txt = self._features(self.model.get_text_features(
                input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])).float()
        img = torch.nn.functional.normalize(img, dim=-1)
        txt = torch.nn.functional.normalize(txt, dim=-1)
        out, k = [], 0
        for i, ts in enumerate(texts):
            out.append((txt[k:k + len(ts)] @ img[i]).tolist())
            k += len(ts)
        return out


class BlipCaptioner:
    """``caption(images, ids) -> [Caption]`` with BlipForConditionalGeneration."""

    def __init__(self, folder: str, *, dtype: str = "auto", batch_size: int = 32,
                 prompt: str | None = None, num_beams: int = 3, max_new_tokens: int = 30,
                 min_new_tokens: int = 5, candidates: int = 1, top_p: float = 0.9,
                 seed: int = 0, clip_folder: str | None = None):
        import torch
        from transformers import AutoTokenizer, BlipForConditionalGeneration
        self._torch = torch
        self.device, self.dtype = pick_device_dtype(dtype)
        self.model = BlipForConditionalGeneration.from_pretrained(
            folder, dtype=self.dtype).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.input_size, self.mean, self.std = _preprocessing(
            folder, self.model.config.vision_config.image_size)
        self.batch_size = batch_size
        self.prompt = prompt or None
        self.num_beams, self.max_new_tokens = num_beams, max_new_tokens
        self.min_new_tokens = min(min_new_tokens, max_new_tokens)
        self.candidates, self.top_p, self.seed = candidates, top_p, seed
        self.clip = ClipScorer(clip_folder, dtype) if clip_folder else None
        # prompt ids: [CLS] prompt [SEP]; generate() swaps [CLS] for BLIP's [DEC] and drops
        # [SEP], so the caption continues the prompt
        if self.prompt:
            ids = self.tokenizer(self.prompt, return_tensors="pt")["input_ids"]
        else:
            ids = torch.tensor([[self.model.config.text_config.bos_token_id,
                                 self.model.config.text_config.sep_token_id]])
        self._prompt_ids = ids
        self._prompt_len = ids.shape[1] - 1   # tokens before generation starts

    @property
    def clip_input_size(self) -> tuple[int, int] | None:
        return self.clip.input_size if self.clip else None

    def describe(self) -> dict:
        import torch
        return {"engine": "transformers", "architecture": "blip", "device": self.device,
                "dtype": str(self.dtype).replace("torch.", ""), "batch_size": self.batch_size,
                "torch": torch.__version__, "clip": bool(self.clip)}

    def caption(self, images: np.ndarray, ids: list[str], clip_images: np.ndarray | None = None
                ) -> list[Caption]:
        return in_batches(lambda i, j: self._batch(
            images[i:j], ids[i:j], None if clip_images is None else clip_images[i:j]),
            len(ids), self.batch_size)

    def _batch(self, images: np.ndarray, ids: list[str], clip_images) -> list[Caption]:
        torch = self._torch
        n = len(ids)
        k = self.candidates
        kw: dict = {"max_new_tokens": self.max_new_tokens,
                    "min_new_tokens": self.min_new_tokens}
        if k > 1:
            torch.manual_seed(batch_seed(self.seed, ids[0]))
            kw.update(do_sample=True, top_p=self.top_p, top_k=0, num_return_sequences=k)
        else:
            kw.update(num_beams=self.num_beams, do_sample=False)
        with torch.inference_mode():
            px = normalize(images, self.mean, self.std).to(self.device, self.dtype)
            input_ids = self._prompt_ids.repeat(n, 1).to(self.device)
            seqs = self.model.generate(pixel_values=px, input_ids=input_ids,
                                       attention_mask=torch.ones_like(input_ids), **kw)
        texts = [t.strip() for t in self.tokenizer.batch_decode(
            seqs[:, self._prompt_len:], skip_special_tokens=True)]
        if k == 1:
            return [Caption(t) for t in texts]
        groups = [texts[j * k:(j + 1) * k] for j in range(n)]
        if self.clip is None or clip_images is None:
            # no reranker: the first non-empty sample
            return [Caption(next((t for t in g if t), g[0]), None, k) for g in groups]
        # score distinct non-empty candidates only; an all-empty group keeps ""
        uniq = [sorted({t for t in g if t}) or [""] for g in groups]
        sims = self.clip.scores(clip_images, uniq)
        out = []
        for cands, s in zip(uniq, sims):
            best = int(np.argmax(s))
            out.append(Caption(cands[best], round(float(s[best]), 5), k))
        return out

    def close(self) -> None:
        self.model = None
        self.clip = None


def normalize(batch: np.ndarray, mean, std):
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 torch tensor, (x/255 - mean) / std."""
    import torch
    x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float().div_(255)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s
