"""MoE decode benchmark: ours against its read floor and HF's forward (Scout or Qwen3-30B-A3B).

    python -m benchmarks.moe_bench --model scout --layers 24   # GPU: Llama 4 Scout's text model
    python -m benchmarks.moe_bench                             # GPU: Qwen3-30B-A3B, bf16
    python -m benchmarks.moe_bench --quick [--model scout]     # tiny config: checks the script

Builds the architecture with random bf16 weights: Llama 4 Scout's text model
(`Llama4ForCausalLM`: 16 experts of width 8192, top-1 plus a shared expert, 48 layers of
4.4 GB, cut with `--layers` to what fits the card) or Qwen3-30B-A3B (48 layers, 128 experts of
width 768, 8 per token). Measures the card's copy bandwidth, then times HF's own decode step at
batch 1 (HF `generate`, the difference of two lengths; HF first, its memory freed before ours
is built) and our decode step (median of decode-only steps, CUDA graphs) at batches 1, 8 and
64 with 512-token prompts. The floor of a step is the bytes it must read over the measured
bandwidth: every non-expert weight but the embedding table, the expected share of expert
bytes its n tokens pick under uniform routing, `1 - (1 - k/E)^n` (the planner's MoE read
model, `ModelFootprint.expert_share`; random routers route close to uniformly), and the KV it
reads. Writes benchmarks/results/moe-<card>.json (Scout) or moe-qwen3-30b-a3b-<card>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import statistics
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS, copy_bandwidth, write_result
from benchmarks.engine_bench import Rows, decode_steps, model_dir, random_prompts, run_requests
from benchmarks.hf_peer import build_hf, hf_decode_step
from benchmarks.ours import build_ours
from benchmarks.profile_decode import kernel_table, replay_ms
from deployments.engine.paged.testing import step_log
from deployments.plan.models import PRESETS

# Qwen/Qwen3-30B-A3B config.json (the published values).
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "attention_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
}
QUICK = {
    **QWEN3_30B_A3B,
    "hidden_size": 128,
    "intermediate_size": 256,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_experts": 16,
    "num_experts_per_tok": 4,
    "vocab_size": 2048,
    "max_position_embeddings": 4096,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
# meta-llama/Llama-4-Scout-17B-16E-Instruct's text_config (the planner's preset) as a text
# model; rope_scaling left out (it changes no byte a step reads).
SCOUT = {
    **PRESETS["llama-4-scout-17b-16e"]["text_config"],
    "architectures": ["Llama4ForCausalLM"],
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "bos_token_id": 200000,
    "eos_token_id": 200008,
    "torch_dtype": "bfloat16",
}
QUICK_SCOUT = {
    **SCOUT,
    "hidden_size": 128,
    "intermediate_size": 256,
    "intermediate_size_mlp": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_local_experts": 4,
    "vocab_size": 2048,
    "attention_chunk_size": 256,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
MODELS = {"qwen3-30b-a3b": (QWEN3_30B_A3B, QUICK), "scout": (SCOUT, QUICK_SCOUT)}
NAMES = {"qwen3-30b-a3b": "Qwen3-30B-A3B", "scout": "Llama 4 Scout text model"}
CONTEXT, NEW_TOKENS = 512, 128


def read_model(config: dict[str, Any], dtype_bytes: int) -> dict[str, Any]:
    """Bytes a decode step reads, from the planner's footprint of this config."""
    from transformers import AutoConfig

    from deployments.plan.models import footprint_from_config

    raw = dict(config)
    hf_config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    fp = footprint_from_config(raw.get("architectures", ["moe"])[0], "moe_bench", hf_config)
    return {
        "footprint": fp,
        "read_bytes": fp.read_params * dtype_bytes,  # the embedding table is idle
        "expert_bytes": fp.expert_params * dtype_bytes,
        "weights_bytes": fp.num_parameters * dtype_bytes,
    }


def floor_ms(model: dict[str, Any], batch: int, kv_per_token: int, bandwidth: float) -> float:
    kv = batch * (CONTEXT + NEW_TOKENS / 2) * kv_per_token
    experts = model["expert_bytes"] * model["footprint"].expert_share(batch)
    return (model["read_bytes"] + experts + kv) / bandwidth * 1e3


def hf_rows(path: str, dtype: torch.dtype, device: str, rng: random.Random, vocab: int) -> dict:
    """HF's own decode step at batch 1 (HF's model freed afterwards)."""
    hf = build_hf(path, dtype, device)
    step = hf_decode_step(hf, random_prompts(rng, 1, CONTEXT, vocab), device)
    del hf
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return {
        "impl": "hf_generate",
        "workload": "decode",
        "batch": 1,
        "context": CONTEXT,
        "step_ms": step * 1e3,
        "decode_tokens_per_s": 1 / step,
    }


