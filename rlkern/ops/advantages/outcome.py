"""Outcome estimators: one score per sample, normalized within its group (GRPO family, RLOO,
OPO, GPG, REINFORCE++-baseline, Pass@k, BNPO, GDPO, GiGPO step groups).

Each takes ``scores`` ``[N]`` and group ids (see rlkern/ops/advantages/groups.py); with a
``response_mask`` it returns the per-token broadcast ``value * mask`` (verl's layout): ``[N, T]``,
or packed ``[total]`` when ``cu_seqlens`` is given (sample i owns ``mask[cu[i]:cu[i + 1]]``);
without it one value per sample. On CPU one C++ kernel computes the group statistics, the
normalization and the broadcast to tokens (csrc/advantages.cpp).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlkern import _backend
from rlkern.ops import _checks
from rlkern.ops._layout import int32_offsets, out_dtype
from rlkern.ops.advantages import _common, fallback
from rlkern.ops.advantages.groups import dense
from rlkern.ops.advantages.returns import masked_whiten

_STD_MODES = ("unbiased", "population", None)
_SCALES = ("group", "batch", "none")
_SINGLETONS = ("verl", "zero")

_BROADCAST = _backend.Kernels("outcome_to_tokens", cpp="cpp_outcome_to_tokens", triton="advantages.broadcast",
                              torch=fallback.broadcast, fp64=("cpp", "triton"))
_NORMALIZE = _backend.Kernels("group_normalize", cpp="cpp_group_normalize", triton="advantages.group_normalize",
                              torch=fallback.group_normalize, fp64=("cpp", "triton"), atomics=True)
_BASELINE = _backend.Kernels("group_baseline", cpp="cpp_group_baseline", triton="advantages.group_baseline",
                             torch=fallback.group_baseline, fp64=("cpp", "triton"), atomics=True)
_PASSK = _backend.Kernels("grpo_passk", cpp="cpp_grpo_passk", torch=fallback.grpo_passk, fp64=("cpp",), atomics=True)
_BNPO = _backend.Kernels("bnpo", cpp="cpp_bnpo", torch=fallback.bnpo, fp64=("cpp",), atomics=True)


def broadcast(scores: Tensor, mask: Tensor, cu_seqlens: Tensor | None) -> Tensor:
    """``scores[b] * mask`` over row b (``[B, T]``) or segment b (packed ``[total]``), in scores' dtype."""
    return _outcome_to_tokens_op(scores, mask, cu_seqlens)


def _broadcast_kernel(scores: Tensor, mask: Tensor, cu_seqlens: Tensor | None) -> Tensor:
    if scores.dtype in (torch.float16, torch.bfloat16):
        return _broadcast_kernel(scores.float(), mask, cu_seqlens).to(scores.dtype)
    return _BROADCAST.pick(scores)(scores, mask, cu_seqlens)


def _to_tokens(per_sample: Tensor, response_mask: Tensor | None, cu_seqlens: Tensor | None) -> Tensor:
    return per_sample if response_mask is None else broadcast(per_sample, response_mask, cu_seqlens)


def outcome_to_tokens(scores: Tensor, response_mask: Tensor, *, cu_seqlens: Tensor | None = None) -> Tensor:
    """Broadcast one score per sequence to its tokens: ``scores[:, None] * response_mask``.

    Args:
        scores: ``[B]`` float.
        response_mask: ``[B, T]`` bool/int/float, or packed ``[total]`` with ``cu_seqlens``.
        cu_seqlens: int32/int64 ``[B + 1]``: sequence b is ``response_mask[cu[b]:cu[b + 1]]``.

    Returns:
        response_mask's shape (``[B, T]`` or ``[total]``) in scores' dtype (verl's
        ``scores.unsqueeze(-1) * response_mask``).
    """
    _checks.tensors("outcome_to_tokens", "scores", {"scores": (scores, "float"),
                                                    "response_mask": (response_mask, "mask")})
    if scores.ndim != 1:
        raise ValueError(f"outcome_to_tokens: scores must be [B], got {tuple(scores.shape)}")
    _common.token_layout("outcome_to_tokens", scores.shape[0], response_mask, cu_seqlens)
    return broadcast(scores, response_mask, int32_offsets(cu_seqlens))


