"""Token-level estimators: GAE / EGAE, discounted returns (REINFORCE++), ReMax, whitening.

Each takes a padded ``[B, T]`` batch with a response mask (bool, int or float; read as
``mask != 0``) or a packed ``[total]`` batch with ``cu_seqlens`` (int32 or int64, ``[B + 1]``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlkern import _backend
from rlkern.ops import _checks
from rlkern.ops._layout import int32_offsets, lastdim_contiguous, out_dtype, segment_ids
from rlkern.ops.advantages import _common, fallback

_GAE = _backend.Kernels("gae", cpp="cpp_gae", triton="advantages.gae", torch=fallback.gae,
                        fp64=("cpp", "triton"))
_DISCOUNTED = _backend.Kernels("discounted_returns", cpp="cpp_discounted_returns",
                               triton="advantages.discounted_returns", torch=fallback.discounted_returns,
                               fp64=("cpp", "triton"))
_WHITEN = _backend.Kernels("masked_whiten", cpp="cpp_masked_whiten", torch=fallback.whiten, fp64=("cpp",))
_REMAX = _backend.Kernels("remax", cpp="cpp_remax", triton="advantages.remax", torch=fallback.remax,
                          fp64=("cpp", "triton"))


def _whiten(values: Tensor, mask: Tensor, shift_mean: bool, zero_masked: bool) -> Tensor:
    if values.dtype in (torch.float16, torch.bfloat16):  # the kernels read float32 / float64; the output is float32
        values = values.float()
    return _WHITEN.pick(values)(values, mask, shift_mean, zero_masked)


@torch.library.custom_op("rlkern::gae", mutates_args=())
def _gae_op(
    rewards: Tensor,  # [B, T] or packed [total], float
    values: Tensor,  # rewards.shape, same dtype
    mask: Tensor,  # rewards.shape, bool/int/float
    bootstrap: Tensor | None,  # [B] value after the last token (EGAE), or None (0)
    cu_seqlens: Tensor | None,  # [B + 1] int32 for the packed layout
    gamma: float,
    lam: float,
    whiten: bool,
) -> tuple[Tensor, Tensor]:
    adv, ret = _GAE.pick(rewards)(rewards, values, mask, bootstrap, cu_seqlens, gamma, lam)
    if whiten:
        adv = _whiten(adv, mask, True, True)
    return adv, ret


@_gae_op.register_fake
def _(rewards, values, mask, bootstrap, cu_seqlens, gamma, lam, whiten):
    dtype = out_dtype(rewards)
    return rewards.new_empty(rewards.shape, dtype=dtype), rewards.new_empty(rewards.shape, dtype=dtype)


def _last_valid_values(values: Tensor, valid: Tensor, cu_seqlens: Tensor | None) -> Tensor:
    """V(s_{l-1}) of every sequence: the value at its last valid token (0 without one), ``[B]`` (no host sync)."""
    dtype = out_dtype(values)
    if cu_seqlens is None:
        batch, steps = values.shape
        if steps == 0:
            return values.new_zeros(batch, dtype=dtype)
        last = torch.where(valid, torch.arange(steps, device=values.device), -1).amax(-1)
        at_last = values.gather(-1, last.clamp_min(0)[:, None])[:, 0]
    else:
        batch, total = cu_seqlens.shape[0] - 1, values.shape[0]
        if total == 0:
            return values.new_zeros(batch, dtype=dtype)
        positions = torch.where(valid, torch.arange(total, device=values.device), -1)
        last = torch.full((batch,), -1, dtype=torch.int64, device=values.device).scatter_reduce(
            0, segment_ids(cu_seqlens, total), positions, "amax")
        at_last = values[last.clamp_min(0)]
    return torch.where(last >= 0, at_last.to(dtype), 0.0)


def _bootstrap(op, rewards, values, response_mask, cu_seqlens, batch, truncated, bootstrap_values):
    """EGAE's value after the last token: V(s_{l-1}) (or bootstrap_values) where truncated, else 0."""
    if not isinstance(truncated, Tensor):
        raise TypeError(f"{op}: truncated must be a torch.Tensor [B], got {type(truncated).__name__}")
    _checks.tensors(op, "rewards", {"rewards": (rewards, "float"), "truncated": (truncated, "mask"),
                                    "bootstrap_values": (bootstrap_values, "float")},
                    shape={"truncated": (batch,), "bootstrap_values": (batch,)})
    next_value = _last_valid_values(values, response_mask != 0, cu_seqlens) if bootstrap_values is None else \
        bootstrap_values.to(out_dtype(rewards))
    return torch.where(truncated != 0, next_value, 0.0)


