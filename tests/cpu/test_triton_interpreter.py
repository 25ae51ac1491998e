"""The Triton kernels against the PyTorch reference, run by Triton's interpreter on CPU.

Skipped unless Triton is installed and TRITON_INTERPRET=1 is set before Python starts (it must
be set before Triton is imported); the GPU tests cover the same kernels compiled. Locally:

    pip install triton "numpy<2"   # the interpreter's range() over loaded bounds needs numpy 1
    TRITON_INTERPRET=1 python -m pytest tests/cpu/test_triton_interpreter.py

(With Triton 3.9 numpy 2 works too: python3 -m venv /work/venvs/interp && pip install
torch==2.13.0 triton numpy pytest httpx.) The sampler's tests take ~2 minutes there.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("set TRITON_INTERPRET=1 to run Triton kernels on CPU", allow_module_level=True)

from deployments.engine.paged.attention import reference_attention  # noqa: E402
from deployments.engine.paged.fused import add_rms_norm, rope_store, silu_mul  # noqa: E402
from deployments.engine.paged.triton_attention import decode_attention  # noqa: E402
from deployments.engine.paged.triton_prefill import prefill_attention  # noqa: E402


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize(("heads", "kv_heads"), [(8, 2), (7, 1), (4, 4)])
def test_prefill_kernel_matches_reference(heads, kv_heads, splits):
    torch.manual_seed(0)
    pages, page, dim = 60, 16, 32
    k, v = torch.randn(pages, page, kv_heads, dim), torch.randn(pages, page, kv_heads, dim)
    shapes = [(1, 1), (5, 5), (17, 40), (33, 33), (3, 100), (20, 21), (7, 300)]
    lens = [n for n, _ in shapes]
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    q = torch.randn(starts[-1], heads, dim)
    table = torch.stack([torch.randperm(pages)[:20] for _ in shapes]).int()
    out = torch.full_like(q, float("nan"))
    prefill_attention(
        q,
        k,
        v,
        table,
        torch.tensor([c for _, c in shapes], dtype=torch.int32),
        starts,
        lens,
        list(range(len(shapes))),
        dim**-0.5,
        out,
        splits=splits,
    )
    for i, (n, c) in enumerate(shapes):
        ref = reference_attention(q[starts[i] : starts[i] + n], k, v, table[i], c, dim**-0.5)
        torch.testing.assert_close(out[starts[i] : starts[i] + n], ref, atol=1e-4, rtol=1e-4)


def test_decode_kernel_matches_reference_with_splits_and_empty_rows():
    torch.manual_seed(0)
    pages, page, kv_heads, dim, heads = 40, 16, 2, 32, 8
    k, v = torch.randn(pages, page, kv_heads, dim), torch.randn(pages, page, kv_heads, dim)
    contexts = [1, 17, 100, 0, 64]
    table = torch.stack([torch.randperm(pages)[:10] for _ in contexts]).int()
    q = torch.randn(len(contexts), heads, dim)
    for splits in (1, 4):
        out = decode_attention(
            q, k, v, table, torch.tensor(contexts, dtype=torch.int32), dim**-0.5, splits=splits
        )
        for i, c in enumerate(contexts):
            if c == 0:
                assert torch.all(out[i] == 0)
                continue
            ref = reference_attention(q[i : i + 1], k, v, table[i], c, dim**-0.5)[0]
            torch.testing.assert_close(out[i], ref, atol=1e-4, rtol=1e-4)


def test_fused_layer_kernels_match_their_pytorch_versions():
    torch.manual_seed(0)
    x, delta, w = torch.randn(5, 96), torch.randn(5, 96), torch.randn(96)
    ref_x, ref_h = add_rms_norm(x.clone(), delta, w, 1e-5, use_triton=False)
    got_x, got_h = add_rms_norm(x.clone(), delta, w, 1e-5, use_triton=True)
    torch.testing.assert_close(got_x, ref_x)
    torch.testing.assert_close(got_h, ref_h, atol=1e-5, rtol=1e-5)
    gate_up = torch.randn(5, 2 * 200)
    torch.testing.assert_close(
        silu_mul(gate_up, True), silu_mul(gate_up, False), atol=1e-5, rtol=1e-5
    )
    heads, kv_heads, dim, pages, page = 4, 2, 16, 8, 4
    qkv = torch.randn(6, (heads + 2 * kv_heads) * dim)
    cos, sin = torch.randn(32, dim), torch.randn(32, dim)
    positions = torch.tensor([0, 3, 5, 9, 20, 31])
    where = (torch.tensor([1, 2, 2, 5, 7, 3]), torch.tensor([0, 3, 1, 2, 0, 1]))
    caches = [torch.zeros(pages, page, kv_heads, dim) for _ in range(4)]
    q_ref = rope_store(
        qkv,
        heads,
        kv_heads,
        dim,
        cos,
        sin,
        positions,
        caches[0],
        caches[1],
        *where,
        use_triton=False,
    )
    q_got = rope_store(
        qkv,
        heads,
        kv_heads,
        dim,
        cos,
        sin,
        positions,
        caches[2],
        caches[3],
        *where,
        use_triton=True,
    )
    torch.testing.assert_close(q_got, q_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caches[2], caches[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caches[3], caches[1])


def test_a_mixed_step_gives_every_layer_the_reference_attention():
    """Decode rows and prefill chunks in one step, two layers sharing the step's metadata (its
    row selections and prefill blocks are built once): Triton equals the reference path."""
    from deployments.engine.paged.attention import AttentionMetadata, paged_attention

    torch.manual_seed(2)
    pages, page, kv_heads, dim, heads = 64, 16, 2, 32, 8
    # (tokens this step, context): long histories split their keys (see the plan's splits)
    shapes = [(1, 50), (12, 1000), (1, 7), (40, 40), (3, 900)]
    lens = [n for n, _ in shapes]
    contexts = [c for _, c in shapes]
    table = torch.stack([torch.randperm(pages) for _ in shapes]).int()
    positions = torch.cat([torch.arange(c - n, c) for n, c in shapes])
    meta = AttentionMetadata(
        positions=positions,
        write_pages=torch.zeros_like(positions),
        write_offsets=torch.zeros_like(positions),
        page_table=table,
        context_lens=torch.tensor(contexts, dtype=torch.int32),
        query_lens=lens,
        context_lens_host=contexts,
        decode_only=False,
    )
    for _layer in range(2):
        k, v = torch.randn(pages, page, kv_heads, dim), torch.randn(pages, page, kv_heads, dim)
        q = torch.randn(sum(lens), heads, dim)
        fast = paged_attention(q, k, v, meta, dim**-0.5, use_triton=True, triton_prefill=True)
        ref = paged_attention(q, k, v, meta, dim**-0.5, use_triton=False)
        torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)
    # Built by the first layer, reused by the second; the long histories' keys were split.
    assert meta.plans[("mixed", True, True)][2].splits > 1


# ---- the sampler kernel (triton_sampler.py) against the reference (sampler.py) -------------


def _sampler():
    from deployments.engine.paged import sampler
    from deployments.engine.paged.triton_sampler import triton_sample

    return sampler, triton_sample


EOS_IDS = torch.tensor([3, 17, 699], dtype=torch.int32)
SMALL = {"block": 64, "cap": 128}  # small tiles and scratch: every path shows on short rows


def _kernel(logits, plan, eos=EOS_IDS, **kw):
    sampler, triton_sample = _sampler()
    return triton_sample(
        logits, *plan.to_device("cpu"), eos, sampler.MIN_TEMPERATURE, **{**SMALL, **kw}
    )


def _reference(logits, plan, eos=EOS_IDS, block=SMALL["block"]):
    sampler, _ = _sampler()
    return sampler.sample_reference(logits, *plan.to_device("cpu"), eos, order_block=block)


def _random_rows(rows, vocab, seed):
    from tests.cpu.test_sampler import random_plan

    gen = np.random.default_rng(seed)
    scale = gen.uniform(0.3, 6.0, (rows, 1))
    logits = torch.from_numpy(gen.normal(0, 1, (rows, vocab)) * scale).float()
    return logits, random_plan(rows, gen)


def _assert_inside(logits, plan, got, eos=EOS_IDS):
    """Every sampled row's token is in the rules' kept set (or within rounding of its cut)."""
    from tests.cpu.test_sampler import brute_kept

    sampler, _ = _sampler()
    x = sampler.ban_logits(logits, torch.from_numpy(plan.ban_eos), eos)
    for i in np.flatnonzero(plan.temperature > 0):
        keep, unsure = brute_kept(
            x[i].double().numpy(),
            float(plan.temperature[i]),
            float(plan.top_p[i]),
            int(plan.top_k[i]),
            float(plan.min_p[i]),
        )
        assert keep[got[i]] or unsure[got[i]], (i, int(got[i]))


@pytest.mark.parametrize("seed", [0, 1])
def test_sampler_kernel_draws_what_the_reference_draws(seed):
    sampler, _ = _sampler()
    logits, plan = _random_rows(40, 700, seed)
    got, want = _kernel(logits, plan), _reference(logits, plan)
    greedy = torch.from_numpy(plan.temperature == 0)
    banned = sampler.ban_logits(logits, torch.from_numpy(plan.ban_eos), EOS_IDS)
    assert torch.equal(got[greedy], banned[greedy].argmax(-1))
    _assert_inside(logits, plan, got)
    assert int((got != want).sum()) <= 1  # float32 sums may tip one draw at a boundary


def test_sampler_kernel_repeats_a_seed_at_any_batch_position():
    sampler, _ = _sampler()
    logits, plan = _random_rows(6, 500, 3)
    first = _kernel(logits, plan)
    assert torch.equal(_kernel(logits, plan), first)
    order = [4, 0, 5, 2, 1, 3]
    moved = sampler.SamplingPlan(
        *(
            getattr(plan, f)[order]
            for f in ("temperature", "top_p", "top_k", "min_p", "seed", "ban_eos")
        )
    )
    assert torch.equal(_kernel(logits[order], moved), first[order])
    one = sampler.SamplingPlan(
        *(
            getattr(plan, f)[4:5]
            for f in ("temperature", "top_p", "top_k", "min_p", "seed", "ban_eos")
        )
    )
    assert _kernel(logits[4:5], one)[0] == first[4]


def test_sampler_kernel_follows_the_distribution_on_a_small_vocab():
    from deployments.engine.interface import SamplingParams
    from tests.cpu.test_sampler import brute_kept, chi_square_z

    sampler, _ = _sampler()
    vocab, draws = 10, 240  # the interpreter runs ~0.25 s a row
    row = torch.randn(vocab, generator=torch.Generator().manual_seed(5)) * 1.2
    params = SamplingParams(4, temperature=0.9, top_p=0.92, top_k=8)
    plan = sampler.build_plan(
        [params] * draws, [sampler.draw_seed(7, i) for i in range(draws)], [False] * draws
    )
    got = _kernel(row.expand(draws, vocab).contiguous(), plan, torch.zeros(0, dtype=torch.int32))
    keep, unsure = brute_kept(row.double().numpy(), 0.9, 0.92, 8, 0.0)
    assert not unsure.any() and keep.sum() >= 4
    p = np.where(keep, np.exp(row.double().numpy() / 0.9), 0.0)
    counts = np.bincount(got.numpy(), minlength=vocab)
    assert counts[~keep].sum() == 0
    assert chi_square_z(counts[keep], draws * p[keep] / p.sum()) < 4.5


def test_sampler_kernel_uniform_is_the_references_philox():
    sampler, _ = _sampler()
    import triton.language as tl

    @triton.jit
    def uniforms(Seed, Out):
        i = tl.program_id(0)
        tl.store(Out + i, tl.max(tl.rand(tl.load(Seed + i), tl.zeros([2], tl.int32)), 0))

    seeds = torch.tensor([sampler.draw_seed(3, i) for i in range(64)] + [0, 1, 2**63 - 1])
    out = torch.empty(len(seeds), dtype=torch.float32)
    uniforms[(len(seeds),)](seeds, out)
    assert torch.equal(out, sampler.philox_uniform(seeds))


def test_sampler_kernel_keeps_near_ties_within_the_documented_distance():
    """More near-equal logits at the cut than the scratch holds, after too few passes: the
    whole bracket is kept, so also tokens just below the cut, but no further than
    W / (7 * 9**(passes - 1)), W = T * ln(n / (1 - top_p)) bounding the first bracket."""
    from deployments.engine.interface import SamplingParams
    from tests.cpu.test_sampler import brute_kept

    sampler, _ = _sampler()
    vocab, rows, passes = 600, 24, 2
    row = torch.full((vocab,), -4.0)
    row[:400] = 1.0 + torch.arange(400) * 2e-6  # 400 distinct logits within 1e-3
    params = SamplingParams(4, temperature=1.0, top_p=0.5)
    plan = sampler.build_plan(
        [params] * rows, [sampler.draw_seed(9, i) for i in range(rows)], [False] * rows
    )
    got = _kernel(row.expand(rows, vocab).contiguous(), plan, cap=16, full_passes=passes)
    keep, _ = brute_kept(row.double().numpy(), 1.0, 0.5, 0, 0.0)
    cut = float(row[torch.from_numpy(keep)].min())
    reach = math.log(vocab / 0.5) / (7 * 9 ** (passes - 1))
    assert (row[got] >= cut - reach).all() and not keep[got].all()  # some came from below
    exact = _kernel(row.expand(rows, vocab).contiguous(), plan)  # enough room: exact
    assert keep[exact].all()


def test_sampler_kernel_edge_rows():
    from deployments.engine.interface import SamplingParams

    sampler, _ = _sampler()
    vocab = 300
    logits = torch.randn(9, vocab, generator=torch.Generator().manual_seed(11)) * 3
    logits[0] = float("-inf")  # nothing to draw: argmax's answer
    logits[1, 20:] = float("-inf")  # top_k beyond the finite tokens
    logits[2, :] = 0.5  # all tied: every token is kept
    logits[3, 3] = 50.0  # an EOS id dominates but is banned
    logits[6:] = -10.0
    logits[6:, 50:250] = -1.8  # p / p_max = exp(-1.8 / 0.5) < min_p: only token 40 stays
    logits[6:, 40] = 0.0
    params = [
        SamplingParams(4, temperature=1.0),
        SamplingParams(4, temperature=1.0, top_k=100),
        SamplingParams(4, temperature=1.0, top_p=0.3, top_k=5),
        SamplingParams(4, temperature=1e-5, min_p=0.5),
        SamplingParams(4, temperature=2.0, min_p=0.3),
        SamplingParams(4, temperature=1.0, top_p=1e-46),
    ]
    params += [SamplingParams(4, temperature=0.5, min_p=0.05)] * 3
    params += [
        SamplingParams(4, temperature=float("inf"), top_p=0.5),  # every p equal
        SamplingParams(4, temperature=1e30, top_k=7, min_p=1.0),
    ]
    logits = torch.cat([logits, torch.randn(2, vocab) * 3])
    logits[9, 100:] = float("-inf")
    plan = sampler.build_plan(
        params,
        [sampler.draw_seed(1, i) for i in range(11)],
        [False, False, False, True] + [False] * 7,
    )
    got = _kernel(logits, plan)
    assert torch.equal(got, _reference(logits, plan))
    assert got[0] == 0 and got[1] < 20 and got[3] != 3 and got[5] == logits[5].argmax()
    assert (got[6:9] == 40).all() and got[9] < 100
    assert torch.equal(
        _kernel(logits, plan, block=2048, cap=16384), _reference(logits, plan, block=2048)
    )


@pytest.mark.parametrize("splits", [1, 4])
def test_chunked_attention_kernels_match_the_reference_mask(splits):
    """Llama 4's chunked layers: decode and prefill rows see only their own chunk's keys,
    for queries on, just before and just past chunk boundaries (chunk 32, pages of 16)."""
    torch.manual_seed(4)
    pages, page, kv_heads, dim, heads, chunk = 60, 16, 2, 32, 8, 32
    k, v = torch.randn(pages, page, kv_heads, dim), torch.randn(pages, page, kv_heads, dim)
    # (tokens, context): chunks straddling 32 and 64, one starting on 64, a long history
    shapes = [(1, 32), (1, 33), (1, 1), (40, 70), (5, 69), (16, 80), (3, 300), (33, 33)]
    lens = [n for n, _ in shapes]
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    q = torch.randn(starts[-1], heads, dim)
    table = torch.stack([torch.randperm(pages)[:20] for _ in shapes]).int()
    contexts = torch.tensor([c for _, c in shapes], dtype=torch.int32)
    out = torch.full_like(q, float("nan"))
    prefill_attention(
        q, k, v, table, contexts, starts, lens, list(range(len(shapes))), dim**-0.5, out,
        splits=splits, chunk=chunk,
    )  # fmt: skip
    decode_rows = torch.tensor([starts[i + 1] - 1 for i in range(len(shapes))])
    dec = decode_attention(
        q[decode_rows], k, v, table, contexts, dim**-0.5, splits=splits, chunk=chunk
    )
    for i, (n, c) in enumerate(shapes):
        ref = reference_attention(q[starts[i] : starts[i] + n], k, v, table[i], c, dim**-0.5, chunk)
        torch.testing.assert_close(out[starts[i] : starts[i] + n], ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(dec[i], ref[-1], atol=1e-4, rtol=1e-4)
        if c > chunk:  # the mask matters for this row
            full = reference_attention(q[starts[i + 1] - 1 :][:1], k, v, table[i], c, dim**-0.5)
            assert (full[0] - ref[-1]).abs().max() > 1e-3


def test_chunked_kernels_never_read_pages_before_the_queries_chunk():
    """A chunked lane's page-table row points at the scratch page before the sequence's
    current chunk (chunk_window.py: those pages are released and reused by others). Here
    those columns point at a page of NaNs: any read of one would spoil the output."""
    torch.manual_seed(6)
    pages, page, kv_heads, dim, heads, chunk = 40, 16, 2, 32, 8, 32
    k, v = torch.randn(pages, page, kv_heads, dim), torch.randn(pages, page, kv_heads, dim)
    k[0], v[0] = float("nan"), float("nan")
    shapes = [(1, 70), (1, 64), (20, 100), (40, 72)]  # (tokens, context)
    lens = [n for n, _ in shapes]
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    q = torch.randn(starts[-1], heads, dim)
    table = torch.stack([torch.randperm(pages - 1)[:10] + 1 for _ in shapes]).int()
    clean = table.clone()
    for i, (n, c) in enumerate(shapes):  # release every page before the first query's chunk
        table[i, : (c - n) // chunk * chunk // page] = 0
    contexts = torch.tensor([c for _, c in shapes], dtype=torch.int32)
    out = torch.empty_like(q)
    prefill_attention(
        q, k, v, table, contexts, starts, lens, list(range(len(shapes))), dim**-0.5, out,
        chunk=chunk,
    )  # fmt: skip
    decode_rows = torch.tensor([starts[i + 1] - 1 for i in range(len(shapes))])
    dec = decode_attention(q[decode_rows], k, v, table, contexts, dim**-0.5, chunk=chunk)
    for i, (n, c) in enumerate(shapes):
        rows = slice(starts[i], starts[i] + n)
        ref = reference_attention(q[rows], k, v, clean[i], c, dim**-0.5, chunk)
        released = reference_attention(q[rows], k, v, table[i], c, dim**-0.5, chunk)
        assert not ref.isnan().any()
        torch.testing.assert_close(released, ref)
        torch.testing.assert_close(out[rows], ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(dec[i], ref[-1], atol=1e-4, rtol=1e-4)


def test_rope_store_with_llama4_qk_norm_matches_its_pytorch_version():
    torch.manual_seed(1)
    heads, kv_heads, dim, pages, page = 4, 2, 16, 8, 4
    qkv = torch.randn(6, (heads + 2 * kv_heads) * dim)
    cos, sin = torch.randn(32, dim), torch.randn(32, dim)
    positions = torch.tensor([0, 3, 5, 9, 20, 31])
    where = (torch.tensor([1, 2, 2, 5, 7, 3]), torch.tensor([0, 3, 1, 2, 0, 1]))
    caches = [torch.zeros(pages, page, kv_heads, dim) for _ in range(4)]
    args = (qkv, heads, kv_heads, dim, cos, sin, positions)
    q_ref = rope_store(*args, caches[0], caches[1], *where, use_triton=False, l2_eps=1e-5)
    q_got = rope_store(*args, caches[2], caches[3], *where, use_triton=True, l2_eps=1e-5)
    torch.testing.assert_close(q_got, q_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caches[2], caches[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caches[3], caches[1])
    assert torch.allclose(q_ref.pow(2).mean(-1), torch.ones(6, heads), atol=1e-3)
