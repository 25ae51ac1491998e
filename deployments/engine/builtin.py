"""`builtin:tiny-llama`: a small random Llama and a byte-level BPE tokenizer, made offline.

Tests and the local demo need a real transformers model without hub access. The tokenizer is
trained and written without torch (builtin_tokenizer.py); a 4-layer Llama with seeded random
weights is saved next to it with `save_pretrained`, under a cache directory keyed by a hash of
the recipe. Later loads go through `from_pretrained` like any hub model.

The directory is built in two steps, each once per node however many processes ask (file
locks): its tokenizer files appear together (a directory renamed into place), then its weights
(config.json and generation_config.json, then model.safetensors, each renamed into place). So
`materialize(model_id, weights=False)` gives an ingress the tokenizer without importing torch,
while replicas build the weights.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from deployments.engine import builtin_tokenizer as tok

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
BUILTIN_ID = "builtin:tiny-llama"
RECIPE_VERSION = "tiny-llama-v2"  # v2: tokenizer files written torch-free, weights added after
WEIGHTS_FILE = "model.safetensors"  # written last: its presence means the weights are complete
MODEL_CONFIG = {
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": tok.MODEL_MAX_LENGTH,
    "rms_norm_eps": 1e-5,
    "initializer_range": 0.1,
    "tie_word_embeddings": False,
}
SEED = 0


def is_builtin(model_id: str) -> bool:
    return model_id.startswith(BUILTIN_PREFIX)


def cache_root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "grace-serve"
    return Path(os.environ.get("GRACE_SERVE_CACHE", default))


def recipe_hash() -> str:
    recipe = json.dumps(
        [
            RECIPE_VERSION,
            tok.CORPUS,
            MODEL_CONFIG,
            tok.NUM_MERGES,
            SEED,
            tok.CHAT_TEMPLATE,
            tok.SPECIAL_TOKENS,
            tok.tokenizer_config(),
        ]
    )
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def materialize(model_id: str, weights: bool = True) -> Path:
    """The directory holding the built-in model, building it on first use.

    With `weights=False` only the tokenizer files are guaranteed (built without torch).
    """
    if model_id != BUILTIN_ID:
        raise ValueError(f"unknown built-in model {model_id!r}; known: {BUILTIN_ID}")
    root = cache_root()
    target = root / f"tiny-llama-{recipe_hash()}"
    if not target.is_dir():  # the directory appears whole, tokenizer files and all
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root / ".tokenizer.lock"):
            if not target.is_dir():
                _build_into(root, target, tok.write_tokenizer)
                logger.info("built the %s tokenizer in %s", model_id, target)
    if weights and not (target / WEIGHTS_FILE).exists():
        with _locked(root / ".weights.lock"):
            if not (target / WEIGHTS_FILE).exists():
                _build_into(root, target, write_weights)
                logger.info("built the %s weights in %s", model_id, target)
    return target


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder per node: others wait for the lock, then find the files built."""
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _build_into(root: Path, target: Path, build: Callable[[Path], None]) -> None:
    """Run `build` in a scratch directory, then move its output into `target` atomically:
    the whole directory if `target` is new, else file by file with WEIGHTS_FILE last."""
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".building-"))
    try:
        build(tmp)
        if not target.exists():
            os.replace(tmp, target)
            return
        for name in sorted((p.name for p in tmp.iterdir()), key=lambda n: (n == WEIGHTS_FILE, n)):
            os.replace(tmp / name, target / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_weights(directory: Path) -> None:
    """Write config.json, generation_config.json and random weights for the tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    core = tok.build_tokenizer()
    vocab_size = (core.get_vocab_size(with_added_tokens=True) + 63) // 64 * 64
    eos = [core.token_to_id(tok.EOS_TOKEN), core.token_to_id(tok.END_OF_TEXT)]
    config = LlamaConfig(
        vocab_size=vocab_size,
        bos_token_id=core.token_to_id(tok.BOS_TOKEN),
        eos_token_id=eos,
        pad_token_id=core.token_to_id(tok.PAD_TOKEN),
        **MODEL_CONFIG,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.generation_config.eos_token_id = config.eos_token_id
    model.save_pretrained(directory, safe_serialization=True)
