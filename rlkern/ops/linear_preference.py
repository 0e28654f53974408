"""Preference losses straight from hidden states: the LM head fused, the gradient formed in the
forward, never ``[N, V]`` logits.

``linear_preference_loss(hidden, weight, labels, response_mask, ref_logprobs, ...)`` returns
what ``token_preference_loss(linear_token_logprobs(hidden, weight, labels), response_mask,
ref_logprobs, ...)`` returns (TRL 1.16's ``DPOTrainer`` loss of every loss type, LD-DPO, WPO,
TGDPO, CPO's simpo, ORPO), with ``z = softcap(logit_scale * (h W^T + b)) / T`` as in
``linear_token_logprobs``. The batch is TRL's concatenated one: rows ``[0, B)`` chosen, rows
``[B, 2B)`` rejected, pair i = rows i and B + i.

Why the gradient can be formed in the forward: a preference loss reads the token log-probs only
through per-sequence sums (weighted sums, plain sums, token counts, WPO's weights), so d loss /
d logprob_t is known as soon as the sums of t's pair (or of the whole batch) are. With that,
``d loss / d z = d loss / d logprob_t * (onehot(y_t) - softmax(z_t))`` (the token log-prob
kernel's backward, in place on the logits tile) goes straight into the two gradient GEMMs
(d hidden ``= G W``, d weight ``+= G^T h``). The forward returns the loss and keeps the finished
d hidden, d weight (and d bias) in the accumulation dtype (fp32; fp64 for fp64 inputs), i.e. one
extra copy of hidden's and W's sizes; the backward only multiplies them by the upstream
gradient (no GEMM, no logits).

Only completion tokens (``response_mask != 0``) are computed: prompt and padding rows never enter
a GEMM (their gradient is exactly 0), which TRL and Liger pay for in full.

Two plans (``chunking``):

* ``"pairs"``: 3 GEMMs per token. Tokens are cut into chunks of whole PAIRS (a chunk holds the
  chosen and the rejected row of each of its pairs). Per chunk: one GEMM writes the chunk's
  logits tile, the token kernel folds it into log-probs and log-sum-exp, the chunk's pairs'
  losses (``token_preference_loss`` on the chunk, autograd over the tiny per-token vector) give
  d loss / d logprob, the kernel turns the SAME tile into d logits, and the two gradient GEMMs
  consume it. Exact because every per-pair loss and its gradient depend on that pair alone and
  the batch loss is ``sum_i w_i l_i / B`` (the chunk's mean is rescaled by ``B_chunk / B``): true
  of every loss type except ``aot`` / ``aot_unpaired`` (they sort log-ratios over the whole
  batch) and ``sft`` (it divides by the total chosen length of the batch). Extra memory: one
  tile of the chunk's tokens, and a chunk holds at least one whole pair, so a pair's completion
  tokens must fit the tile budget.
* ``"global"``: 4 GEMMs per token. Pass 1 computes every completion token's log-prob chunk by
  chunk (GEMM + log-sum-exp, the ``[M]`` log-probs and float64 log-sum-exps kept); the
  sequence-level loss and d loss / d logprob follow for the whole batch; pass 2 recomputes each
  tile (the 4th GEMM) and forms d logits into the gradient GEMMs. Needed where the per-sequence
  gradient is unknown until every token of the batch is seen (aot, aot_unpaired, sft), or where
  a pair does not fit the tile budget; tiles of ``chunk_size`` tokens whatever the pairs.

``None`` (default) takes ``"pairs"`` when the loss types allow it and every pair's completion
tokens fit the tile (``chunk_size`` tokens, or by default ``_PAIR_TILE_BYTES`` of fp32 logits),
else ``"global"``. Both give the same numbers up to fp32 summation order.

Loss and metrics: after the tiles, ``token_preference_loss`` runs once more (no grad) on all the
log-probs, so the returned loss and metrics are exactly the composition's (O(M) work).

Numerics follow ``linear_token_logprobs``' chunked kernel (its helpers are reused): fp32 GEMMs
and tiles (bf16 inputs are widened on the CPU; on CUDA half inputs go to the tensor cores with
fp32 output), fp64 log-sum-exp, gradients accumulated in fp32 and cast to the inputs' dtypes.

Backends: the GEMMs are torch's (cuBLAS / the CPU BLAS); the token kernels are those of
``token_logprobs`` (C++ on the CPU, Triton on CUDA) and the sums / sequence-level kernels are
``token_preference_loss``'s, each picked by ``rlkern._backend.Kernels`` (``RLKERN_BACKEND``). No
kernel of its own. On CUDA the plan (which tokens are completion tokens, how pairs group into
tiles) is read on the host: a few syncs per call, before any GEMM (the tiles' shapes depend on
the token counts, as a varlen attention's plan does). Under ``torch.compile`` the whole op is one
custom op in the graph (``rlkern::_linear_preference_loss``, the last section of this file): the
plan and its syncs run inside it when the graph runs, never while tracing.

``deterministic=True``: every GEMM runs on fixed blocks of ``_DET_ROWS`` tokens (the last one
zero-padded) and the tiles are accumulated in a fixed order without atomics: a token's
log-prob is bit-identical however the batch is composed and chunked, and runs repeat bit for
bit. ``chunk_size`` still sets the chunk (pairs) size.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from rlkern import _backend
from rlkern.ops import _checks
from rlkern.ops import linear_logprobs as head
from rlkern.ops import logprobs as token_ops
from rlkern.ops.linear_losses import LoraTiles, register_stored_grads
from rlkern.ops.preference import kto_loss
from rlkern.ops.preference_tokens import token_preference_loss

__all__ = ["linear_kto_loss", "linear_preference_loss"]

_OP = "linear_preference_loss"
_KTO_OP = "linear_kto_loss"
# Loss types whose per-pair gradient depends on the whole batch (see the module docstring).
GLOBAL_LOSS_TYPES = ("aot", "aot_unpaired", "sft")
# Bytes of fp32 logits a pair chunk may hold when chunk_size is None: a tile of whole pairs
# (2 x 1024 completion tokens at V = 32k on the CPU; 4 x 4096 tokens at V = 152k on the GPU).
_PAIR_TILE_BYTES = {"cpu": 256 << 20, "cuda": 10 << 30}
_DET_ROWS = head._DET_ROWS


def _types(loss_type) -> list:
    return [loss_type] if isinstance(loss_type, str) else list(loss_type) if isinstance(loss_type, (list, tuple)) \
        else [loss_type]


class _Tokens:
    """The completion tokens of the batch, row by row: ``flat`` their indices in the flattened
    hidden (row-major, so each row's tokens are consecutive and in order), ``starts`` and
    ``counts`` per row (offsets into ``flat``)."""

    def __init__(self, mask_flat: Tensor, row_of: Tensor, rows: int):
        self.flat = torch.nonzero(mask_flat, as_tuple=True)[0]
        self.counts = torch.bincount(row_of[self.flat], minlength=rows)
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        self.rows = rows

    def of_rows(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """``(ids, valid)``: the indices (into ``flat``) of the tokens of ``rows``, row after row,
        and the ``[len(rows), L]`` bool layout of them (``L`` = the longest of those rows, >= 1)."""
        counts = self.counts[rows]
        width = max(int(counts.max()) if counts.numel() else 0, 1)
        pos = torch.arange(width, device=counts.device)
        valid = pos < counts[:, None]
        ids = (self.starts[rows][:, None] + pos)[valid]
        return ids, valid


def _completion_tokens(op: str, labels: Tensor, response_mask: Tensor | None, cu_seqlens: Tensor | None, rows: int,
                       vocab: int, ignore_index: int, device: torch.device) -> "_Tokens":
    """The completion tokens (``response_mask != 0``; every token when packed without a mask) of the
    padded ``[rows, T]`` or packed ``[total]`` layout, with their rows; their labels range-checked
    (masked ones are never read)."""
    device = labels.device
    total = labels.numel()
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=device, dtype=torch.long)
        row_of = torch.repeat_interleave(torch.arange(rows, device=device), cu.diff(), output_size=total)
    else:
        row_of = torch.arange(rows, device=device).repeat_interleave(labels.shape[1])
    mask_flat = (torch.ones(total, dtype=torch.bool, device=device) if response_mask is None
                 else (response_mask.reshape(-1) != 0).to(device))
    tokens = _Tokens(mask_flat, row_of, rows)
    token_ops.check_label_range(labels.reshape(-1)[tokens.flat], vocab, ignore_index, op=op)
    return tokens


def _padded(values: Tensor, valid: Tensor) -> Tensor:
    """``values`` (one per True of ``valid``, row-major) laid out as ``valid``'s shape, 0 elsewhere
    (differentiable in ``values``)."""
    return values.new_zeros(valid.shape).masked_scatter(valid, values)


class _Batch:
    """What every chunk's loss reads: the completion tokens' constants (in the ``flat`` order of
    ``_Tokens``), the per-sequence reference, the pair weights and the loss keywords."""

    def __init__(self, tokens: _Tokens, ref_tokens, ref_rows, wpo, rewards, pair_weights, kwargs):
        self.tokens, self.ref_tokens, self.ref_rows = tokens, ref_tokens, ref_rows
        self.wpo, self.rewards, self.pair_weights, self.kwargs = wpo, rewards, pair_weights, kwargs
        self.units = tokens.rows // 2  # the loss' independent units: pairs

    def rows_of(self, pairs: Tensor) -> Tensor:
        """The rows of ``pairs``: their chosen rows, then their rejected rows."""
        return torch.cat([pairs, pairs + self.units])

    def unit_counts(self) -> Tensor:
        """Completion tokens per pair."""
        return self.tokens.counts[:self.units] + self.tokens.counts[self.units:]

    def loss(self, logp: Tensor, pairs: Tensor, ids: Tensor, valid: Tensor):
        """token_preference_loss of ``pairs`` (their rows: chosen then rejected) from ``logp``, the
        log-probs of tokens ``ids`` laid out by ``valid`` (from ``_Tokens.of_rows``)."""
        n = self.tokens.rows // 2
        rows = torch.cat([pairs, pairs + n])
        if self.ref_tokens is not None:
            ref = _padded(self.ref_tokens[ids], valid)
        elif self.ref_rows is not None:
            ref = self.ref_rows[rows]
        else:
            ref = None
        extra = dict(
            wpo_adjustment=None if self.wpo is None else _padded(self.wpo[ids], valid),
            token_rewards=None if self.rewards is None else _padded(self.rewards[ids], valid),
            pair_weights=None if self.pair_weights is None else self.pair_weights[pairs])
        return token_preference_loss(_padded(logp, valid), valid, ref, **extra, **self.kwargs)


def _pair_chunks(counts: Tensor, budget: int) -> list[Tensor] | None:
    """Consecutive units (pairs; KTO's sequences) grouped so that each group's completion tokens
    (``counts`` per unit) fit ``budget`` rows; None when one unit alone does not."""
    n = counts.numel()
    per_pair = counts.tolist()
    if any(c > budget for c in per_pair):
        return None
    chunks, start, used = [], 0, 0
    for i, c in enumerate(per_pair):
        if used + c > budget and i > start:
            chunks.append(torch.arange(start, i, device=counts.device))
            start, used = i, 0
        used += c
    if start < n:
        chunks.append(torch.arange(start, n, device=counts.device))
    return chunks


class _Head:
    """The LM head as the tiles read it (linear_logprobs' chunked-kernel helpers): hidden rows
    gathered per chunk, logits tiles in the accumulation dtype, gradient accumulators."""

    def __init__(self, hidden, weight, bias, labels, tokens, logit_scale, softcap, temperature, ignore_index,
                 deterministic, needs, max_rows, logits_dtype=None, lora=None):
        self.hidden, self.bias, self.labels, self.tokens = hidden, bias, labels, tokens
        self.lora = lora  # None or a linear_losses.LoraTiles: the adapter's rows follow the tile's tokens
        self.scale, self.softcap, self.temperature, self.ignore = logit_scale, softcap, temperature, ignore_index
        self.deterministic = deterministic
        acc = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
        self.acc = acc
        self.forward_kernel, self.backward_kernel = token_ops.kernel_fns(
            token_ops.FORWARD.backend_at(hidden.device, acc))
        if deterministic:
            max_rows = -(-max_rows // _DET_ROWS) * _DET_ROWS
        # logits_dtype (bf16 / fp16): linear_logprobs' rounded tiles (its "Rounded tiles"
        # section): h and W cast to it, each tile rounded once, read in fp32 by the token kernels
        # (scaled in an fp32 copy when logit_scale != 1), d logits rounded before the gradient GEMMs
        self.rounded = logits_dtype is not None
        self.wide = None
        if self.rounded:
            self.row_dtype = logits_dtype
            self.weight = weight.to(logits_dtype)  # once per call, as TRL casts each chunk of it
            self.buf = hidden.new_empty((max_rows, weight.shape[0]), dtype=logits_dtype)
            on_cuda = hidden.device.type == "cuda"
            if logit_scale != 1.0 or not on_cuda:
                self.wide = torch.empty_like(self.buf, dtype=acc)
            small = not on_cuda and 4 * self.weight.numel() <= head._W_COPY_BYTES
            self.product_weight = self.weight.float() if small else self.weight
        else:
            on_cuda_half = head._half_on_cuda(hidden) and hidden.dtype == weight.dtype
            self.row_dtype = hidden.dtype if on_cuda_half else acc
            if (not on_cuda_half and weight.dtype not in (torch.float32, torch.float64)
                    and 4 * weight.numel() <= head._W_COPY_BYTES):
                weight = weight.float()  # widened once per call, not once per tile (as linear_logprobs)
            self.weight = weight
            self.buf = hidden.new_empty((max_rows, weight.shape[0]), dtype=acc)
        device = hidden.device
        self.grad_hidden = torch.zeros(hidden.shape, dtype=acc, device=device) if needs[0] else None
        self.grad_weight = torch.zeros(weight.shape, dtype=acc, device=device) if needs[1] else None
        self.grad_bias = (torch.zeros(weight.shape[0], dtype=acc, device=device)
                          if needs[2] and bias is not None else None)

    def _blocks(self, rows: int):
        step = _DET_ROWS if self.deterministic else max(rows, 1)
        return [(s, min(s + step, rows)) for s in range(0, rows, step)]

    def logits(self, ids: Tensor):
        """The tile of tokens ``ids`` (into ``tokens.flat``) as the token kernels read it:
        ``(tile, h, labels, flat index)`` (with ``logits_dtype``, the rounded tile or its fp32
        scaled copy; ``accumulate`` finds the rounded one in ``self.raw``)."""
        flat = self.tokens.flat[ids]
        h = self.hidden[flat].to(self.row_dtype)
        labels = self.labels[flat]
        k = flat.numel()
        if self.deterministic:  # padded rows: zero hidden, ignored label
            rows = -(-k // _DET_ROWS) * _DET_ROWS
            h = head._rows(h, 0, k, rows)
            labels = head._rows(labels, 0, k, rows, self.ignore)
        tile = self.buf[: h.shape[0]]
        xa = None
        if self.lora is not None:
            xa = self.lora.ops[0][flat]
            if xa.shape[0] != h.shape[0]:
                xa = head._rows(xa, 0, k, h.shape[0])
            self.xa_rows = xa
        if self.rounded:
            for s, e in self._blocks(h.shape[0]):
                head._rounded_logits_into(tile[s:e], h[s:e], self.weight, self.bias)
                if xa is not None:
                    self.lora.add(tile[s:e], xa[s:e], 1.0)
            self.raw = tile
            tile = head._scaled(tile, None if self.wide is None else self.wide[: h.shape[0]], self.scale)
            return tile, h, labels, flat
        for s, e in self._blocks(h.shape[0]):
            head._logits_into(tile[s:e], h[s:e], self.weight, self.bias, self.scale)
            if xa is not None:
                self.lora.add(tile[s:e], xa[s:e], self.scale)
        return tile, h, labels, flat

    def logprobs(self, tile: Tensor, labels: Tensor):
        logp, _, lse = self.forward_kernel(tile, labels, self.temperature, self.softcap, self.ignore, False)
        return logp, lse

    def accumulate(self, tile, h, labels, lse, grad_logp, flat):
        """d logits = d logprob * (onehot - softmax) in place on ``tile``, then the two GEMMs."""
        k = flat.numel()
        g = grad_logp.to(self.acc)
        if g.numel() != tile.shape[0]:
            g = head._rows(g, 0, k, tile.shape[0])
        self.backward_kernel(g.contiguous(), None, tile, labels, lse, None, self.temperature, self.softcap,
                             self.ignore, tile)
        gh = None if self.grad_hidden is None else torch.zeros((tile.shape[0], h.shape[1]), dtype=self.acc,
                                                                  device=h.device)
        if self.rounded:  # TRL rounds the scaled fp32 gradient, then the fp32-accumulated GEMMs
            raw = self.raw
            if tile is not raw:
                raw.copy_(tile.mul_(self.scale))
            wide = None if self.wide is None else self.wide[: raw.shape[0]]
            for s, e in self._blocks(raw.shape[0]):
                head._rounded_grad_products(raw[s:e], None if wide is None else wide[s:e], h[s:e],
                                            self.product_weight, None if gh is None else gh[s:e], self.grad_weight,
                                            self.grad_bias)
            if self.lora is not None:  # the CPU products left the tile's fp32 copy in wide
                on_cpu_wide = wide is not None and h.device.type != "cuda"
                self.lora.grads(wide if on_cpu_wide else raw.to(self.acc), self.xa_rows, 1.0, flat)
            if gh is not None:
                self.grad_hidden[flat] = gh[:k]
            return
        for s, e in self._blocks(tile.shape[0]):
            head._grad_products(tile[s:e], h[s:e], self.weight, None if gh is None else gh[s:e], self.grad_weight,
                                self.grad_bias, self.scale)
        if self.lora is not None:
            self.lora.grads(tile, self.xa_rows, self.scale, flat)
        if gh is not None:
            self.grad_hidden[flat] = gh[:k]


def _run(hidden, weight, bias, labels, tokens: _Tokens, batch: _Batch, hyper, needs, chunking, chunk_rows,
         logits_dtype=None, lora=None):
    """The forward: ``(loss, metrics, grads or None)``; see the module docstring."""
    logit_scale, softcap, temperature, ignore_index, deterministic = hyper
    n = batch.units
    total = tokens.flat.numel()
    unit_counts = batch.unit_counts()
    chunks = _pair_chunks(unit_counts, chunk_rows) if chunking != "global" else None
    if chunking == "pairs" and chunks is None:
        raise ValueError(f"{_OP}: chunking='pairs' needs every pair's completion tokens to fit a tile of "
                         f"{chunk_rows} tokens (chunk_size), got a pair of {int(unit_counts.max())}")
    any_grad = any(needs) or (lora is not None and lora.any_grad)
    max_rows = max(chunk_rows if chunks is None else max((int(unit_counts[c].sum()) for c in chunks), default=1),
                   1)
    max_rows = min(max_rows, max(total, 1))
    hd = _Head(hidden, weight, bias, labels, tokens, logit_scale, softcap, temperature, ignore_index,
               deterministic, needs, max_rows, logits_dtype, lora)
    logp_all = torch.zeros(total, dtype=hd.acc, device=hidden.device)
    all_pairs = torch.arange(n, device=hidden.device)
    all_ids, all_valid = tokens.of_rows(batch.rows_of(all_pairs))
    if chunks is not None:
        for pairs in chunks:
            ids, valid = tokens.of_rows(batch.rows_of(pairs))
            if ids.numel() == 0:
                continue
            tile, h, lab, flat = hd.logits(ids)
            logp, lse = hd.logprobs(tile, lab)
            k = ids.numel()
            logp_all[ids] = logp[:k]
            if not any_grad:
                continue
            leaf = logp[:k].detach().requires_grad_()
            with torch.enable_grad():
                loss, _ = batch.loss(leaf, pairs, ids, valid)
                (grad,) = torch.autograd.grad(loss * (pairs.numel() / n), leaf, allow_unused=True)
            if grad is not None:
                hd.accumulate(tile, h, lab, lse, grad, flat)
    else:
        lse_all = torch.empty(total, dtype=torch.float64, device=hidden.device)
        bounds = [(s, min(s + chunk_rows, total)) for s in range(0, total, chunk_rows)]
        for s, e in bounds:
            tile, h, lab, _ = hd.logits(torch.arange(s, e, device=hidden.device))
            logp, lse = hd.logprobs(tile, lab)
            logp_all[s:e] = logp[: e - s]
            lse_all[s:e] = lse[: e - s]
        if any_grad and total:
            leaf = logp_all.detach().requires_grad_()
            with torch.enable_grad():
                loss, _ = batch.loss(leaf[all_ids], all_pairs, all_ids, all_valid)
                (grad,) = torch.autograd.grad(loss, leaf, allow_unused=True)
            if grad is not None:
                for s, e in bounds:  # the 4th GEMM: the tile again, now with its gradient known
                    tile, h, lab, flat = hd.logits(torch.arange(s, e, device=hidden.device))
                    hd.accumulate(tile, h, lab, head._rows(lse_all, s, e, tile.shape[0], float("-inf")),
                                  grad[s:e], flat)
    with torch.no_grad():
        loss, metrics = batch.loss(logp_all[all_ids], all_pairs, all_ids, all_valid)
    grads = (hd.grad_hidden, hd.grad_weight, hd.grad_bias) if any_grad else None
    if grads is not None and lora is not None:
        grads = (*grads, *lora.finish(hd.grad_hidden))
    return loss, metrics, grads


class _LinearPreference(torch.autograd.Function):
    """Forward: the loss and the finished gradients; backward: those times the upstream gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, tokens, batch, hyper, chunking, chunk_rows, keys, grad_enabled,
                logits_dtype, lora_a=None, lora_b=None, lora_hidden=None, lora_scaling=1.0):
        # needs_input_grad is True under torch.no_grad too: the caller's grad mode decides
        need = ctx.needs_input_grad
        needs = tuple(grad_enabled and bool(x) for x in (need[0], need[1], bias is not None and need[2]))
        flat = hidden.reshape(-1, hidden.shape[-1])
        lora = None
        if lora_a is not None:
            acc = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
            lora = LoraTiles(flat, lora_a, lora_b, float(lora_scaling),
                             None if lora_hidden is None else lora_hidden.reshape(flat.shape), acc, logits_dtype,
                             (needs[0], grad_enabled and need[12], grad_enabled and need[13],
                              lora_hidden is not None and grad_enabled and need[14]))
        loss, metrics, grads = _run(flat, weight, bias, labels.reshape(-1), tokens, batch, hyper, needs, chunking,
                                    chunk_rows, logits_dtype, lora)
        ctx.like = [(t.shape, t.dtype) if t is not None else None
                    for t in (hidden, weight, bias, lora_a, lora_b, lora_hidden)]
        ctx.grads = grads
        keys.extend(metrics)
        values = [v.detach() for v in metrics.values()]
        ctx.mark_non_differentiable(*values)
        return (loss.detach(), *values)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        out = [None] * 16
        if ctx.grads is None:
            return tuple(out)
        for i, g, like in zip((0, 1, 2, 12, 13, 14), ctx.grads, ctx.like):  # hidden, W, b, lora A, B, x
            if g is not None and like is not None:
                out[i] = (g * grad_loss.to(g.dtype)).to(like[1]).view(like[0])
        return tuple(out)


def _head_params(op, hidden, weight, bias, lora_a, lora_b):
    """The head as the tiles take it: FSDP2 DTensors gathered (``linear_token_logprobs``'
    ``_GatheredParameter``: their gradients reduce-scattered back, averaged over the mesh)."""
    try:
        gathered = head._gather_dtensors(op, hidden, dict(weight=weight, bias=bias, lora_A=lora_a, lora_B=lora_b),
                                         None)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{op}: " + str(error).removeprefix(f"{op}: ")) from None
    return gathered["weight"], gathered["bias"], gathered["lora_A"], gathered["lora_B"]


def _check_lora(op, hidden, weight, lora_a, lora_b, lora_scaling, lora_hidden) -> None:
    try:
        head._check_lora(lora_a, lora_b, lora_scaling, lora_hidden, hidden, weight, "chunked", None)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{op}: " + str(error).removeprefix("linear_token_logprobs: ")) from None



def _check(hidden, weight, labels, response_mask, cu_seqlens, bias, ignore_index, chunk_size, chunking,
           temperature, logit_scale, logit_softcap, op=_OP, paired=True):
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    try:
        head._check_linear(hidden, weight, labels, bias, temperature, logit_scale, logit_softcap, (), chunk_size)
    except (TypeError, ValueError) as error:
        message = str(error).replace("linear_token_logprobs: ", "")
        raise type(error)(f"{op}: {message}") from None
    _checks.choice(op, "chunking", chunking, (None, "pairs", "global"))
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {ignore_index!r}")
    if cu_seqlens is not None:
        if hidden.ndim != 2:
            raise ValueError(f"{op}: packed input (cu_seqlens given) needs hidden [total, H], got shape "
                             f"{tuple(hidden.shape)}")
        rows = _checks.cu_seqlens(op, cu_seqlens, hidden.shape[0], hidden.device, "hidden")
    else:
        if hidden.ndim != 3:
            raise ValueError(f"{op}: hidden must be [{'2B' if paired else 'B'}, T, H] (padded, with response_mask) "
                             f"or [total, H] with cu_seqlens, got shape {tuple(hidden.shape)}")
        if response_mask is None:
            raise ValueError(f"{op}: response_mask is required for padded [{'2B' if paired else 'B'}, T, H] input "
                             "(None only with cu_seqlens), got None")
        rows = hidden.shape[0]
    if response_mask is not None:
        _checks.tensors(op, "labels", {"labels": (labels, "int"), "response_mask": (response_mask, "mask")},
                        shape={"labels": None, "response_mask": tuple(labels.shape)})
    if paired and rows % 2:
        raise ValueError(f"{op}: hidden must have 2B rows (chosen rows, then rejected rows), got {rows}")
    return rows


# Under torch.compile the whole op is one custom op in the graph (rlkern::_linear_preference_loss,
# the last section of this file): its plan and tile loop are host-side Python, and the gradient it
# forms in the forward would otherwise be traced tile by tile.
def linear_preference_loss(hidden: Tensor, weight: Tensor, labels: Tensor, response_mask: Tensor | None = None,
                           ref_logprobs: Tensor | None = None, *, cu_seqlens: Tensor | None = None,
                           bias: Tensor | None = None, temperature: float = 1.0, logit_scale: float = 1.0,
                           logit_softcap: float | None = None, ignore_index: int = -100,
                           chunk_size: int | None = None, deterministic: bool = False, chunking: str | None = None,
                           logits_dtype: torch.dtype | None = None, lora_A: Tensor | None = None,  # noqa: N803
                           lora_B: Tensor | None = None, lora_scaling: float = 1.0,  # noqa: N803
                           lora_hidden: Tensor | None = None, ld_alpha: float | None = None, wpo_adjustment: Tensor | None = None,
                           token_rewards: Tensor | None = None, tgdpo_alpha: float = 1.0, loss_type="sigmoid",
                           beta: float = 0.1, label_smoothing: float = 0.0, f_divergence_type: str = "reverse_kl",
                           f_alpha_divergence_coef: float = 1.0, discopop_tau: float = 0.05, loss_weights=None,
                           pair_weights: Tensor | None = None,
                           simpo_gamma: float = 0.5) -> tuple[Tensor, dict[str, Tensor]]:
    """TRL 1.16's DPO loss (every ``token_preference_loss`` option) from the policy's hidden
    states and LM head, the gradient formed in the forward (3 GEMMs per completion token for
    pair-local loss types, 4 for aot / aot_unpaired / sft; see the module docstring).

    Equals ``token_preference_loss(linear_token_logprobs(hidden, weight, labels, ...),
    response_mask, ref_logprobs, ...)`` with
    ``logprob_t = log softmax(softcap(logit_scale * (h_t W^T + b)) / T)[y_t]``.

    Args:
        hidden: padded ``[2B, T, H]`` (with ``response_mask``) or packed ``[total, H]`` (with
            ``cu_seqlens`` ``[2B + 1]``): the policy's last hidden states at the positions that
            predict ``labels`` (TRL's shifted layout); rows ``[0, B)`` chosen, ``[B, 2B)``
            rejected. float16/bfloat16/float32/float64.
        weight: the LM head ``[V, H]``. bias: ``[V]`` or None.
        labels: ``hidden.shape[:-1]``, int32/int64: the completion tokens; read only where
            ``response_mask`` is nonzero (prompt and padding labels may be anything).
            ``ignore_index`` there gives log-prob 0, as in ``linear_token_logprobs``.
        response_mask: ``hidden.shape[:-1]``, bool/int/float, nonzero = a completion token.
            Required when padded; None when packed: every token. Masked tokens enter no GEMM.
        ref_logprobs: None (reference-free: simpo, orpo, or the DPO types' ref-free form), token
            log-probs of the reference model (``labels``' shape), or per-sequence ``[2B]`` sums
            (TRL's ``precompute_ref_log_probs``). Constants.
        cu_seqlens: ``[2B + 1]`` int32/int64 offsets of the packed rows.
        temperature, logit_scale, logit_softcap, ignore_index: as ``linear_token_logprobs``.
        chunk_size: tokens per logits tile (``"global"``) or the most completion tokens of the
            pairs of one tile (``"pairs"``). None: 16 MiB of fp32 logits per tile on the CPU,
            256 MiB on the GPU (as linear_token_logprobs) for ``"global"``, and
            ``_PAIR_TILE_BYTES`` (256 MiB CPU, 10 GiB GPU) for ``"pairs"``.
        deterministic: fixed ``_DET_ROWS``-token GEMM blocks and a fixed accumulation order: a
            token's log-prob is batch invariant and repeated runs are bit-identical.
        logits_dtype: None (default): logits tiles in fp32 (float64 for float64 inputs);
            ``torch.bfloat16`` / ``torch.float16``: TRL's numerics under autocast, as
            ``linear_token_logprobs(logits_dtype=...)`` rounds them (h and W cast to it, each tile
            rounded once, d logits rounded before the two gradient GEMMs): the fused path of a
            bf16 / fp16 DPO step.
        lora_A, lora_B, lora_scaling, lora_hidden: a LoRA adapter on the head (PEFT's
            ``lora.Linear``), as ``linear_token_logprobs`` takes it: each tile gets
            ``logit_scale * lora_scaling * (x A^T) B^T`` added (never the merged weight), d B
            and d xa come from each tile's d logits (``rlkern.ops.linear_losses.LoraTiles``).
        FSDP2: ``weight``, ``bias``, ``lora_A``, ``lora_B`` may be ``fully_shard`` DTensors
            (hidden and labels this rank's plain tensors), gathered as ``linear_token_logprobs``
            gathers them.
        chunking: None (default: ``"pairs"`` when the loss types are pair-local and every pair
            fits the tile, else ``"global"``), ``"pairs"`` (3 GEMMs; raises for aot /
            aot_unpaired / sft and for a pair larger than the tile) or ``"global"`` (4 GEMMs).
        ld_alpha, wpo_adjustment, token_rewards, tgdpo_alpha, loss_type, beta, label_smoothing,
            f_divergence_type, f_alpha_divergence_coef, discopop_tau, loss_weights,
            pair_weights, simpo_gamma: as ``rlkern.token_preference_loss`` (token-shaped
            constants have ``labels``' shape).

    Returns:
        ``(loss, metrics)`` as ``rlkern.token_preference_loss``: ``loss`` a 0-dim float32 tensor
        (float64 for float64 inputs) differentiable w.r.t. hidden, weight and bias; ``metrics``
        detached. The forward keeps the finished gradients (hidden's, W's and b's sizes, fp32)
        until the graph is freed.
    """
    if torch.compiler.is_compiling():
        if lora_A is not None or lora_B is not None or head._is_dtensor(weight):
            return _between_graphs(**{k: v for k, v in locals().items() if k in _PARAMETERS})  # a LoRA or FSDP2
            # head: eager, between two graphs
        return _traced_linear_preference_loss(
            hidden, weight, labels, response_mask, ref_logprobs, cu_seqlens=cu_seqlens, bias=bias,
            temperature=temperature, logit_scale=logit_scale, logit_softcap=logit_softcap, ignore_index=ignore_index,
            chunk_size=chunk_size, deterministic=deterministic, chunking=chunking, ld_alpha=ld_alpha,
            logits_dtype=None if logits_dtype is None else str(logits_dtype),
            wpo_adjustment=wpo_adjustment, token_rewards=token_rewards, tgdpo_alpha=tgdpo_alpha, loss_type=loss_type,
            beta=beta, label_smoothing=label_smoothing, f_divergence_type=f_divergence_type,
            f_alpha_divergence_coef=f_alpha_divergence_coef, discopop_tau=discopop_tau, loss_weights=loss_weights,
            pair_weights=pair_weights, simpo_gamma=simpo_gamma)
    weight, bias, lora_A, lora_B = _head_params(_OP, hidden, weight, bias, lora_A, lora_B)  # noqa: N806
    rows = _check(hidden, weight, labels, response_mask, cu_seqlens, bias, ignore_index, chunk_size, chunking,
                  temperature, logit_scale, logit_softcap)
    _check_lora(_OP, hidden, weight, lora_A, lora_B, lora_scaling, lora_hidden)
    try:
        logits_dtype = head._check_logits_dtype(logits_dtype, hidden, weight)
    except ValueError as error:
        raise ValueError(f"{_OP}: " + str(error).removeprefix("linear_token_logprobs: ")) from None
    lead = tuple(labels.shape)
    named = {"wpo_adjustment": wpo_adjustment, "token_rewards": token_rewards}
    per_sequence_ref = isinstance(ref_logprobs, Tensor) and tuple(ref_logprobs.shape) != lead
    if not per_sequence_ref:
        named["ref_logprobs"] = ref_logprobs
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, Tensor) or t.dtype not in _checks.FLOATS:
            raise TypeError(f"{_OP}: {name} must be None or a float tensor, got {getattr(t, 'dtype', type(t))}")
        if t.device != hidden.device:
            raise ValueError(f"{_OP}: {name} is on {t.device} but hidden is on {hidden.device}")
        if tuple(t.shape) != lead:
            raise ValueError(f"{_OP}: {name} must have labels' shape {lead}, got {tuple(t.shape)}")
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{_OP}: {name} requires grad, but it is a constant of the loss; compute it under "
                             "torch.no_grad() or pass .detach()")
    if per_sequence_ref:
        if not ref_logprobs.dtype.is_floating_point or tuple(ref_logprobs.shape) != (rows,):
            raise ValueError(f"{_OP}: ref_logprobs must have labels' shape {lead} (token-level) or be [2B] = "
                             f"[{rows}] float (per-sequence sums), got {tuple(ref_logprobs.shape)} "
                             f"{ref_logprobs.dtype}")
        if ref_logprobs.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{_OP}: ref_logprobs requires grad, but it is a constant of the loss; compute it under "
                             "torch.no_grad() or pass .detach()")
    if chunking == "pairs" and set(_types(loss_type)) & set(GLOBAL_LOSS_TYPES):
        raise ValueError(f"{_OP}: chunking='pairs' is exact only for pair-local loss types; {GLOBAL_LOSS_TYPES} "
                         f"read the whole batch: use chunking='global' or None, got loss_type={loss_type!r}")
    device = hidden.device
    tokens = _completion_tokens(_OP, labels, response_mask, cu_seqlens, rows, weight.shape[0], ignore_index,
                                device)

    def constant(t):
        return None if t is None else t.detach().reshape(-1)[tokens.flat]

    kwargs = dict(ld_alpha=ld_alpha, tgdpo_alpha=tgdpo_alpha, loss_type=loss_type, beta=beta,
                  label_smoothing=label_smoothing, f_divergence_type=f_divergence_type,
                  f_alpha_divergence_coef=f_alpha_divergence_coef, discopop_tau=discopop_tau,
                  loss_weights=loss_weights, simpo_gamma=simpo_gamma)
    batch = _Batch(tokens, None if per_sequence_ref else constant(ref_logprobs),
                   ref_logprobs.detach() if per_sequence_ref else None, constant(wpo_adjustment),
                   constant(token_rewards), None if pair_weights is None else pair_weights.detach(), kwargs)
    if pair_weights is not None and (not isinstance(pair_weights, Tensor) or not pair_weights.dtype.is_floating_point
                                     or tuple(pair_weights.shape) != (rows // 2,)):
        raise ValueError(f"{_OP}: pair_weights must be None or a float [B] = [{rows // 2}] tensor, got "
                         f"{getattr(pair_weights, 'shape', type(pair_weights))} {getattr(pair_weights, 'dtype', '')}")
    pair_local = not set(_types(loss_type)) & set(GLOBAL_LOSS_TYPES)
    vocab = max(weight.shape[0], 1)
    budget_key = "cuda" if device.type == "cuda" else "cpu"
    if chunking == "global" or not pair_local:
        plan = "global"
        chunk_rows = chunk_size or max(16, head._TILE_BYTES[budget_key] // (4 * vocab) // 16 * 16)
    else:
        plan = chunking  # None or "pairs"
        chunk_rows = chunk_size or max(16, _PAIR_TILE_BYTES[budget_key] // (4 * vocab))
    if plan is None:
        n = rows // 2
        largest = int((tokens.counts[:n] + tokens.counts[n:]).max()) if n else 0
        if largest > chunk_rows:
            plan = "global"
            chunk_rows = chunk_size or max(16, head._TILE_BYTES[budget_key] // (4 * vocab) // 16 * 16)
    hyper = (float(logit_scale), float(logit_softcap) if logit_softcap is not None else 0.0, float(temperature),
             int(ignore_index), _backend.deterministic(deterministic))
    keys: list = []
    try:
        loss, *values = _LinearPreference.apply(hidden, weight, bias, labels, tokens, batch, hyper, plan,
                                                int(chunk_rows), keys, torch.is_grad_enabled(), logits_dtype, lora_A,
                                                lora_B, lora_hidden, float(lora_scaling))
    except (ValueError, TypeError) as error:  # the loss' checks, under this op's name
        message = str(error)
        if message.startswith("token_preference_loss: "):
            raise type(error)(f"{_OP}: " + message.removeprefix("token_preference_loss: ")) from None
        raise
    return loss, dict(zip(keys, values))


# ---------------------------------------------------------------------------------------------
# torch.compile: the whole op as one custom op (as linear_policy_loss, rlkern/ops/linear_losses.py):
# the eager op forms the loss and the gradients of hidden, weight and bias, handed out as outputs;
# the backward scales them. Hyper-parameters travel as one string made at trace time.

def _metric_keys(loss_type) -> tuple[str, ...]:
    from rlkern.ops import preference

    return preference._ALL_METRICS if "orpo" in _types(loss_type) else preference.METRIC_KEYS


@torch.library.custom_op("rlkern::_linear_preference_loss", mutates_args=())
def _linear_preference_loss_op(hidden: Tensor, weight: Tensor, labels: Tensor, response_mask: Tensor | None,
                               ref_logprobs: Tensor | None, cu_seqlens: Tensor | None, bias: Tensor | None,
                               wpo_adjustment: Tensor | None, token_rewards: Tensor | None,
                               pair_weights: Tensor | None, config: str,
                               needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    from rlkern.ops.linear_losses import _decode, _with_autograd

    kwargs = _decode(config)
    h, w = hidden.detach().requires_grad_(needs[0]), weight.detach().requires_grad_(needs[1])
    b = None if bias is None else bias.detach().requires_grad_(needs[2])
    with torch.enable_grad(), _with_autograd():
        total, metrics = linear_preference_loss(h, w, labels, response_mask, ref_logprobs, cu_seqlens=cu_seqlens,
                                                bias=b, wpo_adjustment=wpo_adjustment, token_rewards=token_rewards,
                                                pair_weights=pair_weights, **kwargs)
        wanted = [t if need and t is not None else None for t, need in zip((h, w, b), needs)]
        found = iter(torch.autograd.grad(total, [t for t in wanted if t is not None]) if any(
            t is not None for t in wanted) else ())
    grads = [next(found) if t is not None else hidden.new_empty(0) for t in wanted]
    keys = _metric_keys(kwargs["loss_type"])
    return (total.detach(), torch.stack([metrics[k].detach().float() for k in keys]), *grads)


@_linear_preference_loss_op.register_fake
def _(hidden, weight, labels, response_mask, ref_logprobs, cu_seqlens, bias, wpo_adjustment, token_rewards,
      pair_weights, config, needs):
    from rlkern.ops.linear_losses import _decode

    kwargs = _decode(config)
    dtype = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
    grads = [t.new_empty(t.shape) if need and t is not None else hidden.new_empty(0)
             for t, need in zip((hidden, weight, bias), needs)]
    return (hidden.new_empty((), dtype=dtype), hidden.new_empty(len(_metric_keys(kwargs["loss_type"])),
                                                                dtype=torch.float32), *grads)


register_stored_grads(_linear_preference_loss_op, n_inputs=12, bias_index=6)


_between_graphs = torch.compiler.disable(linear_preference_loss)
_PARAMETERS = frozenset(inspect.signature(linear_preference_loss).parameters)


def _traced_linear_preference_loss(hidden, weight, labels, response_mask, ref_logprobs, *, cu_seqlens, bias,
                                   wpo_adjustment, token_rewards, pair_weights, **kwargs):
    from rlkern.ops.linear_losses import _encode

    grad = torch.is_grad_enabled()
    needs = [grad and hidden.requires_grad, grad and weight.requires_grad,
             grad and bias is not None and bias.requires_grad]
    loss_type = kwargs["loss_type"]
    kwargs["loss_type"] = loss_type if isinstance(loss_type, str) else tuple(loss_type)
    if kwargs["loss_weights"] is not None:
        kwargs["loss_weights"] = tuple(kwargs["loss_weights"])
    total, metrics, *_ = _linear_preference_loss_op(hidden, weight, labels, response_mask, ref_logprobs, cu_seqlens,
                                                    bias, wpo_adjustment, token_rewards, pair_weights,
                                                    _encode(tuple(sorted(kwargs.items()))), needs)
    return total, dict(zip(_metric_keys(loss_type), metrics.unbind(0)))
# ------------------------------------------------------------------------------------------------
# KTO (TRL 1.16's KTOTrainer loss) from hidden states: the sibling of linear_preference_loss, as
# kto_loss is preference_loss'. Its batch is unpaired: each sequence is a unit of the tile plan.


class _KtoBatch:
    """What every chunk's KTO loss reads: the per-sequence reference sums (or the token-level
    reference log-probs), the desirable flags, the KL completions' constants and the keywords."""

    def __init__(self, tokens: _Tokens, ref_tokens, ref_rows, desirable, kl_logps, ref_kl_logps, kwargs):
        self.tokens, self.ref_tokens, self.ref_rows, self.desirable = tokens, ref_tokens, ref_rows, desirable
        self.kl_logps, self.ref_kl_logps, self.kwargs = kl_logps, ref_kl_logps, kwargs
        self.units = tokens.rows  # every sequence on its own

    def rows_of(self, rows: Tensor) -> Tensor:
        return rows

    def unit_counts(self) -> Tensor:
        return self.tokens.counts

    def loss(self, logp: Tensor, rows: Tensor, ids: Tensor, valid: Tensor):
        """kto_loss of sequences ``rows`` from the log-probs ``logp`` of their tokens ``ids`` (laid
        out by ``valid``): the per-sequence sums TRL's KTOTrainer forms, then kto_loss. Its mean is
        over ``rows``; the caller rescales a chunk's share by ``len(rows) / B``."""
        sums = _padded(logp, valid).sum(1)
        if self.ref_tokens is not None:
            ref = _padded(self.ref_tokens[ids].to(logp.dtype), valid).sum(1)
        else:
            ref = self.ref_rows[rows]
        return kto_loss(sums, ref, self.desirable[rows], self.kl_logps, self.ref_kl_logps, **self.kwargs)


def linear_kto_loss(hidden: Tensor, weight: Tensor, labels: Tensor, response_mask: Tensor | None,
                    ref_logprobs: Tensor, desirable: Tensor, kl_logps: Tensor | None = None,
                    ref_kl_logps: Tensor | None = None, *, cu_seqlens: Tensor | None = None,
                    bias: Tensor | None = None, temperature: float = 1.0, logit_scale: float = 1.0,
                    logit_softcap: float | None = None, ignore_index: int = -100, chunk_size: int | None = None,
                    deterministic: bool = False, logits_dtype: torch.dtype | None = None,
                    lora_A: Tensor | None = None, lora_B: Tensor | None = None,  # noqa: N803
                    lora_scaling: float = 1.0, lora_hidden: Tensor | None = None, loss_type: str = "kto",
                    beta: float = 0.1, desirable_weight: float = 1.0,
                    undesirable_weight: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
    """TRL 1.16's KTO loss (``rlkern.kto_loss``: ``KTOTrainer._compute_loss``) from the policy's
    hidden states and LM head, the gradient formed in the forward: 3 GEMMs per completion token,
    never ``[N, V]`` logits.

    Equals ``kto_loss(sum_t linear_token_logprobs(hidden, weight, labels, ...)[b, t] *
    response_mask[b, t], ref_logps, desirable, kl_logps, ref_kl_logps, ...)``: with
    ``logprob_t = log softmax(softcap(logit_scale * (h_t W^T + b)) / T)[y_t]``, ``x_b`` the
    sequence sums, ``r_b = x_b - ref_b`` and the reference point ``kl = clamp(mean(kl_logps -
    ref_kl_logps), min=0)`` (a detached constant),

        loss = 1/B sum_b [desirable_b] w_d (1 - sigmoid(beta (r_b - kl)))
                       + [not desirable_b] w_u (1 - sigmoid(beta (kl - r_b)))     (``"kto"``,
        KTO, arXiv 2402.01306, Eq. 7; ``"apo_zero_unpaired"``: ``1 - sigmoid(beta r_b)`` and
        ``sigmoid(beta r_b)``).

    Why 3 GEMMs: each sequence's term depends on its own sum only (``kl`` is a constant: TRL
    computes the KL completions' log-probs under no_grad), so once a chunk of WHOLE sequences has
    its log-probs, ``d loss / d logprob_t = d loss / d x_b`` is known and the logits tile turns
    into d logits in place for the two gradient GEMMs (``linear_preference_loss``' ``"pairs"``
    plan, with sequences for pairs). A sequence longer than the tile budget takes the
    ``"global"`` plan (4 GEMMs, see the module docstring).

    Args:
        hidden: padded ``[B, T, H]`` (with ``response_mask``) or packed ``[total, H]`` (with
            ``cu_seqlens`` ``[B + 1]``): the policy's last hidden states at the positions that
            predict ``labels`` (TRL's shifted layout). float16/bfloat16/float32/float64.
        weight: the LM head ``[V, H]``. bias: ``[V]`` or None.
        labels: ``hidden.shape[:-1]`` int32/int64 token ids (read only where ``response_mask``
            is nonzero; ``ignore_index`` gives log-prob 0).
        response_mask: nonzero = a completion token (None when packed: every token).
        ref_logprobs: the reference model's token log-probs (``labels``' shape) or per-sequence
            ``[B]`` sums (TRL's ``ref_logps``). Constants.
        desirable: ``[B]`` bool (or 0/1 ints): True for a desirable completion (TRL's ``label``,
            ``kto_loss``' ``labels``; named apart here, where ``labels`` are the token ids).
        kl_logps, ref_kl_logps: ``[M]`` constants, as ``kto_loss`` takes them (required with
            ``"kto"``, None with ``"apo_zero_unpaired"``; M = 0 gives kl = 0). Liger's ``kl``
            tensor is ``kl_logps=kl.reshape(1), ref_kl_logps=zeros(1)`` (for ``kl >= 0``).
        cu_seqlens, temperature, logit_scale, logit_softcap, ignore_index, chunk_size,
            deterministic, logits_dtype: as ``linear_preference_loss`` (``chunk_size``: the most
            completion tokens of the sequences of one tile).
        lora_A, lora_B, lora_scaling, lora_hidden, FSDP2 DTensor heads: as
            ``linear_preference_loss``.
        loss_type, beta, desirable_weight, undesirable_weight: as ``kto_loss`` (KTOConfig's
            names and defaults).

    Returns:
        ``(loss, metrics)`` as ``rlkern.kto_loss``: a 0-dim float32 loss (float64 for float64
        inputs) differentiable w.r.t. hidden, weight and bias; metrics ``kl``,
        ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``logps/chosen``,
        ``logps/rejected``.
    """
    if torch.compiler.is_compiling():
        if lora_A is not None or lora_B is not None or head._is_dtensor(weight):
            return _kto_between_graphs(**{k: v for k, v in locals().items() if k in _KTO_PARAMETERS})  # as above
        return _traced_linear_kto_loss(
            hidden, weight, labels, response_mask, ref_logprobs, desirable, kl_logps, ref_kl_logps,
            cu_seqlens=cu_seqlens, bias=bias, temperature=temperature, logit_scale=logit_scale,
            logit_softcap=logit_softcap, ignore_index=ignore_index, chunk_size=chunk_size, deterministic=deterministic,
            logits_dtype=None if logits_dtype is None else str(logits_dtype), loss_type=loss_type, beta=beta,
            desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
    deterministic = _backend.deterministic(deterministic)  # or RLKERN_DETERMINISTIC=1
    weight, bias, lora_A, lora_B = _head_params(_KTO_OP, hidden, weight, bias, lora_A, lora_B)  # noqa: N806
    rows = _check(hidden, weight, labels, response_mask, cu_seqlens, bias, ignore_index, chunk_size, None,
                  temperature, logit_scale, logit_softcap, op=_KTO_OP, paired=False)
    _check_lora(_KTO_OP, hidden, weight, lora_A, lora_B, lora_scaling, lora_hidden)
    try:
        logits_dtype = head._check_logits_dtype(logits_dtype, hidden, weight)
    except ValueError as error:
        raise ValueError(f"{_KTO_OP}: " + str(error).removeprefix("linear_token_logprobs: ")) from None
    lead = tuple(labels.shape)
    device = hidden.device
    if not isinstance(ref_logprobs, Tensor) or not ref_logprobs.dtype.is_floating_point:
        raise TypeError(f"{_KTO_OP}: ref_logprobs must be a float tensor (token log-probs of labels' shape or [B] "
                        f"sums), got {getattr(ref_logprobs, 'dtype', type(ref_logprobs).__name__)}")
    per_sequence_ref = tuple(ref_logprobs.shape) != lead
    if per_sequence_ref and tuple(ref_logprobs.shape) != (rows,):
        raise ValueError(f"{_KTO_OP}: ref_logprobs must have labels' shape {lead} (token-level) or be [B] = [{rows}] "
                         f"(per-sequence sums), got {tuple(ref_logprobs.shape)}")
    if ref_logprobs.device != device:
        raise ValueError(f"{_KTO_OP}: ref_logprobs is on {ref_logprobs.device} but hidden is on {device}")
    if ref_logprobs.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{_KTO_OP}: ref_logprobs requires grad, but it is a constant of the loss; compute it under "
                         "torch.no_grad() or pass .detach()")
    if not isinstance(desirable, Tensor) or tuple(desirable.shape) != (rows,) or desirable.dtype.is_floating_point \
            or desirable.is_complex():
        raise ValueError(f"{_KTO_OP}: desirable must be a [B] = [{rows}] bool (or 0/1 int) tensor, got "
                         f"{getattr(desirable, 'shape', type(desirable).__name__)} {getattr(desirable, 'dtype', '')}")
    if desirable.device != device:  # as ref_logprobs: no silent host-device copy (nor a meta tensor's)
        raise ValueError(f"{_KTO_OP}: desirable is on {desirable.device} but hidden is on {device}")
    tokens = _completion_tokens(_KTO_OP, labels, response_mask, cu_seqlens, rows, weight.shape[0], ignore_index,
                                device)
    kwargs = dict(loss_type=loss_type, beta=beta, desirable_weight=desirable_weight,
                  undesirable_weight=undesirable_weight)
    batch = _KtoBatch(tokens, None if per_sequence_ref else ref_logprobs.detach().reshape(-1)[tokens.flat],
                      ref_logprobs.detach() if per_sequence_ref else None, desirable.to(device=device, dtype=torch.bool),
                      kl_logps, ref_kl_logps, kwargs)
    try:  # kto_loss' own checks of the constants and keywords, before any GEMM (O(B) work)
        with torch.no_grad():
            probe = torch.zeros(rows, dtype=torch.float64 if torch.float64 in (hidden.dtype, weight.dtype)
                                else torch.float32, device=device)
            kto_loss(probe, probe, batch.desirable, kl_logps, ref_kl_logps, **kwargs)
    except (ValueError, TypeError) as error:
        raise type(error)(f"{_KTO_OP}: " + str(error).removeprefix("kto_loss: ")) from None
    if kl_logps is not None and kl_logps.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{_KTO_OP}: kl_logps requires grad, but it is a constant of the loss (TRL computes the KL "
                         "completions' log-probs under no_grad); pass .detach()")
    vocab = max(weight.shape[0], 1)
    budget_key = "cuda" if device.type == "cuda" else "cpu"
    plan, chunk_rows = None, chunk_size or max(16, _PAIR_TILE_BYTES[budget_key] // (4 * vocab))
    if rows and int(tokens.counts.max()) > chunk_rows:  # a sequence larger than the tile: two passes
        plan = "global"
        chunk_rows = chunk_size or max(16, head._TILE_BYTES[budget_key] // (4 * vocab) // 16 * 16)
    hyper = (float(logit_scale), float(logit_softcap) if logit_softcap is not None else 0.0, float(temperature),
             int(ignore_index), bool(deterministic))
    keys: list = []
    try:
        loss, *values = _LinearPreference.apply(hidden, weight, bias, labels, tokens, batch, hyper, plan,
                                                int(chunk_rows), keys, torch.is_grad_enabled(), logits_dtype, lora_A,
                                                lora_B, lora_hidden, float(lora_scaling))
    except (ValueError, TypeError) as error:  # kto_loss' checks, under this op's name
        message = str(error)
        if message.startswith("kto_loss: "):
            raise type(error)(f"{_KTO_OP}: " + message.removeprefix("kto_loss: ")) from None
        raise
    return loss, dict(zip(keys, values))


# torch.compile: linear_kto_loss as one custom op, as linear_preference_loss above.

@torch.library.custom_op("rlkern::_linear_kto_loss", mutates_args=())
def _linear_kto_loss_op(hidden: Tensor, weight: Tensor, labels: Tensor, response_mask: Tensor | None,
                        ref_logprobs: Tensor, desirable: Tensor, kl_logps: Tensor | None,
                        ref_kl_logps: Tensor | None, cu_seqlens: Tensor | None, bias: Tensor | None, config: str,
                        needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    from rlkern.ops.linear_losses import _decode, _with_autograd

    h, w = hidden.detach().requires_grad_(needs[0]), weight.detach().requires_grad_(needs[1])
    b = None if bias is None else bias.detach().requires_grad_(needs[2])
    with torch.enable_grad(), _with_autograd():
        total, metrics = linear_kto_loss(h, w, labels, response_mask, ref_logprobs, desirable, kl_logps, ref_kl_logps,
                                         cu_seqlens=cu_seqlens, bias=b, **_decode(config))
        wanted = [t if need and t is not None else None for t, need in zip((h, w, b), needs)]
        found = iter(torch.autograd.grad(total, [t for t in wanted if t is not None]) if any(
            t is not None for t in wanted) else ())
    grads = [next(found) if t is not None else hidden.new_empty(0) for t in wanted]
    return (total.detach(), torch.stack([metrics[k].detach().float() for k in _kto_keys()]), *grads)


def _kto_keys() -> tuple[str, ...]:
    from rlkern.ops import preference

    return preference.KTO_METRIC_KEYS


@_linear_kto_loss_op.register_fake
def _(hidden, weight, labels, response_mask, ref_logprobs, desirable, kl_logps, ref_kl_logps, cu_seqlens, bias,
      config, needs):
    dtype = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
    grads = [t.new_empty(t.shape) if need and t is not None else hidden.new_empty(0)
             for t, need in zip((hidden, weight, bias), needs)]
    return (hidden.new_empty((), dtype=dtype), hidden.new_empty(len(_kto_keys()), dtype=torch.float32), *grads)


register_stored_grads(_linear_kto_loss_op, n_inputs=12, bias_index=9)
_kto_between_graphs = torch.compiler.disable(linear_kto_loss)
_KTO_PARAMETERS = frozenset(inspect.signature(linear_kto_loss).parameters)


def _traced_linear_kto_loss(hidden, weight, labels, response_mask, ref_logprobs, desirable, kl_logps, ref_kl_logps,
                            *, cu_seqlens, bias, **kwargs):
    from rlkern.ops.linear_losses import _encode

    grad = torch.is_grad_enabled()
    needs = [grad and hidden.requires_grad, grad and weight.requires_grad,
             grad and bias is not None and bias.requires_grad]
    total, metrics, *_ = _linear_kto_loss_op(hidden, weight, labels, response_mask, ref_logprobs, desirable,
                                             kl_logps, ref_kl_logps, cu_seqlens, bias,
                                             _encode(tuple(sorted(kwargs.items()))), needs)
    return total, dict(zip(_kto_keys(), metrics.unbind(0)))
