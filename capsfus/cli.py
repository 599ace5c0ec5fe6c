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
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from .ingest import shard as do_shard
    console = _console()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True,
                  disable=not console.is_terminal) as progress:
        task = progress.add_task("reading", total=None)

        def on_progress(s: dict) -> None:
            progress.update(task, description=(
                f"source {s['sources_done']}/{s['sources']} {s['source']}: {s['records']:,} rows "
                f"read, {s['accepted']:,} accepted, {s['rejected']:,} rejected"))

        t0 = time.time()
        m = do_shard(list(inputs), out, rows_per_shard, raw_col, synthetic_col, url_col, id_col,
                     split, progress=on_progress)
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
        click.option("--engine", type=click.Choice(["transformers", "vllm", "echo"]),
                     default="transformers", show_default=True,
                     help="transformers: CPU or GPU, anywhere; vllm: GPU, fastest (untested "
                          "here); echo: deterministic test engine."),
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
                      tensor_parallel_size=kw["tensor_parallel_size"])


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


@main.command(context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path())
@preset_option
@_engine_options
@click.option("--shards", help="Shards to run, e.g. 0-9,12 (default: all).")
@click.option("--chunk-size", default=1000, show_default=True,
              help="Rows per committed chunk: at most this much work is redone after a kill.")
@click.option("--workers", default=1, show_default=True,
              help="Local worker processes, each loading the model once.")
@click.option("--tag", help="Name a separate fusion of the same rows (stage fuse@TAG).")
@click.option("--force", is_flag=True,
              help="Redo the stage with changed output-shaping settings.")
@click.option("--max-attempts", default=3, show_default=True,
              help="Attempts on a row that fails alone before it is rejected.")
@click.option("--lease-ttl", default=300.0, show_default=True,
              help="Seconds without heartbeat after which a shard's lease is taken over.")
def fuse(run_dir, shards, chunk_size, workers, tag, force, max_attempts, lease_ttl, **kw):
    """Fuse raw and synthetic captions of RUN_DIR here (local executor).

    Work is committed in chunks; stop it any time (Ctrl-C, kill -9) and run the same command
    again: it continues after the last committed chunk, and every row ends up exactly once in
    RUN_DIR/fuse/out or RUN_DIR/fuse/rejected (with a reason). For SLURM clusters see
    `capsfus submit fuse`.
    """
    from .executors.local import prepare, run_local
    from .manifest import Run, parse_shard_spec, stage_name
    from .prompt import PromptTemplate
    from .stages.fuse import FuseJob
    if chunk_size < 1 or workers < 1:
        raise UserError("--chunk-size and --workers must be at least 1")
    console = _console()
    _setup_console_logging(console)
    run = Run(Path(run_dir).resolve())  # workers and logs get absolute paths
    manifest = run.manifest()
    name = stage_name("fuse", tag)
    template = PromptTemplate.from_file(kw["prompt_file"]) if kw.get("prompt_file") \
        else PromptTemplate()
    job = FuseJob(run_dir=str(run.root), stage=name, spec=_spec_from(kw), template=template,
                  chunk_size=chunk_size, max_attempts=max_attempts)
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
    result = {"run_id": m["run_id"], "input": {"shards": len(m["shards"]), **m["counts"]},
              "stages": [stage_status(run, s) for s in stages]}
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
        if s["reasons"]:
            console.print("  rejected: " + ", ".join(f"{k} {v:,}" for k, v in
                                                     sorted(s["reasons"].items())))
        for f in s["failed"][:10]:
            console.print(f"  [red]shard {f['shard']} failed[/] (attempt {f['attempts']}): "
                          f"{f['error']}  log: {f['log']}")


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


if __name__ == "__main__":
    main()
