"""Plain-PyTorch reference of the advantage family: the oracle of every kernel.

Written for clarity: Python loops over time steps and over groups, float64 throughout. Masks
are read as ``mask != 0``. Group ids are given here as a Python list (or 1-D tensor) of
hashable labels; the reference groups them with a dict, which is what the kernels must match.

Recurrences (valid t: mask[t] != 0; a masked position leaves every carried quantity as is):

    GAE (verl's compute_gae_advantage_return), right to left, next_value = bootstrap or 0
    (``egae`` below writes T-PPO's EGAE out as the paper's truncated sum instead):
        delta_t  = r_t + gamma * next_value - v_t
        A_t      = delta_t + gamma * lam * A_{next valid}
        next_value = v_t;   R_t = A_t + v_t;   A_t = R_t = 0 at masked t
    discounted returns (verl's REINFORCE++): G_t = r_t + gamma * G_{next valid}; 0 at masked t

Whitening is verl's ``masked_whiten``: mean = sum / (n + 1e-8); var = mean of squared
deviations (same denominator) * n / (n - 1); out = (x - mean) / sqrt(var + 1e-8).
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

_F64 = torch.float64


def _valid(mask: torch.Tensor) -> torch.Tensor:
    return mask != 0


def gae(rewards, values, mask, gamma, lam, bootstrap=None):
    """Returns ``(advantages, returns)`` [B, T] float64, unwhitened, 0 at masked positions."""
    r, v, m = rewards.to(_F64).tolist(), values.to(_F64).tolist(), _valid(mask).tolist()
    batch, steps = rewards.shape
    adv = [[0.0] * steps for _ in range(batch)]
    ret = [[0.0] * steps for _ in range(batch)]
    for b in range(batch):
        next_value = float(bootstrap[b]) if bootstrap is not None else 0.0
        last = 0.0
        for t in reversed(range(steps)):
            if not m[b][t]:
                continue
            last = r[b][t] + gamma * next_value - v[b][t] + gamma * lam * last
            next_value = v[b][t]
            adv[b][t] = last
            ret[b][t] = last + v[b][t]
    return torch.tensor(adv, dtype=_F64).reshape(batch, steps), torch.tensor(ret, dtype=_F64).reshape(batch, steps)


def egae(rewards, values, mask, truncated, gamma, lam, bootstrap=None):
    """T-PPO's EGAE (arXiv:2506.15050) as a truncated sum of TD residuals, not a recurrence.

    With j_0 < ... < j_{l-1} the valid positions of a row:
        delta_i = r_{j_i} + gamma * V_next - v_{j_i},  V_next = v_{j_{i+1}} for i < l - 1, and for
                  the last token V(s_l) := v_{j_{l-1}} if the row is truncated (bootstrap[b] when
                  given), 0 if it finished
        A_{j_i} = sum_{k=0}^{l-1-i} (gamma * lam)^k * delta_{i+k}
    Returns ``(advantages, returns)`` [B, T] float64, ``returns = A + v``, 0 at masked positions.
    """
    r, v, m = rewards.to(_F64).tolist(), values.to(_F64).tolist(), _valid(mask).tolist()
    batch, steps = rewards.shape
    adv = torch.zeros(batch, steps, dtype=_F64)
    ret = torch.zeros(batch, steps, dtype=_F64)
    for b in range(batch):
        pos = [t for t in range(steps) if m[b][t]]
        if not pos:
            continue
        if not truncated[b]:
            v_end = 0.0
        else:
            v_end = float(bootstrap[b]) if bootstrap is not None else v[b][pos[-1]]
        v_next = [v[b][t] for t in pos[1:]] + [v_end]
        delta = [r[b][t] + gamma * nxt - v[b][t] for t, nxt in zip(pos, v_next)]
        for i, t in enumerate(pos):
            adv[b, t] = sum((gamma * lam) ** k * delta[i + k] for k in range(len(pos) - i))
            ret[b, t] = adv[b, t] + v[b][t]
    return adv, ret


def discounted_returns(rewards, mask, gamma):
    """Returns [B, T] float64, 0 at masked positions."""
    r, m = rewards.to(_F64).tolist(), _valid(mask).tolist()
    batch, steps = rewards.shape
    out = [[0.0] * steps for _ in range(batch)]
    for b in range(batch):
        running = 0.0
        for t in reversed(range(steps)):
            if m[b][t]:
                running = r[b][t] + gamma * running
                out[b][t] = running
    return torch.tensor(out, dtype=_F64).reshape(batch, steps)


def masked_whiten(values, mask, shift_mean=True):
    """verl's masked_whiten in float64 (every position transformed); ValueError for n < 2."""
    x, m = values.to(_F64), _valid(mask)
    n = int(m.sum())
    if n < 2:
        raise ValueError(f"masked_whiten needs at least 2 valid positions in mask, got {n}")
    mean = x[m].sum() / (n + 1e-8)
    var = ((x[m] - mean) ** 2).sum() / (n + 1e-8) * n / (n - 1)
    out = (x - mean) / math.sqrt(float(var) + 1e-8)
    return out if shift_mean else out + mean