# One custom op around the backend's broadcast: torch.compile sees an op (whichever backend runs
# it) instead of tracing into the kernel choice (Kernels.pick imports the Triton module lazily).
@torch.library.custom_op("rlkern::_outcome_to_tokens", mutates_args=())
def _outcome_to_tokens_op(scores: Tensor, response_mask: Tensor, cu_seqlens: Tensor | None) -> Tensor:
    return _broadcast_kernel(scores, response_mask, cu_seqlens)


@_outcome_to_tokens_op.register_fake
def _(scores, response_mask, cu_seqlens):
    return scores.new_empty(response_mask.shape)


def _outcome_args(op: str, scores: Tensor, group_ids, response_mask: Tensor | None, cu_seqlens: Tensor | None,
                  **numbers):
    """Checks an outcome op's arguments; returns the dense group numbers ``[N]`` on scores' device."""
    _checks.tensors(op, "scores", {"scores": (scores, "float"), "response_mask": (response_mask, "mask")})
    for name, value in numbers.items():
        _checks.number(op, name, value, low=0.0 if name == "eps" else None)
    if scores.ndim != 1:
        raise ValueError(f"{op}: scores must be [N] (one score per sample), got {tuple(scores.shape)}")
    _common.token_layout(op, scores.shape[0], response_mask, cu_seqlens)
    if isinstance(group_ids, Tensor) and group_ids.device != scores.device and group_ids.device.type != "cpu":
        raise ValueError(f"{op}: group_ids is on {group_ids.device} but scores are on {scores.device}")
    return dense(op, group_ids, n=scores.shape[0], device=scores.device)


@torch.library.custom_op("rlkern::group_normalize", mutates_args=())
def _group_normalize_op(
    scores: Tensor,  # [N] float
    inverse: Tensor,  # [N] int64 dense group numbers in [0, N)
    mask: Tensor | None,  # None, [N, T], or packed [total] with cu_seqlens
    cu_seqlens: Tensor | None,  # [N + 1] int32 (packed mask)
    eps: float,
    std: str,
    scale: str,
    singleton: str,
    skip_nan: bool = False,
) -> Tensor:
    return _NORMALIZE.pick(scores)(scores, inverse, mask, cu_seqlens, eps, std, scale, singleton,
                                   skip_nan)


@_group_normalize_op.register_fake
def _(scores, inverse, mask, cu_seqlens, eps, std, scale, singleton, skip_nan=False):
    return scores.new_empty(scores.shape if mask is None else mask.shape, dtype=out_dtype(scores))


def group_normalize(
    scores: Tensor,
    group_ids,
    *,
    eps: float = 1e-6,
    std: str | None = "unbiased",
    scale: str = "group",
    singleton: str = "verl",
    skip_nan: bool = False,
    response_mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
) -> Tensor:
    """GRPO-family group normalization: ``(s - mean_group) / (std + eps)``.

    Presets: verl GRPO (``compute_grpo_outcome_advantage`` and ``grpo_vectorized``): the
    defaults (eps 1e-6 from verl's ``epsilon``, unbiased std, a group of one gets mean 0 and
    std 1 so its advantage is ``s / (1 + eps)``). Dr.GRPO / verl ``norm_adv_by_std_in_grpo=False``:
    ``std=None``. TRL ``GRPOTrainer`` ``scale_rewards`` = "group" / "batch" / "none":
    ``eps=1e-4, singleton="zero", scale=<same>, skip_nan=True`` (TRL divides by the batch std
    with "batch", gives 0 to a group of one, and leaves unscorable completions, NaN scores, out
    of every mean and std with advantage 0); ``rlkern.algos.advantages.trl_grpo_advantages``
    applies it to TRL's ``rewards_per_func`` for both ``multi_objective_aggregation`` modes.

    Args:
        scores: ``[N]`` float, one outcome score per sample.
        group_ids: ``[N]`` group of each sample: int tensor, numpy str/int array, list of str.
        eps: added to the std.
        std: "unbiased" (torch.std, verl and TRL), "population", or None (no division).
        scale: "group" (std of the sample's group), "batch" (std of all N scores), "none".
        singleton: "verl" (mean 0, std 1) or "zero" (advantage 0) for a group of one.
        skip_nan: NaN scores count in no group or batch statistic (a group's size is its
            count of scored samples) and get 0, as TRL 1.16. False (verl): NaN propagates.
        response_mask: optional ``[N, T]`` bool/int/float, or packed ``[total]`` with
            ``cu_seqlens``; then the result is broadcast to tokens (value * mask, as verl).
        cu_seqlens: int32/int64 ``[N + 1]``: sample i's tokens are ``response_mask[cu[i]:cu[i + 1]]``.

    Returns:
        ``[N]`` float32 (float64 for float64 scores), or response_mask's shape (``[N, T]`` or
        ``[total]``) with ``response_mask``.
    """
    return _normalize("group_normalize", scores, group_ids, eps, std, scale, singleton, skip_nan, response_mask,
                      cu_seqlens)


