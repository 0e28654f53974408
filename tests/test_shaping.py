"""Reward shaping (rlkern/ops/shaping.py): ensemble_rewards and shape_rewards.

Each paper's formula is checked on a hand-computed example (the expected numbers written out from
the formula with Python floats), then every backend (C++, Triton interpreted, torch) against the
float64 reference (rlkern/reference/shaping.py) on odd sizes, groups of one, equal rewards and
empty batches; then the bad calls, torch.compile / opcheck, a GPU run and the sm_90 compile.
"""

from __future__ import annotations

import math

import pytest
import torch

import rlkern
from rlkern.ops import shaping as S
from rlkern.reference import shaping as R
from conftest import compile_for_sm90

# ---------------------------------------------------------------------------------------------
# Hand-computed examples, one per paper (run on every backend)


def test_ensemble_rewards_hand_computed(backend):
    # "Reward Model Ensembles Help Mitigate Overoptimization": three reward models, two samples
    r = torch.tensor([[1.0, 3.0, 2.0], [0.0, -3.0, 0.0]])
    mean = [(1.0 + 3.0 + 2.0) / 3, (0.0 - 3.0 + 0.0) / 3]
    assert rlkern.ensemble_rewards(r).tolist() == pytest.approx(mean, abs=1e-6)
    assert rlkern.ensemble_rewards(r, method="wco").tolist() == pytest.approx([1.0, -3.0], abs=1e-6)
    var0 = ((1.0 - 2.0) ** 2 + (3.0 - 2.0) ** 2 + (2.0 - 2.0) ** 2) / 3
    var1 = ((0.0 + 1.0) ** 2 + (-3.0 + 1.0) ** 2 + (0.0 + 1.0) ** 2) / 3
    uwo = rlkern.ensemble_rewards(r, method="uwo", coef=0.5)
    assert uwo.tolist() == pytest.approx([2.0 - 0.5 * var0, -1.0 - 0.5 * var1], abs=1e-6)


def test_multi_objective_grpo_hand_computed(backend):
    # "Optimizing Safe and Aligned Language Generation: A Multi-Objective GRPO Approach": the aspect
    # scores are combined first, GRPO normalizes the combined reward within each group
    r = torch.tensor([[1.0, 3.0, 2.0], [0.0, -3.0, 0.0], [2.0, 2.0, 2.0], [1.0, 0.0, 0.0]])
    w = [0.5, 0.25, 0.25]
    combined = [0.5 * 1 + 0.25 * 3 + 0.25 * 2, 0.25 * -3, 0.5 * 2 + 0.25 * 2 + 0.25 * 2, 0.5 * 1]
    got = rlkern.ensemble_rewards(r, method="weighted", weights=w)
    assert got.tolist() == pytest.approx(combined, abs=1e-6)
    adv = rlkern.grpo(got, [0, 0, 1, 1])
    m0, m1 = (combined[0] + combined[1]) / 2, (combined[2] + combined[3]) / 2
    sd0 = math.sqrt(((combined[0] - m0) ** 2 + (combined[1] - m0) ** 2) / 1)  # unbiased std of 2
    sd1 = math.sqrt(((combined[2] - m1) ** 2 + (combined[3] - m1) ** 2) / 1)
    want = [(combined[0] - m0) / (sd0 + 1e-6), (combined[1] - m0) / (sd0 + 1e-6),
            (combined[2] - m1) / (sd1 + 1e-6), (combined[3] - m1) / (sd1 + 1e-6)]
    assert adv.tolist() == pytest.approx(want, abs=1e-5)


def test_grpo_lambda_hand_computed(backend):
    # group 0: 3 of 4 correct (ratio 0.75 >= 0.5): length penalty on the correct ones;
    # group 1: 1 of 4 correct (0.25 < 0.5): the plain 0/1 reward
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    lengths = torch.tensor([100, 200, 300, 50, 10, 20, 30, 40])
    got = rlkern.shape_rewards(scores, [0, 0, 0, 0, 1, 1, 1, 1], method="grpo_lambda", lengths=lengths)
    std = math.sqrt(((100 - 200) ** 2 + 0.0 + (300 - 200) ** 2) / 3)

    def penalized(length):
        return 1.0 - 0.2 / (1.0 + math.exp(-(length - 200) / (std + 1e-6)))

    want = [penalized(100), penalized(200), penalized(300), 0.0, 1.0, 0.0, 0.0, 0.0]
    assert penalized(200) == pytest.approx(0.9)
    assert got.tolist() == pytest.approx(want, abs=1e-6)


