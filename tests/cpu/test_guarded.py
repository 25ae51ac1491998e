"""Auth, isolation, limits and backpressure on a second app with tight settings (real Serve).

The app "guarded" (route prefix /guarded) takes API keys from a file and an environment
variable, runs one replica that takes one request at a time with one queued, a KV budget of
256 tokens, and small body and message limits. It is deployed for this module and deleted after.
"""

from __future__ import annotations

import glob
import os
import threading

import httpx
import pytest

from deployments.auth import key_id, namespaced_user
from deployments.identity import user_key
from tests.cpu.conftest import (
    ADMIN_KEY,
    ADMIN_KEY_VAR,
    ENV_KEY,
    ENV_KEY_VAR,
    SECRET_VAR,
    USER_SECRET,
    wait_healthy,
)

MODEL = "tiny-llama"
KEY_A, KEY_B = "gs-test-file-key-alpha-91c2", "gs-test-file-key-bravo-03fe"
SECRET_PROMPT = "SECRET-PROMPT-MARKER-6b1f"
ARGS = {
    "model": {"model_id": "builtin:tiny-llama", "served_model_name": MODEL, "max_model_len": 512},
    "memory": {"cpu_memory_budget_bytes": "64MiB"},
    "kv_cache": {"budget_bytes": "512KiB"},  # 256 tokens of tiny-llama KV
    "engine": {"default_max_tokens": 8, "cpu_threads": 1},
    "replica": {
        "num_replicas": 1,
        "num_cpus": 0,
        "max_replicas_per_node": None,
        "max_ongoing_requests": 1,
        "max_queued_requests": 1,
    },
    "router": {"stats_period_s": 0.25},
    "ingress": {
        "num_replicas": 1,
        "num_cpus": 0,
        "max_body_bytes": "16KiB",
        "max_messages": 8,
        "retry_after_s": 2,
    },
}


@pytest.fixture(scope="module")
def guarded(serve_url, tmp_path_factory):
    from ray import serve

    from deployments.app import build_app

    keys = tmp_path_factory.mktemp("keys") / "api-keys.txt"
    keys.write_text(f"# test keys\n{KEY_A}\n\n{KEY_B}  # second\n")
    args = {
        **ARGS,
        "auth": {
            "api_keys_file": str(keys),
            "api_keys_env": ENV_KEY_VAR,
            "admin_keys_env": ADMIN_KEY_VAR,
            "user_key_secret_env": SECRET_VAR,
        },
    }
    serve.run(build_app(args), name="guarded", route_prefix="/guarded")
    url = f"{serve_url}/guarded"
    wait_healthy(url)
    yield url
    serve.delete("guarded")


def post(url, body, key=KEY_A, user=None, path="/v1/chat/completions", **kwargs):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if user:
        headers["X-User-Id"] = user
    return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=60, **kwargs)


def ask(content, **extra):
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 4,
        **extra,
    }


def assert_openai_error(response, status, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code:
        assert error["code"] == code, error
    return error


def test_missing_or_wrong_key_is_401_in_openai_shape(guarded):
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {KEY_A}"},
        {"Authorization": f"Bearer {KEY_A}x"},
        {"Authorization": "Bearer"},
    ):
        for method, path in (
            ("POST", "/v1/chat/completions"),
            ("GET", "/v1/models"),
            ("GET", "/admin/replicas"),
            ("POST", "/v1/completions"),
        ):
            response = httpx.request(
                method,
                f"{guarded}{path}",
                headers=headers,
                timeout=30,
                json=ask("hi") if method == "POST" else None,
            )
            assert_openai_error(response, 401, "invalid_api_key")
            assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{guarded}/health", timeout=10).status_code == 200


def test_keys_from_the_file_and_the_environment_are_accepted(guarded):
    for key in (KEY_A, KEY_B, ENV_KEY):
        response = httpx.get(
            f"{guarded}/v1/models", timeout=30, headers={"Authorization": f"Bearer {key}"}
        )
        assert response.status_code == 200, response.text


