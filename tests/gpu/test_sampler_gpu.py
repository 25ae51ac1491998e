"""The Triton sampler on CUDA at Llama 3's vocabulary: the reference's draws, no host waits.

The same checks as tests/cpu/test_triton_interpreter.py, compiled, with V = 128256 and 1, 64
and 256 rows; logits are either flat (what a random-weights model gives: the engine benchmark's
case) or shaped like a trained model's (a few strong candidates over a broad tail).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.cpu.test_sampler import chi_square_z, random_plan

pytestmark = pytest.mark.gpu

VOCAB = 128256
EOS = [128001, 128008, 128009]


def _modules():
    from deployments.engine.paged import sampler, triton_sampler

    return sampler, triton_sampler


def llm_logits(rows: int, seed: int) -> torch.Tensor:
    """Even rows flat (N(0, 1.3^2)); odd rows with 1-16 strong tokens 6-14 above a wider bulk."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(rows, VOCAB, generator=gen, device="cuda")
    x[0::2] *= 1.3
    x[1::2] *= 2.5
    for i in range(1, rows, 2):
        n = int(torch.randint(1, 17, (1,), generator=gen, device="cuda"))
        ids = torch.randint(0, VOCAB, (n,), generator=gen, device="cuda")
        x[i, ids] += torch.rand(n, generator=gen, device="cuda") * 8 + 6
    x[:, EOS[0]] += 4  # an EOS id among the likely tokens
    return x


def mixed_plan(rows: int, seed: int):
    """Random rows plus the API's common settings: T=1; T=1, top_p 0.95; + top_k 50."""
    sampler, _ = _modules()
    from deployments.engine.interface import SamplingParams

    plan = random_plan(rows, np.random.default_rng(seed))
    common = [
        SamplingParams(4),
        SamplingParams(4, top_p=0.95),
        SamplingParams(4, top_p=0.95, top_k=50),
    ]
    fixed = sampler.build_plan(
        [common[i % 3] for i in range(rows)],
        [sampler.draw_seed(seed, i) for i in range(rows)],
        [False] * rows,
    )
    pick = np.arange(rows) % 2 == 0  # half the rows random, half common
    return sampler.SamplingPlan(
        *(
            np.where(pick, getattr(plan, f), getattr(fixed, f))
            for f in ("temperature", "top_p", "top_k", "min_p", "seed", "ban_eos")
        )
    )


def near_cut(x: torch.Tensor, token: int, plan, i: int) -> bool:
    """Whether `token` is within float32 rounding of row i's top_p cut (float64 check)."""
    sampler, _ = _modules()
    temp = float(plan.temperature[i])
    kept = sampler.reference_kept(
        x[i : i + 1],
        torch.tensor([temp], device="cuda"),
        torch.ones(1, device="cuda"),
        torch.tensor([int(plan.top_k[i])], device="cuda"),
        torch.tensor([float(plan.min_p[i])], device="cuda"),
    )[0]
    p = torch.where(kept, torch.exp((x[i].double() - x[i].max().double()) / temp), 0.0)
    before = p[x[i] > x[i, token]].sum()
    return bool(kept[token]) and abs(
        float(before) - plan.top_p[i] * float(p.sum())
    ) <= 1e-5 * float(p.sum())


