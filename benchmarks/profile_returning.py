"""Where a returning user's first token goes, in process: the engine's share of the TTFT.

    python -m benchmarks.profile_returning [--returns 40]   # GPU machine, ~1.5 minutes
    python -m benchmarks.profile_returning --quick          # tiny config, any device

serve_bench's returning workload (one user, an 8k-token history, 40-90 new tokens a return)
run on the served config's engine in process, as engine_side runs it. For every return: the
TTFT, and the engine steps between its submission and its first token as the engine logged
them (count, tokens, seconds), so a slow return shows whether it waited behind other steps,
ran a slow prefill, or lost time outside the steps (garbage collection is timed too). The
last few returns run under the profiler: host ops and device kernels by total time. Writes
profile-returning-<card>.json; a diagnostic for the engine's developers.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_model import visible_ids, write_model_dir
from benchmarks.common import RESULTS, write_result
from benchmarks.engine_bench import LLAMA_31_8B, QUICK
from benchmarks.serve.engine_side import app_args, build_engine, engine_transport
from benchmarks.serve.metrics import percentile
from benchmarks.serve.sessions import SAMPLED, Call, random_words
from deployments.engine.paged.testing import step_log

CONFIGS = Path(__file__).parent / "configs"


class GcClock:
    """Total and longest garbage-collection pause while installed (gc.callbacks)."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float]] = []
        self._t = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        else:
            self.pauses.append((info["generation"], time.perf_counter() - self._t))


async def returns(
    engine: Any,
    args: Any,
    visible: list[int],
    count: int,
    history: int,
    seed: int = 0,
    think_s: float = 0.1,
    profiler: Any = None,
) -> list[dict[str, Any]]:
    """`count` returns of one user; each record: TTFT and the steps logged before it.
    A `profiler` (started and stopped here) covers the returns, not the history's prefill."""
    send, rng = engine_transport(engine, args), random.Random(seed)
    prompt, out, text = random_words(rng, visible, history), [], ""
    for turn in range(count + 1):
        if turn:
            prompt = f"{prompt} {text} {random_words(rng, visible, rng.randint(40, 90))}"
        if turn == 1 and profiler is not None:
            profiler.start()
        since = len(step_log(engine))
        reply = await send(Call(16, SAMPLED, prompt=prompt, user=f"returning-{seed}"))
        text = reply.text
        ttft = reply.chunk_t[0] if reply.chunk_t else None
        steps = list(step_log(engine))[since:]
        if turn and ttft is not None:
            # Steps launched up to the first token: its prefill and what ran before it.
            before, elapsed = [], 0.0
            for n, tokens, decode, seconds in steps:
                before.append(
                    {"seqs": n, "tokens": tokens, "decode": decode, "ms": round(seconds * 1e3, 3)}
                )
                elapsed += seconds
                if not decode:
                    break
            out.append(
                {
                    "turn": turn,
                    "ttft_ms": round(ttft * 1e3, 3),
                    "prompt_tokens": reply.prompt_tokens,
                    "cached_tokens": reply.cached_tokens,
                    "steps_to_first_token": before,
                    "outside_steps_ms": round(ttft * 1e3 - elapsed * 1e3, 3),
                }
            )
        await asyncio.sleep(think_s)
    if profiler is not None:
        profiler.stop()
    return out


