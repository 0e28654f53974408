"""The GRPO family and the outcome-baseline estimators: one score per sample, a group baseline.

Registered: ``grpo``, ``dr_grpo``, ``dapo``, ``gspo``, ``cispo``, ``lite_ppo``, ``bnpo``, ``grpo_passk``,
``gpg``, ``opo``, ``rloo``, ``reinforce_pp``, ``reinforce_pp_baseline``, ``remax``, ``gigpo``.
Each ``advantages`` calls one advantage op; each ``loss`` calls ``rlkern.policy_loss`` with the
config's loss type, clip range, KL and aggregation (the paper's).
"""

from __future__ import annotations

from dataclasses import dataclass
from torch import Tensor

from rlkern.algos._registry import Batch, need, register
from rlkern.algos.ppo import clipped_policy_loss
from rlkern.ops.advantages import (
    bnpo,
    gigpo_step_groups,
    gpg,
    group_normalize,
    grpo,
    grpo_passk,
    opo,
    reinforce_pp,
    reinforce_pp_baseline,
    remax,
    rloo,
)
from rlkern.ops import rewards as reward_ops
from rlkern.ops.advantages.dynamic_sampling import dynamic_sampling_mask
from rlkern.ops.rewards import overlong_rewards


@dataclass(frozen=True)
class PolicyConfig:
    """The policy-loss fields every config here has (``rlkern.policy_loss``'s keywords)."""

    clip_low: float = 0.2
    clip_high: float | None = None
    dual_clip: float | None = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    agg: str = "token-mean"


def _outcome(op: str, batch: Batch) -> None:
    need(op, batch, "scores", "group_ids")


def _loss(name: str, loss: str = "ppo"):
    def fn(batch: Batch, cfg=None):
        cfg = cfg or _CONFIGS[name]()
        extra = {"loss_scale_factor": cfg.max_response_length} if name == "dr_grpo" else {}
        return clipped_policy_loss(name, batch, cfg, loss=loss, **extra)
    fn.__name__ = f"{name}_loss"
    fn.__doc__ = f"``policy_loss(loss={loss!r})`` with the clip, KL and aggregation of ``{name}``'s config."
    return fn


_CONFIGS: dict[str, type] = {}


# --- GRPO and variants over verl's group normalization ------------------------------------------


@dataclass(frozen=True)
class GRPOConfig(PolicyConfig):
    """GRPO ("DeepSeekMath", Shao et al. 2024, arXiv:2402.03300, Eq. 3 and 21).

    Defaults: kl_coef 0.04 with the k3 estimator (the paper's beta and its unbiased KL estimator,
    Eq. 4); clip 0.2 (PPO's epsilon, verl's clip_ratio); agg seq-mean-token-mean (the paper's
    1/G sum_i 1/|o_i| sum_t); eps 1e-6 and the unbiased std (verl's ``grpo`` estimator).
    """

    kl_coef: float = 0.04
    agg: str = "seq-mean-token-mean"
    eps: float = 1e-6
    norm_by_std: bool = True


def grpo_advantages(batch: Batch, cfg: GRPOConfig | None = None):
    """``grpo(scores, group_ids, response_mask)``: (s - mean_g) / (std_g + eps), per token."""
    cfg = cfg or GRPOConfig()
    _outcome("grpo", batch)
    return grpo(batch.scores, batch.group_ids, batch.response_mask, eps=cfg.eps, norm_by_std=cfg.norm_by_std,
                cu_seqlens=batch.cu_seqlens)


@dataclass(frozen=True)
class DrGRPOConfig(GRPOConfig):
    """Dr. GRPO ("Understanding R1-Zero-Like Training: A Critical Perspective", Liu et al. 2025,
    arXiv:2503.20783): no std division, no per-response length normalization, no KL.

    Defaults: norm_by_std False, kl_coef 0.0, agg seq-mean-token-sum-norm (token sums over a
    constant, the max completion length: ``max_response_length``; None = the padded width T, as
    verl's ``loss_scale_factor``).
    """

    kl_coef: float = 0.0
    agg: str = "seq-mean-token-sum-norm"
    norm_by_std: bool = False
    max_response_length: int | None = None


