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

``logits_dtype`` (bfloat16/float16) models a GEMM in that dtype, as TRL's fused head runs
under autocast: ``h`` and ``W`` are rounded to it, ``x = round(round(h W^T) + round(b))`` (the
product exact in float64, then rounded once), ``logit_scale * x`` and the rest in float64; in
the backward ``d loss / d x`` is rounded to it before the exact products with the rounded ``h``
and ``W``. Each rounding passes the gradient straight through otherwise.

``lora=(A, B, scaling, x)``: a LoRA adapter on the head (PEFT's ``lora.Linear``) adds
``scaling * (x A^T) B^T`` to ``h W^T + b`` before ``logit_scale``; ``x`` is the input of the A
path (PEFT's ``dropout(h)``), ``h`` itself when None. Always exact (no rounding model).
"""

from __future__ import annotations

import torch

from rlkern.reference import logprobs as token_reference

EXTRA_OUTPUTS = ("log_sum_sq_probs", "mean_logits", "is_top1")


def _round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` rounded to ``dtype`` (nearest even), as float64; the gradient passes unchanged."""
    return x + (x.detach().to(dtype).to(torch.float64) - x.detach())


class _RoundGrad(torch.autograd.Function):
    """Identity whose backward rounds the incoming gradient to ``dtype``."""

    @staticmethod
    def forward(ctx, x, dtype):
        ctx.dtype = dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype).to(grad.dtype), None


def logits64(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             logit_scale: float, logits_dtype: torch.dtype | None = None, lora=None) -> torch.Tensor:
    """``logit_scale * (h W^T + b)`` in float64, ``[N, V]`` (before softcap and temperature);
    with ``logits_dtype``, the rounded GEMM of the module docstring; with ``lora``, the adapter's
    term added (exact)."""
    h, w = hidden.to(torch.float64), weight.to(torch.float64)
    if logits_dtype is None or lora is not None:
        y = h @ w.T
        if bias is not None:
            y = y + bias.to(torch.float64)
        if lora is not None:
            a, b, scaling, x = lora
            x = h if x is None else x.to(torch.float64)
            y = y + scaling * ((x @ a.to(torch.float64).T) @ b.to(torch.float64).T)
        return y * logit_scale
    y = _round(_round(h, logits_dtype) @ _round(w, logits_dtype).T, logits_dtype)
    if bias is not None:
        y = _round(y + _round(bias.to(torch.float64), logits_dtype), logits_dtype)
    return _RoundGrad.apply(y, logits_dtype) * logit_scale


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
    logits_dtype: torch.dtype | None = None,
    lora: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Returns ``(logprobs [N], entropy [N], extras)`` in float64, differentiable w.r.t.
    hidden, weight and bias (autograd through the materialized logits); ``extras`` maps each
    name of ``extra_outputs`` to its ``[N]`` tensor (``is_top1`` bool). ``logits_dtype``: the
    rounded GEMM of the module docstring (None: exact). ``lora``: ``(A [r, H], B [V, r], scaling,
    x [N, H] or None)``, differentiable w.r.t. A, B and x too."""
    softcap = float(logit_softcap or 0.0)
    y = logits64(hidden, weight, bias, logit_scale, logits_dtype, lora)
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
