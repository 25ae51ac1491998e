"""Incremental detokenization: whole characters only, stop strings trimmed across tokens."""

import pytest

from deployments.engine.builtin_tokenizer import write_tokenizer
from deployments.engine.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("builtin")
    write_tokenizer(path)
    return AutoTokenizer.from_pretrained(path)


def stream(tok, text, stop=()):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tok, stop)
    pieces, hit = [], False
    for i in ids:
        piece, hit = detok.push(i)
        pieces.append(piece)
        if hit:
            break
    if not hit:
        pieces.append(detok.flush())
    return pieces, hit


def test_reassembles_text_exactly(tok):
    text = "Unified memory: 900 GB/s — héllo 日本語 🚀 done."
    pieces, hit = stream(tok, text)
    assert "".join(pieces) == text and not hit


def test_never_emits_half_a_character(tok):
    pieces, _ = stream(tok, "日本語🚀")
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_is_trimmed_even_across_tokens(tok):
    pieces, hit = stream(tok, "The answer is 42. STOP and more text", stop=["STOP"])
    assert hit and "".join(pieces) == "The answer is 42. "


def test_partial_stop_prefix_is_released_when_it_does_not_complete(tok):
    pieces, hit = stream(tok, "STAR STOP", stop=["STOP"])
    assert hit and "".join(pieces) == "STAR "
    pieces, hit = stream(tok, "a ST", stop=["STOP"])
    assert not hit and "".join(pieces) == "a ST"


def test_earliest_of_several_stops_wins(tok):
    pieces, hit = stream(tok, "one two three", stop=["three", "two"])
    assert hit and "".join(pieces) == "one "
