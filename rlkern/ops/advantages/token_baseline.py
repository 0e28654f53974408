"""Optimal Token Baseline (verl ``optimal_token_baseline`` / ``tir_optimal_token_baseline``)."""

from __future__ import annotations

import torch
from torch import Tensor

from rlkern import _backend
from rlkern.ops import _checks
from rlkern.ops._layout import int32_offsets, lastdim_contiguous, out_dtype
from rlkern.ops.advantages import _common, fallback
from rlkern.ops.advantages.groups import dense

_OTB = _backend.Kernels("optimal_token_baseline", cpp="cpp_optimal_token_baseline",
                        torch=fallback.optimal_token_baseline, fp64=("cpp",), atomics=True)


def _contiguous(t: Tensor | None) -> Tensor | None:
    return None if t is None else lastdim_contiguous(t)


@torch.library.custom_op("rlkern::optimal_token_baseline", mutates_args=())
def _otb_op(
    rewards: Tensor,  # [B, T] or packed [total], float
    mask: Tensor | None,  # rewards.shape, bool/int/float; None = every token valid
    inverse: Tensor,  # [B] int64 dense group numbers in [0, B)
    old_logprobs: Tensor,  # rewards.shape, float
    sum_pi_squared: Tensor,  # rewards.shape, float
    rollout_is_weights: Tensor | None,  # rewards.shape, float
    cu_seqlens: Tensor | None,  # [B + 1] int32 for the packed layout
    handle_zero_tail: bool,
    eps: float,
    multi_turn: bool,
) -> tuple[Tensor, Tensor]:
    # C++: one task per group (reward-to-go and path weights per row, per-position sums, outputs)
    return _OTB.pick(rewards)(_contiguous(rewards), _contiguous(mask), inverse, _contiguous(old_logprobs),
                              _contiguous(sum_pi_squared), _contiguous(rollout_is_weights), cu_seqlens,
                              handle_zero_tail, eps, multi_turn)


@_otb_op.register_fake
def _(rewards, mask, inverse, old_logprobs, sum_pi_squared, rollout_is_weights, cu_seqlens, handle_zero_tail, eps,
      multi_turn):
    dtype = out_dtype(rewards)
    return rewards.new_empty(rewards.shape, dtype=dtype), rewards.new_empty(rewards.shape, dtype=dtype)


def optimal_token_baseline(
    rewards: Tensor,
    group_ids,
    response_mask: Tensor | None,
    old_logprobs: Tensor,
    sum_pi_squared: Tensor,
    rollout_is_weights: Tensor | None = None,
    *,
    handle_zero_tail: bool = True,
    eps: float = 1e-8,
    multi_turn: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Optimal Token Baseline (verl ``optimal_token_baseline`` / ``tir_optimal_token_baseline``).

    Per group and aligned position t: ``B_t = sum_i G_it W_it / (sum_i W_it + eps)`` with
    ``G`` the reward-to-go, ``W_t = sum_{j <= t} (1 - 2 pi_j + sum pi^2) * rho_j^2`` over valid
    tokens; ``A = (G - B) * mask``; a group of one has B = 0; with ``handle_zero_tail`` a unique
    longest response (length = its number of valid tokens) gets B = 0 from the second-longest
    length on. ``multi_turn=True`` (TIR) aligns each response's valid tokens packed to the left
    and leaves empty responses out of their group. Defaults (``handle_zero_tail=True``,
    ``eps=1e-8``) as verl.

    Layouts. Padded: every tensor ``[B, T]``, the position of a token is its column
    (``multi_turn``: its index among the row's valid tokens). Packed (``cu_seqlens`` given):
    every tensor ``[total]``, sequence b is ``[cu[b], cu[b + 1])``, the position of a token is its
    index inside its own sequence (``multi_turn``: among the sequence's valid tokens); the
    numbers equal the padded layout's with each sequence right-padded into a row (masked padding).

    Backends: CPU tensors run a C++ kernel (``RLKERN_BACKEND=cpp``, the default there): one task
    per group, float64 sums in the group's batch order (the same numbers at any thread count),
    exp to 1 ulp, float32 or float64 rewards; other devices and ``RLKERN_BACKEND=torch`` run
    float64 PyTorch tensor ops (fallback.py, no host sync). The two agree to float64 rounding (the C++ scans add four
    tokens per step), far below the float32 outputs' rounding.

    Args:
        rewards: ``[B, T]`` float token-level rewards, or packed ``[total]``.
        group_ids: ``[B]`` group of each sequence; see ``group_normalize``.
        response_mask: rewards' shape, bool/int/float (nonzero = valid); None = every token valid.
        old_logprobs: rewards' shape, float (log pi of the sampled tokens).
        sum_pi_squared: rewards' shape, float (sum over the vocabulary of pi^2).
        rollout_is_weights: optional, rewards' shape, float (rho; W is scaled by rho^2).
        cu_seqlens: int32/int64 ``[B + 1]`` for the packed layout.

    Returns:
        ``(advantages, returns)`` of rewards' shape (``[B, T]`` or ``[total]``), float32 (float64
        for float64 rewards); ``returns`` is verl's reward-to-go (at every position, as verl),
        ``advantages`` are 0 at masked positions.
    """
    op = "optimal_token_baseline"
    _common.token_tensors(op, rewards, {"response_mask": (response_mask, "mask"),
                                        "old_logprobs": (old_logprobs, "float"),
                                        "sum_pi_squared": (sum_pi_squared, "float"),
                                        "rollout_is_weights": (rollout_is_weights, "float")}, eps=eps)
    _checks.number(op, "eps", eps, low=0.0)
    batch = _common.packed(op, rewards, cu_seqlens)
    inverse = dense(op, group_ids, n=batch, device=rewards.device)
    # NaN/inf in padding stays out of the group sums
    rewards, old_logprobs, sum_pi_squared, rollout_is_weights = (
        _checks.zero_masked(t, response_mask)
        for t in (rewards, old_logprobs, sum_pi_squared, rollout_is_weights))
    return _otb_op(rewards, response_mask, inverse, old_logprobs, sum_pi_squared, rollout_is_weights,
                   int32_offsets(cu_seqlens), bool(handle_zero_tail), float(eps), bool(multi_turn))
