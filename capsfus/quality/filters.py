"""Heuristic quality rules for fused captions: the registry (``rules``), its config, and ``apply``.

Each rule is a function with a one-line docstring, registered with a name, a reason code, an
action and its parameters with defaults:

- ``strip`` rules repair the text and keep the row (the original is kept as ``fused_raw``);
- ``drop`` rules say why a row should not be kept; a row may fail several of them, and every
  failing code is reported (the first one, in registry order, is the row's ``reason``).

Strip rules run first; drop rules then look at the stripped text. Most drop rules ignore what
the fused text merely copies from its inputs: a refusal phrase, a URL or an HTML tag that is
already in the raw alt-text ("Sorry I'm late I didn't want to come T-shirt") is content, not
model failure.

Words are whitespace-separated tokens (``str.split()``), the same definition ``capsfus
stats`` uses; the comparison rules (concatenation, instruction echo) compare lowercased runs of
letters and digits (``[^\\W_]+``), so punctuation and case do not hide a copy.

Config (``--config FILE``, YAML or JSON)::

    rules:
      length: {min_words: 3, max_words: 120}
      concatenation: {enabled: false}

Unknown rules or parameters are errors. ``Filters(config).apply(row)`` returns the row (with
``fused`` stripped when a strip rule fired) and the list of failing reason codes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from .rules import REGISTRY, Ctx, compile_patterns

# Bump when a rule's behaviour changes for the same parameters: it is part of the stage's
# settings, so a changed filter is never mixed with old results without --force.
FILTERS_VERSION = 1


# ----------------------------------------------------------------------------------- config
def default_config() -> dict:
    return {"rules": {name: dict(r.defaults) for name, r in REGISTRY.items()}}


def _check_value(where: str, default: Any, value: Any) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UserError(f"filter config: {where} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"filter config: {where} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"filter config: {where} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, list):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UserError(f"filter config: {where} must be a list of strings")
        return list(value)
    return value


def resolve_config(user: dict | None) -> dict:
    """Defaults overlaid with ``user``; unknown rules or parameters raise UserError."""
    cfg = default_config()
    if not user:
        return cfg
    if not isinstance(user, dict):
        raise UserError("filter config: expected a mapping with a `rules` key")
    unknown = sorted(set(user) - {"rules", "description"})
    if unknown:
        raise UserError(f"filter config: unknown key(s) {', '.join(unknown)} (expected `rules`)")
    rules = user.get("rules") or {}
    if not isinstance(rules, dict):
        raise UserError("filter config: `rules` must map rule names to parameters")
    for name, params in rules.items():
        if name not in REGISTRY:
            raise UserError(f"filter config: unknown rule {name!r} (rules: "
                            f"{', '.join(REGISTRY)})")
        if params is None:
            continue
        if isinstance(params, bool):
            params = {"enabled": params}
        if not isinstance(params, dict):
            raise UserError(f"filter config: rules.{name} must be a mapping of parameters")
        defaults = REGISTRY[name].defaults
        bad = sorted(set(params) - set(defaults))
        if bad:
            raise UserError(f"filter config: unknown parameter(s) {', '.join(bad)} for rule "
                            f"{name!r} (parameters: {', '.join(defaults)})")
        for k, v in params.items():
            cfg["rules"][name][k] = _check_value(f"rules.{name}.{k}", defaults[k], v)
        for k in ("extra_patterns",):
            if k in params:
                compile_patterns(cfg["rules"][name][k])
    return cfg


def load_config(path: str | Path | None) -> dict:
    """Reads a YAML or JSON rules file (None: the defaults) and resolves it."""
    if path is None:
        return resolve_config(None)
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"--config {path}: {e.strerror}") from None
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text)
    except (ValueError, Exception) as e:  # yaml.YAMLError, json.JSONDecodeError
        raise UserError(f"--config {path}: cannot parse it ({str(e).splitlines()[0]})") from None
    return resolve_config(data or {})


def config_hash(cfg: dict) -> str:
    blob = json.dumps(cfg, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def describe_rules(cfg: dict | None = None) -> list[dict]:
    """Name, code, action, docstring and parameters of every rule (for reports and --help)."""
    cfg = cfg or default_config()
    return [{"name": r.name, "code": r.code, "action": r.action, "doc": r.doc,
             "params": cfg["rules"][r.name]} for r in REGISTRY.values()]


# ------------------------------------------------------------------------------------ apply
@dataclass
class Verdict:
    row: dict
    reasons: list[str]                       # drop codes, registry order; [] = keep
    details: dict[str, str]                  # code -> detail
    stripped: list[str]                      # strip codes that changed the text


class Filters:
    """The rules of one config, ready to apply to rows."""

    def __init__(self, config: dict | None = None, fused_col: str = "fused",
                 raw_col: str = "raw", synthetic_col: str = "synthetic"):
        self.config = resolve_config(config)
        self.fused_col, self.raw_col, self.synthetic_col = fused_col, raw_col, synthetic_col
        self.rules = [(r, self.config["rules"][r.name]) for r in REGISTRY.values()
                      if self.config["rules"][r.name]["enabled"]]

    def check(self, row: dict) -> Verdict:
        value = row.get(self.fused_col)
        text = value if isinstance(value, str) else ""
        raw = row.get(self.raw_col) or ""
        syn = row.get(self.synthetic_col) or ""
        hit = row.get("fused_hit_max_tokens")
        ctx = Ctx(text, raw if isinstance(raw, str) else "", syn if isinstance(syn, str) else "",
                  hit if isinstance(hit, bool) else None)
        stripped, details, reasons = [], {}, []
        for r, params in self.rules:
            if r.action != "strip":
                continue
            res = r.fn(ctx, params)
            if res is not None and res[0] != ctx.text:
                ctx = Ctx(res[0], ctx.raw, ctx.synthetic, ctx.hit_max_tokens)
                stripped.append(r.code)
                details[r.code] = res[1]
        out = row
        if stripped:
            out = {**row, self.fused_col: ctx.text, "fused_raw": text}
        if value is not None and not isinstance(value, str):
            reasons.append("empty")
            details["empty"] = f"fused is {type(value).__name__}, not text"
            return Verdict(out, reasons, details, stripped)
        for r, params in self.rules:
            if r.action != "drop":
                continue
            detail = r.fn(ctx, params)
            if detail is not None:
                reasons.append(r.code)
                details[r.code] = detail
                if r.code == "empty":
                    break  # nothing else to say about an empty output
        return Verdict(out, reasons, details, stripped)

    def apply(self, row: dict) -> tuple[dict, list[str]]:
        """(row, reasons): the row with its fused text stripped when a strip rule fired (the
        original kept as ``fused_raw``), and the failing drop codes ([] = keep)."""
        v = self.check(row)
        return v.row, v.reasons
