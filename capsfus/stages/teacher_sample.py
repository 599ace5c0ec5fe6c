"""Which rows the teacher asks about: a seeded sample drawn from a hash of (seed, id), so the same
seed picks the same rows whatever the order of the shards, and the fingerprint of its input."""

from __future__ import annotations

import hashlib
import heapq
from pathlib import Path

from ..errors import UserError
from ..rundir.io import atomic_write_json, read_json
from ..rundir.manifest import Run
from ..rundir.stage import StageDir, input_rows


# --- sample ------------------------------------------------------------------------------------
def sample_key(seed: int, row_id) -> int:
    d = hashlib.blake2b(f"{seed}\x00{row_id}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(d, "big")


def input_fingerprint(run: Run, manifest: dict, input_stage: str) -> list:
    if input_stage == "input":
        return [s["sha256"] for s in manifest["shards"]]
    st = StageDir(run, input_stage)
    return [((st.read_state(i) or {}).get("final") or {}).get("out", {}).get("sha256")
            for i in range(len(manifest["shards"]))]


def input_count(run: Run, manifest: dict, input_stage: str, shard: int) -> int:
    if input_stage == "input":
        return manifest["shards"][shard]["rows"]
    st = StageDir(run, input_stage).read_state(shard)
    if not st or st.get("status") != "done":
        raise UserError(f"shard {shard} of stage {input_stage} is not done yet: finish "
                        f"`capsfus {input_stage}` first")
    return st["rows_out"]


def select_sample(run: Run, manifest: dict, input_stage: str, n: int | None, seed: int,
                  cache: Path, tmp_dir: Path | None = None) -> dict[int, list[int]]:
    """{shard: sorted row indices} of the sample (every row when ``n`` is None). ``tmp_dir``:
    the run lease's token the cache is written through."""
    shards = range(len(manifest["shards"]))
    if n is None:
        return {i: list(range(input_count(run, manifest, input_stage, i))) for i in shards}
    fp = input_fingerprint(run, manifest, input_stage)
    key = {"seed": seed, "n": n, "input_stage": input_stage, "input": fp}
    if cache.exists():
        try:
            c = read_json(cache)
            if c.get("key") == key:
                return {int(k): v for k, v in c["shards"].items()}
        except (OSError, ValueError, KeyError):
            pass
    heap: list[tuple[int, int, int]] = []   # negated: the largest kept key on top
    for shard in shards:
        for idx, row in enumerate(input_rows(run, manifest, input_stage, shard)):
            k = (sample_key(seed, row["id"]), shard, idx)
            if len(heap) < n:
                heapq.heappush(heap, (-k[0], -shard, -idx))
            elif k < (-heap[0][0], -heap[0][1], -heap[0][2]):
                heapq.heapreplace(heap, (-k[0], -shard, -idx))
    out: dict[int, list[int]] = {i: [] for i in shards}
    for _, s, i in heap:
        out[-s].append(-i)
    for v in out.values():
        v.sort()
    atomic_write_json(cache, {"key": key, "rows": sum(map(len, out.values())),
                              "shards": {str(k): v for k, v in out.items()}}, tmp_dir=tmp_dir)
    return out