@pytest.mark.parametrize("rows", [1, 64, 256])
def test_kernel_draws_the_references_tokens(rows):
    sampler, _ = _modules()
    logits = llm_logits(rows, rows)
    plan = mixed_plan(rows, rows)
    device_plan = plan.to_device("cuda")
    eos = torch.tensor(EOS, dtype=torch.int32, device="cuda")
    got = sampler.sample(logits, *device_plan, eos)
    want = sampler.sample_reference(logits, *device_plan, eos)
    x = sampler.ban_logits(logits, device_plan.ban_eos, eos)
    greedy = torch.from_numpy(plan.temperature == 0).cuda()
    assert torch.equal(got[greedy], x[greedy].argmax(-1))
    assert not torch.isin(got[device_plan.ban_eos != 0], eos.long()).any()
    kept = sampler.reference_kept(
        x,
        torch.where(device_plan.temperature > 0, device_plan.temperature, 1.0),
        device_plan.top_p,
        device_plan.top_k,
        device_plan.min_p,
    )
    for i in torch.nonzero(~greedy).flatten().tolist():
        token = int(got[i])
        assert kept[i, token] or near_cut(x, token, plan, i), (i, token)
    assert int((got != want).sum()) <= max(1, rows // 50)  # float32 sums tip few draws


def test_kernel_never_waits_for_the_device_nor_recompiles_for_a_batch_size():
    sampler, triton_sampler = _modules()
    eos = torch.tensor(EOS, dtype=torch.int32, device="cuda")
    cases = []
    for rows in (1, 64, 256, 3):
        # The runner's layout: the plan's words inside a larger int32 upload, at odd offsets.
        plan = mixed_plan(rows, rows)
        words = np.concatenate([np.zeros(rows + 1, np.int32), plan.words()])
        upload = torch.from_numpy(words).pin_memory().cuda(non_blocking=True)
        seeds = torch.from_numpy(plan.seed).pin_memory().cuda(non_blocking=True)
        cases.append(
            (llm_logits(rows, 7), sampler.SamplingPlan.device_views(upload[rows + 1 :], seeds))
        )
    logits, plan = cases[0]
    sampler.sample(logits, *plan, eos)  # compile once
    torch.cuda.synchronize()
    cache = triton_sampler._sample_kernel.device_caches[torch.cuda.current_device()][0]
    compiled = len(cache)
    torch.cuda._sleep(200_000_000)  # queue ~0.1 s of work: any wait would show
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [sampler.sample(logits, *plan, eos) for logits, plan in cases]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert len(cache) == compiled  # no new specialisation for another size or alignment
    for (logits, _plan), out in zip(cases, outs, strict=True):
        assert out.shape == (logits.shape[0],) and int(out.max()) < VOCAB


def test_a_seed_draws_the_same_token_at_any_batch_position_on_the_gpu():
    sampler, _ = _modules()
    eos = torch.tensor(EOS, dtype=torch.int32, device="cuda")
    logits = llm_logits(64, 3)
    plan = mixed_plan(64, 3)
    first = sampler.sample(logits, *plan.to_device("cuda"), eos)
    order = np.random.default_rng(0).permutation(64)
    moved = sampler.SamplingPlan(
        *(
            getattr(plan, f)[order]
            for f in ("temperature", "top_p", "top_k", "min_p", "seed", "ban_eos")
        )
    )
    again = sampler.sample(logits[torch.from_numpy(order).cuda()], *moved.to_device("cuda"), eos)
    assert torch.equal(again, first[torch.from_numpy(order).cuda()])
    for i in (0, 1, 2):
        one = sampler.SamplingPlan(
            *(
                getattr(plan, f)[i : i + 1]
                for f in ("temperature", "top_p", "top_k", "min_p", "seed", "ban_eos")
            )
        )
        assert sampler.sample(logits[i : i + 1], *one.to_device("cuda"), eos)[0] == first[i]


@pytest.mark.parametrize(
    ("temperature", "top_p", "top_k"), [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.3, 0.95, 6)]
)
def test_kernel_draws_follow_the_distribution_at_full_vocab(temperature, top_p, top_k):
    """20,000 draws from one row (broadcast, so no 10 GB of logits) with 12 likely tokens."""
    sampler, _ = _modules()
    from deployments.engine.interface import SamplingParams

    draws = 20000
    gen = torch.Generator(device="cuda").manual_seed(5)
    row = torch.full((VOCAB,), -30.0, device="cuda")
    likely = torch.randperm(VOCAB, generator=gen, device="cuda")[:12]
    row[likely] = torch.randn(12, generator=gen, device="cuda")
    params = SamplingParams(4, temperature=temperature, top_p=top_p, top_k=top_k)
    plan = sampler.build_plan(
        [params] * draws, [sampler.draw_seed(11, i) for i in range(draws)], [False] * draws
    )
    eos = torch.tensor(EOS, dtype=torch.int32, device="cuda")
    got = sampler.sample(row.expand(draws, VOCAB), *plan.to_device("cuda"), eos)
    x = row.double().cpu().numpy()
    p = np.exp((x - x.max()) / temperature)
    order = np.argsort(-x, kind="stable")  # the 12 likely tokens are distinct, the tail tied
    keep = np.ones(VOCAB, bool)
    if top_k:
        keep[order[top_k:]] = False
    if top_p < 1:
        mass = np.where(keep, p, 0.0)[order]
        before = np.cumsum(mass) - mass
        keep[order[before >= top_p * mass.sum()]] = False
    counts = np.bincount(got.cpu().numpy(), minlength=VOCAB)
    assert counts[~keep].sum() == 0
    bins = [i for i in likely.cpu().numpy() if keep[i]]
    assert len(bins) >= 3
    expected = draws * p[bins] / p[keep].sum()
    assert chi_square_z(counts[bins], expected) < 4.5
    assert math.isclose(counts[bins].sum(), draws, rel_tol=1e-3)  # the tail holds ~1e-8
