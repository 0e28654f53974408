"""Plain-PyTorch reference of the fused linear loss family: the oracle of ``linear_policy_loss``.

For hidden states ``h``, LM head ``W``, bias ``b`` and sampled tokens ``y``:

    logp_t, H_t = linear_logprobs(h_t, W, b, y_t)     (rlkern.reference.linear_logprobs: the
                                                         [N, V] logits materialized in float64)
    loss, metrics = policy_loss(logp, old, A, mask, entropy=H, ...)   (rlkern.reference.policy_loss)

so the loss is ``agg(policy * is_weights) + kl_coef * agg(kl) - entropy_coef *
entropy_agg(H)``, and its gradients w.r.t. ``h``, ``W``, ``b`` come from autograd through the
materialized logits. Float64 throughout (``logits_dtype``: the rounding model of
rlkern.reference.linear_logprobs), small sizes only. Packed input (``cu_seqlens``) is
padded to ``[B, max_len]`` first; the padding is masked.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlkern.ops._layout import pad
from rlkern.reference import linear_logprobs as _linear
from rlkern.reference import policy_loss as _policy


def linear_policy_loss(
    hidden: Tensor,  # [B, T, H] padded, or [N, H] packed with cu_seqlens
    weight: Tensor,  # [V, H]
    bias: Tensor | None,  # [V]
    labels: Tensor,  # hidden.shape[:-1]
    old_logprobs: Tensor,  # like labels
    advantages: Tensor,  # like labels, or [B]
    mask: Tensor | None,  # like labels (None: packed, every token counts)
    *,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    ignore_index: int = -100,
    logits_dtype: torch.dtype | None = None,
    cu_seqlens: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    is_weights: Tensor | None = None,
    **policy_options,
) -> tuple[Tensor, Tensor]:
    """``(loss [], metrics [8])`` in float64 (metrics in ``policy_loss.METRIC_KEYS`` order),
    differentiable w.r.t. hidden, weight and bias. ``policy_options``: the keywords of
    ``rlkern.reference.policy_loss.policy_loss`` (loss, clip_low, agg, kl_coef, ...)."""
    n = labels.numel()
    logp, entropy, _ = _linear.linear_logprobs(
        hidden.reshape(n, hidden.shape[-1]), weight, bias, labels.reshape(n), temperature=temperature,
        logit_scale=logit_scale, logit_softcap=logit_softcap, ignore_index=ignore_index, logits_dtype=logits_dtype)
    tensors = [logp.reshape(labels.shape), entropy.reshape(labels.shape), old_logprobs.double(),
               None if ref_logprobs is None else ref_logprobs.double(),
               None if is_weights is None else is_weights.double()]
    m = torch.ones(labels.shape, dtype=torch.float64) if mask is None else mask.double()
    adv = advantages.double()
    if cu_seqlens is not None:
        width = max(int(cu_seqlens.diff().max()) if cu_seqlens.numel() > 1 else 0, 1)
        tensors = [None if t is None else pad(t, cu_seqlens, width) for t in tensors]
        m = pad(m, cu_seqlens, width)
        if adv.shape == labels.shape:
            adv = pad(adv, cu_seqlens, width)
    lp, ent, old, ref, isw = tensors
    return _policy.policy_loss(lp, old, adv, m, entropy=ent, ref_logprobs=ref, is_weights=isw, **policy_options)
