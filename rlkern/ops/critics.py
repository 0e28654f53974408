"""Critic / value-based and constrained RL math of the research list as ops: OREO's soft Bellman
losses (``soft_bellman_loss``), PPO-max's running reward normalization (``running_reward_norm``),
CGPO's constrained rewards over a mixture of judges (``constrained_rewards``) and Direct Advantage
Policy Optimization's step loss (``step_advantage_loss``). ArCHer needs no op of its own: its
utterance-level TD critic is ``rlkern.gae(..., lam=0.0)`` over per-turn tensors plus
``rlkern.value_loss``, its token advantages ``rlkern.broadcast_to_tokens`` (tests/test_critics.py).

Backends (same arguments, same outputs): C++ (csrc/critics.cpp), Triton (kernels/critics.py) and
PyTorch (below, over rlkern/reference/critics.py). For the two losses one forward kernel computes
each row's loss terms and the per-token gradients; the backward scales those saved gradients by
the rows' upstream gradients (elementwise).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from rlkern import _backend
from rlkern.ops import _checks
from rlkern.ops._layout import int32_offsets, out_dtype, segment_ids
from rlkern.reference import critics as reference

__all__ = ["soft_bellman_loss", "running_reward_norm", "RewardNorm", "constrained_rewards", "ConstrainedRewards",
           "step_advantage_loss"]

_OP = "soft_bellman_loss"


def _torch_soft_bellman(logprobs, ref, values, mask, rewards, cu_seqlens, beta):
    """The PyTorch backend of cpp_soft_bellman (over the reference's residuals, on the CPU)."""
    dtype, dev = out_dtype(logprobs), logprobs.device
    logprobs, ref, values, rewards = (t.cpu() for t in (logprobs, ref, values, rewards))
    mask = None if mask is None else mask.cpu()
    cu = None if cu_seqlens is None else cu_seqlens.cpu().long()
    e = reference.soft_bellman_residuals(logprobs, ref, values, rewards, mask, beta=beta, cu_seqlens=cu)
    valid = torch.ones(logprobs.shape, dtype=torch.bool) if mask is None else mask != 0
    d = torch.where(valid, ref.double() - logprobs.double(), 0.0)
    rows = rewards.shape[0]
    if cu is None:
        per_row = lambda x: x.sum(-1)  # noqa: E731
    else:
        seg = segment_ids(cu, logprobs.shape[0])
        per_row = lambda x: torch.zeros(rows, dtype=torch.float64).index_add_(0, seg, x)  # noqa: E731
    lengths = per_row(valid.double())
    inv = torch.where(lengths > 0, 1.0 / lengths.clamp(min=1), 0.0)
    inv_tok = inv[:, None] if cu is None else inv[seg]
    k3 = torch.where(valid, torch.exp(d) - d - 1.0, 0.0)
    gv = torch.where(valid, 2.0 * e * inv_tok, 0.0)
    gk = torch.where(valid, (1.0 - torch.exp(d)) * inv_tok, 0.0)
    outs = (per_row(e * e) * inv, per_row(k3) * inv, lengths, gv, gk)
    return tuple(t.to(dev, dtype) for t in outs)


_KERNELS = _backend.Kernels(_OP, cpp="cpp_soft_bellman", triton="critics.soft_bellman", torch=_torch_soft_bellman,
                            fp64=("cpp", "triton"))


@torch.library.custom_op("rlkern::soft_bellman_loss", mutates_args=())
def _soft_bellman_op(logprobs: Tensor, ref: Tensor, values: Tensor, mask: Tensor | None, rewards: Tensor,
                     cu_seqlens: Tensor | None, beta: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    sq, kl, lengths, gv, gk = _KERNELS.pick(logprobs)(logprobs, ref, values, mask, rewards, cu_seqlens, beta)
    return sq, sq.clone(), kl, lengths, gv, gk


@_soft_bellman_op.register_fake
def _soft_bellman_fake(logprobs, ref, values, mask, rewards, cu_seqlens, beta):
    dtype = out_dtype(logprobs)
    rows = [rewards.new_empty(rewards.shape, dtype=dtype) for _ in range(4)]
    return (*rows, logprobs.new_empty(logprobs.shape, dtype=dtype), logprobs.new_empty(logprobs.shape, dtype=dtype))


def _setup_context(ctx, inputs, output):
    logprobs, _ref, values, _mask, _rewards, cu_seqlens, beta = inputs
    ctx.beta = beta
    ctx.dtypes = (logprobs.dtype, values.dtype)
    ctx.save_for_backward(cu_seqlens, output[4], output[5])


def _backward(ctx, g_value, g_policy, g_kl, *_):
    cu_seqlens, gv, gk = ctx.saved_tensors

    def per_token(g):
        if g is None:
            return None
        g = g.to(gv.dtype)
        return g[:, None] if cu_seqlens is None else g[segment_ids(cu_seqlens.long(), gv.shape[0])]

    gval, gpol, gkl = per_token(g_value), per_token(g_policy), per_token(g_kl)
    grad_values = None if gval is None else (gval * gv).to(ctx.dtypes[1])
    grad_lp = None
    if gpol is not None:
        grad_lp = ctx.beta * gpol * gv
    if gkl is not None:
        grad_lp = gkl * gk if grad_lp is None else grad_lp + gkl * gk
    if grad_lp is not None:
        grad_lp = grad_lp.to(ctx.dtypes[0])
    return grad_lp, None, grad_values, None, None, None, None


_soft_bellman_op.register_autograd(_backward, setup_context=_setup_context)


def soft_bellman_loss(logprobs: Tensor, response_mask: Tensor | None, ref_logprobs: Tensor, values: Tensor,
                      rewards: Tensor, *, beta: float, kl_coef: float = 0.0,
                      cu_seqlens: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """OREO's soft Bellman losses, token level.

    "Offline Reinforcement Learning for LLM Multi-Step Reasoning" (OREO, Wang et al., 2024): with
    a sparse outcome reward R (at the end of the response, no discount) the soft Bellman equation
    ``V(s_t) = R - beta * sum_{i >= t} log(pi / pi_ref)(a_i | s_i)`` gives, per response of T
    valid tokens, with ``lr_i = logprobs_i - ref_logprobs_i``:

        value_loss  = 1/T sum_t ( V(s_t) - R + beta * sum_{i >= t} sg(lr_i) )^2
        policy_loss = 1/T sum_t ( sg(V(s_t)) - R + beta * lr_t + beta * sum_{i > t} sg(lr_i) )^2
        kl          = 1/T sum_t k3_t,   k3_t = exp(ref_t - logprobs_t) - (ref_t - logprobs_t) - 1
        loss        = value_loss + policy_loss + kl_coef * kl

    (sg = stop-gradient: the value loss trains only the values, the policy loss only the
    log-probs of the token it is about, as the paper's losses do). Each is averaged over the rows
    that have a valid token. Choices where the paper leaves one open: the paper regularizes the
    policy with ``alpha * KL[pi || pi_ref]`` per state; from the sampled tokens' log-probs this op
    estimates it with k3 (rlkern's default ``kl_estimator``; pass full-vocabulary KLs through
    ``rlkern.kl_penalty`` instead where the logits are at hand). The rows are weighted equally
    (the paper's 1/T per trajectory, then the batch mean). This is the token-level form (one action
    per token); a step-level form (one action per reasoning step, its log-ratio the sum over the
    step's tokens) is not covered by this op.

    Args:
        logprobs: padded ``[B, T]`` with ``response_mask``, or packed ``[total]`` with
            ``cu_seqlens`` ``[B + 1]``; float16/bfloat16/float32/float64: the policy's token
            log-probs. Differentiable (through policy_loss and kl).
        response_mask: logprobs' shape, bool/int/float, nonzero = a response token. Required when
            padded; None when packed: every token. Masked tokens are never read.
        ref_logprobs: logprobs' shape, float: the reference policy's (constants).
        values: logprobs' shape, float: ``V(s_t)``, the value of the state before token t.
            Differentiable (through value_loss).
        rewards: ``[B]`` float: the sparse outcome reward R of each response (constants).
        beta: the KL temperature of the soft Bellman equation (required: the paper tunes it per
            task). kl_coef: alpha of the KL regularizer (0.0 = off).
        cu_seqlens: ``[B + 1]`` int32/int64 offsets of the packed layout.

    Returns:
        ``(loss, metrics)``, metrics ``value_loss``, ``policy_loss``, ``kl`` (0-dim float32).
        The loss is float32 (float64 for float64 log-probs). No valid token: 0 and zero gradients.
    """
    op = _OP
    specs = {"logprobs": (logprobs, "float"), "response_mask": (response_mask, "mask"),
             "ref_logprobs": (ref_logprobs, "float"), "values": (values, "float")}
    if ref_logprobs is None:
        raise ValueError(f"{op}: ref_logprobs is required (the reference policy's token log-probs), got None")
    if values is None:
        raise ValueError(f"{op}: values is required (V(s_t) per token), got None")
    shapes = {name: None if name == "logprobs" else getattr(logprobs, "shape", None) for name in specs}
    _checks.tensors(op, "logprobs", specs, shape=shapes)
    if cu_seqlens is not None:
        if logprobs.ndim != 1:
            raise ValueError(f"{op}: packed input (cu_seqlens given) needs logprobs [total], got shape "
                             f"{tuple(logprobs.shape)}")
        rows = _checks.cu_seqlens(op, cu_seqlens, logprobs.numel(), logprobs.device, "logprobs")
    else:
        if logprobs.ndim != 2:
            raise ValueError(f"{op}: logprobs must be [B, T] (or [total] with cu_seqlens), got shape "
                             f"{tuple(logprobs.shape)}")
        if response_mask is None:
            raise ValueError(f"{op}: response_mask is required for padded [B, T] input (None only with "
                             "cu_seqlens), got None")
        rows = logprobs.shape[0]
    _checks.tensors(op, "logprobs", {"logprobs": (logprobs, "float"), "rewards": (rewards, "float")},
                    shape={"rewards": (rows,)})
    for name, t in (("ref_logprobs", ref_logprobs), ("rewards", rewards)):
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{op}: {name} requires grad, but it is a constant of the loss; compute it under "
                             "torch.no_grad() or pass .detach()")
    beta = _checks.number(op, "beta", beta, low=0, low_open=True)  # a KL temperature, > 0 in both papers
    kl_coef = _checks.number(op, "kl_coef", kl_coef, low=0)
    dtype = out_dtype(logprobs)
    # one dtype for the three token tensors: theirs where they agree, else the compute type
    same = ref_logprobs.dtype == logprobs.dtype == values.dtype
    tok = logprobs.dtype if same else dtype
    mask = None
    if response_mask is not None:
        mask = (response_mask if response_mask.dtype == torch.bool else response_mask != 0).contiguous()
    cu = None if cu_seqlens is None else int32_offsets(cu_seqlens)
    value_rows, policy_rows, kl_rows, lengths, _, _ = _soft_bellman_op(
        logprobs.to(tok).contiguous(), ref_logprobs.detach().to(tok).contiguous(), values.to(tok).contiguous(), mask,
        rewards.detach().to(dtype).contiguous(), cu, beta)
    n = (lengths > 0).sum().clamp(min=1).to(dtype)
    value_loss = value_rows.sum() / n
    policy_loss = policy_rows.sum() / n
    kl = kl_rows.sum() / n
    loss = value_loss + policy_loss + kl_coef * kl
    metrics = {"value_loss": value_loss.detach().float(), "policy_loss": policy_loss.detach().float(),
               "kl": kl.detach().float()}
    return loss, metrics


# ------------------------------------------------------------------------------------------------
# PPO-max: reward normalization and clipping with running statistics

_NORM = "running_reward_norm"


class RewardNorm(NamedTuple):
    """``running_reward_norm``'s result: the normalized rewards and the merged statistics."""

    rewards: Tensor
    stats: Tensor


def _torch_reward_norm(rewards, stats, clip, eps):
    out, nxt = reference.running_reward_norm(rewards.cpu(), stats.cpu(), clip=clip, eps=eps)
    return out.to(rewards.device, out_dtype(rewards)), nxt.to(stats.device)


_NORM_KERNELS = _backend.Kernels(_NORM, cpp="cpp_running_reward_norm", triton="critics.running_reward_norm",
                                 torch=_torch_reward_norm, fp64=("cpp", "triton"))


@torch.library.custom_op("rlkern::running_reward_norm", mutates_args=())
def _reward_norm_op(rewards: Tensor, stats: Tensor, clip: float, eps: float) -> tuple[Tensor, Tensor]:
    return _NORM_KERNELS.pick(rewards)(rewards, stats, clip, eps)


@_reward_norm_op.register_fake
def _reward_norm_fake(rewards, stats, clip, eps):
    return rewards.new_empty(rewards.shape, dtype=out_dtype(rewards)), stats.new_empty((3,))


def running_reward_norm(rewards: Tensor, stats: Tensor | None = None, *, clip: float | None = None,
                        eps: float = 1e-8) -> RewardNorm:
    """PPO-max's reward normalization and clipping, with the running statistics as tensor state.

    "Secrets of RLHF in Large Language Models Part I: PPO" (Zheng et al., 2023), PPO-max's reward
    normalization and clipping: ``r~ = clip((r - mean) / std, -clip, clip)`` with the mean and
    standard deviation of every reward seen so far. Here the batch is merged into the running
    statistics first (Chan et al.'s parallel update of (count, mean, M2), float64), then
    normalized by them: ``r~ = clip((r - mean) / (sqrt(M2 / count) + eps), -clip, clip)`` (the
    population std; the first batch is normalized by its own statistics). The state stays on the
    rewards' device: no host sync, the caller keeps ``stats`` between steps (a checkpointable
    tensor).

    The rest of PPO-max maps onto existing ops: value clipping is ``rlkern.value_loss``
    (its ``cliprange_value``), the token-level KL penalty in the reward is
    ``rlkern.kl_penalty`` (``kl_estimator="k1"``, subtracted from the rewards before
    ``rlkern.gae``), advantage normalization is ``rlkern.masked_whiten`` / ``gae(whiten=True)``,
    the policy loss is ``rlkern.policy_loss``.

    Args:
        rewards: ``[B]`` float16/bfloat16/float32/float64: the reward model's scores.
        stats: ``[3]`` float64 (count, mean, M2) from the previous call, or None (no history).
        clip: delta of the clipping (the paper tunes it; None = no clipping, default).
        eps: added to the std (the usual 1e-8).

    Returns:
        ``RewardNorm(rewards, stats)``: ``[B]`` float32 (float64 for float64 rewards), and the
        merged ``[3]`` float64 statistics (a new tensor; the input is not modified). Constants
        (no gradient).
    """
    op = _NORM
    _checks.tensors(op, "rewards", {"rewards": (rewards, "float"), "stats": (stats, "float")})
    if rewards.ndim != 1:
        raise ValueError(f"{op}: rewards must be [B], got shape {tuple(rewards.shape)}")
    if stats is None:
        stats = torch.zeros(3, dtype=torch.float64, device=rewards.device)
    elif tuple(stats.shape) != (3,) or stats.dtype != torch.float64:
        raise ValueError(f"{op}: stats must be float64 [3] (count, mean, M2), got {stats.dtype} "
                         f"{tuple(stats.shape)}")
    elif _checks.host_checks(stats) and (not bool(torch.isfinite(stats).all()) or float(stats[0]) < 0
                                         or float(stats[2]) < 0):
        raise ValueError(f"{op}: stats must be finite with count >= 0 and M2 >= 0, got {stats.tolist()}")
    clip_value = math.inf if clip is None else _checks.number(op, "clip", clip, low=0, low_open=True)
    eps = _checks.number(op, "eps", eps, low=0)
    out, nxt = _reward_norm_op(rewards.detach().contiguous(), stats.detach().contiguous(), clip_value, eps)
    return RewardNorm(out, nxt)


# ------------------------------------------------------------------------------------------------
# CGPO: constrained rewards over a mixture of judges

_CGPO = "constrained_rewards"


class ConstrainedRewards(NamedTuple):
    """``constrained_rewards``' result: CRPG's reward and the per-group selections."""

    rewards: Tensor
    chosen: Tensor
    rejected: Tensor


def _torch_constrained(rewards, groups, judges, baseline):
    out, chosen, rejected = reference.constrained_rewards(rewards.cpu(), groups.cpu(), judges.cpu(),
                                                          None if baseline is None else baseline.cpu())
    dev = rewards.device
    return out.to(dev, out_dtype(rewards)), chosen.to(dev), rejected.to(dev)


_CGPO_KERNELS = _backend.Kernels(_CGPO, cpp="cpp_constrained_rewards", triton="critics.constrained_rewards",
                                 torch=_torch_constrained, fp64=("cpp", "triton"))


@torch.library.custom_op("rlkern::constrained_rewards", mutates_args=())
def _constrained_op(rewards: Tensor, groups: Tensor, judges: Tensor,
                    baseline: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    return _CGPO_KERNELS.pick(rewards)(rewards, groups, judges, baseline)


@_constrained_op.register_fake
def _constrained_fake(rewards, groups, judges, baseline):
    return (rewards.new_empty(rewards.shape, dtype=out_dtype(rewards)),
            rewards.new_empty(rewards.shape, dtype=torch.bool), rewards.new_empty(rewards.shape, dtype=torch.bool))


def constrained_rewards(rewards: Tensor, group_ids, judges: Tensor, baseline_rewards: Tensor | None = None
                        ) -> ConstrainedRewards:
    """CGPO's constrained optimizers over a mixture of judges: CRPG's reward, CRRAFT's and CODPO's
    per-prompt selections.

    "The Perfect Blend: Redefining RLHF with Mixture of Judges" (CGPO, Xu et al., 2024). Each
    sample is judged by J constraint judges; it *satisfies* the constraints when every judge
    passes (the paper's positive set), else it *violates* them. With the calibrated reward
    ``c_i = sigmoid(r_i - r_baseline_i)`` (the paper's calibration against a baseline response;
    ``c_i = r_i`` without ``baseline_rewards``):

    - CRPG (constrained regularized policy gradient): ``rewards_i = c_i`` if sample i satisfies
      the constraints, else 0 (violating samples earn nothing); feed it to any outcome estimator
      (``rlkern.grpo``, ``rlkern.rloo``) or policy gradient.
    - CRRAFT (constrained reward-ranked fine-tuning): ``chosen_i`` marks, per prompt (group), the
      satisfying sample of highest c: SFT on those (``rlkern.token_logprobs`` + a masked mean).
    - CODPO (constrained DPO): the pair ``(chosen, rejected)`` per prompt, ``rejected_i`` marking
      the violating sample of lowest c; the loss is DPO plus the chosen response's length-
      normalized NLL: ``rlkern.preference_loss(lp[chosen], lp[rejected], ref[chosen],
      ref[rejected], loss_type=["sigmoid", "sft"], loss_weights=[1.0, lambda])`` over the groups
      that have both.

    Choices where the paper leaves one open: ties keep the first sample (lowest index); a group
    with no satisfying (violating) sample has no chosen (rejected) one; the ranking uses c.

    Args:
        rewards: ``[B]`` float16/bfloat16/float32/float64: the reward model's scores.
        group_ids: the prompt of each sample (a tensor, numpy array or list; ``rlkern.group_index``).
        judges: ``[B, J]`` bool/int/float, nonzero = judge j passes sample i (J >= 0; J = 0: all
            satisfy).
        baseline_rewards: ``[B]`` float or None: the baseline response's reward for calibration.

    Returns:
        ``ConstrainedRewards(rewards, chosen, rejected)``: ``[B]`` float32 (float64 for float64
        rewards), ``[B]`` bool, ``[B]`` bool. Constants (no gradient).
    """
    from rlkern.ops.advantages.groups import dense

    op = _CGPO
    _checks.tensors(op, "rewards", {"rewards": (rewards, "float"), "judges": (judges, "mask"),
                                    "baseline_rewards": (baseline_rewards, "float")})
    if rewards.ndim != 1:
        raise ValueError(f"{op}: rewards must be [B], got shape {tuple(rewards.shape)}")
    n = rewards.shape[0]
    if judges.ndim != 2 or judges.shape[0] != n:
        raise ValueError(f"{op}: judges must be [B, J] = [{n}, J], got shape {tuple(judges.shape)}")
    if baseline_rewards is not None and tuple(baseline_rewards.shape) != (n,):
        raise ValueError(f"{op}: baseline_rewards must have shape ({n},), got {tuple(baseline_rewards.shape)}")
    groups = dense(op, group_ids, n, rewards.device)
    j = (judges if judges.dtype == torch.bool else judges != 0).contiguous()
    r = rewards.detach().contiguous()
    base = None if baseline_rewards is None else baseline_rewards.detach().to(r.dtype).contiguous()
    return ConstrainedRewards(*_constrained_op(r, groups.contiguous(), j, base))


# ------------------------------------------------------------------------------------------------
# Direct Advantage Policy Optimization: the step-level loss

_STEP = "step_advantage_loss"


def _torch_step_loss(logprobs, ref, adv, ends, mask, cu_seqlens, beta):
    """The PyTorch backend of cpp_step_advantage_loss: a float64 Python loop over each row's steps
    (the reference's rule), with the gradient written out (2 beta e_k / K on step k's tokens)."""
    dtype = out_dtype(logprobs)
    rows = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else logprobs.shape[0]
    cu = None if cu_seqlens is None else cu_seqlens.long().tolist()
    sq, ratio, steps = (torch.zeros(rows, dtype=torch.float64) for _ in range(3))
    grad = torch.zeros(logprobs.shape, dtype=torch.float64)
    lr_all = logprobs.double().cpu() - ref.double().cpu()
    a_all, e_all = adv.double().cpu(), ends.cpu()
    valid_all = torch.ones(logprobs.shape, dtype=torch.bool) if mask is None else mask.cpu()
    for b in range(rows):
        sl = (b,) if cu is None else (slice(cu[b], cu[b + 1]),)
        lr, a, e, valid = lr_all[sl], a_all[sl], e_all[sl], valid_all[sl]
        idx = torch.nonzero(valid).flatten().tolist()
        if not idx:
            continue
        groups, members, acc = [], [], 0.0
        for t in idx:
            acc += float(lr[t])
            members.append(t)
            if bool(e[t]) or t == idx[-1]:
                groups.append((members, beta * acc, beta * acc - float(a[t])))
                members, acc = [], 0.0
        k = len(groups)
        row_grad = grad[sl]
        for toks, _, err in groups:
            row_grad[toks] = 2.0 * beta * err / k
        sq[b] = sum(err * err for _, _, err in groups) / k
        ratio[b] = sum(r for _, r, _ in groups) / k
        steps[b] = k
    dev = logprobs.device
    return sq.to(dev, dtype), ratio.to(dev, dtype), steps.to(dev, dtype), grad.to(dev, dtype)


_STEP_KERNELS = _backend.Kernels(_STEP, cpp="cpp_step_advantage_loss", triton="critics.step_advantage_loss",
                                 torch=_torch_step_loss, fp64=("cpp", "triton"))


@torch.library.custom_op("rlkern::step_advantage_loss", mutates_args=())
def _step_op(logprobs: Tensor, ref: Tensor, adv: Tensor, ends: Tensor, mask: Tensor | None,
             cu_seqlens: Tensor | None, beta: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _STEP_KERNELS.pick(logprobs)(logprobs, ref, adv, ends, mask, cu_seqlens, beta)


@_step_op.register_fake
def _step_fake(logprobs, ref, adv, ends, mask, cu_seqlens, beta):
    dtype = out_dtype(logprobs)
    rows = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else logprobs.shape[0]
    return (*[logprobs.new_empty((rows,), dtype=dtype) for _ in range(3)], logprobs.new_empty(logprobs.shape,
                                                                                               dtype=dtype))


def _step_setup(ctx, inputs, output):
    ctx.dtype = inputs[0].dtype
    ctx.save_for_backward(inputs[5], output[3])


def _step_backward(ctx, g_sq, *_):
    cu_seqlens, grad = ctx.saved_tensors
    if g_sq is None:
        return None, None, None, None, None, None, None
    g = g_sq.to(grad.dtype)
    g = g[:, None] if cu_seqlens is None else g[segment_ids(cu_seqlens.long(), grad.shape[0])]
    return (g * grad).to(ctx.dtype), None, None, None, None, None, None


_step_op.register_autograd(_step_backward, setup_context=_step_setup)


def step_advantage_loss(logprobs: Tensor, response_mask: Tensor | None, ref_logprobs: Tensor, advantages: Tensor,
                        step_ends: Tensor, *, beta: float,
                        cu_seqlens: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Direct Advantage Policy Optimization's step-level actor loss from a step critic's advantages.

    "Improving Multi-Step Reasoning Abilities of Large Language Models with Direct Advantage Policy
    Optimization" (DAPO, Liu et al., 2024): an offline critic V(s) predicts, at each reasoning
    step, the chance of reaching a correct answer; a step's advantage is
    ``A_k = V(s_{k+1}) - V(s_k)`` (the last step's next value is the outcome reward: compute it
    with ``rlkern.gae(step_rewards, step_values, step_mask, gamma=1.0, lam=0.0)`` over the steps,
    the outcome as the last step's reward). The actor then fits the step's log-ratio to the
    advantage (the KL-regularized optimum ``beta * log(pi / pi_ref)(a_k | s_k) = A_k``, the
    state's normalizer taken as 0 -- the choice made here, where the paper's objective admits a
    per-state baseline):

        loss = mean_b 1/K_b sum_k ( beta * sum_{t in step k} (logprobs_t - ref_logprobs_t) - A_k )^2

    Steps: a step ends at a valid token with ``step_ends`` set, or at the row's last valid
    token; its tokens are the valid tokens since the previous end. ``A_k`` is read at the step's
    end token (the value elsewhere is ignored). Rows are weighted equally; rows with no valid
    token are left out (none: 0 and a zero gradient).

    Args:
        logprobs: padded ``[B, T]`` with ``response_mask``, or packed ``[total]`` with
            ``cu_seqlens``; float16/bfloat16/float32/float64. Differentiable.
        response_mask: logprobs' shape, bool/int/float (required when padded; None when packed).
        ref_logprobs: logprobs' shape, float: the reference policy's (constants).
        advantages: logprobs' shape, float: A_k at each step's end token (constants).
        step_ends: logprobs' shape, bool/int/float, nonzero = the last token of a step.
        beta: the KL temperature (required: the paper tunes it).
        cu_seqlens: ``[B + 1]`` int32/int64 offsets of the packed layout.

    Returns:
        ``(loss, metrics)``; metrics ``step_log_ratio``: the mean of ``beta * sum lr`` over the
        steps (row mean, then batch mean), 0-dim float32.
    """
    op = _STEP
    for name, t in (("ref_logprobs", ref_logprobs), ("advantages", advantages), ("step_ends", step_ends)):
        if t is None:
            raise ValueError(f"{op}: {name} is required, got None")
    specs = {"logprobs": (logprobs, "float"), "response_mask": (response_mask, "mask"),
             "ref_logprobs": (ref_logprobs, "float"), "advantages": (advantages, "float"),
             "step_ends": (step_ends, "mask")}
    shapes = {name: None if name == "logprobs" else getattr(logprobs, "shape", None) for name in specs}
    _checks.tensors(op, "logprobs", specs, shape=shapes)
    if cu_seqlens is not None:
        if logprobs.ndim != 1:
            raise ValueError(f"{op}: packed input (cu_seqlens given) needs logprobs [total], got shape "
                             f"{tuple(logprobs.shape)}")
        _checks.cu_seqlens(op, cu_seqlens, logprobs.numel(), logprobs.device, "logprobs")
    else:
        if logprobs.ndim != 2:
            raise ValueError(f"{op}: logprobs must be [B, T] (or [total] with cu_seqlens), got shape "
                             f"{tuple(logprobs.shape)}")
        if response_mask is None:
            raise ValueError(f"{op}: response_mask is required for padded [B, T] input (None only with "
                             "cu_seqlens), got None")
    for name, t in (("ref_logprobs", ref_logprobs), ("advantages", advantages)):
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{op}: {name} requires grad, but it is a constant of the loss; compute it under "
                             "torch.no_grad() or pass .detach()")
    beta = _checks.number(op, "beta", beta, low=0, low_open=True)  # a KL temperature, > 0 in both papers
    dtype = out_dtype(logprobs)
    same = ref_logprobs.dtype == logprobs.dtype == advantages.dtype
    tok = logprobs.dtype if same else dtype
    as_bool = lambda m: (m if m.dtype == torch.bool else m != 0).contiguous()  # noqa: E731
    mask = None if response_mask is None else as_bool(response_mask)
    cu = None if cu_seqlens is None else int32_offsets(cu_seqlens)
    sq, ratio, steps, _ = _step_op(logprobs.to(tok).contiguous(), ref_logprobs.detach().to(tok).contiguous(),
                                   advantages.detach().to(tok).contiguous(), as_bool(step_ends), mask, cu, beta)
    n = (steps > 0).sum().clamp(min=1).to(dtype)
    loss = sq.sum() / n
    return loss, {"step_log_ratio": (ratio.sum() / n).detach().float()}
