"""Float64 references of the reward-shaping family (rlkern/ops/shaping.py): plain Python loops
over each group, short and obviously right; the oracle the C++ and Triton kernels are tested
against. Every formula and the choices it makes are documented on the public ops."""

from __future__ import annotations

import math

import torch
from torch import Tensor

ENSEMBLE_METHODS = ("mean", "wco", "uwo", "weighted")
SHAPE_METHODS = ("grpo_lambda", "unlikeliness", "s_grpo", "otc", "hbpo")


def ensemble_rewards(rewards: Tensor, method: str, coef: float = 0.0, weights: Tensor | None = None) -> Tensor:
    """``[B, K]`` -> ``[B]``: mean, min (WCO), mean - coef * population variance (UWO), or sum_k w_k r_k."""
    r = rewards.double()
    if method == "mean":
        return r.mean(dim=1) if r.shape[1] else r.new_full((r.shape[0],), float("nan"))
    if method == "wco":
        return r.min(dim=1).values
    if method == "uwo":
        mean = r.mean(dim=1, keepdim=True)
        return mean[:, 0] - coef * ((r - mean) ** 2).mean(dim=1)
    if method == "weighted":
        return r @ weights.double()
    raise ValueError(method)


def _groups(inverse: Tensor) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(inverse.tolist()):
        groups.setdefault(g, []).append(i)
    return groups


def top_fraction_cut(ratios: list[float], fraction: float) -> float:
    """The correctness ratio of the ceil(fraction * G)-th best of G groups (inf when that is 0):
    GRPO-lambda's top-lambda selection as a threshold (ties at the cut are all selected)."""
    count = math.ceil(fraction * len(ratios) - 1e-9)
    return sorted(ratios, reverse=True)[count - 1] if count >= 1 else math.inf


def shape_rewards(scores: Tensor, inverse: Tensor, aux: Tensor | None, method: str, params: list[float],
                  aux2: Tensor | None = None) -> Tensor:
    """``[N]`` float64 shaped rewards; ``aux`` is the method's second per-sample tensor (lengths,
    log-likelihoods, exit positions, tool calls); ``params`` as in rlkern/ops/shaping.py
    (GRPO-lambda: threshold, length_coef, eps, top_fraction or -1)."""
    s = [float(v) for v in scores.double().tolist()]
    a = [float(v) for v in aux.double().tolist()] if aux is not None else [0.0] * len(s)
    out = list(s)
    if method == "hbpo":  # per sample; aux = lengths, aux2 = budgets
        max_length, beta, alpha = params
        for i, (score, n, b) in enumerate(zip(s, a, aux2.double().tolist())):
            if math.isnan(score):
                continue
            out[i] = 0.0
            if score > 0 and n <= max_length:
                out[i] = (beta * math.cos(math.pi * n / (2 * max_length)) - alpha * abs(n - b) if n > b
                          else beta * math.cos(math.pi * b / (2 * max_length)))
        return torch.tensor(out, dtype=torch.float64)
    groups = _groups(inverse)
    if method == "grpo_lambda" and params[3] >= 0:
        ratios = [sum(s[j] > 0 for j in members) / len(members) for members in groups.values()]
        params = [top_fraction_cut(ratios, params[3])] + list(params[1:])
    for members in groups.values():
        correct = [j for j in members if s[j] > 0]
        if method == "grpo_lambda":
            threshold, alpha, eps, _ = params
            if not correct or len(correct) / len(members) < threshold:
                continue  # a low correctness ratio: the plain 0/1 reward
            mean = sum(a[j] for j in correct) / len(correct)
            std = math.sqrt(sum((a[j] - mean) ** 2 for j in correct) / len(correct))
            for i in correct:
                z = (a[i] - mean) / (std + eps)
                out[i] = s[i] * (1.0 - alpha / (1.0 + math.exp(-z)))
        elif method == "unlikeliness":
            (beta,) = params
            g = len(members)
            ranked = sorted(correct, key=lambda j: (-a[j], j))  # rank 0: the most likely
            for rank, i in enumerate(ranked):
                out[i] = s[i] * (1.0 - beta * (g - rank) / g)
        elif method == "s_grpo":
            (decay,) = params
            ordered = sorted(correct, key=lambda j: (a[j], j))  # earliest exit first
            for k, i in enumerate(ordered):
                out[i] = s[i] * decay**k
        elif method == "otc":
            c, coef = params
            n = min((a[j] for j in correct), default=0.0)
            for i in members:
                m = a[i]
                if n == 0 and m == 0:
                    tool = 1.0
                elif n == 0:
                    tool = math.cos(m * math.pi / (2 * m + c))
                else:
                    f = 2 * n * m / (m + n)
                    tool = math.sin(f * math.pi / (2 * n))
                out[i] = coef * tool * s[i]
        else:
            raise ValueError(method)
    return torch.tensor(out, dtype=torch.float64)


def hbpo_advantages(rewards: Tensor, inverse: Tensor, budgets: Tensor, max_length: float, beta: float,
                    eps: float) -> Tensor:
    """``[N]`` float64: (R - mean_group) / (unbiased std_group + eps) + mean_subgroup(R) - f2(b)
    (a group of one: R / (1 + eps))."""
    r = [float(v) for v in rewards.double().tolist()]
    b = [float(v) for v in budgets.double().tolist()]
    out = [0.0] * len(r)
    for members in _groups(inverse).values():
        if len(members) == 1:
            out[members[0]] = r[members[0]] / (1.0 + eps)
            continue
        mean = sum(r[j] for j in members) / len(members)
        std = math.sqrt(sum((r[j] - mean) ** 2 for j in members) / (len(members) - 1))
        for i in members:
            same = [r[j] for j in members if b[j] == b[i]]
            f2 = beta * math.cos(math.pi * b[i] / (2 * max_length))
            out[i] = (r[i] - mean) / (std + eps) + sum(same) / len(same) - f2
    return torch.tensor(out, dtype=torch.float64)


def token_weights(logprobs: Tensor, inverse: Tensor, mask: Tensor, max_weight: float) -> Tensor:
    """``[N, T]`` float64 TW-GRPO token weights from ``[N, T, V]`` log-probabilities (see
    rlkern/ops/shaping.py): masked positions count as the uniform distribution, the KL-like
    divergence of each member from the group's mean log-probs at position t, min-max normalized
    over the positions, mapped to ``[1, max_weight]``, times the mask."""
    n, t, v = logprobs.shape
    keep = mask.bool()
    lp = torch.where(keep[..., None], logprobs.double(), torch.full((), -math.log(v), dtype=torch.float64))
    out = torch.zeros(n, t, dtype=torch.float64)
    if t == 0:
        return out
    for members in _groups(inverse).values():
        g = lp[members]  # [G, T, V]
        d = (g.mean(dim=0, keepdim=True) - g).clamp(-11.0, 11.0)
        kl = (d.exp() - d - 1).sum(dim=-1).mean(dim=0)  # [T]
        norm = (kl - kl.min()) / (kl.max() - kl.min() + 1e-8)
        out[members] = (1.0 + (max_weight - 1.0) * norm)[None, :] * keep[members].double()
    return out
