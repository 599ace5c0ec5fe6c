"""``echo``: a deterministic, dependency-free engine for tests and scale dry runs.

It "fuses" by reading Sentence 1 and Sentence 2 back out of the prompt and joining them, so an
output can be traced to its row. Tokens are words and punctuation marks (``\\w+|[^\\w\\s]``).

Test hooks (environment):
- ``CAPSFUS_ECHO_LOG=FILE``: one line per generated prompt (``sha1 pid``), appended with
  O_APPEND before results are returned, so tests can count work done twice;
- ``CAPSFUS_ECHO_SLEEP=S``: seconds to sleep per prompt (to make kills land mid-chunk);
- ``CAPSFUS_ECHO_FAIL_ON=TEXT``: any batch holding a prompt that contains TEXT raises
  GenerationError (a poison row, found by bisection).
Never a default: it must be asked for with ``--engine echo``.
"""

from __future__ import annotations

import hashlib
import os
import re
import time

from .base import Engine, EngineSpec, Generation, GenerationError

TOKEN_RE = re.compile(r"\w+|[^\w\s]")
SENTENCES_RE = re.compile(r"Sentence 1: (.*?)\nSentence 2: (.*?)(?:\n|$)", re.S)


def prompt_sha(prompt: str) -> str:
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:16]


class EchoEngine(Engine):
    name = "echo"

    def __init__(self, spec: EngineSpec):
        super().__init__(spec)
        self.log_path = os.environ.get("CAPSFUS_ECHO_LOG")
        self.sleep = float(os.environ.get("CAPSFUS_ECHO_SLEEP", "0") or 0)
        self.fail_on = os.environ.get("CAPSFUS_ECHO_FAIL_ON") or None

    def describe(self) -> dict:
        d = super().describe()
        d["model"] = "echo"
        return d

    def count_tokens(self, prompt: str) -> int:
        return len(TOKEN_RE.findall(prompt))

    caption_tokens = count_tokens

    def truncate(self, text: str, n_tokens: int) -> str:
        if n_tokens <= 0:
            return ""
        for i, m in enumerate(TOKEN_RE.finditer(text)):
            if i == n_tokens - 1:
                return text[:m.end()]
        return text

    def _fuse(self, prompt: str) -> str:
        m = SENTENCES_RE.search(prompt)
        if not m:
            return prompt[::-1]
        raw, syn = m.group(1).strip(), m.group(2).strip()
        return f"{syn.rstrip('.')}, {raw}"

    def generate(self, prompts: list[str]) -> list[Generation]:
        if self.fail_on and any(self.fail_on in p for p in prompts):
            raise GenerationError(f"echo: injected failure ({self.fail_on!r} in the batch)")
        if self.sleep:
            time.sleep(self.sleep * len(prompts))
        out = []
        limit = self.spec.decoding.max_new_tokens
        for p in prompts:
            text = self._fuse(p)
            tokens = TOKEN_RE.findall(text)
            hit = len(tokens) > limit
            if hit:
                text = self.truncate(text, limit)
            out.append(Generation(text, hit, min(len(tokens), limit)))
        if self.log_path:
            line = "".join(f"{prompt_sha(p)} {os.getpid()}\n" for p in prompts).encode()
            fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        return out
