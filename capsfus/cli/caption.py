"""``capsfus caption`` (here, local executor) and ``capsfus submit caption`` (SLURM).

Registered in ``capsfus.cli`` (the SLURM flags are handed to ``submit_caption_cmd``).
"""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import UserError
from ..stages.caption import DEFAULT_MODEL, FORMATS
from .common import RETRY_REJECTED_OPTION

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _preset(ctx, param, value):
    from .common import load_preset
    return load_preset(ctx, param, value)


def _caption_options(f):
    opts = [
        click.option("--preset", type=click.Path(exists=True, dir_okay=False), is_eager=True,
                     expose_value=False, callback=_preset,
                     help="YAML file of option defaults, e.g. jobs/caption-blip-large.yaml."),
        click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True,
                     help="Captioning model: a Hub id or a local folder (BLIP for "
                          "--engine transformers, a vision-language chat model for vlm / "
                          "vllm)."),
        click.option("--revision", help="Model revision (branch, tag or commit)."),
        click.option("--engine", type=click.Choice(["transformers", "vlm", "vllm"]),
                     default="transformers", show_default=True,
                     help="transformers: BLIP (CPU or GPU); vlm: a LLaVA-style chat VLM "
                          "through transformers (CPU or GPU); vllm: a VLM on GPUs (untested "
                          "here)."),
        click.option("--batch-size", default=32, show_default=True,
                     help="Images per forward pass (halved on out-of-memory)."),
        click.option("--prompt", help='BLIP: text the caption continues, e.g. "a picture of" '
                                      "(the caption is stored without it); vlm/vllm: replaces "
                                      "the --format instruction."),
        click.option("--format", type=click.Choice(list(FORMATS)), default="short",
                     show_default=True,
                     help="Caption format, stored per row (`caption_format`): short (BLIP, "
                          "LAION-COCO style), descriptive or dense (VLMs: --engine vlm or "
                          "vllm; the instruction goes through the model's chat template)."),
        click.option("--tag", help="Another caption stage, caption@TAG, after the existing "
                                   "ones (e.g. a --format dense pass into --column "
                                   "synthetic_dense, for caption mixes at export)."),
        click.option("--column", default="synthetic", show_default=True,
                     help="Column the caption goes to; another name (synthetic_dense) keeps "
                          "`synthetic` for fusion and adds a caption `export --mix` can use."),
        click.option("--overwrite", is_flag=True,
                     help="Caption rows that already have a synthetic caption too (the old "
                          "one is kept as `synthetic_before`)."),
        click.option("--candidates", default=1, show_default=True,
                     help="Sample K captions per image and keep the one --clip-model scores "
                          "best (LAION-COCO's recipe); 1: beam search."),
        click.option("--clip-model", help="CLIP model (Hub id or folder) reranking the "
                                          "candidates."),
        click.option("--num-beams", default=3, show_default=True,
                     help="Beams when --candidates is 1."),
        click.option("--max-new-tokens", type=int,
                     help="Caption length limit (default: 30 for BLIP; 40/120/300 for a VLM's "
                          "short/descriptive/dense)."),
        click.option("--seed", default=0, show_default=True,
                     help="Seed of candidate sampling (per batch, from its first row id)."),
        click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
                     default="auto", show_default=True,
                     help="auto: bf16 (fp16 where bf16 is missing) on GPU, float32 on CPU."),
        click.option("--decode-threads", default=4, show_default=True,
                     help="Threads decoding and resizing the next chunk's images while the "
                          "model captions this one; 0 decodes in line (slower)."),
        click.option("--min-side", default=8, show_default=True,
                     help="Images with a shorter side are rejected (image_too_small)."),
        click.option("--max-pixels", default=64_000_000, show_default=True,
                     help="Images with more pixels are rejected (image_too_large)."),
        click.option("--shards", help="Shards to run, e.g. 0-9,12 (default: all)."),
        click.option("--chunk-size", default=256, show_default=True,
                     help="Rows per committed chunk: at most this much work is redone after "
                          "a kill."),
        click.option("--force", is_flag=True,
                     help="Redo the stage with changed output-shaping settings."),
        click.option("--lease-ttl", default=300.0, show_default=True,
                     help="Seconds without heartbeat after which a shard's lease is taken "
                          "over."),
        RETRY_REJECTED_OPTION,
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _caption_job(run_dir: str, kw: dict):
    from ..rundir.manifest import Run
    from ..stages.caption import CaptionJob
    if kw["decode_threads"] < 0:
        raise UserError("--decode-threads must be 0 or more")
    if kw["engine"] in ("vlm", "vllm") and kw["model"] == DEFAULT_MODEL:
        example = "llava-hf/llava-1.5-7b-hf" if kw["engine"] == "vlm" else \
            "Qwen/Qwen2-VL-7B-Instruct"
        raise UserError(f"--engine {kw['engine']} captions with a vision-language chat model: "
                        f"pass --model (e.g. {example})")
    from ..rundir.manifest import stage_name
    run = Run(Path(run_dir).resolve())  # workers and logs get absolute paths
    manifest = run.manifest()
    job = CaptionJob(
        run_dir=str(run.root), stage=stage_name("caption", kw["tag"]), column=kw["column"],
        model=kw["model"], revision=kw["revision"],
        engine=kw["engine"], dtype=kw["dtype"], batch_size=kw["batch_size"],
        prompt=kw["prompt"], format=kw["format"], num_beams=kw["num_beams"],
        max_new_tokens=kw["max_new_tokens"], candidates=kw["candidates"], seed=kw["seed"],
        clip_model=kw["clip_model"], overwrite=kw["overwrite"], min_side=kw["min_side"],
        max_pixels=kw["max_pixels"], decode_threads=kw["decode_threads"],
        chunk_size=kw["chunk_size"])
    return run, manifest, job


