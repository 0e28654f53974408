"""Preference optimization: DPO and its relatives (sequence level), KTO / BCO (unpaired), TGDPO
(token-weighted DPO) and RTO (PPO on DPO's token rewards).

Registered: ``dpo``, ``ipo``, ``rso``, ``sppo_hard``, ``apo_zero``, ``simpo``, ``cpo``, ``orpo``,
``kto``, ``bco``, ``tgdpo``, ``rto``; the research list's ``sppo``, ``xpo``, ``vpo``,
``accelerated_po``, ``inpo``, ``cpl``, ``step_apo``, ``triple_po``; the group losses ``tpo_tree``,
``p3o``, ``trpa``, ``brain``; ``srpo``; ``self_play`` (SPO's win rates). Each ``loss`` calls one op
(``rlkern.preference_loss``, ``kto_loss``, ``bco_loss``, ``token_preference_loss``,
``group_preference_loss``, ``srpo_loss``); ``rto``'s ``advantages`` calls ``dpo_token_rewards``
and ``gae``; ``rso`` / ``brain`` / ``self_play`` have ``group_weights`` in ``extra``. Defaults are
TRL 1.16's configs (DPOConfig, CPOConfig, ORPOConfig, KTOConfig, BCOConfig), which follow the
papers, unless a docstring says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlkern.algos._registry import Batch, need, register
from rlkern.algos.ppo import PPOConfig, clipped_policy_loss, ppo_value_loss
from rlkern.ops.advantages import gae
from rlkern.ops.preference import bco_loss, kto_loss, preference_loss
from rlkern.ops.preference_groups import group_preference_loss, group_weights, srpo_loss
from rlkern.ops.preference_tokens import dpo_token_rewards, token_preference_loss


@dataclass(frozen=True)
class DPOConfig:
    """DPO ("Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
    Rafailov et al. 2023): -log sigmoid(beta * ((c - c_ref) - (r - r_ref))).

    Defaults: beta 0.1 (the paper's and TRL's DPOConfig), label_smoothing 0.0 (cDPO off).
    ``loss_type`` takes any of ``rlkern.ops.preference.LOSS_TYPES``; the registered relatives
    below fix it.
    """

    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0


def _pairs(op: str, batch: Batch, *, reference: bool = True, lengths: bool = False) -> dict:
    need(op, batch, "chosen_logps", "rejected_logps")
    if reference:
        need(op, batch, "ref_chosen_logps", "ref_rejected_logps")
    if lengths:
        need(op, batch, "chosen_lengths", "rejected_lengths")
    return dict(ref_chosen_logps=batch.ref_chosen_logps if reference else None,
                ref_rejected_logps=batch.ref_rejected_logps if reference else None,
                chosen_lengths=batch.chosen_lengths, rejected_lengths=batch.rejected_lengths)


def _pair_loss(name: str, *, reference: bool = True, lengths: bool = False):
    def fn(batch: Batch, cfg=None):
        cfg = cfg or _CONFIGS[name]()
        return preference_loss(batch.chosen_logps, batch.rejected_logps,
                               **_pairs(name, batch, reference=reference, lengths=lengths),
                               loss_type=cfg.loss_type, beta=cfg.beta, label_smoothing=cfg.label_smoothing)
    fn.__name__ = f"{name}_loss"
    fn.__doc__ = f"``preference_loss(loss_type=cfg.loss_type)`` over the batch's pairs ({name})."
    return fn


@dataclass(frozen=True)
class IPOConfig(DPOConfig):
    """IPO ("A General Theoretical Paradigm to Understand Learning from Human Preferences", Azar
    et al. 2023): (margin / length - 1 / (2 beta))^2, TRL's length-averaged form; beta 0.1 (TRL)."""

    loss_type: str = "ipo"


