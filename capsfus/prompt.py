"""The fusion prompt (the paper's, appendix Sec. 7), kept in exactly this one place, and the
prompt budget rule.

Plain rendering matches the released CapsFus-LLaMA inference: the instruction lines joined
with spaces, a blank line, ``Sentence 1: …``, ``Sentence 2: …`` and ``New Sentence:`` each on
its own line. Chat rendering puts the same text, less the ``New Sentence:`` cue, in one user
message through the model's chat template.

Captions are untrusted text. Their whitespace (newlines included) is collapsed to single
spaces, so alt-text cannot start a line of its own (a fake ``New Sentence:``); whatever it says
("Ignore the above…") stays inside ``Sentence 1``.

Budget: when a prompt is over ``max_prompt_tokens`` only the raw caption is cut, at a token
boundary, and never to nothing; a row whose other parts alone are over budget is rejected
(``prompt_over_budget``). (The released script deletes the raw caption entirely when the
prompt is exactly 256 tokens long, an off-by-one we do not copy.)

Long synthetic captions (dense VLM descriptions, ``capsfus caption --format dense``): the
default budget (256, the released setting, meant for BLIP-length captions) cannot hold the
instruction plus a 200-word caption. When the engine knows a hard limit (``hard_max_tokens``:
the model's context less ``max_new_tokens``, given only when the user did not set the budget)
and the prompt without its raw caption is already over the soft budget, that row's budget is
the hard limit instead: the raw caption is then cut only as far as the context requires, and
the row is rejected only when the instruction and synthetic caption alone do not fit the
model. Rows of BLIP-length captions are built exactly as before. An explicit
``--max-prompt-tokens`` is strict.

Few-shot prompt files (``--prompt-file X.yaml|.json``): a system instruction, worked examples
(raw, synthetic, fused) and the user template; through a chat template they become a system
turn, one user/assistant pair per example, then the row's user turn (small instruct models
copy the format of worked examples far better than they follow an instruction alone). Without
a chat template the same parts are written as plain text. Their hash covers every part; a
plain-text prompt file and the paper's prompt hash exactly as before.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Callable

INSTRUCTION_LINES = (
    "Please merge and refine the information from the two given sentences.",
    "Sentence 1 provides detailed real-world knowledge, yet it suffers from flaws in sentence "
    "structure and grammar.",
    "Sentence 2 exhibits nice sentence structure, but lacking in-depth real-world details and "
    "may contain false information.",
    "Please combine them into a new sentence, ensuring a well-structured sentence while "
    "retaining the detailed real-world information provided in Sentence 1.",
    "Avoid simply concatenating the sentences.",
)
RAW_SLOT, SYNTHETIC_SLOT = "{raw}", "{synthetic}"
DEFAULT_BODY = " ".join(INSTRUCTION_LINES) + "\n\nSentence 1: {raw}\nSentence 2: {synthetic}"
DEFAULT_CUE = "\nNew Sentence:"


def clean_caption(text: str) -> str:
    return " ".join(text.split())


@dataclass(frozen=True)
class PromptTemplate:
    """``body`` holds ``{raw}`` and ``{synthetic}``; ``cue`` ends plain prompts only."""

    body: str = DEFAULT_BODY
    cue: str = DEFAULT_CUE
    source: str = "paper"
    system: str = ""
    examples: tuple = ()        # ((raw, synthetic, fused), ...)

    def __post_init__(self):
        # from JSON (a submission record) the examples come back as lists
        object.__setattr__(self, "examples", tuple(tuple(e) for e in self.examples))

    @classmethod
    def from_file(cls, path: str) -> "PromptTemplate":
        from .errors import UserError
        try:
            text = open(path, encoding="utf-8").read()
        except OSError as e:
            raise UserError(f"--prompt-file {path}: {e.strerror}") from None
        if path.endswith((".yaml", ".yml", ".json")):
            return cls._from_structured(path, text)
        if RAW_SLOT not in text or SYNTHETIC_SLOT not in text:
            raise UserError(f"--prompt-file {path}: must contain {RAW_SLOT} and {SYNTHETIC_SLOT}")
        return cls(body=text.rstrip("\n"), cue="", source=path)

    @classmethod
    def _from_structured(cls, path: str, text: str) -> "PromptTemplate":
        """``system`` (optional), ``examples`` (optional list of {raw, synthetic, fused}),
        ``user`` (the template, with {raw} and {synthetic}), ``cue`` (plain prompts only)."""
        import yaml

        from .errors import UserError
        try:
            d = yaml.safe_load(text)        # JSON is YAML too
        except yaml.YAMLError as e:
            raise UserError(f"--prompt-file {path}: not valid YAML/JSON ({e})") from None
        user = d.get("user") if isinstance(d, dict) else None
        if not isinstance(user, str) or RAW_SLOT not in user or SYNTHETIC_SLOT not in user:
            raise UserError(f"--prompt-file {path}: needs a `user` template containing "
                            f"{RAW_SLOT} and {SYNTHETIC_SLOT} (and optionally `system` and "
                            f"`examples`: a list of raw/synthetic/fused)")
        examples = []
        for i, ex in enumerate(d.get("examples") or []):
            if not (isinstance(ex, dict) and all(isinstance(ex.get(k), str) and ex[k].strip()
                                                 for k in ("raw", "synthetic", "fused"))):
                raise UserError(f"--prompt-file {path}: example {i + 1} needs non-empty raw, "
                                f"synthetic and fused texts")
            examples.append((clean_caption(ex["raw"]), clean_caption(ex["synthetic"]),
                             clean_caption(ex["fused"])))
        system = d.get("system") or ""
        if not isinstance(system, str):
            raise UserError(f"--prompt-file {path}: `system` must be text")
        return cls(body=user.strip("\n"), cue=str(d.get("cue", "")), source=path,
                   system=system.strip(), examples=tuple(examples))

    @property
    def sha256(self) -> str:
        blob = self.body + "\x00" + self.cue
        if self.system or self.examples:
            blob += "\x00" + json.dumps({"system": self.system,
                                         "examples": [list(e) for e in self.examples]},
                                        ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    @property
    def has_context(self) -> bool:
        return bool(self.system or self.examples)

    def context_messages(self) -> list[dict]:
        """The chat turns before the row's own: system, then a user/assistant pair per
        example."""
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        for raw, synthetic, fused in self.examples:
            msgs += [{"role": "user", "content": self.render_text(raw, synthetic)},
                     {"role": "assistant", "content": fused}]
        return msgs

    def plain_context(self) -> str:
        """The same turns as plain text, for models without a chat template."""
        parts = [self.system] if self.system else []
        parts += [self.render_text(r, s) + self.cue + " " + f for r, s, f in self.examples]
        return "".join(p + "\n\n" for p in parts)

    def display(self, raw: str = "<raw caption>", synthetic: str = "<synthetic caption>") -> str:
        """The prompt for people to read (cards): context turns labelled, then the row's."""
        if not self.has_context:
            return self.render_text(raw, synthetic) + self.cue
        lines = [f"[system] {self.system}"] if self.system else []
        for r, s, f in self.examples:
            lines += [f"[user] {self.render_text(r, s)}", f"[assistant] {f}"]
        return "\n".join(lines + [f"[user] {self.render_text(raw, synthetic)}"])

    def render_text(self, raw: str, synthetic: str) -> str:
        """Fills the two slots in one pass, so a caption that itself contains "{synthetic}"
        is never expanded."""
        first, second = sorted([(self.body.index(RAW_SLOT), RAW_SLOT, raw),
                                (self.body.index(SYNTHETIC_SLOT), SYNTHETIC_SLOT, synthetic)])
        head, rest = self.body.split(first[1], 1)
        mid, tail = rest.split(second[1], 1)
        return head + first[2] + mid + second[2] + tail


