"""policy_loss's corrections before the loss: rollout importance weights and rejection (verl's
rollout correction), and the clip_cov / kl_cov token choice."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rlkern.ops._layout import out_dtype, pad, segment_ids, unpad
from rlkern.reference import policy_loss as reference


class PackedRows:
    """reference.PaddedRows for packed ``[total]`` tokens: segment reductions over cu_seqlens (no
    padding, so no host read of the longest sequence)."""

    def __init__(self, cu_seqlens: Tensor, total: int):
        self.seg = segment_ids(cu_seqlens, total)
        self.n_seqs = cu_seqlens.numel() - 1

    def sum(self, x: Tensor) -> Tensor:
        return x.new_zeros(self.n_seqs).index_add_(0, self.seg, x)

    def amax(self, x: Tensor) -> Tensor:
        return x.new_full((self.n_seqs,), -math.inf).scatter_reduce(0, self.seg, x, "amax")

    def spread(self, per_seq: Tensor) -> Tensor:
        return per_seq[self.seg]


def _rollout_correction(trained, behaviour, mask, cu_seqlens, rollout_is, rollout_is_threshold,
                        rollout_is_batch_normalize, rollout_rs, rollout_rs_threshold):
    """Rollout IS weights and rejection mask (reference math, no gradient; no host sync)."""
    rows = reference.PaddedRows if cu_seqlens is None else PackedRows(cu_seqlens, trained.numel())
    try:
        return reference.rollout_correction(trained, behaviour, mask, rollout_is, rollout_is_threshold,
                                            rollout_is_batch_normalize, rollout_rs, rollout_rs_threshold, rows=rows)
    except (TypeError, ValueError) as error:  # the reference checks the options: name the op
        raise type(error)(f"policy_loss: {error}") from None


def _cov_select(loss, logprobs, old_logprobs, advantages, mask, cu_seqlens, clip_low, clip_high, clip_cov_ratio,
                clip_cov_lb, clip_cov_ub, kl_cov_ratio) -> Tensor:
    """clip_cov / kl_cov token choice (data-dependent: a host sync, as in verl)."""
    if cu_seqlens is not None:
        width = max(int(cu_seqlens.diff().max()) if cu_seqlens.numel() > 1 else 0, 1)
        padded = lambda t: pad(t, cu_seqlens, width)  # noqa: E731
        m = padded(torch.ones_like(logprobs) if mask is None else mask.to(logprobs.dtype))
        adv = padded(advantages) if advantages.shape == logprobs.shape else advantages[:, None]
        lp, old = padded(logprobs.detach()), padded(old_logprobs)
    else:
        m, lp, old = mask, logprobs.detach(), old_logprobs
        adv = advantages if advantages.ndim == 2 else advantages[:, None]
    if loss == "clip_cov":
        select = reference.clip_cov_select(lp, old, adv, m, clip_low, clip_high, clip_cov_ratio, clip_cov_lb,
                                           clip_cov_ub)
    else:
        select = reference.kl_cov_select(lp, adv, m, kl_cov_ratio)
    select = select.to(out_dtype(logprobs))
    return unpad(select, cu_seqlens, logprobs.numel()) if cu_seqlens is not None else select


def off_policy_weights(logprobs, old_logprobs, rollout_logprobs, advantages, response_mask, cu_seqlens,
                       threshold: float) -> Tensor:
    """The off-policy sequence mask as weights on the policy term (no host sync): the behaviour
    policy is the rollout's when given (TRL's sampling_per_token_logps), else old_logprobs."""
    rows = reference.PaddedRows if cu_seqlens is None else PackedRows(cu_seqlens, logprobs.numel())
    behaviour = old_logprobs if rollout_logprobs is None else rollout_logprobs
    return reference.off_policy_mask(logprobs.detach(), behaviour, advantages, response_mask, threshold, rows=rows)


def apply(loss: str, inner: str, logprobs, old_logprobs, advantages, response_mask, cu_seqlens, is_weights,
          rollout_logprobs, rollout: dict, cov: dict, off_policy_mask_threshold: float | None = None):
    """The corrections of one call: ``(is_weights, response_mask, select)`` for the kernels."""
    if off_policy_mask_threshold is not None:
        keep = off_policy_weights(logprobs, old_logprobs, rollout_logprobs, advantages, response_mask, cu_seqlens,
                                  off_policy_mask_threshold)
        is_weights = keep if is_weights is None else is_weights * keep
    is_bypass = loss == "bypass_mode"
    if is_bypass or rollout["rollout_is"] is not None or rollout["rollout_rs"] is not None:
        behaviour = old_logprobs if is_bypass else rollout_logprobs
        if behaviour is None:
            raise ValueError("policy_loss: rollout_is / rollout_rs need rollout_logprobs (the inference engine's "
                             "log-probs), got None")
        trained = logprobs.detach() if is_bypass else old_logprobs
        weights, response_mask = _rollout_correction(trained, behaviour, response_mask, cu_seqlens, **rollout)
        if is_bypass and inner == "ppo":
            weights = None  # verl: the PPO ratio already is the IS correction
        if weights is not None:
            is_weights = weights if is_weights is None else is_weights * weights
    select = None
    if inner in ("clip_cov", "kl_cov"):
        select = _cov_select(inner, logprobs, old_logprobs, advantages, response_mask, cu_seqlens, **cov)
    return is_weights, response_mask, select
