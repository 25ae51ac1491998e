"""Start-up is visible: the engine's and the replica's INFO lines reach Ray Serve's replica log
files and the worker's stderr (which Ray streams to the console of `serve run`), and the
ingress says which URL serves the OpenAI API."""

from __future__ import annotations

import glob
import logging
import os

import pytest

from deployments.serve_logging import ToServeLogger, wire_serve_logging


def ray_logs_dir() -> str:
    import ray

    return ray._private.worker.global_worker.node.get_logs_dir_path()


def read(pattern: str) -> str:
    paths = glob.glob(os.path.join(ray_logs_dir(), pattern))
    assert paths, f"no log file matches {pattern}"
    text = ""
    for path in paths:
        with open(path, errors="replace") as f:
            text += f.read()
    return text


# What each LLMReplica logs while it starts, and the module that logs it.
REPLICA_LINES = {
    "deployments.replica": [
        "starting on CPU only",
        "memory: host on cpu",
        "ready in",
        "serving tiny-llama, context 512 tokens",
    ],
    "deployments.engine.paged.engine": [
        "weights: ",
        "PagedEngine ready",
        "KV pages of",
        "decode CUDA graphs off: no GPU",
    ],
}


@pytest.mark.parametrize("module", sorted(REPLICA_LINES))
def test_start_up_lines_reach_serves_replica_log(llm_url, module):
    text = read("serve/replica_llm_LLMReplica_*.log")
    for line in REPLICA_LINES[module]:
        assert line in text, f"{line!r} ({module}) not in the replica logs"


def test_start_up_lines_reach_the_console_stream(llm_url):
    """Serve's stream handler writes to the worker's stderr, which `serve run` prints."""
    text = read("worker-*.err")
    assert "PagedEngine ready" in text and "weights: " in text


def test_the_ingress_says_which_url_serves_the_openai_api(llm_url):
    text = read("serve/replica_llm_OpenAIIngress_*.log")
    assert f"OpenAI API ready at {llm_url}/v1 (model tiny-llama" in text


def test_wiring_is_idempotent_and_follows_serves_level():
    serve_logger, package = logging.getLogger("ray.serve"), logging.getLogger("deployments")
    saved = serve_logger.level, package.level, package.propagate, list(package.handlers)
    try:
        wire_serve_logging()  # pytest's process is no Serve replica: left alone
        assert not any(isinstance(h, ToServeLogger) for h in package.handlers)
        serve_logger.setLevel(logging.WARNING)
        wire_serve_logging(anywhere=True)
        wire_serve_logging(anywhere=True)
        assert sum(isinstance(h, ToServeLogger) for h in package.handlers) == 1
        assert package.level == logging.WARNING and not package.propagate
    finally:  # this process is pytest's, not a replica's: put its logging back
        serve_logger.level, package.level, package.propagate = saved[:3]
        package.handlers[:] = saved[3]


def test_direct_ingress_urls_come_from_the_apps_target_groups():
    """Under direct ingress Serve's target groups name each ingress replica's own port; the
    proxies' groups (no app) and other apps' are not ours; a loopback proxy means loopback
    replicas."""
    from deployments.announce import direct_urls

    details = {
        "target_groups": [
            {"app_name": "", "protocol": "HTTP", "targets": [{"ip": "10.0.0.1", "port": 8000}]},
            {
                "app_name": "llm",
                "protocol": "HTTP",
                "targets": [{"ip": "10.0.0.2", "port": 30001}, {"ip": "10.0.0.1", "port": 30000}],
            },
            {"app_name": "llm", "protocol": "gRPC", "targets": [{"ip": "10.0.0.1", "port": 40000}]},
            {"app_name": "other", "protocol": "HTTP", "targets": [{"ip": "10.0.0.3", "port": 1}]},
        ]
    }
    assert direct_urls(details, "llm", "/") == [
        "http://10.0.0.1:30000/v1",
        "http://10.0.0.2:30001/v1",
    ]
    assert direct_urls(details, "llm", "/api", "127.0.0.1") == [
        "http://127.0.0.1:30000/api/v1",
        "http://127.0.0.1:30001/api/v1",
    ]
    assert direct_urls({"target_groups": details["target_groups"][:1]}, "llm", "/") == []
