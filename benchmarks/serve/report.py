"""Rows in the log, the side-by-side table, and the headline ratios of issue 9's "Done when".

Every speed figure is a ratio (or a difference) between the HTTP row and the in-process row
of the same step in the same run, or the in-process decode step against its floor.
"""

from __future__ import annotations

from typing import Any

from benchmarks.serve.workloads import Step

# headline key: (comparison, threshold) from issue 9's "Done when".
TARGETS = {
    **{
        f"c{c}_{s}_tokens_per_s_http_over_in_process": (">=", 0.9)
        for c in (64, 128)
        for s in ("sampled", "greedy")
    },
    **{f"c1_{s}_itl_p50_over_in_process_step": ("<=", 1.05) for s in ("sampled", "greedy")},
    **{f"c1_{s}_ttft_p50_minus_in_process_ms": ("<=", 5.0) for s in ("sampled", "greedy")},
    "returning_ttft_p50_minus_in_process_ms": ("<=", 5.0),
    "returning_ttft_p99_over_p50": ("<=", 1.5),
    "multi_turn_cached_share": (">=", 0.95),
    "decode_b64_sampled_step_over_floor": ("<=", 1.3),
}


def step_fields(step: Step) -> dict[str, Any]:
    """What identifies a step in its row."""
    return {
        "step": step.name,
        "workload": step.kind,
        "sampling": step.sampling,
        "concurrency": step.concurrency or None,
        "warmup": step.warmup,
    }


def brief(row: dict[str, Any]) -> str:
    """A row in one line for the log."""
    cache = row.get("cache", {}).get("cached_share")
    client = row.get("client")
    return (
        f"[{row['side']}] {row['step']}: {row['requests']} requests "
        f"({row['errors']} failed, {row['short_requests']} short) in {row['seconds']} s, "
        f"{row['output_tokens_per_s']} tok/s, TTFT p50/p99 {row['ttft_ms']['p50']}/"
        f"{row['ttft_ms']['p99']} ms, ITL p50/p99 {row['itl_ms']['p50']}/"
        f"{row['itl_ms']['p99']} ms, {row['tokens_per_chunk']['mean']} tok/chunk"
        + (f", cached share {cache}" if cache is not None else "")
        + (
            f", decode step {row['decode_step_ms']} ms = {row['step_over_floor']}x floor"
            if "decode_step_ms" in row
            else ""
        )
        + (
            f", client cpu {client['cpu_share_max']} lag p99 {client['loop_lag_p99_ms_max']} ms"
            if client
            else ""
        )
        + "".join(
            f", {part} p50 {ms['p50']} ms" for part, ms in row.get("first_token_ms", {}).items()
        )
    )


def _by_step(rows: list[dict[str, Any]], side: str) -> dict[str, dict[str, Any]]:
    return {
        r["step"]: r
        for r in rows
        if r["side"] == side and not r.get("skipped") and not r["warmup"] and r["requests"]
    }


def _fixed(http: dict, inproc: dict, out: dict[str, Any]) -> None:
    for s in ("sampled", "greedy"):
        for c in (64, 128):
            h, i = http.get(f"fixed-c{c}-{s}"), inproc.get(f"fixed-c{c}-{s}")
            if h and i and h["output_tokens_per_s"] and i["output_tokens_per_s"]:
                out[f"c{c}_{s}_tokens_per_s_http_over_in_process"] = round(
                    h["output_tokens_per_s"] / i["output_tokens_per_s"], 4
                )
        h, i = http.get(f"fixed-c1-{s}"), inproc.get(f"fixed-c1-{s}")
        if h and i and h["itl_ms"]["p50"] and i.get("decode_step_ms"):
            out[f"c1_{s}_itl_p50_over_in_process_step"] = round(
                h["itl_ms"]["p50"] / i["decode_step_ms"], 4
            )
        if h and i and h["ttft_ms"]["p50"] is not None and i["ttft_ms"]["p50"] is not None:
            out[f"c1_{s}_ttft_p50_minus_in_process_ms"] = round(
                h["ttft_ms"]["p50"] - i["ttft_ms"]["p50"], 3
            )
    for s in ("sampled", "greedy"):
        i = inproc.get(f"fixed-c64-{s}")
        if i and "step_over_floor" in i:
            out[f"decode_b64_{s}_step_over_floor"] = i["step_over_floor"]


