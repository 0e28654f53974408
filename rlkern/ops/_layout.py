"""Layout helpers shared by the ops: output dtypes, packed <-> padded, token -> sequence index.

Layouts (docs/architecture.md, Numbers): padded ``[B, T]`` with a mask, or packed ``[total]``
with ``cu_seqlens`` ``[B + 1]`` (int32 or int64; sequence b is ``[cu[b], cu[b + 1])``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def out_dtype(t: Tensor) -> torch.dtype:
    """The dtype of an op's float outputs: float64 for float64 input, else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def segment_ids(cu_seqlens: Tensor, total: int) -> Tensor:
    """Sequence number of every packed token, ``[total]`` int64 (no host sync)."""
    tokens = torch.arange(total, dtype=cu_seqlens.dtype, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:], tokens, right=True)


def lastdim_contiguous(t: Tensor) -> Tensor:
    """``t`` with stride 1 along its last dimension (a copy only where it has not)."""
    return t if t.ndim == 0 or t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def int32_offsets(cu_seqlens: Tensor | None) -> Tensor | None:
    """cu_seqlens as the int32 the C++ and Triton kernels read (callers accept int32 or int64)."""
    return cu_seqlens if cu_seqlens is None or cu_seqlens.dtype == torch.int32 else cu_seqlens.to(torch.int32)


def pad(x: Tensor | None, cu_seqlens: Tensor, width: int, fill=0.0) -> Tensor | None:
    """Packed ``[total]`` -> padded ``[B, width]`` (``fill`` past each sequence's end)."""
    if x is None:
        return None
    batch = cu_seqlens.shape[0] - 1
    out = x.new_full((batch, width), fill)
    seq = segment_ids(cu_seqlens, x.shape[0])
    pos = torch.arange(x.shape[0], device=x.device) - cu_seqlens[:-1].long()[seq]
    out[seq, pos] = x
    return out


def unpad(x: Tensor, cu_seqlens: Tensor, total: int) -> Tensor:
    """Padded ``[B, width]`` -> packed ``[total]``."""
    seq = segment_ids(cu_seqlens, total)
    pos = torch.arange(total, device=x.device) - cu_seqlens[:-1].long()[seq]
    return x[seq, pos]
