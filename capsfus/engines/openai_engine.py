"""The ``openai`` engine: fusion through any OpenAI-compatible endpoint, e.g. a ``vllm serve``
of CapsFus-LLaMA on the cluster, through the same client as the teacher stage
(``engines.openai_client``: bounded concurrency, retries with backoff and Retry-After).

Each chunk's prompts are sent concurrently (``--batch-size`` in flight, default 16). Token
counts are estimated at 4 bytes per token (the endpoint's tokenizer is not known here), as
the teacher does, so the budget default is 512 such tokens. ``--chat-template off`` sends
the plain prompt ending in ``New Sentence:`` to ``/completions`` (what a base or finetuned
model expects); otherwise the prompt is one user message to ``/chat/completions``.

Answers are persisted by the stage's chunk commits (the fusion stage's journal): after a kill
only the requests of the chunk in flight are sent again (the teacher, which pays per request,
journals each one instead).

The key is read from the environment (``--api-key-env``, default ``OPENAI_API_KEY``) in each
worker: jobs carry only the variable's name. A row that keeps failing raises
``GenerationError`` for its batch, so the stage bisects down to it and rejects it
(``generation_error``); an endpoint that refuses everything (key, URL, model, quota) stops
the worker with one line.
"""

from __future__ import annotations

import asyncio

from ..errors import UserError
from .base import Engine, EngineSpec, Generation, GenerationError

DEFAULT_CONCURRENCY = 16
DEFAULT_MAX_PROMPT_TOKENS = 512


class OpenAIEngine(Engine):
    name = "openai"

    def __init__(self, spec: EngineSpec):
        super().__init__(spec)
        from ..prompt import approx_tokens, approx_truncate
        from .openai_client import ClientSettings, api_key_from_env, runtime_endpoint
        if not spec.endpoint:
            raise UserError("--engine openai needs --endpoint URL (e.g. http://host:8000/v1 "
                            "of a `vllm serve`)")
        d = spec.decoding
        if d.num_beams > 1:
            raise UserError("--engine openai: OpenAI-compatible endpoints do not beam-search; "
                            "use --num-beams 1")
        self._key = api_key_from_env(spec.api_key_env or "OPENAI_API_KEY")
        self._count, self._cut = approx_tokens, approx_truncate
        self.max_prompt_tokens = spec.max_prompt_tokens or DEFAULT_MAX_PROMPT_TOKENS
        api = "completions" if spec.chat_template == "off" else "chat"
        self.chat = (lambda user: user) if api == "chat" else None
        extra = {"temperature": d.temperature if d.do_sample else 0.0}
        if d.do_sample:
            extra.update(top_p=d.top_p, seed=d.seed)
        # fewer, shorter retries than the teacher's: the stage itself retries a failing batch
        # (bisecting it, --max-attempts), so a dead row costs seconds, not minutes
        # the spec holds the sanitized URL (it is pickled and recorded); the full one, with
        # credentials, comes from the environment
        self.settings = ClientSettings(endpoint=runtime_endpoint(spec.endpoint), model=spec.model,
                                       api=api,
                                       concurrency=spec.batch_size or DEFAULT_CONCURRENCY,
                                       max_retries=3, backoff_base=0.5, backoff_max=10.0,
                                       extra_body=extra)

    def __getstate__(self):
        raise TypeError("the openai engine holds an API key and is never pickled")

    def describe(self) -> dict:
        d = super().describe()
        d.update(api=self.settings.api, tokens="estimated, 4 bytes per token")
        return d

    def runtime(self) -> dict:
        return {"concurrency": self.settings.concurrency}

    def count_tokens(self, prompt: str) -> int:
        return self._count(prompt)

    def caption_tokens(self, text: str) -> int:
        return self._count(text)

    def truncate(self, text: str, n_tokens: int) -> str:
        return self._cut(text, n_tokens) if n_tokens > 0 else ""

    def generate(self, prompts: list[str]) -> list[Generation]:
        from .openai_client import EndpointFatal, OpenAIClient, redact, redact_url, sanitize_url
        url = self.settings.endpoint

        def clean(text: str) -> str:
            return redact_url(redact(str(text), self._key), url)
        new = self.spec.decoding.max_new_tokens

        async def run():
            client = OpenAIClient(self.settings, api_key=self._key)
            tasks = [asyncio.ensure_future(client.complete(
                [{"role": "user", "content": p}] if self.chat else p, max_tokens=new))
                for p in prompts]
            try:
                return await asyncio.gather(*tasks)
            finally:
                # a fatal answer (refused key) ends the batch: the other requests are
                # cancelled and awaited before the client closes, so none dies with the loop
                # (that printed a traceback from asyncio's shutdown)
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await client.aclose()

        try:
            replies = asyncio.run(run())
        except EndpointFatal as e:
            raise UserError(f"--endpoint {sanitize_url(url)}: {clean(e)}") from None
        failed = [r for r in replies if not r.ok]
        if failed:
            raise GenerationError(f"{len(failed)} of {len(prompts)} requests failed "
                                  f"({failed[0].reason}: {clean(failed[0].detail)})")
        return [Generation(text=(r.text or "").strip(), hit_max_tokens=r.finish_reason == "length",
                           n_tokens=(r.usage or {}).get("completion_tokens", 0))
                for r in replies]
