"""Duplicate-id detection in bounded memory: hash-partitioned spill files.

Phase 1 appends ``(id, seq)`` to one of P partition files chosen by a hash of the id. Phase 2
reads one partition at a time (so memory holds about N/P ids), keeps the first ``seq`` of each
id and writes every later one to a per-shard list. Phase 3 (in ``shard``) loads one shard's list
at a time. Memory is therefore O(N/P + rows per shard), whatever the input size.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


class IdDeduper:
    def __init__(self, workdir: Path, partitions: int, rows_per_shard: int):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        # all partition files stay open in phase 1: never more than the process may open
        self.partitions = partitions = open_file_budget(partitions)
        self.rows_per_shard = rows_per_shard
        # write buffers of all partitions together stay under 64 MiB
        buffering = max(1 << 12, min(1 << 16, (64 << 20) // partitions))
        self._files = [open(self.workdir / f"ids-{p:05d}.txt", "w", encoding="utf-8",
                            buffering=buffering) for p in range(partitions)]

    def _partition(self, rid: str) -> int:
        h = hashlib.blake2b(rid.encode("utf-8"), digest_size=8).digest()
        return int.from_bytes(h, "little") % self.partitions

    def add(self, rid: str, seq: int) -> None:
        self._files[self._partition(rid)].write(f"{seq}\t{json.dumps(rid)}\n")

    def find_duplicates(self) -> dict[int, int]:
        """Writes ``dups-<shard>.txt`` lists and returns {shard index: duplicate count}."""
        for f in self._files:
            f.close()
        per_shard: dict[int, list[int]] = {}
        counts: dict[int, int] = {}
        for p in range(self.partitions):
            path = self.workdir / f"ids-{p:05d}.txt"
            first: dict[str, int] = {}
            with open(path, encoding="utf-8") as f:
                for line in f:
                    seq_s, rid = line.rstrip("\n").split("\t", 1)
                    seq = int(seq_s)
                    if rid in first:
                        per_shard.setdefault(seq // self.rows_per_shard, []).append(seq)
                    else:
                        first[rid] = seq
            del first
            os.unlink(path)
            # flush per-shard lists so memory does not grow with the number of duplicates
            for shard, seqs in per_shard.items():
                with open(self.workdir / f"dups-{shard:05d}.txt", "a") as out:
                    out.write("".join(f"{s}\n" for s in seqs))
                counts[shard] = counts.get(shard, 0) + len(seqs)
            per_shard.clear()
        return counts

    def duplicates_in(self, shard: int) -> set[int]:
        path = self.workdir / f"dups-{shard:05d}.txt"
        if not path.exists():
            return set()
        with open(path) as f:
            return {int(line) for line in f if line.strip()}


def partitions_for(total_input_bytes: int) -> int:
    """About 32 MB of input per partition, between 8 and 4096 partitions."""
    return max(8, min(4096, total_input_bytes // (32 << 20) + 1))


def open_file_budget(wanted: int, reserve: int = 64) -> int:
    """How many partition files may be open at once: ``wanted`` when the soft RLIMIT_NOFILE
    allows it (raised towards the hard limit if needed), else fewer (then each partition holds
    more ids). ``reserve`` leaves room for the sources, shard writers and Python's own files.
    """
    try:
        import resource
    except ImportError:  # not POSIX
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    if soft < wanted + reserve:
        target = wanted + reserve if hard == resource.RLIM_INFINITY else min(wanted + reserve,
                                                                             hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return max(1, min(wanted, soft - reserve))