def _kept(http: dict, inproc: dict, out: dict[str, Any]) -> None:
    h, i = http.get("returning"), inproc.get("returning")
    if h and i:
        hp, ip = h["cache"]["returning_ttft_ms"], i["cache"]["returning_ttft_ms"]
        if hp["p50"] is not None and ip["p50"] is not None:
            out["returning_ttft_p50_minus_in_process_ms"] = round(hp["p50"] - ip["p50"], 3)
            out["returning_ttft_p99_over_p50"] = round(hp["p99"] / hp["p50"], 4)
    h, i = http.get("multi_turn"), inproc.get("multi_turn")
    if h and h["cache"]["cached_share"] is not None:
        out["multi_turn_cached_share"] = h["cache"]["cached_share"]
        out["multi_turn_ttft_p99_ms_http"] = h["ttft_ms"]["p99"]
    if i:
        out["multi_turn_ttft_p99_ms_in_process"] = i["ttft_ms"]["p99"]
        out["multi_turn_cached_share_in_process"] = i["cache"]["cached_share"]
    if h and i and i["ttft_ms"]["p99"]:
        out["multi_turn_ttft_p99_http_over_in_process"] = round(
            h["ttft_ms"]["p99"] / i["ttft_ms"]["p99"], 4
        )


def headlines(rows: list[dict[str, Any]], side: str = "http") -> dict[str, Any]:
    """The ratios issue 9 names for the HTTP rows of `side` against the in-process ones,
    with `targets_met` for each one measured."""
    http, inproc = _by_step(rows, side), _by_step(rows, "in_process")
    out: dict[str, Any] = {}
    _fixed(http, inproc, out)
    _kept(http, inproc, out)
    out["targets_met"] = {
        k: (out[k] <= v if op == "<=" else out[k] >= v)
        for k, (op, v) in TARGETS.items()
        if k in out
    }
    out["targets_not_measured"] = sorted(k for k in TARGETS if k not in out)
    clients = [r["client"]["client_kept_up"] for r in http.values() if "client" in r]
    out["client_kept_up_in_every_step"] = bool(clients) and all(clients)
    return out


def _pair(h: dict | None, i: dict | None, *path: str) -> str:
    def get(row: dict | None) -> Any:
        for key in path:
            row = row.get(key) if isinstance(row, dict) else None
        return "-" if row is None else row

    return f"{get(h)} / {get(i)}"


def table(rows: list[dict[str, Any]], side: str = "http") -> str:
    """A markdown table of every measured step: HTTP (rows of `side`) / in-process."""
    http, inproc = _by_step(rows, side), _by_step(rows, "in_process")
    names = list(dict.fromkeys([*inproc, *http]))
    lines = [
        "| step | tok/s (HTTP / in-process) | ratio | TTFT p50 ms | TTFT p99 ms | "
        "ITL p50 ms | ITL p99 ms | tokens/chunk | cached share |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in names:
        h, i = http.get(name), inproc.get(name)
        ratio = (
            f"{h['output_tokens_per_s'] / i['output_tokens_per_s']:.2f}"
            if h and i and h["output_tokens_per_s"] and i["output_tokens_per_s"]
            else "-"
        )
        lines.append(
            " | ".join(
                [
                    f"| {name}",
                    _pair(h, i, "output_tokens_per_s"),
                    ratio,
                    _pair(h, i, "ttft_ms", "p50"),
                    _pair(h, i, "ttft_ms", "p99"),
                    _pair(h, i, "itl_ms", "p50"),
                    _pair(h, i, "itl_ms", "p99"),
                    _pair(h, i, "tokens_per_chunk", "mean"),
                    _pair(h, i, "cache", "cached_share"),
                ]
            )
            + " |"
        )
    return "\n".join(lines)
