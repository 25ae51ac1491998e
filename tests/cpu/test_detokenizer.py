"""Incremental detokenization: whole characters only, stop strings trimmed across tokens.

Both paths (the verified byte table and the decode window) and any batching of the same ids
give the text `decode(ids, skip_special_tokens=True)` gives, cut before the first stop string
to complete, and the text today's per-token detokenizer (kept below as the reference) gave.
"""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from deployments.detokenizer import IncrementalDetokenizer, TokenDecoder, first_stop
from deployments.engine.builtin_tokenizer import write_tokenizer
from deployments.tokenizer import TextTokenizer

REPLACEMENT = "\ufffd"
MULTIBYTE = "Unified memory: 900 GB/s — héllo 日本語 🚀 done. ü∑ß"


class LegacyDetokenizer:
    """The per-token detokenizer this module replaced (deployments/engine/detokenizer.py)."""

    def __init__(self, tokenizer, stop=()):
        self._tok, self._stop = tokenizer, tuple(s for s in stop if s)
        self._ids, self._prefix_offset, self._read_offset = [], 0, 0
        self._held, self.stopped = "", False

    def _decode(self, ids):
        return self._tok.decode(ids, skip_special_tokens=True)

    def push(self, token_id):
        if self.stopped:
            return "", True
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        new = ""
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            new = full[len(prefix) :]
        buffer = self._held + new
        hits = [i for i in (buffer.find(s) for s in self._stop) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return buffer[: min(hits)], True
        keep = max(
            [n for s in self._stop for n in range(1, len(s)) if buffer.endswith(s[:n])], default=0
        )
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], False

    def flush(self):
        if self.stopped:
            return ""
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        return self._held + full[len(prefix) :]


@pytest.fixture(scope="module")
def builtin_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("builtin")
    write_tokenizer(root)
    return root


@pytest.fixture(scope="module")
def text_tok(builtin_dir):
    return TextTokenizer.load(builtin_dir)


@pytest.fixture(scope="module")
def hf_tok(builtin_dir):
    return AutoTokenizer.from_pretrained(builtin_dir)


@pytest.fixture(scope="module", params=["table", "window"])
def decoder(request, text_tok):
    return TokenDecoder(text_tok, use_table=request.param == "table")


def stream(decoder, ids, stop=(), batch=1, rng=None):
    """Push `ids` in batches of `batch` (or random sizes up to it with `rng`); return
    (pieces, stopped, ids consumed in all)."""
    detok, pieces, used, i = IncrementalDetokenizer(decoder, stop), [], 0, 0
    while i < len(ids):
        n = rng.randint(1, batch) if rng else batch
        delta = detok.push(ids[i : i + n])
        pieces.append(delta.text)
        used += delta.consumed
        if delta.stopped:
            return pieces, True, used
        i += n
    pieces.append(detok.flush())
    return pieces, detok.stopped, used


def expected(tok, ids, stop):
    """The reference: full decode cut before the stop that completes first; the fewest ids
    whose decode holds a stop."""
    full = tok.decode(ids, skip_special_tokens=True)
    cut = first_stop(full, stop)
    if cut is None:
        return full, len(ids)
    need = next(
        k
        for k in range(len(ids) + 1)
        if first_stop(tok.decode(ids[:k], skip_special_tokens=True), stop) is not None
    )
    return full[:cut], need


def test_the_builtin_tokenizer_takes_the_fast_path(text_tok, hf_tok):
    assert TokenDecoder(text_tok).table is not None
    assert TokenDecoder(hf_tok).table is not None  # transformers' fast tokenizer too


@pytest.mark.parametrize("batch", [1, 4])
def test_reassembles_text_exactly(decoder, text_tok, batch):
    pieces, hit, _ = stream(decoder, text_tok.encode_text(MULTIBYTE), batch=batch)
    assert "".join(pieces) == MULTIBYTE and not hit
    assert all(REPLACEMENT not in p for p in pieces)  # never half a character


@pytest.mark.parametrize("batch", [1, 3])
def test_stop_string_is_trimmed_even_across_tokens(decoder, text_tok, batch):
    ids = text_tok.encode_text("The answer is 42. STOP and more text")
    pieces, hit, used = stream(decoder, ids, ["STOP"], batch)
    assert hit and "".join(pieces) == "The answer is 42. "
    assert used == expected(text_tok, ids, ["STOP"])[1] < len(ids)


def test_partial_stop_prefix_is_released_when_it_does_not_complete(decoder, text_tok):
    pieces, hit, _ = stream(decoder, text_tok.encode_text("STAR STOP"), ["STOP"])
    assert hit and "".join(pieces) == "STAR "
    pieces, hit, _ = stream(decoder, text_tok.encode_text("a ST"), ["STOP"])
    assert not hit and "".join(pieces) == "a ST"


def test_the_stop_completing_first_wins_however_ids_are_batched(decoder, text_tok):
    ids = text_tok.encode_text("one two three")
    for batch in (1, 2, len(ids)):
        pieces, hit, _ = stream(decoder, ids, ["three", "two"], batch)
        assert hit and "".join(pieces) == "one "
        # "abcd" starts first but "bc" completes first: the text ends before "bc".
        pieces, hit, _ = stream(decoder, text_tok.encode_text("xabcdy"), ["abcd", "bc"], batch)
        assert hit and "".join(pieces) == "xa"


def test_one_push_reports_the_ids_used_through_the_stop(decoder, text_tok):
    ids = text_tok.encode_text("Hello, world! How are you today?")
    delta = IncrementalDetokenizer(decoder, ["world"]).push(ids)
    text, need = expected(text_tok, ids, ["world"])
    assert delta == (text, True, need) and need < len(ids)
    assert IncrementalDetokenizer(decoder).push(ids) == (text_tok.decode(ids), False, len(ids))


