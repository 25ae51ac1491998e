"""Where one replica's model and KV caches go, decided before a byte is allocated.

`plan_layout` is pure (no torch, no allocation): from the model's `ModelSpec`, the app's
args, the node's platform and the memory free before the engine allocates, it decides

- which decoder layers are *resident* (device memory), *streamed* (pinned host memory, copied
  in through device buffers each step) or *cold* (Grace: managed memory advised to the host,
  read in place over NVLink-C2C), and whether memory is placed by advice at all;
- the KV pool's pages (from the KV budget: `kv_budget_bytes`, the one place its formula
  lives), the host tier's pages and kind, bytes per token, pages kept free ahead of need;
- whether decode steps replay CUDA graphs.

The paged engine builds from a `Layout` (engine/paged/build.py) and reports its figures in
its stats, which the replica's admission and routing report read (`capacity.replica_memory`);
the generic engine and the planner size their KV budgets by `kv_budget_bytes`.

Imports only `config` and `model_spec` of ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from deployments.config import AppArgs
from deployments.model_spec import KVLanes, ModelSpec

if TYPE_CHECKING:
    from deployments.platform import PlatformInfo

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
STREAM_BUFFERS = 3  # device buffers streamed layers pass through (weight_stream.py)
MANAGED_HOST_TIER = "managed memory advised to the host"
PINNED_HOST_TIER = "pinned host memory"


def dtype_name(configured: str, device: str) -> str:
    """The weights' and KV's dtype: `auto` is bfloat16 on a GPU, float32 on CPU."""
    if configured == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    return configured


def kv_budget_bytes(configured: int | None, fraction: float, free_bytes: int) -> int:
    """The KV budget: `kv_cache.budget_bytes` when set, else `kv_cache.budget_fraction` of the
    memory free once the weights are in (`free_bytes`, never counted below 0)."""
    if configured is not None:
        return int(configured)
    return int(fraction * max(0, free_bytes))


@dataclass(frozen=True)
class Layout:
    """One engine's placement and sizes (bytes, pages of `page_size` tokens)."""

    device: str  # torch device string
    dtype: str  # torch dtype name of weights and KV
    dtype_bytes: int
    advise: bool  # Grace with managed memory: every tier is managed memory placed by advice
    resident_layers: tuple[int, ...]
    streamed_layers: tuple[int, ...]  # pinned host memory, streamed in (never with `advise`)
    cold_layers: tuple[int, ...]  # managed memory advised to the host, read in place
    weight_bytes: int  # all weights
    weights_in_resource_bytes: int  # of which the replica's memory resource holds
    max_model_len: int  # tokens of context a request may reach
    page_size: int  # tokens per KV page
    page_bytes: int  # one page: keys and values of `layers_per_page` layers (one lane)
    kv_budget_bytes: int  # what the device pool was sized from
    num_pages: int  # device pool pages, the scratch page included
    host_pages: int  # host tier pages (0: no tier)
    host_tier: str | None  # MANAGED_HOST_TIER, PINNED_HOST_TIER, or None
    keep_free_pages: int  # device pages kept free by moving idle users down ahead of need
    decode_graphs: bool  # decode steps replay CUDA graphs
    graphs_off_reason: str | None  # why not, when not
    kv_lanes: int = 1  # pages a block of tokens needs while in its current chunk (all lanes)
    chunk_lanes: int = 0  # of which hold chunked-attention layers (ModelSpec.kv_lanes)
    chunk_tokens: int = 0  # their attention chunk: the tokens they keep

    @property
    def usable_pages(self) -> int:
        """Device pages users may hold (all but the scratch page)."""
        return self.num_pages - 1

    @property
    def kv_bytes_per_token(self) -> int:
        """A token's KV in every layer (chunked lanes hold it only while in their chunk)."""
        return self.page_bytes * self.kv_lanes // self.page_size

    @property
    def kv_capacity_bytes(self) -> int:
        """KV bytes the device pool and the host tier hold together, full."""
        return (self.usable_pages + self.host_pages) * self.page_bytes

    @property
    def pool_bytes(self) -> int:
        return self.num_pages * self.page_bytes

    @property
    def host_tier_bytes(self) -> int:
        return self.host_pages * self.page_bytes

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)


def resident_layer_count(
    spec: ModelSpec, budget: int | None, dtype_bytes: int, in_place: bool
) -> int:
    """Layers that fit `model.device_weight_budget_bytes` beside the embeddings (and, unless
    cold layers are read `in_place`, the streaming buffers, each as large as the largest layer
    beyond); all of them without a budget. Layers stay resident in order, first to last."""
    if budget is None:
        return spec.num_layers
    sizes = [spec.layer_parameters(i) * dtype_bytes for i in range(spec.num_layers)]
    fixed = spec.outer_parameters() * dtype_bytes
    slots = 0 if in_place else min(STREAM_BUFFERS, spec.num_layers)
    for resident in range(spec.num_layers, -1, -1):  # all resident: still room for buffers
        buffer = max(sizes[resident:] or sizes)
        if fixed + sum(sizes[:resident]) + slots * buffer <= int(budget):
            return resident
    need = fixed + slots * max(sizes)
    raise ValueError(
        f"model.device_weight_budget_bytes {int(budget) / 1e9:.2f} GB is less than the "
        f"embeddings and {slots} layer buffers need ({need / 1e9:.2f} GB)"
    )


