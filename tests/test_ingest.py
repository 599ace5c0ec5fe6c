"""``capsfus shard`` end to end, through the real readers, checks, dedupe and CLI.

Inputs are real files written here (parquet with pyarrow, including one whose string column
holds invalid UTF-8; .jsonl and .jsonl.zst with broken lines; a .json list; ``datasets``
``save_to_disk`` folders). Every reason code of ``rows.REJECT_REASONS`` is produced by at least
one row of the "zoo" below, whose rows each carry the outcome they must get. Error cases run
the CLI as a subprocess, so the assertions see what a user sees.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from capsfus.ingest.example_data import example_data
from capsfus.ingest.shard import shard
from capsfus.rundir.io import iter_jsonl_zst, sha256_file
from capsfus.rundir.rows import FLAG_NO_SYNTHETIC, MAX_CAPTION_CHARS, REJECT_REASONS

SAMPLE = example_data()   # the release rows the repository carries (tests/data/)
LONG = "x" * (MAX_CAPTION_CHARS + 1)
EXACT = "y" * MAX_CAPTION_CHARS


# --- helpers ---------------------------------------------------------------------------------
def cli(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    """Runs ``capsfus`` as a user would, in a fresh interpreter."""
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "capsfus.cli", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """A clear one-line error, a non-zero exit, no traceback."""
    assert proc.returncode != 0, proc
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def write_jsonl(path: Path, lines: list) -> None:
    """``lines``: dicts/lists/values (JSON-encoded), str (written as is) or bytes (raw)."""
    data = b""
    for item in lines:
        if isinstance(item, bytes):
            data += item
        elif isinstance(item, str):
            data += item.encode("utf-8")
        else:
            data += json.dumps(item).encode("utf-8")
        data += b"\n"
    if path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)


def string_column(values: list) -> pa.Array:
    """A parquet/arrow *string* column that may hold invalid UTF-8 (bytes values are kept as
    they are: a binary array relabelled as string, as a broken writer would leave it)."""
    raw = [v.encode("utf-8") if isinstance(v, str) else v for v in values]
    return pa.array(raw, pa.binary()).view(pa.string())


def out_rows(run: Path, manifest: dict) -> list[dict]:
    rows = []
    for s in manifest["shards"]:
        rows += list(iter_jsonl_zst(run / s["file"], expect_sha256=s["sha256"]))
    return rows


def cat_rejected(run: Path) -> list[dict]:
    proc = cli("cat", run, "--stage", "input", "--rejected")
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def check_run_invariants(run: Path, manifest: dict, rows_per_shard: int) -> None:
    """Shard sizes, checksums and the accounting that every ingest must satisfy."""
    c = manifest["counts"]
    assert c["accepted"] + sum(c["rejected"].values()) == c["records"]
    assert sum(s["rows"] for s in manifest["shards"]) == c["accepted"]
    assert set(c["rejected"]) <= set(REJECT_REASONS)
    for i, s in enumerate(manifest["shards"]):
        path = run / s["file"]
        assert s["index"] == i and path.exists()
        assert sha256_file(path) == s["sha256"], s["file"]
        assert path.stat().st_size == s["bytes"]
        assert 0 < s["rows"] <= rows_per_shard
        assert sum(1 for _ in iter_jsonl_zst(path)) == s["rows"]
    for f in manifest["rejected_files"]:
        assert sha256_file(run / f["file"]) == f["sha256"]
    assert c["flagged"].get(FLAG_NO_SYNTHETIC, 0) == sum(s[FLAG_NO_SYNTHETIC]
                                                        for s in manifest["shards"])
    assert not (run / "input" / ".ingest").exists()
    assert not list(run.rglob(".tmp-*"))


# --- the zoo: one of every kind of row, each with the outcome it must get ---------------------
# LAION-COCO column names, ids from the "key" column; "n" identifies each parsed row.
# Each entry: (what goes in the file, expected reason or None for accepted, flagged?)
ACCEPT, FLAG = None, "flag"
NULL = object()   # a JSON null in the id column (key=None: no id column at all)


def _rec(n, key="auto", text="a red car on the street", syn="a car parked", **extra):
    r = {"n": n}
    if key is not None:
        r["key"] = f"k{n}" if key == "auto" else None if key is NULL else key
    if text is not Ellipsis:
        r["TEXT"] = text
    if syn is not Ellipsis:
        r["top_caption"] = syn
    r["URL"] = f"http://img.example/{n}.jpg"
    r["similarity"] = 0.25
    r.update(extra)
    return r


ZOO_A = [  # a.jsonl
    (_rec(0, text="  A red car  "), ACCEPT),
    (_rec(1, text=...), "raw_missing"),
    (_rec(2, text=None), "raw_null"),
    (_rec(3, text=123), "raw_not_string"),
    (_rec(4, text=" \t\n "), "raw_empty"),
    (_rec(5, syn=["not", "a", "string"]), "synthetic_not_string"),
    (_rec(6, text="bell \x07 ring"), "control_chars"),
    (_rec(7, syn="nul \x00 byte"), "control_chars"),
    (_rec(8, text=LONG), "too_long"),
    (_rec(9, syn=LONG), "too_long"),
    (_rec(10, text=EXACT, syn=EXACT), ACCEPT),
    (_rec(11, text="two\tdogs\nin a park\r\n"), ACCEPT),
    (_rec(12, syn=None), FLAG),
    (_rec(13, syn=...), FLAG),
    (_rec(14, syn="   "), FLAG),
    (_rec(15, key=None), "id_missing"),
    (_rec(16, key=NULL), "id_missing"),
    (_rec(17, key="   "), "id_missing"),
    (_rec(18, key="k0"), "duplicate_id"),            # same file, a later shard
    ("this is not json", "unparseable"),
    ("[1, 2, 3]", "unparseable"),                   # a JSON array line
    ('"a bare string"', "unparseable"),
    (b'{"n": 22, "key": "k22", "TEXT": "caf\xe9 cr\xe8me", "top_caption": "x"}', "invalid_utf8"),
    ('{"n": 23, "key": "k23", "TEXT": "lone \\ud800 surrogate", "top_caption": "x"}',
     "invalid_utf8"),
    ('{"n": 24, "key": "k24", "TEXT": "ok", "top_caption": "lone \\udfff low"}', "invalid_utf8"),
    (_rec(25, key=42, punsafe=float("nan")), ACCEPT),  # int id -> "42"; NaN -> null
    (_rec(26, key="k1"), ACCEPT),   # k1's first row was rejected: this one is the first accepted
]
ZOO_B = [  # b.jsonl.zst
    (_rec(100), ACCEPT),
    (_rec(101, key="k11"), "duplicate_id"),         # across files
    (b'{"n": 102, "TEXT": "\xff\xfe"}', "invalid_utf8"),
    ('{"n": 103, "TEXT": broken', "unparseable"),
    (_rec(104, syn=None), FLAG),
    (_rec(105, key="k100"), "duplicate_id"),        # same file, next shard
    (_rec(106, text="DEL is fine? no: \x7f"), "control_chars"),
    ('[{"n": 107, "TEXT": "an object inside an array"}]', "unparseable"),
    ('{"n": 108, "key": "k108", "TEXT": "lone \\udc80 in zstd", "top_caption": "x"}',
     "invalid_utf8"),
    (_rec(109, text="caf\u00e9 \U0001f600 fine"), ACCEPT),
]
ZOO_C = [  # c.parquet: TEXT/top_caption hold raw bytes where a test needs invalid UTF-8
    (_rec(200), ACCEPT),
    (_rec(201, text=b"caf\xe9 au lait"), "invalid_utf8"),
    (_rec(202, key="k0"), "duplicate_id"),          # across files and shards
    (_rec(203, text=None), "raw_null"),
    (_rec(204, syn=b"\xc3\x28 invalid continuation"), "invalid_utf8"),
    (_rec(205, syn=None), FLAG),
    (_rec(206, text="sz\u00e9p k\u00e9p \u65e5\u672c"), ACCEPT),   # real non-ASCII is fine
]
ZOO_D = [  # d.json, a list
    (_rec(300), ACCEPT),
    (5, "unparseable"),                             # an element that is not an object
    (_rec(302, text="bad \udcff bytes"), "invalid_utf8"),   # written as a raw 0xff byte
    (_rec(303, key="k200"), "duplicate_id"),
    (_rec(304, syn=...), FLAG),
]
ZOO_ROWS_PER_SHARD = 3


def _write_zoo(folder: Path) -> dict[str, list]:
    folder.mkdir(parents=True, exist_ok=True)

    a = [rec for rec, _ in ZOO_A]
    write_jsonl(folder / "a.jsonl", a[:5] + [""] + a[5:])     # a blank line is not a row
    write_jsonl(folder / "b.jsonl.zst", [rec for rec, _ in ZOO_B])
    recs = [r for r, _ in ZOO_C]
    table = pa.table({
        "n": pa.array([r["n"] for r in recs], pa.int64()),
        "key": pa.array([r.get("key") for r in recs], pa.string()),
        "TEXT": string_column([r.get("TEXT") for r in recs]),
        "top_caption": string_column([r.get("top_caption") for r in recs]),
        "URL": pa.array([r["URL"] for r in recs], pa.string()),
        "similarity": pa.array([float("nan") if r["n"] == 200 else r["similarity"]
                                for r in recs], pa.float64()),
    })
    pq.write_table(table, folder / "c.parquet", row_group_size=4)
    # a JSON list whose element 2 holds a raw 0xff byte inside a string
    parts = []
    for rec, _ in ZOO_D:
        text = json.dumps(rec, ensure_ascii=False)
        parts.append(text.encode("utf-8", "surrogateescape"))
    (folder / "d.json").write_bytes(b"[\n " + b",\n ".join(parts) + b"\n]\n")
    return {"a.jsonl": ZOO_A, "b.jsonl.zst": ZOO_B, "c.parquet": ZOO_C, "d.json": ZOO_D}


def _expected(zoo: dict[str, list]) -> dict[tuple[str, int], str | None]:
    """(source, row number) -> expected reason (None accepted, "flag" accepted + flagged)."""
    return {(name, i): outcome for name, rows in zoo.items() for i, (_, outcome) in
            enumerate(rows)}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    base = tmp_path_factory.mktemp("zoo")
    files = _write_zoo(base / "in")
    run = base / "run"
    proc = cli("shard", base / "in", "--out", run, "--id-col", "key",
               "--rows-per-shard", ZOO_ROWS_PER_SHARD)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((run / "manifest.json").read_text())
    return {"run": run, "files": files, "manifest": manifest, "proc": proc,
            "expected": _expected(files), "inputs": base / "in",
            "rejected": cat_rejected(run), "out": out_rows(run, manifest)}


def test_zoo_covers_every_reason_code():
    outcomes = {o for rows in (ZOO_A, ZOO_B, ZOO_C, ZOO_D) for _, o in rows}
    assert set(REJECT_REASONS) <= outcomes


def test_zoo_counts_per_reason_in_manifest_and_on_screen(zoo):
    m = zoo["manifest"]
    want = Counter(o for o in zoo["expected"].values() if o not in (ACCEPT, FLAG))
    assert m["counts"]["rejected"] == dict(want)
    assert set(m["counts"]["rejected"]) == set(REJECT_REASONS)
    assert m["counts"]["records"] == len(zoo["expected"])
    assert m["counts"]["accepted"] == sum(o in (ACCEPT, FLAG) for o in zoo["expected"].values())
    assert m["counts"]["flagged"][FLAG_NO_SYNTHETIC] == \
        sum(o == FLAG for o in zoo["expected"].values())
    assert m["mapping"] == {"raw": "TEXT", "synthetic": "top_caption", "url": "URL", "id": "key",
                            "layout": "laion-coco"}
    screen = zoo["proc"].stdout + zoo["proc"].stderr
    for reason, n in want.items():
        assert f"rejected {reason}: {n}" in screen, (reason, screen)
    assert f"flagged {FLAG_NO_SYNTHETIC}: {m['counts']['flagged'][FLAG_NO_SYNTHETIC]}" in screen
    assert f"{m['counts']['records']} rows read" in screen
    check_run_invariants(zoo["run"], m, ZOO_ROWS_PER_SHARD)


def _identity(rej: dict, n_to_pos: dict) -> tuple[str, int]:
    """Where a rejected row came from: (source, row number)."""
    if "row" in rej:                     # duplicate_id: the whole internal row is kept
        return n_to_pos[rej["row"]["n"]]
    return rej["source"], rej["row_number"]


def test_zoo_every_row_accounted_once_with_its_reason(zoo):
    expected = zoo["expected"]
    n_to_pos = {rec["n"]: (name, i) for name, rows in zoo["files"].items()
                for i, (rec, _) in enumerate(rows) if isinstance(rec, dict)}
    seen: Counter = Counter()
    for row in zoo["out"]:
        pos = n_to_pos[row["n"]]
        seen[pos] += 1
        assert expected[pos] in (ACCEPT, FLAG), (pos, row)
        assert (row["synthetic"] is None) == (expected[pos] == FLAG), row
    for rej in zoo["rejected"]:
        assert rej["reason"] in REJECT_REASONS
        pos = _identity(rej, n_to_pos)
        seen[pos] += 1
        assert expected[pos] == rej["reason"], (pos, rej)
    assert set(seen) == set(expected)
    assert all(v == 1 for v in seen.values()), [k for k, v in seen.items() if v != 1]


def test_zoo_rejected_rows_are_readable(zoo):
    by_reason: dict[str, list] = {}
    for rej in zoo["rejected"]:
        by_reason.setdefault(rej["reason"], []).append(rej)
    # a refused row keeps the source id when it has one, else <file>:<row>
    raw_null = {r["id"] for r in by_reason["raw_null"]}
    assert raw_null == {"k2", "k203"}
    assert {r["id"] for r in by_reason["id_missing"]} == {"a.jsonl:15", "a.jsonl:16",
                                                          "a.jsonl:17"}
    bad_lines = {(r["source"], r["row_number"]) for r in by_reason["unparseable"]}
    assert ("a.jsonl", 19) in bad_lines and ("d.json", 1) in bad_lines
    for r in by_reason["unparseable"] + by_reason["invalid_utf8"]:
        assert r["detail"] or r["reason"] == "unparseable"
        assert "record_text" in r or "record" in r
    line = next(r for r in by_reason["unparseable"] if r["row_number"] == 19)
    assert line["record_text"] == "this is not json" and line["id"] == "a.jsonl:19"
    parquet_bad = [r for r in by_reason["invalid_utf8"] if r["source"] == "c.parquet"]
    assert sorted(r["row_number"] for r in parquet_bad) == [1, 4]
    assert "\\xe9" in parquet_bad[0]["record_text"]   # the bad byte is shown, escaped
    dup = by_reason["duplicate_id"]
    assert sorted(r["row"]["n"] for r in dup) == [18, 101, 105, 202, 303]
    assert all(r["id"] == r["row"]["id"] for r in dup)
    assert by_reason["raw_not_string"][0]["record"]["TEXT"] == 123


def test_zoo_first_id_wins_across_files_and_shards(zoo):
    out = zoo["out"]
    ids = [r["id"] for r in out]
    assert len(ids) == len(set(ids))
    by_id = {r["id"]: r for r in out}
    assert by_id["k0"]["n"] == 0          # later k0 rows (same shard, other files) rejected
    assert by_id["k11"]["n"] == 11
    assert by_id["k100"]["n"] == 100
    assert by_id["k200"]["n"] == 200
    assert by_id["k1"]["n"] == 26         # the first k1 was refused: the next one is accepted
    assert by_id["42"]["n"] == 25         # a non-string id becomes a string
    # duplicates were in other shards than their first: the dedupe is global
    assert zoo["manifest"]["counts"]["rejected"]["duplicate_id"] == 5
    assert len(zoo["manifest"]["shards"]) >= 5


def test_zoo_rows_mapped_and_passed_through(zoo):
    by_n = {r["n"]: r for r in zoo["out"]}
    r0 = by_n[0]
    assert set(r0) == {"id", "raw", "synthetic", "url", "n", "similarity"}
    assert r0["raw"] == "A red car" and r0["synthetic"] == "a car parked"
    assert r0["url"] == "http://img.example/0.jpg" and r0["similarity"] == 0.25
    assert by_n[10]["raw"] == EXACT and by_n[10]["synthetic"] == EXACT
    assert by_n[11]["raw"] == "two\tdogs\nin a park"
    assert by_n[14]["synthetic"] is None
    assert by_n[25]["punsafe"] is None                    # NaN in JSON lines -> null
    assert by_n[200]["similarity"] is None                # NaN in parquet -> null
    assert by_n[206]["raw"] == "sz\u00e9p k\u00e9p \u65e5\u672c"
    assert by_n[300]["url"] == "http://img.example/300.jpg"


def test_zoo_rerun_same_inputs_is_a_noop(zoo):
    run, m = zoo["run"], zoo["manifest"]
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    proc = cli("shard", zoo["inputs"], "--out", run, "--id-col", "key",
               "--rows-per-shard", ZOO_ROWS_PER_SHARD)
    assert proc.returncode == 0, proc.stderr
    assert m["run_id"][:8] in proc.stdout + proc.stderr
    after = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    assert after == before
    assert json.loads((run / "manifest.json").read_text()) == m


def test_zoo_same_run_other_input_or_settings_refused(zoo, tmp_path):
    run = zoo["run"]
    other = tmp_path / "other.jsonl"
    write_jsonl(other, [_rec(1)])
    manifest_before = (run / "manifest.json").read_bytes()
    assert_user_error(cli("shard", other, "--out", run), str(run), "other sources")
    # same inputs, other settings: also another run
    assert_user_error(cli("shard", zoo["inputs"], "--out", run, "--id-col", "key",
                          "--rows-per-shard", 7), "other sources")
    assert (run / "manifest.json").read_bytes() == manifest_before
    # a folder that is not a run and not empty is refused too
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    assert_user_error(cli("shard", other, "--out", junk), "not an empty folder")
    assert (junk / "notes.txt").read_text() == "mine"


# --- default ids, stability ----------------------------------------------------------------
def _default_id_inputs(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "x").mkdir()
    (folder / "y").mkdir()
    write_jsonl(folder / "x" / "part.jsonl", [_rec(i, key=None) for i in range(5)]
                + ["{oops"])
    write_jsonl(folder / "y" / "part.jsonl", [_rec(10 + i, key=None) for i in range(4)])
    pq.write_table(pa.table({"TEXT": ["p0", "", "p2"], "top_caption": ["s", "s", None],
                             "URL": ["u0", "u1", "u2"]}), folder / "x" / "t.parquet")
    return [folder / "x" / "part.jsonl", folder / "y" / "part.jsonl", folder / "x" / "t.parquet"]


def test_default_ids_unique_stable_and_each_row_once(tmp_path):
    inputs = _default_id_inputs(tmp_path / "in")
    m1 = shard([str(p) for p in inputs], tmp_path / "r1", rows_per_shard=4)
    m2 = shard([str(p) for p in inputs], tmp_path / "r2", rows_per_shard=4)
    assert m1["run_id"] != m2["run_id"]
    rows1, rows2 = out_rows(tmp_path / "r1", m1), out_rows(tmp_path / "r2", m2)
    assert rows1 == rows2                                   # same ids, same rows, same order
    assert [s["sha256"] for s in m1["shards"]] == [s["sha256"] for s in m2["shards"]]
    rejected = cat_rejected(tmp_path / "r1")
    ids = [r["id"] for r in rows1] + [r["id"] for r in rejected]
    # same basename in two folders: names relative to their common folder keep ids unique
    want = ([f"x/part.jsonl:{i}" for i in range(6)] + [f"y/part.jsonl:{i}" for i in range(4)]
            + [f"t.parquet:{i}" for i in range(3)])
    assert sorted(ids) == sorted(want)
    assert {r["id"]: r["reason"] for r in rejected} == {"x/part.jsonl:5": "unparseable",
                                                        "t.parquet:1": "raw_empty"}
    assert m1["counts"]["flagged"][FLAG_NO_SYNTHETIC] == 1
    check_run_invariants(tmp_path / "r1", m1, 4)
    sizes = [s["rows"] for s in m1["shards"]]
    assert sizes == [4, 4, 3]                               # no duplicates: full shards


def test_folder_and_glob_of_several_files(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    for k in range(3):
        pq.write_table(pa.table({"TEXT": [f"f{k} r{i}" for i in range(5)],
                                 "top_caption": ["syn"] * 5, "URL": ["u"] * 5}),
                       folder / f"part-{k}.parquet")
    (folder / "README.md").write_text("not data")            # ignored in a folder
    (folder / ".hidden.jsonl").write_text("{}\n")            # hidden files ignored
    m_dir = shard([str(folder)], tmp_path / "r_dir", rows_per_shard=6)
    m_glob = shard([str(folder / "part-*.parquet")], tmp_path / "r_glob", rows_per_shard=6)
    for run, m in ((tmp_path / "r_dir", m_dir), (tmp_path / "r_glob", m_glob)):
        assert m["counts"]["records"] == 15 and m["counts"]["accepted"] == 15
        assert [s["rows"] for s in m["shards"]] == [6, 6, 3]
        assert len(m["sources"]) == 3
        rows = out_rows(run, m)
        assert [r["id"] for r in rows] == [f"part-{k}.parquet:{i}" for k in range(3)
                                           for i in range(5)]
        check_run_invariants(run, m, 6)
    assert out_rows(tmp_path / "r_dir", m_dir) == out_rows(tmp_path / "r_glob", m_glob)


# --- layouts -----------------------------------------------------------------------------------
def test_layout_laion_coco(tmp_path):
    pq.write_table(pa.table({
        "SAMPLE_ID": pa.array([7, 8], pa.int64()), "URL": ["http://a/1.jpg", "http://a/2.jpg"],
        "TEXT": ["Red car for sale", "dog"], "top_caption": ["a red car", None],
        "all_captions": [["a", "b"], ["c"]], "punsafe": [0.01, float("nan")],
        "pwatermark": [0.2, 0.3], "similarity": [0.31, 0.29]}), tmp_path / "laion.parquet")
    m = shard([str(tmp_path / "laion.parquet")], tmp_path / "run")
    assert m["mapping"]["layout"] == "laion-coco"
    rows = out_rows(tmp_path / "run", m)
    assert rows[0] == {"id": "laion.parquet:0", "raw": "Red car for sale",
                       "synthetic": "a red car", "url": "http://a/1.jpg", "SAMPLE_ID": 7,
                       "all_captions": ["a", "b"], "punsafe": 0.01, "pwatermark": 0.2,
                       "similarity": 0.31}
    assert rows[1]["synthetic"] is None and rows[1]["punsafe"] is None
    assert m["counts"]["flagged"][FLAG_NO_SYNTHETIC] == 1


def test_layout_capsfusion_120m_and_id_col(tmp_path):
    pq.write_table(pa.table({
        "image_url": ["http://b/1.jpg", "http://b/2.jpg", "http://b/3.jpg"],
        "laion_2b": ["raw one", "raw two", "raw three"],
        "laion_coco": ["syn one", "syn two", "syn three"],
        "capsfusion": ["fused one", "fused two", "fused three"],
        "uid": ["a", "b", "a"]}), tmp_path / "cf.parquet")
    m = shard([str(tmp_path / "cf.parquet")], tmp_path / "run", id_col="uid")
    assert m["mapping"] == {"raw": "laion_2b", "synthetic": "laion_coco", "url": "image_url",
                            "id": "uid", "layout": "capsfusion120m"}
    rows = out_rows(tmp_path / "run", m)
    assert rows == [
        {"id": "a", "raw": "raw one", "synthetic": "syn one", "url": "http://b/1.jpg",
         "capsfusion": "fused one"},
        {"id": "b", "raw": "raw two", "synthetic": "syn two", "url": "http://b/2.jpg",
         "capsfusion": "fused two"}]
    assert m["counts"]["rejected"] == {"duplicate_id": 1}


def test_custom_columns_by_flags(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", [{"alt": "raw", "blip": "syn", "link": "http://l",
                                        "id": "source id", "raw": "clash"}])
    m = shard([str(tmp_path / "c.jsonl")], tmp_path / "run", raw_col="alt",
              synthetic_col="blip", url_col="link")
    assert m["mapping"]["raw"] == "alt" and m["mapping"]["url"] == "link"
    (row,) = out_rows(tmp_path / "run", m)
    # source columns named like internal ones are kept, renamed
    assert row == {"id": "c.jsonl:0", "raw": "raw", "synthetic": "syn", "url": "http://l",
                   "source_id": "source id", "source_raw": "clash"}


def test_capsfusion_example_sample(tmp_path):
    m = shard([str(SAMPLE)], tmp_path / "run", rows_per_shard=4000)
    assert m["mapping"]["layout"] == "capsfusion-example"
    assert m["counts"]["records"] == 10_000 and m["counts"]["accepted"] == 10_000
    assert m["counts"]["rejected"] == {}
    assert [s["rows"] for s in m["shards"]] == [4000, 4000, 2000]
    rows = out_rows(tmp_path / "run", m)
    first = json.loads(SAMPLE.read_text(encoding="utf-8"))[0]
    assert rows[0]["raw"] == first["laion_2b"].strip()
    assert rows[0]["capsfuion_official"] == first["capsfuion_official"]
    assert rows[0]["id"] == "capsfusion_example_10k.json:0"
    assert rows[-1]["id"] == "capsfusion_example_10k.json:9999"
    check_run_invariants(tmp_path / "run", m, 4000)


# --- Hugging Face datasets ---------------------------------------------------------------------
def test_hf_save_to_disk_dataset_and_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    data = {"laion_2b": ["raw a", "  ", "raw c"], "laion_coco": ["syn a", "syn b", None],
            "capsfuion_official": ["f a", "f b", "f c"]}
    datasets.Dataset.from_dict(data).save_to_disk(str(tmp_path / "ds"))
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(data),
                               "validation": datasets.Dataset.from_dict(
                                   {k: v[:1] for k, v in data.items()})})
    dd.save_to_disk(str(tmp_path / "dd"))

    m = shard([str(tmp_path / "ds")], tmp_path / "r_ds")
    assert m["mapping"]["layout"] == "capsfusion-example"
    assert m["counts"]["records"] == 3 and m["counts"]["rejected"] == {"raw_empty": 1}
    assert m["counts"]["flagged"][FLAG_NO_SYNTHETIC] == 1
    rows = out_rows(tmp_path / "r_ds", m)
    assert [r["id"] for r in rows] == ["ds:0", "ds:2"]
    assert rows[0]["capsfuion_official"] == "f a"

    m_train = shard([str(tmp_path / "dd")], tmp_path / "r_dd")
    assert m_train["sources"][0]["split"] == "train"
    assert m_train["counts"]["records"] == 3
    m_val = shard([str(tmp_path / "dd")], tmp_path / "r_val", split="validation")
    assert m_val["counts"]["records"] == 1
    # rerun of a DatasetDict run is a no-op (the split is part of the fingerprint)
    assert shard([str(tmp_path / "dd")], tmp_path / "r_dd")["run_id"] == m_train["run_id"]
    proc = cli("shard", tmp_path / "dd", "--out", tmp_path / "r_dd", "--split", "validation")
    assert_user_error(proc, "other sources")


# --- errors a user must fix: one line, non-zero exit, no traceback ------------------------------
def test_error_missing_input(tmp_path):
    assert_user_error(cli("shard", tmp_path / "nope.parquet", "--out", tmp_path / "r"),
                      "nope.parquet", "no such file")
    assert_user_error(cli("shard", tmp_path / "nodir" / "*.jsonl", "--out", tmp_path / "r"),
                      "matches no data files")
    assert not (tmp_path / "r" / "manifest.json").exists()


def test_error_hub_id_offline(tmp_path):
    pytest.importorskip("datasets")
    proc = cli("shard", "someorg/no-such-dataset", "--out", tmp_path / "r",
               env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert_user_error(proc, "cannot load Hub dataset 'someorg/no-such-dataset'")


def test_error_unknown_extension_and_empty_folder(tmp_path):
    (tmp_path / "data.csv").write_text("TEXT,top_caption\na,b\n")
    assert_user_error(cli("shard", tmp_path / "data.csv", "--out", tmp_path / "r"),
                      "unknown format")
    (tmp_path / "empty").mkdir()
    assert_user_error(cli("shard", tmp_path / "empty", "--out", tmp_path / "r"),
                      "no .parquet")


def test_error_json_not_a_list(tmp_path):
    (tmp_path / "obj.json").write_text('{"TEXT": "a", "top_caption": "b"}')
    assert_user_error(cli("shard", tmp_path / "obj.json", "--out", tmp_path / "r"),
                      "not a JSON list")
    # also when it is not the first input (found while streaming)
    write_jsonl(tmp_path / "ok.jsonl", [{"TEXT": "a", "top_caption": "b"}])
    assert_user_error(cli("shard", tmp_path / "ok.jsonl", tmp_path / "obj.json", "--out",
                          tmp_path / "r2"), "not a JSON list")
    assert not (tmp_path / "r2" / "manifest.json").exists()


def test_error_missing_raw_column(tmp_path):
    pq.write_table(pa.table({"caption": ["a"], "other": ["b"]}), tmp_path / "x.parquet")
    assert_user_error(cli("shard", tmp_path / "x.parquet", "--out", tmp_path / "r"),
                      "cannot tell which column holds the raw caption")
    assert_user_error(cli("shard", tmp_path / "x.parquet", "--out", tmp_path / "r",
                          "--raw-col", "TEXT"), "--raw-col 'TEXT' is not a column")
    assert_user_error(cli("shard", tmp_path / "x.parquet", "--out", tmp_path / "r",
                          "--raw-col", "caption", "--id-col", "uid"),
                      "--id-col 'uid' is not a column")
    # a later parquet file without the raw column of the first
    pq.write_table(pa.table({"TEXT": ["a"], "top_caption": ["b"], "URL": ["u"]}),
                   tmp_path / "a.parquet")
    assert_user_error(cli("shard", tmp_path / "a.parquet", tmp_path / "x.parquet", "--out",
                          tmp_path / "r"), "x.parquet", "missing the raw caption column 'TEXT'")
    assert not (tmp_path / "r").exists() or not (tmp_path / "r" / "manifest.json").exists()


def test_error_corrupt_parquet(tmp_path):
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 this is not really parquet at all")
    assert_user_error(cli("shard", tmp_path / "junk.parquet", "--out", tmp_path / "r"),
                      "cannot read parquet file")
    pq.write_table(pa.table({"TEXT": ["a"] * 100, "top_caption": ["b"] * 100}),
                   tmp_path / "good.parquet")
    data = (tmp_path / "good.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])   # truncated: no footer
    assert_user_error(cli("shard", tmp_path / "good.parquet", tmp_path / "cut.parquet",
                          "--out", tmp_path / "r"), "cut.parquet")


def test_corrupt_zstd_stream_is_rejected_not_crashed(tmp_path):
    good = zstandard.ZstdCompressor().compress(
        b"".join(json.dumps({"TEXT": f"r{i}", "top_caption": "s"}).encode() + b"\n"
                 for i in range(50)))
    (tmp_path / "a.jsonl.zst").write_bytes(good)
    (tmp_path / "b.jsonl.zst").write_bytes(good[: len(good) // 2])
    m = shard([str(tmp_path / "a.jsonl.zst"), str(tmp_path / "b.jsonl.zst")], tmp_path / "r")
    assert m["counts"]["accepted"] >= 50
    assert m["counts"]["rejected"].get("unparseable") == 1
    rej = cat_rejected(tmp_path / "r")
    assert rej[-1]["source"] == "b.jsonl.zst" and "rest of file unread" in rej[-1]["detail"]
    check_run_invariants(tmp_path / "r", m, 100_000)


def test_interrupted_ingest_is_started_over(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [_rec(i, key=None) for i in range(10)])
    run = tmp_path / "r"
    (run / "input" / ".ingest").mkdir(parents=True)          # what a killed ingest leaves
    (run / "input" / ".ingest" / "00000.jsonl.zst").write_bytes(b"half")
    m = shard([str(tmp_path / "a.jsonl")], run, rows_per_shard=4)
    assert m["counts"]["accepted"] == 10
    check_run_invariants(run, m, 4)


def test_bad_flags(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [_rec(0)])
    assert_user_error(cli("shard", tmp_path / "a.jsonl", "--out", tmp_path / "r",
                          "--rows-per-shard", 0), "--rows-per-shard")


def test_duplicates_never_leave_an_empty_shard(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [_rec(0, key="a"), _rec(1, key="b"), _rec(2, key="a"),
                                       _rec(3, key="b"), _rec(4, key="c")])
    m = shard([str(tmp_path / "a.jsonl")], tmp_path / "r", rows_per_shard=2, id_col="key")
    # provisional shards [a b] [a b] [c]: the second holds only duplicates and is dropped
    assert [(s["index"], s["file"], s["rows"]) for s in m["shards"]] == [
        (0, "input/out/00000.jsonl.zst", 2), (1, "input/out/00001.jsonl.zst", 1)]
    assert sorted(p.name for p in (tmp_path / "r" / "input" / "out").iterdir()) == [
        "00000.jsonl.zst", "00001.jsonl.zst"]
    assert [r["n"] for r in out_rows(tmp_path / "r", m)] == [0, 1, 4]
    assert m["counts"]["rejected"] == {"duplicate_id": 2}
    check_run_invariants(tmp_path / "r", m, 2)


def test_parquet_invalid_utf8_in_any_string_column(tmp_path):
    """large_string, dictionary-encoded and nested (list<string>) columns with invalid bytes:
    the row is rejected as invalid_utf8, its neighbours are kept."""
    bad = [b"ok one", b"b\xffd", b"fine"]
    lst = pa.ListArray.from_arrays(pa.array([0, 1, 2, 3], pa.int32()),
                                   pa.array(bad, pa.binary()).view(pa.string()))
    pq.write_table(pa.table({"TEXT": ["a", "b", "c"], "top_caption": ["x", "y", "z"],
                             "all_captions": lst}), tmp_path / "nested.parquet")
    pq.write_table(pa.table({"TEXT": pa.array(bad, pa.large_binary()).view(pa.large_string()),
                             "top_caption": ["x", "y", "z"]}), tmp_path / "large.parquet")
    dic = pa.DictionaryArray.from_arrays(pa.array([0, 1, 2], pa.int32()),
                                         pa.array(bad, pa.binary()).view(pa.string()))
    pq.write_table(pa.table({"TEXT": dic, "top_caption": ["x", "y", "z"]}),
                   tmp_path / "dict.parquet")
    for name in ("nested", "large", "dict"):
        run = tmp_path / f"r_{name}"
        m = shard([str(tmp_path / f"{name}.parquet")], run)
        assert m["counts"]["records"] == 3 and m["counts"]["rejected"] == {"invalid_utf8": 1}
        assert [r["id"] for r in out_rows(run, m)] == [f"{name}.parquet:0", f"{name}.parquet:2"]
    (rej,) = cat_rejected(tmp_path / "r_nested")
    assert rej["id"] == "nested.parquet:1" and "all_captions" in rej["detail"]


def test_truncated_inputs_keep_what_is_readable_and_say_so(tmp_path):
    lines = [{"TEXT": f"row {i} " + "w" * 200, "top_caption": "s"} for i in range(20_000)]
    data = b"".join(json.dumps(r).encode() + b"\n" for r in lines)
    blob = zstandard.ZstdCompressor().compress(data)
    (tmp_path / "cut.jsonl.zst").write_bytes(blob[: len(blob) // 2])
    text = json.dumps(lines[:50])
    (tmp_path / "cut.json").write_text(text[: len(text) // 2])
    m = shard([str(tmp_path / "cut.jsonl.zst"), str(tmp_path / "cut.json")], tmp_path / "r")
    rejected = cat_rejected(tmp_path / "r")
    assert m["counts"]["rejected"] == {"unparseable": 2}
    assert 1000 < m["counts"]["accepted"] < 20_000 + 25
    assert {r["source"] for r in rejected} == {"cut.jsonl.zst", "cut.json"}
    assert all("rest of file unread" in r["detail"] or "cut off" in r["detail"]
               for r in rejected)


def test_dedupe_fits_the_open_file_limit(tmp_path):
    """A huge input asks for up to 4096 id partitions, all open at once: with a low
    RLIMIT_NOFILE (1024 is common on clusters) the ingest must use fewer, not crash."""
    write_jsonl(tmp_path / "a.jsonl", [_rec(i, key=f"id{i % 700}") for i in range(1000)])
    code = (
        "import json, resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))\n"
        "import capsfus.ingest.shard as ing\n"
        "ing.partitions_for = lambda total_bytes: 4096\n"
        "m = ing.shard([sys.argv[1]], sys.argv[2], id_col='key', rows_per_shard=256)\n"
        "print(json.dumps(m['counts']))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.jsonl"),
                           str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    counts = json.loads(proc.stdout)
    assert counts["accepted"] == 700 and counts["rejected"] == {"duplicate_id": 300}
    m = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert [r["n"] for r in out_rows(tmp_path / "r", m)] == list(range(700))


def test_parquet_reader_memory_does_not_grow_with_the_file(tmp_path):
    """Arrow memory while streaming a parquet file stays near one row group, not the file
    (pyarrow's default pre_buffer would keep every row group read so far)."""
    from capsfus.ingest.sources import discover
    n, groups = 100_000, 25
    blob = os.urandom(n * 100).hex()               # incompressible: the file is ~20 MB
    text = [blob[i * 200:(i + 1) * 200] for i in range(n)]
    pq.write_table(pa.table({"TEXT": text, "top_caption": ["s"] * n}), tmp_path / "big.parquet",
                   row_group_size=n // groups)
    file_mb = (tmp_path / "big.parquet").stat().st_size / 2**20
    assert file_mb > 15
    peak, rows = 0, 0
    for rows, _ in enumerate(discover([str(tmp_path / "big.parquet")])[0].records(), 1):
        if rows % 2000 == 0:
            peak = max(peak, pa.total_allocated_bytes())
    assert rows == n
    assert peak / 2**20 < file_mb / 4, (peak / 2**20, file_mb)
