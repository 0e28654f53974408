"""Reference of ``rlkern.preference_loss``: TRL 1.16's DPOTrainer loss over per-sequence log-probs.

Plain PyTorch, float64-capable, differentiable by autograd: the oracle of the C++ kernel
(csrc/preference.cpp) and the Triton kernel (kernels/preference.py). Semantics and defaults are
those of TRL 1.16's ``DPOTrainer._compute_loss`` and ``DPOConfig`` (the loss of every
``loss_type``, the list of loss types with ``loss_weights``, ``f_divergence_type``,
``label_smoothing``, WPO's ``use_weighting`` as per-pair weights); the per-token parts of that
method (summing token log-probs, ``ld_alpha``, the WPO weights themselves) are the caller's.

Two places are written in forms that cannot overflow where TRL's can: ``-logsigmoid`` is a
softplus everywhere, and discopop's ``exp(-x) * sigmoid(x / tau)`` is ``exp(-x - softplus(-x /
tau))`` (TRL's product is ``inf * 0 = nan`` once ``-x`` passes the float's exp range).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# TRL 1.16 DPOTrainer's loss types, then the reference-free ones of its experimental CPO / ORPO trainers.
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
# The research list's pair losses (issue 18): SPPO with estimated win rates, XPO, VPO (offline), INPO, CPL,
# Step-APO, and TPO's NLL on the gold response.
PAPER_LOSS_TYPES = ("sppo", "xpo", "vpo", "inpo", "cpl", "step_apo", "tpo_nll")
LOSS_TYPES = DPO_LOSS_TYPES + ("simpo", "orpo") + PAPER_LOSS_TYPES
# The per-pair constants each paper loss type reads (the op's aux slots: chosen / rejected).
AUX_LOSS_TYPES = {"sppo": ("chosen_win_rates", "rejected_win_rates"),
                  "inpo": ("iterate_chosen_logps", "iterate_rejected_logps"),
                  "step_apo": ("chosen_advantages", "rejected_advantages")}
# The loss types that read a third, differentiable log-prob per pair (the op's extra slot).
EXTRA_LOSS_TYPES = {"xpo": "sampled_logps", "vpo": "sampled_logps", "tpo_nll": "gold_logps"}
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# The loss types whose f-divergence generalization is valid (TRL 1.16's DPOTrainer.__init__ list).
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
# Loss types that read the completion lengths (TRL: completion_mask sums).
LENGTH_LOSS_TYPES = ("ipo", "sigmoid_norm", "sft", "simpo", "orpo")
# The reference-free loss types of TRL 1.16's experimental CPO (simpo) and ORPO (orpo) trainers:
# they read length-averaged log-probs, and with them the metrics are of length-averaged log-probs
# (those trainers log beta * mean token log-prob as the rewards).
AVERAGED_LOSS_TYPES = ("simpo", "orpo")
# Reference-free loss types: reference log-probs are refused with them.
REFERENCE_FREE_LOSS_TYPES = AVERAGED_LOSS_TYPES + ("cpl",)
METRIC_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected")
# TRL's ORPOTrainer also logs these two (means over pairs of logsigmoid(log odds ratio) and of the log
# odds ratio): the metrics have them when orpo is among the loss types.
ORPO_METRIC_KEYS = ("log_odds_ratio", "log_odds_chosen")
# The loss types AlphaPO's reward transform (TRL's experimental CPOConfig ``alpha``) applies to: CPO's.
ALPHAPO_LOSS_TYPES = ("simpo", "sigmoid", "hinge", "ipo", "sft")


def alpha_clamp(dtype: torch.dtype) -> float:
    """TRL's clamp of (alpha - 1) * log-ratio before exp in alpha_divergence, by the input dtype
    (float16: exp must fit after TRL casts back). TRL has no entry for float64; 80 is used."""
    return 11.0 if dtype == torch.float16 else 80.0


def _sp(x: Tensor) -> Tensor:
    return F.softplus(x)


def scores(logratios: Tensor, f_divergence_type: str, alpha: float, clamp_max: float) -> Tensor:
    """f'(pi / ref) of the f-divergence, as a function of the log-ratio (TRL's *_scores)."""
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":  # f'(t) = 1 - 1/t
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":  # f'(t) = log 2 + logsigmoid(log t)
        return math.log(2) - _sp(-logratios)
    if abs(alpha - 1.0) < 1e-6:  # the alpha -> 1 limit is reverse KL
        return logratios
    t = torch.clamp((alpha - 1.0) * logratios, max=clamp_max)
    return (torch.exp(t) - 1.0) / (alpha - 1.0)


def alphapo(x: Tensor, alpha: float) -> Tensor:
    """AlphaPO's reward of a log-prob x: (1 - p^-alpha) / alpha with p = e^x (TRL's CPOTrainer), as
    -expm1(-alpha * x) / alpha (no cancellation for small alpha * x)."""
    return -torch.expm1(-alpha * x) / alpha


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -ln 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def per_pair_losses(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, loss_type, beta,
                    label_smoothing, f_divergence_type, f_alpha_divergence_coef, discopop_tau, chosen_lengths,
                    rejected_lengths, clamp_max, simpo_gamma=0.5, extra=None, extra_lengths=None, aux_chosen=None,
                    aux_rejected=None, xpo_alpha=1e-5, vpo_alpha=0.1, inpo_tau=0.1, inpo_eta=0.1,
                    cpl_lambda=0.5, alpha=0.0) -> Tensor:
    """One loss type's per-pair loss [B] (for aot / aot_unpaired: per sorted position). extra: the
    third log-prob of each pair (xpo / vpo: sampled_logps, tpo_nll: gold_logps, with extra_lengths);
    aux_chosen / aux_rejected: the paper loss types' per-pair constants (AUX_LOSS_TYPES)."""
    lc = chosen_logps - ref_chosen_logps
    lr = rejected_logps - ref_rejected_logps
    sc = scores(lc, f_divergence_type, f_alpha_divergence_coef, clamp_max)
    sr = scores(lr, f_divergence_type, f_alpha_divergence_coef, clamp_max)
    if alpha != 0.0 and loss_type in ("sigmoid", "hinge"):  # AlphaPO: rewards of the summed log-probs
        sc, sr = alphapo(lc, alpha), alphapo(lr, alpha)
    x = beta * (sc - sr)
    ls = label_smoothing
    if loss_type == "sigmoid":
        return _sp(-x)
    if loss_type == "hinge":
        return torch.relu(1 - x)
    if loss_type in ("ipo", "sigmoid_norm"):
        nc = chosen_lengths.clamp(min=1.0)
        nr = rejected_lengths.clamp(min=1.0)
        u = sc / nc - sr / nr
        if alpha != 0.0 and loss_type == "ipo":  # AlphaPO: rewards of the averaged log-probs
            u = alphapo(lc / nc, alpha) - alphapo(lr / nr, alpha)
        return (u - 1 / (2 * beta)) ** 2 if loss_type == "ipo" else _sp(-beta * u)
    if loss_type == "exo_pair":  # EXO (arXiv 2402.00856, Eq. 16): KL(sigmoid(x) || (1 - eps, eps))
        return torch.sigmoid(x) * (-_sp(-x) - math.log1p(-ls)) + torch.sigmoid(-x) * (-_sp(x) - math.log(ls))
    if loss_type == "nca_pair":
        return _sp(-beta * lc) + 0.5 * _sp(beta * lc) + 0.5 * _sp(beta * lr)
    if loss_type == "robust":
        return ((1 - ls) * _sp(-x) - ls * _sp(x)) / (1 - 2 * ls)
    if loss_type == "bco_pair":
        return _sp(-beta * lc) + _sp(beta * lr)
    if loss_type == "sppo_hard":
        return (lc - 0.5 / beta) ** 2 + (lr + 0.5 / beta) ** 2
    if loss_type in ("aot", "aot_unpaired"):
        if loss_type == "aot":
            a, b = chosen_logps - rejected_logps, ref_chosen_logps - ref_rejected_logps
        else:
            a, b = lc, lr
        # stable sorts: tied values get a fixed order, the same in every backend
        delta = torch.sort(a, dim=0, stable=True)[0] - torch.sort(b, dim=0, stable=True)[0]
        return (1 - ls) * _sp(-beta * delta) + ls * _sp(beta * delta)
    if loss_type == "apo_zero":  # APO (arXiv 2408.06266, Eq. 7)
        return 1 - torch.sigmoid(beta * lc) + torch.sigmoid(beta * lr)
    if loss_type == "apo_down":  # APO Eq. 8
        return torch.sigmoid(beta * lc) + 1 - torch.sigmoid(beta * (lc - lr))
    if loss_type == "discopop":  # DiscoPOP (arXiv 2406.08414, Eq. 5)
        mod = torch.sigmoid(x / discopop_tau)
        return _sp(-x) * (1 - mod) + torch.exp(-x - _sp(-x / discopop_tau))
    if loss_type == "simpo":  # CPO's simpo (SimPO, arXiv 2405.14734, Eq. 6, with CPO's label smoothing)
        a = chosen_logps / chosen_lengths.clamp(min=1.0)
        b = rejected_logps / rejected_lengths.clamp(min=1.0)
        if alpha != 0.0:  # AlphaPO
            a, b = alphapo(a, alpha), alphapo(b, alpha)
        y = beta * (a - b) - simpo_gamma
        return (1 - ls) * _sp(-y) + ls * _sp(y)
    if loss_type == "orpo":  # ORPO (arXiv 2403.07691, Eqs. 4 and 7): -beta * logsigmoid(log odds ratio)
        a = chosen_logps / chosen_lengths.clamp(min=1.0)
        b = rejected_logps / rejected_lengths.clamp(min=1.0)
        log_odds = (a - b) - (log1mexp(a) - log1mexp(b))
        return beta * _sp(-log_odds)
    if loss_type == "sppo":  # SPPO (arXiv 2405.00675), eta = 1 / beta: estimated win rates
        return (lc - (aux_chosen - 0.5) / beta) ** 2 + (lr - (aux_rejected - 0.5) / beta) ** 2
    if loss_type == "xpo":  # XPO (arXiv 2405.21046): DPO + alpha * log pi(y~), y~ sampled from pi_ref
        return _sp(-beta * (lc - lr)) + xpo_alpha * extra
    if loss_type == "vpo":  # VPO, offline sign: DPO - alpha * beta * log pi(y), y ~ pi_cal
        return _sp(-beta * (lc - lr)) - vpo_alpha * beta * extra
    if loss_type == "inpo":  # INPO (arXiv 2407.00617): (h_t - eta / 2)^2
        e = inpo_eta * inpo_tau
        h = (chosen_logps - rejected_logps) - e * (ref_chosen_logps - ref_rejected_logps) \
            - (1 - e) * (aux_chosen - aux_rejected)
        return (h - inpo_eta / 2) ** 2
    if loss_type == "cpl":  # CPL (contrastive preference learning): -log sigmoid(alpha * c - lambda * alpha * r)
        return _sp(-beta * (chosen_logps - cpl_lambda * rejected_logps))
    if loss_type == "step_apo":  # Step-APO (critical plan step learning): advantage-weighted log-ratios
        return _sp(-beta * (aux_chosen * lc - aux_rejected * lr))
    if loss_type == "tpo_nll":  # TPO (arXiv 2405.16681): the gold responses' token-mean NLL, one number
        total = extra_lengths.sum().clamp(min=1.0)
        return (-extra.sum() / total).expand_as(chosen_logps)
    if loss_type == "sft":  # the chosen completions' token-mean NLL, one number for every pair
        total = chosen_lengths.sum().clamp(min=1.0)
        return (-chosen_logps.sum() / total).expand_as(chosen_logps)
    raise ValueError(f"preference_loss: unknown loss_type {loss_type!r}")


