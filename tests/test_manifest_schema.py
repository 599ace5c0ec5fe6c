"""Manifest and state files of a real run validate against the published JSON schemas, and so
do the examples in manifests/."""

from __future__ import annotations

import json

import jsonschema
from runhelp import REPO, capsfus, write_rows

from capsfus.rundir.io import read_json


def _schema(name: str) -> dict:
    return json.loads((REPO / "manifests" / name).read_text())


def test_real_run_files_match_the_schemas(tmp_path):
    run = tmp_path / "run"
    capsfus("shard", write_rows(tmp_path / "in.jsonl", 30), "--out", run, "--rows-per-shard", 10)
    capsfus("fuse", run, "--engine", "echo", "--chunk-size", 4, "--shards", "0-1")
    jsonschema.validate(read_json(run / "manifest.json"), _schema("manifest.schema.json"))
    states = sorted((run / "fuse" / "state").glob("*.json"))
    assert len(states) == 2
    for p in states:
        jsonschema.validate(read_json(p), _schema("state.schema.json"))
    # a shard stopped mid-way has chunks listed: that state validates too
    capsfus("fuse", run, "--engine", "echo", "--chunk-size", 4, "--shards", "2", check=False,
            CAPSFUS_CRASH_AT="after_state:1")
    st = read_json(run / "fuse" / "state" / "00002.json")
    assert st["chunks"]
    jsonschema.validate(st, _schema("state.schema.json"))


def test_examples_match_the_schemas():
    jsonschema.validate(read_json(REPO / "manifests" / "example.manifest.json"),
                        _schema("manifest.schema.json"))
    jsonschema.validate(read_json(REPO / "manifests" / "example.state.json"),
                        _schema("state.schema.json"))
    # a schema that accepted anything would make these tests pointless
    bad = read_json(REPO / "manifests" / "example.state.json")
    bad["status"] = "finished"
    try:
        jsonschema.validate(bad, _schema("state.schema.json"))
    except jsonschema.ValidationError:
        pass
    else:
        raise AssertionError("the state schema accepted an unknown status")
