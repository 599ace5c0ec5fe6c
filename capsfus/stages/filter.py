"""The filter stage: every fused row is kept or dropped by the rules of ``quality.filters``.

Rows come from the ``fuse`` stage by default (``--from-stage fuse@TAG`` for another fusion), or
from ``input`` when the run has no fuse stage (an outside file whose fused captions sit in a
column named by ``fused_col``, e.g. ``capsfusion`` in CapsFusion-120M). Nothing is lost:

- kept rows go to ``filter/out/`` with ``filter_reasons: []`` and ``filter_stripped`` (the strip
  rules that changed the text; the original is then kept as ``fused_raw``);
- dropped rows go to ``filter/rejected/`` with ``reason`` (the first failing rule's code),
  ``reasons`` (every failing code), ``details`` (code -> why) and ``detail`` (one line).

After the stage, ``RUN/<stage>/report.json`` holds per-rule counts, the share dropped and up to
five examples per rule, aggregated from the trusted output files of the finished shards (one
small cached summary per shard, so a rerun reads only shards that changed).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..quality.filters import FILTERS_VERSION, Filters, config_hash, describe_rules, resolve_config
from ..rundir.rows import FUSED

EXAMPLES_PER_RULE = 5
REPORT_VERSION = 1


class FilterProcessor:
    def __init__(self, filters: Filters):
        self.filters = filters

    def prepare(self, rows: list[dict]) -> list[dict]:
        return rows

    def process(self, rows: list[dict]) -> tuple[list[dict], list[dict]]:
        out, rejected = [], []
        for row in rows:
            v = self.filters.check(row)
            r = v.row
            if not v.reasons:
                out.append({**r, "filter_reasons": [], "filter_stripped": v.stripped})
                continue
            detail = "; ".join(f"{c}: {v.details[c]}" for c in v.reasons)
            rejected.append({**r, "filter_reasons": v.reasons, "filter_stripped": v.stripped,
                             "reason": v.reasons[0], "reasons": v.reasons,
                             "details": {c: v.details[c] for c in v.reasons},
                             "detail": detail[:1000]})
        return out, rejected


@dataclass
class FilterJob:
    """Everything a worker needs to run the filter stage: plain data, picklable."""

    run_dir: str
    stage: str = "filter"               # "filter" or "filter@TAG"
    config: dict = field(default_factory=lambda: resolve_config(None))
    fused_col: str = FUSED
    from_stage: str | None = None       # None: fuse when the run has one, else input
    chunk_size: int = 5000

    def settings(self) -> dict:
        cfg = resolve_config(self.config)
        return {"rules": cfg["rules"], "rules_sha256": config_hash(cfg),
                "fused_col": self.fused_col, "filters_version": FILTERS_VERSION}

    def to_dict(self) -> dict:
        return {"kind": "filter", "run_dir": self.run_dir, "stage": self.stage,
                "config": self.config, "fused_col": self.fused_col,
                "from_stage": self.from_stage, "chunk_size": self.chunk_size}

    @classmethod
    def from_dict(cls, d: dict) -> "FilterJob":
        return cls(run_dir=d["run_dir"], stage=d["stage"], config=d["config"],
                   fused_col=d.get("fused_col", FUSED), from_stage=d.get("from_stage"),
                   chunk_size=d.get("chunk_size", 5000))

    def input_stage(self, run) -> str:
        from ..errors import UserError
        from ..rundir.manifest import stage_name
        if self.from_stage:
            name = self.from_stage
            base, _, tag = name.partition("@")
            stage_name(base, tag or None)           # validates the name
            if name != "input" and not (run.root / name / "config.json").exists():
                raise UserError(f"--from-stage {name}: no such stage in {run.root} (stages: "
                                f"{', '.join(run.stages()) or 'none'})")
            return name
        return "fuse" if (run.root / "fuse" / "config.json").exists() else "input"

    def resolve(self, run) -> tuple["FilterJob", str, dict]:
        return self, self.input_stage(run), self.settings()

    def open(self):
        from ..rundir.job import Opened
        filters = Filters(self.config, fused_col=self.fused_col)
        return Opened(FilterProcessor(filters),
                      describe={"filter": {"rules_sha256": config_hash(filters.config),
                                           "fused_col": self.fused_col}})


# ------------------------------------------------------------------------------------ report
def _example(row: dict, fused_col: str, code: str) -> dict:
    ex = {"id": row.get("id"), "fused": row.get(fused_col), "raw": row.get("raw"),
          "synthetic": row.get("synthetic")}
    if "fused_raw" in row:
        ex["fused_raw"] = row["fused_raw"]
    details = row.get("details") or {}
    if code in details:
        ex["detail"] = details[code]
    return {k: (v[:300] if isinstance(v, str) else v) for k, v in ex.items()}


def shard_summary(stage_dir, shard: int, fused_col: str) -> dict | None:
    """Counts and examples of one finished shard, cached next to the report and keyed by the
    checksums of its final files (None when the shard is not done)."""
    from ..rundir.io import atomic_write_json, read_json
    st = stage_dir.read_state(shard)
    if not st or st.get("status") != "done" or not st.get("final"):
        return None
    key = {"version": REPORT_VERSION, "settings_hash": st.get("settings_hash"),
           "out": st["final"]["out"]["sha256"],
           "rejected": (st["final"].get("rejected") or {}).get("sha256")}
    cache = stage_dir.root / "report" / f"{shard:05d}.json"
    if cache.exists():
        try:
            old = read_json(cache)
            if old.get("key") == key:
                return old
        except (OSError, ValueError):
            pass
    all_codes: Counter = Counter()
    first: Counter = Counter()
    stripped: Counter = Counter()
    examples: dict[str, list] = {}
    kept = dropped = several = 0
    for rejected in (False, True):
        for row in stage_dir.iter_rows(shard, rejected=rejected):
            for code in row.get("filter_stripped") or []:
                stripped[code] += 1
                lst = examples.setdefault(code, [])
                if len(lst) < EXAMPLES_PER_RULE:
                    lst.append(_example(row, fused_col, code))
            if not rejected:
                kept += 1
                continue
            dropped += 1
            codes = row.get("reasons") or [row.get("reason", "unknown")]
            first[codes[0]] += 1
            several += len(codes) > 1
            for code in codes:
                all_codes[code] += 1
                lst = examples.setdefault(code, [])
                if len(lst) < EXAMPLES_PER_RULE:
                    lst.append(_example(row, fused_col, code))
    summary = {"key": key, "shard": shard, "rows": kept + dropped, "kept": kept,
               "dropped": dropped, "several": several, "codes": dict(all_codes),
               "first_codes": dict(first), "stripped": dict(stripped), "examples": examples}
    atomic_write_json(cache, summary)
    return summary


def write_report(run, stage: str = "filter") -> dict:
    """Aggregates the finished shards of ``stage`` into ``RUN/<stage>/report.json``."""
    from ..rundir.io import atomic_write_json
    from ..rundir.stage import StageDir
    sd = StageDir(run, stage)
    config = sd.config() or {}
    settings = config.get("settings") or {}
    fused_col = settings.get("fused_col", FUSED)
    n = len(run.manifest()["shards"])
    codes: Counter = Counter()
    first: Counter = Counter()
    stripped: Counter = Counter()
    examples: dict[str, list] = {}
    rows = kept = dropped = done = several = 0
    for i in range(n):
        s = shard_summary(sd, i, fused_col)
        if s is None:
            continue
        done += 1
        rows += s["rows"]
        kept += s["kept"]
        dropped += s["dropped"]
        several += s["several"]
        codes.update(s["codes"])
        first.update(s["first_codes"])
        stripped.update(s["stripped"])
        for code, lst in s["examples"].items():
            have = examples.setdefault(code, [])
            have.extend(lst[:EXAMPLES_PER_RULE - len(have)])
    rules = []
    cfg = {"rules": settings["rules"]} if settings.get("rules") else None
    for r in describe_rules(resolve_config(cfg) if cfg else None):
        c = r["code"]
        count = stripped.get(c, 0) if r["action"] == "strip" else codes.get(c, 0)
        rules.append({**r, "rows": count, "share": count / rows if rows else 0.0,
                      "first_reason_rows": first.get(c, 0),
                      "examples": examples.get(c, [])})
    report = {
        "stage": stage, "input_stage": config.get("input_stage"), "fused_col": fused_col,
        "settings_hash": config.get("settings_hash"),
        "rules_sha256": settings.get("rules_sha256"),
        "shards_done": done, "shards_total": n, "rows": rows, "kept": kept,
        "dropped": dropped, "share_kept": kept / rows if rows else 0.0,
        "share_dropped": dropped / rows if rows else 0.0,
        "stripped_rows": sum(stripped.values()),
        "rows_failing_several_rules": several,
        "rules": rules, "created": time.time(),
    }
    atomic_write_json(Path(sd.root) / "report.json", report)
    return report
