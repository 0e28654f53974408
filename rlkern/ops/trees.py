"""Tree and segment advantages over forests of rollouts: SPO-tree, SPO-chain, TreeRL, TreePO.

A forest is a flat parent-index array: ``parent [M]`` int64, -1 for a root (the prompt), any
node order (a parent need not come before its child). ``reward [M]`` is read on leaves (nodes
without children) only; internal entries may be NaN or anything. Each node stands for one
segment of tokens (``segment_start/segment_end`` offsets into a packed token array, see
``from_nested`` and ``broadcast_to_tokens``).

Papers and the choices rlkern makes where the paper leaves them open:

- **SPO** -- "Segment Policy Optimization: Effective Segment-Level Credit Assignment in RL for
  Large Language Models" (Guo et al., 2025, arXiv:2505.23564; code AIFrameResearch/SPO).
  SPO-tree: V(leaf) = reward, V(n) = mean of its children's V (the official tree expansion
  stores ``np.mean(child_rewards)``); A(n) = V(n) - V(parent(n)), the parent's V being the mean
  over all of its children, n included ("rloo" in the official code); "grpo" divides by
  ``np.std`` of the children's V (population std) + 1e-8. The official code keeps an edge when
  ``A + BoK(V(n)) - BoK(V(parent)) != 0`` with BoK(v) = 1 - (1 - v)^4; for values in [0, 1]
  BoK is strictly increasing so that is ``A != 0``, which is what ``keep`` says. rlkern makes the
  mean of equal children exactly their value, so ``A == 0`` never depends on rounding.
  SPO-chain: see ``spo_cutpoints`` and ``segment_advantages``.
- **TreeRL** -- "TreeRL: LLM Reinforcement Learning with On-Policy Tree Search" (Hou et al.,
  ACL 2025; code THUDM/TreeRL). V(n) = mean reward of the leaves below n; A(n) =
  (GA + LA) / sqrt(|L(n)|) with GA = V(n) - V(root), LA = V(n) - V(parent(n)), |L(n)| the
  number of leaves below n. ``leaf_rloo=True`` applies the official code's leaf normalization
  first (each leaf reward minus the mean of the other leaves of its tree; a tree with a single
  leaf gets 0), which scales every advantage of a tree with n leaves by n / (n - 1). The
  official code's later step-mean subtraction (``overall_norm_style``) and terminal sampling
  are trainer choices and are not applied.
- **TreePO** -- "TreePO: Bridging the Gap of Policy Optimization and Efficacy and Inference
  Efficiency with Heuristic Tree-based Modeling" (Li et al., 2025, arXiv:2508.17445; code
  multimodal-art-projection/TreePO). Trajectories are root-to-leaf paths; for leaf i the
  subgroups are the leaf sets below each of its ancestors (the root always; deeper ancestors
  only when they hold more than one leaf, as in the official code), A_i = mean over subgroups
  g of (R_i - mean_g R) ("average", the paper's and the released run script's choice) or the
  subgroup-size weighted mean (``subgroup_weighting="group_size"``, the code's default). A root
  group holding a single trajectory has mean 0 (A = R), as in the official code and verl's
  REINFORCE++-baseline it extends. The advantages are then whitened over all leaves of the
  forest, as the official implementation does with verl's ``masked_whiten`` over the batch's
  response tokens (mean and Bessel-corrected variance, ``(A - mean) / sqrt(var + 1e-8)``);
  ``leaf_weights`` (token counts per trajectory) makes that exactly the token-level whitening,
  without them every trajectory counts once.

Where a paper's text and its released code differ or the paper is silent, the code decides,
and the choice is named above; each formula is checked against a hand-computed example in
tests/test_trees.py.

Backends: C++ on CPU tensors (breadth-first order built once per call, level-synchronous
passes parallel within a level, O(M); keeps up to 256 MiB of scratch memory between calls);
Triton on CUDA (the same passes as segmented reductions, one launch per level; the structure is
built on the device, and the only host sync is reading the number of levels back, once per call,
which ``max_depth=`` removes); the float64 reference otherwise. A cycle, a parent out of range
or a forest without a root raises ValueError naming the first offending node (on CUDA tensors
only with ``RLKERN_VALIDATE=1``: otherwise nodes that do not reach a root get NaN).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
from torch import Tensor

from rlkern import _backend
from rlkern.ops import _checks
from rlkern.reference import trees as reference

_KERNELS = ("cpp", "triton")
_VALUE_MODES = ("mean_children", "mean_leaves")
_METHODS = ("spo_rloo", "spo_grpo", "treerl", "treepo")
_WEIGHTINGS = ("average", "group_size")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INTS = (torch.int32, torch.int64)


# ---------------------------------------------------------------------------------------------
# Checks

def _check_trees(parent, reward, *, name_reward: str = "reward") -> tuple[Tensor, Tensor]:
    """Types, shapes and devices; returns ``(parent int64 contiguous, reward contiguous)``."""
    if not isinstance(parent, Tensor):
        raise TypeError(f"parent must be a torch.Tensor, got {type(parent).__name__}")
    if not isinstance(reward, Tensor):
        raise TypeError(f"{name_reward} must be a torch.Tensor, got {type(reward).__name__}")
    if parent.dtype not in _INTS:
        raise TypeError(f"parent must be int64 (or int32), got {parent.dtype}")
    if reward.dtype not in _FLOATS:
        raise TypeError(f"{name_reward} must be float16/bfloat16/float32/float64, got {reward.dtype}")
    if parent.ndim != 1:
        raise ValueError(f"parent must be [M], got shape {tuple(parent.shape)}")
    if tuple(reward.shape) != tuple(parent.shape):
        raise ValueError(
            f"{name_reward} must have the shape of parent {tuple(parent.shape)}, got {tuple(reward.shape)}"
        )
    if reward.device != parent.device:
        raise ValueError(f"{name_reward} is on {reward.device} but parent is on {parent.device}")
    return parent.to(torch.int64).contiguous(), reward.contiguous()


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_max_depth(max_depth) -> None:
    if max_depth is None:
        return
    if not isinstance(max_depth, int) or isinstance(max_depth, bool):
        raise TypeError(f"max_depth must be an int or None, got {type(max_depth).__name__}")
    if max_depth < 0:
        raise ValueError(f"max_depth must be >= 0 (roots have depth 0), got {max_depth}")


def _validate_structure(parent: Tensor, max_depth: int | None) -> None:
    """Vectorized check for the Triton path (CPU tensors always, CUDA with RLKERN_VALIDATE=1)."""
    if parent.device.type != "cpu" and not _backend.validate_enabled():
        return
    m = parent.numel()
    bad = (parent < -1) | (parent >= m)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"parent[{i}] = {int(parent[i])} is out of range: a parent must be -1 (a root) "
                         f"or a node in [0, {m})")
    if m and not (parent == -1).any():
        raise ValueError("parent has no root (no entry is -1): every node lies on or below a cycle")
    depth = _depths(parent)
    if (depth < 0).any():
        first = int((depth < 0).nonzero()[0])
        raise ValueError(reference.cycle_message(parent.tolist(), first))
    if max_depth is not None and (depth > max_depth).any():
        first = int((depth > max_depth).nonzero()[0])
        raise ValueError(reference.depth_message(max_depth, first, int(depth[first])))


def _depths(parent: Tensor) -> Tensor:
    """``[M]`` int64 depth of every node (roots 0), -1 where the parent chain never reaches a
    root; by pointer doubling: ceil(log2 M) + 1 rounds of gathers, no host sync."""
    idx = torch.arange(parent.numel(), device=parent.device)
    up = torch.where(parent >= 0, parent, idx)
    dist = (parent >= 0).to(torch.int64)
    for _ in range(math.ceil(math.log2(max(parent.numel(), 2))) + 1):
        dist = dist + dist[up]
        up = up[up]
    return torch.where(parent[up] == -1, dist, -1)


def _out_dtype(reward: Tensor) -> torch.dtype:
    return torch.float64 if reward.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Custom ops

@torch.library.custom_op("rlkern::tree_values", mutates_args=())
def _tree_values(parent: Tensor, reward: Tensor, mode: str, max_depth: int | None) -> Tensor:
    backend = _backend.choose(reward.device, _KERNELS, reward.dtype, fp64=_KERNELS)
    if backend == "cpp":
        return torch.ops.rlkern.cpp_tree_values(parent, reward, _VALUE_MODES.index(mode),
                                             -1 if max_depth is None else max_depth)
    if backend == "triton":
        from rlkern.kernels import trees as triton_trees

        _validate_structure(parent, max_depth)
        return triton_trees.tree_values(parent, reward, mode, max_depth)
    return reference.tree_values(parent.cpu(), reward.cpu(), mode, max_depth).to(reward.device, _out_dtype(reward))


@_tree_values.register_fake
def _tree_values_fake(parent, reward, mode, max_depth):
    return reward.new_empty(parent.shape, dtype=_out_dtype(reward))


@torch.library.custom_op("rlkern::tree_advantages", mutates_args=())
def _tree_advantages(
    parent: Tensor,
    reward: Tensor,
    method: str,
    leaf_rloo: bool,
    subgroup_weighting: str,
    whiten: bool,
    leaf_weights: Tensor | None,
    epsilon: float,
    with_values: bool,
    max_depth: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    backend = _backend.choose(reward.device, _KERNELS, reward.dtype, fp64=_KERNELS)
    group_size = subgroup_weighting == "group_size"
    if backend == "cpp":
        return torch.ops.rlkern.cpp_tree_advantages(parent, reward, _METHODS.index(method), leaf_rloo, group_size,
                                                 whiten, leaf_weights, epsilon, with_values,
                                                 -1 if max_depth is None else max_depth)
    if backend == "triton":
        from rlkern.kernels import trees as triton_trees

        _validate_structure(parent, max_depth)
        return triton_trees.tree_advantages(parent, reward, method, leaf_rloo, group_size, whiten, leaf_weights,
                                            epsilon, with_values, max_depth)
    adv, keep, values = reference.tree_advantages(parent.cpu(), reward.cpu(), method, leaf_rloo, subgroup_weighting,
                                                  whiten, None if leaf_weights is None else leaf_weights.cpu(), epsilon,
                                                  return_values=True, max_depth=max_depth)
    dtype = _out_dtype(reward)
    values = values if with_values else values.new_empty(0)
    return adv.to(reward.device, dtype), keep.to(reward.device), values.to(reward.device, dtype)


@_tree_advantages.register_fake
def _tree_advantages_fake(parent, reward, method, leaf_rloo, subgroup_weighting, whiten, leaf_weights, epsilon,
                          with_values, max_depth):
    dtype = _out_dtype(reward)
    return (reward.new_empty(parent.shape, dtype=dtype), reward.new_empty(parent.shape, dtype=torch.bool),
            reward.new_empty(parent.shape if with_values else (0,), dtype=dtype))


# ---------------------------------------------------------------------------------------------
# Public tree ops

def tree_values(
    parent: Tensor, reward: Tensor, mode: str = "mean_children", *, max_depth: int | None = None
) -> Tensor:
    """Monte Carlo value of every node of a forest.

    Args:
        parent: ``[M]`` int64 (int32 accepted), the parent of each node, -1 for roots; nodes in
            any order. A cycle, a parent out of range (< -1 or >= M) or a forest without a root
            raises ValueError naming the first offending node.
        reward: ``[M]`` float (any float dtype), read on leaves only (internal entries may be NaN).
        mode: ``"mean_children"`` -- SPO-tree ("Segment Policy Optimization"): V(leaf) = reward,
            V(n) = mean of its direct children's V (the official tree code's ``np.mean`` of
            child rewards; equal children give their value exactly). ``"mean_leaves"`` --
            TreeRL ("TreeRL: LLM Reinforcement Learning with On-Policy Tree Search"): V(n) = mean
            reward of the leaves in n's subtree. Default: SPO-tree's.
        max_depth: an upper bound on the depth of every node (roots have depth 0), e.g. the tree
            search's depth limit; None (default): not known. A node deeper than that raises
            ValueError naming the smallest such node (on CUDA tensors only with
            ``RLKERN_VALIDATE=1``: otherwise every node of its tree gets a NaN value). The CUDA
            path is the one that needs it: given, it runs without any host sync (CUDA-graph
            capturable) and makes ``max_depth + 1`` launches per pass, one per level, so a tight
            bound is cheapest; without it, it reads the depth of the forest back once per call
            (one sync, a single int). Validation (``RLKERN_VALIDATE=1``) syncs by design.

    Returns:
        ``[M]`` float32 values (float64 for float64 rewards), in the node order of ``parent``.
    """
    parent, reward = _check_trees(parent, reward)
    _check_choice("mode", mode, _VALUE_MODES)
    _check_max_depth(max_depth)
    return _tree_values(parent, reward, mode, max_depth)


def tree_advantages(
    parent: Tensor,
    reward: Tensor,
    method: str = "spo_rloo",
    *,
    leaf_rloo: bool = False,
    subgroup_weighting: str = "average",
    whiten: bool = True,
    leaf_weights: Tensor | None = None,
    epsilon: float = 1e-8,
    return_values: bool = False,
    max_depth: int | None = None,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Per-node advantages of a forest of tree rollouts, and which nodes to train on.

    Formulas (module docstring: papers and every choice they leave open):

    - ``"spo_rloo"`` (SPO-tree, "Segment Policy Optimization"): A(n) = V(n) - V(parent(n)),
      V = ``tree_values(mode="mean_children")``, so V(parent) is the mean over all of its
      children with n included. ``keep`` = non-root nodes with A != 0 (the paper's filter).
    - ``"spo_grpo"``: the same difference / (population std of the V of n and its siblings
      + ``epsilon``); same ``keep``.
    - ``"treerl"`` ("TreeRL"): A(n) = ((V(n) - V(root)) + (V(n) - V(parent(n)))) / sqrt(L(n)),
      V = ``tree_values(mode="mean_leaves")``, L(n) = number of leaves below n; ``leaf_rloo``
      first replaces each leaf reward by itself minus the mean of the other leaves of its tree
      (the official code). ``keep`` = non-root nodes.
    - ``"treepo"`` ("TreePO"): one advantage per leaf (trajectory): A_i = mean over the
      subgroups g on its path (leaves below the root, and below each deeper ancestor holding
      more than one leaf) of (R_i - mean_g R); ``subgroup_weighting="group_size"`` weights the
      subgroups by their size. ``whiten`` then applies verl's ``masked_whiten`` over all leaves
      of the forest (each weighted by ``leaf_weights``, e.g. its trajectory's token count, else
      1). ``keep`` = leaves; internal nodes get 0: broadcast a leaf's advantage over its whole
      root-to-leaf trajectory with ``broadcast_to_tokens(..., node_index=leaf of each segment)``.

    Roots (prompts) always get A = 0 and ``keep`` False.

    Args:
        parent: ``[M]`` int64, -1 for roots, nodes in any order (see ``tree_values``).
        reward: ``[M]`` float, read on leaves only.
        method: ``"spo_rloo"`` (default, the SPO authors' ``adv_method`` default ``"rloo"``),
            ``"spo_grpo"``, ``"treerl"`` or ``"treepo"``.
        leaf_rloo: TreeRL only: the official code's leaf-reward normalization. Default False
            (the paper's formula).
        subgroup_weighting: TreePO only: ``"average"`` (the paper; TreePO's run script) or
            ``"group_size"``.
        whiten: TreePO only: whiten over the forest's leaves (the paper's normalization).
        leaf_weights: TreePO only: ``[M]`` float, read on leaves: the weight of each trajectory
            in the whitening statistics (its token count reproduces token-level whitening).
        epsilon: SPO ``spo_grpo`` only: added to the std (the official code's 1e-8); must be
            > 0 (a group of equal values would be 0 / 0).
        return_values: also return the node values the advantages come from (``tree_values``
            with ``mean_children`` for SPO, ``mean_leaves`` for TreeRL/TreePO, raw rewards), from
            the same pass: building the forest's order is most of the cost of either op.
        max_depth: an upper bound on the depth of every node, as in ``tree_values``: lets the
            CUDA path run without a host sync. A tree deeper than that raises ValueError, except
            on CUDA without ``RLKERN_VALIDATE=1``: there its nodes get NaN values and advantages
            (its root A = 0; ``keep`` False below the bound).

    Returns:
        ``(advantages, keep)``: ``[M]`` float32 (float64 for float64 rewards) and ``[M]`` bool;
        with ``return_values``, ``(advantages, keep, values)``, values ``[M]`` like advantages.
    """
    parent, reward = _check_trees(parent, reward)
    _check_choice("method", method, _METHODS)
    _check_choice("subgroup_weighting", subgroup_weighting, _WEIGHTINGS)
    # > 0: with 0 a group of equal values would be 0 / 0 = NaN (and marked trainable)
    epsilon = _checks.number("tree_advantages", "epsilon", epsilon, low=0, low_open=True)
    if leaf_weights is not None:
        _, leaf_weights = _check_trees(parent, leaf_weights, name_reward="leaf_weights")
        if _checks.host_checks(leaf_weights):
            is_leaf = torch.ones(parent.numel(), dtype=torch.bool, device=parent.device)
            is_leaf[parent[(parent >= 0) & (parent < parent.numel())]] = False
            bad = (is_leaf & ~(leaf_weights >= 0)).nonzero()
            if bad.numel():
                node = int(bad[0])
                raise ValueError(f"tree_advantages: leaf_weights must be >= 0 on leaves (a trajectory's weight in "
                                 f"the whitening), got {float(leaf_weights[node])} at node {node}")
    _check_max_depth(max_depth)
    adv, keep, values = _tree_advantages(parent, reward, method, bool(leaf_rloo), subgroup_weighting, bool(whiten),
                                         leaf_weights, float(epsilon), bool(return_values), max_depth)
    return (adv, keep, values) if return_values else (adv, keep)


