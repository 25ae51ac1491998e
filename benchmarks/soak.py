"""Soak: N concurrent streaming clients for a fixed time against a grace-serve app; a bounded run.

    .venv/bin/python benchmarks/soak.py                      # starts `serve run configs/local.yaml`
    .venv/bin/python benchmarks/soak.py --url http://127.0.0.1:8000   # against a running one

Without --url it starts `serve run` on a private local Ray (``RAY_ADDRESS=local``) with the
config's HTTP port replaced by a free one, and stops it (SIGTERM to its process group) at the
end. Each client holds multi-turn conversations (the history grows each turn, then restarts),
streaming every answer; with --sticky-users each client sends an ``X-User-Id`` so its cache is
kept, otherwise requests are anonymous and every KV byte must be free again at the end.
A 429 is honoured by waiting Retry-After. Clients start no request after --duration-s; each
request has a hard timeout (a "hung" stream if it trips). Traffic goes to 127.0.0.1 only.

Hostile traffic mixes in (issue 11): --stalled-bodies N connections each send headers and
half a body, then nothing, opening again whenever the server closes one (a 408 after
`ingress.body_timeout_s`); --poison-fraction F of the clients' turns go out as hostile requests
instead (a tiny temperature or top_p, which must be answered 200; a lone surrogate, a boolean
`max_tokens`, an over-long prompt, which must be 4xx), counted apart from the well-formed ones.

Writes a JSON report: requests, HTTP statuses, error chunks by code, hung streams, time to first
token p50/p99, memory (RSS) of every process before and after, each replica's KV state at the
end, and the hostile traffic's counts. Exit status 0 only if no well-formed request got a 5xx
or an error chunk, no stream hung, no poison request got a 5xx, and all KV was freed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from deployments.proxy_middleware import PROXY_ENV

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "unified",
    "memory",
    "grace",
    "hopper",
    "cache",
    "token",
    "route",
    "replica",
    "stream",
    "latency",
    "page",
    "budget",
    "model",
    "user",
    "turn",
    "answer",
    "prefill",
    "decode",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def start_server(config: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """`serve run` on a copy of `config` whose HTTP port is free; returns (process, url)."""
    data = yaml.safe_load(config.read_text())
    port = free_port()
    data.setdefault("http_options", {}).update(host="127.0.0.1", port=port)
    tmp = Path(tempfile.mkdtemp(prefix="soak-")) / config.name
    tmp.write_text(yaml.safe_dump(data))
    env = {**PROXY_ENV, **os.environ, "RAY_ADDRESS": "local", "RAY_USAGE_STATS_ENABLED": "0"}
    serve_bin = Path(sys.executable).with_name("serve")
    proc = subprocess.Popen(
        [str(serve_bin), "run", str(tmp)],
        cwd=ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return proc, f"http://127.0.0.1:{port}"


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group (`serve run` in the background ignores SIGINT)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def wait_ready(url: str, replicas: int | None, timeout_s: float = 300) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            rows = httpx.get(f"{url}/admin/replicas", timeout=10).json()
            if isinstance(rows, list) and rows and (replicas is None or len(rows) == replicas):
                return rows
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not become ready")


def processes(root_pid: int | None, extra_pids: list[int]) -> list[psutil.Process]:
    found: dict[int, psutil.Process] = {}
    if root_pid is not None:
        root = psutil.Process(root_pid)
        for p in [root, *root.children(recursive=True)]:
            found[p.pid] = p
    for pid in extra_pids:
        if pid not in found and psutil.pid_exists(pid):
            found[pid] = psutil.Process(pid)
    return list(found.values())


def memory(procs: list[psutil.Process]) -> dict[str, dict[str, Any]]:
    out = {}
    for p in procs:
        try:
            name = " ".join(p.cmdline())[:90] or p.name()
            out[str(p.pid)] = {"name": name, "rss_mib": round(p.memory_info().rss / 2**20, 1)}
        except psutil.Error:
            continue
    return out


# Hostile turns: (name, body changes, whether a 200 is the right answer). Those answered 200
# are well-formed (odd sampling values); the rest are the client's mistakes (a 4xx).
POISON = (
    ("tiny_temperature", {"temperature": 1e-40}, True),
    ("tiny_top_p", {"temperature": 1.0, "top_p": 1e-46}, True),
    ("lone_surrogate", {"messages": [{"role": "user", "content": "a\ud800b"}]}, False),
    ("boolean_max_tokens", {"max_tokens": True}, False),
    ("huge_prompt", {"messages": [{"role": "user", "content": "ab " * 1_300_000}]}, False),
)


def error_code(body: bytes) -> str:
    """The OpenAI error body's code, or what the body was when it was not one."""
    try:
        return str(json.loads(body)["error"].get("code"))
    except (ValueError, KeyError, TypeError, AttributeError):
        return "not-openai-shaped"


