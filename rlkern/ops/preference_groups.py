"""Preference optimization over GROUPS (lists) of responses per prompt: the losses and the sample
weights of the research-list papers whose math runs over all responses of a prompt rather than
over one (chosen, rejected) pair (issue 18; the pair losses are rlkern/ops/preference.py's).

``group_preference_loss`` (a ``loss_type`` per paper: TPO, P3O, TRPA, BRAIn),
``group_weights`` (a ``method`` per paper: SPO's win rates, RSO's acceptance probabilities,
BRAIn's posterior weights) and ``srpo_loss`` (SRPO: a preference pair with the model's revisions
of either response, six log-probs per pair). Samples are grouped by ``group_ids`` as the outcome
ops group them (rlkern/ops/advantages/groups.py). Backends (same arguments, same outputs): the C++
kernels (csrc/preference_groups.cpp, CPU), the Triton kernels (kernels/preference_groups.py, GPU)
and the reference (rlkern/reference/preference_groups.py, differentiated by torch.func.vjp). The
group loss kernels compute per-sample statistics (each sample's share of the loss, its derivative
gathered over the pairs it is in, its pair counts) in one pass; ``_finish`` reduces them, the
same for both.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from rlkern import _backend
from rlkern.ops import _checks, _eager
from rlkern.ops.advantages.groups import dense
from rlkern.reference import preference_groups as reference

__all__ = ["group_preference_loss", "group_weights", "srpo_loss"]

_OP = "group_preference_loss"
LOSS_TYPES = reference.LOSS_TYPES
WEIGHT_METHODS = reference.WEIGHT_METHODS
METRIC_KEYS = reference.METRIC_KEYS
_GROUP_MEAN = (LOSS_TYPES.index("tpo"), LOSS_TYPES.index("brain"))  # normalized by the number of groups
_P3O, _TRPA = LOSS_TYPES.index("p3o"), LOSS_TYPES.index("trpa")


def _finish(stats: Tensor, logps: Tensor, ref: Tensor, inverse: Tensor, loss_type: int, hyper: list[float]):
    """(8, N) per-sample statistics -> (loss, grad, metrics): the kernels' shared reduction (no host
    sync: every count stays a tensor)."""
    beta, _eps, kl_coef = hyper
    n = logps.numel()
    if loss_type in _GROUP_MEAN:
        norm = (inverse.max() + 1).to(stats.dtype) if n else stats.new_ones(())
    elif loss_type == _P3O:
        norm = stats[2].sum()
    else:
        norm = stats[3].sum()
    norm = norm.clamp(min=1)
    per_sample = 1.0 / max(n, 1)
    loss = stats[0].sum() / norm
    grad = stats[1] / norm
    if loss_type == _TRPA:
        loss = loss + kl_coef * per_sample * stats[6].sum()
        grad = grad + (kl_coef * per_sample) * stats[7]
    rewards = beta * (logps.to(stats.dtype) - ref).sum() * per_sample
    accuracy = stats[4].sum() / stats[3].sum().clamp(min=1)
    clip = stats[5].sum() / stats[2].sum().clamp(min=1)
    return loss, grad, torch.stack([rewards, accuracy, clip])


def _reference_vjp(objective, logps: Tensor, keys) -> tuple[Tensor, Tensor, Tensor]:
    """A torch backend: the reference ``objective`` (-> loss, metrics dict) and its vjp in ``logps``
    (works inside a custom op's kernel, where the dispatcher has the Autograd keys excluded)."""
    dtype = torch.float64 if logps.dtype == torch.float64 else torch.float32
    loss, vjp, metrics = torch.func.vjp(objective, logps.to(dtype), has_aux=True)
    (grad,) = vjp(torch.ones((), dtype=dtype))
    stacked = torch.stack([metrics[k] for k in keys]).to(dtype)
    return loss.detach().clone(), grad.detach().clone(), stacked


def _setup_context(ctx, inputs, output):
    ctx.dtype = inputs[0].dtype
    ctx.save_for_backward(output[1])


def _backward_of(n_inputs: int):
    """The backward of a (loss, grad, metrics) op with ``n_inputs`` inputs, the first differentiable:
    the saved gradient scaled by the loss's."""

    def backward(ctx, grad_loss, _grad, _grad_metrics):
        (grad,) = ctx.saved_tensors
        return ((grad_loss.to(grad.dtype) * grad).to(ctx.dtype),) + (None,) * (n_inputs - 1)

    return backward


def _cpp_loss(logps, ref, old, scores, inverse, loss_type, hyper):
    stats = torch.ops.rlkern.cpp_group_preference_stats(logps, ref, old, scores, inverse, loss_type, hyper[:2])
    return _finish(stats, logps, ref, inverse, loss_type, hyper)


def _triton_loss(logps, ref, old, scores, inverse, loss_type, hyper):
    kernels = importlib.import_module("rlkern.kernels.preference_groups")
    stats = kernels.group_preference_stats(logps, ref, old, scores, inverse, loss_type, hyper[:2])
    return _finish(stats, logps, ref, inverse, loss_type, hyper)


def _torch_loss(logps, ref, old, scores, inverse, loss_type, hyper):
    beta, eps, kl_coef = hyper

    def objective(x):
        return reference.group_preference_loss(x, inverse, scores, ref, old, loss_type=LOSS_TYPES[loss_type],
                                               beta=beta, clip_eps=eps, kl_coef=kl_coef)

    return _reference_vjp(objective, logps, METRIC_KEYS)


_KERNELS = _backend.Kernels(_OP, cpp=_cpp_loss, triton=_triton_loss, torch=_torch_loss, fp64=("cpp", "triton"))


def _loss_impl(logps: Tensor, ref: Tensor, old: Tensor, scores: Tensor, inverse: Tensor, loss_type: int,
               hyper: list[float]) -> tuple[Tensor, Tensor, Tensor]:
    return _KERNELS.pick(logps)(logps, ref, old, scores, inverse, loss_type, hyper)


_loss_op = torch.library.custom_op("rlkern::group_preference_loss", mutates_args=())(_loss_impl)


@_loss_op.register_fake
def _loss_fake(logps, ref, old, scores, inverse, loss_type, hyper):
    dtype = torch.float64 if logps.dtype == torch.float64 else torch.float32
    return (logps.new_empty((), dtype=dtype), logps.new_empty(logps.shape, dtype=dtype),
            logps.new_empty((len(METRIC_KEYS),), dtype=dtype))


_loss_op.register_autograd(_backward_of(7), setup_context=_setup_context)
_EagerGroupLoss = _eager.function("_EagerGroupLoss", _loss_impl, _setup_context, _backward_of(7),
                                  "rlkern::group_preference_loss without the dispatcher.")


def _constants(op: str, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{op}: {name} requires grad, but it is a constant; compute it under torch.no_grad() or "
                             "pass .detach()")


def _group_numbers(op: str, group_ids, n: int, device) -> Tensor:
    if isinstance(group_ids, Tensor) and group_ids.device != device and group_ids.device.type != "cpu":
        raise ValueError(f"{op}: group_ids is on {group_ids.device} but the log-probs are on {device}")
    return dense(op, group_ids, n=n, device=device)


def group_preference_loss(logps: Tensor, group_ids, scores: Tensor, ref_logps: Tensor | None = None,
                          old_logps: Tensor | None = None, *, loss_type: str = "tpo", beta: float = 0.1,
                          clip_eps: float = 0.2, kl_coef: float = 0.01) -> tuple[Tensor, dict[str, Tensor]]:
    """Preference losses over the group (list) of responses of each prompt.

    With x = ``logps``, o = ``old_logps``, s = ``scores`` and r = beta * (x - ``ref_logps``), the
    loss of each ``loss_type`` (pairs are of distinct members i != j of one group):

    - ``"tpo"``: TPO, "TPO: Aligning Large Language Models with Multi-branch & Multi-step
      Preference Trees" (Liao et al., ICLR 2025), its preference-list ranking loss (LambdaRank
      weighted, as LiPO-lambda):
      ``L = mean over groups of sum_{s_i > s_j} lambda_ij * -log sigmoid(r_i - r_j)``,
      ``lambda_ij = |G_i - G_j| * |1 / D(tau_i) - 1 / D(tau_j)|``, gain ``G_i = 2^s_i - 1``,
      discount ``D(tau) = log2(1 + tau)``, ``tau_i`` the 1-based rank of r_i in its group in
      descending order (a constant, ties by batch order). Choices: D in base 2 (NDCG's; the paper
      writes log, a base only scales lambda); the ranks by the policy's rewards r (LambdaRank's);
      the sum over a list's pairs and the mean over lists, as the paper's expectation over
      prompts. TPO's Adaptive Step Reward (each step's log-ratio weighted by the similarity of
      its hidden states to the preferred response's, then averaged) is made by the caller: pass
      those step-weighted sequence log-probs as ``logps`` / ``ref_logps``. The scores are the
      tree's response values (the paper's rewards in [0, 1] of each leaf).
    - ``"p3o"``: P3O, "Pairwise Proximal Policy Optimization: Harnessing Relative Feedback for
      LLM Alignment" (Wu et al., 2023), the jointly clipped trajectory-wise objective over the
      ordered pairs (i, j) of each prompt's responses:
      ``A_ij = s_i - s_j``, ``rho_ij = exp((x_i - o_i) - (x_j - o_j))``,
      ``L = mean over ordered pairs of max(-A_ij rho_ij, -A_ij clip(rho_ij, 1 - clip_eps, 1 +
      clip_eps))``. Both orders of a pair are counted (the objective is symmetric in the pair);
      groups of more than two responses use all their pairs. The scores are the caller's
      rewards with P3O's KL penalty already subtracted (``s - kl_coef * KL``, sequence level);
      ``beta`` and ``ref_logps`` are not read (besides the metrics). ``old_logps`` None: the
      on-policy ratio 1.
    - ``"trpa"``: TRPA, "Trust Region Preference Approximation: A simple and stable
      reinforcement learning algorithm for LLM reasoning" (2025): the preference
      pairs are all pairs of a group whose rule-based rewards (``scores``: the preference
      levels the caller's rules give) differ, each a DPO-style term, plus the KL trust region:
      ``L = mean over pairs s_i > s_j of -log sigmoid(r_i - r_j) + kl_coef * mean over samples
      of k3``, ``k3 = e^(ref - x) - (ref - x) - 1`` (KL(pi || pi_ref) estimated on the sampled
      sequences, ``rlkern.kl_penalty``'s ``k3_unclamped``; ``ref_logps`` is the trust region's
      centre, the previous policy or the reference). kl_coef (0.01) is our default, not the
      paper's; the pair construction and the KL term follow the paper's description, its exact
      equations could not be checked here.
    - ``"brain"``: BRAIn, "BRAIn: Bayesian Reward-conditioned Amortized Inference for natural
      language generation from feedback" (Pandey et al., ICML 2024): the posterior
      p(y | x, good) ∝ pi_ref(y | x) exp(s(x, y) / beta) over the group's samples from the
      proposal q = ``old_logps``, its self-normalized importance weights
      ``alpha_i = softmax_group(ref_i - o_i + s_i / beta)``, and the distribution-matching loss
      with BRAIn's self-normalized baseline:
      ``L = mean over groups of [-sum_i alpha_i x_i + log mean_i e^(x_i - o_i)]``, whose
      gradient is ``sum_i (b_i - alpha_i) grad x_i`` with ``b_i = softmax_group(x_i - o_i)``
      (the baseline's weights; 1 / n on-policy). Choices: the goodness likelihood is
      exp(s / beta), the KL-regularized form that makes BRAIn's posterior DPO's / RSO's optimal
      policy (the paper's Bradley-Terry reward is ``s`` with beta 1); ``old_logps`` None: the
      policy sampled (``logps.detach()``).

    The training loop around the op: it samples (or reads, offline) several responses per prompt,
    scores them (reward model, rules, a preference tree), sums each response's token log-probs
    under the policy (with grad), the reference and the sampling policy (no grad), calls this op
    with the prompts' ids as ``group_ids`` and steps on the loss (P3O / BRAIn on-policy: resample
    each step; TRPA: refresh ``ref_logps`` from the new policy each iteration).

    Args:
        logps: ``[N]`` float16/bfloat16/float32/float64, the policy's summed log-probs of the N
            responses. Differentiable.
        group_ids: ``[N]`` the prompt of each response (int tensor, numpy array, list of str or
            int; as the outcome ops take them).
        scores: ``[N]`` float constants: each response's score / reward / preference level.
        ref_logps: ``[N]`` float constants, the reference's summed log-probs (None: 0).
        old_logps: ``[N]`` float constants, the sampling policy's (None: ``logps`` detached).
        loss_type: "tpo", "p3o", "trpa" or "brain" (``LOSS_TYPES``).
        beta: the KL coefficient of r = beta * log-ratio (0.1, DPO's; tpo, trpa, brain).
        clip_eps: P3O's clip range (0.2, PPO's).
        kl_coef: TRPA's KL trust-region weight (0.01).

    Returns:
        ``(loss, metrics)``: the 0-dim loss (float32; float64 for float64 input; no group or no
        pair gives 0 and a zero gradient) and 0-dim float32 metrics: ``rewards/mean`` (mean r),
        ``pair_accuracy`` (the fraction of pairs s_i > s_j with r_i > r_j), ``clip_fraction``
        (p3o: the fraction of ordered pairs on the clipped side; else 0).
    """
    if not isinstance(scores, Tensor):
        raise TypeError(f"{_OP}: scores must be a torch.Tensor, got {type(scores).__name__}")
    specs = {"logps": (logps, "float"), "scores": (scores, "float"), "ref_logps": (ref_logps, "float"),
             "old_logps": (old_logps, "float")}
    _checks.tensors(_OP, "logps", specs)
    if logps.ndim != 1:
        raise ValueError(f"{_OP}: logps must be [N], got shape {tuple(logps.shape)}")
    _checks.tensors(_OP, "logps", specs, shape=logps.shape)
    _checks.choice(_OP, "loss_type", loss_type, LOSS_TYPES)
    _constants(_OP, scores=scores, ref_logps=ref_logps, old_logps=old_logps)
    beta = _checks.number(_OP, "beta", beta, low=0, low_open=True)
    eps = _checks.number(_OP, "clip_eps", clip_eps, low=0, high=1, low_open=True)
    kl_coef = _checks.number(_OP, "kl_coef", kl_coef, low=0)
    _checks.no_nan(_OP, "scores", scores)  # the pairs and ranks come from comparing the scores
    inverse = _group_numbers(_OP, group_ids, logps.shape[0], logps.device)
    dtype = torch.float64 if logps.dtype == torch.float64 else torch.float32

    def aux(t, default):
        return default if t is None else t.detach().to(dtype).contiguous()

    ref = aux(ref_logps, logps.new_zeros(logps.shape, dtype=dtype))
    old = aux(old_logps, None)
    if old is None:
        old = logps.detach().to(dtype).clone()
    op = _EagerGroupLoss.apply if _eager.may_bypass(logps) else _loss_op
    loss, _, metrics = op(logps, ref, old, aux(scores, None), inverse, LOSS_TYPES.index(loss_type),
                          [beta, eps, kl_coef])
    return loss, dict(zip(METRIC_KEYS, metrics.detach().to(torch.float32).unbind(0)))


# ------------------------------------------------------------------------------------------------
# Per-sample weights / rewards within a group

_WOP = "group_weights"
_WIN_RATE_MATRIX = len(WEIGHT_METHODS)  # the kernels' method code of win_rate with a preference matrix


def _torch_weights(scores, ref, old, inverse, method, beta):
    m = "win_rate" if method == _WIN_RATE_MATRIX else WEIGHT_METHODS[method]
    return reference.group_weights(scores, inverse, ref, old, method=m, beta=beta)


_WEIGHTS = _backend.Kernels(_WOP, cpp="cpp_group_weights", triton="preference_groups.group_weights",
                            torch=_torch_weights, fp64=("cpp", "triton"))


@torch.library.custom_op("rlkern::group_weights", mutates_args=())
def _weights_op(scores: Tensor, ref: Tensor, old: Tensor, inverse: Tensor, method: int, beta: float) -> Tensor:
    return _WEIGHTS.pick(scores)(scores, ref, old, inverse, method, beta)


@_weights_op.register_fake
def _(scores, ref, old, inverse, method, beta):
    return scores.new_empty(inverse.shape)


def group_weights(scores: Tensor, group_ids, ref_logps: Tensor | None = None, old_logps: Tensor | None = None, *,
                  method: str = "win_rate", beta: float = 0.1) -> Tensor:
    """Per-response numbers in [0, 1] computed within each prompt's group that the training loop
    uses as a reward, a sample weight or an acceptance probability. One op: each is a function of
    the group's scores only (no gradient), with the same grouping and kernels.

    - ``"win_rate"``: SPO (Self-Play Preference Optimization, not the Segment Policy Optimization
      of ``spo_cutpoints``), "A Minimaximalist Approach to Reinforcement Learning from Human
      Feedback" (Swamy et al., ICML 2024): the self-play reward of each response is its win rate
      against the other responses of its group, ``w_i = mean_{j != i in group} P(i beats j)``. ``scores``
      ``[N]``: scalar scores judged pairwise, P = 1 if s_i > s_j, 1/2 if equal, 0 else (the paper's
      preference from a score, ties split); ``scores`` ``[N, N]``: the caller's preference matrix P
      (entry [i, j] = P(i beats j), e.g. a judge's pairwise verdicts or probabilities; only the
      pairs within a group are read, so intransitive or stochastic preferences pass through as
      given). A group of one (no opponent) gets 1/2. The loop: sample n responses per prompt,
      judge them, use w as each response's reward in its policy-gradient / PPO step.
    - ``"rso"``: RSO's statistical rejection sampler, "Statistical Rejection Sampling Improves
      Preference Optimization" (Liu et al., ICLR 2024): the acceptance probability of each
      candidate sampled from the SFT policy for the optimal policy pi_ref exp(r / beta),
      ``w_i = exp((s_i - max_group s) / beta)`` (the group's best is accepted surely). The loop
      draws: ``accept = torch.rand_like(w) < w``, removes accepted ones and repeats on the rest as
      the paper's Algorithm 1, then pairs the accepted responses for DPO / SLiC.
    - ``"brain"``: BRAIn's self-normalized importance weights of the posterior (see
      ``group_preference_loss``, loss_type "brain"): ``w_i = softmax_group(ref_i - o_i + s_i /
      beta)``, summing to 1 per group (for logging, or an effective sample size).

    Args:
        scores: ``[N]`` float (or ``[N, N]`` with ``method="win_rate"``): the responses' scores.
        group_ids: ``[N]`` the prompt of each response (as ``group_preference_loss``).
        ref_logps, old_logps: ``[N]`` float, read by brain only (None: 0).
        method: "win_rate", "rso" or "brain".
        beta: rso's and brain's temperature (0.1, DPO's beta, as ``group_preference_loss``).

    Returns:
        ``[N]`` float32 (float64 for float64 scores).
    """
    if not isinstance(scores, Tensor):
        raise TypeError(f"{_WOP}: scores must be a torch.Tensor, got {type(scores).__name__}")
    _checks.tensors(_WOP, "scores", {"scores": (scores, "float"), "ref_logps": (ref_logps, "float"),
                                     "old_logps": (old_logps, "float")})
    _checks.choice(_WOP, "method", method, WEIGHT_METHODS)
    matrix = scores.ndim == 2
    if scores.ndim not in (1, 2) or (matrix and (method != "win_rate" or scores.shape[0] != scores.shape[1])):
        raise ValueError(f"{_WOP}: scores must be [N] (or [N, N] with method 'win_rate'), got shape "
                         f"{tuple(scores.shape)}")
    n = scores.shape[0]
    _checks.tensors(_WOP, "scores", {"scores": (scores, "float"), "ref_logps": (ref_logps, "float"),
                                     "old_logps": (old_logps, "float")}, shape={"ref_logps": (n,), "old_logps": (n,)})
    beta = _checks.number(_WOP, "beta", beta, low=0, low_open=True)
    if not matrix:
        _checks.no_nan(_WOP, "scores", scores)  # win rates come from comparing the scores
    inverse = _group_numbers(_WOP, group_ids, n, scores.device)
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    zeros = None
    if ref_logps is None or old_logps is None:
        zeros = scores.new_zeros((n,), dtype=dtype)
    ref = zeros if ref_logps is None else ref_logps.detach().to(dtype).contiguous()
    old = zeros if old_logps is None else old_logps.detach().to(dtype).contiguous()
    code = _WIN_RATE_MATRIX if matrix else WEIGHT_METHODS.index(method)
    return _weights_op(scores.detach().to(dtype).contiguous(), ref, old, inverse, code, beta)


# ------------------------------------------------------------------------------------------------
# SRPO: one preference pair with the self-improvement policy's revisions

_SOP = "srpo_loss"
SRPO_COLUMNS = reference.SRPO_COLUMNS
SRPO_METRIC_KEYS = reference.SRPO_METRIC_KEYS


def _torch_srpo(logps, ref, beta, alpha):
    return _reference_vjp(lambda x: reference.srpo_loss(x, ref, beta=beta, alpha=alpha), logps, SRPO_METRIC_KEYS)


_SRPO = _backend.Kernels(_SOP, cpp="cpp_srpo_loss", triton="preference_groups.srpo_loss", torch=_torch_srpo,
                         fp64=("cpp", "triton"))


def _srpo_impl(logps: Tensor, ref: Tensor, beta: float, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    return _SRPO.pick(logps)(logps, ref, beta, alpha)


_srpo_op = torch.library.custom_op("rlkern::srpo_loss", mutates_args=())(_srpo_impl)


@_srpo_op.register_fake
def _srpo_fake(logps, ref, beta, alpha):
    dtype = torch.float64 if logps.dtype == torch.float64 else torch.float32
    return (logps.new_empty((), dtype=dtype), logps.new_empty(logps.shape, dtype=dtype),
            logps.new_empty((len(SRPO_METRIC_KEYS),), dtype=dtype))


_srpo_op.register_autograd(_backward_of(4), setup_context=_setup_context)
_EagerSRPOLoss = _eager.function("_EagerSRPOLoss", _srpo_impl, _setup_context, _backward_of(4),
                                 "rlkern::srpo_loss without the dispatcher.")


def srpo_loss(logps: Tensor, ref_logps: Tensor, *, beta: float = 0.1,
              alpha: float = 0.8) -> tuple[Tensor, dict[str, Tensor]]:
    """SRPO's offline loss, "Self-Improving Robust Preference Optimization" (Choi et al., ICLR
    2025): the self-improvement policy pi(y' | x, y) (revise y into y') and the generative policy
    pi(y | x) are one model, trained jointly on (x, y_w, y_l) preference pairs by a
    non-adversarial least-squares loss.

    Per pair, with h_k = beta * (logps[:, k] - ref_logps[:, k]) over the columns
    ``SRPO_COLUMNS`` = (chosen log pi(y_w | x), rejected log pi(y_l | x), chosen_given_rejected
    log pi(y_w | x, y_l) (the improvement of the rejected into the chosen), rejected_given_rejected
    log pi(y_l | x, y_l), chosen_given_chosen log pi(y_w | x, y_w), rejected_given_chosen
    log pi(y_l | x, y_w)):

    - self-improvement: ``(1/2 - (h_cgr - h_rgr))^2 + (1/2 - (h_cgc - h_rgc))^2`` (the revision
      policy's log-ratio margin of the preferred revision, from either draft, regressed on
      p(y_w > y_l) - 1/2 = 1/2);
    - generative (robust): ``((h_cgr + h_c) - (h_rgc + h_r) - 1)^2`` (target 2 p - 1 = 1);
    - ``L = mean over pairs of (1 - alpha) * generative + alpha * self-improvement``.

    Choices: the preference labels are deterministic (p(y_w > y_l) = 1, as in the paper's offline
    datasets); alpha = 0.8 is the weight of the SRPOTrainer proposed to TRL (a pull request that
    was closed; the paper sweeps alpha); beta 0.1 (DPO's). The training loop builds
    the six sequences of each pair (the revision prompts embed the draft y in the context),
    sums their token log-probs under the policy (grad) and the reference (no grad), and steps on
    the loss; at inference the model drafts, then revises its draft with the revision prompt.

    Args:
        logps: ``[B, 6]`` float16/bfloat16/float32/float64, the policy's summed log-probs, one
            column per ``SRPO_COLUMNS`` entry. Differentiable.
        ref_logps: ``[B, 6]`` float constants, the reference's.
        beta: the KL coefficient (0.1). alpha: the self-improvement weight in [0, 1] (0.8).

    Returns:
        ``(loss, metrics)``: the 0-dim loss (float32; float64 for float64 input; B = 0 gives 0)
        and 0-dim float32 metrics ``loss/self_improvement``, ``loss/generative`` (their means)
        and ``rewards/margins`` (mean h_c - h_r).
    """
    _checks.tensors(_SOP, "logps", {"logps": (logps, "float"), "ref_logps": (ref_logps, "float")})
    if not isinstance(ref_logps, Tensor):
        raise TypeError(f"{_SOP}: ref_logps must be a torch.Tensor, got {type(ref_logps).__name__}")
    if logps.ndim != 2 or logps.shape[1] != len(SRPO_COLUMNS):
        raise ValueError(f"{_SOP}: logps must be [B, 6] (columns {SRPO_COLUMNS}), got shape {tuple(logps.shape)}")
    _checks.tensors(_SOP, "logps", {"logps": (logps, "float"), "ref_logps": (ref_logps, "float")},
                    shape=logps.shape)
    _constants(_SOP, ref_logps=ref_logps)
    beta = _checks.number(_SOP, "beta", beta, low=0, low_open=True)
    alpha = _checks.number(_SOP, "alpha", alpha, low=0, high=1)
    dtype = torch.float64 if logps.dtype == torch.float64 else torch.float32
    op = _EagerSRPOLoss.apply if _eager.may_bypass(logps) else _srpo_op
    loss, _, metrics = op(logps, ref_logps.detach().to(dtype).contiguous(), beta, alpha)
    return loss, dict(zip(SRPO_METRIC_KEYS, metrics.detach().to(torch.float32).unbind(0)))
