"""A small async client for OpenAI-compatible endpoints: one call is messages (or a prompt) in,
text + usage out. Used by the teacher stage; meant for reuse (e.g. an LLM judge).

Interface::

    client = OpenAIClient(ClientSettings(endpoint="https://api.openai.com/v1", model="gpt-4o-mini",
                                         concurrency=16, rpm=500, tpm=200_000),
                          api_key=api_key_from_env("OPENAI_API_KEY"))
    reply = await client.complete([{"role": "user", "content": "…"}], max_tokens=128)
    # or, with settings.api == "completions": await client.complete("a plain prompt", …)
    if reply.ok: reply.text, reply.usage   # {"prompt_tokens": …, "completion_tokens": …}
    else:        reply.reason, reply.detail
    await client.aclose()

- ``complete`` never raises for a row's own trouble: after ``max_retries`` retries it returns
  ``Reply(ok=False, reason=…)`` with a reason code (``rate_limited``, ``server_error``,
  ``timeout``, ``connection_error``, ``malformed_response``, ``bad_request``,
  ``content_filter``, ``empty_answer``, ``budget``). It raises :class:`EndpointFatal` for what
  no retry can fix and would fail every request alike: a refused key (401/403), a wrong URL or
  model (404), an exhausted quota (429 ``insufficient_quota``). The caller stops the run.
- Retries: 429, 408, 409, 5xx, timeouts, connection errors (resets, drops) and malformed bodies
  (not JSON, no choices), with exponential backoff and full jitter (``backoff_base * 2**n``,
  at most ``backoff_max``); a ``Retry-After`` / ``retry-after-ms`` header wins (plus a little
  jitter) and pauses *every* request of this client until then, so one 429 does not turn into
  ``concurrency`` more.
- Bounded concurrency (a semaphore) and client-side ``rpm`` / ``tpm`` limits (token buckets
  holding one second's worth; a request is charged ``ceil(chars / 4) + max_tokens`` tokens,
  the estimate OpenAI's own limiter uses).
- ``timeout`` is a total deadline per attempt (a server that trickles bytes cannot hold a slot
  forever).
- ``before_attempt(n)``: an optional async hook called before each attempt; returning False
  ends the call with ``reason="budget"`` (the teacher reserves cost there).
- ``Reply.uncertain``: attempts that failed after the request may have reached the model
  (timeout, dropped connection, malformed body), and an answer without ``usage``; they may
  have been billed (``usage`` is None then).

Transport: the ``openai`` package (``AsyncOpenAI``, or ``AsyncAzureOpenAI`` for Azure's
``…/openai/deployments/NAME?api-version=V`` URLs) with its own retries off, through
``with_raw_response``; the body is parsed here. Why not httpx directly: ``openai`` is the
declared extra, it handles auth headers, Azure, proxies and base URLs the way users expect,
and its transport library changed name across versions (httpx → httpx2), so importing that
directly would be brittle; with retries off and raw bodies, the retry policy stays here where
it is tested.

Secrets: the key lives only in this process's client object. Every error text that leaves
this module passes :func:`redact` (servers echo keys in 401 messages); the client refuses to
be pickled.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable
from urllib.parse import parse_qs, urlsplit, urlunsplit

from ..errors import ENDPOINT_ENV, UserError, redact_url, sanitize_url  # noqa: F401

RETRY_STATUSES = {408, 409, 429}
TRANSIENT_REASONS = {"rate_limited", "server_error", "timeout", "connection_error",
                     "malformed_response"}


class EndpointFatal(Exception):
    """The endpoint refuses every request alike (key, URL, model, quota): stop, do not retry."""


def api_key_from_env(name: str = "OPENAI_API_KEY") -> str:
    key = os.environ.get(name, "").strip()
    if not key:
        raise UserError(f"no API key: set the environment variable {name} (the key is read "
                        f"from the environment only; use --api-key-env NAME for another "
                        f"variable)")
    return key


def redact(text: str, *secrets: str) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "[redacted]")
    return text


def runtime_endpoint(stored: str) -> str:
    """The URL to talk to: ``stored`` is what records hold (sanitized); the full URL, when it
    carries credentials, comes from the environment (ENDPOINT_ENV), never from a file."""
    real = os.environ.get(ENDPOINT_ENV, "")
    if real and sanitize_url(real) == sanitize_url(stored):
        return real
    if "…" in stored:
        raise UserError(f"the endpoint {stored} had credentials in its URL, which capsfus never "
                        f"stores: export {ENDPOINT_ENV}='<the full URL>' (or pass --endpoint "
                        f"again) and rerun")
    return stored


@dataclass
class ClientSettings:
    endpoint: str
    model: str
    api: str = "chat"                  # chat | completions
    concurrency: int = 8
    rpm: float | None = None
    tpm: float | None = None
    timeout: float = 60.0
    max_retries: int = 6
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    max_retry_after: float = 600.0
    extra_body: dict = field(default_factory=dict)   # temperature, top_p, … sent as given


@dataclass
class Reply:
    ok: bool
    text: str | None = None
    finish_reason: str | None = None
    usage: dict | None = None
    model: str | None = None
    reason: str | None = None
    detail: str = ""
    attempts: int = 0
    uncertain: int = 0
    retries: dict = field(default_factory=dict)   # reason -> count of failed attempts


class TokenBucket:
    """``rate`` units per minute, bursts of one second's worth (at least one request)."""

    def __init__(self, per_minute: float):
        self.rate = per_minute / 60.0
        self.capacity = max(self.rate, 1.0)
        self.level = self.capacity
        self.t = time.monotonic()
        self.lock = asyncio.Lock()

    async def take(self, n: float) -> None:
        async with self.lock:  # first come, first served
            while True:
                now = time.monotonic()
                self.level = min(self.capacity, self.level + (now - self.t) * self.rate)
                self.t = now
                # a request larger than the bucket goes once the bucket is full (into debt)
                if self.level >= min(n, self.capacity):
                    self.level -= n
                    return
                await asyncio.sleep((min(n, self.capacity) - self.level) / self.rate)


