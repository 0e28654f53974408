"""Per-token KL estimates (``kl_penalty``), loss aggregation (``aggregate``, verl's ``agg_loss``)
and the clipped value loss (``value_loss``)."""

from __future__ import annotations

import torch
from torch import Tensor

from rlkern import _backend
from rlkern.ops import _checks
from rlkern.ops._layout import out_dtype, segment_ids
from rlkern.ops.policy_loss import _config
from rlkern.ops.policy_loss._autograd import NONE, opt, seq_weights
from rlkern.reference import policy_loss as reference


# --- kl_penalty ------------------------------------------------------------------------------


# Every backend takes the custom ops' arguments and returns their outputs: the C++ kernels
# (csrc/policy_loss.cpp), the Triton kernels (kernels/policy_loss.py) and the reference below.


def _kl_reference(logprobs: Tensor, ref_logprobs: Tensor, kl_estimator: str) -> Tensor:
    cdt = out_dtype(logprobs)
    return reference.kl_penalty(logprobs.to(cdt), ref_logprobs.to(cdt), kl_estimator)


def _kl_reference_backward(grad: Tensor, logprobs: Tensor, ref_logprobs: Tensor, kl_estimator: str) -> Tensor:
    cdt = out_dtype(logprobs)
    value, vjp = torch.func.vjp(lambda lp: reference.kl_penalty(lp, ref_logprobs.to(cdt), kl_estimator), logprobs.to(cdt))
    # .clone(): for k1 the vjp hands back the cotangent itself, and an op's output may not alias an input
    return vjp(grad.to(value.dtype))[0].to(logprobs.dtype).clone()


_KL = _backend.Kernels("kl_penalty", cpp="cpp_kl_penalty", triton="policy_loss.kl_penalty", torch=_kl_reference,
                       fp64=("cpp", "triton"))
_KL_BACKWARD = _backend.Kernels("kl_penalty", cpp="cpp_kl_penalty_backward", triton="policy_loss.kl_penalty_backward",
                                torch=_kl_reference_backward, fp64=("cpp", "triton"))


@torch.library.custom_op("rlkern::kl_penalty", mutates_args=())
def _kl_fwd(logprobs: Tensor, ref_logprobs: Tensor, kl_estimator: str) -> Tensor:
    return _KL.pick(logprobs)(logprobs, ref_logprobs, kl_estimator)


@_kl_fwd.register_fake
def _kl_fake(logprobs, ref_logprobs, kl_estimator):
    return torch.empty_like(logprobs, dtype=out_dtype(logprobs))


@torch.library.custom_op("rlkern::kl_penalty_backward", mutates_args=())
def _kl_bwd(grad: Tensor, logprobs: Tensor, ref_logprobs: Tensor, kl_estimator: str) -> Tensor:
    return _KL_BACKWARD.pick(logprobs)(grad, logprobs, ref_logprobs, kl_estimator)


@_kl_bwd.register_fake
def _kl_bwd_fake(grad, logprobs, ref_logprobs, kl_estimator):
    return torch.empty_like(logprobs)


def _kl_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.estimator = inputs[2]


def _kl_backward(ctx, grad):
    logprobs, ref_logprobs = ctx.saved_tensors
    return _kl_bwd(grad, logprobs, ref_logprobs, ctx.estimator), None, None


_kl_fwd.register_autograd(_kl_backward, setup_context=_kl_setup)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, *, kl_estimator: str = "k3") -> Tensor:
    """Per-token KL estimate between the policy and a reference (verl 0.9.1's ``kl_penalty``).

    Args:
        logprobs: any shape, float16/bfloat16/float32/float64; differentiable.
        ref_logprobs: same shape as ``logprobs``.
        kl_estimator: ``k1``/``kl`` (lp - ref), ``abs``, ``k2``/``mse`` (0.5 (lp - ref)^2),
            ``k3``/``low_var_kl`` (e^(ref - lp) - (ref - lp) - 1 with the log-ratio clamped to
            [-20, 20] and the value to [-10, 10], as verl), ``k3_unclamped`` (the same without
            bounds: TRL 1.16's beta term), each optionally with ``+`` (the value of the estimator
            with the gradient of k2, verl's straight-through form). Default k3, as ``policy_loss``
            (verl's ``kl_loss_type="low_var_kl"``).

    Returns:
        The estimate, shape of ``logprobs``, float32 (float64 for float64 input).
    """
    _checks.tensors("kl_penalty", "logprobs", {"logprobs": (logprobs, "float"), "ref_logprobs": (ref_logprobs, "float")},
                    shape=tuple(logprobs.shape) if isinstance(logprobs, Tensor) else None)
    _config.check_kl_estimator("kl_penalty", kl_estimator)
    return _kl_fwd(logprobs, ref_logprobs, kl_estimator)


# --- aggregate --------------------------------------------------------------------------------


def _segment_sums(values: Tensor, cu_seqlens: Tensor | None) -> Tensor:
    if cu_seqlens is None:
        return values.sum(-1)
    return values.new_zeros(cu_seqlens.numel() - 1).index_add_(0, segment_ids(cu_seqlens, values.numel()), values)


