"""Token log-probs and entropy from logits: the public ops and their autograd.

``token_logprobs`` is rlkern's own API; ``selective_log_softmax``, ``entropy_from_logits`` and
``selective_log_softmax_and_entropy`` have the signatures and semantics of TRL 1.16's functions
of the same names (``trl.trainer.utils``), so a TRL user can swap the import.

Bad labels: a label outside ``[0, V)`` that is not ``ignore_index`` never yields a silent number.
On CPU tensors it raises ``ValueError``; on GPU tensors the kernel writes NaN at that position
(no host sync), and ``RLKERN_VALIDATE=1`` turns that into a ``ValueError`` at the cost of a sync.

Vocabulary parallelism: ``token_logprobs(..., process_group=group)`` takes this rank's logits
columns and global labels; the per-rank statistics are combined by ``rlkern.ops.vocab_parallel``
(two small all-reduces, no logits gathered). That path is a ``torch.autograd.Function``, not a
custom op (a ProcessGroup cannot be a custom-op argument), so torch.compile does not trace it.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import torch
from torch import Tensor

from rlkern import _backend
from rlkern.ops import _checks
from rlkern.ops._layout import out_dtype as out_dtype_of
from rlkern.ops import vocab_parallel
from rlkern.reference import logprobs as reference

_LOGIT_DTYPES = _checks.FLOATS
_LABEL_DTYPES = (torch.int32, torch.int64)
# TRL's functions have no ignore_index: rows they mask out get this label, which no real index
# can equal, so an invalid index still raises instead of silently returning 0.
_MASKED_LABEL = -(2**62)


class LogprobsEntropy(NamedTuple):
    """``(logprobs, entropy)``: what the log-prob ops return with ``return_entropy=True``."""

    logprobs: Tensor
    entropy: Tensor


def _check_logprobs(op, logits, labels, temperature, logit_softcap, name_labels="labels"):
    if not isinstance(logits, Tensor):
        raise TypeError(f"{op}: logits must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(labels, Tensor):
        raise TypeError(f"{op}: {name_labels} must be a torch.Tensor, got {type(labels).__name__}")
    if logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"{op}: logits must be float16/bfloat16/float32/float64, got {logits.dtype}")
    if logits.ndim not in (2, 3):
        raise ValueError(f"{op}: logits must be [N, V] or [B, T, V], got shape {tuple(logits.shape)}")
    if labels.dtype not in _LABEL_DTYPES:
        raise TypeError(f"{op}: {name_labels} must be int32 or int64, got {labels.dtype}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"{op}: {name_labels} must have the leading shape of logits {tuple(logits.shape[:-1])}, "
            f"got {tuple(labels.shape)}"
        )
    if labels.device != logits.device:
        raise ValueError(f"{op}: {name_labels} is on {labels.device} but logits are on {logits.device}")
    _checks.number(op, "temperature", temperature, low=0, low_open=True)
    if logit_softcap is not None:
        _checks.number(op, "logit_softcap", logit_softcap, low=0, low_open=True)


def check_ignore_index(op: str, ignore_index, labels: Tensor) -> int:
    """An int (a float such as 1.5 was truncated); with int32 labels, one that int32 holds (a
    larger one matched no label: the padding labels then gave NaN instead of an error)."""
    if ignore_index == _MASKED_LABEL:
        return ignore_index
    value = _checks.number(op, "ignore_index", ignore_index, integer=True)
    if labels.dtype == torch.int32 and not -(2**31) <= value < 2**31:
        raise ValueError(f"{op}: ignore_index must fit the int32 labels, got {value}")
    return value


def check_label_range(labels: Tensor, vocab: int, ignore_index: int, name: str = "labels",
                      op: str = "token_logprobs") -> None:
    """Host-side check: always for CPU tensors, for GPU tensors only with RLKERN_VALIDATE=1;
    never while torch.compile traces (a data-dependent branch breaks fullgraph; as
    rlkern/ops/_checks.py's host_checks)."""
    if torch.compiler.is_compiling() or (labels.device.type != "cpu" and not _backend.validate_enabled()):
        return
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if bad.any():
        where = tuple(int(i) for i in bad.nonzero()[0])
        allowed = "" if ignore_index == _MASKED_LABEL else f" or equal ignore_index={ignore_index}"
        raise ValueError(f"{op}: {name} must be in [0, {vocab}){allowed}; {name}{list(where)} = {int(labels[where])}")


def _pieces(logits: Tensor, *per_row: Tensor | None) -> list[tuple]:
    """Split (N, V) or (B, T, V) into (rows, V) views with stride(-1) == 1, without copies.

    Returns one tuple ``(logits_rows, *per_row_rows)`` per piece; ``per_row`` tensors have
    ``logits``' leading shape (or a trailing V, like grads) and are split the same way. A
    [B, T, V] tensor whose leading dims cannot be flattened as a view (TRL slices
    ``logits[:, :-1]``) is handed to the kernels one batch row at a time.
    """
    # Row count spelled out: view(-1, 0) is ambiguous for an empty vocabulary shard.
    rows = math.prod(logits.shape[:-1])
    if logits.ndim == 3:
        try:
            logits.view(rows, logits.shape[-1])
        except RuntimeError:
            return list(zip(logits.unbind(0), *[_unbind_or_none(t) for t in per_row]))
    flat = logits.view(rows, logits.shape[-1])
    return [(flat, *[_flatten_rows(t, logits.ndim, rows) for t in per_row])]


def _unbind_or_none(t: Tensor | None):
    return t.unbind(0) if t is not None else itertools.repeat(None)


def _flatten_rows(t: Tensor | None, logits_ndim: int, rows: int) -> Tensor | None:
    if t is None:
        return None
    lead = t.ndim - (logits_ndim - 1)  # 0 for per-row tensors, 1 for (..., V) tensors
    return t.reshape(rows, *t.shape[t.ndim - lead:]) if lead else t.reshape(rows)


def _reference_fwd(logits, labels, temperature, softcap, ignore_index, with_entropy, vocab_start=-1):
    if vocab_start < 0:
        return reference.logprobs_fwd(logits, labels, temperature, softcap, ignore_index, with_entropy)
    # Shard mode through the whole-vocabulary oracle: labels of other shards become ignored.
    vocab = logits.shape[1]
    col = labels.long() - vocab_start
    here = (col >= 0) & (col < vocab) & (labels != ignore_index)
    logp, entropy, lse = reference.logprobs_fwd(logits, torch.where(here, col, -1), temperature,
                                                softcap, -1, with_entropy)
    # The oracle's all -inf row is uniform over its columns; a shard's is probability 0.
    return torch.where(here & torch.isneginf(lse), -math.inf, logp), entropy, lse


def _reference_bwd_into(grad_logprobs, grad_entropy, logits, labels, lse, entropy, temperature,
                        softcap, ignore_index, grad_logits, vocab_start=-1):
    if vocab_start >= 0:
        # The oracle puts the one-hot term at the label's column; a label held by another shard
        # still needs this shard's softmax terms, so it points at an extra column whose gradient
        # is dropped (each column's gradient depends only on its own logit and the row scalars).
        n, vocab = logits.shape
        col = labels.long() - vocab_start
        live = labels != ignore_index
        here = live & (col >= 0) & (col < vocab)
        labels = torch.where(here, col, torch.where(live, vocab, -1))
        logits = torch.cat([logits, logits.new_zeros(n, 1)], dim=1)
        ignore_index = -1
    grad = reference.logprobs_bwd(grad_logprobs, grad_entropy, logits, labels, lse, entropy,
                                  temperature, softcap, ignore_index)
    grad_logits.copy_(grad[:, : grad_logits.shape[1]])


# The token kernels, forward and backward; both take a trailing ``vocab_start=-1`` (shard mode
# when >= 0: see kernels/logprobs.py). linear_logprobs.py runs them on its logits tiles.
FORWARD = _backend.Kernels("token_logprobs", cpp="cpp_token_logprobs", triton="logprobs.logprobs_forward",
                           torch=_reference_fwd, fp64=("cpp", "triton"))
BACKWARD = _backend.Kernels("token_logprobs", cpp="cpp_token_logprobs_backward", triton="logprobs.logprobs_backward",
                            torch=_reference_bwd_into, fp64=("cpp", "triton"))


def kernel_fns(backend: str):
    """(forward, backward) of one backend."""
    return FORWARD.get(backend), BACKWARD.get(backend)


def _joined(parts: list[Tensor], shape) -> Tensor:
    """The pieces' outputs as ONE tensor of ``shape`` that is not a view. An op output that is a
    view (``cat(...).view(lead)``) is taken by autograd for one of several views of a shared
    base, and then TRL's in-place writes on the log-probs (``lp[0, 2] = 0``, ``masked_fill_``)
    raise; cat into a fresh tensor costs the same copy."""
    out = parts[0].new_empty(shape)
    torch.cat(parts, out=out.view(-1))
    return out


@torch.library.custom_op("rlkern::token_logprobs", mutates_args=())
def _fwd(
    logits: Tensor,  # (N, V) or (B, T, V), stride(-1) == 1
    labels: Tensor,  # logits.shape[:-1], int32/int64
    temperature: float,
    softcap: float,  # 0.0 = off
    ignore_index: int,
    with_entropy: bool,
    inplace_backward: bool,  # read by the autograd formula only
) -> tuple[Tensor, Tensor, Tensor]:
    vocab = logits.shape[-1]
    check_label_range(labels, vocab, ignore_index)
    forward = FORWARD.pick(logits)
    parts = [
        forward(rows, row_labels, temperature, softcap, ignore_index, with_entropy)
        for rows, row_labels in _pieces(logits, labels)
    ]
    lead = logits.shape[:-1]
    logp = _joined([p[0] for p in parts], lead)
    lse = _joined([p[2] for p in parts], lead)
    entropy = _joined([p[1] for p in parts], lead) if with_entropy else logp.new_empty(0)
    if _backend.validate_enabled() and logits.device.type != "cpu" and logp.isnan().any():
        raise ValueError("token_logprobs produced NaN: check labels and logits (RLKERN_VALIDATE=1)")
    return logp, entropy, lse


@_fwd.register_fake
def _fwd_fake(logits, labels, temperature, softcap, ignore_index, with_entropy, inplace_backward):
    lead = logits.shape[:-1]
    dtype = out_dtype_of(logits)
    entropy = logits.new_empty(lead if with_entropy else (0,), dtype=dtype)
    return logits.new_empty(lead, dtype=dtype), entropy, logits.new_empty(lead, dtype=torch.float64)


def _bwd_into(grad_logprobs, grad_entropy, logits, labels, lse, entropy, temperature, softcap,
              ignore_index, grad_logits, vocab_start=-1) -> None:
    backward = BACKWARD.pick(logits)
    for rows, row_grad_logits, *per_row in _pieces(
        logits, grad_logits, grad_logprobs, grad_entropy, labels, lse, entropy
    ):
        g_l, g_h, row_labels, row_lse, row_entropy = per_row
        backward(
            g_l.contiguous(),
            g_h.contiguous() if g_h is not None else None,
            rows, row_labels, row_lse, row_entropy,
            temperature, softcap, ignore_index, row_grad_logits, vocab_start=vocab_start,
        )


@torch.library.custom_op("rlkern::token_logprobs_backward", mutates_args=())
def _bwd(
    grad_logprobs: Tensor,  # logits.shape[:-1]
    grad_entropy: Tensor | None,  # logits.shape[:-1] or None
    logits: Tensor,  # (N, V) or (B, T, V)
    labels: Tensor,
    lse: Tensor,
    entropy: Tensor | None,
    temperature: float,
    softcap: float,
    ignore_index: int,
) -> Tensor:
    grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _bwd_into(grad_logprobs, grad_entropy, logits, labels, lse, entropy, temperature, softcap,
              ignore_index, grad_logits)
    return grad_logits


@_bwd.register_fake
def _bwd_fake(grad_logprobs, grad_entropy, logits, labels, lse, entropy, temperature, softcap, ignore_index):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("rlkern::token_logprobs_backward_inplace", mutates_args=("logits",))
def _bwd_inplace(
    grad_logprobs: Tensor,
    grad_entropy: Tensor | None,
    logits: Tensor,  # overwritten with d loss / d logits
    labels: Tensor,
    lse: Tensor,
    entropy: Tensor | None,
    temperature: float,
    softcap: float,
    ignore_index: int,
) -> None:
    _bwd_into(grad_logprobs, grad_entropy, logits, labels, lse, entropy, temperature, softcap,
              ignore_index, logits)


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, softcap, ignore_index, with_entropy, inplace_backward = inputs
    _, entropy, lse = output
    # The entropy the caller gets may be written in place (TRL masks it with masked_fill_): the
    # backward reads its own copy ([N] floats) instead of the returned tensor.
    ctx.save_for_backward(logits, labels, lse, entropy.clone() if with_entropy else None)
    ctx.hyper = (temperature, softcap, ignore_index)
    ctx.with_entropy = with_entropy
    # Writing grads into the logits buffer is only sound in eager mode; compiled graphs keep
    # the functional backward (CONTRIBUTING.md, Code).
    ctx.inplace = inplace_backward and not torch.compiler.is_compiling()
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_logprobs, grad_entropy, grad_lse):
    logits, labels, lse, entropy = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return (None,) * 7
    g_entropy = grad_entropy if ctx.with_entropy else None
    args = (grad_logprobs, g_entropy, logits, labels, lse, entropy, *ctx.hyper)
    if ctx.inplace:
        _bwd_inplace(*args)
        grad_logits = logits
    else:
        grad_logits = _bwd(*args)
    return grad_logits, None, None, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


