"""rlkern.preference_loss: every backend against the float64 reference (loss, gradients, metrics,
gradcheck), against TRL 1.16's own DPOTrainer._compute_loss for every loss type and modifier, and
the edge cases (margins of +-1e4, equal log-probs, one pair, no pair, reference-free).

TRL's loss is a method that runs the model: the trainer is built without one
(``object.__new__``, the attributes the method reads set by hand, as tests/test_trl_loss.py does
for GRPO) and called with a stub model whose ``log_probs`` are fixed per-token log-probs that
require grad, and precomputed reference log-probs.
"""

import math
import types
from collections import defaultdict

import pytest
import torch

import rlkern
from conftest import compile_for_sm90, import_peer
from rlkern.ops.preference import METRIC_KEYS
from rlkern.reference import preference as reference
from rlkern.reference.preference import DPO_LOSS_TYPES, F_DIVERGENCE_LOSS_TYPES

# the DPOTrainer's loss types (with reference log-probs); CPO's simpo and ORPO's orpo have their own tests below
LOSS_TYPES = DPO_LOSS_TYPES

SMOOTHED = ("exo_pair", "robust", "aot", "aot_unpaired")  # the loss types that read label_smoothing


def _smoothing(loss_type):
    return 0.15 if loss_type in SMOOTHED else 0.0


