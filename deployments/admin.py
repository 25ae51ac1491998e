"""`/admin/replicas`: every model replica's row, from those that answer in time.

One replica that does not answer (frozen, overloaded, dying) must not cost the others' rows:
each replica's answer is awaited on its own, up to one shared timeout; the rows that came are
listed by replica id, and the replicas that did not answer are counted (the route sends the
count as `X-Replicas-Unresponsive`; Serve's per-replica results carry no id to name them by).
Never imports torch or rmm.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

logger = logging.getLogger("ray.serve")


UNRESPONSIVE_HEADER = "X-Replicas-Unresponsive"


async def replica_rows(
    handle: Any, method: str, timeout_s: float
) -> tuple[list[dict[str, Any]], int]:
    """Call `method` on every replica behind `handle`: the answers (rows, by replica id) and
    how many replicas failed or did not answer within `timeout_s`."""
    response = handle.broadcast(method)
    # Serve 2.60's broadcast response gathers every replica under one timeout, losing all rows
    # when one replica hangs; its per-replica results are awaited one by one instead.
    fetch = getattr(response, "_fetch_replica_results_async", None)
    if fetch is None:
        results = await response.results_async(timeout_s=timeout_s, return_exceptions=True)
        return _rows(results, 0)
    try:
        per_replica = await asyncio.wait_for(fetch(), timeout_s)
    except asyncio.TimeoutError:
        return [], 0
    tasks = [asyncio.ensure_future(result.get_async()) for result in per_replica]
    if not tasks:
        return [], 0
    done, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in pending:
        task.cancel()
    answers = [t.result() if t.exception() is None else t.exception() for t in done]
    return _rows(answers, len(pending))


def _rows(answers: list[Any], silent: int) -> tuple[list[dict[str, Any]], int]:
    rows = sorted((a for a in answers if isinstance(a, dict)), key=lambda r: r["replica_id"])
    missing = len(answers) - len(rows) + silent
    if missing:
        logger.warning(
            "%d model replica(s) gave no /admin/replicas row (%d failed, %d silent)",
            missing,
            missing - silent,
            silent,
        )
    return rows, missing
