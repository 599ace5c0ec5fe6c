"""Cascade attention over one shared prefix (engines/prefix_attention.py) and the continuous
decoder's caches, which hold each row's own tokens only: against ``torch``'s own attention over
the whole sequence, and against plain ``generate`` on a real (tiny, random) LLaMA on disk."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from capsfus.engines import Decoding, EngineSpec, load_engine
from capsfus.engines import prefix_attention as PA


class Layer:
    layer_idx = 1


@pytest.mark.parametrize("queries", [1, 5])
@pytest.mark.parametrize("prefix", [0, 7])
def test_cascade_equals_attention_over_prefix_and_own_columns(queries, prefix):
    """Grouped-query heads (6 query heads on 2 key/value heads), left-padded rows, several
    queries (a prefill, causal) or one (a decode step): the same output as SDPA over
    ``[prefix | own columns]`` with the prefix copied into every row."""
    torch.manual_seed(0)
    rows, heads, kv_heads, dim, width = 3, 6, 2, 16, 9
    q = torch.randn(rows, heads, queries, dim, dtype=torch.float64)
    k = torch.randn(rows, kv_heads, width, dim, dtype=torch.float64)
    v = torch.randn(rows, kv_heads, width, dim, dtype=torch.float64)
    own = torch.ones(rows, width, dtype=torch.long)
    own[1, :3] = 0                                 # left padding of different lengths
    own[2, :width - queries] = 0                   # a row with nothing but the new tokens
    pk = torch.randn(1, kv_heads, prefix, dim, dtype=torch.float64)
    pv = torch.randn(1, kv_heads, prefix, dim, dtype=torch.float64)
    shared = [(None, None), (pk, pv)]               # read at module.layer_idx = 1
    got, _ = PA.shared_prefix_attention(Layer(), q, k, v, PA.visible_mask(own, queries),
                                        scaling=dim ** -0.5,
                                        shared_prefix=shared if prefix else [])
    assert got.shape == (rows, queries, heads, dim)

    group = heads // kv_heads
    full_k = torch.cat([pk.expand(rows, -1, -1, -1), k], 2).repeat_interleave(group, 1)
    full_v = torch.cat([pv.expand(rows, -1, -1, -1), v], 2).repeat_interleave(group, 1)
    visible = torch.cat([torch.ones(rows, 1, queries, prefix, dtype=torch.bool),
                         PA.visible_mask(own, queries)], -1)
    want = F.scaled_dot_product_attention(q, full_k, full_v, attn_mask=visible).transpose(1, 2)
    # queries of pad positions see no real column when there is no prefix: their output is
    # never used, it must only stay finite
    real = own[:, -queries:].bool()
    if not prefix:
        assert torch.isfinite(got).all()
        got, want = got[real], want[real]
    assert torch.allclose(got, want, atol=1e-10)


def test_without_shared_prefix_argument_it_is_sdpa(tiny_llama_dir):
    """While active, calls that pass no ``shared_prefix`` (``generate``, the prefix's own
    prefill) are plain SDPA: same logits as the model outside the context."""
    eng = load_engine(EngineSpec("transformers", model=str(tiny_llama_dir)))
    ids = torch.tensor([[1, 40, 41, 42, 43], [0, 0, 1, 40, 44]])
    mask = (ids != 0).long()
    with torch.inference_mode():
        before = eng.model(input_ids=ids, attention_mask=mask).logits
        with PA.active(eng.model):
            assert eng.model.config._attn_implementation == PA.NAME
            inside = eng.model(input_ids=ids, attention_mask=mask).logits
        assert eng.model.config._attn_implementation != PA.NAME
    assert torch.equal(before, inside)


def test_decoder_rows_hold_their_own_tokens_only_and_match_generate(tiny_llama_dir,
                                                                    monkeypatch):
    """A 60-token shared instruction and short own parts: every attention call of the decoder
    reads the prefix from one ``[1, ...]`` copy, and no row's cache is ever wider than its own
    tokens plus the new ones; the outputs are plain greedy ``generate``'s."""
    from capsfus.engines.continuous import ContinuousDecoder
    eng = load_engine(EngineSpec("transformers", model=str(tiny_llama_dir),
                                 decoding=Decoding(max_new_tokens=6)))
    prefix = [1] + [40 + i % 50 for i in range(59)]
    owns = [[7], [8, 9, 10], [11, 12], [13, 14, 15, 16], [17]]
    prompts = [prefix + o for o in owns]
    seen = []
    real = PA.shared_prefix_attention

    def spy(module, query, key, value, mask, *a, shared_prefix=None, **kw):
        if shared_prefix is not None:
            pk, pv = shared_prefix[module.layer_idx]
            seen.append((pk.shape[0], pk.shape[2], key.shape[0], key.shape[2]))
        return real(module, query, key, value, mask, *a, shared_prefix=shared_prefix, **kw)
    monkeypatch.setitem(PA.AttentionInterface._global_mapping, PA.NAME, spy)
    got = {}
    ContinuousDecoder(eng.model, pad_id=eng.tokenizer.pad_token_id, eos_ids=set(),
                      max_new_tokens=6, batch_size=3, pick=lambda x: x.argmax(-1)).run(
        prompts, lambda i, tokens, hit: got.__setitem__(i, tokens))
    assert seen and {s[:2] for s in seen} == {(1, 60)}       # one copy of the 60 tokens
    longest_own = max(map(len, owns)) + 6
    assert max(s[3] for s in seen) <= longest_own            # no prefix column in any row
    for i, p in enumerate(prompts):
        ids = torch.tensor([p])
        ref = eng.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                 do_sample=False, eos_token_id=None,
                                 pad_token_id=eng.tokenizer.pad_token_id)[0, len(p):].tolist()
        assert got[i] == ref


