"""rlkern: fused kernels for the hot path of LLM reinforcement learning and preference optimization.

Every op takes the tensors a trainer already has and returns the numbers the trainer's own
code would compute, in float32, through Triton/CUDA kernels on GPU and C++ kernels on CPU.
"""

from rlkern import _checkout  # noqa: F401  (first: in a source checkout, maps kernels/ and benches/)
from rlkern import _backend  # noqa: F401  (loads rlkern._C once, warns once if it is missing)
from rlkern import trees
from rlkern.ops.advantages import (
    bnpo,
    discounted_returns,
    egae,
    gae,
    gdpo,
    gigpo_step_groups,
    gpg,
    group_index,
    group_normalize,
    grpo,
    grpo_passk,
    masked_whiten,
    opo,
    optimal_token_baseline,
    outcome_to_tokens,
    reinforce_pp,
    reinforce_pp_baseline,
    remax,
    rloo,
)
from rlkern.ops.linear_logprobs import linear_token_logprobs
from rlkern.ops.logprobs import (
    entropy_from_logits,
    selective_log_softmax,
    selective_log_softmax_and_entropy,
    token_logprobs,
)
from rlkern.ops.policy_loss import aggregate, kl_penalty, policy_loss, value_loss
from rlkern.trees import (
    broadcast_to_tokens,
    segment_advantages,
    spo_cutpoints,
    tree_advantages,
    tree_values,
)

__version__ = "0.1.0"

__all__ = [
    # log-probs
    "entropy_from_logits",
    "linear_token_logprobs",
    "selective_log_softmax",
    "selective_log_softmax_and_entropy",
    "token_logprobs",
    # policy losses
    "aggregate",
    "kl_penalty",
    "policy_loss",
    "value_loss",
    # advantages
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
    # trees
    "broadcast_to_tokens",
    "segment_advantages",
    "spo_cutpoints",
    "tree_advantages",
    "tree_values",
    "trees",
]
