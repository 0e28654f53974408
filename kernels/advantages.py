"""Triton kernels of the advantage family: GAE / discounted returns as a chunked scan, group sums.

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
    T,  # padded length
    gamma, lam,  # fp32 (unused with FP64)
    HAS_VALUES: tl.constexpr, HAS_BOOT: tl.constexpr, PACKED: tl.constexpr, FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    acc = adv_ptr.dtype.element_ty  # the scan's type: fp32, or fp64 with FP64
    if FP64:
        gamma = tl.load(par_ptr)
        lam = tl.load(par_ptr + 1)
    row = tl.program_id(0).to(tl.int64)
    if PACKED:
        begin = tl.load(cu_ptr + row).to(tl.int64)
        length = tl.load(cu_ptr + row + 1).to(tl.int64) - begin
        r_base = begin
        v_base = begin
        m_base = begin
        o_base = begin
    else:
        length = T.to(tl.int64)
        r_base = row * r_stride
        v_base = row * v_stride
        m_base = row * m_stride
        o_base = row * T
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
