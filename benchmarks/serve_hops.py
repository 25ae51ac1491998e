"""Ray Serve's own floor for a first token: its hops timed with no model and no work of ours.

    python -m benchmarks.serve_hops [--requests 200] [--out DIR]

Issue 9 asks a 512-token prompt's first token over HTTP within 5 ms of the engine's in-process
TTFT. Our service's first token crosses two Serve hops before and after the engine: the
client's HTTP request to an ingress replica (direct ingress: the replica's own HTTP server)
and the ingress's DeploymentHandle call to the model replica with the first streamed message
back. This benchmark times those hops alone, on the same machine as serve_bench, with the
same Serve settings our deployments use (`deployments.app.SERVE_ENV`, gRPC streams by value):

- `http_plain`: a FastAPI streaming endpoint under plain uvicorn, no Ray (the floor of an HTTP
  round trip to Python at all);
- `http_direct`: the same endpoint as a Serve ingress deployment, reached by direct ingress;
- `handle`: one deployment calls another's streaming method with a 512-token array (as the
  ingress calls LLMReplica.generate) and awaits the first item; `request_way` is from the call
  to the callee's first line, `response_way` from its first yield to the caller's receipt
  (CLOCK_MONOTONIC is shared by the processes of one machine);
- `http_direct_handle`: both together, the client's time to first chunk through an ingress
  that calls a streaming deployment, i.e. our service's path with a zero-time engine.

Each figure is the median (and p90) over `--requests` sequential requests after 20 warm-up
ones. Writes benchmarks/results/serve-hops-<card>.json. Runs on CPU too (the machine's own
figures); it starts a private Ray instance and stops only what it started.
"""

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

from fastapi import (
    FastAPI,
    Request,
)  # real objects in annotations (no __future__): FastAPI reads them

from benchmarks.common import RESULTS, write_result
from benchmarks.serve.server import free_port, free_port_range
from deployments.direct_ingress import direct_ingress_env

WARMUP = 20
PROMPT_IDS = 512


def _ms(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50": round(statistics.median(ordered) * 1e3, 3),
        "p90": round(ordered[int(0.9 * (len(ordered) - 1))] * 1e3, 3),
    }


def first_chunk_s(url: str, requests: int) -> list[float]:
    """Seconds to the first streamed chunk of `requests` sequential POSTs (after warm-up)."""
    import httpx

    body = {"prompt": "word " * PROMPT_IDS, "max_tokens": 1, "stream": True}
    times = []
    with httpx.Client(timeout=30) as client:
        for i in range(WARMUP + requests):
            start = time.perf_counter()
            with client.stream("POST", url, json=body) as response:
                response.raise_for_status()
                chunks = response.iter_raw()
                next(chunks)
                first = time.perf_counter() - start
                for _ in chunks:
                    pass
            if i >= WARMUP:
                times.append(first)
    return times


def streaming_app() -> Any:
    """A FastAPI app with POST /x: reads the JSON body, streams two SSE events."""
    app = FastAPI()

    @app.post("/x")
    async def x(request: Request) -> Any:
        await request.json()
        return sse(None)

    return app


def sse(first: Any, rest: Any = None) -> Any:
    """Two server-sent events, the first naming `first`; `rest` (an async iterator) is
    drained between them."""
    from fastapi.responses import StreamingResponse

    async def events() -> Any:
        yield f"data: {first!r}\n\n"
        if rest is not None:
            async for _ in rest:
                pass
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def plain_uvicorn(requests: int) -> list[float]:
    """`http_plain`: the app under uvicorn in a child process (no Ray)."""
    import multiprocessing

    port = free_port()
    proc = multiprocessing.get_context("spawn").Process(target=_serve_plain, args=(port,))
    proc.start()
    try:
        _wait_http(f"http://127.0.0.1:{port}/x")
        return first_chunk_s(f"http://127.0.0.1:{port}/x", requests)
    finally:
        proc.terminate()
        proc.join(10)


