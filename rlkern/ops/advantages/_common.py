"""Argument and layout rules the advantage ops share (the ops-wide ones are rlkern/ops/_checks.py
and rlkern/ops/_layout.py)."""

from __future__ import annotations

import torch
from torch import Tensor

from rlkern.ops import _checks
from rlkern.ops._layout import segment_ids

F64 = torch.float64


def token_tensors(op: str, rewards, specs: dict, **numbers) -> None:
    """A token-level op's tensors (``{name: (tensor, kind)}`` with "rewards" first) share rewards'
    shape and device; ``numbers`` are finite floats (gamma and lam in [0, 1], eps >= 0)."""
    shape = tuple(rewards.shape) if isinstance(rewards, Tensor) else None
    _checks.tensors(op, "rewards", {"rewards": (rewards, "float"), **specs}, shape=shape)
    for name, value in numbers.items():
        # a discount or GAE lambda outside [0, 1] makes the sums grow without bound
        bounds = {"gamma": (0.0, 1.0), "lam": (0.0, 1.0), "eps": (0.0, None)}.get(name, (None, None))
        _checks.number(op, name, value, low=bounds[0], high=bounds[1])


def packed(op: str, rewards: Tensor, cu_seqlens: Tensor | None) -> int:
    """rewards ``[B, T]``, or packed ``[total]`` with ``cu_seqlens`` ``[B + 1]``. Returns B."""
    if cu_seqlens is None:
        if rewards.ndim != 2:
            raise ValueError(f"{op}: rewards must be [B, T] (or [total] with cu_seqlens), got {tuple(rewards.shape)}")
        return rewards.shape[0]
    if rewards.ndim != 1:
        raise ValueError(f"{op}: with cu_seqlens, rewards must be packed [total], got {tuple(rewards.shape)}")
    return _checks.cu_seqlens(op, cu_seqlens, rewards.numel(), rewards.device, "rewards")


def token_layout(op: str, n: int, response_mask: Tensor | None, cu_seqlens: Tensor | None) -> None:
    """An outcome op's token layout: response_mask ``[N, T]``, or packed ``[total]`` with
    cu_seqlens ``[N + 1]``."""
    if cu_seqlens is None:
        if response_mask is not None and (response_mask.ndim != 2 or response_mask.shape[0] != n):
            raise ValueError(f"{op}: response_mask must be [{n}, T] (or packed [total] with cu_seqlens), "
                             f"got {tuple(response_mask.shape)}")
        return
    if response_mask is None:
        raise ValueError(f"{op}: cu_seqlens needs the packed response_mask [total], got response_mask=None")
    if response_mask.ndim != 1:
        raise ValueError(f"{op}: with cu_seqlens, response_mask must be packed [total], got "
                         f"{tuple(response_mask.shape)}")
    batch = _checks.cu_seqlens(op, cu_seqlens, response_mask.shape[0], response_mask.device, "response_mask")
    if batch != n:
        raise ValueError(f"{op}: cu_seqlens must be [{n + 1}] (one segment per sample), got {tuple(cu_seqlens.shape)}")


def require(op: str, name: str, value, why: str) -> None:
    if value is None:
        raise ValueError(f"{op}: {name} is required ({why}), got None")


def lengths(response_mask: Tensor, cu_seqlens: Tensor | None) -> Tensor:
    """Per-sequence sum of the mask (verl's ``response_mask.sum(-1)``), float64 ``[B]``."""
    if cu_seqlens is None:
        return ((response_mask != 0).sum(-1) if response_mask.dtype == torch.bool else response_mask.sum(-1)).to(F64)
    batch = cu_seqlens.shape[0] - 1
    segments = segment_ids(cu_seqlens, response_mask.shape[0])
    return torch.zeros(batch, dtype=F64, device=response_mask.device).index_add_(0, segments, response_mask.to(F64))
