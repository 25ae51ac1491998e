"""Allocate what a `Layout` (deployments/layout.py) decided: weights, KV pool, host tier, runner.

Nothing here decides a size or a place; it allocates in the replica's memory resource
(`memory.allocation_scope()`), gives Grace advice where the layout says so (before the first
touch, so pages start where they belong), fills the weights and wraps them in the model and
its runner.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from deployments.config import AppArgs
from deployments.engine.kv_shares import KVShares
from deployments.engine.paged.cache_manager import CacheManager
from deployments.engine.paged.cuda_graphs import DecodeGraphs
from deployments.engine.paged.host_pool import HostKVPool
from deployments.engine.paged.kv_pool import KVPool
from deployments.engine.paged.model import DecoderModel
from deployments.engine.paged.runner import ModelRunner
from deployments.engine.paged.tier_mover import CopyMover
from deployments.engine.paged.weight_stream import WeightStreamer
from deployments.engine.paged.weights import ModelWeights, allocate, init_random, load_checkpoint
from deployments.layout import Layout
from deployments.memory import MemoryAccountant
from deployments.memory_advice import MemoryAdvisor
from deployments.model_spec import ModelSpec

logger = logging.getLogger(__name__)


@dataclass
class KVParts:
    """The KV storage and its bookkeeping: device pool, page owner map, host tier, mover."""

    pool: KVPool
    cache: CacheManager
    host_pool: HostKVPool | None
    mover: CopyMover | None


def torch_dtype(layout: Layout) -> torch.dtype:
    return getattr(torch, layout.dtype)


def load_weights(layout: Layout, spec: ModelSpec, args: AppArgs, memory: MemoryAccountant,
                 advisor: MemoryAdvisor | None, path: str) -> ModelWeights:
    """The weights, allocated and filled: streamed layers in pinned host memory, cold ones
    advised to the host (Grace), the rest on the device."""
    start = time.perf_counter()
    cold = frozenset(layout.cold_layers)
    with memory.allocation_scope():
        weights = allocate(spec, torch_dtype(layout), layout.device,
                           frozenset(layout.streamed_layers))
        if advisor:  # before the first touch, so pages start where they belong
            for index, block in enumerate(weights.blocks):
                advisor.prefer(block, "host" if index in cold else "device")
        if args.engine.random_weights:
            init_random(weights, seed=0)
        else:
            load_checkpoint(weights, spec, path)
    if advisor:
        for index, block in enumerate(weights.blocks):
            advisor.prefetch(block, "host" if index in cold else "device")
        if cold:
            logger.info("keeping %d of %d layers (%.2f GB) in host memory, read in place "
                        "over the coherent link", len(cold), spec.num_layers,
                        sum(weights.blocks[i].nbytes for i in cold) / 1e9)
    logger.info("weights: %.2f GB in %.1f s", weights.nbytes / 1e9, time.perf_counter() - start)
    return weights


def build_kv(layout: Layout, spec: ModelSpec, args: AppArgs, memory: MemoryAccountant,
             advisor: MemoryAdvisor | None) -> KVParts:
    """The device pool, its cache manager, and the host tier (managed and advised to the
    host on Grace, pinned elsewhere) with the mover between them."""
    with memory.allocation_scope():
        pool = KVPool(spec, layout.num_pages, layout.page_size, torch_dtype(layout),
                      layout.device)
    if advisor:
        advisor.prefer(pool.buffer, "device")
    cache = CacheManager(layout.num_pages, layout.page_size, reserved=1,
                         host_pages=layout.host_pages, shares=KVShares(args.kv_cache.key_share))
    host_pool = None
    if layout.host_pages and advisor:  # in the replica's own resource, already in its limit
        with memory.allocation_scope():
            host_pool = HostKVPool(pool, layout.host_pages, managed=True)
        advisor.prefer(host_pool.buffer, "host")
    elif layout.host_pages:
        host_pool = HostKVPool(pool, layout.host_pages)  # a tier of its own
    mover = CopyMover(pool, host_pool) if host_pool is not None else None
    return KVParts(pool, cache, host_pool, mover)


def build_runner(layout: Layout, spec: ModelSpec, args: AppArgs, memory: MemoryAccountant,
                 weights: ModelWeights, kv: KVParts, eos_ids: frozenset[int]) -> ModelRunner:
    """The model over the weights and KV pool (with its weight streamer when layers
    stream), its decode CUDA graphs where the layout allows them, and the runner."""
    use_gpu = layout.device.startswith("cuda")
    streamer = None
    if layout.streamed_layers:
        with memory.allocation_scope():
            streamer = WeightStreamer(weights, spec, list(layout.streamed_layers))
        logger.info("streaming %d of %d layers (%.2f GB a pass) from pinned host memory; "
                    "decode steps run without CUDA graphs", len(layout.streamed_layers),
                    spec.num_layers, streamer.bytes_per_pass / 1e9)
    model = DecoderModel(
        spec, weights, kv.pool, layout.max_model_len, use_triton=use_gpu,
        triton_prefill=use_gpu and args.engine.prefill_attention == "triton", streamer=streamer)
    graphs = None
    if layout.decode_graphs:
        graphs = DecodeGraphs(model, args.engine.max_num_seqs,
                              layout.pages_for(layout.max_model_len))
    else:
        logger.info("decode CUDA graphs off: %s", layout.graphs_off_reason)
    return ModelRunner(model, layout.page_size, graphs, eos_ids)
