"""Tree and segment advantages over forests of rollouts: SPO-tree, SPO-chain, TreeRL, TreePO, ARPO.

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
- **ARPO** -- "Agentic Reinforced Policy Optimization" (Dong et al., 2025, arXiv:2507.19849; code
  dongguanting/ARPO), its *hard* advantage attribution over the entropy-branched rollout tree of
  a question: each trajectory (leaf) i gets GRPO's advantage over the leaves of its tree,
  A_i = (R_i - mean R) / (std R + eps), and a token shared by several trajectories the mean of
  their advantages; on the tree, node n gets the mean over the leaves below it, which is
  A(n) = (V(n) - V(root)) / (std + eps) with V the mean reward of the leaves below. The paper
  leaves the normalization to its trainer, which extends verl's ``grpo`` estimator: rlkern takes
  rlkern.grpo's conventions exactly, the Bessel-corrected std and a tree with a single leaf
  normalized with mean 0 and std 1 (verl's group of one). The paper's default is the *soft*
  attribution (plain GRPO over the full trajectories, ``rlkern.grpo``); ``get("arpo")`` with
  ``attribution="hard"`` calls this.
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
from rlkern.ops._layout import out_dtype
from rlkern.reference import trees as reference

_VALUE_MODES = ("mean_children", "mean_leaves")
_METHODS = ("spo_rloo", "spo_grpo", "treerl", "treepo", "arpo")
_WEIGHTINGS = ("average", "group_size")


# ---------------------------------------------------------------------------------------------
# Checks

def _check_trees(op: str, parent, reward, *, name_reward: str = "reward") -> tuple[Tensor, Tensor]:
    """Types, shapes and devices; returns ``(parent int64 contiguous, reward contiguous)``."""
    if isinstance(parent, Tensor) and parent.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: parent must be int64 (or int32), got {parent.dtype}")
    _checks.tensors(op, "parent", {"parent": (parent, "int"), name_reward: (reward, "float")})
    if parent.ndim != 1:
        raise ValueError(f"{op}: parent must be [M], got shape {tuple(parent.shape)}")
    if tuple(reward.shape) != tuple(parent.shape):
        raise ValueError(f"{op}: {name_reward} must have the shape of parent {tuple(parent.shape)}, "
                         f"got {tuple(reward.shape)}")
    return parent.to(torch.int64).contiguous(), reward.contiguous()


def _named(op: str, kernel, *args):
    """``kernel(*args)``; the structure errors the C++ kernel and the reference raise (a parent
    out of range, a cycle, a tree deeper than max_depth) do not know the op: prefix its name."""
    try:
        return kernel(*args)
    except ValueError as error:
        if str(error).startswith(f"{op}: "):
            raise
        raise ValueError(f"{op}: {error}") from None


def _check_max_depth(op: str, max_depth) -> None:
    if max_depth is None:
        return
    if not isinstance(max_depth, int) or isinstance(max_depth, bool):
        raise TypeError(f"{op}: max_depth must be an int or None, got {type(max_depth).__name__}")
    if max_depth < 0:
        raise ValueError(f"{op}: max_depth must be >= 0 (roots have depth 0), got {max_depth}")


def _validate_structure(op: str, parent: Tensor, max_depth: int | None) -> None:
    """Vectorized check for the Triton path (CPU tensors always, CUDA with RLKERN_VALIDATE=1)."""
    if parent.device.type != "cpu" and not _backend.validate_enabled():
        return
    m = parent.numel()
    bad = (parent < -1) | (parent >= m)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"{op}: parent[{i}] = {int(parent[i])} is out of range: a parent must be -1 (a root) "
                         f"or a node in [0, {m})")
    if m and not (parent == -1).any():
        raise ValueError(f"{op}: parent has no root (no entry is -1): every node lies on or below a cycle")
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


# ---------------------------------------------------------------------------------------------
# Custom ops

def _cpp_tree_values(parent, reward, mode, max_depth):
    return torch.ops.rlkern.cpp_tree_values(parent, reward, _VALUE_MODES.index(mode), -1 if max_depth is None else max_depth)


def _triton_tree_values(parent, reward, mode, max_depth):
    from rlkern.kernels import trees as triton_trees

    _validate_structure("tree_values", parent, max_depth)
    return triton_trees.tree_values(parent, reward, mode, max_depth)


def _reference_tree_values(parent, reward, mode, max_depth):
    return reference.tree_values(parent.cpu(), reward.cpu(), mode, max_depth).to(reward.device, out_dtype(reward))


_VALUES = _backend.Kernels("tree_values", cpp=_cpp_tree_values, triton=_triton_tree_values, torch=_reference_tree_values,
                           fp64=("cpp", "triton"))


@torch.library.custom_op("rlkern::tree_values", mutates_args=())
def _tree_values(parent: Tensor, reward: Tensor, mode: str, max_depth: int | None) -> Tensor:
    return _VALUES.pick(reward)(parent, reward, mode, max_depth)


@_tree_values.register_fake
def _tree_values_fake(parent, reward, mode, max_depth):
    return reward.new_empty(parent.shape, dtype=out_dtype(reward))


def _cpp_tree_advantages(parent, reward, method, leaf_rloo, subgroup_weighting, whiten, leaf_weights, eps,
                         with_values, max_depth):
    return torch.ops.rlkern.cpp_tree_advantages(parent, reward, _METHODS.index(method), leaf_rloo,
                                                subgroup_weighting == "group_size", whiten, leaf_weights, eps,
                                                with_values, -1 if max_depth is None else max_depth)


def _triton_tree_advantages(parent, reward, method, leaf_rloo, subgroup_weighting, whiten, leaf_weights, eps,
                            with_values, max_depth):
    from rlkern.kernels import trees as triton_trees

    _validate_structure("tree_advantages", parent, max_depth)
    return triton_trees.tree_advantages(parent, reward, method, leaf_rloo, subgroup_weighting == "group_size", whiten,
                                        leaf_weights, eps, with_values, max_depth)


def _reference_tree_advantages(parent, reward, method, leaf_rloo, subgroup_weighting, whiten, leaf_weights, eps,
                               with_values, max_depth):
    adv, keep, values = reference.tree_advantages(parent.cpu(), reward.cpu(), method, leaf_rloo, subgroup_weighting,
                                                  whiten, None if leaf_weights is None else leaf_weights.cpu(), eps,
                                                  return_values=True, max_depth=max_depth)
    dtype = out_dtype(reward)
    values = values if with_values else values.new_empty(0)
    return adv.to(reward.device, dtype), keep.to(reward.device), values.to(reward.device, dtype)


_ADVANTAGES = _backend.Kernels("tree_advantages", cpp=_cpp_tree_advantages, triton=_triton_tree_advantages,
                               torch=_reference_tree_advantages, fp64=("cpp", "triton"))


@torch.library.custom_op("rlkern::tree_advantages", mutates_args=())
def _tree_advantages(
    parent: Tensor,
    reward: Tensor,
    method: str,
    leaf_rloo: bool,
    subgroup_weighting: str,
    whiten: bool,
    leaf_weights: Tensor | None,
    eps: float,
    with_values: bool,
    max_depth: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    return _ADVANTAGES.pick(reward)(parent, reward, method, leaf_rloo, subgroup_weighting, whiten, leaf_weights, eps,
                                    with_values, max_depth)


@_tree_advantages.register_fake
def _tree_advantages_fake(parent, reward, method, leaf_rloo, subgroup_weighting, whiten, leaf_weights, eps,
                          with_values, max_depth):
    dtype = out_dtype(reward)
    return (reward.new_empty(parent.shape, dtype=dtype), reward.new_empty(parent.shape, dtype=torch.bool),
            reward.new_empty(parent.shape if with_values else (0,), dtype=dtype))


# ---------------------------------------------------------------------------------------------
# Public tree ops

def tree_values(
    parent: Tensor, reward: Tensor, *, mode: str = "mean_children", max_depth: int | None = None
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
    parent, reward = _check_trees("tree_values", parent, reward)
    _checks.choice("tree_values", "mode", mode, _VALUE_MODES)
    _check_max_depth("tree_values", max_depth)
    return _named("tree_values", _tree_values, parent, reward, mode, max_depth)


class TreeAdvantages(NamedTuple):
    """``tree_advantages``' result: ``[M]`` advantages (float32, float64 for float64 rewards) and
    ``[M]`` bool ``keep`` (the nodes to train on)."""

    advantages: Tensor
    keep: Tensor


class TreeAdvantagesAndValues(NamedTuple):
    """``tree_advantages(..., return_values=True)``: also the ``[M]`` node values."""

    advantages: Tensor
    keep: Tensor
    values: Tensor


def tree_advantages(
    parent: Tensor,
    reward: Tensor,
    *,
    method: str = "spo_rloo",
    leaf_rloo: bool = False,
    subgroup_weighting: str = "average",
    whiten: bool = True,
    leaf_weights: Tensor | None = None,
    eps: float = 1e-8,
    return_values: bool = False,
    max_depth: int | None = None,
) -> TreeAdvantages | TreeAdvantagesAndValues:
    """Per-node advantages of a forest of tree rollouts, and which nodes to train on.

    Formulas (module docstring: papers and every choice they leave open):

    - ``"spo_rloo"`` (SPO-tree, "Segment Policy Optimization"): A(n) = V(n) - V(parent(n)),
      V = ``tree_values(mode="mean_children")``, so V(parent) is the mean over all of its
      children with n included. ``keep`` = non-root nodes with A != 0 (the paper's filter).
    - ``"spo_grpo"``: the same difference / (population std of the V of n and its siblings
      + ``eps``); same ``keep``.
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
    - ``"arpo"`` (ARPO's hard attribution, "Agentic Reinforced Policy Optimization"): leaf i gets
      GRPO's A_i = (R_i - mean R) / (std R + ``eps``) over the leaves of its tree (std
      Bessel-corrected; a tree with one leaf: mean 0, std 1, as ``rlkern.grpo``); node n the mean
      of A_i over the leaves below it, A(n) = (V(n) - V(root)) / (std + ``eps``), V =
      ``tree_values(mode="mean_leaves")``. ``keep`` = non-root nodes.

    Roots (prompts) always get A = 0 and ``keep`` False.

    Args:
        parent: ``[M]`` int64, -1 for roots, nodes in any order (see ``tree_values``).
        reward: ``[M]`` float, read on leaves only.
        method: ``"spo_rloo"`` (default, the SPO authors' ``adv_method`` default ``"rloo"``),
            ``"spo_grpo"``, ``"treerl"``, ``"treepo"`` or ``"arpo"``.
        leaf_rloo: TreeRL only: the official code's leaf-reward normalization. Default False
            (the paper's formula).
        subgroup_weighting: TreePO only: ``"average"`` (the paper; TreePO's run script) or
            ``"group_size"``.
        whiten: TreePO only: whiten over the forest's leaves (the paper's normalization).
        leaf_weights: TreePO only: ``[M]`` float, read on leaves: the weight of each trajectory
            in the whitening statistics (its token count reproduces token-level whitening).
        eps: ``spo_grpo`` and ``arpo``: added to the std. The default 1e-8 is SPO's (its
            official code's); ARPO's value is GRPO's 1e-6 (``rlkern.grpo``'s default, verl's),
            which ``get("arpo")`` passes: give ``eps=1e-6`` when calling ``method="arpo"``
            directly. Must be > 0 (a group of equal values would be 0 / 0).
        return_values: also return the node values the advantages come from (``tree_values``
            with ``mean_children`` for SPO, ``mean_leaves`` for TreeRL/TreePO/ARPO, raw rewards), from
            the same pass: building the forest's order is most of the cost of either op.
        max_depth: an upper bound on the depth of every node, as in ``tree_values``: lets the
            CUDA path run without a host sync. A tree deeper than that raises ValueError, except
            on CUDA without ``RLKERN_VALIDATE=1``: there its nodes get NaN values and advantages
            (its root A = 0; ``keep`` False below the bound).

    Returns:
        ``TreeAdvantages(advantages, keep)``: ``[M]`` float32 (float64 for float64 rewards) and
        ``[M]`` bool; with ``return_values``, ``TreeAdvantagesAndValues(advantages, keep,
        values)``, values ``[M]`` like advantages.
    """
    op = "tree_advantages"
    parent, reward = _check_trees(op, parent, reward)
    _checks.choice(op, "method", method, _METHODS)
    _checks.choice(op, "subgroup_weighting", subgroup_weighting, _WEIGHTINGS)
    # > 0: with 0 a group of equal values would be 0 / 0 = NaN (and marked trainable)
    eps = _checks.number(op, "eps", eps, low=0, low_open=True)
    if leaf_weights is not None:
        _, leaf_weights = _check_trees(op, parent, leaf_weights, name_reward="leaf_weights")
        _check_leaf_weights(parent, leaf_weights)
    _check_max_depth(op, max_depth)
    leaf_rloo = _checks.flag(op, "leaf_rloo", leaf_rloo)
    whiten = _checks.flag(op, "whiten", whiten)
    return_values = _checks.flag(op, "return_values", return_values)
    adv, keep, values = _named(op, _tree_advantages, parent, reward, method, leaf_rloo, subgroup_weighting, whiten,
                               leaf_weights, float(eps), return_values, max_depth)
    return TreeAdvantagesAndValues(adv, keep, values) if return_values else TreeAdvantages(adv, keep)


def _check_leaf_weights(parent: Tensor, leaf_weights: Tensor) -> None:
    """TreePO's whitening weights must be >= 0 on leaves (where host checks run)."""
    if not _checks.host_checks(leaf_weights):
        return
    is_leaf = torch.ones(parent.numel(), dtype=torch.bool, device=parent.device)
    is_leaf[parent[(parent >= 0) & (parent < parent.numel())]] = False
    bad = (is_leaf & ~(leaf_weights >= 0)).nonzero()
    if bad.numel():
        node = int(bad[0])
        raise ValueError(f"tree_advantages: leaf_weights must be >= 0 on leaves (a trajectory's weight in "
                         f"the whitening), got {float(leaf_weights[node])} at node {node}")


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
    walk = _Walk()
    for t, root in enumerate(roots):
        if not isinstance(root, dict):
            raise ValueError(f"from_nested: tree {t} must be a dict, got {type(root).__name__}")
        walk.tree(t, root)
    have = [n is not None for n in walk.tokens]
    segment_start = segment_end = None
    if any(have):
        if not all(have):
            raise ValueError(f"from_nested: node {have.index(False)} (preorder) has no 'num_tokens'/'token_ids' "
                             "while others do")
        counts = torch.tensor(walk.tokens, dtype=torch.int64)
        ends = counts.cumsum(0)
        segment_end, segment_start = ends.to(device), (ends - counts).to(device)
    return Forest(
        torch.tensor(walk.parent, dtype=torch.int64, device=device),
        torch.tensor(walk.reward, dtype=dtype, device=device),
        torch.tensor(walk.tree_id, dtype=torch.int64, device=device),
        segment_start,
        segment_end,
    )


class _Walk:
    """Depth-first preorder over nested dicts, one list entry per node; linear in the number of
    nodes at any depth (a node's path is rebuilt from the parent links only for a message)."""

    def __init__(self):
        self.parent, self.reward, self.tree_id, self.tokens = [], [], [], []
        self.position: list[int] = []  # index of each node among its parent's children (-1: a root)
        self.seen: dict[int, int] = {}  # id(dict) -> node index

    def path(self, index: int, tail: str = "") -> str:
        while self.parent[index] >= 0:
            tail = f".children[{self.position[index]}]" + tail
            index = self.parent[index]
        return f"tree {self.tree_id[index]}" + tail

    def is_ancestor(self, candidate: int, index: int) -> bool:
        while index >= 0 and index != candidate:
            index = self.parent[index]
        return index == candidate

    def tree(self, t: int, root: dict) -> None:
        stack = [(root, -1, -1)]  # (node, parent index, position among the parent's children)
        while stack:
            node, par, pos = stack.pop()
            index = self.enter(t, node, par, pos)
            children = node.get("children") or []
            if not isinstance(children, (list, tuple)) or not all(isinstance(c, dict) for c in children):
                raise ValueError(f"from_nested: {self.path(index)}: 'children' must be a list of dicts")
            self.reward.append(self.reward_of(node, index, bool(children)))
            self.tokens.append(self.tokens_of(node, index))
            for j in range(len(children) - 1, -1, -1):
                stack.append((children[j], index, j))

    def enter(self, t: int, node: dict, par: int, pos: int) -> int:
        key = id(node)
        if key in self.seen:
            where = f"tree {t}" if par < 0 else self.path(par, f".children[{pos}]")
            if par >= 0 and self.is_ancestor(self.seen[key], par):
                raise ValueError(f"from_nested: {where} is its own ancestor (a cycle back to "
                                 f"{self.path(self.seen[key])})")
            raise ValueError(f"from_nested: {where} is the same dict as {self.path(self.seen[key])} (a node may "
                             "have one parent only)")
        index = len(self.parent)
        self.seen[key] = index
        self.parent.append(par)
        self.position.append(pos)
        self.tree_id.append(t)
        return index

    def reward_of(self, node: dict, index: int, has_children: bool) -> float:
        value = node.get("reward")
        if value is None:
            if not has_children:
                raise ValueError(f"from_nested: {self.path(index)} is a leaf without a 'reward'")
            return math.nan
        if isinstance(value, (str, bytes)) or not isinstance(value, numbers.Real):
            raise ValueError(f"from_nested: {self.path(index)}: 'reward' must be a number, got {value!r}")
        return float(value)

    def tokens_of(self, node: dict, index: int) -> int | None:
        if "num_tokens" in node:
            count = node["num_tokens"]
            if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
                raise ValueError(f"from_nested: {self.path(index)}: 'num_tokens' must be an int >= 0, got {count!r}")
            return int(count)
        if "token_ids" in node:
            return len(node["token_ids"])
        return None
