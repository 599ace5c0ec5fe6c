"""Helpers shared by the run-level tests: make inputs, run the real CLI as a subprocess, read
every row of a stage back, and check exactly-once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from capsfus.ingest.example_data import example_data
from capsfus.rundir.io import iter_jsonl_zst
from capsfus.rundir.manifest import Run
from capsfus.rundir.stage import StageDir

REPO = Path(__file__).resolve().parents[1]
# the 10,000 release rows the repository carries (tests/data/), decompressed once
SHARED_SAMPLE = example_data()


def write_rows(path: Path, n: int, prefix: str = "row") -> Path:
    """n unique LAION-COCO-like rows as JSON lines."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"TEXT": f"{prefix} {i} alt text Acme Model-{i} 20{i % 100:02d}",
                                "top_caption": f"a picture of thing number {i}.",
                                "URL": f"https://example.org/{i}.jpg"}) + "\n")
    return path


def env(**extra) -> dict:
    e = dict(os.environ)
    e.pop("CAPSFUS_CRASH_AT", None)
    e.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    e.update({k: str(v) for k, v in extra.items()})
    return e


def capsfus(*args, check=True, timeout=240, **env_extra) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "capsfus.cli", *map(str, args)],
                       capture_output=True, text=True, timeout=timeout, env=env(**env_extra),
                       cwd=REPO)
    if check and p.returncode != 0:
        raise AssertionError(f"capsfus {' '.join(map(str, args))} exited {p.returncode}\n"
                             f"stdout: {p.stdout[-3000:]}\nstderr: {p.stderr[-3000:]}")
    return p


def popen(*args, **env_extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "capsfus.cli", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env(**env_extra), cwd=REPO)


def stage_rows(run_dir: Path, stage: str = "fuse") -> tuple[list[dict], list[dict]]:
    """All trusted out and rejected rows of a stage, checksums verified."""
    run = Run(Path(run_dir))
    n = len(run.manifest()["shards"])
    st = StageDir(run, stage)
    out, rej = [], []
    for i in range(n):
        out += list(st.iter_rows(i))
        rej += list(st.iter_rows(i, rejected=True))
    return out, rej


def input_ids(run_dir: Path) -> list[str]:
    run = Run(Path(run_dir))
    m = run.manifest()
    ids = []
    for s in m["shards"]:
        ids += [r["id"] for r in iter_jsonl_zst(run.root / s["file"], s["sha256"])]
    return ids


def assert_exactly_once(run_dir: Path, stage: str = "fuse") -> tuple[list[dict], list[dict]]:
    out, rej = stage_rows(run_dir, stage)
    got = Counter(r["id"] for r in out) + Counter(r["id"] for r in rej)
    want = Counter(input_ids(run_dir))
    dupes = {k: v for k, v in got.items() if v > 1}
    assert not dupes, f"rows twice: {list(dupes.items())[:5]}"
    missing = set(want) - set(got)
    assert not missing, f"{len(missing)} rows lost, e.g. {sorted(missing)[:5]}"
    assert set(got) == set(want)
    for s in StageDir(Run(Path(run_dir)), stage).all_states().values():
        assert s["status"] == "done", s
    return out, rej


def echo_log_counts(path: Path) -> Counter:
    if not path.exists():
        return Counter()
    return Counter(line.split()[0] for line in path.read_text().splitlines() if line.strip())
