"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis).

Schemathesis derives valid and schema-violating requests for every operation in
/openapi.json; each must get a non-5xx answer, in time, and the service must be healthy after.
At least MIN_CASES requests are sent. Runs against its own small app (one replica, short
context) so the random users it creates never touch the shared service's caches.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

from tests.cpu.conftest import wait_healthy

MODEL = "tiny-llama"
MIN_CASES = 1000
EXAMPLES_PER_OPERATION = 300  # per POST operation and mode: 2 x 2 x 300 = 1,200
OPERATIONS = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model_id}"),
    ("GET", "/admin/replicas"),
    ("POST", "/admin/replicas/{replica_id}/drain"),
    ("GET", "/health"),
    ("GET", "/ready"),
]
ARGS = {
    "model": {"model_id": "builtin:tiny-llama", "served_model_name": MODEL, "max_model_len": 256},
    "memory": {"cpu_memory_budget_bytes": "64MiB"},
    "kv_cache": {"budget_bytes": "8MiB"},
    "engine": {"default_max_tokens": 4, "cpu_threads": 1},
    "replica": {"num_replicas": 1, "num_cpus": 0, "max_replicas_per_node": None},
    "router": {"stats_period_s": 0.25},
    "ingress": {"num_replicas": 1, "num_cpus": 0, "max_body_bytes": "64KiB"},
}
SENT: dict[str, int] = {}


@pytest.fixture(scope="module")
def fuzz_url(serve_url):
    from ray import serve

    from deployments.app import build_app

    serve.run(build_app(ARGS), name="fuzz", route_prefix="/fuzz")
    url = f"{serve_url}/fuzz"
    wait_healthy(url)
    yield url
    serve.delete("fuzz")


@pytest.fixture(scope="module")
def api_schema(fuzz_url):
    loaded = schemathesis.openapi.from_url(f"{fuzz_url}/openapi.json")
    loaded.config.update(base_url=fuzz_url)
    return loaded


def keep_it_short(body):
    """Valid requests still generate: cap their length so 1,000 cases fit in CI's budget."""
    if isinstance(body, dict):
        for field in ("max_tokens", "max_completion_tokens"):
            value = body.get(field)
            if isinstance(value, int) and not isinstance(value, bool) and value > 4:
                body[field] = 4
    return body


def check(case) -> None:
    case.body = keep_it_short(case.body)
    response = case.call(timeout=30)  # a hang fails the case
    key = f"{case.method} {case.path}"
    SENT[key] = SENT.get(key, 0) + 1
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
    if response.status_code == 200 and "text/event-stream" in response.headers.get(
        "content-type", ""
    ):
        assert '"type":"server_error"' not in response.text, response.text[-500:]
        assert response.text.rstrip().endswith("data: [DONE]")
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_every_operation_is_fuzzed(api_schema):
    found = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert found == set(OPERATIONS)


# Operations without a body have no schema-violating form (the drain's path parameter takes
# any string).
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if m == "POST" and p.startswith("/v1/")
]


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_no_request_gets_a_5xx_or_hangs(api_schema, method, path, mode):
    operation = api_schema[path][method]
    examples = EXAMPLES_PER_OPERATION if path.startswith("/v1/") and method == "POST" else 20

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate],
    )
    def fuzz(case):
        check(case)

    fuzz()


def test_enough_cases_ran_and_the_service_is_healthy_after(fuzz_url):
    assert sum(SENT.values()) >= MIN_CASES, SENT
    assert httpx.get(f"{fuzz_url}/health", timeout=10).status_code == 200
    reply = httpx.post(
        f"{fuzz_url}/v1/chat/completions",
        timeout=60,
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "still fine?"}],
            "max_tokens": 4,
        },
    )
    assert reply.status_code == 200, reply.text
    rows = httpx.get(f"{fuzz_url}/admin/replicas", timeout=30).json()
    assert [r["running_requests"] for r in rows] == [0]
