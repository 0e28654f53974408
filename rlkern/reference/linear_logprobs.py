"""Plain-PyTorch reference of the fused linear log-prob family: the oracle of every kernel.

Math, for one token with hidden state ``h [H]``, LM head ``W [V, H]``, bias ``b [V]`` and
label ``y`` (the same as TRL's ``ChunkedLogProbFunction``):

    z = softcap(logit_scale * (h W^T + b)) / T      softcap(x) = c * tanh(x / c), or x when off
    lse  = log sum_j exp(z_j)
    logp = min(z_y - lse, 0)        0 where y == ignore_index
    H    = lse - sum_j p_j z_j      p = exp(z - lse)

and the optional per-token outputs TRL offers:

    log_sum_sq_probs = log sum_j p_j^2
    mean_logits      = mean_j z_j
    is_top1          = y is the first argmax of z  (ties with an earlier index do not count)

It materializes the ``[N, V]`` logits in float64: exact, and only for small sizes. The log-prob
and entropy math (and its all -inf and ignore_index conventions) is the token log-prob
reference applied to ``logit_scale * (h W^T + b)``, with the softcap and temperature.
"""

from __future__ import annotations

import torch

from rlkern.reference import logprobs as token_reference

EXTRA_OUTPUTS = ("log_sum_sq_probs", "mean_logits", "is_top1")


def logits64(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             logit_scale: float) -> torch.Tensor:
    """``logit_scale * (h W^T + b)`` in float64, ``[N, V]`` (before softcap and temperature)."""
    y = hidden.to(torch.float64) @ weight.to(torch.float64).T
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y * logit_scale


def linear_logprobs(
    hidden: torch.Tensor,  # (N, H) any float dtype
    weight: torch.Tensor,  # (V, H)
    bias: torch.Tensor | None,  # (V,) or None
    labels: torch.Tensor,  # (N,) int32/int64
    *,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    ignore_index: int = -100,
    extra_outputs: tuple[str, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Returns ``(logprobs [N], entropy [N], extras)`` in float64, differentiable w.r.t.
    hidden, weight and bias (autograd through the materialized logits); ``extras`` maps each
    name of ``extra_outputs`` to its ``[N]`` tensor (``is_top1`` bool)."""
    softcap = float(logit_softcap or 0.0)
    y = logits64(hidden, weight, bias, logit_scale)
    z = token_reference._scaled(y, temperature, softcap)
    labels = labels.long()
    log_p = torch.log_softmax(z, dim=-1)
    ignored = labels == ignore_index
    safe = torch.where(ignored, torch.zeros_like(labels), labels)
    logp = torch.clamp(log_p.gather(1, safe[:, None])[:, 0], max=0.0)
    logp = torch.where(ignored, torch.zeros_like(logp), logp)
    p = log_p.exp()
    entropy = -torch.where(p == 0, torch.zeros_like(p), p * log_p).sum(-1)  # a NaN logit: NaN
    extras = {}
    for name in extra_outputs:
        if name == "log_sum_sq_probs":
            extras[name] = torch.logsumexp(2 * log_p, dim=-1).detach()
        elif name == "mean_logits":
            extras[name] = z.mean(-1).detach()
        elif name == "is_top1":
            extras[name] = (z.argmax(-1) == labels) & ~ignored
        else:
            raise ValueError(f"extra_outputs: unknown name {name!r}, expected some of {EXTRA_OUTPUTS}")
    return logp, entropy, extras
