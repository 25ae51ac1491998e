"""The Triton kernels against the PyTorch reference, run by Triton's interpreter on CPU.

Skipped unless Triton is installed and TRITON_INTERPRET=1 is set before Python starts (it must
be set before Triton is imported); the GPU tests cover the same kernels compiled. Locally:

    pip install triton "numpy<2"   # the interpreter's range() over loaded bounds needs numpy 1
    TRITON_INTERPRET=1 python -m pytest tests/cpu/test_triton_interpreter.py
"""

from __future__ import annotations

import os

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
    prefill_attention(q, k, v, table, torch.tensor([c for _, c in shapes], dtype=torch.int32),
                      starts, lens, list(range(len(shapes))), dim ** -0.5, out, splits=splits)
    for i, (n, c) in enumerate(shapes):
        ref = reference_attention(q[starts[i]:starts[i] + n], k, v, table[i], c, dim ** -0.5)
        torch.testing.assert_close(out[starts[i]:starts[i] + n], ref, atol=1e-4, rtol=1e-4)


def test_decode_kernel_matches_reference_with_splits_and_empty_rows():
    torch.manual_seed(0)
    pages, page, kv_heads, dim, heads = 40, 16, 2, 32, 8
    k, v = torch.randn(pages, page, kv_heads, dim), torch.randn(pages, page, kv_heads, dim)
    contexts = [1, 17, 100, 0, 64]
    table = torch.stack([torch.randperm(pages)[:10] for _ in contexts]).int()
    q = torch.randn(len(contexts), heads, dim)
    for splits in (1, 4):
        out = decode_attention(q, k, v, table, torch.tensor(contexts, dtype=torch.int32),
                               dim ** -0.5, splits=splits)
        for i, c in enumerate(contexts):
            if c == 0:
                assert torch.all(out[i] == 0)
                continue
            ref = reference_attention(q[i:i + 1], k, v, table[i], c, dim ** -0.5)[0]
            torch.testing.assert_close(out[i], ref, atol=1e-4, rtol=1e-4)


def test_fused_layer_kernels_match_their_pytorch_versions():
    torch.manual_seed(0)
    x, delta, w = torch.randn(5, 96), torch.randn(5, 96), torch.randn(96)
    ref_x, ref_h = add_rms_norm(x.clone(), delta, w, 1e-5, use_triton=False)
    got_x, got_h = add_rms_norm(x.clone(), delta, w, 1e-5, use_triton=True)
    torch.testing.assert_close(got_x, ref_x)
    torch.testing.assert_close(got_h, ref_h, atol=1e-5, rtol=1e-5)
    gate_up = torch.randn(5, 2 * 200)
    torch.testing.assert_close(silu_mul(gate_up, True), silu_mul(gate_up, False), atol=1e-5,
                               rtol=1e-5)
    heads, kv_heads, dim, pages, page = 4, 2, 16, 8, 4
    qkv = torch.randn(6, (heads + 2 * kv_heads) * dim)
    cos, sin = torch.randn(32, dim), torch.randn(32, dim)
    positions = torch.tensor([0, 3, 5, 9, 20, 31])
    where = (torch.tensor([1, 2, 2, 5, 7, 3]), torch.tensor([0, 3, 1, 2, 0, 1]))
    caches = [torch.zeros(pages, page, kv_heads, dim) for _ in range(4)]
    q_ref = rope_store(qkv, heads, kv_heads, dim, cos, sin, positions, caches[0], caches[1],
                       *where, use_triton=False)
    q_got = rope_store(qkv, heads, kv_heads, dim, cos, sin, positions, caches[2], caches[3],
                       *where, use_triton=True)
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
        positions=positions, write_pages=torch.zeros_like(positions),
        write_offsets=torch.zeros_like(positions), page_table=table,
        context_lens=torch.tensor(contexts, dtype=torch.int32), query_lens=lens,
        context_lens_host=contexts, decode_only=False,
    )
    for _layer in range(2):
        k, v = torch.randn(pages, page, kv_heads, dim), torch.randn(pages, page, kv_heads, dim)
        q = torch.randn(sum(lens), heads, dim)
        fast = paged_attention(q, k, v, meta, dim ** -0.5, use_triton=True, triton_prefill=True)
        ref = paged_attention(q, k, v, meta, dim ** -0.5, use_triton=False)
        torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)
    # Built by the first layer, reused by the second; the long histories' keys were split.
    assert meta.plans[("mixed", True, True)][2].splits > 1
