"""Which part of each checkpoint tensor a tensor-parallel rank loads (tensor_parallel.py).

By the tensor's name (as weights.canonical_name and moe_weights.canonical spell it):

- column-parallel, the rank's block of output rows: q/k/v projections (weights and biases:
  rows are heads x head_dim, so a block of rows is a block of whole heads), gate and up
  projections, every routed expert's and the shared expert's gate and up;
- row-parallel, the rank's block of input columns: o and down projections (experts' too);
- fused gate/up tensors (transformers' stacked `experts.gate_up_proj`, Llama 4's) split in
  their gate and up halves first, each half cut, the two blocks joined again;
- the o projection's bias only on rank 0 (zeros elsewhere): it is added once, by the sum;
- everything else (embeddings, norms, LM head, q/k norms, routers) whole on every rank.

`rank_part` takes a tensor or a safetensors slice (`safe_open(...).get_slice(name)`, read
lazily): from a slice only the rank's rows or columns are read from the file.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from deployments.engine.paged.moe_weights import canonical
from deployments.engine.paged.tensor_parallel import TensorParallel, block

LAYER_REST = re.compile(r"^model\.layers\.\d+\.(.+)$")
ROWS = re.compile(
    r"self_attn\.[qkv]_proj\.(weight|bias)"
    r"|mlp\.(experts\.\d+\.|shared_expert\.)?(gate|up)_proj\.weight"
)
COLUMNS = re.compile(
    r"self_attn\.o_proj\.weight|mlp\.(experts\.\d+\.|shared_expert\.)?down_proj\.weight"
)
# Stacked experts: (dim cut, whether it holds gate and up halves). transformers' live
# modules: gate_up [E, 2I, H], down [E, H, I]; Llama 4: gate_up [E, H, 2I], down [E, I, H].
STACKED = {
    ("mlp.experts.gate_up_proj", False): (1, True),
    ("mlp.experts.down_proj", False): (2, False),
    ("mlp.experts.gate_up_proj", True): (2, True),
    ("mlp.experts.down_proj", True): (1, False),
}


def rank_part(name: str, tensor: Any, tp: TensorParallel, llama4: bool) -> torch.Tensor:
    """The part of checkpoint tensor `name` (canonical spelling) that rank `tp.rank` holds;
    `tensor` (a torch tensor, or a lazy safetensors slice) whole at size 1 and for
    replicated tensors."""
    if tp.size == 1:
        return _whole(tensor)
    m = LAYER_REST.match(name)
    if m is None:
        return _whole(tensor)  # embeddings, final norm, LM head
    rest = canonical(m.group(1))
    if ROWS.fullmatch(rest):
        return _cut(tensor, 0, tp)
    if COLUMNS.fullmatch(rest):
        return _cut(tensor, 1, tp)
    if rest == "self_attn.o_proj.bias":
        whole = _whole(tensor)
        return whole if tp.rank == 0 else torch.zeros_like(whole)
    if (rest, llama4) in STACKED:
        dim, halves = STACKED[(rest, llama4)]
        if halves:  # gate rows (or columns), then up: the rank's block of each
            half = _shape(tensor)[dim] // 2
            gate, up = _cut(tensor, dim, tp, 0, half), _cut(tensor, dim, tp, half, half)
            return torch.cat([gate, up], dim=dim)
        return _cut(tensor, dim, tp)
    return _whole(tensor)


def _shape(tensor: Any) -> list[int]:
    return list(tensor.shape) if isinstance(tensor, torch.Tensor) else tensor.get_shape()


def _whole(tensor: Any) -> torch.Tensor:
    return tensor if isinstance(tensor, torch.Tensor) else tensor[:]


def _cut(
    tensor: Any, dim: int, tp: TensorParallel, start: int = 0, width: int | None = None
) -> torch.Tensor:
    """The rank's block of `width` entries of `dim` from `start` (default: all of it); a
    view of a tensor, a read of only that block from a safetensors slice."""
    width = _shape(tensor)[dim] if width is None else width
    part = block(width, tp.size, tp.rank)
    index = (slice(None),) * dim + (slice(start + part.start, start + part.stop),)
    return tensor[index]
