"""Engine benchmark: ours against HF `generate` and HF continuous batching, one run, one card.

    python -m benchmarks.engine_bench            # GPU machine: Llama 3.1 8B config, bf16
    python -m benchmarks.engine_bench --quick    # tiny config, any device: checks the script

Builds the Llama 3.1 8B architecture with random bf16 weights (HF's model; ours receives the
same weights), measures the card's copy bandwidth, then: decode step time and tokens/s across
batch sizes (512-token prompts) for ours and HF `generate`; time to first token of a returning
user with an 8k-token history sending 64 new tokens (ours from its kept cache, HF re-prefilling
the conversation, and HF with a kept DynamicCache); 256 requests with prompts of 128-4096 and
outputs of 32-512 tokens submitted at once (ours, HF continuous batching). EOS is ignored so
every request produces its full length. Writes benchmarks/results/engine-<card>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS, copy_bandwidth, write_result
from benchmarks.hf_peer import build_hf, hf_continuous_batching, hf_decode_step, hf_ttft
from benchmarks.ours import build_ours
from deployments.engine.paged.testing import logits_for, step_log

LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
}
QUICK = {
    **LLAMA_31_8B,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "vocab_size": 2048,
    "max_position_embeddings": 16384,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


class Rows(list):
    """Result rows, each also appended to a JSON-lines file as soon as it is measured."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("w")

    def append(self, row: dict[str, Any]) -> None:
        super().append(row)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()


def model_dir(config: dict[str, Any]) -> str:
    """A checkpoint directory without weights: config.json and a tokenizer."""
    from deployments.engine.builtin_tokenizer import write_tokenizer

    path = tempfile.mkdtemp(prefix="bench-model-")
    Path(path, "config.json").write_text(json.dumps(config))
    write_tokenizer(path)
    return path


def random_prompts(rng: random.Random, n: int, length: int, vocab: int) -> list[list[int]]:
    return [[rng.randrange(100, vocab - 1) for _ in range(length)] for _ in range(n)]


# ---- ours ------------------------------------------------------------------------------------

GREEDY = {"temperature": 0.0}
SAMPLED = {"temperature": 1.0, "top_p": 0.95}  # the API's default temperature, a usual top_p


async def run_requests(
    engine: Any,
    prompts: list[list[int]],
    outputs: list[int],
    users: list[str | None] | None = None,
    sampling: dict[str, float] = GREEDY,
) -> dict[str, Any]:
    from deployments.engine import GenerationRequest, SamplingParams
    from deployments.engine.interface import RequestProgress

    first_token: list[float] = []

    async def one(i: int) -> int:
        req = GenerationRequest(
            f"b{i}", users[i] if users else None, prompts[i], SamplingParams(outputs[i], **sampling)
        )
        start, count = time.perf_counter(), 0
        async for batch in engine.stream_tokens(req, RequestProgress()):
            if count == 0:
                first_token.append(time.perf_counter() - start)
            count += len(batch)
        return count

    start = time.perf_counter()
    counts = await asyncio.gather(*[one(i) for i in range(len(prompts))])
    return {
        "generated_tokens": sum(counts),
        "seconds": time.perf_counter() - start,
        "ttft_s": first_token,
    }


def decode_steps(engine: Any, batch: int, since: int) -> list[float]:
    return [s for (n, _, decode, s) in list(step_log(engine))[since:] if decode and n == batch]


