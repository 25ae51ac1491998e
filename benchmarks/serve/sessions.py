"""How the benchmark's clients behave, whatever carries their requests.

A session is one client: a closed-loop client of the fixed-concurrency workload, a chat user
of the multi-turn workload, or the returning user. It builds each request (`Call`) from what
came back before and hands it to a transport, an async callable returning a `Reply`: HTTP
through the OpenAI-compatible API (http_client) or the engine in-process (engine_side). Both
phases run these same sessions with the same seeds, so they send the same requests.

A session starts no request at or after `stop_at` (monotonic seconds): a run cut short by its
time cap still ends cleanly, with fewer records.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from benchmarks.bench_model import words


@dataclass(frozen=True)
class Sampling:
    """A sampling setting the workloads run at."""

    name: str
    temperature: float
    top_p: float


SAMPLED = Sampling("sampled", 1.0, 0.95)
GREEDY = Sampling("greedy", 0.0, 1.0)
SAMPLINGS = {s.name: s for s in (SAMPLED, GREEDY)}


@dataclass
class Call:
    """One request: a text completion (`prompt`) or a chat turn (`messages`)."""

    max_tokens: int
    sampling: Sampling
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    user: str | None = None  # X-User-Id: the user's KV cache is kept between requests


@dataclass
class Reply:
    """What came back. Times are monotonic seconds (system-wide on Linux, so records from
    several processes share one clock); `chunk_t` are seconds after `start` at which each
    content chunk arrived and `chunk_n` how many tokens it carried."""

    start: float
    end: float = 0.0
    chunk_t: list[float] = field(default_factory=list)
    chunk_n: list[int] = field(default_factory=list)
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None
    server_timing: dict[str, float] = field(default_factory=dict)  # ms, from the response header


Transport = Callable[[Call], Awaitable[Reply]]


def record(
    reply: Reply, call: Call, session: str, turn: int, measured: bool, held_tokens: int = 0
) -> dict[str, Any]:
    """A reply as a JSON-able record (without its text)."""
    return {
        "session": session,
        "turn": turn,
        "measured": measured,
        "max_tokens": call.max_tokens,
        "held_tokens": held_tokens,
        "start": reply.start,
        "end": reply.end,
        "chunk_t": [round(t, 6) for t in reply.chunk_t],
        "chunk_n": reply.chunk_n,
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "cached_tokens": reply.cached_tokens,
        "error": reply.error,
        "server_timing": reply.server_timing,
    }


def random_words(rng: random.Random, visible: list[int], n: int) -> str:
    """`n` random visible words: exactly `n` tokens."""
    return words(rng.choices(visible, k=n))


@dataclass
class ClosedLoopClient:
    """Fixed concurrency: sends its next request when the last one ends, `requests` times,
    each a fresh random prompt (no user id, so nothing is kept)."""

    name: str
    requests: int
    prompt_tokens: int
    max_tokens: int
    sampling: Sampling
    measured: bool
    seed: str

    async def run(
        self, send: Transport, visible: list[int], stop_at: float
    ) -> list[dict[str, Any]]:
        rng, out = random.Random(self.seed), []
        for i in range(self.requests):
            if time.monotonic() >= stop_at:
                break
            call = Call(
                self.max_tokens,
                self.sampling,
                prompt=random_words(rng, visible, self.prompt_tokens),
            )
            out.append(record(await send(call), call, self.name, i, self.measured))
        return out


@dataclass
class ChatUser:
    """Multi-turn chat: each turn sends the whole conversation (its replies included) through
    the chat API with the user's id, then thinks before the next turn."""

    name: str
    start_delay_s: float
    message_tokens: list[int]  # the user's message of each turn
    reply_tokens: list[int]  # max_tokens of each turn
    think_s: list[float]  # pause after each turn
    sampling: Sampling
    seed: str

    async def run(
        self, send: Transport, visible: list[int], stop_at: float
    ) -> list[dict[str, Any]]:
        rng, out, messages, held = random.Random(self.seed), [], [], 0
        await asyncio.sleep(self.start_delay_s)
        for turn, (n, reply_n) in enumerate(
            zip(self.message_tokens, self.reply_tokens, strict=True)
        ):
            if time.monotonic() >= stop_at:
                break
            messages.append({"role": "user", "content": random_words(rng, visible, n)})
            call = Call(reply_n, self.sampling, messages=list(messages), user=self.name)
            reply = await send(call)
            out.append(record(reply, call, self.name, turn, True, held))
            if reply.error:
                break
            messages.append({"role": "assistant", "content": reply.text})
            held = reply.prompt_tokens + reply.completion_tokens
            await asyncio.sleep(self.think_s[turn])
        return out

    def final_tokens(self) -> int:
        """Tokens of the whole conversation at its end, as the chat template writes it: bos,
        each message with its role marker and end-of-turn, the last reply without one."""
        return (
            1 + sum(n + 2 for n in self.message_tokens) + sum(r + 2 for r in self.reply_tokens) - 1
        )


@dataclass
class ReturningUser:
    """One user with a long history returning again and again: turn 0 sends the history,
    each later turn the previous prompt, the reply and a few new words (text completions
    with the user's id). Turn 0 only fills the cache and is not measured."""

    name: str
    history_tokens: int
    added_tokens: list[int]  # new words of each return
    reply_tokens: int
    think_s: float
    sampling: Sampling
    seed: str

    async def run(
        self, send: Transport, visible: list[int], stop_at: float
    ) -> list[dict[str, Any]]:
        rng, out, held, text = random.Random(self.seed), [], 0, ""
        prompt = random_words(rng, visible, self.history_tokens)
        for turn in range(len(self.added_tokens) + 1):
            if time.monotonic() >= stop_at:
                break
            if turn:  # the history as the cache holds it: the last prompt, then its reply
                added = random_words(rng, visible, self.added_tokens[turn - 1])
                prompt = f"{prompt} {text} {added}"
            call = Call(self.reply_tokens, self.sampling, prompt=prompt, user=self.name)
            reply = await send(call)
            out.append(record(reply, call, self.name, turn, turn > 0, held))
            if reply.error:
                break
            text, held = reply.text, reply.prompt_tokens + reply.completion_tokens
            await asyncio.sleep(self.think_s)
        return out

    def final_tokens(self) -> int:
        return (
            self.history_tokens
            + sum(self.added_tokens)
            + (len(self.added_tokens) + 1) * self.reply_tokens
        )


Session = ClosedLoopClient | ChatUser | ReturningUser


async def run_sessions(
    sessions: list[Session], send: Transport, visible: list[int], stop_at: float
) -> list[dict[str, Any]]:
    """Run every session at once; their records, in session order."""
    results = await asyncio.gather(*(s.run(send, visible, stop_at) for s in sessions))
    return [r for records in results for r in records]
