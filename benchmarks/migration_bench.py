"""Migration benchmark: do advised managed ranges stay put while the engine decodes?

    python -m benchmarks.migration_bench      # GPU machine with managed memory, ~1 minute

On Grace every tier is managed memory placed by advice; a page that migrates (device to host
and back) makes a step slower than the planner's floor. This builds our paged engine on managed
memory twice, Grace faked on this card (advised: half the layers and the host KV tier to the
host, the rest and the device KV pool to the GPU) and plain (managed, unadvised), runs a batch
of 8 users through 100 steady decode steps, and counts, per decode step, the bytes the driver
migrated into and out of the device-advised ranges and the host-advised ranges, and the page
faults there, from two sources: CUPTI's unified-memory counters, by address
(benchmarks/um_counters.py), and the CPU's page table (benchmarks/pagemap.py: after every decode
step, with the device synchronized, which pages of those ranges the CPU has mapped in RAM, and
how many changed since the last sample; on an x86 card the driver unmaps a page from the CPU
when it moves to the GPU and maps it when the CPU faults it back). After the window, every
advised range is read back (cuMemRangeGetAttribute, whole and in sub-ranges). Expected in a
steady decode loop: 0 bytes. A control then reads 4 MiB of the device KV pool from the CPU and
once from the GPU: its bytes must show in a source, or that source's zeros mean nothing. The
headline's bytes moved per step come from CUPTI where it opened, else from the page table, and
say which (`bytes_moved_source`).

Never asks for more managed memory than is free: the RMM limit is a quarter of the card's free
memory, at most 8 GiB, and the model (~1 GB) and pools are sized inside it. Without a GPU it
says so and exits. Writes benchmarks/results/residency-<card>.json (where managed memory
lives, per decode step; migration-<card>.json is cache_move_bench's: caches moved between
replicas).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import dataclasses
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.pagemap import PAGE, Track, residency
from benchmarks.um_counters import UmCounters, moved

MODEL = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
}
BATCH, STEPS, PROMPT = 8, 100, 64


def build(path: str, memory: Any, grace: bool) -> Any:
    """The engine: on `grace`, 4 of 8 layers and a host KV tier advised to the host."""
    from deployments.config import AppArgs
    from deployments.engine.paged.engine import PagedEngine

    memory.platform = dataclasses.replace(memory.platform, kind="grace" if grace else "discrete")
    h, v = MODEL["hidden_size"], MODEL["vocab_size"]
    layer = (h * (h + 2 * 512) + h * h + 3 * h * MODEL["intermediate_size"] + 2 * h) * 2
    budget = (2 * v * h + h) * 2 + 4 * layer if grace else None
    args = AppArgs.model_validate(
        {
            "model": {"model_id": path, "dtype": "bfloat16", "device_weight_budget_bytes": budget},
            "memory": {"mode": "managed"},
            "replica": {"num_gpus": 1},
            "kv_cache": {"budget_bytes": "96MiB", "host_tier_bytes": "256MiB" if grace else 0},
            "engine": {"random_weights": True, "max_num_seqs": 64},
        }
    )
    engine = PagedEngine(args, memory)
    engine.eos_token_ids = frozenset()
    return engine


def ranges(engine: Any) -> dict[str, list[tuple[int, int]]]:
    """(start, bytes) of the device-advised and host-advised ranges (all on the GPU when the
    engine has no advice: its weights and pool, as allocated)."""
    if engine.advice is None:
        tensors = [*engine.runner.model.w.blocks, engine.pool.buffer]
        return {
            "device": [(t.data_ptr(), t.numel() * t.element_size()) for t in tensors],
            "host": [],
        }
    out: dict[str, list[tuple[int, int]]] = {"device": [], "host": []}
    for p in engine.advice.placements.values():
        out[p.where].append((p.start, p.size))
    return out


def steady_window(
    engine: Any,
    counters: UmCounters | None,
    tracks: dict[str, Track] | None = None,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """A batch decoding; the window opens after its third step and spans STEPS decode steps.
    `tracks` are sampled (after `sync`) as it opens and after every step the engine logs."""
    from deployments.engine import GenerationRequest, SamplingParams
    from deployments.engine.paged.testing import step_log

    async def one(i: int) -> int:
        req = GenerationRequest(
            f"r{i}", f"u{i}", [100 + i] * PROMPT, SamplingParams(STEPS + 20, temperature=0.0)
        )
        return sum([len(o.token_ids) async for o in engine.generate(req)])

    async def batch() -> list[int]:
        return await asyncio.gather(*[one(i) for i in range(BATCH)])

    marks: dict[str, Any] = {}
    deadline = time.perf_counter() + 120  # the batch has steps to spare; never hang

    def wait_for(steps: int) -> int:
        while len(step_log(engine)) < steps and time.perf_counter() < deadline:
            time.sleep(0.0005)
        return len(step_log(engine))

    def sample() -> None:
        sync()
        for track in (tracks or {}).values():
            track.sample()

    def watch() -> None:
        seen = marks["s0"] = wait_for(len(step_log(engine)) + 3)
        marks["t0"], marks["w0"] = counters.timestamp() if counters else 0, time.perf_counter()
        sample()
        while seen < marks["s0"] + STEPS and time.perf_counter() < deadline:
            seen = wait_for(seen + 1)
            sample()
        marks["s1"], marks["t1"] = seen, counters.timestamp() if counters else 0
        marks["w1"] = time.perf_counter()

    watcher = threading.Thread(target=watch)
    watcher.start()
    tokens = asyncio.run(batch())
    watcher.join()
    steps = list(step_log(engine))[marks["s0"] : marks["s1"]]
    decode = [s for s in steps if s[2]]
    return {
        "tokens": tokens,
        "steps": len(steps),
        "decode_steps": len(decode),
        "t0": marks["t0"],
        "t1": marks["t1"],
        "window_s": marks["w1"] - marks["w0"],
        "step_ms_p50": sorted(s[3] for s in decode)[len(decode) // 2] * 1e3,
    }


def pagemap_tracks(where: dict[str, list[tuple[int, int]]]) -> tuple[dict[str, Track], str | None]:
    """A residency track per tier, or none and the reason where /proc/self/pagemap is unreadable."""
    try:
        residency(next((s for spans in where.values() for s, _ in spans), 0), PAGE)
    except OSError as exc:
        return {}, f"/proc/self/pagemap: {exc}"
    return {tier: Track(spans) for tier, spans in where.items()}, None


def pagemap_per_step(tracks: dict[str, Track], window: dict[str, Any]) -> dict[str, Any]:
    """Per tier: CPU-resident bytes (first, last, least, most), bytes moved over the window."""
    return {
        f"{tier}_advised": track.summary(window["decode_steps"]) for tier, track in tracks.items()
    }


def per_step(
    counters: UmCounters | None, window: dict[str, Any], where: dict[str, list[tuple[int, int]]]
) -> dict[str, Any]:
    if counters is None:
        return {"counters": None, "counters_unavailable": UmCounters.unavailable}
    records = counters.between(window["t0"], window["t1"])
    n = max(1, window["decode_steps"])
    out: dict[str, Any] = {"um_records_in_window": len(records)}
    for tier, spans in where.items():
        counts = moved(records, spans)
        out[f"{tier}_advised"] = counts
        out[f"{tier}_advised_bytes_moved_per_step"] = (
            counts["htod_bytes"] + counts["dtoh_bytes"]
        ) / n
    everywhere = moved(records, [(0, 1 << 64)])
    out["all_managed_bytes_moved_per_step"] = (
        everywhere["htod_bytes"] + everywhere["dtoh_bytes"]
    ) / n
    return out


def control(engine: Any, counters: UmCounters | None, pagemap: bool) -> dict[str, Any]:
    """Touch 4 MiB of the device KV pool from the CPU, then from the GPU: it must show, in CUPTI's
    records and in the page table (sampled before, between and after)."""
    import torch

    flat = engine.pool.buffer.view(-1)
    n = min(4 << 20, flat.numel() * flat.element_size()) // flat.element_size()
    span = (flat.data_ptr(), n * flat.element_size())
    track = Track([span]) if pagemap else None
    torch.cuda.synchronize()
    t0 = counters.timestamp() if counters else 0
    if track:
        track.sample()
    ctypes.string_at(*span)  # CPU reads managed pages
    if track:
        track.sample()
    float(flat[:n].float().sum())  # the GPU reads them again
    torch.cuda.synchronize()
    out: dict[str, Any] = {"touched_bytes": span[1]}
    if track:
        track.sample()
        out["pagemap"] = {  # resident: before, after the CPU's read, after the GPU's
            "resident_bytes": track.resident,
            "moved_bytes": track.moved_bytes,
            "sees_migrations": track.resident[1] >= span[1] and track.moved_bytes >= span[1],
        }
    if counters is None:
        return {**out, "counters": None}
    counts = moved(counters.between(t0, counters.timestamp()), [span])
    return {
        **out,
        **counts,
        "counters_see_migrations": counts["htod_bytes"] + counts["dtoh_bytes"] > 0,
    }


def headline(row: dict[str, Any], counters: UmCounters | None) -> dict[str, Any]:
    """The advised engine's figures: bytes moved per step from CUPTI where it opened, else from
    the page table (`bytes_moved_source` says which); both sources' control verdicts."""
    pagemap = row.get("pagemap") or {}
    source = "cupti" if counters is not None else "pagemap" if pagemap else None

    def bytes_per_step(tier: str) -> float | None:
        if source == "cupti":
            return row.get(f"{tier}_advised_bytes_moved_per_step")
        return pagemap[f"{tier}_advised"]["bytes_moved_per_step"] if source else None

    seen = {
        "cupti": row["control"].get("counters_see_migrations"),
        "pagemap": row["control"].get("pagemap", {}).get("sees_migrations"),
    }
    return {
        "steady_device_advised_bytes_moved_per_step": bytes_per_step("device"),
        "steady_host_advised_bytes_moved_per_step": bytes_per_step("host"),
        "bytes_moved_source": source,
        "counters_see_migrations": seen.get(source) if source else None,
        "cupti_sees_migrations": seen["cupti"],
        "pagemap_sees_migrations": seen["pagemap"],
        "pagemap_device_advised_cpu_resident_bytes_max": pagemap.get("device_advised", {}).get(
            "resident_bytes_max"
        ),
        "advice_kept": not row.get("advice_wrong_after_window"),
    }


