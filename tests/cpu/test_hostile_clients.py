"""One client can never hurt another (issue 11): each hostile request fails itself only.

Every test here reproduces one way a single client once hurt others (a poison row failing its
whole engine step, a stalled body holding an ingress slot, an undecodable or huge prompt, ...)
and checks that now only that client's request fails, while the others get exactly what they
get alone.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from fastapi import FastAPI, Request

from deployments.config import AppArgs
from deployments.engine import GenerationRequest, SamplingParams, select_engine_class
from deployments.engine.paged.engine import PagedEngine
from deployments.memory import setup_memory
from deployments.model_files import resolve_model_dir
from deployments.platform import detect_platform
from deployments.tokenizer import TextTokenizer

TOKENIZER = TextTokenizer.load(resolve_model_dir("builtin:tiny-llama", weights=False))
PROMPTS = [
    TOKENIZER.encode_text(text)
    for text in (
        "Unified memory lets the GPU and the CPU share one address space.",
        "A replica keeps each user's cache where it was made.",
        "The router sends a returning user home.",
    )
]


# ---- item 1: a poison row fails its own request only --------------------------------------


@pytest.fixture(scope="module")
def engine():
    args = AppArgs.model_validate(
        {
            "model": {"model_id": "builtin:tiny-llama", "max_model_len": 512},
            "memory": {"cpu_memory_budget_bytes": "64MiB"},
            "kv_cache": {"budget_bytes": "8MiB"},
            "engine": {"cpu_threads": 1},
        }
    )
    cls = select_engine_class(args)
    assert cls is PagedEngine
    eng = cls(args, setup_memory(args.memory, detect_platform(use_gpu=False)))
    yield eng
    asyncio.run(eng.shutdown())


async def run(
    engine: PagedEngine,
    ids: list[int],
    sampling: SamplingParams,
    started: asyncio.Event | None = None,
) -> list[int] | BaseException:
    """A request's tokens, or the error its stream ended with."""
    tokens: list[int] = []
    try:
        async for out in engine.generate(GenerationRequest("r", None, ids, sampling)):
            tokens += out.token_ids
            if started is not None and len(tokens) >= 3:
                started.set()
    except Exception as exc:
        return exc
    return tokens


def greedy(n: int = 32) -> SamplingParams:
    return SamplingParams(n, temperature=0.0, ignore_eos=True)


def alone(engine: PagedEngine) -> list[list[int]]:
    async def each():
        return [await run(engine, ids, greedy()) for ids in PROMPTS]

    return asyncio.run(each())


def test_an_out_of_range_sampling_value_joins_a_batch_without_failing_it(engine):
    """top_k = 2**70 once raised OverflowError while the step's plan was built: every row of
    that step failed. Now it is clipped like any other value, and greedy rows are unchanged."""
    reference = alone(engine)

    async def main():
        odd = SamplingParams(32, temperature=1.0, top_k=2**70, seed=3, ignore_eos=True)
        return await asyncio.gather(
            *(run(engine, ids, greedy()) for ids in PROMPTS), run(engine, PROMPTS[0], odd)
        )

    *normal, odd = asyncio.run(main())
    assert normal == reference
    assert isinstance(odd, list) and len(odd) == 32
    engine.check_integrity()


def test_a_row_whose_step_fails_fails_alone_and_the_batch_keeps_its_tokens(engine):
    """A poison row (here: a forward pass that raises whenever the step holds the poison
    request's marker token, as a kernel might on one row's input) joins a running batch. Only
    that request ends in error; the others' streams carry on with exactly the tokens they get
    alone, and no KV page leaks."""
    reference = alone(engine)
    marker = TOKENIZER.vocab_size - 1
    assert all(marker not in ids + out for ids, out in zip(PROMPTS, reference, strict=True))
    model = engine.runner.model
    forward = model.forward

    def poisoned(tokens: torch.Tensor, *args, **kwargs):
        if bool((tokens == marker).any()):
            raise RuntimeError("poison row")
        return forward(tokens, *args, **kwargs)

    async def main():
        started = [asyncio.Event() for _ in PROMPTS]
        normal = [
            asyncio.create_task(run(engine, ids, greedy(), ev))
            for ids, ev in zip(PROMPTS, started, strict=True)
        ]
        for ev in started:  # every normal request is decoding: the poison joins their batch
            await ev.wait()
        poison = await run(engine, [*PROMPTS[1][:4], marker, *PROMPTS[1][4:]], greedy())
        return await asyncio.gather(*normal), poison

    model.forward = poisoned
    try:
        normal, poison = asyncio.run(main())
    finally:
        del model.forward
    assert isinstance(poison, RuntimeError) and "poison row" in str(poison)
    assert normal == reference
    engine.check_integrity()
    assert engine.cache.free_pages == engine.cache.usable_pages  # nothing kept, nothing leaked


