"""What the command modules share: the console, progress, option groups, presets, and how a
prepared job is submitted and reported. Imports nothing else of the CLI."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path

import click

from ..errors import UserError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def make_console(stderr: bool = True):
    from rich.console import Console
    return Console(stderr=stderr)


def ingest_with_progress(console, label: str, inputs: list[str], out, rows_per_shard: int,
                         raw_col, synthetic_col, url_col, id_col, split=None) -> dict:
    """``ingest.shard`` with a live line of rows read / accepted / rejected (terminals only)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from ..ingest.shard import shard as do_shard
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
def engine_options(f):
    opts = [
        click.option("--engine", type=click.Choice(["transformers", "vllm", "vllm-server",
                                                    "sglang-server", "openai", "echo"]),
                     default="transformers", show_default=True,
                     help="transformers: CPU or GPU, anywhere; vllm-server / sglang-server: "
                          "each worker starts its own vLLM / SGLang server on its GPU(s), "
                          "greedy or sampling, fastest on GPUs (untested on a real GPU); "
                          "vllm: vLLM's Python API in-process (untested); openai: any "
                          "OpenAI-compatible --endpoint; echo: deterministic test engine."),
        click.option("--endpoint", help="openai engine: base URL, e.g. http://host:8000/v1."),
        click.option("--api-key-env", default=None,
                     help="openai engine: environment variable holding the API key "
                          "(default OPENAI_API_KEY; the key itself is never recorded)."),
        click.option("--model", "-m", help="Hub id or local folder of a causal LM."),
        click.option("--revision", help="Hub revision (branch, tag or commit); resolved to a "
                                        "commit and recorded."),
        click.option("--gguf-file", help="Load this GGUF file from the model folder."),
        click.option("--adapter", type=click.Path(exists=True, file_okay=False),
                     help="transformers engine: a LoRA adapter folder (`capsfus train --lora`"
                          " export) on top of --model, merged into it; --model ADAPTER_DIR "
                          "alone uses the base the adapter names. Its prompt.txt and chat "
                          "setting are used unless --prompt-file/--chat-template say "
                          "otherwise."),
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
                     help="GPUs per model (vllm; server engines: default every GPU of the "
                          "task, i.e. --gpus-per-task)."),
    ] + SERVER_OPTIONS
    for o in reversed(opts):
        f = o(f)
    return f


SERVER_OPTIONS = [
    click.option("--server-max-seqs", type=int, default=256, show_default=True,
                 help="Server engines: sequences the server batches at once (vLLM "
                      "--max-num-seqs, SGLang --max-running-requests); also the requests "
                      "kept in flight."),
    click.option("--server-mem-fraction", type=float, default=0.90, show_default=True,
                 help="Server engines: GPU memory share (vLLM --gpu-memory-utilization, "
                      "SGLang --mem-fraction-static)."),
    click.option("--server-prefix-caching/--no-server-prefix-caching", default=True,
                 show_default=True,
                 help="Server engines: reuse the shared instruction prefix's KV cache."),
    click.option("--server-max-model-len", type=int,
                 help="Server engines: context the server reserves (default: the model's)."),
    click.option("--server-startup-timeout", type=float, default=1800.0, show_default=True,
                 help="Server engines: seconds to wait for the server to answer."),
    click.option("--server-arg", "server_args", multiple=True, metavar="ARG",
                 help="Server engines: one more argument for the server's command line "
                      "(repeat), e.g. --server-arg=--enforce-eager."),
    click.option("--server-cache-dir",
                 help="Server engines: where each task's compile caches go (default: "
                      "node-local $TMPDIR); one folder per task, removed at exit."),
]


def server_from(kw: dict) -> dict | None:
    """The server engines' options as ``ServerOptions`` fields (None for other engines)."""
    if kw["engine"] not in ("vllm-server", "sglang-server"):
        return None
    if kw.get("server_max_seqs", 256) < 1 or not 0 < kw.get("server_mem_fraction", 0.9) <= 1:
        raise UserError("--server-max-seqs must be at least 1 and --server-mem-fraction in "
                        "(0, 1]")
    return {"max_num_seqs": kw.get("server_max_seqs", 256),
            "mem_fraction": kw.get("server_mem_fraction", 0.9),
            "prefix_caching": kw.get("server_prefix_caching", True),
            "max_model_len": kw.get("server_max_model_len"),
            "startup_timeout": kw.get("server_startup_timeout", 1800.0),
            "extra_args": list(kw.get("server_args") or []),
            "cache_dir": kw.get("server_cache_dir")}


