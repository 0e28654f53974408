"""Triton kernels of the token-level preference ops (rlkern/ops/preference_tokens.py; oracle
rlkern/reference/preference_tokens.py; CPU twin csrc/preference_tokens.cpp).

- ``_sums_kernel``: one program per pair (rows i and i + B of the concatenated batch, chosen rows
  first). It reduces each row's tokens to the weighted sums of the policy's and the token-level
  reference's log-probs, the plain masked sum (sft), the token count and WPO's pair weight. A
  token's weight is mask * LD-DPO's factor (past the pair's shared length: ld_alpha; the position
  among the row's valid tokens is a running cumsum) * TGDPO's ``1 +- alpha * r_t``. With LD-DPO a
  first loop counts both rows.
- ``_sums_backward_kernel``: one program per row spreads the row's two gradients (weighted sum,
  plain sum) over its tokens, writing the log-probs' dtype.
- ``_rewards_kernel``: RTO's token reward, one program per row: a first loop finds the last valid
  token (where the sequence reward goes), a second writes the rewards.

Layouts as kernels/advantages.py: padded rows with a row stride, or packed ``[total]`` with
cu_seqlens (row stride 0, T = 0). Compute type float32 (float64 with FP64: the hyper-parameters
are then read from a float64 buffer filled on the device, no host-to-device copy).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlkern.kernels._common import span

@triton.jit
def _valid(m_ptr, base, t, inside, HAS_MASK: tl.constexpr):
    if HAS_MASK:
        return (tl.load(m_ptr + base + t, mask=inside, other=0) != 0) & inside
    return inside


@triton.jit
def _count(m_ptr, m_stride, cu_ptr, row, T, HAS_MASK: tl.constexpr, PACKED: tl.constexpr, BLOCK: tl.constexpr):
    start, length = span(cu_ptr, row, T, PACKED)
    lane = tl.arange(0, BLOCK).to(tl.int64)
    n = tl.zeros((), dtype=tl.int64)
    for blk in range(0, tl.cdiv(length, BLOCK)):
        t = blk * BLOCK + lane
        inside = t < length
        n += tl.sum(_valid(m_ptr, start + row * m_stride, t, inside, HAS_MASK).to(tl.int64), axis=0)
    return n


@triton.jit
def _sums_kernel(
    lp_ptr,  # (2B, T) rows with stride lp_stride, or packed (total,); fp32/bf16/fp16/fp64
    m_ptr,  # like lp_ptr (m_stride), uint8 (bool) mask (HAS_MASK)
    ref_ptr,  # like lp_ptr (ref_stride), the reference's token log-probs (HAS_REF)
    adj_ptr,  # like lp_ptr (adj_stride), WPO's logsumexp(2 * log_softmax) per token (HAS_ADJ)
    tr_ptr,  # like lp_ptr (tr_stride), TGDPO's token rewards (HAS_TR)
    cu_ptr,  # (2B + 1,) int32 (PACKED)
    sum_ptr, raw_ptr, refsum_ptr, len_ptr,  # (2B,) fp32 (fp64 with FP64)
    wpo_ptr,  # (B,) fp32 (fp64 with FP64)
    par_ptr,  # (2,) fp64 ld_alpha, tgdpo_alpha (FP64)
    lp_stride, m_stride, ref_stride, adj_stride, tr_stride,  # row strides (0 when packed)
    T,  # padded length (0 when packed)
    B,  # pairs
    ld_alpha, tg_alpha,  # fp32 (unused with FP64)
    HAS_MASK: tl.constexpr, HAS_REF: tl.constexpr, HAS_ADJ: tl.constexpr, HAS_TR: tl.constexpr,
    LD: tl.constexpr, PACKED: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    acc = sum_ptr.dtype.element_ty
    if FP64:
        ld_alpha = tl.load(par_ptr)
        tg_alpha = tl.load(par_ptr + 1)
    pair = tl.program_id(0).to(tl.int64)
    lane = tl.arange(0, BLOCK).to(tl.int64)
    shared = tl.zeros((), dtype=tl.int64)
    if LD:
        n_c = _count(m_ptr, m_stride, cu_ptr, pair, T, HAS_MASK, PACKED, BLOCK)
        n_r = _count(m_ptr, m_stride, cu_ptr, pair + B, T, HAS_MASK, PACKED, BLOCK)
        shared = tl.minimum(n_c, n_r)
    wpo_log = tl.zeros((), dtype=acc)
    for side in tl.static_range(2):
        row = pair + side * B
        start, length = span(cu_ptr, row, T, PACKED)
        s = tl.zeros((), dtype=acc)
        sr = tl.zeros((), dtype=acc)
        sref = tl.zeros((), dtype=acc)
        saln = tl.zeros((), dtype=acc)
        pos = tl.zeros((), dtype=tl.int64)
        for blk in range(0, tl.cdiv(length, BLOCK)):
            t = blk * BLOCK + lane
            inside = t < length
            valid = _valid(m_ptr, start + row * m_stride, t, inside, HAS_MASK)
            x = tl.load(lp_ptr + start + row * lp_stride + t, mask=valid, other=0.0).to(acc)
            w = valid.to(acc)
            if LD:
                p = pos + tl.cumsum(valid.to(tl.int64), 0)
                w = tl.where(p > shared, w * ld_alpha, w)
            pos += tl.sum(valid.to(tl.int64), axis=0)
            if HAS_TR:
                r = tl.load(tr_ptr + start + row * tr_stride + t, mask=valid, other=0.0).to(acc)
                if side == 0:
                    w = w * (1.0 + tg_alpha * r)
                else:
                    w = w * (1.0 - tg_alpha * r)
            s += tl.sum(w * x, axis=0)
            sr += tl.sum(x, axis=0)
            if HAS_REF:
                y = tl.load(ref_ptr + start + row * ref_stride + t, mask=valid, other=0.0).to(acc)
                sref += tl.sum(w * y, axis=0)
            if HAS_ADJ:
                a = tl.load(adj_ptr + start + row * adj_stride + t, mask=valid, other=0.0).to(acc)
                saln += tl.sum(tl.where(valid, x - a, 0.0), axis=0)
        n = pos.to(acc)
        tl.store(sum_ptr + row, s)
        tl.store(raw_ptr + row, sr)
        tl.store(refsum_ptr + row, sref)
        tl.store(len_ptr + row, n)
        wpo_log += saln / tl.maximum(n, 1.0)
    # WPO: exp(mean aligned log-prob) of chosen times rejected, as one exp
    tl.store(wpo_ptr + pair, tl.exp(wpo_log))


@triton.jit
def _sums_backward_kernel(
    gs_ptr, gr_ptr, len_ptr,  # (2B,) fp32 (fp64 with FP64): d loss / d weighted sum, / d plain sum; counts
    m_ptr,  # like out (m_stride), uint8 (bool) mask (HAS_MASK)
    tr_ptr,  # like out (tr_stride), TGDPO's token rewards (HAS_TR)
    cu_ptr,  # (2B + 1,) int32 (PACKED)
    out_ptr,  # (2B, T) contiguous or packed (total,): the log-probs' dtype
    par_ptr,  # (2,) fp64 ld_alpha, tgdpo_alpha (FP64)
    m_stride, tr_stride, T, B, ld_alpha, tg_alpha,
    HAS_MASK: tl.constexpr, HAS_TR: tl.constexpr, LD: tl.constexpr, PACKED: tl.constexpr, FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    acc = gs_ptr.dtype.element_ty
    if FP64:
        ld_alpha = tl.load(par_ptr)
        tg_alpha = tl.load(par_ptr + 1)
    row = tl.program_id(0).to(tl.int64)
    other = tl.where(row < B, row + B, row - B)
    a = tl.load(gs_ptr + row)
    b = tl.load(gr_ptr + row)
    shared = tl.minimum(tl.load(len_ptr + row), tl.load(len_ptr + other))
    sign = tl.where(row < B, 1.0, -1.0).to(acc)
    start, length = span(cu_ptr, row, T, PACKED)
    lane = tl.arange(0, BLOCK).to(tl.int64)
    pos = tl.zeros((), dtype=tl.int64)
    for blk in range(0, tl.cdiv(length, BLOCK)):
        t = blk * BLOCK + lane
        inside = t < length
        valid = _valid(m_ptr, start + row * m_stride, t, inside, HAS_MASK)
        w = valid.to(acc)
        if LD:
            p = pos + tl.cumsum(valid.to(tl.int64), 0)
            w = tl.where(p.to(acc) > shared, w * ld_alpha, w)
            pos += tl.sum(valid.to(tl.int64), axis=0)
        if HAS_TR:
            r = tl.load(tr_ptr + start + row * tr_stride + t, mask=valid, other=0.0).to(acc)
            w = w * (1.0 + sign * tg_alpha * r)
        g = tl.where(valid, a * w + b, 0.0)
        tl.store(out_ptr + start + row * T + t, g.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _rewards_kernel(
    lp_ptr,  # (R, T) rows (lp_stride) or packed (total,); fp32/bf16/fp16/fp64: the DPO model's
    ref_ptr,  # like lp_ptr (ref_stride): the reference's
    old_ptr,  # like lp_ptr (old_stride): the policy's (HAS_OLD)
    m_ptr,  # like lp_ptr (m_stride), uint8 (bool) (HAS_MASK)
    seq_ptr,  # (R,) fp32 (fp64 with FP64) sequence rewards (HAS_SEQ)
    cu_ptr,  # (R + 1,) int32 (PACKED)
    out_ptr,  # (R, T) contiguous or packed (total,): fp32 (fp64 with FP64)
    par_ptr,  # (3,) fp64 beta, kl_coef, sequence_reward_coef (FP64)
    lp_stride, ref_stride, old_stride, m_stride, T,
    beta, kl_coef, seq_coef,  # fp32 (unused with FP64)
    HAS_OLD: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SEQ: tl.constexpr, PACKED: tl.constexpr,
    FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    acc = out_ptr.dtype.element_ty
    if FP64:
        beta = tl.load(par_ptr)
        kl_coef = tl.load(par_ptr + 1)
        seq_coef = tl.load(par_ptr + 2)
    row = tl.program_id(0).to(tl.int64)
    start, length = span(cu_ptr, row, T, PACKED)
    lane = tl.arange(0, BLOCK).to(tl.int64)
    last = tl.full((), -1, tl.int64)
    bonus = tl.zeros((), dtype=acc)
    if HAS_SEQ:
        for blk in range(0, tl.cdiv(length, BLOCK)):
            t = blk * BLOCK + lane
            inside = t < length
            valid = _valid(m_ptr, start + row * m_stride, t, inside, HAS_MASK)
            last = tl.maximum(last, tl.max(tl.where(valid, t, -1), axis=0))
        bonus = seq_coef * tl.load(seq_ptr + row).to(acc)
    for blk in range(0, tl.cdiv(length, BLOCK)):
        t = blk * BLOCK + lane
        inside = t < length
        valid = _valid(m_ptr, start + row * m_stride, t, inside, HAS_MASK)
        x = tl.load(lp_ptr + start + row * lp_stride + t, mask=valid, other=0.0).to(acc)
        y = tl.load(ref_ptr + start + row * ref_stride + t, mask=valid, other=0.0).to(acc)
        v = beta * (x - y)
        if HAS_OLD:
            o = tl.load(old_ptr + start + row * old_stride + t, mask=valid, other=0.0).to(acc)
            v = v - kl_coef * (o - y)
        if HAS_SEQ:
            v = tl.where(t == last, v + bonus, v)
        tl.store(out_ptr + start + row * T + t, tl.where(valid, v, 0.0), mask=inside)


def _u8(mask):
    return mask.view(torch.uint8) if mask is not None and mask.dtype == torch.bool else mask


def _params(fp64: bool, values, device):
    """The float64 hyper-parameter buffer, filled on the device (no host-to-device copy)."""
    if not fp64:
        return None
    out = torch.empty(len(values), dtype=torch.float64, device=device)
    for i, v in enumerate(values):
        out[i].fill_(float(v))
    return out


# One block size for both layouts: a row's tokens are then summed in the same order padded or
# packed (bitwise the same sums), and the packed launcher needs no longest-row length (a sync).
SUM_BLOCK = 512


def _geometry(logprobs, cu_seqlens):
    packed = cu_seqlens is not None
    rows = cu_seqlens.shape[0] - 1 if packed else logprobs.shape[0]
    steps = 0 if packed else logprobs.shape[1]
    return packed, rows, steps, SUM_BLOCK


def _stride(t, packed):
    return 0 if t is None or packed else t.stride(0)


def token_sums(logprobs, mask, ref, adj, rewards, cu_seqlens, ld_alpha, ld, tg_alpha):
    """cpp_preference_token_sums' contract: ``(sums, raw_sums, ref_sums, lengths [2B], wpo [B])``."""
    packed, rows, steps, block = _geometry(logprobs, cu_seqlens)
    fp64 = logprobs.dtype == torch.float64
    dtype = torch.float64 if fp64 else torch.float32
    outs = [torch.empty(rows, dtype=dtype, device=logprobs.device) for _ in range(4)]
    wpo = torch.empty(rows // 2, dtype=dtype, device=logprobs.device)
    if rows == 0:
        return (*outs, wpo)
    par = _params(fp64, (ld_alpha, tg_alpha), logprobs.device)
    m = _u8(mask)
    _sums_kernel[(rows // 2,)](
        logprobs, logprobs if m is None else m, logprobs if ref is None else ref, logprobs if adj is None else adj,
        logprobs if rewards is None else rewards, cu_seqlens if packed else logprobs, *outs, wpo,
        logprobs if par is None else par,
        _stride(logprobs, packed), _stride(m, packed), _stride(ref, packed), _stride(adj, packed),
        _stride(rewards, packed), steps, rows // 2, float(ld_alpha), float(tg_alpha),
        HAS_MASK=m is not None, HAS_REF=ref is not None, HAS_ADJ=adj is not None, HAS_TR=rewards is not None,
        LD=bool(ld), PACKED=packed, FP64=fp64, BLOCK=block)
    return (*outs, wpo)


def token_sums_backward(grad_sums, grad_raw, logprobs, mask, rewards, cu_seqlens, lengths, ld_alpha, ld, tg_alpha):
    """cpp_preference_token_sums_backward's contract: the gradient in the log-probs (their dtype)."""
    packed, rows, steps, block = _geometry(logprobs, cu_seqlens)
    fp64 = logprobs.dtype == torch.float64
    out = torch.empty(logprobs.shape, dtype=logprobs.dtype, device=logprobs.device)
    if logprobs.numel() == 0:
        return out
    par = _params(fp64, (ld_alpha, tg_alpha), logprobs.device)
    m = _u8(mask)
    _sums_backward_kernel[(rows,)](
        grad_sums.contiguous(), grad_raw.contiguous(), lengths.contiguous(), logprobs if m is None else m,
        logprobs if rewards is None else rewards, cu_seqlens if packed else logprobs, out,
        logprobs if par is None else par, _stride(m, packed), _stride(rewards, packed), steps, rows // 2,
        float(ld_alpha), float(tg_alpha),
        HAS_MASK=m is not None, HAS_TR=rewards is not None, LD=bool(ld), PACKED=packed, FP64=fp64, BLOCK=block)
    return out


def dpo_token_rewards(logprobs, ref, mask, old, seq, cu_seqlens, beta, kl_coef, seq_coef):
    """cpp_dpo_token_rewards' contract: the token rewards, fp32 (fp64 for fp64 log-probs)."""
    packed, rows, steps, block = _geometry(logprobs, cu_seqlens)
    fp64 = logprobs.dtype == torch.float64
    out = torch.empty(logprobs.shape, dtype=torch.float64 if fp64 else torch.float32, device=logprobs.device)
    if logprobs.numel() == 0:
        return out
    par = _params(fp64, (beta, kl_coef, seq_coef), logprobs.device)
    m = _u8(mask)
    _rewards_kernel[(rows,)](
        logprobs, ref, logprobs if old is None else old, logprobs if m is None else m, out if seq is None else seq,
        cu_seqlens if packed else logprobs, out, logprobs if par is None else par,
        _stride(logprobs, packed), _stride(ref, packed), _stride(old, packed), _stride(m, packed), steps,
        float(beta), float(kl_coef), float(seq_coef),
        HAS_OLD=old is not None, HAS_MASK=m is not None, HAS_SEQ=seq is not None, PACKED=packed, FP64=fp64,
        BLOCK=block)
    return out
