"""Done means current (issue 13, item 2): a shard made with other settings, or from upstream
output that has since been redone, is stale, never done: `status` shows it, the stage redoes
it, a downstream stage refuses to read it, and `export` refuses to ship it. Real CLI runs in
subprocesses with the echo engine."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
from runhelp import assert_exactly_once, capsfus, echo_log_counts, write_rows


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def _make_run(tmp: Path, n: int, per_shard: int) -> Path:
    data = write_rows(tmp / "rows.jsonl", n)
    run = tmp / "run"
    capsfus("shard", data, "--out", run, "--rows-per-shard", per_shard)
    return run


def _stage(run: Path, name: str) -> dict:
    st = json.loads(capsfus("status", run, "--json").stdout)
    return next(s for s in st["stages"] if s["stage"] == name)


def _export_rows(folder: Path) -> list[dict]:
    rows = []
    for f in sorted((folder / "data").glob("*.parquet")):
        rows += pq.read_table(f).to_pylist()
    return rows


def test_force_on_some_shards_leaves_the_others_stale_not_done(tmp_path):
    """(a) fuse all, then `fuse --max-new-tokens 5 --force --shards 0`: 1 done, 3 stale."""
    run = _make_run(tmp_path, 400, 100)
    capsfus("fuse", run, "--engine", "echo")
    p = capsfus("fuse", run, "--engine", "echo", "--max-new-tokens", 5, "--force",
                "--shards", 0)
    assert "3 shard(s) stale (1-3)" in _flat(p.stdout + p.stderr)
    s = _stage(run, "fuse")
    assert s["counts"]["done"] == 1 and s["counts"]["stale"] == 3
    assert [x["shard"] for x in s["stale"]] == [1, 2, 3]
    assert {x["why"] for x in s["stale"]} == {"settings"}
    assert s["rows"]["done"] == 100
    human = _flat(capsfus("status", run).stdout)
    assert "stale 3" in human and "capsfus fuse" in human and "1-3" in human

    # export refuses, naming the stale shards and the command; writes nothing
    out = tmp_path / "export"
    p = capsfus("export", run, "--out", out, check=False)
    err = _flat(p.stderr)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "stale" in err and "1-3" in err and "capsfus fuse" in err
    assert not out.exists()

    # the same command without --shards redoes exactly the stale shards
    log = tmp_path / "echo.log"
    capsfus("fuse", run, "--engine", "echo", "--max-new-tokens", 5, CAPSFUS_ECHO_LOG=log)
    assert sum(echo_log_counts(log).values()) == 300
    s = _stage(run, "fuse")
    assert s["counts"]["done"] == 4 and s["counts"]["stale"] == 0 and not s["stale_hint"]
    fused, rej = assert_exactly_once(run)
    assert not rej and all(r["fused_hit_max_tokens"] for r in fused)
    capsfus("export", run, "--out", out)
    rows = _export_rows(out)
    assert len(rows) == 400
    assert all(len(re.findall(r"\w+|[^\w\s]", r["fused"])) <= 5 for r in rows)


def test_filter_after_refused_fusion_redoes_and_export_ships_new_text(tmp_path):
    """(b) fuse, filter, `fuse --force --prompt-file OTHER`, filter: the filter redoes every
    shard, and the export ships the new fused text."""
    run = _make_run(tmp_path, 200, 100)
    capsfus("fuse", run, "--engine", "echo")
    capsfus("filter", run)
    old = {r["id"]: r["fused"] for r in assert_exactly_once(run, "filter")[0]}
    other = tmp_path / "other.txt"   # the echo engine then echoes the added words too
    other.write_text("Join them.\nSentence 1: {raw} near the old harbour at dawn\n"
                     "Sentence 2: {synthetic}\n")

    # a filter run while fuse is partly redone would read stale fusions: refused
    capsfus("fuse", run, "--engine", "echo", "--force", "--prompt-file", other, "--shards", 0)
    p = capsfus("filter", run, check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    err = _flat(p.stderr)
    assert "stage fuse has 1 stale shard(s) (1:" in err and "capsfus fuse" in err

    capsfus("fuse", run, "--engine", "echo", "--force", "--prompt-file", other)
    s = _stage(run, "filter")
    assert s["counts"]["stale"] == 2 and s["counts"]["done"] == 0
    assert {x["why"] for x in s["stale"]} == {"input"}
    out = tmp_path / "export"
    p = capsfus("export", run, "--out", out, check=False)
    err = _flat(p.stderr)
    assert p.returncode != 0 and "stage filter has 2 stale shard(s) (0-1" in err
    assert "capsfus filter" in err and not out.exists()

    capsfus("filter", run)
    s = _stage(run, "filter")
    assert s["counts"]["done"] == 2 and s["counts"]["stale"] == 0
    new_fuse = {r["id"]: r["fused"] for r in assert_exactly_once(run, "fuse")[0]}
    kept, dropped = assert_exactly_once(run, "filter")
    assert len(kept) == 200 and all(r["fused"] == new_fuse[r["id"]] for r in kept)
    assert all(r["fused"] != old.get(r["id"]) for r in kept)
    capsfus("export", run, "--out", out)
    rows = _export_rows(out)
    assert len(rows) == 200 and all(r["fused"] == new_fuse[r["id"]] for r in rows)
    assert all("harbour" in r["fused"] for r in rows)


def test_a_state_from_an_older_capsfus_is_redone_not_trusted(tmp_path):
    """A done state without input_sha256 (written before this rule) cannot be shown current:
    it is stale (`unrecorded`) and the next run redoes that shard only."""
    run = _make_run(tmp_path, 200, 100)
    capsfus("fuse", run, "--engine", "echo")
    path = run / "fuse" / "state" / "00001.json"
    st = json.loads(path.read_text())
    del st["input_sha256"]
    path.write_text(json.dumps(st))
    s = _stage(run, "fuse")
    assert s["counts"]["stale"] == 1 and s["stale"] == [
        {"shard": 1, "why": "unrecorded", "detail": s["stale"][0]["detail"]}]
    log = tmp_path / "echo.log"
    capsfus("fuse", run, "--engine", "echo", CAPSFUS_ECHO_LOG=log)
    assert sum(echo_log_counts(log).values()) == 100
    assert _stage(run, "fuse")["counts"]["done"] == 2
    assert_exactly_once(run)
