"""What the serving benchmark sends: the plan's sizes, its steps in order, each step's sessions.

A step is one measured run of one workload (or its warm-up round) and is plain data, so the
in-process phase and every HTTP client process rebuild the very same sessions from it:

- ``fixed``: closed-loop clients at a fixed concurrency, random prompts of
  `prompt_tokens`, `output_tokens` each; every setting first runs a warm-up round (one
  request per client, not measured);
- ``returning``: one user with a long history returning `returns` times, each return adding
  a few new tokens (lengths drawn from `added_tokens`);
- ``multi_turn``: `chat_users` chat users, `turns` turns each with think time between
  turns; one in `users // long_users` starts with a long document so its history passes 8k.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks.serve.sessions import (
    GREEDY,
    SAMPLED,
    SAMPLINGS,
    ChatUser,
    ClosedLoopClient,
    ReturningUser,
    Session,
)


@dataclass(frozen=True)
class Plan:
    """Sizes of every workload (token counts are exact: one word is one token)."""

    name: str
    model: str  # which HF config the benchmark model has (model_config() in serve_bench)
    concurrency: tuple[int, ...]
    rounds: tuple[int, ...]  # measured requests per client at each concurrency
    fixed_cap_s: tuple[float, ...]  # no request starts later than this into a fixed step
    prompt_tokens: int
    output_tokens: int
    chat_users: int
    long_users: int
    turns: int
    first_tokens: tuple[int, int]  # first message of an ordinary user (uniform range)
    long_first_tokens: tuple[int, int]  # first message of a long user
    message_tokens: tuple[int, int]  # every later message
    reply_tokens: tuple[int, int]  # max_tokens of each turn
    think_s: tuple[float, float]  # pause between a reply and the next turn
    ramp_s: float  # users start evenly spread over this time
    chat_cap_s: float  # no turn starts later than this into the step
    history_tokens: int
    returns: int
    added_tokens: tuple[int, int]
    return_reply_tokens: int
    return_think_s: float
    returns_cap_s: float


FULL = Plan(
    name="full",
    model="llama-3.1-8b",
    concurrency=(1, 16, 64, 128, 256),
    rounds=(20, 3, 3, 2, 2),
    fixed_cap_s=(15, 12, 15, 20, 25),
    prompt_tokens=512,
    output_tokens=128,
    chat_users=256,
    long_users=16,
    turns=6,
    first_tokens=(200, 800),
    long_first_tokens=(7000, 7400),
    message_tokens=(40, 200),
    reply_tokens=(48, 144),
    think_s=(0.5, 2.5),
    ramp_s=8.0,
    chat_cap_s=75.0,
    history_tokens=8192,
    returns=50,
    added_tokens=(40, 90),
    return_reply_tokens=16,
    return_think_s=0.1,
    returns_cap_s=40.0,
)
QUICK_PLAN = Plan(
    name="quick",
    model="quick",
    concurrency=(1, 4, 8),
    rounds=(3, 2, 2),
    fixed_cap_s=(20, 20, 20),
    prompt_tokens=512,
    output_tokens=32,
    chat_users=8,
    long_users=2,
    turns=6,
    first_tokens=(50, 150),
    long_first_tokens=(1100, 1200),
    message_tokens=(10, 40),
    reply_tokens=(8, 24),
    think_s=(0.05, 0.3),
    ramp_s=0.5,
    chat_cap_s=60.0,
    history_tokens=1024,
    returns=6,
    added_tokens=(40, 90),
    return_reply_tokens=8,
    return_think_s=0.05,
    returns_cap_s=30.0,
)
PLANS = {p.name: p for p in (FULL, QUICK_PLAN)}


@dataclass(frozen=True)
class Step:
    """One run of one workload; plain data, sent to client processes as JSON."""

    name: str
    kind: str  # "fixed" | "returning" | "multi_turn"
    sampling: str  # a key of SAMPLINGS
    cap_s: float
    concurrency: int = 0
    requests: int = 0  # per client (fixed)
    warmup: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Step:
        return cls(**data)


def steps(plan: Plan, names: str | None = None) -> list[Step]:
    """Every step in the order both phases run them; with `names` (comma-separated), only
    the steps each names: a step's name, or its start up to a dash ("fixed-c64": both
    samplings at 64 clients, warm-ups included)."""
    todo = all_steps(plan)
    if not names:
        return todo
    wanted = [n.strip() for n in names.split(",") if n.strip()]

    def named(step: Step, name: str) -> bool:
        return step.name == name or step.name.startswith(name + "-")

    unknown = [n for n in wanted if not any(named(s, n) for s in todo)]
    if unknown:
        raise ValueError(f"no step named {', '.join(unknown)}")
    return [s for s in todo if any(named(s, n) for n in wanted)]


def all_steps(plan: Plan) -> list[Step]:
    out = []
    for c, rounds, cap in zip(plan.concurrency, plan.rounds, plan.fixed_cap_s, strict=True):
        for sampling in (SAMPLED, GREEDY):
            name = f"fixed-c{c}-{sampling.name}"
            out.append(Step(f"{name}-warmup", "fixed", sampling.name, cap, c, 1, warmup=True))
            out.append(Step(name, "fixed", sampling.name, cap, c, rounds))
    out.append(Step("returning", "returning", SAMPLED.name, plan.returns_cap_s))
    out.append(Step("multi_turn", "multi_turn", SAMPLED.name, plan.chat_cap_s))
    return out


def sessions_for(step: Step, plan: Plan) -> list[Session]:
    """The step's sessions, the same in every process (seeded by step and session)."""
    sampling = SAMPLINGS[step.sampling]
    if step.kind == "fixed":
        return [
            ClosedLoopClient(
                f"client-{i}",
                step.requests,
                plan.prompt_tokens,
                plan.output_tokens,
                sampling,
                not step.warmup,
                f"{step.name}/{i}",
            )
            for i in range(step.concurrency)
        ]
    if step.kind == "returning":
        rng = random.Random(f"{step.name}/lengths")
        added = [rng.randint(*plan.added_tokens) for _ in range(plan.returns)]
        return [
            ReturningUser(
                "returning-user",
                plan.history_tokens,
                added,
                plan.return_reply_tokens,
                plan.return_think_s,
                sampling,
                f"{step.name}/words",
            )
        ]
    if step.kind == "multi_turn":
        return [chat_user(plan, sampling, step.name, i) for i in range(plan.chat_users)]
    raise ValueError(f"unknown workload {step.kind!r}")


