"""The cost of the continuous decoder's regroups (rows leaving / joining the batch) inside the
64-row engine benchmark (variant c of ``capsfus bench fuse``: SmolLM2-135M, greedy, default
batch), timed by wrapping ``ContinuousDecoder._regroup``. Run it once with the code before a
change and once after (``PYTHONPATH`` at each copy), in the same session:

    OMP_NUM_THREADS=2 PYTHONPATH=OLD python bench/regroup_cost.py --label old --prompts P
    OMP_NUM_THREADS=2 PYTHONPATH=NEW python bench/regroup_cost.py --label new --prompts P

Prints one JSON line: regroup calls (and how many only dropped rows), seconds inside them, the
key/value memory held (after each regroup: the rows' buffers, their allocated columns, and the
shared prefix's own copy), and variant c's wall time, CPU time, captions/s and generated
tokens.
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
    memory = {"peak_buffer_bytes": 0, "rows_at_peak": 0, "columns_at_peak": 0,
              "prefix_bytes": 0}
    real = C.ContinuousDecoder._regroup
    real_prefix = C.SharedPrefix.__init__

    def timed(self, keep, running, new):
        t = time.perf_counter()
        out = real(self, keep, running, new)
        stats["s"] += time.perf_counter() - t
        stats["calls"] += 1
        stats["drop_only"] += not new
        if out[0] is not None:
            layers = out[0].layers
            held = sum(2 * x._k.numel() * x._k.element_size() for x in layers)
            if held > memory["peak_buffer_bytes"]:
                memory.update(peak_buffer_bytes=held, rows_at_peak=layers[0]._k.shape[0],
                              columns_at_peak=layers[0]._k.shape[2])
        return out

    def prefix(self, *a, **kw):
        real_prefix(self, *a, **kw)
        memory["prefix_bytes"] = sum(k.numel() * k.element_size() + v.numel() *
                                     v.element_size() for k, v in self.kv)
        memory["prefix_tokens"] = self.n
    C.ContinuousDecoder._regroup = timed
    C.SharedPrefix.__init__ = prefix
    res = bench_fuse(prompts_file=args.prompts, rows=args.rows, rounds=args.rounds,
                     variants="c", log=lambda s: None)
    c = res["results"]["c"]
    memory["buffer_bytes_per_row"] = memory["peak_buffer_bytes"] // max(1, memory["rows_at_peak"])
    print(json.dumps({"label": args.label, "regroup": stats, "kv_memory": memory,
                      **{k: c[k] for k in ("wall_s", "cpu_s", "captions_per_s",
                                           "generated_tokens")},
                      "load_average": [res["load_average_start"][0],
                                       res["load_average_end"][0]]}))


if __name__ == "__main__":
    main()
