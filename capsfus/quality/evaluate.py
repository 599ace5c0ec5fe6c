"""``capsfus eval``: score a candidate's fused captions, beside three baselines on the same rows
(raw only, synthetic only, raw + synthetic concatenated), against a reference when one is given.

Rows are joined on ``id``. A candidate row the stage rejected, a candidate id the reference
lacks (or the other way round) and a repeated id are counted, never guessed or scored. The
metrics are ``quality.metrics``'; the pairwise judge (``quality.judge``) adds its own section.

Outputs in the report folder: ``report.json`` (everything), ``report.md`` (tables and a sample
of rows side by side) and ``per_row.jsonl.zst`` (every row's metrics per system).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..rundir.io import JsonlZstWriter, atomic_write_bytes, atomic_write_json
from ..rundir.manifest import Run
from ..rundir.stage import StageDir, input_rows
from . import metrics as M

BASELINES = ("raw only", "synthetic only", "raw + synthetic")
REFERENCE_METRICS = ("rouge_l", "bleu", "sim_reference")
FREE_METRICS = ("retention", "retention_names_numbers", "novel_share", "sim_raw",
                "sim_synthetic", "concatenation", "leak", "words")


@dataclass
class Side:
    """Where captions come from: a stage of a run and the key holding the caption."""

    run: Run
    stage: str
    col: str
    label: str

    def describe(self) -> dict:
        return {"run": str(self.run.root), "run_id": self.run.manifest()["run_id"],
                "stage": self.stage, "column": self.col, "label": self.label}


def stage_rows(run: Run, stage: str) -> Iterator[tuple[dict, bool]]:
    """(row, rejected) for every row of the stage's finished shards, checksums verified."""
    m = run.manifest()
    if stage == "input":
        for i in range(len(m["shards"])):
            for row in input_rows(run, m, "input", i):
                yield row, False
        return
    sd = StageDir(run, stage)
    for i, st in sorted(sd.all_states().items()):
        if st.get("status") != "done":
            continue
        for row in sd.iter_rows(i):
            yield row, False
        for row in sd.iter_rows(i, rejected=True):
            yield row, True


def unfinished_shards(run: Run, stage: str) -> int:
    if stage == "input":
        return 0
    n = len(run.manifest()["shards"])
    states = StageDir(run, stage).all_states()
    return sum((states.get(i) or {}).get("status") != "done" for i in range(n))


def _text(v) -> str:
    return v if isinstance(v, str) else ""


def join(candidate: Side, reference: Side | None, limit: int | None = None
         ) -> tuple[list[dict], dict]:
    """The joined rows ``{id, raw, synthetic, candidate, reference}`` and the counts of what
    could not be joined."""
    counts = {"candidate_rows": 0, "candidate_rejected": 0, "candidate_duplicate_ids": 0,
              "candidate_unfinished_shards": unfinished_shards(candidate.run, candidate.stage),
              "reference_rows": 0, "reference_rejected": 0, "reference_duplicate_ids": 0,
              "candidate_without_reference": 0, "reference_without_candidate": 0,
              "joined": 0, "evaluated": 0}
    ref: dict[str, dict] | None = None
    if reference is not None:
        counts["reference_unfinished_shards"] = unfinished_shards(reference.run, reference.stage)
        ref = {}
        for row, rejected in stage_rows(reference.run, reference.stage):
            if rejected:
                counts["reference_rejected"] += 1
                continue
            counts["reference_rows"] += 1
            if row["id"] in ref:
                counts["reference_duplicate_ids"] += 1
                continue
            ref[row["id"]] = row
    seen: set[str] = set()
    pairs = []
    for row, rejected in stage_rows(candidate.run, candidate.stage):
        if rejected:
            counts["candidate_rejected"] += 1
            seen.add(row["id"])
            continue
        counts["candidate_rows"] += 1
        if row["id"] in seen:
            counts["candidate_duplicate_ids"] += 1
            continue
        seen.add(row["id"])
        other = None
        if ref is not None:
            other = ref.get(row["id"])
            if other is None:
                counts["candidate_without_reference"] += 1
                continue
        counts["joined"] += 1
        if limit is not None and len(pairs) >= limit:
            continue
        raw = _text(row.get("raw")) or _text((other or {}).get("raw"))
        syn = _text(row.get("synthetic")) or _text((other or {}).get("synthetic"))
        pairs.append({"id": row["id"], "raw": raw, "synthetic": syn,
                      "candidate": _text(row.get(candidate.col)),
                      "reference": None if other is None else _text(other.get(reference.col))})
    if ref is not None:
        counts["reference_without_candidate"] = sum(k not in seen for k in ref)
    counts["evaluated"] = len(pairs)
    return pairs, counts


