"""Reward shaping: the research list's reward transforms, applied before the advantage op.

Four ops, one per concept (CONTRIBUTING.md, API conventions 2):

- ``ensemble_rewards``: K reward models' scores of each sample -> one reward (an ensemble's mean,
  worst case, uncertainty-weighted mean, or a multi-objective weighted sum).
- ``shape_rewards``: one score per sample plus a per-sample quantity (length, log-likelihood,
  exit position, tool calls, token budget) -> a shaped reward, computed within the sample's group
  (GRPO-lambda, unlikeliness reward, S-GRPO, OTC-GRPO, HBPO). The result goes into an outcome op
  (``grpo``, ``group_normalize``, ``rloo``) as its scores.
- ``hbpo_advantages``: HBPO's advantage, which no outcome op expresses (a group z-score plus the
  budget subgroup's mean reward against the budget's own reward).

- ``token_weights``: TW-GRPO's per-token loss weights from the group's token distributions.

The first two return rewards, not advantages, so they compose with every outcome op. All are
constants of the policy update (no gradient flows through them: the inputs are detached). Backends (same
arguments, same outputs): C++ (csrc/shaping.cpp, CPU), Triton (kernels/shaping.py, GPU), and the
float64 reference (rlkern/reference/shaping.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlkern import _backend
from rlkern.ops import _checks
from rlkern.ops._layout import out_dtype
from rlkern.ops.advantages.groups import dense
from rlkern.reference import shaping as reference

__all__ = ["ensemble_rewards", "shape_rewards", "hbpo_advantages", "token_weights"]

ENSEMBLE_METHODS = reference.ENSEMBLE_METHODS
SHAPE_METHODS = reference.SHAPE_METHODS
# the per-sample tensor each shape_rewards method reads
SHAPE_AUX = {"grpo_lambda": "lengths", "unlikeliness": "logprobs", "s_grpo": "exit_positions", "otc": "tool_calls",
             "hbpo": "lengths"}
_HBPO_ADVANTAGE = len(SHAPE_METHODS)  # the kernels' code of hbpo_advantages


def _torch_ensemble(rewards, weights, method, coef):
    return reference.ensemble_rewards(rewards, ENSEMBLE_METHODS[method], coef, weights).to(rewards.dtype)


def _torch_shape(scores, aux, aux2, inverse, method, p0, p1, p2, p3):
    if method == _HBPO_ADVANTAGE:
        out = reference.hbpo_advantages(scores, inverse, aux, p0, p1, p2)
    else:
        method = SHAPE_METHODS[method]
        params = {"grpo_lambda": [p0, p1, p2, p3], "unlikeliness": [p0], "s_grpo": [p0], "otc": [p0, p1],
                  "hbpo": [p0, p1, p2]}[method]
        out = reference.shape_rewards(scores, inverse, aux, method, params, aux2)
    return out.to(scores.dtype).to(scores.device)


_ENSEMBLE = _backend.Kernels("ensemble_rewards", cpp="cpp_ensemble_rewards", triton="shaping.ensemble_rewards",
                             torch=_torch_ensemble, fp64=("cpp", "triton"))
_SHAPE = _backend.Kernels("shape_rewards", cpp="cpp_shape_rewards", triton="shaping.shape_rewards",
                          torch=_torch_shape, fp64=("cpp", "triton"))


@torch.library.custom_op("rlkern::ensemble_rewards", mutates_args=())
def _ensemble_op(rewards: Tensor, weights: Tensor | None, method: int, coef: float) -> Tensor:
    # rewards [B, K] contiguous fp32/fp64; weights [K] rewards' dtype (method "weighted")
    return _ENSEMBLE.pick(rewards)(rewards, weights, method, coef)


@_ensemble_op.register_fake
def _(rewards, weights, method, coef):
    return rewards.new_empty(rewards.shape[:1])


@torch.library.custom_op("rlkern::shape_rewards", mutates_args=())
def _shape_op(scores: Tensor, aux: Tensor, aux2: Tensor | None, inverse: Tensor, method: int, p0: float, p1: float,
              p2: float, p3: float) -> Tensor:
    # scores, aux, aux2 [N] contiguous fp32/fp64 (same dtype; aux2: HBPO's budgets); inverse [N] int64
    # dense group numbers in [0, N); p0..p3: the method's parameters (GRPO-lambda: threshold,
    # length_coef, eps, top_fraction or -1; HBPO: max_length, budget_scale, deviation_coef or eps)
    return _SHAPE.pick(scores)(scores, aux, aux2, inverse, method, p0, p1, p2, p3)


@_shape_op.register_fake
def _(scores, aux, aux2, inverse, method, p0, p1, p2, p3):
    return torch.empty_like(scores)


def _compute(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` detached, contiguous, in the kernels' compute dtype (float32, or float64)."""
    return t.detach().to(dtype).contiguous()


