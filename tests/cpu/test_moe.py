"""moe.py against Hugging Face's own gate and MoE modules, and its grouped experts against a loop.

Random float32 weights (no zeros); every architecture's gating: Qwen3-MoE (softmax top-k,
with and without `norm_topk_prob`), Mixtral (top-2 softmax, renormalised, float32 weights),
Llama 4 (top-1 sigmoid scaling the expert's input, plus a shared expert).
"""

from __future__ import annotations

import pytest
import torch
import transformers

from deployments.engine.paged.moe import (
    METHODS,
    experts_forward,
    grouped_mm_available,
    moe_mlp,
    route,
)
from deployments.engine.paged.weights import LayerWeights
from deployments.model_spec import MoESpec, llama4_moe, moe_from_hf_config

H, W, E, T = 64, 32, 8, 37  # hidden, expert width, experts, tokens


def qwen3_config(norm: bool, k: int = 3) -> transformers.Qwen3MoeConfig:
    return transformers.Qwen3MoeConfig(
        hidden_size=H,
        moe_intermediate_size=W,
        num_experts=E,
        num_experts_per_tok=k,
        norm_topk_prob=norm,
        num_hidden_layers=1,
    )


def mixtral_config() -> transformers.MixtralConfig:
    return transformers.MixtralConfig(
        hidden_size=H, intermediate_size=W, num_local_experts=E, num_hidden_layers=1
    )


def llama4_config(k: int = 1) -> transformers.Llama4TextConfig:
    return transformers.Llama4TextConfig(
        hidden_size=H,
        intermediate_size=W,
        intermediate_size_mlp=2 * W,
        num_local_experts=E,
        num_experts_per_tok=k,
        num_hidden_layers=1,
    )


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("norm", [True, False])
def test_qwen3_moe_routing_equals_hf_top_k_router(norm):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    config = qwen3_config(norm)
    gate = Qwen3MoeTopKRouter(config)
    gate.weight.data = randn(E, H, seed=1)
    h = randn(T, H, seed=2)
    logits, want_w, want_ids = gate(h)
    moe = moe_from_hf_config("qwen3_moe", config)
    weights, ids = route(logits, moe)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_w, rtol=0, atol=0)
    assert weights.dtype == want_w.dtype
    assert bool((weights.sum(-1) - 1).abs().max() < 1e-5) == norm


def test_mixtral_routing_equals_hf_top_k_router_in_float32():
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    config = mixtral_config()
    gate = MixtralTopKRouter(config).to(torch.bfloat16)
    gate.weight.data = randn(E, H, seed=3).bfloat16()
    logits, want_w, want_ids = gate(randn(T, H, seed=4).bfloat16())
    weights, ids = route(logits, moe_from_hf_config("mixtral", config))
    assert torch.equal(ids, want_ids)
    assert weights.dtype == want_w.dtype == torch.float32  # Mixtral keeps them in float32
    torch.testing.assert_close(weights, want_w, rtol=0, atol=0)


def test_llama4_routing_equals_hf_router_sigmoid_of_the_top_logit():
    from transformers.models.llama4.modeling_llama4 import Llama4Router

    config = llama4_config()
    router = Llama4Router(config)
    router.weight.data = randn(E, H, seed=5)
    scores, logits = router(randn(T, H, seed=6))
    weights, ids = route(logits, llama4_moe(config))
    assert ids.shape == (T, 1)
    want = torch.zeros(T, E).scatter_(1, ids, weights)
    torch.testing.assert_close(want, scores, rtol=0, atol=0)  # sigmoid(-inf) = 0 elsewhere


def loop_reference(h, gate_up, down, weights, ids, scale_input):
    """Each (token, choice) pair through its expert, one at a time."""
    out = torch.zeros_like(h)
    for t in range(h.shape[0]):
        for j in range(ids.shape[1]):
            e, w = int(ids[t, j]), weights[t, j]
            x = h[t] * w if scale_input else h[t]
            gate, up = (gate_up[e] @ x).chunk(2)
            y = down[e] @ (torch.nn.functional.silu(gate) * up)
            out[t] += y if scale_input else y * w
    return out


