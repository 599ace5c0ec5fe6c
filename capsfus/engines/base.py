"""The one small interface every engine implements, and the decoding settings they share."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Decoding:
    """Decoding settings. All of them shape the output, so all go into the settings hash."""

    max_new_tokens: int = 80
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Generation:
    text: str
    hit_max_tokens: bool   # generation stopped at max_new_tokens, not at an end token
    n_tokens: int = 0      # tokens generated


class GenerationError(Exception):
    """A batch could not be generated (not out-of-memory: the engine handles that itself).
    The stage bisects the batch to find the row that causes it."""


@dataclass
class EngineSpec:
    """What the user asked for; ``load_engine`` turns it into a loaded engine."""

    engine: str
    model: str | None = None
    revision: str | None = None
    decoding: Decoding = field(default_factory=Decoding)
    batch_size: int | None = None
    max_prompt_tokens: int | None = None
    chat_template: str = "auto"       # auto | on | off
    dtype: str = "auto"
    gguf_file: str | None = None
    adapter: str | None = None        # a LoRA adapter folder on top of ``model`` (transformers)
    tensor_parallel_size: int = 1
    device: str = "auto"
    endpoint: str | None = None       # openai: the server's base URL (not output-shaping)
    api_key_env: str | None = None    # openai: the variable holding the key (never the key)
    server: dict | None = None        # vllm-server/sglang-server: server.ServerOptions fields
    log_dir: str | None = None        # server engines: where the server's log goes (worker's)


class Engine:
    """``generate(prompts) -> [Generation]`` plus what the prompt budget needs.

    Subclasses set ``name`` and implement ``generate``, ``count_tokens``, ``caption_tokens``
    and ``truncate``; ``chat`` renders a user message through the model's chat template, or
    is None when the model has none (or it is turned off).
    """

    name = "base"
    chat = None
    # the model's context less max_new_tokens, when the user did not fix the budget: the room a
    # row with a long synthetic caption may use (see capsfus.prompt)
    hard_prompt_tokens: int | None = None

    def __init__(self, spec: EngineSpec):
        self.spec = spec
        self.max_prompt_tokens = spec.max_prompt_tokens or 256

    def describe(self) -> dict:
        """Output-shaping settings, recorded in the stage config and hashed."""
        return {"engine": self.name, "model": self.spec.model, "revision": self.spec.revision,
                "decoding": self.spec.decoding.to_dict(),
                "max_prompt_tokens": self.max_prompt_tokens,
                "hard_prompt_tokens": self.hard_prompt_tokens,
                "chat_template": self.chat is not None}

    def runtime(self) -> dict:
        """Settings that do not shape the output (batch size, device): recorded, not hashed."""
        return {"batch_size": self.spec.batch_size}

    def count_tokens(self, prompt: str) -> int:
        raise NotImplementedError

    def caption_tokens(self, text: str) -> int:
        raise NotImplementedError

    def truncate(self, text: str, n_tokens: int) -> str:
        raise NotImplementedError

    def generate(self, prompts: list[str]) -> list[Generation]:
        raise NotImplementedError

    def close(self) -> None:
        pass
