"""Property-based tests (hypothesis) of the public ops against the float64 references (issue 21).

Two profiles: "ci" (the default) is derandomized (a fixed seed, so CI is reproducible) and bounded
(small example counts, the Triton backend under TRITON_INTERPRET=1 on fewer and smaller examples
than the C++ one); "long" (``RLKERN_FUZZ=long``) draws random examples, many more of them and larger
shapes (T up to a few thousand for the scans), and is run by hand.

Each test draws shapes (0 and 1 sizes, V not a multiple of any block), dtypes, masks (empty,
full, holes, left/right padding) and extreme values (+-1e4 logits, -inf, huge advantages), and
asserts the op's result against rlkern/reference/ at the tolerances of the op's own test file,
plus invariants (log-probs <= 0, no NaN without a NaN input, padded == packed).
"""

import inspect
import math

import pytest
import torch
from _fuzz import LAYOUTS, _big, _close, _fuzz, _gen, _inside, _mask, _small, fuzzes
from conftest import assert_as_close_as_torch
from hypothesis import example, given
from hypothesis import strategies as st

import rlkern
from rlkern.ops import advantages as A
from rlkern.reference import advantages as R_adv
from rlkern.reference import logprobs as R_logp
from rlkern.reference import policy_loss as R_pl
from rlkern.reference import preference as R_pref
from rlkern.reference import preference_tokens as R_ptok
from rlkern.reference.preference import METRIC_KEYS as PREF_KEYS


# ---------------------------------------------------------------------------------------------
# token_logprobs