def _normalize(op, scores, group_ids, eps, std, scale, singleton, skip_nan, response_mask, cu_seqlens) -> Tensor:
    _checks.choice(op, "std", std, _STD_MODES)
    _checks.choice(op, "scale", scale, _SCALES)
    _checks.choice(op, "singleton", singleton, _SINGLETONS)
    _checks.flag(op, "skip_nan", skip_nan)
    inverse = _outcome_args(op, scores, group_ids, response_mask, cu_seqlens, eps=eps)
    return _group_normalize_op(scores, inverse, response_mask, int32_offsets(cu_seqlens), float(eps), std or "none",
                               scale, singleton, bool(skip_nan))


def grpo(scores: Tensor, group_ids, response_mask: Tensor | None = None, *, eps: float = 1e-6,
         norm_by_std: bool = True, cu_seqlens: Tensor | None = None) -> Tensor:
    """verl's GRPO outcome advantage (``grpo`` and ``grpo_vectorized``; Dr.GRPO with
    ``norm_by_std=False``, verl's ``norm_adv_by_std_in_grpo``). See ``group_normalize``
    (``response_mask`` ``[N, T]``, or packed ``[total]`` with ``cu_seqlens`` ``[N + 1]``).

    Returns:
        ``[N]`` float32, or ``scores[:, None] * response_mask`` (``[N, T]`` or packed ``[total]``).
    """
    _checks.flag("grpo", "norm_by_std", norm_by_std)
    return _normalize("grpo", scores, group_ids, eps, "unbiased" if norm_by_std else None, "group", "verl", False,
                      response_mask, cu_seqlens)


@torch.library.custom_op("rlkern::group_baseline", mutates_args=())
def _group_baseline_op(
    scores: Tensor,  # [N] float
    inverse: Tensor,  # [N] int64 dense group numbers in [0, N)
    weights: Tensor | None,  # [N] float (mode "weighted")
    mask: Tensor | None,  # None, [N, T], or packed [total] with cu_seqlens
    cu_seqlens: Tensor | None,  # [N + 1] int32 (packed mask)
    mode: str,
    param: float,
) -> Tensor:
    """mode: "rloo_raw" / "rloo_zero" / "mean" (s - mean, singleton mean 0) / "weighted" (s -
    sum(w s)/sum(w), singleton 0) / "gpg" (alpha (s - mean) / param); broadcast to mask's tokens."""
    return _BASELINE.pick(scores)(scores, inverse, weights, mask, cu_seqlens, mode, param)


@_group_baseline_op.register_fake
def _(scores, inverse, weights, mask, cu_seqlens, mode, param):
    return scores.new_empty(scores.shape if mask is None else mask.shape, dtype=out_dtype(scores))


def rloo(scores: Tensor, group_ids, response_mask: Tensor | None = None, *, singleton: str = "raw",
         cu_seqlens: Tensor | None = None) -> Tensor:
    """RLOO (Ahmadian et al. 2024): leave-one-out baseline, ``n / (n - 1) * (s - mean_group)``.

    verl's two estimators disagree on a group of one: ``rloo`` keeps its raw score
    (``singleton="raw"``, the default), ``rloo_vectorized`` gives 0 (``singleton="zero"``).

    Args:
        scores: ``[N]`` float.  group_ids: see ``group_normalize``.
        response_mask: optional ``[N, T]``, or packed ``[total]`` with ``cu_seqlens`` ``[N + 1]``
            (broadcast to tokens).
        singleton: "raw" or "zero".

    Returns:
        ``[N]`` float32, or response_mask's shape with ``response_mask``.
    """
    _checks.choice("rloo", "singleton", singleton, ("raw", "zero"))
    inverse = _outcome_args("rloo", scores, group_ids, response_mask, cu_seqlens)
    return _group_baseline_op(scores, inverse, None, response_mask, int32_offsets(cu_seqlens), f"rloo_{singleton}",
                              0.0)


