"""`builtin:tiny-llama`: a small random Llama and a byte-level BPE tokenizer, made offline.

Tests and the local demo need a real transformers model without hub access. This module trains
a byte-level BPE on a built-in text (pure Python, ties broken by pair order, so the result is
deterministic), builds a 4-layer Llama with seeded random weights, and saves both with
`save_pretrained` under a cache directory keyed by a hash of the recipe. Later loads go through
`from_pretrained` like any hub model. Concurrent replicas on one node build it once (file lock).
"""

from __future__ import annotations

import collections
import fcntl
import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
RECIPE_VERSION = "tiny-llama-v1"
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot|>", "<|pad|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|eot|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Role markers are learned as merges from this text, so they tokenize compactly.
CORPUS = """
<|system|> You are a helpful assistant running on a Grace Hopper superchip.
<|user|> What is unified memory? <|assistant|> Unified memory lets the GPU and the CPU share
one address space, so a model larger than the GPU's memory can still run.
<|user|> Why does a KV cache matter? <|assistant|> The key and value cache keeps the attention
state of every token a user has seen, so a follow-up turn only computes its new tokens.
<|user|> How fast is NVLink-C2C? <|assistant|> It moves 900 gigabytes per second in total, 450
in each direction, between the Grace CPU and the Hopper GPU.
The quick brown fox jumps over the lazy dog. Large language models predict the next token.
Serving systems batch requests from many users, route each user to the replica that holds its
cache, and keep memory use within budget. Hello, world! How are you today? I am fine, thanks.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 16 32 64 128 256 512 1024 2048 4096 8192 65536 131072.
def main(): print("hello") # code, too: for i in range(10): x = x + i
"""
MODEL_CONFIG = {
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "initializer_range": 0.1,
    "tie_word_embeddings": False,
}
NUM_MERGES = 700
SEED = 0


def is_builtin(model_id: str) -> bool:
    return model_id.startswith(BUILTIN_PREFIX)


def cache_root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "grace-serve"
    return Path(os.environ.get("GRACE_SERVE_CACHE", default))


def recipe_hash() -> str:
    recipe = json.dumps([RECIPE_VERSION, CORPUS, MODEL_CONFIG, NUM_MERGES, SEED, CHAT_TEMPLATE])
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def materialize(model_id: str) -> Path:
    """The directory holding the built-in model, building it on first use."""
    if model_id != "builtin:tiny-llama":
        raise ValueError(f"unknown built-in model {model_id!r}; known: builtin:tiny-llama")
    root = cache_root()
    target = root / f"tiny-llama-{recipe_hash()}"
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder per node; others wait, then reuse
        if not (target / "config.json").exists():
            tmp = Path(tempfile.mkdtemp(dir=root, prefix=".building-"))
            try:
                build(tmp)
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            logger.info("built %s in %s", model_id, target)
    return target


def train_bpe(text: str, num_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE: (vocab, merges). Deterministic: ties go to the smallest pair."""
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    words = collections.Counter(piece for piece, _ in pre.pre_tokenize_str(text))
    splits = {word: list(word) for word in words}
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for word, count in words.items():
            symbols = splits[word]
            for pair in itertools.pairwise(symbols):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            break
        merges.append(best)
        vocab["".join(best)] = len(vocab)
        for word in words:
            symbols, out, i = splits[word], [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            splits[word] = out
    return vocab, merges


def build_tokenizer():  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab, merges = train_bpe(CORPUS, NUM_MERGES)
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot|>",
        pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_CONFIG["max_position_embeddings"],
    )


def build(directory: Path) -> None:
    """Write tokenizer and random-weight model to `directory`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    vocab_size = (len(tokenizer) + 63) // 64 * 64
    config = LlamaConfig(
        vocab_size=vocab_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end_of_text|>")],
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_CONFIG,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.generation_config.eos_token_id = config.eos_token_id
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
