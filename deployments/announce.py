"""The start-up line that says where the OpenAI API is served, once it can be served.

`serve run` with a config file prints no URL of its own. The ingress starts
`announce_when_ready` at construction: it polls readiness (the same cached check `/ready`
uses) until a model replica can serve, then logs one line naming the base URL of the OpenAI
API (what a client passes as ``base_url``). The URL is Serve's root URL (the proxy's
``http_options`` host and port) plus this application's route prefix, as the Serve controller
reports them. Never imports torch or rmm.
"""

from __future__ import annotations

import asyncio
import logging

from deployments.readiness import Readiness

logger = logging.getLogger("ray.serve")


def join_url(root_url: str, route_prefix: str) -> str:
    """The OpenAI base URL under a Serve root URL and route prefix."""
    prefix = route_prefix.strip("/")
    return root_url.rstrip("/") + (f"/{prefix}" if prefix else "") + "/v1"


def openai_base_url(app_name: str) -> str | None:
    """This app's OpenAI base URL from the Serve controller (blocking), or None if unknown."""
    try:
        # Serve's client: the controller's root URL and the app's route prefix. Not part of
        # Serve's documented API, hence the fallback to no URL.
        from ray.serve.context import _get_global_client

        client = _get_global_client()
        prefix = client.get_serve_details()["applications"][app_name]["route_prefix"]
        root = client.root_url
    except Exception as exc:
        logger.debug("no serving URL: %r", exc)
        return None
    return join_url(root, prefix) if root and prefix is not None else None


async def announce_when_ready(readiness: Readiness, app_name: str, model: str,
                              period_s: float = 1.0) -> str | None:
    """Wait until a model replica can serve, log where the API is, return that URL."""
    while not (verdict := await readiness.check()).ready:
        await asyncio.sleep(period_s)
    url = await asyncio.to_thread(openai_base_url, app_name)
    logger.info("OpenAI API ready at %s (model %s, %d model replica(s) running)",
                url or f"the Serve HTTP proxy under app {app_name!r}'s route prefix",
                model, verdict.running)
    return url