class _VocabParallelLogprobs(torch.autograd.Function):
    """token_logprobs over a vocabulary-sharded group: the local kernels in shard mode, the
    combine step of ``rlkern.ops.vocab_parallel`` in the forward, no communication in the
    backward (it reads the saved global lse and entropy)."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, softcap, ignore_index, with_entropy, inplace_backward,
                process_group, shard):
        # logits: (N, V_r) or (B, T, V_r), stride(-1) == 1; labels: logits.shape[:-1], global ids
        forward = FORWARD.pick(logits)
        parts = [
            forward(rows, row_labels, temperature, softcap, ignore_index, with_entropy, vocab_start=shard.start)
            for rows, row_labels in _pieces(logits, labels)
        ]
        local_entropy = torch.cat([p[1] for p in parts]) if with_entropy else None
        logp, entropy, lse = vocab_parallel.combine_forward(
            torch.cat([p[0] for p in parts]), local_entropy, torch.cat([p[2] for p in parts]),
            labels.reshape(-1), shard, ignore_index, process_group,
        )
        lead = logits.shape[:-1]
        logp, lse = _joined([logp], lead), _joined([lse], lead)
        entropy = _joined([entropy], lead) if with_entropy else logp.new_empty(0)
        if _backend.validate_enabled() and logits.device.type != "cpu" and logp.isnan().any():
            raise ValueError("token_logprobs produced NaN: check labels and logits (RLKERN_VALIDATE=1)")
        ctx.save_for_backward(logits, labels, lse, entropy.clone() if with_entropy else None)  # see _setup_context
        ctx.hyper = (temperature, softcap, ignore_index)
        ctx.with_entropy = with_entropy
        ctx.inplace = inplace_backward
        ctx.shard = shard
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        if not ctx.needs_input_grad[0]:
            return (None,) * 9
        logits, labels, lse, entropy = ctx.saved_tensors
        grad_logprobs = vocab_parallel.shard_grad_logprobs(grad_logprobs, labels, ctx.shard)
        g_entropy = grad_entropy if ctx.with_entropy else None
        if ctx.inplace:
            grad_logits = logits
        else:
            grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        _bwd_into(grad_logprobs, g_entropy, logits, labels, lse, entropy, *ctx.hyper, grad_logits,
                  ctx.shard.start)
        if ctx.inplace:
            # The kernels write through raw pointers: bump the version so that another consumer
            # that saved these logits raises instead of reading gradients.
            torch.autograd.graph.increment_version(logits)
        return grad_logits, None, None, None, None, None, None, None, None


def token_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    logit_softcap: float | None = None,
    inplace_backward: bool = False,
    process_group=None,
) -> Tensor | LogprobsEntropy:
    """Log-probability of each label under softmax(logits / temperature), and optionally entropy.

    One pass over the vocabulary per row (online log-sum-exp with the label gather and the
    entropy accumulated in the same loop); the backward reads the logits once and writes the
    gradient once, for both outputs.

    Args:
        logits: ``[N, V]`` or ``[B, T, V]``, float16/bfloat16/float32/float64 (float64: the
            kernels compute in double). Rows may be strided (``logits[:, :-1]``); the last dim
            must be contiguous. V need not be a multiple of anything.
        labels: ``logits.shape[:-1]``, int32/int64, in ``[0, V)`` or ``ignore_index``.
        temperature: divides the (soft-capped) logits; vLLM/TRL/verl sampling temperature.
            Default 1.0 as in TRL's ``selective_log_softmax``.
        ignore_index: label value whose log-prob is 0 and gets no gradient (PyTorch's and
            HF's -100).
        return_entropy: also return the entropy of softmax(logits / temperature), computed for
            every row (ignored labels included).
        logit_softcap: ``c`` in ``c * tanh(z / c)``, applied before the temperature (Gemma 2's
            ``final_logit_softcapping``); None is off.
        inplace_backward: the backward writes d loss / d logits into the logits buffer instead
            of a new tensor. Only when nothing else will read the logits afterwards (autograd
            raises if a saved copy is modified); ignored under ``torch.compile``.
        process_group: a ``torch.distributed`` group over which the vocabulary is sharded
            (tensor parallelism, Megatron's layout: rank r holds columns ``[start_r, start_r +
            V_r)``, consecutive in rank order, sizes may be uneven). ``logits`` is then this
            rank's ``[N, V_r]`` / ``[B, T, V_r]`` slice and ``labels`` the GLOBAL ids, the same
            on every rank; label checks use the whole vocabulary. Every rank returns the
            whole-vocabulary result (equal to this op on the concatenated logits) and gets the
            gradient of its own columns; the upstream gradients must be the same on every rank
            (a loss computed from the replicated outputs). Cost: two all-reduces of float64
            ``[N]``-sized tensors per forward (32 bytes per token with entropy, 24 without),
            none in the backward, one all_gather of the shard sizes per call, read on the host (see
            ``rlkern.ops.vocab_parallel``). This path is a ``torch.autograd.Function`` (a
            process group cannot be a custom-op argument): torch.compile does not trace it.
            None (default): the logits hold the whole vocabulary.

    Returns:
        ``logprobs`` float32 of shape ``logits.shape[:-1]`` (never > 0; 0 at ignored labels);
        with ``return_entropy``, ``LogprobsEntropy(logprobs, entropy)``, entropy float32 of the same shape.
        float64 logits give float64 outputs. A row of all -inf logits counts as uniform.
    """
    _check_logprobs("token_logprobs", logits, labels, temperature, logit_softcap)
    ignore_index = check_ignore_index("token_logprobs", ignore_index, labels)
    _checks.flag("token_logprobs", "return_entropy", return_entropy)
    _checks.flag("token_logprobs", "inplace_backward", inplace_backward)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    softcap = float(logit_softcap) if logit_softcap is not None else 0.0
    if process_group is not None:
        vocab_parallel.check_group(process_group, op="token_logprobs")
        shard = vocab_parallel.shard_layout(logits.shape[-1], process_group, logits.device)
        check_label_range(labels, shard.total, int(ignore_index))
        logp, entropy = _VocabParallelLogprobs.apply(
            logits, labels, float(temperature), softcap, int(ignore_index), bool(return_entropy),
            bool(inplace_backward), process_group, shard,
        )
        return LogprobsEntropy(logp, entropy) if return_entropy else logp
    logp, entropy, _ = _fwd(logits, labels, float(temperature), softcap, int(ignore_index),
                            bool(return_entropy), bool(inplace_backward))
    return LogprobsEntropy(logp, entropy) if return_entropy else logp


def _trl_rows(op: str, logits: Tensor, index: Tensor, row_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """TRL accepts logits of any rank (..., V): flatten to [N, V] with the matching labels."""
    if tuple(index.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"{op}: index must have shape {tuple(logits.shape[:-1])}, got {tuple(index.shape)}")
    flat_logits = logits if logits.ndim in (2, 3) else logits.reshape(-1, logits.shape[-1])
    labels = index.long()
    if row_mask is not None:
        if not isinstance(row_mask, Tensor):
            raise TypeError(f"{op}: row_mask must be a torch.Tensor or None, got {type(row_mask).__name__}")
        if tuple(row_mask.shape) != tuple(index.shape):
            raise ValueError(f"{op}: row_mask must have the shape of index {tuple(index.shape)}, got {tuple(row_mask.shape)}")
        if row_mask.device != index.device:
            raise ValueError(f"{op}: row_mask is on {row_mask.device} but index is on {index.device}")
        labels = torch.where(row_mask != 0, labels, torch.full_like(labels, _MASKED_LABEL))
    # checked here so that the message names this op and its argument, not token_logprobs' labels
    check_label_range(labels, logits.shape[-1], _MASKED_LABEL, name="index", op=op)
    return flat_logits, labels.reshape(flat_logits.shape[:-1])


def _trl_check(op: str, logits, index, temperature) -> None:
    """The TRL drop-ins' arguments, in their own names (``index`` may be None: entropy only)."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"{op}: logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"{op}: logits must be float16/bfloat16/float32/float64, got {logits.dtype}")
    if logits.ndim < 1:
        raise ValueError(f"{op}: logits must be (..., V), got a 0-dim tensor")
    if index is not None:
        if not isinstance(index, Tensor) or index.dtype not in _LABEL_DTYPES:
            raise TypeError(f"{op}: index must be an int32/int64 tensor, got {getattr(index, 'dtype', type(index))}")
        if index.device != logits.device:
            raise ValueError(f"{op}: index is on {index.device} but logits are on {logits.device}")
    _checks.number(op, "temperature", temperature, low=0, low_open=True)


