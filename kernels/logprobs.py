"""Triton kernels for token log-probs and entropy from logits: forward and backward.

The math and its edge cases are those of ``rlkern.reference.logprobs`` (the oracle): for a row
``z [V]`` and label ``y``, ``u = softcap(z) / T``, ``logp = min(u_y - lse, 0)``, ``H = lse - sum
p u``; 0 at ignored labels, NaN at labels outside ``[0, V)`` (no host sync to raise), an all -inf
row is uniform with ``lse = -inf`` and a zero gradient.

Forward: one program per row, one pass over the vocabulary. A block of the row is loaded as
``[CHUNKS, VEC]``, one 16-byte vector per chunk, so the chunk's max and sums stay inside one
thread. Every chunk lane keeps its own online state (``m`` max, ``s = sum e^(u-m)``, ``t = sum
e^(u-m) (u-m)``) across blocks; the lanes are merged once at the end of the row. The rescale
``e^(m_old - m_new)`` is one exp per chunk, not per element, so the loop costs one exp per
element, which keeps it under the memory bound. The entropy is accumulated relative to the
running max, ``H = log s - t / s``: the naive ``lse - sum p u`` cancels catastrophically when
|logits| ~ 1e4.

Backward: one program per row, reads the row once and writes the gradient once, for both
outputs: ``dL/du = g_l [j == y] + p (-(g_l + g_H H) - g_H (u - lse))``.

Shard mode (``vocab_start >= 0``; vocabulary-parallel callers, see
``rlkern.ops.vocab_parallel``): the ``[N, V]`` logits are columns ``[vocab_start, vocab_start +
V)`` of a larger vocabulary and labels are global ids, "in shard" meaning ``0 <= y - vocab_start
< V``. The forward returns the shard's own lse and entropy, and as logp ``u_y - lse_shard`` for
in-shard labels (-inf when the shard's row is all -inf), 0 for every other label (out of shard
is normal, not NaN). The backward takes the GLOBAL lse and entropy; every row whose label is not
``ignore_index`` gets the softmax terms, the one-hot term only lands when the label is in the
shard.

Both kernels form u = z * fp32(1/T), PyTorch's own rounding of z / T, without FMA contraction:
the backward's u are the forward's bit for bit, so p at the row max is e^-log(s) up to lse's
storage rounding (see ``lse_dtype``), and the error against the float64 reference tracks
PyTorch's fp32 error.

float64 logits: the compute dtype ``CDT`` of both kernels is float64 (float32 for every other
input dtype): u = z * (1/T) in double, the exponentials by ``tl.exp`` (not ``exp2(x * log2 e)``,
whose rounded product costs |x| ulps), a double tanh (``tanh_and_sech2_f64``), float64 log-prob,
entropy and gradient. The float hyper-parameters come as float64 arguments (a Python float
would be passed as float32) and are read in CDT. Logits span the whole double range there, so
no floor keeps differences of maxima finite: the floor is -DBL_MAX (it only replaces -inf), and
the differences ``u - m`` are clamped at ``D_MIN64`` where e^d is 0 anyway (an overflow to -inf
would give 0 * -inf = NaN).

Not done (yet): a 2-D grid splitting the vocabulary when N is too small to fill the GPU (a few
rows of a huge vocab run on a few SMs only); it needs a second pass to merge the partial states.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from rlkern.kernels._common import D_MIN, D_MIN64, FLOOR, FLOOR64, exp_, f32, f32_recip, tanh_and_sech2, to_out


@triton.jit
def _label_column(labels_ptr, row, stride_label, vocab_start, V, SHARD: tl.constexpr):
    """A row's label, its column in this (shard of the) vocabulary, and whether that column is here."""
    label = tl.load(labels_ptr + row * stride_label)
    if SHARD:
        col = label.to(tl.int64) - vocab_start
    else:
        col = label
    return label, col, (col >= 0) & (col < V)


