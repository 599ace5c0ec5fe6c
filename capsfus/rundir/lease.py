"""Shard leases with epochs, heartbeats and fencing, as plain files.

``<stage>/leases/00000.e000003.json`` is epoch 3 of shard 0's lease. Taking a lease means
creating the next epoch's file with O_CREAT|O_EXCL: of two workers racing for the same epoch,
exactly one wins. The holder of the highest epoch owns the shard. A holder rewrites its file
(atomic rename) every ``heartbeat`` seconds; a lease whose heartbeat is older than ``ttl``,
whose process is gone (same host), or whose SLURM job is gone is stale and can be taken over.

Fencing, in two layers:
- *the check*: before it trusts anything (updates the shard state), a holder checks that no
  epoch above its own exists (``still_mine``: the highest epoch present, not only the next
  one, because ``acquire`` deletes old epochs' files);
- *the write token*, which closes the window between that check and the write: each epoch
  has a folder ``leases/00000.e000003.w/``, and every file a holder writes or deletes in the
  run directory passes through it (the temp file is made there and renamed into place; a
  deletion is a rename into it, then an unlink). A new holder, right after winning its epoch
  and before it reads the shard state, empties and removes the tokens of every lower epoch.
  A holder frozen anywhere (even between its check and its rename) wakes to a token that no
  longer exists: its rename fails (ENOENT; ESTALE on NFS), so it changes nothing, whatever
  number of takeovers happened meanwhile. A write that won before the revocation is one
  the new holder sees, because it reads the state only after revoking.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .io import atomic_replace_open, atomic_write_json

LEASE_RE = re.compile(r"^(\d{5,})\.e(\d{6,})\.json$")
TOKEN_RE = re.compile(r"^(\d{5,})\.e(\d{6,})\.w$")


class Fenced(Exception):
    """This worker lost its lease (a later epoch exists): it must stop and trust nothing."""
DEFAULT_TTL = 300.0
DEFAULT_HEARTBEAT = 30.0


def _proc_start_time(pid: int) -> str | None:
    """Start time of a process (clock ticks since boot), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if start is not None:
        now = _proc_start_time(pid)
        if now is not None and now != start:
            return False
        # a zombie still answers kill(0) but will never heartbeat again
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return False
        except OSError:
            pass
    return True


def owner_info() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "pid_start": _proc_start_time(pid),
            "job_id": os.environ.get("SLURM_JOB_ID") and _slurm_job_id(),
            "worker": os.environ.get("CAPSFUS_WORKER_ID")}


def _own_element() -> str | None:
    """The SLURM job (array element) this process is the one worker of, else None. A local
    pool inside one SLURM job shares the job id between several workers, so it does not
    count: the worker id must be the job id, as SlurmWorker sets it."""
    if not os.environ.get("SLURM_JOB_ID"):
        return None
    job = _slurm_job_id()
    return job if os.environ.get("CAPSFUS_WORKER_ID") == job else None