def system_texts(pairs: list[dict], candidate_label: str) -> dict[str, list[str]]:
    """The captions of each system: the candidate and the three baselines (and the reference's
    own, for its reference-free metrics)."""
    out = {candidate_label: [p["candidate"] for p in pairs],
           "raw only": [p["raw"] for p in pairs],
           "synthetic only": [p["synthetic"] for p in pairs],
           "raw + synthetic": [f"{p['raw'].strip()} {p['synthetic'].strip()}".strip()
                               for p in pairs]}
    if pairs and pairs[0]["reference"] is not None:
        out["reference"] = [p["reference"] for p in pairs]
    return out


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def score(pairs: list[dict], candidate_label: str, embedder=None, progress=None) -> dict:
    """Per-row metrics per system, and their aggregates."""
    systems = system_texts(pairs, candidate_label)
    has_ref = "reference" in systems
    flags = M.RuleFlags()
    known = [M.knowledge_tokens(p["raw"], p["synthetic"]) for p in pairs]
    emb = {}
    if embedder is not None:
        for name, texts in [("raw", [p["raw"] for p in pairs]),
                            ("synthetic", [p["synthetic"] for p in pairs])] + [
                (s, t) for s, t in systems.items() if s not in ("raw only", "synthetic only")]:
            emb[name] = embedder.encode(texts)
            if progress:
                progress(f"embedded {name}")
        emb["raw only"], emb["synthetic only"] = emb["raw"], emb["synthetic"]
    per_row: dict[str, list[dict]] = {}
    aggregates: dict[str, dict] = {}
    for name, texts in systems.items():
        rows, bleu, cider = [], M.CorpusBleu(), M.CorpusCider()
        for i, (p, text) in enumerate(zip(pairs, texts)):
            k_all, k_named = known[i]
            r = {"retention": M.retention(k_all, text),
                 "retention_names_numbers": M.retention(k_named, text),
                 "novel_share": M.novel_share(text, p["raw"], p["synthetic"]),
                 **flags.flags(text, p["raw"], p["synthetic"]),
                 "words": M.length_words(text)}
            if emb:
                r["sim_raw"] = float(emb[name][i] @ emb["raw"][i])
                r["sim_synthetic"] = float(emb[name][i] @ emb["synthetic"][i])
            if has_ref and name != "reference":
                r["rouge_l"] = M.rouge_l(text, p["reference"])["f"]
                r["bleu"] = M.sentence_bleu(text, p["reference"])
                bleu.add(text, p["reference"])
                cider.add(text, p["reference"])
                if emb:
                    r["sim_reference"] = float(emb[name][i] @ emb["reference"][i])
            rows.append(r)
        agg = {"rows": len(rows)}
        for key in REFERENCE_METRICS + FREE_METRICS:
            if rows and key in rows[0]:
                agg[key] = _mean(r[key] for r in rows)
                if key in ("retention", "retention_names_numbers", "novel_share"):
                    agg[key + "_rows"] = sum(r[key] is not None for r in rows)
        if has_ref and name != "reference":
            agg["bleu_sentence_mean"] = agg.pop("bleu", None)
            agg["bleu_corpus"] = bleu.score()
            agg["cider"] = cider.score()
        per_row[name] = rows
        aggregates[name] = agg
        if progress:
            progress(f"scored {name}")
    return {"systems": aggregates, "per_row": per_row, "has_reference": has_ref,
            "embeddings": getattr(embedder, "name", None) if embedder else None}


def write_per_row(path: Path, pairs: list[dict], per_row: dict[str, list[dict]]) -> dict:
    with JsonlZstWriter(path) as w:
        for i, p in enumerate(pairs):
            w.write({**p, "metrics": {name: rows[i] for name, rows in per_row.items()}})
    return {"file": path.name, "rows": w.rows, "sha256": w.sha256}


# ----------------------------------------------------------------------------------- report
COLUMNS = [("ROUGE-L", "rouge_l", "f"), ("BLEU-4 (corpus)", "bleu_corpus", "f"),
           ("BLEU-4 (mean sent.)", "bleu_sentence_mean", "f"),
           ("CIDEr-D (1 ref.)", "cider", "f"),
           ("emb. sim. to ref.", "sim_reference", "f"),
           ("retention", "retention", "%"), ("retention (names, numbers)",
                                             "retention_names_numbers", "%"),
           ("novel words (halluc. proxy)", "novel_share", "%"),
           ("emb. sim. to raw", "sim_raw", "f"), ("emb. sim. to synthetic", "sim_synthetic", "f"),
           ("concatenation", "concatenation", "%"), ("leakage", "leak", "%"),
           ("mean words", "words", "w")]


def _fmt(v, kind: str) -> str:
    if v is None:
        return "–"
    if kind == "%":
        return f"{v:.1%}"
    if kind == "w":
        return f"{v:.2f}"
    return f"{v:.3f}"


def _cell(text: str | None, limit: int = 300) -> str:
    if text is None:
        return "–"
    t = " ".join(text.split())
    if len(t) > limit:
        t = t[:limit - 1] + "…"
    return t.replace("|", "\\|") or "(empty)"