# ---- the run ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny config, checks the script")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--hf-cb-limit-s", type=float, default=330)
    parser.add_argument(
        "--prefill-attention",
        choices=["sdpa", "triton"],
        default="triton",
        help="our engine's prefill attention (engine.prefill_attention)",
    )
    opts = parser.parse_args()
    quick = opts.quick
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype, dtype_name = (
        (torch.bfloat16, "bfloat16") if device == "cuda" else (torch.float32, "float32")
    )
    config = QUICK if quick else LLAMA_31_8B
    path = model_dir(config)
    rng = random.Random(0)
    vocab = config["vocab_size"]
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read+write)", flush=True)
    rows: list[dict[str, Any]] = Rows(opts.out / "engine-rows.jsonl")
    context = 512
    hf_batches = [1, 8] if quick else [1, 8, 16, 32, 64]
    our_batches = [1, 8] if quick else [1, 8, 16, 32, 64, 128, 256]
    history_len, new_len = (1024, 16) if quick else (8192, 64)

    # Ours first (with HF's weights), then HF: HF's continuous batching may keep its cache.
    hf = build_hf(path, dtype, device)
    weights_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    free = torch.cuda.mem_get_info()[0] if device == "cuda" else 8 << 30
    kv_bytes = int(min(64 << 30, 0.6 * (free - weights_bytes)))
    weights_limit = 4 << 30 if quick else 17 << 30
    ours = build_ours(
        path,
        dtype_name,
        kv_bytes,
        weights_limit + kv_bytes + (2 << 30),
        max_batched_tokens=512 if quick else 8192,
        prefill_attention=opts.prefill_attention,
    )
    from deployments.engine.paged.weights import load_state

    load_state(ours.runner.model.w, ours.spec, hf.named_parameters())  # the same weights
    correctness = compare_logits(ours, hf, rng, vocab, device)
    print("correctness", correctness, flush=True)
    kv_per_token = ours.page_bytes // ours.cache.page_size
    history = random_prompts(rng, 1, history_len, vocab)[0]
    new = random_prompts(rng, 1, new_len, vocab)[0]
    n_mixed = 16 if quick else 256
    mixed_prompts = [
        [rng.randrange(100, vocab - 1) for _ in range(rng.randint(128, 4096))]
        for _ in range(n_mixed)
    ]
    mixed_outputs = [rng.randint(32, 512) for _ in range(n_mixed)]

    runs = [(b, "greedy", GREEDY) for b in our_batches] + [
        (b, "sampled", SAMPLED) for b in (1, 64)
    ]  # at temperature 1.0 / top_p 0.95 too
    for batch, name, sampling in runs:
        new_tokens = 128 if batch in (1, 64) else 64
        since = len(step_log(ours))
        result = asyncio.run(
            run_requests(
                ours,
                random_prompts(rng, batch, context, vocab),
                [new_tokens] * batch,
                sampling=sampling,
            )
        )
        step = statistics.median(decode_steps(ours, batch, since))
        kv_read = batch * (context + new_tokens / 2) * kv_per_token
        rows.append(
            {
                "impl": "ours",
                "workload": "decode",
                "batch": batch,
                "context": context,
                "sampling": name,
                **sampling,
                "new_tokens": new_tokens,
                "step_ms": step * 1e3,
                "floor_ms": (weights_bytes + kv_read) / bandwidth * 1e3,
                "decode_tokens_per_s": batch / step,
                "e2e_tokens_per_s": result["generated_tokens"] / result["seconds"],
            }
        )
        print(rows[-1], flush=True)

    ttfts = []
    for u in range(3):
        hist = random_prompts(rng, 1, history_len, vocab)[0]
        asyncio.run(run_requests(ours, [hist], [1], users=[f"user{u}"]))
        follow = hist + [rng.randrange(100, vocab - 1) for _ in range(new_len)]
        second = asyncio.run(run_requests(ours, [follow], [1], users=[f"user{u}"]))
        ttfts.append(second["ttft_s"][0])
    rows.append(
        {
            "impl": "ours",
            "workload": "returning_user_ttft",
            "history_tokens": history_len,
            "new_tokens": new_len,
            "ttft_ms": statistics.median(ttfts) * 1e3,
            "note": "served from the kept cache",
        }
    )
    print(rows[-1], flush=True)

    mixed = asyncio.run(run_requests(ours, mixed_prompts, mixed_outputs))
    prompt_tokens = sum(len(p) for p in mixed_prompts)
    rows.append(
        {
            "impl": "ours",
            "workload": "mixed_256",
            "requests": n_mixed,
            "prompt_tokens": prompt_tokens,
            "generated_tokens": mixed["generated_tokens"],
            "seconds": mixed["seconds"],
            "complete": True,
            "tokens_per_s": mixed["generated_tokens"] / mixed["seconds"],
            "preempted_requests": ours.stats().extra["preempted_requests"],
        }
    )
    print(rows[-1], flush=True)
    pool_bytes = ours.pool.nbytes
    asyncio.run(ours.shutdown())
    del ours

    for batch in hf_batches:
        step = hf_decode_step(hf, random_prompts(rng, batch, context, vocab), device)
        rows.append(
            {
                "impl": "hf_generate",
                "workload": "decode",
                "batch": batch,
                "context": context,
                "step_ms": step * 1e3,
                "decode_tokens_per_s": batch / step,
            }
        )
        print(rows[-1], flush=True)
    hf_t = hf_ttft(hf, history, new, device)
    rows.append(
        {
            "impl": "hf_generate",
            "workload": "returning_user_ttft",
            "history_tokens": history_len,
            "new_tokens": new_len,
            "ttft_ms": hf_t["full_prefill_ms"],
            "note": "re-prefills the conversation",
        }
    )
    rows.append(
        {
            "impl": "hf_kept_dynamic_cache",
            "workload": "returning_user_ttft",
            "history_tokens": history_len,
            "new_tokens": new_len,
            "ttft_ms": hf_t["kept_cache_ms"],
        }
    )
    print(hf_t, flush=True)
    if device == "cuda":
        torch.cuda.empty_cache()
        try:
            cb = hf_continuous_batching(hf, mixed_prompts, mixed_outputs, opts.hf_cb_limit_s)
            rows.append(
                {
                    "impl": "hf_generate_batch",
                    "workload": "mixed_256",
                    "requests": n_mixed,
                    **cb,
                    "tokens_per_s": cb["generated_tokens"] / cb["seconds"],
                }
            )
        except Exception as exc:  # keep the run's other numbers
            rows.append(
                {
                    "impl": "hf_generate_batch",
                    "workload": "mixed_256",
                    "error": f"{type(exc).__name__}: {exc}",
                }
            )
        print(rows[-1], flush=True)
    headline = headlines(rows)
    payload = {
        "model": (
            "tiny Llama config (quick check)"
            if quick
            else "Llama 3.1 8B config, random bf16 weights"
        ),
        "weights_bytes": weights_bytes,
        "kv_bytes_per_token": kv_per_token,
        "kv_pool_bytes": pool_bytes,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "floor_definition": "(weights + KV bytes read per step) / measured copy bandwidth "
        "(bytes read + written per second)",
        "tokens_per_s_definition": "decode: batch / median decode-only step time; "
        "mixed_256: generated tokens / wall time from submission",
        "prefill_attention": opts.prefill_attention,
        "rows": rows,
        "correctness_8b_bf16_vs_hf": correctness,
        "headline": headline,
    }
    path_out = write_result("engine" if not quick else "engine-quick", payload, opts.out)
    print(json.dumps(headline, indent=2))
    print("wrote", path_out)


