"""HTTP client processes: each runs its share of a step's sessions on its own event loop.

    python -m benchmarks.serve.client_pool --url URL --model NAME --index I --procs N

A worker reads one JSON command a line from stdin (``{"op": "run", "step", "plan",
"model_config", "stop_at"}`` or ``{"op": "exit"}``), runs sessions I, I+N, I+2N, ... of the step
and writes one JSON line to stdout: the records, and what shows whether the client kept up:
its CPU time over the step's wall time and the lag of its event loop (how late a 10 ms sleep
wakes). `ClientPool` starts N workers and sends every step to all of them at once.
Imports no torch: a worker is small and starts in about a second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
LAG_PERIOD_S = 0.01
# The client kept up if no worker used more than half a core and its loop woke on time.
MAX_CPU_SHARE, MAX_LAG_P99_MS = 0.5, 2.0


async def loop_lag(stop: asyncio.Event) -> list[float]:
    """How late each 10 ms sleep of this loop wakes, until `stop` is set (seconds)."""
    lags = []
    while not stop.is_set():
        t = time.monotonic()
        await asyncio.sleep(LAG_PERIOD_S)
        lags.append(time.monotonic() - t - LAG_PERIOD_S)
    return lags


async def run_command(command: dict[str, Any], send: Any, index: int, procs: int) -> dict[str, Any]:
    """Run this worker's share of the step; its records and load."""
    from benchmarks.bench_model import visible_ids
    from benchmarks.serve.metrics import percentile
    from benchmarks.serve.sessions import run_sessions
    from benchmarks.serve.workloads import PLANS, Step, sessions_for

    step = Step.from_dict(command["step"])
    mine = sessions_for(step, PLANS[command["plan"]])[index::procs]
    stop, cpu, wall = asyncio.Event(), time.process_time(), time.monotonic()
    lag = asyncio.create_task(loop_lag(stop))
    records = await run_sessions(
        mine, send, visible_ids(command["model_config"]), command["stop_at"]
    )
    stop.set()
    lags = await lag
    wall = time.monotonic() - wall
    return {
        "records": records,
        "sessions": len(mine),
        "wall_s": wall,
        "cpu_share": (time.process_time() - cpu) / wall if wall else 0.0,
        "loop_lag_p99_ms": 1e3 * (percentile(lags, 99) or 0.0),
        "loop_lag_max_ms": 1e3 * max(lags, default=0.0),
    }


async def worker(url: str, model: str, index: int, procs: int) -> None:
    from benchmarks.serve.http_client import HTTPTransport, new_session

    loop = asyncio.get_running_loop()
    async with new_session() as session:
        send = HTTPTransport(session, url, model)
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            command = json.loads(line) if line.strip() else {"op": "exit"}
            if command["op"] == "exit":
                return
            result = await run_command(command, send, index, procs)
            sys.stdout.write(json.dumps(result) + "\n")
            sys.stdout.flush()


class ClientPool:
    """N worker processes against a server's URLs (worker i sends to urls[i % len(urls)]:
    the ingress replicas' own ports under direct ingress, else the proxy's one); `run`
    sends a step to all and merges."""

    def __init__(self, procs: int, urls: list[str], model: str, env: dict[str, str]) -> None:
        self._procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.serve.client_pool",
                    "--url",
                    urls[i % len(urls)],
                    "--model",
                    model,
                    "--index",
                    str(i),
                    "--procs",
                    str(procs),
                ],
                cwd=ROOT,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(procs)
        ]

    def run(self, command: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Every worker's records of the step, and the client's load across workers."""
        line = json.dumps({"op": "run", **command}) + "\n"
        for proc in self._procs:
            proc.stdin.write(line)
            proc.stdin.flush()
        results = []
        for i, proc in enumerate(self._procs):
            out = proc.stdout.readline()
            if not out:
                raise RuntimeError(f"client process {i} exited (status {proc.poll()})")
            results.append(json.loads(out))
        return [r for res in results for r in res["records"]], load(results)

    def close(self) -> None:
        for proc in self._procs:
            try:
                proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                proc.stdin.close()
            except OSError:
                pass
        for proc in self._procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def load(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The busiest worker's CPU share and loop lag, and whether the client kept up."""
    busy = [r for r in results if r["sessions"]]
    cpu = max((r["cpu_share"] for r in busy), default=0.0)
    lag = max((r["loop_lag_p99_ms"] for r in busy), default=0.0)
    return {
        "client_procs": len(results),
        "cpu_share_max": round(cpu, 3),
        "loop_lag_p99_ms_max": round(lag, 3),
        "loop_lag_max_ms": round(max((r["loop_lag_max_ms"] for r in busy), default=0.0), 3),
        "client_kept_up": cpu <= MAX_CPU_SHARE and lag <= MAX_LAG_P99_MS,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--procs", type=int, required=True)
    opts = parser.parse_args()
    asyncio.run(worker(opts.url, opts.model, opts.index, opts.procs))


if __name__ == "__main__":
    main()
