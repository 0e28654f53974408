"""Triton kernel of the sequence-level preference loss (TRL 1.16's DPO loss types).

The op and its semantics are in rlkern/ops/preference.py, the oracle in
rlkern/reference/preference.py, the CPU twin in csrc/preference.cpp.

Grid: one program. It walks the B pairs in blocks of BLOCK and, in that one pass, accumulates the
loss and the metrics and writes each pair's gradient in its chosen and rejected log-probs (a
preference batch is a few hundred pairs at most: one program keeps the sums deterministic with no
second reduction). sft first sums the chosen log-probs, lengths and pair weights (a pass over
the pairs before the main one). The loss types present are a constexpr bit set: the code of the
others is not generated. aot / aot_unpaired pair the i-th smallest values of two sequences: the
launcher sorts (torch.sort, stable, on the device: no host sync) and passes each element's rank
and the order of the other side, so each pair's gradient is a gather, never a scatter.

Compute type: float64 for float64 input, float32 otherwise; the hyper-parameters are float64
kernel arguments read in that type (no buffer made on the host: no host-to-device copy, no sync).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from rlkern.kernels._common import sigmoid, softplus
from rlkern.reference.preference import F_DIVERGENCES, LOSS_TYPES

MAX_BLOCK = 1024
# Loss type codes (the bit of each in TYPES): LOSS_TYPES' order.
(SIGMOID, HINGE, IPO, EXO_PAIR, NCA_PAIR, ROBUST, BCO_PAIR, SPPO_HARD, AOT, AOT_UNPAIRED, APO_ZERO, APO_DOWN,
 DISCOPOP, SFT, SIGMOID_NORM, SIMPO, ORPO, SPPO, XPO, VPO, INPO, CPL, STEP_APO,
 TPO_NLL) = (tl.constexpr(code) for code in range(len(LOSS_TYPES)))
_AOT_BITS = (1 << LOSS_TYPES.index("aot")) | (1 << LOSS_TYPES.index("aot_unpaired"))


@triton.jit
def _expm1(x):
    """exp(x) - 1 without cancellation near 0 (Kahan: (u - 1) * x / log(u), u = exp(x) rounded);
    below -ln 2 there is no cancellation, and u may underflow to 0 (where Kahan's form is 0 / inf)."""
    u = tl.exp(x)
    return tl.where(x < -0.6931471805599453, u - 1.0, tl.where(u == 1.0, x, (u - 1.0) * x / tl.log(u)))


@triton.jit
def _log1mexp(x):
    """log(1 - e^x) for x < 0, accurate on both sides of -ln 2 (as the reference's log1mexp)."""
    e = tl.exp(x)
    u = 1.0 - e
    low = tl.log(u) - ((1.0 - u) - e) / u  # log1p(-e): u's rounding recovered
    return tl.where(x < -0.6931471805599453, low, tl.log(-_expm1(x)))


@triton.jit
def _alphapo(x, a):
    """AlphaPO's reward (1 - e^(-a x)) / a and its derivative e^(-a x) (a != 0; the reference's alphapo)."""
    return -_expm1(-a * x) / a, tl.exp(-a * x)


@triton.jit
def _score(lr, alpha, clamp, FDIV: tl.constexpr):
    """f'(pi / ref) of the f-divergence as a function of the log-ratio, and its derivative."""
    if FDIV == 1:  # forward KL
        e = tl.exp(-lr)
        return 1.0 - e, e
    elif FDIV == 2:  # Jensen-Shannon
        return 0.6931471805599453 - softplus(-lr), sigmoid(-lr)
    elif FDIV == 3:  # alpha divergence (alpha != 1: the launcher maps alpha = 1 to reverse KL)
        t = (alpha - 1.0) * lr
        e = tl.exp(tl.minimum(t, clamp))
        return (e - 1.0) / (alpha - 1.0), tl.where(t <= clamp, e, 0.0)
    else:
        return lr, tl.full(lr.shape, 1.0, lr.dtype)


@triton.jit
def _load(ptr, idx, inside, FP64: tl.constexpr):
    if FP64:
        return tl.load(ptr + idx, mask=inside, other=0.0).to(tl.float64)
    else:
        return tl.load(ptr + idx, mask=inside, other=0.0).to(tl.float32)


@triton.jit
def _nll_pass(lp_ptr, n_ptr, pw_ptr, B, weight, inv_n, zero, lane, BLOCK: tl.constexpr, FP64: tl.constexpr):
    """The batch NLL term of sft / tpo_nll: weight * (-sum log-probs / total length) * mean pair weight, and its
    gradient per log-prob (a pass over the B rows before the per-pair loop)."""
    s_lp = zero
    s_n = zero
    s_w = zero
    for first in range(0, B, BLOCK):
        i = first + lane
        inside = i < B
        s_lp += _load(lp_ptr, i, inside, FP64)
        s_n += _load(n_ptr, i, inside, FP64)
        s_w += _load(pw_ptr, i, inside, FP64)
    total_len = tl.maximum(tl.sum(s_n, 0), 1.0)
    w = tl.full((), weight, zero.dtype)
    mean_w = tl.sum(s_w, 0) * inv_n
    return w * (-tl.sum(s_lp, 0) / total_len) * mean_w, w * (-1.0 / total_len) * mean_w


@triton.jit
def _preference_kernel(
    c_ptr,  # (B,) fp32/bf16/fp16/fp64 chosen log-probs
    r_ptr,  # (B,) same dtype, rejected log-probs
    ex_ptr,  # (B,) same dtype, the extra log-probs (xpo / vpo: sampled, tpo_nll: gold)
    rc_ptr,  # (B,) compute dtype, reference chosen log-probs
    rr_ptr,  # (B,) compute dtype, reference rejected log-probs
    ac_ptr,  # (B,) compute dtype, the paper losses' chosen constants (sppo win rates, inpo iterate, step_apo A)
    ar_ptr,  # (B,) compute dtype, their rejected constants
    ne_ptr,  # (B,) compute dtype, the extra completions' lengths (tpo_nll)
    nc_ptr,  # (B,) compute dtype, chosen lengths
    nr_ptr,  # (B,) compute dtype, rejected lengths
    pw_ptr,  # (B,) compute dtype, pair weights
    perm_ptr,  # (6, B) int64: aot rank of c - r, aot order of ref_c - ref_r, aot_unpaired rank / order of
    #             the chosen log-ratios, rank / order of the rejected ones ((6, 1) dummy without aot)
    loss_ptr,  # (1,) compute dtype
    gc_ptr,  # (B,) compute dtype, d loss / d chosen
    gr_ptr,  # (B,) compute dtype, d loss / d rejected
    ge_ptr,  # (B,) compute dtype, d loss / d extra
    met_ptr,  # (8,) compute dtype, the metrics: METRIC_KEYS, then ORPO_METRIC_KEYS
    B,
    # the float hyper-parameters come as float64 arguments (a Python float would be passed as
    # float32; float64 input needs them exact), read in the compute type; the weight of each loss
    # type (0 where absent), then log(1 - label_smoothing) and log(label_smoothing) for exo_pair
    beta: tl.float64,
    ls: tl.float64,
    alpha: tl.float64,
    tau: tl.float64,
    clamp: tl.float64,
    log_pw: tl.float64,
    log_pl: tl.float64,
    w_sigmoid: tl.float64,
    w_hinge: tl.float64,
    w_ipo: tl.float64,
    w_exo_pair: tl.float64,
    w_nca_pair: tl.float64,
    w_robust: tl.float64,
    w_bco_pair: tl.float64,
    w_sppo_hard: tl.float64,
    w_aot: tl.float64,
    w_aot_unpaired: tl.float64,
    w_apo_zero: tl.float64,
    w_apo_down: tl.float64,
    w_discopop: tl.float64,
    w_sft: tl.float64,
    w_sigmoid_norm: tl.float64,
    w_simpo: tl.float64,
    w_orpo: tl.float64,
    w_sppo: tl.float64,
    w_xpo: tl.float64,
    w_vpo: tl.float64,
    w_inpo: tl.float64,
    w_cpl: tl.float64,
    w_step_apo: tl.float64,
    w_tpo_nll: tl.float64,
    gamma: tl.float64,
    xpo_alpha: tl.float64,
    vpo_alpha: tl.float64,
    inpo_tau: tl.float64,
    inpo_eta: tl.float64,
    cpl_lambda: tl.float64,
    alpha_po: tl.float64,  # AlphaPO's alpha (read when ALPHAPO)
    TYPES: tl.constexpr,  # bit set of the loss types present
    FDIV: tl.constexpr,
    ALPHAPO: tl.constexpr,  # CPO's AlphaPO reward transform is on (the op allows it with CPO's types only)
    AVG: tl.constexpr,  # the metrics are of length-averaged log-probs (simpo, orpo, reference-free ipo)
    FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    CDT = gc_ptr.dtype.element_ty  # the compute type: float64 for float64 input, else float32
    beta, ls, alpha = tl.full((), beta, CDT), tl.full((), ls, CDT), tl.full((), alpha, CDT)
    tau, clamp = tl.full((), tau, CDT), tl.full((), clamp, CDT)
    log_pw, log_pl = tl.full((), log_pw, CDT), tl.full((), log_pl, CDT)
    gamma = tl.full((), gamma, CDT)
    a_po = tl.full((), alpha_po, CDT)
    zero = tl.zeros([BLOCK], CDT)
    inv_n = 1.0 / (tl.sum(zero, 0) + tl.maximum(B, 1))
    lane = tl.arange(0, BLOCK).to(tl.int64)

    sft_g = tl.sum(zero, 0)
    sft_loss = tl.sum(zero, 0)
    if TYPES // (2 ** SFT) % 2 == 1:
        sft_loss, sft_g = _nll_pass(c_ptr, nc_ptr, pw_ptr, B, w_sft, inv_n, zero, lane, BLOCK, FP64)
    tpo_g = tl.sum(zero, 0)
    if TYPES // (2 ** TPO_NLL) % 2 == 1:  # TPO's gold NLL: sft's pass over the extra log-probs
        tpo_loss, tpo_g = _nll_pass(ex_ptr, ne_ptr, pw_ptr, B, w_tpo_nll, inv_n, zero, lane, BLOCK, FP64)
        sft_loss += tpo_loss

    acc_loss = zero
    m0 = zero
    m1 = zero
    m2 = zero
    m3 = zero
    m4 = zero
    m5 = zero
    m6 = zero
    m7 = zero
    for first in range(0, B, BLOCK):
        i = first + lane
        inside = i < B
        c = _load(c_ptr, i, inside, FP64)
        r = _load(r_ptr, i, inside, FP64)
        rc = _load(rc_ptr, i, inside, FP64)
        rr = _load(rr_ptr, i, inside, FP64)
        pw = _load(pw_ptr, i, inside, FP64)
        lc = c - rc
        lr = r - rr
        sc, dsc = _score(lc, alpha, clamp, FDIV)
        sr, dsr = _score(lr, alpha, clamp, FDIV)
        if ALPHAPO:  # AlphaPO on the summed log-probs (CPO's sigmoid and hinge; reverse KL)
            sc, dsc = _alphapo(lc, a_po)
            sr, dsr = _alphapo(lr, a_po)
        x = beta * (sc - sr)
        loss = zero
        dx = zero  # d loss / d x of the losses of x = beta * (sc - sr)
        gc = zero
        gr = zero
        ge = zero
        if TYPES // (2 ** SIGMOID) % 2 == 1:
            w = tl.full((), w_sigmoid, CDT)
            loss += w * softplus(-x)
            dx += w * -sigmoid(-x)
        if TYPES // (2 ** HINGE) % 2 == 1:
            w = tl.full((), w_hinge, CDT)
            loss += w * tl.maximum(1.0 - x, 0.0)
            dx += w * tl.where(1.0 - x > 0, -1.0, 0.0)
        if TYPES // (2 ** ROBUST) % 2 == 1:
            w = tl.full((), w_robust, CDT)
            loss += w * ((1.0 - ls) * softplus(-x) - ls * softplus(x)) / (1.0 - 2.0 * ls)
            dx += w * (-(1.0 - ls) * sigmoid(-x) - ls * sigmoid(x)) / (1.0 - 2.0 * ls)
        if TYPES // (2 ** EXO_PAIR) % 2 == 1:
            w = tl.full((), w_exo_pair, CDT)
            q = sigmoid(x)
            p = sigmoid(-x)
            loss += w * (q * (-softplus(-x) - log_pw) + p * (-softplus(x) - log_pl))
            dx += w * q * p * (x - log_pw + log_pl)
        if TYPES // (2 ** DISCOPOP) % 2 == 1:
            w = tl.full((), w_discopop, CDT)
            m = sigmoid(x / tau)
            sp = softplus(-x)
            e = tl.exp(-x - softplus(-x / tau))  # exp(-x) * m without inf * 0
            loss += w * (sp * (1.0 - m) + e)
            dx += w * (-sigmoid(-x) * (1.0 - m) - sp * m * (1.0 - m) / tau + e * (-1.0 + (1.0 - m) / tau))
        gc += beta * dx * dsc
        gr -= beta * dx * dsr
        if TYPES // (2 ** IPO) % 2 + TYPES // (2 ** SIGMOID_NORM) % 2 > 0:
            nc = tl.maximum(_load(nc_ptr, i, inside, FP64), 1.0)
            nr = tl.maximum(_load(nr_ptr, i, inside, FP64), 1.0)
            u = sc / nc - sr / nr
            dac = dsc / nc  # du / dlc
            dar = dsr / nr  # -du / dlr
            if ALPHAPO:  # CPO's ipo: AlphaPO on the averaged log-probs
                fa, dfa = _alphapo(lc / nc, a_po)
                fb, dfb = _alphapo(lr / nr, a_po)
                u = fa - fb
                dac = dfa / nc
                dar = dfb / nr
            du = zero
            if TYPES // (2 ** IPO) % 2 == 1:
                w = tl.full((), w_ipo, CDT)
                v = u - 1.0 / (2.0 * beta)
                loss += w * v * v
                du += w * 2.0 * v
            if TYPES // (2 ** SIGMOID_NORM) % 2 == 1:
                w = tl.full((), w_sigmoid_norm, CDT)
                loss += w * softplus(-beta * u)
                du += w * -beta * sigmoid(-beta * u)
            gc += du * dac
            gr -= du * dar
        if TYPES // (2 ** SIMPO) % 2 + TYPES // (2 ** ORPO) % 2 > 0:
            nc = tl.maximum(_load(nc_ptr, i, inside, FP64), 1.0)
            nr = tl.maximum(_load(nr_ptr, i, inside, FP64), 1.0)
            a = lc / nc  # reference-free: the length-averaged log-probs
            b = lr / nr
            if TYPES // (2 ** SIMPO) % 2 == 1:
                w = tl.full((), w_simpo, CDT)
                fa = a
                fb = b
                dfa = tl.full(a.shape, 1.0, CDT)
                dfb = tl.full(a.shape, 1.0, CDT)
                if ALPHAPO:
                    fa, dfa = _alphapo(a, a_po)
                    fb, dfb = _alphapo(b, a_po)
                y = beta * (fa - fb) - gamma
                loss += w * ((1.0 - ls) * softplus(-y) + ls * softplus(y))
                dy = w * beta * (-(1.0 - ls) * sigmoid(-y) + ls * sigmoid(y))
                gc += dy * dfa / nc
                gr -= dy * dfb / nr
            if TYPES // (2 ** ORPO) % 2 == 1:
                w = tl.full((), w_orpo, CDT)
                lo = (a - b) - (_log1mexp(a) - _log1mexp(b))
                loss += w * beta * softplus(-lo)
                sg = w * beta * sigmoid(-lo)
                # d lo / d a = -1 / expm1(a)
                gc += sg / _expm1(a) / nc
                gr -= sg / _expm1(b) / nr
        if TYPES // (2 ** NCA_PAIR) % 2 == 1:
            w = tl.full((), w_nca_pair, CDT)
            a = beta * lc
            b = beta * lr
            loss += w * (softplus(-a) + 0.5 * softplus(a) + 0.5 * softplus(b))
            gc += w * beta * (-sigmoid(-a) + 0.5 * sigmoid(a))
            gr += w * beta * 0.5 * sigmoid(b)
        if TYPES // (2 ** BCO_PAIR) % 2 == 1:
            w = tl.full((), w_bco_pair, CDT)
            a = beta * lc
            b = beta * lr
            loss += w * (softplus(-a) + softplus(b))
            gc += w * -beta * sigmoid(-a)
            gr += w * beta * sigmoid(b)
        if TYPES // (2 ** SPPO_HARD) % 2 == 1:
            w = tl.full((), w_sppo_hard, CDT)
            a = lc - 0.5 / beta
            b = lr + 0.5 / beta
            loss += w * (a * a + b * b)
            gc += w * 2.0 * a
            gr += w * 2.0 * b
        if TYPES // (2 ** APO_ZERO) % 2 == 1:
            w = tl.full((), w_apo_zero, CDT)
            a = sigmoid(beta * lc)
            b = sigmoid(beta * lr)
            loss += w * (1.0 - a + b)
            gc += w * -beta * a * (1.0 - a)
            gr += w * beta * b * (1.0 - b)
        if TYPES // (2 ** APO_DOWN) % 2 == 1:
            w = tl.full((), w_apo_down, CDT)
            a = sigmoid(beta * lc)
            b = sigmoid(beta * (lc - lr))
            loss += w * (a + 1.0 - b)
            gc += w * (beta * a * (1.0 - a) - beta * b * (1.0 - b))
            gr += w * beta * b * (1.0 - b)
        if TYPES // (2 ** SPPO) % 2 == 1:  # estimated win rates: (lc - (P_c - 1/2) / beta)^2 + ...
            w = tl.full((), w_sppo, CDT)
            a = lc - (_load(ac_ptr, i, inside, FP64) - 0.5) / beta
            b = lr - (_load(ar_ptr, i, inside, FP64) - 0.5) / beta
            loss += w * (a * a + b * b)
            gc += w * 2.0 * a
            gr += w * 2.0 * b
        if TYPES // (2 ** XPO) % 2 + TYPES // (2 ** VPO) % 2 > 0:
            e = _load(ex_ptr, i, inside, FP64)
            y = beta * (lc - lr)
            sg = sigmoid(-y)
            if TYPES // (2 ** XPO) % 2 == 1:  # DPO + xpo_alpha * e
                w = tl.full((), w_xpo, CDT)
                k = tl.full((), xpo_alpha, CDT)
                loss += w * (softplus(-y) + k * e)
                gc -= w * beta * sg
                gr += w * beta * sg
                ge += w * k
            if TYPES // (2 ** VPO) % 2 == 1:  # DPO - vpo_alpha * beta * e
                w = tl.full((), w_vpo, CDT)
                k = -tl.full((), vpo_alpha, CDT) * beta
                loss += w * (softplus(-y) + k * e)
                gc -= w * beta * sg
                gr += w * beta * sg
                ge += w * k
        if TYPES // (2 ** INPO) % 2 == 1:  # (h - eta / 2)^2
            w = tl.full((), w_inpo, CDT)
            eta = tl.full((), inpo_eta, CDT)
            et = eta * tl.full((), inpo_tau, CDT)
            v = (c - r) - et * (rc - rr) - (1.0 - et) * (_load(ac_ptr, i, inside, FP64) - _load(ar_ptr, i, inside,
                                                                                                   FP64)) - eta / 2.0
            loss += w * v * v
            gc += w * 2.0 * v
            gr -= w * 2.0 * v
        if TYPES // (2 ** CPL) % 2 == 1:  # softplus(-beta (c - lambda r)), reference-free
            w = tl.full((), w_cpl, CDT)
            lam = tl.full((), cpl_lambda, CDT)
            y = beta * (c - lam * r)
            sg = sigmoid(-y)
            loss += w * softplus(-y)
            gc -= w * beta * sg
            gr += w * beta * lam * sg
        if TYPES // (2 ** STEP_APO) % 2 == 1:  # softplus(-beta (A_c lc - A_r lr))
            w = tl.full((), w_step_apo, CDT)
            a_c = _load(ac_ptr, i, inside, FP64)
            a_r = _load(ar_ptr, i, inside, FP64)
            y = beta * (a_c * lc - a_r * lr)
            sg = sigmoid(-y)
            loss += w * softplus(-y)
            gc -= w * beta * a_c * sg
            gr += w * beta * a_r * sg
        # the losses above are scaled by the pair's weight; aot / aot_unpaired take none (the op refuses)
        loss = loss * pw
        gc = gc * pw
        gr = gr * pw
        ge = ge * pw
        if TYPES // (2 ** AOT) % 2 == 1:
            # element i of a = c - r has rank j; its partner is the j-th smallest of b = ref_c - ref_r
            w = tl.full((), w_aot, CDT)
            j = tl.load(perm_ptr + i, mask=inside, other=0)
            ib = tl.load(perm_ptr + B + j, mask=inside, other=0)
            kb = _load(rc_ptr, ib, inside, FP64) - _load(rr_ptr, ib, inside, FP64)
            y = beta * ((c - r) - kb)
            loss += w * ((1.0 - ls) * softplus(-y) + ls * softplus(y))
            d = w * beta * (-(1.0 - ls) * sigmoid(-y) + ls * sigmoid(y))
            gc += d
            gr -= d
        if TYPES // (2 ** AOT_UNPAIRED) % 2 == 1:
            w = tl.full((), w_aot_unpaired, CDT)
            # chosen side: element i of lc has rank j; partner: the j-th smallest rejected log-ratio
            j = tl.load(perm_ptr + 2 * B + i, mask=inside, other=0)
            ib = tl.load(perm_ptr + 5 * B + j, mask=inside, other=0)
            kb = _load(r_ptr, ib, inside, FP64) - _load(rr_ptr, ib, inside, FP64)
            y = beta * (lc - kb)
            loss += w * ((1.0 - ls) * softplus(-y) + ls * softplus(y))
            gc += w * beta * (-(1.0 - ls) * sigmoid(-y) + ls * sigmoid(y))
            # rejected side: element i of lr has rank j; partner: the j-th smallest chosen log-ratio
            j = tl.load(perm_ptr + 4 * B + i, mask=inside, other=0)
            ia = tl.load(perm_ptr + 3 * B + j, mask=inside, other=0)
            ka = _load(c_ptr, ia, inside, FP64) - _load(rc_ptr, ia, inside, FP64)
            y = beta * (ka - lr)
            gr -= w * beta * (-(1.0 - ls) * sigmoid(-y) + ls * sigmoid(y))
        acc_loss += tl.where(inside, loss, 0.0)
        tl.store(gc_ptr + i, gc * inv_n + sft_g, mask=inside)
        tl.store(gr_ptr + i, gr * inv_n, mask=inside)
        tl.store(ge_ptr + i, ge * inv_n + tpo_g, mask=inside)
        if AVG:
            c = c / tl.maximum(_load(nc_ptr, i, inside, FP64), 1.0)
            r = r / tl.maximum(_load(nr_ptr, i, inside, FP64), 1.0)
            lc = c - rc
            lr = r - rr
        cw = beta * lc
        rw = beta * lr
        if ALPHAPO:  # AlphaPO logs beta times its rewards
            fcw, _ = _alphapo(lc, a_po)
            frw, _ = _alphapo(lr, a_po)
            cw = beta * fcw
            rw = beta * frw
        if TYPES // (2 ** ORPO) % 2 == 1:  # ORPO's log odds ratio of the averaged log-probs
            ca = tl.where(inside, c, -1.0)  # the padded lanes' 0 has infinite odds: keep them finite
            ra = tl.where(inside, r, -1.0)
            lo = (ca - ra) - (_log1mexp(ca) - _log1mexp(ra))
            m6 -= tl.where(inside, softplus(-lo), 0.0)
            m7 += tl.where(inside, lo, 0.0)
        m0 += tl.where(inside, cw, 0.0)
        m1 += tl.where(inside, rw, 0.0)
        m2 += tl.where(inside, cw - rw, 0.0)
        m3 += tl.where(inside & (cw > rw), 1.0, 0.0)
        m4 += c
        m5 += r
    tl.store(loss_ptr, tl.sum(acc_loss, 0) * inv_n + sft_loss)
    tl.store(met_ptr, tl.sum(m0, 0) * inv_n)
    tl.store(met_ptr + 1, tl.sum(m1, 0) * inv_n)
    tl.store(met_ptr + 2, tl.sum(m2, 0) * inv_n)
    tl.store(met_ptr + 3, tl.sum(m3, 0) * inv_n)
    tl.store(met_ptr + 4, tl.sum(m4, 0) * inv_n)
    tl.store(met_ptr + 5, tl.sum(m5, 0) * inv_n)
    tl.store(met_ptr + 6, tl.sum(m6, 0) * inv_n)
    tl.store(met_ptr + 7, tl.sum(m7, 0) * inv_n)


def _rank_and_order(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.sort(key, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=key.device)
    return rank, order


def preference_loss(chosen, rejected, extra, ref_chosen, ref_rejected, aux_chosen, aux_rejected, extra_lengths,
                    chosen_lengths, rejected_lengths, pair_weights, loss_types, loss_weights, hyper):
    """The op's Triton backend: (loss, grad_chosen, grad_rejected, metrics), the contract of
    rlkern/ops/preference.py."""
    dtype = torch.float64 if chosen.dtype == torch.float64 else torch.float32
    device = chosen.device
    n = chosen.numel()
    (beta, ls, fdiv, alpha, tau, clamp_max, gamma, xpo_alpha, vpo_alpha, inpo_tau, inpo_eta, cpl_lambda, alpha_po,
     averaged) = hyper
    fdiv = int(fdiv)
    if F_DIVERGENCES[fdiv] == "alpha_divergence" and abs(alpha - 1.0) < 1e-6:
        fdiv = 0  # the alpha -> 1 limit is reverse KL
    weights = [0.0] * len(LOSS_TYPES)
    bits = 0
    for t, w in zip(loss_types, loss_weights):
        weights[t] += w
        bits |= 1 << t
    log_pw = math.log1p(-ls) if ls < 1 else 0.0
    log_pl = math.log(ls) if ls > 0 else 0.0
    c = chosen.contiguous()
    r = rejected.contiguous()
    if bits & _AOT_BITS:
        cd, rd = c.to(dtype), r.to(dtype)
        rows = []
        rank_a, _ = _rank_and_order(cd - rd)
        _, order_b = _rank_and_order(ref_chosen - ref_rejected)
        rank_ua, order_ua = _rank_and_order(cd - ref_chosen)
        rank_ub, order_ub = _rank_and_order(rd - ref_rejected)
        rows = [rank_a, order_b, rank_ua, order_ua, rank_ub, order_ub]
        perm = torch.stack(rows).contiguous()
    else:
        perm = torch.zeros((6, 1), dtype=torch.int64, device=device)
    loss = torch.empty((), dtype=dtype, device=device)
    grad_c = torch.empty(chosen.shape, dtype=dtype, device=device)
    grad_r = torch.empty(chosen.shape, dtype=dtype, device=device)
    grad_e = torch.empty(chosen.shape, dtype=dtype, device=device)
    metrics = torch.empty(8, dtype=dtype, device=device)
    block = max(16, min(MAX_BLOCK, triton.next_power_of_2(max(n, 1))))
    _preference_kernel[(1,)](
        c, r, extra.contiguous(), ref_chosen.contiguous(), ref_rejected.contiguous(), aux_chosen.contiguous(),
        aux_rejected.contiguous(), extra_lengths.contiguous(), chosen_lengths.contiguous(),
        rejected_lengths.contiguous(), pair_weights.contiguous(), perm, loss, grad_c, grad_r, grad_e, metrics, n,
        float(beta), float(ls), float(alpha), float(tau), float(clamp_max), log_pw, log_pl, *map(float, weights),
        float(gamma), float(xpo_alpha), float(vpo_alpha), float(inpo_tau), float(inpo_eta), float(cpl_lambda),
        float(alpha_po), TYPES=bits, FDIV=fdiv, ALPHAPO=alpha_po != 0.0, AVG=averaged != 0.0,
        FP64=dtype == torch.float64, BLOCK=block)
    return loss, grad_c, grad_r, grad_e, metrics


# ------------------------------------------------------------------------------------------------
# KTO (TRL 1.16 KTOTrainer; the op: rlkern/ops/preference.py kto_loss)

@triton.jit
def _kto_kernel(
    x_ptr,  # (B,) fp32/bf16/fp16/fp64 policy log-probs
    ref_ptr,  # (B,) compute dtype, reference log-probs
    lab_ptr,  # (B,) compute dtype, 1 = desirable
    w_ptr,  # (B,) compute dtype, the undesirable completions' extra weights (BCO's UDM; ones otherwise)
    kx_ptr,  # (M,) compute dtype, the KL completions' policy log-probs
    kr_ptr,  # (M,) compute dtype, their reference log-probs
    loss_ptr,  # (1,) compute dtype
    g_ptr,  # (B,) compute dtype, d loss / d policy log-probs
    met_ptr,  # (6,) compute dtype, KTO_METRIC_KEYS order
    B,
    M,
    beta: tl.float64,
    dw: tl.float64,
    uw: tl.float64,
    LOSS: tl.constexpr,  # 0 kto, 1 apo_zero_unpaired, 2 bco (reference point: delta = mean(kx - kr), unclamped)
    FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    CDT = g_ptr.dtype.element_ty
    beta, dw, uw = tl.full((), beta, CDT), tl.full((), dw, CDT), tl.full((), uw, CDT)
    zero = tl.zeros([BLOCK], CDT)
    lane = tl.arange(0, BLOCK).to(tl.int64)
    kl = tl.sum(zero, 0)
    if LOSS != 1:  # the detached reference point: kto max(mean(kl_logps - ref_kl_logps), 0); bco delta
        s_k = zero
        for first in range(0, M, BLOCK):
            j = first + lane
            inside = j < M
            s_k += _load(kx_ptr, j, inside, FP64) - _load(kr_ptr, j, inside, FP64)
        kl = tl.where(M > 0, tl.sum(s_k, 0) / tl.maximum(M, 1), 0.0)
        if LOSS == 0:
            kl = tl.maximum(kl, 0.0)
    inv_n = 1.0 / (tl.sum(zero, 0) + tl.maximum(B, 1))
    acc = zero
    rc = zero
    rr = zero
    lc = zero
    lrj = zero
    nc = zero
    nr = zero
    for first in range(0, B, BLOCK):
        i = first + lane
        inside = i < B
        x = _load(x_ptr, i, inside, FP64)
        lr = x - _load(ref_ptr, i, inside, FP64)
        good = _load(lab_ptr, i, inside, FP64) != 0.0
        uwi = uw * _load(w_ptr, i, inside, FP64)
        if LOSS == 2:  # bco: softplus(-z) / softplus(z), z = beta * lr - delta
            z = beta * lr - kl
            loss = tl.where(good, dw * softplus(-z), uwi * softplus(z))
            d = tl.where(good, -dw * beta * sigmoid(-z), uwi * beta * sigmoid(z))
        else:
            s = sigmoid(beta * (lr - kl))
            ds = beta * s * (1.0 - s)
            # desirable 1 - sigmoid(z), undesirable sigmoid(z) = 1 - sigmoid(-z), z = beta * (lr - kl)
            loss = tl.where(good, dw * (1.0 - s), uwi * s)
            d = tl.where(good, -dw * ds, uwi * ds)
        acc += tl.where(inside, loss, 0.0)
        tl.store(g_ptr + i, d * inv_n, mask=inside)
        gi = inside & good
        bi = inside & (~good)
        rc += tl.where(gi, beta * lr, 0.0)
        rr += tl.where(bi, beta * lr, 0.0)
        lc += tl.where(gi, x, 0.0)
        lrj += tl.where(bi, x, 0.0)
        nc += tl.where(gi, 1.0, 0.0)
        nr += tl.where(bi, 1.0, 0.0)
    n_c = tl.sum(nc, 0)
    n_r = tl.sum(nr, 0)
    m_rc = tl.sum(rc, 0) / tl.maximum(n_c, 1.0)
    m_rr = tl.sum(rr, 0) / tl.maximum(n_r, 1.0)
    tl.store(loss_ptr, tl.sum(acc, 0) * inv_n)
    tl.store(met_ptr, kl)
    tl.store(met_ptr + 1, m_rc)
    tl.store(met_ptr + 2, m_rr)
    tl.store(met_ptr + 3, tl.where((n_c > 0) & (n_r > 0), m_rc - m_rr, 0.0))
    tl.store(met_ptr + 4, tl.sum(lc, 0) / tl.maximum(n_c, 1.0))
    tl.store(met_ptr + 5, tl.sum(lrj, 0) / tl.maximum(n_r, 1.0))


def kto_loss(policy, ref, labels, weights, kl_logps, ref_kl_logps, loss_type, hyper):
    """The kto_loss op's Triton backend: (loss, grad, metrics), the contract of rlkern/ops/preference.py."""
    dtype = torch.float64 if policy.dtype == torch.float64 else torch.float32
    device = policy.device
    n, m = policy.numel(), kl_logps.numel()
    beta, dw, uw = hyper
    loss = torch.empty((), dtype=dtype, device=device)
    grad = torch.empty(policy.shape, dtype=dtype, device=device)
    metrics = torch.empty(6, dtype=dtype, device=device)
    block = max(16, min(MAX_BLOCK, triton.next_power_of_2(max(n, m, 1))))
    # empty KL tensors: a 1-element dummy keeps the pointer valid (M = 0 reads nothing)
    kx = kl_logps.contiguous() if m else torch.zeros(1, dtype=dtype, device=device)
    kr = ref_kl_logps.contiguous() if m else torch.zeros(1, dtype=dtype, device=device)
    _kto_kernel[(1,)](policy.contiguous(), ref.contiguous(), labels.contiguous(), weights.contiguous(), kx, kr, loss,
                      grad, metrics, n, m, float(beta), float(dw), float(uw), LOSS=int(loss_type),
                      FP64=dtype == torch.float64, BLOCK=block)
    return loss, grad, metrics
