"""The decoder's weights in the layout the paged engine computes with.

q/k/v are fused into one matrix and gate/up into another, so each dense layer runs four matrix
products; an MoE layer holds its experts stacked instead (moe_weights.py). Weights come from a
Hugging Face state dict or safetensors checkpoint (names mapped and every tensor checked), or
from a seeded random initialisation for benchmarks. Tensors are allocated where the caller's
allocation scope says (the replica's RMM resource on a GPU).

Llama 4's names are mapped to Llama's (`feed_forward.` is `mlp.`; a multimodal checkpoint's
`language_model.` prefix dropped, its vision tower ignored), and its q and k rows permuted per
head from interleaved RoPE pairs to rotate-half order (`halves_order`).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from deployments.engine.paged.moe_weights import moe_covers, moe_names, moe_shapes, moe_target
from deployments.engine.paged.tensor_parallel import SINGLE, TensorParallel
from deployments.engine.paged.tp_weights import rank_part
from deployments.memory_advice import isolated_empty
from deployments.model_spec import ModelSpec

logger = logging.getLogger(__name__)
LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass
class LayerWeights:
    qkv: torch.Tensor  # [q_size + 2 * kv_size, hidden]
    o: torch.Tensor  # [hidden, q_size]
    input_norm: torch.Tensor  # [hidden]
    post_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor | None = None  # dense MLP: [2 * intermediate, hidden]
    down: torch.Tensor | None = None  # dense MLP: [hidden, intermediate]
    qkv_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None  # [head_dim]
    k_norm: torch.Tensor | None = None
    experts_gate_up: torch.Tensor | None = None  # MoE: [experts, 2 * expert width, hidden]
    experts_down: torch.Tensor | None = None  # MoE: [experts, hidden, expert width]
    router: torch.Tensor | None = None  # MoE: [experts, hidden]
    shared_gate_up: torch.Tensor | None = None  # Llama 4's shared expert
    shared_down: torch.Tensor | None = None

    @property
    def kind(self) -> str:
        """`moe` for routed experts, `dense` for one gated MLP (model.py dispatches on it)."""
        return "dense" if self.router is None else "moe"


@dataclass
class ModelWeights:
    embed: torch.Tensor  # [vocab, hidden]
    layers: list[LayerWeights]
    norm: torch.Tensor
    lm_head: torch.Tensor  # the embedding itself when tied
    blocks: list[torch.Tensor] = field(default_factory=list)  # each layer's contiguous block

    def tensors(self) -> Iterator[torch.Tensor]:
        seen: set[int] = set()
        for t in [self.embed, self.norm, self.lm_head]:
            if id(t) not in seen:
                seen.add(id(t))
                yield t
        for layer in self.layers:
            for f in fields(layer):
                t = getattr(layer, f.name)
                if t is not None:
                    yield t

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def layer_shapes(spec: ModelSpec, index: int = 0) -> dict[str, tuple[int, ...]]:
    """The tensors of layer `index`, in the order they sit in its contiguous block."""
    h, i = spec.hidden_size, spec.intermediate_size
    qkv = spec.q_size + 2 * spec.kv_size
    moe = spec.is_moe_layer(index)
    shapes: dict[str, tuple[int, ...]] = moe_shapes(spec) if moe else {}
    shapes |= {"qkv": (qkv, h), "o": (h, spec.q_size)}
    if not moe:
        shapes |= {"gate_up": (2 * i, h), "down": (h, i)}
    shapes |= {"input_norm": (h,), "post_norm": (h,)}
    if spec.qkv_bias:
        shapes["qkv_bias"] = (qkv,)
    if spec.o_bias:
        shapes["o_bias"] = (h,)
    if spec.qk_norm:
        shapes["q_norm"] = shapes["k_norm"] = (spec.head_dim,)
    return shapes


def layer_numel(spec: ModelSpec, index: int = 0) -> int:
    return sum(math.prod(shape) for shape in layer_shapes(spec, index).values())


def layer_views(block: torch.Tensor, spec: ModelSpec, index: int = 0) -> LayerWeights:
    """Layer `index`'s tensors as views of one contiguous block (so it copies as one DMA)."""
    views, offset = {}, 0
    for name, shape in layer_shapes(spec, index).items():
        n = math.prod(shape)
        views[name] = block[offset : offset + n].view(shape)
        offset += n
    return LayerWeights(**views)


