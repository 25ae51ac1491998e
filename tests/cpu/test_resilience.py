"""Replica loss and client disconnects on real Serve (CPU).

The kill test runs on an app of its own ("loss", three replicas, deleted after), so the shared
service's replicas and their caches stay as other tests expect them; the disconnect test uses
the shared service.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import ray

from tests.cpu.conftest import SERVICE_ARGS, wait_healthy
from tests.cpu.polling import wait_for

MODEL = "tiny-llama"
REPLICAS = SERVICE_ARGS["replica"]["num_replicas"]
LOSS_APP = "loss"


@pytest.fixture(scope="module")
def loss_url(serve_url):
    from ray import serve

    from deployments.app import build_app

    serve.run(build_app(SERVICE_ARGS), name=LOSS_APP, route_prefix="/loss")
    url = f"{serve_url}/loss"
    wait_healthy(url)
    yield url
    serve.delete(LOSS_APP)


def rows(url):
    return httpx.get(f"{url}/admin/replicas", timeout=30).json()


def replica_actor(replica_id: str, app: str = LOSS_APP):
    prefix = f"SERVE_REPLICA::{app}#LLMReplica#"
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"] == prefix + replica_id:
            return ray.get_actor(actor["name"], namespace=actor["namespace"])
    raise LookupError(replica_id)


class Stream(threading.Thread):
    """One user's streamed chat turn, read to the end in a thread."""

    def __init__(self, url: str, user: str, messages: list[dict], max_tokens: int = 400):
        super().__init__(daemon=True)
        self.url, self.user, self.messages, self.max_tokens = url, user, messages, max_tokens
        self.replica: str | None = None
        self.chunks: list[dict] = []
        self.done_marker = False
        self.finished_at: float | None = None
        self.started = threading.Event()

    def run(self) -> None:
        body = {
            "model": MODEL,
            "messages": self.messages,
            "max_tokens": self.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with httpx.stream(
            "POST",
            f"{self.url}/v1/chat/completions",
            json=body,
            timeout=60,
            headers={"X-User-Id": self.user},
        ) as response:
            assert response.status_code == 200, response.read()
            self.replica = response.headers["x-replica-id"]
            for line in response.iter_lines():
                if not line:
                    continue
                if line == "data: [DONE]":
                    self.done_marker = True
                else:
                    self.chunks.append(json.loads(line[len("data: ") :]))
                    self.started.set()
        self.finished_at = time.monotonic()

    @property
    def errors(self) -> list[dict]:
        return [c["error"] for c in self.chunks if "error" in c]

    def text(self) -> str:
        return "".join(
            c["choices"][0]["delta"].get("content") or "" for c in self.chunks if c.get("choices")
        )


def chat(url, user, messages, max_tokens=4):
    response = httpx.post(
        f"{url}/v1/chat/completions",
        headers={"X-User-Id": user},
        timeout=60,
        json={"model": MODEL, "messages": messages, "max_tokens": max_tokens},
    )
    assert response.status_code == 200, response.text
    return response


def test_killing_a_replica_mid_stream_fails_only_its_users_once(loss_url):
    time.sleep(1)
    before = {r["replica_id"] for r in rows(loss_url)}
    assert len(before) == REPLICAS
    first_turn = {
        f"loss-{i}": [{"role": "user", "content": f"Tell me a long story, {i}."}] for i in range(10)
    }
    streams = [Stream(loss_url, user, messages) for user, messages in first_turn.items()]
    for stream in streams:
        stream.start()
    for stream in streams:
        assert stream.started.wait(30), "a stream never started"
    # Kill the replica serving the most streams that are still running.
    running = [s for s in streams if s.is_alive()]
    victim = max(before, key=lambda rid: sum(s.replica == rid for s in running))
    victims_running = [s for s in running if s.replica == victim]
    assert victims_running, "no stream was still running to be cut"
    killed_at = time.monotonic()
    ray.kill(replica_actor(victim))
    for stream in streams:
        stream.join(60)
        assert not stream.is_alive(), f"{stream.user}'s stream hung"
    for stream in victims_running:  # cut promptly, with one error event, then [DONE]
        assert stream.finished_at - killed_at < 10, stream.finished_at - killed_at
        assert [e["code"] for e in stream.errors] == ["replica_failed"], stream.chunks[-2:]
        assert stream.done_marker
    for stream in streams:
        if stream.replica != victim:
            assert stream.errors == [] and stream.done_marker, (stream.user, stream.chunks[-2:])
            assert stream.chunks[-1]["usage"]["completion_tokens"] >= 1

    # Next turns: all succeed; the victim's users are recomputed elsewhere, the rest hit cache.
    for stream in streams:
        messages = [
            *first_turn[stream.user],
            {"role": "assistant", "content": stream.text()[:40]},
            {"role": "user", "content": "And then?"},
        ]
        body = chat(loss_url, stream.user, messages).json()
        cached = body["usage"]["prompt_tokens_details"]["cached_tokens"]
        if stream.replica == victim:
            assert cached == 0, stream.user
        elif stream.text():
            assert cached > 0, stream.user

    # Serve replaces the replica; once healthy it takes new users (it has the most free memory).
    def replaced() -> set[str] | None:
        ids = {r["replica_id"] for r in rows(loss_url)}
        return ids if len(ids) == REPLICAS and victim not in ids else None

    current = wait_for(replaced, 120, "the killed replica was not replaced")
    (fresh,) = current - before
    time.sleep(4 * SERVICE_ARGS["router"]["stats_period_s"])
    served = {
        chat(loss_url, f"after-loss-{i}", [{"role": "user", "content": "hello"}]).headers[
            "x-replica-id"
        ]
        for i in range(3)
    }
    assert fresh in served, (fresh, served)


def test_client_disconnect_cancels_generation_at_once(llm_url):
    def running() -> int:
        return sum(r["running_requests"] for r in rows(llm_url))

    wait_for(lambda: running() == 0, 30, "requests still running before the test")
    for attempt in range(5):  # a random model may end a stream early: try another prompt
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"Go on, {attempt}."}],
            "max_tokens": 450,
            "stream": True,
        }
        with httpx.stream(
            "POST",
            f"{llm_url}/v1/chat/completions",
            json=body,
            timeout=60,
            headers={"X-User-Id": f"leaver-{attempt}"},
        ) as response:
            lines = response.iter_lines()
            for _ in range(4):
                next(lines)
            still_running = running() == 1
        if still_running:
            break
        wait_for(lambda: running() == 0, 30, "an ended stream still counts as running")
    assert still_running, "no stream lasted long enough to be left mid-way"
    # The connection is closed: the replica must stop and free the request promptly.
    left = time.monotonic()
    wait_for(lambda: running() == 0, 5, "generation went on after the client left")
    assert time.monotonic() - left < 5
