"""Ray Serve's direct ingress: each OpenAIIngress replica answers HTTP on its own port.

Through Serve's proxy a request makes two extra hops before our code runs (client -> proxy ->
ingress replica, and the ingress reads the body back from the proxy by another call), and every
streamed chunk makes one more on its way out. With direct ingress (Ray Serve 2.60,
`RAY_SERVE_ENABLE_DIRECT_INGRESS`, part of its documented throughput-optimized mode) each
ingress replica also runs its own HTTP server on a port from a range, serving the same ASGI
app: a client or a load balancer in front of those ports skips the proxy. The proxy keeps
serving its usual port, so turning this on adds a path and removes none.

The switch is read by the Serve controller and the replicas when Ray Serve is imported, so it
must be in the environment of every Ray process (the head's and workers' containers on a
cluster, or the shell that runs `serve run` for a private local Ray); a deployment's
runtime_env cannot set it. Imports nothing of ours and no Ray.
"""

from __future__ import annotations

ENABLE = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
MIN_PORT = "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"
MAX_PORT = "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"


def direct_ingress_env(ports: range) -> dict[str, str]:
    """Environment turning direct ingress on, with ingress replicas' HTTP ports taken from
    `ports` (the controller hands out the lowest free one per node: with one node and N
    ingress replicas, the first N of the range)."""
    if not ports:
        raise ValueError("direct ingress needs a non-empty port range")
    return {ENABLE: "1", MIN_PORT: str(ports.start), MAX_PORT: str(ports.stop)}