def _groups(ids) -> dict:
    members = defaultdict(list)
    for i, key in enumerate(ids):
        members[key.item() if isinstance(key, torch.Tensor) else key].append(i)
    return members


def _std(xs: list[float], unbiased: bool) -> float:
    n = len(xs)
    mean = sum(xs) / n
    ss = sum((x - mean) ** 2 for x in xs)
    return math.sqrt(ss / (n - 1)) if unbiased else math.sqrt(ss / n)


def group_normalize(scores, ids, eps=1e-6, std="unbiased", scale="group", singleton="verl", skip_nan=False):
    """(s - group mean) / (std + eps); std over the group, the batch, or none. Returns [N] float64.

    singleton="verl": a group of one has mean 0 and std 1 (verl); "zero": its advantage is 0 (TRL).
    skip_nan: NaN scores count in no mean or std (groups and batch shrink) and get 0 (TRL's
    unscorable completions).
    """
    s = [float(x) for x in scores.to(_F64)]
    out = torch.zeros(len(s), dtype=_F64)
    scored = [i for i in range(len(s)) if not (skip_nan and math.isnan(s[i]))]
    divide = std is not None and scale != "none"
    batch = [s[i] for i in scored]
    batch_std = _std(batch, std == "unbiased") if divide and scale == "batch" and len(batch) > 1 else 0.0
    for members in _groups([ids[i] for i in scored]).values():
        members = [scored[j] for j in members]
        xs = [s[i] for i in members]
        if len(xs) == 1:
            if singleton == "zero":
                continue
            mean, group_std = 0.0, 1.0
        else:
            mean, group_std = sum(xs) / len(xs), _std(xs, std == "unbiased")
        for i in members:
            if not divide:
                out[i] = s[i] - mean
            else:
                out[i] = (s[i] - mean) / ((group_std if scale == "group" else batch_std) + eps)
    return out


def rloo(scores, ids, singleton="raw"):
    """Leave-one-out baseline: n/(n-1) * (s - mean). A group of one keeps its score ("raw", verl
    rloo) or gets 0 ("zero", verl rloo_vectorized). Returns [N] float64."""
    s = scores.to(_F64)
    out = torch.zeros(len(s), dtype=_F64)
    for members in _groups(ids).values():
        n = len(members)
        mean = sum(float(s[i]) for i in members) / n
        for i in members:
            if n > 1:
                out[i] = n / (n - 1) * (float(s[i]) - mean)
            elif singleton == "raw":
                out[i] = float(s[i])
    return out


