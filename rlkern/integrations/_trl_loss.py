"""TRL 1.16's GRPO / RLOO loss through ``rlkern.policy_loss``, its DPO and KTO losses through
``rlkern.preference_loss`` and ``rlkern.kto_loss``.

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

``dpo_compute_loss`` replaces ``DPOTrainer._compute_loss`` (see its docstring): every loss type
TRL 1.16 has, the loss-type list with ``loss_weights`` (MPO), every ``f_divergence_type``,
``label_smoothing``, ``discopop_tau``, WPO's ``use_weighting``, LD-DPO's ``ld_alpha``,
``precompute_ref_log_probs``, the PEFT reference and the MoE aux loss. TRL's own method runs
(uncounted) for ``return_outputs=True`` (deprecated in TRL, an extra forward), a loss type or
f-divergence TRL does not know (TRL raises), ``beta <= 0``, ``label_smoothing`` outside [0, 0.5]
with robust / exo_pair / aot / aot_unpaired, or >= 0.5 with robust (TRL only warns there), and
``loss_type=["sft"]`` alone with ``ld_alpha`` (TRL logs LD-weighted sums but averages plain token
log-probs). Where TRL 1.16 fails, rlkern computes: ``use_weighting`` with sft or hinge (TRL's
in-place product on sft's expanded loss / on relu's saved output raises), alpha_divergence on
float64 log-probs (TRL has no clamp for float64; rlkern's is 80). Empty completions: sft's
token mean is 0 (TRL: NaN).

``grpo_fused_compute_loss`` / ``dpo_fused_compute_loss`` / ``kto_fused_compute_loss``
(``patch(loss="fused")``): the same methods, with the loss formed from the policy's last hidden
states and LM head by ``rlkern.linear_policy_loss`` / ``rlkern.linear_preference_loss`` /
``rlkern.linear_kto_loss`` (the hidden states recorded
from TRL's own forward by ``rlkern.integrations.trl.capture``); what they cannot take runs the
methods above.

``kto_compute_loss`` replaces ``KTOTrainer._compute_loss``: both loss types (kto,
apo_zero_unpaired), the desirable / undesirable weights, the KL reference point (with or
without KL completions), precomputed / PEFT references and the aux loss, through
``rlkern.kto_loss``.
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
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.grpo_trainer import GRPOTrainer
    from trl.trainer.kto_trainer import KTOTrainer
    from trl.trainer.rloo_trainer import RLOOTrainer
    return GRPOTrainer, RLOOTrainer, DPOTrainer, KTOTrainer


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
        if current not in (grpo_compute_loss, grpo_fused_compute_loss, rloo_compute_loss, dpo_compute_loss,
                           dpo_fused_compute_loss, kto_compute_loss, kto_fused_compute_loss):
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


def _fusable(self) -> bool:
    """What ``patch(loss="fused")`` takes: every GRPO loss type grpo_compute_loss takes but those
    that read the per-token log-probs or entropies outside the loss (VESPO's gamma weights, the
    entropy-quantile mask, the adaptive entropy controller) and the MoE aux loss (its output
    comes with the log-probs)."""
    adaptive = self._entropy_bonus_enabled and self.use_adaptive_entropy
    return (self.loss_type != "vespo" and self.top_entropy_quantile >= 1.0 and not adaptive
            and not self.aux_loss_enabled)


def _fused_operands(inputs, head):
    """hidden ``[B, K, H]`` and labels ``[B, K]`` (-100 where TRL scores nothing) of the K
    completion positions, from the operands TRL's fused head handed the adapter: the rows of
    ``last_hidden_state[:, :-1]`` whose shifted label is not -100 (TRL's compact layout on Triton
    devices) or all of them (elsewhere), as ``_fused_forward`` in trl/trainer/utils.py takes them."""
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    k = inputs["completion_ids"].size(1)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :-k] = -100
    labels = labels[:, 1:].to(head["hidden"].device)
    valid = labels != -100
    return _hidden_grid(head["hidden"], valid)[:, -k:], labels[:, -k:], _lora_kwargs(head, valid, k)


def _lora_kwargs(head, valid, k=None):
    """The fused losses' LoRA keywords from a captured head with a PEFT adapter (none without):
    its A-path input (PEFT's dropout output) laid out as the hidden states are."""
    if head.get("lora_A") is None:
        return {}
    x = head["lora_hidden"]
    if x is not None:
        x = _hidden_grid(x, valid)
        x = x if k is None else x[:, -k:]
    return dict(lora_A=head["lora_A"], lora_B=head["lora_B"], lora_scaling=head["lora_scaling"], lora_hidden=x)


def _hidden_grid(hidden, valid):
    """The fused head's rows as ``[rows, T - 1, H]``: all positions (TRL's layout off Triton
    devices) or only the ``valid`` ones (its compact layout on Triton devices, zeros elsewhere)."""
    if hidden.shape[0] == valid.numel():
        return hidden.reshape(*valid.shape, hidden.shape[-1])
    if hidden.shape[0] == int(valid.sum()):
        return hidden.new_zeros(*valid.shape, hidden.shape[-1]).masked_scatter(valid[..., None], hidden)
    raise RuntimeError(f"rlkern TRL loss: the fused head got {hidden.shape[0]} rows, expected "
                       f"{valid.numel()} or {int(valid.sum())}")


def grpo_fused_compute_loss(self, model, inputs):
    """``GRPOTrainer._compute_loss`` through rlkern.linear_policy_loss (``patch(loss="fused")``):
    the policy's last hidden states and LM head, no per-token log-probs tensor; what it cannot
    take (``_fusable``, a ZeRO-3 head) runs grpo_compute_loss."""
    return grpo_compute_loss(self, model, inputs, fused=True)


def grpo_compute_loss(self, model, inputs, fused=False):
    """``GRPOTrainer._compute_loss`` through rlkern.policy_loss (same loss, gradient and metrics)."""
    if not _expressible(self):
        return _original(_trl()[0])(self, model, inputs)
    from trl.trainer.utils import nanmax, nanmin

    completion_mask = inputs["completion_mask"]
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    head = None
    if fused and _fusable(self):
        from rlkern.integrations import trl as rt

        # TRL's own forward (autocast, PEFT, DDP wrappers as it runs them); the adapter records
        # the hidden states and head it is handed instead of projecting them
        with rt.capture() as heads:
            per_token_logps, entropies, aux_loss = _logps_and_entropies(self, model, inputs)
        if len(heads) > 1:
            raise RuntimeError("rlkern TRL loss: one fused-head call expected per _compute_loss")
        head = heads[0] if heads else None  # none: a ZeRO-3 head, scored by the adapter
    else:
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

    common = dict(ref_logprobs=inputs["ref_per_token_logps"] if self.beta != 0.0 else None, kl_coef=self.beta,
                  kl_estimator="k3_unclamped", kl_bias_correction=bool(args.use_bias_correction_kl),
                  entropy_coef=bonus_coef if fused_bonus else 0.0, entropy_agg="token-mean", is_weights=weights,
                  rollout_logprobs=inputs.get("sampling_per_token_logps"),
                  off_policy_mask_threshold=self.off_policy_mask_threshold, sequence_metrics=True)
    if head is not None:
        hidden, labels, lora = _fused_operands(inputs, head)
        tiles = dict(bias=head["bias"], temperature=head["temperature"], logit_scale=head["logit_scale"],
                     logit_softcap=head["softcap"] or None, logits_dtype=head["logits_dtype"])
        if inputs.get("old_per_token_logps") is None:  # on-policy: the ratio is 1, old = sg(the new log-probs),
            old = None  # which linear_policy_loss reads tile by tile (no extra pass over the head)
        loss, metrics = rlkern.linear_policy_loss(hidden, head["weight"], labels, old, advantages, mask, **tiles,
                                                  **lora, **kwargs, **common)
        _count("GRPOTrainer._compute_loss[fused]")
    else:
        # without the bonus the entropies only feed the metric: detached, so that the backward does
        # not run through the model's entropy computation (TRL leaves them out of the graph there)
        loss, metrics = rlkern.policy_loss(
            per_token_logps, old, advantages, mask, **kwargs, **common,
            entropy=entropies if fused_bonus else entropies.detach())
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


# --- DPO ---------------------------------------------------------------------------------------

# loss types that read label_smoothing (rlkern takes it in [0, 0.5]; robust < 0.5, exo_pair > 0)
_DPO_SMOOTHED = ("robust", "exo_pair", "aot", "aot_unpaired")
_DPO_NORMALIZED = ("ipo", "sigmoid_norm")  # divide by the unshifted completion_mask's sums


def _dpo_expressible(self) -> bool:
    from rlkern.reference.preference import DPO_LOSS_TYPES, F_DIVERGENCES

    types = list(self.loss_types)
    if not types or not set(types) <= set(DPO_LOSS_TYPES) or self.f_divergence_type not in F_DIVERGENCES:
        return False  # TRL raises its own errors
    if not self.beta > 0 or len(self.loss_weights) != len(types):
        return False
    ls = self.label_smoothing
    if set(types) & set(_DPO_SMOOTHED) and not 0.0 <= ls <= 0.5:
        return False
    if "robust" in types and ls >= 0.5:
        return False  # TRL divides by 1 - 2 * label_smoothing (it only warns)
    if set(types) == {"sft"} and self.ld_alpha is not None:
        return False  # the logged rewards / log-probs are of LD-weighted sums, the loss of plain ones
    return True


def _sequence_logps(self, per_token_logps, shift_completion_mask, masks=None):
    """TRL's per-sequence sums: plain (the fused head's log-probs are 0 where the label is -100),
    or LD-DPO's (``ld_alpha``) shared-prefix sum plus ld_alpha times the tail's. Returns the sums
    and the (shared, tail) masks, which the reference's sums reuse."""
    if self.ld_alpha is None:
        return per_token_logps.sum(dim=1), None
    if masks is None:
        position = shift_completion_mask.cumsum(dim=1)
        lengths = shift_completion_mask.sum(dim=1).long()
        chosen, rejected = lengths.chunk(2, dim=0)
        shared = torch.minimum(chosen, rejected)
        shared = torch.cat([shared, shared], dim=0).to(per_token_logps.device)[:, None]
        masks = ((position > 0) & (position <= shared), position > shared)
    shared_mask, tail_mask = masks
    sums = (per_token_logps * shared_mask).sum(dim=1) + self.ld_alpha * (per_token_logps * tail_mask).sum(dim=1)
    return sums, masks


def _dpo_reference_logps(self, model_kwargs, labels, seq_len, shift_completion_mask, masks):
    """TRL's reference forward (under no_grad, without router logits, PEFT: the adapter off or the
    "ref" adapter), summed as the policy's."""
    from trl.trainer import dpo_trainer as trl_dpo

    kwargs = {k: v for k, v in model_kwargs.items() if k != "output_router_logits"}
    with torch.no_grad(), trl_dpo.disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
        if trl_dpo.is_peft_model(self.model) and self.ref_model is None:
            unwrapped = self.accelerator.unwrap_model(self.model)
            with trl_dpo.use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                outputs = self.model(**kwargs, labels=labels, fused_lm_head=True)
        else:
            outputs = self.ref_model(**kwargs, labels=labels, fused_lm_head=True)
    return _sequence_logps(self, outputs.log_probs[:, -seq_len:], shift_completion_mask, masks)[0]


def _dpo_token_metrics(self, mode, outputs, seq_len, shift_completion_mask, inputs):
    """TRL's logged entropy, token count, mean logits and token accuracy (from the fused head's
    per-token outputs; no loss math)."""
    gather = self.accelerator.gather_for_metrics
    entropy = outputs.entropy[:, -seq_len:].detach()
    tokens = gather(shift_completion_mask.sum()).sum()
    entropy_sum = gather((entropy * shift_completion_mask).sum()).sum()
    self._metrics[mode]["entropy"].append((entropy_sum / tokens).item() if tokens > 0 else 0.0)
    if mode == "train":
        self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // self._tp_size
    self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
    chosen_mask, rejected_mask = shift_completion_mask.bool().chunk(2, dim=0)
    chosen_logits, rejected_logits = outputs.mean_logits[:, -seq_len:].chunk(2, dim=0)
    for name, logits, mask in (("chosen", chosen_logits, chosen_mask), ("rejected", rejected_logits, rejected_mask)):
        total = gather(logits[mask].sum()).sum().item()
        count = gather(mask.sum()).sum().item()
        self._metrics[mode][f"logits/{name}"].append(total / count if count > 0 else 0.0)
    top1, _ = outputs.is_top1[:, -seq_len:].chunk(2, dim=0)
    correct = gather((top1 & chosen_mask).sum()).sum()
    count = gather(chosen_mask.sum()).sum()
    self._metrics[mode]["mean_token_accuracy"].append((correct / count).item() if count > 0 else 0.0)


def _dpo_fusable(self, completion_mask) -> bool:
    """What ``patch(loss="fused")`` takes for DPO (a bf16 / fp16 compute dtype included: the
    loss rounds its tiles as TRL's, ``logits_dtype``): not sft (its token mean is a separate call), and ipo /
    sigmoid_norm only where the unshifted completion mask's lengths equal the shifted ones
    linear_preference_loss reads (no completion token in the first column)."""
    types = set(self.loss_types)
    if "sft" in types:
        return False
    return not (types & set(_DPO_NORMALIZED)) or not bool((completion_mask[:, 0] != 0).any())


def dpo_fused_compute_loss(self, model, inputs, return_outputs):
    """``DPOTrainer._compute_loss`` through rlkern.linear_preference_loss (``patch(loss="fused")``):
    the policy's last hidden states and LM head; TRL's fused head still computes its per-token
    outputs outside the graph for the logged metrics (entropy, mean logits, top-1 accuracy) and
    WPO's weights. What it cannot take (``_dpo_fusable``, a ZeRO-3 head) runs
    dpo_compute_loss."""
    return dpo_compute_loss(self, model, inputs, return_outputs, fused=True)


def dpo_compute_loss(self, model, inputs, return_outputs, fused=False):
    """``DPOTrainer._compute_loss`` through rlkern.preference_loss (same loss, gradient and metrics).

    TRL's glue stays: the policy (and reference) forward through the fused head, the per-sequence
    sums (LD-DPO's ``ld_alpha`` weighting), the precomputed reference log-probs, WPO's
    ``use_weighting`` pair weights, the MoE aux loss and the token metrics. Every loss type, the
    loss-type list with ``loss_weights``, ``f_divergence_type`` / ``f_alpha_divergence_coef``,
    ``label_smoothing`` and ``discopop_tau`` are rlkern's; the logged rewards and log-probs are
    its metrics (means over the pairs, averaged over processes by their pair counts). sft with
    LD-DPO or with ipo / sigmoid_norm takes its own call (it averages the plain token log-probs
    over the shifted mask, the others read LD-weighted sums / the unshifted lengths).
    """
    trainer_cls = _trl()[2]
    if return_outputs or not _dpo_expressible(self):
        return _original(trainer_cls)(self, model, inputs, return_outputs)
    mode = "train" if self.model.training else "eval"
    model_kwargs = {k: v for k, v in inputs.items() if k not in ("completion_mask", "ref_chosen_logps",
                                                                 "ref_rejected_logps")}
    model_kwargs["use_cache"] = False
    if self.aux_loss_enabled:
        model_kwargs["output_router_logits"] = True
    completion_mask = inputs["completion_mask"]
    shift_completion_mask = completion_mask[..., 1:]
    labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
    head = None
    if fused and _dpo_fusable(self, completion_mask):
        from rlkern.integrations import trl as rt

        # TRL's forward, its outputs detached (metrics); under a bf16 / fp16 compute dtype the
        # loss rounds its tiles as TRL's (linear_preference_loss(logits_dtype=))
        with rt.capture(compute=True) as heads:
            outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        if len(heads) > 1:
            raise RuntimeError("rlkern TRL loss: one fused-head call expected per _compute_loss")
        head = heads[0] if heads else None  # none: a ZeRO-3 head, scored by the adapter
    else:
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
    seq_len = shift_completion_mask.size(1)
    per_token_logps = outputs.log_probs[:, -seq_len:]
    logps, masks = _sequence_logps(self, per_token_logps, shift_completion_mask)
    chosen_logps, rejected_logps = logps.chunk(2, dim=0)
    if self.precompute_ref_logps:
        ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
    else:
        ref_logps = _dpo_reference_logps(self, model_kwargs, labels, seq_len, shift_completion_mask, masks)
        ref_chosen, ref_rejected = ref_logps.chunk(2, dim=0)

    pair_weights = None
    if self.use_weighting:  # WPO (arXiv 2406.11827, Eq. 2): exp of the mean aligned log-prob, constants
        with torch.no_grad():
            aligned = (per_token_logps - outputs.log_sum_sq_probs[:, -seq_len:]) * shift_completion_mask
            weights = torch.exp(aligned.sum(dim=1) / shift_completion_mask.sum(dim=1).clamp_min(1))
            chosen_w, rejected_w = weights.chunk(2, dim=0)
            pair_weights = chosen_w * rejected_w

    types, loss_weights = list(self.loss_types), [float(w) for w in self.loss_weights]
    smoothed = bool(set(types) & set(_DPO_SMOOTHED))
    kw = dict(beta=self.beta, label_smoothing=self.label_smoothing if smoothed else 0.0,
              f_divergence_type=self.f_divergence_type, f_alpha_divergence_coef=self.f_alpha_divergence_coef,
              discopop_tau=self.args.discopop_tau, pair_weights=pair_weights)
    if head is not None:
        shifted = labels[:, 1:].to(head["hidden"].device)
        loss, metrics = rlkern.linear_preference_loss(
            _hidden_grid(head["hidden"], shifted != -100), head["weight"], shifted, shift_completion_mask,
            torch.cat([ref_chosen, ref_rejected]).detach(), bias=head["bias"], temperature=head["temperature"],
            logit_scale=head["logit_scale"], logit_softcap=head["softcap"] or None,
            logits_dtype=head["logits_dtype"], ld_alpha=self.ld_alpha,
            loss_type=types, loss_weights=loss_weights, **_lora_kwargs(head, shifted != -100), **kw)
        _count("DPOTrainer._compute_loss[fused]")
        return _dpo_finish(self, mode, loss, metrics, outputs, seq_len, shift_completion_mask, inputs,
                           chosen_logps.shape[0])
    chosen_mask, rejected_mask = completion_mask.chunk(2, dim=0)
    shift_chosen, shift_rejected = shift_completion_mask.chunk(2, dim=0)
    split_sft = "sft" in types and (self.ld_alpha is not None or bool(set(types) & set(_DPO_NORMALIZED)))
    main = [(t, w) for t, w in zip(types, loss_weights) if not (split_sft and t == "sft")]
    # sft's lengths are the shifted mask's token counts, ipo's / sigmoid_norm's the unshifted mask's
    lengths = (shift_chosen, shift_rejected) if "sft" in types and not split_sft else (chosen_mask, rejected_mask)
    loss, metrics = rlkern.preference_loss(
        chosen_logps, rejected_logps, ref_chosen, ref_rejected, loss_type=[t for t, _ in main],
        loss_weights=[w for _, w in main], chosen_lengths=lengths[0].sum(dim=1),
        rejected_lengths=lengths[1].sum(dim=1), **kw)
    if split_sft:
        sft = [w for t, w in zip(types, loss_weights) if t == "sft"]
        plain = (per_token_logps * shift_completion_mask).sum(dim=1) if self.ld_alpha is not None else logps
        plain_chosen, plain_rejected = plain.chunk(2, dim=0)
        sft_loss, _ = rlkern.preference_loss(
            plain_chosen, plain_rejected, loss_type=["sft"] * len(sft), loss_weights=sft,
            chosen_lengths=shift_chosen.sum(dim=1), rejected_lengths=shift_rejected.sum(dim=1), **kw)
        loss = loss + sft_loss
    return _dpo_finish(self, mode, loss, metrics, outputs, seq_len, shift_completion_mask, inputs,
                       chosen_logps.shape[0])


def _dpo_finish(self, mode, loss, metrics, outputs, seq_len, shift_completion_mask, inputs, n_pairs):
    """The aux loss and TRL's logged metrics after rlkern's loss."""
    _count("DPOTrainer._compute_loss")
    if self.aux_loss_enabled:
        loss = loss + self.router_aux_loss_coef * outputs.aux_loss
        self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())
    _dpo_token_metrics(self, mode, outputs, seq_len, shift_completion_mask, inputs)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"):
        self._metrics[mode][key].append(_global_mean(self, metrics[key], n_pairs))
    return loss


