"""A local Ray head that a second terminal can attach to (`make run` starts one).

`serve run` alone starts a private Ray whose address nobody is told, so a second terminal could
not reach the app. Instead `start_head` runs ``ray start --head --block`` on fixed ports with
Ray's token authentication on. Ray's GCS and metrics ports listen on every interface (only the
dashboard stays on 127.0.0.1), which is why the token matters: the head and every driver that
attaches present the token in ``~/.ray/auth_token`` (generated on first use;
``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH`` supply another). `ray start` records the address
in Ray's temp dir, so on this machine a plain ``ray.init()`` (and so
``serve.get_app_handle``) finds the cluster and turns token auth on by itself; with an explicit
``RAY_ADDRESS`` a driver must also set ``RAY_AUTH_MODE=token`` (`attach_env`). Imports no Ray:
it drives Ray's command line.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from deployments.proxy_middleware import PROXY_ENV

STARTED_MARKER = "Ray runtime started"
TOKEN_PATH = Path.home() / ".ray" / "auth_token"


@dataclass(frozen=True)
class HeadPorts:
    """The local head's ports; `host` is the address it advertises and drivers use."""

    ray: int = 6379
    dashboard: int = 8265
    metrics: int = 8080
    host: str = "127.0.0.1"

    @property
    def address(self) -> str:
        """What RAY_ADDRESS (or ray.init(address=...)) takes."""
        return f"{self.host}:{self.ray}"


def ray_cli(name: str = "ray") -> str:
    """Ray's command-line tool (`ray`, `serve`) installed beside this interpreter."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def attach_env(address: str) -> dict[str, str]:
    """The environment a driver (a second terminal, `serve run`) needs to attach."""
    return {"RAY_ADDRESS": address, "RAY_AUTH_MODE": "token"}


def ensure_auth_token() -> None:
    """Create Ray's auth token (~/.ray/auth_token) unless one exists; never print it."""
    subprocess.run(
        [ray_cli(), "get-auth-token", "--generate"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def head_command(ports: HeadPorts, temp_dir: str | None = None) -> list[str]:
    command = [
        ray_cli(),
        "start",
        "--head",
        "--block",
        "--disable-usage-stats",
        f"--node-ip-address={ports.host}",
        f"--port={ports.ray}",
        f"--dashboard-host={ports.host}",
        f"--dashboard-port={ports.dashboard}",
        f"--metrics-export-port={ports.metrics}",
    ]
    return command + ([f"--temp-dir={temp_dir}"] if temp_dir else [])


def _listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def start_head(
    ports: HeadPorts, temp_dir: str | None = None, timeout_s: float = 120
) -> subprocess.Popen[bytes]:
    """Start the head in its own session (Ctrl-C in the terminal does not reach it); return
    once it has started. Raise RuntimeError with the tail of its output if it cannot."""
    ensure_auth_token()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    # Serve's proxy drops clients' control headers, answers in OpenAI's shape (as the image).
    for name, value in PROXY_ENV.items():
        env.setdefault(name, value)
    fd, log_path = tempfile.mkstemp(prefix="grace-serve-ray-head-", suffix=".log")
    with os.fdopen(fd, "wb") as log:  # the head keeps writing to its own copy
        head = subprocess.Popen(
            head_command(ports, temp_dir),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        _wait_started(head, ports, Path(log_path), timeout_s)
    except BaseException:
        stop_head(head)
        raise
    return head


def _wait_started(
    head: subprocess.Popen[bytes], ports: HeadPorts, log: Path, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        output = log.read_text(errors="replace")
        if head.poll() is not None:
            raise RuntimeError(f"`ray start` exited ({head.returncode}):\n{output[-3000:]}")
        if STARTED_MARKER in output and _listening(ports.host, ports.ray):
            return
        time.sleep(0.25)
    raise RuntimeError(f"Ray did not start within {timeout_s:.0f} s; see {log}")


def stop_head(head: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    """Stop the head `start_head` started (SIGTERM: it stops every Ray process it began)."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout_s)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()


def attach_instructions(address: str, python: str = ".venv/bin/python") -> str:
    """How a second terminal reaches this Ray, for the console."""
    return (
        f"Ray: {address} (token authentication; the token is in {TOKEN_PATH}).\n"
        "A second terminal on this machine attaches with a plain ray.init(), e.g.\n"
        f"    {python} examples/python_handle.py\n"
        "or, naming this cluster (when several Ray instances run here),\n"
        f"    RAY_ADDRESS={address} RAY_AUTH_MODE=token {python} examples/python_handle.py"
    )
