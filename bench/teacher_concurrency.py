"""Teacher throughput against the local OpenAI-compatible test server with a fixed latency per
answer (a stand-in for the API's: no real endpoint is reachable here), at several
--concurrency values, through the real CLI. Each round is a fresh run directory; rounds
interleave the concurrency values so load changes on the shared machine hit all alike.

    python bench/teacher_concurrency.py --rows 200 --latency 0.25 --concurrency 1,4,16,64
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from openai_server import start_server  # noqa: E402
from runhelp import capsfus, write_rows  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--latency", type=float, default=0.25)
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="teacher-bench-"))
    src = write_rows(tmp / "in.jsonl", a.rows)
    srv = start_server(tmp / "srv", key="sk-bench", delay_s=a.latency)
    results: dict[int, list[float]] = {}
    try:
        for r in range(a.rounds):
            for c in map(int, a.concurrency.split(",")):
                run = tmp / f"run-{r}-{c}"
                capsfus("shard", src, "--out", run, "--rows-per-shard", 100)
                capsfus("teacher", run, "--endpoint", srv.url, "--model", "gpt-3.5-turbo",
                        "--concurrency", c, OPENAI_API_KEY="sk-bench")
                u = json.loads((run / "teacher" / "usage.json").read_text())
                assert u["rows"]["done"] == a.rows
                # elapsed_s: the teacher itself, sampling included (process start-up not)
                results.setdefault(c, []).append(u["elapsed_s"])
                shutil.rmtree(run)
    finally:
        srv.stop()
    base = min(results[min(results)])
    print(f"rows {a.rows}, latency {a.latency}s per answer, best of {a.rounds} rounds")
    print("| concurrency | wall s | rows/s | speed-up |")
    print("|---:|---:|---:|---:|")
    for c, ts in sorted(results.items()):
        t = min(ts)
        print(f"| {c} | {t:.2f} | {a.rows / t:.1f} | {base / t:.1f}x |")
    print(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))


if __name__ == "__main__":
    main()
