"""Preference optimization: DPO and its relatives (sequence level), KTO / BCO (unpaired), TGDPO
(token-weighted DPO) and RTO (PPO on DPO's token rewards).

Registered: ``dpo``, ``ipo``, ``rso``, ``sppo_hard``, ``apo_zero``, ``simpo``, ``cpo``, ``orpo``,
``kto``, ``bco``, ``tgdpo``, ``rto``. Each ``loss`` calls one op (``rlkern.preference_loss``,
``kto_loss``, ``bco_loss``, ``token_preference_loss``); ``rto``'s ``advantages`` calls
``dpo_token_rewards`` and ``gae``. Defaults are TRL 1.16's configs (DPOConfig, CPOConfig,
ORPOConfig, KTOConfig, BCOConfig), which follow the papers, unless a docstring says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlkern.algos._registry import Batch, need, register
from rlkern.algos.ppo import PPOConfig, clipped_policy_loss
from rlkern.ops.advantages import gae
from rlkern.ops.preference import bco_loss, kto_loss, preference_loss
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
register("rso", RSOConfig, loss=_pair_loss("rso"),
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
register("rto", RTOConfig, advantages=rto_advantages, loss=rto_loss,
         paper="DPO Meets PPO: Reinforced Token Optimization for RLHF")
