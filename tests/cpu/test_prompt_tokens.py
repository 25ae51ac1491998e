"""A returning user's prompt, tokenized from where its previous one ended, gets the ids a
whole encoding gets.

For the built-in tokenizer, Llama-3.1- and Qwen2.5-style byte-level BPE tokenizers
(tests/cpu/chat_models.py) and the serving benchmark's word-level tokenizer: users whose text
grows by random pieces (new words, a word continued, whitespace runs, special tokens, emoji)
and chats that grow turn by turn; each prompt's ids are compared with a whole encoding.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tokenizers import processors

from benchmarks.bench_model import write_model_dir
from benchmarks.engine_bench import QUICK
from deployments.engine import builtin_tokenizer
from deployments.prompt_tokens import TAIL, PromptTokens
from deployments.prompts import PromptBuilder
from deployments.tokenizer import TextTokenizer
from tests.cpu import chat_models

KINDS = ["builtin", "llama31", "qwen25", "wordlevel"]


def tokenizer_dir(kind: str, root: Path) -> Path:
    if kind == "builtin":
        builtin_tokenizer.write_tokenizer(root)
    elif kind == "llama31":
        chat_models.llama31_dir(root)
    elif kind == "qwen25":
        chat_models.qwen25_dir(root)
    else:
        write_model_dir(str(root), QUICK)
    return root


@pytest.fixture(scope="module", params=KINDS)
def tokenizer(request, tmp_path_factory) -> TextTokenizer:
    return TextTokenizer.load(tokenizer_dir(request.param, tmp_path_factory.mktemp(request.param)))


def growth(rng: random.Random, tokenizer: TextTokenizer) -> str:
    """What a next turn adds: random text, or more of the same word, or bare whitespace."""
    if tokenizer.backend_tokenizer.model.__class__.__name__ == "WordLevel":
        words = list(tokenizer.backend_tokenizer.get_vocab())
        return " " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 60)))
    return rng.choice(
        [
            lambda: chat_models.random_text(rng, 120),
            lambda: " " + chat_models.random_text(rng, 40),
            lambda: rng.choice(["ing", "ed", "s", "ory", "42"]),  # the last word goes on
            lambda: rng.choice([" ", "  ", "\n", "\n\n", " \t "]),
        ]
    )()


def test_growing_texts_get_the_ids_of_a_whole_encoding(tokenizer):
    tokens = PromptTokens(tokenizer)
    rng = random.Random(f"grow-{tokenizer.name}")
    for user in range(6):
        text = chat_models.random_text(rng, 200)
        for _ in range(25):
            text += growth(rng, tokenizer)
            got = tokens.encode(f"user-{user}", text, True)
            assert got.tolist() == tokenizer.encode_text(text), (user, text[-80:])
    assert tokens.reused > 100  # the kept prefixes were used, not just whole encodings


def test_growing_chats_get_the_ids_of_a_whole_encoding(tokenizer):
    builder = PromptBuilder(tokenizer, 16, 1000)
    rng = random.Random(f"chat-{tokenizer.name}")
    for user in range(4):
        chat = [{"role": "user", "content": chat_models.random_text(rng, 300)}]
        for _ in range(10):
            got = builder._encode_chat(f"user-{user}", chat)
            assert got.tolist() == tokenizer.encode_chat(chat)
            chat += [
                {"role": "assistant", "content": chat_models.random_text(rng, 80)},
                {"role": "user", "content": chat_models.random_text(rng, 80)},
            ]
    assert builder.tokens.reused >= 4 * 9 // 2


def test_an_edited_history_is_encoded_whole(tokenizer):
    tokens = PromptTokens(tokenizer)
    rng = random.Random(f"edit-{tokenizer.name}")
    text = chat_models.random_text(rng, 300) + " " + chat_models.random_text(rng, 300)
    tokens.encode("u", text, True)
    edited = "X" + text[1:] + growth(rng, tokenizer)
    assert tokens.encode("u", edited, True).tolist() == tokenizer.encode_text(edited)
    assert (tokens.reused, tokens.whole) == (0, 2)
    shorter = edited[: len(edited) // 2]
    assert tokens.encode("u", shorter, True).tolist() == tokenizer.encode_text(shorter)
    assert tokens.whole == 3


def test_without_a_user_nothing_is_kept(tokenizer):
    tokens = PromptTokens(tokenizer)
    text = chat_models.random_text(random.Random(1), 300)
    for extra in ("", " more", " more words"):
        assert tokens.encode(None, text + extra, True).tolist() == tokenizer.encode_text(
            text + extra
        )
    assert tokens.reused == 0 and not tokens._kept


def test_users_are_dropped_oldest_first_beyond_the_character_budget(tokenizer):
    rng = random.Random(2)
    texts = [chat_models.random_text(rng, 400) * 4 for _ in range(5)]
    tokens = PromptTokens(tokenizer, max_chars=sum(len(t) for t in texts[-2:]))
    for i, text in enumerate(texts):
        tokens.encode(f"user-{i}", text, True)
    assert [user for user, _ in tokens._kept] == ["user-3", "user-4"]
    assert tokens._chars == sum(len(t) for t in texts[-2:])


def test_a_tokenizer_that_appends_tokens_is_always_encoded_whole(tmp_path):
    root = chat_models.llama31_dir(tmp_path)
    backend = TextTokenizer.load(root).backend_tokenizer
    eos = "<|end_of_text|>"
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", special_tokens=[(eos, backend.token_to_id(eos))]
    )
    backend.save(str(root / "tokenizer.json"))
    tokenizer = TextTokenizer.load(root)
    tokens = PromptTokens(tokenizer)
    text = chat_models.random_text(random.Random(3), 400)
    for extra in ("", " and more", " and more again"):
        got = tokens.encode("u", text + extra, True).tolist()
        assert got == tokenizer.encode_text(text + extra) and got[-1] == backend.token_to_id(eos)
    assert tokens.reused == 0


def test_the_returned_ids_are_the_callers_own(tokenizer):
    tokens = PromptTokens(tokenizer)
    rng = random.Random(4)
    text = "".join(growth(rng, tokenizer) for _ in range(40))
    first = tokens.encode("u", text, True)
    assert len(first) > TAIL
    first.append(0)  # a caller changing its ids changes nothing kept
    assert tokens.encode("u", text + " x", True).tolist() == tokenizer.encode_text(text + " x")


def test_chars_to_encode_counts_what_encode_will_tokenize(tokenizer):
    """The figure the ingress picks a thread by: a new user's or an edited text's every
    character, a returning user's tail from the cut only."""
    tokens = PromptTokens(tokenizer)
    rng = random.Random(f"chars-{tokenizer.name}")
    text = chat_models.random_text(rng, 400)
    assert tokens.chars_to_encode("u", text, True) == len(text)
    tokens.encode("u", text, True)
    longer = text + growth(rng, tokenizer)
    tail = tokens.chars_to_encode("u", longer, True)
    cut = tokens._kept[("u", True)].starts[0]  # TAIL tokens before the kept text's end
    assert tail == len(longer) - cut < len(longer)
    assert tokens.chars_to_encode(None, longer, True) == len(longer)
    assert tokens.chars_to_encode("u", "X" + longer[1:], True) == len(longer)
