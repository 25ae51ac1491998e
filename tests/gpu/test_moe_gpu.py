"""Routed experts on a GPU: Qwen3-MoE and Mixtral in the paged engine, bf16 against HF.

For each architecture (small random configs, GPU-sized widths): the engine's bf16 logits on a
mixed batch of histories and chunks are no further from HF's float32 forward than HF's own
bf16 forward is (routing in bf16 flips a near-tied expert now and then, in HF's model as in
ours, so the maximum is allowed 3x HF's and the mean 1.5x); CUDA-graph decode equals eager;
an eager MoE forward makes no host sync (`set_sync_debug_mode("error")`); and the grouped
experts (`torch._grouped_mm`, bf16) equal the gather-bmm fallback; at decode sizes the per-pair
Triton products (expert_gemv.py) equal the reference and the grouped product, and replay in a
CUDA graph on new routing; Llama 4's shared expert riding in those launches equals the separate
path.
"""

import pytest

from tests.gpu.conftest import run_isolated

pytestmark = pytest.mark.gpu

PROGRAM = """
    import asyncio, functools, json, tempfile
    import torch, transformers
    from deployments.config import AppArgs
    from deployments.platform import detect_platform
    from deployments.memory import setup_memory
    from deployments.engine import SamplingParams
    from deployments.engine.builtin_tokenizer import write_tokenizer
    from deployments.engine.paged.engine import PagedEngine
    from deployments.engine.paged.scheduler import Batch
    from deployments.engine.paged.sequence import Sequence
    from deployments.engine.paged.testing import logits_for, step_inputs
    SMALL = dict(hidden_size=256, num_hidden_layers=3, num_attention_heads=8,
                 num_key_value_heads=2, max_position_embeddings=4096, vocab_size=448,
                 tie_word_embeddings=False)
    ARCHS = {
        "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
            head_dim=32, intermediate_size=512, moe_intermediate_size=128, num_experts=16,
            num_experts_per_tok=4, norm_topk_prob=True, mlp_only_layers=[1])),
        "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
            intermediate_size=256, num_local_experts=8, num_experts_per_tok=2)),
    }
    platform = detect_platform()
    memory = setup_memory(AppArgs.model_validate(
        {"memory": {"mode": "managed", "pool_size_bytes": "8GiB"}, "replica": {"num_gpus": 1}}
    ).memory, platform, torch_allocator="native")
    report = {}
    for name, (cfg_name, model_name, extra) in ARCHS.items():
        torch.manual_seed(3)
        config = getattr(transformers, cfg_name)(**SMALL, **extra)
        hf32 = getattr(transformers, model_name)(config).cuda().eval()
        path = tempfile.mkdtemp()
        hf32.save_pretrained(path)
        write_tokenizer(path)
        hf16 = getattr(transformers, model_name).from_pretrained(
            path, dtype=torch.bfloat16).cuda().eval()
        args = AppArgs.model_validate({"model": {"model_id": path, "dtype": "bfloat16"},
            "kv_cache": {"budget_bytes": "256MiB"}, "replica": {"num_gpus": 1},
            "memory": {"mode": "managed"}, "engine": {"max_num_seqs": 16}})
        engine = PagedEngine(args, memory)
        assert engine.spec.moe is not None and engine.runner.graphs is not None
        g = torch.Generator().manual_seed(5)
        convs = [torch.randint(3, 400, (n,), generator=g).tolist() for n in (40, 300, 77, 513)]
        seqs = [Sequence("t", None, c, SamplingParams(1)) for c in convs]
        step = functools.partial(logits_for, engine)
        step([(seqs[0], 39), (seqs[1], 200), (seqs[2], 10)])
        got = step([(seqs[0], 1), (seqs[1], 100), (seqs[2], 67), (seqs[3], 513)])
        ours_max = hf_max = ours_sum = hf_sum = 0.0
        count = 0
        with torch.inference_mode():
            for s, logit, start in zip(seqs, got, (39, 200, 10, 0)):
                ids = torch.tensor([s.token_ids[:start + logit.shape[0]]], device="cuda")
                ref = hf32(input_ids=ids).logits[0, start:].float()
                bf = hf16(input_ids=ids).logits[0, start:].float()
                ours_max = max(ours_max, (logit - ref).abs().max().item())
                hf_max = max(hf_max, (bf - ref).abs().max().item())
                ours_sum += (logit - ref).abs().sum().item()
                hf_sum += (bf - ref).abs().sum().item()
                count += ref.numel()
        engine.cache.free([p for s in seqs for p in s.pages])
        # Decode through CUDA graphs (batch of 3) and eagerly: the same logits; the eager
        # forward again under sync debug mode "error": no host sync anywhere in it.
        trio = [Sequence("t", None, c[:50], SamplingParams(1)) for c in convs[1:]]
        step([(s, 49) for s in trio])
        batch = Batch()
        for s in trio:
            s.pages += engine.cache.allocate(engine.cache.pages_for(50) - len(s.pages))
            batch.add(s, 1)
        tokens, meta, index, *_ = step_inputs(engine, batch)
        graph_logits = engine.runner.graphs.run(meta, tokens).clone()
        eager = engine.runner.model.forward(tokens, meta, index)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            engine.runner.model.forward(tokens, meta, index)
            no_sync = True
        except RuntimeError as exc:
            no_sync = str(exc)[:300]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        engine.cache.free([p for s in trio for p in s.pages])
        report[name] = {"ours_max_err": ours_max, "hf_bf16_max_err": hf_max,
                        "ours_mean_err": ours_sum / count, "hf_bf16_mean_err": hf_sum / count,
                        "eager_vs_graph": (graph_logits - eager).abs().max().item(),
                        "no_host_sync": no_sync}
        asyncio.run(engine.shutdown())
        del engine, hf32, hf16
    print("RESULT " + json.dumps(report))
"""