# ---------------------------------------------------------------------------------------------
# Nested dicts -> flat forest

class Forest(NamedTuple):
    """A flat forest: every field ``[M]``, nodes in depth-first preorder, trees one after another."""

    parent: Tensor  # int64, -1 for roots
    reward: Tensor  # float32 (or the requested dtype); NaN where a node has no "reward"
    tree_id: Tensor  # int64, index of the node's tree in the input list
    segment_start: Tensor | None  # int64 token offsets into the packed node-order token array
    segment_end: Tensor | None


def from_nested(trees, *, dtype: torch.dtype = torch.float32, device=None) -> Forest:
    """Build a flat forest from nested dicts, the layout research code holds.

    Each node is a dict ``{"reward": r, "children": [...]}``; ``"reward"`` is required on leaves
    (a node without ``"children"`` or with an empty list) and optional elsewhere. A node may
    carry its segment's tokens as ``"num_tokens"`` (int) or ``"token_ids"`` (a list): when every
    node does, ``segment_start/segment_end`` give each node's range in a packed array holding the
    nodes' tokens in the returned node order.

    Args:
        trees: one root dict or a list of root dicts.
        dtype: float dtype of ``reward``.
        device: device of the returned tensors.

    Returns:
        ``Forest(parent, reward, tree_id, segment_start, segment_end)``.

    Raises:
        ValueError naming the node by its path (``tree 0.children[1].children[0]``) when a dict appears
        twice (a cycle, or a node shared by two parents), ``children`` is not a list of dicts, a
        leaf has no reward, or token counts are missing on some nodes only.
    """
    roots = [trees] if isinstance(trees, dict) else list(trees)
    parent, reward, tree_id, tokens = [], [], [], []
    position: list[int] = []  # index of each node among its parent's children (-1: a root)
    seen: dict[int, int] = {}  # id(dict) -> node index; paths are built only for an error message

    def path(index: int, tail: str = "") -> str:
        while parent[index] >= 0:
            tail = f".children[{position[index]}]" + tail
            index = parent[index]
        return f"tree {tree_id[index]}" + tail

    def is_ancestor(candidate: int, index: int) -> bool:
        while index >= 0 and index != candidate:
            index = parent[index]
        return index == candidate

    for t, root in enumerate(roots):
        if not isinstance(root, dict):
            raise ValueError(f"tree {t} must be a dict, got {type(root).__name__}")
        stack = [(root, -1, -1)]  # (node, parent index, position among the parent's children)
        while stack:
            node, par, pos = stack.pop()
            key = id(node)
            if key in seen:
                where = f"tree {t}" if par < 0 else path(par, f".children[{pos}]")
                if par >= 0 and is_ancestor(seen[key], par):
                    raise ValueError(f"{where} is its own ancestor (a cycle back to {path(seen[key])})")
                raise ValueError(f"{where} is the same dict as {path(seen[key])} (a node may have one parent only)")
            index = len(parent)
            seen[key] = index
            parent.append(par)
            position.append(pos)
            tree_id.append(t)
            children = node.get("children") or []
            if not isinstance(children, (list, tuple)) or not all(isinstance(c, dict) for c in children):
                raise ValueError(f"{path(index)}: 'children' must be a list of dicts")
            value = node.get("reward")
            if value is not None:
                if isinstance(value, (str, bytes)) or not isinstance(value, numbers.Real):
                    raise ValueError(f"{path(index)}: 'reward' must be a number, got {value!r}")
                reward.append(float(value))
            elif not children:
                raise ValueError(f"{path(index)} is a leaf without a 'reward'")
            else:
                reward.append(math.nan)
            if "num_tokens" in node:
                count = node["num_tokens"]
                if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
                    raise ValueError(f"{path(index)}: 'num_tokens' must be an int >= 0, got {count!r}")
                tokens.append(int(count))
            elif "token_ids" in node:
                tokens.append(len(node["token_ids"]))
            else:
                tokens.append(None)
            for j in range(len(children) - 1, -1, -1):
                stack.append((children[j], index, j))
    have = [n is not None for n in tokens]
    segment_start = segment_end = None
    if any(have):
        if not all(have):
            raise ValueError(f"node {have.index(False)} (preorder) has no 'num_tokens'/'token_ids' while others do")
        ends = torch.tensor(tokens, dtype=torch.int64).cumsum(0)
        segment_end = ends.to(device)
        segment_start = (ends - torch.tensor(tokens, dtype=torch.int64)).to(device)
    return Forest(
        torch.tensor(parent, dtype=torch.int64, device=device),
        torch.tensor(reward, dtype=dtype, device=device),
        torch.tensor(tree_id, dtype=torch.int64, device=device),
        segment_start,
        segment_end,
    )


