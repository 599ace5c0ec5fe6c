"""``capsfus train`` (ranks on this machine) and ``capsfus submit train`` (SLURM).

Registered in ``capsfus.cli`` with ``add_train_commands(main, submit, executor_options,
executor_kwargs)``: the executor flags are the ones every ``submit`` command shares.
"""

from __future__ import annotations

import datetime as _dt
import shutil
import sys
from pathlib import Path

import click

from ..errors import UserError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "jobs" / "train-capsfus-llama-13b.yaml"


def _train_options(f):
    opts = [
        click.option("--data", "-d", required=True,
                     help="A run directory (its teacher stage, else fuse, else input with a "
                          "fused column) or any file/folder `capsfus shard` reads."),
        click.option("--base-model", "-m", help="Hub id or local folder of the model to "
                                                "finetune (default: from --config)."),
        click.option("--revision", help="Hub revision of the base model."),
        click.option("--gguf-file", help="Load the base model from this GGUF file inside the "
                                         "--base-model folder (dequantized for training)."),
        click.option("--lora", "lora_r", type=int, help="Train a LoRA adapter of this rank on "
                     "the frozen base instead of every weight (0: full finetuning)."),
        click.option("--lora-alpha", type=float, help="LoRA scaling alpha (default 2 x rank)."),
        click.option("--lora-dropout", type=float, help="Dropout on the LoRA path (default "
                                                        "0.05)."),
        click.option("--lora-target-modules", help="Comma-separated module names to adapt "
                     "(default: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)."),
        click.option("--chat-template", type=click.Choice(["auto", "on", "off"]),
                     help="As `capsfus fuse --chat-template` (default auto)."),
        click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
                     help="YAML training settings (default: jobs/train-capsfus-llama-13b.yaml"
                          ", the paper's Sec. 8 preset); flags below override it."),
        click.option("--output", "-o", type=click.Path(file_okay=False),
                     default="train-out", show_default=True,
                     help="Output folder: data/, checkpoints/, logs, model/ (the export)."),
        click.option("--stage", "stage_opt", help="Stage of the run to read (default: teacher, "
                                                  "else fuse, else input)."),
        click.option("--fused-col", help="Column of the fused caption (default: fused, or the "
                                         "first known release column)."),
        click.option("--raw-col", help="Raw caption column of an outside file."),
        click.option("--synthetic-col", help="Synthetic caption column of an outside file."),
        click.option("--prompt-file", type=click.Path(exists=True, dir_okay=False),
                     help="Train on this prompt instead of the paper's (as `fuse "
                          "--prompt-file`); it is exported with the model."),
        click.option("--eval-fraction", type=float, help="Share of rows held out (by id)."),
        click.option("--epochs", type=float),
        click.option("--max-steps", type=int, help="Stop after N optimizer steps (overrides "
                                                   "--epochs)."),
        click.option("--learning-rate", type=float),
        click.option("--warmup-steps", type=int),
        click.option("--global-batch-size", type=int),
        click.option("--per-device-batch-size", type=int),
        click.option("--save-steps", type=int, help="Checkpoint every N steps."),
        click.option("--save-total-limit", type=int, help="Complete checkpoints to keep."),
        click.option("--eval-steps", type=int, help="Held-out loss and samples every N steps."),
        click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None),
        click.option("--deepspeed", "deepspeed_file", type=click.Path(exists=True,
                                                                      dir_okay=False),
                     help="DeepSpeed config (default: jobs/deepspeed-zero3.json)."),
        click.option("--no-deepspeed", is_flag=True, help="Plain Trainer (DDP when ranks > 1)."),
        click.option("--mask-prompt/--no-mask-prompt", default=None,
                     help="Loss on the fused caption only (default) or on the whole text."),
        click.option("--export-now", is_flag=True,
                     help="Do not train further: export the latest complete checkpoint as "
                          "OUTPUT/model (a time-boxed run stopped early; recorded as such)."),
        click.option("--force", is_flag=True,
                     help="Start over: delete this output's checkpoints and export."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _overrides(kw: dict) -> dict:
    o = {k: kw.get(k) for k in ("eval_fraction", "epochs", "max_steps", "learning_rate",
                                "warmup_steps", "global_batch_size", "per_device_batch_size",
                                "save_steps", "save_total_limit", "eval_steps",
                                "gradient_checkpointing", "mask_prompt", "revision", "gguf_file",
                                "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
                                "chat_template")}
    o["base_model"] = kw.get("base_model")
    o["prompt_file"] = str(Path(kw["prompt_file"]).resolve()) if kw.get("prompt_file") else None
    if kw.get("deepspeed_file"):
        o["deepspeed"] = str(Path(kw["deepspeed_file"]).resolve())
    if kw.get("no_deepspeed"):
        o["deepspeed"] = ""       # given, and off
    return o


def prepare_job(console, kw: dict, world_size: int):
    """Config → resolved model → prepared data → ``OUTPUT/job.json``. Returns the job (None
    when the output already holds the finished model for these settings)."""
    from ..models import resolve_model
    from ..rundir.io import atomic_write_json, read_json
    from ..train.config import TrainConfig, TrainJob, settings_hash
    from ..train.data import context_length, prepare, resolve_source
    from ..train.export import exported
    from .common import ingest_with_progress

    default = str(DEFAULT_CONFIG) if DEFAULT_CONFIG.is_file() else None  # a source checkout
    cfg = TrainConfig.load(kw.get("config_file") or default, _overrides(kw))
    if kw.get("no_deepspeed"):
        cfg.deepspeed = None
    if not cfg.base_model:
        raise UserError("no base model: pass --base-model (a Hub id or a local folder)")
    cfg.grad_accumulation(world_size)     # a batch that does not divide fails here, not later
    out = Path(kw["output"]).resolve()
    if kw.get("force"):
        for name in ("checkpoints", "model", "data", "data-run", "train_config.json", "log.jsonl",
                     "samples.jsonl"):
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    path, revision = resolve_model(cfg.base_model, cfg.revision, cfg.gguf_file)

    def shard_fn(inputs, dest, raw_col, synthetic_col):
        ingest_with_progress(console, "sharding", inputs, dest, 100_000, raw_col,
                             synthetic_col, None, None)
    source = resolve_source(kw["data"], out, kw.get("stage_opt"), kw.get("fused_col"),
                            kw.get("raw_col"), kw.get("synthetic_col"), shard_fn)
    from transformers import AutoTokenizer
    gguf = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **gguf)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer of {cfg.base_model}: "
                        f"{str(e).strip().splitlines()[0]}") from None
    console.print(f"tokenizing stage [bold]{source.stage}[/] of {source.run.root} "
                  f"(fused caption: {source.fused_col})")
    info = prepare(source, tokenizer, cfg.base_model,
                   context_length(path, tokenizer, cfg.gguf_file), cfg,
                   out / "data", console)
    c = info["counts"]
    console.print(f"  {c['train']:,} training rows, {c['eval']:,} held out "
                  f"({out / 'data' / 'heldout_ids.txt'}), "
                  f"{sum(c['skipped'].values()):,} skipped"
                  + "".join(f", {k} {v:,}" for k, v in sorted(c["skipped"].items()))
                  + f"; sequence length {info['seq_len']} tokens (prompt budget "
                    f"{info['max_prompt_tokens']}, {c['raw_cut']:,} raw captions cut)")
    settings = {"model": cfg.settings(), "revision": revision, "data": info["key"],
                "world_size": world_size}
    h = settings_hash(settings)
    cfg_path = out / "train_config.json"
    if cfg_path.exists():
        old = read_json(cfg_path)
        if old["settings_hash"] != h:
            raise UserError(f"{out} holds a training with other settings (data, model, "
                            f"hyperparameters or number of ranks): rerun with the same ones "
                            f"to resume, pass --force to start over, or use another --output")
        done = exported(out)
        if done and done.get("settings_hash") == h and not done.get("stopped_at_step"):
            console.print(f"already trained: {out / 'model'} (held-out loss "
                          f"{done['heldout']['loss']:.4f}); --force starts over")
            return None
    atomic_write_json(cfg_path, {"settings": settings, "settings_hash": h})
    cfg_dict = cfg.to_dict()
    job = TrainJob(output=str(out), model_path=path, model_revision=revision, config=cfg_dict,
                   data_dir=str(out / "data"), world_size=world_size)
    job.save()
    return job


