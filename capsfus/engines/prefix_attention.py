"""Attention that reads one copy of the shared prompt prefix for every row (cascade attention).

Why: every fusion prompt starts with the same instruction (~100 of ~140 prompt tokens). If each
row's key/value cache held its own copy of it, the prefix would be most of the cache: a 13B
model on an 80 GB GPU would hold ~130 rows at these lengths instead of several hundred, and each
decode step would read the same prefix once per row. Here the prefix's keys/values are kept
once, ``[1, kv_heads, n, dim]`` per layer, and each row's cache holds only its own tokens.

How: a query's scores against the prefix and against its row's own columns are computed apart,
the prefix part as one matrix product for all rows at once (the prefix is read once per step,
not once per row), then one softmax runs over both parts together, which is exactly attention
over ``[prefix | own columns]``. Grouped-query heads share their key/value head without
``repeat_kv`` copies. Masks are boolean ``[rows, 1, queries, own columns]`` (True: visible);
the prefix is visible to every query (all of a row's tokens come after it).

It is registered with ``transformers``' attention interface under ``NAME``, with the ``sdpa``
mask builder, and behaves exactly as ``sdpa`` for any call that does not pass
``shared_prefix=`` (so ``generate`` and the prefix's own prefill are unchanged while it is set).
Models whose attention does not go through that interface are not ``supported``.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "capsfus_shared_prefix"
_LOW = -1e30   # a masked score: finite, so a pad query with no visible column stays finite


def shared_prefix_attention(module, query, key, value, attention_mask, scaling=None,
                            dropout: float = 0.0, shared_prefix=None, **kwargs):
    """``query`` ``[rows, heads, q, dim]``; ``key``/``value`` the rows' own columns
    ``[rows, kv_heads, w, dim]``; ``shared_prefix`` a list, per layer, of the prefix's
    ``(keys, values)`` ``[1, kv_heads, n, dim]`` (empty: no shared prefix). Returns ``[rows, q, heads, dim]``, as the
    interface expects."""
    if shared_prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    for name in ("softcap", "s_aux", "sinks", "sliding_window"):
        if kwargs.get(name) is not None:    # ``supported`` keeps such models out
            raise NotImplementedError(f"shared-prefix attention does not implement {name}")
    rows, heads, q, dim = query.shape
    kv_heads, width = key.shape[1], key.shape[2]
    group = heads // kv_heads
    scaling = dim ** -0.5 if scaling is None else scaling
    wide = torch.promote_types(query.dtype, torch.float32)   # scores and softmax: ≥ fp32
    pk, pv = shared_prefix[module.layer_idx] if shared_prefix else (None, None)
    n = 0 if pk is None else pk.shape[2]
    # query heads h = kv_head * group + j (repeat_kv's order): one [group*q] block per kv head
    qg = query.reshape(rows, kv_heads, group * q, dim)
    own = torch.matmul(qg, key.transpose(2, 3)).to(wide) * scaling        # [r, kv, g*q, w]
    if attention_mask is not None:
        visible = attention_mask[:, :, None, -q:, -width:].expand(rows, 1, group, q, width)
        own = own.masked_fill(~visible.reshape(rows, 1, group * q, width), _LOW)
    if n:
        flat = qg.transpose(0, 1).reshape(kv_heads, rows * group * q, dim)
        pre = torch.matmul(flat, pk[0].transpose(1, 2)).to(wide) * scaling  # [kv, r*g*q, n]
        pre = pre.view(kv_heads, rows, group * q, n).transpose(0, 1)
        probs = torch.softmax(torch.cat([pre, own], dim=-1), dim=-1).to(query.dtype)
        p_pre, p_own = probs.split([n, width], dim=-1)
        out = torch.matmul(p_own, value)
        p_pre = p_pre.transpose(0, 1).reshape(kv_heads, rows * group * q, n)
        out += torch.matmul(p_pre, pv[0]).view(kv_heads, rows, group * q, dim).transpose(0, 1)
    else:
        out = torch.matmul(torch.softmax(own, dim=-1).to(query.dtype), value)
    out = out.view(rows, kv_heads, group, q, dim).reshape(rows, heads, q, dim)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, shared_prefix_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def supported(model) -> bool:
    """Whether the model's attention layers look up their function in the attention interface
    (LLaMA, Qwen2/3, Mistral, Gemma, Phi-3, OLMo-2, Granite, SmolLM2, … in ``transformers`` 5),
    without logit soft-capping (which this function does not implement)."""
    cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    return (bool(getattr(model, "_supports_attention_backend", False))
            and not getattr(cfg, "attn_logit_softcapping", None))


@contextmanager
def active(model):
    """Routes the model's attention through ``shared_prefix_attention`` for the duration."""
    configs = {id(m.config): m.config for m in model.modules()
               if getattr(m, "config", None) is not None
               and hasattr(m.config, "_attn_implementation")}
    before = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = NAME
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = before[k]


def visible_mask(own: torch.Tensor, queries: int) -> torch.Tensor:
    """Boolean ``[rows, 1, queries, columns]`` from a row's own-columns mask ``[rows, columns]``
    whose last ``queries`` columns are the tokens being run: a query sees its row's real
    columns up to itself."""
    columns = own.shape[1]
    causal = torch.ones(queries, columns, dtype=torch.bool, device=own.device).tril(
        columns - queries)
    return own.bool()[:, None, None, :] & causal
