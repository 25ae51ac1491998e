"""Tokenizer directories in the shape of real hub models, built offline for tests.

`llama31_dir` and `qwen25_dir` write byte-level BPE tokenizers trained on a small corpus with
those families' pre-tokenizers, special tokens and tokenizer_config.json layouts, and chat
templates written in their spirit (templates/*.jinja: tools listed, assistant tool calls and
tool results in the history). `random_chat` draws conversations for them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    processors,
    trainers,
)
from tokenizers import pre_tokenizers as pre

from deployments.engine.builtin_tokenizer import CORPUS

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
    r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TOOL_CORPUS = (
    CORPUS
    + """
{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}
<tool_call> {"name": "search", "arguments": {"query": "unified memory"}} </tool_call>
<tool_response> {"temperature": 21, "condition": "sunny"} </tool_response>
You have access to the following functions. Respond in the format of a JSON object.
"""
)

TEMPLATES = Path(__file__).parent / "templates"
LLAMA31_TEMPLATE = (TEMPLATES / "llama31_tools.jinja").read_text(encoding="utf-8")
QWEN25_TEMPLATE = (TEMPLATES / "qwen25_tools.jinja").read_text(encoding="utf-8")

LLAMA_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_ADDED = ["<tool_call>", "</tool_call>"]  # added tokens that are not special


def _train(split: str, specials: list[str], normalizer=None) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre.Sequence(
        [
            pre.Split(Regex(split), behavior="isolated"),
            pre.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700, show_progress=False, initial_alphabet=pre.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TOOL_CORPUS.splitlines(), trainer)
    tok.add_special_tokens(specials)
    return tok


def _added_decoder(tok: Tokenizer) -> dict[str, dict]:
    return {
        str(i): {
            "content": t.content,
            "lstrip": t.lstrip,
            "normalized": t.normalized,
            "rstrip": t.rstrip,
            "single_word": t.single_word,
            "special": t.special,
        }
        for i, t in sorted(tok.get_added_tokens_decoder().items())
    }


def _write(root: Path, name: str, data: dict) -> None:
    (root / name).write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")


def llama31_dir(root: Path) -> Path:
    """Llama 3.1's layout: BOS added by the post-processor, the template in the config."""
    tok = _train(LLAMA3_SPLIT, LLAMA_SPECIALS)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                special_tokens=[("<|begin_of_text|>", bos)],
            ),
        ]
    )
    root.mkdir(parents=True, exist_ok=True)
    tok.save(str(root / "tokenizer.json"))
    _write(
        root,
        "tokenizer_config.json",
        {
            "added_tokens_decoder": _added_decoder(tok),
            "bos_token": "<|begin_of_text|>",
            "chat_template": LLAMA31_TEMPLATE,
            "clean_up_tokenization_spaces": True,
            "eos_token": "<|eot_id|>",
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": 131072,
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
    )
    _write(
        root,
        "special_tokens_map.json",
        {
            "bos_token": {
                "content": "<|begin_of_text|>",
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
            },
            "eos_token": {
                "content": "<|eot_id|>",
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
            },
        },
    )
    _write(
        root,
        "config.json",
        {
            "model_type": "llama",
            "bos_token_id": bos,
            "eos_token_id": [tok.token_to_id("<|eot_id|>"), tok.token_to_id("<|end_of_text|>")],
        },
    )
    return root


def qwen25_dir(root: Path, legacy: bool = False) -> Path:
    """Qwen2.5's layout: NFC, no BOS, `<tool_call>` as plain added tokens. With `legacy`,
    the config has no added_tokens_decoder and special_tokens_map.json overrides its EOS."""
    tok = _train(QWEN_SPLIT, QWEN_SPECIALS, normalizers.NFC())
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_ADDED])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    root.mkdir(parents=True, exist_ok=True)
    tok.save(str(root / "tokenizer.json"))
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": _added_decoder(tok),
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": QWEN25_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if legacy:
        del config["added_tokens_decoder"]
        config["eos_token"] = "<|endoftext|>"
        _write(
            root,
            "special_tokens_map.json",
            {
                "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
                "eos_token": {
                    "content": "<|im_end|>",
                    "lstrip": False,
                    "normalized": False,
                    "rstrip": False,
                    "single_word": False,
                },
                "pad_token": "<|endoftext|>",
            },
        )
    _write(root, "tokenizer_config.json", config)
    return root


