"""The peer in the engine benchmark: HF transformers' generate, a kept DynamicCache, and its
continuous batching (`generate_batch`'s manager), measured on the same model and workloads."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from benchmarks.common import sync, time_it


def build_hf(path: str, dtype: torch.dtype, device: str) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    return model.eval()


def hf_decode_step(
    model: Any, prompts: list[list[int]], device: str, short: int = 4, long: int = 20
) -> float:
    """Seconds per decode step of HF generate: the time difference of two lengths."""
    ids = torch.tensor(prompts, device=device)

    def run(n: int) -> None:
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            pad_token_id=0,
        )

    return (time_it(lambda: run(long), repeat=2) - time_it(lambda: run(short), repeat=2)) / (
        long - short
    )


def hf_ttft(model: Any, history: list[int], new: list[int], device: str) -> dict[str, float]:
    import inspect

    from transformers import DynamicCache

    kwarg = (
        "cache" if "cache" in inspect.signature(model.forward).parameters else ("past_key_values")
    )
    full = torch.tensor([history + new], device=device)
    with torch.inference_mode():
        full_s = time_it(
            lambda: model(input_ids=full, logits_to_keep=1).logits.argmax(-1), repeat=3
        )
        kept = []
        for _ in range(2):
            cache = DynamicCache(config=model.config)
            model(
                input_ids=torch.tensor([history], device=device), use_cache=True, **{kwarg: cache}
            )
            sync()
            start = time.perf_counter()
            model(
                input_ids=torch.tensor([new], device=device),
                use_cache=True,
                logits_to_keep=1,
                **{kwarg: cache},
            ).logits.argmax(-1)
            sync()
            kept.append(time.perf_counter() - start)
    return {"full_prefill_ms": full_s * 1e3, "kept_cache_ms": statistics.median(kept) * 1e3}


def hf_continuous_batching(
    model: Any, prompts: list[list[int]], outputs: list[int], limit_s: float
) -> dict[str, Any]:
    """HF's continuous batching on the workload; counts streamed tokens if it runs past limit."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max(outputs), do_sample=False)
    generated: dict[str, int] = {}
    done: set[str] = set()
    start = time.perf_counter()
    with model.continuous_batching_context_manager(
        generation_config=config, block=True, timeout=30
    ) as manager:
        for i, (p, n) in enumerate(zip(prompts, outputs, strict=True)):
            manager.add_request(
                input_ids=p, request_id=f"r{i}", max_new_tokens=n, streaming=True, eos_token_id=-1
            )
        while len(done) < len(prompts) and time.perf_counter() - start < limit_s:
            result = manager.get_result(timeout=1)
            if result is None:
                if not manager.is_running():
                    break
                continue
            generated[result.request_id] = max(
                generated.get(result.request_id, 0), len(result.generated_tokens)
            )
            if result.is_finished():
                done.add(result.request_id)
        seconds = time.perf_counter() - start
    return {
        "generated_tokens": sum(generated.values()),
        "seconds": seconds,
        "finished_requests": len(done),
        "complete": len(done) == len(prompts),
    }
