"""policy_loss / kl_penalty / aggregate / value_loss vs the float64 reference, verl 0.9.1, TRL 1.16 and
(when installed) OpenRLHF 0.11.2; the kernels' launch count, instruction sets and sm_90 compilation.

Backends: "cpp" (the C++ kernel, the CPU default), "triton" (the Triton kernels under
TRITON_INTERPRET=1 on CPU tensors), "torch" (the reference itself, run through the op layer).
Sizes are small (B <= 7, T <= 37): the interpreter runs every combination in seconds; odd B and
T so that no block, vector width or grain divides them.
"""

import importlib
import importlib.util
import itertools
import os
import pathlib
import subprocess
import sys
import types
from collections import defaultdict

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rlkern.ops.policy_loss as P
import rlkern.ops.policy_loss._autograd as PA
import rlkern.ops.policy_loss.corrections as PC
from rlkern.ops import _layout
from rlkern.ops.logprobs import token_logprobs
from rlkern import _backend
from rlkern.reference import policy_loss as reference
from conftest import import_peer, compile_for_sm90

ALL_LOSSES = list(reference.LOSSES)
ESTIMATORS = ["k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl", "k1+", "k3+", "low_var_kl+", "abs+"]
KEYS = P.METRIC_KEYS


def _batch(B=5, T=13, seed=0, spread=0.4, ragged=False):
    """float64 master tensors; row 2 fully masked (an empty sequence), random holes elsewhere.

    ragged: rows have lengths (row 0 the full T, row 2 none, the others 1..T), the mask is 0
    past them, and the packed layout of ``_ours`` holds each row's own tokens only."""
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * spread
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[2 % B] = False
    ent = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    ref = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    isw = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5
    b = dict(lp=lp, old=old, adv=adv, mask=mask, ent=ent, ref=ref, isw=isw)
    if ragged:
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[0] = T
        lengths[2 % B] = 0
        b["inside"] = torch.arange(T)[None, :] < lengths[:, None]
        b["mask"] = mask & b["inside"]
    return b


def _loss_kwargs(loss):
    return dict(loss=loss, clip_high=0.28, dual_clip=3.0 if loss in ("ppo", "dppo_tv", "dppo_kl") else None,
                dro_beta=0.2, clip_cov_ratio=0.2, clip_cov_lb=-1.0, kl_cov_ratio=0.1)


def _reference(b, loss, agg, est, lsf=None, seed=3, adv=None, level="token", extra=None):
    """float64 reference loss, metrics and grads (autograd), with the cov selections drawn as rlkern does."""
    lp = b["lp"].clone().requires_grad_()
    ent = b["ent"].clone().requires_grad_()
    adv = b["adv"] if adv is None else adv
    kw = _loss_kwargs(loss)
    select = None
    if loss == "clip_cov":
        torch.manual_seed(seed)
        select = reference.clip_cov_select(lp, b["old"], adv if adv.ndim == 2 else adv[:, None], b["mask"], 0.2,
                                           0.28, 0.2, -1.0, 5.0)
    if loss == "kl_cov":
        select = reference.kl_cov_select(lp, adv if adv.ndim == 2 else adv[:, None], b["mask"], 0.1)
    total, metrics = reference.policy_loss(
        lp, b["old"], adv, b["mask"], loss=loss, clip_high=0.28, dual_clip=kw["dual_clip"], ref_logprobs=b["ref"],
        kl_coef=0.3, kl_estimator=est, entropy=ent, entropy_coef=0.05, agg=agg, is_weights=b["isw"], select=select,
        dro_beta=0.2, loss_scale_factor=lsf, level=level, **(extra or {}))
    total.backward()
    return total.detach(), metrics, lp.grad, ent.grad


def _ours(b, loss, agg, est, dtype=torch.float32, packed=False, lsf=None, seed=3, adv=None, level="token",
          extra=None):
    mask = b["mask"]
    adv = b["adv"] if adv is None else adv
    cu = None
    conv = lambda t: t.to(dtype)  # noqa: E731
    inside = b.get("inside", torch.ones_like(mask))
    if packed:
        cu = torch.cat([torch.zeros(1, dtype=torch.long), inside.sum(-1).cumsum(0)]).to(torch.int32)
        conv = lambda t: t.to(dtype)[inside]  # noqa: E731
    lp = conv(b["lp"]).clone().requires_grad_()
    ent = conv(b["ent"]).clone().requires_grad_()
    torch.manual_seed(seed)
    total, metrics = P.policy_loss(
        lp, conv(b["old"]), conv(adv) if adv.ndim == 2 else adv.to(dtype), conv(mask) if packed else mask,
        ref_logprobs=conv(b["ref"]), kl_coef=0.3, kl_estimator=est, entropy=ent, entropy_coef=0.05, agg=agg,
        is_weights=conv(b["isw"]), cu_seqlens=cu, loss_scale_factor=lsf, level=level,
        advantages_per_sequence=(adv.ndim == 1) if packed else None, **_loss_kwargs(loss), **(extra or {}))
    total.backward()
    if not packed:
        return total.detach(), torch.stack([metrics[k] for k in KEYS]), lp.grad, ent.grad
    grads = []
    for grad in (lp.grad, ent.grad):
        full = grad.new_zeros(b["lp"].shape)
        full[inside] = grad
        grads.append(full)
    return total.detach(), torch.stack([metrics[k] for k in KEYS]), *grads


# A hyper list of the custom ops, built by field name (rlkern/reference/policy_loss.py HYPER_FIELDS).
_HYPER = reference.hyper_list(clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.1, entropy_coef=0.01,
                              dp_size=1.0, loss_scale_factor=None, tau_pos=1.0, tau_neg=1.05, dro_beta=None,
                              ppo_kl_coef=0.1, global_tokens=None, global_seqs=12.0,
                              kl_bias_correction=False)


def test_hyper_and_stats_schema_is_one_across_python_triton_and_cpp():
    """The float hyper-parameters travel as a list and the statistics as columns: Python, the Triton
    launcher and the C++ parser all read them by the names of one schema; reordering a field on
    one side only would give wrong numbers silently, so the C++ parser's own order is compared."""
    cpp = torch.ops.rlkern.cpp_policy_loss_schema()
    assert cpp == ("hyper:" + ",".join(reference.HYPER_FIELDS) + "; stats:" + ",".join(reference.STAT_FIELDS))
    assert [PA.H_CLIP_LOW, PA.H_DUAL, PA.H_LSF, PA.H_GTOK, PA.H_GSEQ] == [
        reference.HYPER_FIELDS.index(n) for n in ("clip_low", "dual_clip", "loss_scale_factor", "global_tokens",
                                                  "global_seqs")]
    assert P.N_STATS == len(reference.STAT_FIELDS) and PA.S_SLR == reference.STAT_FIELDS.index("seq_log_ratio")
    assert dict(zip(reference.HYPER_FIELDS, _HYPER))["global_seqs"] == 12.0
    with pytest.raises(TypeError, match="hyper_list: fields"):
        reference.hyper_list(clip_low=0.2)


