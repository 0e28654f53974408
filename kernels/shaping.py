"""Triton kernels of the reward-shaping family (the ops and formulas: rlkern/ops/shaping.py;
oracle: rlkern/reference/shaping.py).

``ensemble_rewards``: one program per block of rows of the ``[B, K]`` reward-model scores, the
whole K in one tile (K is a handful of models). ``shape_rewards``: the samples are sorted by dense
group number on the device (a stable sort, no host sync); one program per sample walks its
group's members in tiles and reduces what its method needs (count of correct members, the
correct members' mean and spread of the auxiliary value, the sample's rank among them, their
fewest tool calls), in float64, then writes its reward. HBPO has its own kernel: its reward is
per sample, its advantage walks the group for the mean, the unbiased std and the sample's budget
subgroup's mean. That is O(group size) work per sample:
groups are a rollout's samples per prompt (tens), so the walk is a few tiles.

Hyper-parameters come from a float64 device buffer: a float argument of a Triton kernel is
float32, which would round float64 calls' parameters and GRPO-lambda's threshold (a ratio such as
1/3, compared with the group's k / g computed in float64). GRPO-lambda's top-lambda cut is
computed into that buffer on the device.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# the method codes: the order of rlkern.reference.shaping.ENSEMBLE_METHODS / SHAPE_METHODS
ENSEMBLE_CODES = {"mean": 0, "wco": 1, "uwo": 2, "weighted": 3}
SHAPE_CODES = {"grpo_lambda": 0, "unlikeliness": 1, "s_grpo": 2, "otc": 3, "hbpo": 4, "hbpo_advantage": 5}
PI = tl.constexpr(3.141592653589793)


@triton.jit
def _ensemble_kernel(
    r_ptr,  # (B, K) contiguous, fp32/fp64
    w_ptr,  # (K,) rewards' dtype (METHOD 3), else any pointer
    par_ptr,  # (1,) fp64: UWO's coef
    out_ptr,  # (B,) rewards' dtype
    B, K,
    METHOD: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    cols = tl.arange(0, BLOCK_K).to(tl.int64)
    inside = (rows[:, None] < B) & (cols[None, :] < K)
    r = tl.load(r_ptr + rows[:, None] * K + cols[None, :], mask=inside, other=0.0).to(tl.float64)
    if METHOD == 1:
        low = tl.min(tl.where(inside, r, float("inf")), axis=1)
        nan = tl.sum((inside & (r != r)).to(tl.int32), axis=1) > 0  # NaN wins, as torch.min
        value = tl.where(nan, float("nan"), low)
    elif METHOD == 3:
        w = tl.load(w_ptr + cols, mask=cols < K, other=0.0).to(tl.float64)
        value = tl.sum(r * w[None, :], axis=1)
    else:
        mean = tl.sum(r, axis=1) / K
        value = mean
        if METHOD == 2:
            coef = tl.load(par_ptr).to(tl.float64)
            dev = tl.where(inside, r - mean[:, None], 0.0)
            value = mean - coef * (tl.sum(dev * dev, axis=1) / K)
    tl.store(out_ptr + rows, value.to(out_ptr.dtype.element_ty), mask=rows < B)


def ensemble_rewards(
    rewards: torch.Tensor,  # (B, K) contiguous fp32/fp64
    weights: torch.Tensor | None,  # (K,) rewards' dtype (method 3)
    method: int,
    coef: float,
) -> torch.Tensor:
    batch, k = rewards.shape
    out = torch.empty(batch, dtype=rewards.dtype, device=rewards.device)
    if batch == 0:
        return out
    par = torch.tensor([coef], dtype=torch.float64, device=rewards.device)
    block_k = triton.next_power_of_2(max(k, 1))
    block_b = max(1, min(128, 4096 // block_k))
    _ensemble_kernel[(triton.cdiv(batch, block_b),)](
        rewards, rewards if weights is None else weights, par, out, batch, k,
        METHOD=method, BLOCK_B=block_b, BLOCK_K=block_k,
    )
    return out


@triton.jit
def _shape_kernel(
    s_ptr,  # (N,) scores fp32/fp64
    a_ptr,  # (N,) auxiliary value, scores' dtype
    inv_ptr,  # (N,) int64 dense group numbers in [0, N)
    perm_ptr,  # (N,) int64 sample numbers sorted by group (stable: rising within a group)
    starts_ptr,  # (N + 1,) int64: group g's members are perm[starts[g]:starts[g + 1]]
    par_ptr,  # (3,) fp64: the method's parameters (GRPO-lambda's threshold compared with k / g in fp64)
    out_ptr,  # (N,) scores' dtype
    METHOD: tl.constexpr, BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    si = tl.load(s_ptr + i).to(tl.float64)
    ai = tl.load(a_ptr + i).to(tl.float64)
    grp = tl.load(inv_ptr + i)
    start = tl.load(starts_ptr + grp)
    end = tl.load(starts_ptr + grp + 1)
    p0 = tl.load(par_ptr).to(tl.float64)
    p1 = tl.load(par_ptr + 1).to(tl.float64)
    p2 = tl.load(par_ptr + 2).to(tl.float64)
    g = (end - start).to(tl.float64)
    lane = tl.arange(0, BLOCK).to(tl.int64)
    k = tl.full([], 0.0, tl.float64)  # correct members
    total = tl.full([], 0.0, tl.float64)  # their auxiliary values' sum
    rank = tl.full([], 0.0, tl.float64)  # correct members ranked before sample i
    fewest = tl.full([], float("inf"), tl.float64)  # their fewest tool calls
    for off in range(start, end, BLOCK):
        t = off + lane
        inb = t < end
        j = tl.load(perm_ptr + t, mask=inb, other=0)
        sj = tl.load(s_ptr + j, mask=inb, other=0.0).to(tl.float64)
        aj = tl.load(a_ptr + j, mask=inb, other=0.0).to(tl.float64)
        cj = inb & (sj > 0)  # NaN is not > 0
        k += tl.sum(cj.to(tl.float64), axis=0)
        total += tl.sum(tl.where(cj, aj, 0.0), axis=0)
        if METHOD == 1:  # unlikeliness: rank 0 is the most likely correct member
            before = cj & ((aj > ai) | ((aj == ai) & (j < i)))
            rank += tl.sum(before.to(tl.float64), axis=0)
        if METHOD == 2:  # S-GRPO: rank 0 is the earliest correct exit
            before = cj & ((aj < ai) | ((aj == ai) & (j < i)))
            rank += tl.sum(before.to(tl.float64), axis=0)
        if METHOD == 3:
            fewest = tl.minimum(fewest, tl.min(tl.where(cj, aj, float("inf")), axis=0))
    correct = si > 0
    out = si
    if METHOD == 0:
        mean = total / tl.maximum(k, 1.0)
        var = tl.full([], 0.0, tl.float64)
        for off in range(start, end, BLOCK):  # centred second pass: no E[x^2] - E[x]^2 cancellation
            t = off + lane
            inb = t < end
            j = tl.load(perm_ptr + t, mask=inb, other=0)
            sj = tl.load(s_ptr + j, mask=inb, other=0.0).to(tl.float64)
            aj = tl.load(a_ptr + j, mask=inb, other=0.0).to(tl.float64)
            d = tl.where(inb & (sj > 0), aj - mean, 0.0)
            var += tl.sum(d * d, axis=0)
        std = tl.sqrt(var / tl.maximum(k, 1.0))
        gated = correct & (k > 0) & (k / g >= p0)
        z = tl.where(gated, (ai - mean) / (std + p2), 0.0)  # no overflowing exp off the gate
        out = tl.where(gated, si * (1.0 - p1 / (1.0 + tl.exp(-z))), si)
    elif METHOD == 1:
        out = tl.where(correct, si * (1.0 - p0 * (g - rank) / g), si)
    elif METHOD == 2:
        # p0 ** rank; rank 0 is 1 even for a decay of 0 (0 * log 0 would be NaN)
        power = tl.where(rank == 0.0, 1.0, tl.exp(rank * tl.log(p0)))
        out = tl.where(correct, si * power, si)
    else:
        n = tl.where(k > 0, fewest, 0.0)
        m = ai
        if_none = tl.where(m == 0.0, 1.0, tl.cos(m * PI / (2.0 * m + p0)))
        f = 2.0 * n * m / tl.where(n > 0, m + n, 1.0)
        if_some = tl.sin(f * PI / tl.where(n > 0, 2.0 * n, 1.0))
        out = p1 * tl.where(n > 0, if_some, if_none) * si
    tl.store(out_ptr + i, out.to(out_ptr.dtype.element_ty))


@triton.jit
def _hbpo_kernel(
    s_ptr,  # (N,) scores (METHOD 4) or rewards (METHOD 5), fp32/fp64
    a_ptr,  # (N,) lengths (METHOD 4) or budgets (METHOD 5), scores' dtype
    b_ptr,  # (N,) budgets, scores' dtype (METHOD 4), else any pointer
    inv_ptr,  # (N,) int64 dense group numbers in [0, N)
    perm_ptr,  # (N,) int64 sample numbers sorted by group
    starts_ptr,  # (N + 1,) int64 group starts in perm
    par_ptr,  # (3,) fp64: L_max, beta, alpha (METHOD 4) or eps (METHOD 5)
    out_ptr,  # (N,) scores' dtype
    METHOD: tl.constexpr, BLOCK: tl.constexpr,
):
    """HBPO (rlkern/ops/shaping.py): METHOD 4 the budget-aware reward of sample i; METHOD 5 its
    advantage: group z-score (unbiased std) + its budget subgroup's mean reward - f2(b)."""
    i = tl.program_id(0).to(tl.int64)
    si = tl.load(s_ptr + i).to(tl.float64)
    ai = tl.load(a_ptr + i).to(tl.float64)
    p0 = tl.load(par_ptr).to(tl.float64)
    p1 = tl.load(par_ptr + 1).to(tl.float64)
    p2 = tl.load(par_ptr + 2).to(tl.float64)
    if METHOD == 4:
        budget = tl.load(b_ptr + i).to(tl.float64)
        over = p1 * tl.cos(ai * PI / (2.0 * p0)) - p2 * tl.abs(ai - budget)
        within = p1 * tl.cos(budget * PI / (2.0 * p0))
        r = tl.where(ai > budget, over, within)
        out = tl.where((si > 0) & (ai <= p0), r, tl.where(si != si, si, 0.0))
    else:
        grp = tl.load(inv_ptr + i)
        start = tl.load(starts_ptr + grp)
        end = tl.load(starts_ptr + grp + 1)
        g = (end - start).to(tl.float64)
        lane = tl.arange(0, BLOCK).to(tl.int64)
        total = tl.full([], 0.0, tl.float64)
        sub = tl.full([], 0.0, tl.float64)
        count = tl.full([], 0.0, tl.float64)
        for off in range(start, end, BLOCK):
            t = off + lane
            inb = t < end
            j = tl.load(perm_ptr + t, mask=inb, other=0)
            sj = tl.load(s_ptr + j, mask=inb, other=0.0).to(tl.float64)
            aj = tl.load(a_ptr + j, mask=inb, other=0.0).to(tl.float64)
            same = inb & (aj == ai)
            total += tl.sum(sj, axis=0)
            sub += tl.sum(tl.where(same, sj, 0.0), axis=0)
            count += tl.sum(same.to(tl.float64), axis=0)
        mean = total / g
        var = tl.full([], 0.0, tl.float64)
        for off in range(start, end, BLOCK):
            t = off + lane
            inb = t < end
            j = tl.load(perm_ptr + t, mask=inb, other=0)
            d = tl.where(inb, tl.load(s_ptr + j, mask=inb, other=0.0).to(tl.float64) - mean, 0.0)
            var += tl.sum(d * d, axis=0)
        std = tl.sqrt(var / tl.maximum(g - 1.0, 1.0))
        grouped = (si - mean) / (std + p2) + sub / count - p1 * tl.cos(ai * PI / (2.0 * p0))
        out = tl.where(g > 1.0, grouped, si / (1.0 + p2))  # a group of one: verl's mean 0, std 1
    tl.store(out_ptr + i, out.to(out_ptr.dtype.element_ty))


