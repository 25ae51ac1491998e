"""The paged engine runs Qwen3-MoE and Mixtral checkpoints exactly as transformers does.

Small random models (float32) saved with `save_pretrained` (per-expert tensor names, as
published checkpoints name them) and loaded by the engine: logits equal HF's forward in mixed
batches of histories and chunks, greedy outputs equal HF's generate across kept prefixes and
preemption, stacked (live-module) weight names load to the same logits, streamed MoE layers
(of a different size than the dense ones) compute exactly what resident ones do, and the
spec's parameter counts equal the model's.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from deployments.engine.paged.testing import logits_for
from deployments.engine.paged.weights import layer_numel, load_state
from deployments.model_spec import ModelSpec
from deployments.plan.models import footprint_from_config
from tests.cpu.test_paged_engine import generate, hf_greedy, hf_logits, make_engine, new_seq
from tests.cpu.tiny_checkpoints import save_tiny

SMALL = {
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "vocab_size": 448,
    "initializer_range": 0.2,
    "tie_word_embeddings": False,
}
ARCHS = {
    # Layer 1 dense (mlp_only_layers), layers 0 and 2 routed: 8 experts, 3 per token.
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {
            "head_dim": 16,
            "intermediate_size": 128,
            "moe_intermediate_size": 32,
            "num_experts": 8,
            "num_experts_per_tok": 3,
            "norm_topk_prob": True,
            "mlp_only_layers": [1],
        },
    ),
    # Every layer routed: 4 experts, top 2.
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {"intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2},
    ),
}


@pytest.fixture(scope="module", params=sorted(ARCHS))
def checkpoint(request, tmp_path_factory):
    config_name, model_name, extra = ARCHS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    return save_tiny(path, config_name, model_name, {**SMALL, **extra}, seed=3)


def page_bytes() -> int:
    """One 4-token float32 page of KV (both architectures: 2 KV heads of 16)."""
    return 2 * SMALL["num_hidden_layers"] * 4 * SMALL["num_key_value_heads"] * 16 * 4


def prompts(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 400, (n,), generator=g).tolist() for n in lengths]


def test_the_checkpoint_is_saved_per_expert_and_the_spec_counts_it(checkpoint):
    path, model = checkpoint
    from safetensors import safe_open

    with safe_open(f"{path}/model.safetensors", "pt") as f:
        names = list(f.keys())
    assert any(".experts.0." in n for n in names)  # the published (per-expert) spelling
    spec = ModelSpec.from_hf_config(model.config)
    assert spec.moe is not None and spec.num_parameters() == model.num_parameters()
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert spec.expert_parameters() == experts
    sizes = {layer_numel(spec, i) for i in range(spec.num_layers)}
    assert len(sizes) == (2 if model.config.model_type == "qwen3_moe" else 1)
    engine = make_engine(path)  # what the layout counts is what the engine allocates
    assert engine.runner.model.w.nbytes == spec.num_parameters() * 4
    assert [b.numel() for b in engine.runner.model.w.blocks] == [
        spec.layer_parameters(i) for i in range(spec.num_layers)
    ]
    asyncio.run(engine.shutdown())
    # The planner reads the same figures: experts apart, a step of n tokens reads 1-(1-k/E)^n.
    footprint = footprint_from_config("m", path, model.config)
    assert footprint.num_parameters == model.num_parameters()
    assert footprint.expert_params == experts
    k, e = spec.moe.experts_per_token, spec.moe.num_experts
    assert footprint.expert_share(1) == pytest.approx(k / e)


def test_mixed_batch_of_histories_and_chunks_matches_hf_forward(checkpoint):
    path, model = checkpoint
    engine = make_engine(path)
    seqs = [new_seq(engine, ids) for ids in prompts(5, (9, 23, 14, 31))]
    logits_for(engine, [(seqs[0], 8), (seqs[1], 11), (seqs[2], 6)])
    got = logits_for(engine, [(seqs[0], 1), (seqs[1], 12), (seqs[2], 5), (seqs[3], 17)])
    for seq, logits, start in zip(seqs, got, (8, 11, 6, 0), strict=True):
        reference = hf_logits(model, seq.token_ids[: start + logits.shape[0]])[start:]
        torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
    engine.cache.free([p for s in seqs for p in s.pages])
    asyncio.run(engine.shutdown())


def test_greedy_outputs_equal_hf_across_kept_prefixes(checkpoint):
    path, model = checkpoint
    engine = make_engine(path)
    first = prompts(7, (5, 40, 17))

    async def main():
        a = await asyncio.gather(*[generate(engine, f"u{i}", p) for i, p in enumerate(first)])
        follow = [p + t + [7, 8, 9] for p, (t, _) in zip(first, a, strict=True)]
        b = await asyncio.gather(*[generate(engine, f"u{i}", p) for i, p in enumerate(follow)])
        return a, follow, b

    firsts, follow, seconds = asyncio.run(main())
    for prompt, (tokens, _) in zip(first, firsts, strict=True):
        assert tokens == hf_greedy(model, prompt, len(tokens))
    for prompt, (tokens, out) in zip(follow, seconds, strict=True):
        assert out.cached_tokens >= len(prompt) - 4 - 3 - 12  # the first turn, kept
        assert tokens == hf_greedy(model, prompt, len(tokens))
    engine.check_integrity()
    asyncio.run(engine.shutdown())


def test_preempted_requests_resume_and_still_match_hf(checkpoint):
    path, model = checkpoint
    engine = make_engine(path, kv_bytes=24 * page_bytes(), max_batched_tokens=128)

    async def main():
        return await asyncio.gather(
            *[generate(engine, None, p, max_tokens=16) for p in prompts(9, (30,) * 4)]
        )

    results = asyncio.run(main())
    assert engine.stats().extra["preempted_requests"] > 0
    for prompt, (tokens, _) in zip(prompts(9, (30,) * 4), results, strict=True):
        assert tokens == hf_greedy(model, prompt, len(tokens))
    engine.check_integrity()
    asyncio.run(engine.shutdown())


def engine_logits(engine, ids: list[list[int]]) -> list[torch.Tensor]:
    seqs = [new_seq(engine, p) for p in ids]
    out = logits_for(engine, [(s, len(s.token_ids)) for s in seqs])
    engine.cache.free([p for s in seqs for p in s.pages])
    return out


def test_stacked_expert_names_of_live_modules_load_the_same_weights(checkpoint):
    path, model = checkpoint
    names = dict(model.named_parameters())
    assert any(n.endswith("experts.gate_up_proj") for n in names)  # transformers 5.x modules
    a, b = make_engine(path), make_engine(path)
    for t in b.runner.model.w.tensors():
        t.zero_()
    load_state(b.runner.model.w, b.spec, names.items())
    ids = prompts(11, (13, 6))
    for x, y in zip(engine_logits(a, ids), engine_logits(b, ids), strict=True):
        assert torch.equal(x, y)


def test_streamed_moe_layers_give_exactly_the_resident_logits(checkpoint):
    path, _ = checkpoint
    whole = make_engine(path)
    spec = whole.spec
    sizes = [layer_numel(spec, i) * 4 for i in range(spec.num_layers)]
    fixed = spec.outer_parameters() * 4
    streamed = make_engine_with_budget(path, fixed + sizes[0] + 3 * max(sizes[1:]))
    assert streamed.runner.model.streamer.streamed == [1, 2]
    ids = prompts(13, (12, 30, 7))
    for x, y in zip(engine_logits(streamed, ids), engine_logits(whole, ids), strict=True):
        assert torch.equal(x, y)


def make_engine_with_budget(path: str, budget: int):
    from deployments.config import AppArgs
    from deployments.engine.paged.engine import PagedEngine
    from deployments.memory import setup_memory
    from deployments.platform import detect_platform

    args = AppArgs.model_validate(
        {
            "model": {"model_id": path, "dtype": "float32", "device_weight_budget_bytes": budget},
            "memory": {"cpu_memory_budget_bytes": "256MiB"},
            "kv_cache": {"budget_bytes": 2**20},
            "engine": {"page_size": 4, "max_batched_tokens": 64},
        }
    )
    return PagedEngine(args, setup_memory(args.memory, detect_platform(use_gpu=False)))
