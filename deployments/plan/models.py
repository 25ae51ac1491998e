"""What a model keeps in memory and what one decode step reads: presets and Hugging Face configs.

Parameters fall in three groups, by what a decode step reads of them:

- **read**: read in full every step (attention, norms, dense and shared-expert MLPs, MoE
  routers, the LM head);
- **experts**: a mixture-of-experts model's routed experts. All are resident, but each token
  reads only the ``experts_per_token`` its router picks in every MoE layer. A step of ``n``
  tokens reads the *expected* share of distinct experts they pick, ``1 - (1 - k/E)^n``,
  assuming uniform, independent routing (one token: exactly ``k/E``);
- **idle**: resident but not read while decoding text: the input embedding table (one row per
  token, a few KiB, counted as zero) and a vision encoder.

KV caches: ``2 (keys, values) x KV heads x head dim x dtype bytes`` per token per layer; layers
with chunked or sliding attention keep at most their window of tokens.

Checkpoints the paged engine runs (dense, Qwen3-MoE, Mixtral) are described through its
`ModelSpec`; Llama 4 through its own numbers. Presets are the published config.json values,
run through the same code as a config path, so a preset and its config.json give the same
figures.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from deployments.model_spec import ModelSpec, UnsupportedModel, llama4_layer_types


class ModelError(ValueError):
    """An unknown preset, an unreadable config, or an architecture the planner cannot count."""


@dataclass(frozen=True)
class ModelFootprint:
    """Parameter counts by how decoding reads them, and the KV cache's shape."""

    name: str
    source: str
    read_params: int
    expert_params: int
    idle_params: int
    num_experts: int  # routed experts per MoE layer; 0 for a dense model
    experts_per_token: int
    full_kv_layers: int  # layers whose KV grows with the context
    window_kv_layers: int  # layers keeping at most kv_window_tokens (chunked/sliding attention)
    kv_window_tokens: int
    kv_heads: int
    head_dim: int
    max_context: int
    vision_params: int = 0  # part of idle_params

    @property
    def num_parameters(self) -> int:
        return self.read_params + self.expert_params + self.idle_params

    @property
    def active_parameters(self) -> int:
        """Parameters a token uses, as model cards count them: read ones, its experts' share,
        and the embedding table (Llama 4 Scout: 17B)."""
        experts = round(self.expert_params * self.expert_share(1))
        return self.read_params + experts + self.idle_params - self.vision_params

    def expert_share(self, tokens: int) -> float:
        """Expected share of routed-expert bytes a step of `tokens` tokens reads."""
        if not self.num_experts or tokens <= 0:
            return 0.0
        return 1.0 - (1.0 - self.experts_per_token / self.num_experts) ** tokens

    def kv_bytes_per_token_layer(self, dtype_bytes: int) -> int:
        return 2 * self.kv_heads * self.head_dim * dtype_bytes

    def kv_bytes(self, context_tokens: int, dtype_bytes: int) -> int:
        """One user's KV cache at `context_tokens` of context."""
        windowed = min(context_tokens, self.kv_window_tokens)
        tokens = self.full_kv_layers * context_tokens + self.window_kv_layers * windowed
        return tokens * self.kv_bytes_per_token_layer(dtype_bytes)


def from_spec(name: str, source: str, spec: ModelSpec) -> ModelFootprint:
    """A checkpoint the paged engine runs; its KV layout is the engine's (all layers)."""
    embedding = 0 if spec.tie_word_embeddings else spec.vocab_size * spec.hidden_size
    total, experts = spec.num_parameters(), spec.expert_parameters()
    return ModelFootprint(
        name,
        source,
        read_params=total - embedding - experts,
        expert_params=experts,
        idle_params=embedding,
        num_experts=spec.moe.num_experts if spec.moe else 0,
        experts_per_token=spec.moe.experts_per_token if spec.moe else 0,
        full_kv_layers=spec.num_layers,
        window_kv_layers=0,
        kv_window_tokens=0,
        kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_context=spec.max_position,
    )