@triton.jit
def _fwd_update(u, m, s, t, WITH_ENTROPY: tl.constexpr):
    """One [CHUNKS, VEC] block of u into the per-chunk online state (m, s, t), all [CHUNKS]."""
    FP64: tl.constexpr = u.dtype == tl.float64
    if WITH_ENTROPY:
        # e * d below is 0 * -inf = NaN at u = -inf; finite u makes it 0 (e underflows). Without
        # the entropy, -inf just gives e = 0 (m starts finite). NaN survives the clamp (GPU fmax
        # would drop it) and reaches s through e either way.
        if FP64:
            u = tl.maximum(u, FLOOR64, propagate_nan=tl.PropagateNan.ALL)
        else:
            u = tl.maximum(u, FLOOR, propagate_nan=tl.PropagateNan.ALL)
    m_new = tl.maximum(m, tl.max(u, axis=1))
    dm = m - m_new
    d = u - m_new[:, None]
    if FP64:
        if WITH_ENTROPY:
            # float64 differences may overflow to -inf (module docstring); e and alpha stay 0.
            dm = tl.maximum(dm, D_MIN64, propagate_nan=tl.PropagateNan.ALL)
            d = tl.maximum(d, D_MIN64, propagate_nan=tl.PropagateNan.ALL)
    alpha = exp_(dm)  # one exp per chunk, 1 while the max holds
    e = exp_(d)
    if WITH_ENTROPY:
        # e^(u-m') (u-m') = alpha e^(u-m) ((u-m) + (m-m')): shift the old t to the new max.
        t = tl.fma(alpha, tl.fma(s, dm, t), tl.sum(e * d, axis=1))
    s = tl.fma(s, alpha, tl.sum(e, axis=1))
    return m_new, s, t


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr,  # (N, V) fp32/bf16/fp16/fp64, strides (stride_row, 1)
    labels_ptr,  # (N,) int32/int64, stride stride_label
    logp_ptr,  # (N,) fp32 (fp64 for fp64 logits), out
    entropy_ptr,  # (N,) logp's dtype, out; only written when WITH_ENTROPY
    lse_ptr,  # (N,) fp32 or fp64, out: natural-log lse of u, -inf for an all -inf row
    V,  # () vocab size
    stride_row,  # () logits.stride(0), in elements
    stride_label,  # () labels.stride(0)
    inv_temp: tl.float64,  # () fp32(1 / fp32(T)) (1 / T for fp64): u = z * inv_temp, PyTorch's z / T
    softcap: tl.float64,  # () c of c * tanh(z / c); read only when HAS_SOFTCAP
    inv_softcap: tl.float64,  # () 1 / c
    ignore_index,  # () label with logp 0
    log_vocab: tl.float64,  # () log(V): logp and entropy of an all -inf (uniform) row
    vocab_start,  # () global id of column 0; read only when SHARD
    HAS_SOFTCAP: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    SHARD: tl.constexpr,  # the columns are one shard of the vocabulary, labels are global
    CHUNKS: tl.constexpr,  # 16-byte chunks per block (power of 2)
    VEC: tl.constexpr,  # elements per chunk: 16 bytes / element size
):
    BLOCK: tl.constexpr = CHUNKS * VEC
    # The compute dtype: float64 for float64 logits, else float32 (module docstring).
    if logits_ptr.dtype.element_ty == tl.float64:
        CDT: tl.constexpr = tl.float64
        ROW_FLOOR: tl.constexpr = FLOOR64
    else:
        CDT: tl.constexpr = tl.float32
        ROW_FLOOR: tl.constexpr = FLOOR
    # float64 arguments read in CDT (exact for float32: the launcher rounded them to float32);
    # under the interpreter they are Python floats, which tl.full keeps exact.
    inv_temp = tl.full((), inv_temp, CDT)
    softcap = tl.full((), softcap, CDT)
    inv_softcap = tl.full((), inv_softcap, CDT)
    log_vocab = tl.full((), log_vocab, CDT)
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    offs = tl.arange(0, CHUNKS)[:, None] * VEC + tl.arange(0, VEC)[None, :]  # (CHUNKS, VEC)

    m = tl.full([CHUNKS], ROW_FLOOR, CDT)
    s = tl.zeros([CHUNKS], CDT)
    t = tl.zeros([CHUNKS], CDT)
    v_full = (V // BLOCK) * BLOCK
    # Full blocks without masks; the vocab tail is one masked block below (no padding copy).
    for start in range(0, v_full, BLOCK):
        z = tl.load(row_ptr + start + offs).to(CDT)
        if HAS_SOFTCAP:
            z = softcap * tanh_and_sech2(z * inv_softcap)[0]
        m, s, t = _fwd_update(z * inv_temp, m, s, t, WITH_ENTROPY)
    in_row = offs < V - v_full
    if HAS_SOFTCAP:
        # softcap(-inf) = -c: mask after the cap so lanes past V still count for nothing.
        z = tl.load(row_ptr + v_full + offs, mask=in_row, other=0.0).to(CDT)
        z = tl.where(in_row, softcap * tanh_and_sech2(z * inv_softcap)[0], float("-inf"))
    else:
        z = tl.load(row_ptr + v_full + offs, mask=in_row, other=float("-inf")).to(CDT)
    m, s, t = _fwd_update(z * inv_temp, m, s, t, WITH_ENTROPY)

    # Merge the chunk lanes once per row. Lanes that only saw -inf have m = ROW_FLOOR, w = 0 and
    # finite t + s (m - M), so they add exact zeros.
    m_row = tl.max(m, axis=0)
    dm = m - m_row
    if CDT == tl.float64:
        dm = tl.maximum(dm, D_MIN64, propagate_nan=tl.PropagateNan.ALL)  # -DBL_MAX - M may be -inf
    w = exp_(dm)
    s_sum = tl.sum(s * w, axis=0)
    # all -inf (or V = 0). A row of NaN logits has m at the floor too (max drops NaN) but a NaN s:
    # it is not dead, and its lse, log-prob and entropy come out NaN.
    dead = (m_row <= ROW_FLOOR) & (s_sum == s_sum)
    s_row = tl.where(dead, 1.0, s_sum)  # a dead row's s may be 0; not used
    log_s = tl.log(s_row)
    if lse_ptr.dtype.element_ty == tl.float64:
        # The exact sum: the backward then sees p at the max to fp32 precision, not to half an
        # ulp of |lse| (~1e-6 at |lse| ~ 30), which is what a confident label's 1 - p needs.
        lse = tl.where(dead, float("-inf"), m_row.to(tl.float64) + log_s.to(tl.float64))
    else:
        lse = tl.where(dead, float("-inf"), m_row + log_s)

    label, col, in_range = _label_column(labels_ptr, row, stride_label, vocab_start, V, SHARD)
    z_y = tl.load(row_ptr + col, mask=in_range, other=0.0).to(CDT)
    if HAS_SOFTCAP:
        z_y = softcap * tanh_and_sech2(z_y * inv_softcap)[0]
    # u_y - m is exact near the max: logp keeps its digits when |logits| ~ 1e4 and lse does
    # not; the min absorbs rounding that would make it positive.
    logp = (z_y * inv_temp - m_row) - log_s
    logp = tl.minimum(logp, 0.0, propagate_nan=tl.PropagateNan.ALL)
    if SHARD:
        # The shard's all -inf row is not the whole row: its label has probability 0 (the
        # combine step handles a row that is -inf in every shard).
        logp = tl.where(dead, float("-inf"), logp)
        logp = tl.where(in_range, logp, 0.0)
    else:
        logp = tl.where(dead, -log_vocab, logp)
        logp = tl.where(in_range, logp, float("nan"))
    logp = tl.where(label == ignore_index, 0.0, logp)
    tl.store(logp_ptr + row, logp)
    tl.store(lse_ptr + row, lse)
    if WITH_ENTROPY:
        t_row = tl.sum(w * (t + s * dm), axis=0)
        entropy = log_s - t_row / s_row
        entropy = tl.where(dead, log_vocab, entropy)
        entropy = tl.where(entropy < 0.0, 0.0, entropy)  # rounding on peaked rows; NaN stays NaN
        tl.store(entropy_ptr + row, entropy)


@triton.jit
def _bwd_block(
    block_ptr, grad_block_ptr, offs, in_row, label, lse_eff, lse_lo, g_label, a, b, inv_temp,
    softcap, inv_softcap, HAS_SOFTCAP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
    ROUND_BF16: tl.constexpr, MASKED: tl.constexpr, CDT: tl.constexpr,
):
    """One block of the row; pointers and label are relative to the block start, so the
    per-element work is the arange compare alone (no per-element index add)."""
    if MASKED:
        # -inf past V: p = 0 there (0 could exceed lse and overflow e^(u - lse); not stored).
        z = tl.load(block_ptr + offs, mask=in_row, other=float("-inf")).to(CDT)
    else:
        z = tl.load(block_ptr + offs).to(CDT)
    if HAS_SOFTCAP:
        th, sech2 = tanh_and_sech2(z * inv_softcap)
        z = softcap * th
    d = (z * inv_temp - lse_eff) - lse_lo  # u - lse; exact near the max
    if CDT == tl.float64:
        d = tl.maximum(d, D_MIN64, propagate_nan=tl.PropagateNan.ALL)
    else:
        d = tl.maximum(d, D_MIN, propagate_nan=tl.PropagateNan.ALL)
    p = exp_(d)
    if HAS_GRAD_ENTROPY:
        g = p * tl.fma(b, d, a)
    else:
        g = p * a
    g = tl.where(offs == label, g + g_label, g)
    if HAS_SOFTCAP:
        g = g * sech2
    g = to_out(g, grad_block_ptr.dtype.element_ty, ROUND_BF16)
    if MASKED:
        tl.store(grad_block_ptr + offs, g, mask=in_row)
    else:
        tl.store(grad_block_ptr + offs, g)


@triton.jit
def _logprobs_bwd_kernel(
    grad_logp_ptr,  # (N,) float, stride stride_gl
    grad_entropy_ptr,  # (N,) float, stride stride_ge; read only when HAS_GRAD_ENTROPY
    logits_ptr,  # (N, V) fp32/bf16/fp16/fp64, strides (stride_row, 1)
    labels_ptr,  # (N,) int32/int64, stride stride_label
    lse_ptr,  # (N,) fp32 or fp64 from the forward, stride stride_lse
    entropy_ptr,  # (N,) fp32 (fp64 for fp64 logits) from the forward, stride stride_ent; only with HAS_GRAD_ENTROPY
    grad_logits_ptr,  # (N, V) logits' dtype, strides (stride_grad_row, 1); may alias logits
    V,  # () vocab size
    stride_row,  # () logits.stride(0)
    stride_grad_row,  # () grad_logits.stride(0)
    stride_label,  # () labels.stride(0)
    stride_gl,  # () grad_logprobs.stride(0) (0 for an expanded scalar grad)
    stride_ge,  # () grad_entropy.stride(0)
    stride_lse,  # () lse.stride(0)
    stride_ent,  # () entropy.stride(0)
    inv_temp: tl.float64,  # () fp32(1 / fp32(T)) (1 / T for fp64 logits)
    softcap: tl.float64,  # () c; read only when HAS_SOFTCAP
    inv_softcap: tl.float64,  # () 1 / c
    ignore_index,  # () label with no gradient
    vocab_start,  # () global id of column 0; read only when SHARD
    HAS_SOFTCAP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    SHARD: tl.constexpr,  # lse / entropy are the whole row's, labels global
    ROUND_BF16: tl.constexpr,  # round fp32 -> bf16 by hand (the interpreter truncates)
    BLOCK: tl.constexpr,
):
    if logits_ptr.dtype.element_ty == tl.float64:
        CDT: tl.constexpr = tl.float64
    else:
        CDT: tl.constexpr = tl.float32
    inv_temp = tl.full((), inv_temp, CDT)
    softcap = tl.full((), softcap, CDT)
    inv_softcap = tl.full((), inv_softcap, CDT)
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    grad_row_ptr = grad_logits_ptr + row * stride_grad_row
    lse = tl.load(lse_ptr + row * stride_lse)
    dead = lse == float("-inf")
    if CDT == tl.float64:
        # u - lse in float64 directly: no split needed.
        lse_hi = lse.to(tl.float64)
        lse_lo = 0.0
    elif lse_ptr.dtype.element_ty == tl.float64:
        # hi + lo in fp32: u - hi is exact near the max, lo then adds the digits fp32 drops.
        lse = tl.where(dead, 0.0, lse)
        lse_hi = lse.to(tl.float32)
        lse_lo = (lse - lse_hi.to(tl.float64)).to(tl.float32)
    else:
        lse_hi = lse
        lse_lo = 0.0
    # lse = +inf makes p exactly 0 in a dead row, whatever its logits.
    lse_eff = tl.where(dead, float("inf"), lse_hi)
    label, col, in_range = _label_column(labels_ptr, row, stride_label, vocab_start, V, SHARD)
    # here: the one-hot term lands in this row; live: the softmax terms apply (in shard mode
    # every non-ignored row, wherever its label lives).
    here = (label != ignore_index) & in_range & (~dead)
    if SHARD:
        live = (label != ignore_index) & (~dead)
    else:
        live = here
    # int32 for the per-element compare; g_label is 0 unless here, so -1 never matters.
    label = tl.where(in_range, col, -1).to(tl.int32)
    g_l = tl.load(grad_logp_ptr + row * stride_gl).to(CDT)
    g_l = tl.where(live, g_l, 0.0)
    # dL/dz = [j == y] g_l / T + p (a + b (u - lse)), the 1/T folded into the row scalars.
    g_soft = g_l * inv_temp
    g_label = tl.where(here, g_soft, 0.0)
    if HAS_GRAD_ENTROPY:
        g_h = tl.load(grad_entropy_ptr + row * stride_ge).to(CDT)
        g_h = tl.where(dead, 0.0, g_h)
        entropy = tl.load(entropy_ptr + row * stride_ent).to(CDT)
        a = -(g_l + g_h * entropy) * inv_temp
        b = -g_h * inv_temp
    else:
        a = -g_soft
        b = 0.0

    offs = tl.arange(0, BLOCK)
    v_full = (V // BLOCK) * BLOCK
    # Each element is loaded before it is stored by the same program and no other program
    # touches the row, so grad_logits may be the logits buffer itself.
    for start in range(0, v_full, BLOCK):
        _bwd_block(row_ptr + start, grad_row_ptr + start, offs, None, label - start, lse_eff,
                   lse_lo, g_label, a, b, inv_temp, softcap, inv_softcap, HAS_SOFTCAP,
                   HAS_GRAD_ENTROPY, ROUND_BF16, False, CDT)
    _bwd_block(row_ptr + v_full, grad_row_ptr + v_full, offs, offs < V - v_full, label - v_full,
               lse_eff, lse_lo, g_label, a, b, inv_temp, softcap, inv_softcap, HAS_SOFTCAP,
               HAS_GRAD_ENTROPY, ROUND_BF16, True, CDT)


# Both kernels launch with enable_fp_fusion=False: a mul-add contracted into an FMA skips the
# rounding of u = z * (1/T), and the backward's u must be the forward's u bit for bit (p at
# the max is then exactly e^-log(s); with V = 1 exactly 1). It also makes the GPU round as the
# interpreter does, so the CPU tests check the GPU's arithmetic. Wanted FMAs are explicit.


def _config(vocab: int, element_size: int) -> tuple[int, int, int]:
    """(CHUNKS, VEC, num_warps) for a row of ``vocab`` elements; a pure function of V and dtype.

    VEC = 16 bytes / element: one vector load per chunk, and the chunk reductions stay in one
    thread. A block is 16 KB of logits (8192 bf16/fp16, 4096 fp32): enough bytes in flight
    per program that a couple of resident programs per SM cover HBM latency, and the masked
    tail block wastes at most one block of work per row. 16 warps give each thread two 16-byte
    loads per iteration; small vocabularies get fewer warps so threads are not idle.
    """
    vec = max(1, 16 // element_size)
    block = min(max(triton.next_power_of_2(vocab), vec), 16384 // element_size)
    chunks = block // vec
    num_warps = max(1, min(16, chunks // 64))
    return chunks, vec, num_warps


def _scalars(temperature: float, softcap: float, fp64: bool) -> tuple[float, float, float]:
    """(inv_temp, softcap, inv_softcap) as the kernels take them (0 for an absent softcap):
    float32 values for float32 compute (see ``f32_recip``), float64 ones for float64 logits."""
    if softcap <= 0:
        cap, inv_cap = 0.0, 0.0
    else:
        cap, inv_cap = (softcap, 1.0 / softcap) if fp64 else (f32(softcap), f32_recip(softcap))
    return (1.0 / temperature if fp64 else f32_recip(temperature)), cap, inv_cap


def _check(logits: torch.Tensor, labels: torch.Tensor) -> None:
    # Shape/layout checks only: they read metadata, never device memory (no host sync).
    if logits.ndim != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(f"logits must be float32/bfloat16/float16/float64, got {logits.dtype}")
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        raise ValueError("logits must have a contiguous last dim")
    if labels.shape != logits.shape[:1] or labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"labels must be int32/int64 of shape {tuple(logits.shape[:1])}")


def _check_vocab_start(vocab_start: int) -> None:
    if not isinstance(vocab_start, int) or vocab_start < -1:
        raise ValueError(f"vocab_start must be -1 (not sharded) or an int >= 0, got {vocab_start!r}")


def logprobs_forward(
    logits: torch.Tensor,  # (N, V) fp32/bf16/fp16/fp64, stride(1) == 1, any stride(0)
    labels: torch.Tensor,  # (N,) int32/int64
    temperature: float,
    softcap: float,  # <= 0: off
    ignore_index: int,
    with_entropy: bool,
    lse_dtype: torch.dtype = torch.float64,
    vocab_start: int = -1,  # -1: logits are the whole vocabulary; >= 0: shard mode
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(logprobs [N], entropy [N] or [0], lse [N])`` on logits.device: float32
    outputs (float64 for float64 logits, computed in float64) and a float64 lse (rlkern's
    convention on every backend). With ``vocab_start >= 0`` they are the shard's partial
    statistics (module docstring).

    The float64 lse is stored unrounded (u_max + log s exactly): with it the fp32 backward is as
    precise as PyTorch's at confident labels; ``lse_dtype=torch.float32`` halves that [N] vector
    but bounds the error of p there by half an ulp of |lse| (2e-6 relative at |lse| = 32).
    """
    _check(logits, labels)
    _check_vocab_start(vocab_start)
    if lse_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"lse_dtype must be float32 or float64, got {lse_dtype}")
    n, vocab = logits.shape
    device = logits.device
    fp64 = logits.dtype == torch.float64
    out_dtype = torch.float64 if fp64 else torch.float32
    logp = torch.empty(n, dtype=out_dtype, device=device)
    entropy = torch.empty(n if with_entropy else 0, dtype=out_dtype, device=device)
    lse = torch.empty(n, dtype=lse_dtype, device=device)
    if n == 0:
        return logp, entropy, lse
    if vocab == 0:
        # The reference's limits, filled on device (no launch, no sync): every label is out of
        # range, so NaN unless ignored (0 in shard mode: another shard holds it); the empty sum
        # gives lse = -inf and H = log 1 = 0.
        logp.copy_(torch.where(labels == ignore_index, 0.0, math.nan if vocab_start < 0 else 0.0))
        lse.fill_(-math.inf)
        entropy.fill_(0.0)
        return logp, entropy, lse
    chunks, vec, num_warps = _config(vocab, logits.element_size())
    has_softcap = softcap > 0
    _logprobs_fwd_kernel[(n,)](
        logits, labels, logp, entropy if with_entropy else lse, lse,
        vocab, logits.stride(0), labels.stride(0),
        *_scalars(temperature, softcap, fp64),
        ignore_index, math.log(vocab), max(vocab_start, 0),
        HAS_SOFTCAP=has_softcap, WITH_ENTROPY=bool(with_entropy), SHARD=vocab_start >= 0,
        CHUNKS=chunks, VEC=vec,
        num_warps=num_warps, enable_fp_fusion=False,
    )
    return logp, entropy, lse


def logprobs_backward(
    grad_logprobs: torch.Tensor,  # (N,) float
    grad_entropy: torch.Tensor | None,  # (N,) float or None
    logits: torch.Tensor,  # (N, V) as in the forward
    labels: torch.Tensor,  # (N,) int32/int64
    lse: torch.Tensor,  # (N,) fp32 or fp64 from the forward
    entropy: torch.Tensor | None,  # (N,) fp32 (fp64 for fp64 logits) from the forward; needed with grad_entropy
    temperature: float,
    softcap: float,
    ignore_index: int,
    grad_logits: torch.Tensor,  # (N, V) logits' dtype, stride(1) == 1; may be logits itself
    vocab_start: int = -1,  # -1: whole vocabulary; >= 0: shard mode, lse / entropy global
) -> None:
    """Writes d loss / d logits into ``grad_logits``."""
    _check(logits, labels)
    _check_vocab_start(vocab_start)
    n, vocab = logits.shape
    if tuple(grad_logits.shape) != (n, vocab) or grad_logits.dtype != logits.dtype:
        raise ValueError("grad_logits must have the shape and dtype of logits")
    if vocab > 1 and grad_logits.stride(1) != 1:
        raise ValueError("grad_logits must have a contiguous last dim")
    if grad_entropy is not None and entropy is None:
        raise ValueError("grad_entropy needs the forward's entropy")
    if n == 0 or vocab == 0:
        return
    has_grad_entropy = grad_entropy is not None
    # Unused pointer arguments get a valid fp32 tensor; the kernel never reads them.
    grad_entropy_arg = grad_entropy if has_grad_entropy else lse
    entropy_arg = entropy if has_grad_entropy else lse
    chunks, vec, num_warps = _config(vocab, logits.element_size())
    has_softcap = softcap > 0
    _logprobs_bwd_kernel[(n,)](
        grad_logprobs, grad_entropy_arg, logits, labels, lse, entropy_arg, grad_logits,
        vocab, logits.stride(0), grad_logits.stride(0), labels.stride(0),
        grad_logprobs.stride(0), grad_entropy_arg.stride(0), lse.stride(0), entropy_arg.stride(0),
        *_scalars(temperature, softcap, logits.dtype == torch.float64),
        ignore_index, max(vocab_start, 0),
        HAS_SOFTCAP=has_softcap, HAS_GRAD_ENTROPY=has_grad_entropy, SHARD=vocab_start >= 0,
        ROUND_BF16=logits.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
        BLOCK=chunks * vec,
        num_warps=num_warps, enable_fp_fusion=False,
    )
