"""Tensor parallelism in the paged engine computes what TP=1 computes (CPU, gloo, float32).

One gloo world of 4 processes serves the whole module: this process is rank 0 (the engine,
its scheduler and requests), three spawned processes run rank_loop.serve_rank for each
session of 2 or 4 ranks (deployments/engine/paged/testing.py). A tiny Llama and a tiny
Qwen3-MoE (8 heads, 4 KV heads: both split by 4) are saved as checkpoints; each rank loads
its parts. TP=2 and TP=4 must give TP=1's logits within float32 tolerance in a hand-built
mixed step (decode rows beside prefill chunks of histories), the same logits and greedy
tokens while requests are preempted and resumed, and the same tokens and cached tokens for
users whose caches are kept between turns.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deployments.config import AppArgs
from deployments.engine.paged.engine import PagedEngine
from deployments.engine.paged.kv_pool import KVPool
from deployments.engine.paged.tensor_parallel import SINGLE, TensorParallel, block, shard_spec
from deployments.engine.paged.testing import logits_for, open_session, serve_test_ranks, tp_groups
from deployments.memory import setup_memory
from deployments.model_spec import ModelSpec
from deployments.platform import detect_platform
from tests.cpu.test_paged_engine import generate, new_seq
from tests.cpu.tiny_checkpoints import save_tiny

WORLD = 4
SMALL = {
    "hidden_size": 64,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "vocab_size": 448,
    "initializer_range": 0.2,
    "tie_word_embeddings": False,
}
MODELS = {
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"intermediate_size": 128, "num_hidden_layers": 2},
    ),
    # Layers 0 and 2 routed (8 experts of width 32, 3 a token), layer 1 dense.
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {
            "num_hidden_layers": 3,
            "head_dim": 16,
            "intermediate_size": 128,
            "moe_intermediate_size": 32,
            "num_experts": 8,
            "num_experts_per_tok": 3,
            "norm_topk_prob": True,
            "mlp_only_layers": [1],
        },
    ),
}
PAGE = 4  # tokens a page
TIGHT_PAGES = 24  # four 30-token prompts growing by 16 cannot all stay resident


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    """The gloo world: this process rank 0, ranks 1-3 spawned; their session groups."""
    init = f"file://{tmp_path_factory.mktemp('gloo')}/rendezvous"
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=serve_test_ranks, args=(r, WORLD, init), daemon=True)
        for r in range(1, WORLD)
    ]
    for p in procs:
        p.start()
    dist.init_process_group("gloo", init_method=init, rank=0, world_size=WORLD)
    found = tp_groups(WORLD)
    yield found
    open_session(0, found)  # the ranks leave their loop
    for p in procs:
        p.join(timeout=20)
        if p.is_alive():  # a failed session left it waiting: ours to end
            p.kill()
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=sorted(MODELS))
def checkpoint(request, tmp_path_factory):
    config_name, model_name, extra = MODELS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    return save_tiny(path, config_name, model_name, {**SMALL, **extra}, seed=2)[0]


def page_bytes(path: str) -> int:
    """One float32 page of the whole model's KV (every rank holds its heads' share)."""
    from transformers import AutoConfig

    return KVPool.page_bytes(
        ModelSpec.from_hf_config(AutoConfig.from_pretrained(path)), PAGE, torch.float32
    )


def make_engine(path: str, tp: TensorParallel, pages: int | None = None) -> PagedEngine:
    args = AppArgs.model_validate(
        {
            "model": {"model_id": path, "dtype": "float32"},
            "memory": {"cpu_memory_budget_bytes": "256MiB"},
            "kv_cache": {"budget_bytes": pages * page_bytes(path) if pages else 2**20},
            "engine": {"page_size": PAGE, "max_batched_tokens": 128, "cpu_threads": 1},
        }
    )
    return PagedEngine(args, setup_memory(args.memory, detect_platform(use_gpu=False)), tp=tp)


def run_session(path: str, tp: TensorParallel, work) -> object:
    """`work(engine)`'s result on an engine of `tp` (pages sized by `work.pages`)."""
    engine = make_engine(path, tp, getattr(work, "pages", None))
    try:
        return work(engine)
    finally:
        asyncio.run(engine.shutdown())


