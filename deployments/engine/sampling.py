"""Seeded generators for the paged engine's sort-based sampler (paged/legacy_sampler.py).

The sampling rules themselves live in paged/sampler.py (the plan, the reference and the
Triton kernel), which both engines use; this module goes when runner.py moves to plans.
"""

from __future__ import annotations

import torch


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded by the request (reproducible) or from entropy."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed % (1 << 63))
    return gen
