"""Policy losses straight from hidden states, the gradient formed in the forward: no [N, V] logits.

``linear_policy_loss(hidden, weight, labels, old_logprobs, advantages, response_mask, ...)``
returns what ``policy_loss(linear_token_logprobs(hidden, weight, labels), old_logprobs, ...)``
returns, with the logits ``z = softcap(logit_scale * (h W^T + b)) / temperature`` of
``linear_token_logprobs``, and costs three GEMMs instead of that composition's four.

How: ``linear_token_logprobs`` must recompute every logits tile in its backward, because its
upstream gradient d loss / d logprob is unknown in its forward. Here the loss is part of the
op, so for every token-local loss that gradient is known tile by tile in the forward:

1. GEMM 1: the chunk's fp32 logits tile (``linear_logprobs._logits_into``);
2. the token log-prob kernel (C++ on CPU, Triton on GPU: ``rlkern.ops.logprobs``) folds it into
   log-prob, entropy and log-sum-exp;
3. ``policy_loss`` (its C++ / Triton kernels, forward and backward) on the chunk's log-probs
   with the tokens weighted by the GLOBAL aggregation weights: every aggregation mode is linear
   in the per-sequence masked sums (``policy_loss._autograd.seq_weights``), so
   ``agg(loss) = sum_t w_{seq(t)} * mask_t * loss_t`` with ``w`` known up front from the mask
   (token-mean's token count, seq-mean-token-mean's per-sequence counts, TRL's normalizers,
   verl's global_tokens / global_seqs / dp_size). The chunk call takes ``mask * w`` as a float
   mask with ``agg="token-sum"`` (a float mask weights the tokens: rlkern.reference.policy_loss
   ``aggregate``), which gives the chunk's share of the loss and d loss / d logprob exactly. A
   second, forward-only call with the caller's mask gives the chunk's masked metric sums;
4. the token kernel's backward turns (d logprob, d entropy) into d logits in place;
5. GEMMs 2 and 3: d hidden ``+= dZ W``, d weight ``+= dZ^T h`` (and d bias), fp32 accumulators
   (``linear_logprobs._grad_products``).

It is a composition of existing kernels per chunk (no new C++ or Triton kernel); the loop is
``fused_chunks``, for any loss whose per-token gradient is known once a chunk's log-probs are. The forward
keeps the finished d hidden ``[N, H]``, d weight ``[V, H]`` (and d bias) in fp32 (fp64 for
fp64 input); the backward only scales them by the incoming gradient. Extra memory beyond the
inputs, those gradients and ``[N]`` vectors: one logits tile ``[chunk, V]``.

The losses that need a whole sequence (or the whole batch) before any token's gradient is known
take two passes instead: ``gspo``, ``geo_mean``, ``level="sequence"``, ``clip_cov`` /
``kl_cov`` (a batch-wide top-k), bypass mode, ``rollout_is`` / ``rollout_rs``,
``off_policy_mask_threshold`` and ``sequence_metrics=True``. A cheap first pass computes the
log-probs and entropy only (GEMM + the token kernel, no gradient), ``policy_loss`` runs once on
the whole batch (its forward and backward: every option exactly as it computes it), and a
second pass recomputes each tile and forms its gradient (GEMM + the two gradient GEMMs): four
GEMMs, as the composition, at O(chunk) memory. ``fused_path(...)`` says which a call takes.

``deterministic=True``: every GEMM and kernel runs on fixed blocks of
``linear_logprobs._DET_ROWS`` tokens and the chunks are accumulated in a fixed order, so the
results are bit-for-bit the same run after run (``chunk_size`` is then ignored).
"""

from __future__ import annotations

import ast
import inspect
import math

import torch
from torch import Tensor

from rlkern import _backend
from rlkern.ops import _checks
from rlkern.ops import linear_logprobs as _ll
from rlkern.ops import logprobs as _lp
from rlkern.ops._layout import segment_ids
from rlkern.ops.policy_loss import _autograd, _config
from rlkern.ops.policy_loss.loss import policy_loss
from rlkern.reference import policy_loss as _policy_reference

_OP = "linear_policy_loss"
# policy_loss's losses whose token gradient depends on that token alone (given the global
# aggregation weights): one fused pass. The rest take two passes (module docstring).
LOCAL_LOSSES = ("ppo", "cispo", "reinforce", "gpg", "sapo", "dro", "dppo_tv", "dppo_kl")
_METRIC_EPS = 1e-8  # policy_loss's masked-mean denominator: sum(mask) + 1e-8 (reference.masked_mean)


def _renamed(error: Exception) -> Exception:
    """An error of the ops this one composes, under this op's name (CONTRIBUTING.md, Errors)."""
    text = str(error)
    for name in ("linear_token_logprobs: ", "policy_loss: "):
        if text.startswith(name):
            text = f"{_OP}: " + text[len(name):]
            break
    return type(error)(text)


def fused_path(loss: str = "ppo", *, level: str = "token", rollout_is=None, rollout_rs=None,
               rollout_logprobs=None, off_policy_mask_threshold=None, sequence_metrics: bool = False) -> bool:
    """True when a call computes the loss and its gradient in one pass of three GEMMs; False when
    it takes the two passes (four GEMMs) of the module docstring."""
    return (loss in LOCAL_LOSSES and level == "token" and rollout_is is None and rollout_rs is None
            and rollout_logprobs is None and off_policy_mask_threshold is None and not sequence_metrics)


class _StoredGrads(torch.autograd.Function):
    """The loss, whose backward scales the gradients the forward already formed. They are scaled
    in place and handed over (no second copy of d weight at the peak, and autograd may take them
    as ``.grad`` as they are), so a second backward through the same call is refused."""

    @staticmethod
    def forward(ctx, total, count, *inputs_and_grads):
        # (hidden, weight, bias[, lora_A, lora_B, lora_hidden]) then their gradients, None where none
        inputs, grads = inputs_and_grads[:count], inputs_and_grads[count:]
        ctx.grads = grads
        ctx.likes = tuple(None if t is None else (t.shape, t.dtype) for t in inputs)
        return total.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError(f"{_OP}: a second backward through one call (retain_graph=True): its gradients, "
                               "formed in the forward, went to the first; call the op again")
        grads, ctx.grads = ctx.grads, None
        out = []
        for g, like in zip(grads, ctx.likes):
            out.append(None if g is None or like is None
                       else g.mul_(grad_loss.to(g.dtype)).to(like[1]).reshape(like[0]))
        del grads
        return (None, None, *out, *(None,) * len(out))


