"""`make run`: serve a Serve config on a local Ray head that a second terminal can reach.

    python -m deployments.launch configs/local.yaml [--ray-port 6379] [--dashboard-port 8265]
                                                    [--metrics-port 8080]

Starts the head (deployments/local_ray.py) unless ``RAY_ADDRESS`` names a cluster already,
prints how to attach to it, runs ``serve run CONFIG`` against it (its console shows every
replica's start-up lines), prints the OpenAI base URL once ``/ready`` says a model replica
can serve, and on Ctrl-C stops `serve run` and then the head it started. Imports no Ray.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from deployments.local_ray import (
    HeadPorts,
    attach_env,
    attach_instructions,
    ray_cli,
    start_head,
    stop_head,
)


class ServeTarget(NamedTuple):
    """Where a Serve config's (first) application answers HTTP."""

    app: str
    root_url: str  # http://host:port
    route_prefix: str

    def url(self, path: str) -> str:
        return self.root_url + self.route_prefix.rstrip("/") + path


def serve_target(config: dict[str, Any]) -> ServeTarget:
    """The first application's URL from a Serve config (0.0.0.0 is reached as 127.0.0.1)."""
    http = config.get("http_options") or {}
    host = http.get("host", "127.0.0.1")
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    app = config["applications"][0]
    return ServeTarget(
        app["name"], f"http://{host}:{http.get('port', 8000)}", app.get("route_prefix", "/")
    )


def is_ready(target: ServeTarget, timeout_s: float = 5) -> bool:
    try:
        with urllib.request.urlopen(target.url("/ready"), timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_until_ready(
    target: ServeTarget, serve: subprocess.Popen[bytes], period_s: float = 1.0
) -> bool:
    """Poll /ready until a model replica can serve (True) or `serve run` exits (False)."""
    while serve.poll() is None:
        if is_ready(target):
            return True
        time.sleep(period_s)
    return False


def stop_serve(serve: subprocess.Popen[bytes], interrupted: bool, timeout_s: float = 60) -> None:
    """Stop `serve run` as Ctrl-C does (it deletes the app), then harder if it hangs.

    `interrupted`: the terminal's Ctrl-C reached it already; give it time before signalling."""
    for signum in ([] if not interrupted else [None]) + [signal.SIGINT, signal.SIGKILL]:
        if serve.poll() is not None:
            return
        if signum is not None:
            serve.send_signal(signum)
        try:
            serve.wait(timeout_s / 2)
        except subprocess.TimeoutExpired:
            continue


class Terminated(Exception):
    """SIGTERM reached the launcher (not the terminal's Ctrl-C)."""


def _terminated(signum: int, frame: Any) -> None:
    raise Terminated


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m deployments.launch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", type=Path, help="a Serve config, e.g. configs/local.yaml")
    defaults = HeadPorts()
    parser.add_argument("--ray-port", type=int, default=defaults.ray, help="Ray's GCS port")
    parser.add_argument("--dashboard-port", type=int, default=defaults.dashboard)
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=defaults.metrics,
        help="Ray's metrics export port: Prometheus text at /metrics",
    )
    parser.add_argument("--temp-dir", help="Ray's temp dir (default: Ray's, /tmp/ray)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    target = serve_target(yaml.safe_load(args.config.read_text()))
    ports = HeadPorts(args.ray_port, args.dashboard_port, args.metrics_port)
    signal.signal(signal.SIGTERM, _terminated)  # stop cleanly when terminated too
    head, address = None, os.environ.get("RAY_ADDRESS")
    serve, interrupted = None, False
    try:
        if not address:
            head, address = start_head(ports, args.temp_dir), ports.address
            print(
                f"Ray dashboard: http://{ports.host}:{ports.dashboard}   metrics: "
                f"http://{ports.host}:{ports.metrics}/metrics",
                flush=True,
            )
        # RAY_ADDRESS=local: a private Ray that no other terminal can reach, as `serve run` does.
        instructions = attach_instructions(address) if address != "local" else ""
        print(instructions, flush=True)
        env = {**os.environ, **(attach_env(address) if address != "local" else {})}
        serve = subprocess.Popen([ray_cli("serve"), "run", str(args.config)], env=env)
        if wait_until_ready(target, serve):
            print(
                f"\ngrace-serve is ready: the OpenAI API is at {target.url('/v1')}\n"
                f"{instructions}\n",
                flush=True,
            )
        return serve.wait()
    except KeyboardInterrupt:
        interrupted = True
        return 130
    except Terminated:
        return 143
    finally:
        if serve is not None:
            stop_serve(serve, interrupted)
        if head is not None:
            stop_head(head)


if __name__ == "__main__":
    sys.exit(main())
