"""The in-process phase: the served config's engine, built as LLMReplica builds it, without Ray.

    python -m benchmarks.serve.engine_side --config C.yaml --plan full --out R.json \
        --rows ROWS.jsonl --stop-at T

Run by serve_bench in a subprocess, so that its GPU memory is gone before `serve run` starts.
Measures the card's copy bandwidth, builds the engine from the config's `args` (platform,
memory set-up, engine class: the replica's own sequence), then runs every step of the plan
through `engine.stream_tokens` with the very sessions the HTTP phase runs. Each row is appended
to ROWS as it is measured; R.json gets them all with the bandwidth and engine figures.
The clock of a request starts after tokenization (which the replica does before the engine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

from benchmarks.bench_model import visible_ids
from benchmarks.serve.metrics import append_row, changes, summarize
from benchmarks.serve.report import brief, step_fields
from benchmarks.serve.sessions import Call, Reply, Transport, run_sessions
from benchmarks.serve.workloads import (
    PLANS,
    Plan,
    Step,
    describe_kv,
    kv_expectation,
    sessions_for,
    steps,
)
from deployments.engine.paged.testing import step_log


def app_args(config_path: Path) -> Any:
    """The validated `args` of the config's one application."""
    from deployments.config import parse_app_args

    data = yaml.safe_load(config_path.read_text())
    return parse_app_args(data["applications"][0]["args"])


def build_engine(args: Any) -> Any:
    """Platform, memory, engine: LLMReplica.__init__'s order, without Ray."""
    from deployments.engine import select_engine_class
    from deployments.memory import setup_memory
    from deployments.platform import detect_platform

    engine_cls = select_engine_class(args)
    platform = detect_platform(use_gpu=args.replica.num_gpus > 0)
    memory = setup_memory(args.memory, platform, engine_cls.torch_allocator)
    return engine_cls(args, memory)


def engine_transport(engine: Any, args: Any) -> Transport:
    """Calls answered by `engine.stream_tokens`, tokenized as the ingress tokenizes them
    (`args`: the served app's); items may be one id or a list of ids."""
    from deployments.engine import GenerationRequest, SamplingParams
    from deployments.engine.interface import RequestProgress
    from deployments.identity import user_key
    from deployments.model_files import resolve_model_dir
    from deployments.tokenizer import TextTokenizer

    tokenizer = TextTokenizer.load(
        resolve_model_dir(args.model.model_id, args.model.revision, weights=False)
    )

    async def send(call: Call) -> Reply:
        ids = (
            tokenizer.encode_chat(call.messages)
            if call.messages is not None
            else tokenizer.encode_text(call.prompt)
        )
        sampling = SamplingParams(
            call.max_tokens,
            temperature=call.sampling.temperature,
            top_p=call.sampling.top_p,
            ignore_eos=True,
            min_tokens=call.max_tokens,
        )
        request = GenerationRequest(
            uuid.uuid4().hex, user_key(call.user) if call.user else None, ids, sampling
        )
        progress, out = RequestProgress(), []
        reply = Reply(start=time.monotonic())
        try:
            async for item in engine.stream_tokens(request, progress):
                got = item if isinstance(item, list) else [item]
                reply.chunk_t.append(time.monotonic() - reply.start)
                reply.chunk_n.append(len(got))
                out.extend(got)
        except Exception as exc:  # a failed request is a record, not the end of the run
            reply.error = f"{type(exc).__name__}: {exc}"[:300]
        reply.end = time.monotonic()
        reply.text = engine.tokenizer.decode(out, skip_special_tokens=True)
        reply.prompt_tokens, reply.completion_tokens = len(ids), len(out)
        reply.cached_tokens = progress.cached_tokens
        return reply

    return send


def engine_figures(engine: Any) -> dict[str, Any]:
    """engine.stats() as JSON (the resident users as a count)."""
    stats = engine.stats()
    return {
        "kv_cache_bytes": stats.kv_cache_bytes,
        "kv_budget_bytes": stats.kv_budget_bytes,
        "resident_users": len(stats.resident_users),
        "evicted_users": stats.evicted_users,
        **stats.extra,
    }


