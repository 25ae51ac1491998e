"""The paged engine matches transformers' own forward, in mixed batches, chunks and preemption.

Each architecture it implements (Llama 3 with its rope scaling, Mistral, Qwen2, Qwen3) is built
as a small random transformers model in float32, saved as a checkpoint, and loaded by the
engine; logits must match HF's forward at float32 tolerance and greedy outputs must equal HF's.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from deployments.config import AppArgs
from deployments.engine import GenerationRequest, SamplingParams, select_engine_class
from deployments.engine.paged.engine import PagedEngine
from deployments.engine.paged.sequence import Sequence
from deployments.engine.paged.testing import logits_for
from deployments.memory import setup_memory
from deployments.platform import detect_platform
from tests.cpu.tiny_checkpoints import save_tiny

SMALL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "vocab_size": 448,
    "initializer_range": 0.2,
    "tie_word_embeddings": False,
}
ARCHS = {
    "llama3": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 128,
            }
        },
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
}


@pytest.fixture(scope="module", params=sorted(ARCHS))
def checkpoint(request, tmp_path_factory):
    """A random small model of each architecture, saved like a hub checkpoint."""
    config_name, model_name, extra = ARCHS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    return save_tiny(path, config_name, model_name, {**SMALL, **extra}, seed=1)


def make_engine(path: str, **engine) -> PagedEngine:
    args = AppArgs.model_validate(
        {
            "model": {"model_id": path, "dtype": "float32"},
            "memory": {"cpu_memory_budget_bytes": "256MiB"},
            "kv_cache": {"budget_bytes": engine.pop("kv_bytes", 2**20)},
            "engine": {"page_size": 4, "max_batched_tokens": 64, **engine},
        }
    )
    cls = select_engine_class(args)
    assert cls is PagedEngine
    return cls(args, setup_memory(args.memory, detect_platform(use_gpu=False)))


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0]


def new_seq(engine: PagedEngine, ids: list[int]) -> Sequence:
    seq = Sequence("t", None, list(ids), SamplingParams(1))
    seq.admitted = True
    return seq


def step(engine: PagedEngine, plan: list[tuple[Sequence, int]]) -> list[torch.Tensor]:
    """Run one hand-built mixed batch; return each sequence's logits for its new tokens."""
    return logits_for(engine, plan)


def test_mixed_batch_of_histories_and_chunks_matches_hf_forward(checkpoint):
    path, model = checkpoint
    engine = make_engine(path)
    g = torch.Generator().manual_seed(5)
    convs = [torch.randint(3, 400, (n,), generator=g).tolist() for n in (9, 23, 14, 31)]
    seqs = [new_seq(engine, ids) for ids in convs]
    # Step 1: histories of different lengths (one sequence not started yet).
    step(engine, [(seqs[0], 8), (seqs[1], 11), (seqs[2], 6)])
    # Step 2, mixed: a decode row, two prefill chunks continuing histories, a fresh chunk.
    got = step(engine, [(seqs[0], 1), (seqs[1], 12), (seqs[2], 5), (seqs[3], 17)])
    for seq, logits, start in zip(seqs, got, (8, 11, 6, 0), strict=True):
        n = logits.shape[0]
        reference = hf_logits(model, seq.token_ids[: start + n])[start:]
        torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
    engine.cache.free([p for s in seqs for p in s.pages])
    asyncio.run(engine.shutdown())


async def generate(engine, user, ids, max_tokens=12, temperature=0.0, seed=None):
    req = GenerationRequest("r", user, ids, SamplingParams(max_tokens, temperature, seed=seed))
    tokens, last = [], None
    async for out in engine.generate(req):
        tokens += out.token_ids
        last = out
    return tokens, last


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """HF's greedy continuation: at most n tokens, ending at EOS as the engine does."""
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n, pad_token_id=0)
    return out[0, len(ids) :].tolist()


