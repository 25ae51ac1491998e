"""Serving benchmark: the service over HTTP against its own engine in-process, one run, one card.

    python -m benchmarks.serve_bench            # GPU machine: Llama 3.1 8B config, ~6-7 minutes
    python -m benchmarks.serve_bench --quick    # tiny config on CPU: checks the script

1. Writes the benchmark model directory (no weights; a tokenizer giving every id visible text)
   where the config's `model.model_id` points.
2. In-process phase, in a subprocess (its GPU memory is gone before `serve run`): the card's
   copy bandwidth, then every workload against the engine built from the config's `args`.
3. HTTP phase: `serve run` of the config (its own Ray, a free port), then the same workloads
   through the OpenAI-compatible API from several client processes.
4. Rows side by side, headline ratios against issue 9's targets, written with `write_result`
   to <out>/serve-<card>.json (rows also appended to <out>/serve-rows.jsonl as measured;
   with --quick: serve-quick-cpu.json and serve-quick-rows.jsonl), and
   a plot <out>/serve-<card>.png when matplotlib is importable.

A time budget (--budget-s) bounds the run: every step has a cap, and a step that would start
past its phase's share of the budget is skipped (its row says so).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.bench_model import write_model_dir
from benchmarks.common import RESULTS, write_result
from benchmarks.engine_bench import LLAMA_31_8B, QUICK
from benchmarks.serve.client_pool import MAX_CPU_SHARE, MAX_LAG_P99_MS, ClientPool
from benchmarks.serve.metrics import __doc__ as METRICS_DOC
from benchmarks.serve.metrics import append_row, changes, summarize
from benchmarks.serve.report import brief, headlines, step_fields, table
from benchmarks.serve.server import ROOT, Server, child_env
from benchmarks.serve.workloads import PLANS, Plan, describe_kv, kv_expectation, steps

CONFIGS = ROOT / "benchmarks" / "configs"
MODEL_CONFIGS = {"llama-3.1-8b": LLAMA_31_8B, "quick": QUICK}
# Seconds from the start for the in-process phase to begin its last step, and kept at the end
# for stopping `serve run` and writing the results.
IN_PROCESS_SHARE_S = {"full": 200.0, "quick": 200.0}
RESERVE_S = 25.0
# --via: which HTTP paths the HTTP phase measures, as (row side, path) in the order run.
VIAS = {
    "direct": (("http", "direct"),),
    "proxy": (("http", "proxy"),),
    "both": (("http", "direct"), ("http_proxy", "proxy")),
}


def options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny config on CPU")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--config",
        type=Path,
        help="default: benchmarks/configs/serve-llama-8b.yaml (serve-quick.yaml with --quick)",
    )
    parser.add_argument("--client-procs", type=int, help="default 4 (2 with --quick)")
    parser.add_argument("--budget-s", type=float, help="default 450 (600 with --quick)")
    parser.add_argument("--ready-timeout-s", type=float, default=300)
    parser.add_argument(
        "--via",
        choices=sorted(VIAS),
        default="direct",
        help="the HTTP path measured: each ingress replica's own port (Ray "
        "Serve direct ingress), Serve's proxy, or both (proxy rows as side "
        "http_proxy, beside the direct ones); default direct",
    )
    parser.add_argument(
        "--steps",
        help="comma-separated step names to run (a fixed step's "
        "warm-up comes with it); default: every step",
    )
    opts = parser.parse_args()
    opts.config = opts.config or CONFIGS / (
        "serve-quick.yaml" if opts.quick else "serve-llama-8b.yaml"
    )
    opts.client_procs = opts.client_procs or (2 if opts.quick else 4)
    opts.budget_s = opts.budget_s or (600.0 if opts.quick else 450.0)
    return opts


def in_process_phase(
    opts: argparse.Namespace, plan: Plan, rows_path: Path, stop_at: float
) -> dict[str, Any]:
    """Run benchmarks.serve.engine_side in a subprocess; its result (or the failure)."""
    out = Path(tempfile.mkdtemp(prefix="serve-bench-")) / "in_process.json"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.serve.engine_side",
        "--config",
        str(opts.config),
        "--plan",
        plan.name,
        "--out",
        str(out),
        "--rows",
        str(rows_path),
        "--stop-at",
        str(stop_at),
        *(["--steps", opts.steps] if opts.steps else []),
    ]
    try:  # the last step's requests and the engine's shutdown get a grace period
        status = subprocess.run(
            cmd, cwd=ROOT, env=child_env(), check=False, timeout=stop_at - time.monotonic() + 180
        ).returncode
    except subprocess.TimeoutExpired:  # subprocess.run has killed it
        status = "timed out"
    if status == 0 and out.exists():
        return json.loads(out.read_text())
    print(f"in-process phase failed ({status}); keeping the rows it wrote", flush=True)
    rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line]
    return {
        "error": f"exit status {status}",
        "rows": [r for r in rows if r["side"] == "in_process"],
    }


def http_step(
    pool: ClientPool, server: Server, plan: Plan, step: Any, stop_at: float, side: str, via: str
) -> dict[str, Any]:
    """One step through the API; its row with the client's load and the admin figures."""
    before = server.admin()
    records, load = pool.run(
        {
            "step": step.to_dict(),
            "plan": plan.name,
            "stop_at": stop_at,
            "model_config": MODEL_CONFIGS[plan.model],
        }
    )
    after = server.admin()
    return {
        "side": side,
        "via": via,
        **step_fields(step),
        **summarize(records, step.kind, step.warmup),
        "client": load,
        "admin_before": before,
        "admin_after": after,
        "admin_change": changes(before[0], after[0]) if before and after else {},
    }


