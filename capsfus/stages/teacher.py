"""The teacher stage: (raw, synthetic) → fused captions from an OpenAI-compatible endpoint
(ChatGPT in the paper), for a reproducible sample of the run's rows: the training triplets.

```
RUN/teacher/config.json          settings rule as every stage: model, api, decoding, prompt
                                 hash, sample size and seed (no endpoint, no key)
RUN/teacher/sample.json          the sampled rows (a cache; recomputed when the input changes)
RUN/teacher/journal/00000.jsonl  shard 0's request journal, appended and fsynced
RUN/teacher/state/00000.json     as every stage: status, rows, final files with checksums
RUN/teacher/out/00000/…          shard.e<epoch>.jsonl.zst: sampled rows + ``fused``
RUN/teacher/rejected/00000/…     sampled rows refused, each with ``reason`` and ``detail``
RUN/teacher/leases/, usage.json  shard leases (so `capsfus status` shows it running); tokens, cost
RUN/teacher/run-lease/           the lease of the one teacher process (``--lease-ttl``)
```

Why one async process and not ``runner.run_shard`` workers: the work is waiting on HTTP, not
compute, so one event loop keeps ``--concurrency`` requests in flight across the whole sample
(a chunked runner would drain to zero at every chunk end and stall on one row's Retry-After),
and one process makes the rate limits and the cost budget exact without coordination.

Exactly once, with money involved: before a request is first sent a ``send`` record is
journaled; its answer (or its rejection) is journaled and fsynced before the row counts as
done. A restarted run re-sends only rows with no final record for the same request (same
prompt, model and decoding: the request's hash); so at most the requests in flight at a crash
repeat (≤ ``--concurrency``, each held its worker slot until its record was on disk). A shard's
output files are derived from its journal once all its sampled rows are final, written
atomically, listed with checksums in its state, as in every stage. Since the journal is keyed by
request, ``--force`` (new settings) or a larger ``--sample`` reuses every answer already paid
for; the sample is nested (a larger N keeps the rows of a smaller one).

Fencing, as every stage (rundir/lease.py): the process holds a *run lease* (one teacher at a
time: budget and rate limits stay exact) and a lease per open shard, heartbeated. A process
frozen past ``--lease-ttl`` (SIGSTOP, a hung mount) is taken over by the next ``capsfus
teacher``, which revokes its write tokens first; woken, it can land nothing: shard states and
out/rejected files go through the shard lease's token (``write_state_fenced``,
``write_rows_fenced``), config.json, sample.json and usage.json through the run lease's token,
and a shard's journal is replaced through the token by each new holder before it appends, so
the old holder's open journal file is detached (``Lease.replace_open``). It also checks both
leases before each attempt, so a taken-over process starts no new request (the attempts that
had passed the check when it froze, at most ``--concurrency``, still go out; their answers
land nowhere). A shard
records the checksum of the upstream output it actually read (``input_sha256``, taken before
the read and checked by it), never the one present when it writes.

Sample: the N rows with the smallest ``blake2b(seed, id)``: the same rows whatever the shard
layout or order, for the same seed.

Cost: ``usage.json`` holds tokens and cost (known: from usage; upper bound: plus the worst case
of attempts that may have been billed without an answer, and of requests lost in flight at a
crash). ``--max-cost`` reserves each attempt's worst case before sending it and stops when the
next one would pass the budget.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..engines.openai_client import (
    TRANSIENT_REASONS,
    ClientSettings,
    EndpointFatal,
    OpenAIClient,
    sanitize_url,
)
from ..engines.prices import Price
from ..errors import UserError
from ..rundir.faults import crashpoint
from ..rundir.fresh import upstream_sha
from ..rundir.lease import Fenced, Lease, LeaseDir
from ..rundir.manifest import Run
from ..rundir.rows import FUSED, RAW, SYNTHETIC
from ..rundir.runner import write_rows_fenced, write_state_fenced
from ..rundir.stage import StageDir, input_rows
from .teacher_journal import Journal, Ledger
from .teacher_options import (  # noqa: F401  (re-exported: the stage's API)
    TEACHER_REJECT_REASONS,
    TeacherOptions,
    input_stage_of,
    make_builder,
    request_body,
    request_hash,
)
from .teacher_sample import select_sample

log = logging.getLogger("capsfus.teacher")


# --- the run -------------------------------------------------------------------------------------
@dataclass
class Item:
    shard: int
    idx: int
    row_id: object
    payload: object
    req: str
    reserve: float | None
    reserved: float = 0.0
    sent: bool = False


@dataclass
class ShardWork:
    shard: int
    sampled: list[int]
    rows: dict[int, dict] = field(default_factory=dict)
    finals: dict[int, dict] = field(default_factory=dict)   # idx -> out/rejected row
    todo: list[Item] = field(default_factory=list)
    lease: Lease | None = None
    input_sha: str | None = None    # the upstream output its rows were read from
    attempts: int = 1
    done: bool = False      # materialized: its rows are dropped from memory

    @property
    def pending(self) -> int:
        return 0 if self.done else len(self.sampled) - len(self.finals)


class Teacher:
    def __init__(self, opts: TeacherOptions, api_key: str, price: Price, progress=None):
        self.o = opts
        self._key = api_key
        self.price = price
        self.progress = progress      # callable(dict) for the live display
        self.run = Run(Path(opts.run_dir))
        self.manifest = self.run.manifest()
        self.stage = StageDir(self.run, opts.stage)
        self.journal = Journal(self.stage.root / "journal")
        self.builder = make_builder(opts)
        self.ledger = Ledger()
        self.inflight_reserved = 0.0
        self.stop_reason: str | None = None
        self.fatal: str | None = None
        self.run_lease: Lease | None = None
        self.consecutive_failures = 0
        self.rows_total = self.rows_done = 0
        self.reasons: Counter = Counter()
        self.t0 = time.time()

    def __reduce__(self):
        raise TypeError("Teacher holds an API key and is never pickled")

    # --- setup -----------------------------------------------------------------------------
    def _lock(self) -> None:
        """The run lease: one teacher process per stage. A dead holder's is taken at once, a
        frozen one's after --lease-ttl (and that holder is fenced off)."""
        self.stage.root.mkdir(parents=True, exist_ok=True)
        lease = LeaseDir(self.stage.root / "run-lease", ttl=self.o.lease_ttl).acquire(
            0, extra={"worker": "teacher"})
        if lease is None:
            raise UserError(f"another `capsfus teacher` is running on {self.run.root} (see "
                            f"`capsfus status {self.run.root}`); wait for it or stop it")
        lease.start_heartbeat(self.o.heartbeat)
        self.run_lease = lease

    def _fenced(self, e: Fenced) -> None:
        """A later teacher took over this one's run or a shard: stop, write nothing more."""
        if self.stop_reason != "fenced":
            log.warning("%s", e)
            self.fatal = (f"{e}: another `capsfus teacher` took this run over (this process "
                          f"was frozen or stalled past --lease-ttl); this one stopped and "
                          f"wrote nothing more")
        self.stop_reason = "fenced"

    def _still_mine(self, w: "ShardWork") -> bool:
        for lease in (self.run_lease, w.lease):
            if not lease.still_mine():
                self._fenced(Fenced(f"shard {w.shard}: lease epoch {lease.epoch} was taken "
                                    f"over"))
                return False
        return True

    def prepare(self) -> None:
        o = self.o
        if not self.manifest["shards"]:
            raise UserError(f"{self.run.root} has no rows to sample")
        if o.max_cost is not None and not self.price.known:
            raise UserError(f"--max-cost needs the price of {o.model}, which is not in the "
                            f"price table: pass --prices FILE or --price-in/--price-out")
        self._lock()
        self.input_stage = input_stage_of(self.run)
        from ..rundir.fresh import stale_message
        stale = stale_message(self.run, self.input_stage, self.manifest,
                              reading=f"teacher reads {self.input_stage}, and ") \
            if self.input_stage != "input" else None
        if stale:
            raise UserError(stale)
        with self.run_lease.writing() as token:
            self.settings_hash = self.stage.ensure_config(
                self.manifest["run_id"], self.input_stage, o.settings(), o.force, tmp_dir=token)
            self.sample = select_sample(self.run, self.manifest, self.input_stage, o.sample,
                                        o.seed, self.stage.root / "sample.json", tmp_dir=token)
        self.rows_total = sum(len(v) for v in self.sample.values())
        self._load_ledger()
        self.leases = LeaseDir(self.stage.root / "leases", ttl=o.lease_ttl)
        self.todo_shards = []
        for shard, idx in self.sample.items():
            st = self.stage.read_state(shard) or {}
            if self.stage.final_is_trusted(st, self.settings_hash) and st.get(
                    "input_sha256") == upstream_sha(self.run, self.manifest, self.input_stage,
                                                    shard) and not (
                    o.retry_rejected and set(st.get("reasons", {})) & TRANSIENT_REASONS):
                self.rows_done += len(idx)
                self.reasons.update(st.get("reasons", {}))
                continue
            self.todo_shards.append(shard)
            if st.get("settings_hash") != self.settings_hash or st.get("rows_total") != len(idx):
                # a state for the shard's sample, so `status` counts sampled rows from the start
                # (written under a short lease, as every state; status shows it pending)
                lease = self._acquire(shard)
                try:
                    self._write_state(shard, lease, "running", len(idx), {}, None,
                                      st.get("attempts", 0), upstream_sha(
                                          self.run, self.manifest, self.input_stage, shard))
                finally:
                    lease.release()

    def _load_ledger(self) -> None:
        """Totals over every journal record ever written for this stage."""
        L = self.ledger
        for shard in self.journal.shards_with_journal():
            sends: Counter = Counter()
            closes: Counter = Counter()
            reserve: dict = {}
            for r in self.journal.read(shard):
                k = r.get("k")
                if k == "send":
                    sends[(r["i"], r["req"])] += 1
                    reserve[(r["i"], r["req"])] = r.get("reserve") or 0.0
                    L.requests += 1
                elif k in ("ok", "rej", "stop"):
                    closes[(r["i"], r["req"])] += 1
                    L.add_final(r)
                    L.answered += k == "ok"
                    L.rejected += k == "rej"
            for key, n in sends.items():
                lost = n - closes.get(key, 0)
                if lost > 0:
                    L.orphans += lost
                    L.cost_uncertain += lost * reserve[key]

    # --- per shard -------------------------------------------------------------------------
    def _acquire(self, shard: int) -> Lease:
        """The shard's lease, waiting up to --lease-ttl for a holder that stopped heartbeating
        to become stale (its heartbeat thread may have stopped a moment after the run lease's)."""
        deadline = time.time() + self.o.lease_ttl
        while True:
            lease = self.leases.acquire(shard, extra={"worker": "teacher"})
            if lease is not None:
                return lease
            if time.time() >= deadline:
                raise UserError(f"shard {shard} of {self.stage.name} is leased by a live "
                                f"process: another teacher run? (`capsfus status "
                                f"{self.run.root}`)")
            time.sleep(min(1.0, self.o.lease_ttl / 10))

    def _open_shard(self, shard: int) -> ShardWork:
        lease = self._acquire(shard)
        lease.start_heartbeat(self.o.heartbeat)
        try:
            return self._open_leased(shard, lease)
        except BaseException:
            lease.release()
            raise

    def _open_leased(self, shard: int, lease: Lease) -> ShardWork:
        """Reads the shard's sampled rows, builds their prompts, and sorts them into final
        (prompt rejects, answers already in the journal) and to-do."""
        o = self.o
        w = ShardWork(shard, self.sample[shard], lease=lease,
                      attempts=(self.stage.read_state(shard) or {}).get("attempts", 0) + 1)
        # what the rows are read from, taken before the read and checked by it: a shard records
        # the upstream output it read, not whatever is there when it writes (fresh.py)
        w.input_sha = upstream_sha(self.run, self.manifest, self.input_stage, shard)
        wanted = set(w.sampled)
        if wanted:   # a shard the sample missed is not read
            rows = input_rows(self.run, self.manifest, self.input_stage, shard,
                              expect_sha=w.input_sha)
            for idx, row in enumerate(rows):
                if idx in wanted:
                    w.rows[idx] = row
        crashpoint("teacher_after_read")
        if len(w.rows) != len(wanted):
            raise UserError(f"shard {shard} of {self.input_stage} has fewer rows than sampled: "
                            f"the input changed; rerun with --force")
        # this holder's journal: the file is replaced through the lease's token and kept open,
        # which detaches any earlier holder's (a frozen one's appends land nowhere)
        self.journal.bind(shard, lease.replace_open(self.journal.path(shard),
                                                    self.journal.content(shard)))
        last: dict[tuple, dict] = {}
        for r in self.journal.read(shard):
            if r.get("k") in ("ok", "rej"):
                last[(r["i"], r["req"])] = r
        for idx in w.sampled:
            row = w.rows[idx]
            if not row.get(SYNTHETIC):
                w.finals[idx] = {**row, "reason": "no_synthetic", "detail": ""}
                continue
            built = self.builder.build(row[RAW], row[SYNTHETIC])
            if built.reject:
                w.finals[idx] = {**row, "reason": built.reject, "detail": built.detail}
                continue
            body = request_body(o, built.text)
            req = request_hash(body)
            rec = last.get((idx, req))
            if rec is not None and not (o.retry_rejected and rec["k"] == "rej"
                                        and rec.get("reason") in TRANSIENT_REASONS):
                w.finals[idx] = self._final_row(row, rec, built.raw_cut)
                self.ledger.reused += 1
                continue
            payload = body["messages"] if o.api == "chat" else body["prompt"]
            w.todo.append(Item(shard, idx, row.get("id"), payload, req,
                               self.price.worst_case(len(built.text.encode("utf-8")),
                                                     o.max_tokens)))
            w.rows[idx] = {**row, "_raw_cut": built.raw_cut}
        self.rows_done += len(w.finals)
        self.reasons.update(r["reason"] for r in w.finals.values() if "reason" in r)
        self._write_running(w)
        return w

    @staticmethod
    def _final_row(row: dict, rec: dict, raw_cut: bool) -> dict:
        row = {k: v for k, v in row.items() if k != "_raw_cut"}
        if rec["k"] == "ok":
            return {**row, FUSED: rec["text"],
                    "fused_hit_max_tokens": rec.get("finish") == "length",
                    "raw_truncated": raw_cut,
                    "teacher": {"model": rec.get("model"), "usage": rec.get("usage"),
                                "finish_reason": rec.get("finish"),
                                "attempts": rec.get("attempts")}}
        return {**row, "reason": rec["reason"], "detail": rec.get("detail", "")}

    def _write_state(self, shard: int, lease: Lease, status: str, total: int, finals: dict,
                     final: dict | None, attempts: int, input_sha: str | None) -> None:
        """A state file in the shape every stage writes (manifests/state.schema.json), through
        the lease's token after the fencing check, as every stage writes it."""
        rej = [r for r in finals.values() if "reason" in r]
        wall = round(time.time() - self.t0, 3)
        write_state_fenced(self.stage, lease, shard, {
            "shard": shard, "stage": self.stage.name, "status": status, "epoch": lease.epoch,
            "settings_hash": self.settings_hash, "rows_total": total,
            "input_sha256": input_sha,
            "rows_done": len(finals), "rows_out": len(finals) - len(rej),
            "rows_rejected": len(rej), "reasons": dict(Counter(r["reason"] for r in rej)),
            "chunks": [], "final": final, "attempts": max(1, attempts),
            "owner": {"pid": os.getpid(), "worker": "teacher"},
            "timings": {"gen_s": 0.0, "wall_s": wall, "rows": len(finals)},
            **({"n_chunks": 0, "finished": time.time()} if status == "done" else {})})

    def _write_running(self, w: ShardWork) -> None:
        self._write_state(w.shard, w.lease, "running", len(w.sampled), w.finals, None,
                          w.attempts, w.input_sha)

    def _materialize(self, w: ShardWork) -> None:
        """All sampled rows of the shard are final: write its out/rejected files (atomic,
        checksummed), list them in the state, drop everything else in its folders."""
        stage, shard, lease = self.stage, w.shard, w.lease
        if not lease.still_mine():      # cheap early exit; the token is what makes it safe
            raise Fenced(f"shard {shard}: lease epoch {lease.epoch} was taken over")
        name = f"shard.e{lease.epoch:06d}.jsonl.zst"
        rows = [w.finals[i] for i in w.sampled]
        out = [r for r in rows if "reason" not in r]
        rej = [r for r in rows if "reason" in r]
        final = {}
        for key, folder, part in (("out", stage.out_dir(shard), out),
                                  ("rejected", stage.rejected_dir(shard), rej)):
            if key == "rejected" and not part:
                final[key] = None
                continue
            final[key] = write_rows_fenced(lease, folder / name, part)
        crashpoint("teacher_mid_materialize")
        self._write_state(shard, lease, "done", len(rows), w.finals, final, w.attempts,
                          w.input_sha)
        stage.remove_untrusted(shard, stage.final_files({"final": final}), unlink=lease.remove)
        lease.release()
        w.done = True
        w.rows.clear()
        w.finals.clear()
        w.todo.clear()

    # --- requests --------------------------------------------------------------------------
    async def _before(self, item: Item, w: ShardWork, attempt: int) -> bool:
        if self.stop_reason or not self._still_mine(w):
            return False
        if self.o.max_cost is not None:
            need = self.ledger.cost_upper + self.inflight_reserved + item.reserve
            if need > self.o.max_cost:
                self.stop_reason = "budget"
                return False
        if item.reserve is not None:
            self.inflight_reserved += item.reserve
            item.reserved += item.reserve
        if not item.sent:
            item.sent = True
            self.ledger.requests += 1
            await self.journal.append(item.shard, {"k": "send", "i": item.idx, "req": item.req,
                                                   "reserve": item.reserve, "t": time.time()})
            crashpoint("teacher_after_send_record")
        return True

    def _settle(self, item: Item, rec: dict | None) -> None:
        """Swaps the item's reservation for its recorded cost in one step: while its record
        is being fsynced, the reservation still counts against --max-cost."""
        self.inflight_reserved -= item.reserved
        item.reserved = 0.0
        if rec is not None:
            self.ledger.add_final(rec)

    async def _do(self, item: Item, w: ShardWork) -> None:
        reply = await self.client.complete(item.payload, max_tokens=self.o.max_tokens,
                                           before_attempt=lambda a: self._before(item, w, a))
        cost = self.price.cost(reply.usage) if reply.usage else (0.0 if self.price.known
                                                                  else None)
        base = {"i": item.idx, "id": item.row_id, "req": item.req, "usage": reply.usage,
                "cost": cost, "reserve": item.reserve, "attempts": reply.attempts,
                "uncertain": reply.uncertain, "retries": reply.retries, "t": time.time()}
        if reply.reason == "budget":
            if item.sent:   # closes the send record; the row stays to do
                rec = {"k": "stop", **base}
                await self.journal.append(item.shard, rec)
                self._settle(item, rec)
            else:
                self._settle(item, None)
            return
        if reply.ok:
            rec = {"k": "ok", **base, "text": reply.text, "finish": reply.finish_reason,
                   "model": reply.model}
        else:
            rec = {"k": "rej", **base, "reason": reply.reason, "detail": reply.detail}
        await self.journal.append(item.shard, rec)       # on disk before it counts as done
        crashpoint("teacher_after_result")
        self._settle(item, rec)
        self.ledger.answered += reply.ok
        self.ledger.rejected += not reply.ok
        raw_cut = w.rows[item.idx].get("_raw_cut", False)
        w.finals[item.idx] = self._final_row(w.rows[item.idx], rec, raw_cut)
        self.rows_done += 1
        if not reply.ok:
            self.reasons[reply.reason] += 1
            log.warning("row %s rejected: %s: %s", item.row_id, reply.reason, reply.detail)
        if not reply.ok and reply.reason in TRANSIENT_REASONS:
            self.consecutive_failures += 1
            if self.consecutive_failures >= self.o.max_consecutive_failures:
                self.fatal = (f"the endpoint failed {self.consecutive_failures} rows in a row "
                              f"(last: {reply.reason}: {reply.detail[:200]}); stopped")
                self.stop_reason = "failures"
        elif reply.ok:
            self.consecutive_failures = 0
        if w.pending == 0:
            await asyncio.to_thread(self._materialize, w)

    async def _main(self) -> None:
        o = self.o
        self.client = OpenAIClient(ClientSettings(
            endpoint=o.endpoint, model=o.model, api=o.api, concurrency=o.concurrency, rpm=o.rpm,
            tpm=o.tpm, timeout=o.timeout, max_retries=o.max_retries,
            backoff_base=o.backoff_base), self._key)
        self.journal.start()
        q: asyncio.Queue = asyncio.Queue(maxsize=o.concurrency * 2)
        open_shards: list[ShardWork] = []

        async def producer():
            try:
                for shard in self.todo_shards:
                    if self.stop_reason:
                        break
                    try:
                        w = await asyncio.to_thread(self._open_shard, shard)
                        open_shards.append(w)
                        if w.pending == 0:
                            await asyncio.to_thread(self._materialize, w)
                            continue
                    except Fenced as e:
                        self._fenced(e)
                        break
                    for item in w.todo:
                        if self.stop_reason:
                            break
                        await q.put((item, w))
            finally:
                for _ in range(o.concurrency):
                    await q.put(None)

        async def worker():
            while (got := await q.get()) is not None:
                if self.stop_reason:
                    continue
                try:
                    await self._do(*got)
                except Fenced as e:
                    self._fenced(e)
                except EndpointFatal as e:
                    self.fatal = str(e)
                    self.stop_reason = "fatal"

        async def ticker():
            while True:
                self._report(open_shards)
                await asyncio.sleep(1.0)

        tick = asyncio.create_task(ticker())
        try:
            prod = asyncio.create_task(producer())
            workers = [asyncio.create_task(worker()) for _ in range(o.concurrency)]
            await asyncio.gather(prod, *workers)
        finally:
            tick.cancel()
            await self.journal.close()
            await self.client.aclose()
            for w in open_shards:
                if w.pending:
                    if self.stop_reason != "fenced":
                        try:
                            self._write_running(w)
                        except Fenced as e:
                            self._fenced(e)
                    w.lease.release()   # writes only while the lease is still this one's
            self._report(open_shards, final=True)

    def _report(self, open_shards, final: bool = False) -> None:
        u = self.usage()
        try:
            if self.stop_reason != "fenced":
                self.run_lease.write_json(self.stage.root / "usage.json", u)
            if not final:
                for w in open_shards:
                    if w.pending and self.stop_reason != "fenced":
                        self._write_running(w)
        except Fenced as e:
            self._fenced(e)
        if self.progress:
            self.progress(u)

    def usage(self) -> dict:
        L = self.ledger
        known = self.price.known
        return {
            "model": self.o.model, "endpoint": sanitize_url(self.o.endpoint), "api": self.o.api,
            "price": self.price.to_dict(),
            "rows": {"sampled": self.rows_total, "done": self.rows_done,
                     "to_do": self.rows_total - self.rows_done, "reasons": dict(self.reasons)},
            "requests": {"sent": L.requests, "answered": L.answered, "rejected": L.rejected,
                         "orphaned_at_crash": L.orphans, "reused_from_journal": L.reused,
                         "in_flight": self.client.stats["in_flight"] if hasattr(self, "client")
                         else 0,
                         "retries": self.client.stats["retries"] if hasattr(self, "client")
                         else 0},
            "tokens": {"prompt": L.prompt_tokens, "completion": L.completion_tokens,
                       "total": L.prompt_tokens + L.completion_tokens},
            "cost_usd": {"known": round(L.cost_known, 6) if known else None,
                         "upper_bound": round(L.cost_upper, 6) if known else None,
                         "max_cost": self.o.max_cost},
            "stopped": self.stop_reason, "elapsed_s": round(time.time() - self.t0, 1),
            "updated": time.time()}

    def execute(self) -> dict:
        """Runs to the end (or to the budget / a fatal endpoint error, or until a later
        teacher takes this one over); returns the usage."""
        try:
            self.prepare()
            if self.todo_shards:
                asyncio.run(self._main())
            else:
                self._report([], final=True)
        except Fenced as e:
            self._fenced(e)
        finally:
            if self.run_lease is not None:
                self.run_lease.release()
        return self.usage()