def load_preset(ctx, param, value):
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
    for key in ("prompt_file", "config"):
        # a file named by a preset is found beside the preset (e.g. jobs/prompts/…), whatever
        # the working directory
        v = options.get(key)
        if isinstance(v, str) and not Path(v).is_absolute():
            beside = Path(value).resolve().parent / v
            if beside.exists():
                options[key] = str(beside)
    ctx.default_map = {**(ctx.default_map or {}), **options}
    return value


preset_option = click.option(
    "--preset", type=click.Path(exists=True, dir_okay=False), is_eager=True,
    expose_value=False, callback=load_preset,
    help="YAML file of option defaults, e.g. jobs/fuse-capsfus-llama-13b.yaml.")


def spec_from(kw: dict):
    from ..engines import Decoding, EngineSpec
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
    if kw.get("adapter") and kw["engine"] != "transformers":
        raise UserError("--adapter goes with --engine transformers (merge the adapter into the "
                        "base for other engines)")
    return EngineSpec(engine=kw["engine"], model=kw.get("model"), revision=kw.get("revision"),
                      decoding=dec, batch_size=kw.get("batch_size"),
                      max_prompt_tokens=kw.get("max_prompt_tokens"),
                      chat_template=kw["chat_template"], dtype=kw["dtype"],
                      gguf_file=kw.get("gguf_file"), adapter=kw.get("adapter"),
                      tensor_parallel_size=kw["tensor_parallel_size"],
                      endpoint=record_endpoint(kw.get("endpoint")),
                      api_key_env=kw.get("api_key_env"), server=server_from(kw))


def record_endpoint(url: str | None) -> str | None:
    """The endpoint as jobs, records and pickles hold it: sanitized. When the URL carries
    credentials, the full URL goes to this process's environment (ENDPOINT_ENV), which local
    workers and SLURM jobs (sbatch exports the submitting environment) inherit; a later
    `resume` in a new shell needs it exported again: it is never written anywhere."""
    from ..errors import ENDPOINT_ENV, sanitize_url
    if not url:
        return url
    safe = sanitize_url(url)
    if safe != url.rstrip("#"):
        os.environ[ENDPOINT_ENV] = url
    return safe


class StageProgress:
    """A progress bar fed by polling the stage's state files, so it works the same for
    workers in this process and in child processes."""

    def __init__(self, run_dir: str, stage: str, console):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        self.run_dir, self.stage = run_dir, stage
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("rows"),
                                 TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                                 TimeRemainingColumn(), console=console, transient=False)
        self._stop = threading.Event()

    def _poll(self, task) -> None:
        from ..rundir.manifest import Run
        from ..rundir.status import stage_status
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


def setup_console_logging(console) -> None:
    from rich.logging import RichHandler
    root = logging.getLogger("capsfus")
    if not any(isinstance(h, RichHandler) for h in root.handlers):
        h = RichHandler(console=console, show_path=False, level=logging.WARNING)
        root.addHandler(h)


RETRY_REJECTED_OPTION = click.option(
    "--retry-rejected", is_flag=True,
    help="Give rows rejected earlier for a transient reason (generation_error, caption_error: "
         "e.g. while the engine was failing) another try; each row ends in out/ or "
         "rejected/, never both.")


def fuse_stage_options(f):
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
        RETRY_REJECTED_OPTION,
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def adapter_defaults(kw: dict) -> dict:
    """An adapter exported by `capsfus train --lora` fuses with the prompt and chat setting
    it was trained on, unless --prompt-file/--chat-template are given."""
    from ..engines.adapter import is_adapter, read_adapter
    if kw.get("engine", "transformers") != "transformers":
        return kw
    folder = kw.get("adapter") or (kw.get("model") if is_adapter(kw.get("model")) else None)
    if not folder:
        return kw
    from ..engines.adapter import locate_base
    a = read_adapter(folder)
    kw = dict(kw)
    if not kw.get("adapter"):
        # --model ADAPTER_DIR is --model BASE --adapter ADAPTER_DIR: the same settings
        kw["adapter"], kw["model"] = folder, locate_base(a.base_model)
        kw["gguf_file"] = kw.get("gguf_file") or a.gguf_file
    if not kw.get("prompt_file") and a.prompt_file:
        kw["prompt_file"] = a.prompt_file
    if kw.get("chat_template", "auto") == "auto" and a.chat is not None:
        kw["chat_template"] = "on" if a.chat else "off"
    return kw