@dataclass(frozen=True)
class RSOConfig(DPOConfig):
    """RSO ("Statistical Rejection Sampling Improves Preference Optimization", Liu et al. 2023):
    the loss side, TRL's ``hinge`` (relu(1 - beta * margin), beta the margin's reciprocal, 0.1 as
    TRL). The paper's rejection sampling of the pairs is the data side (not here)."""

    loss_type: str = "hinge"


@dataclass(frozen=True)
class SPPOHardConfig(DPOConfig):
    """SPPO ("Self-Play Preference Optimization for Language Model Alignment", Wu et al. 2024),
    TRL's ``sppo_hard`` (winner's log-ratio pushed to 1 / (2 beta), loser's to -1 / (2 beta));
    beta 0.1 (TRL)."""

    loss_type: str = "sppo_hard"


@dataclass(frozen=True)
class APOZeroConfig(DPOConfig):
    """APO-zero ("Anchored Preference Optimization and Contrastive Revisions", D'Oosterlinck et
    al. 2024), TRL's ``apo_zero``; beta 0.1 (TRL)."""

    loss_type: str = "apo_zero"


@dataclass(frozen=True)
class SimPOConfig(DPOConfig):
    """SimPO ("SimPO: Simple Preference Optimization with a Reference-Free Reward", Meng et al.
    2024): -log sigmoid(beta * (c / |c| - r / |r|) - gamma), reference-free.

    Defaults: TRL's CPOConfig (beta 0.1, simpo_gamma 0.5; the paper tunes beta in [2, 2.5] and
    gamma / beta per model: pass them).
    """

    loss_type: str = "simpo"
    simpo_gamma: float = 0.5


def simpo_loss(batch: Batch, cfg: SimPOConfig | None = None):
    """``preference_loss(loss_type="simpo")`` with both lengths, reference-free."""
    cfg = cfg or SimPOConfig()
    return preference_loss(batch.chosen_logps, batch.rejected_logps,
                           **_pairs("simpo", batch, reference=False, lengths=True), loss_type="simpo",
                           beta=cfg.beta, label_smoothing=cfg.label_smoothing, simpo_gamma=cfg.simpo_gamma)


@dataclass(frozen=True)
class CPOConfig(DPOConfig):
    """CPO ("Contrastive Preference Optimization", Xu et al. 2024): reference-free sigmoid loss
    plus cpo_alpha times the chosen tokens' NLL. Defaults: TRL's CPOConfig (beta 0.1, cpo_alpha 1.0)."""

    cpo_alpha: float = 1.0


def cpo_loss(batch: Batch, cfg: CPOConfig | None = None):
    """``preference_loss(loss_type=[cfg.loss_type, "sft"], loss_weights=[1, cpo_alpha])``, reference-free."""
    cfg = cfg or CPOConfig()
    return preference_loss(batch.chosen_logps, batch.rejected_logps,
                           **_pairs("cpo", batch, reference=False, lengths=True),
                           loss_type=[cfg.loss_type, "sft"], loss_weights=[1.0, cfg.cpo_alpha], beta=cfg.beta,
                           label_smoothing=cfg.label_smoothing)


@dataclass(frozen=True)
class ORPOConfig:
    """ORPO ("ORPO: Monolithic Preference Optimization without Reference Model", Hong et al. 2024):
    NLL of the chosen tokens + lambda * -log sigmoid(log odds ratio). beta = lambda = 0.1 (TRL's
    ORPOConfig)."""

    beta: float = 0.1


def orpo_loss(batch: Batch, cfg: ORPOConfig | None = None):
    """``preference_loss(loss_type=["orpo", "sft"])`` with both lengths, reference-free."""
    cfg = cfg or ORPOConfig()
    return preference_loss(batch.chosen_logps, batch.rejected_logps,
                           **_pairs("orpo", batch, reference=False, lengths=True), loss_type=["orpo", "sft"],
                           beta=cfg.beta)


