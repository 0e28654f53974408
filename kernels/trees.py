"""Triton kernels for tree values and advantages over a forest given as parent indices.

The math is that of ``rlkern.reference.trees`` (the oracle) and of csrc/trees.cpp (the CPU
twin); rlkern.ops.trees documents the papers.

Layout: nodes are sorted once by (depth, parent index), stably, so every level is a contiguous
range of positions and the children of a node are a contiguous range of the next level, in
increasing node index (the reference's summation order). Depth and root come from pointer
doubling (ceil(log2 M) + 1 gathers), the level offsets from a count per depth and a cumsum: all
on the device, nothing read back. Each launch handles one level: its bounds are loaded from the
offsets on the device, and a fixed grid (a few programs per SM, whatever the level's size)
strides over it. The host only needs the number of levels, which decides how many launches
follow: ``max_depth + 1`` when the caller gives ``max_depth`` (no host sync at all: the call can
be captured in a CUDA graph), else the deepest level is read back once per call (one sync).
Nodes deeper than ``max_depth`` are never visited: they and every node of their tree (whose
values depend on theirs) get NaN values and advantages (roots keep A = 0); ``keep`` is False for
the unvisited ones.

Kernels, one launch per level:
- bottom-up (deepest level first): a segmented reduction over each node's children range --
  mean of the children's values (exactly their common value when all are equal), leaf sums and
  counts, and the population std of the children (SPO "grpo");
- top-down (root level first): each node's advantage from its own and its parent's values, the
  root value carried down (TreeRL), and the subgroup sums carried down (TreePO).
Accumulation is in float64 (float32 would make SPO's ``A != 0`` filter depend on rounding order);
outputs float32 (float64 for float64 rewards). Nodes whose parent chain does not reach a root
(only possible when validation is off) get NaN.

Not done (yet): a single persistent launch over all levels (the per-level launches cost ~5 us
each, ~12 levels in practice; a grid-wide barrier between levels is needed).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

_BLOCK = 128
_METHODS = {"spo_rloo": 0, "spo_grpo": 1, "treerl": 2, "treepo": 3, "arpo": 4}


@triton.jit(do_not_specialize=["level"])
def _bottom_up_kernel(
    value,  # (M,) float64, by position
    leaf_sum,  # (M,) float64
    leaf_count,  # (M,) int64
    spread,  # (M,) float64 (WITH_STD): population std of the children's values; with MEAN_LEAVES
    # (ARPO) the sum of squared deviations M2 of the leaf rewards below each node from their mean
    reward_pos,  # (M,) float64, reward by position
    first_child,  # (M,) int64
    num_children,  # (M,) int64
    levels,  # (M + 2,) int64: level d occupies positions [levels[d], levels[d + 1])
    level,  # d, the level this launch handles
    MEAN_LEAVES: tl.constexpr,
    WITH_STD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    lo = tl.load(levels + level)
    hi = tl.load(levels + level + 1)
    step = tl.num_programs(0).to(tl.int64) * BLOCK
    for block_start in range(lo + tl.program_id(0).to(tl.int64) * BLOCK, hi, step):
        _bottom_up_block(value, leaf_sum, leaf_count, spread, reward_pos, first_child, num_children,
                         block_start + tl.arange(0, BLOCK), hi, MEAN_LEAVES, WITH_STD, BLOCK)


@triton.jit
def _bottom_up_block(value, leaf_sum, leaf_count, spread, reward_pos, first_child, num_children, q, hi,
                     MEAN_LEAVES: tl.constexpr, WITH_STD: tl.constexpr, BLOCK: tl.constexpr):
    # q: (BLOCK,) int64 positions of the level, valid below hi (its end); the rest as in the kernel
    mask = q < hi
    k = tl.load(num_children + q, mask=mask, other=0)
    f = tl.load(first_child + q, mask=mask, other=0)
    r = tl.load(reward_pos + q, mask=mask, other=0.0)
    first = tl.load(value + f, mask=mask & (k > 0), other=0.0)
    s = tl.zeros([BLOCK], dtype=tl.float64)
    ls = tl.zeros([BLOCK], dtype=tl.float64)
    lc = tl.zeros([BLOCK], dtype=tl.int64)
    equal = k > 0
    kmax = tl.max(k, axis=0)
    for j in range(0, kmax):
        live = mask & (j < k)
        c = f + j
        v = tl.load(value + c, mask=live, other=0.0)
        s += v
        equal = equal & ((v == first) | (j >= k))
        if MEAN_LEAVES:
            ls += tl.load(leaf_sum + c, mask=live, other=0.0)
            lc += tl.load(leaf_count + c, mask=live, other=0)
    leaf = k == 0
    kf = tl.maximum(k, 1).to(tl.float64)
    if MEAN_LEAVES:
        ls = tl.where(leaf, r, ls)
        lc = tl.where(leaf, 1, lc)
        mean = ls / lc.to(tl.float64)
        tl.store(leaf_sum + q, ls, mask=mask)
        tl.store(leaf_count + q, lc, mask=mask)
    else:
        mean = tl.where(leaf, r, tl.where(equal, first, s / kf))
    tl.store(value + q, mean, mask=mask)
    if WITH_STD:
        ss = tl.zeros([BLOCK], dtype=tl.float64)
        for j in range(0, kmax):
            live = mask & (j < k)
            v = tl.load(value + f + j, mask=live, other=0.0)
            d = tl.where(live, v - mean, 0.0)
            if MEAN_LEAVES:
                # ARPO: M2 merged from the children's (Chan et al.): sum_c M2(c) + L(c) (V(c) - V)^2,
                # exact to rounding where a sum of squares minus L V^2 would cancel (csrc/trees.cpp)
                m2c = tl.load(spread + f + j, mask=live, other=0.0)
                lcc = tl.load(leaf_count + f + j, mask=live, other=0).to(tl.float64)
                ss += tl.where(live, m2c + lcc * d * d, 0.0)
            else:
                ss += d * d
        if MEAN_LEAVES:
            tl.store(spread + q, ss, mask=mask)  # leaves: 0
        else:
            tl.store(spread + q, tl.sqrt(ss / kf), mask=mask)


@triton.jit(do_not_specialize=["level"])
def _top_down_kernel(
    adv,  # (M,) float64 by position
    keep,  # (M,) int8 by position
    value,  # (M,) float64
    leaf_sum,  # (M,) float64
    leaf_count,  # (M,) int64
    spread,  # (M,) float64
    reward_pos,  # (M,) float64
    parent_pos,  # (M,) int64, -1 for roots
    num_children,  # (M,) int64
    carry_a,  # (M,) float64: TreeRL / ARPO root value / TreePO subgroup-mean sum, carried down
    carry_b,  # (M,) float64: TreePO subgroup weight sum / ARPO the tree's std + epsilon
    levels,  # (M + 2,) int64, as in _bottom_up_kernel
    level,
    epsilon,  # SPO grpo, ARPO: added to the std
    METHOD: tl.constexpr,  # 0 spo_rloo, 1 spo_grpo, 2 treerl, 3 treepo, 4 arpo
    LEAF_RLOO: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    lo = tl.load(levels + level)
    hi = tl.load(levels + level + 1)
    step = tl.num_programs(0).to(tl.int64) * BLOCK
    for block_start in range(lo + tl.program_id(0).to(tl.int64) * BLOCK, hi, step):
        _top_down_block(adv, keep, value, leaf_sum, leaf_count, spread, reward_pos, parent_pos, num_children,
                        carry_a, carry_b, block_start + tl.arange(0, BLOCK), hi, epsilon, METHOD, LEAF_RLOO,
                        GROUP_SIZE, BLOCK)


@triton.jit
def _top_down_block(adv, keep, value, leaf_sum, leaf_count, spread, reward_pos, parent_pos, num_children, carry_a,
                    carry_b, q, hi, epsilon, METHOD: tl.constexpr, LEAF_RLOO: tl.constexpr,
                    GROUP_SIZE: tl.constexpr, BLOCK: tl.constexpr):
    # q: (BLOCK,) int64 positions of the level, valid below hi (its end); the rest as in the kernel
    mask = q < hi
    p = tl.load(parent_pos + q, mask=mask, other=-1)
    root = p < 0
    pc = tl.where(root, 0, p)
    v = tl.load(value + q, mask=mask, other=0.0)
    vp = tl.load(value + pc, mask=mask & ~root, other=0.0)
    if METHOD <= 1:
        a = v - vp
        if METHOD == 1:
            a = a / (tl.load(spread + pc, mask=mask & ~root, other=1.0) + epsilon)
        a = tl.where(root, 0.0, a)
        kp = (a != 0.0) & ~root
    elif METHOD == 2:
        vr = tl.where(root, v, tl.load(carry_a + pc, mask=mask & ~root, other=0.0))
        tl.store(carry_a + q, vr, mask=mask)
        lc = tl.load(leaf_count + q, mask=mask, other=1)
        a = ((v - vr) + (v - vp)) / tl.sqrt(tl.maximum(lc, 1).to(tl.float64))
        if LEAF_RLOO:
            # every value becomes n/(n-1) (V - V_root) for a tree of n leaves: A scales alike
            n = tl.where(root, lc.to(tl.float64), tl.load(carry_b + pc, mask=mask & ~root, other=0.0))
            tl.store(carry_b + q, n, mask=mask)
            a = tl.where(n > 1.0, a * n / tl.where(n > 1.0, n - 1.0, 1.0), 0.0)
        a = tl.where(root, 0.0, a)
        kp = ~root
    elif METHOD == 4:
        # ARPO: (V - mean) / (std + epsilon) over the leaves of the tree, from the root's count, V
        # and M2 carried down; a tree of one leaf has mean 0 and std 1 (rlkern.grpo's group of one)
        n = tl.load(leaf_count + q, mask=mask, other=1).to(tl.float64)
        many = n > 1.0
        m2 = tl.load(spread + q, mask=mask & root, other=0.0)
        std = tl.where(many, tl.sqrt(m2 / tl.where(many, n - 1.0, 1.0)), 1.0)
        mean = tl.where(root, tl.where(many, v, 0.0), tl.load(carry_a + pc, mask=mask & ~root, other=0.0))
        den = tl.where(root, std + epsilon, tl.load(carry_b + pc, mask=mask & ~root, other=1.0))
        tl.store(carry_a + q, mean, mask=mask)
        tl.store(carry_b + q, den, mask=mask)
        a = tl.where(root, 0.0, (v - mean) / den)
        kp = ~root
    else:
        lc = tl.load(leaf_count + q, mask=mask, other=1)
        include = root | (lc > 1)
        if GROUP_SIZE:
            term = tl.load(leaf_sum + q, mask=mask, other=0.0)
            weight = lc.to(tl.float64)
        else:
            term = v
            weight = tl.full([BLOCK], 1.0, tl.float64)
        term = tl.where(lc > 1, term, 0.0)  # a root group of one trajectory has mean 0
        ca = tl.load(carry_a + pc, mask=mask & ~root, other=0.0)
        cb = tl.load(carry_b + pc, mask=mask & ~root, other=0.0)
        tl.store(carry_a + q, ca + tl.where(include, term, 0.0), mask=mask)
        tl.store(carry_b + q, cb + tl.where(include, weight, 0.0), mask=mask)
        k = tl.load(num_children + q, mask=mask, other=1)
        trajectory = (k == 0) & ~root
        r = tl.load(reward_pos + q, mask=mask, other=0.0)
        a = tl.where(trajectory, r - ca / tl.where(trajectory, cb, 1.0), 0.0)
        kp = trajectory
    tl.store(adv + q, a, mask=mask)
    tl.store(keep + q, kp.to(tl.int8), mask=mask)


class _Structure:
    """Positions sorted by (depth, parent): levels and children ranges contiguous, built on the
    device. ``num_levels`` is ``max_depth + 1`` when given (nothing read back), else the depth of
    the deepest node + 1, read back (the one host sync)."""

    def __init__(self, parent: torch.Tensor, max_depth: int | None):  # parent (M,) int64
        m = parent.numel()
        device = parent.device
        idx = torch.arange(m, device=device)
        up = torch.where(parent >= 0, parent, idx)  # roots point to themselves
        dist = (parent >= 0).to(torch.int64)
        for _ in range(math.ceil(math.log2(max(m, 2))) + 1):
            dist = dist + dist[up]
            up = up[up]
        reached = parent[up] == -1 if m else torch.zeros(0, dtype=torch.bool, device=device)
        depth = torch.where(reached, dist, m)  # nodes off a cycle sort last, out of every level
        order = torch.argsort(depth * (m + 1) + (parent + 1), stable=True)
        pos = torch.empty_like(order)
        pos[order] = idx
        par_sorted = parent[order]
        has_parent = par_sorted >= 0
        self.order = order
        self.parent_pos = torch.where(has_parent, pos[par_sorted.clamp(min=0)], -1)
        target = self.parent_pos.clamp(min=0)
        ones = has_parent.to(torch.int64)
        self.num_children = torch.zeros(m, dtype=torch.int64, device=device).index_add_(0, target, ones)
        self.first_child = torch.full((m,), m, dtype=torch.int64, device=device).scatter_reduce_(
            0, target, torch.where(has_parent, idx, m), "amin")
        # levels[d]: first position of depth d, for every depth a forest of M nodes can have (and
        # one past the end); nodes off a cycle are counted in no level.
        per_depth = torch.zeros(m + 1, dtype=torch.int64, device=device).index_add_(0, depth, reached.to(torch.int64))
        self.levels = torch.cat([per_depth.new_zeros(1), torch.cumsum(per_depth, 0)])
        if m == 0:
            self.num_levels = 0
        elif max_depth is None:
            self.num_levels = int(torch.where(reached, depth, 0).max()) + 1  # read back: the one host sync
        else:
            self.num_levels = min(max_depth, m - 1) + 1
        # positions the launches visit: reached, and no deeper than max_depth
        self.visited = idx < self.levels[self.num_levels]
        self.m = m


def _grid(st: _Structure, device: torch.device):
    return (max(1, min(triton.cdiv(st.m, _BLOCK), _max_programs(device))),)


@functools.cache
def _max_programs(device: torch.device) -> int:
    """A few programs per SM: every level is strided over by the same grid."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter runs programs one after another


