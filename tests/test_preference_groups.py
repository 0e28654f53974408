"""rlkern.group_preference_loss and rlkern.group_weights: each paper's formula on a small example
computed by hand (Python floats, written out here), every backend against the float64 reference
(odd group sizes, groups of one, equal scores, no sample), gradcheck in float64, half inputs, the
bad-call table, opcheck / torch.compile, the sm_90 build of the Triton kernels and a CUDA run."""

import math

import pytest
import torch

import rlkern
from conftest import compile_for_sm90
from rlkern.ops.preference_groups import METRIC_KEYS
from rlkern.reference import preference_groups as reference

LOSS_TYPES = reference.LOSS_TYPES
KW = dict(beta=0.3, clip_eps=0.2, kl_coef=0.05)


def sp(x):
    return math.log1p(math.exp(x))


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def _loss(x, ids, s, ref=None, old=None, **kw):
    x = x.detach().clone().requires_grad_()
    loss, metrics = rlkern.group_preference_loss(x, ids, s, ref, old, **kw)
    (grad,) = torch.autograd.grad(loss, x)
    return loss, grad, metrics


def _oracle(x, ids, s, ref=None, old=None, *, loss_type, beta=0.1, clip_eps=0.2, kl_coef=0.01):
    x64 = x.detach().double().requires_grad_()
    up = (lambda t: None if t is None else t.double())
    loss, metrics = reference.group_preference_loss(x64, rlkern.group_index(ids), s.double(), up(ref), up(old),
                                                    loss_type=loss_type, beta=beta, clip_eps=clip_eps,
                                                    kl_coef=kl_coef)
    (grad,) = torch.autograd.grad(loss, x64)
    return loss, grad, metrics