def profiled(engine: Any, args: Any, visible: list[int], history: int) -> dict[str, Any]:
    """Host ops and device kernels by total time over three returns (not the history)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = profile(activities=acts)
    asyncio.run(returns(engine, args, visible, 3, history, seed=1, profiler=prof))
    table = prof.key_averages()
    host = sorted(table, key=lambda e: e.self_cpu_time_total, reverse=True)[:20]
    device = sorted(table, key=lambda e: getattr(e, "self_device_time_total", 0), reverse=True)[:20]
    return {
        "host_self_ms": [
            {"op": e.key, "ms": round(e.self_cpu_time_total / 1e3, 3), "count": e.count}
            for e in host
        ],
        "device_self_ms": [
            {
                "kernel": e.key,
                "count": e.count,
                "ms": round(getattr(e, "self_device_time_total", 0) / 1e3, 3),
            }
            for e in device
        ],
    }


def python_profile(
    engine: Any, args: Any, visible: list[int], history: int
) -> list[dict[str, Any]]:
    """cProfile of the engine thread's prefill launches over 10 returns: the Python functions
    by cumulative time (prefill is eager: its host work is what the step waits for)."""
    import cProfile
    import pstats

    prof, runner = cProfile.Profile(), engine.runner
    launch, schedule = runner.launch, engine.scheduler.schedule

    def profiled_launch(batch: Any, *a: Any, **k: Any) -> Any:
        if batch.decode_only:
            return launch(batch, *a, **k)
        prof.enable()
        try:
            return launch(batch, *a, **k)
        finally:
            prof.disable()

    def profiled_schedule() -> Any:
        prof.enable()
        try:
            return schedule()
        finally:
            prof.disable()

    runner.launch, engine.scheduler.schedule = profiled_launch, profiled_schedule
    try:
        asyncio.run(returns(engine, args, visible, 10, history, seed=3))
    finally:
        runner.launch, engine.scheduler.schedule = launch, schedule
    stats = pstats.Stats(prof)
    rows = []
    for (file, line, name), (_, calls, tottime, cumtime, _) in stats.stats.items():
        rows.append(
            {
                "function": f"{Path(file).name}:{line}:{name}",
                "calls": calls,
                "tottime_ms": round(tottime * 1e3, 3),
                "cumtime_ms": round(cumtime * 1e3, 3),
            }
        )
    return sorted(rows, key=lambda r: r["cumtime_ms"], reverse=True)[:40]


def summary_of(records: list[dict[str, Any]]) -> dict[str, Any]:
    ttfts = [r["ttft_ms"] for r in records]
    prefill = [r["steps_to_first_token"][-1]["ms"] for r in records]
    return {
        "returns": len(records),
        "ttft_ms_p50": statistics.median(ttfts),
        "ttft_ms_p99": percentile(ttfts, 99),
        "prefill_step_ms_p50": statistics.median(prefill),
        "prefill_step_ms_max": max(prefill),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--returns", type=int, default=40)
    parser.add_argument("--out", type=Path, default=RESULTS)
    opts = parser.parse_args()
    config = CONFIGS / ("serve-quick.yaml" if opts.quick else "serve-llama-8b.yaml")
    history = 1024 if opts.quick else 8192
    args = app_args(config)
    write_model_dir(args.model.model_id, QUICK if opts.quick else LLAMA_31_8B)  # serve_bench's
    engine = build_engine(args)
    visible = visible_ids(json.loads((Path(args.model.model_id) / "config.json").read_text()))
    clock = GcClock()
    gc.callbacks.append(clock)
    try:
        records = asyncio.run(returns(engine, args, visible, opts.returns, history))
        # The same returns with no pause between them: does an idle card slow the next one?
        busy = asyncio.run(
            returns(engine, args, visible, opts.returns, history, seed=2, think_s=0.0)
        )
        prof = profiled(engine, args, visible, history)
        prof["python_prefill_host"] = python_profile(engine, args, visible, history)
        by_path = engine.stats().extra.get("steps_by_path")
    finally:
        gc.callbacks.remove(clock)
        asyncio.run(engine.shutdown())
    summary = {
        "think_0.1s": summary_of(records),
        "think_0s": summary_of(busy),
        "gc_pauses": len(clock.pauses),
        "gc_pause_ms_max": round(max((s for _, s in clock.pauses), default=0) * 1e3, 3),
        "gc_gen2_pauses": sum(g == 2 for g, _ in clock.pauses),
        "steps_by_path": by_path,
    }
    slow = sorted(records, key=lambda r: r["ttft_ms"], reverse=True)[:5]
    print(json.dumps(summary), flush=True)
    for r in slow:
        print(json.dumps(r), flush=True)
    path = write_result(
        "profile-returning",
        {
            "config": str(config),
            "summary": summary,
            "slowest": slow,
            "returns": records,
            "returns_no_pause": busy,
            **prof,
        },
        opts.out,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
