"""One call on one GPU, every figure of issue 15 in one JSON file; nothing downloaded.

    bash bench/gpu_check.sh --out gpu_check.json            # H100/H200: <= 10 minutes
    bash bench/gpu_check.sh --tiny --out /tmp/check.json     # any CPU: the same code, tiny

Parts (each in its own subprocess, with its own time limit; a part that fails or times out
is recorded with the tail of its output, and the others still run):

- ``fusion``: ``capsfus bench fuse --random-weights --arch llama2-13b`` (random LLaMA-2-13B
  weights built in bf16 on the GPU, a BPE tokenizer trained here on the prompts, outputs fixed
  to the mean fused length): (a) the released inference settings (3 beams, batch 4, padded to
  256), (b) our transformers engine at the same decoding, (c) at our default (greedy, rows in
  flight from the GPU's free memory);
- ``caption``: images/s of the caption stage (``bench/caption_throughput.py``) with a
  BLIP-large-architecture model (ViT-L/16 at 384, BERT-base decoder; random weights) on
  generated JPEGs;
- ``train``: tokens/s and MFU of training steps of a ~1B model (the 13B's layer shape, 2
  layers: ``bench/train_throughput.py``); DeepSpeed ZeRO-3 through ``capsfus train`` is not
  run when DeepSpeed is missing (it is, on the lent GPU machine): the JSON says so;
- ``servers``: the vllm-server / sglang-server engines fusing a shard through ``capsfus fuse``
  with a saved random model, if ``vllm`` or ``sglang`` can be found; otherwise the JSON says
  they are not installed.

Prompts: the release rows the repository carries (``tests/data``, through
``capsfus.ingest.example_data``) when they can be unpacked (zstandard installed), else generated
LAION-like rows (said in the JSON).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def sh(cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                           env={**os.environ, **(env or {})})
        rc, out = p.returncode, (p.stdout or "") + (p.stderr or "")
    except subprocess.TimeoutExpired as e:
        rc = "timeout"
        out = ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes)
               else (e.stdout or "")) + ((e.stderr or b"").decode(errors="replace")
                                         if isinstance(e.stderr, bytes) else (e.stderr or ""))
    return {"rc": rc, "wall_s": round(time.time() - t0, 1), "tail": out[-1500:],
            "command": " ".join(map(str, cmd))}


def write_prompts(folder: Path, n: int) -> tuple[Path, str]:
    try:
        from capsfus.ingest.example_data import example_data
        data = example_data()
        return data, f"{data.name} (first {n} rows)"
    except Exception:       # e.g. no zstandard on a bare GPU machine: generated rows instead
        pass
    path = folder / "rows.jsonl"
    subjects = ["a red car", "two dogs", "a wooden table", "the Eiffel Tower", "a bowl of soup",
                "an old man", "a mountain lake", "a pair of shoes", "a vintage poster", "a cat"]
    with open(path, "w") as f:
        for i in range(n):
            s = subjects[i % len(subjects)]
            f.write(json.dumps({"TEXT": f"{s} {i} for sale HD wallpaper Acme Model-{i} 20{i % 90:02d}",
                                "top_caption": f"there is {s} in a park on a sunny day",
                                "URL": f"https://example.org/{i}.jpg"}) + "\n")
    return path, f"{n} generated LAION-like rows"


def train_tokenizer(folder: Path, prompts: Path) -> Path:
    """A byte-level BPE trained on the prompt rows, saved as a tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from capsfus.prompt import INSTRUCTION_LINES
    text = prompts.read_text(encoding="utf-8")
    lines = text.splitlines()[:20000] + list(INSTRUCTION_LINES) + ["Sentence 1: Sentence 2: "
                                                                   "New Sentence:"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=4000, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = bpe.token_to_id("<s>")
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", bos)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", model_max_length=4096)
    out = folder / "tokenizer"
    tok.save_pretrained(out)
    return out