def _group_order(inverse: torch.Tensor, n: int):
    """The kernels' view of the groups, on the device (no host sync): perm (samples sorted by group,
    stable), counts per group number, starts (group g is perm[starts[g]:starts[g + 1]])."""
    perm = torch.sort(inverse, stable=True).indices
    counts = torch.bincount(inverse, minlength=n)
    starts = torch.zeros(n + 1, dtype=torch.int64, device=inverse.device)
    starts[1:] = counts.cumsum(0)
    return perm, counts, starts


def _top_fraction_cut(scores, inverse, counts, fraction):
    """GRPO-lambda's top-lambda selection as a threshold, on the device (no host sync): the
    correctness ratio of the ceil(fraction * G)-th best of the G groups present (inf when that
    count is 0). The ratios are k / g in float64, the very division the kernel gates on."""
    correct = torch.zeros(counts.shape[0], dtype=torch.float64, device=scores.device)
    correct.index_add_(0, inverse, (scores > 0).to(torch.float64))
    present = counts > 0
    ratios = torch.where(present, correct / counts.clamp_min(1).to(torch.float64), -1.0)
    ordered = torch.sort(ratios, descending=True).values
    groups = present.sum().to(torch.float64)
    count = torch.ceil(fraction * groups - 1e-9).to(torch.int64)
    cut = ordered[(count - 1).clamp_min(0)]
    return torch.where(count >= 1, cut, torch.full_like(cut, float("inf")))