def ensemble_rewards(rewards: Tensor, *, method: str = "mean", coef: float | None = None, weights=None) -> Tensor:
    """One reward from K reward models' scores of each sample.

    "Reward Model Ensembles Help Mitigate Overoptimization" (Coste et al., ICLR 2024), with
    ``r_k`` the k-th of K ensemble members' reward for the sample:

    - ``"mean"``: ``R = 1/K sum_k r_k`` (the paper's mean-ensemble baseline);
    - ``"wco"``, worst-case optimization: ``R = min_k r_k``;
    - ``"uwo"``, uncertainty-weighted optimization: ``R = 1/K sum_k r_k - coef * 1/K sum_k
      (r_k - mean)^2``, the intra-ensemble variance in its population form (divided by K, as the
      paper writes it) and ``coef`` the paper's lambda. The paper tunes lambda per setup and gives
      no one default, so ``coef`` has none: it must be passed with "uwo".
    - ``"weighted"``: ``R = sum_k weights[k] r_k``, the multi-aspect combination of
      "Optimizing Safe and Aligned Language Generation: A Multi-Objective GRPO Approach" (Li et
      al. 2025): the paper combines the reward model's K aspect scores (safety, helpfulness, ...)
      into one scalar first and runs GRPO's group normalization on that scalar, so its advantage
      is ``group_normalize(ensemble_rewards(r, method="weighted", weights=w), group_ids)``.
      Normalizing each aspect within its group before the weighted sum is GDPO (``rlkern.gdpo``).

    NaN in a row makes that row's reward NaN (for "wco" too, as ``torch.min``).

    Args:
        rewards: ``[B, K]`` float (K >= 1 models or aspects); bf16/fp16 are computed in float32.
        method: "mean", "wco", "uwo" or "weighted".
        coef: UWO's lambda (>= 0); only with method "uwo".
        weights: K finite floats (a sequence or a tensor), only with method "weighted".

    Returns:
        ``[B]`` float32 (float64 for float64 rewards), without gradient.
    """
    op = "ensemble_rewards"
    _checks.tensors(op, "rewards", {"rewards": (rewards, "float")})
    _checks.choice(op, "method", method, ENSEMBLE_METHODS)
    if rewards.ndim != 2 or rewards.shape[1] < 1:
        raise ValueError(f"{op}: rewards must be [B, K] with K >= 1 reward models, got {tuple(rewards.shape)}")
    if method == "uwo":
        if coef is None:
            raise ValueError(f"{op}: coef (UWO's lambda) must be given with method='uwo', got None")
        coef = _checks.number(op, "coef", coef, low=0.0)
    elif coef is not None:
        raise ValueError(f"{op}: coef is UWO's lambda and is only read with method='uwo', got {coef!r} with {method!r}")
    dtype = out_dtype(rewards)
    w = None
    if method == "weighted":
        if weights is None:
            raise ValueError(f"{op}: weights (K floats) must be given with method='weighted', got None")
        values = weights.detach().cpu().tolist() if isinstance(weights, Tensor) else weights
        if not isinstance(values, (list, tuple)) or len(values) != rewards.shape[1]:
            raise ValueError(f"{op}: weights must have {rewards.shape[1]} entries (one per reward model), "
                             f"got {weights!r}")
        values = [_checks.number(op, "weights", v) for v in values]
        w = torch.tensor(values, dtype=dtype, device=rewards.device)
    elif weights is not None:
        raise ValueError(f"{op}: weights are only read with method='weighted', got them with {method!r}")
    return _ensemble_op(_compute(rewards, dtype), w, ENSEMBLE_METHODS.index(method), float(coef or 0.0))


