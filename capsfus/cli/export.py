"""``capsfus export``: a run as a Hugging Face dataset folder (parquet + dataset card).

Registered in ``capsfus.cli`` with ``main.add_command(export_cmd)``.
"""

from __future__ import annotations

import click

from ..errors import UserError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _mix_presets_help() -> str:
    from ..hub.mix import MIX_PRESETS
    return "; ".join(f"{name}: " + ",".join(f"{k}={v:g}" for k, v in mix.items())
                     for name, (mix, _why) in MIX_PRESETS.items())


@click.command("export", context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path())
@click.option("--out", required=True, type=click.Path(),
              help="Folder to write: README.md, data/train-XXXXX-of-YYYYY.parquet, "
                   "capsfus-export.json, stats/.")
@click.option("--schema", type=click.Choice(["capsfus", "capsfusion120m"]), default="capsfus",
              show_default=True,
              help="Column names: capsfus (id, url, raw, synthetic, fused) or the published "
                   "CapsFusion-120M ones (image_url, laion_2b, laion_coco, capsfusion).")
@click.option("--stage", "stage_opt",
              help="Stage to export (default: filter if the run has one, else fuse).")
@click.option("--caption", "caption_src", default=None,
              help="Source of the `caption` column: fused (default), raw, synthetic or a "
                   "column name; rows without it are not exported.")
@click.option("--mix", "mix_text", default=None,
              help="Draw each row's `caption` from several sources, e.g. fused=0.6,raw=0.4, "
                   f"or a preset ({_mix_presets_help()}). Rows missing the drawn source fall "
                   "back to the next one.")
@click.option("--fallback", default=None,
              help="Fallback order for --mix, e.g. fused,synthetic,raw (default: the mix's "
                   "sources by weight, then the others).")
@click.option("--seed", default=0, show_default=True, help="Seed of the mix draw.")
@click.option("--max-punsafe", type=float, default=None,
              help="Leave out rows whose LAION `punsafe` is above this.")
@click.option("--max-pwatermark", type=float, default=None,
              help="Leave out rows whose LAION `pwatermark` is above this.")
@click.option("--exclude", "exclude_file", type=click.Path(),
              help="File of ids or URLs to leave out (takedown requests), one per line.")
@click.option("--license", "license_id", default=None,
              help="Licence id for the card (default: the one licence found on all sources "
                   "and models, else none; never guessed).")
@click.option("--pretty-name", default=None, help="Dataset name on the card.")
@click.option("--repo", "repo_id", default=None,
              help="org/name the folder will be pushed to (used in the card's snippets).")
@click.option("--language", default="en", show_default=True,
              help="Caption languages for the card, comma-separated ISO codes.")
@click.option("--max-shard-mb", default=500.0, show_default=True,
              help="Largest parquet file (the Hub recommends <= ~500 MB).")
@click.option("--row-group-mb", default=100.0, show_default=True,
              help="Uncompressed size of a parquet row group.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--no-stats", is_flag=True, help="Skip the Table-3 statistics of the export.")
@click.option("--allow-partial", is_flag=True,
              help="Export the finished shards of a run whose stage is not finished; the rows "
                   "of the others are counted as not_done:<stage>, and the card and "
                   "capsfus-export.json say the export is partial.")
@click.option("--workers", default=1, show_default=True,
              help="Processes, each exporting a contiguous group of the run's shards (each "
                   "group's last parquet file is a partial one).")
def export_cmd(run_dir, out, schema, stage_opt, caption_src, mix_text, fallback, seed,
               max_punsafe, max_pwatermark, exclude_file, license_id, pretty_name, repo_id,
               language, max_shard_mb, row_group_mb, overwrite, no_stats, workers,
               allow_partial):
    """Write RUN_DIR's captions as a Hugging Face dataset folder that
    `datasets.load_dataset(OUT)` reads, ready for `capsfus push dataset`.

    Every row the run accepted is exported or counted under the reason it is not (dropped
    by the filter, refused by fusion, over a safety threshold, on the exclusion list); the
    counts are in OUT/capsfus-export.json and on the card. The folder appears only when
    complete.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from ..hub.export import ExportOptions, export_run
    from ..hub.mix import MIX_PRESETS, parse_mix
    from .common import make_console
    console = make_console()
    if workers < 1:
        raise UserError("--workers must be at least 1")
    if caption_src and mix_text:
        raise UserError("give --caption or --mix, not both")
    mix = mix_name = None
    order = [s.strip() for s in fallback.split(",") if s.strip()] if fallback else None
    if mix_text:
        mix = parse_mix(mix_text)
        mix_name = mix_text if mix_text in MIX_PRESETS else None
    elif caption_src and caption_src != "fused":
        mix = {caption_src: 1.0}
        order = order or [caption_src]     # no fallback: rows without it are not exported
    opts = ExportOptions(
        schema=schema, stage=stage_opt, mix=mix, mix_name=mix_name, fallback=order,
        seed=seed, max_punsafe=max_punsafe, max_pwatermark=max_pwatermark,
        exclude=exclude_file, max_shard_bytes=int(max_shard_mb * 1e6),
        row_group_bytes=int(row_group_mb * 1e6), overwrite=overwrite, license=license_id,
        pretty_name=pretty_name, repo_id=repo_id,
        language=[x.strip() for x in language.split(",") if x.strip()], stats=not no_stats,
        workers=workers, allow_partial=allow_partial)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  console=console, transient=True,
                  disable=not console.is_terminal) as progress:
        task = progress.add_task("exporting rows", total=None)
        summary = export_run(run_dir, out, opts,
                             progress=lambda d, n: progress.update(task, completed=d, total=n))
    r = summary["rows"]
    console.print(f"[bold]{out}[/]: {r['exported']:,} of {r['read']:,} rows in "
                  f"{len(summary['files'])} parquet file(s), "
                  f"{summary['bytes'] / 1e6:.1f} MB ({summary['seconds']:.1f}s)")
    for code, n in r["excluded"].items():
        console.print(f"  not exported: {code}: {n:,}")
    if summary.get("partial") and summary["partial"]["unfinished_shards"]:
        pa = summary["partial"]
        console.print(f"  [yellow]partial export[/]: {len(pa['unfinished_shards'])} of "
                      f"{pa['shards']} shard(s) unfinished, their {pa['rows_left_out']:,} rows "
                      f"left out (said on the card)")
    shares = summary["caption"]["realised_shares"]
    if mix:
        console.print("  caption sources: " + ", ".join(f"{k} {v:.2%}" for k, v in
                                                         shares.items())
                      + (f"; fallbacks {summary['caption']['fallbacks']}"
                         if summary["caption"]["fallbacks"] else ""))
    if not summary["license"]["id"]:
        console.print("  [yellow]no licence on the card[/]: none found on the sources and "
                      "models; pass --license ID")
    console.print(f"  next: `capsfus push dataset {out} --repo ORG/NAME`")
