"""The algorithm registry: ``Batch`` (the tensors a trainer step holds), ``Algorithm`` (a frozen
config class and the functions that call rlkern's ops with it) and ``register`` / ``get`` /
``available``. The family modules (ppo.py, grpo.py, trees.py, preference.py, ...) register their
algorithms when imported; ``rlkern.algos.get`` imports them on first use.

Rule (issue 20): an algorithm module holds no tensor math of its own; every number comes from an
op. Where an algorithm needs math that is not an op yet, its docstring says so and the function
returns the op results it would combine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor


@dataclass(frozen=True)
class Batch:
    """The tensors of one training step; each algorithm reads the fields its docstring names.

    Token layout: padded ``[B, T]`` with ``response_mask``, or packed ``[total]`` with
    ``cu_seqlens`` ``[B + 1]`` (rlkern's ops take both).

    Fields (all optional):
        logprobs: ``[B, T]`` current policy's token log-probs (differentiable).
        old_logprobs: ``[B, T]`` behaviour policy's (rollout time).
        ref_logprobs: ``[B, T]`` reference policy's.
        entropy: ``[B, T]`` per-token entropy (for the entropy bonus).
        advantages: ``[B, T]`` or ``[B]`` (what ``advantages`` returned).
        response_mask: ``[B, T]`` bool/int/float, nonzero = a trained token.
        cu_seqlens: ``[B + 1]`` int32/int64 offsets of the packed layout.
        scores: ``[B]`` one outcome score per sample (GRPO family, DAPO filter, SPO-chain final
            reward); GiGPO: each step's episode return ``[S]``.
        step_returns: ``[S]`` GiGPO: each step's discounted return.
        group_ids: ``[B]`` group of each sample (prompt uid): int tensor, numpy array or list.
        rewards: ``[B, T]`` token-level rewards (PPO, REINFORCE++, ReMax).
        values: ``[B, T]`` critic values at rollout time.
        vpreds: ``[B, T]`` critic's current predictions (value loss).
        returns: ``[B, T]`` value targets (value loss).
        truncated: ``[B]`` bool, T-PPO: the response was cut before it finished.
        reward_baselines: ``[B]`` ReMax: the greedy rollout's score.
        anchor_keys: ``[S]`` GiGPO: anchor-state key of each step.
        parent: ``[M]`` int64 tree parent of each node (-1 for roots); node_rewards ``[M]``: leaf rewards.
        node_rewards: ``[M]`` float.
        segment_start: packed ``[total]`` bool, SPO-chain: tokens that open a segment.
        cut_values: packed ``[total]`` float, SPO-chain: MC value of the state before each start.
        chosen_logps, rejected_logps: ``[P]`` summed policy log-probs of each pair's completions.
        ref_chosen_logps, ref_rejected_logps: ``[P]`` the reference model's (constants).
        chosen_lengths, rejected_lengths: ``[P]`` completion token counts.
        seq_logps, ref_seq_logps: ``[B]`` unpaired summed log-probs (KTO, BCO; the group losses TPO-tree,
            P3O, TRPA, BRAIn with ``group_ids`` and ``scores``); SRPO: ``[B, 6]`` (``SRPO_COLUMNS``).
        old_seq_logps: ``[B]`` the sampling policy's summed log-probs (P3O, BRAIn).
        chosen_win_rates, rejected_win_rates: ``[P]`` SPPO's estimated win rates.
        sampled_logps: ``[P]`` XPO / VPO: the policy's summed log-probs of a reference / calibration sample.
        prev_ref_chosen_logps, prev_ref_rejected_logps: ``[P]`` APO (accelerated): the iterate before the reference.
        iterate_chosen_logps, iterate_rejected_logps: ``[P]`` INPO: the current iterate's.
        chosen_advantages, rejected_advantages: ``[P]`` Step-APO: the plan steps' MCTS advantages.
        gold_logps, gold_lengths: ``[P]`` Triple PO: the gold response's summed log-probs and length.
        labels: ``[B]`` bool, desirable completion (KTO, BCO).
        kl_logps, ref_kl_logps: ``[M]`` KTO's mismatched KL completions' summed log-probs.
        delta: 0-dim BCO running reward mean.
        dpo_logprobs: ``[B, T]`` RTO: a DPO-trained model's token log-probs.
        lengths: ``[B]`` response lengths (GRPO-lambda, HBPO).
        exit_positions: ``[B]`` S-GRPO: where each answer exited its reasoning path.
        tool_calls: ``[B]`` OTC: tool calls of each response.
        budgets: ``[B]`` HBPO: each sample's token budget.
        rm_scores: ``[B, K]`` K reward models' (or aspects') scores (ensembles, MO-GRPO).
        vocab_logprobs: ``[B, T, V]`` TW-GRPO: the full log-softmax at each position.
        step_ends: ``[B, T]`` Direct Advantage PO: nonzero at each reasoning step's last token.
        reward_stats: ``[3]`` float64 PPO-max: running (count, mean, M2) of the rewards.
        judges: ``[B, J]`` CGPO: nonzero = judge j passes sample i.
        baseline_rewards: ``[B]`` CGPO: the baseline response's reward (calibration).
        token_rewards: ``[2P, T]`` token rewards (TGDPO), rows [0, P) chosen, [P, 2P) rejected.
        action_types, true_action_types: ``[B]`` int UI-R1: parsed / ground-truth action type codes.
        points: ``[B, 2]`` UI-R1: the predicted click point; boxes ``[B, 4]``: the target's box (or NaN).
        boxes: ``[B, 4]`` float.
        format_ok: ``[B]`` UI-R1: the format check (0 / 1).
    """

    logprobs: Tensor | None = None
    old_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    entropy: Tensor | None = None
    advantages: Tensor | None = None
    response_mask: Tensor | None = None
    cu_seqlens: Tensor | None = None
    scores: Tensor | None = None
    group_ids: Any = None
    step_returns: Tensor | None = None
    rewards: Tensor | None = None
    values: Tensor | None = None
    vpreds: Tensor | None = None
    returns: Tensor | None = None
    truncated: Tensor | None = None
    reward_baselines: Tensor | None = None
    anchor_keys: Any = None
    parent: Tensor | None = None
    node_rewards: Tensor | None = None
    segment_start: Tensor | None = None
    cut_values: Tensor | None = None
    chosen_logps: Tensor | None = None
    rejected_logps: Tensor | None = None
    ref_chosen_logps: Tensor | None = None
    ref_rejected_logps: Tensor | None = None
    chosen_lengths: Tensor | None = None
    rejected_lengths: Tensor | None = None
    seq_logps: Tensor | None = None
    ref_seq_logps: Tensor | None = None
    labels: Tensor | None = None
    old_seq_logps: Tensor | None = None
    chosen_win_rates: Tensor | None = None
    rejected_win_rates: Tensor | None = None
    sampled_logps: Tensor | None = None
    prev_ref_chosen_logps: Tensor | None = None
    prev_ref_rejected_logps: Tensor | None = None
    iterate_chosen_logps: Tensor | None = None
    iterate_rejected_logps: Tensor | None = None
    chosen_advantages: Tensor | None = None
    rejected_advantages: Tensor | None = None
    gold_logps: Tensor | None = None
    gold_lengths: Tensor | None = None
    kl_logps: Tensor | None = None
    ref_kl_logps: Tensor | None = None
    delta: Tensor | None = None
    dpo_logprobs: Tensor | None = None
    token_rewards: Tensor | None = None
    lengths: Tensor | None = None
    exit_positions: Tensor | None = None
    tool_calls: Tensor | None = None
    budgets: Tensor | None = None
    rm_scores: Tensor | None = None
    vocab_logprobs: Tensor | None = None
    step_ends: Tensor | None = None
    reward_stats: Tensor | None = None
    judges: Tensor | None = None
    baseline_rewards: Tensor | None = None
    action_types: Tensor | None = None
    true_action_types: Tensor | None = None
    points: Tensor | None = None
    boxes: Tensor | None = None
    format_ok: Tensor | None = None

    def replace(self, **changes) -> "Batch":
        """A copy with ``changes`` (e.g. ``batch.replace(advantages=adv)``)."""
        return dataclasses.replace(self, **changes)


def need(op: str, batch: Batch, *names: str) -> None:
    """ValueError naming the first of ``names`` that ``batch`` lacks (messages start with the algorithm)."""
    for name in names:
        if getattr(batch, name) is None:
            raise ValueError(f"{op}: batch.{name} is required, got None")


@dataclass(frozen=True)
class Algorithm:
    """One registered algorithm.

    Attributes:
        name: the registry key.
        config: a frozen dataclass type; ``config()`` holds the paper's defaults (cited in its
            docstring).
        advantages: ``advantages(batch, cfg=None)`` -> the op's result, or None.
        loss: ``loss(batch, cfg=None)`` -> ``(loss, metrics)``, or None.
        paper: the paper's title (as the research list spells it where it is on the list).
        family: the module that defines it (``rlkern.algos.<family>``).
        extra: other named functions of the algorithm (``value_loss``, ``keep_mask``, ...).
    """

    name: str
    config: type
    advantages: Callable | None
    loss: Callable | None
    paper: str
    family: str
    extra: dict = dataclasses.field(default_factory=dict)


_REGISTRY: dict[str, Algorithm] = {}


def register(name: str, config: type, *, advantages: Callable | None = None, loss: Callable | None = None,
             paper: str, **extra: Callable) -> Algorithm:
    if not (dataclasses.is_dataclass(config) and config.__dataclass_params__.frozen):
        raise TypeError(f"register: {name}'s config must be a frozen dataclass, got {config!r}")
    if advantages is None and loss is None:
        raise ValueError(f"register: {name} needs advantages or loss, got neither")
    if name in _REGISTRY:
        raise ValueError(f"register: {name!r} is registered already")
    family = (advantages or loss).__module__
    algo = Algorithm(name, config, advantages, loss, paper, family, dict(extra))
    _REGISTRY[name] = algo
    return algo


def table() -> dict[str, Algorithm]:
    return _REGISTRY
