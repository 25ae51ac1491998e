"""Which checkpoints the paged engine runs, described by the few numbers its kernels need.

Llama 3.x (with its rope scaling), Mistral, Qwen2 (q/k/v biases) and Qwen3 (per-head q/k
norms) share one decoder layout; Qwen3-MoE and Mixtral keep it and route some (or all) of
their layers' MLPs through experts (`MoESpec`); Llama 4's text model adds per-layer
attention kinds (`LayerAttention`: RoPE or NoPE, chunked attention, QK L2 norm, attention
temperature) and routes its MoE layers through a top-1 sigmoid gate beside a shared
expert. Anything else stays on the generic engine.

Below both `engine/` and `plan/` (the planner counts dense checkpoints through it, and
`layout` sizes weights and KV from it): imports nothing of ours, nor torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
    "Llama4ForCausalLM": "llama4",
    "Llama4ForConditionalGeneration": "llama4",  # its text model; the vision tower is skipped
}
GATINGS = ("softmax_topk", "sigmoid_top1")


class UnsupportedModel(ValueError):
    """The checkpoint is not one the paged engine implements."""


@dataclass(frozen=True)
class MoESpec:
    """Routed experts: how many, how a token picks them, which layers have them.

    gating "softmax_topk" (Qwen3-MoE, Mixtral): softmax over the router's logits in float32,
    the top k, renormalised to sum 1 when `norm_topk_prob`; expert outputs are weighted.
    "sigmoid_top1" (Llama 4): the top k logits, each through a sigmoid, scale the expert's
    *input*; a shared expert (`shared_intermediate_size`) runs on every token beside them.
    """

    num_experts: int
    experts_per_token: int
    intermediate_size: int  # one routed expert's gate/up width
    gating: str  # one of GATINGS
    norm_topk_prob: bool
    weights_float32: bool  # Mixtral weighs outputs in float32; Qwen3-MoE rounds to the dtype
    shared_intermediate_size: int  # 0: no shared expert
    layers: frozenset[int]  # decoder layers whose MLP is routed experts

    def expert_parameters(self, hidden: int) -> int:
        """Routed-expert parameters of one MoE layer (gate, up, down of every expert)."""
        return self.num_experts * 3 * hidden * self.intermediate_size

    def read_parameters(self, hidden: int) -> int:
        """Parameters of one MoE layer's MLP read in full every step: router, shared expert."""
        return self.num_experts * hidden + 3 * hidden * self.shared_intermediate_size


def _first(config: Any, *names: str) -> Any:
    return next(getattr(config, n) for n in names if getattr(config, n, None) is not None)


def moe_from_hf_config(arch: str, config: Any) -> MoESpec | None:
    """The experts of a Qwen3-MoE or Mixtral config (None for a dense architecture)."""
    layers = config.num_hidden_layers
    if arch == "mixtral":
        return MoESpec(
            num_experts=config.num_local_experts,
            experts_per_token=config.num_experts_per_tok,
            intermediate_size=config.intermediate_size,
            gating="softmax_topk",
            norm_topk_prob=True,
            weights_float32=True,
            shared_intermediate_size=0,
            layers=frozenset(range(layers)),
        )
    if arch != "qwen3_moe":
        return None
    experts = _first(config, "num_experts", "num_local_experts")
    step, dense = config.decoder_sparse_step, set(getattr(config, "mlp_only_layers", []) or [])
    return MoESpec(
        num_experts=experts,
        experts_per_token=config.num_experts_per_tok,
        intermediate_size=config.moe_intermediate_size,
        gating="softmax_topk",
        norm_topk_prob=bool(config.norm_topk_prob),
        weights_float32=False,
        shared_intermediate_size=0,
        layers=frozenset(
            i for i in range(layers) if i not in dense and experts > 0 and (i + 1) % step == 0
        ),
    )


def llama4_moe(text_config: Any) -> MoESpec:
    """Llama 4's experts (for the Llama 4 decoder): top-k sigmoid routing, one shared
    expert of the routed experts' width, MoE in `moe_layers` (else every
    `interleave_moe_layer_step`-th layer, as transformers' config computes it)."""
    layers = text_config.num_hidden_layers
    moe_layers = getattr(text_config, "moe_layers", None)
    if moe_layers is None:
        step = getattr(text_config, "interleave_moe_layer_step", 1)
        moe_layers = range(step - 1, layers, step)
    return MoESpec(
        num_experts=text_config.num_local_experts,
        experts_per_token=text_config.num_experts_per_tok,
        intermediate_size=text_config.intermediate_size,
        gating="sigmoid_top1",
        norm_topk_prob=False,
        weights_float32=False,
        shared_intermediate_size=text_config.intermediate_size,
        layers=frozenset(moe_layers),
    )


