"""Plain-Python reference of the tree / segment advantage family: the oracle of every kernel.

Written node by node (recursion over children lists) in float64, the way the papers' own code
walks its trees; rlkern.ops.trees documents the formulas and the papers they come from. A
forest is ``parent [M]`` int64 (-1 marks a root) in any node order; ``reward [M]`` is read on
leaves (nodes without children) only.

Conventions shared with the kernels (and documented in rlkern.ops.trees):
- a mean over children whose values are all equal is that value exactly, so SPO's zero
  advantage filter (``A != 0``) does not depend on rounding;
- a root has advantage 0 and ``keep`` False (its "segment" is the prompt).
"""

from __future__ import annotations

import math
import sys

import torch


# ---------------------------------------------------------------------------------------------
# Structure

def check_forest(parent: list[int]) -> None:
    """Raise ValueError naming the first offending node of a bad parent array.

    Checked in this order: a parent out of range (anything < -1 or >= M), a forest without a
    root, then nodes whose parent chain never reaches a root (it enters a cycle).
    """
    m = len(parent)
    for i, p in enumerate(parent):
        if p < -1 or p >= m:
            raise ValueError(
                f"parent[{i}] = {p} is out of range: a parent must be -1 (a root) or a node in [0, {m})"
            )
    if m and all(p != -1 for p in parent):
        raise ValueError("parent has no root (no entry is -1): every node lies on or below a cycle")
    state = [0] * m  # 0 unknown, 1 reaches a root
    for i in range(m):
        chain = []
        j = i
        seen = set()
        while j != -1 and state[j] == 0 and j not in seen:
            seen.add(j)
            chain.append(j)
            j = parent[j]
        if j != -1 and state[j] == 0:  # walked into a node of this chain again: a cycle
            raise ValueError(cycle_message(parent, i))
        for k in chain:
            state[k] = 1


def cycle_message(parent: list[int], node: int) -> str:
    """Message for a node whose parent chain enters a cycle (shared with the kernels' checks)."""
    seen = {}
    j = node
    while j not in seen:
        seen[j] = len(seen)
        j = parent[j]
    cycle = [j]
    k = parent[j]
    while k != j:
        cycle.append(k)
        k = parent[k]
    path = " -> ".join(str(c) for c in cycle + [j])
    return f"parent: node {node} does not lead to a root, its parent chain enters the cycle {path}"


def check_depth(parent: list[int], max_depth: int) -> None:
    """Raise ValueError naming the smallest node deeper than ``max_depth`` (roots have depth 0);
    the forest must have passed ``check_forest``."""
    depth = [-1] * len(parent)
    for i in range(len(parent)):
        chain = []
        j = i
        while j != -1 and depth[j] < 0:
            chain.append(j)
            j = parent[j]
        d = -1 if j == -1 else depth[j]
        for k in reversed(chain):
            d += 1
            depth[k] = d
    deeper = [i for i, d in enumerate(depth) if d > max_depth]
    if deeper:
        raise ValueError(depth_message(max_depth, deeper[0], depth[deeper[0]]))


def depth_message(max_depth: int, node: int, depth: int) -> str:
    """Message for a node deeper than ``max_depth`` (shared with the kernels' checks)."""
    return f"max_depth={max_depth} but node {node} is at depth {depth}"


def children_lists(parent: list[int]) -> tuple[list[int], list[list[int]]]:
    """``(roots, children)``: both in increasing node index."""
    check_forest(parent)
    children: list[list[int]] = [[] for _ in parent]
    roots = []
    for i, p in enumerate(parent):
        (roots if p == -1 else children[p]).append(i)
    return roots, children


def _depth_limit(m: int):
    """Recursion as deep as the deepest chain (a chain of M nodes is a valid tree)."""
    class _Limit:
        def __enter__(self):
            self.old = sys.getrecursionlimit()
            sys.setrecursionlimit(max(self.old, 4 * m + 1000))

        def __exit__(self, *exc):
            sys.setrecursionlimit(self.old)

    return _Limit()


