"""Done means current across caption → fuse / teacher (issue 13 item 2): when captions are
redone, the fusions and teacher answers made from the old captions are stale; a stage refuses
to read a stale caption shard; each stage redoes exactly what is stale. Real CLI runs: a tiny
random BLIP, the echo engine, and the local OpenAI-compatible server for the teacher."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from openai_server import start_server
from runhelp import assert_exactly_once, capsfus, stage_rows
from test_caption import build_tiny_blip, captioned_run

KEY = "sk-stale-caption-1"


@pytest.fixture(scope="module")
def blip(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-blip")
    build_tiny_blip(folder)
    return folder


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def _counts(run: Path) -> dict:
    st = json.loads(capsfus("status", run, "--json").stdout)
    return {s["stage"]: s["counts"] for s in st["stages"] if s.get("exists")}


@pytest.mark.slow
def test_redone_captions_make_fusions_and_teacher_answers_stale(tmp_path, blip):
    run, cap = captioned_run(tmp_path, blip)
    srv = start_server(tmp_path / "srv", key=KEY)
    try:
        teach = ["teacher", run, "--endpoint", srv.url, "--model", "m", "--sample", 6,
                 "--backoff-base", "0.05"]
        capsfus("fuse", run, "--engine", "echo")
        capsfus(*teach, OPENAI_API_KEY=KEY)
        c = _counts(run)
        assert c["fuse"]["done"] == 2 and c["teacher"]["stale"] == 0

        # captions redone with other settings on shard 0 only
        capsfus(*cap, "--overwrite", "--force", "--shards", 0)
        c = _counts(run)
        assert c["caption"]["done"] == 1 and c["caption"]["stale"] == 1
        assert c["fuse"]["stale"] == 2 and c["fuse"]["done"] == 0
        assert c["teacher"]["done"] == 0 and c["teacher"]["stale"] >= 1
        for cmd in (["fuse", run, "--engine", "echo"], [*teach]):
            p = capsfus(*cmd, check=False, OPENAI_API_KEY=KEY)
            err = _flat(p.stderr)
            assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
            assert "stage caption has 1 stale shard(s) (1:" in err and "capsfus caption" in err
        p = capsfus("export", run, "--out", tmp_path / "export", check=False)
        assert p.returncode == 2 and "stage caption has 1 stale shard(s)" in _flat(p.stderr)

        # the same caption command without --shards redoes only the stale shard; then fuse and
        # teacher redo theirs, from the new captions
        capsfus(*cap, "--overwrite")
        assert _counts(run)["caption"] == {**_counts(run)["caption"], "done": 2, "stale": 0}
        capsfus("fuse", run, "--engine", "echo")
        capsfus(*teach, OPENAI_API_KEY=KEY)
        c = _counts(run)
        assert c["fuse"]["done"] == 2 and c["fuse"]["stale"] == 0
        assert c["teacher"]["stale"] == 0
        captions = {r["id"]: r["synthetic"] for r in assert_exactly_once(run, "caption")[0]}
        fused, _ = stage_rows(run, "fuse")
        assert fused and all(r["synthetic"] == captions[r["id"]] for r in fused)
        taught, _ = stage_rows(run, "teacher")
        assert taught and all(r["synthetic"] == captions[r["id"]] for r in taught)
        capsfus("export", run, "--out", tmp_path / "export")
    finally:
        srv.stop()
