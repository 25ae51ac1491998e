"""A checkpoint directory without weights whose tokenizer gives every token id visible text.

Served benchmarks need each generated token to produce text, so that the HTTP stream carries a
chunk a token as it would with a real model. Random weights sample ids across the whole
vocabulary, so the tokenizer must cover all of it: here a WordLevel tokenizer maps every id to
one short base-36 word ("0", "1", ..., "2qyn"), split on whitespace and decoded by joining with
spaces. Text of N such words is exactly N tokens, and decoding sampled ids then encoding the
text gives the same ids back.

Besides the words: three special tokens (bos, eos, unknown; the only ids that decode to no
text) and one non-special marker per chat role, which a chat template without newlines uses.
The files are those transformers' `save_pretrained` writes (config.json, generation_config.json,
tokenizer.json, tokenizer_config.json, chat_template.jinja), written without importing torch or
transformers, so both `transformers.AutoTokenizer` and `tokenizers.Tokenizer.from_file` load it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

BOS, EOS, UNK = "<|begin_of_text|>", "<|eot|>", "<|unk|>"
ROLES = ("system", "developer", "user", "assistant", "tool")  # the roles the ingress accepts
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eot|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


def base36(n: int) -> str:
    """`n` >= 0 written in base 36 with digits 0-9a-z."""
    out = DIGITS[n % 36]
    while n >= 36:
        n //= 36
        out = DIGITS[n % 36] + out
    return out


def marker_ids(config: dict[str, Any]) -> dict[str, int]:
    """Id of each special token and role marker: bos and eos where the config puts them, the
    unknown token and role markers on the ids just after the larger of the two."""
    bos, eos = config["bos_token_id"], config["eos_token_id"]
    first = max(bos, eos) + 1
    names = [UNK, *(f"<|{role}|>" for role in ROLES)]
    if first + len(names) > config["vocab_size"]:
        raise ValueError("vocab_size leaves no room for the markers after bos/eos")
    return {BOS: bos, EOS: eos, **{name: first + i for i, name in enumerate(names)}}


def vocabulary(config: dict[str, Any]) -> dict[str, int]:
    """Every id of the model's vocabulary: markers at their ids, a word at every other id."""
    markers = marker_ids(config)
    taken = set(markers.values())
    vocab = {base36(i): i for i in range(config["vocab_size"]) if i not in taken}
    vocab.update(markers)
    return vocab


def visible_ids(config: dict[str, Any]) -> list[int]:
    """The ids that decode to a word (all but the markers): what prompts are drawn from."""
    taken = set(marker_ids(config).values())
    return [i for i in range(config["vocab_size"]) if i not in taken]


def words(ids: list[int]) -> str:
    """The text of visible ids: one word each, separated by single spaces."""
    return " ".join(base36(i) for i in ids)


def build_tokenizer(config: dict[str, Any]) -> Any:
    """The WordLevel `tokenizers.Tokenizer` for `config`'s vocabulary."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab=vocabulary(config), unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # No decoder: tokens are joined with single spaces. No post-processor: no bos is added on
    # encode, so N words are N tokens (the chat template writes bos itself).
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (BOS, EOS, UNK)])
    tok.add_tokens([AddedToken(f"<|{role}|>", special=False, normalized=False) for role in ROLES])
    return tok


def tokenizer_config(config: dict[str, Any]) -> dict[str, Any]:
    """tokenizer_config.json as transformers writes it, with every added token described."""
    markers = marker_ids(config)
    special = {BOS, EOS, UNK}
    return {
        "added_tokens_decoder": {
            str(i): {
                "content": name,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": name in special,
            }
            for name, i in sorted(markers.items(), key=lambda kv: kv[1])
        },
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def write_model_dir(path: str | Path, config: dict[str, Any]) -> Path:
    """Write the checkpoint directory (no weights) for the HF `config` dict at `path`.

    Written to a temporary sibling and renamed into place (replacing what was there, so a
    directory from an older version of this module never lingers); under a second.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / "generation_config.json").write_text(
        json.dumps(
            {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]},
            indent=2,
        )
    )
    build_tokenizer(config).save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(config), indent=2))
    (tmp / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target
