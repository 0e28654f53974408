"""The critic / value-based ops (rlkern/ops/critics.py): OREO's soft_bellman_loss. Every backend
against the float64 reference (rlkern/reference/critics.py), padded and packed, odd sizes, empty
rows and masks, hand-computed examples, gradcheck, torch.compile / opcheck, bad calls, sm_90
compiles of the Triton kernels and a CUDA run (marked gpu).
"""

import math

import pytest
import torch
from conftest import compile_for_sm90

import rlkern
from rlkern.reference import critics as reference


def _packed(mask, *tensors):
    """Cut each padded row after its last valid token + 1 (or to 1 token): packed tensors and cu."""
    lengths = torch.tensor([int(torch.nonzero(m).max()) + 2 if m.any() else 1 for m in mask]).clamp(max=mask.shape[1])
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    cut = lambda x: None if x is None else torch.cat([row[:k] for row, k in zip(x, lengths)])  # noqa: E731
    return cu, [cut(t) for t in (mask, *tensors)]


# ------------------------------------------------------------------------------------------------
# OREO: soft_bellman_loss

def _oreo_case(seed=0, rows=3, width=13, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(rows, width, generator=g, dtype=torch.float64) * 3
    ref = lp + torch.randn(rows, width, generator=g, dtype=torch.float64) * 0.4
    values = torch.randn(rows, width, generator=g, dtype=torch.float64)
    mask = torch.rand(rows, width, generator=g) > 0.3
    if rows > 1:
        mask[1] = False  # a response with no token
    rewards = torch.randn(rows, generator=g, dtype=torch.float64)
    lp = torch.where(mask, lp, float("nan"))  # never read
    values = torch.where(mask, values, float("nan"))
    return lp.to(dtype), mask, ref.to(dtype), values.to(dtype), rewards


def _oreo_grads(fn, lp, values):
    lp = lp.detach().clone().requires_grad_()
    values = values.detach().clone().requires_grad_()
    loss, metrics = fn(lp, values)
    loss.backward()
    return loss.detach(), metrics, lp.grad, values.grad


def test_soft_bellman_hand_computed():
    # one response of two tokens: lr = logprobs - ref = [0.5, -1], suffix sums S = [-0.5, -1]
    lp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.5, -1.0]], dtype=torch.float64)
    values = torch.tensor([[0.2, 0.5]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    beta, alpha, reward = 0.5, 0.3, 1.0
    e = [0.2 - reward + beta * -0.5, 0.5 - reward + beta * -1.0]  # -1.05, -1.0
    k3 = [math.exp(-0.5) + 0.5 - 1.0, math.exp(1.0) - 1.0 - 1.0]
    sq = (e[0] ** 2 + e[1] ** 2) / 2
    kl = (k3[0] + k3[1]) / 2
    loss, metrics, g_lp, g_v = _oreo_grads(
        lambda x, v: rlkern.soft_bellman_loss(x, mask, ref, v, torch.tensor([reward], dtype=torch.float64),
                                              beta=beta, kl_coef=alpha), lp, values)
    assert loss.item() == pytest.approx(2 * sq + alpha * kl, rel=1e-12)
    assert metrics["value_loss"].item() == pytest.approx(sq, rel=1e-6)
    assert metrics["kl"].item() == pytest.approx(kl, rel=1e-6)
    # d value_loss / d V_t = 2 e_t / T; d policy_loss / d lp_t = 2 beta e_t / T (later tokens' lr
    # are stop-gradient); d kl / d lp_t = (1 - exp(ref_t - lp_t)) / T
    assert g_v[0].tolist() == pytest.approx([e[0], e[1]], rel=1e-12)
    want = [beta * e[0] + alpha * (1 - math.exp(-0.5)) / 2, beta * e[1] + alpha * (1 - math.exp(1.0)) / 2]
    assert g_lp[0].tolist() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("width", [1, 13, 300])
def test_soft_bellman_matches_reference(backend, dtype, packed, width):
    lp, mask, ref, values, rewards = _oreo_case(seed=width, rows=4, width=width, dtype=dtype)
    kw = dict(beta=0.7, kl_coef=0.2)
    if packed:
        cu, (mask, lp, ref, values) = _packed(mask, lp, ref, values)
        extra = dict(cu_seqlens=cu)
    else:
        extra = {}
    ours = _oreo_grads(lambda x, v: rlkern.soft_bellman_loss(x, mask, ref, v, rewards.to(dtype), **kw, **extra),
                       lp, values)
    want = _oreo_grads(lambda x, v: reference.soft_bellman_loss(x, ref, v, rewards, mask, **kw,
                                                                cu_seqlens=extra.get("cu_seqlens")),
                       lp.double(), values.double())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    assert ours[0].dtype == dtype
    torch.testing.assert_close(ours[0].double(), want[0], **tol)
    for key in ("value_loss", "policy_loss", "kl"):
        assert ours[1][key].dtype == torch.float32
        torch.testing.assert_close(ours[1][key].double(), want[1][key], rtol=1e-5, atol=1e-6)
    valid = mask if mask is not None else torch.ones_like(lp, dtype=torch.bool)
    torch.testing.assert_close(torch.where(valid, ours[2], 0.0).double(), torch.where(valid, want[2], 0.0), **tol)
    torch.testing.assert_close(torch.where(valid, ours[3], 0.0).double(), torch.where(valid, want[3], 0.0), **tol)
    assert not ours[2][~valid].any() and not ours[3][~valid].any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_soft_bellman_low_precision_runs_a_kernel(backend, dtype, request):
    if backend == "torch":
        pytest.skip("the PyTorch backend is the reference")
    request.getfixturevalue("kernels_only")
    lp, mask, ref, values, rewards = _oreo_case(seed=3, rows=3, width=37, dtype=dtype)
    ours = _oreo_grads(lambda x, v: rlkern.soft_bellman_loss(x, mask, ref, v, rewards, beta=0.3, kl_coef=0.1),
                       lp, values)
    want = _oreo_grads(lambda x, v: reference.soft_bellman_loss(x, ref.double(), v, rewards, mask, beta=0.3,
                                                                kl_coef=0.1), lp.double(), values.double())
    assert ours[0].dtype == torch.float32 and ours[2].dtype == dtype and ours[3].dtype == dtype
    torch.testing.assert_close(ours[0].double(), want[0], rtol=1e-5, atol=1e-5)  # exact inputs, fp32 math
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3  # the gradient's rounding to the input dtype
    torch.testing.assert_close(torch.where(mask, ours[2], 0).double(), torch.where(mask, want[2], 0), rtol=tol,
                               atol=tol)


def test_soft_bellman_mixed_dtypes_and_packed_without_mask(backend):
    lp, mask, ref, values, rewards = _oreo_case(seed=5, rows=3, width=9)
    cu, (_, p_lp, p_ref, p_v) = _packed(torch.ones_like(mask), lp.nan_to_num(-1.0), ref, values.nan_to_num(0.5))
    ours = _oreo_grads(lambda x, v: rlkern.soft_bellman_loss(x, None, p_ref.float(), v, rewards.float(), beta=0.4,
                                                             cu_seqlens=cu.int()), p_lp.float(), p_v)
    want = _oreo_grads(lambda x, v: reference.soft_bellman_loss(x, p_ref.float(), v, rewards, None, beta=0.4,
                                                                cu_seqlens=cu), p_lp.float().double(), p_v)
    assert ours[3].dtype == torch.float64 and ours[2].dtype == torch.float32
    torch.testing.assert_close(ours[0].double(), want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[2].double(), want[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[3], want[3], rtol=1e-5, atol=1e-5)


def test_soft_bellman_empty(backend):
    lp, mask, ref, values, rewards = _oreo_case(seed=1, rows=2, width=5, dtype=torch.float32)
    loss, metrics, g_lp, g_v = _oreo_grads(
        lambda x, v: rlkern.soft_bellman_loss(x, torch.zeros_like(mask), ref, v, rewards, beta=0.5, kl_coef=1.0),
        lp, values)
    assert loss.item() == 0.0 and metrics["value_loss"].item() == 0.0
    assert not g_lp.any() and not g_v.any()
    empty = torch.zeros(0, 7)
    loss, _, g_lp, _ = _oreo_grads(
        lambda x, v: rlkern.soft_bellman_loss(x, empty.bool(), empty, v, torch.zeros(0), beta=0.5), empty, empty)
    assert loss.item() == 0.0 and g_lp.shape == (0, 7)


def test_soft_bellman_gradcheck(backend):
    # The losses are semi-gradients (stop-gradients on the other model's output and on later
    # tokens' log-ratios), so gradcheck runs where each pathway is an exact derivative: the value
    # rows as a function of the values alone, and the policy and KL rows as functions of the
    # log-probs on one-token rows (no later tokens to stop).
    from rlkern.ops import critics as op

    lp, mask, ref, values, rewards = _oreo_case(seed=2, rows=3, width=6)
    lp, values = lp.nan_to_num(-0.5), values.nan_to_num(0.1)
    cu, (p_mask, p_lp, p_ref, p_v) = _packed(mask, lp, ref, values)
    cu = cu.int()
    assert torch.autograd.gradcheck(lambda v: op._soft_bellman_op(lp, ref, v, mask, rewards, None, 0.6)[0],
                                    (values.clone().requires_grad_(),))
    assert torch.autograd.gradcheck(lambda v: op._soft_bellman_op(p_lp, p_ref, v, p_mask, rewards, cu, 0.6)[0],
                                    (p_v.clone().requires_grad_(),))
    ones = torch.arange(p_lp.shape[0] + 1, dtype=torch.int32)
    rew = torch.randn(p_lp.shape[0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: op._soft_bellman_op(x, p_ref, p_v, None, rew, ones, 0.6)[1:3],
                                    (p_lp.clone().requires_grad_(),))
    one = [t[:, :1].contiguous() for t in (lp, ref, values, mask)]
    assert torch.autograd.gradcheck(lambda x: op._soft_bellman_op(x, *one[1:], rewards, None, 0.6)[1:3],
                                    (one[0].requires_grad_(),))
    # the KL rows are an exact function of the log-probs in any layout
    assert torch.autograd.gradcheck(lambda x: op._soft_bellman_op(x, ref, values, mask, rewards, None, 0.6)[2],
                                    (lp.clone().requires_grad_(),))


def test_soft_bellman_compile_and_opcheck():
    lp, mask, ref, values, rewards = _oreo_case(seed=4, rows=3, width=7, dtype=torch.float32)
    lp, values = lp.nan_to_num(-0.5), values.nan_to_num(0.1)
    fn = lambda x, v: rlkern.soft_bellman_loss(x, mask, ref, v, rewards.float(), beta=0.3, kl_coef=0.5)[0]  # noqa: E731
    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="eager")(lp, values), fn(lp, values))
    from rlkern.ops import critics as op

    cu = torch.tensor([0, 3, 5, 9, 12], dtype=torch.int32)
    torch.library.opcheck(op._soft_bellman_op, (lp.requires_grad_(), ref, values.requires_grad_(), mask,
                                                rewards.float(), None, 0.3))
    x = torch.randn(12, dtype=torch.float64)
    v = torch.randn(12, dtype=torch.float64)
    torch.library.opcheck(op._soft_bellman_op, (x.requires_grad_(), x.detach() + 0.1, v, None,
                                                torch.randn(4, dtype=torch.float64), cu, 0.2))


BAD = [
    (lambda lp, m, r: rlkern.soft_bellman_loss(lp, None, lp, lp, r, beta=0.1), "response_mask is required"),
    (lambda lp, m, r: rlkern.soft_bellman_loss(lp, m, None, lp, r, beta=0.1), "ref_logprobs is required"),
    (lambda lp, m, r: rlkern.soft_bellman_loss(lp, m, lp, lp[:, :2], r, beta=0.1), "values must have shape"),
    (lambda lp, m, r: rlkern.soft_bellman_loss(lp, m, lp, lp, r[:2], beta=0.1), "rewards must have shape"),
    (lambda lp, m, r: rlkern.soft_bellman_loss(lp, m, lp, lp, r, beta=float("nan")), "beta must be"),
    (lambda lp, m, r: rlkern.soft_bellman_loss(lp, m, lp, lp, r, beta=0.1, kl_coef=-1.0), "kl_coef must be"),
    (lambda lp, m, r: rlkern.soft_bellman_loss(lp, m, lp.clone().requires_grad_(), lp, r, beta=0.1),
     "requires grad"),
    (lambda lp, m, r: rlkern.soft_bellman_loss(lp.long(), m, lp, lp, r, beta=0.1), "logprobs must be"),
    (lambda lp, m, r: rlkern.soft_bellman_loss(lp.flatten(), None, lp.flatten(), lp.flatten(), r, beta=0.1,
                                               cu_seqlens=torch.tensor([0, 5, 4, 20])), "cu_seqlens must rise"),
    (lambda lp, m, r: rlkern.soft_bellman_loss(lp, m, lp, lp, r), "beta"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_soft_bellman_bad_calls(case):
    lp, mask, rewards = torch.randn(3, 5), torch.ones(3, 5), torch.randn(3)
    call, match = BAD[case]
    with pytest.raises((ValueError, TypeError), match=match) as info:
        call(lp, mask, rewards)
    assert str(info.value).startswith("soft_bellman_loss"), str(info.value)


# ------------------------------------------------------------------------------------------------
# ArCHer: the utterance-level TD critic and token-level advantages are compositions of existing
# ops (rlkern.gae with lam=0 over per-turn tensors, rlkern.value_loss, rlkern.broadcast_to_tokens)

def test_archer_is_gae_lam0_over_turns_then_broadcast(backend):
    # one trajectory of three turns: rewards per turn, the target critic's V(s_h) per turn
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    target_v = torch.tensor([[0.2, 0.5, 0.7]])
    turns = torch.ones(1, 3, dtype=torch.bool)
    gamma = 0.9
    # TD target y_h = r_h + gamma * V(s_{h+1}) (0 after the last turn); advantage y_h - V(s_h)
    adv, y = rlkern.gae(rewards, target_v, turns, gamma=gamma, lam=0.0)
    want_y = [0.0 + gamma * 0.5, 0.0 + gamma * 0.7, 1.0]
    assert y[0].tolist() == pytest.approx(want_y, rel=1e-6)
    assert adv[0].tolist() == pytest.approx([want_y[0] - 0.2, want_y[1] - 0.5, want_y[2] - 0.7], rel=1e-6)
    # the critic's loss: 0.5 * mean_h (Q_h - y_h)^2 (no clipping)
    q = torch.tensor([[0.4, 0.6, 0.9]], requires_grad=True)
    loss, _ = rlkern.value_loss(q, y, q.detach(), turns, cliprange_value=1e9)
    want = 0.5 * sum((a - b) ** 2 for a, b in zip([0.4, 0.6, 0.9], want_y)) / 3
    assert loss.item() == pytest.approx(want, rel=1e-6)
    # token-level advantages: each utterance's tokens take its turn's advantage, the environment's
    # observation tokens (2 and 5) none
    tokens = rlkern.broadcast_to_tokens(adv[0], torch.tensor([0, 3, 6]), torch.tensor([2, 5, 9]), 9)
    a = adv[0].tolist()
    assert tokens.tolist() == pytest.approx([a[0], a[0], 0.0, a[1], a[1], 0.0, a[2], a[2], a[2]], rel=1e-6)


# ------------------------------------------------------------------------------------------------
# PPO-max: running_reward_norm

def test_running_reward_norm_hand_computed(backend):
    first = rlkern.running_reward_norm(torch.tensor([1.0, 3.0]))
    # count 2, mean 2, M2 = 1 + 1 = 2, population std 1
    assert first.stats.tolist() == pytest.approx([2.0, 2.0, 2.0], rel=1e-15)
    assert first.rewards.tolist() == pytest.approx([-1.0, 1.0], rel=1e-7)
    second = rlkern.running_reward_norm(torch.tensor([5.0]), first.stats, clip=1.0)
    # merged: count 3, mean 2 + 3 / 3 = 3, M2 = 2 + 0 + 3^2 * 2 * 1 / 3 = 8; (5 - 3) / sqrt(8 / 3) > 1: clipped
    assert second.stats.tolist() == pytest.approx([3.0, 3.0, 8.0], rel=1e-15)
    assert second.rewards.tolist() == [1.0]
    unclipped = rlkern.running_reward_norm(torch.tensor([5.0]), first.stats)
    assert unclipped.rewards.item() == pytest.approx(2.0 / math.sqrt(8.0 / 3.0), rel=1e-6)
    assert first.stats.tolist() == pytest.approx([2.0, 2.0, 2.0])  # the input state is not modified


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("size", [0, 1, 7, 1500])
def test_running_reward_norm_matches_reference(backend, dtype, size):
    g = torch.Generator().manual_seed(size)
    stats = None
    want_stats = torch.zeros(3, dtype=torch.float64)
    for step in range(3):
        r = (torch.randn(size, generator=g, dtype=torch.float64) * 3 + step).to(dtype)
        out = rlkern.running_reward_norm(r, stats, clip=2.5 if step else None)
        want, want_stats = reference.running_reward_norm(r, want_stats, clip=2.5 if step else None)
        assert out.rewards.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert out.stats.dtype == torch.float64
        torch.testing.assert_close(out.stats, want_stats, rtol=1e-12, atol=1e-12)
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        torch.testing.assert_close(out.rewards.double(), want, rtol=tol, atol=tol)
        stats = out.stats


def test_running_reward_norm_compile_and_opcheck():
    r = torch.randn(9)
    stats = torch.tensor([4.0, 0.5, 3.0], dtype=torch.float64)
    fn = lambda x, s: rlkern.running_reward_norm(x, s, clip=1.5)  # noqa: E731
    got = torch.compile(fn, fullgraph=True, backend="eager")(r, stats)
    torch.testing.assert_close(got.rewards, fn(r, stats).rewards)
    torch.testing.assert_close(got.stats, fn(r, stats).stats)
    from rlkern.ops import critics as op

    torch.library.opcheck(op._reward_norm_op, (r, stats, 1.5, 1e-8))
    torch.library.opcheck(op._reward_norm_op, (r.double(), stats, math.inf, 1e-8))


NORM_BAD = [
    (lambda r, s: rlkern.running_reward_norm(r[None]), "rewards must be"),
    (lambda r, s: rlkern.running_reward_norm(r, s.float()), "stats must be float64"),
    (lambda r, s: rlkern.running_reward_norm(r, s[:2]), "stats must be float64"),
    (lambda r, s: rlkern.running_reward_norm(r, -s), "count >= 0"),
    (lambda r, s: rlkern.running_reward_norm(r, s, clip=0.0), "clip must be"),
    (lambda r, s: rlkern.running_reward_norm(r, s, eps=-1.0), "eps must be"),
    (lambda r, s: rlkern.running_reward_norm(r.long(), s), "rewards must be"),
]


@pytest.mark.parametrize("case", range(len(NORM_BAD)))
def test_running_reward_norm_bad_calls(case):
    call, match = NORM_BAD[case]
    with pytest.raises((ValueError, TypeError), match=match) as info:
        call(torch.randn(4), torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64))
    assert str(info.value).startswith("running_reward_norm: "), str(info.value)


# ------------------------------------------------------------------------------------------------
# Direct Advantage Policy Optimization: step_advantage_loss

def test_step_advantage_loss_hand_computed(backend):
    lr = [0.5, -1.0, 0.25, 0.0, 1.0]
    ref = torch.tensor([[-1.0, -2.0, -0.5, -1.5, -3.0]])
    lp = (ref + torch.tensor([lr])).requires_grad_()
    ends = torch.tensor([[0, 1, 0, 1, 0]])  # steps {0, 1}, {2, 3}; the last valid token closes {4}
    adv = torch.tensor([[9.0, 0.1, 9.0, -0.2, 0.3]])  # read at the step ends only
    beta = 0.5
    loss, metrics = rlkern.step_advantage_loss(lp, torch.ones(1, 5), ref, adv, ends, beta=beta)
    e = [beta * -0.5 - 0.1, beta * 0.25 + 0.2, beta * 1.0 - 0.3]  # -0.35, 0.325, 0.2
    assert loss.item() == pytest.approx(sum(x * x for x in e) / 3, rel=1e-6)
    assert metrics["step_log_ratio"].item() == pytest.approx(beta * (-0.5 + 0.25 + 1.0) / 3, rel=1e-6)
    loss.backward()
    g = [2 * beta * x / 3 for x in e]
    assert lp.grad[0].tolist() == pytest.approx([g[0], g[0], g[1], g[1], g[2]], rel=1e-5)


def _step_case(seed, rows, width, dtype):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(rows, width, generator=g, dtype=torch.float64) * 2
    ref = lp + torch.randn(rows, width, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(rows, width, generator=g, dtype=torch.float64)
    mask = torch.rand(rows, width, generator=g) > 0.25
    ends = torch.rand(rows, width, generator=g) > 0.8
    if rows > 1:
        mask[1] = False
    lp = torch.where(mask, lp, float("nan"))
    return lp.to(dtype), mask, ref.to(dtype), adv.to(dtype), ends


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("width", [1, 13, 600])
def test_step_advantage_loss_matches_reference(backend, dtype, packed, width):
    lp, mask, ref, adv, ends = _step_case(width, 3, width, dtype)
    extra = {}
    if packed:
        cu, (mask, lp, ref, adv, ends) = _packed(mask, lp, ref, adv, ends)
        extra = dict(cu_seqlens=cu)
    x = lp.clone().requires_grad_()
    loss, metrics = rlkern.step_advantage_loss(x, mask, ref, adv, ends, beta=0.8, **extra)
    loss.backward()
    y = lp.double().requires_grad_()
    want, want_metrics = reference.step_advantage_loss(y, ref, adv, ends, mask, beta=0.8,
                                                       cu_seqlens=extra.get("cu_seqlens"))
    want.backward()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    assert loss.dtype == dtype
    torch.testing.assert_close(loss.double(), want.detach(), **tol)
    torch.testing.assert_close(metrics["step_log_ratio"].double(), want_metrics["step_log_ratio"], rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(torch.where(mask, x.grad, 0.0).double(), torch.where(mask, y.grad, 0.0), **tol)
    assert not x.grad[~mask].any()


def test_step_advantage_loss_bf16_runs_a_kernel(backend, request):
    if backend == "torch":
        pytest.skip("the PyTorch backend is the reference")
    request.getfixturevalue("kernels_only")
    lp, mask, ref, adv, ends = _step_case(4, 3, 45, torch.bfloat16)
    x = lp.clone().requires_grad_()
    loss, _ = rlkern.step_advantage_loss(x, mask, ref, adv, ends, beta=0.3)
    loss.backward()
    y = lp.double().requires_grad_()
    want, _ = reference.step_advantage_loss(y, ref, adv, ends, mask, beta=0.3)
    want.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.where(mask, x.grad, 0).double(), torch.where(mask, y.grad, 0), rtol=1e-2,
                               atol=1e-2)


def test_step_advantage_loss_empty_and_gradcheck(backend):
    lp, mask, ref, adv, ends = _step_case(7, 3, 5, torch.float64)
    ends[0, 1] = True  # row 0: at least two steps
    x = lp.clone().requires_grad_()
    loss, _ = rlkern.step_advantage_loss(x, torch.zeros_like(mask), ref, adv, ends, beta=0.5)
    loss.backward()
    assert loss.item() == 0.0 and not x.grad.any()
    lp = lp.nan_to_num(-0.7)
    cu, (p_mask, p_lp, p_ref, p_adv, p_ends) = _packed(mask, lp, ref, adv, ends)
    assert torch.autograd.gradcheck(lambda z: rlkern.step_advantage_loss(z, mask, ref, adv, ends, beta=0.5)[0],
                                    (lp.clone().requires_grad_(),))
    assert torch.autograd.gradcheck(
        lambda z: rlkern.step_advantage_loss(z, p_mask, p_ref, p_adv, p_ends, beta=0.5, cu_seqlens=cu)[0],
        (p_lp.clone().requires_grad_(),))


def test_step_advantage_loss_compile_and_opcheck():
    lp, mask, ref, adv, ends = _step_case(8, 3, 7, torch.float32)
    lp = lp.nan_to_num(-0.5)
    fn = lambda z: rlkern.step_advantage_loss(z, mask, ref, adv, ends, beta=0.4)[0]  # noqa: E731
    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="eager")(lp), fn(lp))
    from rlkern.ops import critics as op

    torch.library.opcheck(op._step_op, (lp.requires_grad_(), ref, adv, ends, mask, None, 0.4))
    cu = torch.tensor([0, 3, 5, 9, 12], dtype=torch.int32)
    x = torch.randn(12, dtype=torch.float64)
    torch.library.opcheck(op._step_op, (x.requires_grad_(), x.detach() - 0.2, torch.randn(12, dtype=torch.float64),
                                        torch.rand(12) > 0.5, None, cu, 0.3))


STEP_BAD = [
    (lambda lp, m: rlkern.step_advantage_loss(lp, None, lp, lp, m, beta=0.1), "response_mask is required"),
    (lambda lp, m: rlkern.step_advantage_loss(lp, m, lp, lp, None, beta=0.1), "step_ends is required"),
    (lambda lp, m: rlkern.step_advantage_loss(lp, m, lp, lp[:, :2], m, beta=0.1), "advantages must have shape"),
    (lambda lp, m: rlkern.step_advantage_loss(lp, m, lp, lp, m, beta=float("inf")), "beta must be"),
    (lambda lp, m: rlkern.step_advantage_loss(lp, m, lp, lp.clone().requires_grad_(), m, beta=0.1),
     "requires grad"),
    (lambda lp, m: rlkern.step_advantage_loss(lp.flatten(), None, lp.flatten(), lp.flatten(), m.flatten(),
                                              beta=0.1, cu_seqlens=torch.tensor([0, 4])), "cu_seqlens must rise"),
]


@pytest.mark.parametrize("case", range(len(STEP_BAD)))
def test_step_advantage_loss_bad_calls(case):
    call, match = STEP_BAD[case]
    with pytest.raises((ValueError, TypeError), match=match) as info:
        call(torch.randn(3, 5), torch.ones(3, 5))
    assert str(info.value).startswith("step_advantage_loss: "), str(info.value)


# ------------------------------------------------------------------------------------------------
# CGPO: constrained_rewards

def test_constrained_rewards_hand_computed(backend):
    rewards = torch.tensor([1.0, 3.0, 2.0, 0.5, 4.0, -1.0])
    judges = torch.tensor([[1, 1], [1, 0], [1, 1], [0, 1], [1, 1], [0, 0]])
    out = rlkern.constrained_rewards(rewards, ["a", "a", "a", "b", "b", "b"], judges)
    # satisfied: samples 0, 2, 4; CRPG zeroes the others
    assert out.rewards.tolist() == [1.0, 0.0, 2.0, 0.0, 4.0, 0.0]
    # prompt a: best satisfied 2 (2.0 > 1.0), worst violating 1; prompt b: 4, and 5 (-1.0 < 0.5)
    assert out.chosen.tolist() == [False, False, True, False, True, False]
    assert out.rejected.tolist() == [False, True, False, False, False, True]
    calibrated = rlkern.constrained_rewards(rewards, [0, 0, 0, 1, 1, 1], judges, torch.full((6,), 1.0))
    want = [1 / (1 + math.exp(-(r - 1.0))) if ok else 0.0 for r, ok in zip(rewards.tolist(), [1, 0, 1, 0, 1, 0])]
    assert calibrated.rewards.tolist() == pytest.approx(want, rel=1e-6)
    assert calibrated.chosen.tolist() == out.chosen.tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("size,groups,judges", [(0, 1, 2), (1, 1, 0), (9, 3, 3), (131, 17, 21)])
def test_constrained_rewards_matches_reference(backend, dtype, size, groups, judges):
    g = torch.Generator().manual_seed(size + judges)
    # few distinct rewards: ties must keep the first sample
    rewards = torch.randint(0, 5, (size,), generator=g).to(dtype)
    ids = torch.randint(0, groups, (size,), generator=g) * 7 + 3
    judged = torch.rand(size, judges, generator=g) > 0.2
    base = torch.randn(size, generator=g, dtype=torch.float64).to(dtype)
    for baseline in (None, base):
        out = rlkern.constrained_rewards(rewards, ids, judged, baseline)
        want = reference.constrained_rewards(rewards, ids, judged, baseline)
        assert out.rewards.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        torch.testing.assert_close(out.rewards.double(), want[0], rtol=tol, atol=tol)
        if baseline is None or dtype == torch.float64:  # float32 sigmoids may tie / split differently
            assert torch.equal(out.chosen, want[1]) and torch.equal(out.rejected, want[2])
        assert out.chosen.dtype == torch.bool and out.rejected.dtype == torch.bool


def test_constrained_rewards_compile_and_opcheck():
    rewards = torch.randn(8)
    judges = torch.rand(8, 3) > 0.3
    ids = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2])
    fn = lambda r: rlkern.constrained_rewards(r, ids, judges).rewards  # noqa: E731
    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="eager")(rewards), fn(rewards))
    from rlkern.ops import critics as op

    torch.library.opcheck(op._constrained_op, (rewards, ids, judges, None))
    torch.library.opcheck(op._constrained_op, (rewards.double(), ids, judges, torch.randn(8, dtype=torch.float64)))


