"""policy_loss / aggregate: argument checks and the resolved configuration (normalizers, TRL
presets, the advantages' layout). Messages start with the op name (CONTRIBUTING.md, API conventions)."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from rlkern.ops import _checks
from rlkern.ops._layout import segment_ids
from rlkern.reference import policy_loss as reference

AGG_MODES = reference.AGG_MODES
# TRL 1.16 GRPOTrainer loss_type normalizations, as presets of verl's modes (resolved in resolve_agg).
TRL_AGG_PRESETS = ("grpo", "bnpo", "dr_grpo", "dapo")
LOSS_NAMES = reference.LOSSES
_OP = "policy_loss"


def inner_loss(loss: str, bypass_loss: str) -> str:
    """The loss the kernels compute: bypass mode runs ppo or reinforce on the rollout's log-probs."""
    if loss != "bypass_mode":
        return loss
    _checks.choice(_OP, "bypass_loss", bypass_loss, ("ppo_clip", "reinforce"))
    return "ppo" if bypass_loss == "ppo_clip" else "reinforce"


def check_tensors(logprobs, old_logprobs, advantages, response_mask, cu_seqlens, optional: dict) -> int:
    """The tensors of policy_loss: shapes, dtypes, devices, the packed layout. Returns B."""
    _checks.tensors(_OP, "logprobs", {"logprobs": (logprobs, "float")})
    if cu_seqlens is not None:
        if logprobs.ndim != 1:
            raise ValueError(f"{_OP}: packed input (cu_seqlens given) needs logprobs [total], got shape "
                             f"{tuple(logprobs.shape)}")
        n_seqs = _checks.cu_seqlens(_OP, cu_seqlens, logprobs.numel(), logprobs.device, "logprobs")
    else:
        if logprobs.ndim != 2:
            raise ValueError(f"{_OP}: logprobs must be [B, T] (or [total] with cu_seqlens), got shape "
                             f"{tuple(logprobs.shape)}")
        n_seqs = logprobs.shape[0]
        if response_mask is None:
            raise ValueError(f"{_OP}: response_mask is required for padded [B, T] input (None only with cu_seqlens), "
                             "got None")
    like_logprobs = {"old_logprobs": (old_logprobs, "float"), "response_mask": (response_mask, "mask")}
    like_logprobs.update({name: (t, "float") for name, t in optional.items()})
    _checks.tensors(_OP, "logprobs", {"logprobs": (logprobs, "float"), **like_logprobs}, shape=tuple(logprobs.shape))
    _checks.tensors(_OP, "logprobs", {"logprobs": (logprobs, "float"), "advantages": (advantages, "float")})
    if tuple(advantages.shape) not in (tuple(logprobs.shape), (n_seqs,)):
        raise ValueError(f"{_OP}: advantages must be {tuple(logprobs.shape)} (per token) or ({n_seqs},) (per "
                         f"sequence), got {tuple(advantages.shape)}")
    return n_seqs


def check_modes(loss: str, agg: str, entropy_agg: str | None, kl_estimator: str, level: str) -> None:
    _checks.choice(_OP, "loss", loss, LOSS_NAMES)
    _checks.choice(_OP, "agg", agg, AGG_MODES + TRL_AGG_PRESETS)
    if entropy_agg is not None:
        _checks.choice(_OP, "entropy_agg", entropy_agg, AGG_MODES)
    check_kl_estimator(_OP, kl_estimator)
    _checks.choice(_OP, "level", level, ("token", "sequence"))
    if level == "sequence" and loss not in ("ppo", "cispo", "sapo"):
        raise ValueError(f"{_OP}: level='sequence' applies to loss in ('ppo', 'cispo', 'sapo'), got loss={loss!r} "
                         "(use loss='gspo' for verl's sequence-level ratio)")


def check_kl_estimator(op: str, kl_estimator: str) -> None:
    base = kl_estimator[:-1] if isinstance(kl_estimator, str) and kl_estimator.endswith("+") else kl_estimator
    if base not in reference.KL_ESTIMATORS:
        raise ValueError(f"{op}: kl_estimator must be one of {reference.KL_ESTIMATORS} (or with '+'), "
                         f"got {kl_estimator!r}")


def check_hyper(loss: str, clip_low, clip_high, dual_clip, dro_beta) -> None:
    _checks.number(_OP, "clip_low", clip_low, low=0)
    if clip_high is not None:
        _checks.number(_OP, "clip_high", clip_high, low=0)
    if dual_clip is not None:
        _checks.number(_OP, "dual_clip", dual_clip, low=1.0, low_open=True)
    if loss == "dro" and (dro_beta is None or _checks.number(_OP, "dro_beta", dro_beta) <= 0):
        raise ValueError(f"{_OP}: loss='dro' needs dro_beta > 0 (verl's policy_loss.dro_beta), got {dro_beta!r}")


def check_flags(**flags) -> None:
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{_OP}: {name} must be a bool, got {value!r}")