def shape_rewards(
    scores: torch.Tensor,  # (N,) contiguous fp32/fp64
    aux: torch.Tensor | None,  # (N,) scores' dtype
    aux2: torch.Tensor | None,  # (N,) scores' dtype: budgets (HBPO's reward)
    inverse: torch.Tensor,  # (N,) int64 dense group numbers in [0, N)
    method: int,
    p0: float, p1: float, p2: float, p3: float,
) -> torch.Tensor:
    n = scores.numel()
    out = torch.empty_like(scores)
    if n == 0:
        return out
    perm, counts, starts = _group_order(inverse, n)
    par = torch.tensor([p0, p1, p2], dtype=torch.float64, device=scores.device)
    if method == SHAPE_CODES["grpo_lambda"] and p3 >= 0:
        par[0] = _top_fraction_cut(scores, inverse, counts, p3)
    if method >= SHAPE_CODES["hbpo"]:
        _hbpo_kernel[(n,)](scores, aux, scores if aux2 is None else aux2, inverse, perm, starts, par, out,
                           METHOD=method, BLOCK=64)
    else:
        _shape_kernel[(n,)](scores, scores if aux is None else aux, inverse, perm, starts, par, out,
                            METHOD=method, BLOCK=64)
    return out


# ---------------------------------------------------------------------------------------------
# TW-GRPO token weights (rlkern/ops/shaping.py, token_weights). _token_kl_kernel: one program per
# (group number, position t) walks the vocabulary in tiles; per tile it reads every member's row
# twice (the group's mean log-prob, then the sum of exp(d) - d - 1), so the [N, T, V] log-probs are
# never copied or upcast in memory. Programs of group numbers no sample has write an unread 0.
# _token_weights_kernel: one program per sample row normalizes its group's KL over the positions.


