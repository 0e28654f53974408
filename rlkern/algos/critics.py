"""Value-based and constrained objectives: OREO's soft Bellman losses, Direct Advantage Policy
Optimization's step-level actor loss, PPO-max's reward normalization, CGPO's constrained rewards.

Registered: ``oreo``, ``direct_advantage_po``, ``ppo_max``, ``cgpo``. Each function calls ops only
(``soft_bellman_loss``, ``step_advantage_loss``, ``running_reward_norm``, ``constrained_rewards``,
``grpo``, ``gae``, ``policy_loss``, ``value_loss``).
"""

from __future__ import annotations

from dataclasses import dataclass

from rlkern.algos._registry import Batch, need, register
from rlkern.algos.grpo import GRPOConfig, grpo_advantages
from rlkern.algos.ppo import PPOConfig, clipped_policy_loss, ppo_advantages, ppo_value_loss
from rlkern.ops.critics import constrained_rewards, running_reward_norm, soft_bellman_loss, step_advantage_loss


@dataclass(frozen=True)
class OREOConfig:
    """OREO ("Offline Reinforcement Learning for LLM Multi-Step Reasoning", Wang et al. 2024): the
    soft Bellman value and policy losses (+ kl_coef * KL). Defaults: beta 0.1 (our choice, DPO's
    temperature: the paper tunes beta per task and ``soft_bellman_loss`` has no default),
    kl_coef 0.0."""

    beta: float = 0.1
    kl_coef: float = 0.0


def oreo_loss(batch: Batch, cfg: OREOConfig | None = None):
    """``soft_bellman_loss(logprobs, response_mask, ref_logprobs, values, scores)``."""
    cfg = cfg or OREOConfig()
    need("oreo", batch, "logprobs", "ref_logprobs", "values", "scores")
    return soft_bellman_loss(batch.logprobs, batch.response_mask, batch.ref_logprobs, batch.values, batch.scores,
                             beta=cfg.beta, kl_coef=cfg.kl_coef, cu_seqlens=batch.cu_seqlens)


@dataclass(frozen=True)
class DirectAdvantagePOConfig:
    """Direct Advantage Policy Optimization ("Improving Multi-Step Reasoning Abilities of Large
    Language Models with Direct Advantage Policy Optimization", Liu et al. 2024): the step's
    log-ratio regressed on the step critic's advantage. Default: beta 0.1 (our choice, DPO's
    temperature: the paper tunes it; ``step_advantage_loss`` has no default)."""

    beta: float = 0.1


def direct_advantage_po_loss(batch: Batch, cfg: DirectAdvantagePOConfig | None = None):
    """``step_advantage_loss(logprobs, response_mask, ref_logprobs, advantages, step_ends)``."""
    cfg = cfg or DirectAdvantagePOConfig()
    need("direct_advantage_po", batch, "logprobs", "ref_logprobs", "advantages", "step_ends")
    return step_advantage_loss(batch.logprobs, batch.response_mask, batch.ref_logprobs, batch.advantages,
                               batch.step_ends, beta=cfg.beta, cu_seqlens=batch.cu_seqlens)


@dataclass(frozen=True)
class PPOMaxConfig(PPOConfig):
    """PPO-max ("Secrets of RLHF in Large Language Models Part I: PPO", Zheng et al. 2023): PPO with
    the reward model's scores normalized by running statistics and clipped, value clipping,
    advantage whitening. Defaults: reward_clip None (the paper tunes delta; ``running_reward_norm``'s
    default), PPO's config (clip 0.2, value clip 0.5, whitened GAE)."""

    reward_clip: float | None = None


def ppo_max_reward_norm(batch: Batch, cfg: PPOMaxConfig | None = None):
    """``running_reward_norm(scores, reward_stats, clip=reward_clip)`` -> ``RewardNorm(rewards, stats)``;
    keep ``stats`` for the next step (``batch.replace(reward_stats=stats)``)."""
    cfg = cfg or PPOMaxConfig()
    need("ppo_max", batch, "scores")
    return running_reward_norm(batch.scores, batch.reward_stats, clip=cfg.reward_clip)


def ppo_max_loss(batch: Batch, cfg: PPOMaxConfig | None = None):
    """PPO's clipped loss (``policy_loss``)."""
    return clipped_policy_loss("ppo_max", batch, cfg or PPOMaxConfig())


def ppo_max_advantages(batch: Batch, cfg: PPOMaxConfig | None = None):
    """``gae`` over the token rewards (the normalized score placed by the trainer), whitened."""
    return ppo_advantages(batch, cfg or PPOMaxConfig())


@dataclass(frozen=True)
class CGPOConfig(GRPOConfig):
    """CGPO's CRPG ("The Perfect Blend: Redefining RLHF with Mixture of Judges", Xu et al. 2024):
    calibrated rewards zeroed where a judge fails, then an outcome estimator (GRPO here; the paper's
    policy-gradient baseline is a choice). CRRAFT's and CODPO's selections are in
    ``extra["constrained"]``'s ``chosen`` / ``rejected``. Defaults: GRPO's."""


def cgpo_constrained(batch: Batch, cfg: CGPOConfig | None = None):
    """``constrained_rewards(scores, group_ids, judges, baseline_rewards)`` -> ``(rewards, chosen, rejected)``."""
    need("cgpo", batch, "scores", "group_ids", "judges")
    return constrained_rewards(batch.scores, batch.group_ids, batch.judges, batch.baseline_rewards)


def cgpo_advantages(batch: Batch, cfg: CGPOConfig | None = None):
    """``grpo`` over CRPG's constrained rewards."""
    cfg = cfg or CGPOConfig()
    return grpo_advantages(batch.replace(scores=cgpo_constrained(batch, cfg).rewards), cfg)


def cgpo_loss(batch: Batch, cfg: CGPOConfig | None = None):
    """GRPO's PPO-clip loss."""
    return clipped_policy_loss("cgpo", batch, cfg or CGPOConfig())


register("oreo", OREOConfig, loss=oreo_loss, paper="Offline Reinforcement Learning for LLM Multi-Step Reasoning")
register("direct_advantage_po", DirectAdvantagePOConfig, loss=direct_advantage_po_loss,
         paper="Improving Multi-Step Reasoning Abilities of Large Language Models with Direct Advantage Policy "
               "Optimization")
register("ppo_max", PPOMaxConfig, advantages=ppo_max_advantages, loss=ppo_max_loss, value_loss=ppo_value_loss,
         reward_norm=ppo_max_reward_norm, paper="Secrets of RLHF in Large Language Models Part I: PPO")
register("cgpo", CGPOConfig, advantages=cgpo_advantages, loss=cgpo_loss, constrained=cgpo_constrained,
         paper="The Perfect Blend: Redefining RLHF with Mixture of Judges")
