"""On a coherent Grace node the tiers are advice on managed memory, not copies.

With the platform faked as Grace (this machine has no GPU; tests/gpu checks the advice's effect
through the driver), the engine must keep weight layers beyond the device budget in place in
host memory (advised there, read over the link, no streaming buffers), hold the host KV tier in
the replica's own memory resource advised to the host, keep the device pool and resident layers
advised to the GPU, and compute exactly what the plain engine computes.
"""

from __future__ import annotations

import asyncio
import dataclasses

import torch

from deployments.capacity import replica_memory
from deployments.config import AppArgs
from deployments.engine import GenerationRequest, SamplingParams
from deployments.engine.paged.engine import PagedEngine
from deployments.engine.paged.sequence import Sequence
from deployments.engine.paged.testing import logits_for
from deployments.memory import setup_memory
from deployments.platform import detect_platform
from tests.cpu.test_weight_streaming import CONFIG, budget_for, checkpoint  # noqa: F401

PAGE_BYTES = 4 * 2 * CONFIG["num_hidden_layers"] * 2 * 16 * 4  # 4 tokens, k+v, 2 heads of 16


class RecordingAdvisor:
    """Records advice by range; where the range was last advised to live."""

    def __init__(self) -> None:
        self.preferred: dict[tuple[int, int], str] = {}
        self.prefetched: dict[tuple[int, int], str] = {}

    @staticmethod
    def key(t: torch.Tensor) -> tuple[int, int]:
        return t.data_ptr(), t.numel() * t.element_size()

    def prefer(self, tensor, where):
        self.preferred[self.key(tensor)] = where

    def prefetch(self, tensor, where, stream=None):
        self.prefetched[self.key(tensor)] = where


def make(path: str, budget: int | None, grace: bool, host_pages: int = 0):
    args = AppArgs.model_validate(
        {
            "model": {"model_id": path, "dtype": "float32", "device_weight_budget_bytes": budget},
            "memory": {"cpu_memory_budget_bytes": "256MiB"},
            "kv_cache": {
                "budget_bytes": 24 * PAGE_BYTES,
                "host_tier_bytes": host_pages * PAGE_BYTES,
            },
            "engine": {
                "page_size": 4,
                "max_batched_tokens": 64,
                "engine_class": "deployments.engine.paged.engine:PagedEngine",
            },
        }
    )
    memory = setup_memory(args.memory, detect_platform(use_gpu=False))
    advisor = None
    if grace:
        memory.platform = dataclasses.replace(memory.platform, kind="grace")
        advisor = RecordingAdvisor()
    return PagedEngine(args, memory, advisor), advisor, memory


def test_cold_layers_stay_in_host_memory_and_compute_the_same(checkpoint):  # noqa: F811
    grace, advice, _ = make(checkpoint, budget_for(2), grace=True)
    plain, _, _ = make(checkpoint, None, grace=False)
    w = grace.runner.model.w
    assert grace.runner.model.streamer is None  # read in place, never copied in
    where = [advice.preferred[advice.key(b)] for b in w.blocks]
    assert where == ["device"] * 5 + ["host"] * (CONFIG["num_hidden_layers"] - 5)
    assert [advice.prefetched[advice.key(b)] for b in w.blocks] == where
    assert advice.preferred[advice.key(grace.pool.buffer)] == "device"
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 400, (n,), generator=g).tolist() for n in (9, 21)]
    seqs = {
        e: [Sequence("t", None, list(p), SamplingParams(1)) for p in prompts]
        for e in (grace, plain)
    }
    a = logits_for(grace, [(s, len(s.token_ids)) for s in seqs[grace]])
    b = logits_for(plain, [(s, len(s.token_ids)) for s in seqs[plain]])
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


async def turn(eng, user, prompt, n=6):
    req = GenerationRequest("r", user, prompt, SamplingParams(n, temperature=0.0))
    return [t async for out in eng.generate(req) for t in out.token_ids]


def test_the_host_kv_tier_is_advised_managed_memory_counted_once(checkpoint):  # noqa: F811
    eng, advice, memory = make(checkpoint, None, grace=True, host_pages=96)
    flat, _, _ = make(checkpoint, None, grace=False, host_pages=0)
    host = eng.mover.host.buffer
    assert advice.preferred[advice.key(host)] == "host" and not host.is_pinned()
    assert eng.stats().extra["kv_host_tier"] == "managed memory advised to the host"
    free_before = replica_memory(memory.reading(), eng.stats()).snapshot.free_unified_memory_bytes
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(3, 400, (30,), generator=g).tolist() for _ in range(10)]
    firsts = [asyncio.run(turn(eng, f"u{i}", p)) for i, p in enumerate(prompts)]
    assert eng.cache.offloaded_users > 0 and eng.cache.evicted_users == 0
    follow = prompts[0] + firsts[0] + [4, 5]
    assert asyncio.run(turn(eng, "u0", follow)) == asyncio.run(turn(flat, "u0", follow))
    assert eng.cache.restored_users >= 1
    # Host-tier pages are inside the replica's memory resource: used pages count once.
    held = (eng.cache.usable_pages - eng.cache.free_pages) + eng.cache.host_used_pages()
    free_after = replica_memory(memory.reading(), eng.stats()).snapshot.free_unified_memory_bytes
    assert free_before - free_after == held * eng.page_bytes
    eng.check_integrity()
