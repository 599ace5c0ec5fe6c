"""The cost of the continuous decoder's regroups (rows leaving / joining the batch) inside the
64-row engine benchmark (variant c of ``capsfus bench fuse``: SmolLM2-135M, greedy, default
batch), timed by wrapping ``ContinuousDecoder._regroup``. Run it once with the code before a
change and once after (``PYTHONPATH`` at each copy), in the same session:

    OMP_NUM_THREADS=2 PYTHONPATH=OLD python bench/regroup_cost.py --label old --prompts P
    OMP_NUM_THREADS=2 PYTHONPATH=NEW python bench/regroup_cost.py --label new --prompts P

Prints one JSON line: regroup calls (and how many only dropped rows), seconds inside them, and
variant c's wall time, CPU time, captions/s and generated tokens.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--label", default="")
    ap.add_argument("--prompts", help="default: the benchmark's (the release rows in tests/data)")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    import capsfus.engines.continuous as C
    from capsfus.perf.bench import bench_fuse
    stats = {"calls": 0, "drop_only": 0, "s": 0.0}
    real = C.ContinuousDecoder._regroup

    def timed(self, keep, running, new):
        t = time.perf_counter()
        out = real(self, keep, running, new)
        stats["s"] += time.perf_counter() - t
        stats["calls"] += 1
        stats["drop_only"] += not new
        return out
    C.ContinuousDecoder._regroup = timed
    res = bench_fuse(prompts_file=args.prompts, rows=args.rows, rounds=args.rounds,
                     variants="c", log=lambda s: None)
    c = res["results"]["c"]
    print(json.dumps({"label": args.label, "regroup": stats,
                      **{k: c[k] for k in ("wall_s", "cpu_s", "captions_per_s",
                                           "generated_tokens")},
                      "load_average": [res["load_average_start"][0],
                                       res["load_average_end"][0]]}))


if __name__ == "__main__":
    main()
