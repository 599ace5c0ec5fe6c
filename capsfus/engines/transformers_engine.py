"""``transformers``: Hugging Face models in-process; runs everywhere (CPU, CI, one GPU).

Why it is shaped this way:
- greedy and sampled decoding go through ``continuous.ContinuousDecoder`` (finished rows leave
  the batch at once, the shared instruction prefix is computed once per call); beam search,
  and models with sliding-window or other non-plain caches, through ``generate`` in batches of
  similar length; both left-pad with an attention mask and explicit positions, so a row's
  output does not depend on the batch it lands in (up to float rounding);
- the output depends on ``Decoding`` alone: the model's ``generation_config.json`` is replaced
  by a neutral one that keeps only its special token ids, because ``generate`` would otherwise
  fill every knob we leave unset from it (e.g. ``do_sample``/``temperature`` of chat models);
- out of memory halves the batch size, for the rest of the run, and retries the rows not yet
  done; any other failure becomes a GenerationError and the stage bisects the chunk to find
  the row that causes it.

Prompt budget: ``--max-prompt-tokens`` if given, else 256 tokens (the released CapsFus-LLaMA
inference's limit, which real captions almost never reach), less where the model's context
cannot hold 256 + ``max_new_tokens``.
"""

from __future__ import annotations

import zlib

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ..errors import UserError
from ..models import resolve_model
from .base import Engine, EngineSpec, Generation, GenerationError
from .continuous import (
    SPARE,
    ContinuousDecoder,
    SharedPrefix,
    beam_inputs,
    common_prefix,
    supported,
)
from .hf_tokenizer import HFTokenizerMixin