def _trl_out_dtype(op: str, out_dtype, logits: Tensor, index: Tensor | None = None,
                   row_mask: Tensor | None = None) -> torch.dtype:
    """The dtype TRL 1.16 returns for these logits, unless ``out_dtype`` names one.

    TRL's Triton kernel (``trl.kernels.logprob_entropy``, taken on CUDA/XPU for fp16/bf16/fp32
    logits of 1-3 dims with a contiguous last dim, one index per row) returns float32; its
    PyTorch path (CPU, top-K indices, float64, strided rows) returns the logits' dtype
    (``trl.trainer.utils._supports_trl_loss_kernel`` decides)."""
    if _checks.out_dtype(op, out_dtype, "TRL") is not None:
        return out_dtype
    kernel = (
        _backend.has_triton()
        and logits.device.type in ("cuda", "xpu")
        and logits.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and 1 <= logits.ndim <= 3
        and logits.stride(-1) == 1
        and logits.shape[-1] > 0
        and (index is None or (index.shape == logits.shape[:-1] and index.device == logits.device))
        and (row_mask is None or (row_mask.dtype in (torch.bool, torch.int32, torch.int64)
                                  and row_mask.device == logits.device))
    )
    return torch.float32 if kernel else logits.dtype


def selective_log_softmax(
    logits: Tensor,
    index: Tensor,
    temperature: float = 1.0,
    row_mask: Tensor | None = None,
    *,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Drop-in for TRL 1.16's ``trl.trainer.utils.selective_log_softmax``: TRL's shapes, dtype
    and autograd behaviour, rlkern's arithmetic (fp32 accumulation, one rounding at the end).

    Args:
        logits: ``(..., V)``.
        index: ``(...)`` (one log-prob per row, the fused kernel) or ``(..., K)`` (K per row,
            e.g. top-K; PyTorch log-sum-exp per row in float32, as TRL does).
        temperature: divides the logits (TRL default 1.0).
        row_mask: shape of ``index``; positions where it is 0 return 0 (and no gradient).
        out_dtype: None returns TRL's dtype: the logits' dtype (TRL's PyTorch path), float32
            where TRL runs its Triton kernel (CUDA, fp16/bf16/fp32 logits, one index per row).
            ``torch.float32`` keeps rlkern's float32 result unrounded (float64 logits stay exact
            either way).

    Returns:
        Log-probabilities with the shape of ``index``; a tensor of its own (in-place writes are
        fine, also while it requires grad).
    """
    _trl_check("selective_log_softmax", logits, index, temperature)
    if index.ndim == logits.ndim - 1:
        dtype = _trl_out_dtype("selective_log_softmax", out_dtype, logits, index, row_mask)
        flat_logits, labels = _trl_rows("selective_log_softmax", logits, index, row_mask)
        logp = token_logprobs(flat_logits, labels, temperature=temperature, ignore_index=_MASKED_LABEL)
        return logp.reshape(index.shape).to(dtype)
    if index.ndim != logits.ndim or index.shape[:-1] != logits.shape[:-1]:
        raise ValueError(
            f"selective_log_softmax: index must have shape {tuple(logits.shape[:-1])} or {tuple(logits.shape[:-1])} + (K,), "
            f"got {tuple(index.shape)}"
        )
    check_label_range(index, logits.shape[-1], _MASKED_LABEL, name="index", op="selective_log_softmax")
    # Top-K indices take TRL's PyTorch path everywhere: the logits' dtype.
    dtype = logits.dtype if out_dtype is None else _trl_out_dtype("selective_log_softmax", out_dtype, logits)
    scaled = logits.to(out_dtype_of(logits)) / temperature
    rows = scaled.reshape(-1, logits.shape[-1])
    # No rows (an empty batch): torch.stack of no tensors raises; found by tests/test_fuzz_ops.py.
    lse = torch.stack([torch.logsumexp(row, dim=-1) for row in rows]) if rows.shape[0] else rows.new_zeros(0)
    logp = scaled.gather(-1, index.long()) - lse.reshape(index.shape[:-1])[..., None]
    if row_mask is not None:
        logp = logp.masked_fill(row_mask == 0, 0.0)
    return logp.to(dtype)


def entropy_from_logits(logits: Tensor, chunk_size: int = 128, *, out_dtype: torch.dtype | None = None) -> Tensor:
    """Drop-in for TRL 1.16's ``trl.trainer.utils.entropy_from_logits`` (TRL's shape and dtype,
    rlkern's fp32 arithmetic).

    Args:
        logits: ``(..., V)``.
        chunk_size: accepted for compatibility; the fused kernel needs no chunking (its memory
            is O(rows) whatever the chunk).
        out_dtype: None returns TRL's dtype (see :func:`selective_log_softmax`);
            ``torch.float32`` the unrounded float32 entropy.

    Returns:
        Entropy (nats) of shape ``logits.shape[:-1]``, a tensor of its own.
    """
    _trl_check("entropy_from_logits", logits, None, 1.0)
    _checks.number("entropy_from_logits", "chunk_size", chunk_size, low=1, integer=True)
    dtype = _trl_out_dtype("entropy_from_logits", out_dtype, logits)
    flat = logits if logits.ndim in (2, 3) else logits.reshape(-1, logits.shape[-1])
    labels = torch.full(flat.shape[:-1], _MASKED_LABEL, dtype=torch.int64, device=logits.device)
    _, entropy = token_logprobs(flat, labels, ignore_index=_MASKED_LABEL, return_entropy=True)
    return entropy.reshape(logits.shape[:-1]).to(dtype)


def selective_log_softmax_and_entropy(
    logits: Tensor,
    index: Tensor,
    entropy_requires_grad: bool = True,
    temperature: float = 1.0,
    row_mask: Tensor | None = None,
    *,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Drop-in for TRL 1.16's ``trl.trainer.utils.selective_log_softmax_and_entropy`` (one
    pass over the logits for both outputs).

    Args:
        logits: ``(..., V)``.
        index: ``(...)``, one label per row.
        entropy_requires_grad: when False the entropy is returned detached (TRL default True).
        temperature: divides the logits (TRL default 1.0).
        row_mask: shape of ``index``; rows where it is 0 return 0 log-prob and 0 entropy.
        out_dtype: None returns TRL's dtype (see :func:`selective_log_softmax`).

    Returns:
        ``(logprobs, entropy)``, both of shape ``index.shape``, each a tensor of its own.
    """
    _trl_check("selective_log_softmax_and_entropy", logits, index, temperature)
    _checks.flag("selective_log_softmax_and_entropy", "entropy_requires_grad", entropy_requires_grad)
    if index.ndim != logits.ndim - 1:
        raise ValueError(f"selective_log_softmax_and_entropy: index must have shape {tuple(logits.shape[:-1])}, got {tuple(index.shape)}")
    dtype = _trl_out_dtype("selective_log_softmax_and_entropy", out_dtype, logits, index, row_mask)
    flat_logits, labels = _trl_rows("selective_log_softmax_and_entropy", logits, index, row_mask)
    logp, entropy = token_logprobs(flat_logits, labels, temperature=temperature,
                                   ignore_index=_MASKED_LABEL, return_entropy=True)
    logp, entropy = logp.reshape(index.shape).to(dtype), entropy.reshape(index.shape)
    if row_mask is not None:
        entropy = entropy.masked_fill(row_mask == 0, 0.0)
    entropy = entropy.to(dtype)
    return logp, entropy if entropy_requires_grad else entropy.detach()
