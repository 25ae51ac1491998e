"""The pure layout step: placement and KV sizes decided from spec, args and free memory."""

import dataclasses
import subprocess
import sys

from deployments.config import AppArgs, GiB
from deployments.layout import MANAGED_HOST_TIER, PINNED_HOST_TIER, kv_budget_bytes, plan_layout
from deployments.model_spec import ModelSpec
from tests.cpu.test_memory import GH200, H100

SPEC = ModelSpec(
    "llama", 1000, 512, 1024, 8, 8, 2, 64, 1e-5, 4096, False, False, False, False, None
)


def args(**model):
    return AppArgs.model_validate(
        {"model": {"dtype": "bfloat16", **model}, "kv_cache": {"host_tier_bytes": "1MiB"}}
    )


def test_the_kv_budget_is_a_share_of_what_the_weights_leave():
    free = 4 * GiB
    layout = plan_layout(SPEC, args(), H100, free, device="cuda")
    room = free - SPEC.num_parameters() * 2
    assert layout.kv_budget_bytes == kv_budget_bytes(None, 0.8, room) == int(0.8 * room)
    assert layout.num_pages == layout.kv_budget_bytes // layout.page_bytes + 1
    assert layout.kv_bytes_per_token == SPEC.kv_bytes_per_token(2)
    assert layout.host_tier == PINNED_HOST_TIER and layout.decode_graphs


def test_layers_beyond_the_weight_budget_stream_or_stay_cold_on_grace():
    budget = SPEC.outer_parameters() * 2 + 5 * SPEC.layer_parameters() * 2
    discrete = plan_layout(SPEC, args(device_weight_budget_bytes=budget), H100, GiB, device="cuda")
    assert discrete.resident_layers == (0, 1) and discrete.streamed_layers == tuple(range(2, 8))
    assert not discrete.decode_graphs  # three of the five layers' room are stream buffers
    grace = plan_layout(
        SPEC, args(device_weight_budget_bytes=budget), GH200, GiB, device="cuda", managed=True
    )
    assert grace.advise and grace.cold_layers == tuple(range(5, 8)) and not grace.streamed_layers
    assert grace.host_tier == MANAGED_HOST_TIER and grace.decode_graphs
    unmanaged = plan_layout(SPEC, args(), dataclasses.replace(GH200), GiB, device="cuda")
    assert not unmanaged.advise


def test_the_layout_imports_no_torch():
    code = "import sys, deployments.layout; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