def allocate(
    spec: ModelSpec,
    dtype: torch.dtype,
    device: str | torch.device,
    host_layers: frozenset[int] = frozenset(),
    isolate: bool = False,
) -> ModelWeights:
    """Allocate the model; layers in `host_layers` go to pinned host memory (streamed). With
    `isolate` each layer block sits alone in whole 2 MiB blocks (advised one by one)."""

    def empty(*shape: int) -> torch.Tensor:
        return torch.empty(*shape, dtype=dtype, device=device)

    def block(numel: int) -> torch.Tensor:
        return isolated_empty(numel, dtype, device) if isolate else empty(numel)

    pin = torch.device(device).type == "cuda"
    blocks = [
        torch.empty(layer_numel(spec, index), dtype=dtype, pin_memory=pin)
        if index in host_layers
        else block(layer_numel(spec, index))
        for index in range(spec.num_layers)
    ]
    h = spec.hidden_size
    embed = empty(spec.vocab_size, h)
    lm_head = embed if spec.tie_word_embeddings else empty(spec.vocab_size, h)
    layers = [layer_views(b, spec, index) for index, b in enumerate(blocks)]
    return ModelWeights(embed, layers, empty(h), lm_head, blocks)


QK_PROJ = re.compile(r"^model\.layers\.\d+\.self_attn\.[qk]_proj\.(weight|bias)$")


def canonical_name(spec: ModelSpec, name: str) -> str:
    """A checkpoint tensor's name as a Llama checkpoint spells it."""
    if spec.arch != "llama4":
        return name
    name = name.removeprefix("language_model.")
    return name.replace(".feed_forward.", ".mlp.")


