"""Cache moves between replicas: one user's kept cache moved end to end, on real Serve.

    python -m benchmarks.cache_move_bench            # one GPU (H200): ~3 minutes
    python -m benchmarks.cache_move_bench --histories 32768 --attempts 2 --fast-start \
        --out $OUT                                   # the 32k row twice: meant for < 2 min
    python -m benchmarks.cache_move_bench --quick    # CPU, tiny model (tests/cpu runs it)

Two LLMReplicas on one card (`num_gpus: 0.5` each), the paged engine, the Llama 3.1 8B
architecture with random bf16 weights (the serve benchmark's model directory). In one run: the
card's pinned host-to-device and device-to-host bandwidth; for users with 8k- and 32k-token
histories (1 and 4 GiB of KV), a first turn pinned to replica A, then `LLMReplica.move_user`
to replica B (what a drain or a shutdown does for each user), timed by phase. The move is
pipelined: B reserves pages (begin_import), then A copies out (device to host through its
pinned staging chunks, each chunk put in the object store as it arrives: the two overlap) and
hands B the chunks a few at a time (import_chunks), B fetching them from the object store and
copying them in (host threads into its pinned chunks, host to device; B times both itself)
while A still copies the next ones out (`pipeline_overlap_s`); then finish_import. Then the
user's next turn (64 new tokens), routed to B by the router, against recomputing the whole
history on B (time to the first token inside the replica, and at the caller). The headline:
the move's bytes per second end to end against the pinned bandwidth (target >= 25%) and
next-turn TTFT, recomputed / moved (target >= 3x). On paper: a 128k-token Llama 3.1 70B
user between two GH200 nodes, move time (C2C out, the network at each given bandwidth, C2C
in) against recompute time (prefill FLOPs from the planner's model at a stated share of the
GPU's peak). Writes benchmarks/results/migration-<card>.json.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from benchmarks.bench_model import write_model_dir
from benchmarks.common import RESULTS, host_to_device_bandwidth, time_it, write_result
from benchmarks.engine_bench import LLAMA_31_8B, QUICK
from deployments.admission import RequestShape

APP = "cache-moves"
MODEL_DIR = "/tmp/grace-serve-bench/cache-move-llama-{}"
GB = 10**9
# The on-paper case: GH200 figures as DESIGN.md gives them (measured by others over C2C).
GH200_D2H, GH200_H2D = 297 * GB, 375 * GB
GH200_BF16_FLOPS = 989e12  # H100/GH200 dense bf16 peak
PREFILL_MFU = 0.5  # share of that peak a long prefill reaches (a stated assumption)
NETWORK_GB_S = (25, 50, 100, 400)  # 200 Gb/s, 400 Gb/s, 800 Gb/s NICs; 400: NVLink-class


def app_args(quick: bool, model_dir: str, fast_start: bool = False) -> dict[str, Any]:
    """`fast_start`: no CUDA graphs and few sequences, so the replicas warm fewer kernel
    variants (the moves are the same; the next turns run eagerly)."""
    gpu = not quick
    engine: dict[str, Any] = {"random_weights": True, "max_batched_tokens": 8192 if gpu else 1024}
    if fast_start:
        engine.update(cuda_graphs=False, prefill_graph_tokens=0, max_num_seqs=8)
    return {
        "model": {
            "model_id": model_dir,
            "served_model_name": "bench-move",
            "dtype": "bfloat16" if gpu else "float32",
            "max_model_len": 40960 if gpu else 2048,
        },
        "memory": {"mode": "managed", "headroom_bytes": "4GiB"}
        if gpu
        else {"cpu_memory_budget_bytes": "512MiB"},
        # Two 32k users and a recomputed one fit: 128 KiB a token on the 8B architecture.
        "kv_cache": {"budget_bytes": "24GiB" if gpu else "64MiB"},
        "engine": engine,
        "replica": {
            "num_replicas": 2,
            "num_gpus": 0.5 if gpu else 0,
            "num_cpus": 1 if gpu else 0,
            "max_replicas_per_node": None,
            "graceful_shutdown_timeout_s": 60,
        },
        "router": {"stats_period_s": 0.25},
        "cache_moves": {"pressure_free_fraction": 0.0, "call_timeout_s": 120}
        if gpu
        # On CPU the users are small: chunks of a few pages, one a call, so a move still
        # takes several pipelined chunk calls through Serve.
        else {
            "pressure_free_fraction": 0.0,
            "call_timeout_s": 120,
            "chunk_bytes": "256KiB",
            "chunks_per_call": 1,
        },
        "ingress": {"num_replicas": 1, "num_cpus": 0},
    }


def device_to_host_bandwidth(nbytes: int = 1 << 30) -> float:
    """Pinned device-to-host copy bandwidth in bytes/s."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    return nbytes / time_it(lambda: dst.copy_(src, non_blocking=True), repeat=10, warmup=2)