@dataclass(frozen=True)
class KTOConfig:
    """KTO ("KTO: Model Alignment as Prospect Theoretic Optimization", Ethayarajh et al. 2024,
    Eq. 7). Defaults: TRL's KTOConfig (beta 0.1, desirable / undesirable weights 1.0)."""

    loss_type: str = "kto"
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0


def kto(batch: Batch, cfg: KTOConfig | None = None):
    """``kto_loss(seq_logps, ref_seq_logps, labels, kl_logps, ref_kl_logps)``."""
    cfg = cfg or KTOConfig()
    need("kto", batch, "seq_logps", "ref_seq_logps", "labels")
    return kto_loss(batch.seq_logps, batch.ref_seq_logps, batch.labels, batch.kl_logps, batch.ref_kl_logps,
                    loss_type=cfg.loss_type, beta=cfg.beta, desirable_weight=cfg.desirable_weight,
                    undesirable_weight=cfg.undesirable_weight)


@dataclass(frozen=True)
class BCOConfig:
    """BCO ("Binary Classifier Optimization for Large Language Model Alignment", Jung et al. 2024).
    Default: beta 0.1 (TRL's BCOConfig)."""

    beta: float = 0.1


def bco(batch: Batch, cfg: BCOConfig | None = None):
    """``bco_loss(seq_logps, ref_seq_logps, labels, delta)``."""
    cfg = cfg or BCOConfig()
    need("bco", batch, "seq_logps", "ref_seq_logps", "labels", "delta")
    return bco_loss(batch.seq_logps, batch.ref_seq_logps, batch.labels, batch.delta, beta=cfg.beta)


@dataclass(frozen=True)
class TGDPOConfig(DPOConfig):
    """TGDPO ("TGDPO: Harnessing Token-Level Reward Guidance for Enhancing Direct Preference
    Optimization", Zhu et al. 2025): per-token temperature beta * (1 +- alpha * r_t). Defaults:
    beta 0.1 (TRL), tgdpo_alpha 1.0 (``token_preference_loss``'s, the official trainer's)."""

    tgdpo_alpha: float = 1.0


def tgdpo_loss(batch: Batch, cfg: TGDPOConfig | None = None):
    """``token_preference_loss(logprobs, response_mask, ref_logprobs, token_rewards=...)`` over
    rows [0, P) chosen and [P, 2P) rejected."""
    cfg = cfg or TGDPOConfig()
    need("tgdpo", batch, "logprobs", "ref_logprobs", "token_rewards")
    return token_preference_loss(batch.logprobs, batch.response_mask, batch.ref_logprobs,
                                 cu_seqlens=batch.cu_seqlens, token_rewards=batch.token_rewards,
                                 tgdpo_alpha=cfg.tgdpo_alpha, loss_type=cfg.loss_type, beta=cfg.beta,
                                 label_smoothing=cfg.label_smoothing)


@dataclass(frozen=True)
class RTOConfig(PPOConfig):
    """RTO ("DPO Meets PPO: Reinforced Token Optimization for RLHF", Zhong et al. 2024): PPO on
    r_t = beta * log(pi_dpo / pi_ref) - dpo_kl_coef * log(pi_old / pi_ref) + reward_coef * 1[last] r.

    Defaults: beta 0.1, dpo_kl_coef 0.0, reward_coef 1.0 (``dpo_token_rewards``'s); the PPO part
    is ``ppo``'s config.
    """

    beta: float = 0.1
    dpo_kl_coef: float = 0.0
    reward_coef: float = 1.0


def rto_advantages(batch: Batch, cfg: RTOConfig | None = None):
    """``dpo_token_rewards(dpo_logprobs, ref_logprobs, response_mask, old_logprobs, scores)``, then
    ``gae`` over those rewards -> ``(advantages, returns)``."""
    cfg = cfg or RTOConfig()
    need("rto", batch, "dpo_logprobs", "ref_logprobs", "values", "response_mask")
    rewards = dpo_token_rewards(batch.dpo_logprobs, batch.ref_logprobs, batch.response_mask,
                                batch.old_logprobs if cfg.dpo_kl_coef else None, batch.scores, beta=cfg.beta,
                                kl_coef=cfg.dpo_kl_coef, sequence_reward_coef=cfg.reward_coef,
                                cu_seqlens=batch.cu_seqlens)
    return gae(rewards, batch.values, batch.response_mask, gamma=cfg.gamma, lam=cfg.lam, whiten=cfg.whiten,
               cu_seqlens=batch.cu_seqlens)


