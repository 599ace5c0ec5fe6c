"""The run commands: shard, fuse, status, cat, logs, cancel, submit (fuse, filter), resume."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from ..errors import UserError
from .common import (
    CONTEXT,
    StageProgress,
    engine_options,
    executor_kwargs,
    executor_options,
    fuse_job,
    fuse_stage_options,
    ingest_with_progress,
    make_console,
    plan_and_submit,
    preset_option,
    print_stage_summary,
    setup_console_logging,
)


# ---------------------------------------------------------------------------------------------
@click.command(context_settings=CONTEXT)
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
    console = make_console()
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


@click.command(context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path())
@preset_option
@engine_options
@fuse_stage_options
@click.option("--workers", default=1, show_default=True,
              help="Local worker processes, each loading the model once.")
def fuse(run_dir, shards, chunk_size, workers, tag, force, max_attempts, lease_ttl,
         retry_rejected, **kw):
    """Fuse raw and synthetic captions of RUN_DIR here (local executor).

    Work is committed in chunks; stop it any time (Ctrl-C, kill -9) and run the same command
    again: it continues after the last committed chunk, and every row ends up exactly once in
    RUN_DIR/fuse/out or RUN_DIR/fuse/rejected (with a reason). For SLURM clusters see
    `capsfus submit fuse`.
    """
    from ..executors.local import prepare, run_local, shards_with_work
    from ..rundir.manifest import parse_shard_spec
    from .common import nothing_to_do
    if workers < 1:
        raise UserError("--workers must be at least 1")
    console = make_console()
    setup_console_logging(console)
    run, manifest, job = fuse_job(run_dir, tag, chunk_size, max_attempts, kw)
    name = job.stage
    selected = parse_shard_spec(shards, len(manifest["shards"]))
    prep = prepare(job, selected, force=force, retry_rejected=retry_rejected)
    if not shards_with_work(prep):
        # before any worker starts: loading a model (minutes for 13B) to do nothing helps no one
        console.print(nothing_to_do(run, name, len(selected), force_hint=True))
        return
    console.print(f"[bold]{name}[/] of run {manifest['run_id'][:8]}: {len(selected)} shard(s), "
                  f"engine {job.spec.engine}"
                  f"{' ' + job.spec.model if job.spec.model else ''}, "
                  f"{workers} worker(s), chunks of {chunk_size}")
    with StageProgress(str(run.root), name, console):
        summaries = run_local(prep, workers=workers, lease_ttl=lease_ttl,
                              heartbeat=min(30.0, lease_ttl / 4))
    print_stage_summary(console, run, name, summaries, shards_given=shards is not None)


@click.group(context_settings=CONTEXT)
def submit():
    """Submit a stage to SLURM: workers are job-array elements that pull shards.

    `capsfus resume`, `status`, `logs` and `cancel` work the same for every submitted stage
    (pass --stage filter for the filter stage)."""


@submit.command("fuse", context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path())
@preset_option
@engine_options
@fuse_stage_options
@executor_options(defaults=True)
def submit_fuse(run_dir, shards, chunk_size, tag, force, max_attempts, lease_ttl, dry_run,
                max_array_size, retry_rejected, **kw):
    """Fuse RUN_DIR on a SLURM cluster.

    `--nodes 16 --gpus-per-node 8` starts at most 128 one-GPU workers (fewer with
    --gpus-per-task, never more than shards to do), as job arrays split to fit the cluster's
    MaxArraySize. Each worker loads the model once and leases shards until none is left.
    The model is resolved (and downloaded, for a Hub id) here, before submission: compute
    nodes can then run offline (HF_HUB_OFFLINE=1).
    """
    from ..executors.slurm import ExecutorSettings
    from ..rundir.manifest import parse_shard_spec
    console = make_console()
    run, manifest, job = fuse_job(run_dir, tag, chunk_size, max_attempts, kw)
    es = ExecutorSettings(**executor_kwargs(kw), lease_ttl=lease_ttl)
    selected = parse_shard_spec(shards, len(manifest["shards"]))
    # a dry run takes the same path: same settings check and refusal, same shards to do;
    # it writes nothing and downloads no model
    plan_and_submit(console, run, manifest, job, selected, es, dry_run=dry_run,
                    max_array_size=max_array_size, force=force, retry_rejected=retry_rejected)


@click.command(context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path())
@click.option("--stage", "stage_opt", default="fuse", show_default=True,
              help="Stage to resume (fuse, fuse@TAG, …).")
@executor_options(defaults=False)
def resume(run_dir, stage_opt, dry_run, max_array_size, **kw):
    """Relaunch SLURM workers for what is failed, interrupted, pending or stale in a stage.

    Replays the last submission's settings, --retry-rejected included; executor flags given
    here override them (output-shaping settings cannot change: use `capsfus submit fuse
    --force` for that). Shards held by a live worker are left alone; no more workers than
    shards to do.
    """
    from dataclasses import replace

    from ..executors.slurm import (
        ExecutorSettings,
        queued_coverage,
        recorded_selection,
        submissions,
    )
    from ..executors.slurm_queue import JobLiveness
    from ..rundir.manifest import Run
    from ..stages import job_from_dict
    console = make_console()
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
    spec = getattr(job, "spec", None)
    if spec is not None and spec.endpoint:
        # credentials of the endpoint URL were never recorded: they must be in this
        # environment again (checked here, before any worker starts)
        from ..engines.openai_client import runtime_endpoint
        runtime_endpoint(spec.endpoint)
    es = ExecutorSettings.from_dict({**last["executor"], **executor_kwargs(kw)})
    # only what was asked (the recorded selections), less what queued jobs will still take
    selection = recorded_selection(recs, len(manifest["shards"]))
    covered = queued_coverage(recs, quiet=dry_run)
    # an interrupted `submit … --retry-rejected` is continued as the same invocation: rows
    # it has not retried yet get their try, those it already retried do not get a second
    retry = last.get("retry_rejected") or {}
    if retry:
        console.print(f"resuming the --retry-rejected submission of {last.get('time', '?')}: "
                      f"rows rejected for {', '.join(retry.get('reasons') or [])} that it has "
                      f"not retried yet get another try")
    rec = plan_and_submit(console, run, manifest, job, selection, es, dry_run=dry_run,
                          max_array_size=max_array_size, job_alive=JobLiveness(),
                          covered=covered, retry_rejected=bool(retry),
                          retry_id=retry.get("retry_id"))
    if rec is None:
        console.print(f"nothing to resume in {stage_opt} (`capsfus status {run_dir}`)")


@click.command(context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path())
@click.argument("shard", type=int)
@click.option("--stage", "stage_opt", default="fuse", show_default=True)
@click.option("--lines", "-n", default=40, show_default=True, help="Lines from the end.")
def logs(run_dir, shard, stage_opt, lines):
    """Show the end of the logs of the worker(s) that ran SHARD: the capsfus worker log and,
    on SLURM, the job's own output."""
    from ..rundir.manifest import Run
    from ..rundir.stage import StageDir
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


