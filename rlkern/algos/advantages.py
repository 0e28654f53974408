"""verl 0.9.1 advantage estimators with verl's own signatures, computed by rlkern ops.

``VERL_ADV_ESTIMATORS[name]`` takes the arguments verl's ``ADV_ESTIMATOR_REGISTRY[name]``
takes and returns ``(advantages, returns)`` with verl's numbers on every valid token (the
mapping of names to ops is the table in ``rlkern.ops.advantages``). Differences, all at
positions no loss reads: ``gae`` writes 0 at masked positions where verl leaves carried values.
Outcome estimators sum ``token_level_rewards`` over tokens to one score per sample, as verl.
"""

from __future__ import annotations

import numpy as np
import torch

from rlkern.ops import advantages as ops


def _cfg(config, key, default):
    if config is None:
        return default
    getter = getattr(config, "get", None)
    return getter(key, default) if getter is not None else getattr(config, key, default)


def compute_gae_advantage_return(token_level_rewards, values, response_mask, gamma, lam):
    return ops.gae(token_level_rewards, values, response_mask, float(gamma), float(lam), whiten=True)


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
    return ops.reinforce_pp(token_level_rewards, response_mask, float(_cfg(config, "gamma", 1.0)))


def compute_remax_outcome_advantage(token_level_rewards, reward_baselines, response_mask, config=None, **kwargs):
    return ops.remax(token_level_rewards, reward_baselines, response_mask)


def compute_gpg_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6, f_norm=1.0, alpha=1.0,
                                  config=None, **kwargs):
    adv = ops.gpg(token_level_rewards.sum(-1), index, response_mask, f_norm=f_norm)
    return adv, adv


def compute_optimal_token_baseline_advantage(token_level_rewards, response_mask, index, old_log_probs,
                                             sum_pi_squared, rollout_is_weights=None, handle_zero_tail=True,
                                             epsilon=1e-8, **kwargs):
    return ops.optimal_token_baseline(token_level_rewards, response_mask, index, old_log_probs, sum_pi_squared,
                                      rollout_is_weights, handle_zero_tail=handle_zero_tail, eps=epsilon)


def compute_multi_turn_optimal_token_baseline_advantage(token_level_rewards, response_mask, index, old_log_probs,
                                                        sum_pi_squared, rollout_is_weights=None,
                                                        handle_zero_tail=True, epsilon=1e-8, **kwargs):
    return ops.optimal_token_baseline(token_level_rewards, response_mask, index, old_log_probs, sum_pi_squared,
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
