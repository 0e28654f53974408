"""Reward shaping before the group normalization: GRPO-lambda, the unlikeliness reward, S-GRPO,
OTC-GRPO, HBPO, reward-model ensembles, multi-objective GRPO, and TW-GRPO's token weights.

Registered: ``grpo_lambda``, ``unlikeliness``, ``s_grpo``, ``otc``, ``hbpo``, ``rm_ensemble``,
``mo_grpo``, ``tw_grpo``. ``advantages`` calls ``shape_rewards`` (or ``ensemble_rewards``) and then
``grpo`` (HBPO: ``hbpo_advantages`` and ``outcome_to_tokens``); ``loss`` is the GRPO family's
PPO-clip (TW-GRPO: with ``token_weights`` as the per-token weights).
"""

from __future__ import annotations

from dataclasses import dataclass

from rlkern.algos._registry import Batch, need, register
from rlkern.algos.grpo import GRPOConfig, grpo_advantages
from rlkern.algos.ppo import PPOConfig, clipped_policy_loss
from rlkern.ops.advantages import grpo, outcome_to_tokens
from rlkern.ops.shaping import ensemble_rewards, hbpo_advantages, shape_rewards, token_weights


def _shaped(batch: Batch, cfg, rewards):
    """GRPO's advantages of the shaped rewards (``grpo``)."""
    return grpo_advantages(batch.replace(scores=rewards), cfg)


@dataclass(frozen=True)
class GRPOLambdaConfig(GRPOConfig):
    """GRPO-lambda ("Stable Reinforcement Learning for Efficient Reasoning"): a length penalty on
    the correct samples of the groups whose correctness ratio passes the gate, then GRPO.
    Defaults (``shape_rewards``'): threshold 0.5 (fixed gate; ``top_fraction`` = the paper's
    batch-wise lambda, tuned there), length_coef 0.2, length_eps 1e-6; GRPO's loss config."""

    threshold: float = 0.5
    top_fraction: float | None = None
    length_coef: float = 0.2
    length_eps: float = 1e-6


def grpo_lambda_advantages(batch: Batch, cfg: GRPOLambdaConfig | None = None):
    """``shape_rewards(method="grpo_lambda", lengths=...)``, then ``grpo``."""
    cfg = cfg or GRPOLambdaConfig()
    need("grpo_lambda", batch, "scores", "group_ids", "lengths")
    r = shape_rewards(batch.scores, batch.group_ids, method="grpo_lambda", lengths=batch.lengths,
                      threshold=cfg.threshold, top_fraction=cfg.top_fraction, length_coef=cfg.length_coef,
                      eps=cfg.length_eps)
    return _shaped(batch, cfg, r)


@dataclass(frozen=True)
class UnlikelinessConfig(GRPOConfig):
    """The unlikeliness reward ("Rewarding the Unlikely: Lifting GRPO Beyond Distribution
    Sharpening"): correct samples ranked by likelihood, the likely ones' reward reduced, then GRPO.
    Default: rank_coef 0.25 (the paper's beta_rank)."""

    rank_coef: float = 0.25


def unlikeliness_advantages(batch: Batch, cfg: UnlikelinessConfig | None = None):
    """``shape_rewards(method="unlikeliness", logprobs=seq_logps)``, then ``grpo``."""
    cfg = cfg or UnlikelinessConfig()
    need("unlikeliness", batch, "scores", "group_ids", "seq_logps")
    r = shape_rewards(batch.scores, batch.group_ids, method="unlikeliness", logprobs=batch.seq_logps.detach(),
                      rank_coef=cfg.rank_coef)
    return _shaped(batch, cfg, r)


@dataclass(frozen=True)
class SGRPOConfig(GRPOConfig):
    """S-GRPO ("S-GRPO: Early Exit via Reinforcement Learning in Reasoning Models"): serial-group
    rewards decaying with the exit position, then GRPO. Default: decay 0.5 (the paper's 1 / 2^k)."""

    decay: float = 0.5


