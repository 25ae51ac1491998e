"""Llama 4's text model in the paged engine matches transformers' own forward.

A tiny random `Llama4ForCausalLM` in float32 (four layers: three chunked-attention RoPE layers
with QK L2 norm, one NoPE layer with attention temperature tuning; Llama 3 rope scaling; an
attention chunk of 32 tokens over pages of 16), once with every layer dense and once with
layers 1 and 3 routed experts (top-1 sigmoid of four, beside a shared expert), is saved as a
checkpoint and loaded by the engine. Logits must equal HF's forward on the whole conversation
(so every history that crosses a chunk boundary is checked against HF's chunked mask), and
greedy outputs HF's generate, through mixed batches, chunked prefill, kept prefixes and
preemption.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from deployments.model_spec import LayerAttention, ModelSpec
from tests.cpu.test_paged_engine import generate, hf_greedy, hf_logits, make_engine, new_seq, step

CHUNK, PAGE = 32, 16
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,  # the experts' (and the shared expert's) width
    "num_local_experts": 4,
    "num_experts_per_tok": 1,
    "intermediate_size_mlp": 96,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 448,
    "max_position_embeddings": 1024,
    "moe_layers": [],
    "attention_chunk_size": CHUNK,
    "floor_scale": 8,  # the NoPE layer's temperature grows every 8 positions
    "attn_scale": 0.5,
    "initializer_range": 0.2,
    "tie_word_embeddings": False,
    "rope_parameters": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
}


def tiny_config(**overrides):
    import transformers

    config = transformers.Llama4TextConfig(**{**TINY, **overrides})
    config.architectures = ["Llama4ForCausalLM"]
    return config


LAYOUTS = {"dense": [], "moe": [1, 3]}  # moe_layers


def save_tiny(path, moe_layers: list[int] | None = None) -> tuple[str, object]:
    """The tiny Llama 4 with random weights, norms included (none of them ones or zeros),
    its layers `moe_layers` routed experts, saved as a checkpoint at `path`: (its path, the
    HF model)."""
    import transformers

    from deployments.engine.builtin_tokenizer import write_tokenizer

    torch.manual_seed(3)
    config = tiny_config(moe_layers=moe_layers or [])
    model = transformers.Llama4ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
    model.save_pretrained(path)
    write_tokenizer(path)
    return str(path), model


@pytest.fixture(scope="module", params=list(LAYOUTS))
def checkpoint(request, tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("llama4"), LAYOUTS[request.param])


def engine_for(path: str, **engine):
    return make_engine(path, page_size=PAGE, **engine)


def test_the_spec_reads_every_layers_attention_kind():
    spec = ModelSpec.from_hf_config(tiny_config())
    rope = LayerAttention(rope=True, chunk=CHUNK, l2_qk_norm=1e-5)
    assert spec.layer_attention == (rope, rope, rope, LayerAttention(False, 0, None, (8, 0.5)))
    assert spec.intermediate_size == 96 and spec.rope_interleaved
    assert rope.key_start(31) == 0 and rope.key_start(32) == 32 and rope.key_start(70) == 64
    off = ModelSpec.from_hf_config(tiny_config(use_qk_norm=False, attn_temperature_tuning=False))
    assert {k.l2_qk_norm for k in off.layer_attention} == {None}
    assert {k.temperature for k in off.layer_attention} == {None}


def test_the_spec_reads_which_layers_route_through_experts():
    assert ModelSpec.from_hf_config(tiny_config()).moe is None
    interleaved = tiny_config(moe_layers=None, interleave_moe_layer_step=2)
    every_other = ModelSpec.from_hf_config(interleaved).moe
    assert every_other is not None and every_other.layers == {1, 3}
    moe = ModelSpec.from_hf_config(tiny_config(moe_layers=[1, 3])).moe
    assert moe.gating == "sigmoid_top1" and moe.num_experts == 4 and moe.experts_per_token == 1
    assert moe.shared_intermediate_size == 128


def test_the_multimodal_checkpoint_serves_its_text_model(caplog):
    import transformers

    config = transformers.Llama4Config(text_config=TINY, vision_config={"num_hidden_layers": 1})
    config.architectures = ["Llama4ForConditionalGeneration"]
    with caplog.at_level("INFO"):
        spec = ModelSpec.from_hf_config(config)
    assert spec.num_layers == 4 and spec.layer_attention[0].chunk == CHUNK
    assert "vision tower is not loaded" in caplog.text


def test_mixed_batches_across_chunk_boundaries_match_hf_forward(checkpoint):
    path, model = checkpoint
    engine = engine_for(path)
    g = torch.Generator().manual_seed(5)
    convs = [torch.randint(3, 400, (n,), generator=g).tolist() for n in (40, 76, 34, 100)]
    seqs = [new_seq(engine, ids) for ids in convs]
    # Step 1: histories of different lengths, one crossing the first chunk boundary.
    step(engine, [(seqs[0], 31), (seqs[1], 40), (seqs[2], 32)])
    # Step 2: decode rows at positions 31 (a chunk's last) and 32 (a chunk's first), a
    # prefill chunk straddling boundary 64, a fresh 70-token chunk straddling 32 and 64.
    got = step(engine, [(seqs[0], 1), (seqs[1], 35), (seqs[2], 1), (seqs[3], 70)])
    # Step 3: decodes at positions 32, 75 and 33, and the rest of a prompt across 96.
    more = step(engine, [(seqs[0], 1), (seqs[1], 1), (seqs[2], 1), (seqs[3], 30)])
    for seq, logits, extra, start in zip(seqs, got, more, (31, 40, 32, 0), strict=True):
        reference = hf_logits(model, seq.token_ids[: start + len(logits) + len(extra)])
        torch.testing.assert_close(logits, reference[start : start + len(logits)], **TOL)
        torch.testing.assert_close(extra, reference[start + len(logits) :], **TOL)
    engine.cache.free([p for s in seqs for p in s.all_pages()])
    engine.cache.check_integrity()
    asyncio.run(engine.shutdown())


TOL = {"rtol": 1e-4, "atol": 1e-4}


def test_the_chunked_mask_matters_here(checkpoint):
    """HF's forward with one long chunk differs from the chunked one past position 32, so the
    parity above checks the chunks (and the engine's mask is not full attention)."""
    _, model = checkpoint
    ids = list(range(3, 83))
    import transformers

    layers = model.config.moe_layers
    full = transformers.Llama4ForCausalLM(
        tiny_config(attention_chunk_size=None, moe_layers=layers)
    ).eval()
    full.load_state_dict(model.state_dict())
    chunked, unchunked = hf_logits(model, ids), hf_logits(full, ids)
    torch.testing.assert_close(chunked[:CHUNK], unchunked[:CHUNK], **TOL)
    assert (chunked[CHUNK:] - unchunked[CHUNK:]).abs().max() > 1e-2


def test_greedy_equals_hf_through_kept_prefixes_that_cross_chunks(checkpoint):
    path, model = checkpoint
    engine = engine_for(path)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 400, (n,), generator=g).tolist() for n in (5, 28, 60, 33)]

    async def main():
        firsts = await asyncio.gather(
            *[generate(engine, f"u{i}", p) for i, p in enumerate(prompts)]
        )
        follow = [p + t + [7, 8, 9] for p, (t, _) in zip(prompts, firsts, strict=True)]
        seconds = await asyncio.gather(
            *[generate(engine, f"u{i}", p) for i, p in enumerate(follow)]
        )
        return firsts, follow, seconds

    firsts, follow, seconds = asyncio.run(main())
    for prompt, (tokens, _) in zip(prompts, firsts, strict=True):
        assert tokens == hf_greedy(model, prompt, len(tokens))
    for prompt, previous, (tokens, out) in zip(follow, firsts, seconds, strict=True):
        assert out.cached_tokens >= len(prompt) - 4 - len(previous[0])  # the first turn, kept
        assert tokens == hf_greedy(model, prompt, len(tokens))
    engine.check_integrity()
    asyncio.run(engine.shutdown())