def _close(ours, ref, atol=2e-5, rtol=2e-5, name=""):
    torch.testing.assert_close(ours.double(), ref.double(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


# Every loss x agg mode, padded and packed, one estimator per combination (all estimators are
# swept in test_estimators): the fp32 kernels against the fp64 reference, forward and backward.
@pytest.mark.parametrize("loss", ALL_LOSSES)
@pytest.mark.parametrize("agg", P.AGG_MODES)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_matches_reference(backend, loss, agg, packed):
    est = ESTIMATORS[(ALL_LOSSES.index(loss) + P.AGG_MODES.index(agg)) % len(ESTIMATORS)]
    b = _batch(seed=ALL_LOSSES.index(loss), ragged=packed)
    lsf = 13.0 if packed else None
    ref_total, ref_metrics, ref_g, ref_ge = _reference(b, loss, agg, est, lsf=lsf)
    total, metrics, g, ge = _ours(b, loss, agg, est, packed=packed, lsf=lsf)
    assert total.dtype == torch.float32 and metrics.dtype == torch.float32
    # fp32 token math summed over <= 65 tokens: a few ulp of the largest terms
    _close(total, ref_total, name="loss")
    _close(metrics, ref_metrics, name="metrics")
    _close(g, ref_g, name="grad logprobs")
    _close(ge, ref_ge, name="grad entropy")
    assert (g[~b["mask"]] == 0).all() and (ge[~b["mask"]] == 0).all()


# One case per loss and level, so that a parallel run (pytest -n) spreads the product.
_PRODUCT_CASES = [(loss, "token") for loss in ALL_LOSSES] + [(loss, "sequence") for loss in ("ppo", "cispo", "sapo")]


@pytest.mark.parametrize("loss,level", _PRODUCT_CASES, ids=[f"{loss}-{level}" for loss, level in _PRODUCT_CASES])
def test_every_loss_estimator_agg_combination(backend, loss, level):
    # The full product: 12 losses x 11 estimators x 5 agg modes x padded / packed, and the three
    # losses with TRL's level="sequence" likewise, one small ragged batch each (rows of lengths
    # 9, 0 and random, packed without padding); under the interpreter, where a launch costs
    # ~40 ms, the layouts alternate instead.
    b = _batch(B=4, T=9, seed=30, ragged=True)
    combos = [(loss, agg, est, level) for agg, est in itertools.product(P.AGG_MODES, ESTIMATORS)]
    for i, (loss, agg, est, level) in enumerate(combos):
        ref = _reference(b, loss, agg, est, lsf=9.0, level=level)
        for packed in ((i % 2 == 1,) if backend == "triton" else (False, True)):
            ours = _ours(b, loss, agg, est, packed=packed, lsf=9.0, level=level)
            for name, x, y in zip(("loss", "metrics", "grad", "grad entropy"), ours, ref):
                _close(x, y, atol=5e-5, rtol=5e-5, name=f"{loss} {level} {agg} {est} packed={packed} {name}")


# TRL's importance_sampling_level="sequence": the ratio is exp of the sequence's mean log-ratio,
# and the gradient of ppo / sapo reaches every token through that mean (cispo's through its
# own logprob). The spread of 0.8 clips some sequences and leaves others inside the range.
@pytest.mark.parametrize("loss", ["ppo", "cispo", "sapo"])
@pytest.mark.parametrize("agg", P.AGG_MODES)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_sequence_level_matches_reference(backend, loss, agg, packed):
    est = ESTIMATORS[P.AGG_MODES.index(agg) % len(ESTIMATORS)]
    b = _batch(B=7, T=11, seed=40 + P.AGG_MODES.index(agg), spread=0.8)
    lsf = 11.0 if packed else None
    ref = _reference(b, loss, agg, est, lsf=lsf, level="sequence")
    ours = _ours(b, loss, agg, est, packed=packed, lsf=lsf, level="sequence")
    clipped = ref[1][P.METRIC_KEYS.index("clipfrac")]
    assert 0 < clipped < 1 or loss == "sapo"  # both branches of the clip are exercised
    for name, x, y in zip(("loss", "metrics", "grad", "grad entropy"), ours, ref):
        _close(x, y, name=name)
    assert (ours[2][~b["mask"]] == 0).all()


@pytest.mark.parametrize("est", ESTIMATORS)
@pytest.mark.parametrize("loss", ["ppo", "gspo", "cispo"])
def test_estimators(backend, est, loss):
    b = _batch(seed=11)
    b["ref"] = b["lp"] + torch.randn(b["lp"].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    b["ref"][0, :3] = b["lp"][0, :3] + torch.tensor([25.0, -25.0, 12.0], dtype=torch.float64)  # k3 clamps
    ref = _reference(b, loss, "token-mean", est)
    ours = _ours(b, loss, "token-mean", est)
    for name, x, y in zip(("loss", "metrics", "grad", "grad entropy"), ours, ref):
        _close(x, y, atol=1e-4, name=name)  # k3 at |log-ratio| ~ 20: e^20 * fp32 eps


# --- TRL 1.16 options: the bias-corrected KL, the off-policy sequence mask, per-sequence metrics ---

@pytest.mark.parametrize("loss,level", [("ppo", "token"), ("ppo", "sequence"), ("cispo", "token"),
                                        ("cispo", "sequence"), ("sapo", "sequence"), ("sapo", "token"),
                                        ("gspo", "token"), ("reinforce", "token")])
@pytest.mark.parametrize("est", ["k3", "k1", "k2+"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_kl_bias_correction_matches_reference(backend, loss, level, est, packed):
    """KL x ratio, the gradient through the ratio (at level="sequence" through the sequence mean):
    loss, metrics (kl_ref is the corrected estimate) and both gradients against the float64 reference."""
    b = _batch(B=5, T=13, seed=21, ragged=packed)
    extra = {"kl_bias_correction": True}
    agg = "seq-mean-token-mean" if level == "sequence" else "token-mean"
    ref = _reference(b, loss, agg, est, level=level, extra=extra)
    plain = _reference(b, loss, agg, est, level=level)
    assert (ref[1][KEYS.index("kl_ref")] - plain[1][KEYS.index("kl_ref")]).abs() > 1e-4  # the option matters
    for dtype, tol in ((torch.float32, 2e-5), (torch.float64, 1e-10)):
        ours = _ours(b, loss, agg, est, dtype=dtype, packed=packed, level=level, extra=extra)
        for name, x, y in zip(("loss", "metrics", "grad", "grad entropy"), ours, ref):
            t = 2e-5 if name == "metrics" else tol  # metrics are float32 for every input dtype
            _close(x, y, atol=t, rtol=t, name=f"{dtype} {name}")


@pytest.mark.parametrize("est", ["k3_unclamped", "k3_unclamped+"])
def test_k3_unclamped_matches_reference(backend, est):
    """TRL's beta term: k3 past verl's bounds (values > 10 here), in policy_loss and kl_penalty."""
    b = _batch(B=5, T=13, seed=26)
    g = torch.Generator().manual_seed(3)
    b["ref"] = b["lp"] + torch.randn(b["lp"].shape, generator=g, dtype=torch.float64) * 3
    unclamped = reference.kl_penalty(b["lp"], b["ref"], est)
    assert unclamped.max() > 10 and not torch.equal(unclamped, reference.kl_penalty(b["lp"], b["ref"], "k3"))
    for level, extra in (("token", None), ("sequence", {"kl_bias_correction": True})):
        ref = _reference(b, "ppo", "token-mean", est, level=level, extra=extra)
        ours = _ours(b, "ppo", "token-mean", est, level=level, extra=extra)
        for name, x, y in zip(("loss", "metrics", "grad", "grad entropy"), ours, ref):
            _close(x, y, atol=1e-4, name=f"{level} {name}")  # e^|x| ~ e^9 times fp32 eps
    lp = b["lp"].clone().requires_grad_()
    want = reference.kl_penalty(lp, b["ref"], est)
    want.sum().backward()
    for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-9)):
        x = b["lp"].to(dtype).requires_grad_()
        got = P.kl_penalty(x, b["ref"].to(dtype), kl_estimator=est)
        got.sum().backward()
        _close(got, want.detach(), atol=tol, rtol=tol, name=f"kl_penalty {dtype}")
        _close(x.grad, lp.grad, atol=tol, rtol=tol, name=f"kl_penalty grad {dtype}")


def test_kl_bias_correction_bf16(backend):
    # bf16 inputs read by the kernels, computed in fp32: the reference on the bf16-rounded values bounds them
    b = _batch(B=6, T=17, seed=22)
    rounded = {k: (v.to(torch.bfloat16).double() if v.dtype == torch.float64 else v) for k, v in b.items()}
    for level in ("token", "sequence"):
        extra = {"kl_bias_correction": True}
        ours = _ours(b, "ppo", "token-mean", "k3", dtype=torch.bfloat16, level=level, extra=extra)
        ref = _reference(rounded, "ppo", "token-mean", "k3", level=level, extra=extra)
        _close(ours[0], ref[0], atol=1e-4, name="bf16 loss")
        _close(ours[2], ref[2], atol=2e-3, rtol=1e-2, name="bf16 grad")


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("behaviour", ["old", "rollout"])
def test_off_policy_mask_matches_reference(backend, packed, behaviour):
    """The off-policy sequence mask equals the reference run with its weights as is_weights."""
    b = _batch(B=7, T=11, seed=23, ragged=packed)
    g = torch.Generator().manual_seed(1)
    rollout = b["old"] + torch.randn(b["old"].shape, generator=g, dtype=torch.float64) * 0.3
    seq_adv = torch.randn(7, generator=g, dtype=torch.float64)
    behaviour_lp = rollout if behaviour == "rollout" else b["old"]
    keep = reference.off_policy_mask(b["lp"], behaviour_lp, seq_adv, b["mask"], 0.05)
    assert 0 < keep[b["mask"]].mean() < 1  # some sequences dropped, some kept
    ref = _reference(dict(b, isw=b["isw"] * keep), "ppo", "token-mean", "k3", adv=seq_adv)
    inside = b.get("inside", torch.ones_like(b["mask"]))
    extra = {"off_policy_mask_threshold": 0.05}
    if behaviour == "rollout":
        extra["rollout_logprobs"] = rollout.float()[inside] if packed else rollout.float()
    ours = _ours(b, "ppo", "token-mean", "k3", packed=packed, adv=seq_adv, extra=extra)
    for name, x, y in zip(("loss", "metrics", "grad", "grad entropy"), ours, ref):
        _close(x, y, name=name)


@pytest.mark.peer
def test_off_policy_mask_matches_trl():
    grpo = import_peer("trl.trainer.grpo_trainer")
    b = _batch(B=7, T=11, seed=24)
    g = torch.Generator().manual_seed(2)
    sampling = b["old"] + torch.randn(b["old"].shape, generator=g, dtype=torch.float64) * 0.3
    sampling[1, 3] = float("nan")  # a token vLLM could not score
    for adv in (torch.randn(7, 1, generator=g, dtype=torch.float64), b["adv"]):
        theirs = grpo.GRPOTrainer.get_off_policy_mask(adv, b["lp"], sampling, b["mask"].long(), 0.04)
        ours = reference.off_policy_mask(b["lp"], sampling, adv.squeeze(1) if adv.shape[1] == 1 else adv,
                                         b["mask"].long(), 0.04)
        torch.testing.assert_close(ours, theirs.expand_as(ours).double())


@pytest.mark.parametrize("loss,level", [("ppo", "token"), ("ppo", "sequence"), ("cispo", "token"),
                                        ("gspo", "token"), ("cispo", "sequence")])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_sequence_metrics(backend, loss, level, packed):
    """clipfrac_low_min / clipfrac_high_max / seq_clipfrac* from the kernels' per-sequence sums
    (the reference's on the torch backend) against the float64 reference; the other metrics unchanged."""
    b = _batch(B=7, T=11, seed=25, spread=0.8, ragged=packed)
    sums = reference.sequence_sums(b["lp"], b["old"], b["adv"], b["mask"], loss=loss, clip_high=0.28,
                                   dual_clip=3.0 if loss == "ppo" else None, level=level)
    want = reference.sequence_metrics(sums)
    assert want[0] < want[1] and (want[2:] > 0).all()  # per-sequence fractions that differ
    # by hand: the per-sequence fractions of the clipped tokens of the live rows
    live = sums[:, 0] > 0
    frac_low = sums[live, 2] / sums[live, 0]
    torch.testing.assert_close(want[0], frac_low.min())
    torch.testing.assert_close(want[3], frac_low.sum() / 7)
    extra = {"sequence_metrics": True}
    mask, inside = b["mask"], b.get("inside", torch.ones_like(b["mask"]))
    conv = (lambda t: t.float()[inside]) if packed else (lambda t: t.float())  # noqa: E731
    cu = torch.cat([torch.zeros(1, dtype=torch.long), inside.sum(-1).cumsum(0)]) if packed else None
    _, metrics = P.policy_loss(conv(b["lp"]), conv(b["old"]), conv(b["adv"]), conv(mask) if packed else mask,
                               loss=loss, clip_high=0.28, dual_clip=3.0 if loss == "ppo" else None,
                               level=level, cu_seqlens=cu, **extra)
    got = torch.stack([metrics[k] for k in reference.SEQUENCE_METRIC_KEYS])
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)
    _, plain = P.policy_loss(conv(b["lp"]), conv(b["old"]), conv(b["adv"]), conv(mask) if packed else mask,
                             loss=loss, clip_high=0.28, dual_clip=3.0 if loss == "ppo" else None,
                             level=level, cu_seqlens=cu)
    assert set(plain) == set(KEYS) and all(torch.equal(plain[k], metrics[k]) for k in KEYS)


def test_per_sequence_advantages_and_bf16(backend):
    b = _batch(B=7, T=11, seed=5)
    seq_adv = torch.randn(7, dtype=torch.float64)
    expanded = _ours(b, "ppo", "seq-mean-token-mean", "k3", adv=seq_adv[:, None].expand(7, 11).contiguous())
    broadcast = _ours(b, "ppo", "seq-mean-token-mean", "k3", adv=seq_adv)
    for x, y in zip(expanded, broadcast):
        torch.testing.assert_close(x, y)
    for packed in (False, True):
        torch.testing.assert_close(_ours(b, "gspo", "token-mean", "k1", adv=seq_adv, packed=packed)[0],
                                   _reference(b, "gspo", "token-mean", "k1", adv=seq_adv)[0].float(), atol=2e-5,
                                   rtol=2e-5)
    # bf16 inputs: the kernels read bf16 and compute in fp32, so the error is that of rounding the
    # inputs to bf16; the reference on the same bf16-rounded values is the bound.
    rounded = {k: (v.to(torch.bfloat16).double() if v.dtype == torch.float64 else v) for k, v in b.items()}
    ours = _ours(b, "ppo", "token-mean", "k3", dtype=torch.bfloat16)
    ref = _reference(rounded, "ppo", "token-mean", "k3")
    _close(ours[0], ref[0], atol=1e-4, name="bf16 loss")
    _close(ours[2], ref[2], atol=2e-3, rtol=1e-2, name="bf16 grad")  # grads are stored in bf16


def test_bf16_read_and_written_in_place(monkeypatch):
    # The C++ kernel reads bf16 inputs and writes bf16 gradients without a float32 copy: the bf16
    # run must equal, bit for bit, the float32 run on the same (bf16-valued) inputs with its
    # gradients rounded by torch (round to nearest even), also with mixed input dtypes and at a
    # NaN gradient. (The Triton kernels round on the GPU's cvt.rn; the interpreter's numpy
    # conversion differs in the last bit, so they are covered by the tolerance tests above.)
    monkeypatch.setenv("RLKERN_BACKEND", "cpp")
    b = _batch(B=5, T=19, seed=8)
    b["adv"][0, 0] = float("nan")  # a NaN gradient there
    b["mask"][0, 0] = True
    bf = {k: v.to(torch.bfloat16) if v.dtype == torch.float64 else v for k, v in b.items()}

    def run(dtype, old_dtype):
        lp = bf["lp"].to(dtype).clone().requires_grad_()
        ent = bf["ent"].to(dtype).clone().requires_grad_()
        total, metrics = P.policy_loss(lp, bf["old"].to(old_dtype), bf["adv"].to(dtype), bf["mask"], dual_clip=3.0,
                                       ref_logprobs=bf["ref"].to(old_dtype), kl_coef=0.2, entropy=ent,
                                       entropy_coef=0.01, is_weights=bf["isw"].to(dtype), agg="seq-mean-token-mean")
        total.backward(torch.tensor(0.75))
        return lp.grad, ent.grad

    fp32 = run(torch.float32, torch.float32)
    for old_dtype in (torch.bfloat16, torch.float32):
        grads = run(torch.bfloat16, old_dtype)
        for g, ref in zip(grads, fp32):
            assert g.dtype == torch.bfloat16
            torch.testing.assert_close(g, ref.to(torch.bfloat16), atol=0, rtol=0, equal_nan=True)
    assert grads[0][0, 0].isnan()


def test_ragged_packed_matches_padded(backend):
    # Packed sequences of lengths 0..9 vs the same sequences right-padded to width 9.
    lengths = torch.tensor([4, 0, 9, 1, 6])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    total = int(lengths.sum())
    g = torch.Generator().manual_seed(2)
    lp = -torch.rand(total, generator=g) * 2
    old = lp + torch.randn(total, generator=g) * 0.3
    adv = torch.randn(5, generator=g)
    ent = torch.rand(total, generator=g)
    pad = lambda t: _layout.pad(t, cu, 9)  # noqa: E731
    mask = pad(torch.ones(total, dtype=torch.bool))
    for loss, agg in [("ppo", "seq-mean-token-mean"), ("gspo", "token-mean"), ("cispo", "seq-mean-token-sum-norm")]:
        kw = dict(loss=loss, agg=agg, entropy_coef=0.1, dual_clip=3.0 if loss == "ppo" else None, loss_scale_factor=9)
        a = lp.clone().requires_grad_()
        ea = ent.clone().requires_grad_()
        la, ma = P.policy_loss(a, old, adv, None, cu_seqlens=cu, entropy=ea, **kw)
        (la * 2).backward()
        bb = pad(lp).requires_grad_()
        eb = pad(ent).requires_grad_()
        lb, mb = P.policy_loss(bb, pad(old), adv, mask, entropy=eb, **kw)
        (lb * 2).backward()
        torch.testing.assert_close(la, lb, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(torch.stack(list(ma.values())), torch.stack(list(mb.values())), atol=1e-6,
                                   rtol=1e-5)
        torch.testing.assert_close(a.grad, _layout.unpad(bb.grad, cu, total), atol=1e-7, rtol=1e-5)
        torch.testing.assert_close(ea.grad, _layout.unpad(eb.grad, cu, total), atol=1e-7, rtol=1e-5)


def test_packed_total_equal_to_batch_is_disambiguated(backend):
    # Two sequences of lengths 2 and 0: total == B, so [B] advantages could be either layout. They
    # must be named (None raises), and per-sequence ones must reach every token of their sequence.
    cu = torch.tensor([0, 2, 2])
    lp = torch.tensor([-1.0, -2.0])
    adv = torch.tensor([1.0, -5.0])
    with pytest.raises(ValueError, match="advantages_per_sequence"):
        P.policy_loss(lp, lp, adv, None, cu_seqlens=cu, loss="reinforce")
    for per_sequence, token_adv in [(True, torch.tensor([1.0, 1.0])), (False, adv)]:
        a = lp.clone().requires_grad_()
        total, _ = P.policy_loss(a, lp, adv, None, cu_seqlens=cu, loss="reinforce",
                                 advantages_per_sequence=per_sequence)
        total.backward()
        r = lp.double()[None].clone().requires_grad_()
        ref_total, _ = reference.policy_loss(r, lp.double()[None], token_adv.double()[None],
                                             torch.ones(1, 2, dtype=torch.bool), loss="reinforce")
        ref_total.backward()
        _close(total, ref_total, name=f"per_sequence={per_sequence}")
        _close(a.grad, r.grad[0], name=f"per_sequence={per_sequence}")
    with pytest.raises(ValueError, match="advantages_per_sequence"):
        P.policy_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), None, cu_seqlens=torch.tensor([0, 1, 3]),
                      advantages_per_sequence=True)


def test_trl_presets_need_global_seqs_with_data_parallel():
    # The local B stands in for global_seqs only at dp_size 1; with dp_size > 1 it would scale
    # the loss by dp_size, so the presets require global_seqs like the verl modes they map to.
    values, mask = torch.rand(4, 5), torch.ones(4, 5)
    for agg in ("grpo", "dr_grpo"):
        with pytest.raises(ValueError, match="global_seqs"):
            P.aggregate(values, mask, agg=agg, dp_size=2)
        local = P.aggregate(values, mask, agg=agg)
        torch.testing.assert_close(P.aggregate(values, mask, agg=agg, dp_size=2, global_seqs=8), local)


def test_metrics_are_float32_for_float64_input():
    b = _batch(seed=6)
    _, metrics = P.policy_loss(b["lp"], b["old"], b["adv"], b["mask"], dual_clip=3.0)
    assert b["lp"].dtype == torch.float64 and all(m.dtype == torch.float32 for m in metrics.values())


@pytest.mark.parametrize("config", [
    dict(rollout_is="token", rollout_is_threshold=1.3, rollout_is_batch_normalize=True),
    dict(rollout_is="sequence", rollout_is_threshold="0.5_1.6", rollout_is_batch_normalize=True),
    dict(rollout_is="sequence", rollout_is_threshold=2.0, rollout_rs="seq_max_k2,token_k1",
         rollout_rs_threshold="0.05,0.7_1.4"),
    dict(rollout_rs="seq_sum_k1,seq_mean_k3", rollout_rs_threshold="0.2_4.0,0.04"),
])
@pytest.mark.parametrize("with_mask", [True, False])
def test_packed_rollout_correction_matches_padded(config, with_mask):
    # Packed rollout correction runs segment reductions (no padding, no host read of the longest
    # sequence); it must give the padded path's weights, rejection mask, loss and gradient.
    # Lengths include an empty sequence; the mask has holes and a fully masked sequence.
    lengths = torch.tensor([5, 0, 11, 1, 7, 3])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)
    total, width = int(lengths.sum()), 11
    g = torch.Generator().manual_seed(4)
    lp = -torch.rand(total, generator=g) * 2
    old = lp + torch.randn(total, generator=g) * 0.2
    rollout = old + torch.randn(total, generator=g) * 0.3
    adv = torch.randn(total, generator=g)
    mask = torch.rand(total, generator=g) > 0.2
    mask[cu[4]:cu[5]] = False
    if not with_mask:
        mask = None
    pad = lambda t: _layout.pad(t, cu, width)  # noqa: E731
    padded_mask = pad(torch.ones(total, dtype=torch.bool) if mask is None else mask)
    kw = dict(loss="ppo", agg="seq-mean-token-sum", dual_clip=3.0, **config)
    a = lp.clone().requires_grad_()
    la, ma = P.policy_loss(a, old, adv, mask, cu_seqlens=cu, rollout_logprobs=rollout, **kw)
    la.backward()
    b = pad(lp).requires_grad_()
    lb, mb = P.policy_loss(b, pad(old), pad(adv), padded_mask, rollout_logprobs=pad(rollout), **kw)
    lb.backward()
    assert lb != 0
    torch.testing.assert_close(la, lb, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.stack(list(ma.values())), torch.stack(list(mb.values())), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a.grad, _layout.unpad(b.grad, cu, total), atol=1e-7, rtol=1e-5)
    wa, mask_a = PC._rollout_correction(old, rollout, mask, cu, config.get("rollout_is"),
                                       config.get("rollout_is_threshold", 2.0),
                                       config.get("rollout_is_batch_normalize", False), config.get("rollout_rs"),
                                       config.get("rollout_rs_threshold"))
    wb, mask_b = reference.rollout_correction(pad(old), pad(rollout), padded_mask, config.get("rollout_is"),
                                              config.get("rollout_is_threshold", 2.0),
                                              config.get("rollout_is_batch_normalize", False),
                                              config.get("rollout_rs"), config.get("rollout_rs_threshold"))
    if wb is not None:
        torch.testing.assert_close(wa, _layout.unpad(wb, cu, total))
    if "rollout_rs" in config:
        kept = _layout.unpad(mask_b, cu, total).float()
        assert 0 < kept.sum() < (total if mask is None else mask.sum())  # the rejection does something
        torch.testing.assert_close(mask_a.float(), kept)