@triton.jit
def _token_kl_kernel(
    lp_ptr,  # (N, T, V) log-probs, last dim contiguous, bf16/fp16/fp32/fp64
    m_ptr,  # (N, T) uint8 mask, contiguous
    perm_ptr,  # (N,) int64 sample numbers sorted by group
    starts_ptr,  # (N + 1,) int64 group starts in perm
    kl_ptr,  # (N, T) fp32/fp64: row g holds group g's divergence per position
    par_ptr,  # (2,) fp64: max_weight, -log V (a masked position's log-prob)
    s_n, s_t,  # log-probs' strides (elements)
    T, V,
    FP64: tl.constexpr, BLOCK_V: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1).to(tl.int64)
    start = tl.load(starts_ptr + g)
    end = tl.load(starts_ptr + g + 1)
    dt = tl.float64 if FP64 else tl.float32
    size = tl.maximum(end - start, 1).to(dt)
    flat = tl.load(par_ptr + 1).to(dt)
    lanes = tl.arange(0, BLOCK_V).to(tl.int64)
    acc = tl.zeros([BLOCK_V], dtype=dt)
    for v0 in range(0, V, BLOCK_V):
        v = v0 + lanes
        inside = v < V
        mean = tl.zeros([BLOCK_V], dtype=dt)
        for u in range(start, end):
            i = tl.load(perm_ptr + u)
            keep = (tl.load(m_ptr + i * T + t) + tl.zeros([BLOCK_V], dtype=tl.int32)) != 0
            lp = tl.load(lp_ptr + i * s_n + t * s_t + v, mask=inside & keep, other=0.0).to(dt)
            mean += tl.where(keep, lp, flat)
        mean = tl.where(inside, mean / size, 0.0)
        for u in range(start, end):
            i = tl.load(perm_ptr + u)
            keep = (tl.load(m_ptr + i * T + t) + tl.zeros([BLOCK_V], dtype=tl.int32)) != 0
            lp = tl.load(lp_ptr + i * s_n + t * s_t + v, mask=inside & keep, other=0.0).to(dt)
            d = tl.where(inside, mean - tl.where(keep, lp, flat), 0.0)
            d = tl.minimum(tl.maximum(d, -11.0), 11.0)
            acc += tl.exp(d) - d - 1.0
    tl.store(kl_ptr + g * T + t, tl.sum(acc, axis=0) / size)