def grpo_passk(scores, ids, eps=1e-6, norm_by_std=True):
    """Only each group's best sample gets (max - second max) [/ (std + eps)]. Returns [N] float64."""
    s = scores.to(_F64)
    out = torch.zeros(len(s), dtype=_F64)
    for key, members in _groups(ids).items():
        if len(members) < 2:
            raise ValueError(f"grpo_passk needs at least 2 samples per group, group {key!r} has {len(members)}")
        xs = [float(s[i]) for i in members]
        order = sorted(range(len(xs)), key=lambda j: -xs[j])
        best = members[order[0]]
        value = xs[order[0]] - xs[order[1]]
        if norm_by_std:
            value /= _std(xs, True) + eps
        out[best] = value
    return out


def group_baseline(scores, ids, weights=None):
    """Per-sample group baseline: weighted group mean (weights None: plain mean); 0 for a group of one."""
    s = scores.to(_F64)
    w = torch.ones_like(s) if weights is None else weights.to(_F64)
    out = torch.zeros(len(s), dtype=_F64)
    for members in _groups(ids).values():
        if len(members) == 1:
            continue
        num = sum(float(w[i] * s[i]) for i in members)
        den = sum(float(w[i]) for i in members)
        for i in members:
            out[i] = num / den
    return out


def gpg(scores, ids, f_norm=1.0):
    """verl's GPG: alpha * (s - group mean) / f_norm, alpha = N / max(#nonzero scores, 1)."""
    s = scores.to(_F64)
    alpha = len(s) / max(int((s != 0).sum()), 1)
    return alpha * (s - group_baseline(s, ids)) / f_norm


def bnpo(scores, ids, min_value=0.0, max_value=1.0):
    """BNPO (arXiv:2506.02864, authors' code): see rlkern.ops.advantages.bnpo. Returns [N] float64."""
    s = (scores.to(_F64) - min_value) / (max_value - min_value)
    groups = _groups(ids)
    p_of = {}
    for key, members in groups.items():
        p_of[key] = sum(float(s[i]) for i in members) / len(members) if len(members) > 1 else 0.0
    ps = list(p_of.values())
    if len(ps) > 1:
        mu = sum(ps) / len(ps)
        var = sum((p - mu) ** 2 for p in ps) / (len(ps) - 1)
    else:
        mu, var = 0.0, 1.0
    out = torch.zeros(len(s), dtype=_F64)
    if var <= 0:  # every group has the same success rate: no Beta to fit, weight 1
        alpha = beta = None
    else:
        k = mu * (1 - mu) / var - 1
        alpha, beta = max(1 + k * mu / 3, 1.0), max(1 + k * (1 - mu) / 3, 1.0)
    for key, members in groups.items():
        p = p_of[key]
        weight = 1.0 if alpha is None else min(math.exp(-_beta_log_pdf(p, alpha, beta)), 1e6)
        for i in members:
            out[i] = weight * (float(s[i]) - p)
    return out


def _beta_log_pdf(p, a, b):
    log_norm = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    term_a = 0.0 if a == 1 else (a - 1) * (math.log(p) if p > 0 else -math.inf)
    term_b = 0.0 if b == 1 else (b - 1) * (math.log1p(-p) if p < 1 else -math.inf)
    return term_a + term_b - log_norm


def gigpo_step(step_returns, anchor_ids, ids, eps=1e-6, norm_by_std=False):
    """GiGPO step-level advantage: steps grouped by (episode group, anchor state); a step minus
    its group's mean [/ (unbiased std + eps)]; a group of one gets 0. Returns [S] float64."""
    s = step_returns.to(_F64)
    keys = [(g.item() if isinstance(g, torch.Tensor) else g, a.item() if isinstance(a, torch.Tensor) else a)
            for g, a in zip(ids, anchor_ids)]
    out = torch.zeros(len(s), dtype=_F64)
    for members in _groups(keys).values():
        xs = [float(s[i]) for i in members]
        mean = sum(xs) / len(xs)
        std = _std(xs, True) if len(xs) > 1 else 1.0
        for i in members:
            out[i] = (float(s[i]) - mean) / (std + eps) if norm_by_std else float(s[i]) - mean
    return out