def s_grpo_advantages(batch: Batch, cfg: SGRPOConfig | None = None):
    """``shape_rewards(method="s_grpo", exit_positions=...)``, then ``grpo``."""
    cfg = cfg or SGRPOConfig()
    need("s_grpo", batch, "scores", "group_ids", "exit_positions")
    r = shape_rewards(batch.scores, batch.group_ids, method="s_grpo", exit_positions=batch.exit_positions,
                      decay=cfg.decay)
    return _shaped(batch, cfg, r)


@dataclass(frozen=True)
class OTCConfig(GRPOConfig):
    """OTC-GRPO ("OTC: Optimal Tool Calls via Reinforcement Learning"): the tool-call-aware reward,
    then GRPO. Defaults (``shape_rewards``'): tool_c 1.0, tool_coef 1.0."""

    tool_c: float = 1.0
    tool_coef: float = 1.0


def otc_advantages(batch: Batch, cfg: OTCConfig | None = None):
    """``shape_rewards(method="otc", tool_calls=...)``, then ``grpo``."""
    cfg = cfg or OTCConfig()
    need("otc", batch, "scores", "group_ids", "tool_calls")
    r = shape_rewards(batch.scores, batch.group_ids, method="otc", tool_calls=batch.tool_calls, tool_c=cfg.tool_c,
                      tool_coef=cfg.tool_coef)
    return _shaped(batch, cfg, r)


@dataclass(frozen=True)
class HBPOConfig(GRPOConfig):
    """HBPO ("Hierarchical Budget Policy Optimization for Adaptive Reasoning"): budget-aware
    rewards, then intra-subgroup + inter-group advantages. Defaults (``shape_rewards`` /
    ``hbpo_advantages``'): max_length 4096, budget_scale 4.0, deviation_coef None (1 / max_length),
    eps 1e-6."""

    max_length: int = 4096
    budget_scale: float = 4.0
    deviation_coef: float | None = None


def hbpo_advantages_fn(batch: Batch, cfg: HBPOConfig | None = None):
    """``shape_rewards(method="hbpo", lengths, budgets)``, ``hbpo_advantages``, then
    ``outcome_to_tokens`` (with a response mask)."""
    cfg = cfg or HBPOConfig()
    need("hbpo", batch, "scores", "group_ids", "lengths", "budgets")
    r = shape_rewards(batch.scores, batch.group_ids, method="hbpo", lengths=batch.lengths, budgets=batch.budgets,
                      max_length=cfg.max_length, budget_scale=cfg.budget_scale, deviation_coef=cfg.deviation_coef)
    adv = hbpo_advantages(r, batch.group_ids, batch.budgets, max_length=cfg.max_length,
                          budget_scale=cfg.budget_scale, eps=cfg.eps)
    if batch.response_mask is None:
        return adv
    return outcome_to_tokens(adv, batch.response_mask, cu_seqlens=batch.cu_seqlens)


@dataclass(frozen=True)
class RMEnsembleConfig(PPOConfig):
    """Reward-model ensembles ("Reward Model Ensembles Help Mitigate Overoptimization", Coste et
    al. 2024): one reward from K reward models (mean, worst-case WCO, uncertainty-weighted UWO),
    then PPO. Defaults: method "wco" (no coefficient to tune; UWO needs the paper's lambda per
    setup: ``coef``), PPO's config."""

    method: str = "wco"
    coef: float | None = None


def rm_ensemble_rewards(batch: Batch, cfg: RMEnsembleConfig | None = None):
    """``ensemble_rewards(rm_scores [B, K], method, coef)`` -> ``[B]`` rewards."""
    cfg = cfg or RMEnsembleConfig()
    need("rm_ensemble", batch, "rm_scores")
    return ensemble_rewards(batch.rm_scores, method=cfg.method, coef=cfg.coef)


def rm_ensemble_loss(batch: Batch, cfg: RMEnsembleConfig | None = None):
    """PPO's clipped loss (``policy_loss``)."""
    return clipped_policy_loss("rm_ensemble", batch, cfg or RMEnsembleConfig())


@dataclass(frozen=True)
class MOGRPOConfig(GRPOConfig):
    """Multi-objective GRPO ("Optimizing Safe and Aligned Language Generation: A Multi-Objective
    GRPO Approach", Li et al. 2025): the K aspect scores combined by ``weights`` into one reward,
    then GRPO. Default weights None: the mean of the aspects (equal weights)."""

    weights: tuple | None = None


