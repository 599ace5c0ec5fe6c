"""`capsfus export`: HF parquet layout, every row accounted for, caption mixes, cards, kills.

Real parts: the CLI as a subprocess, the real filter stage on the CapsFusion 10k sample, and
the real `datasets.load_dataset` (local folder and streaming) reading the export back."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from runhelp import SHARED_SAMPLE, capsfus, stage_rows

from capsfus.hub.dataset_card import front_matter



def _load(folder: Path, streaming: bool = False):
    """The real datasets client on an export folder. Its own cache each time: datasets keys
    a local folder's cache by the folder name and the card's data_files patterns, not by the
    files' content, so a re-export to the same name would read the stale cache."""
    import tempfile

    import datasets
    datasets.disable_progress_bars()
    cache = tempfile.mkdtemp(prefix="hfcache-", dir=folder.parent)
    return datasets.load_dataset(str(folder), split="train", streaming=streaming,
                                 cache_dir=cache)


def _summary(folder: Path) -> dict:
    return json.loads((folder / "capsfus-export.json").read_text())


@pytest.fixture(scope="module")
def filtered_10k(tmp_path_factory) -> Path:
    """The 10k official outputs through the real filter stage (fused column
    `capsfuion_official`), once for the module."""
    d = tmp_path_factory.mktemp("filtered")
    capsfus("filter", "--input", SHARED_SAMPLE, "--out", d / "run",
            "--fused-col", "capsfuion_official", "--rows-per-shard", 4000, timeout=600)
    return d / "run"


def test_round_trip_with_published_names(filtered_10k, tmp_path):
    out = tmp_path / "exp"
    p = capsfus("export", filtered_10k, "--out", out, "--schema", "capsfusion120m")
    assert "of 10,000 rows" in " ".join(p.stderr.split())
    kept, dropped = stage_rows(filtered_10k, "filter")
    s = _summary(out)
    # every accepted row is exported or counted under its reason, nothing twice
    assert s["rows"]["read"] == 10_000 == len(kept) + len(dropped)
    assert s["rows"]["exported"] == len(kept)
    want_excl = Counter(f"filter:{r['reason']}" for r in dropped)
    assert s["rows"]["excluded"] == dict(want_excl)
    # HF layout and the published column names
    assert [f["file"] for f in s["files"]] == ["data/train-00000-of-00001.parquet"]
    names = pq.ParquetFile(out / s["files"][0]["file"]).schema_arrow.names
    assert names[:5] == ["image_url", "laion_2b", "laion_coco", "capsfusion", "id"]
    assert pq.ParquetFile(out / s["files"][0]["file"]).metadata.row_group(0).column(0) \
        .compression == "ZSTD"
    # every row, read back by the real datasets client, equals the filter's kept row
    ds = _load(out)
    assert ds.num_rows == len(kept)
    by_id = {r["id"]: r for r in kept}
    for row in ds:
        src = by_id.pop(row["id"])
        assert row["laion_2b"] == src["raw"] and row["laion_coco"] == src["synthetic"]
        assert row["capsfusion"] == src["capsfuion_official"] == row["caption"]
        assert row["caption_source"] == "fused"
    assert not by_id
    stream_ids = [r["id"] for r in _load(out, streaming=True)]
    assert stream_ids == ds["id"]
    # the card's YAML header is valid and describes the data
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["configs"][0]["data_files"][0]["path"] == "data/train-*.parquet"
    assert meta["size_categories"] == ["1K<n<10K"]
    assert "license" not in meta                   # nothing found: none invented
    assert "No licence is declared" in card
    assert f"{len(kept):,}" in card and "filter:" in card
    assert (out / "stats" / "lengths.png").exists()
    fused = s["stats"]["fields"]["fused"]
    assert fused["rows"] == len(kept) and 20 < fused["mean_words"] < 25


