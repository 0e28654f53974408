"""Sequence-level preference optimization: TRL 1.16's DPO loss over per-pair log-probs.

``preference_loss`` is the loss ``trl.DPOTrainer._compute_loss`` builds from the four summed
log-prob tensors, with every ``loss_type`` TRL 1.16 has. Backends (same arguments, same
outputs): the C++ kernel (csrc/preference.cpp, CPU), the Triton kernel (kernels/preference.py,
GPU) and the reference (rlkern/reference/preference.py, differentiated by torch.func.vjp). Each
kernel computes the loss, its gradient in the chosen and rejected log-probs and the metrics in one
pass over the pairs; the backward scales the saved gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlkern import _backend
from rlkern.ops import _checks, _eager
from rlkern.reference import preference as reference

__all__ = ["preference_loss", "kto_loss", "bco_loss"]

_OP = "preference_loss"
LOSS_TYPES = reference.LOSS_TYPES
METRIC_KEYS = reference.METRIC_KEYS
ORPO_METRIC_KEYS = reference.ORPO_METRIC_KEYS
_ALL_METRICS = METRIC_KEYS + ORPO_METRIC_KEYS  # the kernels' metric slots
_PAPER_TYPES = frozenset(reference.PAPER_LOSS_TYPES)


# The kernels' hyper list (14): beta, label smoothing, f-divergence code, f alpha, discopop tau, alpha clamp,
# simpo gamma, xpo alpha, vpo alpha, inpo tau, inpo eta, cpl lambda, AlphaPO alpha, averaged metrics (1.0 / 0.0).


def _torch_preference_loss(chosen, rejected, extra, ref_chosen, ref_rejected, aux_chosen, aux_rejected, extra_lengths,
                           chosen_lengths, rejected_lengths, pair_weights, loss_types, loss_weights, hyper):
    """The torch backend: the reference and its vjp (works inside a custom op's kernel, where the
    dispatcher has the Autograd keys excluded)."""
    (beta, ls, fdiv, alpha, tau, clamp_max, gamma, xpo_alpha, vpo_alpha, inpo_tau, inpo_eta, cpl_lambda, alpha_po,
     averaged) = hyper
    dtype = torch.float64 if chosen.dtype == torch.float64 else torch.float32

    def objective(c, r, e):
        return reference.slot_loss(
            c, r, e, ref_chosen, ref_rejected, aux_chosen, aux_rejected, extra_lengths,
            loss_type=[LOSS_TYPES[t] for t in loss_types], beta=beta, label_smoothing=ls,
            f_divergence_type=reference.F_DIVERGENCES[int(fdiv)], f_alpha_divergence_coef=alpha, discopop_tau=tau,
            loss_weights=loss_weights, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
            pair_weights=pair_weights, clamp_max=clamp_max, simpo_gamma=gamma, xpo_alpha=xpo_alpha,
            vpo_alpha=vpo_alpha, inpo_tau=inpo_tau, inpo_eta=inpo_eta, cpl_lambda=cpl_lambda, alpha=alpha_po,
            averaged_metrics=averaged != 0.0)

    c, r, e = chosen.to(dtype), rejected.to(dtype), extra.to(dtype)
    loss, vjp, metrics = torch.func.vjp(objective, c, r, e, has_aux=True)
    grad_c, grad_r, grad_e = vjp(torch.ones((), dtype=dtype))
    zero = c.new_zeros(())
    stacked = torch.stack([metrics.get(k, zero) for k in _ALL_METRICS]).to(dtype)
    return (loss.detach().clone(), grad_c.detach().clone(), grad_r.detach().clone(), grad_e.detach().clone(),
            stacked)


_KERNELS = _backend.Kernels(_OP, cpp="cpp_preference_loss", triton="preference.preference_loss",
                            torch=_torch_preference_loss, fp64=("cpp", "triton"))


def _preference_impl(chosen: Tensor, rejected: Tensor, extra: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
                     aux_chosen: Tensor, aux_rejected: Tensor, extra_lengths: Tensor, chosen_lengths: Tensor,
                     rejected_lengths: Tensor, pair_weights: Tensor, loss_types: list[int], loss_weights: list[float],
                     hyper: list[float]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _KERNELS.pick(chosen)(chosen, rejected, extra, ref_chosen, ref_rejected, aux_chosen, aux_rejected,
                                 extra_lengths, chosen_lengths, rejected_lengths, pair_weights, loss_types,
                                 loss_weights, hyper)


_preference_op = torch.library.custom_op("rlkern::preference_loss", mutates_args=())(_preference_impl)


@_preference_op.register_fake
def _preference_fake(chosen, rejected, extra, ref_chosen, ref_rejected, aux_chosen, aux_rejected, extra_lengths,
                     chosen_lengths, rejected_lengths, pair_weights, loss_types, loss_weights, hyper):
    dtype = torch.float64 if chosen.dtype == torch.float64 else torch.float32
    return (chosen.new_empty((), dtype=dtype), chosen.new_empty(chosen.shape, dtype=dtype),
            chosen.new_empty(chosen.shape, dtype=dtype), chosen.new_empty(chosen.shape, dtype=dtype),
            chosen.new_empty((len(_ALL_METRICS),), dtype=dtype))


def _setup_context(ctx, inputs, output):
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype, inputs[2].dtype)
    ctx.save_for_backward(output[1], output[2], output[3])


def _backward(ctx, grad_loss, _grad_c, _grad_r, _grad_e, _grad_metrics):
    grad_c, grad_r, grad_e = ctx.saved_tensors
    g = grad_loss.to(grad_c.dtype)
    # the extra slot is a zero placeholder unless a paper loss type reads it: no work for its gradient then
    ge = (g * grad_e).to(ctx.dtypes[2]) if ctx.needs_input_grad[2] else None
    return ((g * grad_c).to(ctx.dtypes[0]), (g * grad_r).to(ctx.dtypes[1]), ge, None, None, None, None, None, None,
            None, None, None, None, None)


_preference_op.register_autograd(_backward, setup_context=_setup_context)


_EagerPreferenceLoss = _eager.function("_EagerPreferenceLoss", _preference_impl, _setup_context, _backward,
                                       "rlkern::preference_loss without the dispatcher.")


def _loss_types(loss_type) -> list[str]:
    types = [loss_type] if isinstance(loss_type, str) else loss_type
    if not isinstance(types, (list, tuple)) or not types or not all(isinstance(t, str) for t in types):
        raise TypeError(f"{_OP}: loss_type must be a string or a non-empty list of strings, got {loss_type!r}")
    for t in types:
        _checks.choice(_OP, "loss_type", t, LOSS_TYPES)
    return list(types)


def preference_loss(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor | None = None,
                    ref_rejected_logps: Tensor | None = None, *, loss_type="sigmoid", beta: float = 0.1,
                    label_smoothing: float = 0.0, f_divergence_type: str = "reverse_kl",
                    f_alpha_divergence_coef: float = 1.0, discopop_tau: float = 0.05, loss_weights=None,
                    chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None,
                    pair_weights: Tensor | None = None, simpo_gamma: float = 0.5,
                    chosen_win_rates: Tensor | None = None, rejected_win_rates: Tensor | None = None,
                    sampled_logps: Tensor | None = None, xpo_alpha: float = 1e-5, vpo_alpha: float = 0.1,
                    prev_ref_chosen_logps: Tensor | None = None, prev_ref_rejected_logps: Tensor | None = None,
                    apo_momentum: float = 0.3, iterate_chosen_logps: Tensor | None = None,
                    iterate_rejected_logps: Tensor | None = None, inpo_tau: float = 0.1, inpo_eta: float = 0.1,
                    cpl_lambda: float = 0.5, chosen_advantages: Tensor | None = None,
                    rejected_advantages: Tensor | None = None, gold_logps: Tensor | None = None,
                    gold_lengths: Tensor | None = None, alpha: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """TRL 1.16's DPO loss (``DPOTrainer._compute_loss``) over per-sequence log-probs, and the
    losses of its experimental CPO (with SimPO) and ORPO trainers (reference-free).

    Args:
        chosen_logps, rejected_logps: ``[B]`` float16/bfloat16/float32/float64, one dtype: the
            policy's log-probs of the chosen and rejected completions, summed over their tokens
            by the caller (TRL's ``per_token_logps.sum(1)``; LD-DPO's ``ld_alpha`` weighting of
            the tail tokens is also the caller's). Differentiable.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` float, the reference model's, constants
            (a tensor that requires grad is refused: compute them under ``torch.no_grad()``).
            None: reference-free, taken as 0 (TRL's ``reference_free`` / SimPO-style).
        loss_type: one of ``rlkern.ops.preference.LOSS_TYPES`` (sigmoid, hinge, ipo, exo_pair,
            nca_pair, robust, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down,
            discopop, sft, sigmoid_norm, simpo, orpo) or a list of them (MPO), summed with
            ``loss_weights`` (default all 1.0). Defaults from TRL 1.16's DPOConfig, as every
            keyword here. simpo and orpo are reference-free (no ref tensors), read both lengths
            and make the metrics those of length-averaged log-probs, as the trainers log them:
            - simpo: TRL's ``CPOTrainer`` loss_type simpo (SimPO): per pair, with u = c / n_c -
              r / n_r the length-averaged margin and y = beta * u - simpo_gamma,
              ``(1 - label_smoothing) * softplus(-y) + label_smoothing * softplus(y)``.
            - orpo: TRL's ``ORPOTrainer`` odds-ratio term: ``beta * softplus(-log_odds)`` with
              log_odds = (a - b) - (log(1 - e^a) - log(1 - e^b)), a, b the length-averaged
              chosen / rejected log-probs (beta is ORPO's lambda).
            The trainers' NLL term (cross-entropy over the chosen tokens, a token mean) is sft:
            CPO = ``loss_type=[t, "sft"], loss_weights=[1, cpo_alpha]``, ORPO =
            ``loss_type=["orpo", "sft"]`` (ORPO's NLL runs over the prompt tokens too: sft equals
            it only where the summed tokens are those; else add the caller's own NLL). orpo needs
            log-probs < 0 (an averaged log-prob of 0 has infinite odds, as in TRL); with orpo the
            metrics also hold ORPO's ``log_odds_ratio`` / ``log_odds_chosen`` (means over pairs of
            logsigmoid(log_odds) and log_odds). CPO's other loss types: hinge = hinge
            reference-free; ipo = ipo reference-free with the lengths (its metrics, as CPO's and
            TPO's, are of averaged log-probs: a reference-free ipo averages them); sigmoid =
            sigmoid reference-free, and with CPO's label smoothing = simpo with ``simpo_gamma=0``
            and lengths of ones.
        alpha: CPO's AlphaPO reward transform (TRL's experimental CPOConfig ``alpha``, 0.0 = off):
            the log-probs x that CPO's loss compares (length-averaged for simpo and ipo, summed for
            sigmoid and hinge) become ``(1 - e^(-alpha * x)) / alpha``, in the loss and in the
            rewards metrics (``beta`` times them; logps metrics stay raw). Only with CPO's loss
            types (simpo, sigmoid, hinge, ipo, and sft), reference-free, reverse_kl.
        simpo_gamma: simpo's target margin (CPOConfig's 0.5).
        beta: the DPO temperature (0.1). label_smoothing: read by robust, exo_pair (must be > 0
            there, as TRL requires), aot, aot_unpaired and simpo only, in [0, 0.5] (robust: < 0.5).
        f_divergence_type: reverse_kl, forward_kl, js_divergence or alpha_divergence (with
            ``f_alpha_divergence_coef``; TRL's clamp of (alpha - 1) * log-ratio at 80, 11 for
            float16 input), only with sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust,
            discopop, sft, as in TRL. discopop_tau: discopop's temperature (0.05).
        chosen_lengths, rejected_lengths: ``[B]`` int or float, the completions' token counts
            (TRL's completion_mask sums); required by ipo and sigmoid_norm (both) and sft
            (chosen), which normalize by them (per pair clamped to >= 1; sft divides the
            chosen log-probs' total by the chosen lengths' total).
        pair_weights: ``[B]`` float constants multiplying each pair's loss: WPO
            (``use_weighting=True``) passes TRL's ``chosen_weights * rejected_weights``. Not with
            aot / aot_unpaired (TRL refuses: they sort the pairs).

    The research list's pair losses (issue 18; loss types after orpo in LOSS_TYPES). Below,
    lc = chosen_logps - ref_chosen_logps and lr = rejected_logps - ref_rejected_logps (the
    reference log-probs being those of the model the paper uses as reference), c / r the policy's
    log-probs, each formula a pair's loss (averaged over pairs, times pair_weights, like the rest):

    - ``"sppo"``: "Self-Play Preference Optimization for Language Model Alignment" (SPPO),
      ``(lc - eta * (P_c - 1/2))**2 + (lr - eta * (P_r - 1/2))**2`` with eta = 1 / beta (TRL's
      convention) and P_c, P_r = ``chosen_win_rates``, ``rejected_win_rates``: ``[B]`` float
      constants in [0, 1], the estimated win rates P-hat(y > pi_t) of each completion against the
      current policy (TRL's ``sppo_hard`` is P_c = 1, P_r = 0). The reference is pi_t, the policy
      of the previous iteration. The loop around it (the caller's): each iteration samples K
      responses per prompt from pi_t, scores every pair with a preference model (PairRM in the
      paper), sets P-hat(y > pi_t) = the mean of P(y > y_k) over the K samples, keeps a pair
      (e.g. the best and the worst), trains with this loss, and makes the result pi_{t+1}.
    - RSO ("Statistical Rejection Sampling Improves Preference Optimization") names its losses
      sigmoid-norm, hinge-norm and hinge: sigmoid-norm ``-log sigmoid(beta * (lc - lr))`` is
      ``"sigmoid"``; hinge-norm ``max(0, 1 - beta * (lc - lr))`` is ``"hinge"`` (TRL's hinge is
      SLiC's on the normalized likelihood); SLiC's hinge ``max(0, 1 - beta * (c - r))`` is
      ``"hinge"`` reference-free (no ref tensors). (TRL's ``"sigmoid_norm"`` is another loss: the
      length-normalized sigmoid.) The rejection sampler that builds RSO's pairs is a group op,
      not part of this loss.
    - ``"xpo"``: "Exploratory Preference Optimization" (XPO): DPO plus the
      exploration term, ``-log sigmoid(beta * (lc - lr)) + xpo_alpha * s`` with s =
      ``sampled_logps``: ``[B]`` the policy's log-probs (summed, differentiable) of one response
      per prompt sampled from the reference model (TRL's former XPOTrainer:
      ``alpha * model_logprobs_ref.sum(1)``). In TRL's loop that reference sample is also one side
      of the pair (the judge picks chosen between the policy's sample and the reference's): pass
      the same tensor in both places. ``xpo_alpha``: XPOConfig's default 1e-5. TRL's XPO with
      its ``loss_type="ipo"`` (the unnormalized ipo): ``loss_type=["ipo", "xpo", "sigmoid"],
      loss_weights=[1, 1, -1]`` with lengths of ones (the sigmoid terms cancel exactly).
    - ``"vpo"``: "Value-Incentivized Preference Optimization" (VPO), offline (pessimistic) sign:
      ``-log sigmoid(beta * (lc - lr)) - vpo_alpha * beta * s`` with s = ``sampled_logps``, the
      policy's log-probs of a response from the calibration distribution pi_cal (offline: a
      response of the data set, e.g. the chosen one: pass chosen_logps). It is the value
      regularizer alpha * J(r) with the DPO reward, J(r) = -beta * E_{pi_cal}[log pi / pi_ref] up
      to a constant (the constant log pi_ref term is dropped: no gradient). Online VPO
      (optimism) flips the sign: that is ``"xpo"`` with ``xpo_alpha = vpo_alpha * beta``.
      ``vpo_alpha``: 0.1 (a choice; the paper tunes it).
    - APO: "Accelerated Preference Optimization for Large Language Model Alignment", a modifier of
      any loss type: with ``prev_ref_chosen_logps`` / ``prev_ref_rejected_logps`` (``[B]``
      constants) the reference log-probs become Nesterov's extrapolation
      ``(1 + apo_momentum) * ref - apo_momentum * prev_ref`` (log pi-hat_t = log pi_t +
      alpha * (log pi_t - log pi_{t-1}), its normalizer dropped: exact for the losses of lc - lr,
      e.g. sigmoid, hinge, ipo with equal lengths). The loop: iteration t trains pi_{t+1} from
      the data against that reference, where ref = pi_t (the previous iterate) and prev_ref =
      pi_{t-1} (the one before); the momentum runs across iterations. ``apo_momentum``: alpha,
      0.3 (a choice). Its metrics are those against the extrapolated reference.
    - ``"inpo"``: "Iterative Nash Policy Optimization" (INPO): ``(h - eta / 2)**2`` with
      h = (c - r) - eta * tau * (ref_c - ref_r) - (1 - eta * tau) * (pi_t_c - pi_t_r), where the
      ref tensors are pi_ref's and pi_t_c / pi_t_r = ``iterate_chosen_logps`` /
      ``iterate_rejected_logps`` are the current iterate pi_t's (``[B]`` constants); tau =
      ``inpo_tau`` (the KL regularization to pi_ref), eta = ``inpo_eta`` (the no-regret step);
      0.1 each (a choice). The loop: sample two responses from pi_t, label them with the
      preference oracle, train with this loss, pi_{t+1} is the result.
    - ``"cpl"``: "Contrastive Prefence Learning: Learning from Human Feedback without RL" (CPL):
      ``-log sigmoid(beta * c - cpl_lambda * beta * r)``, reference-free; beta is CPL's
      temperature alpha, ``cpl_lambda`` its conservative bias lambda (0.5). CPL's discounted sums
      of token log-probs are the caller's summed log-probs: gamma = 1.
    - ``"step_apo"``: Step-APO of "CPL: Critical Plan Step Learning Boosts LLM Generalization in
      Reasoning Tasks": ``-log sigmoid(beta * (A_c * lc - A_r * lr))``, the log-ratios of the
      chosen / rejected plan steps weighted by their MCTS advantages A_c, A_r =
      ``chosen_advantages``, ``rejected_advantages`` (``[B]`` constants; the tree search is the
      caller's).
    - ``"tpo_nll"``: "Triple Preference Optimization" (TPO): the NLL of the gold response, the
      token mean ``-sum(g) / sum(n_g)`` over the batch (one number, as sft) of ``gold_logps`` g
      (``[B]``, summed, differentiable) and ``gold_lengths`` n_g. TPO's weight tpo_alpha is its
      loss weight. TPO (TRL 1.16's experimental TPOTrainer, reference-free) = its preference term
      + tpo_nll: sigmoid (with label smoothing) = ``"simpo"`` at ``simpo_gamma=0`` with lengths
      of ones; tpo-l = ``"simpo"`` with lengths and simpo_gamma = tpo_l_gamma; hinge / ipo =
      ``"hinge"`` / ``"ipo"`` reference-free. A new tensor, not ``"sft"``: the gold response is
      a third completion, not the chosen one.

    Returns:
        ``(loss, metrics)``: the 0-dim loss (mean over pairs, float32; float64 for float64
        input) and a dict of 0-dim float32 tensors: TRL's logged ``rewards/chosen``,
        ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies`` (rewards = beta * (logps - ref_logps), means over pairs),
        ``logps/chosen`` and ``logps/rejected`` (with orpo also ``log_odds_ratio`` and
        ``log_odds_chosen``). B = 0 gives a loss and metrics of 0. Sorting ties (aot) are
        ordered stably. Forms that cannot overflow are used throughout
        (softplus for -logsigmoid; discopop's exponential in log space).
    """
    chosen, rejected = chosen_logps, rejected_logps
    types = _loss_types(loss_type)
    tset = set(types)
    # the paper loss types' tensors and hyper-parameters: checked only when one of those tensors is given or
    # a paper type is asked for (the common call pays nothing for them)
    paper = not tset.isdisjoint(_PAPER_TYPES) or any(
        t is not None for t in (chosen_win_rates, rejected_win_rates, prev_ref_chosen_logps, prev_ref_rejected_logps,
                                iterate_chosen_logps, iterate_rejected_logps, chosen_advantages, rejected_advantages,
                                sampled_logps, gold_logps, gold_lengths))
    constants = {"ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps,
                 "pair_weights": pair_weights}
    if paper:
        constants.update(chosen_win_rates=chosen_win_rates, rejected_win_rates=rejected_win_rates,
                         prev_ref_chosen_logps=prev_ref_chosen_logps, prev_ref_rejected_logps=prev_ref_rejected_logps,
                         iterate_chosen_logps=iterate_chosen_logps, iterate_rejected_logps=iterate_rejected_logps,
                         chosen_advantages=chosen_advantages, rejected_advantages=rejected_advantages)
    specs = {"chosen_logps": (chosen, "float"), "rejected_logps": (rejected, "float"),
             "chosen_lengths": (chosen_lengths, "mask"), "rejected_lengths": (rejected_lengths, "mask"),
             **{k: (v, "float") for k, v in constants.items()}}
    if paper:
        specs.update(sampled_logps=(sampled_logps, "float"), gold_logps=(gold_logps, "float"),
                     gold_lengths=(gold_lengths, "mask"))
    _checks.tensors(_OP, "chosen_logps", specs)
    if chosen.ndim != 1:
        raise ValueError(f"{_OP}: chosen_logps must be [B], got shape {tuple(chosen.shape)}")
    _checks.tensors(_OP, "chosen_logps", specs, shape=chosen.shape)
    for name, t in (("rejected_logps", rejected), ("sampled_logps", sampled_logps), ("gold_logps", gold_logps)):
        if t is not None and t.dtype != chosen.dtype:
            raise TypeError(f"{_OP}: {name} must have chosen_logps' dtype {chosen.dtype}, got {t.dtype}")
    pairs = (("ref_chosen_logps", "ref_rejected_logps"),)
    if paper:
        pairs += (("prev_ref_chosen_logps", "prev_ref_rejected_logps"), ("chosen_win_rates", "rejected_win_rates"),
                  ("iterate_chosen_logps", "iterate_rejected_logps"), ("chosen_advantages", "rejected_advantages"))
    for a, b in pairs:
        if (constants[a] is None) != (constants[b] is None):
            raise ValueError(f"{_OP}: {a} and {b} must be given together (or both None), got only one")
    for name, t in constants.items():
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{_OP}: {name} requires grad, but it is a constant of the loss; compute it under "
                             "torch.no_grad() or pass .detach()")
    if loss_weights is None:
        weights = [1.0] * len(types)
    else:
        if not isinstance(loss_weights, (list, tuple)) or len(loss_weights) != len(types):
            raise ValueError(f"{_OP}: loss_weights must be a list of {len(types)} numbers (one per loss_type), "
                             f"got {loss_weights!r}")
        weights = [_checks.number(_OP, "loss_weights", w) for w in loss_weights]
    beta = _checks.number(_OP, "beta", beta, low=0, low_open=True)
    ls = _checks.number(_OP, "label_smoothing", label_smoothing, low=0, high=0.5)
    _checks.choice(_OP, "f_divergence_type", f_divergence_type, reference.F_DIVERGENCES)
    f_alpha = _checks.number(_OP, "f_alpha_divergence_coef", f_alpha_divergence_coef)
    tau = _checks.number(_OP, "discopop_tau", discopop_tau, low=0, low_open=True)
    if f_divergence_type != "reverse_kl":
        bad = sorted(tset - set(reference.F_DIVERGENCE_LOSS_TYPES))
        if bad:
            raise ValueError(f"{_OP}: f_divergence_type={f_divergence_type!r} is only valid with loss types "
                             f"{reference.F_DIVERGENCE_LOSS_TYPES}, got {bad}")
    if "exo_pair" in tset and ls == 0.0:
        raise ValueError(f"{_OP}: label_smoothing must be > 0 with loss_type 'exo_pair' (EXO recommends 1e-3), got 0.0")
    if "robust" in tset and ls >= 0.5:
        raise ValueError(f"{_OP}: label_smoothing must be < 0.5 with loss_type 'robust', got {ls!r}")
    free = sorted(tset & set(reference.REFERENCE_FREE_LOSS_TYPES))
    if free and ref_chosen_logps is not None:
        raise ValueError(f"{_OP}: loss_type {free} is reference-free (TRL's CPO / ORPO trainers, CPL), got reference "
                         "log-probs")
    gamma = _checks.number(_OP, "simpo_gamma", simpo_gamma)
    if pair_weights is not None and {"aot", "aot_unpaired"} & tset:
        raise ValueError(f"{_OP}: pair_weights cannot be used with aot / aot_unpaired (they sort the pairs)")
    for name, t, needed in (("chosen_lengths", chosen_lengths, {"ipo", "sigmoid_norm", "sft", "simpo", "orpo"}),
                            ("rejected_lengths", rejected_lengths, {"ipo", "sigmoid_norm", "simpo", "orpo"}),
                            ("gold_lengths", gold_lengths, {"tpo_nll"})):
        if t is None and needed & tset:
            raise ValueError(f"{_OP}: loss_type {sorted(needed & tset)} needs {name} (the completions' "
                             "token counts), got None")
    if paper:  # the paper loss types' hyper-parameters (unread otherwise) and tensors
        xpo_alpha = _checks.number(_OP, "xpo_alpha", xpo_alpha)
        vpo_alpha = _checks.number(_OP, "vpo_alpha", vpo_alpha)
        apo_momentum = _checks.number(_OP, "apo_momentum", apo_momentum, low=0)
        inpo_tau = _checks.number(_OP, "inpo_tau", inpo_tau, low=0)
        inpo_eta = _checks.number(_OP, "inpo_eta", inpo_eta, low=0, low_open=True)
        cpl_lambda = _checks.number(_OP, "cpl_lambda", cpl_lambda, low=0)
        # each tensor is read by its loss types only, with one meaning per call
        readers = {"sampled_logps": ("xpo", "vpo"), "gold_logps": ("tpo_nll",), "gold_lengths": ("tpo_nll",),
                   "iterate_chosen_logps": ("inpo",), "chosen_win_rates": ("sppo",),
                   "chosen_advantages": ("step_apo",)}
        given = {"sampled_logps": sampled_logps, "gold_logps": gold_logps, "gold_lengths": gold_lengths,
                 "iterate_chosen_logps": iterate_chosen_logps, "chosen_win_rates": chosen_win_rates,
                 "chosen_advantages": chosen_advantages}
        for name, users in readers.items():
            if given[name] is None and set(users) & tset:
                raise ValueError(f"{_OP}: loss_type {sorted(set(users) & tset)} needs {name}, got None")
            if given[name] is not None and not set(users) & tset:
                raise ValueError(f"{_OP}: {name} is read by loss_type {list(users)} only, got loss_type {types}")
        for group in (("sppo", "inpo", "step_apo"), ("xpo", "tpo_nll"), ("vpo", "tpo_nll")):
            if len(set(group) & tset) > 1:
                raise ValueError(f"{_OP}: loss_type {sorted(set(group) & tset)} cannot be combined in one call "
                                 "(they read different per-pair tensors); call the op once per loss type")
    if alpha != 0.0:  # (anything but a number is != 0.0: the check below refuses it)
        alpha = _checks.number(_OP, "alpha", alpha)
        bad = sorted(tset - set(reference.ALPHAPO_LOSS_TYPES))
        if bad or ref_chosen_logps is not None or f_divergence_type != "reverse_kl":
            raise ValueError(f"{_OP}: alpha (AlphaPO) applies to CPO's reference-free loss types "
                             f"{reference.ALPHAPO_LOSS_TYPES} with reverse_kl only, got loss_type {types}, "
                             f"{'reference log-probs' if ref_chosen_logps is not None else 'no reference'}, "
                             f"f_divergence_type={f_divergence_type!r}")
    if prev_ref_chosen_logps is not None and ref_chosen_logps is None:
        raise ValueError(f"{_OP}: prev_ref_chosen_logps (APO) needs ref_chosen_logps and ref_rejected_logps, got "
                         "None")

    dtype = torch.float64 if chosen.dtype == torch.float64 else torch.float32

    filled = {}  # the default slots (zeros, ones), made once each and only when a slot needs one

    def aux(t, fill):
        if t is None:
            if fill not in filled:
                filled[fill] = (chosen.new_zeros if fill == 0.0 else chosen.new_ones)(chosen.shape, dtype=dtype)
            return filled[fill]
        return t.detach().to(dtype).contiguous()

    ref_c, ref_r = aux(ref_chosen_logps, 0.0), aux(ref_rejected_logps, 0.0)
    if prev_ref_chosen_logps is not None:  # APO: Nesterov's extrapolated reference, constants of the loss
        ref_c = ((1 + apo_momentum) * ref_c - apo_momentum * aux(prev_ref_chosen_logps, 0.0)).contiguous()
        ref_r = ((1 + apo_momentum) * ref_r - apo_momentum * aux(prev_ref_rejected_logps, 0.0)).contiguous()
    lengths_c, lengths_r, weights_t = aux(chosen_lengths, 1.0), aux(rejected_lengths, 1.0), aux(pair_weights, 1.0)
    if paper:
        aux_c = aux(chosen_win_rates if "sppo" in tset else iterate_chosen_logps if "inpo" in tset
                    else chosen_advantages, 0.0)
        aux_r = aux(rejected_win_rates if "sppo" in tset else iterate_rejected_logps if "inpo" in tset
                    else rejected_advantages, 0.0)
        lengths_e = aux(gold_lengths, 1.0)
        extra = gold_logps if "tpo_nll" in tset else sampled_logps
    else:  # no loss type reads these slots: any tensor of the slot's shape and dtype does
        aux_c = aux_r = lengths_e = lengths_c
        extra = None
    if extra is None:  # the kernels read the extra slot in chosen_logps' dtype
        extra = lengths_c if chosen.dtype == dtype and not paper else chosen.new_zeros(chosen.shape)
    # the paper hyper-parameters are checked (and read) only with the paper types / tensors: 0 otherwise
    paper_hyper = [xpo_alpha, vpo_alpha, inpo_tau, inpo_eta, cpl_lambda] if paper else [0.0] * 5
    hyper = [beta, ls, float(reference.F_DIVERGENCES.index(f_divergence_type)), f_alpha, tau,
             reference.alpha_clamp(chosen.dtype), gamma, *paper_hyper, float(alpha),
             float(reference.averaged_metrics(types, ref_chosen_logps is None))]
    eager = _eager.may_bypass(chosen)
    op = _EagerPreferenceLoss.apply if eager else _preference_op
    loss, _, _, _, metrics = op(
        chosen, rejected, extra, ref_c, ref_r, aux_c, aux_r, lengths_e, lengths_c, lengths_r, weights_t,
        [LOSS_TYPES.index(t) for t in types], weights, hyper)
    keys = _ALL_METRICS if "orpo" in types else METRIC_KEYS
    return loss, dict(zip(keys, metrics.detach().to(torch.float32).unbind(0)))


# ------------------------------------------------------------------------------------------------
# KTO: unpaired completions, TRL 1.16's KTOTrainer

_KTO = "kto_loss"
KTO_LOSS_TYPES = reference.KTO_LOSS_TYPES
KTO_METRIC_KEYS = reference.KTO_METRIC_KEYS


_BCO_CODE = len(KTO_LOSS_TYPES)  # the kernels' loss type code of bco_loss


def _torch_kto_loss(policy, ref, labels, weights, kl_logps, ref_kl_logps, loss_type, hyper):
    beta, dw, uw = hyper
    dtype = torch.float64 if policy.dtype == torch.float64 else torch.float32

    def objective(x):
        if loss_type == _BCO_CODE:  # bco_loss passes delta as kl_logps = [delta], ref_kl_logps = [0]
            return reference.bco_loss(x, ref, labels, kl_logps[0] - ref_kl_logps[0], beta=beta, udm_weights=weights)
        return reference.kto_loss(x, ref, labels, kl_logps, ref_kl_logps, loss_type=KTO_LOSS_TYPES[loss_type],
                                  beta=beta, desirable_weight=dw, undesirable_weight=uw)

    loss, vjp, metrics = torch.func.vjp(objective, policy.to(dtype), has_aux=True)
    (grad,) = vjp(torch.ones((), dtype=dtype))
    stacked = torch.stack(list(metrics.values())).to(dtype)
    return loss.detach().clone(), grad.detach().clone(), stacked


_KTO_KERNELS = _backend.Kernels(_KTO, cpp="cpp_kto_loss", triton="preference.kto_loss", torch=_torch_kto_loss,
                                fp64=("cpp", "triton"))


def _kto_impl(policy: Tensor, ref: Tensor, labels: Tensor, weights: Tensor, kl_logps: Tensor, ref_kl_logps: Tensor,
              loss_type: int, hyper: list[float]) -> tuple[Tensor, Tensor, Tensor]:
    return _KTO_KERNELS.pick(policy)(policy, ref, labels, weights, kl_logps, ref_kl_logps, loss_type, hyper)


_kto_op = torch.library.custom_op("rlkern::kto_loss", mutates_args=())(_kto_impl)


@_kto_op.register_fake
def _kto_fake(policy, ref, labels, weights, kl_logps, ref_kl_logps, loss_type, hyper):
    dtype = torch.float64 if policy.dtype == torch.float64 else torch.float32
    return (policy.new_empty((), dtype=dtype), policy.new_empty(policy.shape, dtype=dtype),
            policy.new_empty((len(KTO_METRIC_KEYS),), dtype=dtype))


def _kto_setup_context(ctx, inputs, output):
    ctx.dtype = inputs[0].dtype
    ctx.save_for_backward(output[1])


def _kto_backward(ctx, grad_loss, _grad, _grad_metrics):
    (grad,) = ctx.saved_tensors
    return (grad_loss.to(grad.dtype) * grad).to(ctx.dtype), None, None, None, None, None, None, None


_kto_op.register_autograd(_kto_backward, setup_context=_kto_setup_context)


_EagerKTOLoss = _eager.function("_EagerKTOLoss", _kto_impl, _kto_setup_context, _kto_backward,
                                "rlkern::kto_loss without the dispatcher.")


def kto_loss(policy_logps: Tensor, ref_logps: Tensor, labels: Tensor, kl_logps: Tensor | None = None,
             ref_kl_logps: Tensor | None = None, *, loss_type: str = "kto", beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
    """TRL 1.16's KTO loss (``KTOTrainer._compute_loss``) over unpaired per-sequence log-probs.

    A sibling of ``preference_loss``: KTO's batch is not made of pairs (each completion is
    desirable or not), and its reference point is a batch statistic.

    Args:
        policy_logps: ``[B]`` float16/bfloat16/float32/float64: the policy's log-probs of the
            completions, summed over their tokens by the caller. Differentiable.
        ref_logps: ``[B]`` float, the reference model's (constants).
        labels: ``[B]`` bool (or 0/1 ints): True for a desirable completion (TRL's ``label``).
        kl_logps, ref_kl_logps: ``[M]`` float constants: the policy's and the reference's summed
            log-probs of the KL completions (TRL's mismatched ``KL_completion_ids``, computed by
            TRL under no_grad). The reference point is TRL's
            ``kl = (kl_logps - ref_kl_logps).mean().clamp(min=0)``, detached, one per call (TRL
            then averages it over processes: pass the gathered tensors for that). Required with
            ``loss_type="kto"``, not taken with ``"apo_zero_unpaired"`` (TRL computes none). M = 0
            gives kl = 0.
        loss_type: ``"kto"`` (KTO, arXiv 2402.01306, Eq. 7: desirable ``1 - sigmoid(beta *
            (log-ratio - kl))``, undesirable ``1 - sigmoid(beta * (kl - log-ratio))``) or
            ``"apo_zero_unpaired"`` (``1 - sigmoid(beta * log-ratio)`` and ``sigmoid(beta *
            log-ratio)``). KTOConfig's names and defaults, as every keyword here.
        beta: 0.1. desirable_weight, undesirable_weight: the two groups' loss weights (1.0).

    Returns:
        ``(loss, metrics)``: the 0-dim loss, the mean over the B completions (float32; float64
        for float64 input; B = 0 gives 0), and 0-dim float32 metrics with TRL's logged keys:
        ``kl``, ``rewards/chosen`` / ``rewards/rejected`` (beta * log-ratio, means over the
        desirable / undesirable completions), ``rewards/margins`` (their difference),
        ``logps/chosen``, ``logps/rejected``. A group that is empty gives 0 for its means and
        the margin (TRL logs nothing then).
    """
    specs = {"policy_logps": (policy_logps, "float"), "ref_logps": (ref_logps, "float"), "labels": (labels, "mask")}
    _checks.tensors(_KTO, "policy_logps", specs)
    if policy_logps.ndim != 1:
        raise ValueError(f"{_KTO}: policy_logps must be [B], got shape {tuple(policy_logps.shape)}")
    _checks.tensors(_KTO, "policy_logps", specs, shape=policy_logps.shape)
    _checks.choice(_KTO, "loss_type", loss_type, KTO_LOSS_TYPES)
    kl_specs = {"policy_logps": (policy_logps, "float"), "kl_logps": (kl_logps, "float"),
                "ref_kl_logps": (ref_kl_logps, "float")}
    _checks.tensors(_KTO, "policy_logps", kl_specs)
    if loss_type == "kto":
        if kl_logps is None or ref_kl_logps is None:
            raise ValueError(f"{_KTO}: loss_type 'kto' needs kl_logps and ref_kl_logps (the KL completions' log-probs "
                             "of the policy and the reference), got None")
        if kl_logps.ndim != 1 or ref_kl_logps.shape != kl_logps.shape:
            raise ValueError(f"{_KTO}: kl_logps and ref_kl_logps must be [M] of one shape, got "
                             f"{tuple(kl_logps.shape)} and {tuple(ref_kl_logps.shape)}")
    elif kl_logps is not None or ref_kl_logps is not None:
        raise ValueError(f"{_KTO}: loss_type 'apo_zero_unpaired' has no KL term; kl_logps and ref_kl_logps must be "
                         "None")
    for name, t in (("ref_logps", ref_logps), ("kl_logps", kl_logps), ("ref_kl_logps", ref_kl_logps)):
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{_KTO}: {name} requires grad, but it is a constant of the loss; compute it under "
                             "torch.no_grad() or pass .detach()")
    beta = _checks.number(_KTO, "beta", beta, low=0, low_open=True)
    # a negative weight flips the sign of that class's loss
    dw = _checks.number(_KTO, "desirable_weight", desirable_weight, low=0)
    uw = _checks.number(_KTO, "undesirable_weight", undesirable_weight, low=0)
    dtype = torch.float64 if policy_logps.dtype == torch.float64 else torch.float32

    def aux(t):
        return policy_logps.new_zeros((0,), dtype=dtype) if t is None else t.detach().to(dtype).contiguous()

    eager = _eager.may_bypass(policy_logps)
    op = _EagerKTOLoss.apply if eager else _kto_op
    loss, _, metrics = op(policy_logps, aux(ref_logps), labels.detach().to(dtype).contiguous(),
                          policy_logps.new_ones(policy_logps.shape, dtype=dtype), aux(kl_logps), aux(ref_kl_logps),
                          KTO_LOSS_TYPES.index(loss_type), [beta, dw, uw])
    return loss, dict(zip(KTO_METRIC_KEYS, metrics.detach().to(torch.float32).unbind(0)))


BCO_METRIC_KEYS = reference.BCO_METRIC_KEYS


def bco_loss(policy_logps: Tensor, ref_logps: Tensor, labels: Tensor, delta: Tensor, *, beta: float = 0.1,
             udm_weights: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """BCO's loss (binary classifier optimization, arXiv 2404.04656) over unpaired per-sequence
    log-probs, as TRL's ``BCOTrainer.bco_loss`` computed it (TRL 1.16 no longer ships the trainer;
    its DPO loss type ``bco_pair`` is ``preference_loss``'s).

    With rewards r = beta * (policy_logps - ref_logps): desirable completions lose
    ``softplus(-(r - delta))``, undesirable ones ``udm_weight * softplus(r - delta)``; the loss is
    the mean over the B completions. Shares kto_loss's kernels (one pass: loss, gradient, metrics).

    Args:
        policy_logps: ``[B]`` float16/bfloat16/float32/float64, summed over the completions'
            tokens by the caller. Differentiable.
        ref_logps: ``[B]`` float constants, the reference model's.
        labels: ``[B]`` bool (or 0/1): True for a desirable completion.
        delta: 0-dim (or 1-element) float tensor, a constant: the running mean of the rewards
            (TRL's ``RunningMoments`` mean). The training loop owns it: TRL updates it with this
            batch's detached rewards ``beta * (policy_logps - ref_logps)`` (both groups) before
            the loss, and not in evaluation. A tensor, so that no host sync is needed.
        beta: 0.1 (BCOConfig's default).
        udm_weights: ``[B]`` float constants or None: the undesirable completions' density-ratio
            weights of BCO's underlying-distribution matching (TRL's ``_get_udm_weight`` of the
            prompt embeddings, clamped to its min/max density ratio); entries of desirable
            completions are ignored (their weight is 1).

    Returns:
        ``(loss, metrics)``: the 0-dim loss (float32; float64 for float64 input; B = 0 gives 0)
        and 0-dim float32 metrics as TRL logged them: ``delta``, ``rewards/chosen``,
        ``rewards/rejected``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected`` (means
        over each group; 0 for an empty group).
    """
    op_name = "bco_loss"
    specs = {"policy_logps": (policy_logps, "float"), "ref_logps": (ref_logps, "float"), "labels": (labels, "mask"),
             "udm_weights": (udm_weights, "float")}
    _checks.tensors(op_name, "policy_logps", specs)
    if policy_logps.ndim != 1:
        raise ValueError(f"{op_name}: policy_logps must be [B], got shape {tuple(policy_logps.shape)}")
    _checks.tensors(op_name, "policy_logps", specs, shape=policy_logps.shape)
    _checks.tensors(op_name, "policy_logps", {"policy_logps": (policy_logps, "float"), "delta": (delta, "float")})
    if delta is None or delta.numel() != 1:
        raise ValueError(f"{op_name}: delta must be a 1-element tensor (the running mean of the rewards), got "
                         f"{None if delta is None else tuple(delta.shape)}")
    for name, t in (("ref_logps", ref_logps), ("delta", delta), ("udm_weights", udm_weights)):
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{op_name}: {name} requires grad, but it is a constant of the loss; compute it under "
                             "torch.no_grad() or pass .detach()")
    beta = _checks.number(op_name, "beta", beta, low=0, low_open=True)
    dtype = torch.float64 if policy_logps.dtype == torch.float64 else torch.float32
    weights = (policy_logps.new_ones(policy_logps.shape, dtype=dtype) if udm_weights is None
               else udm_weights.detach().to(dtype).contiguous())
    eager = _eager.may_bypass(policy_logps)
    op = _EagerKTOLoss.apply if eager else _kto_op
    loss, _, metrics = op(policy_logps, ref_logps.detach().to(dtype).contiguous(),
                          labels.detach().to(dtype).contiguous(), weights, delta.detach().to(dtype).reshape(1), policy_logps.new_zeros((1,), dtype=dtype),
                          _BCO_CODE, [beta, 1.0, 1.0])
    return loss, dict(zip(BCO_METRIC_KEYS, metrics.detach().to(torch.float32).unbind(0)))