def measure(engine: Any, counters: UmCounters | None, grace: bool) -> dict[str, Any]:
    """One engine's row: the steady window through both sources, the advice, the control."""
    import torch

    where = ranges(engine)
    tracks, no_pagemap = pagemap_tracks(where)
    window = steady_window(engine, counters, tracks, torch.cuda.synchronize)
    row = {
        "engine": "grace-faked (advised)" if grace else "discrete managed (no advice)",
        "batch": BATCH,
        **{k: window[k] for k in ("decode_steps", "window_s", "step_ms_p50")},
        **per_step(counters, window, where),
        "pagemap": pagemap_per_step(tracks, window) if tracks else None,
        "pagemap_unavailable": no_pagemap,
    }
    if engine.advice is not None:
        row["advice_wrong_after_window"] = engine.advice.check("after steady decode")
        row["advice_first_loss"] = engine.advice.first_loss
    row["control"] = control(engine, counters, pagemap=bool(tracks))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    opts = parser.parse_args()
    counters = UmCounters.start()  # before torch's first CUDA call (it runs cuInit itself)
    print("CUPTI calls (result):", UmCounters.calls, "->", UmCounters.unavailable or "enabled")
    import torch

    if not torch.cuda.is_available():
        print(
            "migration_bench measures managed-memory migrations on a CUDA GPU; this machine "
            "has none: skipped (nothing written)"
        )
        return
    from benchmarks.common import RESULTS, write_result
    from benchmarks.engine_bench import model_dir
    from deployments.config import AppArgs
    from deployments.memory import setup_memory
    from deployments.platform import detect_platform

    free, _ = torch.cuda.mem_get_info()
    limit = min(8 << 30, free // 4)  # never near the card's free memory
    if limit < 3 << 30:
        sys.exit(f"only {free / 2**30:.1f} GiB free: too little for this benchmark's 3 GiB")
    memory = setup_memory(
        AppArgs.model_validate(
            {"memory": {"mode": "managed", "pool_size_bytes": limit}, "replica": {"num_gpus": 1}}
        ).memory,
        detect_platform(),
        torch_allocator="native",
    )
    path = model_dir(MODEL)
    rows = []
    for grace in (True, False):
        engine = build(path, memory, grace)
        asyncio.run(_warm(engine))
        rows.append(measure(engine, counters, grace))
        print(json.dumps(rows[-1]), flush=True)
        asyncio.run(engine.shutdown())  # the limit holds both engines: nothing to free
    top = headline(rows[0], counters)
    out = write_result(
        "residency",
        {
            "model": "8-layer Llama (hidden 2048), random bf16 weights",
            "rmm_limit_bytes": limit,
            "free_bytes_at_start": free,
            "cupti_calls": UmCounters.calls,
            "cupti_unavailable": UmCounters.unavailable,
            "rows": rows,
            "headline": top,
        },
        opts.out or RESULTS,
    )
    print(json.dumps(top, indent=2))
    print("wrote", out)
    if counters is not None:
        counters.stop()


async def _warm(engine: Any) -> None:
    """One short batch first: the window sees no first-use work."""
    from deployments.engine import GenerationRequest, SamplingParams

    async def one(i: int) -> None:
        req = GenerationRequest(f"w{i}", None, [50 + i] * 32, SamplingParams(4))
        async for _ in engine.generate(req):
            pass

    await asyncio.gather(*[one(i) for i in range(BATCH)])


if __name__ == "__main__":
    main()
