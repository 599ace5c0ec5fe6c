"""The teacher's settings: options (which of them shape output and are hashed), the rejection
reasons, and how a row becomes a request (prompt, body, the request's hash that keys the
journal)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from ..engines.openai_client import TRANSIENT_REASONS
from ..prompt import PromptBuilder, PromptTemplate, approx_tokens, approx_truncate
from ..rundir.lease import DEFAULT_TTL
from ..rundir.manifest import Run
from .fuse import FUSE_REJECT_REASONS

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
    # leases (run and shards): a holder whose heartbeat is older is taken over, and fenced
    # off; an executor setting, not hashed
    lease_ttl: float = DEFAULT_TTL
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

    @property
    def heartbeat(self) -> float:
        return min(30.0, self.lease_ttl / 4)

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