def dr_grpo_advantages(batch: Batch, cfg: DrGRPOConfig | None = None):
    """``grpo(..., norm_by_std=False)``: s - mean_g."""
    return grpo_advantages(batch, cfg or DrGRPOConfig())


@dataclass(frozen=True)
class DAPOConfig(GRPOConfig):
    """DAPO (ByteDance Seed, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale",
    Yu et al. 2025, arXiv:2503.14476).

    Defaults (the paper's): clip_low 0.2, clip_high 0.28 (clip-higher), agg token-mean
    (token-level policy-gradient loss), kl_coef 0.0 (no KL term), dynamic_sampling True (groups
    whose scores are all equal leave the loss: ``dynamic_sampling_mask``, read on the verifier's
    scores, as verl's ``filter_groups.metric="acc"``); the soft overlong punishment
    (``overlong_rewards``, its soft overlong punishment) when the batch has ``lengths``: max_length 20480 (the paper's
    L_max: 16384 expected + 4096 cache), cache_length 4096, penalty_factor 1.0. The paper's
    over-sampling to refill the batch is the trainer's.
    """

    clip_high: float | None = 0.28
    kl_coef: float = 0.0
    agg: str = "token-mean"
    dynamic_sampling: bool = True
    max_length: int = 20480
    cache_length: int = 4096
    penalty_factor: float = 1.0


def dapo_advantages(batch: Batch, cfg: DAPOConfig | None = None):
    """GRPO's advantages (``grpo``) of the scores, or with ``batch.lengths`` of
    ``overlong_rewards(scores, lengths, max_length, cache_length, penalty_factor)``; a filtered
    group's advantages are 0 already (equal scores)."""
    cfg = cfg or DAPOConfig()
    if batch.lengths is not None:
        _outcome("dapo", batch)
        batch = batch.replace(scores=overlong_rewards(batch.scores, batch.lengths, max_length=cfg.max_length,
                                                      cache_length=cfg.cache_length,
                                                      penalty_factor=cfg.penalty_factor))
    return grpo_advantages(batch, cfg)


def dapo_keep_mask(batch: Batch, cfg: DAPOConfig | None = None):
    """``dynamic_sampling_mask(scores, group_ids, response_mask)``: the tokens that stay in the loss."""
    _outcome("dapo", batch)
    need("dapo", batch, "response_mask")
    return dynamic_sampling_mask(batch.scores, batch.group_ids, batch.response_mask, cu_seqlens=batch.cu_seqlens)


def dapo_loss(batch: Batch, cfg: DAPOConfig | None = None):
    """``policy_loss(loss="ppo", clip_high=0.28, agg="token-mean")`` over the tokens that
    ``dapo_keep_mask`` keeps (with ``dynamic_sampling``; the filtered groups' tokens leave the
    token-mean's denominator, as dropping them from the batch does)."""
    cfg = cfg or DAPOConfig()
    if cfg.dynamic_sampling:
        batch = batch.replace(response_mask=dapo_keep_mask(batch, cfg))
    return clipped_policy_loss("dapo", batch, cfg)


@dataclass(frozen=True)
class GSPOConfig(GRPOConfig):
    """GSPO ("Group Sequence Policy Optimization", Zheng et al. 2025, arXiv:2507.18071): the
    ratio is the length-normalized sequence likelihood ratio.

    Defaults (the paper's): clip_low 3e-4, clip_high 4e-4; kl_coef 0.0; agg seq-mean-token-mean
    (the objective is a mean over the group's sequences; every token carries its sequence's ratio).
    """

    clip_low: float = 3e-4
    clip_high: float | None = 4e-4
    kl_coef: float = 0.0


@dataclass(frozen=True)
class CISPOConfig(GRPOConfig):
    """CISPO (MiniMax-M1, arXiv:2506.13585): clip the importance-sampling weight, keep every token's
    gradient: -sg(clip(r, 1 - clip_low, 1 + clip_high)) A log pi.

    Defaults: clip_high 5.0 (TRL 1.16's recommendation for cispo, from ScaleRL); clip_low 1.0
    (no lower bound: the paper tunes only the upper one); agg token-mean (the paper's
    1 / sum_i |o_i| normalization); kl_coef 0.0.
    """

    clip_low: float = 1.0
    clip_high: float | None = 5.0
    kl_coef: float = 0.0
    agg: str = "token-mean"


