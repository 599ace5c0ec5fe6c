"""CLI surface: every command explains itself, presets, and clear one-line errors."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from runhelp import REPO, capsfus, write_rows

from capsfus.cli import main


def _commands(group, prefix=()):
    for name, cmd in group.commands.items():
        yield prefix + (name,), cmd
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, prefix + (name,))


@pytest.mark.parametrize("path", [p for p, _ in _commands(main)], ids=" ".join)
def test_every_command_has_help(path):
    r = CliRunner().invoke(main, [*path, "--help"])
    assert r.exit_code == 0, r.output
    assert "Usage:" in r.output and len(r.output.split("\n\n")[1].strip()) > 20


def test_preset_sets_defaults_and_flags_win(tmp_path):
    run = tmp_path / "run"
    capsfus("shard", write_rows(tmp_path / "in.jsonl", 12), "--out", run)
    capsfus("fuse", run, "--preset", REPO / "jobs" / "fuse-echo-dry-run.yaml",
            "--max-new-tokens", 7)
    cfg = json.loads((run / "fuse" / "config.json").read_text())
    assert cfg["settings"]["engine"] == "echo"
    assert cfg["settings"]["decoding"]["max_new_tokens"] == 7
    bad = tmp_path / "bad.yaml"
    bad.write_text("no_such_option: 1\n")
    p = capsfus("fuse", run, "--preset", bad, check=False)
    assert p.returncode == 2 and "no_such_option" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("args,needle", [
    (["status", "/nonexistent/run"], "no such run directory"),
    (["fuse", "/nonexistent/run", "--engine", "echo"], "no such run directory"),
    (["cat", "{tmp}"], "not a capsfus run"),
    (["fuse", "{run}", "--engine", "echo", "--shards", "5-9"], "the run has shards 0-0"),
    (["fuse", "{run}", "--engine", "transformers"], "needs --model"),
    (["fuse", "{run}", "--engine", "transformers", "--model", "{tmp}/no-model"], "model"),
    (["cat", "{run}", "--stage", "fuse@nope"], "does not exist"),
])
def test_clear_errors_without_traceback(tmp_path, args, needle):
    run = tmp_path / "run"
    capsfus("shard", write_rows(tmp_path / "in.jsonl", 5), "--out", run)
    args = [a.format(tmp=tmp_path, run=run) for a in args]
    p = capsfus(*args, check=False)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr, p.stderr
    err = p.stderr.strip().splitlines()
    assert err and err[-1].startswith(("error:", "Error:")) and needle in p.stderr, p.stderr