ALPHABET = (
    "abcdefghij klmnop qrstuvwxyz ABCDE 0123456789 .,;:!?'\"-_/()[]{}<>\n\t"
    "é ü ñ ß 日本語 中文 🚀 ✓ — …"
)


def random_text(rng: random.Random, n: int = 40) -> str:
    words = [
        rng.choice(["Hello", "memory", "Grace", "unified", "tool", " ", "\n"])
        for _ in range(rng.randint(0, 4))
    ]
    chars = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, n)))
    special = rng.choice(["", "", "", "<|eot_id|>", "<|im_end|>", "<tool_call>"])
    return " ".join(words) + chars + special


def random_tools(rng: random.Random) -> list[dict]:
    tools = []
    for i in range(rng.randint(1, 3)):
        tools.append(
            {
                "type": "function",
                "function": {
                    "name": f"tool_{i}_{rng.choice(['weather', 'search', 'sum'])}",
                    "description": random_text(rng, 20),
                    "parameters": {
                        "type": "object",
                        "required": ["q"],
                        "properties": {
                            "q": {"type": "string", "description": random_text(rng, 10)},
                            "n": {"type": "integer", "enum": [1, 2, 3]},
                        },
                    },
                },
            }
        )
    return tools


def _tool_call(rng: random.Random, index: int) -> dict:
    return {
        "id": f"call_{index}",
        "type": "function",
        "function": {
            "name": rng.choice(["get_weather", "search"]),
            "arguments": {
                "q": random_text(rng, 12),
                "n": rng.randint(0, 9),
                "ok": rng.random() < 0.5,
                "nested": {"ü": [1.5, None]},
            },
        },
    }


def random_chat(rng: random.Random, max_calls: int) -> list[dict]:
    """system?, then user / assistant turns; some assistant turns call tools and are
    followed by one tool result per call (content None where a call has no text)."""
    chat = [{"role": "system", "content": random_text(rng)}] if rng.random() < 0.5 else []
    chat.append({"role": "user", "content": random_text(rng)})
    for _ in range(rng.randint(0, 3)):
        if rng.random() < 0.5:
            calls = [_tool_call(rng, i) for i in range(rng.randint(1, max_calls))]
            content = random_text(rng) if max_calls > 1 and rng.random() < 0.5 else None
            chat.append({"role": "assistant", "content": content, "tool_calls": calls})
            for call in calls:
                chat.append(
                    {
                        "role": "tool",
                        "tool_call_id": call["id"],
                        "name": call["function"]["name"],
                        "content": json.dumps({"result": random_text(rng, 10)}, ensure_ascii=False),
                    }
                )
        else:
            chat.append({"role": "assistant", "content": random_text(rng)})
        chat.append({"role": "user", "content": random_text(rng)})
    return chat


QWEN25_INSTRUCT = (TEMPLATES / "qwen25_instruct.jinja").read_text(encoding="utf-8")
LLAMA31_INSTRUCT = (TEMPLATES / "llama31_instruct.jinja").read_text(encoding="utf-8")


def builtin_with_template(root: Path, template: str) -> Path:
    """The built-in model's files (weights too) in `root`, with `template` as its chat
    template: a servable model directory whose template is a real hub model's."""
    import shutil

    from deployments.engine.builtin import BUILTIN_ID, materialize

    shutil.copytree(materialize(BUILTIN_ID), root)
    (root / "chat_template.jinja").write_text(template, encoding="utf-8")
    return root