@dataclass(frozen=True)
class LitePPOConfig(PolicyConfig):
    """Lite PPO ("Part I: Tricks or Traps? A Deep Dive into RL for LLM Reasoning", Liu et al. 2025):
    critic-free PPO with two tricks, the group-level mean and the batch-level std in the advantage
    normalization, and token-level loss aggregation.

    Defaults: std "unbiased" and eps 1e-6 (``group_normalize``'s, verl's GRPO statistics; the paper
    does not fix them), agg token-mean, clip 0.2, kl_coef 0.0.
    """

    eps: float = 1e-6
    std: str = "unbiased"


def lite_ppo_advantages(batch: Batch, cfg: LitePPOConfig | None = None):
    """``group_normalize(scores, group_ids, scale="batch")``: (s - mean_group) / (std_batch + eps)."""
    cfg = cfg or LitePPOConfig()
    _outcome("lite_ppo", batch)
    return group_normalize(batch.scores, batch.group_ids, eps=cfg.eps, std=cfg.std, scale="batch",
                           response_mask=batch.response_mask, cu_seqlens=batch.cu_seqlens)


# --- other outcome estimators -------------------------------------------------------------------


@dataclass(frozen=True)
class BNPOConfig(PolicyConfig):
    """BNPO ("BNPO: Beta Normalization Policy Optimization", Xiao et al. 2025): ``rlkern.bnpo``.

    Defaults: min_value 0.0, max_value 1.0 (binary rewards, the authors' recipe); the loss is
    verl's PPO-clip with verl's defaults (clip 0.2, token-mean; the recipe runs on verl).
    """

    min_value: float = 0.0
    max_value: float = 1.0


def bnpo_advantages(batch: Batch, cfg: BNPOConfig | None = None):
    """``bnpo(scores, group_ids, response_mask)``."""
    cfg = cfg or BNPOConfig()
    _outcome("bnpo", batch)
    return bnpo(batch.scores, batch.group_ids, batch.response_mask, min_value=cfg.min_value,
                max_value=cfg.max_value, cu_seqlens=batch.cu_seqlens)


@dataclass(frozen=True)
class PassKConfig(PolicyConfig):
    """Pass@k GRPO (Chen et al. 2025, arXiv:2503.19595; verl ``grpo_passk``): eps 1e-6 and std
    normalization as verl; PPO-clip loss with verl's defaults."""

    eps: float = 1e-6
    norm_by_std: bool = True


def grpo_passk_advantages(batch: Batch, cfg: PassKConfig | None = None):
    """``grpo_passk(scores, group_ids, response_mask)``."""
    cfg = cfg or PassKConfig()
    _outcome("grpo_passk", batch)
    return grpo_passk(batch.scores, batch.group_ids, batch.response_mask, eps=cfg.eps, norm_by_std=cfg.norm_by_std,
                      cu_seqlens=batch.cu_seqlens)


@dataclass(frozen=True)
class GPGConfig(PolicyConfig):
    """GPG ("GPG: A Simple and Strong Reinforcement Learning Baseline for Model Reasoning", Chu et
    al. 2025): plain policy gradient -A log pi (no ratio, no clip, no KL) with the group-mean
    baseline scaled by N / #nonzero scores; f_norm 1.0 (verl's gpg); agg token-mean (the paper's
    1 / sum_i |o_i|)."""

    f_norm: float = 1.0


def gpg_advantages(batch: Batch, cfg: GPGConfig | None = None):
    """``gpg(scores, group_ids, response_mask)``."""
    cfg = cfg or GPGConfig()
    _outcome("gpg", batch)
    return gpg(batch.scores, batch.group_ids, batch.response_mask, f_norm=cfg.f_norm, cu_seqlens=batch.cu_seqlens)


@dataclass(frozen=True)
class OPOConfig(PolicyConfig):
    """OPO ("On-Policy RL with Optimal Reward Baseline", Hao et al. 2025): the length-weighted
    group baseline; exact on-policy training, so the clip never binds (verl's opo runs its
    PPO-clip loss: clip 0.2, token-mean)."""