def chat_user(plan: Plan, sampling: Any, step_name: str, i: int) -> ChatUser:
    """User `i` of the multi-turn workload; every (users // long_users)-th one is long."""
    rng = random.Random(f"{step_name}/{i}/lengths")
    long = plan.long_users > 0 and i % (plan.chat_users // plan.long_users) == 0
    first = rng.randint(*(plan.long_first_tokens if long else plan.first_tokens))
    messages = [first] + [rng.randint(*plan.message_tokens) for _ in range(plan.turns - 1)]
    replies = [rng.randint(*plan.reply_tokens) for _ in range(plan.turns)]
    think = [rng.uniform(*plan.think_s) for _ in range(plan.turns)]
    return ChatUser(
        f"chat-user-{i}",
        plan.ramp_s * i / plan.chat_users,
        messages,
        replies,
        think,
        sampling,
        f"{step_name}/{i}/words",
    )


def kept_kv_tokens(plan: Plan, page_size: int) -> dict[str, int]:
    """KV tokens (whole pages) the kept users hold at the end of the returning and
    multi-turn steps: what must fit the replica's KV budget for every history to stay."""

    def pages(tokens: int) -> int:
        return -(-tokens // page_size) * page_size

    by_step = {}
    for step in steps(plan):
        if step.kind in ("returning", "multi_turn"):
            by_step[step.kind] = sum(pages(s.final_tokens()) for s in sessions_for(step, plan))
    return by_step


def kv_expectation(
    plan: Plan, kv_bytes_per_token: int, page_size: int, budget_bytes: int
) -> dict[str, Any]:
    """The kept users' KV at the end of the run against the replica's KV budget."""
    tokens = kept_kv_tokens(plan, page_size)
    total = sum(tokens.values()) * kv_bytes_per_token
    return {
        "kept_tokens": tokens,
        "kept_bytes": total,
        "kv_budget_bytes": budget_bytes,
        "share_of_budget": round(total / budget_bytes, 4) if budget_bytes else None,
        "fits": total <= budget_bytes,
    }


def describe_kv(expect: dict[str, Any]) -> str:
    """One line for the log."""
    share = expect["share_of_budget"] or 0
    return (
        f"kept KV at the end: {expect['kept_tokens']} tokens = "
        f"{_size(expect['kept_bytes'])} of the replica's kv_budget_bytes "
        f"{_size(expect['kv_budget_bytes'])} ({100 * share:.0f}%)"
        + ("" if expect["fits"] else "  ** DOES NOT FIT: caches will be dropped **")
    )


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