def preference_loss(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor | None = None,
                    ref_rejected_logps: Tensor | None = None, *, loss_type="sigmoid", beta: float = 0.1,
                    label_smoothing: float = 0.0, f_divergence_type: str = "reverse_kl",
                    f_alpha_divergence_coef: float = 1.0, discopop_tau: float = 0.05, loss_weights=None,
                    chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None,
                    pair_weights: Tensor | None = None, clamp_max: float | None = None, simpo_gamma: float = 0.5,
                    chosen_win_rates=None, rejected_win_rates=None, sampled_logps=None, xpo_alpha: float = 1e-5,
                    vpo_alpha: float = 0.1, prev_ref_chosen_logps=None, prev_ref_rejected_logps=None,
                    apo_momentum: float = 0.3, iterate_chosen_logps=None, iterate_rejected_logps=None,
                    inpo_tau: float = 0.1, inpo_eta: float = 0.1, cpl_lambda: float = 0.5, chosen_advantages=None,
                    rejected_advantages=None, gold_logps=None, gold_lengths=None, alpha: float = 0.0):
    """TRL 1.16 DPO loss (mean over pairs, summed over loss types with their weights) and its
    metrics, computed in float32 (float64 for float64 input), and the research list's pair losses
    (the op's docstring has their formulas). No argument checks: the op checks."""
    dtype = torch.float64 if chosen_logps.dtype == torch.float64 else torch.float32
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    rc, rr = ref_chosen_logps, ref_rejected_logps
    if prev_ref_chosen_logps is not None:  # APO: the extrapolated reference
        rc = (1 + apo_momentum) * rc.to(dtype) - apo_momentum * prev_ref_chosen_logps.to(dtype)
        rr = (1 + apo_momentum) * rr.to(dtype) - apo_momentum * prev_ref_rejected_logps.to(dtype)
    aux_c = aux_r = None
    for t in types:
        if t == "sppo":
            aux_c, aux_r = chosen_win_rates, rejected_win_rates
        elif t == "inpo":
            aux_c, aux_r = iterate_chosen_logps, iterate_rejected_logps
        elif t == "step_apo":
            aux_c, aux_r = chosen_advantages, rejected_advantages
    extra = gold_logps if "tpo_nll" in types else sampled_logps
    return slot_loss(chosen_logps, rejected_logps, extra, rc, rr, aux_c, aux_r, gold_lengths, loss_type=types,
                     beta=beta, label_smoothing=label_smoothing, f_divergence_type=f_divergence_type,
                     f_alpha_divergence_coef=f_alpha_divergence_coef, discopop_tau=discopop_tau,
                     loss_weights=loss_weights, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
                     pair_weights=pair_weights, clamp_max=clamp_max, simpo_gamma=simpo_gamma, xpo_alpha=xpo_alpha,
                     vpo_alpha=vpo_alpha, inpo_tau=inpo_tau, inpo_eta=inpo_eta, cpl_lambda=cpl_lambda, alpha=alpha,
                     averaged_metrics=averaged_metrics(types, ref_chosen_logps is None))


