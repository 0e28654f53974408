"""Token log-probs and entropy straight from hidden states: the LM head fused, no [N, V] logits.

``linear_token_logprobs(hidden, weight, labels)`` returns what
``token_logprobs(hidden @ weight.T, labels)`` returns, with the math of TRL's fused LM head
(``trl.kernels.ChunkedLogProbFunction``): ``z = softcap(logit_scale * (h W^T + b)) / T``.

How (the "chunked" kernel, every device): tokens are cut into chunks of ``chunk_size`` rows;
for each chunk one GEMM writes the chunk's fp32 logits ``[chunk, V]`` into a reused buffer
and the token log-prob kernel (C++ on CPU, Triton on GPU) folds it into log-prob, entropy and
the float64 log-sum-exp in one read. Only ``[N]`` statistics are kept. The backward recomputes
each chunk's logits, turns them into d loss / d logits in place (the same kernel as
``token_logprobs``' backward) and feeds that tile into the two gradient GEMMs
(d hidden ``+= G W``, d weight ``+= G^T h``, accumulated in fp32). Extra memory: one fp32 tile
(plus, for half-precision weights on the CPU, an fp32 copy of one vocabulary block of W), so
``O(chunk * V)``, never ``O(N * V)``.

The head as trainers hold it (``linear_token_logprobs``' ``weight`` and ``lora_*`` arguments):
a LoRA adapter adds one ``[rows, r] x [r, V]`` GEMM per tile (never the merged weight, extra
memory O((N + V) r)); an FSDP2 DTensor head is computed per shard (tokens gathered) or gathered
once per call, its gradient reduced as FSDP2 reduces the module's own; DDP needs nothing; ZeRO-3
goes through TRL's gather context (``rlkern.integrations.trl``).

On CUDA the GEMMs take the inputs' dtype (bf16/fp16 tensor cores) and write fp32 (cuBLAS's
fp32 output, PyTorch >= 2.8); the gradient tile enters the backward GEMMs in that dtype as in
Liger and TRL. On the CPU every product is fp32 (bf16 inputs are widened): TRL's CPU path
rounds bf16 logits to bf16 and is off by up to 4e-2 in log-prob, rlkern by < 1e-3.
hidden and weight may differ in dtype (bf16 activations, fp32 head): both are then read in fp32.

``logits_dtype=torch.bfloat16`` (or float16) follows TRL's ``ChunkedLogProbFunction`` under
autocast (its compute dtype) instead: hidden and W are cast to that dtype, each tile is a GEMM
whose output is in that dtype (fp32 accumulation, one rounding per logit), the bias is added in
that dtype, and the tile is then read in fp32 (logit_scale, softcap, temperature, log-sum-exp);
the backward rounds d loss / d logits (logit_scale included) to that dtype before the two
gradient GEMMs, which accumulate in fp32. The tile buffer is then half-precision (half the
memory), and the CPU forward GEMM runs in bf16 (AMX / AVX512-BF16 where present); the CPU
backward GEMMs widen their (rounded) operands to fp32, as TRL's do.

``kernel="fused"`` (CUDA) runs the Triton kernel of ``kernels/linear_logprobs.py`` instead,
whose matmul tiles live inside Triton (``tl.dot``).

``deterministic=True``: every GEMM runs on a fixed block of ``_DET_ROWS`` tokens (the last one
zero-padded), so a token's outputs are bit-identical however the batch is composed or chunked
(batch invariance: the GEMM, the row kernels and the extra reductions see the same shapes
every time) and the backward accumulates tiles in a fixed order without atomics. Cost: small
GEMMs (``_DET_ROWS`` rows) and up to ``_DET_ROWS - 1`` padded rows per call; ``chunk_size``
is then ignored.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from rlkern import _backend
from rlkern.ops import _checks
from rlkern.ops import logprobs as token_ops
from rlkern.ops import vocab_parallel
from rlkern.reference import linear_logprobs as reference

EXTRA_OUTPUTS = reference.EXTRA_OUTPUTS
# Bytes of fp32 logits per chunk when chunk_size is None: on the CPU a tile that stays in the
# last-level cache between the GEMM that writes it and the kernel that reads it; on the GPU a
# tile big enough for full-speed GEMMs and small next to the 2.5-5 GB of materialized logits.
_TILE_BYTES = {"cpu": 16 << 20, "cuda": 256 << 20}
_DET_ROWS = 128  # GEMM rows of every deterministic block
_W_BLOCK_BYTES = 16 << 20  # fp32 copy of a block of a half-precision W (CPU), widened per use
# A half-precision W whose fp32 copy fits this is widened once per call instead of once per
# token chunk (and twice per chunk in the backward); bigger heads stream _W_BLOCK_BYTES blocks.
_W_COPY_BYTES = 64 << 20


def _check_linear(hidden, weight, labels, bias, temperature, logit_scale, logit_softcap,
                  extra_outputs, chunk_size, sharded=False):
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, Tensor):
            raise TypeError(f"linear_token_logprobs: {name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dtype not in _checks.FLOATS or weight.dtype not in _checks.FLOATS:
        raise TypeError(f"linear_token_logprobs: hidden and weight must be float16/bfloat16/float32/float64, got "
                        f"{hidden.dtype} and {weight.dtype}")
    if hidden.ndim not in (2, 3):
        raise ValueError(f"linear_token_logprobs: hidden must be [N, H] or [B, T, H], got shape {tuple(hidden.shape)}")
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"linear_token_logprobs: weight must be [V, H] with H = {hidden.shape[-1]} (hidden's last dim), "
                         f"got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0 and not sharded:  # a vocabulary shard may be empty (the others hold it all)
        raise ValueError("linear_token_logprobs: weight must have at least one row (V >= 1)")
    if labels.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"linear_token_logprobs: labels must be int32 or int64, got {labels.dtype}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"linear_token_logprobs: labels must have hidden's leading shape {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(labels.shape)}")
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.dtype not in _checks.FLOATS:
            raise TypeError(f"linear_token_logprobs: bias must be None or a float tensor, got {getattr(bias, 'dtype', type(bias))}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"linear_token_logprobs: bias must be [V] = ({weight.shape[0]},), got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("labels", labels), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"linear_token_logprobs: {name} is on {t.device} but hidden is on {hidden.device}")
    op = "linear_token_logprobs"
    _checks.number(op, "temperature", temperature, low=0, low_open=True)
    if _checks.number(op, "logit_scale", logit_scale) == 0:
        raise ValueError(f"linear_token_logprobs: {op}: logit_scale must be a finite non-zero number, got {logit_scale!r}")
    if logit_softcap is not None:
        _checks.number(op, "logit_softcap", logit_softcap, low=0, low_open=True)
    unknown = [name for name in extra_outputs if name not in EXTRA_OUTPUTS]
    if isinstance(extra_outputs, str) or unknown:
        raise ValueError(f"linear_token_logprobs: extra_outputs must be a tuple of names among {EXTRA_OUTPUTS}, got {extra_outputs!r}")
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"linear_token_logprobs: chunk_size must be None or an int > 0 (tokens per tile), got {chunk_size!r}")


# ---------------------------------------------------------------------------------------------
# Tiles.


def _blocks(n: int, vocab: int, device: torch.device, chunk_size: int, deterministic: bool):
    """(start, end, rows) of each token chunk; ``rows >= end - start`` is the GEMM's row count."""
    if deterministic:
        return [(s, min(s + _DET_ROWS, n), _DET_ROWS) for s in range(0, n, _DET_ROWS)]
    if chunk_size <= 0:
        budget = _TILE_BYTES["cuda" if device.type == "cuda" else "cpu"]
        chunk_size = max(16, budget // (4 * max(vocab, 1)) // 16 * 16)
    return [(s, min(s + chunk_size, n), min(s + chunk_size, n) - s) for s in range(0, n, chunk_size)]


def _rows(x: Tensor, start: int, end: int, rows: int, fill: float = 0.0) -> Tensor:
    """``x[start:end]`` padded with ``fill`` to ``rows`` rows (deterministic blocks)."""
    if end - start == rows:
        return x[start:end]
    out = x.new_full((rows, *x.shape[1:]), fill)
    out[: end - start] = x[start:end]
    return out


def _half_on_cuda(t: Tensor) -> bool:
    return t.device.type == "cuda" and t.dtype in (torch.float16, torch.bfloat16)


def _weight_blocks(weight: Tensor, bias: Tensor | None, on_cuda_half: bool):
    """Vocabulary blocks of W (and b) in the dtype the GEMM takes: W itself on CUDA (or when it
    is fp32/fp64), else fp32 copies of blocks of at most ``_W_BLOCK_BYTES``."""
    vocab, width = weight.shape
    if on_cuda_half or weight.dtype in (torch.float32, torch.float64):
        yield 0, vocab, weight, bias
        return
    step = max(1, _W_BLOCK_BYTES // (4 * max(width, 1)))
    for v0 in range(0, vocab, step):
        v1 = min(v0 + step, vocab)
        yield v0, v1, weight[v0:v1].float(), None if bias is None else bias[v0:v1]


def _logits_into(out: Tensor, h: Tensor, weight: Tensor, bias: Tensor | None, logit_scale: float) -> None:
    """``out [rows, V]`` (fp32) = logit_scale * (h W^T + b), products accumulated in fp32."""
    on_cuda_half = _half_on_cuda(h) and h.dtype == weight.dtype
    if not on_cuda_half and h.dtype != out.dtype:
        h = h.to(out.dtype)
    for v0, v1, w, b in _weight_blocks(weight, bias, on_cuda_half):
        tile = out[:, v0:v1]
        if on_cuda_half:
            torch.mm(h, w.T, out_dtype=torch.float32, out=tile)
        else:
            torch.mm(h, w.to(out.dtype).T, out=tile)
        if b is not None:
            tile.add_(b.to(out.dtype))
    if logit_scale != 1.0:
        out.mul_(logit_scale)


def _grad_products(grad_tile: Tensor, h: Tensor, weight: Tensor, grad_hidden: Tensor | None,
                   grad_weight: Tensor | None, grad_bias: Tensor | None, logit_scale: float) -> None:
    """grad_hidden += s G W, grad_weight += s G^T h, grad_bias += s sum_rows G (fp32 accumulators)."""
    on_cuda_half = _half_on_cuda(h) and h.dtype == weight.dtype
    g = grad_tile.to(h.dtype) if on_cuda_half else grad_tile
    hh = h if on_cuda_half else h.to(grad_tile.dtype)
    for v0, v1, w, _ in _weight_blocks(weight, None, on_cuda_half):
        g_block = g[:, v0:v1]
        if grad_hidden is not None:
            if on_cuda_half:
                torch.addmm(grad_hidden, g_block, w, alpha=logit_scale, out_dtype=torch.float32, out=grad_hidden)
            else:
                grad_hidden.addmm_(g_block, w.to(g.dtype), alpha=logit_scale)
        if grad_weight is not None:
            acc = grad_weight[v0:v1]
            if on_cuda_half:
                torch.addmm(acc, g_block.T, hh, alpha=logit_scale, out_dtype=torch.float32, out=acc)
            else:
                acc.addmm_(g_block.T, hh, alpha=logit_scale)
    if grad_bias is not None:
        grad_bias.add_(grad_tile.sum(0, dtype=grad_bias.dtype), alpha=logit_scale)


def _extras_of(tile: Tensor, labels: Tensor, lse: Tensor, temperature: float, softcap: float,
               ignore_index: int, want: tuple[bool, bool, bool]) -> list[Tensor | None]:
    """TRL's optional per-token outputs from one fp32 logits tile (before softcap/temperature)."""
    u = softcap * torch.tanh(tile / softcap) if softcap > 0 else tile
    u = u / temperature
    out: list[Tensor | None] = [None, None, None]
    if want[0]:  # log sum p^2 = logsumexp(2u) - 2 lse
        out[0] = (torch.logsumexp(2 * u, dim=-1).double() - 2 * lse).to(tile.dtype)
    if want[1]:
        out[1] = u.mean(-1)
    if want[2]:
        out[2] = (u.argmax(-1) == labels) & (labels != ignore_index)
    return out


# ---------------------------------------------------------------------------------------------
# The custom ops.


def _plan(hidden: Tensor, weight: Tensor, chunk_size: int, deterministic: bool, logits_dtype=None):
    """What both passes share: the accumulation dtype, the token kernels (forward, backward), the
    token blocks, the reused logits tile buffer, the dtype the GEMMs read hidden rows in, and W
    as the GEMMs take it (widened to fp32 once here when it is half precision off the tensor
    cores and small enough; see ``_W_COPY_BYTES``).

    With ``logits_dtype`` (bf16/fp16, see ``_rounded_tiles``) the buffer is of that dtype, the
    rows are read in it and W is cast to it once per call (as TRL casts each chunk of it)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    acc_dtype = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
    kernels = token_ops.kernel_fns(token_ops.FORWARD.backend_at(hidden.device, acc_dtype))
    blocks = _blocks(n, vocab, hidden.device, chunk_size, deterministic)
    rows = max((r for _, _, r in blocks), default=0)
    if logits_dtype is not None:
        buf = hidden.new_empty((rows, vocab), dtype=logits_dtype)
        return acc_dtype, kernels, blocks, buf, logits_dtype, weight.to(logits_dtype)
    buf = hidden.new_empty((rows, vocab), dtype=acc_dtype)
    on_cuda_half = _half_on_cuda(hidden) and hidden.dtype == weight.dtype
    row_dtype = hidden.dtype if on_cuda_half else acc_dtype
    if not on_cuda_half and weight.dtype not in (torch.float32, torch.float64) and 4 * weight.numel() <= _W_COPY_BYTES:
        weight = weight.float()
    return acc_dtype, kernels, blocks, buf, row_dtype, weight


# ---------------------------------------------------------------------------------------------
# Rounded tiles (logits_dtype=bf16/fp16): TRL's numerics under autocast.
#
# trl.kernels.ChunkedLogProbFunction computes in the autocast dtype (else hidden's dtype): h and
# W are cast to it, each tile is a GEMM whose output is in that dtype (products accumulated in
# fp32, the sum rounded once), the bias is added in that dtype, and only then is the tile read
# in fp32 (logit_scale, softcap, temperature, log-sum-exp). Its backward rounds d loss / d logits
# (logit_scale included) to that dtype and accumulates the two gradient GEMMs in fp32. The
# functions below reproduce those roundings on every device; the token kernels read the
# half-precision tile directly, so it is never widened unless logit_scale != 1 (the scale is
# applied to the rounded logits in fp32, where the token kernels have no scale argument).


def _rounded_logits_into(tile: Tensor, h: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """``tile`` (logits dtype) = round(round(h W^T) + round(b)); h and W already in that dtype.
    The GEMM accumulates in fp32 and writes the rounded sum (cuBLAS, oneDNN)."""
    torch.mm(h, weight.T, out=tile)
    if bias is not None:
        tile.add_(bias.to(tile.dtype))


def _scaled(tile: Tensor, wide: Tensor | None, logit_scale: float) -> Tensor:
    """The rounded tile as the token kernels read it: itself, or ``logit_scale * tile`` in fp32."""
    if logit_scale == 1.0:
        return tile
    return wide.copy_(tile).mul_(logit_scale)


def _rounded_grad_products(tile: Tensor, wide: Tensor | None, h: Tensor, weight: Tensor,
                           grad_hidden, grad_weight, grad_bias) -> None:
    """The gradient GEMMs of a rounded d loss / d logits tile (logits dtype), fp32 accumulation:
    on CUDA the half-precision operands go to the tensor cores with an fp32 output; the CPU has
    no such GEMM (``out_dtype``), so the tile and the operands are widened (exactly) to fp32."""
    if _half_on_cuda(h):
        _grad_products(tile, h, weight, grad_hidden, grad_weight, grad_bias, 1.0)
        return
    _grad_products(wide.copy_(tile), h, weight, grad_hidden, grad_weight, grad_bias, 1.0)


# ---------------------------------------------------------------------------------------------
# LoRA on the head (PEFT's lora.Linear): logits = h W^T + b + s (x A^T) B^T, x = dropout(h).
#
# The merged weight W + s B A is never formed: xa = x A^T ([N, r], r the rank) is computed once
# per pass, and each logits tile gets s * xa_rows B^T added by one [rows, r] x [r, V] GEMM. In the
# backward the tile's d loss / d logits G gives d B += s G^T xa_rows ([V, r]) and d xa_rows =
# s G B ([rows, r]); after the loop d A = d xa^T x and d x = d xa A (both O(N r H) work).


def _lora_operands(x: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float, acc_dtype, logits_dtype):
    """``(xa [N, r], B [V, r], scaling)`` as the tiles take them: in the accumulation dtype
    (fp32/fp64), or with ``logits_dtype`` in that dtype with xa rounded once (the A GEMM's output
    in that dtype, as PEFT's ``lora_A(x)`` under autocast)."""
    dtype = acc_dtype if logits_dtype is None else logits_dtype
    xa = torch.mm(x.to(dtype), lora_a.to(dtype).T)
    return xa, lora_b.to(dtype), float(scaling)


def _add_lora(tile: Tensor, lora, start: int, end: int, rows: int, logit_scale: float) -> None:
    """``tile += logit_scale * s * xa_rows B^T`` (in place, the tile's dtype)."""
    if lora is None:
        return
    xa, lora_b, scaling = lora
    tile.addmm_(_rows(xa, start, end, rows), lora_b.T, alpha=scaling * logit_scale)


def _lora_grads(grad_tile: Tensor, lora, grad_xa: Tensor | None, grad_lb: Tensor | None,
                start: int, end: int, rows: int, logit_scale: float) -> None:
    """d B += a G^T xa_rows, d xa_rows += a G B, with ``a = logit_scale * s`` (fp32/fp64)."""
    if lora is None:
        return
    xa, lora_b, scaling = lora
    alpha = scaling * logit_scale
    dtype = grad_tile.dtype
    if grad_lb is not None:
        grad_lb.addmm_(grad_tile.T, _rows(xa, start, end, rows).to(dtype), alpha=alpha)
    if grad_xa is not None:
        block = torch.mm(grad_tile, lora_b.to(dtype))
        grad_xa[start:end].add_(block[: end - start], alpha=alpha)


def _chunked_forward(hidden, weight, bias, labels, logit_scale, softcap, temperature, ignore_index,
                     with_entropy, want_extras, chunk_size, deterministic, vocab_start=-1, logits_dtype=None,
                     lora=None):
    """``lora``: None or ``(xa [N, r], B [V, r], scaling)`` from ``_lora_operands``; each tile then
    gets ``scaling * xa_rows B^T`` added before logit_scale (one [rows, r] x [r, V] GEMM)."""
    n = hidden.shape[0]
    device = hidden.device
    acc_dtype, (forward, _), blocks, buf, row_dtype, gemm_weight = _plan(
        hidden, weight, chunk_size, deterministic, logits_dtype)
    # fp32 room for the scaled rounded tile (and the extras, which TRL reads in fp32).
    wide = (torch.empty_like(buf, dtype=acc_dtype)
            if logits_dtype is not None and (logit_scale != 1.0 or any(want_extras)) else None)
    logp = torch.empty(n, dtype=acc_dtype, device=device)
    entropy = torch.empty(n if with_entropy else 0, dtype=acc_dtype, device=device)
    lse = torch.empty(n, dtype=torch.float64, device=device)
    extras = [
        torch.empty(n if want_extras[0] else 0, dtype=acc_dtype, device=device),
        torch.empty(n if want_extras[1] else 0, dtype=acc_dtype, device=device),
        torch.empty(n if want_extras[2] else 0, dtype=torch.bool, device=device),
    ]
    for start, end, rows in blocks:
        tile = buf[:rows]
        h = _rows(hidden, start, end, rows).to(row_dtype)
        if logits_dtype is None:
            _logits_into(tile, h, gemm_weight, bias, logit_scale)
            _add_lora(tile, lora, start, end, rows, logit_scale)
        else:
            _rounded_logits_into(tile, h, gemm_weight, bias)
            _add_lora(tile, lora, start, end, rows, 1.0)
            tile = _scaled(tile, None if wide is None else wide[:rows], logit_scale)
        tile_labels = _rows(labels, start, end, rows)
        c_logp, c_ent, c_lse = forward(tile, tile_labels, temperature, softcap, ignore_index, with_entropy,
                                       vocab_start=vocab_start)
        k = end - start
        logp[start:end] = c_logp[:k]
        lse[start:end] = c_lse[:k]
        if with_entropy:
            entropy[start:end] = c_ent[:k]
        if any(want_extras):
            if tile.dtype != acc_dtype:
                tile = wide[:rows].copy_(tile)
            for dst, val in zip(extras, _extras_of(tile, tile_labels, c_lse, temperature, softcap,
                                                   ignore_index, want_extras)):
                if val is not None:
                    dst[start:end] = val[:k]
    return logp, entropy, lse, *extras


def _chunked_backward(grad_logp, grad_entropy, hidden, weight, bias, labels, lse, entropy,
                      logit_scale, softcap, temperature, ignore_index, chunk_size, deterministic,
                      need_hidden, need_weight, need_bias, vocab_start=-1, logits_dtype=None,
                      lora=None, lora_needs=(False, False)):
    """``lora`` as in ``_chunked_forward``; ``lora_needs``: (d xa, d B). Returns ``(d hidden, d W,
    d b)``, and with ``lora`` also ``(d xa [N, r], d B [V, r])`` (None where not needed), all in
    the accumulation dtype."""
    vocab = weight.shape[0]
    device = hidden.device
    acc_dtype, (_, backward), blocks, buf, row_dtype, gemm_weight = _plan(
        hidden, weight, chunk_size, deterministic, logits_dtype)
    wide = None
    if logits_dtype is not None:
        on_cuda = hidden.device.type == "cuda"  # the rows and W are then half-precision CUDA tensors
        if logit_scale != 1.0 or not on_cuda:
            wide = torch.empty_like(buf, dtype=acc_dtype)
        if not on_cuda and 4 * gemm_weight.numel() <= _W_COPY_BYTES:
            # The CPU gradient GEMMs read the rounded W in fp32 (exact): widened once per call.
            product_weight = gemm_weight.float()
        else:
            product_weight = gemm_weight
    grad_hidden = torch.zeros(hidden.shape, dtype=acc_dtype, device=device) if need_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=device) if need_weight else None
    grad_bias = torch.zeros(vocab, dtype=acc_dtype, device=device) if need_bias else None
    grad_xa = grad_lb = None
    if lora is not None:
        grad_xa = torch.zeros(lora[0].shape, dtype=acc_dtype, device=device) if lora_needs[0] else None
        grad_lb = torch.zeros(lora[1].shape, dtype=acc_dtype, device=device) if lora_needs[1] else None
    grad_logp = grad_logp.to(acc_dtype).contiguous()
    grad_entropy = grad_entropy.to(acc_dtype).contiguous() if grad_entropy is not None else None
    for start, end, rows in blocks:
        tile = buf[:rows]
        h = _rows(hidden, start, end, rows).to(row_dtype)
        if logits_dtype is None:
            _logits_into(tile, h, gemm_weight, bias, logit_scale)
            _add_lora(tile, lora, start, end, rows, logit_scale)
            kernel_tile = tile
        else:
            _rounded_logits_into(tile, h, gemm_weight, bias)
            _add_lora(tile, lora, start, end, rows, 1.0)
            kernel_tile = _scaled(tile, None if wide is None else wide[:rows], logit_scale)
        # A padded row gets lse = -inf, which every backend reads as "no distribution": its
        # gradient row is exactly 0, so padding adds nothing to the products below.
        backward(
            _rows(grad_logp, start, end, rows),
            _rows(grad_entropy, start, end, rows) if grad_entropy is not None else None,
            kernel_tile, _rows(labels, start, end, rows), _rows(lse, start, end, rows, -math.inf),
            _rows(entropy, start, end, rows) if entropy is not None else None,
            temperature, softcap, ignore_index, kernel_tile, vocab_start=vocab_start,
        )
        padded = rows != end - start
        g_hidden = None
        if grad_hidden is not None:
            g_hidden = grad_hidden.new_zeros((rows, hidden.shape[1])) if padded else grad_hidden[start:end]
        if logits_dtype is None:
            _grad_products(tile, h, gemm_weight, g_hidden, grad_weight, grad_bias, logit_scale)
            _lora_grads(tile, lora, grad_xa, grad_lb, start, end, rows, logit_scale)
        else:
            if kernel_tile is not tile:  # TRL scales the fp32 gradient, then rounds it
                tile.copy_(kernel_tile.mul_(logit_scale))
            _rounded_grad_products(tile, None if wide is None else wide[:rows], h, product_weight,
                                   g_hidden, grad_weight, grad_bias)
            if lora is not None:
                # The CPU product above left the tile's fp32 copy in ``wide``; CUDA widens it here
                # (one transient fp32 tile).
                on_cpu_wide = wide is not None and hidden.device.type != "cuda"
                g32 = wide[:rows] if on_cpu_wide else tile.to(acc_dtype)
                _lora_grads(g32, lora, grad_xa, grad_lb, start, end, rows, 1.0)
        if padded and grad_hidden is not None:
            grad_hidden[start:end] = g_hidden[: end - start]
    if lora is not None:
        return grad_hidden, grad_weight, grad_bias, grad_xa, grad_lb
    return grad_hidden, grad_weight, grad_bias


def _fused_operands(hidden: Tensor, weight: Tensor, logits_dtype) -> tuple[Tensor, Tensor]:
    """hidden and W as the fused kernel takes them: in ``logits_dtype`` when it is given (TRL's
    casts to the compute dtype), else in their common dtype (the kernel needs one dtype for both;
    bf16 hidden with an fp32 head is read in fp32, as the chunked kernel reads it)."""
    if logits_dtype is None:
        common = torch.promote_types(hidden.dtype, weight.dtype)
        return hidden.to(common), weight.to(common)
    return hidden.to(logits_dtype), weight.to(logits_dtype)


def _fused_kernels():
    from rlkern.kernels import linear_logprobs as fused

    return fused


@torch.library.custom_op("rlkern::linear_token_logprobs", mutates_args=())
def _fwd(
    hidden: Tensor,  # (N, H)
    weight: Tensor,  # (V, H)
    bias: Tensor | None,  # (V,)
    labels: Tensor,  # (N,) int32/int64
    logit_scale: float,
    softcap: float,  # 0.0 = off
    temperature: float,
    ignore_index: int,
    with_entropy: bool,
    want_extras: list[bool],  # log_sum_sq_probs, mean_logits, is_top1
    chunk_size: int,  # 0 = from _TILE_BYTES
    deterministic: bool,
    kernel: str,  # "chunked" | "fused"
    logits_dtype: torch.dtype | None,  # bf16/fp16: rounded tiles (see _rounded_logits_into); None: fp32
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    token_ops.check_label_range(labels, weight.shape[0], ignore_index, op="linear_token_logprobs")
    want = tuple(bool(w) for w in want_extras)
    if kernel == "fused":
        logp, entropy, lse = _fused_kernels().linear_logprobs_forward(
            *_fused_operands(hidden, weight, logits_dtype), bias, labels, logit_scale, softcap, temperature,
            ignore_index, with_entropy, round_logits=logits_dtype is not None)
        empty = logp.new_empty(0)
        return logp, entropy, lse, empty, empty.clone(), torch.empty(0, dtype=torch.bool, device=logp.device)
    return tuple(_chunked_forward(hidden, weight, bias, labels, logit_scale, softcap, temperature,
                                  ignore_index, with_entropy, want, chunk_size, deterministic,
                                  logits_dtype=logits_dtype))


@_fwd.register_fake
def _fwd_fake(hidden, weight, bias, labels, logit_scale, softcap, temperature, ignore_index,
              with_entropy, want_extras, chunk_size, deterministic, kernel, logits_dtype):
    n = hidden.shape[0]
    dtype = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32

    def vec(on, dt=dtype):
        return hidden.new_empty(n if on else 0, dtype=dt)

    return (vec(True), vec(with_entropy), vec(True, torch.float64), vec(want_extras[0]),
            vec(want_extras[1]), vec(want_extras[2], torch.bool))


@torch.library.custom_op("rlkern::linear_token_logprobs_backward", mutates_args=())
def _bwd(
    grad_logp: Tensor,  # (N,)
    grad_entropy: Tensor | None,  # (N,)
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    lse: Tensor,  # (N,) float64
    entropy: Tensor | None,  # (N,)
    logit_scale: float,
    softcap: float,
    temperature: float,
    ignore_index: int,
    chunk_size: int,
    deterministic: bool,
    kernel: str,
    needs: list[bool],  # hidden, weight, bias
    logits_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor, Tensor]:
    if kernel == "fused":
        grads = _fused_kernels().linear_logprobs_backward(
            grad_logp, grad_entropy, *_fused_operands(hidden, weight, logits_dtype), bias, labels, lse,
            entropy, logit_scale, softcap, temperature, ignore_index, needs[0], needs[1], needs[2],
            deterministic, round_logits=logits_dtype is not None)
    else:
        grads = _chunked_backward(grad_logp, grad_entropy, hidden, weight, bias, labels, lse, entropy,
                                  logit_scale, softcap, temperature, ignore_index, chunk_size,
                                  deterministic, *needs, logits_dtype=logits_dtype)
    like = (hidden, weight, bias)
    return tuple(g.to(x.dtype) if g is not None else hidden.new_empty(0) for g, x in zip(grads, like))


@_bwd.register_fake
def _bwd_fake(grad_logp, grad_entropy, hidden, weight, bias, labels, lse, entropy, logit_scale,
              softcap, temperature, ignore_index, chunk_size, deterministic, kernel, needs, logits_dtype):
    like = (hidden, weight, bias)
    return tuple(torch.empty_like(x) if need and x is not None else hidden.new_empty(0)
                 for need, x in zip(needs, like))


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, labels, logit_scale, softcap, temperature, ignore_index, with_entropy,
     _, chunk_size, deterministic, kernel, logits_dtype) = inputs
    _, entropy, lse, *extras = output
    # A copy of the entropy: the caller may write the returned one in place (logprobs._setup_context).
    ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy.clone() if with_entropy else None)
    ctx.hyper = (logit_scale, softcap, temperature, ignore_index, chunk_size, deterministic, kernel, logits_dtype)
    ctx.with_entropy = with_entropy
    ctx.mark_non_differentiable(lse, *extras)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_logp, grad_entropy, *_):
    hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
    needs = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]),
             bias is not None and bool(ctx.needs_input_grad[2])]
    if not any(needs) or (grad_logp is None and (grad_entropy is None or not ctx.with_entropy)):
        return (None,) * 14
    if grad_logp is None:
        grad_logp = lse.new_zeros(lse.shape, dtype=torch.float32)
    g_entropy = grad_entropy if ctx.with_entropy else None
    logit_scale, softcap, temperature, ignore_index, chunk_size, deterministic, kernel, logits_dtype = ctx.hyper
    g_h, g_w, g_b = _bwd(grad_logp, g_entropy, hidden, weight, bias, labels, lse, entropy, logit_scale,
                         softcap, temperature, ignore_index, chunk_size, deterministic, kernel, needs,
                         logits_dtype)
    return (g_h if needs[0] else None, g_w if needs[1] else None, g_b if needs[2] else None,
            *(None,) * 11)