def test_grpo_lambda_top_fraction_hand_computed(backend):
    # the paper's batch-wise gate: groups with ratios 1, 0.75, 0.5, 0.25, 0; lambda = 0.4 selects
    # ceil(0.4 * 5) = 2 groups (ratios 1 and 0.75); group 2 (0.5) keeps its 0/1 reward although it
    # would pass the fixed default threshold 0.5
    scores = torch.tensor([1.0, 1, 1, 1] + [1, 1, 1, 0] + [1, 1, 0, 0] + [1, 0, 0, 0] + [0, 0, 0, 0])
    lengths = torch.tensor([10, 20, 30, 40] + [10, 20, 30, 99] + [10, 20, 30, 40] * 3)
    ids = [g for g in range(5) for _ in range(4)]
    got = rlkern.shape_rewards(scores, ids, method="grpo_lambda", lengths=lengths, top_fraction=0.4)
    std0, std1 = math.sqrt((15 ** 2 + 5 ** 2 + 5 ** 2 + 15 ** 2) / 4), math.sqrt((10 ** 2 + 0 + 10 ** 2) / 3)

    def penalized(length, mean, std):
        return 1.0 - 0.2 / (1.0 + math.exp(-(length - mean) / (std + 1e-6)))

    want = ([penalized(n, 25, std0) for n in (10, 20, 30, 40)] + [penalized(n, 20, std1) for n in (10, 20, 30)]
            + [0.0] + [1.0, 1.0, 0.0, 0.0] + [1.0, 0.0, 0.0, 0.0] + [0.0] * 4)
    assert got.tolist() == pytest.approx(want, abs=1e-6)
    fixed = rlkern.shape_rewards(scores, ids, method="grpo_lambda", lengths=lengths)
    assert fixed[8:10].tolist() != [1.0, 1.0]  # the fixed 0.5 gate penalizes group 2
    none = rlkern.shape_rewards(scores, ids, method="grpo_lambda", lengths=lengths, top_fraction=0.0)
    assert none.tolist() == scores.tolist()


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.5, 1.0])
def test_grpo_lambda_top_fraction_matches_reference(backend, fraction):
    # ten groups of four (0.3 * 10 rounds to 3.0000000000000004: three groups, not four), and
    # 23 samples in odd groups with ties in the ratios
    for n, dtype in ((40, torch.float32), (23, torch.float64)):
        scores, _, lengths = _shape_case(n, 11, "grpo_lambda", dtype)
        ids = torch.arange(n) // 4 if n == 40 else torch.arange(n) % 6
        got = rlkern.shape_rewards(scores, ids, method="grpo_lambda", lengths=lengths, top_fraction=fraction)
        want = R.shape_rewards(scores, S.dense("t", ids), lengths, "grpo_lambda", [0.5, 0.2, 1e-6, fraction])
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    assert R.top_fraction_cut([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1], 0.3) == 0.8


def test_hbpo_hand_computed(backend):
    # "Hierarchical Budget Policy Optimization for Adaptive Reasoning": L = 4096, beta = 4,
    # alpha = 1/4096; one prompt, budgets 512 (samples 0-2) and 2048 (samples 3-5)
    L, beta, alpha = 4096, 4.0, 1 / 4096
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    lengths = torch.tensor([300, 1000, 200, 1500, 3000, 5000])
    budgets = torch.tensor([512, 512, 512, 2048, 2048, 2048])
    ids = [0] * 6
    got = rlkern.shape_rewards(scores, ids, method="hbpo", lengths=lengths, budgets=budgets)

    def f2(b):
        return beta * math.cos(math.pi * b / (2 * L))

    rewards = [f2(512),  # within its budget
               beta * math.cos(math.pi * 1000 / (2 * L)) - alpha * (1000 - 512),  # over the budget
               0.0,  # incorrect
               f2(2048),
               beta * math.cos(math.pi * 3000 / (2 * L)) - alpha * (3000 - 2048),
               0.0]  # longer than L
    assert got.tolist() == pytest.approx(rewards, abs=1e-6)
    adv = rlkern.hbpo_advantages(torch.tensor(rewards, dtype=torch.float64), ids, budgets)
    mean = sum(rewards) / 6
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / 5)
    sub = [sum(rewards[:3]) / 3] * 3 + [sum(rewards[3:]) / 3] * 3
    want = [(r - mean) / (std + 1e-6) + m - f2(b) for r, m, b in zip(rewards, sub, budgets.tolist())]
    assert adv.tolist() == pytest.approx(want, abs=1e-12)
    # a group of one: verl's mean 0, std 1, no subgroup term
    one = rlkern.hbpo_advantages(torch.tensor([2.5], dtype=torch.float64), [0], torch.tensor([512]))
    assert one.tolist() == [2.5 / (1 + 1e-6)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [0, 1, 7, 61])