@dataclass(frozen=True)
class LayerAttention:
    """How one layer's attention differs from Llama 3's (the defaults)."""

    rope: bool = True  # False: a NoPE layer (Llama 4's global layers)
    chunk: int = 0  # attention_chunk_size: a token sees only its own chunk's tokens; 0: all
    l2_qk_norm: float | None = None  # Llama 4: q and k L2-normed after RoPE, with this eps
    # Llama 4's NoPE layers: q scaled by log1p(floor((pos + 1) / floor_scale)) * scale + 1.
    temperature: tuple[int, float] | None = None  # (floor_scale, attn_scale)

    def key_start(self, position: int) -> int:
        """The first key position a query at `position` attends to."""
        return position // self.chunk * self.chunk if self.chunk else 0


DEFAULT_ATTENTION = LayerAttention()


@dataclass(frozen=True)
class KVLanes:
    """Which page holds each layer's KV (the paged engine's pool and the layout read this).

    A page holds `layers_per_page` layers of `page_size` tokens. Lane 0 holds the full
    attention layers and keeps every token; lanes 1..`chunk_lanes` hold the chunked-attention
    layers and keep only the current attention chunk (`chunk` tokens). A model without
    chunked layers (or whose chunked layers are not a whole multiple of its full ones) has
    one lane of every layer: pages as before, nothing released.
    """

    layers_per_page: int
    lane_of: tuple[int, ...]  # per layer: its lane
    slot_of: tuple[int, ...]  # per layer: its index among the page's layers
    chunk: int = 0  # tokens of the chunked lanes' attention chunk; 0: no chunked lanes

    @property
    def chunk_lanes(self) -> int:
        return max(self.lane_of) if self.chunk else 0


def kv_lanes(spec: ModelSpec) -> KVLanes:
    """Pages of #full layers, one lane of them and #chunked / #full lanes of chunked layers,
    when the numbers divide and every chunked layer has the same chunk; else one lane."""
    full = [i for i in range(spec.num_layers) if not spec.attention(i).chunk]
    chunked = [i for i in range(spec.num_layers) if spec.attention(i).chunk]
    chunks = {spec.attention(i).chunk for i in chunked}
    if not full or not chunked or len(chunked) % len(full) or len(chunks) != 1:
        every = tuple(range(spec.num_layers))
        return KVLanes(spec.num_layers, (0,) * spec.num_layers, every)
    g = len(full)
    lane, slot = [0] * spec.num_layers, [0] * spec.num_layers
    for k, i in enumerate(full):
        slot[i] = k
    for k, i in enumerate(chunked):
        lane[i], slot[i] = 1 + k // g, k % g
    return KVLanes(g, tuple(lane), tuple(slot), chunks.pop())


def llama4_layer_types(config: Any) -> list[str]:
    """Llama 4's attention layer types ("chunked_attention" or "full_attention"), as
    transformers derives them: config.json's list, else chunked attention in the RoPE layers
    (`no_rope_layers[i]` true), a NoPE layer every `no_rope_layer_interval`-th. The planner
    counts chunked layers' KV by the same list."""
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    chunk = getattr(config, "attention_chunk_size", None)
    return ["chunked_attention" if r and chunk else "full_attention" for r in _rope_layers(config)]


