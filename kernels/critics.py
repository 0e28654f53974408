"""Triton kernels of the critic / value-based ops (rlkern/ops/critics.py; oracle
rlkern/reference/critics.py; CPU twin csrc/critics.cpp).

- ``_soft_bellman_kernel``: OREO's soft Bellman residuals, one program per row: a first loop
  counts the row's valid tokens (T_b), a second walks the blocks from the row's end, carrying the
  suffix sum of ``logprobs - ref_logprobs`` (a reverse block cumsum plus the carry), and writes the
  residual's scaled gradients ``2 e_t / T_b`` and ``(1 - exp(ref - logprobs)) / T_b`` and the
  row's ``sum e^2 / T_b`` and ``sum k3 / T_b``.
- ``_reward_norm_kernel``: PPO-max's running reward normalization, one program: float64 batch sums
  (two passes), Chan's merge with the running (count, mean, M2), then the normalized, clipped
  rewards.
- ``_calibrate_kernel`` / ``_select_kernel``: CGPO's calibrated, judge-gated reward (elementwise,
  a loop over the judges), then each group's chosen / rejected sample by a pairwise tile loop
  (deterministic, no atomics).
- ``_step_loss_kernel``: Direct Advantage Policy Optimization's step loss, one program per row:
  last valid token and step count; a segmented associative scan of the log-ratios writing each
  step's gradient at its end token; a reverse min-scan copying it to the step's tokens.

Layouts: padded contiguous ``[R, T]`` (row r at r * T) or packed ``[total]`` with cu_seqlens.
Compute type float32 (float64 with FP64: the hyper-parameters are then read from a float64 buffer
filled on the device, no host-to-device copy).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlkern.kernels._common import nan_max, nan_min, span

BLOCK = 256


@triton.jit
def _row_prologue(par_ptr, beta, cu_ptr, T, PACKED: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr):
    """The per-row kernels' common start (``_soft_bellman_kernel``, ``_step_loss_kernel``): beta
    (read from the float64 buffer with FP64), the program's row, its flat start and length, the
    block's lanes and the number of blocks."""
    if FP64:
        beta = tl.load(par_ptr)
    row = tl.program_id(0).to(tl.int64)
    start, length = span(cu_ptr, row, T.to(tl.int64), PACKED)
    start += row * T  # padded rows are flat here (T = 0 when packed)
    lane = tl.arange(0, BLOCK).to(tl.int64)
    return beta, row, start, length, lane, tl.cdiv(length, BLOCK)