def _flat(t: Tensor | None, n: int) -> Tensor | None:
    return None if t is None else t.reshape(n)


# Under torch.compile the whole op is one custom op in the graph (rlkern::_linear_policy_loss,
# the last section of this file): its chunk loop is Python over host-side block bounds, and the
# gradient it forms in the forward would otherwise be traced tile by tile.
def linear_policy_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    old_logprobs: Tensor | None,
    advantages: Tensor,
    response_mask: Tensor | None,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    deterministic: bool = False,
    logits_dtype: torch.dtype | None = None,
    lora_A: Tensor | None = None,  # noqa: N803 (PEFT's names, as linear_token_logprobs)
    lora_B: Tensor | None = None,  # noqa: N803
    lora_scaling: float = 1.0,
    lora_hidden: Tensor | None = None,
    loss: str = "ppo",
    ref_logprobs: Tensor | None = None,
    entropy_coef: float = 0.0,
    cu_seqlens: Tensor | None = None,
    advantages_per_sequence: bool | None = None,
    agg: str = "token-mean",
    entropy_agg: str | None = None,
    global_tokens: int | float | Tensor | None = None,
    global_seqs: int | float | Tensor | None = None,
    dp_size: int = 1,
    loss_scale_factor: float | None = None,
    level: str = "token",
    is_weights: Tensor | None = None,
    rollout_logprobs: Tensor | None = None,
    rollout_is: str | None = None,
    rollout_rs: str | None = None,
    off_policy_mask_threshold: float | None = None,
    sequence_metrics: bool = False,
    **options,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``policy_loss`` of the log-probs of ``hidden @ weight.T``, without the ``[N, V]`` logits.

    Equal to ``policy_loss(linear_token_logprobs(hidden, weight, labels, ...), old_logprobs,
    advantages, response_mask, entropy=<the head's entropy>, ...)`` (``entropy`` is always the
    head's own: the ``entropy`` metric and, with ``entropy_coef``, the entropy bonus
    ``- entropy_coef * entropy_agg(H)``, verl's ``entropy_coeff``, TRL's ``entropy_coef``).
    The gradients of hidden, weight and bias are formed in the forward (module docstring).

    Args:
        hidden: ``[B, T, H]`` (padded, with ``response_mask [B, T]``) or ``[N, H]`` (packed, with
            ``cu_seqlens``), float16/bfloat16/float32/float64.
        weight: ``[V, H]``, the LM head. ``bias``: ``[V]`` or None.
        labels: hidden's leading shape, int32/int64: the sampled tokens (``ignore_index`` gives
            log-prob 0: mask those tokens).
        old_logprobs, advantages, response_mask, ref_logprobs, is_weights, rollout_logprobs:
            as ``policy_loss`` takes them, in the layout of ``labels``. ``old_logprobs=None``:
            on-policy (TRL's GRPO with ``num_iterations=1``, Liger's ``old_per_token_logps=None``):
            the old log-probs are the new ones, detached, ``old = sg(logprob)``, so every ratio
            ``r = exp(logprob - sg(logprob))`` is 1 in value and ``d r = d logprob``; each chunk
            reads its own log-probs as the old ones (no ``[N]`` input, no extra pass).
        temperature, logit_scale, logit_softcap, ignore_index: as ``linear_token_logprobs``.
        chunk_size: tokens per tile (None: a tile of ~16 MB fp32 on the CPU, 256 MB on CUDA, as
            ``linear_token_logprobs``).
        deterministic: fixed blocks and order: bit-for-bit the same result every run.
        logits_dtype: None (default): fp32 logits tiles (float64 for float64 inputs);
            ``torch.bfloat16`` / ``torch.float16``: TRL's numerics under autocast, as
            ``linear_token_logprobs(logits_dtype=...)`` rounds them (h and W cast to it, each tile
            rounded once, d logits rounded before the two gradient GEMMs).
        lora_A, lora_B, lora_scaling, lora_hidden: a LoRA adapter on the head (PEFT's
            ``lora.Linear``), as ``linear_token_logprobs`` takes it: each tile gets
            ``logit_scale * lora_scaling * (x A^T) B^T`` added (``xa = x A^T`` ``[N, r]`` once per
            call, never the merged weight); d B and d xa come from each tile's d logits, then
            ``d A = d xa^T x`` and ``d x = d xa A`` (x = ``lora_hidden``, or hidden). Extra
            memory O((N + V) r).
        FSDP2: ``weight``, ``bias``, ``lora_A``, ``lora_B`` may be ``fully_shard`` DTensors
            (hidden and labels this rank's plain tensors): gathered as ``linear_token_logprobs``
            gathers them, their gradients reduce-scattered back (averaged over the mesh).
        loss, agg, entropy_agg, level, kl / clip / correction options (``**options``: every
            other keyword of ``policy_loss``, with its defaults: ``clip_low``, ``clip_high``,
            ``dual_clip``, ``kl_coef``, ``kl_estimator``, ``tau_pos``, ...): as ``policy_loss``.

    Returns:
        ``(loss, metrics)`` as ``policy_loss``: a 0-dim float32 loss (float64 for float64
        input) and its metrics dict.
    """
    if torch.compiler.is_compiling():
        if lora_A is not None or lora_B is not None or _ll._is_dtensor(weight):
            args = {k: v for k, v in locals().items() if k in _PARAMETERS}  # a LoRA or FSDP2 head: eager,
            return _between_graphs(**args.pop("options"), **args)  # between two graphs
        return _traced_linear_policy_loss(
            hidden, weight, labels, old_logprobs, advantages, response_mask, bias=bias, temperature=temperature,
            logit_scale=logit_scale, logit_softcap=logit_softcap, ignore_index=ignore_index, chunk_size=chunk_size,
            deterministic=deterministic, logits_dtype=logits_dtype, loss=loss, ref_logprobs=ref_logprobs,
            entropy_coef=entropy_coef, cu_seqlens=cu_seqlens, advantages_per_sequence=advantages_per_sequence,
            agg=agg, entropy_agg=entropy_agg, global_tokens=global_tokens, global_seqs=global_seqs, dp_size=dp_size,
            loss_scale_factor=loss_scale_factor, level=level, is_weights=is_weights,
            rollout_logprobs=rollout_logprobs, rollout_is=rollout_is, rollout_rs=rollout_rs,
            off_policy_mask_threshold=off_policy_mask_threshold, sequence_metrics=sequence_metrics, **options)
    try:
        gathered = _ll._gather_dtensors(_OP, hidden, dict(weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B),
                                        None)
        weight, bias, lora_A, lora_B = (gathered[k] for k in ("weight", "bias", "lora_A", "lora_B"))  # noqa: N806
        return _linear_policy_loss(
            hidden, weight, labels, old_logprobs, advantages, response_mask, bias=bias, temperature=temperature,
            lora=(lora_A, lora_B, lora_scaling, lora_hidden),
            logit_scale=logit_scale, logit_softcap=logit_softcap, ignore_index=ignore_index, chunk_size=chunk_size,
            deterministic=deterministic, logits_dtype=logits_dtype, loss=loss, ref_logprobs=ref_logprobs, entropy_coef=entropy_coef,
            cu_seqlens=cu_seqlens, advantages_per_sequence=advantages_per_sequence, agg=agg, entropy_agg=entropy_agg,
            global_tokens=global_tokens, global_seqs=global_seqs, dp_size=dp_size,
            loss_scale_factor=loss_scale_factor, level=level, is_weights=is_weights,
            rollout_logprobs=rollout_logprobs, rollout_is=rollout_is, rollout_rs=rollout_rs,
            off_policy_mask_threshold=off_policy_mask_threshold, sequence_metrics=sequence_metrics, options=options)
    except (TypeError, ValueError) as error:
        raise _renamed(error) from None


def _check(hidden, weight, labels, bias, temperature, logit_scale, logit_softcap, chunk_size, deterministic,
           cu_seqlens, options):
    _ll._check_linear(hidden, weight, labels, bias, temperature, logit_scale, logit_softcap, (), chunk_size)
    if not isinstance(deterministic, bool):
        raise TypeError(f"{_OP}: deterministic must be a bool, got {deterministic!r}")
    if cu_seqlens is None and hidden.ndim != 3:
        raise ValueError(f"{_OP}: hidden must be [B, T, H] for padded input (or [N, H] with cu_seqlens), got shape "
                         f"{tuple(hidden.shape)}")
    if cu_seqlens is not None and hidden.ndim != 2:
        raise ValueError(f"{_OP}: packed input (cu_seqlens given) needs hidden [N, H], got shape "
                         f"{tuple(hidden.shape)}")
    for name in ("logprobs", "entropy", "select"):
        if name in options:
            raise TypeError(f"{_OP}: {name} is computed from hidden and weight, it is not an argument")
    known = set(policy_loss.__code__.co_varnames[:policy_loss.__code__.co_argcount
                                                 + policy_loss.__code__.co_kwonlyargcount])
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"{_OP}: unexpected keyword argument(s) {unknown}")


def _linear_policy_loss(hidden, weight, labels, old_logprobs, advantages, response_mask, *, bias, temperature, lora,
                        logit_scale, logit_softcap, ignore_index, chunk_size, deterministic, logits_dtype, loss,
                        ref_logprobs,
                        entropy_coef, cu_seqlens, advantages_per_sequence, agg, entropy_agg, global_tokens,
                        global_seqs, dp_size, loss_scale_factor, level, is_weights, rollout_logprobs, rollout_is,
                        rollout_rs, off_policy_mask_threshold, sequence_metrics, options):
    _check(hidden, weight, labels, bias, temperature, logit_scale, logit_softcap, chunk_size, deterministic,
           cu_seqlens, options)
    deterministic = _backend.deterministic(deterministic)  # or RLKERN_DETERMINISTIC=1
    on_policy = old_logprobs is None
    per_token = {"old_logprobs": old_logprobs, "response_mask": response_mask, "ref_logprobs": ref_logprobs,
                 "is_weights": is_weights, "rollout_logprobs": rollout_logprobs}
    for name, t in per_token.items():
        if t is not None and (not isinstance(t, Tensor) or tuple(t.shape) != tuple(labels.shape)):
            raise ValueError(f"{_OP}: {name} must have the shape of labels {tuple(labels.shape)}, got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    # The per-token tensors in their own names (policy_loss sees old_logprobs in its logprobs
    # slot and would name it so), and the labels' range (the kernels read weight[labels]).
    _checks.tensors(_OP, "hidden", {"hidden": (hidden, "float"), "old_logprobs": (old_logprobs, "float"),
                                    "advantages": (advantages, "float"), "response_mask": (response_mask, "mask"),
                                    "ref_logprobs": (ref_logprobs, "float"), "is_weights": (is_weights, "float"),
                                    "rollout_logprobs": (rollout_logprobs, "float")})
    _lp.check_label_range(labels, weight.shape[0], _lp.check_ignore_index(_OP, ignore_index, labels), op=_OP)
    # The modes before any GEMM (policy_loss checks the rest of its options on its own call).
    defaults = inspect.signature(policy_loss).parameters
    option = lambda name: options.get(name, defaults[name].default)  # noqa: E731
    _config.check_modes(_config.inner_loss(loss, option("bypass_loss")), agg, entropy_agg, option("kl_estimator"),
                        level)
    logits_dtype = _ll._check_logits_dtype(logits_dtype, hidden, weight)
    softcap = float(logit_softcap or 0.0)
    shape = tuple(labels.shape)
    n = labels.numel()
    h2 = hidden.reshape(n, hidden.shape[-1])
    flat_labels = labels.reshape(n)
    need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    need = tuple(x and torch.is_grad_enabled() for x in need)
    lora_a, lora_b, lora_scaling, lora_hidden = lora
    if _ll._check_lora(lora_a, lora_b, lora_scaling, lora_hidden, hidden, weight, "chunked", None):
        lora_needs = tuple(t is not None and t.requires_grad and torch.is_grad_enabled()
                           for t in (lora_a, lora_b, lora_hidden))
        acc = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
        with torch.no_grad():
            lora = LoraTiles(h2, lora_a, lora_b, float(lora_scaling),
                             None if lora_hidden is None else lora_hidden.reshape(h2.shape), acc, logits_dtype,
                             (need[0], *lora_needs))
    else:
        lora = None
    tiles = (temperature, softcap, ignore_index, logit_scale, 0 if chunk_size is None else chunk_size, deterministic,
             logits_dtype)
    pl_kwargs = dict(loss=loss, ref_logprobs=ref_logprobs, entropy_coef=entropy_coef, cu_seqlens=cu_seqlens,
                     advantages_per_sequence=advantages_per_sequence, agg=agg, entropy_agg=entropy_agg,
                     global_tokens=global_tokens, global_seqs=global_seqs, dp_size=dp_size,
                     loss_scale_factor=loss_scale_factor, level=level, is_weights=is_weights,
                     rollout_logprobs=rollout_logprobs, rollout_is=rollout_is, rollout_rs=rollout_rs,
                     off_policy_mask_threshold=off_policy_mask_threshold, sequence_metrics=sequence_metrics, **options)
    if on_policy:  # a stand-in for the checks and layouts; each pass reads the new log-probs instead
        old_logprobs = torch.zeros(shape, dtype=advantages.dtype if isinstance(advantages, Tensor)
                                   and advantages.dtype.is_floating_point else torch.float32, device=hidden.device)
    with torch.no_grad():
        if fused_path(loss, level=level, rollout_is=rollout_is, rollout_rs=rollout_rs,
                      rollout_logprobs=rollout_logprobs, off_policy_mask_threshold=off_policy_mask_threshold,
                      sequence_metrics=sequence_metrics):
            total, metrics, grads = _one_pass(h2, weight, bias, flat_labels, shape, old_logprobs, advantages,
                                              response_mask, tiles, need, pl_kwargs, on_policy, lora)
        else:
            total, metrics, grads = _two_pass(h2, weight, bias, flat_labels, shape, old_logprobs, advantages,
                                              response_mask, tiles, need, pl_kwargs, on_policy, lora)
    if lora is not None and grads is not None:
        with torch.no_grad():
            grads = (*grads, *lora.finish(grads[0] if need[0] else None))
        inputs = (hidden, weight, bias, lora_a, lora_b, lora_hidden)
        if any(need) or lora.any_grad:
            total = _StoredGrads.apply(total, len(inputs), *inputs, *grads)
    elif any(need):
        total = _StoredGrads.apply(total, 3, hidden, weight, bias, *grads)
    return total, metrics


def _two_pass(hidden, weight, bias, labels, shape, old_logprobs, advantages, mask, tiles, need, pl_kwargs,
              on_policy=False, lora=None):
    """Log-probs first (GEMM + token kernel), policy_loss on the whole batch, then the gradient
    pass (GEMM + token backward + 2 GEMMs): for the losses that need whole sequences."""
    temperature, softcap, ignore_index, logit_scale, chunk_size, deterministic, logits_dtype = tiles
    logp, entropy, lse, *_ = _ll._chunked_forward(hidden, weight, bias, labels, logit_scale, softcap, temperature,
                                                  ignore_index, True, (False, False, False), chunk_size,
                                                  deterministic, logits_dtype=logits_dtype,
                                                  lora=None if lora is None else lora.ops)
    grad_on = any(need) or (lora is not None and lora.any_grad)
    lp = logp.reshape(shape).requires_grad_(grad_on)
    ent = entropy.reshape(shape).requires_grad_(grad_on and pl_kwargs["entropy_coef"] != 0)
    if on_policy:
        old_logprobs = lp.detach()
    with torch.enable_grad():
        total, metrics = policy_loss(lp, old_logprobs, advantages, mask, entropy=ent, **pl_kwargs)
        if not grad_on:
            return total.detach(), metrics, None
        wrt = [lp] + ([ent] if ent.requires_grad else [])
        grads = torch.autograd.grad(total, wrt, allow_unused=True)
    g_lp = grads[0] if grads[0] is not None else torch.zeros_like(lp)
    g_ent = grads[1].reshape(-1) if len(grads) > 1 and grads[1] is not None else None
    g = _ll._chunked_backward(g_lp.reshape(-1), g_ent, hidden, weight, bias, labels, lse,
                              entropy if g_ent is not None else None, logit_scale, softcap, temperature,
                              ignore_index, chunk_size, deterministic, *need, logits_dtype=logits_dtype,
                              lora=None if lora is None else lora.ops,
                              lora_needs=(False, False) if lora is None else (lora.need_xa, lora.need_b))
    if lora is not None:
        g, (lora.grad_xa, lora.grad_lb) = g[:3], g[3:]
    return total.detach(), metrics, g


def _token_weights(mask_flat: Tensor, n_seqs: int, seq_of: Tensor, width: int | None, dtype: torch.dtype,
                   agg: str, dp_size, global_tokens, global_seqs, loss_scale_factor) -> Tensor:
    """``[N]``: d agg / d (mask_t * value_t) for every token (policy_loss._autograd.seq_weights)."""
    counts = torch.zeros(n_seqs, dtype=dtype, device=mask_flat.device).index_add_(0, seq_of, mask_flat)
    as_tensor = lambda x: None if x is None else torch.as_tensor(x, dtype=dtype, device=mask_flat.device)  # noqa: E731
    w = _autograd.seq_weights(counts, agg, width or 1, float(dp_size), as_tensor(global_tokens),
                              as_tensor(global_seqs), loss_scale_factor)
    return w[seq_of]


def _one_pass(hidden, weight, bias, labels, shape, old_logprobs, advantages, mask, tiles, need, pl_kwargs,
              on_policy=False, lora=None):
    """The fused pass: per chunk GEMM 1, token kernel, policy_loss forward + backward on the
    chunk with the global weights, token backward, GEMMs 2 and 3."""
    kw = dict(pl_kwargs)
    cu_seqlens = kw.pop("cu_seqlens")
    entropy_coef = kw.pop("entropy_coef")
    entropy_agg = kw.pop("entropy_agg")
    agg = kw.pop("agg")
    norms = {k: kw.pop(k) for k in ("global_tokens", "global_seqs", "dp_size", "loss_scale_factor")}
    per_seq_flag = kw.pop("advantages_per_sequence")
    for k in ("rollout_logprobs", "rollout_is", "rollout_rs", "off_policy_mask_threshold", "sequence_metrics"):
        kw.pop(k)
    ref_logprobs, is_weights = kw.pop("ref_logprobs"), kw.pop("is_weights")
    loss_name = kw.pop("loss")
    n = labels.numel()
    device = hidden.device
    # Validate every policy_loss option once, on the whole batch, with the old log-probs standing
    # in for the new (a token-local loss: no RNG, no batch-wide state), and resolve TRL's presets.
    policy_loss(old_logprobs.detach(), old_logprobs, advantages, mask, cu_seqlens=cu_seqlens, agg=agg,
                entropy_agg=entropy_agg, advantages_per_sequence=per_seq_flag, ref_logprobs=ref_logprobs,
                is_weights=is_weights, entropy_coef=entropy_coef, loss=loss_name, **norms, **kw)
    packed = cu_seqlens is not None
    n_seqs = cu_seqlens.numel() - 1 if packed else shape[0]
    width = None if packed else shape[1]
    resolved = _config.aggregation(_OP, agg, entropy_agg, n_seqs, width, packed, norms["dp_size"],
                                   norms["global_tokens"], norms["global_seqs"], norms["loss_scale_factor"])
    advantages = _config.advantage_layout(advantages, old_logprobs, cu_seqlens, per_seq_flag)

    # the log-probs' dtype (linear_logprobs._plan's accumulation dtype): policy_loss's output
    # dtype follows it, as in the composition
    cdt = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
    seq_of = (segment_ids(cu_seqlens, n) if packed
              else torch.arange(n_seqs, device=device).repeat_interleave(shape[1]))
    mask_flat = (torch.ones(n, dtype=cdt, device=device) if mask is None else mask.reshape(n).to(cdt))
    weights = _token_weights(mask_flat, n_seqs, seq_of, width, cdt, resolved.agg, norms["dp_size"],
                             norms["global_tokens"], resolved.global_seqs, resolved.loss_scale_factor)
    ent_weights = weights if not resolved.entropy_agg else _token_weights(
        mask_flat, n_seqs, seq_of, width, cdt, resolved.entropy_agg, 1, None, None, resolved.loss_scale_factor)
    adv_flat = advantages.reshape(-1)
    adv_tok = (adv_flat if advantages.shape == old_logprobs.shape else adv_flat[seq_of]).contiguous()
    old_flat, ref_flat, isw_flat = (None if t is None else _flat(t, n).contiguous()
                                    for t in (old_logprobs, ref_logprobs, is_weights))
    # Each chunk calls policy_loss's kernels directly (rlkern::policy_loss's implementation, the
    # arguments checked above): the public op's checks and dispatch cost ~0.8 ms a call on the
    # CPU, more than its kernels at a chunk's size, and a step has two calls per chunk.
    defaults = inspect.signature(policy_loss).parameters
    option = lambda name: kw.get(name, defaults[name].default)  # noqa: E731
    clip_low = option("clip_low")
    hyper = _policy_reference.hyper_list(
        clip_low=clip_low, clip_high=clip_low if option("clip_high") is None else option("clip_high"),
        dual_clip=option("dual_clip"), kl_coef=option("kl_coef"), entropy_coef=0.0, dp_size=1,
        loss_scale_factor=None, tau_pos=option("tau_pos"), tau_neg=option("tau_neg"), dro_beta=option("dro_beta"),
        ppo_kl_coef=option("ppo_kl_coef"), global_tokens=None, global_seqs=None,
        kl_bias_correction=option("kl_bias_correction"))
    config = (loss_name, "token-sum", "", option("kl_estimator"), "token", hyper)
    one = torch.ones((), dtype=cdt, device=device)

    total = torch.zeros((), dtype=torch.float64, device=device)
    metric_sums = torch.zeros(len(_autograd.METRIC_KEYS), dtype=torch.float64, device=device)
    ent_sum = torch.zeros((), dtype=torch.float64, device=device)
    any_grad = any(need) or (lora is not None and lora.any_grad)

    def token_grads(start, end, logp, entropy):
        k = end - start
        nonlocal total
        lp = logp.reshape(1, k)
        m = mask_flat[start:end]
        piece = lambda t: None if t is None else t[start:end].reshape(1, k)  # noqa: E731
        # on-policy: the chunk's own log-probs are its old ones (a constant here: no grad mode)
        tensors = (lp if on_policy else piece(old_flat), piece(adv_tok))
        extra = (piece(ref_flat), None, piece(isw_flat), None, None, None, None)
        # The chunk's share of the loss and d loss / d logprob: the global weights in the mask.
        weighted = (m * weights[start:end]).reshape(1, k)
        part, _, stats = _autograd._fwd_impl(lp, *tensors, weighted, *extra, *config)
        g_lp = _autograd._bwd_impl(one, lp, *tensors, weighted, *extra, stats, *config)[0] if any_grad else None
        # The chunk's masked metric sums: policy_loss's masked means times their denominator.
        chunk_metrics = _autograd._fwd_impl(lp, *tensors, m.reshape(1, k), *extra, *config)[1]
        metric_sums.add_(chunk_metrics.double() * (m.sum(dtype=torch.float64) + _METRIC_EPS))
        ent64 = entropy.double()
        ent_sum.add_((ent64 * m).sum())
        total = total + part.double()
        g_ent = None
        if entropy_coef != 0:
            total = total - entropy_coef * (ent64 * m * ent_weights[start:end]).sum()
            g_ent = -entropy_coef * m * ent_weights[start:end]
        return g_lp, g_ent

    grads = fused_chunks(hidden, weight, bias, labels, token_grads, tiles=tiles, need=need, lora=lora)
    denom = mask_flat.sum(dtype=torch.float64) + _METRIC_EPS
    values = metric_sums / denom
    values[_autograd.METRIC_KEYS.index("entropy")] = ent_sum / denom
    metrics = dict(zip(_autograd.METRIC_KEYS, values.to(torch.float32).unbind(0)))
    return total.to(cdt), metrics, grads


def fused_chunks(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, token_grads, *, tiles: tuple,
                 need: tuple[bool, bool, bool], lora=None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The one-pass chunk loop of a fused linear loss, for any loss whose d loss / d logprob (and
    d loss / d entropy) of a token is known once its chunk's log-probs are.

    ``hidden [N, H]``, ``weight [V, H]``, ``bias [V]`` or None, ``labels [N]``; ``tiles``:
    ``(temperature, softcap, ignore_index, logit_scale, chunk_size or 0, deterministic,
    logits_dtype or None)`` (``logits_dtype``: linear_logprobs' rounded tiles);
    ``need``: which of d hidden, d weight, d bias to form. Per chunk of tokens ``[start, end)``:
    GEMM 1 (the fp32 logits tile), the token log-prob kernel, then
    ``token_grads(start, end, logp [k], entropy [k]) -> (d loss / d logp [k] or None,
    d loss / d entropy [k] or None)`` (the caller accumulates its loss there), the token
    backward kernel in place, GEMMs 2 and 3. Returns ``(d hidden, d weight, d bias)`` in the
    accumulation dtype (fp32, fp64 for fp64 input), None where not needed. ``lora``: None or a
    ``LoraTiles`` (its d xa and d B are accumulated in it)."""
    temperature, softcap, ignore_index, logit_scale, chunk_size, deterministic, logits_dtype = tiles
    device = hidden.device
    acc_dtype, (forward, backward), blocks, buf, row_dtype, gemm_weight = _ll._plan(
        hidden, weight, chunk_size, deterministic, logits_dtype)
    rounded = logits_dtype is not None
    wide = product_weight = None
    if rounded:  # as linear_logprobs._chunked_backward: fp32 room for the scaled tile / CPU products
        on_cuda = device.type == "cuda"
        if logit_scale != 1.0 or not on_cuda:
            wide = torch.empty_like(buf, dtype=acc_dtype)
        small = not on_cuda and 4 * gemm_weight.numel() <= _ll._W_COPY_BYTES
        product_weight = gemm_weight.float() if small else gemm_weight
    grad_hidden = torch.zeros(hidden.shape, dtype=acc_dtype, device=device) if need[0] else None
    grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=device) if need[1] else None
    grad_bias = torch.zeros(weight.shape[0], dtype=acc_dtype, device=device) if need[2] else None
    for start, end, rows in blocks:
        k = end - start
        tile = buf[:rows]
        h = _ll._rows(hidden, start, end, rows).to(row_dtype)
        xa = None if lora is None else _ll._rows(lora.ops[0], start, end, rows)
        if rounded:  # GEMM 1, rounded to logits_dtype; the kernels read logit_scale * tile in fp32
            _ll._rounded_logits_into(tile, h, gemm_weight, bias)
            if lora is not None:
                lora.add(tile, xa, 1.0)
            kernel_tile = _ll._scaled(tile, None if wide is None else wide[:rows], logit_scale)
        else:
            _ll._logits_into(tile, h, gemm_weight, bias, logit_scale)  # GEMM 1
            if lora is not None:
                lora.add(tile, xa, logit_scale)
            kernel_tile = tile
        tile_labels = _ll._rows(labels, start, end, rows)
        c_logp, c_ent, c_lse = forward(kernel_tile, tile_labels, temperature, softcap, ignore_index, True,
                                       vocab_start=-1)
        g_lp, g_ent = token_grads(start, end, c_logp[:k], c_ent[:k])
        if not (any(need) or (lora is not None and lora.any_grad)) or (g_lp is None and g_ent is None):
            continue
        g_lp = c_logp.new_zeros(k) if g_lp is None else g_lp.reshape(k).to(acc_dtype)
        # A padded row (deterministic blocks) gets lse = -inf: its gradient row is exactly 0.
        backward(_ll._rows(g_lp, 0, k, rows),
                 None if g_ent is None else _ll._rows(g_ent.reshape(k).to(acc_dtype), 0, k, rows),
                 kernel_tile, tile_labels, _ll._rows(c_lse, 0, k, rows, -math.inf),
                 None if g_ent is None else c_ent, temperature, softcap, ignore_index, kernel_tile, vocab_start=-1)
        padded = rows != k
        g_hidden = None
        if grad_hidden is not None:
            g_hidden = grad_hidden.new_zeros((rows, hidden.shape[1])) if padded else grad_hidden[start:end]
        if rounded:  # TRL scales the fp32 gradient, rounds it, then the fp32-accumulated GEMMs 2, 3
            if kernel_tile is not tile:
                tile.copy_(kernel_tile.mul_(logit_scale))
            _ll._rounded_grad_products(tile, None if wide is None else wide[:rows], h, product_weight, g_hidden,
                                       grad_weight, grad_bias)
            if lora is not None:  # the CPU products left the tile's fp32 copy in wide
                lora.grads(wide[:rows] if wide is not None and device.type != "cuda" else tile.to(acc_dtype), xa,
                           1.0, start, end)
        else:
            _ll._grad_products(tile, h, gemm_weight, g_hidden, grad_weight, grad_bias, logit_scale)  # GEMMs 2, 3
            if lora is not None:
                lora.grads(tile, xa, logit_scale, start, end)
        if padded and grad_hidden is not None:
            grad_hidden[start:end] = g_hidden[:k]
    return grad_hidden, grad_weight, grad_bias