def _width(values: Tensor, cu_seqlens: Tensor | None) -> int:
    return 1 if cu_seqlens is not None else values.shape[-1]


def _agg_parts(values, mask, cu_seqlens, agg, dp_size, global_tokens, global_seqs, loss_scale_factor):
    cdt = out_dtype(values)
    m = torch.ones_like(values, dtype=cdt) if mask is None else mask.to(cdt)
    kept = torch.where(m != 0, values.to(cdt), torch.zeros((), dtype=cdt, device=values.device)) * m
    counts = _segment_sums(m, cu_seqlens)
    w = seq_weights(counts, agg, _width(values, cu_seqlens), dp_size, global_tokens, global_seqs,
                     opt(loss_scale_factor))
    return kept, m, w


def _agg_reference(values: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None, global_tokens: Tensor | None,
                   global_seqs: Tensor | None, agg: str, dp_size: float, loss_scale_factor: float) -> Tensor:
    kept, _, w = _agg_parts(values, mask, cu_seqlens, agg, dp_size, global_tokens, global_seqs, loss_scale_factor)
    return (w * _segment_sums(kept, cu_seqlens)).sum()


def _agg_reference_backward(grad: Tensor, values: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None,
                            global_tokens: Tensor | None, global_seqs: Tensor | None, agg: str, dp_size: float,
                            loss_scale_factor: float) -> Tensor:
    _, m, w = _agg_parts(values, mask, cu_seqlens, agg, dp_size, global_tokens, global_seqs, loss_scale_factor)
    if cu_seqlens is None:
        per_token = w[:, None].expand_as(m)
    else:
        per_token = w[segment_ids(cu_seqlens, values.numel())]
    return (torch.where(m != 0, m, torch.zeros_like(m)) * per_token * grad).to(values.dtype)


_AGG = _backend.Kernels("aggregate", cpp="cpp_aggregate", triton="policy_loss.aggregate", torch=_agg_reference,
                        fp64=("cpp", "triton"))
_AGG_BACKWARD = _backend.Kernels("aggregate", cpp="cpp_aggregate_backward", triton="policy_loss.aggregate_backward",
                                 torch=_agg_reference_backward, fp64=("cpp", "triton"))


@torch.library.custom_op("rlkern::aggregate", mutates_args=())
def _agg_fwd(values: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None, global_tokens: Tensor | None,
             global_seqs: Tensor | None, agg: str, dp_size: float, loss_scale_factor: float) -> Tensor:
    return _AGG.pick(values)(values, mask, cu_seqlens, global_tokens, global_seqs, agg, dp_size, loss_scale_factor)


@_agg_fwd.register_fake
def _agg_fake(values, mask, cu_seqlens, global_tokens, global_seqs, agg, dp_size, loss_scale_factor):
    return values.new_empty((), dtype=out_dtype(values))


@torch.library.custom_op("rlkern::aggregate_backward", mutates_args=())
def _agg_bwd(grad: Tensor, values: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None,
             global_tokens: Tensor | None, global_seqs: Tensor | None, agg: str, dp_size: float,
             loss_scale_factor: float) -> Tensor:
    return _AGG_BACKWARD.pick(values)(grad, values, mask, cu_seqlens, global_tokens, global_seqs, agg, dp_size,
                                      loss_scale_factor)


@_agg_bwd.register_fake
def _agg_bwd_fake(grad, values, mask, cu_seqlens, global_tokens, global_seqs, agg, dp_size, loss_scale_factor):
    return torch.empty_like(values)


def _agg_setup(ctx, inputs, output):
    values, mask, cu_seqlens, global_tokens, global_seqs, agg, dp_size, lsf = inputs
    ctx.save_for_backward(values, mask, cu_seqlens, global_tokens, global_seqs)
    ctx.config = (agg, dp_size, lsf)


def _agg_backward(ctx, grad):
    saved = ctx.saved_tensors
    return (_agg_bwd(grad, *saved, *ctx.config),) + (None,) * 7


_agg_fwd.register_autograd(_agg_backward, setup_context=_agg_setup)


def _check_aggregate(values, response_mask, cu_seqlens, op: str = "aggregate", main: str = "values") -> None:
    """``aggregate``'s layout checks, in the words of ``op`` whose per-token tensor ``main`` is."""
    _checks.tensors(op, main, {main: (values, "float"), "response_mask": (response_mask, "mask")},
                    shape=tuple(values.shape) if isinstance(values, Tensor) else None)
    if cu_seqlens is not None:
        if values.ndim != 1:
            raise ValueError(f"{op}: packed input (cu_seqlens given) needs {main} [total], got shape "
                             f"{tuple(values.shape)}")
        _checks.cu_seqlens(op, cu_seqlens, values.numel(), values.device, main)
        return
    if values.ndim != 2:
        raise ValueError(f"{op}: {main} must be [B, T] (or [total] with cu_seqlens), got shape {tuple(values.shape)}")
    if response_mask is None:
        raise ValueError(f"{op}: response_mask is required for padded [B, T] values, got None")


