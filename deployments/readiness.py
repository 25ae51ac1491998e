"""Readiness: can at least one LLMReplica serve a request now?

`/health` says the ingress is alive; `/ready` and every chat or completion ask this module
whether a model replica can serve. The answer comes from the Serve controller's view of the
LLMReplica deployment (`serve.status()`: how many replicas are RUNNING, i.e. constructed and
passing health checks, and how many are starting), not from calls to the replicas, so it costs
one controller call per cache period at most, and a busy replica still counts as serving.
Verdicts are cached (a ready one for `ready_ttl_s`, a not-ready one for the shorter
`not_ready_ttl_s`) and concurrent callers share one probe. A first token from a replica is a
verdict too (`served`): while requests are answered the controller is not asked at all; its
answer (`serve.status()`, ~10-20 ms of pickling with the GIL held) would otherwise stall the
ingress's event loop, and whichever first token was in flight, once a period.

While none is RUNNING the answer is a 503 in OpenAI's shape: `model_loading` while replicas are
starting and none has failed, `no_replica` when replicas fail to start or fail their health
checks (a crash loop: Serve keeps retrying), the deployment is unhealthy, or it has no
replicas. Serve's own status message (it may hold a constructor's traceback) is logged, never
sent to clients. Never imports torch or rmm.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from deployments.errors import APIError

logger = logging.getLogger("ray.serve")

STARTING_STATES = frozenset({"STARTING", "UPDATING", "RECOVERING"})
FAILED_STATUSES = frozenset({"UNHEALTHY", "DEPLOY_FAILED"})
FAILED_TRIGGERS = frozenset({"REPLICA_STARTUP_FAILED", "HEALTH_CHECK_FAILED"})


class ReplicaCounts(NamedTuple):
    """The controller's view of one deployment."""

    running: int
    starting: int
    status: str  # Serve's DeploymentStatus name, or "MISSING"
    message: str
    trigger: str = "UNSPECIFIED"  # Serve's DeploymentStatusTrigger: how it got that status


class Verdict(NamedTuple):
    """Whether the app can serve; `code` and `message` say why not."""

    ready: bool
    running: int
    code: str | None
    message: str


def judge(counts: ReplicaCounts) -> Verdict:
    """The verdict for one view of the model deployment."""
    if counts.running > 0:
        return Verdict(True, counts.running, None, f"{counts.running} model replica(s) running")
    failing = counts.status in FAILED_STATUSES or counts.trigger in FAILED_TRIGGERS
    if counts.starting > 0 and not failing:
        return Verdict(
            False,
            0,
            "model_loading",
            f"the model is loading: {counts.starting} model replica(s) starting and "
            "none ready yet; retry after the time in Retry-After",
        )
    why = (
        "its replicas are failing to start or to pass health checks"
        if failing
        else f"the model deployment is {counts.status} with no replica running"
    )
    return Verdict(False, 0, "no_replica", f"no model replica can serve: {why}; retry later")


def not_ready_error(verdict: Verdict, retry_after_s: int) -> APIError:
    """The 503 a request gets while no replica can serve."""
    return APIError(
        503,
        verdict.message,
        "server_error",
        code=verdict.code,
        headers={"Retry-After": str(retry_after_s)},
    )


def deployment_counts(app_name: str, deployment_name: str) -> ReplicaCounts:
    """Ask the Serve controller about one deployment (blocking: call it in a thread)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    deployment = app.deployments.get(deployment_name) if app else None
    if deployment is None:
        return ReplicaCounts(0, 0, "MISSING", f"no deployment {deployment_name!r}")
    states = {str(getattr(k, "value", k)): n for k, n in deployment.replica_states.items()}
    starting = sum(n for state, n in states.items() if state in STARTING_STATES)
    status = str(getattr(deployment.status, "value", deployment.status))
    trigger = str(getattr(deployment.status_trigger, "value", deployment.status_trigger))
    return ReplicaCounts(states.get("RUNNING", 0), starting, status, deployment.message, trigger)


class Readiness:
    """A cached, shared answer to "can a model replica serve?" for one ingress replica."""

    def __init__(
        self,
        probe: Callable[[], Awaitable[ReplicaCounts]],
        retry_after_s: int = 1,
        ready_ttl_s: float = 1.0,
        not_ready_ttl_s: float = 0.25,
        timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._probe = probe
        self._retry_after_s = retry_after_s
        self._ttl = {True: ready_ttl_s, False: not_ready_ttl_s}
        self._timeout_s = timeout_s
        self._clock = clock
        self._verdict: Verdict | None = None
        self._checked_at = float("-inf")
        self._inflight: asyncio.Task[Verdict] | None = None

    async def check(self) -> Verdict:
        """The current verdict, probing at most once per cache period. An expired "ready"
        verdict is answered at once while a probe refreshes it in the background: a request
        never waits on the controller while replicas serve (it cost ~10-20 ms every period);
        without a ready verdict, callers wait for the probe."""
        cached = self._verdict
        if cached is not None and self._clock() - self._checked_at < self._ttl[cached.ready]:
            return cached
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._refresh())
            self._inflight.add_done_callback(self._probed)
        if cached is not None and cached.ready:
            return cached
        return await asyncio.shield(self._inflight)

    def served(self) -> None:
        """A model replica just answered a request (its first message arrived): ready now,
        as fresh as a probe's verdict."""
        running = self._verdict.running if self._verdict and self._verdict.ready else 1
        if not (self._verdict and self._verdict.ready):
            logger.info("readiness: a model replica answered a request")
        self._verdict = Verdict(True, running, None, f"{running} model replica(s) running")
        self._checked_at = self._clock()

    def _probed(self, task: asyncio.Task[Verdict]) -> None:
        if self._inflight is task:
            self._inflight = None

    async def require(self) -> None:
        """Return if a replica can serve; raise the 503 APIError otherwise."""
        verdict = await self.check()
        if not verdict.ready:
            raise not_ready_error(verdict, self._retry_after_s)

    async def _refresh(self) -> Verdict:
        try:
            counts = await asyncio.wait_for(self._probe(), self._timeout_s)
        except Exception as exc:  # the controller is unreachable or slow: cannot say ready
            logger.warning("readiness probe failed: %s", type(exc).__name__)
            counts = ReplicaCounts(0, 0, "UNKNOWN", "the Serve controller did not answer")
        verdict = judge(counts)
        previous, self._verdict, self._checked_at = self._verdict, verdict, self._clock()
        if previous is None or (previous.ready, previous.code) != (verdict.ready, verdict.code):
            logger.info(
                "readiness: %s (model deployment %s: %s)",
                verdict.message,
                counts.status,
                counts.message or "no message",
            )
        return verdict