DEFAULT_MAX_PROMPT_TOKENS = 256
# Rows in flight. On CPU, SmolLM2-135M on 2 cores runs fastest with 48-96 (docs/benchmarks.md);
# on a GPU it follows from the free memory after the weights and, for continuous decoding, each
# call's prompt lengths (engines.gpu_memory); the out-of-memory fallback halves it (and caps it
# for the rest of the run) when that was too optimistic.
DEFAULT_BATCH_SIZE = 64
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OOM_MESSAGES = ("out of memory", "can't allocate memory")


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and any(m in str(e).lower() for m in OOM_MESSAGES))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is visible here")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a torch device (auto, cpu, cuda, cuda:N)"
                        ) from None


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """bf16 on GPU (the released inference's dtype), float32 on CPU, where bf16 matmuls are
    slow on most CPUs."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UserError(f"--dtype {name}: choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def context_length(config, tokenizer) -> int | None:
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        n = getattr(config, attr, None)
        if isinstance(n, int) and n > 0:
            return n
    n = tokenizer.model_max_length
    return n if isinstance(n, int) and 0 < n < 10**7 else None


class TransformersEngine(HFTokenizerMixin, Engine):
    name = "transformers"

    def __init__(self, spec: EngineSpec):
        super().__init__(spec)
        from . import adapter as lora
        base, gguf_file, self.adapter = lora.resolve(spec.model, spec.adapter, spec.gguf_file)
        load_path, self.revision = resolve_model(base, spec.revision, gguf_file)
        if self.adapter:
            lora.check_base(self.adapter, self.revision)
        self.gguf_file = gguf_file
        self.device = pick_device(spec.device)
        self.dtype = pick_dtype(spec.dtype, self.device)
        extra = {"gguf_file": gguf_file} if gguf_file else {}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(load_path, **extra)
            model = AutoModelForCausalLM.from_pretrained(load_path, dtype=self.dtype, **extra)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load model {base}: {str(e).strip().splitlines()[0]}"
                            ) from None
        self.merged = False
        if self.adapter:
            model, self.merged = lora.attach(model, self.adapter)
        self.model = model.to(self.device).eval()
        self._setup_generation()
        self.setup_chat(spec.chat_template, spec.model)
        self.max_prompt_tokens = self._prompt_budget()
        self._size_batch()

    def _size_batch(self) -> None:
        """The flag's batch size, else on a GPU rows from the memory free now (the weights
        loaded), else the CPU default."""
        spec = self.spec
        self.batch_size = spec.batch_size or DEFAULT_BATCH_SIZE
        self.batch_from = "flag" if spec.batch_size else "default"
        self.oom_cap = None     # rows in flight an out-of-memory error left (GPU memory mode)
        if not spec.batch_size and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.free_after_weights, _ = torch.cuda.mem_get_info(self.device)
            self.batch_size, self.batch_from = self._gpu_batch_size(), "gpu memory"

    def _gpu_batch_size(self, own_tokens: int | None = None, shared_tokens: int = 0) -> int:
        """Rows in flight from the memory free after the weights (engines.gpu_memory): at load,
        for whole prompts at the budget (what ``generate`` holds per beam); per call of the
        continuous decoder, for the call's longest own part (the shared prefix held once)."""
        from .gpu_memory import kv_bytes_per_token, rows_for_memory
        cfg = self.model.config
        dtype_bytes = torch.tensor([], dtype=self.dtype).element_size()
        own = self.max_prompt_tokens if own_tokens is None else own_tokens
        rows = rows_for_memory(self.free_after_weights, kv_bytes_per_token(cfg, dtype_bytes),
                               own + self.spec.decoding.max_new_tokens + SPARE, cfg.vocab_size,
                               shared_tokens=shared_tokens)
        return min(rows, self.oom_cap or rows)

    def _setup_generation(self) -> None:
        """Left padding, a pad token (EOS if the model has none), and a generation config
        that sets every knob ``Decoding`` covers, over a neutral model default."""
        tok, d = self.tokenizer, self.spec.decoding
        tok.padding_side = "left"
        if tok.pad_token is None:
            if tok.eos_token is None:
                raise UserError(f"model {self.spec.model}: its tokenizer has neither a pad nor "
                                f"an end-of-sequence token")
            tok.pad_token = tok.eos_token
        own = self.model.generation_config
        eos = own.eos_token_id if own.eos_token_id is not None else tok.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        special = {"bos_token_id": own.bos_token_id, "eos_token_id": eos,
                   "pad_token_id": tok.pad_token_id}
        self.model.generation_config = GenerationConfig(**special)
        sampling = ({"temperature": d.temperature, "top_p": d.top_p, "top_k": d.top_k}
                    if d.do_sample else {})
        self.generation_config = GenerationConfig(max_new_tokens=d.max_new_tokens,
                                                  num_beams=d.num_beams, do_sample=d.do_sample,
                                                  **sampling, **special)
        self.plain_cache = supported(self.model)
        self.continuous = d.num_beams == 1 and self.plain_cache
        self._warpers = self._logits_warpers() if d.do_sample else None

    def _prompt_budget(self) -> int:
        spec, new = self.spec, self.spec.decoding.max_new_tokens
        ctx = context_length(self.model.config, self.tokenizer)
        room = ctx - new if ctx else None
        if room is not None and room < 1:
            raise UserError(f"model {spec.model}: its context ({ctx} tokens) cannot hold "
                            f"max_new_tokens={new}")
        if spec.max_prompt_tokens and room is not None and spec.max_prompt_tokens > room:
            raise UserError(f"--max-prompt-tokens {spec.max_prompt_tokens} + max_new_tokens "
                            f"{new} exceed the model's context of {ctx} tokens")
        if not spec.max_prompt_tokens and room:
            self.hard_prompt_tokens = room
        return spec.max_prompt_tokens or min(DEFAULT_MAX_PROMPT_TOKENS,
                                             room or DEFAULT_MAX_PROMPT_TOKENS)

    def _logits_warpers(self) -> LogitsProcessorList:
        d = self.spec.decoding
        try:
            warpers = [TemperatureLogitsWarper(d.temperature)]
            if d.top_k:
                warpers.append(TopKLogitsWarper(d.top_k))
            if d.top_p < 1.0:
                warpers.append(TopPLogitsWarper(d.top_p))
        except ValueError as e:
            raise UserError(f"decoding: {e}") from None
        return LogitsProcessorList(warpers)

    def describe(self) -> dict:
        d = super().describe()
        d["revision"] = self.revision
        if self.gguf_file:
            d["gguf_file"] = self.gguf_file
        if self.adapter:
            d["adapter"] = self.adapter.describe()
        return d

    def runtime(self) -> dict:
        import transformers
        return {"batch_size": self.batch_size,
                "batch_size_from": getattr(self, "batch_from", "engine"),
                "device": str(self.device), "adapter_merged": getattr(self, "merged", False),
                "dtype": str(self.dtype).removeprefix("torch."),
                "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                "transformers": transformers.__version__}

    # --- generation -------------------------------------------------------------------------

    def generate(self, prompts: list[str]) -> list[Generation]:
        """Results in input order. Rows finished before an out-of-memory error are kept; the
        rest are retried at half the batch size."""
        if not prompts:
            return []
        ids = self.encode(prompts)
        out: list[Generation | None] = [None] * len(prompts)
        while True:
            todo = [i for i, g in enumerate(out) if g is None]
            if not todo:
                return out
            oom = None
            try:
                if self.continuous:
                    self._continuous([ids[i] for i in todo], todo, out)
                else:
                    self._static([ids[i] for i in todo], todo, out)
            except Exception as e:
                if not is_oom(e):
                    raise GenerationError(f"{type(e).__name__}: {e}") from e
                oom = str(e)   # not the exception: its traceback holds the step's tensors
            if oom is None:
                continue
            # here the failed step's frames (and their tensors) are gone: the allocator can
            # give their memory back before the retry at half the batch
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if self.batch_size == 1:
                raise GenerationError(f"out of memory at batch size 1: {oom}")
            self.batch_size //= 2
            self.oom_cap = self.batch_size

    def _continuous(self, ids: list[list[int]], where: list[int], out: list) -> None:
        d = self.spec.decoding
        pick = (self._sampler(torch.Generator(self.device).manual_seed(d.seed)) if d.do_sample
                else lambda logits: logits.argmax(-1))

        def done(j: int, tokens: list[int], hit: bool) -> None:
            out[where[j]] = self._generation(tokens, hit)

        if self.batch_from == "gpu memory":
            shared = common_prefix(ids)
            self.batch_size = self._gpu_batch_size(max(map(len, ids)) - shared, shared)

        ContinuousDecoder(self.model, pad_id=self.tokenizer.pad_token_id, eos_ids=self.eos_ids,
                          max_new_tokens=d.max_new_tokens, batch_size=self.batch_size,
                          pick=pick).run(ids, done)

    def _sampler(self, generator: torch.Generator):
        warpers = self._warpers

        def pick(logits: torch.Tensor) -> torch.Tensor:
            probs = torch.softmax(warpers(None, logits), dim=-1)
            return torch.multinomial(probs, 1, generator=generator).squeeze(1)
        return pick

    def _static(self, ids: list[list[int]], where: list[int], out: list) -> None:
        """Beam search (or any decoding of a model whose cache the continuous decoder cannot
        handle) through ``generate``, in batches of similar length, longest first (an OOM
        shows up at once). ``batch_size`` counts rows, so a batch holds batch_size/num_beams
        prompts; small batches also waste less on the rows that finished first."""
        d = self.spec.decoding
        per_batch = max(1, self.batch_size // d.num_beams)
        order = sorted(range(len(ids)), key=lambda j: -len(ids[j]))
        with torch.inference_mode():
            prefix = SharedPrefix(self.model, ids, self.tokenizer.pad_token_id) \
                if self.plain_cache else None
            for start in range(0, len(order), per_batch):
                batch = order[start:start + per_batch]
                rows = [ids[j] for j in batch]
                inputs = beam_inputs(prefix, rows, d.num_beams) if prefix else \
                    self.tokenizer.pad({"input_ids": rows}, return_tensors="pt").to(self.device)
                if d.do_sample:
                    # seeded per batch from its prompts: same prompts in the same order, same
                    # samples
                    torch.manual_seed(zlib.crc32(repr((d.seed, rows)).encode()))
                seqs = self.model.generate(**inputs, generation_config=self.generation_config)
                for j, row in zip(batch, seqs[:, inputs["input_ids"].shape[1]:].tolist()):
                    end = next((k for k, t in enumerate(row) if t in self.eos_ids), None)
                    out[where[j]] = self._generation(row if end is None else row[:end],
                                                     end is None)

    def _generation(self, tokens: list[int], hit_max: bool) -> Generation:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        return Generation(text, hit_max, len(tokens))

    def close(self) -> None:
        del self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