def halves_order(tensor: torch.Tensor, head_dim: int) -> torch.Tensor:
    """q or k projection rows [heads * D, ...] from interleaved RoPE pairs (x0, x1), (x2, x3)...
    to rotate-half order (x0, x2, ..., x1, x3, ...) within each head: rotating pair i by
    angle f_i is then rotate-half RoPE, and q.k is unchanged (both permuted alike)."""
    rest = tensor.shape[1:]
    pairs = tensor.reshape(-1, head_dim // 2, 2, *rest)
    return pairs.transpose(1, 2).reshape(tensor.shape)


def _prepared(spec: ModelSpec, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The checkpoint tensor as the engine stores it (Llama 4's q/k rows reordered)."""
    if spec.rope_interleaved and QK_PROJ.match(name):
        return halves_order(tensor, spec.head_dim)
    return tensor


def _target(w: ModelWeights, spec: ModelSpec, name: str) -> torch.Tensor | None:
    """The tensor (or slice) a checkpoint tensor fills; None for names we ignore."""
    if name == "model.embed_tokens.weight":
        return w.embed
    if name == "model.norm.weight":
        return w.norm
    if name == "lm_head.weight":
        return None if spec.tie_word_embeddings else w.lm_head
    m = LAYER.match(name)
    if m is None:
        return None
    layer, rest = w.layers[int(m.group(1))], m.group(2)
    if (
        layer.kind == "moe"
        and spec.moe
        and (target := moe_target(layer, spec.moe, rest)) is not None
    ):
        return target
    q, kv, inter = spec.q_size, spec.kv_size, spec.intermediate_size
    qkv_slices = {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv)}
    if pm := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
        full = layer.qkv if pm.group(2) == "weight" else layer.qkv_bias
        return None if full is None else full[qkv_slices[pm.group(1)]]
    simple = {
        "self_attn.o_proj.weight": layer.o,
        "self_attn.o_proj.bias": layer.o_bias,
        "input_layernorm.weight": layer.input_norm,
        "post_attention_layernorm.weight": layer.post_norm,
        "self_attn.q_norm.weight": layer.q_norm,
        "self_attn.k_norm.weight": layer.k_norm,
    }
    if layer.kind == "dense":
        simple |= {
            "mlp.down_proj.weight": layer.down,
            "mlp.gate_proj.weight": layer.gate_up[:inter],
            "mlp.up_proj.weight": layer.gate_up[inter:],
        }
    return simple.get(rest)


def expected_names(spec: ModelSpec) -> set[str]:
    """Every checkpoint tensor name the model needs."""
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not spec.tie_word_embeddings:
        names.add("lm_head.weight")
    per_layer = [
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
    ]
    dense = ["mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
    moe = moe_names(spec.moe) if spec.moe is not None else []
    if spec.qkv_bias:
        per_layer += ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
    if spec.o_bias:
        per_layer.append("self_attn.o_proj.bias")
    if spec.qk_norm:
        per_layer += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    for i in range(spec.num_layers):
        mlp = moe if spec.is_moe_layer(i) else dense
        names.update(f"model.layers.{i}.{n}" for n in per_layer + mlp)
    return names


@torch.no_grad()  # views of one layer block: autograd must not track the copies into them
def copy_tensors(
    weights: ModelWeights,
    spec: ModelSpec,
    items: Iterable[tuple[str, Any]],
    tp: TensorParallel = SINGLE,
) -> set[str]:
    """Copy checkpoint tensors into `weights` (shapes checked); return the names copied.
    With `tp`, `spec` is the rank's (tensor_parallel.shard_spec) and each tensor's part
    for the rank is copied (tp_weights.py); items may then be lazy safetensors slices."""
    loaded: set[str] = set()
    for raw, tensor in items:
        name = canonical_name(spec, raw)
        target = _target(weights, spec, name)
        if target is None:
            continue
        tensor = rank_part(name, tensor, tp, spec.arch == "llama4")
        if tuple(target.shape) != tuple(tensor.shape):
            raise ValueError(
                f"{raw}: checkpoint shape {tuple(tensor.shape)} != {tuple(target.shape)}"
            )
        target.copy_(_prepared(spec, name, tensor))
        loaded.update(_covers(weights, spec, name))
    return loaded


def _covers(weights: ModelWeights, spec: ModelSpec, name: str) -> list[str]:
    """The expected names (`expected_names`) a copied checkpoint tensor provides."""
    m = LAYER.match(name)
    if m is None or spec.moe is None or weights.layers[int(m.group(1))].kind != "moe":
        return [name]
    return [f"model.layers.{m.group(1)}.{n}" for n in moe_covers(spec.moe, m.group(2))]


def check_complete(spec: ModelSpec, loaded: set[str]) -> None:
    missing = expected_names(spec) - loaded
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")


def load_state(
    weights: ModelWeights, spec: ModelSpec, items: Iterable[tuple[str, torch.Tensor]]
) -> None:
    """Copy checkpoint tensors into `weights`; raise if any expected tensor is missing."""
    check_complete(spec, copy_tensors(weights, spec, items))


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: the shards its index names, or one."""
    root = Path(path)
    index = root / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        names = ["model.safetensors"]
    files = [root / name for name in names]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"checkpoint {root} lacks {', '.join(missing[:3])}")
    return files


def shard_items(file: Path, lazy: bool = False) -> Iterator[tuple[str, Any]]:
    """(name, tensor) pairs of one safetensors file, one tensor at a time; with `lazy`,
    (name, slice) pairs whose tensors are read only as far as they are indexed (a
    tensor-parallel rank reads its part: tp_weights.rank_part)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
            yield name, (f.get_slice(name) if lazy else f.get_tensor(name))


def layers_loaded(spec: ModelSpec, loaded: set[str]) -> int:
    """How many decoder layers have every tensor they need."""
    incomplete = {
        int(m.group(1))
        for name in expected_names(spec) - loaded
        if (m := LAYER.match(name)) is not None
    }
    return spec.num_layers - len(incomplete)


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def load_checkpoint(
    weights: ModelWeights, spec: ModelSpec, path: str | Path, tp: TensorParallel = SINGLE
) -> None:
    """Load a (possibly sharded) safetensors checkpoint, logging progress after each shard:
    bytes read so far, layers complete so far, seconds since the start. With `tp`, the
    rank's parts only (`copy_tensors`)."""
    files = checkpoint_files(path)
    total = sum(f.stat().st_size for f in files)
    start, done, loaded = time.perf_counter(), 0, set()
    for number, file in enumerate(files, 1):
        loaded |= copy_tensors(weights, spec, shard_items(file, lazy=tp.size > 1), tp)
        done += file.stat().st_size
        logger.info(
            "loaded shard %d/%d (%s): %s of %s, %d of %d layers, %.1f s",
            number,
            len(files),
            file.name,
            _size(done),
            _size(total),
            layers_loaded(spec, loaded),
            spec.num_layers,
            time.perf_counter() - start,
        )
    check_complete(spec, loaded)


def init_random(weights: ModelWeights, seed: int = 0, std: float = 0.02) -> None:
    """Seeded random weights (norms at 1) for benchmarks of real architectures' shapes."""
    generators: dict[torch.device, torch.Generator] = {}
    for t in weights.tensors():
        if t.dim() == 1:
            t.fill_(1.0)
            continue
        if t.device not in generators:  # host-resident (streamed) layers draw on the CPU
            generators[t.device] = torch.Generator(device=t.device).manual_seed(seed)
        t.normal_(0.0, std, generator=generators[t.device])
