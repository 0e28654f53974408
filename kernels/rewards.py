"""Triton kernels of the reward family (the ops and formulas: rlkern/ops/rewards.py; oracle:
rlkern/reference/rewards.py).

``sample_rewards``: one program per block of samples, element-wise in float64 (DAPO's overlong
punishment, GiGPO's combined advantage). ``kl_rewards``: one program per row of ``[B, T]`` (or per
sequence of the packed layout, its bounds read from ``cu_seqlens``); a
first sweep over the row's tiles finds its last response token (the largest masked index), a
second writes ``-kl_coef * KL`` on the response tokens and adds the score on that last token.
``action_rewards``: UI-R1's rule-based reward, one program per block of samples.
Hyper-parameters come from a float64 device buffer: a float argument of a Triton kernel is
float32, which would round float64 calls' parameters.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlkern.kernels._common import span


@triton.jit
def _sample_kernel(
    a_ptr, b_ptr,  # (N,) fp32/fp64
    par_ptr,  # (3,) fp64: overlong: max_length, cache_length, factor; gigpo: weight
    out_ptr,  # (N,) a's dtype
    N,
    METHOD: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    inside = offs < N
    a = tl.load(a_ptr + offs, mask=inside, other=0.0).to(tl.float64)
    b = tl.load(b_ptr + offs, mask=inside, other=0.0).to(tl.float64)
    p0 = tl.load(par_ptr).to(tl.float64)
    if METHOD == 0:
        p1 = tl.load(par_ptr + 1).to(tl.float64)
        p2 = tl.load(par_ptr + 2).to(tl.float64)
        pen = -(b - (p0 - p1)) / p1
        pen = tl.maximum(tl.minimum(pen, 0.0), -1.0)
        value = a + p2 * pen
    else:
        value = a + p0 * b
    tl.store(out_ptr + offs, value.to(out_ptr.dtype.element_ty), mask=inside)


def sample_rewards(a: torch.Tensor, b: torch.Tensor, method: int, p0: float, p1: float, p2: float) -> torch.Tensor:
    out = torch.empty_like(a)
    n = a.numel()
    if n == 0:
        return out
    par = torch.tensor([p0, p1, p2], dtype=torch.float64, device=a.device)
    block = 1024
    _sample_kernel[(triton.cdiv(n, block),)](a, b, par, out, n, METHOD=method, BLOCK=block)
    return out


@triton.jit
def _kl_rewards_kernel(
    s_ptr,  # (B,) fp32/fp64
    lp_ptr, ref_ptr,  # (B, T) contiguous or packed (total,), s' dtype
    m_ptr,  # lp's shape, bool (as u8)
    cu_ptr,  # (B + 1,) int32 offsets (PACKED), else any pointer
    par_ptr,  # (4,) fp64: kl_coef, kl_clip (< 0: none), score low, score high
    out_ptr,  # lp's shape, s' dtype
    T,  # the padded width (not PACKED)
    EST: tl.constexpr, PACKED: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    start0, length = span(cu_ptr, row, T, PACKED)
    base = start0 + row * T  # T = 0 for the packed layout
    cols = tl.arange(0, BLOCK)
    last = tl.full((), -1, tl.int64)
    for start in range(0, length, BLOCK):
        idx = start + cols
        m = tl.load(m_ptr + base + idx, mask=idx < length, other=0) != 0
        last = tl.maximum(last, tl.max(tl.where(m, idx, -1), axis=0))
    coef = tl.load(par_ptr).to(tl.float64)
    clip = tl.load(par_ptr + 1).to(tl.float64)
    low = tl.load(par_ptr + 2).to(tl.float64)
    high = tl.load(par_ptr + 3).to(tl.float64)
    s = tl.load(s_ptr + row).to(tl.float64)
    s = tl.where(s != s, s, tl.minimum(tl.maximum(s, low), high))  # a NaN score stays NaN
    for start in range(0, length, BLOCK):
        idx = start + cols
        inside = idx < length
        m = tl.load(m_ptr + base + idx, mask=inside, other=0) != 0
        lp = tl.load(lp_ptr + base + idx, mask=inside, other=0.0).to(tl.float64)
        ref = tl.load(ref_ptr + base + idx, mask=inside, other=0.0).to(tl.float64)
        d = lp - ref
        if EST == 0:
            kl = d
        elif EST == 1:
            kl = tl.abs(d)
        elif EST == 2:
            kl = 0.5 * d * d
        else:
            # NaN-propagating clamps: a NaN log-prob gives a NaN reward (as the C++ kernel and the
            # reference), not a clamp bound (tl.minimum / tl.maximum drop NaN by default)
            k = tl.minimum(tl.maximum(-d, -20.0, propagate_nan=tl.PropagateNan.ALL), 20.0,
                           propagate_nan=tl.PropagateNan.ALL)
            kl = tl.minimum(tl.maximum(tl.exp(k) - k - 1.0, -10.0, propagate_nan=tl.PropagateNan.ALL), 10.0,
                            propagate_nan=tl.PropagateNan.ALL)
        clipped = tl.minimum(tl.maximum(kl, -clip, propagate_nan=tl.PropagateNan.ALL), clip,
                             propagate_nan=tl.PropagateNan.ALL)
        kl = tl.where(clip >= 0.0, clipped, kl)
        value = tl.where(m, -coef * kl, 0.0)
        value = tl.where(idx == last, value + s, value)
        tl.store(out_ptr + base + idx, value.to(out_ptr.dtype.element_ty), mask=inside)


def kl_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
               cu_seqlens: torch.Tensor | None, estimator: int, kl_coef: float, kl_clip: float, low: float,
               high: float) -> torch.Tensor:
    out = torch.empty_like(logprobs)
    batch = scores.shape[0]
    if batch == 0 or logprobs.numel() == 0:
        return out
    par = torch.tensor([kl_coef, kl_clip, low, high], dtype=torch.float64, device=logprobs.device)
    packed = cu_seqlens is not None
    width = logprobs.shape[1] if not packed else 0
    # packed: the tile is sized for a typical response; longer rows loop over several tiles
    block = 1024 if packed else min(1024, triton.next_power_of_2(width))
    _kl_rewards_kernel[(batch,)](scores, logprobs, ref_logprobs, mask.view(torch.uint8),
                                 cu_seqlens if packed else scores, par, out, width,
                                 EST=estimator, PACKED=packed, BLOCK=block)
    return out


@triton.jit
def _action_kernel(
    pt_ptr, tt_ptr,  # (N,) int64: predicted / true action types
    xy_ptr,  # (N, 2) fp32/fp64 predicted point
    box_ptr,  # (N, 4) xy's dtype: x1, y1, x2, y2
    f_ptr,  # (N,) xy's dtype: format reward
    out_ptr,  # (N,) xy's dtype
    N,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    inside = offs < N
    same = tl.load(pt_ptr + offs, mask=inside, other=0) == tl.load(tt_ptr + offs, mask=inside, other=1)
    x = tl.load(xy_ptr + 2 * offs, mask=inside, other=0.0).to(tl.float64)
    y = tl.load(xy_ptr + 2 * offs + 1, mask=inside, other=0.0).to(tl.float64)
    x1 = tl.load(box_ptr + 4 * offs, mask=inside, other=0.0).to(tl.float64)
    y1 = tl.load(box_ptr + 4 * offs + 1, mask=inside, other=0.0).to(tl.float64)
    x2 = tl.load(box_ptr + 4 * offs + 2, mask=inside, other=0.0).to(tl.float64)
    y2 = tl.load(box_ptr + 4 * offs + 3, mask=inside, other=0.0).to(tl.float64)
    hit = (x >= x1) & (x <= x2) & (y >= y1) & (y <= y2)  # NaN compares false: no coordinate reward
    f = tl.load(f_ptr + offs, mask=inside, other=0.0).to(tl.float64)
    value = same.to(tl.float64) + hit.to(tl.float64) + f
    tl.store(out_ptr + offs, value.to(out_ptr.dtype.element_ty), mask=inside)


def action_rewards(pred_types: torch.Tensor, true_types: torch.Tensor, points: torch.Tensor, boxes: torch.Tensor,
                   fmt: torch.Tensor) -> torch.Tensor:
    n = pred_types.numel()
    out = torch.empty(n, dtype=points.dtype, device=points.device)
    if n == 0:
        return out
    block = 1024
    _action_kernel[(triton.cdiv(n, block),)](pred_types, true_types, points, boxes, fmt, out, n, BLOCK=block)
    return out
