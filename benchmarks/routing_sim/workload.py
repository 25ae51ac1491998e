"""What is simulated: replicas of a few node types, and users holding multi-turn conversations.

Model: Llama 3.1 70B in bf16, 320 KiB of KV cache per token (80 layers, 8 KV heads, head dim
128, keys and values, 2 bytes), 141 GB of weights. Each node type reports what a real
`LLMReplica` reports: a unified-memory limit (HBM plus the LPDDR5X budget), from which the
weights and the KV caches are used, and a KV budget, beyond which the engine drops idle users'
caches (least recently used first).

A conversation is a list of turns; turn k's request arrives at ``at``, runs until ``end``
(the user's cache cannot be evicted meanwhile), and leaves the user's context at
``context_tokens``; the next turn arrives a think time after ``end``. Times do not depend on
the router, so every policy sees exactly the same requests.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

GiB = 2**30
GB = 10**9
KV_BYTES_PER_TOKEN = 320 * 1024  # Llama 3.1 70B, bf16
WEIGHTS_BYTES = 141 * GB  # Llama 3.1 70B, bf16
MAX_CONTEXT_TOKENS = 131_072
DEFAULT_KV_BUDGET_FRACTION = 0.8  # deployments.config.KVCacheConfig.budget_fraction


@dataclass(frozen=True)
class NodeType:
    """One kind of replica: its unified-memory limit and its KV budget (bytes)."""

    name: str
    limit_bytes: int
    kv_budget_bytes: int
    note: str

    @classmethod
    def grace(
        cls,
        name: str,
        hbm_bytes: int,
        host_bytes: int,
        note: str,
        kv_budget_bytes: int | None = None,
    ) -> NodeType:
        limit = hbm_bytes + host_bytes
        budget = kv_budget_bytes or int(DEFAULT_KV_BUDGET_FRACTION * (limit - WEIGHTS_BYTES))
        return cls(name, limit, budget, note)


NODE_TYPES: tuple[NodeType, ...] = (
    NodeType.grace(
        "gh200-96gb",
        96 * GB,
        340 * GiB,
        "configs/gh200-llama-3.1-70b.yaml",
        kv_budget_bytes=200 * GiB,
    ),
    NodeType.grace("gh200-144gb", 144 * GB, 340 * GiB, "HBM3e variant, default KV budget"),
    NodeType.grace(
        "gb200-gpu", 186 * GB, 200 * GiB, "one replica per Blackwell GPU, half the LPDDR5X each"
    ),
    NodeType.grace(
        "gh200-96gb-shared",
        96 * GB,
        120 * GiB,
        "host memory shared with other work, default KV budget",
    ),
)


def replica_types(count: int, rng: random.Random) -> list[NodeType]:
    """`count` replicas cycling through NODE_TYPES (as equal a mix as possible), shuffled."""
    types = [NODE_TYPES[i % len(NODE_TYPES)] for i in range(count)]
    rng.shuffle(types)
    return types


@dataclass(frozen=True)
class Turn:
    at: float  # request arrives (s)
    end: float  # request finishes (s); the user's cache is in use until then
    prompt_tokens: int  # the whole conversation so far plus the new message
    context_tokens: int  # after the reply: what the user's cache holds


@dataclass(frozen=True)
class Conversation:
    user: str
    turns: tuple[Turn, ...]

    @property
    def final_tokens(self) -> int:
        return self.turns[-1].context_tokens


@dataclass(frozen=True)
class WorkloadShape:
    """Distributions of a conversation, before token counts are scaled to reach a load."""

    users: int = 10_000
    arrival_window_s: float = 3600.0  # Poisson arrivals of new users over this window
    mean_turns: float = 6.0  # geometric, at least 1
    max_turns: int = 40
    first_prompt_median: float = 800.0  # tokens, lognormal
    first_prompt_sigma: float = 1.0
    message_median: float = 120.0  # each later user message, lognormal
    message_sigma: float = 1.0
    reply_median: float = 250.0  # each reply, lognormal
    reply_sigma: float = 0.6
    max_reply_tokens: int = 4096
    think_median_s: float = 30.0  # between a reply and the next message, lognormal
    think_sigma: float = 0.8
    decode_s_per_token: float = 0.02  # request duration: reply tokens x this


@dataclass(frozen=True)
class _Draws:
    """One user's random draws (token counts before scaling), fixed by the seed."""

    arrival: float
    first: float
    messages: tuple[float, ...]
    replies: tuple[float, ...]
    thinks: tuple[float, ...]


def _draw(shape: WorkloadShape, rng: random.Random) -> list[_Draws]:
    draws, t = [], 0.0
    rate = shape.users / shape.arrival_window_s
    p = 1.0 / shape.mean_turns
    for _ in range(shape.users):
        t += rng.expovariate(rate)
        turns = min(shape.max_turns, 1 + int(math.log(1.0 - rng.random()) / math.log(1.0 - p)))
        draws.append(
            _Draws(
                arrival=t,
                first=rng.lognormvariate(
                    math.log(shape.first_prompt_median), shape.first_prompt_sigma
                ),
                messages=tuple(
                    rng.lognormvariate(math.log(shape.message_median), shape.message_sigma)
                    for _ in range(turns - 1)
                ),
                replies=tuple(
                    rng.lognormvariate(math.log(shape.reply_median), shape.reply_sigma)
                    for _ in range(turns)
                ),
                thinks=tuple(
                    rng.lognormvariate(math.log(shape.think_median_s), shape.think_sigma)
                    for _ in range(turns - 1)
                ),
            )
        )
    return draws


def _build(shape: WorkloadShape, draws: list[_Draws], scale: float) -> list[Conversation]:
    conversations = []
    for i, d in enumerate(draws):
        turns: list[Turn] = []
        at, context = d.arrival, 0
        for k, reply_draw in enumerate(d.replies):
            message = d.first if k == 0 else d.messages[k - 1]
            prompt = context + max(1, round(scale * message))
            reply = min(shape.max_reply_tokens, max(1, round(scale * reply_draw)))
            if prompt + reply > MAX_CONTEXT_TOKENS:
                break  # the conversation ends at the model's context length
            end = at + reply * shape.decode_s_per_token
            turns.append(Turn(at, end, prompt, prompt + reply))
            context = prompt + reply
            if k < len(d.thinks):
                at = end + d.thinks[k]
        if turns:
            conversations.append(Conversation(f"user{i:05d}", tuple(turns)))
    return conversations


def demand_bytes(conversations: list[Conversation]) -> int:
    """KV bytes of every conversation at its end: what keeping every cache would take."""
    return sum(c.final_tokens for c in conversations) * KV_BYTES_PER_TOKEN


def make_workload(
    shape: WorkloadShape, capacity_bytes: int, load: float, seed: int
) -> tuple[list[Conversation], float]:
    """Conversations whose total final KV is `load` x `capacity_bytes`; returns them and the
    token scale applied to every drawn length (the shape's medians are at scale 1)."""
    draws = _draw(shape, random.Random(seed))
    scale = 1.0
    for _ in range(8):  # rounding and the context cap make demand nearly, not exactly, linear
        conversations = _build(shape, draws, scale)
        ratio = load * capacity_bytes / demand_bytes(conversations)
        if abs(ratio - 1.0) < 1e-3:
            break
        scale *= ratio
    return _build(shape, draws, scale), scale
