"""Issue 13 item 11: `datasets.load_dataset(EXPORT_DIR)` with the user's ordinary, shared cache
returns that export's own rows, for two exports in folders of the same name from different
runs, and after `export --overwrite` of one of them. The real `datasets` library, in fresh
processes (as a user would load), one HF_DATASETS_CACHE for all."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from runhelp import capsfus, env, write_rows

LOAD = ("import json, sys, datasets; datasets.disable_progress_bars(); "
        "ds = datasets.load_dataset(sys.argv[1], split='train'); "
        "print(json.dumps(sorted([r['id'], r['caption']] for r in ds)))")


def _load(folder: Path, cache: Path) -> list[list[str]]:
    p = subprocess.run([sys.executable, "-c", LOAD, str(folder)], capture_output=True,
                       text=True, timeout=300,
                       env=env(HF_DATASETS_CACHE=cache, HF_HUB_OFFLINE=1))
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.splitlines()[-1])


def _fused_run(tmp: Path, name: str, n: int, prefix: str) -> Path:
    data = write_rows(tmp / f"{name}.jsonl", n, prefix=prefix)
    run = tmp / name / "run"
    capsfus("shard", data, "--out", run, "--rows-per-shard", 50)
    capsfus("fuse", run, "--engine", "echo")
    return run


def _expected(folder: Path) -> list[list[str]]:
    import pyarrow.parquet as pq
    rows = [r for f in sorted((folder / "data").glob("*.parquet"))
            for r in pq.read_table(f, columns=["id", "caption"]).to_pylist()]
    return sorted([r["id"], r["caption"]] for r in rows)


def test_each_export_loads_its_own_rows_with_a_shared_cache(tmp_path):
    cache = tmp_path / "hf-datasets-cache"
    a = _fused_run(tmp_path, "a", 24, "demo")
    b = _fused_run(tmp_path, "b", 100, "run100")
    ea, eb = tmp_path / "a" / "export", tmp_path / "b" / "export"   # same folder name
    capsfus("export", a, "--out", ea)
    capsfus("export", b, "--out", eb)
    got_a = _load(ea, cache)
    assert len(got_a) == 24 and got_a == _expected(ea)
    got_b = _load(eb, cache)
    assert len(got_b) == 100 and got_b == _expected(eb)
    assert all("run100" in c for _, c in got_b)

    # a re-export of the same run with the same number of rows, other captions
    capsfus("export", a, "--out", ea, "--caption", "raw", "--overwrite")
    got = _load(ea, cache)
    assert got == _expected(ea) and got != got_a and len(got) == 24
    assert {c for _, c in got} == {json.loads(x)["TEXT"] for x in
                                   (tmp_path / "a.jsonl").read_text().splitlines()}
    # and the first export of b is still b's
    assert _load(eb, cache) == got_b
