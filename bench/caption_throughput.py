"""Caption-stage throughput (images/s) with the image decoding in line vs in worker threads.

Both variants run the real stage (``capsfus.executors.local``: leases, chunks, commits) on the
same run: img2dataset-like webdataset tars of generated JPEGs (``--size``, default 512x384,
smooth gradients plus noise so they compress like photos), captioned by a TINY RANDOM BLIP
built from a config (the test model of tests/test_caption.py, with BLIP-large's 384x384
input by default, 4x4 patches, 1+1 layers), with
two decodings: the stage's default (``beam3``: 3 beams, up to 30 new tokens) and a cheap one
(``greedy8``: greedy, 8 tokens) where decoding the images is a larger share; chunks of 128,
batch 32. The time measured is the worker's busy time after the model load.

- inline: ``--decode-threads 0``: each chunk's images are read, decoded and resized on the
  main thread, between generation calls;
- threaded: ``--decode-threads N``: the reader thread decodes the next chunk on N threads
  while the main thread captions the current one.

Rounds alternate the variants (a b a b …) so a change in machine load hits both; the caption
folder is removed before each round. Outputs are compared: the variants must caption
identically.

    OMP_NUM_THREADS=1 python bench/caption_throughput.py --images 1024 --rounds 3
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import os
import platform
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def build_blip_large(folder: Path, image_size: int = 384) -> None:
    """BLIP-large's architecture (ViT-L/16 vision encoder at 384, BERT-base text decoder with
    cross-attention) with random weights, and the test model's small tokenizer: images/s
    depend on the shapes, not on the weights or the vocabulary's words."""
    import torch
    from test_caption import build_tiny_blip
    from transformers import AutoTokenizer, BlipConfig, BlipForConditionalGeneration
    build_tiny_blip(folder, image_size=image_size, patch_size=16)   # tokenizer, preprocessing
    n = len(AutoTokenizer.from_pretrained(folder))
    cfg = BlipConfig(
        text_config=dict(vocab_size=n, hidden_size=768, encoder_hidden_size=1024,
                         intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         max_position_embeddings=512, bos_token_id=n - 1, pad_token_id=0,
                         sep_token_id=3, eos_token_id=3),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                           num_attention_heads=16, image_size=image_size, patch_size=16),
        projection_dim=256, image_text_hidden_size=256)
    torch.manual_seed(0)
    BlipForConditionalGeneration(cfg).save_pretrained(folder)


