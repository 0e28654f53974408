"""Triton kernels of the advantage family: GAE / discounted returns as a chunked scan, group sums,
and the outcome ops (broadcast to tokens, group normalization and baselines, ReMax; see the
section "Outcome ops" below).

The math is that of ``rlkern.reference.advantages`` (the oracle).

GAE over the valid tokens of a row, right to left, is an affine recurrence on the state
``(A, V_next)`` (running advantage, value of the next valid token):

    valid t:   A <- gamma*lam * A + gamma * V_next + (r_t - v_t),   V_next <- v_t
    masked t:  A <- A,                                              V_next <- V_next

Each step is the map ``A' = p A + q N + c``, ``N' = s N + d`` (valid: p = gamma*lam, q = gamma,
c = r - v, s = 0, d = v; masked: the identity p = s = 1, q = c = d = 0). Maps compose
associatively, so a block of BLOCK tokens is one ``tl.associative_scan`` over 5-tuples; the block
is loaded right-to-left (offsets decrease along the block) so the scan runs backwards in time.
Each program walks its row's blocks from the end, applying the composed maps to the carried
state: T steps cost T / BLOCK dependent block steps, not T serial ones. Discounted returns are
the same scan with ``v = 0`` and ``lam = 1`` (then N stays 0 and A' = gamma A + r).

Precision: float32 state and outputs, or float64 throughout for float64 rewards (the scan's
type is the output's; gamma and lam then come from a float64 buffer, as a float argument of a
Triton kernel is float32).

Grid: one program per sequence (padded row or packed segment). Not done yet: splitting one
long sequence over several programs (a decoupled look-back across blocks) for batches smaller
than the number of SMs; the block scan would be unchanged.

Group sums (GRPO-family statistics): segment sums over dense group numbers with atomic adds in
float64 into an [N] buffer (group numbers are < N), then a gather; two passes for the centred
second moment.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlkern.kernels._common import span


@triton.jit
def _compose(p1, q1, c1, s1, d1, p2, q2, c2, s2, d2):
    # (p1..d1) is applied first (later in time), then (p2..d2).
    return p2 * p1, p2 * q1 + q2 * s1, p2 * c1 + q2 * d1 + c2, s2 * s1, s2 * d1 + d2


@triton.jit
def _gae_kernel(
    r_ptr,  # (B, T) rows with stride r_stride, or packed (total,); fp32/bf16/fp16/fp64
    v_ptr,  # like r_ptr (unused without HAS_VALUES)
    m_ptr,  # like r_ptr, uint8/int/float mask (nonzero = valid)
    boot_ptr,  # (B,) fp32 (fp64 with FP64) next value after the last token (HAS_BOOT)
    cu_ptr,  # (B + 1,) int32 (PACKED)
    adv_ptr,  # (B, T) or (total,) fp32 (fp64 with FP64), contiguous
    ret_ptr,  # like adv_ptr (HAS_VALUES)
    par_ptr,  # (2,) fp64 gamma, lam (FP64)
    r_stride, v_stride, m_stride,  # row strides in elements (padded layout)
    T,  # padded length (0 when packed)
    gamma, lam,  # fp32 (unused with FP64)
    HAS_VALUES: tl.constexpr, HAS_BOOT: tl.constexpr, PACKED: tl.constexpr, FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    acc = adv_ptr.dtype.element_ty  # the scan's type: fp32, or fp64 with FP64
    if FP64:
        gamma = tl.load(par_ptr)
        lam = tl.load(par_ptr + 1)
    row = tl.program_id(0).to(tl.int64)
    start, length = span(cu_ptr, row, T, PACKED)
    r_base = start + row * r_stride
    v_base = start + row * v_stride
    m_base = start + row * m_stride
    o_base = start + row * T
    carry_a = tl.zeros((), dtype=acc)
    if HAS_BOOT:
        carry_n = tl.load(boot_ptr + row).to(acc)
    else:
        carry_n = tl.zeros((), dtype=acc)
    lane = tl.arange(0, BLOCK)
    gl = gamma * lam
    n_blocks = tl.cdiv(length, BLOCK)
    for blk in range(0, n_blocks):
        t = length - 1 - blk * BLOCK - lane.to(tl.int64)  # decreasing time along the block
        inside = t >= 0
        valid = (tl.load(m_ptr + m_base + t, mask=inside, other=0) != 0) & inside
        r = tl.load(r_ptr + r_base + t, mask=inside, other=0.0).to(acc)
        if HAS_VALUES:
            v = tl.load(v_ptr + v_base + t, mask=inside, other=0.0).to(acc)
        else:
            v = tl.zeros((BLOCK,), dtype=acc)
        one = tl.full((BLOCK,), 1.0, acc)
        zero = tl.zeros((BLOCK,), dtype=acc)
        p = tl.where(valid, gl * one, one)
        q = tl.where(valid, gamma * one, zero)
        c = tl.where(valid, r - v, zero)
        s = tl.where(valid, zero, one)
        d = tl.where(valid, v, zero)
        p, q, c, s, d = tl.associative_scan((p, q, c, s, d), 0, _compose)
        a = p * carry_a + q * carry_n + c
        out = o_base + t
        tl.store(adv_ptr + out, tl.where(valid, a, 0.0), mask=inside)
        if HAS_VALUES:
            tl.store(ret_ptr + out, tl.where(valid, a + v, 0.0), mask=inside)
        last = lane == BLOCK - 1  # the whole block composed (padding lanes are identities)
        new_n = tl.sum(tl.where(last, s * carry_n + d, 0.0), axis=0)
        carry_a = tl.sum(tl.where(last, a, 0.0), axis=0)
        carry_n = new_n


# Largest scan block; the tests lower it to run many blocks (the carried state) at small T.
MAX_BLOCK = 1024


def _block(length: int) -> int:
    return max(16, min(MAX_BLOCK, triton.next_power_of_2(max(length, 1))))


def _mask_for_triton(mask: torch.Tensor) -> torch.Tensor:
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def _launch(rewards, values, mask, bootstrap, cu_seqlens, gamma, lam, with_values):
    packed = cu_seqlens is not None
    fp64 = rewards.dtype == torch.float64
    out_dtype = torch.float64 if fp64 else torch.float32
    out_adv = torch.empty(rewards.shape, dtype=out_dtype, device=rewards.device)
    out_ret = torch.empty_like(out_adv) if with_values else out_adv
    if rewards.numel() == 0:
        return out_adv, out_ret
    batch = cu_seqlens.shape[0] - 1 if packed else rewards.shape[0]
    steps = 0 if packed else rewards.shape[1]
    # packed: the longest segment is unknown without a sync; a block sized to the mean length
    block = _block(rewards.numel() // max(batch, 1) if packed else steps)
    row_stride = (lambda x: 0 if packed else x.stride(0))
    mask = _mask_for_triton(mask)
    values = values if with_values else rewards
    params = rewards
    if fp64:  # filled on the device: no host-to-device copy (and no sync)
        params = torch.full((2,), float(gamma), dtype=torch.float64, device=rewards.device)
        params[1] = float(lam)
    _gae_kernel[(batch,)](
        rewards, values, mask,
        bootstrap.to(device=rewards.device, dtype=out_dtype).contiguous() if bootstrap is not None else rewards,
        cu_seqlens if packed else rewards,
        out_adv, out_ret, params,
        row_stride(rewards), row_stride(values), row_stride(mask),
        steps, float(gamma), float(lam),
        HAS_VALUES=with_values, HAS_BOOT=bootstrap is not None, PACKED=packed, FP64=fp64, BLOCK=block,
    )
    return out_adv, out_ret


def gae(
    rewards: torch.Tensor,  # (B, T) or (total,) fp32/bf16/fp16/fp64, stride(-1) == 1
    values: torch.Tensor,  # rewards.shape, rewards.dtype
    mask: torch.Tensor,  # rewards.shape, bool/int/float
    bootstrap: torch.Tensor | None,  # (B,) or None
    cu_seqlens: torch.Tensor | None,  # (B + 1,) int32 or None
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(advantages, returns)`` of rewards' shape, float32 (float64 for float64 rewards;
    0 at masked positions)."""
    return _launch(rewards, values, mask, bootstrap, cu_seqlens, gamma, lam, True)


