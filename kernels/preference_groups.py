"""Triton kernels of the group preference family (``rlkern.group_preference_loss``,
``rlkern.group_weights``).

The ops and their formulas are in rlkern/ops/preference_groups.py, the oracle in
rlkern/reference/preference_groups.py, the CPU twin in csrc/preference_groups.cpp.

Grid: one program per sample i. The launcher sorts the samples by group on the device (a stable
torch.sort and two searchsorted: no host sync, no group size read back), and program i walks its
own group's members, positions [lo_i, hi_i) of that order, in steps of BLOCK lanes: the work is
O(sum of n_g^2), as the C++ kernel's. Each program writes only its own sample's outputs: the loss
kernel its per-sample statistics (the rows of csrc/preference_groups.cpp), which the op reduces,
and its own derivative, gathered from every pair it is in (never a scatter: deterministic). TPO's
ranks come from a first kernel (each sample's descending rank of r within its group; ties by batch
index, as the C++ kernel and the reference).

Compute type: float64 for float64 input, float32 otherwise; hyper-parameters are float64 kernel
arguments read in that type.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlkern.kernels._common import sigmoid, softplus
from rlkern.reference.preference_groups import LOSS_TYPES, WEIGHT_METHODS

MAX_BLOCK = 1024
GROUP_BLOCK = 64  # lanes per step of a group scan: a prompt's responses are a few to a few dozen
N_STATS = 8
TPO, P3O, TRPA, BRAIN = (tl.constexpr(LOSS_TYPES.index(t)) for t in ("tpo", "p3o", "trpa", "brain"))
W_WIN_RATE, W_RSO, W_BRAIN = (tl.constexpr(WEIGHT_METHODS.index(m)) for m in ("win_rate", "rso", "brain"))
W_WIN_RATE_MATRIX = tl.constexpr(len(WEIGHT_METHODS))  # win_rate with the caller's [N, N] preference matrix


@triton.jit
def _ld(ptr, idx, inside, CDT: tl.constexpr):
    return tl.load(ptr + idx, mask=inside, other=0.0).to(CDT)


@triton.jit
def _members(order_ptr, p, hi):
    """The samples at positions p of the group-sorted order, and which lanes are in the group (p < hi,
    the group's end)."""
    inside = p < hi
    return tl.load(order_ptr + p, mask=inside, other=0), inside


@triton.jit
def _sample_group(lo_ptr, hi_ptr, beta, CDT: tl.constexpr, BLOCK: tl.constexpr):
    """The per-sample kernels' start: program i's sample, the lanes, beta in the compute type, and
    i's group as the positions [lo, hi) of the group-sorted order."""
    i = tl.program_id(0).to(tl.int64)
    lane = tl.arange(0, BLOCK).to(tl.int64)
    b = tl.full((), beta, CDT)
    lo = tl.load(lo_ptr + i)
    hi = tl.load(hi_ptr + i)
    return i, lane, b, lo, hi


@triton.jit
def _brain_a(ref_ptr, old_ptr, s_ptr, j, inside, b, CDT: tl.constexpr):
    """BRAIN's a_j = ref_j - old_j + s_j / beta."""
    return _ld(ref_ptr, j, inside, CDT) - _ld(old_ptr, j, inside, CDT) + _ld(s_ptr, j, inside, CDT) / b


@triton.jit
def _brain_members(x_ptr, ref_ptr, old_ptr, s_ptr, order_ptr, p, hi, b, CDT: tl.constexpr):
    """The group members at positions p (``_members``): which lanes are in, BRAIN's a_j
    (``_brain_a``) and x_j - old_j."""
    j, inside = _members(order_ptr, p, hi)
    oj = _ld(old_ptr, j, inside, CDT)
    aj = _ld(ref_ptr, j, inside, CDT) - oj + _ld(s_ptr, j, inside, CDT) / b
    return inside, aj, _ld(x_ptr, j, inside, CDT) - oj


@triton.jit
def _rank_kernel(
    x_ptr,  # (N,) fp32/bf16/fp16/fp64 log-probs
    ref_ptr,  # (N,) compute dtype, reference log-probs
    order_ptr,  # (N,) int64, the samples sorted by group (stable)
    lo_ptr,  # (N,) int64, where sample i's group starts in order
    hi_ptr,  # (N,) int64, where it ends
    out_ptr,  # (N,) compute dtype: 1 / log2(1 + tau), tau the descending rank of r in the group
    N,
    beta: tl.float64,
    BLOCK: tl.constexpr,
):
    CDT: tl.constexpr = out_ptr.dtype.element_ty
    i, lane, b, lo, hi = _sample_group(lo_ptr, hi_ptr, beta, CDT, BLOCK)
    ri = b * (tl.load(x_ptr + i).to(CDT) - tl.load(ref_ptr + i).to(CDT))
    above = tl.zeros([BLOCK], CDT)
    for first in range(lo, hi, BLOCK):
        j, inside = _members(order_ptr, first + lane, hi)
        same = inside & (j != i)
        rj = b * (_ld(x_ptr, j, inside, CDT) - _ld(ref_ptr, j, inside, CDT))
        above += tl.where(same & ((rj > ri) | ((rj == ri) & (j < i))), 1.0, 0.0)
    tl.store(out_ptr + i, 1.0 / tl.log2(2.0 + tl.sum(above, 0)))


@triton.jit
def _p3o_term(adv, lrho, eps):
    """max(-A rho, -A clip(rho, 1 - eps, 1 + eps)), its derivative in lrho, whether clipped."""
    rho = tl.exp(lrho)
    u = -adv * rho
    c = -adv * tl.minimum(tl.maximum(rho, 1.0 - eps), 1.0 + eps)
    clipped = c > u
    return tl.where(clipped, c, u), tl.where(clipped, 0.0, -adv * rho), clipped


@triton.jit
def _group_loss_kernel(
    x_ptr,  # (N,) fp32/bf16/fp16/fp64 log-probs
    ref_ptr,  # (N,) compute dtype, reference log-probs (zeros: none)
    old_ptr,  # (N,) compute dtype, sampling-policy log-probs
    s_ptr,  # (N,) compute dtype, scores
    order_ptr,  # (N,) int64, the samples sorted by group (stable)
    lo_ptr,  # (N,) int64, where sample i's group starts in order
    hi_ptr,  # (N,) int64, where it ends
    disc_ptr,  # (N,) compute dtype, TPO's 1 / log2(1 + tau) (_rank_kernel; unread otherwise)
    out_ptr,  # (8, N) compute dtype, the per-sample statistics (module docstring)
    N,
    beta: tl.float64,
    eps: tl.float64,
    LOSS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    CDT: tl.constexpr = out_ptr.dtype.element_ty
    i, lane, b, lo, hi = _sample_group(lo_ptr, hi_ptr, beta, CDT, BLOCK)
    ep = tl.full((), eps, CDT)
    xi = tl.load(x_ptr + i).to(CDT)
    refi = tl.load(ref_ptr + i).to(CDT)
    oldi = tl.load(old_ptr + i).to(CDT)
    si = tl.load(s_ptr + i).to(CDT)
    ri = b * (xi - refi)
    xoi = xi - oldi
    zero = tl.zeros([BLOCK], CDT)
    loss = zero
    grad = zero
    size = zero
    wins = zero
    right = zero
    clips = zero
    if LOSS == BRAIN:  # the group's maxima of a = ref - old + s / beta and of x - old
        amax = tl.full([BLOCK], float("-inf"), CDT)
        bmax = tl.full([BLOCK], float("-inf"), CDT)
        for first in range(lo, hi, BLOCK):
            same, aj, bj = _brain_members(x_ptr, ref_ptr, old_ptr, s_ptr, order_ptr, first + lane, hi, b, CDT)
            amax = tl.maximum(amax, tl.where(same, aj, float("-inf")))
            bmax = tl.maximum(bmax, tl.where(same, bj, float("-inf")))
        am = tl.max(amax, 0)
        bm = tl.max(bmax, 0)
        asum = zero
        bsum = zero
        for first in range(lo, hi, BLOCK):
            same, aj, bj = _brain_members(x_ptr, ref_ptr, old_ptr, s_ptr, order_ptr, first + lane, hi, b, CDT)
            asum += tl.where(same, tl.exp(aj - am), 0.0)
            bsum += tl.where(same, tl.exp(bj - bm), 0.0)
            size += tl.where(same, 1.0, 0.0)
        a_s = tl.sum(asum, 0)
        b_s = tl.sum(bsum, 0)
        n_g = tl.sum(size, 0)
        alpha = tl.exp(refi - oldi + si / b - am) / a_s
        base = tl.exp(xoi - bm) / b_s
        loss_i = -alpha * xi + (bm + tl.log(b_s) - tl.log(n_g)) / n_g
        grad_i = base - alpha
        # the pair counts below (wins, ranked right) still need the pair scan
        size = zero
    if LOSS == TPO:
        disc_i = tl.load(disc_ptr + i).to(CDT)
        gain_i = tl.exp2(si)
    for first in range(lo, hi, BLOCK):
        j, inside = _members(order_ptr, first + lane, hi)
        same = inside & (j != i)
        xj = _ld(x_ptr, j, inside, CDT)
        sj = _ld(s_ptr, j, inside, CDT)
        d = ri - b * (xj - _ld(ref_ptr, j, inside, CDT))
        win = same & (si > sj)
        lose = same & (sj > si)
        size += tl.where(same, 1.0, 0.0)
        wins += tl.where(win, 1.0, 0.0)
        right += tl.where(win & (d > 0), 1.0, 0.0)
        if LOSS == TPO or LOSS == TRPA:
            if LOSS == TPO:
                lam = tl.abs(gain_i - tl.exp2(sj)) * tl.abs(disc_i - _ld(disc_ptr, j, inside, CDT))
            else:
                lam = tl.full([BLOCK], 1.0, CDT)
            loss += tl.where(win, lam * softplus(-d), 0.0)
            grad += tl.where(win, -lam * b * sigmoid(-d), tl.where(lose, lam * b * sigmoid(d), 0.0))
        if LOSS == P3O:
            adv = si - sj
            xoj = xj - _ld(old_ptr, j, inside, CDT)
            t_ij, d_ij, c_ij = _p3o_term(adv, xoi - xoj, ep)
            _t_ji, d_ji, _c_ji = _p3o_term(-adv, xoj - xoi, ep)
            loss += tl.where(same, t_ij, 0.0)
            grad += tl.where(same, d_ij - d_ji, 0.0)
            clips += tl.where(same & c_ij, 1.0, 0.0)
    if LOSS == BRAIN:
        tl.store(out_ptr + i, loss_i)
        tl.store(out_ptr + N + i, grad_i)
    else:
        tl.store(out_ptr + i, tl.sum(loss, 0))
        tl.store(out_ptr + N + i, tl.sum(grad, 0))
    tl.store(out_ptr + 2 * N + i, tl.sum(size, 0))
    tl.store(out_ptr + 3 * N + i, tl.sum(wins, 0))
    tl.store(out_ptr + 4 * N + i, tl.sum(right, 0))
    tl.store(out_ptr + 5 * N + i, tl.sum(clips, 0))
    if LOSS == TRPA:  # k3 = e^(ref - x) - (ref - x) - 1 and its derivative 1 - e^(ref - x)
        lr = refi - xi
        e = tl.exp(lr)
        tl.store(out_ptr + 6 * N + i, e - lr - 1.0)
        tl.store(out_ptr + 7 * N + i, 1.0 - e)
    else:
        tl.store(out_ptr + 6 * N + i, tl.sum(zero, 0))
        tl.store(out_ptr + 7 * N + i, tl.sum(zero, 0))


def _block(n: int) -> int:
    return max(min(16, MAX_BLOCK), min(MAX_BLOCK, triton.next_power_of_2(max(n, 1))))


def _group_layout(inverse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(order, lo, hi): the samples sorted by group number (stable: batch order within a group) and
    each sample's group as the positions [lo, hi) of order. One sort and two binary searches on the
    device: no host sync, and no group size is read back."""
    sorted_ids, order = torch.sort(inverse, stable=True)
    lo = torch.searchsorted(sorted_ids, inverse, right=False)
    hi = torch.searchsorted(sorted_ids, inverse, right=True)
    return order.contiguous(), lo.contiguous(), hi.contiguous()


def group_preference_stats(logps, ref, old, scores, inverse, loss_type, hyper):
    """The loss op's Triton statistics: (8, N), the contract of csrc/preference_groups.cpp's
    cpp_group_preference_stats."""
    dtype = torch.float64 if logps.dtype == torch.float64 else torch.float32
    n = logps.numel()
    beta, eps = (float(h) for h in hyper)
    out = torch.empty((N_STATS, n), dtype=dtype, device=logps.device)
    if n == 0:
        return out
    x, ref, old, scores = (t.contiguous() for t in (logps, ref, old, scores))
    layout = _group_layout(inverse)
    block = _block(GROUP_BLOCK)
    disc = ref  # a valid pointer; read only by TPO
    if loss_type == LOSS_TYPES.index("tpo"):
        disc = torch.empty(n, dtype=dtype, device=logps.device)
        _rank_kernel[(n,)](x, ref, *layout, disc, n, beta, BLOCK=block)
    _group_loss_kernel[(n,)](x, ref, old, scores, *layout, disc, out, n, beta, eps, LOSS=int(loss_type), BLOCK=block)
    return out


@triton.jit
def _group_weights_kernel(
    s_ptr,  # (N,) compute dtype scores, or (N, N) the preference matrix (METHOD W_WIN_RATE_MATRIX)
    ref_ptr,  # (N,) compute dtype, reference log-probs (zeros: none)
    old_ptr,  # (N,) compute dtype, sampling-policy log-probs (zeros: none)
    order_ptr,  # (N,) int64, the samples sorted by group (stable)
    lo_ptr,  # (N,) int64, where sample i's group starts in order
    hi_ptr,  # (N,) int64, where it ends
    out_ptr,  # (N,) compute dtype
    N,
    beta: tl.float64,
    METHOD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    CDT: tl.constexpr = out_ptr.dtype.element_ty
    i, lane, b, lo, hi = _sample_group(lo_ptr, hi_ptr, beta, CDT, BLOCK)
    if METHOD == W_WIN_RATE or METHOD == W_WIN_RATE_MATRIX:
        won = tl.zeros([BLOCK], CDT)
        size = tl.zeros([BLOCK], CDT)
        if METHOD == W_WIN_RATE:
            si = tl.load(s_ptr + i).to(CDT)
        for first in range(lo, hi, BLOCK):
            j, inside = _members(order_ptr, first + lane, hi)
            same = inside & (j != i)
            if METHOD == W_WIN_RATE:
                sj = _ld(s_ptr, j, inside, CDT)
                p = tl.where(si > sj, 1.0, tl.where(si == sj, 0.5, 0.0))
            else:
                p = _ld(s_ptr, i * N + j, same, CDT)
            won += tl.where(same, p, 0.0)
            size += tl.where(same, 1.0, 0.0)
        others = tl.sum(size, 0)
        tl.store(out_ptr + i, tl.where(others > 0, tl.sum(won, 0) / tl.maximum(others, 1.0), 0.5))
    else:
        top = tl.full([BLOCK], float("-inf"), CDT)
        for first in range(lo, hi, BLOCK):
            j, inside = _members(order_ptr, first + lane, hi)
            same = inside
            if METHOD == W_BRAIN:
                sj = _brain_a(ref_ptr, old_ptr, s_ptr, j, inside, b, CDT)
            else:
                sj = _ld(s_ptr, j, inside, CDT)
            top = tl.maximum(top, tl.where(same, sj, float("-inf")))
        m = tl.max(top, 0)
        si = tl.load(s_ptr + i).to(CDT)
        if METHOD == W_RSO:
            tl.store(out_ptr + i, tl.exp((si - m) / b))
        else:
            total = tl.zeros([BLOCK], CDT)
            for first in range(lo, hi, BLOCK):
                j, inside = _members(order_ptr, first + lane, hi)
                same = inside
                aj = _brain_a(ref_ptr, old_ptr, s_ptr, j, inside, b, CDT)
                total += tl.where(same, tl.exp(aj - m), 0.0)
            ai = tl.load(ref_ptr + i).to(CDT) - tl.load(old_ptr + i).to(CDT) + si / b
            tl.store(out_ptr + i, tl.exp(ai - m) / tl.sum(total, 0))


def group_weights(scores, ref, old, inverse, method, beta):
    """The weights op's Triton backend: (N,), the contract of cpp_group_weights."""
    n = inverse.numel()
    out = torch.empty(n, dtype=scores.dtype, device=scores.device)
    if n == 0:
        return out
    _group_weights_kernel[(n,)](scores.contiguous(), ref.contiguous(), old.contiguous(), *_group_layout(inverse),
                                out, n, float(beta), METHOD=int(method), BLOCK=_block(GROUP_BLOCK))
    return out


# ------------------------------------------------------------------------------------------------
# SRPO (the op: rlkern/ops/preference_groups.py srpo_loss): one program walks the B pairs in blocks
# (a preference batch: deterministic sums with no second reduction), as kernels/preference.py does.

@triton.jit
def _srpo_kernel(
    x_ptr,  # (B, 6) fp32/bf16/fp16/fp64 log-probs, SRPO_COLUMNS order
    ref_ptr,  # (B, 6) compute dtype, the reference's
    loss_ptr,  # (1,) compute dtype
    g_ptr,  # (B, 6) compute dtype, d loss / d logps
    met_ptr,  # (3,) compute dtype, SRPO_METRIC_KEYS order
    B,
    beta: tl.float64,
    alpha: tl.float64,
    BLOCK: tl.constexpr,
):
    CDT: tl.constexpr = g_ptr.dtype.element_ty
    b = tl.full((), beta, CDT)
    a = tl.full((), alpha, CDT)
    lane = tl.arange(0, BLOCK).to(tl.int64)
    zero = tl.zeros([BLOCK], CDT)
    inv_n = 1.0 / (tl.sum(zero, 0) + tl.maximum(B, 1))
    acc = zero
    imp = zero
    gen = zero
    mar = zero
    for first in range(0, B, BLOCK):
        row = first + lane
        inside = row < B
        base = row * 6
        h0 = b * (_ld(x_ptr, base, inside, CDT) - _ld(ref_ptr, base, inside, CDT))
        h1 = b * (_ld(x_ptr, base + 1, inside, CDT) - _ld(ref_ptr, base + 1, inside, CDT))
        h2 = b * (_ld(x_ptr, base + 2, inside, CDT) - _ld(ref_ptr, base + 2, inside, CDT))
        h3 = b * (_ld(x_ptr, base + 3, inside, CDT) - _ld(ref_ptr, base + 3, inside, CDT))
        h4 = b * (_ld(x_ptr, base + 4, inside, CDT) - _ld(ref_ptr, base + 4, inside, CDT))
        h5 = b * (_ld(x_ptr, base + 5, inside, CDT) - _ld(ref_ptr, base + 5, inside, CDT))
        u = 0.5 - (h2 - h3)
        v = 0.5 - (h4 - h5)
        w = h2 + h0 - h5 - h1 - 1.0
        improve = u * u + v * v
        generative = w * w
        acc += tl.where(inside, (1.0 - a) * generative + a * improve, 0.0)
        imp += tl.where(inside, improve, 0.0)
        gen += tl.where(inside, generative, 0.0)
        mar += tl.where(inside, h0 - h1, 0.0)
        s = b * inv_n
        dw = 2.0 * (1.0 - a) * w * s
        du = -2.0 * a * u * s
        dv = -2.0 * a * v * s
        tl.store(g_ptr + base, dw, mask=inside)
        tl.store(g_ptr + base + 1, -dw, mask=inside)
        tl.store(g_ptr + base + 2, dw + du, mask=inside)
        tl.store(g_ptr + base + 3, -du, mask=inside)
        tl.store(g_ptr + base + 4, dv, mask=inside)
        tl.store(g_ptr + base + 5, -dw - dv, mask=inside)
    tl.store(loss_ptr, tl.sum(acc, 0) * inv_n)
    tl.store(met_ptr, tl.sum(imp, 0) * inv_n)
    tl.store(met_ptr + 1, tl.sum(gen, 0) * inv_n)
    tl.store(met_ptr + 2, tl.sum(mar, 0) * inv_n)


def srpo_loss(logps, ref, beta, alpha):
    """The srpo_loss op's Triton backend: (loss, grad, metrics), the contract of cpp_srpo_loss."""
    dtype = torch.float64 if logps.dtype == torch.float64 else torch.float32
    n = logps.shape[0]
    loss = torch.empty((), dtype=dtype, device=logps.device)
    grad = torch.empty(logps.shape, dtype=dtype, device=logps.device)
    metrics = torch.empty(3, dtype=dtype, device=logps.device)
    if n == 0:  # no pair: a loss and metrics of 0 (no launch over empty buffers)
        return loss.zero_(), grad, metrics.zero_()
    _srpo_kernel[(1,)](logps.contiguous(), ref.contiguous(), loss, grad, metrics, n, float(beta), float(alpha),
                       BLOCK=_block(n))
    return loss, grad, metrics
