"""Triton kernels of the SPO-chain ops on packed token sequences: cut points, segment advantages
with the probability mask, and the spread of per-node values over packed tokens.

The ops and their semantics are in rlkern/ops/segments.py, the oracle in
rlkern/reference/trees.py, the CPU twin in csrc/segments.cpp.

Grid: one program per sequence (cut points, segment advantages) or per segment (broadcast); each
walks its range in blocks of BLOCK tokens, carrying a scalar from block to block:

- cut points: the number of low-probability tokens before the block; an inclusive ``tl.cumsum``
  of the block's low flags gives each token's rank, and every ``interval``-th one cuts;
- segment advantages: two walks over the same blocks. Right to left, the first segment start
  strictly after each token (a reverse min-scan of the starts at t + 1, read one token ahead,
  and the carried first start after the block); its value, or the final reward when there is
  none, goes to the output. Left to right, the last start at or before each token (a max-scan
  and the carried last start): A = (the value stored) - V(that start), 0 before the first
  start; then the probability mask. Both walks cut the sequence into the same blocks, and a
  barrier separates them (the second reads what other threads of the program wrote).

Compute type: float64 for float64 input (the threshold then comes from a float64 buffer, as a
float argument of a Triton kernel is float32), float32 otherwise; outputs float32 (float64 for
float64 input). Bool tensors are read and written as their uint8 bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlkern.kernels._common import exp_, f32

# Largest block; the tests lower it to run many blocks (the carried state) at small sizes.
MAX_BLOCK = 1024


def _block(mean_length: int) -> int:
    return max(16, min(MAX_BLOCK, triton.next_power_of_2(max(mean_length, 1))))


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _min(a, b):
    return tl.minimum(a, b)


@triton.jit
def _spo_cutpoints_kernel(
    lp_ptr,  # (T,) fp32/bf16/fp16/fp64 packed log-probs
    cu_ptr,  # (B + 1,) int64 sequence offsets
    thr_ptr,  # (1,) fp64 threshold (FP64)
    out_ptr,  # (T,) uint8: 1 where a segment opens
    threshold,  # fp32 (unused with FP64)
    interval,  # int, >= 1
    FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    begin = tl.load(cu_ptr + row).to(tl.int64)
    end = tl.load(cu_ptr + row + 1).to(tl.int64)
    if FP64:
        thr = tl.load(thr_ptr)
    else:
        thr = threshold
    lane = tl.arange(0, BLOCK).to(tl.int64)
    before = tl.zeros((), dtype=tl.int64)  # low-probability tokens of the sequence before the block
    for first in range(begin, end, BLOCK):
        t = first + lane
        inside = t < end
        if FP64:
            lp = tl.load(lp_ptr + t, mask=inside, other=0.0).to(tl.float64)
        else:
            lp = tl.load(lp_ptr + t, mask=inside, other=0.0).to(tl.float32)
        low = (exp_(lp) < thr) & inside
        count = low.to(tl.int64)
        rank = before + tl.cumsum(count, 0) - count
        cut = low & (rank % interval == 0)
        tl.store(out_ptr + t, cut.to(tl.uint8), mask=inside)
        before += tl.sum(count, 0)


@triton.jit
def _segment_advantages_kernel(
    start_ptr,  # (T,) uint8: 1 where a segment opens
    cut_ptr,  # (T,) fp32/bf16/fp16/fp64 value of the state before each start
    reward_ptr,  # (B,) fp32 (fp64 with FP64) final reward of each sequence
    cu_ptr,  # (B + 1,) int64 sequence offsets
    lp_ptr,  # (T,) fp32/bf16/fp16/fp64 rollout log-probs (HAS_LP)
    thr_ptr,  # (1,) fp64 threshold (FP64)
    adv_ptr,  # (T,) fp32 (fp64 with FP64); first the next segment's value, then the advantage
    mask_ptr,  # (T,) uint8 loss mask
    threshold,  # fp32 (unused with FP64)
    HAS_LP: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    acc = adv_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    begin = tl.load(cu_ptr + row).to(tl.int64)
    end = tl.load(cu_ptr + row + 1).to(tl.int64)
    reward = tl.load(reward_ptr + row)
    lane = tl.arange(0, BLOCK).to(tl.int64)
    n_blocks = tl.cdiv(end - begin, BLOCK)
    # Right to left: the value of the first start strictly after each token.
    after = end  # the first start after the block (end: none)
    for j in range(0, n_blocks):
        t = begin + (n_blocks - 1 - j) * BLOCK + lane
        inside = t < end
        ahead = t + 1
        opens = tl.load(start_ptr + ahead, mask=ahead < end, other=0) != 0
        candidate = tl.where(opens, ahead, end)
        nxt = tl.minimum(tl.associative_scan(candidate, 0, _min, reverse=True), after)
        has_next = nxt < end
        v_next = tl.load(cut_ptr + nxt, mask=inside & has_next, other=0.0).to(acc)
        tl.store(adv_ptr + t, tl.where(has_next, v_next, reward), mask=inside)
        after = tl.minimum(after, tl.min(candidate, 0))
    tl.debug_barrier()
    if FP64:
        thr = tl.load(thr_ptr)
    else:
        thr = threshold
    # Left to right: the last start at or before each token.
    last = begin - 1  # the last start before the block (begin - 1: none)
    for j in range(0, n_blocks):
        t = begin + j * BLOCK + lane
        inside = t < end
        opens = tl.load(start_ptr + t, mask=inside, other=0) != 0
        candidate = tl.where(opens, t, begin - 1)
        prev = tl.maximum(tl.associative_scan(candidate, 0, _max), last)
        has_prev = prev >= begin
        v_prev = tl.load(cut_ptr + prev, mask=inside & has_prev, other=0.0).to(acc)
        v_next = tl.load(adv_ptr + t, mask=inside, other=0.0)
        adv = tl.where(has_prev, v_next - v_prev, 0.0)
        if HAS_LP:
            keep = exp_(tl.load(lp_ptr + t, mask=inside, other=0.0).to(acc)) < thr
            adv = tl.where(keep, adv, 0.0)
        else:
            keep = inside
        tl.store(adv_ptr + t, adv.to(acc), mask=inside)
        tl.store(mask_ptr + t, keep.to(tl.uint8), mask=inside)
        last = tl.maximum(last, tl.max(candidate, 0))


@triton.jit
def _broadcast_kernel(
    values_ptr,  # (M,) fp32/bf16/fp16/fp64 node values
    start_ptr,  # (S,) int64 first token of each segment
    end_ptr,  # (S,) int64 end (exclusive) of each segment
    index_ptr,  # (S,) int64 node of each segment (HAS_INDEX; else segment k is node k)
    out_ptr,  # (num_tokens,) fp32 (fp64 for fp64 values), filled before the launch
    HAS_INDEX: tl.constexpr,
    BLOCK: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    first = tl.load(start_ptr + k)
    stop = tl.load(end_ptr + k)
    if HAS_INDEX:
        node = tl.load(index_ptr + k)
    else:
        node = k
    value = tl.load(values_ptr + node).to(out_ptr.dtype.element_ty)
    lane = tl.arange(0, BLOCK).to(tl.int64)
    for offset in range(first, stop, BLOCK):
        t = offset + lane
        tl.store(out_ptr + t, tl.zeros((BLOCK,), dtype=out_ptr.dtype.element_ty) + value, mask=t < stop)


def _threshold(threshold: float, fp64: bool, device) -> torch.Tensor | None:
    # float64: from a buffer filled on the device (no host-to-device copy, no sync)
    return torch.full((1,), float(threshold), dtype=torch.float64, device=device) if fp64 else None


def _bytes(mask: torch.Tensor) -> torch.Tensor:
    return mask.view(torch.uint8)


def spo_cutpoints(
    logprobs: torch.Tensor,  # (T,) fp32/bf16/fp16/fp64, contiguous
    cu_seqlens: torch.Tensor,  # (B + 1,) int32/int64
    threshold: float,
    interval: int,
) -> torch.Tensor:
    """``[T]`` bool, True where a segment opens (rlkern.ops.segments.spo_cutpoints)."""
    total = logprobs.numel()
    out = torch.empty(total, dtype=torch.bool, device=logprobs.device)
    batch = cu_seqlens.numel() - 1
    if total == 0 or batch == 0:
        return out
    fp64 = logprobs.dtype == torch.float64
    thr = _threshold(threshold, fp64, logprobs.device)
    _spo_cutpoints_kernel[(batch,)](
        logprobs, cu_seqlens.to(torch.int64), logprobs if thr is None else thr, _bytes(out),
        f32(float(threshold)), int(interval), FP64=fp64, BLOCK=_block(total // batch),
    )
    return out


def segment_advantages(
    segment_start: torch.Tensor,  # (T,) bool, contiguous
    cut_values: torch.Tensor,  # (T,) fp32/bf16/fp16/fp64, contiguous
    final_reward: torch.Tensor,  # (B,) float
    cu_seqlens: torch.Tensor,  # (B + 1,) int32/int64
    logprobs: torch.Tensor | None,  # (T,) float, contiguous
    threshold: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(advantages [T], loss_mask [T] bool)`` (rlkern.ops.segments.segment_advantages)."""
    total = segment_start.numel()
    fp64 = cut_values.dtype == torch.float64
    dtype = torch.float64 if fp64 else torch.float32
    device = cut_values.device
    adv = torch.empty(total, dtype=dtype, device=device)
    mask = torch.empty(total, dtype=torch.bool, device=device)
    batch = cu_seqlens.numel() - 1
    if total == 0 or batch == 0:
        return adv, mask
    thr = _threshold(threshold, fp64, device)
    _segment_advantages_kernel[(batch,)](
        _bytes(segment_start), cut_values, final_reward.to(dtype).contiguous(), cu_seqlens.to(torch.int64),
        cut_values if logprobs is None else logprobs, cut_values if thr is None else thr, adv, _bytes(mask),
        f32(float(threshold)), HAS_LP=logprobs is not None, FP64=fp64, BLOCK=_block(total // batch),
    )
    return adv, mask


def broadcast_to_tokens(
    node_values: torch.Tensor,  # (M,) fp32/bf16/fp16/fp64, contiguous
    segment_start: torch.Tensor,  # (S,) int64, contiguous
    segment_end: torch.Tensor,  # (S,) int64, contiguous
    num_tokens: int,
    node_index: torch.Tensor | None,  # (S,) int64, contiguous
    fill: float,
) -> torch.Tensor:
    """``[num_tokens]``: segment k's tokens get ``node_values[node_index[k]]``, the rest ``fill``
    (rlkern.ops.segments.broadcast_to_tokens)."""
    dtype = torch.float64 if node_values.dtype == torch.float64 else torch.float32
    out = torch.full((num_tokens,), float(fill), dtype=dtype, device=node_values.device)
    segments = segment_start.numel()
    if segments == 0 or num_tokens == 0:
        return out
    _broadcast_kernel[(segments,)](
        node_values, segment_start.to(torch.int64), segment_end.to(torch.int64),
        segment_start if node_index is None else node_index.to(torch.int64), out,
        HAS_INDEX=node_index is not None, BLOCK=_block(num_tokens // segments),
    )
    return out
