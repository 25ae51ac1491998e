"""Models given by hub id resolve through an offline Hugging Face cache (issue 10, item 1).

The test builds a hub cache itself (models--grace-test--tiny-llama/snapshots/<commit>/...,
refs/<branch>) holding the built-in model's files: on `main` in one safetensors file, on
branch `sharded` split across three shards with an index. With HF_HUB_OFFLINE=1 the engines
load it by hub id and generate what they generate from the local directory, and `serve run`
serves it.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file, save_file

from deployments.config import AppArgs
from deployments.engine import GenerationRequest, SamplingParams
from deployments.engine.builtin import materialize
from deployments.engine.hf_engine import HFEngine
from deployments.engine.paged.engine import PagedEngine
from deployments.memory import setup_memory
from deployments.model_files import ModelNotFound, resolve_model_dir
from deployments.platform import detect_platform
from tests.cpu.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
HUB_ID = "grace-test/tiny-llama"
MAIN, SHARDED, BROKEN = "a" * 40, "b" * 40, "c" * 40  # commit hashes of three snapshots


def write_shards(source: Path, target: Path, count: int) -> None:
    """`source`'s model.safetensors as `count` shards and an index, as hub repos hold them."""
    tensors = load_file(source / "model.safetensors")
    names = sorted(tensors)
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
        "weight_map": {},
    }
    for k in range(count):
        file = f"model-{k + 1:05d}-of-{count:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[k::count]}
        save_file(part, target / file, metadata={"format": "pt"})
        index["weight_map"].update(dict.fromkeys(part, file))
    (target / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory) -> Path:
    """An HF_HOME whose hub cache holds the built-in model under HUB_ID."""
    local = materialize("builtin:tiny-llama")
    home = tmp_path_factory.mktemp("hf-home")
    repo = home / "hub" / "models--grace-test--tiny-llama"
    for commit, sharded in ((MAIN, False), (SHARDED, True), (BROKEN, True)):
        snapshot = repo / "snapshots" / commit
        shutil.copytree(
            local, snapshot, ignore=shutil.ignore_patterns("model.safetensors") if sharded else None
        )
        if sharded:
            write_shards(local, snapshot, 3)
    (repo / "snapshots" / BROKEN / "model-00002-of-00003.safetensors").unlink()
    (repo / "refs").mkdir()
    for ref, commit in (("main", MAIN), ("sharded", SHARDED), ("broken", BROKEN)):
        (repo / "refs" / ref).write_text(commit)
    return home