# ---- items 3 and 4: undecodable text is a 400; text too long is refused untokenized ---------


def _ingress():
    from tests.cpu.test_ingress_failures import FakeHandle, events, ingress

    handle = FakeHandle(events())
    return handle, ingress(handle, request_timeout_s=5)


@pytest.mark.parametrize("field", ["content", "parts", "stop", "prompt"])
def test_a_lone_surrogate_anywhere_in_the_text_is_a_400_not_a_503(field):
    """JSON's "\\ud800" decodes to a lone surrogate, which the tokenizer cannot take: it once
    raised past the replica's error handling (503 replica_unavailable)."""
    import json

    bad = json.loads('"a\\ud800b"')
    chat = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}]}
    if field == "content":
        chat["messages"][0]["content"] = bad
    elif field == "parts":
        chat["messages"][0]["content"] = [
            {"type": "text", "text": "x"},
            {"type": "text", "text": bad},
        ]
    elif field == "stop":
        chat["stop"] = ["ok", bad]
    handle, obj = _ingress()
    from deployments.ingress import APIError

    with pytest.raises(APIError) as err:
        if field == "prompt":
            asyncio.run(obj.completion({"model": "tiny-llama", "prompt": bad}))
        else:
            asyncio.run(obj.chat(chat))
    assert err.value.status == 400 and "surrogate" in err.value.body["error"]["message"]
    assert handle.calls == []
    ok = {"model": "tiny-llama", "messages": [{"role": "user", "content": "héllo 😀 한"}]}
    assert asyncio.run(obj.chat(ok))["usage"]["completion_tokens"] == 3  # real Unicode is fine


def test_a_prompt_too_long_for_any_tokenization_is_refused_before_tokenizing():
    """A 3.9 MiB prompt once cost seconds of tokenizing before being refused as too long for
    the 512-token context; its bytes alone prove it cannot fit (at most 17 bytes a token for
    this tokenizer), so it is refused at once."""
    import time

    from deployments.ingress import APIError

    handle, obj = _ingress()
    huge = [{"role": "user", "content": "ab " * 1_300_000}]
    for body in (
        {"model": "tiny-llama", "prompt": "hello world, " * 300_000},
        {"model": "tiny-llama", "messages": huge},
    ):
        started = time.perf_counter()
        with pytest.raises(APIError) as err:
            asyncio.run(obj.completion(body) if "prompt" in body else obj.chat(body))
        assert time.perf_counter() - started < 1.0  # tokenizing it takes ~4 s here
        assert err.value.status == 400
        assert err.value.body["error"]["code"] == "context_length_exceeded"
    assert handle.calls == [] and obj._prompts.bytes_per_token == 17
    # Just under the bound it is tokenized as usual, and the exact count decides.
    with pytest.raises(APIError) as err:
        asyncio.run(obj.completion({"model": "tiny-llama", "prompt": "x" * (511 * 17)}))
    assert "tokens but this model's context is 512" in err.value.body["error"]["message"]


# ---- item 2: stalled bodies, silent replicas and one key's flood hold nobody else up --------


