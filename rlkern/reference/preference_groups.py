"""Reference of ``rlkern.group_preference_loss`` and ``rlkern.group_weights``: preference losses and
sample weights whose math runs over the group (list) of responses of one prompt.

Plain PyTorch, float64-capable, differentiable by autograd in ``logps``: the oracle of the C++
kernels (csrc/preference_groups.cpp) and the Triton kernels (kernels/preference_groups.py). A
group is written out as ``[n, n]`` matrices over its members, one group at a time: short and
obviously right, not fast. The formulas (and the choices the papers leave open) are documented
on the public ops in rlkern/ops/preference_groups.py; this module restates each in one line.

``inverse`` is the dense group number of each sample (``rlkern.group_index``); ``ref_logps``
None is 0, ``old_logps`` None is ``logps.detach()`` (on-policy).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOSS_TYPES = ("tpo", "p3o", "trpa", "brain")
WEIGHT_METHODS = ("win_rate", "rso", "brain")
METRIC_KEYS = ("rewards/mean", "pair_accuracy", "clip_fraction")


def _softplus(x: Tensor) -> Tensor:
    """log(1 + e^x) exactly (F.softplus returns x itself above its threshold of 20)."""
    return torch.logaddexp(torch.zeros_like(x), x)


def _members(inverse: Tensor) -> list[Tensor]:
    return [torch.nonzero(inverse == g).flatten() for g in torch.unique(inverse).tolist()]


def descending_ranks(r: Tensor) -> Tensor:
    """1-based rank of each value in descending order; ties by position (a stable sort)."""
    order = torch.sort(-r, stable=True).indices
    rank = torch.empty_like(r)
    rank[order] = torch.arange(1, r.numel() + 1, dtype=r.dtype, device=r.device)
    return rank


def group_preference_loss(logps: Tensor, inverse: Tensor, scores: Tensor, ref_logps: Tensor | None = None,
                          old_logps: Tensor | None = None, *, loss_type: str, beta: float, clip_eps: float,
                          kl_coef: float) -> tuple[Tensor, dict[str, Tensor]]:
    """r = beta * (logps - ref_logps). Per group (pairs over distinct members i != j):

    - tpo: sum over s_i > s_j of lambda_ij * softplus(-(r_i - r_j)), lambda_ij = |2^s_i - 2^s_j| *
      |1 / log2(1 + tau_i) - 1 / log2(1 + tau_j)|, tau the descending rank of r (detached);
      the loss is the mean over groups.
    - p3o: over ordered pairs, A = s_i - s_j, rho = exp((x_i - o_i) - (x_j - o_j)):
      max(-A rho, -A clip(rho, 1 - clip_eps, 1 + clip_eps)); the mean over all ordered pairs.
    - trpa: over s_i > s_j, softplus(-(r_i - r_j)), the mean over all such pairs, plus
      kl_coef * mean over samples of k3 = e^(ref - x) - (ref - x) - 1.
    - brain: alpha = softmax(ref - old + s / beta), -sum(alpha * x) + log(mean(e^(x - old)));
      the mean over groups.
    """
    x = logps
    ref = torch.zeros_like(x) if ref_logps is None else ref_logps.to(x.dtype)
    old = x.detach() if old_logps is None else old_logps.to(x.dtype)
    s_all = scores.to(x.dtype)
    r_all = beta * (x - ref)
    groups = _members(inverse)
    total = x.new_zeros(())
    wins = acc = clipped = ordered = 0
    for idx in groups:
        n = idx.numel()
        s, r = s_all[idx], r_all[idx]
        off = ~torch.eye(n, dtype=torch.bool, device=x.device)
        better = (s[:, None] > s[None, :]) & off
        d = r[:, None] - r[None, :]
        wins += int(better.sum())
        acc += int((better & (d > 0)).sum())
        ordered += n * (n - 1)
        if loss_type == "tpo":
            disc = 1.0 / torch.log2(1.0 + descending_ranks(r.detach()))
            gain = torch.exp2(s)
            lam = (gain[:, None] - gain[None, :]).abs() * (disc[:, None] - disc[None, :]).abs()
            # the pairs first: 2^s overflows for huge scores, and inf - inf on a pair that is not
            # summed (the diagonal) would make the gradient NaN through the masked product
            total = total + (lam[better] * _softplus(-d)[better]).sum()
        elif loss_type == "trpa":
            total = total + _softplus(-d)[better].sum()
        elif loss_type == "p3o":
            xo = (x - old)[idx]
            rho = torch.exp(xo[:, None] - xo[None, :])
            adv = s[:, None] - s[None, :]
            unclipped, clipped_term = -adv * rho, -adv * rho.clamp(1.0 - clip_eps, 1.0 + clip_eps)
            total = total + torch.maximum(unclipped, clipped_term)[off].sum()
            clipped += int((clipped_term > unclipped)[off].sum())
        elif loss_type == "brain":
            alpha = torch.softmax((ref - old + s_all / beta)[idx], 0)
            total = total + (-(alpha * x[idx]).sum() + torch.logsumexp((x - old)[idx], 0) - math.log(n))
        else:
            raise ValueError(f"unknown loss_type {loss_type!r}")
    if loss_type in ("tpo", "brain"):
        loss = total / max(len(groups), 1)
    elif loss_type == "p3o":
        loss = total / max(ordered, 1)
    else:
        k3 = torch.exp(ref - x) - (ref - x) - 1.0
        loss = total / max(wins, 1) + kl_coef * (k3.sum() / max(x.numel(), 1))
    metrics = {
        "rewards/mean": r_all.detach().sum() / max(x.numel(), 1),
        "pair_accuracy": x.new_tensor(acc / max(wins, 1)),
        "clip_fraction": x.new_tensor(clipped / max(ordered, 1)),
    }
    return loss, metrics


def group_weights(scores: Tensor, inverse: Tensor, ref_logps: Tensor | None = None, old_logps: Tensor | None = None,
                  *, method: str, beta: float) -> Tensor:
    """Per sample, within its group:

    - win_rate (SPO): the mean over the other members j of P(i beats j): ``scores`` [N] gives 1 / 0.5 / 0
      for s_i > / == / < s_j; ``scores`` [N, N] is P itself. A group of one gets 0.5.
    - rso: exp((s_i - max_group s) / beta).
    - brain: softmax_group(ref - old + s / beta) (ref, old None: 0).
    """
    n_all = inverse.numel()
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    out = torch.empty(n_all, dtype=dtype, device=scores.device)
    s_all = scores.to(torch.float64)
    for idx in _members(inverse):
        n = idx.numel()
        if method == "win_rate":
            if s_all.ndim == 2:
                p = s_all[idx][:, idx]
            else:
                s = s_all[idx]
                p = (s[:, None] > s[None, :]).double() + 0.5 * (s[:, None] == s[None, :]).double()
            off = ~torch.eye(n, dtype=torch.bool, device=scores.device)
            w = (p * off).sum(1) / (n - 1) if n > 1 else torch.full((1,), 0.5, dtype=torch.float64)
        elif method == "rso":
            s = s_all[idx]
            w = torch.exp((s - s.max()) / beta)
        elif method == "brain":
            ref = 0.0 if ref_logps is None else ref_logps.double()[idx]
            old = 0.0 if old_logps is None else old_logps.double()[idx]
            w = torch.softmax(ref - old + s_all[idx] / beta, 0)
        else:
            raise ValueError(f"unknown method {method!r}")
        out[idx] = w.to(dtype)
    return out


# SRPO's six log-probs per preference pair (the columns of srpo_loss's [B, 6] inputs): the generative
# policy's log pi(y_w | x), log pi(y_l | x), then the self-improvement policy's revisions log pi(y' | x, y)
# of y = y_l into y' = y_w, y_l and of y = y_w into y' = y_w, y_l.
SRPO_COLUMNS = ("chosen", "rejected", "chosen_given_rejected", "rejected_given_rejected", "chosen_given_chosen",
                "rejected_given_chosen")
SRPO_METRIC_KEYS = ("loss/self_improvement", "loss/generative", "rewards/margins")


def srpo_loss(logps: Tensor, ref_logps: Tensor, *, beta: float, alpha: float) -> tuple[Tensor, dict[str, Tensor]]:
    """With h = beta * (logps - ref_logps) per column (SRPO_COLUMNS):
    self-improvement (1/2 - (h_cgr - h_rgr))^2 + (1/2 - (h_cgc - h_rgc))^2, generative
    ((h_cgr + h_c) - (h_rgc + h_r) - 1)^2, loss = mean over pairs of (1 - alpha) gen + alpha self."""
    h = beta * (logps - ref_logps.to(logps.dtype))
    c, r, cgr, rgr, cgc, rgc = h.unbind(-1)
    improve = (0.5 - (cgr - rgr)) ** 2 + (0.5 - (cgc - rgc)) ** 2
    generative = ((cgr + c) - (rgc + r) - 1.0) ** 2
    n = max(logps.shape[0], 1)
    loss = ((1.0 - alpha) * generative + alpha * improve).sum() / n
    metrics = {"loss/self_improvement": improve.detach().sum() / n, "loss/generative": generative.detach().sum() / n,
               "rewards/margins": (c - r).detach().sum() / n}
    return loss, metrics