def discounted_returns(
    rewards: torch.Tensor,  # (B, T) or (total,)
    mask: torch.Tensor,  # rewards.shape
    cu_seqlens: torch.Tensor | None,
    gamma: float,
) -> torch.Tensor:
    """Returns discounted returns of rewards' shape, float32 (float64 for float64 rewards; 0 at
    masked positions)."""
    return _launch(rewards, None, mask, None, cu_seqlens, gamma, 1.0, False)[0]


@triton.jit
def _group_add_kernel(
    x_ptr,  # (N,) fp64
    idx_ptr,  # (N,) int64 dense group numbers in [0, N)
    out_ptr,  # (N,) fp64 group accumulators (zeroed)
    N,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    x = tl.load(x_ptr + offs, mask=inside, other=0.0)
    g = tl.load(idx_ptr + offs, mask=inside, other=0)
    tl.atomic_add(out_ptr + g, x, mask=inside)


def _group_sum(x: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    n = x.numel()
    acc = torch.zeros(n, dtype=torch.float64, device=x.device)
    if n:
        block = 1024
        _group_add_kernel[(triton.cdiv(n, block),)](x.contiguous(), inverse.contiguous(), acc, n, BLOCK=block)
    return acc[inverse]


def group_moments(
    x: torch.Tensor,  # (N,) fp64
    inverse: torch.Tensor,  # (N,) int64 in [0, N)
    scored: torch.Tensor | None = None,  # (N,) fp64 0/1: only these samples count (x is 0 elsewhere)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample: (count, mean, sum of squared deviations) of its group, float64 [N] each."""
    count = _group_sum(torch.ones_like(x) if scored is None else scored, inverse)
    mean = _group_sum(x, inverse) / count.clamp_min(1.0)
    dev = x - mean if scored is None else (x - mean) * scored
    return count, mean, _group_sum(dev * dev, inverse)


# ---------------------------------------------------------------------------------------------
# Outcome ops: per-sample values broadcast to tokens, group normalization and baselines, ReMax.
#
# Group statistics are float64 atomic sums into a zeroed (3, N) buffer indexed by the dense group
# number (< N), batch-wide ones into a (4,) buffer (one atomic per program of a block-wide sum);
# a second pass adds the centred squares about those means; a last pass computes each sample's
# value from its group's sums, in float64, and rounds it to the output dtype. The broadcast to
# tokens is then ``value * mask`` (one program per row or packed segment), in the dtype PyTorch
# would promote the product to (float64 when the value or the mask is float64, else float32), so
# the tokens are those of rlkern/ops/advantages/fallback.py bit for bit.
#
# Hyper-parameters (eps, GPG's f_norm) come from a float64 device buffer: a float argument of a
# Triton kernel is float32. No launcher reads a value back to the host.

GROUP_BLOCK = 1024

# _baseline_finish_kernel's MODE, by fallback.group_baseline's mode string
BASELINE_MODES = {"rloo_raw": 0, "rloo_zero": 1, "mean": 2, "weighted": 3, "gpg": 4}


@triton.jit
def _broadcast_kernel(
    s_ptr,  # (B,) per-sequence values, any float, stride s_stride
    m_ptr,  # (B, T) strides (m_row, m_col), or packed (total,) stride m_col; uint8 (bool)/int/float
    cu_ptr,  # (B + 1,) int32 (PACKED)
    out_ptr,  # (B, T) or (total,) contiguous, scores' dtype
    s_stride, m_row, m_col,  # strides in elements
    T,  # padded length (0 when packed)
    PACKED: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    start, length = span(cu_ptr, row, T, PACKED)
    m_base = start * m_col + row * m_row
    o_base = start + row * T
    if FP64:
        s = tl.load(s_ptr + row * s_stride).to(tl.float64)
    else:
        s = tl.load(s_ptr + row * s_stride).to(tl.float32)
    lane = tl.arange(0, BLOCK).to(tl.int64)
    for start in range(0, length, BLOCK):
        t = start + lane
        inside = t < length
        m = tl.load(m_ptr + m_base + t * m_col, mask=inside, other=0).to(s.dtype)
        tl.store(out_ptr + o_base + t, (s * m).to(out_ptr.dtype.element_ty), mask=inside)


def broadcast(
    scores: torch.Tensor,  # (B,) float
    mask: torch.Tensor,  # (B, T), or packed (total,) with cu_seqlens; bool/int/float
    cu_seqlens: torch.Tensor | None,  # (B + 1,) int32 or None
) -> torch.Tensor:
    """``scores[b] * mask`` over row b or packed segment b, in scores' dtype (fallback.broadcast)."""
    out = torch.empty(mask.shape, dtype=scores.dtype, device=scores.device)
    packed = cu_seqlens is not None
    batch = cu_seqlens.shape[0] - 1 if packed else mask.shape[0]
    if out.numel() == 0 or batch == 0:
        return out
    steps = 0 if packed else mask.shape[1]
    m = _mask_for_triton(mask)
    _broadcast_kernel[(batch,)](
        scores, m, cu_seqlens if packed else scores, out,
        scores.stride(0), 0 if packed else m.stride(0), m.stride(-1), steps,
        PACKED=packed, FP64=torch.float64 in (scores.dtype, mask.dtype),
        BLOCK=_block(mask.numel() // batch if packed else steps),
    )
    return out


@triton.jit
def _group_sums_kernel(
    x_ptr,  # (N,) scores, fp32/bf16/fp16/fp64
    w_ptr,  # (N,) weights, any float (HAS_W)
    idx_ptr,  # (N,) int64 dense group numbers in [0, N)
    sums_ptr,  # (3, N) fp64 zeroed: per group count, sum of x (of w x with HAS_W), sum of w (HAS_W)
    batch_ptr,  # (4,) fp64 zeroed: [0] count, [1] sum of x, [2] count of x != 0 (BATCH)
    N,
    SKIP_NAN: tl.constexpr, HAS_W: tl.constexpr, BATCH: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float64)
    g = tl.load(idx_ptr + offs, mask=inside, other=0)
    scored = tl.where(inside, 1.0, 0.0).to(tl.float64)
    if SKIP_NAN:  # a NaN score counts in no sum
        scored = tl.where(x == x, scored, 0.0)
        x = tl.where(x == x, x, 0.0)
    tl.atomic_add(sums_ptr + g, scored, mask=inside)
    if HAS_W:
        w = tl.load(w_ptr + offs, mask=inside, other=0.0).to(tl.float64)
        tl.atomic_add(sums_ptr + N + g, w * x, mask=inside)
        tl.atomic_add(sums_ptr + 2 * N + g, w, mask=inside)
    else:
        tl.atomic_add(sums_ptr + N + g, x, mask=inside)
    if BATCH:
        tl.atomic_add(batch_ptr, tl.sum(scored, axis=0))
        tl.atomic_add(batch_ptr + 1, tl.sum(x, axis=0))
        tl.atomic_add(batch_ptr + 2, tl.sum(tl.where(inside & (x != 0), 1.0, 0.0).to(tl.float64), axis=0))


@triton.jit
def _group_dev_kernel(
    x_ptr,  # (N,) scores, fp32/bf16/fp16/fp64
    idx_ptr,  # (N,) int64 dense group numbers in [0, N)
    sums_ptr,  # (3, N) fp64 from _group_sums_kernel; row 2 gets the group sums of squared deviations (GROUP)
    batch_ptr,  # (4,) fp64 from _group_sums_kernel; [3] gets the batch sum of squared deviations (BATCH)
    N,
    SKIP_NAN: tl.constexpr, GROUP: tl.constexpr, BATCH: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float64)
    scored = tl.where(inside, 1.0, 0.0).to(tl.float64)
    if SKIP_NAN:
        scored = tl.where(x == x, scored, 0.0)
        x = tl.where(x == x, x, 0.0)
    if GROUP:
        g = tl.load(idx_ptr + offs, mask=inside, other=0)
        count = tl.load(sums_ptr + g, mask=inside, other=1.0)
        mean = tl.load(sums_ptr + N + g, mask=inside, other=0.0) / tl.maximum(count, 1.0)
        dev = (x - mean) * scored
        tl.atomic_add(sums_ptr + 2 * N + g, dev * dev, mask=inside)
    if BATCH:
        mean = tl.load(batch_ptr + 1) / tl.maximum(tl.load(batch_ptr), 1.0)
        dev = (x - mean) * scored
        tl.atomic_add(batch_ptr + 3, tl.sum(dev * dev, axis=0))


@triton.jit
def _normalize_finish_kernel(
    x_ptr,  # (N,) scores, fp32/bf16/fp16/fp64
    idx_ptr,  # (N,) int64 dense group numbers in [0, N)
    sums_ptr,  # (3, N) fp64 group count, sum, sum of squared deviations
    batch_ptr,  # (4,) fp64 batch count, sum, -, sum of squared deviations
    par_ptr,  # (1,) fp64 eps
    out_ptr,  # (N,) fp32 (fp64 for fp64 scores)
    N,
    SKIP_NAN: tl.constexpr, DIVIDE: tl.constexpr, BATCH_SCALE: tl.constexpr, UNBIASED: tl.constexpr,
    VERL: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float64)
    scored = x == x
    if SKIP_NAN:
        x = tl.where(scored, x, 0.0)
    g = tl.load(idx_ptr + offs, mask=inside, other=0)
    count = tl.load(sums_ptr + g, mask=inside, other=1.0)
    mean = tl.load(sums_ptr + N + g, mask=inside, other=0.0) / tl.maximum(count, 1.0)
    single = count <= 1.0
    if VERL:  # a group of one: mean 0, std 1
        mean = tl.where(single, 0.0, mean)
    out = x - mean
    if DIVIDE:
        if BATCH_SCALE:
            n = tl.load(batch_ptr)
            if UNBIASED:
                denom = n - 1.0
            else:
                denom = n
            spread = tl.sqrt(tl.load(batch_ptr + 3) / tl.maximum(denom, 1.0))
            spread = tl.where(n > 1.0, spread, 0.0)
        else:
            if UNBIASED:
                denom = count - 1.0
            else:
                denom = count
            spread = tl.sqrt(tl.load(sums_ptr + 2 * N + g, mask=inside, other=0.0) / tl.maximum(denom, 1.0))
            if VERL:
                spread = tl.where(single, 1.0, spread)
        out = out / (spread + tl.load(par_ptr))
    if not VERL:  # singleton "zero"
        out = tl.where(single, 0.0, out)
    if SKIP_NAN:
        out = tl.where(scored, out, 0.0)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _baseline_finish_kernel(
    x_ptr,  # (N,) scores, fp32/bf16/fp16/fp64
    idx_ptr,  # (N,) int64 dense group numbers in [0, N)
    sums_ptr,  # (3, N) fp64 group count, sum of x (of w x for "weighted"), sum of w ("weighted")
    batch_ptr,  # (4,) fp64; [2] count of nonzero scores ("gpg")
    par_ptr,  # (1,) fp64 f_norm ("gpg")
    out_ptr,  # (N,) fp32 (fp64 for fp64 scores)
    N,
    MODE: tl.constexpr,  # BASELINE_MODES
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float64)
    g = tl.load(idx_ptr + offs, mask=inside, other=0)
    count = tl.load(sums_ptr + g, mask=inside, other=1.0)
    total = tl.load(sums_ptr + N + g, mask=inside, other=0.0)
    if MODE <= 1:  # RLOO: n / (n - 1) (s - mean) = (n s - sum) / (n - 1)
        loo = (count * x - total) / tl.maximum(count - 1.0, 1.0)
        if MODE == 0:
            out = tl.where(count > 1.0, loo, x)
        else:
            out = tl.where(count > 1.0, loo, 0.0)
    elif MODE == 3:  # weighted: s - sum(w s) / sum(w)
        weight = tl.load(sums_ptr + 2 * N + g, mask=inside, other=1.0)
        out = x - tl.where(count > 1.0, total / weight, 0.0)
    else:
        out = x - tl.where(count > 1.0, total / tl.maximum(count, 1.0), 0.0)
        if MODE == 4:  # GPG: alpha = N / max(#{s != 0}, 1)
            alpha = N.to(tl.float64) / tl.maximum(tl.load(batch_ptr + 2), 1.0)
            out = alpha * out / tl.load(par_ptr)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=inside)


def _per_sample(scores, inverse, mask, cu_seqlens, param, launch):
    """Calls ``launch(x, idx, sums, batch, par, values, grid)`` for N > 0 samples (x, idx: scores and
    group numbers, contiguous; sums (3, N) and batch (4,) float64 zeroed; par (1,) float64 param;
    values (N,) float32, float64 for float64 scores); returns values, or values * mask per token."""
    n, device = scores.shape[0], scores.device
    values = torch.empty(n, dtype=torch.float64 if scores.dtype == torch.float64 else torch.float32, device=device)
    if n:
        launch(scores.contiguous(), inverse.contiguous(), torch.zeros((3, n), dtype=torch.float64, device=device),
               torch.zeros(4, dtype=torch.float64, device=device),
               torch.full((1,), float(param), dtype=torch.float64, device=device), values,
               (triton.cdiv(n, GROUP_BLOCK),))
    return values if mask is None else broadcast(values, mask, cu_seqlens)


def group_normalize(
    scores: torch.Tensor,  # (N,) fp32/bf16/fp16/fp64
    inverse: torch.Tensor,  # (N,) int64 dense group numbers in [0, N)
    mask: torch.Tensor | None,  # None, (N, T), or packed (total,) with cu_seqlens
    cu_seqlens: torch.Tensor | None,  # (N + 1,) int32 or None
    eps: float, std: str, scale: str, singleton: str, skip_nan: bool,
) -> torch.Tensor:
    """fallback.group_normalize's contract: (N,) or mask's shape, float32 (float64 for float64 scores)."""
    skip_nan = bool(skip_nan)
    divide = std != "none" and scale != "none"
    batch_scale = divide and scale == "batch"

    def launch(x, idx, sums, batch, par, values, grid):
        n = x.shape[0]
        _group_sums_kernel[grid](x, x, idx, sums, batch, n, SKIP_NAN=skip_nan, HAS_W=False, BATCH=batch_scale,
                                 BLOCK=GROUP_BLOCK)
        if divide:
            _group_dev_kernel[grid](x, idx, sums, batch, n, SKIP_NAN=skip_nan, GROUP=not batch_scale,
                                    BATCH=batch_scale, BLOCK=GROUP_BLOCK)
        _normalize_finish_kernel[grid](x, idx, sums, batch, par, values, n, SKIP_NAN=skip_nan, DIVIDE=divide,
                                       BATCH_SCALE=batch_scale, UNBIASED=std == "unbiased",
                                       VERL=singleton == "verl", BLOCK=GROUP_BLOCK)

    return _per_sample(scores, inverse, mask, cu_seqlens, eps, launch)


def group_baseline(
    scores: torch.Tensor,  # (N,) fp32/bf16/fp16/fp64
    inverse: torch.Tensor,  # (N,) int64 dense group numbers in [0, N)
    weights: torch.Tensor | None,  # (N,) float (mode "weighted")
    mask: torch.Tensor | None,  # None, (N, T), or packed (total,) with cu_seqlens
    cu_seqlens: torch.Tensor | None,  # (N + 1,) int32 or None
    mode: str, param: float,
) -> torch.Tensor:
    """fallback.group_baseline's contract: (N,) or mask's shape, float32 (float64 for float64 scores)."""
    weighted = mode == "weighted"

    def launch(x, idx, sums, batch, par, values, grid):
        n = x.shape[0]
        _group_sums_kernel[grid](x, weights.contiguous() if weighted else x, idx, sums, batch, n, SKIP_NAN=False,
                                 HAS_W=weighted, BATCH=mode == "gpg", BLOCK=GROUP_BLOCK)
        _baseline_finish_kernel[grid](x, idx, sums, batch, par, values, n, MODE=BASELINE_MODES[mode],
                                      BLOCK=GROUP_BLOCK)

    return _per_sample(scores, inverse, mask, cu_seqlens, param, launch)


@triton.jit
def _remax_kernel(
    r_ptr,  # (B, T) rows with stride r_stride, or packed (total,); fp32/bf16/fp16/fp64
    m_ptr,  # like r_ptr (m_stride), uint8 (bool)/int/float mask (multiplied by value)
    b_ptr,  # (B,) baselines, any float, stride b_stride
    cu_ptr,  # (B + 1,) int32 (PACKED)
    adv_ptr,  # (B, T) or (total,) fp32 (fp64 for fp64 rewards), contiguous
    ret_ptr,  # like adv_ptr
    r_stride, m_stride, b_stride,  # strides in elements
    T,  # padded length (0 when packed)
    PACKED: tl.constexpr, BLOCK: tl.constexpr,
):
    out_ty = adv_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    start, length = span(cu_ptr, row, T, PACKED)
    r_base = start + row * r_stride
    m_base = start + row * m_stride
    o_base = start + row * T
    base = tl.load(b_ptr + row * b_stride).to(out_ty)
    lane = tl.arange(0, BLOCK).to(tl.int64)
    carry = tl.zeros((), dtype=tl.float64)  # sum of r * mask after the block
    for blk in range(0, tl.cdiv(length, BLOCK)):
        t = length - 1 - blk * BLOCK - lane  # decreasing time along the block: the cumsum is a suffix sum
        inside = t >= 0
        # the mask's value rounded to the output dtype first, as fallback.remax's mask.to(dtype)
        m = tl.load(m_ptr + m_base + t, mask=inside, other=0).to(out_ty)
        y = tl.load(r_ptr + r_base + t, mask=inside, other=0.0).to(tl.float64) * m.to(tl.float64)
        ret = (carry + tl.cumsum(y, 0)).to(out_ty)
        tl.store(ret_ptr + o_base + t, ret, mask=inside)
        tl.store(adv_ptr + o_base + t, ret - base * m, mask=inside)
        carry += tl.sum(y, axis=0)


def remax(
    rewards: torch.Tensor,  # (B, T) or packed (total,); fp32/bf16/fp16/fp64, stride(-1) == 1
    reward_baselines: torch.Tensor,  # (B,) float
    mask: torch.Tensor,  # rewards.shape, bool/int/float, stride(-1) == 1
    cu_seqlens: torch.Tensor | None,  # (B + 1,) int32 or None
) -> tuple[torch.Tensor, torch.Tensor]:
    """fallback.remax's contract: ``(returns - baseline * mask, returns)``, float32 (float64 for float64
    rewards), reward-to-go of ``rewards * mask`` summed in float64."""
    out_dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    adv = torch.empty(rewards.shape, dtype=out_dtype, device=rewards.device)
    ret = torch.empty_like(adv)
    packed = cu_seqlens is not None
    batch = cu_seqlens.shape[0] - 1 if packed else rewards.shape[0]
    if rewards.numel() == 0 or batch == 0:
        return adv, ret
    steps = 0 if packed else rewards.shape[1]
    m = _mask_for_triton(mask)
    _remax_kernel[(batch,)](
        rewards, m, reward_baselines, cu_seqlens if packed else rewards, adv, ret,
        0 if packed else rewards.stride(0), 0 if packed else m.stride(0), reward_baselines.stride(0), steps,
        PACKED=packed, BLOCK=_block(rewards.numel() // batch if packed else steps),
    )
    return adv, ret
