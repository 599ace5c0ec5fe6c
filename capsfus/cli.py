"""The ``capsfus`` command line. Each command is a thin layer over a module that does the work."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from pathlib import Path

import click

from .errors import UserError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _console(stderr: bool = True):
    from rich.console import Console
    return Console(stderr=stderr)


class _Group(click.Group):
    """Turns UserError (and a few known failures) into one clear line and a non-zero exit."""

    def invoke(self, ctx):
        from .io import CorruptFile
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except CorruptFile as e:
            click.echo(f"error: corrupted file: {e}. Rerun the stage to redo it.", err=True)
            sys.exit(3)


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(package_name="capsfus")
def main():
    """capsfus: shard caption datasets, fuse raw and synthetic captions with an LLM
    (CapsFusion), resume anything, and publish the result.

    \b
    Typical run:
      capsfus shard laion-coco/*.parquet --out RUN
      capsfus fuse RUN --engine transformers --model BAAI/CapsFus-LLaMA
      capsfus status RUN
      capsfus cat RUN --stage fuse | head
    Try it offline in a few minutes: capsfus demo
    """


def ingest_with_progress(console, label: str, inputs: list[str], out, rows_per_shard: int,
                         raw_col, synthetic_col, url_col, id_col, split=None) -> dict:
    """``ingest.shard`` with a live line of rows read / accepted / rejected (terminals only)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from .ingest import shard as do_shard
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True,
                  disable=not console.is_terminal) as progress:
        task = progress.add_task(label, total=None)

        def on_progress(s: dict) -> None:
            progress.update(task, description=(
                f"{label} source {s['sources_done']}/{s['sources']} {s['source']}: "
                f"{s['records']:,} rows read, {s['accepted']:,} accepted, "
                f"{s['rejected']:,} rejected"))

        return do_shard(inputs, out, rows_per_shard, raw_col, synthetic_col, url_col, id_col,
                        split, progress=on_progress)


# ---------------------------------------------------------------------------------------------
@main.command(context_settings=CONTEXT)
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False),
              help="Run directory to create.")
@click.option("--rows-per-shard", default=100_000, show_default=True,
              help="Rows per shard (the unit of work a worker leases).")
@click.option("--raw-col", help="Column holding the raw alt-text (default: from the layout).")
@click.option("--synthetic-col", help="Column holding the synthetic (BLIP) caption.")
@click.option("--url-col", help="Column holding the image URL.")
@click.option("--id-col", help="Column holding a row id (default: <file name>:<row number>).")
@click.option("--split", help="Split of a Hugging Face dataset (default: train).")
def shard(inputs, out, rows_per_shard, raw_col, synthetic_col, url_col, id_col, split):
    """Read INPUTS into a new run directory, as checksummed shards.

    INPUTS are parquet files, JSON lines (.jsonl, .jsonl.zst), JSON lists (.json), folders or
    globs of those, a `datasets` save_to_disk folder, or a Hub dataset id (online). Known
    layouts are detected: LAION-COCO (TEXT, top_caption, URL) and CapsFusion-120M (laion_2b,
    laion_coco, image_url); use the --*-col flags for anything else.

    Every input row ends up in a shard or in RUN/input/rejected/ with a reason; rows with no
    synthetic caption are kept and flagged (the caption stage fills them).
    """
    console = _console()
    t0 = time.time()
    m = ingest_with_progress(console, "reading", list(inputs), out, rows_per_shard, raw_col,
                             synthetic_col, url_col, id_col, split)
    c = m["counts"]
    console.print(f"[bold]{out}[/]: run {m['run_id'][:8]}, layout {m['mapping']['layout']} "
                  f"(raw={m['mapping']['raw']}, synthetic={m['mapping']['synthetic']}, "
                  f"url={m['mapping']['url']})")
    console.print(f"  {c['records']:,} rows read → {c['accepted']:,} in {len(m['shards'])} "
                  f"shard(s), {sum(c['rejected'].values()):,} rejected "
                  f"in {time.time() - t0:.1f}s")
    for reason, n in sorted(c["rejected"].items(), key=lambda kv: -kv[1]):
        console.print(f"    rejected {reason}: {n:,}")
    for flag, n in c["flagged"].items():
        if n:
            console.print(f"    flagged {flag}: {n:,} (kept; `capsfus caption` fills them)")


# ---------------------------------------------------------------------------------------------
def _engine_options(f):
    opts = [
        click.option("--engine", type=click.Choice(["transformers", "vllm", "openai", "echo"]),
                     default="transformers", show_default=True,
                     help="transformers: CPU or GPU, anywhere; vllm: GPU, fastest (untested "
                          "here); openai: any OpenAI-compatible --endpoint (e.g. a `vllm "
                          "serve`); echo: deterministic test engine."),
        click.option("--endpoint", help="openai engine: base URL, e.g. http://host:8000/v1."),
        click.option("--api-key-env", default=None,
                     help="openai engine: environment variable holding the API key "
                          "(default OPENAI_API_KEY; the key itself is never recorded)."),
        click.option("--model", "-m", help="Hub id or local folder of a causal LM."),
        click.option("--revision", help="Hub revision (branch, tag or commit); resolved to a "
                                        "commit and recorded."),
        click.option("--gguf-file", help="Load this GGUF file from the model folder."),
        click.option("--batch-size", type=int, help="Prompts per generate call (engine "
                                                    "default when unset)."),
        click.option("--max-new-tokens", default=80, show_default=True),
        click.option("--num-beams", default=1, show_default=True,
                     help="Beam search width (the released CapsFus-LLaMA inference used 3)."),
        click.option("--do-sample", is_flag=True, help="Sample instead of greedy decoding."),
        click.option("--temperature", default=1.0, show_default=True),
        click.option("--top-p", default=1.0, show_default=True),
        click.option("--top-k", default=0, show_default=True),
        click.option("--seed", default=0, show_default=True),
        click.option("--max-prompt-tokens", type=int,
                     help="Prompt budget; only the raw caption is cut to fit (default: 256, "
                          "or less if the model's context is smaller)."),
        click.option("--chat-template", type=click.Choice(["auto", "on", "off"]),
                     default="auto", show_default=True,
                     help="Render prompts through the model's chat template (auto: when the "
                          "tokenizer has one)."),
        click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
                     default="auto", show_default=True,
                     help="auto: bfloat16 on GPU, float32 on CPU."),
        click.option("--prompt-file", type=click.Path(exists=True, dir_okay=False),
                     help="Replace the paper's prompt; must contain {raw} and {synthetic}."),
        click.option("--tensor-parallel-size", default=1, show_default=True,
                     help="GPUs per model (vllm)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _load_preset(ctx, param, value):
    """``--preset FILE``: YAML of option names -> values, used as defaults; flags given on the
    command line still win. Eager, so it is read before the other options."""
    if not value:
        return value
    import yaml
    try:
        data = yaml.safe_load(open(value, encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise click.BadParameter(f"cannot read preset {value}: {e}") from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{value}: a preset is a mapping of option names to values")
    known = {p.name for p in ctx.command.params}
    options = {k.replace("-", "_"): v for k, v in data.items() if k != "description"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise click.BadParameter(f"{value}: unknown option(s) {', '.join(unknown)} for "
                                 f"`capsfus {ctx.command.name}`")
    ctx.default_map = {**(ctx.default_map or {}), **options}
    return value


preset_option = click.option(
    "--preset", type=click.Path(exists=True, dir_okay=False), is_eager=True,
    expose_value=False, callback=_load_preset,
    help="YAML file of option defaults, e.g. jobs/fuse-capsfus-llama-13b.yaml.")


def _spec_from(kw: dict):
    from .engines import Decoding, EngineSpec
    if kw["engine"] == "echo" and kw.get("model") not in (None, "echo"):
        raise UserError("--engine echo takes no --model")
    if kw.get("endpoint") and kw["engine"] != "openai":
        raise UserError("--endpoint goes with --engine openai")
    if kw["engine"] != "echo" and not kw.get("model"):
        raise UserError(f"--engine {kw['engine']} needs --model (a Hub id or a local folder)")
    dec = Decoding(max_new_tokens=kw["max_new_tokens"], num_beams=kw["num_beams"],
                   do_sample=kw["do_sample"], temperature=kw["temperature"], top_p=kw["top_p"],
                   top_k=kw["top_k"], seed=kw["seed"])
    if dec.max_new_tokens < 1 or dec.num_beams < 1:
        raise UserError("--max-new-tokens and --num-beams must be at least 1")
    return EngineSpec(engine=kw["engine"], model=kw.get("model"), revision=kw.get("revision"),
                      decoding=dec, batch_size=kw.get("batch_size"),
                      max_prompt_tokens=kw.get("max_prompt_tokens"),
                      chat_template=kw["chat_template"], dtype=kw["dtype"],
                      gguf_file=kw.get("gguf_file"),
                      tensor_parallel_size=kw["tensor_parallel_size"],
                      endpoint=kw.get("endpoint"), api_key_env=kw.get("api_key_env"))


class _StageProgress:
    """A progress bar fed by polling the stage's state files, so it works the same for
    workers in this process and in child processes."""

    def __init__(self, run_dir: str, stage: str, console):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)
        self.run_dir, self.stage = run_dir, stage
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("rows"),
                                 TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                                 TimeRemainingColumn(), console=console, transient=False)
        self._stop = threading.Event()

    def _poll(self, task) -> None:
        from .manifest import Run
        from .status import stage_status
        while True:
            try:
                s = stage_status(Run(Path(self.run_dir)), self.stage)
                if s.get("exists"):
                    rate = s.get("throughput_rows_per_s")
                    self.progress.update(
                        task, total=s["rows"]["total"], completed=s["rows"]["done"],
                        rate=f"{rate:.2f} rows/s" if rate else "",
                        description=f"{self.stage}: {s['counts']['done']}/{s['shards']} shards")
            except Exception:
                pass
            if self._stop.is_set():
                return
            self._stop.wait(1.0)

    def __enter__(self):
        self.progress.start()
        task = self.progress.add_task(f"{self.stage}", total=None, rate="")
        self._thread = threading.Thread(target=self._poll, args=(task,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()  # the poller makes one last update before it returns
        self._thread.join(timeout=5)
        self.progress.stop()


def _setup_console_logging(console) -> None:
    from rich.logging import RichHandler
    root = logging.getLogger("capsfus")
    if not any(isinstance(h, RichHandler) for h in root.handlers):
        h = RichHandler(console=console, show_path=False, level=logging.WARNING)
        root.addHandler(h)


def _fuse_stage_options(f):
    opts = [
        click.option("--shards", help="Shards to run, e.g. 0-9,12 (default: all)."),
        click.option("--chunk-size", default=1000, show_default=True,
                     help="Rows per committed chunk: at most this much work is redone after "
                          "a kill."),
        click.option("--tag", help="Name a separate fusion of the same rows (stage fuse@TAG)."),
        click.option("--force", is_flag=True,
                     help="Redo the stage with changed output-shaping settings."),
        click.option("--max-attempts", default=3, show_default=True,
                     help="Attempts on a row that fails alone before it is rejected."),
        click.option("--lease-ttl", default=300.0, show_default=True,
                     help="Seconds without heartbeat after which a shard's lease is taken "
                          "over."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _fuse_job(run_dir, tag, chunk_size, max_attempts, kw):
    """(run, manifest, FuseJob) from the fuse options."""
    from .manifest import Run, stage_name
    from .prompt import PromptTemplate
    from .stages.fuse import FuseJob
    if chunk_size < 1:
        raise UserError("--chunk-size must be at least 1")
    run = Run(Path(run_dir).resolve())  # workers and logs get absolute paths
    manifest = run.manifest()
    template = PromptTemplate.from_file(kw["prompt_file"]) if kw.get("prompt_file") \
        else PromptTemplate()
    job = FuseJob(run_dir=str(run.root), stage=stage_name("fuse", tag), spec=_spec_from(kw),
                  template=template, chunk_size=chunk_size, max_attempts=max_attempts)
    return run, manifest, job


@main.command(context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path())
@preset_option
@_engine_options
@_fuse_stage_options
@click.option("--workers", default=1, show_default=True,
              help="Local worker processes, each loading the model once.")
def fuse(run_dir, shards, chunk_size, workers, tag, force, max_attempts, lease_ttl, **kw):
    """Fuse raw and synthetic captions of RUN_DIR here (local executor).

    Work is committed in chunks; stop it any time (Ctrl-C, kill -9) and run the same command
    again: it continues after the last committed chunk, and every row ends up exactly once in
    RUN_DIR/fuse/out or RUN_DIR/fuse/rejected (with a reason). For SLURM clusters see
    `capsfus submit fuse`.
    """
    from .executors.local import prepare, run_local
    from .manifest import parse_shard_spec
    if workers < 1:
        raise UserError("--workers must be at least 1")
    console = _console()
    _setup_console_logging(console)
    run, manifest, job = _fuse_job(run_dir, tag, chunk_size, max_attempts, kw)
    name = job.stage
    selected = parse_shard_spec(shards, len(manifest["shards"]))
    prep = prepare(job, selected, force=force)
    console.print(f"[bold]{name}[/] of run {manifest['run_id'][:8]}: {len(selected)} shard(s), "
                  f"engine {job.spec.engine}"
                  f"{' ' + job.spec.model if job.spec.model else ''}, "
                  f"{workers} worker(s), chunks of {chunk_size}")
    with _StageProgress(str(run.root), name, console):
        summaries = run_local(prep, workers=workers, lease_ttl=lease_ttl,
                              heartbeat=min(30.0, lease_ttl / 4))
    _print_stage_summary(console, run, name, summaries)


def _print_stage_summary(console, run, name: str, summaries: list[dict]) -> None:
    from .status import stage_status
    s = stage_status(run, name)
    c, r = s["counts"], s["rows"]
    console.print(f"{name}: {c['done']}/{s['shards']} shards done, {r['out']:,} rows out, "
                  f"{r['rejected']:,} rejected"
                  + "".join(f", {k} {v:,}" for k, v in sorted(s["reasons"].items())))
    for w in summaries:
        if w.get("generation_share") is not None:
            console.print(f"  worker {w['worker']}: model load {w['load_s']:.1f}s, then "
                          f"{w['generation_share']:.1%} of {w['busy_wall_s']:.1f}s inside "
                          f"generation")
    if c["failed"]:
        for f in s["failed"][:5]:
            console.print(f"  [red]shard {f['shard']} failed[/]: {f['error']}")
        console.print("Run the same command again to retry the failed shards; "
                      f"`capsfus status {run.root}` shows details.")
        sys.exit(1)
    if c["done"] < s["shards"] and not c["running"]:
        console.print(f"{s['shards'] - c['done']} shard(s) not done (not selected, or held by "
                      f"another worker): run the command again without --shards to finish.")


# ---------------------------------------------------------------------------------------------
def _executor_options(defaults: bool):
    """SLURM executor flags. With ``defaults=False`` (resume) every flag defaults to None,
    meaning "as in the recorded submission"."""
    def d(value):
        return value if defaults else None

    def deco(f):
        opts = [
            click.option("--nodes", type=int, default=d(1), show_default=defaults,
                         help="Nodes to spread workers over."),
            click.option("--gpus-per-node", type=int, default=d(0), show_default=defaults,
                         help="GPUs per node (0: a CPU cluster)."),
            click.option("--gpus-per-task", type=int, default=d(1), show_default=defaults,
                         help="GPUs per worker (vLLM tensor parallelism when > 1)."),
            click.option("--workers-per-node", type=int, default=d(1), show_default=defaults,
                         help="Workers per node on CPU clusters."),
            click.option("--partition", "-p", help="SLURM partition."),
            click.option("--account", "-A", help="SLURM account."),
            click.option("--qos", help="SLURM quality of service."),
            click.option("--time", "time_limit", default=d("24:00:00"), show_default=defaults,
                         help="Time limit per worker job, HH:MM:SS or D-HH:MM:SS; workers "
                              "are requeued at the limit and continue."),
            click.option("--mem", help="Memory per worker, e.g. 64G."),
            click.option("--cpus-per-gpu", type=int, default=d(8), show_default=defaults,
                         help="CPUs per GPU of a worker."),
            click.option("--cpus-per-task", type=int,
                         help="CPUs per worker on CPU clusters (default 1)."),
            click.option("--slurm-arg", "slurm_args", multiple=True, metavar="KEY=VALUE",
                         help="Any other sbatch option, e.g. --slurm-arg constraint=a100."),
            click.option("--dry-run", is_flag=True,
                         help="Print the plan and the sbatch script(s); submit nothing."),
            click.option("--max-array-size", type=int,
                         help="Override the cluster's MaxArraySize (read from `scontrol show "
                              "config`), e.g. for a dry run away from the cluster."),
        ]
        for o in reversed(opts):
            f = o(f)
        return f
    return deco


def _executor_kwargs(kw: dict) -> dict:
    """The executor flags the user gave (None = not given)."""
    out = {}
    for key in ("nodes", "gpus_per_node", "gpus_per_task", "workers_per_node", "partition",
                "account", "qos", "mem", "cpus_per_gpu", "cpus_per_task"):
        if kw.get(key) is not None:
            out[key] = kw[key]
    if kw.get("time_limit") is not None:
        out["time"] = kw["time_limit"]
    if kw.get("slurm_args"):
        args = {}
        for item in kw["slurm_args"]:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise UserError(f"--slurm-arg {item!r}: use KEY=VALUE (e.g. constraint=a100)")
            args[key.lstrip("-")] = value
        out["slurm_args"] = args
    return out


def _print_submission(console, rec: dict, shards_todo: int) -> None:
    arrays = ", ".join(f"{a['size']} (throttle %{a['throttle']})"
                       + (f" job {a['job_id']}" if a.get("job_id") else "")
                       for a in rec["arrays"])
    es = rec["executor"]
    gpus = (f"{es['gpus_per_task']} GPU(s) each" if es["gpus_per_node"] else "CPU only")
    console.print(f"{'plan' if rec['dry_run'] else 'submitted'}: {shards_todo} shard(s) to do, "
                  f"{rec['workers']} worker(s) ({gpus}), {len(rec['arrays'])} array(s): "
                  f"{arrays or 'none'}; MaxArraySize {rec['max_array_size']}")


def _submit_and_report(console, prep, es, manifest, dry_run, max_array_size):
    from .executors.slurm import submit
    rec = submit(prep, es, manifest["run_id"], dry_run=dry_run, max_array_size=max_array_size)
    if dry_run:
        for i, script in enumerate(rec["scripts"]):
            click.echo(f"# ---- sbatch script {i + 1}/{len(rec['scripts'])} ----")
            click.echo(script)
    _print_submission(console, rec, len(prep.shards))
    if not dry_run:
        console.print(f"follow it with `capsfus status {prep.job.run_dir}`; rerun what fails "
                      f"with `capsfus resume {prep.job.run_dir}`")
    return rec


@main.group(context_settings=CONTEXT)
def submit():
    """Submit a stage to SLURM: workers are job-array elements that pull shards.

    `capsfus resume`, `status`, `logs` and `cancel` work the same for every submitted stage
    (pass --stage filter for the filter stage)."""


@submit.command("fuse", context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path())
@preset_option
@_engine_options
@_fuse_stage_options
@_executor_options(defaults=True)
def submit_fuse(run_dir, shards, chunk_size, tag, force, max_attempts, lease_ttl, dry_run,
                max_array_size, **kw):
    """Fuse RUN_DIR on a SLURM cluster.

    `--nodes 16 --gpus-per-node 8` starts at most 128 one-GPU workers (fewer with
    --gpus-per-task, never more than shards to do), as job arrays split to fit the cluster's
    MaxArraySize. Each worker loads the model once and leases shards until none is left.
    The model is resolved (and downloaded, for a Hub id) here, before submission: compute
    nodes can then run offline (HF_HUB_OFFLINE=1).
    """
    from .executors.local import prepare
    from .executors.slurm import ExecutorSettings
    from .manifest import parse_shard_spec
    console = _console()
    run, manifest, job = _fuse_job(run_dir, tag, chunk_size, max_attempts, kw)
    es = ExecutorSettings(**_executor_kwargs(kw), lease_ttl=lease_ttl)
    selected = parse_shard_spec(shards, len(manifest["shards"]))
    if dry_run:
        # no config is written and no model downloaded for a dry run
        from .executors.local import Prepared
        prep = Prepared(job, "dry-run", "input", selected)
    else:
        prep = prepare(job, selected, force=force)
        prep = _only_todo(run, prep)
    _submit_and_report(console, prep, es, manifest, dry_run, max_array_size)


def _only_todo(run, prep, job_alive=None):
    """The shards of ``prep`` not done and not held by a live worker."""
    from dataclasses import replace

    from .lease import LeaseDir
    from .stage import StageDir
    from .status import shard_status
    stage = StageDir(run, prep.job.stage)
    leases = LeaseDir(stage.root / "leases", job_alive=job_alive)
    current = leases.scan()
    now = time.time()
    todo = []
    for i in prep.shards:
        st = stage.read_state(i)
        s = shard_status(st, current.get(i), leases, now)
        if s == "done" and st.get("settings_hash") == prep.settings_hash:
            continue
        if s == "running":
            continue
        todo.append(i)
    return replace(prep, shards=todo)


@main.command(context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path())
@click.option("--stage", "stage_opt", default="fuse", show_default=True,
              help="Stage to resume (fuse, fuse@TAG, …).")
@_executor_options(defaults=False)
def resume(run_dir, stage_opt, dry_run, max_array_size, **kw):
    """Relaunch SLURM workers for what is failed, interrupted, pending or stale in a stage.

    Replays the last submission's settings; executor flags given here override them
    (output-shaping settings cannot change: use `capsfus submit fuse --force` for that).
    Shards held by a live worker are left alone; no more workers than shards to do.
    """
    from dataclasses import replace

    from .executors.local import prepare
    from .executors.slurm import ExecutorSettings, submissions
    from .manifest import Run
    from .slurm import JobLiveness
    from .stages import job_from_dict
    console = _console()
    run = Run(Path(run_dir).resolve())
    manifest = run.manifest()
    stage_root = run.root / stage_opt
    recs = submissions(stage_root)
    if not recs:
        raise UserError(f"no SLURM submission recorded for stage {stage_opt} in {run.root}: "
                        f"start one with `capsfus submit fuse {run_dir} …` (for a local run, "
                        f"just rerun `capsfus fuse {run_dir} …`)")
    last = recs[-1]
    job = replace(job_from_dict(last["job"]), run_dir=str(run.root))
    es = ExecutorSettings.from_dict({**last["executor"], **_executor_kwargs(kw)})
    prep = prepare(job, None)
    prep = _only_todo(run, prep, job_alive=JobLiveness())
    if not prep.shards:
        console.print(f"nothing to resume in {stage_opt}: every shard is done or held by a "
                      f"live worker (`capsfus status {run_dir}`)")
        return
    _submit_and_report(console, prep, es, manifest, dry_run, max_array_size)


@main.command(context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path())
@click.argument("shard", type=int)
@click.option("--stage", "stage_opt", default="fuse", show_default=True)
@click.option("--lines", "-n", default=40, show_default=True, help="Lines from the end.")
def logs(run_dir, shard, stage_opt, lines):
    """Show the end of the logs of the worker(s) that ran SHARD: the capsfus worker log and,
    on SLURM, the job's own output."""
    from .manifest import Run
    from .stage import StageDir
    run = Run(Path(run_dir).resolve())
    n = len(run.manifest()["shards"])
    if not 0 <= shard < n:
        raise UserError(f"shard {shard}: the run has shards 0-{n - 1}")
    st = StageDir(run, stage_opt).read_state(shard)
    if not st:
        raise UserError(f"shard {shard} of {stage_opt} has not been started")
    paths = []
    if st.get("log"):
        paths.append(Path(st["log"]))
    job = (st.get("owner") or {}).get("job_id")
    if job:
        base = job.split("_")[0]
        paths += sorted((run.root / stage_opt / "slurm").glob(f"{base}*/{job}_*log.out"))
        paths += sorted((run.root / stage_opt / "slurm").glob(f"{job}/*log.out"))
    click.echo(f"shard {shard}: {st['status']}, {st.get('rows_done', 0)}/{st.get('rows_total')} "
               f"rows, attempt {st.get('attempts')}, holder {st.get('owner')}")
    if st.get("last_error"):
        click.echo(f"last error: {st['last_error'].get('message')}")
    for p in dict.fromkeys(paths):
        click.echo(f"==> {p} <==")
        try:
            text = p.read_text(errors="replace").splitlines()
        except OSError as e:
            click.echo(f"(unreadable: {e.strerror})")
            continue
        mine = [ln for ln in text if f"shard {shard} " in ln or f"shard {shard}:" in ln]
        click.echo("\n".join(text[-lines:]))
        if mine and mine[-1] not in text[-lines:]:
            click.echo(f"(last line about shard {shard}: {mine[-1]})")