@pytest.mark.parametrize("loss", ALL_LOSSES)
def test_empty_mask_all_clipped_zero_advantage(backend, loss):
    # Every loss x agg mode, padded and packed, on three edge batches against the float64
    # reference (KL, entropy bonus and IS weights on): an empty mask, a batch where every ratio
    # is outside the clip range (e^1 with A > 0, e^-1 with A < 0, per token and per sequence),
    # and A = 0. Then the properties themselves, with the policy term alone.
    base = _batch(B=3, T=7, seed=9, ragged=True)
    sign = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)[:, None].expand(3, 7)
    cases = {
        "empty": dict(base, mask=torch.zeros(3, 7, dtype=torch.bool)),
        "all clipped": dict(base, adv=sign.clone(), old=base["lp"] - sign, mask=base["inside"].clone()),
        "A = 0": dict(base, adv=torch.zeros(3, 7, dtype=torch.float64)),
    }
    for (case, b), agg in itertools.product(cases.items(), P.AGG_MODES):
        ref = _reference(b, loss, agg, "k3", lsf=7.0)
        for packed in (False, True):
            ours = _ours(b, loss, agg, "k3", packed=packed, lsf=7.0)
            for name, x, y in zip(("loss", "metrics", "grad", "grad entropy"), ours, ref):
                assert not x.isnan().any(), f"{case} {agg} packed={packed} {name}"
                _close(x, y, name=f"{case} {agg} packed={packed} {name}")

    kw = {k: v for k, v in _loss_kwargs(loss).items() if k != "loss"}
    for agg in P.AGG_MODES:
        lp = base["lp"].float().requires_grad_()
        ent = base["ent"].float().requires_grad_()
        total, metrics = P.policy_loss(lp, base["old"].float(), base["adv"].float(), torch.zeros(3, 7), loss=loss,
                                       agg=agg, entropy=ent, entropy_coef=0.1, ref_logprobs=base["ref"].float(),
                                       kl_coef=0.1, **kw)
        total.backward()
        assert total.item() == 0.0 and all(v.item() == 0.0 for v in metrics.values()), agg
        assert (lp.grad == 0).all() and (ent.grad == 0).all(), agg

        clipped = cases["all clipped"]
        lp = clipped["lp"].float().requires_grad_()
        total, metrics = P.policy_loss(lp, clipped["old"].float(), clipped["adv"].float(), clipped["mask"], loss=loss,
                                       agg=agg, **kw)
        total.backward()
        if loss in ("ppo", "gspo", "cispo"):  # (dppo's trust region is on probabilities, not ratios)
            assert metrics["clipfrac"].item() == pytest.approx(1.0), agg
            assert metrics["clipfrac_low"].item() + metrics["clipfrac_high"].item() == pytest.approx(1.0), agg
        if loss in ("ppo", "gspo"):  # the clip cuts the gradient
            assert (lp.grad == 0).all(), agg

        if loss not in ("kl_cov", "dro"):  # their penalty terms do not scale with A
            lp = base["lp"].float().requires_grad_()
            total, metrics = P.policy_loss(lp, base["old"].float(), torch.zeros(3, 7), base["mask"], loss=loss,
                                           agg=agg, **kw)
            total.backward()
            assert total.item() == 0.0 and (lp.grad == 0).all(), agg
            n = base["mask"].sum()
            approx_kl = ((base["old"] - base["lp"]) * base["mask"]).sum() / n
            assert metrics["approx_kl"].item() == pytest.approx(approx_kl.item(), abs=1e-5), agg


def test_global_normalizers(backend):
    b = _batch(seed=4)
    for agg, kw in [("token-mean", dict(global_tokens=torch.tensor(200.0), dp_size=4)),
                    ("seq-mean-token-mean", dict(global_seqs=16, dp_size=4)),
                    ("seq-mean-token-sum-norm", dict(global_seqs=16, dp_size=2, loss_scale_factor=32)),
                    ("token-sum", dict(dp_size=3))]:
        lp = b["lp"].float().requires_grad_()
        total, _ = P.policy_loss(lp, b["old"].float(), b["adv"].float(), b["mask"], agg=agg, **kw)
        total.backward()
        ref_lp = b["lp"].clone().requires_grad_()
        ref_total, _ = reference.policy_loss(ref_lp, b["old"], b["adv"], b["mask"], agg=agg, **kw)
        ref_total.backward()
        _close(total, ref_total, name=agg)
        _close(lp.grad, ref_lp.grad, name=agg)


def test_gradcheck_float64():
    b = _batch(B=3, T=5, seed=1, spread=0.1)
    # gspo, cispo and dppo are left out: their stop-gradients make the gradient differ by design
    # from the derivative of the value; test_matches_reference covers them.
    for loss, agg in [("ppo", "token-mean"), ("reinforce", "seq-mean-token-mean"), ("sapo", "seq-mean-token-sum"),
                      ("geo_mean", "token-mean"), ("dro", "seq-mean-token-sum-norm")]:
        def f(lp, ent):
            return P.policy_loss(lp, b["old"], b["adv"], b["mask"], loss=loss, agg=agg, ref_logprobs=b["ref"],
                                 kl_coef=0.2, entropy=ent, entropy_coef=0.1, dual_clip=3.0, dro_beta=0.3)[0]

        assert torch.autograd.gradcheck(f, (b["lp"].clone().requires_grad_(), b["ent"].clone().requires_grad_()))
    x = b["lp"].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: P.kl_penalty(t, b["ref"], kl_estimator="k3"), (x,))
    assert torch.autograd.gradcheck(lambda t: P.aggregate(t, b["mask"], agg="seq-mean-token-mean"), (x,))


def test_opcheck():
    b = _batch(B=3, T=6, seed=2)
    lp, old, adv, ent = (b[k].float() for k in ("lp", "old", "adv", "ent"))
    mask = b["mask"]
    hyper = _HYPER
    # the kernels' forward and backward, GSPO's two-pass and the sequence-level forms included
    for loss, level in (("ppo", "token"), ("gspo", "token"), ("geo_mean", "token"), ("ppo", "sequence")):
        args = (lp.clone().requires_grad_(), old, adv, mask, b["ref"].float(), ent.clone().requires_grad_(), None,
                None, None, None, None, loss, "token-mean", "token-mean", "k3", level, hyper)
        torch.library.opcheck(torch.ops.rlkern.policy_loss.default, args)
        _, _, stats = torch.ops.rlkern.policy_loss(*args)
        plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(torch.ops.rlkern.policy_loss_backward.default, (torch.tensor(1.0),) + plain[:11] + (stats,)
                              + plain[11:])
    torch.library.opcheck(torch.ops.rlkern.kl_penalty.default, (lp.clone().requires_grad_(), old, "k3+"))
    torch.library.opcheck(torch.ops.rlkern.aggregate.default,
                          (lp.clone().requires_grad_(), mask, None, None, torch.tensor(4.0), "seq-mean-token-sum", 2.0,
                           float("nan")))
    if _backend.has_cpp():
        inputs = (lp, old, adv, mask, b["ref"].float(), ent, None, None, None, torch.tensor(7.0), None)
        config = ("ppo", "token-mean", "seq-mean-token-mean", "k3", "token", hyper)
        torch.library.opcheck(torch.ops.rlkern.cpp_policy_loss.default, inputs + config)
        _, _, stats = torch.ops.rlkern.cpp_policy_loss(*inputs, *config)
        torch.library.opcheck(torch.ops.rlkern.cpp_policy_loss_backward.default,
                              (torch.tensor(0.5),) + inputs + (stats,) + config)


@pytest.mark.parametrize("loss", ["ppo", "gspo", "geo_mean"])
def test_torch_compile_fullgraph(loss):
    b = _batch(B=4, T=9, seed=6)

    def step(lp, ent):
        total, metrics = P.policy_loss(lp, b["old"].float(), b["adv"][:, 0].float(), b["mask"], loss=loss,
                                       dual_clip=3.0, entropy=ent, entropy_coef=0.01, ref_logprobs=b["ref"].float(),
                                       kl_coef=0.1, agg="seq-mean-token-mean", global_seqs=torch.tensor(4.0))
        kl = P.aggregate(P.kl_penalty(lp, b["ref"].float(), kl_estimator="k1+"), b["mask"], agg="token-mean")
        return total + kl, metrics["clipfrac"]

    lp = b["lp"].float().requires_grad_()
    ent = b["ent"].float().requires_grad_()
    out, clipfrac = torch.compile(step, fullgraph=True, backend="aot_eager")(lp, ent)
    out.backward()
    lp2 = b["lp"].float().requires_grad_()
    ent2 = b["ent"].float().requires_grad_()
    out2, clipfrac2 = step(lp2, ent2)
    out2.backward()
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(clipfrac, clipfrac2)
    torch.testing.assert_close(lp.grad, lp2.grad)
    torch.testing.assert_close(ent.grad, ent2.grad)


@pytest.mark.parametrize("name", ["cpp", "torch"])
def test_torch_func_grad(monkeypatch, name):
    # torch.func.grad through the eager autograd.Function (the custom ops' generated Function has no
    # setup_context, which functorch requires); the Triton launchers cannot read functorch's
    # wrapped tensors, so that backend is left out.
    monkeypatch.setenv("RLKERN_BACKEND", name)
    b = _batch(B=3, T=9, seed=24)

    def f(x):
        return P.policy_loss(x, b["old"].float(), b["adv"].float(), b["mask"], dual_clip=3.0,
                             ref_logprobs=b["ref"].float(), kl_coef=0.1)[0]

    x = b["lp"].float().requires_grad_()
    f(x).backward()
    torch.testing.assert_close(torch.func.grad(f)(b["lp"].float()), x.grad)


def test_bad_input():
    lp, old, adv = torch.randn(2, 5), torch.randn(2, 5), torch.randn(2)
    mask = torch.ones(2, 5)
    with pytest.raises(ValueError, match=r"policy_loss: old_logprobs must have shape \(2, 5\), got \(2, 4\)"):
        P.policy_loss(lp, old[:, :4], adv, mask)
    with pytest.raises(ValueError, match=r"policy_loss: advantages must be \(2, 5\) \(per token\) or \(2,\)"):
        P.policy_loss(lp, old, torch.randn(3), mask)
    with pytest.raises(TypeError, match="policy_loss: logprobs must be float16/bfloat16/float32/float64, got torch.int64"):
        P.policy_loss(lp.long(), old, adv, mask)
    with pytest.raises(ValueError, match="policy_loss: loss must be one of"):
        P.policy_loss(lp, old, adv, mask, loss="ppo2")
    with pytest.raises(ValueError, match="policy_loss: agg must be one of"):
        P.policy_loss(lp, old, adv, mask, agg="mean")
    with pytest.raises(ValueError, match="policy_loss: kl_estimator must be one of"):
        P.policy_loss(lp, old, adv, mask, kl_estimator="k4")
    with pytest.raises(ValueError, match="policy_loss: dual_clip must be a finite number > 1, got 0.5"):
        P.policy_loss(lp, old, adv, mask, dual_clip=0.5)
    with pytest.raises(ValueError, match="dro_beta"):
        P.policy_loss(lp, old, adv, mask, loss="dro")
    with pytest.raises(ValueError, match="policy_loss: global_tokens .* is required when dp_size > 1"):
        P.policy_loss(lp, old, adv, mask, dp_size=2)
    with pytest.raises(ValueError, match="policy_loss: response_mask is required"):
        P.policy_loss(lp, old, adv, None)
    cu = torch.tensor([0, 4, 10])
    with pytest.raises(ValueError, match="loss_scale_factor is required"):
        P.policy_loss(lp.reshape(-1), old.reshape(-1), adv, None, cu_seqlens=cu, agg="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to logprobs.numel"):
        P.policy_loss(lp.reshape(-1), old.reshape(-1), adv, None, cu_seqlens=torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match="is on meta"):
        P.policy_loss(lp, old.to("meta"), adv, mask)
    with pytest.raises(TypeError, match="policy_loss: kl_bias_correction must be a bool, got 'yes'"):
        P.policy_loss(lp, old, adv, mask, kl_bias_correction="yes")
    with pytest.raises(TypeError, match="policy_loss: sequence_metrics must be a bool, got 1"):
        P.policy_loss(lp, old, adv, mask, sequence_metrics=1)
    with pytest.raises(ValueError, match="policy_loss: off_policy_mask_threshold must be a finite number, got nan"):
        P.policy_loss(lp, old, adv, mask, off_policy_mask_threshold=float("nan"))
    with pytest.raises(ValueError, match="kl_penalty: kl_estimator must be one of"):
        P.kl_penalty(lp, old, kl_estimator="k5")
    with pytest.raises(ValueError, match=r"aggregate: response_mask must have shape \(2, 5\), got \(2, 3\)"):
        P.aggregate(lp, mask[:, :3])


def test_value_loss_and_aggregate_layouts():
    g = torch.Generator().manual_seed(0)
    v, ret, old = (torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(4, 6, generator=g) > 0.3
    vp = v.clone().requires_grad_()
    loss, metrics = P.value_loss(vp, ret, old, mask, cliprange_value=0.2, agg="seq-mean-token-mean")
    frac = metrics["clipfrac"]
    ref_vp = v.clone().requires_grad_()
    ref_loss, ref_frac = reference.value_loss(ref_vp, ret, old, mask, 0.2, "seq-mean-token-mean")
    loss.backward()
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(frac, ref_frac.float())  # metrics are float32 (CONTRIBUTING.md, API conventions)
    torch.testing.assert_close(vp.grad, ref_vp.grad)
    # packed aggregate == padded aggregate when the rows are full
    cu = torch.arange(0, 25, 6)
    for agg in P.AGG_MODES + P.TRL_AGG_PRESETS:
        padded = P.aggregate(v, torch.ones(4, 6), agg=agg, loss_scale_factor=6.0, global_tokens=24)
        packed = P.aggregate(v.reshape(-1), None, agg=agg, cu_seqlens=cu, loss_scale_factor=6.0, global_tokens=24)
        torch.testing.assert_close(padded, packed)


# --- verl 0.9.1 parity: its own functions on the same tensors ------------------------------------

def _verl_config(**policy_loss):
    workers_config = import_peer("verl.workers.config")
    actor_mod = import_peer("verl.workers.config.actor")
    return workers_config.ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2,
                                      clip_ratio_low=0.2, clip_ratio_high=0.28,
                                      policy_loss=actor_mod.PolicyLossConfig(**policy_loss))


_VERL_KEYS = {"actor/pg_clipfrac": "clipfrac", "actor/pg_clipfrac_lower": "dual_clipfrac", "actor/ppo_kl": "approx_kl"}
_VERL_LOSSES = {"vanilla": ("ppo", {}), "gspo": ("gspo", {}), "cispo": ("cispo", {}), "sapo": ("sapo", {}),
                "gpg": ("gpg", {}), "dro": ("dro", {"dro_beta": 0.1}), "dppo_tv": ("dppo_tv", {}),
                "dppo_kl": ("dppo_kl", {}), "geo_mean": ("geo_mean", {}), "kl_cov": ("kl_cov", {"kl_cov_ratio": 0.1}),
                "clip_cov": ("clip_cov", {"clip_cov_ratio": 0.2, "clip_cov_lb": -1.0})}


