"""The whole service on real Ray Serve (CPU): OpenAI API, kept caches, routing, bad input."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from deployments.identity import user_key
from tests.cpu.conftest import SERVICE_ARGS

MODEL = "tiny-llama"
REQUIRED_ROW_KEYS = {
    "replica_id",
    "platform",
    "free_unified_memory_bytes",
    "kv_cache_bytes",
    "resident_users",
}


def chat(url, header_user, messages, max_tokens=8, **extra):
    headers = {"X-User-Id": header_user} if header_user else {}
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, **extra}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    return response


def replicas(url):
    response = httpx.get(f"{url}/admin/replicas", timeout=30)
    assert response.status_code == 200
    return response.json()


def settle():
    """Wait until every router has seen fresh replica stats."""
    time.sleep(4 * SERVICE_ARGS["router"]["stats_period_s"])


def test_openai_client_gets_a_streamed_and_a_plain_answer(llm_url):
    client = openai.OpenAI(base_url=f"{llm_url}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == [MODEL]
    messages = [{"role": "user", "content": "Say something about unified memory."}]

    reply = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, user="client-a"
    )
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens >= 1 and reply.usage.prompt_tokens > 0

    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
        user="client-b",
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens >= 1

    text = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5)
    assert text.choices[0].finish_reason in ("stop", "length")


def test_second_turn_is_served_from_the_kept_cache_and_others_get_none(llm_url):
    first_turn = [{"role": "user", "content": "Remember the number 4096."}]
    first = chat(llm_url, "alice", first_turn, max_tokens=6)
    body1 = first.json()
    assert body1["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    reply = body1["choices"][0]["message"]["content"]
    second_turn = [
        *first_turn,
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "Which number was it?"},
    ]
    second = chat(llm_url, "alice", second_turn, max_tokens=6)
    cached = second.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= body1["usage"]["prompt_tokens"]  # the whole first turn came from cache
    assert second.headers["x-replica-id"] == first.headers["x-replica-id"]
    # Another user sending the very same text shares nothing with alice.
    other = chat(llm_url, "mallory", second_turn, max_tokens=6)
    assert other.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_user_from_the_body_when_no_header(llm_url):
    messages = [{"role": "user", "content": "body user"}]
    chat(llm_url, None, messages, user="bodyuser")
    again = chat(llm_url, None, messages, user="bodyuser")
    assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    rows = replicas(llm_url)
    assert any(user_key("bodyuser") in r["resident_users"] for r in rows)


def test_streamed_responses_name_their_replica_and_end_with_done(llm_url):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "stream"}],
        "max_tokens": 5,
        "stream": True,
    }
    with httpx.stream(
        "POST",
        f"{llm_url}/v1/chat/completions",
        json=body,
        headers={"X-User-Id": "streamer"},
        timeout=60,
    ) as response:
        assert response.status_code == 200
        assert response.headers["x-replica-id"]
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    payloads = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    assert all(p["object"] == "chat.completion.chunk" for p in payloads)


def test_admin_replicas_lists_every_replica(llm_url):
    rows = replicas(llm_url)
    assert len(rows) == SERVICE_ARGS["replica"]["num_replicas"]
    for row in rows:
        assert row.keys() >= REQUIRED_ROW_KEYS
        assert row["platform"] == "cpu" and row["free_unified_memory_bytes"] > 0


def test_users_stay_on_one_replica_and_new_users_go_to_most_free_memory(llm_url):
    tolerance = SERVICE_ARGS["router"]["free_memory_tolerance_fraction"]
    homes: dict[str, set[str]] = {}
    conversations: dict[str, list[dict]] = {}
    for turn in range(3):
        for i in range(9):
            user = f"spread-{i}"
            if turn == 0:
                settle()
                rows = replicas(llm_url)
                best = max(r["free_unified_memory_bytes"] for r in rows)
                slack = tolerance * max(r["capacity_bytes"] for r in rows)
                conversations[user] = []
            conversations[user].append(
                {"role": "user", "content": f"turn {turn} from {user} " + "padding " * i}
            )
            response = chat(llm_url, user, conversations[user], max_tokens=4)
            rid = response.headers["x-replica-id"]
            reply = response.json()["choices"][0]["message"]["content"]
            conversations[user].append({"role": "assistant", "content": reply})
            homes.setdefault(user, set()).add(rid)
            if turn == 0:
                chosen = next(r for r in rows if r["replica_id"] == rid)
                assert chosen["free_unified_memory_bytes"] >= best - slack, (user, rows)
            else:
                cached = response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
                assert cached > 0, f"{user} turn {turn} missed its cache"
    assert all(len(h) == 1 for h in homes.values()), homes
    used = {next(iter(h)) for h in homes.values()}
    assert len(used) == 3  # new users spread over all replicas


BAD_REQUESTS = [
    ("invalid JSON", "/v1/chat/completions", b"{not json", 400, None),
    ("JSON that is not an object", "/v1/chat/completions", b"[1, 2]", 400, None),
    ("missing messages", "/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    (
        "messages of the wrong type",
        "/v1/chat/completions",
        {"model": MODEL, "messages": "hello"},
        400,
        "messages",
    ),
    ("empty messages", "/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    (
        "unknown role",
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]},
        400,
        "messages",
    ),
    (
        "missing model",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}]},
        400,
        "model",
    ),
    (
        "unknown model",
        "/v1/chat/completions",
        {"model": "gpt-99", "messages": [{"role": "user", "content": "x"}]},
        404,
        "model",
    ),
    (
        "max_tokens zero",
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
        400,
        "max_tokens",
    ),
    (
        "max_tokens negative",
        "/v1/completions",
        {"model": MODEL, "prompt": "x", "max_tokens": -5},
        400,
        "max_tokens",
    ),
    (
        "temperature of the wrong type",
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
        400,
        "temperature",
    ),
    (
        "n above one",
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 3},
        400,
        "n",
    ),
    (
        "too many stops",
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stop": list("abcde")},
        400,
        "stop",
    ),
    (
        "prompt beyond the context",
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "many words " * 600}]},
        400,
        "messages",
    ),
    (
        "completion prompt beyond the context",
        "/v1/completions",
        {"model": MODEL, "prompt": "many words " * 600},
        400,
        "prompt",
    ),
    (
        "token ids outside the vocabulary",
        "/v1/completions",
        {"model": MODEL, "prompt": [1, 2, 10**9]},
        400,
        "prompt",
    ),
]


@pytest.mark.parametrize(
    ("what", "path", "body", "status", "param"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS]
)
def test_bad_input_is_a_4xx_in_openai_shape(llm_url, what, path, body, status, param):
    kwargs = (
        {"content": body, "headers": {"content-type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
    )
    response = httpx.post(f"{llm_url}{path}", timeout=60, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param:
        assert error["param"] == param, error
    if what.startswith(("prompt beyond", "completion prompt")):
        assert error["code"] == "context_length_exceeded"
        assert "512" in error["message"]


def test_wrong_routes_and_methods_are_openai_shaped(llm_url):
    for response, status in [
        (httpx.get(f"{llm_url}/v1/nowhere", timeout=10), 404),
        (httpx.get(f"{llm_url}/v1/chat/completions", timeout=10), 405),
    ]:
        assert response.status_code == status
        assert "message" in response.json()["error"]


def test_service_keeps_answering_after_bad_input(llm_url):
    for _ in range(3):
        httpx.post(f"{llm_url}/v1/chat/completions", content=b"\xff\xfe", timeout=10)
    assert chat(llm_url, "after-bad-input", [{"role": "user", "content": "still there?"}])


def test_python_handle_example_from_the_readme(llm_url):
    """The README's handle example runs and agrees with HTTP."""
    import pathlib
    import runpy

    root = pathlib.Path(__file__).resolve().parents[2]
    example = root / "examples" / "python_handle.py"
    assert example.read_text().strip() in (root / "README.md").read_text()
    namespace = runpy.run_path(str(example), run_name="example")
    reply, chunks = namespace["main"]("llm")
    assert reply["object"] == "chat.completion"
    assert chunks[-1]["usage"]["completion_tokens"] >= 1

    # Same greedy request by HTTP and by handle: same text and usage.
    request = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "compare me"}],
        "max_tokens": 6,
        "temperature": 0,
    }
    from ray import serve

    by_handle = serve.get_app_handle("llm").chat.remote(request).result()
    by_http = httpx.post(f"{llm_url}/v1/chat/completions", json=request, timeout=60).json()
    assert by_handle["choices"] == by_http["choices"]
    assert by_handle["usage"] == by_http["usage"]