CGPO_BAD = [
    (lambda r, j: rlkern.constrained_rewards(r[None], [0] * 4, j), "rewards must be"),
    (lambda r, j: rlkern.constrained_rewards(r, [0] * 3, j), "group_ids must have 4"),
    (lambda r, j: rlkern.constrained_rewards(r, [0] * 4, j[0]), "judges must be"),
    (lambda r, j: rlkern.constrained_rewards(r, [0] * 4, j[:2]), "judges must be"),
    (lambda r, j: rlkern.constrained_rewards(r, [0] * 4, j, r[:2]), "baseline_rewards must have"),
    (lambda r, j: rlkern.constrained_rewards(r.long(), [0] * 4, j), "rewards must be"),
]


@pytest.mark.parametrize("case", range(len(CGPO_BAD)))
def test_constrained_rewards_bad_calls(case):
    call, match = CGPO_BAD[case]
    with pytest.raises((ValueError, TypeError), match=match) as info:
        call(torch.randn(4), torch.ones(4, 2, dtype=torch.bool))
    assert str(info.value).startswith("constrained_rewards: "), str(info.value)


# ------------------------------------------------------------------------------------------------
# Triton: sm_90 compile, CUDA runs

def test_triton_kernels_compile_for_sm90():
    compile_for_sm90("""
from rlkern.kernels import critics as k
for fp64, dt in ((False, "bf16"), (False, "fp32"), (True, "fp64")):
    acc = "*fp64" if fp64 else "*fp32"
    t = "*" + dt
    s = {"lp_ptr": t, "ref_ptr": t, "v_ptr": t, "m_ptr": "*u8", "rew_ptr": acc, "cu_ptr": "*i32", "sq_ptr": acc,
         "kl_ptr": acc, "len_ptr": acc, "gv_ptr": acc, "gk_ptr": acc, "par_ptr": "*fp64", "T": "i64", "beta": "fp32"}
    for packed in (False, True):
        build(k._soft_bellman_kernel, s, {"HAS_MASK": True, "PACKED": packed, "FP64": fp64, "BLOCK": 256})
    s = {"r_ptr": t, "stats_ptr": "*fp64", "out_ptr": acc, "next_ptr": "*fp64", "par_ptr": "*fp64", "B": "i64"}
    build(k._reward_norm_kernel, s, {"BLOCK": 1024})
    s = {"r_ptr": t, "base_ptr": t, "j_ptr": "*u8", "c_ptr": acc, "sat_ptr": "*u8", "out_ptr": acc, "B": "i64",
         "J": "i64"}
    build(k._calibrate_kernel, s, {"HAS_BASE": True, "BLOCK": 128, "JBLOCK": 16})
    s = {"c_ptr": acc, "sat_ptr": "*u8", "g_ptr": "*i64", "chosen_ptr": "*u8", "rejected_ptr": "*u8", "B": "i64"}
    build(k._select_kernel, s, {"BI": 64, "BJ": 64})
    s = {"lp_ptr": t, "ref_ptr": t, "adv_ptr": t, "e_ptr": "*u8", "m_ptr": "*u8", "cu_ptr": "*i32", "sq_ptr": acc,
         "ratio_ptr": acc, "steps_ptr": acc, "g_ptr": acc, "par_ptr": "*fp64", "T": "i64", "beta": "fp32"}
    for packed in (False, True):
        build(k._step_loss_kernel, s, {"HAS_MASK": True, "PACKED": packed, "FP64": fp64, "BLOCK": 256})
print("ok")
""")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cuda_matches_reference(dtype):
    lp, mask, ref, values, rewards = _oreo_case(seed=11, rows=16, width=2049, dtype=dtype)
    cuda = lambda t: t.cuda()  # noqa: E731
    ours = _oreo_grads(lambda x, v: rlkern.soft_bellman_loss(x, cuda(mask), cuda(ref), v, cuda(rewards), beta=0.2,
                                                             kl_coef=0.1), cuda(lp), cuda(values))
    want = _oreo_grads(lambda x, v: reference.soft_bellman_loss(x, ref, v, rewards, mask, beta=0.2, kl_coef=0.1),
                       lp.double(), values.double())
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(ours[0].cpu().double(), want[0], rtol=tol, atol=tol)
    torch.testing.assert_close(torch.where(cuda(mask), ours[3], 0).cpu().double(), torch.where(mask, want[3], 0),
                               rtol=tol, atol=tol)


