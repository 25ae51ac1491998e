"""Host work per engine step: schedule, page table, upload, deliver, with the model stubbed out.

64 users (by default) each keep an 8k-token history; then all of them send a follow-up at
once and decode together. The model's forward is replaced by a stub that returns zero logits,
so the time between steps is the engine thread's own work (scheduling, building the step's
inputs and page table, sampling a 448-token vocabulary, delivering tokens to the event loop).
Runs on CPU or on a GPU (the stub's logits live on the engine's device).

    python -m benchmarks.host_step_bench [--users 64] [--history 8192] [--steps 64]

Writes benchmarks/results/host-step-<card or cpu>.json (the row is appended under the commit).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, card_name, git_commit
from benchmarks.engine_bench import model_dir

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "vocab_size": 448,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
PAGE = 16


def build_engine(users: int, history: int, steps: int):
    from deployments.config import AppArgs
    from deployments.engine.paged.engine import PagedEngine
    from deployments.memory import setup_memory
    from deployments.platform import detect_platform

    gpu = torch.cuda.is_available()
    context = history + steps + 64
    path = model_dir({**CONFIG, "max_position_embeddings": context})
    tokens = users * (context + PAGE) + 4096
    page_bytes = 2 * CONFIG["num_hidden_layers"] * PAGE * CONFIG["num_key_value_heads"] * 16 * 4
    args = AppArgs.model_validate(
        {
            "model": {"model_id": path, "dtype": "float32"},
            "replica": {"num_gpus": 1 if gpu else 0},
            "memory": {"mode": "managed"} if gpu else {"cpu_memory_budget_bytes": "4GiB"},
            "kv_cache": {"budget_bytes": tokens // PAGE * page_bytes},
            "engine": {
                "random_weights": True,
                "page_size": PAGE,
                "max_num_seqs": users,
                "max_batched_tokens": 8192,
                "cuda_graphs": False,
            },
        }
    )
    engine = PagedEngine(args, setup_memory(args.memory, detect_platform(use_gpu=gpu)))
    engine.eos_token_ids = frozenset()
    vocab = CONFIG["vocab_size"]

    def stub(tokens, meta, index):  # the model's cost removed: only the host's work is left
        return torch.zeros(index.shape[0], vocab, device=tokens.device)

    engine.runner.model.forward = stub
    engine.runner.graphs = None
    return engine


async def turn(engine, user: str, prompt: list[int], n: int) -> list[float]:
    """One request; the time each token arrived."""
    from deployments.engine import GenerationRequest, SamplingParams

    times = []
    req = GenerationRequest(
        f"r-{user}-{len(prompt)}", user, prompt, SamplingParams(n, temperature=0.0)
    )
    async for out in engine.generate(req):
        times += [time.perf_counter()] * len(out.token_ids)
    return times


async def measure(engine, users: int, history: int, steps: int) -> dict:
    prompts = [[100 + (u * 7 + i) % 300 for i in range(history)] for u in range(users)]
    for u, prompt in enumerate(prompts):  # each user's history, kept in its cache
        await turn(engine, f"u{u}", prompt, 1)
    follow = [[*p, 5, 6, 7] for p in prompts]
    arrivals = await asyncio.gather(
        *[turn(engine, f"u{u}", p, steps) for u, p in enumerate(follow)]
    )
    # Between the last user's first token and the first user's last, all decode together.
    start = max(t[0] for t in arrivals)
    end = min(t[-1] for t in arrivals)
    together = next(t for t in arrivals if t[0] == start)
    n = sum(1 for x in together if start < x <= end)
    return {
        "users": users,
        "history_tokens": history,
        "decode_steps_timed": n,
        "host_ms_per_step": (end - start) / max(n, 1) * 1e3,
    }


def append_row(row: dict) -> Path:
    """Add `row` to benchmarks/results/host-step-<card>.json: the results contract's card and
    commit (the latest row's) at the top, every row measured so far below."""
    out = RESULTS / f"host-step-{row['card']}.json"
    old = json.loads(out.read_text()) if out.exists() else {"rows": []}
    rows = old if isinstance(old, list) else old["rows"]  # a list: the first format
    out.write_text(
        json.dumps(
            {
                "bench": "host-step",
                "card": row["card"],
                "git_commit": row["commit"],
                "date": time.strftime("%Y-%m-%d"),
                "rows": [*rows, row],
            },
            indent=1,
        )
        + "\n"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--history", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--label", default="", help="e.g. 'before' or 'after'")
    parser.add_argument("--no-write", action="store_true")
    opts = parser.parse_args()
    engine = build_engine(opts.users, opts.history, opts.steps)
    try:
        row = asyncio.run(measure(engine, opts.users, opts.history, opts.steps))
    finally:
        asyncio.run(engine.shutdown())
    row = {"commit": git_commit()[:7], "card": card_name(), "label": opts.label, **row}
    print(json.dumps(row))
    if not opts.no_write:
        print(f"wrote {append_row(row)}")


if __name__ == "__main__":
    main()
