"""Polling for tests that wait on a live service: one `wait_for` shared by the Serve tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout_s: float, what: str) -> T:
    """The first truthy value of `predicate()`, polled every 0.25 s; TimeoutError(`what`)
    after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise TimeoutError(what)
