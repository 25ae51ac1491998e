"""Chunked-attention layers keep only their current chunk (engine/paged/chunk_window.py).

Pure bookkeeping, no model: the lanes a Llama 4 config's layers get, the pages a kept cache
holds, what a returning user reuses, the scheduler releasing chunks behind a sequence, and a
128k-token Scout-shaped user's KV as the engine counts it against the planner's figure.
"""

from __future__ import annotations

import pytest

from deployments.config import AppArgs
from deployments.engine.interface import SamplingParams
from deployments.engine.paged.cache_manager import CacheManager
from deployments.engine.paged.chunk_window import ChunkWindow
from deployments.engine.paged.scheduler import Scheduler
from deployments.engine.paged.sequence import Sequence
from deployments.layout import plan_layout
from deployments.model_spec import ModelSpec
from deployments.plan.models import PRESETS, resolve_model


def scout_text(**overrides):
    """Scout's text config with its attention as published; dense layers (the KV is the
    same: MoE changes only the MLPs, which the paged engine does not run yet)."""
    import transformers

    text = {**PRESETS["llama-4-scout-17b-16e"]["text_config"], "moe_layers": []}
    text.pop("model_type")
    config = transformers.Llama4TextConfig(**{**text, **overrides})
    config.architectures = ["Llama4ForCausalLM"]
    return config


def test_scout_pages_hold_twelve_layers_in_four_lanes():
    spec = ModelSpec.from_hf_config(scout_text())
    lanes = spec.kv_lanes()
    assert lanes.layers_per_page == 12 and lanes.chunk_lanes == 3 and lanes.chunk == 8192
    assert [lanes.lane_of[i] for i in (3, 7, 47)] == [0, 0, 0]  # the NoPE layers
    assert [lanes.lane_of[i] for i in (0, 1, 2, 4, 46)] == [1, 1, 1, 1, 3]
    # every (lane, slot) holds exactly one layer
    assert len(set(zip(lanes.lane_of, lanes.slot_of, strict=True))) == 48
    assert max(lanes.slot_of) == 11


def test_models_without_chunked_layers_keep_one_lane_of_every_layer():
    spec = ModelSpec.from_hf_config(scout_text(attention_chunk_size=None))
    lanes = spec.kv_lanes()
    assert (lanes.layers_per_page, lanes.chunk_lanes, lanes.chunk) == (48, 0, 0)
    assert lanes.slot_of == tuple(range(48))
    # 5 full layers beside 43 chunked ones do not divide: one lane, nothing released
    odd = ModelSpec.from_hf_config(scout_text(no_rope_layers=[1] * 43 + [0] * 5))
    assert odd.kv_lanes().chunk_lanes == 0 and odd.kv_lanes().layers_per_page == 48


def test_an_attention_chunk_of_partial_pages_is_refused():
    spec = ModelSpec.from_hf_config(scout_text(attention_chunk_size=8200))
    args = AppArgs.model_validate({"kv_cache": {"budget_bytes": 2**30}})
    with pytest.raises(ValueError, match=r"engine\.page_size 16 does not divide"):
        plan_layout(spec, args, None, 2**40)
    with pytest.raises(ValueError, match="not whole pages"):
        ChunkWindow(3, 8200, 16)


def test_a_kept_cache_holds_its_current_chunk_in_chunked_lanes():
    w = ChunkWindow(lanes=3, chunk=32, page_size=16)
    assert [w.start(p) for p in (0, 31, 32, 63, 64, 100)] == [0, 0, 2, 2, 4, 6]
    assert w.kept_pages(20) == 2 + 3 * 2  # all in the first chunk
    assert w.kept_pages(40) == 3 + 3 * 1  # blocks 0-2; chunked lanes block 2 only
    assert w.kept_pages(64) == 4  # ends on a boundary: the next chunk starts empty
    # reuse: all of the current chunk, else up to the boundary before the divergence
    assert w.reusable(66, 70) == 66 and w.reusable(64, 70) == 64
    assert w.reusable(50, 70) == 32 and w.reusable(20, 70) == 0
    flat = w.flatten([10, 11, 12, 13], [[20, 21], [30, 31], [40, 41]])  # kv_len 60
    assert w.kept_pages(60) == len(flat)
    assert w.split(flat, 60) == ([10, 11, 12, 13], [[20, 21], [30, 31], [40, 41]], 2)
    kept, dropped = w.keep(flat, 60, 40)  # blocks 0-2, chunked lanes block 2
    assert kept == [10, 11, 12, 20, 30, 40] and dropped == [13, 21, 31, 41]
    kept, dropped = w.keep(flat, 60, 32)  # on the boundary: chunked lanes hold nothing
    assert kept == [10, 11] and len(dropped) == 8