def part_fusion(args, tmp: Path, prompts: Path, tok: Path) -> dict:
    out = tmp / "fusion.json"
    cmd = [PY, "-m", "capsfus.cli", "bench", "fuse", "--random-weights", "--arch", args.arch,
           "--model", str(tok), "--prompts", str(prompts), "--rows", str(args.rows),
           "--variants", "a,b,c", "--json-out", str(out)]
    if args.layers:
        cmd += ["--layers", str(args.layers)]
    r = sh(cmd, args.part_timeout)
    if out.exists():
        r["result"] = json.loads(out.read_text())
    return r


def part_caption(args, tmp: Path) -> dict:
    out = tmp / "caption.json"
    cmd = [PY, "bench/caption_throughput.py", "--images", str(args.images), "--rounds", "1",
           "--decodings", "beam3", "--out", str(out), "--arch", "tiny" if args.tiny else "large",
           "--batch-size", str(8 if args.tiny else 64)]
    if args.tiny:
        cmd += ["--size", "64x48", "--image-size", "32"]
    r = sh(cmd, args.part_timeout)
    if out.exists():
        r["result"] = json.loads(out.read_text())
    return r


def part_train(args, tmp: Path) -> dict:
    cmd = [PY, "bench/train_throughput.py"]
    cmd += (["--tiny", "--device", "cpu", "--steps", "2", "--warmup", "1"] if args.tiny
            else ["--layers", "2", "--batch", "16", "--seq-len", "256", "--steps", "10"])
    r = sh(cmd, args.part_timeout)
    lines = [ln for ln in r["tail"].splitlines() if ln.startswith("{")]
    if r["rc"] == 0 and lines:
        r["result"] = json.loads(lines[-1])
    have_ds = importlib.util.find_spec("deepspeed") is not None
    r["zero3"] = ("not measured: ZeRO-3 through `capsfus train` needs several ranks and "
                  "DeepSpeed" + ("" if have_ds else ", which is not installed here") +
                  "; the figure is plain AdamW on one device, the same layer shapes")
    r["model"] = "LLaMA-2-13B layer shape, 2 layers (~1B parameters)" if not args.tiny \
        else "tiny"
    return r


def part_servers(args, tmp: Path, prompts: Path, tok: Path) -> dict:
    found = {"vllm": shutil.which("vllm") or importlib.util.find_spec("vllm"),
             "sglang": importlib.util.find_spec("sglang")}
    if not any(found.values()):
        return {"status": "not installed: neither vllm nor sglang can be found on this "
                          "machine; the server engines are untested on a GPU"}
    res: dict = {}
    model = tmp / "server-model"
    sh([PY, "-c", (
        "import sys, torch; from transformers import LlamaConfig, LlamaForCausalLM, "
        "AutoTokenizer; from capsfus.perf.bench import ARCHS; "
        f"a = dict(ARCHS[{args.arch!r}]); a['num_hidden_layers'] = {args.server_layers}; "
        f"t = AutoTokenizer.from_pretrained({str(tok)!r}); "
        "c = LlamaConfig(**a, bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id, "
        "pad_token_id=t.pad_token_id, max_position_embeddings=4096); "
        f"m = LlamaForCausalLM(c).to(torch.bfloat16); m.save_pretrained({str(model)!r}); "
        f"t.save_pretrained({str(model)!r})")], args.part_timeout)
    for kind in ("vllm", "sglang"):
        if not found[kind]:
            res[kind] = {"status": "not installed"}
            continue
        run = tmp / f"run-{kind}"
        sh([PY, "-m", "capsfus.cli", "shard", str(prompts), "--out", str(run),
            "--rows-per-shard", str(args.rows * 4)], 120)
        r = sh([PY, "-m", "capsfus.cli", "fuse", str(run), "--engine", f"{kind}-server",
                "--model", str(model), "--chat-template", "off", "--dtype", "bfloat16",
                "--chunk-size", str(args.rows * 4), "--server-max-model-len", "512",
                "--shards", "0"], args.part_timeout)
        summaries = [json.loads(p.read_text()) for p in (run / "fuse" / "logs").glob("worker-*.json")] \
            if (run / "fuse" / "logs").exists() else []
        if summaries:
            s = summaries[0]
            rows = sum(1 for _ in open(prompts)) if prompts.suffix == ".jsonl" else None
            r["worker"] = {k: s.get(k) for k in ("load_s", "gen_s", "busy_wall_s",
                                                  "generation_share", "runtime")}
            done = json.loads((run / "fuse" / "state" / "00000.json").read_text())
            r["rows"] = done.get("rows_done")
            if s.get("gen_s"):
                r["captions_per_s"] = round(done.get("rows_done", 0) / s["gen_s"], 2)
            del rows
        r["status"] = "ok" if r["rc"] == 0 else f"failed ({r['rc']})"
        if r["rc"] == 0:
            r.pop("tail", None)
        res[kind] = r
    res["model"] = f"random {args.arch} with {args.server_layers} layers, saved in bf16"
    res["status"] = ", ".join(f"{k} {res[k]['status']}" for k in ("vllm", "sglang"))
    return res