# ---------------------------------------------------------------------------------------------
# torch.compile: the whole op as one custom op. Its implementation is the eager op above (the
# gradients of hidden, weight and bias formed in the forward, handed out as outputs); its
# backward scales them by the loss' incoming gradient. The hyper-parameters travel as one string
# (``repr`` of a dict of Python constants, made at trace time), the tensors as arguments.

_TENSOR_ARGS = ("old_logprobs", "advantages", "response_mask", "bias", "ref_logprobs", "cu_seqlens", "is_weights",
                "rollout_logprobs", "global_tokens", "global_seqs")


@torch._dynamo.assume_constant_result
def _encode(config: tuple) -> str:
    return repr(dict(config))


def _with_autograd():
    """The eager op's own autograd (its per-tile ``torch.autograd.grad``) inside a custom op's
    implementation, which torch.library runs with the Autograd dispatch keys excluded."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for name in dir(torch._C.DispatchKey):
        if name.startswith("Autograd"):
            exclude = exclude.remove(getattr(torch._C.DispatchKey, name))
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


class _NonFinite(ast.NodeTransformer):
    """repr writes the non-finite floats as the bare names inf / nan, which ast.literal_eval lacks."""

    def visit_Name(self, node):
        if node.id not in ("inf", "nan"):
            raise ValueError(f"{_OP}: not a constant in the compiled options: {node.id}")
        return ast.copy_location(ast.Constant(math.inf if node.id == "inf" else math.nan), node)


def _decode(config: str) -> dict:
    """_encode's string back to the options (Python literals only; dtypes spelled "torch.<name>")."""
    values = ast.literal_eval(_NonFinite().visit(ast.parse(config, mode="eval")))
    return {k: (getattr(torch, v.removeprefix("torch.")) if isinstance(v, str) and v.startswith("torch.") else v)
            for k, v in values.items()}