_fwd.register_autograd(_backward, setup_context=_setup_context)


class _VocabParallel(torch.autograd.Function):
    """The chunked kernel on this rank's rows of W, combined over the group (see
    ``rlkern.ops.vocab_parallel``). Forward: the two small all-reduces of the token op. Backward:
    local tiles with the global lse/entropy, then one SUM all-reduce of d hidden ``[N, H]``
    (every rank's W rows contribute to it, as in a column-parallel layer)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, hyper, with_entropy, process_group, shard):
        logit_scale, softcap, temperature, ignore_index, chunk_size, deterministic, logits_dtype = hyper
        token_ops.check_label_range(labels, shard.total, ignore_index, op="linear_token_logprobs")
        logp, entropy, lse, *_ = _chunked_forward(
            hidden, weight, bias, labels, logit_scale, softcap, temperature, ignore_index, with_entropy,
            (False, False, False), chunk_size, deterministic, vocab_start=shard.start, logits_dtype=logits_dtype)
        logp, entropy, lse = vocab_parallel.combine_forward(
            logp, entropy if with_entropy else None, lse, labels, shard, ignore_index, process_group)
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy.clone() if with_entropy else None)
        ctx.hyper, ctx.group, ctx.shard = hyper, process_group, shard
        ctx.set_materialize_grads(False)
        return logp, entropy if with_entropy else logp.new_empty(0)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        import torch.distributed as dist

        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        logit_scale, softcap, temperature, ignore_index, chunk_size, deterministic, logits_dtype = ctx.hyper
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        if entropy is None:
            grad_entropy = None
        if grad_logp is None and grad_entropy is None:
            return (None,) * 8
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse, dtype=torch.float32)
        grad_logp = vocab_parallel.shard_grad_logprobs(grad_logp, labels, ctx.shard)
        g_h, g_w, g_b = _chunked_backward(
            grad_logp, grad_entropy, hidden, weight, bias, labels, lse, entropy, logit_scale, softcap,
            temperature, ignore_index, chunk_size, deterministic, True, needs[1], needs[2],
            vocab_start=ctx.shard.start, logits_dtype=logits_dtype)
        # d hidden is needed for the all-reduce on every rank alike, whatever this rank needs.
        dist.all_reduce(g_h, op=dist.ReduceOp.SUM, group=ctx.group)
        grads = [g.to(x.dtype) if g is not None and need else None
                 for g, x, need in zip((g_h, g_w, g_b), (hidden, weight, bias), needs)]
        return (*grads, None, None, None, None, None)


class _LoraHead(torch.autograd.Function):
    """The chunked kernel with a LoRA adapter on the head (see ``_lora_operands``): eager autograd
    (saved: the inputs, lse and entropy; xa is recomputed in the backward, O(N r H))."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, lora_a, lora_b, lora_hidden, hyper, with_entropy, want):
        logit_scale, softcap, temperature, ignore_index, chunk_size, deterministic, logits_dtype, scaling = hyper
        token_ops.check_label_range(labels, weight.shape[0], ignore_index, op="linear_token_logprobs")
        acc = _acc_dtype(hidden, weight)
        x = hidden if lora_hidden is None else lora_hidden
        lora = _lora_operands(x, lora_a, lora_b, scaling, acc, logits_dtype)
        logp, entropy, lse, *extras = _chunked_forward(
            hidden, weight, bias, labels, logit_scale, softcap, temperature, ignore_index, with_entropy, want,
            chunk_size, deterministic, logits_dtype=logits_dtype, lora=lora)
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy.clone() if with_entropy else None,
                              lora_a, lora_b, lora_hidden)
        ctx.hyper = hyper
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(lse, *extras)
        return logp, entropy, lse, *extras

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, *_):
        hidden, weight, bias, labels, lse, entropy, lora_a, lora_b, lora_hidden = ctx.saved_tensors
        logit_scale, softcap, temperature, ignore_index, chunk_size, deterministic, logits_dtype, scaling = ctx.hyper
        need = ctx.needs_input_grad
        needs = (need[0], need[1], bias is not None and need[2])
        need_a, need_b, need_x = need[4], need[5], lora_hidden is not None and need[6]
        need_xa = need_a or need_x or (lora_hidden is None and need[0])
        if entropy is None:
            grad_entropy = None
        if grad_logp is None and grad_entropy is None:
            return (None,) * 10
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse, dtype=torch.float32)
        acc = _acc_dtype(hidden, weight)
        x = hidden if lora_hidden is None else lora_hidden
        lora = _lora_operands(x, lora_a, lora_b, scaling, acc, logits_dtype)
        g_h, g_w, g_b, g_xa, g_lb = _chunked_backward(
            grad_logp, grad_entropy, hidden, weight, bias, labels, lse, entropy, logit_scale, softcap,
            temperature, ignore_index, chunk_size, deterministic, *needs, logits_dtype=logits_dtype,
            lora=lora, lora_needs=(need_xa, need_b))
        g_a = g_x = None
        if need_xa:
            # The operands as the A GEMM read them (rounded to logits_dtype when it is given).
            op_dtype = acc if logits_dtype is None else logits_dtype
            if need_a:
                g_a = torch.mm(g_xa.T, x.to(op_dtype).to(acc))
            if lora_hidden is not None and need_x:
                g_x = torch.mm(g_xa, lora_a.to(op_dtype).to(acc))
            elif lora_hidden is None and need[0]:
                g_h.addmm_(g_xa, lora_a.to(op_dtype).to(acc))
        grads = [g.to(t.dtype) if g is not None and ok else None
                 for g, t, ok in zip((g_h, g_w, g_b, g_a, g_lb, g_x),
                                     (hidden, weight, bias, lora_a, lora_b, lora_hidden),
                                     (needs[0], needs[1], needs[2], need_a, need_b, need_x))]
        g_h, g_w, g_b, g_a, g_lb, g_x = grads
        return g_h, g_w, g_b, None, g_a, g_lb, g_x, None, None, None


