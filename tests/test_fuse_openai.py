"""`capsfus fuse --engine openai`: fusion through an OpenAI-compatible endpoint (a `vllm serve`
on a cluster), against the local test server (tests/openai_server.py) with injected faults."""

from __future__ import annotations

import json
import os
from pathlib import Path

from openai_server import fusion_answer, start_server  # noqa: E402
from runhelp import assert_exactly_once, capsfus, write_rows

from capsfus.prompt import PromptTemplate, clean_caption

KEY = "sk-fuse-4242-secret"


def _prompt(row: dict, chat: bool) -> str:
    t = PromptTemplate()
    text = t.render_text(clean_caption(row["raw"]), clean_caption(row["synthetic"]))
    return text if chat else text + t.cue


def _grep_key(folder: Path) -> list[str]:
    hits = []
    for p in folder.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            if p.suffix == ".zst":
                import zstandard
                data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
            if KEY.encode() in data:
                hits.append(str(p))
    return hits


def test_fuse_through_an_endpoint_with_faults_exactly_once(tmp_path):
    srv = start_server(tmp_path / "srv", key=KEY, faults="429,500,malformed,drop",
                       fault_rate=0.15, retry_after=0.1, always_fail="row 13 ")
    try:
        run = tmp_path / "run"
        capsfus("shard", write_rows(tmp_path / "in.jsonl", 24), "--out", run,
                "--rows-per-shard", 12)
        p = capsfus("fuse", run, "--engine", "openai", "--model", "capsfus-llama",
                    "--endpoint", srv.url, "--chat-template", "off", "--chunk-size", 8,
                    "--max-attempts", 2, OPENAI_API_KEY=KEY)
        out, rej = assert_exactly_once(run)
        # every row got its own answer (the server tags each with its prompt's hash)
        for r in out:
            assert r["fused"] == fusion_answer(_prompt(r, chat=False))
        # the row the endpoint always fails is bisected out and rejected, the rest go on
        assert [(r["raw"].split(" alt")[0], r["reason"]) for r in rej] == \
            [("row 13", "generation_error")]
        cfg = json.loads((run / "fuse" / "config.json").read_text())
        assert cfg["settings"]["engine"] == "openai" and srv.url not in json.dumps(cfg)
        assert not _grep_key(run) and KEY not in p.stdout + p.stderr
        faults = {r["fault"] for r in srv.requests() if r["fault"]}
        assert {"429", "500"} <= faults
    finally:
        srv.stop()


def test_chat_api_and_clear_errors(tmp_path):
    srv = start_server(tmp_path / "srv", key=KEY)
    try:
        run = tmp_path / "run"
        capsfus("shard", write_rows(tmp_path / "in.jsonl", 6), "--out", run)
        base = ["fuse", run, "--engine", "openai", "--model", "m", "--endpoint", srv.url]
        env_wo_key = {k: "" for k in ("OPENAI_API_KEY",) if k in os.environ}
        p = capsfus(*base, "--num-beams", "3", check=False, OPENAI_API_KEY=KEY)
        assert p.returncode == 2 and "--num-beams 1" in p.stderr
        p = capsfus(*base, "--force", check=False, **env_wo_key)
        assert p.returncode == 2 and "OPENAI_API_KEY" in p.stderr and "Traceback" not in p.stderr
        p = capsfus(*base, check=False, OPENAI_API_KEY="sk-wrong-key")
        assert p.returncode != 0 and "sk-wrong-key" not in p.stdout + p.stderr
        assert "refused the API key (401)" in p.stderr and "Traceback" not in p.stderr
        capsfus(*base, "--api-key-env", "MY_KEY", MY_KEY=KEY)
        out, rej = assert_exactly_once(run)
        assert not rej
        for r in out:
            assert r["fused"] == fusion_answer(_prompt(r, chat=True))
        assert {r["path"].rsplit("/", 1)[-1] for r in srv.requests() if r["key_ok"]} == \
            {"completions"} and all("chat" in r["path"] for r in srv.requests() if r["key_ok"])
    finally:
        srv.stop()
