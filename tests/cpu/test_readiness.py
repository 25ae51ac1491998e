"""Readiness: `/health` is the ingress's liveness; `/ready`, chats and completions say 503 in
OpenAI's shape, quickly, while no model replica can serve, and 200 once one can.

The integration tests deploy apps of their own on the shared Ray: one whose LLMReplica cannot
be scheduled until the test frees the CPUs it needs (a replica that is slow to start, as a
70B load is), and one whose LLMReplica crashes in its constructor (a crash loop).
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import ray

from deployments.readiness import Readiness, ReplicaCounts, judge
from tests.cpu.conftest import SERVICE_ARGS, wait_healthy

CHAT = {
    "model": "tiny-llama",
    "messages": [{"role": "user", "content": "are you there?"}],
    "max_tokens": 2,
}


# ---- the verdict ---------------------------------------------------------------------------


def test_a_running_replica_makes_the_app_ready():
    verdict = judge(ReplicaCounts(running=1, starting=2, status="UPDATING", message=""))
    assert verdict.ready and verdict.running == 1 and verdict.code is None


def test_replicas_still_starting_mean_the_model_is_loading():
    verdict = judge(ReplicaCounts(0, 2, "UPDATING", "", "CONFIG_UPDATE_STARTED"))
    assert not verdict.ready and verdict.code == "model_loading"
    assert "2 model replica(s) starting" in verdict.message


@pytest.mark.parametrize(
    "counts",
    [
        ReplicaCounts(0, 1, "UPDATING", "failed to start 3 times", "REPLICA_STARTUP_FAILED"),
        ReplicaCounts(0, 1, "UNHEALTHY", "", "HEALTH_CHECK_FAILED"),
        ReplicaCounts(0, 0, "DEPLOY_FAILED", ""),
        ReplicaCounts(0, 0, "MISSING", "no deployment"),
    ],
    ids=["crash-loop", "failing-health-checks", "deploy-failed", "missing"],
)
def test_failing_or_absent_replicas_mean_no_replica(counts):
    verdict = judge(counts)
    assert not verdict.ready and verdict.code == "no_replica"


def test_serves_own_message_is_never_sent_to_clients():
    """Serve's status message may hold a constructor's traceback: it stays in the logs."""
    verdict = judge(
        ReplicaCounts(0, 1, "UPDATING", "Traceback: /secret/path.py", "REPLICA_STARTUP_FAILED")
    )
    assert "/secret/path.py" not in verdict.message


# ---- the cache -----------------------------------------------------------------------------


class Controller:
    """Stands in for the Serve controller's answers; counts how often it is asked."""

    def __init__(self, counts: ReplicaCounts, delay_s: float = 0.0) -> None:
        self.counts, self.delay_s, self.calls = counts, delay_s, 0

    async def __call__(self) -> ReplicaCounts:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        return self.counts


def test_a_ready_verdict_is_reused_for_its_ttl_and_a_not_ready_one_for_less():
    now = [0.0]
    controller = Controller(ReplicaCounts(0, 1, "UPDATING", ""))
    readiness = Readiness(controller, ready_ttl_s=1.0, not_ready_ttl_s=0.25, clock=lambda: now[0])

    async def scenario():
        assert not (await readiness.check()).ready
        now[0] = 0.2
        await readiness.check()
        assert controller.calls == 1  # within the not-ready TTL
        now[0] = 0.3
        controller.counts = ReplicaCounts(1, 0, "HEALTHY", "")
        assert (await readiness.check()).ready and controller.calls == 2
        now[0] = 1.2
        await readiness.check()
        assert controller.calls == 2  # within the ready TTL
        now[0] = 1.4
        controller.counts = ReplicaCounts(0, 0, "UNHEALTHY", "")
        # Expired but ready: answered at once, refreshed in the background.
        assert (await readiness.check()).ready
        for _ in range(5):
            await asyncio.sleep(0)  # the background probe runs
        assert controller.calls == 3
        assert not (await readiness.check()).ready  # what the refresh found

    asyncio.run(scenario())