# ---------------------------------------------------------------------------------------------
# FSDP2 (torch.distributed.fsdp.fully_shard): the head's parameters are DTensors sharded on dim 0
# over the data-parallel mesh, and every rank holds DIFFERENT tokens.


class _GatheredParameter(torch.autograd.Function):
    """A sharded DTensor parameter -> its full plain tensor, with FSDP2's gradient reduction.

    Forward: ``full_tensor()`` (an all-gather over the mesh). Backward: this rank's full gradient
    (from its own tokens) becomes a Partial(sum) DTensor redistributed to the parameter's
    placements (a reduce-scatter for Shard(0), plus an all-reduce for HSDP's Replicate dim),
    divided by the mesh size: the sum over ranks of every rank's gradient / world, i.e. the
    average FSDP2 reduce-scatters for the module's own forward by default
    (``_get_gradient_divide_factors``: ReduceOp.AVG over the data-parallel size) and what DDP's
    all-reduce gives. A plain ``full_tensor()`` differentiates to a local slice instead (no
    reduction: each rank would keep only its own batch's gradient)."""

    @staticmethod
    def forward(ctx, param):
        ctx.mesh, ctx.placements = param.device_mesh, param.placements
        return param.full_tensor()

    @staticmethod
    def backward(ctx, grad):
        from torch.distributed.tensor import DTensor, Partial

        if grad is None:
            return None
        mesh = ctx.mesh
        partial = DTensor.from_local(grad.contiguous(), mesh, [Partial("sum")] * mesh.ndim, run_check=False)
        return partial.redistribute(mesh, ctx.placements).div_(mesh.size())


