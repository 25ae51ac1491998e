"""What a model directory says about its tokenizer, read the way transformers 5 reads it.

Sources, in transformers' order of precedence: tokenizer_config.json (special tokens, added
tokens, options, a chat template), special_tokens_map.json (legacy: read only when the config
has no `added_tokens_decoder`, and then overriding it), chat_template.jinja and
additional_chat_templates/*.jinja (which replace the config's templates). chat_template.json
(the processor's file) is a last resort that transformers' tokenizer does not read.
Imports only `tokenizers`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import AddedToken

STANDARD_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
Token = str | AddedToken


@dataclass
class TokenizerSettings:
    named_tokens: dict[str, Token]  # bos_token, eos_token, ... and model-specific *_token
    extra_special_tokens: list[Token]
    added_tokens: list[AddedToken]  # the config's added_tokens_decoder, in id order
    chat_template: str | dict[str, str] | None
    clean_up_tokenization_spaces: bool = False
    clean_up_even_for_bpe: bool = False
    split_special_tokens: bool = False
    eos_token_ids: set[int] = field(default_factory=set)  # from config / generation_config


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def as_token(value: Any) -> Token | None:
    """A config value as a token: a string, or an AddedToken from its serialized form."""
    if isinstance(value, str | AddedToken) or value is None:
        return value
    if isinstance(value, dict) and "content" in value:
        fields = {k: v for k, v in value.items() if k != "__type"}
        return AddedToken(**fields)
    return None


def read_settings(root: Path) -> TokenizerSettings:
    """The tokenizer settings of the model directory `root`."""
    config = dict(read_json(root / "tokenizer_config.json") or {})
    if "additional_special_tokens" in config and not config.get("extra_special_tokens"):
        config["extra_special_tokens"] = config.pop("additional_special_tokens")
    if "added_tokens_decoder" not in config:
        _merge_legacy_special_tokens(config, read_json(root / "special_tokens_map.json") or {})
    named: dict[str, Token] = {}
    for key, value in config.items():
        standard = key in STANDARD_SPECIAL_TOKENS
        if standard or (key.endswith("_token") and isinstance(value, str | dict)):
            token = as_token(value)
            if token is not None:
                named[key] = token
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    if isinstance(extra, dict):  # named extra tokens are model-specific named tokens
        named.update({k: t for k, v in extra.items() if (t := as_token(v)) is not None})
        extra = []
    added = [
        as_token(v)
        for _, v in sorted(
            (config.get("added_tokens_decoder") or {}).items(), key=lambda item: int(item[0])
        )
    ]
    return TokenizerSettings(
        named_tokens=named,
        extra_special_tokens=[t for t in map(as_token, extra) if t is not None],
        added_tokens=[t for t in added if isinstance(t, AddedToken)],
        chat_template=read_chat_templates(root, config),
        clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        clean_up_even_for_bpe=bool(
            config.get(
                "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False
            )
        ),
        split_special_tokens=bool(config.get("split_special_tokens", False)),
        eos_token_ids=model_eos_token_ids(root),
    )


def _merge_legacy_special_tokens(config: dict[str, Any], legacy: dict[str, Any]) -> None:
    """special_tokens_map.json over the config, as transformers merges it."""
    for key, value in legacy.items():
        if isinstance(value, dict) and key != "extra_special_tokens":
            value = AddedToken(
                **{k: v for k, v in value.items() if k not in ("special", "__type")}, special=True
            )
        elif key == "extra_special_tokens" and isinstance(value, list):
            existing = list(config.get("extra_special_tokens") or [])
            value = existing + [t for t in value if t not in existing]
        config[key] = value


def read_chat_templates(root: Path, config: dict[str, Any]) -> str | dict[str, str] | None:
    """The chat template, or named templates ("default", "tool_use", ...) when there are
    several; template files take precedence over the config's templates."""
    templates: dict[str, str] = {}
    if (root / "chat_template.jinja").is_file():
        templates["default"] = (root / "chat_template.jinja").read_text(encoding="utf-8")
    extra_dir = root / "additional_chat_templates"
    if extra_dir.is_dir():
        for file in sorted(extra_dir.glob("*.jinja")):
            templates[file.name.removesuffix(".jinja")] = file.read_text(encoding="utf-8")
    if templates:
        return templates["default"] if list(templates) == ["default"] else templates
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        return {t["name"]: t["template"] for t in template}
    if template is None:
        template = (read_json(root / "chat_template.json") or {}).get("chat_template")
    return template


def model_eos_token_ids(root: Path) -> set[int]:
    """End-of-sequence ids config.json and generation_config.json name, where present."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        data = read_json(root / name) or {}
        for source in (data, data.get("text_config") or {}):
            eos = source.get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return ids