def replicas(url: str) -> list[dict[str, Any]]:
    return httpx.get(f"{url}/admin/replicas", timeout=60).json()


def turn(handle: Any, key: str | None, prompt: list[int], target: str | None = None) -> dict:
    """One request through LLMReplica's handle, greedy, one token; its start event with the
    caller's time to it (`wall_ms`)."""
    kwargs: dict[str, Any] = {
        "request": {"prompt_token_ids": prompt, "sampling": {"temperature": 0.0}},
        "shape": RequestShape(key, len(prompt), 1),
    }
    if target is not None:
        kwargs["target_replica_id"] = target
    start, began = None, time.perf_counter()
    for message in handle.options(stream=True).generate.remote(**kwargs):
        for event in message:
            if event["event"] == "error":
                raise RuntimeError(event)
            if event["event"] == "start" and start is None:
                start = {**event, "wall_ms": (time.perf_counter() - began) * 1e3}
    return start or {}


def wait_resident(url: str, key: str, replica: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        holders = [r["replica_id"] for r in replicas(url) if key in r["resident_users"]]
        if holders == [replica]:
            return
        time.sleep(0.1)
    raise TimeoutError(f"{key} never settled on {replica} alone")


def move_row(
    handle: Any,
    url: str,
    pair: tuple[str, str],
    history: int,
    rng: random.Random,
    vocab: int,
    pinned: float | None,
) -> dict[str, Any]:
    """One user of `history` tokens: first turn on A, moved to B, next turn vs recompute."""
    a, b = pair
    key = f"move-{history}-{rng.randrange(1 << 30)}"
    prompt = [rng.randrange(100, vocab - 1) for _ in range(history)]
    turn(handle, key, prompt, target=a)
    wait_resident(url, key, a)
    began = time.perf_counter()
    call = handle.options(method_name="move_user").remote(key=key, to=b, target_replica_id=a)
    moved = call.result(timeout_s=300)
    wall_s = time.perf_counter() - began  # includes the commit's wait for the routers
    if moved["outcome"] != "moved":
        raise RuntimeError(f"the move did not happen: {moved}")
    wait_resident(url, key, b)
    time.sleep(1.0)  # think time: four stats periods, every router has B's stats by then
    imported = next(r for r in replicas(url) if r["replica_id"] == b)["cache_moves"]
    follow = prompt + [rng.randrange(100, vocab - 1) for _ in range(64)]
    back = turn(handle, key, follow)
    again = turn(handle, None, follow, target=b)  # no user: the whole history recomputed
    return phase_row(history, moved, imported, wall_s, pinned) | {
        "next_turn_replica": back["replica_id"],
        "next_turn_cached_tokens": back["cached_tokens"],
        "moved_ttft_ms": back["replica_ms"],
        "recompute_ttft_ms": again["replica_ms"],
        "moved_ttft_wall_ms": back["wall_ms"],
        "recompute_ttft_wall_ms": again["wall_ms"],
        "ttft_ratio": again["replica_ms"] / back["replica_ms"],
    }


def phase_row(
    history: int, moved: dict, imported: dict, wall_s: float, pinned: float | None
) -> dict[str, Any]:
    """One move's seconds by phase: A's answer to move_user (its pipelined send, move_send.py,
    and its staging ring's `out_` keys) and B's `cache_moves` counts (its fetches and its
    ring's `in_` phases, summed over the chunk calls: they overlap A's export)."""
    seconds = moved["move_s"]
    into = imported["last_import_phases"]
    get_s, import_s = imported["last_get_s"], imported["last_import_s"]
    return {
        "workload": "move_user",
        "history_tokens": history,
        "bytes": moved["bytes"],
        "chunks": moved["out_chunks"],
        "chunk_calls": moved["chunk_calls"],  # A's import_chunks calls to B
        "move_s": seconds,  # end to end: begin_import to finish_import answered
        "begin_s": moved["begin_s"],  # A's header and B's begin_import (pages reserved)
        "export_s": moved["export_s"],  # A: copies out and puts, pipelined
        "d2h_s": moved["out_device_s"],  # device time of A's device-to-host copies
        "export_host_copy_s": moved["out_host_s"],  # a host-tier user's copies (else 0)
        "put_s": moved["out_sink_s"],  # A's object-store puts
        "export_wait_s": moved["out_wait_s"],  # A blocked on a chunk's copy out
        "export_overlap_s": moved["out_overlap_s"],  # d2h + puts - export wall
        "call_s": moved["call_s"],  # after A's export: B's last chunk calls and finish
        "pipeline_overlap_s": moved["pipeline_overlap_s"],  # B's copies during A's export
        "get_s": get_s,  # B's fetches of the chunks from the object store
        "import_s": import_s,  # B's copies in, synchronized
        "host_copy_s": into["in_host_s"],  # B's host threads: object store -> pinned chunks
        "h2d_s": into["in_device_s"],  # device time of B's host-to-device copies
        "import_wait_s": into["in_wait_s"],  # B blocked on a chunk's copy in
        "import_overlap_s": into["in_overlap_s"],  # host copy + h2d - import wall
        # Neither A's export nor B's copies after it: begin, fetches, Serve's calls, finish.
        "call_overhead_s": seconds - moved["export_s"] - (import_s - moved["pipeline_overlap_s"]),
        "call_wall_s": wall_s,  # includes the commit's wait for the routers
        "bytes_per_s": moved["bytes"] / seconds,
        "share_of_pinned": moved["bytes"] / seconds / pinned if pinned else None,
    }


def on_paper(tokens: int = 131072) -> dict[str, Any]:
    """A `tokens`-token Llama 3.1 70B user between two GH200 nodes: move time (C2C out, the
    network, C2C in; serially and pipelined) against recomputing its prefill, from the
    planner's model footprint (deployments/plan) and the GH200 figures above."""
    from deployments.plan.models import resolve_model

    model = resolve_model("llama-3.1-70b")
    nbytes = model.kv_bytes(tokens, 2)
    query_dim = 8192  # 64 query heads of 128: attention's FLOPs scale with the query width
    dense = 2 * model.active_parameters * tokens
    attention = 2 * 2 * model.full_kv_layers * query_dim * tokens * tokens / 2  # causal
    recompute_s = (dense + attention) / (GH200_BF16_FLOPS * PREFILL_MFU)
    rows = []
    for net in NETWORK_GB_S:
        legs = (nbytes / GH200_D2H, nbytes / (net * GB), nbytes / GH200_H2D)
        rows.append(
            {
                "network_gb_per_s": net,
                "move_serial_s": sum(legs),
                "move_pipelined_s": max(legs),
                "recompute_over_move_serial": recompute_s / sum(legs),
            }
        )
    return {
        "model": model.name,
        "tokens": tokens,
        "kv_bytes": nbytes,
        "recompute_s": recompute_s,
        "assumptions": {
            "gh200_d2h_bytes_per_s": GH200_D2H,
            "gh200_h2d_bytes_per_s": GH200_H2D,
            "bf16_peak_flops": GH200_BF16_FLOPS,
            "prefill_mfu": PREFILL_MFU,
        },
        "by_network": rows,
    }


def deploy(quick: bool, url: str, fast_start: bool = False) -> Any:
    """The two-replica app on a running Serve, ready; its LLMReplica handle."""
    from ray import serve

    from deployments.app import build_app

    config = QUICK if quick else LLAMA_31_8B
    path = write_model_dir(MODEL_DIR.format("quick" if quick else "8b"), config)
    args = app_args(quick, str(path), fast_start)
    serve.run(build_app(args), name=APP, route_prefix=f"/{APP}")
    deadline = time.monotonic() + 600
    while len(replicas(f"{url}/{APP}")) < 2:
        if time.monotonic() > deadline:
            raise TimeoutError("two replicas never came up")
        time.sleep(1)
    return serve.get_deployment_handle("LLMReplica", APP)


def measure(
    handle: Any,
    url: str,
    quick: bool,
    pinned: float | None,
    histories: tuple[int, ...] | None = None,
    attempts: int | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Warm both replicas and the move path, then `attempts` rows per history length
    (defaults: 8k and 32k twice on a GPU; 256 and 1024 once on CPU). `seed` makes the users'
    keys and prompts (another seed for another run on the same deployment)."""
    app_url = f"{url}/{APP}"
    pair = tuple(sorted(r["replica_id"] for r in replicas(app_url)))
    vocab = (QUICK if quick else LLAMA_31_8B)["vocab_size"]
    rng = random.Random(seed)
    for replica in pair:
        turn(handle, None, [rng.randrange(100, vocab - 1) for _ in range(64)], target=replica)
    move_row(handle, app_url, pair, 512, rng, vocab, pinned)  # first-call costs land here
    histories = histories or ((256, 1024) if quick else (8192, 32768))
    # Twice on a GPU: the first move of a size touches object-store memory for the first time
    # (its pinned staging chunks were allocated when the engine started).
    rows = []
    for history in histories:
        for attempt in range(attempts or (1 if quick else 2)):
            row = move_row(handle, app_url, pair, history, rng, vocab, pinned)
            rows.append({**row, "attempt": attempt})
    for row in rows:
        print(row, flush=True)
    return rows


def headline(rows: list[dict[str, Any]], pinned: float | None) -> dict[str, Any]:
    longest = max(r["history_tokens"] for r in rows)
    big = max((r for r in rows if r["history_tokens"] == longest), key=lambda r: r["bytes_per_s"])
    return {
        "history_tokens": big["history_tokens"],
        "move_s": big["move_s"],
        "move_share_of_pinned_bandwidth": big["share_of_pinned"],
        "next_turn_ttft_speedup": big["ttft_ratio"],
        "targets": {"move_share_of_pinned_bandwidth": 0.25, "next_turn_ttft_speedup": 3.0},
        "pinned_h2d_bytes_per_s": pinned,
        # Where the move's time goes; the overlaps are time saved by running phases at once:
        # export_s = d2h + put - export_overlap (+ waits), likewise import_s; the move is
        # pipelined: move = begin + export + (import - pipeline_overlap) + call overhead.
        "time_split_s": {
            "move": big["move_s"],
            "begin": big["begin_s"],
            "export": big["export_s"],
            "device_to_host": big["d2h_s"],
            "object_store_put": big["put_s"],
            "export_overlap": big["export_overlap_s"],
            "call_overhead": big["call_overhead_s"],
            "object_store_get": big["get_s"],
            "import": big["import_s"],
            "host_staging_copy": big["host_copy_s"],
            "host_to_device": big["h2d_s"],
            "import_overlap": big["import_overlap_s"],
            "pipeline_overlap": big["pipeline_overlap_s"],
        },
    }


def options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU, tiny model")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON")
    parser.add_argument(
        "--histories", type=int, nargs="+", help="history lengths (default 8192 32768)"
    )
    parser.add_argument("--attempts", type=int, help="moves per length (default 2 on a GPU)")
    parser.add_argument(
        "--fast-start", action="store_true", help="no CUDA graphs, few sequences: quicker start"
    )
    return parser.parse_args()


def main() -> None:
    import socket

    import ray
    from ray import serve

    began = time.perf_counter()
    opts = options()
    gpu = torch.cuda.is_available() and not opts.quick
    pinned = host_to_device_bandwidth() if gpu else None
    d2h = device_to_host_bandwidth() if gpu else None
    if gpu:
        torch.cuda.empty_cache()
    ray.init(address="local", num_gpus=1 if gpu else 0, include_dashboard=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    try:
        handle = deploy(opts.quick, url, opts.fast_start)
        ready_s = time.perf_counter() - began
        histories = tuple(opts.histories) if opts.histories else None
        rows = measure(handle, url, opts.quick, pinned, histories, opts.attempts)
    finally:
        serve.shutdown()
        ray.shutdown()
    payload = {
        "model": "Llama 3.1 8B architecture, random weights" + (" (quick: tiny)" * opts.quick),
        "replicas": "2 on one card, num_gpus 0.5 each" if gpu else "2 on CPU",
        "options": {
            "histories": opts.histories,
            "attempts": opts.attempts,
            "fast_start": opts.fast_start,
        },
        "ready_s": ready_s,  # from the start to both replicas up (Ray, Serve, engines)
        "wall_s": time.perf_counter() - began,
        "pinned_h2d_bytes_per_s": pinned,
        "pinned_d2h_bytes_per_s": d2h,
        "rows": rows,
        "headline": headline(rows, pinned),
        "on_paper_70b_128k_gh200": on_paper(),
    }
    print(write_result("migration-quick" if opts.quick else "migration", payload, opts.out))


if __name__ == "__main__":
    main()
