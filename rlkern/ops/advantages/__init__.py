"""Advantage estimators: GAE/EGAE, discounted returns, whitening, GRPO-family group normalization.

The package, by estimator group:

    returns.py         token-level scans: ``gae``, ``egae``, ``discounted_returns``,
                       ``reinforce_pp``, ``remax``, ``masked_whiten``
    outcome.py         one score per sample, grouped: ``group_normalize``, ``grpo``, ``rloo``,
                       ``opo``, ``gpg``, ``reinforce_pp_baseline``, ``grpo_passk``, ``bnpo``,
                       ``gdpo``, ``gigpo_step_groups``, ``outcome_to_tokens``
    token_baseline.py  ``optimal_token_baseline``
    groups.py          group ids -> dense group numbers (``group_index``)
    fallback.py        the PyTorch backend (no C++ build, GPU ops without a Triton kernel)

Layouts: padded ``[B, T]`` with a response mask (bool, int or float; read as ``mask != 0``),
or packed ``[total]`` with ``cu_seqlens`` (int32 or int64, ``[B + 1]``). Outcome estimators
take one score per sample and group ids; with a ``response_mask`` they return the per-token
broadcast ``score * mask`` (verl's layout): ``[N, T]``, or packed ``[total]`` when
``cu_seqlens`` is given (sample i owns ``mask[cu[i]:cu[i + 1]]``); without it one value per
sample. Group ids are an int tensor, a numpy array or a list of str or int (groups.py).

On CPU every op runs a C++ kernel (csrc/advantages.cpp): ``group_normalize``/``grpo`` compute
the group statistics, the normalization and the broadcast to tokens in one pass (``rloo``,
``opo``, ``gpg`` and ``reinforce_pp_baseline``'s group baseline likewise), and
``optimal_token_baseline`` runs one task per group with float64 sums.

verl 0.9.1 ``ADV_ESTIMATOR_REGISTRY`` -> rlkern (drop-ins with verl's signatures are in
``rlkern.algos.advantages.VERL_ADV_ESTIMATORS``):

| verl name                      | verl function                                    | rlkern op |
|--------------------------------|--------------------------------------------------|-----------|
| ``gae``                        | ``compute_gae_advantage_return``                 | ``gae(..., whiten=True)`` |
| ``grpo``                       | ``compute_grpo_outcome_advantage``               | ``grpo`` (= ``group_normalize`` verl defaults) |
| ``grpo_vectorized``            | ``compute_grpo_vectorized_outcome_advantage``    | ``grpo`` (same numbers) |
| ``grpo_passk``                 | ``compute_grpo_passk_outcome_advantage``         | ``grpo_passk`` |
| ``rloo``                       | ``compute_rloo_outcome_advantage``               | ``rloo(singleton="raw")`` |
| ``rloo_vectorized``            | ``compute_rloo_vectorized_outcome_advantage``    | ``rloo(singleton="zero")`` |
| ``reinforce_plus_plus``        | ``compute_reinforce_plus_plus_outcome_advantage``| ``reinforce_pp`` (``discounted_returns`` + whiten) |
| ``reinforce_plus_plus_baseline``| ``compute_reinforce_plus_plus_baseline_outcome_advantage`` | ``reinforce_pp_baseline`` |
| ``remax``                      | ``compute_remax_outcome_advantage``              | ``remax`` |
| ``opo``                        | ``compute_opo_outcome_advantage``                | ``opo`` |
| ``gpg``                        | ``compute_gpg_outcome_advantage``                | ``gpg`` |
| ``gdpo``                       | ``compute_gdpo_outcome_advantage``               | ``gdpo`` |
| ``optimal_token_baseline``     | ``compute_optimal_token_baseline_advantage``     | ``optimal_token_baseline`` |
| ``tir_optimal_token_baseline`` | ``compute_multi_turn_optimal_token_baseline_advantage`` | ``optimal_token_baseline(..., multi_turn=True)`` |

Beyond verl: ``egae`` (T-PPO), ``bnpo`` (BNPO), ``gigpo_step_groups`` (GiGPO), TRL's
``scale_rewards`` and unscorable completions (``skip_nan``) through ``group_normalize``
(TRL's whole advantage block, both ``multi_objective_aggregation`` modes:
``rlkern.algos.advantages.trl_grpo_advantages``), ``outcome_to_tokens``, ``group_index``.

Where rlkern deliberately differs from verl (documented per op): ``gae`` writes 0 at masked
positions (verl leaves the carried value there, which nothing reads); ``grpo_passk`` honours
its ``norm_by_std`` argument (verl reads it from ``config`` only); ``gpg`` has no ``alpha``
argument (verl ignores its own and uses N / #nonzero scores); a group of equal scores gets
advantage exactly 0 (verl's float32 mean can differ from the scores in the last bit, and that
rounding divided by std + eps = 1e-6 gives |advantages| up to about 0.1 there); a fractional
mask weight is read as "valid" by the token-level estimators (verl's GAE and whitening weight
by the mask's value; 0/1 masks give the same numbers).

Accumulation is float64 on CPU kernels and in every group statistic; outputs are float32
(float64 for float64 input). No op syncs with the host on GPU tensors; the checks that need
values (``masked_whiten`` with < 2 valid tokens, ``grpo_passk`` with a group of one) raise on
CPU and give 0 / NaN on GPU (``RLKERN_VALIDATE=1`` raises there too).
"""

from rlkern.ops.advantages.groups import group_index
from rlkern.ops.advantages.outcome import (
    bnpo,
    gdpo,
    gigpo_step_groups,
    gpg,
    group_normalize,
    grpo,
    grpo_passk,
    opo,
    outcome_to_tokens,
    reinforce_pp_baseline,
    rloo,
)
from rlkern.ops.advantages.returns import discounted_returns, egae, gae, masked_whiten, reinforce_pp, remax
from rlkern.ops.advantages.token_baseline import optimal_token_baseline

__all__ = [
    "bnpo",
    "discounted_returns",
    "egae",
    "gae",
    "gdpo",
    "gigpo_step_groups",
    "gpg",
    "group_index",
    "group_normalize",
    "grpo",
    "grpo_passk",
    "masked_whiten",
    "opo",
    "optimal_token_baseline",
    "outcome_to_tokens",
    "reinforce_pp",
    "reinforce_pp_baseline",
    "remax",
    "rloo",
]
