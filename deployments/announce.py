"""The start-up line that says where the OpenAI API is served, once it can be served.

`serve run` with a config file prints no URL of its own. The ingress starts
`announce_when_ready` at construction: it polls readiness (the same cached check `/ready`
uses) until a model replica can serve, then logs one line naming the base URL of the OpenAI
API (what a client passes as ``base_url``). The URL is Serve's root URL (the proxy's
``http_options`` host and port) plus this application's route prefix, as the Serve controller
reports them; with Ray Serve's direct ingress on (direct_ingress.py) the line also names each
ingress replica's own URL, the faster path that skips Serve's proxy. Never imports torch or
rmm.
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit

from deployments.readiness import Readiness

logger = logging.getLogger("ray.serve")
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def join_url(root_url: str, route_prefix: str) -> str:
    """The OpenAI base URL under a Serve root URL and route prefix."""
    prefix = route_prefix.strip("/")
    return root_url.rstrip("/") + (f"/{prefix}" if prefix else "") + "/v1"


def openai_base_url(app_name: str) -> tuple[str | None, list[str]]:
    """This app's OpenAI base URL through Serve's proxy (None if unknown) and its ingress
    replicas' direct URLs (empty unless direct ingress is on), from the Serve controller
    (blocking)."""
    try:
        # Serve's client: the controller's root URL, the app's route prefix and the target
        # groups. Not part of Serve's documented API, hence the fallback to no URL.
        from ray.serve.context import _get_global_client

        client = _get_global_client()
        details = client.get_serve_details()
        prefix = details["applications"][app_name]["route_prefix"]
        root = client.root_url
    except Exception as exc:
        logger.debug("no serving URL: %r", exc)
        return None, []
    if prefix is None:
        return None, []
    return (
        (join_url(root, prefix) if root else None),
        direct_urls(details, app_name, prefix, urlsplit(root or "").hostname),
    )


def direct_urls(
    details: dict, app_name: str, route_prefix: str, proxy_host: str | None = None
) -> list[str]:
    """The OpenAI base URLs of the app's ingress replicas' own HTTP servers, from Serve's
    instance details: its HTTP target groups point at those replicas only under direct
    ingress (otherwise at the proxies, in groups of no app). The replicas bind the proxy's
    host (`http_options.host`): when that is a loopback address, so are their URLs."""
    loopback = proxy_host if proxy_host in LOOPBACK else None
    urls = []
    for group in details.get("target_groups") or []:
        if group.get("app_name") != app_name or str(group.get("protocol")) not in (
            "HTTP",
            "RequestProtocol.HTTP",
        ):
            continue
        urls += [
            join_url(f"http://{loopback or t['ip']}:{t['port']}", route_prefix)
            for t in group.get("targets", [])
        ]
    return sorted(urls)


async def announce_when_ready(
    readiness: Readiness, app_name: str, model: str, period_s: float = 1.0
) -> str | None:
    """Wait until a model replica can serve, log where the API is, return that URL."""
    while not (verdict := await readiness.check()).ready:
        await asyncio.sleep(period_s)
    url, direct = await asyncio.to_thread(openai_base_url, app_name)
    logger.info(
        "OpenAI API ready at %s (model %s, %d model replica(s) running)%s",
        url or f"the Serve HTTP proxy under app {app_name!r}'s route prefix",
        model,
        verdict.running,
        f"; direct ingress (skips Serve's proxy): {', '.join(direct)}" if direct else "",
    )
    return url
