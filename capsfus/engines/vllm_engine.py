"""``vllm``: vLLM's offline ``LLM`` over a whole chunk, for GPU fusion at scale.

UNTESTED HERE: vLLM cannot be installed on these machines (nor on the lent GPU). This module is
written against vLLM's documented API, read at v0.22.1 (``vllm/entrypoints/llm.py``,
``vllm/entrypoints/generate/beam_search/offline.py``, ``vllm/sampling_params.py``), and kept
thin: ``LLM(...)``, ``LLM.generate(prompts, SamplingParams)``, ``LLM.beam_search(prompts,
BeamSearchParams)`` and ``LLM.get_tokenizer()``, nothing internal. Tests check only that it
imports without vLLM and says how to install it.

Prompts go in as token ids (``{"prompt_token_ids": …}``) tokenized exactly as ``count_tokens``
counts them, so the prompt budget holds. vLLM schedules and pages its own KV cache, so there is
no batch size and no out-of-memory fallback here.
"""

from __future__ import annotations

from ..errors import UserError
from ..models import resolve_model
from .base import Engine, EngineSpec, Generation, GenerationError
from .hf_tokenizer import HFTokenizerMixin

DEFAULT_MAX_PROMPT_TOKENS = 256


class VllmEngine(HFTokenizerMixin, Engine):
    name = "vllm"

    def __init__(self, spec: EngineSpec):
        super().__init__(spec)
        try:
            import vllm
        except ImportError:
            raise UserError("the vllm engine needs vLLM, on a CUDA machine: pip install "
                            "'capsfus[vllm]' (or use --engine transformers)") from None
        d = spec.decoding
        if spec.gguf_file:
            raise UserError("--engine vllm: GGUF files need the base model's tokenizer in vLLM; "
                            "use --engine transformers for them")
        if d.num_beams > 1 and d.do_sample:
            raise UserError("--engine vllm: beam search with sampling is not supported")
        load_path, self.revision = resolve_model(spec.model, spec.revision)
        self.max_prompt_tokens = spec.max_prompt_tokens or DEFAULT_MAX_PROMPT_TOKENS
        # bf16 unless asked otherwise: the released inference's dtype, and the transformers
        # engine's on GPU (vLLM's own "auto" would pick float16 for many LLaMA checkpoints)
        self.dtype = "bfloat16" if spec.dtype == "auto" else spec.dtype
        self.vllm = vllm
        self.llm = vllm.LLM(model=load_path, tensor_parallel_size=spec.tensor_parallel_size,
                            dtype=self.dtype, seed=d.seed,
                            max_model_len=self.max_prompt_tokens + d.max_new_tokens)
        self.tokenizer = self.llm.get_tokenizer()
        self.setup_chat(spec.chat_template, spec.model)

    def describe(self) -> dict:
        d = super().describe()
        d["revision"] = self.revision
        return d

    def runtime(self) -> dict:
        return {"dtype": self.dtype, "tensor_parallel_size": self.spec.tensor_parallel_size,
                "vllm": self.vllm.__version__}

    def generate(self, prompts: list[str]) -> list[Generation]:
        ids = self.encode(prompts)
        inputs = [{"prompt_token_ids": x} for x in ids]
        d = self.spec.decoding
        try:
            if d.num_beams > 1:
                return self._beam_search(ids, inputs)
            params = self.vllm.SamplingParams(
                n=1, max_tokens=d.max_new_tokens,
                temperature=d.temperature if d.do_sample else 0.0,
                top_p=d.top_p if d.do_sample else 1.0,
                top_k=(d.top_k or -1) if d.do_sample else -1,
                seed=d.seed if d.do_sample else None)
            outputs = self.llm.generate(inputs, params, use_tqdm=False)
        except Exception as e:
            raise GenerationError(f"vllm: {type(e).__name__}: {e}") from e
        results = []
        for o in outputs:
            c = o.outputs[0]
            ended = c.finish_reason == "stop" and c.token_ids and \
                c.token_ids[-1] == self.tokenizer.eos_token_id
            results.append(Generation(c.text.strip(), c.finish_reason == "length",
                                      len(c.token_ids) - bool(ended)))
        return results

    def _beam_search(self, ids: list[list[int]], inputs: list[dict]) -> list[Generation]:
        """``BeamSearchOutput.sequences`` are best first and their ``tokens`` include the
        prompt; a finished beam ends with the EOS token."""
        d = self.spec.decoding
        params = self.vllm.sampling_params.BeamSearchParams(beam_width=d.num_beams,
                                                            max_tokens=d.max_new_tokens)
        results = []
        for prompt_ids, o in zip(ids, self.llm.beam_search(inputs, params)):
            tokens = list(o.sequences[0].tokens[len(prompt_ids):])
            ended = bool(tokens) and tokens[-1] == self.tokenizer.eos_token_id
            if ended:
                tokens.pop()
            text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
            results.append(Generation(text, not ended, len(tokens)))
        return results
