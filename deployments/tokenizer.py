"""TextTokenizer: a model's tokenizer and chat template without torch or transformers.

The HTTP ingress tokenizes prompts and renders chats itself, so it must not import torch
(`transformers.AutoTokenizer` does). This reads the files transformers 5 reads (tokenizer.json
through the `tokenizers` library, tokenizer_config.json, special_tokens_map.json, chat template
files; see tokenizer_files.py) and gives the same token ids, text and chat renderings as
`AutoTokenizer.from_pretrained(directory)` for tokenizers whose tokenizer.json is what
transformers runs (the `TokenizersBackend` path: Llama 3, Qwen2/3, Mistral's BPE, GPT-2...).

Encoding and decoding call the batch entry points of `tokenizers`, which release the GIL while
they run: an 8k-token prompt tokenized in a worker thread does not stall the event loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer

from deployments import chat_template
from deployments.tokenizer_files import TokenizerSettings, read_settings


class TokenizerNotFound(Exception):
    """The model directory has no fast tokenizer (tokenizer.json)."""


def _no_template_text(messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    """The engine's long-standing rendering for models without a chat template."""
    lines = "".join(f"{m.get('role', '')}: {m.get('content', '')}\n" for m in messages)
    return lines + ("assistant:" if add_generation_prompt else "")


class TextTokenizer:
    """Token ids for text and chats, text for token ids; safe to share between threads."""

    def __init__(self, backend: Tokenizer, settings: TokenizerSettings, name: str = "") -> None:
        self.name = name
        self._backend = backend
        self._settings = settings
        self.chat_template = settings.chat_template
        self.special_tokens = {k: str(v) for k, v in settings.named_tokens.items()}
        eos = self.special_tokens.get("eos_token")
        eos_id = backend.token_to_id(eos) if eos is not None else None
        self.eos_token_ids = frozenset(settings.eos_token_ids | ({eos_id} - {None}))
        self.cleans_up_spaces = settings.clean_up_tokenization_spaces and (
            type(backend.model).__name__ != "BPE" or settings.clean_up_even_for_bpe
        )
        for template in self._templates():
            chat_template.compile_template(template)  # a broken template fails at load

    @classmethod
    def load(cls, directory: str | Path) -> TextTokenizer:
        """The tokenizer of a model directory (see model_files.resolve_model_dir)."""
        root = Path(directory)
        if not (root / "tokenizer.json").is_file():
            raise TokenizerNotFound(
                f"{root} has no tokenizer.json: grace-serve needs a fast tokenizer. Make one "
                "where transformers is installed with `AutoTokenizer.from_pretrained(path)"
                ".save_pretrained(path)` (converting tokenizer.model or vocab files needs "
                "sentencepiece or tiktoken), or use a repo that ships tokenizer.json"
            )
        backend = Tokenizer.from_file(str(root / "tokenizer.json"))
        settings = read_settings(root)
        _prepare_backend(backend, settings)
        return cls(backend, settings, name=root.name)

    # ---- encoding -------------------------------------------------------------------------

    def encode_text(self, text: str) -> list[int]:
        """Token ids of `text`, with the special tokens the tokenizer adds (e.g. BOS)."""
        return self._backend.encode_batch([text], add_special_tokens=True)[0].ids

    def encode_with_starts(
        self, text: str, add_special_tokens: bool, last: int
    ) -> tuple[list[int], list[int]]:
        """Token ids of `text` and where each of the `last` tokens starts in it (character
        offsets; a token the post-processor adds, such as BOS, starts at 0). Only those few
        offsets are read: all of an 8k-token prompt's cost ~0.8 ms."""
        encoding = self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0]
        ids = encoding.ids
        starts = [
            (encoding.token_to_chars(i) or (0, 0))[0]
            for i in range(max(0, len(ids) - last), len(ids))
        ]
        return ids, starts

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """The chat as the model's template writes it; `kwargs` are template variables.

        Raises chat_template.ChatTemplateError for messages the template cannot render.
        """
        template = self._template_for(tools)
        if template is None:
            return _no_template_text(
                chat_template.normalize_messages(messages), add_generation_prompt
            )
        variables = {**self.special_tokens, **kwargs}  # kwargs win, as in transformers
        return chat_template.render(
            template,
            messages,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> list[int]:
        """Token ids of the rendered chat (the template writes its own special tokens)."""
        text = self.render_chat(messages, tools, documents, add_generation_prompt, **kwargs)
        return self._backend.encode_batch([text], add_special_tokens=False)[0].ids

    # ---- decoding -------------------------------------------------------------------------

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` as transformers decodes them (ids beyond the vocabulary are dropped)."""
        text = self._backend.decode_batch([list(ids)], skip_special_tokens=skip_special_tokens)[0]
        return clean_up_tokenization(text) if self.cleans_up_spaces else text

    @property
    def backend_tokenizer(self) -> Tokenizer:
        """The `tokenizers.Tokenizer` (as transformers names it); do not modify it."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer knows: its vocabulary and added tokens (transformers' len())."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    # ---- chat templates -------------------------------------------------------------------

    def _templates(self) -> list[str]:
        template = self.chat_template
        return (
            list(template.values())
            if isinstance(template, dict)
            else ([template] if template else [])
        )

    def _template_for(self, tools: list[dict] | None) -> str | None:
        """transformers' choice: named templates pick `tool_use` when tools are given."""
        template = self.chat_template
        if not isinstance(template, dict):
            return template or None
        if tools is not None and "tool_use" in template:
            return template["tool_use"]
        if "default" in template:
            return template["default"]
        raise chat_template.ChatTemplateError(
            f"{self.name} has several chat templates and none is `default`: {sorted(template)}"
        )


def _prepare_backend(backend: Tokenizer, settings: TokenizerSettings) -> None:
    """Make the backend what transformers makes of it: the config's added tokens (re-added,
    which also applies their flags) and any named or extra special token it lacks, added as
    special; special tokens matched in text unless split_special_tokens; no truncation or
    padding."""
    present = {t.content for t in backend.get_added_tokens_decoder().values()}
    present |= {t.content for t in settings.added_tokens}
    to_add: list[AddedToken] = list(settings.added_tokens)
    named = {str(t) for t in settings.named_tokens.values()}
    for token in [*settings.named_tokens.values(), *settings.extra_special_tokens]:
        if str(token) in present:
            continue
        if isinstance(token, str):
            token = AddedToken(token, special=True)
        elif not token.special and str(token) in named:
            token.special = True
        to_add.append(token)
        present.add(str(token))
    if to_add:
        backend.add_tokens(to_add)
    backend.encode_special_tokens = settings.split_special_tokens
    backend.no_truncation()
    backend.no_padding()


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization`: no space before punctuation and contractions."""
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text