def opo_advantages(batch: Batch, cfg: OPOConfig | None = None):
    """``opo(scores, group_ids, response_mask)``."""
    _outcome("opo", batch)
    need("opo", batch, "response_mask")
    return opo(batch.scores, batch.group_ids, batch.response_mask, cu_seqlens=batch.cu_seqlens)


@dataclass(frozen=True)
class RLOOConfig(PolicyConfig):
    """RLOO ("Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
    Feedback in LLMs", Ahmadian et al. 2024): REINFORCE with the leave-one-out baseline over the
    sequence. Defaults: loss reinforce (-A log pi, no clip), agg seq-mean-token-sum (the
    sequence's log-likelihood times its advantage, averaged over samples); the KL penalty goes into
    the scores (the paper's reward), kl_coef 0.0; singleton "raw" (verl's rloo)."""

    agg: str = "seq-mean-token-sum"
    singleton: str = "raw"


def rloo_advantages(batch: Batch, cfg: RLOOConfig | None = None):
    """``rloo(scores, group_ids, response_mask)``."""
    cfg = cfg or RLOOConfig()
    _outcome("rloo", batch)
    return rloo(batch.scores, batch.group_ids, batch.response_mask, singleton=cfg.singleton,
                cu_seqlens=batch.cu_seqlens)


@dataclass(frozen=True)
class ReinforcePPConfig(PolicyConfig):
    """REINFORCE++ (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large
    Language Models"): token-level discounted returns whitened over the batch, PPO-clip loss.
    Defaults: gamma 1.0 (verl), clip 0.2, token-mean; the KL penalty is in the token rewards (the
    trainer adds ``rlkern.kl_penalty``), kl_coef 0.0."""

    gamma: float = 1.0


def reinforce_pp_advantages(batch: Batch, cfg: ReinforcePPConfig | None = None):
    """``reinforce_pp(rewards, response_mask)`` -> ``(advantages, returns)``."""
    cfg = cfg or ReinforcePPConfig()
    need("reinforce_pp", batch, "rewards", "response_mask")
    return reinforce_pp(batch.rewards, batch.response_mask, gamma=cfg.gamma, cu_seqlens=batch.cu_seqlens)


@dataclass(frozen=True)
class ReinforcePPBaselineConfig(PolicyConfig):
    """REINFORCE++-baseline (the same paper; verl ``reinforce_plus_plus_baseline``): group-mean
    baseline, then batch whitening; PPO-clip loss with verl's defaults."""


def reinforce_pp_baseline_advantages(batch: Batch, cfg: ReinforcePPBaselineConfig | None = None):
    """``reinforce_pp_baseline(scores, group_ids, response_mask)``."""
    _outcome("reinforce_pp_baseline", batch)
    need("reinforce_pp_baseline", batch, "response_mask")
    return reinforce_pp_baseline(batch.scores, batch.group_ids, batch.response_mask, cu_seqlens=batch.cu_seqlens)


@dataclass(frozen=True)
class ReMaxConfig(PolicyConfig):
    """ReMax (Li et al. 2023, "ReMax: A Simple, Effective, and Efficient Reinforcement Learning
    Method for Aligning Large Language Models"): REINFORCE with the greedy rollout's reward as the
    baseline. Defaults: loss reinforce (no ratio, no clip), agg seq-mean-token-sum (the
    paper's per-sequence sum of log-prob gradients, averaged over the batch), kl_coef 0.0."""

    agg: str = "seq-mean-token-sum"


def remax_advantages(batch: Batch, cfg: ReMaxConfig | None = None):
    """``remax(rewards, reward_baselines, response_mask)`` -> ``(advantages, returns)``."""
    need("remax", batch, "rewards", "reward_baselines", "response_mask")
    return remax(batch.rewards, batch.reward_baselines, batch.response_mask, cu_seqlens=batch.cu_seqlens)


@dataclass(frozen=True)
class GiGPOConfig(PolicyConfig):
    """GiGPO ("Group-in-Group Policy Optimization for LLM Agent Training", Feng et al. 2025,
    Eq. 6-8): episode-level GRPO advantages plus omega times step-level advantages over
    anchor-state groups.

    Defaults (verl-agent's): norm_by_std False ("mean_norm" mode) for both terms, eps 1e-6,
    step_weight 1.0 (omega).
    """

    eps: float = 1e-6
    norm_by_std: bool = False
    step_weight: float = 1.0


