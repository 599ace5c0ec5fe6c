"""The teacher's request journal and cost ledger: every request is on disk before it is sent
and every answer before its row counts as done, so a restart never re-sends a persisted answer.

Fencing: a shard's journal is appended only through the file its lease holder *bound* when it
opened the shard (``bind``; the holder made that file with ``Lease.replace_open``, replacing
the previous one through its write token). The next holder replaces the file again, so the
previous holder's file is detached: whatever a frozen-then-woken holder appends lands in an
unlinked inode. A reader drops a torn last line instead of truncating the file in place (the
next holder's replacement leaves it out)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("capsfus.teacher")


# --- journal -------------------------------------------------------------------------------------
class Journal:
    """Per-shard append-only JSON lines, group-committed: records that arrive while one fsync
    runs are written together and fsynced once. ``await append(...)`` returns once the record
    is on disk."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._files: dict[int, object] = {}
        self._pending: list[tuple[int, bytes, asyncio.Future]] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def path(self, shard: int) -> Path:
        return self.folder / f"{shard:05d}.jsonl"

    def content(self, shard: int) -> bytes:
        """The shard's journal without a torn last line (a crash mid-write); b"" if none."""
        p = self.path(shard)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            return b""
        if data and not data.endswith(b"\n"):
            log.warning("journal %s: left out a torn last record (a crash mid-write)", p.name)
            data = data[:data.rfind(b"\n") + 1]
        return data

    def read(self, shard: int) -> list[dict]:
        """The shard's records (read only: a torn last line is left out, not cut off)."""
        out = []
        for line in self.content(shard).splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                log.warning("journal %s: skipped an unreadable record", self.path(shard).name)
        return out

    def shards_with_journal(self) -> list[int]:
        return sorted(int(p.name[:5]) for p in self.folder.glob("*.jsonl") if p.name[:5].isdigit())

    def bind(self, shard: int, f) -> None:
        """The file (open for binary append) that this process appends the shard's records
        to: the one its lease holder made (see the module docstring)."""
        old = self._files.pop(shard, None)
        if old is not None:
            old.close()
        self._files[shard] = f

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._writer())

    async def append(self, shard: int, rec: dict) -> None:
        fut = asyncio.get_running_loop().create_future()
        line = (json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        self._pending.append((shard, line, fut))
        self._wake.set()
        await fut

    async def _writer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            if not batch:
                continue
            try:
                await asyncio.to_thread(self._write, batch)
            except BaseException as e:
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                if isinstance(e, asyncio.CancelledError):
                    raise
                continue
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_result(None)

    def _write(self, batch) -> None:
        touched = {}
        for shard, line, _ in batch:
            f = self._files.get(shard)
            if f is None:
                raise RuntimeError(f"journal of shard {shard}: appended to before its lease "
                                   f"holder bound its file")
            f.write(line)
            touched[shard] = f
        for f in touched.values():
            f.flush()
            os.fsync(f.fileno())

    async def close(self) -> None:
        if self._task:
            while self._pending:
                await asyncio.sleep(0.01)
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for f in self._files.values():
            f.close()
        self._files.clear()


@dataclass
class Ledger:
    """Tokens and cost, from the journal plus this run."""

    requests: int = 0            # requests sent (first attempts)
    answered: int = 0
    rejected: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_known: float = 0.0
    cost_uncertain: float = 0.0  # worst case of attempts/requests possibly billed, no answer
    orphans: int = 0             # sent, no record of the outcome (in flight at a crash)
    reused: int = 0              # answers taken from the journal instead of re-sending

    def add_final(self, rec: dict) -> None:
        u = rec.get("usage") or {}
        self.prompt_tokens += int(u.get("prompt_tokens") or 0)
        self.completion_tokens += int(u.get("completion_tokens") or 0)
        self.cost_known += rec.get("cost") or 0.0
        self.cost_uncertain += (rec.get("uncertain") or 0) * (rec.get("reserve") or 0.0)

    @property
    def cost_upper(self) -> float:
        return self.cost_known + self.cost_uncertain
