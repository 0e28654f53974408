"""SPO-chain ("Segment Policy Optimization", Guo et al. 2025, arXiv:2505.23564) on packed token
sequences: cut points, segment advantages with the probability mask, and the spread of per-node
values (tree advantages) over packed tokens (``broadcast_to_tokens``). The tree ops themselves
are in rlkern/ops/trees.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlkern import _backend
from rlkern.ops import _checks
from rlkern.ops._layout import out_dtype, segment_ids


def _packed(op: str, name: str, x, cu_seqlens: Tensor, kind: str = "float") -> None:
    """A packed ``[T]`` tensor of ``kind`` ("float", "mask", "int") on cu_seqlens' device."""
    _checks.tensors(op, "cu_seqlens", {"cu_seqlens": (cu_seqlens, "int"), name: (x, kind)})
    if x.ndim != 1:
        raise ValueError(f"{op}: {name} must be packed [T] (see cu_seqlens), got shape {tuple(x.shape)}")


def _offsets(op: str, cu_seqlens, total: int, of: str) -> Tensor:
    """cu_seqlens checked by the shared rule (rlkern/ops/_checks.py), as int64."""
    device = cu_seqlens.device if isinstance(cu_seqlens, Tensor) else None
    _checks.cu_seqlens(op, cu_seqlens, total, device, of)
    return cu_seqlens.to(torch.int64).contiguous()  # the Triton kernels read it as a dense array


def _probability(op: str, name: str, value) -> float:
    return _checks.number(op, name, value, low=0, low_open=True, high=1)


# The PyTorch backend of each op (vectorized; the kernels are csrc/segments.cpp and
# kernels/segments.py): same arguments and outputs as the kernels.

def _torch_spo_cutpoints(logprobs: Tensor, cu_seqlens: Tensor, threshold: float, interval: int) -> Tensor:
    total = logprobs.numel()
    low = logprobs.to(out_dtype(logprobs)).exp() < threshold
    before = torch.cumsum(low, 0) - low.long()  # low-probability tokens before t, whole batch
    before_seq = torch.cat([before, low.sum().reshape(1)])[cu_seqlens[:-1]]  # an empty last sequence starts at T
    seq = segment_ids(cu_seqlens, total)
    return low & ((before - before_seq[seq]) % interval == 0)


_SPO = _backend.Kernels("spo_cutpoints", cpp="cpp_spo_cutpoints", triton="segments.spo_cutpoints",
                        torch=_torch_spo_cutpoints, fp64=("cpp", "triton"))


@torch.library.custom_op("rlkern::spo_cutpoints", mutates_args=())
def _spo_cutpoints(logprobs: Tensor, cu_seqlens: Tensor, threshold: float, interval: int) -> Tensor:
    return _SPO.pick(logprobs)(logprobs, cu_seqlens, threshold, interval)


@_spo_cutpoints.register_fake
def _spo_cutpoints_fake(logprobs, cu_seqlens, threshold, interval):
    return logprobs.new_empty(logprobs.shape, dtype=torch.bool)


def spo_cutpoints(logprobs: Tensor, cu_seqlens: Tensor, *, threshold: float = 0.9, interval: int = 5) -> Tensor:
    """SPO-chain cut points ("Segment Policy Optimization", cutpoint-based partition).

    A token is a candidate when its sampling probability is below ``threshold``; every
    ``interval``-th candidate of a sequence, starting with the first, opens a new segment, and
    the state just before it (the prompt plus the tokens before it) is a cut point whose value is
    estimated by Monte Carlo rollouts. This is the official code's
    ``np.where(p < 0.9)[0][::cutpoint_interval]`` (its indices minus one name the same states).

    Args:
        logprobs: packed ``[T]`` float, log-probabilities of the sampled tokens under the rollout
            policy (old log-probs).
        cu_seqlens: ``[B+1]`` int32/int64 sequence offsets into the packed tokens.
        threshold: probability below which a token can open a segment (the paper's 0.9).
        interval: keep every ``interval``-th candidate (the paper's "int5": 5).

    Returns:
        ``[T]`` bool, True at tokens that open a segment.
    """
    op = "spo_cutpoints"
    _packed(op, "logprobs", logprobs, cu_seqlens)
    cu = _offsets(op, cu_seqlens, logprobs.numel(), "logprobs")
    interval = _checks.number(op, "interval", interval, low=1, integer=True)
    threshold = _probability(op, "threshold", threshold)
    _checks.no_nan(op, "logprobs", logprobs)  # cut points are where a probability falls below threshold
    return _spo_cutpoints(logprobs.contiguous(), cu, float(threshold), int(interval))