@click.command(context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path())
@click.option("--stage", "stage_opt", default="fuse", show_default=True)
def cancel(run_dir, stage_opt):
    """Cancel every SLURM job of the run's stage that is still queued or running. Committed
    chunks stay; `capsfus resume` continues later."""
    from ..executors.slurm import submitted_job_ids
    from ..executors.slurm_queue import scancel, squeue
    from ..rundir.manifest import Run
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
@click.command(context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path())
@click.option("--stage", "stage_opt", help="Stage to show (default: every stage of the run).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def status(run_dir, stage_opt, as_json):
    """Show what is done, running, failed and pending in RUN_DIR, with rows, throughput, ETA
    and the last errors."""
    from ..executors.slurm import slurm_jobs
    from ..rundir.manifest import Run
    from ..rundir.status import format_seconds, stage_status
    run = Run(Path(run_dir))
    m = run.manifest()
    stages = [stage_opt] if stage_opt else [s for s in run.stages() if s != "input"]
    from ..executors.slurm_queue import JobLiveness
    alive = JobLiveness() if any((run.root / s / "submissions").exists() for s in stages) \
        else None
    result = {"run_id": m["run_id"], "input": {"shards": len(m["shards"]), **m["counts"]},
              "stages": [stage_status(run, s, job_alive=alive, queue=slurm_jobs)
                         for s in stages]}
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    from rich.table import Table
    console = make_console(stderr=False)
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
        if s.get("stale_hint"):
            console.print(f"  [yellow]{s['stale_hint']}[/]", highlight=False)
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
                for pr in sl.get("partly_refused", []):
                    console.print(f"  SLURM: submission of {pr['time']}: {pr['arrays']} of "
                                  f"{pr['planned']} array(s) accepted, then sbatch refused: "
                                  f"{pr['refused']}", markup=False, highlight=False)
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
@click.command(context_settings=CONTEXT)
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
    from ..rundir.io import dumps, iter_jsonl_zst
    from ..rundir.manifest import Run, parse_shard_spec
    from ..rundir.stage import StageDir
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
@executor_options(defaults=True)
def submit_filter(run_dir, config_file, fused_col, from_stage, tag, shards, chunk_size, force,
                  lease_ttl, dry_run, max_array_size, **kw):
    """Filter RUN_DIR on a SLURM cluster (CPU workers are enough: --gpus-per-node 0).

    Same rules and outputs as `capsfus filter`; when the jobs are done, `capsfus filter
    RUN_DIR` (a no-op for finished shards) prints and writes the report.
    """
    from ..executors.slurm import ExecutorSettings
    from .quality import filter_job
    console = make_console()
    run, manifest, job, _, selected = filter_job(
        console, run_dir, (), None, 100_000, None, None, None, None, fused_col, config_file,
        from_stage, tag, shards, chunk_size)
    es = ExecutorSettings(**executor_kwargs(kw), lease_ttl=lease_ttl)
    plan_and_submit(console, run, manifest, job, selected, es, dry_run=dry_run,
                    max_array_size=max_array_size, force=force)
