"""Which cause of the Grace advice defect held: the engine built with Grace faked, three ways.

    python scripts/advice_diagnosis.py        # GPU machine with managed memory, ~1 minute

The defect (H200, Grace faked, issue 18): during construction three of eight layer blocks kept
their advice only up to a 2 MiB boundary. Each variant runs in a fresh interpreter (RMM's set-up
is process-wide), builds the faked-Grace engine of tests/gpu/test_tiers_gpu.py (8 layers, 3
resident, 5 advised to the host, a host KV tier), reads every advised range back after each
build phase, then builds a second, plain engine from the same pool and reads again:

- `packed`: the old layout (blocks packed by PyTorch's caching allocator into shared segments,
  advised exactly), RMM chain as the test has it (discrete card: RMM prefetches each new
  allocation to the GPU);
- `packed-no-rmm-prefetch`: the old layout, the platform faked before RMM's set-up, so RMM's
  prefetch-on-allocate adaptor is absent (as on a real Grace node);
- `isolated`: the fix (each advised range alone in whole 2 MiB blocks, advised whole).

For every range it prints the first phase at which it read wrong, the runs of sub-ranges that
did (offsets in their 2 MiB block) and the other allocations sharing its 2 MiB blocks (from
PyTorch's memory snapshot). The VERDICT line maps that to a cause; the JSON goes to
benchmarks/results/advice-diagnosis-<card>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("packed", "packed-no-rmm-prefetch", "isolated")
CAUSES = {  # the first phase a range read wrong -> what moved its advice
    "layer blocks advised": "the advice never took on part of the range (its own call)",
    "weights loaded": "the checkpoint copies into the blocks (first touch) moved it",
    "layer blocks prefetched": "a prefetch of a neighbouring range sharing its 2 MiB blocks",
    "device KV pool advised": "a later allocation from the same pool (advised or prefetched)",
    "host KV tier advised": "a later allocation from the same pool (advised or prefetched)",
    "runner built": "kernels or buffers of the runner (graph capture) touched it",
    "warmed up": "the warm-up's kernels touched it",
    "after the plain engine was built": "the second engine's allocations from the same pool",
}


def neighbours(placements: list[dict], page: int = 2 << 20) -> dict[str, list[dict]]:
    """For each range, the other live allocations of PyTorch's pools in its 2 MiB blocks."""
    import torch

    live = []
    for seg in torch.cuda.memory_snapshot():
        address = seg["address"]
        for block in seg["blocks"]:
            if block["state"] == "active_allocated":
                live.append(
                    (
                        block.get("address", address),
                        block["size"],
                        seg["address"],
                        seg["total_size"],
                    )
                )
            address += block["size"]
    out = {}
    for p in placements:
        lo = p["start"] - p["start"] % page
        hi = -(-(p["start"] + p["size"]) // page) * page
        mine = p["start"] + p["tensor_offset"]
        out[p["name"]] = [
            {"offset_from_range": a - mine, "bytes": n, "segment_offset": a - s, "segment_bytes": t}
            for a, n, s, t in live
            if a < hi and a + n > lo and not a <= mine < a + n
        ]
    return out


def run_variant(variant: str) -> dict:
    """Build the engines in this process; return the read-backs (one variant)."""
    import dataclasses
    import tempfile

    import torch
    import transformers

    from deployments.config import AppArgs
    from deployments.engine.builtin_tokenizer import write_tokenizer
    from deployments.engine.paged.engine import PagedEngine
    from deployments.engine.paged.weights import layer_numel
    from deployments.memory import setup_memory
    from deployments.model_spec import ModelSpec
    from deployments.platform import detect_platform

    config = transformers.LlamaConfig(
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        vocab_size=448,
        tie_word_embeddings=False,
    )
    path = tempfile.mkdtemp()
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    write_tokenizer(path)
    platform = detect_platform()
    if variant == "packed-no-rmm-prefetch":
        platform = dataclasses.replace(platform, kind="grace")
    memory = setup_memory(
        AppArgs.model_validate(
            {"memory": {"mode": "managed", "pool_size_bytes": "2GiB"}, "replica": {"num_gpus": 1}}
        ).memory,
        platform,
        torch_allocator="native",
    )
    cls = type("Engine", (PagedEngine,), {"isolate_advised_ranges": variant == "isolated"})
    page = 16 * 2 * 8 * 2 * 64 * 2
    layer = layer_numel(ModelSpec.from_hf_config(config)) * 2

    def make(budget: int | None, host_pages: int, grace: bool) -> PagedEngine:
        memory.platform = dataclasses.replace(
            memory.platform, kind="grace" if grace else "discrete"
        )
        return cls(
            AppArgs.model_validate(
                {
                    "model": {
                        "model_id": path,
                        "dtype": "bfloat16",
                        "device_weight_budget_bytes": budget,
                    },
                    "memory": {"mode": "managed"},
                    "replica": {"num_gpus": 1},
                    "kv_cache": {"budget_bytes": 40 * page, "host_tier_bytes": host_pages * page},
                }
            ),
            memory,
        )

    grace = make(448 * 512 * 2 * 2 + 512 * 2 + 3 * layer, 400, True)
    make(None, 0, False)
    grace.advice.check("after the plain engine was built")
    torch.cuda.synchronize()
    report = grace.advice.report()
    return {
        "variant": variant,
        "first_loss": report["first_loss"],
        "mismatches_right_after_advice": grace._placer.advisor.mismatches,
        "history": report["history"],
        "ranges": report["ranges"],
        "neighbours": neighbours(report["ranges"]),
    }


def verdict(results: dict[str, dict]) -> str:
    lost = {v: r["first_loss"] for v, r in results.items()}
    if not any(lost.values()):
        return "no variant lost advice: the defect did not reproduce in this layout"
    packed = lost.get("packed", {})
    phases = sorted(set(packed.values()) | set(lost.get("isolated", {}).values()))
    causes = "; ".join(f"{p}: {CAUSES.get(p, p)}" for p in phases)
    if packed and not lost.get("isolated"):
        how = (
            "RMM's prefetch-on-allocate of later allocations is needed for it"
            if not lost.get("packed-no-rmm-prefetch")
            else "it happens without RMM's prefetch adaptor too"
        )
        return (
            f"shared 2 MiB blocks held (packed loses {sorted(packed)}, isolated keeps "
            f"all); {how}; first phase -> {causes}"
        )
    return f"isolation does not fix it (isolated loses {lost['isolated']}); {causes}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    opts = parser.parse_args()
    if opts.variant:
        print("RESULT " + json.dumps(run_variant(opts.variant)), flush=True)
        return
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    results = {}
    for variant in VARIANTS:
        proc = subprocess.run(
            [sys.executable, __file__, "--variant", variant],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{variant} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            continue
        results[variant] = json.loads(lines[-1][len("RESULT ") :])
        r = results[variant]
        print(
            f"== {variant}: first loss {r['first_loss'] or 'none'}; right after advice: "
            f"{r['mismatches_right_after_advice'] or 'none'}"
        )
        for entry in r["history"]:
            for wrong in entry["wrong"]:
                print(f"   {entry['phase']}: {wrong['name']} runs {wrong['runs']}")
        for name in r["first_loss"]:
            print(f"   neighbours of {name} in its 2 MiB blocks: {r['neighbours'][name]}")
    line = verdict(results)
    print("VERDICT:", line)
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import write_result

    print(
        "wrote", write_result("advice-diagnosis", {"variants": results, "verdict": line}, opts.out)
    )


if __name__ == "__main__":
    main()
