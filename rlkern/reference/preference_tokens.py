"""Reference of the token-level preference ops: ``rlkern.token_preference_loss`` (TRL 1.16's
``DPOTrainer._compute_loss`` from token log-probs, with LD-DPO, WPO and TGDPO's token weights) and
``rlkern.dpo_token_rewards`` (the DPO-implied token reward, RTO's PPO reward).

Plain PyTorch, float64-capable, differentiable by autograd: the oracle of the C++ kernels
(csrc/preference_tokens.cpp) and the Triton kernels (kernels/preference_tokens.py). The packed
layout is padded first (rlkern/ops/_layout.py), so both layouts run the same lines. The
sequence-level loss is rlkern/reference/preference.py's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlkern.ops._layout import pad, unpad
from rlkern.reference import preference as seq


def _padded(x: Tensor | None, cu_seqlens: Tensor | None, width: int, fill=0.0):
    if x is None or cu_seqlens is None:
        return x
    return pad(x, cu_seqlens, width, fill)


def _width(cu_seqlens: Tensor) -> int:
    return max(int(cu_seqlens.diff().max()) if cu_seqlens.numel() > 1 else 0, 1)


def token_weights(response_mask: Tensor, *, ld_alpha: float | None = None, token_rewards: Tensor | None = None,
                  tgdpo_alpha: float = 1.0, dtype=torch.float64) -> tuple[Tensor, Tensor]:
    """``(weights [2B, T], lengths [2B])`` of padded rows (chosen rows first).

    weights = mask * LD-DPO's factor * TGDPO's factor: LD-DPO (TRL's ``ld_alpha``) keeps the first
    ``min(n_chosen, n_rejected)`` completion tokens of each row of a pair at 1 and scales the rest
    by ld_alpha; TGDPO scales token t by ``1 + tgdpo_alpha * r_t`` in chosen rows and
    ``1 - tgdpo_alpha * r_t`` in rejected rows."""
    m = (response_mask != 0).to(dtype)
    lengths = m.sum(1)
    w = m
    rows = m.shape[0]
    if ld_alpha is not None:
        n = rows // 2
        shared = torch.minimum(lengths[:n], lengths[n:]).repeat(2)
        pos = m.cumsum(1)
        one = torch.ones((), dtype=dtype, device=m.device)
        w = w * torch.where(pos <= shared[:, None], one, one * ld_alpha)
    if token_rewards is not None:
        sign = torch.cat([torch.ones(rows // 2, dtype=dtype), -torch.ones(rows // 2, dtype=dtype)]).to(m.device)
        w = w * (1.0 + sign[:, None] * tgdpo_alpha * token_rewards.to(dtype))
    return w, lengths


def token_preference_loss(logprobs: Tensor, response_mask: Tensor | None, ref_logprobs: Tensor | None = None, *,
                          cu_seqlens: Tensor | None = None, ld_alpha: float | None = None,
                          wpo_adjustment: Tensor | None = None, token_rewards: Tensor | None = None,
                          tgdpo_alpha: float = 1.0, loss_type="sigmoid", loss_weights=None,
                          pair_weights: Tensor | None = None, **kwargs):
    """TRL 1.16's DPO loss from token log-probs (rows [0, B) chosen, [B, 2B) rejected), computed
    in float32 (float64 for float64 input). No argument checks: the op checks.

    Sums of ``w_t * logprobs_t`` (and of ``w_t * ref_logprobs_t`` for a token-level reference)
    give the per-sequence log-probs; the token counts give the lengths; ``sft`` reads the plain
    masked sums (TRL's ``per_token_logps[chosen_mask].mean()``, no LD-DPO weight); WPO's weights
    are ``exp(sum(mask * (logprobs - wpo_adjustment)) / max(n, 1))`` (detached), the pair's
    chosen times rejected weight."""
    dtype = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
    if cu_seqlens is not None:
        width = _width(cu_seqlens)
        mask = torch.ones_like(logprobs, dtype=torch.bool) if response_mask is None else response_mask
        mask = _padded(mask, cu_seqlens, width, 0)
        lp = _padded(logprobs, cu_seqlens, width)
        ref = ref_logprobs if ref_logprobs is None or ref_logprobs.shape != logprobs.shape else \
            _padded(ref_logprobs, cu_seqlens, width)
        adj = _padded(wpo_adjustment, cu_seqlens, width)
        tr = _padded(token_rewards, cu_seqlens, width)
    else:
        mask, lp, ref, adj, tr = response_mask, logprobs, ref_logprobs, wpo_adjustment, token_rewards
    valid = mask != 0
    w, lengths = token_weights(mask, ld_alpha=ld_alpha, token_rewards=tr, tgdpo_alpha=tgdpo_alpha, dtype=dtype)
    x = torch.where(valid, lp.to(dtype), 0.0)
    sums = (w * x).sum(1)
    raw = x.sum(1)
    ref_sums = None
    if ref is not None:
        ref_sums = (w * torch.where(valid, ref.to(dtype), 0.0)).sum(1) if ref.ndim == 2 else ref.to(dtype)
    n = lp.shape[0] // 2
    weights = None if pair_weights is None else pair_weights.to(dtype)
    if adj is not None:
        with torch.no_grad():
            aligned = torch.where(valid, lp.to(dtype) - adj.to(dtype), 0.0).sum(1)
            wpo = torch.exp(aligned / lengths.clamp(min=1))
            wpo = wpo[:n] * wpo[n:]
        weights = wpo if weights is None else weights * wpo
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    lweights = [1.0] * len(types) if loss_weights is None else list(loss_weights)
    refs = (None, None) if ref_sums is None else (ref_sums[:n], ref_sums[n:])
    common = dict(chosen_lengths=lengths[:n], rejected_lengths=lengths[n:], pair_weights=weights,
                  clamp_max=seq.alpha_clamp(logprobs.dtype), **kwargs)
    weighted = ld_alpha is not None or token_rewards is not None
    if "sft" not in types or not weighted:
        return seq.preference_loss(sums[:n], sums[n:], *refs, loss_type=types, loss_weights=lweights, **common)
    # sft reads the plain token sums: its term apart (the metrics are the weighted sums', as TRL's)
    rest = [(t, lw) for t, lw in zip(types, lweights) if t != "sft"] or [("sft", 0.0)]
    loss, metrics = seq.preference_loss(sums[:n], sums[n:], *refs, loss_type=[t for t, _ in rest],
                                        loss_weights=[lw for _, lw in rest], **common)
    sft_w = sum(lw for t, lw in zip(types, lweights) if t == "sft")
    sft, _ = seq.preference_loss(raw[:n], raw[n:], *refs, loss_type="sft", loss_weights=[sft_w], **common)
    return loss + sft, metrics


def dpo_token_rewards(logprobs: Tensor, ref_logprobs: Tensor, response_mask: Tensor | None = None,
                      old_logprobs: Tensor | None = None, sequence_rewards: Tensor | None = None, *, beta: float = 0.1,
                      kl_coef: float = 0.0, sequence_reward_coef: float = 1.0,
                      cu_seqlens: Tensor | None = None) -> Tensor:
    """RTO's token reward: ``beta * (logprobs - ref_logprobs) - kl_coef * (old_logprobs -
    ref_logprobs)`` at every valid token, plus ``sequence_reward_coef * sequence_rewards[b]`` at
    the last valid token of sequence b; 0 at masked tokens. float32 (float64 for float64)."""
    dtype = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
    if cu_seqlens is not None:
        total = logprobs.numel()
        width = _width(cu_seqlens)
        mask = torch.ones_like(logprobs, dtype=torch.bool) if response_mask is None else response_mask
        padded = dpo_token_rewards(
            pad(logprobs, cu_seqlens, width), pad(ref_logprobs, cu_seqlens, width), pad(mask, cu_seqlens, width, 0),
            _padded(old_logprobs, cu_seqlens, width), sequence_rewards, beta=beta, kl_coef=kl_coef,
            sequence_reward_coef=sequence_reward_coef)
        return unpad(padded, cu_seqlens, total)
    valid = response_mask != 0
    r = beta * (logprobs.to(dtype) - ref_logprobs.to(dtype))
    if old_logprobs is not None:
        r = r - kl_coef * (old_logprobs.to(dtype) - ref_logprobs.to(dtype))
    r = torch.where(valid, r, 0.0)
    if sequence_rewards is not None and r.shape[1] > 0:
        idx = torch.arange(r.shape[1], device=r.device)
        last = torch.where(valid, idx, -1).max(1).values
        rows = torch.nonzero(last >= 0)[:, 0]
        r = r.clone()
        r[rows, last[rows]] += sequence_reward_coef * sequence_rewards.to(dtype)[rows]
    return r
