"""Building our paged engine for benchmarks: one memory set-up per process, random weights."""

from __future__ import annotations

import asyncio
import gc
import weakref
from typing import Any

import torch

_MEMORY: Any = None


def memory(limit_bytes: int) -> Any:
    """The process's memory accountant; set up once (RMM's current resource is global)."""
    global _MEMORY
    if _MEMORY is None:
        from deployments.config import AppArgs
        from deployments.memory import setup_memory
        from deployments.platform import detect_platform

        gpu = torch.cuda.is_available()
        args = AppArgs.model_validate(
            {
                "memory": {"mode": "managed", "pool_size_bytes": limit_bytes}
                if gpu
                else {"cpu_memory_budget_bytes": limit_bytes},
                "replica": {"num_gpus": 1 if gpu else 0},
            }
        )
        _MEMORY = setup_memory(args.memory, detect_platform(use_gpu=gpu), torch_allocator="native")
    return _MEMORY


def build_ours(path: str, dtype_name: str, kv_bytes: int, limit_bytes: int, **engine: Any) -> Any:
    """A PagedEngine on the checkpoint directory `path` (random weights, EOS ignored).

    `engine` holds engine settings, plus `host_tier_bytes` and `device_weight_budget_bytes`.
    """
    from deployments.config import AppArgs
    from deployments.engine.paged.engine import PagedEngine

    kv_cache = {"budget_bytes": kv_bytes, "host_tier_bytes": engine.pop("host_tier_bytes", 0)}
    model = {
        "model_id": path,
        "dtype": dtype_name,
        "device_weight_budget_bytes": engine.pop("device_weight_budget_bytes", None),
    }
    args = AppArgs.model_validate(
        {
            "model": model,
            "replica": {"num_gpus": 1 if torch.cuda.is_available() else 0},
            "memory": {"mode": "managed"} if torch.cuda.is_available() else {},
            "kv_cache": kv_cache,
            "engine": {
                "engine_class": "deployments.engine.paged.engine:PagedEngine",
                "random_weights": True,
                "max_num_seqs": 256,
                **engine,
            },
        }
    )
    eng = PagedEngine(args, memory(limit_bytes))
    eng.eos_token_ids = frozenset()  # benchmarks generate every requested token
    return eng


def release(engines: list[Any]) -> None:
    """Shut the engine in `engines` down and free its memory before the next one is built.

    Passed in a list the caller drops its own name for: an engine's thread and callbacks form
    reference cycles, so only a collection after the last reference goes frees its memory.
    """
    engine = engines.pop()
    asyncio.run(engine.shutdown())
    alive = weakref.ref(engine)
    del engine
    gc.collect()
    if alive() is not None:
        raise RuntimeError(f"a shut-down engine is still referenced by {gc.get_referrers(alive())}")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