def test_the_same_user_under_two_keys_never_shares_a_cache(guarded):
    turn1 = [{"role": "user", "content": "My code is 77."}]
    first = post(guarded, {"model": MODEL, "messages": turn1, "max_tokens": 3}, KEY_A, "alice")
    assert first.status_code == 200, first.text
    reply = first.json()["choices"][0]["message"]["content"]
    turn2 = [*turn1, {"role": "assistant", "content": reply}, {"role": "user", "content": "?"}]
    body2 = {"model": MODEL, "messages": turn2, "max_tokens": 3}

    def cached(response):
        assert response.status_code == 200, response.text
        return response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    # Other keys with the same user id (header or body), a key naming A's namespaced id, or
    # no user at all: each is someone else, and finds nothing cached.
    assert cached(post(guarded, body2, KEY_B, "alice")) == 0
    assert cached(post(guarded, {**body2, "user": "alice"}, ENV_KEY)) == 0
    spoof = namespaced_user(key_id(KEY_A), "alice")
    assert cached(post(guarded, {**body2, "user": spoof}, KEY_B)) == 0
    assert cached(post(guarded, body2, KEY_A)) == 0  # anonymous, even under A's own key
    # Alice under key A still finds her whole first turn: no one read or extended it.
    assert cached(post(guarded, body2, KEY_A, "alice")) >= first.json()["usage"]["prompt_tokens"]
    assert_openai_error(
        httpx.get(
            f"{guarded}/admin/replicas", timeout=30, headers={"Authorization": f"Bearer {KEY_A}"}
        ),
        403,
        "admin_key_required",
    )
    rows = httpx.get(
        f"{guarded}/admin/replicas", timeout=30, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    ).json()
    resident = {u for r in rows for u in r["resident_users"]}
    alice = namespaced_user(key_id(KEY_A), "alice")
    # Resident users are keyed by the deployment's secret: without it, alice's plain hash
    # (or any guess) is not among them.
    assert user_key(alice, USER_SECRET.encode()) in resident
    assert user_key(alice) not in resident and user_key("alice") not in resident


def test_a_body_over_the_limit_is_413_before_it_is_read(guarded):
    big = ask("x" * 20_000)
    assert_openai_error(post(guarded, big), 413, "request_too_large")

    def chunks():  # no Content-Length: the gate counts bytes as they arrive
        yield b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"y" * 1000
        yield b'"}]}'

    response = httpx.post(
        f"{guarded}/v1/chat/completions",
        content=chunks(),
        timeout=30,
        headers={"Authorization": f"Bearer {KEY_A}", "content-type": "application/json"},
    )
    assert_openai_error(response, 413, "request_too_large")


def test_too_many_messages_is_a_400_naming_messages(guarded):
    body = {
        "model": MODEL,
        "max_tokens": 2,
        "messages": [{"role": "user", "content": "m"} for _ in range(9)],
    }
    error = assert_openai_error(post(guarded, body), 400, "too_many_messages")
    assert error["param"] == "messages"


def test_a_full_queue_is_429_with_retry_after_never_5xx(guarded):
    statuses, retry_after = [], []

    def one(i):
        response = post(guarded, ask(f"burst {i}", max_tokens=32))
        statuses.append(response.status_code)
        if response.status_code == 429:
            assert_openai_error(response, 429, "queue_full")
            retry_after.append(response.headers.get("retry-after"))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(statuses) == 8 and set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) >= 1 and statuses.count(200) >= 1, statuses
    assert retry_after and set(retry_after) == {"2"}


def test_a_prompt_no_replica_can_hold_is_503_saying_so(guarded):
    response = post(guarded, ask("memory " * 400))  # ~410 tokens; KV budget holds 256
    error = assert_openai_error(response, 503, "insufficient_memory")
    assert "no replica can hold this request in memory" in error["message"]
    assert post(guarded, ask("short")).status_code == 200


def test_prompts_and_keys_never_reach_the_logs(guarded):
    import ray

    response = post(guarded, ask(SECRET_PROMPT), KEY_B, "log-user")
    assert response.status_code == 200
    post(guarded, ask(SECRET_PROMPT), "gs-wrong-key-4411")
    logs = ray._private.worker.global_worker.node.get_logs_dir_path()
    secrets = (SECRET_PROMPT, KEY_A, KEY_B, ENV_KEY, "gs-wrong-key-4411")
    for path in glob.glob(os.path.join(logs, "**", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, errors="replace") as f:
                text = f.read()
            for secret in secrets:
                assert secret not in text, f"{secret} in {path}"