class AsgiCall:
    """One request into an ASGI app, its body sent up to `sent` and then (if `stall`) never
    finished: the client that sends headers and part of a body, then nothing."""

    def __init__(
        self,
        app,
        path: str = "/v1/echo",
        body: bytes = b'{"a": 1}',
        stall: bool = False,
        key: str | None = None,
    ) -> None:
        headers = [(b"content-type", b"application/json")]
        if key is not None:
            headers.append((b"authorization", f"Bearer {key}".encode()))
        self.scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST" if body else "GET",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": headers,
            "scheme": "http",
            "server": ("t", 80),
            "client": ("c", 1),
            "app": app,
        }
        self.app, self.body, self.stall = app, body, stall
        self.sent: list[dict] = []
        self._parts = [body[: len(body) // 2], body[len(body) // 2 :]] if stall else [body]

    async def receive(self) -> dict:
        if self._parts:
            part = self._parts.pop(0)
            if self.stall and not self._parts:
                await asyncio.Event().wait()  # the rest never comes
            return {"type": "http.request", "body": part, "more_body": bool(self._parts)}
        await asyncio.Event().wait()  # no disconnect either: the client just sits there
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        self.sent.append(message)

    async def __call__(self) -> tuple[int, dict]:
        await self.app(self.scope, self.receive, self.send)
        import json

        status = self.sent[0]["status"]
        body = b"".join(m.get("body", b"") for m in self.sent[1:])
        return status, json.loads(body)


def gate_app(**settings):
    from deployments.auth import KeyRing
    from deployments.gate import Gate, GateSettings
    from deployments.slots import Readers, Slots

    app = FastAPI()
    app.add_middleware(Gate)
    keys = settings.pop("keys", ())
    readers = Readers(settings.pop("readers", None), settings.pop("reader_grace_s", 0.0))
    app.state.gate = GateSettings(
        KeyRing(keys),
        1 << 20,
        lambda reason: None,
        settings.pop("body_timeout_s", 30.0),
        Slots(**settings),
        readers=readers,
    )

    @app.post("/v1/echo")
    async def echo(request: Request) -> dict:
        return {"size": len(await request.body())}

    @app.post("/v1/slow")
    async def slow(request: Request) -> dict:
        await asyncio.sleep(0.5)  # a request that holds its slot for a while
        return {"size": len(await request.body())}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    return app


def test_stalled_bodies_time_out_with_408_and_never_keep_others_out():
    """Clients that send headers and half a body, then nothing, once held an ingress slot
    each forever, until health checks found none. Now a stalled body holds no request slot,
    ends in 408 after its timeout, and when the readers' pool is full the oldest stalled one
    makes way at once (408) for a newcomer; probes always pass."""
    app = gate_app(readers=4, body_timeout_s=0.6)

    async def main():
        loop = asyncio.get_running_loop()
        started = loop.time()
        stalled = [asyncio.create_task(AsgiCall(app, stall=True)()) for _ in range(5)]
        await asyncio.sleep(0.1)  # five stalled readers in a pool of four: the first is out
        newcomer = await asyncio.wait_for(AsgiCall(app)(), 0.3)  # pushes out one more
        probe = await asyncio.wait_for(AsgiCall(app, "/health", body=b"")(), 0.2)
        pushed_at = loop.time() - started
        ends = await asyncio.wait_for(asyncio.gather(*stalled), 2)
        return newcomer, probe, pushed_at, ends, loop.time() - started

    newcomer, probe, pushed_at, ends, took = asyncio.run(main())
    assert newcomer == (200, {"size": 8}) and probe == (200, {"status": "ok"})
    assert all(
        status == 408 and body["error"]["code"] == "request_timeout" for status, body in ends
    )
    messages = [body["error"]["message"] for _, body in ends]
    assert sum("newer request" in m for m in messages) == 2  # pushed out, not timed out
    assert pushed_at < 0.5 and took < 1.5


class SlowBody(AsgiCall):
    """An honest client on a slow link: half its body, then the rest `gap_s` later."""

    def __init__(self, app, gap_s: float) -> None:
        super().__init__(app)
        self.gap_s = gap_s
        self._parts = [self.body[:4], self.body[4:]]

    async def receive(self) -> dict:
        if len(self._parts) == 1:
            await asyncio.sleep(self.gap_s)
        return await super().receive()


def test_a_burst_of_honest_bodies_is_never_pushed_out_and_stalled_ones_still_are():
    """With "the newcomer pushes out the oldest reader" alone, a burst of honest clients
    larger than the readers' pool pushed each other out (408s for bodies in their first
    milliseconds). Readers younger than their grace are kept: the newcomer gets a 429 to
    retry; a reader older than its grace is still pushed out by a newcomer."""
    app = gate_app(readers=2, reader_grace_s=0.4, body_timeout_s=5)

    async def main():
        burst = [asyncio.create_task(SlowBody(app, 0.2)()) for _ in range(2)]
        await asyncio.sleep(0.05)
        newcomer = await asyncio.wait_for(AsgiCall(app)(), 0.2)  # the pool is all young
        done = await asyncio.gather(*burst)
        stalled = [asyncio.create_task(AsgiCall(app, stall=True)()) for _ in range(2)]
        await asyncio.sleep(0.5)  # both past their grace now
        late = await asyncio.wait_for(AsgiCall(app)(), 0.3)  # pushes out the oldest
        for task in stalled:
            task.cancel()
        return done, newcomer, late, stalled[0].done() and stalled[0].result()

    done, newcomer, late, first = asyncio.run(main())
    assert done == [(200, {"size": 8})] * 2
    assert newcomer[0] == 429 and newcomer[1]["error"]["code"] == "bodies_busy"
    assert late == (200, {"size": 8})
    assert first[0] == 408 and "newer request" in first[1]["error"]["message"]


def test_beyond_the_request_limit_is_429_at_once():
    app = gate_app(limit=2)

    async def main():
        busy = [asyncio.create_task(AsgiCall(app, "/v1/slow")()) for _ in range(2)]
        await asyncio.sleep(0.1)
        refused = await asyncio.wait_for(AsgiCall(app)(), 0.2)
        probe = await asyncio.wait_for(AsgiCall(app, "/health", body=b"")(), 0.2)
        return await asyncio.gather(*busy), refused, probe

    busy, refused, probe = asyncio.run(main())
    assert busy == [(200, {"size": 8})] * 2 and probe == (200, {"status": "ok"})
    assert refused[0] == 429 and refused[1]["error"]["code"] == "ingress_busy"
    assert refused[1]["error"]["type"] == "rate_limit_error"


def test_one_key_cannot_take_every_slot():
    app = gate_app(keys=["key-a", "key-b"], limit=10, per_key=2)

    async def main():
        mine = [asyncio.create_task(AsgiCall(app, "/v1/slow", key="key-a")()) for _ in range(2)]
        await asyncio.sleep(0.1)
        third = await AsgiCall(app, key="key-a")()
        other = await AsgiCall(app, key="key-b")()
        await asyncio.gather(*mine)
        return third, other, await AsgiCall(app, key="key-a")()

    third, other, later = asyncio.run(main())
    assert third[0] == 429 and third[1]["error"]["code"] == "key_busy"
    assert other == (200, {"size": 8}) and later == (200, {"size": 8})


def test_the_ingress_keeps_probe_slots_below_serves_limit():
    from deployments.config import ConfigError, parse_app_args

    limits = parse_app_args({"ingress": {"max_ongoing_requests": 100, "probe_slots": 8}}).ingress
    assert (limits.body_limit, limits.request_limit) == (25, 67)  # + 8 probes: 100
    with pytest.raises(ConfigError, match="probe_slots"):
        parse_app_args({"ingress": {"max_ongoing_requests": 8, "probe_slots": 6}})
    from tests.cpu.test_ingress_failures import FakeHandle, ingress

    obj = ingress(
        FakeHandle(),
        max_ongoing_requests=100,
        probe_slots=8,
        body_slots=30,
        max_requests_per_key=5,
        body_timeout_s=7,
    )
    gate = obj.__serve_build_asgi_app__().state.gate
    assert (gate.slots.limit, gate.slots.per_key, gate.readers.limit, gate.body_timeout_s) == (
        62,
        5,
        30,
        7,
    )


def test_a_silent_replica_stream_ends_with_an_error_chunk_long_before_the_deadline():
    """A frozen replica (SIGSTOP) once left its streams silent with no error until the
    request's deadline (600 s); now a stream with no message for stream_idle_timeout_s ends."""
    import time

    from tests.cpu.test_ingress_failures import REQUEST, FakeHandle, events, ingress

    script = events(3)
    script.insert(2, ("sleep", 5.0))  # the first token came, then nothing
    handle = FakeHandle(script)
    obj = ingress(handle, request_timeout_s=5, stream_idle_timeout_s=0.3)

    async def run() -> list[dict]:
        return [c async for c in obj.chat_stream(REQUEST)]

    started = time.monotonic()
    chunks = asyncio.run(run())
    assert time.monotonic() - started < 2
    assert chunks[-1]["error"]["code"] == "stream_stalled" and handle.streams[0].cancelled


def test_no_first_token_within_its_own_timeout_is_a_504():
    import time

    from deployments.ingress import APIError
    from tests.cpu.test_ingress_failures import REQUEST, FakeHandle, events, ingress

    handle = FakeHandle([("sleep", 5.0), *events()])
    obj = ingress(handle, request_timeout_s=5, first_token_timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(APIError) as err:
        asyncio.run(obj.chat(REQUEST))
    assert time.monotonic() - started < 2
    assert err.value.status == 504 and handle.streams[0].cancelled


# ---- item 5: a client that goes away cancels its request, whatever headers it sent ---------


class LeavingClient(AsgiCall):
    """Sends its whole body, then disconnects after `leave_s`; asked Serve's proxy not to
    watch for that (`x-request-disconnect-disabled: ?1`, `x-request-timeout-seconds: 0`)."""

    def __init__(self, app, path: str, leave_s: float) -> None:
        super().__init__(app, path)
        self.scope["headers"] += [
            (b"x-request-disconnect-disabled", b"?1"),
            (b"x-request-timeout-seconds", b"0"),
        ]
        self.leave_s = leave_s

    async def receive(self) -> dict:
        if self._parts:
            return {"type": "http.request", "body": self._parts.pop(0), "more_body": False}
        await asyncio.sleep(self.leave_s)
        return {"type": "http.disconnect"}


def test_a_dropped_request_is_cancelled_streamed_or_not():
    """Serve's proxy honours a client's request to ignore its disconnect; the gate watches the
    client itself, so a dropped non-streaming request stops as a streamed one does."""
    from fastapi.responses import StreamingResponse

    app = gate_app()
    ended: dict[str, str] = {}

    async def work(name: str) -> None:
        try:
            await asyncio.sleep(30)  # a long generation
            ended[name] = "finished"
        except asyncio.CancelledError:
            ended[name] = "cancelled"
            raise

    @app.post("/v1/whole")
    async def whole() -> dict:
        await work("whole")
        return {}

    @app.post("/v1/stream")
    async def stream() -> StreamingResponse:
        async def body():
            yield "data: first\n\n"
            await work("stream")

        return StreamingResponse(body(), media_type="text/event-stream")

    async def main():
        calls = [LeavingClient(app, path, 0.2) for path in ("/v1/whole", "/v1/stream")]
        await asyncio.wait_for(asyncio.gather(*(app(c.scope, c.receive, c.send) for c in calls)), 2)

    asyncio.run(main())
    assert ended == {"whole": "cancelled", "stream": "cancelled"}


# ---- item 8: strict types, no echo of unbounded input ---------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", True),
        ("max_tokens", 4.0),
        ("max_completion_tokens", True),
        ("n", True),
        ("seed", 1.5),
        ("min_tokens", False),
    ],
)
def test_a_boolean_or_a_float_is_not_an_integer(field, value):
    """`max_tokens: true` once counted as 1; every integer field now takes integers only."""
    from deployments.ingress import APIError

    handle, obj = _ingress()
    with pytest.raises(APIError) as err:
        asyncio.run(
            obj.chat(
                {
                    "model": "tiny-llama",
                    "messages": [{"role": "user", "content": "hi"}],
                    field: value,
                }
            )
        )
    assert err.value.status == 400 and err.value.body["error"]["param"] == field
    with pytest.raises(APIError) as err:
        asyncio.run(obj.completion({"model": "tiny-llama", "prompt": [5, True, 7]}))
    assert err.value.status == 400 and handle.calls == []


def test_an_unknown_model_is_named_in_the_404_only_in_part():
    from deployments.ingress import APIError

    _, obj = _ingress()
    name = "m" * (1 << 20)
    with pytest.raises(APIError) as err:
        asyncio.run(obj.chat({"model": name, "messages": [{"role": "user", "content": "hi"}]}))
    message = err.value.body["error"]["message"]
    assert err.value.status == 404 and len(message) < 300 and "1048576 characters" in message


# ---- item 6: a frozen replica is ranked last; /admin/replicas lists the live ones ------------


def frozen_and_fresh(now: float, seed: int):
    """Four replicas' stats: a random one froze 30 s ago while having the most room."""
    import random

    from deployments.placement import ReplicaView

    rng = random.Random(seed)
    frozen = rng.randrange(4)
    views = []
    for i in range(4):
        free = 10_000 if i == frozen else rng.randrange(1_000, 9_000)
        stats = {
            "free_unified_memory_bytes": free,
            "kv_budget_bytes": 10_000,
            "kv_cache_bytes": 0,
            "kv_bytes_per_token": 1,
            "capacity_bytes": 10_000,
            "resident_users": ["home-user"] if i == frozen else [],
            "as_of": now - (30.0 if i == frozen else rng.uniform(0, 1.5)),
        }
        views.append(ReplicaView.from_stats(f"r{i}", stats))
    return views, f"r{frozen}"


@pytest.mark.parametrize("seed", range(5))
def test_a_replica_whose_stats_stopped_ranks_after_every_fresh_one(seed):
    """A frozen replica (SIGSTOP) keeps its last stats in Serve, and with the most free
    memory it once drew every new user, who then waited for it."""
    from deployments.placement import PlacementLedger, PlacementPolicy, decide

    now = 1_000.0
    views, frozen = frozen_and_fresh(now, seed)
    policy = PlacementPolicy(stale_after_s=5.0)
    for user in ("alice", "bob", "carol"):
        ranks = decide(user, views, PlacementLedger(), policy, now).ranks
        assert ranks[-1] == [frozen] and len(ranks) == 4
        fresh_only = decide(
            user, [v for v in views if v.replica_id != frozen], PlacementLedger(), policy, now
        ).ranks
        assert ranks[:-1] == fresh_only  # the others keep their order
    home = decide("home-user", views, PlacementLedger(), policy, now)
    assert home.ranks[-1] == [frozen] and len(home.ranks) == 4  # its user is served elsewhere
    anonymous = decide(None, views, PlacementLedger(), policy, now).ranks
    assert anonymous[-1] == [frozen] and sorted(anonymous[0]) == sorted(
        v.replica_id for v in views if v.replica_id != frozen
    )
    # Without a staleness limit (the old behaviour) the frozen one would lead.
    assert decide("alice", views, PlacementLedger(), PlacementPolicy(), now).ranks[0] == [frozen]


def test_the_router_gets_its_staleness_limit_from_the_config():
    from deployments.app import router_config
    from deployments.config import parse_app_args

    kwargs = router_config(parse_app_args({"router": {"stats_period_s": 2}}).router)
    assert kwargs.request_router_kwargs["stale_stats_s"] == 10.0
    kwargs = router_config(parse_app_args({"router": {"stale_stats_s": 3}}).router)
    assert kwargs.request_router_kwargs["stale_stats_s"] == 3.0


def through_proxy_middleware(messages: list[dict], headers: list | None = None):
    """Run Serve-proxy answer `messages` through the proxy middleware; what the client gets,
    and the request headers the proxy saw."""
    from deployments.proxy_middleware import middlewares

    seen: dict = {}

    async def proxy(scope, receive, send):  # stands for Serve's proxy app
        seen["headers"] = scope["headers"]
        for message in messages:
            await send(message)

    (middleware,) = middlewares()
    app = middleware.cls(proxy, *middleware.args, **middleware.kwargs)
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "headers": headers or []}
    asyncio.run(app(scope, receive, send))
    return sent, seen["headers"]