def _gae(op, rewards, values, response_mask, cu_seqlens, gamma, lam, whiten, truncated=None, bootstrap_values=None):
    _common.token_tensors(op, rewards, {"values": (values, "float"), "response_mask": (response_mask, "mask")},
                          gamma=gamma, lam=lam)
    _checks.flag(op, "whiten", whiten)
    batch = _common.packed(op, rewards, cu_seqlens)
    if values.dtype != rewards.dtype:
        values = values.to(rewards.dtype)
    bootstrap = None if op == "gae" else _bootstrap(op, rewards, values, response_mask, cu_seqlens, batch,
                                                   truncated, bootstrap_values)
    return _gae_op(lastdim_contiguous(rewards), lastdim_contiguous(values), lastdim_contiguous(response_mask),
                   bootstrap, int32_offsets(cu_seqlens), float(gamma), float(lam), bool(whiten))


def gae(
    rewards: Tensor,
    values: Tensor,
    response_mask: Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
    whiten: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation with verl's masking semantics.

    Right to left over the valid tokens of each sequence (mask != 0):
    ``delta_t = r_t + gamma * V_next - V_t``, ``A_t = delta_t + gamma * lam * A_next``, where
    "next" is the next *valid* token: masked positions (observation tokens in multi-turn
    rollouts, padding) are skipped and carry both the next value and the running advantage
    unchanged, exactly as verl's ``compute_gae_advantage_return``. A sequence ends with
    ``V_next = 0`` (see ``egae`` for truncated rollouts).

    Args:
        rewards: ``[B, T]`` token-level rewards (or packed ``[total]`` with ``cu_seqlens``),
            float16/bfloat16/float32/float64.
        values: critic values, shape of ``rewards`` (converted to rewards' dtype).
        response_mask: shape of ``rewards``, bool/int/float; nonzero = token is trained on.
        gamma: discount; default 1.0 as verl's ``algorithm.gamma``.
        lam: GAE lambda; default 1.0 as verl's ``algorithm.lam``.
        whiten: whiten the advantages over all valid tokens of the batch (verl's
            ``masked_whiten``: unbiased variance, 1e-8) — what verl's estimator returns.
        cu_seqlens: int32/int64 ``[B + 1]`` for the packed layout.

    Returns:
        ``(advantages, returns)``, each of rewards' shape, float32 (float64 for float64
        input). ``returns = unwhitened advantages + values``. Both are 0 at masked positions
        (verl leaves the carried advantage there; no loss reads it). ``whiten=True`` over fewer
        than 2 valid tokens raises ValueError on CPU, gives 0 on GPU.
    """
    return _gae("gae", rewards, values, response_mask, cu_seqlens, gamma, lam, whiten)


def egae(
    rewards: Tensor,
    values: Tensor,
    response_mask: Tensor,
    truncated: Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
    whiten: bool = False,
    cu_seqlens: Tensor | None = None,
    bootstrap_values: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Extended GAE (EGAE) of T-PPO (Fan et al. 2025, "Truncated Proximal Policy Optimization",
    arXiv:2506.15050): advantages for responses cut at length l before they finished.

    A truncated response has neither its reward nor the state s_l after its last generated
    token; EGAE keeps the GAE sum up to that token and stands in V(s_{l-1}) for V(s_l):

        A_t = sum_{k=0}^{l-1-t} (gamma * lam)^k * delta_{t+k},        t = 0 .. l-1
        delta_t     = r_t + gamma * V(s_{t+1}) - V(s_t),                t < l-1
        delta_{l-1} = r_{l-1} + gamma * V(s_{l-1}) - V(s_{l-1})         (V(s_l) := V(s_{l-1}))

    so with gamma = 1 the last token's TD residual is its reward alone. A finished response
    (``truncated[b] == 0``) gets plain ``gae`` (V after EOS = 0). Positions are the valid tokens
    (mask != 0), as in ``gae``: s_{t+1} is the next valid token and l-1 the last valid one.
    The (gamma * lam)^k weights are GAE's, unchanged.

    Source: the paper's full text was not reachable here; V(s_l) := V(s_{l-1}) is what the T-PPO
    recipe for verl computes (open verl pull request #3728, ported from ByteDance Seed's code with
    T-PPO authors as co-authors; ``compute_truncate_gae_advantage_return`` in
    ``recipe/tppo/tppo_algos.py``). That code forms an unfinished response's last residual as
    ``(gamma - 1) * V(s_{l-1})``, without ``r_{l-1}``; its reward manager gives unfinished
    responses score 0, so the two agree unless a per-token reward (a KL penalty folded into the
    rewards) sits on the cut token. Outside this op, the recipe also drops the advantages of
    the last ``window_ignore_token_num`` (8) tokens of an unfinished window (multiply
    ``response_mask`` accordingly), can use VAPO's length-adaptive lambda, and trains the critic
    on finished responses only, with Monte-Carlo returns (rlkern's ``returns`` of truncated rows
    are GAE's ``A + V``).

    Args:
        rewards, values, response_mask, gamma, lam, whiten, cu_seqlens: as in ``gae``.
        truncated: ``[B]`` bool/int/float, nonzero for a response cut before it finished.
        bootstrap_values: optional ``[B]`` float, the critic's V(s_l) for truncated responses:
            replaces the paper's V(s_l) := V(s_{l-1}) with the standard bootstrap of truncated
            GAE (Schulman et al. 2017, PPO); ignored where ``truncated`` is 0.

    Returns:
        ``(advantages, returns)`` as in ``gae`` (``returns = advantages + values``).
    """
    if not isinstance(truncated, Tensor):
        raise TypeError(f"egae: truncated must be a torch.Tensor [B], got {type(truncated).__name__}")
    return _gae("egae", rewards, values, response_mask, cu_seqlens, gamma, lam, whiten, truncated, bootstrap_values)


@torch.library.custom_op("rlkern::discounted_returns", mutates_args=())
def _discounted_op(rewards: Tensor, mask: Tensor, cu_seqlens: Tensor | None, gamma: float) -> Tensor:
    return _DISCOUNTED.pick(rewards)(rewards, mask, cu_seqlens, gamma)


@_discounted_op.register_fake
def _(rewards, mask, cu_seqlens, gamma):
    return rewards.new_empty(rewards.shape, dtype=out_dtype(rewards))


def discounted_returns(rewards: Tensor, response_mask: Tensor, *, gamma: float = 1.0,
                       cu_seqlens: Tensor | None = None) -> Tensor:
    """Discounted reward-to-go over valid tokens: ``G_t = r_t + gamma * G_next`` (REINFORCE++).

    Masked positions are skipped (the running return carries across them) and hold 0, as in
    verl's ``compute_reinforce_plus_plus_outcome_advantage``.

    Args:
        rewards: ``[B, T]`` float (or packed ``[total]`` with ``cu_seqlens``).
        response_mask: shape of ``rewards``, bool/int/float.
        gamma: discount; default 1.0 as verl's ``algorithm.gamma``.
        cu_seqlens: int32/int64 ``[B + 1]`` for the packed layout.

    Returns:
        ``returns`` of rewards' shape, float32 (float64 for float64 input).
    """
    return _discounted("discounted_returns", rewards, response_mask, gamma, cu_seqlens)


def _discounted(op, rewards, response_mask, gamma, cu_seqlens) -> Tensor:
    _common.token_tensors(op, rewards, {"response_mask": (response_mask, "mask")}, gamma=gamma)
    _common.packed(op, rewards, cu_seqlens)
    return _discounted_op(lastdim_contiguous(rewards), lastdim_contiguous(response_mask), int32_offsets(cu_seqlens),
                          float(gamma))


def reinforce_pp(rewards: Tensor, response_mask: Tensor, *, gamma: float = 1.0,
                 cu_seqlens: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """REINFORCE++ (verl ``reinforce_plus_plus``): whitened discounted returns.

    Args:
        rewards: ``[B, T]`` float token-level rewards (or packed ``[total]`` with ``cu_seqlens``).
        response_mask: rewards' shape, bool/int/float.
        gamma: discount; default 1.0 as verl's ``algorithm.gamma``.
        cu_seqlens: int32/int64 ``[B + 1]`` for the packed layout.

    Returns:
        ``(advantages, returns)`` of rewards' shape, float32: ``advantages =
        masked_whiten(returns) * mask`` (over the whole batch), ``returns =
        discounted_returns(rewards, mask, gamma)``.
    """
    returns = _discounted("reinforce_pp", rewards, response_mask, gamma, cu_seqlens)
    return masked_whiten(returns, response_mask) * (response_mask != 0), returns


@torch.library.custom_op("rlkern::masked_whiten", mutates_args=())
def _whiten_op(values: Tensor, mask: Tensor, shift_mean: bool) -> Tensor:
    return _whiten(values, mask, shift_mean, False)


@_whiten_op.register_fake
def _(values, mask, shift_mean):
    return values.new_empty(values.shape, dtype=out_dtype(values))


def masked_whiten(values: Tensor, response_mask: Tensor, *, shift_mean: bool = True) -> Tensor:
    """verl's ``masked_whiten``: ``(x - mean) / sqrt(var + 1e-8)`` with statistics over the mask.

    mean = sum / (n + 1e-8) and the unbiased variance ``n / (n - 1)`` times the mean squared
    deviation, as verl's ``masked_mean``/``masked_var``; statistics accumulate in float64.

    Args:
        values: any shape, float.
        response_mask: shape of ``values``, bool/int/float (nonzero = included in the statistics).
        shift_mean: False adds the mean back (verl's default True).

    Returns:
        Tensor of values' shape, float32 (float64 for float64 input); every position is
        transformed (as verl; multiply by the mask to zero padding). Fewer than 2 valid
        entries: ValueError on CPU (verl raises too), zeros on GPU.
    """
    _checks.tensors("masked_whiten", "values", {"values": (values, "float"),
                                                "response_mask": (response_mask, "mask")},
                    shape=tuple(values.shape) if isinstance(values, Tensor) else None)
    _checks.flag("masked_whiten", "shift_mean", shift_mean)
    return _whiten_op(values, response_mask, bool(shift_mean))


@torch.library.custom_op("rlkern::remax", mutates_args=())
def _remax_op(rewards: Tensor, reward_baselines: Tensor, mask: Tensor,
              cu_seqlens: Tensor | None) -> tuple[Tensor, Tensor]:
    return _REMAX.pick(rewards)(lastdim_contiguous(rewards), reward_baselines, lastdim_contiguous(mask), cu_seqlens)


@_remax_op.register_fake
def _(rewards, reward_baselines, mask, cu_seqlens):
    dtype = out_dtype(rewards)
    return rewards.new_empty(rewards.shape, dtype=dtype), rewards.new_empty(rewards.shape, dtype=dtype)


def remax(rewards: Tensor, reward_baselines: Tensor, response_mask: Tensor, *,
          cu_seqlens: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """ReMax (Li et al. 2023; verl ``remax``): ``returns_t = sum_{u >= t} r_u * mask_u`` and
    ``advantages = returns - baseline * mask``, with the greedy rollout's score as baseline.

    Args:
        rewards: ``[B, T]`` float (or packed ``[total]`` with ``cu_seqlens``).
        reward_baselines: ``[B]`` float.
        response_mask: rewards' shape, bool/int/float.
        cu_seqlens: int32/int64 ``[B + 1]`` for the packed layout (sums run within each sequence).

    Returns:
        ``(advantages, returns)`` of rewards' shape, float32 (verl's numbers at every position).
    """
    _common.token_tensors("remax", rewards, {"response_mask": (response_mask, "mask")})
    batch = _common.packed("remax", rewards, cu_seqlens)
    _checks.tensors("remax", "rewards", {"rewards": (rewards, "float"),
                                         "reward_baselines": (reward_baselines, "float")},
                    shape={"reward_baselines": (batch,)})
    rewards = _checks.zero_masked(rewards, response_mask)  # NaN in padding stays out of the sums
    return _remax_op(rewards, reward_baselines, response_mask, int32_offsets(cu_seqlens))