def compare_logits(
    ours: Any, hf: Any, rng: random.Random, vocab: int, device: str
) -> dict[str, Any]:
    """Ours and HF's forward on the same weights and tokens: a mixed batch's logits, each
    also against HF's forward in float32."""
    from deployments.engine import SamplingParams
    from deployments.engine.paged.sequence import Sequence

    convs = [[rng.randrange(100, vocab - 1) for _ in range(n)] for n in (300, 700, 257)]
    seqs = [Sequence("c", None, c, SamplingParams(1)) for c in convs]

    step = functools.partial(logits_for, ours)
    step([(seqs[0], 299), (seqs[1], 600)])
    got = step([(seqs[0], 1), (seqs[1], 100), (seqs[2], 257)])

    def hf_logits() -> list[torch.Tensor]:
        with torch.inference_mode():
            return [
                hf(input_ids=torch.tensor([s.token_ids], device=device)).logits[0, start:].float()
                for s, start in zip(seqs, (299, 600, 0), strict=True)
            ]

    def compare(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float]:
        err = max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))
        agree = sum(int((x.argmax(-1) == y.argmax(-1)).sum()) for x, y in zip(a, b, strict=True))
        return err, agree / sum(y.shape[0] for y in b)

    ref = hf_logits()
    ours.cache.free([p for s in seqs for p in s.all_pages()])
    err, agree = compare(got, ref)
    out: dict[str, Any] = {
        "max_abs_err": err,
        "max_abs_logit": max(r.abs().max().item() for r in ref),
        "top1_agreement": agree,
    }
    # A float32 yardstick: HF's forward on the same weights in float32 (bf16 -> fp32 -> bf16 is
    # exact, so HF is restored afterwards). Ours should err no more than HF's own bf16 does.
    dtype = next(hf.parameters()).dtype
    try:
        hf.float()
        exact = hf_logits()
        out["ours_vs_fp32"] = dict(
            zip(("max_abs_err", "top1_agreement"), compare(got, exact), strict=True)
        )
        out["hf_vs_fp32"] = dict(
            zip(("max_abs_err", "top1_agreement"), compare(ref, exact), strict=True)
        )
    except torch.OutOfMemoryError as exc:
        out["fp32_reference_error"] = str(exc)[:200]
    finally:
        hf.to(dtype)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def headlines(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def pick(impl: str, workload: str, **match: Any) -> dict[str, Any] | None:
        return next(
            (
                r
                for r in rows
                if r["impl"] == impl
                and r["workload"] == workload
                and all(r.get(k) == v for k, v in match.items())
            ),
            None,
        )

    out: dict[str, Any] = {}
    b1 = pick("ours", "decode", batch=1, sampling="greedy")
    b64 = pick("ours", "decode", batch=64, sampling="greedy")
    s64 = pick("ours", "decode", batch=64, sampling="sampled")
    if s64:
        out["decode_b64_sampled_step_over_floor"] = s64["step_ms"] / s64["floor_ms"]
    hf64 = pick("hf_generate", "decode", batch=64)
    if b1:
        out["decode_b1_step_over_floor"] = b1["step_ms"] / b1["floor_ms"]
    if b64 and hf64:
        out["decode_b64_tokens_per_s_vs_hf_generate"] = (
            b64["decode_tokens_per_s"] / hf64["decode_tokens_per_s"]
        )
    if b64:
        out["decode_b64_step_over_floor"] = b64["step_ms"] / b64["floor_ms"]
    mixed, cb = pick("ours", "mixed_256"), pick("hf_generate_batch", "mixed_256")
    if mixed and cb and "tokens_per_s" in cb:
        out["mixed_256_tokens_per_s_vs_hf_generate_batch"] = (
            mixed["tokens_per_s"] / cb["tokens_per_s"]
        )
        out["hf_generate_batch_complete"] = cb["complete"]
    ttft, hf_ttft_row = (
        pick("ours", "returning_user_ttft"),
        pick("hf_generate", "returning_user_ttft"),
    )
    if ttft and hf_ttft_row:
        out["returning_user_ttft_speedup_vs_hf_full_prefill"] = (
            hf_ttft_row["ttft_ms"] / ttft["ttft_ms"]
        )
    targets = {
        "decode_b1_step_over_floor": ("<=", 1.3),
        "decode_b64_tokens_per_s_vs_hf_generate": (">=", 12),
        "decode_b64_step_over_floor": ("<=", 1.6),
        "decode_b64_sampled_step_over_floor": ("<=", 1.3),
        "mixed_256_tokens_per_s_vs_hf_generate_batch": (">=", 20),
        "returning_user_ttft_speedup_vs_hf_full_prefill": (">=", 30),
    }
    out["targets_met"] = {
        k: (out[k] <= v if op == "<=" else out[k] >= v)
        for k, (op, v) in targets.items()
        if k in out
    }
    return out


if __name__ == "__main__":
    main()