@triton.jit
def _token_weights_kernel(
    kl_ptr,  # (N, T) fp32/fp64 from _token_kl_kernel
    m_ptr,  # (N, T) uint8 mask
    inv_ptr,  # (N,) int64 dense group numbers
    out_ptr,  # (N, T) fp32/fp64
    par_ptr,  # (2,) fp64: max_weight, -log V
    T,
    BLOCK_T: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    max_weight = tl.load(par_ptr).to(out_ptr.dtype.element_ty)
    g = tl.load(inv_ptr + i)
    lanes = tl.arange(0, BLOCK_T).to(tl.int64)
    first = tl.load(kl_ptr + g * T)
    lo = first
    hi = first
    for t0 in range(0, T, BLOCK_T):
        t = t0 + lanes
        k = tl.load(kl_ptr + g * T + t, mask=t < T, other=first)
        lo = tl.minimum(lo, tl.min(k, axis=0))
        hi = tl.maximum(hi, tl.max(k, axis=0))
    for t0 in range(0, T, BLOCK_T):
        t = t0 + lanes
        inside = t < T
        k = tl.load(kl_ptr + g * T + t, mask=inside, other=first)
        keep = tl.load(m_ptr + i * T + t, mask=inside, other=0) != 0
        w = 1.0 + (max_weight - 1.0) * (k - lo) / (hi - lo + 1e-8)
        tl.store(out_ptr + i * T + t, tl.where(keep, w, 0.0).to(out_ptr.dtype.element_ty), mask=inside)


def token_weights(
    logprobs: torch.Tensor,  # (N, T, V), last dim contiguous, bf16/fp16/fp32/fp64
    mask: torch.Tensor,  # (N, T) bool, contiguous
    inverse: torch.Tensor,  # (N,) int64 dense group numbers in [0, N)
    max_weight: float,
) -> torch.Tensor:
    n, steps, vocab = logprobs.shape
    fp64 = logprobs.dtype == torch.float64
    dtype = torch.float64 if fp64 else torch.float32
    out = torch.zeros(n, steps, dtype=dtype, device=logprobs.device)
    if n == 0 or steps == 0 or vocab == 0:
        return out
    perm, _, starts = _group_order(inverse, n)
    kl = torch.empty(n, steps, dtype=dtype, device=logprobs.device)
    m = mask.view(torch.uint8)
    par = torch.tensor([max_weight, -math.log(vocab)], dtype=torch.float64, device=logprobs.device)
    _token_kl_kernel[(n, steps)](logprobs, m, perm, starts, kl, par, logprobs.stride(0), logprobs.stride(1), steps,
                                 vocab, FP64=fp64, BLOCK_V=min(1024, triton.next_power_of_2(vocab)))
    _token_weights_kernel[(n,)](kl, m, inverse, out, par, steps, BLOCK_T=min(1024, triton.next_power_of_2(steps)))
    return out
