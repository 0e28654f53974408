"""Triton kernels for the fused policy loss: one launch per token pass, one tiny finalize launch.

The math is ``rlkern.reference.policy_loss`` (the oracle) and the C++ twin csrc/policy_loss.cpp;
both backends take and return the same tensors (``rlkern.ops.policy_loss`` calls either).

Launches (counted by tests/test_policy_loss.py::test_triton_launch_count):

- forward, 2 launches. ``_policy_loss_fwd_kernel``, grid (B, K): program (b, k) reads blocks
  k, k + K, ... of sequence b once and writes its partial sums ``part[b K + k, :12]``: masked
  sums of the policy loss (times ``is_weights``), the entropy, the KL estimate, the mask and the
  six metric values; column 10 the sequence's mean log-ratio and 11, for sequence-level ppo /
  sapo, the sum of ``m is_w d l / d lr`` that the backward spreads over the sequence (geo_mean:
  column 0 sums the clipped log-ratios, 10 and 11 sum ``m A`` and ``m log(is_w + 1e-10)``).
  K > 1 when B alone gives fewer than PROGRAMS_PER_SM programs per SM (B = 64 would fill half
  an H100); GSPO and ``level="sequence"`` keep K = 1 and read their sequence twice, the mean
  log-ratio first. ``_policy_loss_finish_kernel`` (one program) reduces the K partial rows of
  each sequence (forming geo_mean's sequence loss) into ``stats[b]`` for the backward, then the
  B rows in a fixed order into the aggregated loss ``[]`` and the 8 metrics ``[8]``, and writes
  ``stats[B, :2]`` = (mask sum, non-empty sequences). When K = 1 and the loss is not geo_mean,
  ``part`` is ``stats`` itself. Why a second launch: the aggregation weights of
  seq-mean-token-mean and token-mean need totals over all sequences, and Triton has no
  grid-wide barrier. The one-launch form (an atomic ticket: the last program to finish
  reduces) needs a counter zeroed before every call (a memset launch) or a persistent buffer
  shared by every call, stream and CUDA graph; the finalize launch instead reads only the
  [B K, 12] partial sums, in a fixed order (the loss is deterministic).
- backward, 1 launch. ``_policy_loss_bwd_kernel``, grid (B, K): program (b, k) computes its
  sequence's aggregation weight from ``stats`` (its own row and row B), the normalizers and the
  upstream gradient (all read from device memory: no host sync), reads blocks k, k + K, ... once
  and writes ``d loss / d logprobs = m * (c_pol * is_w * dl/dlp + c_kl * dkl/dlp)`` and
  ``d loss / d entropy = m * c_ent``.

No [B, T] intermediate is written; the launchers allocate only the outputs (``torch.empty``,
no memset) and run no other torch op on contiguous inputs.

Not done (yet): tuning of BLOCK / num_warps / PROGRAMS_PER_SM on the GPU.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from rlkern.kernels._common import nan_max, nan_min
from rlkern.reference.policy_loss import HYPER_FIELDS, STAT_FIELDS

LOSS_IDS = {"ppo": 0, "gspo": 1, "cispo": 2, "reinforce": 3, "gpg": 3, "sapo": 4, "dro": 5, "dppo_tv": 6,
            "dppo_kl": 7, "clip_cov": 8, "kl_cov": 9, "geo_mean": 10}
KL_IDS = {"k1": 0, "kl": 0, "abs": 1, "k2": 2, "mse": 2, "k3": 3, "low_var_kl": 3, "k3_unclamped": 4}
N_STATS = len(STAT_FIELDS)
# Largest token block per loop step; the tests lower it to run the block loop several times.
MAX_BLOCK = 2048
_BOUND = tl.constexpr(20.0)  # verl's log-ratio clamp before exp
_GSPO_MAX = tl.constexpr(10.0)
_K3_BOUND = tl.constexpr(10.0)


@triton.jit
def _policy_token(lp, old, adv, slr, sel, clip_low, clip_high, dual, tau_pos, tau_neg, dro_beta, ppo_kl_coef,
                  LOSS: tl.constexpr, HAS_DUAL: tl.constexpr, SEQ: tl.constexpr):
    """Per-token policy loss, its derivative and the metric values (all [BLOCK]).

    SEQ (level="sequence"): every token's log-ratio is ``slr``, its sequence's mean, unclamped;
    the derivative is then in ``slr`` (cispo: in logprob). geo_mean: the loss is the token's
    sign-clipped log-ratio (the sequence's ratio is exp of their mean), the derivative in logprob.
    """
    lo_b = 1.0 - clip_low
    hi_b = 1.0 + clip_high
    zero = tl.zeros_like(lp)
    if SEQ:
        lr = slr + zero
    else:
        lr = lp - old
    CLAMPED: tl.constexpr = ((LOSS == 0) or (LOSS == 2) or (LOSS == 4) or (LOSS == 6) or (LOSS == 7)) and not SEQ
    if CLAMPED:
        lrc = nan_min(nan_max(lr, -_BOUND), _BOUND)
        in_bounds = (lr >= -_BOUND) & (lr <= _BOUND)
    else:
        lrc = lr
        in_bounds = lr == lr
    r = tl.exp(lrc)
    dr = tl.where(in_bounds, r, 0.0)
    akl = -lrc
    cf = zero
    lo = zero
    hi = zero
    dcf = zero
    if LOSS == 1:  # gspo: the sequence ratio, straight-through on the token's own logprob
        r = tl.exp(nan_min(slr, _GSPO_MAX)) + zero
        dr = tl.where(slr <= _GSPO_MAX, r, 0.0)
    if (LOSS == 0) or (LOSS == 1) or (LOSS == 8):
        l1 = -adv * r
        l2 = -adv * nan_min(nan_max(r, lo_b), hi_b)
        clipped = l2 > l1
        loss = nan_max(l1, l2)
        dl = tl.where(clipped, 0.0, -adv * dr)
        cf = clipped.to(lp.dtype)
        lo = (clipped & (adv < 0)).to(lp.dtype)
        hi = (clipped & (adv > 0)).to(lp.dtype)
        if LOSS == 0:
            if HAS_DUAL:
                l3 = -adv * dual
                neg = adv < 0
                dcf = (neg & (loss > l3)).to(lp.dtype)
                dl = tl.where(neg & (loss > l3), 0.0, tl.where(neg & (loss == l3), 0.5 * dl, dl))
                loss = tl.where(neg, nan_min(loss, l3), loss)
        if LOSS == 8:  # clip_cov: selected tokens lose their gradient
            loss = loss * (1.0 - sel)
            dl = dl * (1.0 - sel)
            cf = sel
    elif LOSS == 2:  # cispo
        cr = nan_min(nan_max(r, lo_b), hi_b)
        loss = -cr * adv * lp
        dl = -cr * adv
        cf = (r != cr).to(lp.dtype)
        # the halves: the clip against A's sign (TRL's cispo_clip_ratio is the A > 0 half)
        lo = ((r < lo_b) & (adv < 0)).to(lp.dtype)
        hi = ((r > hi_b) & (adv > 0)).to(lp.dtype)
    elif LOSS == 3:  # reinforce / gpg
        loss = -adv * lp
        dl = -adv + zero
    elif LOSS == 4:  # sapo
        tau = tl.where(adv > 0, tau_pos, tau_neg)
        s = 1.0 / (1.0 + tl.exp(-tau * (r - 1.0)))
        loss = -s * (4.0 / tau) * adv
        dl = -adv * 4.0 * s * (1.0 - s) * dr
    elif LOSS == 5:  # dro
        loss = -(lp * adv - 0.5 * dro_beta * lr * lr)
        dl = -(adv - dro_beta * lr)
    elif (LOSS == 6) or (LOSS == 7):  # dppo_tv / dppo_kl
        tr = nan_min(r, dual)
        p = tl.exp(lp)
        po = tl.exp(old)
        if LOSS == 6:
            up_ok = (p - po) <= clip_high
            down_ok = (p - po) >= -clip_low
        else:
            bkl = po * (old - lp) + (1.0 - po) * tl.log((1.0 - po + 1e-8) / (1.0 - p + 1e-8))
            up_ok = (bkl <= clip_high) | (p <= po)
            down_ok = (bkl <= clip_low) | (p >= po)
        valid = tl.where(adv > 0, up_ok, down_ok).to(lp.dtype)
        loss = -adv * tr * lp * valid
        dl = -adv * tr * valid
        cf = 1.0 - valid
        lo = tl.where(adv <= 0, 1.0 - valid, 0.0)
        hi = tl.where(adv > 0, 1.0 - valid, 0.0)
        dcf = tl.where(r > dual, valid, 0.0)
    elif LOSS == 10:  # geo_mean
        sgn = tl.where(adv > 0, 1.0, tl.where(adv < 0, -1.0, 0.0))
        lr_clip = nan_min(nan_max(lr, -clip_low), clip_high)
        loss = sgn * nan_min(sgn * lr, sgn * lr_clip)
        # lr is the min where the clip does not bind for A's sign (range ends included, as
        # torch.clamp passes the gradient there); 0 where A = 0
        dl = (((adv > 0) & (lr <= clip_high)) | ((adv < 0) & (lr >= -clip_low))).to(lp.dtype)
        clipped = lr != lr_clip
        cf = (clipped & (adv > 0)).to(lp.dtype)  # verl: pg_clipfrac counts A > 0 only
        hi = cf
        lo = (clipped & (adv < 0)).to(lp.dtype)
        dcf = lo
    else:  # kl_cov
        sgn = tl.where(lr > 0, 1.0, tl.where(lr < 0, -1.0, 0.0))
        loss = -adv * r + sel * (ppo_kl_coef * tl.abs(lr))
        dl = -adv * r + sel * ppo_kl_coef * sgn
        akl = tl.abs(lr)
    return loss, dl, cf, lo, hi, dcf, akl, r


@triton.jit
def _load_tokens(idx, n, mask_row, lp_row, old_row, adv_row, sel_row, adv_seq, HAS_MASK: tl.constexpr,
                 ADV_PER_SEQ: tl.constexpr, HAS_SEL: tl.constexpr, BLOCK: tl.constexpr, CDT: tl.constexpr):
    """One block of a sequence's tokens, as the forward and the backward read them: (in bounds,
    mask weight, mask != 0, logprobs, old logprobs, advantages, clip_cov / kl_cov selection), [BLOCK]
    each in CDT (the row pointers already point at the sequence's first token)."""
    inb = idx < n
    if HAS_MASK:
        m = tl.load(mask_row + idx, mask=inb, other=0).to(CDT)
    else:
        m = inb.to(CDT)
    lp = tl.load(lp_row + idx, mask=inb, other=0.0).to(CDT)
    old = tl.load(old_row + idx, mask=inb, other=0.0).to(CDT)
    if ADV_PER_SEQ:
        adv = adv_seq + tl.zeros([BLOCK], CDT)
    else:
        adv = tl.load(adv_row + idx, mask=inb, other=0.0).to(CDT)
    if HAS_SEL:
        sel = tl.load(sel_row + idx, mask=inb, other=0.0).to(CDT)
    else:
        sel = tl.zeros([BLOCK], CDT)
    return inb, m, m != 0, lp, old, adv, sel


@triton.jit
def _kl_token(lp, ref, KL: tl.constexpr, KL_ST: tl.constexpr):
    """KL estimate and its derivative in logprob (verl's kl_penalty; KL_ST: k2's gradient)."""
    diff = lp - ref
    if KL == 0:
        value = diff
        deriv = tl.full(diff.shape, 1.0, diff.dtype)
    elif KL == 1:
        value = tl.abs(diff)
        deriv = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
    elif KL == 2:
        value = 0.5 * diff * diff
        deriv = diff
    else:  # 3: k3 (verl's bounds); 4: k3_unclamped (TRL's beta term, no bounds)
        if KL == 4:
            x = -diff
        else:
            x = nan_min(nan_max(-diff, -_BOUND), _BOUND)
        e = tl.exp(x)
        v = e - x - 1.0
        if x.dtype == tl.float32:
            # e - x - 1 cancels for small |x|; below 0.5 the Taylor series to x^9 / 9! keeps k3
            # within a few ulp (csrc/policy_loss.cpp, kl_token). float64 needs no series.
            series = x * x * (0.5 + x * (1.0 / 6 + x * (1.0 / 24 + x * (1.0 / 120 + x * (
                1.0 / 720 + x * (1.0 / 5040 + x * (1.0 / 40320 + x * (1.0 / 362880))))))))
            v = tl.where(tl.abs(x) < 0.5, series, v)
        if KL == 4:
            value = v
            deriv = 1.0 - e
        else:
            value = nan_min(nan_max(v, -_K3_BOUND), _K3_BOUND)
            live = (-diff >= -_BOUND) & (-diff <= _BOUND) & (v <= _K3_BOUND)
            deriv = tl.where(live, 1.0 - e, 0.0)
    if KL_ST:
        deriv = diff
    return value, deriv


@triton.jit
def _seq_bounds(cu_ptr, pid, T, PACKED: tl.constexpr):
    if PACKED:
        start = tl.load(cu_ptr + pid).to(tl.int64)
        n = tl.load(cu_ptr + pid + 1).to(tl.int64) - start
    else:
        start = pid * 0
        n = T + pid * 0
    return start, n


@triton.jit
def _seq_program(cu_ptr, T, PACKED: tl.constexpr):
    """Program (b, k) of a (B, K) grid over sequences: (b, k, K, the sequence's start (packed; 0
    padded) and length)."""
    pid = tl.program_id(0).to(tl.int64)
    kid = tl.program_id(1).to(tl.int64)
    n_split = tl.num_programs(1).to(tl.int64)
    start, n = _seq_bounds(cu_ptr, pid, T, PACKED)
    return pid, kid, n_split, start, n


@triton.jit
def _row_offsets(pid, start, s0, s1, s2, s3, s4, s5, s6, s7, PACKED: tl.constexpr):
    """Where sequence pid starts in eight tensors of row strides s0 .. s7 (packed: its first token,
    the same in all)."""
    if PACKED:
        r0, r1, r2, r3, r4, r5, r6, r7 = start, start, start, start, start, start, start, start
    else:
        r0, r1, r2, r3 = pid * s0, pid * s1, pid * s2, pid * s3
        r4, r5, r6, r7 = pid * s4, pid * s5, pid * s6, pid * s7
    return r0, r1, r2, r3, r4, r5, r6, r7


@triton.jit
def _policy_hyper(clip_low, clip_high, dual, tau_pos, tau_neg, dro_beta, ppo_kl_coef, CDT: tl.constexpr):
    """The token kernels' float hyper-parameters in the compute type. They come as float64
    arguments (a Python float would be passed as float32; float64 input needs them exact), read in
    the compute type (float32: rounded as the float32 arguments were); under the interpreter they
    are Python floats, which tl.full keeps exact."""
    return (tl.full((), clip_low, CDT), tl.full((), clip_high, CDT), tl.full((), dual, CDT),
            tl.full((), tau_pos, CDT), tl.full((), tau_neg, CDT), tl.full((), dro_beta, CDT),
            tl.full((), ppo_kl_coef, CDT))


@triton.jit
def _seq_advantage(adv_ptr, pid, ADV_PER_SEQ: tl.constexpr, CDT: tl.constexpr):
    """Sequence pid's advantage (ADV_PER_SEQ; a 0 that is never read when advantages are per token)."""
    if ADV_PER_SEQ:
        adv_seq = tl.load(adv_ptr + pid).to(CDT)
    else:
        adv_seq = tl.zeros([], CDT)
    return adv_seq


AGG_IDS = {"token-mean": 0, "token-sum": 1, "seq-mean-token-sum": 2, "seq-mean-token-mean": 3,
           "seq-mean-token-sum-norm": 4}
_MEAN_EPS = tl.constexpr(1e-8)  # verl's masked_mean denominator: sum(mask) + 1e-8
# Sequences per step of the finalize loop.
FINISH_BLOCK = 256
# Warps of the token kernels: at BLOCK 2048, 8 warps keep the ten accumulators of the forward in
# 151 registers per thread and the backward in 75 (4 warps: 254 and 155; ptxas for sm_90, no
# spills either way). Chosen from the register counts, not yet from timings on the GPU.
TOKEN_WARPS = 8


@triton.jit
def _seq_weight(count, tokens, seqs, dp, scale, AGG: tl.constexpr):
    """d agg / d (masked token sum of a sequence) for [BLOCK] sequence counts (ops _seq_weights)."""
    if AGG == 0:  # token-mean
        w = dp / tl.where(tokens == 0, 1.0, tokens) + tl.zeros_like(count)
    elif AGG == 1:  # token-sum
        w = dp + tl.zeros_like(count)
    else:  # seq-mean-*: non-empty sequences count
        w = tl.where(count > 0, dp / tl.where(seqs == 0, 1.0, seqs), 0.0)
        if AGG == 3:
            w = w / (count + _MEAN_EPS)
        if AGG == 4:
            w = w / scale
    return w


@triton.jit
def _norms(gtok_ptr, gseq_ptr, gtok, gseq, tokens, seqs, GTOK: tl.constexpr, GSEQ: tl.constexpr):
    """verl's global normalizers when given (GTOK / GSEQ: 1 a 0-dim tensor, 2 a number), else the local sums."""
    if GTOK == 1:
        tokens = tl.load(gtok_ptr).to(tokens.dtype)
    if GTOK == 2:
        tokens = gtok
    if GSEQ == 1:
        seqs = tl.load(gseq_ptr).to(tokens.dtype)
    if GSEQ == 2:
        seqs = gseq
    return tokens, seqs


@triton.jit
def _local_norms(part_ptr, B, K, COLS: tl.constexpr, COUNT: tl.constexpr, BLOCK_B: tl.constexpr):
    """(mask sum, non-empty sequences) of the B sequences whose K partial rows each are in
    part [B K, COLS], the mask sum in column COUNT, reduced in a fixed order."""
    CDT = part_ptr.dtype.element_ty
    rows = tl.arange(0, BLOCK_B).to(tl.int64)
    a_tok = tl.zeros([BLOCK_B], CDT)
    a_seq = tl.zeros([BLOCK_B], CDT)
    for off in range(0, B, BLOCK_B):
        b = off + rows
        count = tl.zeros([BLOCK_B], CDT)
        for k in range(0, K):
            count += tl.load(part_ptr + (b * K + k) * COLS + COUNT, mask=b < B, other=0.0)
        a_tok += count
        a_seq += (count > 0).to(CDT)
    return tl.sum(a_tok, 0), tl.sum(a_seq, 0)


@triton.jit
def _policy_loss_fwd_kernel(
    lp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, ent_ptr, isw_ptr, sel_ptr,  # (B, T) rows or packed (total,)
    cu_ptr,  # (B + 1,) when PACKED
    part_ptr,  # (B * K, 12) float32 (float64 for float64 input): the partial sums of program (b, k) in row b * K + k
    T,  # padded width (unused when PACKED)
    s_lp, s_old, s_adv, s_mask, s_ref, s_ent, s_isw, s_sel,  # row strides (padded)
    clip_low: tl.float64, clip_high: tl.float64, dual: tl.float64, tau_pos: tl.float64, tau_neg: tl.float64,
    dro_beta: tl.float64, ppo_kl_coef: tl.float64,
    LOSS: tl.constexpr, KL: tl.constexpr, KL_ST: tl.constexpr, HAS_DUAL: tl.constexpr,
    PACKED: tl.constexpr, ADV_PER_SEQ: tl.constexpr, HAS_MASK: tl.constexpr, HAS_REF: tl.constexpr,
    HAS_ENT: tl.constexpr, HAS_ISW: tl.constexpr, HAS_SEL: tl.constexpr, SEQ: tl.constexpr, KL_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # grid (B, K): program (b, k) reads blocks k, k + K, k + 2K, ... of sequence b (K = 1 for the
    # two-pass losses, whose token pass needs the whole sequence's mean log-ratio first)
    CDT = part_ptr.dtype.element_ty  # the compute type: float64 for float64 input, else float32
    clip_low, clip_high, dual, tau_pos, tau_neg, dro_beta, ppo_kl_coef = _policy_hyper(
        clip_low, clip_high, dual, tau_pos, tau_neg, dro_beta, ppo_kl_coef, CDT)
    pid, kid, n_split, start, n = _seq_program(cu_ptr, T, PACKED)
    r_lp, r_old, r_adv, r_mask, r_ref, r_ent, r_isw, r_sel = _row_offsets(
        pid, start, s_lp, s_old, s_adv, s_mask, s_ref, s_ent, s_isw, s_sel, PACKED)
    cols = tl.arange(0, BLOCK).to(tl.int64)
    slr = 0.0
    # level="sequence" ppo / sapo: the gradient reaches a token only through its sequence's mean
    THROUGH_MEAN: tl.constexpr = SEQ and ((LOSS == 0) or (LOSS == 4))
    if (LOSS == 1) or SEQ:  # gspo, level="sequence": the sequence's mean log-ratio first
        num = tl.zeros([BLOCK], CDT)
        den = tl.zeros([BLOCK], CDT)
        for off in range(0, n, BLOCK):
            idx = off + cols
            inb = idx < n
            if HAS_MASK:
                m = tl.load(mask_ptr + r_mask + idx, mask=inb, other=0).to(CDT)
            else:
                m = inb.to(CDT)
            lp = tl.load(lp_ptr + r_lp + idx, mask=inb, other=0.0).to(CDT)
            old = tl.load(old_ptr + r_old + idx, mask=inb, other=0.0).to(CDT)
            num += tl.where(m != 0, m * (lp - old), 0.0)
            den += m
        slr = tl.sum(num, 0) / tl.maximum(tl.sum(den, 0), 1.0)
    adv_seq = _seq_advantage(adv_ptr, pid, ADV_PER_SEQ, CDT)
    a_pol = tl.zeros([BLOCK], CDT)
    a_ent = tl.zeros([BLOCK], CDT)
    a_kl = tl.zeros([BLOCK], CDT)
    a_cnt = tl.zeros([BLOCK], CDT)
    a_cf = tl.zeros([BLOCK], CDT)
    a_lo = tl.zeros([BLOCK], CDT)
    a_hi = tl.zeros([BLOCK], CDT)
    a_dcf = tl.zeros([BLOCK], CDT)
    a_akl = tl.zeros([BLOCK], CDT)
    a_ratio = tl.zeros([BLOCK], CDT)
    a_dseq = tl.zeros([BLOCK], CDT)  # THROUGH_MEAN: m is_w dl
    a_adv = tl.zeros([BLOCK], CDT)  # geo_mean: m A
    a_log_isw = tl.zeros([BLOCK], CDT)  # geo_mean: m log(is_w + 1e-10)
    for off in range(kid * BLOCK, n, n_split * BLOCK):
        idx = off + cols
        inb, m, live, lp, old, adv, sel = _load_tokens(
            idx, n, mask_ptr + r_mask, lp_ptr + r_lp, old_ptr + r_old, adv_ptr + r_adv, sel_ptr + r_sel, adv_seq,
            HAS_MASK, ADV_PER_SEQ, HAS_SEL, BLOCK, CDT)
        loss, dl, cf, lo, hi, dcf, akl, ratio = _policy_token(
            lp, old, adv, slr, sel, clip_low, clip_high, dual, tau_pos, tau_neg, dro_beta, ppo_kl_coef, LOSS, HAS_DUAL,
            SEQ)
        if HAS_ISW:
            isw = tl.load(isw_ptr + r_isw + idx, mask=inb, other=0.0).to(CDT)
            if LOSS == 10:
                a_log_isw += tl.where(live, m * tl.log(isw + 1e-10), 0.0)
            else:
                loss = loss * isw
                dl = dl * isw
        if LOSS == 10:
            a_adv += tl.where(live, m * adv, 0.0)
        if THROUGH_MEAN:
            a_dseq += tl.where(live, m * dl, 0.0)
        # where() before the product: a NaN/inf at a masked-out token must not leak (verl's masked_sum)
        a_pol += tl.where(live, m * loss, 0.0)
        a_cnt += m
        a_cf += tl.where(live, m * cf, 0.0)
        a_lo += tl.where(live, m * lo, 0.0)
        a_hi += tl.where(live, m * hi, 0.0)
        a_dcf += tl.where(live, m * dcf, 0.0)
        a_akl += tl.where(live, m * akl, 0.0)
        a_ratio += tl.where(live, m * ratio, 0.0)
        if HAS_REF:
            ref = tl.load(ref_ptr + r_ref + idx, mask=inb, other=0.0).to(CDT)
            kl, _ = _kl_token(lp, ref, KL, KL_ST)
            if KL_BIAS:  # TRL's use_bias_correction_kl: times the unclamped ratio (the sequence's at SEQ)
                if SEQ:
                    kl = kl * tl.exp(slr)
                else:
                    kl = kl * tl.exp(lp - old)
            a_kl += tl.where(live, m * kl, 0.0)
        if HAS_ENT:
            ent = tl.load(ent_ptr + r_ent + idx, mask=inb, other=0.0).to(CDT)
            a_ent += tl.where(live, m * ent, 0.0)
    out = part_ptr + (pid * n_split + kid) * 12
    tl.store(out + 0, tl.sum(a_pol, 0))  # geo_mean: the sum of m * clipped lr
    tl.store(out + 1, tl.sum(a_ent, 0))
    tl.store(out + 2, tl.sum(a_kl, 0))
    tl.store(out + 3, tl.sum(a_cnt, 0))
    tl.store(out + 4, tl.sum(a_cf, 0))
    tl.store(out + 5, tl.sum(a_lo, 0))
    tl.store(out + 6, tl.sum(a_hi, 0))
    tl.store(out + 7, tl.sum(a_dcf, 0))
    tl.store(out + 8, tl.sum(a_akl, 0))
    tl.store(out + 9, tl.sum(a_ratio, 0))
    if LOSS == 10:  # geo_mean: sums of m A and m log(is_w + 1e-10); the finalize forms the loss
        tl.store(out + 10, tl.sum(a_adv, 0))
        tl.store(out + 11, tl.sum(a_log_isw, 0))
    else:
        tl.store(out + 10, slr)
        tl.store(out + 11, tl.sum(a_dseq, 0))


@triton.jit
def _policy_loss_finish_kernel(
    part_ptr,  # (B * K, 12) float32 / float64 from _policy_loss_fwd_kernel
    stats_ptr,  # (B + 1, 12) like part: rows 0..B-1 reduced over K here (when ROWS), row B written here
    gtok_ptr, gseq_ptr,  # 0-dim global normalizers (GTOK / GSEQ == 1)
    loss_ptr,  # () like stats
    metrics_ptr,  # (8,) like stats, rlkern.ops METRIC_KEYS order
    B, K,
    gtok: tl.float64, gseq: tl.float64,  # the global normalizers given as numbers (GTOK / GSEQ == 2)
    dp: tl.float64, scale: tl.float64, kl_coef: tl.float64, ent_coef: tl.float64,  # scale: lsf, else the width
    AGG: tl.constexpr, ENT_AGG: tl.constexpr, ENT_LOCAL: tl.constexpr, GTOK: tl.constexpr,
    GSEQ: tl.constexpr, WITH_KL: tl.constexpr, WITH_ENT: tl.constexpr, GEO_MEAN: tl.constexpr,
    HAS_ISW: tl.constexpr, ROWS: tl.constexpr, BLOCK_B: tl.constexpr,
):
    # ROWS: part is not stats (K > 1 or geo_mean); the per-sequence rows the backward reads are
    # written here. Both loops read the partial sums (not the rows written by the other loop).
    CDT = stats_ptr.dtype.element_ty
    gtok, gseq, dp = tl.full((), gtok, CDT), tl.full((), gseq, CDT), tl.full((), dp, CDT)
    scale, kl_coef, ent_coef = tl.full((), scale, CDT), tl.full((), kl_coef, CDT), tl.full((), ent_coef, CDT)
    rows = tl.arange(0, BLOCK_B).to(tl.int64)
    tokens, seqs = _local_norms(part_ptr, B, K, 12, 3, BLOCK_B)  # first: every weight depends on them
    g_tokens, g_seqs = _norms(gtok_ptr, gseq_ptr, gtok, gseq, tokens, seqs, GTOK, GSEQ)
    cols = tl.arange(0, 16)
    a_loss = tl.zeros([BLOCK_B], CDT)
    a_sums = tl.zeros([BLOCK_B, 16], CDT)  # columns 0..9 of the rows
    for off in range(0, B, BLOCK_B):
        b = off + rows
        live = b < B
        tile = tl.zeros([BLOCK_B, 16], CDT)
        for k in range(0, K):
            tile += tl.load(part_ptr + (b[:, None] * K + k) * 12 + cols[None, :],
                            mask=live[:, None] & (cols[None, :] < 12), other=0.0)
        pol = tl.sum(tl.where(cols[None, :] == 0, tile, 0.0), 1)
        ent = tl.sum(tl.where(cols[None, :] == 1, tile, 0.0), 1)
        kl = tl.sum(tl.where(cols[None, :] == 2, tile, 0.0), 1)
        count = tl.sum(tl.where(cols[None, :] == 3, tile, 0.0), 1)
        if GEO_MEAN:  # verl: the sequence loss -mean(A) exp(mean clipped lr) [exp(mean log is_w)]
            den = count + _MEAN_EPS
            mean_lr = pol / den
            pol = -(tl.sum(tl.where(cols[None, :] == 10, tile, 0.0), 1) / den) * tl.exp(mean_lr)
            if HAS_ISW:
                pol = pol * tl.exp(tl.sum(tl.where(cols[None, :] == 11, tile, 0.0), 1) / den)
            tile = tl.where(cols[None, :] == 0, pol[:, None], tl.where(cols[None, :] == 10, mean_lr[:, None], tile))
        if ROWS:
            tl.store(stats_ptr + b[:, None] * 12 + cols[None, :], tile, mask=live[:, None] & (cols[None, :] < 12))
        a_sums += tl.where(cols[None, :] < 10, tile, 0.0)
        w = tl.where(live, _seq_weight(count, g_tokens, g_seqs, dp, scale, AGG), 0.0)
        if GEO_MEAN:  # a plain mean over the B rows (verl), whatever the agg mode
            a_loss += tl.where(live, pol / B, 0.0)
        else:
            a_loss += w * pol
        if WITH_KL:
            a_loss += kl_coef * (w * kl)
        if WITH_ENT:
            if ENT_LOCAL:  # an explicit entropy_agg: the local batch, dp 1 (TRL's entropy bonus)
                w_ent = tl.where(live, _seq_weight(count, tokens, seqs, 1.0, scale, ENT_AGG), 0.0)
            else:
                w_ent = w
            a_loss -= ent_coef * (w_ent * ent)
    tl.store(loss_ptr, tl.sum(a_loss, 0))
    # metrics (METRIC_KEYS order) = columns 4..9, 2 (KL), 1 (entropy) over the mask sum
    sums = tl.sum(a_sums, 0)
    slot = tl.where(cols >= 4, cols - 4, tl.where(cols == 2, 6, 7))
    is_metric = ((cols >= 4) & (cols <= 9)) | (cols == 2) | (cols == 1)
    tl.store(metrics_ptr + slot, sums / (tokens + _MEAN_EPS), mask=is_metric)
    last = tl.where(cols == 0, tokens, tl.where(cols == 1, seqs, 0.0))
    tl.store(stats_ptr + B * 12 + cols, last, mask=cols < 12)


@triton.jit
def _policy_loss_bwd_kernel(
    grad_ptr,  # () upstream gradient of the loss
    lp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, isw_ptr, sel_ptr,  # (B, T) rows or packed (total,)
    cu_ptr,  # (B + 1,) when PACKED
    gtok_ptr, gseq_ptr,  # 0-dim global normalizers (GTOK / GSEQ == 1)
    stats_ptr,  # (B + 1, 12) float32 / float64 from the forward (its dtype is the compute type)
    g_lp_ptr,  # like logprobs, contiguous
    g_ent_ptr,  # like logprobs, contiguous (when HAS_ENT)
    B, T,
    s_lp, s_old, s_adv, s_mask, s_ref, s_isw, s_sel,  # row strides (padded)
    clip_low: tl.float64, clip_high: tl.float64, dual: tl.float64, tau_pos: tl.float64, tau_neg: tl.float64,
    dro_beta: tl.float64, ppo_kl_coef: tl.float64,
    gtok: tl.float64, gseq: tl.float64, dp: tl.float64, scale: tl.float64, kl_coef: tl.float64,
    ent_coef: tl.float64,
    LOSS: tl.constexpr, KL: tl.constexpr, KL_ST: tl.constexpr, HAS_DUAL: tl.constexpr,
    PACKED: tl.constexpr, ADV_PER_SEQ: tl.constexpr, HAS_MASK: tl.constexpr, HAS_REF: tl.constexpr,
    HAS_ENT: tl.constexpr, HAS_ISW: tl.constexpr, HAS_SEL: tl.constexpr, SEQ: tl.constexpr, KL_BIAS: tl.constexpr,
    AGG: tl.constexpr, ENT_AGG: tl.constexpr, ENT_LOCAL: tl.constexpr, GTOK: tl.constexpr,
    GSEQ: tl.constexpr, WITH_KL: tl.constexpr, BLOCK: tl.constexpr,
):
    # grid (B, K): program (b, k) writes blocks k, k + K, k + 2K, ... of sequence b
    CDT = stats_ptr.dtype.element_ty
    clip_low, clip_high, dual, tau_pos, tau_neg, dro_beta, ppo_kl_coef = _policy_hyper(
        clip_low, clip_high, dual, tau_pos, tau_neg, dro_beta, ppo_kl_coef, CDT)
    gtok, gseq, dp = tl.full((), gtok, CDT), tl.full((), gseq, CDT), tl.full((), dp, CDT)
    scale, kl_coef, ent_coef = tl.full((), scale, CDT), tl.full((), kl_coef, CDT), tl.full((), ent_coef, CDT)
    pid, kid, n_split, start, n = _seq_program(cu_ptr, T, PACKED)
    r_lp, r_old, r_adv, r_mask, r_ref, r_isw, r_sel, r_out = _row_offsets(
        pid, start, s_lp, s_old, s_adv, s_mask, s_ref, s_isw, s_sel, T, PACKED)
    # this sequence's coefficients (ops _seq_weights x coefficient x upstream gradient)
    count = tl.load(stats_ptr + pid * 12 + 3)
    slr = tl.load(stats_ptr + pid * 12 + 10)
    tokens = tl.load(stats_ptr + B * 12)
    seqs = tl.load(stats_ptr + B * 12 + 1)
    g_tokens, g_seqs = _norms(gtok_ptr, gseq_ptr, gtok, gseq, tokens, seqs, GTOK, GSEQ)
    grad = tl.load(grad_ptr).to(CDT)
    w = _seq_weight(count, g_tokens, g_seqs, dp, scale, AGG)
    THROUGH_MEAN: tl.constexpr = SEQ and ((LOSS == 0) or (LOSS == 4))
    if LOSS == 10:  # geo_mean: d (mean over B of the sequence losses) / d (sum of m * clipped lr)
        c_pol = grad * tl.load(stats_ptr + pid * 12) / (B * (count + _MEAN_EPS))
    elif THROUGH_MEAN:  # d loss / d logprob_t = m_t * c_pol
        c_pol = w * grad * tl.load(stats_ptr + pid * 12 + 11) / tl.maximum(count, 1.0)
    else:
        c_pol = w * grad
    c_kl = w * kl_coef * grad
    if ENT_LOCAL:
        c_ent = -_seq_weight(count, tokens, seqs, 1.0, scale, ENT_AGG) * ent_coef * grad
    else:
        c_ent = -w * ent_coef * grad
    adv_seq = _seq_advantage(adv_ptr, pid, ADV_PER_SEQ, CDT)
    cols = tl.arange(0, BLOCK).to(tl.int64)
    for off in range(kid * BLOCK, n, n_split * BLOCK):
        idx = off + cols
        inb, m, live, lp, old, adv, sel = _load_tokens(
            idx, n, mask_ptr + r_mask, lp_ptr + r_lp, old_ptr + r_old, adv_ptr + r_adv, sel_ptr + r_sel, adv_seq,
            HAS_MASK, ADV_PER_SEQ, HAS_SEL, BLOCK, CDT)
        if THROUGH_MEAN:
            g = c_pol + tl.zeros([BLOCK], CDT)
        else:
            _, dl, _, _, _, _, _, _ = _policy_token(
                lp, old, adv, slr, sel, clip_low, clip_high, dual, tau_pos, tau_neg, dro_beta, ppo_kl_coef, LOSS,
                HAS_DUAL, SEQ)
            g = c_pol * dl
            if HAS_ISW and LOSS != 10:
                g = g * tl.load(isw_ptr + r_isw + idx, mask=inb, other=0.0).to(CDT)
        if WITH_KL:
            ref = tl.load(ref_ptr + r_ref + idx, mask=inb, other=0.0).to(CDT)
            kl, dkl = _kl_token(lp, ref, KL, KL_ST)
            if KL_BIAS:
                if SEQ:  # m_t (r_b dkl_t + (sum_s m_s kl_s r_b) / max(n, 1)), the sum being the forward's KL column
                    g += c_kl * (tl.exp(slr) * dkl + tl.load(stats_ptr + pid * 12 + 2) / tl.maximum(count, 1.0))
                else:  # d (r kl) / d lp = r (dkl + kl), r = exp(lr)
                    g += c_kl * tl.exp(lp - old) * (dkl + kl)
            else:
                g += c_kl * dkl
        g = tl.where(live, m * g, 0.0)
        tl.store(g_lp_ptr + r_out + idx, g.to(g_lp_ptr.dtype.element_ty), mask=inb)
        if HAS_ENT:
            ge = tl.where(live, m * c_ent, 0.0)
            tl.store(g_ent_ptr + r_out + idx, ge.to(g_ent_ptr.dtype.element_ty), mask=inb)


# ---------------------------------------------------------------------------------------------
# Launchers: the signatures of torch.ops.rlkern.cpp_policy_loss / cpp_policy_loss_backward.


def _compute_dtype(logprobs: torch.Tensor) -> torch.dtype:
    """float64 for float64 logprobs, else float32: the dtype of stats, which the kernels compute in."""
    return torch.float64 if logprobs.dtype == torch.float64 else torch.float32


def _rows(t: torch.Tensor | None, packed: bool) -> torch.Tensor | None:
    """Last dim contiguous (rows may be strided); bool masks are read as uint8."""
    if t is None:
        return None
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    if packed:
        return t.contiguous()
    return t if t.stride(-1) == 1 else t.contiguous()


# Programs per SM the token kernels aim for: when B sequences are too few, each is split into K
# programs over interleaved blocks (B = 64 alone would fill half an H100). The interpreter has
# no SMs: CPU_SMS = 0 means no split there, and tests raise it to run the split.
PROGRAMS_PER_SM = 4
CPU_SMS = 0


def _n_split(n_seqs: int, n_tokens: int, block: int, device: torch.device, two_pass: bool) -> int:
    """K, the programs per sequence: host values only (shapes and the device's SM count)."""
    if two_pass or n_seqs == 0:  # GSPO / level="sequence": the token pass needs the whole sequence's mean
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else CPU_SMS
    blocks = triton.cdiv(max(n_tokens // n_seqs, 1), block)  # blocks of an average sequence
    return max(1, min(triton.cdiv(PROGRAMS_PER_SM * sms, n_seqs), blocks))


def _token_args(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, is_weights, select, cu_seqlens,
                loss, kl_estimator, level, hyper):
    """Pointers, row strides, sizes, float hyper-parameters and flags shared by both token kernels."""
    h = dict(zip(HYPER_FIELDS, hyper))  # the named view of the ``hyper`` list
    packed = cu_seqlens is not None
    straight_through = kl_estimator.endswith("+")
    kl_id = KL_IDS[kl_estimator[:-1] if straight_through else kl_estimator]
    has_dual = not math.isnan(h["dual_clip"])
    tensors = [_rows(t, packed) for t in (logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy,
                                          is_weights, select)]
    adv_per_seq = advantages.shape != logprobs.shape
    if adv_per_seq:
        tensors[2] = advantages.contiguous()
    n_seqs = cu_seqlens.numel() - 1 if packed else logprobs.shape[0]
    width = 0 if packed else logprobs.shape[1]
    strides = [0 if (t is None or packed or (i == 2 and adv_per_seq)) else t.stride(0) for i, t in enumerate(tensors)]
    dummy = tensors[0]
    ptrs = [dummy if t is None else t for t in tensors]
    floats = (h["clip_low"], h["clip_high"], h["dual_clip"] if has_dual else math.inf, h["tau_pos"], h["tau_neg"],
              0.0 if math.isnan(h["dro_beta"]) else h["dro_beta"], h["ppo_kl_coef"])
    flags = dict(LOSS=LOSS_IDS[loss], KL=kl_id, KL_ST=straight_through, HAS_DUAL=has_dual, PACKED=packed,
                 ADV_PER_SEQ=adv_per_seq, HAS_MASK=mask is not None, HAS_REF=ref_logprobs is not None,
                 HAS_ENT=entropy is not None, HAS_ISW=is_weights is not None, HAS_SEL=select is not None,
                 SEQ=level == "sequence", KL_BIAS=h["kl_bias_correction"] != 0)
    cu = cu_seqlens if packed else dummy
    block = min(MAX_BLOCK, max(16, triton.next_power_of_2(max(width, 1) if not packed else 1024)))
    return ptrs, strides, cu, n_seqs, width, floats, flags, block


def _agg_args(logprobs, global_tokens, global_seqs, agg, entropy_agg, width, hyper):
    """Normalizer pointers, floats and flags of the aggregation (finish and backward kernels)."""
    h = dict(zip(HYPER_FIELDS, hyper))  # the named view of the ``hyper`` list
    dummy = logprobs
    scale = float(width) if math.isnan(h["loss_scale_factor"]) else h["loss_scale_factor"]
    # gtok, gseq, dp, scale, kl_coef, ent_coef
    given = lambda x: 0.0 if math.isnan(x) else x  # noqa: E731
    floats = (given(h["global_tokens"]), given(h["global_seqs"]), h["dp_size"], scale, h["kl_coef"],
              h["entropy_coef"])

    def mode(tensor, number):  # 0 not given, 1 a 0-dim tensor, 2 a number
        return 1 if tensor is not None else (0 if math.isnan(number) else 2)

    flags = dict(AGG=AGG_IDS[agg], ENT_AGG=AGG_IDS[entropy_agg] if entropy_agg else 0, ENT_LOCAL=bool(entropy_agg),
                 GTOK=mode(global_tokens, h["global_tokens"]), GSEQ=mode(global_seqs, h["global_seqs"]))
    ptrs = (dummy if global_tokens is None else global_tokens, dummy if global_seqs is None else global_seqs)
    return ptrs, floats, flags


def policy_loss_forward(
    logprobs: torch.Tensor,  # (B, T) or packed (total,), fp32/bf16/fp16/fp64
    old_logprobs: torch.Tensor,  # like logprobs
    advantages: torch.Tensor,  # like logprobs, or (B,)
    mask: torch.Tensor | None,  # like logprobs, bool/int/float; None when packed: all tokens
    ref_logprobs: torch.Tensor | None,
    entropy: torch.Tensor | None,
    is_weights: torch.Tensor | None,
    select: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,  # (B + 1,) int32/int64
    global_tokens: torch.Tensor | None,  # () verl's batch_num_tokens
    global_seqs: torch.Tensor | None,  # () verl's global_batch_size
    loss: str,
    agg: str,  # a verl mode (rlkern.ops resolves TRL's presets)
    entropy_agg: str,  # "": the entropy is aggregated like the loss
    kl_estimator: str,
    level: str,  # "token" or "sequence" (ppo, cispo, sapo)
    hyper: list[float],  # rlkern.ops.policy_loss H_* layout
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(loss [], metrics [8], stats [B + 1, 12])`` float32 (float64 for float64 logprobs: the
    kernels then compute in float64), in 2 launches."""
    h = dict(zip(HYPER_FIELDS, hyper))  # the named view of the ``hyper`` list
    ptrs, strides, cu, n_seqs, width, floats, flags, block = _token_args(
        logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, is_weights, select, cu_seqlens, loss,
        kl_estimator, level, hyper)
    device = logprobs.device
    split = _n_split(n_seqs, logprobs.numel(), block, device, flags["LOSS"] == LOSS_IDS["gspo"] or flags["SEQ"])
    cdt = _compute_dtype(logprobs)
    stats = torch.empty((n_seqs + 1, N_STATS), dtype=cdt, device=device)
    # the token kernel's partial sums: stats itself unless the finalize has rows to form
    rows = split > 1 or loss == "geo_mean"
    part = torch.empty((n_seqs * split, N_STATS), dtype=cdt, device=device) if rows else stats
    total = torch.empty((), dtype=cdt, device=device)
    metrics = torch.empty((8,), dtype=cdt, device=device)
    if n_seqs > 0:
        _policy_loss_fwd_kernel[(n_seqs, split)](*ptrs, cu, part, width, *strides, *floats, **flags, BLOCK=block,
                                                 num_warps=TOKEN_WARPS)
    norm_ptrs, norm_floats, norm_flags = _agg_args(logprobs, global_tokens, global_seqs, agg, entropy_agg, width,
                                                   hyper)
    _policy_loss_finish_kernel[(1,)](part, stats, *norm_ptrs, total, metrics, n_seqs, split, *norm_floats,
                                     **norm_flags, WITH_KL=ref_logprobs is not None and h["kl_coef"] != 0,
                                     WITH_ENT=entropy is not None and h["entropy_coef"] != 0,
                                     GEO_MEAN=loss == "geo_mean",
                                     HAS_ISW=is_weights is not None, ROWS=rows,
                                     BLOCK_B=min(FINISH_BLOCK, max(16, triton.next_power_of_2(max(n_seqs, 1)))),
                                     num_warps=4)
    return total, metrics, stats


def policy_loss_backward(
    grad_loss: torch.Tensor,  # () upstream gradient
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None, entropy: torch.Tensor | None, is_weights: torch.Tensor | None,
    select: torch.Tensor | None, cu_seqlens: torch.Tensor | None, global_tokens: torch.Tensor | None,
    global_seqs: torch.Tensor | None,
    stats: torch.Tensor,  # (B + 1, 12) from policy_loss_forward
    loss: str, agg: str, entropy_agg: str, kl_estimator: str, level: str, hyper: list[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(d loss / d logprobs, d loss / d entropy or [0])`` in the inputs' dtypes, contiguous; 1 launch."""
    h = dict(zip(HYPER_FIELDS, hyper))  # the named view of the ``hyper`` list
    ptrs, strides, cu, n_seqs, width, floats, flags, block = _token_args(
        logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, is_weights, select, cu_seqlens, loss,
        kl_estimator, level, hyper)
    g_lp = torch.empty(logprobs.shape, dtype=logprobs.dtype, device=logprobs.device)
    g_ent = (torch.empty(entropy.shape, dtype=entropy.dtype, device=entropy.device) if entropy is not None
             else logprobs.new_empty(0, dtype=_compute_dtype(logprobs)))
    if n_seqs == 0:  # then logprobs has no element either
        return g_lp, g_ent
    del ptrs[5], strides[5]  # the backward does not read the entropy values
    norm_ptrs, norm_floats, norm_flags = _agg_args(logprobs, global_tokens, global_seqs, agg, entropy_agg, width,
                                                   hyper)
    kl_coef = h["kl_coef"] if ref_logprobs is not None else 0.0
    ent_coef = h["entropy_coef"] if entropy is not None else 0.0
    split = _n_split(n_seqs, logprobs.numel(), block, logprobs.device, False)
    _policy_loss_bwd_kernel[(n_seqs, split)](grad_loss, *ptrs, cu, *norm_ptrs, stats, g_lp,
                                             g_ent if entropy is not None else g_lp, n_seqs, width, *strides,
                                             *floats, *norm_floats[:4], kl_coef, ent_coef, **flags, **norm_flags,
                                             WITH_KL=ref_logprobs is not None and h["kl_coef"] != 0, BLOCK=block,
                                             num_warps=TOKEN_WARPS)
    return g_lp, g_ent


# ---------------------------------------------------------------------------------------------
# kl_penalty and aggregate (the bodies of rlkern/ops/policy_loss/aggregate.py's custom ops; C++
# twins in csrc/policy_loss.cpp): the launchers take the arguments of torch.ops.rlkern.cpp_kl_penalty,
# cpp_kl_penalty_backward, cpp_aggregate and cpp_aggregate_backward and return the same tensors.
#
# - kl_penalty, 1 launch: ``_kl_penalty_kernel`` over blocks of the flat tokens writes the estimate
#   (float32, float64 for float64 input) or, backward, the upstream gradient times its derivative
#   in logprobs (logprobs' dtype).
# - aggregate forward, 2 launches: ``_aggregate_sums_kernel``, grid (B, K) as the policy loss's
#   token kernel, writes the (masked value sum, mask sum) of program (b, k); ``_aggregate_finish_kernel``
#   (one program) reduces them in a fixed order to the normalizers and the loss.
# - aggregate backward: the same two launches give every sequence's weight times the upstream
#   gradient [B] where the weights need the mask sums (not for token-sum, nor token-mean with
#   global_tokens), then ``_aggregate_bwd_kernel``, grid (B, K), writes m * weight.

KL_BLOCK = 1024


@triton.jit
def _load_as(ptr, idx, inb, CDT: tl.constexpr):
    """[BLOCK] elements read in the compute type (0 past ``inb``); bfloat16 goes through float32,
    which is exact (the interpreter converts bfloat16 straight to float64 wrongly)."""
    x = tl.load(ptr + idx, mask=inb, other=0)
    if ptr.dtype.element_ty == tl.bfloat16:
        x = x.to(tl.float32)
    return x.to(CDT)


@triton.jit
def _agg_program(cu_ptr, T, s_a, s_b, PACKED: tl.constexpr):
    """Program (b, k) of a (B, K) grid over sequences: (b, k, K, the sequence's length, the start
    of its row in two tensors of row strides s_a / s_b; packed: its first token in both)."""
    pid, kid, n_split, start, n = _seq_program(cu_ptr, T, PACKED)
    if PACKED:
        r_a = start
        r_b = start
    else:
        r_a = pid * s_a
        r_b = pid * s_b
    return pid, kid, n_split, n, r_a, r_b


@triton.jit
def _agg_mask(mask_ptr, idx, inb, HAS_MASK: tl.constexpr, CDT: tl.constexpr):
    """The mask of [BLOCK] tokens as weights in the compute type (without a mask: 1 inside the sequence)."""
    if HAS_MASK:
        m = _load_as(mask_ptr, idx, inb, CDT)
    else:
        m = inb.to(CDT)
    return m


@triton.jit
def _kl_penalty_kernel(
    lp_ptr,  # (N,) logprobs, contiguous, fp16/bf16/fp32/fp64
    ref_ptr,  # (N,) ref_logprobs, contiguous, any float dtype
    grad_ptr,  # (N,) upstream gradient, contiguous (BACKWARD)
    out_ptr,  # (N,) the estimate (compute type), or BACKWARD d / d logprobs (logprobs' dtype)
    N,
    KL: tl.constexpr, KL_ST: tl.constexpr, BACKWARD: tl.constexpr, CDT: tl.constexpr, BLOCK: tl.constexpr,
):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    inb = idx < N
    lp = _load_as(lp_ptr, idx, inb, CDT)
    ref = _load_as(ref_ptr, idx, inb, CDT)
    value, deriv = _kl_token(lp, ref, KL, KL_ST)
    if BACKWARD:
        value = deriv * _load_as(grad_ptr, idx, inb, CDT)
    tl.store(out_ptr + idx, value.to(out_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _aggregate_sums_kernel(
    v_ptr,  # (B, T) rows or packed (total,) values, any float dtype (WITH_VALUES)
    mask_ptr,  # like values: uint8 (bool) / int / float weights (HAS_MASK)
    cu_ptr,  # (B + 1,) int32 / int64 when PACKED
    part_ptr,  # (B * K, 2) compute type: row b K + k = (sum of m v where m != 0, sum of m) of program (b, k)
    T,  # padded width (unused when PACKED)
    s_v, s_mask,  # row strides (padded)
    WITH_VALUES: tl.constexpr, HAS_MASK: tl.constexpr, PACKED: tl.constexpr, BLOCK: tl.constexpr,
):
    CDT = part_ptr.dtype.element_ty
    pid, kid, n_split, n, r_v, r_mask = _agg_program(cu_ptr, T, s_v, s_mask, PACKED)
    cols = tl.arange(0, BLOCK).to(tl.int64)
    a_kept = tl.zeros([BLOCK], CDT)
    a_cnt = tl.zeros([BLOCK], CDT)
    for off in range(kid * BLOCK, n, n_split * BLOCK):
        idx = off + cols
        inb = idx < n
        m = _agg_mask(mask_ptr + r_mask, idx, inb, HAS_MASK, CDT)
        if WITH_VALUES:
            # where() before the sum: a NaN / inf value at a masked-out token must not leak
            a_kept += tl.where(m != 0, m * _load_as(v_ptr + r_v, idx, inb, CDT), 0.0)
        a_cnt += m
    out = part_ptr + (pid * n_split + kid) * 2
    tl.store(out, tl.sum(a_kept, 0))
    tl.store(out + 1, tl.sum(a_cnt, 0))


@triton.jit
def _aggregate_finish_kernel(
    part_ptr,  # (B * K, 2) from _aggregate_sums_kernel
    gtok_ptr, gseq_ptr,  # () global_tokens / global_seqs (GTOK / GSEQ == 1)
    grad_ptr,  # () upstream gradient (BACKWARD)
    out_ptr,  # () the loss, or BACKWARD (B,) every sequence's weight times the gradient; compute type
    B, K,
    dp: tl.float64, scale: tl.float64,  # scale: loss_scale_factor, else the padded width (1 packed)
    AGG: tl.constexpr, GTOK: tl.constexpr, GSEQ: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_B: tl.constexpr,
):
    CDT = out_ptr.dtype.element_ty
    dp, scale = tl.full((), dp, CDT), tl.full((), scale, CDT)
    rows = tl.arange(0, BLOCK_B).to(tl.int64)
    tokens, seqs = _local_norms(part_ptr, B, K, 2, 1, BLOCK_B)  # first: every weight depends on them
    tokens, seqs = _norms(gtok_ptr, gseq_ptr, tokens, seqs, tokens, seqs, GTOK, GSEQ)
    if BACKWARD:
        grad = tl.load(grad_ptr).to(CDT)
    a_loss = tl.zeros([BLOCK_B], CDT)
    for off in range(0, B, BLOCK_B):
        b = off + rows
        live = b < B
        kept = tl.zeros([BLOCK_B], CDT)
        count = tl.zeros([BLOCK_B], CDT)
        for k in range(0, K):
            kept += tl.load(part_ptr + (b * K + k) * 2, mask=live, other=0.0)
            count += tl.load(part_ptr + (b * K + k) * 2 + 1, mask=live, other=0.0)
        w = tl.where(live, _seq_weight(count, tokens, seqs, dp, scale, AGG), 0.0)
        if BACKWARD:
            tl.store(out_ptr + b, w * grad, mask=live)
        else:
            a_loss += w * kept
    if not BACKWARD:
        tl.store(out_ptr, tl.sum(a_loss, 0))


@triton.jit
def _aggregate_bwd_kernel(
    mask_ptr,  # (B, T) rows or packed (total,): uint8 (bool) / int / float weights (HAS_MASK)
    cu_ptr,  # (B + 1,) int32 / int64 when PACKED
    w_ptr,  # (B,) compute type: weight times gradient from _aggregate_finish_kernel (W_BUF)
    gtok_ptr,  # () global_tokens (GTOK == 1, token-mean without W_BUF)
    grad_ptr,  # () upstream gradient (without W_BUF)
    out_ptr,  # like values, contiguous, values' dtype: d loss / d values
    T,  # padded width (unused when PACKED)
    s_mask,  # mask row stride (padded)
    dp: tl.float64,
    AGG: tl.constexpr, GTOK: tl.constexpr, W_BUF: tl.constexpr, HAS_MASK: tl.constexpr, PACKED: tl.constexpr,
    CDT: tl.constexpr, BLOCK: tl.constexpr,
):
    pid, kid, n_split, n, r_mask, r_out = _agg_program(cu_ptr, T, s_mask, T, PACKED)
    if W_BUF:
        w = tl.load(w_ptr + pid).to(CDT)
    else:  # token-sum, or token-mean over global_tokens: no mask sum needed
        zero = tl.zeros((), CDT)
        tokens, _ = _norms(gtok_ptr, gtok_ptr, zero, zero, zero, zero, GTOK, 0)
        w = _seq_weight(zero, tokens, zero, tl.full((), dp, CDT), zero, AGG) * tl.load(grad_ptr).to(CDT)
    cols = tl.arange(0, BLOCK).to(tl.int64)
    for off in range(kid * BLOCK, n, n_split * BLOCK):
        idx = off + cols
        inb = idx < n
        m = _agg_mask(mask_ptr + r_mask, idx, inb, HAS_MASK, CDT)
        g = tl.where(m != 0, m * w, 0.0)
        tl.store(out_ptr + r_out + idx, g.to(out_ptr.dtype.element_ty), mask=inb)


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _output(like: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, work): ``out`` in the layout of ``torch.empty_like(like)`` (the custom ops' fake
    outputs); the kernels write ``work``, contiguous: ``out`` itself unless ``like`` is a dense
    non-contiguous layout (a transpose), then copied into ``out``."""
    out = torch.empty_like(like, dtype=dtype)
    return out, out if out.is_contiguous() else torch.empty(like.shape, dtype=dtype, device=like.device)


def _kl_launch(grad, logprobs, ref_logprobs, kl_estimator):
    straight_through = kl_estimator.endswith("+")
    kl_id = KL_IDS[kl_estimator[:-1] if straight_through else kl_estimator]
    cdt = _compute_dtype(logprobs)
    out, work = _output(logprobs, cdt if grad is None else logprobs.dtype)
    n = logprobs.numel()
    if n:
        lp, ref = logprobs.contiguous(), ref_logprobs.contiguous()
        g = lp if grad is None else grad.contiguous()
        _kl_penalty_kernel[(triton.cdiv(n, KL_BLOCK),)](lp, ref, g, work, n, KL=kl_id, KL_ST=straight_through,
                                                        BACKWARD=grad is not None, CDT=_tl_dtype(cdt),
                                                        BLOCK=KL_BLOCK, num_warps=4)
    if work is not out:
        out.copy_(work)
    return out


def kl_penalty(
    logprobs: torch.Tensor,  # any shape, fp16/bf16/fp32/fp64
    ref_logprobs: torch.Tensor,  # like logprobs
    kl_estimator: str,  # k1 / kl, abs, k2 / mse, k3 / low_var_kl, each optionally with "+"
) -> torch.Tensor:
    """The estimate, shape of logprobs, float32 (float64 for float64 logprobs); 1 launch."""
    return _kl_launch(None, logprobs, ref_logprobs, kl_estimator)


def kl_penalty_backward(grad: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                        kl_estimator: str) -> torch.Tensor:
    """grad (shape of logprobs) times d estimate / d logprobs, in logprobs' dtype; 1 launch."""
    return _kl_launch(grad, logprobs, ref_logprobs, kl_estimator)


def _agg_launch(grad, values, mask, cu_seqlens, global_tokens, global_seqs, agg, dp_size, loss_scale_factor):
    packed = cu_seqlens is not None
    cdt = _compute_dtype(values)
    device = values.device
    n_seqs = cu_seqlens.numel() - 1 if packed else values.shape[0]
    width = 0 if packed else values.shape[1]
    scale = (1.0 if packed else float(width)) if math.isnan(loss_scale_factor) else loss_scale_factor
    v, m = _rows(values, packed), _rows(mask, packed)
    cu = cu_seqlens if packed else v
    block = min(MAX_BLOCK, max(16, triton.next_power_of_2(max(width, 1) if not packed else 1024)))
    split = _n_split(n_seqs, values.numel(), block, device, False)
    gtok = global_tokens if global_tokens is not None else v
    gseq = global_seqs if global_seqs is not None else v
    flags = dict(AGG=AGG_IDS[agg], GTOK=int(global_tokens is not None), GSEQ=int(global_seqs is not None))
    backward = grad is not None
    w_buf = not backward or (agg != "token-sum" and not (agg == "token-mean" and global_tokens is not None))
    out = torch.empty((n_seqs,) if backward else (), dtype=cdt, device=device) if w_buf else None
    if w_buf:
        part = torch.empty((n_seqs * split, 2), dtype=cdt, device=device)
        if n_seqs > 0:
            _aggregate_sums_kernel[(n_seqs, split)](
                v, v if m is None else m, cu, part, width, 0 if packed else v.stride(0),
                0 if (packed or m is None) else m.stride(0), WITH_VALUES=not backward, HAS_MASK=m is not None,
                PACKED=packed, BLOCK=block, num_warps=TOKEN_WARPS)
        _aggregate_finish_kernel[(1,)](part, gtok, gseq, out if grad is None else grad, out, n_seqs, split,
                                       float(dp_size), scale, **flags, BACKWARD=backward,
                                       BLOCK_B=min(FINISH_BLOCK, max(16, triton.next_power_of_2(max(n_seqs, 1)))),
                                       num_warps=4)
    if not backward:
        return out
    g_out, work = _output(values, values.dtype)
    if values.numel():
        _aggregate_bwd_kernel[(n_seqs, split)](
            v if m is None else m, cu, out if w_buf else grad, gtok, grad, work, width,
            0 if (packed or m is None) else m.stride(0), float(dp_size), AGG=flags["AGG"], GTOK=flags["GTOK"],
            W_BUF=w_buf, HAS_MASK=m is not None, PACKED=packed, CDT=_tl_dtype(cdt), BLOCK=block,
            num_warps=TOKEN_WARPS)
    if work is not g_out:
        g_out.copy_(work)
    return g_out


def aggregate(
    values: torch.Tensor,  # (B, T) or packed (total,), any float dtype
    mask: torch.Tensor | None,  # like values, bool/int/float; None when packed: all tokens
    cu_seqlens: torch.Tensor | None,  # (B + 1,) int32/int64
    global_tokens: torch.Tensor | None,  # () verl's batch_num_tokens
    global_seqs: torch.Tensor | None,  # () verl's global_batch_size
    agg: str,  # a verl mode (rlkern.ops resolves TRL's presets)
    dp_size: float,
    loss_scale_factor: float,  # NaN: not given
) -> torch.Tensor:
    """The aggregated loss ``[]`` float32 (float64 for float64 values); 2 launches."""
    return _agg_launch(None, values, mask, cu_seqlens, global_tokens, global_seqs, agg, dp_size, loss_scale_factor)


def aggregate_backward(grad: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                       cu_seqlens: torch.Tensor | None, global_tokens: torch.Tensor | None,
                       global_seqs: torch.Tensor | None, agg: str, dp_size: float,
                       loss_scale_factor: float) -> torch.Tensor:
    """d loss / d values, values' shape and dtype; 3 launches (1 for token-sum and for token-mean
    over global_tokens)."""
    return _agg_launch(grad, values, mask, cu_seqlens, global_tokens, global_seqs, agg, dp_size, loss_scale_factor)
