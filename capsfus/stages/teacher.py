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
RUN/teacher/leases/, usage.json  leases (so `capsfus status` shows it running); tokens, cost
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

Sample: the N rows with the smallest ``blake2b(seed, id)``: the same rows whatever the shard
layout or order, for the same seed.

Cost: ``usage.json`` holds tokens and cost (known: from usage; upper bound: plus the worst case
of attempts that may have been billed without an answer, and of requests lost in flight at a
crash). ``--max-cost`` reserves each attempt's worst case before sending it and stops when the
next one would pass the budget.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
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
from ..prompt import PromptBuilder, PromptTemplate, approx_tokens, approx_truncate
from ..rundir.faults import crashpoint
from ..rundir.io import JsonlZstWriter, atomic_write_json
from ..rundir.lease import LeaseDir
from ..rundir.manifest import Run
from ..rundir.rows import FUSED, RAW, SYNTHETIC
from ..rundir.fresh import upstream_sha
from ..rundir.stage import StageDir, input_rows
from .fuse import FUSE_REJECT_REASONS
from .teacher_journal import Journal, Ledger
from .teacher_sample import select_sample

log = logging.getLogger("capsfus.teacher")

TEACHER_REJECT_REASONS = {
    "no_synthetic": FUSE_REJECT_REASONS["no_synthetic"],        # the same rule as fusion
    "prompt_over_budget": "the prompt does not fit --max-prompt-tokens even with the raw "
                          "caption cut",
    "bad_request": "the endpoint refused the request (4xx)",
    "content_filter": "the endpoint's content filter withheld the answer",
    "empty_answer": "the endpoint answered with empty text",
    **{r: f"{r.replace('_', ' ')} on every attempt (--max-retries)" for r in TRANSIENT_REASONS},
}


# --- settings --------------------------------------------------------------------------------
@dataclass
class TeacherOptions:
    run_dir: str
    endpoint: str
    model: str
    api: str = "chat"
    sample: int | None = None
    seed: int = 0
    concurrency: int = 8
    rpm: float | None = None
    tpm: float | None = None
    timeout: float = 60.0
    max_retries: int = 6
    max_tokens: int = 128
    temperature: float | None = None
    top_p: float | None = None
    max_prompt_tokens: int = 512
    max_cost: float | None = None
    max_consecutive_failures: int = 50
    retry_rejected: bool = False
    force: bool = False
    backoff_base: float = 1.0
    stage: str = "teacher"          # or teacher@TAG
    template: PromptTemplate = field(default_factory=PromptTemplate)

    def settings(self) -> dict:
        """Output-shaping settings (hashed; a change needs --force). The endpoint is where the
        model runs, like an executor setting: recorded in usage.json, not hashed."""
        return {"engine": "openai", "model": self.model, "api": self.api,
                "max_tokens": self.max_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "max_prompt_tokens": self.max_prompt_tokens,
                "prompt_sha256": self.template.sha256, "prompt_source": self.template.source,
                "sample": self.sample, "seed": self.seed}

    def decoding(self) -> dict:
        return {k: v for k, v in (("temperature", self.temperature), ("top_p", self.top_p))
                if v is not None}


def input_stage_of(run: Run) -> str:
    """As fusion: the caption stage when the run has one, else the input."""
    from .caption import caption_input
    return caption_input(run)






def make_builder(opts: TeacherOptions) -> PromptBuilder:
    chat = (lambda user: user) if opts.api == "chat" else None  # chat: no "New Sentence:" cue
    return PromptBuilder(opts.template, approx_tokens, approx_truncate, approx_tokens,
                         opts.max_prompt_tokens, chat=chat)


