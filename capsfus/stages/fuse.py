"""The fusion stage: raw + synthetic caption -> fused caption, one engine call per chunk.

Rows come from the ``caption`` stage when the run has one, else from ``input``. A row is
rejected (with its reason, in ``fuse/rejected/``) when it still has no synthetic caption
(``no_synthetic``), when its prompt cannot fit the budget (``prompt_over_budget``), or when
generation keeps failing on it alone (``generation_error``, found by bisecting the batch).
Output rows add ``fused``, ``fused_hit_max_tokens`` and ``raw_truncated``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..engines import Engine, EngineSpec, GenerationError
from ..prompt import BuiltPrompt, PromptBuilder, PromptTemplate
from ..rundir.rows import FUSED, RAW, SYNTHETIC
from .failures import RowFailures

log = logging.getLogger("capsfus.fuse")

FUSE_REJECT_REASONS = {
    "no_synthetic": "the row has no synthetic caption (run `capsfus caption` first)",
    "prompt_over_budget": "the prompt does not fit the token budget even with the raw caption "
                          "cut to one token",
    "generation_error": "generation failed on this row alone, every attempt",
}
# reasons that another try may fix (`--retry-rejected`)
FUSE_TRANSIENT_REASONS = frozenset({"generation_error"})


def make_builder(engine: Engine, template: PromptTemplate) -> PromptBuilder:
    return PromptBuilder(template, engine.count_tokens, engine.truncate, engine.caption_tokens,
                         engine.max_prompt_tokens, chat=engine.chat,
                         hard_max_tokens=engine.hard_prompt_tokens)


@dataclass
class FusePrepared:
    items: list[tuple[dict, BuiltPrompt]]
    rejects: list[dict]


class FuseProcessor:
    def __init__(self, engine: Engine, template: PromptTemplate, max_attempts: int = 3):
        self.engine = engine
        self.builder = make_builder(engine, template)
        self.max_attempts = max_attempts
        self.failures = RowFailures((GenerationError,), max_attempts, what="the engine")

    def prepare(self, rows: list[dict]) -> FusePrepared:
        items, rejects = [], []
        for row in rows:
            if not row.get(SYNTHETIC):
                rejects.append({**row, "reason": "no_synthetic", "detail": ""})
                continue
            built = self.builder.build(row[RAW], row[SYNTHETIC])
            if built.reject:
                rejects.append({**row, "reason": built.reject, "detail": built.detail})
                continue
            items.append((row, built))
        return FusePrepared(items, rejects)

    def process(self, prepared: FusePrepared) -> tuple[list[dict], list[dict]]:
        results = self._generate_robust([b.text for _, b in prepared.items])
        out, rejected = [], list(prepared.rejects)
        for (row, built), res in zip(prepared.items, results):
            if isinstance(res, Exception):
                rejected.append({**row, "reason": "generation_error", "detail": str(res)[:500]})
                continue
            out.append({**row, FUSED: res.text, "fused_hit_max_tokens": res.hit_max_tokens,
                        "raw_truncated": built.raw_cut})
        return out, rejected

    def _generate_robust(self, prompts: list[str]) -> list:
        """Generates all prompts; a failing batch is split in halves until the failing rows
        are alone, and a row that fails ``max_attempts`` times alone gets its exception,
        unless so many fail that the engine is to blame (failures.py: EngineFailing)."""
        return self.failures.run(len(prompts),
                                 lambda idx: self.engine.generate([prompts[i] for i in idx]))


@dataclass
class FuseJob:
    """Everything a worker needs to run the fuse stage: plain data, picklable, no secrets."""

    run_dir: str
    stage: str                      # "fuse" or "fuse@TAG"
    spec: EngineSpec
    template: PromptTemplate = field(default_factory=PromptTemplate)
    chunk_size: int = 1000
    max_attempts: int = 3
    transient_reasons = FUSE_TRANSIENT_REASONS     # class constant, not a field

    def settings(self, revision: str | None) -> dict:
        """The output-shaping settings (hashed; a change needs --force)."""
        from ..models import normalize_model
        s = self.spec
        # a local folder typed three ways is one model; an openai model is the server's name
        model = ("echo" if s.engine == "echo" else s.model if s.engine == "openai"
                 else normalize_model(s.model))
        return {"engine": s.engine, "model": model,
                "revision": revision, "gguf_file": s.gguf_file,
                "decoding": s.decoding.to_dict(), "max_prompt_tokens": s.max_prompt_tokens,
                "chat_template": s.chat_template, "dtype": s.dtype,
                "prompt_sha256": self.template.sha256, "prompt_source": self.template.source,
                **self._adapter_settings()}

    def _adapter_settings(self) -> dict:
        """A LoRA adapter's sha256 (and the base it names) when one is used; nothing
        otherwise, so the settings of runs without one hash as before."""
        from ..engines.adapter import is_adapter, read_adapter
        s = self.spec
        folder = s.adapter or (s.model if s.engine == "transformers" and is_adapter(s.model)
                               else None)
        if not folder:
            return {}
        a = read_adapter(folder)
        return {"adapter_sha256": a.sha256, "adapter_base": a.base_model,
                "adapter_base_revision": a.base_revision}

    def to_dict(self) -> dict:
        """Plain JSON (for submission records, so `resume` can rebuild the job)."""
        from dataclasses import asdict
        return {"kind": "fuse", "run_dir": self.run_dir, "stage": self.stage,
                "spec": asdict(self.spec), "template": asdict(self.template),
                "chunk_size": self.chunk_size, "max_attempts": self.max_attempts}

    @classmethod
    def from_dict(cls, d: dict) -> "FuseJob":
        from ..engines import Decoding
        spec = dict(d["spec"])
        spec["decoding"] = Decoding(**spec["decoding"])
        return cls(run_dir=d["run_dir"], stage=d["stage"], spec=EngineSpec(**spec),
                   template=PromptTemplate(**d["template"]), chunk_size=d["chunk_size"],
                   max_attempts=d["max_attempts"])

    def resolve(self, run) -> tuple["FuseJob", str, dict]:
        """Pins the model revision (a Hub id is resolved and downloaded here, before any
        worker starts) and reads the caption stage when the run has one."""
        from dataclasses import replace
        revision = None
        if self.spec.engine not in ("echo", "openai"):     # openai: the server's model name
            from ..engines.adapter import check_base, resolve
            from ..models import resolve_model
            base, gguf_file, adapter = resolve(self.spec.model, self.spec.adapter,
                                               self.spec.gguf_file)
            _, revision = resolve_model(base, self.spec.revision, gguf_file)
            if adapter:
                check_base(adapter, revision)
        job = replace(self, spec=replace(self.spec, revision=revision))
        from .caption import caption_input
        input_stage = caption_input(run)
        return job, input_stage, job.settings(revision)

    def open(self):
        from dataclasses import replace
        from pathlib import Path

        from ..engines import load_engine
        from ..rundir.job import Opened
        spec = self.spec
        if spec.engine.endswith("-server"):   # the server's log beside the worker's
            spec = replace(spec, log_dir=str(Path(self.run_dir) / self.stage / "logs"))
        engine = load_engine(spec)
        return Opened(FuseProcessor(engine, self.template, self.max_attempts),
                      describe=engine.describe(), runtime=engine.runtime(), close=engine.close)