def run_prompt(sched: Scheduler, seq: Sequence) -> list[tuple[int, int]]:
    """Schedule and advance `seq` until its prompt is computed: (computed, free pages) after
    each step."""
    sched.add(seq)
    trace = []
    while seq.num_computed < len(seq.token_ids):
        batch = sched.schedule()
        sched.advance(batch)
        sched.check_integrity()
        trace.append((seq.num_computed, sched.cache.free_pages))
    return trace


def test_free_pages_grow_back_as_a_sequence_crosses_chunk_boundaries():
    window = ChunkWindow(lanes=3, chunk=32, page_size=16)
    cache = CacheManager(200, 16, reserved=1, window=window)
    sched = Scheduler(cache, max_num_seqs=4, max_batched_tokens=16)
    seq = Sequence("r", "u", list(range(3, 163)), SamplingParams(1))
    trace = run_prompt(sched, seq)
    free = dict(trace)
    # Within a chunk each 16-token step takes a block's four pages (one a lane); the step
    # that starts a chunk frees the chunk before's six chunked pages (two blocks, three lanes).
    assert free[32] == free[16] - 4
    assert free[48] == free[32] - 4 + 6 and free[80] == free[64] - 4 + 6
    for computed, pages in trace:  # never more than a chunk of blocks in chunked lanes
        blocks = -(-computed // 16)
        held = cache.usable_pages - pages
        assert held <= blocks + 3 * (32 // 16 + 1)
    sched.finish(seq)
    sched.check_integrity()
    assert cache.usable_pages - cache.free_pages == window.kept_pages(160) == 10


def test_a_128k_scout_user_costs_what_the_planner_says():
    """The engine's figure ((used pages) * page bytes, as its stats count them) for a kept
    128k-token Scout user, the pages its scheduler gave and released, against the planner's."""
    spec = ModelSpec.from_hf_config(scout_text())
    args = AppArgs.model_validate(
        {
            "model": {"dtype": "bfloat16"},
            "kv_cache": {"budget_bytes": 10 * 2**30},
            "engine": {"max_batched_tokens": 8192},
        }
    )
    layout = plan_layout(spec, args, None, 2**40, device="cuda")
    window = ChunkWindow(layout.chunk_lanes, layout.chunk_tokens, layout.page_size)
    cache = CacheManager(layout.num_pages, layout.page_size, reserved=1, window=window)
    sched = Scheduler(cache, max_num_seqs=1, max_batched_tokens=8192)
    # 131,071 prompt tokens and the one it generates: 128k tokens, its next in its last chunk
    seq = Sequence("r", "scout", [5] * 131071, SamplingParams(1))
    trace = run_prompt(sched, seq)
    seq.land(7)
    sched.finish(seq)
    engine_bytes = (cache.usable_pages - cache.free_pages) * layout.page_bytes
    planner = resolve_model("llama-4-scout-17b-16e").kv_bytes(131072, 2)
    assert planner == pytest.approx(7.125 * 2**30)
    assert engine_bytes == pytest.approx(planner, rel=0.05)
    peak = max(cache.usable_pages - free for _, free in trace) * layout.page_bytes
    assert peak <= planner * 1.05  # while it ran too (a step's blocks beyond one chunk)
    # All layers in full would be 24 GiB: what the engine counted before chunked lanes.
    assert spec.kv_bytes_per_token(2) * 131072 == 24 * 2**30
    # Kept on a chunk boundary exactly, its chunked lanes hold nothing yet: 6 GiB.
    assert window.kept_pages(131072) * layout.page_bytes == 6 * 2**30