@dataclass
class BuiltPrompt:
    text: str | None
    n_tokens: int = 0
    raw_cut: bool = False
    reject: str | None = None   # reason code when no prompt fits
    detail: str = ""


class PromptBuilder:
    """Renders prompts for one engine and applies the budget rule.

    ``count_tokens(text)`` counts a full prompt as the engine will feed it; ``truncate(text,
    n)`` keeps the first n tokens of a caption; ``chat(user_text)`` renders through the chat
    template (None for plain prompts).
    """

    def __init__(self, template: PromptTemplate, count_tokens: Callable[[str], int],
                 truncate: Callable[[str, int], str], caption_tokens: Callable[[str], int],
                 max_prompt_tokens: int, chat: Callable[[str], str] | None = None,
                 hard_max_tokens: int | None = None):
        self.template = template
        self.count_tokens = count_tokens
        self.truncate = truncate
        self.caption_tokens = caption_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.hard_max_tokens = max(hard_max_tokens or 0, max_prompt_tokens)
        self.chat = chat
        if template.has_context and chat is not None:
            import inspect
            if len(inspect.signature(chat).parameters) < 2:
                from .errors import UserError
                raise UserError(f"--prompt-file {template.source}: a few-shot prompt (system, "
                                f"examples) is rendered through a model's chat template by "
                                f"the transformers or vllm engine; this engine sends one "
                                f"user message (use a plain-text prompt file here)")

    def render(self, raw: str, synthetic: str) -> str:
        user = self.template.render_text(raw, synthetic)
        if self.chat is not None:
            if self.template.has_context:
                return self.chat(user, self.template.context_messages())
            return self.chat(user)
        return self.template.plain_context() + user + self.template.cue

    def build(self, raw: str, synthetic: str) -> BuiltPrompt:
        raw, synthetic = clean_caption(raw), clean_caption(synthetic)
        budget = self.max_prompt_tokens
        text = self.render(raw, synthetic)
        n = self.count_tokens(text)
        if n <= budget:
            return BuiltPrompt(text, n)
        if self.hard_max_tokens > budget:
            # a long synthetic caption: if the prompt cannot meet the soft budget with even one
            # raw token, this row gets the model's hard limit instead
            floor = self.count_tokens(self.render(self.truncate(raw, 1).strip() or raw,
                                                  synthetic))
            if floor > budget:
                budget = self.hard_max_tokens
                if n <= budget:
                    return BuiltPrompt(text, n)
        keep = self.caption_tokens(raw) - (n - budget)
        while keep >= 1:
            cut = self.truncate(raw, keep).strip()
            if not cut:
                keep -= 1
                continue
            text = self.render(cut, synthetic)
            n = self.count_tokens(text)
            if n <= budget:
                return BuiltPrompt(text, n, raw_cut=True)
            keep = min(keep - 1, self.caption_tokens(cut) - (n - budget))
        hint = ("" if budget >= self.hard_max_tokens and self.hard_max_tokens >
                self.max_prompt_tokens else "; raise --max-prompt-tokens if the model's "
                "context allows")
        return BuiltPrompt(None, reject="prompt_over_budget",
                           detail=f"the prompt without the raw caption is over the budget of "
                                  f"{budget} tokens{hint}")


# --- approximate tokens for the prompt budget (the endpoint's tokenizer is not known here) --
def approx_tokens(text: str) -> int:
    return max(1, -(-len(text.encode("utf-8")) // 4))


def approx_truncate(text: str, n: int) -> str:
    cut = text.encode("utf-8")[:n * 4].decode("utf-8", "ignore")
    return cut.rsplit(" ", 1)[0] if " " in cut.strip() and len(cut) < len(text) else cut
