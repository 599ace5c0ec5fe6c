"""Tab.-2-style pairwise judging of fused captions through any OpenAI-compatible endpoint.

For each sampled row the judge sees the two inputs and two fused captions, A and B, and
answers one of ``A`` (A better), ``B`` (B better), ``similar`` (different wording, same
quality) or ``identical``. Every row is asked twice, once with the candidate as A and once as
B; a verdict counts as a win only when both orders agree, so a judge that prefers whichever
caption comes first gets no credit for it (position bias cancels). The rules:

    both orders pick the candidate            -> win
    both orders pick the other caption        -> lose
    the orders disagree (A twice, or B twice) -> similar   (the judge followed position)
    either says "similar", the other agrees
      or picks a side                         -> similar
    both say "identical" (or the texts are
      equal after whitespace)                 -> identical (equal texts are not sent)

The prompt is recorded in the report with its hash. No reachable judge means the report says
"not run" with the reason: never numbers from a stand-in.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import re

PROMPT = """You are judging image captions. Two captions, A and B, were written for the same \
image by merging a raw web caption (with real-world details such as names, places, products, \
numbers) and a synthetic caption (well-formed, but generic and possibly wrong).

Raw web caption: {raw}
Synthetic caption: {synthetic}

Caption A: {a}
Caption B: {b}

