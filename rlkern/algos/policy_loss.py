"""verl 0.9.1's and OpenRLHF 0.11.2's policy losses with their own signatures, computed by
``rlkern.policy_loss``.

``VERL_POLICY_LOSSES[name]`` takes what verl's ``POLICY_LOSS_REGISTRY[name]`` takes
(``old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights``)
and reads the same config fields (``clip_ratio*``, ``clip_ratio_c``, ``tau_pos`` / ``tau_neg``,
``policy_loss.*``, ``global_batch_info``); it returns ``(pg_loss, metrics)`` with the metric
keys verl's function returns (``actor/pg_clipfrac``, ``actor/ppo_kl``,
``actor/pg_clipfrac_lower``, as floats). ``bypass_mode`` leaves out verl's rollout-correction
diagnostics (``rollout_corr/*``). Register them with
``verl.trainer.ppo.core_algos.POLICY_LOSS_REGISTRY.update(VERL_POLICY_LOSSES)``.

``PolicyLoss`` takes the constructor and forward arguments of ``openrlhf.models.loss.PolicyLoss``
and returns its five outputs ``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)``:

- ``policy_loss_type="ppo"``: clipped surrogate (log-ratio clamped to [-20, 20]), dual-clip
  where A < 0; ``token_level_loss`` True is verl's token-mean, False its seq-mean-token-mean
  (empty rows left out); ``batch_num_tokens`` / ``global_batch_size`` with ``dp_size`` are verl's
  global normalizers (OpenRLHF ignores ``dp_size`` without them, and so does this module).
- ``"gspo"``: rlkern ``level="sequence"`` (exp of each sequence's mean log-ratio, the gradient
  through the mean), always per-sample; with a correction on, the ratio is against the rollout's
  log-probs, as OpenRLHF.
- the train/rollout correction (``is_correction_level`` token / seq, ``mode`` mask / clip,
  ``gating`` ratio / binary_kl / tv, ``threshold`` (low, high)): ``openrlhf_is_weights`` gives
  the coefficient, which rlkern's kernel multiplies into the policy term (``is_weights``). Unlike
  verl's rejection sampling, a rejected token keeps its place in the normalizer (OpenRLHF).

Outputs have OpenRLHF's dtypes (its type promotion of the inputs: float32 for float32 inputs,
bfloat16 for an all-bfloat16 token-level loss; rlkern computes in float32 and rounds), or, with
``out_dtype=`` a float dtype, that dtype for every output (rlkern's unrounded float32 / float64
result rounded once, as the ``out_dtype`` of TRL's drop-ins in ``rlkern.ops.logprobs``).
``ppo_kl`` and ``vllm_kl`` are OpenRLHF's plain masked means of the unclamped log-ratio (an empty
mask gives NaN there, as in OpenRLHF). Difference: an empty mask gives loss 0 (OpenRLHF: NaN).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlkern.algos._config import config_get
from rlkern.ops import _checks
from rlkern.ops import policy_loss as ops
from rlkern.ops.policy_loss.corrections import PackedRows
from rlkern.reference import policy_loss as reference

# ---------------------------------------------------------------------------------------------
# verl 0.9.1


def _get(config, key, default=None):
    return config_get(config, key, default, none_is_default=True)


def _clip_range(config) -> dict:
    clip = _get(config, "clip_ratio", 0.2)
    return dict(clip_low=_get(config, "clip_ratio_low", clip), clip_high=_get(config, "clip_ratio_high", clip))


# verl's metric keys -> rlkern's
_VERL_KEYS = {"actor/pg_clipfrac": "clipfrac", "actor/ppo_kl": "approx_kl", "actor/pg_clipfrac_lower": "dual_clipfrac"}
_ALL = tuple(_VERL_KEYS)


def _policy_config(config, key, default):
    return _get(_get(config, "policy_loss"), key, default)


def _verl_specs() -> dict:
    """verl name -> (rlkern loss, the metric keys verl returns, config -> policy_loss arguments)."""
    pl = _policy_config
    return {
        "vanilla": ("ppo", _ALL, lambda c: dict(_clip_range(c), dual_clip=_get(c, "clip_ratio_c", 3.0))),
        "dppo_tv": ("dppo_tv", _ALL, lambda c: dict(_clip_range(c), dual_clip=_get(c, "clip_ratio_c", 20.0))),
        "dppo_kl": ("dppo_kl", _ALL, lambda c: dict(_clip_range(c), dual_clip=_get(c, "clip_ratio_c", 20.0))),
        "gspo": ("gspo", _ALL, _clip_range),
        "sapo": ("sapo", _ALL, lambda c: dict(tau_pos=_get(c, "tau_pos", 1.0), tau_neg=_get(c, "tau_neg", 1.05),
                                               agg="seq-mean-token-mean")),  # verl's sapo ignores loss_agg_mode
        "gpg": ("gpg", (), lambda c: {}),
        "clip_cov": ("clip_cov", ("actor/pg_clipfrac", "actor/ppo_kl"),
                     lambda c: dict(_clip_range(c), clip_cov_ratio=pl(c, "clip_cov_ratio", 0.0002),
                                    clip_cov_lb=pl(c, "clip_cov_lb", 1.0), clip_cov_ub=pl(c, "clip_cov_ub", 5.0))),
        "kl_cov": ("kl_cov", ("actor/ppo_kl",), lambda c: dict(kl_cov_ratio=pl(c, "kl_cov_ratio", 0.0002),
                                                               ppo_kl_coef=pl(c, "ppo_kl_coef", 1.0))),
        "geo_mean": ("geo_mean", _ALL, _clip_range),
        "dro": ("dro", ("actor/ppo_kl",), lambda c: dict(dro_beta=pl(c, "dro_beta", None))),
        "cispo": ("cispo", _ALL, _clip_range),
    }


def _bypass_kwargs(config) -> tuple[dict, tuple]:
    corr = _policy_config(config, "rollout_correction", None)
    if corr is None:
        raise ValueError("bypass_mode: config.policy_loss.rollout_correction is required (verl)")
    loss_type = _get(corr, "loss_type", "ppo_clip")
    kw = dict(bypass_loss=loss_type, rollout_is=_get(corr, "rollout_is"),
              rollout_is_threshold=_get(corr, "rollout_is_threshold", 2.0),
              rollout_is_batch_normalize=bool(_get(corr, "rollout_is_batch_normalize", False)),
              rollout_rs=_get(corr, "rollout_rs"), rollout_rs_threshold=_get(corr, "rollout_rs_threshold"))
    if loss_type == "ppo_clip":
        return dict(kw, **_clip_range(config), dual_clip=_get(config, "clip_ratio_c", 3.0)), _ALL
    return kw, ("actor/ppo_kl",)


def _verl_loss(name: str):
    def policy_loss_fn(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                       loss_agg_mode: str = "token-mean", config=None, rollout_is_weights: Tensor | None = None):
        if config is None:
            raise ValueError(f"{name}: config (verl's ActorConfig) is required, as in verl")
        if name == "bypass_mode":
            loss = "bypass_mode"
            kw, keys = _bypass_kwargs(config)
            rollout_is_weights = None  # verl computes them inside bypass mode and ignores the argument
        else:
            loss, keys, extra = _verl_specs()[name]
            kw = extra(config)
        info = dict(_get(config, "global_batch_info", {}))
        kw.setdefault("agg", loss_agg_mode)
        total, metrics = ops.policy_loss(
            log_prob, old_log_prob, advantages, response_mask, loss=loss, is_weights=rollout_is_weights,
            dp_size=int(info.get("dp_size", 1)), global_tokens=info.get("batch_num_tokens"),
            global_seqs=info.get("global_batch_size"), loss_scale_factor=info.get("loss_scale_factor"), **kw)
        return total, {key: metrics[_VERL_KEYS[key]].item() for key in keys}

    policy_loss_fn.__name__ = policy_loss_fn.__qualname__ = f"compute_policy_loss_{name}"
    return policy_loss_fn


VERL_POLICY_LOSSES = {name: _verl_loss(name) for name in (*_verl_specs(), "bypass_mode")}

# ---------------------------------------------------------------------------------------------
# OpenRLHF 0.11.2


def _check_correction(level: str, mode: str, gating: str, threshold, op: str = "PolicyLoss") -> tuple[float, float]:
    if level not in reference.OPENRLHF_LEVELS:
        raise ValueError(f"{op}: is_correction_level must be one of {reference.OPENRLHF_LEVELS}, got {level!r}")
    if mode not in reference.OPENRLHF_MODES:
        raise ValueError(f"{op}: is_correction_mode must be one of {reference.OPENRLHF_MODES}, got {mode!r}")
    if gating not in reference.OPENRLHF_GATINGS:
        raise ValueError(f"{op}: is_correction_gating must be one of {reference.OPENRLHF_GATINGS}, got {gating!r}")
    bounds = (0.0, float(threshold)) if isinstance(threshold, (int, float)) else tuple(float(t) for t in threshold)
    if len(bounds) == 1:
        bounds = (0.0, bounds[0])  # OpenRLHF's CLI: a single value is an upper bound only
    if len(bounds) != 2 or not 0 <= bounds[0] <= bounds[1]:
        raise ValueError(f"{op}: is_correction_threshold must be HIGH or (LOW, HIGH) with 0 <= LOW <= HIGH, got {threshold}")
    if mode == "clip" and (level == "seq" or gating != "ratio"):
        raise ValueError(f"{op}: is_correction_mode='clip' requires is_correction_level='token' and gating='ratio' "
                         "(OpenRLHF: only the token ratio is a weight that can be clamped)")
    if gating != "ratio" and bounds[0] > 0:
        raise ValueError(f"{op}: is_correction_gating={gating!r} takes an upper bound only (a single delta)")
    return bounds


def openrlhf_is_weights(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor | None = None, *,
                        level: str = "token", mode: str = "mask", gating: str = "ratio",
                        threshold=(0.5, 5.0), cu_seqlens: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """OpenRLHF's train/rollout correction coefficient (pass it as ``policy_loss(is_weights=)``).

    Named schemes (OpenRLHF's): TIS = token clip, ICEPOP = token mask, seq-mask-tis = seq mask,
    the FlashREINFORCE trust region = seq mask with binary_kl gating and one threshold. The formula
    is ``rlkern.reference.policy_loss.openrlhf_is_weights``. Defaults are OpenRLHF's.

    Args:
        old_logprobs: ``[B, T]`` or packed ``[total]``: the training engine's log-probs.
        rollout_logprobs: same shape: the inference engine's.
        mask: same shape, bool/int/float, or None (every token).
        level: "token" or "seq" (the sequence's masked mean of the statistic).
        mode: "mask" (0 outside the band, the token's ratio inside) or "clip" (ratio clamped).
        gating: "ratio", "binary_kl" or "tv".
        threshold: ``(low, high)``, or one number (an upper bound, low 0).
        cu_seqlens: ``[B + 1]`` offsets for packed input.

    Returns:
        ``(coef, filtered)``: coef like ``old_logprobs`` (float32, float64 for float64 input), no
        gradient; filtered the fraction of sequences (level "seq") or masked tokens (level
        "token") outside the band, 0-dim.
    """
    bounds = _check_correction(level, mode, gating, threshold, op="openrlhf_is_weights")
    for name, t in (("old_logprobs", old_logprobs), ("rollout_logprobs", rollout_logprobs), ("mask", mask)):
        if t is not None and t.shape != old_logprobs.shape:
            raise ValueError(f"openrlhf_is_weights: {name} must have shape {tuple(old_logprobs.shape)}, "
                             f"got {tuple(t.shape)}")
    if cu_seqlens is None and old_logprobs.ndim != 2:
        raise ValueError(f"openrlhf_is_weights: old_logprobs must be [B, T] (or packed [total] with cu_seqlens), "
                         f"got {tuple(old_logprobs.shape)}")
    rows = reference.PaddedRows if cu_seqlens is None else PackedRows(cu_seqlens, old_logprobs.numel())
    coef, filtered = reference.openrlhf_is_weights(old_logprobs, rollout_logprobs, mask, level, mode, gating,
                                                   bounds, rows=rows)
    if coef.shape != old_logprobs.shape:  # seq-level mask on [B, T]: the band is per row
        coef = coef.expand_as(old_logprobs).contiguous()
    return coef, filtered


def _plain_masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    # OpenRLHF's models/utils.py masked_mean: no epsilon in the denominator (NaN for an empty
    # mask) and the dtype its type promotion gives; metrics only, so the extra pass is cheap.
    return x.mean() if mask is None else (x * mask).sum() / mask.sum()


def promote(*dtypes: torch.dtype) -> torch.dtype:
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def mask_dtypes(mask: Tensor | None) -> tuple:
    """The mask's dtype where it takes part in OpenRLHF's promotion (a float mask), else none."""
    return (mask.dtype,) if mask is not None and mask.is_floating_point() else ()


def openrlhf_agg_dtype(per_token: torch.dtype, mask: Tensor | None, token_level: bool, norm) -> torch.dtype:
    """The dtype of OpenRLHF 0.11.2's ``aggregate_loss`` for a per-token loss of dtype ``per_token``.

    Its sample mode divides by ``token_counts + 1e-8`` (default dtype for an integer mask) and
    multiplies by a float32 row mask; a 0-dim tensor normalizer (``batch_num_tokens`` /
    ``global_batch_size`` as its get_loss_batch_info returns them) promotes the 0-dim sum.
    """
    out = promote(per_token, *mask_dtypes(mask))
    if not token_level:
        out = promote(out, torch.get_default_dtype(), torch.float32)
    if isinstance(norm, Tensor) and norm.is_floating_point():
        out = promote(out, norm.dtype)
    return out


def to_peer_dtype(x: Tensor | None, dtype: torch.dtype, out_dtype: torch.dtype | None) -> Tensor | None:
    """Round rlkern's unrounded result to the peer's dtype ``dtype``, or to ``out_dtype`` when
    the caller names one (a drop-in's ``out_dtype`` keyword)."""
    target = dtype if out_dtype is None else out_dtype
    if x is None or x.dtype == target:
        return x
    return x.to(target)


def wide_dtype(*tensors: Tensor | None) -> torch.dtype:
    """rlkern's unrounded dtype for these inputs: float64 if one is float64, else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


class PolicyLoss(torch.nn.Module):
    """Drop-in for ``openrlhf.models.loss.PolicyLoss`` (same arguments, same five outputs).

    ``out_dtype`` (keyword-only, rlkern's addition, as in TRL's drop-ins): None returns
    OpenRLHF's dtypes; a float dtype returns every output in it, computed unrounded (float32,
    float64 for float64 inputs, the metrics too) and rounded once.
    """

    def __init__(self, clip_eps_low: float = 0.2, clip_eps_high: float = 0.2, dual_clip: float | None = None,
                 token_level_loss: bool = True, policy_loss_type: str = "ppo", is_correction_level: str = "off",
                 is_correction_mode: str = "mask", is_correction_gating: str = "ratio",
                 is_correction_threshold=(0.5, 5.0), *, out_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        _checks.out_dtype("PolicyLoss", out_dtype, "OpenRLHF")
        if policy_loss_type not in ("ppo", "gspo"):
            raise ValueError(f"PolicyLoss: policy_loss_type must be 'ppo' or 'gspo', got {policy_loss_type!r}")
        if dual_clip is not None and not dual_clip > 1.0:
            raise ValueError(f"PolicyLoss: dual_clip must be > 1.0, got {dual_clip}")
        if is_correction_level != "off":
            _check_correction(is_correction_level, is_correction_mode, is_correction_gating, is_correction_threshold)
        self.clip_eps_low, self.clip_eps_high, self.dual_clip = clip_eps_low, clip_eps_high, dual_clip
        self.policy_loss_type = policy_loss_type
        self.token_level_loss = token_level_loss and policy_loss_type != "gspo"  # GSPO: per-sample mean
        self.is_correction_level, self.is_correction_mode = is_correction_level, is_correction_mode
        self.is_correction_gating, self.is_correction_threshold = is_correction_gating, is_correction_threshold
        self.out_dtype = out_dtype

    def _out_dtype(self, wide: torch.dtype) -> torch.dtype | None:
        """The dtype every output is rounded to (None: OpenRLHF's). ``wide`` is rlkern's
        unrounded dtype for the inputs of this call: rlkern.integrations.openrlhf's
        ``patch(fp32=True)`` returns it."""
        return self.out_dtype

    @staticmethod
    def _metric_input(x: Tensor, out_dtype: torch.dtype | None) -> Tensor:
        # An out_dtype: the metrics unrounded (float32, float64 stays) instead of OpenRLHF's input dtype
        return x.float() if out_dtype is not None and x.dtype in (torch.float16, torch.bfloat16) else x

    def _loss_dtype(self, log_probs, old, advantages, action_mask, rollout_log_probs, correction, norm):
        masks = mask_dtypes(action_mask)
        if self.policy_loss_type == "gspo":
            per_token = promote(log_probs.dtype, old.dtype, *masks, advantages.dtype)
        else:
            per_token = promote(log_probs.dtype, old.dtype, advantages.dtype)
            if correction:  # the correction coefficient comes from old - rollout
                per_token = promote(per_token, rollout_log_probs.dtype)
        return openrlhf_agg_dtype(per_token, action_mask, self.token_level_loss, norm)

    def forward(self, log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor,
                action_mask: Tensor | None = None, rollout_log_probs: Tensor | None = None, dp_size: int = 1,
                batch_num_tokens: float | None = None, global_batch_size: float | None = None):
        correction = self.is_correction_level != "off"
        if correction and rollout_log_probs is None:
            raise ValueError("PolicyLoss: is_correction_level != 'off' needs rollout_log_probs")
        out_dtype = self._out_dtype(wide_dtype(log_probs, old_log_probs, advantages, rollout_log_probs))
        metric = self._metric_input
        mask = action_mask if action_mask is not None else torch.ones_like(log_probs, dtype=torch.bool)
        old, is_weights, vllm_kl, filtered = old_log_probs, None, None, None
        if correction and self.policy_loss_type == "ppo":
            is_weights, filtered = openrlhf_is_weights(
                old_log_probs, rollout_log_probs, action_mask, level=self.is_correction_level,
                mode=self.is_correction_mode, gating=self.is_correction_gating,
                threshold=self.is_correction_threshold)
            with torch.no_grad():
                vllm_kl = _plain_masked_mean(metric(rollout_log_probs, out_dtype) - metric(old_log_probs, out_dtype),
                                             action_mask)
            vllm_kl = to_peer_dtype(vllm_kl, vllm_kl.dtype, out_dtype)
            token = self.is_correction_level == "token"
            filtered = to_peer_dtype(filtered, promote(torch.float32, *mask_dtypes(action_mask)) if token
                                     else torch.float32, out_dtype)
        elif correction:  # GSPO's ratio is against the rollout policy
            old = rollout_log_probs
        if self.token_level_loss:
            agg, norms, norm = "token-mean", dict(global_tokens=batch_num_tokens), batch_num_tokens
        else:
            agg, norms, norm = "seq-mean-token-mean", dict(global_seqs=global_batch_size), global_batch_size
        loss, metrics = ops.policy_loss(
            log_probs, old, advantages, mask, clip_low=self.clip_eps_low, clip_high=self.clip_eps_high,
            dual_clip=self.dual_clip, level="sequence" if self.policy_loss_type == "gspo" else "token", agg=agg,
            dp_size=dp_size if norm is not None else 1, is_weights=is_weights, **norms)
        # ppo_kl: OpenRLHF's unclamped masked mean of old - new (rlkern's approx_kl clamps the
        # log-ratio to [-20, 20], as verl's ppo_kl does)
        with torch.no_grad():
            ppo_kl = _plain_masked_mean(metric(old_log_probs, out_dtype) - metric(log_probs, out_dtype), action_mask)
        loss_dtype = self._loss_dtype(log_probs, old, advantages, action_mask, rollout_log_probs, correction, norm)
        clip_dtype = promote(torch.float32, *mask_dtypes(action_mask))
        return (to_peer_dtype(loss, loss_dtype, out_dtype), to_peer_dtype(metrics["clipfrac"], clip_dtype, out_dtype),
                to_peer_dtype(ppo_kl, ppo_kl.dtype, out_dtype), vllm_kl, filtered)