@pytest.mark.peer
@pytest.mark.parametrize("verl_name", list(_VERL_LOSSES))
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm", "token-sum"])
def test_verl_policy_loss_parity(verl_name, agg):
    core_algos = import_peer("verl.trainer.ppo.core_algos")
    name, extra = _VERL_LOSSES[verl_name]
    b = _batch(B=6, T=12, seed=7)
    b["mask"][2] = True  # verl's NaN on empty rows in some metrics; empty rows are tested above
    b["mask"][4] = False
    config = _verl_config(**extra)
    lp_v = b["lp"].clone().requires_grad_()
    torch.manual_seed(1)
    verl_loss, verl_metrics = core_algos.get_policy_loss_fn(verl_name)(
        old_log_prob=b["old"], log_prob=lp_v, advantages=b["adv"], response_mask=b["mask"], loss_agg_mode=agg,
        config=config, rollout_is_weights=b["isw"])
    verl_loss.backward()
    lp = b["lp"].clone().requires_grad_()
    torch.manual_seed(1)
    # verl's sapo ignores loss_agg_mode (always seq-mean-token-mean); its clip_ratio_c (3.0) is the
    # dual-clip constant of vanilla and the TIS cap of dppo.
    ours_loss, ours_metrics = P.policy_loss(
        lp, b["old"], b["adv"], b["mask"], loss=name, clip_low=0.2, clip_high=0.28,
        dual_clip=3.0 if name in ("ppo", "dppo_tv", "dppo_kl") else None,
        agg="seq-mean-token-mean" if name == "sapo" else agg, is_weights=b["isw"], dro_beta=extra.get("dro_beta"),
        clip_cov_ratio=0.2, clip_cov_lb=-1.0, kl_cov_ratio=0.1)
    ours_loss.backward()
    # float64 inputs; verl forms some denominators in float32 (count + 1e-8 of an int tensor)
    torch.testing.assert_close(ours_loss, verl_loss.detach(), rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(lp.grad, lp_v.grad, rtol=1e-7, atol=1e-10)
    assert verl_metrics.keys() <= _VERL_KEYS.keys()
    for key, value in verl_metrics.items():
        # verl computes some fractions in float32 (.float()) before .item()
        assert ours_metrics[_VERL_KEYS[key]].item() == pytest.approx(value, abs=1e-6), key


_VERL_DROP_IN_CONFIGS = {
    "vanilla": {}, "dppo_tv": {}, "dppo_kl": {}, "gspo": {}, "sapo": {}, "gpg": {}, "geo_mean": {}, "cispo": {},
    "clip_cov": {"clip_cov_ratio": 0.2, "clip_cov_lb": -1.0}, "kl_cov": {"kl_cov_ratio": 0.1}, "dro": {"dro_beta": 0.1},
}


@pytest.mark.peer
@pytest.mark.parametrize("verl_name", [*_VERL_DROP_IN_CONFIGS, "bypass_mode"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_verl_policy_loss_drop_in_parity(backend, verl_name, dtype):
    # rlkern.algos.policy_loss.VERL_POLICY_LOSSES[name] against verl's registry entry, called the
    # way verl's actor calls it, with the same ActorConfig: every agg mode, with and without
    # verl's global_batch_info (dp_size, batch_num_tokens, global_batch_size, loss_scale_factor),
    # with and without rollout_is_weights. Loss, gradient and the metrics dict.
    core_algos = import_peer("verl.trainer.ppo.core_algos")
    from rlkern.algos.policy_loss import VERL_POLICY_LOSSES

    assert set(VERL_POLICY_LOSSES) == set(core_algos.POLICY_LOSS_REGISTRY)
    if verl_name == "bypass_mode":
        algo_config = import_peer("verl.trainer.config.algorithm")
        corr = algo_config.RolloutCorrectionConfig(rollout_is="sequence", rollout_is_threshold=3.0,
                                                   loss_type="reinforce", rollout_rs="token_k3",
                                                   rollout_rs_threshold=0.5)
        config = _verl_config(rollout_correction=corr)
    else:
        config = _verl_config(**_VERL_DROP_IN_CONFIGS[verl_name])
    b = _batch(B=6, T=12, seed=23, spread=1.2)  # ratios past the dual clip (3) and the dppo cap
    b["mask"][2] = True  # verl's NaN on empty rows in some metrics; empty rows are tested above
    b["mask"][4] = False
    rtol = 1e-7 if dtype == torch.float64 else 2e-5
    for agg, info, weights in itertools.product(
            P.AGG_MODES, [{}, dict(dp_size=4, batch_num_tokens=200, global_batch_size=20, loss_scale_factor=16)],
            [None, b["isw"].to(dtype)]):
        config.global_batch_info.clear()
        config.global_batch_info.update(info)
        outs = []
        for fn in (core_algos.get_policy_loss_fn(verl_name), VERL_POLICY_LOSSES[verl_name]):
            lp = b["lp"].to(dtype).requires_grad_()
            torch.manual_seed(1)
            total, metrics = fn(old_log_prob=b["old"].to(dtype), log_prob=lp, advantages=b["adv"].to(dtype),
                                response_mask=b["mask"], loss_agg_mode=agg, config=config,
                                rollout_is_weights=weights)
            total.backward()
            outs.append((total.detach(), lp.grad, metrics))
        (theirs, their_grad, their_metrics), (ours, our_grad, our_metrics) = outs
        msg = f"{verl_name} {agg} {info} weights={weights is not None}"
        torch.testing.assert_close(ours.to(theirs.dtype), theirs, rtol=rtol, atol=1e-7, msg=msg)
        torch.testing.assert_close(our_grad, their_grad, rtol=rtol, atol=1e-7, msg=msg)
        their_metrics = {k: v for k, v in their_metrics.items() if not k.startswith("rollout_corr/")}
        assert our_metrics.keys() == their_metrics.keys(), msg
        for key, value in their_metrics.items():
            assert our_metrics[key] == pytest.approx(float(value), rel=1e-5, abs=1e-6), f"{msg} {key}"
        if verl_name == "vanilla":
            assert 0 < their_metrics["actor/pg_clipfrac_lower"] and 0 < their_metrics["actor/pg_clipfrac"] < 1


def test_verl_drop_in_needs_config():
    from rlkern.algos.policy_loss import VERL_POLICY_LOSSES

    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="config"):
        VERL_POLICY_LOSSES["vanilla"](x, x, x, torch.ones(2, 3))


@pytest.mark.peer
@pytest.mark.parametrize("loss_type", ["reinforce", "ppo_clip"])
@pytest.mark.parametrize("agg", P.AGG_MODES)
def test_verl_bypass_mode_parity(loss_type, agg):
    # verl's bypass mode on a ragged batch; rlkern padded and packed (each row's own tokens).
    core_algos = import_peer("verl.trainer.ppo.core_algos")
    algo_config = import_peer("verl.trainer.config.algorithm")
    b = _batch(B=6, T=12, seed=8, ragged=True)
    b["mask"][2] = b["inside"][2] = True
    corr = algo_config.RolloutCorrectionConfig(rollout_is="token", rollout_is_threshold=1.5, loss_type=loss_type,
                                               rollout_rs="token_k1,seq_mean_k3", rollout_rs_threshold="0.6_1.5,0.2")
    config = _verl_config(rollout_correction=corr)
    lp_v = b["lp"].clone().requires_grad_()
    verl_loss, _ = core_algos.get_policy_loss_fn("bypass_mode")(
        old_log_prob=b["old"], log_prob=lp_v, advantages=b["adv"], response_mask=b["mask"],
        loss_agg_mode=agg, config=config)
    verl_loss.backward()
    inside = b["inside"]
    cu = torch.cat([torch.zeros(1, dtype=torch.long), inside.sum(-1).cumsum(0)]).to(torch.int32)
    for packed in (False, True):
        conv = (lambda t: t[inside]) if packed else (lambda t: t)  # noqa: E731
        lp = conv(b["lp"]).clone().requires_grad_()
        ours_loss, _ = P.policy_loss(lp, conv(b["old"]), conv(b["adv"]), conv(b["mask"]), loss="bypass_mode",
                                     bypass_loss=loss_type, clip_high=0.28, dual_clip=3.0, agg=agg,
                                     rollout_is="token", rollout_is_threshold=1.5,
                                     rollout_rs="token_k1,seq_mean_k3", rollout_rs_threshold="0.6_1.5,0.2",
                                     cu_seqlens=cu if packed else None, loss_scale_factor=12 if packed else None)
        ours_loss.backward()
        # float64 inputs; verl forms seq-mean-token-mean's count + 1e-8 in float32 (of an int tensor)
        torch.testing.assert_close(ours_loss, verl_loss.detach(), rtol=1e-7, atol=1e-10)
        torch.testing.assert_close(lp.grad, conv(lp_v.grad), rtol=1e-7, atol=1e-10)


@pytest.mark.peer
@pytest.mark.parametrize("rollout_is,threshold,rs,rs_threshold,normalize", [
    ("token", 2.0, None, None, False), ("sequence", 3.0, None, None, True), ("token", "0.5_1.5", None, None, True),
    (None, 2.0, "token_k2", 0.02, False), (None, 2.0, "seq_sum_k1", "0.5_2.0", False),
    ("token", 1.2, "seq_max_k3,seq_mean_k2,token_k3", "0.1,0.01,0.05", False)])
def test_verl_rollout_correction_parity(rollout_is, threshold, rs, rs_threshold, normalize):
    helper = import_peer("verl.trainer.ppo.rollout_corr_helper")
    b = _batch(B=6, T=12, seed=10)
    rollout = b["old"] + torch.randn(6, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.2
    proto, verl_mask, _ = helper.compute_rollout_correction_and_rejection_mask(
        old_log_prob=b["old"], rollout_log_prob=rollout, response_mask=b["mask"], rollout_is=rollout_is,
        rollout_is_threshold=threshold, rollout_is_batch_normalize=normalize, rollout_rs=rs,
        rollout_rs_threshold=rs_threshold)
    weights, mask = reference.rollout_correction(b["old"], rollout, b["mask"], rollout_is, threshold, normalize, rs,
                                                 rs_threshold)
    torch.testing.assert_close(mask, verl_mask)
    if rollout_is is None:
        assert weights is None and proto is None
    else:
        # verl's batch-normalization mean has a float32 denominator (mask.sum() + 1e-8)
        torch.testing.assert_close(weights, proto.batch["rollout_is_weights"], rtol=1e-7, atol=1e-12)
    # through policy_loss: decoupled mode multiplies the weights into the policy term
    if rollout_is is not None:
        lp = b["lp"].clone().requires_grad_()
        ours, _ = P.policy_loss(lp, b["old"], b["adv"], b["mask"], rollout_logprobs=rollout, rollout_is=rollout_is,
                                rollout_is_threshold=threshold, rollout_is_batch_normalize=normalize, rollout_rs=rs,
                                rollout_rs_threshold=rs_threshold)
        expected, _ = reference.policy_loss(b["lp"], b["old"], b["adv"], mask, is_weights=weights)
        torch.testing.assert_close(ours, expected)


@pytest.mark.peer
def test_verl_reinforce_parity():
    core_algos = import_peer("verl.trainer.ppo.core_algos")
    b = _batch(B=6, T=12, seed=12)
    b["mask"][2] = True
    lp_v = b["lp"].clone().requires_grad_()
    verl_loss, verl_metrics = core_algos.compute_policy_loss_reinforce(
        rollout_log_prob=b["old"], log_prob=lp_v, advantages=b["adv"], response_mask=b["mask"],
        loss_agg_mode="seq-mean-token-sum", config=_verl_config(), rollout_is_weights=b["isw"])
    verl_loss.backward()
    lp = b["lp"].clone().requires_grad_()
    ours, metrics = P.policy_loss(lp, b["old"], b["adv"], b["mask"], loss="reinforce", agg="seq-mean-token-sum",
                                  is_weights=b["isw"])
    ours.backward()
    torch.testing.assert_close(ours, verl_loss.detach())
    torch.testing.assert_close(lp.grad, lp_v.grad)
    assert metrics["approx_kl"].item() == pytest.approx(verl_metrics["actor/ppo_kl"])


@pytest.mark.peer
@pytest.mark.parametrize("est", ESTIMATORS + ["k2+", "mse+"])
def test_verl_kl_penalty_parity(est):
    core_algos = import_peer("verl.trainer.ppo.core_algos")
    b = _batch(seed=13)
    ref = b["ref"].clone()
    ref[0, :2] += torch.tensor([30.0, -30.0], dtype=torch.float64)
    x, y = b["lp"].clone().requires_grad_(), b["lp"].clone().requires_grad_()
    ours, theirs = P.kl_penalty(x, ref, kl_estimator=est), core_algos.kl_penalty(y, ref, est)
    g = torch.randn(ours.shape, dtype=torch.float64)
    (ours * g).sum().backward()
    (theirs * g).sum().backward()
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(x.grad, y.grad)


@pytest.mark.peer
@pytest.mark.parametrize("agg", P.AGG_MODES)
@pytest.mark.parametrize("norms", [{}, {"dp_size": 4, "batch_num_tokens": 180, "global_batch_size": 24},
                                   {"loss_scale_factor": 40}])
def test_verl_agg_loss_and_value_loss_parity(agg, norms):
    core_algos = import_peer("verl.trainer.ppo.core_algos")
    b = _batch(B=6, T=12, seed=14)
    b["mask"][2] = True  # verl's token-mean is NaN on an empty mask (rlkern: 0, tested above)
    kw = dict(dp_size=norms.get("dp_size", 1), global_tokens=norms.get("batch_num_tokens"),
              global_seqs=norms.get("global_batch_size"), loss_scale_factor=norms.get("loss_scale_factor"))
    x, y = b["lp"].clone().requires_grad_(), b["lp"].clone().requires_grad_()
    ours = P.aggregate(x, b["mask"], agg=agg, **kw)
    theirs = core_algos.agg_loss(y, b["mask"], agg, **norms)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(x.grad, y.grad)
    v, vv = b["ent"].clone().requires_grad_(), b["ent"].clone().requires_grad_()
    ours_v, ours_metrics = P.value_loss(v, b["ref"], b["old"], b["mask"], cliprange_value=0.3, agg=agg, **kw)
    ours_frac = ours_metrics["clipfrac"]
    theirs_v, theirs_frac = core_algos.compute_value_loss(vv, b["ref"], b["old"], b["mask"], 0.3, agg,
                                                          dp_size=kw["dp_size"], batch_num_tokens=kw["global_tokens"],
                                                          global_batch_size=kw["global_seqs"],
                                                          loss_scale_factor=kw["loss_scale_factor"])
    ours_v.backward()
    theirs_v.backward()
    torch.testing.assert_close(ours_v, theirs_v)
    torch.testing.assert_close(v.grad, vv.grad)
    assert ours_frac.item() == pytest.approx(theirs_frac.item(), abs=1e-7)


# --- TRL 1.16 parity: GRPOTrainer._compute_loss itself, with the model call stubbed -----------------

def _trl_trainer(loss_type, logprobs, entropies, beta, entropy_coef, delta=None, num_processes=1):
    grpo = import_peer("trl.trainer.grpo_trainer")

    def identity(x, **_):
        return x

    accelerator = types.SimpleNamespace(gather=identity, gather_for_metrics=identity, reduce=identity,
                                        num_processes=num_processes, sync_gradients=True)
    args = types.SimpleNamespace(use_bias_correction_kl=False, delta=delta, sapo_temperature_pos=1.0,
                                 sapo_temperature_neg=1.05, steps_per_generation=1)
    trainer = types.SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        args=args, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28 if loss_type != "cispo" else 4.0,
        use_vllm=False, vllm_importance_sampling_correction=False, model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=logprobs.shape[1], accelerator=accelerator,
        _entropy_bonus_enabled=entropy_coef != 0, entropy_coef=entropy_coef, use_adaptive_entropy=False,
        aux_loss_enabled=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *a, **k: (logprobs, entropies, None))
    return grpo.GRPOTrainer._compute_loss.__get__(trainer), trainer


@pytest.mark.peer
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "sapo", "cispo"])
@pytest.mark.parametrize("beta,entropy_coef,delta", [(0.0, 0.0, None), (0.04, 0.01, 2.5)])
def test_trl_grpo_loss_parity(backend, loss_type, beta, entropy_coef, delta):
    b = _batch(B=6, T=12, seed=15)
    b["mask"][2] = False  # TRL counts an empty completion as 0 in the grpo mean over B
    seq_adv = b["adv"][:, 0].float()
    lp_t = b["lp"].float().requires_grad_()
    ent_t = b["ent"].float().requires_grad_()
    compute_loss, trainer = _trl_trainer(loss_type, lp_t, ent_t, beta, entropy_coef, delta)
    n_items = torch.tensor(150.0)
    inputs = {"prompt_ids": torch.zeros(6, 1, dtype=torch.long), "prompt_mask": torch.ones(6, 1, dtype=torch.long),
              "completion_ids": torch.zeros(6, 12, dtype=torch.long), "completion_mask": b["mask"].long(),
              "advantages": seq_adv, "old_per_token_logps": b["old"].float(),
              "ref_per_token_logps": b["ref"].float(), "num_items_in_batch": n_items}
    trl_loss = compute_loss(None, inputs)
    trl_loss.backward()

    lp = b["lp"].float().requires_grad_()
    ent = b["ent"].float().requires_grad_()
    agg = {"sapo": "grpo", "cispo": "dapo"}.get(loss_type, loss_type)
    loss = {"grpo": "ppo", "bnpo": "ppo", "dr_grpo": "ppo", "dapo": "ppo"}.get(loss_type, loss_type)
    # TRL's cispo caps the ratio at epsilon_high (no lower clip): clip_low=1, 1 + clip_high = 4.0
    clip = dict(clip_low=1.0, clip_high=3.0) if loss == "cispo" else dict(clip_low=0.2, clip_high=0.28)
    ours, metrics = P.policy_loss(
        lp, b["old"].float(), seq_adv, b["mask"], loss=loss, **clip, dual_clip=delta if loss == "ppo" else None,
        ref_logprobs=b["ref"].float() if beta else None, kl_coef=beta, kl_estimator="k3", entropy=ent,
        entropy_coef=entropy_coef, agg=agg, entropy_agg="token-mean",
        global_tokens=n_items if agg == "dapo" else None, dp_size=1,
        loss_scale_factor=12)
    ours.backward()
    torch.testing.assert_close(ours, trl_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lp.grad, lp_t.grad, rtol=1e-5, atol=1e-7)
    if entropy_coef:
        torch.testing.assert_close(ent.grad, ent_t.grad, rtol=1e-5, atol=1e-8)
    logged = trainer._metrics["train"]
    assert metrics["entropy"].item() == pytest.approx(logged["entropy"][-1], rel=1e-5)
    if beta:
        assert metrics["kl_ref"].item() == pytest.approx(logged["kl"][-1], rel=1e-5)
    if loss == "ppo":
        assert metrics["clipfrac"].item() == pytest.approx(logged["clip_ratio/region_mean"][-1], abs=1e-6)
        assert metrics["clipfrac_low"].item() == pytest.approx(logged["clip_ratio/low_mean"][-1], abs=1e-6)
        assert metrics["clipfrac_high"].item() == pytest.approx(logged["clip_ratio/high_mean"][-1], abs=1e-6)


