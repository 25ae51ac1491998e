"""Allocate what a `Layout` (deployments/layout.py) decided: weights, KV pool, host tier, runner.

Nothing here decides a size or a place; it allocates in the replica's memory resource
(`memory.allocation_scope()`), gives Grace advice where the layout says so (before the first
touch, so pages start where they belong), fills the weights and wraps them in the model and
its runner.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass

import torch

from deployments.config import AppArgs
from deployments.engine.kv_shares import KVShares
from deployments.engine.paged.cache_manager import CacheManager
from deployments.engine.paged.chunk_window import ChunkWindow
from deployments.engine.paged.cuda_graphs import DecodeGraphs, PrefillGraphs
from deployments.engine.paged.host_pool import HostKVPool
from deployments.engine.paged.kv_pool import KVPool
from deployments.engine.paged.model import DecoderModel
from deployments.engine.paged.placer import Placer
from deployments.engine.paged.runner import ModelRunner
from deployments.engine.paged.tensor_parallel import SINGLE, TensorParallel
from deployments.engine.paged.tier_mover import CopyMover
from deployments.engine.paged.warmup import warm_up
from deployments.engine.paged.weight_stream import WeightStreamer
from deployments.engine.paged.weights import ModelWeights, allocate, init_random, load_checkpoint
from deployments.layout import Layout
from deployments.memory import MemoryAccountant
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


def load_weights(
    layout: Layout,
    spec: ModelSpec,
    args: AppArgs,
    memory: MemoryAccountant,
    placer: Placer | None,
    path: str,
    tp: TensorParallel = SINGLE,
) -> ModelWeights:
    """The weights, allocated and filled: streamed layers in pinned host memory, cold ones
    advised to the host (Grace), the rest on the device. With `tp`, `spec` is the rank's
    and it loads its parts only."""
    start = time.perf_counter()
    cold = frozenset(layout.cold_layers)
    with memory.allocation_scope():
        weights = allocate(
            spec,
            torch_dtype(layout),
            layout.device,
            frozenset(layout.streamed_layers),
            isolate=placer is not None and placer.isolate,
        )
        if placer:  # before the first touch, so pages start where they belong
            for index, block in enumerate(weights.blocks):
                placer.prefer(f"layer {index}", block, "host" if index in cold else "device")
            placer.phase("layer blocks advised")
        if args.engine.random_weights:
            init_random(weights, seed=0)
        else:
            load_checkpoint(weights, spec, path, tp)
    if placer:
        placer.phase("weights loaded")
        for index, block in enumerate(weights.blocks):
            placer.prefetch(f"layer {index}", block, "host" if index in cold else "device")
        placer.phase("layer blocks prefetched")
        if cold:
            logger.info(
                "keeping %d of %d layers (%.2f GB) in host memory, read in place "
                "over the coherent link",
                len(cold),
                spec.num_layers,
                sum(weights.blocks[i].nbytes for i in cold) / 1e9,
            )
    logger.info("weights: %.2f GB in %.1f s", weights.nbytes / 1e9, time.perf_counter() - start)
    return weights


def build_kv(
    layout: Layout, spec: ModelSpec, args: AppArgs, memory: MemoryAccountant, placer: Placer | None
) -> KVParts:
    """The device pool, its cache manager, and the host tier (managed and advised to the
    host on Grace, pinned elsewhere) with the mover between them."""
    isolate = placer is not None and placer.isolate
    with memory.allocation_scope():
        pool = KVPool(
            spec,
            layout.num_pages,
            layout.page_size,
            torch_dtype(layout),
            layout.device,
            isolate=isolate,
        )
    if placer:
        placer.prefer("device KV pool", pool.buffer, "device")
        placer.prefetch("device KV pool", pool.buffer, "device")
        placer.phase("device KV pool advised")
    cache = CacheManager(
        layout.num_pages,
        layout.page_size,
        reserved=1,
        host_pages=layout.host_pages,
        shares=KVShares(args.kv_cache.key_share),
        window=ChunkWindow(layout.chunk_lanes, layout.chunk_tokens, layout.page_size),
    )
    host_pool = None
    if layout.host_pages and placer:  # in the replica's own resource, already in its limit
        with memory.allocation_scope():
            host_pool = HostKVPool(pool, layout.host_pages, managed=True, isolate=isolate)
        placer.prefer("host KV tier", host_pool.buffer, "host")
        placer.prefetch("host KV tier", host_pool.buffer, "host")
        placer.phase("host KV tier advised")
    elif layout.host_pages:
        host_pool = HostKVPool(pool, layout.host_pages)  # a tier of its own
    mover = CopyMover(pool, host_pool) if host_pool is not None else None
    return KVParts(pool, cache, host_pool, mover)


def build_runner(
    layout: Layout,
    spec: ModelSpec,
    args: AppArgs,
    memory: MemoryAccountant,
    weights: ModelWeights,
    pool: KVPool,
    eos_ids: frozenset[int],
    placer: Placer | None = None,
    tp: TensorParallel = SINGLE,
) -> ModelRunner:
    """The model over the weights and KV pool (with its weight streamer when layers
    stream), its decode CUDA graphs where the layout allows them, and the runner; with
    `tp`, one rank's (its spec, weights and pool)."""
    use_gpu = layout.device.startswith("cuda")
    streamer = None
    if layout.streamed_layers:
        with memory.allocation_scope():
            streamer = WeightStreamer(weights, spec, list(layout.streamed_layers))
        logger.info(
            "streaming %d of %d layers (%.2f GB a pass) from pinned host memory; "
            "decode steps run without CUDA graphs",
            len(layout.streamed_layers),
            spec.num_layers,
            streamer.bytes_per_pass / 1e9,
        )
    model = DecoderModel(
        spec,
        weights,
        pool,
        layout.max_model_len,
        use_triton=use_gpu,
        triton_prefill=use_gpu and args.engine.prefill_attention == "triton",
        streamer=streamer,
        tp=tp,
    )
    graphs = prefill_graphs = None
    if layout.decode_graphs:
        graphs = DecodeGraphs(
            model, args.engine.max_num_seqs, layout.pages_for(layout.max_model_len)
        )
        prefill_graphs = _prefill_graphs(model, args, layout, graphs.pool)
    else:
        logger.info("decode CUDA graphs off: %s", layout.graphs_off_reason)
    if placer:
        placer.phase("runner built")
    return ModelRunner(model, layout.page_size, graphs, eos_ids, prefill_graphs)


def _prefill_graphs(
    model: DecoderModel, args: AppArgs, layout: Layout, pool: tuple
) -> PrefillGraphs | None:
    """Short one-sequence prefill chunks as CUDA graphs, where the config asks for them."""
    tokens = min(args.engine.prefill_graph_tokens, args.engine.max_batched_tokens)
    if tokens < 2 or not model.triton_prefill:
        return None
    started = time.perf_counter()
    graphs = PrefillGraphs(model, tokens, layout.pages_for(layout.max_model_len), pool)
    logger.info("prefill CUDA graphs captured in %.1f s", time.perf_counter() - started)
    return graphs


def warm(runner: ModelRunner, layout: Layout, placer: Placer | None) -> None:
    """Compile every kernel variant requests can hit (warmup.py), then read advice back;
    last, move every object start-up made into the collector's permanent generation."""
    warm_up(runner.model, layout.page_size, runner.eos_ids)
    if placer:
        placer.phase("warmed up")
    # A full collection walks every live object: with the model's modules, tokenizer and
    # Triton's caches that took 244 ms once in a run of returns (profile_returning), a
    # first token's worth of stall. Frozen objects are never walked again (vLLM does the same).
    gc.collect()
    gc.freeze()