def test_an_unfinished_character_at_the_end_flushes_as_decode_gives_it(decoder, text_tok):
    ids = text_tok.encode_text("ok 日")[:-1]  # the last byte of 日 is missing
    assert text_tok.decode(ids).endswith(REPLACEMENT)
    pieces, _, _ = stream(decoder, ids)
    assert "".join(pieces) == text_tok.decode(ids) and REPLACEMENT not in "".join(pieces[:-1])


def random_ids(rng, tok, n_max=60):
    """Ids over the whole vocabulary (bytes that break characters, specials) and beyond it
    (the model's padded vocabulary), mixed with encoded multi-byte text."""
    ids = [rng.randrange(len(tok) + 16) for _ in range(rng.randint(1, n_max))]
    text = tok.encode_text(MULTIBYTE[rng.randrange(10) :]) if hasattr(tok, "encode_text") else []
    at = rng.randrange(len(ids) + 1)
    return ids[:at] + text[: rng.randint(0, 20)] + ids[at:]


def random_stops(rng, text):
    if not text or rng.random() < 0.3:
        return []
    starts = [rng.randrange(len(text)) for _ in range(rng.randint(1, 3))]
    return [
        s for s in (text[a : a + rng.randint(1, 4)].replace(REPLACEMENT, "") for a in starts) if s
    ]


def test_random_ids_both_paths_any_batching_match_full_decode(text_tok):
    rng = random.Random(7)
    fast, window = TokenDecoder(text_tok), TokenDecoder(text_tok, use_table=False)
    for _ in range(300):
        ids = random_ids(rng, text_tok)
        stops = random_stops(rng, text_tok.decode(ids, skip_special_tokens=True))
        text, need = expected(text_tok, ids, stops)
        for decoder in (fast, window):
            for batch in (1, 5, 64):
                pieces, hit, used = stream(decoder, ids, stops, batch, rng)
                assert "".join(pieces) == text, (ids, stops, batch, decoder.table is None)
                assert hit == (first_stop(text_tok.decode(ids), stops) is not None)
                assert used == need


def test_same_text_as_the_per_token_detokenizer_it_replaced(text_tok, hf_tok):
    rng = random.Random(11)
    fast, window = TokenDecoder(hf_tok), TokenDecoder(hf_tok, use_table=False)
    for _ in range(200):
        ids = random_ids(rng, text_tok)
        stops = random_stops(rng, text_tok.decode(ids, skip_special_tokens=True))[:1]
        legacy, out = LegacyDetokenizer(hf_tok, stops), []
        for token in ids:
            piece, hit = legacy.push(token)
            out.append(piece)
            if hit:
                break
        want = "".join(out) + legacy.flush()
        for decoder in (fast, window):
            assert "".join(stream(decoder, ids, stops, 6, rng)[0]) == want, (ids, stops)


def word_level(with_cleanup: bool):
    vocab = {
        w: i
        for i, w in enumerate(
            ["[UNK]", "x", "hello", "world", ".", ",", "'s", "?", "!", "n't", "日本", "é"]
        )
    }
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.add_special_tokens(["<eos>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<eos>", clean_up_tokenization_spaces=with_cleanup
    )


def test_word_level_without_decoder_joins_tokens_by_spaces_on_the_fast_path():
    tok = word_level(with_cleanup=False)
    fast, window = TokenDecoder(tok), TokenDecoder(tok, use_table=False)
    assert fast.table is not None and fast.table.separator == b" "
    rng = random.Random(3)
    for _ in range(200):
        ids = [rng.randrange(len(tok) + 2) for _ in range(rng.randint(1, 30))]
        want = tok.decode(ids, skip_special_tokens=True)
        stops = random_stops(rng, want)
        text = want if first_stop(want, stops) is None else want[: first_stop(want, stops)]
        for decoder in (fast, window):
            assert "".join(stream(decoder, ids, stops, 4, rng)[0]) == text


def test_a_wrapper_that_rewrites_decoded_text_falls_back_to_the_window_path():
    cleaned = word_level(with_cleanup=True)  # " ." -> "." and so on, in transformers' decode
    assert TokenDecoder(cleaned).table is None
    ids = cleaned.encode("hello world . x 's", add_special_tokens=False)
    assert (
        "".join(stream(TokenDecoder(cleaned), ids)[0])
        == cleaned.decode(ids)
        == ("hello world. x's")
    )

    class Shouting:  # a decode the table cannot know about
        backend_tokenizer = word_level(with_cleanup=False).backend_tokenizer

        def decode(self, ids, skip_special_tokens=False):
            return self.backend_tokenizer.decode(ids, skip_special_tokens).upper()

    assert TokenDecoder(Shouting()).table is None


def test_other_decoders_take_the_window_path_and_still_match_decode():
    vocab = (
        [("<unk>", 0.0), ("▁", -1.0)]
        + [(c, -2.0) for c in "abcdeé日本"]
        + [("▁ab", -1.5), ("cd", -1.5), ("▁日本", -1.2)]
    )
    core = Tokenizer(models.Unigram(vocab, unk_id=0))
    core.normalizer = normalizers.NFKC()
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()  # strips the first space: not a byte table
    window = TokenDecoder(core)
    assert window.table is None
    rng = random.Random(5)
    for _ in range(200):
        ids = [rng.randrange(core.get_vocab_size()) for _ in range(rng.randint(1, 20))]
        pieces, _, _ = stream(window, ids, (), 3, rng)
        assert "".join(pieces) == core.decode(ids)