@pytest.mark.peer
def test_trl_sequence_level_parity():
    # TRL's importance_sampling_level="sequence" (GSPO as TRL writes it) = rlkern level="sequence".
    b = _batch(B=5, T=10, seed=16)
    b["mask"][2] = True
    seq_adv = b["adv"][:, 0].float()
    lp_t = b["lp"].float().requires_grad_()
    compute_loss, trainer = _trl_trainer("grpo", lp_t, b["ent"].float(), 0.0, 0.0)
    trainer.importance_sampling_level = "sequence"
    trl_loss = compute_loss(None, {"prompt_ids": torch.zeros(5, 1, dtype=torch.long),
                                   "prompt_mask": torch.ones(5, 1, dtype=torch.long),
                                   "completion_ids": torch.zeros(5, 10, dtype=torch.long),
                                   "completion_mask": b["mask"].long(), "advantages": seq_adv,
                                   "old_per_token_logps": b["old"].float()})
    trl_loss.backward()
    lp = b["lp"].float().requires_grad_()
    ours, _ = P.policy_loss(lp, b["old"].float(), seq_adv, b["mask"], level="sequence", clip_high=0.28, agg="grpo")
    ours.backward()
    torch.testing.assert_close(ours, trl_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lp.grad, lp_t.grad, rtol=1e-5, atol=1e-7)
    # and it equals verl's straight-through GSPO when advantages are per sequence
    lp2 = b["lp"].float().requires_grad_()
    gspo, _ = P.policy_loss(lp2, b["old"].float(), seq_adv, b["mask"], loss="gspo", clip_high=0.28, agg="grpo")
    gspo.backward()
    torch.testing.assert_close(gspo, ours, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lp2.grad, lp.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.peer
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_liger_triton_grpo_loss_parity(backend, loss_type, level, beta):
    # Liger's Triton GRPO loss fuses log-softmax and the loss over [B, L + 1, V] logits; rlkern
    # composes token_logprobs and policy_loss. Same loss and the same gradient w.r.t. the logits
    # (Liger's kernel under the Triton interpreter on the CPU, compiled on a GPU).
    grpo = import_peer("liger_kernel.transformers.grpo_loss")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(24)
    B, L, V = 3, 9, 301
    logits = (torch.randn(B, L + 1, V, generator=g) * 2).to(device)
    ids = torch.randint(0, V, (B, L), generator=g).to(device)
    mask = (torch.rand(B, L, generator=g) > 0.2).to(device)
    mask[1] = False  # an empty completion
    adv = torch.randn(B, generator=g).to(device)
    with torch.no_grad():
        lp0 = torch.log_softmax(logits[:, :-1] / 0.9, -1).gather(-1, ids[..., None])[..., 0]
    old = lp0 + (torch.randn(B, L, generator=g) * 0.3).to(device)
    ref = lp0 + (torch.randn(B, L, generator=g) * 0.3).to(device)
    theirs_logits = logits.clone().requires_grad_()
    theirs, _ = grpo.triton_grpo_loss(theirs_logits, old, ref if beta else None, ids, adv, mask.to(torch.int32),
                                      temperature=0.9, beta=beta, eps_low=0.2, eps_high=0.28, inplace=False,
                                      loss_type=loss_type, importance_sampling_level=level, reduce=True)
    theirs.backward()
    ours_logits = logits.clone().requires_grad_()
    lp = token_logprobs(ours_logits[:, :-1], ids, temperature=0.9)
    ours, _ = P.policy_loss(lp, old, adv, mask, clip_high=0.28, level=level, ref_logprobs=ref if beta else None,
                            kl_coef=beta, kl_estimator="k3", agg=loss_type,
                            global_tokens=mask.sum() if loss_type == "dapo" else None)
    ours.backward()
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_logits.grad, theirs_logits.grad, rtol=1e-4, atol=1e-7)


# --- OpenRLHF 0.11.2 parity (optional peer, not installed in CI) ----------------------------------

_OPENRLHF_MISSING = "openrlhf is an optional peer, not installed in CI (pip install --no-deps openrlhf==0.11.2)"


def _openrlhf_loss_module():
    """openrlhf/models/loss.py and the utils.py it imports, loaded from the installed package.

    Importing ``openrlhf.models`` runs its __init__, which imports the actor (flash_attn) and
    deepspeed; loss.py needs neither. Its utils.py imports deepspeed at the top only for ZeRO-3
    helpers that PolicyLoss / ValueLoss never call, so when deepspeed is absent an empty module
    stands in for it while the two files load. Skips (also under RLKERN_REQUIRE_PEERS: the peer
    is optional) when openrlhf is not installed or its files do not load.
    """
    name = "_rlkern_openrlhf_models"
    if name + ".loss" in sys.modules:
        return sys.modules[name + ".loss"]
    spec = importlib.util.find_spec("openrlhf")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(_OPENRLHF_MISSING)
    package = types.ModuleType(name)
    package.__path__ = [str(pathlib.Path(list(spec.submodule_search_locations)[0]) / "models")]
    stub = "deepspeed" not in sys.modules and importlib.util.find_spec("deepspeed") is None
    sys.modules[name] = package
    if stub:
        sys.modules["deepspeed"] = types.ModuleType("deepspeed")
    try:
        return importlib.import_module(name + ".loss")
    except Exception as error:  # noqa: BLE001 (an optional peer fails to load in many ways)
        sys.modules.pop(name, None)
        pytest.skip(f"{_OPENRLHF_MISSING}; loading openrlhf/models/loss.py failed: {error!r}")
    finally:
        if stub:
            sys.modules.pop("deepspeed", None)


@pytest.mark.peer
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("token_level", [True, False], ids=["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("global_norms", [False, True])
def test_openrlhf_policy_loss_parity(backend, dual_clip, token_level, global_norms):
    # OpenRLHF's PolicyLoss (ppo): token_level_loss is verl's token-mean, its sample mode is
    # seq-mean-token-mean (empty rows left out); batch_num_tokens / global_batch_size / dp_size
    # are verl's normalizers. Row 2 is empty; fp32 so that the kernels run.
    loss_mod = _openrlhf_loss_module()
    b = _batch(B=6, T=12, seed=17)
    norms = dict(dp_size=4, batch_num_tokens=150.0, global_batch_size=16.0) if global_norms else {}
    lp_o = b["lp"].float().requires_grad_()
    theirs, clip_ratio, ppo_kl, _, _ = loss_mod.PolicyLoss(
        clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=dual_clip, token_level_loss=token_level)(
        lp_o, b["old"].float(), b["adv"].float(), action_mask=b["mask"], **norms)
    theirs.backward()
    lp = b["lp"].float().requires_grad_()
    ours, metrics = P.policy_loss(lp, b["old"].float(), b["adv"].float(), b["mask"], clip_high=0.28,
                                  dual_clip=dual_clip, agg="token-mean" if token_level else "seq-mean-token-mean",
                                  dp_size=norms.get("dp_size", 1), global_tokens=norms.get("batch_num_tokens"),
                                  global_seqs=norms.get("global_batch_size"))
    ours.backward()
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lp.grad, lp_o.grad, rtol=1e-5, atol=1e-7)
    assert metrics["clipfrac"].item() == pytest.approx(clip_ratio.item(), abs=1e-6)
    assert metrics["approx_kl"].item() == pytest.approx(ppo_kl.item(), rel=1e-5, abs=1e-7)


@pytest.mark.peer
def test_openrlhf_gspo_and_is_correction_parity():
    # GSPO as OpenRLHF writes it (ratio exp(mean log-ratio), gradient through the mean, per-sample
    # mean) is rlkern's level="sequence"; its token-level train/rollout correction is verl's
    # decoupled mode: "mask" with ratio gating = IcePop (rollout_is_threshold=(low, high)), "clip"
    # with low 0 = TIS (rollout_is_threshold=high). float64: the reference path on both sides.
    loss_mod = _openrlhf_loss_module()
    b = _batch(B=6, T=12, seed=19)
    rollout = b["old"] + torch.randn(6, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 0.5
    cases = [(dict(policy_loss_type="gspo"), dict(level="sequence", agg="seq-mean-token-mean")),
             (dict(is_correction_level="token", is_correction_mode="mask", is_correction_threshold=(0.7, 1.4)),
              dict(rollout_is="token", rollout_is_threshold=(0.7, 1.4))),
             (dict(is_correction_level="token", is_correction_mode="clip", is_correction_threshold=(0.0, 1.2)),
              dict(rollout_is="token", rollout_is_threshold=1.2))]
    for theirs_kw, ours_kw in cases:
        lp_o = b["lp"].clone().requires_grad_()
        theirs = loss_mod.PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28, **theirs_kw)(
            lp_o, b["old"], b["adv"], action_mask=b["mask"], rollout_log_probs=rollout)[0]
        theirs.backward()
        lp = b["lp"].clone().requires_grad_()
        ours, _ = P.policy_loss(lp, b["old"], b["adv"], b["mask"], clip_high=0.28, rollout_logprobs=rollout,
                                **ours_kw)
        ours.backward()
        # OpenRLHF's per-sample mean has a float32 row mask ((token_counts > 0).float())
        torch.testing.assert_close(ours, theirs.detach(), rtol=1e-7, atol=1e-10, msg=str(theirs_kw))
        torch.testing.assert_close(lp.grad, lp_o.grad, rtol=1e-7, atol=1e-10, msg=str(theirs_kw))


_OPENRLHF_CORRECTIONS = [
    ("off", "mask", "ratio", (0.5, 5.0)),
    ("token", "mask", "ratio", (0.7, 1.4)),  # ICEPOP
    ("token", "clip", "ratio", (0.8, 1.25)),  # TIS clamped on both sides
    ("token", "clip", "ratio", (0.0, 1.2)),  # TIS
    ("seq", "mask", "ratio", (0.85, 1.15)),  # seq-mask-tis: rejected rows stay in the normalizer
    ("seq", "mask", "binary_kl", (0.0, 0.02)),  # FlashREINFORCE trust region
    ("token", "mask", "tv", (0.0, 0.05)),
    ("seq", "mask", "tv", (0.0, 0.04)),
]


@pytest.mark.peer
@pytest.mark.parametrize("correction", _OPENRLHF_CORRECTIONS, ids=lambda c: "-".join(map(str, c[:3])))
@pytest.mark.parametrize("loss_type,token_level,dual_clip", [("ppo", True, None), ("ppo", False, 3.0),
                                                             ("gspo", True, None)])
@pytest.mark.parametrize("global_norms", [False, True])
def test_openrlhf_policy_loss_drop_in_parity(backend, correction, loss_type, token_level, dual_clip, global_norms):
    # rlkern.algos.policy_loss.PolicyLoss against OpenRLHF's PolicyLoss: every output, and the
    # gradient, for each correction scheme (rows 2 empty; ragged rows, the band rejects some).
    from rlkern.algos.policy_loss import PolicyLoss

    loss_mod = _openrlhf_loss_module()
    level, mode, gating, threshold = correction
    b = _batch(B=8, T=12, seed=21, ragged=True)
    g = torch.Generator().manual_seed(5)
    rollout = b["old"] + torch.randn(8, 12, dtype=torch.float64, generator=g) * 0.3
    rollout[3] = b["old"][3] + 0.02  # a row every band keeps
    kw = dict(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=dual_clip, token_level_loss=token_level,
              policy_loss_type=loss_type, is_correction_level=level, is_correction_mode=mode,
              is_correction_gating=gating, is_correction_threshold=threshold)
    norms = dict(dp_size=4, batch_num_tokens=150.0, global_batch_size=16.0) if global_norms else {}
    lp_o = b["lp"].float().requires_grad_()
    theirs = loss_mod.PolicyLoss(**kw)(lp_o, b["old"].float(), b["adv"].float(), action_mask=b["mask"],
                                       rollout_log_probs=rollout.float(), **norms)
    theirs[0].backward()
    lp = b["lp"].float().requires_grad_()
    ours = PolicyLoss(**kw)(lp, b["old"].float(), b["adv"].float(), action_mask=b["mask"],
                            rollout_log_probs=rollout.float(), **norms)
    ours[0].backward()
    torch.testing.assert_close(ours[0], theirs[0].detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lp.grad, lp_o.grad, rtol=1e-5, atol=1e-7)
    for name, x, y in zip(("clip_ratio", "ppo_kl", "vllm_kl", "is_filter_ratio"), ours[1:], theirs[1:]):
        if y is None:
            assert x is None, name
        else:
            assert x.item() == pytest.approx(y.item(), rel=1e-5, abs=1e-6), name
    if level != "off" and loss_type == "ppo":
        assert 0 < theirs[4].item() < 1, "the band must reject some units and keep others"


@pytest.mark.parametrize("level,mode,gating,threshold", [c for c in _OPENRLHF_CORRECTIONS if c[0] != "off"])
def test_openrlhf_is_weights_packed_and_float64(level, mode, gating, threshold):
    # The packed layout gives the padded numbers; the coefficient goes into the kernel as
    # is_weights: the same loss as the float64 reference with it.
    from rlkern.algos.policy_loss import openrlhf_is_weights

    b = _batch(B=6, T=10, seed=22, ragged=True)
    rollout = b["old"] + torch.randn(6, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(6)) * 0.3
    coef, frac = openrlhf_is_weights(b["old"], rollout, b["mask"], level=level, mode=mode, gating=gating,
                                     threshold=threshold)
    inside = b["inside"]
    cu = torch.cat([torch.zeros(1, dtype=torch.long), inside.sum(-1).cumsum(0)])
    coef_p, frac_p = openrlhf_is_weights(b["old"][inside], rollout[inside], b["mask"][inside], level=level, mode=mode,
                                         gating=gating, threshold=threshold, cu_seqlens=cu)
    torch.testing.assert_close(coef_p, coef[inside])
    torch.testing.assert_close(frac_p, frac)
    assert not coef.isnan().any() and coef.shape == b["old"].shape
    lp = b["lp"].float().requires_grad_()
    ours, _ = P.policy_loss(lp, b["old"].float(), b["adv"].float(), b["mask"], is_weights=coef.float())
    ref, _ = reference.policy_loss(b["lp"], b["old"], b["adv"], b["mask"], is_weights=coef)
    _close(ours, ref, name="loss with the OpenRLHF coefficient")


def test_openrlhf_correction_rejects_bad_config():
    from rlkern.algos.policy_loss import PolicyLoss, openrlhf_is_weights

    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="clip' requires is_correction_level='token'"):
        PolicyLoss(is_correction_level="seq", is_correction_mode="clip")
    with pytest.raises(ValueError, match="upper bound only"):
        PolicyLoss(is_correction_level="token", is_correction_gating="tv", is_correction_threshold=(0.5, 1.0))
    with pytest.raises(ValueError, match="is_correction_gating must be one of"):
        openrlhf_is_weights(x, x, gating="kl")
    with pytest.raises(ValueError, match="needs rollout_log_probs"):
        PolicyLoss(is_correction_level="token")(x, x, x, torch.ones(2, 3))
    with pytest.raises(ValueError, match="must have shape"):
        openrlhf_is_weights(x, torch.zeros(2, 4))
    coef, _ = openrlhf_is_weights(x, x - 0.1, threshold=2.0, gating="ratio")  # one number: an upper bound
    torch.testing.assert_close(coef, torch.full((2, 3), 0.1).exp())


@pytest.mark.peer
@pytest.mark.parametrize("token_level", [True, False])
def test_openrlhf_value_loss_parity(token_level):
    loss_mod = _openrlhf_loss_module()
    b = _batch(B=6, T=12, seed=20)
    v, vv = b["ent"].clone().requires_grad_(), b["ent"].clone().requires_grad_()
    theirs = loss_mod.ValueLoss(clip_eps=0.3, token_level_loss=token_level)(vv, b["old"], b["ref"],
                                                                            action_mask=b["mask"])
    agg = "token-mean" if token_level else "seq-mean-token-mean"
    ours, _ = P.value_loss(v, b["ref"], b["old"], b["mask"], cliprange_value=0.3, agg=agg)
    theirs.backward()
    ours.backward()
    torch.testing.assert_close(ours, theirs.detach())
    torch.testing.assert_close(v.grad, vv.grad)