def _print_result(console, out: Path) -> None:
    from ..train.export import exported
    info = exported(out)
    if not info:
        raise UserError(f"training finished without an export in {out / 'model'}: see "
                        f"{out / 'logs'}")
    console.print(f"[bold]{out / 'model'}[/]: step {info['global_step']}, held-out loss "
                  f"{info['heldout']['loss']:.4f}. Fuse with it: capsfus fuse RUN --engine "
                  f"transformers --model {out / 'model'}")


@click.command("train", context_settings=CONTEXT)
@_train_options
@click.option("--nproc", default=1, show_default=True,
              help="Ranks on this machine (one per GPU; CPU ranks use gloo).")
def train_cmd(nproc, **kw):
    """Finetune a fusion model (CapsFus-LLaMA) on (raw, synthetic, fused) triplets.

    \b
    Defaults are the paper's (jobs/train-capsfus-llama-13b.yaml): LLaMA-2-13B, global batch
    128, 2 epochs, peak LR 1e-5 cosine to 0, 500 warm-up steps, AdamW (0.9, 0.95), eps 1e-8,
    no weight decay, bf16 on GPU, DeepSpeed ZeRO-3. The loss is on the fused caption only;
    the prompt is the one `capsfus fuse` uses. Held-out ids: OUTPUT/data/heldout_ids.txt.

    Stop it any time and run the same command again: it resumes from the latest complete
    checkpoint (model, optimizer, schedule, data position). The result, OUTPUT/model, loads
    with `capsfus fuse RUN --engine transformers --model OUTPUT/model`.
    """
    from rich.console import Console

    from ..train.launch import run_local
    if nproc < 1:
        raise UserError("--nproc must be at least 1")
    console = Console(stderr=True)
    job = prepare_job(console, kw, nproc)
    out = Path(kw["output"]).resolve()
    if job is None:
        return
    if kw.get("export_now"):
        from ..train.export_now import export_checkpoint
        export_checkpoint(job)
        _print_result(console, out)
        return
    ds = job.config["deepspeed"]
    console.print(f"training {job.config['base_model']} on {nproc} rank(s)"
                  f"{' with DeepSpeed ' + Path(ds).name if ds else ''}"
                  f"; logs in {out}")
    code = run_local(out, nproc)
    if code:
        console.print(f"[red]training failed[/] (exit {code}); rank logs: {out / 'logs'}. "
                      f"Run the same command again to resume from the latest complete "
                      f"checkpoint.")
        sys.exit(1)
    _print_result(console, out)


