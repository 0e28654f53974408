"""DAPO's dynamic-sampling filter as a mask op: ``dynamic_sampling_mask``.

DAPO (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale",
arXiv:2503.14476, Eq. 11's constraint ``0 < |{o_i | is_equivalent(a, o_i)}| < G``) over-samples and
drops every prompt whose G outputs are all correct or all wrong: their group-normalized
advantages are all 0, so they only dilute the batch. verl 0.9.1 drops a group when
``len(values) > 1 and np.std(values) == 0.0`` (``trainer/ppo/v1/replay_buffer.py``,
``filter_groups.metric``); this op returns that decision as a mask, so a trainer can either
drop the rows (``scores[keep]``) or zero their loss (``response_mask`` times the mask) without
a host sync.

Backends: C++ (csrc/dynamic_sampling.cpp), Triton (kernels/dynamic_sampling.py), the
vectorized PyTorch version below; the oracle is rlkern/reference/dynamic_sampling.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlkern import _backend
from rlkern.ops._layout import int32_offsets
from rlkern.ops.advantages.outcome import _outcome_args, broadcast


def _torch_dynamic_sampling_mask(scores: Tensor, inverse: Tensor) -> Tensor:
    """The PyTorch backend: first member of each group as its representative, scatter-max of
    "differs" (NaN differs from everything, itself included)."""
    n = scores.shape[0]
    x = scores.to(torch.float64)
    positions = torch.arange(n, device=scores.device)
    first = torch.full((n,), n, dtype=torch.int64, device=scores.device).scatter_reduce(0, inverse, positions, "amin")
    rep = x[first.clamp_max(max(n - 1, 0))[inverse]] if n else x
    count = torch.zeros(n, dtype=torch.int64, device=scores.device).index_add_(0, inverse, torch.ones_like(inverse))
    differs = ((x != rep) | torch.isnan(x)).to(torch.int64)
    varies = torch.zeros(n, dtype=torch.int64, device=scores.device).scatter_reduce(0, inverse, differs, "amax")
    return (count[inverse] <= 1) | (varies[inverse] > 0)


_KERNELS = _backend.Kernels("dynamic_sampling_mask", cpp="cpp_dynamic_sampling_mask",
                            triton="dynamic_sampling.dynamic_sampling_mask", torch=_torch_dynamic_sampling_mask,
                            fp64=("cpp", "triton"))


@torch.library.custom_op("rlkern::dynamic_sampling_mask", mutates_args=())
def _mask_op(scores: Tensor, inverse: Tensor) -> Tensor:
    return _KERNELS.pick(scores)(scores, inverse)


@_mask_op.register_fake
def _(scores, inverse):
    return scores.new_empty(scores.shape, dtype=torch.bool)


def dynamic_sampling_mask(scores: Tensor, group_ids, response_mask: Tensor | None = None, *,
                          cu_seqlens: Tensor | None = None) -> Tensor:
    """DAPO's dynamic-sampling filter: which samples belong to a group with a learning signal.

        keep_i = not (|g(i)| > 1 and every score of g(i) equals every other and none is NaN)

    Equality is exact (verl's ``np.std(values) == 0.0``; verl's float mean can leave a tiny
    nonzero std for equal non-dyadic scores such as three 0.1's and then keeps the group, rlkern
    drops it: rlkern's group ops give such a group advantage exactly 0). A group of one is kept
    (verl keeps it; its GRPO advantage is not 0 there), and so is a group holding a NaN score
    (np.std is NaN, not 0).

    Args:
        scores: ``[N]`` float, one outcome score per sample (DAPO: the accuracy reward; verl's
            ``filter_groups.metric``).
        group_ids: ``[N]`` group of each sample (the prompt uid), any form ``group_index`` takes.
        response_mask: optional ``[N, T]`` (or packed ``[total]`` with ``cu_seqlens``): then the
            result is ``(response_mask != 0) & keep`` per token.
        cu_seqlens: int32/int64 ``[N + 1]`` offsets of the packed mask.

    Returns:
        ``[N]`` bool keep mask, or response_mask's shape bool with ``response_mask``.
    """
    inverse = _outcome_args("dynamic_sampling_mask", scores, group_ids, response_mask, cu_seqlens)
    keep = _mask_op(scores, inverse)
    if response_mask is None:
        return keep
    weights = keep.to(torch.float64 if scores.dtype == torch.float64 else torch.float32)
    return broadcast(weights, response_mask, int32_offsets(cu_seqlens)) != 0
