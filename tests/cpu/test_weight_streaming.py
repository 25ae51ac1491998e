"""Weights beyond the device budget stream in from host memory and compute exactly the same."""

from __future__ import annotations

import asyncio

import pytest
import torch
import transformers

from deployments.config import AppArgs
from deployments.engine import GenerationRequest, SamplingParams
from deployments.engine.builtin_tokenizer import write_tokenizer
from deployments.engine.paged.engine import PagedEngine
from deployments.engine.paged.sequence import Sequence
from deployments.engine.paged.testing import logits_for
from deployments.engine.paged.weights import layer_numel
from deployments.memory import setup_memory
from deployments.platform import detect_platform

CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "vocab_size": 448,
    "initializer_range": 0.2,
    "tie_word_embeddings": False,
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(2)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()
    path = tmp_path_factory.mktemp("six-layers")
    model.save_pretrained(path)
    write_tokenizer(path)
    return str(path)


def make(path: str, budget: int | None) -> PagedEngine:
    args = AppArgs.model_validate(
        {
            "model": {"model_id": path, "dtype": "float32", "device_weight_budget_bytes": budget},
            "memory": {"cpu_memory_budget_bytes": "256MiB"},
            "kv_cache": {"budget_bytes": 2**20},
            "engine": {
                "page_size": 4,
                "max_batched_tokens": 64,
                "engine_class": "deployments.engine.paged.engine:PagedEngine",
            },
        }
    )
    return PagedEngine(args, setup_memory(args.memory, detect_platform(use_gpu=False)))


def budget_for(resident_layers: int) -> int:
    """A device budget that keeps `resident_layers` layers (float32) beside 3 stream slots."""
    layer = layer_numel(_spec()) * 4
    fixed = (CONFIG["vocab_size"] * CONFIG["hidden_size"] * 2 + CONFIG["hidden_size"]) * 4
    return fixed + (3 + resident_layers) * layer


def _spec():
    from deployments.model_spec import ModelSpec

    return ModelSpec.from_hf_config(
        transformers.LlamaConfig(**CONFIG, architectures=["LlamaForCausalLM"])
    )


@pytest.mark.parametrize("resident", [0, 1, 4])
def test_streamed_layers_give_exactly_the_resident_logits(checkpoint, resident):
    streamed, whole = make(checkpoint, budget_for(resident)), make(checkpoint, None)
    assert streamed.runner.model.streamer is not None
    assert len(streamed.runner.model.streamer.streamed) == CONFIG["num_hidden_layers"] - resident
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 400, (n,), generator=g).tolist() for n in (12, 30, 7)]
    for eng in (streamed, whole):
        eng.seqs = [Sequence("t", None, list(p), SamplingParams(1)) for p in prompts]
    a = logits_for(streamed, [(s, len(s.token_ids)) for s in streamed.seqs])
    b = logits_for(whole, [(s, len(s.token_ids)) for s in whole.seqs])
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_generation_with_streamed_weights_matches_resident_weights(checkpoint):
    streamed, whole = make(checkpoint, budget_for(1)), make(checkpoint, None)

    async def run(eng, prompt):
        req = GenerationRequest("r", "u", prompt, SamplingParams(10, temperature=0.0))
        return [t async for out in eng.generate(req) for t in out.token_ids]

    prompt = list(range(5, 40))
    assert asyncio.run(run(streamed, prompt)) == asyncio.run(run(whole, prompt))


def test_a_budget_too_small_for_the_layer_buffers_is_refused(checkpoint):
    with pytest.raises(ValueError, match="device_weight_budget_bytes"):
        make(checkpoint, 1000)


def test_weights_load_from_a_live_model_whose_parameters_require_grad(checkpoint):
    from deployments.engine.paged.weights import load_state

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    assert next(model.parameters()).requires_grad
    eng = make(checkpoint, budget_for(1))
    load_state(eng.runner.model.w, eng.spec, model.named_parameters())
    assert not eng.runner.model.w.blocks[0].requires_grad