def aggregate(
    values: Tensor,
    response_mask: Tensor | None,
    *,
    agg: str = "token-mean",
    global_tokens: int | float | Tensor | None = None,
    global_seqs: int | float | Tensor | None = None,
    dp_size: int = 1,
    loss_scale_factor: float | None = None,
    cu_seqlens: Tensor | None = None,
) -> Tensor:
    """Reduce per-token values to a scalar loss: verl 0.9.1's ``agg_loss``, also packed.

    Args:
        values: ``[B, T]`` (or packed ``[total]`` with ``cu_seqlens``), floating point;
            differentiable.
        response_mask: like ``values``, bool/int/float; None only for packed input (all tokens count).
        agg: ``token-mean`` (verl default), ``token-sum``, ``seq-mean-token-sum``,
            ``seq-mean-token-mean``, ``seq-mean-token-sum-norm``, or a TRL preset (``grpo``,
            ``bnpo``, ``dr_grpo``, ``dapo``), as in ``policy_loss``.
        global_tokens, global_seqs, dp_size, loss_scale_factor: verl's global normalizers, as in
            ``policy_loss``.
        cu_seqlens: ``[B + 1]`` int32/int64 for packed input.

    Returns:
        0-dim float32 tensor (float64 for float64 input); 0 for an empty mask (verl: NaN for
        token-mean).
    """
    _check_aggregate(values, response_mask, cu_seqlens)
    _checks.choice("aggregate", "agg", agg, _config.AGG_MODES + _config.TRL_AGG_PRESETS)
    packed = cu_seqlens is not None
    n_seqs = cu_seqlens.numel() - 1 if packed else values.shape[0]
    resolved = _config.aggregation("aggregate", agg, None, n_seqs, None if packed else values.shape[1], packed,
                                   dp_size, global_tokens, global_seqs, loss_scale_factor)
    return _agg_fwd(values, response_mask, cu_seqlens, _scalar(global_tokens, values.device),
                    _scalar(resolved.global_seqs, values.device), resolved.agg, float(dp_size),
                    NONE if resolved.loss_scale_factor is None else float(resolved.loss_scale_factor))


def _scalar(x, device) -> Tensor | None:
    if x is None or isinstance(x, Tensor):
        return x
    return torch.tensor(float(x), dtype=torch.float64, device=device)


def value_loss(
    vpreds: Tensor,
    returns: Tensor,
    values: Tensor,
    response_mask: Tensor | None,
    *,
    cliprange_value: float = 0.5,
    agg: str = "token-mean",
    global_tokens=None,
    global_seqs=None,
    dp_size: int = 1,
    loss_scale_factor: float | None = None,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss (verl 0.9.1 ``compute_value_loss``, OpenRLHF ``ValueLoss``).

    ``0.5 * agg(max((v - R)^2, (clamp(v, v_old - c, v_old + c) - R)^2))``.

    Args:
        vpreds: ``[B, T]`` (or packed), the value head's predictions; differentiable.
        returns: like ``vpreds``: the targets R.
        values: like ``vpreds``: the values at rollout time (the clip centre).
        response_mask: like ``vpreds``.
        cliprange_value: c (verl's critic ``cliprange_value`` 0.5).
        agg, global_tokens, global_seqs, dp_size, loss_scale_factor, cu_seqlens: as in
            ``aggregate``.

    Returns:
        ``(loss, metrics)``: ``loss`` a 0-dim float32 tensor (float64 for float64 input);
        ``metrics`` ``{"clipfrac": ...}``, verl's ``vf_clipfrac`` (token mean, 0-dim float32).
    """
    op = "value_loss"
    _checks.tensors(op, "vpreds", {"vpreds": (vpreds, "float"), "returns": (returns, "float"),
                                   "values": (values, "float")},
                    shape=tuple(vpreds.shape) if isinstance(vpreds, Tensor) else None)
    cliprange_value = _checks.number(op, "cliprange_value", cliprange_value, low=0)
    # aggregate's checks in value_loss's words (the calls below would report them as aggregate's)
    _check_aggregate(vpreds, response_mask, cu_seqlens, op, "vpreds")
    _checks.choice(op, "agg", agg, _config.AGG_MODES + _config.TRL_AGG_PRESETS)
    _config.check_numbers(op, dp_size, global_tokens, global_seqs, loss_scale_factor)
    cdt = out_dtype(vpreds)
    # NaN/inf in padding would reach vpreds' gradient there (max/clamp backward of NaN): zero it
    v, ret, old = (_checks.zero_masked(t, response_mask).to(cdt) for t in (vpreds, returns, values))
    clipped = torch.maximum(torch.minimum(v, old + cliprange_value), old - cliprange_value)
    l1, l2 = (v - ret).square(), (clipped - ret).square()
    loss = 0.5 * aggregate(torch.maximum(l1, l2), response_mask, agg=agg, global_tokens=global_tokens,
                           global_seqs=global_seqs, dp_size=dp_size, loss_scale_factor=loss_scale_factor,
                           cu_seqlens=cu_seqlens)
    frac = aggregate((l2 > l1).to(cdt), response_mask, agg="token-mean", cu_seqlens=cu_seqlens).detach()
    return loss, {"clipfrac": frac.to(torch.float32)}
