"""Property-based tests (hypothesis) of every public op that tests/test_fuzz.py does not cover,
against the float64 references in rlkern/reference/ (issue 21).

Profiles, strategies and helpers are tests/_fuzz.py's (the CI profile is derandomized and bounded;
``RLKERN_FUZZ=long`` draws many more random examples on larger shapes). Each test runs on the
default backend (the C++ kernels on CPU) and on the Triton kernels under TRITON_INTERPRET=1 with
fewer, smaller examples. The properties: random shapes with 0 and 1 sizes, groups of one, equal
rewards, extreme values, masks (empty, full, holes, left/right padding), input dtypes, packed
(``cu_seqlens``) equal to padded, NaN only where the op's NaN policy says. ``test_every_public_op_is_fuzzed``
checks that every name in ``rlkern.__all__`` is covered by a property test here or in test_fuzz.py.
"""

import math

import numpy as np
import pytest
import torch
from _fuzz import FUZZED, LAYOUTS, _big, _close, _cu, _fuzz, _gen, _group_ids, _inside, _mask, _scores, _small, fuzzes
from hypothesis import example, given
from hypothesis import strategies as st

import rlkern
from rlkern.ops import advantages as A
from rlkern.reference import advantages as R_adv

# The default backend (C++ on CPU) and the Triton kernels (interpreted): the PyTorch path is the
# reference's twin, tests/test_fuzz.py fuzzes it for the core ops.
BACKENDS = pytest.mark.parametrize("backend", ["cpp", "triton"], indirect=True)

def _rel(ref):
    """The scale of a result: its largest magnitude, at least 1."""
    return max(1.0, ref.double().abs().max().item()) if ref.numel() else 1.0


def _whitened_tol(tokens, mask, dtype):
    """Extra absolute tolerance of ``masked_whiten(tokens)``: it divides (x - mean), which carries
    the rounding of x (eps * |x|), by sqrt(var + 1e-8), so near-equal tokens (var ~ 0) amplify that
    rounding by up to 1e4 (the float64 long profile's finding on gdpo with two groups of one)."""
    m = mask.double()
    count = m.sum()
    if count < 2:
        return 0.0
    x = tokens.double()
    mean = (x * m).sum() / count
    var = (((x - mean) ** 2) * m).sum() / (count - 1)
    eps = 2.0**-52 if dtype == torch.float64 else 2.0**-23
    return 8 * eps * _rel(x[m != 0]) / math.sqrt(var.item() + 1e-8)


def _layout_case(draw, max_t):
    t = draw(st.integers(1, max_t))
    layout = draw(st.sampled_from(LAYOUTS))
    packed = draw(st.booleans())
    return t, layout, packed


# ---------------------------------------------------------------------------------------------
# outcome estimators: one score per sample, broadcast to the response tokens