# --- kernels: launches, mask dtypes, the C++ kernel's two instruction sets -------------------------


@pytest.mark.parametrize("weights", [False, True], ids=["int-masks", "float-weights"])
def test_mask_dtypes(backend, weights):
    # T = 21: two full 8-lane vectors and a tail of 5 in the C++ kernel. Every integer and float
    # mask dtype gives the bool mask's result; a float mask weights its tokens (verl's masked sums).
    b = _batch(B=4, T=21, seed=21)
    if weights:
        w = torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=torch.float64)[torch.randint(0, 4, (4, 21),
                                                                          generator=torch.Generator().manual_seed(5))]
        b["mask"] = w
        ref = _reference(b, "ppo", "seq-mean-token-mean", "k3")
        ours = _ours(b, "ppo", "seq-mean-token-mean", "k3")
        for x, y, name in zip(ours, ref, ("loss", "metrics", "grad", "grad entropy")):
            _close(x, y, name=name)
        return
    expected = _ours(b, "gspo", "token-mean", "k3")
    for dtype in (torch.uint8, torch.int8, torch.int32, torch.int64, torch.float32, torch.float16, torch.bfloat16):
        b_cast = dict(b, mask=b["mask"].to(dtype))
        for x, y in zip(_ours(b_cast, "gspo", "token-mean", "k3"), expected):
            torch.testing.assert_close(x, y, rtol=0, atol=0, msg=str(dtype))


def test_sliced_inputs(backend):
    # Rows of a wider buffer (row stride 26, not T = 19): the kernels take row strides (Triton) or
    # copy (C++); either way the numbers are those of the contiguous tensors.
    b = _batch(B=4, T=19, seed=23)
    as32 = lambda t: t.float() if t.dtype == torch.float64 else t  # noqa: E731 (so that _ours keeps the views)
    wide = {k: as32(torch.cat([v, v[:, :7]], dim=1))[:, :19] for k, v in b.items()}
    assert not wide["old"].is_contiguous() and not wide["mask"].is_contiguous()
    for loss in ("ppo", "gspo"):
        for x, y in zip(_ours(wide, loss, "seq-mean-token-sum", "k3"), _ours(b, loss, "seq-mean-token-sum", "k3")):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_cpp_baseline_isa_matches_reference():
    # The C++ token loops are compiled for AVX2 and for the baseline ISA (chosen once per
    # process); RLKERN_NO_SIMD=1 forces the baseline, which a fresh interpreter checks here
    # against the fp64 reference on every kernel loss, padded and packed, at both levels, and
    # with bf16 read and written in place.
    if not _backend.has_cpp():
        pytest.fail("rlkern._C did not build")
    script = """
import itertools, sys
sys.path.insert(0, {tests!r})
import test_policy_loss as T
for loss, packed in itertools.product(T.P.KERNEL_LOSSES, (False, True)):
    b = T._batch(B=5, T=21, seed=T.ALL_LOSSES.index(loss))
    agg = "seq-mean-token-sum-norm" if packed else "token-mean"
    ref = T._reference(b, loss, agg, "k3", lsf=21.0)
    ours = T._ours(b, loss, agg, "k3", packed=packed, lsf=21.0)
    for x, y, what in zip(ours, ref, ("loss", "metrics", "grad", "grad entropy")):
        T._close(x, y, name=f"{{loss}} {{what}}")
for loss in ("ppo", "cispo", "sapo"):
    b = T._batch(B=5, T=21, seed=9, spread=0.8)
    ref = T._reference(b, loss, "token-mean", "k1", level="sequence")
    ours = T._ours(b, loss, "token-mean", "k1", level="sequence")
    for x, y, what in zip(ours, ref, ("loss", "metrics", "grad", "grad entropy")):
        T._close(x, y, name=f"sequence {{loss}} {{what}}")
T.test_bf16_read_and_written_in_place(T.pytest.MonkeyPatch())
print("ok")
""".format(tests=os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, RLKERN_NO_SIMD="1", RLKERN_BACKEND="cpp")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


