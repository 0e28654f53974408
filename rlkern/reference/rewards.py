"""Float64 references of the reward family (rlkern/ops/rewards.py): plain Python loops, short
and obviously right; the oracle the C++ and Triton kernels are tested against. Every formula and
the choices it makes are documented on the public ops."""

from __future__ import annotations

import math

import torch
from torch import Tensor

# codes of the kernels' per-sample method (cpp_sample_rewards / kernels.rewards.sample_rewards)
SAMPLE_METHODS = ("overlong", "gigpo")
# kl_rewards' estimators: verl's kl_penalty names (the "+" straight-through forms have the same value)
KL_ESTIMATORS = ("k1", "abs", "k2", "k3")
KL_ALIASES = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}


def overlong(score: float, length: float, max_length: float, cache_length: float, factor: float) -> float:
    """score + factor * clamp((max_length - cache_length - length) / cache_length, -1, 0)."""
    excess = length - (max_length - cache_length)
    return score + factor * max(min(-excess / cache_length, 0.0), -1.0)


def sample_rewards(a: Tensor, b: Tensor, method: str, params: list[float]) -> Tensor:
    """``[N]`` float64: DAPO's overlong reward (a = scores, b = lengths; params max_length,
    cache_length, factor) or GiGPO's combined advantage (a = episode, b = step; params weight)."""
    x = [float(v) for v in a.double().tolist()]
    y = [float(v) for v in b.double().tolist()]
    if method == "overlong":
        out = [overlong(s, n, *params[:3]) for s, n in zip(x, y)]
    elif method == "gigpo":
        out = [e + params[0] * s for e, s in zip(x, y)]
    else:
        raise ValueError(method)
    return torch.tensor(out, dtype=torch.float64)


def kl_value(lp: float, ref: float, estimator: str) -> float:
    """verl 0.9.1's kl_penalty_forward in float64 (k3 with its clamps at 20 and 10)."""
    d = lp - ref
    if estimator == "k1":
        return d
    if estimator == "abs":
        return abs(d)
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        k = min(max(ref - lp, -20.0), 20.0)
        return min(max(math.exp(k) - k - 1.0, -10.0), 10.0)
    raise ValueError(estimator)


def kl_rewards(scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, estimator: str, kl_coef: float,
               kl_clip: float | None, reward_clip: tuple[float, float] | None, cu_seqlens: Tensor | None = None) -> Tensor:
    """``[B, T]`` float64: -kl_coef * clip(KL) on the masked tokens, plus the (clipped) score on
    each row's last masked token; a row without a masked token is all 0. Packed ``[total]`` with
    ``cu_seqlens``: computed per sequence."""
    if cu_seqlens is not None:
        cu = cu_seqlens.tolist()
        parts = [kl_rewards(scores[i:i + 1], logprobs[None, cu[i]:cu[i + 1]], ref_logprobs[None, cu[i]:cu[i + 1]],
                            mask[None, cu[i]:cu[i + 1]], estimator, kl_coef, kl_clip, reward_clip)[0]
                 for i in range(len(cu) - 1)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    b, t = logprobs.shape
    out = torch.zeros(b, t, dtype=torch.float64)
    lp, ref, keep = logprobs.double().tolist(), ref_logprobs.double().tolist(), mask.bool().tolist()
    for i in range(b):
        last = max((j for j in range(t) if keep[i][j]), default=-1)
        for j in range(t):
            if not keep[i][j]:
                continue
            kl = kl_value(lp[i][j], ref[i][j], estimator)
            if kl_clip is not None:
                kl = min(max(kl, -kl_clip), kl_clip)
            out[i, j] = -kl_coef * kl
        if last >= 0:
            s = float(scores[i])
            if reward_clip is not None:
                s = min(max(s, reward_clip[0]), reward_clip[1])
            out[i, last] += s
    return out


def action_rewards(pred_types: Tensor, true_types: Tensor, points: Tensor, boxes: Tensor, fmt: Tensor) -> Tensor:
    """``[N]`` float64: [pred type == true type] + [x1 <= x <= x2 and y1 <= y <= y2] + format."""
    out = []
    for p, t, (x, y), (x1, y1, x2, y2), f in zip(pred_types.tolist(), true_types.tolist(), points.double().tolist(),
                                                  boxes.double().tolist(), fmt.double().tolist()):
        inside = x1 <= x <= x2 and y1 <= y <= y2  # False with a NaN
        out.append(float(p == t) + float(inside) + f)
    return torch.tensor(out, dtype=torch.float64)
