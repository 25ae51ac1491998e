"""Which checkpoints the paged engine runs, described by the few numbers its kernels need.

Llama 3.x (with its rope scaling), Mistral, Qwen2 (q/k/v biases) and Qwen3 (per-head q/k
norms) share one decoder layout; anything else stays on the generic engine.

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
}


class UnsupportedModel(ValueError):
    """The checkpoint is not one the paged engine implements."""


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

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, dtype_size: int) -> int:
        return 2 * self.num_layers * self.kv_size * dtype_size

    def layer_parameters(self) -> int:
        """Parameters of one decoder layer (the elements of its contiguous weight block)."""
        h = self.hidden_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        attn += (self.q_size + 2 * self.kv_size) * self.qkv_bias + h * self.o_bias
        attn += 2 * self.head_dim * self.qk_norm  # Qwen3's per-head q/k RMSNorm weights
        return attn + 3 * h * self.intermediate_size + 2 * h  # gate/up/down + two RMSNorms

    def outer_parameters(self) -> int:
        """Parameters outside the layers: embeddings, LM head unless tied, final norm."""
        h = self.hidden_size
        return self.vocab_size * h * (1 if self.tie_word_embeddings else 2) + h

    def num_parameters(self) -> int:
        """Parameters of the checkpoint: embeddings, layers, final norm, LM head unless tied."""
        return self.outer_parameters() + self.num_layers * self.layer_parameters()

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
        sliding = getattr(config, "sliding_window", None) if arch == "mistral" else None
        if layer_types != {"full_attention"} or (
            getattr(config, "use_sliding_window", False) and arch != "mistral"
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
            qk_norm=arch == "qwen3",
            hf_config=config,
        )
