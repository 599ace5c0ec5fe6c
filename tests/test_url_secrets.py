"""Issue 13 item 4: credentials inside endpoint URLs (`?api-key=SECRET`, `user:SECRET@host`)
never reach a file of the run dir (decompressed), the terminal, a submission record or a
pickle; the worker still talks to the full URL (from the environment). Real CLI subprocesses
against tests/openai_server.py."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from openai_server import start_server
from runhelp import assert_exactly_once, capsfus, write_rows

KEY = "sk-url-4242-key"
SECRET = "s3cr3t-in-the-url-9731"


def _grep(folder: Path, needle: str) -> list[str]:
    import zstandard
    hits = []
    for p in folder.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            if p.name.endswith(".zst"):
                data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
            if needle.encode() in data:
                hits.append(str(p))
    return hits


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("srv"), key=KEY)
    yield srv
    srv.stop()


def _urls(base: str) -> list[str]:
    host = base.split("://", 1)[1]
    return [f"{base}?api-key={SECRET}", f"http://user:{SECRET}@{host}"]


@pytest.mark.parametrize("form", [0, 1])
def test_refused_key_with_secret_url_leaks_nothing(tmp_path, server, form):
    url = _urls(server.url)[form]
    run = tmp_path / "run"
    capsfus("shard", write_rows(tmp_path / "in.jsonl", 12), "--out", run, "--rows-per-shard", 6)
    p = capsfus("fuse", run, "--engine", "openai", "--model", "m", "--endpoint", url,
                "--chat-template", "off", check=False, OPENAI_API_KEY="sk-wrong-key")
    assert p.returncode != 0 and "refused the API key" in p.stdout + p.stderr
    assert SECRET not in p.stdout + p.stderr
    assert (run / "fuse" / "logs").exists() and (run / "fuse" / "state").exists()
    assert not _grep(run, SECRET)
    st = capsfus("status", run)
    assert SECRET not in st.stdout + st.stderr

    # the plan of a SLURM submission (job record + sbatch script) holds no secret either
    d = capsfus("submit", "fuse", run, "--engine", "openai", "--model", "m", "--endpoint",
                url, "--chat-template", "off", "--dry-run", "--max-array-size", 10,
                check=False)
    assert SECRET not in d.stdout + d.stderr
    assert not _grep(run, SECRET)


def test_worker_uses_the_full_url_but_stores_only_the_sanitized_one(tmp_path, server):
    url = _urls(server.url)[0]
    run = tmp_path / "run"
    capsfus("shard", write_rows(tmp_path / "in.jsonl", 12), "--out", run, "--rows-per-shard", 6)
    p = capsfus("fuse", run, "--engine", "openai", "--model", "m", "--endpoint", url,
                "--chat-template", "off", "--workers", 2, OPENAI_API_KEY=KEY)
    out, rej = assert_exactly_once(run)
    assert len(out) == 12 and not rej
    # the server saw the key in the query: the workers talked to the full URL
    assert any(SECRET in (r.get("query") or "") for r in server.requests())
    assert not _grep(run, SECRET) and SECRET not in p.stdout + p.stderr


def test_jobs_and_their_pickles_hold_the_sanitized_url(monkeypatch):
    from capsfus.cli.common import record_endpoint
    from capsfus.engines import EngineSpec
    from capsfus.errors import ENDPOINT_ENV
    from capsfus.stages.fuse import FuseJob
    monkeypatch.setenv(ENDPOINT_ENV, "")     # undone after the test, as record_endpoint's
    monkeypatch.delenv(ENDPOINT_ENV)
    for url in _urls("http://127.0.0.1:9"):
        spec = EngineSpec(engine="openai", model="m", endpoint=record_endpoint(url))
        job = FuseJob(run_dir="/tmp/x", stage="fuse", spec=spec)
        assert SECRET not in str(job.to_dict()) and SECRET.encode() not in pickle.dumps(job)
        import os
        assert os.environ[ENDPOINT_ENV] == url       # the full URL only in the environment


def test_a_sanitized_url_without_the_environment_is_a_clear_error(monkeypatch):
    from capsfus.engines.openai_client import runtime_endpoint
    from capsfus.errors import ENDPOINT_ENV, UserError, sanitize_url
    monkeypatch.delenv(ENDPOINT_ENV, raising=False)
    stored = sanitize_url(f"http://h:1/v1?api-key={SECRET}")
    assert "…" in sanitize_url(f"http://u:{SECRET}@h:1/v1")
    with pytest.raises(UserError, match=ENDPOINT_ENV):
        runtime_endpoint(stored)
    monkeypatch.setenv(ENDPOINT_ENV, f"http://h:1/v1?api-key={SECRET}")
    assert runtime_endpoint(stored) == f"http://h:1/v1?api-key={SECRET}"


@pytest.mark.parametrize("form", [0, 1])
def test_teacher_and_judge_with_secret_url_and_refused_key(tmp_path, server, form):
    url = _urls(server.url)[form]
    run = tmp_path / "run"
    capsfus("shard", write_rows(tmp_path / "in.jsonl", 12), "--out", run, "--rows-per-shard", 6)
    p = capsfus("teacher", run, "--endpoint", url, "--model", "m", "--sample", 6,
                "--backoff-base", "0.05", check=False, OPENAI_API_KEY="sk-wrong-key")
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert SECRET not in p.stdout + p.stderr and not _grep(run, SECRET)

    import json
    f = tmp_path / "c.jsonl"
    f.write_text("".join(json.dumps({"id": str(i), "raw": f"raw {i} words", "synthetic":
                                     f"a photo {i}", "fused": f"a photo of raw {i} words"})
                         + "\n" for i in range(4)))
    out = tmp_path / "eval"
    p = capsfus("eval", "-c", f, "--out", out, "--no-embeddings", "--judge-endpoint", url,
                "--judge-model", "m", "--judge-rows", 2, check=False,
                OPENAI_API_KEY="sk-wrong-key")
    assert "Traceback" not in p.stderr
    assert SECRET not in p.stdout + p.stderr and not _grep(out, SECRET)
    report = json.loads(next(out.glob("*.json")).read_text())
    assert report["judge"]["status"] == "not run" and "…" not in url
    if form == 0:   # the teacher and the judge asked the full URL
        assert sum(SECRET in (r.get("query") or "") for r in server.requests()) >= 2


def test_push_with_credentials_in_hf_endpoint_shows_none(hub, tmp_path):
    """HF_ENDPOINT of a proxy with user:SECRET@: a refused token and an unreachable Hub say
    where, without the secret."""
    import subprocess
    import sys

    from runhelp import REPO
    from test_hub_server import make_export, make_rows
    folder = make_export(tmp_path / "exp", make_rows(10), shards=1)
    host = hub.url.split("://", 1)[1]
    for endpoint, message in ((f"http://user:{SECRET}@{host}", "rejected by http://"),
                              (f"http://user:{SECRET}@127.0.0.1:9", "cannot reach http://")):
        p = subprocess.run([sys.executable, "-m", "capsfus.cli", "push", "dataset", str(folder),
                            "--repo", hub.repo_id(stem="sec")], capture_output=True, text=True,
                           timeout=240, cwd=REPO,
                           env=hub.env("hf_thisTokenIsNotKnownToTheServer000",
                                       HF_ENDPOINT=endpoint))
        assert p.returncode == 2 and message in p.stderr, p.stderr[-2000:]
        assert SECRET not in p.stdout + p.stderr and "Traceback" not in p.stderr


@pytest.mark.slurm
def test_slurm_workers_get_the_full_url_and_pickles_hold_none(slurm_cluster, server, tmp_path):
    """Submitted workers reach the endpoint with its credentials (from the environment sbatch
    passes on), while the submission record, the sbatch script and submitit's pickles hold only
    the sanitized URL."""
    from test_slurm_fuse import wait_jobs
    url = _urls(server.url)[0]
    run = tmp_path / "run"
    capsfus("shard", write_rows(tmp_path / "in.jsonl", 12), "--out", run, "--rows-per-shard", 6)
    before = len(server.requests())
    p = capsfus("submit", "fuse", run, "--engine", "openai", "--model", "m", "--endpoint", url,
                "--chat-template", "off", "--nodes", 1, "--gpus-per-node", 0,
                "--time", "00:05:00", OPENAI_API_KEY=KEY, SLURM_CONF=slurm_cluster.conf)
    wait_jobs(slurm_cluster, run)
    out, rej = assert_exactly_once(run)
    assert len(out) == 12 and not rej
    assert any(SECRET in (r.get("query") or "") for r in server.requests()[before:])
    pickles = list((run / "fuse" / "slurm").rglob("*.pkl"))
    assert pickles and list((run / "fuse" / "submissions").glob("*.json"))
    assert not _grep(run, SECRET) and SECRET not in p.stdout + p.stderr

    # a resume in a new shell: the credentials were never recorded, so it asks for them
    p = capsfus("resume", run, "--dry-run", check=False, SLURM_CONF=slurm_cluster.conf)
    assert p.returncode == 2 and "CAPSFUS_ENDPOINT_URL" in p.stderr
    assert "Traceback" not in p.stderr and SECRET not in p.stdout + p.stderr
    p = capsfus("resume", run, "--dry-run", CAPSFUS_ENDPOINT_URL=url,
                SLURM_CONF=slurm_cluster.conf)
    assert SECRET not in p.stdout + p.stderr


def test_sanitized_forms():
    from capsfus.errors import redact_url, sanitize_url
    assert sanitize_url(f"http://u:{SECRET}@h:8/v1") == "http://…@h:8/v1"
    assert sanitize_url(f"https://h/v1?api-key={SECRET}&api-version=2024-02-01") == \
        "https://h/v1?api-key=…&api-version=2024-02-01"
    assert sanitize_url("http://h:8000/v1") == "http://h:8000/v1"
    for url in _urls("http://h:8"):
        assert sanitize_url(sanitize_url(url)) == sanitize_url(url)
        text = f"POST {url}/chat/completions failed; key {SECRET}"
        assert SECRET not in redact_url(text, url)