@pytest.mark.parametrize(
    "status, code", [(408, "timeout"), (429, "queue_full"), (503, "service_unavailable")]
)
def test_the_proxys_own_errors_are_openai_shaped_and_name_no_figures(status, code):
    """Serve's proxy answered its 429 (with its queue figures) and 408 as plain text."""
    import json

    from ray.serve._private.http_util import (  # the proxy's exact answers
        convert_object_to_asgi_messages,
        retry_after_headers,
    )

    text = "Request dropped due to backpressure (num_queued_requests=5, max_queued_requests=5)."
    sent, _ = through_proxy_middleware(
        convert_object_to_asgi_messages(
            text, status_code=status, extra_headers=retry_after_headers(2)
        )
    )
    start, body = sent
    assert start["status"] == status
    headers = dict(start["headers"])
    assert headers[b"content-type"] == b"application/json" and headers[b"retry-after"] == b"2"
    assert headers[b"x-proxy-error"] == b"1"  # the ingress never saw this request
    error = json.loads(body["body"])["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    assert "queued" not in error["message"] and int(headers[b"content-length"]) == len(body["body"])


def test_the_proxy_passes_the_ingress_answers_and_drops_serves_control_headers():
    from ray.serve._private.http_util import validate_http_proxy_callback_return

    from deployments.proxy_middleware import middlewares

    assert validate_http_proxy_callback_return(middlewares())  # what Serve checks at start
    ours = [
        {
            "type": "http.response.start",
            "status": 429,
            "headers": [(b"content-type", b"application/json")],
        },
        {"type": "http.response.body", "body": b'{"error": {}}', "more_body": True},
        {"type": "http.response.body", "body": b"", "more_body": False},
    ]
    sent, seen = through_proxy_middleware(
        ours,
        [
            (b"x-request-disconnect-disabled", b"?1"),
            (b"X-Request-Timeout-Seconds", b"0"),
            (b"x-user-id", b"alice"),
            (b"x-request-id", b"abc"),
        ],
    )
    assert sent == ours
    assert seen == [(b"x-user-id", b"alice"), (b"x-request-id", b"abc")]


# ---- item 7: admin routes need an admin key; user hashes are keyed -------------------------


def test_with_auth_on_only_an_admin_key_reads_admin_routes():
    """Any key once read /admin/replicas: every key's users, pids and node ids."""
    from deployments.auth import KeyRing

    app = gate_app()
    app.state.gate.keys = KeyRing(["tenant-key"], admin_keys=["admin-key"])

    @app.get("/admin/replicas")
    async def rows() -> list:
        return [{"replica_id": "r1"}]

    async def main():
        tenant = await AsgiCall(app, "/admin/replicas", body=b"", key="tenant-key")()
        admin = await AsgiCall(app, "/admin/replicas", body=b"", key="admin-key")()
        echo = await AsgiCall(app, key="admin-key")()  # an admin key is a key everywhere
        return tenant, admin, echo

    tenant, admin, echo = asyncio.run(main())
    assert tenant[0] == 403 and tenant[1]["error"]["code"] == "admin_key_required"
    assert tenant[1]["error"]["type"] == "permission_error"
    assert admin == (200, [{"replica_id": "r1"}]) and echo == (200, {"size": 8})


def test_admin_keys_load_from_their_variable_and_an_empty_one_refuses_to_start():
    from deployments.auth import key_id, load_keys
    from deployments.config import AuthConfig, ConfigError

    cfg = AuthConfig(api_keys_env="KEYS", admin_keys_env="ADMINS")
    ring = load_keys(cfg, {"KEYS": "a b", "ADMINS": "boss"})
    assert ring.match("boss") == key_id("boss") and ring.is_admin(key_id("boss"))
    assert not ring.is_admin(ring.match("a")) and not ring.is_admin(None)
    with pytest.raises(ConfigError, match="ADMINS"):
        load_keys(cfg, {"KEYS": "a"})


def test_user_hashes_are_keyed_by_the_deployments_secret(monkeypatch):
    """Unkeyed SHA-256 let anyone test whether "alice" was resident; with a secret the
    resident keys cannot be computed without it."""
    import hashlib
    import hmac

    from deployments.identity import user_key
    from deployments.readiness import Readiness
    from tests.cpu.test_ingress_failures import (
        REQUEST,
        FakeHandle,
        LocalIngress,
        controller,
        events,
    )

    secret = b"deployment-secret"
    assert user_key("alice", secret) == hmac.new(secret, b"alice", hashlib.sha256).hexdigest()[:16]
    assert user_key("alice", secret) != user_key("alice") != user_key("alice", b"other")
    assert user_key("alice") == hashlib.sha256(b"alice").hexdigest()[:16]  # no secret: as before
    monkeypatch.setenv("GS_HOSTILE_SECRET", secret.decode())
    handle = FakeHandle(events())
    obj = LocalIngress.__new__(LocalIngress)

    async def construct() -> None:
        await obj.__init__(
            handle,
            {
                "ingress": {"request_timeout_s": 5},
                "auth": {"user_key_secret_env": "GS_HOSTILE_SECRET"},
            },
        )
        obj._announcer.cancel()  # the start-up line needs Serve's controller

    asyncio.run(construct())
    obj._readiness = Readiness(controller(1), retry_after_s=3)
    asyncio.run(obj.chat(REQUEST, user="alice"))
    assert handle.calls[0]["shape"].user_key == user_key("alice", secret)


# ---- on real Serve: the proxy's path, end to end ---------------------------------------------


def running(url: str) -> int:
    import httpx

    return sum(r["running_requests"] for r in httpx.get(f"{url}/admin/replicas", timeout=10).json())


def test_on_serve_a_dropped_plain_request_stops_generating_despite_serve_headers(llm_url):
    """The issue's reproduction: a non-streaming request with Serve's disconnect-disabled
    header, dropped by its client, once kept generating to its end. Now it stops within a
    fraction of the time the whole request takes."""
    import time

    import httpx

    body = {
        "model": "tiny-llama",
        "prompt": "Unified memory",
        "max_tokens": 480,
        "ignore_eos": True,
        "temperature": 0,
    }
    headers = {"x-request-disconnect-disabled": "?1", "x-request-timeout-seconds": "0"}
    whole = time.monotonic()
    reply = httpx.post(f"{llm_url}/v1/completions", json=body, timeout=60).json()
    assert reply["usage"]["completion_tokens"] == 480
    whole = time.monotonic() - whole
    assert whole > 0.6  # else this model is too fast for the comparison below
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{llm_url}/v1/completions", json=body, headers=headers, timeout=0.2)
    dropped = time.monotonic()
    while running(llm_url) and time.monotonic() - dropped < whole:
        time.sleep(0.02)
    assert running(llm_url) == 0 and time.monotonic() - dropped < whole / 2


def test_on_serve_a_lone_surrogate_is_a_400(llm_url):
    import httpx

    chat = '{"model": "tiny-llama", "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    reply = httpx.post(
        f"{llm_url}/v1/chat/completions",
        content=chat,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert reply.status_code == 400 and "surrogate" in reply.json()["error"]["message"]


def test_on_serve_a_frozen_replica_is_listed_as_unresponsive_and_skipped(llm_url):
    """SIGSTOP one replica: /admin/replicas once answered 500; now it lists the live replicas
    and counts the frozen one, and once its stats are stale no new user is sent to it."""
    import os
    import signal
    import time

    import httpx

    rows = httpx.get(f"{llm_url}/admin/replicas", timeout=30).json()
    assert len(rows) == 3
    frozen = rows[0]
    os.kill(frozen["pid"], signal.SIGSTOP)  # a replica of this session's own Ray
    try:
        started = time.monotonic()
        reply = httpx.get(f"{llm_url}/admin/replicas", timeout=30)
        assert reply.status_code == 200 and time.monotonic() - started < 8
        assert reply.headers["X-Replicas-Unresponsive"] == "1"
        assert sorted(r["replica_id"] for r in reply.json()) == sorted(
            r["replica_id"] for r in rows[1:]
        )
        time.sleep(max(0.0, 5.5 - (time.monotonic() - started)))  # its stats are stale now
        served = []
        for i in range(6):
            chat = httpx.post(
                f"{llm_url}/v1/chat/completions",
                timeout=10,
                headers={"X-User-Id": f"frozen-test-user-{i}"},
                json={
                    "model": "tiny-llama",
                    "max_tokens": 4,
                    "messages": [{"role": "user", "content": "hi"}],
                },
            )
            assert chat.status_code == 200
            served.append(chat.headers["X-Replica-Id"])
        assert frozen["replica_id"] not in served
    finally:
        os.kill(frozen["pid"], signal.SIGCONT)
    assert (
        httpx.get(f"{llm_url}/admin/replicas", timeout=30).headers["X-Replicas-Unresponsive"] == "0"
    )


def test_on_serve_a_client_cannot_set_the_proxys_timeout(llm_url):
    """`x-request-timeout-seconds: 0.001` once made Serve's proxy answer a plain-text 408 (and
    `0` lifted its timeout); the proxy middleware drops the header before the proxy reads it."""
    import httpx

    body = {"model": "tiny-llama", "prompt": "Unified memory", "max_tokens": 8}
    reply = httpx.post(
        f"{llm_url}/v1/completions",
        json=body,
        timeout=30,
        headers={"x-request-timeout-seconds": "0.001"},
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 8


def test_the_proxy_reads_a_body_whole_before_the_request_goes_on():
    """Chunks arrive as one body; what the client sends after it (a disconnect) still comes."""
    from deployments.proxy_middleware import buffered

    incoming = [
        {"type": "http.request", "body": b"ab", "more_body": True},
        {"type": "http.request", "body": b"cd", "more_body": True},
        {"type": "http.request", "body": b"e", "more_body": False},
        {"type": "http.disconnect"},
    ]

    async def receive():
        return incoming.pop(0)

    async def main():
        again = await buffered(receive, 1.0, 1 << 20)
        return [await again(), await again()]

    assert asyncio.run(main()) == [
        {"type": "http.request", "body": b"abcde", "more_body": False},
        {"type": "http.disconnect"},
    ]


def test_a_body_past_the_buffer_limit_streams_on_in_order():
    from deployments.proxy_middleware import buffered

    chunks = [
        {"type": "http.request", "body": bytes([i]) * 10, "more_body": i < 4} for i in range(5)
    ]
    incoming = list(chunks)

    async def receive():
        return incoming.pop(0)

    async def main():
        again = await buffered(receive, 1.0, 15)
        return [await again() for _ in range(5)]

    assert asyncio.run(main()) == chunks


def test_a_stalled_body_gets_an_openai_408_from_the_proxy_and_never_goes_on(monkeypatch):
    """Half a body, then nothing: answered in the proxy; the app (Serve's proxy, then the
    ingress) never sees the request."""
    import json

    from deployments import proxy_middleware

    monkeypatch.setattr(proxy_middleware, "BODY_TIMEOUT_S", 0.2)
    reached = []

    async def proxy(scope, receive, send):
        reached.append(scope)

    app = proxy_middleware.OpenAIProxyErrors(proxy)
    sent: list[dict] = []
    first = [{"type": "http.request", "body": b'{"model": ', "more_body": True}]

    async def receive():
        if first:
            return first.pop()
        await asyncio.sleep(3600)  # the rest never comes

    async def send(message):
        sent.append(message)

    asyncio.run(asyncio.wait_for(app({"type": "http", "headers": []}, receive, send), 5))
    assert not reached
    start, body = sent
    assert start["status"] == 408 and dict(start["headers"])[b"x-proxy-error"] == b"1"
    assert json.loads(body["body"])["error"]["code"] == "body_timeout"
