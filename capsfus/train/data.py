"""Training data: (raw, synthetic, fused) triplets → token ids with the prompt masked.

Where rows come from (``--data``):
- a run directory: its ``teacher`` stage, else ``fuse``, else ``input`` with a fused column
  (``--fused-col``, or the first known one present), or the stage given with ``--stage``;
- any file or folder ``capsfus shard`` reads: sharded first into ``OUTPUT/data-run`` (the same
  ingest, ids and reject reasons as everywhere else; a no-op when it already holds them).

Each row is rendered with the fusion prompt exactly as ``capsfus fuse`` renders it for the same
tokenizer (same template, chat template rule and prompt budget: only the raw caption is cut),
and the target is the fused caption plus EOS. Labels are -100 on the prompt (``mask_prompt``).

The held-out split is a function of the row id alone (sha256 of seed and id), so reruns and
reshardings pick the same rows. Rows that cannot be used go to ``skipped.jsonl`` with a reason;
``heldout_ids.txt`` lists the evaluation rows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import UserError
from ..prompt import PromptBuilder, PromptTemplate, clean_caption
from ..rundir.io import atomic_write_json, dumps, read_json
from ..rundir.manifest import Run

DEFAULT_MAX_PROMPT_TOKENS = 256   # as the transformers engine
FUSE_MAX_NEW_TOKENS = 80          # `capsfus fuse` default; the prompt budget leaves room for it
SKIP_REASONS = {
    "no_synthetic": "the row has no synthetic caption",
    "no_fused": "the fused caption is missing or empty",
    "prompt_over_budget": "the prompt does not fit the budget even with the raw caption cut",
}


# ------------------------------------------------------------------------- finding the rows
@dataclass
class Source:
    run: Run
    stage: str
    fused_col: str

    def describe(self) -> dict:
        return {"run": str(self.run.root), "run_id": self.run.manifest()["run_id"],
                "stage": self.stage, "fused_col": self.fused_col}


def resolve_source(data: str, output: Path, stage: str | None, fused_col: str | None,
                   raw_col: str | None, synthetic_col: str | None, shard_fn=None) -> Source:
    """``shard_fn(inputs, out, raw_col, synthetic_col)`` shards outside files (the CLI passes
    its progress-showing ingest); default: ``ingest.shard``."""
    from ..rundir.rows import KNOWN_FUSED_COLUMNS
    path = Path(data)
    if (path / "manifest.json").is_file():
        if raw_col or synthetic_col:
            raise UserError("--raw-col/--synthetic-col go with an outside file; a run already "
                            "has its column mapping")
        run = Run(path.resolve())
    elif path.exists() or any(c in data for c in "*?["):
        out = output / "data-run"
        if shard_fn is None:
            from ..ingest.shard import shard as ingest
            ingest([data], out, raw_col=raw_col, synthetic_col=synthetic_col)
        else:
            shard_fn([data], out, raw_col, synthetic_col)
        run = Run(out.resolve())
    else:
        raise UserError(f"--data {data}: neither a run directory nor a file or folder of rows")
    run.manifest()
    if stage is None:
        stage = next((s for s in ("teacher", "fuse") if (run.root / s / "config.json").exists()),
                     "input")
    elif not (stage == "input" or (run.root / stage / "config.json").exists()):
        raise UserError(f"stage {stage} does not exist in {run.root} (stages: "
                        f"{', '.join(run.stages())})")
    first = next(iter_stage_rows(run, stage), None)
    if first is None:
        raise UserError(f"stage {stage} of {run.root} has no rows yet")
    if fused_col is None:
        if stage != "input" and "fused" in first:
            fused_col = "fused"
        else:
            fused_col = next((c for c in ("fused",) + KNOWN_FUSED_COLUMNS if c in first), None)
    if fused_col is None or fused_col not in first:
        raise UserError(f"the rows of stage {stage} have no fused caption column "
                        f"{fused_col or ''}(columns: {', '.join(sorted(first))}); pass "
                        f"--fused-col NAME")
    return Source(run, stage, fused_col)


def iter_stage_rows(run: Run, stage: str) -> Iterator[dict]:
    """Every trusted row of a stage (checksums verified), shard by shard."""
    from ..rundir.stage import StageDir, input_rows
    m = run.manifest()
    for i in range(len(m["shards"])):
        if stage == "input":
            yield from input_rows(run, m, "input", i)
        else:
            yield from StageDir(run, stage).iter_rows(i)


def is_heldout(row_id: str, fraction: float, seed: int) -> bool:
    h = hashlib.sha256(f"{seed}\x00{row_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


# ----------------------------------------------------------------------------- formatting
class _Tok:
    """The prompt-budget callbacks over a HF tokenizer, shared with the fusion engines."""

    def __init__(self, tokenizer, chat_mode: str, model: str):
        from ..engines.hf_tokenizer import HFTokenizerMixin

        class T(HFTokenizerMixin):
            pass
        self.t = T()
        self.t.tokenizer = tokenizer
        self.t.setup_chat(chat_mode, model)


def context_length(model_path: str, tokenizer, gguf_file: str | None = None) -> int | None:
    from transformers import AutoConfig

    from ..engines.transformers_engine import context_length as ctx
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    return ctx(AutoConfig.from_pretrained(model_path, **extra), tokenizer)


class Formatter:
    """prompt + target → ``{input_ids, labels}`` exactly as fusion will prompt the model."""

    def __init__(self, tokenizer, template: PromptTemplate, chat_mode: str, model: str,
                 max_prompt_tokens: int | None, context: int | None, mask_prompt: bool = True):
        self.tokenizer = tokenizer
        if tokenizer.eos_token_id is None:
            raise UserError(f"model {model}: its tokenizer has no end-of-sequence token")
        tok = _Tok(tokenizer, chat_mode, model).t
        self.tok = tok
        room = context - FUSE_MAX_NEW_TOKENS if context else None
        budget = max_prompt_tokens or min(DEFAULT_MAX_PROMPT_TOKENS,
                                          room if room and room > 0 else DEFAULT_MAX_PROMPT_TOKENS)
        self.max_prompt_tokens = budget
        self.context = context
        self.chat = tok.chat is not None
        # as the transformers engine: without an explicit budget, a row whose instruction and
        # synthetic caption overflow the default budget gets the model's room
        hard = room if not max_prompt_tokens and room and room > 0 else None
        self.builder = PromptBuilder(template, tok.count_tokens, tok.truncate,
                                     tok.caption_tokens, budget, chat=tok.chat,
                                     hard_max_tokens=hard)
        self.mask_prompt = mask_prompt

    def prompt(self, raw: str, synthetic: str):
        return self.builder.build(raw, synthetic)

    def target_ids(self, fused: str) -> list[int]:
        # a plain prompt ends "New Sentence:"; the answer follows after a space
        text = clean_caption(fused)
        ids = self.tokenizer((text if self.chat else " " + text),
                             add_special_tokens=False)["input_ids"]
        return ids + [self.tokenizer.eos_token_id]

    def encode(self, raw: str, synthetic: str, fused: str) -> dict:
        """``{input_ids, labels, n_prompt}`` or ``{reject, detail}``."""
        if not clean_caption(synthetic or ""):
            return {"reject": "no_synthetic"}
        if not isinstance(fused, str) or not clean_caption(fused):
            return {"reject": "no_fused"}
        built = self.prompt(raw, synthetic)
        if built.reject:
            return {"reject": built.reject, "detail": built.detail}
        p = self.tok.encode([built.text])[0]
        t = self.target_ids(fused)
        if self.context and len(p) + len(t) > self.context:
            t = t[:self.context - len(p)]   # the fused caption is cut; the row still teaches
        labels = ([-100] * len(p) if self.mask_prompt else list(p)) + t
        return {"input_ids": p + t, "labels": labels, "n_prompt": len(p),
                "raw_cut": built.raw_cut}


# ------------------------------------------------------------------------------ preparing
def prepare(source: Source, tokenizer, model: str, context: int | None, cfg,
            out_dir: Path, console=None) -> dict:
    """Writes ``out_dir/{train,eval}.jsonl`` (token ids), ``heldout_ids.txt``,
    ``skipped.jsonl`` and ``data.json`` (counts, sequence length). Deterministic: a rerun
    with the same inputs and settings finds ``data.json`` and keeps the files."""
    template = PromptTemplate.from_file(cfg.prompt_file) if cfg.prompt_file else PromptTemplate()
    fmt = Formatter(tokenizer, template, cfg.chat_template, model, cfg.max_prompt_tokens,
                    context, cfg.mask_prompt)
    m = source.run.manifest()
    key = {"source": source.describe(), "shards": [s["sha256"] for s in m["shards"]],
           "stage_states": _stage_fingerprint(source),
           "template_sha256": template.sha256, "chat": fmt.chat,
           "max_prompt_tokens": fmt.max_prompt_tokens, "context": context,
           "mask_prompt": cfg.mask_prompt, "eval_fraction": cfg.eval_fraction,
           "max_eval_rows": cfg.max_eval_rows, "seed": cfg.seed,
           "tokenizer": _tokenizer_fingerprint(tokenizer)}
    info_path = out_dir / "data.json"
    if info_path.exists():
        info = read_json(info_path)
        if info.get("key") == key:
            return info
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {"rows": 0, "train": 0, "eval": 0, "raw_cut": 0, "skipped": {}}
    max_len = 0
    names = ("train.jsonl", "eval.jsonl", "skipped.jsonl", "heldout_ids.txt")
    files = {n: _AtomicText(out_dir / n) for n in names}
    try:
        for row in iter_stage_rows(source.run, source.stage):
            counts["rows"] += 1
            rid = str(row["id"])
            enc = fmt.encode(row.get("raw") or "", row.get("synthetic") or "",
                             row.get(source.fused_col))
            if "reject" in enc:
                counts["skipped"][enc["reject"]] = counts["skipped"].get(enc["reject"], 0) + 1
                files["skipped.jsonl"].write(dumps({"id": rid, "reason": enc["reject"],
                                                    "detail": enc.get("detail", "")}))
                continue
            counts["raw_cut"] += enc.pop("raw_cut")
            max_len = max(max_len, len(enc["input_ids"]))
            line = dumps({"id": rid, **enc})
            if is_heldout(rid, cfg.eval_fraction, cfg.seed) and counts["eval"] < cfg.max_eval_rows:
                files["eval.jsonl"].write(line)
                files["heldout_ids.txt"].write(rid)
                counts["eval"] += 1
            else:
                files["train.jsonl"].write(line)
                counts["train"] += 1
        if not counts["train"] or not counts["eval"]:
            raise UserError(f"{counts['train']} training and {counts['eval']} held-out rows in "
                            f"stage {source.stage} of {source.run.root} ({counts['rows']} rows, "
                            f"skipped: {counts['skipped'] or 'none'}): need at least one of "
                            f"each (raise --eval-fraction for tiny data)")
        for f in files.values():
            f.commit()
    finally:
        for f in files.values():
            f.abort()
    info = {"key": key, "counts": counts, "seq_len": max_len,
            "max_prompt_tokens": fmt.max_prompt_tokens, "chat": fmt.chat,
            "template": {"body": template.body, "cue": template.cue,
                         "source": template.source, "sha256": template.sha256}}
    atomic_write_json(info_path, info)
    return info


class _AtomicText:
    """Lines into a temp file, renamed into place by ``commit`` (nothing half-written is
    ever under the final name)."""

    def __init__(self, path: Path):
        import os

        from ..rundir.io import mkstemp_shared
        self.path = path
        fd, self.tmp = mkstemp_shared(path)     # mode as the umask says, not mkstemp's 0600
        self.f = os.fdopen(fd, "w", encoding="utf-8")

    def write(self, line: str) -> None:
        self.f.write(line + "\n")

    def commit(self) -> None:
        import os
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)
        self.tmp = None

    def abort(self) -> None:
        import os
        if self.tmp:
            self.f.close()
            os.unlink(self.tmp)
            self.tmp = None


def _stage_fingerprint(source: Source) -> list:
    if source.stage == "input":
        return []
    from ..rundir.stage import StageDir
    sd = StageDir(source.run, source.stage)
    return [[f.name, sha] for i in range(len(source.run.manifest()["shards"]))
            for f, sha in sd.trusted_files(i)]


def _tokenizer_fingerprint(tokenizer) -> str:
    blob = json.dumps({"vocab": len(tokenizer), "name": tokenizer.name_or_path,
                       "eos": tokenizer.eos_token_id, "bos": tokenizer.bos_token_id,
                       "chat": getattr(tokenizer, "chat_template", None)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class TokenDataset:
    """A list of ``{input_ids, labels}`` for the Trainer (``id`` and ``n_prompt`` dropped)."""

    def __init__(self, rows: list[dict]):
        self.rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def collate(pad_id: int):
    """Right padding to the longest row of the batch; padded labels are -100."""
    def fn(batch: list[dict]) -> dict:
        import torch
        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"])
            labels[i, :k] = torch.tensor(b["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
    return fn