def opo(scores: Tensor, group_ids, response_mask: Tensor, *, cu_seqlens: Tensor | None = None) -> Tensor:
    """OPO (Hao et al. 2025, arXiv:2505.23585; verl ``opo``): length-weighted group baseline
    ``b = sum(len_i * s_i) / sum(len_i)`` with ``len_i = response_mask[i].sum()``; 0 for a
    group of one.

    Args:
        scores: ``[N]`` float.  group_ids: see ``group_normalize``.
        response_mask: ``[N, T]``, or packed ``[total]`` with ``cu_seqlens`` ``[N + 1]`` (gives
            the lengths; the result is broadcast to tokens).

    Returns:
        response_mask's shape, float32: ``(s - b)[:, None] * response_mask``. A group whose
        responses are all empty (every length 0) gets advantages 0, not verl's NaN (0/0).
    """
    _common.require("opo", "response_mask", response_mask, "it gives the response lengths")
    inverse = _outcome_args("opo", scores, group_ids, response_mask, cu_seqlens)
    lengths = _common.lengths(response_mask, cu_seqlens)
    # A group whose responses are all empty has weights summing to 0: verl's baseline is then
    # 0/0 = NaN, and NaN * mask 0 leaves NaN on every token of those rows, which a masked sum
    # (x * mask) downstream spreads to the whole loss. Weighting such a group's members equally
    # keeps its baseline finite; its tokens are all masked out, so the advantages are exactly 0.
    # Found by tests/test_fuzz_ops.py::test_outcome_estimators (an "empty" mask layout).
    group_total = torch.zeros_like(lengths).index_add_(0, inverse, lengths)[inverse]
    lengths = torch.where(group_total == 0, torch.ones_like(lengths), lengths)
    return _group_baseline_op(scores, inverse, lengths, response_mask, int32_offsets(cu_seqlens), "weighted", 0.0)


def gpg(scores: Tensor, group_ids, response_mask: Tensor | None = None, *, f_norm: float = 1.0,
        cu_seqlens: Tensor | None = None) -> Tensor:
    """GPG (verl ``gpg``): ``alpha * (s - mean_group) / f_norm`` with ``alpha = N / max(#{s != 0}, 1)``
    and mean 0 for a group of one. verl's ``alpha`` argument is ignored by verl itself, so
    rlkern has none. Default ``f_norm=1.0`` as verl. ``response_mask``: optional ``[N, T]``, or
    packed ``[total]`` with ``cu_seqlens`` ``[N + 1]``.

    Returns:
        ``[N]`` float32, or response_mask's shape with ``response_mask``.
    """
    inverse = _outcome_args("gpg", scores, group_ids, response_mask, cu_seqlens, f_norm=f_norm)
    return _group_baseline_op(scores, inverse, None, response_mask, int32_offsets(cu_seqlens), "gpg", float(f_norm))


def reinforce_pp_baseline(scores: Tensor, group_ids, response_mask: Tensor, *,
                          cu_seqlens: Tensor | None = None) -> Tensor:
    """REINFORCE++-baseline (verl ``reinforce_plus_plus_baseline``): ``s - mean_group`` (0 mean
    for a group of one) broadcast to tokens, whitened over the batch's valid tokens, times mask.
    ``response_mask``: ``[N, T]``, or packed ``[total]`` with ``cu_seqlens`` ``[N + 1]``.

    Returns:
        response_mask's shape, float32.
    """
    _common.require("reinforce_pp_baseline", "response_mask", response_mask, "the result is per token")
    inverse = _outcome_args("reinforce_pp_baseline", scores, group_ids, response_mask, cu_seqlens)
    tokens = _group_baseline_op(scores, inverse, None, response_mask, int32_offsets(cu_seqlens), "mean", 0.0)
    return masked_whiten(tokens, response_mask) * response_mask.to(tokens.dtype)