@pytest.fixture
def offline(hub_home, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HOME", str(hub_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return hub_home / "hub" / "models--grace-test--tiny-llama" / "snapshots"


def test_a_hub_id_resolves_from_the_offline_cache_by_revision_too(offline):
    assert resolve_model_dir(HUB_ID) == str(offline / MAIN)
    assert resolve_model_dir(HUB_ID, weights=False) == str(offline / MAIN)
    assert resolve_model_dir(HUB_ID, revision="sharded") == str(offline / SHARDED)
    assert resolve_model_dir(HUB_ID, revision=SHARDED) == str(offline / SHARDED)


def test_hf_hub_cache_is_read_when_resolving(offline, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache wins over HF_HOME
    with pytest.raises(ModelNotFound) as err:
        resolve_model_dir(HUB_ID)
    assert err.value.reason == "offline" and str(tmp_path) in str(err.value)


def test_a_model_missing_from_the_offline_cache_says_so_and_what_to_do(offline):
    with pytest.raises(ModelNotFound) as err:
        resolve_model_dir("grace-test/absent")
    message = str(err.value)
    assert err.value.reason == "offline" and "'grace-test/absent'" in message
    assert "HF_HUB_OFFLINE" in message and "hf download grace-test/absent" in message
    with pytest.raises(ModelNotFound, match=r"revision v9.*--revision v9"):
        resolve_model_dir(HUB_ID, revision="v9")


def test_a_snapshot_lacking_a_shard_is_incomplete(offline):
    with pytest.raises(ModelNotFound, match=r"lacks model-00002-of-00003\.safetensors") as err:
        resolve_model_dir(HUB_ID, revision="broken")
    assert err.value.reason == "incomplete"
    assert resolve_model_dir(HUB_ID, revision="broken", weights=False)  # tokenizer files: fine


def test_a_missing_local_directory_is_named(offline, tmp_path):
    with pytest.raises(ModelNotFound, match="no such directory") as err:
        resolve_model_dir(str(tmp_path / "nowhere"))
    assert err.value.reason == "local"
    assert resolve_model_dir(str(offline / MAIN)) == str(offline / MAIN)


@pytest.mark.parametrize(
    ("error", "reason", "says"),
    [
        ("GatedRepoError", "gated", "gated.*accept its terms.*HF_TOKEN"),
        ("RepositoryNotFoundError", "missing", "not on the Hugging Face hub.*HF_TOKEN"),
        ("RevisionNotFoundError", "revision", "no revision 'v2'"),
        ("HfHubHTTPError", "unauthorized", "refused access.*HTTP 401"),
    ],
)
def test_hub_refusals_become_clear_errors(monkeypatch, error, reason, says):
    import huggingface_hub
    from huggingface_hub import errors

    http = importlib.import_module(errors.Response.__module__.split(".")[0])
    response = errors.Response(401, request=http.Request("GET", "https://huggingface.co"))

    def refuse(*args, **kwargs):
        raise getattr(errors, error)("refused", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(ModelNotFound, match=says) as err:
        resolve_model_dir("grace-test/private", revision="v2")
    assert err.value.reason == reason and "grace-test/private" in str(err.value)


def engine_args(model_id: str, revision: str | None = None, **engine) -> AppArgs:
    return AppArgs.model_validate(
        {
            "model": {"model_id": model_id, "revision": revision, "dtype": "float32"},
            "memory": {"cpu_memory_budget_bytes": "256MiB"},
            "kv_cache": {"budget_bytes": 2**20},
            "engine": {"page_size": 4, "max_batched_tokens": 64, "cpu_threads": 1, **engine},
        }
    )


def greedy(engine, prompt: list[int]) -> list[int]:
    async def run():
        request = GenerationRequest("r", None, prompt, SamplingParams(12, temperature=0.0))
        return [t async for out in engine.generate(request) for t in out.token_ids]

    try:
        return asyncio.run(run())
    finally:
        asyncio.run(engine.shutdown())


def paged(args: AppArgs) -> PagedEngine:
    return PagedEngine(args, setup_memory(args.memory, detect_platform(use_gpu=False)))


def test_the_paged_engine_loads_by_hub_id_and_shards_with_progress(offline, caplog):
    prompt = list(range(5, 30))
    local = greedy(paged(engine_args(str(materialize("builtin:tiny-llama")))), prompt)
    assert greedy(paged(engine_args(HUB_ID)), prompt) == local
    with caplog.at_level(logging.INFO, logger="deployments.engine.paged.weights"):
        assert greedy(paged(engine_args(HUB_ID, "sharded")), prompt) == local
    lines = [r.getMessage() for r in caplog.records if "loaded shard" in r.getMessage()]
    progress = [SHARD_LINE.fullmatch(line) for line in lines]
    assert all(progress) and [m["shard"] for m in progress] == ["1", "2", "3"], lines
    assert [int(m["layers"]) for m in progress] == sorted(int(m["layers"]) for m in progress)
    assert progress[-1]["layers"] == "4" and progress[-1]["done"] == progress[-1]["total"]


SHARD_LINE = re.compile(
    r"loaded shard (?P<shard>\d)/3 \(model-0000\d-of-00003\.safetensors\): "
    r"(?P<done>[\d.]+ MB) of (?P<total>[\d.]+ MB), (?P<layers>\d) of 4 "
    r"layers, [\d.]+ s"
)


def test_the_generic_engine_loads_by_hub_id(offline):
    args = engine_args(HUB_ID, "sharded", engine_class="deployments.engine.hf_engine:HFEngine")
    engine = HFEngine(args, setup_memory(args.memory, detect_platform(use_gpu=False)))
    assert engine.model.config.num_hidden_layers == 4 and greedy(engine, [5, 6, 7])


SERVE_CONFIG = """
proxy_location: HeadOnly
http_options: {{host: 127.0.0.1, port: {port}}}
applications:
  - name: llm
    route_prefix: /
    import_path: deployments.app:build_app
    args:
      model: {{model_id: {model}, max_model_len: 256}}
      memory: {{cpu_memory_budget_bytes: 64MiB}}
      kv_cache: {{budget_bytes: 4MiB}}
      engine: {{default_max_tokens: 8, cpu_threads: 1}}
      replica: {{num_replicas: 1, num_cpus: 0, max_replicas_per_node: null}}
      ingress: {{num_cpus: 0}}
"""


def test_serve_run_serves_a_hub_id_from_the_offline_cache(hub_home, tmp_path):
    """issue 10's done-when: `serve run` of a config naming a hub id, with HF_HUB_OFFLINE=1."""
    port = free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(SERVE_CONFIG.format(port=port, model=HUB_ID))
    env = {
        **os.environ,
        "HF_HOME": str(hub_home),
        "HF_HUB_OFFLINE": "1",
        "RAY_ADDRESS": "local",
        "PYTHONPATH": str(REPO),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("HF_HUB_CACHE", None)
    log = (tmp_path / "serve.log").open("w")
    serve = subprocess.Popen(
        [str(Path(sys.executable).with_name("serve")), "run", str(config)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # its own process group, ended below
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while not healthy(url):
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        reply = httpx.post(
            f"{url}/v1/chat/completions",
            timeout=30,
            json={
                "model": "tiny-llama",
                "max_tokens": 4,
                "messages": [{"role": "user", "content": "Where does the model come from?"}],
            },
        )
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["usage"]["completion_tokens"] >= 1 and reply.headers["x-replica-id"]
    finally:
        stop_group(serve)
        log.close()


def healthy(url: str) -> bool:
    """Ready to serve: /ready (/health is only the ingress's liveness)."""
    try:
        return httpx.get(f"{url}/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def stop_group(process: subprocess.Popen) -> None:
    """Ctrl-C to `serve run`'s process group (it shuts Serve and its Ray down), then kill."""
    group = os.getpgid(process.pid)
    os.killpg(group, signal.SIGINT)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(group, signal.SIGKILL)
        process.wait(timeout=10)
