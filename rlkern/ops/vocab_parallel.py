"""Vocabulary-parallel (tensor-parallel) log-probs: the pieces every op with ``process_group`` uses.

When the LM head is sharded over the vocabulary (Megatron's ``VocabParallelEmbedding`` /
column-parallel output layer, verl's ``vocab_parallel_log_probs_from_logits``), rank r of a
tensor-parallel group holds the logits columns ``[start_r, start_r + V_r)`` of every token, and
every rank holds the same global labels. Each rank reduces its own columns to three per-row
numbers, the group combines them with two small all-reduces, and no rank ever gathers logits.

Per row, with ``u = softcap(z) / T`` over the shard's columns (the kernels' shard mode,
``vocab_start >= 0`` in ``torch.ops.rlkern.cpp_token_logprobs`` / ``rlkern.kernels.logprobs``):

    lse_r   = log sum_{j in r} e^{u_j}                       (-inf when the shard is all -inf)
    H_r     = lse_r - sum_{j in r} e^{u_j - lse_r} u_j       (the shard's own softmax entropy)
    logp_r  = u_y - lse_r  when y is in the shard and not ignored, else unused (0)

and the combine step, with ``M = max_r lse_r`` (all-reduce MAX), ``d_r = lse_r - M <= 0`` and
``w_r = e^{d_r}`` (all-reduce SUM of the stacked ``[w_r, [y in r] (logp_r + d_r), w_r (H_r -
d_r)]``):

    lse  = M + log S,         S = sum_r w_r                  (S >= 1: the max shard has w = 1)
    logp = min(sum_r [y in r] (logp_r + d_r) - log S, 0)
    H    = log S + sum_r w_r (H_r - d_r) / S

Every term is relative to the row max, like the single-process kernels: no cancellation at
|logits| ~ 1e4, and ``H_r - d_r >= 0`` so the entropy sum has no cancellation either. The
backward is the single-process formula evaluated on the local columns with the global ``lse``
and ``H`` (``dL/du_j = g_l ([j == y] - p_j) - g_H p_j (u_j - lse + H)``, the one-hot term only on
the rank that holds y): it needs no communication, provided every rank receives the same
upstream gradients, which is the case when the loss is computed from the (replicated) log-probs
on every rank, as in Megatron and verl.

Communication per call, N tokens (all-reduces of float64 ``[N]`` / ``[K, N]`` tensors; float64
so that the saved global lse keeps the digits the backward's ``p = e^{u - lse}`` needs):

    forward    2 all-reduces: MAX of [N] (8 B/token) + SUM of [K, N], K = 3 with entropy
               (24 B/token) or 2 without (16 B/token): 32 or 24 bytes per token in all, i.e.
               256 KiB (192 KiB) for N = 8192. A ring all-reduce moves about 2 (tp - 1) / tp
               times that through each rank's link.
    backward   0 collectives (the forward saves the global lse and entropy, [N] float64 +
               [N] float32).
    layout     1 all_gather of tp int64 shard sizes per call, read on the host (the one host
               sync of the path). It is not cached: a rank's own size does not tell it the
               others', and a cache keyed by it reused a stale start after the split changed
               (wrong log-probs) or left one rank alone in the all_gather (a hang).

For comparison, all-gathering bf16 logits costs 2 V bytes per token (304 KB at V = 151936).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


class VocabShard(NamedTuple):
    """This rank's slice of the vocabulary: columns ``[start, start + size)`` of ``total``."""

    start: int  # global id of the first local column
    size: int  # local columns, V_r (may differ between ranks, may be 0)
    total: int  # V, the whole vocabulary: sum of every rank's size


def check_group(process_group: object, name: str = "process_group", *, op: str = "token_logprobs") -> None:
    """TypeError / ValueError unless ``process_group`` is a usable ``torch.distributed`` group."""
    import torch.distributed as dist

    if not dist.is_available():
        raise ValueError(f"{op}: {name} was given but this torch build has no torch.distributed")
    if not dist.is_initialized():
        raise ValueError(f"{op}: {name} was given but torch.distributed is not initialized "
                         "(call torch.distributed.init_process_group first)")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"{op}: {name} must be a torch.distributed.ProcessGroup (e.g. "
                        f"torch.distributed.group.WORLD), got {type(process_group).__name__}")


