"""Reference of ``rlkern.linear_preference_loss``: the float64 composition it must equal.

Materialized logits (rlkern/reference/linear_logprobs.py: ``z = softcap(logit_scale * (h W^T +
b)) / T``, log-softmax at the label) give the token log-probs of the concatenated batch (rows
``[0, B)`` chosen, ``[B, 2B)`` rejected); rlkern/reference/preference_tokens.py turns them into
TRL 1.16's DPO loss. Plain PyTorch, differentiable by autograd, only for small sizes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlkern.reference import linear_logprobs as heads
from rlkern.reference import preference_tokens as tokens


def linear_preference_loss(hidden: Tensor, weight: Tensor, labels: Tensor, response_mask: Tensor | None,
                           ref_logprobs: Tensor | None = None, *, bias: Tensor | None = None,
                           cu_seqlens: Tensor | None = None, temperature: float = 1.0, logit_scale: float = 1.0,
                           logit_softcap: float | None = None, ignore_index: int = -100,
                           logits_dtype: torch.dtype | None = None, **loss_kwargs):
    """``(loss, metrics)`` in the dtype of the inputs (use float64 leaves for the oracle).

    ``hidden`` ``[2B, T, H]`` (padded, with ``response_mask`` ``[2B, T]``) or ``[total, H]``
    (packed, with ``cu_seqlens``); ``logits_dtype``: the rounding model of
    rlkern.reference.linear_logprobs; every other keyword is token_preference_loss'. Masked tokens'
    labels are never read (their log-prob is replaced by 0 before the loss)."""
    lead = hidden.shape[:-1]
    flat = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1).long()
    if response_mask is not None:
        ignored = torch.full_like(flat_labels, ignore_index)
        flat_labels = torch.where(response_mask.reshape(-1) != 0, flat_labels, ignored)
    logp, _, _ = heads.linear_logprobs(flat, weight, bias, flat_labels, temperature=temperature,
                                       logit_scale=logit_scale, logit_softcap=logit_softcap,
                                       ignore_index=ignore_index, logits_dtype=logits_dtype)
    return tokens.token_preference_loss(logp.view(lead), response_mask, ref_logprobs, cu_seqlens=cu_seqlens,
                                        **loss_kwargs)


def linear_kto_loss(hidden: Tensor, weight: Tensor, labels: Tensor, response_mask: Tensor | None,
                    ref_logprobs: Tensor, desirable: Tensor, kl_logps: Tensor | None = None,
                    ref_kl_logps: Tensor | None = None, *, bias: Tensor | None = None,
                    cu_seqlens: Tensor | None = None, temperature: float = 1.0, logit_scale: float = 1.0,
                    logit_softcap: float | None = None, ignore_index: int = -100,
                    logits_dtype: torch.dtype | None = None, **loss_kwargs):
    """Reference of ``rlkern.linear_kto_loss``: materialized logits -> token log-probs -> the
    masked per-sequence sums (TRL's KTOTrainer ``log_probs.sum(-1)`` with masked labels at -100)
    -> rlkern/reference/preference.py's ``kto_loss``. ``ref_logprobs``: token-level (summed over
    the mask here) or per-sequence ``[B]``."""
    from rlkern.reference import preference

    lead = hidden.shape[:-1]
    flat = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1).long()
    mask = (torch.ones(flat_labels.shape, dtype=torch.bool) if response_mask is None
            else response_mask.reshape(-1) != 0)
    flat_labels = torch.where(mask, flat_labels, torch.full_like(flat_labels, ignore_index))
    logp, _, _ = heads.linear_logprobs(flat, weight, bias, flat_labels, temperature=temperature,
                                       logit_scale=logit_scale, logit_softcap=logit_softcap,
                                       ignore_index=ignore_index, logits_dtype=logits_dtype)
    if cu_seqlens is None:
        rows = lead[0]
        row_of = torch.arange(rows).repeat_interleave(lead[1])
    else:
        rows = cu_seqlens.numel() - 1
        row_of = torch.repeat_interleave(torch.arange(rows), cu_seqlens.long().diff())
    sums = torch.zeros(rows, dtype=logp.dtype).index_add(0, row_of, logp * mask)
    if tuple(ref_logprobs.shape) == tuple(labels.shape):
        ref = torch.zeros(rows, dtype=logp.dtype).index_add(0, row_of, ref_logprobs.reshape(-1).to(logp.dtype) * mask)
    else:
        ref = ref_logprobs.to(logp.dtype)
    return preference.kto_loss(sums, ref, desirable, kl_logps, ref_kl_logps, **loss_kwargs)