Which caption is better? A better caption keeps the raw caption's real-world details, is \
fluent and well-structured, does not invent facts found in neither input, and does not simply \
concatenate the two inputs. Answer with exactly one word:
A          if caption A is better
B          if caption B is better
similar    if they differ but are equally good
identical  if they say the same thing in the same words"""

PROMPT_SHA256 = hashlib.sha256(PROMPT.encode()).hexdigest()
VERDICTS = ("A", "B", "similar", "identical")
_ANSWER = re.compile(r"\b(A|B|similar|identical)\b", re.IGNORECASE)
MAX_TOKENS = 8


def parse_verdict(text: str | None) -> str | None:
    """The first of A / B / similar / identical in the answer (case-insensitive for the words,
    exact for the letters), None if there is none."""
    for m in _ANSWER.finditer(text or ""):
        w = m.group(1)
        if w in ("A", "B"):
            return w
        if w.lower() in ("similar", "identical"):
            return w.lower()
    return None


def combine(first: str, second: str) -> tuple[str, bool]:
    """(outcome for the candidate, orders disagreed) from the two verdicts: ``first`` with the
    candidate as A, ``second`` with it as B."""
    def side(v, cand):
        return "cand" if v == cand else "other" if v in ("A", "B") else v
    x, y = side(first, "A"), side(second, "B")
    if x == y == "cand":
        return "win", False
    if x == y == "other":
        return "lose", False
    if x == y == "identical":
        return "identical", False
    return "similar", {x, y} == {"cand", "other"}


def _same(a: str, b: str) -> bool:
    return " ".join(a.split()) == " ".join(b.split())


async def _judge_all(items, client, console=None):
    """items: (row index, candidate text, other text, raw, synthetic); returns per-row dicts."""
    from ..engines.openai_client import EndpointFatal

    async def ask(raw, syn, a, b):
        prompt = PROMPT.format(raw=raw, synthetic=syn, a=a, b=b)
        reply = await client.complete([{"role": "user", "content": prompt}],
                                      max_tokens=MAX_TOKENS)
        return reply

    async def one(item):
        i, cand, other, raw, syn = item
        if _same(cand, other):
            return {"row": i, "outcome": "identical", "answers": [None, None], "sent": False}
        r1, r2 = await asyncio.gather(ask(raw, syn, cand, other), ask(raw, syn, other, cand))
        if not (r1.ok and r2.ok):
            bad = r1 if not r1.ok else r2
            return {"row": i, "outcome": None, "error": bad.reason, "detail": bad.detail}
        v1, v2 = parse_verdict(r1.text), parse_verdict(r2.text)
        rec = {"row": i, "answers": [r1.text, r2.text], "verdicts": [v1, v2], "sent": True}
        if v1 is None or v2 is None:
            return {**rec, "outcome": None, "error": "unparsed"}
        outcome, disagreed = combine(v1, v2)
        return {**rec, "outcome": outcome, "disagreed": disagreed}

    try:
        # a row the judge must see goes first (identical texts are never sent): an unreachable
        # judge shows up before N requests are queued
        order = sorted(items, key=lambda it: _same(it[1], it[2]))
        first = await one(order[0])
        if first.get("error") in ("connection_error", "timeout"):
            return None, f"judge endpoint unreachable ({first['error']}: {first['detail'][:200]})"
        rest = await asyncio.gather(*(one(it) for it in order[1:]))
        return sorted([first, *rest], key=lambda r: r["row"]), None
    except EndpointFatal as e:
        return None, str(e)
    finally:
        await client.aclose()


def run_judge(pairs: list[dict], candidate: str, against: str, endpoint: str, model: str,
              rows: int = 100, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8,
              console=None, max_retries: int = 3, timeout: float = 60.0) -> dict:
    """Judges up to ``rows`` sampled rows (seed 0), both orders. Returns the judge record:
    ``status`` "done" with totals, or "not run" with the reason."""
    import os

    from ..engines.openai_client import ClientSettings, OpenAIClient, sanitize_url
    from .evaluate import system_texts
    record = {"endpoint": sanitize_url(endpoint), "model": model, "candidate": candidate,
              "other": against, "prompt": PROMPT, "prompt_sha256": PROMPT_SHA256,
              "both_orders": True}
    texts = system_texts(pairs, candidate)
    if against not in texts:
        return {**record, "status": "not run", "reason": f"no {against} captions to judge against"}
    picks = sorted(random.Random(0).sample(range(len(pairs)), min(rows, len(pairs))))
    items = [(i, texts[candidate][i], texts[against][i], pairs[i]["raw"], pairs[i]["synthetic"])
             for i in picks]
    if not items:
        return {**record, "status": "not run", "reason": "no rows to judge"}
    key = os.environ.get(api_key_env, "").strip() or "EMPTY"   # local servers need none
    try:
        client = OpenAIClient(ClientSettings(endpoint=endpoint, model=model,
                                             concurrency=concurrency, timeout=timeout,
                                             max_retries=max_retries, backoff_base=0.5,
                                             backoff_max=10,
                                             extra_body={"temperature": 0}), api_key=key)
    except ImportError:
        return {**record, "status": "not run", "reason": "the openai package is not installed "
                                                         "(pip install 'capsfus[openai]')"}
    if console is not None:
        console.print(f"judging {len(items)} rows, both orders, with {model} at "
                      f"{record['endpoint']}")
    results, reason = asyncio.run(_judge_all(items, client, console))
    if results is None:
        return {**record, "status": "not run", "reason": reason}
    totals = {k: 0 for k in ("win", "similar", "identical", "lose")}
    for r in results:
        if r["outcome"]:
            totals[r["outcome"]] += 1
        r["id"] = pairs[r["row"]]["id"]
    judged = sum(totals.values())
    if not any(r["outcome"] and r.get("sent") for r in results):
        # identical texts are decided here, not by the judge: alone they are no judge result
        errors = sorted({r["error"] for r in results if r.get("error")})
        return {**record, "status": "not run",
                "reason": (f"no row could be judged ({', '.join(errors)})" if errors else
                           "every sampled row's two captions are identical: nothing to judge"),
                "rows": results}
    return {**record, "status": "done", "totals": totals, "judged": judged,
            "requested_rows": len(items),
            "order_disagreements": sum(bool(r.get("disagreed")) for r in results),
            "unparsed": sum(r.get("error") == "unparsed" for r in results),
            "failed": sum(bool(r.get("error")) and r.get("error") != "unparsed"
                          for r in results),
            "rows": results}