def _bottom_up(st: _Structure, reward: torch.Tensor, mean_leaves: bool, with_std: bool):
    m = st.m
    dev = reward.device
    reward_pos = reward.to(torch.float64)[st.order]
    # NaN where no launch writes (nodes deeper than max_depth): their ancestors' values become NaN
    value = torch.full((m,), math.nan, dtype=torch.float64, device=dev)
    leaf_sum = torch.full((m,), math.nan, dtype=torch.float64, device=dev)
    leaf_count = torch.ones(m, dtype=torch.int64, device=dev)
    spread = torch.empty(m, dtype=torch.float64, device=dev)
    grid = _grid(st, dev)
    for level in reversed(range(st.num_levels)):
        _bottom_up_kernel[grid](value, leaf_sum, leaf_count, spread, reward_pos, st.first_child, st.num_children,
                                st.levels, level, MEAN_LEAVES=mean_leaves, WITH_STD=with_std, BLOCK=_BLOCK)
    return reward_pos, value, leaf_sum, leaf_count, spread


def _to_nodes(st: _Structure, by_position: torch.Tensor, dtype, fill):
    out = torch.empty(st.m, dtype=dtype, device=by_position.device)
    out[st.order] = torch.where(st.visited, by_position.to(dtype), torch.full((), fill, dtype=dtype,
                                                                               device=by_position.device))
    return out


