"""``policy_loss``: validate -> config -> corrections -> dispatch (the custom ops in _autograd.py)."""

from __future__ import annotations

import torch
from torch import Tensor

from rlkern.ops import _checks
from rlkern.ops._layout import pad
from rlkern.ops.policy_loss import _autograd, _config, corrections
from rlkern.reference import policy_loss as reference


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor | None,
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
    kl_bias_correction: bool = False,
    off_policy_mask_threshold: float | None = None,
    sequence_metrics: bool = False,
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
        response_mask: like ``logprobs``; bool, integer or float (a float mask weights the tokens
            as verl's masked sums do). May be None for packed input (every token counts).
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
            log-ratio to [-20, 20], value to [-10, 10]), ``k3_unclamped`` (k3 without those bounds:
            TRL 1.16's beta term, exactly), and any of them with ``+`` (value of the estimator,
            gradient of k2). Default k3 as verl's ``low_var_kl`` (TRL's beta term where the k3
            value stays below 10).
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
        kl_bias_correction: multiply the KL estimate by the importance ratio ``exp(lr)``
            (unclamped; at ``level="sequence"`` the sequence ratio), with the gradient through the
            ratio: TRL 1.16's ``use_bias_correction_kl`` (TRL's default True; off here, as verl).
            ``kl_ref`` then reports the corrected estimate, as TRL's ``kl``.
        off_policy_mask_threshold: DeepSeek-V3.2's off-policy sequence mask (TRL 1.16
            ``off_policy_mask_threshold``, default None: off): the policy term of a token with a
            negative advantage is dropped (weight 0, the token stays in the normalizers) when its
            sequence's mean of ``behaviour - sg(logprobs)`` exceeds the threshold; the behaviour
            log-probs are ``rollout_logprobs`` when given, else ``old_logprobs``.
        sequence_metrics: add per-sequence clip statistics to ``metrics`` (see Returns).

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

        With ``sequence_metrics=True`` also, over each sequence's clip fractions (its masked
        means): ``clipfrac_low_min`` / ``clipfrac_high_max``, the min / max over the sequences with
        a token (TRL ``clip_ratio/low_min`` / ``high_max``), and ``seq_clipfrac``,
        ``seq_clipfrac_low``, ``seq_clipfrac_high``, plain means over all B rows (an empty row
        counts 0): TRL's clip metrics at ``importance_sampling_level="sequence"``.

        An empty mask gives loss 0, metrics 0 and a zero gradient (verl's token-mean and
        seq-mean modes give NaN there); fully masked rows do not count in the sequence means, as
        in verl. Metrics are float32 for every input dtype.
    """
    # validate
    inner = _config.inner_loss(loss, bypass_loss)
    optional = {"ref_logprobs": ref_logprobs, "entropy": entropy, "is_weights": is_weights,
                "rollout_logprobs": rollout_logprobs}
    n_seqs = _config.check_tensors(logprobs, old_logprobs, advantages, response_mask, cu_seqlens, optional)
    _config.check_modes(inner, agg, entropy_agg, kl_estimator, level)
    _config.check_hyper(inner, clip_low, clip_high, dual_clip, dro_beta)
    # read also when their term is off (no ref_logprobs / entropy): a NaN here is a config bug
    _checks.number("policy_loss", "kl_coef", kl_coef)
    _checks.number("policy_loss", "entropy_coef", entropy_coef)
    _config.check_flags(kl_bias_correction=kl_bias_correction, sequence_metrics=sequence_metrics)
    if off_policy_mask_threshold is not None:
        _checks.number("policy_loss", "off_policy_mask_threshold", off_policy_mask_threshold)
    # config
    clip_high = clip_low if clip_high is None else clip_high
    packed = cu_seqlens is not None
    resolved = _config.aggregation("policy_loss", agg, entropy_agg, n_seqs, None if packed else logprobs.shape[1],
                                   packed, dp_size, global_tokens, global_seqs, loss_scale_factor)
    advantages = _config.advantage_layout(advantages, logprobs, cu_seqlens, advantages_per_sequence)
    global_seqs = resolved.global_seqs
    hyper = reference.hyper_list(
        clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef, entropy_coef=entropy_coef,
        dp_size=dp_size, loss_scale_factor=resolved.loss_scale_factor, tau_pos=tau_pos, tau_neg=tau_neg,
        dro_beta=dro_beta, ppo_kl_coef=ppo_kl_coef,
        global_tokens=None if isinstance(global_tokens, Tensor) else global_tokens,
        global_seqs=None if isinstance(global_seqs, Tensor) else global_seqs, kl_bias_correction=kl_bias_correction)
    # corrections
    rollout = dict(rollout_is=rollout_is, rollout_is_threshold=rollout_is_threshold,
                   rollout_is_batch_normalize=rollout_is_batch_normalize, rollout_rs=rollout_rs,
                   rollout_rs_threshold=rollout_rs_threshold)
    cov = dict(clip_low=clip_low, clip_high=clip_high, clip_cov_ratio=clip_cov_ratio, clip_cov_lb=clip_cov_lb,
               clip_cov_ub=clip_cov_ub, kl_cov_ratio=kl_cov_ratio)
    is_weights, response_mask, select = corrections.apply(loss, inner, logprobs, old_logprobs, advantages,
                                                          response_mask, cu_seqlens, is_weights, rollout_logprobs,
                                                          rollout, cov, off_policy_mask_threshold)
    # dispatch; strided views as contiguous copies (a no-op otherwise): the PyTorch backend's
    # sums follow the memory order, and a view must give the contiguous input's bits
    logprobs, old_logprobs, advantages, response_mask, ref_logprobs, entropy, is_weights = (
        t.contiguous() if isinstance(t, Tensor) else t
        for t in (logprobs, old_logprobs, advantages, response_mask, ref_logprobs, entropy, is_weights))
    total, metrics, stats = _autograd.run(
        logprobs, old_logprobs, advantages, response_mask, ref_logprobs, entropy, is_weights, select, cu_seqlens,
        global_tokens if isinstance(global_tokens, Tensor) else None,
        global_seqs if isinstance(global_seqs, Tensor) else None, inner, resolved.agg, resolved.entropy_agg,
        kl_estimator, level, hyper)
    out = dict(zip(_autograd.METRIC_KEYS, metrics.to(torch.float32).unbind(0)))
    if sequence_metrics:
        if stats.shape[0]:  # the kernels' per-sequence sums (row B holds the local normalizers)
            sums = stats[:-1, [_autograd.S_COUNT, _autograd.S_CF, _autograd.S_LO, _autograd.S_HI]]
        else:
            sums = _sequence_sums_reference(logprobs, old_logprobs, advantages, response_mask, cu_seqlens, select,
                                            inner, level, clip_low, clip_high, dual_clip, tau_pos, tau_neg,
                                            dro_beta, ppo_kl_coef)
        extra = reference.sequence_metrics(sums.detach()).to(torch.float32)
        out.update(zip(reference.SEQUENCE_METRIC_KEYS, extra.unbind(0)))
    return total, out


def _sequence_sums_reference(logprobs, old_logprobs, advantages, mask, cu_seqlens, select, loss, level, clip_low,
                             clip_high, dual_clip, tau_pos, tau_neg, dro_beta, ppo_kl_coef) -> Tensor:
    """reference.sequence_sums on the torch backend (packed input padded first)."""
    lp = logprobs.detach()
    if cu_seqlens is not None:
        width = max(int(cu_seqlens.diff().max()) if cu_seqlens.numel() > 1 else 0, 1)
        padded = lambda t: None if t is None else pad(t, cu_seqlens, width)  # noqa: E731
        mask = padded(torch.ones_like(lp) if mask is None else mask.to(lp.dtype))
        if advantages.shape == lp.shape:
            advantages = padded(advantages)
        lp, old_logprobs, select = padded(lp), padded(old_logprobs), padded(select)
    return reference.sequence_sums(lp, old_logprobs, advantages, mask, loss=loss, clip_low=clip_low,
                                   clip_high=clip_high, dual_clip=dual_clip, level=level, tau_pos=tau_pos,
                                   tau_neg=tau_neg, dro_beta=dro_beta, ppo_kl_coef=ppo_kl_coef, select=select)