@torch.library.custom_op("rlkern::_linear_policy_loss", mutates_args=())
def _linear_policy_loss_op(hidden: Tensor, weight: Tensor, labels: Tensor, old_logprobs: Tensor | None, advantages: Tensor,
                           response_mask: Tensor | None, bias: Tensor | None, ref_logprobs: Tensor | None,
                           cu_seqlens: Tensor | None, is_weights: Tensor | None, rollout_logprobs: Tensor | None,
                           global_tokens: Tensor | None, global_seqs: Tensor | None, config: str,
                           needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    kwargs = _decode(config)
    options = dict(kwargs.pop("options"))
    h, w = hidden.detach().requires_grad_(needs[0]), weight.detach().requires_grad_(needs[1])
    b = None if bias is None else bias.detach().requires_grad_(needs[2])
    with torch.enable_grad(), _with_autograd():
        total, metrics = linear_policy_loss(
            h, w, labels, old_logprobs, advantages, response_mask, bias=b, ref_logprobs=ref_logprobs,
            cu_seqlens=cu_seqlens, is_weights=is_weights, rollout_logprobs=rollout_logprobs,
            global_tokens=global_tokens if global_tokens is not None else kwargs.pop("global_tokens"),
            global_seqs=global_seqs if global_seqs is not None else kwargs.pop("global_seqs"),
            **{k: v for k, v in kwargs.items() if k not in ("global_tokens", "global_seqs")}, **options)
        wanted = [t if need and t is not None else None for t, need in zip((h, w, b), needs)]
        found = iter(torch.autograd.grad(total, [t for t in wanted if t is not None]) if any(
            t is not None for t in wanted) else ())
    grads = [next(found) if t is not None else hidden.new_empty(0) for t in wanted]
    keys = _metric_keys(kwargs["sequence_metrics"])
    return (total.detach(), torch.stack([metrics[k].detach() for k in keys]), *grads)


def _metric_keys(sequence_metrics: bool) -> tuple[str, ...]:
    return _autograd.METRIC_KEYS + (_policy_reference.SEQUENCE_METRIC_KEYS if sequence_metrics else ())


@_linear_policy_loss_op.register_fake
def _(hidden, weight, labels, old_logprobs, advantages, response_mask, bias, ref_logprobs, cu_seqlens, is_weights,
      rollout_logprobs, global_tokens, global_seqs, config, needs):
    kwargs = _decode(config)
    cdt = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
    keys = len(_metric_keys(kwargs["sequence_metrics"]))
    grads = [t.new_empty(t.shape) if need and t is not None else hidden.new_empty(0)
             for t, need in zip((hidden, weight, bias), needs)]
    return (hidden.new_empty((), dtype=cdt), hidden.new_empty(keys, dtype=torch.float32), *grads)


def register_stored_grads(op, *, n_inputs: int, bias_index: int) -> None:
    """The backward of a fused loss' custom op (this file's and rlkern/ops/linear_preference.py's):
    its outputs are ``(loss, metrics, d hidden, d weight, d bias)`` and its last input the
    ``needs`` flags; the backward scales the stored gradients by the loss' incoming gradient, for
    inputs 0 (hidden), 1 (weight) and ``bias_index``."""

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*output[2:])
        ctx.needs = inputs[-1]
        ctx.has_bias = inputs[bias_index] is not None

    def backward(ctx, grad_total, grad_metrics, *unused):
        gh, gw, gb = ctx.saved_tensors
        scale = lambda g: (g * grad_total.to(g.dtype)).to(g.dtype)  # noqa: E731
        grads = [None] * n_inputs
        grads[0] = scale(gh) if ctx.needs[0] else None
        grads[1] = scale(gw) if ctx.needs[1] else None
        grads[bias_index] = scale(gb) if ctx.needs[2] and ctx.has_bias else None
        return tuple(grads)

    op.register_autograd(backward, setup_context=setup)