@pytest.mark.gpu
def test_cuda_reward_norm_constrained_and_step_loss():
    g = torch.Generator().manual_seed(3)
    r = torch.randn(5000, generator=g)
    out = rlkern.running_reward_norm(r.cuda(), torch.tensor([10.0, 0.3, 7.0], dtype=torch.float64).cuda(), clip=3.0)
    want, want_stats = reference.running_reward_norm(r, torch.tensor([10.0, 0.3, 7.0]), clip=3.0)
    torch.testing.assert_close(out.rewards.cpu().double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.stats.cpu(), want_stats, rtol=1e-12, atol=1e-9)
    rewards = torch.randint(0, 7, (3000,), generator=g).float()
    ids = torch.randint(0, 300, (3000,), generator=g)
    judges = torch.rand(3000, 5, generator=g) > 0.1
    got = rlkern.constrained_rewards(rewards.cuda(), ids.cuda(), judges.cuda())
    want = reference.constrained_rewards(rewards, ids, judges)
    torch.testing.assert_close(got.rewards.cpu().double(), want[0])
    assert torch.equal(got.chosen.cpu(), want[1]) and torch.equal(got.rejected.cpu(), want[2])
    lp, mask, ref, adv, ends = _step_case(5, 8, 3001, torch.float32)
    x = lp.cuda().requires_grad_()
    loss, _ = rlkern.step_advantage_loss(x, mask.cuda(), ref.cuda(), adv.cuda(), ends.cuda(), beta=0.2)
    loss.backward()
    y = lp.double().requires_grad_()
    want_loss, _ = reference.step_advantage_loss(y, ref, adv, ends, mask, beta=0.2)
    want_loss.backward()
    torch.testing.assert_close(loss.cpu().double(), want_loss.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.where(mask, x.grad.cpu(), 0).double(), torch.where(mask, y.grad, 0), rtol=1e-4,
                               atol=1e-4)
