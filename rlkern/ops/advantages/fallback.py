"""The PyTorch backend of the advantage family: batch-wide float64 tensor ops, no host sync.

What runs where no kernel of an op applies (docs/architecture.md, Dispatch): installs without
the C++ extension, ``RLKERN_BACKEND=torch``, and on CUDA tensors the ops without a Triton kernel
yet: ``grpo_passk``, ``bnpo``, ``optimal_token_baseline`` and ``masked_whiten`` (GAE, discounted
returns, the broadcast to tokens, ``group_normalize``, ``group_baseline`` and ``remax`` run
kernels/advantages.py there, float64 included). Each function takes the arguments of the op's
C++ kernel (csrc/advantages.cpp) and returns the same outputs. The token scans (GAE, discounted
returns) have no vectorized form here: they run the reference (rlkern/reference/advantages.py),
which is what their torch backend is. Every op has this one PyTorch implementation besides the
reference.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rlkern import _backend
from rlkern.ops import _checks
from rlkern.ops._layout import out_dtype, pad, segment_ids, unpad
from rlkern.reference import advantages as reference

_F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# Token scans: the reference, on padded rows


def _width(cu_seqlens: Tensor) -> int:
    """The longest sequence (a host read: the fallback's packed path pads to it)."""
    return int(cu_seqlens.diff().max()) if cu_seqlens.numel() > 1 else 0


def gae(rewards, values, mask, bootstrap, cu_seqlens, gamma, lam):
    """cpp_gae's contract: ``(advantages, returns)``, 0 at masked positions."""
    dtype = out_dtype(rewards)
    if cu_seqlens is not None:
        width = _width(cu_seqlens)
        r, v, m = (pad(x, cu_seqlens, width) for x in (rewards, values, mask))
        adv, ret = gae(r, v, m, bootstrap, None, gamma, lam)
        return unpad(adv, cu_seqlens, rewards.numel()), unpad(ret, cu_seqlens, rewards.numel())
    boot = None if bootstrap is None else bootstrap.cpu()
    adv, ret = reference.gae(rewards.cpu(), values.cpu(), mask.cpu(), gamma, lam, bootstrap=boot)
    return adv.to(rewards.device, dtype), ret.to(rewards.device, dtype)


def discounted_returns(rewards, mask, cu_seqlens, gamma):
    """cpp_discounted_returns's contract: returns, 0 at masked positions."""
    if cu_seqlens is not None:
        width = _width(cu_seqlens)
        returns = discounted_returns(pad(rewards, cu_seqlens, width), pad(mask, cu_seqlens, width), None, gamma)
        return unpad(returns, cu_seqlens, rewards.numel())
    out = reference.discounted_returns(rewards.cpu(), mask.cpu(), gamma)
    return out.to(rewards.device, out_dtype(rewards))


# ---------------------------------------------------------------------------------------------
# Whitening and broadcasting


def whiten(values: Tensor, mask: Tensor, shift_mean: bool, zero_masked: bool) -> Tensor:
    """verl's masked_whiten with float64 statistics; n < 2 raises where host checks run, else 0."""
    valid = mask != 0
    n = valid.sum(dtype=_F64)
    if _checks.host_checks(values):
        count = int(n)
        if count < 2:
            raise ValueError(f"masked_whiten: whitening needs at least 2 valid tokens in the mask, got {count}")
    x = values.to(_F64)
    mean = torch.where(valid, x, 0).sum() / (n + 1e-8)
    dev = torch.where(valid, x - mean, 0.0)
    var = (dev * dev).sum() / (n + 1e-8) * n / (n - 1).clamp_min(1.0)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    out = torch.where(n >= 2, out, 0.0)
    if zero_masked:
        out = torch.where(valid, out, 0.0)
    return out.to(out_dtype(values))


def broadcast(scores: Tensor, mask: Tensor, cu_seqlens: Tensor | None) -> Tensor:
    """``scores[b] * mask`` over row b (``[B, T]``) or segment b (packed ``[total]``), in scores' dtype."""
    per_token = scores[:, None] if cu_seqlens is None else scores[segment_ids(cu_seqlens, mask.shape[0])]
    out = per_token * mask  # one pass: the mask is cast inside the multiply
    return out if out.dtype == scores.dtype else out.to(scores.dtype)


def _tokens(per_sample: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None) -> Tensor:
    return per_sample if mask is None else broadcast(per_sample, mask, cu_seqlens)


# ---------------------------------------------------------------------------------------------
# Group statistics (segment sums over dense group numbers; float64)


def group_sum(x: Tensor, inverse: Tensor) -> Tensor:
    """Per-sample sum of x over its group: ``[N]`` -> ``[N]`` (x float64)."""
    return torch.zeros_like(x).index_add_(0, inverse, x)[inverse]


def group_moments(x: Tensor, inverse: Tensor, scored: Tensor | None = None):
    """count, mean, sum of squared deviations of each sample's group, per sample, float64; with
    ``scored`` (float64 0/1 weights, x 0 where 0) only the samples it marks count. On CUDA the
    sums run in one Triton kernel (kernels/advantages.py)."""
    if _backend.choose(x.device, ("triton",), None) == "triton":
        from rlkern.kernels import advantages as triton_advantages

        return triton_advantages.group_moments(x, inverse, scored)
    count = group_sum(torch.ones_like(x) if scored is None else scored, inverse)
    mean = group_sum(x, inverse) / count.clamp_min(1.0)
    dev = x - mean if scored is None else (x - mean) * scored
    return count, mean, group_sum(dev * dev, inverse)


def _batch_spread(x: Tensor, scored: Tensor | None, unbiased: bool) -> Tensor:
    """Std of all scored samples of the batch (0 with fewer than 2)."""
    n = scored.sum() if scored is not None else torch.tensor(float(x.numel()), dtype=_F64, device=x.device)
    dev = x - (x.sum() / n.clamp_min(1.0)) if x.numel() else x
    if scored is not None:
        dev = dev * scored
    spread = torch.sqrt((dev * dev).sum() / ((n - 1) if unbiased else n).clamp_min(1.0))
    return torch.where(n > 1, spread, 0.0)


def group_normalize(scores, inverse, mask, cu_seqlens, eps, std, scale, singleton, skip_nan):
    """cpp_group_normalize's contract (see rlkern.ops.advantages.group_normalize)."""
    x = scores.to(_F64)
    scored = None
    if skip_nan:
        scored = (~x.isnan()).to(_F64)
        x = x.nan_to_num(0.0)
    count, mean, m2 = group_moments(x, inverse, scored)
    single = count <= 1
    if singleton == "verl":
        mean = torch.where(single, 0.0, mean)
    out = x - mean
    if std != "none" and scale != "none":
        unbiased = std == "unbiased"
        if scale == "group":
            spread = torch.sqrt(m2 / ((count - 1) if unbiased else count).clamp_min(1.0))
            if singleton == "verl":
                spread = torch.where(single, 1.0, spread)
        else:
            spread = _batch_spread(x, scored, unbiased)
        out = out / (spread + eps)
    if singleton == "zero":
        out = torch.where(single, 0.0, out)
    if skip_nan:
        out = torch.where(scored != 0, out, 0.0)
    return _tokens(out.to(out_dtype(scores)), mask, cu_seqlens)


def group_baseline(scores, inverse, weights, mask, cu_seqlens, mode, param):
    """cpp_group_baseline's contract: mode "rloo_raw" / "rloo_zero" / "mean" /
    "weighted" / "gpg" (see rlkern/ops/advantages/outcome.py)."""
    x = scores.to(_F64)
    if mode.startswith("rloo"):
        count = group_sum(torch.ones_like(x), inverse)
        loo = (count * x - group_sum(x, inverse)) / (count - 1).clamp_min(1.0)
        out = torch.where(count > 1, loo, x if mode == "rloo_raw" else 0.0)
    elif mode == "weighted":
        w = weights.to(_F64)
        count = group_sum(torch.ones_like(x), inverse)
        out = x - torch.where(count > 1, group_sum(w * x, inverse) / group_sum(w, inverse), 0.0)
    else:
        count, mean, _ = group_moments(x, inverse)
        out = x - torch.where(count > 1, mean, 0.0)
        if mode == "gpg":
            alpha = x.numel() / torch.count_nonzero(x).clamp_min(1).to(_F64)
            out = alpha * out / param
    return _tokens(out.to(out_dtype(scores)), mask, cu_seqlens)


def remax(rewards, reward_baselines, mask, cu_seqlens):
    """ReMax: reward-to-go of ``rewards * mask`` and ``returns - baseline * mask`` (float64 sums)."""
    dtype = out_dtype(rewards)
    m = mask.to(dtype)
    y = rewards.to(_F64) * m
    if cu_seqlens is None:
        returns = y.flip(-1).cumsum(-1).flip(-1).to(dtype)
        return returns - reward_baselines.to(dtype)[:, None] * m, returns
    # packed: per sequence, padded into rows (a batch-wide suffix sum minus the one past t's
    # sequence would carry a NaN or inf of one sequence into every sequence before it)
    width = _width(cu_seqlens)
    adv, returns = remax(pad(rewards, cu_seqlens, width), reward_baselines, pad(mask, cu_seqlens, width), None)
    return unpad(adv, cu_seqlens, rewards.numel()), unpad(returns, cu_seqlens, rewards.numel())


def grpo_passk(scores, inverse, eps, norm_by_std):
    """Only each group's best sample gets (max - second max) [/ (std + eps)]; a group of one
    raises where host checks run, else NaN."""
    x = scores.to(_F64)
    n = x.numel()
    count, _, m2 = group_moments(x, inverse)
    if n and _checks.host_checks(x) and bool((count < 2).any()):
        raise ValueError("grpo_passk: every group needs at least 2 samples (Pass@k compares the best two); "
                         f"smallest group has {int(count.min())}")
    index = torch.arange(n, device=x.device)
    best = torch.full_like(x, -math.inf).scatter_reduce(0, inverse, x, "amax")[inverse]
    first = torch.full_like(index, n).scatter_reduce(0, inverse, torch.where(x == best, index, n), "amin")
    is_best = index == first[inverse]
    second = torch.full_like(x, -math.inf).scatter_reduce(0, inverse, torch.where(is_best, -math.inf, x),
                                                          "amax")[inverse]
    gap = best - second
    if norm_by_std:
        gap = gap / (torch.sqrt(m2 / (count - 1).clamp_min(1.0)) + eps)
    gap = torch.where(count >= 2, gap, math.nan)
    return torch.where(is_best, gap, 0.0).to(out_dtype(scores))


def _beta_weight(p: Tensor, is_rep: Tensor) -> Tensor:
    """BNPO's 1 / BetaPDF(p; alpha, beta) with the Beta fitted to the groups' success rates."""
    groups = is_rep.sum()
    mu = (p * is_rep).sum() / groups.clamp_min(1.0)
    var = ((p - mu) ** 2 * is_rep).sum() / (groups - 1).clamp_min(1.0)
    mu = torch.where(groups > 1, mu, 0.0)
    var = torch.where(groups > 1, var, 1.0)
    k = mu * (1 - mu) / var - 1
    alpha = torch.clamp(1 + k * mu / 3, min=1.0)
    beta = torch.clamp(1 + k * (1 - mu) / 3, min=1.0)
    log_norm = torch.lgamma(alpha) + torch.lgamma(beta) - torch.lgamma(alpha + beta)
    log_pdf = torch.xlogy(alpha - 1, p) + torch.xlogy(beta - 1, 1 - p) - log_norm
    return torch.where(var > 0, torch.exp(-log_pdf).clamp(0.0, 1e6), 1.0)


def bnpo(scores, inverse, min_value, max_value):
    """BNPO (see rlkern.ops.advantages.bnpo); success rates outside [0, 1] raise where host checks run."""
    s = (scores.to(_F64) - min_value) / (max_value - min_value)
    n = s.numel()
    count, mean, _ = group_moments(s, inverse)
    p = torch.where(count > 1, mean, 0.0)
    if n and _checks.host_checks(s) and bool(((p < 0) | (p > 1)).any()):
        raise ValueError(f"bnpo: group success rates must lie in [0, 1] after (s - {min_value}) / "
                         f"({max_value} - {min_value}); adjust min_value/max_value")
    index = torch.arange(n, device=s.device)
    first = torch.full_like(index, n).scatter_reduce(0, inverse, index, "amin")
    is_rep = (index == first[inverse]).to(_F64)  # one representative sample per group
    return (_beta_weight(p, is_rep) * (s - p)).to(out_dtype(scores))


# ---------------------------------------------------------------------------------------------
# Optimal token baseline


def _slot_baseline(flat: Tensor, returns: Tensor, weighted: Tensor, slots: int, eps: float) -> Tensor:
    """sum G W / (sum W + eps) over the tokens that share a slot (group, aligned position), per token."""
    num = torch.zeros(slots, dtype=_F64, device=flat.device).index_add_(0, flat, (returns * weighted).reshape(-1))
    den = torch.zeros(slots, dtype=_F64, device=flat.device).index_add_(0, flat, weighted.reshape(-1))
    return (num / (den + eps)).index_select(0, flat)


def _otb_padded(y, w, valid, inverse, eps, multi_turn):
    """Padded ``[B, T]``: returns, per-token baseline, lengths, positions, and the row -> token map."""
    m = valid.to(_F64)
    batch, steps = y.shape
    returns = y.flip(-1).cumsum(-1).flip(-1)
    weighted = (w * m).cumsum(-1) * m
    if multi_turn:
        pos = (valid.cumsum(-1) - 1).clamp_min(0)
        baseline = _slot_baseline((inverse[:, None] * steps + pos).reshape(-1), returns, weighted, y.numel(),
                                  eps).reshape(batch, steps)
    else:
        pos = torch.arange(steps, device=y.device)[None, :]
        num = torch.zeros_like(returns).index_add_(0, inverse, returns * weighted)
        den = torch.zeros_like(returns).index_add_(0, inverse, weighted)
        baseline = (num / (den + eps))[inverse]
    return returns, baseline, valid.sum(-1), pos, lambda per_row: per_row[:, None]


def _otb_packed(y, w, valid, inverse, cu_seqlens, eps, multi_turn):
    """Packed ``[total]``: segment sums as differences of batch-wide float64 prefix/suffix sums."""
    total, batch = y.shape[0], inverse.shape[0]
    seq = segment_ids(cu_seqlens, total)

    def per_token(per_seq):
        return per_seq.index_select(0, seq)

    starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
    suffix = torch.cat([y.flip(0).cumsum(0).flip(0), y.new_zeros(1)])
    returns = suffix[:-1] - per_token(suffix[ends])
    prefix = torch.cat([y.new_zeros(1), (w * valid.to(_F64)).cumsum(0)])
    weighted = (prefix[1:] - per_token(prefix[starts])) * valid.to(_F64)
    counts = torch.cat([valid.new_zeros(1, dtype=torch.int64), valid.cumsum(0)])
    lengths = counts[ends] - counts[starts]
    if multi_turn:
        pos = (counts[1:] - per_token(counts[starts]) - 1).clamp_min(0)
    else:
        pos = torch.arange(total, device=y.device) - per_token(starts)
    # group g owns as many slots as its longest sequence has tokens: the widths sum to at most
    # total, so the per-position sums fit in [total] without a length on the host
    width = torch.zeros(batch, dtype=torch.int64, device=y.device).scatter_reduce(
        0, inverse, cu_seqlens.diff().long(), "amax")
    baseline = _slot_baseline(per_token((width.cumsum(0) - width)[inverse]) + pos, returns, weighted, total, eps)
    return returns, baseline, lengths, pos, per_token


def _otb_zero_from(lengths, inverse, numel, handle_zero_tail, multi_turn):
    """Per sequence, the position from which its baseline is 0: a group of one from the start;
    with handle_zero_tail a unique longest response from the group's second-longest length on."""
    member = (lengths > 0) if multi_turn else torch.ones_like(lengths, dtype=torch.bool)
    count = group_sum(member.to(_F64), inverse)
    zero_from = torch.where(count > 1, max(numel, 1), 0)  # a position is < numel
    if handle_zero_tail:
        length = torch.where(member, lengths, -1)
        longest = torch.full_like(length, -1).scatter_reduce(0, inverse, length, "amax")[inverse]
        is_longest = length == longest
        n_longest = group_sum(is_longest.to(_F64), inverse)
        second = torch.full_like(length, -1).scatter_reduce(0, inverse, torch.where(is_longest, -1, length),
                                                            "amax")[inverse]
        zero_from = torch.where(is_longest & (n_longest == 1) & (count > 1) & member, second, zero_from)
    return zero_from


def optimal_token_baseline(rewards, mask, inverse, old_logprobs, sum_pi_squared, rollout_is_weights, cu_seqlens,
                           handle_zero_tail, eps, multi_turn):
    """cpp_optimal_token_baseline's contract: ``(advantages, returns)``."""
    valid = torch.ones_like(rewards, dtype=torch.bool) if mask is None else mask != 0
    w = 1 - 2 * old_logprobs.to(_F64).exp() + sum_pi_squared.to(_F64)
    if rollout_is_weights is not None:
        w = w * rollout_is_weights.to(_F64) ** 2
    y = rewards.to(_F64) * valid.to(_F64)
    if cu_seqlens is None:
        returns, baseline, lengths, pos, per_token = _otb_padded(y, w, valid, inverse, eps, multi_turn)
    else:
        returns, baseline, lengths, pos, per_token = _otb_packed(y, w, valid, inverse, cu_seqlens, eps, multi_turn)
    zero_from = _otb_zero_from(lengths, inverse, rewards.numel(), handle_zero_tail, multi_turn)
    baseline = torch.where(pos >= per_token(zero_from), 0.0, baseline)
    adv = torch.where(valid, returns - baseline, 0.0)
    dtype = out_dtype(rewards)
    return adv.to(dtype), returns.to(dtype)