@st.composite
def _logprobs_case(draw, max_n, max_v):
    n = draw(st.integers(0, max_n))
    vocab = draw(st.one_of(st.sampled_from([1, 2, 3, 7, 127, 129, 1000, 1025]), st.integers(1, max_v)))
    dtype = draw(st.sampled_from([torch.bfloat16, torch.float16, torch.float32, torch.float64]))
    scale = draw(st.sampled_from([1.0, 3.0, 30.0]))
    extremes = draw(st.sampled_from(["none", "pm1e4", "neginf", "all_neginf_row", "nan"]))
    temperature = draw(st.sampled_from([1.0, 0.7, 1.3]))
    ignore_every = draw(st.integers(0, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    return n, vocab, dtype, scale, extremes, temperature, ignore_every, seed


def _logprobs_inputs(n, vocab, dtype, scale, extremes, ignore_every, seed):
    g = _gen(seed)
    logits = torch.randn(n, vocab, generator=g, dtype=torch.float64) * scale
    if n and extremes != "none":
        spots = torch.rand(n, vocab, generator=g) < 0.1
        if extremes == "pm1e4":
            signs = torch.where(torch.rand(n, vocab, generator=g) < 0.5, -1.0, 1.0).double()
            logits = torch.where(spots, 1e4 * signs, logits)
        elif extremes == "neginf":
            logits = torch.where(spots, -math.inf, logits)
        elif extremes == "nan":
            logits = torch.where(spots & (torch.rand(n, vocab, generator=g) < 0.2), math.nan, logits)
        else:
            logits[0] = -math.inf  # a row with every logit -inf: uniform by the op's convention
    logits = logits.to(dtype)  # 1e4 is exact in bf16/fp16 (fp16 max 65504)
    labels = torch.randint(0, vocab, (n,), generator=g)
    if ignore_every:
        labels[::ignore_every] = -100
    return logits, labels


@fuzzes("token_logprobs")
def test_token_logprobs(backend):
    max_n, max_v = _small(backend, 12, 64), _small(backend, 5000, 40000)

    @_fuzz(backend)
    @given(_logprobs_case(max_n, max_v))
    def check(case):
        n, vocab, dtype, scale, extremes, temperature, ignore_every, seed = case
        logits, labels = _logprobs_inputs(n, vocab, dtype, scale, extremes, ignore_every, seed)
        logp, entropy = rlkern.token_logprobs(logits, labels, temperature=temperature, return_entropy=True)
        ref_logp, ref_entropy, _ = R_logp.logprobs_fwd(logits.double(), labels, temperature, 0.0, -100, True)
        out = torch.float64 if dtype == torch.float64 else torch.float32
        assert logp.dtype == out and entropy.dtype == out and logp.shape == (n,) and entropy.shape == (n,)
        # NaN policy (rlkern/reference/logprobs.py): a NaN logit makes its row's entropy NaN and its
        # log-prob NaN unless the label is ignored; no other row and no NaN without a NaN input
        nan_rows = logits.isnan().any(-1)
        assert torch.equal(entropy.isnan(), nan_rows)
        assert torch.equal(logp.isnan(), nan_rows & (labels != -100))
        finite_logp, finite_entropy = logp[~logp.isnan()], entropy[~nan_rows]
        assert (finite_logp <= 0).all()
        assert (logp[labels == -100] == 0).all()
        assert (finite_entropy >= 0).all() and (finite_entropy <= math.log(vocab) * (1 + 1e-5) + 1e-5).all()
        # as tests/test_logprobs.py: fp32 accumulation of exactly-upcast inputs (the reference
        # takes the same low-precision values upcast), relative to the magnitude of the result
        _close(logp, ref_logp, name="logp", equal_nan=True)
        _close(entropy, ref_entropy, name="entropy", equal_nan=True)

    check()


@pytest.mark.parametrize("backend", ["cpp", "torch"], indirect=True)
def test_token_logprobs_backward(backend):
    max_n, max_v = _big(9, 48), _big(3000, 40000)

    @_fuzz(backend, 0.5)
    @given(_logprobs_case(max_n, max_v), st.booleans())
    def check(case, with_entropy_grad):
        n, vocab, dtype, scale, extremes, temperature, ignore_every, seed = case
        extremes = "none" if extremes == "nan" else extremes  # the forward test covers the NaN policy
        logits, labels = _logprobs_inputs(n, vocab, dtype, scale, extremes, ignore_every, seed)
        g = _gen(seed + 1)
        g_l, g_h = torch.randn(n, generator=g), torch.randn(n, generator=g) if with_entropy_grad else None
        leaf = logits.clone().requires_grad_()
        logp, entropy = rlkern.token_logprobs(leaf, labels, temperature=temperature, return_entropy=True)
        loss = (logp * g_l.to(logp.dtype)).sum() + ((entropy * g_h.to(entropy.dtype)).sum() if g_h is not None else 0)
        loss.backward()
        _, ref_entropy, lse = R_logp.logprobs_fwd(logits.double(), labels, temperature, 0.0, -100, True)
        ref = R_logp.logprobs_bwd(g_l.double(), None if g_h is None else g_h.double(), logits.double(), labels, lse,
                                  ref_entropy, temperature, 0.0, -100)
        assert leaf.grad.dtype == dtype and not leaf.grad.isnan().any()
        # tolerance: one rounding to the logits' dtype of a float64-accurate gradient, plus fp32
        # accumulation (tests/test_logprobs.py bounds it by PyTorch's own error at this dtype)
        eps = max(torch.finfo(dtype).eps, 2e-6) if dtype != torch.float64 else 1e-12
        bound = ref.double().abs().max().item() if ref.numel() else 0.0
        _close(leaf.grad, ref, tol=max(4 * eps * bound, 1e-6), name="grad")

    check()


# ---------------------------------------------------------------------------------------------
# policy_loss


@st.composite
def _policy_case(draw, max_b, max_t):
    b = draw(st.integers(1, max_b))
    t = draw(st.integers(1, max_t))
    layout = draw(st.sampled_from(LAYOUTS))
    loss = draw(st.sampled_from(["ppo", "reinforce", "gspo", "cispo", "gpg"]))
    agg = draw(st.sampled_from(["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]))
    adv_scale = draw(st.sampled_from([1.0, 1e4, 1e6]))
    spread = draw(st.sampled_from([0.01, 0.4, 5.0]))
    dual = draw(st.sampled_from([None, 3.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    return b, t, layout, loss, agg, adv_scale, spread, dual, seed


def _policy_tensors(b, t, layout, adv_scale, spread, seed):
    g = _gen(seed)
    lp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    old = lp + torch.randn(b, t, generator=g, dtype=torch.float64) * spread
    adv = torch.randn(b, t, generator=g, dtype=torch.float64) * adv_scale
    ref = lp + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.3
    ent = torch.rand(b, t, generator=g, dtype=torch.float64) * 2
    mask = _mask(g, b, t, layout)
    return lp, old, adv, ref, ent, mask


def _near_clip_bounds(lp, old, mask, loss, clip_low, clip_high, dual):
    """Valid tokens whose importance ratio (per token; per sequence for gspo) is within float32
    rounding (1e-5 relative) of a clip bound: 1 - clip_low, 1 + clip_high, dual_clip."""
    m = mask.double()
    log_ratio = (lp - old) * m
    if loss == "gspo":
        log_ratio = ((log_ratio.sum(-1) / m.sum(-1).clamp(min=1))[:, None]).expand_as(lp)
    ratio = log_ratio.exp()
    bounds = [1 - clip_low, 1 + clip_high] + ([dual] if dual is not None else [])
    near = torch.zeros_like(mask)
    for b in bounds:
        near |= (ratio - b).abs() <= 1e-5 * b
    return near & mask


@fuzzes("policy_loss")
def test_policy_loss(backend):
    max_b, max_t = _small(backend, 6, 16), _small(backend, 40, 2000)

    @_fuzz(backend)
    @given(_policy_case(max_b, max_t))
    @example((9, 737, "right", "ppo", "token-mean", 1.0, 0.4, None, 742))  # the long profile's clip-bound tie
    def check(case):
        b, t, layout, loss, agg, adv_scale, spread, dual, seed = case
        if loss not in ("ppo",):
            dual = None
        lp, old, adv, ref, ent, mask = _policy_tensors(b, t, layout, adv_scale, spread, seed)
        kw = dict(loss=loss, clip_high=0.28, dual_clip=dual, kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01,
                  agg=agg)
        # the float64 reference, with its gradient by autograd
        r_lp, r_ent = lp.clone().requires_grad_(), ent.clone().requires_grad_()
        r_total, r_metrics = R_pl.policy_loss(r_lp, old, adv, mask, ref_logprobs=ref, entropy=r_ent, **kw)
        r_total.backward()
        # padded
        o_lp, o_ent = lp.float().requires_grad_(), ent.float().requires_grad_()
        total, metrics = rlkern.policy_loss(o_lp, old.float(), adv.float(), mask, ref_logprobs=ref.float(),
                                            entropy=o_ent, **kw)
        total.backward()
        assert not total.isnan() and not o_lp.grad.isnan().any()
        tol = 5e-5 * max(1.0, r_total.abs().item())
        _close(total, r_total.detach(), tol=tol, name=f"{loss} {agg} loss")
        # A token whose ratio lies within float32 rounding of a clip bound may be clipped in float32
        # and not in float64 (the long profile's finding: one token of 4545 at 1 - clip_low): the
        # clip fractions may then differ by that token's share of its row, and its gradient (0 when
        # clipped) is not compared.
        near = _near_clip_bounds(lp, old, mask, loss, 0.2, 0.28, dual)
        share = (near.sum(-1) / mask.sum(-1).clamp(min=1)).max().item() if near.any() else 0.0
        got = torch.stack([metrics[k] for k in R_pl.METRIC_KEYS])
        mtol = torch.full((len(R_pl.METRIC_KEYS),), 5e-5 * max(1.0, r_metrics.abs().max().item()))
        mtol[[i for i, k in enumerate(R_pl.METRIC_KEYS) if "clipfrac" in k]] += share
        assert ((got.double() - r_metrics.double()).abs() <= mtol.double()).all(), f"metrics {got} != {r_metrics}"
        gtol = 5e-5 * max(1.0, r_lp.grad.abs().max().item())
        _close(torch.where(near, 0, o_lp.grad), torch.where(near, 0, r_lp.grad), tol=gtol, name="grad logprobs")
        _close(o_ent.grad, r_ent.grad, tol=5e-5, name="grad entropy")
        # packed (cu_seqlens), the rows' own tokens only (left/right padding removed), equal to padded
        inside = _inside(mask)
        cu = torch.cat([torch.zeros(1, dtype=torch.long), inside.sum(-1).cumsum(0)]).to(torch.int32)
        p_lp, p_ent = lp.float()[inside].requires_grad_(), ent.float()[inside].requires_grad_()
        p_total, p_metrics = rlkern.policy_loss(p_lp, old.float()[inside], adv.float()[inside], mask[inside],
                                                ref_logprobs=ref.float()[inside], entropy=p_ent, cu_seqlens=cu,
                                                advantages_per_sequence=False,
                                                # padded input defaults to the padded width T (verl); packed must say it
                                                loss_scale_factor=float(t) if agg == "seq-mean-token-sum-norm" else None,
                                                **kw)
        p_total.backward()
        _close(p_total, total.detach(), tol=1e-5 * max(1.0, total.abs().item()), name="packed loss")
        p_got = torch.stack([p_metrics[k] for k in R_pl.METRIC_KEYS])
        _close(p_got, got, tol=1e-5 * max(1.0, got.abs().max().item()), name="packed metrics")
        _close(p_lp.grad, o_lp.grad[inside], tol=1e-5 * max(1.0, o_lp.grad.abs().max().item()), name="packed grad")

    check()


# ---------------------------------------------------------------------------------------------
# gae / discounted_returns


@st.composite
def _scan_case(draw, max_b, max_t):
    b = draw(st.integers(0, max_b))
    t = draw(st.integers(1, max_t))
    layout = draw(st.sampled_from(LAYOUTS))
    gamma = draw(st.sampled_from([1.0, 0.99, 0.5, 0.0]))
    lam = draw(st.sampled_from([1.0, 0.95, 0.0]))
    scale = draw(st.sampled_from([1.0, 1e3]))
    seed = draw(st.integers(0, 2**31 - 1))
    return b, t, layout, gamma, lam, scale, seed


@fuzzes("gae", "discounted_returns")
def test_gae_and_discounted_returns(backend):
    max_b, max_t = _small(backend, 5, 8), _small(backend, 200, 4000)

    @_fuzz(backend)
    @given(_scan_case(max_b, max_t))
    def check(case):
        b, t, layout, gamma, lam, scale, seed = case
        g = _gen(seed)
        rewards = torch.randn(b, t, generator=g) * scale
        values = torch.randn(b, t, generator=g) * scale
        mask = _mask(g, b, t, layout)
        adv, ret = A.gae(rewards, values, mask, gamma=gamma, lam=lam)
        ref_adv, ref_ret = R_adv.gae(rewards, values, mask, gamma, lam)
        assert not adv.isnan().any() and not ret.isnan().any()
        assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()
        # as tests/test_advantages.py: fp32 output of float64 carries, relative to the largest value
        tol = 2e-5 * max(1.0, ref_adv.abs().max().item() if ref_adv.numel() else 0.0,
                         ref_ret.abs().max().item() if ref_ret.numel() else 0.0)
        _close(adv, ref_adv, tol=tol, name="advantages")
        _close(ret, ref_ret, tol=tol, name="returns")
        returns = A.discounted_returns(rewards, mask, gamma=gamma)
        ref = R_adv.discounted_returns(rewards, mask, gamma)
        _close(returns, ref, tol=2e-5 * max(1.0, ref.abs().max().item() if ref.numel() else 0.0), name="discounted")
        # packed == padded: each row's own slots, left/right padding removed
        if b:
            inside = _inside(mask)
            cu = torch.cat([torch.zeros(1, dtype=torch.long), inside.sum(-1).cumsum(0)]).to(torch.int32)
            p_adv, p_ret = A.gae(rewards[inside], values[inside], mask[inside], gamma=gamma, lam=lam, cu_seqlens=cu)
            _close(p_adv, adv[inside], tol=tol, name="packed advantages")
            _close(p_ret, ret[inside], tol=tol, name="packed returns")

    check()


# ---------------------------------------------------------------------------------------------
# group_normalize / grpo


@st.composite
def _group_case(draw, max_groups):
    sizes = draw(st.lists(st.integers(1, 9), min_size=1, max_size=max_groups))
    kind = draw(st.sampled_from(["normal", "binary", "equal", "huge"]))
    std = draw(st.sampled_from(["unbiased", "population", None]))
    scale = draw(st.sampled_from(["group", "batch", "none"]))
    singleton = draw(st.sampled_from(["verl", "zero"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return sizes, kind, std, scale, singleton, seed


@fuzzes("group_normalize", "grpo")
def test_group_normalize_and_grpo(backend):
    @_fuzz(backend, 2.0)
    @given(_group_case(_big(8, 64)))
    def check(case):
        sizes, kind, std, scale, singleton, seed = case
        g = _gen(seed)
        ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        ids = ids[torch.randperm(len(ids), generator=g)]
        n = len(ids)
        if kind == "binary":
            s = (torch.rand(n, generator=g) > 0.5).float()
        elif kind == "equal":
            s = torch.full((n,), 0.5)  # every group's mean is exactly 0.5: (s - mean) is exactly 0
        elif kind == "huge":
            s = torch.randn(n, generator=g) * 1e4
        else:
            s = torch.randn(n, generator=g)
        out = A.group_normalize(s, ids, eps=1e-4, std=std, scale=scale, singleton=singleton)
        ref = R_adv.group_normalize(s, ids.tolist(), 1e-4, std, scale, singleton)
        assert not out.isnan().any()
        _close(out, ref, tol=2e-5 * max(1.0, ref.abs().max().item()), name="group_normalize")
        if kind == "equal" and singleton == "zero":
            assert (out == 0).all()
        grpo = A.grpo(s, ids)
        _close(grpo, R_adv.group_normalize(s, ids.tolist(), 1e-6, "unbiased", "group", "verl"),
               tol=2e-5 * max(1.0, ref.abs().max().item(), s.abs().max().item()), name="grpo")

    check()


# ---------------------------------------------------------------------------------------------
# preference_loss / token_preference_loss


@st.composite
def _pref_case(draw, max_b):
    b = draw(st.integers(0, max_b))
    loss_type = draw(st.sampled_from(["sigmoid", "ipo", "hinge", "robust", "bco_pair", "exo_pair", "nca_pair",
                                      "sppo_hard", "apo_zero", "apo_down", "discopop"]))
    margin = draw(st.sampled_from([1.0, 100.0, 1e4]))
    beta = draw(st.sampled_from([0.1, 1.0]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**31 - 1))
    return b, loss_type, margin, beta, dtype, seed


@fuzzes("preference_loss")
def test_preference_loss(backend):
    @_fuzz(backend, 2.0)
    @given(_pref_case(_big(6, 256)))
    def check(case):
        b, loss_type, margin, beta, dtype, seed = case
        g = _gen(seed)
        c = (-torch.rand(b, generator=g, dtype=torch.float64) * 50).to(dtype)
        r = (c.double() + torch.randn(b, generator=g, dtype=torch.float64) * margin).to(dtype)
        rc = (c.double() + torch.randn(b, generator=g, dtype=torch.float64)).to(dtype)
        rr = (r.double() + torch.randn(b, generator=g, dtype=torch.float64)).to(dtype)
        # token counts: ipo averages by them (TRL), the other types ignore them
        lengths = dict(chosen_lengths=torch.randint(1, 300, (b,), generator=g),
                       rejected_lengths=torch.randint(1, 300, (b,), generator=g))
        extra = dict(label_smoothing=0.1) if loss_type in ("exo_pair", "robust") else {}
        leaf_c, leaf_r = c.clone().requires_grad_(), r.clone().requires_grad_()
        loss, metrics = rlkern.preference_loss(leaf_c, leaf_r, rc, rr, loss_type=loss_type, beta=beta, **lengths,
                                               **extra)
        gc, gr = torch.autograd.grad(loss, (leaf_c, leaf_r), allow_unused=True, materialize_grads=True)
        o_c, o_r = c.double().requires_grad_(), r.double().requires_grad_()
        want, want_metrics = R_pref.preference_loss(o_c, o_r, rc.double(), rr.double(), loss_type=loss_type, beta=beta,
                                                     **lengths, **extra)
        wc, wr = torch.autograd.grad(want, (o_c, o_r), allow_unused=True, materialize_grads=True)
        assert not loss.isnan() and not gc.isnan().any() and not gr.isnan().any()
        # tests/test_preference.py's tolerances, relative to the loss's magnitude (margins of 1e4)
        tol = (1e-12 if dtype == torch.float64 else 2e-5) * max(1.0, want.abs().item())
        _close(loss, want.detach(), tol=tol, name=f"{loss_type} loss")
        gtol = (1e-12 if dtype == torch.float64 else 2e-5) * max(1.0, wc.abs().max().item() if b else 0.0)
        _close(gc, wc, tol=gtol, name="grad chosen")
        _close(gr, wr, tol=gtol, name="grad rejected")
        for key in PREF_KEYS:
            w = want_metrics[key].double()
            _close(metrics[key], w, tol=max(2e-5, tol) * max(1.0, w.abs().item()), name=key)

    check()


@st.composite
def _token_pref_case(draw, max_pairs, max_t):
    n = draw(st.integers(1, max_pairs))
    t = draw(st.integers(1, max_t))
    layout = draw(st.sampled_from(["right", "left", "holes", "full"]))
    loss_type = draw(st.sampled_from(["sigmoid", "ipo", "simpo", "sigmoid_norm"]))
    ld_alpha = draw(st.sampled_from([None, 0.5]))
    seed = draw(st.integers(0, 2**31 - 1))
    return n, t, layout, loss_type, ld_alpha, seed


@fuzzes("token_preference_loss")
def test_token_preference_loss(backend):
    max_pairs, max_t = _small(backend, 4, 16), _small(backend, 24, 1000)

    @_fuzz(backend)
    @given(_token_pref_case(max_pairs, max_t))
    def check(case):
        n, t, layout, loss_type, ld_alpha, seed = case
        g = _gen(seed)
        lp = -torch.rand(2 * n, t, generator=g, dtype=torch.float64) * 3
        ref = None if loss_type == "simpo" else lp + torch.randn(2 * n, t, generator=g, dtype=torch.float64) * 0.3
        mask = _mask(g, 2 * n, t, layout)
        kw = dict(loss_type=loss_type, ld_alpha=ld_alpha)
        leaf = lp.float().requires_grad_()
        loss, metrics = rlkern.token_preference_loss(leaf, mask, None if ref is None else ref.float(), **kw)
        (grad,) = torch.autograd.grad(loss, leaf)
        r_leaf = lp.clone().requires_grad_()
        want, want_metrics = R_ptok.token_preference_loss(r_leaf, mask, ref, **kw)
        (r_grad,) = torch.autograd.grad(want, r_leaf)
        assert not loss.isnan() and not grad.isnan().any()
        # tests/test_preference_tokens.py's tolerances
        _close(loss, want.detach(), tol=1e-5, name="loss")
        _close(grad, torch.where(mask, r_grad, 0), tol=1e-5, name="grad")
        # The rewards metrics are beta times a difference of two fp32 row sums (of a few hundred to
        # a few thousand): their error is the sums' rounding, so the bound is PyTorch's own fp32 error
        # on the same sums (the reference run in float32; CONTRIBUTING.md, Tests), floored at 1e-5.
        with torch.no_grad():
            _, fp32_metrics = R_ptok.token_preference_loss(lp.float(), mask, None if ref is None else ref.float(), **kw)

        # Storing a row sum of magnitude S in float32 rounds it by up to S * 2^-24 (TRL's fp32 sums too):
        # a reward (beta times the difference of two sums) carries up to beta * 2^-23 * S of it, however
        # exactly the sums were accumulated; that is the floor of the metrics and of packed vs padded.
        beta = inspect.signature(rlkern.preference_loss).parameters["beta"].default
        row_abs = (lp.abs() * mask).sum(-1) + (0 if ref is None else (ref.abs() * mask).sum(-1))
        sum_rounding = beta * 2.0**-23 * (row_abs.max().item() if row_abs.numel() else 0.0)

        def metric_close(ours, key, what):
            floor = max(1e-5 * max(1.0, want_metrics[key].abs().item()), 2 * sum_rounding)
            assert_as_close_as_torch(ours[key], want_metrics[key], fp32_metrics[key], floor=floor, factor=4.0,
                                     name=f"{what}{key}")

        for key in PREF_KEYS:
            metric_close(metrics, key, "")
        # packed: every row's own slots (padding removed), equal to padded
        inside = _inside(mask)
        cu = torch.cat([torch.zeros(1, dtype=torch.long), inside.sum(-1).cumsum(0)])
        p_leaf = lp.float()[inside].requires_grad_()
        p_loss, p_metrics = rlkern.token_preference_loss(p_leaf, mask[inside], None if ref is None else
                                                         ref.float()[inside], cu_seqlens=cu, **kw)
        (p_grad,) = torch.autograd.grad(p_loss, p_leaf)
        # the packed layout against the reference first (as the padded one above), then against padded
        _close(p_loss, want.detach(), tol=1e-5, name="packed loss vs reference")
        for key in PREF_KEYS:
            metric_close(p_metrics, key, "packed ")
        # Bitwise equality holds when the packed rows keep the padded rows' block offsets
        # (tests/test_preference_tokens.py). Rows cut to their first..last valid token are the same fp32
        # sums in another order: the rewards metrics then differ by their sums' rounding, which each
        # layout's own bound against the float64 reference (above) covers (the long profile's finding,
        # docs/architecture.md); the loss by the same rounding of the sums, the gradient within 1e-6.
        _close(p_loss, loss.detach(), tol=max(1e-6, 2 * sum_rounding), name="packed loss")
        _close(p_grad, torch.where(mask, grad, 0)[inside], tol=1e-6, name="packed grad")

    check()


# ---------------------------------------------------------------------------------------------
# linear_token_logprobs


@st.composite
def _linear_case(draw, max_n, max_h, max_v):
    n = draw(st.integers(0, max_n))
    width = draw(st.integers(1, max_h))
    vocab = draw(st.one_of(st.sampled_from([1, 2, 67, 129, 513, 1001]), st.integers(1, max_v)))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    bias = draw(st.booleans())
    temperature = draw(st.sampled_from([1.0, 0.7]))
    softcap = draw(st.sampled_from([None, 5.0]))
    chunk_size = draw(st.sampled_from([None, 3]))
    ignore_every = draw(st.integers(0, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    return n, width, vocab, dtype, bias, temperature, softcap, chunk_size, ignore_every, seed


@fuzzes("linear_token_logprobs")
def test_linear_token_logprobs(backend):
    from rlkern.reference.linear_logprobs import linear_logprobs as R_linear

    max_n, max_h, max_v = _small(backend, 24, 64), _small(backend, 48, 256), _small(backend, 1500, 8000)

    @_fuzz(backend, 0.5)
    @given(_linear_case(max_n, max_h, max_v))
    def check(case):
        n, width, vocab, dtype, bias, temperature, softcap, chunk_size, ignore_every, seed = case
        g = _gen(seed)
        hidden = torch.randn(n, width, generator=g).to(dtype)
        weight = (torch.randn(vocab, width, generator=g) / math.sqrt(width) * 4).to(dtype)
        b = (torch.randn(vocab, generator=g)).to(dtype) if bias else None
        labels = torch.randint(0, vocab, (n,), generator=g)
        if ignore_every:
            labels[::ignore_every] = -100
        kw = dict(temperature=temperature, logit_softcap=softcap)
        h_leaf, w_leaf = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logp, entropy = rlkern.linear_token_logprobs(h_leaf, w_leaf, labels, bias=b, return_entropy=True,
                                                     chunk_size=chunk_size, **kw)
        r_h, r_w = hidden.double().requires_grad_(), weight.double().requires_grad_()
        r_logp, r_entropy, _ = R_linear(r_h, r_w, None if b is None else b.double(), labels, **kw)
        assert logp.dtype == entropy.dtype == torch.float32 and logp.shape == (n,)
        assert not logp.isnan().any() and not entropy.isnan().any()
        assert (logp <= 0).all() and (logp[labels == -100] == 0).all()
        # tests/test_linear_logprobs.py: products accumulate in fp32 for every input dtype
        torch.testing.assert_close(logp.double(), r_logp.detach(), rtol=0, atol=2e-5)
        torch.testing.assert_close(entropy.double(), r_entropy.detach(), rtol=0, atol=2e-5)
        if dtype == torch.float32 and n:
            up = torch.randn(2, n, generator=g)
            (logp * up[0] + entropy * up[1]).sum().backward()
            (r_logp * up[0].double() + r_entropy * up[1].double()).sum().backward()
            # atol as tests/test_linear_logprobs.py (1e-5 of the largest gradient), but where every
            # gradient is ~0 (V = 1: p = 1) the scale is that of one term, |upstream| * |other input|:
            # fp32 rounding of 1 - p leaves ~1e-8 there, not 0
            for name, got, want, other in (("hidden", h_leaf.grad, r_h.grad, weight),
                                           ("weight", w_leaf.grad, r_w.grad, hidden)):
                scale = up.abs().max().item() * other.abs().max().item() / temperature
                torch.testing.assert_close(got.double(), want, rtol=1e-4,
                                           atol=1e-5 * max(want.abs().max().item(), scale), msg=name)

    check()
