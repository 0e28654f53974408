"""Policy losses, KL penalties and loss aggregation: the public ops and their autograd.

``policy_loss`` computes the clipped policy objective (PPO and the rest of verl 0.9.1's
``POLICY_LOSS_REGISTRY``), the KL penalty to a reference policy, the entropy bonus, their
aggregation and the training metrics in one pass over the ``[B, T]`` (or packed) tensors, and
its backward writes d loss / d logprobs and d loss / d entropy in one more pass.

Backends: the C++ kernel (CPU) and the Triton kernels (GPU) cover every loss, ``level="token"``
and ``level="sequence"``; float64 input runs the PyTorch reference (``rlkern.reference.policy_loss``).
The losses whose ratio is a sequence mean (``gspo``, ``level="sequence"``) read each sequence
twice in the forward (the mean log-ratio first); ``geo_mean`` and sequence-level ``ppo`` / ``sapo``
get their per-sequence backward factor from the forward's per-sequence sums. Both kernel backends
compute the loss, the metrics and the per-sequence partial sums themselves (the aggregation
included): the Triton forward is 2 launches (token pass + a one-program reduction over the B
rows), its backward 1, with no other torch op in between (kernels/policy_loss.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rlkern import _backend
from rlkern.ops import _checks
from rlkern.reference import policy_loss as reference

_KERNELS = ("cpp", "triton")
KERNEL_LOSSES = ("ppo", "gspo", "cispo", "reinforce", "gpg", "sapo", "dro", "dppo_tv", "dppo_kl", "clip_cov",
                 "kl_cov", "geo_mean")
METRIC_KEYS = reference.METRIC_KEYS
AGG_MODES = reference.AGG_MODES
# TRL 1.16 GRPOTrainer loss_type normalizations, as presets of verl's modes (resolved in _resolve_agg).
TRL_AGG_PRESETS = ("grpo", "bnpo", "dr_grpo", "dapo")
LOSS_NAMES = reference.LOSSES
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64) + _FLOAT_DTYPES
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
 H_PPO_KL_COEF, H_GTOK, H_GSEQ) = (reference.HYPER_FIELDS.index(name) for name in (
    "clip_low", "clip_high", "dual_clip", "kl_coef", "entropy_coef", "dp_size", "loss_scale_factor", "tau_pos",
    "tau_neg", "dro_beta", "ppo_kl_coef", "global_tokens", "global_seqs"))
_NONE = math.nan  # "not given" in the float list


def _opt(x: float) -> float | None:
    return None if math.isnan(x) else x


# --------------------------------------------------------------------------------------------
# Validation


def _check_policy_loss(logprobs, old_logprobs, advantages, mask, cu_seqlens, loss, agg, entropy_agg, kl_estimator,
                       level, optional: dict, hyper: dict) -> None:
    def tensor(name, t, dtypes=_FLOAT_DTYPES):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in dtypes:
            raise TypeError(f"{name} must have a dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
        if t.device != logprobs.device:
            raise ValueError(f"{name} is on {t.device} but logprobs are on {logprobs.device}")

    if not isinstance(logprobs, Tensor):
        raise TypeError(f"logprobs must be a torch.Tensor, got {type(logprobs).__name__}")
    tensor("logprobs", logprobs)
    packed = cu_seqlens is not None
    if packed:
        if logprobs.ndim != 1:
            raise ValueError(f"policy_loss: packed input (cu_seqlens given) needs logprobs [total], got shape "
                             f"{tuple(logprobs.shape)}")
        n_seqs = _checks.cu_seqlens("policy_loss", cu_seqlens, logprobs.numel(), logprobs.device, "logprobs")
    else:
        if logprobs.ndim != 2:
            raise ValueError(f"logprobs must be [B, T] (or [total] with cu_seqlens), got shape {tuple(logprobs.shape)}")
        n_seqs = logprobs.shape[0]
    tensor("old_logprobs", old_logprobs)
    if old_logprobs.shape != logprobs.shape:
        raise ValueError(f"old_logprobs must have the shape of logprobs {tuple(logprobs.shape)}, "
                         f"got {tuple(old_logprobs.shape)}")
    tensor("advantages", advantages)
    if tuple(advantages.shape) not in (tuple(logprobs.shape), (n_seqs,)):
        raise ValueError(f"advantages must be {tuple(logprobs.shape)} (per token) or ({n_seqs},) (per sequence), "
                         f"got {tuple(advantages.shape)}")
    if mask is not None:
        tensor("mask", mask, _MASK_DTYPES)
        if mask.shape != logprobs.shape:
            raise ValueError(f"mask must have the shape of logprobs {tuple(logprobs.shape)}, got {tuple(mask.shape)}")
    elif not packed:
        raise ValueError("mask is required for padded [B, T] input (it may be None only with cu_seqlens)")
    for name, t in optional.items():
        if t is not None:
            tensor(name, t)
            if t.shape != logprobs.shape:
                raise ValueError(f"{name} must have the shape of logprobs {tuple(logprobs.shape)}, got {tuple(t.shape)}")
    if loss not in LOSS_NAMES:
        raise ValueError(f"loss must be one of {LOSS_NAMES}, got {loss!r}")
    if agg not in AGG_MODES + TRL_AGG_PRESETS:
        raise ValueError(f"agg must be one of {AGG_MODES + TRL_AGG_PRESETS}, got {agg!r}")
    if entropy_agg is not None and entropy_agg not in AGG_MODES:
        raise ValueError(f"entropy_agg must be None or one of {AGG_MODES}, got {entropy_agg!r}")
    base = kl_estimator[:-1] if kl_estimator.endswith("+") else kl_estimator
    if base not in reference.KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {reference.KL_ESTIMATORS} (or with '+'), got {kl_estimator!r}")
    if level not in ("token", "sequence"):
        raise ValueError(f"level must be 'token' or 'sequence', got {level!r}")
    if level == "sequence" and loss not in ("ppo", "cispo", "sapo"):
        raise ValueError(f"level='sequence' applies to loss in ('ppo', 'cispo', 'sapo'), got loss={loss!r} "
                         "(use loss='gspo' for verl's sequence-level ratio)")
    for name in ("clip_low", "clip_high"):
        v = hyper[name]
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    if hyper["dual_clip"] is not None and not hyper["dual_clip"] > 1.0:
        raise ValueError(f"dual_clip must be None or > 1.0 (verl's clip_ratio_c), got {hyper['dual_clip']!r}")
    if loss == "dro" and not (hyper["dro_beta"] is not None and hyper["dro_beta"] > 0):
        raise ValueError(f"loss='dro' needs dro_beta > 0 (verl's policy_loss.dro_beta), got {hyper['dro_beta']!r}")
    if not (isinstance(hyper["dp_size"], int) and hyper["dp_size"] >= 1):
        raise ValueError(f"dp_size must be an int >= 1, got {hyper['dp_size']!r}")


def _check_numbers(op: str, dp_size, global_tokens, global_seqs, loss_scale_factor) -> None:
    """The global normalizers as the caller gave them (tensors are not read: no host sync)."""
    _checks.number(op, "dp_size", dp_size, low=1, integer=True)
    for name, value in (("global_tokens", global_tokens), ("global_seqs", global_seqs)):
        if value is not None and not isinstance(value, Tensor):
            _checks.number(op, name, value, low=0, low_open=True)
    if loss_scale_factor is not None:
        _checks.number(op, "loss_scale_factor", loss_scale_factor, low=0, low_open=True)


def _empty_width_scale(agg: str, width: int, loss_scale_factor):
    """seq-mean-token-sum-norm divides by the padded width T: with T = 0 there is no token and
    the loss is 0, so any positive scale gives it (0 / 0 gave NaN)."""
    if width == 0 and loss_scale_factor is None and agg in ("seq-mean-token-sum-norm", "dr_grpo"):
        return 1.0
    return loss_scale_factor


def _check_norms(agg, dp_size, global_tokens, global_seqs, loss_scale_factor, packed):
    if dp_size > 1 and agg == "token-mean" and global_tokens is None:
        raise ValueError("global_tokens (verl's batch_num_tokens) is required when dp_size > 1 with agg='token-mean'")
    if dp_size > 1 and agg.startswith("seq-mean") and global_seqs is None:
        raise ValueError(f"global_seqs (verl's global_batch_size) is required when dp_size > 1 with agg={agg!r}")
    if packed and agg == "seq-mean-token-sum-norm" and loss_scale_factor is None:
        raise ValueError("loss_scale_factor is required for agg='seq-mean-token-sum-norm' with packed input "
                         "(padded input defaults to the padded width T, as verl)")


def _resolve_agg(agg: str, n_seqs: int, global_seqs, loss_scale_factor, dp_size: int):
    """TRL loss_type presets -> (verl agg mode, global_seqs, loss_scale_factor). The local B stands
    in for global_seqs only without data parallelism: with dp_size > 1 the caller passes it, as
    for the verl modes (the local B there would scale the loss by dp_size)."""
    local_seqs = n_seqs if global_seqs is None and dp_size == 1 else global_seqs
    if agg == "grpo":  # per-sequence token mean, averaged over all B rows (empty rows count 0)
        return "seq-mean-token-mean", local_seqs, loss_scale_factor
    if agg == "bnpo":
        return "token-mean", global_seqs, loss_scale_factor
    if agg == "dr_grpo":  # sum / (B * max_completion_length)
        return "seq-mean-token-sum-norm", local_seqs, loss_scale_factor
    if agg == "dapo":  # sum / (num_items_in_batch / num_processes): pass global_tokens and dp_size
        return "token-mean", global_seqs, loss_scale_factor
    return agg, global_seqs, loss_scale_factor


# --------------------------------------------------------------------------------------------
# Layout helpers


def _advantage_layout(advantages: Tensor, logprobs: Tensor, cu_seqlens: Tensor | None,
                      per_sequence: bool | None) -> Tensor:
    """The kernels read advantages per sequence when their shape differs from logprobs'. Packed
    input with total == B leaves ``[B]`` ambiguous: the caller says which, and per-sequence
    advantages are then spread to the tokens here (total is a host value: no sync)."""
    ambiguous = cu_seqlens is not None and advantages.shape == logprobs.shape == (cu_seqlens.numel() - 1,)
    if not ambiguous:
        inferred = advantages.shape != logprobs.shape
        if per_sequence is not None and bool(per_sequence) != inferred:
            raise ValueError(f"advantages_per_sequence={per_sequence} but advantages have shape "
                             f"{tuple(advantages.shape)} for logprobs {tuple(logprobs.shape)}")
        return advantages
    if per_sequence is None:
        raise ValueError(f"advantages {tuple(advantages.shape)} are ambiguous for packed input with as many tokens as "
                         "sequences: pass advantages_per_sequence=True (one per sequence) or False (per token)")
    if not per_sequence:
        return advantages
    return advantages[_segment_ids(cu_seqlens, logprobs.numel())]


def _segment_ids(cu_seqlens: Tensor, total: int) -> Tensor:
    lengths = cu_seqlens.diff().long()
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths,
                                   output_size=total)


def _pad(x: Tensor | None, cu_seqlens: Tensor, width: int, fill=0.0) -> Tensor | None:
    """Packed [total] -> padded [B, width] (reference path only: width is a host value)."""
    if x is None:
        return None
    n_seqs = cu_seqlens.numel() - 1
    seg = _segment_ids(cu_seqlens, x.numel())
    pos = torch.arange(x.numel(), device=x.device) - cu_seqlens.long()[seg]
    out = torch.full((n_seqs, width), fill, dtype=x.dtype, device=x.device)
    out[seg, pos] = x
    return out


def _unpad(x: Tensor, cu_seqlens: Tensor, total: int) -> Tensor:
    seg = _segment_ids(cu_seqlens, total)
    pos = torch.arange(total, device=x.device) - cu_seqlens.long()[seg]
    return x[seg, pos]


def _scalar(x, device) -> Tensor | None:
    if x is None or isinstance(x, Tensor):
        return x
    return torch.tensor(float(x), dtype=torch.float64, device=device)


def _seq_weights(counts: Tensor, agg: str, width: int, dp_size: float, global_tokens: Tensor | None,
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


# --------------------------------------------------------------------------------------------
# Backends


def _kernel_fns(backend: str):
    """(forward, backward) of a kernel backend; both backends take and return the same tensors."""
    if backend == "cpp":
        return torch.ops.rlkern.policy_loss_forward, torch.ops.rlkern.policy_loss_backward
    from rlkern.kernels import policy_loss as triton_policy_loss

    return triton_policy_loss.policy_loss_forward, triton_policy_loss.policy_loss_backward


def _backend_for(logprobs: Tensor, loss: str, level: str) -> str:
    if loss not in KERNEL_LOSSES:
        return "torch"
    return _backend.choose(logprobs.device, _KERNELS, logprobs.dtype, fp64=_KERNELS)


def _hyper_dict(hyper: list[float]) -> dict:
    return {"clip_low": hyper[H_CLIP_LOW], "clip_high": hyper[H_CLIP_HIGH], "dual_clip": _opt(hyper[H_DUAL]),
            "tau_pos": hyper[H_TAU_POS], "tau_neg": hyper[H_TAU_NEG], "dro_beta": _opt(hyper[H_DRO_BETA]),
            "ppo_kl_coef": hyper[H_PPO_KL_COEF]}


def _reference_loss(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, is_weights, select, cu_seqlens,
                    global_tokens, global_seqs, loss, agg, entropy_agg, kl_estimator, level, hyper):
    """The reference on padded tensors (packed input is padded first); differentiable."""
    if cu_seqlens is not None:
        width = max(int(cu_seqlens.diff().max()) if cu_seqlens.numel() > 1 else 0, 1)
        pad = lambda t: _pad(t, cu_seqlens, width)  # noqa: E731
        if advantages.shape == logprobs.shape:
            advantages = pad(advantages)
        mask = pad(torch.ones_like(logprobs) if mask is None else mask.to(logprobs.dtype))
        logprobs, old_logprobs, ref_logprobs, entropy, is_weights, select = map(
            pad, (logprobs, old_logprobs, ref_logprobs, entropy, is_weights, select))
    return reference.policy_loss(
        logprobs, old_logprobs, advantages, mask, loss=loss, clip_low=hyper[H_CLIP_LOW],
        clip_high=hyper[H_CLIP_HIGH], dual_clip=_opt(hyper[H_DUAL]), level=level, ref_logprobs=ref_logprobs,
        kl_coef=hyper[H_KL_COEF], kl_estimator=kl_estimator, entropy=entropy, entropy_coef=hyper[H_ENT_COEF],
        agg=agg, entropy_agg=entropy_agg or None,
        global_tokens=global_tokens if global_tokens is not None else _opt(hyper[H_GTOK]),
        global_seqs=global_seqs if global_seqs is not None else _opt(hyper[H_GSEQ]),
        dp_size=int(hyper[H_DP]), loss_scale_factor=_opt(hyper[H_LSF]), is_weights=is_weights, select=select,
        tau_pos=hyper[H_TAU_POS], tau_neg=hyper[H_TAU_NEG], dro_beta=_opt(hyper[H_DRO_BETA]),
        ppo_kl_coef=hyper[H_PPO_KL_COEF])


def _out_dtype(logprobs: Tensor) -> torch.dtype:
    return torch.float64 if logprobs.dtype == torch.float64 else torch.float32


def _width(logprobs: Tensor, cu_seqlens: Tensor | None) -> int:
    return 1 if cu_seqlens is not None else logprobs.shape[-1]


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
    backend = _backend_for(logprobs, loss, level)
    if backend == "torch":
        with torch.no_grad():
            total, metrics = _reference_loss(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy,
                                             is_weights, select, cu_seqlens, global_tokens, global_seqs, loss, agg,
                                             entropy_agg, kl_estimator, level, hyper)
        return total, metrics, logprobs.new_zeros((0, N_STATS), dtype=_out_dtype(logprobs))
    forward, _ = _kernel_fns(backend)
    return forward(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, is_weights, select, cu_seqlens,
                   global_tokens, global_seqs, loss, agg, entropy_agg, kl_estimator, level, hyper)


_fwd = torch.library.custom_op("rlkern::policy_loss_fwd", mutates_args=())(_fwd_impl)


@_fwd.register_fake
def _fwd_fake(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, is_weights, select, cu_seqlens,
              global_tokens, global_seqs, loss, agg, entropy_agg, kl_estimator, level, hyper):
    dtype = _out_dtype(logprobs)
    n_seqs = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else logprobs.shape[0]
    rows = n_seqs + 1 if _backend_for(logprobs, loss, level) != "torch" else 0
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
    backend = _backend_for(logprobs, loss, level)
    if backend == "torch":
        # torch.func.vjp: autograd of the reference formulas, which works inside a custom op's kernel
        # (the dispatcher has the Autograd keys excluded there).
        def objective(lp, *ent):
            return _reference_loss(lp, old_logprobs, advantages, mask, ref_logprobs, ent[0] if ent else None,
                                   is_weights, select, cu_seqlens, global_tokens, global_seqs, loss, agg, entropy_agg,
                                   kl_estimator, level, hyper)[0]

        primals = (logprobs,) if entropy is None else (logprobs, entropy)
        total, vjp = torch.func.vjp(objective, *primals)
        grads = vjp(grad_loss.to(total.dtype).reshape(total.shape))
        grad_ent = grads[1].to(entropy.dtype) if entropy is not None else logprobs.new_empty(0)
        return grads[0].to(logprobs.dtype), grad_ent
    _, backward = _kernel_fns(backend)
    return backward(grad_loss, logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, is_weights, select,
                    cu_seqlens, global_tokens, global_seqs, stats, loss, agg, entropy_agg, kl_estimator, level, hyper)


_bwd = torch.library.custom_op("rlkern::policy_loss_bwd", mutates_args=())(_bwd_impl)


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
    """The same forward, backward and saved state as the rlkern::policy_loss_fwd / _bwd custom
    ops, called without the dispatcher (CONTRIBUTING.md, Code): in eager mode the custom ops' autograd
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