def averaged_metrics(types, reference_free: bool) -> bool:
    """Whether the metrics are of length-averaged log-probs: with CPO's simpo and ORPO's orpo, and
    with a reference-free ipo (CPO's and TPO's ipo average; TRL 1.16's DPO has no reference-free
    mode)."""
    return bool(set(types) & set(AVERAGED_LOSS_TYPES)) or ("ipo" in types and reference_free)


def slot_loss(chosen_logps, rejected_logps, extra, ref_chosen_logps, ref_rejected_logps, aux_chosen, aux_rejected,
              extra_lengths, *, loss_type, beta, label_smoothing, f_divergence_type, f_alpha_divergence_coef,
              discopop_tau, loss_weights, chosen_lengths, rejected_lengths, pair_weights, clamp_max, simpo_gamma,
              xpo_alpha, vpo_alpha, inpo_tau, inpo_eta, cpl_lambda, alpha=0.0, averaged_metrics=False):
    """preference_loss over the kernels' slots: the third log-prob ``extra`` (with its lengths) and
    the per-pair constants ``aux_chosen`` / ``aux_rejected`` mean what the loss types make them."""
    dtype = torch.float64 if chosen_logps.dtype == torch.float64 else torch.float32
    if clamp_max is None:
        clamp_max = alpha_clamp(chosen_logps.dtype)
    c = chosen_logps.to(dtype)
    r = rejected_logps.to(dtype)

    def slot(t, fill):
        return torch.full_like(c, fill) if t is None else t.to(dtype)

    rc = slot(ref_chosen_logps, 0.0)
    rr = slot(ref_rejected_logps, 0.0)
    nc = slot(chosen_lengths, 1.0)
    nr = slot(rejected_lengths, 1.0)
    e = slot(extra, 0.0)
    ne = slot(extra_lengths, 1.0)
    ac = slot(aux_chosen, 0.0)
    ar = slot(aux_rejected, 0.0)
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(types) if loss_weights is None else list(loss_weights)
    n = max(c.numel(), 1)
    loss = c.new_zeros(())
    for t, w in zip(types, weights):
        per_pair = per_pair_losses(c, r, rc, rr, loss_type=t, beta=beta, label_smoothing=label_smoothing,
                                   f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
                                   discopop_tau=discopop_tau, chosen_lengths=nc, rejected_lengths=nr,
                                   clamp_max=clamp_max, simpo_gamma=simpo_gamma, extra=e, extra_lengths=ne,
                                   aux_chosen=ac, aux_rejected=ar, xpo_alpha=xpo_alpha, vpo_alpha=vpo_alpha,
                                   inpo_tau=inpo_tau, inpo_eta=inpo_eta, cpl_lambda=cpl_lambda, alpha=alpha)
        if pair_weights is not None:
            per_pair = per_pair * pair_weights.to(dtype)
        loss = loss + per_pair.sum() / n * w
    with torch.no_grad():
        if averaged_metrics:  # CPO / ORPO / TPO log length-averaged log-probs
            c = c / nc.clamp(min=1.0)
            r = r / nr.clamp(min=1.0)
        cr = beta * (c - rc)
        rj = beta * (r - rr)
        if alpha != 0.0:  # AlphaPO logs beta times its rewards (reference-free)
            cr, rj = beta * alphapo(c, alpha), beta * alphapo(r, alpha)
        metrics = {
            "rewards/chosen": cr.sum() / n,
            "rewards/rejected": rj.sum() / n,
            "rewards/margins": (cr - rj).sum() / n,
            "rewards/accuracies": (cr > rj).to(dtype).sum() / n,
            "logps/chosen": c.sum() / n,
            "logps/rejected": r.sum() / n,
        }
        if "orpo" in types:  # of the averaged log-probs (orpo makes the metrics averaged)
            log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
            metrics["log_odds_ratio"] = -_sp(-log_odds).sum() / n
            metrics["log_odds_chosen"] = log_odds.sum() / n
    return loss, {k: v.detach().to(dtype) for k, v in metrics.items()}