def rto_loss(batch: Batch, cfg: RTOConfig | None = None):
    """PPO's clipped loss."""
    return clipped_policy_loss("rto", batch, cfg or RTOConfig())


_CONFIGS = {"dpo": DPOConfig, "ipo": IPOConfig, "rso": RSOConfig, "sppo_hard": SPPOHardConfig,
            "apo_zero": APOZeroConfig}

register("dpo", DPOConfig, loss=_pair_loss("dpo"),
         paper="Direct Preference Optimization: Your Language Model is Secretly a Reward Model")
register("ipo", IPOConfig, loss=_pair_loss("ipo", lengths=True),
         paper="A General Theoretical Paradigm to Understand Learning from Human Preferences")
register("rso", RSOConfig, loss=_pair_loss("rso"), acceptance=lambda batch, cfg=None: rso_acceptance(batch, cfg),
         paper="Statistical Rejection Sampling Improves Preference Optimization")
register("sppo_hard", SPPOHardConfig, loss=_pair_loss("sppo_hard"),
         paper="Self-Play Preference Optimization for Language Model Alignment")
register("apo_zero", APOZeroConfig, loss=_pair_loss("apo_zero"),
         paper="Anchored Preference Optimization and Contrastive Revisions")
register("simpo", SimPOConfig, loss=simpo_loss,
         paper="SimPO: Simple Preference Optimization with a Reference-Free Reward")
register("cpo", CPOConfig, loss=cpo_loss,
         paper="Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in Machine "
               "Translation")
register("orpo", ORPOConfig, loss=orpo_loss, paper="ORPO: Monolithic Preference Optimization without Reference Model")
register("kto", KTOConfig, loss=kto, paper="KTO: Model Alignment as Prospect Theoretic Optimization")
register("bco", BCOConfig, loss=bco, paper="Binary Classifier Optimization for Large Language Model Alignment")
register("tgdpo", TGDPOConfig, loss=tgdpo_loss,
         paper="TGDPO: Harnessing Token-Level Reward Guidance for Enhancing Direct Preference Optimization")
register("rto", RTOConfig, advantages=rto_advantages, loss=rto_loss, value_loss=ppo_value_loss,
         paper="DPO Meets PPO: Reinforced Token Optimization for RLHF")


# --- the research list's preference papers (issue 18) ----------------------------------------------


@dataclass(frozen=True)
class SPPOConfig(DPOConfig):
    """SPPO ("Self-Play Preference Optimization for Language Model Alignment", Wu et al. 2024):
    (lc - eta (P_c - 1/2))^2 + (lr - eta (P_r - 1/2))^2, eta = 1 / beta (TRL's convention);
    beta 0.1 (TRL). The reference is the previous iteration's policy."""

    loss_type: str = "sppo"


def sppo_loss(batch: Batch, cfg: SPPOConfig | None = None):
    """``preference_loss(loss_type="sppo", chosen_win_rates=..., rejected_win_rates=...)``."""
    cfg = cfg or SPPOConfig()
    need("sppo", batch, "chosen_win_rates", "rejected_win_rates")
    return preference_loss(batch.chosen_logps, batch.rejected_logps, **_pairs("sppo", batch), loss_type="sppo",
                           beta=cfg.beta, chosen_win_rates=batch.chosen_win_rates,
                           rejected_win_rates=batch.rejected_win_rates)


