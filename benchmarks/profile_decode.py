"""Where a decode step's time goes: host work, graph replay, and each kernel family.

    python -m benchmarks.profile_decode [--out DIR]   # GPU machine, ~1 minute
    python -m benchmarks.profile_decode --quick       # tiny config, any device

Our engine on the Llama 3.1 8B config (random bf16 weights) decodes at batch 1 and 64 with
512-token prompts. For each batch: the median step as the engine logs it (schedule, prepare,
replay, sample, deliver), the same step's CUDA-graph replay alone timed with CUDA events, and
the profiler's device time by kernel over a few engine steps. The difference between the first
two is host work the GPU waits for. Writes profile-decode-<card>.json; a diagnostic for the
engine's developers (engine_bench.py holds the claims).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS, copy_bandwidth, write_result
from benchmarks.engine_bench import (
    LLAMA_31_8B,
    QUICK,
    decode_steps,
    model_dir,
    random_prompts,
    run_requests,
)
from benchmarks.ours import build_ours
from deployments.engine.paged.testing import step_log


def replay_ms(engine: Any, batch: int, repeat: int = 50) -> float | None:
    """Median device time of one graph replay with the last step's inputs still in place."""
    graphs = engine.runner.graphs
    if graphs is None:
        return None
    size = next(b for b in graphs.buckets if b >= batch)
    graph = graphs.graphs[size]
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_table(engine: Any, prompts: list[list[int]], new_tokens: int) -> list[dict[str, Any]]:
    """Device time per kernel name over one request batch's decode (profiler)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + (
        [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
    )
    with profile(activities=activities) as prof:
        asyncio.run(run_requests(engine, prompts, [new_tokens] * len(prompts)))
    return by_device_time(prof)


def by_device_time(prof: Any, top: int = 25) -> list[dict[str, Any]]:
    """The profiler's kernels (and ops) with device time, most first."""
    rows = []
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", 0) or getattr(event, "cuda_time_total", 0)
        if device_us:
            rows.append(
                {"name": event.key[:90], "calls": event.count, "device_ms": device_us / 1e3}
            )
    rows.sort(key=lambda r: -r["device_ms"])
    return rows[:top]


def returning_user(
    engine: Any, rng: random.Random, vocab: int, history: int, new: int
) -> dict[str, Any]:
    """A user with a kept `history`-token cache sends `new` tokens: time to first token, the
    step that computes them, and its kernels."""
    from torch.profiler import ProfilerActivity, profile

    ttft, steps = [], []
    table: list[dict[str, Any]] = []
    for u in range(3):
        hist = random_prompts(rng, 1, history, vocab)[0]
        asyncio.run(run_requests(engine, [hist], [1], users=[f"back{u}"]))
        follow = hist + random_prompts(rng, 1, new, vocab)[0]
        since = len(step_log(engine))
        if u < 2:
            ttft.append(
                asyncio.run(run_requests(engine, [follow], [1], users=[f"back{u}"]))["ttft_s"][0]
            )
            steps += [s for (_, tokens, _, s) in list(step_log(engine))[since:] if tokens == new]
            continue
        activities = [ProfilerActivity.CPU] + (
            [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
        )
        with profile(activities=activities) as prof:
            asyncio.run(run_requests(engine, [follow], [1], users=[f"back{u}"]))
        table = by_device_time(prof)
    row = {
        "workload": "returning_user",
        "history_tokens": history,
        "new_tokens": new,
        "ttft_ms": [t * 1e3 for t in ttft],
        "step_ms": [s * 1e3 for s in steps],
        "kernels": table,
    }
    print(json.dumps({k: v for k, v in row.items() if k != "kernels"}), flush=True)
    for r in table[:15]:
        print(f"  {r['device_ms']:9.2f} ms  {r['calls']:6d}  {r['name']}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    opts = parser.parse_args()
    gpu = torch.cuda.is_available()
    config = QUICK if opts.quick else LLAMA_31_8B
    path = model_dir(config)
    vocab = config["vocab_size"]
    rng = random.Random(0)
    bandwidth = copy_bandwidth()
    kv_bytes = (4 << 30) if opts.quick else (24 << 30)
    engine = build_ours(
        path,
        "bfloat16" if gpu else "float32",
        kv_bytes,
        (4 << 30 if opts.quick else 17 << 30) + kv_bytes + (2 << 30),
    )
    weights = engine.weights_bytes
    kv_per_token = engine.page_bytes // engine.cache.page_size
    rows = []
    for batch in (1, 64):
        since = len(step_log(engine))
        prompts = random_prompts(rng, batch, 512, vocab)
        asyncio.run(run_requests(engine, prompts, [128] * batch))
        step = statistics.median(decode_steps(engine, batch, since)) * 1e3
        replay = replay_ms(engine, batch) if gpu else None
        floor = (weights + batch * 576 * kv_per_token) / bandwidth * 1e3
        table = kernel_table(engine, random_prompts(rng, batch, 512, vocab), 16)
        rows.append(
            {
                "batch": batch,
                "step_ms": step,
                "graph_replay_ms": replay,
                "floor_ms": floor,
                "host_ms": step - replay if replay else None,
                "kernels": table,
            }
        )
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "kernels"}), flush=True)
        for r in table[:15]:
            print(f"  {r['device_ms']:9.2f} ms  {r['calls']:6d}  {r['name']}", flush=True)
    rows.append(returning_user(engine, rng, vocab, 1024 if opts.quick else 8192, 64))
    asyncio.run(engine.shutdown())
    out = write_result(
        "profile-decode-quick" if opts.quick else "profile-decode",
        {
            "model": config.get("model_type"),
            "weights_bytes": weights,
            "copy_bandwidth_bytes_per_s": bandwidth,
            "rows": rows,
        },
        opts.out,
    )
    print("wrote", out)


if __name__ == "__main__":
    main()