def _slurm_job_id() -> str:
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get(
        "SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ["SLURM_JOB_ID"]


@dataclass
class LeaseInfo:
    shard: int
    epoch: int
    path: Path
    data: dict | None   # None while the file is being created (or its creator died then)
    mtime: float

    @property
    def released(self) -> bool:
        return bool(self.data and self.data.get("released"))

    @property
    def heartbeat(self) -> float:
        return float(self.data.get("heartbeat", self.mtime)) if self.data else self.mtime


class LeaseDir:
    """All leases of one stage. ``job_alive`` answers for SLURM job ids (None: unknown)."""

    def __init__(self, folder: Path, ttl: float = DEFAULT_TTL,
                 job_alive: Callable[[str], bool | None] | None = None):
        self.folder = Path(folder)
        self.ttl = ttl
        self.job_alive = job_alive

    def path(self, shard: int, epoch: int) -> Path:
        return self.folder / f"{shard:05d}.e{epoch:06d}.json"

    def token(self, shard: int, epoch: int) -> Path:
        """The epoch's write token: see the module docstring."""
        return self.folder / f"{shard:05d}.e{epoch:06d}.w"

    def highest_epoch(self, shard: int) -> int:
        """The highest epoch whose lease file exists for ``shard`` (0: none)."""
        best = 0
        prefix = f"{shard:05d}.e"
        try:
            for name in os.listdir(self.folder):
                if name.startswith(prefix):
                    m = LEASE_RE.match(name)
                    if m:
                        best = max(best, int(m.group(2)))
        except FileNotFoundError:
            pass
        return best

    def revoke_below(self, shard: int, epoch: int) -> None:
        """Removes the write tokens of every epoch of ``shard`` below ``epoch``, with any temp
        file a frozen holder left in them: from now on no lower holder can write."""
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return
        for name in names:
            m = TOKEN_RE.match(name)
            if m and int(m.group(1)) == shard and int(m.group(2)) < epoch:
                revoke(self.folder / name)

    def scan(self) -> dict[int, LeaseInfo]:
        """The current (highest-epoch) lease of every shard that has one: one listdir."""
        best: dict[int, tuple[int, str]] = {}
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return {}
        for name in names:
            m = LEASE_RE.match(name)
            if m:
                shard, epoch = int(m.group(1)), int(m.group(2))
                if shard not in best or epoch > best[shard][0]:
                    best[shard] = (epoch, name)
        return {shard: self._read(shard, epoch) for shard, (epoch, _) in best.items()}

    def current(self, shard: int) -> LeaseInfo | None:
        epoch = self.highest_epoch(shard)
        return self._read(shard, epoch) if epoch else None

    def _read(self, shard: int, epoch: int) -> LeaseInfo | None:
        path = self.path(shard, epoch)
        try:
            mtime = path.stat().st_mtime
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            data = json.loads(text) if text.strip() else None
        except ValueError:
            data = None
        return LeaseInfo(shard, epoch, path, data, mtime)

    def is_live(self, info: LeaseInfo, now: float | None = None) -> bool:
        """True while the holder may still be working on the shard."""
        now = time.time() if now is None else now
        if info.released:
            return False
        if now - info.heartbeat > self.ttl:
            return False
        d = info.data
        if d is None:
            return True  # being created right now
        job = d.get("job_id")
        if job and d.get("worker") == job and _own_element() == job and (
                d.get("host"), d.get("pid")) != (socket.gethostname(), os.getpid()):
            # a requeued array element keeps its job id: a lease taken by the one worker of
            # our element, from another host or pid, is our own previous incarnation, dead
            # (SLURM runs one incarnation of an element at a time)
            return False
        if job and self.job_alive is not None:
            alive = self.job_alive(job)
            if alive is False:
                return False
        if d.get("host") == socket.gethostname():
            return pid_alive(int(d["pid"]), d.get("pid_start"))
        return True

    def acquire(self, shard: int, extra: dict | None = None) -> "Lease | None":
        """Takes the shard's lease if it is free, released or stale; None if someone holds it
        or wins the race for the same epoch."""
        self.folder.mkdir(parents=True, exist_ok=True)
        cur = self.current(shard)
        if cur is not None and self.is_live(cur):
            return None
        epoch = (cur.epoch if cur else 0) + 1
        path = self.path(shard, epoch)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies
        except FileExistsError:
            return None
        now = time.time()
        data = {"shard": shard, "epoch": epoch, **owner_info(), "acquired": now,
                "heartbeat": now, "taken_over": None if cur is None or cur.released else
                {"epoch": cur.epoch, "holder": cur.data}, **(extra or {})}
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        # Fence every lower holder off *before* reading anything of the shard: a write of
        # theirs either landed already (and the caller will read it) or can never land.
        self.revoke_below(shard, epoch)
        token = self.token(shard, epoch)
        token.mkdir(exist_ok=True)
        if self.highest_epoch(shard) != epoch:
            # frozen between winning the file and making the token, and taken over meanwhile:
            # the later holder may have revoked before the token existed
            revoke(token)
            return None
        for old in range(max(1, epoch - 8), epoch - 1):  # keep the previous epoch for status
            try:
                self.path(shard, old).unlink()
            except FileNotFoundError:
                pass
        lease = Lease(self, shard, epoch, data)
        _HELD.add(lease)
        return lease


_HELD: "set[Lease]" = set()


def release_all_held() -> None:
    """Releases every lease this process holds (a worker about to be requeued or stopped)."""
    for lease in list(_HELD):
        try:
            lease.release()
        except OSError:
            pass


@dataclass
class Lease:
    leases: LeaseDir
    shard: int
    epoch: int
    data: dict
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def path(self) -> Path:
        return self.leases.path(self.shard, self.epoch)

    @property
    def token(self) -> Path:
        return self.leases.token(self.shard, self.epoch)

    def still_mine(self) -> bool:
        """Fencing check: False once any worker has taken a later epoch of this shard (the
        highest epoch present is compared, as ``acquire`` deletes old epochs' files), or once
        this epoch's write token was revoked."""
        return (self.leases.highest_epoch(self.shard) <= self.epoch and self.path.exists()
                and self.token.is_dir())

    @contextmanager
    def writing(self):
        """Around a write through the token: a missing token means a later holder revoked
        it, so the write did not happen and this holder is fenced off."""
        try:
            yield self.token
        except FileNotFoundError as e:
            if not self.token.is_dir():
                raise Fenced(f"shard {self.shard}: lease epoch {self.epoch} was taken over "
                             f"(write token revoked)") from e
            raise

    def write_json(self, path: Path, obj) -> None:
        """Atomic write of ``path`` that cannot land once this lease is taken over."""
        with self.writing() as token:
            atomic_write_json(path, obj, tmp_dir=token)

    def replace_open(self, path: Path, data: bytes):
        """Replaces ``path`` with ``data`` through the token, atomically, and returns it open
        for appending: an append-only file (the teacher's request journal) whose *inode* is
        this holder's right to append. The next holder replaces the file the same way before
        it appends, which detaches this holder's file: whatever a fenced-off holder appends
        afterwards lands in an unlinked inode, never in the run directory."""
        with self.writing() as token:
            return atomic_replace_open(path, data, tmp_dir=token)

    def remove(self, path: Path) -> None:
        """Deletes ``path`` as this holder: renamed into the token, then unlinked, so a holder
        fenced off meanwhile deletes nothing."""
        with self.writing() as token:
            if not token.is_dir():
                raise FileNotFoundError(token)
            tmp = token / f".del-{os.getpid()}-{path.name}"
            try:
                os.rename(path, tmp)
            except FileNotFoundError:
                if not token.is_dir():
                    raise
                return      # already gone
            os.unlink(tmp)

    def beat(self, **fields) -> None:
        self.data.update(fields, heartbeat=time.time())
        if self.still_mine():
            try:
                self.write_json(self.path, self.data)
            except Fenced:
                pass

    def start_heartbeat(self, every: float = DEFAULT_HEARTBEAT) -> None:
        def loop():
            while not self._stop.wait(every):
                try:
                    self.beat()
                except OSError:
                    pass
        self._thread = threading.Thread(target=loop, name=f"lease-{self.shard}", daemon=True)
        self._thread.start()

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other) -> bool:
        return self is other

    def release(self, **fields) -> None:
        _HELD.discard(self)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.still_mine():
            self.data.update(fields, released=True, heartbeat=time.time())
            try:
                self.write_json(self.path, self.data)
            except Fenced:
                pass
        revoke(self.token)    # released: this epoch writes nothing more


def revoke(token: Path) -> None:
    """Empties and removes a write token (retrying while a frozen-then-woken holder adds a
    temp file to it); afterwards every rename out of it fails."""
    for _ in range(100):
        try:
            for name in os.listdir(token):
                try:
                    os.unlink(token / name)
                except FileNotFoundError:
                    pass
            os.rmdir(token)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    raise OSError(f"could not revoke the write token {token}: it keeps filling")
