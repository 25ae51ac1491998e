"""The paged engine on a GPU: Triton decode attention, bf16 logits against HF, CUDA graphs,
and weights and KV pages in RMM managed memory."""

import pytest

from tests.gpu.conftest import run_isolated

pytestmark = pytest.mark.gpu


def test_triton_decode_attention_matches_the_reference_on_gpu():
    import torch

    from deployments.engine.paged.attention import reference_attention
    from deployments.engine.paged.triton_attention import decode_attention

    torch.manual_seed(0)
    pages, page, kv_heads, dim, heads = 300, 16, 8, 128, 32
    k = torch.randn(pages, page, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    contexts = [0, 1, 15, 16, 17, 500, 1000, 4096]
    table = torch.stack([torch.randperm(pages, device="cuda")[:256] for _ in contexts]).int()
    q = torch.randn(len(contexts), heads, dim, device="cuda", dtype=torch.bfloat16)
    lens = torch.tensor(contexts, device="cuda", dtype=torch.int32)
    for splits in (None, 1, 8):
        out = decode_attention(q, k, v, table, lens, dim**-0.5, splits=splits)
        for i, ctx in enumerate(contexts):
            if ctx == 0:
                assert torch.all(out[i] == 0)
                continue
            ref = reference_attention(
                q[i : i + 1].float(), k.float(), v.float(), table[i], ctx, dim**-0.5
            )[0]
            torch.testing.assert_close(out[i].float(), ref, atol=2e-2, rtol=2e-2)


def test_kernels_address_pages_beyond_two_to_the_31_elements():
    """A 4.5 GiB pool: offsets of its last pages overflow int32 (an 8B model's pool has them)."""
    import torch

    from deployments.engine.paged.attention import reference_attention
    from deployments.engine.paged.fused import rope_store
    from deployments.engine.paged.triton_attention import decode_attention

    layers, page, kv_heads, dim, heads = 4, 16, 8, 128, 32
    pages = (9 << 30) // (2 * layers * page * kv_heads * dim * 2) // 2  # ~4.5 GiB
    buffer = torch.zeros(pages, 2, layers, page, kv_heads, dim, dtype=torch.bfloat16, device="cuda")
    k_cache, v_cache = buffer[:, 0, 3], buffer[:, 1, 3]  # the last layer: largest offsets
    last = torch.arange(pages - 4, pages, device="cuda")
    qkv = torch.randn(64, (heads + 2 * kv_heads) * dim, device="cuda", dtype=torch.bfloat16)
    cos = torch.ones(64, dim, device="cuda", dtype=torch.bfloat16)
    sin = torch.zeros_like(cos)
    positions = torch.arange(64, device="cuda")
    q = rope_store(
        qkv,
        heads,
        kv_heads,
        dim,
        cos,
        sin,
        positions,
        k_cache,
        v_cache,
        last.repeat_interleave(16),
        positions % 16,
        use_triton=True,
    )
    torch.cuda.synchronize()
    stored = k_cache[last].reshape(64, kv_heads, dim)
    torch.testing.assert_close(
        stored, qkv[:, heads * dim : (heads + kv_heads) * dim].reshape(64, kv_heads, dim)
    )
    table = last.int()[None, :]
    out = decode_attention(
        q[-1:],
        k_cache,
        v_cache,
        table,
        torch.tensor([64], device="cuda", dtype=torch.int32),
        dim**-0.5,
    )
    ref = reference_attention(
        q[-1:].float(), k_cache.float(), v_cache.float(), table[0], 64, dim**-0.5
    )
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


PROGRAM = """
    import asyncio, functools, json, tempfile
    import torch, transformers
    from deployments.config import AppArgs
    from deployments.platform import detect_platform
    from deployments.memory import setup_memory
    from deployments.engine import GenerationRequest, SamplingParams
    from deployments.engine.builtin_tokenizer import write_tokenizer
    from deployments.engine.paged.engine import PagedEngine
    from deployments.engine.paged.scheduler import Batch
    from deployments.engine.paged.sequence import Sequence
    from deployments.engine.paged.testing import logits_for, step_inputs
    SMALL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                 num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                 vocab_size=448, tie_word_embeddings=False)
    ARCHS = {
        "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=512))),
        "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32)),
    }
    platform = detect_platform()
    memory = setup_memory(AppArgs.model_validate(
        {"memory": {"mode": "managed", "pool_size_bytes": "8GiB"}, "replica": {"num_gpus": 1}}
    ).memory, platform, torch_allocator="native")
    cuda = __import__("ctypes").CDLL("libcuda.so.1")
    def is_managed(t):
        flag = __import__("ctypes").c_int(0)
        cuda.cuPointerGetAttribute(__import__("ctypes").byref(flag), 8,
                                   __import__("ctypes").c_uint64(t.data_ptr()))
        return flag.value
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
        g = torch.Generator().manual_seed(5)
        convs = [torch.randint(3, 400, (n,), generator=g).tolist() for n in (40, 300, 77, 513)]
        seqs = [Sequence("t", None, c, SamplingParams(1)) for c in convs]
        step = functools.partial(logits_for, engine)
        step([(seqs[0], 39), (seqs[1], 200), (seqs[2], 10)])
        got = step([(seqs[0], 1), (seqs[1], 100), (seqs[2], 67), (seqs[3], 513)])
        ours_err, hf_err = 0.0, 0.0
        with torch.inference_mode():
            for s, logit, start in zip(seqs, got, (39, 200, 10, 0)):
                ids = torch.tensor([s.token_ids[:start + logit.shape[0]]], device="cuda")
                ref = hf32(input_ids=ids).logits[0, start:].float()
                bf = hf16(input_ids=ids).logits[0, start:].float()
                ours_err = max(ours_err, (logit - ref).abs().max().item())
                hf_err = max(hf_err, (bf - ref).abs().max().item())
        engine.cache.free([p for s in seqs for p in s.pages])
        # Decode through CUDA graphs (batch of 3) and eagerly: the same logits.
        eager_vs_graph = 0.0
        trio = [Sequence("t", None, c[:50], SamplingParams(1))
                for c in convs[1:]]
        step([(s, 49) for s in trio])
        batch = Batch()
        for s in trio:
            s.pages += engine.cache.allocate(engine.cache.pages_for(50) - len(s.pages))
            batch.add(s, 1)
        tokens, meta, index, *_ = step_inputs(engine, batch)  # the graph path, by hand
        graph_logits = engine.runner.graphs.run(meta, tokens).clone()
        eager = engine.runner.model.forward(tokens, meta, index)
        eager_vs_graph = (graph_logits - eager).abs().max().item()
        engine.cache.free([p for s in trio for p in s.pages])
        # A returning user's short chunk after a kept history, through the prefill CUDA
        # graphs and eagerly: the same last-token logits, as close to fp32 as HF's bf16.
        prefill_vs_eager, prefill_vs_ref = 0.0, 0.0
        for n in (2, 17, 48, 65, 100):
            s = Sequence("t", None, convs[3][:300 + n], SamplingParams(1))
            step([(s, 300)])
            s.pages += engine.cache.allocate(engine.cache.pages_for(300 + n) - len(s.pages))
            batch = Batch()
            batch.add(s, n)
            tokens, meta, *_ = step_inputs(engine, batch)
            assert engine.runner.prefill_graphs.fits(meta.query_lens)
            graph_logits = engine.runner.prefill_graphs.run(meta, tokens)[0].clone()
            last = torch.tensor([n - 1], device="cuda")
            eager = engine.runner.model.forward(tokens, meta, last)[0]
            with torch.inference_mode():
                ref = hf32(input_ids=torch.tensor([s.token_ids], device="cuda")).logits[0, -1]
            prefill_vs_eager = max(prefill_vs_eager, (graph_logits - eager).abs().max().item())
            prefill_vs_ref = max(prefill_vs_ref, (graph_logits - ref.float()).abs().max().item())
            engine.cache.free(s.pages)
        report[name] = {"ours_max_err": ours_err, "hf_bf16_max_err": hf_err,
                        "eager_vs_graph": eager_vs_graph, "prefill_graph_vs_eager":
                        prefill_vs_eager, "prefill_graph_vs_fp32": prefill_vs_ref,
                        "weights_managed": is_managed(engine.runner.model.w.embed),
                        "kv_managed": is_managed(engine.pool.buffer)}
        asyncio.run(engine.shutdown())
        del engine, hf32, hf16
    snap = memory.snapshot()
    report["rmm_current"] = memory.rmm_statistics().current_bytes
    report["torch_reserved"] = torch.cuda.memory_reserved()
    report["snapshot"] = [snap.capacity_bytes, snap.used_bytes, snap.free_unified_memory_bytes]
    print("RESULT " + json.dumps(report))
"""


def test_bf16_logits_graphs_and_managed_memory_for_each_architecture():
    report = run_isolated(PROGRAM)
    print(report)
    for arch in ("llama3", "mistral", "qwen2", "qwen3"):
        r = report[arch]
        # Within bf16 tolerance: no further from the fp32 truth than HF's own bf16 forward.
        assert r["ours_max_err"] <= 2 * r["hf_bf16_max_err"] + 1e-2, (arch, r)
        assert r["eager_vs_graph"] < 1e-2, (arch, r)
        assert r["prefill_graph_vs_eager"] < 2e-2, (arch, r)
        assert r["prefill_graph_vs_fp32"] <= 2 * r["hf_bf16_max_err"] + 1e-2, (arch, r)
        assert r["weights_managed"] == 1 and r["kv_managed"] == 1, (arch, r)


def test_triton_prefill_attention_matches_the_reference_on_gpu():
    import torch

    from deployments.engine.paged.attention import reference_attention
    from deployments.engine.paged.triton_prefill import prefill_attention

    torch.manual_seed(1)
    pages, page, kv_heads, dim, heads = 600, 16, 8, 128, 32
    k = torch.randn(pages, page, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    shapes = [(2, 2), (64, 8256), (500, 500), (17, 4000), (100, 101)]  # (chunk, context)
    lens = [n for n, _ in shapes]
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    q = torch.randn(starts[-1], heads, dim, device="cuda", dtype=torch.bfloat16)
    table = torch.stack([torch.randperm(pages, device="cuda")[:520] for _ in shapes]).int()
    ctx = torch.tensor([c for _, c in shapes], device="cuda", dtype=torch.int32)
    for splits in (1, 8, None):  # None: as the engine calls it, splits from the contexts
        out = torch.empty_like(q)
        prefill_attention(
            q,
            k,
            v,
            table,
            ctx,
            starts,
            lens,
            list(range(len(shapes))),
            dim**-0.5,
            out,
            [c for _, c in shapes],
            splits=splits,
        )
        for i, (n, c) in enumerate(shapes):
            ref = reference_attention(
                q[starts[i] : starts[i] + n].float(), k.float(), v.float(), table[i], c, dim**-0.5
            )
            torch.testing.assert_close(
                out[starts[i] : starts[i] + n].float(), ref, atol=2e-2, rtol=2e-2
            )