def mixed_step_logits(engine: PagedEngine) -> tuple[list[torch.Tensor], tuple[int, int]]:
    """Two hand-built steps; the second's logits (a decode row, two prefill chunks
    continuing histories, a fresh prompt's chunk), and rank 0's (KV heads in its pool,
    weight bytes)."""
    g = torch.Generator().manual_seed(5)
    convs = [torch.randint(3, 400, (n,), generator=g).tolist() for n in (9, 23, 14, 31)]
    seqs = [new_seq(engine, ids) for ids in convs]
    logits_for(engine, [(seqs[0], 8), (seqs[1], 11), (seqs[2], 6)])
    got = logits_for(engine, [(seqs[0], 1), (seqs[1], 12), (seqs[2], 5), (seqs[3], 17)])
    engine.cache.free([p for s in seqs for p in s.pages])
    return got, (engine.pool.buffer.shape[-2], engine.weights_bytes)


def record_logits(engine: PagedEngine) -> dict[tuple, torch.Tensor]:
    """Every sampled row's logits from now on, by (user, position of its last token)."""
    runner, seen, last = engine.runner, {}, []
    launch, draw = runner.launch, runner._draw

    def drawing(logits, plan, rules):
        last.append(logits.clone())
        return draw(logits, plan, rules)

    def launching(batch, feed=None):
        last.clear()
        out = launch(batch, feed)
        for j, i in enumerate(out.rows):
            seq = batch.seqs[i]
            seen[(seq.user_key, batch.starts[i] + batch.num_tokens[i] - 1)] = last[0][j]
        return out

    runner._draw, runner.launch = drawing, launching
    return seen


def preempted_run(engine: PagedEngine) -> tuple:
    """Four users' greedy answers in a pool too small for all: (tokens, logits, preempted)."""
    seen = record_logits(engine)
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, 400, (30,), generator=g).tolist() for _ in range(4)]

    async def main():
        return await asyncio.gather(
            *[generate(engine, f"p{i}", p, max_tokens=16) for i, p in enumerate(prompts)]
        )

    tokens = [t for t, _ in asyncio.run(main())]
    engine.check_integrity()
    return tokens, seen, engine.stats().extra["preempted_requests"]


preempted_run.pages = TIGHT_PAGES


def kept_turns(engine: PagedEngine) -> list[tuple[list[int], int]]:
    """Two users, two turns each: each turn's (tokens, cached tokens)."""
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 400, (n,), generator=g).tolist() for n in (11, 26)]

    async def main():
        firsts = await asyncio.gather(
            *[generate(engine, f"u{i}", p) for i, p in enumerate(prompts)]
        )
        follow = [p + t + [7, 8, 9] for p, (t, _) in zip(prompts, firsts, strict=True)]
        seconds = await asyncio.gather(
            *[generate(engine, f"u{i}", p) for i, p in enumerate(follow)]
        )
        return [(t, out.cached_tokens) for t, out in [*firsts, *seconds]]

    turns = asyncio.run(main())
    engine.check_integrity()
    return turns


REFERENCE: dict[tuple[str, str], object] = {}  # (checkpoint, work) -> TP=1's result


def tp1(path: str, work) -> object:
    key = (path, work.__name__)
    if key not in REFERENCE:
        REFERENCE[key] = run_session(path, SINGLE, work)
    return REFERENCE[key]


def test_rank_specs_split_heads_and_widths():
    """Which slice rank r holds, and the rank's spec; sizes that do not divide are refused."""
    assert [block(8, 4, r) for r in range(4)] == [
        slice(0, 2),
        slice(2, 4),
        slice(4, 6),
        slice(6, 8),
    ]
    import transformers

    _, _, extra = MODELS["qwen3_moe"]
    spec = ModelSpec.from_hf_config(
        transformers.Qwen3MoeConfig(**SMALL, **extra, architectures=["Qwen3MoeForCausalLM"])
    )
    rank = shard_spec(spec, 4)
    assert (rank.num_heads, rank.num_kv_heads, rank.head_dim) == (2, 1, 16)
    assert (rank.intermediate_size, rank.moe.intermediate_size) == (32, 8)
    assert rank.hidden_size == spec.hidden_size and rank.moe.num_experts == 8
    assert shard_spec(spec, 1) is spec
    with pytest.raises(ValueError, match="KV heads 4"):
        shard_spec(spec, 8)