def add_train_commands(main, submit, executor_options, executor_kwargs) -> None:
    main.add_command(train_cmd)

    @submit.command("train", context_settings=CONTEXT)
    @_train_options
    @executor_options(defaults=True)
    def submit_train(dry_run, max_array_size, **kw):
        """Finetune on a SLURM cluster: one job, one task per GPU over --nodes x
        --gpus-per-node (on CPU clusters --workers-per-node tasks per node).

        Data are prepared and the model resolved here, before submission (compute nodes may be
        offline). On SIGUSR2 (time limit, preemption) the job is requeued and resumes from the
        latest complete checkpoint; `capsfus submit train` with the same flags does the same
        after a failure.
        """
        from rich.console import Console

        from ..executors.slurm import ExecutorSettings
        console = Console(stderr=True)
        if kw.pop("export_now", False):
            raise UserError("--export-now exports here, not on the cluster: run `capsfus train "
                            "--export-now` with the same flags")
        es = ExecutorSettings(**executor_kwargs(kw))
        per_node = es.gpus_per_node or es.workers_per_node
        world = es.nodes * per_node
        job = prepare_job(console, kw, world)
        if job is None:
            return
        rec = submit_job(job, es, dry_run=dry_run)
        if dry_run:
            click.echo(rec["script"])
            console.print(f"plan: 1 job, {es.nodes} node(s) x {per_node} task(s) = {world} "
                          f"rank(s); nothing submitted")
            return
        console.print(f"submitted job {rec['job_id']}: {world} rank(s) on {es.nodes} "
                      f"node(s); output {job.output} (squeue -j {rec['job_id']}; "
                      f"logs in {job.output}/slurm)")


def submit_job(job, es, dry_run: bool = False) -> dict:
    """One SLURM job of nodes x tasks-per-node tasks, each running one rank."""
    import submitit

    from ..executors.slurm import dry_run_sbatch, submitit_parameters
    from ..rundir.io import atomic_write_json
    from ..train.launch import TrainTask
    out = Path(job.output)
    per_node = es.gpus_per_node or es.workers_per_node
    p = submitit_parameters(es, f"capsfus-train-{out.name}"[:60], 1)
    p.pop("array_parallelism", None)
    p.update(nodes=es.nodes, ntasks_per_node=per_node)
    if es.gpus_per_node:
        p["gres"] = f"gpu:{es.gpus_per_node}"
        p["cpus_per_task"] = es.cpus_per_gpu
    rec = {"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "executor": es.to_dict(), "world_size": job.world_size, "dry_run": dry_run}
    if dry_run:   # built without submitit's executor, which needs `srun`: works anywhere
        rec["script"] = dry_run_sbatch(out / "slurm" / "%j", p, 1)
        return rec
    try:
        ex = submitit.SlurmExecutor(folder=out / "slurm" / "%j", max_num_timeout=1000)
    except RuntimeError as e:   # no `srun` here
        from ..executors.slurm_queue import NO_CLUSTER_HINT
        raise UserError(f"no SLURM cluster found ({e}); {NO_CLUSTER_HINT}") from None
    ex.update_parameters(**p)
    try:
        j = ex.submit(TrainTask(str(out)))
    except Exception as e:
        raise UserError(f"sbatch refused the submission: {str(e).strip().splitlines()[-1]} "
                        f"(check --partition/--account/--qos/--time against `sinfo`)") from None
    rec["job_id"] = j.job_id
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    atomic_write_json(out / "submissions" / f"{stamp}.json", rec)
    return rec