def _pairs(n=7, seed=0, dtype=torch.float64, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    c = -torch.rand(n, generator=g, dtype=torch.float64) * 20
    r = -torch.rand(n, generator=g, dtype=torch.float64) * 20
    rc = c + torch.randn(n, generator=g, dtype=torch.float64) * spread
    rr = r + torch.randn(n, generator=g, dtype=torch.float64) * spread
    nc = torch.randint(0, 12, (n,), generator=g)
    nr = torch.randint(1, 12, (n,), generator=g)
    pw = torch.rand(n, generator=g, dtype=torch.float64) + 0.2
    return c.to(dtype), r.to(dtype), rc.to(dtype), rr.to(dtype), nc, nr, pw


def _kwargs(loss_type, **extra):
    kw = dict(loss_type=loss_type, beta=0.3, label_smoothing=_smoothing(loss_type))
    kw.update(extra)
    return kw


def _ours(c, r, rc, rr, **kw):
    c = c.detach().clone().requires_grad_()
    r = r.detach().clone().requires_grad_()
    loss, metrics = rlkern.preference_loss(c, r, rc, rr, **kw)
    gc, gr = torch.autograd.grad(loss, (c, r), allow_unused=True, materialize_grads=True)
    return loss, gc, gr, metrics


def _oracle(c, r, rc, rr, **kw):
    c = c.detach().double().requires_grad_()
    r = r.detach().double().requires_grad_()
    rc = None if rc is None else rc.double()
    rr = None if rr is None else rr.double()
    kw = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    loss, metrics = reference.preference_loss(c, r, rc, rr, **kw)
    gc, gr = torch.autograd.grad(loss, (c, r), allow_unused=True, materialize_grads=True)
    return loss, gc, gr, metrics


def _compare(ours, oracle, *, rtol, atol):
    loss, gc, gr, metrics = ours
    want_loss, want_gc, want_gr, want_metrics = oracle
    torch.testing.assert_close(loss.double(), want_loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(gc.double(), want_gc, rtol=rtol, atol=atol)
    torch.testing.assert_close(gr.double(), want_gr, rtol=rtol, atol=atol)
    # TRL's keys; with orpo also ORPO's log_odds_ratio / log_odds_chosen (the oracle has them too)
    assert set(metrics) == set(want_metrics) and set(METRIC_KEYS) <= set(metrics)
    for key in want_metrics:
        assert metrics[key].ndim == 0 and metrics[key].dtype == torch.float32
        torch.testing.assert_close(metrics[key].double(), want_metrics[key], rtol=max(rtol, 2e-6), atol=max(atol, 1e-6),
                                   msg=key)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_loss_type_matches_the_reference(backend, loss_type, dtype):
    c, r, rc, rr, nc, nr, pw = _pairs(dtype=dtype)
    weights = None if loss_type in ("aot", "aot_unpaired") else pw.to(dtype)
    kw = _kwargs(loss_type, chosen_lengths=nc, rejected_lengths=nr, pair_weights=weights)
    ours = _ours(c, r, rc, rr, **kw)
    assert ours[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    _compare(ours, _oracle(c, r, rc, rr, **kw), **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_many_blocks_and_every_loss_type_at_once(backend, dtype, monkeypatch):
    if backend == "triton":  # 37 pairs in blocks of 16: the carried sums and the aot gathers across blocks
        from rlkern.kernels import preference as kernel

        monkeypatch.setattr(kernel, "MAX_BLOCK", 16)
    c, r, rc, rr, nc, nr, _ = _pairs(n=37, seed=9, dtype=dtype, spread=1.0)
    kw = dict(loss_type=list(LOSS_TYPES), loss_weights=[0.2 + 0.05 * k for k in range(len(LOSS_TYPES))], beta=0.3,
              label_smoothing=0.1, chosen_lengths=nc, rejected_lengths=nr)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    _compare(_ours(c, r, rc, rr, **kw), _oracle(c, r, rc, rr, **kw), **tol)


@pytest.mark.parametrize("f_divergence_type,coef", [("reverse_kl", 1.0), ("forward_kl", 1.0), ("js_divergence", 1.0),
                                                    ("alpha_divergence", 0.5), ("alpha_divergence", 1.0),
                                                    ("alpha_divergence", 1.7)])
def test_f_divergences_with_a_weighted_loss_list(backend, f_divergence_type, coef):
    c, r, rc, rr, nc, nr, pw = _pairs(n=9, seed=1, spread=0.7)
    types_ = list(F_DIVERGENCE_LOSS_TYPES)
    weights = [0.5 + 0.25 * k for k in range(len(types_))]
    kw = dict(loss_type=types_, loss_weights=weights, beta=0.2, label_smoothing=0.1,
              f_divergence_type=f_divergence_type, f_alpha_divergence_coef=coef, chosen_lengths=nc,
              rejected_lengths=nr, pair_weights=pw)
    _compare(_ours(c, r, rc, rr, **kw), _oracle(c, r, rc, rr, **kw), rtol=1e-10, atol=1e-12)
    # float32: the reference's float32 clamp (80) applies, the float64 oracle sees the same numbers
    c32, r32, rc32, rr32 = (t.float() for t in (c, r, rc, rr))
    _compare(_ours(c32, r32, rc32, rr32, **kw), _oracle(c32, r32, rc32, rr32, **kw), rtol=2e-5, atol=2e-6)


def test_gradcheck_every_loss_type_float64(backend):
    c, r, rc, rr, nc, nr, _ = _pairs(n=5, seed=2, spread=1.0)
    c.requires_grad_()
    r.requires_grad_()
    weights = [0.3 + 0.1 * k for k in range(len(LOSS_TYPES))]

    def f(a, b):
        return rlkern.preference_loss(a, b, rc, rr, loss_type=list(LOSS_TYPES), loss_weights=weights, beta=0.7,
                                      label_smoothing=0.2, chosen_lengths=nc, rejected_lengths=nr)[0]

    assert torch.autograd.gradcheck(f, (c, r))


@pytest.mark.parametrize("f_divergence_type", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_gradcheck_f_divergences_float64(backend, f_divergence_type):
    c, r, rc, rr, nc, nr, pw = _pairs(n=6, seed=3, spread=0.5)
    c.requires_grad_()
    r.requires_grad_()

    def f(a, b):
        return rlkern.preference_loss(a, b, rc, rr, loss_type=list(F_DIVERGENCE_LOSS_TYPES), beta=0.4,
                                      label_smoothing=0.1, f_divergence_type=f_divergence_type,
                                      f_alpha_divergence_coef=0.6, chosen_lengths=nc, rejected_lengths=nr,
                                      pair_weights=pw)[0]

    assert torch.autograd.gradcheck(f, (c, r))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_compute_in_float32(backend, dtype):
    c, r, rc, rr, nc, nr, pw = _pairs(n=11, seed=4, dtype=dtype, spread=1.0)
    kw = dict(loss_type=["sigmoid", "ipo", "aot", "discopop"], beta=0.2, label_smoothing=0.1, chosen_lengths=nc,
              rejected_lengths=nr, f_divergence_type="reverse_kl")
    ours = _ours(c, r, rc.float(), rr.float(), **kw)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == dtype
    loss, gc, gr, metrics = _oracle(c, r, rc, rr, **kw)
    # the kernels see the same half values as the oracle: only the gradient's rounding to dtype differs
    _compare((ours[0], ours[1].float(), ours[2].float(), ours[3]), (loss, gc.to(dtype).double(), gr.to(dtype).double(),
             metrics), rtol=2e-5, atol=2e-6)


SAFE = ("sigmoid", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "aot", "aot_unpaired", "apo_zero",
        "apo_down", "discopop", "sigmoid_norm")


@pytest.mark.parametrize("margin", [1e4, -1e4])
def test_huge_margins_stay_finite(backend, margin):
    c = torch.tensor([-1.0, -2.0, -5.0])
    r = c - margin
    rc = torch.zeros(3)
    ones = torch.ones(3)
    for loss_type in SAFE:
        kw = _kwargs(loss_type, chosen_lengths=ones, rejected_lengths=ones, beta=1.0)
        ours = _ours(c, r, rc, rc, **kw)
        for t in (ours[0], ours[1], ours[2], *ours[3].values()):
            assert torch.isfinite(t).all(), (loss_type, t)
        _compare(ours, _oracle(c, r, rc, rc, **kw), rtol=2e-5, atol=2e-6)


def test_equal_logps_one_pair_and_no_pair(backend):
    c = torch.tensor([-3.5, -1.25, -7.0])
    ones = torch.ones(3)
    for loss_type in LOSS_TYPES:
        kw = _kwargs(loss_type, chosen_lengths=ones, rejected_lengths=ones)
        ours = _ours(c, c, c, c, **kw)
        _compare(ours, _oracle(c, c, c, c, **kw), rtol=2e-5, atol=2e-6)
        assert float(ours[3]["rewards/accuracies"]) == 0.0  # ties are not wins, as in TRL
        one = _ours(c[:1], c[:1] - 2, c[:1] + 1, c[:1], **dict(kw, chosen_lengths=ones[:1], rejected_lengths=ones[:1]))
        _compare(one, _oracle(c[:1], c[:1] - 2, c[:1] + 1, c[:1],
                              **dict(kw, chosen_lengths=ones[:1], rejected_lengths=ones[:1])), rtol=2e-5, atol=2e-6)
        empty = torch.zeros(0)
        loss, gc, gr, metrics = _ours(empty, empty, empty, empty, **dict(kw, chosen_lengths=empty,
                                                                         rejected_lengths=empty))
        assert float(loss.detach()) == 0.0 and gc.shape == (0,) and all(float(v) == 0.0 for v in metrics.values())


def test_reference_free_is_a_zero_reference(backend):
    c, r, *_ = _pairs(n=5, seed=5, dtype=torch.float32)
    zeros = torch.zeros(5)
    for loss_type in ("sigmoid", "aot", "apo_zero", "sppo_hard"):
        kw = _kwargs(loss_type)
        free = _ours(c, r, None, None, **kw)
        _compare(free, _oracle(c, r, zeros, zeros, **kw), rtol=2e-5, atol=2e-6)


def test_metrics_are_independent_and_backward_scales():
    c, r, rc, rr, *_ = _pairs(n=4, seed=6, dtype=torch.float32)
    c.requires_grad_()
    loss, metrics = rlkern.preference_loss(c, r, rc, rr)
    assert all(not v.requires_grad and v.dtype == torch.float32 for v in metrics.values())
    metrics["rewards/chosen"].zero_()  # a caller's in-place write reaches no other output
    assert float(metrics["rewards/rejected"]) != 0.0 and loss.grad_fn is not None
    (3.0 * loss).backward()
    _, want, _, _ = _oracle(c, r, rc, rr, loss_type="sigmoid", beta=0.1)
    torch.testing.assert_close(c.grad.double(), 3.0 * want, rtol=2e-5, atol=2e-7)


@pytest.mark.parametrize("bad,message", [
    (dict(loss_type="dpo"), "loss_type must be one of"),
    (dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0]), "loss_weights must be a list of 2"),
    (dict(beta=0.0), "beta must be"),
    (dict(label_smoothing=0.7), "label_smoothing must be"),
    (dict(loss_type="exo_pair"), "label_smoothing must be > 0"),
    (dict(loss_type="robust", label_smoothing=0.5), "label_smoothing must be < 0.5"),
    (dict(loss_type="ipo"), "needs chosen_lengths"),
    (dict(loss_type="aot", f_divergence_type="js_divergence"), "only valid with"),
    (dict(f_divergence_type="kl"), "f_divergence_type must be one of"),
    (dict(loss_type="aot", pair_weights=torch.ones(3)), "pair_weights cannot"),
    (dict(chosen_lengths=torch.ones(2)), "chosen_lengths must have shape"),
])
def test_bad_calls(bad, message):
    c = torch.randn(3)
    with pytest.raises((TypeError, ValueError), match=message) as info:
        rlkern.preference_loss(c, c, c, c, **bad)
    assert str(info.value).startswith("preference_loss: ")


def test_bad_tensors():
    c = torch.randn(3)
    with pytest.raises(TypeError, match="rejected_logps must have chosen_logps' dtype"):
        rlkern.preference_loss(c, c.double())
    with pytest.raises(ValueError, match="must be \\[B\\]"):
        rlkern.preference_loss(c[None], c[None])
    with pytest.raises(ValueError, match="given together"):
        rlkern.preference_loss(c, c, c)
    with pytest.raises(ValueError, match="ref_chosen_logps requires grad"):
        rlkern.preference_loss(c, c, c.clone().requires_grad_(), c)


def test_torch_compile_and_opcheck():
    c, r, rc, rr, nc, nr, pw = _pairs(n=6, seed=7, dtype=torch.float32)
    kw = dict(loss_type=["sigmoid", "ipo", "aot"], loss_weights=[1.0, 0.5, 0.25], label_smoothing=0.1,
              chosen_lengths=nc, rejected_lengths=nr)
    eager = rlkern.preference_loss(c, r, rc, rr, **kw)
    compiled = torch.compile(lambda *a: rlkern.preference_loss(*a, **kw), fullgraph=True, backend="eager")(
        c, r, rc, rr)
    torch.testing.assert_close(compiled[0], eager[0])
    from rlkern.ops import preference as op

    zeros = torch.zeros(6)
    args = (c.requires_grad_(), r.requires_grad_(), zeros, rc, rr, zeros, zeros, zeros + 1, nc.float(), nr.float(),
            pw.float(), [0, 2, 8], [1.0, 0.5, 0.25],
            [0.1, 0.1, 0.0, 1.0, 0.05, 80.0, 0.5, 1e-5, 0.1, 0.1, 0.1, 0.5, 0.0, 0.0])
    torch.library.opcheck(op._preference_op, args)


# ------------------------------------------------------------------------------------------------
# TRL 1.16's own DPOTrainer._compute_loss

def _trl_loss(per_token, mask, ref_c, ref_r, *, loss_type="sigmoid", beta=0.1, label_smoothing=0.0,
              f_divergence_type="reverse_kl", f_alpha_divergence_coef=1.0, discopop_tau=0.05, loss_weights=None,
              log_sum_sq_probs=None):
    dpo = import_peer("trl.trainer.dpo_trainer")
    trainer = object.__new__(dpo.DPOTrainer)
    pairs2, width = per_token.shape
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    identity = lambda x, **_: x  # noqa: E731  (one process: accelerate's gathers are the identity)
    trainer.__dict__.update(
        model=types.SimpleNamespace(training=True), aux_loss_enabled=False, beta=beta, loss_types=loss_types,
        loss_weights=loss_weights or [1.0] * len(loss_types), ld_alpha=None, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef, label_smoothing=label_smoothing,
        use_weighting=log_sum_sq_probs is not None, precompute_ref_logps=True,
        args=types.SimpleNamespace(discopop_tau=discopop_tau), _total_train_tokens=0, _tp_size=1,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        accelerator=types.SimpleNamespace(gather=identity, gather_for_metrics=identity, device=torch.device("cpu")))
    # the completion starts after one prompt token: TRL's unshifted (ipo, sigmoid_norm) and shifted
    # (sft, WPO) completion masks then count the same tokens
    completion_mask = torch.cat([torch.zeros(pairs2, 1, dtype=torch.long), mask.long()], 1)
    zeros = torch.zeros(pairs2, width)

    def model(**_):
        return types.SimpleNamespace(
            log_probs=per_token * mask, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(),
            log_sum_sq_probs=zeros if log_sum_sq_probs is None else log_sum_sq_probs)

    inputs = dict(input_ids=torch.zeros(pairs2, width + 1, dtype=torch.long), completion_mask=completion_mask,
                  attention_mask=torch.ones(pairs2, width + 1, dtype=torch.long), ref_chosen_logps=ref_c,
                  ref_rejected_logps=ref_r)
    loss = trainer._compute_loss(model, inputs, False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def _trl_case(seed=0, n=6, width=9):
    g = torch.Generator().manual_seed(seed)
    per_token = -torch.rand(2 * n, width, generator=g) * 3
    mask = torch.rand(2 * n, width, generator=g) > 0.3
    mask[:, 0] = True
    ref = (per_token * mask).sum(1) + torch.randn(2 * n, generator=g) * 1.5
    return per_token, mask, ref[:n].contiguous(), ref[n:].contiguous()


def _check_against_trl(per_token, mask, ref_c, ref_r, *, pair_weights=None, log_sum_sq_probs=None, **kw):
    n = ref_c.numel()
    leaf = per_token.clone().requires_grad_()
    trl_loss, trl_metrics = _trl_loss(leaf, mask, ref_c, ref_r, log_sum_sq_probs=log_sum_sq_probs, **kw)
    trl_grad = torch.autograd.grad(trl_loss, leaf)[0]
    lengths = mask.sum(1)
    logps = (per_token * mask).sum(1)
    loss, gc, gr, metrics = _ours(logps[:n], logps[n:], ref_c, ref_r, chosen_lengths=lengths[:n],
                                  rejected_lengths=lengths[n:], pair_weights=pair_weights, **kw)
    torch.testing.assert_close(loss, trl_loss.float(), rtol=2e-5, atol=2e-6)
    # every token of a completion gets its sequence's gradient (TRL sums the token log-probs)
    ours_grad = torch.cat([gc, gr])[:, None].expand_as(trl_grad)
    torch.testing.assert_close(ours_grad[mask], trl_grad[mask], rtol=2e-5, atol=2e-7)
    for key in METRIC_KEYS:
        assert math.isclose(float(metrics[key]), trl_metrics[key], rel_tol=2e-5, abs_tol=2e-6), key


@pytest.mark.peer
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_matches_trl(backend, loss_type):
    _check_against_trl(*_trl_case(), **_kwargs(loss_type))


@pytest.mark.peer
@pytest.mark.parametrize("f_divergence_type,coef", [("forward_kl", 1.0), ("js_divergence", 1.0),
                                                    ("alpha_divergence", 0.5), ("alpha_divergence", 1.5)])
def test_f_divergences_match_trl(backend, f_divergence_type, coef):
    per_token, mask, ref_c, ref_r = _trl_case(seed=1)
    # log-ratios of order 1: forward_kl's exp(-log-ratio) stays in range
    logps = (per_token * mask).sum(1)
    ref_c, ref_r = logps[:6] + 0.8 * torch.randn(6), logps[6:] + 0.8 * torch.randn(6)
    _check_against_trl(per_token, mask, ref_c, ref_r, loss_type=list(F_DIVERGENCE_LOSS_TYPES), beta=0.25,
                       label_smoothing=0.05, f_divergence_type=f_divergence_type, f_alpha_divergence_coef=coef)


@pytest.mark.peer
def test_mpo_loss_list_and_wpo_weighting_match_trl(backend):
    per_token, mask, ref_c, ref_r = _trl_case(seed=2)
    lss = per_token - torch.rand(per_token.shape) * 0.5  # log sum_v p_v^2 <= log p of the label
    _check_against_trl(per_token, mask, ref_c, ref_r, loss_type=["sigmoid", "bco_pair", "sft"],
                       loss_weights=[0.8, 0.2, 1.0], beta=0.2)
    # WPO: the caller's weights are TRL's exp(mean aligned log-prob) of chosen times rejected
    lengths = mask.sum(1).clamp(min=1)
    weights = torch.exp(((per_token - lss) * mask).sum(1) / lengths)
    pair_weights = weights[:6] * weights[6:]
    # (not with sft: TRL 1.16 scales its expanded sft loss in place, which raises)
    _check_against_trl(per_token, mask, ref_c, ref_r, loss_type=["sigmoid", "ipo", "apo_zero"],
                       loss_weights=[1.0, 0.5, 0.3], pair_weights=pair_weights, log_sum_sq_probs=lss)


def test_triton_kernel_compiles_for_sm90():
    compile_for_sm90("""
from rlkern.kernels import preference as k
ptrs = ("rc_ptr", "rr_ptr", "ac_ptr", "ar_ptr", "ne_ptr", "nc_ptr", "nr_ptr", "pw_ptr", "loss_ptr", "gc_ptr",
        "gr_ptr", "ge_ptr", "met_ptr")
sig = {"c_ptr": "", "r_ptr": "", "ex_ptr": "", "perm_ptr": "*i64", "B": "i32"}
scalars = (["beta", "ls", "alpha", "tau", "clamp", "log_pw", "log_pl"] + ["w_" + t for t in k.LOSS_TYPES]
           + ["gamma", "xpo_alpha", "vpo_alpha", "inpo_tau", "inpo_eta", "cpl_lambda", "alpha_po"])
for types, fdiv, fp64, dt in ((0x1FFFF, 0, False, "bf16"), (0x50FF, 3, False, "fp32"), (0x1FFFF, 2, True, "fp64")):
    s = dict(sig, **{n: "*fp64" if fp64 else "*fp32" for n in ptrs}, **{n: "fp64" for n in scalars})
    s["c_ptr"] = s["r_ptr"] = s["ex_ptr"] = "*" + dt
    build(k._preference_kernel, s, {"TYPES": types, "FDIV": fdiv, "FP64": fp64, "BLOCK": 128, "ALPHAPO": fdiv == 0,
                                    "AVG": types & 1 == 1})
print("ok")
""")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 37, 3001])
def test_triton_on_cuda_matches_the_reference(dtype, n):
    c, r, rc, rr, nc, nr, _ = _pairs(n=n, seed=8, dtype=dtype, spread=1.0)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    rc, rr = rc.to(compute), rr.to(compute)
    kw = dict(loss_type=list(LOSS_TYPES), loss_weights=[0.2 + 0.05 * k for k in range(len(LOSS_TYPES))], beta=0.3,
              label_smoothing=0.1, chosen_lengths=nc, rejected_lengths=nr)
    cuda = [t.cuda() for t in (c, r, rc, rr)]
    ours = _ours(*cuda, **dict(kw, chosen_lengths=nc.cuda(), rejected_lengths=nr.cuda()))
    want = _oracle(c, r, rc, rr, **kw)
    loss, gc, gr, metrics = ours
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    if dtype == torch.bfloat16:  # the gradient is rounded to the input dtype
        want = (want[0], want[1].to(dtype).double(), want[2].to(dtype).double(), want[3])
        tol = dict(rtol=1e-2, atol=1e-5)
    _compare((loss.cpu(), gc.cpu(), gr.cpu(), {k: v.cpu() for k, v in metrics.items()}), want, **tol)


# ------------------------------------------------------------------------------------------------
# Liger's and OpenRLHF's own sequence-level DPO losses

LIGER_TYPES = ("sigmoid", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero", "apo_down",
               "discopop")


@pytest.mark.peer
@pytest.mark.parametrize("loss_type", LIGER_TYPES)
def test_matches_liger_dpo_loss_fn(backend, loss_type):
    liger = import_peer("liger_kernel.chunked_loss.dpo_loss")
    c, r, rc, rr, *_ = _pairs(n=7, seed=10, dtype=torch.float32, spread=2.0)
    kw = _kwargs(loss_type)
    leaves = [c.clone().requires_grad_(), r.clone().requires_grad_()]
    loss, chosen_rewards, rejected_rewards = liger.LigerFusedLinearDPOFunction.preference_loss_fn(
        *leaves, torch.zeros(14, 3), rc, rr, **kw)
    want = torch.autograd.grad(loss, leaves)
    ours, gc, gr, metrics = _ours(c, r, rc, rr, **kw)
    torch.testing.assert_close(ours, loss, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(gc, want[0], rtol=2e-5, atol=2e-7)
    torch.testing.assert_close(gr, want[1], rtol=2e-5, atol=2e-7)
    torch.testing.assert_close(metrics["rewards/chosen"], chosen_rewards.mean(), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(metrics["rewards/rejected"], rejected_rewards.mean(), rtol=2e-5, atol=2e-6)


@pytest.mark.peer
@pytest.mark.parametrize("ipo", [False, True])
def test_matches_openrlhf_dpo_loss(backend, ipo):
    from test_policy_loss import _openrlhf_loss_module  # loads openrlhf/models/loss.py without flash_attn

    loss_module = _openrlhf_loss_module()
    c, r, rc, rr, *_ = _pairs(n=7, seed=11, dtype=torch.float32, spread=2.0)
    leaves = [c.clone().requires_grad_(), r.clone().requires_grad_()]
    loss, chosen_rewards, rejected_rewards = loss_module.DPOLoss(0.3, ipo=ipo)(*leaves, rc, rr)
    want = torch.autograd.grad(loss, leaves)
    # OpenRLHF's IPO is TRL's without the length normalization: lengths of 1
    ones = torch.ones(7)
    ours, gc, gr, metrics = _ours(c, r, rc, rr, loss_type="ipo" if ipo else "sigmoid", beta=0.3, chosen_lengths=ones,
                                  rejected_lengths=ones)
    torch.testing.assert_close(ours, loss, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(gc, want[0], rtol=2e-5, atol=2e-7)
    torch.testing.assert_close(gr, want[1], rtol=2e-5, atol=2e-7)
    torch.testing.assert_close(metrics["rewards/margins"], (chosen_rewards - rejected_rewards).mean(), rtol=2e-5,
                               atol=2e-6)


# ------------------------------------------------------------------------------------------------
# TRL 1.16's experimental CPO (simpo) and ORPO (orpo) losses: reference-free, length-averaged

FREE_TYPES = ("simpo", "orpo")


def _free_pairs(n=7, seed=12, dtype=torch.float64):
    c, r, _, _, nc, nr, pw = _pairs(n=n, seed=seed, dtype=dtype)
    return c, r, nc, nr, pw


@pytest.mark.parametrize("loss_type", FREE_TYPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_simpo_and_orpo_match_the_reference(backend, loss_type, dtype):
    c, r, nc, nr, pw = _free_pairs(dtype=dtype)
    kw = dict(loss_type=loss_type, beta=0.7, label_smoothing=0.15, simpo_gamma=0.3, chosen_lengths=nc,
              rejected_lengths=nr, pair_weights=pw.to(dtype))
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    _compare(_ours(c, r, None, None, **kw), _oracle(c, r, None, None, **kw), **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpo_and_orpo_lists_in_many_blocks(backend, dtype, monkeypatch):
    if backend == "triton":
        from rlkern.kernels import preference as kernel

        monkeypatch.setattr(kernel, "MAX_BLOCK", 16)
    c, r, nc, nr, _ = _free_pairs(n=37, seed=13, dtype=dtype)
    # every loss type CPO's trainer can build (reference-free) and ORPO's, with the NLL (sft)
    kw = dict(loss_type=["simpo", "orpo", "sft", "sigmoid", "hinge", "ipo"],
              loss_weights=[1.0, 0.7, 0.4, 0.3, 0.2, 0.1],
              beta=0.3, label_smoothing=0.1, simpo_gamma=0.8, chosen_lengths=nc, rejected_lengths=nr)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    _compare(_ours(c, r, None, None, **kw), _oracle(c, r, None, None, **kw), **tol)


def test_gradcheck_simpo_orpo_float64(backend):
    c, r, nc, nr, pw = _free_pairs(n=5, seed=14)
    c.requires_grad_()
    r.requires_grad_()

    def f(a, b):
        return rlkern.preference_loss(a, b, loss_type=["simpo", "orpo", "sft"], loss_weights=[1.0, 0.6, 0.3],
                                      beta=0.9, label_smoothing=0.2, simpo_gamma=0.4, chosen_lengths=nc,
                                      rejected_lengths=nr, pair_weights=pw)[0]

    assert torch.autograd.gradcheck(f, (c, r))


def test_simpo_orpo_edge_cases(backend):
    ones = torch.ones(3)
    for loss_type in FREE_TYPES:
        kw = dict(loss_type=loss_type, beta=1.0, label_smoothing=0.1, chosen_lengths=ones, rejected_lengths=ones)
        # margins of +-1e4 (log-probs stay < 0); orpo near log-prob 0 (odds of a certain completion)
        for c, r in ((torch.tensor([-1.0, -2.0, -1e-6]), torch.tensor([-1e4, -1e4, -3.0])),
                     (torch.tensor([-1e4, -1e4, -3.0]), torch.tensor([-1.0, -2.0, -1e-6]))):
            ours = _ours(c, r, None, None, **kw)
            for t in (ours[0], ours[1], ours[2], *ours[3].values()):
                assert torch.isfinite(t).all(), (loss_type, t)
            _compare(ours, _oracle(c, r, None, None, **kw), rtol=2e-5, atol=2e-6)
        c = torch.tensor([-3.5, -1.25, -7.0])
        ours = _ours(c, c, None, None, **kw)  # equal log-probs
        _compare(ours, _oracle(c, c, None, None, **kw), rtol=2e-5, atol=2e-6)
        assert float(ours[3]["rewards/accuracies"]) == 0.0
        one = dict(kw, chosen_lengths=ones[:1] * 4, rejected_lengths=ones[:1] * 2)
        _compare(_ours(c[:1], c[:1] - 2, None, None, **one), _oracle(c[:1], c[:1] - 2, None, None, **one), rtol=2e-5,
                 atol=2e-6)
        empty = torch.zeros(0)
        loss, gc, _, metrics = _ours(empty, empty, None, None, **dict(kw, chosen_lengths=empty, rejected_lengths=empty))
        assert float(loss.detach()) == 0.0 and gc.shape == (0,) and all(float(v) == 0.0 for v in metrics.values())


@pytest.mark.parametrize("bad,message", [
    (dict(loss_type="simpo"), "needs chosen_lengths"),
    (dict(loss_type="orpo", chosen_lengths=torch.ones(3)), "needs rejected_lengths"),
    (dict(loss_type="simpo", simpo_gamma="a"), "simpo_gamma must be"),
])
def test_simpo_orpo_bad_calls(bad, message):
    c = -torch.rand(3)
    with pytest.raises((TypeError, ValueError), match=message) as info:
        rlkern.preference_loss(c, c, **bad)
    assert str(info.value).startswith("preference_loss: ")
    with pytest.raises(ValueError, match="reference-free") as info:
        rlkern.preference_loss(c, c, c, c, loss_type="orpo", chosen_lengths=torch.ones(3),
                               rejected_lengths=torch.ones(3))


def _trl_free_case(seed=15, n=5, width=8, vocab=11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * n, width, vocab, generator=g) * 2
    ids = torch.randint(0, vocab, (2 * n, width), generator=g)
    attention = torch.ones(2 * n, width, dtype=torch.long)
    attention[torch.arange(2 * n), torch.randint(4, width + 1, (2 * n,), generator=g).clamp(max=width - 1)] = 0
    attention = attention.cummin(1).values  # right padding
    labels = torch.where(attention == 1, ids, -100)
    return logits, ids, attention, labels


def _trl_free_trainer(module, cls, **attrs):
    trainer = object.__new__(getattr(import_peer(module), cls))
    identity = lambda x, **_: x  # noqa: E731  (one process: accelerate's gathers are the identity)
    trainer.__dict__.update(is_encoder_decoder=False, pad_token_id=0, padding_value=0, aux_loss_enabled=False,
                            accelerator=types.SimpleNamespace(gather_for_metrics=identity, device=torch.device("cpu")),
                            **attrs)
    return trainer


def _ours_from_logits(logits, labels, **kw):
    """rlkern on the sequences' summed log-probs and token counts (TRL's get_batch_logps shift)."""
    n = logits.shape[0] // 2
    target = labels[:, 1:]
    mask = target != -100
    token = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
    sums = (token * mask).sum(1)
    lengths = mask.sum(1)
    return rlkern.preference_loss(sums[:n], sums[n:], chosen_lengths=lengths[:n], rejected_lengths=lengths[n:], **kw)


def _run_trl(trainer, logits, ids, attention, labels):
    n = logits.shape[0] // 2
    leaf = logits.clone().requires_grad_()
    model = lambda *a, **k: types.SimpleNamespace(logits=leaf)  # noqa: E731
    batch = {"chosen_input_ids": ids[:n], "chosen_attention_mask": attention[:n], "chosen_labels": labels[:n],
             "rejected_input_ids": ids[n:], "rejected_attention_mask": attention[n:], "rejected_labels": labels[n:]}
    loss, metrics = trainer.get_batch_loss_metrics(model, batch)
    return loss, torch.autograd.grad(loss, leaf)[0], metrics


def _check_free(trl, ours_fn, logits):
    trl_loss, trl_grad, trl_metrics = trl
    leaf = logits.clone().requires_grad_()
    loss, metrics = ours_fn(leaf)
    grad = torch.autograd.grad(loss, leaf)[0]
    torch.testing.assert_close(loss, trl_loss.float(), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(grad, trl_grad, rtol=2e-5, atol=2e-7)
    for key in METRIC_KEYS:
        assert math.isclose(float(metrics[key]), float(trl_metrics[key]), rel_tol=2e-5, abs_tol=2e-6), key


@pytest.mark.peer
@pytest.mark.parametrize("loss_type", ["simpo", "sigmoid", "hinge", "ipo"])
@pytest.mark.parametrize("cpo_alpha,alpha", [(0.0, 0.0), (0.7, 0.0), (0.7, 0.3)])
def test_cpo_trainer_loss_matches_trl(backend, loss_type, cpo_alpha, alpha):
    logits, ids, attention, labels = _trl_free_case()
    smoothing = 0.1 if loss_type in ("simpo", "sigmoid") else 0.0
    # alpha: AlphaPO's reward transform
    trainer = _trl_free_trainer("trl.experimental.cpo.cpo_trainer", "CPOTrainer", loss_type=loss_type, beta=0.4,
                                label_smoothing=smoothing, simpo_gamma=0.6, cpo_alpha=cpo_alpha, alpha=alpha)
    trl = _run_trl(trainer, logits, ids, attention, labels)
    # CPO's sigmoid with label smoothing is simpo at gamma 0 on the summed log-probs (lengths of one);
    # its ipo and simpo read length-averaged log-probs
    ours_type = {"sigmoid": "simpo"}.get(loss_type, loss_type)
    kw = dict(loss_type=[ours_type, "sft"], loss_weights=[1.0, cpo_alpha], beta=0.4, label_smoothing=smoothing,
              simpo_gamma=0.0 if loss_type == "sigmoid" else 0.6, alpha=alpha)

    def ours(leaf):
        if loss_type != "sigmoid":
            return _ours_from_logits(leaf, labels, **kw)
        # simpo at gamma 0 with lengths of one, and the NLL (sft) with the true lengths: two calls
        n = leaf.shape[0] // 2
        target = labels[:, 1:]
        mask = target != -100
        token = torch.log_softmax(leaf[:, :-1].float(), -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
        sums = (token * mask).sum(1)
        ones = torch.ones(n)
        loss, metrics = rlkern.preference_loss(sums[:n], sums[n:], chosen_lengths=ones, rejected_lengths=ones,
                                               **dict(kw, loss_type="simpo", loss_weights=None))
        nll, _ = rlkern.preference_loss(sums[:n], sums[n:], loss_type="sft", chosen_lengths=mask.sum(1)[:n],
                                        rejected_lengths=mask.sum(1)[n:])
        return loss + cpo_alpha * nll, metrics

    # (a reference-free ipo's metrics are of averaged log-probs, as CPO logs them)
    _check_free(trl, ours, logits)


@pytest.mark.peer
def test_orpo_trainer_loss_matches_trl(backend):
    logits, ids, attention, labels = _trl_free_case(seed=16)
    logits = logits * 0.3  # averaged log-probs near log(1/vocab): odds of order one
    trainer = _trl_free_trainer("trl.experimental.orpo.orpo_trainer", "ORPOTrainer", beta=0.25)
    trl = _run_trl(trainer, logits, ids, attention, labels)
    # ORPO's NLL covers the tokens of input_ids under the attention mask: the labels here (no prompt
    # masked), so it is sft of the same sums and lengths
    _check_free(trl, lambda leaf: _ours_from_logits(leaf, labels, loss_type=["orpo", "sft"], beta=0.25), logits)
    _, metrics = _ours_from_logits(logits, labels, loss_type=["orpo", "sft"], beta=0.25)
    for key in ("log_odds_ratio", "log_odds_chosen"):  # ORPO's two extra logged metrics
        assert math.isclose(float(metrics[key]), float(trl[2][key]), rel_tol=2e-5, abs_tol=2e-6), key


@pytest.mark.peer
@pytest.mark.parametrize("name", ["cpo", "simpo", "orpo"])
def test_matches_liger_cpo_simpo_orpo_loss_fn(backend, name):
    module = import_peer(f"liger_kernel.chunked_loss.{name}_loss")
    cls = {"cpo": "LigerFusedLinearCPOFunction", "simpo": "LigerFusedLinearSimPOFunction",
           "orpo": "LigerFusedLinearORPOFunction"}[name]
    c, r, nc, nr, _ = _free_pairs(n=7, seed=17, dtype=torch.float32)
    nc = nc.clamp(min=1)
    leaves = [(c / nc).requires_grad_(), (r / nr).requires_grad_()]  # Liger takes averaged log-probs
    extra = {"cpo": dict(label_smoothing=0.1), "simpo": dict(gamma=0.3, label_smoothing=0.1), "orpo": {}}[name]
    out = getattr(module, cls).preference_loss_fn(*leaves, torch.zeros(14, 3), beta=0.4, **extra)
    want = torch.autograd.grad(out[0], leaves)
    ones = torch.ones(7)
    if name == "cpo":  # CPO's sigmoid with label smoothing: simpo at gamma 0, lengths of one
        kw = dict(loss_type="simpo", simpo_gamma=0.0, label_smoothing=0.1, chosen_lengths=ones, rejected_lengths=ones)
        c, r = leaves[0].detach(), leaves[1].detach()
        scale_c = scale_r = ones
    else:
        kw = dict(loss_type=name, simpo_gamma=0.3, label_smoothing=0.1 if name == "simpo" else 0.0, chosen_lengths=nc,
                  rejected_lengths=nr)
        scale_c, scale_r = nc.float(), nr.float()
    loss, gc, gr, metrics = _ours(c, r, None, None, beta=0.4, **kw)
    torch.testing.assert_close(loss, out[0], rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(gc * scale_c, want[0], rtol=2e-5, atol=2e-7)  # d/d(c / n) = n * d/dc
    torch.testing.assert_close(gr * scale_r, want[1], rtol=2e-5, atol=2e-7)
    torch.testing.assert_close(metrics["rewards/chosen"], out[1].mean(), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(metrics["rewards/rejected"], out[2].mean(), rtol=2e-5, atol=2e-6)


# ------------------------------------------------------------------------------------------------
# rlkern.kto_loss: TRL 1.16's KTOTrainer loss over unpaired completions

from rlkern.ops.preference import KTO_METRIC_KEYS  # noqa: E402


def _kto_case(n=9, m=6, seed=20, dtype=torch.float64, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    x = -torch.rand(n, generator=g, dtype=torch.float64) * 20
    ref = x + torch.randn(n, generator=g, dtype=torch.float64) * spread
    labels = torch.rand(n, generator=g) > 0.4
    kx = -torch.rand(m, generator=g, dtype=torch.float64) * 20
    kr = kx - torch.rand(m, generator=g, dtype=torch.float64) * spread  # a positive KL point
    return x.to(dtype), ref.to(dtype), labels, kx.to(dtype), kr.to(dtype)


def _kto_ours(x, ref, labels, kx, kr, **kw):
    x = x.detach().clone().requires_grad_()
    loss, metrics = rlkern.kto_loss(x, ref, labels, kx, kr, **kw)
    (g,) = torch.autograd.grad(loss, (x,), allow_unused=True, materialize_grads=True)
    return loss, g, metrics


def _kto_oracle(x, ref, labels, kx, kr, **kw):
    x = x.detach().double().requires_grad_()
    dbl = (lambda t: None if t is None else t.double())
    loss, metrics = reference.kto_loss(x, dbl(ref), labels, dbl(kx), dbl(kr), **kw)
    (g,) = torch.autograd.grad(loss, (x,), allow_unused=True, materialize_grads=True)
    return loss, g, metrics


def _kto_compare(ours, oracle, *, rtol, atol):
    torch.testing.assert_close(ours[0].double(), oracle[0], rtol=rtol, atol=atol)
    torch.testing.assert_close(ours[1].double(), oracle[1], rtol=rtol, atol=atol)
    assert set(ours[2]) == set(KTO_METRIC_KEYS)
    for key in KTO_METRIC_KEYS:
        assert ours[2][key].ndim == 0 and ours[2][key].dtype == torch.float32
        torch.testing.assert_close(ours[2][key].double(), oracle[2][key], rtol=max(rtol, 2e-6), atol=max(atol, 1e-6),
                                   msg=key)


def _kto_kw(loss_type):
    return dict(loss_type=loss_type, beta=0.3, desirable_weight=1.3, undesirable_weight=0.7)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kto_matches_the_reference(backend, loss_type, dtype, monkeypatch):
    if backend == "triton":  # blocks of 16 over 37 completions and 21 KL completions
        from rlkern.kernels import preference as kernel

        monkeypatch.setattr(kernel, "MAX_BLOCK", 16)
    for n, m in ((9, 6), (37, 21)):
        x, ref, labels, kx, kr = _kto_case(n=n, m=m, dtype=dtype)
        if loss_type != "kto":
            kx = kr = None
        tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
        ours = _kto_ours(x, ref, labels, kx, kr, **_kto_kw(loss_type))
        assert ours[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        _kto_compare(ours, _kto_oracle(x, ref, labels, kx, kr, **_kto_kw(loss_type)), **tol)


def test_kto_gradcheck_float64_and_half_inputs(backend):
    x, ref, labels, kx, kr = _kto_case(n=6, seed=21, spread=1.0)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda a: rlkern.kto_loss(a, ref, labels, kx, kr, **_kto_kw("kto"))[0], (x,))
    for dtype in (torch.bfloat16, torch.float16):
        h = x.detach().to(dtype)
        loss, g, metrics = _kto_ours(h, ref.float(), labels, kx.float(), kr.float(), beta=0.2)
        assert loss.dtype == torch.float32 and g.dtype == dtype
        want = _kto_oracle(h, ref, labels, kx, kr, beta=0.2)
        _kto_compare((loss, g.float(), metrics), (want[0], want[1].to(dtype).double(), want[2]), rtol=2e-5, atol=2e-6)


def test_kto_edge_cases(backend):
    for loss_type in ("kto", "apo_zero_unpaired"):
        kw = _kto_kw(loss_type)
        for margin in (1e4, -1e4):
            x = torch.tensor([-1.0, -2.0, -5.0, -3.0])
            labels = torch.tensor([True, False, True, False])
            kx, kr = (torch.tensor([-2.0, -4.0]), torch.tensor([-3.0, -9.0])) if loss_type == "kto" else (None, None)
            ours = _kto_ours(x, x - margin, labels, kx, kr, **kw)
            assert all(torch.isfinite(t).all() for t in (ours[0], ours[1], *ours[2].values()))
            _kto_compare(ours, _kto_oracle(x, x - margin, labels, kx, kr, **kw), rtol=2e-5, atol=2e-6)
        kx, kr = (torch.tensor([-2.0]), torch.tensor([-1.0])) if loss_type == "kto" else (None, None)  # KL < 0 -> 0
        for labels in (torch.tensor([True]), torch.tensor([False]), torch.tensor([True, True])):  # one group only
            x = -torch.arange(1.0, labels.numel() + 1)
            ours = _kto_ours(x, x + 0.5, labels, kx, kr, **kw)
            _kto_compare(ours, _kto_oracle(x, x + 0.5, labels, kx, kr, **kw), rtol=2e-5, atol=2e-6)
            assert float(ours[2]["rewards/margins"]) == 0.0 and float(ours[2]["kl"]) == 0.0
        empty = torch.zeros(0)
        kx, kr = (empty, empty) if loss_type == "kto" else (None, None)
        loss, g, metrics = _kto_ours(empty, empty, empty.bool(), kx, kr, **kw)
        assert float(loss.detach()) == 0.0 and g.shape == (0,) and all(float(v) == 0.0 for v in metrics.values())


@pytest.mark.parametrize("bad,message", [
    (dict(loss_type="bco"), "loss_type must be one of"),
    (dict(beta=-1.0), "beta must be"),
    (dict(kl=False), "needs kl_logps"),
    (dict(loss_type="apo_zero_unpaired"), "has no KL term"),
    (dict(labels=torch.ones(2, dtype=torch.bool)), "labels must have shape"),
    (dict(desirable_weight=float("nan")), "desirable_weight must be"),
])
def test_kto_bad_calls(bad, message):
    x = -torch.rand(3)
    labels = bad.pop("labels", torch.tensor([True, False, True]))
    kl = (None, None) if bad.pop("kl", True) is False else (x, x)
    with pytest.raises((TypeError, ValueError), match=message) as info:
        rlkern.kto_loss(x, x, labels, *kl, **bad)
    assert str(info.value).startswith("kto_loss: ")
    with pytest.raises(ValueError, match="ref_logps requires grad"):
        rlkern.kto_loss(x, x.clone().requires_grad_(), x > -0.5, x, x)


def test_kto_torch_compile_and_opcheck():
    x, ref, labels, kx, kr = _kto_case(n=6, seed=22, dtype=torch.float32)
    eager = rlkern.kto_loss(x, ref, labels, kx, kr, beta=0.2)
    compiled = torch.compile(lambda *a: rlkern.kto_loss(*a, beta=0.2), fullgraph=True, backend="eager")(
        x, ref, labels, kx, kr)
    torch.testing.assert_close(compiled[0], eager[0])
    from rlkern.ops import preference as op

    torch.library.opcheck(op._kto_op, (x.requires_grad_(), ref, labels.float(), torch.ones(6), kx, kr, 0,
                                       [0.2, 1.0, 1.0]))


def _trl_kto(per_token, mask, labels, ref_logps, kl_per_token, kl_mask, ref_kl_logps, *, loss_type, beta,
             desirable_weight, undesirable_weight):
    kto = import_peer("trl.trainer.kto_trainer")
    trainer = object.__new__(kto.KTOTrainer)
    identity = lambda x, **_: x  # noqa: E731  (one process: accelerate's gathers are the identity)
    trainer.__dict__.update(
        model=types.SimpleNamespace(training=True), aux_loss_enabled=False, beta=beta, loss_type=loss_type,
        desirable_weight=desirable_weight, undesirable_weight=undesirable_weight, calculate_KL=loss_type == "kto",
        precompute_ref_logps=True, _total_train_tokens=0, _tp_size=1,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        accelerator=types.SimpleNamespace(gather_for_metrics=identity, device=torch.device("cpu")))
    b, width = per_token.shape
    ids = torch.zeros(b, width + 1, dtype=torch.long)
    kl_ids = torch.ones(kl_per_token.shape[0], width + 1, dtype=torch.long)
    zeros = torch.zeros(b, width)

    def model(input_ids=None, **_):
        if input_ids is kl_ids:
            return types.SimpleNamespace(log_probs=kl_per_token * kl_mask)
        return types.SimpleNamespace(log_probs=per_token * mask, entropy=zeros, mean_logits=zeros)

    pad = torch.zeros(b, 1, dtype=torch.long)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), completion_mask=torch.cat([pad, mask.long()], 1),
                  label=labels, ref_logps=ref_logps, KL_input_ids=kl_ids, KL_attention_mask=torch.ones_like(kl_ids),
                  KL_completion_mask=torch.cat([pad[: kl_ids.shape[0]], kl_mask.long()], 1), ref_KL_logps=ref_kl_logps)
    loss = trainer._compute_loss(model, inputs, False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.peer
@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_matches_trl(backend, loss_type):
    g = torch.Generator().manual_seed(23)
    b, width = 8, 7
    per_token = -torch.rand(b, width, generator=g) * 3
    mask = torch.rand(b, width, generator=g) > 0.3
    kl_per_token = -torch.rand(b, width, generator=g) * 3
    kl_mask = torch.rand(b, width, generator=g) > 0.3
    labels = torch.tensor([True, False, True, True, False, False, True, False])
    sums = (per_token * mask).sum(1)
    kl_sums = (kl_per_token * kl_mask).sum(1)
    ref = sums + torch.randn(b, generator=g)
    ref_kl = kl_sums - torch.rand(b, generator=g)
    kw = _kto_kw(loss_type)
    leaf = per_token.clone().requires_grad_()
    trl_loss, trl_metrics = _trl_kto(leaf, mask, labels, ref, kl_per_token, kl_mask, ref_kl, **kw)
    trl_grad = torch.autograd.grad(trl_loss, leaf)[0]
    kl = (kl_sums, ref_kl) if loss_type == "kto" else (None, None)
    loss, grad, metrics = _kto_ours(sums, ref, labels, *kl, **kw)
    torch.testing.assert_close(loss, trl_loss.float(), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(grad[:, None].expand_as(trl_grad)[mask], trl_grad[mask], rtol=2e-5, atol=2e-7)
    for key in KTO_METRIC_KEYS:
        assert math.isclose(float(metrics[key]), trl_metrics[key], rel_tol=2e-5, abs_tol=2e-6), key
    if loss_type == "kto":
        assert trl_metrics["kl"] > 0  # the case exercises the reference point


@pytest.mark.peer
@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_matches_liger_preference_loss_fn(backend, loss_type):
    liger = import_peer("liger_kernel.chunked_loss.kto_loss")
    x, ref, labels, kx, kr = _kto_case(n=9, seed=24, dtype=torch.float32)
    kl = (kx - kr).mean().clamp(min=0) if loss_type == "kto" else None
    leaf = x.clone().requires_grad_()
    loss, chosen_sum, rejected_sum = liger.LigerFusedLinearKTOFunction.preference_loss_fn(
        leaf, labels, torch.zeros(9, 3), ref, beta=0.3, kl=kl)
    (want,) = torch.autograd.grad(loss, leaf)
    args = (kx, kr) if loss_type == "kto" else (None, None)
    ours, g, metrics = _kto_ours(x, ref, labels, *args, loss_type=loss_type, beta=0.3)
    torch.testing.assert_close(ours, loss, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(g, want, rtol=2e-5, atol=2e-7)
    torch.testing.assert_close(metrics["rewards/chosen"], chosen_sum / labels.sum(), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(metrics["rewards/rejected"], rejected_sum / (~labels).sum(), rtol=2e-5, atol=2e-6)


def test_kto_triton_kernel_compiles_for_sm90():
    compile_for_sm90("""
from rlkern.kernels import preference as k
for loss, fp64, dt in ((0, False, "bf16"), (1, False, "fp32"), (2, False, "fp16"), (0, True, "fp64"),
                      (2, True, "fp64")):
    f = "*fp64" if fp64 else "*fp32"
    s = {"x_ptr": "*" + dt, "ref_ptr": f, "lab_ptr": f, "w_ptr": f, "kx_ptr": f, "kr_ptr": f, "loss_ptr": f, "g_ptr": f,
         "met_ptr": f, "B": "i32", "M": "i32", "beta": "fp64", "dw": "fp64", "uw": "fp64"}
    build(k._kto_kernel, s, {"LOSS": loss, "FP64": fp64, "BLOCK": 128})
print("ok")
""")


# ------------------------------------------------------------------------------------------------
# rlkern.bco_loss: BCO (TRL's BCOTrainer.bco_loss; the trainer is gone from TRL 1.16)

from rlkern.ops.preference import BCO_METRIC_KEYS  # noqa: E402


def _bco_ours(x, ref, labels, delta, **kw):
    x = x.detach().clone().requires_grad_()
    loss, metrics = rlkern.bco_loss(x, ref, labels, delta, **kw)
    (g,) = torch.autograd.grad(loss, (x,), allow_unused=True, materialize_grads=True)
    return loss, g, metrics


def _bco_oracle(x, ref, labels, delta, **kw):
    x = x.detach().double().requires_grad_()
    kw = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    loss, metrics = reference.bco_loss(x, ref.double(), labels, delta.double(), **kw)
    (g,) = torch.autograd.grad(loss, (x,), allow_unused=True, materialize_grads=True)
    return loss, g, {k.replace("delta", "kl"): v for k, v in metrics.items()}


def _bco_compare(ours, oracle, **tol):
    assert set(ours[2]) == set(BCO_METRIC_KEYS)
    _kto_compare((ours[0], ours[1], {k.replace("delta", "kl"): v for k, v in ours[2].items()}), oracle, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bco_matches_the_reference(backend, dtype, monkeypatch):
    if backend == "triton":
        from rlkern.kernels import preference as kernel

        monkeypatch.setattr(kernel, "MAX_BLOCK", 16)
    for n in (9, 37):
        x, ref, labels, _, _ = _kto_case(n=n, seed=30, dtype=dtype)
        udm = torch.rand(n, generator=torch.Generator().manual_seed(31), dtype=dtype) * 2
        for delta, weights in ((torch.tensor(0.4, dtype=dtype), None), (torch.tensor([-0.7], dtype=dtype), udm)):
            kw = dict(beta=0.3, udm_weights=weights)
            tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
            _bco_compare(_bco_ours(x, ref, labels, delta, **kw), _bco_oracle(x, ref, labels, delta, **kw), **tol)


def test_bco_gradcheck_float64_and_edge_cases(backend):
    x, ref, labels, _, _ = _kto_case(n=6, seed=32, spread=1.0)
    udm = torch.rand(6, dtype=torch.float64) + 0.5
    delta = torch.tensor(0.2, dtype=torch.float64)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda a: rlkern.bco_loss(a, ref, labels, delta, beta=0.7, udm_weights=udm)[0],
                                    (x,))
    for margin in (1e4, -1e4):
        x = torch.tensor([-1.0, -2.0, -5.0, -3.0])
        labels = torch.tensor([True, False, True, False])
        ours = _bco_ours(x, x - margin, labels, torch.tensor(0.5), beta=1.0)
        assert all(torch.isfinite(t).all() for t in (ours[0], ours[1], *ours[2].values()))
        _bco_compare(ours, _bco_oracle(x, x - margin, labels, torch.tensor(0.5), beta=1.0), rtol=2e-5, atol=2e-6)
    for labels in (torch.tensor([True]), torch.tensor([False, False])):
        x = -torch.arange(1.0, labels.numel() + 1)
        ours = _bco_ours(x, x + 0.5, labels, torch.tensor(-0.1))
        _bco_compare(ours, _bco_oracle(x, x + 0.5, labels, torch.tensor(-0.1)), rtol=2e-5, atol=2e-6)
        assert float(ours[2]["rewards/margins"]) == 0.0
    empty = torch.zeros(0)
    loss, g, metrics = _bco_ours(empty, empty, empty.bool(), torch.tensor(0.3))
    assert float(loss.detach()) == 0.0 and g.shape == (0,) and float(metrics["delta"]) == pytest.approx(0.3)


@pytest.mark.parametrize("bad,message", [
    (dict(beta=0.0), "beta must be"),
    (dict(delta=torch.zeros(2)), "delta must be a 1-element tensor"),
    (dict(udm_weights=torch.ones(2)), "udm_weights must have shape"),
    (dict(delta=torch.zeros((), requires_grad=True)), "delta requires grad"),
])
def test_bco_bad_calls(bad, message):
    x = -torch.rand(3)
    delta = bad.pop("delta", torch.zeros(()))
    with pytest.raises((TypeError, ValueError), match=message) as info:
        rlkern.bco_loss(x, x, x > -0.5, delta, **bad)
    assert str(info.value).startswith("bco_loss: ")


@pytest.mark.peer
def test_bco_at_zero_delta_is_half_trls_bco_pair(backend):
    # TRL 1.16's DPO bco_pair is BCO's two terms per pair without the running mean: over the 2B
    # completions with delta = 0, bco_loss is half of it (a mean over 2B instead of B)
    per_token, mask, ref_c, ref_r = _trl_case(seed=33)
    leaf = per_token.clone().requires_grad_()
    trl_loss, _ = _trl_loss(leaf, mask, ref_c, ref_r, loss_type="bco_pair", beta=0.3)
    trl_grad = torch.autograd.grad(trl_loss, leaf)[0]
    sums = (per_token * mask).sum(1)
    labels = torch.arange(12) < 6
    loss, g, metrics = _bco_ours(sums, torch.cat([ref_c, ref_r]), labels, torch.zeros(()), beta=0.3)
    torch.testing.assert_close(2 * loss, trl_loss.float(), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close((2 * g)[:, None].expand_as(trl_grad)[mask], trl_grad[mask], rtol=2e-5, atol=2e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 37, 3001])
def test_cpo_orpo_kto_bco_triton_on_cuda_match_the_reference(dtype, n):
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    compute = torch.float64 if dtype == torch.float64 else torch.float32

    def on_cpu(out):
        return tuple(({k: v.cpu() for k, v in t.items()} if isinstance(t, dict) else t.cpu()) for t in out)

    def rounded(want):  # the gradient is rounded to the input dtype
        if dtype != torch.bfloat16:
            return want, tol
        return (want[0], *(t.to(dtype).double() for t in want[1:-1]), want[-1]), dict(rtol=1e-2, atol=1e-5)

    c, r, nc, nr, pw = _free_pairs(n=n, seed=40, dtype=dtype)
    kw = dict(loss_type=["simpo", "orpo", "sft"], loss_weights=[1.0, 0.5, 0.2], beta=0.3, label_smoothing=0.1,
              chosen_lengths=nc, rejected_lengths=nr)
    ours = _ours(c.cuda(), r.cuda(), None, None, **dict(kw, chosen_lengths=nc.cuda(), rejected_lengths=nr.cuda()))
    want, t = rounded(_oracle(c, r, None, None, **kw))
    _compare(on_cpu(ours), want, **t)
    x, ref, labels, kx, kr = _kto_case(n=n, m=max(n // 2, 1), seed=41, dtype=dtype)
    ref, kx, kr = ref.to(compute), kx.to(compute), kr.to(compute)
    for loss_type in ("kto", "apo_zero_unpaired"):
        kl = (kx, kr) if loss_type == "kto" else (None, None)
        ours = _kto_ours(x.cuda(), ref.cuda(), labels.cuda(), *(None if k is None else k.cuda() for k in kl),
                         **_kto_kw(loss_type))
        want, t = rounded(_kto_oracle(x, ref, labels, *kl, **_kto_kw(loss_type)))
        _kto_compare(on_cpu(ours), want, **t)
    delta = torch.tensor(0.3, dtype=compute)
    ours = _bco_ours(x.cuda(), ref.cuda(), labels.cuda(), delta.cuda(), beta=0.3, udm_weights=pw.to(compute).cuda())
    want, t = rounded(_bco_oracle(x, ref, labels, delta, beta=0.3, udm_weights=pw.to(compute)))
    _bco_compare(on_cpu(ours), want, **t)


# ------------------------------------------------------------------------------------------------
# The research list's pair losses (issue 18): SPPO, RSO's names, XPO, VPO, APO, INPO, CPL, Step-APO,
# TPO. Each: every backend vs the float64 reference (with the third, differentiable log-prob where
# the loss has one), gradcheck, a hand-computed example, and TRL's own TPOTrainer for TPO.

from rlkern.reference.preference import PAPER_LOSS_TYPES  # noqa: E402


def _paper_case(n=7, seed=30, dtype=torch.float64):
    c, r, rc, rr, nc, nr, pw = _pairs(n=n, seed=seed, dtype=dtype, spread=1.0)
    g = torch.Generator().manual_seed(seed + 1)
    extra = dict(
        sampled=(-torch.rand(n, generator=g, dtype=torch.float64) * 20).to(dtype),
        win=(torch.rand(n, generator=g, dtype=torch.float64), torch.rand(n, generator=g, dtype=torch.float64)),
        iterate=(rc + torch.randn(n, generator=g, dtype=torch.float64),
                 rr + torch.randn(n, generator=g, dtype=torch.float64)),
        adv=(torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)),
        gold_lengths=torch.randint(0, 9, (n,), generator=g))
    return c, r, rc, rr, nc, nr, pw, extra


def _paper_kw(types_, ex, **kw):
    """The tensors the paper loss types in types_ read (the extra log-prob is passed by the caller)."""
    types_ = [types_] if isinstance(types_, str) else types_
    if "sppo" in types_:
        kw.update(chosen_win_rates=ex["win"][0], rejected_win_rates=ex["win"][1])
    if "inpo" in types_:
        kw.update(iterate_chosen_logps=ex["iterate"][0], iterate_rejected_logps=ex["iterate"][1])
    if "step_apo" in types_:
        kw.update(chosen_advantages=ex["adv"][0], rejected_advantages=ex["adv"][1])
    if "tpo_nll" in types_:
        kw.update(gold_lengths=ex["gold_lengths"])
    return kw


def _extra_name(types_):
    types_ = [types_] if isinstance(types_, str) else types_
    if "tpo_nll" in types_:
        return "gold_logps"
    return "sampled_logps" if {"xpo", "vpo"} & set(types_) else None


def _ours3(c, r, e, rc, rr, name, **kw):
    c = c.detach().clone().requires_grad_()
    r = r.detach().clone().requires_grad_()
    e = e.detach().clone().requires_grad_()
    if name is not None:
        kw[name] = e
    loss, metrics = rlkern.preference_loss(c, r, rc, rr, **kw)
    grads = torch.autograd.grad(loss, (c, r, e), allow_unused=True, materialize_grads=True)
    return loss, *grads, metrics


def _oracle3(c, r, e, rc, rr, name, **kw):
    c = c.detach().double().requires_grad_()
    r = r.detach().double().requires_grad_()
    e = e.detach().double().requires_grad_()
    if name is not None:
        kw[name] = e
    kw = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    rc = None if rc is None else rc.double()
    rr = None if rr is None else rr.double()
    loss, metrics = reference.preference_loss(c, r, rc, rr, **kw)
    grads = torch.autograd.grad(loss, (c, r, e), allow_unused=True, materialize_grads=True)
    return loss, *grads, metrics


def _compare3(ours, oracle, *, rtol, atol):
    _compare((ours[0], ours[1], ours[2], ours[4]), (oracle[0], oracle[1], oracle[2], oracle[4]), rtol=rtol, atol=atol)
    torch.testing.assert_close(ours[3].double(), oracle[3], rtol=rtol, atol=atol)


def _paper_refs(types_, rc, rr):
    types_ = [types_] if isinstance(types_, str) else types_
    return (None, None) if "cpl" in types_ else (rc, rr)


@pytest.mark.parametrize("loss_type", PAPER_LOSS_TYPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_paper_loss_types_match_the_reference(backend, loss_type, dtype):
    c, r, rc, rr, nc, nr, pw, ex = _paper_case(dtype=dtype)
    rc, rr = _paper_refs(loss_type, rc, rr)
    kw = _paper_kw(loss_type, ex, loss_type=loss_type, beta=0.3, pair_weights=pw.to(dtype), xpo_alpha=0.2,
                   vpo_alpha=0.7, inpo_tau=0.4, inpo_eta=0.9, cpl_lambda=0.6)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    name = _extra_name(loss_type)
    ours = _ours3(c, r, ex["sampled"], rc, rr, name, **kw)
    assert ours[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _compare3(ours, _oracle3(c, r, ex["sampled"], rc, rr, name, **kw), **tol)


# the combinations one call may hold (the aux slots: one of sppo / inpo / step_apo; the extra slot:
# xpo and vpo share sampled_logps, tpo_nll reads gold_logps), with the DPO types
PAPER_LISTS = (["sigmoid", "sppo", "xpo", "vpo", "ipo", "sft"], ["inpo", "xpo", "hinge"],
               ["step_apo", "tpo_nll", "apo_zero"], ["cpl", "tpo_nll", "simpo"])


@pytest.mark.parametrize("types_", PAPER_LISTS, ids="+".join)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_paper_loss_lists_in_many_blocks(backend, types_, dtype, monkeypatch):
    if backend == "triton":  # 37 pairs in blocks of 16: the tpo_nll pre-pass and the carried sums
        from rlkern.kernels import preference as kernel

        monkeypatch.setattr(kernel, "MAX_BLOCK", 16)
    c, r, rc, rr, nc, nr, pw, ex = _paper_case(n=37, seed=31, dtype=dtype)
    rc, rr = _paper_refs(types_, rc, rr)
    kw = _paper_kw(types_, ex, loss_type=types_, loss_weights=[1.0 - 0.15 * k for k in range(len(types_))],
                   beta=0.4, label_smoothing=0.1, chosen_lengths=nc, rejected_lengths=nr, pair_weights=pw.to(dtype),
                   xpo_alpha=0.3, vpo_alpha=0.5, inpo_tau=0.2, inpo_eta=1.5, cpl_lambda=0.8)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    name = _extra_name(types_)
    _compare3(_ours3(c, r, ex["sampled"], rc, rr, name, **kw), _oracle3(c, r, ex["sampled"], rc, rr, name, **kw),
              **tol)


@pytest.mark.parametrize("types_", PAPER_LISTS, ids="+".join)
def test_gradcheck_paper_loss_types_float64(backend, types_):
    c, r, rc, rr, nc, nr, pw, ex = _paper_case(n=5, seed=32)
    rc, rr = _paper_refs(types_, rc, rr)
    kw = _paper_kw(types_, ex, loss_type=types_, loss_weights=[0.5 + 0.2 * k for k in range(len(types_))],
                   beta=0.6, label_smoothing=0.2, chosen_lengths=nc, rejected_lengths=nr, pair_weights=pw,
                   xpo_alpha=0.3, vpo_alpha=0.5, inpo_tau=0.2, inpo_eta=1.5, cpl_lambda=0.8)
    name = _extra_name(types_)
    leaves = [t.clone().requires_grad_() for t in (c, r, ex["sampled"])]

    def f(a, b, e):
        extra = {name: e} if name else {}
        return rlkern.preference_loss(a, b, rc, rr, **kw, **extra)[0]

    assert torch.autograd.gradcheck(f, tuple(leaves))


def _hand(loss_type, c, r, rc, rr, want_loss, want_gc, want_gr, want_ge=None, **kw):
    """One pair, float64: the loss and its gradient against the values worked out by hand."""
    t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    e = t(kw.pop("extra", 0.0))
    name = kw.pop("name", None)
    for k in list(kw):
        if isinstance(kw[k], float) and k.endswith(("rates", "logps", "advantages")):
            kw[k] = t(kw[k])
    ours = _ours3(t(c), t(r), e, None if rc is None else t(rc), None if rr is None else t(rr), name,
                  loss_type=loss_type, **kw)
    ours = [v.detach() for v in ours[:4]]
    assert math.isclose(float(ours[0]), want_loss, rel_tol=1e-12, abs_tol=1e-14), (float(ours[0]), want_loss)
    assert math.isclose(float(ours[1]), want_gc, rel_tol=1e-12, abs_tol=1e-14), (float(ours[1]), want_gc)
    assert math.isclose(float(ours[2]), want_gr, rel_tol=1e-12, abs_tol=1e-14), (float(ours[2]), want_gr)
    if want_ge is not None:
        assert math.isclose(float(ours[3]), want_ge, rel_tol=1e-12, abs_tol=1e-14), (float(ours[3]), want_ge)


def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_sppo_hand_computed(backend):
    # beta = 0.5 (eta = 2); lc = -1 - (-1.5) = 0.5, lr = -2 - (-1) = -1; P_c = 0.8, P_r = 0.3:
    # targets eta * (P - 1/2) = 0.6 and -0.4; loss (0.5 - 0.6)^2 + (-1 + 0.4)^2 = 0.01 + 0.36
    _hand("sppo", -1.0, -2.0, -1.5, -1.0, 0.01 + 0.36, 2 * (0.5 - 0.6), 2 * (-1.0 + 0.4), beta=0.5,
          chosen_win_rates=0.8, rejected_win_rates=0.3)
    # win rates 1 and 0 are TRL's sppo_hard
    c, r, rc, rr, *_ = _pairs(n=6, seed=33)
    hard = _ours(c, r, rc, rr, loss_type="sppo_hard", beta=0.3)
    hard = (*hard[:3], {k: v.double() for k, v in hard[3].items()})
    soft = _ours(c, r, rc, rr, loss_type="sppo", beta=0.3, chosen_win_rates=torch.ones(6, dtype=torch.float64),
                 rejected_win_rates=torch.zeros(6, dtype=torch.float64))
    _compare(soft, hard, rtol=1e-12, atol=1e-12)


def test_rso_loss_names_hand_computed(backend):
    # RSO's hinge-norm is "hinge" with the reference: beta = 2, lc - lr = (-1 + 1.2) - (-3 + 2.9) = 0.3,
    # max(0, 1 - 2 * 0.3) = 0.4, d/dc = -2, d/dr = 2
    _hand("hinge", -1.0, -3.0, -1.2, -2.9, 1 - 2 * 0.3, -2.0, 2.0, beta=2.0)
    # SLiC's hinge (no reference): max(0, 1 - 2 * (-1 + 3)) = 0, zero gradient
    _hand("hinge", -1.0, -3.0, None, None, 0.0, 0.0, 0.0, beta=2.0)
    # sigmoid-norm is "sigmoid": -log sigmoid(2 * 0.3) = log(1 + e^-0.6)
    _hand("sigmoid", -1.0, -3.0, -1.2, -2.9, math.log1p(math.exp(-0.6)), -2 * _sig(-0.6), 2 * _sig(-0.6), beta=2.0)


def test_xpo_hand_computed(backend):
    # beta = 0.5: y = 0.5 * ((-1 + 1.5) - (-2 + 1)) = 0.75; DPO softplus(-0.75) + alpha * s, alpha = 0.1, s = -4
    y = 0.75
    _hand("xpo", -1.0, -2.0, -1.5, -1.0, math.log1p(math.exp(-y)) + 0.1 * -4.0, -0.5 * _sig(-y), 0.5 * _sig(-y),
          0.1, beta=0.5, xpo_alpha=0.1, extra=-4.0, name="sampled_logps")


def test_xpo_with_the_reference_sample_as_one_side_of_the_pair(backend):
    # TRL's XPO loop: the reference model's sample is also the chosen (or rejected) completion; the
    # same tensor in both places collects both gradients
    c, r, rc, rr, *_ = _pairs(n=5, seed=34)
    leaf = c.clone().requires_grad_()
    loss, _ = rlkern.preference_loss(leaf, r, rc, rr, loss_type="xpo", beta=0.3, xpo_alpha=0.25, sampled_logps=leaf)
    (grad,) = torch.autograd.grad(loss, leaf)
    _, gc, _, ge, _ = _ours3(c, r, c, rc, rr, "sampled_logps", loss_type="xpo", beta=0.3, xpo_alpha=0.25)
    torch.testing.assert_close(grad, gc + ge, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ge, torch.full_like(ge, 0.25 / 5), rtol=1e-12, atol=1e-14)


def test_vpo_hand_computed(backend):
    # offline VPO: DPO - alpha * beta * log pi(y_cal); beta = 0.5, alpha = 0.2, y_cal's log-prob -3
    y = 0.75
    _hand("vpo", -1.0, -2.0, -1.5, -1.0, math.log1p(math.exp(-y)) - 0.2 * 0.5 * -3.0, -0.5 * _sig(-y),
          0.5 * _sig(-y), -0.2 * 0.5, beta=0.5, vpo_alpha=0.2, extra=-3.0, name="sampled_logps")


def test_apo_momentum_hand_computed(backend):
    # APO, alpha = 0.5: ref-hat = 1.5 * ref - 0.5 * prev: chosen 1.5 * -1.5 - 0.5 * -1 = -1.75,
    # rejected 1.5 * -1 - 0.5 * -2 = -0.5; sigmoid with beta = 1: y = (-1 + 1.75) - (-2 + 0.5) = 2.25
    y = 2.25
    _hand("sigmoid", -1.0, -2.0, -1.5, -1.0, math.log1p(math.exp(-y)), -_sig(-y), _sig(-y), beta=1.0,
          apo_momentum=0.5, prev_ref_chosen_logps=-1.0, prev_ref_rejected_logps=-2.0)
    # any loss type sees the extrapolated reference, metrics included
    c, r, rc, rr, nc, nr, *_ = _pairs(n=6, seed=35)
    pc, pr = rc + 0.3, rr - 0.2
    kw = dict(loss_type=["sigmoid", "ipo", "sppo_hard"], beta=0.3, chosen_lengths=nc, rejected_lengths=nr)
    _compare(_ours(c, r, rc, rr, prev_ref_chosen_logps=pc, prev_ref_rejected_logps=pr, apo_momentum=0.4, **kw),
             _oracle(c, r, 1.4 * rc - 0.4 * pc, 1.4 * rr - 0.4 * pr, **kw), rtol=1e-10, atol=1e-12)


def test_inpo_hand_computed(backend):
    # tau = 0.5, eta = 0.4 (eta tau = 0.2): h = (c - r) - 0.2 (ref_c - ref_r) - 0.8 (pi_t_c - pi_t_r)
    #   = 1 - 0.2 * 0.5 - 0.8 * (-1) = 1.7; loss (1.7 - 0.2)^2 = 2.25, d/dc = 2 * 1.5, d/dr = -3
    _hand("inpo", -1.0, -2.0, -1.5, -2.0, (1.7 - 0.2) ** 2, 3.0, -3.0, inpo_tau=0.5, inpo_eta=0.4,
          iterate_chosen_logps=-3.0, iterate_rejected_logps=-2.0)


def test_cpl_hand_computed(backend):
    # alpha (beta) = 0.5, lambda = 0.5: -log sigmoid(0.5 * -1 - 0.5 * 0.5 * -4) = softplus(-0.5)
    y = 0.5
    _hand("cpl", -1.0, -4.0, None, None, math.log1p(math.exp(-y)), -0.5 * _sig(-y), 0.25 * _sig(-y), beta=0.5,
          cpl_lambda=0.5)


def test_step_apo_hand_computed(backend):
    # beta = 0.5, A_c = 2, A_r = -1: y = 0.5 * (2 * 0.5 - (-1) * (-1)) = 0 -> log 2, d/dc = -0.5 * 2 / 2
    _hand("step_apo", -1.0, -2.0, -1.5, -1.0, math.log(2.0), -0.5, -0.25, beta=0.5, chosen_advantages=2.0,
          rejected_advantages=-1.0)


def test_tpo_nll_hand_computed(backend):
    # two pairs, gold log-probs -6 and -2 over 4 and 0 tokens: NLL = 8 / 4 = 2, d/dg = -1 / 4 each
    t = lambda *x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    loss, gc, gr, ge, _ = _ours3(t(-1.0, -2.0), t(-3.0, -1.0), t(-6.0, -2.0), None, None, "gold_logps",
                                 loss_type="tpo_nll", gold_lengths=torch.tensor([4, 0]))
    assert float(loss.detach()) == 2.0 and ge.tolist() == [-0.25, -0.25] and gc.abs().sum() == 0 and gr.abs().sum() == 0


def test_paper_edge_cases(backend):
    ones = torch.ones(3)
    for types_ in PAPER_LISTS:
        c, r, rc, rr, nc, nr, pw, ex = _paper_case(n=3, seed=36, dtype=torch.float32)
        rc, rr = _paper_refs(types_, rc, rr)
        kw = _paper_kw(types_, ex, loss_type=types_, beta=1.0, chosen_lengths=ones, rejected_lengths=ones,
                       label_smoothing=0.1)
        name = _extra_name(types_)
        for cc, rj in ((torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-1e4, -1e4, -3.0])),
                       (torch.tensor([-1e4, -1e4, -3.0]), torch.tensor([-1.0, -2.0, -3.0]))):
            ours = _ours3(cc, rj, ex["sampled"], rc, rr, name, **kw)
            for v in (*ours[:4], *ours[4].values()):
                assert torch.isfinite(v).all(), (types_, v)
            _compare3(ours, _oracle3(cc, rj, ex["sampled"], rc, rr, name, **kw), rtol=2e-5, atol=2e-6)
        empty = torch.zeros(0)
        kw0 = {k: (v[:0] if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        loss, gc, gr, ge, metrics = _ours3(empty, empty, empty, None if rc is None else empty,
                                           None if rr is None else empty, name, **kw0)
        assert float(loss.detach()) == 0.0 and gc.shape == (0,) and ge.shape == (0,)


@pytest.mark.parametrize("bad,message", [
    (dict(loss_type="sppo"), "needs chosen_win_rates"),
    (dict(loss_type="sppo", chosen_win_rates=torch.ones(3)), "given together"),
    (dict(loss_type="xpo"), "needs sampled_logps"),
    (dict(sampled_logps=torch.ones(3)), "sampled_logps is read by"),
    (dict(loss_type="tpo_nll", gold_logps=torch.ones(3)), "needs gold_lengths"),
    (dict(loss_type=["xpo", "tpo_nll"], sampled_logps=torch.ones(3), gold_logps=torch.ones(3),
          gold_lengths=torch.ones(3)), "cannot be combined"),
    (dict(loss_type=["sppo", "inpo"], chosen_win_rates=torch.ones(3), rejected_win_rates=torch.ones(3),
          iterate_chosen_logps=torch.ones(3), iterate_rejected_logps=torch.ones(3)), "cannot be combined"),
    (dict(loss_type="cpl"), "reference-free"),
    (dict(loss_type="inpo", inpo_eta=0.0, iterate_chosen_logps=torch.ones(3), iterate_rejected_logps=torch.ones(3)),
     "inpo_eta must be"),
    (dict(apo_momentum=-1.0, prev_ref_chosen_logps=torch.ones(3), prev_ref_rejected_logps=torch.ones(3)),
     "apo_momentum must be"),
    (dict(loss_type="step_apo", chosen_advantages=torch.ones(3).requires_grad_(), rejected_advantages=torch.ones(3)),
     "chosen_advantages requires grad"),
    (dict(loss_type="xpo", sampled_logps=torch.ones(3).double()), "sampled_logps must have chosen_logps' dtype"),
    (dict(loss_type="xpo", sampled_logps=torch.ones(2)), "sampled_logps must have shape"),
])
def test_paper_bad_calls(bad, message):
    c = -torch.rand(3)
    with pytest.raises((TypeError, ValueError), match=message) as info:
        rlkern.preference_loss(c, c, c, c, **bad)
    assert str(info.value).startswith("preference_loss: ")


def test_apo_without_a_reference_is_refused():
    c = -torch.rand(3)
    with pytest.raises(ValueError, match="needs ref_chosen_logps"):
        rlkern.preference_loss(c, c, prev_ref_chosen_logps=c, prev_ref_rejected_logps=c)


def test_paper_torch_compile_and_opcheck():
    c, r, rc, rr, nc, nr, pw, ex = _paper_case(n=6, seed=37, dtype=torch.float32)
    kw = _paper_kw(["sppo", "xpo"], ex, loss_type=["sppo", "xpo"], loss_weights=[1.0, 0.5], xpo_alpha=0.3)
    kw = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw.items()}
    s = ex["sampled"].float()
    eager = rlkern.preference_loss(c, r, rc, rr, sampled_logps=s, **kw)
    compiled = torch.compile(lambda *a: rlkern.preference_loss(*a, sampled_logps=s, **kw), fullgraph=True,
                             backend="eager")(c, r, rc, rr)
    torch.testing.assert_close(compiled[0], eager[0])
    from rlkern.ops import preference as op

    codes = [reference.LOSS_TYPES.index(t) for t in ("sppo", "xpo", "tpo_nll")]
    args = (c.requires_grad_(), r.requires_grad_(), s.clone().requires_grad_(), rc, rr, ex["win"][0].float(),
            ex["win"][1].float(), ex["gold_lengths"].float(), nc.float(), nr.float(), pw.float(), codes,
            [1.0, 0.5, 0.25], [0.1, 0.0, 0.0, 1.0, 0.05, 80.0, 0.5, 0.3, 0.1, 0.1, 0.1, 0.5, 0.0, 0.0])
    torch.library.opcheck(op._preference_op, args)


def test_paper_triton_kernel_compiles_for_sm90():
    compile_for_sm90("""
from rlkern.kernels import preference as k
ptrs = ("rc_ptr", "rr_ptr", "ac_ptr", "ar_ptr", "ne_ptr", "nc_ptr", "nr_ptr", "pw_ptr", "loss_ptr", "gc_ptr",
        "gr_ptr", "ge_ptr", "met_ptr")
sig = {"c_ptr": "", "r_ptr": "", "ex_ptr": "", "perm_ptr": "*i64", "B": "i32"}
scalars = (["beta", "ls", "alpha", "tau", "clamp", "log_pw", "log_pl"] + ["w_" + t for t in k.LOSS_TYPES]
           + ["gamma", "xpo_alpha", "vpo_alpha", "inpo_tau", "inpo_eta", "cpl_lambda", "alpha_po"])
paper = sum(1 << k.LOSS_TYPES.index(t) for t in ("sppo", "xpo", "vpo", "cpl", "tpo_nll"))
for types, fdiv, fp64, dt in ((paper | 1, 0, False, "bf16"), (1 << k.LOSS_TYPES.index("inpo"), 0, False, "fp32"),
                              (1 << k.LOSS_TYPES.index("step_apo") | paper, 0, True, "fp64")):
    s = dict(sig, **{n: "*fp64" if fp64 else "*fp32" for n in ptrs}, **{n: "fp64" for n in scalars})
    s["c_ptr"] = s["r_ptr"] = s["ex_ptr"] = "*" + dt
    build(k._preference_kernel, s, {"TYPES": types, "FDIV": fdiv, "FP64": fp64, "BLOCK": 128, "ALPHAPO": fdiv == 0,
                                    "AVG": types & 1 == 1})
print("ok")
""")


@pytest.mark.gpu
@pytest.mark.parametrize("types_", PAPER_LISTS, ids="+".join)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 37, 3001])
def test_paper_triton_on_cuda_matches_the_reference(types_, dtype, n):
    c, r, rc, rr, nc, nr, pw, ex = _paper_case(n=n, seed=38, dtype=dtype)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    rc, rr = _paper_refs(types_, rc.to(compute), rr.to(compute))
    kw = _paper_kw(types_, ex, loss_type=types_, beta=0.4, label_smoothing=0.1, chosen_lengths=nc,
                   rejected_lengths=nr, pair_weights=pw.to(compute), xpo_alpha=0.3, vpo_alpha=0.5, inpo_tau=0.2,
                   inpo_eta=1.5, cpl_lambda=0.8)
    kw = {k: (v.to(compute) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw.items()}
    name = _extra_name(types_)
    cuda_kw = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    ours = _ours3(c.cuda(), r.cuda(), ex["sampled"].cuda(), None if rc is None else rc.cuda(),
                  None if rr is None else rr.cuda(), name, **cuda_kw)
    want = _oracle3(c, r, ex["sampled"], rc, rr, name, **kw)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    if dtype == torch.bfloat16:  # the gradients are rounded to the input dtype
        want = (want[0], *(g.to(dtype).double() for g in want[1:4]), want[4])
        tol = dict(rtol=1e-2, atol=1e-5)
    _compare3((ours[0].cpu(), *(g.cpu() for g in ours[1:4]), {k: v.cpu() for k, v in ours[4].items()}), want, **tol)


def _tpo_case(seed=39, n=4, width=9, vocab=11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3 * n, width, vocab, generator=g) * 1.5
    ids = torch.randint(0, vocab, (3 * n, width), generator=g)
    completion = torch.zeros(3 * n, width, dtype=torch.long)
    for row in range(3 * n):  # two prompt tokens, then a completion of 1 .. width - 2 tokens, then padding
        completion[row, 2:2 + int(torch.randint(1, width - 1, (1,), generator=g))] = 1
    return logits, ids, completion


@pytest.mark.peer
@pytest.mark.parametrize("loss_type", ["sigmoid", "tpo-l", "hinge", "ipo"])
def test_tpo_trainer_loss_matches_trl(backend, loss_type):
    tpo = import_peer("trl.experimental.tpo.tpo_trainer")
    logits, ids, completion = _tpo_case()
    n = logits.shape[0] // 3
    trainer = object.__new__(tpo.TPOTrainer)
    identity = lambda x, **_: x  # noqa: E731  (one process: accelerate's gathers are the identity)
    smoothing = 0.1 if loss_type in ("sigmoid", "tpo-l") else 0.0
    trainer.__dict__.update(
        model=types.SimpleNamespace(training=True), loss_type=loss_type, beta=0.3, label_smoothing=smoothing,
        tpo_alpha=0.7, tpo_l_gamma=0.4, _total_train_tokens=0, _tp_size=1,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        accelerator=types.SimpleNamespace(gather=identity, gather_for_metrics=identity, device=torch.device("cpu")))
    leaf = logits.clone().requires_grad_()
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), completion_mask=completion)
    trl_loss = trainer._compute_loss(lambda **_: types.SimpleNamespace(logits=leaf), inputs, False)
    trl_grad = torch.autograd.grad(trl_loss, leaf)[0]
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    # TPO = its preference term (a DPO-family loss type, reference-free) + tpo_nll on the gold rows
    leaf = logits.clone().requires_grad_()
    mask = completion[:, 1:].bool()
    token = torch.log_softmax(leaf[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    sums = (token * mask).sum(1)
    lengths = mask.sum(1)
    ones = torch.ones(n)
    pref = {"sigmoid": dict(loss_type="simpo", simpo_gamma=0.0, chosen_lengths=ones, rejected_lengths=ones),
            "tpo-l": dict(loss_type="simpo", simpo_gamma=0.4, chosen_lengths=lengths[:n],
                          rejected_lengths=lengths[n:2 * n]),
            "hinge": dict(loss_type="hinge"),
            "ipo": dict(loss_type="ipo", chosen_lengths=lengths[:n], rejected_lengths=lengths[n:2 * n])}[loss_type]
    loss, metrics = rlkern.preference_loss(
        sums[:n], sums[n:2 * n], **dict(pref, loss_type=[pref["loss_type"], "tpo_nll"]), loss_weights=[1.0, 0.7],
        beta=0.3, label_smoothing=smoothing, gold_logps=sums[2 * n:], gold_lengths=lengths[2 * n:])
    grad = torch.autograd.grad(loss, leaf)[0]
    torch.testing.assert_close(loss, trl_loss, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(grad, trl_grad, rtol=2e-5, atol=2e-7)
    for key in METRIC_KEYS:  # (ipo: TPO logs averaged log-probs, as a reference-free ipo does)
        assert math.isclose(float(metrics[key]), trl_metrics[key], rel_tol=2e-5, abs_tol=2e-6), key


# ------------------------------------------------------------------------------------------------
# CPO's AlphaPO reward transform (alpha) and ORPO's log-odds metrics vs the float64 reference

@pytest.mark.parametrize("types_", [["simpo", "sft"], ["sigmoid"], ["hinge"], ["ipo", "sft"]], ids="+".join)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_alphapo_matches_the_reference(backend, types_, dtype, monkeypatch):
    if backend == "triton":
        from rlkern.kernels import preference as kernel

        monkeypatch.setattr(kernel, "MAX_BLOCK", 16)
    c, r, nc, nr, pw = _free_pairs(n=37, seed=40, dtype=dtype)
    c, r = c / 10, r / 10  # log-probs of a few nats: AlphaPO's e^(-alpha x) stays moderate
    kw = dict(loss_type=types_, beta=0.5, label_smoothing=0.1 if types_[0] in ("simpo", "sigmoid") else 0.0,
              simpo_gamma=0.3, chosen_lengths=nc, rejected_lengths=nr, pair_weights=pw.to(dtype), alpha=0.4)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    _compare(_ours(c, r, None, None, **kw), _oracle(c, r, None, None, **kw), **tol)


def test_gradcheck_alphapo_float64(backend):
    c, r, nc, nr, pw = _free_pairs(n=5, seed=41)
    c, r = (c / 10).requires_grad_(), (r / 10).requires_grad_()
    for types_ in (["simpo", "hinge", "sigmoid", "sft"], ["ipo"]):
        def f(a, b):
            return rlkern.preference_loss(a, b, loss_type=types_, beta=0.7, label_smoothing=0.1, chosen_lengths=nc,
                                          rejected_lengths=nr, pair_weights=pw, alpha=-0.3)[0]

        assert torch.autograd.gradcheck(f, (c, r))


def test_orpo_log_odds_metrics_match_the_reference(backend):
    c, r, nc, nr, pw = _free_pairs(n=9, seed=42, dtype=torch.float32)
    kw = dict(loss_type=["orpo", "sft"], beta=0.3, chosen_lengths=nc, rejected_lengths=nr)
    ours = _ours(c, r, None, None, **kw)
    want = _oracle(c, r, None, None, **kw)
    assert set(ours[3]) == set(METRIC_KEYS) | {"log_odds_ratio", "log_odds_chosen"}
    for key in ("log_odds_ratio", "log_odds_chosen"):
        torch.testing.assert_close(ours[3][key].double(), want[3][key], rtol=2e-5, atol=2e-6, msg=key)
    assert "log_odds_ratio" not in _ours(c, r, None, None, **dict(kw, loss_type="simpo"))[3]


@pytest.mark.parametrize("bad", [dict(loss_type="orpo"), dict(loss_type="sigmoid", f_divergence_type="js_divergence"),
                                 dict(loss_type="sigmoid", reference=True)])
def test_alphapo_bad_calls(bad):
    c = -torch.rand(3)
    refs = (c, c) if bad.pop("reference", False) else ()
    with pytest.raises(ValueError, match="alpha \\(AlphaPO\\) applies to") as info:
        rlkern.preference_loss(c, c, *refs, alpha=0.5, chosen_lengths=torch.ones(3), rejected_lengths=torch.ones(3),
                               **bad)
    assert str(info.value).startswith("preference_loss: ")


def test_xpo_with_trls_ipo_variant(backend):
    # TRL's XPOTrainer with loss_type="ipo": (logits - 1 / (2 beta))^2 + alpha * s
    c, r, rc, rr, *_ = _pairs(n=6, seed=43)
    s = -torch.rand(6, dtype=torch.float64) * 10
    ones = torch.ones(6)
    loss, gc, gr, ge, _ = _ours3(c, r, s, rc, rr, "sampled_logps", loss_type=["ipo", "xpo", "sigmoid"],
                                 loss_weights=[1.0, 1.0, -1.0], beta=0.3, xpo_alpha=0.2, chosen_lengths=ones,
                                 rejected_lengths=ones)
    leaves = [t.clone().requires_grad_() for t in (c, r, s)]
    logits = (leaves[0] - rc) - (leaves[1] - rr)
    want = ((logits - 1 / (2 * 0.3)) ** 2 + 0.2 * leaves[2]).mean()
    grads = torch.autograd.grad(want, leaves)
    torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=1e-12)
    for ours, theirs in zip((gc, gr, ge), grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_cpp_kernel_does_not_depend_on_the_thread_count(monkeypatch):
    # the C++ kernel's parallel passes add fixed chunks' partial sums in chunk order
    monkeypatch.setenv("RLKERN_BACKEND", "cpp")
    c, r, rc, rr, nc, nr, pw, ex = _paper_case(n=3 * 1024 + 5, seed=44, dtype=torch.float32)
    kw = dict(loss_type=["sigmoid", "ipo", "xpo", "sppo", "sft"], beta=0.3, chosen_lengths=nc, rejected_lengths=nr,
              pair_weights=pw.float(), sampled_logps=ex["sampled"], chosen_win_rates=ex["win"][0],
              rejected_win_rates=ex["win"][1])
    threads = torch.get_num_threads()
    results = []
    try:
        for n_threads in (1, 3):
            torch.set_num_threads(n_threads)
            leaf = c.clone().requires_grad_()
            loss, metrics = rlkern.preference_loss(leaf, r, rc, rr, **kw)
            results.append((loss.detach(), torch.autograd.grad(loss, leaf)[0], torch.stack(list(metrics.values()))))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("types_", PAPER_LISTS, ids="+".join)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_paper_half_inputs_compute_in_float32(backend, types_, dtype):
    c, r, rc, rr, nc, nr, pw, ex = _paper_case(n=11, seed=45, dtype=dtype)
    rc, rr = _paper_refs(types_, None if rc is None else rc.float(), None if rr is None else rr.float())
    kw = _paper_kw(types_, ex, loss_type=types_, beta=0.4, label_smoothing=0.1, chosen_lengths=nc,
                   rejected_lengths=nr, xpo_alpha=0.3, vpo_alpha=0.5, inpo_tau=0.2, inpo_eta=1.5, cpl_lambda=0.8)
    name = _extra_name(types_)
    ours = _ours3(c, r, ex["sampled"], rc, rr, name, **kw)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == dtype and ours[3].dtype == dtype
    want = _oracle3(c, r, ex["sampled"], rc, rr, name, **kw)
    # the kernels see the same half values as the oracle: only the gradients' rounding to dtype differs
    _compare3((ours[0], *(g.float() for g in ours[1:4]), ours[4]),
              (want[0], *(g.to(dtype).double() for g in want[1:4]), want[4]), rtol=2e-5, atol=2e-6)
