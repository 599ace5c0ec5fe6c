"""``capsfus push dataset`` / ``capsfus push model`` as real subprocesses against the local Hub
server, read back with the real ``datasets.load_dataset`` and ``from_pretrained``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest_hub import OTHER_TOKEN, READ_TOKEN, TOKENS, WRITE_TOKEN
from runhelp import REPO, write_rows
from test_hub_server import load_back, make_export, make_rows


def push(hub, *args, token=WRITE_TOKEN, check=True, timeout=240, **extra):
    p = subprocess.run([sys.executable, "-m", "capsfus.cli", "push", *map(str, args)],
                       capture_output=True, text=True, timeout=timeout, cwd=REPO,
                       env=hub.env(token, **extra))
    if check and p.returncode != 0:
        raise AssertionError(f"push exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def capsfus(hub, *args):
    p = subprocess.run([sys.executable, "-m", "capsfus.cli", *map(str, args)],
                       capture_output=True, text=True, timeout=240, cwd=REPO, env=hub.env())
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def assert_no_secret(*texts_or_dirs):
    """No test token in any text, nor in any file under the given folders."""
    for t in texts_or_dirs:
        if isinstance(t, Path):
            for f in t.rglob("*"):
                if f.is_file() and f.stat().st_size < 50_000_000:
                    data = f.read_bytes()
                    for tok in TOKENS:
                        assert tok.encode() not in data, f"token found in {f}"
        else:
            for tok in TOKENS:
                assert tok not in t, "token printed"


def parquet_rows(folder: Path) -> list[dict]:
    rows = []
    for f in sorted((folder / "data").glob("*.parquet")):
        rows += pq.read_table(f).to_pylist()
    return rows


def card_yaml(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("\n---\n", 1)[0][4:])


def test_push_run_export_round_trip(hub, tmp_path):
    """shard → fuse (echo) → export → push RUN; then --private --revision to a second repo;
    every row read back through load_dataset and streaming."""
    write_rows(tmp_path / "rows.jsonl", 1500)
    run = tmp_path / "RUN"
    capsfus(hub, "shard", tmp_path / "rows.jsonl", "--out", run, "--rows-per-shard", 500)
    capsfus(hub, "fuse", run, "--engine", "echo")
    p = push(hub, "dataset", run, "--repo", "capsorg/no-export", check=False)
    assert p.returncode == 2 and f"capsfus export {run} --out {run / 'export'}" in p.stderr
    capsfus(hub, "export", run, "--out", run / "export", "--no-stats")
    repo, private_repo = hub.repo_id(stem="run"), hub.repo_id(stem="run-private")
    p1 = push(hub, "dataset", run, "--repo", repo)
    p2 = push(hub, "dataset", run, "--repo", private_repo, "--private", "--revision", "v1")
    assert "done" in p1.stderr and "(v1, private)" in p2.stderr
    api = hub.api()
    assert not api.repo_info(repo, repo_type="dataset").private
    assert api.repo_info(private_repo, repo_type="dataset").private
    assert {b.name for b in api.list_repo_refs(private_repo, repo_type="dataset").branches} == \
        {"main", "v1"}
    want = parquet_rows(run / "export")
    assert len(want) == 1500
    pub, priv = load_back(hub, repo, also=[(private_repo, "v1")])
    for got in (pub, priv):
        assert got["rows"] == want and got["stream"] == want
        assert Counter(r["id"] for r in got["rows"]) == Counter(r["id"] for r in want)
    card = api.hf_hub_download(repo, "README.md", repo_type="dataset",
                               cache_dir=tmp_path / "c")
    meta = card_yaml(Path(card).read_text())
    assert meta["configs"][0]["data_files"]
    # pushing again changes nothing and sends nothing
    n = len(hub.events("lfs_upload"))
    push(hub, "dataset", run, "--repo", repo)
    assert len(hub.events("lfs_upload")) == n
    assert_no_secret(p1.stdout + p1.stderr + p2.stdout + p2.stderr, run)


def test_token_missing_invalid_read_only(hub, tmp_path):
    folder = make_export(tmp_path / "exp", make_rows(20), shards=1)
    repo = hub.repo_id(stem="tok")
    cases = [(None, "no Hugging Face token found"),
             ("hf_thisTokenIsNotKnownToTheServer000", "rejected"),
             (READ_TOKEN, "read-only"),
             (OTHER_TOKEN, "no write access")]          # bob, not a member of capsorg
    for token, message in cases:
        p = push(hub, "dataset", folder, "--repo", repo, token=token, check=False)
        assert p.returncode == 2, p.stderr
        assert message in p.stderr and "Traceback" not in p.stderr
        last = p.stderr.strip().splitlines()[-1]            # one line says what to do
        assert last.startswith("error: ") and message in last
        assert_no_secret(p.stdout + p.stderr)
        if token:
            assert token not in p.stdout + p.stderr
    assert hub.api().repo_exists(repo, repo_type="dataset") is False
    assert_no_secret(folder, hub.home, hub.root / "store")


def test_push_resumes_after_sigkill(hub, tmp_path):
    """The server hangs uploads after the first few; the push is SIGKILLed; the rerun sends
    only what the server does not hold, and the repo holds every row once."""
    rows = make_rows(4000, "k")
    folder = make_export(tmp_path / "exp", rows, shards=8)
    oids = {__import__("hashlib").sha256(f.read_bytes()).hexdigest()
            for f in (folder / "data").glob("*.parquet")}
    repo = hub.repo_id(stem="kill")
    hub.faults(stall_lfs_after=3)
    proc = subprocess.Popen([sys.executable, "-m", "capsfus.cli", "push", "dataset", str(folder),
                             "--repo", repo], cwd=REPO, env=hub.env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not any(e["oid"] in oids for e in hub.events("lfs_stall")):
        assert proc.poll() is None and time.time() < deadline, "push ended before the stall"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = [e["oid"] for e in hub.events("lfs_upload") if e["oid"] in oids]
    assert 3 <= len(first) < len(oids)
    assert not hub.api().file_exists(repo, "data/train-00000-of-00008.parquet",
                                     repo_type="dataset")   # nothing committed yet
    hub.faults()
    push(hub, "dataset", folder, "--repo", repo)
    uploads = Counter(e["oid"] for e in hub.events("lfs_upload") if e["oid"] in oids)
    assert set(uploads) == oids and max(uploads.values()) == 1   # none sent twice
    got = load_back(hub, repo)
    assert got["rows"] == rows and got["stream"] == rows


@pytest.mark.slow
def test_push_resumes_after_dropped_connections(hub, tmp_path):
    """Every LFS upload after the second loses its connection: the client's retries give up
    (~25 s), the push says how to resume, and the rerun completes without resending."""
    rows = make_rows(3000, "d")
    folder = make_export(tmp_path / "exp", rows, shards=6)
    oids = {__import__("hashlib").sha256(f.read_bytes()).hexdigest()
            for f in (folder / "data").glob("*.parquet")}
    repo = hub.repo_id(stem="drop")
    hub.faults(drop_lfs_after=2, drop_count=-1)
    p = push(hub, "dataset", folder, "--repo", repo, check=False, timeout=200)
    assert p.returncode == 2 and "rerun the same command to resume" in p.stderr, p.stderr
    first = {e["oid"] for e in hub.events("lfs_upload") if e["oid"] in oids}
    assert 2 <= len(first) < len(oids) and hub.events("lfs_drop")
    hub.faults()
    push(hub, "dataset", folder, "--repo", repo)
    uploads = Counter(e["oid"] for e in hub.events("lfs_upload") if e["oid"] in oids)
    assert set(uploads) == oids and max(uploads.values()) == 1
    assert load_back(hub, repo)["rows"] == rows


# ----------------------------------------------------------------------------- models
BASE = "meta-llama/Llama-2-13b-hf"
BASE_REV = "5c31dfb671ce7cfe2d7bb7c04375e44c55e815b1"
PROMPT = ("Merge the two captions into one.\nSentence 1: {raw}\nSentence 2: {synthetic}\n"
          "New Sentence:\n")


def make_checkpoint(src: Path, dst: Path, hf_home: Path) -> Path:
    """The tiny llama as a `capsfus train` output would look: prompt, training summary, a
    pickle beside the safetensors; the base model's card in the HF cache (licence source)."""
    shutil.copytree(src, dst)
    (dst / "prompt.txt").write_text(PROMPT)
    (dst / "training_args.bin").write_bytes(b"\x80\x04pickle")
    (dst / "capsfus_training.json").write_text(json.dumps({
        "base_model": BASE, "base_revision": BASE_REV, "world_size": 2,
        "config": {"learning_rate": 1e-5, "epochs": 2.0, "global_batch_size": 128,
                   "warmup_steps": 500, "lr_scheduler": "cosine"},
        "data": {"counts": {"train": 990, "heldout": 10}, "seq_len": 256, "chat": False},
        "eval_loss": 1.2345, "prompt_sha256": "ab" * 32}))
    snap = hf_home / "hub" / f"models--{BASE.replace('/', '--')}" / "snapshots" / BASE_REV
    snap.mkdir(parents=True, exist_ok=True)
    (snap / "README.md").write_text("---\nlicense: llama2\nlanguage:\n- en\n---\n# Llama 2\n")
    return dst