def _torch_segment_advantages(
    segment_start: Tensor,
    cut_values: Tensor,
    final_reward: Tensor,
    cu_seqlens: Tensor,
    logprobs: Tensor | None,
    threshold: float,
) -> tuple[Tensor, Tensor]:
    total = segment_start.numel()
    dtype = out_dtype(cut_values)
    device = segment_start.device
    seq = segment_ids(cu_seqlens, total)
    idx = torch.arange(total, device=device)
    # Latest segment start at or before t, and the first one after t (both per batch; checked
    # against the sequence bounds below).
    prev = torch.where(segment_start, idx, -1).cummax(0).values
    later = torch.where(segment_start, idx, total).flip(0).cummin(0).values.flip(0)
    nxt = torch.cat([later[1:], later.new_full((1,), total)])
    has_prev = prev >= cu_seqlens[seq]
    has_next = nxt < cu_seqlens[seq + 1]
    values = cut_values.to(dtype)
    v_prev = values[prev.clamp(min=0)]
    v_next = torch.where(has_next, values[nxt.clamp(max=max(total - 1, 0))], final_reward.to(dtype)[seq])
    adv = torch.where(has_prev, v_next - v_prev, torch.zeros((), dtype=dtype, device=device))
    if logprobs is None:
        mask = torch.ones_like(segment_start)
    else:
        mask = logprobs.to(dtype).exp() < threshold
        adv = torch.where(mask, adv, torch.zeros((), dtype=dtype, device=device))
    return adv, mask


_SEGMENT_ADVANTAGES = _backend.Kernels("segment_advantages", cpp="cpp_segment_advantages",
                                       triton="segments.segment_advantages", torch=_torch_segment_advantages,
                                       fp64=("cpp", "triton"))


@torch.library.custom_op("rlkern::segment_advantages", mutates_args=())
def _segment_advantages(
    segment_start: Tensor,
    cut_values: Tensor,
    final_reward: Tensor,
    cu_seqlens: Tensor,
    logprobs: Tensor | None,
    threshold: float,
) -> tuple[Tensor, Tensor]:
    return _SEGMENT_ADVANTAGES.pick(cut_values)(segment_start, cut_values, final_reward, cu_seqlens, logprobs,
                                                threshold)


@_segment_advantages.register_fake
def _segment_advantages_fake(segment_start, cut_values, final_reward, cu_seqlens, logprobs, threshold):
    return (segment_start.new_empty(segment_start.shape, dtype=out_dtype(cut_values)),
            segment_start.new_empty(segment_start.shape, dtype=torch.bool))