@torch.library.custom_op("rlkern::grpo_passk", mutates_args=())
def _passk_op(scores: Tensor, inverse: Tensor, eps: float, norm_by_std: bool) -> Tensor:
    return _PASSK.pick(scores)(scores, inverse, eps, norm_by_std)


@_passk_op.register_fake
def _(scores, inverse, eps, norm_by_std):
    return scores.new_empty(scores.shape, dtype=out_dtype(scores))


def grpo_passk(scores: Tensor, group_ids, response_mask: Tensor | None = None, *, eps: float = 1e-6,
               norm_by_std: bool = True, cu_seqlens: Tensor | None = None) -> Tensor:
    """Pass@k GRPO (Chen et al. 2025, arXiv:2503.19595; verl ``grpo_passk``): only each group's
    best sample gets ``(max - second max) / (std + eps)`` (unbiased std; no division with
    ``norm_by_std=False``), every other sample 0. Ties for the best give 0.

    verl reads ``norm_adv_by_std_in_grpo`` from its ``config`` only; rlkern takes it here.
    A group of one raises ValueError on CPU (as verl) and gives NaN on GPU. ``response_mask``:
    optional ``[N, T]``, or packed ``[total]`` with ``cu_seqlens`` ``[N + 1]``.

    Returns:
        ``[N]`` float32, or response_mask's shape with ``response_mask``.
    """
    _checks.flag("grpo_passk", "norm_by_std", norm_by_std)
    inverse = _outcome_args("grpo_passk", scores, group_ids, response_mask, cu_seqlens, eps=eps)
    _checks.no_nan("grpo_passk", "scores", scores)  # the group's best and second best are found by comparing
    return _to_tokens(_passk_op(scores, inverse, float(eps), bool(norm_by_std)), response_mask,
                      int32_offsets(cu_seqlens))


@torch.library.custom_op("rlkern::bnpo", mutates_args=())
def _bnpo_op(scores: Tensor, inverse: Tensor, min_value: float, max_value: float) -> Tensor:
    return _BNPO.pick(scores)(scores, inverse, min_value, max_value)


@_bnpo_op.register_fake
def _(scores, inverse, min_value, max_value):
    return scores.new_empty(scores.shape, dtype=out_dtype(scores))


def bnpo(scores: Tensor, group_ids, response_mask: Tensor | None = None, *, min_value: float = 0.0,
         max_value: float = 1.0, cu_seqlens: Tensor | None = None) -> Tensor:
    """BNPO (Xiao et al. 2025, "BNPO: Beta Normalization Policy Optimization", arXiv:2506.02864),
    as in the authors' verl recipe (``compute_bnpo_outcome_advantage``):

        s   = (score - min_value) / (max_value - min_value)          (rewards mapped to [0, 1])
        p_g = mean of s over group g (0 for a group of one)          (success rate)
        mu, var = mean and unbiased variance of p_g over the batch's groups (0 and 1 if one group)
        a = (mu (1 - mu) / var - 1) mu,  b = (mu (1 - mu) / var - 1) (1 - mu)   (Beta moments fit)
        alpha = max(1 + a / 3, 1),  beta = max(1 + b / 3, 1)
        A_i = clamp(1 / BetaPDF(p_g; alpha, beta), 0, 1e6) * (s_i - p_g)

    When every group has the same success rate (var = 0) the fit is undefined (the authors'
    code gives NaN); rlkern uses weight 1 there. Success rates outside [0, 1] raise on CPU.
    ``response_mask``: optional ``[N, T]``, or packed ``[total]`` with ``cu_seqlens`` ``[N + 1]``.

    Returns:
        ``[N]`` float32, or response_mask's shape with ``response_mask``.
    """
    inverse = _outcome_args("bnpo", scores, group_ids, response_mask, cu_seqlens, min_value=min_value,
                            max_value=max_value)
    if not max_value > min_value:
        raise ValueError(f"bnpo: max_value must exceed min_value, got min_value={min_value}, max_value={max_value}")
    return _to_tokens(_bnpo_op(scores, inverse, float(min_value), float(max_value)), response_mask,
                      int32_offsets(cu_seqlens))


