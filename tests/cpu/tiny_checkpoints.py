"""Tiny random checkpoints saved as a hub checkpoint would be, for the engines' tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from deployments.engine.builtin_tokenizer import write_tokenizer


def save_tiny(
    path: Path, config_name: str, model_name: str, config: dict[str, Any], seed: int
) -> tuple[str, Any]:
    """transformers' `model_name` of `config_name(**config)` with random weights (`seed`),
    saved to `path` with the built-in tokenizer: (its path, the model, in eval mode)."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**config))
    model.eval().save_pretrained(path)
    write_tokenizer(path)
    return str(path), model
