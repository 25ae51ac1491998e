"""The service on a GPU replica: RMM managed memory, kept caches, the admin view."""

import httpx
import pytest

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_service():
    import ray
    from ray import serve

    from deployments.app import build_app
    from tests.cpu.conftest import free_port, wait_healthy

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {
        "model": {"model_id": "builtin:tiny-llama", "served_model_name": "tiny-llama"},
        "memory": {"mode": "managed", "headroom_bytes": "4GiB"},
        "kv_cache": {"budget_bytes": "1GiB"},
        "replica": {"num_replicas": 1, "num_gpus": 1, "num_cpus": 1},
        "router": {"stats_period_s": 0.5},
    }
    serve.run(build_app(args), name="llm", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, timeout_s=300)
    yield url
    serve.shutdown()
    ray.shutdown()


def test_gpu_replica_serves_from_managed_memory_and_keeps_caches(gpu_service):
    url = gpu_service
    messages = [{"role": "user", "content": "hello from the GPU"}]
    first = httpx.post(
        f"{url}/v1/chat/completions",
        headers={"X-User-Id": "g"},
        timeout=120,
        json={"model": "tiny-llama", "messages": messages, "max_tokens": 8},
    )
    assert first.status_code == 200, first.text
    messages += [
        {"role": "assistant", "content": first.json()["choices"][0]["message"]["content"]},
        {"role": "user", "content": "again"},
    ]
    second = httpx.post(
        f"{url}/v1/chat/completions",
        headers={"X-User-Id": "g"},
        timeout=120,
        json={"model": "tiny-llama", "messages": messages, "max_tokens": 8},
    )
    usage = second.json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] >= first.json()["usage"]["prompt_tokens"]
    [row] = httpx.get(f"{url}/admin/replicas", timeout=30).json()
    assert row["platform"] in ("discrete", "grace") and row["memory_resource"] == "managed"
    assert row["used_bytes"] > 0 and 0 < row["free_unified_memory_bytes"] < row["capacity_bytes"]
    assert row["device_name"] and row["kv_cache_bytes"] > 0