@dataclass(frozen=True)
class XPOConfig(DPOConfig):
    """XPO ("Exploratory Preference Optimization: Harnessing Implicit Q*-Approximation for
    Sample-Efficient RLHF", Xie et al. 2024): DPO + xpo_alpha * log pi(y_ref). Defaults: beta 0.1,
    xpo_alpha 1e-5 (TRL's XPOConfig)."""

    loss_type: str = "xpo"
    xpo_alpha: float = 1e-5


def xpo_loss(batch: Batch, cfg: XPOConfig | None = None):
    """``preference_loss(loss_type="xpo", sampled_logps=...)``."""
    cfg = cfg or XPOConfig()
    need("xpo", batch, "sampled_logps")
    return preference_loss(batch.chosen_logps, batch.rejected_logps, **_pairs("xpo", batch), loss_type="xpo",
                           beta=cfg.beta, sampled_logps=batch.sampled_logps, xpo_alpha=cfg.xpo_alpha)


@dataclass(frozen=True)
class VPOConfig(DPOConfig):
    """VPO ("Value-Incentivized Preference Optimization", Cen et al. 2024), offline sign: DPO -
    vpo_alpha * beta * log pi(y_cal). Defaults: beta 0.1, vpo_alpha 0.1 (``preference_loss``'s
    choice; the paper tunes it)."""

    loss_type: str = "vpo"
    vpo_alpha: float = 0.1


def vpo_loss(batch: Batch, cfg: VPOConfig | None = None):
    """``preference_loss(loss_type="vpo", sampled_logps=...)``."""
    cfg = cfg or VPOConfig()
    need("vpo", batch, "sampled_logps")
    return preference_loss(batch.chosen_logps, batch.rejected_logps, **_pairs("vpo", batch), loss_type="vpo",
                           beta=cfg.beta, sampled_logps=batch.sampled_logps, vpo_alpha=cfg.vpo_alpha)


@dataclass(frozen=True)
class AcceleratedPOConfig(DPOConfig):
    """APO ("Accelerated Preference Optimization for Large Language Model Alignment", He et al.
    2024): the reference extrapolated with Nesterov momentum, (1 + a) ref - a prev_ref, under any
    loss type (sigmoid: DPO). Defaults: beta 0.1, apo_momentum 0.3 (``preference_loss``'s choice)."""

    apo_momentum: float = 0.3


def accelerated_po_loss(batch: Batch, cfg: AcceleratedPOConfig | None = None):
    """``preference_loss(prev_ref_chosen_logps=..., prev_ref_rejected_logps=..., apo_momentum=...)``."""
    cfg = cfg or AcceleratedPOConfig()
    need("accelerated_po", batch, "prev_ref_chosen_logps", "prev_ref_rejected_logps")
    return preference_loss(batch.chosen_logps, batch.rejected_logps, **_pairs("accelerated_po", batch),
                           loss_type=cfg.loss_type, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                           prev_ref_chosen_logps=batch.prev_ref_chosen_logps,
                           prev_ref_rejected_logps=batch.prev_ref_rejected_logps, apo_momentum=cfg.apo_momentum)


@dataclass(frozen=True)
class INPOConfig(DPOConfig):
    """INPO ("Iterative Nash Policy Optimization", Zhang et al. 2024): (h - eta / 2)^2 against
    the reference and the current iterate. Defaults: beta 0.1, inpo_tau 0.1, inpo_eta 0.1
    (``preference_loss``'s choices)."""

    loss_type: str = "inpo"
    inpo_tau: float = 0.1
    inpo_eta: float = 0.1


def inpo_loss(batch: Batch, cfg: INPOConfig | None = None):
    """``preference_loss(loss_type="inpo", iterate_chosen_logps=..., iterate_rejected_logps=...)``."""
    cfg = cfg or INPOConfig()
    need("inpo", batch, "iterate_chosen_logps", "iterate_rejected_logps")
    return preference_loss(batch.chosen_logps, batch.rejected_logps, **_pairs("inpo", batch), loss_type="inpo",
                           beta=cfg.beta, iterate_chosen_logps=batch.iterate_chosen_logps,
                           iterate_rejected_logps=batch.iterate_rejected_logps, inpo_tau=cfg.inpo_tau,
                           inpo_eta=cfg.inpo_eta)