def test_bf16_moe_logits_and_decode_graphs_for_qwen3_moe_and_mixtral():
    report = run_isolated(PROGRAM)
    print(report)
    for arch in ("qwen3_moe", "mixtral"):
        r = report[arch]
        assert r["ours_mean_err"] <= 1.5 * r["hf_bf16_mean_err"] + 1e-3, (arch, r)
        assert r["ours_max_err"] <= 3 * r["hf_bf16_max_err"] + 1e-2, (arch, r)
        assert r["eager_vs_graph"] < 1e-2, (arch, r)
        assert r["no_host_sync"] is True, (arch, r)


def test_grouped_experts_equal_the_gather_fallback_in_bf16():
    import torch

    from deployments.engine.paged.moe import experts_forward, grouped_mm_available

    torch.manual_seed(0)
    e, h, i, t, k = 128, 2048, 768, 64, 8  # Qwen3-MoE-30B-A3B's expert shapes, batch 64
    gate_up = (torch.randn(e, 2 * i, h, device="cuda") / h**0.5).bfloat16()
    down = (torch.randn(e, h, i, device="cuda") / i**0.5).bfloat16()
    x = torch.randn(t, h, device="cuda").bfloat16()
    ids = torch.stack([torch.randperm(e, device="cuda")[:k] for _ in range(t)])
    weights = torch.rand(t, k, device="cuda").bfloat16()
    assert grouped_mm_available(x)
    for scale_input in (False, True):
        grouped = experts_forward(x, gate_up, down, weights, ids, scale_input, fast=True)
        gathered = experts_forward(
            x, gate_up, down, weights, ids, scale_input, fast=True, method="gather"
        )
        torch.testing.assert_close(grouped.float(), gathered.float(), atol=2e-2, rtol=2e-2)
    # Captured in a CUDA graph and replayed on new routing: equal to eager.
    static_ids, static_w = ids.clone(), weights.clone()
    experts_forward(x, gate_up, down, static_w, static_ids, False, fast=True)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = experts_forward(x, gate_up, down, static_w, static_ids, False, fast=True)
    new_ids = torch.stack([torch.randperm(e, device="cuda")[:k] for _ in range(t)])
    static_ids.copy_(new_ids)
    graph.replay()
    want = experts_forward(x, gate_up, down, weights, new_ids, False, fast=True)
    torch.testing.assert_close(out, want, atol=0, rtol=0)