def our_rows(
    ours: Any, batches: list[int], rng: random.Random, vocab: int, model: dict, bandwidth: float
) -> list[dict[str, Any]]:
    """Our median decode-only step at each batch size, against its floor."""
    kv_per_token = ours.page_bytes // ours.cache.page_size
    out = []
    for batch in batches:
        since = len(step_log(ours))
        prompts = random_prompts(rng, batch, CONTEXT, vocab)
        result = asyncio.run(run_requests(ours, prompts, [NEW_TOKENS] * batch))
        step = statistics.median(decode_steps(ours, batch, since))
        floor = floor_ms(model, batch, kv_per_token, bandwidth)
        replay = replay_ms(ours, batch) if torch.cuda.is_available() else None
        kernels = kernel_table(ours, random_prompts(rng, batch, CONTEXT, vocab), 8)
        out.append(
            {
                "impl": "ours",
                "workload": "decode",
                "batch": batch,
                "context": CONTEXT,
                "new_tokens": NEW_TOKENS,
                "step_ms": step * 1e3,
                "floor_ms": floor,
                "step_over_floor": step * 1e3 / floor,
                "expert_share_read": model["footprint"].expert_share(batch),
                "decode_tokens_per_s": batch / step,
                "e2e_tokens_per_s": result["generated_tokens"] / result["seconds"],
                "graph_replay_ms": replay,  # the step's device time; the rest is host work
                "kernels": kernels,  # device time by kernel (top 25): new batch, prefill + 8 steps
            }
        )
        print({k: v for k, v in out[-1].items() if k != "kernels"}, flush=True)
        for r in kernels[:12]:
            print(f"  {r['device_ms']:9.2f} ms  {r['calls']:6d}  {r['name']}", flush=True)
    return out


def headlines(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ours = {r["batch"]: r for r in rows if r["impl"] == "ours"}
    hf = next(r for r in rows if r["impl"] == "hf_generate")
    return {
        "ours_b1_step_over_floor": ours[1]["step_over_floor"],
        "ours_b64_step_over_floor": ours[64]["step_over_floor"] if 64 in ours else None,
        "ours_b1_speedup_vs_hf_forward": hf["step_ms"] / ours[1]["step_ms"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny config, checks the script")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--model", choices=sorted(MODELS), default="qwen3-30b-a3b")
    parser.add_argument("--layers", type=int, default=None, help="cut the model to N layers")
    opts = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype, dtype_name = (
        (torch.bfloat16, "bfloat16") if device == "cuda" else (torch.float32, "float32")
    )
    full, quick = MODELS[opts.model]
    config = dict(quick if opts.quick else full)
    if opts.layers:
        config["num_hidden_layers"] = opts.layers
    path, rng, vocab = model_dir(config), random.Random(0), config["vocab_size"]
    model = read_model(config, torch.finfo(dtype).bits // 8)
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read+write)", flush=True)
    rows: list[dict[str, Any]] = Rows(opts.out / f"moe-{opts.model}-rows.jsonl")
    rows.append(hf_rows(path, dtype, device, rng, vocab))
    print(rows[-1], flush=True)
    kv_bytes = (1 << 30) if opts.quick else (8 << 30)
    ours = build_ours(
        path,
        dtype_name,
        kv_bytes,
        model["weights_bytes"] + kv_bytes + (6 << 30),
        max_num_seqs=64,
        max_batched_tokens=512 if opts.quick else 8192,
    )
    for row in our_rows(ours, [1, 8, 64], rng, vocab, model, bandwidth):
        rows.append(row)
    kv_per_token = ours.page_bytes // ours.cache.page_size
    asyncio.run(ours.shutdown())
    fp = model["footprint"]
    payload = {
        "model": f"tiny {NAMES[opts.model]} config (quick check)"
        if opts.quick
        else f"{NAMES[opts.model]} config ({config['num_hidden_layers']} of "
        f"{full['num_hidden_layers']} layers), random bf16 weights",
        "config": config,
        "weights_bytes": model["weights_bytes"],
        "read_bytes_every_step": model["read_bytes"],
        "expert_bytes": model["expert_bytes"],
        "experts": {"num_experts": fp.num_experts, "experts_per_token": fp.experts_per_token},
        "kv_bytes_per_token": kv_per_token,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "floor_definition": "(non-expert weights but the embedding table + expert bytes x "
        "(1 - (1 - k/E)^batch) + KV read at the mean context) / measured copy bandwidth "
        "(bytes read + written per second)",
        "rows": rows,
        "headline": headlines(rows),
    }
    name = "moe" if opts.model == "scout" else f"moe-{opts.model}"  # the file: Scout
    out = write_result(name if not opts.quick else f"{name}-quick", payload, opts.out)
    print(json.dumps(payload["headline"], indent=2))
    print("wrote", out)


if __name__ == "__main__":
    main()