def shard_layout(local_vocab: int, process_group, device: torch.device) -> VocabShard:
    """Where this rank's vocabulary columns sit, from every rank's local size.

    Ranks own consecutive column ranges in rank order (Megatron's layout); sizes may be uneven.

    Args:
        local_vocab: V_r, this rank's number of columns (``logits.shape[-1]`` or
            ``weight.shape[0]`` of the sharded LM head).
        process_group: the tensor-parallel group.
        device: where the all_gather runs (a CUDA device for NCCL, the CPU for gloo).

    Returns:
        ``VocabShard(start, size, total)``, from one all_gather of ``[world_size]`` int64 read on
        the host (every call: the split may change between calls). Every rank must call it.
    """
    import torch.distributed as dist

    world = dist.get_world_size(process_group)
    mine = torch.tensor([local_vocab], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine, group=process_group)
    sizes = torch.cat(sizes).tolist()
    rank = dist.get_rank(process_group)
    return VocabShard(start=sum(sizes[:rank]), size=int(local_vocab), total=sum(sizes))


def label_in_shard(labels: Tensor, shard: VocabShard, ignore_index: int) -> Tensor:
    """bool, ``labels``' shape: the label is not ignored and its column is on this rank."""
    col = labels.long() - shard.start
    return (col >= 0) & (col < shard.size) & (labels != ignore_index)


def combine_forward(
    local_logp: Tensor,  # (N,) float32/64: u_y - lse_r where label_in_shard, anything finite or -inf elsewhere
    local_entropy: Tensor | None,  # (N,) float32/64: H_r (any value where lse_r = -inf), or None
    local_lse: Tensor,  # (N,) float64: lse_r, -inf for an all -inf (or empty) shard
    labels: Tensor,  # (N,) int32/int64, GLOBAL ids, identical on every rank
    shard: VocabShard,
    ignore_index: int,
    process_group,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Per-row statistics of this rank's columns -> the whole vocabulary's, on every rank.

    Two collectives (module docstring): all-reduce MAX of ``local_lse``, all-reduce SUM of a
    ``[2 or 3, N]`` float64 stack. No host sync.

    Returns:
        ``(logprobs, entropy, lse)``, each ``[N]`` and identical on every rank: logprobs and
        entropy in ``local_logp``'s dtype (entropy None when ``local_entropy`` is None), lse
        float64 (save it, and the entropy, for the backward). Conventions of the
        single-process op: 0 at ``ignore_index``; NaN at labels outside ``[0, shard.total)``;
        a row that is -inf in every shard is uniform (``logp = -log V``, ``H = log V``,
        ``lse = -inf``); a NaN logit anywhere makes the row NaN.
    """
    import torch.distributed as dist

    out_dtype = local_logp.dtype
    lse_r = local_lse.to(torch.float64)
    row_max = lse_r.clone()
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=process_group)
    dead = torch.isneginf(row_max)  # -inf in every shard
    offset = torch.where(dead, 0.0, row_max)
    d = lse_r - offset  # -inf for this rank's all -inf rows (weight 0), NaN for NaN rows
    weight = torch.exp(d)
    here = label_in_shard(labels, shard, ignore_index)
    stacked = [weight, torch.where(here, local_logp.to(torch.float64) + d, 0.0)]
    if local_entropy is not None:
        # w (H_r - d) is 0 * inf at an all -inf shard: keep those rows out of the sum (a NaN
        # row still poisons S through its weight).
        stacked.append(torch.where(weight > 0, weight * (local_entropy.to(torch.float64) - d), 0.0))
    sums = torch.stack(stacked)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=process_group)
    log_s = torch.log(sums[0])
    lse = torch.where(dead, float("-inf"), row_max + log_s)
    log_vocab = math.log(max(shard.total, 1))
    labels64 = labels.long()
    in_vocab = (labels64 >= 0) & (labels64 < shard.total)
    logp = torch.clamp(sums[1] - log_s, max=0.0)
    logp = torch.where(dead, -log_vocab, logp)
    logp = torch.where(in_vocab, logp, float("nan"))
    logp = torch.where(labels64 == ignore_index, 0.0, logp)
    entropy = None
    if local_entropy is not None:
        entropy = torch.where(dead, log_vocab, (log_s + sums[2] / sums[0]).clamp(min=0.0)).to(out_dtype)
    return logp.to(out_dtype), entropy, lse


def shard_grad_logprobs(grad_logprobs: Tensor, labels: Tensor, shard: VocabShard) -> Tensor:
    """``grad_logprobs`` ``[N]`` with the rows whose label is outside ``[0, shard.total)`` zeroed.

    The kernels' shard-mode backward applies the softmax term of every non-ignored row (it cannot
    tell a label of another shard from an invalid one); the single-process op gives invalid
    labels (NaN log-probs) no gradient, and this mask keeps the two equal. No host sync.
    """
    labels64 = labels.long()
    valid = (labels64 >= 0) & (labels64 < shard.total)
    return torch.where(valid, grad_logprobs, torch.zeros((), dtype=grad_logprobs.dtype, device=grad_logprobs.device))
