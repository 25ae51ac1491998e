"""Send this package's log lines where Ray Serve sends its own.

Every module logs to ``logging.getLogger(__name__)`` (``deployments.engine.paged.engine``,
...). In a Serve replica only the ``ray.serve`` logger has handlers: the replica's log file
under the session's ``logs/serve/`` and stderr, which Ray streams to the console of
`serve run`. Without wiring, the ``deployments.*`` INFO lines (weights loaded, KV pages) went
nowhere. `wire_serve_logging()` gives the ``deployments`` logger one handler that hands each
record to ``ray.serve``'s handlers as they are at that moment (Serve may replace them when a
deployment's logging_config changes), at ``ray.serve``'s level. Call it first thing in every
deployment's constructor; calling it again changes nothing. Outside a Serve replica (a test
constructing a deployment class in its own process) it leaves logging alone.
"""

from __future__ import annotations

import logging

PACKAGE_LOGGER = "deployments"
SERVE_LOGGER = "ray.serve"


class ToServeLogger(logging.Handler):
    """Forwards records to the ``ray.serve`` logger's current handlers."""

    def emit(self, record: logging.LogRecord) -> None:
        serve_logger = logging.getLogger(SERVE_LOGGER)
        if serve_logger.isEnabledFor(record.levelno):
            serve_logger.handle(record)


def in_serve_replica() -> bool:
    """Whether this code runs inside a Serve replica."""
    from ray import serve

    try:
        serve.get_replica_context()
    except Exception:  # RayServeException outside a replica
        return False
    return True


def wire_serve_logging(name: str = PACKAGE_LOGGER, anywhere: bool = False) -> logging.Logger:
    """Route logger `name` (and its children) through Ray Serve's logger; return it.

    Only inside a Serve replica, unless `anywhere`."""
    package = logging.getLogger(name)
    if not (anywhere or in_serve_replica()):
        return package
    if not any(isinstance(h, ToServeLogger) for h in package.handlers):
        package.addHandler(ToServeLogger())
    package.setLevel(logging.getLogger(SERVE_LOGGER).getEffectiveLevel())
    package.propagate = False  # not twice through the root logger's handlers as well
    return package
