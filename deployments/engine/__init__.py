"""Model execution, importable and testable without Ray.

`Engine` is the contract (interface.py); `HFEngine` runs any transformers causal LM with a KV
cache per user (hf_engine.py). `load_engine_class` resolves the `engine.engine_class` setting.
"""

from __future__ import annotations

import importlib

from deployments.engine.interface import (
    Engine,
    EngineStats,
    GenerationOutput,
    GenerationRequest,
    RequestError,
    SamplingParams,
)

__all__ = [
    "Engine",
    "EngineStats",
    "GenerationOutput",
    "GenerationRequest",
    "RequestError",
    "SamplingParams",
    "load_engine_class",
]


def load_engine_class(path: str) -> type[Engine]:
    """Import `module:Class` and check it is an Engine."""
    module_name, _, class_name = path.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Engine)):
        raise TypeError(f"engine.engine_class {path!r} is not a deployments.engine.Engine")
    return cls