# ---------------------------------------------------------------------------------------------
# SPO-chain: cut points, segment advantages, probability mask

def _check_packed(name: str, x, cu_seqlens: Tensor, floats: bool = True) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floats and x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a float tensor, got {x.dtype}")
    if x.ndim != 1:
        raise ValueError(f"{name} must be packed [T] (see cu_seqlens), got shape {tuple(x.shape)}")
    if x.device != cu_seqlens.device:
        raise ValueError(f"{name} is on {x.device} but cu_seqlens is on {cu_seqlens.device}")


def _check_cu_seqlens(cu_seqlens, total: int) -> Tensor:
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype not in _INTS or cu_seqlens.ndim != 1:
        raise TypeError(f"cu_seqlens must be a [B+1] int32/int64 tensor, got "
                        f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)}")
    if cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must have B+1 >= 1 entries")
    # skipped while compiling, and on CUDA without RLKERN_VALIDATE=1: the bounds are then the caller's
    # responsibility (the forest structure is still checked inside the tree kernels)
    if _checks.host_checks(cu_seqlens):
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total or bool((cu_seqlens.diff() < 0).any()):
            raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at T={total}, "
                             f"got {cu_seqlens.tolist()[:8]}{'...' if cu_seqlens.numel() > 8 else ''}")
    return cu_seqlens.to(torch.int64)


