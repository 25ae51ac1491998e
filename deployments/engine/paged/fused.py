"""Fused elementwise kernels for the decoder layer (Triton on a GPU, PyTorch elsewhere).

At batch 1 a decode step is ~30 small kernels per layer if written as PyTorch ops; these fuse
them to four (residual add + RMSNorm, RoPE + KV store, SiLU-gated product), so a CUDA graph
replays ~10 kernels per layer. Each kernel rounds where Hugging Face's PyTorch code rounds, so
results stay within bf16 tolerance of HF's forward; the PyTorch versions are the reference.
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs use the PyTorch versions.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only machines
    triton = None


# ---- PyTorch reference versions --------------------------------------------------------------


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def l2_norm_ref(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama 4's QK norm (transformers' Llama4TextL2Norm): RMS-normalise in float32, no weight."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


def rope_store_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pages: torch.Tensor,
    offsets: torch.Tensor,
    l2_eps: float | None = None,
) -> torch.Tensor:
    """Rotate q and k ([T, heads, D]) by their positions' cos/sin ([T, D]), L2-normalise them
    when `l2_eps` is given (Llama 4, after RoPE as HF does); store k, v."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    if l2_eps is not None:
        q, k = l2_norm_ref(q, l2_eps), l2_norm_ref(k, l2_eps)
    k_cache[pages, offsets] = k
    v_cache[pages, offsets] = v
    return q


# ---- Triton kernels ----------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _add_rms_norm_kernel(
        X,
        Delta,
        W,
        Out,
        stride_x,
        stride_d,
        stride_o,
        n,
        eps,
        HAS_DELTA: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_DELTA:  # residual add, rounded like HF's `residual + hidden_states`
            x = (
                x.to(tl.float32)
                + tl.load(Delta + row * stride_d + cols, mask=mask, other=0.0).to(tl.float32)
            ).to(X.dtype.element_ty)
            tl.store(X + row * stride_x + cols, x, mask=mask)
        x32 = x.to(tl.float32)
        r = tl.rsqrt(tl.sum(x32 * x32, 0) / n + eps)
        y = (x32 * r).to(X.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Out + row * stride_o + cols, (w * y).to(Out.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_store_kernel(
        QKV,
        Cos,
        Sin,
        Pos,
        Pages,
        Offsets,
        Qout,
        Kc,
        Vc,
        stride_t,
        stride_qt,
        stride_qh,
        stride_cp,
        stride_kp,
        stride_kt,
        stride_kh,
        l2_eps,
        H: tl.constexpr,
        KVH: tl.constexpr,
        D: tl.constexpr,
        L2: tl.constexpr,
    ):
        t = tl.program_id(0)
        head = tl.program_id(1)  # [0, H): q heads; [H, H+KVH): k heads; then v heads
        half = D // 2
        d = tl.arange(0, D)
        pos = tl.load(Pos + t)
        x = tl.load(QKV + t * stride_t + head * D + d).to(tl.float32)
        if head < H + KVH:
            partner = tl.load(QKV + t * stride_t + head * D + (d + half) % D).to(tl.float32)
            rot = tl.where(d < half, -partner, partner)
            cos = tl.load(Cos + pos * stride_cp + d).to(tl.float32)
            sin = tl.load(Sin + pos * stride_cp + d).to(tl.float32)
            dtype = Qout.dtype.element_ty
            x = (x * cos).to(dtype).to(tl.float32) + (rot * sin).to(dtype).to(tl.float32)
            if L2:  # Llama 4's QK norm of the rotated (rounded) head, as l2_norm_ref
                x = x.to(dtype).to(tl.float32)
                x = x * tl.rsqrt(tl.sum(x * x, 0) / D + l2_eps)
        page = tl.load(Pages + t).to(tl.int64)  # page * stride passes 2**31 in big pools
        slot = tl.load(Offsets + t)
        if head < H:
            tl.store(Qout + t * stride_qt + head * stride_qh + d, x.to(Qout.dtype.element_ty))
        elif head < H + KVH:
            tl.store(
                Kc + page * stride_kp + slot * stride_kt + (head - H) * stride_kh + d,
                x.to(Kc.dtype.element_ty),
            )
        else:
            tl.store(
                Vc + page * stride_kp + slot * stride_kt + (head - H - KVH) * stride_kh + d,
                x.to(Vc.dtype.element_ty),
            )

    @triton.jit
    def _silu_mul_kernel(GU, Out, stride_g, stride_o, n, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n
        gate = tl.load(GU + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(GU + row * stride_g + n + cols, mask=mask, other=0.0).to(tl.float32)
        act = (gate * tl.sigmoid(gate)).to(Out.dtype.element_ty).to(tl.float32)
        tl.store(Out + row * stride_o + cols, (act * up).to(Out.dtype.element_ty), mask=mask)


# ---- dispatch ------------------------------------------------------------------------------------


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float, use_triton: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """x += delta (in place, when given); return (x, rms_norm(x))."""
    if not use_triton:
        if delta is not None:
            x = x + delta
        return x, rms_norm_ref(x, weight, eps)
    out = torch.empty_like(x)
    n = x.shape[-1]
    _add_rms_norm_kernel[(x.shape[0],)](
        x,
        delta if delta is not None else x,
        weight,
        out,
        x.stride(0),
        delta.stride(0) if delta is not None else 0,
        out.stride(0),
        n,
        eps,
        HAS_DELTA=delta is not None,
        BLOCK=triton.next_power_of_2(n),
    )
    return x, out


def rope_store(
    qkv: torch.Tensor,
    heads: int,
    kv_heads: int,
    dim: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pages: torch.Tensor,
    offsets: torch.Tensor,
    use_triton: bool,
    l2_eps: float | None = None,
) -> torch.Tensor:
    """From fused q|k|v rows [T, (H + 2 KVH) * D]: rotated q [T, H, D]; k, v into the cache.
    `l2_eps`: q and k L2-normalised after the rotation (Llama 4's QK norm)."""
    n = qkv.shape[0]
    if not use_triton:
        q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        return rope_store_ref(
            q.reshape(n, heads, dim),
            k.reshape(n, kv_heads, dim),
            v.reshape(n, kv_heads, dim),
            cos[positions],
            sin[positions],
            k_cache,
            v_cache,
            pages,
            offsets,
            l2_eps,
        )
    q_out = torch.empty(n, heads, dim, dtype=qkv.dtype, device=qkv.device)
    _rope_store_kernel[(n, heads + 2 * kv_heads)](
        qkv,
        cos,
        sin,
        positions,
        pages,
        offsets,
        q_out,
        k_cache,
        v_cache,
        qkv.stride(0),
        q_out.stride(0),
        q_out.stride(1),
        cos.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        l2_eps or 0.0,
        H=heads,
        KVH=kv_heads,
        D=dim,
        L2=l2_eps is not None,
    )
    return q_out


def silu_mul(gate_up: torch.Tensor, use_triton: bool) -> torch.Tensor:
    """silu(gate) * up for fused [T, 2 * I] rows."""
    n = gate_up.shape[-1] // 2
    if not use_triton:
        gate, up = gate_up.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up
    out = torch.empty(gate_up.shape[0], n, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(gate_up.shape[0], triton.cdiv(n, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), n, BLOCK=block
    )
    return out
