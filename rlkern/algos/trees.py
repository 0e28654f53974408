"""Tree and segment credit assignment: SPO-chain, SPO-tree, TreeRL, TreePO.

Registered: ``spo_chain``, ``spo_tree``, ``treerl``, ``treepo``. ``advantages`` calls
``rlkern.segment_advantages`` (chain) or ``rlkern.tree_advantages`` (trees); the advantages of
tree nodes are spread over their tokens with ``rlkern.broadcast_to_tokens`` by the trainer (it
owns the node -> token segments); ``loss`` is PPO-clip over ``batch.advantages``.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlkern.algos._registry import Batch, need, register
from rlkern.algos.grpo import PolicyConfig
from rlkern.algos.ppo import clipped_policy_loss
from rlkern.ops.segments import segment_advantages, spo_cutpoints
from rlkern.ops.trees import tree_advantages


@dataclass(frozen=True)
class SPOChainConfig(PolicyConfig):
    """SPO-chain ("Segment Policy Optimization: Effective Segment-Level Credit Assignment in RL
    for Large Language Models", Guo et al. 2025): cut points at low-probability tokens, Monte
    Carlo values at the cut points, A = V_{k+1} - V_k per segment.

    Defaults (the paper's / official code's): threshold 0.9 (tokens with p < 0.9 can open a
    segment, and only they are trained on), interval 5 ("int5": every 5th candidate); PPO-clip
    loss with verl's defaults (clip 0.2, token-mean).
    """

    threshold: float = 0.9
    interval: int = 5


def spo_chain_cutpoints(batch: Batch, cfg: SPOChainConfig | None = None):
    """``spo_cutpoints(old_logprobs, cu_seqlens)``: where the trainer estimates MC values."""
    cfg = cfg or SPOChainConfig()
    need("spo_chain", batch, "old_logprobs", "cu_seqlens")
    return spo_cutpoints(batch.old_logprobs, batch.cu_seqlens, threshold=cfg.threshold, interval=cfg.interval)


def spo_chain_advantages(batch: Batch, cfg: SPOChainConfig | None = None):
    """``segment_advantages(segment_start, cut_values, scores, cu_seqlens, logprobs=old_logprobs)``
    -> ``(advantages, loss_mask)``."""
    cfg = cfg or SPOChainConfig()
    need("spo_chain", batch, "segment_start", "cut_values", "scores", "cu_seqlens")
    return segment_advantages(batch.segment_start, batch.cut_values, batch.scores, batch.cu_seqlens,
                              logprobs=batch.old_logprobs, threshold=cfg.threshold)


def _tree_loss(name: str):
    def fn(batch: Batch, cfg=None):
        return clipped_policy_loss(name, batch, cfg or _CONFIGS[name]())
    fn.__name__ = f"{name}_loss"
    fn.__doc__ = "PPO-clip (``policy_loss(loss='ppo')``) over the token advantages in ``batch.advantages``."
    return fn


@dataclass(frozen=True)
class SPOTreeConfig(PolicyConfig):
    """SPO-tree (same paper): V(n) = mean of the children's V, A(n) = V(n) - V(parent).

    Defaults: method "spo_rloo" (the official code's ``adv_method`` default "rloo"; "spo_grpo"
    divides by the siblings' std + eps), eps 1e-8 (the official code's); PPO-clip loss with
    verl's defaults.
    """

    method: str = "spo_rloo"
    eps: float = 1e-8


def spo_tree_advantages(batch: Batch, cfg: SPOTreeConfig | None = None):
    """``tree_advantages(parent, node_rewards, method="spo_rloo")`` -> ``(advantages, keep)`` per node."""
    cfg = cfg or SPOTreeConfig()
    need("spo_tree", batch, "parent", "node_rewards")
    return tree_advantages(batch.parent, batch.node_rewards, method=cfg.method, eps=cfg.eps)


@dataclass(frozen=True)
class TreeRLConfig(PolicyConfig):
    """TreeRL ("TreeRL: LLM Reinforcement Learning with On-Policy Tree Search", Hou et al. 2025):
    A(n) = ((V(n) - V(root)) + (V(n) - V(parent))) / sqrt(L(n)), V = mean reward of the leaves below.

    Defaults: leaf_rloo False (the paper's formula; True is the official code's leaf
    normalization); PPO-clip loss with verl's defaults.
    """

    leaf_rloo: bool = False


def treerl_advantages(batch: Batch, cfg: TreeRLConfig | None = None):
    """``tree_advantages(parent, node_rewards, method="treerl")`` -> ``(advantages, keep)`` per node."""
    cfg = cfg or TreeRLConfig()
    need("treerl", batch, "parent", "node_rewards")
    return tree_advantages(batch.parent, batch.node_rewards, method="treerl", leaf_rloo=cfg.leaf_rloo)


@dataclass(frozen=True)
class TreePOConfig(PolicyConfig):
    """TreePO ("TreePO: Bridging the Gap of Policy Optimization and Efficacy and Inference
    Efficiency with Heuristic Tree-based Modeling", Li et al. 2025): per leaf, the mean over the
    subgroups on its path of (R - subgroup mean), whitened over the forest's leaves.

    Defaults (the paper's run script): subgroup_weighting "average", whiten True; PPO-clip loss
    with verl's defaults.
    """

    subgroup_weighting: str = "average"
    whiten: bool = True


def treepo_advantages(batch: Batch, cfg: TreePOConfig | None = None):
    """``tree_advantages(parent, node_rewards, method="treepo")`` -> ``(advantages, keep)``: one
    advantage per leaf (trajectory)."""
    cfg = cfg or TreePOConfig()
    need("treepo", batch, "parent", "node_rewards")
    return tree_advantages(batch.parent, batch.node_rewards, method="treepo",
                           subgroup_weighting=cfg.subgroup_weighting, whiten=cfg.whiten)


_CONFIGS = {"spo_chain": SPOChainConfig, "spo_tree": SPOTreeConfig, "treerl": TreeRLConfig, "treepo": TreePOConfig}

_SPO = "Segment Policy Optimization: Effective Segment-Level Credit Assignment in RL for Large Language Models"
register("spo_chain", SPOChainConfig, advantages=spo_chain_advantages, loss=_tree_loss("spo_chain"),
         cutpoints=spo_chain_cutpoints, paper=_SPO)
register("spo_tree", SPOTreeConfig, advantages=spo_tree_advantages, loss=_tree_loss("spo_tree"), paper=_SPO)
register("treerl", TreeRLConfig, advantages=treerl_advantages, loss=_tree_loss("treerl"),
         paper="TreeRL: LLM Reinforcement Learning with On-Policy Tree Search")
register("treepo", TreePOConfig, advantages=treepo_advantages, loss=_tree_loss("treepo"),
         paper="TreePO: Bridging the Gap of Policy Optimization and Efficacy and Inference Efficiency with "
               "Heuristic Tree-based Modeling")
