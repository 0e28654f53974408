"""Triton kernels of DAPO's dynamic-sampling filter (rlkern/ops/advantages/dynamic_sampling.py).

Three launches over the N samples, no host sync: (1) every sample stores its score as its
group's representative (concurrent stores of the same group leave one member's value, which is
all the test needs) and counts its group; (2) a sample whose score differs from the
representative (or is NaN) marks its group as varying; (3) keep = group of one or varying.
Scores are compared in float32 (float64 for float64 scores): widening is exact, so equality is
that of the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _represent_kernel(x_ptr, idx_ptr, rep_ptr, count_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    g = tl.load(idx_ptr + offs, mask=inside, other=0)
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(rep_ptr.dtype.element_ty)
    tl.store(rep_ptr + g, x, mask=inside)
    tl.atomic_add(count_ptr + g, tl.full([BLOCK], 1, tl.int32), mask=inside)


@triton.jit
def _differ_kernel(x_ptr, idx_ptr, rep_ptr, varies_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    g = tl.load(idx_ptr + offs, mask=inside, other=0)
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(rep_ptr.dtype.element_ty)
    rep = tl.load(rep_ptr + g, mask=inside, other=0.0)
    differs = (x != rep) | (x != x)  # x != x: NaN (a NaN representative makes every x differ)
    tl.atomic_max(varies_ptr + g, tl.full([BLOCK], 1, tl.int32), mask=inside & differs)


@triton.jit
def _keep_kernel(idx_ptr, count_ptr, varies_ptr, keep_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    g = tl.load(idx_ptr + offs, mask=inside, other=0)
    count = tl.load(count_ptr + g, mask=inside, other=0)
    varies = tl.load(varies_ptr + g, mask=inside, other=0)
    tl.store(keep_ptr + offs, ((count <= 1) | (varies > 0)).to(tl.int8), mask=inside)


def dynamic_sampling_mask(scores: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """scores ``[N]`` float, inverse ``[N]`` int64 dense group numbers in [0, N) -> keep ``[N]`` bool."""
    n = scores.numel()
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    keep = torch.empty(n, dtype=torch.int8, device=scores.device)
    if n == 0:
        return keep.bool()
    x, idx = scores.contiguous(), inverse.contiguous()
    rep = torch.empty(n, dtype=dtype, device=scores.device)
    count = torch.zeros(n, dtype=torch.int32, device=scores.device)
    varies = torch.zeros(n, dtype=torch.int32, device=scores.device)
    block = 1024
    grid = (triton.cdiv(n, block),)
    _represent_kernel[grid](x, idx, rep, count, n, BLOCK=block)
    _differ_kernel[grid](x, idx, rep, varies, n, BLOCK=block)
    _keep_kernel[grid](idx, count, varies, keep, n, BLOCK=block)
    return keep.bool()  # int8 -> bool (Triton stores bool tensors through int8 pointers)