class _Retry(Exception):
    def __init__(self, reason: str, detail: str, retry_after: float | None = None,
                 uncertain: bool = False):
        super().__init__(detail)
        self.reason, self.detail = reason, detail
        self.retry_after, self.uncertain = retry_after, uncertain


class _Final(Exception):
    def __init__(self, reply: Reply):
        self.reply = reply


def _retry_after(headers) -> float | None:
    try:
        ms = headers.get("retry-after-ms")
        if ms:
            return float(ms) / 1000.0
        ra = headers.get("retry-after")
        if not ra:
            return None
        try:
            return float(ra)
        except ValueError:
            when = email.utils.parsedate_to_datetime(ra)
            return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, AttributeError):
        return None


def _azure_parts(endpoint: str) -> tuple[str, str, str] | None:
    """(azure_endpoint, deployment, api_version) of a ``…/openai/deployments/NAME?api-version=V``
    URL, else None."""
    p = urlsplit(endpoint)
    parts = p.path.rstrip("/").split("/")
    if "deployments" in parts and parts.index("deployments") + 1 < len(parts):
        i = parts.index("deployments")
        version = parse_qs(p.query).get("api-version", [None])[0]
        if not version:
            raise UserError(f"Azure-style endpoint {sanitize_url(endpoint)}: add "
                            f"?api-version=YYYY-MM-DD (e.g. 2024-10-21) to the URL")
        base = urlunsplit((p.scheme, p.netloc, "/".join(parts[:i - 1]), "", ""))
        return base, parts[i + 1], version
    return None


