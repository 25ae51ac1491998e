"""A second terminal reaches a running grace-serve: `examples/python_handle.py` runs in a
process of its own, against the shared test Ray (explicit address, token auth) and against
the launcher `make run` uses (a Ray head on fixed ports that a plain ray.init() finds)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from deployments.launch import serve_target
from deployments.local_ray import attach_env
from tests.cpu.conftest import SERVICE_ARGS, free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "python_handle.py"


def second_terminal(
    env: dict[str, str], *args: str, timeout_s: float = 180
) -> subprocess.CompletedProcess:
    """Run the handle example as a user would from another shell (not from the repo root)."""
    env = {**env, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(EXAMPLE), *args],
        env=env,
        cwd="/",
        text=True,
        capture_output=True,
        timeout=timeout_s,
    )


def without(env: dict[str, str], *names: str) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in names}


@pytest.fixture(scope="module")
def terminal_app(serve_url):
    """An app of its own on the shared Ray: the example's user must not touch `llm`'s caches."""
    from ray import serve

    from deployments.app import build_app

    args = {**SERVICE_ARGS, "replica": {**SERVICE_ARGS["replica"], "num_replicas": 1}}
    serve.run(build_app(args), name="terminal", route_prefix="/terminal")
    wait_healthy(f"{serve_url}/terminal")
    yield "terminal"
    serve.delete("terminal")


def test_the_example_attaches_by_address_with_token_auth(terminal_app):
    import ray

    address = ray.get_runtime_context().gcs_address
    env = {**without(dict(os.environ), "RAY_ADDRESS"), **attach_env(address)}
    result = second_terminal(env, terminal_app)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "'completion_tokens'" in result.stdout  # the reply's usage, printed by the example


def test_without_token_mode_the_cluster_refuses_the_driver(serve_url):
    """Why attach_env sets RAY_AUTH_MODE: an explicit address does not turn token auth on."""
    import ray

    env = {
        **without(dict(os.environ), "RAY_AUTH_MODE"),
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
    }
    result = second_terminal(env, timeout_s=120)
    assert result.returncode != 0
    assert "auth" in (result.stdout + result.stderr).lower()


@pytest.fixture()
def make_run(tmp_path_factory):
    """`python -m deployments.launch` as `make run` runs it: a 1-replica local config on free
    ports, Ray's temp dir private to the test (RAY_TMPDIR) so no other Ray is disturbed."""
    work = tmp_path_factory.mktemp("launch")
    config = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    config["http_options"]["port"] = free_port()
    config["applications"][0]["args"]["replica"]["num_replicas"] = 1
    (work / "local.yaml").write_text(yaml.safe_dump(config))
    ports = {
        "--ray-port": free_port(),
        "--dashboard-port": free_port(),
        "--metrics-port": free_port(),
    }
    ray_tmp = Path("/tmp") / f"gs-launch-{os.getpid()}"  # short: Ray's socket paths
    ray_tmp.mkdir(exist_ok=True)
    env = {
        **without(dict(os.environ), "RAY_ADDRESS", "RAY_AUTH_MODE"),
        "RAY_TMPDIR": str(ray_tmp),
        "PYTHONPATH": str(ROOT),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    console = open(work / "console.log", "w+")  # noqa: SIM115 (closed below)
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deployments.launch",
            str(work / "local.yaml"),
            *[str(x) for kv in ports.items() for x in kv],
        ],
        env=env,
        cwd=ROOT,
        stdout=console,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    yield launcher, work / "console.log", serve_target(config), ports, env
    if launcher.poll() is None:
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(120)
    console.close()
    shutil.rmtree(ray_tmp, ignore_errors=True)


def wait_for_line(log: Path, text: str, launcher: subprocess.Popen, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        output = log.read_text(errors="replace")
        if text in output:
            return output
        assert launcher.poll() is None, f"the launcher exited:\n{output[-3000:]}"
        time.sleep(1)
    raise TimeoutError(f"{text!r} never appeared:\n{log.read_text()[-3000:]}")


def test_make_run_serves_a_second_terminal_and_stops_what_it_started(make_run):
    launcher, log, target, ports, env = make_run
    console = wait_for_line(log, "grace-serve is ready", launcher, timeout_s=240)
    ray_address = f"127.0.0.1:{ports['--ray-port']}"
    assert f"Ray: {ray_address} (token authentication" in console
    assert f"the OpenAI API is at {target.url('/v1')}" in console
    assert "PagedEngine ready" in console  # replicas' start-up lines reach the console

    result = second_terminal(env)  # no RAY_ADDRESS, no RAY_AUTH_MODE: a plain ray.init()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "'completion_tokens'" in result.stdout

    # Metrics on the fixed port make run names (Ray exports every ~10 s).
    metrics_url = f"http://127.0.0.1:{ports['--metrics-port']}/metrics"
    assert eventually(lambda: b"ray_grace_serve_" in fetch(metrics_url), 60)

    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(120) == 143
    # The head it started is gone: nothing listens on its GCS port any more.
    assert eventually(lambda: not listening(ports["--ray-port"]), 30)


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def eventually(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(1)
    return False
