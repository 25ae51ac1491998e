"""The decoder forward over a flattened batch of tokens with paged KV.

Llama-family layers computed the way Hugging Face computes them (so logits match its own
forward): RMSNorm in float32, rotary tables from transformers' own rope code (Llama 3 scaling
included), residual adds, SiLU-gated MLP; q/k/v and gate/up as fused matrix products. Each
layer's MLP is dense or routed experts (moe.py), as its weights say (`LayerWeights.kind`).
Logits are computed only for the tokens that sample.

Under tensor parallelism (`tp`, tensor_parallel.py) the spec is the rank's (its heads, its
MLP width) and the o projection's and the MLP's outputs are summed over the ranks, one
all-reduce each per layer; at size 1 that sum is the identity.

Llama 4's layers differ per layer (`ModelSpec.attention`): NoPE layers rotate by an identity
table (cos 1, sin 0: exact) and scale q by the attention temperature of its position; RoPE
layers L2-normalise q and k after the rotation and may attend within chunks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deployments.engine.paged.attention import AttentionMetadata, paged_attention
from deployments.engine.paged.fused import add_rms_norm, rms_norm_ref, rope_store, silu_mul
from deployments.engine.paged.kv_pool import KVPool
from deployments.engine.paged.moe import moe_mlp
from deployments.engine.paged.tensor_parallel import SINGLE, TensorParallel
from deployments.engine.paged.weight_stream import WeightStreamer
from deployments.engine.paged.weights import LayerWeights, ModelWeights
from deployments.model_spec import ModelSpec


def rope_tables(
    spec: ModelSpec, length: int, dtype: torch.dtype, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [length, head_dim] exactly as transformers computes them for this config."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary = LlamaRotaryEmbedding(config=spec.hf_config).to(device)
    positions = torch.arange(length, device=device)[None, :]
    probe = torch.empty(1, dtype=dtype, device=device)
    cos, sin = rotary(probe, positions)
    return cos[0], sin[0]


def dense_mlp(h: torch.Tensor, layer: LayerWeights, spec: ModelSpec, fast: bool) -> torch.Tensor:
    """One gated MLP: down(silu(gate h) * up h), gate and up as one product."""
    return F.linear(silu_mul(F.linear(h, layer.gate_up), fast), layer.down)


def routed_mlp(h: torch.Tensor, layer: LayerWeights, spec: ModelSpec, fast: bool) -> torch.Tensor:
    """Routed experts (and a shared one, where the architecture has it)."""
    assert spec.moe is not None
    return moe_mlp(h, layer, spec.moe, fast)


MLPS = {"dense": dense_mlp, "moe": routed_mlp}  # by LayerWeights.kind


def temperature_table(
    floor_scale: int, attn_scale: float, length: int, device: torch.device | str
) -> torch.Tensor:
    """Llama 4's NoPE-layer query scales [length, 1, 1] (float32), as transformers computes
    them: log1p(floor((position + 1) / floor_scale)) * attn_scale + 1."""
    positions = torch.arange(length, device=device).float()
    scales = torch.log1p(torch.floor((positions + 1.0) / floor_scale)) * attn_scale + 1.0
    return scales.view(length, 1, 1)


class DecoderModel:
    def __init__(
        self,
        spec: ModelSpec,
        weights: ModelWeights,
        pool: KVPool,
        max_len: int,
        use_triton: bool,
        triton_prefill: bool = False,
        streamer: WeightStreamer | None = None,
        tp: TensorParallel = SINGLE,
    ) -> None:
        """`spec`: the rank's (tensor_parallel.shard_spec) when `tp` has more than one rank."""
        self.spec = spec
        self.tp = tp
        self.w = weights
        self.pool = pool
        self.use_triton = use_triton
        self.triton_prefill = triton_prefill
        self.streamer = streamer  # layers beyond the device budget stream in from host memory
        self.scale = spec.head_dim**-0.5
        self.cos, self.sin = rope_tables(spec, max_len, weights.embed.dtype, weights.embed.device)
        self.no_rope = (torch.ones_like(self.cos), torch.zeros_like(self.sin))  # NoPE layers
        kinds = [spec.attention(i) for i in range(spec.num_layers)]
        self.temperature = {  # (floor_scale, attn_scale) -> its table, for NoPE layers
            t: temperature_table(*t, max_len, weights.embed.device)
            for t in {k.temperature for k in kinds if k.temperature is not None}
        }

    @torch.inference_mode()
    def forward(
        self, tokens: torch.Tensor, meta: AttentionMetadata, logits_index: torch.Tensor
    ) -> torch.Tensor:
        """tokens [T] -> float32 logits [len(logits_index), vocab]; writes the tokens' KV."""
        spec, eps, fast = self.spec, self.spec.rms_norm_eps, self.use_triton
        n = tokens.shape[0]
        x = F.embedding(tokens, self.w.embed)
        delta: torch.Tensor | None = None  # the previous layer's MLP output, not yet added
        if self.streamer is not None:
            self.streamer.begin()
        for index in range(spec.num_layers):
            layer = self.streamer.layer(index) if self.streamer else self.w.layers[index]
            x, h = add_rms_norm(x, delta, layer.input_norm, eps, fast)
            attn = self._attention(index, layer, h, meta)
            out = F.linear(attn.reshape(n, spec.q_size), layer.o, layer.o_bias)
            x, h = add_rms_norm(x, self.tp.all_reduce(out), layer.post_norm, eps, fast)
            delta = self.tp.all_reduce(MLPS[layer.kind](h, layer, spec, fast))
            if self.streamer is not None:
                self.streamer.done(index)
        _, h = add_rms_norm(
            x[logits_index],
            delta[logits_index] if delta is not None else None,
            self.w.norm,
            eps,
            fast,
        )
        return F.linear(h, self.w.lm_head).float()

    def _attention(
        self, index: int, layer: LayerWeights, h: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Layer `index`'s attention over the normed hidden rows h [T, hidden] -> [T, H, D];
        writes the rows' keys and values into the pool."""
        spec, fast, n = self.spec, self.use_triton, h.shape[0]
        kind = spec.attention(index)
        qkv = F.linear(h, layer.qkv, layer.qkv_bias)
        if layer.q_norm is not None:  # Qwen3: RMSNorm each q and k head before RoPE
            eps = spec.rms_norm_eps
            q, k, v = qkv.split([spec.q_size, spec.kv_size, spec.kv_size], dim=-1)
            q = rms_norm_ref(q.reshape(n, spec.num_heads, spec.head_dim), layer.q_norm, eps)
            k = rms_norm_ref(k.reshape(n, spec.num_kv_heads, spec.head_dim), layer.k_norm, eps)
            qkv = torch.cat([q.reshape(n, -1), k.reshape(n, -1), v], dim=-1)
        cos, sin = (self.cos, self.sin) if kind.rope else self.no_rope
        keys, values = self.pool.keys(index), self.pool.values(index)
        meta = meta.lane(self.pool.lanes.lane_of[index])  # its pages (kv_pool.py)
        q = rope_store(
            qkv,
            spec.num_heads,
            spec.num_kv_heads,
            spec.head_dim,
            cos,
            sin,
            meta.positions,
            keys,
            values,
            meta.write_pages,
            meta.write_offsets,
            fast,
            kind.l2_qk_norm,
        )
        if kind.temperature is not None:  # Llama 4's NoPE layers, rounded as HF rounds
            q = (q * self.temperature[kind.temperature][meta.positions]).to(q.dtype)
        return paged_attention(
            q, keys, values, meta, self.scale, fast, self.triton_prefill, kind.chunk
        )
