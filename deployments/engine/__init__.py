"""Model execution, importable and testable without Ray.

`Engine` is the contract (interface.py); `HFEngine` runs any transformers causal LM with a KV
cache per user (hf_engine.py). `load_engine_class` resolves the `engine.engine_class` setting.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING

from deployments.engine.interface import (
    CapacityError,
    Engine,
    EngineStats,
    GenerationOutput,
    GenerationRequest,
    RequestError,
    SamplingParams,
)

if TYPE_CHECKING:
    from deployments.config import AppArgs

logger = logging.getLogger(__name__)

__all__ = [
    "CapacityError",
    "Engine",
    "EngineStats",
    "GenerationOutput",
    "GenerationRequest",
    "RequestError",
    "SamplingParams",
    "load_engine_class",
    "select_engine_class",
]


def load_engine_class(path: str) -> type[Engine]:
    """Import `module:Class` and check it is an Engine."""
    module_name, _, class_name = path.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Engine)):
        raise TypeError(f"engine.engine_class {path!r} is not a deployments.engine.Engine")
    return cls


def select_engine_class(args: AppArgs) -> type[Engine]:
    """The configured engine; for `auto`, the paged engine when it supports the model."""
    if args.engine.engine_class != "auto":
        return load_engine_class(args.engine.engine_class)
    from deployments.engine.paged.engine import load_spec
    from deployments.model_spec import UnsupportedModel

    try:
        load_spec(args)
    except UnsupportedModel as exc:
        logger.warning("%s runs on the generic transformers engine: %s", args.model.model_id, exc)
        return load_engine_class("deployments.engine.hf_engine:HFEngine")
    return load_engine_class("deployments.engine.paged.engine:PagedEngine")