@st.composite
def _outcome_case(draw, max_groups, max_t):
    sizes = draw(st.lists(st.integers(1, 7), min_size=1, max_size=max_groups))
    kind = draw(st.sampled_from(["normal", "binary", "equal", "huge", "nan"]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    form = draw(st.sampled_from(["tensor", "list", "str"]))
    t, layout, packed = _layout_case(draw, max_t)
    mask_dtype = draw(st.sampled_from([torch.bool, torch.float32]))
    norm = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return sizes, kind, dtype, form, t, layout, packed, mask_dtype, norm, seed


@fuzzes("grpo", "group_normalize", "rloo", "gpg", "bnpo", "grpo_passk", "opo", "reinforce_pp_baseline", "gdpo",
        "outcome_to_tokens", "dynamic_sampling_mask", "gigpo_step_groups", "group_index")
@BACKENDS
def test_outcome_estimators(backend):
    from rlkern.reference import dynamic_sampling as R_ds

    @_fuzz(backend, 0.6 if backend == "cpp" else 0.25, long_factor=4)
    @given(_outcome_case(_small(backend, 6, 40), _small(backend, 12, 300)))
    # the long profile's finding: whitening near-equal float64 tokens amplifies their rounding
    @example(([1, 1], "binary", torch.float64, "tensor", 14, "right", False, torch.bool, True, 0))
    @example(([1], "normal", torch.float64, "tensor", 10, "right", False, torch.bool, False, 0))
    def check(case):
        sizes, kind, dtype, form, t, layout, packed, mask_dtype, norm, seed = case
        g = _gen(seed)
        ids = _group_ids(g, sizes, form)
        ids_list = ids if isinstance(ids, list) else ids.tolist()
        n = len(ids_list)
        # fp16 holds 1e4 scores but not their squares' sums: the op upcasts, the reference takes the same values
        s = _scores(g, n, "normal" if kind == "nan" else kind, dtype)
        if kind == "nan":  # an unscorable sample
            s[int(torch.randint(0, n, (1,), generator=g))] = math.nan
        s64 = s.double()
        mask = _mask(g, n, t, layout)
        m64 = mask.double()
        # group_index: equal ids <-> equal numbers, in [0, N)
        dense = rlkern.group_index(ids)
        same = torch.tensor([[a == b for b in ids_list] for a in ids_list], dtype=torch.bool).reshape(n, n)
        assert torch.equal(dense[:, None] == dense[None, :], same) and dense.dtype == torch.int64
        assert n == 0 or (dense.min() >= 0 and dense.max() < n)
        inside = _inside(mask)
        cu = _cu(inside)
        tok = mask.to(mask_dtype)
        if packed:
            tok, kw, out_of = tok[inside], dict(cu_seqlens=cu), (lambda x: x[inside])
        else:
            kw, out_of = {}, (lambda x: x)
        per_token = lambda ref: out_of(ref.double()[:, None] * m64)  # noqa: E731
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        probs = torch.sigmoid(s.float()).to(dtype)
        anchors = np.array([f"obs{i}" for i in torch.randint(0, 3, (n,), generator=g).tolist()])
        std = "unbiased" if norm else None
        s2 = torch.stack([s, probs], 1)
        gdpo_parts = 0.5 * R_adv.group_normalize(s, ids_list, 1e-6, std) + 2.0 * R_adv.group_normalize(
            probs, ids_list, 1e-6, std)
        if kind == "nan":
            # NaN policy (group_normalize's docstring): verl's (skip_nan=False) propagates within the
            # NaN's group only; TRL's skip_nan=True leaves it out of every statistic and gives it 0
            bad = torch.zeros(n, dtype=torch.bool).index_fill_(0, dense[s.isnan()], True)[dense]
            out = A.grpo(s, ids, tok, norm_by_std=norm, **kw)
            want = per_token(R_adv.group_normalize(s, ids_list, 1e-6, std))
            assert torch.equal(out.isnan(), out_of(bad[:, None].expand(n, t)))
            _close(out, want, tol=tol * _rel(want.nan_to_num()), name="grpo NaN", equal_nan=True)
            out = A.group_normalize(s, ids, eps=1e-4, scale="batch", singleton="zero", skip_nan=True,
                                    response_mask=tok, **kw)
            want = per_token(R_adv.group_normalize(s, ids_list, 1e-4, "unbiased", "batch", "zero", skip_nan=True))
            assert not out.isnan().any()
            _close(out, want, tol=tol * _rel(want), name="group_normalize skip_nan")
            # a group holding a NaN score is kept by dynamic sampling (np.std is NaN, not 0)
            assert torch.equal(rlkern.dynamic_sampling_mask(s, ids), R_ds.dynamic_sampling_mask(s, ids_list))
            return
        # OPO's length weights; a group whose responses are all empty has only zero-mask tokens (any
        # baseline gives 0 there): plain weights keep the reference's division defined
        lengths = m64.sum(-1)
        group_len = torch.zeros(n, dtype=torch.float64).index_add_(0, dense, lengths)[dense]
        opo_weights = torch.where(group_len == 0, 1.0, lengths)
        whitened = m64.sum() >= 2  # masked_whiten's unbiased variance needs two valid tokens (else ValueError)
        cases = [
            ("grpo", A.grpo(s, ids, tok, norm_by_std=norm, **kw), per_token(R_adv.group_normalize(s, ids_list, 1e-6, std))),
            ("group_normalize", A.group_normalize(s, ids, eps=1e-4, scale="batch", singleton="zero", response_mask=tok,
                                                  **kw),
             per_token(R_adv.group_normalize(s, ids_list, 1e-4, "unbiased", "batch", "zero"))),
            ("rloo", A.rloo(s, ids, tok, singleton="zero" if norm else "raw", **kw),
             per_token(R_adv.rloo(s, ids_list, "zero" if norm else "raw"))),
            ("gpg", A.gpg(s, ids, tok, f_norm=2.0, **kw), per_token(R_adv.gpg(s, ids_list, 2.0))),
            ("bnpo", A.bnpo(probs, ids, tok, **kw), per_token(R_adv.bnpo(probs, ids_list))),
            ("opo", A.opo(s, ids, tok, **kw), per_token(s64 - R_adv.group_baseline(s, ids_list, opo_weights))),
            ("outcome_to_tokens", A.outcome_to_tokens(s, tok, **kw), per_token(s64)),
            ("gigpo_step_groups", A.gigpo_step_groups(s, anchors, ids, tok, norm_by_std=norm, **kw),
             per_token(R_adv.gigpo_step(s, list(anchors), ids_list, 1e-6, norm))),
        ]
        if whitened:
            rpp_tokens = (s64 - R_adv.group_baseline(s, ids_list))[:, None] * m64
            cases.append(("reinforce_pp_baseline", A.reinforce_pp_baseline(s, ids, tok, **kw),
                          out_of(R_adv.masked_whiten(rpp_tokens, m64) * m64)))
            cases.append(("gdpo", A.gdpo(s2, ids, tok, weights=[0.5, 2.0], norm_by_std=norm, **kw),
                          out_of(R_adv.masked_whiten(gdpo_parts[:, None] * m64, m64) * m64)))
            extra = {"reinforce_pp_baseline": _whitened_tol(rpp_tokens, m64, dtype),
                     "gdpo": _whitened_tol(gdpo_parts[:, None] * m64, m64, dtype)}
        else:
            extra = {}
            for op in (lambda: A.reinforce_pp_baseline(s, ids, tok, **kw), lambda: A.gdpo(s2, ids, tok, **kw)):
                with pytest.raises(ValueError, match="at least 2 valid tokens"):
                    op()
        if min(sizes) >= 2:  # Pass@k compares a group's best two (a group of one is a ValueError)
            cases.append(("grpo_passk", A.grpo_passk(s, ids, tok, norm_by_std=norm, **kw),
                          per_token(R_adv.grpo_passk(s, ids_list, 1e-6, norm))))
        for name, ours, ref in cases:
            assert ours.shape == tok.shape, name
            assert not ours.isnan().any(), name
            # bnpo's Beta-moment normalizer runs in float32 (tests/test_advantages.py: 1e-4)
            _close(ours, ref, tol=(1e-4 if name == "bnpo" and dtype != torch.float64 else tol) * _rel(ref)
                   + extra.get(name, 0.0), name=name)
        if kind == "equal":
            # equal rewards: no learning signal in any group (exactly 0, not rounding noise)
            # in groups of two or more (a group of one keeps its score under verl's singleton policy)
            shared = out_of((torch.bincount(dense, minlength=n)[dense] > 1)[:, None].expand(n, t))
            for name, ours, _ in cases[:2]:
                assert (ours[shared] == 0).all(), name
        keep = R_ds.dynamic_sampling_mask(s, ids_list)
        assert torch.equal(rlkern.dynamic_sampling_mask(s, ids), keep)
        assert torch.equal(rlkern.dynamic_sampling_mask(s, ids, tok, **kw), out_of(mask & keep[:, None]))

    check()



@BACKENDS
def test_opo_group_of_empty_responses_regression(backend):
    # test_outcome_estimators' finding: a group whose responses are all empty gave NaN on every
    # (masked) token of those rows (0/0 baseline); a masked sum downstream then turns the loss NaN.
    s = torch.tensor([1.0, 2.0, 0.5, 3.0])
    mask = torch.tensor([[0, 0, 0], [0, 0, 0], [1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    out = A.opo(s, [0, 0, 1, 1], mask)
    assert not out.isnan().any()
    assert (out[:2] == 0).all()
    b = (2 * 0.5 + 1 * 3.0) / 3  # the other group's length-weighted baseline
    _close(out[2:], (s[2:, None].double() - b) * mask[2:], name="opo")
    packed = A.opo(s, [0, 0, 1, 1], torch.tensor([0, 0, 1, 1, 1], dtype=torch.bool),
                   cu_seqlens=torch.tensor([0, 1, 2, 4, 5], dtype=torch.int32))
    assert not packed.isnan().any()


# ---------------------------------------------------------------------------------------------
# scans over tokens: egae, reinforce_pp, remax, masked_whiten (gae / discounted_returns: test_fuzz.py)

LONG_T = 20000  # one long row per profile (issue 21: T up to 20000 for the scans)


@st.composite
def _returns_case(draw, max_b, max_t):
    b = draw(st.integers(0, max_b))
    t, layout, packed = _layout_case(draw, max_t)
    gamma = draw(st.sampled_from([1.0, 0.99, 0.5, 0.0]))
    lam = draw(st.sampled_from([1.0, 0.95, 0.0]))
    scale = draw(st.sampled_from([1.0, 1e3]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    bootstrap = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return b, t, layout, packed, gamma, lam, scale, dtype, bootstrap, seed


@fuzzes("egae", "reinforce_pp", "remax", "masked_whiten")
@BACKENDS
def test_return_scans(backend):
    @_fuzz(backend, 0.6 if backend == "cpp" else 0.3, long_factor=4)
    @given(_returns_case(_small(backend, 5, 8), _small(backend, 200, 4000)))
    # the interpreter runs a long row's blocks one by one in Python: a shorter long row there
    @example((1, LONG_T if backend != "triton" else 1500, "holes", True, 0.99, 0.95, 1.0, torch.float32, True, 7))
    def check(case):
        b, t, layout, packed, gamma, lam, scale, dtype, bootstrap, seed = case
        g = _gen(seed)
        # scale 1e3 in fp16 would overflow the returns' sums (64k): fp16 draws unit rewards
        scale = 1.0 if dtype == torch.float16 else scale
        rewards = (torch.randn(b, t, generator=g, dtype=torch.float64) * scale).to(dtype)
        values = (torch.randn(b, t, generator=g, dtype=torch.float64) * scale).to(dtype)
        mask = _mask(g, b, t, layout)
        m64 = mask.double()
        truncated = torch.rand(b, generator=g) < 0.5
        boot = (torch.randn(b, generator=g, dtype=torch.float64) * scale).to(dtype) if bootstrap else None
        base = torch.randn(b, generator=g, dtype=torch.float64).to(dtype)
        out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        # fp32 scans: rounding grows with the row's length and the magnitude of its partial sums
        tol = 1e-12 if dtype == torch.float64 else 2e-5 * max(1.0, math.sqrt(t) / 10)
        r_adv, r_ret = R_adv.egae(rewards, values, mask, truncated, gamma, lam,
                                  bootstrap=None if boot is None else boot)
        r_disc = R_adv.discounted_returns(rewards, mask, gamma)
        r_sum = R_adv.reverse_cumsum(rewards, mask)
        whitened = m64.sum() >= 2
        results = {
            "egae adv": (A.egae(rewards, values, mask, truncated, gamma=gamma, lam=lam, bootstrap_values=boot),
                         0, r_adv),
            "egae ret": (A.egae(rewards, values, mask, truncated, gamma=gamma, lam=lam, bootstrap_values=boot),
                         1, r_ret),
            "remax adv": (A.remax(rewards, base, mask), 0, r_sum - base.double()[:, None] * m64),
            "remax ret": (A.remax(rewards, base, mask), 1, r_sum),
        }
        if whitened:
            results["reinforce_pp adv"] = (A.reinforce_pp(rewards, mask, gamma=gamma), 0,
                                           R_adv.masked_whiten(r_disc, m64) * m64)
            results["reinforce_pp ret"] = (A.reinforce_pp(rewards, mask, gamma=gamma), 1, r_disc)
            results["masked_whiten"] = ((A.masked_whiten(rewards, mask),), 0, R_adv.masked_whiten(rewards, m64))
            results["masked_whiten no shift"] = ((A.masked_whiten(rewards, mask, shift_mean=False),), 0,
                                                 R_adv.masked_whiten(rewards, m64, False))
            results["egae whiten"] = (A.egae(rewards, values, mask, truncated, gamma=gamma, lam=lam, whiten=True), 0,
                                      R_adv.masked_whiten(R_adv.egae(rewards, values, mask, truncated, gamma, lam)[0],
                                                          m64) * m64)
        else:
            with pytest.raises(ValueError, match="at least 2 valid tokens"):
                A.masked_whiten(rewards, mask)
            with pytest.raises(ValueError, match="at least 2 valid tokens"):
                A.reinforce_pp(rewards, mask, gamma=gamma)
        for name, (outs, i, ref) in results.items():
            out = outs[i]
            assert out.shape == rewards.shape and out.dtype == out_dtype, name
            assert not out.isnan().any(), name
            _close(out, ref, tol=tol * _rel(ref), name=name)
        if b and packed:
            # packed == padded: each row's own slots, left/right padding removed
            inside = _inside(mask)
            cu = _cu(inside)
            p_r, p_v, p_m = rewards[inside], values[inside], mask[inside]
            ptol = 1e-12 if dtype == torch.float64 else 1e-5 * max(1.0, math.sqrt(t) / 10)
            for name, padded, ours in (
                ("egae", results["egae adv"][0], A.egae(p_r, p_v, p_m, truncated, gamma=gamma, lam=lam,
                                                        bootstrap_values=boot, cu_seqlens=cu)),
                ("remax", results["remax adv"][0], A.remax(p_r, base, p_m, cu_seqlens=cu)),
            ) + ((("reinforce_pp", results["reinforce_pp adv"][0], A.reinforce_pp(p_r, p_m, gamma=gamma,
                                                                                    cu_seqlens=cu)),) if whitened else ()):
                for k in range(2):
                    _close(ours[k], padded[k][inside], tol=ptol * _rel(padded[k]), name=f"packed {name} {k}")

    check()


# ---------------------------------------------------------------------------------------------
# per-token terms and reductions: kl_penalty, aggregate, value_loss

from rlkern.reference import policy_loss as R_pl  # noqa: E402

AGGS = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


@st.composite
def _token_terms_case(draw, max_b, max_t):
    b = draw(st.integers(0, max_b))
    t, layout, packed = _layout_case(draw, max_t)
    estimator = draw(st.sampled_from(list(R_pl.KL_ESTIMATORS) + [e + "+" for e in R_pl.KL_ESTIMATORS]))
    spread = draw(st.sampled_from([0.01, 1.0, 30.0, 80.0]))
    agg = draw(st.sampled_from(AGGS))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    clip = draw(st.sampled_from([0.0, 0.2, 10.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    return b, t, layout, packed, estimator, spread, agg, dtype, clip, seed


@fuzzes("kl_penalty", "aggregate", "value_loss")
@BACKENDS
def test_kl_penalty_aggregate_value_loss(backend):
    @_fuzz(backend, 0.6 if backend == "cpp" else 0.3, long_factor=4)
    @given(_token_terms_case(_small(backend, 6, 16), _small(backend, 40, 1000)))
    @example((1, 1, "right", False, "k3_unclamped", 30.0, "token-mean", torch.float16, 0.0, 9))  # long profile
    def check(case):
        b, t, layout, packed, estimator, spread, agg, dtype, clip, seed = case
        g = _gen(seed)
        # fp16 holds log-ratios up to 80 but not exp(80): k3_unclamped overflows to inf there, as PyTorch
        lp = (-torch.rand(b, t, generator=g, dtype=torch.float64) * 3).to(dtype)
        ref = (lp.double() + torch.randn(b, t, generator=g, dtype=torch.float64) * spread).to(dtype)
        mask = _mask(g, b, t, layout)
        cdt = torch.float64 if dtype == torch.float64 else torch.float32
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        gtol = max(tol, torch.finfo(dtype).eps)  # a gradient is rounded once to the input's dtype
        # kl_penalty: value and gradient against the reference's autograd, from the same rounded inputs
        leaf = lp.clone().requires_grad_()
        kl = rlkern.kl_penalty(leaf, ref, kl_estimator=estimator)
        r_leaf = lp.double().clone().requires_grad_()
        r_kl = R_pl.kl_penalty(r_leaf, ref.double(), estimator)
        assert kl.shape == lp.shape and kl.dtype == cdt
        finite = r_kl.isfinite()
        assert torch.equal(kl.isfinite(), finite) or dtype != torch.float64 and estimator.startswith("k3_unclamped")
        both = finite & kl.isfinite()
        _close(kl[both], r_kl.detach()[both], tol=tol * _rel(r_kl.detach()[both]), name=estimator)
        if b and t and bool(both.all()):
            up = torch.randn(b, t, generator=g, dtype=torch.float64)
            (grad,) = torch.autograd.grad((kl * up.to(cdt)).sum(), leaf)
            (r_grad,) = torch.autograd.grad((r_kl * up).sum(), r_leaf)
            # rounded once to the input dtype: a float64 gradient past fp16's 65504 is inf there, as
            # PyTorch's (k3_unclamped, log-ratio 30: the long profile's finding)
            r_grad = r_grad.to(dtype).double()
            fin = r_grad.isfinite()
            assert torch.equal(grad.isfinite(), fin), f"grad {estimator}: overflow"
            _close(grad[fin], r_grad[fin], tol=gtol * _rel(r_grad[fin]), name=f"grad {estimator}")
        # aggregate of the (finite) KL values, padded and packed, with the gradient of the reduction
        vals = torch.where(finite, r_kl.detach(), 0.0).to(dtype)
        v_leaf = vals.clone().requires_grad_()
        loss = rlkern.aggregate(v_leaf, mask, agg=agg)
        r_v = vals.double().clone().requires_grad_()
        r_loss = R_pl.aggregate(r_v, mask, agg)
        assert loss.dtype == cdt and loss.shape == () and not loss.isnan()
        _close(loss, r_loss.detach(), tol=tol * _rel(r_loss.detach()) * max(1.0, math.sqrt(t) / 10), name=agg)
        if b and t:
            (grad,) = torch.autograd.grad(loss, v_leaf)
            (r_grad,) = torch.autograd.grad(r_loss, r_v)
            _close(grad, r_grad, tol=gtol * _rel(r_grad), name=f"grad {agg}")
        # value_loss: verl's clipped value loss and clipfrac
        returns = (ref.double() * 2).to(dtype)
        v_leaf = lp.clone().requires_grad_()
        vloss, metrics = rlkern.value_loss(v_leaf, returns, ref, mask, cliprange_value=clip, agg=agg)
        r_v = lp.double().clone().requires_grad_()
        r_vloss, r_frac = R_pl.value_loss(r_v, returns.double(), ref.double(), mask, clip, agg)
        vtol = tol * max(1.0, math.sqrt(t) / 10)
        _close(vloss, r_vloss.detach(), tol=vtol * _rel(r_vloss.detach()), name="value_loss")
        _close(metrics["clipfrac"], r_frac, tol=2e-6, name="clipfrac")
        if b and t:
            (grad,) = torch.autograd.grad(vloss, v_leaf)
            (r_grad,) = torch.autograd.grad(r_vloss, r_v)
            _close(grad, r_grad, tol=max(vtol, gtol) * _rel(r_grad), name="grad value_loss")
        if b and packed:
            inside = _inside(mask)
            cu = _cu(inside)
            # seq-mean-token-sum-norm divides by the padded width T by default (verl); packed must say it
            lsf = float(t) if agg == "seq-mean-token-sum-norm" else None
            p_loss = rlkern.aggregate(vals[inside], mask[inside], agg=agg, cu_seqlens=cu, loss_scale_factor=lsf)
            _close(p_loss, loss.detach(), tol=tol * _rel(loss.detach()), name=f"packed {agg}")
            p_vloss, p_metrics = rlkern.value_loss(lp[inside], returns[inside], ref[inside], mask[inside],
                                                   cliprange_value=clip, agg=agg, cu_seqlens=cu, loss_scale_factor=lsf)
            _close(p_vloss, vloss.detach(), tol=tol * _rel(vloss.detach()), name="packed value_loss")
            _close(p_metrics["clipfrac"], metrics["clipfrac"], tol=1e-6, name="packed clipfrac")

    check()


# ---------------------------------------------------------------------------------------------
# TRL drop-ins: selective_log_softmax, selective_log_softmax_and_entropy, entropy_from_logits

from rlkern.reference import logprobs as R_logp  # noqa: E402


@st.composite
def _trl_logits_case(draw, max_rows, max_v):
    lead = draw(st.sampled_from([(), (1,), (2, 3)]))
    rows = draw(st.integers(0, max_rows))
    vocab = draw(st.one_of(st.sampled_from([1, 2, 7, 129, 1025]), st.integers(1, max_v)))
    dtype = draw(st.sampled_from([torch.bfloat16, torch.float16, torch.float32, torch.float64]))
    extremes = draw(st.sampled_from(["none", "pm1e4", "neginf"]))
    temperature = draw(st.sampled_from([1.0, 0.7]))
    topk = draw(st.sampled_from([None, 1, 3]))
    row_mask = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return lead, rows, vocab, dtype, extremes, temperature, topk, row_mask, seed


@fuzzes("selective_log_softmax", "selective_log_softmax_and_entropy", "entropy_from_logits")
@BACKENDS
def test_trl_logprob_dropins(backend):
    @_fuzz(backend, 0.6 if backend == "cpp" else 0.3, long_factor=4)
    @given(_trl_logits_case(_small(backend, 9, 24), _small(backend, 3000, 20000)))
    def check(case):
        lead, rows, vocab, dtype, extremes, temperature, topk, use_mask, seed = case
        g = _gen(seed)
        shape = lead + (rows,)
        logits = torch.randn(*shape, vocab, generator=g, dtype=torch.float64) * 3
        if extremes != "none":
            spots = torch.rand(*shape, vocab, generator=g) < 0.1
            # a row of only -inf logits: token_logprobs' convention (uniform) is test_fuzz.py's; the
            # top-K path is TRL's PyTorch one (NaN there): each row keeps one finite logit here
            spots[..., 0] = False
            fill = 1e4 * torch.where(torch.rand(*shape, vocab, generator=g) < 0.5, -1.0, 1.0).double() \
                if extremes == "pm1e4" else torch.full_like(logits, -math.inf)
            logits = torch.where(spots, fill, logits)
        logits = logits.to(dtype)
        def entropy_at(temp):
            logp = torch.log_softmax(logits.double() / temp, -1)
            return -(logp.exp() * torch.where(logp.isfinite(), logp, 0.0)).sum(-1)

        want_logp = torch.log_softmax(logits.double() / temperature, -1)
        want_entropy = entropy_at(temperature)
        index_shape = shape + ((topk,) if topk else ())
        index = torch.randint(0, vocab, index_shape, generator=g)
        row_mask = (torch.rand(index_shape, generator=g) > 0.3) if use_mask else None
        # fp32 accumulation of exactly-upcast inputs, relative to the result (tests/test_fuzz.py's token_logprobs)
        out = rlkern.selective_log_softmax(logits, index, temperature, row_mask, out_dtype=torch.float32)
        want = want_logp.gather(-1, index if topk else index[..., None])
        want = want if topk else want[..., 0]
        if row_mask is not None:
            want = torch.where(row_mask, want, 0.0)
        assert out.shape == index.shape and out.dtype == torch.float32
        assert not out.isnan().any()
        # a -inf label's log-prob is -inf in both
        finite = want.isfinite()
        assert torch.equal(out.isfinite(), finite)
        _close(out[finite], want[finite], tol=2e-5 * _rel(want[finite]), name="selective_log_softmax")
        # TRL's default dtype: the logits' dtype, the same numbers rounded once
        default = rlkern.selective_log_softmax(logits, index, temperature, row_mask)
        assert default.dtype == dtype
        if dtype == torch.float64:  # float64 logits stay float64 end to end
            _close(default[finite], want[finite], tol=1e-12 * _rel(want[finite]), name="float64")
        else:
            assert torch.equal(default, out.to(dtype))
        ent = rlkern.entropy_from_logits(logits, out_dtype=torch.float32)
        assert ent.shape == shape and not ent.isnan().any()
        _close(ent, entropy_at(1.0), tol=2e-5 * _rel(want_entropy), name="entropy_from_logits")
        assert rlkern.entropy_from_logits(logits).dtype == dtype
        if not topk:
            logp, entropy = rlkern.selective_log_softmax_and_entropy(logits, index, True, temperature, row_mask,
                                                                     out_dtype=torch.float32)
            assert torch.equal(logp, out)
            w_ent = want_entropy if row_mask is None else torch.where(row_mask, want_entropy, 0.0)
            _close(entropy, w_ent, tol=2e-5 * _rel(w_ent), name="selective_log_softmax_and_entropy")

    check()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_selective_log_softmax_top_k_of_no_rows_regression(dtype):
    # test_trl_logprob_dropins' finding: top-K indices over zero rows raised from torch.stack
    logits = torch.randn(2, 0, 7).to(dtype)
    out = rlkern.selective_log_softmax(logits, torch.zeros(2, 0, 3, dtype=torch.long))
    assert out.shape == (2, 0, 3) and out.dtype == dtype


# ---------------------------------------------------------------------------------------------
# unpaired and grouped preference losses: kto_loss, bco_loss, group_preference_loss,
# group_weights, srpo_loss; per-token DPO rewards: dpo_token_rewards

from rlkern.reference import preference as R_pref  # noqa: E402
from rlkern.reference import preference_groups as R_pg  # noqa: E402
from rlkern.reference import preference_tokens as R_ptok  # noqa: E402


def _grads_close(ours, want, dtype, name):
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    _close(ours, want.to(dtype), tol=max(tol, torch.finfo(dtype).eps) * _rel(want), name=name)


@st.composite
def _unpaired_case(draw, max_n):
    n = draw(st.integers(1, max_n))
    m = draw(st.integers(0, max_n))
    kto_type = draw(st.sampled_from(list(R_pref.KTO_LOSS_TYPES)))
    labels = draw(st.sampled_from(["mixed", "all_good", "all_bad"]))
    spread = draw(st.sampled_from([0.01, 2.0, 100.0, 1e4]))
    beta = draw(st.sampled_from([0.1, 1.0]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    udm = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return n, m, kto_type, labels, spread, beta, dtype, udm, seed


@fuzzes("kto_loss", "bco_loss")
@BACKENDS
def test_kto_and_bco_losses(backend):
    @_fuzz(backend, 0.6 if backend == "cpp" else 0.3, long_factor=4)
    @given(_unpaired_case(_small(backend, 12, 200)))
    def check(case):
        n, m, kto_type, label_kind, spread, beta, dtype, udm, seed = case
        g = _gen(seed)
        x = (-torch.rand(n, generator=g, dtype=torch.float64) * 20).to(dtype)
        ref = (x.double() + torch.randn(n, generator=g, dtype=torch.float64) * spread).to(dtype)
        labels = {"mixed": torch.rand(n, generator=g) > 0.4, "all_good": torch.ones(n, dtype=torch.bool),
                  "all_bad": torch.zeros(n, dtype=torch.bool)}[label_kind]
        kx = (-torch.rand(m, generator=g, dtype=torch.float64) * 20).to(dtype)
        kr = (kx.double() - torch.rand(m, generator=g, dtype=torch.float64) * spread).to(dtype)
        kl = (kx, kr) if kto_type == "kto" else (None, None)  # M = 0 KL completions: kl = 0
        tol = 1e-10 if dtype == torch.float64 else 2e-5
        kw = dict(loss_type=kto_type, beta=beta, desirable_weight=1.0, undesirable_weight=1.5)
        leaf = x.clone().requires_grad_()
        loss, metrics = rlkern.kto_loss(leaf, ref, labels, *kl, **kw)
        (grad,) = torch.autograd.grad(loss, leaf, allow_unused=True, materialize_grads=True)
        r_leaf = x.double().clone().requires_grad_()
        dbl = (lambda t: None if t is None else t.double())
        want, want_metrics = R_pref.kto_loss(r_leaf, ref.double(), labels, dbl(kl[0]), dbl(kl[1]), **kw)
        (r_grad,) = torch.autograd.grad(want, r_leaf, allow_unused=True, materialize_grads=True)
        assert not loss.isnan() and not grad.isnan().any()
        _close(loss, want.detach(), tol=tol * _rel(want.detach()), name=f"kto {kto_type}")
        _grads_close(grad, r_grad, dtype, "kto grad")
        for key in R_pref.KTO_METRIC_KEYS:
            w = want_metrics[key].double()
            _close(metrics[key], w, tol=max(tol, 2e-5) * _rel(w), name=key, equal_nan=True)
        # BCO: delta the running reward mean; optional UDM density-ratio weights
        delta = (torch.randn((), generator=g, dtype=torch.float64) * spread).to(dtype)
        weights = (torch.rand(n, generator=g, dtype=torch.float64) * 3).to(dtype) if udm else None
        leaf = x.clone().requires_grad_()
        loss, metrics = rlkern.bco_loss(leaf, ref, labels, delta, beta=beta, udm_weights=weights)
        (grad,) = torch.autograd.grad(loss, leaf)
        r_leaf = x.double().clone().requires_grad_()
        want, want_metrics = R_pref.bco_loss(r_leaf, ref.double(), labels, delta.double(), beta=beta,
                                             udm_weights=dbl(weights))
        (r_grad,) = torch.autograd.grad(want, r_leaf)
        assert not loss.isnan() and not grad.isnan().any()
        _close(loss, want.detach(), tol=tol * _rel(want.detach()), name="bco")
        _grads_close(grad, r_grad, dtype, "bco grad")
        for key in R_pref.BCO_METRIC_KEYS:
            w = want_metrics[key].double()
            _close(metrics[key], w, tol=max(tol, 2e-5) * _rel(w), name=key, equal_nan=True)

    check()


@st.composite
def _group_pref_case(draw, max_groups):
    sizes = draw(st.lists(st.integers(1, 6), min_size=1, max_size=max_groups))
    loss_type = draw(st.sampled_from(list(R_pg.LOSS_TYPES)))
    method = draw(st.sampled_from(list(R_pg.WEIGHT_METHODS)))
    kind = draw(st.sampled_from(["levels", "equal", "normal", "huge"]))
    with_old = draw(st.booleans())
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**31 - 1))
    return sizes, loss_type, method, kind, with_old, dtype, seed


@fuzzes("group_preference_loss", "group_weights", "srpo_loss")
@BACKENDS
def test_group_preference_losses(backend):
    @_fuzz(backend, 0.6 if backend == "cpp" else 0.3, long_factor=4)
    @given(_group_pref_case(_small(backend, 6, 40)))
    def check(case):
        sizes, loss_type, method, kind, with_old, dtype, seed = case
        if loss_type == "tpo" and kind == "huge" and max(sizes) > 1:
            kind = "normal"  # TPO's gain 2^s overflows past s ~ 128 (fp32): an inf loss, in the reference too
        g = _gen(seed)
        ids = _group_ids(g, sizes, "tensor")
        n = ids.numel()
        x = (-torch.rand(n, generator=g, dtype=torch.float64) * 30).to(dtype)
        ref = x.double() + torch.randn(n, generator=g, dtype=torch.float64) * 2
        old = x.double() + torch.randn(n, generator=g, dtype=torch.float64) * 0.4 if with_old else None
        s = (torch.randint(0, 3, (n,), generator=g).double() * 0.5 if kind == "levels" else
             _scores(g, n, kind, torch.float64))
        tol = 1e-10 if dtype == torch.float64 else 2e-5
        up = (lambda t: None if t is None else t.to(dtype))
        kw = dict(loss_type=loss_type, beta=0.3, clip_eps=0.2, kl_coef=0.05)
        leaf = x.clone().requires_grad_()
        loss, metrics = rlkern.group_preference_loss(leaf, ids, s.to(dtype), up(ref), up(old), **kw)
        (grad,) = torch.autograd.grad(loss, leaf, allow_unused=True, materialize_grads=True)
        r_leaf = x.double().clone().requires_grad_()
        want, want_metrics = R_pg.group_preference_loss(r_leaf, rlkern.group_index(ids), s.to(dtype).double(),
                                                        up(ref).double(), None if old is None else up(old).double(),
                                                        **kw)
        (r_grad,) = torch.autograd.grad(want, r_leaf, allow_unused=True, materialize_grads=True)
        assert not loss.isnan() and not grad.isnan().any()
        # p3o sums -(s_i - s_j) * rho over ordered pairs: with rho ~ 1 the terms cancel, and the
        # float32 sum's rounding is relative to the scores' magnitude, not to the (near 0) loss
        scale = max(_rel(want.detach()), s.abs().max().item() if loss_type == "p3o" and n else 0.0)
        _close(loss, want.detach(), tol=tol * scale, name=loss_type)
        _grads_close(grad, r_grad, dtype, f"{loss_type} grad")
        for key, w in want_metrics.items():
            _close(metrics[key], w.double(), tol=max(tol, 2e-5) * _rel(w), name=key)
        w = rlkern.group_weights(s.to(dtype), ids, up(ref), up(old) if old is not None else up(x.double()),
                                 method=method, beta=0.7)
        want_w = R_pg.group_weights(s.to(dtype), rlkern.group_index(ids), up(ref),
                                    up(old) if old is not None else up(x.double()), method=method, beta=0.7)
        assert w.dtype == dtype and not w.isnan().any()
        _close(w, want_w, tol=(1e-10 if dtype == torch.float64 else 2e-6) * _rel(want_w), name=method)
        # SRPO over the groups' count of pairs (0 and 1 included), six sequences per pair
        pairs = len(sizes) - 1
        sx = (-torch.rand(pairs, 6, generator=g, dtype=torch.float64) * 20).to(dtype)
        sref = sx.double() + torch.randn(pairs, 6, generator=g, dtype=torch.float64) * (100.0 if kind == "huge" else 1.0)
        leaf = sx.clone().requires_grad_()
        loss, metrics = rlkern.srpo_loss(leaf, sref.to(dtype), beta=0.2, alpha=0.6)
        (grad,) = torch.autograd.grad(loss, leaf)
        r_leaf = sx.double().clone().requires_grad_()
        want, want_metrics = R_pg.srpo_loss(r_leaf, sref.to(dtype).double(), beta=0.2, alpha=0.6)
        (r_grad,) = torch.autograd.grad(want, r_leaf)
        assert not loss.isnan() and not grad.isnan().any()
        _close(loss, want.detach(), tol=tol * _rel(want.detach()), name="srpo")
        _grads_close(grad, r_grad, dtype, "srpo grad")
        for key in R_pg.SRPO_METRIC_KEYS:
            _close(metrics[key], want_metrics[key].double(), tol=2e-5 * _rel(want_metrics[key]), name=key)

    check()


def test_tpo_reference_gradient_of_a_group_of_one_regression():
    # test_group_preference_losses' finding (in the float64 reference): a group of one with a huge
    # score had a NaN gradient (2^s = inf, inf - inf on the unused diagonal pair, times 0); the op
    # gave 0, as it should: a group of one has no pair.
    x = torch.tensor([-3.0], dtype=torch.float64, requires_grad=True)
    loss, _ = R_pg.group_preference_loss(x, torch.tensor([0]), torch.tensor([1e4], dtype=torch.float64),
                                         torch.tensor([-2.0], dtype=torch.float64), None, loss_type="tpo", beta=0.3,
                                         clip_eps=0.2, kl_coef=0.05)
    (grad,) = torch.autograd.grad(loss, x)
    assert loss.item() == 0 and grad.item() == 0
    ours, _ = rlkern.group_preference_loss(x.detach().float().requires_grad_(), torch.tensor([0]),
                                           torch.tensor([1e4]), torch.tensor([-2.0]), loss_type="tpo", beta=0.3)
    assert ours.item() == 0


# ---------------------------------------------------------------------------------------------
# critics: soft_bellman_loss (OREO), step_advantage_loss, running_reward_norm, constrained_rewards

from rlkern.reference import critics as R_crit  # noqa: E402


@st.composite
def _critic_case(draw, max_b, max_t):
    b = draw(st.integers(0, max_b))
    t, layout, packed = _layout_case(draw, max_t)
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    beta = draw(st.sampled_from([0.1, 0.7, 2.0]))
    kl_coef = draw(st.sampled_from([0.0, 0.2]))
    spread = draw(st.sampled_from([0.4, 5.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    return b, t, layout, packed, dtype, beta, kl_coef, spread, seed


@fuzzes("soft_bellman_loss", "step_advantage_loss")
@BACKENDS
def test_token_critic_losses(backend):
    @_fuzz(backend, 0.6 if backend == "cpp" else 0.3, long_factor=4)
    @given(_critic_case(_small(backend, 5, 12), _small(backend, 40, 1500)))
    def check(case):
        b, t, layout, packed, dtype, beta, kl_coef, spread, seed = case
        g = _gen(seed)
        mask = _mask(g, b, t, layout)
        lp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
        ref = lp + torch.randn(b, t, generator=g, dtype=torch.float64) * spread
        values = torch.randn(b, t, generator=g, dtype=torch.float64)
        adv = torch.randn(b, t, generator=g, dtype=torch.float64) * 3
        ends = torch.rand(b, t, generator=g) > 0.8
        rewards = torch.randn(b, generator=g, dtype=torch.float64)
        # masked positions are never read: NaN there must not reach any output
        lp, values = torch.where(mask, lp, math.nan), torch.where(mask, values, math.nan)
        cu = None
        if packed and b:
            inside = _inside(mask)
            cu = _cu(inside).long()
            mask, lp, ref, values, adv, ends = (x[inside] for x in (mask, lp, ref, values, adv, ends))
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        lp_d, ref_d, values_d, adv_d = (x.to(dtype) for x in (lp, ref, values, adv))
        x, v = lp_d.clone().requires_grad_(), values_d.clone().requires_grad_()
        loss, metrics = rlkern.soft_bellman_loss(x, mask, ref_d, v, rewards.to(dtype), beta=beta, kl_coef=kl_coef,
                                                 cu_seqlens=cu)
        loss.backward()
        rx, rv = lp_d.double().clone().requires_grad_(), values_d.double().clone().requires_grad_()
        want, want_metrics = R_crit.soft_bellman_loss(rx, ref_d.double(), rv, rewards.to(dtype).double(), mask,
                                                      beta=beta, kl_coef=kl_coef, cu_seqlens=cu)
        want.backward()
        assert loss.dtype == dtype and not loss.isnan()
        _close(loss, want.detach(), tol=tol * _rel(want.detach()), name="soft_bellman_loss")
        for key in ("value_loss", "policy_loss", "kl"):
            w = want_metrics[key].double()
            _close(metrics[key], w, tol=max(tol, 1e-5) * _rel(w), name=key)
        for name, ours, theirs in (("grad logprobs", x.grad, rx.grad), ("grad values", v.grad, rv.grad)):
            assert not ours[~mask].any() and not ours.isnan().any(), name
            want_g = torch.where(mask, theirs, 0.0)
            _close(ours, want_g, tol=tol * _rel(want_g), name=name)
        x = lp_d.clone().requires_grad_()
        loss, metrics = rlkern.step_advantage_loss(x, mask, ref_d, adv_d, ends, beta=beta, cu_seqlens=cu)
        loss.backward()
        rx = lp_d.double().clone().requires_grad_()
        want, want_metrics = R_crit.step_advantage_loss(rx, ref_d.double(), adv_d.double(), ends, mask, beta=beta,
                                                        cu_seqlens=cu)
        want.backward()
        assert loss.dtype == dtype and not loss.isnan()
        _close(loss, want.detach(), tol=tol * _rel(want.detach()), name="step_advantage_loss")
        _close(metrics["step_log_ratio"], want_metrics["step_log_ratio"].double(),
               tol=1e-5 * _rel(want_metrics["step_log_ratio"]), name="step_log_ratio")
        want_g = torch.where(mask, rx.grad, 0.0)
        assert not x.grad.isnan().any()
        _close(torch.where(mask, x.grad, 0.0), want_g, tol=tol * _rel(want_g), name="step grad")

    check()


@st.composite
def _reward_stats_case(draw, max_n):
    sizes = draw(st.lists(st.integers(0, max_n), min_size=1, max_size=4))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    clip = draw(st.sampled_from([None, 2.5, 0.1]))
    scale = draw(st.sampled_from([1.0, 1e4]))
    groups = draw(st.integers(1, 6))
    judges = draw(st.integers(0, 4))
    baseline = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return sizes, dtype, clip, scale, groups, judges, baseline, seed


@fuzzes("running_reward_norm", "constrained_rewards")
@BACKENDS
def test_reward_statistics(backend):
    @_fuzz(backend, 0.6 if backend == "cpp" else 0.3, long_factor=4)
    @given(_reward_stats_case(_small(backend, 40, 3000)))
    def check(case):
        sizes, dtype, clip, scale, groups, judges, baseline, seed = case
        g = _gen(seed)
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        stats, want_stats = None, torch.zeros(3, dtype=torch.float64)
        for step, size in enumerate(sizes):  # a stream of batches, 0 and 1 sizes included
            r = (torch.randn(size, generator=g, dtype=torch.float64) * scale + step).to(dtype)
            out = rlkern.running_reward_norm(r, stats, clip=clip)
            want, want_stats = R_crit.running_reward_norm(r, want_stats, clip=clip)
            assert out.stats.dtype == torch.float64 and not out.rewards.isnan().any()
            _close(out.stats, want_stats, tol=1e-12 * _rel(want_stats), name="stats")
            _close(out.rewards, want, tol=tol * _rel(want), name="normalized rewards")
            stats = out.stats
        n = sum(sizes)
        rewards = torch.randint(0, 5, (n,), generator=g).to(dtype)  # ties: the first sample wins
        ids = torch.randint(0, groups, (n,), generator=g) * 7 + 3
        judged = torch.rand(n, judges, generator=g) > 0.2
        base = torch.randn(n, generator=g, dtype=torch.float64).to(dtype) if baseline else None
        out = rlkern.constrained_rewards(rewards, ids, judged, base)
        want = R_crit.constrained_rewards(rewards, ids, judged, base)
        _close(out.rewards, want[0], tol=tol, name="constrained rewards")
        if base is None or dtype == torch.float64:  # float32 sigmoids may tie where float64 does not
            assert torch.equal(out.chosen, want[1]) and torch.equal(out.rejected, want[2])

    check()


def test_critic_references_ignore_masked_nan_without_valid_tokens_regression():
    # test_token_critic_losses' finding (in the float64 references): a batch without a valid token
    # and NaN at the masked positions gave a NaN loss; the ops gave 0 (masked positions never read).
    mask = torch.zeros(2, 3, dtype=torch.bool)
    lp = torch.full((2, 3), math.nan, dtype=torch.float64)
    zeros = torch.zeros(2, 3, dtype=torch.float64)
    want, metrics = R_crit.soft_bellman_loss(lp, zeros, lp, torch.ones(2, dtype=torch.float64), mask, beta=0.1)
    assert want.item() == 0 and all(v.item() == 0 for v in metrics.values())
    want, metrics = R_crit.step_advantage_loss(lp, zeros, zeros, mask, mask, beta=0.1)
    assert want.item() == 0 and metrics["step_log_ratio"].item() == 0
    assert rlkern.soft_bellman_loss(lp, mask, zeros, lp, torch.ones(2, dtype=torch.float64), beta=0.1)[0].item() == 0


# ---------------------------------------------------------------------------------------------
# reward shaping: ensemble_rewards, shape_rewards, hbpo_advantages, token_weights

from rlkern.ops import shaping as S  # noqa: E402
from rlkern.reference import shaping as R_shape  # noqa: E402

SHAPE_PARAMS = {"grpo_lambda": [0.5, 0.2, 1e-6, -1.0], "unlikeliness": [0.25], "s_grpo": [0.5], "otc": [1.0, 1.0],
                "hbpo": [4096.0, 4.0, 1 / 4096]}


@st.composite
def _shaping_case(draw, max_groups, max_k):
    sizes = draw(st.lists(st.integers(1, 7), min_size=0, max_size=max_groups))
    k = draw(st.integers(1, max_k))
    method = draw(st.sampled_from(list(R_shape.SHAPE_METHODS)))
    kind = draw(st.sampled_from(["binary", "soft", "equal", "huge"]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    t = draw(st.integers(0, 9))
    vocab = draw(st.sampled_from([1, 3, 37]))
    seed = draw(st.integers(0, 2**31 - 1))
    return sizes, k, method, kind, dtype, t, vocab, seed


@fuzzes("ensemble_rewards", "shape_rewards", "hbpo_advantages", "token_weights")
@BACKENDS
def test_reward_shaping(backend):
    @_fuzz(backend, 0.6 if backend == "cpp" else 0.3, long_factor=4)
    @given(_shaping_case(_small(backend, 8, 40), 6))
    def check(case):
        sizes, k, method, kind, dtype, t, vocab, seed = case
        g = _gen(seed)
        ids = _group_ids(g, sizes, "tensor") if sizes else torch.zeros(0, dtype=torch.long)
        n = ids.numel()
        dense = S.dense("t", ids)
        tol = 1e-12 if dtype == torch.float64 else 5e-6
        # ensembles of k reward models; a row of equal rewards (variance 0)
        r = torch.randn(n, k, generator=g, dtype=torch.float64) * (1e4 if kind == "huge" else 2.0)
        if n > 1:
            r[1] = 0.7
        r = r.to(dtype)
        w = [0.5 * (i + 1) - 1.0 for i in range(k)]
        for ens, kw in (("mean", {}), ("wco", {}), ("uwo", {"coef": 0.7}), ("weighted", {"weights": w})):
            got = rlkern.ensemble_rewards(r, method=ens, **kw)
            want = R_shape.ensemble_rewards(r, ens, kw.get("coef", 0.0), torch.tensor(w) if ens == "weighted" else None)
            assert got.shape == (n,) and not got.isnan().any()
            _close(got, want, tol=2 * tol * _rel(want), name=ens)
        # shape_rewards: group-relative shaping with ties in the auxiliary values
        scores = {"binary": (torch.rand(n, generator=g, dtype=torch.float64) > 0.4).double(),
                  "soft": torch.rand(n, generator=g, dtype=torch.float64) * 1.5,
                  "equal": torch.ones(n, dtype=torch.float64),
                  "huge": (torch.rand(n, generator=g, dtype=torch.float64) > 0.4).double() * 1e4}[kind]
        aux = {"grpo_lambda": lambda: torch.randint(10, 50, (n,), generator=g).double(),
               "unlikeliness": lambda: -torch.randint(0, 6, (n,), generator=g).double() / 2,
               "s_grpo": lambda: torch.randint(0, 6, (n,), generator=g).double() * 100,
               "otc": lambda: torch.randint(0, 4, (n,), generator=g).double(),
               "hbpo": lambda: torch.randint(100, 5000, (n,), generator=g).double()}[method]()
        budgets = torch.tensor([512, 1024, 2048, 2560])[torch.randint(0, 4, (n,), generator=g)]
        kw = {S.SHAPE_AUX[method]: aux, **({"budgets": budgets} if method == "hbpo" else {})}
        scores = scores.to(dtype)
        got = rlkern.shape_rewards(scores, ids, method=method, **kw)
        want = R_shape.shape_rewards(scores, dense, aux, method, SHAPE_PARAMS[method], budgets)
        assert got.dtype == dtype and got.shape == (n,) and not got.isnan().any()
        _close(got, want, tol=tol * _rel(want), name=method)
        got = rlkern.hbpo_advantages(scores, ids, budgets, max_length=3000, budget_scale=2.0, eps=1e-4)
        want = R_shape.hbpo_advantages(scores, dense, budgets, 3000.0, 2.0, 1e-4)
        assert got.dtype == dtype and not got.isnan().any()
        _close(got, want, tol=tol * _rel(want), name="hbpo_advantages")
        # token_weights over [n, t, V] log-probs, ragged rows (some empty)
        logprobs = (torch.randn(n, t, vocab, generator=g, dtype=torch.float64) * 2).log_softmax(-1).to(dtype)
        lengths = torch.randint(0, t + 1, (n,), generator=g)
        mask = torch.arange(t)[None, :] < lengths[:, None]
        got = rlkern.token_weights(logprobs, ids, mask.int(), max_weight=1.7)
        want = R_shape.token_weights(logprobs, dense, mask, 1.7)
        assert got.shape == (n, t) and not got.isnan().any()
        _close(got, want, tol=(1e-12 if dtype == torch.float64 else 2e-5) * _rel(want), name="token_weights")

    check()


# ---------------------------------------------------------------------------------------------
# trees and segments: tree_values, tree_advantages, spo_cutpoints, segment_advantages,
# broadcast_to_tokens

from rlkern.reference import trees as R_tree  # noqa: E402

TREE_METHODS = ["spo_rloo", "spo_grpo", "treerl", "treepo", "arpo"]


def _forest(g, sizes, chain):
    """parent [M] int64: trees of the given node counts (each node's parent an earlier node of its
    tree, or a chain), node order shuffled."""
    parent = []
    for size in sizes:
        root = len(parent)
        parent.append(-1)
        for i in range(1, size):
            parent.append(root + i - 1 if chain else root + int(torch.randint(0, i, (1,), generator=g)))
    p = torch.tensor(parent, dtype=torch.int64)
    perm = torch.randperm(len(p), generator=g)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(len(perm))
    moved = p[perm]
    return torch.where(moved >= 0, inverse[moved.clamp(min=0)], moved)


@st.composite
def _tree_case(draw, max_trees, max_nodes):
    sizes = draw(st.lists(st.integers(1, max_nodes), min_size=0, max_size=max_trees))
    chain = draw(st.booleans())
    kind = draw(st.sampled_from(["binary", "normal", "equal", "huge"]))
    method = draw(st.sampled_from(TREE_METHODS))
    option = draw(st.sampled_from([{}, {"leaf_rloo": True}, {"subgroup_weighting": "group_size"}, {"whiten": False},
                                   "leaf_weights"]))
    mode = draw(st.sampled_from(["mean_children", "mean_leaves"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return sizes, chain, kind, method, option, mode, seed


@fuzzes("tree_values", "tree_advantages", "from_nested")
@BACKENDS
def test_tree_values_and_advantages(backend):
    @_fuzz(backend, 0.6 if backend == "cpp" else 0.3, long_factor=4)
    @given(_tree_case(_small(backend, 5, 8), _small(backend, 30, 200)))
    def check(case):
        sizes, chain, kind, method, option, mode, seed = case
        g = _gen(seed)
        parent = _forest(g, sizes, chain)
        m = parent.numel()
        reward = {"binary": lambda: torch.randint(0, 2, (m,), generator=g).float(),
                  "normal": lambda: torch.randn(m, generator=g),
                  "equal": lambda: torch.full((m,), 0.5),
                  "huge": lambda: torch.randn(m, generator=g) * 1e4}[kind]()
        has_child = torch.zeros(m, dtype=torch.bool)
        has_child[parent[parent >= 0]] = True
        reward[has_child] = math.nan  # internal entries are never read
        values = rlkern.tree_values(parent, reward, mode=mode)
        want = R_tree.tree_values(parent, reward, mode)
        assert values.dtype == torch.float32 and values.shape == (m,) and not values.isnan().any()
        _close(values, want, tol=1e-7 * _rel(want), name=mode)
        if option == "leaf_weights":
            option = {"leaf_weights": torch.randint(1, 50, (m,), generator=g).float()}
        if ("leaf_rloo" in option and method != "treerl") or (method != "treepo" and set(option) & {
                "subgroup_weighting", "whiten", "leaf_weights"}):
            option = {}
        adv, keep = rlkern.tree_advantages(parent, reward, method=method, **option)
        want, want_keep = R_tree.tree_advantages(parent, reward, method, **option)
        assert adv.dtype == torch.float32 and keep.dtype == torch.bool and not adv.isnan().any()
        _close(adv, want, tol=1e-6 * _rel(want), name=f"{method} {option}")
        # keep is A != 0: it may differ only where the exact value is within rounding of 0
        differ = keep != want_keep
        assert (want[differ].abs() < 1e-12 * _rel(want)).all(), f"{method}: keep differs"
        assert not keep[parent == -1].any()
        if kind == "equal":  # equal rewards: no advantage anywhere
            assert (adv == 0).all()
        # the same forest as nested dicts (research code's layout): preorder, the same values
        children = [[] for _ in range(m)]
        for node, up in enumerate(parent.tolist()):
            if up >= 0:
                children[up].append(node)
        tokens = torch.randint(0, 4, (m,), generator=g).tolist()

        def nest(node):
            d = {"num_tokens": tokens[node], "children": [nest(c) for c in children[node]]}
            if not children[node]:
                d["reward"] = float(reward[node])
            return d

        forest = rlkern.trees.from_nested([nest(r) for r in (parent == -1).nonzero().flatten().tolist()])
        assert forest.parent.shape == (m,)
        f_values = rlkern.tree_values(forest.parent, forest.reward, mode=mode)
        _close(f_values, R_tree.tree_values(forest.parent, forest.reward, mode), tol=1e-7 * _rel(want), name="nested")
        _close(f_values.sort().values, values.sort().values, tol=1e-6 * _rel(values), name="nested vs flat")
        if m:
            seg = forest.segment_end - forest.segment_start
            assert (forest.segment_start[1:] == forest.segment_end[:-1]).all() and forest.segment_start[0] == 0
            assert sorted(seg.tolist()) == sorted(tokens)

    check()


@st.composite
def _segment_case(draw, max_seqs, max_len):
    lengths = draw(st.lists(st.integers(0, max_len), min_size=1, max_size=max_seqs))
    threshold = draw(st.sampled_from([0.9, 0.5, 1.0]))
    interval = draw(st.sampled_from([1, 2, 5]))
    with_logprobs = draw(st.booleans())
    fill = draw(st.sampled_from([0.0, -7.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    return lengths, threshold, interval, with_logprobs, fill, seed


@fuzzes("spo_cutpoints", "segment_advantages", "broadcast_to_tokens")
@BACKENDS
def test_segments(backend):
    @_fuzz(backend, 0.6 if backend == "cpp" else 0.3, long_factor=4)
    @given(_segment_case(_small(backend, 6, 12), _small(backend, 60, 2000)))
    def check(case):
        lengths, threshold, interval, with_logprobs, fill, seed = case
        g = _gen(seed)
        total = sum(lengths)
        cu = torch.tensor([0] + lengths).cumsum(0)
        # confident tokens (p ~ 0.99) and uncertain ones; p = 1 exactly (log-prob 0) too
        probs = torch.where(torch.rand(total, generator=g) < 0.4, torch.rand(total, generator=g) * 0.9,
                            0.9 + 0.1 * torch.rand(total, generator=g))
        probs[torch.rand(total, generator=g) < 0.05] = 1.0
        logprobs = probs.log()
        starts = rlkern.spo_cutpoints(logprobs, cu, threshold=threshold, interval=interval)
        assert torch.equal(starts, R_tree.spo_cutpoints(logprobs, cu, threshold, interval))
        cut_values = torch.rand(total, generator=g)
        final = torch.rand(len(lengths), generator=g)
        lp = logprobs if with_logprobs else None
        adv, mask = rlkern.segment_advantages(starts, cut_values, final, cu, logprobs=lp, threshold=threshold)
        want, want_mask = R_tree.segment_advantages(starts, cut_values, final, cu, lp, threshold)
        _close(adv, want, tol=1e-6, name="segment_advantages")
        assert torch.equal(mask, want_mask)
        # broadcast node values to disjoint token segments (gaps keep `fill`), in any order
        k = len(lengths)
        seg_len = torch.randint(0, 5, (k,), generator=g)
        gaps = torch.randint(0, 3, (k,), generator=g)
        end = (seg_len + gaps).cumsum(0)
        start = end - seg_len
        perm = torch.randperm(k, generator=g)
        values = torch.randn(k + 2, generator=g)
        index = torch.randint(0, k + 2, (k,), generator=g)
        n_tok = int(end[-1]) + 2
        ours = rlkern.broadcast_to_tokens(values, start[perm], end[perm], n_tok, node_index=index, fill=fill)
        ref = R_tree.broadcast_to_tokens(values, start[perm], end[perm], n_tok, index, fill)
        _close(ours, ref, tol=0, name="broadcast_to_tokens")
        ours = rlkern.broadcast_to_tokens(values[:k], start, end, n_tok, fill=fill)
        _close(ours, R_tree.broadcast_to_tokens(values[:k], start, end, n_tok, None, fill), tol=0, name="broadcast")

    check()


# ---------------------------------------------------------------------------------------------
# token-level baselines and rewards: optimal_token_baseline, dpo_token_rewards


@st.composite
def _token_baseline_case(draw, max_groups, max_t):
    sizes = draw(st.lists(st.integers(1, 5), min_size=1, max_size=max_groups))
    t, layout, packed = _layout_case(draw, max_t)
    multi_turn = draw(st.booleans())
    zero_tail = draw(st.booleans())
    with_is = draw(st.booleans())
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    beta = draw(st.sampled_from([0.1, 1.0]))
    kl_coef = draw(st.sampled_from([0.0, 0.05]))
    seed = draw(st.integers(0, 2**31 - 1))
    return sizes, t, layout, packed, multi_turn, zero_tail, with_is, dtype, beta, kl_coef, seed


# OTB has a C++ kernel and the PyTorch path (no Triton kernel: under "triton" it runs the C++
# one); dpo_token_rewards has all three
@fuzzes("optimal_token_baseline", "dpo_token_rewards")
@pytest.mark.parametrize("backend", ["cpp", "triton", "torch"], indirect=True)
def test_token_baselines_and_rewards(backend):
    @_fuzz(backend, 0.6 if backend == "cpp" else 0.3, long_factor=4)
    @given(_token_baseline_case(_small(backend, 5, 16), _small(backend, 24, 600)))
    def check(case):
        sizes, t, layout, packed, multi_turn, zero_tail, with_is, dtype, beta, kl_coef, seed = case
        g = _gen(seed)
        ids = _group_ids(g, sizes, "str")
        n = len(ids)
        mask = _mask(g, n, t, layout)
        rewards = (torch.randn(n, t, generator=g, dtype=torch.float64) * mask).to(dtype)
        logp = (-torch.rand(n, t, generator=g, dtype=torch.float64) * 3).to(dtype)
        spp = (torch.rand(n, t, generator=g, dtype=torch.float64) * 0.5).to(dtype)
        isw = (torch.rand(n, t, generator=g, dtype=torch.float64) + 0.5).to(dtype) if with_is else None
        ref = (logp.double() + torch.randn(n, t, generator=g, dtype=torch.float64) * 0.3).to(dtype)
        old = (logp.double() + torch.randn(n, t, generator=g, dtype=torch.float64) * 0.1).to(dtype)
        seq = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
        cu = None
        if packed:
            inside = _inside(mask)
            cu = _cu(inside)
            mask, rewards, logp, spp, ref, old = (x[inside] for x in (mask, rewards, logp, spp, ref, old))
            isw = None if isw is None else isw[inside]
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        adv, ret = A.optimal_token_baseline(rewards, ids, mask, logp, spp, isw, handle_zero_tail=zero_tail,
                                            multi_turn=multi_turn, cu_seqlens=cu)
        want_adv, want_ret = R_adv.optimal_token_baseline(rewards, mask, list(ids), logp, spp, isw, zero_tail, 1e-8,
                                                          compact=multi_turn, cu_seqlens=cu)
        assert adv.shape == mask.shape and not adv.isnan().any() and not ret.isnan().any()
        _close(adv, want_adv, tol=tol * _rel(want_adv), name="otb advantages")
        _close(ret, want_ret, tol=tol * _rel(want_ret), name="otb returns")
        # DPO's implicit per-token rewards, the sequence reward on each row's last valid token
        out = rlkern.dpo_token_rewards(logp, ref, mask, old, seq, beta=beta, kl_coef=kl_coef,
                                       sequence_reward_coef=0.5, cu_seqlens=cu)
        want = R_ptok.dpo_token_rewards(logp, ref, mask, old, seq, beta=beta, kl_coef=kl_coef,
                                        sequence_reward_coef=0.5, cu_seqlens=cu)
        assert out.shape == mask.shape and not out.isnan().any()
        _close(out, want, tol=(1e-12 if dtype == torch.float64 else 2e-6) * _rel(want), name="dpo_token_rewards")

    check()


# ---------------------------------------------------------------------------------------------
# fused LM-head losses (small shapes): linear_policy_loss, linear_preference_loss

from rlkern.reference.linear_losses import linear_policy_loss as R_linear_policy  # noqa: E402
from rlkern.reference.linear_preference import linear_preference_loss as R_linear_pref  # noqa: E402


def _head_dims(draw, max_rows, max_t, max_h, max_v, vocabs):
    """A fused LM-head case's (rows, t, layout, packed, width, vocab): vocab one of ``vocabs`` or
    any up to max_v."""
    rows = draw(st.integers(1, max_rows))
    t, layout, packed = _layout_case(draw, max_t)
    width = draw(st.integers(1, max_h))
    vocab = draw(st.one_of(st.sampled_from(vocabs), st.integers(1, max_v)))
    return rows, t, layout, packed, width, vocab


def _head_inputs(g, rows, t, width, vocab, bias, layout):
    """hidden [rows, t, width], weight [vocab, width], bias (or None), labels and mask, drawn from g."""
    hidden = torch.randn(rows, t, width, generator=g)
    weight = torch.randn(vocab, width, generator=g) * 2 / math.sqrt(width)
    b = torch.randn(vocab, generator=g) * 0.5 if bias else None
    labels = torch.randint(0, vocab, (rows, t), generator=g)
    return hidden, weight, b, labels, _mask(g, rows, t, layout)


def _head_grads(fn, dtype, hidden, weight, b):
    """(value, metrics, gradients) of ``fn(hidden, weight[, b])`` on leaf copies in ``dtype``; with
    no valid token the reference's loss has no path to the inputs (gradient 0)."""
    leaves = [hidden.to(dtype).clone().requires_grad_(), weight.to(dtype).clone().requires_grad_()]
    if b is not None:
        leaves.append(b.to(dtype).clone().requires_grad_())
    value, metrics = fn(*leaves)
    if value.requires_grad:
        value.backward()
    return value.detach(), metrics, [torch.zeros_like(x) if x.grad is None else x.grad for x in leaves]


@st.composite
def _linear_loss_case(draw, max_rows, max_t, max_h, max_v):
    rows, t, layout, packed, width, vocab = _head_dims(draw, max_rows, max_t, max_h, max_v, [1, 2, 67, 129])
    loss = draw(st.sampled_from(["ppo", "reinforce", "gspo", "cispo", "gpg"]))
    agg = draw(st.sampled_from(AGGS))
    pref_type = draw(st.sampled_from(["sigmoid", "ipo", "simpo", "sigmoid_norm"]))
    bias = draw(st.booleans())
    temperature = draw(st.sampled_from([1.0, 0.7]))
    softcap = draw(st.sampled_from([None, 5.0]))
    chunk_size = draw(st.sampled_from([None, 3]))
    seed = draw(st.integers(0, 2**31 - 1))
    return rows, t, layout, packed, width, vocab, loss, agg, pref_type, bias, temperature, softcap, chunk_size, seed


@fuzzes("linear_policy_loss", "linear_preference_loss")
@BACKENDS
def test_linear_losses(backend):
    @_fuzz(backend, 0.2 if backend == "cpp" else 0.15, long_factor=4)
    @given(_linear_loss_case(_small(backend, 4, 8), _small(backend, 9, 40), _small(backend, 24, 64),
                             _small(backend, 300, 2000)))
    @example((1, 1, "full", False, 1, 1, "ppo", "token-mean", "ipo", False, 1.0, None, None, 0))  # long profile
    @example((1, 1, "right", False, 54, 1, "ppo", "token-mean", "simpo", False, 1.0, None, None, 0))
    def check(case):
        rows, t, layout, packed, width, vocab, loss, agg, pref_type, bias, temperature, softcap, chunk_size, seed = case
        g = _gen(seed)
        hidden, weight, b, labels, mask = _head_inputs(g, 2 * rows, t, width, vocab, bias, layout)
        labels = torch.where(mask, labels, -100)  # the prompt / padding labels
        old = -torch.rand(2 * rows, t, generator=g) * 3
        ref = old + torch.randn(2 * rows, t, generator=g) * 0.3
        adv = torch.randn(2 * rows, generator=g) * 2
        head = dict(temperature=temperature, logit_softcap=softcap)
        cu = None
        if packed:
            inside = _inside(mask)
            cu = _cu(inside)
            hidden, labels, mask, old, ref = (x[inside] for x in (hidden, labels, mask, old, ref))

        def grads(fn, dtype):
            return _head_grads(fn, dtype, hidden, weight, b)

        def compare(name, ours, theirs):
            assert not ours[0].isnan()
            _close(ours[0], theirs[0], tol=2e-5 * _rel(theirs[0]), name=name)
            # where every gradient is ~0 (V = 1: p = 1), fp32 rounding of 1 - p (~1e-7) times the
            # loss's derivative in the log-probs (<= 1 + 2 |loss| for these losses: ipo's
            # 2 (m - 1/(2 beta)) the largest; the long profile's finding) is what is left
            floor = 1e-2 * max(1.0, 2 * abs(theirs[0].item()))
            for i, (o, r) in enumerate(zip(ours[2], theirs[2])):
                assert not o.isnan().any()
                _close(o, r, tol=2e-5 * max(r.abs().max().item(), floor), name=f"{name} grad {i}")

        kw = dict(loss=loss, agg=agg, ref_logprobs=None, cu_seqlens=cu, entropy_coef=0.01,
                  loss_scale_factor=float(t) if agg == "seq-mean-token-sum-norm" else None, **head)
        ours = grads(lambda h, w, bb=None: rlkern.linear_policy_loss(h, w, labels, old, adv, mask, bias=bb,
                                                                     chunk_size=chunk_size,
                                                                     advantages_per_sequence=True, **kw),
                     torch.float32)
        theirs = grads(lambda h, w, bb=None: R_linear_policy(h, w, bb, labels, old.double(), adv.double(), mask, **kw),
                       torch.float64)
        compare(f"linear_policy_loss {loss} {agg}", ours, theirs)
        pref_ref = None if pref_type == "simpo" else ref
        kw = dict(loss_type=pref_type, cu_seqlens=cu, **head)
        ours = grads(lambda h, w, bb=None: rlkern.linear_preference_loss(h, w, labels, mask, pref_ref, bias=bb,
                                                                         chunk_size=chunk_size, **kw), torch.float32)
        theirs = grads(lambda h, w, bb=None: R_linear_pref(h, w, labels, mask,
                                                           None if pref_ref is None else pref_ref.double(), bias=bb,
                                                           **kw), torch.float64)
        compare(f"linear_preference_loss {pref_type}", ours, theirs)
        for key, w in theirs[1].items():
            if key == "rewards/accuracies" and vocab == 1:
                # V = 1: every log-prob is 0, every pair ties, and fp32 rounding (~1e-8) of a log-prob
                # decides chosen > rejected (the long profile's finding): a tie, not a number to compare
                continue
            _close(ours[1][key], w.detach().double(), tol=2e-5 * _rel(w.detach()), name=key)

    check()


# ---------------------------------------------------------------------------------------------
# reward-side math (rlkern/ops/rewards.py): per-sample rewards and KL-in-reward token rewards

from rlkern.reference import rewards as R_rw  # noqa: E402
from rlkern.reference.linear_preference import linear_kto_loss as R_linear_kto  # noqa: E402


@st.composite
def _reward_case(draw, max_n, max_t):
    n = draw(st.integers(0, max_n))
    t, layout, packed = _layout_case(draw, max_t)
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    max_length = draw(st.integers(1, 40))
    cache_length = draw(st.integers(1, max_length))
    factor = draw(st.sampled_from([1.0, 0.5, -2.0]))
    estimator = draw(st.sampled_from(list(R_rw.KL_ALIASES) + ["k3+", "k1+"]))
    kl_clip = draw(st.sampled_from([None, 0.0, 0.5]))
    reward_clip = draw(st.sampled_from([None, (-0.5, 0.5), (0.0, 0.0)]))
    spread = draw(st.sampled_from([0.01, 1.0, 30.0]))  # 30: k3's exponent reaches its clamp at 20
    with_format = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return (n, t, layout, packed, dtype, max_length, cache_length, factor, estimator, kl_clip, reward_clip, spread,
            with_format, seed)


@fuzzes("overlong_rewards", "kl_rewards", "gigpo_advantages", "action_rewards")
@BACKENDS
def test_reward_ops(backend):
    @_fuzz(backend, 0.6 if backend == "cpp" else 0.5, long_factor=4)
    @given(_reward_case(_small(backend, 12, 200), _small(backend, 12, 300)))
    @example((3, 5, "holes", True, torch.float64, 10, 10, 1.0, "k3", 0.5, (-0.5, 0.5), 30.0, True, 0))
    def check(case):
        (n, t, layout, packed, dtype, max_length, cache_length, factor, estimator, kl_clip, reward_clip, spread,
         with_format, seed) = case
        g = _gen(seed)
        want_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        scores = _scores(g, n, "normal", dtype)
        # overlong: lengths around both knees of the penalty (L_max - L_cache and L_max), ints or floats
        lengths = torch.randint(0, max_length + 6, (n,), generator=g)
        if n and seed % 2:
            lengths = lengths.to(dtype)
        got = rlkern.overlong_rewards(scores, lengths, max_length=max_length, cache_length=cache_length,
                                      penalty_factor=factor)
        want = R_rw.sample_rewards(scores, lengths, "overlong", [max_length, cache_length, factor])
        assert got.dtype == want_dtype and not got.requires_grad
        _close(got, want, tol=tol * _rel(want), name="overlong_rewards")
        # gigpo: the per-step sum, and broadcast to the tokens (padded or packed)
        step = _scores(g, n, "normal", dtype) * 3
        weight = float(factor)
        mask = _mask(g, n, t, layout)
        inside = _inside(mask)
        want = R_rw.sample_rewards(scores, step, "gigpo", [weight])
        _close(rlkern.gigpo_advantages(scores, step, step_weight=weight), want, tol=tol * _rel(want), name="gigpo")
        if packed:
            tok, kw, out_of = mask[inside], dict(cu_seqlens=_cu(inside)), (lambda x: x[inside])
        else:
            tok, kw, out_of = mask, {}, (lambda x: x)
        got = rlkern.gigpo_advantages(scores, step, tok, step_weight=weight, **kw)
        _close(got, out_of(want[:, None] * mask.double()), tol=tol * _rel(want), name="gigpo tokens")
        # kl_rewards: padded and packed against the per-row reference (packed: holes keep mask 0)
        lp = (-torch.rand(n, t, generator=g, dtype=torch.float64) * 5).to(dtype)
        ref = (lp.double() + torch.randn(n, t, generator=g, dtype=torch.float64) * spread).to(dtype)
        coef = 0.05 * (seed % 3)  # 0 included: the scores alone
        base = estimator.rstrip("+")
        got = rlkern.kl_rewards(scores, out_of(lp), out_of(ref), tok, kl_coef=coef, kl_estimator=estimator,
                                kl_clip=kl_clip, reward_clip=reward_clip, **kw)
        cu = kw.get("cu_seqlens")
        want = R_rw.kl_rewards(scores, out_of(lp), out_of(ref), tok, R_rw.KL_ALIASES[base], coef, kl_clip, reward_clip,
                               cu)
        assert got.dtype == want_dtype and got.shape == tok.shape
        _close(got, want, tol=tol * _rel(want), name=f"kl_rewards {estimator}")
        # action_rewards: points and boxes on a quarter grid (the inclusive edges are hit), NaN
        # points (no coordinate in the answer) and NaN boxes (an action without a box)
        pred = torch.randint(-1, 3, (n,), generator=g)
        true = torch.randint(0, 3, (n,), generator=g)
        points = (torch.randint(0, 5, (n, 2), generator=g) / 4).to(dtype)
        lo = torch.randint(0, 3, (n, 2), generator=g) / 4
        boxes = torch.cat([lo, lo + torch.randint(0, 3, (n, 2), generator=g) / 4], 1).to(dtype)
        if n:
            points[torch.rand(n, generator=g) < 0.2] = math.nan
            boxes[torch.rand(n, generator=g) < 0.2] = math.nan
        fmt = torch.rand(n, generator=g) > 0.5 if with_format else None
        got = rlkern.action_rewards(pred, true, points, boxes, fmt)
        want = R_rw.action_rewards(pred, true, points, boxes, torch.zeros(n) if fmt is None else fmt)
        assert got.dtype == want_dtype
        _close(got, want, tol=0.0, name="action_rewards")

    check()


@st.composite
def _linear_kto_case(draw, max_rows, max_t, max_h, max_v):
    rows, t, layout, packed, width, vocab = _head_dims(draw, max_rows, max_t, max_h, max_v, [1, 2, 67])
    loss_type = draw(st.sampled_from(["kto", "apo_zero_unpaired"]))
    kl_rows = draw(st.integers(0, 3))
    per_sequence_ref = draw(st.booleans())
    bias = draw(st.booleans())
    softcap = draw(st.sampled_from([None, 5.0]))
    chunk_size = draw(st.sampled_from([None, 3]))
    seed = draw(st.integers(0, 2**31 - 1))
    return rows, t, layout, packed, width, vocab, loss_type, kl_rows, per_sequence_ref, bias, softcap, chunk_size, seed


@fuzzes("linear_kto_loss")
@BACKENDS
def test_linear_kto_loss(backend):
    @_fuzz(backend, 0.3 if backend == "cpp" else 0.2, long_factor=4)
    @given(_linear_kto_case(_small(backend, 4, 8), _small(backend, 7, 40), _small(backend, 16, 64),
                            _small(backend, 200, 2000)))
    # sequences longer than chunk_size: the "global" plan (4 GEMMs), padded and packed
    @example((2, 7, "full", False, 5, 67, "kto", 2, False, True, 5.0, 3, 0))
    @example((3, 6, "holes", True, 4, 9, "kto", 3, True, False, None, 2, 1))
    def check(case):
        rows, t, layout, packed, width, vocab, loss_type, kl_rows, per_sequence_ref, bias, softcap, chunk_size, seed = case
        g = _gen(seed)
        hidden, weight, b, labels, mask = _head_inputs(g, rows, t, width, vocab, bias, layout)
        ref = -torch.rand(rows, t, generator=g) * 3
        desirable = torch.rand(rows, generator=g) > 0.5
        kl = ((-torch.rand(kl_rows, generator=g) * 5, -torch.rand(kl_rows, generator=g) * 5) if loss_type == "kto"
              else (None, None))
        cu = None
        if packed:
            inside = _inside(mask)
            cu = _cu(inside)
            hidden, labels, mask, ref = (x[inside] for x in (hidden, labels, mask, ref))
        if per_sequence_ref:  # TRL's ref_logps: the sums
            ref = -torch.rand(rows, generator=g) * 10
        kw = dict(loss_type=loss_type, beta=0.3, desirable_weight=1.0, undesirable_weight=1.5, cu_seqlens=cu,
                  logit_softcap=softcap)

        def grads(fn, dtype):
            return _head_grads(fn, dtype, hidden, weight, b)

        ours = grads(lambda h, w, bb=None: rlkern.linear_kto_loss(h, w, labels, mask, ref, desirable, *kl, bias=bb,
                                                                  chunk_size=chunk_size, **kw), torch.float32)
        dbl = (lambda x: None if x is None else x.double())
        theirs = grads(lambda h, w, bb=None: R_linear_kto(h, w, labels, mask, ref.double(), desirable, dbl(kl[0]),
                                                          dbl(kl[1]), bias=bb, **kw), torch.float64)
        assert not ours[0].isnan()
        _close(ours[0], theirs[0], tol=2e-5 * _rel(theirs[0]), name=f"linear_kto_loss {loss_type}")
        # the loss is bounded by the weights (<= 1.5): its gradients are O(1) or smaller
        for i, (o, r) in enumerate(zip(ours[2], theirs[2])):
            assert not o.isnan().any()
            _close(o, r, tol=2e-5 * max(1.0, r.abs().max().item()), name=f"linear_kto_loss grad {i}")
        for key, w in theirs[1].items():
            _close(ours[1][key], w.detach().double(), tol=2e-5 * _rel(w.detach()), name=key, equal_nan=True)

    check()


# ---------------------------------------------------------------------------------------------
# coverage: every public op has a property test


def _public_functions():
    """rlkern.__all__'s functions, with the functions of its public modules (rlkern.trees);
    NamedTuple result types are not ops."""
    import inspect

    names = set()
    for name in rlkern.__all__:
        obj = getattr(rlkern, name)
        if inspect.ismodule(obj):
            names.update(n for n in obj.__all__ if not inspect.isclass(getattr(obj, n)))
        elif not inspect.isclass(obj):
            names.add(name)
    return names


def test_every_public_op_is_fuzzed():
    import inspect

    import test_fuzz  # noqa: F401  (registers its property tests)

    public = _public_functions()
    missing = sorted(public - set(FUZZED))
    assert not missing, f"public ops without a property test (tests/test_fuzz*.py, fuzzes(...)): {missing}"
    # each registered test really calls the op it claims
    for name, tests in FUZZED.items():
        assert any(f"{name}(" in inspect.getsource(fn) for fn in tests), f"{name}: not called by {tests}"
    assert set(FUZZED) <= public, sorted(set(FUZZED) - public)
