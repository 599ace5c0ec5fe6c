"""How many rows the continuous decoder can keep in flight on a GPU: from the memory left after
the weights and the model's key/value bytes per token, not from a CPU measurement.

Per row in flight the continuous decoder holds the key/value cache of the row's own tokens
(prompt after the shared prefix + new tokens + the buffers' spare columns) and, once per step, a
row of float32 logits and the sampler's copies; the shared prefix is held once for all rows
(``prefix_attention``). ``generate`` (beam search) holds the whole prompt per beam. When rows
join the batch, a new cache is filled from the old one layer by layer, each old layer freed as
soon as it is copied (``ContinuousDecoder._regroup``): the peak is one cache plus one layer
(counted as 10%); when rows only leave, the cache is compacted in place.
"""

from __future__ import annotations

MAX_ROWS = 1024


def kv_bytes_per_token(config, dtype_bytes: int) -> int:
    """Keys and values of every layer for one token (grouped-query heads counted once)."""
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * layers * kv_heads * head_dim * dtype_bytes


def rows_for_memory(free_bytes: int, kv_per_token: int, tokens_per_row: int, vocab: int,
                    share: float = 0.9, max_rows: int = MAX_ROWS,
                    shared_tokens: int = 0) -> int:
    """Rows in flight that fit in ``share`` of ``free_bytes`` (at least 1, at most
    ``max_rows``), each holding ``tokens_per_row`` tokens of its own, all sharing one copy of
    ``shared_tokens``."""
    per_row = int(1.1 * kv_per_token * tokens_per_row) + 3 * 4 * vocab
    budget = int(free_bytes * share) - kv_per_token * shared_tokens
    return max(1, min(max_rows, budget // per_row))
