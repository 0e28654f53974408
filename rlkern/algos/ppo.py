"""PPO and T-PPO: GAE / EGAE advantages, the clipped (dual-clip) policy loss, the clipped value loss.

Registered: ``ppo``, ``tppo``. Every function calls ops only (``rlkern.gae``, ``rlkern.egae``,
``rlkern.policy_loss``, ``rlkern.value_loss``).
"""

from __future__ import annotations

from dataclasses import dataclass

from rlkern.algos._registry import Batch, need, register
from rlkern.ops.advantages import egae, gae
from rlkern.ops.policy_loss import policy_loss, value_loss


def clipped_policy_loss(op: str, batch: Batch, cfg, *, loss: str = "ppo", **extra):
    """``rlkern.policy_loss`` with the batch's tensors and the fields every policy config has
    (clip_low, clip_high, dual_clip, kl_coef, kl_estimator, entropy_coef, agg)."""
    need(op, batch, "logprobs", "old_logprobs", "advantages")
    return policy_loss(batch.logprobs, batch.old_logprobs, batch.advantages, batch.response_mask, loss=loss,
                       clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip,
                       ref_logprobs=batch.ref_logprobs if cfg.kl_coef else None, kl_coef=cfg.kl_coef,
                       kl_estimator=cfg.kl_estimator, entropy=batch.entropy if cfg.entropy_coef else None,
                       entropy_coef=cfg.entropy_coef, agg=cfg.agg, cu_seqlens=batch.cu_seqlens, **extra)


@dataclass(frozen=True)
class PPOConfig:
    """PPO for LLMs (Schulman et al. 2017, "Proximal Policy Optimization Algorithms"; RLHF use as
    in "Secrets of RLHF in Large Language Models Part I: PPO").

    Defaults: clip 0.2 (the PPO paper's epsilon, verl's clip_ratio); dual_clip 3.0 (Ye et al.
    2020's dual-clip c, verl's clip_ratio_c); gamma 1.0 and lam 1.0 (verl's algorithm.gamma /
    lam); whiten True (verl's GAE estimator whitens the advantages); cliprange_value 0.5 (verl's
    critic cliprange_value); kl_coef 0.0 (verl's use_kl_loss False: the KL penalty goes into
    the rewards there); agg token-mean (verl's loss_agg_mode).
    """

    gamma: float = 1.0
    lam: float = 1.0
    whiten: bool = True
    clip_low: float = 0.2
    clip_high: float | None = None
    dual_clip: float | None = 3.0
    cliprange_value: float = 0.5
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    agg: str = "token-mean"


def ppo_advantages(batch: Batch, cfg: PPOConfig | None = None):
    """``gae(rewards, values, response_mask)`` -> ``(advantages, returns)``."""
    cfg = cfg or PPOConfig()
    need("ppo", batch, "rewards", "values", "response_mask")
    return gae(batch.rewards, batch.values, batch.response_mask, gamma=cfg.gamma, lam=cfg.lam, whiten=cfg.whiten,
               cu_seqlens=batch.cu_seqlens)


def ppo_loss(batch: Batch, cfg: PPOConfig | None = None):
    """``policy_loss(loss="ppo")`` with the clip / dual-clip / KL / entropy of ``cfg``."""
    return clipped_policy_loss("ppo", batch, cfg or PPOConfig())


def ppo_value_loss(batch: Batch, cfg: PPOConfig | None = None):
    """``value_loss(vpreds, returns, values)`` with ``cfg.cliprange_value`` -> ``(loss, metrics)``."""
    cfg = cfg or PPOConfig()
    need("ppo", batch, "vpreds", "returns", "values")
    return value_loss(batch.vpreds, batch.returns, batch.values, batch.response_mask,
                      cliprange_value=cfg.cliprange_value, agg=cfg.agg, cu_seqlens=batch.cu_seqlens)


PPO = register("ppo", PPOConfig, advantages=ppo_advantages, loss=ppo_loss, value_loss=ppo_value_loss,
               paper="Secrets of RLHF in Large Language Models Part I: PPO")


@dataclass(frozen=True)
class TPPOConfig(PPOConfig):
    """T-PPO ("Truncated Proximal Policy Optimization", Fan et al. 2025): PPO over responses cut
    at a window, with EGAE for the truncated ones (``rlkern.egae``: V(s_l) := V(s_{l-1})).

    Defaults: PPO's (the recipe for verl, open verl PR #3728, runs on verl's algorithm defaults:
    gamma 1.0, lam 1.0; the paper's own hyper-parameters were not reachable here). The recipe's
    ``window_ignore_token_num`` (drop the last tokens of an unfinished window) is a change of
    ``response_mask`` the trainer makes before calling.
    """


def tppo_advantages(batch: Batch, cfg: TPPOConfig | None = None):
    """``egae(rewards, values, response_mask, truncated)`` -> ``(advantages, returns)``."""
    cfg = cfg or TPPOConfig()
    need("tppo", batch, "rewards", "values", "response_mask", "truncated")
    return egae(batch.rewards, batch.values, batch.response_mask, batch.truncated, gamma=cfg.gamma, lam=cfg.lam,
                whiten=cfg.whiten, cu_seqlens=batch.cu_seqlens)


def tppo_loss(batch: Batch, cfg: TPPOConfig | None = None):
    """PPO's clipped loss (``policy_loss(loss="ppo")``)."""
    return clipped_policy_loss("tppo", batch, cfg or TPPOConfig())


def tppo_value_loss(batch: Batch, cfg: TPPOConfig | None = None):
    return ppo_value_loss(batch, cfg or TPPOConfig())


TPPO = register("tppo", TPPOConfig, advantages=tppo_advantages, loss=tppo_loss, value_loss=tppo_value_loss,
                paper="Truncated Proximal Policy Optimization")
