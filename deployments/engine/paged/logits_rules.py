"""Per-row rules on a step's logits before the sampler draws, and the logprobs it reports.

vLLM's order (vllm/v1/sample/sampler.py), which the API's users expect:

1. logprobs (when asked for) are of the RAW distribution: log_softmax of the model's logits
   in float32, before every rule below and before temperature (vLLM's default
   `logprobs_mode="raw_logprobs"`);
2. the grammar's token mask (response_format): disallowed tokens get -inf;
3. logit_bias: added to the named tokens' logits;
4. repetition_penalty r on every token seen in the prompt or the output: a logit x > 0
   becomes x / r, else x * r; then frequency_penalty f and presence_penalty p on the output
   tokens: x - f * count - p * (count > 0);
5. then the sampler (sampler.py): EOS bans, temperature, top_k, min_p, top_p, the draw.

A step's host-side part is a `HostRules` of plain numpy arrays; `to_device` uploads it in one
int64 and one int32 copy (upload.py), and `apply_rules` is a handful of device ops that never
wait for the host (no .item(), no boolean indexing, no host lists). Output-token counts live
on the device (`TokenCounts`): a row's sampled token is added right after the draw, so a step
launched before the previous step's tokens reach the host still sees them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from deployments.engine.interface import SamplingParams, TokenLogprob
from deployments.engine.paged.sampler import sample
from deployments.engine.paged.upload import upload

MASK_BITS = 32  # tokens per int32 word of a grammar mask (llguidance's layout: bit i of word w
# is token 32 * w + i)


@dataclass(frozen=True)
class HostRules:
    """One step's rules for its sampling rows, built on the host (no device work)."""

    slots: np.ndarray  # int64 [R]: each row's TokenCounts slot (0: the shared unused slot)
    fresh: np.ndarray  # int64 [F]: slots that start a sequence this step (counts reset)
    prompt_index: np.ndarray  # int64 [P]: slot * V + token id of those sequences' prompts
    penalties: np.ndarray  # float32 [3R]: presence, frequency, repetition, each by row
    bias_index: np.ndarray  # int64 [B]: row * V + token id
    bias_value: np.ndarray  # float32 [B]
    mask_rows: np.ndarray  # int64 [G]: rows under a grammar
    mask_words: np.ndarray  # int32 [G, W]: their allowed tokens, MASK_BITS a word

    @property
    def penalized(self) -> bool:
        p = self.penalties.reshape(3, -1)
        return bool((p[0] != 0).any() or (p[1] != 0).any() or (p[2] != 1).any())

    def to_device(self, device: torch.device | str) -> DeviceRules:
        """Two packed uploads (pinned and asynchronous on CUDA)."""
        device = torch.device(device)
        g, w = self.mask_words.shape
        slots, fresh, prompt, bias_i, rows = upload(
            [self.slots, self.fresh, self.prompt_index, self.bias_index, self.mask_rows],
            np.int64,
            device,
        )
        pens, bias_v, words = upload(
            [
                self.penalties.view(np.int32),
                self.bias_value.view(np.int32),
                self.mask_words.ravel(),
            ],
            np.int32,
            device,
        )
        pens = pens.view(torch.float32).view(3, -1)
        return DeviceRules(
            slots,
            fresh,
            prompt,
            pens[0],
            pens[1],
            pens[2],
            bias_i,
            bias_v.view(torch.float32),
            rows,
            words.view(g, w),
            self.penalized,
            len(self.bias_value) > 0,
            g > 0,
        )


class DeviceRules(NamedTuple):
    slots: torch.Tensor
    fresh: torch.Tensor
    prompt_index: torch.Tensor
    presence: torch.Tensor
    frequency: torch.Tensor
    repetition: torch.Tensor
    bias_index: torch.Tensor
    bias_value: torch.Tensor
    mask_rows: torch.Tensor
    mask_words: torch.Tensor
    penalized: bool  # host facts: which ops this step needs
    biased: bool
    masked: bool