# ------------------------------------------------------------------------------------------------
# KTO: TRL 1.16's KTOTrainer loss over unpaired completions

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
KTO_METRIC_KEYS = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


def kto_loss(policy_logps: Tensor, ref_logps: Tensor, labels: Tensor, kl_logps: Tensor | None = None,
             ref_kl_logps: Tensor | None = None, *, loss_type: str = "kto", beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """TRL 1.16 ``KTOTrainer._compute_loss``'s loss (mean over the batch) and metrics, in float32
    (float64 for float64 input). No argument checks: the op checks."""
    dtype = torch.float64 if policy_logps.dtype == torch.float64 else torch.float32
    x = policy_logps.to(dtype)
    lr = x - ref_logps.to(dtype)
    good = labels.to(torch.bool)
    if loss_type == "kto" and kl_logps is not None and kl_logps.numel() > 0:
        # the batch's KL reference point: mean log-ratio of the mismatched KL completions, >= 0, detached
        kl = (kl_logps.to(dtype) - ref_kl_logps.to(dtype)).mean().clamp(min=0).detach()
    else:
        kl = x.new_zeros(())
    if loss_type == "kto":  # KTO (arXiv 2402.01306, Eq. 7)
        chosen = 1 - torch.sigmoid(beta * (lr - kl))
        rejected = 1 - torch.sigmoid(beta * (kl - lr))
    else:  # APO-zero unpaired (arXiv 2408.06266)
        chosen = 1 - torch.sigmoid(beta * lr)
        rejected = torch.sigmoid(beta * lr)
    per = torch.where(good, desirable_weight * chosen, undesirable_weight * rejected)
    loss = per.sum() / max(x.numel(), 1)
    return loss, _unpaired_metrics("kl", kl, x, beta * lr, good)


def _unpaired_metrics(first_key: str, first_value: Tensor, x: Tensor, rewards: Tensor, good: Tensor) -> dict:
    """KTO's and BCO's logged metrics: ``first_key`` (the KL reference point / the running reward
    mean), then the means of the rewards and log-probs over the desirable and undesirable groups."""
    with torch.no_grad():
        n_good = good.sum().to(x.dtype)
        n_bad = (~good).sum().to(x.dtype)
        zero = x.new_zeros(())
        rc = torch.where(good, rewards, zero).sum() / n_good.clamp(min=1)
        rr = torch.where(good, zero, rewards).sum() / n_bad.clamp(min=1)
        metrics = {
            first_key: first_value,
            "rewards/chosen": rc,
            "rewards/rejected": rr,
            # TRL logs a margin only when both groups are present
            "rewards/margins": torch.where((n_good > 0) & (n_bad > 0), rc - rr, zero),
            "logps/chosen": torch.where(good, x, zero).sum() / n_good.clamp(min=1),
            "logps/rejected": torch.where(good, zero, x).sum() / n_bad.clamp(min=1),
        }
    return {k: v.detach().to(x.dtype) for k, v in metrics.items()}


# ------------------------------------------------------------------------------------------------
# BCO: binary classifier optimization (TRL's BCOTrainer before 1.16 removed it)

BCO_METRIC_KEYS = ("delta",) + KTO_METRIC_KEYS[1:]


def bco_loss(policy_logps: Tensor, ref_logps: Tensor, labels: Tensor, delta: Tensor, *, beta: float = 0.1,
             udm_weights: Tensor | None = None):
    """BCO's loss (mean over the batch) and metrics, in float32 (float64 for float64 input).
    No argument checks: the op checks."""
    dtype = torch.float64 if policy_logps.dtype == torch.float64 else torch.float32
    x = policy_logps.to(dtype)
    rewards = beta * (x - ref_logps.to(dtype))
    good = labels.to(torch.bool)
    d = delta.to(dtype).reshape(())
    w = torch.ones_like(x) if udm_weights is None else udm_weights.to(dtype)
    per = torch.where(good, _sp(-(rewards - d)), w * _sp(rewards - d))
    loss = per.sum() / max(x.numel(), 1)
    return loss, _unpaired_metrics("delta", d, x, rewards, good)