def machine() -> dict:
    info = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        import torch
        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory
                                          / 2**30, 1)
        else:
            info["gpu"] = None
    except ImportError:
        info["torch"] = None
    for pkg in ("transformers", "deepspeed", "vllm", "sglang"):
        info[pkg] = importlib.util.find_spec(pkg) is not None
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="the JSON file to write")
    ap.add_argument("--tiny", action="store_true",
                    help="tiny architectures on the CPU: checks the script, measures nothing")
    ap.add_argument("--parts", default="fusion,caption,train,servers")
    ap.add_argument("--rows", type=int, help="fusion prompts (default 256; tiny: 8)")
    ap.add_argument("--images", type=int, help="caption images (default 1024; tiny: 16)")
    ap.add_argument("--layers", type=int, help="override the fusion model's layer count")
    ap.add_argument("--server-layers", type=int, help="layers of the server model (default 8; "
                                                      "tiny: 2)")
    ap.add_argument("--part-timeout", type=float, help="seconds per part (default 170; tiny 60)")
    args = ap.parse_args(argv)
    args.arch = "tiny" if args.tiny else "llama2-13b"
    args.rows = args.rows or (8 if args.tiny else 256)
    args.images = args.images or (16 if args.tiny else 1024)
    args.server_layers = args.server_layers or (2 if args.tiny else 8)
    args.part_timeout = args.part_timeout or (60 if args.tiny else 170)
    t0 = time.time()
    result = {"format": "capsfus-gpu-check", "version": 1,
              "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="minutes"),
              "command": " ".join(["bash bench/gpu_check.sh", *(argv or sys.argv[1:])]),
              "tiny": args.tiny, "machine": machine(), "parts": {}}
    if args.tiny:
        result["note"] = "tiny architectures: checks that the script runs, not a measurement"
    parts = args.parts.split(",")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        tmp = Path(tmp)
        prompts, source = write_prompts(tmp, max(args.rows * 4, 64))
        result["prompts"] = source
        tok = train_tokenizer(tmp, prompts) if {"fusion", "servers"} & set(parts) else None
        for name in parts:
            print(f"gpu_check: {name}…", file=sys.stderr, flush=True)
            if name == "fusion":
                r = part_fusion(args, tmp, prompts, tok)
            elif name == "caption":
                r = part_caption(args, tmp)
            elif name == "train":
                r = part_train(args, tmp)
            elif name == "servers":
                r = part_servers(args, tmp, prompts, tok)
            else:
                r = {"status": f"unknown part {name!r}"}
            if "rc" in r:
                r["status"] = "ok" if r["rc"] == 0 else f"failed ({r['rc']})"
                if r["rc"] == 0:
                    r.pop("tail", None)
            result["parts"][name] = r
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")   # partial too
    result["wall_s"] = round(time.time() - t0, 1)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v.get("status") for k, v in result["parts"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