def _graphs(args: AppArgs, device: str, streamed: bool) -> str | None:
    """Why decode steps cannot replay CUDA graphs, or None when they can."""
    if not device.startswith("cuda"):
        return "no GPU"
    if not args.engine.cuda_graphs:
        return "engine.cuda_graphs is false"
    return "weights stream from host memory" if streamed else None


def _kv_pages(
    spec: ModelSpec, args: AppArgs, size: int, kv_free_bytes: int
) -> tuple[int, int, int]:
    """(bytes of a KV page, the KV budget, pages in the pool) with `kv_free_bytes` free
    beside the weights; `size`: bytes per element."""
    lanes = spec.kv_lanes()
    page_bytes = 2 * lanes.layers_per_page * spec.kv_size * size * args.engine.page_size
    kv_budget = kv_budget_bytes(
        args.kv_cache.budget_bytes, args.kv_cache.budget_fraction, kv_free_bytes
    )
    num_pages = max(2, kv_budget // page_bytes) + 1  # +1: the scratch page
    return page_bytes, kv_budget, num_pages


def _lanes(spec: ModelSpec, page_size: int) -> KVLanes:
    """The model's KV lanes; ValueError when its attention chunk is not whole pages."""
    lanes = spec.kv_lanes()
    if lanes.chunk % page_size:
        raise ValueError(
            f"engine.page_size {page_size} does not divide the model's attention chunk of "
            f"{lanes.chunk} tokens: chunked layers keep whole pages of their current chunk"
        )
    return lanes


def _keep_free(args: AppArgs, num_pages: int) -> int:
    """Pages kept free ahead of need: those one step's batched tokens fill, plus one for every
    fourth sequence; at most a quarter of the pool (the scratch page aside)."""
    cfg = args.engine
    return min(
        (num_pages - 1) // 4, -(-cfg.max_batched_tokens // cfg.page_size) + cfg.max_num_seqs // 4
    )


def plan_layout(
    spec: ModelSpec,
    args: AppArgs,
    platform: PlatformInfo | None,
    free_bytes: int,
    *,
    device: str = "cpu",
    managed: bool = False,
) -> Layout:
    """The layout of `spec` on this replica.

    `free_bytes`: free unified memory before the engine allocates anything (the replica's
    memory snapshot). `managed`: allocations are CUDA managed memory (or a test's advisor
    stands in), which advice on a Grace node needs. Raises ValueError for a weight budget
    too small for the embeddings and buffers.
    """
    advise = platform is not None and platform.kind == "grace" and managed
    size = DTYPE_BYTES[dtype_name(args.model.dtype, device)]
    budget = args.model.device_weight_budget_bytes
    resident = resident_layer_count(spec, budget, size, in_place=advise)
    beyond = tuple(range(resident, spec.num_layers))
    weight_bytes = spec.num_parameters() * size
    # Streamed layers sit in pinned host memory, outside a GPU replica's resource; on CPU
    # every byte is the one host memory.
    beyond_bytes = sum(spec.layer_parameters(i) for i in beyond) * size
    outside = 0 if advise or not device.startswith("cuda") else beyond_bytes
    in_resource = weight_bytes - outside
    page_size = args.engine.page_size
    lanes = _lanes(spec, page_size)
    page_bytes, kv_budget, num_pages = _kv_pages(spec, args, size, free_bytes - in_resource)
    host_pages = int(args.kv_cache.host_tier_bytes) // page_bytes
    host_tier = None if not host_pages else MANAGED_HOST_TIER if advise else PINNED_HOST_TIER
    graphs_off = _graphs(args, device, streamed=bool(beyond) and not advise)
    return Layout(
        device=device,
        dtype=dtype_name(args.model.dtype, device),
        dtype_bytes=size,
        advise=advise,
        resident_layers=tuple(range(resident)),
        streamed_layers=() if advise else beyond,
        cold_layers=beyond if advise else (),
        weight_bytes=weight_bytes,
        weights_in_resource_bytes=in_resource,
        max_model_len=min(args.model.max_model_len or spec.max_position, spec.max_position),
        page_size=page_size,
        page_bytes=page_bytes,
        kv_budget_bytes=kv_budget,
        num_pages=num_pages,
        host_pages=host_pages,
        host_tier=host_tier,
        keep_free_pages=_keep_free(args, num_pages),
        decode_graphs=graphs_off is None,
        graphs_off_reason=graphs_off,
        kv_lanes=1 + lanes.chunk_lanes,
        chunk_lanes=lanes.chunk_lanes,
        chunk_tokens=lanes.chunk,
    )
