"""Reward-side math of the RL trainers: the pieces between a verifier's score and the advantage
op that the research list's algorithms need and no other op computes.

Three ops, one per concept (CONTRIBUTING.md, API conventions 2):

- ``overlong_rewards``: DAPO's soft overlong punishment, a length-dependent penalty added to
  each sample's score (verl's ``overlong_buffer`` of its DAPO reward manager).
- ``kl_rewards``: token-level rewards with the KL penalty folded in (verl's ``apply_kl_penalty``
  with ``use_kl_in_reward``, OpenRLHF's ``compute_reward``): the outcome score on each
  response's last token minus ``kl_coef`` times a per-token KL estimate.
- ``gigpo_advantages``: GiGPO's combined advantage, the episode-level advantage plus omega times
  the step-level (anchor-state group) advantage.
- ``action_rewards``: UI-R1's rule-based reward of a GUI agent's parsed actions (action type,
  click point inside the target's box, format).

They are constants of the policy update: the inputs are detached, no gradient flows back.
Backends (same arguments, same outputs): C++ (csrc/rewards.cpp, CPU), Triton
(kernels/rewards.py, GPU), and the float64 reference (rlkern/reference/rewards.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rlkern import _backend
from rlkern.ops import _checks
from rlkern.ops._layout import int32_offsets, out_dtype
from rlkern.ops.advantages import outcome_to_tokens
from rlkern.ops.advantages._common import token_layout
from rlkern.reference import rewards as reference

__all__ = ["overlong_rewards", "kl_rewards", "gigpo_advantages", "action_rewards"]

SAMPLE_METHODS = reference.SAMPLE_METHODS
KL_ESTIMATORS = reference.KL_ESTIMATORS


def _torch_sample(a, b, method, p0, p1, p2):
    out = reference.sample_rewards(a, b, SAMPLE_METHODS[method], [p0, p1, p2])
    return out.to(a.dtype).to(a.device)


def _torch_kl(scores, logprobs, ref_logprobs, mask, cu_seqlens, estimator, kl_coef, kl_clip, low, high):
    clip = None if kl_clip < 0 else kl_clip
    bounds = None if (low == -math.inf and high == math.inf) else (low, high)
    out = reference.kl_rewards(scores.cpu(), logprobs.cpu(), ref_logprobs.cpu(), mask.cpu(),
                               KL_ESTIMATORS[estimator], kl_coef, clip, bounds,
                               None if cu_seqlens is None else cu_seqlens.cpu())
    return out.to(logprobs.dtype).to(logprobs.device)


def _torch_action(pred_types, true_types, points, boxes, fmt):
    out = reference.action_rewards(pred_types.cpu(), true_types.cpu(), points.cpu(), boxes.cpu(), fmt.cpu())
    return out.to(points.dtype).to(points.device)


_ACTION = _backend.Kernels("action_rewards", cpp="cpp_action_rewards", triton="rewards.action_rewards",
                           torch=_torch_action, fp64=("cpp", "triton"))
_SAMPLE = _backend.Kernels("sample_rewards", cpp="cpp_sample_rewards", triton="rewards.sample_rewards",
                           torch=_torch_sample, fp64=("cpp", "triton"))
_KL = _backend.Kernels("kl_rewards", cpp="cpp_kl_rewards", triton="rewards.kl_rewards", torch=_torch_kl,
                       fp64=("cpp", "triton"))


@torch.library.custom_op("rlkern::_sample_rewards", mutates_args=())
def _sample_op(a: Tensor, b: Tensor, method: int, p0: float, p1: float, p2: float) -> Tensor:
    # a, b [N] contiguous fp32/fp64 (one dtype); method: SAMPLE_METHODS index; p0..p2 its parameters
    # (overlong: max_length, cache_length, penalty_factor; gigpo: step_weight)
    return _SAMPLE.pick(a)(a, b, method, p0, p1, p2)


@_sample_op.register_fake
def _(a, b, method, p0, p1, p2):
    return torch.empty_like(a)


@torch.library.custom_op("rlkern::kl_rewards", mutates_args=())
def _kl_op(scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, cu_seqlens: Tensor | None,
           estimator: int, kl_coef: float, kl_clip: float, low: float, high: float) -> Tensor:
    # scores [B], logprobs / ref_logprobs [B, T] (or packed [total] with int32 cu_seqlens [B + 1])
    # contiguous fp32/fp64 (one dtype); mask of their shape, bool; estimator: KL_ESTIMATORS index;
    # kl_clip < 0: none; low / high: the score's clip (+-inf: none)
    return _KL.pick(logprobs)(scores, logprobs, ref_logprobs, mask, cu_seqlens, estimator, kl_coef, kl_clip, low,
                              high)


@_kl_op.register_fake
def _(scores, logprobs, ref_logprobs, mask, cu_seqlens, estimator, kl_coef, kl_clip, low, high):
    return torch.empty_like(logprobs)


@torch.library.custom_op("rlkern::action_rewards", mutates_args=())
def _action_op(pred_types: Tensor, true_types: Tensor, points: Tensor, boxes: Tensor, fmt: Tensor) -> Tensor:
    # types [N] int64; points [N, 2], boxes [N, 4], fmt [N] contiguous fp32/fp64 (one dtype)
    return _ACTION.pick(points)(pred_types, true_types, points, boxes, fmt)


@_action_op.register_fake
def _(pred_types, true_types, points, boxes, fmt):
    return points.new_empty(pred_types.shape)


def _compute(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` detached, contiguous, in the kernels' compute dtype (float32, or float64)."""
    return t.detach().to(dtype).contiguous()


