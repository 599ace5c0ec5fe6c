"""bench/gpu_check.sh, the one-call GPU measurement, run on the CPU with tiny architectures:
every part runs and lands in one JSON file; the server part drives the fake `vllm` (the real
one is not installed here) and says so when neither server can be found."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from fake_llm_server import install
from runhelp import REPO


def _check(tmp_path, parts: str, **env) -> dict:
    out = tmp_path / "check.json"
    p = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--tiny", "--out", str(out),
                        "--parts", parts, "--rows", "4", "--images", "8"],
                       capture_output=True, text=True, timeout=280, cwd=REPO,
                       env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
                            **env})
    assert p.returncode == 0, p.stdout + p.stderr
    return json.loads(out.read_text())


def test_gpu_check_runs_every_part_on_the_cpu(tmp_path):
    res = _check(tmp_path, "fusion,caption,train,servers")
    assert res["format"] == "capsfus-gpu-check" and res["tiny"] is True
    parts = res["parts"]
    assert {k: v["status"] for k, v in parts.items() if k != "servers"} == \
        {"fusion": "ok", "caption": "ok", "train": "ok"}
    fusion = parts["fusion"]["result"]["results"]
    assert set(fusion) == {"a", "b", "c"}
    assert all(v["captions_per_s"] > 0 for v in fusion.values())
    assert parts["caption"]["result"]["images_per_s_best"]["beam3/threaded"] > 0
    assert parts["train"]["result"]["tokens_per_s"] > 0
    assert "ZeRO-3" in parts["train"]["zero3"]
    assert parts["servers"]["status"].startswith("not installed")
    assert res["machine"]["gpu"] is None


def test_gpu_check_server_part_with_the_fake_vllm(tmp_path):
    extra = install(tmp_path / "fakebin")
    res = _check(tmp_path, "servers", CAPSFUS_FAKE_SERVER_DIR=str(tmp_path / "fake"),
                 TMPDIR=str(tmp_path), **extra)
    v = res["parts"]["servers"]["vllm"]
    assert v["status"] == "ok", v
    assert v["rows"] == 16 and v["captions_per_s"] > 0
    assert v["worker"]["runtime"]["server"] == "vllm"
    assert res["parts"]["servers"]["sglang"]["status"] in ("not installed", "ok")
