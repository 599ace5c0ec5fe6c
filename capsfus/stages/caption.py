"""The caption stage: fills ``synthetic`` from each row's image (LAION-COCO style), so any
img2dataset download can be fused.

Rows come from ``input`` (``capsfus shard`` of webdataset tars or image-bytes parquet: each
row holds an ``image`` reference, never the bytes). For every chunk, the reader thread reads,
decodes, validates and resizes the chunk's images on ``decode_threads`` threads while the
main thread captions the previous chunk, so the accelerator is not kept waiting for Pillow
(``decode_threads=0`` decodes on the main thread instead: the benchmark's baseline).

- a row that already has a synthetic caption keeps it (``synthetic_origin: "source"``) unless
  ``overwrite``; captioned rows get ``synthetic_origin: "caption"``, ``synthetic_model``,
  ``caption_format`` and, in candidate mode, ``synthetic_clip_score``;
- a row whose image is missing, unreadable, undecodable, truncated, too small or too large
  goes to ``caption/rejected/`` with its reason code (CAPTION_REJECT_REASONS), and so does
  one whose caption came out empty (``caption_empty``).

Output rows keep the ``image`` reference, so ``fuse`` (which reads ``caption`` when the run
has one) and later stages can still find the image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..ingest.images import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIDE,
    IMAGE,
    IMAGE_REJECT_REASONS,
    ImageReader,
    load_image,
    map_threaded,
    resize_uint8,
)
from ..rundir.rows import ID, SYNTHETIC
from .failures import RowFailures

DEFAULT_MODEL = "Salesforce/blip-image-captioning-large"

CAPTION_REJECT_REASONS = {
    **IMAGE_REJECT_REASONS,
    "caption_empty": "the model produced an empty caption for this image",
    "caption_error": "the model failed on this image alone, every attempt",
}
# reasons that another try may fix (`--retry-rejected`); a bad image is the row's own fault
CAPTION_TRANSIENT_REASONS = frozenset({"caption_error"})

# --format: instructions for VLM (chat) engines. BLIP is not instruction-following: it makes
# short captions only, optionally continuing --prompt ("a picture of").
FORMATS = {
    "short": "Write a short caption for this image: one plain sentence of about ten words, "
             "no preamble.",
    "descriptive": "Describe this image in two or three sentences: the main subject, what "
                   "it is doing, and the setting. No preamble.",
    "dense": "Describe this image in dense detail in one paragraph: every visible object with "
             "its attributes (colour, material, count, position), any visible text, the "
             "background and setting, lighting and style. No preamble.",
}
VLM_MAX_NEW_TOKENS = {"short": 40, "descriptive": 120, "dense": 300}


@dataclass
class CaptionJob:
    """Everything a worker needs to run the caption stage: plain data, picklable, no secrets."""

    run_dir: str
    stage: str = "caption"
    model: str = DEFAULT_MODEL
    revision: str | None = None
    engine: str = "transformers"            # transformers (BLIP) | vlm (a VLM, transformers)
    #                                         | vllm (a VLM, untested)
    dtype: str = "auto"
    batch_size: int = 32
    prompt: str | None = None               # BLIP: text the caption continues; VLM: overrides
    format: str = "short"                   # the --format instruction
    num_beams: int = 3
    max_new_tokens: int | None = None       # None: 30 for BLIP, per --format for VLMs
    min_new_tokens: int = 5
    candidates: int = 1                     # > 1: sampled candidates, reranked with CLIP
    top_p: float = 0.9
    seed: int = 0
    clip_model: str | None = None
    clip_revision: str | None = None
    overwrite: bool = False
    min_side: int = DEFAULT_MIN_SIDE
    max_pixels: int = DEFAULT_MAX_PIXELS
    decode_threads: int = 4
    chunk_size: int = 256
    tensor_parallel_size: int = 1
    column: str = SYNTHETIC                 # where the caption goes (e.g. synthetic_dense)
    transient_reasons = CAPTION_TRANSIENT_REASONS   # class constant, not a field

    def __post_init__(self):
        from ..errors import UserError
        if self.engine not in ("transformers", "vlm", "vllm"):
            raise UserError(f"--engine {self.engine}: use transformers (BLIP), vlm (a VLM "
                            f"through transformers) or vllm (a VLM through vLLM)")
        if self.format not in FORMATS:
            raise UserError(f"--format {self.format}: use one of {', '.join(FORMATS)}")
        if self.engine == "transformers" and self.format != "short":
            raise UserError(f"--format {self.format} needs an instruction-following VLM "
                            f"(--engine vlm or vllm); BLIP writes short captions only")
        if self.candidates < 1 or self.batch_size < 1 or self.num_beams < 1:
            raise UserError("--candidates, --batch-size and --num-beams must be at least 1")
        if self.clip_model and self.candidates < 2:
            raise UserError("--clip-model reranks candidates: give --candidates K (K >= 2)")
        if self.candidates > 1 and self.engine != "transformers":
            raise UserError("--candidates works with --engine transformers (BLIP) only")
        if self.chunk_size < 1:
            raise UserError("--chunk-size must be at least 1")
        if not self.column.isidentifier() or self.column in ("id", "raw", "url", "fused",
                                                             "image"):
            raise UserError(f"--column {self.column!r}: a new column name such as "
                            f"synthetic_dense (letters, digits, _), or synthetic")

    def new_tokens(self) -> int:
        if self.max_new_tokens:
            return self.max_new_tokens
        return 30 if self.engine == "transformers" else VLM_MAX_NEW_TOKENS[self.format]

    def instruction(self) -> str | None:
        if self.engine == "transformers":
            return self.prompt or None
        return self.prompt or FORMATS[self.format]

    def settings(self) -> dict:
        """The output-shaping settings (hashed; a change needs --force)."""
        dec = {"max_new_tokens": self.new_tokens(), "min_new_tokens": self.min_new_tokens}
        if self.candidates > 1:
            # sampling is seeded per batch, and batches are cut within chunks: both sizes
            # decide which captions are drawn, so a resume must keep them
            dec.update(candidates=self.candidates, top_p=self.top_p, seed=self.seed,
                       batch_size=self.batch_size, chunk_size=self.chunk_size)
        else:
            dec.update(num_beams=self.num_beams)
        from ..models import normalize_model   # one folder typed several ways is one model
        return {"engine": self.engine, "model": normalize_model(self.model),
                "revision": self.revision,
                "dtype": self.dtype, "prompt": self.instruction(), "format": self.format,
                "decoding": dec, "clip_model": normalize_model(self.clip_model),
                "clip_revision": self.clip_revision, "overwrite": self.overwrite,
                "min_side": self.min_side, "max_pixels": self.max_pixels,
                "column": self.column,
                "decode": "pillow, jpeg draft to the model's input size"}

    def to_dict(self) -> dict:
        return {"kind": "caption", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "CaptionJob":
        d = {k: v for k, v in d.items() if k != "kind"}
        return cls(**d)

    def resolve(self, run) -> tuple["CaptionJob", str, dict]:
        """Pins the model (and CLIP) revisions before any worker starts; a Hub id is
        downloaded here, so workers can run offline."""
        from dataclasses import replace

        from ..models import resolve_model
        _, rev = resolve_model(self.model, self.revision)
        job = replace(self, model=_absolute(self.model), revision=rev)
        if self.clip_model:
            _, crev = resolve_model(self.clip_model, self.clip_revision)
            job = replace(job, clip_model=_absolute(self.clip_model), clip_revision=crev)
        return job, caption_input(run, exclude=self.stage), job.settings()

    def open(self):
        from ..rundir.job import Opened
        captioner = self.load_captioner()
        proc = CaptionProcessor(self, captioner)

        def close() -> None:
            proc.reader.close()
            captioner.close()

        return Opened(proc, describe=captioner.describe(), close=close)

    def load_captioner(self):
        from ..models import resolve_model
        folder, _ = resolve_model(self.model, _hub_rev(self.revision))
        if self.engine == "vlm":
            from ..engines.vlm_transformers import VlmCaptioner
            return VlmCaptioner(folder, instruction=self.instruction(),
                                max_new_tokens=self.new_tokens(),
                                min_new_tokens=self.min_new_tokens, num_beams=self.num_beams,
                                batch_size=self.batch_size, dtype=self.dtype)
        if self.engine == "vllm":
            from ..engines.vllm_vlm import VllmCaptioner
            return VllmCaptioner(folder, instruction=self.instruction(),
                                 max_new_tokens=self.new_tokens(), batch_size=self.batch_size,
                                 dtype=self.dtype, tensor_parallel_size=self.tensor_parallel_size)
        from ..engines.blip import BlipCaptioner
        clip = resolve_model(self.clip_model, _hub_rev(self.clip_revision))[0] \
            if self.clip_model else None
        return BlipCaptioner(folder, dtype=self.dtype, batch_size=self.batch_size,
                             prompt=self.prompt, num_beams=self.num_beams,
                             max_new_tokens=self.new_tokens(), min_new_tokens=self.min_new_tokens,
                             candidates=self.candidates, top_p=self.top_p, seed=self.seed,
                             clip_folder=clip)


def _absolute(model: str) -> str:
    """A local model folder as an absolute path (workers may start elsewhere); a Hub id as is."""
    from pathlib import Path
    p = Path(model).expanduser()
    return str(p.resolve()) if p.is_dir() else model


def _hub_rev(rev: str | None) -> str | None:
    return None if rev is None or rev.startswith("local:") else rev


@dataclass
class Decoded:
    pixels: object | None = None      # (H, W, 3) uint8 for the captioner, or a PIL image (VLM)
    clip: object | None = None        # (H, W, 3) uint8 for the CLIP reranker
    reason: str | None = None
    detail: str = ""


@dataclass
class CaptionPrepared:
    rows: list[dict]
    todo: list[int]                          # indices of rows to caption
    decoded: list[Decoded] | None = None     # None: decode in process() (no threads)


class CaptionProcessor:
    def __init__(self, job: CaptionJob, captioner):
        self.job = job
        self.captioner = captioner
        from pathlib import Path

        from ..rundir.manifest import Run
        sources = Run(Path(job.run_dir)).manifest()["sources"]
        self.reader = ImageReader(sizes={s["path"]: s["size"] for s in sources
                                         if s["kind"] in ("tar", "parquet")})
        # a model failure on one image rejects that row (caption_error); on most rows, the
        # captioner is broken: the shard fails and the worker stops (failures.py)
        self.failures = RowFailures((Exception,), max_attempts=2, what="the captioner")

    def _caption(self, pixels, ids: list[str], clip, idx: list[int]) -> list:
        """The captioner on rows ``idx`` of the chunk. ``CAPSFUS_CAPTION_FAIL_ON=TEXT`` (a test
        hook, like the echo engine's) makes any call fail whose row ids contain TEXT (``*``:
        every call), as a model that crashes would."""
        import os
        sub_ids = [ids[i] for i in idx]
        fail_on = os.environ.get("CAPSFUS_CAPTION_FAIL_ON")
        if fail_on and (fail_on == "*" or any(fail_on in i for i in sub_ids)):
            raise RuntimeError(f"captioner: injected failure ({fail_on!r} in the batch)")
        px = pixels[idx] if hasattr(pixels, "shape") else [pixels[i] for i in idx]
        caps = self.captioner.caption(px, sub_ids, None if clip is None else clip[idx])
        if len(caps) != len(idx):
            raise RuntimeError(f"the captioner returned {len(caps)} captions for "
                               f"{len(idx)} images")
        return caps

    def _decode(self, ref) -> Decoded:
        j = self.job
        size = self.captioner.input_size
        clip_size = self.captioner.clip_input_size
        # JPEGs are decoded at the smallest DCT scale that still covers the model inputs
        draft = max(*size, *(clip_size or ())) if size else None
        got = load_image(self.reader, ref, j.min_side, j.max_pixels, draft)
        if got.reason:
            return Decoded(reason=got.reason, detail=got.detail)
        im = got.image
        if size is None:                              # a VLM takes the (downscaled) image
            from ..engines.vllm_vlm import MAX_SIDE
            im.thumbnail((MAX_SIDE, MAX_SIDE))
            return Decoded(im)
        crop = getattr(self.captioner, "crop", False)     # CLIP-style towers (--engine vlm)
        return Decoded(resize_uint8(im, size, crop=crop),
                       resize_uint8(im, clip_size, crop=True) if clip_size else None)

    def _decode_all(self, refs: list, threads: int) -> list[Decoded]:
        return map_threaded(self._decode, refs, threads)

    def prepare(self, rows: list[dict]) -> CaptionPrepared:
        col = self.job.column
        todo = [i for i, r in enumerate(rows) if self.job.overwrite or not r.get(col)]
        p = CaptionPrepared(rows, todo)
        if self.job.decode_threads > 0:
            p.decoded = self._decode_all([rows[i].get(IMAGE) for i in todo],
                                         self.job.decode_threads)
        return p

    def process(self, p: CaptionPrepared) -> tuple[list[dict], list[dict]]:
        import numpy as np
        decoded = p.decoded if p.decoded is not None else \
            self._decode_all([p.rows[i].get(IMAGE) for i in p.todo], 1)
        done: dict[int, dict] = {}          # captioned rows
        refused: dict[int, dict] = {}       # rejected rows
        ok = [(i, d) for i, d in zip(p.todo, decoded) if d.reason is None]
        for i, d in zip(p.todo, decoded):
            if d.reason is not None:
                refused[i] = {**p.rows[i], "reason": d.reason, "detail": d.detail}
        if ok:
            ids = [str(p.rows[i].get(ID)) for i, _ in ok]
            if self.captioner.input_size is None:
                pixels = [d.pixels for _, d in ok]
            else:
                pixels = np.stack([d.pixels for _, d in ok])
            clip = np.stack([d.clip for _, d in ok]) if ok[0][1].clip is not None else None
            caps = self.failures.run(len(ok), lambda idx: self._caption(pixels, ids, clip, idx))
            for (i, _), c in zip(ok, caps):
                row = p.rows[i]
                if isinstance(c, BaseException):
                    refused[i] = {**row, "reason": "caption_error",
                                  "detail": f"{type(c).__name__}: {c}"[:500]}
                    continue
                if not c.text:
                    refused[i] = {**row, "reason": "caption_empty", "detail": ""}
                    continue
                col = self.job.column
                if col == SYNTHETIC:
                    new = {**row, SYNTHETIC: c.text, "synthetic_origin": "caption",
                           "synthetic_model": self.job.model, "caption_format": self.job.format}
                else:           # a second caption column (another --format), for the mixes
                    new = {**row, col: c.text, f"{col}_model": self.job.model,
                           f"{col}_format": self.job.format}
                if row.get(col):
                    new[f"{col}_before"] = row[col]      # --overwrite
                if c.score is not None:
                    new[f"{col}_clip_score"] = c.score
                done[i] = new
        out, rejected = [], []
        for i, row in enumerate(p.rows):
            if i in refused:
                rejected.append(refused[i])
            elif i in done:
                out.append(done[i])
            elif self.job.column == SYNTHETIC:
                out.append({**row, "synthetic_origin": row.get("synthetic_origin", "source")})
            else:
                out.append(row)
        return out, rejected


def caption_input(run, exclude: str | None = None) -> str:
    """The stage a reader of captions takes its rows from: the last caption stage of the run's
    chain (``caption``, then each ``caption@TAG`` reading the one before it), else ``input``.

    A caption stage that already exists keeps the input it was made with (its config); a new
    one (``exclude``: itself) reads the current last one, so caption stages always form one
    chain and ``fuse``, ``teacher`` and ``export`` see every caption column.
    """
    from ..rundir.io import read_json
    if exclude:
        cfg = run.root / exclude / "config.json"
        if cfg.exists():
            return read_json(cfg).get("input_stage") or "input"
    stages = [s for s in run.stages() if s.split("@")[0] == "caption" and s != exclude
              and (run.root / s / "config.json").exists()]
    read_by_another = {read_json(run.root / s / "config.json").get("input_stage")
                       for s in stages}
    leaves = [s for s in stages if s not in read_by_another]
    if not leaves:
        return "input"
    if len(leaves) > 1:
        from ..errors import UserError
        raise UserError(f"the caption stages of {run.root} do not form one chain (ends: "
                        f"{', '.join(leaves)}); remove the stray one")
    return leaves[0]