class Stats:
    def __init__(self) -> None:
        self.statuses: dict[str, int] = {}
        self.error_chunks: dict[str, int] = {}
        self.hung = 0
        self.transport_errors: dict[str, int] = {}
        self.ttft_s: list[float] = []
        self.tokens_out = 0
        self.requests = 0
        self.poison: dict[str, dict[str, int]] = {}  # name -> status -> count
        self.poison_wrong = 0  # a 5xx, or a 200 where a 4xx was due (or the reverse)
        self.stalled: dict[str, int] = {"opened": 0, "answered_408": 0, "other": 0}
        self.refusals: dict[str, int] = {}  # "<status> <error code>" of well-formed requests


async def poison_request(
    client: httpx.AsyncClient, url: str, base: dict, rng: random.Random, stats: Stats
) -> None:
    """One hostile turn (POISON), not streamed; counted by its name and status."""
    name, changes, should_pass = rng.choice(POISON)
    body = {**base, "stream": False, **changes}
    body.pop("stream_options", None)
    data = json.dumps(body, ensure_ascii=True)  # a surrogate travels as its \ud800 escape
    try:
        response = await client.post(
            f"{url}/v1/chat/completions", content=data, headers={"content-type": "application/json"}
        )
        status = response.status_code
    except httpx.HTTPError:
        status = -2
    counts = stats.poison.setdefault(name, {})
    counts[str(status)] = counts.get(str(status), 0) + 1
    if status >= 500 or status < 0 or (status == 200) != should_pass:
        stats.poison_wrong += 1


