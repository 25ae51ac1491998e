"""The capacity planner: published figures, placement arithmetic, the CLI, one memory model."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from deployments.capacity import DEFAULT_HEADROOM_BYTES
from deployments.config import GiB, MemoryConfig
from deployments.memory import plan_gpu_memory
from deployments.plan.cli import main
from deployments.plan.models import PRESETS, resolve_model
from deployments.plan.nodes import NODES, resolve_node
from deployments.plan.planner import plan
from deployments.plan.report import render, to_dict
from deployments.platform import PlatformInfo

GB = 10**9
ROOT = Path(__file__).resolve().parents[2]
COHERENT, DISCRETE = ([n for n in NODES if NODES[n].coherent is c] for c in (True, False))


def plan_of(model="llama-3.1-70b", node="gh200-96gb", context=131072, **kw):
    return plan(resolve_model(model), resolve_node(node), context, **kw)


class TestPublishedFigures:
    def test_llama_70b_on_gh200_96gb(self):
        # NVIDIA's GH200 blog: ~140 GB of bf16 weights on a 96 GB GPU, 40 GB KV per 128k user.
        p = plan_of()
        assert p.weight_bytes == pytest.approx(141 * GB, rel=0.005)
        assert p.weights_beyond_hbm_bytes == pytest.approx(45 * GB, abs=0.5 * GB)
        assert p.kv_bytes_per_user == 40 * GiB  # 320 KiB/token x 131072 tokens, binary
        doc = to_dict(p)
        assert doc["weights"]["beyond_hbm_bytes"] == p.weights_beyond_hbm_bytes
        assert doc["kv"]["bytes_per_user"] == 40 * GiB

    def test_llama_8b_matches_the_measured_benchmark_model(self):
        # benchmarks/results/engine-NVIDIA-H200.json: weights_bytes of the 8B architecture.
        assert resolve_model("llama-3.1-8b").num_parameters * 2 == 16_060_522_496

    def test_llama_4_scout(self):
        scout = resolve_model("llama-4-scout-17b-16e")
        assert scout.num_parameters * 2 == pytest.approx(218 * GB, rel=0.01)  # "109B", bf16
        assert scout.active_parameters == pytest.approx(17e9, rel=0.02)  # "17B active"
        assert (scout.num_experts, scout.experts_per_token) == (16, 1)

    @pytest.mark.parametrize("name", list(PRESETS))
    def test_counts_equal_transformers_on_the_meta_device(self, name):
        torch = pytest.importorskip("torch")
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.models.llama4 import Llama4ForConditionalGeneration

        raw = json.loads(json.dumps(PRESETS[name]))
        config = AutoConfig.for_model(raw.pop("model_type"), **raw)
        with torch.device("meta"):
            model = (
                Llama4ForConditionalGeneration(config)
                if name.startswith("llama-4")
                else AutoModelForCausalLM.from_config(config)
            )
        assert resolve_model(name).num_parameters == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("model_type", "arch", "extra"),
    [
        ("llama", "LlamaForCausalLM", {}),
        ("mistral", "MistralForCausalLM", {}),
        ("llama", "LlamaForCausalLM", {"attention_bias": True, "tie_word_embeddings": True}),
        ("qwen2", "Qwen2ForCausalLM", {}),
        ("qwen3", "Qwen3ForCausalLM", {}),
    ],
)
def test_model_spec_counts_parameters_as_transformers_does(model_type, arch, extra):
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM

    from deployments.model_spec import ModelSpec

    config = AutoConfig.for_model(
        model_type,
        architectures=[arch],
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=1000,
        **extra,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    expected = sum(p.numel() for p in model.parameters())  # tied weights counted once
    assert ModelSpec.from_hf_config(config).num_parameters() == expected


class TestPlacement:
    def test_weights_fill_hbm_less_headroom_then_host(self):
        p = plan_of()
        assert p.weights_in("hbm") == 96 * GB - DEFAULT_HEADROOM_BYTES
        assert p.weights_in("host") == p.weight_bytes - p.weights_in("hbm")
        assert p.kv_room == {"hbm": 0, "host": 432 * GB - p.weights_in("host")}

    def test_users_that_fit(self):
        p = plan_of(host_budget=340 * GiB)  # as configs/gh200-llama-3.1-70b.yaml
        room = 96 * GB - 2 * GiB + 340 * GiB - p.weight_bytes
        assert sum(p.kv_room.values()) == room
        assert p.users_fit == room // (40 * GiB) == 7
        assert p.users_fit_in_kv_budget == int(0.8 * room) // (40 * GiB)
        assert plan_of(host_budget=340 * GiB, kv_budget=200 * GiB).users_fit_in_kv_budget == 5
        short = plan_of(context=8192)
        assert short.users_fit == sum(short.kv_room.values()) // (8192 * 320 * 1024)
        beyond = plan_of(users=9)  # default budgets: 8 fit
        assert beyond.users_fit == 8 and not beyond.n_users.fits and not to_dict(beyond)["fits"]

    @pytest.mark.parametrize("node", DISCRETE)
    @pytest.mark.parametrize("model", list(PRESETS))
    def test_discrete_nodes_never_spill_to_host(self, node, model):
        p = plan_of(model, node, 8192)
        assert p.weights_in("host") == 0 and p.kv_room["host"] == 0
        assert p.one_user.kv_bytes["host"] == 0 and p.n_users.kv_bytes["host"] == 0
        hbm_room = NODES[node].hbm_bytes - DEFAULT_HEADROOM_BYTES
        assert p.weights_fit == (p.weight_bytes <= hbm_room)
        assert p.unplaced_weight_bytes == max(0, p.weight_bytes - hbm_room)

    def test_70b_does_not_fit_an_h100_and_says_so(self):
        p = plan_of(node="h100-sxm")
        assert not p.weights_fit and p.users_fit == 0 and not p.one_user.fits
        doc = to_dict(p)
        assert doc["fits"] is False and doc["decode_floor"]["one_user"]["step_seconds"] is None
        assert "do not fit" in render(p)


class TestDecodeFloor:
    def test_dense_floor_is_bytes_over_bandwidth_per_tier(self):
        p = plan_of()
        c2c = 450 * GB  # lower than LPDDR5X's 500 GB/s
        idle = resolve_model("llama-3.1-70b").idle_params * 2  # embedding table: spilled, unread
        expected = p.weights_in("hbm") / 4e12 + (p.weights_in("host") - idle + 40 * GiB) / c2c
        assert p.one_user.step_seconds == pytest.approx(expected)
        many = plan_of(users=4)
        assert many.n_users.read_bytes["host"] - p.one_user.read_bytes["host"] == 3 * 40 * GiB

    def test_moe_reads_only_the_chosen_experts_share(self):
        p = plan_of("llama-4-scout-17b-16e", "gb200", 8192, users=8)
        scout = p.model
        assert p.one_user.expert_share == 1 / 16
        assert p.n_users.expert_share == pytest.approx(1 - (15 / 16) ** 8)
        one_user_reads = sum(p.one_user.read_bytes.values())
        expected = (scout.read_params + scout.expert_params / 16) * 2 + p.kv_bytes_per_user
        assert one_user_reads == pytest.approx(expected, rel=1e-6)
        assert to_dict(p)["model"]["moe"]["routed_experts"] == 16

    def test_gb200_replica_gets_half_the_shared_host_memory_and_link(self):
        gb200 = resolve_node("gb200")
        assert gb200.replicas_per_node == 2 and gb200.host_bytes == 240 * GB
        assert gb200.host_read_bandwidth == 225 * GB


@pytest.mark.parametrize("name", list(PRESETS))
def test_config_path_equals_the_preset(tmp_path, name):
    (tmp_path / "config.json").write_text(json.dumps(PRESETS[name]))
    preset = resolve_model(name)
    for path in (tmp_path, tmp_path / "config.json"):
        from_path = resolve_model(str(path))
        assert from_path.source == str(path)
        assert from_path.__dict__ | {"name": name, "source": "preset"} == preset.__dict__


PLAN_SCHEMA = {
    "type": "object",
    "required": ["schema", "model", "node", "memory", "weights", "kv", "decode_floor", "fits"],
    "$defs": {
        "tiers": {
            "type": "object",
            "required": ["hbm", "host"],
            "additionalProperties": False,
            "properties": {
                "hbm": {"type": "number", "minimum": 0},
                "host": {"type": "number", "minimum": 0},
            },
        },
        "floor": {
            "type": "object",
            "required": [
                "users",
                "fits",
                "kv_bytes",
                "read_bytes",
                "seconds",
                "step_seconds",
                "tokens_per_s_per_user",
                "tokens_per_s",
                "expert_share_read",
            ],
            "properties": {
                "users": {"type": "integer", "minimum": 1},
                "fits": {"type": "boolean"},
                "kv_bytes": {"$ref": "#/$defs/tiers"},
                "read_bytes": {"$ref": "#/$defs/tiers"},
                "seconds": {"$ref": "#/$defs/tiers"},
                "step_seconds": {"type": ["number", "null"]},
                "tokens_per_s": {"type": ["number", "null"]},
            },
        },
    },
    "properties": {
        "schema": {"const": "grace-serve/plan/v1"},
        "model": {
            "type": "object",
            "required": [
                "name",
                "parameters",
                "active_parameters",
                "weight_bytes",
                "bytes_per_parameter",
                "max_context_tokens",
                "moe",
                "kv",
            ],
        },
        "node": {
            "type": "object",
            "required": [
                "name",
                "coherent",
                "hbm_bytes",
                "hbm_bandwidth",
                "host_bytes",
                "host_read_bandwidth",
            ],
        },
        "memory": {
            "type": "object",
            "required": ["limit_bytes", "headroom_bytes", "room_bytes"],
            "properties": {"room_bytes": {"$ref": "#/$defs/tiers"}},
        },
        "weights": {
            "type": "object",
            "required": [
                "bytes",
                "beyond_hbm_bytes",
                "by_tier",
                "by_group",
                "fits",
                "unplaced_bytes",
            ],
            "properties": {
                "by_tier": {"$ref": "#/$defs/tiers"},
                "by_group": {
                    "type": "object",
                    "required": ["read", "experts", "idle"],
                    "additionalProperties": {"$ref": "#/$defs/tiers"},
                },
            },
        },
        "kv": {
            "type": "object",
            "required": [
                "context_tokens",
                "bytes_per_user",
                "room_bytes",
                "users_fit",
                "budget_bytes",
                "users_fit_in_budget",
            ],
            "properties": {"users_fit": {"type": "integer", "minimum": 0}},
        },
        "decode_floor": {
            "type": "object",
            "required": ["one_user", "users"],
            "additionalProperties": {"$ref": "#/$defs/floor"},
        },
        "fits": {"type": "boolean"},
    },
}


class TestCli:
    @pytest.mark.parametrize(
        "args",
        [
            ["--model", "llama-3.1-70b", "--node", "gh200-96gb", "--context", "131072"],
            [
                "--model",
                "llama-4-scout-17b-16e",
                "--node",
                "gb200",
                "--context",
                "65536",
                "--users",
                "4",
                "--host-budget",
                "200GiB",
            ],
            ["--model", "llama-3.1-70b", "--node", "h200", "--context", "4096"],
        ],
    )
    def test_json_output_follows_the_schema(self, capsys, args):
        status = main([*args, "--json"])
        doc = json.loads(capsys.readouterr().out)
        jsonschema.validate(doc, PLAN_SCHEMA)
        assert status == (0 if doc["fits"] else 1)

    def test_table_names_the_done_when_figures(self, capsys):
        assert (
            main(["--model", "llama-3.1-70b", "--node", "gh200-96gb", "--context", "131072"]) == 0
        )
        out = capsys.readouterr().out
        assert "141.1 GB" in out and "45.1 GB beyond the 96.0 GB of HBM" in out
        assert "40.0 GiB" in out

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["--model", "llama-9", "--node", "gh200-96gb"], "unknown model 'llama-9'"),
            (["--model", "llama-3.1-8b", "--node", "tpu"], "unknown node 'tpu'"),
            (
                ["--model", "llama-3.1-70b", "--node", "h200", "--context", "200000"],
                "exceeds llama-3.1-70b's maximum of 131072",
            ),
            (["--model", "llama-3.1-8b", "--node", "h200", "--users", "0"], "must be positive"),
            (
                ["--model", "llama-3.1-8b", "--node", "gb200", "--host-budget", "340GiB"],
                "exceeds a gb200 replica's 240.0 GB of host memory",
            ),
        ],
    )
    def test_errors_are_clear_and_exit_2(self, capsys, args, message):
        if "--context" not in args:
            args = [*args, "--context", "1024"]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err

    def test_missing_or_unreadable_config(self, capsys, tmp_path):
        (tmp_path / "config.json").write_text('{"hidden_size": 8}')
        rest = ["--node", "gh200-96gb", "--context", "1024"]
        assert main(["--model", str(tmp_path / "nope" / "config.json"), *rest]) == 2
        assert main(["--model", str(tmp_path), *rest]) == 2
        err = capsys.readouterr().err
        assert "no such config path" in err and "model_type" in err

    def test_bad_byte_size_is_a_usage_error(self, capsys):
        with pytest.raises(SystemExit) as exc:
            main(["--model", "m", "--node", "n", "--context", "1", "--host-budget", "lots"])
        assert exc.value.code == 2 and "not a byte size" in capsys.readouterr().err

    def test_runs_as_a_module_without_torch(self):
        code = (
            "import sys, runpy; sys.argv = ['plan', '--model', 'llama-3.1-70b', '--node', "
            "'gh200-96gb', '--context', '131072', '--json']\n"
            "try:\n    runpy.run_module('deployments.plan', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["kv"]["bytes_per_user"] == 40 * GiB


class TestOneMemoryModel:
    @pytest.mark.parametrize("budget", [None, 200 * GiB, 100 * GB])
    @pytest.mark.parametrize("name", COHERENT)
    def test_replica_and_planner_agree_on_a_coherent_nodes_capacity(self, name, budget):
        node = NODES[name]
        # A replica on this node, finding its share of the host memory available at start.
        host_total = node.host_bytes * node.replicas_per_node
        platform = PlatformInfo(
            "grace", name, node.hbm_bytes, host_total, node.host_bytes, True, True, True
        )
        replica = plan_gpu_memory(
            MemoryConfig(host_memory_budget_bytes=budget),
            platform,
            device_free_bytes=node.hbm_bytes,
        )
        planner = plan_of(node=name, context=1024, host_budget=budget)
        assert replica.limit_bytes == planner.memory.limit_bytes
        assert planner.memory.room_bytes == replica.limit_bytes - DEFAULT_HEADROOM_BYTES

    @pytest.mark.parametrize("name", DISCRETE)
    def test_and_on_a_discrete_gpus(self, name):
        node = NODES[name]
        platform = PlatformInfo(
            "discrete", name, node.hbm_bytes, 512 * GiB, 500 * GiB, False, False, True
        )
        replica = plan_gpu_memory(MemoryConfig(), platform, device_free_bytes=node.hbm_bytes)
        assert replica.limit_bytes == plan_of(node=name, context=1024).memory.room_bytes

    @pytest.mark.parametrize(
        ("module", "allowed"),
        [
            ("capacity", {"deployments.config"}),
            ("memory", {"deployments.config", "deployments.capacity", "deployments.platform"}),
        ],
    )
    def test_dependency_rule(self, module, allowed):
        tree = ast.parse((ROOT / "deployments" / f"{module}.py").read_text())
        ours = {
            node.module
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("deployments")
        }
        assert ours <= allowed  # memory: platform only for type hints (TYPE_CHECKING)


def test_readme_shows_the_planners_own_output():
    readme = (ROOT / "README.md").read_text()
    assert render(plan_of()) in readme