def decode_figures(
    engine: Any, since: int, step: Step, plan: Plan, bandwidth: float
) -> dict[str, Any]:
    """Median decode-only step at the step's batch size, and its floor: (weights + KV bytes
    read per step) / copy bandwidth, KV at the mean context (engine_bench's definition)."""
    log = list(step_log(engine))[since:]
    times = [s for (n, _, decode, s) in log if decode and n == step.concurrency]
    if not times or not hasattr(engine, "weights_bytes"):
        return {"decode_steps": len(times)}
    kv_per_token = engine.page_bytes // engine.cache.page_size
    context = plan.prompt_tokens + plan.output_tokens / 2
    floor = (engine.weights_bytes + step.concurrency * context * kv_per_token) / bandwidth
    step_s = statistics.median(times)
    return {
        "decode_steps": len(times),
        "decode_step_ms": round(step_s * 1e3, 4),
        "floor_ms": round(floor * 1e3, 4),
        "step_over_floor": round(step_s / floor, 4),
    }


async def run_phase(
    engine: Any,
    args: Any,
    todo: list[Step],
    plan: Plan,
    stop_at: float,
    rows_path: Path,
    bandwidth: float,
    visible: list[int],
) -> list[dict[str, Any]]:
    """Every step of `todo` (of the plan) against the engine (built from the app's `args`);
    a row per step, appended as measured."""
    send, rows = engine_transport(engine, args), []
    for step in todo:
        now = time.monotonic()
        if now >= stop_at:
            rows.append({"side": "in_process", **step_fields(step), "skipped": "time budget"})
            print(f"[in_process] {step.name}: skipped (time budget spent)", flush=True)
            continue
        if step.kind == "multi_turn":
            print(describe_kv(kv_expect(engine, plan)), flush=True)
        before, since = engine_figures(engine), len(step_log(engine))
        records = await run_sessions(
            sessions_for(step, plan), send, visible, min(stop_at, now + step.cap_s)
        )
        row = {
            "side": "in_process",
            **step_fields(step),
            **summarize(records, step.kind, step.warmup),
        }
        if step.kind == "fixed":
            row.update(decode_figures(engine, since, step, plan, bandwidth))
        after = engine_figures(engine)
        row.update(engine_before=before, engine_after=after, engine_change=changes(before, after))
        append_row(rows_path, row)
        print(brief(row), flush=True)
        rows.append(row)
    return rows


def kv_expect(engine: Any, plan: Plan) -> dict[str, Any]:
    stats = engine.stats()
    return kv_expectation(
        plan, stats.kv_bytes_per_token, stats.extra.get("kv_page_size", 16), stats.kv_budget_bytes
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--plan", choices=sorted(PLANS), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=Path, required=True)
    parser.add_argument(
        "--stop-at", type=float, required=True, help="monotonic time after which no step starts"
    )
    parser.add_argument("--steps", help="comma-separated step names (default: every step)")
    opts = parser.parse_args()
    import torch

    from benchmarks.common import card_name, copy_bandwidth

    started = time.monotonic()
    bandwidth = copy_bandwidth()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the copy's buffers go back before the engine sizes its pool
    print(f"[in_process] copy bandwidth {bandwidth / 1e12:.3f} TB/s (read+write)", flush=True)
    args = app_args(opts.config)
    engine = build_engine(args)
    print(f"[in_process] engine built in {time.monotonic() - started:.1f} s", flush=True)
    model_config = json.loads((Path(args.model.model_id) / "config.json").read_text())
    plan = PLANS[opts.plan]

    async def phase() -> list[dict[str, Any]]:
        try:
            return await run_phase(
                engine,
                args,
                steps(plan, opts.steps),
                plan,
                opts.stop_at,
                opts.rows,
                bandwidth,
                visible_ids(model_config),
            )
        finally:
            await engine.shutdown()

    rows = asyncio.run(phase())
    stats = engine.stats()
    opts.out.write_text(
        json.dumps(
            {
                "card": card_name(),
                "copy_bandwidth_bytes_per_s": bandwidth,
                "weights_bytes": getattr(engine, "weights_bytes", None),
                "kv_bytes_per_token": stats.kv_bytes_per_token,
                "kv_budget_bytes": stats.kv_budget_bytes,
                "kv_expectation": kv_expect(engine, plan),
                "engine": type(engine).__name__,
                "seconds": round(time.monotonic() - started, 1),
                "rows": rows,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
