"""verl 0.9.1 advantage estimators with verl's own signatures, and TRL 1.16's GRPO advantage,
computed by rlkern ops.

``VERL_ADV_ESTIMATORS[name]`` takes the arguments verl's ``ADV_ESTIMATOR_REGISTRY[name]``
takes and returns ``(advantages, returns)`` with verl's numbers on every valid token (the
mapping of names to ops is the table in ``rlkern.ops.advantages``). Differences, all at
positions no loss reads: ``gae`` writes 0 at masked positions where verl leaves carried values.
Outcome estimators sum ``token_level_rewards`` over tokens to one score per sample, as verl.

``trl_grpo_advantages`` is the advantage block of TRL's
``GRPOTrainer._generate_and_score_completions`` (both ``multi_objective_aggregation`` modes,
every ``scale_rewards``, unscorable completions) as one function.
"""

from __future__ import annotations

import numpy as np
import torch

from rlkern.algos._config import config_get as _cfg
from rlkern.ops import advantages as ops


def compute_gae_advantage_return(token_level_rewards, values, response_mask, gamma, lam):
    return ops.gae(token_level_rewards, values, response_mask, gamma=float(gamma), lam=float(lam), whiten=True)


def compute_grpo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6,
                                   norm_adv_by_std_in_grpo=True, config=None, **kwargs):
    adv = ops.grpo(token_level_rewards.sum(-1), index, response_mask, eps=epsilon, norm_by_std=norm_adv_by_std_in_grpo)
    return adv, adv


def compute_gdpo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6,
                                   norm_adv_by_std_in_grpo=True, config=None, non_tensor_batch=None, batch=None,
                                   **kwargs):
    weights = None
    if config is not None and non_tensor_batch is not None and batch is not None:
        keys = _cfg(config, "gdpo_reward_keys", None)
        if not keys:
            raise ValueError("gdpo: config.gdpo_reward_keys must list the reward components")
        scores = torch.stack([torch.as_tensor(np.asarray(non_tensor_batch[k], dtype=np.float32),
                                              device=token_level_rewards.device) for k in keys], dim=1)
        weights = _cfg(config, "gdpo_reward_weights", None)
    else:
        scores = token_level_rewards.sum(-1)
    adv = ops.gdpo(scores, index, response_mask, weights=weights, eps=epsilon, norm_by_std=norm_adv_by_std_in_grpo)
    return adv, adv


def compute_grpo_passk_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6,
                                         norm_adv_by_std_in_grpo=True, config=None, **kwargs):
    norm = _cfg(config, "norm_adv_by_std_in_grpo", True) if config is not None else norm_adv_by_std_in_grpo
    adv = ops.grpo_passk(token_level_rewards.sum(-1), index, response_mask, eps=epsilon, norm_by_std=norm)
    return adv, adv


def compute_reinforce_plus_plus_baseline_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6,
                                                           config=None, **kwargs):
    adv = ops.reinforce_pp_baseline(token_level_rewards.sum(-1), index, response_mask)
    return adv, adv


def compute_rloo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6, config=None, **kwargs):
    adv = ops.rloo(token_level_rewards.sum(-1), index, response_mask, singleton="raw")
    return adv, adv


def compute_rloo_vectorized_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6, config=None,
                                              **kwargs):
    adv = ops.rloo(token_level_rewards.sum(-1), index, response_mask, singleton="zero")
    return adv, adv


def compute_opo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6, config=None, **kwargs):
    adv = ops.opo(token_level_rewards.sum(-1), index, response_mask)
    return adv, adv


def compute_reinforce_plus_plus_outcome_advantage(token_level_rewards, response_mask, config=None, **kwargs):
    if config is None:
        raise ValueError("reinforce_plus_plus: config (with gamma) is required, as in verl")
    return ops.reinforce_pp(token_level_rewards, response_mask, gamma=float(_cfg(config, "gamma", 1.0)))


def compute_remax_outcome_advantage(token_level_rewards, reward_baselines, response_mask, config=None, **kwargs):
    return ops.remax(token_level_rewards, reward_baselines, response_mask)


def compute_gpg_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6, f_norm=1.0, alpha=1.0,
                                  config=None, **kwargs):
    adv = ops.gpg(token_level_rewards.sum(-1), index, response_mask, f_norm=f_norm)
    return adv, adv


def compute_optimal_token_baseline_advantage(token_level_rewards, response_mask, index, old_log_probs,
                                             sum_pi_squared, rollout_is_weights=None, handle_zero_tail=True,
                                             epsilon=1e-8, **kwargs):
    return ops.optimal_token_baseline(token_level_rewards, index, response_mask, old_log_probs, sum_pi_squared,
                                      rollout_is_weights, handle_zero_tail=handle_zero_tail, eps=epsilon)