def _sequence_of_tokens(cu_seqlens: Tensor, total: int) -> Tensor:
    """``[T]`` int64: the sequence each packed token belongs to (no host sync)."""
    return torch.repeat_interleave(torch.arange(cu_seqlens.numel() - 1, device=cu_seqlens.device),
                                   cu_seqlens.diff(), output_size=total)


@torch.library.custom_op("rlkern::spo_cutpoints", mutates_args=())
def _spo_cutpoints(logprobs: Tensor, cu_seqlens: Tensor, threshold: float, interval: int) -> Tensor:
    total = logprobs.numel()
    low = logprobs.to(_out_dtype(logprobs)).exp() < threshold
    before = torch.cumsum(low, 0) - low.long()  # low-probability tokens before t, whole batch
    before_seq = torch.cat([before, low.sum().reshape(1)])[cu_seqlens[:-1]]  # an empty last sequence starts at T
    seq = _sequence_of_tokens(cu_seqlens, total)
    return low & ((before - before_seq[seq]) % interval == 0)


@_spo_cutpoints.register_fake
def _spo_cutpoints_fake(logprobs, cu_seqlens, threshold, interval):
    return logprobs.new_empty(logprobs.shape, dtype=torch.bool)


def spo_cutpoints(logprobs: Tensor, cu_seqlens: Tensor, *, threshold: float = 0.9, interval: int = 5) -> Tensor:
    """SPO-chain cut points ("Segment Policy Optimization", cutpoint-based partition).

    A token is a candidate when its sampling probability is below ``threshold``; every
    ``interval``-th candidate of a sequence, starting with the first, opens a new segment, and
    the state just before it (the prompt plus the tokens before it) is a cut point whose value is
    estimated by Monte Carlo rollouts. This is the official code's
    ``np.where(p < 0.9)[0][::cutpoint_interval]`` (its indices minus one name the same states).

    Args:
        logprobs: packed ``[T]`` float, log-probabilities of the sampled tokens under the rollout
            policy (old log-probs).
        cu_seqlens: ``[B+1]`` int32/int64 sequence offsets into the packed tokens.
        threshold: probability below which a token can open a segment (the paper's 0.9).
        interval: keep every ``interval``-th candidate (the paper's "int5": 5).

    Returns:
        ``[T]`` bool, True at tokens that open a segment.
    """
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    _check_packed("logprobs", logprobs, cu_seqlens)
    cu = _check_cu_seqlens(cu_seqlens, logprobs.numel())
    if not (isinstance(interval, int) and interval >= 1):
        raise ValueError(f"interval must be an int >= 1, got {interval!r}")
    if not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
        raise ValueError(f"threshold must be a probability in (0, 1], got {threshold!r}")
    return _spo_cutpoints(logprobs.contiguous(), cu, float(threshold), int(interval))