def test_preempted_requests_resume_and_still_match_hf(checkpoint):
    path, model = checkpoint
    page_bytes = 2 * 1 * PAGE * 2 * 16 * 4  # a page holds one layer (kv_pool.py's lanes)
    # 32 pages of one layer and 16 tokens: four 40-token prompts (12 pages each while they
    # prefill, 10 at 60 tokens) cannot all stay resident.
    engine = engine_for(path, kv_bytes=32 * page_bytes, max_batched_tokens=128)
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, 400, (40,), generator=g).tolist() for _ in range(4)]

    async def main():
        return await asyncio.gather(*[generate(engine, None, p, max_tokens=20) for p in prompts])

    results = asyncio.run(main())
    assert engine.stats().extra["preempted_requests"] > 0
    for prompt, (tokens, _) in zip(prompts, results, strict=True):
        assert tokens == hf_greedy(model, prompt, len(tokens))
    engine.check_integrity()
    asyncio.run(engine.shutdown())


def test_a_multimodal_checkpoint_loads_its_text_weights(tmp_path, checkpoint):
    """Llama4ForConditionalGeneration's safetensors (language_model.* beside the vision
    tower's tensors) give the text model's logits."""
    import transformers

    from deployments.engine.builtin_tokenizer import write_tokenizer

    _, text_model = checkpoint
    config = transformers.Llama4Config(
        text_config=text_model.config.to_dict(),
        vision_config={"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64,
                       "num_attention_heads": 2, "image_size": 28, "patch_size": 14,
                       "vision_output_dim": 32, "projector_input_dim": 32,
                       "projector_output_dim": 32},
    )  # fmt: skip
    config.architectures = ["Llama4ForConditionalGeneration"]
    model = transformers.Llama4ForConditionalGeneration(config).eval()
    model.language_model.load_state_dict(text_model.state_dict())
    model.save_pretrained(tmp_path)
    write_tokenizer(tmp_path)
    engine = engine_for(str(tmp_path))
    ids = torch.randint(3, 400, (50,), generator=torch.Generator().manual_seed(2)).tolist()
    (got,) = step(engine, [(new_seq(engine, ids), 50)])
    torch.testing.assert_close(got, hf_logits(text_model, ids), **TOL)
    asyncio.run(engine.shutdown())


def test_a_llama4_moe_checkpoint_is_served_by_the_paged_engine(tmp_path):
    from deployments.config import AppArgs
    from deployments.engine import select_engine_class
    from deployments.engine.paged.engine import PagedEngine

    tiny_config(moe_layers=[1, 3]).save_pretrained(tmp_path)
    args = AppArgs.model_validate({"model": {"model_id": str(tmp_path)}})
    assert select_engine_class(args) is PagedEngine