def _rope_layers(config: Any) -> list[int]:
    """Llama 4's `no_rope_layers` (1: the layer uses RoPE), or transformers' default."""
    interval = getattr(config, "no_rope_layer_interval", 4)
    return list(
        getattr(config, "no_rope_layers", None)
        or [int((i + 1) % interval != 0) for i in range(config.num_hidden_layers)]
    )


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2, or attention_bias
    o_bias: bool  # attention_bias (Llama, Qwen3)
    qk_norm: bool  # Qwen3
    hf_config: Any  # kept for the rotary tables (HF's own rope code computes them)
    moe: MoESpec | None = None  # routed experts, in the layers it names
    # Per-layer attention kinds (Llama 4); empty: every layer is DEFAULT_ATTENTION.
    layer_attention: tuple[LayerAttention, ...] = ()
    # Llama 4 rotates interleaved (even, odd) pairs: its q and k rows are permuted per head at
    # load time (evens, then odds) so that the rotate-half RoPE computes the same scores.
    rope_interleaved: bool = False

    def attention(self, layer: int) -> LayerAttention:
        return self.layer_attention[layer] if self.layer_attention else DEFAULT_ATTENTION

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, dtype_size: int) -> int:
        return 2 * self.num_layers * self.kv_size * dtype_size

    def kv_lanes(self) -> KVLanes:
        """How its layers' KV is laid out in pages (`kv_lanes`)."""
        return kv_lanes(self)

    def is_moe_layer(self, index: int) -> bool:
        return self.moe is not None and index in self.moe.layers

    def layer_parameters(self, index: int = 0) -> int:
        """Parameters of decoder layer `index` (the elements of its contiguous weight block);
        layers differ only where some MLPs are routed experts and others dense."""
        h = self.hidden_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        attn += (self.q_size + 2 * self.kv_size) * self.qkv_bias + h * self.o_bias
        attn += 2 * self.head_dim * self.qk_norm  # Qwen3's per-head q/k RMSNorm weights
        if self.moe is not None and self.is_moe_layer(index):
            mlp = self.moe.expert_parameters(h) + self.moe.read_parameters(h)
        else:
            mlp = 3 * h * self.intermediate_size  # gate/up/down
        return attn + mlp + 2 * h  # + two RMSNorms

    def expert_parameters(self) -> int:
        """Routed-expert parameters of the whole model (a step reads only its tokens' share)."""
        if self.moe is None:
            return 0
        return len(self.moe.layers) * self.moe.expert_parameters(self.hidden_size)

    def outer_parameters(self) -> int:
        """Parameters outside the layers: embeddings, LM head unless tied, final norm."""
        h = self.hidden_size
        return self.vocab_size * h * (1 if self.tie_word_embeddings else 2) + h

    def num_parameters(self) -> int:
        """Parameters of the checkpoint: embeddings, layers, final norm, LM head unless tied."""
        return self.outer_parameters() + sum(map(self.layer_parameters, range(self.num_layers)))

    @classmethod
    def from_hf_config(cls, config: Any) -> ModelSpec:
        """Describe a transformers config; raise UnsupportedModel for anything else."""
        archs = list(getattr(config, "architectures", None) or [])
        arch = next(
            (SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None
        )
        if arch is None:
            raise UnsupportedModel(f"architectures {archs} are not implemented by the paged engine")
        if arch == "llama4":
            return cls._llama4(config)
        if getattr(config, "hidden_act", "silu") != "silu":
            raise UnsupportedModel(f"activation {config.hidden_act!r} is not implemented")
        if getattr(config, "mlp_bias", False):
            raise UnsupportedModel("MLP biases are not implemented")
        layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
        windowed = arch in ("mistral", "mixtral")
        sliding = getattr(config, "sliding_window", None) if windowed else None
        if layer_types != {"full_attention"} or (
            getattr(config, "use_sliding_window", False) and not windowed
        ):
            raise UnsupportedModel("sliding-window attention layers are not implemented")
        heads = config.num_attention_heads
        max_position = config.max_position_embeddings
        if sliding:  # full attention equals sliding attention within the window
            max_position = min(max_position, sliding)
        return cls(
            arch=arch,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            rms_norm_eps=config.rms_norm_eps,
            max_position=max_position,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2" or bool(getattr(config, "attention_bias", False)),
            o_bias=arch != "qwen2" and bool(getattr(config, "attention_bias", False)),
            qk_norm=arch in ("qwen3", "qwen3_moe"),
            hf_config=config,
            moe=moe_from_hf_config(arch, config),
        )

    @classmethod
    def _llama4(cls, config: Any) -> ModelSpec:
        """Llama 4's text model (Llama4ForCausalLM, or Llama4ForConditionalGeneration's
        text_config with its vision tower skipped): Llama 3's layout with per-layer attention
        kinds; dense layers' MLPs are `intermediate_size_mlp` wide."""
        text = getattr(config, "text_config", None)
        if text is not None:
            logger.info("Llama 4: serving the text model; the vision tower is not loaded")
        t = text or config
        if getattr(t, "hidden_act", "silu") != "silu":
            raise UnsupportedModel(f"activation {t.hidden_act!r} is not implemented")
        moe = llama4_moe(t)
        eps, chunk = t.rms_norm_eps, getattr(t, "attention_chunk_size", None) or 0
        types = llama4_layer_types(t)
        if set(types) - {"full_attention", "chunked_attention"}:
            raise UnsupportedModel(f"Llama 4 layer types {sorted(set(types))} are not known")
        tuning = (int(t.floor_scale), float(t.attn_scale)) if t.attn_temperature_tuning else None
        kinds = tuple(
            LayerAttention(
                rope=bool(rope),
                chunk=chunk if kind == "chunked_attention" else 0,
                l2_qk_norm=eps if rope and t.use_qk_norm else None,
                temperature=None if rope else tuning,
            )
            for rope, kind in zip(_rope_layers(t), types, strict=True)
        )
        tied = getattr(t, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False))
        heads = t.num_attention_heads
        bias = bool(getattr(t, "attention_bias", False))
        return cls(
            arch="llama4",
            vocab_size=t.vocab_size,
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size_mlp,
            num_layers=t.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(t, "num_key_value_heads", None) or heads,
            head_dim=getattr(t, "head_dim", None) or t.hidden_size // heads,
            rms_norm_eps=eps,
            max_position=t.max_position_embeddings,
            tie_word_embeddings=bool(tied),
            qkv_bias=bias,
            o_bias=bias,
            qk_norm=False,
            hf_config=t,
            moe=moe if moe.layers else None,
            layer_attention=kinds,
            rope_interleaved=True,
        )
