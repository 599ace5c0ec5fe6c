"""Decoding with a Hugging Face causal LM, faster than ``generate`` in static batches:
continuous batching for greedy and sampled decoding, and a shared-prefix cache for it and for
beam search (which stays with ``generate``, given ``beam_inputs``).

Why: a static batch runs until its longest row ends. Fusion outputs are short but uneven (on
SmolLM2 most end within 10-40 tokens, a few run to ``max_new_tokens``), so most decode steps
went to rows that had already finished. Here rows that finish leave the batch and waiting
prompts take their places. And every fusion prompt starts with the same instruction (~100
tokens of ~140): its keys/values are computed once per call and held once, instead of once per
row (and, with ``generate``'s beam search, once per beam).

Layout: the shared prefix's keys/values are held once, ``[1, heads, n, dim]`` per layer, and
read by every row through ``prefix_attention`` (one product for all rows, not one copy per
row). The running rows have one cache of their own tokens, ``[rows, heads, columns, dim]`` per
layer (in ``GrowingLayer`` buffers), and a 2-D mask marking each row's real columns. A row is
``[left padding][own suffix][generated…]``; positions are tracked per row, so its tokens keep
positions n..n+k-1 after the prefix whatever padding lies around them. Finished rows
are dropped, and new rows admitted, in groups (new rows are prefilled in chunks of similar
length), and columns no running row needs any more are cut off at the same time. When rows
only leave, the survivors are compacted inside the buffers they already have (a gather by
row index, the cut columns become a view offset): no new buffer, no copy of the whole cache.
When rows join, one new buffer is allocated uninitialised and only each row's left padding is
zeroed, instead of zero-filling the whole buffer and then overwriting most of it.

Only for models whose cache is plain full attention (one ``DynamicLayer`` per layer: LLaMA,
SmolLM2, Qwen2, …) and whose attention goes through ``transformers``' attention interface;
``supported(model)`` says so, and otherwise the engine falls back to ``generate``.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from . import prefix_attention
from .prefix_attention import visible_mask

Done = Callable[[int, list[int], bool], None]   # (prompt index, tokens without EOS, hit max)
SPARE = 64     # free columns kept at the end of each key/value buffer
REFILL = 0.25  # regroup once this share of the batch is free (finished, or never filled)
PREFILL_TOKENS = 8192   # padded tokens per prefill chunk: bounds its activations and scores
                        # (hundreds of rows join at once on a GPU; 64 rows on CPU stay one)


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys/values are views of buffers with spare columns: a decode
    step writes one column where ``DynamicLayer`` copies the whole cache (10-20% of a CPU
    decode step at 16-32 rows)."""

    @classmethod
    def holding(cls, keys: torch.Tensor, values: torch.Tensor, width: int) -> "GrowingLayer":
        layer = cls()
        layer._hold(keys, values, width)
        return layer

    def _hold(self, keys: torch.Tensor, values: torch.Tensor, width: int) -> None:
        """Use these buffers, filled up to column ``width``."""
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._k, self._v, self._n = keys, values, width
        self.keys, self.values = keys[:, :, :width], values[:, :, :width]

    def update(self, key_states, value_states, *args, **kwargs):
        need = (self._n if self.is_initialized else 0) + key_states.shape[2]
        if not self.is_initialized or need > self._k.shape[2]:
            k, v = _buffers(key_states, key_states.shape[0], need + SPARE)
            if self.is_initialized:
                k[:, :, :self._n], v[:, :, :self._n] = self.keys, self.values
            self._hold(k, v, need - key_states.shape[2])
        self._k[:, :, self._n:need] = key_states
        self._v[:, :, self._n:need] = value_states
        self._hold(self._k, self._v, need)
        return self.keys, self.values


def _buffers(like: torch.Tensor, rows: int, columns: int):
    """Zeroed, so that padding columns hold no NaN for masked attention to multiply by 0."""
    shape = (rows, like.shape[1], columns, like.shape[3])
    return like.new_zeros(shape), like.new_zeros(shape)


def _empty_buffers(like: torch.Tensor, rows: int, columns: int):
    """Uninitialised: the caller zeroes the padding it leaves and writes everything else."""
    shape = (rows, like.shape[1], columns, like.shape[3])
    return like.new_empty(shape), like.new_empty(shape)


