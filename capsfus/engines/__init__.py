"""Engines behind one interface (base.Engine). Heavy ones are imported only when chosen, so an
``echo`` worker never loads torch."""

from __future__ import annotations

from ..errors import UserError
from .base import Decoding, Engine, EngineSpec, Generation, GenerationError

ENGINES = ("transformers", "vllm", "vllm-server", "sglang-server", "openai", "echo")

__all__ = ["Decoding", "Engine", "EngineSpec", "Generation", "GenerationError", "ENGINES",
           "load_engine"]


def load_engine(spec: EngineSpec) -> Engine:
    if spec.engine == "echo":
        from .echo import EchoEngine
        return EchoEngine(spec)
    if spec.engine == "transformers":
        if not spec.model:
            raise UserError("--engine transformers needs --model (a Hub id or a local folder)")
        try:
            from .transformers_engine import TransformersEngine
        except ImportError as e:
            raise UserError(f"the transformers engine needs torch and transformers "
                            f"({e.name} is missing): pip install 'capsfus[transformers]'"
                            ) from None
        return TransformersEngine(spec)
    if spec.engine == "vllm":
        if not spec.model:
            raise UserError("--engine vllm needs --model")
        from .vllm_engine import VllmEngine
        return VllmEngine(spec)
    if spec.engine in ("vllm-server", "sglang-server"):
        if not spec.model:
            raise UserError(f"--engine {spec.engine} needs --model (a Hub id or a local folder)")
        from .server_engine import ServerEngine
        return ServerEngine(spec)
    if spec.engine == "openai":
        if not spec.model:
            raise UserError("--engine openai needs --model (the name the endpoint serves)")
        from .openai_engine import OpenAIEngine
        return OpenAIEngine(spec)
    raise UserError(f"unknown engine {spec.engine!r}; choose one of {', '.join(ENGINES)}")