def _per_sample(op: str, name: str, t, like: Tensor, like_name: str) -> None:
    """``t`` is a float or int ``[N]`` tensor of ``like``'s shape, on its device."""
    if not isinstance(t, Tensor) or not (t.dtype.is_floating_point or t.dtype in _checks.INTS):
        raise TypeError(f"{op}: {name} must be a float or int torch.Tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if tuple(t.shape) != tuple(like.shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(like.shape)} (as {like_name}), got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {like_name} is on {like.device}")


def overlong_rewards(scores: Tensor, lengths: Tensor, *, max_length: int, cache_length: int = 4096,
                     penalty_factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment ("DAPO: An Open-Source LLM Reinforcement Learning System
    at Scale", its overlong reward shaping), added to each sample's score. With ``L`` the
    response length, ``L_max = max_length`` and ``L_cache = cache_length``::

        R_length(L) = 0                                 L <= L_max - L_cache
                    = ((L_max - L_cache) - L) / L_cache L_max - L_cache < L <= L_max
                    = -1                                L_max < L
        r = score + penalty_factor * R_length(L)

    verl 0.9.1's DAPO reward manager (``verl/workers/reward_manager/dapo.py``,
    ``reward_model.overlong_buffer.{len, penalty_factor}``) adds ``min(-(L - (L_max - L_cache)) /
    L_cache * penalty_factor, 0)`` with ``L_max`` its ``max_resp_len`` and ``L_cache`` its
    ``overlong_buffer.len``: the same numbers for every ``L <= L_max`` (a rollout never exceeds
    ``max_resp_len`` there); past ``L_max`` we follow the paper's -1 (verl's line keeps falling).
    Defaults: ``cache_length`` 4096 (the paper's soft punish cache, with ``L_max`` 20480 = its
    16384 expected length + 4096), ``penalty_factor`` 1.0 (the paper's; verl's recipe's);
    ``max_length`` has no default (the trainer's response length limit).

    Args:
        scores: ``[N]`` float, one outcome score per sample.
        lengths: ``[N]`` float or int, each response's token count.
        max_length: ``L_max``, an int >= 1.
        cache_length: ``L_cache``, an int in [1, max_length].
        penalty_factor: a finite float (the penalty at and past ``L_max``).

    Returns:
        ``[N]`` float32 (float64 for float64 scores), without gradient; a NaN score stays NaN.
    """
    op = "overlong_rewards"
    _checks.tensors(op, "scores", {"scores": (scores, "float")})
    if scores.ndim != 1:
        raise ValueError(f"{op}: scores must be [N] (one score per sample), got {tuple(scores.shape)}")
    _per_sample(op, "lengths", lengths, scores, "scores")
    length = _checks.number(op, "max_length", max_length, low=1, integer=True)
    cache = _checks.number(op, "cache_length", cache_length, low=1, high=length, integer=True)
    factor = _checks.number(op, "penalty_factor", penalty_factor)
    if _checks.host_checks(lengths) and lengths.numel() and not bool(torch.isfinite(lengths.double()).all()):
        raise ValueError(f"{op}: lengths must be finite")
    dtype = out_dtype(scores)
    return _sample_op(_compute(scores, dtype), _compute(lengths, dtype), 0, float(length), float(cache), factor)


def gigpo_advantages(episode: Tensor, step: Tensor, response_mask: Tensor | None = None, *, step_weight: float = 1.0,
                     cu_seqlens: Tensor | None = None) -> Tensor:
    """GiGPO's combined advantage ("Group-in-Group Policy Optimization for LLM Agent Training",
    Feng et al. 2025, its combined advantage)::

        A(a_t) = A_E(tau) + omega * A_S(a_t)

    ``A_E``: the episode-level advantage of the step's trajectory (``grpo`` over the episode
    returns of each group), ``A_S``: the step-level advantage over the anchor-state group
    (``gigpo_step_groups``), ``omega = step_weight`` (1.0, the paper's and verl-agent's default).
    Pass the per-step ``[S]`` results of both (no ``response_mask``) and this op's
    ``response_mask`` to broadcast the sum to the tokens (``outcome_to_tokens``).

    Args:
        episode: ``[S]`` float, each step's episode advantage.
        step: ``[S]`` float, each step's step-group advantage.
        response_mask: optional ``[S, T]``, or packed ``[total]`` with ``cu_seqlens`` ``[S + 1]``.
        step_weight: omega, a finite float.

    Returns:
        ``[S]`` float32 (float64 for float64 ``episode``), or response_mask's shape; without
        gradient.
    """
    op = "gigpo_advantages"
    _checks.tensors(op, "episode", {"episode": (episode, "float"), "step": (step, "float")})
    if episode.ndim != 1:
        raise ValueError(f"{op}: episode must be [S] (one advantage per step), got {tuple(episode.shape)}")
    _per_sample(op, "step", step, episode, "episode")
    weight = _checks.number(op, "step_weight", step_weight)
    if response_mask is not None:  # checked here so that errors name this op (outcome_to_tokens re-checks)
        _checks.tensors(op, "episode", {"episode": (episode, "float"), "response_mask": (response_mask, "mask")})
        token_layout(op, episode.shape[0], response_mask, cu_seqlens)
    dtype = out_dtype(episode)
    out = _sample_op(_compute(episode, dtype), _compute(step, dtype), 1, weight, 0.0, 0.0)
    if response_mask is None:
        if cu_seqlens is not None:
            raise ValueError(f"{op}: cu_seqlens is only read with a packed response_mask, got no response_mask")
        return out
    return outcome_to_tokens(out, response_mask, cu_seqlens=cu_seqlens)


def kl_rewards(scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, response_mask: Tensor, *, kl_coef: float,
               kl_estimator: str = "k3", kl_clip: float | None = None, reward_clip=None,
               cu_seqlens: Tensor | None = None) -> Tensor:
    """Token rewards with the KL penalty folded in (verl 0.9.1's ``apply_kl_penalty``, OpenRLHF
    0.11.2's ``compute_reward``; PPO / REINFORCE++ / RLOO with the KL in the reward)::

        r_t = -kl_coef * KL_t * m_t + [t = last_b] * clip(score_b)

    ``m`` the response mask, ``last_b`` the last response token of row b (a row without one is
    all 0), ``KL_t`` the estimate of ``kl_penalty`` (verl's ``kl_penalty_forward``) between the
    rollout policy's ``logprobs`` and the reference's, clamped to ``[-kl_clip, kl_clip]`` when
    ``kl_clip`` is given. How the peers map to it:

    - verl: ``token_level_rewards = token_level_scores - beta * kl_penalty(old_log_probs,
      ref_log_prob, kl_penalty) * response_mask``, the scores placed on the last response token by
      the reward manager: ``kl_coef = kl_ctrl.value``, ``kl_estimator = algorithm.kl_penalty``
      (verl's default "kl" = k1: pass it; our default is k3, as every rlkern op with a KL
      estimator, ``kl_penalty`` and ``policy_loss``).
    - OpenRLHF: ``compute_reward(r, kl_coef, kl, action_mask, reward_clip_range)`` with ``kl =
      compute_approx_kl(..., kl_estimator)`` (its default k1): ``reward_clip = reward_clip_range``, ``kl_clip=10``
      (OpenRLHF clamps every estimator's value to [-10, 10]); its k3 has verl's value. OpenRLHF
      leaves the KL on the padding tokens (masked later by its advantage code); we write 0
      there. A ``kl_coef <= 0`` is 0 in OpenRLHF; here it must be >= 0.

    The "+" straight-through estimator names (``k3+``) have the value of their base estimator:
    the rewards carry no gradient, so they are accepted as it.

    Args:
        scores: ``[B]`` float, one outcome score per response.
        logprobs: ``[B, T]`` float, the rollout policy's token log-probs.
        ref_logprobs: ``[B, T]`` float, the reference policy's.
        response_mask: ``[B, T]`` bool/int/float, nonzero = a response token.
        kl_coef: beta, >= 0.
        kl_estimator: "k1" / "kl", "abs", "k2" / "mse", "k3" / "low_var_kl" (each optionally with "+").
        kl_clip: None or a bound >= 0 on |KL_t|.
        reward_clip: None or ``(low, high)``: the score is clamped to it (OpenRLHF's
            ``reward_clip_range``).
        cu_seqlens: int32/int64 ``[B + 1]``: the packed layout, logprobs / ref_logprobs /
            response_mask ``[total]`` and sequence b ``[cu[b], cu[b + 1])``.

    Returns:
        logprobs' shape (``[B, T]`` or ``[total]``), float32 (float64 for float64 logprobs), without
        gradient.
    """
    op = "kl_rewards"
    _checks.tensors(op, "logprobs", {"logprobs": (logprobs, "float"), "ref_logprobs": (ref_logprobs, "float"),
                                     "scores": (scores, "float"), "response_mask": (response_mask, "mask")})
    if cu_seqlens is None and logprobs.ndim != 2:
        raise ValueError(f"{op}: logprobs must be [B, T] (or packed [total] with cu_seqlens), got {tuple(logprobs.shape)}")
    if cu_seqlens is not None and logprobs.ndim != 1:
        raise ValueError(f"{op}: logprobs must be packed [total] with cu_seqlens, got {tuple(logprobs.shape)}")
    for name, t in (("ref_logprobs", ref_logprobs), ("response_mask", response_mask)):
        if tuple(t.shape) != tuple(logprobs.shape):
            raise ValueError(f"{op}: {name} must have shape {tuple(logprobs.shape)}, got {tuple(t.shape)}")
    rows = (logprobs.shape[0] if cu_seqlens is None
            else _checks.cu_seqlens(op, cu_seqlens, logprobs.shape[0], logprobs.device, "logprobs"))
    if tuple(scores.shape) != (rows,):
        raise ValueError(f"{op}: scores must have shape ({rows},) (one per sequence), got {tuple(scores.shape)}")
    base = kl_estimator[:-1] if isinstance(kl_estimator, str) and kl_estimator.endswith("+") else kl_estimator
    if base not in reference.KL_ALIASES:
        raise ValueError(f"{op}: kl_estimator must be one of {tuple(reference.KL_ALIASES)} (optionally with '+'), "
                         f"got {kl_estimator!r}")
    coef = _checks.number(op, "kl_coef", kl_coef, low=0.0)
    clip = -1.0 if kl_clip is None else _checks.number(op, "kl_clip", kl_clip, low=0.0)
    low, high = -math.inf, math.inf
    if reward_clip is not None:
        if not isinstance(reward_clip, (tuple, list)) or len(reward_clip) != 2:
            raise ValueError(f"{op}: reward_clip must be None or (low, high), got {reward_clip!r}")
        low = _checks.number(op, "reward_clip", reward_clip[0])
        high = _checks.number(op, "reward_clip", reward_clip[1], low=low)
    dtype = out_dtype(logprobs)
    mask = (response_mask != 0).contiguous()
    return _kl_op(_compute(scores, dtype), _compute(logprobs, dtype), _compute(ref_logprobs, dtype), mask,
                  int32_offsets(cu_seqlens), KL_ESTIMATORS.index(reference.KL_ALIASES[base]), coef, clip, low, high)


def action_rewards(pred_types: Tensor, true_types: Tensor, points: Tensor, boxes: Tensor,
                   format_ok: Tensor | None = None) -> Tensor:
    """UI-R1's rule-based action reward ("UI-R1: Enhancing Action Prediction of GUI Agents by
    Reinforcement Learning", Lu et al. 2025), per sample::

        R = R_T + R_C + R_F
        R_T = [predicted action type == ground-truth type]
        R_C = [x1 <= x <= x2 and y1 <= y <= y2]   (the predicted point (x, y) in the target's box)
        R_F = format_ok                            (the <think> / <answer> format check)

    The text of an answer is parsed by the caller (the reward function that reads the model's
    output): action types as integer codes (a parse failure: a code no ground truth uses, e.g.
    -1), the click point as floats (NaN when the answer has none), the format check as 0 / 1.
    Choices the paper leaves open: the box is inclusive; R_C is computed whether or not the types
    match (the paper sums two independent checks); a ground truth without a box (an action with
    no coordinate: back, scroll, typing; pass a NaN box) gets R_C = 0 (every completion of a
    prompt shares its ground truth, so a constant there would not change GRPO's advantages).
    The RL update is GRPO over R: ``grpo(action_rewards(...), group_ids)``.

    Args:
        pred_types, true_types: ``[N]`` int, action type codes.
        points: ``[N, 2]`` float, the predicted (x, y).
        boxes: ``[N, 4]`` float, the ground truth's (x1, y1, x2, y2), or NaN.
        format_ok: ``[N]`` bool / int / float, the format reward (None: 0).

    Returns:
        ``[N]`` float32 (float64 for float64 points), without gradient.
    """
    op = "action_rewards"
    _checks.tensors(op, "points", {"points": (points, "float"), "boxes": (boxes, "float"),
                                   "pred_types": (pred_types, "int"), "true_types": (true_types, "int"),
                                   "format_ok": (format_ok, "mask")})
    if pred_types.ndim != 1:
        raise ValueError(f"{op}: pred_types must be [N], got {tuple(pred_types.shape)}")
    n = pred_types.shape[0]
    for name, t, shape in (("true_types", true_types, (n,)), ("points", points, (n, 2)), ("boxes", boxes, (n, 4)),
                           ("format_ok", format_ok, (n,))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{op}: {name} must have shape {shape}, got {tuple(t.shape)}")
    dtype = out_dtype(points)
    fmt = torch.zeros(n, dtype=dtype, device=points.device) if format_ok is None else _compute(format_ok, dtype)
    return _action_op(pred_types.detach().long().contiguous(), true_types.detach().long().contiguous(),
                      _compute(points, dtype), _compute(boxes, dtype), fmt)