def test_mix_shares_seed_fallbacks(filtered_10k, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    capsfus("export", filtered_10k, "--out", a, "--mix", "fused=0.6,raw=0.4", "--seed", 7)
    capsfus("export", filtered_10k, "--out", b, "--mix", "fused=0.6,raw=0.4", "--seed", 7,
            "--workers", 3)
    capsfus("export", filtered_10k, "--out", c, "--mix", "fused=0.6,raw=0.4", "--seed", 8)
    s = _summary(a)
    n = s["rows"]["exported"]
    assert n == 10_000                     # in a mix, a row the filter dropped keeps its raw
    drawn = s["caption"]["drawn"]
    # drawn shares within 4 standard deviations of the requested 60/40
    sd = math.sqrt(0.6 * 0.4 / n)
    assert abs(drawn["fused"] / n - 0.6) < 4 * sd
    ds = _load(a)
    src = Counter(ds["caption_source"])
    assert src == Counter(s["caption"]["used"])
    assert abs(s["caption"]["realised_shares"]["fused"] - src["fused"] / n) < 1e-12
    # fallbacks: exactly the rows drawn `fused` whose fused caption the filter dropped
    dropped = {r["id"] for r in stage_rows(filtered_10k, "filter")[1]}
    rows = ds.to_list()
    for r in rows:
        if r["id"] in dropped:
            assert r["fused"] is None and r["filter_reasons"] and r["caption_source"] == "raw"
        else:
            assert r["filter_reasons"] == []
        assert r["caption"] == (r["fused"] if r["caption_source"] == "fused" else r["raw"])
    fb = s["caption"]["fallbacks"].get("fused->raw", 0)
    assert 0 < fb <= len(dropped)
    assert drawn["fused"] - fb == src["fused"]
    # the same seed gives the same dataset, with one process or several; another seed
    # another draw
    assert _load(b).to_list() == rows
    sb = _summary(b)
    assert sb["workers"] == 3 and len(sb["files"]) > 1
    assert sb["stats"]["fields"] == s["stats"]["fields"]
    other = _load(c)["caption_source"]
    assert other != ds["caption_source"]
    # `capsfus stats EXPORT` reports the realised mix
    p = capsfus("stats", a, "--json")
    st = json.loads(p.stdout[p.stdout.index("{"):])
    assert st["caption_mix"]["realised"] == pytest.approx(s["caption"]["realised_shares"])
    assert st["fields"]["caption"]["rows"] == n


def test_preset_and_plain_source(filtered_10k, tmp_path):
    capsfus("export", filtered_10k, "--out", tmp_path / "clip", "--mix", "clip")
    s = _summary(tmp_path / "clip")
    assert s["caption"]["mix_name"] == "clip" and set(s["caption"]["mix"]) == {"synthetic", "raw"}
    assert "preset `clip`" in (tmp_path / "clip" / "README.md").read_text()
    capsfus("export", filtered_10k, "--out", tmp_path / "raw", "--caption", "raw")
    assert Counter(_load(tmp_path / "raw")["caption_source"]) == {"raw": 10_000}


def _echo_run(tmp_path: Path, n: int = 400) -> Path:
    src = tmp_path / "in.jsonl"
    with open(src, "w") as f:
        for i in range(n):
            f.write(json.dumps({
                "TEXT": f"photo {i} of the Acme Rocket-{i} at Cape Town in 20{i % 90:02d}",
                "top_caption": None if i % 97 == 5 else f"a rocket standing on a pad {i}",
                "URL": f"https://img.example/{i}.jpg", "punsafe": (i % 10) / 10,
                "pwatermark": 0.9 if i % 25 == 0 else 0.05, "width": 100 + i}) + "\n")
    (tmp_path / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n# source\n")
    run = tmp_path / "run"
    capsfus("shard", src, "--out", run, "--rows-per-shard", 150)
    capsfus("fuse", run, "--engine", "echo")
    return run


def test_safety_thresholds_exclusions_and_licence(tmp_path):
    run = _echo_run(tmp_path)
    excl = tmp_path / "takedown.txt"
    excl.write_text("# takedown requests\nin.jsonl:11\nhttps://img.example/12.jpg\nnope\n")
    out = tmp_path / "exp"
    capsfus("export", run, "--out", out, "--max-punsafe", "0.55", "--max-pwatermark", "0.5",
            "--exclude", excl)
    s = _summary(out)
    fused, refused = stage_rows(run, "fuse")
    no_syn = {i for i in range(400) if i % 97 == 5}
    assert Counter(r["reason"] for r in refused) == {"no_synthetic": len(no_syn)}
    ex = s["rows"]["excluded"]
    # the checks run in order: exclusion list, punsafe, pwatermark, then the caption
    left = [i for i in range(400) if i not in (11, 12)]    # ids are <file>:<row from 0>
    over_unsafe = [i for i in left if (i % 10) / 10 > 0.55]
    left = [i for i in left if i not in over_unsafe]
    over_wm = [i for i in left if i % 25 == 0]
    left = [i for i in left if i not in over_wm]
    assert ex == {"excluded_id": 1, "excluded_url": 1, "punsafe": len(over_unsafe),
                  "pwatermark": len(over_wm),
                  "fuse:no_synthetic": len([i for i in left if i in no_syn])}
    rows = _load(out).to_list()
    assert all(r["punsafe"] <= 0.55 and r["pwatermark"] <= 0.5 for r in rows)
    assert {"in.jsonl:11"} & {r["id"] for r in rows} == set()
    assert "https://img.example/12.jpg" not in {r["url"] for r in rows}
    assert s["rows"]["exported"] + sum(ex.values()) == 400 == len(rows) + sum(ex.values())
    assert all(isinstance(r["width"], int) for r in rows)        # passthrough types kept
    meta = front_matter((out / "README.md").read_text())
    assert meta["license"] == "cc-by-4.0"        # the source's licence (the echo engine has none)
    # --caption SOURCE: rows without that source are left out, never given another one
    capsfus("export", run, "--out", tmp_path / "syn", "--caption", "synthetic")
    assert Counter(_load(tmp_path / "syn")["caption_source"]) == {"synthetic": 400 - len(no_syn)}
    assert _summary(tmp_path / "syn")["rows"]["excluded"] == {"no_caption": len(no_syn)}
    assert "for a row the row is not exported" in " ".join(
        (tmp_path / "syn" / "README.md").read_text().split())
    capsfus("export", run, "--out", out, "--license", "odc-by", "--overwrite",
            "--repo", "acme/rockets")
    card = (out / "README.md").read_text()
    assert front_matter(card)["license"] == "odc-by" and 'load_dataset("acme/rockets"' in card


def test_file_and_row_group_sizes(tmp_path):
    run = _echo_run(tmp_path, n=3000)
    out = tmp_path / "exp"
    capsfus("export", run, "--out", out, "--stage", "fuse", "--max-shard-mb", "0.03",
            "--row-group-mb", "0.05")
    s = _summary(out)
    n = len(s["files"])
    assert n >= 3
    assert [f["file"] for f in s["files"]] == \
        [f"data/train-{i:05d}-of-{n:05d}.parquet" for i in range(n)]
    groups = [pq.ParquetFile(out / f["file"]).metadata.num_row_groups for f in s["files"]]
    assert max(groups) >= 2                   # several row groups per file
    for f in s["files"][:-1]:
        assert 30_000 <= f["bytes"] < 30_000 + 20_000      # the limit plus at most one group
    assert sum(f["rows"] for f in s["files"]) == s["rows"]["exported"] == _load(out).num_rows


def test_errors_are_one_line(tmp_path):
    run = _echo_run(tmp_path, n=50)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    for args, want in [
        ((run, "--out", tmp_path / "busy"), "not empty"),
        ((run, "--out", tmp_path / "e", "--mix", "fused=a"), "SOURCE=WEIGHT"),
        ((run, "--out", tmp_path / "e", "--mix", "fused=inf,raw=1"), "SOURCE=WEIGHT"),
        ((run, "--out", tmp_path / "e", "--caption", "widht"), "no row has such a column"),
        ((run, "--out", tmp_path / "e", "--stage", "filter"), "no such stage"),
        ((tmp_path / "nope", "--out", tmp_path / "e"), "no such run directory"),
        ((run, "--out", tmp_path / "e", "--exclude", tmp_path / "missing.txt"), "--exclude"),
        # --overwrite never deletes what export did not write: the run, another folder
        ((run, "--out", run, "--overwrite"), "holds the run"),
        ((run, "--out", tmp_path / "busy", "--overwrite"), "only a folder `capsfus export`"),
        ((run, "--out", tmp_path / "busy" / "x"), "is a file"),
    ]:
        p = capsfus("export", *args, check=False)
        assert p.returncode == 2, p.stderr
        assert want in " ".join(p.stderr.split()) and "Traceback" not in p.stderr
    assert (run / "manifest.json").exists() and (tmp_path / "busy" / "x").read_text() == "x"
    # a stage with unfinished shards is refused, not half exported
    state = run / "fuse" / "state" / "00000.json"
    st = json.loads(state.read_text())
    st["status"] = "running"
    state.write_text(json.dumps(st))
    p = capsfus("export", run, "--out", tmp_path / "e", check=False)
    assert p.returncode == 2 and "not done" in p.stderr and not (tmp_path / "e").exists()


@pytest.mark.parametrize("point", ["export_row_group:3", "export_before_swap",
                                   "export_mid_swap"])
def test_killed_export_leaves_no_half_dataset(tmp_path, point):
    run = _echo_run(tmp_path, n=1500)
    out = tmp_path / "exp"
    capsfus("export", run, "--out", out, "--stage", "fuse", "--license", "old")
    before = (out / "README.md").read_text()
    p = capsfus("export", run, "--out", out, "--stage", "fuse", "--overwrite",
                "--row-group-mb", "0.02", "--license", "new", check=False,
                CAPSFUS_CRASH_AT=point)
    assert p.returncode == -9
    if point == "export_mid_swap":     # the old export moved aside, the new one not yet in
        assert not out.exists() and len(list(tmp_path.glob(".exp.old-*"))) == 1
    else:
        # the old export is untouched; the killed one left only a hidden partial folder
        assert (out / "README.md").read_text() == before
    partials = list(tmp_path.glob(".exp.partial-*"))
    assert len(partials) == 1
    capsfus("export", run, "--out", out, "--stage", "fuse", "--overwrite", "--license", "new")
    assert not list(tmp_path.glob(".exp.*"))       # the dead ones are cleaned up
    assert "license: new" in (out / "README.md").read_text()
    assert _load(out).num_rows == _summary(out)["rows"]["exported"]
    assert sorted(n for n in os.listdir(tmp_path) if not n.startswith("hfcache-")) == \
        sorted(["in.jsonl", "README.md", "run", "exp"])


def test_passthrough_schema_comes_from_every_row(tmp_path):
    """Passthrough column types come from all rows, not the first shard's: a column that
    only a later shard has, a float in a column that started as ints and numbers in a column
    empty so far all survive, with one schema in every file, one process or several."""
    src = tmp_path / "in.jsonl"
    want_width = [100 + i if i < 150 else 100.5 + i for i in range(400)]
    want_score = [None if i < 300 else i / 1000 for i in range(400)]
    with open(src, "w") as f:
        for i in range(400):
            row = {"TEXT": f"photo {i} of the Acme Rocket-{i}", "URL": f"https://img.ex/{i}.jpg",
                   "top_caption": f"a rocket standing on a pad {i}", "width": want_width[i],
                   "score": want_score[i], "caption": f"the source's own caption {i}"}
            if i >= 300:
                row["nsfw"] = "UNLIKELY"
            f.write(json.dumps(row) + "\n")
    run = tmp_path / "run"
    capsfus("shard", src, "--out", run, "--rows-per-shard", 150)
    capsfus("fuse", run, "--engine", "echo")
    for workers in (1, 2):
        out = tmp_path / f"exp{workers}"
        capsfus("export", run, "--out", out, "--workers", workers, "--max-shard-mb", "0.01",
                "--row-group-mb", "0.005")
        s = _summary(out)
        schemas = {str(pq.ParquetFile(out / f["file"]).schema_arrow) for f in s["files"]}
        assert len(s["files"]) > 1 and len(schemas) == 1
        rows = sorted(_load(out).to_list(), key=lambda r: int(r["id"].split(":")[1]))
        assert [r["width"] for r in rows] == want_width
        assert [r["score"] for r in rows] == want_score
        assert [r["nsfw"] for r in rows] == [None] * 300 + ["UNLIKELY"] * 100
        # a source column named like an export column is kept beside it, not over it
        assert all(r["caption"] == r["fused"] for r in rows)
        assert [r["source_caption"] for r in rows] == \
            [f"the source's own caption {i}" for i in range(400)]
        assert s["coerced_values"] == {}