def photo_like(seed: int, w: int, h: int) -> bytes:
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([(x / w) * rng.uniform(50, 255), (y / h) * rng.uniform(50, 255),
                     ((x + y) / (w + h)) * rng.uniform(50, 255)], axis=-1)
    arr = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_tars(folder: Path, n: int, per_tar: int, w: int, h: int) -> None:
    folder.mkdir(parents=True)
    for t in range(0, n, per_tar):
        with tarfile.open(folder / f"{t // per_tar:05d}.tar", "w") as tf:
            for i in range(t, min(n, t + per_tar)):
                key = f"{i:09d}"
                for name, data in ((f"{key}.jpg", photo_like(i, w, h)),
                                   (f"{key}.txt", f"alt text {i}".encode()),
                                   (f"{key}.json", json.dumps({"key": key}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))


DECODINGS = {"beam3": {"num_beams": 3, "max_new_tokens": 30},
             "greedy8": {"num_beams": 1, "max_new_tokens": 8}}


def run_variant(run: Path, model: Path, threads: int, batch: int, chunk: int,
                decoding: dict) -> tuple[float, dict]:
    """Seconds from the model loaded to the stage done (the worker's busy time), and the
    outputs (id -> caption or reject reason)."""
    from runhelp import stage_rows

    from capsfus.executors.local import prepare, run_local
    from capsfus.stages.caption import CaptionJob
    shutil.rmtree(run / "caption", ignore_errors=True)
    job = CaptionJob(run_dir=str(run), model=str(model), decode_threads=threads,
                     batch_size=batch, chunk_size=chunk, **decoding)
    (summary,) = run_local(prepare(job, None), workers=1)
    out, rej = stage_rows(run, "caption")
    return summary["busy_wall_s"], \
        {r["id"]: r["synthetic"] for r in out} | {r["id"]: r["reason"] for r in rej}


def parts(run: Path, model: Path, batch: int, decoding: dict, threads: int) -> dict:
    """The two halves alone, on the same images: reading + decoding + resizing (1 and
    ``threads`` threads) and captioning already-decoded arrays. With perfect overlap a run
    takes max(decode, caption) instead of their sum."""
    import numpy as np

    from capsfus.rundir.manifest import Run
    from capsfus.rundir.stage import input_rows
    from capsfus.stages.caption import CaptionJob, CaptionProcessor
    r = Run(run)
    m = r.manifest()
    rows = [x for i in range(len(m["shards"])) for x in input_rows(r, m, "input", i)]
    job = CaptionJob(run_dir=str(run), model=str(model), batch_size=batch, **decoding)
    cap = job.load_captioner()
    proc = CaptionProcessor(job, cap)
    refs = [x["image"] for x in rows]
    out = {}
    for n in (1, threads):
        t0 = time.perf_counter()
        dec = proc._decode_all(refs, n)
        out[f"decode_{n}_thread_s"] = round(time.perf_counter() - t0, 3)
    px = np.stack([d.pixels for d in dec])
    t0 = time.perf_counter()
    cap.caption(px, [x["id"] for x in rows])
    out["caption_only_s"] = round(time.perf_counter() - t0, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--size", default="512x384", help="WxH of the generated JPEGs")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=384,
                    help="the tiny BLIP's input side (BLIP-large: 384), 4x4 patches")
    ap.add_argument("--chunk", type=int, default=128, help="rows per committed chunk")
    ap.add_argument("--decodings", default="beam3,greedy8",
                    help=f"comma-separated, of {', '.join(DECODINGS)}")
    ap.add_argument("--arch", choices=["tiny", "large"], default="tiny",
                    help="tiny: the test BLIP (1+1 layers, hidden 32); large: BLIP-large's "
                         "architecture with random weights (ViT-L/16 at --image-size 384)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    w, h = map(int, args.size.split("x"))
    from test_caption import build_tiny_blip

    from capsfus.ingest.shard import shard
    with tempfile.TemporaryDirectory(prefix="capbench-") as tmp:
        tmp = Path(tmp)
        model = tmp / "blip"
        model.mkdir()
        if args.arch == "large":
            build_blip_large(model, image_size=args.image_size)
        else:
            build_tiny_blip(model, image_size=args.image_size, patch_size=args.image_size // 4)
        write_tars(tmp / "wds", args.images, 512, w, h)
        run = tmp / "run"
        shard([str(tmp / "wds")], run, rows_per_shard=512)
        walls: dict[str, list[float]] = {}
        outputs: dict[str, dict] = {}
        for r in range(args.rounds):
            for dec in args.decodings.split(","):
                for name, threads in (("inline", 0), ("threaded", args.threads)):
                    key = f"{dec}/{name}"
                    wall, rows = run_variant(run, model, threads, args.batch_size, args.chunk,
                                             DECODINGS[dec])
                    walls.setdefault(key, []).append(round(wall, 3))
                    outputs.setdefault(key, rows)
                    print(f"round {r + 1} {key}: {wall:.2f} s, {args.images / wall:.1f} "
                          f"images/s", flush=True)
        decs = args.decodings.split(",")
        halves = {d: parts(run, model, args.batch_size, DECODINGS[d], args.threads)
                  for d in decs}
    best = {k: min(v) for k, v in walls.items()}
    res = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="minutes"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                   f"load average {os.getloadavg()[0]:.1f} at the end",
        "command": " ".join(["python", "bench/caption_throughput.py"] + sys.argv[1:]),
        "model": (f"random BLIP-large architecture ({args.image_size}x{args.image_size}, "
                  f"ViT-L/16 + BERT-base decoder)" if args.arch == "large" else
                  f"tiny random BLIP ({args.image_size}x{args.image_size} input, 4x4 patches, "
                  f"1+1 layers, hidden 32)"),
        "images": args.images, "size": args.size, "threads": args.threads,
        "chunk": args.chunk, "batch": args.batch_size, "busy_s": walls,
        "images_per_s_best": {k: round(args.images / v, 2) for k, v in best.items()},
        "ratio_threaded_over_inline": {
            d: round(best[f"{d}/inline"] / best[f"{d}/threaded"], 2) for d in decs},
        "parts_s": halves,
        "identical_outputs": {
            d: outputs[f"{d}/inline"] == outputs[f"{d}/threaded"] for d in decs},
    }
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
