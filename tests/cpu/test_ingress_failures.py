"""The ingress's handling of slow, full and dying replicas, with a fake LLMReplica handle.

Runs the real OpenAIIngress class outside Serve, so timeouts, backpressure and retries are
exercised deterministically and fast.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from ray.exceptions import ActorDiedError
from ray.serve.exceptions import BackPressureError

from deployments.identity import user_key
from deployments.ingress import APIError, OpenAIIngress
from deployments.readiness import Readiness, ReplicaCounts

MODEL = "tiny-llama"
REQUEST = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def events(n_tokens: int = 3, delay_s: float = 0.0) -> list[Any]:
    out: list[Any] = [
        {"event": "start", "replica_id": "r1", "prompt_tokens": 5, "cached_tokens": 0}
    ]
    out += [("sleep", delay_s)] if delay_s else []
    out += [{"event": "delta", "token_ids": [70]} for _ in range(n_tokens)]
    out.append(
        {
            "event": "end",
            "finish_reason": "length",
            "usage": {
                "prompt_tokens": 5,
                "completion_tokens": n_tokens,
                "total_tokens": 5 + n_tokens,
                "prompt_tokens_details": {"cached_tokens": 0},
            },
        }
    )
    return out


class FakeStream:
    def __init__(self, script: list[Any]) -> None:
        self.script, self.cancelled = list(script), False

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> list[dict]:
        while self.script:
            item = self.script.pop(0)
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, tuple):
                await asyncio.sleep(item[1])
                continue
            return [item]  # a replica message: here, one event each
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled = True


class FakeHandle:
    """Each call takes the next script from `scripts`."""

    app_name, deployment_name = "llm", "LLMReplica"

    def __init__(self, *scripts: list[Any]) -> None:
        self.scripts, self.streams, self.calls = list(scripts), [], []

    def options(self, **_: Any) -> FakeHandle:
        return self

    @property
    def generate(self) -> FakeHandle:
        return self

    @property
    def model_info(self) -> SimpleNamespace:
        async def info() -> dict:
            return {"model": MODEL, "max_model_len": 512}

        return SimpleNamespace(remote=info)

    def remote(self, **kwargs: Any) -> FakeStream:
        self.calls.append(kwargs)
        stream = FakeStream(self.scripts.pop(0))
        self.streams.append(stream)
        return stream


class LocalIngress(OpenAIIngress):
    """OpenAIIngress outside Serve: Serve's wrapper has an async __del__ only Serve awaits."""

    def __del__(self) -> None:
        pass


def controller(running: int, starting: int = 0) -> Any:
    """Stands in for the Serve controller's view of LLMReplica (readiness.deployment_counts)."""

    async def counts() -> ReplicaCounts:
        return ReplicaCounts(running, starting, "HEALTHY" if running else "UPDATING", "")

    return counts


def ingress(handle: FakeHandle, running: int = 1, **ingress_args: Any) -> OpenAIIngress:
    args = {"ingress": {"request_timeout_s": 0.5, "retry_after_s": 3, **ingress_args}}
    obj = LocalIngress.__new__(LocalIngress)

    async def construct() -> None:
        await obj.__init__(handle, args)
        obj._announcer.cancel()  # the start-up line needs Serve's controller

    asyncio.run(construct())
    obj._readiness = Readiness(controller(running, starting=1), retry_after_s=3)
    return obj


def test_no_model_replica_is_503_at_once_without_calling_one():
    handle = FakeHandle(events())
    with pytest.raises(APIError) as err:
        asyncio.run(ingress(handle, running=0).chat(REQUEST))
    assert err.value.status == 503 and err.value.headers == {"Retry-After": "3"}
    assert err.value.body["error"]["code"] == "model_loading" and handle.calls == []


def test_a_full_replica_queue_is_429_with_retry_after():
    obj = ingress(FakeHandle([BackPressureError(num_queued_requests=5, max_queued_requests=5)]))
    with pytest.raises(APIError) as err:
        asyncio.run(obj.chat(REQUEST))
    assert err.value.status == 429 and err.value.headers == {"Retry-After": "3"}
    assert err.value.body["error"]["code"] == "queue_full"


def test_no_first_token_before_the_deadline_is_504_and_cancels():
    handle = FakeHandle([("sleep", 5.0), *events()])
    with pytest.raises(APIError) as err:
        asyncio.run(ingress(handle).chat(REQUEST))
    assert err.value.status == 504 and handle.streams[0].cancelled


def test_a_stream_that_outlives_the_deadline_ends_with_an_error_chunk():
    handle = FakeHandle(events(delay_s=5.0))
    obj = ingress(handle)

    async def run() -> list[dict]:
        return [c async for c in obj.chat_stream(REQUEST)]

    chunks = asyncio.run(run())
    assert chunks[-1]["error"]["code"] == "timeout" and handle.streams[0].cancelled


def test_a_replica_lost_before_the_first_token_is_retried_elsewhere():
    handle = FakeHandle([ActorDiedError()], [ActorDiedError()], events())
    reply = asyncio.run(ingress(handle, request_timeout_s=5).chat(REQUEST, user="u"))
    assert reply["usage"]["completion_tokens"] == 3 and len(handle.calls) == 3
    assert all(call["shape"].user_key == user_key("u") for call in handle.calls)


def test_retries_are_bounded_then_503():
    handle = FakeHandle(*[[ActorDiedError()] for _ in range(3)])
    with pytest.raises(APIError) as err:
        asyncio.run(ingress(handle, replica_retries=1).chat(REQUEST))
    assert err.value.status == 503 and len(handle.calls) == 2
    assert err.value.body["error"]["code"] == "replica_unavailable"


def test_a_replica_lost_mid_stream_ends_the_stream_with_one_error_chunk():
    script = [*events()[:2], ActorDiedError()]
    handle = FakeHandle(script)
    obj = ingress(handle)

    async def run() -> list[dict]:
        return [c async for c in obj.chat_stream(REQUEST)]

    chunks = asyncio.run(run())
    errors = [c["error"] for c in chunks if "error" in c]
    assert [e["code"] for e in errors] == ["replica_failed"] and len(handle.calls) == 1


def test_too_many_messages_is_refused_before_any_replica_call():
    handle = FakeHandle()
    body = {**REQUEST, "messages": [{"role": "user", "content": "m"}] * 3}
    with pytest.raises(APIError) as err:
        asyncio.run(ingress(handle, max_messages=2).chat(body))
    assert err.value.status == 400 and err.value.body["error"]["param"] == "messages"
    assert handle.calls == []
