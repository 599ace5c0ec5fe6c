"""An inference server (vLLM or SGLang) run by one worker on its own GPU(s): the command line,
the per-task environment, start on a free port, readiness, stop.

The command lines follow the servers' documented CLIs (the most stable interface they have):

- vLLM: ``vllm serve MODEL --host 127.0.0.1 --port P --served-model-name NAME
  --tensor-parallel-size N --gpu-memory-utilization F --max-num-seqs S --dtype D
  --enable-prefix-caching | --no-enable-prefix-caching [--max-model-len L]``
- SGLang: ``python -m sglang.launch_server --model-path MODEL --host 127.0.0.1 --port P
  --served-model-name NAME --tp-size N --mem-fraction-static F --max-running-requests S --dtype D
  [--disable-radix-cache] [--context-length L]``

Readiness is ``GET /v1/models`` answering 200 (both servers serve it once the model is
loaded; vLLM's ``/health`` answers earlier on some versions). Until then the server's exit or
the startup timeout ends the wait with the last lines of its log.

Each start runs under ``capsfus.engines.server_guard`` in a new process group, so stopping
kills the server's whole group, and the guard kills it when the worker dies (even ``kill
-9``). Compile caches (vLLM's, Triton's, inductor's, …) go to a per-task folder on local disk:
many tasks starting at once on a shared filesystem corrupt each other's otherwise. Weights come
from the shared ``HF_HUB_CACHE`` (resolved before submission), offline.

Untested against real vLLM/SGLang here (no GPU, no wheel): tests drive fake executables that
speak the same command line and HTTP API.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger("capsfus.server")

SERVER_KINDS = {"vllm-server": "vllm", "sglang-server": "sglang"}

# what the servers compile or cache at start, per task (values: sub-folder names)
CACHE_VARS = {"VLLM_CACHE_ROOT": "vllm", "TRITON_CACHE_DIR": "triton",
              "TORCHINDUCTOR_CACHE_DIR": "inductor", "XDG_CACHE_HOME": "xdg",
              "FLASHINFER_WORKSPACE_BASE": "flashinfer", "OUTLINES_CACHE_DIR": "outlines",
              "CUDA_CACHE_PATH": "nv", "TORCH_EXTENSIONS_DIR": "torch_extensions",
              "SGLANG_CACHE_DIR": "sglang"}


class ServerError(RuntimeError):
    """The server could not be started or made ready (the message holds its last log lines)."""


class EngineServerDied(RuntimeError):
    """The worker's inference server died again after its one restart. Not a row's fault, so
    not a ``GenerationError``: the shard fails with its rows untouched (none rejected), and
    the worker's engine is counted as failing: the run dir's runner reads ``engine_failing``
    (engines import no run-dir code) and the worker takes no more shards."""

    engine_failing = True


@dataclass
class ServerOptions:
    """The server's own settings (flags / preset). ``dtype`` shapes output and is in the
    stage settings; the rest are recorded as runtime."""

    max_num_seqs: int = 256
    mem_fraction: float = 0.90
    prefix_caching: bool = True
    max_model_len: int | None = None
    startup_timeout: float = 1800.0
    extra_args: list[str] = field(default_factory=list)
    cache_dir: str | None = None       # default: node-local $TMPDIR

    def to_dict(self) -> dict:
        return asdict(self)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tensor_parallel(requested: int) -> int:
    """``--tensor-parallel-size`` when > 1, else every GPU SLURM gave this task
    (``--gpus-per-task``), else 1."""
    if requested and requested > 1:
        return requested
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return max(1, len(visible))


def server_command(kind: str, model_path: str, served_name: str, port: int, tp: int,
                   dtype: str, opts: ServerOptions) -> list[str]:
    if kind == "vllm":
        cmd = ["vllm", "serve", model_path, "--host", "127.0.0.1", "--port", str(port),
               "--served-model-name", served_name, "--tensor-parallel-size", str(tp),
               "--gpu-memory-utilization", str(opts.mem_fraction),
               "--max-num-seqs", str(opts.max_num_seqs), "--dtype", dtype,
               "--enable-prefix-caching" if opts.prefix_caching else "--no-enable-prefix-caching"]
        if opts.max_model_len:
            cmd += ["--max-model-len", str(opts.max_model_len)]
    elif kind == "sglang":
        cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", model_path,
               "--host", "127.0.0.1", "--port", str(port), "--served-model-name", served_name,
               "--tp-size", str(tp), "--mem-fraction-static", str(opts.mem_fraction),
               "--max-running-requests", str(opts.max_num_seqs), "--dtype", dtype]
        if not opts.prefix_caching:
            cmd.append("--disable-radix-cache")
        if opts.max_model_len:
            cmd += ["--context-length", str(opts.max_model_len)]
    else:
        raise ValueError(f"unknown server kind {kind!r}")
    return cmd + list(opts.extra_args)


def server_env(cache_root: Path) -> dict:
    """This process's environment plus per-task cache folders; the Hub cache stays the shared
    one (pinned before XDG_CACHE_HOME moves) and offline."""
    from huggingface_hub import constants
    env = dict(os.environ)
    env.setdefault("HF_HUB_CACHE", str(constants.HF_HUB_CACHE))
    env.setdefault("HF_HOME", str(constants.HF_HOME))
    for var, sub in CACHE_VARS.items():
        p = cache_root / sub
        p.mkdir(parents=True, exist_ok=True)
        env[var] = str(p)
    env.update(HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
               PYTHONUNBUFFERED="1")
    return env


def tail(path: Path, n: int = 20) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 64 * 1024))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


class ServerProcess:
    """One server of this worker: ``start()`` (free port, wait until ready), ``alive()``,
    ``stop()``. ``log_path`` receives the server's stdout and stderr (appended across
    restarts)."""

    def __init__(self, kind: str, model_path: str, served_name: str, tp: int, dtype: str,
                 opts: ServerOptions, log_path: Path, cache_root: Path):
        self.kind, self.model_path, self.served_name = kind, model_path, served_name
        self.tp, self.dtype, self.opts = tp, dtype, opts
        self.log_path, self.cache_root = Path(log_path), Path(cache_root)
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        for attempt in range(3):   # another process may take the free port before the server
            self.port = free_port()
            cmd = server_command(self.kind, self.model_path, self.served_name, self.port,
                                 self.tp, self.dtype, self.opts)
            self.starts += 1
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "ab") as logf:
                logf.write(f"\n==== capsfus: start {self.starts} on port {self.port}: "
                           f"{' '.join(cmd)}\n".encode())
                logf.flush()
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "capsfus.engines.server_guard", "--", *cmd],
                    stdin=subprocess.PIPE, stdout=logf, stderr=subprocess.STDOUT,
                    env=server_env(self.cache_root), start_new_session=True, close_fds=True)
            log.info("%s server starting on port %d (pid %d, tp %d), log %s", self.kind,
                     self.port, self.proc.pid, self.tp, self.log_path)
            try:
                self._wait_ready()
                return
            except ServerError as e:
                self.stop()
                if attempt < 2 and "address already in use" in str(e).lower():
                    log.warning("port %d was taken: starting again on another", self.port)
                    continue
                raise

    def _wait_ready(self) -> None:
        t0 = time.time()
        deadline = t0 + self.opts.startup_timeout
        pause = 0.2
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise ServerError(f"the {self.kind} server exited with code {rc} before it "
                                  f"answered; last lines of {self.log_path}:\n"
                                  f"{tail(self.log_path)}")
            if self._answers():
                log.info("%s server ready on port %d after %.1fs", self.kind, self.port,
                         time.time() - t0)
                return
            if time.time() > deadline:
                raise ServerError(f"the {self.kind} server did not answer within "
                                  f"{self.opts.startup_timeout:g}s (--server-startup-timeout);"
                                  f" last lines of {self.log_path}:\n{tail(self.log_path)}")
            time.sleep(pause)
            pause = min(2.0, pause * 1.5)

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/models", timeout=5) as r:
                if r.status != 200:
                    return False
                data = json.loads(r.read() or b"{}")
                return bool(data.get("data"))
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        """Stops the whole process group: SIGTERM, then SIGKILL after ``grace`` seconds."""
        p, self.proc = self.proc, None
        if p is None:
            return
        try:
            pgid = os.getpgid(p.pid)
        except ProcessLookupError:
            pgid = p.pid
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(pgid, signal.SIGKILL)   # whatever is left of the group
        except ProcessLookupError:
            pass
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            pass
        if p.stdin:
            try:
                p.stdin.close()
            except OSError:
                pass

    def remove_cache(self) -> None:
        shutil.rmtree(self.cache_root, ignore_errors=True)
