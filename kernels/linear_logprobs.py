"""Triton kernels for fused linear log-probs and entropy: the LM-head matmul inside Triton.

For hidden states ``h [N, H]``, LM head ``W [V, H]``, bias ``b [V]`` and labels ``y [N]`` the
kernels return what ``rlkern.reference.linear_logprobs`` (the oracle) returns, without ever
writing the ``[N, V]`` logits: every logits tile is made by ``tl.dot`` (tensor cores, fp32
accumulation), used in registers and dropped.

    x = h W^T + b     z = softcap(logit_scale * x) / T     lse = log sum_j e^z_j
    logp = min(z_y - lse, 0) (0 at ignore_index, NaN at labels outside [0, V))
    H = lse - sum_j p_j z_j

Forward (``linear_logprobs_forward``), two launches:
1. ``_fwd_partials_kernel``: one program per (token block, vocab block) tile, grouped so that
   ``GROUP_N`` token blocks sweep the vocabulary together (their hidden rows stay in L2 while
   each W tile is read once per group). The tile ``[BLOCK_N, BLOCK_V]`` of logits comes from a
   loop over H in ``BLOCK_H`` steps; its epilogue writes, per token, the tile's max ``m``,
   ``s = sum e^(z-m)`` and ``t = sum e^(z-m) (z-m)`` (entropy) into a ``[3, N, cdiv(V,
   BLOCK_V)]`` fp32 scratch, and the program whose vocab block holds the label writes ``z_y``.
   Vocab tails (151936, 152064, odd V) need no padding copy: the last tile loads clamped
   (valid) rows of W and masks those columns out of the sums.
2. ``_fwd_finalize_kernel``: one program per token merges its partials in a fixed order into
   the float64 lse, logp and entropy (relative to the row max, as kernels/logprobs.py does).
No atomics: the forward is deterministic, and batch invariant (a token's outputs do not depend
on the other rows: every tile product is per row, and the merge order depends on V only).
Scratch: ``12 N cdiv(V, BLOCK_V)`` bytes (117 MB at N = 8192, V = 151936, BLOCK_V = 128),
never ``O(N V)``.

Backward (``linear_logprobs_backward``) recomputes each logits tile, forms ``G = dL/dx`` in
registers (``dL/dz_j = g_l ([j == y] - p_j) - g_H p_j (z_j - lse + H)``, times 1/T, the softcap
derivative and logit_scale), casts it to the input dtype and feeds it straight into
``dh += G W`` and ``dW += G^T h`` (``tl.dot``, fp32 accumulation, fp32 outputs):
- ``deterministic=False``: ``_bwd_atomic_kernel``, one program per tile, fp32 atomic adds
  (relaxed) of its ``[BLOCK_N, H]`` and ``[BLOCK_V, H]`` products. Work: 3 GEMMs of ``2NHV``
  flops (recompute, dh, dW), plus ``N V H (1/BLOCK_V + 1/BLOCK_N)`` fp32 atomic adds.
- ``deterministic=True``: no atomics, fixed summation orders. ``_bwd_dh_kernel``: one program
  per token block loops over all vocab blocks in order, recomputing each logits tile, and adds
  ``G W`` into its own rows of dh (read-modify-write in fp32). ``_bwd_dw_kernel``: one program
  per vocab block loops over all token blocks in order and does the same for dW (and keeps db
  in registers). Cost: 4 GEMMs of ``2NHV`` instead of 3 (the logits are recomputed by both
  passes) and the read-modify-write traffic of the accumulators, ``8 N H V / BLOCK_V`` bytes for
  dh and ``8 N H V / BLOCK_N`` for dW (about 2 x 318 GB at N = 8192, H = 4096, V = 151936 with
  128-wide blocks: memory-bound, several times the atomic path); the dh pass also runs only
  ``cdiv(N, BLOCK_N)`` programs. dh of a token is batch invariant too (its sum runs over the
  vocab blocks only); dW and db sum over tokens, so they are reproducible for the same batch.
Token blocks whose rows all have zero gradient (ignored prompt tokens with no entropy grad) are
skipped before the recompute, in every backward kernel.

Numerics: the forward and the deterministic backward launch with a fixed config per dtype
(``_LAUNCH``: block sizes, warps and stages all decide some summation order), so their results
are the same bits in every process; only the atomic backward is autotuned, keyed on V, H,
dtypes and flags, never on N. fp32 inputs use ``input_precision="ieee"`` (fp32 FMA products,
fp32 accumulation: no tensor cores, so slow) unless PyTorch allows TF32
(``torch.get_float32_matmul_precision() != "highest"``); the tiles then run on TF32 tensor
cores as cuBLAS would (10-bit mantissa products: about 1e-3 relative error in the logits).
All kernels launch with ``enable_fp_fusion=False`` and every logits tile uses the same K step
``BLOCK_H``, so the backward forms ``z`` with the forward's roundings (see kernels/logprobs.py).

Under ``TRITON_INTERPRET=1`` (CPU tests) bf16/fp16 ``tl.dot`` would multiply the raw bit
patterns (the interpreter stores bf16 as uint16), so ``INTERPRET`` widens the operands to fp32
first (exact: a product of two bf16 values fits in fp32) and rounds fp32 -> bf16 casts to
nearest by hand; the GPU never traces that branch.

float64 hidden states and weight: every kernel computes in the compute dtype ``CDT`` float64
(float32 otherwise): the GEMM tiles are ``tl.dot`` of float64 operands with a float64
accumulator (DMMA on sm_90; exact products under the interpreter), the scratch partials,
log-probs, entropy and gradients are float64, the float hyper-parameters come as float64
arguments, and the exponentials, tanh, floor and clamps are kernels/logprobs.py's float64 ones.

Not done (yet): extra outputs (log_sum_sq_probs, mean_logits, is_top1); skipping tiles whose
gradient is negligible (cut-cross-entropy's filter); a persistent / TMA version; tuning on H100.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from rlkern.kernels._common import D_MIN, D_MIN64, FLOOR, FLOOR64, exp_, f32, f32_recip, tanh_and_sech2, to_out

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# ---------------------------------------------------------------------------------------------
# Shared device helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _hyper(logit_scale, softcap, inv_softcap, inv_temp, CDT: tl.constexpr):
    """The float64 hyper-parameter arguments read in the compute dtype (exact for float32: the
    launcher rounded them to float32); under the interpreter they are Python floats, which
    tl.full keeps exact."""
    return (tl.full((), logit_scale, CDT), tl.full((), softcap, CDT), tl.full((), inv_softcap, CDT),
            tl.full((), inv_temp, CDT))


@triton.jit
def _dot(a, b, acc, INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation (float64 for float64 operands)."""
    if a.dtype == tl.float64:
        return tl.dot(a, b, acc)
    elif INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision=PRECISION)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _tile_ids(num_n_blocks, num_v_blocks, GROUP_N: tl.constexpr):
    """(token block, vocab block) of this program: GROUP_N token blocks walk the vocabulary
    together, token block fastest, so consecutive programs share a W tile."""
    pid = tl.program_id(0)
    per_group = GROUP_N * num_v_blocks
    first = (pid // per_group) * GROUP_N
    size = tl.minimum(num_n_blocks - first, GROUP_N)
    pid_n = first + (pid % per_group) % size
    pid_v = (pid % per_group) // size
    return pid_n, pid_v


@triton.jit
def _logits_tile(
    hidden_ptr, weight_ptr, bias_ptr, rows, cols, H, stride_h, stride_w, stride_b,
    logit_scale, softcap, inv_softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, EVEN_H: tl.constexpr,
    INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Returns ``(softcap(logit_scale * (h W^T + b)), sech^2 of the softcap argument)``, both
    (BLOCK_N, BLOCK_V) fp32, or fp64 for fp64 inputs (the second is only meaningful with
    HAS_SOFTCAP).

    ``rows`` (BLOCK_N,) and ``cols`` (BLOCK_V,) are int64 indices already clamped into
    [0, N) and [0, V): tails load real rows (no masks in the K loop, no padding copy) and the
    caller masks their results out."""
    offs_k = tl.arange(0, BLOCK_H)
    h_ptrs = hidden_ptr + rows[:, None] * stride_h + offs_k[None, :]  # (BLOCK_N, BLOCK_H)
    w_ptrs = weight_ptr + cols[None, :] * stride_w + offs_k[:, None]  # (BLOCK_H, BLOCK_V) = W^T
    if hidden_ptr.dtype.element_ty == tl.float64:
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k in range(0, H, BLOCK_H):
        if EVEN_H:
            a = tl.load(h_ptrs)
            b = tl.load(w_ptrs)
        else:
            in_k = offs_k < H - k
            a = tl.load(h_ptrs, mask=in_k[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=in_k[:, None], other=0.0)
        acc = _dot(a, b, acc, INTERPRET, PRECISION)
        h_ptrs += BLOCK_H
        w_ptrs += BLOCK_H
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols * stride_b).to(acc.dtype)[None, :]
    y = acc * logit_scale
    sech2 = y
    if HAS_SOFTCAP:
        th, sech2 = tanh_and_sech2(y * inv_softcap)
        y = softcap * th
    return y, sech2


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fwd_partials_kernel(
    hidden_ptr,  # (N, H) fp32/bf16/fp16/fp64, strides (stride_h, 1)
    weight_ptr,  # (V, H) hidden's dtype, strides (stride_w, 1)
    bias_ptr,  # (V,) float, stride stride_b; read only when HAS_BIAS
    labels_ptr,  # (N,) int32/int64, stride stride_label
    m_ptr,  # (N, NVB) CDT (fp32; fp64 for fp64 hidden) out, strides (stride_part, 1): max of z over the tile's columns
    s_ptr,  # (N, NVB) CDT out: sum e^(z - m) over the tile
    t_ptr,  # (N, NVB) CDT out: sum e^(z - m) (z - m); only written when WITH_ENTROPY
    label_z_ptr,  # (N,) CDT out: z at the label; written by the program whose block holds it
    N,  # () tokens
    V,  # () vocab size
    H,  # () hidden size
    stride_h,  # () hidden.stride(0)
    stride_w,  # () weight.stride(0)
    stride_b,  # () bias.stride(0)
    stride_label,  # () labels.stride(0)
    stride_part,  # () NVB
    logit_scale: tl.float64,  # () fp32-rounded (exact for fp64 inputs)
    softcap: tl.float64,  # () c; read only when HAS_SOFTCAP
    inv_softcap: tl.float64,  # () 1 / c
    inv_temp: tl.float64,  # () fp32(1 / fp32(T)) (1 / T for fp64 inputs)
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    EVEN_H: tl.constexpr,  # H % BLOCK_H == 0
    INTERPRET: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" | "tf32", for fp32 inputs
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    if hidden_ptr.dtype.element_ty == tl.float64:
        CDT: tl.constexpr = tl.float64  # the compute dtype (module docstring)
    else:
        CDT: tl.constexpr = tl.float32
    logit_scale, softcap, inv_softcap, inv_temp = _hyper(logit_scale, softcap, inv_softcap, inv_temp, CDT)
    pid_n, pid_v = _tile_ids(tl.cdiv(N, BLOCK_N), tl.cdiv(V, BLOCK_V), GROUP_N)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col0 = pid_v.to(tl.int64) * BLOCK_V
    cols = col0 + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    y, _ = _logits_tile(
        hidden_ptr, weight_ptr, bias_ptr, tl.minimum(rows, N - 1), tl.minimum(cols, V - 1), H,
        stride_h, stride_w, stride_b, logit_scale, softcap, inv_softcap,
        HAS_BIAS, HAS_SOFTCAP, EVEN_H, INTERPRET, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
    z = y * inv_temp  # PyTorch's rounding of y / T (see kernels/logprobs.py)

    label = tl.load(labels_ptr + tl.minimum(rows, N - 1) * stride_label).to(tl.int64)
    # Exact: one term of the sum is z_y, every other is 0 (and -inf / NaN flow through).
    z_y = tl.sum(tl.where(cols[None, :] == label[:, None], z, 0.0), axis=1)
    owns = row_ok & (label >= col0) & (label < col0 + BLOCK_V) & (label < V)
    tl.store(label_z_ptr + rows, z_y, mask=owns)

    # NaN survives the clamp and reaches s through e. Columns past V hold copies of column
    # V - 1 (clamped loads): harmless in the max, and their e is zeroed.
    if CDT == tl.float64:
        zc = tl.maximum(z, FLOOR64, propagate_nan=tl.PropagateNan.ALL)
    else:
        zc = tl.maximum(z, FLOOR, propagate_nan=tl.PropagateNan.ALL)
    m = tl.max(zc, axis=1)
    d = zc - m[:, None]
    if CDT == tl.float64:
        # -DBL_MAX - m may overflow to -inf, and e * d would be 0 * -inf (kernels/logprobs.py)
        d = tl.maximum(d, D_MIN64, propagate_nan=tl.PropagateNan.ALL)
    e = tl.where(col_ok[None, :], exp_(d), 0.0)
    part = rows * stride_part + pid_v
    tl.store(m_ptr + part, m, mask=row_ok)
    tl.store(s_ptr + part, tl.sum(e, axis=1), mask=row_ok)
    if WITH_ENTROPY:
        tl.store(t_ptr + part, tl.sum(e * d, axis=1), mask=row_ok)


@triton.jit
def _fwd_finalize_kernel(
    m_ptr,  # (N, NVB) CDT (fp32; fp64 for fp64 hidden) from _fwd_partials_kernel, strides (stride_part, 1)
    s_ptr,  # (N, NVB) CDT
    t_ptr,  # (N, NVB) CDT; read only when WITH_ENTROPY
    label_z_ptr,  # (N,) CDT from _fwd_partials_kernel (only where the label is in range)
    labels_ptr,  # (N,) int32/int64, stride stride_label
    logp_ptr,  # (N,) CDT out
    entropy_ptr,  # (N,) CDT out; only written when WITH_ENTROPY
    lse_ptr,  # (N,) fp64 out: natural-log lse of z, -inf for an all -inf row
    V,  # () vocab size
    NVB,  # () vocab blocks
    stride_label,  # () labels.stride(0)
    stride_part,  # () NVB
    ignore_index,  # () label with logp 0
    log_vocab: tl.float64,  # () log(V): logp and entropy of an all -inf (uniform) row
    WITH_ENTROPY: tl.constexpr,
    BLOCK_J: tl.constexpr,  # vocab blocks merged per step (power of 2)
):
    if m_ptr.dtype.element_ty == tl.float64:
        CDT: tl.constexpr = tl.float64  # the compute dtype (module docstring)
        ROW_FLOOR: tl.constexpr = FLOOR64
    else:
        CDT: tl.constexpr = tl.float32
        ROW_FLOOR: tl.constexpr = FLOOR
    log_vocab = tl.full((), log_vocab, CDT)
    row = tl.program_id(0).to(tl.int64)
    base = row * stride_part
    offs = tl.arange(0, BLOCK_J)
    m = tl.full([BLOCK_J], ROW_FLOOR, CDT)
    s = tl.zeros([BLOCK_J], CDT)
    t = tl.zeros([BLOCK_J], CDT)
    # Lane j merges vocab blocks j, j + BLOCK_J, ... in order, then the lanes merge once: the
    # order depends on V and BLOCK_V only, so the result is deterministic and batch invariant.
    for j in range(0, NVB, BLOCK_J):
        ok = offs < NVB - j
        m_j = tl.load(m_ptr + base + j + offs, mask=ok, other=ROW_FLOOR)
        s_j = tl.load(s_ptr + base + j + offs, mask=ok, other=0.0)
        m_new = tl.maximum(m, m_j)
        d_old = m - m_new
        d_j = m_j - m_new
        if CDT == tl.float64:  # -DBL_MAX - m' may overflow (see _fwd_partials_kernel)
            d_old = tl.maximum(d_old, D_MIN64, propagate_nan=tl.PropagateNan.ALL)
            d_j = tl.maximum(d_j, D_MIN64, propagate_nan=tl.PropagateNan.ALL)
        w_old = exp_(d_old)
        w_j = exp_(d_j)
        if WITH_ENTROPY:
            # e^(z-m') (z-m') = w e^(z-m) ((z-m) + (m-m')): shift both t to the new max.
            t_j = tl.load(t_ptr + base + j + offs, mask=ok, other=0.0)
            t = w_old * tl.fma(s, d_old, t) + w_j * tl.fma(s_j, d_j, t_j)
        s = s * w_old + s_j * w_j
        m = m_new

    m_row = tl.max(m, axis=0)
    dm = m - m_row
    if CDT == tl.float64:
        dm = tl.maximum(dm, D_MIN64, propagate_nan=tl.PropagateNan.ALL)
    w = exp_(dm)
    s_sum = tl.sum(s * w, axis=0)
    # all -inf (or V = 0). A row of NaN logits has m at the floor too (max drops NaN) but a NaN s:
    # it is not dead, and its lse, log-prob and entropy come out NaN.
    dead = (m_row <= ROW_FLOOR) & (s_sum == s_sum)
    s_row = tl.where(dead, 1.0, s_sum)
    log_s = tl.log(s_row)
    # float64 and unrounded: the backward's p at a confident label needs its digits.
    lse = tl.where(dead, float("-inf"), m_row.to(tl.float64) + log_s.to(tl.float64))
    tl.store(lse_ptr + row, lse)

    label = tl.load(labels_ptr + row * stride_label)
    in_range = (label >= 0) & (label < V)
    z_y = tl.load(label_z_ptr + row, mask=in_range, other=0.0)
    # z_y - m is exact near the max, so logp keeps its digits when |logits| is large.
    logp = tl.minimum((z_y - m_row) - log_s, 0.0, propagate_nan=tl.PropagateNan.ALL)
    logp = tl.where(dead, -log_vocab, logp)
    logp = tl.where(in_range, logp, float("nan"))
    logp = tl.where(label == ignore_index, 0.0, logp)
    tl.store(logp_ptr + row, logp)
    if WITH_ENTROPY:
        t_row = tl.sum(w * (t + s * dm), axis=0)
        entropy = tl.where(dead, log_vocab, log_s - t_row / s_row)
        entropy = tl.where(entropy < 0.0, 0.0, entropy)  # rounding on peaked rows; NaN stays NaN
        tl.store(entropy_ptr + row, entropy)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _row_coefs(
    rows, row_ok, grad_logp_ptr, grad_entropy_ptr, labels_ptr, lse_ptr, entropy_ptr, V,
    stride_gl, stride_ge, stride_label, stride_lse, stride_ent, ignore_index, grad_scale,
    HAS_GRAD_ENTROPY: tl.constexpr, CDT: tl.constexpr,
):
    """Per-token constants of ``G_j = p_j (a + b (z_j - lse)) + [j == y] g_y`` (all (BLOCK_N,)),
    with 1/T and logit_scale folded into ``grad_scale``; zero for rows past N. ``rows`` is
    clamped into [0, N). Returns (lse_hi, lse_lo, label (-1 when it has no gradient), g_y, a, b,
    any: whether some row of the block has a gradient at all)."""
    lse = tl.load(lse_ptr + rows * stride_lse).to(tl.float64)
    dead = lse == float("-inf")
    # As hi + lo in fp32 (lo = 0 for an fp32 lse): z - hi is exact near the max, lo adds the
    # digits fp32 drops (float64 compute: hi = lse, lo = 0). lse = +inf makes p exactly 0 in a
    # dead row.
    lse = tl.where(dead, 0.0, lse)
    lse_hi = lse.to(CDT)
    lse_lo = (lse - lse_hi.to(tl.float64)).to(CDT)
    lse_hi = tl.where(dead, float("inf"), lse_hi)
    label = tl.load(labels_ptr + rows * stride_label).to(tl.int64)
    live = (label != ignore_index) & (label >= 0) & (label < V) & (~dead) & row_ok
    if CDT == tl.float64:
        # Applied by _grad_tile after the products: folded into b, b (z - lse) overflows where
        # logit_scale ~ 1e306 (and p = 0 then makes it NaN).
        grad_scale = tl.full((), 1.0, CDT)
    else:
        grad_scale = tl.full((), grad_scale, CDT)
    g_l = tl.load(grad_logp_ptr + rows * stride_gl).to(CDT)
    g_l = tl.where(live, g_l, 0.0)
    g_y = g_l * grad_scale
    if HAS_GRAD_ENTROPY:
        g_h = tl.load(grad_entropy_ptr + rows * stride_ge).to(CDT)
        g_h = tl.where(dead | (~row_ok), 0.0, g_h)
        entropy = tl.load(entropy_ptr + rows * stride_ent).to(CDT)
        a = -(g_l + g_h * entropy) * grad_scale
        b = -g_h * grad_scale
    else:
        a = -g_y
        b = tl.zeros_like(a)
    label = tl.where(live, label, -1)
    any_grad = tl.max(((g_y != 0) | (a != 0) | (b != 0)).to(tl.int32), axis=0) > 0
    return lse_hi, lse_lo, label, g_y, a, b, any_grad


@triton.jit
def _grad_tile(
    y, sech2, cols, valid, lse_hi, lse_lo, label, g_y, a, b, inv_temp, grad_scale,
    HAS_SOFTCAP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
):
    """d loss / d (h W^T + b) of one tile, (BLOCK_N, BLOCK_V) in y's dtype, 0 outside ``valid``."""
    d = (y * inv_temp - lse_hi[:, None]) - lse_lo[:, None]  # z - lse, z as in the forward
    if y.dtype == tl.float64:
        d = tl.maximum(d, D_MIN64, propagate_nan=tl.PropagateNan.ALL)
    else:
        d = tl.maximum(d, D_MIN, propagate_nan=tl.PropagateNan.ALL)
    p = exp_(d)
    if HAS_GRAD_ENTROPY:
        g = p * tl.fma(b[:, None], d, a[:, None])
    else:
        g = p * a[:, None]
    g = tl.where(cols[None, :] == label[:, None], g + g_y[:, None], g)
    if HAS_SOFTCAP:
        g = g * sech2
    if y.dtype == tl.float64:
        g = g * grad_scale  # not folded into a, b, g_y in float64 (see _row_coefs)
    return tl.where(valid, g, 0.0)


@triton.jit
def _bwd_atomic_kernel(
    grad_logp_ptr,  # (N,) float, stride stride_gl (0 for an expanded scalar)
    grad_entropy_ptr,  # (N,) float, stride stride_ge; read only when HAS_GRAD_ENTROPY
    hidden_ptr,  # (N, H) strides (stride_h, 1)
    weight_ptr,  # (V, H) strides (stride_w, 1)
    bias_ptr,  # (V,) stride stride_b; read only when HAS_BIAS
    labels_ptr,  # (N,) int32/int64, stride stride_label
    lse_ptr,  # (N,) fp64 (or fp32) from the forward, stride stride_lse
    entropy_ptr,  # (N,) fp32 (fp64 for fp64 hidden) from the forward, stride stride_ent; only with HAS_GRAD_ENTROPY
    grad_hidden_ptr,  # (N, H) CDT (fp32; fp64 for fp64 hidden), contiguous, zeroed; added to when NEED_DH
    grad_weight_ptr,  # (V, H) CDT, contiguous, zeroed; added to when NEED_DW
    grad_bias_ptr,  # (V,) CDT, zeroed; added to when NEED_DB
    N, V, H,
    stride_h, stride_w, stride_b, stride_label, stride_gl, stride_ge, stride_lse, stride_ent,
    logit_scale: tl.float64, softcap: tl.float64, inv_softcap: tl.float64, inv_temp: tl.float64,
    grad_scale: tl.float64,  # () fp32(logit_scale / T) (unrounded for fp64 hidden)
    ignore_index,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    NEED_DH: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr,
    EVEN_H: tl.constexpr,  # H % BLOCK_H == 0
    EVEN_HO: tl.constexpr,  # H % BLOCK_HO == 0
    ROUND_BF16: tl.constexpr,  # interpreter only: round the bf16 cast of G by hand
    INTERPRET: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,  # K step of the logits recompute
    BLOCK_HO: tl.constexpr,  # H columns of dh / dW per product step
    GROUP_N: tl.constexpr,
):
    if hidden_ptr.dtype.element_ty == tl.float64:
        CDT: tl.constexpr = tl.float64  # the compute dtype (module docstring)
    else:
        CDT: tl.constexpr = tl.float32
    logit_scale, softcap, inv_softcap, inv_temp = _hyper(logit_scale, softcap, inv_softcap, inv_temp, CDT)
    pid_n, pid_v = _tile_ids(tl.cdiv(N, BLOCK_N), tl.cdiv(V, BLOCK_V), GROUP_N)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    rows_c = tl.minimum(rows, N - 1)
    cols_c = tl.minimum(cols, V - 1)
    lse_hi, lse_lo, label, g_y, a, b, any_grad = _row_coefs(
        rows_c, row_ok, grad_logp_ptr, grad_entropy_ptr, labels_ptr, lse_ptr, entropy_ptr, V,
        stride_gl, stride_ge, stride_label, stride_lse, stride_ent, ignore_index, grad_scale,
        HAS_GRAD_ENTROPY, CDT)
    if any_grad:
        y, sech2 = _logits_tile(
            hidden_ptr, weight_ptr, bias_ptr, rows_c, cols_c, H, stride_h, stride_w, stride_b,
            logit_scale, softcap, inv_softcap, HAS_BIAS, HAS_SOFTCAP, EVEN_H, INTERPRET,
            PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        g = _grad_tile(y, sech2, cols, row_ok[:, None] & col_ok[None, :], lse_hi, lse_lo, label,
                       g_y, a, b, inv_temp, grad_scale, HAS_SOFTCAP, HAS_GRAD_ENTROPY)
        if NEED_DB:
            tl.atomic_add(grad_bias_ptr + cols, tl.sum(g, axis=0), mask=col_ok, sem="relaxed")
        # The products take G in the input dtype (tensor cores), as PyTorch's bf16 backward does.
        g = to_out(g, hidden_ptr.dtype.element_ty, ROUND_BF16)
        offs_o = tl.arange(0, BLOCK_HO)
        for k in range(0, H, BLOCK_HO):
            in_k = offs_o < H - k
            if NEED_DH:
                w_ptrs = weight_ptr + cols_c[:, None] * stride_w + k + offs_o[None, :]  # (BV, BHO)
                if EVEN_HO:
                    w = tl.load(w_ptrs)
                else:
                    w = tl.load(w_ptrs, mask=in_k[None, :], other=0.0)
                dh = _dot(g, w, tl.zeros((BLOCK_N, BLOCK_HO), CDT), INTERPRET, PRECISION)
                tl.atomic_add(grad_hidden_ptr + rows[:, None] * H + k + offs_o[None, :], dh,
                              mask=row_ok[:, None] & in_k[None, :], sem="relaxed")
            if NEED_DW:
                x_ptrs = hidden_ptr + rows_c[:, None] * stride_h + k + offs_o[None, :]  # (BN, BHO)
                if EVEN_HO:
                    x = tl.load(x_ptrs)
                else:
                    x = tl.load(x_ptrs, mask=in_k[None, :], other=0.0)
                dw = _dot(tl.trans(g), x, tl.zeros((BLOCK_V, BLOCK_HO), CDT), INTERPRET,
                          PRECISION)
                tl.atomic_add(grad_weight_ptr + cols[:, None] * H + k + offs_o[None, :], dw,
                              mask=col_ok[:, None] & in_k[None, :], sem="relaxed")


@triton.jit
def _bwd_dh_kernel(
    grad_logp_ptr,  # (N,) float, stride stride_gl
    grad_entropy_ptr,  # (N,) float, stride stride_ge; read only when HAS_GRAD_ENTROPY
    hidden_ptr,  # (N, H) strides (stride_h, 1)
    weight_ptr,  # (V, H) strides (stride_w, 1)
    bias_ptr,  # (V,) stride stride_b; read only when HAS_BIAS
    labels_ptr,  # (N,) int32/int64
    lse_ptr,  # (N,) fp64 (or fp32) from the forward
    entropy_ptr,  # (N,) fp32 (fp64 for fp64 hidden) from the forward; only with HAS_GRAD_ENTROPY
    grad_hidden_ptr,  # (N, H) CDT (fp32; fp64 for fp64 hidden), contiguous, zeroed; each program owns its BLOCK_N rows
    N, V, H,
    stride_h, stride_w, stride_b, stride_label, stride_gl, stride_ge, stride_lse, stride_ent,
    logit_scale: tl.float64, softcap: tl.float64, inv_softcap: tl.float64, inv_temp: tl.float64,
    grad_scale: tl.float64, ignore_index,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    EVEN_H: tl.constexpr,
    EVEN_HO: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    INTERPRET: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,  # fixed per dtype: it sets the order of a token's dh sum
    BLOCK_H: tl.constexpr,
    BLOCK_HO: tl.constexpr,
):
    if hidden_ptr.dtype.element_ty == tl.float64:
        CDT: tl.constexpr = tl.float64  # the compute dtype (module docstring)
    else:
        CDT: tl.constexpr = tl.float32
    logit_scale, softcap, inv_softcap, inv_temp = _hyper(logit_scale, softcap, inv_softcap, inv_temp, CDT)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows_c = tl.minimum(rows, N - 1)
    lse_hi, lse_lo, label, g_y, a, b, any_grad = _row_coefs(
        rows_c, row_ok, grad_logp_ptr, grad_entropy_ptr, labels_ptr, lse_ptr, entropy_ptr, V,
        stride_gl, stride_ge, stride_label, stride_lse, stride_ent, ignore_index, grad_scale,
        HAS_GRAD_ENTROPY, CDT)
    offs_o = tl.arange(0, BLOCK_HO)
    if any_grad:
        for v0 in range(0, V, BLOCK_V):
            cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
            col_ok = cols < V
            cols_c = tl.minimum(cols, V - 1)
            y, sech2 = _logits_tile(
                hidden_ptr, weight_ptr, bias_ptr, rows_c, cols_c, H, stride_h,
                stride_w, stride_b, logit_scale, softcap, inv_softcap, HAS_BIAS, HAS_SOFTCAP,
                EVEN_H, INTERPRET, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
            g = _grad_tile(y, sech2, cols, row_ok[:, None] & col_ok[None, :], lse_hi, lse_lo,
                           label, g_y, a, b, inv_temp, grad_scale, HAS_SOFTCAP, HAS_GRAD_ENTROPY)
            g = to_out(g, hidden_ptr.dtype.element_ty, ROUND_BF16)
            for k in range(0, H, BLOCK_HO):
                in_k = offs_o < H - k
                w_ptrs = weight_ptr + cols_c[:, None] * stride_w + k + offs_o[None, :]  # (BV, BHO)
                out_ptrs = grad_hidden_ptr + rows[:, None] * H + k + offs_o[None, :]
                if EVEN_HO:
                    w = tl.load(w_ptrs)
                else:
                    w = tl.load(w_ptrs, mask=in_k[None, :], other=0.0)
                out_mask = row_ok[:, None] & in_k[None, :]
                acc = tl.load(out_ptrs, mask=out_mask, other=0.0)
                tl.store(out_ptrs, _dot(g, w, acc, INTERPRET, PRECISION), mask=out_mask)
            # The next vocab block reads these rows back, maybe from other threads of the CTA.
            tl.debug_barrier()


@triton.jit
def _bwd_dw_kernel(
    grad_logp_ptr,  # (N,) float, stride stride_gl
    grad_entropy_ptr,  # (N,) float, stride stride_ge; read only when HAS_GRAD_ENTROPY
    hidden_ptr,  # (N, H) strides (stride_h, 1)
    weight_ptr,  # (V, H) strides (stride_w, 1)
    bias_ptr,  # (V,) stride stride_b; read only when HAS_BIAS
    labels_ptr,  # (N,) int32/int64
    lse_ptr,  # (N,) fp64 (or fp32) from the forward
    entropy_ptr,  # (N,) fp32 (fp64 for fp64 hidden) from the forward; only with HAS_GRAD_ENTROPY
    grad_weight_ptr,  # (V, H) CDT (fp32; fp64 for fp64 hidden), contiguous, zeroed; each program owns its BLOCK_V rows
    grad_bias_ptr,  # (V,) CDT out when NEED_DB
    N, V, H,
    stride_h, stride_w, stride_b, stride_label, stride_gl, stride_ge, stride_lse, stride_ent,
    logit_scale: tl.float64, softcap: tl.float64, inv_softcap: tl.float64, inv_temp: tl.float64,
    grad_scale: tl.float64, ignore_index,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr,
    EVEN_H: tl.constexpr,
    EVEN_HO: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    INTERPRET: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,  # fixed per dtype: it sets the order of the dW / db sums
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HO: tl.constexpr,
):
    if hidden_ptr.dtype.element_ty == tl.float64:
        CDT: tl.constexpr = tl.float64  # the compute dtype (module docstring)
    else:
        CDT: tl.constexpr = tl.float32
    logit_scale, softcap, inv_softcap, inv_temp = _hyper(logit_scale, softcap, inv_softcap, inv_temp, CDT)
    cols = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    cols_c = tl.minimum(cols, V - 1)
    offs_o = tl.arange(0, BLOCK_HO)
    db = tl.zeros((BLOCK_V,), CDT)
    for n0 in range(0, N, BLOCK_N):
        rows = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        row_ok = rows < N
        rows_c = tl.minimum(rows, N - 1)
        lse_hi, lse_lo, label, g_y, a, b, any_grad = _row_coefs(
            rows_c, row_ok, grad_logp_ptr, grad_entropy_ptr, labels_ptr, lse_ptr, entropy_ptr, V,
            stride_gl, stride_ge, stride_label, stride_lse, stride_ent, ignore_index, grad_scale,
            HAS_GRAD_ENTROPY, CDT)
        if any_grad:
            y, sech2 = _logits_tile(
                hidden_ptr, weight_ptr, bias_ptr, rows_c, cols_c, H, stride_h, stride_w, stride_b,
                logit_scale, softcap, inv_softcap, HAS_BIAS, HAS_SOFTCAP, EVEN_H, INTERPRET,
                PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
            g = _grad_tile(y, sech2, cols, row_ok[:, None] & col_ok[None, :], lse_hi, lse_lo,
                           label, g_y, a, b, inv_temp, grad_scale, HAS_SOFTCAP, HAS_GRAD_ENTROPY)
            if NEED_DB:
                db += tl.sum(g, axis=0)
            if NEED_DW:
                g = to_out(g, hidden_ptr.dtype.element_ty, ROUND_BF16)
                gt = tl.trans(g)
                for k in range(0, H, BLOCK_HO):
                    in_k = offs_o < H - k
                    x_ptrs = hidden_ptr + rows_c[:, None] * stride_h + k + offs_o[None, :]
                    out_ptrs = grad_weight_ptr + cols[:, None] * H + k + offs_o[None, :]
                    if EVEN_HO:
                        x = tl.load(x_ptrs)
                    else:
                        x = tl.load(x_ptrs, mask=in_k[None, :], other=0.0)
                    out_mask = col_ok[:, None] & in_k[None, :]
                    acc = tl.load(out_ptrs, mask=out_mask, other=0.0)
                    tl.store(out_ptrs, _dot(gt, x, acc, INTERPRET, PRECISION), mask=out_mask)
                # The next token block reads these rows back, maybe from other threads.
                tl.debug_barrier()
    if NEED_DB:
        tl.store(grad_bias_ptr + cols, db, mask=col_ok)


# ---------------------------------------------------------------------------------------------
# Block sizes
# ---------------------------------------------------------------------------------------------

# Launch configs of the kernels whose results must not depend on anything but the inputs
# (forward, deterministic backward): fixed per element size, never autotuned, because block
# sizes, warps and stages all change the order of some sum (the MMA layout decides which
# threads reduce which columns). So a token's outputs are the same bits in every process on the
# same GPU and Triton version, as rollout/training consistency needs. The GPU values are
# starting points for the H100 session (it sweeps them and pins the fastest here); the
# interpreter's are small so the CPU tests run several token, vocab and H blocks with tails.
# BLOCK_H: K step of every logits tile; BLOCK_HO: H width of one dh / dW product step.
if _INTERPRET:
    _LAUNCH = {size: dict(
        fwd=dict(BLOCK_N=16, BLOCK_V=64, BLOCK_H=16, GROUP_N=2, num_warps=1, num_stages=1),
        dh=dict(BLOCK_N=16, BLOCK_V=64, BLOCK_H=16, BLOCK_HO=32, num_warps=1, num_stages=1),
        dw=dict(BLOCK_N=16, BLOCK_V=64, BLOCK_H=16, BLOCK_HO=32, num_warps=1, num_stages=1),
        atomic=dict(BLOCK_H=16, BLOCK_HO=32),
    ) for size in (2, 4, 8)}
else:
    _LAUNCH = {
        2: dict(  # bf16 / fp16: wgmma tiles
            fwd=dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, GROUP_N=8, num_warps=8, num_stages=3),
            dh=dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, BLOCK_HO=64, num_warps=4, num_stages=3),
            dw=dict(BLOCK_N=128, BLOCK_V=64, BLOCK_H=64, BLOCK_HO=64, num_warps=8, num_stages=3),
            atomic=dict(BLOCK_H=64, BLOCK_HO=64),
        ),
        4: dict(  # fp32: FMA ("ieee") or TF32 wgmma tiles
            fwd=dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=32, GROUP_N=8, num_warps=8, num_stages=3),
            dh=dict(BLOCK_N=64, BLOCK_V=64, BLOCK_H=32, BLOCK_HO=32, num_warps=8, num_stages=3),
            dw=dict(BLOCK_N=64, BLOCK_V=64, BLOCK_H=32, BLOCK_HO=32, num_warps=8, num_stages=3),
            atomic=dict(BLOCK_H=32, BLOCK_HO=32),
        ),
        8: dict(  # fp64: DMMA tiles (mma.sync m8n8k4), fp64 accumulators; small tiles for registers
            fwd=dict(BLOCK_N=64, BLOCK_V=64, BLOCK_H=16, GROUP_N=8, num_warps=4, num_stages=2),
            dh=dict(BLOCK_N=32, BLOCK_V=64, BLOCK_H=16, BLOCK_HO=32, num_warps=4, num_stages=2),
            dw=dict(BLOCK_N=64, BLOCK_V=32, BLOCK_H=16, BLOCK_HO=32, num_warps=4, num_stages=2),
            atomic=dict(BLOCK_H=16, BLOCK_HO=32),
        ),
    }

# The atomic backward is not deterministic anyway: it is autotuned over its tile shape, keyed on
# everything but N (the chosen config must not change with the batch; Triton adds the dtypes).
if _INTERPRET:
    _ATOMIC_CONFIGS = [triton.Config(dict(BLOCK_N=16, BLOCK_V=64, GROUP_N=2), num_warps=1, num_stages=1)]
else:
    _ATOMIC_CONFIGS = [
        triton.Config(dict(BLOCK_N=bn, BLOCK_V=bv, GROUP_N=g), num_warps=w, num_stages=st)
        for bn, bv, g, w, st in [(128, 128, 8, 8, 3), (64, 128, 8, 4, 3), (128, 64, 8, 4, 3),
                                 (64, 64, 16, 4, 4)]
    ]
# Exact fp32 tiles run on FMA units, whose registers grow with the tile (ptxas: 64 x 64 tiles
# with 8 warps and BLOCK_HO 32 do not spill, 4 warps or BLOCK_HO 64 do).
_ATOMIC_FP32_IEEE = _ATOMIC_CONFIGS[:1] if _INTERPRET else [
    triton.Config(dict(BLOCK_N=64, BLOCK_V=64, GROUP_N=8), num_warps=8, num_stages=3)]
# fp64 tiles hold twice the registers of fp32 ones: the smaller shapes only.
_ATOMIC_FP64 = _ATOMIC_CONFIGS[:1] if _INTERPRET else [
    triton.Config(dict(BLOCK_N=bn, BLOCK_V=bv, GROUP_N=8), num_warps=4, num_stages=2)
    for bn, bv in [(64, 64), (32, 64)]]


def _prune_atomic(configs, named_args, **kwargs):
    dtype = named_args["hidden_ptr"].dtype
    if dtype == torch.float64:
        return _ATOMIC_FP64
    fp32_ieee = dtype == torch.float32 and kwargs.get("PRECISION") == "ieee"
    return _ATOMIC_FP32_IEEE if fp32_ieee else configs


_bwd_atomic = triton.autotune(
    _ATOMIC_CONFIGS,
    key=["V", "H", "HAS_BIAS", "HAS_SOFTCAP", "HAS_GRAD_ENTROPY", "NEED_DH", "NEED_DW", "NEED_DB"],
    prune_configs_by={"early_config_prune": _prune_atomic},
    reset_to_zero=["grad_hidden_ptr", "grad_weight_ptr", "grad_bias_ptr"],
)(_bwd_atomic_kernel)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _precision() -> str:
    """fp32 tiles: exact fp32 products unless PyTorch itself allows TF32 matmuls."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _check(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           labels: torch.Tensor) -> None:
    # Shapes, dtypes and layout only: metadata, never device memory (no host sync).
    if hidden.ndim != 2:
        raise ValueError(f"hidden must be [N, H], got shape {tuple(hidden.shape)}")
    n, h = hidden.shape
    if weight.ndim != 2 or weight.shape[1] != h:
        raise ValueError(f"weight must be [V, {h}], got shape {tuple(weight.shape)}")
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(f"hidden must be float32/bfloat16/float16/float64, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    for name, x in (("hidden", hidden), ("weight", weight)):
        if x.shape[1] > 1 and x.stride(1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim, got strides {x.stride()}")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be [{weight.shape[0]}], got shape {tuple(bias.shape)}")
        if not bias.dtype.is_floating_point:
            raise TypeError(f"bias must be a float tensor, got {bias.dtype}")
    if labels.shape != (n,) or labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"labels must be int32/int64 of shape ({n},), got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    for name, x in (("weight", weight), ("bias", bias), ("labels", labels)):
        if x is not None and x.device != hidden.device:
            raise ValueError(f"{name} is on {x.device} but hidden is on {hidden.device}")


def _scalar_args(bias, logit_scale, softcap, temperature, fp64: bool) -> dict:
    """The kernels' float hyper-parameters: float32 values (PyTorch's fp32 roundings), or the
    exact float64 ones for float64 inputs."""
    has_softcap = softcap > 0
    round32 = (lambda x: x) if fp64 else f32
    recip = (lambda x: 1.0 / x) if fp64 else f32_recip
    return dict(
        logit_scale=round32(logit_scale),
        softcap=round32(softcap) if has_softcap else 0.0,
        inv_softcap=recip(softcap) if has_softcap else 0.0,
        inv_temp=recip(temperature),
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=has_softcap,
        INTERPRET=_INTERPRET,
        PRECISION=_precision(),
    )


def linear_logprobs_forward(
    hidden: torch.Tensor,  # (N, H) fp32/bf16/fp16/fp64, stride(1) == 1
    weight: torch.Tensor,  # (V, H) hidden's dtype, stride(1) == 1
    bias: torch.Tensor | None,  # (V,) float or None
    labels: torch.Tensor,  # (N,) int32/int64
    logit_scale: float,
    softcap: float,  # <= 0: off
    temperature: float,
    ignore_index: int,
    with_entropy: bool,
    round_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(logprobs [N] fp32, entropy [N] fp32 or [0], lse [N] fp64)`` on hidden.device
    (logprobs and entropy fp64 for fp64 inputs), with ``lse`` the log-sum-exp of ``z =
    softcap(logit_scale * (h W^T + b)) / T`` (what ``linear_logprobs_backward`` needs). Extra
    memory: a ``[3, N, cdiv(V, BLOCK_V)]`` scratch and an ``[N]`` vector, fp32 (fp64)."""
    _check(hidden, weight, bias, labels)
    n, h = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    fp64 = hidden.dtype == torch.float64
    cdt = torch.float64 if fp64 else torch.float32
    logp = torch.empty(n, dtype=cdt, device=device)
    entropy = torch.empty(n if with_entropy else 0, dtype=cdt, device=device)
    lse = torch.empty(n, dtype=torch.float64, device=device)
    if n == 0:
        return logp, entropy, lse
    if vocab == 0:
        # The reference's limits (see kernels/logprobs.py): every label is out of range.
        logp.copy_(torch.where(labels == ignore_index, 0.0, math.nan))
        lse.fill_(-math.inf)
        entropy.fill_(0.0)
        return logp, entropy, lse
    launch = _LAUNCH[hidden.element_size()]["fwd"]
    nvb = triton.cdiv(vocab, launch["BLOCK_V"])
    partials = torch.empty((3 if with_entropy else 2, n, nvb), dtype=cdt, device=device)
    m, s, t = partials[0], partials[1], partials[-1]
    label_z = torch.empty(n, dtype=cdt, device=device)
    _fwd_partials_kernel[(triton.cdiv(n, launch["BLOCK_N"]) * nvb,)](
        hidden, weight, weight if bias is None else bias, labels, m, s, t, label_z,
        n, vocab, h, hidden.stride(0), weight.stride(0), 1 if bias is None else bias.stride(0),
        labels.stride(0), nvb,
        WITH_ENTROPY=bool(with_entropy), EVEN_H=h % launch["BLOCK_H"] == 0, enable_fp_fusion=False,
        **_scalar_args(bias, logit_scale, softcap, temperature, fp64), **launch,
    )
    _fwd_finalize_kernel[(n,)](
        m, s, t, label_z, labels, logp, entropy if with_entropy else logp, lse,
        vocab, nvb, labels.stride(0), nvb, ignore_index, math.log(vocab),
        WITH_ENTROPY=bool(with_entropy), BLOCK_J=min(triton.next_power_of_2(nvb), 512),
        num_warps=4 if nvb >= 512 else 1, enable_fp_fusion=False,
    )
    return logp, entropy, lse


def linear_logprobs_backward(
    grad_logp: torch.Tensor,  # (N,) float, any stride (0 for an expanded scalar)
    grad_entropy: torch.Tensor | None,  # (N,) float or None
    hidden: torch.Tensor,  # (N, H) as in the forward
    weight: torch.Tensor,  # (V, H)
    bias: torch.Tensor | None,  # (V,) or None
    labels: torch.Tensor,  # (N,) int32/int64
    lse: torch.Tensor,  # (N,) fp64 (or fp32) from the forward
    entropy: torch.Tensor | None,  # (N,) fp32 (fp64) from the forward; needed with grad_entropy
    logit_scale: float,
    softcap: float,
    temperature: float,
    ignore_index: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    deterministic: bool = False,
    round_logits: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Returns ``(grad_hidden [N, H], grad_weight [V, H], grad_bias [V])`` in fp32, fp64 for fp64
    inputs (each None when not needed; grad_bias None without a bias).

    ``deterministic=False`` accumulates with fp32 atomics (3 GEMMs of work); ``True`` uses no
    atomics and fixed summation orders, at the cost of a fourth GEMM and fp32 read-modify-write
    traffic (see the module docstring); grad_hidden is then also batch invariant."""
    _check(hidden, weight, bias, labels)
    n, h = hidden.shape
    vocab = weight.shape[0]
    if grad_logp.shape != (n,) or (grad_entropy is not None and grad_entropy.shape != (n,)):
        raise ValueError(f"grad_logp and grad_entropy must be ({n},)")
    if lse.shape != (n,) or lse.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"lse must be float32/float64 of shape ({n},), got {lse.dtype} {tuple(lse.shape)}")
    if grad_entropy is not None and (entropy is None or entropy.shape != (n,)):
        raise ValueError(f"grad_entropy needs the forward's entropy of shape ({n},)")
    need_bias = need_bias and bias is not None
    device = hidden.device
    fp64 = hidden.dtype == torch.float64
    cdt = torch.float64 if fp64 else torch.float32
    grad_hidden = torch.zeros((n, h), dtype=cdt, device=device) if need_hidden else None
    grad_weight = torch.zeros((vocab, h), dtype=cdt, device=device) if need_weight else None
    grad_bias = torch.zeros(vocab, dtype=cdt, device=device) if need_bias else None
    if n == 0 or vocab == 0 or not (need_hidden or need_weight or need_bias):
        return grad_hidden, grad_weight, grad_bias
    launch = _LAUNCH[hidden.element_size()]
    has_grad_entropy = grad_entropy is not None
    # Unused pointers get a valid tensor the kernels never read or write; the empty one is
    # what the autotuner zeroes for grads that are not needed.
    unused = torch.empty(0, dtype=cdt, device=device)
    grad_entropy_arg = grad_entropy if has_grad_entropy else grad_logp
    entropy_arg = entropy if has_grad_entropy else lse
    inputs = (grad_logp, grad_entropy_arg, hidden, weight, weight if bias is None else bias,
              labels, lse, entropy_arg)
    sizes = (
        n, vocab, h, hidden.stride(0), weight.stride(0), 1 if bias is None else bias.stride(0),
        labels.stride(0), grad_logp.stride(0), grad_entropy_arg.stride(0), lse.stride(0),
        entropy_arg.stride(0),
    )
    scalars = dict(
        grad_scale=logit_scale / temperature if fp64 else f32(logit_scale / temperature),
        ignore_index=ignore_index,
        HAS_GRAD_ENTROPY=has_grad_entropy,
        ROUND_BF16=_INTERPRET and hidden.dtype == torch.bfloat16,
        enable_fp_fusion=False,
        **_scalar_args(bias, logit_scale, softcap, temperature, fp64),
    )

    def even(cfg):
        return dict(EVEN_H=h % cfg["BLOCK_H"] == 0, EVEN_HO=h % cfg["BLOCK_HO"] == 0)

    if not deterministic:
        cfg = launch["atomic"]
        _bwd_atomic[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(vocab, meta["BLOCK_V"]),)](
            *inputs,
            unused if grad_hidden is None else grad_hidden,
            unused if grad_weight is None else grad_weight,
            unused if grad_bias is None else grad_bias,
            *sizes, NEED_DH=need_hidden, NEED_DW=need_weight, NEED_DB=need_bias, **scalars,
            **even(cfg), **cfg,
        )
        return grad_hidden, grad_weight, grad_bias
    if need_hidden:
        cfg = launch["dh"]
        _bwd_dh_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
            *inputs, grad_hidden, *sizes, **scalars, **even(cfg), **cfg,
        )
    if need_weight or need_bias:
        cfg = launch["dw"]
        _bwd_dw_kernel[(triton.cdiv(vocab, cfg["BLOCK_V"]),)](
            *inputs,
            unused if grad_weight is None else grad_weight,
            unused if grad_bias is None else grad_bias,
            *sizes, NEED_DW=need_weight, NEED_DB=need_bias, **scalars, **even(cfg), **cfg,
        )
    return grad_hidden, grad_weight, grad_bias