@pytest.mark.parametrize("scale_input", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_each_experts_method_equals_a_loop_over_pairs(scale_input, method):
    if method == "grouped" and not grouped_mm_available(torch.empty(1)):
        pytest.skip("this torch has no CPU grouped_mm")
    gate_up, down = randn(E, 2 * W, H, seed=7) / H**0.5, randn(E, H, W, seed=8) / W**0.5
    h = randn(T, H, seed=9)
    # Skewed picks: expert 0 never, expert 5 often, some tokens' choices in any order.
    g = torch.Generator().manual_seed(10)
    ids = torch.stack([torch.randperm(E - 1, generator=g)[:3] + 1 for _ in range(T)])
    ids[::3, 0] = 5
    ids[::3, 1] = torch.where(ids[::3, 1] == 5, 6, ids[::3, 1])
    ids[::3, 2] = torch.where(ids[::3, 2] == 5, 7, ids[::3, 2])
    weights = torch.rand(T, 3, generator=g) + 0.1
    got = experts_forward(h, gate_up, down, weights, ids, scale_input, method=method)
    want = loop_reference(h, gate_up, down, weights, ids, scale_input)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def moe_layer(**tensors: torch.Tensor) -> LayerWeights:
    empty = torch.empty(0)
    return LayerWeights(qkv=empty, o=empty, input_norm=empty, post_norm=empty, **tensors)


def randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.3


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("k", [1, 2])
def test_llama4_moe_mlp_equals_hf_llama4_text_moe(k, method):
    """Each method; with the per-pair products the shared expert's rows join the routed ones'."""
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    if method == "grouped" and not grouped_mm_available(torch.empty(1)):
        pytest.skip("this torch has no CPU grouped_mm")
    config = llama4_config(k)
    hf = Llama4TextMoe(config).eval()
    randomize(hf, seed=11)
    shared = hf.shared_expert
    layer = moe_layer(  # HF stores experts [E, H, 2W] and [E, W, H]: ours transposed
        experts_gate_up=hf.experts.gate_up_proj.data.transpose(1, 2).contiguous(),
        experts_down=hf.experts.down_proj.data.transpose(1, 2).contiguous(),
        router=hf.router.weight.data,
        shared_gate_up=torch.cat([shared.gate_proj.weight, shared.up_proj.weight]).data,
        shared_down=shared.down_proj.weight.data,
    )
    for tokens in (T, 1):  # one token: with "pairs", the shared expert rides in their launches
        h = randn(tokens, H, seed=12)
        with torch.no_grad():
            want, _ = hf(h[None])
        got = moe_mlp(h, layer, llama4_moe(config), False, method)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_softmax_moe_mlp_equals_hf_sparse_moe_block(arch):
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = qwen3_config(True) if arch == "qwen3_moe" else mixtral_config()
    block = (Qwen3MoeSparseMoeBlock if arch == "qwen3_moe" else MixtralSparseMoeBlock)(config)
    randomize(block.eval(), seed=13)
    layer = moe_layer(
        experts_gate_up=block.experts.gate_up_proj.data,
        experts_down=block.experts.down_proj.data,
        router=block.gate.weight.data,
    )
    h = randn(T, H, seed=14)
    with torch.no_grad():
        want = block(h[None])[0]
    moe = moe_from_hf_config(arch, config)
    torch.testing.assert_close(moe_mlp(h, layer, moe, False), want, rtol=1e-4, atol=1e-4)


def test_which_layers_are_moe_follows_each_config():
    qwen = transformers.Qwen3MoeConfig(
        num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3]
    )
    assert moe_from_hf_config("qwen3_moe", qwen).layers == {1, 5}
    assert moe_from_hf_config("mixtral", mixtral_config()).layers == {0}
    llama = transformers.Llama4TextConfig(num_hidden_layers=4, interleave_moe_layer_step=2)
    moe = llama4_moe(llama)
    assert moe.layers == {1, 3} and moe.gating == "sigmoid_top1"
    assert moe.shared_intermediate_size == llama.intermediate_size
    assert moe_from_hf_config("llama", qwen) is None
    assert isinstance(moe, MoESpec)


def test_llama4_checkpoint_names_fill_our_stacked_layout():
    """Llama 4's own tensor names (experts stacked [E, H, 2W] / [E, W, H]) copied by name into
    our layout (transposed views) give HF's Llama4TextMoe output."""
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    from deployments.engine.paged.moe_weights import moe_names, moe_target

    config = llama4_config()
    hf = Llama4TextMoe(config).eval()
    randomize(hf, seed=15)
    moe = llama4_moe(config)
    layer = moe_layer(
        experts_gate_up=torch.empty(E, 2 * W, H),
        experts_down=torch.empty(E, H, W),
        router=torch.empty(E, H),
        shared_gate_up=torch.empty(2 * W, H),
        shared_down=torch.empty(H, W),
    )
    names = set()
    for name, tensor in hf.state_dict().items():
        target = moe_target(layer, moe, f"mlp.{name}")
        assert target is not None and target.shape == tensor.shape, name
        target.copy_(tensor)
        names.add(f"mlp.{name}")
    assert names == set(moe_names(moe))
    h = randn(T, H, seed=16)
    with torch.no_grad():
        want, _ = hf(h[None])
    torch.testing.assert_close(moe_mlp(h, layer, moe, False), want, rtol=1e-4, atol=1e-4)


SYNCING_OPS = ("_local_scalar_dense", "nonzero", "bincount", "unique", "masked_select")


def test_the_moe_mlp_calls_no_op_that_reads_a_value_back_to_the_host():
    """On a GPU these ops wait for the device (and break CUDA-graph capture): none may run."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.__name__)
            return func(*args, **(kwargs or {}))

    config = qwen3_config(True)
    layer = moe_layer(
        experts_gate_up=randn(E, 2 * W, H, seed=17),
        experts_down=randn(E, H, W, seed=18),
        router=randn(E, H, seed=19),
    )
    h = randn(T, H, seed=20)
    with Record() as seen:
        moe_mlp(h, layer, moe_from_hf_config("qwen3_moe", config), False)
    assert any("sort" in op for op in seen.ops) and any("searchsorted" in op for op in seen.ops)
    assert not [op for op in seen.ops if op.split(".")[0] in SYNCING_OPS], seen.ops
    with Record() as probe:  # the recorder sees a host read when there is one
        h.sum().item()
    assert any(op.startswith("_local_scalar_dense") for op in probe.ops)
