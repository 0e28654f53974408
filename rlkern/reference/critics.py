"""Float64 references of the critic / value-based ops (rlkern/ops/critics.py): OREO's soft Bellman
losses. Plain PyTorch, a Python loop over rows, short and obviously right; padded ``[B, T]`` with
a mask, or packed ``[total]`` with ``cu_seqlens``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _rows(x: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None):
    """[(row values, row valid mask)] of a padded or packed token tensor."""
    if cu_seqlens is None:
        return [(x[b], mask[b] != 0) for b in range(x.shape[0])]
    cu = cu_seqlens.tolist()
    out = []
    for b in range(len(cu) - 1):
        m = torch.ones(cu[b + 1] - cu[b], dtype=torch.bool) if mask is None else mask[cu[b]:cu[b + 1]] != 0
        out.append((x[cu[b]:cu[b + 1]], m))
    return out


def soft_bellman_residuals(logprobs: Tensor, ref_logprobs: Tensor, values: Tensor, rewards: Tensor,
                           mask: Tensor | None, *, beta: float, cu_seqlens: Tensor | None = None) -> Tensor:
    """OREO's per-token residual ``e_t = V(s_t) - R + beta * sum_{i >= t, valid} (logprobs_i -
    ref_logprobs_i)`` (0 at masked tokens), float64, logprobs' shape."""
    lr = (logprobs.double() - ref_logprobs.double())
    v = values.double()
    out = torch.zeros(logprobs.shape, dtype=torch.float64)
    flat_out = _rows(out, mask, cu_seqlens)
    for b, ((row_lr, valid), (row_v, _), (row_out, _)) in enumerate(
            zip(_rows(lr, mask, cu_seqlens), _rows(v, mask, cu_seqlens), flat_out)):
        suffix = 0.0
        for t in reversed(range(row_lr.shape[0])):
            if not valid[t]:
                continue
            suffix = suffix + row_lr[t]
            row_out[t] = row_v[t] - float(rewards[b]) + beta * suffix
    return out