def _batch(n=23, seed=0, dtype=torch.float64, levels=3):
    """Groups of sizes 1, 2, 3, 5, 5, 7 (odd), scores with ties, log-probs of a sequence's size."""
    g = torch.Generator().manual_seed(seed)
    if n == 23:
        ids = torch.cat([torch.full((k,), i) for i, k in enumerate([5, 1, 3, 7, 2, 5])])
    else:
        ids = torch.randint(0, max(2, n // 6), (n,), generator=g)
    ids = ids[torch.randperm(ids.numel(), generator=g)]  # members of a group are not contiguous
    n = ids.numel()
    x = -torch.rand(n, generator=g, dtype=torch.float64) * 30
    ref = x + torch.randn(n, generator=g, dtype=torch.float64) * 2
    old = x + torch.randn(n, generator=g, dtype=torch.float64) * 0.4
    s = torch.randint(0, levels, (n,), generator=g).double() * 0.5
    return x.to(dtype), ids, s, ref, old


# ------------------------------------------------------------------------------------------------
# hand-computed examples


def test_tpo_by_hand(backend):
    # one list of 3 (scores 2, 1, 0) and a list of one (no pair): beta 1, no reference, r = x.
    x = torch.tensor([-1.0, -2.0, -0.5, -4.0], dtype=torch.float64)
    ids = torch.tensor([0, 0, 0, 1])
    s = torch.tensor([2.0, 1.0, 0.0, 5.0], dtype=torch.float64)
    loss, grad, metrics = _loss(x, ids, s, loss_type="tpo", beta=1.0)
    # descending ranks of r = (-1, -2, -0.5): 2, 3, 1 -> 1 / log2(1 + tau) = 1/log2(3), 1/2, 1
    d0, d1, d2 = 1 / math.log2(3), 0.5, 1.0
    l01 = abs(4 - 2) * abs(d0 - d1)  # |2^2 - 2^1| * |1/D(2) - 1/D(3)|
    l02 = abs(4 - 1) * abs(d0 - d2)
    l12 = abs(2 - 1) * abs(d1 - d2)
    want = (l01 * sp(-1.0) + l02 * sp(0.5) + l12 * sp(1.5)) / 2  # r_0 - r_1 = 1, r_0 - r_2 = -0.5, r_1 - r_2 = -1.5
    assert loss.item() == pytest.approx(want, rel=1e-12)
    g0 = -(l01 * sig(-1.0) + l02 * sig(0.5)) / 2
    g1 = (l01 * sig(-1.0) - l12 * sig(1.5)) / 2
    g2 = (l02 * sig(0.5) + l12 * sig(1.5)) / 2
    assert grad.tolist() == pytest.approx([g0, g1, g2, 0.0], rel=1e-12, abs=1e-15)
    assert metrics["pair_accuracy"].item() == pytest.approx(1 / 3)  # only r_0 > r_1 of the 3 ordered pairs


def test_p3o_by_hand(backend):
    # one pair, scores 1 / 0 (A = +-1), eps 0.2
    x = torch.tensor([-1.0, -2.0], dtype=torch.float64)
    ids = [7, 7]
    s = torch.tensor([1.0, 0.0], dtype=torch.float64)
    # on-policy: rho = 1 both ways, terms -1 and +1; d/dx_0 = (-A rho - (A rho)) / 2 = -1
    loss, grad, metrics = _loss(x, ids, s, loss_type="p3o", clip_eps=0.2)
    assert loss.item() == pytest.approx(0.0, abs=1e-15)
    assert grad.tolist() == pytest.approx([-1.0, 1.0], rel=1e-12)
    assert metrics["clip_fraction"].item() == 0.0
    # old log-probs -1.5, -1.5: rho_01 = e, max(-e, -1.2) = -1.2; rho_10 = 1/e, max(1/e, 0.8) = 0.8: both clipped
    old = torch.tensor([-1.5, -1.5], dtype=torch.float64)
    loss, grad, metrics = _loss(x, ids, s, None, old, loss_type="p3o", clip_eps=0.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2, rel=1e-12)
    assert grad.tolist() == [0.0, 0.0]
    assert metrics["clip_fraction"].item() == 1.0
    # old -1.1, -1.9: rho_01 = e^0.0 ... x - old = 0.1, -0.1: rho_01 = e^0.2 (1.2214 > 1.2: clipped, -1.2 >
    # -1.2214), rho_10 = e^-0.2 = 0.8187 (inside): term 0.8187, d/dx_1 of it = -A rho = 0.8187 -> grads
    old = torch.tensor([-1.1, -1.9], dtype=torch.float64)
    loss, grad, _ = _loss(x, ids, s, None, old, loss_type="p3o", clip_eps=0.2)
    r10 = math.exp(-0.2)
    assert loss.item() == pytest.approx((-1.2 + r10) / 2, rel=1e-12)
    assert grad.tolist() == pytest.approx([-r10 / 2, r10 / 2], rel=1e-12)


def test_trpa_by_hand(backend):
    # one group: levels 1, 0, 0 -> pairs (0, 1), (0, 2); beta 0.5, kl_coef 0.1
    x = torch.tensor([-1.0, -2.0, -3.0], dtype=torch.float64)
    ref = torch.tensor([-1.5, -1.5, -2.5], dtype=torch.float64)
    s = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    loss, grad, metrics = _loss(x, [0, 0, 0], s, ref, loss_type="trpa", beta=0.5, kl_coef=0.1)
    # r = 0.5 (x - ref) = 0.25, -0.25, -0.25; both pairs softplus(-0.5); ref - x = -0.5, 0.5, 0.5
    k3 = [math.exp(v) - v - 1 for v in (-0.5, 0.5, 0.5)]
    assert loss.item() == pytest.approx(sp(-0.5) + 0.1 * sum(k3) / 3, rel=1e-12)
    dk = [0.1 * (1 - math.exp(v)) / 3 for v in (-0.5, 0.5, 0.5)]
    g = 0.5 * sig(-0.5) / 2  # each pair: d/dr_i = -sigmoid(-(r_i - r_j)), mean over 2 pairs, dr/dx = 0.5
    assert grad.tolist() == pytest.approx([-2 * g + dk[0], g + dk[1], g + dk[2]], rel=1e-12)
    assert metrics["pair_accuracy"].item() == 1.0
    assert metrics["rewards/mean"].item() == pytest.approx((0.25 - 0.5) / 3, rel=1e-6)


def test_brain_by_hand(backend):
    # one group of 2 sampled on-policy from the reference (x = ref = old), scores 1 / 0, beta 1:
    # alpha = softmax(1, 0), baseline weights 1/2; loss = -sum(alpha x) + log mean e^0 = 1
    x = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    s = torch.tensor([1.0, 0.0], dtype=torch.float64)
    loss, grad, _ = _loss(x, [3, 3], s, x.clone(), x.clone(), loss_type="brain", beta=1.0)
    a0 = math.e / (math.e + 1)
    assert loss.item() == pytest.approx(1.0, rel=1e-12)
    assert grad.tolist() == pytest.approx([0.5 - a0, 0.5 - (1 - a0)], rel=1e-12)
    w = rlkern.group_weights(s, [3, 3], x.clone(), x.clone(), method="brain", beta=1.0)
    assert w.tolist() == pytest.approx([a0, 1 - a0], rel=1e-12)


def test_spo_win_rates_by_hand(backend):
    s = torch.tensor([3.0, 1.0, 3.0, 0.0, 9.0])
    w = rlkern.group_weights(s, ["a", "a", "a", "a", "b"], method="win_rate")
    assert w.tolist() == pytest.approx([2.5 / 3, 1 / 3, 2.5 / 3, 0.0, 0.5], rel=1e-6)
    # a judge's matrix P[i, j] = P(i beats j), intransitive (0 > 1 > 2 > 0); row 3 is another prompt
    p = torch.tensor([[0.5, 0.9, 0.2, 0.7], [0.1, 0.5, 0.8, 0.7], [0.8, 0.2, 0.5, 0.7], [0.3, 0.3, 0.3, 0.5]],
                     dtype=torch.float64)
    w = rlkern.group_weights(p, [0, 0, 0, 1], method="win_rate")
    assert w.tolist() == pytest.approx([(0.9 + 0.2) / 2, (0.1 + 0.8) / 2, (0.8 + 0.2) / 2, 0.5], rel=1e-12)


def test_rso_acceptance_by_hand(backend):
    s = torch.tensor([1.0, 0.5, 0.0, 2.0, 2.0], dtype=torch.float64)
    w = rlkern.group_weights(s, [0, 0, 0, 1, 1], method="rso", beta=0.5)
    assert w.tolist() == pytest.approx([1.0, math.exp(-1.0), math.exp(-2.0), 1.0, 1.0], rel=1e-12)


def test_srpo_by_hand(backend):
    # beta 1, alpha 0.8, no reference; columns chosen, rejected, c|r, r|r, c|c, r|c
    x = torch.tensor([[-1.0, -2.0, -0.5, -1.5, -0.25, -2.0]], dtype=torch.float64)
    xg = x.clone().requires_grad_()
    loss, metrics = rlkern.srpo_loss(xg, torch.zeros_like(x), beta=1.0, alpha=0.8)
    (grad,) = torch.autograd.grad(loss, xg)
    u = 0.5 - (-0.5 - -1.5)  # -0.5
    v = 0.5 - (-0.25 - -2.0)  # -1.25
    w = (-0.5 + -1.0) - (-2.0 + -2.0) - 1  # 1.5
    assert loss.item() == pytest.approx(0.2 * w * w + 0.8 * (u * u + v * v), rel=1e-12)  # 1.9
    dw, du, dv = 2 * 0.2 * w, -2 * 0.8 * u, -2 * 0.8 * v
    assert grad[0].tolist() == pytest.approx([dw, -dw, dw + du, -du, dv, -dw - dv], rel=1e-12)
    assert metrics["loss/self_improvement"].item() == pytest.approx(u * u + v * v)
    assert metrics["loss/generative"].item() == pytest.approx(w * w)
    assert metrics["rewards/margins"].item() == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------
# every backend against the reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_the_reference(backend, loss_type, dtype):
    x, ids, s, ref, old = _batch(dtype=dtype)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    loss, grad, metrics = _loss(x, ids, s, ref.to(compute), old.to(compute), loss_type=loss_type, **KW)
    want_loss, want_grad, want_metrics = _oracle(x, ids, s, ref, old, loss_type=loss_type, **KW)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    assert loss.dtype == grad.dtype == compute
    torch.testing.assert_close(loss.double(), want_loss.detach(), **tol)
    torch.testing.assert_close(grad.double(), want_grad, **tol)
    for key in METRIC_KEYS:
        torch.testing.assert_close(metrics[key].double(), want_metrics[key].double(), rtol=2e-5, atol=1e-6)
        assert metrics[key].dtype == torch.float32


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_many_blocks_unsorted_groups_and_defaults(backend, loss_type, monkeypatch):
    if backend == "triton":  # group scans in steps of 4 lanes: groups of up to 12 carry across steps
        monkeypatch.setattr("rlkern.kernels.preference_groups.MAX_BLOCK", 4)
    x, ids, s, _, _ = _batch(n=37, seed=3)
    loss, grad, _ = _loss(x, ids, s, loss_type=loss_type)  # no ref, on-policy old
    want_loss, want_grad, _ = _oracle(x, ids, s, loss_type=loss_type)
    torch.testing.assert_close(loss, want_loss.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradcheck_float64(backend, loss_type):
    x, ids, s, ref, old = _batch(n=9, seed=5)
    x = (x / 10).requires_grad_()  # moderate ratios: p3o's clip edges stay away from the finite differences
    old = x.detach() + torch.linspace(-0.1, 0.12, x.numel(), dtype=torch.float64)

    def f(t):
        return rlkern.group_preference_loss(t, ids, s, ref / 10, old, loss_type=loss_type, **KW)[0]

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["win_rate", "win_rate_matrix", "rso", "brain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weights_match_the_reference(backend, method, dtype, monkeypatch):
    if backend == "triton":  # group scans in steps of 4 lanes
        monkeypatch.setattr("rlkern.kernels.preference_groups.MAX_BLOCK", 4)
    x, ids, s, ref, old = _batch(n=37, seed=7)
    scores = torch.rand(ids.numel(), ids.numel(), dtype=torch.float64) if method == "win_rate_matrix" else s * 3
    m = "win_rate" if method == "win_rate_matrix" else method
    w = rlkern.group_weights(scores.to(dtype), ids, ref.to(dtype), old.to(dtype), method=m, beta=0.7)
    want = reference.group_weights(scores.to(dtype), rlkern.group_index(ids), ref.to(dtype), old.to(dtype), method=m,
                                   beta=0.7)
    assert w.dtype == dtype
    torch.testing.assert_close(w, want, rtol=1e-10 if dtype == torch.float64 else 2e-6, atol=1e-12)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_no_sample_groups_of_one_and_equal_scores(backend, loss_type):
    empty = torch.zeros(0, dtype=torch.float64)
    loss, grad, metrics = _loss(empty, torch.zeros(0, dtype=torch.int64), empty, loss_type=loss_type)
    assert loss.item() == 0.0 and grad.shape == (0,) and all(v.item() == 0.0 for v in metrics.values())
    assert rlkern.group_weights(empty, [], method="win_rate").shape == (0,)
    x, _, _, ref, _ = _batch(n=9, seed=2)
    alone = torch.arange(9)
    equal = torch.full((9,), 0.5, dtype=torch.float64)
    for ids, s in ((alone, torch.rand(9, dtype=torch.float64)), (torch.zeros(9, dtype=torch.int64), equal)):
        loss, grad, _ = _loss(x, ids, s, ref, loss_type=loss_type, **KW)
        want_loss, want_grad, _ = _oracle(x, ids, s, ref, loss_type=loss_type, **KW)
        torch.testing.assert_close(loss, want_loss.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)
        if loss_type in ("tpo", "p3o"):  # no pair with a score difference: nothing to learn
            assert loss.item() == 0.0 and not grad.any()
    assert rlkern.group_weights(torch.rand(9), alone, method="win_rate").eq(0.5).all()
    assert rlkern.group_weights(torch.rand(9), alone, method="rso").eq(1.0).all()


def test_tpo_tied_rewards_rank_by_batch_order(backend):
    # every r equal: TPO's ranks (and so lambda) come from the tie-break alone, batch order in every backend
    ids = torch.tensor([1, 0, 1, 0, 1, 1, 0])
    s = torch.tensor([0.0, 2.0, 1.0, 0.5, 3.0, 2.0, 1.0], dtype=torch.float64)
    x = torch.full((7,), -3.0, dtype=torch.float64)
    loss, grad, _ = _loss(x, ids, s, loss_type="tpo", beta=0.5)
    want_loss, want_grad, _ = _oracle(x, ids, s, loss_type="tpo", beta=0.5)
    torch.testing.assert_close(loss, want_loss.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-14)
    assert loss.item() > 0


def test_cpp_groups_in_parallel_match_the_reference():
    # 150 groups: more than one parallel task of 64 groups, on two threads
    g = torch.Generator().manual_seed(21)
    ids = torch.randint(0, 150, (600,), generator=g)
    x = -torch.rand(600, generator=g, dtype=torch.float64) * 20
    s = torch.randint(0, 4, (600,), generator=g).double()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = [_loss(x, ids, s, x + 1, loss_type=t) for t in LOSS_TYPES]
        weights = rlkern.group_weights(s, ids, method="win_rate")
    finally:
        torch.set_num_threads(threads)
    for loss_type, (loss, grad, _) in zip(LOSS_TYPES, got):
        want_loss, want_grad, _ = _oracle(x, ids, s, x + 1, loss_type=loss_type)
        torch.testing.assert_close(loss, want_loss.detach(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-14)
    want = reference.group_weights(s, rlkern.group_index(ids), method="win_rate", beta=0.1)
    torch.testing.assert_close(weights, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_compute_in_float32(backend, dtype):
    x, ids, s, ref, old = _batch(seed=4)
    x = (x / 10).to(dtype)
    for loss_type in LOSS_TYPES:
        loss, grad, _ = _loss(x, ids, s, ref.float() / 10, old.float() / 10, loss_type=loss_type, **KW)
        assert loss.dtype == torch.float32 and grad.dtype == dtype
        want_loss, want_grad, _ = _oracle(x, ids, s, ref / 10, old / 10, loss_type=loss_type, **KW)
        torch.testing.assert_close(loss.double(), want_loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad.double(), want_grad.to(dtype).double(), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_every_dtype_runs_a_kernel(backend, dtype, kernels_only):
    if backend == "torch":
        pytest.skip("the reference is the torch backend")
    x, ids, s, ref, old = _batch(n=9, seed=1)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    for loss_type in LOSS_TYPES:
        loss, grad, _ = _loss((x / 10).to(dtype), ids, s, ref.to(compute) / 10, old.to(compute) / 10,
                              loss_type=loss_type)
        assert loss.dtype == compute and grad.dtype == dtype
    assert rlkern.group_weights(s.to(compute), ids, method="rso").dtype == compute
    srpo, _ = rlkern.srpo_loss(torch.zeros(2, 6, dtype=dtype), torch.zeros(2, 6, dtype=compute))
    assert srpo.dtype == compute


def test_string_group_ids_and_numpy():
    np = pytest.importorskip("numpy")
    x, ids, s, ref, old = _batch(seed=6)
    names = [f"prompt-{int(i)}" for i in ids]
    a = rlkern.group_preference_loss(x, names, s, ref, old, loss_type="tpo")[0]
    b = rlkern.group_preference_loss(x, np.array(names), s, ref, old, loss_type="tpo")[0]
    c = rlkern.group_preference_loss(x, ids, s, ref, old, loss_type="tpo")[0]
    assert a.item() == b.item() == c.item()


@pytest.mark.parametrize("call, message", [
    (lambda x, s: rlkern.group_preference_loss(x, [0, 0, 1], s, loss_type="dpo"), "loss_type must be one of"),
    (lambda x, s: rlkern.group_preference_loss(x, [0, 0], s), "group_ids must have 3 entries"),
    (lambda x, s: rlkern.group_preference_loss(x, [0, 0, 1], s[:2]), "scores must have shape"),
    (lambda x, s: rlkern.group_preference_loss(x, [0, 0, 1], s, beta=0), "beta must be"),
    (lambda x, s: rlkern.group_preference_loss(x, [0, 0, 1], s, clip_eps=1.5), "clip_eps must be"),
    (lambda x, s: rlkern.group_preference_loss(x, [0, 0, 1], s, kl_coef=-1.0), "kl_coef must be"),
    (lambda x, s: rlkern.group_preference_loss(x, [0, 0, 1], s.requires_grad_()), "scores requires grad"),
    (lambda x, s: rlkern.group_preference_loss(x[None], [0, 0, 1], s), "logps must be [N]"),
    (lambda x, s: rlkern.group_preference_loss(x, [0, 0, 1], None), "scores must be a torch.Tensor"),
    (lambda x, s: rlkern.group_preference_loss(x, [0, 0, 1], s.long()), "scores must be"),
    (lambda x, s: rlkern.group_weights(s, [0, 0, 1], method="win"), "method must be one of"),
    (lambda x, s: rlkern.group_weights(torch.rand(3, 3), [0, 0, 1], method="rso"), "scores must be [N]"),
    (lambda x, s: rlkern.group_weights(s, [0, 0, 1], x[:2], method="brain"), "ref_logps must have shape"),
    (lambda x, s: rlkern.group_weights(s, [0, 1.5, 1]), "group_ids must hold only str or only int"),
])
def test_bad_calls(call, message):
    x, s = torch.randn(3), torch.randn(3)
    with pytest.raises((ValueError, TypeError), match="^(group_preference_loss|group_weights): ") as info:
        call(x, s)
    assert message in str(info.value)


def test_opcheck_and_compile():
    x, ids, s, ref, old = _batch(n=9, seed=8)
    inverse = rlkern.group_index(ids)
    from rlkern.ops import preference_groups as ops

    for code in range(len(LOSS_TYPES)):
        torch.library.opcheck(ops._loss_op, (x.clone().requires_grad_(), ref, old, s, inverse, code,
                                             [0.3, 0.2, 0.05]))
    torch.library.opcheck(ops._weights_op, (s, ref, old, inverse, 1, 0.5))

    def f(t):
        return rlkern.group_preference_loss(t, inverse, s, ref, old, loss_type="trpa")[0]

    xe = x.clone().requires_grad_()
    xc = x.clone().requires_grad_()
    eager = f(xe)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(xc)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(torch.autograd.grad(compiled, xc)[0], torch.autograd.grad(eager, xe)[0])


def test_triton_kernels_compile_for_sm90():
    compile_for_sm90("""
from rlkern.kernels import preference_groups as k
layout = {"order_ptr": "*i64", "lo_ptr": "*i64", "hi_ptr": "*i64"}
for fp64, dt in ((False, "bf16"), (False, "fp32"), (True, "fp64")):
    c = "*fp64" if fp64 else "*fp32"
    build(k._rank_kernel, {"x_ptr": "*" + dt, "ref_ptr": c, **layout, "out_ptr": c, "N": "i32", "beta": "fp64"},
          {"BLOCK": 64})
    for loss in range(4):
        build(k._group_loss_kernel, {"x_ptr": "*" + dt, "ref_ptr": c, "old_ptr": c, "s_ptr": c, **layout,
                                     "disc_ptr": c, "out_ptr": c, "N": "i32", "beta": "fp64", "eps": "fp64"},
              {"LOSS": loss, "BLOCK": 64})
    for method in range(4):
        build(k._group_weights_kernel, {"s_ptr": c, "ref_ptr": c, "old_ptr": c, **layout, "out_ptr": c, "N": "i32",
                                        "beta": "fp64"}, {"METHOD": method, "BLOCK": 64})
print("ok")
""")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_triton_on_cuda_matches_the_reference(dtype):
    x, ids, s, ref, old = _batch(n=3001, seed=9)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    x = (x / 10).to(dtype)
    for loss_type in LOSS_TYPES:
        loss, grad, metrics = _loss(x.cuda(), ids.cuda(), s.cuda(), (ref / 10).to(compute).cuda(),
                                    (old / 10).to(compute).cuda(), loss_type=loss_type, **KW)
        want_loss, want_grad, want_metrics = _oracle(x, ids, s, ref / 10, old / 10, loss_type=loss_type, **KW)
        tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loss.double().cpu(), want_loss.detach(), **tol)
        torch.testing.assert_close(grad.double().cpu(), want_grad.to(dtype).double(),
                                   **(tol if dtype != torch.bfloat16 else dict(rtol=1e-2, atol=1e-4)))
        for key in METRIC_KEYS:
            torch.testing.assert_close(metrics[key].double().cpu(), want_metrics[key].double(), rtol=1e-4, atol=1e-5)
    for method in ("win_rate", "rso", "brain"):
        w = rlkern.group_weights((s * 3).cuda(), ids.cuda(), ref.cuda(), old.cuda(), method=method, beta=0.7)
        want = reference.group_weights(s * 3, rlkern.group_index(ids), ref, old, method=method, beta=0.7)
        torch.testing.assert_close(w.cpu(), want, rtol=1e-10, atol=1e-12)


def _srpo_batch(n, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = -torch.rand(n, 6, generator=g, dtype=torch.float64) * 20
    ref = x + torch.randn(n, 6, generator=g, dtype=torch.float64)
    return x.to(dtype), ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("n", [0, 1, 37])
def test_srpo_matches_the_reference(backend, dtype, n, monkeypatch):
    if backend == "triton":  # 37 pairs in blocks of 16
        monkeypatch.setattr("rlkern.kernels.preference_groups.MAX_BLOCK", 16)
    x, ref = _srpo_batch(n, seed=n, dtype=dtype)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    xg = x.clone().requires_grad_()
    loss, metrics = rlkern.srpo_loss(xg, ref.to(compute), beta=0.2, alpha=0.6)
    (grad,) = torch.autograd.grad(loss, xg)
    x64 = x.double().requires_grad_()
    want, want_metrics = reference.srpo_loss(x64, ref, beta=0.2, alpha=0.6)
    (want_grad,) = torch.autograd.grad(want, x64)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    assert loss.dtype == compute and grad.dtype == dtype
    torch.testing.assert_close(loss.double(), want.detach(), **tol)
    torch.testing.assert_close(grad.double(), want_grad.to(dtype).double(),
                               **(tol if dtype != torch.bfloat16 else dict(rtol=1e-2, atol=1e-4)))
    for key in reference.SRPO_METRIC_KEYS:
        torch.testing.assert_close(metrics[key].double(), want_metrics[key].double(), rtol=2e-5, atol=1e-6)


def test_srpo_gradcheck_float64(backend):
    x, ref = _srpo_batch(5, seed=11)
    x = x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: rlkern.srpo_loss(t, ref, beta=0.3, alpha=0.7)[0], (x,), eps=1e-6,
                                    atol=1e-7)


@pytest.mark.parametrize("call, message", [
    (lambda x: rlkern.srpo_loss(x[:, :5], x[:, :5]), "logps must be [B, 6]"),
    (lambda x: rlkern.srpo_loss(x, x[:2]), "ref_logps must have shape"),
    (lambda x: rlkern.srpo_loss(x, None), "ref_logps must be a torch.Tensor"),
    (lambda x: rlkern.srpo_loss(x, x, alpha=1.5), "alpha must be"),
    (lambda x: rlkern.srpo_loss(x, x, beta=-0.1), "beta must be"),
    (lambda x: rlkern.srpo_loss(x, x.clone().requires_grad_()), "ref_logps requires grad"),
])
def test_srpo_bad_calls(call, message):
    with pytest.raises((ValueError, TypeError), match="^srpo_loss: ") as info:
        call(torch.randn(3, 6))
    assert message in str(info.value)


def test_srpo_opcheck_and_triton_compiles_for_sm90():
    x, ref = _srpo_batch(7, seed=12)
    from rlkern.ops import preference_groups as ops

    torch.library.opcheck(ops._srpo_op, (x.clone().requires_grad_(), ref, 0.2, 0.6))
    compile_for_sm90("""
from rlkern.kernels import preference_groups as k
for dt, c in (("bf16", "*fp32"), ("fp32", "*fp32"), ("fp64", "*fp64")):
    build(k._srpo_kernel, {"x_ptr": "*" + dt, "ref_ptr": c, "loss_ptr": c, "g_ptr": c, "met_ptr": c, "B": "i32",
                           "beta": "fp64", "alpha": "fp64"}, {"BLOCK": 128})
print("ok")
""")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_srpo_triton_on_cuda_matches_the_reference(dtype):
    x, ref = _srpo_batch(3001, seed=13, dtype=dtype)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    xg = x.cuda().requires_grad_()
    loss, _ = rlkern.srpo_loss(xg, ref.to(compute).cuda(), beta=0.2, alpha=0.6)
    (grad,) = torch.autograd.grad(loss, xg)
    x64 = x.double().requires_grad_()
    want, _ = reference.srpo_loss(x64, ref, beta=0.2, alpha=0.6)
    (want_grad,) = torch.autograd.grad(want, x64)
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss.double().cpu(), want.detach(), **tol)
    torch.testing.assert_close(grad.double().cpu(), want_grad, **tol)
