"""Batched sampling without host waits: a plan of plain host arrays, one device call per step.

A step's rows sample by these rules, in vLLM's order (T: temperature; x: a row's logits):

1. rows that ban end-of-sequence ids (min_tokens not reached) see -inf at every EOS id;
2. T < MIN_TEMPERATURE (0 included): greedy, exactly torch.argmax (first index on ties);
3. otherwise p ~ exp(x / T), and the kept set is cut down in turn:
   - top_k > 0: only tokens whose logit is at least the k-th largest (ties at it all stay);
   - min_p > 0: only tokens with p >= min_p * p_max;
   - top_p < 1: over the distribution renormalised on what is left, the smallest set of most
     likely tokens whose mass reaches top_p: a token goes once the mass strictly before it (in
     descending order) reaches top_p; the first always stays, and ties at the cut all stay;
4. the token is drawn from the kept set in proportion to p, by inverting its CDF at one
   uniform u = Philox4x32-10(key=seed, counter=0) (Triton's tl.rand(seed, 0)), with the kept
   tokens in draw order: by id % DRAW_BLOCK, then by id. The same (seed, logits) gives the
   same token on any batch position and batch size, and the reference here and the Triton
   kernel agree but for float32 rounding.

`build_plan` turns SamplingParams into a SamplingPlan on the host (no device work); the runner
uploads it with the step's other inputs and calls `sample`, which on CUDA is one Triton launch
that never synchronises the host (triton_sampler.py), and elsewhere `sample_reference`:

    plan = build_plan(params, [draw_seed(base, n) for base, n in keys], ban_eos)
    ints = upload(np.concatenate([..., plan.words()]))   # the step's int32 upload
    longs = upload(np.concatenate([..., plan.seed]))     # the step's int64 upload
    tokens = sample(logits, *SamplingPlan.device_views(ints[a:a + 5 * R], longs[b:b + R]),
                    eos_ids)                             # eos_ids: int32, on the device
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from deployments.engine.interface import SamplingParams

MIN_TEMPERATURE = 1e-5  # below this a row is greedy
DRAW_BLOCK = 2048  # the draw order's period (the Triton kernel's tile)
LOG2E = 1.4426950408889634
_MASK64 = (1 << 64) - 1
_TINY_P = float(np.finfo(np.float32).tiny)  # the smallest top_p kept: only the top token(s)


def draw_base(seed: int | None = None) -> int:
    """The base of a request's draw keys (draw_seed), for both engines: its seed as 63 bits
    (seed mod 2**63, so a negative seed is reproducible too), else a random one."""
    return seed % (1 << 63) if seed is not None else random.getrandbits(63)


def draw_seed(base: int, index: int) -> int:
    """The key of a sequence's index-th draw: the index-th output of SplitMix64 seeded with
    `base` (any int, e.g. a request's seed), shifted to 63 bits (non-negative int64)."""
    z = (base + (index + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


class DevicePlan(NamedTuple):
    """A plan's arrays as device tensors, in `sample`'s argument order."""

    temperature: torch.Tensor  # float32 [R]
    top_p: torch.Tensor  # float32 [R]
    top_k: torch.Tensor  # int32 [R]
    min_p: torch.Tensor  # float32 [R]
    seed: torch.Tensor  # int64 [R]
    ban_eos: torch.Tensor  # int32 [R]


@dataclass(frozen=True)
class SamplingPlan:
    """One step's sampling rows as plain host (numpy) arrays: built without touching the
    device, uploaded by the runner inside the step's pinned upload."""

    temperature: np.ndarray  # float32 [R]; 0: greedy
    top_p: np.ndarray  # float32 [R] in (0, 1]
    top_k: np.ndarray  # int32 [R]; 0: off
    min_p: np.ndarray  # float32 [R]; 0: off
    seed: np.ndarray  # int64 [R]: the key of this row's draw
    ban_eos: np.ndarray  # int32 [R]; 1: end-of-sequence ids may not be drawn

    def __len__(self) -> int:
        return len(self.temperature)

    @property
    def greedy_only(self) -> bool:
        """Every row is greedy and none bans EOS: torch.argmax(logits, -1) is the answer."""
        return not self.temperature.any() and not self.ban_eos.any()

    def words(self) -> np.ndarray:
        """The 32-bit fields as one int32 array [5R] (floats by their bits): temperature,
        top_p, min_p, top_k, ban_eos. With `seed` (int64) that is the whole plan."""
        return np.concatenate(
            [
                self.temperature.view(np.int32),
                self.top_p.view(np.int32),
                self.min_p.view(np.int32),
                self.top_k,
                self.ban_eos,
            ]
        )

    @staticmethod
    def device_views(words: torch.Tensor, seed: torch.Tensor) -> DevicePlan:
        """Views (no copies) of an uploaded `words()` [5R] int32 and `seed` [R] int64."""
        t, p, m, k, b = words.view(5, -1).unbind(0)
        return DevicePlan(
            t.view(torch.float32), p.view(torch.float32), k, m.view(torch.float32), seed, b
        )

    def to_device(self, device: torch.device | str) -> DevicePlan:
        """Upload (pinned and asynchronous on CUDA); for callers outside the runner."""
        words, seed = torch.from_numpy(self.words()), torch.from_numpy(self.seed)
        if torch.device(device).type == "cuda":
            words = words.pin_memory().to(device, non_blocking=True)
            seed = seed.pin_memory().to(device, non_blocking=True)
        return self.device_views(words, seed)


def build_plan(
    params: Sequence[SamplingParams], seeds: Sequence[int], ban_eos: Sequence[bool]
) -> SamplingPlan:
    """The plan for rows with these params, draw keys (draw_seed) and EOS bans. Normalises:
    temperature below MIN_TEMPERATURE (or NaN) -> 0, top_p into [tiny, 1], min_p into [0, 1],
    top_k into [0, 2**31), seeds to 63 bits."""
    temp = np.array([p.temperature for p in params], dtype=np.float64)
    temp = np.where(temp >= MIN_TEMPERATURE, temp, 0.0).astype(np.float32)
    top_p = np.nan_to_num(np.array([p.top_p for p in params], dtype=np.float64), nan=1.0)
    min_p = np.nan_to_num(np.array([p.min_p for p in params], dtype=np.float64), nan=0.0)
    top_k = np.array([min(max(int(p.top_k), 0), 2**31 - 1) for p in params], dtype=np.int64)
    return SamplingPlan(
        temperature=temp,
        top_p=np.clip(top_p.astype(np.float32), _TINY_P, 1.0),
        top_k=top_k.astype(np.int32),
        min_p=np.clip(min_p, 0.0, 1.0).astype(np.float32),
        seed=np.array([s & ((1 << 63) - 1) for s in seeds], dtype=np.int64),
        ban_eos=np.array(ban_eos, dtype=np.int32).reshape(len(params)),
    )


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    min_p: torch.Tensor,
    seed: torch.Tensor,
    ban_eos: torch.Tensor,
    eos_ids: torch.Tensor,
) -> torch.Tensor:
    """One token per row of logits [R, V] (float32; bf16/fp16 are read as float32), as int64
    [R] on the logits' device. The plan's tensors (DevicePlan) and `eos_ids` (int32, the
    model's end-of-sequence ids) must be on that device too. On CUDA with Triton: one kernel
    launch, no host synchronisation; elsewhere `sample_reference`."""
    plan = (temperature, top_p, top_k, min_p, seed, ban_eos, eos_ids)
    if any(t.device != logits.device for t in plan):
        raise ValueError(
            "sample: the plan and eos_ids must be on the logits' device "
            f"({logits.device}); upload them with the step's inputs"
        )
    if logits.is_cuda and _triton_sample() is not None:
        return _triton_sample()(logits, *_typed(*plan), MIN_TEMPERATURE)
    return sample_reference(logits, *plan)


def _typed(*plan: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The plan in the kernel's dtypes (no copy when they already are; never a sync)."""
    dtypes = (
        torch.float32,
        torch.float32,
        torch.int32,
        torch.float32,
        torch.int64,
        torch.int32,
        torch.int32,
    )
    return tuple(t.to(d).contiguous() for t, d in zip(plan, dtypes, strict=True))


def _triton_sample():  # the kernel's entry point, or None without Triton
    global _TRITON
    if _TRITON is False:
        try:
            from deployments.engine.paged.triton_sampler import triton_sample
        except ImportError:
            _TRITON = None
        else:
            _TRITON = triton_sample
    return _TRITON


_TRITON = False  # not looked up yet


# ---- the reference: what the kernel computes, in PyTorch ----------------------------------


def philox_uniform(seed: torch.Tensor) -> torch.Tensor:
    """float32 [R] in [0, 1): Triton's tl.rand(seed, 0) for each int64 seed (Philox4x32-10,
    key = the seed's two halves, counter 0), in exact integer arithmetic on the seeds' device
    (on the CPU with Python ints: a few microseconds a seed, against ~1 ms of tensor ops)."""
    if seed.device.type == "cpu":
        words = [_philox_word(int(s)) for s in seed.tolist()]
        signed = torch.tensor(words, dtype=torch.int64)
    else:
        signed = _philox_words(seed.to(torch.int64))
    magnitude = torch.where(signed < 0, -signed - 1, signed)  # as tl.rand maps it
    return magnitude.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


_KEY_A, _KEY_B, _ROUND_A, _ROUND_B = 0x9E3779B9, 0xBB67AE85, 0xD2511F53, 0xCD9E8D57


def _philox_word(seed: int) -> int:
    """The first output word of Philox4x32-10 at counter 0, as a signed int32 (Python ints)."""
    m32 = 0xFFFFFFFF
    k0, k1 = seed & m32, (seed >> 32) & m32
    c0 = c1 = c2 = c3 = 0
    for _ in range(10):
        b, a = _ROUND_B * c2, _ROUND_A * c0
        c0, c1, c2, c3 = (b >> 32) ^ c1 ^ k0, b & m32, (a >> 32) ^ c3 ^ k1, a & m32
        k0, k1 = (k0 + _KEY_A) & m32, (k1 + _KEY_B) & m32
    return c0 - (1 << 32) if c0 >= 1 << 31 else c0


def _philox_words(seed: torch.Tensor) -> torch.Tensor:
    """_philox_word for an int64 tensor, with products split so nothing exceeds int64."""
    m32 = 0xFFFFFFFF
    k0, k1 = seed & m32, (seed >> 32) & m32
    c0, c1, c2, c3 = (torch.zeros_like(seed) for _ in range(4))
    for _ in range(10):
        hi_b, lo_b = _mul32(_ROUND_B, c2)
        hi_a, lo_a = _mul32(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & m32, (k1 + _KEY_B) & m32
    return torch.where(c0 >= 2**31, c0 - 2**32, c0)


def _mul32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * b for 32-bit a (constant) and b (int64 tensor)."""
    lo16, hi16 = b & 0xFFFF, b >> 16
    low = a * lo16  # < 2**48
    mid = a * hi16  # < 2**48
    total_low = low + ((mid & 0xFFFF) << 16)  # < 2**49
    return (mid >> 16) + (total_low >> 32), total_low & 0xFFFFFFFF


def ban_logits(logits: torch.Tensor, ban_eos: torch.Tensor, eos_ids: torch.Tensor) -> torch.Tensor:
    """float32 copy of logits with -inf at eos_ids in rows that ban them (ids past the
    vocabulary are ignored, as the kernel does)."""
    x = logits.to(torch.float32, copy=True)
    ids = torch.arange(x.shape[1], device=x.device)
    hit = (ids[None, :] == eos_ids.to(x.device, torch.long)[:, None]).any(0)  # [V]
    return torch.where((ban_eos.to(x.device)[:, None] != 0) & hit, float("-inf"), x)


def reference_kept(
    x: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    min_p: torch.Tensor,
) -> torch.Tensor:
    """bool [R, V]: the kept set of each row of (already banned) float32 logits x, by the
    rules in this module's docstring, in float32 as the kernel computes them."""
    vocab = x.shape[1]
    top = x.amax(-1, keepdim=True)
    top = torch.where(top > float("-inf"), top, 0.0)
    temp = torch.where(temperature >= MIN_TEMPERATURE, temperature, 1.0)[:, None].float()
    ordered = x.sort(-1, descending=True).values
    k = top_k.to(torch.long)[:, None]
    kth = ordered.gather(1, (k - 1).clamp(0, vocab - 1))
    floor = torch.where((k > 0) & (k < vocab), kth, float("-inf"))
    minp = min_p[:, None].float()
    by_minp = top + temp * torch.log(torch.where(minp > 0, minp, 1.0))
    floor = torch.maximum(floor, torch.where(minp > 0, by_minp, float("-inf")))
    base = (x > float("-inf")) & (x >= floor)
    in_sorted = (ordered > float("-inf")) & (ordered >= floor)
    mass = torch.where(
        in_sorted, torch.exp2((ordered - top) * (LOG2E / temp).clamp(min=1e-30)), 0.0
    )
    cum = mass.cumsum(-1)
    before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=1)
    stays = in_sorted & (before < top_p[:, None].float() * cum[:, -1:])
    cut = torch.where(stays, ordered, float("inf")).amin(-1, keepdim=True)
    cut = torch.where(top_p[:, None] < 1, cut, float("-inf"))
    return base & (x >= cut)


@functools.lru_cache(maxsize=8)
def draw_order(
    vocab: int, device: torch.device | str = "cpu", block: int = DRAW_BLOCK
) -> torch.Tensor:
    """Token ids in draw order: by id % block, then by id (cached: the same every step)."""
    ids = torch.arange(vocab, device=device)
    return torch.argsort(ids % block * vocab + ids)


def sample_reference(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    min_p: torch.Tensor,
    seed: torch.Tensor,
    ban_eos: torch.Tensor,
    eos_ids: torch.Tensor,
    *,
    order_block: int = DRAW_BLOCK,
) -> torch.Tensor:
    """`sample` in PyTorch (a sort per row): the definition the kernel is tested against,
    and the path on CPU. Same arguments and result (order_block: the draw order's period,
    for tests of a kernel built with other tiles)."""
    x = ban_logits(logits, ban_eos, eos_ids)
    greedy = x.argmax(-1)
    sampled = (temperature >= MIN_TEMPERATURE) & (x.amax(-1) > float("-inf"))
    if x.device.type == "cpu" and not bool(sampled.any()):
        return greedy
    kept = reference_kept(x, temperature, top_p, top_k, min_p)
    top = torch.where(sampled, x.amax(-1), 0.0)[:, None]
    scale = (LOG2E / torch.where(sampled, temperature, 1.0).float()).clamp(min=1e-30)[:, None]
    order = draw_order(x.shape[1], x.device, order_block)
    mass = torch.where(kept, torch.exp2((x - top) * scale), 0.0)[:, order]
    cum = mass.cumsum(-1)
    target = philox_uniform(seed.to(x.device))[:, None] * cum[:, -1:]
    at = torch.searchsorted(cum, target, right=True).clamp(max=x.shape[1] - 1)
    return torch.where(sampled, order[at[:, 0]], greedy)
