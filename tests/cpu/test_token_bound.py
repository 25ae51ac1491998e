"""token_bound: a text's UTF-8 length bounds its token count from below, for every text, on
tokenizers where that is certain, and gives no bound where text can vanish."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

from deployments.model_files import resolve_model_dir
from deployments.token_bound import fewest_tokens, max_bytes_per_token
from deployments.tokenizer import TextTokenizer

# ASCII, Latin with combining marks, fullwidth letters (NFKC: 3 bytes -> 1), Hangul jamo
# (NFC: three 3-byte jamo -> one 3-byte syllable), CJK, emoji, ligatures.
ALPHABET = (
    list("abcdefghij klmnop,.!?0123456789\n\t")
    + ["e\u0301", "\u0301"]
    + [chr(c) for c in range(0xFF21, 0xFF3B)]
    + [chr(0x1100 + i) + chr(0x1161 + i) + chr(0x11A8 + i) for i in range(10)]
    + list("统一内存")
    + ["😀", "🚀"]
    + ["ﬁ", "ﬂ"]
)
CORPUS = ["unified memory hello world 한국어 ＡＢＣ ﬁ café", "the router sends 가나다 home"] * 40


def trained(normalizer=None, pre=None, byte_fallback: bool = False) -> Tokenizer:
    tok = Tokenizer(models.BPE(byte_fallback=byte_fallback))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    alphabet = (
        pre_tokenizers.ByteLevel.alphabet() if isinstance(pre, pre_tokenizers.ByteLevel) else []
    )
    tok.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=400, initial_alphabet=alphabet, show_progress=False)
    )
    return tok


def random_texts(seed: int, n: int = 200) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 300))) for _ in range(n)]


BOUNDED = {
    "builtin": lambda: (
        TextTokenizer.load(resolve_model_dir("builtin:tiny-llama", weights=False)).backend_tokenizer
    ),
    "nfkc-bytelevel": lambda: trained(normalizers.NFKC(), pre_tokenizers.ByteLevel()),
    "nfc-split-bytelevel": lambda: trained(
        normalizers.NFC(),
        pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel()]
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(BOUNDED))
def test_no_text_has_fewer_tokens_than_its_bytes_allow(name):
    tok = BOUNDED[name]()
    bound = max_bytes_per_token(tok)
    assert bound is not None
    for text in random_texts(seed=len(name)):
        count = len(tok.encode(text, add_special_tokens=False).ids)
        assert count >= fewest_tokens(len(text.encode()), bound), text


def test_tokenizers_that_can_drop_text_give_no_bound():
    spaces = " " * 1000  # 1,000 bytes that these tokenize to (almost) nothing
    for tok in (
        trained(None, pre_tokenizers.Whitespace(), byte_fallback=True),
        trained(normalizers.Strip(), pre_tokenizers.ByteLevel()),
    ):
        assert len(tok.encode(spaces).ids) <= 1
        assert max_bytes_per_token(tok) is None
    no_bytes = trained(None, pre_tokenizers.Metaspace())  # unknown characters vanish
    assert len(no_bytes.encode("😀" * 100).ids) <= 1 and max_bytes_per_token(no_bytes) is None
    assert fewest_tokens(10**6, None) == 0 and fewest_tokens(35, 17) == 3