def gdpo(scores: Tensor, group_ids, response_mask: Tensor, *, weights=None, eps: float = 1e-6,
         norm_by_std: bool = True, cu_seqlens: Tensor | None = None) -> Tensor:
    """GDPO (arXiv:2601.05242; verl ``gdpo``): GRPO-normalize each reward component within its
    group separately, sum them with ``weights``, whiten over the batch's valid tokens.

        A = masked_whiten(sum_k w_k * grpo(scores[:, k])[:, None] * mask, mask) * mask

    Args:
        scores: ``[N]`` or ``[N, K]`` float, K reward components (verl's ``gdpo_reward_keys``).
        group_ids: see ``group_normalize``.
        response_mask: ``[N, T]``, or packed ``[total]`` with ``cu_seqlens`` ``[N + 1]``.
        weights: K floats (verl's ``gdpo_reward_weights``), default all 1.
        eps, norm_by_std: as in ``grpo``.

    Returns:
        response_mask's shape, float32.
    """
    _common.require("gdpo", "response_mask", response_mask, "the result is per token")
    _checks.tensors("gdpo", "scores", {"scores": (scores, "float"), "response_mask": (response_mask, "mask")})
    columns = scores[:, None] if scores.ndim == 1 else scores
    if columns.ndim != 2:
        raise ValueError(f"gdpo: scores must be [N] or [N, K], got {tuple(scores.shape)}")
    k = columns.shape[1]
    weights = [1.0] * k if weights is None else [_checks.number("gdpo", f"weights[{i}]", w) for i, w in enumerate(weights)]
    _checks.flag("gdpo", "norm_by_std", norm_by_std)
    if len(weights) != k:
        raise ValueError(f"gdpo: weights must have {k} entries (one per reward component), got {len(weights)}")
    inverse = _outcome_args("gdpo", columns[:, 0], group_ids, response_mask, cu_seqlens, eps=eps)
    total = None
    for j in range(k):
        part = _group_normalize_op(columns[:, j].contiguous(), inverse, None, None, float(eps),
                                   "unbiased" if norm_by_std else "none", "group", "verl")
        total = weights[j] * part if total is None else total + weights[j] * part
    tokens = broadcast(total, response_mask, int32_offsets(cu_seqlens))
    return masked_whiten(tokens, response_mask) * response_mask.to(tokens.dtype)


def gigpo_step_groups(step_returns: Tensor, anchor_keys, group_ids, response_mask: Tensor | None = None, *,
                      eps: float = 1e-6, norm_by_std: bool = False, cu_seqlens: Tensor | None = None) -> Tensor:
    """GiGPO step-level relative advantage (Feng et al. 2025, arXiv:2505.10978, Eq. 6-7).

    Steps of the same episode group (``group_ids``) that start from the same anchor state
    (``anchor_keys``: identical observations) form a step group; each step's advantage is its
    discounted return minus the step group's mean (``norm_by_std=True``: divided by the
    group's unbiased std + eps; GiGPO's "mean_std_norm" mode, default "mean_norm" = False).
    A step group of one gets 0, as in verl-agent's ``step_norm_reward``.

    Args:
        step_returns: ``[S]`` float, discounted return of each step.
        anchor_keys: ``[S]`` anchor-state keys (str / int forms of ``group_ids``).
        group_ids: ``[S]`` episode-group ids (the prompt uid).
        response_mask: optional ``[S, T]``, or packed ``[total]`` with ``cu_seqlens`` ``[S + 1]``
            (broadcast to tokens).

    Returns:
        ``[S]`` float32, or response_mask's shape with ``response_mask``.
    """
    op = "gigpo_step_groups"
    _checks.tensors(op, "step_returns", {"step_returns": (step_returns, "float")})
    _checks.flag(op, "norm_by_std", norm_by_std)
    n = step_returns.shape[0] if step_returns.ndim == 1 else -1
    episode = _outcome_args(op, step_returns, group_ids, response_mask, cu_seqlens, eps=eps)
    anchor = dense(op, anchor_keys, n=n, device=step_returns.device, name="anchor_keys")
    inverse = dense(op, episode * max(n, 1) + anchor)
    return _group_normalize_op(step_returns, inverse, response_mask, int32_offsets(cu_seqlens), float(eps),
                               "unbiased" if norm_by_std else "none", "group", "zero")