def shape_rewards(
    scores: Tensor,
    group_ids,
    *,
    method: str,
    lengths: Tensor | None = None,
    logprobs: Tensor | None = None,
    exit_positions: Tensor | None = None,
    tool_calls: Tensor | None = None,
    budgets: Tensor | None = None,
    threshold: float = 0.5,
    top_fraction: float | None = None,
    length_coef: float = 0.2,
    eps: float = 1e-6,
    rank_coef: float = 0.25,
    decay: float = 0.5,
    tool_c: float = 1.0,
    tool_coef: float = 1.0,
    max_length: int = 4096,
    budget_scale: float = 4.0,
    deviation_coef: float | None = None,
) -> Tensor:
    """Group-aware reward shaping of one outcome score per sample.

    A sample is *correct* when its score is > 0 (a NaN score is not: its reward stays NaN). Each
    method reads one more per-sample tensor and leaves the rewards of incorrect samples as their
    scores, except OTC and HBPO (see there). ``g`` is the size of the sample's group.

    - ``"grpo_lambda"`` ("Stable Reinforcement Learning for Efficient Reasoning", GRPO-lambda),
      reads ``lengths`` ``[N]``: a group whose correctness ratio ``k / g`` (k correct samples) is
      ``>= threshold`` gets the length penalty, any other group keeps its 0/1 (score) reward.
      The paper's own gate is batch-wise: the top-lambda fraction of the batch's groups by
      correctness ratio get the penalty; ``top_fraction=lambda`` does that (the threshold is then
      the ratio of the ``ceil(lambda * G)``-th best of the batch's G groups, found on the device;
      groups tied with it are selected too), and replaces ``threshold``::

          r_i = s_i * (1 - length_coef * sigmoid((len_i - mean_c) / (std_c + eps)))   correct i
          r_i = s_i                                                                   otherwise

      with ``mean_c`` / ``std_c`` the mean and population std of the correct samples' lengths in
      the group. Choices: the paper gates a length penalty taken from prior work (the
      sigmoid-of-z-score penalty of Arora & Zanette, "Training Language Models to Reason
      Efficiently", which is the form above as we read the paper, their alpha =
      ``length_coef``, 0.2 one of their values); a fixed ``threshold`` has no paper value, and
      0.5 (a majority of correct samples) is our default; ``top_fraction`` has no default (the
      paper tunes lambda), so the fixed gate is the default.
    - ``"unlikeliness"`` ("Rewarding the Unlikely: Lifting GRPO Beyond Distribution
      Sharpening"), reads ``logprobs`` ``[N]`` (each sample's sequence log-likelihood under the
      policy): the correct samples of a group are ranked by likelihood, rank 0 the most likely
      (ties: the lower sample number first), and::

          r_i = s_i * (1 - rank_coef * (g - rank_i) / g)   correct i

      so the most likely correct sample loses ``rank_coef`` of its reward and rare correct ones
      keep more; ``rank_coef`` is the paper's beta_rank (0.25, its default).
    - ``"s_grpo"`` ("S-GRPO: Early Exit via Reinforcement Learning in Reasoning Models"), reads
      ``exit_positions`` ``[N]``: a group is one serial group (the answers produced by exiting one
      reasoning path at several positions); its correct answers, ordered by exit position (ties:
      sample number), get exponentially decaying rewards::

          r_i = s_i * decay ** (number of correct answers exiting before i)   correct i

      i.e. ``1 / 2^(N_right - 1)`` with the paper's ``decay = 0.5``; incorrect answers keep their
      score (0 in the paper).
    - ``"otc"`` ("OTC: Optimal Tool Calls via Reinforcement Learning", OTC-GRPO), reads
      ``tool_calls`` ``[N]`` (``m`` calls per sample, >= 0): ``n`` is the fewest calls among the
      group's correct samples (0 if none is correct), and every sample gets
      ``r_i = tool_coef * r_tool(m_i, n) * s_i`` with::

          r_tool = 1                          m = n = 0
                 = cos(m pi / (2 m + tool_c)) n = 0 < m
                 = sin(f(m, n) pi / (2 n))    n > 0,   f(m, n) = 2 n m / (m + n)

      (``f = n`` at ``m = n``: reward 1; fewer or more calls than the group's optimum earn less).
      ``tool_coef`` is the paper's alpha and ``tool_c`` its smoothing constant c; the paper's text
      does not fix c's value, so 1.0 is our default.

    - ``"hbpo"`` ("Hierarchical Budget Policy Optimization for Adaptive Reasoning", its Eq. for
      R(n_gen | b)), reads ``lengths`` (n = generated tokens) and ``budgets`` (b = the token budget
      of the sample's subgroup, from the prompt "I will answer the question within b tokens")::

          r_i = budget_scale * cos(pi n / (2 L)) - deviation_coef * |n - b|   correct, b < n <= L
              = budget_scale * cos(pi b / (2 L))                             correct, n <= b, n <= L
              = 0                                                            otherwise

      with ``L = max_length``; ``budget_scale`` (the paper's beta) 4, ``L`` 4096 and
      ``deviation_coef`` (alpha) ``1 / L`` are the values of the authors' code (their
      ``rllm/rewards/math_reward.py``: ``4 cos(pi n / 8192)``, ``1/4096``), which the paper's text
      leaves open. The advantage is ``hbpo_advantages``.

    Args:
        scores: ``[N]`` float, one outcome score per sample (0/1 correctness in the papers).
        group_ids: ``[N]`` group of each sample (see ``group_normalize``).
        method: "grpo_lambda", "unlikeliness", "s_grpo" or "otc".
        lengths, logprobs, exit_positions, tool_calls: ``[N]`` float or int, the one ``method``
            reads (finite; tool calls >= 0); bf16/fp16 scores compute in float32.
        threshold: GRPO-lambda's correctness ratio gate, in [0, 1].
        top_fraction: GRPO-lambda's lambda, in [0, 1]: gate the top fraction of the batch's
            groups instead of a fixed ``threshold``.
        length_coef: GRPO-lambda's penalty weight, in [0, 1].
        eps: added to the length std.
        rank_coef: the unlikeliness reward's beta_rank, in [0, 1].
        decay: S-GRPO's decay, in (0, 1].
        tool_c: OTC's c, > 0.
        tool_coef: OTC's alpha.
        budgets: ``[N]`` float or int, HBPO's budget of each sample (with ``lengths``).
        max_length: HBPO's L_max (an int >= 1).
        budget_scale: HBPO's beta.
        deviation_coef: HBPO's alpha (>= 0); None is ``1 / max_length``.

    Returns:
        ``[N]`` float32 (float64 for float64 scores), without gradient.
    """
    op = "shape_rewards"
    _checks.choice(op, "method", method, SHAPE_METHODS)
    given = {"lengths": lengths, "logprobs": logprobs, "exit_positions": exit_positions, "tool_calls": tool_calls,
             "budgets": budgets}
    wanted = [SHAPE_AUX[method]] + (["budgets"] if method == "hbpo" else [])
    for name, value in given.items():
        if name not in wanted and value is not None:
            raise ValueError(f"{op}: method={method!r} reads {' and '.join(wanted)}, not {name}")
    _checks.tensors(op, "scores", {"scores": (scores, "float")})
    if scores.ndim != 1:
        raise ValueError(f"{op}: scores must be [N] (one score per sample), got {tuple(scores.shape)}")
    for name in wanted:
        _per_sample(op, name, given[name], scores)
    aux, aux2 = given[wanted[0]], given.get("budgets") if method == "hbpo" else None
    wanted = wanted[0]
    if top_fraction is not None and method != "grpo_lambda":
        raise ValueError(f"{op}: top_fraction is GRPO-lambda's and is only read with method='grpo_lambda', "
                         f"got {top_fraction!r} with {method!r}")
    if method == "grpo_lambda":
        params = (_checks.number(op, "threshold", threshold, low=0.0, high=1.0),
                  _checks.number(op, "length_coef", length_coef, low=0.0, high=1.0),
                  _checks.number(op, "eps", eps, low=0.0),
                  -1.0 if top_fraction is None else _checks.number(op, "top_fraction", top_fraction, low=0.0,
                                                                   high=1.0))
    elif method == "unlikeliness":
        params = (_checks.number(op, "rank_coef", rank_coef, low=0.0, high=1.0), 0.0, 0.0, 0.0)
    elif method == "s_grpo":
        params = (_checks.number(op, "decay", decay, low=0.0, high=1.0, low_open=True), 0.0, 0.0, 0.0)
    elif method == "hbpo":
        length = _checks.number(op, "max_length", max_length, low=1, integer=True)
        params = (float(length), _checks.number(op, "budget_scale", budget_scale),
                  1.0 / length if deviation_coef is None else _checks.number(op, "deviation_coef", deviation_coef,
                                                                              low=0.0), 0.0)
    else:
        params = (_checks.number(op, "tool_c", tool_c, low=0.0, low_open=True),
                  _checks.number(op, "tool_coef", tool_coef), 0.0, 0.0)
    if _checks.host_checks(aux) and aux.numel():
        values = aux.detach().double()  # finite: the C++ kernels sort by it
        if not bool(torch.isfinite(values).all()):
            raise ValueError(f"{op}: {wanted} must be finite, got {aux.tolist() if aux.numel() <= 20 else 'a NaN/inf'}")
        if method == "otc" and bool((values < 0).any()):
            raise ValueError(f"{op}: tool_calls must be >= 0, got min {values.min().item():g}")
    if method == "hbpo" and _checks.host_checks(aux2) and aux2.numel() and not bool(torch.isfinite(aux2).all()):
        raise ValueError(f"{op}: budgets must be finite")
    inverse = dense(op, group_ids, n=scores.shape[0], device=scores.device)
    dtype = out_dtype(scores)
    return _shape_op(_compute(scores, dtype), _compute(aux, dtype), None if aux2 is None else _compute(aux2, dtype),
                     inverse, SHAPE_METHODS.index(method), *params)


