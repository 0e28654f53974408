"""Agentic and GUI-agent RL: ARPO (tool-use agents), UI-R1 and Mobile-R1 (mobile GUI agents).

Registered: ``arpo``, ``ui_r1``, ``mobile_r1``. Their policy update is GRPO's (``grpo``
advantages, the PPO-clip ``policy_loss``); what the papers add is sampling-side (ARPO's
entropy-triggered branching; its hard advantage attribution is the op
``tree_advantages(method="arpo")``), a rule-based reward over parsed actions (UI-R1's, the op
``action_rewards``), or rewards from the environment and a trajectory judge (Mobile-R1's action-
and task-level rewards), which reach the module as ``batch.scores``.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlkern.algos._registry import Batch, need, register
from rlkern.algos.grpo import GRPOConfig, PolicyConfig
from rlkern.algos.ppo import clipped_policy_loss
from rlkern.ops.advantages import grpo
from rlkern.ops.rewards import action_rewards
from rlkern.ops.trees import tree_advantages

_ATTRIBUTIONS = ("soft", "hard")


@dataclass(frozen=True)
class ARPOConfig(PolicyConfig):
    """ARPO ("Agentic Reinforced Policy Optimization", Dong et al. 2025): GRPO over the
    trajectories of an entropy-branched rollout tree, with soft (default) or hard advantage
    attribution.

    The paper's rollout samples a few global trajectories and, after a tool call whose following
    tokens' entropy rises, branches partial rollouts from that step; the trajectories of one
    question then share prefixes. Its advantage attribution has two forms: *hard* (a shared
    token gets the mean of the advantages of the trajectories sharing it, individual tokens their
    own) and *soft* (GRPO over the full trajectories, each keeping its copy of the shared prefix:
    the importance ratios of the shared tokens are equal across the copies, so the update mixes
    the sharing trajectories' advantages by itself). The paper reports the soft form trains more
    stably and uses it by default.

    - ``attribution="soft"`` (default): ``A_i = (R_i - mean_g R) / (std_g R + eps)`` per
      trajectory (``grpo(scores, group_ids, response_mask)``), broadcast over all of its tokens,
      shared prefix included.
    - ``attribution="hard"``: over the rollout tree (``batch.parent``, ``batch.node_rewards`` on
      the leaves, e.g. from ``rlkern.trees.from_nested``; one tree per question, a node per
      segment of tokens): leaf i gets the same GRPO advantage over the leaves of its tree and
      node n the mean of it over the leaves below n, ``A(n) = (V(n) - V(root)) / (std + eps)``
      with V the mean leaf reward below (``tree_advantages(method="arpo")``: Bessel std, a tree
      of one leaf mean 0 and std 1, as ``grpo``). Returns ``(advantages, keep)`` per node like
      the tree algorithms (``rlkern.algos.trees``): spread them over each node's tokens with
      ``broadcast_to_tokens``. It always divides by the std: ``norm_by_std=False`` is refused.

    Loss: PPO-clip (``policy_loss``).

    Defaults: attribution "soft" (the paper's), eps 1e-6, norm_by_std True (GRPO's, as verl's
    ``grpo`` estimator, which the authors' released trainer extends); the loss fields verl's
    defaults (clip 0.2, no KL, token-mean); the paper's per-run values (its scripts) override them.
    """

    eps: float = 1e-6
    norm_by_std: bool = True
    attribution: str = "soft"


def arpo_advantages(batch: Batch, cfg: ARPOConfig | None = None):
    """Soft: ``grpo(scores, group_ids, response_mask)`` over the trajectories, ``[B]`` or the
    mask's shape. Hard: ``tree_advantages(parent, node_rewards, method="arpo", eps=eps)`` ->
    ``(advantages, keep)`` per node."""
    cfg = cfg or ARPOConfig()
    if cfg.attribution not in _ATTRIBUTIONS:
        raise ValueError(f"arpo: attribution must be 'soft' (GRPO over the trajectories, the paper's default) or "
                         f"'hard' (mean advantage per shared tree node), got {cfg.attribution!r}")
    if cfg.attribution == "hard":
        if not cfg.norm_by_std:
            raise ValueError("arpo: attribution='hard' divides by each tree's reward std; norm_by_std=False is "
                             "for attribution='soft' only")
        need("arpo", batch, "parent", "node_rewards")
        return tree_advantages(batch.parent, batch.node_rewards, method="arpo", eps=cfg.eps)
    need("arpo", batch, "scores", "group_ids")
    return grpo(batch.scores, batch.group_ids, batch.response_mask, eps=cfg.eps, norm_by_std=cfg.norm_by_std,
                cu_seqlens=batch.cu_seqlens)


@dataclass(frozen=True)
class UIR1Config(GRPOConfig):
    """UI-R1 ("UI-R1: Enhancing Action Prediction of GUI Agents by Reinforcement Learning", Lu et
    al. 2025): GRPO over the rule-based action reward R = R_T (action type) + R_C (click point in
    the target's box) + R_F (format), ``action_rewards``. Defaults: GRPO's (``GRPOConfig``: kl
    0.04 with k3, clip 0.2, seq-mean-token-mean, eps 1e-6)."""


def ui_r1_rewards(batch: Batch, cfg: UIR1Config | None = None):
    """``action_rewards(action_types, true_action_types, points, boxes, format_ok)`` -> ``[B]``."""
    need("ui_r1", batch, "action_types", "true_action_types", "points", "boxes")
    return action_rewards(batch.action_types, batch.true_action_types, batch.points, batch.boxes, batch.format_ok)


def ui_r1_advantages(batch: Batch, cfg: UIR1Config | None = None):
    """``grpo(action_rewards(...), group_ids, response_mask)``."""
    cfg = cfg or UIR1Config()
    need("ui_r1", batch, "group_ids")
    return grpo(ui_r1_rewards(batch, cfg), batch.group_ids, batch.response_mask, eps=cfg.eps,
                norm_by_std=cfg.norm_by_std, cu_seqlens=batch.cu_seqlens)


@dataclass(frozen=True)
class MobileR1Config(PolicyConfig):
    """Mobile-R1 ("Mobile-R1: Towards Interactive Reinforcement Learning for VLM-Based Mobile
    Agent via Task-Level Rewards"): after format fine-tuning, GRPO with
    action-level rewards on single steps, then GRPO with task-level rewards on multi-turn
    trajectories. Both rewards come from the environment and the parsed actions (the task-level
    one judges the whole trajectory), outside rlkern; they reach here as ``batch.scores``, one
    per sample (a step in stage 2, a trajectory in stage 3, its tokens those of every turn
    concatenated under ``response_mask``), and ``advantages`` is GRPO's over each task's group.

    Defaults: GRPO's (eps 1e-6, std-normalized); the loss fields verl's defaults (clip 0.2, no
    KL, token-mean).
    """

    eps: float = 1e-6
    norm_by_std: bool = True


def mobile_r1_advantages(batch: Batch, cfg: MobileR1Config | None = None):
    """``grpo(scores, group_ids, response_mask)`` of the action- or task-level rewards."""
    cfg = cfg or MobileR1Config()
    need("mobile_r1", batch, "scores", "group_ids")
    return grpo(batch.scores, batch.group_ids, batch.response_mask, eps=cfg.eps, norm_by_std=cfg.norm_by_std,
                cu_seqlens=batch.cu_seqlens)


def _loss(name, config):
    def fn(batch: Batch, cfg=None):
        return clipped_policy_loss(name, batch, cfg or config())
    fn.__name__ = f"{name}_loss"
    fn.__doc__ = "PPO-clip (``policy_loss``) with the config's clip, KL and aggregation."
    return fn


register("arpo", ARPOConfig, advantages=arpo_advantages, loss=_loss("arpo", ARPOConfig),
         paper="Agentic Reinforced Policy Optimization")
register("ui_r1", UIR1Config, advantages=ui_r1_advantages, loss=_loss("ui_r1", UIR1Config), rewards=ui_r1_rewards,
         paper="UI-R1: Enhancing Action Prediction of GUI Agents by Reinforcement Learning")
register("mobile_r1", MobileR1Config, advantages=mobile_r1_advantages, loss=_loss("mobile_r1", MobileR1Config),
         paper="Mobile-R1: Towards Interactive Reinforcement Learning for VLM-Based Mobile Agent via Task-Level "
               "Rewards")
