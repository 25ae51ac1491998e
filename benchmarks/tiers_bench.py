"""KV tiers benchmark: restoring an offloaded user, and users held with and without the tier.

    python -m benchmarks.tiers_bench [--prefill-attention sdpa]   # GPU machine, ~3 minutes
    python -m benchmarks.tiers_bench --quick                        # tiny config, checks it

Llama 3.1 8B architecture, random bf16 weights, our paged engine with a pinned host tier. In one
run: the card's pinned host-to-device bandwidth; a user with an 8k-token history is moved down
to the host tier, then its pages are copied back (bytes moved / time, against that bandwidth);
its next turn of 64 tokens (time to first token: restore, then prefill of what it adds) against
recomputing its whole history with our own engine; and how many users with 8k-token histories a
fixed device KV budget holds before the first is dropped, without and with a host tier three
times its size; and decode with weights beyond a 2 GiB device budget streamed from host memory
(benchmarks/streaming.py), against its transfer floor and accelerate's offloading.
Writes benchmarks/results/tiers-<card>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    RESULTS,
    copy_bandwidth,
    host_to_device_bandwidth,
    sync,
    write_result,
)
from benchmarks.engine_bench import LLAMA_31_8B, QUICK, model_dir, run_requests
from benchmarks.ours import build_ours, release
from benchmarks.streaming import streaming_rows


def offload_everyone(engine: Any) -> None:
    """Move every idle user down and wait for the copies (benchmark set-up, engine idle)."""
    with engine._lock:
        engine.scheduler.keep_free(engine.cache.usable_pages)
        for move in list(engine.cache.moves):
            engine.mover.wait(move)
        engine.scheduler.poll()


def restore_bandwidth(engine: Any, user: str) -> dict[str, float]:
    """Copy an offloaded user's pages up, timed on the copy stream, then put them back."""
    from deployments.engine.paged.cache_manager import Move

    host_pages = engine.cache._users[user].host_pages
    dst = engine.cache.allocate(len(host_pages))
    move = Move(user, host_pages, dst, down=False)
    sync()
    start = time.perf_counter()
    engine.mover.launch(move)
    engine.mover.wait(move)
    seconds = time.perf_counter() - start
    engine.cache.free(dst)
    nbytes = len(host_pages) * engine.page_bytes
    return {"bytes": nbytes, "seconds": seconds, "bytes_per_s": nbytes / seconds}


