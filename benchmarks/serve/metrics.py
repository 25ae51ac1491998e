"""Per-step figures from request records, the same for the HTTP and the in-process side.

Definitions (times in milliseconds; only measured requests that did not fail count):

- TTFT: from sending the request to its first content chunk. A content chunk is, over HTTP,
  the text one socket read brought (the SSE events it completed, usually one); in-process,
  one item of the engine's stream (an id, or the list of ids of one wake-up);
- inter-token latency (ITL), vLLM's definition: every gap between successive content chunks
  of a request, pooled over requests; `tokens_per_chunk` says how many tokens a chunk held
  (the service may send several tokens a chunk at high load);
- TPOT: a request's (last chunk - first chunk) / (completion tokens - 1), whatever the chunking;
- output tokens/s: completion tokens of all measured requests over the run's wall time, from
  the first measured request's start to the last one's end;
- cache share (returning and multi-turn): over returning turns, prompt tokens served from the
  user's kept cache (`cached_tokens`) over the tokens the previous turns already held (that
  turn's prompt plus its completion): 1.0 means every earlier token came from the cache.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile with linear interpolation between ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    pos = q / 100 * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _ms(values: list[float], *qs: float) -> dict[str, float | None]:
    out = {}
    for q in qs:
        v = percentile(values, q)
        out[f"p{q:g}"] = None if v is None else round(v * 1e3, 3)
    return out


def latency(records: list[dict[str, Any]]) -> dict[str, Any]:
    """TTFT, ITL, TPOT and chunking of the records that produced text."""
    ok = [r for r in records if not r["error"] and r["chunk_t"]]
    gaps = [b - a for r in ok for a, b in itertools.pairwise(r["chunk_t"])]
    tpot = [
        (r["chunk_t"][-1] - r["chunk_t"][0]) / (r["completion_tokens"] - 1)
        for r in ok
        if r["completion_tokens"] > 1
    ]
    chunks = sum(len(r["chunk_t"]) for r in ok)
    in_chunks = sum(sum(r["chunk_n"]) for r in ok)
    return {
        "ttft_ms": _ms([r["chunk_t"][0] for r in ok], 50, 99),
        "itl_ms": _ms(gaps, 50, 99),
        "tpot_ms": _ms(tpot, 50),
        "tokens_per_chunk": {
            "mean": round(in_chunks / chunks, 3) if chunks else None,
            "max": max((max(r["chunk_n"]) for r in ok), default=None),
        },
    }


def first_token_breakdown(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Where HTTP requests' first tokens spent their time, p50/p99 in ms, from the ingress's
    `Server-Timing` header: `prepare` (ingress: parse, tokenize, shape), `replica` (arrival
    there to first token: admission, the engine's queue, prefill), `transport` (ingress to
    replica and back: upstream - replica) and `proxy` (everything outside the ingress's call:
    client to ingress and the first chunk's way back: TTFT - prepare - upstream)."""
    timed = [r for r in records if not r["error"] and r["chunk_t"] and r.get("server_timing")]
    if not timed:
        return None
    parts: dict[str, list[float]] = {"prepare": [], "replica": [], "transport": [], "proxy": []}
    for r in timed:
        st = {k: v / 1e3 for k, v in r["server_timing"].items()}  # seconds, as chunk_t
        up = st.get("upstream", 0.0)
        parts["prepare"].append(st.get("prepare", 0.0))
        parts["replica"].append(st.get("replica", 0.0))
        parts["transport"].append(up - st.get("replica", 0.0))
        parts["proxy"].append(r["chunk_t"][0] - st.get("prepare", 0.0) - up)
    return {name: _ms(values, 50, 99) for name, values in parts.items()}


def throughput(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Completion tokens over the wall time of the records."""
    if not records:
        return {"output_tokens": 0, "seconds": None, "output_tokens_per_s": None}
    tokens = sum(r["completion_tokens"] for r in records if not r["error"])
    seconds = max(r["end"] for r in records) - min(r["start"] for r in records)
    return {
        "output_tokens": tokens,
        "seconds": round(seconds, 3),
        "output_tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
    }


def cache_use(records: list[dict[str, Any]]) -> dict[str, Any]:
    """How much of the returning turns' history came from the kept cache; their TTFT apart
    from first turns'."""
    ok = [r for r in records if not r["error"]]
    back = [r for r in ok if r["held_tokens"] > 0]
    held = sum(r["held_tokens"] for r in back)
    first = [r for r in ok if r["held_tokens"] == 0 and r["chunk_t"]]
    return {
        "returning_turns": len(back),
        "history_tokens": held,
        "cached_tokens": sum(r["cached_tokens"] for r in back),
        "cached_share": round(sum(r["cached_tokens"] for r in back) / held, 4) if held else None,
        "returning_ttft_ms": _ms([r["chunk_t"][0] for r in back if r["chunk_t"]], 50, 99),
        "first_turn_ttft_ms": _ms([r["chunk_t"][0] for r in first], 50, 99),
    }


def summarize(records: list[dict[str, Any]], kind: str, warmup: bool = False) -> dict[str, Any]:
    """The figures of one step from its measured records (of a warm-up step: all of them)."""
    measured = [r for r in records if r["measured"] or warmup]
    errors = [r["error"] for r in measured if r["error"]]
    row: dict[str, Any] = {
        "requests": len(measured),
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:3],
        "short_requests": sum(
            1 for r in measured if not r["error"] and r["completion_tokens"] < r["max_tokens"]
        ),
        "prompt_tokens": sum(r["prompt_tokens"] for r in measured),
        **throughput(measured),
        **latency(measured),
    }
    if kind in ("returning", "multi_turn"):
        row["cache"] = cache_use(measured)
    breakdown = first_token_breakdown(measured)
    if breakdown:
        row["first_token_ms"] = breakdown
    return row


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Add `row` to a JSON-lines file at once, so a run cut off still leaves its rows."""
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """How each number of a figures dict (one level of nesting too) moved over a step."""
    out: dict[str, Any] = {}
    for key, new in after.items():
        old = before.get(key)
        if isinstance(new, dict) and isinstance(old, dict):
            inner = changes(old, new)
            if inner:
                out[key] = inner
        elif (
            isinstance(new, int | float)
            and isinstance(old, int | float)
            and not isinstance(new, bool)
            and new != old
            and key != "as_of"
        ):
            out[key] = round(new - old, 6)
    return out