async def stalled_body(url: str, stats: Stats, stop_at: float) -> None:
    """Headers and half a body, then nothing; again whenever the server closes it."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": "x", "messages": [{"role": "user", "content": "y" * 400}]})
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: "
        f"application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    while time.monotonic() < stop_at:
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
        except OSError:
            await asyncio.sleep(0.5)
            continue
        stats.stalled["opened"] += 1
        writer.write(head + body[: len(body) // 2].encode())
        await writer.drain()
        try:
            line = await asyncio.wait_for(reader.readline(), max(0.1, stop_at - time.monotonic()))
            key = "answered_408" if b" 408 " in line else "other"
            if line:
                stats.stalled[key] += 1
        except (asyncio.TimeoutError, OSError):
            pass
        writer.close()


async def one_request(
    client: httpx.AsyncClient, url: str, body: dict, headers: dict, stats: Stats, timeout_s: float
) -> tuple[int, str, float]:
    """Stream one chat turn; returns (status, text, retry_after_s)."""
    start, text = time.monotonic(), []
    stats.requests += 1

    async def stream() -> tuple[int, float]:
        async with client.stream(
            "POST", f"{url}/v1/chat/completions", json=body, headers=headers
        ) as response:
            if response.status_code != 200:
                refusal = f"{response.status_code} {error_code(await response.aread())}"
                stats.refusals[refusal] = stats.refusals.get(refusal, 0) + 1
                return response.status_code, float(response.headers.get("retry-after") or 0)
            first = True
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                if first:
                    stats.ttft_s.append(time.monotonic() - start)
                    first = False
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    code = str(chunk["error"].get("code"))
                    stats.error_chunks[code] = stats.error_chunks.get(code, 0) + 1
                elif chunk.get("usage"):
                    stats.tokens_out += chunk["usage"]["completion_tokens"]
                elif chunk.get("choices"):
                    text.append(chunk["choices"][0]["delta"].get("content") or "")
            return 200, 0.0

    retry = 0.0
    try:
        status, retry = await asyncio.wait_for(stream(), timeout_s)
    except asyncio.TimeoutError:
        stats.hung += 1
        status = -1
    except httpx.HTTPError as exc:
        name = type(exc).__name__
        stats.transport_errors[name] = stats.transport_errors.get(name, 0) + 1
        status = -2
    stats.statuses[str(status)] = stats.statuses.get(str(status), 0) + 1
    return status, "".join(text), retry


async def client_loop(
    i: int, url: str, args: argparse.Namespace, stats: Stats, stop_at: float
) -> None:
    rng = random.Random(i)
    limits = httpx.Limits(max_connections=2)
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(args.request_timeout_s), limits=limits
    ) as client:
        conversation, messages = 0, []
        while time.monotonic() < stop_at:
            if len(messages) >= 2 * args.turns:
                conversation, messages = conversation + 1, []
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40)))
            messages.append({"role": "user", "content": words})
            body = {
                "model": args.model,
                "messages": messages,
                "max_tokens": args.max_tokens,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            if rng.random() < args.poison_fraction:
                await poison_request(client, url, {**body, "messages": list(messages)}, rng, stats)
                messages.pop()  # the conversation goes on without the hostile turn
                continue
            headers = {"X-User-Id": f"soak-{i}-{conversation}"} if args.sticky_users else {}
            status, text, retry = await one_request(
                client, url, body, headers, stats, args.request_timeout_s
            )
            if status == 200:
                messages.append({"role": "assistant", "content": text[:200]})
            else:
                messages.pop()
                await asyncio.sleep(retry or 0.5)


async def drive(url: str, args: argparse.Namespace) -> tuple[Stats, float]:
    stats = Stats()
    started = time.monotonic()
    stop_at = started + args.duration_s
    await asyncio.gather(
        *(client_loop(i, url, args, stats, stop_at) for i in range(args.clients)),
        *(stalled_body(url, stats, stop_at) for _ in range(args.stalled_bodies)),
    )
    return stats, time.monotonic() - started


def settle(url: str, timeout_s: float = 60) -> list[dict]:
    """Replica rows once no request runs or waits (or after timeout_s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = httpx.get(f"{url}/admin/replicas", timeout=30).json()
        busy = sum(r["running_requests"] + r["waiting_requests"] for r in rows)
        if busy == 0 or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def kv_freed(rows: list[dict], sticky: bool) -> bool:
    """No request holds KV; anonymous load leaves no KV at all; paged engines free every page."""
    for r in rows:
        if r["running_requests"] or r["waiting_requests"]:
            return False
        if not sticky and r["kv_cache_bytes"]:
            return False
        total, free = r.get("kv_pages_total"), r.get("kv_pages_free")
        if not sticky and total is not None and free != total:
            return False
    return True


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "local.yaml")
    parser.add_argument("--url", help="a running app; default: start `serve run --config`")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--duration-s", type=float, default=60)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--turns", type=int, default=4, help="turns before a new conversation")
    parser.add_argument("--request-timeout-s", type=float, default=120)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--sticky-users", action="store_true")
    parser.add_argument(
        "--stalled-bodies", type=int, default=0, help="connections that send half a body and stall"
    )
    parser.add_argument(
        "--poison-fraction",
        type=float,
        default=0.0,
        help="share of turns sent as hostile requests instead",
    )
    parser.add_argument("--card", default="cpu", help="what the replicas run on, for the name")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or ROOT / "benchmarks" / "results" / f"soak-local-{args.card}.json"

    proc, url = None, args.url
    if url is None:
        log = Path(tempfile.mkdtemp(prefix="soak-log-")) / "serve.log"
        print(f"serve run output: {log}")
        proc, url = start_server(args.config, log)
    try:
        expected = None
        if proc is not None:
            apps = yaml.safe_load(args.config.read_text())["applications"]
            expected = apps[0]["args"]["replica"]["num_replicas"]
        rows = wait_ready(url, expected)
        procs = processes(proc.pid if proc else None, [r["pid"] for r in rows])
        mem_before = memory(procs)
        stats, elapsed = asyncio.run(drive(url, args))
        rows_after = settle(url)
        mem_after = memory(procs)
        healthy = httpx.get(f"{url}/health", timeout=10).status_code == 200
    finally:
        if proc is not None:
            stop_server(proc)

    server_errors = sum(n for s, n in stats.statuses.items() if s.startswith("5"))
    freed = kv_freed(rows_after, args.sticky_users)
    report = {
        "bench": "soak",
        "card": args.card,
        "git_commit": git_commit(),
        "config": str(args.config.relative_to(ROOT)) if args.url is None else args.url,
        "clients": args.clients,
        "duration_s": round(elapsed, 1),
        "max_tokens": args.max_tokens,
        "sticky_users": args.sticky_users,
        "requests": stats.requests,
        "http_statuses": stats.statuses,
        "refusals_by_code": stats.refusals,
        "error_chunks_by_code": stats.error_chunks,
        "transport_errors": stats.transport_errors,
        "hung_streams": stats.hung,
        "server_errors_5xx": server_errors,
        "tokens_out": stats.tokens_out,
        "ttft_ms": {
            "p50": round(1000 * (percentile(stats.ttft_s, 50) or 0), 1),
            "p99": round(1000 * (percentile(stats.ttft_s, 99) or 0), 1),
            "samples": len(stats.ttft_s),
        },
        "memory_rss_mib": {"before": mem_before, "after": mem_after},
        "replicas_after": [
            {
                k: r.get(k)
                for k in (
                    "replica_id",
                    "running_requests",
                    "waiting_requests",
                    "kv_cache_bytes",
                    "kv_pages_total",
                    "kv_pages_free",
                    "resident_users",
                    "evicted_users",
                    "free_unified_memory_bytes",
                )
            }
            for r in rows_after
        ],
        "kv_all_freed": freed,
        "healthy_after": healthy,
        "stalled_bodies": {"connections": args.stalled_bodies, **stats.stalled},
        "poison": {
            "fraction": args.poison_fraction,
            "by_kind_and_status": stats.poison,
            "wrong_answers": stats.poison_wrong,
        },
    }
    for r in report["replicas_after"]:
        r["resident_users"] = len(r["resident_users"] or [])
    # A well-formed request may be told to retry (429); any other refusal is an error for a
    # well-behaved client.
    refused = {k: n for k, n in stats.refusals.items() if not k.startswith("429 ")}
    ok = (
        server_errors == 0
        and stats.hung == 0
        and freed
        and healthy
        and not stats.error_chunks
        and stats.poison_wrong == 0
        and not refused
    )
    report["pass"] = ok
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        json.dumps(
            {
                k: report[k]
                for k in (
                    "requests",
                    "http_statuses",
                    "hung_streams",
                    "ttft_ms",
                    "kv_all_freed",
                    "pass",
                )
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
