"""Token-level preference optimization: the DPO family's loss from token log-probs
(``token_preference_loss``: TRL 1.16's ``DPOTrainer._compute_loss`` per token, LD-DPO, WPO, TGDPO)
and the DPO-implied token reward (``dpo_token_rewards``: "From r to Q*", RTO's PPO reward).

``token_preference_loss`` = one kernel that reduces each pair's tokens to the per-sequence inputs
of the sequence-level loss (weighted sums, plain sums, token counts, WPO's pair weights), then the
sequence-level loss through ``rlkern.preference_loss`` itself (so every loss type it has works
here), then one kernel that spreads each sequence's gradient over its tokens. Backends (same
arguments, same outputs): C++ (csrc/preference_tokens.cpp), Triton
(kernels/preference_tokens.py) and PyTorch (below, on the reference's token weights).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlkern import _backend
from rlkern.ops import _checks, _eager
from rlkern.ops._layout import lastdim_contiguous, int32_offsets, pad, unpad
from rlkern.ops.preference import preference_loss
from rlkern.reference import preference_tokens as reference

__all__ = ["token_preference_loss", "dpo_token_rewards"]

_OP = "token_preference_loss"


def _padded_all(cu, width, *tensors):
    return [None if t is None else pad(t, cu, width) for t in tensors]


def _torch_token_sums(logprobs, mask, ref, adj, rewards, cu_seqlens, ld_alpha, ld, tg_alpha):
    """The PyTorch backend of cpp_preference_token_sums (the reference's token weights)."""
    dtype = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
    if mask is None:
        mask = torch.ones(logprobs.shape, dtype=torch.bool, device=logprobs.device)
    if cu_seqlens is not None:
        cu = cu_seqlens.long()
        width = reference._width(cu)
        logprobs, mask, ref, adj, rewards = _padded_all(cu, width, logprobs, mask, ref, adj, rewards)
    valid = mask != 0
    w, lengths = reference.token_weights(mask, ld_alpha=ld_alpha if ld else None, token_rewards=rewards,
                                         tgdpo_alpha=tg_alpha, dtype=dtype)
    x = torch.where(valid, logprobs.to(dtype), 0.0)
    zeros = lengths.new_zeros(lengths.shape)
    ref_sums = zeros if ref is None else (w * torch.where(valid, ref.to(dtype), 0.0)).sum(1)
    n = lengths.shape[0] // 2
    if adj is None:
        wpo = zeros[:n].clone()
    else:
        aligned = torch.where(valid, x - adj.to(dtype), 0.0).sum(1) / lengths.clamp(min=1)
        wpo = torch.exp(aligned[:n] + aligned[n:])
    return (w * x).sum(1), x.sum(1), ref_sums, lengths, wpo


def _torch_token_sums_backward(grad_sums, grad_raw, logprobs, mask, rewards, cu_seqlens, lengths, ld_alpha, ld,
                               tg_alpha):
    dtype = grad_sums.dtype
    total = logprobs.numel()
    if mask is None:
        mask = torch.ones(logprobs.shape, dtype=torch.bool, device=logprobs.device)
    cu = None if cu_seqlens is None else cu_seqlens.long()
    if cu is not None:
        width = reference._width(cu)
        mask, rewards = _padded_all(cu, width, mask, rewards)
    w, _ = reference.token_weights(mask, ld_alpha=ld_alpha if ld else None, token_rewards=rewards,
                                   tgdpo_alpha=tg_alpha, dtype=dtype)
    grad = torch.where(mask != 0, w * grad_sums[:, None] + grad_raw[:, None], 0.0)
    if cu is not None:
        grad = unpad(grad, cu, total)
    return grad.to(logprobs.dtype)


_SUMS = _backend.Kernels(_OP, cpp="cpp_preference_token_sums", triton="preference_tokens.token_sums",
                         torch=_torch_token_sums, fp64=("cpp", "triton"))
_SUMS_BACKWARD = _backend.Kernels(_OP, cpp="cpp_preference_token_sums_backward",
                                  triton="preference_tokens.token_sums_backward", torch=_torch_token_sums_backward,
                                  fp64=("cpp", "triton"))


def _sums_impl(logprobs: Tensor, mask: Tensor | None, ref: Tensor | None, adj: Tensor | None,
               rewards: Tensor | None, cu_seqlens: Tensor | None, ld_alpha: float, ld: bool,
               tg_alpha: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _SUMS.pick(logprobs)(logprobs, mask, ref, adj, rewards, cu_seqlens, ld_alpha, ld, tg_alpha)


_sums_op = torch.library.custom_op("rlkern::_preference_token_sums", mutates_args=())(_sums_impl)


@_sums_op.register_fake
def _sums_fake(logprobs, mask, ref, adj, rewards, cu_seqlens, ld_alpha, ld, tg_alpha):
    dtype = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
    rows = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else logprobs.shape[0]
    per_row = [logprobs.new_empty((rows,), dtype=dtype) for _ in range(4)]
    return (*per_row, logprobs.new_empty((rows // 2,), dtype=dtype))


@torch.library.custom_op("rlkern::_preference_token_sums_backward", mutates_args=())
def _sums_backward_op(grad_sums: Tensor, grad_raw: Tensor, logprobs: Tensor, mask: Tensor | None,
                      rewards: Tensor | None, cu_seqlens: Tensor | None, lengths: Tensor, ld_alpha: float, ld: bool,
                      tg_alpha: float) -> Tensor:
    return _SUMS_BACKWARD.pick(logprobs)(grad_sums, grad_raw, logprobs, mask, rewards, cu_seqlens, lengths, ld_alpha,
                                         ld, tg_alpha)


@_sums_backward_op.register_fake
def _sums_backward_fake(grad_sums, grad_raw, logprobs, mask, rewards, cu_seqlens, lengths, ld_alpha, ld, tg_alpha):
    return logprobs.new_empty(logprobs.shape)


def _setup_context(ctx, inputs, output):
    logprobs, mask, _ref, _adj, rewards, cu_seqlens, ld_alpha, ld, tg_alpha = inputs
    ctx.hyper = (ld_alpha, ld, tg_alpha)
    ctx.save_for_backward(logprobs, mask, rewards, cu_seqlens, output[3])


def _backward(ctx, grad_sums, grad_raw, *_):
    logprobs, mask, rewards, cu_seqlens, lengths = ctx.saved_tensors
    zeros = torch.zeros_like(lengths)
    grad_sums = zeros if grad_sums is None else grad_sums.to(lengths.dtype).contiguous()
    grad_raw = zeros if grad_raw is None else grad_raw.to(lengths.dtype).contiguous()
    grad = _sums_backward_op(grad_sums, grad_raw, logprobs.detach(), mask, rewards, cu_seqlens, lengths, *ctx.hyper)
    return grad, None, None, None, None, None, None, None, None


_sums_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerTokenSums(torch.autograd.Function):
    """rlkern::_preference_token_sums without the dispatcher (as rlkern/ops/preference.py's
    _EagerPreferenceLoss): the same forward, backward and saved state; the backend is chosen once
    for both passes."""

    @staticmethod
    def forward(ctx, *inputs):
        backend = _SUMS.backend(inputs[0])
        output = _SUMS.get(backend)(*inputs)
        _setup_context(ctx, inputs, output)
        ctx.backend = backend
        ctx.mark_non_differentiable(*output[2:])
        return output

    @staticmethod
    def backward(ctx, grad_sums, grad_raw, *_):
        logprobs, mask, rewards, cu_seqlens, lengths = ctx.saved_tensors
        grad = _SUMS_BACKWARD.get(ctx.backend)(grad_sums.to(lengths.dtype).contiguous(),
                                               grad_raw.to(lengths.dtype).contiguous(), logprobs, mask, rewards,
                                               cu_seqlens, lengths, *ctx.hyper)
        return grad, None, None, None, None, None, None, None, None


def _mask(response_mask: Tensor | None) -> Tensor | None:
    """The mask as the bool the kernels read (checked by _layout)."""
    if response_mask is None:
        return None
    m = response_mask if response_mask.dtype == torch.bool else response_mask != 0
    return lastdim_contiguous(m.detach())


def _layout(op: str, logprobs: Tensor, response_mask: Tensor | None, cu_seqlens: Tensor | None,
            constants: dict) -> int:
    """Checks the token layout, the mask and the token-shaped ``constants`` (name -> tensor or
    None: float, logprobs' shape and device, no grad); returns the number of rows."""
    specs = {"logprobs": (logprobs, "float"), "response_mask": (response_mask, "mask")}
    specs.update((name, (t, "float")) for name, t in constants.items())
    shapes = {name: None if name == "logprobs" else getattr(logprobs, "shape", None) for name in specs}
    _checks.tensors(op, "logprobs", specs, shape=shapes)
    for name, t in constants.items():
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{op}: {name} requires grad, but it is a constant of the loss; compute it under "
                             "torch.no_grad() or pass .detach()")
    if cu_seqlens is not None:
        if logprobs.ndim != 1:
            raise ValueError(f"{op}: packed input (cu_seqlens given) needs logprobs [total], got shape "
                             f"{tuple(logprobs.shape)}")
        return _checks.cu_seqlens(op, cu_seqlens, logprobs.numel(), logprobs.device, "logprobs")
    if logprobs.ndim != 2:
        raise ValueError(f"{op}: logprobs must be [R, T] (or [total] with cu_seqlens), got shape "
                         f"{tuple(logprobs.shape)}")
    if response_mask is None:
        raise ValueError(f"{op}: response_mask is required for padded [R, T] input (None only with cu_seqlens), "
                         "got None")
    return logprobs.shape[0]


def _aux(logprobs: Tensor, named: dict) -> dict:
    """Token-shaped constants (checked by _layout) in the dtype the kernels read: the log-probs'
    where all have it, else the compute type (float32, float64 for float64 log-probs)."""
    same = all(t is None or t.dtype == logprobs.dtype for t in named.values())
    dtype = logprobs.dtype if same else (torch.float64 if logprobs.dtype == torch.float64 else torch.float32)
    return {k: None if v is None else lastdim_contiguous(v.detach().to(dtype)) for k, v in named.items()}


def token_preference_loss(logprobs: Tensor, response_mask: Tensor | None = None, ref_logprobs: Tensor | None = None,
                          *, cu_seqlens: Tensor | None = None, ld_alpha: float | None = None,
                          wpo_adjustment: Tensor | None = None, token_rewards: Tensor | None = None,
                          tgdpo_alpha: float = 1.0, loss_type="sigmoid", beta: float = 0.1,
                          label_smoothing: float = 0.0, f_divergence_type: str = "reverse_kl",
                          f_alpha_divergence_coef: float = 1.0, discopop_tau: float = 0.05, loss_weights=None,
                          pair_weights: Tensor | None = None,
                          simpo_gamma: float = 0.5) -> tuple[Tensor, dict[str, Tensor]]:
    """TRL 1.16's DPO loss (``DPOTrainer._compute_loss``) from token log-probs: the token sums,
    lengths, LD-DPO and WPO weights inside the kernels, then ``rlkern.preference_loss``.

    Layout (TRL's and OpenRLHF's concatenated batch): rows ``[0, B)`` are the chosen completions,
    rows ``[B, 2B)`` the rejected ones, pair i = rows i and B + i.

    Args:
        logprobs: padded ``[2B, T]`` with ``response_mask``, or packed ``[total]`` with
            ``cu_seqlens`` ``[2B + 1]``; float16/bfloat16/float32/float64: the policy's token
            log-probs (TRL's ``per_token_logps``). Differentiable; the gradient has their dtype
            (computed in float32, float64 for float64).
        response_mask: logprobs' shape, bool/int/float, nonzero = a completion token (TRL's
            shifted ``completion_mask``). Required when padded; None when packed: every token.
            Masked tokens are never read into a sum (their gradient is 0).
        ref_logprobs: None (reference-free), the reference model's token log-probs (logprobs'
            shape, weighted like the policy's), or per-sequence ``[2B]`` sums (TRL's
            ``precompute_ref_log_probs``: the caller's sums, LD-DPO weighting included).
            Constants. A tensor of logprobs' shape is token-level (packed rows of one token
            each, where ``[total] == [2B]``, included).
        cu_seqlens: ``[2B + 1]`` int32/int64 offsets of the packed rows.
        ld_alpha: LD-DPO (TRL's ``ld_alpha``, default None = off): in each pair, the first
            ``min(n_chosen, n_rejected)`` completion tokens of both rows weigh 1, later ones
            ``ld_alpha``; applied to the policy's and the token-level reference's sums (TRL
            applies it to both). ``sft`` reads the unweighted sums, as TRL's does (with TGDPO's
            weights too: sft is the chosen tokens' NLL).
        wpo_adjustment: WPO (TRL's ``use_weighting=True``): logprobs' shape, constants: TRL's
            ``log_sum_sq_probs`` = logsumexp(2 * log_softmax(logits)) per token. Each pair's loss
            is multiplied by ``w_c * w_r``, ``w = exp(sum_t mask * (logprobs - wpo_adjustment) /
            max(n, 1))`` (detached). Not with aot / aot_unpaired.
        token_rewards, tgdpo_alpha: TGDPO ("TGDPO: Harnessing Token-Level Reward Guidance for
            Enhancing Direct Preference Optimization", Zhu et al., ICML 2025): a token-level
            reward r_t (logprobs' shape, constants) makes the DPO temperature per token. The
            paper's practical guidance (its Eq. with f(r) = 1 +- alpha * r, and its official
            trainer's sigmoid loss) is
            ``L = -log sigmoid( sum_t beta * (1 + alpha * r^w_t) * log(pi/pi_ref)(y^w_t)
            - sum_t beta * (1 - alpha * r^l_t) * log(pi/pi_ref)(y^l_t) )``
            with r_t = beta * log(pi_r / pi_ref)(y_t) the implicit token reward of a DPO-trained
            model pi_r: pass ``token_rewards=rlkern.dpo_token_rewards(logprobs_r, ref_logprobs,
            response_mask, beta=beta)``. Here chosen tokens weigh ``1 + tgdpo_alpha * r_t``,
            rejected ones ``1 - tgdpo_alpha * r_t``, inside the log-ratio sums of any loss type
            (sigmoid is the paper's). r is taken as given (no clamp or normalization, as in the
            official code); a token-level ``ref_logprobs`` (or none) is needed since the weights
            apply per token. The metrics are those of the weighted sums (the official trainer
            logs unweighted rewards). ``tgdpo_alpha`` is tuned per task in the paper: 1.0.
        loss_type, beta, label_smoothing, f_divergence_type, f_alpha_divergence_coef,
            discopop_tau, loss_weights, pair_weights, simpo_gamma: as ``rlkern.preference_loss``
            (every loss type it has, with the lengths counted here: ipo, sigmoid_norm, sft, simpo,
            orpo read them). ``pair_weights`` multiplies WPO's weights where both are given.

    Returns:
        ``(loss, metrics)`` exactly as ``rlkern.preference_loss`` over the weighted sums.
        B = 0 gives 0; a row with no valid token has sums 0 and length 0 (no NaN).
    """
    op = _OP
    per_sequence_ref = (isinstance(ref_logprobs, Tensor) and isinstance(logprobs, Tensor)
                        and ref_logprobs.shape != logprobs.shape)
    named = {"ref_logprobs": None if per_sequence_ref else ref_logprobs, "wpo_adjustment": wpo_adjustment,
             "token_rewards": token_rewards}
    rows = _layout(op, logprobs, response_mask, cu_seqlens, named)
    if rows % 2:
        raise ValueError(f"{op}: logprobs must have 2B rows (chosen rows, then rejected rows), got {rows}")
    n = rows // 2
    mask = _mask(response_mask)
    if per_sequence_ref:
        _checks.tensors(op, "logprobs", {"logprobs": (logprobs, "float"), "ref_logprobs": (ref_logprobs, "float")})
        if tuple(ref_logprobs.shape) != (rows,):
            raise ValueError(f"{op}: ref_logprobs must have logprobs' shape {tuple(logprobs.shape)} (token-level) or "
                             f"be [2B] = [{rows}] (per-sequence sums), got {tuple(ref_logprobs.shape)}")
        if ref_logprobs.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{op}: ref_logprobs requires grad, but it is a constant of the loss; compute it under "
                             "torch.no_grad() or pass .detach()")
        if token_rewards is not None:
            raise ValueError(f"{op}: token_rewards (TGDPO) weight each token's log-ratio and need token-level "
                             f"ref_logprobs {tuple(logprobs.shape)}, got per-sequence {tuple(ref_logprobs.shape)}")
    aux = _aux(logprobs, named)
    ld = ld_alpha is not None
    ld_value = _checks.number(op, "ld_alpha", ld_alpha, low=0, high=1) if ld else 1.0
    tg = _checks.number(op, "tgdpo_alpha", tgdpo_alpha)
    cu = None if cu_seqlens is None else int32_offsets(cu_seqlens)
    lp = lastdim_contiguous(logprobs)
    args = (lp, mask, aux["ref_logprobs"], aux["wpo_adjustment"], aux["token_rewards"], cu, ld_value, ld, tg)
    sums, raw, ref_sums, lengths, wpo = (_EagerTokenSums.apply if _eager.may_bypass(logprobs) else _sums_op)(*args)

    if per_sequence_ref:
        refs = (ref_logprobs[:n].detach(), ref_logprobs[n:].detach())
    elif ref_logprobs is not None:  # constants of the loss; under torch.compile the custom op's
        # outputs all carry requires_grad, which preference_loss rejects for a reference
        refs = (ref_sums[:n].detach(), ref_sums[n:].detach())
    else:
        refs = (None, None)
    weights = pair_weights
    if wpo_adjustment is not None:
        weights = wpo if pair_weights is None else wpo * pair_weights.detach().to(wpo.dtype)
    kw = dict(beta=beta, label_smoothing=label_smoothing, f_divergence_type=f_divergence_type,
              f_alpha_divergence_coef=f_alpha_divergence_coef, discopop_tau=discopop_tau,
              chosen_lengths=lengths[:n], rejected_lengths=lengths[n:], pair_weights=weights, simpo_gamma=simpo_gamma)
    types = [loss_type] if isinstance(loss_type, str) else loss_type
    try:
        if not isinstance(types, (list, tuple)) or "sft" not in types or not (ld or token_rewards is not None):
            return preference_loss(sums[:n], sums[n:], *refs, loss_type=loss_type, loss_weights=loss_weights, **kw)
        # sft reads the unweighted token sums (TRL's chosen_per_token_logps[mask].mean()): its term
        # apart; the metrics are the weighted sums', as TRL logs them
        lweights = [1.0] * len(types) if loss_weights is None else list(loss_weights)
        if len(lweights) != len(types):
            raise ValueError(f"preference_loss: loss_weights must be a list of {len(types)} numbers (one per "
                             f"loss_type), got {loss_weights!r}")
        rest = [(t, w) for t, w in zip(types, lweights) if t != "sft"] or [("sft", 0.0)]
        loss, metrics = preference_loss(sums[:n], sums[n:], *refs, loss_type=[t for t, _ in rest],
                                        loss_weights=[w for _, w in rest], **kw)
        sft_weight = sum(w for t, w in zip(types, lweights) if t == "sft")
        sft, _ = preference_loss(raw[:n], raw[n:], *refs, loss_type="sft", loss_weights=[sft_weight], **kw)
        return loss + sft, metrics
    except (ValueError, TypeError) as error:  # the sequence-level checks, under this op's name
        message = str(error)
        if message.startswith("preference_loss: "):
            raise type(error)(f"{op}: " + message.removeprefix("preference_loss: ")) from None
        raise


# ------------------------------------------------------------------------------------------------
# The DPO-implied token reward: "From r to Q*", RTO

_REWARDS = "dpo_token_rewards"


def _torch_dpo_token_rewards(logprobs, ref, mask, old, seq, cu_seqlens, beta, kl_coef, seq_coef):
    if mask is None:
        mask = torch.ones(logprobs.shape, dtype=torch.bool, device=logprobs.device)
    return reference.dpo_token_rewards(logprobs, ref, mask, old, seq, beta=beta, kl_coef=kl_coef,
                                       sequence_reward_coef=seq_coef,
                                       cu_seqlens=None if cu_seqlens is None else cu_seqlens.long())


_REWARD_KERNELS = _backend.Kernels(_REWARDS, cpp="cpp_dpo_token_rewards", triton="preference_tokens.dpo_token_rewards",
                                   torch=_torch_dpo_token_rewards, fp64=("cpp", "triton"))


@torch.library.custom_op("rlkern::dpo_token_rewards", mutates_args=())
def _rewards_op(logprobs: Tensor, ref: Tensor, mask: Tensor | None, old: Tensor | None, seq: Tensor | None,
                cu_seqlens: Tensor | None, beta: float, kl_coef: float, seq_coef: float) -> Tensor:
    return _REWARD_KERNELS.pick(logprobs)(logprobs, ref, mask, old, seq, cu_seqlens, beta, kl_coef, seq_coef)


@_rewards_op.register_fake
def _rewards_fake(logprobs, ref, mask, old, seq, cu_seqlens, beta, kl_coef, seq_coef):
    return logprobs.new_empty(logprobs.shape, dtype=torch.float64 if logprobs.dtype == torch.float64 else torch.float32)


def dpo_token_rewards(logprobs: Tensor, ref_logprobs: Tensor, response_mask: Tensor | None = None,
                      old_logprobs: Tensor | None = None, sequence_rewards: Tensor | None = None, *,
                      beta: float = 0.1, kl_coef: float = 0.0, sequence_reward_coef: float = 1.0,
                      cu_seqlens: Tensor | None = None) -> Tensor:
    """The DPO-implied token-level reward, as a dense PPO reward (RTO).

    "From r to Q*: Your Language Model is Secretly a Q-Function" (Rafailov et al., 2024): a DPO
    model pi_dpo defines the token reward ``beta * log(pi_dpo(y_t | s_t) / pi_ref(y_t | s_t))``.
    RTO ("DPO Meets PPO: Reinforced Token Optimization for RLHF", Zhong et al., 2024) trains PPO on

        r_t = beta_1 * log(pi_dpo / pi_ref)(y_t) - beta_2 * log(pi_theta / pi_ref)(y_t)
              + beta_3 * 1[t = last token] * r_MLE(x, y)

    (its practical reward: the DPO token reward, the per-token KL penalty to the reference, and the
    sparse sequence reward of a reward model at the end). Here ``beta`` = beta_1, ``kl_coef`` =
    beta_2, ``sequence_reward_coef`` = beta_3. The result feeds ``rlkern.gae`` (as rewards) or any
    token-reward estimator; it is a constant (no gradient).

    Args:
        logprobs: padded ``[B, T]`` with ``response_mask``, or packed ``[total]`` with
            ``cu_seqlens``; float16/bfloat16/float32/float64: the DPO model's token log-probs.
        ref_logprobs: logprobs' shape, float: the reference model's.
        response_mask: logprobs' shape, bool/int/float, nonzero = a response token (required when
            padded; None when packed: every token). Masked tokens get 0.
        old_logprobs: logprobs' shape, float or None: the policy's log-probs of the rollout (the
            KL term; None: no KL term).
        sequence_rewards: ``[B]`` float or None: r_MLE, added at each sequence's last valid token
            (a sequence with none gets nothing).
        beta: the DPO temperature of pi_dpo (TRL's DPOConfig default, 0.1). kl_coef: 0.0 (PPO
            trainers usually add their own KL penalty). sequence_reward_coef: 1.0.
        cu_seqlens: ``[B + 1]`` int32/int64 offsets of the packed layout.

    Returns:
        logprobs' shape, float32 (float64 for float64 log-probs).
    """
    op = _REWARDS
    if ref_logprobs is None:
        raise ValueError(f"{op}: ref_logprobs is required (the reference model's token log-probs), got None")
    named = {"ref_logprobs": ref_logprobs, "old_logprobs": old_logprobs}
    with torch.no_grad():  # rewards are constants: inputs that require grad are read, not refused
        rows = _layout(op, logprobs, response_mask, cu_seqlens, named)
    mask = _mask(response_mask)
    aux = _aux(logprobs, named)
    dtype = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
    seq = None
    if sequence_rewards is not None:
        specs = {"logprobs": (logprobs, "float"), "sequence_rewards": (sequence_rewards, "float")}
        _checks.tensors(op, "logprobs", specs, shape={"sequence_rewards": (rows,)})
        seq = sequence_rewards.detach().to(dtype).contiguous()
    beta = _checks.number(op, "beta", beta)
    kl_coef = _checks.number(op, "kl_coef", kl_coef)
    coef = _checks.number(op, "sequence_reward_coef", sequence_reward_coef)
    cu = None if cu_seqlens is None else int32_offsets(cu_seqlens)
    return _rewards_op(lastdim_contiguous(logprobs.detach()), aux["ref_logprobs"], mask, aux["old_logprobs"], seq, cu,
                       beta, kl_coef, coef)
