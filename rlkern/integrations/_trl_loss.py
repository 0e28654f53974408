"""TRL 1.16's GRPO / RLOO loss through ``rlkern.policy_loss``.

``grpo_compute_loss`` and ``rloo_compute_loss`` replace ``GRPOTrainer._compute_loss`` and
``RLOOTrainer._compute_loss``: the log-probs and entropies come from the trainer's own
``_get_per_token_logps_and_entropies`` (called as TRL calls it, so a fused-head path stays as it
is), and the loss, its gradient and every entry TRL appends to ``self._metrics`` come from
``rlkern.policy_loss`` (the per-token math in its C++ / Triton kernels). What stays here is TRL's
glue: the loss_type -> (loss, agg, normalizer) table, gradient-accumulation scaling, TRL's own
entropy-quantile mask and VESPO gamma weights (per-sequence reductions over gathered batches),
the adaptive entropy controller, and the cross-process reductions of the metrics.

``loss_overrides()`` lists ``(owner class, attribute, replacement)`` for the wiring in
``rlkern.integrations.trl.patch(loss=True)``. ``CALLS`` counts the calls that ran through rlkern.
A configuration rlkern cannot express exactly (``delta < 1 + epsilon_high``: TRL's two-sided
clip then also caps positive advantages; ``cispo`` with ``epsilon_high < 1``; ``vespo`` with
``importance_sampling_level="sequence"`` and a bias-corrected KL) runs TRL's own method,
unchanged and uncounted.
"""

from __future__ import annotations

import torch

import rlkern

CALLS = 0  # calls computed by rlkern (tests assert it moved); also in rlkern.integrations.trl.calls


def _count(name: str) -> None:
    global CALLS
    CALLS += 1
    from rlkern.integrations import trl as rt

    rt.calls[name] += 1

_PPO_FAMILY = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
_SUM_NORMALIZED = ("cispo", "dapo", "vespo")  # normalized by num_items_in_batch, not divided by GA afterwards
_ORIGINAL: dict = {}  # (class, attribute) -> TRL's own method, for the configurations above


def _trl():
    from trl.trainer.grpo_trainer import GRPOTrainer
    from trl.trainer.rloo_trainer import RLOOTrainer
    return GRPOTrainer, RLOOTrainer


def _logps_and_entropies(self, model, inputs):
    """TRL's own call (GRPOTrainer._compute_loss / RLOOTrainer._compute_loss, first lines)."""
    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    logits_to_keep = completion_ids.size(1)
    return self._get_per_token_logps_and_entropies(
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        compute_entropy=True,
        compute_aux_loss=self.aux_loss_enabled,
        pixel_values=inputs.get("pixel_values"),
        image_grid_thw=inputs.get("image_grid_thw"),
        num_images=inputs.get("num_images"),
        pixel_attention_mask=inputs.get("pixel_attention_mask"),
        spatial_shapes=inputs.get("spatial_shapes"),
        num_tiles=inputs.get("num_tiles"),
        image_sizes=inputs.get("image_sizes"),
        token_type_ids=inputs.get("token_type_ids"),
        mm_token_type_ids=inputs.get("mm_token_type_ids"),
        image_position_ids=inputs.get("image_position_ids"),
    )


def _save_originals() -> None:
    """Keep TRL's own ``_compute_loss`` of each trainer (the fallback) before anything patches it."""
    for owner in _trl():
        current = owner.__dict__["_compute_loss"]
        if current not in (grpo_compute_loss, rloo_compute_loss):
            _ORIGINAL[(owner, "_compute_loss")] = current


def _original(owner):
    """TRL's own ``_compute_loss`` of ``owner``."""
    if (owner, "_compute_loss") not in _ORIGINAL:
        _save_originals()
    original = _ORIGINAL.get((owner, "_compute_loss"))
    if original is None:
        raise RuntimeError(f"rlkern TRL loss: {owner.__name__}._compute_loss was replaced before TRL's own was saved")
    return original