@dataclass(frozen=True)
class CPLConfig(DPOConfig):
    """CPL ("Contrastive Prefence Learning: Learning from Human Feedback without RL", Hejna et al.
    2023): -log sigmoid(beta c - lambda beta r), reference-free. Defaults: beta (CPL's alpha) 0.1,
    cpl_lambda 0.5 (``preference_loss``'s)."""

    loss_type: str = "cpl"
    cpl_lambda: float = 0.5


def cpl_loss(batch: Batch, cfg: CPLConfig | None = None):
    """``preference_loss(loss_type="cpl")``, reference-free."""
    cfg = cfg or CPLConfig()
    return preference_loss(batch.chosen_logps, batch.rejected_logps, **_pairs("cpl", batch, reference=False),
                           loss_type="cpl", beta=cfg.beta, cpl_lambda=cfg.cpl_lambda)


@dataclass(frozen=True)
class StepAPOConfig(DPOConfig):
    """Step-APO ("CPL: Critical Plan Step Learning Boosts LLM Generalization in Reasoning Tasks",
    Wang et al. 2024): -log sigmoid(beta (A_c lc - A_r lr)) over plan steps; beta 0.1."""

    loss_type: str = "step_apo"


def step_apo_loss(batch: Batch, cfg: StepAPOConfig | None = None):
    """``preference_loss(loss_type="step_apo", chosen_advantages=..., rejected_advantages=...)``."""
    cfg = cfg or StepAPOConfig()
    need("step_apo", batch, "chosen_advantages", "rejected_advantages")
    return preference_loss(batch.chosen_logps, batch.rejected_logps, **_pairs("step_apo", batch),
                           loss_type="step_apo", beta=cfg.beta, chosen_advantages=batch.chosen_advantages,
                           rejected_advantages=batch.rejected_advantages)


@dataclass(frozen=True)
class TriplePOConfig:
    """Triple PO ("Triple Preference Optimization: Achieving Better Alignment with Less Data in a
    Single Step Optimization", Saeidi et al. 2024): a reference-free preference term + tpo_alpha
    times the gold response's NLL (``tpo_nll``). Defaults: TRL 1.16's experimental TPOConfig
    (beta 0.01, tpo_alpha 1.0, loss "sigmoid" over summed log-probs; ``length_normalized=True`` is
    its "tpo-l": simpo with the target margin tpo_l_gamma 0.5)."""

    beta: float = 0.01
    label_smoothing: float = 0.0
    tpo_alpha: float = 1.0
    length_normalized: bool = False
    tpo_l_gamma: float = 0.5


def triple_po_loss(batch: Batch, cfg: TriplePOConfig | None = None):
    """``preference_loss(loss_type=["sigmoid" or "simpo", "tpo_nll"], loss_weights=[1, tpo_alpha])``,
    reference-free, with ``gold_logps`` / ``gold_lengths``."""
    cfg = cfg or TriplePOConfig()
    need("triple_po", batch, "gold_logps", "gold_lengths")
    first = "simpo" if cfg.length_normalized else "sigmoid"
    return preference_loss(batch.chosen_logps, batch.rejected_logps,
                           **_pairs("triple_po", batch, reference=False, lengths=cfg.length_normalized),
                           loss_type=[first, "tpo_nll"], loss_weights=[1.0, cfg.tpo_alpha], beta=cfg.beta,
                           label_smoothing=cfg.label_smoothing, simpo_gamma=cfg.tpo_l_gamma,
                           gold_logps=batch.gold_logps, gold_lengths=batch.gold_lengths)