def _mean(xs: list[float]) -> float:
    if all(x == xs[0] for x in xs):
        return xs[0]
    return sum(xs) / len(xs)


# ---------------------------------------------------------------------------------------------
# Values

def values_lists(parent: list[int], reward: list[float], mode: str):
    """Per node: ``(value, leaf_sum, leaf_count)``; value per ``mode``."""
    roots, children = children_lists(parent)
    m = len(parent)
    value = [0.0] * m
    leaf_sum = [0.0] * m
    leaf_count = [0] * m

    def visit(n: int) -> None:
        kids = children[n]
        if not kids:
            value[n] = float(reward[n])
            leaf_sum[n] = float(reward[n])
            leaf_count[n] = 1
            return
        for c in kids:
            visit(c)
        leaf_sum[n] = sum(leaf_sum[c] for c in kids)
        leaf_count[n] = sum(leaf_count[c] for c in kids)
        if mode == "mean_children":
            value[n] = _mean([value[c] for c in kids])
        else:
            value[n] = leaf_sum[n] / leaf_count[n]

    with _depth_limit(m):
        for r in roots:
            visit(r)
    return value, leaf_sum, leaf_count, roots, children


def tree_values(parent: torch.Tensor, reward: torch.Tensor, mode: str, max_depth: int | None = None) -> torch.Tensor:
    """``[M]`` float64: ``mean_children`` (SPO-tree) or ``mean_leaves`` (TreeRL); ``max_depth``:
    raise ValueError for a node deeper than that."""
    par = parent.tolist()
    value, *_ = values_lists(par, reward.double().tolist(), mode)
    if max_depth is not None:
        check_depth(par, max_depth)
    return torch.tensor(value, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Advantages

def tree_advantages(
    parent: torch.Tensor,
    reward: torch.Tensor,
    method: str,
    leaf_rloo: bool = False,
    subgroup_weighting: str = "average",
    whiten: bool = True,
    leaf_weights: torch.Tensor | None = None,
    epsilon: float = 1e-8,
    return_values: bool = False,
    max_depth: int | None = None,
):
    """``(advantages [M] float64, keep [M] bool)``, plus the node values (float64) with
    ``return_values``; see rlkern.ops.trees.tree_advantages."""
    par = parent.tolist()
    if max_depth is not None:
        check_forest(par)
        check_depth(par, max_depth)
    rew = reward.double().tolist()
    m = len(par)
    adv = [0.0] * m
    keep = [False] * m
    mode = "mean_children" if method in ("spo_rloo", "spo_grpo") else "mean_leaves"  # arpo: mean_leaves
    values, *_ = values_lists(par, rew, mode) if return_values else (None,)
    if method in ("spo_rloo", "spo_grpo"):
        value, _, _, roots, children = values_lists(par, rew, "mean_children")
        for n in range(m):
            kids = children[n]
            if not kids:
                continue
            vals = [value[c] for c in kids]
            base = value[n]  # the mean over all children, each child included
            std = math.sqrt(sum((v - base) ** 2 for v in vals) / len(vals))
            for c in kids:
                a = value[c] - base
                if method == "spo_grpo":
                    a = a / (std + epsilon)
                adv[c] = a
                keep[c] = a != 0
    elif method == "treerl":
        if leaf_rloo:
            rew = _leaf_rloo(par, rew)
        value, _, leaf_count, roots, children = values_lists(par, rew, "mean_leaves")
        root_of = _roots_of(par)
        for n in range(m):
            p = par[n]
            if p == -1:
                continue
            global_adv = value[n] - value[root_of[n]]
            local_adv = value[n] - value[p]
            adv[n] = (global_adv + local_adv) / math.sqrt(leaf_count[n])
            keep[n] = True
    elif method == "arpo":
        adv, keep = _arpo(par, rew, epsilon)
    elif method == "treepo":
        adv, keep = _treepo(par, rew, subgroup_weighting)
        if whiten:
            adv = _whiten(adv, keep, None if leaf_weights is None else leaf_weights.double().tolist())
    else:
        raise ValueError(f"unknown method {method!r}")
    out = torch.tensor(adv, dtype=torch.float64), torch.tensor(keep, dtype=torch.bool)
    return (*out, torch.tensor(values, dtype=torch.float64)) if return_values else out


def _roots_of(par: list[int]) -> list[int]:
    root = [-1] * len(par)

    def find(n: int) -> int:
        if root[n] == -1:
            root[n] = n if par[n] == -1 else find(par[n])
        return root[n]

    with _depth_limit(len(par)):
        for n in range(len(par)):
            find(n)
    return root


def _arpo(par: list[int], rew: list[float], epsilon: float):
    """ARPO's hard attribution, literally: every leaf (trajectory) gets GRPO's advantage over the
    leaves of its tree, (R - mean) / (Bessel std + epsilon), a tree with a single leaf mean 0 and
    std 1 (rlkern.grpo's singleton convention, verl's); every non-root node the mean of the
    advantages of the leaves below it."""
    roots, children = children_lists(par)
    root_of = _roots_of(par)
    m = len(par)
    leaves_of: dict[int, list[int]] = {}
    for n in range(m):
        if not children[n]:
            leaves_of.setdefault(root_of[n], []).append(n)
    leaf_adv = [0.0] * m
    for members in leaves_of.values():
        xs = [rew[n] for n in members]
        if len(xs) == 1:
            mean, std = 0.0, 1.0
        else:
            mean = sum(xs) / len(xs)
            std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
        for n in members:
            leaf_adv[n] = (rew[n] - mean) / (std + epsilon)
    total = [0.0] * m  # sum and count of the leaf advantages below each node
    count = [0] * m

    def visit(n: int) -> None:
        if not children[n]:
            total[n], count[n] = leaf_adv[n], 1
            return
        for c in children[n]:
            visit(c)
        total[n] = sum(total[c] for c in children[n])
        count[n] = sum(count[c] for c in children[n])

    with _depth_limit(m):
        for r in roots:
            visit(r)
    adv = [0.0 if par[n] == -1 else total[n] / count[n] for n in range(m)]
    return adv, [p != -1 for p in par]


def _leaf_rloo(par: list[int], rew: list[float]) -> list[float]:
    """TreeRL's official leaf normalization: each leaf reward minus the mean of the other leaves
    of its tree (a tree with a single leaf gets 0: it has no other leaf to compare with)."""
    roots, children = children_lists(par)
    root_of = _roots_of(par)
    leaves = [n for n in range(len(par)) if not children[n]]
    total: dict[int, float] = {}
    count: dict[int, int] = {}
    for n in leaves:
        total[root_of[n]] = total.get(root_of[n], 0.0) + rew[n]
        count[root_of[n]] = count.get(root_of[n], 0) + 1
    out = list(rew)
    for n in leaves:
        k = count[root_of[n]]
        out[n] = 0.0 if k == 1 else rew[n] - (total[root_of[n]] - rew[n]) / (k - 1)
    return out


def _treepo(par: list[int], rew: list[float], weighting: str):
    """TreePO subgroup advantages, one per leaf (trajectory)."""
    value, leaf_sum, leaf_count, roots, children = values_lists(par, rew, "mean_leaves")
    m = len(par)
    adv = [0.0] * m
    keep = [False] * m
    for n in range(m):
        if children[n] or par[n] == -1:  # internal nodes, and roots (prompts): no trajectory
            continue
        ancestors = []
        a = par[n]
        while a != -1:
            ancestors.append(a)
            a = par[a]
        terms = []  # (R_n - subgroup mean, subgroup size), root first
        for a in reversed(ancestors):
            if par[a] == -1:
                # The root group is always used; holding one trajectory only, its mean is taken
                # as 0 (the official code, like verl's REINFORCE++-baseline).
                terms.append((rew[n] - (value[a] if leaf_count[a] > 1 else 0.0), leaf_count[a]))
            elif leaf_count[a] > 1:
                terms.append((rew[n] - value[a], leaf_count[a]))
        if weighting == "average":
            adv[n] = sum(t for t, _ in terms) / len(terms)
        else:
            adv[n] = sum(t * size for t, size in terms) / sum(size for _, size in terms)
        keep[n] = True
    return adv, keep


def _whiten(adv: list[float], keep: list[bool], weights: list[float] | None) -> list[float]:
    """verl's masked_whiten over the kept entries, each weighted (its token count) or 1."""
    w = [(1.0 if weights is None else weights[i]) if k else 0.0 for i, k in enumerate(keep)]
    total = sum(w)
    if total == 0:
        return adv
    mean = sum(wi * a for wi, a in zip(w, adv)) / total
    var = sum(wi * (a - mean) ** 2 for wi, a in zip(w, adv)) / total
    var = var * total / (total - 1) if total > 1 else 0.0
    scale = 1.0 / math.sqrt(var + 1e-8)
    return [(a - mean) * scale if k else 0.0 for a, k in zip(adv, keep)]


# ---------------------------------------------------------------------------------------------
# SPO-chain and token layout

def spo_cutpoints(logprobs: torch.Tensor, cu_seqlens: torch.Tensor, threshold: float, interval: int) -> torch.Tensor:
    """``[T]`` bool: token t opens a segment (the state before it is a cut point)."""
    probs = logprobs.double().exp().tolist()
    cu = cu_seqlens.tolist()
    out = [False] * len(probs)
    for b in range(len(cu) - 1):
        low = [t for t in range(cu[b], cu[b + 1]) if probs[t] < threshold]
        for t in low[::interval]:
            out[t] = True
    return torch.tensor(out, dtype=torch.bool)


def segment_advantages(
    segment_start: torch.Tensor,
    cut_values: torch.Tensor,
    final_reward: torch.Tensor,
    cu_seqlens: torch.Tensor,
    logprobs: torch.Tensor | None,
    threshold: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(advantages [T] float64, loss_mask [T] bool)``; see rlkern.ops.trees.segment_advantages."""
    starts = segment_start.tolist()
    vals = cut_values.double().tolist()
    rew = final_reward.double().tolist()
    cu = cu_seqlens.tolist()
    adv = [0.0] * len(starts)
    for b in range(len(cu) - 1):
        begin, end = cu[b], cu[b + 1]
        cuts = [t for t in range(begin, end) if starts[t]]
        bounds = cuts + [end]
        values = [vals[t] for t in cuts] + [rew[b]]
        for k in range(len(cuts)):
            for t in range(bounds[k], bounds[k + 1]):
                adv[t] = values[k + 1] - values[k]
    mask = [True] * len(starts)
    if logprobs is not None:
        probs = logprobs.double().exp().tolist()
        mask = [p < threshold for p in probs]
        adv = [a if keep else 0.0 for a, keep in zip(adv, mask)]
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(mask, dtype=torch.bool)


def broadcast_to_tokens(
    node_values: torch.Tensor,
    segment_start: torch.Tensor,
    segment_end: torch.Tensor,
    num_tokens: int,
    node_index: torch.Tensor | None,
    fill: float,
) -> torch.Tensor:
    """``[num_tokens]``: token t in [segment_start[k], segment_end[k]) gets node_values[node_index[k]]."""
    vals = node_values.double().tolist()
    index = list(range(len(segment_start))) if node_index is None else node_index.tolist()
    out = [float(fill)] * num_tokens
    for k, (s, e) in enumerate(zip(segment_start.tolist(), segment_end.tolist())):
        for t in range(s, e):
            out[t] = vals[index[k]]
    return torch.tensor(out, dtype=torch.float64)