@torch.library.custom_op("rlkern::segment_advantages", mutates_args=())
def _segment_advantages(
    segment_start: Tensor,
    cut_values: Tensor,
    final_reward: Tensor,
    cu_seqlens: Tensor,
    logprobs: Tensor | None,
    threshold: float,
) -> tuple[Tensor, Tensor]:
    total = segment_start.numel()
    dtype = _out_dtype(cut_values)
    device = segment_start.device
    seq = _sequence_of_tokens(cu_seqlens, total)
    idx = torch.arange(total, device=device)
    # Latest segment start at or before t, and the first one after t (both per batch; checked
    # against the sequence bounds below).
    prev = torch.where(segment_start, idx, -1).cummax(0).values
    later = torch.where(segment_start, idx, total).flip(0).cummin(0).values.flip(0)
    nxt = torch.cat([later[1:], later.new_full((1,), total)])
    has_prev = prev >= cu_seqlens[seq]
    has_next = nxt < cu_seqlens[seq + 1]
    values = cut_values.to(dtype)
    v_prev = values[prev.clamp(min=0)]
    v_next = torch.where(has_next, values[nxt.clamp(max=max(total - 1, 0))], final_reward.to(dtype)[seq])
    adv = torch.where(has_prev, v_next - v_prev, torch.zeros((), dtype=dtype, device=device))
    if logprobs is None:
        mask = torch.ones_like(segment_start)
    else:
        mask = logprobs.to(dtype).exp() < threshold
        adv = torch.where(mask, adv, torch.zeros((), dtype=dtype, device=device))
    return adv, mask