def test_hbpo_advantages_match_reference(backend, dtype, n):
    g = torch.Generator().manual_seed(n)
    rewards = (torch.rand(n, generator=g, dtype=torch.float64) * 4).to(dtype)
    ids = torch.randint(0, max(1, n // 5), (n,), generator=g)
    if n > 3:
        rewards[:3] = 1.5  # a group of equal rewards, one budget: std 0
        ids[:3] = 99
    budgets = _budgets(n, n + 1)
    got = rlkern.hbpo_advantages(rewards, ids, budgets, max_length=3000, budget_scale=2.0, eps=1e-4)
    want = R.hbpo_advantages(rewards, S.dense("t", ids), budgets, 3000.0, 2.0, 1e-4)
    assert got.dtype == dtype and got.shape == (n,)
    tol = 1e-12 if dtype == torch.float64 else 5e-6
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_unlikeliness_reward_hand_computed(backend):
    # correct samples 0, 2, 3 ranked by likelihood: 2 (-2, rank 0), 0 (-5, rank 1), 3 (-9, rank 2)
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0])
    logprobs = torch.tensor([-5.0, -1.0, -2.0, -9.0])
    got = rlkern.shape_rewards(scores, [7, 7, 7, 7], method="unlikeliness", logprobs=logprobs)
    g, beta = 4, 0.25
    want = [1 - beta * (g - 1) / g, 0.0, 1 - beta * (g - 0) / g, 1 - beta * (g - 2) / g]
    assert want == [0.8125, 0.0, 0.75, 0.875]
    assert got.tolist() == pytest.approx(want, abs=1e-7)


def test_s_grpo_hand_computed(backend):
    # one serial group: correct exits at positions 300, 200, 400 -> 1/2, 1, 1/4 (earliest first)
    scores = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0])
    positions = torch.tensor([100, 300, 200, 50, 400])
    got = rlkern.shape_rewards(scores, [0] * 5, method="s_grpo", exit_positions=positions)
    assert got.tolist() == [0.0, 1 / 2 ** 1, 1 / 2 ** 0, 0.0, 1 / 2 ** 2]


def test_otc_hand_computed(backend):
    # group 0: fewest calls among correct n = 2; group 1: n = 0; group 2: no correct sample
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    calls = torch.tensor([2, 4, 0, 0, 3, 1, 2])
    got = rlkern.shape_rewards(scores, [0, 0, 0, 1, 1, 2, 2], method="otc", tool_calls=calls)
    f = 2 * 2 * 4 / (4 + 2)
    want = [math.sin(2 * math.pi / (2 * 2)), math.sin(f * math.pi / (2 * 2)), 0.0,
            1.0, math.cos(3 * math.pi / (2 * 3 + 1.0)), 0.0, 0.0]
    assert got.tolist() == pytest.approx(want, abs=1e-6)
    scaled = rlkern.shape_rewards(scores, [0, 0, 0, 1, 1, 2, 2], method="otc", tool_calls=calls, tool_coef=2.0)
    assert scaled.tolist() == pytest.approx([2 * v for v in want], abs=1e-6)