def soft_bellman_loss(logprobs: Tensor, ref_logprobs: Tensor, values: Tensor, rewards: Tensor,
                      mask: Tensor | None, *, beta: float, kl_coef: float = 0.0,
                      cu_seqlens: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """OREO's losses (rlkern.soft_bellman_loss has the formula), differentiable in float64:

    value_loss = mean_b (1/T_b) sum_t e_t^2 with the log-probs detached,
    policy_loss = mean_b (1/T_b) sum_t (V_t - R + beta lr_t + beta sg(sum_{i>t} lr_i))^2 with V
    detached, kl = mean_b (1/T_b) sum_t k3_t; loss = value_loss + policy_loss + kl_coef * kl.
    The mean runs over the rows with at least one valid token (none: all 0).
    """
    lp = logprobs.double()
    ref = ref_logprobs.double()
    v = values.double()
    value_terms, policy_terms, kl_terms = [], [], []
    rows = zip(_rows(lp, mask, cu_seqlens), _rows(ref, mask, cu_seqlens), _rows(v, mask, cu_seqlens))
    for b, ((row_lp, valid), (row_ref, _), (row_v, _)) in enumerate(rows):
        n = int(valid.sum())
        if n == 0:
            continue
        lr = (row_lp - row_ref)[valid]
        vv = row_v[valid]
        r = float(rewards[b])
        # suffix sums: S_t = sum_{i >= t} lr_i
        suffix = torch.flip(torch.cumsum(torch.flip(lr, [0]), 0), [0])
        later = suffix - lr  # sum_{i > t}
        e_value = vv - r + beta * suffix.detach()
        e_policy = vv.detach() - r + beta * lr + beta * later.detach()
        d = row_ref - row_lp
        k3 = (torch.exp(d) - d - 1.0)[valid]
        value_terms.append((e_value ** 2).sum() / n)
        policy_terms.append((e_policy ** 2).sum() / n)
        kl_terms.append(k3.sum() / n)
    if not value_terms:
        # no valid token: 0 with a (zero) gradient; the masked positions are never read, so a NaN
        # there must not leak through the sum (found by tests/test_fuzz_ops.py)
        zero = (lp.nan_to_num().sum() + v.nan_to_num().sum()) * 0.0
        return zero, {"value_loss": zero.detach(), "policy_loss": zero.detach(), "kl": zero.detach()}
    value_loss = torch.stack(value_terms).mean()
    policy_loss = torch.stack(policy_terms).mean()
    kl = torch.stack(kl_terms).mean()
    loss = value_loss + policy_loss + kl_coef * kl
    return loss, {"value_loss": value_loss.detach(), "policy_loss": policy_loss.detach(), "kl": kl.detach()}


def running_reward_norm(rewards: Tensor, stats: Tensor, *, clip: float | None = None,
                        eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """PPO-max's reward normalization and clipping with running statistics, float64.

    stats = (count, mean, M2) of every reward seen so far; the batch is merged in first (Chan et
    al.'s parallel update), then ``clip((r - mean) / (sqrt(M2 / count) + eps), -clip, clip)``.
    """
    r = rewards.double().reshape(-1)
    n, mean, m2 = (float(x) for x in stats.double())
    m = r.numel()
    if m:
        batch_mean = float(r.mean())
        batch_m2 = float(((r - batch_mean) ** 2).sum())
        total = n + m
        delta = batch_mean - mean
        mean = mean + delta * m / total
        m2 = m2 + batch_m2 + delta * delta * n * m / total
        n = total
    std = math.sqrt(m2 / n) if n > 0 else 0.0
    out = (r - mean) / (std + eps)
    if clip is not None:
        out = out.clamp(-clip, clip)
    return out.reshape(rewards.shape), torch.tensor([n, mean, m2], dtype=torch.float64)


def constrained_rewards(rewards: Tensor, groups: Tensor, judges: Tensor,
                        baseline_rewards: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """CGPO's constrained reward and selections over a mixture of judges, float64, a Python loop.

    satisfied_i = every judge of sample i passes; c_i = sigmoid(r_i - b_i) (calibrated, with a
    baseline) or r_i. CRPG: c_i if satisfied else 0. CRRAFT / CODPO's chosen: per group, the
    satisfied sample of highest c (the first on ties). CODPO's rejected: per group, the violating
    sample of lowest c (the first on ties).
    """
    r = rewards.double()
    c = r if baseline_rewards is None else torch.sigmoid(r - baseline_rewards.double())
    sat = (judges != 0).all(dim=1) if judges.shape[1] else torch.ones(r.shape[0], dtype=torch.bool)
    out = torch.where(sat, c, 0.0)
    chosen = torch.zeros(r.shape[0], dtype=torch.bool)
    rejected = torch.zeros(r.shape[0], dtype=torch.bool)
    best, worst = {}, {}
    for i, g in enumerate(groups.tolist()):
        if sat[i] and (g not in best or c[i] > c[best[g]]):
            best[g] = i
        if not sat[i] and (g not in worst or c[i] < c[worst[g]]):
            worst[g] = i
    chosen[list(best.values())] = True
    rejected[list(worst.values())] = True
    return out, chosen, rejected


def step_advantage_loss(logprobs: Tensor, ref_logprobs: Tensor, advantages: Tensor, step_ends: Tensor,
                        mask: Tensor | None, *, beta: float,
                        cu_seqlens: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Direct Advantage Policy Optimization's step-level loss, float64, differentiable:
    ``mean_b 1/K_b sum_k (beta * sum_{t in step k} lr_t - A_k)^2``; a step ends at a valid token
    with step_ends != 0 or at the row's last valid token; A_k is ``advantages`` at that token."""
    lp = logprobs.double()
    lr_all = lp - ref_logprobs.double()
    terms, ratios = [], []
    for (lr, valid), (adv, _), (ends, _) in zip(_rows(lr_all, mask, cu_seqlens),
                                                _rows(advantages.double(), mask, cu_seqlens),
                                                _rows(step_ends, mask, cu_seqlens)):
        idx = torch.nonzero(valid).flatten().tolist()
        if not idx:
            continue
        row_terms, row_ratios, acc = [], [], 0.0
        for t in idx:
            acc = acc + lr[t]
            if ends[t] != 0 or t == idx[-1]:
                row_terms.append((beta * acc - adv[t]) ** 2)
                row_ratios.append(beta * acc)
                acc = 0.0
        terms.append(torch.stack(row_terms).mean())
        ratios.append(torch.stack(row_ratios).mean().detach())
    if not terms:
        zero = lp.nan_to_num().sum() * 0.0  # masked NaN never read (see soft_bellman_loss)
        return zero, {"step_log_ratio": zero.detach()}
    return torch.stack(terms).mean(), {"step_log_ratio": torch.stack(ratios).mean()}