@pytest.mark.parametrize(
    "shape",
    [
        (16, 5120, 8192, 1, True, (1, 4, 8)),  # Llama 4 Scout: 16 experts, top-1, scaled input
        (128, 2048, 768, 8, False, (1, 3, 8)),  # Qwen3-30B-A3B: 128 experts, top-8
    ],
)
def test_per_pair_expert_products_at_decode_sizes(shape):
    import torch

    from deployments.engine.paged.expert_gemv import pair_linear, pair_linear_ref
    from deployments.engine.paged.moe import choose_method, experts_forward

    e, h, i, k, scale_input, batches = shape
    torch.manual_seed(1)
    gate_up = (torch.randn(e, 2 * i, h, device="cuda") / h**0.5).bfloat16()
    down = (torch.randn(e, h, i, device="cuda") / i**0.5).bfloat16()
    dense = (torch.randn(2 * i, h, device="cuda") / h**0.5).bfloat16()
    for t in batches:
        x = torch.randn(t, h, device="cuda").bfloat16()
        ids = torch.stack([torch.randperm(e, device="cuda")[:k] for _ in range(t)])
        ids[-1] = ids[0]  # two tokens on the same experts: pairs may share an expert
        weights = torch.rand(t, k, device="cuda").bfloat16()
        assert choose_method(x, t * k, e) == "pairs"
        rows = x.repeat_interleave(k, dim=0)
        got = pair_linear(rows, gate_up, ids.reshape(-1))
        want = pair_linear_ref(rows, gate_up, ids.reshape(-1))
        torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1e-2)
        shared_rows = pair_linear(x, gate_up, ids.reshape(-1), per_row=k)  # a row per token
        torch.testing.assert_close(shared_rows, got, atol=0, rtol=0)
        # A dense matrix's rows in the same launch (a shared expert): after the pairs' rows.
        both = pair_linear(rows, gate_up, ids.reshape(-1), dense=(x, dense))
        torch.testing.assert_close(both[: t * k], got, atol=0, rtol=0)
        want_dense = (x.float() @ dense.float().T).bfloat16()
        torch.testing.assert_close(both[t * k :].float(), want_dense.float(), atol=1e-2, rtol=1e-2)
        pairs = experts_forward(x, gate_up, down, weights, ids, scale_input, fast=True)
        grouped = experts_forward(
            x, gate_up, down, weights, ids, scale_input, fast=True, method="grouped"
        )
        torch.testing.assert_close(pairs.float(), grouped.float(), atol=2e-2, rtol=2e-2)
    assert choose_method(x, 2 * e, e) == "grouped"  # many pairs: the grouped product
    # Captured in a CUDA graph at the last batch size, replayed on new routing: equal to eager.
    static_ids = ids.clone()
    experts_forward(x, gate_up, down, weights, static_ids, scale_input, fast=True)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = experts_forward(x, gate_up, down, weights, static_ids, scale_input, fast=True)
    new_ids = torch.stack([torch.randperm(e, device="cuda")[:k] for _ in range(len(x))])
    static_ids.copy_(new_ids)
    graph.replay()
    want = experts_forward(x, gate_up, down, weights, new_ids, scale_input, fast=True)
    torch.testing.assert_close(out, want, atol=0, rtol=0)


def test_a_shared_expert_rides_in_the_routed_pairs_launches():
    """Llama 4 Scout's MoE MLP at one token: the shared expert's rows in the per-pair
    launches equal the separate path (grouped routed experts + cuBLAS shared expert), eager and
    replayed in a CUDA graph on new hidden states."""
    import torch
    import transformers

    from deployments.engine.paged.moe import moe_mlp
    from deployments.engine.paged.weights import LayerWeights
    from deployments.model_spec import llama4_moe

    h, i, e = 5120, 8192, 16
    config = transformers.Llama4TextConfig(
        hidden_size=h, intermediate_size=i, num_local_experts=e, num_hidden_layers=1
    )
    torch.manual_seed(3)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, device="cuda") / shape[-1] ** 0.5).bfloat16()

    empty = torch.empty(0, device="cuda")
    layer = LayerWeights(
        qkv=empty,
        o=empty,
        input_norm=empty,
        post_norm=empty,
        experts_gate_up=rand(e, 2 * i, h),
        experts_down=rand(e, h, i),
        router=rand(e, h),
        shared_gate_up=rand(2 * i, h),
        shared_down=rand(h, i),
    )
    moe = llama4_moe(config)
    for t in (4, 1):  # 4 tokens: the separate path; 1: riding (and captured below)
        x = torch.randn(t, h, device="cuda").bfloat16()
        got = moe_mlp(x, layer, moe, True)
        want = moe_mlp(x, layer, moe, True, method="grouped")
        torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)
    static = x.clone()
    moe_mlp(static, layer, moe, True)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_mlp(static, layer, moe, True)
    static.copy_(torch.randn_like(static))
    graph.replay()
    torch.testing.assert_close(out, moe_mlp(static, layer, moe, True), atol=0, rtol=0)