def test_answered_requests_stand_in_for_the_controller_while_they_flow():
    now = [0.0]
    controller = Controller(ReplicaCounts(1, 0, "HEALTHY", ""))
    readiness = Readiness(controller, ready_ttl_s=1.0, clock=lambda: now[0])

    async def scenario():
        assert (await readiness.check()).ready and controller.calls == 1
        for step in range(1, 10):  # a first token every 0.5 s for 4.5 s
            now[0] = step * 0.5
            readiness.served()
            assert (await readiness.check()).ready
        assert controller.calls == 1  # never asked while requests were answered
        controller.counts = ReplicaCounts(0, 0, "UNHEALTHY", "")
        now[0] = 6.0  # traffic stopped: the next check probes again (in the background)
        assert (await readiness.check()).ready
        for _ in range(5):
            await asyncio.sleep(0)
        assert controller.calls == 2
        assert not (await readiness.check()).ready

    asyncio.run(scenario())


def test_a_served_request_makes_a_not_ready_verdict_ready():
    now = [0.0]
    controller = Controller(ReplicaCounts(0, 1, "UPDATING", ""))
    readiness = Readiness(controller, not_ready_ttl_s=0.25, clock=lambda: now[0])

    async def scenario():
        assert not (await readiness.check()).ready
        readiness.served()
        assert (await readiness.check()).ready and controller.calls == 1

    asyncio.run(scenario())


def test_concurrent_callers_share_one_probe():
    controller = Controller(ReplicaCounts(1, 0, "HEALTHY", ""), delay_s=0.05)
    readiness = Readiness(controller)

    async def scenario():
        verdicts = await asyncio.gather(*(readiness.check() for _ in range(20)))
        assert all(v.ready for v in verdicts)

    asyncio.run(scenario())
    assert controller.calls == 1


def test_an_unanswering_controller_means_not_ready():
    async def hangs() -> ReplicaCounts:
        await asyncio.sleep(10)
        raise AssertionError("unreachable")

    readiness = Readiness(hangs, timeout_s=0.05)
    verdict = asyncio.run(readiness.check())
    assert not verdict.ready and verdict.code == "no_replica"


# ---- on real Serve -------------------------------------------------------------------------


def deploy(name: str, args: dict) -> str:
    """Start deploying app `name` at /<name> without waiting for it; return its URL."""
    from ray import serve

    from deployments.app import build_app

    serve.run_many(
        [serve.RunTarget(build_app(args), name=name, route_prefix=f"/{name}")],
        wait_for_applications_running=False,
    )
    return name


def wait_for_status(url: str, path: str, status: int, timeout_s: float = 120) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}{path}", timeout=10)
            # Until the ingress runs, Serve's proxy answers with its own 404 or 503 (plain
            # text, or JSON marked X-Proxy-Error where it runs proxy_middleware).
            ours = (
                response.headers.get("content-type", "").startswith("application/json")
                and "x-proxy-error" not in response.headers
            )
            if response.status_code == status and ours:
                return response
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}{path} never answered {status}")


def assert_unavailable(response: httpx.Response, code: str) -> None:
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["type"] == "server_error" and error["message"]
    assert int(response.headers["Retry-After"]) >= 1


@ray.remote(num_cpus=0)
class CpuHog:
    """Holds CPUs so that a replica needing one cannot be scheduled until it is killed."""

    def ready(self) -> bool:
        return True


@pytest.fixture()
def slow_start_url(serve_url):
    """An app whose one LLMReplica needs a CPU that the test holds: it stays STARTING."""
    from ray import serve

    free = int(ray.available_resources().get("CPU", 0))
    hog = CpuHog.options(num_cpus=free).remote()
    ray.get(hog.ready.remote())
    args = {
        **SERVICE_ARGS,
        "replica": {**SERVICE_ARGS["replica"], "num_replicas": 1, "num_cpus": 1},
    }
    name = deploy("slowstart", args)
    yield f"{serve_url}/{name}", hog
    ray.kill(hog)
    serve.delete(name)


