"""``capsfus filter`` and ``capsfus stats``: on a run, or on any outside file or folder of rows
with raw, synthetic and fused captions (``--input PATH --out DIR``: an implicit ``capsfus
shard`` of PATH into the run DIR, with the same formats and column flags, then the command).
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from ..errors import UserError
from ..rundir.rows import KNOWN_FUSED_COLUMNS

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

# Columns that hold a fused caption in known releases, tried in this order when the rows come
# straight from ``input`` and no --fused-col is given.


def _source_options(f):
    opts = [
        click.option("--input", "-i", "inputs", multiple=True,
                     help="Outside rows to work on instead of a RUN (parquet, JSON lines, JSON "
                          "list, folder, glob, Hub id; repeatable): sharded into --out first."),
        click.option("--out", "-o", type=click.Path(file_okay=False),
                     help="Run directory to create from --input (reused if it already holds "
                          "exactly these inputs)."),
        click.option("--raw-col", help="Column of the raw alt-text (default: from the layout)."),
        click.option("--synthetic-col", help="Column of the synthetic caption."),
        click.option("--fused-col",
                     help="Column of the fused caption when the rows come from the input "
                          "stage (default: the first of " + ", ".join(KNOWN_FUSED_COLUMNS)
                          + " present; `fused` for a fuse stage)."),
        click.option("--url-col", help="Column of the image URL."),
        click.option("--id-col", help="Column of a row id (default: <file name>:<row number>)."),
        click.option("--rows-per-shard", default=100_000, show_default=True,
                     help="Rows per shard for --input."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def implicit_shard(console, inputs, out, rows_per_shard, raw_col, synthetic_col, url_col,
                    id_col):
    """``capsfus shard INPUTS --out OUT`` (a no-op when OUT already holds these inputs)."""
    from .common import ingest_with_progress
    m = ingest_with_progress(console, "sharding", list(inputs), out, rows_per_shard, raw_col,
                             synthetic_col, url_col, id_col)
    c = m["counts"]
    rejected = sum(c["rejected"].values())
    console.print(f"[bold]{out}[/]: run {m['run_id'][:8]}, {c['accepted']:,} rows in "
                  f"{len(m['shards'])} shard(s) (raw={m['mapping']['raw']}, "
                  f"synthetic={m['mapping']['synthetic']})"
                  + (f", {rejected:,} rejected at ingest" if rejected else ""))
    return m


def _resolve_run(console, run_dir, inputs, out, rows_per_shard, raw_col, synthetic_col,
                 url_col, id_col):
    from ..rundir.manifest import Run
    if inputs and run_dir:
        raise UserError("give either RUN or --input PATH --out DIR, not both")
    if inputs:
        if not out:
            raise UserError("--input needs --out DIR (the run directory to shard it into)")
        implicit_shard(console, inputs, out, rows_per_shard, raw_col, synthetic_col,
                        url_col, id_col)
        run_dir = out
    elif not run_dir:
        raise UserError("give a RUN directory, or --input PATH --out DIR for outside rows")
    elif out or raw_col or synthetic_col or url_col or id_col:
        raise UserError("--out and --raw-col/--synthetic-col/--url-col/--id-col go with "
                        "--input (a RUN already has its column mapping)")
    run = Run(Path(run_dir).resolve())
    run.manifest()
    return run


def _first_row(run, stage: str) -> dict | None:
    from ..rundir.stage import StageDir, input_rows
    m = run.manifest()
    if not m["shards"]:
        return None
    if stage == "input":
        return next(iter(input_rows(run, m, "input", 0)), None)
    sd = StageDir(run, stage)
    for i in range(len(m["shards"])):
        for row in sd.iter_rows(i):
            return row
    return None


def fused_col_for(run, stage: str, given: str | None, required: bool) -> str | None:
    """The key holding fused captions in the rows of ``stage``."""
    from ..rundir.stage import StageDir
    base = stage.split("@")[0]
    if given:
        if base == "input":
            row = _first_row(run, stage) or {}
            if row and given not in row:
                raise UserError(f"--fused-col {given!r} is not a column of the rows "
                                f"(columns: {', '.join(sorted(row))})")
        return given
    if base == "fuse":
        return "fused"
    if base == "filter":
        cfg = StageDir(run, stage).config() or {}
        return (cfg.get("settings") or {}).get("fused_col", "fused")
    row = _first_row(run, stage) or {}
    for c in KNOWN_FUSED_COLUMNS:
        if c in row:
            return c
    if required:
        tagged = [s for s in run.stages() if s.startswith("fuse@")]
        hint = f"--from-stage {tagged[0]}" if tagged else "run `capsfus fuse` first"
        raise UserError(f"the rows of stage {stage} have no fused caption column (columns: "
                        f"{', '.join(sorted(row)) or 'none'}); pass --fused-col NAME, or "
                        f"{hint}")
    return None


# ---------------------------------------------------------------------------------- filter
def _print_rules(console) -> None:
    from rich.table import Table

    from ..quality.filters import describe_rules
    t = Table(title="filter rules (strip rules repair and keep; drop rules reject)",
              title_justify="left")
    for col in ("rule", "code", "action", "what it does", "parameters (defaults)"):
        t.add_column(col)
    for r in describe_rules():
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items() if k != "enabled")
        t.add_row(r["name"], r["code"], r["action"], r["doc"], params or "-")
    console.print(t)


def _print_report(console, report: dict, path: Path) -> None:
    from rich.table import Table
    rows = report["rows"]
    console.print(f"[bold]{report['stage']}[/]: kept {report['kept']:,} of {rows:,} rows "
                  f"({report['share_kept']:.2%}), dropped {report['dropped']:,} "
                  f"({report['share_dropped']:.2%}), {report['stripped_rows']:,} stripped; "
                  f"{report['rows_failing_several_rules']:,} dropped rows fail several rules")
    t = Table(title_justify="left")
    t.add_column("rule", no_wrap=True)
    t.add_column("action", no_wrap=True)
    t.add_column("rows", justify="right", no_wrap=True)
    t.add_column("share", justify="right", no_wrap=True)
    t.add_column("first", justify="right", no_wrap=True)
    t.add_column("example", no_wrap=True)
    room = max(20, console.width - 62)
    for r in report["rules"]:
        ex = r["examples"][0] if r["examples"] else None
        text = ""
        if ex:
            text = ex.get("detail") or ""
            if r["action"] == "strip" and ex.get("fused_raw") is not None:
                text = f"{ex['fused_raw'][:40]!r} -> {str(ex.get('fused'))[:25]!r}"
        if len(text) > room:
            text = text[:room - 1] + "…"
        t.add_row(r["code"], r["action"], f"{r['rows']:,}", f"{r['share']:.2%}",
                  f"{r['first_reason_rows']:,}" if r["action"] == "drop" else "-", text,
                  )
    console.print(t)
    console.print(f"report: {path}")


def filter_job(console, run_dir, inputs, out, rows_per_shard, raw_col, synthetic_col, url_col,
                id_col, fused_col, config_file, from_stage, tag, shards, chunk_size):
    """(run, manifest, FilterJob, source stage, shards whose input is done)."""
    from ..quality.filters import load_config
    from ..rundir.manifest import parse_shard_spec, stage_name
    from ..rundir.stage import StageDir
    from ..stages.filter import FilterJob
    cfg = load_config(config_file)            # config errors before any ingest
    run = _resolve_run(console, run_dir, inputs, out, rows_per_shard, raw_col,
                       synthetic_col, url_col, id_col)
    manifest = run.manifest()
    job = FilterJob(run_dir=str(run.root), stage=stage_name("filter", tag), config=cfg,
                    from_stage=from_stage, chunk_size=chunk_size)
    source = job.input_stage(run)
    job.fused_col = fused_col_for(run, source, fused_col, required=True)
    selected = parse_shard_spec(shards, len(manifest["shards"]))
    if source != "input":
        sd = StageDir(run, source)
        ready = [i for i in selected if (sd.read_state(i) or {}).get("status") == "done"]
        if not ready:
            raise UserError(f"no shard of stage {source} is done yet: run it first "
                            f"(`capsfus status {run.root}`)")
        if len(ready) < len(selected):
            console.print(f"[yellow]{len(selected) - len(ready)} shard(s) of {source} are not "
                          f"done yet: filtering the {len(ready)} done; run filter again "
                          f"later for the rest[/]")
        selected = ready
    return run, manifest, job, source, selected


@click.command("filter", context_settings=CONTEXT)
@click.argument("run_dir", required=False, type=click.Path())
@_source_options
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="YAML or JSON rules file (see jobs/filter-default.yaml); unknown rules or "
                   "parameters are errors.")
@click.option("--from-stage", help="Stage to read (default: fuse when the run has one, else "
                                   "input), e.g. fuse@zeroshot.")
@click.option("--tag", help="Name a separate filtering (stage filter@TAG).")
@click.option("--shards", help="Shards to run, e.g. 0-9,12 (default: all whose input is done).")
@click.option("--chunk-size", default=5000, show_default=True,
              help="Rows per committed chunk.")
@click.option("--workers", default=1, show_default=True, help="Local worker processes.")
@click.option("--force", is_flag=True, help="Redo the stage with a changed rules config.")
@click.option("--list-rules", is_flag=True, help="Print the rules with their defaults and exit.")
def filter_cmd(run_dir, inputs, out, raw_col, synthetic_col, fused_col, url_col, id_col,
               rows_per_shard, config_file, from_stage, tag, shards, chunk_size, workers,
               force, list_rules):
    """Keep or drop every fused caption of RUN_DIR by heuristic rules, with the reasons.

    \b
    Rules (`--list-rules` shows their parameters):
      strip: preamble ("Here is the merged sentence:", "New Sentence:", "Sure!")
      drop:  empty, refusal, prompt_leak, multiline, garbage (URL/HTML/code), repetition,
             concatenation, truncated, length, length_relative

    Kept rows go to RUN_DIR/filter/out with `filter_reasons: []` (a stripped caption keeps
    its original in `fused_raw`); dropped rows go to RUN_DIR/filter/rejected with `reason`,
    `reasons` (every failing rule) and `detail`: nothing is lost. Per-rule counts, the share
    dropped and examples: RUN_DIR/filter/report.json and on screen. Stop it any time and
    run it again: it continues after the last committed chunk.

    On outside rows (e.g. CapsFusion-120M parquet files): --input PATH --out DIR.
    """
    from ..executors.local import prepare, run_local
    from ..stages.filter import write_report
    from .common import StageProgress, make_console, print_stage_summary, setup_console_logging
    console = make_console()
    if list_rules:
        _print_rules(console)
        return
    if chunk_size < 1:
        raise UserError("--chunk-size must be at least 1")
    if workers < 1:
        raise UserError("--workers must be at least 1")
    setup_console_logging(console)
    run, manifest, job, source, selected = filter_job(
        console, run_dir, inputs, out, rows_per_shard, raw_col, synthetic_col, url_col, id_col,
        fused_col, config_file, from_stage, tag, shards, chunk_size)
    prep = prepare(job, selected, force=force)
    console.print(f"[bold]{job.stage}[/] of run {manifest['run_id'][:8]}: {len(selected)} "
                  f"shard(s) from stage {source}, fused captions in `{job.fused_col}`, "
                  f"rules {prep.settings_hash}, {workers} worker(s)")
    with StageProgress(str(run.root), job.stage, console):
        run_local(prep, workers=workers)
    report = write_report(run, job.stage)
    _print_report(console, report, run.root / job.stage / "report.json")
    print_stage_summary(console, run, job.stage, [], shards_given=shards is not None)


# ----------------------------------------------------------------------------------- stats
def _default_stage(run) -> str:
    stages = run.stages()
    for base in ("filter", "fuse"):
        if base in stages and (run.root / base / "config.json").exists():
            return base
    return "input"


@click.command("stats", context_settings=CONTEXT)
@click.argument("run_dir", required=False, type=click.Path())
@_source_options
@click.option("--stage", "stage_opt",
              help="Stage whose rows to measure (default: filter if the run has one, else "
                   "fuse, else input). Only finished shards are measured.")
@click.option("--approx", is_flag=True,
              help="Unique trigrams by HyperLogLog only (for 100M+ rows: no per-shard hash "
                   "files); relative std error 1.04/sqrt(2^precision).")
@click.option("--hll-precision", default=14, show_default=True,
              help="HyperLogLog registers = 2^precision (14: 0.81% std error).")
@click.option("--workers", default=1, show_default=True, help="Processes measuring shards.")
@click.option("--json", "as_json", is_flag=True, help="Also print stats.json to stdout.")
def stats_cmd(run_dir, inputs, out, raw_col, synthetic_col, fused_col, url_col, id_col,
              rows_per_shard, stage_opt, approx, hll_precision, workers, as_json):
    """Measure the raw, synthetic and fused captions of RUN_DIR, as in Table 3 of the paper.

    Rows, mean words per caption, unique word trigrams (exact, merged shard by shard with
    bounded memory, or --approx), length histograms. Words are whitespace-separated tokens
    (`str.split()`, case and punctuation kept); a trigram is 3 consecutive words of one
    caption. Writes RUN_DIR/stats/stats.json, table3.md, lengths.png and, after `capsfus
    filter`, filter_reasons.png.

    On outside rows (e.g. the CapsFusion 10k sample): --input PATH --out DIR [--fused-col C].
    On a `capsfus export` folder: the same figures per caption source and for the exported
    `caption` column, and the realised caption mix.
    """
    import json

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from rich.table import Table

    from ..quality.stats import LABELS, compute_stats, write_outputs
    from ..rundir.manifest import stage_name
    from .common import make_console
    console = make_console()
    if workers < 1:
        raise UserError("--workers must be at least 1")
    from ..hub.export import is_export_folder
    if run_dir and not inputs and is_export_folder(run_dir):
        _export_folder_stats(console, Path(run_dir), approx, hll_precision, as_json)
        return
    run = _resolve_run(console, run_dir, inputs, out, rows_per_shard, raw_col,
                       synthetic_col, url_col, id_col)
    manifest = run.manifest()
    stage = stage_opt or _default_stage(run)
    base, _, tag = stage.partition("@")
    stage_name(base, tag or None)
    if stage != "input" and not (run.root / stage / "config.json").exists():
        raise UserError(f"stage {stage} does not exist in {run.root} (stages: "
                        f"{', '.join(run.stages()) or 'none'})")
    fcol = fused_col_for(run, stage, fused_col, required=False)
    mapping = manifest.get("mapping") or {}
    columns = {"raw": "raw", "synthetic": "synthetic", "fused": fcol}
    display = {"raw": mapping.get("raw"), "synthetic": mapping.get("synthetic"),
               "fused": fcol}
    console.print(f"[bold]stats[/] of run {manifest['run_id'][:8]}, stage {stage}"
                  + (f", fused captions in `{fcol}`" if fcol else ", no fused column")
                  + (" (approximate)" if approx else ""))
    t0 = time.time()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  console=console, transient=True,
                  disable=not console.is_terminal) as progress:
        task = progress.add_task("shards", total=len(manifest["shards"]))
        stats = compute_stats(run, stage, columns, workers=workers, approx=approx,
                              p=hll_precision, display=display,
                              progress=lambda d, n: progress.update(task, completed=d))
    filter_stage = stage if base == "filter" else None
    paths = write_outputs(run, stats, filter_stage)
    t = Table(title=f"{stats['rows']:,} rows, stage {stage} ({stats['shards_measured']}/"
                    f"{stats['shards_total']} shards, {time.time() - t0:.1f}s)",
              title_justify="left")
    for col, just in (("captions", "left"), ("column", "left"), ("rows", "right"),
                      ("mean words", "right"), ("unique trigrams", "right"),
                      ("median / p99 words", "right")):
        t.add_column(col, justify=just)
    for f, e in stats["fields"].items():
        uniq = f"{e['unique_trigrams']:,}" + ("" if e["unique_trigrams_exact"] is not None
                                              else " (≈)")
        t.add_row(LABELS[f], str(e["column"]), f"{e['rows']:,}",
                  f"{e['mean_words']:.2f}" if e["mean_words"] is not None else "-", uniq,
                  f"{e['median_words']} / {e['p99_words']}")
    console.print(t)
    for name, p in paths.items():
        console.print(f"  {name}: {p}")
    if as_json:
        click.echo(json.dumps(stats, indent=1))


def _export_folder_stats(console, folder: Path, approx: bool, p: int, as_json: bool) -> None:
    """``capsfus stats EXPORT_DIR``: per-source figures and the realised caption mix."""
    import json

    from rich.table import Table

    from ..hub.export import SCHEMAS, SUMMARY_FILE
    from ..quality.stats import LABELS, compute_folder_stats
    from ..rundir.io import atomic_write_json, read_json
    summary = read_json(folder / SUMMARY_FILE)
    names = SCHEMAS.get(summary.get("schema", "capsfus"), {})
    cols = {f: names.get(f, f) for f in ("raw", "synthetic", "fused")}
    cols["caption"] = "caption"
    stats = compute_folder_stats(folder, cols, folder / "stats", approx=approx, p=p)
    from collections import Counter

    import pyarrow.parquet as pq
    used: Counter = Counter()
    for path in sorted((folder / "data").glob("*.parquet")):
        if "caption_source" in pq.ParquetFile(path).schema_arrow.names:
            col = pq.read_table(path, columns=["caption_source"]).column(0).to_pylist()
            used.update(col)
    n = sum(used.values())
    stats["caption_mix"] = {"requested": summary["caption"]["mix"],
                            "realised": {k: v / n for k, v in sorted(used.items())} if n else {},
                            "fallbacks": summary["caption"].get("fallbacks", {})}
    atomic_write_json(folder / "stats" / "stats.json", stats)
    t = Table(title=f"{stats['rows']:,} rows in {stats['files']} parquet file(s) of {folder}",
              title_justify="left")
    for col, just in (("captions", "left"), ("column", "left"), ("rows", "right"),
                      ("mean words", "right"), ("unique trigrams", "right")):
        t.add_column(col, justify=just)
    for f, e in stats["fields"].items():
        t.add_row(LABELS.get(f, f), str(e["column"]), f"{e['rows']:,}",
                  f"{e['mean_words']:.2f}" if e["mean_words"] is not None else "-",
                  f"{e['unique_trigrams']:,}")
    console.print(t)
    mix = stats["caption_mix"]
    console.print("caption mix: requested " + ", ".join(
        f"{k} {v:.0%}" for k, v in mix["requested"].items()) + "; realised " + ", ".join(
        f"{k} {v:.2%}" for k, v in mix["realised"].items()))
    console.print(f"  stats: {folder / 'stats' / 'stats.json'}")
    if as_json:
        click.echo(json.dumps(stats, indent=1))
