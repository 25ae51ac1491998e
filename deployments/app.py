"""build_app(args) -> Application: the Serve entry point (`deployments.app:build_app`).

Binds the undecorated LLMReplica and the OpenAIIngress with options computed from the config.
A Serve YAML can still override either deployment's options by name (`num_replicas`,
`ray_actor_options`, `max_replicas_per_node`, `request_router_config`, ...).
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig, RequestRouterConfig

from deployments.config import AppArgs, ReplicaConfig, RouterConfig, parse_app_args
from deployments.ingress import OpenAIIngress
from deployments.replica import LLMReplica

REPLICA_NAME = "LLMReplica"
INGRESS_NAME = "OpenAIIngress"
ROUTER_CLASS = "deployments.router:UnifiedMemoryRouter"
# Serve settings for our two deployments' processes (the parts of Ray Serve's documented
# RAY_SERVE_THROUGHPUT_OPTIMIZED mode that apply per process; its direct ingress is
# cluster-wide, see direct_ingress.py): user code runs on the replica's own event loop and
# the ingress's handle routes on that loop too, so a request and each streamed message skip
# a hop between threads; objects built at start-up (an engine's, a tokenizer's) are frozen
# out of the garbage collector's scans, which would otherwise pause every thread with the GIL.
# Not taken: the mode's buffered request-path logs (RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE),
# which hold a replica's start-up lines back from its log file until 1,000 lines have gathered
# (tests/cpu/test_startup_logs.py).
SERVE_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_FREEZE_GC_ON_STARTUP": "1",
}


def runtime_env() -> dict[str, Any]:
    return {"env_vars": dict(SERVE_ENV)}


def replica_actor_options(cfg: ReplicaConfig) -> dict[str, Any]:
    options: dict[str, Any] = {
        "num_cpus": cfg.num_cpus,
        "num_gpus": cfg.num_gpus,
        "runtime_env": runtime_env(),
    }
    if cfg.accelerator_type:
        options["accelerator_type"] = cfg.accelerator_type
    if cfg.resources:
        options["resources"] = dict(cfg.resources)
    return options


def router_config(cfg: RouterConfig) -> RequestRouterConfig:
    return RequestRouterConfig(
        request_router_class=ROUTER_CLASS,
        request_router_kwargs={
            "free_memory_tolerance_fraction": cfg.free_memory_tolerance_fraction,
            "sticky_max_wait_s": cfg.sticky_max_wait_s,
            "placement_ttl_s": cfg.placement_ttl_s,
            "stale_stats_s": cfg.stale_after_s,
        },
        request_routing_stats_period_s=cfg.stats_period_s,
        request_routing_stats_timeout_s=max(5.0, 5 * cfg.stats_period_s),
    )


def replica_options(cfg: AppArgs) -> dict[str, Any]:
    """Deployment options for LLMReplica (one per node unless the config says otherwise)."""
    options: dict[str, Any] = {
        "name": REPLICA_NAME,
        "num_replicas": cfg.replica.num_replicas,
        "max_ongoing_requests": cfg.replica.max_ongoing_requests,
        # Bounded wait at each caller; beyond it the ingress answers 429 with Retry-After.
        "max_queued_requests": cfg.replica.max_queued_requests,
        "ray_actor_options": replica_actor_options(cfg.replica),
        "health_check_period_s": cfg.replica.health_check_period_s,
        # Loading a 70B model into unified memory takes minutes, not Serve's default seconds.
        "health_check_timeout_s": max(60.0, cfg.replica.health_check_period_s * 3),
        "graceful_shutdown_timeout_s": cfg.replica.graceful_shutdown_timeout_s,
        "request_router_config": router_config(cfg.router),
    }
    if cfg.replica.max_replicas_per_node is not None:
        options["max_replicas_per_node"] = cfg.replica.max_replicas_per_node
    return options


def build_app(args: dict[str, Any] | AppArgs | None = None) -> Application:
    """The grace-serve application: OpenAIIngress in front of LLMReplica."""
    cfg = parse_app_args(args)
    replica = serve.deployment(LLMReplica).options(**replica_options(cfg)).bind(cfg)
    ingress = serve.deployment(OpenAIIngress).options(
        name=INGRESS_NAME,
        num_replicas=cfg.ingress.num_replicas,
        ray_actor_options={"num_cpus": cfg.ingress.num_cpus, "runtime_env": runtime_env()},
        max_ongoing_requests=cfg.ingress.max_ongoing_requests,
        max_queued_requests=cfg.ingress.max_queued_requests,
        backpressure_config=BackpressureConfig(
            status_code=429, retry_after_s=cfg.ingress.retry_after_s
        ),
    )
    return ingress.bind(replica, cfg)