def _per_sample(op: str, name: str, t, scores: Tensor) -> None:
    """``t`` is a float or int ``[N]`` tensor on scores' device."""
    if t is None:
        raise ValueError(f"{op}: {name} ([N]) must be given, got None")
    if not isinstance(t, Tensor) or not (t.dtype.is_floating_point or t.dtype in _checks.INTS):
        raise TypeError(f"{op}: {name} must be a float or int torch.Tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if tuple(t.shape) != tuple(scores.shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(scores.shape)}, got {tuple(t.shape)}")
    if t.device != scores.device:
        raise ValueError(f"{op}: {name} is on {t.device} but scores are on {scores.device}")


def hbpo_advantages(rewards: Tensor, group_ids, budgets: Tensor, *, max_length: int = 4096,
                    budget_scale: float = 4.0, eps: float = 1e-6) -> Tensor:
    """HBPO's advantage ("Hierarchical Budget Policy Optimization for Adaptive Reasoning", its
    Algorithm 1): a group (one prompt's n rollouts) is split into subgroups by budget b_i, and::

        A_ij = A_i^intra + A_ij^inter
        A_i^intra = mean(R over subgroup i) - f2(b_i),  f2(b) = budget_scale * cos(pi b / (2 L))
        A_ij^inter = (R_ij - mean(R over the group)) / (std(R over the group) + eps)

    ``R`` is ``shape_rewards(..., method="hbpo")``. Choices the paper leaves open: std is the
    unbiased one and ``eps`` 1e-6 (verl's GRPO, which the authors' code extends); a group of one
    gets ``R / (1 + eps)`` (verl's mean 0, std 1) and no subgroup term. The authors' code
    (``verl/trainer/ppo/core_algos.py``) adds A^intra a second time; we follow the paper's single
    sum. ``max_length`` and ``budget_scale`` as in ``shape_rewards``.

    Args:
        rewards: ``[N]`` float, HBPO's rewards.
        group_ids: ``[N]`` prompt of each sample (see ``group_normalize``).
        budgets: ``[N]`` float or int, each sample's budget (equal budgets form a subgroup).

    Returns:
        ``[N]`` float32 (float64 for float64 rewards), without gradient; broadcast to tokens with
        ``outcome_to_tokens``.
    """
    op = "hbpo_advantages"
    _checks.tensors(op, "rewards", {"rewards": (rewards, "float")})
    if rewards.ndim != 1:
        raise ValueError(f"{op}: rewards must be [N] (one reward per sample), got {tuple(rewards.shape)}")
    _per_sample(op, "budgets", budgets, rewards)
    if _checks.host_checks(budgets) and budgets.numel() and not bool(torch.isfinite(budgets).all()):
        raise ValueError(f"{op}: budgets must be finite")
    length = _checks.number(op, "max_length", max_length, low=1, integer=True)
    scale = _checks.number(op, "budget_scale", budget_scale)
    eps = _checks.number(op, "eps", eps, low=0.0)
    inverse = dense(op, group_ids, n=rewards.shape[0], device=rewards.device)
    dtype = out_dtype(rewards)
    return _shape_op(_compute(rewards, dtype), _compute(budgets, dtype), None, inverse, _HBPO_ADVANTAGE,
                     float(length), scale, eps, 0.0)