def request_body(opts: TeacherOptions, prompt: str) -> dict:
    body = {"model": opts.model, "max_tokens": opts.max_tokens, **opts.decoding()}
    if opts.api == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def request_hash(body: dict) -> str:
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]














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
    lease: object = None
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
        self.consecutive_failures = 0
        self.rows_total = self.rows_done = 0
        self.reasons: Counter = Counter()
        self.t0 = time.time()

    def __reduce__(self):
        raise TypeError("Teacher holds an API key and is never pickled")

    # --- setup -----------------------------------------------------------------------------
    def _lock(self) -> None:
        self.stage.root.mkdir(parents=True, exist_ok=True)
        self._lock_f = open(self.stage.root / "lock", "a+")
        try:
            fcntl.flock(self._lock_f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another `capsfus teacher` is running on {self.run.root} (see "
                            f"`capsfus status {self.run.root}`); wait for it or stop it") \
                from None

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
        self.settings_hash = self.stage.ensure_config(self.manifest["run_id"], self.input_stage,
                                                      o.settings(), o.force)
        self.sample = select_sample(self.run, self.manifest, self.input_stage, o.sample, o.seed,
                                    self.stage.root / "sample.json")
        self.rows_total = sum(len(v) for v in self.sample.values())
        self._load_ledger()
        self.leases = LeaseDir(self.stage.root / "leases")
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
                lease = self.leases.acquire(shard, extra={"worker": "teacher"})
                if lease is None:
                    raise UserError(f"shard {shard} of {self.stage.name} is leased by a live "
                                    f"process: another teacher run?")
                self._write_state(shard, lease.epoch, "running", len(idx), {}, None,
                                  st.get("attempts", 0))
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
    def _open_shard(self, shard: int) -> ShardWork:
        """Reads the shard's sampled rows, builds their prompts, and sorts them into final
        (prompt rejects, answers already in the journal) and to-do."""
        o = self.o
        lease = self.leases.acquire(shard, extra={"worker": "teacher"})
        if lease is None:
            raise UserError(f"shard {shard} of teacher is leased by a live process: another "
                            f"teacher run? (`capsfus status {self.run.root}`)")
        lease.start_heartbeat(30.0)
        w = ShardWork(shard, self.sample[shard], lease=lease,
                      attempts=(self.stage.read_state(shard) or {}).get("attempts", 0) + 1)
        wanted = set(w.sampled)
        if wanted:   # a shard the sample missed is not read
            rows = input_rows(self.run, self.manifest, self.input_stage, shard)
            for idx, row in enumerate(rows):
                if idx in wanted:
                    w.rows[idx] = row
        if len(w.rows) != len(wanted):
            raise UserError(f"shard {shard} of {self.input_stage} has fewer rows than sampled: "
                            f"the input changed; rerun with --force")
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

    def _write_state(self, shard: int, epoch: int, status: str, total: int, finals: dict,
                     final: dict | None, attempts: int) -> None:
        """A state file in the shape every stage writes (manifests/state.schema.json)."""
        rej = [r for r in finals.values() if "reason" in r]
        wall = round(time.time() - self.t0, 3)
        self.stage.write_state(shard, {
            "shard": shard, "stage": self.stage.name, "status": status, "epoch": epoch,
            "settings_hash": self.settings_hash, "rows_total": total,
            "input_sha256": upstream_sha(self.run, self.manifest, self.input_stage, shard),
            "rows_done": len(finals), "rows_out": len(finals) - len(rej),
            "rows_rejected": len(rej), "reasons": dict(Counter(r["reason"] for r in rej)),
            "chunks": [], "final": final, "attempts": max(1, attempts),
            "owner": {"pid": os.getpid(), "worker": "teacher"},
            "timings": {"gen_s": 0.0, "wall_s": wall, "rows": len(finals)},
            **({"n_chunks": 0, "finished": time.time()} if status == "done" else {})})

    def _write_running(self, w: ShardWork) -> None:
        self._write_state(w.shard, w.lease.epoch, "running", len(w.sampled), w.finals, None,
                          w.attempts)

    def _materialize(self, w: ShardWork) -> None:
        """All sampled rows of the shard are final: write its out/rejected files (atomic,
        checksummed), list them in the state, drop everything else in its folders."""
        stage, shard, epoch = self.stage, w.shard, w.lease.epoch
        if not w.lease.still_mine():
            raise RuntimeError(f"shard {shard}: lease epoch {epoch} was taken over")
        name = f"shard.e{epoch:06d}.jsonl.zst"
        rows = [w.finals[i] for i in w.sampled]
        out = [r for r in rows if "reason" not in r]
        rej = [r for r in rows if "reason" in r]
        final = {}
        for key, folder, part in (("out", stage.out_dir(shard), out),
                                  ("rejected", stage.rejected_dir(shard), rej)):
            if key == "rejected" and not part:
                final[key] = None
                continue
            wr = JsonlZstWriter(folder / name)
            try:
                wr.write_many(part)
                final[key] = wr.commit()
            except BaseException:
                wr.abort()
                raise
        crashpoint("teacher_mid_materialize")
        self._write_state(shard, epoch, "done", len(rows), w.finals, final, w.attempts)
        stage.remove_untrusted(shard, stage.final_files(stage.read_state(shard)))
        w.lease.release()
        w.done = True
        w.rows.clear()
        w.finals.clear()
        w.todo.clear()

    # --- requests --------------------------------------------------------------------------
    async def _before(self, item: Item, attempt: int) -> bool:
        if self.stop_reason:
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
                                           before_attempt=lambda a: self._before(item, a))
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
                    w = await asyncio.to_thread(self._open_shard, shard)
                    open_shards.append(w)
                    if w.pending == 0:
                        await asyncio.to_thread(self._materialize, w)
                        continue
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
                    self._write_running(w)
                    w.lease.release()
            self._report(open_shards, final=True)

    def _report(self, open_shards, final: bool = False) -> None:
        u = self.usage()
        atomic_write_json(self.stage.root / "usage.json", u)
        if not final:
            for w in open_shards:
                if w.pending:
                    self._write_running(w)
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
        """Runs to the end (or to the budget / a fatal endpoint error); returns the usage."""
        self.prepare()
        if self.todo_shards:
            asyncio.run(self._main())
        else:
            self._report([], final=True)
        return self.usage()
