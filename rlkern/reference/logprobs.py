"""Plain-PyTorch reference of the token log-prob family: the oracle of every kernel.

Math, for one row of logits ``z [V]`` and label ``y``:

    u      = softcap(z) / T               softcap(z) = c * tanh(z / c), or z when off
    lse    = log sum_j exp(u_j)
    logp   = min(u_y - lse, 0)            0 where y == ignore_index
    H      = lse - sum_j p_j u_j          p = exp(u - lse), terms with p_j == 0 count 0

A row whose logits are all -inf has no distribution; rlkern takes the limit of equal logits
(uniform): logp = -log V, H = log V, and a zero gradient. Its ``lse`` is stored as -inf so the
backward can recognise it.

Forward values are computed relative to the row max m (logp = (u_y - m) - log s), so they keep
fp32 accuracy at |logits| ~ 1e4. The backward recomputes p = exp(u - lse) from the saved
``lse``, stored in float64 by every backend: an fp32 lse would bound the relative error of p by
ulp(lse) (2e-6 at lse ~ 30, 1e-3 at lse ~ 1e4), several times PyTorch's own fp32 error.

Gradients (with g_l = dL/dlogp, g_H = dL/dH):

    dL/du_j = g_l * ([j == y] - p_j) - g_H * p_j * (u_j - lse + H)
    dL/dz_j = dL/du_j / T * (1 - tanh(z_j / c)^2)     (last factor only with softcap)

Computes in float64 whatever the input dtype (the oracle must be exact; as the fallback it
costs [N, V] float64 temporaries), returns float32 outputs (float64 for float64 input) and
grads in the logits' dtype; any device.
"""

from __future__ import annotations

import math

import torch


def _out_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _scaled(logits: torch.Tensor, temperature: float, softcap: float) -> torch.Tensor:
    z = logits.to(torch.float64)
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def logprobs_fwd(
    logits: torch.Tensor,  # (N, V) any float dtype, last dim contiguous or not
    labels: torch.Tensor,  # (N,) int32/int64
    temperature: float,
    softcap: float,  # 0.0 = off
    ignore_index: int,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(logprobs [N], entropy [N] or [0])`` float32 (float64 for float64 input) and
    ``lse [N]`` float64 (every backend stores it so: the backward's p needs its digits)."""
    n, vocab = logits.shape
    u = _scaled(logits, temperature, softcap)
    if vocab == 0:
        u = u.new_full((n, 1), -math.inf)
    # Everything relative to the row max: u - lse and lse - sum(p u) cancel badly in fp32 when
    # |u| is large, (u - m) - log s does not.
    m = u.max(dim=-1).values
    dead = torch.isneginf(m)  # all -inf row: uniform by convention
    shifted = u - torch.where(dead, torch.zeros_like(m), m)[:, None]
    log_s = torch.logsumexp(shifted, dim=-1)
    lse = torch.where(dead, m, m + log_s)
    labels = labels.long()
    ignored = labels == ignore_index
    in_range = (labels >= 0) & (labels < vocab)
    safe = torch.where(in_range, labels, torch.zeros_like(labels))
    logp = torch.clamp(shifted.gather(1, safe[:, None])[:, 0] - log_s, max=0.0)
    logp = torch.where(dead, torch.full_like(logp, -math.log(max(vocab, 1))), logp)
    logp = torch.where(in_range, logp, torch.full_like(logp, math.nan))
    logp = torch.where(ignored, torch.zeros_like(logp), logp)
    if with_entropy:
        log_p = shifted - log_s[:, None]
        p = torch.exp(log_p)
        entropy = -torch.where(p == 0, torch.zeros_like(p), p * log_p).sum(-1)  # a NaN logit: NaN
        entropy = entropy.clamp(min=0.0)  # NaN stays NaN
        entropy = torch.where(dead, torch.full_like(entropy, math.log(max(vocab, 1))), entropy)
    else:
        entropy = u.new_empty(0)
    out = _out_dtype(logits)
    return logp.to(out), entropy.to(out), lse


def logprobs_bwd(
    grad_logprobs: torch.Tensor,  # (N,)
    grad_entropy: torch.Tensor | None,  # (N,) or None
    logits: torch.Tensor,  # (N, V)
    labels: torch.Tensor,  # (N,)
    lse: torch.Tensor,  # (N,) float64 from the forward
    entropy: torch.Tensor | None,  # (N,) from the forward; needed when grad_entropy is given
    temperature: float,
    softcap: float,
    ignore_index: int,
) -> torch.Tensor:
    """Returns d loss / d logits ``[N, V]`` in the logits' dtype."""
    n, vocab = logits.shape
    u = _scaled(logits, temperature, softcap)
    lse = lse.to(torch.float64)
    dead = torch.isneginf(lse)
    log_p_all = u - torch.where(dead, torch.zeros_like(lse), lse)[:, None]
    p = torch.where(dead[:, None], torch.zeros_like(u), torch.exp(log_p_all))
    labels = labels.long()
    live = (labels != ignore_index) & (labels >= 0) & (labels < vocab) & ~dead
    g_l = torch.where(live, grad_logprobs.double(), torch.zeros((), dtype=torch.float64, device=u.device))
    onehot = torch.zeros_like(u)
    onehot.scatter_(1, torch.where(live, labels, torch.zeros_like(labels))[:, None], 1.0)
    onehot = onehot * live[:, None]
    grad_u = g_l[:, None] * (onehot - p)
    if grad_entropy is not None:
        log_p = torch.where(p > 0, log_p_all, torch.zeros_like(u))
        grad_u = grad_u - grad_entropy.double()[:, None] * p * (log_p + entropy.double()[:, None])
    grad_z = grad_u / temperature
    if softcap > 0:
        grad_z = grad_z * (1 - torch.tanh(logits.double() / softcap) ** 2)
    return grad_z.to(logits.dtype)
