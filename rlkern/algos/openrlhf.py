"""OpenRLHF 0.11.2's log-prob, entropy, KL and loss functions with its own signatures, computed by
rlkern's kernels.

Each name matches OpenRLHF's and takes the same arguments. ``out_dtype`` is rlkern's
keyword-only addition, spelled and meant as in TRL's drop-ins (``rlkern.selective_log_softmax``):
None (default) returns OpenRLHF's dtypes; a float dtype returns that dtype, computed unrounded
(float32, float64 for float64 inputs) and rounded once. A bad value raises TypeError.

- ``log_probs_from_logits(logits, labels, temperature=1.0)`` (``openrlhf.models.utils``):
  ``rlkern.token_logprobs``; dtype of the logits (OpenRLHF computes bfloat16/float16 logits in
  their own dtype, rlkern in float32 and rounds). A temperature != 1 divides ``logits`` in place
  first, as OpenRLHF does (its callers may read the scaled logits afterwards).
- ``compute_entropy(logits)`` (``openrlhf.models.utils``, which OpenRLHF wraps in
  ``torch.compile``): ``rlkern.entropy_from_logits``; dtype of the logits.
- ``compute_approx_kl(log_probs, log_probs_base, log_probs_old=None, kl_estimator="k1",
  unbiased_gradient=False)`` (``openrlhf.models.utils``): ``rlkern.kl_penalty`` on the float32
  log-probs, always float32 as OpenRLHF. OpenRLHF clamps every estimator's value to [-10, 10]
  (k3 after bounding the log-ratio below at -10); rlkern's k3 has the same bounds where they
  matter (its log-ratio bound of 20 only cuts where the value is already at 10), k1 and k2 get
  the clamp here. ``unbiased_gradient`` keeps the value and takes k2's gradient (rlkern's
  ``"k3+"`` form) times OpenRLHF's detached importance weight ``min(exp(lp - lp_old), 10)``;
  the value is the estimator's exactly (OpenRLHF's ``v + g - g`` rounds at the scale of ``g``).
- ``ValueLoss(clip_eps=None, token_level_loss=True)`` (``openrlhf.models.loss``): its forward
  ``(values, old_values, returns, action_mask, dp_size, batch_num_tokens, global_batch_size)``
  through ``rlkern.value_loss`` / ``rlkern.aggregate``; an empty mask gives 0 (OpenRLHF: NaN).
- ``PolicyLoss``: ``rlkern.algos.policy_loss.PolicyLoss``, re-exported.

OpenRLHF's ``DPOLoss`` is not here yet (TODO: rlkern's preference ops).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlkern.algos.policy_loss import PolicyLoss, openrlhf_agg_dtype, promote, to_peer_dtype, wide_dtype
from rlkern.ops import _checks
from rlkern.ops._layout import out_dtype as wide_of
from rlkern.ops.logprobs import entropy_from_logits, token_logprobs
from rlkern.ops.policy_loss import aggregate, kl_penalty, value_loss

__all__ = ["PolicyLoss", "ValueLoss", "compute_approx_kl", "compute_entropy", "log_probs_from_logits"]

# OpenRLHF 0.11.2 models/utils.py: every estimator's value is clamped to [-10, 10] and the
# importance weight of the unbiased KL gradient to <= 10 (its KL_IS_WEIGHT_CLIP).
_KL_BOUND = 10.0
_KL_IS_WEIGHT_CLIP = 10.0
_KL_ESTIMATORS = ("k1", "k2", "k3")


def _rows(logits: Tensor) -> tuple[Tensor, tuple]:
    """token_logprobs takes [N, V] or [B, T, V] with a contiguous last dim; OpenRLHF takes any."""
    lead = tuple(logits.shape[:-1])
    if logits.ndim not in (2, 3):
        logits = logits.reshape(-1, logits.shape[-1])
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return logits, lead


def log_probs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0, *,
                          out_dtype: torch.dtype | None = None) -> Tensor:
    """OpenRLHF's ``log_probs_from_logits``: log softmax(logits) at ``labels``, shape of ``labels``.

    ``logits`` ``[..., V]`` float16/bfloat16/float32/float64, ``labels`` int64 ``logits.shape[:-1]``.
    Returns the dtype of ``logits`` (``out_dtype``: that dtype).
    """
    _checks.out_dtype("log_probs_from_logits", out_dtype, "OpenRLHF")
    if temperature != 1.0:
        logits.div_(temperature)
    rows, lead = _rows(logits)
    out = token_logprobs(rows, labels.reshape(rows.shape[:-1])).reshape(lead)
    return to_peer_dtype(out, logits.dtype, out_dtype)


def compute_entropy(logits: Tensor, *, out_dtype: torch.dtype | None = None) -> Tensor:
    """OpenRLHF's ``compute_entropy``: entropy of softmax(logits), ``logits.shape[:-1]``, dtype of
    ``logits`` (``out_dtype``: that dtype)."""
    _checks.out_dtype("compute_entropy", out_dtype, "OpenRLHF")
    rows, lead = _rows(logits)
    # rlkern's unrounded result (fp32, fp64 for fp64 logits), rounded once.
    entropy = entropy_from_logits(rows, out_dtype=wide_of(logits)).reshape(lead)
    return to_peer_dtype(entropy, logits.dtype, out_dtype)


def compute_approx_kl(log_probs: Tensor, log_probs_base: Tensor, log_probs_old: Tensor | None = None,
                      kl_estimator: str = "k1", unbiased_gradient: bool = False) -> Tensor:
    """OpenRLHF's ``compute_approx_kl``: per-token KL estimate, shape of ``log_probs``, float32.

    ``kl_estimator`` k1 (lp - base), k2 ((lp - base)^2 / 2), k3 (e^(base - lp) - (base - lp) - 1),
    each clamped to [-10, 10]; ``unbiased_gradient`` as OpenRLHF (see the module docstring).
    """
    if kl_estimator not in _KL_ESTIMATORS:
        raise ValueError(f"compute_approx_kl: kl_estimator must be one of {_KL_ESTIMATORS}, got {kl_estimator!r}")
    # OpenRLHF computes in float32 whatever the input dtype; float16/bfloat16 go into the kernel
    # as they are (it computes in float32), float64 is rounded first as OpenRLHF rounds it.
    lp = log_probs.float() if log_probs.dtype == torch.float64 else log_probs
    base = log_probs_base.float() if log_probs_base.dtype == torch.float64 else log_probs_base
    value = kl_penalty(lp, base, kl_estimator=kl_estimator + "+" if unbiased_gradient else kl_estimator)
    if kl_estimator != "k3":  # rlkern's k1 / k2 are unclamped (verl's kl / mse)
        value = value.clamp(-_KL_BOUND, _KL_BOUND) if not unbiased_gradient else _clamp_value(value)
    if not unbiased_gradient or log_probs_old is None:
        return value
    with torch.no_grad():
        weight = (log_probs.float() - log_probs_old.float()).exp().clamp(max=_KL_IS_WEIGHT_CLIP)
    detached = value.detach()
    return detached + weight * (value - detached)  # value unchanged, gradient times the weight


def _clamp_value(value: Tensor) -> Tensor:
    # straight-through: clamp the value, keep the (k2) gradient unclamped, as OpenRLHF does
    detached = value.detach()
    return value - detached + detached.clamp(-_KL_BOUND, _KL_BOUND)


class ValueLoss(torch.nn.Module):
    """Drop-in for ``openrlhf.models.loss.ValueLoss``: ``0.5 * aggregate(max((v - R)^2,
    (v_old + clamp(v - v_old, -c, c) - R)^2))`` (no clip when ``clip_eps`` is None), token mean
    or per-sample mean with OpenRLHF's global normalizers. Returns the loss in OpenRLHF's dtype
    (``out_dtype``: that dtype)."""

    def __init__(self, clip_eps: float | None = None, token_level_loss: bool = True, *,
                 out_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        _checks.out_dtype("ValueLoss", out_dtype, "OpenRLHF")
        self.clip_eps = clip_eps
        self.token_level_loss = token_level_loss
        self.out_dtype = out_dtype

    def _out_dtype(self, wide: torch.dtype) -> torch.dtype | None:
        """As ``PolicyLoss._out_dtype`` (``rlkern.algos.policy_loss``)."""
        return self.out_dtype

    def forward(self, values: Tensor, old_values: Tensor, returns: Tensor, action_mask: Tensor | None = None,
                dp_size: int = 1, batch_num_tokens: float | None = None,
                global_batch_size: float | None = None) -> Tensor:
        mask = action_mask if action_mask is not None else torch.ones_like(values, dtype=torch.bool)
        norm = batch_num_tokens if self.token_level_loss else global_batch_size
        kw = dict(agg="token-mean" if self.token_level_loss else "seq-mean-token-mean",
                  dp_size=dp_size if norm is not None else 1,  # OpenRLHF ignores dp_size without its normalizer
                  global_tokens=batch_num_tokens if self.token_level_loss else None,
                  global_seqs=None if self.token_level_loss else global_batch_size)
        if self.clip_eps is not None:
            loss, _ = value_loss(values, returns, old_values, mask, cliprange_value=self.clip_eps, **kw)
            per_token = promote(values.dtype, old_values.dtype, returns.dtype)
        else:
            diff = values.float() - returns.float() if values.dtype in (torch.float16, torch.bfloat16) else values - returns
            loss = 0.5 * aggregate(diff.square(), mask, **kw)
            per_token = promote(values.dtype, returns.dtype)
        out_dtype = self._out_dtype(wide_dtype(values, old_values, returns))
        return to_peer_dtype(loss, openrlhf_agg_dtype(per_token, action_mask, self.token_level_loss, norm), out_dtype)