_CONFIGS.update(sppo=SPPOConfig)
register("sppo", SPPOConfig, loss=sppo_loss, paper="Self-Play Preference Optimization for Language Model Alignment")
register("xpo", XPOConfig, loss=xpo_loss,
         paper="Exploratory Preference Optimization: Harnessing Implicit Q*-Approximation for Sample-Efficient RLHF")
register("vpo", VPOConfig, loss=vpo_loss,
         paper="Value-Incentivized Preference Optimization: A Unified Approach to Online and Offline RLHF")
register("accelerated_po", AcceleratedPOConfig, loss=accelerated_po_loss,
         paper="Accelerated Preference Optimization for Large Language Model Alignment")
register("inpo", INPOConfig, loss=inpo_loss,
         paper="Iterative Nash Policy Optimization: Aligning LLMs with General Preferences via No-Regret Learning")
register("cpl", CPLConfig, loss=cpl_loss,
         paper="Contrastive Prefence Learning: Learning from Human Feedback without RL")
register("step_apo", StepAPOConfig, loss=step_apo_loss,
         paper="CPL: Critical Plan Step Learning Boosts LLM Generalization in Reasoning Tasks")
register("triple_po", TriplePOConfig, loss=triple_po_loss,
         paper="Triple Preference Optimization: Achieving Better Alignment with Less Data in a Single Step "
               "Optimization")


# --- group (listwise) preference losses, SRPO, self-play win rates ------------------------------------


@dataclass(frozen=True)
class GroupPreferenceConfig:
    """The list losses of ``group_preference_loss`` over each prompt's group of responses.
    Defaults: beta 0.1 (DPO's), clip_eps 0.2 (PPO's; P3O), kl_coef 0.01 (TRPA;
    ``group_preference_loss``'s choice, not the paper's)."""

    loss_type: str = "tpo"
    beta: float = 0.1
    clip_eps: float = 0.2
    kl_coef: float = 0.01


@dataclass(frozen=True)
class TPOTreeConfig(GroupPreferenceConfig):
    """TPO ("TPO: Aligning Large Language Models with Multi-branch & Multi-step Preference Trees",
    Liao et al. 2025): the LambdaRank-weighted preference-list loss; beta 0.1."""


@dataclass(frozen=True)
class P3OConfig(GroupPreferenceConfig):
    """P3O ("Pairwise Proximal Policy Optimization: Harnessing Relative Feedback for LLM
    Alignment", Wu et al. 2023): the jointly clipped pairwise objective; clip_eps 0.2."""

    loss_type: str = "p3o"


@dataclass(frozen=True)
class TRPAConfig(GroupPreferenceConfig):
    """TRPA ("Trust Region Preference Approximation", 2025): DPO terms over the pairs with
    different rule-based levels + kl_coef * k3 trust region; beta 0.1, kl_coef 0.01."""

    loss_type: str = "trpa"


@dataclass(frozen=True)
class BRAInConfig(GroupPreferenceConfig):
    """BRAIn ("BRAIn: Bayesian Reward-conditioned Amortized Inference for natural language
    generation from feedback", Pandey et al. 2024): the self-normalized posterior-distillation
    loss with its baseline; beta 0.1."""

    loss_type: str = "brain"


def _group_loss(name: str):
    def fn(batch: Batch, cfg=None):
        cfg = cfg or _CONFIGS[name]()
        need(name, batch, "seq_logps", "group_ids", "scores")
        return group_preference_loss(batch.seq_logps, batch.group_ids, batch.scores, batch.ref_seq_logps,
                                     batch.old_seq_logps, loss_type=cfg.loss_type, beta=cfg.beta,
                                     clip_eps=cfg.clip_eps, kl_coef=cfg.kl_coef)
    fn.__name__ = f"{name}_loss"
    fn.__doc__ = f"``group_preference_loss(seq_logps, group_ids, scores, ref_seq_logps, old_seq_logps)`` ({name})."
    return fn


