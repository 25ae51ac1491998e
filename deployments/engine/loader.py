"""Loading a model and tokenizer by hub id, local path, or `builtin:` name, with progress; and
the facts both engines read from a checkpoint the same way (end-of-sequence ids, KV bytes)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

from deployments.config import ModelConfig
from deployments.model_files import resolve_model_dir

logger = logging.getLogger(__name__)


def resolve_model_path(model_id: str, revision: str | None = None) -> str:
    """The local directory of a hub id (downloaded or found in the hub cache), local path, or
    built-in model, weights included; raises `ModelNotFound` saying why and what to do."""
    return resolve_model_dir(model_id, revision, weights=True)


def torch_dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def load_tokenizer(path: str, cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    )


def eos_token_ids(path: str, model_config: Any, tokenizer: Any) -> frozenset[int]:
    """End-of-sequence ids, for both engines: the checkpoint's generation config
    (generation_config.json, which often lists several, e.g. Llama 3's end-of-turn ids), its
    model config, and the tokenizer's."""
    from transformers import GenerationConfig

    ids: set[int] = set()
    try:
        sources = [GenerationConfig.from_pretrained(path), model_config]
    except OSError:  # no generation_config.json
        sources = [model_config]
    for source in sources:
        eos = getattr(source, "eos_token_id", None)
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


@contextlib.contextmanager
def _no_allocator_warmup() -> Iterator[None]:
    """Skip transformers' caching-allocator warm-up while PyTorch allocates through RMM.

    The warm-up reserves the model's size in PyTorch's caching allocator to speed up loading;
    with RMM there is no such cache, and PyTorch's pluggable allocator cannot report
    `memory_reserved`, which the warm-up calls (it fails with "does not yet support
    getDeviceStats").
    """
    import torch
    import transformers.modeling_utils as modeling_utils

    pluggable = torch.cuda.is_available() and (
        torch.cuda.memory.get_allocator_backend() == "pluggable"
    )
    original = getattr(modeling_utils, "caching_allocator_warmup", None)
    if not pluggable or original is None:
        yield
        return
    modeling_utils.caching_allocator_warmup = lambda *args, **kwargs: None
    try:
        yield
    finally:
        modeling_utils.caching_allocator_warmup = original


def load_model(path: str, cfg: ModelConfig, device: str) -> Any:
    """Load weights straight onto `device` (through RMM when it is the allocator).

    transformers shows a progress bar per checkpoint shard; this logs size and time.
    """
    from transformers import AutoModelForCausalLM

    dtype = torch_dtype(cfg.dtype, device)
    logger.info("loading %s (%s) onto %s ...", cfg.model_id, dtype, device)
    start = time.perf_counter()
    with _no_allocator_warmup():
        model = AutoModelForCausalLM.from_pretrained(
            path,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            dtype=dtype,
            device_map=device,
        )
    model.eval()
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    logger.info(
        "loaded %s: %.2f GB of weights in %.1f s",
        cfg.model_id,
        nbytes / 1e9,
        time.perf_counter() - start,
    )
    return model


def kv_bytes_per_token(model_config: Any, dtype_size: int) -> int:
    """Bytes of keys and values one token takes across all layers."""
    text = getattr(model_config, "get_text_config", None)
    cfg = text() if text is not None else model_config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * dtype_size
