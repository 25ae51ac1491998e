"""Tokens travel in batches: engine -> request (one hand-off per step), replica -> ingress (one
message per batch, paced by load), with the same tokens and text as one at a time."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

import pytest

from deployments.admission import RequestShape
from deployments.detokenizer import token_decoder
from deployments.engine import GenerationRequest, SamplingParams
from deployments.engine.interface import RequestProgress
from deployments.model_files import resolve_model_dir
from deployments.pacing import StreamPacing
from deployments.replica import LLMReplica
from deployments.text_stream import TextStream
from deployments.tokenizer import TextTokenizer

ARGS = {
    "model": {"model_id": "builtin:tiny-llama", "max_model_len": 512},
    "memory": {"cpu_memory_budget_bytes": "64MiB"},
    "kv_cache": {"budget_bytes": "8MiB"},
    "engine": {"cpu_threads": 1, "default_max_tokens": 24},
}
TOKENIZER = TextTokenizer.load(resolve_model_dir("builtin:tiny-llama", weights=False))
PROMPT = TOKENIZER.encode_text("Unified memory lets the GPU and the CPU share one address space.")


@pytest.fixture(scope="module")
def replica():
    rep = LLMReplica(ARGS)
    yield rep
    asyncio.run(rep.engine.shutdown())


def greedy(max_tokens: int = 24, **extra) -> dict:
    """A replica call's keyword arguments, as the ingress makes them."""
    return {
        "request": {
            "prompt_token_ids": PROMPT,
            "sampling": {"max_tokens": max_tokens, "temperature": 0, **extra},
        },
        "shape": RequestShape(None, len(PROMPT), max_tokens),
    }


async def messages_of(rep: LLMReplica, call: dict) -> list[list[dict]]:
    return [m async for m in rep.generate(**call)]


def text_and_tokens(messages: list[list[dict]]) -> tuple[str, list[int]]:
    """The replica's tokens, and the text the ingress makes of them message by message."""
    deltas = [e for m in messages for e in m if e["event"] == "delta"]
    stream = TextStream(token_decoder(TOKENIZER), messages[0][0], (), 0)
    text = [e.get("text", "") for m in messages for e in stream.feed(m)]
    return "".join(text), [t for e in deltas for t in e["token_ids"]]


def test_a_slow_reader_gets_several_tokens_per_batch_and_the_same_tokens(replica):
    engine = replica.engine
    request = GenerationRequest("r", None, PROMPT, SamplingParams(24, temperature=0))

    async def read(delay_s: float) -> list[list[int]]:
        batches = []
        async for batch in engine.stream_tokens(request, RequestProgress()):
            batches.append(batch)
            await asyncio.sleep(delay_s)
        return batches

    eager, slow = asyncio.run(read(0)), asyncio.run(read(0.05))
    flat = [t for b in eager for t in b]
    assert flat == [t for b in slow for t in b] and len(flat) == 24
    assert max(len(b) for b in slow) > 1  # tokens gathered while the reader slept
    assert len(slow) < len(eager)


def test_one_stream_gets_a_message_per_step_and_many_share_a_paced_budget(replica):
    alone = asyncio.run(messages_of(replica, greedy()))
    text, tokens = text_and_tokens(alone)
    # One stream: no gap at all, so tokens go as they come (a token per message, unless this
    # loaded 2-core machine's event loop falls a step behind now and then).
    assert replica.pacing.gap_s(1) < 0.0005 and len(tokens) == 24
    assert len(alone) > len(tokens) / 2
    assert alone[0][0]["event"] == "start" and alone[0][1]["event"] == "delta"
    assert alone[-1][-1]["event"] == "end"

    replica.pacing = StreamPacing(messages_per_s=40)  # 4 streams: a message per 100 ms each

    async def four() -> list[list[list[dict]]]:
        return await asyncio.gather(*[messages_of(replica, greedy()) for _ in range(4)])

    try:
        started = time.monotonic()
        paced = asyncio.run(four())
        elapsed = time.monotonic() - started
    finally:
        replica.pacing = StreamPacing(replica.args.replica.stream_messages_per_s)
    for messages in paced:
        assert text_and_tokens(messages) == (text, tokens)  # same tokens, same text
        assert len(messages) <= elapsed / 0.1 + 2 < len(tokens)


@contextlib.contextmanager
def end_token(replica: LLMReplica, which: int) -> Iterator[list[int]]:
    """Make the `which`-th token of the plain greedy answer an end token meanwhile; yield that
    answer's tokens."""
    engine = replica.engine
    first = text_and_tokens(asyncio.run(messages_of(replica, greedy(8))))[1]
    saved, engine.eos_token_ids = engine.eos_token_ids, frozenset({first[which]})
    try:
        yield first
    finally:
        engine.eos_token_ids = saved


def test_ignore_eos_generates_max_tokens_past_an_end_token(replica):
    with end_token(replica, 2) as first:  # the third greedy token now ends a request
        stopped = asyncio.run(messages_of(replica, greedy(8)))
        ignored = asyncio.run(messages_of(replica, greedy(8, ignore_eos=True)))
    assert text_and_tokens(stopped)[1] == first[:3]
    assert stopped[-1][-1]["finish_reason"] == "stop"
    assert text_and_tokens(ignored)[1] == first
    assert ignored[-1][-1]["finish_reason"] == "length"


def test_min_tokens_bans_end_tokens_until_then(replica):
    with end_token(replica, 0) as first:  # the greedy first token now ends a request
        held = asyncio.run(messages_of(replica, greedy(8, min_tokens=3)))
    tokens = text_and_tokens(held)[1]
    assert first[0] not in tokens[:3] and len(tokens) >= 4  # drawn from the rest meanwhile
