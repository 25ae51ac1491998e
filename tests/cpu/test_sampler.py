"""The sampling plan and the reference sampler (deployments/engine/paged/sampler.py).

The rules are checked against a float64, token-by-token reading of them (`brute_kept`); the
Triton kernel is checked against the reference in test_triton_interpreter.py and on the GPU.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deployments.engine.interface import SamplingParams
from deployments.engine.paged.sampler import (
    MIN_TEMPERATURE,
    SamplingPlan,
    _philox_word,
    _philox_words,
    ban_logits,
    build_plan,
    draw_seed,
    philox_uniform,
    reference_kept,
    sample,
    sample_reference,
)


def brute_kept(
    x: np.ndarray, temp: float, top_p: float, top_k: int, min_p: float, slack: float = 1e-5
) -> tuple[np.ndarray, np.ndarray]:
    """(kept, unsure) for one row of logits (-inf: banned), straight from the rules in float64;
    `unsure` marks tokens within float32 rounding of the min_p or top_p cut."""
    finite = np.isfinite(x)
    top = x[finite].max()
    p = np.where(finite, np.exp((x - top) / temp), 0.0)
    keep = finite.copy()
    unsure = np.zeros_like(keep)
    if top_k > 0:
        greater = (x[None, :] > x[:, None]).sum(1)  # tokens strictly more likely than each
        keep &= greater < top_k
    if min_p > 0:
        floor = top + temp * math.log(min_p)
        unsure |= finite & (np.abs(x - floor) <= 1e-6 * (abs(top) + abs(floor) + 1))
        keep &= p >= min_p
    if top_p < 1:
        total = p[keep].sum()
        before = np.array([p[keep & (x > v)].sum() for v in x])  # mass strictly before
        unsure |= keep & (np.abs(before - top_p * total) <= slack * total)
        keep &= before < top_p * total
    return keep, unsure


def plan_tensors(plan: SamplingPlan) -> tuple[torch.Tensor, ...]:
    return tuple(plan.to_device("cpu"))


def random_plan(rows: int, gen: np.random.Generator) -> SamplingPlan:
    params = [
        SamplingParams(
            8,
            temperature=float(gen.choice([0.0, gen.uniform(0.05, 2.0)])),
            top_p=float(gen.choice([1.0, gen.uniform(0.01, 1.0)])),
            top_k=int(gen.choice([0, gen.integers(1, 30)])),
            min_p=float(gen.choice([0.0, gen.uniform(0.0, 0.4)])),
        )
        for _ in range(rows)
    ]
    seeds = [draw_seed(int(gen.integers(0, 2**62)), i) for i in range(rows)]
    return build_plan(params, seeds, gen.random(rows) < 0.3)


EOS = torch.tensor([2, 5], dtype=torch.int32)


def test_build_plan_normalises_degenerate_values():
    params = [
        SamplingParams(4, temperature=1e-40, top_p=1e-46, top_k=2**40, min_p=0.5),
        SamplingParams(4, temperature=float("nan"), top_p=float("nan")),
        SamplingParams(4, temperature=0.7, top_p=0.9, top_k=5, min_p=0.1),
    ]
    plan = build_plan(params, [-1, 2**64 + 3, 7], [True, False, True])
    assert plan.temperature.tolist() == [0.0, 0.0, pytest.approx(0.7)]
    assert 0 < plan.top_p[0] < 1e-30 and plan.top_p[1] == 1.0
    assert plan.top_k.tolist() == [2**31 - 1, 0, 5]
    assert plan.min_p.tolist() == [0.5, 0.0, pytest.approx(0.1)]
    assert plan.seed.tolist() == [2**63 - 1, 3, 7] and plan.ban_eos.tolist() == [1, 0, 1]
    assert plan.temperature.dtype == np.float32 and plan.seed.dtype == np.int64
    assert not plan.greedy_only and build_plan(params[:2], [1, 2], [False] * 2).greedy_only


def test_tiny_temperature_or_top_p_is_greedy_and_leaves_other_rows_alone():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 300, generator=gen) * 4
    normal = [SamplingParams(4, temperature=1.0, top_p=0.9), SamplingParams(4, temperature=0.8)]
    odd = [
        SamplingParams(4, temperature=1e-40),
        SamplingParams(4, temperature=1.5, top_p=1e-46),
        SamplingParams(4, temperature=MIN_TEMPERATURE, top_k=3),
        SamplingParams(4, temperature=1.0, min_p=1.0),
    ]
    seeds = [draw_seed(11, i) for i in range(6)]
    mixed = sample_reference(
        logits, *plan_tensors(build_plan(normal + odd, seeds, [False] * 6)), EOS
    )
    alone = sample_reference(
        logits[:2], *plan_tensors(build_plan(normal, seeds[:2], [False] * 2)), EOS
    )
    assert torch.equal(mixed[:2], alone)
    assert torch.equal(mixed[2:], logits[2:].argmax(-1))  # each of these keeps only the top
    assert not torch.isnan(torch.exp2(logits / MIN_TEMPERATURE - logits.amax() / 1e-5)).all()


def test_reference_kept_set_is_the_rules_token_by_token():
    gen = np.random.default_rng(2)
    rows, vocab = 300, 40
    logits = torch.from_numpy(gen.normal(0, 1, (rows, vocab)) * gen.uniform(0.2, 5, (rows, 1)))
    logits = logits.float().round(decimals=1)  # ties, so the "ties stay" rule is exercised
    plan = random_plan(rows, gen)
    x = ban_logits(logits, torch.from_numpy(plan.ban_eos), EOS)
    temp = torch.from_numpy(np.where(plan.temperature > 0, plan.temperature, 1.0))
    kept = reference_kept(
        x, temp, *(torch.from_numpy(a) for a in (plan.top_p, plan.top_k, plan.min_p))
    )
    unsure_total = 0
    for i in range(rows):
        want, unsure = brute_kept(
            x[i].double().numpy(),
            float(temp[i]),
            float(plan.top_p[i]),
            int(plan.top_k[i]),
            float(plan.min_p[i]),
        )
        differ = kept[i].numpy() != want
        assert not (differ & ~unsure).any(), (i, np.flatnonzero(differ))
        unsure_total += int(unsure.sum())
    assert unsure_total < rows  # the slack excuses little


def chi_square_z(counts: np.ndarray, expected: np.ndarray) -> float:
    """The Wilson-Hilferty normal score of the chi-square statistic (~N(0, 1) if it fits)."""
    stat = float(((counts - expected) ** 2 / expected).sum())
    df = len(counts) - 1
    return ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))


def test_seeded_draws_follow_the_renormalised_probabilities():
    gen = torch.Generator().manual_seed(3)
    vocab, draws = 12, 40000
    row = torch.randn(vocab, generator=gen) * 1.5
    params = SamplingParams(4, temperature=0.8, top_p=0.9, top_k=9, min_p=0.02)
    plan = build_plan([params] * draws, [draw_seed(99, i) for i in range(draws)], [True] * draws)
    got = sample_reference(row.expand(draws, vocab), *plan_tensors(plan), EOS)
    x = row.double().numpy().copy()
    x[EOS.numpy()] = -np.inf
    keep, unsure = brute_kept(x, 0.8, 0.9, 9, 0.02)
    assert not unsure.any() and 3 <= keep.sum() < vocab - 2
    p = np.where(keep, np.exp(x / 0.8 - x[keep].max() / 0.8), 0.0)
    counts = np.bincount(got.numpy(), minlength=vocab)
    assert counts[~keep].sum() == 0
    assert chi_square_z(counts[keep], draws * p[keep] / p.sum()) < 4.5
    assert chi_square_z(np.roll(counts[keep], 1), draws * p[keep] / p.sum()) > 4.5  # has power


def test_a_row_that_bans_eos_never_draws_one():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(400, 50, generator=gen)
    logits[:, EOS.long()] += 6  # the most likely tokens
    params = [SamplingParams(4, temperature=t) for t in (0.0, 0.5, 1.0, 2.0)] * 100
    plan = build_plan(params, [draw_seed(5, i) for i in range(400)], [True] * 400)
    got = sample_reference(logits, *plan_tensors(plan), EOS)
    assert not torch.isin(got, EOS.long()).any()
    assert torch.equal(got[::4], ban_logits(logits, torch.ones(400), EOS)[::4].argmax(-1))
    free = build_plan(params, [draw_seed(5, i) for i in range(400)], [False] * 400)
    assert torch.isin(sample_reference(logits, *plan_tensors(free), EOS), EOS.long()).any()


def test_a_seed_draws_the_same_token_at_any_batch_position():
    gen = torch.Generator().manual_seed(6)
    row = torch.randn(1, 500, generator=gen)
    params = SamplingParams(4, temperature=1.2, top_p=0.95, top_k=40)
    alone = sample_reference(row, *plan_tensors(build_plan([params], [1234], [False])), EOS)
    for size in (3, 9):
        others = torch.randn(size, 500, generator=gen)
        at = size // 2
        batch = torch.cat([others[:at], row, others[at:]])
        seeds = [draw_seed(size, i) for i in range(size)]
        seeds.insert(at, 1234)
        rows = (
            [SamplingParams(4, temperature=0.9)] * at
            + [params]
            + [SamplingParams(4, top_p=0.5)] * (size - at)
        )
        plan = build_plan(rows, seeds, [False] * (size + 1))
        assert sample_reference(batch, *plan_tensors(plan), EOS)[at] == alone[0]
    other_seeds = [
        sample_reference(row, *plan_tensors(build_plan([params], [s], [False])), EOS)[0]
        for s in range(30)
    ]
    assert len(set(map(int, other_seeds))) > 3  # the seed does matter


def test_greedy_rows_are_torch_argmax_with_its_tie_rule():
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(8, 64, generator=gen).round()  # many ties at the max
    plan = build_plan([SamplingParams(4, temperature=0.0)] * 8, list(range(8)), [False] * 8)
    assert torch.equal(sample(logits, *plan_tensors(plan), EOS), logits.argmax(-1))
    logits[3] = float("-inf")  # nothing finite: argmax's answer too
    assert sample_reference(logits, *plan_tensors(plan), EOS)[3] == 0


def test_draw_seed_is_a_63_bit_stream_per_base():
    keys = [draw_seed(42, i) for i in range(1000)]
    assert len(set(keys)) == 1000 and all(0 <= k < 2**63 for k in keys)
    assert keys == [draw_seed(42, i) for i in range(1000)]
    assert draw_seed(-42, 0) != draw_seed(42, 0) and 0 <= draw_seed(-1, 5) < 2**63
    assert np.mean([k >> 62 for k in keys]) == pytest.approx(0.5, abs=0.06)  # top bit mixes


def test_philox_uniforms_are_uniform_and_a_function_of_the_seed():
    seeds = torch.tensor([draw_seed(1, i) for i in range(20000)])
    u = philox_uniform(seeds)
    assert u.dtype == torch.float32 and u.min() >= 0 and u.max() < 1
    assert torch.equal(u, philox_uniform(seeds.flip(0)).flip(0))
    hist = torch.histc(u, bins=20, min=0, max=1).numpy()
    assert chi_square_z(hist, np.full(20, 1000.0)) < 4.5
    # The tensor path (other devices) and the Python-int path (CPU) are the same function.
    edge = torch.tensor([0, 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, *seeds[:200].tolist()])
    assert _philox_words(edge).tolist() == [_philox_word(int(s)) for s in edge]


def test_plan_words_round_trip_through_device_views():
    plan = random_plan(7, np.random.default_rng(8))
    words = torch.from_numpy(plan.words())
    assert words.dtype == torch.int32 and words.numel() == 35
    views = SamplingPlan.device_views(words, torch.from_numpy(plan.seed))
    for name, array in zip(
        views._fields,
        (plan.temperature, plan.top_p, plan.top_k, plan.min_p, plan.seed, plan.ban_eos),
        strict=True,
    ):
        assert np.array_equal(getattr(views, name).numpy(), array), name


def test_sample_refuses_a_plan_on_another_device():
    plan = plan_tensors(build_plan([SamplingParams(4)], [1], [False]))
    with pytest.raises(ValueError, match="device"):
        sample(torch.zeros(1, 8, device="meta"), *plan, EOS)