def supported(model) -> bool:
    """Plain full-attention caches, and attention through ``transformers``' interface (which
    ``prefix_attention`` plugs into)."""
    layers = DynamicCache(config=model.config).layers
    return (bool(layers) and all(type(layer) is DynamicLayer for layer in layers)
            and prefix_attention.supported(model))


def common_prefix(seqs: list[list[int]]) -> int:
    """Length of the token prefix all prompts share, leaving each at least one token of its
    own (the prefill needs one to produce the first logits)."""
    n = min(len(s) for s in seqs) - 1
    first = seqs[0]
    for s in seqs[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


def _kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


class SharedPrefix:
    """The token prefix all prompts of a call share (the fusion instruction), run through the
    model once. ``extend_shared`` runs each prompt's own tokens on top of it for the continuous
    decoder, whose rows' caches then hold only their own tokens (the prefix is read through
    ``prefix_attention``); ``extend`` copies the prefix into each row's cache, for ``generate``
    (beam search)."""

    def __init__(self, model, prompts: list[list[int]], pad_id: int):
        self.model, self.pad_id, self.device = model, pad_id, model.device
        params = inspect.signature(model.forward).parameters
        self.last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        # transformers >= 5.2x names it ``cache`` (``past_key_values`` goes in 5.40)
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.n = common_prefix(prompts)
        self.kv = []
        if self.n:
            ids = torch.tensor([prompts[0][:self.n]], device=self.device)
            positions = torch.arange(self.n, device=self.device)[None]
            _, cache = self.forward(ids, torch.ones_like(ids), positions, DynamicCache())
            self.kv = _kv(cache)

    def forward(self, ids, mask, positions, cache, **extra):
        """Logits of the last column, and the cache."""
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         use_cache=True, **{self.cache_arg: cache}, **self.last_only, **extra)
        cache = out.cache if "cache" in out else out.past_key_values
        return out.logits[:, -1, :].float(), cache

    def step(self, ids, own, positions, cache):
        """Runs ``ids`` ``[rows, q]`` on rows whose caches hold their own tokens only; ``own``
        marks each row's real columns, the new ones included (the prefix is seen by all)."""
        return self.forward(ids, visible_mask(own, ids.shape[1]), positions, cache,
                            shared_prefix=self.kv)

    def _suffix_inputs(self, suffixes: list[list[int]]):
        dev, rows = self.device, len(suffixes)
        width = max(len(s) for s in suffixes)
        ids = torch.full((rows, width), self.pad_id, dtype=torch.long, device=dev)
        own = torch.zeros((rows, width), dtype=torch.long, device=dev)
        for r, s in enumerate(suffixes):
            if s:
                ids[r, width - len(s):] = torch.tensor(s, device=dev)
                own[r, width - len(s):] = 1
        positions = (self.n + own.cumsum(1) - 1).clamp(min=self.n)
        return ids, own, positions

    def extend_shared(self, suffixes: list[list[int]]):
        """Each prompt's own tokens (at least one each), left-padded, on top of the shared
        prefix, in caches (``GrowingLayer`` buffers) that hold those tokens only. Returns the
        cache, the own-columns mask, each row's next position and the last logits."""
        ids, own, positions = self._suffix_inputs(suffixes)
        logits, cache = self.step(ids, own, positions,
                                  Cache(layer_class_to_replicate=GrowingLayer))
        return cache, own, self.n + own.sum(1), logits

    def extend(self, suffixes: list[list[int]]):
        """Each prompt's tokens after the prefix, left-padded, on top of a copy of it per row.
        Returns the cache (``GrowingLayer`` buffers), the mask, each row's next position and
        the last logits (None when every suffix is empty)."""
        n, rows = self.n, len(suffixes)
        ids, own, positions = self._suffix_inputs(suffixes)
        width = ids.shape[1]
        mask = torch.cat([own.new_ones(rows, n), own], dim=1)
        layers = []
        for k, v in self.kv:
            kb, vb = _empty_buffers(k, rows, n + width + SPARE)   # all written
            kb[:, :, :n], vb[:, :, :n] = k, v
            layers.append(GrowingLayer.holding(kb, vb, n))
        cache = Cache(layers=layers) if layers else Cache(layer_class_to_replicate=GrowingLayer)
        logits = None
        if width:
            logits, cache = self.forward(ids, mask, positions, cache)
        return cache, mask, n + own.sum(1), logits