def test_python_handle_reports_bad_input_as_api_error(llm_url):
    from ray import serve

    from deployments.ingress import APIError

    with pytest.raises(APIError) as err:
        serve.get_app_handle("llm").chat.remote({"model": MODEL, "messages": []}).result()
    assert err.value.status == 400 and err.value.body["error"]["param"] == "messages"
    with pytest.raises(APIError) as err:
        serve.get_app_handle("llm").completion.remote(
            {"model": MODEL, "prompt": "x", "best_of": 3}
        ).result()
    assert err.value.status == 400
    assert (err.value.body["error"]["param"], err.value.body["error"]["code"]) == (
        "best_of",
        "unsupported_parameter",
    )


def test_every_answer_says_where_its_first_token_spent_its_time(llm_url):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3}
    plain = httpx.post(f"{llm_url}/v1/completions", json=body, timeout=60)
    with httpx.stream(
        "POST", f"{llm_url}/v1/completions", json={**body, "stream": True}, timeout=60
    ) as streamed:
        streamed.read()
    for response in (plain, streamed):
        parts = dict(p.strip().split(";dur=") for p in response.headers["server-timing"].split(","))
        ms = {name: float(v) for name, v in parts.items()}
        assert set(ms) == {"prepare", "upstream", "replica"}
        assert 0 < ms["replica"] <= ms["upstream"] and ms["prepare"] >= 0