def step_weights(todo: list[Any], inproc_rows: list[dict[str, Any]]) -> dict[str, float]:
    """How long each step took in-process (its plan cap where unmeasured): the HTTP phase
    shares its remaining time out in these proportions."""
    took = {r["step"]: r.get("seconds") for r in inproc_rows if not r.get("skipped")}
    return {s.name: max(1.0, took.get(s.name) or s.cap_s) for s in todo}


def http_steps(
    pools: dict[tuple[str, str], ClientPool],
    server: Server,
    plan: Plan,
    todo: list[Any],
    rows: list[dict[str, Any]],
    rows_path: Path,
    stop_at: float,
    weights: dict[str, float],
    expect: dict[str, Any],
) -> None:
    """Every step over each HTTP path of `pools` ((side, via) -> clients), each run given
    its share of the time left (by `weights`); each row is added to `rows` and to
    `rows_path` as soon as it is measured."""
    runs = [(step, path) for step in todo for path in pools]
    for i, (step, (side, via)) in enumerate(runs):
        now = time.monotonic()
        if now >= stop_at:
            rows.append({"side": side, "via": via, **step_fields(step), "skipped": "time budget"})
            print(f"[{side}] {step.name}: skipped (time budget spent)", flush=True)
            continue
        if step.kind == "multi_turn":
            print(describe_kv(expect), flush=True)
        share = weights[step.name] / sum(weights[s.name] for s, _ in runs[i:])
        row = http_step(
            pools[side, via], server, plan, step, now + share * (stop_at - now), side, via
        )
        append_row(rows_path, row)
        print(f"[{via}] " + brief(row), flush=True)
        rows.append(row)


