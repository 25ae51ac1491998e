"""Every Serve config in configs/ validates against our args model and Serve's schema."""

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from deployments.app import ROUTER_CLASS, build_app
from deployments.config import parse_app_args

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_the_expected_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {
        "local.yaml",
        "gh200-llama-3.1-70b.yaml",
        "gb200-llama-4-scout.yaml",
        "h100-llama-3.1-8b.yaml",
    } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_validates_and_builds(path):
    raw = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(raw)  # Serve's own schema
    for app in raw["applications"]:
        assert app["import_path"] == "deployments.app:build_app"
        args = parse_app_args(app.get("args"))  # ours
        build_app(args)  # deployment options are valid for Serve
        overrides = {d["name"]: d for d in app.get("deployments", [])}
        router = overrides["LLMReplica"]["request_router_config"]
        assert router["request_router_class"] == ROUTER_CLASS
        assert router["request_routing_stats_period_s"] <= 2  # stickiness lags one period


def test_real_node_configs_pin_one_replica_per_node_or_gpu():
    for path in CONFIGS:
        if path.name == "local.yaml":
            continue
        args = parse_app_args(yaml.safe_load(path.read_text())["applications"][0]["args"])
        assert args.replica.num_gpus == 1 and args.memory.mode == "managed"
        assert args.replica.max_replicas_per_node is not None


def test_local_config_is_the_cpu_demo_on_loopback():
    raw = yaml.safe_load((CONFIGS[0].parent / "local.yaml").read_text())
    assert raw["http_options"] == {"host": "127.0.0.1", "port": 8000}
    app = raw["applications"][0]
    assert app["name"] == "llm"
    args = parse_app_args(app["args"])
    assert args.model.model_id == "builtin:tiny-llama" and args.replica.num_gpus == 0
    assert args.replica.num_replicas == 2
    # A dozen short conversations (~300 tokens each) fit in each replica without eviction.
    assert args.kv_cache.budget_bytes >= 12 * 300 * 2048