register_stored_grads(_linear_policy_loss_op, n_inputs=15, bias_index=6)


def _traced_linear_policy_loss(hidden, weight, labels, old_logprobs, advantages, response_mask, *, bias, **kwargs):
    tensors = {name: kwargs.pop(name) for name in _TENSOR_ARGS if name in kwargs}
    tensors["bias"] = bias
    constants = {name: t for name, t in tensors.items() if name in ("global_tokens", "global_seqs")
                 and not isinstance(t, Tensor)}
    for name in constants:
        tensors[name] = None
    options = {k: kwargs.pop(k) for k in list(kwargs) if k not in _CONFIG_NAMES}
    dtype = kwargs.get("logits_dtype")
    config = tuple(sorted({**kwargs, **constants, "logits_dtype": None if dtype is None else str(dtype),
                           "options": tuple(sorted(options.items()))}.items()))
    grad = torch.is_grad_enabled()
    needs = [grad and hidden.requires_grad, grad and weight.requires_grad,
             grad and bias is not None and bias.requires_grad]
    total, metrics, *_ = _linear_policy_loss_op(
        hidden, weight, labels, old_logprobs, advantages, response_mask, bias, tensors["ref_logprobs"],
        tensors["cu_seqlens"], tensors["is_weights"], tensors["rollout_logprobs"], tensors["global_tokens"],
        tensors["global_seqs"], _encode(config), needs)
    return total, dict(zip(_metric_keys(kwargs["sequence_metrics"]), metrics.unbind(0)))