class _RecordOps(TorchDispatchMode):
    """The aten ops run outside the Triton launches (the interpreter's own copies are not ours)."""

    def __init__(self):
        super().__init__()
        self.ops, self.paused = [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            self.ops.append((str(func), out.numel() if isinstance(out, torch.Tensor) else None))
        return out


def test_triton_launch_count(monkeypatch):
    # The issue's GPU budget: forward = the token kernel + the one-program finalize, backward = one
    # kernel, and between them nothing but output allocations (no [B, T] intermediate, no torch
    # op on [B] tensors). Launchers are wrapped to count launches; a dispatch mode sees every
    # other aten op. Runs the Triton kernels on CUDA tensors when there is a GPU, else interpreted.
    from rlkern.kernels import policy_loss as kernel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not _backend.triton_interpreted():
        pytest.skip("Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    launches, recorder = [], []

    class Counted:
        def __init__(self, fn, name):
            self.fn, self.name = fn, name

        def __getitem__(self, grid):
            run = self.fn[grid]

            def launch(*args, **kwargs):
                launches.append(self.name)
                mode = recorder[-1] if recorder else None
                if mode is not None:
                    mode.paused = True
                try:
                    return run(*args, **kwargs)
                finally:
                    if mode is not None:
                        mode.paused = False
            return launch

    names = sorted(n for n in vars(kernel) if n.startswith("_policy_loss_") and n.endswith("_kernel"))
    assert names == ["_policy_loss_bwd_kernel", "_policy_loss_finish_kernel", "_policy_loss_fwd_kernel"]
    for name in names:
        monkeypatch.setattr(kernel, name, Counted(getattr(kernel, name), name))
    b = _batch(B=5, T=13, seed=22)
    B, T = b["lp"].shape
    hyper = _HYPER
    aliases = {"aten.view.dtype", "aten.detach.default", "aten.alias.default"}  # the bool mask read as uint8
    allocations = {"aten.empty.memory_format", "aten.new_empty.default"}

    def allocated(ops):
        """Sizes of the tensors allocated outside the kernels; fails on any op but an allocation or an alias."""
        assert {op for op, _ in ops} <= aliases | allocations, ops
        return [n for op, n in ops if op in allocations]

    for loss, level, packed, agg in [("ppo", "token", False, "token-mean"),
                                     ("gspo", "token", False, "seq-mean-token-mean"),
                                     ("cispo", "token", True, "seq-mean-token-sum"),
                                     ("geo_mean", "token", True, "token-mean"),
                                     ("ppo", "sequence", False, "seq-mean-token-sum-norm")]:
        shape = (B * T,) if packed else (B, T)
        conv = lambda t: t.float().reshape(shape).to(device)  # noqa: E731
        cu = torch.arange(0, B * T + 1, T, dtype=torch.int32, device=device) if packed else None
        inputs = (conv(b["lp"]), conv(b["old"]), conv(b["adv"]), b["mask"].reshape(shape).to(device),
                  conv(b["ref"]), conv(b["ent"]), conv(b["isw"]), None, cu,
                  torch.tensor(40.0, device=device), None)
        config = (loss, agg, "", "k3", level, hyper)
        grad = torch.tensor(1.0, device=device)
        launches.clear()
        with _RecordOps() as mode:
            recorder.append(mode)
            _, _, stats = kernel.policy_loss_forward(*inputs, *config)
        assert launches == ["_policy_loss_fwd_kernel", "_policy_loss_finish_kernel"], (loss, launches)
        # loss, metrics, stats (and geo_mean's per-sequence partial sums): no [B, T]
        expected = [1, 8, P.N_STATS * (B + 1)] + ([P.N_STATS * B] if loss == "geo_mean" else [])
        assert sorted(allocated(mode.ops)) == sorted(expected), mode.ops
        launches.clear()
        with _RecordOps() as mode:
            recorder.append(mode)
            kernel.policy_loss_backward(grad, *inputs, stats, *config)
        assert launches == ["_policy_loss_bwd_kernel"], (loss, launches)
        assert allocated(mode.ops) == [B * T, B * T], mode.ops  # d logprobs, d entropy: the outputs only
    # and through the op and autograd (normalizers as numbers): 2 launches forward, 1 backward, and
    # no other op but allocations, aliases, the metrics dict's unbind and the seed of .backward()
    monkeypatch.setenv("RLKERN_BACKEND", "triton")
    lp = b["lp"].float().to(device).requires_grad_()
    old, adv, mask, ref = (b[k].to(device) for k in ("old", "adv", "mask", "ref"))
    old, adv, ref = old.float(), adv.float(), ref.float()
    launches.clear()
    with _RecordOps() as mode:
        recorder.append(mode)
        total, _ = P.policy_loss(lp, old, adv, mask, dual_clip=3.0, ref_logprobs=ref, kl_coef=0.1,
                                 agg="seq-mean-token-mean", global_seqs=8, dp_size=2)
    assert launches == ["_policy_loss_fwd_kernel", "_policy_loss_finish_kernel"]
    assert {op for op, _ in mode.ops} <= aliases | allocations | {"aten.unbind.int"}, mode.ops
    with _RecordOps() as mode:
        recorder.append(mode)
        total.backward()
    assert launches == ["_policy_loss_fwd_kernel", "_policy_loss_finish_kernel", "_policy_loss_bwd_kernel"]
    assert {op for op, _ in mode.ops} <= aliases | allocations | {"aten.ones_like.default"}, mode.ops


_SM90_SCRIPT = """
from rlkern.kernels import policy_loss as K

FLOATS = {"clip_low", "clip_high", "dual", "tau_pos", "tau_neg", "dro_beta", "ppo_kl_coef", "gtok", "gseq", "dp",
          "scale", "kl_coef", "ent_coef"}

def arg_type(name, lp):
    if name in FLOATS:  # annotated tl.float64 in kernels/policy_loss.py
        return "fp64"
    if name in ("B", "T", "K") or name.startswith("s_"):
        return "i32"
    if name in ("cu_ptr", "mask_ptr"):
        return {"cu_ptr": "*i32", "mask_ptr": "*u8"}[name]
    if name in ("stats_ptr", "part_ptr", "loss_ptr", "metrics_ptr", "grad_ptr", "gtok_ptr", "gseq_ptr"):
        return "*fp32"
    assert name.endswith("_ptr"), name
    return lp

def build_loss(kernel, flags, lp, warps):
    build(kernel, {n: arg_type(n, lp) for n in kernel.arg_names if n not in flags}, flags, num_warps=warps)

# every loss at level="token", and ppo / cispo / sapo at level="sequence"
for loss, seq in [(x, False) for x in sorted(set(K.LOSS_IDS.values()))] + [(0, True), (2, True), (4, True)]:
    lp, packed = ("*bf16", True) if loss % 2 else ("*fp32", False)
    flags = dict(LOSS=loss, KL=loss % 4, KL_ST=loss == 3, HAS_DUAL=loss == 0, PACKED=packed, ADV_PER_SEQ=packed,
                 HAS_MASK=not packed, HAS_REF=True, HAS_ENT=True, HAS_ISW=True, HAS_SEL=loss in (8, 9), SEQ=seq,
                 KL_BIAS=loss % 2 == 0, BLOCK=K.MAX_BLOCK)
    build_loss(K._policy_loss_fwd_kernel, flags, lp, K.TOKEN_WARPS)
    build_loss(K._policy_loss_bwd_kernel, dict(flags, AGG=loss % 5, ENT_AGG=3, ENT_LOCAL=loss % 2 == 0,
                                               GTOK=loss % 3, GSEQ=(loss + 1) % 3, WITH_KL=True), lp, K.TOKEN_WARPS)
for agg in range(5):
    build_loss(K._policy_loss_finish_kernel, dict(AGG=agg, ENT_AGG=0, ENT_LOCAL=agg == 2, GTOK=agg % 3,
                                                  GSEQ=(agg + 1) % 3, WITH_KL=True, WITH_ENT=True, GEO_MEAN=agg == 4,
                                                  HAS_ISW=agg > 2, ROWS=agg % 2 == 0,
                                                  BLOCK_B=K.FINISH_BLOCK), "*fp32", 4)
print("ok")
"""


def test_triton_kernels_compile_for_h100():
    # The interpreter runs the kernels' Python, not Triton's compiler, which is stricter (types,
    # constexpr use): every kernel variant family is compiled down to an sm_90 cubin here, with no
    # GPU needed (a fresh interpreter, TRITON_INTERPRET unset, so that the kernels are JITFunctions).
    compile_for_sm90(_SM90_SCRIPT, TRITON_DEFAULT_FP_FUSION="1")


@pytest.mark.parametrize("sms", [0, 8], ids=["one-program-per-sequence", "split"])
def test_long_sequences_cross_backend(monkeypatch, sms):
    # T = 37 with the Triton block lowered to 16: the block loop runs 3 times per sequence
    # (2-pass GSPO included), and the finalize loop over B = 7 sequences twice with 4 per step;
    # with 8 "SMs" (32 programs wanted) the single-pass losses split each sequence into 3
    # programs, whose partial sums the finalize reduces. cpp and triton must agree with the fp64
    # reference.
    from rlkern.kernels import policy_loss as kernel

    monkeypatch.setattr(kernel, "MAX_BLOCK", 16)
    monkeypatch.setattr(kernel, "FINISH_BLOCK", 4)
    monkeypatch.setattr(kernel, "CPU_SMS", sms)
    assert kernel._n_split(7, 7 * 37, 16, torch.device("cpu"), False) == (3 if sms else 1)
    assert kernel._n_split(7, 7 * 37, 16, torch.device("cpu"), True) == 1
    b = _batch(B=7, T=37, seed=18, spread=0.8)
    for name in ("cpp", "triton"):
        monkeypatch.setenv("RLKERN_BACKEND", name)
        for (loss, level), agg, packed in itertools.product(
                (("ppo", "token"), ("gspo", "token"), ("geo_mean", "token"), ("sapo", "sequence")),
                ("token-mean", "seq-mean-token-sum"), (False, True)):
            ours = _ours(b, loss, agg, "k3", packed=packed, level=level)
            ref = _reference(b, loss, agg, "k3", level=level)
            for x, y, what in zip(ours, ref, ("loss", "metrics", "grad", "grad entropy")):
                _close(x, y, name=f"{name} {loss} {level} {agg} {what}")


# ---------------------------------------------------------------------------------------------
# Regressions found by property-based testing against float64 formulas and verl

@pytest.mark.parametrize("name", ["global_tokens", "global_seqs", "loss_scale_factor"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -2.0, True])
def test_global_normalizers_given_as_numbers_are_checked(name, bad):
    """A NaN normalizer was taken as "not given" (NaN was the internal sentinel): 2x the local
    token mean with dp_size=2 instead of an error."""
    b = _batch(B=3, T=5)
    args = (b["lp"].float(), b["old"].float(), b["adv"].float(), b["mask"])
    norms = {"global_tokens": 7.0, "global_seqs": 3.0, "dp_size": 2, "agg": "token-mean", name: bad}
    with pytest.raises(ValueError, match=f"policy_loss: {name} must be a finite number > 0, got"):
        P.policy_loss(*args, **norms)
    with pytest.raises(ValueError, match=f"aggregate: {name} must be a finite number > 0, got"):
        P.aggregate(b["lp"].float(), b["mask"], **norms)


@pytest.mark.parametrize("dp_size", [0, -1, 2.5, True, float("nan")])
def test_aggregate_dp_size_is_checked(dp_size):
    b = _batch(B=3, T=5)
    with pytest.raises(ValueError, match=f"aggregate: dp_size must be an int >= 1, got {dp_size!r}"):
        P.aggregate(b["lp"].float(), b["mask"], agg="token-sum", dp_size=dp_size)


@pytest.mark.parametrize("cu", [[1, 4, 7], [0, 4, 5], [0, 5, 4, 6], [0, 4, 7]])
def test_packed_aggregate_and_value_loss_check_cu_seqlens(cu):
    """Shifted offsets over 6 values were accepted silently, others gave cryptic torch errors."""
    values = torch.arange(6.0)
    cu = torch.tensor(cu, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"aggregate: cu_seqlens must rise from 0 to values.numel\(\) = 6"):
        P.aggregate(values, None, agg="token-mean", cu_seqlens=cu)
    # value_loss reports them in its own name (it checked them as aggregate's before)
    with pytest.raises(ValueError, match=r"value_loss: cu_seqlens must rise from 0 to vpreds.numel\(\) = 6"):
        P.value_loss(values, values, values, None, cu_seqlens=cu)
    with pytest.raises(TypeError, match="aggregate: cu_seqlens must be int32 or int64"):
        P.aggregate(values, None, agg="token-mean", cu_seqlens=cu.float())


@pytest.mark.parametrize("agg", ["dr_grpo", "seq-mean-token-sum-norm", "seq-mean-token-mean", "token-mean"])
def test_zero_width_batch_gives_zero_loss(backend, agg):
    """Padded T = 0: 0 / 0 width gave NaN for dr_grpo and seq-mean-token-sum-norm on every backend."""
    lp = torch.zeros(3, 0, requires_grad=True)
    empty = torch.zeros(3, 0)
    loss, metrics = P.policy_loss(lp, empty, empty, empty.bool(), agg=agg, entropy=empty, entropy_coef=0.1,
                                  entropy_agg="seq-mean-token-sum-norm" if agg == "token-mean" else None)
    loss.backward()
    assert loss.item() == 0.0 and all(v.item() == 0.0 for v in metrics.values())
    assert P.aggregate(empty, empty, agg=agg).item() == 0.0


def test_zero_width_batch_with_sequence_rejection():
    """Padded T = 0 with rollout_rs='seq_max_k2' raised IndexError (amax over no token)."""
    empty = torch.zeros(2, 0)
    loss, _ = P.policy_loss(empty.clone().requires_grad_(), empty, empty, empty.bool(), rollout_logprobs=empty,
                            rollout_rs="seq_max_k2", rollout_rs_threshold=2.0)
    assert loss.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_geo_mean_empty_batch_is_zero(dtype):
    """B = 0: the reference gave NaN (mean of no row), the kernels 0."""
    empty = torch.zeros(0, 4, dtype=dtype)
    loss, _ = P.policy_loss(empty.clone().requires_grad_(), empty, empty, empty.bool(), loss="geo_mean")
    ref, _ = reference.policy_loss(empty, empty, empty, empty.bool(), loss="geo_mean")
    assert loss.item() == 0.0 and ref.item() == 0.0


def test_packed_torch_compile_fullgraph():
    """Packed input on the CPU: the host-side cu_seqlens check ran while compiling ("Could not
    guard on data-dependent expression"); it is skipped there now, as in the advantage ops."""
    b = _batch(B=4, T=9, seed=6, ragged=True)
    inside = b["inside"]
    cu = torch.cat([torch.zeros(1, dtype=torch.long), inside.sum(-1).cumsum(0)]).to(torch.int32)
    old, adv, mask = b["old"].float()[inside], b["adv"].float()[inside], b["mask"][inside]

    def step(lp):
        total, metrics = P.policy_loss(lp, old, adv, mask, cu_seqlens=cu, agg="seq-mean-token-mean")
        return total, metrics["clipfrac"]

    lp = b["lp"].float()[inside].requires_grad_()
    out, frac = torch.compile(step, fullgraph=True, backend="aot_eager")(lp)
    out.backward()
    lp2 = b["lp"].float()[inside].requires_grad_()
    out2, frac2 = step(lp2)
    out2.backward()
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(frac, frac2)
    torch.testing.assert_close(lp.grad, lp2.grad)


# ---------------------------------------------------------------------------------------------
# float64 runs the kernels (csrc/policy_loss.cpp's Simd<double, W> loops, kernels/policy_loss.py's
# float64 compute type), not the reference: loss, metrics and gradients in float64, within 1e-10
# of the float64 reference.

_FP64_TOL = dict(rtol=1e-10, atol=1e-12)


def _fp64_metrics(monkeypatch):
    """The float64 metrics of each forward (the public dict holds float32 copies, CONTRIBUTING.md)."""
    seen, forward = [], PA._fwd_impl

    def recorded(*args):
        out = forward(*args)
        seen.append(out[1])
        return out

    monkeypatch.setattr(PA, "_fwd_impl", recorded)
    return seen


def _check_fp64(ours, ref, metrics, name):
    total, _, g, ge = ours
    assert total.dtype == g.dtype == ge.dtype == metrics.dtype == torch.float64, name
    for x, y, what in zip((total, metrics, g, ge), (ref[0], ref[1], ref[2], ref[3]),
                          ("loss", "metrics", "grad", "grad entropy")):
        _close(x, y, name=f"{name} {what}", **_FP64_TOL)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_float64_matches_reference_to_1e10(backend, monkeypatch, packed):
    # Every loss x agg mode (and level="sequence"), one estimator per combination as in
    # test_matches_reference, on float64 tensors through the public op.
    metrics = _fp64_metrics(monkeypatch)
    cases = [(loss, "token") for loss in ALL_LOSSES] + [(loss, "sequence") for loss in ("ppo", "cispo", "sapo")]
    for (loss, level), agg in itertools.product(cases, P.AGG_MODES):
        est = ESTIMATORS[(ALL_LOSSES.index(loss) + P.AGG_MODES.index(agg)) % len(ESTIMATORS)]
        b = _batch(seed=ALL_LOSSES.index(loss), ragged=packed, spread=0.8 if level == "sequence" else 0.4)
        lsf = 13.0 if packed else None
        ref = _reference(b, loss, agg, est, lsf=lsf, level=level)
        ours = _ours(b, loss, agg, est, dtype=torch.float64, packed=packed, lsf=lsf, level=level)
        _check_fp64(ours, ref, metrics[-1], f"{backend} {loss} {level} {agg} {est}")


@pytest.mark.parametrize("name", ["cpp", "triton"])
def test_float64_does_not_run_the_reference(monkeypatch, name):
    # The op layer lets float64 reach both kernels (choose(..., fp64=...)); with the reference
    # made to raise, every kernel loss still runs forward and backward in float64.
    if name == "triton" and not _backend.triton_interpreted():
        pytest.skip("Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    monkeypatch.setenv("RLKERN_BACKEND", name)
    lp64 = torch.zeros(2, 3, dtype=torch.float64)
    assert all(PA.backend(lp64, loss) == name for loss in P.KERNEL_LOSSES)
    assert _backend.choose(lp64.device, ("cpp", "triton"), torch.float64) == "torch"  # what fp64= changes
    b = _batch(B=4, T=11, seed=31)
    expected = {loss: _reference(b, loss, "token-mean", "k3") for loss in P.KERNEL_LOSSES}

    def reference_ran(*args, **kwargs):
        raise AssertionError("float64 ran the PyTorch reference")

    monkeypatch.setattr(PA, "_reference_loss", reference_ran)
    monkeypatch.setattr(reference, "policy_loss", reference_ran)
    metrics = _fp64_metrics(monkeypatch)
    for loss in P.KERNEL_LOSSES:
        _check_fp64(_ours(b, loss, "token-mean", "k3", dtype=torch.float64), expected[loss], metrics[-1],
                    f"{name} {loss}")


def test_float64_mask_dtypes_and_mixed_inputs(backend, monkeypatch):
    # The double loops' own mask reads (bytes, int32, int64, float64 weights) and float32
    # companions of float64 logprobs (read as float64, as the reference's .to(float64)). T = 21:
    # five 4-lane double vectors and a tail of 1 in the C++ kernel.
    metrics = _fp64_metrics(monkeypatch)
    b = _batch(B=4, T=21, seed=21)
    w = torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=torch.float64)[
        torch.randint(0, 4, (4, 21), generator=torch.Generator().manual_seed(5))]
    for mask in (b["mask"], b["mask"].to(torch.uint8), b["mask"].to(torch.int32), b["mask"].to(torch.int64), w):
        bm = dict(b, mask=mask)
        ref = _reference(bm, "ppo", "seq-mean-token-mean", "k3")
        _check_fp64(_ours(bm, "ppo", "seq-mean-token-mean", "k3", dtype=torch.float64), ref, metrics[-1],
                    f"{backend} mask {mask.dtype}")
    rounded = {k: (v.float().double() if k in ("old", "adv", "ref", "isw") else v) for k, v in b.items()}
    ref = _reference(rounded, "cispo", "token-mean", "k2")
    lp = b["lp"].clone().requires_grad_()
    ent = b["ent"].clone().requires_grad_()
    total, _ = P.policy_loss(lp, b["old"].float(), b["adv"].float(), b["mask"], ref_logprobs=b["ref"].float(),
                             kl_coef=0.3, kl_estimator="k2", entropy=ent, entropy_coef=0.05,
                             is_weights=b["isw"].float(), **_loss_kwargs("cispo"))
    total.backward()
    _check_fp64((total.detach(), None, lp.grad, ent.grad), ref, metrics[-1], f"{backend} mixed")


@pytest.mark.parametrize("sms", [0, 8], ids=["one-program-per-sequence", "split"])
def test_float64_long_sequences(monkeypatch, sms):
    # T = 601: the C++ loop flushes its vector sums into double every 64 vectors (256 tokens in
    # double); the Triton block is lowered to 64 so that its loop runs 10 times, and with 8 "SMs"
    # the finalize reduces several programs' partial sums per sequence.
    from rlkern.kernels import policy_loss as kernel

    monkeypatch.setattr(kernel, "MAX_BLOCK", 64)
    monkeypatch.setattr(kernel, "FINISH_BLOCK", 4)
    monkeypatch.setattr(kernel, "CPU_SMS", sms)
    metrics = _fp64_metrics(monkeypatch)
    b = _batch(B=5, T=601, seed=19, spread=0.8)
    names = ["cpp", "triton"] if _backend.triton_interpreted() else ["cpp"]
    for name, (loss, level), agg in itertools.product(
            names, (("ppo", "token"), ("gspo", "token"), ("geo_mean", "token"), ("sapo", "sequence")),
            ("token-mean", "seq-mean-token-sum")):
        monkeypatch.setenv("RLKERN_BACKEND", name)
        ref = _reference(b, loss, agg, "k3", level=level)
        ours = _ours(b, loss, agg, "k3", dtype=torch.float64, packed=loss == "gspo", level=level)
        _check_fp64(ours, ref, metrics[-1], f"{name} {loss} {level} {agg}")


def test_float64_cpp_baseline_isa_and_opcheck():
    # The double loops compiled for the baseline ISA (2 lanes; RLKERN_NO_SIMD=1 in a fresh
    # interpreter) against the float64 reference, and the float64 custom ops' fake outputs
    # (float64 stats [B + 1, 12]) against the kernels'.
    if not _backend.has_cpp():
        pytest.fail("rlkern._C did not build")
    script = """
import sys
sys.path.insert(0, {tests!r})
import torch
import test_policy_loss as T
for loss, level in [(x, "token") for x in T.P.KERNEL_LOSSES] + [("ppo", "sequence"), ("sapo", "sequence")]:
    b = T._batch(B=5, T=21, seed=T.ALL_LOSSES.index(loss))
    ref = T._reference(b, loss, "seq-mean-token-mean", "k3", level=level)
    ours = T._ours(b, loss, "seq-mean-token-mean", "k3", dtype=torch.float64, packed=True, level=level)
    assert ours[0].dtype == torch.float64
    for x, y, what in zip(ours, ref, ("loss", "metrics", "grad", "grad entropy")):
        if what != "metrics":
            T._close(x, y, name=f"{{loss}} {{level}} {{what}}", **T._FP64_TOL)
for level in ("token", "sequence"):  # TRL's bias-corrected KL in the double loops
    b = T._batch(B=5, T=21, seed=4)
    extra = {{"kl_bias_correction": True}}
    ref = T._reference(b, "ppo", "token-mean", "k3", level=level, extra=extra)
    ours = T._ours(b, "ppo", "token-mean", "k3", dtype=torch.float64, packed=True, level=level, extra=extra)
    for x, y, what in zip(ours, ref, ("loss", "metrics", "grad", "grad entropy")):
        if what != "metrics":
            T._close(x, y, name=f"kl_bias_correction {{level}} {{what}}", **T._FP64_TOL)
print("ok")
""".format(tests=os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, RLKERN_NO_SIMD="1", RLKERN_BACKEND="cpp")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
    b = _batch(B=3, T=6, seed=2)
    for loss, level in (("ppo", "token"), ("gspo", "token"), ("geo_mean", "token"), ("ppo", "sequence")):
        args = (b["lp"].clone().requires_grad_(), b["old"], b["adv"], b["mask"], b["ref"],
                b["ent"].clone().requires_grad_(), None, None, None, None, None, loss, "token-mean", "token-mean",
                "k3", level, _HYPER)
        torch.library.opcheck(torch.ops.rlkern.policy_loss.default, args)
        total, metrics, stats = torch.ops.rlkern.policy_loss(*args)
        assert total.dtype == metrics.dtype == stats.dtype == torch.float64 and stats.shape == (4, P.N_STATS)
        plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(torch.ops.rlkern.policy_loss_backward.default, (torch.tensor(1.0, dtype=torch.float64),)
                              + plain[:11] + (stats,) + plain[11:])
    inputs = (b["lp"], b["old"], b["adv"], b["mask"], b["ref"], None, None, None, None, torch.tensor(7.0), None)
    config = ("ppo", "token-mean", "", "k3", "token", _HYPER)
    torch.library.opcheck(torch.ops.rlkern.cpp_policy_loss.default, inputs + config)
    _, _, stats = torch.ops.rlkern.cpp_policy_loss(*inputs, *config)
    torch.library.opcheck(torch.ops.rlkern.cpp_policy_loss_backward.default,
                          (torch.tensor(0.5, dtype=torch.float64),) + inputs + (stats,) + config)


def test_float64_triton_kernels_compile_for_h100():
    # The float64 variants of every kernel (float64 inputs, stats and compute type) down to sm_90
    # cubins, as test_triton_kernels_compile_for_h100 does for float32 / bf16.
    script = _SM90_SCRIPT
    for old, new in (('return "*fp32"\n', 'return "*fp64"\n'),
                     ('("*bf16", True) if loss % 2 else ("*fp32", False)', '("*fp64", loss % 2 == 1)'),
                     ('BLOCK_B=K.FINISH_BLOCK), "*fp32", 4)', 'BLOCK_B=K.FINISH_BLOCK), "*fp64", 4)')):
        assert script.count(old) == 1, old
        script = script.replace(old, new)
    compile_for_sm90(script, TRITON_DEFAULT_FP_FUSION="1")


# ---------------------------------------------------------------------------------------------
# kl_penalty and aggregate on the kernels (csrc/policy_loss.cpp's cpp_kl_penalty / cpp_aggregate and
# their backwards, kernels/policy_loss.py's launchers of the same names): every backend against the
# float64 reference, float32 / bfloat16 within PyTorch's own error at that dtype, float64 within 1e-10.

PG = importlib.import_module("rlkern.ops.policy_loss.aggregate")  # the package exports a function of that name
from conftest import assert_as_close_as_torch  # noqa: E402

_KL_ALL = ESTIMATORS + ["k2+", "mse+"]
_LOW = [torch.float32, torch.bfloat16]


def _kl_inputs(seed=40, shape=(5, 37)):
    """float64 log-probs and references with log-ratios past the k3 clamps (|ref - lp| 30, 20.5,
    exactly 20, and where e^x - x - 1 crosses 10) and a spread of 1.5 elsewhere."""
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(shape, generator=g, dtype=torch.float64) * 3
    ref = lp + torch.randn(shape, generator=g, dtype=torch.float64) * 1.5
    flat = ref.view(-1)
    shifts = torch.tensor([30.0, -30.0, 20.5, -20.5, 20.0, -20.0, 2.53, 2.54, -11.0, -10.9], dtype=torch.float64)
    flat[:len(shifts)] = lp.view(-1)[:len(shifts)] + shifts
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    return lp, ref, grad


def _kl_expected(lp, ref, grad, est):
    """float64 value and gradient of the reference on the given (already rounded) inputs."""
    x = lp.double().clone().requires_grad_()
    value = reference.kl_penalty(x, ref.double(), est)
    value.backward(grad.double())
    return value.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("est", _KL_ALL)
def test_kl_penalty_kernels_match_reference(backend, est, dtype):
    # odd sizes: 185 tokens (no vector width or block divides them) and a 3-d [3, 5, 7]
    for shape in ((5, 37), (3, 5, 7)):
        lp64, ref64, grad64 = _kl_inputs(shape=shape)
        lp, ref, grad = (t.to(dtype) for t in (lp64, ref64, grad64))
        want, want_grad = _kl_expected(lp, ref, grad, est)
        x = lp.clone().requires_grad_()
        value = P.kl_penalty(x, ref, kl_estimator=est)
        value.backward(grad.to(value.dtype))
        assert value.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert x.grad.dtype == dtype and value.shape == x.grad.shape == shape
        name = f"{backend} {est} {dtype} {shape}"
        if dtype == torch.float64:
            _close(value, want, name=f"{name} value", **_FP64_TOL)
            _close(x.grad, want_grad, name=f"{name} grad", **_FP64_TOL)
            continue
        torch_value = PG._kl_reference(lp, ref, est)
        torch_grad = PG._kl_reference_backward(grad.to(torch_value.dtype), lp, ref, est)
        scale = want_grad.abs().max().item()
        assert_as_close_as_torch(value, want, torch_value, floor=4e-6, factor=4.0, name=f"{name} value")
        # bf16 gradients: one rounding to bf16 each (the interpreter truncates where the GPU rounds to nearest)
        assert_as_close_as_torch(x.grad, want_grad, torch_grad, floor=4e-6 * scale, factor=4.0,
                                 name=f"{name} grad")


def _agg_case(seed=41, B=5, T=13, dtype=torch.float32):
    """Ragged rows (row 2 empty, rows of 1..T tokens), NaN and inf values at masked-out tokens."""
    b = _batch(B=B, T=T, seed=seed, ragged=True)
    values = b["ent"] - 1.0
    values[~b["mask"] & (torch.arange(T) % 2 == 0)] = float("nan")
    values[~b["mask"] & (torch.arange(T) % 2 == 1)] = float("inf")
    return values.to(dtype), b["mask"], b["inside"]


def _agg_expected(values, mask, agg, grad=1.5, **norms):
    x = values.double().clone().requires_grad_()
    loss = reference.aggregate(x, mask.double(), agg, **norms)
    (loss * grad).backward()
    return loss.detach(), x.grad


def _agg_ours(values, mask, inside, agg, packed, grad=1.5, **norms):
    """The public op (padded, or packed with the ragged rows' own tokens), loss and d loss / d values as [B, T]."""
    x = (values[inside] if packed else values).clone().requires_grad_()
    cu = torch.cat([torch.zeros(1, dtype=torch.long), inside.sum(-1).cumsum(0)]) if packed else None
    loss = P.aggregate(x, mask[inside] if packed else mask, agg=agg, cu_seqlens=cu, **norms)
    (loss * grad).backward()
    if not packed:
        return loss.detach(), x.grad
    full = x.grad.new_zeros(values.shape)
    full[inside] = x.grad
    return loss.detach(), full


_NORMS = [{}, {"dp_size": 2, "global_tokens": 40, "global_seqs": 7},
          {"dp_size": 4, "global_tokens": torch.tensor(33.0), "global_seqs": torch.tensor(9.0, dtype=torch.float64)}]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("agg", P.AGG_MODES)
def test_aggregate_kernels_match_reference(backend, agg, packed, dtype):
    values, mask, inside = _agg_case(dtype=dtype)
    for i, norms in enumerate(_NORMS):
        lsf = 13.0 if packed or i == 2 else None  # packed seq-mean-token-sum-norm needs it; padded: T or given
        ref_norms = dict(norms, loss_scale_factor=lsf)
        loss, grad = _agg_ours(values, mask, inside, agg, packed, **ref_norms)
        want, want_grad = _agg_expected(values, mask, agg, **ref_norms)
        name = f"{backend} {agg} {'packed' if packed else 'padded'} {dtype} norms {i}"
        assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and grad.dtype == dtype
        assert torch.isfinite(grad).all(), name
        if dtype == torch.float64:
            _close(loss, want, name=f"{name} loss", **_FP64_TOL)
            _close(grad, want_grad, name=f"{name} grad", **_FP64_TOL)
            continue
        x = values.clone()
        m = mask
        gt, gs = (norms.get(k) for k in ("global_tokens", "global_seqs"))
        as_t = lambda v: v if v is None or isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=torch.float64)  # noqa: E731
        lsf_arg = float("nan") if ref_norms["loss_scale_factor"] is None else ref_norms["loss_scale_factor"]
        args = (m, None, as_t(gt), as_t(gs), agg, float(norms.get("dp_size", 1)), lsf_arg)
        torch_loss = PG._agg_reference(x, *args)
        torch_grad = PG._agg_reference_backward(torch.tensor(1.5), x, *args)
        assert_as_close_as_torch(loss, want, torch_loss, floor=1e-6 * max(want.abs().item(), 1.0), factor=4.0,
                                 name=f"{name} loss")
        assert_as_close_as_torch(grad, want_grad, torch_grad, floor=1e-6 * want_grad.abs().max().item(), factor=4.0,
                                 name=f"{name} grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_aggregate_kernels_mask_dtypes(backend, dtype):
    # every mask dtype the op takes; float masks weight the tokens by value (0, 0.5, 1, 2, -1)
    values, mask, inside = _agg_case(seed=42, B=4, T=21, dtype=dtype)
    g = torch.Generator().manual_seed(6)
    weights = torch.tensor([0.0, 0.5, 1.0, 2.0, -1.0])[torch.randint(0, 5, mask.shape, generator=g)] * mask
    masks = [mask] + [mask.to(d) for d in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)]
    masks += [weights.to(d) for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)]
    tol = _FP64_TOL if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-6)
    for m, agg in itertools.product(masks, P.AGG_MODES):
        want, want_grad = _agg_expected(values, m, agg)
        for packed in (False, True):
            loss, grad = _agg_ours(values, m, inside, agg, packed, loss_scale_factor=21.0 if packed else None)
            name = f"{backend} mask {m.dtype} {agg} packed={packed}"
            _close(loss, want, name=name, **tol)
            _close(grad, want_grad, name=f"{name} grad", **tol)