def _vision_params(v: Any, text_hidden: int) -> int:
    """Llama 4's vision encoder, adapter and projector (transformers' Llama4VisionModel)."""
    h, inter, patch = v.hidden_size, v.intermediate_size, v.patch_size
    layer = 4 * (h * h + h) + (h * inter + inter) + (inter * h + h) + 2 * 2 * h  # + 2 LayerNorms
    stem = getattr(v, "num_channels", 3) * patch * patch * h + h  # patch embedding, class token
    stem += ((v.image_size // patch) ** 2 + 1) * h + 2 * 2 * h  # positions, pre/post LayerNorms
    adapter = inter * v.projector_input_dim + v.projector_output_dim**2
    projector = v.vision_output_dim * text_hidden + text_hidden * bool(
        getattr(v, "multi_modal_projector_bias", False)
    )
    return v.num_hidden_layers * layer + stem + adapter + projector


def _llama4(name: str, source: str, config: Any) -> ModelFootprint:
    """Llama 4 (Scout, Maverick): MoE layers with one shared expert, chunked-attention layers."""
    t = getattr(config, "text_config", None) or config
    h, layers, heads = t.hidden_size, t.num_hidden_layers, t.num_attention_heads
    kv_heads = getattr(t, "num_key_value_heads", None) or heads
    head_dim = getattr(t, "head_dim", None) or h // heads
    experts, step = t.num_local_experts, getattr(t, "interleave_moe_layer_step", 1)
    moe_layers = getattr(t, "moe_layers", None)
    if moe_layers is None:
        moe_layers = range(step - 1, layers, step)
    n_moe = len(moe_layers)
    bias = bool(getattr(t, "attention_bias", False))
    attn = 2 * h * heads * head_dim + 2 * h * kv_heads * head_dim
    attn += bias * (heads * head_dim + 2 * kv_heads * head_dim + h)
    expert = 3 * h * t.intermediate_size  # gate, up, down
    tied = bool(getattr(t, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)))
    read = layers * (attn + 2 * h) + n_moe * (expert + h * experts)  # shared expert, router
    read += (layers - n_moe) * 3 * h * t.intermediate_size_mlp + h + t.vocab_size * h
    vision = getattr(config, "vision_config", None)
    vision_params = _vision_params(vision, h) if vision is not None else 0
    chunk = getattr(t, "attention_chunk_size", None)
    types = llama4_layer_types(t)  # the engine's ModelSpec reads the same list
    windowed = sum(kind != "full_attention" for kind in types)
    return ModelFootprint(
        name,
        source,
        read_params=read,
        expert_params=n_moe * experts * expert,
        idle_params=(0 if tied else t.vocab_size * h) + vision_params,
        num_experts=experts,
        experts_per_token=t.num_experts_per_tok,
        full_kv_layers=layers - windowed,
        window_kv_layers=windowed,
        kv_window_tokens=chunk or 0,
        kv_heads=kv_heads,
        head_dim=head_dim,
        max_context=t.max_position_embeddings,
        vision_params=vision_params,
    )


def footprint_from_config(name: str, source: str, config: Any) -> ModelFootprint:
    """Describe a transformers config (or an object with the same attributes)."""
    model_type = getattr(config, "model_type", None)
    if model_type in ("llama4", "llama4_text"):
        return _llama4(name, source, config)
    try:
        return from_spec(name, source, ModelSpec.from_hf_config(config))
    except UnsupportedModel as exc:
        raise ModelError(
            f"{source}: cannot count this model ({exc}); the planner knows Llama, Mistral, "
            "Qwen2, Qwen3 (dense), Qwen3-MoE, Mixtral and Llama 4 (MoE) configs"
        ) from exc


def load_config(path: str) -> Any:
    """A local config.json (or a directory holding one) as a transformers config; no hub."""
    file = Path(path)
    if file.is_dir():
        file = file / "config.json"
    if not file.is_file():
        raise ModelError(f"no such model preset or config file: {path}")
    try:
        raw = json.loads(file.read_text())
        model_type = raw.pop("model_type")
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise ModelError(
            f"{file}: not a Hugging Face config.json with a model_type ({exc})"
        ) from exc
    from transformers import AutoConfig  # lazy: presets need no transformers

    try:
        return AutoConfig.for_model(model_type, **raw)
    except (ValueError, TypeError, KeyError) as exc:
        raise ModelError(f"{file}: transformers cannot read this config ({exc})") from exc


def _ns(values: dict[str, Any]) -> SimpleNamespace:
    return SimpleNamespace(**{k: _ns(v) if isinstance(v, dict) else v for k, v in values.items()})


# Published config.json values (huggingface.co/<repo>/blob/main/config.json), as transformers
# reads them; fields left out take transformers' defaults (e.g. head_dim = hidden / heads).
_LLAMA_3_1 = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 128256,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}
PRESETS: dict[str, dict[str, Any]] = {
    # meta-llama/Llama-3.1-8B-Instruct
    "llama-3.1-8b": {
        **_LLAMA_3_1,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
    },
    # meta-llama/Llama-3.1-70B-Instruct
    "llama-3.1-70b": {
        **_LLAMA_3_1,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
    },
    # meta-llama/Llama-4-Scout-17B-16E-Instruct (interleave_moe_layer_step 1: every layer is
    # MoE; no_rope_layers left to transformers' default, which equals the published list
    # [1, 1, 1, 0] * 12). max_position_embeddings: the Instruct model's 10M; the base
    # model's config says 262144.
    "llama-4-scout-17b-16e": {
        "model_type": "llama4",
        "architectures": ["Llama4ForConditionalGeneration"],
        "text_config": {
            "model_type": "llama4_text",
            "hidden_size": 5120,
            "num_hidden_layers": 48,
            "num_attention_heads": 40,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "intermediate_size": 8192,
            "intermediate_size_mlp": 16384,
            "num_local_experts": 16,
            "num_experts_per_tok": 1,
            "interleave_moe_layer_step": 1,
            "vocab_size": 202048,
            "max_position_embeddings": 10485760,
            "attention_chunk_size": 8192,
            "tie_word_embeddings": False,
        },
        "vision_config": {
            "hidden_size": 1408,
            "num_hidden_layers": 34,
            "intermediate_size": 5632,
            "image_size": 336,
            "patch_size": 14,
            "num_channels": 3,
            "projector_input_dim": 4096,
            "projector_output_dim": 4096,
            "vision_output_dim": 4096,
            "multi_modal_projector_bias": False,
        },
    },
}


def resolve_model(name_or_path: str) -> ModelFootprint:
    """A preset by name, else a local Hugging Face config path."""
    if name_or_path in PRESETS:
        return footprint_from_config(name_or_path, "preset", _ns(PRESETS[name_or_path]))
    if not Path(name_or_path).exists():
        raise ModelError(
            f"unknown model {name_or_path!r}: not a preset ({', '.join(PRESETS)}) "
            "and no such config path"
        )
    config = load_config(name_or_path)
    path = Path(name_or_path)
    name = path.parent.name if path.is_file() else path.name
    return footprint_from_config(name or str(path), str(path), config)