def fuse_job(run_dir, tag, chunk_size, max_attempts, kw):
    """(run, manifest, FuseJob) from the fuse options."""
    from ..prompt import PromptTemplate
    from ..rundir.manifest import Run, stage_name
    from ..stages.fuse import FuseJob
    if chunk_size < 1:
        raise UserError("--chunk-size must be at least 1")
    run = Run(Path(run_dir).resolve())  # workers and logs get absolute paths
    manifest = run.manifest()
    kw = adapter_defaults(recorded_model(run, stage_name("fuse", tag), kw))
    template = PromptTemplate.from_file(kw["prompt_file"]) if kw.get("prompt_file") \
        else PromptTemplate()
    job = FuseJob(run_dir=str(run.root), stage=stage_name("fuse", tag), spec=spec_from(kw),
                  template=template, chunk_size=chunk_size, max_attempts=max_attempts)
    return run, manifest, job


def recorded_model(run, stage: str, kw: dict) -> dict:
    """Without --model, a stage that exists keeps its model: the recorded one (and its GGUF
    file and Hub revision unless given), so `submit fuse RUN` / `resume` need no --model."""
    if kw.get("model") or kw.get("engine") == "echo":
        return kw
    from ..rundir.stage import StageDir
    rec = ((StageDir(run, stage).config() or {}).get("settings") or {})
    model = rec.get("model")
    if not model or model == "echo":
        return kw
    kw = {**kw, "model": model}
    if not kw.get("gguf_file") and rec.get("gguf_file"):
        kw["gguf_file"] = rec["gguf_file"]
    rev = rec.get("revision")
    if not kw.get("revision") and rev and not str(rev).startswith("local:") \
            and not Path(model).expanduser().is_dir():
        kw["revision"] = rev    # the same Hub commit, not whatever main is today
    make_console().print(f"model {model} (recorded in {run.root / stage / 'config.json'})")
    return kw


def print_stage_summary(console, run, name: str, summaries: list[dict],
                        shards_given: bool = False) -> None:
    from ..rundir.status import stage_status
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
    stopped = [w["stopped"] for w in summaries if w.get("stopped")]
    for msg in stopped[:5]:
        console.print(f"  [red]a worker stopped taking shards[/] (the engine is failing, not "
                      f"a row): {msg}")
    if c["failed"] or stopped:
        for f in s["failed"][:5]:
            console.print(f"  [red]shard {f['shard']} failed[/]: {f['error']}")
        console.print("Run the same command again to retry the failed shards; "
                      f"`capsfus status {run.root}` shows details.")
        sys.exit(1)
    if s.get("stale_hint"):
        console.print(s["stale_hint"])
    if c["done"] < s["shards"] and not c["running"]:
        for line in not_done_reasons(run, name, shards_given):
            console.print(line)


def not_done_reasons(run, name: str, shards_given: bool) -> list[str]:
    """Why the shards of a stage that are not done are not done, each with what to do: their
    input stage has not finished them, --shards left them out, or another worker holds them."""
    from ..rundir.stage import StageDir
    sd = StageDir(run, name)
    n = len(run.manifest()["shards"])
    states = sd.all_states()
    todo = [i for i in range(n) if (states.get(i) or {}).get("status") != "done"]
    src = (sd.config() or {}).get("input_stage") or "input"
    waiting = []
    if src != "input":
        src_states = StageDir(run, src).all_states()
        waiting = [i for i in todo if (src_states.get(i) or {}).get("status") != "done"]
    rest = [i for i in todo if i not in waiting]
    lines = []
    if waiting:
        base, _, tag = src.partition("@")
        cmd = f"capsfus {base} {run.root}" + (f" --tag {tag}" if tag else "")
        lines.append(f"{len(waiting)} shard(s) not done because stage {src} has not finished "
                     f"them (first: {waiting[0]}): finish it with `{cmd}` (or `capsfus resume "
                     f"{run.root} --stage {src}` on SLURM), then run this command again.")
    if rest:
        why = ("not selected by --shards, or held by another worker: run the command again "
               "without --shards to finish" if shards_given else
               "held by another worker, or interrupted: run the command again to finish them "
               f"(`capsfus status {run.root}` shows which)")
        lines.append(f"{len(rest)} shard(s) not done ({why}).")
    return lines


# ---------------------------------------------------------------------------------------------
def executor_options(defaults: bool):
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


def executor_kwargs(kw: dict) -> dict:
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


def print_submission(console, rec: dict, shards_todo: int) -> None:
    arrays = ", ".join(f"{a['size']} (throttle %{a['throttle']})"
                       + (f" job {a['job_id']}" if a.get("job_id") else "")
                       for a in rec["arrays"])
    es = rec["executor"]
    gpus = (f"{es['gpus_per_task']} GPU(s) each" if es["gpus_per_node"] else "CPU only")
    console.print(f"{'plan' if rec['dry_run'] else 'submitted'}: {shards_todo} shard(s) to do, "
                  f"{rec['workers']} worker(s) ({gpus}), {len(rec['arrays'])} array(s): "
                  f"{arrays or 'none'}; MaxArraySize {rec['max_array_size']}")


