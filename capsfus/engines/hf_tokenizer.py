"""What the prompt budget needs from an engine that holds a Hugging Face tokenizer
(``transformers`` and ``vllm``): token counts exactly as the engine will feed the prompt, cuts
of a caption at token boundaries, and chat-template rendering."""

from __future__ import annotations

from ..errors import UserError


class HFTokenizerMixin:
    """Needs ``self.tokenizer`` and ``self.chat`` (set through ``setup_chat``)."""

    tokenizer = None
    chat = None

    def setup_chat(self, mode: str, model: str) -> None:
        """``on``: the model's chat template, required; ``auto``: it if the model has one;
        ``off``: plain prompts."""
        if mode not in ("auto", "on", "off"):
            raise UserError(f"--chat-template {mode}: choose auto, on or off")
        has = bool(getattr(self.tokenizer, "chat_template", None))
        if mode == "on" and not has:
            raise UserError(f"model {model} has no chat template (use --chat-template off)")
        self.chat = self._render_chat if has and mode != "off" else None

    def _render_chat(self, user_text: str, context: list[dict] | None = None) -> str:
        """``context``: turns before the user's (a few-shot prompt file's system + examples)."""
        return self.tokenizer.apply_chat_template(
            [*(context or []), {"role": "user", "content": user_text}],
            add_generation_prompt=True, tokenize=False)

    def encode(self, prompts: list[str]) -> list[list[int]]:
        """Token ids as generation will see them: chat-rendered prompts already hold their
        special tokens; plain ones get the tokenizer's own (e.g. LLaMA's BOS)."""
        return self.tokenizer(prompts, add_special_tokens=self.chat is None)["input_ids"]

    def count_tokens(self, prompt: str) -> int:
        return len(self.encode([prompt])[0])

    def caption_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def truncate(self, text: str, n_tokens: int) -> str:
        """The first n tokens of a caption, cut at a character boundary of the original text
        (offsets from a fast tokenizer; else decoded, which may normalise the text)."""
        if n_tokens <= 0:
            return ""
        if self.tokenizer.is_fast:
            spans = self.tokenizer(text, add_special_tokens=False,
                                   return_offsets_mapping=True)["offset_mapping"]
            return text if n_tokens >= len(spans) else text[:spans[n_tokens - 1][1]]
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if n_tokens >= len(ids) else self.tokenizer.decode(ids[:n_tokens])
