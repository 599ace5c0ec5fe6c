"""capsfus plan: the paper's run (~12 days at ~1 caption/s/GPU on 128 GPUs), wave and array
arithmetic, measured bytes per row, --from-bench."""

from __future__ import annotations

import json
import math

import pytest
from runhelp import SHARED_SAMPLE, capsfus

from capsfus.executors.slurm import split_arrays
from capsfus.perf.plan import MEASURED, PAPER, make_plan, measure_sample


def test_paper_run_takes_about_twelve_days():
    p = make_plan(PAPER["rows"], PAPER["gpus"], 1.0)
    f = p["fuse"]
    assert f["ideal_wall_days"] == pytest.approx(127_897_754 / 128 / 86400)   # 11.56
    assert 11.0 < f["wall_days"] < 12.5
    assert f["gpu_hours"] == pytest.approx(127_897_754 / 3600)
    assert f["shards"] == 1279 and f["workers"] == 128 and f["nodes"] == 16
    assert f["waves"] == 10 and f["arrays"] == [128]
    # 100k rows at 1 caption/s is 27.8 h: over a 24 h limit, so the plan says so
    assert f["shard_hours"] == pytest.approx(100_000 / 3600) and "requeued" in f["note"]
    assert p["filter"]["kept_rows"] == round(PAPER["rows"] * MEASURED["keep_share"])
    assert p["export"]["hub_bytes"] == pytest.approx(
        p["filter"]["kept_rows"] * MEASURED["bytes_per_row_parquet"])


def test_waves_and_arrays_by_hand():
    # 250 rows in shards of 100 on 2 GPUs at 1 caption/s: shards 100, 100, 50; the third
    # runs alone after the first two: 100 s + 50 s
    p = make_plan(250, 2, 1.0, rows_per_shard=100)["fuse"]
    assert (p["shards"], p["waves"]) == (3, 2)
    assert p["wall_days"] * 86400 == pytest.approx(150)
    assert p["ideal_wall_days"] * 86400 == pytest.approx(125)
    # more GPUs than shards: the extra GPUs get no worker
    assert make_plan(250, 8, 1.0, rows_per_shard=100)["fuse"]["workers"] == 3
    # MaxArraySize splitting is the SLURM executor's own
    q = make_plan(10**8, 2500, 2.0, max_array_size=1001)["fuse"]
    assert q["arrays"] == split_arrays(1000, 1001) == [1000]
    q = make_plan(10**9, 2500, 2.0, max_array_size=1001)["fuse"]
    assert q["arrays"] == split_arrays(2500, 1001) == [834, 833, 833]
    assert sum(q["arrays"]) == q["workers"] == 2500


def test_plan_cli_json_and_errors(tmp_path):
    p = capsfus("plan", "--rows", 127897754, "--gpus", 128, "--throughput", 1, "--json")
    plan = json.loads(p.stdout)
    assert 11.0 < plan["fuse"]["wall_days"] < 12.5
    p = capsfus("plan", "--rows", 127897754, "--gpus", 128, "--throughput", 1)
    assert "11.57 days" in p.stdout and "paper: about 12 days" in p.stdout
    for args in ([], ["--throughput", 1, "--from-bench", __file__]):
        p = capsfus("plan", "--rows", 10, "--gpus", 1, *args, check=False)
        assert p.returncode == 2 and "error:" in p.stderr and "Traceback" not in p.stderr
    for args in (["--gpus-per-node", 0], ["--time-limit-h", 0], ["--filter-workers", -1]):
        p = capsfus("plan", "--rows", 10, "--gpus", 1, "--throughput", 1, *args, check=False)
        assert p.returncode == 2 and args[0] in p.stderr and "Traceback" not in p.stderr
    bad = tmp_path / "b.json"
    bad.write_text("{}")
    p = capsfus("plan", "--rows", 10, "--gpus", 1, "--from-bench", bad, check=False)
    assert p.returncode == 2 and "not a `capsfus bench fuse` result" in p.stderr


def test_built_in_figures_match_a_fresh_measurement():
    m = measure_sample(str(SHARED_SAMPLE))
    assert m["rows"] == 10_000
    for k in ("bytes_per_row_input", "bytes_per_row_fused", "bytes_per_row_filtered",
              "bytes_per_row_parquet", "keep_share"):
        assert m[k] == pytest.approx(MEASURED[k], rel=0.10), k
    # fused rows hold the input plus the fused caption: more bytes, not less
    assert m["bytes_per_row_fused"] > m["bytes_per_row_input"]
    assert m["filter_rows_per_s"] > 100 and m["export_rows_per_s"] > 100
    p = make_plan(1_000_000, 8, 1.0, measured=m)
    assert p["fuse"]["output_bytes"] == pytest.approx(1_000_000 * m["bytes_per_row_fused"])
    assert math.isclose(p["filter"]["keep_share"], m["keep_share"])