def test_push_model_and_load_back(hub, tiny_llama_dir, tmp_path):
    ckpt = make_checkpoint(Path(tiny_llama_dir), tmp_path / "ckpt", hub.home)
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    repo = hub.repo_id(stem="CapsFus-tiny")
    p = push(hub, "model", ckpt, "--repo", repo)
    assert "training_args.bin" in p.stderr and "llama2" in p.stderr
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before   # ckpt untouched
    api = hub.api()
    files = {f.path for f in api.list_repo_tree(repo, recursive=True)}
    assert "model.safetensors" in files and "README.md" in files and "prompt.txt" in files
    assert {"config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= files
    assert not any(f.endswith((".bin", ".pt")) for f in files)
    assert "capsfus_training.json" not in files
    assert Path(api.hf_hub_download(repo, "prompt.txt", cache_dir=tmp_path / "c")
                ).read_text() == PROMPT
    card = Path(api.hf_hub_download(repo, "README.md", cache_dir=tmp_path / "c")).read_text()
    meta = card_yaml(card)
    assert meta["license"] == "llama2" and meta["base_model"] == BASE
    assert meta["pipeline_tag"] == "text-generation" and "capsfusion" in meta["tags"]
    assert "New Sentence:" in card and "eval_loss = 1.234" in card and "| learning_rate |" in card
    snippets = card.split("```python\n")
    tf_snippet = snippets[1].split("\n```")[0]
    vllm_snippet = snippets[2].split("\n```")[0]
    compile(vllm_snippet, "vllm_snippet", "exec")          # vLLM cannot run here
    assert "beam_search" in vllm_snippet and "LLM(" in vllm_snippet
    got = hub.python(f"""
        import contextlib, io, json, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        remote = AutoModelForCausalLM.from_pretrained({repo!r})
        local = AutoModelForCausalLM.from_pretrained({str(ckpt)!r})
        tok = AutoTokenizer.from_pretrained({repo!r})
        ids = tok(["a red car on the street"], return_tensors="pt")
        with torch.no_grad():
            diff = (remote(**ids).logits - local(**ids).logits).abs().max().item()
        same = all(torch.equal(a, b) for a, b in zip(remote.state_dict().values(),
                                                      local.state_dict().values()))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec({tf_snippet!r}, {{}})                  # the card's snippet, as printed
        print(json.dumps({{"diff": diff, "same": same, "snippet": out.getvalue()}}))
    """)
    assert got["same"] and got["diff"] == 0.0
    import ast
    fused = ast.literal_eval(got["snippet"].strip().splitlines()[-1])   # the printed list
    assert isinstance(fused, list) and len(fused) == 1 and isinstance(fused[0], str)


def test_push_model_refuses_pickles(hub, tmp_path):
    ckpt = tmp_path / "pickled"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    repo = hub.repo_id(stem="pickled")
    p = push(hub, "model", ckpt, "--repo", repo, check=False)
    assert p.returncode == 2 and "pytorch_model.bin" in p.stderr and "safetensors" in p.stderr
    assert "Traceback" not in p.stderr
    assert not hub.api().repo_exists(repo)
    # with safetensors beside the pickle: the pickle is left out, the default prompt shipped
    import numpy as np
    from safetensors.numpy import save_file

    from capsfus.prompt import PromptTemplate
    save_file({"w": np.zeros(4, dtype=np.float32)}, str(ckpt / "model.safetensors"))
    p = push(hub, "model", ckpt, "--repo", repo)
    assert "pytorch_model.bin" in p.stderr and "license" in p.stderr
    files = {f.path for f in hub.api().list_repo_tree(repo)}
    assert files == {".gitattributes", "README.md", "config.json", "model.safetensors",
                     "prompt.txt"}
    shipped = hub.api().hf_hub_download(repo, "prompt.txt", cache_dir=tmp_path / "c")
    t, default = PromptTemplate.from_file(shipped), PromptTemplate()
    assert t.render_text("a b", "c d") + t.cue == default.render_text("a b", "c d") + default.cue


def test_model_card_without_known_license(tiny_llama_dir, tmp_path, monkeypatch):
    """No training summary and no base card: no license field (never invented), the default
    prompt, and snippets that compile."""
    from capsfus.hub.model_card import render_model_card
    from capsfus.prompt import DEFAULT_BODY
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-home"))
    text, facts = render_model_card(Path(tiny_llama_dir), "org/CapsFus-LLaMA-13B")
    meta = card_yaml(text)
    assert "license" not in meta and "base_model" not in meta and facts["license"] is None
    assert meta["pipeline_tag"] == "text-generation"
    assert "No licence is declared" in text and "No training summary" in text
    assert DEFAULT_BODY.split("\n")[0] in text
    for block in text.split("```python\n")[1:]:
        compile(block.split("\n```")[0], "snippet", "exec")
    text, facts = render_model_card(Path(tiny_llama_dir), "org/x", license="apache-2.0")
    assert card_yaml(text)["license"] == "apache-2.0"


def test_chat_model_card_snippet_runs(tiny_llama_chat_dir, tmp_path):
    """A checkpoint trained through its chat template: the card's transformers snippet uses
    apply_chat_template, and runs as printed (here on the local folder, offline)."""
    from capsfus.hub.model_card import render_model_card
    ckpt = tmp_path / "chat"
    shutil.copytree(tiny_llama_chat_dir, ckpt)
    (ckpt / "capsfus_training.json").write_text(json.dumps({"base_model": "some/base",
                                                            "data": {"chat": True}}))
    text, _ = render_model_card(ckpt, str(ckpt))
    snippet = text.split("```python\n")[1].split("\n```")[0]
    assert "apply_chat_template" in snippet
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    p = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True,
                       timeout=240, env={**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    import ast
    fused = ast.literal_eval(p.stdout.strip().splitlines()[-1])   # the printed list
    assert isinstance(fused, list) and len(fused) == 1 and isinstance(fused[0], str)


@pytest.mark.slow
def test_push_killed_at_random_moments(hub, tmp_path):
    """SIGKILL the push at random moments (hashing, batch, mid-upload, commit) a few times,
    then let it finish: no object is stored twice and every row is there once."""
    import random
    rng = random.Random(5)
    rows = make_rows(6000, "rnd")
    folder = make_export(tmp_path / "exp", rows, shards=6)
    oids = {__import__("hashlib").sha256(f.read_bytes()).hexdigest()
            for f in (folder / "data").glob("*.parquet")}
    repo = hub.repo_id(stem="random-kill")
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "capsfus.cli", "push", "dataset",
                                 str(folder), "--repo", repo], cwd=REPO, env=hub.env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.0, 4.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    push(hub, "dataset", folder, "--repo", repo)
    uploads = Counter(e["oid"] for e in hub.events("lfs_upload") if e["oid"] in oids)
    assert set(uploads) == oids and max(uploads.values()) == 1
    got = load_back(hub, repo)
    assert got["rows"] == rows and got["stream"] == rows
