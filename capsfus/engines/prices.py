"""Token prices for cost reports and ``--max-cost``: USD per 1M input and output tokens.

The default table holds a few common OpenAI models as listed on the public price page in
2024-2025 (not checked online from here: prices change, so pass ``--prices FILE`` or
``--price-in/--price-out`` for anything that matters). A model matches its own name or the
longest table name it starts with (``gpt-4o-mini-2024-07-18`` → ``gpt-4o-mini``). A model with
no price has an *unknown* cost: reported as such, and ``--max-cost`` refuses to run.

``--prices FILE``: JSON or YAML ``{model: {"input": usd_per_1m, "output": usd_per_1m}}``; its
entries replace the defaults of the same name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UserError

DEFAULT_PRICES = {  # USD per 1M tokens
    "gpt-3.5-turbo": {"input": 0.50, "output": 1.50},
    "gpt-3.5-turbo-instruct": {"input": 1.50, "output": 2.00},
    "gpt-4o-mini": {"input": 0.15, "output": 0.60},
    "gpt-4o": {"input": 2.50, "output": 10.00},
    "gpt-4.1": {"input": 2.00, "output": 8.00},
    "gpt-4.1-mini": {"input": 0.40, "output": 1.60},
    "gpt-4.1-nano": {"input": 0.10, "output": 0.40},
    "gpt-4-turbo": {"input": 10.00, "output": 30.00},
}
# every chat message costs a few tokens of framing; a conservative allowance per request
CHAT_OVERHEAD_TOKENS = 16


@dataclass(frozen=True)
class Price:
    model: str
    input: float | None      # USD per 1M tokens; None: unknown
    output: float | None
    source: str

    @property
    def known(self) -> bool:
        return self.input is not None and self.output is not None

    def cost(self, usage: dict | None) -> float | None:
        if not self.known or not usage:
            return None if not self.known else 0.0
        return (usage.get("prompt_tokens", 0) * self.input
                + usage.get("completion_tokens", 0) * self.output) / 1e6

    def worst_case(self, prompt_chars_utf8: int, max_tokens: int) -> float | None:
        """An upper bound of one request's cost: byte-level BPE tokenizers never make more
        tokens than UTF-8 bytes, plus framing, plus every allowed output token."""
        if not self.known:
            return None
        return ((prompt_chars_utf8 + CHAT_OVERHEAD_TOKENS) * self.input
                + max_tokens * self.output) / 1e6

    def to_dict(self) -> dict:
        return {"model": self.model, "usd_per_1m_input": self.input,
                "usd_per_1m_output": self.output, "source": self.source}


def load_table(path: str | None) -> dict:
    table = dict(DEFAULT_PRICES)
    if path:
        import yaml
        try:
            data = yaml.safe_load(open(path, encoding="utf-8"))  # YAML reads JSON too
        except (OSError, yaml.YAMLError) as e:
            raise UserError(f"--prices {path}: cannot read it ({e})") from None
        if not isinstance(data, dict):
            raise UserError(f"--prices {path}: expected {{model: {{input: USD per 1M tokens, "
                            f"output: USD per 1M tokens}}}}")
        for model, p in data.items():
            try:
                table[str(model)] = {"input": float(p["input"]), "output": float(p["output"])}
            except (TypeError, KeyError, ValueError):
                raise UserError(f"--prices {path}: entry {model!r} needs numeric input and "
                                f"output (USD per 1M tokens)") from None
    return table


def price_for(model: str, prices_file: str | None = None, price_in: float | None = None,
              price_out: float | None = None) -> Price:
    if (price_in is None) != (price_out is None):
        raise UserError("give both --price-in and --price-out (USD per 1M tokens)")
    if price_in is not None:
        if min(price_in, price_out) < 0 or not all(map(math.isfinite, (price_in, price_out))):
            raise UserError("--price-in/--price-out must be finite and >= 0")
        return Price(model, price_in, price_out, "command line")
    table = load_table(prices_file)
    name = model if model in table else max(
        (k for k in table if model.startswith(k)), key=len, default=None)
    if name is None:
        return Price(model, None, None, "unknown")
    src = f"{prices_file}" if prices_file and name not in DEFAULT_PRICES else "default table"
    return Price(model, table[name]["input"], table[name]["output"], f"{src} ({name})")