def markdown(report: dict) -> str:
    c = report["counts"]
    out = [f"# capsfus eval: {report['candidate']['label']}", "",
           f"Date: {report['date']}. Candidate: `{report['candidate']['run']}` stage "
           f"`{report['candidate']['stage']}`, column `{report['candidate']['column']}`."]
    if report["reference"]:
        r = report["reference"]
        out.append(f"Reference: `{r['run']}` stage `{r['stage']}`, column `{r['column']}`.")
    else:
        out.append("No reference: reference-based metrics (ROUGE-L, BLEU, CIDEr-D, similarity "
                   "to the reference) not computed.")
    out += ["", "## Rows", "", "| | rows |", "|---|---:|"]
    out += [f"| {k.replace('_', ' ')} | {v:,} |" for k, v in c.items()]
    out += ["", "## Metrics", "",
            "Baselines on the same rows: raw only, synthetic only, raw + synthetic concatenated "
            "(joined by a space). Metric definitions: `capsfus/quality/metrics.py`. Retention: share "
            "of the raw caption's content words absent from the synthetic caption that the "
            "output keeps. Novel words: share of the output's content words in neither input "
            "(a proxy: paraphrases count too). Concatenation and leakage: the filter rules "
            "`concatenation` and `prompt_leak`/`preamble`."
            + (" CIDEr-D: the COCO caption evaluation's CIDEr (`capsfus/quality/cider.py`) "
               "with one reference per row, so its absolute values compare systems on these "
               "rows, not with COCO's 5-reference figures." if report["reference"] else ""), ""]
    systems = report["systems"]
    cols = [(h, k, f) for h, k, f in COLUMNS if any(k in s for s in systems.values())]
    out.append("| system | rows | " + " | ".join(h for h, _, _ in cols) + " |")
    out.append("|---|---:|" + "---:|" * len(cols))
    for name, s in systems.items():
        out.append(f"| {name} | {s['rows']:,} | "
                   + " | ".join(_fmt(s.get(k), f) for _, k, f in cols) + " |")
    out += ["", "## Pairwise judge", ""]
    out += report.get("judge_markdown") or ["not run"]
    out += ["", f"## Sample of {len(report['sample'])} rows (seed 0)", ""]
    head = ["id", "raw", "synthetic", report["candidate"]["label"]]
    if report["reference"]:
        head.append("reference")
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for p in report["sample"]:
        cells = [p["id"], p["raw"], p["synthetic"], p["candidate"]]
        if report["reference"]:
            cells.append(p["reference"])
        out.append("| " + " | ".join(_cell(x) for x in cells) + " |")
    return "\n".join(out) + "\n"


def build_report(candidate: Side, reference: Side | None, pairs: list[dict], counts: dict,
                 scored: dict, judge: dict | None, sample: int = 8) -> dict:
    rng = random.Random(0)
    picks = sorted(rng.sample(range(len(pairs)), min(sample, len(pairs))))
    return {"format": "capsfus-eval", "version": 1,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "candidate": candidate.describe(),
            "reference": reference.describe() if reference else None,
            "counts": counts, "embeddings": scored["embeddings"],
            "systems": scored["systems"], "judge": judge,
            "judge_markdown": judge_markdown(judge),
            "sample": [pairs[i] for i in picks]}


def write_report(folder: Path, report: dict, pairs: list[dict], per_row: dict) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"per_row": folder / "per_row.jsonl.zst", "json": folder / "report.json",
             "markdown": folder / "report.md"}
    report["per_row_file"] = write_per_row(paths["per_row"], pairs, per_row)
    atomic_write_json(paths["json"], report)
    atomic_write_bytes(paths["markdown"], markdown(report).encode("utf-8"))
    return paths


def judge_markdown(judge: dict | None) -> list[str]:
    """The report's judge section as Markdown lines."""
    if not judge or judge.get("status") != "done":
        reason = (judge or {}).get("reason") or "no --judge-endpoint given"
        return [f"not run: {reason}"]
    t = judge["totals"]
    n = sum(t.values())
    lines = [f"Judge `{judge['model']}` at `{judge['endpoint']}`, {n} rows, both orders "
             f"(prompt sha256 `{judge['prompt_sha256'][:12]}`; the prompt is in report.json).",
             "", f"| {judge['candidate']} vs {judge['other']} | rows | share |", "|---|---:|---:|"]
    for k in ("win", "similar", "identical", "lose"):
        share = f"{t.get(k, 0) / n:.0%}" if n else "–"
        lines.append(f"| {k} | {t.get(k, 0)} | {share} |")
    if n:
        lines += ["", f"Win, similar or identical (the paper's \"equal or better\"): "
                      f"{(n - t.get('lose', 0)) / n:.0%}. Order disagreements (counted as "
                      f"similar): {judge['order_disagreements']}; unparsable answers: "
                      f"{judge['unparsed']}."]
    return lines