def test_ready_is_503_while_the_model_loads_and_200_after(slow_start_url):
    from ray import serve

    from deployments.errors import APIError

    url, hog = slow_start_url
    loading = wait_for_status(url, "/ready", 503, timeout_s=60)
    assert_unavailable(loading, "model_loading")
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200  # the ingress is alive

    started = time.monotonic()
    chat = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=30)
    completion = httpx.post(
        f"{url}/v1/completions",
        timeout=30,
        json={"model": "tiny-llama", "prompt": "hi", "max_tokens": 2},
    )
    models = httpx.get(f"{url}/v1/models", timeout=30)  # listed, without the context yet
    assert time.monotonic() - started < 5  # answered, not queued behind an absent replica
    assert models.status_code == 200 and models.json()["data"][0]["id"] == "tiny-llama"
    assert_unavailable(chat, "model_loading")
    assert_unavailable(completion, "model_loading")
    with pytest.raises(APIError) as err:  # Python handle callers get the same 503
        serve.get_app_handle("slowstart").chat.remote(CHAT).result(timeout_s=30)
    assert err.value.status == 503 and err.value.body["error"]["code"] == "model_loading"

    ray.kill(hog)  # the replica can now be scheduled, and loads
    ready = wait_for_status(url, "/ready", 200, timeout_s=180)
    assert ready.json()["model_replicas"] == 1
    assert httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=60).status_code == 200


def deploy_with_broken_replicas(name: str) -> str:
    """build_app's two deployments, but every LLMReplica finds its model cache unwritable
    (GRACE_SERVE_CACHE under /proc), so its constructor raises; the ingress, which needs only
    the tokenizer from the usual cache, runs."""
    from ray import serve

    from deployments.app import INGRESS_NAME, replica_options
    from deployments.config import parse_app_args
    from deployments.ingress import OpenAIIngress
    from deployments.replica import LLMReplica

    cfg = parse_app_args(
        {**SERVICE_ARGS, "replica": {**SERVICE_ARGS["replica"], "num_replicas": 1}}
    )
    options = replica_options(cfg)
    options["ray_actor_options"] = {
        **options["ray_actor_options"],
        "runtime_env": {"env_vars": {"GRACE_SERVE_CACHE": "/proc/grace-serve-no-cache"}},
    }
    replica = serve.deployment(LLMReplica).options(**options).bind(cfg)
    ingress = (
        serve.deployment(OpenAIIngress)
        .options(name=INGRESS_NAME, ray_actor_options={"num_cpus": 0})
        .bind(replica, cfg)
    )
    serve.run_many(
        [serve.RunTarget(ingress, name=name, route_prefix=f"/{name}")],
        wait_for_applications_running=False,
    )
    return name


def test_a_crash_looping_model_is_no_replica(serve_url):
    from ray import serve

    url = f"{serve_url}/{deploy_with_broken_replicas('crashloop')}"
    try:
        deadline = time.monotonic() + 180
        failing = wait_for_status(url, "/ready", 503, timeout_s=120)
        while failing.json()["error"]["code"] != "no_replica" and time.monotonic() < deadline:
            time.sleep(1)
            failing = httpx.get(f"{url}/ready", timeout=10)
        assert_unavailable(failing, "no_replica")
        assert_unavailable(
            httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=30), "no_replica"
        )
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    finally:
        serve.delete("crashloop")


def test_the_shared_service_is_ready(llm_url):
    wait_healthy(llm_url)
    body = httpx.get(f"{llm_url}/ready", timeout=10).json()
    assert body == {
        "status": "ready",
        "model": "tiny-llama",
        "model_replicas": SERVICE_ARGS["replica"]["num_replicas"],
    }
