"""Weights beyond the device budget: our streamed decode against its floor and accelerate.

Llama 3.2 3B architecture (6.4 GB in bf16) with a 2 GiB device budget for weights. Ours keeps
the embeddings and the first layers on the device and streams the rest from pinned host memory
every step; accelerate's `dispatch_model` with `max_memory` keeps what fits on the GPU and
moves offloaded layers in at each forward. Both decode at batch 1 after a 512-token prompt, with
the same weights. The floor is the streamed bytes over the measured pinned bandwidth plus the
resident bytes over the measured device bandwidth.
"""

from __future__ import annotations

import asyncio
import statistics
from typing import Any

import torch

from benchmarks.engine_bench import LLAMA_31_8B, model_dir, run_requests
from benchmarks.hf_peer import build_hf, hf_decode_step
from benchmarks.ours import build_ours, release
from deployments.engine.paged.testing import step_log

# The Llama 3.2 3B architecture: the 8B's family, smaller, tied embeddings, rope factor 32.
LLAMA_32_3B = {
    **LLAMA_31_8B,
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 28,
    "num_attention_heads": 24,
    "tie_word_embeddings": True,
    "rope_scaling": {**LLAMA_31_8B["rope_scaling"], "factor": 32.0},
}
QUICK_3B = {
    **LLAMA_32_3B,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "vocab_size": 2048,
    "max_position_embeddings": 16384,
}


def streaming_rows(
    quick: bool, limit: int, pinned_bw: float | None, device_bw: float
) -> list[dict[str, Any]]:
    config = QUICK_3B if quick else LLAMA_32_3B
    path = model_dir(config)
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    dtype, dtype_name = (torch.bfloat16, "bfloat16") if gpu else (torch.float32, "float32")
    budget = 12 << 20 if quick else 2 << 30  # quick: 1 of 8 layers resident (float32)
    hf = build_hf(path, dtype, device)
    ours = build_ours(path, dtype_name, 256 << 20, limit, device_weight_budget_bytes=budget)
    from deployments.engine.paged.weights import load_state

    load_state(ours.runner.model.w, ours.spec, hf.named_parameters())
    streamer = ours.runner.model.streamer
    streamed = streamer.bytes_per_pass if streamer else 0
    total = ours.runner.model.w.nbytes
    prompt = [[(7 * i) % (config["vocab_size"] - 200) + 100 for i in range(512)]]
    since = len(step_log(ours))
    asyncio.run(run_requests(ours, prompt, [32]))
    steps = [s for (n, _, decode, s) in list(step_log(ours))[since:] if decode and n == 1]
    step = statistics.median(steps)
    floor = streamed / pinned_bw + (total - streamed) / device_bw if pinned_bw else None
    rows = [
        {
            "impl": "ours",
            "workload": "streamed_weights_decode",
            "batch": 1,
            "device_weight_budget_bytes": budget,
            "weights_bytes": total,
            "streamed_bytes_per_step": streamed,
            "step_ms": step * 1e3,
            "floor_ms": floor * 1e3 if floor else None,
        }
    ]
    held = [ours]
    del ours
    release(held)  # the engine's weights and pool go back before accelerate's run
    if gpu:
        from accelerate import dispatch_model, infer_auto_device_map

        hf = hf.to("cpu")
        device_map = infer_auto_device_map(
            hf,
            max_memory={0: budget, "cpu": 400 << 30},
            no_split_module_classes=["LlamaDecoderLayer"],
        )
        hf = dispatch_model(hf, device_map=device_map)
        step = hf_decode_step(hf, prompt, device, short=2, long=6)
        rows.append(
            {
                "impl": "accelerate_dispatch_model",
                "workload": "streamed_weights_decode",
                "batch": 1,
                "device_weight_budget_bytes": budget,
                "step_ms": step * 1e3,
            }
        )
    return rows