def test_gpu_rows_count_the_shared_prefix_once_for_a_13b_model_on_an_h100():
    """LLaMA-2-13B in bf16 on an 80 GB H100 (26 GB of weights) at fusion lengths: a 98-token
    instruction shared by all rows, own parts up to 100 tokens, 80 new tokens. Holding the
    prefix once takes the rows in flight from ~150 to several hundred."""
    from transformers import LlamaConfig

    from capsfus.engines.continuous import SPARE
    from capsfus.engines.gpu_memory import kv_bytes_per_token, rows_for_memory
    cfg = LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                      num_attention_heads=40, vocab_size=32000)
    kv, free = kv_bytes_per_token(cfg, 2), 80 * 10**9 - 26 * 10**9
    per_row_copy = rows_for_memory(free, kv, 98 + 100 + 80 + SPARE, cfg.vocab_size)
    shared = rows_for_memory(free, kv, 100 + 80 + SPARE, cfg.vocab_size, shared_tokens=98)
    assert per_row_copy < 200 and shared >= 200
    assert shared / per_row_copy > 1.35


def test_prefill_chunks_bound_their_padded_tokens():
    """Hundreds of rows joining at once (a GPU's batch) are prefilled in chunks of at most
    ``PREFILL_TOKENS`` padded tokens, each row once, longest first; 64 CPU rows stay one."""
    from capsfus.engines.continuous import PREFILL_TOKENS, ContinuousDecoder
    prompts = [[1] * 98 + [2] * (40 + i % 20) for i in range(400)]
    group = sorted(range(400), key=lambda i: -len(prompts[i]))
    chunks = ContinuousDecoder._chunks(group, prompts, 98)
    assert sorted(i for c in chunks for i in c) == list(range(400))
    assert all(len(c) * (len(prompts[c[0]]) - 98) <= PREFILL_TOKENS for c in chunks)
    assert len(chunks) >= 400 * 59 // PREFILL_TOKENS
    assert len(ContinuousDecoder._chunks(group[:64], prompts, 98)) == 1