def reverse_cumsum(x, mask):
    """sum_{u >= t} x_u * mask_u (verl's flip-cumsum-flip), float64 [B, T]."""
    y = x.to(_F64) * _valid(mask)
    return y.flip(-1).cumsum(-1).flip(-1)


def optimal_token_baseline(rewards, mask, ids, old_log_probs, sum_pi_squared, rollout_is_weights=None,
                           handle_zero_tail=True, eps=1e-8, compact=False, cu_seqlens=None):
    """verl's OTB (compact=False) and its multi-turn TIR variant (compact=True: valid tokens are
    packed to the left before positions are aligned across a group). Returns (adv, returns).

    mask None: every token valid. With ``cu_seqlens`` every tensor is packed ``[total]``: each
    sequence is right-padded into a row (padding masked out), and the rows' values are packed back.
    """
    if mask is None:
        mask = torch.ones(rewards.shape, dtype=torch.bool)
    if cu_seqlens is not None:
        bounds = [int(c) for c in cu_seqlens]
        steps = max([e - s for s, e in zip(bounds, bounds[1:])], default=0)
        inside = torch.zeros(len(bounds) - 1, steps, dtype=torch.bool)
        for b, (s, e) in enumerate(zip(bounds, bounds[1:])):
            inside[b, :e - s] = True

        def rows(x):
            out = torch.zeros(inside.shape, dtype=x.dtype)
            out[inside] = x
            return out

        adv, ret = optimal_token_baseline(rows(rewards), rows(mask), ids, rows(old_log_probs), rows(sum_pi_squared),
                                          None if rollout_is_weights is None else rows(rollout_is_weights),
                                          handle_zero_tail, eps, compact)
        return adv[inside], ret[inside]
    m = _valid(mask)
    returns = reverse_cumsum(rewards, mask)
    w = 1 - 2 * old_log_probs.to(_F64).exp() + sum_pi_squared.to(_F64)
    if rollout_is_weights is not None:
        w = w * rollout_is_weights.to(_F64) ** 2
    big_w = (w * m).cumsum(-1)
    batch, steps = returns.shape
    lengths = m.sum(-1).tolist()
    # per-row sequences aligned by position: padded positions (compact=False) or valid tokens
    rows_g, rows_w, rows_pos = [], [], []
    for b in range(batch):
        pos = torch.nonzero(m[b]).flatten().tolist() if compact else list(range(steps))
        rows_pos.append(pos)
        rows_g.append([float(returns[b, t]) * (1.0 if (compact or m[b, t]) else 0.0) for t in pos])
        rows_w.append([float(big_w[b, t]) * (1.0 if (compact or m[b, t]) else 0.0) for t in pos])
    keep = [b for b in range(batch) if not compact or lengths[b] > 0]
    adv = torch.zeros(batch, steps, dtype=_F64)
    groups = _groups([ids[b] for b in keep])
    for members in groups.values():
        rows = [keep[i] for i in members]
        width = max(len(rows_pos[b]) for b in rows)
        baseline = {b: [0.0] * width for b in rows}
        if len(rows) > 1:
            for j in range(width):
                num = sum(rows_g[b][j] * rows_w[b][j] for b in rows if j < len(rows_pos[b]))
                den = sum(rows_w[b][j] for b in rows if j < len(rows_pos[b]))
                for b in rows:
                    baseline[b][j] = num / (den + eps)
            if handle_zero_tail:
                lens = sorted(lengths[b] for b in rows)
                longest = [b for b in rows if lengths[b] == lens[-1]]
                if len(longest) == 1 and lens[-1] > lens[-2]:
                    for j in range(lens[-2], width):
                        baseline[longest[0]][j] = 0.0
        for b in rows:
            for j, t in enumerate(rows_pos[b]):
                if m[b, t]:
                    adv[b, t] = float(returns[b, t]) - baseline[b][j]
    return adv, returns
