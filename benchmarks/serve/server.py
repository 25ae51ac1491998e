"""`serve run` of a config as a subprocess: its own local Ray, a free port, readiness, stop.

The config is copied with its HTTP port replaced by a free one on 127.0.0.1; `serve run` gets
``RAY_ADDRESS=local`` (a private Ray instance, never an existing cluster) and this checkout at
the front of PYTHONPATH. With `direct`, Ray Serve's direct ingress is on
(`deployments.direct_ingress`): each OpenAIIngress replica also answers HTTP on its own port
from a free range, found by `direct_urls` once the app is ready, so a client can skip Serve's
proxy. It runs in its own process group, which `stop` ends (SIGTERM, then
SIGKILL): no other process is touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from deployments.direct_ingress import direct_ingress_env
from deployments.proxy_middleware import PROXY_ENV

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_range(count: int, start: int = 30000, stop: int = 31000) -> int:
    """The first port of `count` consecutive ports in [start, stop) that are all free now."""
    for base in range(start, stop - count, count):
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + count):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no {count} consecutive free ports in [{start}, {stop})")


def serve_binary() -> str:
    """`serve` beside this Python (a venv), else the one on PATH (the GPU machine's bundle)."""
    beside = Path(sys.executable).with_name("serve")
    found = str(beside) if beside.exists() else shutil.which("serve")
    if not found:
        raise FileNotFoundError("no `serve` executable beside this Python or on PATH")
    return found


def child_env() -> dict[str, str]:
    """This environment with the checkout first on PYTHONPATH, usage stats off."""
    paths = [
        str(ROOT),
        *[
            p
            for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
            if p and Path(p).resolve() != ROOT
        ],
    ]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "RAY_USAGE_STATS_ENABLED": "0"}


class Server:
    """One `serve run` of `config` (a path); `url` once started."""

    def __init__(self, config: Path, log: Path, direct: bool = False) -> None:
        data = yaml.safe_load(config.read_text())
        port = free_port()
        ingress = data["applications"][0]["args"].get("ingress", {}).get("num_replicas", 1)
        self._direct_ports = range(0)
        env = {**PROXY_ENV, **child_env(), "RAY_ADDRESS": "local"}  # the proxy as shipped
        if direct:  # room for a replacement replica or two beside the running ones
            base = free_port_range(ingress + 2)
            self._direct_ports = range(base, base + ingress + 2)
            env.update(direct_ingress_env(self._direct_ports))
        data.setdefault("http_options", {}).update(host="127.0.0.1", port=port)
        copy = Path(tempfile.mkdtemp(prefix="serve-bench-")) / config.name
        copy.write_text(yaml.safe_dump(data))
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.model = data["applications"][0]["args"]["model"]["served_model_name"]
        self.proc = subprocess.Popen(
            [serve_binary(), "run", str(copy)],
            cwd=ROOT,
            env=env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout_s: float) -> list[dict[str, Any]]:
        """Wait until the model answers /v1/models and /admin/replicas lists a replica."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"`serve run` exited with {self.proc.returncode}:\n" + self.log_tail()
                )
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=5).status_code == 200:
                    rows = self.admin()
                    if rows:
                        return rows
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1)
        raise TimeoutError(f"{self.url} not ready in {timeout_s:.0f} s:\n" + self.log_tail())

    def direct_urls(self) -> list[str]:
        """The URLs of the ingress replicas' own HTTP servers (direct ingress), each answering
        /ready; empty without direct ingress."""
        urls = []
        for port in self._direct_ports:
            url = f"http://127.0.0.1:{port}"
            try:
                if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                    urls.append(url)
            except httpx.HTTPError:
                pass
        return urls

    def admin(self) -> list[dict[str, Any]]:
        """GET /admin/replicas, each row's resident users given as a count."""
        rows = httpx.get(f"{self.url}/admin/replicas", timeout=30).json()
        return [{**r, "resident_users": len(r.get("resident_users") or [])} for r in rows]

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM to the process group (`serve run` shuts Serve and its Ray down), then
        SIGKILL to whatever of the group is left after a grace period."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 60
        while group_alive(self.proc.pid) and time.monotonic() < deadline:
            self.proc.poll()  # reap the leader so the group can empty
            time.sleep(0.5)
        if group_alive(self.proc.pid):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