def _expressible(self) -> bool:
    loss_type, args = self.loss_type, self.args
    if loss_type not in _PPO_FAMILY + ("cispo", "sapo", "vespo"):
        return False
    if loss_type in _PPO_FAMILY and args.delta is not None and not args.delta >= 1 + self.epsilon_high:
        return False  # rlkern's dual_clip equals TRL's two-sided clip only above the upper clip bound
    if loss_type == "cispo" and not self.epsilon_high >= 1:
        return False
    if loss_type == "vespo" and self.importance_sampling_level == "sequence" and self.beta != 0.0 and \
            args.use_bias_correction_kl:
        return False  # the KL's sequence ratio with the reinforce loss: not a policy_loss level
    return self.importance_sampling_level in ("token", "sequence")


def _global_mean(self, mean, count):
    """TRL's global_masked_mean from a local mean over ``count`` units (sum and count reduced)."""
    count = torch.as_tensor(count, dtype=torch.float32, device=mean.device)
    totals = self.accelerator.reduce(torch.stack([mean.float() * count, count]), reduction="sum")
    return (totals[0] / totals[1].clamp(min=1.0)).item()


def grpo_compute_loss(self, model, inputs):
    """``GRPOTrainer._compute_loss`` through rlkern.policy_loss (same loss, gradient and metrics)."""
    if not _expressible(self):
        return _original(_trl()[0])(self, model, inputs)
    from trl.trainer.utils import nanmax, nanmin

    completion_mask = inputs["completion_mask"]
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    per_token_logps, entropies, aux_loss = _logps_and_entropies(self, model, inputs)
    args, loss_type = self.args, self.loss_type
    sequence = self.importance_sampling_level == "sequence"
    mode = "train" if self.model.training else "eval"
    accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0

    # TRL's entropy-quantile mask: a quantile over the batch gathered from every process
    entropy_mask = None
    if self.top_entropy_quantile < 1.0:
        entropy_mask = self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)

    advantages = inputs["advantages"]
    if advantages.dim() == 2 and advantages.shape[1] == 1:
        advantages = advantages.squeeze(1)
    old = inputs.get("old_per_token_logps")
    old = per_token_logps.detach() if old is None else old

    # weights on the policy term: entropy mask, vLLM importance ratio, VESPO's gamma weights
    weights = None if entropy_mask is None else entropy_mask.to(per_token_logps.dtype)
    vllm_is = self.use_vllm and self.vllm_importance_sampling_correction
    phi_seq = None
    if loss_type == "vespo":
        phi_seq = self.get_gamma_weights(
            advantages=advantages[:, None] if advantages.dim() == 1 else advantages,
            log_ratio_per_token=per_token_logps - old, mask=mask,
            importance_sampling_ratio=inputs.get("importance_sampling_ratio"), k_pos=args.vespo_k_pos,
            lambda_pos=args.vespo_lambda_pos, k_neg=args.vespo_k_neg, lambda_neg=args.vespo_lambda_neg)
        weights = phi_seq.expand_as(per_token_logps) if weights is None else weights * phi_seq
    elif vllm_is:
        ratio = inputs["importance_sampling_ratio"].expand_as(per_token_logps)
        weights = ratio if weights is None else weights * ratio

    kwargs = dict(clip_low=self.epsilon_low, clip_high=self.epsilon_high, level="sequence" if sequence else "token")
    if loss_type in _PPO_FAMILY:
        kwargs.update(loss="ppo", dual_clip=args.delta)
    elif loss_type == "cispo":  # TRL caps the ratio at epsilon_high, no lower bound
        kwargs.update(loss="cispo", clip_low=1.0, clip_high=self.epsilon_high - 1.0)
    elif loss_type == "sapo":
        kwargs.update(loss="sapo", tau_pos=args.sapo_temperature_pos, tau_neg=args.sapo_temperature_neg)
    else:  # vespo: -phi A logprob, phi the (stop-gradient) gamma weight
        kwargs.update(loss="reinforce", level="token")
    if loss_type in ("grpo", "sapo"):
        kwargs.update(agg="grpo")
    elif loss_type == "bnpo":
        kwargs.update(agg="bnpo")
    elif loss_type == "dr_grpo":
        kwargs.update(agg="dr_grpo", loss_scale_factor=self.max_completion_length)
    elif loss_type == "luspo":  # sum per sequence, mean over all B rows
        kwargs.update(agg="seq-mean-token-sum", global_seqs=per_token_logps.shape[0])
    else:  # num_items_in_batch spans the generation batch: rescaled to one accumulation window
        tokens = inputs["num_items_in_batch"].clamp(min=1.0)
        if mode == "train":
            tokens = tokens * self.current_gradient_accumulation_steps / args.steps_per_generation
        kwargs.update(agg="dapo", global_tokens=tokens, dp_size=self.accelerator.num_processes)

    # the entropy bonus: a token mean over the tokens it acts on, scaled for accumulation only
    apply_coef = 0.0
    effective_mask = mask if entropy_mask is None else mask * entropy_mask
    if self._entropy_bonus_enabled:
        if self.use_adaptive_entropy:
            apply_coef = self.entropy_coef if self._last_world_entropy <= args.entropy_target else 0.0
        else:
            apply_coef = self.entropy_coef
    fused_bonus = self._entropy_bonus_enabled and entropy_mask is None
    bonus_coef = apply_coef / (accumulation if loss_type in _SUM_NORMALIZED else 1.0)

    loss, metrics = rlkern.policy_loss(
        per_token_logps, old, advantages, mask, **kwargs,
        ref_logprobs=inputs["ref_per_token_logps"] if self.beta != 0.0 else None, kl_coef=self.beta,
        kl_estimator="k3_unclamped", kl_bias_correction=bool(args.use_bias_correction_kl),
        # without the bonus the entropies only feed the metric: detached, so that the backward does
        # not run through the model's entropy computation (TRL leaves them out of the graph there)
        entropy=entropies if fused_bonus else entropies.detach(), entropy_coef=bonus_coef if fused_bonus else 0.0,
        entropy_agg="token-mean",
        is_weights=weights, rollout_logprobs=inputs.get("sampling_per_token_logps"),
        off_policy_mask_threshold=self.off_policy_mask_threshold, sequence_metrics=True)
    _count("GRPOTrainer._compute_loss")
    policy_loss = loss.detach()
    if fused_bonus:
        policy_loss = policy_loss + bonus_coef * metrics["entropy"].to(policy_loss.dtype)
    if loss_type not in _SUM_NORMALIZED:
        loss = loss / accumulation
    if self._entropy_bonus_enabled:
        if not fused_bonus:  # the quantile mask: the bonus over its own tokens
            bonus = rlkern.aggregate(entropies, effective_mask, agg="token-mean")
            loss = loss - apply_coef * bonus / accumulation
        self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
        if self.use_adaptive_entropy and mode == "train":  # TRL's controller, on the window's totals
            stats = torch.stack([(entropies * effective_mask).sum(), effective_mask.sum()]).detach()
            self._entropy_window_stats = stats if self._entropy_window_stats is None else \
                self._entropy_window_stats + stats
            if self.accelerator.sync_gradients:
                window = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                world_entropy = (window[0] / window[1].clamp(min=1.0)).item()
                if world_entropy <= args.entropy_target:
                    self.entropy_coef = min(self.entropy_coef + args.entropy_coef_delta, args.entropy_coef_max)
                else:
                    self.entropy_coef = max(self.entropy_coef - args.entropy_coef_delta, args.entropy_coef_min)
                self._last_world_entropy = world_entropy
                self._entropy_window_stats = None
        if mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
    if self.aux_loss_enabled:
        loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
        self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

    tokens = mask.sum()
    if self.beta != 0.0:
        self._metrics[mode]["kl"].append(_global_mean(self, metrics["kl_ref"], tokens))
    self._metrics[mode]["entropy"].append(_global_mean(self, metrics["entropy"], tokens))
    # clip metrics: token means at level "token", plain means over the B rows at level "sequence"
    n_seqs = per_token_logps.shape[0]
    prefix, count = ("seq_", n_seqs) if sequence else ("", tokens)
    if loss_type in _PPO_FAMILY:
        self._metrics[mode]["clip_ratio/low_mean"].append(_global_mean(self, metrics[prefix + "clipfrac_low"], count))
        self._metrics[mode]["clip_ratio/high_mean"].append(
            _global_mean(self, metrics[prefix + "clipfrac_high"], count))
        self._metrics[mode]["clip_ratio/region_mean"].append(_global_mean(self, metrics[prefix + "clipfrac"], count))
        low_min, high_max = metrics["clipfrac_low_min"], metrics["clipfrac_high_max"]
        if sequence:  # TRL's per-sequence values there include empty rows, which are never clipped (0)
            low_min = torch.where((mask.sum(-1) == 0).any(), torch.zeros_like(low_min), low_min)
        else:  # a process whose rows are all empty has no per-sequence value (TRL: NaN, skipped)
            live = (mask.sum(-1) > 0).any()
            low_min = torch.where(live, low_min, torch.full_like(low_min, float("nan")))
            high_max = torch.where(live, high_max, torch.full_like(high_max, float("nan")))
        self._metrics[mode]["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(low_min[None])).item())
        self._metrics[mode]["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(high_max[None])).item())
    elif loss_type == "cispo":
        self._metrics[mode]["cispo_clip_ratio"].append(_global_mean(self, metrics[prefix + "clipfrac_high"], count))
    elif loss_type == "vespo":
        if phi_seq.shape[1] == 1:  # one weight per sequence: a plain mean over the rows
            self._metrics[mode]["vespo/phi_seq_mean"].append(_global_mean(self, phi_seq.mean(), n_seqs))
        else:  # per-token advantages give per-token weights: a token mean
            phi_mean = (phi_seq * mask).sum() / tokens.clamp(min=1)
            self._metrics[mode]["vespo/phi_seq_mean"].append(_global_mean(self, phi_mean, tokens))
    return loss


def rloo_compute_loss(self, model, inputs):
    """``RLOOTrainer._compute_loss`` through rlkern.policy_loss: the PPO clip on each sequence's
    summed log-ratio (one "token" per sequence, ratio unclamped as ``level="sequence"``)."""
    from trl.trainer.utils import nanmax, nanmin

    completion_mask = inputs["completion_mask"]
    per_token_logps, entropies, aux_loss = _logps_and_entropies(self, model, inputs)
    logps = (per_token_logps * completion_mask).sum(1, keepdim=True)
    ones = torch.ones_like(logps, dtype=torch.bool)
    loss, metrics = rlkern.policy_loss(logps, inputs["old_logps"][:, None], inputs["advantages"], ones, loss="ppo",
                                       clip_low=self.epsilon_low, clip_high=self.epsilon_high, level="sequence",
                                       agg="token-mean", sequence_metrics=True)
    _count("RLOOTrainer._compute_loss")
    mode = "train" if self.model.training else "eval"
    if self.aux_loss_enabled:
        loss = loss + self.router_aux_loss_coef * aux_loss
        self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
    entropy_sum = rlkern.aggregate(entropies.detach(), completion_mask, agg="token-sum")
    entropy_stats = self.accelerator.reduce(
        torch.stack([entropy_sum.float(), completion_mask.sum().float()]), reduction="sum")
    self._metrics[mode]["entropy"].append((entropy_stats[0] / entropy_stats[1].clamp(min=1.0)).item())
    n_seqs = logps.shape[0]
    gather = self.accelerator.gather
    # means over the gathered sequences: the local means weighted by each process's B
    self._metrics[mode]["clip_ratio/low_mean"].append(_global_mean(self, metrics["clipfrac_low"], n_seqs))
    self._metrics[mode]["clip_ratio/low_min"].append(nanmin(gather(metrics["clipfrac_low_min"][None])).item())
    self._metrics[mode]["clip_ratio/high_mean"].append(_global_mean(self, metrics["clipfrac_high"], n_seqs))
    self._metrics[mode]["clip_ratio/high_max"].append(nanmax(gather(metrics["clipfrac_high_max"][None])).item())
    self._metrics[mode]["clip_ratio/region_mean"].append(_global_mean(self, metrics["clipfrac"], n_seqs))
    return loss


def loss_overrides() -> list[tuple[object, str, object]]:
    """``(owner class, attribute name, replacement)`` for each trainer whose loss rlkern computes."""
    grpo, rloo = _trl()
    _save_originals()
    return [(grpo, "_compute_loss", grpo_compute_loss), (rloo, "_compute_loss", rloo_compute_loss)]


try:  # TRL's own methods, saved at import: a patch applied later cannot hide them from the fallback
    _save_originals()
except ImportError:  # TRL not installed: loss_overrides() raises then
    pass