def segment_advantages(
    segment_start: Tensor,
    cut_values: Tensor,
    final_reward: Tensor,
    cu_seqlens: Tensor,
    *,
    logprobs: Tensor | None = None,
    threshold: float = 0.9,
) -> tuple[Tensor, Tensor]:
    """SPO-chain segment advantages and probability mask ("Segment Policy Optimization").

    In each sequence the segment starts t_1 < ... < t_K (``spo_cutpoints``) cut it into
    segments [t_k, t_{k+1}) (the last one ends with the sequence). With V_k the Monte Carlo value
    of the state before t_k and V_{K+1} the final reward, every token of segment k gets
    A = V_{k+1} - V_k (chain-based advantage estimation). Tokens before the first start get 0,
    as in the official code, which has no value for the prompt state unless the very first token
    is a cut point (then V_1 is the prompt's value); a sequence with no start gets 0 throughout.

    Probability mask: tokens whose probability is not below ``threshold`` get advantage 0 and
    ``loss_mask`` False (the official trainer's ``exp(old_logprobs) < 0.9`` mask, which also
    removes them from the loss normalization; the episode code zeroes those with p > 0.9).

    Args:
        segment_start: packed ``[T]`` bool, True where a segment opens.
        cut_values: packed ``[T]`` float, read where ``segment_start``: MC value of the state
            before that token.
        final_reward: ``[B]`` float, the outcome reward of each sequence.
        cu_seqlens: ``[B+1]`` int32/int64 offsets.
        logprobs: packed ``[T]`` float rollout log-probs for the probability mask; None: no mask.
        threshold: the mask's probability threshold (the paper's 0.9).

    Returns:
        ``(advantages, loss_mask)``: ``[T]`` float32 (float64 for float64 ``cut_values``) and
        ``[T]`` bool (all True without ``logprobs``).
    """
    op = "segment_advantages"
    _packed(op, "segment_start", segment_start, cu_seqlens, "mask")
    if segment_start.dtype != torch.bool:
        raise TypeError(f"{op}: segment_start must be bool, got {segment_start.dtype}")
    total = segment_start.numel()
    _packed(op, "cut_values", cut_values, cu_seqlens)
    if cut_values.numel() != total:
        raise ValueError(f"{op}: cut_values must be [T] = [{total}], got {tuple(cut_values.shape)}")
    cu = _offsets(op, cu_seqlens, total, "segment_start")
    _packed(op, "final_reward", final_reward, cu_seqlens)
    if final_reward.numel() != cu.numel() - 1:
        raise ValueError(f"{op}: final_reward must be [B] = [{cu.numel() - 1}], got {tuple(final_reward.shape)}")
    if logprobs is not None:
        _packed(op, "logprobs", logprobs, cu_seqlens)
        if logprobs.numel() != total:
            raise ValueError(f"{op}: logprobs must be [T] = [{total}], got {tuple(logprobs.shape)}")
    threshold = _probability(op, "threshold", threshold)
    if total == 0:  # no token (B empty sequences, or B = 0): nothing to advantage
        return (cut_values.new_zeros(0, dtype=out_dtype(cut_values)),
                torch.zeros(0, dtype=torch.bool, device=cut_values.device))
    return _segment_advantages(segment_start.contiguous(), cut_values.contiguous(), final_reward.contiguous(), cu,
                               None if logprobs is None else logprobs.contiguous(), float(threshold))


# ---------------------------------------------------------------------------------------------
# Node values -> packed tokens

def _torch_broadcast_to_tokens(node_values: Tensor, segment_start: Tensor, segment_end: Tensor, num_tokens: int,
                               node_index: Tensor | None, fill: float) -> Tensor:
    device = node_values.device
    dtype = out_dtype(node_values)
    tag = torch.arange(1, segment_start.numel() + 1, device=device)
    # +k at a segment's start, -k at its end: the running sum is k inside segment k, 0 in gaps.
    delta = torch.zeros(num_tokens + 1, dtype=torch.int64, device=device)
    delta.index_add_(0, segment_start, tag).index_add_(0, segment_end, -tag)
    owner = delta.cumsum(0)[:num_tokens] - 1
    values = node_values.to(dtype)
    if node_index is not None:
        values = values[node_index]
    gathered = values[owner.clamp(min=0)] if values.numel() else values.new_zeros(num_tokens)
    return torch.where(owner >= 0, gathered, torch.full((), fill, dtype=dtype, device=device))


_BROADCAST = _backend.Kernels("broadcast_to_tokens", cpp="cpp_broadcast_to_tokens",
                              triton="segments.broadcast_to_tokens", torch=_torch_broadcast_to_tokens,
                              fp64=("cpp", "triton"))


@torch.library.custom_op("rlkern::broadcast_to_tokens", mutates_args=())
def _broadcast_to_tokens(node_values: Tensor, segment_start: Tensor, segment_end: Tensor, num_tokens: int,
                         node_index: Tensor | None, fill: float) -> Tensor:
    return _BROADCAST.pick(node_values)(node_values, segment_start, segment_end, num_tokens, node_index, fill)


@_broadcast_to_tokens.register_fake
def _broadcast_to_tokens_fake(node_values, segment_start, segment_end, num_tokens, node_index, fill):
    return node_values.new_empty((num_tokens,), dtype=out_dtype(node_values))