@_segment_advantages.register_fake
def _segment_advantages_fake(segment_start, cut_values, final_reward, cu_seqlens, logprobs, threshold):
    return (segment_start.new_empty(segment_start.shape, dtype=_out_dtype(cut_values)),
            segment_start.new_empty(segment_start.shape, dtype=torch.bool))


def segment_advantages(
    segment_start: Tensor,
    cut_values: Tensor,
    final_reward: Tensor,
    cu_seqlens: Tensor,
    *,
    logprobs: Tensor | None = None,
    threshold: float = 0.9,
) -> tuple[Tensor, Tensor]:
    """SPO-chain segment advantages and probability mask ("Segment Policy Optimization").

    In each sequence the segment starts t_1 < ... < t_K (``spo_cutpoints``) cut it into
    segments [t_k, t_{k+1}) (the last one ends with the sequence). With V_k the Monte Carlo value
    of the state before t_k and V_{K+1} the final reward, every token of segment k gets
    A = V_{k+1} - V_k (chain-based advantage estimation). Tokens before the first start get 0,
    as in the official code, which has no value for the prompt state unless the very first token
    is a cut point (then V_1 is the prompt's value); a sequence with no start gets 0 throughout.

    Probability mask: tokens whose probability is not below ``threshold`` get advantage 0 and
    ``loss_mask`` False (the official trainer's ``exp(old_logprobs) < 0.9`` mask, which also
    removes them from the loss normalization; the episode code zeroes those with p > 0.9).

    Args:
        segment_start: packed ``[T]`` bool, True where a segment opens.
        cut_values: packed ``[T]`` float, read where ``segment_start``: MC value of the state
            before that token.
        final_reward: ``[B]`` float, the outcome reward of each sequence.
        cu_seqlens: ``[B+1]`` int32/int64 offsets.
        logprobs: packed ``[T]`` float rollout log-probs for the probability mask; None: no mask.
        threshold: the mask's probability threshold (the paper's 0.9).

    Returns:
        ``(advantages, loss_mask)``: ``[T]`` float32 (float64 for float64 ``cut_values``) and
        ``[T]`` bool (all True without ``logprobs``).
    """
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    _check_packed("segment_start", segment_start, cu_seqlens, floats=False)
    if segment_start.dtype != torch.bool:
        raise TypeError(f"segment_start must be bool, got {segment_start.dtype}")
    total = segment_start.numel()
    _check_packed("cut_values", cut_values, cu_seqlens)
    if cut_values.numel() != total:
        raise ValueError(f"cut_values must be [T] = [{total}], got {tuple(cut_values.shape)}")
    cu = _check_cu_seqlens(cu_seqlens, total)
    _check_packed("final_reward", final_reward, cu_seqlens)
    if final_reward.numel() != cu.numel() - 1:
        raise ValueError(f"final_reward must be [B] = [{cu.numel() - 1}], got {tuple(final_reward.shape)}")
    if logprobs is not None:
        _check_packed("logprobs", logprobs, cu_seqlens)
        if logprobs.numel() != total:
            raise ValueError(f"logprobs must be [T] = [{total}], got {tuple(logprobs.shape)}")
    if not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
        raise ValueError(f"threshold must be a probability in (0, 1], got {threshold!r}")
    if total == 0:  # no token (B empty sequences, or B = 0): nothing to advantage
        return (cut_values.new_zeros(0, dtype=_out_dtype(cut_values)),
                torch.zeros(0, dtype=torch.bool, device=cut_values.device))
    return _segment_advantages(segment_start.contiguous(), cut_values.contiguous(), final_reward.contiguous(), cu,
                               None if logprobs is None else logprobs.contiguous(), float(threshold))


