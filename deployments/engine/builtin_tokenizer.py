"""The built-in model's byte-level BPE tokenizer, trained and written without torch or transformers.

The files are those `PreTrainedTokenizerFast.save_pretrained` writes (transformers 5):
tokenizer.json, tokenizer_config.json (bos/eos/pad tokens, `TokenizersBackend` class) and
chat_template.jinja, so `AutoTokenizer.from_pretrained` loads them as it loads any hub model,
while the HTTP ingress (which must not import torch) can build them itself.
"""

from __future__ import annotations

import collections
import itertools
import json
from pathlib import Path

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<|begin_of_text|>", "<|eot|>", "<|pad|>"
END_OF_TEXT = "<|end_of_text|>"
SPECIAL_TOKENS = [BOS_TOKEN, END_OF_TEXT, EOS_TOKEN, PAD_TOKEN]
MODEL_MAX_LENGTH = 4096
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
NUM_MERGES = 700


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
            splits[word] = _merge(splits[word], best)
    return vocab, merges


def _merge(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def build_tokenizer():  # -> tokenizers.Tokenizer
    """The backend tokenizer exactly as transformers would save it (a no-op post-processor)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab, merges = train_bpe(CORPUS, NUM_MERGES)
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIAL_TOKENS)
    # What transformers installs when a tokenizer adds neither BOS nor EOS.
    core.post_processor = processors.TemplateProcessing(
        single="$A:0", pair="$A:0 $B:1", special_tokens=[]
    )
    return core


def tokenizer_config() -> dict[str, object]:
    """tokenizer_config.json as transformers 5 writes it for this tokenizer."""
    return {
        "backend": "tokenizers",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": PAD_TOKEN,
        "tokenizer_class": "TokenizersBackend",
    }


def write_tokenizer(directory: str | Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja to `directory`."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(root / "tokenizer.json"))
    text = json.dumps(tokenizer_config(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    (root / "tokenizer_config.json").write_text(text, encoding="utf-8")
    (root / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