@click.command("caption", context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path())
@_caption_options
@click.option("--workers", default=1, show_default=True,
              help="Local worker processes, each loading the model once.")
def caption_cmd(run_dir, workers, **kw):
    """Fill the synthetic caption of RUN_DIR's rows from their images (BLIP by default).

    RUN_DIR comes from `capsfus shard` of an img2dataset download (webdataset .tar shards or
    parquet with image bytes). Rows that already have a synthetic caption keep it unless
    --overwrite. Rows whose image is missing, unreadable, undecodable, truncated, too small or
    too large go to RUN_DIR/caption/rejected with a reason. Stop it any time and run the same
    command again: it continues after the last committed chunk. `capsfus fuse RUN_DIR` then
    reads the captioned rows. For SLURM see `capsfus submit caption`.
    """
    from ..executors.local import prepare, run_local, shards_with_work
    from ..rundir.manifest import parse_shard_spec
    from ..rundir.status import stage_status
    from .common import (
        StageProgress,
        make_console,
        nothing_to_do,
        print_stage_summary,
        setup_console_logging,
    )
    if workers < 1:
        raise UserError("--workers must be at least 1")
    console = make_console()
    setup_console_logging(console)
    run, manifest, job = _caption_job(run_dir, kw)
    selected = parse_shard_spec(kw["shards"], len(manifest["shards"]))
    prep = prepare(job, selected, force=kw["force"], retry_rejected=kw["retry_rejected"])
    if not shards_with_work(prep):      # said before the captioning model is loaded
        console.print(nothing_to_do(run, job.stage, len(selected)))
        return
    console.print(f"[bold]{job.stage}[/] of run {manifest['run_id'][:8]}: {len(selected)} "
                  f"shard(s), {job.engine} {job.model}, {workers} worker(s), chunks of "
                  f"{job.chunk_size}")
    with StageProgress(str(run.root), job.stage, console):
        summaries = run_local(prep, workers=workers, lease_ttl=kw["lease_ttl"],
                              heartbeat=min(30.0, kw["lease_ttl"] / 4))
    rate = stage_status(run, job.stage).get("throughput_images_per_s")
    if rate:
        console.print(f"{job.stage}: {rate:.2f} images/s")
    print_stage_summary(console, run, job.stage, summaries)


def submit_caption_cmd(executor_options):
    """``capsfus submit caption``, built with the shared SLURM flags of ``capsfus.cli``."""

    @click.command("caption", context_settings=CONTEXT)
    @click.argument("run_dir", type=click.Path())
    @_caption_options
    @executor_options(defaults=True)
    def submit_caption(run_dir, dry_run, max_array_size, **kw):
        """Caption RUN_DIR on a SLURM cluster: one model per worker (one GPU each with
        --gpus-per-node), workers pull shards. The models are resolved (and downloaded, for
        Hub ids) here, before submission, so compute nodes can run offline."""
        from ..executors.slurm import ExecutorSettings
        from ..rundir.manifest import parse_shard_spec
        from .common import executor_kwargs, make_console, plan_and_submit
        console = make_console()
        run, manifest, job = _caption_job(run_dir, kw)
        es = ExecutorSettings(**executor_kwargs(kw), lease_ttl=kw["lease_ttl"])
        selected = parse_shard_spec(kw["shards"], len(manifest["shards"]))
        plan_and_submit(console, run, manifest, job, selected, es, dry_run=dry_run,
                        max_array_size=max_array_size, force=kw["force"],
                        retry_rejected=kw["retry_rejected"])

    return submit_caption
