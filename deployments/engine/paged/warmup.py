"""Every Triton kernel variant a request can meet, compiled at start-up instead of on its path.

Triton compiles a kernel again for each new specialization (every distinct `constexpr`, and
integer arguments equal to 1 or divisible by 16); the first request meeting one waited ~1 s
(a returning user's 12 turns took 1,310, 154, 1,295 and 1,104 ms on four of them). The
varying integers are now unspecialized (`do_not_specialize`) and every piece a kernel reads is
16-byte aligned (upload.py), so what varies per request is only the key-split count of the two
attention kernels: each value is compiled here, along with one prefill and one mixed step
through the whole model. Work runs on the pool's scratch page, which no sequence owns.
"""

from __future__ import annotations

import functools
import logging
import time

import torch

from deployments.engine.paged.attention import AttentionMetadata
from deployments.engine.paged.model import DecoderModel

logger = logging.getLogger(__name__)

DECODE_SPLITS = (1, 2, 4, 8, 16, 32)  # triton_attention.choose_splits' range
PREFILL_SPLITS = (1, 2, 4, 8, 16)  # triton_prefill.choose_splits' range


@functools.cache
def _jit_kernels() -> tuple:
    """Our Triton kernels (looked up once: the stats ask every period); () without Triton."""
    try:
        from deployments.engine.paged import (
            expert_gemv,
            fused,
            triton_attention,
            triton_prefill,
            triton_sampler,
        )
    except ImportError:
        return ()

    kernels = [
        triton_attention._split_kernel,
        triton_attention._merge_kernel,
        triton_prefill._prefill_kernel,
        triton_prefill._merge_kernel,
        triton_sampler._sample_kernel,
        expert_gemv._pair_gemv_kernel,
    ]
    kernels += [
        getattr(fused, name)
        for name in ("_add_rms_norm_kernel", "_rope_store_kernel", "_silu_mul_kernel")
        if hasattr(fused, name)
    ]
    return tuple(kernels)


def compiled_variants() -> int | None:
    """Kernel variants Triton has compiled in this process (None where it cannot tell)."""
    kernels = _jit_kernels()
    try:
        return (
            sum(len(cache[0]) for kernel in kernels for cache in kernel.device_caches.values())
            if kernels
            else None
        )
    except (AttributeError, IndexError, TypeError):
        return None


def _meta(
    query_lens: list[int], device: torch.device, page_size: int, lanes: int = 0
) -> AttentionMetadata:
    """Sequences of these query lengths, each its whole context, all on scratch page 0 (in
    each of `lanes` chunked lanes too)."""
    total = sum(query_lens)
    positions = torch.cat([torch.arange(n) for n in query_lens]).to(device)
    zeros = torch.zeros(total, dtype=torch.long, device=device)
    table = torch.zeros(len(query_lens), 1, dtype=torch.int32, device=device)
    return AttentionMetadata(
        positions=positions,
        write_pages=torch.zeros(total, dtype=torch.long, device=device),
        write_offsets=positions % page_size,
        page_table=torch.zeros(len(query_lens), 1, dtype=torch.int32, device=device),
        context_lens=torch.tensor(query_lens, dtype=torch.int32, device=device),
        query_lens=list(query_lens),
        context_lens_host=list(query_lens),
        decode_only=all(n == 1 for n in query_lens),
        lane_tables=((table, zeros),) * lanes,
    )


def _attention_variants(model: DecoderModel, page_size: int) -> None:
    from deployments.engine.paged.triton_attention import decode_attention
    from deployments.engine.paged.triton_prefill import prefill_attention

    spec, device = model.spec, model.w.embed.device
    dtype, keys, values = model.w.embed.dtype, model.pool.keys(0), model.pool.values(0)
    q = torch.randn(2, spec.num_heads, spec.head_dim, dtype=dtype, device=device)
    table = torch.zeros(2, 1, dtype=torch.int32, device=device)
    ctx = torch.full((2,), 2, dtype=torch.int32, device=device)
    for splits in DECODE_SPLITS:
        decode_attention(q, keys, values, table, ctx, model.scale, splits=splits)
    out = torch.empty_like(q)
    for splits in PREFILL_SPLITS:
        prefill_attention(
            q, keys, values, table[:1], ctx[:1], [0], [2], [0], model.scale, out, splits=splits
        )


def _sampler(model: DecoderModel, eos_ids: torch.Tensor) -> None:
    """The sampler's one variant (its settings are runtime values): a greedy and a sampled row."""
    from deployments.engine import SamplingParams
    from deployments.engine.paged.sampler import build_plan, sample

    device = model.w.embed.device
    logits = torch.randn(2, model.spec.vocab_size, device=device)
    plan = build_plan(
        [
            SamplingParams(1, temperature=0),
            SamplingParams(1, temperature=1.0, top_p=0.9, top_k=50, min_p=0.01),
        ],
        [1, 2],
        [False, True],
    )
    sample(logits, *plan.to_device(device), eos_ids)


def warm_up(model: DecoderModel, page_size: int, eos_ids: torch.Tensor) -> None:
    """Compile what requests will need: attention split variants, the sampler, a prefill step,
    a mixed (decode + prefill) step and a one-row decode step through the whole model. GPU
    only; CPU runs compile nothing."""
    device = model.w.embed.device
    if device.type != "cuda":
        return
    started, before = time.perf_counter(), compiled_variants()
    _attention_variants(model, page_size)
    _sampler(model, eos_ids)
    n = min(page_size, 16)
    # A prefill chunk, a decode row beside one, and a lone decode row (routed experts' per-pair
    # products: expert_gemv.py).
    for lens in ([n], [1, n], [1]):
        meta = _meta(lens, device, page_size, model.pool.lanes.chunk_lanes)
        tokens = torch.randint(0, model.spec.vocab_size, (sum(lens),), device=device)
        ends = torch.cumsum(torch.tensor(lens, device=device), 0) - 1
        model.forward(tokens, meta, ends)
    torch.cuda.synchronize()
    after = compiled_variants()
    logger.info(
        "warmed up kernels in %.1f s (%s variants compiled)",
        time.perf_counter() - started,
        "?" if after is None or before is None else after - before,
    )
