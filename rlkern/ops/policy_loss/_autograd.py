"""policy_loss's custom ops: the forward / backward pair, their autograd, and the backends.

Every backend takes the same arguments and returns the same tensors: the C++ kernel (CPU,
csrc/policy_loss.cpp), the Triton kernels (GPU, kernels/policy_loss.py) and the reference
(rlkern/reference/policy_loss.py, differentiated with torch.func.vjp for the backward). The
hyper-parameters travel as one float list in the named order of
``rlkern.reference.policy_loss.HYPER_FIELDS``; the per-sequence statistics the kernels emit
have the columns of ``STAT_FIELDS``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rlkern import _backend
from rlkern.ops._layout import out_dtype, pad
from rlkern.reference import policy_loss as reference

KERNEL_LOSSES = ("ppo", "gspo", "cispo", "reinforce", "gpg", "sapo", "dro", "dppo_tv", "dppo_kl", "clip_cov",
                 "kl_cov", "geo_mean")
METRIC_KEYS = reference.METRIC_KEYS
# Columns of the per-sequence partial sums the kernels emit, stats [B + 1, N_STATS]: row b < B is
# a sum over sequence b's tokens of mask * value, except SLR (the sequence's mean log-ratio, for
# GSPO and level="sequence"), DSEQ (level="sequence" ppo / sapo: sum of mask * is_weights *
# d loss / d log-ratio, which the backward spreads over the sequence) and, for geo_mean, POLICY
# (the sequence's loss); row B holds (sum of the mask, number of non-empty sequences), the local
# normalizers.
(S_POLICY, S_ENTROPY, S_KL, S_COUNT, S_CF, S_LO, S_HI, S_DCF, S_AKL, S_RATIO, S_SLR, S_DSEQ) = (
    reference.STAT_FIELDS.index(name) for name in (
        "policy", "entropy", "kl", "count", "clipfrac", "clipfrac_low", "clipfrac_high", "dual_clipfrac", "approx_kl",
        "ratio", "seq_log_ratio", "seq_grad"))
N_STATS = len(reference.STAT_FIELDS)
# Indices into the float hyper-parameter list of the custom ops. H_GTOK / H_GSEQ: global_tokens /
# global_seqs given as numbers (a number stays a kernel argument: a tensor made from it on the GPU
# would be a host-to-device copy in every step, which CUDA graphs cannot capture); NaN when not
# given or given as a tensor (then the global_tokens / global_seqs tensor arguments).
(H_CLIP_LOW, H_CLIP_HIGH, H_DUAL, H_KL_COEF, H_ENT_COEF, H_DP, H_LSF, H_TAU_POS, H_TAU_NEG, H_DRO_BETA,
 H_PPO_KL_COEF, H_GTOK, H_GSEQ, H_KL_BIAS) = (reference.HYPER_FIELDS.index(name) for name in (
    "clip_low", "clip_high", "dual_clip", "kl_coef", "entropy_coef", "dp_size", "loss_scale_factor", "tau_pos",
    "tau_neg", "dro_beta", "ppo_kl_coef", "global_tokens", "global_seqs", "kl_bias_correction"))
NONE = math.nan  # "not given" in the float list


def opt(x: float) -> float | None:
    return None if math.isnan(x) else x


def seq_weights(counts: Tensor, agg: str, width: int, dp_size: float, global_tokens: Tensor | None,
                 global_seqs: Tensor | None, loss_scale_factor: float | None) -> Tensor:
    """d agg / d (masked token sum of sequence b), [B]: every mode is linear in those sums."""
    dtype = counts.dtype

    def safe(d):
        d = d.to(dtype)
        return torch.where(d == 0, torch.ones_like(d), d)

    if agg == "token-mean":
        n = counts.sum() if global_tokens is None else global_tokens
        return (dp_size / safe(n)).expand_as(counts)
    if agg == "token-sum":
        return torch.full_like(counts, dp_size)
    live = (counts > 0).to(dtype)
    g = live.sum() if global_seqs is None else global_seqs
    w = live * (dp_size / safe(g))
    if agg == "seq-mean-token-mean":
        w = w / (counts + reference._MEAN_EPS)
    elif agg == "seq-mean-token-sum-norm":
        w = w / (width if loss_scale_factor is None else loss_scale_factor)
    return w


def _reference_loss(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, is_weights, select, cu_seqlens,
                    global_tokens, global_seqs, loss, agg, entropy_agg, kl_estimator, level, hyper):
    """The reference on padded tensors (packed input is padded first); differentiable."""
    if cu_seqlens is not None:
        width = max(int(cu_seqlens.diff().max()) if cu_seqlens.numel() > 1 else 0, 1)
        padded = lambda t: pad(t, cu_seqlens, width)  # noqa: E731
        if advantages.shape == logprobs.shape:
            advantages = padded(advantages)
        mask = padded(torch.ones_like(logprobs) if mask is None else mask.to(logprobs.dtype))
        logprobs, old_logprobs, ref_logprobs, entropy, is_weights, select = map(
            padded, (logprobs, old_logprobs, ref_logprobs, entropy, is_weights, select))
    return reference.policy_loss(
        logprobs, old_logprobs, advantages, mask, loss=loss, clip_low=hyper[H_CLIP_LOW],
        clip_high=hyper[H_CLIP_HIGH], dual_clip=opt(hyper[H_DUAL]), level=level, ref_logprobs=ref_logprobs,
        kl_coef=hyper[H_KL_COEF], kl_estimator=kl_estimator, entropy=entropy, entropy_coef=hyper[H_ENT_COEF],
        agg=agg, entropy_agg=entropy_agg or None,
        global_tokens=global_tokens if global_tokens is not None else opt(hyper[H_GTOK]),
        global_seqs=global_seqs if global_seqs is not None else opt(hyper[H_GSEQ]),
        dp_size=int(hyper[H_DP]), loss_scale_factor=opt(hyper[H_LSF]), is_weights=is_weights, select=select,
        tau_pos=hyper[H_TAU_POS], tau_neg=hyper[H_TAU_NEG], dro_beta=opt(hyper[H_DRO_BETA]),
        ppo_kl_coef=hyper[H_PPO_KL_COEF], kl_bias_correction=bool(hyper[H_KL_BIAS]))


def _reference_forward(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, is_weights, select,
                       cu_seqlens, global_tokens, global_seqs, loss, agg, entropy_agg, kl_estimator, level, hyper):
    """The torch backend's forward: the kernels' contract, with no per-sequence statistics."""
    with torch.no_grad():
        total, metrics = _reference_loss(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, is_weights,
                                         select, cu_seqlens, global_tokens, global_seqs, loss, agg, entropy_agg,
                                         kl_estimator, level, hyper)
    return total, metrics, logprobs.new_zeros((0, N_STATS), dtype=out_dtype(logprobs))


def _reference_backward(grad_loss, logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, is_weights, select,
                        cu_seqlens, global_tokens, global_seqs, stats, loss, agg, entropy_agg, kl_estimator, level,
                        hyper):
    """The torch backend's backward: torch.func.vjp of the reference, which works inside a custom
    op's kernel (the dispatcher has the Autograd keys excluded there)."""
    def objective(lp, *ent):
        return _reference_loss(lp, old_logprobs, advantages, mask, ref_logprobs, ent[0] if ent else None, is_weights,
                               select, cu_seqlens, global_tokens, global_seqs, loss, agg, entropy_agg, kl_estimator,
                               level, hyper)[0]

    primals = (logprobs,) if entropy is None else (logprobs, entropy)
    total, vjp = torch.func.vjp(objective, *primals)
    grads = vjp(grad_loss.to(total.dtype).reshape(total.shape))
    grad_ent = grads[1].to(entropy.dtype) if entropy is not None else logprobs.new_empty(0)
    return grads[0].to(logprobs.dtype), grad_ent


