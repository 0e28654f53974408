"""Reward-side ops (rlkern/ops/rewards.py): overlong_rewards, kl_rewards, gigpo_advantages,
action_rewards.

Each formula on a hand-computed example (the numbers written out from the paper's formula with
Python floats), then every backend (C++, Triton interpreted, torch) against the float64
reference (rlkern/reference/rewards.py) on odd sizes, then parity with the peers' own code
(verl's DAPO reward manager and ``apply_kl_penalty``, OpenRLHF's ``compute_reward``), the bad
calls, torch.compile / opcheck, a GPU run and the sm_90 compile.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from types import SimpleNamespace
from unittest.mock import MagicMock

import numpy as np
import pytest
import torch

import rlkern
from rlkern.ops import rewards as W
from rlkern.reference import rewards as R
from conftest import compile_for_sm90, import_peer

# ---------------------------------------------------------------------------------------------
# Hand-computed examples (every backend)


def test_overlong_rewards_hand_computed(backend):
    # DAPO's soft overlong punishment with L_max = 20, L_cache = 8: no penalty up to 12, linear to -1 at 20, -1 past it
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, -1.0, 1.0])
    lengths = torch.tensor([5, 12, 16, 20, 14, 25])
    got = rlkern.overlong_rewards(scores, lengths, max_length=20, cache_length=8)
    want = [1.0, 1.0, 0.0 + (12 - 16) / 8, 1.0 + (12 - 20) / 8, -1.0 + (12 - 14) / 8, 1.0 - 1.0]
    assert got.tolist() == pytest.approx(want, abs=1e-6)
    half = rlkern.overlong_rewards(scores, lengths, max_length=20, cache_length=8, penalty_factor=0.5)
    assert half.tolist() == pytest.approx([s + 0.5 * (w - s) for s, w in zip(scores.tolist(), want)], abs=1e-6)


def test_kl_rewards_hand_computed(backend):
    # two responses of lengths 3 and 1 (padded to 4): score on the last response token, -beta * k1 elsewhere
    lp = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-0.2, -9.0, -9.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -1.0], [-0.4, -1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    scores = torch.tensor([2.0, -1.0])
    got = rlkern.kl_rewards(scores, lp, ref, mask, kl_coef=0.1, kl_estimator="k1")
    want = [[-0.1 * 0.5, -0.1 * -1.0, -0.1 * 0.0 + 2.0, 0.0], [-0.1 * 0.2 - 1.0, 0.0, 0.0, 0.0]]
    torch.testing.assert_close(got, torch.tensor(want), rtol=0, atol=1e-6)
    # k3 (verl's low_var_kl): e^(ref - lp) - (ref - lp) - 1, and the score clipped to [-0.5, 0.5]
    got = rlkern.kl_rewards(scores, lp, ref, mask, kl_coef=0.1, kl_estimator="low_var_kl", reward_clip=(-0.5, 0.5))
    k3 = [[math.exp(d) - d - 1 for d in (r - l for r, l in zip(rr, ll))] for rr, ll in zip(ref.tolist(), lp.tolist())]
    want = [[-0.1 * k3[0][0], -0.1 * k3[0][1], -0.1 * k3[0][2] + 0.5, 0.0], [-0.1 * k3[1][0] - 0.5, 0.0, 0.0, 0.0]]
    torch.testing.assert_close(got, torch.tensor(want), rtol=0, atol=1e-6)


def test_gigpo_advantages_hand_computed(backend):
    # GiGPO: A = A_E + omega * A_S; the steps' episode returns [1, 1, 0] in one group -> A_E = R - 2/3
    # (mean_norm); the three steps share one anchor state -> A_S = return - their mean
    episode = rlkern.grpo(torch.tensor([1.0, 1.0, 0.0]), [0, 0, 0], norm_by_std=False)
    step = rlkern.gigpo_step_groups(torch.tensor([0.9, 0.5, 0.0]), ["s", "s", "s"], [0, 0, 0])
    got = rlkern.gigpo_advantages(episode, step, step_weight=0.5)
    mean_e, mean_s = 2.0 / 3, (0.9 + 0.5 + 0.0) / 3
    want = [(1 - mean_e) + 0.5 * (0.9 - mean_s), (1 - mean_e) + 0.5 * (0.5 - mean_s), (0 - mean_e) + 0.5 * (0 - mean_s)]
    assert got.tolist() == pytest.approx(want, abs=1e-6)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    tokens = rlkern.gigpo_advantages(episode, step, mask, step_weight=0.5)
    torch.testing.assert_close(tokens, torch.tensor(want)[:, None] * mask, rtol=0, atol=1e-6)


def test_action_rewards_hand_computed(backend):
    # UI-R1: R = [type] + [point in box] + format; types 0 = click, 1 = scroll, -1 = unparsed
    pred = torch.tensor([0, 0, 1, -1, 0])
    true = torch.tensor([0, 0, 1, 0, 1])
    nan = float("nan")
    points = torch.tensor([[5.0, 5.0], [11.0, 5.0], [nan, nan], [5.0, 5.0], [10.0, 10.0]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [nan] * 4, [0.0, 0.0, 10.0, 10.0],
                          [0.0, 0.0, 10.0, 10.0]])
    fmt = torch.tensor([True, True, False, True, False])
    got = rlkern.action_rewards(pred, true, points, boxes, fmt)
    # 1: type, inside, format; 2: type, x = 11 outside, format; 3: scroll type only (no box);
    # 4: unparsed type, inside, format; 5: wrong type, (10, 10) on the box's corner (inclusive)
    assert got.tolist() == [3.0, 2.0, 1.0, 2.0, 1.0]
    assert rlkern.action_rewards(pred, true, points, boxes).tolist() == [2.0, 1.0, 1.0, 1.0, 1.0]


# ---------------------------------------------------------------------------------------------
# Every backend against the float64 reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_action_rewards_match_reference(backend, dtype):
    gen = torch.Generator().manual_seed(5)
    n = 1029
    pred = torch.randint(-1, 4, (n,), generator=gen)
    true = torch.randint(0, 4, (n,), generator=gen, dtype=torch.int32)
    points = (torch.rand(n, 2, generator=gen, dtype=torch.float64) * 100).to(dtype)
    corner = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 80
    boxes = torch.cat([corner, corner + torch.rand(n, 2, generator=gen, dtype=torch.float64) * 40], 1).to(dtype)
    boxes[::7] = float("nan")
    points[::11, 0] = float("nan")
    fmt = torch.rand(n, generator=gen) > 0.3
    got = rlkern.action_rewards(pred, true, points, boxes, fmt)
    assert got.dtype == dtype
    want = R.action_rewards(pred, true, points, boxes, fmt.double())
    torch.testing.assert_close(got.double(), want, rtol=0, atol=0)


def _kl_case(b, t, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    lp = (-torch.rand(b, t, generator=gen, dtype=torch.float64) * 6).to(dtype)
    ref = (-torch.rand(b, t, generator=gen, dtype=torch.float64) * 6).to(dtype)
    lp[0, 0], ref[0, 0] = -30.0, -1.0  # beyond verl's k3 clamps (20 and 10)
    lengths = torch.randint(0, t + 1, (b,), generator=gen)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    mask[-1] = torch.rand(t, generator=gen) > 0.5  # holes inside a row
    scores = torch.randn(b, generator=gen, dtype=torch.float64).to(dtype) * 3
    return scores, lp, ref, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("estimator", ["k1", "abs", "k2", "k3"])
def test_kl_rewards_match_reference(backend, dtype, estimator):
    scores, lp, ref, mask = _kl_case(7, 1100, 3, dtype)  # T > one Triton tile
    for kw in ({}, {"kl_clip": 1.5, "reward_clip": (-1.0, 2.0)}):
        got = rlkern.kl_rewards(scores, lp, ref, mask, kl_coef=0.3, kl_estimator=estimator, **kw)
        assert got.dtype == dtype and got.shape == lp.shape
        want = R.kl_rewards(scores, lp, ref, mask, estimator, 0.3, kw.get("kl_clip"), kw.get("reward_clip"))
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_rewards_packed(backend, dtype):
    # the packed layout: sequences of lengths 3, 0, 1500 (more than one Triton tile), 1 and 40
    gen = torch.Generator().manual_seed(9)
    cu = torch.tensor([0, 3, 3, 1503, 1504, 1544])
    total = int(cu[-1])
    lp = (-torch.rand(total, generator=gen, dtype=torch.float64) * 4).to(dtype)
    ref = (-torch.rand(total, generator=gen, dtype=torch.float64) * 4).to(dtype)
    mask = torch.rand(total, generator=gen) > 0.2
    mask[1503] = False  # a sequence without a response token
    scores = torch.randn(5, generator=gen, dtype=torch.float64).to(dtype)
    got = rlkern.kl_rewards(scores, lp, ref, mask, kl_coef=0.2, kl_estimator="k2", reward_clip=(-0.5, 0.5),
                            cu_seqlens=cu)
    want = R.kl_rewards(scores, lp, ref, mask, "k2", 0.2, None, (-0.5, 0.5), cu)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    # the same numbers as the padded layout of the same sequences
    pad = lambda x: torch.stack([torch.nn.functional.pad(x[a:b], (0, 1500 - (b - a))) for a, b in  # noqa: E731
                                 zip(cu[:-1].tolist(), cu[1:].tolist())])
    padded = rlkern.kl_rewards(scores, pad(lp), pad(ref), pad(mask), kl_coef=0.2, kl_estimator="k2",
                               reward_clip=(-0.5, 0.5))
    torch.testing.assert_close(pad(got), padded, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sample_ops_match_reference(backend, dtype):
    gen = torch.Generator().manual_seed(1)
    n = 1031
    scores = torch.randn(n, generator=gen).to(dtype)
    lengths = torch.randint(0, 40, (n,), generator=gen)
    got = rlkern.overlong_rewards(scores, lengths, max_length=30, cache_length=7, penalty_factor=0.7)
    want = R.sample_rewards(scores.float() if dtype == torch.bfloat16 else scores, lengths.double(), "overlong",
                            [30.0, 7.0, 0.7])
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    step = torch.randn(n, generator=gen).to(dtype)
    got = rlkern.gigpo_advantages(scores, step, step_weight=0.37)
    torch.testing.assert_close(got.double(), R.sample_rewards(scores.double(), step.double(), "gigpo", [0.37]),
                               rtol=tol, atol=tol)


def test_empty_and_nan(backend):
    empty = torch.zeros(0)
    assert rlkern.overlong_rewards(empty, empty, max_length=4, cache_length=2).shape == (0,)
    assert rlkern.gigpo_advantages(empty, empty).shape == (0,)
    assert rlkern.kl_rewards(empty, torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, 3), kl_coef=0.1).shape == (0, 3)
    assert rlkern.kl_rewards(torch.ones(2), torch.zeros(2, 0), torch.zeros(2, 0), torch.zeros(2, 0),
                             kl_coef=0.1).shape == (2, 0)
    got = rlkern.overlong_rewards(torch.tensor([float("nan"), 1.0]), torch.tensor([1, 1]), max_length=4,
                                  cache_length=2)
    assert math.isnan(got[0]) and got[1] == 1.0
    got = rlkern.kl_rewards(torch.tensor([float("nan")]), torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2),
                            kl_coef=0.1, reward_clip=(-1.0, 1.0))
    assert got[0, 0] == 0.0 and math.isnan(got[0, 1])


def test_packed_gigpo_advantages():
    cu = torch.tensor([0, 2, 5])
    got = rlkern.gigpo_advantages(torch.tensor([1.0, -1.0]), torch.tensor([0.5, 0.25]), torch.ones(5), cu_seqlens=cu)
    assert got.tolist() == pytest.approx([1.5, 1.5, -0.75, -0.75, -0.75])


# ---------------------------------------------------------------------------------------------
# Parity with the peers' own code


class _Tokenizer:
    eos_token = "<eos>"

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(i)) for i in ids)


def test_overlong_rewards_match_verl_dapo_reward_manager():
    dapo = import_peer("verl.workers.reward_manager.dapo")
    verl = import_peer("verl")
    n, prompt_len, max_resp = 6, 3, 12
    lengths = torch.tensor([2, 5, 7, 9, 11, 12])
    scores = [1.0, 0.0, 1.0, -1.0, 1.0, 0.5]
    attention = torch.zeros(n, prompt_len + max_resp, dtype=torch.long)
    attention[:, :prompt_len] = 1
    for i, length in enumerate(lengths.tolist()):
        attention[i, prompt_len:prompt_len + length] = 1
    data = verl.DataProto.from_dict(
        tensors={"prompts": torch.ones(n, prompt_len, dtype=torch.long),
                 "responses": torch.arange(n * max_resp).reshape(n, max_resp), "attention_mask": attention},
        non_tensors={"reward_model": np.array([{"ground_truth": str(s)} for s in scores], dtype=object),
                     "data_source": np.array(["x"] * n, dtype=object)})
    cfg = SimpleNamespace(enable=True, len=5, penalty_factor=0.8, log=False)
    manager = dapo.DAPORewardManager(tokenizer=_Tokenizer(), num_examine=0,
                                     compute_score=lambda data_source, solution_str, ground_truth, extra_info:
                                     float(ground_truth),
                                     max_resp_len=max_resp, overlong_buffer_cfg=cfg)
    theirs = manager(data)
    theirs = theirs.sum(dim=1)  # the reward sits on each response's last token
    ours = rlkern.overlong_rewards(torch.tensor(scores), lengths, max_length=max_resp, cache_length=5,
                                   penalty_factor=0.8)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    assert (ours < torch.tensor(scores)).any()  # the window was reached


@pytest.mark.parametrize("estimator", ["kl", "abs", "mse", "low_var_kl", "k3+"])
def test_kl_rewards_match_verl_apply_kl_penalty(estimator):
    trainer = import_peer("verl.trainer.ppo.ray_trainer")
    core = import_peer("verl.trainer.ppo.core_algos")
    verl = import_peer("verl")
    scores, lp, ref, mask = _kl_case(6, 9, 11)
    last = mask.shape[1] - 1 - mask.long().fliplr().argmax(dim=1)
    token_scores = torch.zeros_like(lp)
    for i in range(6):
        if mask[i].any():
            token_scores[i, last[i]] = scores[i]
    data = verl.DataProto.from_dict(tensors={"response_mask": mask.float(), "token_level_scores": token_scores,
                                             "old_log_probs": lp, "ref_log_prob": ref})
    data, _ = trainer.apply_kl_penalty(data, core.FixedKLController(0.2), kl_penalty=estimator)
    ours = rlkern.kl_rewards(scores, lp, ref, mask, kl_coef=0.2, kl_estimator=estimator)
    torch.testing.assert_close(ours, data.batch["token_level_rewards"], rtol=1e-6, atol=1e-6)


def _openrlhf_utils(monkeypatch):
    spec = importlib.util.find_spec("openrlhf")
    if spec is None:
        import_peer("openrlhf")
    if importlib.util.find_spec("deepspeed") is None:  # imported at its top, unused by these two functions
        monkeypatch.setitem(sys.modules, "deepspeed", MagicMock())
    path = os.path.join(spec.submodule_search_locations[0], "models", "utils.py")
    loaded = importlib.util.spec_from_file_location("_rlkern_test_openrlhf_utils", path)
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    return module


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_rewards_match_openrlhf_compute_reward(monkeypatch, estimator):
    utils = _openrlhf_utils(monkeypatch)
    scores, lp, ref, mask = _kl_case(6, 9, 12)
    mask[:, 0] = True  # OpenRLHF puts the reward of a row without action tokens on its last position
    kl = utils.compute_approx_kl(lp, ref, kl_estimator=estimator) * mask  # OpenRLHF masks it in its advantages
    theirs = utils.compute_reward(scores, 0.05, kl, action_mask=mask, reward_clip_range=(-2.0, 2.5))
    ours = rlkern.kl_rewards(scores, lp, ref, mask, kl_coef=0.05, kl_estimator=estimator, kl_clip=10.0,
                             reward_clip=(-2.0, 2.5))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    assert (scores.abs() > 2.0).any()  # the clip was reached


# ---------------------------------------------------------------------------------------------
# Bad calls


@pytest.mark.parametrize("call, message", [
    (lambda: rlkern.overlong_rewards(torch.ones(2, 2), torch.ones(2, 2), max_length=4), "scores must be [N]"),
    (lambda: rlkern.overlong_rewards(torch.ones(3), torch.ones(2), max_length=4, cache_length=2),
     "lengths must have shape (3,)"),
    (lambda: rlkern.overlong_rewards(torch.ones(2), torch.ones(2), max_length=4, cache_length=5), "cache_length"),
    (lambda: rlkern.overlong_rewards(torch.ones(2), torch.ones(2), max_length=4.5, cache_length=2), "max_length"),
    (lambda: rlkern.overlong_rewards(torch.ones(2), torch.tensor([1.0, float("inf")]), max_length=4,
                                     cache_length=2), "lengths must be finite"),
    (lambda: rlkern.overlong_rewards(torch.ones(2), [1, 2], max_length=4, cache_length=2), "lengths must be a float"),
    (lambda: rlkern.kl_rewards(torch.ones(2), torch.ones(2, 3), torch.ones(2, 3), torch.ones(2, 3), kl_coef=-0.1),
     "kl_coef must be"),
    (lambda: rlkern.kl_rewards(torch.ones(2), torch.ones(2, 3), torch.ones(2, 3), torch.ones(2, 3), kl_coef=0.1,
                               kl_estimator="k4"), "kl_estimator must be one of"),
    (lambda: rlkern.kl_rewards(torch.ones(3), torch.ones(2, 3), torch.ones(2, 3), torch.ones(2, 3), kl_coef=0.1),
     "scores must have shape (2,)"),
    (lambda: rlkern.kl_rewards(torch.ones(2), torch.ones(2, 3), torch.ones(2, 4), torch.ones(2, 3), kl_coef=0.1),
     "ref_logprobs must have shape"),
    (lambda: rlkern.kl_rewards(torch.ones(2), torch.ones(2, 3), torch.ones(2, 3), torch.ones(2, 3), kl_coef=0.1,
                               reward_clip=(1.0, 0.0)), "reward_clip must be"),
    (lambda: rlkern.kl_rewards(torch.ones(2), torch.ones(2, 3), torch.ones(2, 3), torch.ones(2, 3), kl_coef=0.1,
                               kl_clip=-1.0), "kl_clip must be"),
    (lambda: rlkern.kl_rewards(torch.ones(2), torch.ones(6), torch.ones(6), torch.ones(6), kl_coef=0.1),
     "logprobs must be [B, T]"),
    (lambda: rlkern.kl_rewards(torch.ones(2), torch.ones(6), torch.ones(6), torch.ones(6), kl_coef=0.1,
                               cu_seqlens=torch.tensor([0, 2, 5])), "cu_seqlens must rise from 0"),
    (lambda: rlkern.kl_rewards(torch.ones(3), torch.ones(6), torch.ones(6), torch.ones(6), kl_coef=0.1,
                               cu_seqlens=torch.tensor([0, 2, 6])), "scores must have shape (2,)"),
    (lambda: rlkern.kl_rewards(torch.ones(2), torch.ones(2, 3), torch.ones(2, 3), torch.ones(2, 3), kl_coef=0.1,
                               cu_seqlens=torch.tensor([0, 2, 6])), "packed [total]"),
    (lambda: rlkern.gigpo_advantages(torch.ones(3), torch.ones(2)), "step must have shape (3,)"),
    (lambda: rlkern.action_rewards(torch.zeros(3), torch.zeros(3, dtype=torch.long), torch.ones(3, 2),
                                   torch.ones(3, 4)), "pred_types must be"),
    (lambda: rlkern.action_rewards(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long),
                                   torch.ones(3, 3), torch.ones(3, 4)), "points must have shape (3, 2)"),
    (lambda: rlkern.action_rewards(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long),
                                   torch.ones(3, 2), torch.ones(3, 4), torch.ones(2)), "format_ok must have shape"),
    (lambda: rlkern.gigpo_advantages(torch.ones(3), torch.ones(3), step_weight=float("nan")), "step_weight must be"),
    (lambda: rlkern.gigpo_advantages(torch.ones(3), torch.ones(3), cu_seqlens=torch.tensor([0, 3])), "cu_seqlens"),
])
def test_bad_calls(call, message):
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    text = str(info.value)
    assert text.startswith(("overlong_rewards: ", "kl_rewards: ", "gigpo_advantages: ", "action_rewards: ")) \
        and message in text, text


# ---------------------------------------------------------------------------------------------
# torch.library and torch.compile


def test_opcheck():
    a, b = torch.randn(9), torch.randint(0, 30, (9,)).float()
    torch.library.opcheck(W._sample_op, (a, b, 0, 20.0, 8.0, 1.0))
    torch.library.opcheck(W._sample_op, (a, b, 1, 0.5, 0.0, 0.0))
    scores, lp, ref, mask = _kl_case(5, 7, 2)
    for est in range(4):
        torch.library.opcheck(W._kl_op, (scores, lp, ref, mask, None, est, 0.1, -1.0, -math.inf, math.inf))
    torch.library.opcheck(W._kl_op, (scores, lp, ref, mask, None, 3, 0.1, 2.0, -1.0, 1.0))
    cu = torch.tensor([0, 3, 3, 10, 20, 35], dtype=torch.int32)
    torch.library.opcheck(W._kl_op, (scores, lp.flatten(), ref.flatten(), mask.flatten(), cu, 1, 0.1, -1.0, -1.0, 1.0))
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 5)
    torch.library.opcheck(W._action_op, (torch.arange(5), torch.zeros(5, dtype=torch.long), torch.rand(5, 2), boxes,
                                         torch.ones(5)))


def test_torch_compile_fullgraph():
    def step(scores, lengths, ids, lp, ref, mask):
        shaped = rlkern.overlong_rewards(scores, lengths, max_length=20, cache_length=8)
        episode = rlkern.grpo(shaped, ids)
        return (rlkern.kl_rewards(shaped, lp, ref, mask, kl_coef=0.1, kl_estimator="k3"),
                rlkern.gigpo_advantages(episode, shaped, mask, step_weight=0.5))

    scores, lp, ref, mask = _kl_case(4, 6, 7)
    args = (scores, torch.tensor([3, 15, 19, 30]), torch.tensor([0, 0, 1, 1]), lp, ref, mask)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(*args), step(*args)):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------
# GPU and sm_90


@pytest.mark.gpu
def test_cuda_matches_reference():
    for dtype in (torch.float32, torch.float64):
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        for estimator in R.KL_ESTIMATORS:
            scores, lp, ref, mask = _kl_case(301, 2049, 4, dtype)
            got = rlkern.kl_rewards(scores.cuda(), lp.cuda(), ref.cuda(), mask.cuda(), kl_coef=0.3,
                                    kl_estimator=estimator, kl_clip=2.0, reward_clip=(-1.0, 1.0))
            want = R.kl_rewards(scores, lp, ref, mask, estimator, 0.3, 2.0, (-1.0, 1.0))
            torch.testing.assert_close(got.cpu().double(), want, rtol=tol, atol=tol)
            cu = torch.tensor([0, 5, 5, 3000, 3001, 4100], dtype=torch.int32)
            flat = lambda x: x.flatten()[:4100]  # noqa: E731
            got = rlkern.kl_rewards(scores[:5].cuda(), flat(lp).cuda(), flat(ref).cuda(), flat(mask).cuda(),
                                    kl_coef=0.3, kl_estimator=estimator, cu_seqlens=cu.cuda())
            want = R.kl_rewards(scores[:5], flat(lp), flat(ref), flat(mask), estimator, 0.3, None, None, cu)
            torch.testing.assert_close(got.cpu().double(), want, rtol=tol, atol=tol)
        scores = torch.randn(5001, dtype=dtype)
        lengths = torch.randint(0, 500, (5001,))
        got = rlkern.overlong_rewards(scores.cuda(), lengths.cuda(), max_length=400, cache_length=100)
        want = R.sample_rewards(scores, lengths.double(), "overlong", [400.0, 100.0, 1.0])
        torch.testing.assert_close(got.cpu().double(), want, rtol=tol, atol=tol)
        got = rlkern.gigpo_advantages(scores.cuda(), lengths.cuda().to(dtype), step_weight=0.3)
        want = R.sample_rewards(scores, lengths.double(), "gigpo", [0.3])
        torch.testing.assert_close(got.cpu().double(), want, rtol=tol, atol=tol)
        types = torch.randint(0, 3, (5001,))
        points = torch.rand(5001, 2, dtype=dtype)
        boxes = torch.cat([torch.rand(5001, 2, dtype=dtype) * 0.5, 0.5 + torch.rand(5001, 2, dtype=dtype) * 0.5], 1)
        fmt = torch.rand(5001) > 0.5
        got = rlkern.action_rewards(types.cuda(), types.flip(0).cuda(), points.cuda(), boxes.cuda(), fmt.cuda())
        want = R.action_rewards(types, types.flip(0), points, boxes, fmt.double())
        torch.testing.assert_close(got.cpu().double(), want, rtol=0, atol=0)


def test_triton_kernels_compile_for_sm90():
    compile_for_sm90("""
from rlkern.kernels import rewards as k
for dt in ("fp32", "fp64"):
    p = "*" + dt
    for method in range(2):
        build(k._sample_kernel, {"a_ptr": p, "b_ptr": p, "par_ptr": "*fp64", "out_ptr": p, "N": "i32"},
              {"METHOD": method, "BLOCK": 1024})
    for est in range(4):
        for packed in (False, True):
            build(k._kl_rewards_kernel, {"s_ptr": p, "lp_ptr": p, "ref_ptr": p, "m_ptr": "*u8", "cu_ptr": "*i32",
                                         "par_ptr": "*fp64", "out_ptr": p, "T": "i32"},
                  {"EST": est, "PACKED": packed, "BLOCK": 1024})
    build(k._action_kernel, {"pt_ptr": "*i64", "tt_ptr": "*i64", "xy_ptr": p, "box_ptr": p, "f_ptr": p, "out_ptr": p,
                             "N": "i32"}, {"BLOCK": 1024})
print("ok")
""")