@pytest.mark.parametrize("size", [2, 4])
def test_mixed_step_logits_equal_tp1(groups, checkpoint, size):
    want, (kv_heads, weight_bytes) = tp1(checkpoint, mixed_step_logits)
    got, (rank_kv_heads, rank_weight_bytes) = run_session(
        checkpoint, open_session(size, groups), mixed_step_logits
    )
    assert rank_kv_heads * size == kv_heads  # rank 0's pages hold its KV heads only
    assert rank_weight_bytes < weight_bytes  # and its parts of the layers
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [2, 4])
def test_preempted_and_resumed_requests_equal_tp1(groups, checkpoint, size):
    want_tokens, want_logits, want_preempted = tp1(checkpoint, preempted_run)
    tokens, logits, preempted = run_session(checkpoint, open_session(size, groups), preempted_run)
    assert want_preempted > 0 and preempted > 0
    assert tokens == want_tokens
    assert logits.keys() == want_logits.keys()
    for key, row in logits.items():
        torch.testing.assert_close(row, want_logits[key], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [2, 4])
def test_kept_caches_give_tp1_tokens(groups, checkpoint, size):
    want = tp1(checkpoint, kept_turns)
    got = run_session(checkpoint, open_session(size, groups), kept_turns)
    assert got == want
    assert all(cached > 0 for _, cached in got[2:])  # the second turns reused the first


def test_rank_parts_from_tensors_and_lazy_slices_agree(tmp_path):
    """Each rule's cut, read from a whole tensor and from a safetensors slice (only the
    rank's block read): rows, columns, stacked gate/up halves (both layouts), o's bias."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from deployments.engine.paged.tp_weights import rank_part

    g = torch.Generator().manual_seed(0)
    tensors = {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 4, generator=g),
        "model.layers.0.self_attn.o_proj.weight": torch.randn(4, 8, generator=g),
        "model.layers.0.self_attn.o_proj.bias": torch.randn(4, generator=g),
        "model.layers.0.mlp.experts.gate_up_proj": torch.randn(2, 8, 4, generator=g),
        "model.layers.0.mlp.experts.3.down_proj.weight": torch.randn(4, 8, generator=g),
        "model.layers.0.mlp.gate.weight": torch.randn(2, 4, generator=g),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    tp = TensorParallel(1, 2)
    full = tensors["model.layers.0.mlp.experts.gate_up_proj"]
    want = {
        "model.layers.0.self_attn.q_proj.weight": tensors["model.layers.0.self_attn.q_proj.weight"][
            4:
        ],
        "model.layers.0.self_attn.o_proj.weight": tensors["model.layers.0.self_attn.o_proj.weight"][
            :, 4:
        ],
        "model.layers.0.self_attn.o_proj.bias": torch.zeros(4),  # added by rank 0 alone
        "model.layers.0.mlp.experts.gate_up_proj": torch.cat([full[:, 2:4], full[:, 6:8]], 1),
        "model.layers.0.mlp.experts.3.down_proj.weight": tensors[
            "model.layers.0.mlp.experts.3.down_proj.weight"
        ][:, 4:],
        "model.layers.0.mlp.gate.weight": tensors["model.layers.0.mlp.gate.weight"],
    }
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        for name, tensor in tensors.items():
            torch.testing.assert_close(rank_part(name, tensor, tp, False), want[name])
            torch.testing.assert_close(rank_part(name, f.get_slice(name), tp, False), want[name])
    # Llama 4's stacked experts are transposed: gate_up [E, H, 2I] halves on the last dim.
    llama4 = full.transpose(1, 2).contiguous()
    got = rank_part("model.layers.0.mlp.experts.gate_up_proj", llama4, tp, True)
    torch.testing.assert_close(got, want["model.layers.0.mlp.experts.gate_up_proj"].transpose(1, 2))