def beam_inputs(prefix: SharedPrefix, prompts: list[list[int]], num_beams: int) -> dict:
    """``generate`` arguments for beam search whose cache already holds the shared prefix and
    each prompt's tokens but the last, computed once per prompt (``generate`` alone expands its
    inputs to the beams first, and so runs every prompt ``num_beams`` times); ``generate`` then
    runs the last token. Same outputs as plain ``generate`` (tests/test_engines.py)."""
    n = prefix.n
    cache, mask, _, _ = prefix.extend([p[n:-1] for p in prompts])
    ids = torch.full((len(prompts), mask.shape[1] + 1), prefix.pad_id, dtype=torch.long,
                     device=prefix.device)
    for r, p in enumerate(prompts):
        ids[r, :n] = torch.tensor(p[:n], device=prefix.device)
        ids[r, ids.shape[1] - (len(p) - n):] = torch.tensor(p[n:], device=prefix.device)
    beams = DynamicCache([(k.repeat_interleave(num_beams, 0), v.repeat_interleave(num_beams, 0))
                          for k, v in _kv(cache)])
    mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
    return {"input_ids": ids, "attention_mask": mask, "past_key_values": beams}


class ContinuousDecoder:
    """``run(prompts, done)`` generates for token-id prompts with at most ``batch_size`` rows
    running at once, calling ``done`` as each row finishes. ``pick(logits)`` chooses the next
    tokens (argmax, or a seeded sampler)."""

    def __init__(self, model, *, pad_id: int, eos_ids: set[int], max_new_tokens: int,
                 batch_size: int, pick: Callable[[torch.Tensor], torch.Tensor]):
        self.model = model
        self.pad_id = pad_id
        self.eos_ids = eos_ids
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.pick = pick
        self.device = model.device
        self.batched_moves = self.device.type == "cuda"   # see _compact

    def run(self, prompts: list[list[int]], done: Done) -> None:
        with torch.inference_mode(), prefix_attention.active(self.model):
            self._run(prompts, done)

    def _run(self, prompts: list[list[int]], done: Done) -> None:
        prefix = SharedPrefix(self.model, prompts, self.pad_id)
        waiting = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))   # pop(): longest
        rows: list[int] = []             # prompt index per running row
        out: list[list[int]] = []        # tokens generated per running row
        finished: list[bool] = []
        cache, mask, pos, last = None, None, None, None

        while rows or waiting:
            free = self.batch_size - (len(rows) - sum(finished))
            due = sum(finished) >= max(1, REFILL * len(rows)) or not rows
            if due or (waiting and free >= max(1, REFILL * self.batch_size)):
                keep = [r for r, f in enumerate(finished) if not f]
                group = [waiting.pop() for _ in range(min(free, len(waiting)))]
                new = []
                for chunk in self._chunks(group, prompts, prefix.n):
                    c, m, p, logits = prefix.extend_shared([prompts[i][prefix.n:]
                                                            for i in chunk])
                    new.append((c, m, p, self.pick(logits)))
                cache, mask, pos, last = self._regroup(keep, (cache, mask, pos, last), new)
                rows = [rows[r] for r in keep] + group
                out = [out[r] for r in keep] + [[] for _ in group]
                finished = [False] * len(rows)
                if new:
                    self._append(last[len(keep):], rows, out, finished, done, offset=len(keep))
                if not rows:
                    continue
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            logits, cache = prefix.step(last[:, None], mask, pos[:, None], cache)
            pos = pos + 1
            last = self.pick(logits)
            self._append(last, rows, out, finished, done, offset=0)

    def _append(self, tokens: torch.Tensor, rows, out, finished, done: Done, offset: int) -> None:
        for r, t in enumerate(tokens.tolist(), offset):
            if finished[r]:
                continue
            if t in self.eos_ids:
                finished[r] = True
                done(rows[r], out[r], False)
                continue
            out[r].append(t)
            if len(out[r]) >= self.max_new_tokens:
                finished[r] = True
                done(rows[r], out[r], True)

    @staticmethod
    def _chunks(group: list[int], prompts, n_prefix: int, waste: float = 0.25,
                tokens: int = PREFILL_TOKENS) -> list[list[int]]:
        """Splits a group (longest first) where one more row would make more than ``waste``
        of the padded prefill padding (one long caption must not pad a whole group), or more
        than ``tokens`` padded tokens."""
        chunks: list[list[int]] = []
        real = 0
        for i in group:
            n = len(prompts[i]) - n_prefix
            if chunks:
                padded = (len(chunks[-1]) + 1) * (len(prompts[chunks[-1][0]]) - n_prefix)
                if padded <= (1 + waste) * (real + n) and padded <= tokens:
                    chunks[-1].append(i)
                    real += n
                    continue
            chunks.append([i])
            real = n
        return chunks

    def _regroup(self, keep: list[int], running, new: list):
        """Running rows ``keep`` plus the newly prefilled chunks as one batch, right-aligned
        (left-padded) to a common width, without the columns no row uses any more. Rows only
        leaving: compacted in place (``_compact``); rows joining: each part copied once into
        one new buffer whose padding alone is zeroed."""
        cache, mask, pos, last = running
        if not new and cache is not None and keep:
            return self._compact(keep, running)
        parts = []
        if cache is not None and keep:
            idx = torch.tensor(keep, device=self.device)
            parts.append((cache, idx, mask[idx], pos[idx], last[idx]))
        parts += [(c, None, m, p, t) for c, m, p, t in new]
        if not parts:
            return None, None, None, None
        width = max(p[2].shape[1] for p in parts)
        masks = torch.cat([F.pad(p[2], (width - p[2].shape[1], 0)) for p in parts])
        cut = int(masks.any(0).long().argmax())      # first column some row still uses
        layers = []
        olds = [p[0].layers for p in parts]
        del running, cache, new
        for li in range(len(olds[0])):
            k0 = olds[0][li].keys
            kb, vb = _empty_buffers(k0, masks.shape[0], width - cut + SPARE)
            row = 0
            for old, (_, idx, m, _, _) in zip(olds, parts):
                k, v = old[li].keys, old[li].values
                if idx is not None and len(idx) < k.shape[0]:
                    k, v = k.index_select(0, idx), v.index_select(0, idx)
                skip = max(0, cut - (width - m.shape[1]))   # leading columns nobody uses
                start = width - cut - m.shape[1] + skip
                rows = slice(row, row + len(m))
                kb[rows, :, start:width - cut], vb[rows, :, start:width - cut] = \
                    k[:, :, skip:], v[:, :, skip:]
                if start:
                    kb[rows, :, :start].zero_()
                    vb[rows, :, :start].zero_()
                row += len(m)
                old[li] = None      # this layer's old buffers can go now: the peak stays at
                del k, v            # one copy of the cache plus one layer, not two copies
            layers.append(GrowingLayer.holding(kb, vb, width - cut))
        return (Cache(layers=layers), masks[:, cut:], torch.cat([p[3] for p in parts]),
                torch.cat([p[4] for p in parts]))

    def _compact(self, keep: list[int], running):
        """Finished rows leave: the survivors are gathered by index into the first rows of
        the buffers they already occupy, and the columns none of them uses any more become a
        view offset. Nothing is allocated but the gathered rows' temporary."""
        cache, mask, pos, last = running
        idx = torch.tensor(keep, device=self.device)
        m = mask.index_select(0, idx)
        cut = int(m.any(0).long().argmax())
        n = len(keep)
        # survivor i moves up from row keep[i] >= i: copied in increasing order, no source is
        # overwritten before it is read; only the rows that move, only their used columns
        moves = [(i, r) for i, r in enumerate(keep) if i != r]
        if self.batched_moves and moves:
            # on a GPU, hundreds of rows may move: one gather of the moving rows (a temporary
            # of just those) per buffer instead of a copy kernel per row and layer
            dst = torch.tensor([i for i, _ in moves], device=self.device)
            src = torch.tensor([r for _, r in moves], device=self.device)
        for layer in cache.layers:
            k, v, width = layer._k, layer._v, layer._n
            if self.batched_moves and moves:
                k[dst, :, cut:width] = k[src, :, cut:width]
                v[dst, :, cut:width] = v[src, :, cut:width]
            else:
                for i, r in moves:
                    k[i, :, cut:width].copy_(k[r, :, cut:width])
                    v[i, :, cut:width].copy_(v[r, :, cut:width])
            layer._hold(k[:n, :, cut:], v[:n, :, cut:], width - cut)
        return cache, m[:, cut:], pos.index_select(0, idx), last.index_select(0, idx)
