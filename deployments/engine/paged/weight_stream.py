"""Weights larger than the device budget: layers in pinned host memory stream in ahead of use.

Resident layers stay on the device; the others (one contiguous block each in pinned host
memory) rotate through `slots` device buffers. At the start of a forward pass the first
streamed layers are copied in on a stream of their own; when a streamed layer's compute has
been issued, its slot is refilled with the streamed layer `slots` places later, once that
compute has finished (an event orders it). Layers may differ in size (MoE and dense MLPs
mixed): each slot holds the largest streamed layer, and each streamed layer has its own views
of the slot it passes through. An MoE layer streams whole, every expert of it (per-expert
tiers, reading only the experts a step picks, are not built). Copies therefore run back to
back while earlier layers compute: a step costs about max(compute, streamed bytes / link
bandwidth). On CPU the copies are immediate and the arithmetic is the same, which is how the
tests check it.
"""

from __future__ import annotations

import torch

from deployments.engine.paged.weights import LayerWeights, ModelWeights, layer_views
from deployments.model_spec import ModelSpec


class WeightStreamer:
    def __init__(
        self, weights: ModelWeights, spec: ModelSpec, streamed: list[int], slots: int = 3
    ) -> None:
        self.weights = weights
        self.streamed = sorted(streamed)
        self._order = {layer: k for k, layer in enumerate(self.streamed)}
        device = weights.embed.device
        sizes = [weights.blocks[i].numel() for i in self.streamed]
        numel = max(sizes, default=0)
        self.slots = min(slots, len(self.streamed))
        self._buffers = [
            torch.empty(numel, dtype=weights.embed.dtype, device=device) for _ in range(self.slots)
        ]
        self._views = [  # the k-th streamed layer's views of its slot
            layer_views(self._buffers[k % self.slots][:n], spec, layer)
            for k, (layer, n) in enumerate(zip(self.streamed, sizes, strict=True))
        ]
        self._cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream() if self._cuda else None
        self._loaded: list[torch.cuda.Event | None] = [None] * self.slots
        self._freed: list[torch.cuda.Event | None] = [None] * self.slots
        self.bytes_per_pass = sum(sizes) * weights.embed.element_size()

    def _copy(self, k: int) -> None:
        """Start copying the k-th streamed layer into its slot."""
        slot = k % self.slots
        src = self.weights.blocks[self.streamed[k]]
        dst = self._buffers[slot][: src.numel()]
        if not self._cuda:
            dst.copy_(src)
            return
        if self._freed[slot] is not None:
            self._stream.wait_event(self._freed[slot])  # the layer there finished computing
        with torch.cuda.stream(self._stream):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self._loaded[slot] = event

    def begin(self) -> None:
        """A forward pass starts: queue the first streamed layers."""
        for k in range(self.slots):
            self._copy(k)

    def layer(self, index: int) -> LayerWeights:
        """Layer `index`'s weights on the device (waiting for its copy if streamed)."""
        k = self._order.get(index)
        if k is None:
            return self.weights.layers[index]
        slot = k % self.slots
        if self._cuda and self._loaded[slot] is not None:
            torch.cuda.current_stream().wait_event(self._loaded[slot])
        return self._views[k]

    def done(self, index: int) -> None:
        """Layer `index`'s compute is issued: refill its slot with a later streamed layer."""
        k = self._order.get(index)
        if k is None:
            return
        slot = k % self.slots
        if self._cuda:
            event = torch.cuda.Event()
            event.record()  # on the compute stream
            self._freed[slot] = event
        if k + self.slots < len(self.streamed):
            self._copy(k + self.slots)
