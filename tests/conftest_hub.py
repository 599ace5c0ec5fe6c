"""The ``hub`` fixture: tests/hub_server.py started as a real subprocess on a free port, and
helpers to talk to it with the real clients.

``hub.env`` is what a client process needs (HF_ENDPOINT, HF_HUB_DISABLE_XET=1 since the server
speaks git-LFS only, a private HF_HOME, HF_TOKEN); ``hub.api()`` is an ``HfApi`` bound to the
server; ``hub.events()`` reads the server's event log; ``hub.faults(...)`` sets fault injection.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
WRITE_TOKEN = "hf_capsfusTestWrite" + "Qx7" * 8          # user alice, member of org "capsorg"
READ_TOKEN = "hf_capsfusTestRead" + "Zr4" * 8            # user alice, read-only
OTHER_TOKEN = "hf_capsfusTestBob" + "Mn2" * 8            # user bob, no orgs
TOKENS = {WRITE_TOKEN: {"user": "alice", "role": "write", "orgs": ["capsorg"]},
          READ_TOKEN: {"user": "alice", "role": "read", "orgs": ["capsorg"]},
          OTHER_TOKEN: {"user": "bob", "role": "write", "orgs": []}}


class HubServer:
    def __init__(self, root: Path, home: Path):
        self.root = root
        self.home = home
        root.mkdir(parents=True, exist_ok=True)
        (root / "tokens.json").write_text(json.dumps(TOKENS))
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "hub_server.py"), "--root", str(root / "store"),
             "--tokens", str(root / "tokens.json")],
            stdout=subprocess.PIPE, stderr=open(root / "server.log", "w"), text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            self.proc.kill()
            raise RuntimeError(f"hub server did not start: {line!r} "
                               f"{(root / 'server.log').read_text()[-2000:]}")
        self.url = line.split()[1]

    def env(self, token: str | None = WRITE_TOKEN, **extra) -> dict:
        """Environment of a client process: this server, no Xet, a private HF_HOME."""
        e = dict(os.environ)
        for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                  "TRANSFORMERS_OFFLINE"):
            e.pop(k, None)
        e.update({"HF_ENDPOINT": self.url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(self.home),
                  "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1",
                  "HF_HUB_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "1",
                  "PYTHONUNBUFFERED": "1", "HF_HUB_ETAG_TIMEOUT": "30",
                  "HF_HUB_DOWNLOAD_TIMEOUT": "30"})
        if token:
            e["HF_TOKEN"] = token
        e.update({k: str(v) for k, v in extra.items()})
        return e

    def api(self, token: str | None = WRITE_TOKEN):
        from huggingface_hub import HfApi
        return HfApi(endpoint=self.url, token=token if token else False)

    def repo_id(self, ns: str = "capsorg", stem: str = "t") -> str:
        return f"{ns}/{stem}-{uuid.uuid4().hex[:8]}"

    def events(self, kind: str | None = None) -> list[dict]:
        p = self.root / "store" / "events.jsonl"
        if not p.exists():
            return []
        ev = [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
        return [e for e in ev if kind is None or e["event"] == kind]

    def faults(self, **faults) -> None:
        import urllib.request
        req = urllib.request.Request(self.url + "/_test/faults", data=json.dumps(faults).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=10).read()

    def python(self, code: str, token: str | None = WRITE_TOKEN, timeout=240, **extra):
        """Runs ``code`` in a fresh interpreter with this server's environment; returns the
        JSON it prints on its last stdout line."""
        p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                           text=True, timeout=timeout, env=self.env(token, **extra))
        if p.returncode != 0:
            raise AssertionError(f"client exited {p.returncode}\n{p.stderr[-4000:]}")
        return json.loads(p.stdout.strip().splitlines()[-1])

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="session")
def hub_session(tmp_path_factory):
    server = HubServer(tmp_path_factory.mktemp("hub"), tmp_path_factory.mktemp("hf-home"))
    yield server
    server.stop()


@pytest.fixture
def hub(hub_session, monkeypatch):
    """The session's Hub server with faults cleared; in this process huggingface_hub uploads
    over git-LFS (the server has no Xet)."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    hub_session.faults()
    yield hub_session
    hub_session.faults()