def _out_dtype(reward):
    return torch.float64 if reward.dtype == torch.float64 else torch.float32


def tree_values(parent: torch.Tensor, reward: torch.Tensor, mode: str, max_depth: int | None = None) -> torch.Tensor:
    """(M,) values; parent (M,) int64, reward (M,) float, mode mean_children | mean_leaves.
    No host sync when max_depth is given (see the module docstring)."""
    st = _Structure(parent, max_depth)
    _, value, *_ = _bottom_up(st, reward, mode == "mean_leaves", False)
    return _to_nodes(st, value, _out_dtype(reward), math.nan)


def tree_advantages(parent, reward, method, leaf_rloo, group_size, whiten, leaf_weights, epsilon, with_values,
                    max_depth=None):
    """((M,) advantages, (M,) keep, (M,) values or (0,)); as rlkern.ops.trees.tree_advantages.
    No host sync when max_depth is given (see the module docstring)."""
    st = _Structure(parent, max_depth)
    code = _METHODS[method]
    # WITH_STD: SPO grpo's children std; with mean_leaves, ARPO's leaf M2
    reward_pos, value, leaf_sum, leaf_count, spread = _bottom_up(st, reward, code >= 2, code in (1, 4))
    m = st.m
    dev = reward.device
    adv = torch.empty(m, dtype=torch.float64, device=dev)
    keep = torch.zeros(m, dtype=torch.int8, device=dev)
    carry_a = torch.empty(m, dtype=torch.float64, device=dev)
    carry_b = torch.empty(m, dtype=torch.float64, device=dev)
    grid = _grid(st, dev)
    for level in range(st.num_levels):
        _top_down_kernel[grid](adv, keep, value, leaf_sum, leaf_count, spread, reward_pos, st.parent_pos,
                               st.num_children, carry_a, carry_b, st.levels, level, float(epsilon), METHOD=code,
                               LEAF_RLOO=bool(leaf_rloo), GROUP_SIZE=bool(group_size), BLOCK=_BLOCK)
    keep_b = keep.bool() & st.visited
    if code == 3 and whiten:
        w = keep_b.to(torch.float64)
        if leaf_weights is not None:
            w = w * leaf_weights.to(torch.float64)[st.order]
        total = w.sum()
        mean = (w * adv).sum() / total.clamp(min=1e-300)
        var = (w * (adv - mean) ** 2).sum() / total.clamp(min=1e-300)
        var = torch.where(total > 1, var * total / (total - 1).clamp(min=1e-300), torch.zeros_like(var))
        white = (adv - mean) * torch.rsqrt(var + 1e-8)
        adv = torch.where(keep_b & (total > 0), white, torch.where(keep_b, adv, torch.zeros_like(adv)))
    out = _to_nodes(st, adv, _out_dtype(reward), math.nan)
    keep_out = torch.zeros(m, dtype=torch.bool, device=dev)
    keep_out[st.order] = keep_b
    values = _to_nodes(st, value, _out_dtype(reward), math.nan) if with_values else out.new_empty(0)
    return out, keep_out, values