_between_graphs = torch.compiler.disable(linear_policy_loss)
_PARAMETERS = frozenset(inspect.signature(linear_policy_loss).parameters)

_CONFIG_NAMES = ("temperature", "logit_scale", "logit_softcap", "ignore_index", "chunk_size", "deterministic",
                 "logits_dtype", "loss", "entropy_coef", "advantages_per_sequence", "agg", "entropy_agg",
                 "dp_size", "loss_scale_factor", "level", "rollout_is", "rollout_rs", "off_policy_mask_threshold",
                 "sequence_metrics")
class LoraTiles:
    """A LoRA adapter on the head (PEFT's ``lora.Linear``) as the fused losses' tiles take it
    (linear_logprobs' "LoRA on the head" section): ``xa = x A^T`` ``[N, r]`` once, each logits
    tile gets ``s * xa_rows B^T`` added (times logit_scale for fp32 tiles); from each tile's
    d logits ``G``: ``d B += a G^T xa_rows`` and ``d xa_rows = a G B`` (``a = s * logit_scale``);
    after the loop ``d A = d xa^T x`` and ``d x = d xa A`` (into d hidden when x is hidden).
    ``needs``: (d hidden, d A, d B, d lora_hidden)."""

    def __init__(self, hidden: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float, lora_hidden: Tensor | None,
                 acc: torch.dtype, logits_dtype, needs: tuple[bool, bool, bool, bool]):
        self.x = hidden if lora_hidden is None else lora_hidden
        self.lora_a, self.own_x = lora_a, lora_hidden is not None
        self.ops = _ll._lora_operands(self.x, lora_a, lora_b, scaling, acc, logits_dtype)
        self.acc, self.op_dtype = acc, acc if logits_dtype is None else logits_dtype
        need_hidden, self.need_a, self.need_b, need_x = needs
        self.need_x = self.own_x and need_x
        self.need_xa = self.need_a or self.need_x or (not self.own_x and need_hidden)
        self.grad_xa = torch.zeros(self.ops[0].shape, dtype=acc, device=hidden.device) if self.need_xa else None
        self.grad_lb = torch.zeros(self.ops[1].shape, dtype=acc, device=hidden.device) if self.need_b else None

    @property
    def any_grad(self) -> bool:
        return self.need_xa or self.need_b

    def add(self, tile: Tensor, xa_rows: Tensor, logit_scale: float) -> None:
        """``tile += logit_scale * s * xa_rows B^T`` (the tile's dtype)."""
        tile.addmm_(xa_rows.to(tile.dtype), self.ops[1].to(tile.dtype).T, alpha=self.ops[2] * logit_scale)

    def grads(self, grad_tile: Tensor, xa_rows: Tensor, logit_scale: float, start: int | Tensor,
              end: int | None = None) -> None:
        """d B and the d xa of rows ``[start, end)`` (or of the row indices ``start``) from the
        tile's d logits (fp32 / fp64; padded rows are zero)."""
        alpha = self.ops[2] * logit_scale
        dtype = grad_tile.dtype
        if self.grad_lb is not None:
            self.grad_lb.addmm_(grad_tile.T, xa_rows.to(dtype), alpha=alpha)
        if self.grad_xa is not None:
            block = torch.mm(grad_tile, self.ops[1].to(dtype))
            if end is None:
                self.grad_xa.index_add_(0, start, block[: start.numel()], alpha=alpha)
            else:
                self.grad_xa[start:end].add_(block[: end - start], alpha=alpha)

    def finish(self, grad_hidden: Tensor | None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """``(d A, d B, d lora_hidden)``; d x goes into ``grad_hidden`` when x is hidden. The
        operands as the A GEMM read them (rounded to logits_dtype when it is given)."""
        g_a = g_x = None
        if self.need_xa:
            if self.need_a:
                g_a = torch.mm(self.grad_xa.T, self.x.to(self.op_dtype).to(self.acc))
            a = self.lora_a.to(self.op_dtype).to(self.acc)
            if self.need_x:
                g_x = torch.mm(self.grad_xa, a)
            elif not self.own_x and grad_hidden is not None:
                grad_hidden.addmm_(self.grad_xa, a)
        return g_a, self.grad_lb, g_x