def test_kl_penalty_and_aggregate_empty_and_long(backend, monkeypatch):
    # empty masks give a loss of 0 and a zero gradient in every mode; no token at all (B = 0
    # packed, T = 0 padded, an empty kl_penalty); T = 601 runs the C++ flush into double (every
    # 64 vectors) and, with the Triton block at 64 and 8 "SMs", several programs per sequence.
    from rlkern.kernels import policy_loss as kernel

    monkeypatch.setattr(kernel, "MAX_BLOCK", 64)
    monkeypatch.setattr(kernel, "FINISH_BLOCK", 4)
    monkeypatch.setattr(kernel, "CPU_SMS", 8)
    for dtype, agg in itertools.product((torch.float32, torch.float64), P.AGG_MODES):
        values = torch.randn(3, 7, dtype=dtype).requires_grad_()
        loss = P.aggregate(values, torch.zeros(3, 7, dtype=torch.bool), agg=agg)
        loss.backward()
        assert loss.item() == 0.0 and loss.dtype == values.dtype and (values.grad == 0).all()
        none = torch.zeros(0, dtype=dtype, requires_grad=True)
        loss = P.aggregate(none, None, agg=agg, cu_seqlens=torch.zeros(1, dtype=torch.int32), loss_scale_factor=1.0)
        loss.backward()
        assert loss.item() == 0.0 and none.grad.shape == (0,)
        assert P.aggregate(torch.zeros(4, 0, dtype=dtype), torch.zeros(4, 0), agg=agg).item() == 0.0
    empty = torch.zeros(2, 0, requires_grad=True)
    out = P.kl_penalty(empty, empty.detach(), kl_estimator="k3")
    out.sum().backward()
    assert out.shape == (2, 0) and empty.grad.shape == (2, 0)
    for dtype in (torch.float32, torch.float64):
        values, mask, inside = _agg_case(seed=43, B=5, T=601, dtype=dtype)
        tol = _FP64_TOL if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
        for agg, packed in itertools.product(("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"),
                                             (False, True)):
            loss, grad = _agg_ours(values, mask, inside, agg, packed)
            want, want_grad = _agg_expected(values, mask, agg)
            _close(loss, want, name=f"{backend} T=601 {agg} {dtype}", **tol)
            _close(grad, want_grad, name=f"{backend} T=601 {agg} {dtype} grad", **tol)
        lp, ref, grad = _kl_inputs(shape=(3, 601))
        x = lp.to(dtype).clone().requires_grad_()
        value = P.kl_penalty(x, ref.to(dtype), kl_estimator="k3")
        value.backward(grad.to(dtype))
        want, want_grad = _kl_expected(lp.to(dtype), ref.to(dtype), grad.to(dtype), "k3")
        _close(value, want, name=f"{backend} kl T=601 {dtype}", **tol)
        _close(x.grad, want_grad, name=f"{backend} kl T=601 {dtype} grad", **tol)


@pytest.mark.parametrize("name", ["cpp", "triton"])
def test_kl_penalty_and_aggregate_run_kernels(kernels_only, monkeypatch, name):
    # float16 / bfloat16 / float32 / float64 inputs, padded and packed, forward and backward: a
    # kernel every time (kernels_only fails on the PyTorch backend), with the reference's numbers.
    if name == "triton" and not _backend.triton_interpreted():
        pytest.skip("Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    if name == "cpp":
        monkeypatch.delenv("RLKERN_BACKEND", raising=False)  # the CPU default
    else:
        monkeypatch.setenv("RLKERN_BACKEND", name)
    lp64, ref64, grad64 = _kl_inputs(seed=44, shape=(4, 9))
    values, mask, inside = _agg_case(seed=44, B=4, T=9)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        assert PG._KL.backend(lp64.to(dtype)) == PG._AGG_BACKWARD.backend(lp64.to(dtype)) == name
        lp, ref, grad = lp64.to(dtype), ref64.to(dtype), grad64.to(dtype)
        x = lp.clone().requires_grad_()
        value = P.kl_penalty(x, ref, kl_estimator="k3")
        value.backward(grad.to(value.dtype))
        want, want_grad = _kl_expected(lp, ref, grad, "k3")
        tol = _FP64_TOL if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
        _close(value, want, name=f"{name} kl {dtype}", **tol)
        _close(x.grad, want_grad, name=f"{name} kl grad {dtype}",
               **(tol if dtype in (torch.float32, torch.float64) else dict(rtol=1e-2, atol=1e-2)))
        for packed in (False, True):
            loss, g = _agg_ours(values.to(dtype), mask, inside, "seq-mean-token-mean", packed)
            want, want_grad = _agg_expected(values.to(dtype), mask, "seq-mean-token-mean")
            _close(loss, want, name=f"{name} aggregate {dtype} packed={packed}", rtol=1e-5, atol=1e-6)
            _close(g, want_grad, name=f"{name} aggregate grad {dtype} packed={packed}", rtol=1e-2, atol=1e-6)


def test_kl_penalty_and_aggregate_cpp_opcheck():
    # the C++ ops' Meta outputs (shape, dtype, strides: a transposed input gives a transposed
    # output, as torch.empty_like in the fake implementations) against their CPU outputs
    if not _backend.has_cpp():
        pytest.fail("rlkern._C did not build")
    ops = torch.ops.rlkern
    lp64, ref64, grad64 = _kl_inputs(seed=45, shape=(6, 5))
    values, mask, inside = _agg_case(seed=45, B=4, T=9)
    values = values.nan_to_num(posinf=5.0)  # the last case counts every token (NaN != NaN in the comparison)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), inside.sum(-1).cumsum(0)])
    for dtype, est in ((torch.float32, "k3"), (torch.float64, "abs+"), (torch.bfloat16, "k2")):
        lp, ref, grad = lp64.to(dtype), ref64.to(dtype), grad64.to(dtype)
        for a, b, g in ((lp, ref, grad), (lp.t(), ref.t(), grad.t())):
            torch.library.opcheck(ops.cpp_kl_penalty.default, (a, b, est))
            torch.library.opcheck(ops.cpp_kl_penalty_backward.default, (g, a, b, est))
            torch.library.opcheck(ops.kl_penalty.default, (a.clone().requires_grad_(), b, est))
        assert ops.cpp_kl_penalty(lp.t(), ref.t(), est).stride() == torch.empty_like(lp.t()).stride()
        v = values.to(dtype)
        for args in ((v, mask, None, None, None, "seq-mean-token-mean", 1.0, float("nan")),
                     (v, mask.float(), None, torch.tensor(30.0), torch.tensor(6.0), "seq-mean-token-sum-norm", 2.0,
                      float("nan")),
                     (v[inside], mask[inside], cu, None, None, "token-mean", 1.0, float("nan")),
                     (v[inside], None, cu.int(), torch.tensor(20.0, dtype=torch.float64), None, "token-sum", 3.0,
                      4.0)):
            torch.library.opcheck(ops.cpp_aggregate.default, args)
            torch.library.opcheck(ops.cpp_aggregate_backward.default,
                                  (torch.tensor(0.5, dtype=PA.out_dtype(v)),) + args)
            torch.library.opcheck(ops.aggregate.default, (args[0].clone().requires_grad_(),) + args[1:])
        with pytest.raises(RuntimeError, match="rlkern.cpp_aggregate: mask must have the shape of values"):
            ops.cpp_aggregate(v, mask[:, :3], None, None, None, "token-mean", 1.0, float("nan"))
        with pytest.raises(RuntimeError, match="rlkern.cpp_kl_penalty: ref_logprobs must have the shape of logprobs"):
            ops.cpp_kl_penalty(lp, ref[:, :2], est)


_SM90_AGG_SCRIPT = """
import triton.language as tl
from rlkern.kernels import policy_loss as K

for cdt, io in ((tl.float32, "*bf16"), (tl.float32, "*fp32"), (tl.float32, "*fp16"), (tl.float64, "*fp64")):
    for kl, st, backward in ((0, False, False), (1, False, True), (2, True, True), (3, False, False),
                             (3, False, True), (3, True, True)):
        flags = dict(KL=kl, KL_ST=st, BACKWARD=backward, CDT=cdt, BLOCK=K.KL_BLOCK)
        sig = {n: io for n in ("lp_ptr", "ref_ptr", "grad_ptr")}
        sig["out_ptr"] = io if backward else ("*fp64" if cdt == tl.float64 else "*fp32")
        sig["N"] = "i64"
        build(K._kl_penalty_kernel, sig, flags, num_warps=4)
    part = "*fp64" if cdt == tl.float64 else "*fp32"
    for packed, has_mask, mask_t in ((False, True, "*u8"), (True, False, "*u8"), (True, True, "*fp32"),
                                     (False, True, "*i64")):
        for with_values in (True, False):
            flags = dict(WITH_VALUES=with_values, HAS_MASK=has_mask, PACKED=packed, BLOCK=K.MAX_BLOCK)
            sig = dict(v_ptr=io, mask_ptr=mask_t, cu_ptr="*i64" if packed else "*i32", part_ptr=part, T="i32",
                       s_v="i32", s_mask="i32")
            build(K._aggregate_sums_kernel, sig, flags, num_warps=K.TOKEN_WARPS)
        for agg, gtok, w_buf in ((0, 1, False), (1, 0, False), (3, 0, True), (4, 1, True)):
            flags = dict(AGG=agg, GTOK=gtok, W_BUF=w_buf, HAS_MASK=has_mask, PACKED=packed, CDT=cdt,
                         BLOCK=K.MAX_BLOCK)
            sig = dict(mask_ptr=mask_t, cu_ptr="*i32", w_ptr=part, gtok_ptr="*fp64", grad_ptr=part, out_ptr=io,
                       T="i32", s_mask="i32", dp="fp64")
            build(K._aggregate_bwd_kernel, sig, flags, num_warps=K.TOKEN_WARPS)
    for agg in range(5):
        for backward in (False, True):
            flags = dict(AGG=agg, GTOK=agg % 2, GSEQ=(agg + 1) % 2, BACKWARD=backward, BLOCK_B=K.FINISH_BLOCK)
            sig = dict(part_ptr=part, gtok_ptr="*fp64", gseq_ptr="*fp32", grad_ptr=part, out_ptr=part, B="i32",
                       K="i32", dp="fp64", scale="fp64")
            build(K._aggregate_finish_kernel, sig, flags, num_warps=4)
print("ok")
"""


def test_kl_penalty_and_aggregate_triton_kernels_compile_for_h100():
    # the kl_penalty and aggregate kernels (every estimator family, forward and backward, each
    # token dtype with its compute type, padded / packed, mask dtypes, every agg mode) down to
    # sm_90 cubins, as test_triton_kernels_compile_for_h100 does for the policy loss
    compile_for_sm90(_SM90_AGG_SCRIPT, TRITON_DEFAULT_FP_FUSION="1")