def users_held(engine: Any, history: int, vocab: int, limit: int, rng: random.Random) -> int:
    """Users with `history`-token conversations served one by one until one is dropped."""
    for i in range(limit):
        prompt = [rng.randrange(100, vocab - 1) for _ in range(history)]
        asyncio.run(run_requests(engine, [prompt], [1], users=[f"held{i}"]))
        if engine.cache.evicted_users:
            return i
    return limit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--prefill-attention", choices=["sdpa", "triton"], default="triton")
    opts = parser.parse_args()
    gpu = torch.cuda.is_available()
    config = QUICK if opts.quick else LLAMA_31_8B
    path = model_dir(config)
    vocab = config["vocab_size"]
    dtype = "bfloat16" if gpu else "float32"
    history, new = (512, 16) if opts.quick else (8192, 64)
    rng = random.Random(0)
    pinned = host_to_device_bandwidth() if gpu else None
    kv_per_token = (
        2
        * config["num_hidden_layers"]
        * config["num_key_value_heads"]
        * (config["head_dim"])
        * (2 if gpu else 4)
    )
    user_bytes = history * kv_per_token
    device_kv = 8 * user_bytes  # a device budget of eight users' histories
    host_kv = 3 * device_kv
    # One RMM limit for every engine this process builds (RMM's resource is process-wide).
    limit = (4 << 30 if opts.quick else 17 << 30) + device_kv * 2 + (4 << 30)
    common = {
        "max_batched_tokens": 512 if opts.quick else 8192,
        "prefill_attention": opts.prefill_attention,
    }
    rows: list[dict[str, Any]] = []
    rows += streaming_rows(opts.quick, limit, pinned, copy_bandwidth() / 2)
    print(rows, flush=True)

    tiered = build_ours(path, dtype, device_kv, limit, host_tier_bytes=host_kv, **common)
    ttft_tier, ttft_recompute, restores = [], [], []
    for u in range(3):
        hist = [rng.randrange(100, vocab - 1) for _ in range(history)]
        asyncio.run(run_requests(tiered, [hist], [1], users=[f"back{u}"]))
        offload_everyone(tiered)
        restores.append(restore_bandwidth(tiered, f"back{u}"))
        follow = hist + [rng.randrange(100, vocab - 1) for _ in range(new)]
        back = asyncio.run(run_requests(tiered, [follow], [1], users=[f"back{u}"]))
        again = asyncio.run(run_requests(tiered, [follow], [1], users=None))  # no cache
        ttft_tier.append(back["ttft_s"][0])
        ttft_recompute.append(again["ttft_s"][0])
    restore = max(restores, key=lambda r: r["bytes_per_s"])
    rows.append(
        {
            "workload": "restore_offloaded_user",
            "history_tokens": history,
            **restore,
            "pinned_h2d_bytes_per_s": pinned,
            "share_of_pinned": restore["bytes_per_s"] / pinned if pinned else None,
        }
    )
    rows.append(
        {
            "workload": "returning_user_ttft",
            "history_tokens": history,
            "new_tokens": new,
            "from_host_tier_ms": statistics.median(ttft_tier) * 1e3,
            "recompute_ms": statistics.median(ttft_recompute) * 1e3,
        }
    )
    print(rows[-2:], flush=True)
    held = [tiered]
    del tiered
    release(held)

    held = [build_ours(path, dtype, device_kv, limit, **common)]
    without = users_held(held[0], history, vocab, 64, rng)
    release(held)
    held = [build_ours(path, dtype, device_kv, limit, host_tier_bytes=host_kv, **common)]
    with_tier = users_held(held[0], history, vocab, 64, rng)
    release(held)
    rows.append(
        {
            "workload": "users_held",
            "history_tokens": history,
            "device_kv_bytes": device_kv,
            "host_tier_bytes": host_kv,
            "without_tier": without,
            "with_tier": with_tier,
        }
    )
    print(rows[-1], flush=True)

    def row(workload: str, impl: str = "ours") -> dict[str, Any]:
        return next(r for r in rows if r["workload"] == workload and r.get("impl", "ours") == impl)

    ttft, streamed = row("returning_user_ttft"), row("streamed_weights_decode")
    accelerate = next((r for r in rows if r.get("impl") == "accelerate_dispatch_model"), None)
    headline = {
        "restore_share_of_pinned_bandwidth": row("restore_offloaded_user")["share_of_pinned"],
        "returning_user_ttft_speedup_vs_recompute": ttft["recompute_ms"]
        / ttft["from_host_tier_ms"],
        "users_held_growth": with_tier / max(1, without),
        "users_held_growth_target": (device_kv + host_kv) / device_kv * 0.9,
        "streamed_decode_step_over_floor": streamed["step_ms"] / streamed["floor_ms"]
        if streamed["floor_ms"]
        else None,
        "streamed_decode_speedup_vs_accelerate": accelerate["step_ms"] / streamed["step_ms"]
        if accelerate
        else None,
    }
    payload = {
        "model": "tiny Llama config (quick check)"
        if opts.quick
        else "Llama 3.1 8B config, random bf16 weights",
        "kv_bytes_per_token": kv_per_token,
        "prefill_attention": opts.prefill_attention,
        "device_read_bandwidth_definition": "half the measured copy bandwidth",
        "rows": rows,
        "headline": headline,
    }
    out = write_result("tiers-quick" if opts.quick else "tiers", payload, opts.out)
    print(json.dumps(headline, indent=2))
    print("wrote", out)


if __name__ == "__main__":
    main()
