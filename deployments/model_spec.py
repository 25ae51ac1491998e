"""Which checkpoints the paged engine runs, described by the few numbers its kernels need.

Llama 3.x (with its rope scaling), Mistral, Qwen2 (q/k/v biases) and Qwen3 (per-head q/k
norms) share one decoder layout; Qwen3-MoE and Mixtral keep it and route some (or all) of
their layers' MLPs through experts (`MoESpec`); anything else stays on the generic engine.

Below both `engine/` and `plan/` (the planner counts dense checkpoints through it, and
`layout` sizes weights and KV from it): imports nothing of ours, nor torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
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

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, dtype_size: int) -> int:
        return 2 * self.num_layers * self.kv_size * dtype_size

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