def mo_grpo_advantages(batch: Batch, cfg: MOGRPOConfig | None = None):
    """``ensemble_rewards(rm_scores, method="weighted" / "mean")``, then ``grpo``."""
    cfg = cfg or MOGRPOConfig()
    need("mo_grpo", batch, "rm_scores", "group_ids")
    if cfg.weights is None:
        r = ensemble_rewards(batch.rm_scores, method="mean")
    else:
        r = ensemble_rewards(batch.rm_scores, method="weighted", weights=list(cfg.weights))
    return grpo(r, batch.group_ids, batch.response_mask, eps=cfg.eps, norm_by_std=cfg.norm_by_std,
                cu_seqlens=batch.cu_seqlens)


@dataclass(frozen=True)
class TWGRPOConfig(GRPOConfig):
    """TW-GRPO ("Reinforcing Video Reasoning with Focused Thinking"): GRPO whose token-mean loss
    weights each token by the group's divergence there (``token_weights``). Defaults: max_weight
    1.4 (the authors' trainer's alpha), agg token-mean (the weighted sum over the mask's sum)."""

    max_weight: float = 1.4
    agg: str = "token-mean"


def tw_grpo_weights(batch: Batch, cfg: TWGRPOConfig | None = None):
    """``token_weights(vocab_logprobs [N, T, V], group_ids, response_mask)``."""
    cfg = cfg or TWGRPOConfig()
    need("tw_grpo", batch, "vocab_logprobs", "group_ids")
    return token_weights(batch.vocab_logprobs, batch.group_ids, batch.response_mask, max_weight=cfg.max_weight)


def tw_grpo_loss(batch: Batch, cfg: TWGRPOConfig | None = None):
    """``policy_loss(..., is_weights=token_weights(...))``: sum(loss * w * mask) / sum(mask)."""
    cfg = cfg or TWGRPOConfig()
    return clipped_policy_loss("tw_grpo", batch, cfg, is_weights=tw_grpo_weights(batch, cfg))


def _loss(name, config):
    def fn(batch: Batch, cfg=None):
        return clipped_policy_loss(name, batch, cfg or config())
    fn.__name__ = f"{name}_loss"
    fn.__doc__ = "GRPO's PPO-clip loss (``policy_loss``) with the config's clip, KL and aggregation."
    return fn


register("grpo_lambda", GRPOLambdaConfig, advantages=grpo_lambda_advantages,
         loss=_loss("grpo_lambda", GRPOLambdaConfig), paper="Stable Reinforcement Learning for Efficient Reasoning")
register("unlikeliness", UnlikelinessConfig, advantages=unlikeliness_advantages,
         loss=_loss("unlikeliness", UnlikelinessConfig),
         paper="Rewarding the Unlikely: Lifting GRPO Beyond Distribution Sharpening")
register("s_grpo", SGRPOConfig, advantages=s_grpo_advantages, loss=_loss("s_grpo", SGRPOConfig),
         paper="S-GRPO: Early Exit via Reinforcement Learning in Reasoning Models")
register("otc", OTCConfig, advantages=otc_advantages, loss=_loss("otc", OTCConfig),
         paper="OTC: Optimal Tool Calls via Reinforcement Learning")
register("hbpo", HBPOConfig, advantages=hbpo_advantages_fn, loss=_loss("hbpo", HBPOConfig),
         paper="Hierarchical Budget Policy Optimization for Adaptive Reasoning")
register("rm_ensemble", RMEnsembleConfig, loss=rm_ensemble_loss, rewards=rm_ensemble_rewards,
         paper="Reward Model Ensembles Help Mitigate Overoptimization")
register("mo_grpo", MOGRPOConfig, advantages=mo_grpo_advantages, loss=_loss("mo_grpo", MOGRPOConfig),
         paper="Optimizing Safe and Aligned Language Generation: A Multi-Objective GRPO Approach")
register("tw_grpo", TWGRPOConfig, advantages=grpo_advantages, loss=tw_grpo_loss, token_weights=tw_grpo_weights,
         paper="Reinforcing Video Reasoning with Focused Thinking")