@main.command(context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path())
@click.option("--stage", "stage_opt", default="fuse", show_default=True)
def cancel(run_dir, stage_opt):
    """Cancel every SLURM job of the run's stage that is still queued or running. Committed
    chunks stay; `capsfus resume` continues later."""
    from .executors.slurm import submitted_job_ids
    from .manifest import Run
    from .slurm import scancel, squeue
    run = Run(Path(run_dir).resolve())
    run.manifest()
    ids = submitted_job_ids(run.root / stage_opt)
    live = squeue(ids) if ids else {}
    targets = sorted({j.split("_")[0] for j in live})
    if not targets:
        click.echo(f"no job of {stage_opt} is queued or running")
        return
    scancel(targets)
    click.echo(f"cancelled {len(live)} job(s)/element(s): {', '.join(targets)}")


# ---------------------------------------------------------------------------------------------
@main.command(context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path())
@click.option("--stage", "stage_opt", help="Stage to show (default: every stage of the run).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def status(run_dir, stage_opt, as_json):
    """Show what is done, running, failed and pending in RUN_DIR, with rows, throughput, ETA
    and the last errors."""
    from .manifest import Run
    from .status import format_seconds, stage_status
    run = Run(Path(run_dir))
    m = run.manifest()
    stages = [stage_opt] if stage_opt else [s for s in run.stages() if s != "input"]
    from .slurm import JobLiveness
    alive = JobLiveness() if any((run.root / s / "submissions").exists() for s in stages) \
        else None
    result = {"run_id": m["run_id"], "input": {"shards": len(m["shards"]), **m["counts"]},
              "stages": [stage_status(run, s, job_alive=alive) for s in stages]}
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    from rich.table import Table
    console = _console(stderr=False)
    c = m["counts"]
    console.print(f"[bold]{run.root}[/] run {m['run_id'][:8]}: {c['accepted']:,} rows in "
                  f"{len(m['shards'])} shards, {sum(c['rejected'].values()):,} rejected at ingest")
    if not stages:
        console.print("no stage started yet: run `capsfus fuse` (or `capsfus demo`)")
    for s in result["stages"]:
        if not s.get("exists"):
            console.print(f"{s['stage']}: not started")
            continue
        r, n = s["rows"], s["counts"]
        t = Table(title=f"stage {s['stage']} ({s['shards']} shards)", title_justify="left")
        t.add_column("shards", justify="left")
        t.add_column("rows done", justify="right")
        t.add_column("out / rejected", justify="right")
        t.add_column("rows/s", justify="right")
        t.add_column("ETA", justify="right")
        t.add_column("in gen.", justify="right")
        t.add_row(" ".join(f"{k} {v}" for k, v in n.items() if v) or "-",
                  f"{r['done']:,}/{r['total']:,}", f"{r['out']:,} / {r['rejected']:,}",
                  f"{s['throughput_rows_per_s']:.2f}" if s["throughput_rows_per_s"] else "-",
                  format_seconds(s["eta_s"]),
                  f"{s['generation_share']:.1%}" if s["generation_share"] else "-")
        console.print(t)
        if s.get("throughput_images_per_s"):  # the caption stage: one image per row
            console.print(f"  {s['throughput_images_per_s']:.2f} images/s")
        if s["reasons"]:
            console.print("  rejected: " + ", ".join(f"{k} {v:,}" for k, v in
                                                     sorted(s["reasons"].items())))
        sl = s.get("slurm")
        if sl is not None:
            if "error" in sl:
                console.print(f"  SLURM: {sl['error']}")
            else:
                from collections import Counter
                by_state = Counter(sl["jobs"].values())
                console.print(f"  SLURM: {sl['submitted']} worker job(s) submitted; in squeue: "
                              + (", ".join(f"{k} {v}" for k, v in sorted(by_state.items()))
                                 or "none"))
        for r in s["running"][:20]:
            rate = f", {r['rows_per_s']:.2f} rows/s" if r.get("rows_per_s") else ""
            console.print(f"  shard {r['shard']} running: {r['rows_done']:,}/{r['rows']:,} rows"
                          f"{rate}, worker {r['worker'] or '?'}"
                          + (f" (job {r['job_id']})" if r.get("job_id") else ""))
        for f in s["failed"][:10]:
            console.print(f"  [red]shard {f['shard']} failed[/] (attempt {f['attempts']}): "
                          f"{f['error']}  log: {f['log']}")
            for line in f["log_tail"]:
                console.print(f"      {line}", markup=False, highlight=False)


# ---------------------------------------------------------------------------------------------
@main.command(context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path())
@click.option("--stage", "stage_opt", default="fuse", show_default=True,
              help="Stage to read (input, fuse, fuse@TAG, …).")
@click.option("--rejected", is_flag=True, help="Stream the rows the stage refused instead.")
@click.option("--shards", help="Only these shards, e.g. 0-3.")
def cat(run_dir, stage_opt, rejected, shards):
    """Stream the trusted rows of a stage as JSON lines (pipe into head, jq, …).

    Only checksum-verified files listed in the stage's state are read; shards still running
    contribute the chunks committed so far.
    """
    from .io import dumps, iter_jsonl_zst
    from .manifest import Run, parse_shard_spec
    from .stage import StageDir
    run = Run(Path(run_dir))
    m = run.manifest()
    selected = parse_shard_spec(shards, len(m["shards"]))
    out = sys.stdout

    def rows():
        if stage_opt == "input":
            if rejected:
                for f in m["rejected_files"]:
                    yield from iter_jsonl_zst(run.root / f["file"], expect_sha256=f["sha256"])
                return
            for i in selected:
                e = m["shards"][i]
                yield from iter_jsonl_zst(run.root / e["file"], expect_sha256=e["sha256"])
            return
        st = StageDir(run, stage_opt)
        if not st.root.exists():
            raise UserError(f"stage {stage_opt} does not exist in {run.root} (stages: "
                            f"{', '.join(run.stages()) or 'none'})")
        for i in selected:
            yield from st.iter_rows(i, rejected=rejected)

    try:
        for row in rows():
            out.write(dumps(row) + "\n")
        out.flush()
    except BrokenPipeError:
        import os
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)