def hf_argmax_run(model, ids: list[int], n: int) -> list[int]:
    """n argmax tokens from HF's forward, with no end token."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


def test_greedy_outputs_equal_hf_for_concurrent_users_and_follow_up_turns(checkpoint):
    path, model = checkpoint
    engine = make_engine(path)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 400, (n,), generator=g).tolist() for n in (5, 40, 90, 17)]

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
        assert out.cached_tokens >= len(prompt) - 4 - len(previous[0])  # the first turn, reused
        assert tokens == hf_greedy(model, prompt, len(tokens))
    # Admission's figures (a request's room) are the stats' own, read without the rest.
    stats, kv = engine.stats(), engine.kv_figures()
    assert stats.kv_cache_bytes > 0 and kv.kv_cache_bytes == stats.kv_cache_bytes
    assert (kv.kv_budget_bytes, kv.kv_bytes_per_token, kv.memory) == (
        stats.kv_budget_bytes,
        stats.kv_bytes_per_token,
        stats.memory,
    )
    # Decode steps were launched before the previous step's tokens reached the host.
    extra = stats.extra
    assert extra["steps_launched_ahead"] > 0
    # On a CPU no step replays a CUDA graph; every step is counted by the path it took.
    assert extra["steps_by_path"]["eager"] > 0
    assert extra["steps_by_path"]["decode_graph"] == extra["steps_by_path"]["prefill_graph"] == 0
    engine.check_integrity()
    asyncio.run(engine.shutdown())


def test_a_stop_found_while_the_next_step_runs_keeps_exactly_the_delivered_cache(checkpoint):
    path, model = checkpoint
    engine = make_engine(path)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 400, (n,), generator=g).tolist() for n in (23, 31, 12)]
    expected = [hf_argmax_run(model, p, 12) for p in prompts]
    # The third user's fifth token is an end token: its stream stops there, while steps
    # already launched for it (the engine runs ahead) are dropped.
    stop = expected[2][4]
    engine.eos_token_ids = frozenset({stop})

    async def main(batch):
        return await asyncio.gather(*[generate(engine, f"s{i}", p) for i, p in batch])

    firsts = asyncio.run(main(enumerate(prompts)))
    for want, (tokens, _) in zip(expected, firsts, strict=True):
        cut = want.index(stop) + 1 if stop in want else len(want)
        assert tokens == want[:cut]
    engine.check_integrity()
    engine.eos_token_ids = frozenset()
    follow = prompts[2] + firsts[2][0] + [5, 6]
    tokens, out = asyncio.run(generate(engine, "s2", follow))
    # Every token of the first turn has KV, the end token's too when a step launched ahead
    # already computed it; either way the continuation is HF's.
    seen = len(prompts[2]) + len(firsts[2][0])
    assert seen - 1 <= out.cached_tokens <= seen
    assert tokens == hf_argmax_run(model, follow, 12)
    assert engine.stats().extra["steps_launched_ahead"] > 0
    engine.check_integrity()
    asyncio.run(engine.shutdown())


def test_preempted_requests_resume_and_still_match_hf(checkpoint):
    path, model = checkpoint
    # 24 pages of 4 tokens: four 30-token prompts growing by 16 cannot all stay resident.
    engine = make_engine(path, kv_bytes=24 * engine_page_bytes(path), max_batched_tokens=128)
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, 400, (30,), generator=g).tolist() for _ in range(4)]

    async def main():
        return await asyncio.gather(*[generate(engine, None, p, max_tokens=16) for p in prompts])

    results = asyncio.run(main())
    assert engine.stats().extra["preempted_requests"] > 0
    for prompt, (tokens, _) in zip(prompts, results, strict=True):
        assert tokens == hf_greedy(model, prompt, len(tokens))
    engine.check_integrity()
    asyncio.run(engine.shutdown())


def engine_page_bytes(path: str) -> int:
    return 2 * SMALL["num_hidden_layers"] * 4 * SMALL["num_key_value_heads"] * 16 * 4


def test_unsupported_architectures_fall_back_to_the_generic_engine(tmp_path, caplog):
    import transformers

    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=448)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    args = AppArgs.model_validate({"model": {"model_id": str(tmp_path)}})
    from deployments.engine.hf_engine import HFEngine

    with caplog.at_level("WARNING"):
        assert select_engine_class(args) is HFEngine
    assert "generic transformers engine" in caplog.text