def test_lite_ppo_is_group_normalize_with_batch_std(backend):
    # "Part I: Tricks or Traps? A Deep Dive into RL for LLM Reasoning": Lite PPO's advantage is the
    # group mean with the batch std, group_normalize(scale="batch") -- no new op
    scores = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    got = rlkern.group_normalize(torch.tensor(scores), [0] * 4 + [1] * 4, scale="batch")
    means = [0.75] * 4 + [0.25] * 4
    batch_mean = sum(scores) / 8
    batch_std = math.sqrt(sum((s - batch_mean) ** 2 for s in scores) / 7)
    want = [(s - m) / (batch_std + 1e-6) for s, m in zip(scores, means)]
    assert got.tolist() == pytest.approx(want, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Every backend against the float64 reference


def _ensemble_case(b, k, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(b, k, generator=g, dtype=torch.float64) * 2
    if b > 2:
        r[1] = 0.7  # equal rewards: variance 0
    return r.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("b,k", [(0, 3), (1, 1), (7, 5), (37, 3), (130, 2)])
def test_ensemble_rewards_matches_reference(backend, dtype, b, k):
    r = _ensemble_case(b, k, b * 31 + k, dtype)
    w = [0.5 * (i + 1) - 1.0 for i in range(k)]
    for method, kw in (("mean", {}), ("wco", {}), ("uwo", {"coef": 0.7}), ("weighted", {"weights": w})):
        got = rlkern.ensemble_rewards(r, method=method, **kw)
        want = R.ensemble_rewards(r, method, kw.get("coef", 0.0), torch.tensor(w) if method == "weighted" else None)
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert got.shape == (b,)
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol, msg=method)
    assert S._ENSEMBLE.backend(r.float() if dtype == torch.bfloat16 else r) == backend  # no silent fallback


def test_ensemble_rewards_nan_row(backend):
    r = torch.tensor([[1.0, float("nan"), 2.0], [1.0, 2.0, 3.0]])
    for method, kw in (("mean", {}), ("wco", {}), ("uwo", {"coef": 1.0}), ("weighted", {"weights": [1, 1, 1]})):
        got = rlkern.ensemble_rewards(r, method=method, **kw)
        assert math.isnan(got[0].item()) and not math.isnan(got[1].item()), method


def _shape_case(n, seed, method, dtype=torch.float32):
    """Random groups (sizes 1..7, ids shuffled) with ties in the auxiliary values and one group of
    equal rewards."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, max(1, n // 4), (n,), generator=g)
    scores = (torch.rand(n, generator=g, dtype=torch.float64) > 0.4).double()
    if method in ("grpo_lambda", "otc"):
        scores = scores * (0.5 + torch.rand(n, generator=g, dtype=torch.float64))  # soft scores
    if n > 3:
        ids[:3] = 10_000  # one group of equal rewards
        scores[:3] = 1.0
    aux = {"grpo_lambda": lambda: torch.randint(10, 50, (n,), generator=g).double(),
           "unlikeliness": lambda: -torch.randint(0, 6, (n,), generator=g).double() / 2,
           "s_grpo": lambda: torch.randint(0, 6, (n,), generator=g).double() * 100,
           "otc": lambda: torch.randint(0, 4, (n,), generator=g).double(),
           "hbpo": lambda: torch.randint(100, 5000, (n,), generator=g).double()}[method]()
    return scores.to(dtype), ids, aux


def _budgets(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.tensor([512, 1024, 2048, 2560])[torch.randint(0, 4, (n,), generator=g)]


PARAMS = {"grpo_lambda": [0.5, 0.2, 1e-6, -1.0], "unlikeliness": [0.25], "s_grpo": [0.5], "otc": [1.0, 1.0],
          "hbpo": [4096.0, 4.0, 1 / 4096]}


def _kw(method, aux, budgets):
    return {S.SHAPE_AUX[method]: aux, **({"budgets": budgets} if method == "hbpo" else {})}


@pytest.mark.parametrize("method", R.SHAPE_METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [0, 1, 5, 33, 150])
def test_shape_rewards_matches_reference(backend, method, dtype, n):
    scores, ids, aux = _shape_case(n, n * 7 + len(method), method, dtype)
    budgets = _budgets(n, n)
    got = rlkern.shape_rewards(scores, ids, method=method, **_kw(method, aux, budgets))
    want = R.shape_rewards(scores, S.dense("t", ids), aux, method, PARAMS[method], budgets)
    assert got.dtype == dtype and got.shape == (n,)
    assert S._SHAPE.backend(scores) == backend  # no silent fallback
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_shape_rewards_options_and_singletons(backend):
    # every sample its own group (groups of one), and non-default hyper-parameters
    scores = torch.tensor([1.0, 0.0, 0.3, 1.0, 2.0], dtype=torch.float64)
    aux = torch.tensor([3.0, 1.0, 0.0, 2.0, 5.0], dtype=torch.float64)
    ids = [4, 3, 2, 1, 0]
    cases = [("grpo_lambda", {"lengths": aux, "threshold": 1.0, "length_coef": 0.5, "eps": 0.1}, [1.0, 0.5, 0.1, -1]),
             ("grpo_lambda", {"lengths": aux, "top_fraction": 0.4, "eps": 0.1}, [0.5, 0.2, 0.1, 0.4]),
             ("unlikeliness", {"logprobs": aux, "rank_coef": 0.5}, [0.5]),
             ("s_grpo", {"exit_positions": aux, "decay": 0.25}, [0.25]),
             ("otc", {"tool_calls": aux, "tool_c": 2.0, "tool_coef": -1.5}, [2.0, -1.5]),
             ("hbpo", {"lengths": aux * 100, "budgets": aux * 80 + 10, "max_length": 450, "budget_scale": 2.0,
                       "deviation_coef": 0.01}, [450.0, 2.0, 0.01])]
    for method, kw, params in cases:
        got = rlkern.shape_rewards(scores, ids, method=method, **kw)
        first = kw.get("lengths", kw.get("logprobs", kw.get("exit_positions", kw.get("tool_calls"))))
        want = R.shape_rewards(scores, torch.tensor(ids), first, method, params, kw.get("budgets"))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=method)
        # the same batch in one group, with a NaN score: it stays NaN, the others are finite
        nan = scores.clone()
        nan[1] = float("nan")
        got = rlkern.shape_rewards(nan, [0] * 5, method=method, **kw)
        want = R.shape_rewards(nan, torch.zeros(5, dtype=torch.long), first, method, params, kw.get("budgets"))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, equal_nan=True, msg=method)
        assert math.isnan(got[1].item()) and bool(torch.isfinite(got[[0, 2, 3, 4]]).all()), method


def test_shape_rewards_half_precision_and_string_ids():
    scores, _, aux = _shape_case(21, 3, "otc", torch.float32)
    ids = [f"prompt-{i % 5}" for i in range(21)]
    got = rlkern.shape_rewards(scores.bfloat16(), ids, method="otc", tool_calls=aux.int())
    want = R.shape_rewards(scores.bfloat16(), S.dense("t", ids), aux, "otc", [1.0, 1.0])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=2e-6)


def test_outputs_carry_no_gradient():
    r = torch.randn(4, 3, requires_grad=True)
    assert not rlkern.ensemble_rewards(r).requires_grad
    s = torch.ones(4, requires_grad=True)
    assert not rlkern.shape_rewards(s, [0, 0, 1, 1], method="s_grpo", exit_positions=torch.arange(4)).requires_grad


# ---------------------------------------------------------------------------------------------
# TW-GRPO token weights


def test_token_weights_hand_computed(backend):
    # "Reinforcing Video Reasoning with Focused Thinking": one group of two completions, V = 2;
    # t0: the same distribution (D = 0), t1: opposite ones, t2: completion 1 is masked (uniform);
    # a second group of one completion (every D = 0: weights 1)
    p = [[[0.5, 0.5], [0.9, 0.1], [0.7, 0.3]], [[0.5, 0.5], [0.1, 0.9], [0.2, 0.8]]]
    logprobs = torch.tensor(p + [[[0.6, 0.4], [0.3, 0.7], [0.5, 0.5]]], dtype=torch.float64).log()
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]])
    got = rlkern.token_weights(logprobs, [0, 0, 1], mask)

    def divergence(rows):  # rows: the members' log-prob lists at one position
        mean = [sum(r[v] for r in rows) / len(rows) for v in range(2)]
        total = 0.0
        for r in rows:
            for v in range(2):
                d = min(11.0, max(-11.0, mean[v] - r[v]))
                total += math.exp(d) - d - 1
        return total / len(rows)

    log = math.log
    d = [divergence([[log(0.5), log(0.5)]] * 2),
         divergence([[log(0.9), log(0.1)], [log(0.1), log(0.9)]]),
         divergence([[log(0.7), log(0.3)], [-log(2), -log(2)]])]
    assert d[0] == 0.0 and d[1] > d[2] > 0
    lo, hi = min(d), max(d)
    w = [1.0 + 0.4 * (x - lo) / (hi - lo + 1e-8) for x in d]
    want = [w, [w[0], w[1], 0.0], [1.0, 1.0, 1.0]]
    assert got.tolist() == [pytest.approx(row, abs=1e-12) for row in want]
    assert got.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,t,v", [(0, 3, 5), (3, 0, 5), (1, 4, 3), (7, 5, 11), (10, 6, 37)])
def test_token_weights_match_reference(backend, dtype, n, t, v):
    g = torch.Generator().manual_seed(n * 100 + t * 10 + v)
    logprobs = (torch.randn(n, t, v, generator=g, dtype=torch.float64) * 2).log_softmax(-1).to(dtype)
    ids = torch.randint(0, max(1, n // 3), (n,), generator=g)
    lengths = torch.randint(0, t + 1, (n,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]  # ragged, some rows empty
    got = rlkern.token_weights(logprobs, ids, mask.int(), max_weight=1.7)
    want = R.token_weights(logprobs, S.dense("t", ids), mask, 1.7)
    assert got.shape == (n, t) and got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    if n:
        assert S._TOKEN_WEIGHTS.backend(logprobs) == backend  # no silent fallback
    # no mask: every position counts; a non-contiguous view reads the same numbers
    view = torch.cat([logprobs, logprobs], dim=2)[:, :, :v]
    torch.testing.assert_close(rlkern.token_weights(view, ids).double(),
                               R.token_weights(logprobs, S.dense("t", ids), torch.ones(n, t), 1.4), rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------
# Bad calls


@pytest.mark.parametrize("call,message", [
    (lambda: rlkern.ensemble_rewards(torch.ones(3)), "rewards must be [B, K]"),
    (lambda: rlkern.ensemble_rewards(torch.ones(3, 0)), "rewards must be [B, K]"),
    (lambda: rlkern.ensemble_rewards(torch.ones(3, 2), method="max"), "method must be one of"),
    (lambda: rlkern.ensemble_rewards(torch.ones(3, 2), method="uwo"), "coef (UWO's lambda) must be given"),
    (lambda: rlkern.ensemble_rewards(torch.ones(3, 2), method="uwo", coef=-1.0), "coef must be"),
    (lambda: rlkern.ensemble_rewards(torch.ones(3, 2), coef=1.0), "coef is UWO's lambda"),
    (lambda: rlkern.ensemble_rewards(torch.ones(3, 2), method="weighted"), "weights (K floats) must be given"),
    (lambda: rlkern.ensemble_rewards(torch.ones(3, 2), method="weighted", weights=[1.0]), "weights must have 2"),
    (lambda: rlkern.ensemble_rewards(torch.ones(3, 2), method="weighted", weights=[1.0, float("nan")]),
     "weights must be a finite number"),
    (lambda: rlkern.ensemble_rewards(torch.ones(3, 2), weights=[1.0, 2.0]), "weights are only read"),
    (lambda: rlkern.ensemble_rewards(torch.ones(3, 2, dtype=torch.long)), "rewards must be"),
    (lambda: rlkern.shape_rewards(torch.ones(4), [0] * 4, method="dapo", lengths=torch.ones(4)), "method must be"),
    (lambda: rlkern.shape_rewards(torch.ones(4), [0] * 4, method="otc"), "tool_calls ([N]) must be given"),
    (lambda: rlkern.shape_rewards(torch.ones(4), [0] * 4, method="otc", lengths=torch.ones(4)), "reads tool_calls"),
    (lambda: rlkern.shape_rewards(torch.ones(4), [0] * 3, method="s_grpo", exit_positions=torch.ones(4)),
     "group_ids must have 4"),
    (lambda: rlkern.shape_rewards(torch.ones(4), [0] * 4, method="s_grpo", exit_positions=torch.ones(3)),
     "exit_positions must have shape (4,)"),
    (lambda: rlkern.shape_rewards(torch.ones(4), [0] * 4, method="s_grpo", exit_positions=torch.ones(4) > 0),
     "exit_positions must be a float or int"),
    (lambda: rlkern.shape_rewards(torch.ones(4), [0] * 4, method="s_grpo", exit_positions=torch.ones(4), decay=0.0),
     "decay must be"),
    (lambda: rlkern.shape_rewards(torch.ones(4), [0] * 4, method="unlikeliness",
                                  logprobs=torch.tensor([0.0, float("nan"), 1.0, 2.0])), "logprobs must be finite"),
    (lambda: rlkern.shape_rewards(torch.ones(4), [0] * 4, method="otc", tool_calls=torch.tensor([0, -1, 1, 2])),
     "tool_calls must be >= 0"),
    (lambda: rlkern.shape_rewards(torch.ones(4), [0] * 4, method="otc", tool_calls=torch.ones(4), tool_c=0.0),
     "tool_c must be"),
    (lambda: rlkern.shape_rewards(torch.ones(4), [0] * 4, method="grpo_lambda", lengths=torch.ones(4), threshold=1.5),
     "threshold must be"),
    (lambda: rlkern.shape_rewards(torch.ones(4), [0] * 4, method="otc", tool_calls=torch.ones(4), top_fraction=0.5),
     "top_fraction is GRPO-lambda's"),
    (lambda: rlkern.shape_rewards(torch.ones(4), [0] * 4, method="grpo_lambda", lengths=torch.ones(4),
                                  top_fraction=1.5), "top_fraction must be"),
    (lambda: rlkern.shape_rewards(torch.ones(4), [0] * 4, method="hbpo", lengths=torch.ones(4)),
     "budgets ([N]) must be given"),
    (lambda: rlkern.shape_rewards(torch.ones(4), [0] * 4, method="otc", tool_calls=torch.ones(4), budgets=torch.ones(4)),
     "reads tool_calls, not budgets"),
    (lambda: rlkern.shape_rewards(torch.ones(4), [0] * 4, method="hbpo", lengths=torch.ones(4), budgets=torch.ones(4),
                                  max_length=0.5), "max_length must be an int"),
    (lambda: rlkern.hbpo_advantages(torch.ones(4), [0] * 4, torch.ones(3)), "budgets must have shape (4,)"),
    (lambda: rlkern.hbpo_advantages(torch.ones(4), [0] * 4, torch.tensor([1.0, 2, 3, float("inf")])),
     "budgets must be finite"),
    (lambda: rlkern.hbpo_advantages(torch.ones(4), [0] * 4, torch.ones(4), eps=-1.0), "eps must be"),
    (lambda: rlkern.token_weights(torch.randn(2, 3), [0, 0]), "logprobs must be [N, T, V]"),
    (lambda: rlkern.token_weights(torch.randn(2, 3, 4), [0, 0], torch.ones(2, 4)), "response_mask must have shape"),
    (lambda: rlkern.token_weights(torch.randn(2, 3, 4), [0, 0], max_weight=float("nan")), "max_weight must be"),
    (lambda: rlkern.token_weights(torch.randn(2, 3, 4), [0]), "group_ids must have 2"),
    (lambda: rlkern.shape_rewards(torch.ones(2, 2), [0] * 2, method="grpo_lambda", lengths=torch.ones(2, 2)),
     "scores must be [N]"),
])
def test_bad_calls(call, message):
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    text = str(info.value)
    assert text.startswith(("ensemble_rewards: ", "shape_rewards: ", "hbpo_advantages: ", "token_weights: ")) and message in text, text


# ---------------------------------------------------------------------------------------------
# torch.library and torch.compile


def test_opcheck():
    r = torch.randn(5, 3)
    for method in range(4):
        w = torch.randn(3) if method == 3 else None
        torch.library.opcheck(S._ensemble_op, (r, w, method, 0.5))
    s, ids, aux = _shape_case(9, 1, "otc")
    inverse = S.dense("t", ids)
    for method in range(4):
        torch.library.opcheck(S._shape_op, (s, aux.float(), None, inverse, method, 0.5, 0.2, 1e-6, -1.0))
    torch.library.opcheck(S._shape_op, (s, aux.float(), None, inverse, 0, 0.5, 0.2, 1e-6, 0.3))
    budgets = _budgets(9).float()
    torch.library.opcheck(S._shape_op, (s, aux.float() * 1000, budgets, inverse, 4, 4096.0, 4.0, 1 / 4096, 0.0))
    torch.library.opcheck(S._shape_op, (s, budgets, None, inverse, 5, 4096.0, 4.0, 1e-6, 0.0))
    lp = torch.randn(9, 4, 6).log_softmax(-1)
    torch.library.opcheck(S._token_weights_op, (lp, torch.rand(9, 4) > 0.3, inverse, 1.5))


def test_torch_compile_fullgraph():
    def step(r, ids, positions):
        combined = rlkern.ensemble_rewards(r, method="uwo", coef=0.5)
        shaped = rlkern.shape_rewards(combined, ids, method="s_grpo", exit_positions=positions)
        return rlkern.grpo(shaped, ids)

    r = torch.randn(8, 3)
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    positions = torch.arange(8)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(r, ids, positions), step(r, ids, positions))

    def hbpo_and_weights(scores, ids, lengths, budgets, logprobs, mask):
        rewards = rlkern.shape_rewards(scores, ids, method="hbpo", lengths=lengths, budgets=budgets)
        return rlkern.hbpo_advantages(rewards, ids, budgets), rlkern.token_weights(logprobs, ids, mask)

    args = (torch.tensor([1.0, 0, 1, 1, 1, 0, 1, 1]), ids, torch.arange(8) * 500, torch.tensor([512, 2048] * 4),
            torch.randn(8, 3, 7).log_softmax(-1), torch.rand(8, 3) > 0.3)
    compiled = torch.compile(hbpo_and_weights, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(*args), hbpo_and_weights(*args)):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------
# GPU and sm_90


@pytest.mark.gpu
def test_cuda_matches_reference():
    r = _ensemble_case(301, 4, 0).cuda()
    for method, kw in (("mean", {}), ("wco", {}), ("uwo", {"coef": 0.3}), ("weighted", {"weights": [1, 2, 3, 4]})):
        got = rlkern.ensemble_rewards(r, method=method, **kw)
        want = R.ensemble_rewards(r.cpu(), method, kw.get("coef", 0.0), torch.tensor([1.0, 2, 3, 4]))
        torch.testing.assert_close(got.cpu().double(), want, rtol=2e-6, atol=2e-6)
    for method in R.SHAPE_METHODS:
        for dtype in (torch.float32, torch.float64):
            scores, ids, aux = _shape_case(517, 5, method, dtype)
            budgets = _budgets(517)
            got = rlkern.shape_rewards(scores.cuda(), ids.cuda(), method=method, **{
                k: v.cuda() for k, v in _kw(method, aux, budgets).items()})
            want = R.shape_rewards(scores, S.dense("t", ids), aux, method, PARAMS[method], budgets)
            tol = 1e-12 if dtype == torch.float64 else 2e-6
            torch.testing.assert_close(got.cpu().double(), want, rtol=tol, atol=tol)
            lp = torch.randn(517, 9, 300, dtype=dtype).log_softmax(-1)
            mask = torch.rand(517, 9) > 0.2
            tw = rlkern.token_weights(lp.cuda(), ids.cuda(), mask.cuda())
            torch.testing.assert_close(tw.cpu().double(), R.token_weights(lp, S.dense("t", ids), mask, 1.4),
                                       rtol=10 * tol, atol=10 * tol)
            adv = rlkern.hbpo_advantages(scores.cuda(), ids.cuda(), budgets.cuda())
            want = R.hbpo_advantages(scores, S.dense("t", ids), budgets, 4096.0, 4.0, 1e-6)
            torch.testing.assert_close(adv.cpu().double(), want, rtol=tol, atol=tol)


def test_triton_kernels_compile_for_sm90():
    compile_for_sm90("""
from rlkern.kernels import shaping as k
for dt in ("fp32", "fp64"):
    p = "*" + dt
    for method in range(4):
        build(k._ensemble_kernel, {"r_ptr": p, "w_ptr": p, "par_ptr": "*fp64", "out_ptr": p, "B": "i32", "K": "i32"},
              {"METHOD": method, "BLOCK_B": 128, "BLOCK_K": 4})
        build(k._shape_kernel, {"s_ptr": p, "a_ptr": p, "inv_ptr": "*i64", "perm_ptr": "*i64", "starts_ptr": "*i64",
                                "par_ptr": "*fp64", "out_ptr": p}, {"METHOD": method, "BLOCK": 64})
    build(k._token_kl_kernel, {"lp_ptr": "*" + ("bf16" if dt == "fp32" else dt), "m_ptr": "*u8", "perm_ptr": "*i64",
                               "starts_ptr": "*i64", "kl_ptr": p, "par_ptr": "*fp64", "s_n": "i64", "s_t": "i64",
                               "T": "i32", "V": "i32"}, {"FP64": dt == "fp64", "BLOCK_V": 1024})
    build(k._token_weights_kernel, {"kl_ptr": p, "m_ptr": "*u8", "inv_ptr": "*i64", "out_ptr": p, "par_ptr": "*fp64",
                                    "T": "i32"}, {"BLOCK_T": 256})
    for method in (4, 5):
        build(k._hbpo_kernel, {"s_ptr": p, "a_ptr": p, "b_ptr": p, "inv_ptr": "*i64", "perm_ptr": "*i64",
                               "starts_ptr": "*i64", "par_ptr": "*fp64", "out_ptr": p}, {"METHOD": method, "BLOCK": 64})
print("ok")
""")