def test_gpu_memory_mode_sizes_each_call_and_keeps_an_out_of_memory_cap(tiny_llama_dir,
                                                                        monkeypatch):
    """The engine's GPU sizing run on the CPU (its CUDA queries aside): each call's rows in
    flight follow from the memory budget, the call's longest own part and its shared prefix
    counted once; an out-of-memory error halves them and caps every later call."""
    from test_engines import fail_on_wide_batches, prompts_for

    from capsfus.engines.continuous import SPARE, common_prefix
    from capsfus.engines.gpu_memory import kv_bytes_per_token, rows_for_memory
    eng = load_engine(EngineSpec("transformers", model=str(tiny_llama_dir),
                                 decoding=Decoding(max_new_tokens=6)))
    prompts = prompts_for(eng)
    expected = eng.generate(prompts)
    ids = eng.encode(prompts)
    shared = common_prefix(ids)
    own = max(map(len, ids)) - shared + 6 + SPARE
    kv = kv_bytes_per_token(eng.model.config, 4)
    eng.batch_from, eng.free_after_weights = "gpu memory", 10**9
    want = rows_for_memory(10**9, kv, own, eng.model.config.vocab_size, shared_tokens=shared)
    assert want == min(1024, (int(0.9 * 10**9) - kv * shared) //
                       (int(1.1 * kv * own) + 12 * eng.model.config.vocab_size))
    assert eng.generate(prompts) == expected and eng.batch_size == want
    per_row = int(1.1 * kv * own) + 12 * eng.model.config.vocab_size
    eng.free_after_weights = int((3.5 * per_row + kv * shared) / 0.9)     # room for 3 rows
    assert eng.generate(prompts) == expected and eng.batch_size == 3
    fail_on_wide_batches(eng, monkeypatch, RuntimeError("CUDA out of memory."), widest=2)
    assert eng.generate(prompts) == expected and eng.batch_size == 1 == eng.oom_cap
    eng.free_after_weights = 10**9                                 # more memory: still capped
    assert eng.generate(prompts[:4]) == expected[:4] and eng.batch_size == 1


ARCHS = {"Qwen2": {}, "Mistral": {"sliding_window": None}, "Gemma": {"head_dim": 8},
         "Phi3": {"pad_token_id": 0}, "Qwen3": {"head_dim": 8}, "Granite": {}, "Olmo2": {}}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_other_architectures_decode_as_generate(arch):
    """Families that bring their own twists to attention (biases, q/k norms, GQA, head_dim,
    Granite's attention multiplier as ``scaling``): tiny random models, greedy, the decoder's
    tokens equal plain ``generate``'s."""
    import transformers as T

    from capsfus.engines.continuous import ContinuousDecoder, supported
    torch.manual_seed(0)
    cfg = getattr(T, f"{arch}Config")(vocab_size=300, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=256,
                                      eos_token_id=None, **ARCHS[arch])
    model = T.AutoModelForCausalLM.from_config(cfg).eval()
    assert supported(model)
    prompts = [list(range(5, 35)) + [100 + j] * (1 + j % 3) for j in range(5)]
    got = {}
    ContinuousDecoder(model, pad_id=0, eos_ids=set(), max_new_tokens=6, batch_size=2,
                      pick=lambda x: x.argmax(-1)).run(
        prompts, lambda i, tokens, hit: got.__setitem__(i, tokens))
    for i, p in enumerate(prompts):
        ids = torch.tensor([p])
        assert got[i] == model.generate(ids, attention_mask=torch.ones_like(ids),
                                        max_new_tokens=6, do_sample=False, eos_token_id=None,
                                        pad_token_id=0)[0, len(p):].tolist()


def test_soft_capped_or_sliding_window_models_are_not_supported():
    import transformers as T

    from capsfus.engines.continuous import supported
    tiny = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    assert not supported(T.AutoModelForCausalLM.from_config(T.Gemma2Config(**tiny)))
    assert not PA.supported(T.AutoModelForCausalLM.from_config(
        T.LlamaConfig(**tiny, attn_logit_softcapping=50.0)))
    assert PA.supported(T.AutoModelForCausalLM.from_config(T.LlamaConfig(**tiny)))


def test_cascade_in_bfloat16_keeps_the_dtype_and_stays_close():
    """A GPU runs it in bf16: scores and softmax in fp32, products in bf16, output bf16."""
    torch.manual_seed(1)
    q = torch.randn(4, 6, 1, 16)
    k, v = torch.randn(4, 2, 5, 16), torch.randn(4, 2, 5, 16)
    pk, pv = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    own = torch.ones(4, 5, dtype=torch.long)
    own[0, :2] = 0
    mask = PA.visible_mask(own, 1)
    exact, _ = PA.shared_prefix_attention(Layer(), q.double(), k.double(), v.double(), mask,
                                          shared_prefix=[None, (pk.double(), pv.double())])
    half, _ = PA.shared_prefix_attention(Layer(), q.bfloat16(), k.bfloat16(), v.bfloat16(),
                                         mask, shared_prefix=[None, (pk.bfloat16(),
                                                                     pv.bfloat16())])
    assert half.dtype == torch.bfloat16
    assert (half.double() - exact).abs().max() < 0.05