def _serve_plain(port: int) -> None:
    import uvicorn

    uvicorn.run(streaming_app(), host="127.0.0.1", port=port, log_level="warning")


def _wait_http(url: str, timeout_s: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            httpx.post(url, json={}, timeout=5)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer in {timeout_s} s")


def serve_deployments() -> tuple[Any, Any]:
    """(Plain, Chain): Serve ingress deployments of the streaming app, Chain's calling a
    streaming `Downstream` deployment first, as our ingress calls LLMReplica."""
    import array

    from ray import serve

    from deployments.app import runtime_env

    options = {"num_cpus": 0, "runtime_env": runtime_env()}

    @serve.deployment(ray_actor_options=options)
    class Downstream:
        async def gen(self, ids: Any, sent_at: float) -> Any:
            entered = time.monotonic()
            yield (entered - sent_at, time.monotonic())
            yield None

    @serve.deployment(ray_actor_options=options)
    @serve.ingress(streaming_app())
    class Plain:
        pass

    chain_api = FastAPI()

    @serve.deployment(ray_actor_options=options)
    @serve.ingress(chain_api)
    class Chain:
        def __init__(self, downstream: Any) -> None:
            self._down = downstream.options(stream=True, _by_reference=False)

        def _call(self) -> Any:
            return self._down.gen.remote(array.array("I", range(PROMPT_IDS)), time.monotonic())

        @chain_api.post("/x")
        async def x(self, request: Request) -> Any:
            await request.json()
            stream = self._call()
            return sse(await stream.__anext__(), stream)

        async def measure(self, requests: int) -> dict[str, list[float]]:
            times: dict[str, list[float]] = {"handle": [], "request_way": [], "response_way": []}
            for i in range(WARMUP + requests):
                start = time.monotonic()
                stream = self._call()
                request_way, yielded_at = await stream.__anext__()
                got = time.monotonic()
                async for _ in stream:
                    pass
                if i >= WARMUP:
                    times["handle"].append(got - start)
                    times["request_way"].append(request_way)
                    times["response_way"].append(got - yielded_at)
            return times

    return Plain, Chain.bind(Downstream.bind())


def direct_url(ports: range, path: str) -> str:
    """The URL of `path` on the direct-ingress port in `ports` that answers it with a 200."""
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for port in ports:
            url = f"http://127.0.0.1:{port}{path}"
            try:
                answer = httpx.post(url, json={}, timeout=5)
                if answer.status_code == 200:
                    return url
            except httpx.HTTPError:
                continue
        time.sleep(0.5)
    raise TimeoutError(f"no direct-ingress port in {ports} answered {path}")


def serve_rows(requests: int) -> dict[str, Any]:
    """The three Serve rows, on a private Ray instance with direct ingress on."""
    import ray
    from ray import serve

    base = free_port_range(4)
    ports = range(base, base + 4)
    os.environ.update(direct_ingress_env(ports))  # before Ray starts: every process reads it
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(
        address="local", include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}}
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        plain, chain = serve_deployments()
        serve.run(plain.bind(), name="plain", route_prefix="/plain")
        handle = serve.run(chain, name="chain", route_prefix="/chain")
        times = handle.measure.remote(requests).result()
        times["http_direct"] = first_chunk_s(direct_url(ports, "/plain/x"), requests)
        times["http_direct_handle"] = first_chunk_s(direct_url(ports, "/chain/x"), requests)
        return times
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--out", type=Path, default=RESULTS)
    opts = parser.parse_args()
    times = {"http_plain": plain_uvicorn(opts.requests), **serve_rows(opts.requests)}
    rows = {name: _ms(values) for name, values in times.items()}
    print(rows, flush=True)
    path = write_result(
        "serve-hops",
        {
            "requests": opts.requests,
            "prompt_ids": PROMPT_IDS,
            "serve_env": __import__("deployments.app", fromlist=["SERVE_ENV"]).SERVE_ENV,
            "definitions": __doc__,
            "ms": rows,
        },
        opts.out,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