# --- KTO ---------------------------------------------------------------------------------------


def kto_fused_compute_loss(self, model, inputs, return_outputs):
    """``KTOTrainer._compute_loss`` through rlkern.linear_kto_loss (``patch(loss="fused")``): the
    policy's last hidden states and LM head; TRL's fused head still computes its per-token outputs
    outside the graph for the logged metrics (entropy, mean logits, log-probs). A ZeRO-3 head
    and the MoE aux loss run kto_compute_loss (a LoRA adapter or an FSDP2 head is taken)."""
    return kto_compute_loss(self, model, inputs, return_outputs, fused=True)


def kto_compute_loss(self, model, inputs, return_outputs, fused=False):
    """``KTOTrainer._compute_loss`` through rlkern.kto_loss (same loss, gradient and metrics).

    TRL's glue stays: the KL completions' log-probs (its own ``_compute_kl_logps``), the policy
    and reference forwards, the reference point averaged over processes (TRL's gathered mean,
    clamped at 0, passed to kto_loss as one KL log-prob), the aux loss and the token metrics. The
    loss over the desirable and undesirable completions with their weights, and the logged
    rewards / log-probs, are rlkern's. TRL's own method runs for ``return_outputs=True``, a loss
    type TRL does not know, or ``beta <= 0``. No completion at all gives 0 (TRL: NaN).
    """
    from trl.trainer import kto_trainer as trl_kto

    from rlkern.reference.preference import KTO_LOSS_TYPES

    if return_outputs or self.loss_type not in KTO_LOSS_TYPES or not self.beta > 0:
        return _original(_trl()[3])(self, model, inputs, return_outputs)
    mode = "train" if self.model.training else "eval"
    device = self.accelerator.device
    batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    labels = batch["label"]
    num_chosen = labels.sum().to(device)
    num_rejected = (len(labels) - num_chosen).to(device)
    kl_logps = self._compute_kl_logps(model, batch)

    skip = ("completion_mask", "KL_input_ids", "KL_attention_mask", "KL_completion_mask", "KL_token_type_ids",
            "KL_mm_token_type_ids", "label", "ref_logps", "ref_KL_logps")
    model_kwargs = {k: v for k, v in batch.items() if k not in skip}
    model_kwargs["use_cache"] = False
    if self.aux_loss_enabled:
        model_kwargs["output_router_logits"] = True
    completion_labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    head = None
    if fused and not self.aux_loss_enabled:  # the aux loss comes with the outputs: it stays unfused
        from rlkern.integrations import trl as rt

        with rt.capture(compute=True) as heads:  # TRL's forward, its outputs detached (metrics)
            outputs = model(**model_kwargs, labels=completion_labels, fused_lm_head=True)
        if len(heads) > 1:
            raise RuntimeError("rlkern TRL loss: one fused-head call expected per _compute_loss")
        head = heads[0] if heads else None  # none: a ZeRO-3 head, scored by the adapter
    else:
        outputs = model(**model_kwargs, labels=completion_labels, fused_lm_head=True)
    seq_len = batch["input_ids"].size(1) - 1
    logps = outputs.log_probs[:, -seq_len:].sum(-1)
    if logps.shape[0] != len(labels):
        return _original(_trl()[3])(self, model, inputs, return_outputs)  # TRL raises its own error
    bool_labels = torch.as_tensor(labels, dtype=torch.bool, device=logps.device)

    if self.precompute_ref_logps:
        ref_logps = batch["ref_logps"]
        ref_kl_logps = batch["ref_KL_logps"] if self.calculate_KL else None
    else:
        ref_kwargs = {k: v for k, v in model_kwargs.items() if k != "output_router_logits"}
        with torch.no_grad(), trl_kto.disable_gradient_checkpointing(self.model,
                                                                     self.args.gradient_checkpointing_kwargs):
            if trl_kto.is_peft_model(self.model) and self.ref_model is None:
                unwrapped = self.accelerator.unwrap_model(self.model)
                with trl_kto.use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                    ref_kl_logps = self._compute_kl_logps(self.model, batch)
                    ref_outputs = self.model(**ref_kwargs, labels=completion_labels, fused_lm_head=True)
            else:
                ref_kl_logps = self._compute_kl_logps(self.ref_model, batch)
                ref_outputs = self.ref_model(**ref_kwargs, labels=completion_labels, fused_lm_head=True)
        ref_logps = ref_outputs.log_probs[:, -seq_len:].sum(-1)

    kw = dict(loss_type=self.loss_type, beta=self.beta, desirable_weight=self.desirable_weight,
              undesirable_weight=self.undesirable_weight)
    kl_args = ()
    if self.loss_type == "kto":
        if self.calculate_KL:  # TRL's reference point: the processes' mean KL estimates, averaged, >= 0
            point = (kl_logps - ref_kl_logps).mean().detach()
            point = self.accelerator.gather_for_metrics(point).mean().reshape(1)
        else:
            point = logps.new_zeros((0,)).detach()  # no KL completions: kl = 0
        kl_args = (point, torch.zeros_like(point))
    if head is not None:
        shifted = completion_labels[:, 1:].to(head["hidden"].device)
        valid = shifted != -100
        loss, metrics = rlkern.linear_kto_loss(
            _hidden_grid(head["hidden"], valid), head["weight"], shifted, valid, ref_logps.detach(),
            bool_labels.to(shifted.device), *(t.to(shifted.device) for t in kl_args), bias=head["bias"],
            temperature=head["temperature"], logit_scale=head["logit_scale"], logit_softcap=head["softcap"] or None,
            logits_dtype=head["logits_dtype"], **_lora_kwargs(head, valid), **kw)
        _count("KTOTrainer._compute_loss[fused]")
    else:
        loss, metrics = rlkern.kto_loss(logps, ref_logps, bool_labels, *kl_args, **kw)
    _count("KTOTrainer._compute_loss")

    self._metrics[mode]["kl"].append(metrics["kl"].item())
    gather = self.accelerator.gather_for_metrics
    entropy = outputs.entropy[:, -seq_len:].detach()
    shift_completion_mask = batch["completion_mask"][:, 1:]
    entropy_sum = gather((entropy * shift_completion_mask).sum()).sum()
    tokens = gather(shift_completion_mask.sum()).sum()
    self._metrics[mode]["entropy"].append((entropy_sum / tokens).item() if tokens > 0 else 0.0)
    if mode == "train":
        self._total_train_tokens += gather(batch["attention_mask"].sum()).sum().item() // self._tp_size
    self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
    mean_logits = outputs.mean_logits[:, -seq_len:]
    token_mask = shift_completion_mask.bool()
    for name, rows in (("chosen", bool_labels), ("rejected", ~bool_labels)):
        mask = token_mask & rows[:, None]
        total, count = gather(mean_logits[mask].sum()).sum().item(), gather(mask.sum()).sum().item()
        if count > 0:
            self._metrics[mode][f"logits/{name}"].append(total / count)
    all_chosen, all_rejected = gather(num_chosen).sum().item(), gather(num_rejected).sum().item()
    # rlkern's group means times the local group sizes: the sums TRL gathers
    for name, local, total in (("chosen", num_chosen, all_chosen), ("rejected", num_rejected, all_rejected)):
        if total > 0:
            for key in (f"rewards/{name}", f"logps/{name}"):
                self._metrics[mode][key].append(gather(metrics[key] * local).sum().item() / total)
    if all_chosen > 0 and all_rejected > 0:
        self._metrics[mode]["rewards/margins"].append(
            self._metrics[mode]["rewards/chosen"][-1] - self._metrics[mode]["rewards/rejected"][-1])
    if self.aux_loss_enabled:
        loss = loss + self.router_aux_loss_coef * outputs.aux_loss
        self._metrics[mode]["aux_loss"].append(gather(outputs.aux_loss).mean().item())
    return loss


def loss_overrides(fused: bool = False) -> list[tuple[object, str, object]]:
    """``(owner class, attribute name, replacement)`` for each trainer whose loss rlkern computes
    (``fused``: GRPO's, DPO's and KTO's through rlkern.linear_policy_loss /
    linear_preference_loss / linear_kto_loss)."""
    grpo, rloo, dpo, kto = _trl()
    _save_originals()
    return [(grpo, "_compute_loss", grpo_fused_compute_loss if fused else grpo_compute_loss),
            (rloo, "_compute_loss", rloo_compute_loss),
            (dpo, "_compute_loss", dpo_fused_compute_loss if fused else dpo_compute_loss),
            (kto, "_compute_loss", kto_fused_compute_loss if fused else kto_compute_loss)]


try:  # TRL's own methods, saved at import: a patch applied later cannot hide them from the fallback
    _save_originals()
except ImportError:  # TRL not installed: loss_overrides() raises then
    pass