def submit_and_report(console, prep, es, manifest, dry_run, max_array_size, selection=None,
                      skipped: dict | None = None):
    from ..executors.slurm import submit
    left = ", ".join(f"{v} {k}" for k, v in (skipped or {}).items() if v)
    if not prep.shards:
        console.print(f"nothing to {'plan' if dry_run else 'submit'} for {prep.job.stage}: "
                      f"every selected shard is done, held by a live worker or covered by a "
                      f"queued job{f' ({left})' if left else ''} (`capsfus status "
                      f"{prep.job.run_dir}`)")
        return None
    rec = submit(prep, es, manifest["run_id"], dry_run=dry_run, max_array_size=max_array_size,
                 selection=selection)
    if dry_run:
        for i, script in enumerate(rec["scripts"]):
            click.echo(f"# ---- sbatch script {i + 1}/{len(rec['scripts'])} ----")
            click.echo(script)
    print_submission(console, rec, len(prep.shards))
    if left:
        console.print(f"  left out: {left}")
    if rec.get("note"):
        console.print(rec["note"])
    if not dry_run:
        console.print(f"follow it with `capsfus status {prep.job.run_dir}`; rerun what fails "
                      f"with `capsfus resume {prep.job.run_dir}`")
    return rec


def plan_and_submit(console, run, manifest, job, selected, es, *, dry_run, max_array_size,
                    force=False, job_alive=None, covered=None, selection=None,
                    retry_rejected=False, retry_id=None):
    """What `submit` and `resume` share, dry or not: the same settings check (a dry run
    refuses exactly as the real command would, and writes nothing), the same shards to do
    (done ones, those held by a live worker and those a queued job will take are left out),
    then submit or print the plan. ``retry_id``: continue that ``--retry-rejected``
    invocation (resume) instead of starting a new one."""
    import contextlib
    from dataclasses import replace

    from ..executors.local import prepare
    from ..models import cache_only
    with cache_only() if dry_run else contextlib.nullcontext():
        prep = prepare(job, selected, force=force, dry_run=dry_run, retry_rejected=retry_rejected)
    if retry_id and prep.retry_reasons:
        prep = replace(prep, retry_id=retry_id)
    skipped: dict = {}
    prep = only_todo(run, prep, job_alive=job_alive, covered=covered, skipped=skipped)
    return submit_and_report(console, prep, es, manifest, dry_run, max_array_size,
                             selection=selected if selection is None else selection,
                             skipped=skipped)


def only_todo(run, prep, job_alive=None, covered=None, skipped: dict | None = None):
    """The shards of ``prep`` not done, not held by a live worker and not ``covered`` (by
    workers still queued that will take them). ``skipped`` gets the counts left out."""
    from dataclasses import replace

    from ..rundir.fresh import stale_map
    from ..rundir.lease import LeaseDir
    from ..rundir.runner import wants_retry
    from ..rundir.stage import StageDir
    from ..rundir.status import shard_status
    stage = StageDir(run, prep.job.stage)
    stale = stale_map(run, prep.job.stage)
    leases = LeaseDir(stage.root / "leases", job_alive=job_alive)
    current = leases.scan()
    now = time.time()
    covered = set(covered or ())
    todo = []
    counts = {"done": 0, "held by a live worker": 0, "covered by queued jobs": 0}
    for i in prep.shards:
        st = stage.read_state(i)
        s = shard_status(st, current.get(i), leases, now, stale=i in stale)
        if s == "done" and st.get("settings_hash") == prep.settings_hash and not wants_retry(
                st, prep.retry_reasons, prep.retry_id):
            counts["done"] += 1
            continue
        if s == "running":
            counts["held by a live worker"] += 1
            continue
        if i in covered:
            counts["covered by queued jobs"] += 1
            continue
        todo.append(i)
    if skipped is not None:
        skipped.update(counts)
    return replace(prep, shards=todo)


def nothing_to_do(run, stage: str, n_selected: int, force_hint: bool = True) -> str:
    """The line a local stage command prints when every selected shard is already done with
    the same settings: said before any model is loaded."""
    tagged = f" --from-stage {stage}" if "@" in stage else ""
    nxt = f"`capsfus filter {run.root}{tagged}`" if stage.startswith("fuse") else \
        f"`capsfus fuse {run.root}`"
    redo = f"; to redo them with new settings add --force (or --tag NAME for a second " \
           f"{stage.split('@')[0]})" if force_hint else ""
    return (f"{stage}: nothing to do: all {n_selected} selected shard(s) are already done with "
            f"these settings (no model loaded). Next: {nxt}{redo}.")
