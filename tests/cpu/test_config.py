"""The app's arguments: defaults, byte sizes, and errors that name the offending field."""

import pytest

from deployments.config import AppArgs, ConfigError, GiB, MiB, parse_app_args


def test_defaults_serve_the_builtin_model():
    args = parse_app_args(None)
    assert args.model.model_id == "builtin:tiny-llama"
    assert args.model.name == "tiny-llama"
    assert args.replica.max_replicas_per_node == 1  # one replica per node by default


def test_byte_sizes_accept_units():
    args = parse_app_args({"memory": {"pool_size_bytes": "96GiB", "headroom_bytes": "512MiB"}})
    assert args.memory.pool_size_bytes == 96 * GiB
    assert args.memory.headroom_bytes == 512 * MiB


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"memory": {"pool_size_bytes": "lots"}}, "memory.pool_size_bytes"),
        ({"replica": {"num_replicas": 0}}, "replica.num_replicas"),
        ({"kv_cache": {"budget_fraction": 1.5}}, "kv_cache.budget_fraction"),
        ({"engine": {"engine_class": "not a path"}}, "engine.engine_class"),
        ({"model": {"dtype": "float8"}}, "model.dtype"),
        ({"router": {"stats_period_s": -1}}, "router.stats_period_s"),
        ({"memroy": {}}, "memroy"),  # a typo is an error, not silently ignored
    ],
)
def test_errors_name_the_field(raw, field):
    with pytest.raises(ConfigError) as err:
        parse_app_args(raw)
    assert field in str(err.value)


def test_gpu_memory_mode_needs_a_gpu():
    with pytest.raises(ConfigError, match=r"replica\.num_gpus"):
        parse_app_args({"memory": {"mode": "managed"}})


def test_args_that_are_not_a_mapping_are_refused():
    with pytest.raises(ConfigError, match="mapping"):
        parse_app_args(["model"])  # type: ignore[arg-type]


def test_served_model_name_defaults_to_last_path_part():
    args = AppArgs.model_validate({"model": {"model_id": "meta-llama/Llama-3.1-70B-Instruct"}})
    assert args.model.name == "Llama-3.1-70B-Instruct"
