"""The ingress turns replica token messages into text: stop strings, min_tokens, usage, and the
same text however the tokens were batched; over HTTP, a stop string ends the request there."""

from __future__ import annotations

import random

import httpx

from deployments.detokenizer import token_decoder
from deployments.model_files import resolve_model_dir
from deployments.text_stream import TextStream
from deployments.tokenizer import TextTokenizer

TOKENIZER = TextTokenizer.load(resolve_model_dir("builtin:tiny-llama", weights=False))
DECODER = token_decoder(TOKENIZER)
START = {"event": "start", "replica_id": "r", "prompt_tokens": 7, "cached_tokens": 3}
TEXT = "The answer is 42. STOP and then some more text nobody should see."


def plain_ids(text: str) -> list[int]:
    """A completion's tokens for `text` (no special tokens)."""
    return TOKENIZER.backend_tokenizer.encode(text, add_special_tokens=False).ids


def messages(ids: list[int], sizes: list[int]) -> list[list[dict]]:
    """Replica messages carrying `ids` in batches of `sizes`, then the replica's end."""
    out, at = [], 0
    for n in sizes:
        out.append([{"event": "delta", "token_ids": ids[at : at + n]}])
        at += n
    out[-1].append(
        {
            "event": "end",
            "finish_reason": "length",
            "usage": {
                "prompt_tokens": 7,
                "completion_tokens": len(ids),
                "total_tokens": 7 + len(ids),
                "prompt_tokens_details": {"cached_tokens": 3},
            },
        }
    )
    return out


def run(ids: list[int], sizes: list[int], stop=(), min_tokens=0) -> tuple[str, dict]:
    stream = TextStream(DECODER, START, tuple(stop), min_tokens)
    events = [e for m in messages(ids, sizes) for e in stream.feed(m)]
    return "".join(e.get("text", "") for e in events if e["event"] == "delta"), events[-1]


def sizes_for(n: int, rng: random.Random) -> list[int]:
    sizes = []
    while sum(sizes) < n:
        sizes.append(min(rng.randint(1, 6), n - sum(sizes)))
    return sizes


def test_text_is_the_same_however_the_tokens_are_batched():
    ids = plain_ids(TEXT + " ünïcødé 日本語")
    whole, end = run(ids, [1] * len(ids))
    assert whole == TOKENIZER.decode(ids, skip_special_tokens=True)
    assert end["finish_reason"] == "length" and end["usage"]["completion_tokens"] == len(ids)
    rng = random.Random(5)
    for _ in range(20):
        assert run(ids, sizes_for(len(ids), rng))[0] == whole


def test_a_stop_string_ends_the_text_before_it_with_the_tokens_used():
    ids = plain_ids(TEXT)
    rng = random.Random(6)
    for sizes in ([len(ids)], [1] * len(ids), sizes_for(len(ids), rng)):
        text, end = run(ids, sizes, stop=["STOP"])
        assert text == "The answer is 42. "
        assert end["finish_reason"] == "stop"
        used = end["usage"]["completion_tokens"]
        assert used < len(ids) and "STOP" in TOKENIZER.decode(ids[:used])
        assert "STOP" not in TOKENIZER.decode(ids[: used - 1])
        assert end["usage"]["prompt_tokens_details"]["cached_tokens"] == 3


def test_stop_strings_count_only_after_min_tokens():
    ids = plain_ids("STOP here, then STOP again and more")
    text, end = run(ids, sizes_for(len(ids), random.Random(7)), stop=["STOP"], min_tokens=3)
    assert text.startswith("STOP here, then ") and "STOP" not in text[4:]
    assert end["finish_reason"] == "stop"


def test_over_http_a_stop_string_ends_the_answer_and_its_usage(llm_url):
    body = {
        "model": "tiny-llama",
        "prompt": "Numbers: 0 1 2 3",
        "max_tokens": 40,
        "temperature": 0,
        "ignore_eos": True,
    }
    full = httpx.post(f"{llm_url}/v1/completions", json=body, timeout=60).json()
    text = full["choices"][0]["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), text
    cut = httpx.post(f"{llm_url}/v1/completions", json={**body, "stop": [stop]}, timeout=60).json()
    assert cut["choices"][0]["text"] == text[: text.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["usage"]["completion_tokens"] < full["usage"]["completion_tokens"] == 40
