"""The sort-based sampler that runner.py calls until it uploads SamplingPlans (sampler.py).

Kept only so the runner works unchanged meanwhile; it waits for the device (torch.tensor from
lists, `bool(...any())`) and fails every row of a step on a tiny temperature. Delete it when
runner.py moves to `build_plan` + `sample`. benchmarks/sampler_bench.py keeps its own copy as
the peer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from deployments.engine.interface import SamplingParams


def sample_on_device(logits: torch.Tensor, params: Sequence[SamplingParams],
                     generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row of float32 logits [S, vocab], as int64 [S] on the logits' device
    (no host sync: the caller copies them when it needs them)."""
    result = torch.argmax(logits, dim=-1)
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if rows:
        index = torch.tensor(rows, device=logits.device)
        temps = torch.tensor([params[i].temperature for i in rows], device=logits.device)
        probs = torch.softmax(logits[index] / temps[:, None], dim=-1)
        top_p = torch.tensor([params[i].top_p for i in rows], device=logits.device)
        order = None
        if bool((top_p < 1).any()):
            probs, order = torch.sort(probs, dim=-1, descending=True)
            # Drop a token once the mass before it reaches top_p; the first always stays.
            drop = torch.cumsum(probs, dim=-1) - probs >= top_p[:, None]
            probs = probs.masked_fill(drop, 0.0)
        draws = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        shared = [j for j, i in enumerate(rows) if generators[i] is None]
        if shared:
            picks = torch.tensor(shared, device=logits.device)
            draws[picks] = torch.multinomial(probs[picks], 1).squeeze(-1)
        for j, i in enumerate(rows):
            if generators[i] is not None:
                draws[j] = torch.multinomial(probs[j], 1, generator=generators[i])[0]
        if order is not None:
            draws = order.gather(1, draws[:, None]).squeeze(-1)
        result[index] = draws
    return result
