"""Shared fixtures: one local Ray instance and Serve on a free port for all integration tests."""

from __future__ import annotations

import os
import socket
import time

import httpx
import pytest

APP = "llm"
# An API key that only the guarded app's ingress reads (test_guarded.py); set before Ray starts
# so every worker process inherits it.
ENV_KEY_VAR = "GRACE_SERVE_TEST_API_KEYS"
ENV_KEY = "gs-test-env-key-5d1e0c"
# The guarded app's admin key and user-hash secret, read the same way.
ADMIN_KEY_VAR, ADMIN_KEY = "GRACE_SERVE_TEST_ADMIN_KEYS", "gs-test-admin-key-77a0e4"
SECRET_VAR, USER_SECRET = "GRACE_SERVE_TEST_USER_SECRET", "gs-test-user-secret-0c4d"
PROXY_CALLBACK_VAR = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "deployments.proxy_middleware:middlewares"
# Small and quick on 2 cores; short stats period so routing sees fresh numbers.
SERVICE_ARGS = {
    "model": {
        "model_id": "builtin:tiny-llama",
        "served_model_name": "tiny-llama",
        "max_model_len": 512,
    },
    "memory": {"cpu_memory_budget_bytes": "64MiB"},
    "kv_cache": {"budget_bytes": "16MiB"},
    "engine": {"default_max_tokens": 16, "cpu_threads": 1},
    "replica": {"num_replicas": 3, "num_cpus": 0, "max_replicas_per_node": None},
    "router": {"stats_period_s": 0.25, "free_memory_tolerance_fraction": 0.001},
    "ingress": {"num_replicas": 1, "num_cpus": 0},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def serve_url():
    """A private local Ray (never an existing cluster) with Serve on a free port."""
    import ray
    from ray import serve

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ[ENV_KEY_VAR] = ENV_KEY
    os.environ[ADMIN_KEY_VAR] = ADMIN_KEY
    # Serve's proxy runs our middleware, as in the image (deployments/proxy_middleware.py).
    os.environ.setdefault(PROXY_CALLBACK_VAR, PROXY_CALLBACK)
    os.environ[SECRET_VAR] = USER_SECRET
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        # Metrics reach the node's /metrics within a second (default: 10 s).
        _system_config={"metrics_report_interval_ms": 1000},
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def wait_healthy(url: str, timeout_s: float = 120) -> None:
    """Wait until the app at `url` is ready: a model replica can serve (`/ready` is 200)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not become ready")


@pytest.fixture(scope="session")
def llm_url(serve_url):
    """The service (3 LLMReplicas, 1 ingress) deployed once for the session."""
    from ray import serve

    from deployments.app import build_app

    serve.run(build_app(SERVICE_ARGS), name=APP, route_prefix="/")
    wait_healthy(serve_url)
    return serve_url