def compute_multi_turn_optimal_token_baseline_advantage(token_level_rewards, response_mask, index, old_log_probs,
                                                        sum_pi_squared, rollout_is_weights=None,
                                                        handle_zero_tail=True, epsilon=1e-8, **kwargs):
    return ops.optimal_token_baseline(token_level_rewards, index, response_mask, old_log_probs, sum_pi_squared,
                                      rollout_is_weights, handle_zero_tail=handle_zero_tail, eps=epsilon,
                                      multi_turn=True)


VERL_ADV_ESTIMATORS = {
    "gae": compute_gae_advantage_return,
    "grpo": compute_grpo_outcome_advantage,
    "grpo_vectorized": compute_grpo_outcome_advantage,
    "gdpo": compute_gdpo_outcome_advantage,
    "grpo_passk": compute_grpo_passk_outcome_advantage,
    "reinforce_plus_plus_baseline": compute_reinforce_plus_plus_baseline_outcome_advantage,
    "rloo": compute_rloo_outcome_advantage,
    "rloo_vectorized": compute_rloo_vectorized_outcome_advantage,
    "opo": compute_opo_outcome_advantage,
    "reinforce_plus_plus": compute_reinforce_plus_plus_outcome_advantage,
    "remax": compute_remax_outcome_advantage,
    "gpg": compute_gpg_outcome_advantage,
    "optimal_token_baseline": compute_optimal_token_baseline_advantage,
    "tir_optimal_token_baseline": compute_multi_turn_optimal_token_baseline_advantage,
}


# ---------------------------------------------------------------------------------------------
# TRL 1.16


def trl_grpo_advantages(rewards_per_func: torch.Tensor, num_generations: int, reward_weights=None, *,
                        scale_rewards: str = "group",
                        multi_objective_aggregation: str = "sum_then_normalize") -> torch.Tensor:
    """TRL's GRPO advantages from the per-function rewards of the gathered batch.

    Groups are ``num_generations`` consecutive rows, as TRL lays them out. A NaN reward (the
    function returned None) is left out by TRL's nan-aware sums; a row whose every function
    returned None is unscorable: it counts in no mean or std and its advantage is 0.

    - "sum_then_normalize" (TRL's default): r = nansum_k(w_k r_k), then
      ``group_normalize(r, eps=1e-4, scale=scale_rewards, singleton="zero", skip_nan=True)``.
    - "normalize_then_sum": each function normalized in its group (std + 1e-4), weighted nansum,
      then the sum normalized over the batch (mean and std of all scored rows, + 1e-4).

    Args:
        rewards_per_func: ``[N, K]`` float, N a multiple of ``num_generations``.
        num_generations: TRL's ``num_generations`` (``num_generations_eval`` in eval).
        reward_weights: ``[K]`` (TRL's ``reward_weights``); None means 1 each.
        scale_rewards: "group" (TRL's default), "batch" or "none".

    Returns:
        ``[N]`` float32 advantages (float64 for float64 rewards).
    """
    op = "trl_grpo_advantages"
    if not isinstance(rewards_per_func, torch.Tensor) or rewards_per_func.ndim != 2:
        raise ValueError(f"{op}: rewards_per_func must be a [N, K] tensor, got "
                         f"{getattr(rewards_per_func, 'shape', type(rewards_per_func).__name__)}")
    n, k = rewards_per_func.shape
    if not isinstance(num_generations, int) or num_generations < 1 or n % num_generations:
        raise ValueError(f"{op}: num_generations must be a positive int dividing N={n}, got {num_generations!r}")
    if scale_rewards not in ("group", "batch", "none"):
        raise ValueError(f"{op}: scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    weights = torch.ones(k, dtype=rewards_per_func.dtype, device=rewards_per_func.device) if reward_weights is None \
        else torch.as_tensor(reward_weights, dtype=rewards_per_func.dtype, device=rewards_per_func.device)
    if weights.shape != (k,):
        raise ValueError(f"{op}: reward_weights must have shape ({k},), got {tuple(weights.shape)}")
    ids = torch.arange(n, device=rewards_per_func.device) // num_generations
    unscorable = rewards_per_func.isnan().all(dim=1)
    trl = dict(eps=1e-4, singleton="zero", skip_nan=True)
    if multi_objective_aggregation == "sum_then_normalize":
        rewards = (rewards_per_func * weights).nansum(dim=1).masked_fill(unscorable, float("nan"))
        return ops.group_normalize(rewards, ids, scale=scale_rewards, **trl)
    if multi_objective_aggregation == "normalize_then_sum":
        per_func = torch.stack([ops.group_normalize(rewards_per_func[:, j].contiguous(), ids, **trl)
                                for j in range(k)], dim=1)
        rewards = (per_func * weights.to(per_func.dtype)).sum(dim=1).masked_fill(unscorable, float("nan"))
        return ops.group_normalize(rewards, torch.zeros_like(ids), **trl)
    raise ValueError(f"{op}: multi_objective_aggregation must be 'sum_then_normalize' or 'normalize_then_sum', "
                     f"got {multi_objective_aggregation!r}")