# ---------------------------------------------------------------------------------------------
# Node values -> packed tokens

@torch.library.custom_op("rlkern::broadcast_to_tokens", mutates_args=())
def _broadcast_to_tokens(node_values: Tensor, segment_start: Tensor, segment_end: Tensor, num_tokens: int,
                         node_index: Tensor | None, fill: float) -> Tensor:
    device = node_values.device
    dtype = _out_dtype(node_values)
    tag = torch.arange(1, segment_start.numel() + 1, device=device)
    # +k at a segment's start, -k at its end: the running sum is k inside segment k, 0 in gaps.
    delta = torch.zeros(num_tokens + 1, dtype=torch.int64, device=device)
    delta.index_add_(0, segment_start, tag).index_add_(0, segment_end, -tag)
    owner = delta.cumsum(0)[:num_tokens] - 1
    values = node_values.to(dtype)
    if node_index is not None:
        values = values[node_index]
    gathered = values[owner.clamp(min=0)] if values.numel() else values.new_zeros(num_tokens)
    return torch.where(owner >= 0, gathered, torch.full((), fill, dtype=dtype, device=device))


@_broadcast_to_tokens.register_fake
def _broadcast_to_tokens_fake(node_values, segment_start, segment_end, num_tokens, node_index, fill):
    return node_values.new_empty((num_tokens,), dtype=_out_dtype(node_values))


