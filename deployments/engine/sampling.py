"""Choosing the next token from logits: greedy, temperature, nucleus (top-p), seeded."""

from __future__ import annotations

import torch

from deployments.engine.interface import SamplingParams


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded by the request (reproducible) or from entropy."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed % (1 << 63))
    return gen


def sample_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> int:
    """Sample one token id from a 1-D tensor of logits."""
    if params.temperature == 0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Drop tokens once the mass before them already reaches top_p; the first always stays.
        drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice].item())
    return int(torch.multinomial(probs, 1, generator=generator).item())
