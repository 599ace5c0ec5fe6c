"""Caption mixes for export: which caption each row ships, drawn from a hash of (seed, id) so the
same seed gives the same dataset whatever the order of the shards (README "Caption mixes")."""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Callable

from ..errors import UserError
from ..rundir.rows import FUSED, RAW, SYNTHETIC

SOURCES = (FUSED, SYNTHETIC, RAW)


# Caption mixes with the finding behind each (README "Caption mixes").
MIX_PRESETS = {
    "lmm": ({FUSED: 1.0},
            "multimodal LLMs: fused captions alone beat a 1:1 raw/synthetic mix (CapsFusion, "
            "arXiv 2310.20550)"),
    "clip": ({SYNTHETIC: 0.55, RAW: 0.45},
             "CLIP: short synthetic captions mixed with 40-50% original alt-text do best "
             "(arXiv 2410.02740)"),
    "balanced": ({FUSED: 0.5, RAW: 0.25, SYNTHETIC: 0.25},
                 "one dataset for several models: fused captions, with alt-text and synthetic "
                 "kept for variety (arXiv 2410.02740)"),
}


# ------------------------------------------------------------------------------ options
def parse_mix(text: str) -> dict[str, float]:
    """``"fused=0.6,raw=0.4"`` -> {"fused": 0.6, "raw": 0.4} (weights normalised to 1), or a
    preset name."""
    if text in MIX_PRESETS:
        return dict(MIX_PRESETS[text][0])
    mix: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.strip().partition("=")
        try:
            w = float(value)
        except ValueError:
            w = -1.0
        if not sep or not name.strip() or not 0 <= w < float("inf"):
            raise UserError(f"--mix {text!r}: expected SOURCE=WEIGHT,… (e.g. fused=0.6,raw=0.4) "
                            f"or a preset ({', '.join(MIX_PRESETS)})")
        if name.strip() in mix:
            raise UserError(f"--mix {text!r}: {name.strip()} is named twice")
        mix[name.strip()] = w
    total = sum(mix.values())
    if total <= 0:
        raise UserError(f"--mix {text!r}: the weights add up to 0")
    return {k: v / total for k, v in mix.items() if v > 0}


# --------------------------------------------------------------------------- the mixer
def _unit(seed: int, row_id: str) -> float:
    d = hashlib.blake2b(f"{seed}\x00{row_id}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(d, "big") / 2.0 ** 64


class Mixer:
    """Draws each row's caption source from the mix, deterministically from (seed, id)."""

    def __init__(self, mix: dict[str, float], seed: int, fallback: list[str] | None = None):
        self.mix = mix
        self.seed = seed
        names = sorted(mix, key=lambda k: -mix[k])
        rest = [s for s in SOURCES if s not in names]
        self.order = list(fallback) if fallback else names + rest
        self.cum: list[tuple[float, str]] = []
        acc = 0.0
        for name in names:
            acc += mix[name]
            self.cum.append((acc, name))
        self.drawn: Counter = Counter()
        self.used: Counter = Counter()
        self.fallbacks: Counter = Counter()   # "drawn->used"

    def draw(self, row_id: str) -> str:
        u = _unit(self.seed, row_id)
        for edge, name in self.cum:
            if u < edge:
                return name
        return self.cum[-1][1]

    def choose(self, row_id: str, available: Callable[[str], str | None]) -> tuple[str, str] | None:
        """(source, caption) for one row, or None when no source has a caption."""
        drawn = self.draw(row_id)
        self.drawn[drawn] += 1
        for name in [drawn] + [s for s in self.order if s != drawn]:
            text = available(name)
            if text:
                self.used[name] += 1
                if name != drawn:
                    self.fallbacks[f"{drawn}->{name}"] += 1
                return name, text
        return None