# ---------------------------------------------------------------------------------------------
@main.command(context_settings=CONTEXT)
@click.option("--out", "-o", default="demo-run", show_default=True, type=click.Path(),
              help="Run directory for the demo (recreated).")
@click.option("--rows", default=24, show_default=True, help="Sample rows to make and fuse.")
def demo(out, rows):
    """Run the whole local path offline on sample data it makes: shard → fuse with a small real
    model (SmolLM2-135M-Instruct, CPU) → status → fused rows beside their inputs."""
    from .demo import run_demo
    run_demo(out, rows, _console(stderr=False))


@submit.command("filter", context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path())
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="Rules config (default: the built-in rules).")
@click.option("--fused-col", help="Column holding the fused caption.")
@click.option("--from-stage", help="Stage to read (default: fuse).")
@click.option("--tag", help="Name a separate filtering (stage filter@TAG).")
@click.option("--shards", help="Shards to run (default: all whose input is done).")
@click.option("--chunk-size", default=5000, show_default=True)
@click.option("--force", is_flag=True, help="Redo the stage with a changed config.")
@click.option("--lease-ttl", default=300.0, show_default=True)
@_executor_options(defaults=True)
def submit_filter(run_dir, config_file, fused_col, from_stage, tag, shards, chunk_size, force,
                  lease_ttl, dry_run, max_array_size, **kw):
    """Filter RUN_DIR on a SLURM cluster (CPU workers are enough: --gpus-per-node 0).

    Same rules and outputs as `capsfus filter`; when the jobs are done, `capsfus filter
    RUN_DIR` (a no-op for finished shards) prints and writes the report.
    """
    from .cli_quality import _filter_job
    from .executors.local import Prepared, prepare
    from .executors.slurm import ExecutorSettings
    console = _console()
    run, manifest, job, _, selected = _filter_job(
        console, run_dir, (), None, 100_000, None, None, None, None, fused_col, config_file,
        from_stage, tag, shards, chunk_size)
    es = ExecutorSettings(**_executor_kwargs(kw), lease_ttl=lease_ttl)
    if dry_run:
        prep = Prepared(job, "dry-run", job.input_stage(run), selected)
    else:
        prep = _only_todo(run, prepare(job, selected, force=force))
    _submit_and_report(console, prep, es, manifest, dry_run, max_array_size)


from .cli_quality import filter_cmd, stats_cmd  # noqa: E402  (after main, no cycle)

main.add_command(filter_cmd)
main.add_command(stats_cmd)
from .cli_export import export_cmd  # noqa: E402
main.add_command(export_cmd)
from .cli_eval import bench, eval_cmd, plan_cmd  # noqa: E402
main.add_command(eval_cmd); main.add_command(bench); main.add_command(plan_cmd)  # noqa: E702
from .cli_train import add_train_commands  # noqa: E402
add_train_commands(main, submit, _executor_options, _executor_kwargs)
from .cli_caption import caption_cmd, submit_caption_cmd  # noqa: E402
main.add_command(caption_cmd); submit.add_command(submit_caption_cmd(_executor_options))  # noqa: E702
from .cli_hub import push  # noqa: E402
main.add_command(push)
from .cli_teacher import teacher_cmd  # noqa: E402
main.add_command(teacher_cmd)

if __name__ == "__main__":
    main()