@triton.jit
def _soft_bellman_kernel(
    lp_ptr, ref_ptr, v_ptr,  # (R, T) contiguous or packed (total,); one dtype: fp32/bf16/fp16/fp64
    m_ptr,  # like lp_ptr, uint8 (bool) mask (HAS_MASK)
    rew_ptr,  # (R,) fp32 (fp64 with FP64): the sequence rewards
    cu_ptr,  # (R + 1,) int32 (PACKED)
    sq_ptr, kl_ptr, len_ptr,  # (R,) fp32 (fp64 with FP64)
    gv_ptr, gk_ptr,  # like lp_ptr, fp32 (fp64 with FP64)
    par_ptr,  # (1,) fp64 beta (FP64)
    T,  # padded length (0 when packed), int64
    beta,  # fp32 (unused with FP64)
    HAS_MASK: tl.constexpr, PACKED: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    acc = gv_ptr.dtype.element_ty
    beta, row, start, length, lane, nblk = _row_prologue(par_ptr, beta, cu_ptr, T, PACKED, FP64, BLOCK)
    count = tl.zeros((), dtype=tl.int64)
    if HAS_MASK:
        for blk in range(0, nblk):
            t = blk * BLOCK + lane
            inside = t < length
            count += tl.sum((tl.load(m_ptr + start + t, mask=inside, other=0) != 0).to(tl.int64), axis=0)
    else:
        count = length
    inv = tl.where(count > 0, 1.0 / tl.maximum(count, 1).to(acc), 0.0).to(acc)
    reward = tl.load(rew_ptr + row).to(acc)
    carry = tl.zeros((), dtype=acc)
    sq = tl.zeros((), dtype=tl.float64)
    kl = tl.zeros((), dtype=tl.float64)
    for i in range(0, nblk):
        t = (nblk - 1 - i) * BLOCK + lane
        inside = t < length
        valid = inside
        if HAS_MASK:
            valid = (tl.load(m_ptr + start + t, mask=inside, other=0) != 0) & inside
        # a select, not a product: masked tokens' values (garbage, NaN) never reach a sum
        a = tl.where(valid, tl.load(lp_ptr + start + t, mask=valid, other=0.0).to(acc), 0.0)
        b = tl.where(valid, tl.load(ref_ptr + start + t, mask=valid, other=0.0).to(acc), 0.0)
        v = tl.where(valid, tl.load(v_ptr + start + t, mask=valid, other=0.0).to(acc), 0.0)
        x = a - b
        suffix = tl.cumsum(x, 0, reverse=True) + carry
        carry += tl.sum(x, axis=0)
        e = v - reward + beta * suffix
        d = b - a
        ed = tl.exp(d)
        gv = tl.where(valid, 2.0 * e * inv, 0.0)
        gk = tl.where(valid, (1.0 - ed) * inv, 0.0)
        tl.store(gv_ptr + start + t, gv.to(acc), mask=inside)
        tl.store(gk_ptr + start + t, gk.to(acc), mask=inside)
        sq += tl.sum(tl.where(valid, e * e, 0.0).to(tl.float64), axis=0)
        kl += tl.sum(tl.where(valid, ed - d - 1.0, 0.0).to(tl.float64), axis=0)
    tl.store(sq_ptr + row, (sq * inv.to(tl.float64)).to(acc))
    tl.store(kl_ptr + row, (kl * inv.to(tl.float64)).to(acc))
    tl.store(len_ptr + row, count.to(acc))


def _params(fp64: bool, values, device):
    """The float64 hyper-parameter buffer, filled on the device (no host-to-device copy)."""
    if not fp64:
        return None
    out = torch.empty(len(values), dtype=torch.float64, device=device)
    for i, v in enumerate(values):
        out[i].fill_(float(v))
    return out


def _row_layout(logprobs, cu_seqlens):
    """The per-row launchers' layout (``soft_bellman``, ``step_advantage_loss``): packed, rows, the
    padded length (0 when packed), fp64, the compute dtype and three empty ``[rows]`` statistics."""
    packed = cu_seqlens is not None
    rows = cu_seqlens.shape[0] - 1 if packed else logprobs.shape[0]
    steps = 0 if packed else logprobs.shape[1]
    fp64 = logprobs.dtype == torch.float64
    dtype = torch.float64 if fp64 else torch.float32
    stats = tuple(torch.empty(rows, dtype=dtype, device=logprobs.device) for _ in range(3))
    return packed, rows, steps, fp64, dtype, stats


def soft_bellman(logprobs, ref, values, mask, rewards, cu_seqlens, beta):
    """cpp_soft_bellman's contract: ``(sq [R], kl [R], lengths [R], grad_v, grad_k)``."""
    packed, rows, steps, fp64, dtype, (sq, kl, lengths) = _row_layout(logprobs, cu_seqlens)
    dev = logprobs.device
    gv = torch.empty(logprobs.shape, dtype=dtype, device=dev)
    gk = torch.empty(logprobs.shape, dtype=dtype, device=dev)
    if rows == 0:
        return sq, kl, lengths, gv, gk
    par = _params(fp64, (beta,), dev)
    m = mask.view(torch.uint8) if mask is not None else None
    _soft_bellman_kernel[(rows,)](
        logprobs, ref, values, logprobs if m is None else m, rewards, cu_seqlens if packed else logprobs,
        sq, kl, lengths, gv, gk, logprobs if par is None else par, steps, float(beta),
        HAS_MASK=m is not None, PACKED=packed, FP64=fp64, BLOCK=BLOCK)
    return sq, kl, lengths, gv, gk


@triton.jit
def _reward_norm_kernel(
    r_ptr,  # (B,) fp32/bf16/fp16/fp64: the batch's rewards
    stats_ptr,  # (3,) fp64: running count, mean, M2
    out_ptr,  # (B,) fp32 (fp64 for fp64 rewards)
    next_ptr,  # (3,) fp64: the merged statistics
    par_ptr,  # (2,) fp64: clip, eps
    B,  # int64
    BLOCK: tl.constexpr,
):
    clip = tl.load(par_ptr)
    eps = tl.load(par_ptr + 1)
    lane = tl.arange(0, BLOCK).to(tl.int64)
    n = tl.load(stats_ptr)
    mean = tl.load(stats_ptr + 1)
    m2 = tl.load(stats_ptr + 2)
    total_b = B.to(tl.int64)
    s = tl.zeros((), dtype=tl.float64)
    for blk in range(0, tl.cdiv(total_b, BLOCK)):
        i = blk * BLOCK + lane
        s += tl.sum(tl.load(r_ptr + i, mask=i < total_b, other=0.0).to(tl.float64), axis=0)
    m = total_b.to(tl.float64)
    bmean = s / tl.maximum(m, 1.0)
    bm2 = tl.zeros((), dtype=tl.float64)
    for blk in range(0, tl.cdiv(total_b, BLOCK)):
        i = blk * BLOCK + lane
        d = tl.where(i < total_b, tl.load(r_ptr + i, mask=i < total_b, other=0.0).to(tl.float64) - bmean, 0.0)
        bm2 += tl.sum(d * d, axis=0)
    # Chan et al.'s parallel merge of (n, mean, M2) with the batch's (m, bmean, bm2); an empty
    # batch leaves the statistics as they are
    total = n + m
    delta = bmean - mean
    has = m > 0
    mean = tl.where(has, mean + delta * m / tl.where(has, total, 1.0), mean)
    m2 = tl.where(has, m2 + bm2 + delta * delta * n * m / tl.where(has, total, 1.0), m2)
    n = total
    std = tl.where(n > 0, tl.sqrt(m2 / tl.where(n > 0, n, 1.0)), 0.0)
    scale = 1.0 / (std + eps)
    for blk in range(0, tl.cdiv(total_b, BLOCK)):
        i = blk * BLOCK + lane
        x = (tl.load(r_ptr + i, mask=i < total_b, other=0.0).to(tl.float64) - mean) * scale
        x = nan_min(nan_max(x, -clip), clip)
        tl.store(out_ptr + i, x.to(out_ptr.dtype.element_ty), mask=i < total_b)
    tl.store(next_ptr, n)
    tl.store(next_ptr + 1, mean)
    tl.store(next_ptr + 2, m2)


def running_reward_norm(rewards, stats, clip, eps):
    """cpp_running_reward_norm's contract: ``(normalized [B], next_stats [3] fp64)``."""
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    out = torch.empty(rewards.shape, dtype=dtype, device=rewards.device)
    nxt = torch.empty(3, dtype=torch.float64, device=rewards.device)
    par = _params(True, (clip, eps), rewards.device)
    _reward_norm_kernel[(1,)](rewards, stats, out, nxt, par, rewards.numel(), BLOCK=1024)
    return out, nxt


@triton.jit
def _calibrate_kernel(
    r_ptr,  # (B,) fp32/bf16/fp16/fp64 rewards
    base_ptr,  # (B,) like r_ptr: baseline rewards (HAS_BASE)
    j_ptr,  # (B, J) uint8 (bool) judges, contiguous
    c_ptr,  # (B,) fp32 (fp64 with FP64): calibrated reward
    sat_ptr,  # (B,) uint8: every judge passes
    out_ptr,  # (B,) like c_ptr: CRPG's reward
    B, J,
    HAS_BASE: tl.constexpr, BLOCK: tl.constexpr, JBLOCK: tl.constexpr,
):
    acc = c_ptr.dtype.element_ty
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    inside = i < B
    x = tl.load(r_ptr + i, mask=inside, other=0.0).to(acc)
    if HAS_BASE:
        b = tl.load(base_ptr + i, mask=inside, other=0.0).to(acc)
        x = 1.0 / (1.0 + tl.exp(b - x))
    ok = tl.full((BLOCK,), 1, dtype=tl.int32)
    jj = tl.arange(0, JBLOCK).to(tl.int64)
    for k in range(0, tl.cdiv(J, JBLOCK)):
        col = k * JBLOCK + jj
        tile = tl.load(j_ptr + i[:, None] * J + col[None, :], mask=inside[:, None] & (col[None, :] < J), other=1)
        ok = ok & (tl.min((tile != 0).to(tl.int32), axis=1))
    tl.store(c_ptr + i, x, mask=inside)
    tl.store(sat_ptr + i, ok.to(tl.uint8), mask=inside)
    tl.store(out_ptr + i, tl.where(ok != 0, x, 0.0).to(acc), mask=inside)


@triton.jit
def _select_kernel(
    c_ptr,  # (B,) fp32/fp64 calibrated rewards
    sat_ptr,  # (B,) uint8
    g_ptr,  # (B,) int64 dense group ids
    chosen_ptr, rejected_ptr,  # (B,) uint8 (bool outputs)
    B,
    BI: tl.constexpr, BJ: tl.constexpr,
):
    # Sample i is its group's chosen (rejected) one when no other sample of the group on the same
    # side of the judges beats it: a higher (lower) c, or an equal c at a lower index -- pairwise,
    # O(B^2 / (BI BJ)) tiles, deterministic, no atomics.
    i = tl.program_id(0).to(tl.int64) * BI + tl.arange(0, BI).to(tl.int64)
    inside = i < B
    ci = tl.load(c_ptr + i, mask=inside, other=0.0)
    si = tl.load(sat_ptr + i, mask=inside, other=0) != 0
    gi = tl.load(g_ptr + i, mask=inside, other=-1)
    beaten = tl.zeros((BI,), dtype=tl.int32)
    jl = tl.arange(0, BJ).to(tl.int64)
    for k in range(0, tl.cdiv(B, BJ)):
        j = k * BJ + jl
        jin = j < B
        cj = tl.load(c_ptr + j, mask=jin, other=0.0)
        sj = tl.load(sat_ptr + j, mask=jin, other=0) != 0
        gj = tl.load(g_ptr + j, mask=jin, other=-2)
        same = (gi[:, None] == gj[None, :]) & (si[:, None] == sj[None, :]) & jin[None, :]
        better = tl.where(si[:, None], cj[None, :] > ci[:, None], cj[None, :] < ci[:, None])
        tie = (cj[None, :] == ci[:, None]) & (j[None, :] < i[:, None])
        beaten = beaten | tl.max((same & (better | tie)).to(tl.int32), axis=1)
    top = beaten == 0
    tl.store(chosen_ptr + i, (top & si).to(tl.uint8), mask=inside)
    tl.store(rejected_ptr + i, (top & (si == 0)).to(tl.uint8), mask=inside)


def constrained_rewards(rewards, groups, judges, baseline):
    """cpp_constrained_rewards' contract: ``(crpg_rewards [B], chosen [B] bool, rejected [B] bool)``."""
    n = rewards.shape[0]
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    dev = rewards.device
    out = torch.empty(n, dtype=dtype, device=dev)
    chosen = torch.empty(n, dtype=torch.bool, device=dev)
    rejected = torch.empty(n, dtype=torch.bool, device=dev)
    if n == 0:
        return out, chosen, rejected
    c = torch.empty(n, dtype=dtype, device=dev)
    sat = torch.empty(n, dtype=torch.uint8, device=dev)
    J = judges.shape[1]
    _calibrate_kernel[(triton.cdiv(n, 128),)](
        rewards, rewards if baseline is None else baseline, judges.view(torch.uint8), c, sat, out, n, J,
        HAS_BASE=baseline is not None, BLOCK=128, JBLOCK=16)
    _select_kernel[(triton.cdiv(n, 64),)](c, sat, groups, chosen.view(torch.uint8), rejected.view(torch.uint8), n,
                                          BI=64, BJ=64)
    return out, chosen, rejected


@triton.jit
def _seg_add(av, af, bv, bf):
    # segmented sum: a flag starts a new segment (the combine of a segmented scan)
    return tl.where(bf != 0, bv, av + bv), af | bf


@triton.jit
def _min_i64(a, b):
    return tl.minimum(a, b)


@triton.jit
def _step_loss_kernel(
    lp_ptr, ref_ptr, adv_ptr,  # (R, T) contiguous or packed (total,); one dtype: fp32/bf16/fp16/fp64
    e_ptr,  # like lp_ptr, uint8 (bool): step_ends
    m_ptr,  # like lp_ptr, uint8 (bool) mask (HAS_MASK)
    cu_ptr,  # (R + 1,) int32 (PACKED)
    sq_ptr, ratio_ptr, steps_ptr,  # (R,) fp32 (fp64 with FP64)
    g_ptr,  # like lp_ptr, fp32 (fp64 with FP64): the gradient of each row's term
    par_ptr,  # (1,) fp64 beta (FP64)
    T,  # padded length (0 when packed)
    beta,  # fp32 (unused with FP64)
    HAS_MASK: tl.constexpr, PACKED: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    acc = g_ptr.dtype.element_ty
    beta, row, start, length, lane, nblk = _row_prologue(par_ptr, beta, cu_ptr, T, PACKED, FP64, BLOCK)
    # pass 0: the last valid token and the number of step ends among valid tokens
    last = tl.full((), -1, dtype=tl.int64)
    n_ends = tl.zeros((), dtype=tl.int64)
    for blk in range(0, nblk):
        t = blk * BLOCK + lane
        inside = t < length
        valid = inside
        if HAS_MASK:
            valid = (tl.load(m_ptr + start + t, mask=inside, other=0) != 0) & inside
        end = (tl.load(e_ptr + start + t, mask=valid, other=0) != 0) & valid
        last = tl.maximum(last, tl.max(tl.where(valid, t, -1), axis=0))
        n_ends += tl.sum(end.to(tl.int64), axis=0)
    last_end = tl.load(e_ptr + start + tl.maximum(last, 0), mask=last >= 0, other=1) != 0
    count = n_ends + tl.where(last_end, 0, 1)
    inv = tl.where(count > 0, 1.0 / tl.maximum(count, 1).to(acc), 0.0).to(acc)
    # pass 1: segmented prefix sums of the log-ratio; each step's g_k at its end token
    carry = tl.zeros((), dtype=acc)
    sq = tl.zeros((), dtype=tl.float64)
    ratio = tl.zeros((), dtype=tl.float64)
    for blk in range(0, nblk):
        t = blk * BLOCK + lane
        inside = t <= last
        valid = inside
        if HAS_MASK:
            valid = (tl.load(m_ptr + start + t, mask=inside, other=0) != 0) & inside
        is_end = (((tl.load(e_ptr + start + t, mask=valid, other=0) != 0) | (t == last)) & valid)
        prev = t - 1
        prev_ok = (prev >= 0) & (prev <= last)
        prev_valid = prev_ok
        if HAS_MASK:
            prev_valid = (tl.load(m_ptr + start + prev, mask=prev_ok, other=0) != 0) & prev_ok
        starts = (tl.load(e_ptr + start + prev, mask=prev_valid, other=0) != 0) & prev_valid
        # a select, not a product: masked tokens' values never reach a sum
        a = tl.where(valid, tl.load(lp_ptr + start + t, mask=valid, other=0.0).to(acc), 0.0)
        b = tl.where(valid, tl.load(ref_ptr + start + t, mask=valid, other=0.0).to(acc), 0.0)
        seg, seen = tl.associative_scan((a - b, starts.to(tl.int32)), 0, _seg_add)
        ps = tl.where(seen != 0, seg, seg + carry)
        carry = tl.sum(tl.where(lane == BLOCK - 1, ps, 0.0), axis=0)
        adv = tl.load(adv_ptr + start + t, mask=is_end, other=0.0).to(acc)
        e = beta * ps - adv
        tl.store(g_ptr + start + t, (2.0 * beta * e * inv).to(acc), mask=is_end)
        sq += tl.sum(tl.where(is_end, e * e, 0.0).to(tl.float64), axis=0)
        ratio += tl.sum(tl.where(is_end, beta * ps, 0.0).to(tl.float64), axis=0)
    # pass 2 (reverse): every valid token takes the g of the first step end at or after it (end
    # tokens keep theirs: the blocks already rewritten are read back unchanged)
    big = length + BLOCK
    nxt = big + tl.zeros((), dtype=tl.int64)
    for i in range(0, nblk):
        t = (nblk - 1 - i) * BLOCK + lane
        inside = t < length
        valid = inside & (t <= last)
        if HAS_MASK:
            valid = (tl.load(m_ptr + start + t, mask=inside, other=0) != 0) & valid
        is_end = (((tl.load(e_ptr + start + t, mask=valid, other=0) != 0) | (t == last)) & valid)
        idx = tl.minimum(tl.associative_scan(tl.where(is_end, t, big), 0, _min_i64, reverse=True), nxt)
        nxt = tl.minimum(nxt, tl.min(tl.where(is_end, t, big), axis=0))
        g = tl.load(g_ptr + start + tl.minimum(idx, length - 1), mask=valid & (idx < big), other=0.0)
        tl.store(g_ptr + start + t, tl.where(valid, g, 0.0).to(acc), mask=inside)
    tl.store(sq_ptr + row, (sq * inv.to(tl.float64)).to(acc))
    tl.store(ratio_ptr + row, (ratio * inv.to(tl.float64)).to(acc))
    tl.store(steps_ptr + row, count.to(acc))


def step_advantage_loss(logprobs, ref, adv, ends, mask, cu_seqlens, beta):
    """cpp_step_advantage_loss' contract: ``(sq [R], ratio [R], steps [R], grad)``."""
    packed, rows, steps_t, fp64, dtype, (sq, ratio, steps) = _row_layout(logprobs, cu_seqlens)
    dev = logprobs.device
    grad = torch.empty(logprobs.shape, dtype=dtype, device=dev)
    if rows == 0:
        return sq, ratio, steps, grad
    par = _params(fp64, (beta,), dev)
    m = mask.view(torch.uint8) if mask is not None else None
    _step_loss_kernel[(rows,)](
        logprobs, ref, adv, ends.view(torch.uint8), logprobs if m is None else m, cu_seqlens if packed else logprobs,
        sq, ratio, steps, grad, logprobs if par is None else par, steps_t, float(beta),
        HAS_MASK=m is not None, PACKED=packed, FP64=fp64, BLOCK=BLOCK)
    return sq, ratio, steps, grad