def brain_weights(batch: Batch, cfg: BRAInConfig | None = None):
    """``group_weights(method="brain")``: the posterior's self-normalized weights (for logging)."""
    cfg = cfg or BRAInConfig()
    need("brain", batch, "scores", "group_ids")
    return group_weights(batch.scores, batch.group_ids, batch.ref_seq_logps, batch.old_seq_logps, method="brain",
                         beta=cfg.beta)


def rso_acceptance(batch: Batch, cfg: RSOConfig | None = None):
    """``group_weights(method="rso")``: each candidate's acceptance probability in RSO's rejection
    sampler, exp((s - max_group s) / beta) (``batch.scores`` of the candidates, ``group_ids`` their prompts)."""
    cfg = cfg or RSOConfig()
    need("rso", batch, "scores", "group_ids")
    return group_weights(batch.scores, batch.group_ids, method="rso", beta=cfg.beta)


@dataclass(frozen=True)
class SRPOConfig:
    """SRPO ("Self-Improving Robust Preference Optimization", Choi et al. 2025): the joint
    least-squares loss of the generative and the self-improvement policy. Defaults: beta 0.1,
    alpha 0.8 (``srpo_loss``'s: DPO's beta; the SRPOTrainer proposed to TRL)."""

    beta: float = 0.1
    alpha: float = 0.8


def srpo(batch: Batch, cfg: SRPOConfig | None = None):
    """``srpo_loss(seq_logps [B, 6], ref_seq_logps [B, 6])``."""
    cfg = cfg or SRPOConfig()
    need("srpo", batch, "seq_logps", "ref_seq_logps")
    return srpo_loss(batch.seq_logps, batch.ref_seq_logps, beta=cfg.beta, alpha=cfg.alpha)


@dataclass(frozen=True)
class SelfPlayConfig(PPOConfig):
    """SPO, self-play ("A Minimaximalist Approach to Reinforcement Learning from Human Feedback",
    Swamy et al. 2024; not Segment Policy Optimization): each response's reward is its win rate
    against its group (``group_weights(method="win_rate")``), then a policy-gradient step (PPO-clip,
    ``ppo``'s config)."""


def self_play_rewards(batch: Batch, cfg: SelfPlayConfig | None = None):
    """``group_weights(scores, group_ids, method="win_rate")``: the self-play reward of each response
    (``scores`` ``[N]``, or an ``[N, N]`` preference matrix)."""
    need("self_play", batch, "scores", "group_ids")
    return group_weights(batch.scores, batch.group_ids, method="win_rate")


def self_play_loss(batch: Batch, cfg: SelfPlayConfig | None = None):
    """PPO's clipped loss over ``batch.advantages`` (from the win-rate rewards)."""
    return clipped_policy_loss("self_play", batch, cfg or SelfPlayConfig())


_CONFIGS.update(tpo_tree=TPOTreeConfig, p3o=P3OConfig, trpa=TRPAConfig, brain=BRAInConfig)
register("tpo_tree", TPOTreeConfig, loss=_group_loss("tpo_tree"),
         paper="TPO: Aligning Large Language Models with Multi-branch & Multi-step Preference Trees")
register("p3o", P3OConfig, loss=_group_loss("p3o"),
         paper="Pairwise Proximal Policy Optimization: Harnessing Relative Feedback for LLM Alignment")
register("trpa", TRPAConfig, loss=_group_loss("trpa"),
         paper="Trust Region Preference Approximation: A simple and stable reinforcement learning algorithm for LLM "
               "reasoning")
register("brain", BRAInConfig, loss=_group_loss("brain"), weights=brain_weights,
         paper="BRAIn: Bayesian Reward-conditioned Amortized Inference for natural language generation from feedback")
register("srpo", SRPOConfig, loss=srpo, paper="Self-Improving Robust Preference Optimization")
register("self_play", SelfPlayConfig, loss=self_play_loss, rewards=self_play_rewards,
         paper="A Minimaximalist Approach to Reinforcement Learning from Human Feedback")
