"""The ``vllm-server`` and ``sglang-server`` engines: each worker starts its own vLLM or SGLang
server (``engines.server``) on its GPU(s) and fuses through the OpenAI client
(``engines.openai_client``) with up to ``--server-max-seqs`` requests in flight, so the
server's continuous batching and prefix caching (the fusion instruction is most of every
prompt) stay full.

Prompts are built with the model's own tokenizer (loaded from the resolved model folder), so
budgets and cuts are exact, as with the transformers engine; they are sent to ``/completions``
as text, chat-rendered when the model has a chat template (``add_special_tokens: false`` then,
as the rendering holds them). Beam search is not offered: the servers' OpenAI APIs do not
beam-search the same way (use the transformers engine for the released 3-beam settings).

A server that dies is restarted once (the batch's unanswered requests are sent again); a
second death raises ``EngineServerDied``: the shard fails with its rows untouched. A request
that fails while the server lives is a row's problem: ``GenerationError``, so the stage
bisects down to the row, as for the openai engine.

Untested against real vLLM/SGLang: only fakes with the same command line and HTTP API ran.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

from ..errors import UserError
from .base import Engine, EngineSpec, Generation, GenerationError
from .hf_tokenizer import HFTokenizerMixin
from .server import (
    SERVER_KINDS,
    EngineServerDied,
    ServerError,
    ServerOptions,
    ServerProcess,
    tensor_parallel,
)

log = logging.getLogger("capsfus.server")

DEFAULT_MAX_PROMPT_TOKENS = 256
SERVER_DTYPES = {"auto": "auto", "float32": "float32", "bfloat16": "bfloat16",
                 "float16": "float16"}


def _context_length(path: str) -> int | None:
    try:
        from transformers import AutoConfig
        cfg = AutoConfig.from_pretrained(path)
    except Exception:
        return None
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        n = getattr(cfg, attr, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


class ServerEngine(HFTokenizerMixin, Engine):
    def __init__(self, spec: EngineSpec):
        super().__init__(spec)
        from ..models import resolve_model
        self.name = spec.engine
        self.kind = SERVER_KINDS[spec.engine]
        d = spec.decoding
        if d.num_beams > 1:
            raise UserError(f"--engine {spec.engine}: the server's OpenAI API does not "
                            f"beam-search like transformers; use --num-beams 1 (or --engine "
                            f"transformers for the released 3-beam settings)")
        if spec.gguf_file:
            raise UserError(f"--engine {spec.engine} takes a model folder or Hub id, not "
                            f"--gguf-file")
        path, _ = resolve_model(spec.model, spec.revision)
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise UserError(f"--engine {spec.engine} needs transformers for the model's "
                            f"tokenizer: pip install 'capsfus[transformers]'") from None
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.setup_chat(spec.chat_template, spec.model)
        new = d.max_new_tokens
        self.opts = ServerOptions(**(spec.server or {}))
        ctx = _context_length(path)
        if self.opts.max_model_len:       # the server holds no more than this
            ctx = min(ctx or self.opts.max_model_len, self.opts.max_model_len)
        room = ctx - new if ctx else None
        if room is not None and room < 1:
            raise UserError(f"model {spec.model}: its context ({ctx} tokens) cannot hold "
                            f"max_new_tokens={new}")
        if not spec.max_prompt_tokens and room:
            self.hard_prompt_tokens = room
        self.max_prompt_tokens = spec.max_prompt_tokens or min(
            DEFAULT_MAX_PROMPT_TOKENS, room or DEFAULT_MAX_PROMPT_TOKENS)
        self.tp = tensor_parallel(spec.tensor_parallel_size)
        worker = os.environ.get("CAPSFUS_WORKER_ID") or f"{os.getpid()}"
        log_dir = Path(spec.log_dir) if spec.log_dir else Path(tempfile.gettempdir())
        cache_base = Path(self.opts.cache_dir or os.environ.get("TMPDIR")
                          or tempfile.gettempdir())
        self.server = ServerProcess(
            self.kind, path, spec.model, self.tp, SERVER_DTYPES.get(spec.dtype, "auto"),
            self.opts, log_dir / f"server-{worker}.log",
            cache_base / f"capsfus-server-{worker}-{os.getpid()}")
        self.deaths = 0
        extra = {"temperature": d.temperature if d.do_sample else 0.0}
        if d.do_sample:
            extra.update(top_p=d.top_p, seed=d.seed)
            if d.top_k:
                extra["top_k"] = d.top_k
        if self.chat is not None:
            extra["add_special_tokens"] = False
        self._extra = extra
        atexit.register(self.close)
        try:
            self.server.start()
        except ServerError as e:
            self.close()
            raise UserError(f"--engine {spec.engine}: {e}") from None

    def __getstate__(self):
        raise TypeError("a server engine owns a running server and is never pickled")

    def describe(self) -> dict:
        d = super().describe()
        d.update(engine=self.name, tokens="the model's tokenizer")
        return d

    def runtime(self) -> dict:
        return {"server": self.kind, "tensor_parallel_size": self.tp,
                "concurrency": self.opts.max_num_seqs, **{
                    k: v for k, v in asdict(self.opts).items() if k != "extra_args"},
                "extra_args": list(self.opts.extra_args),
                "server_log": str(self.server.log_path)}

    def _client_settings(self):
        from .openai_client import ClientSettings
        return ClientSettings(endpoint=self.server.url, model=self.spec.model,
                              api="completions", concurrency=self.opts.max_num_seqs,
                              timeout=600.0, max_retries=2, backoff_base=0.5, backoff_max=5.0,
                              extra_body=self._extra)

    def _send(self, prompts: list[str]) -> list:
        from .openai_client import OpenAIClient
        new = self.spec.decoding.max_new_tokens
        settings = self._client_settings()

        async def run():
            client = OpenAIClient(settings, api_key="EMPTY")
            try:
                return await asyncio.gather(*(client.complete(p, max_tokens=new)
                                              for p in prompts))
            finally:
                await client.aclose()

        return asyncio.run(run())

    def _server_died(self) -> None:
        self.deaths += 1
        rc = self.server.proc.poll() if self.server.proc else None
        if self.deaths > 1:
            self.server.stop()
            raise EngineServerDied(f"the {self.kind} server died again (exit {rc}) after its "
                                   f"restart; see {self.server.log_path}")
        log.warning("the %s server died (exit %s): restarting it once", self.kind, rc)
        self.server.stop()
        try:
            self.server.start()
        except ServerError as e:
            self.deaths += 1
            raise EngineServerDied(f"the {self.kind} server died and did not come back: {e}"
                                   ) from None

    def generate(self, prompts: list[str]) -> list[Generation]:
        from .openai_client import EndpointFatal
        if self.deaths > 1 or self.server.proc is None:
            raise EngineServerDied(f"the {self.kind} server is gone (died {self.deaths} "
                                   f"times); see {self.server.log_path}")
        replies: list = [None] * len(prompts)
        todo = list(range(len(prompts)))
        while todo:
            if not self.server.alive():
                self._server_died()
            try:
                got = self._send([prompts[i] for i in todo])
            except EndpointFatal as e:
                if not self.server.alive():
                    continue
                raise UserError(f"--engine {self.name}: the local server refused: {e}"
                                ) from None
            for i, r in zip(todo, got):
                replies[i] = r
            failed = [i for i in todo if not replies[i].ok]
            if failed and not self.server.alive():
                todo = failed          # sent again after the restart
                continue
            if failed:
                r = replies[failed[0]]
                raise GenerationError(f"{len(failed)} of {len(prompts)} requests failed "
                                      f"({r.reason}: {r.detail})")
            todo = []
        return [Generation(text=(r.text or "").strip(), hit_max_tokens=r.finish_reason == "length",
                           n_tokens=(r.usage or {}).get("completion_tokens", 0))
                for r in replies]

    def close(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            server.stop()
            server.remove_cache()