def check_numbers(op: str, dp_size, global_tokens, global_seqs, loss_scale_factor) -> None:
    """The global normalizers as the caller gave them (tensors are not read: no host sync)."""
    _checks.number(op, "dp_size", dp_size, low=1, integer=True)
    for name, value in (("global_tokens", global_tokens), ("global_seqs", global_seqs)):
        if value is not None and not isinstance(value, Tensor):
            _checks.number(op, name, value, low=0, low_open=True)
    if loss_scale_factor is not None:
        _checks.number(op, "loss_scale_factor", loss_scale_factor, low=0, low_open=True)


def empty_width_scale(agg: str, width: int, loss_scale_factor):
    """seq-mean-token-sum-norm divides by the padded width T: with T = 0 there is no token and
    the loss is 0, so any positive scale gives it (0 / 0 gave NaN)."""
    if width == 0 and loss_scale_factor is None and agg in ("seq-mean-token-sum-norm", "dr_grpo"):
        return 1.0
    return loss_scale_factor


def check_norms(op, agg, dp_size, global_tokens, global_seqs, loss_scale_factor, packed):
    if dp_size > 1 and agg == "token-mean" and global_tokens is None:
        raise ValueError(f"{op}: global_tokens (verl's batch_num_tokens) is required when dp_size > 1 with "
                         "agg='token-mean', got None")
    if dp_size > 1 and agg.startswith("seq-mean") and global_seqs is None:
        raise ValueError(f"{op}: global_seqs (verl's global_batch_size) is required when dp_size > 1 with "
                         f"agg={agg!r}, got None")
    if packed and agg == "seq-mean-token-sum-norm" and loss_scale_factor is None:
        raise ValueError(f"{op}: loss_scale_factor is required for agg='seq-mean-token-sum-norm' with packed input "
                         "(padded input defaults to the padded width T, as verl), got None")


def resolve_agg(agg: str, n_seqs: int, global_seqs, loss_scale_factor, dp_size: int):
    """TRL loss_type presets -> (verl agg mode, global_seqs, loss_scale_factor). The local B stands
    in for global_seqs only without data parallelism: with dp_size > 1 the caller passes it, as
    for the verl modes (the local B there would scale the loss by dp_size)."""
    local_seqs = n_seqs if global_seqs is None and dp_size == 1 else global_seqs
    if agg == "grpo":  # per-sequence token mean, averaged over all B rows (empty rows count 0)
        return "seq-mean-token-mean", local_seqs, loss_scale_factor
    if agg in ("bnpo", "dapo"):  # dapo: sum / (num_items_in_batch / num_processes): pass global_tokens, dp_size
        return "token-mean", global_seqs, loss_scale_factor
    if agg == "dr_grpo":  # sum / (B * max_completion_length)
        return "seq-mean-token-sum-norm", local_seqs, loss_scale_factor
    return agg, global_seqs, loss_scale_factor


class Aggregation(NamedTuple):
    """The resolved aggregation of one call: verl modes and the normalizers they divide by."""
    agg: str
    entropy_agg: str  # "": agg with its normalizers
    global_seqs: object
    loss_scale_factor: float | None


def aggregation(op, agg, entropy_agg, n_seqs, width, packed, dp_size, global_tokens, global_seqs,
                loss_scale_factor) -> Aggregation:
    """Checks the normalizers and resolves TRL's presets (``width``: T of padded input, else None)."""
    check_numbers(op, dp_size, global_tokens, global_seqs, loss_scale_factor)
    if width is not None:
        for mode in (agg, entropy_agg):
            if mode is not None:
                loss_scale_factor = empty_width_scale(mode, width, loss_scale_factor)
    agg, global_seqs, loss_scale_factor = resolve_agg(agg, n_seqs, global_seqs, loss_scale_factor, dp_size)
    check_norms(op, agg, dp_size, global_tokens, global_seqs, loss_scale_factor, packed)
    if entropy_agg is not None:
        check_norms(op, entropy_agg, 1, None, None, loss_scale_factor, packed)
    return Aggregation(agg, "" if entropy_agg is None else entropy_agg, global_seqs, loss_scale_factor)


def advantage_layout(advantages: Tensor, logprobs: Tensor, cu_seqlens: Tensor | None,
                     per_sequence: bool | None) -> Tensor:
    """The kernels read advantages per sequence when their shape differs from logprobs'. Packed
    input with total == B leaves ``[B]`` ambiguous: the caller says which, and per-sequence
    advantages are then spread to the tokens here (total is a host value: no sync)."""
    ambiguous = cu_seqlens is not None and advantages.shape == logprobs.shape == (cu_seqlens.numel() - 1,)
    if not ambiguous:
        inferred = advantages.shape != logprobs.shape
        if per_sequence is not None and bool(per_sequence) != inferred:
            raise ValueError(f"{_OP}: advantages_per_sequence={per_sequence} but advantages have shape "
                             f"{tuple(advantages.shape)} for logprobs {tuple(logprobs.shape)}")
        return advantages
    if per_sequence is None:
        raise ValueError(f"{_OP}: advantages {tuple(advantages.shape)} are ambiguous for packed input with as many "
                         "tokens as sequences: pass advantages_per_sequence=True (one per sequence) or False (per "
                         "token), got None")
    if not per_sequence:
        return advantages
    return advantages[segment_ids(cu_seqlens, logprobs.numel())]
