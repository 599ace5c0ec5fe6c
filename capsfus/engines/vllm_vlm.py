"""A vision-language chat model through vLLM for ``capsfus caption --engine vllm``.

UNTESTED HERE: vLLM cannot be installed on the development machines nor on the lent GPU
(DESIGN.md), so this stays thin and follows vLLM's documented offline API: ``LLM(...)`` once
per worker, then ``LLM.chat(conversations, SamplingParams)`` over a batch, each conversation
one user turn holding the image (``{"type": "image_pil", "image_pil": PIL.Image}``) and the
caption instruction of the chosen ``--format``. Greedy decoding, so a resumed chunk gives the
same captions. ``model`` is the local folder ``models.resolve_model`` pinned before submission.
"""

from __future__ import annotations

from .blip import Caption

MAX_SIDE = 1024   # images are downscaled to this longest side before they reach the model


class VllmCaptioner:
    input_size = None          # hand PIL images, not model-sized arrays
    clip_input_size = None

    def __init__(self, model: str, *, instruction: str,
                 max_new_tokens: int, batch_size: int, dtype: str = "auto",
                 tensor_parallel_size: int = 1):
        try:
            from vllm import LLM, SamplingParams
        except ImportError:
            from ..errors import UserError
            raise UserError("--engine vllm needs vLLM on the GPU workers: pip install vllm "
                            "(Linux + CUDA), or use --engine transformers") from None
        self.llm = LLM(model=model, dtype=dtype,
                       tensor_parallel_size=tensor_parallel_size,
                       limit_mm_per_prompt={"image": 1})
        self.params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        self.instruction = instruction
        self.batch_size = batch_size

    def describe(self) -> dict:
        import vllm
        return {"engine": "vllm", "vllm": vllm.__version__, "batch_size": self.batch_size}

    def caption(self, images: list, ids: list[str], clip_images=None) -> list[Caption]:
        out: list[Caption] = []
        for i in range(0, len(images), self.batch_size):
            convs = [[{"role": "user", "content": [
                {"type": "image_pil", "image_pil": im},
                {"type": "text", "text": self.instruction}]}]
                for im in images[i:i + self.batch_size]]
            for res in self.llm.chat(convs, self.params, use_tqdm=False):
                out.append(Caption(res.outputs[0].text.strip()))
        return out

    def close(self) -> None:
        self.llm = None