def broadcast_to_tokens(
    node_values: Tensor,
    segment_start: Tensor,
    segment_end: Tensor,
    num_tokens: int,
    *,
    node_index: Tensor | None = None,
    fill: float = 0.0,
) -> Tensor:
    """Spread per-node values (advantages) over a packed token layout, in one pass.

    Segment k covers tokens ``[segment_start[k], segment_end[k])`` and takes
    ``node_values[node_index[k]]`` (``node_values[k]`` without ``node_index``). Two layouts:
    node-packed (each node's tokens once, SPO-tree's one sample per edge: pass ``from_nested``'s
    offsets) and trajectory-packed (each root-to-leaf path is one sequence, TreeRL/TreePO: one
    segment per (trajectory, node on its path), ``node_index`` naming the node -- or the leaf,
    for TreePO's per-trajectory advantages). Tokens in no segment get ``fill``.

    Args:
        node_values: ``[M]`` float.
        segment_start, segment_end: ``[S]`` int64 token offsets, 0 <= start <= end <= num_tokens;
            segments must not overlap (checked on CPU tensors, and on CUDA with RLKERN_VALIDATE=1).
        num_tokens: T, the packed length.
        node_index: ``[S]`` int64 in [0, M), or None (then S must equal M).
        fill: value of tokens outside every segment (0: no advantage).

    Returns:
        ``[num_tokens]`` float32 (float64 for float64 ``node_values``).
    """
    for name, t in (("node_values", node_values), ("segment_start", segment_start), ("segment_end", segment_end)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if node_values.dtype not in _FLOATS or node_values.ndim != 1:
        raise TypeError(f"node_values must be a [M] float tensor, got {node_values.dtype} {tuple(node_values.shape)}")
    if segment_start.dtype not in _INTS or segment_end.dtype not in _INTS:
        raise TypeError(f"segment_start/segment_end must be int64, got {segment_start.dtype}/{segment_end.dtype}")
    if segment_start.ndim != 1 or segment_start.shape != segment_end.shape:
        raise ValueError(f"segment_start and segment_end must both be [S], got {tuple(segment_start.shape)} "
                         f"and {tuple(segment_end.shape)}")
    if not (isinstance(num_tokens, int) and num_tokens >= 0):
        raise ValueError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
    if node_index is None:
        if segment_start.numel() != node_values.numel():
            raise ValueError(f"without node_index there must be one segment per node: {node_values.numel()} "
                             f"nodes, {segment_start.numel()} segments")
    elif node_index.dtype not in _INTS or tuple(node_index.shape) != tuple(segment_start.shape):
        raise ValueError(f"node_index must be int64 of shape {tuple(segment_start.shape)}, got "
                         f"{node_index.dtype} {tuple(node_index.shape)}")
    for name, t in (("segment_start", segment_start), ("segment_end", segment_end), ("node_index", node_index)):
        if t is not None and t.device != node_values.device:
            raise ValueError(f"{name} is on {t.device} but node_values is on {node_values.device}")
    start, end = segment_start.to(torch.int64).contiguous(), segment_end.to(torch.int64).contiguous()
    if _checks.host_checks(node_values):
        _check_segments(start, end, num_tokens, node_index, node_values.numel())
    return _broadcast_to_tokens(node_values.contiguous(), start, end, num_tokens,
                                None if node_index is None else node_index.to(torch.int64).contiguous(), float(fill))


def _check_segments(start: Tensor, end: Tensor, num_tokens: int, node_index: Tensor | None, m: int) -> None:
    bad = (start < 0) | (end < start) | (end > num_tokens)
    if bad.any():
        k = int(bad.nonzero()[0])
        raise ValueError(f"segment {k} = [{int(start[k])}, {int(end[k])}) is not within [0, num_tokens={num_tokens}]")
    if node_index is not None and node_index.numel() and bool(((node_index < 0) | (node_index >= m)).any()):
        k = int(((node_index < 0) | (node_index >= m)).nonzero()[0])
        raise ValueError(f"node_index[{k}] = {int(node_index[k])} is not a node in [0, {m})")
    nonempty = (end > start).nonzero().flatten()
    order = nonempty[start[nonempty].argsort(stable=True)]
    overlap = end[order[:-1]] > start[order[1:]]
    if overlap.any():
        j = int(overlap.nonzero()[0])
        a, b = sorted((int(order[j]), int(order[j + 1])))
        raise ValueError(f"segments {a} and {b} overlap: [{int(start[a])}, {int(end[a])}) and "
                         f"[{int(start[b])}, {int(end[b])})")