_FORWARD = _backend.Kernels("policy_loss", cpp="cpp_policy_loss", triton="policy_loss.policy_loss_forward",
                            torch=_reference_forward, fp64=("cpp", "triton"))
_BACKWARD = _backend.Kernels("policy_loss", cpp="cpp_policy_loss_backward", triton="policy_loss.policy_loss_backward",
                             torch=_reference_backward, fp64=("cpp", "triton"))


def backend(logprobs: Tensor, loss: str) -> str:
    """The backend of a call: a kernel for the kernel losses, else the reference."""
    return _FORWARD.backend(logprobs) if loss in KERNEL_LOSSES else "torch"


def _fwd_impl(
    logprobs: Tensor,  # [B, T] or packed [total]
    old_logprobs: Tensor,  # like logprobs
    advantages: Tensor,  # like logprobs, or [B]
    mask: Tensor | None,  # like logprobs; None only when packed (all tokens count)
    ref_logprobs: Tensor | None,
    entropy: Tensor | None,
    is_weights: Tensor | None,
    select: Tensor | None,  # clip_cov / kl_cov token choice
    cu_seqlens: Tensor | None,  # [B + 1] int32/int64 when packed
    global_tokens: Tensor | None,  # 0-dim
    global_seqs: Tensor | None,  # 0-dim
    loss: str,
    agg: str,
    entropy_agg: str,
    kl_estimator: str,
    level: str,
    hyper: list[float],
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (loss [], metrics [8], per-sequence stats [B + 1, N_STATS] or [0, N_STATS])."""
    return _FORWARD.get(backend(logprobs, loss))(
        logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, is_weights, select, cu_seqlens, global_tokens,
        global_seqs, loss, agg, entropy_agg, kl_estimator, level, hyper)


_fwd = torch.library.custom_op("rlkern::policy_loss", mutates_args=())(_fwd_impl)


@_fwd.register_fake
def _fwd_fake(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, is_weights, select, cu_seqlens,
              global_tokens, global_seqs, loss, agg, entropy_agg, kl_estimator, level, hyper):
    dtype = out_dtype(logprobs)
    n_seqs = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else logprobs.shape[0]
    rows = n_seqs + 1 if backend(logprobs, loss) != "torch" else 0
    return (logprobs.new_empty((), dtype=dtype), logprobs.new_empty((8,), dtype=dtype),
            logprobs.new_empty((rows, N_STATS), dtype=dtype))


def _bwd_impl(
    grad_loss: Tensor,  # []
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor | None,
    ref_logprobs: Tensor | None,
    entropy: Tensor | None,
    is_weights: Tensor | None,
    select: Tensor | None,
    cu_seqlens: Tensor | None,
    global_tokens: Tensor | None,
    global_seqs: Tensor | None,
    stats: Tensor,  # [B + 1, N_STATS] from the forward (kernels) or [0, N_STATS] (reference)
    loss: str,
    agg: str,
    entropy_agg: str,
    kl_estimator: str,
    level: str,
    hyper: list[float],
) -> tuple[Tensor, Tensor]:
    """Returns (d loss / d logprobs like logprobs, d loss / d entropy like entropy or [0])."""
    return _BACKWARD.get(backend(logprobs, loss))(
        grad_loss, logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, is_weights, select, cu_seqlens,
        global_tokens, global_seqs, stats, loss, agg, entropy_agg, kl_estimator, level, hyper)


_bwd = torch.library.custom_op("rlkern::policy_loss_backward", mutates_args=())(_bwd_impl)


@_bwd.register_fake
def _bwd_fake(grad_loss, logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, is_weights, select,
              cu_seqlens, global_tokens, global_seqs, stats, loss, agg, entropy_agg, kl_estimator, level, hyper):
    grad_ent = torch.empty_like(entropy) if entropy is not None else logprobs.new_empty(0)
    return torch.empty_like(logprobs), grad_ent


def _setup_context(ctx, inputs, output):
    (logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, is_weights, select, cu_seqlens, global_tokens,
     global_seqs, loss, agg, entropy_agg, kl_estimator, level, hyper) = inputs
    _, metrics, stats = output
    ctx.save_for_backward(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, is_weights, select,
                          cu_seqlens, global_tokens, global_seqs, stats)
    ctx.config = (loss, agg, entropy_agg, kl_estimator, level, hyper)
    ctx.has_entropy = entropy is not None
    ctx.backward_op = _bwd
    ctx.mark_non_differentiable(metrics, stats)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the metrics and stats (2 launches)


def _backward(ctx, grad_loss, grad_metrics, grad_stats):
    grads = [None] * 17
    if grad_loss is None:  # the loss itself is not in the graph (grads are not materialized)
        return tuple(grads)
    saved = ctx.saved_tensors
    grad_lp, grad_ent = ctx.backward_op(grad_loss, *saved, *ctx.config)
    grads[0] = grad_lp if ctx.needs_input_grad[0] else None
    if ctx.has_entropy and ctx.needs_input_grad[5]:
        grads[5] = grad_ent
    return tuple(grads)


_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerPolicyLoss(torch.autograd.Function):
    """The same forward, backward and saved state as the rlkern::policy_loss / policy_loss_backward
    custom ops, called without the dispatcher (CONTRIBUTING.md, Code): in eager mode the custom ops' autograd
    wrapper adds ~0.14 ms of Python to every forward + backward (torch 2.13's fill_defaults
    rebuilds the 17-argument schema list once per argument), about a fifth of the C++ kernels'
    time at B=64, T=4096 on 2 threads. torch.compile and tensor subclasses (fake tensors) go
    through the custom ops. Having setup_context, it also works under torch.func.grad / vjp
    (the custom ops' generated autograd.Function does not, in torch 2.13) with the C++ and
    reference backends; the Triton launchers cannot read functorch's wrapped tensors."""

    @staticmethod
    def forward(*inputs):
        return _fwd_impl(*inputs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)
        ctx.backward_op = _bwd_impl

    @staticmethod
    def backward(ctx, grad_loss, grad_metrics, grad_stats):
        return _backward(ctx, grad_loss, grad_metrics, grad_stats)


def _use_eager(logprobs: Tensor) -> bool:
    return type(logprobs) in (Tensor, torch.nn.Parameter) and not torch.compiler.is_compiling()


def run(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, is_weights, select, cu_seqlens, global_tokens,
        global_seqs, loss, agg, entropy_agg, kl_estimator, level, hyper) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, metrics [8], per-sequence stats [B + 1, N_STATS], or [0, N_STATS] from the reference)
    through the custom ops (eager calls skip the dispatcher: see _EagerPolicyLoss)."""
    op = _EagerPolicyLoss.apply if _use_eager(logprobs) else _fwd
    total, metrics, stats = op(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, is_weights, select,
                           cu_seqlens, global_tokens, global_seqs, loss, agg, entropy_agg, kl_estimator, level, hyper)
    return total, metrics, stats