class OpenAIClient:
    def __init__(self, settings: ClientSettings, api_key: str, seed: int | None = None):
        import openai
        if settings.api not in ("chat", "completions"):
            raise UserError(f"--api {settings.api}: use chat or completions")
        if settings.concurrency < 1:
            raise UserError(f"concurrency {settings.concurrency}: must be at least 1")
        self.s = settings
        self._key = api_key
        self._openai = openai
        azure = _azure_parts(settings.endpoint)
        if azure:
            base, deployment, version = azure
            self._client = openai.AsyncAzureOpenAI(
                azure_endpoint=base, azure_deployment=deployment, api_version=version,
                api_key=api_key, max_retries=0, timeout=settings.timeout)
        else:
            p = urlsplit(settings.endpoint)
            query = {k: v[0] for k, v in parse_qs(p.query).items()}
            self._client = openai.AsyncOpenAI(
                base_url=urlunsplit((p.scheme, p.netloc, p.path, "", "")), api_key=api_key,
                default_query=query or None, max_retries=0, timeout=settings.timeout)
        self._sem = asyncio.Semaphore(settings.concurrency)
        self._rpm = TokenBucket(settings.rpm) if settings.rpm else None
        self._tpm = TokenBucket(settings.tpm) if settings.tpm else None
        self._pause_until = 0.0
        self._rng = random.Random(seed)
        self.stats = {"attempts": 0, "retries": 0, "in_flight": 0}

    def __reduce__(self):
        raise TypeError("OpenAIClient holds an API key and is never pickled")

    async def aclose(self) -> None:
        await self._client.close()

    def _redact(self, text: str) -> str:
        return redact_url(redact(str(text), self._key), self.s.endpoint)[:500]

    def estimate_tokens(self, payload, max_tokens: int) -> int:
        return math.ceil(_payload_chars(payload) / 4) + max_tokens

    async def complete(self, payload, *, max_tokens: int,
                       before_attempt: Callable[[int], Awaitable[bool]] | None = None,
                       **extra) -> Reply:
        """``payload``: a list of chat messages (api chat) or a prompt string (completions)."""
        if self.s.api == "chat" and isinstance(payload, str):
            payload = [{"role": "user", "content": payload}]
        retries: dict[str, int] = {}
        uncertain = 0
        last: _Retry | None = None
        for attempt in range(1, self.s.max_retries + 2):
            if before_attempt is not None and not await before_attempt(attempt):
                return Reply(False, reason="budget", detail="stopped before the cost budget",
                             attempts=attempt - 1, uncertain=uncertain, retries=retries)
            try:
                return await self._attempt(payload, max_tokens, extra, attempt, uncertain,
                                           retries)
            except _Final as f:
                return f.reply
            except _Retry as r:
                last = r
                retries[r.reason] = retries.get(r.reason, 0) + 1
                uncertain += r.uncertain
                self.stats["retries"] += 1
                if attempt > self.s.max_retries:
                    break
                delay = self._rng.uniform(0, min(self.s.backoff_max,
                                                 self.s.backoff_base * 2 ** (attempt - 1)))
                if r.retry_after is not None:
                    ra = min(r.retry_after, self.s.max_retry_after)
                    delay = ra + self._rng.uniform(0, min(1.0, 0.1 * ra + 0.05))
                    self._pause_until = max(self._pause_until, time.monotonic() + delay)
                await asyncio.sleep(delay)
        return Reply(False, reason=last.reason,
                     detail=f"gave up after {self.s.max_retries + 1} attempts: {last.detail}",
                     attempts=self.s.max_retries + 1, uncertain=uncertain, retries=retries)

    async def _attempt(self, payload, max_tokens, extra, attempt, uncertain, retries) -> Reply:
        async with self._sem:
            while (wait := self._pause_until - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            if self._rpm:
                await self._rpm.take(1)
            if self._tpm:
                await self._tpm.take(self.estimate_tokens(payload, max_tokens))
            self.stats["attempts"] += 1
            self.stats["in_flight"] += 1
            try:
                body = await asyncio.wait_for(self._send(payload, max_tokens, extra),
                                              self.s.timeout + 1.0)
            except asyncio.TimeoutError:
                raise _Retry("timeout", f"no answer within {self.s.timeout:g}s",
                             uncertain=True) from None
            finally:
                self.stats["in_flight"] -= 1
        return self._parse(body, attempt, uncertain, retries)

    async def _send(self, payload, max_tokens, extra) -> str:
        o = self._openai
        args = {"model": self.s.model, "max_tokens": max_tokens, **self.s.extra_body, **extra}
        try:
            if self.s.api == "chat":
                raw = await self._client.chat.completions.with_raw_response.create(
                    messages=payload, **args)
            else:
                raw = await self._client.completions.with_raw_response.create(
                    prompt=payload, **args)
            return raw.http_response.text
        except o.APITimeoutError:
            raise _Retry("timeout", f"no answer within {self.s.timeout:g}s", uncertain=True)
        except o.APIConnectionError as e:
            raise _Retry("connection_error", self._redact(f"{e}: {e.__cause__ or ''}"),
                         uncertain=True)
        except o.APIStatusError as e:
            status = e.status_code
            msg = self._redact(_error_message(e))
            if status in (401, 403):
                raise EndpointFatal(f"the endpoint refused the API key ({status}): {msg}. "
                                    f"Check the key in the environment variable and the "
                                    f"--endpoint URL") from None
            if status == 404:
                raise EndpointFatal(f"not found (404) at {sanitize_url(self.s.endpoint)}: {msg}"
                                    f". Check --endpoint (it is the base URL, e.g. "
                                    f"https://api.openai.com/v1) and --model") from None
            body = e.body if isinstance(e.body, dict) else {}
            if status == 429 and "insufficient_quota" in (str(body.get("code")),
                                                          str(body.get("type"))):
                raise EndpointFatal(f"the endpoint says the quota is exhausted (429 "
                                    f"insufficient_quota): {msg}") from None
            if status in RETRY_STATUSES or status >= 500:
                reason = "rate_limited" if status == 429 else \
                    "timeout" if status == 408 else "server_error"
                raise _Retry(reason, f"{status}: {msg}", _retry_after(e.response.headers))
            raise _Final(Reply(False, reason="bad_request", detail=f"{status}: {msg}"))

    def _parse(self, text: str, attempt: int, uncertain: int, retries: dict) -> Reply:
        try:
            body = json.loads(text)
            choice = body["choices"][0]
            out = choice["message"]["content"] if self.s.api == "chat" else choice["text"]
            finish = choice.get("finish_reason")
            u = body.get("usage")
            usage = None if not u else {"prompt_tokens": int(u.get("prompt_tokens") or 0),
                                        "completion_tokens": int(u.get("completion_tokens") or 0)}
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise _Retry("malformed_response", f"unreadable answer body ({type(e).__name__}: "
                         f"{self._redact(text[:120])!r})", uncertain=True)
        # an answer without usage was billed all the same, at an unknown amount: uncertain
        common = dict(finish_reason=finish, usage=usage, model=body.get("model"),
                      attempts=attempt, uncertain=uncertain + (usage is None), retries=retries)
        if finish == "content_filter":
            return Reply(False, reason="content_filter", detail="the endpoint's content filter "
                         "withheld the answer", **common)
        if out is None or not str(out).strip():
            return Reply(False, reason="empty_answer", detail="the answer was empty", **common)
        return Reply(True, text=str(out).strip(), **common)


def _error_message(e) -> str:
    body = e.body
    if isinstance(body, dict):
        err = body["error"] if isinstance(body.get("error"), dict) else body
        if err.get("message"):
            return str(err["message"])
    return str(e)


def _payload_chars(payload) -> int:
    if isinstance(payload, str):
        return len(payload)
    return sum(len(m.get("content") or "") for m in payload)