def http_phase(
    opts: argparse.Namespace,
    plan: Plan,
    todo: list[Any],
    rows_path: Path,
    stop_at: float,
    log: Path,
    weights: dict[str, float],
) -> dict[str, Any]:
    """`serve run`, then every step over HTTP; rows, start-up time and the KV expectation.
    A failure ends the phase with what it measured (and the error)."""
    started = time.monotonic()
    paths = VIAS[opts.via]
    server = Server(opts.config, log, direct=any(via == "direct" for _, via in paths))
    result: dict[str, Any] = {"rows": []}
    pools: dict[tuple[str, str], ClientPool] = {}
    try:
        ready = server.wait_ready(opts.ready_timeout_s)
        result["serve_start_s"] = round(time.monotonic() - started, 1)
        result["urls"] = {"proxy": [server.url], "direct": server.direct_urls()}
        print(
            f"[http] `serve run` ready in {result['serve_start_s']} s: {result['urls']}", flush=True
        )
        if any(via == "direct" for _, via in paths) and not result["urls"]["direct"]:
            raise RuntimeError("direct ingress is on but no ingress replica answers on its port")
        page_size = app_args_dict(opts.config)["engine"].get("page_size", 16)
        result["kv_expectation"] = kv_expectation(
            plan, ready[0]["kv_bytes_per_token"], page_size, ready[0]["kv_budget_bytes"]
        )
        for side, via in paths:
            pools[side, via] = ClientPool(
                opts.client_procs, result["urls"][via], server.model, child_env()
            )
        http_steps(
            pools,
            server,
            plan,
            todo,
            result["rows"],
            rows_path,
            stop_at,
            weights,
            result["kv_expectation"],
        )
    except Exception as exc:  # keep the in-process rows and whatever HTTP measured
        result["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        print(f"[http] phase failed: {result['error']}", flush=True)
    finally:
        for pool in pools.values():
            pool.close()
        server.stop()
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def app_args_dict(config: Path) -> dict[str, Any]:
    return yaml.safe_load(config.read_text())["applications"][0]["args"]


def notes(rows: list[dict[str, Any]]) -> list[str]:
    """What a reader of the results must know about this run's rows."""
    out = []
    short = [f"{r['side']}:{r['step']}" for r in rows if r.get("short_requests")]
    if short:
        out.append(
            "requests ended before max_tokens (is ignore_eos honoured?) in: " + ", ".join(short)
        )
    failed = [f"{r['side']}:{r['step']}" for r in rows if r.get("errors")]
    if failed:
        out.append("requests failed in: " + ", ".join(failed))
    skipped = [f"{r['side']}:{r['step']}" for r in rows if r.get("skipped")]
    if skipped:
        out.append("skipped for time: " + ", ".join(skipped))
    return out


def payload(
    opts: argparse.Namespace,
    plan: Plan,
    inproc: dict[str, Any],
    http: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    rows = [*inproc.get("rows", []), *http.get("rows", [])]
    errors = {k: v["error"] for k, v in (("in_process", inproc), ("http", http)) if "error" in v}
    return {
        "model": (
            "tiny Llama config on CPU (quick check, no speed claims)"
            if opts.quick
            else "Llama 3.1 8B config, random bf16 weights, WordLevel tokenizer over the "
            "whole vocabulary (every token is one visible word)"
        ),
        "config": str(opts.config.resolve().relative_to(ROOT)),
        "app_args": app_args_dict(opts.config),
        "plan": dataclasses.asdict(plan),
        "copy_bandwidth_bytes_per_s": inproc.get("copy_bandwidth_bytes_per_s"),
        "weights_bytes": inproc.get("weights_bytes"),
        "kv_bytes_per_token": inproc.get("kv_bytes_per_token"),
        "kv_budget_bytes": inproc.get("kv_budget_bytes"),
        "kv_expectation": {
            "in_process": inproc.get("kv_expectation"),
            "http": http.get("kv_expectation"),
        },
        "seconds": {
            "total": round(seconds, 1),
            "in_process": inproc.get("seconds"),
            "serve_start": http.get("serve_start_s"),
            "http": http.get("seconds"),
        },
        "client": {
            "processes": opts.client_procs,
            "library": "aiohttp, SSE parsed by us",
            "kept_up_when": f"every worker's CPU time <= {MAX_CPU_SHARE} of the step's "
            f"wall time and its event loop's 10 ms sleeps woke <= {MAX_LAG_P99_MS} ms "
            "late at p99",
        },
        "floor_definition": "(weights + KV bytes read per step) / measured copy bandwidth "
        "(bytes read + written per second); KV at the mean context",
        "definitions": " ".join(METRICS_DOC.split()),
        "errors": errors,
        "notes": notes(rows),
        "rows": rows,
        "headline": headlines(rows),
        **(
            {"headline_proxy": headlines(rows, "http_proxy")}
            if any(r["side"] == "http_proxy" for r in rows)
            else {}
        ),
        "via": opts.via,
        "urls": http.get("urls"),
    }


def main() -> None:
    opts = options()
    started = time.monotonic()
    plan = PLANS["quick" if opts.quick else "full"]
    model_dir = write_model_dir(
        app_args_dict(opts.config)["model"]["model_id"], MODEL_CONFIGS[plan.model]
    )
    opts.out.mkdir(parents=True, exist_ok=True)
    bench = "serve-quick" if opts.quick else "serve"
    rows_path = opts.out / f"{bench}-rows.jsonl"
    rows_path.write_text("")
    log = Path(tempfile.mkdtemp(prefix="serve-bench-log-")) / "serve-run.log"
    print(f"model dir {model_dir}; rows -> {rows_path}; `serve run` log -> {log}", flush=True)
    print(
        f"time budget {opts.budget_s:.0f} s: no in-process step starts after "
        f"{IN_PROCESS_SHARE_S[plan.name]:.0f} s, no HTTP step after "
        f"{opts.budget_s - RESERVE_S:.0f} s",
        flush=True,
    )
    try:
        todo = steps(plan, opts.steps)
    except ValueError as exc:
        raise SystemExit(f"--steps: {exc}") from None
    inproc = in_process_phase(opts, plan, rows_path, started + IN_PROCESS_SHARE_S[plan.name])
    print(f"in-process phase done at {time.monotonic() - started:.0f} s", flush=True)
    http = http_phase(
        opts,
        plan,
        todo,
        rows_path,
        started + opts.budget_s - RESERVE_S,
        log,
        step_weights(todo, inproc["rows"]),
    )
    print(f"HTTP phase done at {time.monotonic() - started:.0f} s", flush=True)
    result = payload(opts, plan, inproc, http, time.monotonic() - started)
    path = write_result(bench, result, opts.out)
    print(table(result["rows"]))
    print(json.dumps(result["headline"], indent=2))
    if "headline_proxy" in result:
        print("through Serve's proxy:")
        print(table(result["rows"], "http_proxy"))
        print(json.dumps(result["headline_proxy"], indent=2))
    for note in result["notes"]:
        print("note:", note)
    print("wrote", path)
    try:
        from benchmarks.plot_serve import plot

        print("plot", plot(path))
    except Exception as exc:  # matplotlib missing, or a plot bug: the results are written
        print(f"no plot: {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    main()