def build_rules(
    params: list[SamplingParams],
    slots: list[int],
    fresh: list[tuple[int, list[int]]],
    vocab: int,
    masks: list[tuple[int, np.ndarray]],
) -> HostRules:
    """Rules for rows with these params and TokenCounts slots; `fresh`: (slot, prompt ids) of
    sequences whose counts start now; `masks`: (row, int32 words) of rows under a grammar."""
    rows = len(params)
    bias = [
        (r * vocab + t, b) for r, p in enumerate(params) for t, b in p.logit_bias if 0 <= t < vocab
    ]
    prompt = [s * vocab + t for s, ids in fresh for t in set(ids) if 0 <= t < vocab]
    width = -(-vocab // MASK_BITS)
    return HostRules(
        slots=np.asarray(slots, dtype=np.int64).reshape(rows),
        fresh=np.asarray([s for s, _ in fresh], dtype=np.int64),
        prompt_index=np.asarray(prompt, dtype=np.int64),
        penalties=np.asarray(
            [
                [p.presence_penalty for p in params],
                [p.frequency_penalty for p in params],
                [p.repetition_penalty for p in params],
            ],
            dtype=np.float32,
        ).reshape(3 * rows),
        bias_index=np.asarray([i for i, _ in bias], dtype=np.int64),
        bias_value=np.asarray([b for _, b in bias], dtype=np.float32),
        mask_rows=np.asarray([r for r, _ in masks], dtype=np.int64),
        mask_words=(
            np.stack([w[:width] for _, w in masks]).astype(np.int32)
            if masks
            else np.zeros((0, width), dtype=np.int32)
        ),
    )


def needs_rules(params: SamplingParams) -> bool:
    return params.penalized or bool(params.logit_bias) or params.response_format is not None


class TokenCounts:
    """Per-sequence output-token counts and prompt-token sets on the device, by slot.

    Slot 0 is never handed out: rows without penalties point at it, and what is counted there
    is never read. Host side: which sequence holds which slot (`assign`, `release`); device
    side: `reset` at a sequence's first step, `add` after each draw. Grows by doubling (an
    allocation and a copy, never a host wait)."""

    def __init__(self, vocab: int, device: torch.device, slots: int = 8) -> None:
        self.vocab = vocab
        self.device = device
        self.counts = torch.zeros(slots, vocab, dtype=torch.int32, device=device)
        self.prompt = torch.zeros(slots, vocab, dtype=torch.bool, device=device)
        self._free = list(range(slots - 1, 0, -1))

    def assign(self) -> int:
        if not self._free:
            old = self.counts.shape[0]
            self.counts = torch.cat([self.counts, torch.zeros_like(self.counts)])
            self.prompt = torch.cat([self.prompt, torch.zeros_like(self.prompt)])
            self._free = list(range(2 * old - 1, old - 1, -1))
        return self._free.pop()

    def fit(self, slots: int) -> None:
        """At least `slots` slots, as the planning rank's counts have (tensor parallelism)."""
        while self.counts.shape[0] < slots:
            self.counts = torch.cat([self.counts, torch.zeros_like(self.counts)])
            self.prompt = torch.cat([self.prompt, torch.zeros_like(self.prompt)])

    def release(self, slot: int) -> None:
        if slot:
            self._free.append(slot)

    def reset(self, rules: DeviceRules) -> None:
        """Zero the fresh slots and mark their prompts' tokens (device ops only)."""
        if rules.fresh.numel():
            self.counts.index_fill_(0, rules.fresh, 0)
            self.prompt.index_fill_(0, rules.fresh, False)
        if rules.prompt_index.numel():
            self.prompt.view(-1).index_fill_(0, rules.prompt_index, True)

    def add(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """Count each row's drawn token in its slot."""
        index = slots * self.vocab + tokens.to(torch.int64)
        self.counts.view(-1).scatter_add_(0, index, torch.ones_like(index, dtype=torch.int32))


def apply_rules(
    logits: torch.Tensor, rules: DeviceRules, counts: TokenCounts | None
) -> torch.Tensor:
    """float32 logits [R, V] after the grammar mask, logit_bias and penalties (a new tensor;
    `logits` is left as it is, for the raw logprobs)."""
    x = logits.to(torch.float32, copy=True)
    vocab = x.shape[1]
    if rules.masked:
        allowed = unpack_mask(rules.mask_words, vocab)  # index_select/copy_: no host waits
        masked = torch.where(allowed, x.index_select(0, rules.mask_rows), float("-inf"))
        x.index_copy_(0, rules.mask_rows, masked)
    if rules.biased:
        x.view(-1).index_add_(0, rules.bias_index, rules.bias_value)
    if rules.penalized and counts is not None:
        x = penalize(
            x,
            counts.counts.index_select(0, rules.slots),
            counts.prompt.index_select(0, rules.slots),
            rules.presence,
            rules.frequency,
            rules.repetition,
        )
    return x


def penalize(
    x: torch.Tensor,
    counts: torch.Tensor,
    prompt_seen: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
    repetition: torch.Tensor,
) -> torch.Tensor:
    """vLLM's penalties on float32 logits [R, V]: counts [R, V] of output tokens, prompt_seen
    [R, V] bool; presence, frequency, repetition [R]."""
    out_seen = counts > 0
    rep = torch.where(out_seen | prompt_seen, repetition[:, None], 1.0)
    x = torch.where(x > 0, x / rep, x * rep)
    x = x - frequency[:, None] * counts.to(torch.float32)
    return x - presence[:, None] * out_seen.to(torch.float32)


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def unpack_mask(words: torch.Tensor, vocab: int) -> torch.Tensor:
    """bool [G, vocab] from int32 words [G, W]: token t allowed iff bit t % 32 of word t // 32."""
    shifts = _SHIFTS.get(words.device)
    if shifts is None:
        shifts = _SHIFTS[words.device] = torch.arange(
            MASK_BITS, dtype=torch.int32, device=words.device
        )
    bits = (words[:, :, None] >> shifts) & 1
    return bits.view(words.shape[0], -1)[:, :vocab] != 0


def draw(
    logits: torch.Tensor,
    plan: tuple[torch.Tensor, ...],
    rules: DeviceRules | None,
    counts: TokenCounts | None,
    eos_ids: torch.Tensor,
) -> torch.Tensor:
    """The rows' tokens: the rules on a copy of the logits, then the sampler (sampler.sample);
    drawn tokens are counted for penalties, on the device."""
    if rules is None:
        return sample(logits, *plan, eos_ids)
    if rules.penalized and counts is not None:
        counts.reset(rules)
    tokens = sample(apply_rules(logits, rules, counts), *plan, eos_ids)
    if rules.penalized and counts is not None:
        counts.add(rules.slots, tokens)
    return tokens


# ---- logprobs --------------------------------------------------------------------------------


class DeviceLogprobs(NamedTuple):
    """A step's logprobs on the device: of each row's drawn token and its top k."""

    chosen: torch.Tensor  # float32 [R]
    top_values: torch.Tensor  # float32 [R, k]
    top_ids: torch.Tensor  # int64 [R, k]


def raw_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> DeviceLogprobs:
    """log_softmax of the raw logits [R, V] in float32; the drawn tokens' and the top k
    (k: the most any row asks for, a host int)."""
    lp = torch.log_softmax(logits.to(torch.float32), dim=-1)
    chosen = lp.gather(1, tokens.to(torch.int64)[:, None])[:, 0]
    values, ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].to(torch.int64))
    return DeviceLogprobs(chosen, values, ids)


def host_entries(
    chosen: list[float], values: list[list[float]], ids: list[list[int]], wanted: list[int | None]
) -> list[TokenLogprob | None]:
    """Per row, the API's entry (its own k of the top) or None where the row asks none."""
    out: list[TokenLogprob | None] = []
    for r, k in enumerate(wanted):
        if k is None:
            out.append(None)
        else:
            out.append((chosen[r], tuple(zip(ids[r][:k], values[r][:k], strict=True))))
    return out