# --------------------------------------------------------------------------------------------
# Public API


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor | None,
    *,
    loss: str = "ppo",
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    level: str = "token",
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    agg: str = "token-mean",
    entropy_agg: str | None = None,
    global_tokens: int | float | Tensor | None = None,
    global_seqs: int | float | Tensor | None = None,
    dp_size: int = 1,
    loss_scale_factor: float | None = None,
    cu_seqlens: Tensor | None = None,
    advantages_per_sequence: bool | None = None,
    is_weights: Tensor | None = None,
    rollout_logprobs: Tensor | None = None,
    rollout_is: str | None = None,
    rollout_is_threshold: float | tuple[float, float] = 2.0,
    rollout_is_batch_normalize: bool = False,
    rollout_rs: str | None = None,
    rollout_rs_threshold: float | str | None = None,
    bypass_loss: str = "ppo_clip",
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    dro_beta: float | None = None,
    clip_cov_ratio: float = 0.0002,
    clip_cov_lb: float = 1.0,
    clip_cov_ub: float = 5.0,
    kl_cov_ratio: float = 0.0002,
    ppo_kl_coef: float = 0.1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Policy-gradient loss + KL penalty - entropy bonus, aggregated, with metrics, in one pass.

    ``loss`` (one row per verl 0.9.1 ``POLICY_LOSS_REGISTRY`` name; ``r = exp(lr)``,
    ``lr = logprobs - old_logprobs``, ``A`` the advantage, ``clip(r) = clamp(r, 1 - clip_low,
    1 + clip_high)``, ``sg`` stop-gradient):

    ============  ===========  ================================================  ==========================
    rlkern        verl         per-token loss                                    defaults / notes
    ============  ===========  ================================================  ==========================
    ``ppo``       vanilla      max(-A r, -A clip(r)); where A < 0 and dual_clip  clip 0.2 (verl clip_ratio,
                               c: min(that, -A c); lr clamped to [-20, 20]       TRL epsilon); c: verl 3.0
    ``gspo``      gspo         r = exp(min(mean_t lr, 10)) per sequence, carried verl clip 0.2; the paper
                               by each token's logprob (straight-through);       uses 3e-4 / 4e-4
                               max(-A r, -A clip(r))
    ``cispo``     cispo        -sg(clip(r)) A logprob; lr clamped                TRL's cispo cap e = 1 +
                                                                                 clip_high, clip_low = 1
    ``reinforce`` (bypass      -A logprob (no ratio, no clip)                    verl default agg there:
                  reinforce)                                                     seq-mean-token-sum
    ``gpg``       gpg          -A logprob (alias of reinforce)
    ``sapo``      sapo         -A sigmoid(tau (r - 1)) 4 / tau, tau = tau_pos    tau_pos 1.0, tau_neg 1.05
                               if A > 0 else tau_neg; lr clamped                 (verl); verl forces agg
                                                                                 seq-mean-token-mean
    ``clip_cov``  clip_cov     ppo without clamp / dual-clip, times 0 at a       ratio 2e-4, lb 1, ub 5
                               random draw of high-covariance tokens             (verl); host sync, RNG
    ``kl_cov``    kl_cov       -A r + ppo_kl_coef |lr| at the top-covariance     ratio 2e-4, coef 0.1
                               tokens                                            (verl); host sync
    ``geo_mean``  geo_mean     per sequence: -mean(A) exp(mean(sign(A)           policy term = plain mean
                               min(sign(A) lr, sign(A) clamp(lr, -lo, hi))))     over the B rows (verl)
    ``dppo_tv``   dppo_tv      -A sg(min(r, c)) logprob, 0 where p - p_old       c = dual_clip (verl passes
                               leaves [-clip_low, clip_high] against A's sign    clip_ratio_c; None: no cap)
    ``dppo_kl``   dppo_kl      same, trust region by binary KL(p_old || p)
    ``dro``       dro          -(A logprob - dro_beta / 2 lr^2)                  dro_beta required
    bypass        bypass_mode  ``old_logprobs`` are the rollout's; is_weights    verl: rollout_is_threshold
                               from sg(logprobs) - old via ``rollout_is`` /      2.0, bypass_loss ppo_clip
                               ``rollout_rs``; loss = reinforce (with weights)
                               or ppo (without): pass ``bypass_loss`` and
                               ``rollout_logprobs=old_logprobs``
    ============  ===========  ================================================  ==========================

    The total is ``agg(policy * is_weights) + kl_coef * agg(kl) - entropy_coef *
    entropy_agg(entropy)``, verl's actor loss (``workers/utils/losses.py``); TRL adds
    ``beta * k3`` into the per-token loss (the same thing) and takes the entropy bonus as a token
    mean (``entropy_agg="token-mean"``).

    Args:
        logprobs: ``[B, T]`` (or packed ``[total]`` with ``cu_seqlens``), float16/bfloat16/
            float32/float64: log-probs of the sampled tokens under the current policy. The only
            differentiable input besides ``entropy``.
        old_logprobs: like ``logprobs``: the behaviour (old) policy's log-probs.
        advantages: like ``logprobs``, or ``[B]`` per sequence (broadcast in-kernel; TRL's GRPO
            advantages are ``[B]``).
        mask: like ``logprobs``; bool, integer or float (a float mask weights the tokens as verl's
            masked sums do). May be None for packed input (every token counts).
        loss: see the table.
        clip_low, clip_high: ``1 - clip_low <= r <= 1 + clip_high``; ``clip_high=None`` uses
            ``clip_low`` (verl's clip_ratio 0.2; DAPO's clip-higher: 0.28).
        dual_clip: the dual-clip constant c (> 1) applied where A < 0; None is off. verl always
            applies ``clip_ratio_c=3.0``: pass 3.0 for verl parity.
        level: ``"token"``; ``"sequence"`` is TRL's ``importance_sampling_level="sequence"``
            (ratio from the sequence mean log-ratio, unclamped, gradient through the mean), for
            ``ppo``, ``cispo`` and ``sapo``.
        ref_logprobs: like ``logprobs``: the reference policy, for the KL penalty.
        kl_coef: weight of the KL penalty (verl's kl_loss_coef 0.001, TRL's beta 0.0).
        kl_estimator: ``k1``/``kl``, ``abs``, ``k2``/``mse``, ``k3``/``low_var_kl`` (clamped as verl:
            log-ratio to [-20, 20], value to [-10, 10]), and any of them with ``+`` (value of the
            estimator, gradient of k2). Default k3 as verl's ``low_var_kl`` and TRL's beta term.
        entropy: like ``logprobs``: per-token entropy (differentiable) for the bonus and metric.
        entropy_coef: weight of the entropy bonus (verl's entropy_coeff 0, TRL's entropy_coef 0).
        agg: ``token-mean`` (verl default), ``token-sum``, ``seq-mean-token-sum``,
            ``seq-mean-token-mean``, ``seq-mean-token-sum-norm``, or TRL's ``grpo`` (per-sequence
            mean averaged over all B rows), ``bnpo`` (token mean), ``dr_grpo`` (sum / (B *
            loss_scale_factor), TRL's max_completion_length; T when None), ``dapo`` (sum /
            (global_tokens / dp_size): TRL's num_items_in_batch and num_processes).
        entropy_agg: aggregation of the entropy bonus; None uses ``agg`` with the global
            normalizers (verl); a mode given here is taken over the local batch without them, as
            TRL's entropy bonus (``"token-mean"``).
        global_tokens, global_seqs, dp_size: verl's ``batch_num_tokens``, ``global_batch_size``
            and ``dp_size``: token-mean divides by global_tokens, seq-mean modes by global_seqs,
            every mode multiplies by dp_size (required when dp_size > 1, as in verl). Numbers or
            0-dim tensors (no host sync).
        loss_scale_factor: ``seq-mean-token-sum-norm`` divides by it; None uses the padded width
            T (verl); required for packed input.
        cu_seqlens: ``[B + 1]`` int32/int64 offsets of packed sequences.
        advantages_per_sequence: None infers the advantages' layout from their shape (``[B]``
            per sequence, the shape of ``logprobs`` per token). Packed input with as many tokens
            as sequences (total == B) makes ``[B]`` ambiguous: then it must be given (True: one
            advantage per sequence, False: per token), and None raises ValueError.
        is_weights: like ``logprobs``: rollout-correction weights (stop-gradient) multiplying the
            policy term (verl's ``rollout_is_weights``, TRL's vLLM ``importance_sampling_ratio``).
        rollout_logprobs: like ``logprobs``: the inference engine's log-probs; with ``rollout_is``
            or ``rollout_rs``, weights and a rejection mask are computed from
            ``old_logprobs - rollout_logprobs`` (verl's decoupled mode). With
            ``loss="bypass_mode"`` ``old_logprobs`` are the rollout's and they are computed from
            ``sg(logprobs) - old_logprobs`` (verl's bypass mode). ``rollout_is``: ``"token"`` or ``"sequence"``;
            ``rollout_is_threshold``: a float (TIS: truncate above) or ``(lower, upper)``
            (IcePop: zero outside); ``rollout_rs``: verl's rejection options
            (``token_k1``, ``seq_mean_k3``, ... comma separated) with ``rollout_rs_threshold``.
            OpenRLHF's correction (rejected tokens stay in the normalizer; binary_kl / tv
            gates) is ``is_weights=rlkern.algos.policy_loss.openrlhf_is_weights(...)[0]``.
        bypass_loss: with ``loss="bypass_mode"``: ``"ppo_clip"`` or ``"reinforce"`` (verl).
        tau_pos, tau_neg: SAPO gate temperatures (verl 1.0 / 1.05).
        dro_beta: DRO's quadratic penalty (verl ``policy_loss.dro_beta``, required for dro).
        clip_cov_ratio, clip_cov_lb, clip_cov_ub, kl_cov_ratio, ppo_kl_coef: verl's
            ``PolicyLossConfig`` defaults for clip_cov / kl_cov.

    Returns:
        ``(loss, metrics)``: ``loss`` a 0-dim float32 tensor (float64 for float64 input);
        ``metrics`` a dict of 0-dim float32 tensors, token-weighted masked means (denominator
        sum(mask) + 1e-8, as verl's masked_mean):

        - ``clipfrac``: verl ``actor/pg_clipfrac`` (clip active for the token's advantage sign);
          TRL ``clip_ratio/region_mean``. For clip_cov the dropped fraction, for dppo the
          fraction outside the trust region, for geo_mean the A > 0 clipped fraction (verl's).
        - ``clipfrac_low`` / ``clipfrac_high``: its A < 0 / A > 0 halves (TRL
          ``clip_ratio/low_mean`` / ``high_mean``).
        - ``dual_clipfrac``: verl ``actor/pg_clipfrac_lower``.
        - ``approx_kl``: verl ``actor/ppo_kl`` (mean of old - new log-prob; mean |lr| for kl_cov).
        - ``ratio_mean``: mean importance ratio used by the loss (inf in float32 once a ratio
          passes 3.4e38, log-ratio > 88.7, where the log-ratio is not clamped: reinforce, gpg,
          dro, clip_cov, kl_cov, geo_mean and ``level="sequence"``, as in verl / TRL).
        - ``kl_ref``: mean KL estimate to ``ref_logprobs`` (TRL ``kl``; 0 without it).
        - ``entropy``: mean entropy (TRL ``entropy``; verl logs the aggregated ``entropy_loss``).

        An empty mask gives loss 0, metrics 0 and a zero gradient (verl's token-mean and
        seq-mean modes give NaN there); fully masked rows do not count in the sequence means, as
        in verl. Metrics are float32 for every input dtype.
    """
    packed = cu_seqlens is not None
    is_bypass = loss == "bypass_mode"
    hyper_in = {"clip_low": clip_low, "clip_high": clip_high, "dual_clip": dual_clip, "dro_beta": dro_beta,
                "dp_size": dp_size}
    inner_loss = loss
    if is_bypass:
        if bypass_loss not in ("ppo_clip", "reinforce"):
            raise ValueError(f"bypass_loss must be 'ppo_clip' or 'reinforce', got {bypass_loss!r}")
        inner_loss = "ppo" if bypass_loss == "ppo_clip" else "reinforce"
    _check_policy_loss(logprobs, old_logprobs, advantages, mask, cu_seqlens, inner_loss, agg, entropy_agg,
                       kl_estimator, level,
                       {"ref_logprobs": ref_logprobs, "entropy": entropy, "is_weights": is_weights,
                        "rollout_logprobs": rollout_logprobs}, hyper_in)
    _check_numbers("policy_loss", dp_size, global_tokens, global_seqs, loss_scale_factor)
    n_seqs = cu_seqlens.numel() - 1 if packed else logprobs.shape[0]
    if not packed:
        for mode in (agg, entropy_agg):
            if mode is not None:
                loss_scale_factor = _empty_width_scale(mode, logprobs.shape[1], loss_scale_factor)
    advantages = _advantage_layout(advantages, logprobs, cu_seqlens, advantages_per_sequence)
    agg, global_seqs, loss_scale_factor = _resolve_agg(agg, n_seqs, global_seqs, loss_scale_factor, dp_size)
    _check_norms(agg, dp_size, global_tokens, global_seqs, loss_scale_factor, packed)
    if entropy_agg is not None:
        _check_norms(entropy_agg, 1, None, None, loss_scale_factor, packed)
    entropy_agg = "" if entropy_agg is None else entropy_agg  # "": agg with its normalizers

    if is_bypass or rollout_is is not None or rollout_rs is not None:
        behaviour = old_logprobs if is_bypass else rollout_logprobs
        if behaviour is None:
            raise ValueError("rollout_is / rollout_rs need rollout_logprobs (the inference engine's log-probs)")
        trained = logprobs.detach() if is_bypass else old_logprobs
        weights, mask = _rollout_correction(trained, behaviour, mask, cu_seqlens, rollout_is, rollout_is_threshold,
                                            rollout_is_batch_normalize, rollout_rs, rollout_rs_threshold)
        if is_bypass and inner_loss == "ppo":
            weights = None  # verl: the PPO ratio already is the IS correction
        if weights is not None:
            is_weights = weights if is_weights is None else is_weights * weights

    select = None
    if inner_loss in ("clip_cov", "kl_cov"):
        select = _cov_select(inner_loss, logprobs, old_logprobs, advantages, mask, cu_seqlens, clip_low,
                             clip_low if clip_high is None else clip_high, clip_cov_ratio, clip_cov_lb, clip_cov_ub,
                             kl_cov_ratio)
    hyper = reference.hyper_list(
        clip_low=clip_low, clip_high=clip_low if clip_high is None else clip_high, dual_clip=dual_clip,
        kl_coef=kl_coef, entropy_coef=entropy_coef, dp_size=dp_size, loss_scale_factor=loss_scale_factor,
        tau_pos=tau_pos, tau_neg=tau_neg, dro_beta=dro_beta, ppo_kl_coef=ppo_kl_coef,
        global_tokens=None if isinstance(global_tokens, Tensor) else global_tokens,
        global_seqs=None if isinstance(global_seqs, Tensor) else global_seqs)
    op = _EagerPolicyLoss.apply if _use_eager(logprobs) else _fwd
    total, metrics, _ = op(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, is_weights, select,
                           cu_seqlens, global_tokens if isinstance(global_tokens, Tensor) else None,
                           global_seqs if isinstance(global_seqs, Tensor) else None, inner_loss, agg, entropy_agg,
                           kl_estimator, level, hyper)
    return total, dict(zip(METRIC_KEYS, metrics.to(torch.float32).unbind(0)))


class _PackedRows:
    """reference.PaddedRows for packed ``[total]`` tokens: segment reductions over cu_seqlens (no
    padding, so no host read of the longest sequence)."""

    def __init__(self, cu_seqlens: Tensor, total: int):
        self.seg = _segment_ids(cu_seqlens, total)
        self.n_seqs = cu_seqlens.numel() - 1

    def sum(self, x: Tensor) -> Tensor:
        return x.new_zeros(self.n_seqs).index_add_(0, self.seg, x)

    def amax(self, x: Tensor) -> Tensor:
        return x.new_full((self.n_seqs,), -math.inf).scatter_reduce(0, self.seg, x, "amax")

    def spread(self, per_seq: Tensor) -> Tensor:
        return per_seq[self.seg]


def _rollout_correction(trained, behaviour, mask, cu_seqlens, rollout_is, is_threshold, batch_normalize,
                        rollout_rs, rs_threshold):
    """Rollout IS weights and rejection mask (reference math, no gradient; no host sync)."""
    rows = reference.PaddedRows if cu_seqlens is None else _PackedRows(cu_seqlens, trained.numel())
    return reference.rollout_correction(trained, behaviour, mask, rollout_is, is_threshold, batch_normalize,
                                        rollout_rs, rs_threshold, rows=rows)


def _cov_select(loss, logprobs, old_logprobs, advantages, mask, cu_seqlens, clip_low, clip_high, clip_cov_ratio,
                clip_cov_lb, clip_cov_ub, kl_cov_ratio) -> Tensor:
    """clip_cov / kl_cov token choice (data-dependent: a host sync, as in verl)."""
    if cu_seqlens is not None:
        width = max(int(cu_seqlens.diff().max()) if cu_seqlens.numel() > 1 else 0, 1)
        pad = lambda t: _pad(t, cu_seqlens, width)  # noqa: E731
        m = pad(torch.ones_like(logprobs) if mask is None else mask.to(logprobs.dtype))
        adv = pad(advantages) if advantages.shape == logprobs.shape else advantages[:, None]
        lp, old = pad(logprobs.detach()), pad(old_logprobs)
    else:
        m, lp, old = mask, logprobs.detach(), old_logprobs
        adv = advantages if advantages.ndim == 2 else advantages[:, None]
    if loss == "clip_cov":
        select = reference.clip_cov_select(lp, old, adv, m, clip_low, clip_high, clip_cov_ratio, clip_cov_lb,
                                           clip_cov_ub)
    else:
        select = reference.kl_cov_select(lp, adv, m, kl_cov_ratio)
    select = select.to(_out_dtype(logprobs))
    return _unpad(select, cu_seqlens, logprobs.numel()) if cu_seqlens is not None else select


# --- kl_penalty ------------------------------------------------------------------------------


@torch.library.custom_op("rlkern::kl_penalty", mutates_args=())
def _kl_fwd(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    cdt = _out_dtype(logprobs)
    return reference.kl_penalty(logprobs.to(cdt), ref_logprobs.to(cdt), estimator)


@_kl_fwd.register_fake
def _kl_fake(logprobs, ref_logprobs, estimator):
    return torch.empty_like(logprobs, dtype=_out_dtype(logprobs))


@torch.library.custom_op("rlkern::kl_penalty_bwd", mutates_args=())
def _kl_bwd(grad: Tensor, logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    cdt = _out_dtype(logprobs)
    value, vjp = torch.func.vjp(lambda lp: reference.kl_penalty(lp, ref_logprobs.to(cdt), estimator), logprobs.to(cdt))
    # .clone(): for k1 the vjp hands back the cotangent itself, and an op's output may not alias an input
    return vjp(grad.to(value.dtype))[0].to(logprobs.dtype).clone()


@_kl_bwd.register_fake
def _kl_bwd_fake(grad, logprobs, ref_logprobs, estimator):
    return torch.empty_like(logprobs)


def _kl_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.estimator = inputs[2]


def _kl_backward(ctx, grad):
    logprobs, ref_logprobs = ctx.saved_tensors
    return _kl_bwd(grad, logprobs, ref_logprobs, ctx.estimator), None, None


_kl_fwd.register_autograd(_kl_backward, setup_context=_kl_setup)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "low_var_kl") -> Tensor:
    """Per-token KL estimate between the policy and a reference (verl 0.9.1's ``kl_penalty``).

    Args:
        logprobs: any shape, float16/bfloat16/float32/float64; differentiable.
        ref_logprobs: same shape as ``logprobs``.
        estimator: ``k1``/``kl`` (lp - ref), ``abs``, ``k2``/``mse`` (0.5 (lp - ref)^2),
            ``k3``/``low_var_kl`` (e^(ref - lp) - (ref - lp) - 1 with the log-ratio clamped to
            [-20, 20] and the value to [-10, 10], as verl), each optionally with ``+`` (the value
            of the estimator with the gradient of k2, verl's straight-through form). Default
            verl's ``kl_loss_type="low_var_kl"``.

    Returns:
        The estimate, shape of ``logprobs``, float32 (float64 for float64 input).
    """
    if not isinstance(logprobs, Tensor) or not isinstance(ref_logprobs, Tensor):
        raise TypeError("logprobs and ref_logprobs must be torch.Tensors")
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"ref_logprobs must have the shape of logprobs {tuple(logprobs.shape)}, "
                         f"got {tuple(ref_logprobs.shape)}")
    if logprobs.dtype not in _FLOAT_DTYPES or ref_logprobs.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"logprobs and ref_logprobs must be floating point, got {logprobs.dtype}, {ref_logprobs.dtype}")
    base = estimator[:-1] if estimator.endswith("+") else estimator
    if base not in reference.KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {reference.KL_ESTIMATORS} (or with '+'), got {estimator!r}")
    return _kl_fwd(logprobs, ref_logprobs, estimator)


# --- aggregate --------------------------------------------------------------------------------


def _segment_sums(values: Tensor, cu_seqlens: Tensor | None) -> Tensor:
    if cu_seqlens is None:
        return values.sum(-1)
    n_seqs = cu_seqlens.numel() - 1
    out = values.new_zeros(n_seqs)
    return out.index_add_(0, _segment_ids(cu_seqlens, values.numel()), values)


def _agg_parts(values, mask, cu_seqlens, agg, dp_size, global_tokens, global_seqs, loss_scale_factor):
    cdt = _out_dtype(values)
    m = torch.ones_like(values, dtype=cdt) if mask is None else mask.to(cdt)
    kept = torch.where(m != 0, values.to(cdt), torch.zeros((), dtype=cdt, device=values.device)) * m
    counts = _segment_sums(m, cu_seqlens)
    w = _seq_weights(counts, agg, _width(values, cu_seqlens), dp_size, global_tokens, global_seqs,
                     _opt(loss_scale_factor))
    return kept, m, w


@torch.library.custom_op("rlkern::aggregate", mutates_args=())
def _agg_fwd(values: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None, global_tokens: Tensor | None,
             global_seqs: Tensor | None, agg: str, dp_size: float, loss_scale_factor: float) -> Tensor:
    kept, _, w = _agg_parts(values, mask, cu_seqlens, agg, dp_size, global_tokens, global_seqs, loss_scale_factor)
    return (w * _segment_sums(kept, cu_seqlens)).sum()


@_agg_fwd.register_fake
def _agg_fake(values, mask, cu_seqlens, global_tokens, global_seqs, agg, dp_size, loss_scale_factor):
    return values.new_empty((), dtype=_out_dtype(values))


@torch.library.custom_op("rlkern::aggregate_bwd", mutates_args=())
def _agg_bwd(grad: Tensor, values: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None,
             global_tokens: Tensor | None, global_seqs: Tensor | None, agg: str, dp_size: float,
             loss_scale_factor: float) -> Tensor:
    _, m, w = _agg_parts(values, mask, cu_seqlens, agg, dp_size, global_tokens, global_seqs, loss_scale_factor)
    if cu_seqlens is None:
        per_token = w[:, None].expand_as(m)
    else:
        per_token = w[_segment_ids(cu_seqlens, values.numel())]
    return (torch.where(m != 0, m, torch.zeros_like(m)) * per_token * grad).to(values.dtype)


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


def aggregate(
    values: Tensor,
    mask: Tensor | None,
    agg: str = "token-mean",
    *,
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
        mask: like ``values``, bool/int/float; None only for packed input (all tokens count).
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
    if not isinstance(values, Tensor) or values.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"values must be a floating-point torch.Tensor, got {getattr(values, 'dtype', type(values))}")
    packed = cu_seqlens is not None
    if packed:
        if values.ndim != 1:
            raise ValueError(f"aggregate: packed input (cu_seqlens given) needs values [total], got shape "
                             f"{tuple(values.shape)}")
        _checks.cu_seqlens("aggregate", cu_seqlens, values.numel(), values.device, "values")
    elif values.ndim != 2:
        raise ValueError(f"aggregate: values must be [B, T] (or [total] with cu_seqlens), got shape "
                         f"{tuple(values.shape)}")
    if mask is None and not packed:
        raise ValueError("aggregate: mask is required for padded [B, T] values")
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype not in _MASK_DTYPES:
            raise TypeError(f"aggregate: mask must be a tensor with a dtype in {[str(d) for d in _MASK_DTYPES]}, "
                            f"got {getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.shape != values.shape:
            raise ValueError(f"aggregate: mask must have the shape of values {tuple(values.shape)}, got "
                             f"{tuple(mask.shape)}")
        if mask.device != values.device:
            raise ValueError(f"aggregate: mask is on {mask.device}, expected {values.device}")
    if agg not in AGG_MODES + TRL_AGG_PRESETS:
        raise ValueError(f"aggregate: agg must be one of {AGG_MODES + TRL_AGG_PRESETS}, got {agg!r}")
    _check_numbers("aggregate", dp_size, global_tokens, global_seqs, loss_scale_factor)
    n_seqs = cu_seqlens.numel() - 1 if packed else values.shape[0]
    if not packed:
        loss_scale_factor = _empty_width_scale(agg, values.shape[1], loss_scale_factor)
    agg, global_seqs, loss_scale_factor = _resolve_agg(agg, n_seqs, global_seqs, loss_scale_factor, dp_size)
    _check_norms(agg, dp_size, global_tokens, global_seqs, loss_scale_factor, packed)
    return _agg_fwd(values, mask, cu_seqlens, _scalar(global_tokens, values.device),
                    _scalar(global_seqs, values.device), agg, float(dp_size),
                    _NONE if loss_scale_factor is None else float(loss_scale_factor))


def value_loss(
    vpreds: Tensor,
    returns: Tensor,
    values: Tensor,
    mask: Tensor | None,
    cliprange_value: float = 0.5,
    agg: str = "token-mean",
    *,
    global_tokens=None,
    global_seqs=None,
    dp_size: int = 1,
    loss_scale_factor: float | None = None,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Clipped value loss (verl 0.9.1 ``compute_value_loss``, OpenRLHF ``ValueLoss``).

    ``0.5 * agg(max((v - R)^2, (clamp(v, v_old - c, v_old + c) - R)^2))``.

    Args:
        vpreds: ``[B, T]`` (or packed), the value head's predictions; differentiable.
        returns: like ``vpreds``: the targets R.
        values: like ``vpreds``: the values at rollout time (the clip centre).
        mask: like ``vpreds``.
        cliprange_value: c (verl's critic ``cliprange_value`` 0.5).
        agg, global_tokens, global_seqs, dp_size, loss_scale_factor, cu_seqlens: as in
            ``aggregate``.

    Returns:
        ``(loss, clipfrac)``: 0-dim float32 tensors; clipfrac is verl's ``vf_clipfrac``.
    """
    for name, t in (("returns", returns), ("values", values)):
        if not isinstance(t, Tensor) or t.shape != vpreds.shape:
            raise ValueError(f"{name} must be a tensor of the shape of vpreds {tuple(vpreds.shape)}")
    cdt = _out_dtype(vpreds)
    v, ret, old = vpreds.to(cdt), returns.to(cdt), values.to(cdt)
    clipped = torch.maximum(torch.minimum(v, old + cliprange_value), old - cliprange_value)
    l1, l2 = (v - ret).square(), (clipped - ret).square()
    loss = 0.5 * aggregate(torch.maximum(l1, l2), mask, agg, global_tokens=global_tokens, global_seqs=global_seqs,
                           dp_size=dp_size, loss_scale_factor=loss_scale_factor, cu_seqlens=cu_seqlens)
    frac = aggregate((l2 > l1).to(cdt), mask, "token-mean", cu_seqlens=cu_seqlens).detach()
    return loss, frac