def gigpo_advantages(batch: Batch, cfg: GiGPOConfig | None = None) -> Tensor:
    """``rlkern.gigpo_advantages(grpo(scores), gigpo_step_groups(step_returns, anchor_keys),
    response_mask, step_weight)``: A = A_episode + omega * A_step, per token with a response mask."""
    cfg = cfg or GiGPOConfig()
    _outcome("gigpo", batch)
    need("gigpo", batch, "step_returns", "anchor_keys")
    episode = grpo(batch.scores, batch.group_ids, eps=cfg.eps, norm_by_std=cfg.norm_by_std)
    step = gigpo_step_groups(batch.step_returns, batch.anchor_keys, batch.group_ids, eps=cfg.eps,
                             norm_by_std=cfg.norm_by_std)
    return reward_ops.gigpo_advantages(episode, step, batch.response_mask, step_weight=cfg.step_weight,
                                       cu_seqlens=batch.cu_seqlens)


_CONFIGS.update(lite_ppo=LitePPOConfig, grpo=GRPOConfig, dr_grpo=DrGRPOConfig, dapo=DAPOConfig, gspo=GSPOConfig,
                cispo=CISPOConfig, bnpo=BNPOConfig, grpo_passk=PassKConfig, gpg=GPGConfig, opo=OPOConfig,
                rloo=RLOOConfig,
                reinforce_pp=ReinforcePPConfig, reinforce_pp_baseline=ReinforcePPBaselineConfig, remax=ReMaxConfig,
                gigpo=GiGPOConfig)

register("grpo", GRPOConfig, advantages=grpo_advantages, loss=_loss("grpo"),
         paper="DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models")
register("dr_grpo", DrGRPOConfig, advantages=dr_grpo_advantages, loss=_loss("dr_grpo"),
         paper="Understanding R1-Zero-Like Training: A Critical Perspective")
register("dapo", DAPOConfig, advantages=dapo_advantages, loss=dapo_loss, keep_mask=dapo_keep_mask,
         paper="DAPO: An Open-Source LLM Reinforcement Learning System at Scale")
register("gspo", GSPOConfig, advantages=grpo_advantages, loss=_loss("gspo", "gspo"),
         paper="Group Sequence Policy Optimization")
register("cispo", CISPOConfig, advantages=grpo_advantages, loss=_loss("cispo", "cispo"),
         paper="MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention")
register("lite_ppo", LitePPOConfig, advantages=lite_ppo_advantages, loss=_loss("lite_ppo"),
         paper="Part I: Tricks or Traps? A Deep Dive into RL for LLM Reasoning")
register("bnpo", BNPOConfig, advantages=bnpo_advantages, loss=_loss("bnpo"),
         paper="BNPO: Beta Normalization Policy Optimization")
register("grpo_passk", PassKConfig, advantages=grpo_passk_advantages, loss=_loss("grpo_passk"),
         paper="Pass@k Training for Adaptively Balancing Exploration and Exploitation of Large Reasoning Models")
register("gpg", GPGConfig, advantages=gpg_advantages, loss=_loss("gpg", "gpg"),
         paper="GPG: A Simple and Strong Reinforcement Learning Baseline for Model Reasoning")
register("opo", OPOConfig, advantages=opo_advantages, loss=_loss("opo"),
         paper="On-Policy RL with Optimal Reward Baseline")
register("rloo", RLOOConfig, advantages=rloo_advantages, loss=_loss("rloo", "reinforce"),
         paper="Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs")
register("reinforce_pp", ReinforcePPConfig, advantages=reinforce_pp_advantages, loss=_loss("reinforce_pp"),
         paper="REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models")
register("reinforce_pp_baseline", ReinforcePPBaselineConfig, advantages=reinforce_pp_baseline_advantages,
         loss=_loss("reinforce_pp_baseline"),
         paper="REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models")
register("remax", ReMaxConfig, advantages=remax_advantages, loss=_loss("remax", "reinforce"),
         paper="ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for Aligning Large Language "
               "Models")
register("gigpo", GiGPOConfig, advantages=gigpo_advantages, loss=_loss("gigpo"),
         paper="Group-in-Group Policy Optimization for LLM Agent Training")