# Per shard or gathered (see _fsdp_per_shard): "auto" computes per shard when the 1-D Shard(0)
# layout allows it and the gathered tokens (world * max N rows of H) are fewer than W's V rows;
# "always" / "never" force one path (the distributed tests run both).
_PER_SHARD = "auto"


class _GatherTokens(torch.autograd.Function):
    """Every rank's ``[n_r, H]`` rows, zero-padded to ``n_max``, stacked ``[world * n_max, H]``.
    Backward: this rank's rows of the incoming gradient, which the vocabulary-parallel backward
    has already SUM-all-reduced over the group (every rank's W rows contribute): no collective."""

    @staticmethod
    def forward(ctx, rows, group, rank, n_max):
        import torch.distributed as dist

        padded = rows.new_zeros((n_max, *rows.shape[1:]))
        padded[: rows.shape[0]] = rows
        parts = [torch.empty_like(padded) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, padded, group=group)
        ctx.span = (rank * n_max, rank * n_max + rows.shape[0])
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        start, end = ctx.span
        return grad[start:end].clone(), None, None, None


class _OwnRows(torch.autograd.Function):
    """This rank's rows of the gathered tokens' outputs (log-probs, entropy). Backward: every
    rank's upstream gradients are all-gathered, since the vocabulary-parallel backward needs
    the gradient of every token on every rank (it holds every token's W-shard columns)."""

    @staticmethod
    def forward(ctx, logp, entropy, group, rank, n_max, n):
        ctx.group, ctx.n_max = group, n_max
        ctx.n = n
        ctx.set_materialize_grads(True)  # every rank runs the same all_gathers
        ctx.with_entropy = entropy is not None
        start = rank * n_max
        if entropy is None:
            return logp[start:start + n].clone(), logp.new_empty(0)
        return logp[start:start + n].clone(), entropy[start:start + n].clone()

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        import torch.distributed as dist

        world = dist.get_world_size(ctx.group)
        k = 2 if ctx.with_entropy else 1
        grads = torch.zeros((k, ctx.n_max), dtype=grad_logp.dtype, device=grad_logp.device)
        grads[0, : ctx.n] = grad_logp
        if ctx.with_entropy:
            grads[1, : ctx.n] = grad_entropy
        parts = [torch.empty_like(grads) for _ in range(world)]
        dist.all_gather(parts, grads, group=ctx.group)
        full = torch.cat(parts, dim=1)
        return full[0], full[1] if ctx.with_entropy else None, None, None, None, None


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by ``scale`` (FSDP2's 1 / world)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def _per_shard_group(weight, bias, lora_a, lora_b, extra_outputs, kernel, process_group):
    """The mesh's group when the FSDP2 layout is one the vocabulary-parallel path computes per
    shard (a 1-D mesh, W (and b) Shard(0), no LoRA / extras / fused kernel), else None."""
    from torch.distributed.tensor import Shard

    if _PER_SHARD == "never" or process_group is not None or lora_a is not None or lora_b is not None:
        return None
    if extra_outputs or kernel not in (None, "chunked") or weight.device_mesh.ndim != 1:
        return None
    if tuple(weight.placements) != (Shard(0),):
        return None
    if bias is not None and (not _is_dtensor(bias) or tuple(bias.placements) != (Shard(0),)
                             or bias.device_mesh != weight.device_mesh):
        return None
    return weight.device_mesh.get_group(0)


def _fsdp_per_shard(hidden, weight, labels, bias, group, with_entropy, kwargs):
    """``linear_token_logprobs`` on an FSDP2 Shard(0) head without gathering W, or None when
    gathering W is cheaper (``_PER_SHARD``).

    Under FSDP2 rank r holds the rows ``[start_r, start_r + V_r)`` of W (a vocabulary split)
    and its OWN tokens. The tokens are all-gathered (hidden ``[world * n_max, H]``, labels),
    each rank runs the vocabulary-parallel op (``process_group``) on its W rows for every token,
    keeps its own tokens' outputs, and in the backward all-gathers the upstream gradients
    (``_OwnRows``), gets d W_r summed over every rank's tokens (FSDP2's reduce-scatter, done by
    the computation itself) scaled by 1 / world (FSDP2's average) and its rows of the
    all-reduced d hidden (``_GatherTokens``)."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    flat = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    n = flat.shape[0]
    counts = [torch.zeros(1, dtype=torch.int64, device=hidden.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([n], dtype=torch.int64, device=hidden.device), group=group)
    n_max = int(torch.cat(counts).max())  # the one host sync of the layout, as shard_layout's
    if _PER_SHARD == "auto" and world * n_max >= weight.shape[0]:
        return None
    ignore_index = kwargs.get("ignore_index", -100)
    hidden_all = _GatherTokens.apply(flat, group, rank, n_max)
    padded = flat_labels.new_full((n_max,), ignore_index)
    padded[:n] = flat_labels
    label_parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(label_parts, padded, group=group)
    w_local = _ScaleGrad.apply(weight.to_local(), 1.0 / world)
    b_local = None if bias is None else _ScaleGrad.apply(bias.to_local(), 1.0 / world)
    out = linear_token_logprobs(hidden_all, w_local, torch.cat(label_parts), bias=b_local,
                                return_entropy=with_entropy, process_group=group, **kwargs)
    logp, entropy = _OwnRows.apply(*(out if with_entropy else (out, None)), group, rank, n_max, n)
    lead = hidden.shape[:-1]
    return (token_ops.LogprobsEntropy(logp.view(lead), entropy.view(lead)) if with_entropy
            else logp.view(lead))


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without torch.distributed
        return False
    return isinstance(t, DTensor)


def _gather_dtensors(op: str, hidden, tensors: dict, process_group) -> dict:
    """Replace every FSDP2 DTensor among ``tensors`` by its gathered plain tensor (see
    ``_GatheredParameter``); hidden and labels must be plain (they are the rank's own tokens)."""
    sharded = [name for name, t in tensors.items() if _is_dtensor(t)]
    if not sharded:
        return tensors
    if _is_dtensor(hidden):
        raise TypeError(f"{op}: hidden must be a plain torch.Tensor (this rank's tokens), got a DTensor")
    if process_group is not None:
        raise ValueError(f"{op}: a DTensor {sharded[0]} (FSDP2) and process_group (vocabulary-parallel plain "
                         "shards) are two layouts: pass one")
    return {name: _GatheredParameter.apply(t) if name in sharded else t for name, t in tensors.items()}


def peft_lora_of(head, op: str):
    """The LoRA adapter a PEFT ``lora.Linear`` head applies, as ``linear_token_logprobs`` takes it.

    For code that reads ``head.weight`` to call the op (TRL's fused head, ``patch_causal_lm``):
    under PEFT that weight is the frozen base one, and the adapter would be dropped silently.
    Returns None when ``head`` carries no active adapter (not a PEFT layer, adapters disabled, or
    merged into the base weight, which is then right as it is), else ``(A [r, H], B [V, r],
    scaling, dropout)`` of the one active adapter, ``dropout`` the module PEFT applies to the A
    path's input (``lora_B(lora_A(dropout(x)))``) or None when it is inactive. Raises a
    ValueError (message starting with ``op``) for what the op cannot apply: DoRA and other LoRA
    variants, ``lora_bias``, several active adapters.
    """
    lora_a = getattr(head, "lora_A", None)
    if lora_a is None or getattr(head, "disable_adapters", False) or getattr(head, "merged", False):
        return None
    active = [name for name in head.active_adapters if name in lora_a]
    if not active:
        return None
    if len(active) > 1 or active[0] in getattr(head, "lora_variant", {}) or head.lora_B[active[0]].bias is not None:
        raise ValueError(f"{op}: the LM head carries PEFT adapters {active}: rlkern's fused head takes one plain "
                         "LoRA adapter (no DoRA or other variant, no lora_bias); merge or disable the others")
    name = active[0]
    dropout = head.lora_dropout[name]
    if isinstance(dropout, torch.nn.Identity) or not dropout.training:
        dropout = None
    return lora_a[name].weight, head.lora_B[name].weight, float(head.scaling[name]), dropout


def _acc_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_lora(lora_a, lora_b, lora_scaling, lora_hidden, hidden: Tensor, weight: Tensor, kernel, process_group):
    """None, or the validated adapter (LoRA on the head)."""
    op = "linear_token_logprobs"
    if lora_a is None and lora_b is None:
        if lora_hidden is not None:
            raise ValueError(f"{op}: lora_hidden was given without lora_A and lora_B")
        return None
    if lora_a is None or lora_b is None:
        raise ValueError(f"{op}: lora_A and lora_B go together (PEFT's lora_A / lora_B weights), got "
                         f"lora_A={'a tensor' if lora_a is not None else None}, "
                         f"lora_B={'a tensor' if lora_b is not None else None}")
    for name, t in (("lora_A", lora_a), ("lora_B", lora_b), ("lora_hidden", lora_hidden)):
        if t is None:
            continue
        if not isinstance(t, Tensor) or t.dtype not in _checks.FLOATS:
            raise TypeError(f"{op}: {name} must be a float tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.device != hidden.device:
            raise ValueError(f"{op}: {name} is on {t.device} but hidden is on {hidden.device}")
    rank = lora_a.shape[0] if lora_a.ndim == 2 else -1
    if lora_a.ndim != 2 or lora_a.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{op}: lora_A must be [r, H] with H = {hidden.shape[-1]}, got shape {tuple(lora_a.shape)}")
    if tuple(lora_b.shape) != (weight.shape[0], rank):
        raise ValueError(f"{op}: lora_B must be [V, r] = ({weight.shape[0]}, {rank}), got shape {tuple(lora_b.shape)}")
    if lora_hidden is not None and tuple(lora_hidden.shape) != tuple(hidden.shape):
        raise ValueError(f"{op}: lora_hidden must have hidden's shape {tuple(hidden.shape)}, "
                         f"got {tuple(lora_hidden.shape)}")
    _checks.number(op, "lora_scaling", lora_scaling)
    if kernel != "chunked" or process_group is not None:
        raise ValueError(f"{op}: lora_A/lora_B run on the chunked kernel without process_group, got "
                         f"kernel={kernel!r}, process_group={process_group!r}")
    return True


def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    extra_outputs: tuple[str, ...] = (),
    chunk_size: int | None = None,
    deterministic: bool = False,
    kernel: str | None = None,
    process_group=None,
    logits_dtype: torch.dtype | None = None,
    lora_A: Tensor | None = None,  # noqa: N803 (PEFT's names)
    lora_B: Tensor | None = None,  # noqa: N803
    lora_scaling: float = 1.0,
    lora_hidden: Tensor | None = None,
) -> Tensor | tuple[Tensor, ...]:
    """Log-prob of each label (and optionally the entropy) under the LM head, without logits.

    Equals ``token_logprobs(logits, labels, ...)`` for ``logits = logit_scale * (hidden @
    weight.T + bias)``, but never holds the ``[N, V]`` logits: tokens are processed in chunks
    and the backward recomputes each chunk (see the module docstring for the memory bound).

    Args:
        hidden: ``[N, H]`` or ``[B, T, H]``, float16/bfloat16/float32/float64 (float64: computed in double).
        weight: ``[V, H]``, the LM head (``lm_head.weight``, possibly tied to the embeddings).
            Its gradient is accumulated into ``weight.grad`` like any parameter's. The head as
            data-parallel engines hold it:

            - FSDP2 (``fully_shard``): ``weight`` (and ``bias``, ``lora_A``, ``lora_B``) may be
              the sharded DTensor parameter, read outside the head's own forward (as TRL's fused
              head reads it); hidden and labels are this rank's own tokens (plain tensors). The
              gradient comes back as a DTensor with the parameter's placements, equal to what
              FSDP2 gives the module's own forward: the sum over ranks of every rank's gradient
              divided by the mesh size (FSDP2's default average, and DDP's; a custom
              ``set_gradient_divide_factor`` is not followed). Two ways, chosen per call from the
              sizes (every rank decides alike), same results:

              * per shard (1-D mesh, W and b ``Shard(0)``, no LoRA, no ``extra_outputs``, and
                ``world * n_max < V``, ``n_max`` the largest rank's token count): the rank's W
                rows are a vocabulary split, so the tokens are all-gathered and the
                ``process_group`` path runs on this rank's rows; no ``[V, H]`` copy exists.
                Extra bytes per rank: the gathered hidden ``world n_max H`` (hidden's dtype, kept
                for the backward) and its fp32 gradient ``4 world n_max H`` (backward only), plus
                ``O(world n_max)`` statistics. Communication: forward all-gathers of the token
                counts, hidden and labels and the two small all-reduces of ``process_group``;
                backward an all-gather of the upstream gradients (4-8 bytes per token) and a SUM
                all-reduce of d hidden (``4 world n_max H`` bytes).
              * gathered otherwise: ``full_tensor()`` in the forward (the gathered W, W's dtype,
                ``(V - V_r) H`` extra elements per rank, kept until the backward), and in the
                backward the fp32 d W ``[V, H]`` (as the unsharded op) reduce-scattered to the
                shard: what FSDP2's own unshard of the head costs (it gathers the full W too). A plain ``weight.full_tensor()`` passed by the caller would instead keep
                only this rank's gradient (no reduction: the error of issue 17).
            - DDP: nothing to do; the op inside (or outside) the wrapped module accumulates into
              ``weight.grad`` and DDP's all-reduce averages it.
            - DeepSpeed ZeRO-3: the parameter is partitioned (numel 0 outside its module's
              forward). Gather it for the forward AND for the backward, which recomputes the
              tiles from W: TRL's recipe, ``with trl.trainer.utils.maybe_gather_lm_head_ctx(W,
              b): ...``, entered again inside a custom backward. rlkern's TRL adapter
              (``rlkern.integrations.trl.ChunkedLogProbFunction``, installed by ``patch()``)
              does exactly that, so under ZeRO-3 call the op through TRL's fused head (or that
              adapter inside the context), not directly. Needs deepspeed and GPUs: not tested in
              this repository's CPU CI.
        labels: ``hidden.shape[:-1]``, int32/int64, in ``[0, V)`` or ``ignore_index``.
        bias: ``[V]`` or None (LM heads usually have none).
        temperature: divides the (soft-capped) logits; the sampling temperature (TRL/verl).
            Default 1.0 as in TRL's ``ChunkedLogProbFunction``.
        logit_scale: multiplies ``h W^T + b`` before the softcap (Cohere's ``logit_scale``,
            Granite's ``1 / logits_scaling``; TRL's ``logit_scale``). Default 1.0.
        logit_softcap: ``c`` in ``c * tanh(x / c)`` (Gemma 2's ``final_logit_softcapping``);
            None is off.
        ignore_index: label with log-prob 0 and no log-prob gradient (HF's -100).
        return_entropy: also return the entropy of the distribution (differentiable).
        extra_outputs: names among ``("log_sum_sq_probs", "mean_logits", "is_top1")``, TRL's
            optional per-token outputs: ``log sum_j p_j^2``, the mean of the transformed logits
            ``z``, and whether the label is the first argmax of ``z`` (False at ignored labels).
            Not differentiable. Only on the chunked kernel.
        chunk_size: tokens per tile; None sizes the tile to 16 MiB of fp32 logits on the CPU and
            256 MiB on the GPU. Ignored when ``deterministic``.
        deterministic: bit-identical outputs for a token whatever the batch around it and the
            chunking; run-to-run identical gradients (no atomics). See the module docstring for
            the cost.
        kernel: ``"chunked"`` (GEMM per chunk + the token log-prob kernel; every device) or
            ``"fused"`` (Triton ``tl.dot`` kernel, GPU or TRITON_INTERPRET); None picks
            ``"chunked"``.
        logits_dtype: None (default): logits tiles in fp32 (float64 for float64 inputs), the
            more accurate choice. ``torch.bfloat16`` / ``torch.float16``: round each logits tile
            and each logits-gradient tile to that dtype as TRL's fused LM head does under
            autocast (see the module docstring), so that results match a TRL run with
            ``torch.autocast(dtype=...)`` (or with inputs of that dtype) rather than the exact
            values. hidden and weight are cast to it whatever their dtypes; the outputs stay
            float32 and the gradients take the inputs' dtypes. ``torch.float32`` (``float64``
            for float64 inputs) is the same as None; half dtypes with float64 inputs raise.
            Every kernel and process_group support it.
        process_group: a ``torch.distributed`` group over which the LM head is sharded by
            vocabulary (Megatron / verl tensor parallel): ``weight`` (and ``bias``) are this
            rank's consecutive rows ``[V_r, H]`` in rank order (uneven allowed), ``hidden`` and
            the GLOBAL ``labels`` are the same on every rank. Outputs and gradients equal the
            unsharded op's; no rank gathers logits, and a rank may hold no rows (``[0, H]``).
            Communication: one all_gather of the shard sizes, the forward's two small
            all-reduces (32 bytes per token with entropy, ``rlkern.ops.vocab_parallel``) and one
            SUM all-reduce of d hidden ``[N, H]`` in the backward (d weight and d bias stay
            local). The upstream gradients must be the same on every rank (a loss computed from
            the replicated log-probs). Runs the chunked kernel through a
            ``torch.autograd.Function`` (a group cannot be a custom-op argument: not traceable by
            ``torch.compile``); ``extra_outputs`` are not available with it.
        lora_A, lora_B: a LoRA adapter on the head, PEFT's ``lora_A[name].weight`` ``[r, H]`` and
            ``lora_B[name].weight`` ``[V, r]`` (``peft.tuners.lora.Linear``): the logits are then
            ``logit_scale * (h W^T + b + lora_scaling * (x A^T) B^T)``, computed tile by tile
            WITHOUT the merged weight: ``xa = x A^T`` ``[N, r]`` once per pass, then one
            ``[rows, r] x [r, V]`` GEMM added to each logits tile; the backward takes d B and
            d xa from each tile's d logits, then d A = d xa^T x and d x = d xa A. Gradients go to
            A, B, hidden (and x), and to W only if W requires it (PEFT freezes it: none). Extra
            memory per call: xa ``[N, r]`` and d xa ``[N, r]`` fp32, d B ``[V, r]`` fp32 and an fp32
            copy of B for half-precision B (``V r`` each), i.e. O(N r + V r); per tile nothing,
            except with a half ``logits_dtype`` on CUDA one transient fp32 copy of the tile.
            Runs the chunked kernel (``kernel="fused"`` and ``process_group`` raise) through an
            eager ``torch.autograd.Function``; every ``logits_dtype`` (with a half one, xa is
            rounded to it and the tile's adapter GEMM outputs in it, like PEFT under autocast up
            to one rounding of the sum).
        lora_scaling: PEFT's ``scaling[name]`` (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA).
            Default 1.0.
        lora_hidden: ``x``, the input of the A path, ``hidden``'s shape: PEFT applies
            ``lora_dropout`` there (``lora_B(lora_A(dropout(h)))``), so with dropout pass
            ``torch.nn.functional.dropout(hidden, p, training=True)`` (differentiable: the
            gradient reaches hidden through it). None (default): ``hidden`` itself (p = 0 or
            eval mode). To reproduce a PEFT forward's mask, seed the generator before each as
            PEFT's dropout is the first random draw of ``lora.Linear.forward``.

    Returns:
        ``logprobs`` float32 of shape ``hidden.shape[:-1]`` (never > 0; 0 at ignored labels;
        float64 when hidden or weight is float64); with ``return_entropy`` a
        ``LogprobsEntropy(logprobs, entropy)``; with ``extra_outputs`` a ``LogprobsExtras(logprobs,
        extras)`` or ``LogprobsEntropyExtras(logprobs, entropy, extras)``, ``extras`` a dict
        ``{name: tensor of shape hidden.shape[:-1]}`` (``is_top1`` bool, the others float32).
    """
    extra_outputs = tuple(extra_outputs) if not isinstance(extra_outputs, str) else extra_outputs
    deterministic = _backend.deterministic(deterministic)  # or RLKERN_DETERMINISTIC=1
    group = None
    if _is_dtensor(weight) and not _is_dtensor(hidden) and isinstance(labels, Tensor):
        group = _per_shard_group(weight, bias, lora_A, lora_B, extra_outputs, kernel, process_group)
    if group is not None:
        kwargs = dict(temperature=temperature, logit_scale=logit_scale, logit_softcap=logit_softcap,
                      ignore_index=ignore_index, chunk_size=chunk_size, deterministic=deterministic,
                      logits_dtype=logits_dtype)
        per_shard = _fsdp_per_shard(hidden, weight, labels, bias, group, bool(return_entropy), kwargs)
        if per_shard is not None:
            return per_shard
    gathered = _gather_dtensors("linear_token_logprobs", hidden,
                                dict(weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B), process_group)
    weight, bias, lora_A, lora_B = (gathered[k] for k in ("weight", "bias", "lora_A", "lora_B"))  # noqa: N806
    _check_linear(hidden, weight, labels, bias, temperature, logit_scale, logit_softcap,
                  extra_outputs, chunk_size, sharded=process_group is not None)
    ignore_index = token_ops.check_ignore_index("linear_token_logprobs", ignore_index, labels)
    kernel = _check_kernel(kernel, extra_outputs, hidden, process_group)
    logits_dtype = _check_logits_dtype(logits_dtype, hidden, weight)
    with_lora = _check_lora(lora_A, lora_B, lora_scaling, lora_hidden, hidden, weight, kernel, process_group)
    lead = hidden.shape[:-1]
    flat = hidden.reshape(-1, hidden.shape[-1])
    flat = flat if flat.stride(-1) == 1 else flat.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    softcap = float(logit_softcap) if logit_softcap is not None else 0.0
    if process_group is not None:
        shard = vocab_parallel.shard_layout(weight.shape[0], process_group, hidden.device)
        hyper = (float(logit_scale), softcap, float(temperature), int(ignore_index), int(chunk_size or 0),
                 bool(deterministic), logits_dtype)
        logp, entropy = _VocabParallel.apply(flat, weight, bias, labels.reshape(-1), hyper, bool(return_entropy),
                                             process_group, shard)
        return token_ops.LogprobsEntropy(logp.view(lead), entropy.view(lead)) if return_entropy else logp.view(lead)
    want = [name in extra_outputs for name in EXTRA_OUTPUTS]
    if with_lora:
        hyper = (float(logit_scale), softcap, float(temperature), int(ignore_index), int(chunk_size or 0),
                 bool(deterministic), logits_dtype, float(lora_scaling))
        x = None if lora_hidden is None else lora_hidden.reshape(flat.shape)
        logp, entropy, _, *extras = _LoraHead.apply(
            flat, weight, bias, labels.reshape(-1), lora_A, lora_B, x, hyper, bool(return_entropy), tuple(want))
    else:
        logp, entropy, _, *extras = _fwd(
            flat, weight, bias, labels.reshape(-1), float(logit_scale), softcap, float(temperature),
            int(ignore_index), bool(return_entropy), want, int(chunk_size or 0), bool(deterministic), kernel,
            logits_dtype)
    named = dict(zip(EXTRA_OUTPUTS, extras))
    extras = {name: named[name].view(lead) for name in extra_outputs}
    if not extra_outputs:
        return token_ops.LogprobsEntropy(logp.view(lead), entropy.view(lead)) if return_entropy else logp.view(lead)
    if return_entropy:
        return LogprobsEntropyExtras(logp.view(lead), entropy.view(lead), extras)
    return LogprobsExtras(logp.view(lead), extras)


def _check_logits_dtype(logits_dtype, hidden: Tensor, weight: Tensor) -> torch.dtype | None:
    """The dtype logits tiles are rounded to, or None for tiles in the accumulation dtype (fp32,
    fp64 for float64 inputs), which is also what passing that dtype itself means."""
    if logits_dtype is None:
        return None
    acc = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
    allowed = (torch.float64,) if acc == torch.float64 else (torch.bfloat16, torch.float16, torch.float32)
    if not isinstance(logits_dtype, torch.dtype) or logits_dtype not in allowed:
        raise ValueError(
            "linear_token_logprobs: logits_dtype must be None, torch.bfloat16, torch.float16 or torch.float32 "
            f"(None or torch.float64 for float64 hidden/weight, which compute in float64), got {logits_dtype!r} "
            f"with hidden {hidden.dtype} and weight {weight.dtype}")
    return None if logits_dtype == acc else logits_dtype


def _check_kernel(kernel, extra_outputs, hidden: Tensor, process_group) -> str:
    """The kernel a call runs ("chunked" by default) and the options it can serve."""
    op = "linear_token_logprobs"
    kernel = "chunked" if kernel is None else kernel
    _checks.choice(op, "kernel", kernel, (None, "chunked", "fused"))
    if kernel == "fused" and extra_outputs:
        raise ValueError(f"{op}: extra_outputs are computed by the chunked kernel only: pass kernel='chunked', "
                         f"got kernel='fused' with extra_outputs={extra_outputs}")
    if kernel == "fused" and not (hidden.device.type == "cuda" or _backend.triton_interpreted()):
        raise ValueError(f"{op}: kernel='fused' is a Triton kernel: it needs CUDA tensors (or TRITON_INTERPRET=1), "
                         f"got hidden on {hidden.device}")
    if process_group is not None:
        vocab_parallel.check_group(process_group, op="linear_token_logprobs")
        if extra_outputs or kernel != "chunked":
            raise ValueError(f"{op}: process_group runs the chunked kernel without extra_outputs, got "
                             f"kernel={kernel!r}, extra_outputs={extra_outputs}")
    return kernel


class LogprobsExtras(NamedTuple):
    """``linear_token_logprobs(..., extra_outputs=...)``: log-probs and ``{name: tensor}``."""

    logprobs: Tensor
    extras: dict


class LogprobsEntropyExtras(NamedTuple):
    """``linear_token_logprobs(..., return_entropy=True, extra_outputs=...)``."""

    logprobs: Tensor
    entropy: Tensor
    extras: dict
