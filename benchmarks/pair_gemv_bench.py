"""The per-pair expert product's tiles against cuBLAS on the same card (GPU only).

For each MoE weight shape the decode step runs (Llama 4 Scout's and Qwen3-30B-A3B's routed
gate_up and down), times `expert_gemv`'s kernel over a grid of tiles (rows a program computes,
columns it loads per iteration, warps, pipeline stages), the tile the engine uses
(`pair_linear`), and cuBLAS's matrix-vector product of one expert's matrix
(`F.linear`, the peer). Each is replayed back to back in a CUDA graph, a different expert per
call, as in a decode step, and counted as bytes of weights read a second; the card's copy
bandwidth is measured in the same run. Writes `results/pair-gemv-<card>.json`.

    python -m benchmarks.pair_gemv_bench
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import RESULTS, copy_bandwidth, write_result
from deployments.engine.paged import expert_gemv

# (name, experts, N, K, pairs at batch 1: Scout top-1, Qwen3 top-8)
SHAPES = [
    ("scout_gate_up", 16, 16384, 5120, 1),
    ("scout_down", 16, 5120, 8192, 1),
    ("qwen_gate_up", 128, 1536, 2048, 8),
    ("qwen_down", 128, 2048, 768, 8),
]
GRID = {
    "BLOCK_N": [1, 2, 4, 8],
    "BLOCK_K": [512, 1024],
    "num_warps": [2, 4, 8],
    "num_stages": [1, 2],
}


def _in_graph_ms(calls: list[Any]) -> float:
    """Milliseconds a call when `calls` replay back to back in one CUDA graph (as in a decode
    step: no launch gaps, each call a different expert, so no weight is in L2)."""
    import triton.testing

    def body() -> None:
        for call in calls:
            call()

    return float(triton.testing.do_bench_cudagraph(body, rep=50, return_mode="median")) / len(calls)


def _launch(x, w, ids, out, tile: dict[str, int]) -> None:
    """expert_gemv's kernel over `ids`' pairs (no dense rows) with this tile."""
    expert_gemv.launch(x, w, ids, out, 1, (x, w[0]), tile)


def shape_rows(name: str, experts: int, n: int, k: int, pairs: int) -> dict[str, Any]:
    """Every tile's time on one shape, the autotuned call's, and cuBLAS's per expert."""
    dev = torch.device("cuda")
    w = torch.randn(experts, n, k, device=dev, dtype=torch.bfloat16)
    x = torch.randn(pairs, k, device=dev, dtype=torch.bfloat16)
    ids = torch.randperm(experts, device=dev)[:pairs].to(torch.int32)
    out = torch.empty(pairs, n, device=dev, dtype=torch.bfloat16)
    nbytes = pairs * n * k * 2  # distinct experts: each read once
    # Per call of a graph, a different set of experts (no weights left in L2 by the last).
    each = [
        torch.roll(torch.arange(experts, device=dev), -j * pairs)[:pairs].to(torch.int32)
        for j in range(experts // pairs)
    ]
    ref = expert_gemv.pair_linear_ref(x, w, ids)
    tiles = []
    for values in itertools.product(*GRID.values()):
        tile = dict(zip(GRID, values, strict=True))
        try:
            _launch(x, w, ids, out, tile)
            torch.cuda.synchronize()
        except Exception as exc:  # a tile the compiler refuses (registers, shared memory)
            tiles.append({**tile, "error": type(exc).__name__})
            continue
        ok = torch.allclose(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
        ms = _in_graph_ms(
            [lambda t=tile, i=i: _launch(x, w, each[i], out, t) for i in range(len(each))]
        )
        tiles.append({**tile, "ms": ms, "bytes_per_s": nbytes / ms * 1e3, "matches_ref": ok})
    expert_gemv.pair_linear(x, w, ids)  # compiles outside any graph
    engine_ms = _in_graph_ms([lambda e=e: expert_gemv.pair_linear(x, w, e) for e in each])
    xs = x[:1]
    firsts = [int(e[0]) for e in each]  # host ints: nothing reads the device in a capture
    cublas_ms = _in_graph_ms([lambda e=e: F.linear(xs, w[e]) for e in firsts])
    timed = [t for t in tiles if "ms" in t]
    best = min(timed, key=lambda t: t["ms"])
    return {
        "shape": name,
        "experts": experts,
        "n": n,
        "k": k,
        "pairs": pairs,
        "weight_bytes_read": nbytes,
        "best_tile": best,
        "engine_tile": {"ms": engine_ms, "bytes_per_s": nbytes / engine_ms * 1e3},
        "cublas_one_expert": {"ms": cublas_ms, "bytes_per_s": n * k * 2 / cublas_ms * 1e3},
        "tiles": tiles,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("pair_gemv_bench needs a GPU")
    bandwidth = copy_bandwidth()
    rows = [shape_rows(*shape) for shape in SHAPES]
    for r in rows:
        b, t, c = r["best_tile"], r["engine_tile"], r["cublas_one_expert"]
        print(
            f"{r['shape']}: best {b['bytes_per_s'] / 1e12:.2f} TB/s "
            f"({ {k: b[k] for k in GRID} }), engine's tile {t['bytes_per_s'] / 1e12:.2f}, "
            f"cuBLAS {c['bytes_per_s'] / 1e12:.2f}, copy {bandwidth / 1e12:.2f}"
        )
    payload = {"copy_bytes_per_s": bandwidth, "rows": rows}
    print("wrote", write_result("pair-gemv", payload, args.out))


if __name__ == "__main__":
    main()