def broadcast_to_tokens(
    node_values: Tensor,
    segment_start: Tensor,
    segment_end: Tensor,
    num_tokens: int,
    *,
    node_index: Tensor | None = None,
    fill: float = 0.0,
) -> Tensor:
    """Spread per-node values (advantages) over a packed token layout, in one pass.

    Segment k covers tokens ``[segment_start[k], segment_end[k])`` and takes
    ``node_values[node_index[k]]`` (``node_values[k]`` without ``node_index``). Two layouts:
    node-packed (each node's tokens once, SPO-tree's one sample per edge: pass ``from_nested``'s
    offsets) and trajectory-packed (each root-to-leaf path is one sequence, TreeRL/TreePO: one
    segment per (trajectory, node on its path), ``node_index`` naming the node -- or the leaf,
    for TreePO's per-trajectory advantages). Tokens in no segment get ``fill``.

    Args:
        node_values: ``[M]`` float.
        segment_start, segment_end: ``[S]`` int64 token offsets, 0 <= start <= end <= num_tokens;
            segments must not overlap (checked on CPU tensors, and on CUDA with RLKERN_VALIDATE=1).
        num_tokens: T, the packed length.
        node_index: ``[S]`` int64 in [0, M), or None (then S must equal M).
        fill: value of tokens outside every segment (0: no advantage).

    Returns:
        ``[num_tokens]`` float32 (float64 for float64 ``node_values``).
    """
    op = "broadcast_to_tokens"
    _checks.tensors(op, "node_values", {"node_values": (node_values, "float"), "segment_start": (segment_start, "int"),
                                        "segment_end": (segment_end, "int"), "node_index": (node_index, "int")})
    if node_values.ndim != 1:
        raise ValueError(f"{op}: node_values must be [M], got shape {tuple(node_values.shape)}")
    if segment_start.ndim != 1 or segment_start.shape != segment_end.shape:
        raise ValueError(f"{op}: segment_start and segment_end must both be [S], got {tuple(segment_start.shape)} "
                         f"and {tuple(segment_end.shape)}")
    num_tokens = _checks.number(op, "num_tokens", num_tokens, low=0, integer=True)
    if node_index is None and segment_start.numel() != node_values.numel():
        raise ValueError(f"{op}: without node_index there must be one segment per node: {node_values.numel()} "
                         f"nodes, {segment_start.numel()} segments")
    if node_index is not None and tuple(node_index.shape) != tuple(segment_start.shape):
        raise ValueError(f"{op}: node_index must have shape {tuple(segment_start.shape)}, got "
                         f"{tuple(node_index.shape)}")
    start, end = segment_start.to(torch.int64).contiguous(), segment_end.to(torch.int64).contiguous()
    if _checks.host_checks(node_values):
        _check_segments(start, end, num_tokens, node_index, node_values.numel())
    return _broadcast_to_tokens(node_values.contiguous(), start, end, num_tokens,
                                None if node_index is None else node_index.to(torch.int64).contiguous(), float(fill))


def _check_segments(start: Tensor, end: Tensor, num_tokens: int, node_index: Tensor | None, m: int) -> None:
    bad = (start < 0) | (end < start) | (end > num_tokens)
    if bad.any():
        k = int(bad.nonzero()[0])
        raise ValueError(f"broadcast_to_tokens: segment {k} = [{int(start[k])}, {int(end[k])}) is not within "
                         f"[0, num_tokens={num_tokens}] (segment_start[{k}], segment_end[{k}])")
    if node_index is not None and node_index.numel() and bool(((node_index < 0) | (node_index >= m)).any()):
        k = int(((node_index < 0) | (node_index >= m)).nonzero()[0])
        raise ValueError(f"broadcast_to_tokens: node_index[{k}] = {int(node_index[k])} is not a node in [0, {m})")
    if _sorted_without_overlap(start, end):
        return
    nonempty = (end > start).nonzero().flatten()
    order = nonempty[start[nonempty].argsort(stable=True)]
    overlap = end[order[:-1]] > start[order[1:]]
    if overlap.any():
        j = int(overlap.nonzero()[0])
        a, b = sorted((int(order[j]), int(order[j + 1])))
        raise ValueError(f"broadcast_to_tokens: segments {a} and {b} overlap: [{int(start[a])}, {int(end[a])}) and "
                         f"[{int(start[b])}, {int(end[b])})")


def _sorted_without_overlap(start: Tensor, end: Tensor) -> bool:
    """True for segments in order of their starts that do not overlap (node-packed layouts, from
    ``from_nested``): then no sort is needed (the sort cost 4x the kernel). With sorted starts,
    non-empty segments i < j overlap iff end[i] > start[j]."""
    if start.numel() < 2 or not bool((start[1:] >= start[:-1]).all()):
        return start.numel() < 2
    nonempty = end > start
    reach = torch.where(nonempty, end, 0).cummax(0).values  # furthest end of the non-empty segments so far
    return not bool((nonempty[1:] & (reach[:-1] > start[1:])).any())