def _torch_token_weights(logprobs, mask, inverse, max_weight):
    out = reference.token_weights(logprobs, inverse, mask, max_weight)
    return out.to(out_dtype(logprobs)).to(logprobs.device)


_TOKEN_WEIGHTS = _backend.Kernels("token_weights", cpp="cpp_token_weights", triton="shaping.token_weights",
                                  torch=_torch_token_weights, fp64=("cpp", "triton"))


@torch.library.custom_op("rlkern::token_weights", mutates_args=())
def _token_weights_op(logprobs: Tensor, mask: Tensor, inverse: Tensor, max_weight: float) -> Tensor:
    # logprobs [N, T, V] contiguous, any float; mask [N, T] bool contiguous; inverse [N] int64 in [0, N)
    return _TOKEN_WEIGHTS.pick(logprobs)(logprobs, mask, inverse, max_weight)


@_token_weights_op.register_fake
def _(logprobs, mask, inverse, max_weight):
    return logprobs.new_empty(logprobs.shape[:2], dtype=out_dtype(logprobs))


def token_weights(logprobs: Tensor, group_ids, response_mask: Tensor | None = None, *,
                  max_weight: float = 1.4) -> Tensor:
    """TW-GRPO's token weights ("Reinforcing Video Reasoning with Focused Thinking"): tokens where
    a group's completions disagree (high intra-group divergence of the token distributions) weigh
    more in the policy loss.

    With ``p_i,t`` completion i's log-probabilities over the vocabulary at position t (a masked
    position reads as the uniform ``-log V``) and ``m_t`` their mean over the G completions of
    the group, ``d = clamp(m_t - p_i,t, -11, 11)``::

        D_t = 1/G sum_i sum_v (exp(d) - d - 1)                 (divergence from the group mean)
        w_i,t = (1 + (max_weight - 1) * (D_t - min_t D) / (max_t D - min_t D + 1e-8)) * mask_i,t

    the same weights for every completion of the group; the loss is then
    ``sum(per_token_loss * w * mask) / sum(mask)`` (``policy_loss``'s ``token-mean`` of the
    weighted per-token loss). The paper states the idea (an intra-group variance / entropy
    estimate); the formula, the clamp at 11, the 1e-8, the min-max over every position of the
    padded batch (a position past every completion's end has D = 0) and ``max_weight`` 1.4
    (``alpha``; their released run uses 1.7) are those of the authors' TW-GRPO trainer
    (``compute_token_importance_kl_logs_uniform``), which we follow. A -inf log-prob makes its
    group's weights NaN there, as in theirs.

    The paper's soft multi-level reward (a multi-choice answer earns ``|P| / |A|`` when its option
    set P is a subset of the answer set A, else 0) is computed where the answer text is parsed,
    in the reward function; it needs no kernel.

    Args:
        logprobs: ``[N, T, V]`` float (log-softmax over the vocabulary; bf16/fp16/fp32/fp64, read
            in place, accumulated in fp32, float64 in double).
        group_ids: ``[N]`` group (prompt) of each completion (see ``group_normalize``).
        response_mask: ``[N, T]`` bool/int/float, or None (every position counts).
        max_weight: the weight of the most divergent position (the least gets 1).

    Returns:
        ``[N, T]`` float32 (float64 for float64 log-probs), without gradient.
    """
    op = "token_weights"
    _checks.tensors(op, "logprobs", {"logprobs": (logprobs, "float"), "response_mask": (response_mask, "mask")})
    if logprobs.ndim != 3 or logprobs.shape[2] < 1:
        raise ValueError(f"{op}: logprobs must be [N, T, V] (log-probs over a vocabulary of V >= 1), "
                         f"got {tuple(logprobs.shape)}")
    if response_mask is not None and tuple(response_mask.shape) != tuple(logprobs.shape[:2]):
        raise ValueError(f"{op}: response_mask must have shape {tuple(logprobs.shape[:2])}, "
                         f"got {tuple(response_mask.shape)}")
    # <= 0 would give some tokens a zero or negative weight (a flipped gradient)
    weight = _checks.number(op, "max_weight", max_weight, low=0, low_open=True)
    inverse = dense(op, group_ids, n=logprobs.shape[0], device=logprobs.device)
    # the weights rank positions by divergence (min / max): NaN at a valid position would drop out
    _checks.no_nan(op, "logprobs", logprobs, response_mask)
    mask = (torch.ones(logprobs.shape[:2], dtype=torch.bool, device=logprobs.device) if response_mask is None
            else (response_mask != 0).contiguous())
    lp = logprobs.detach()
    return _token_weights_op(lp if lp.is_contiguous() else lp.contiguous(), mask, inverse, weight)
