"""Triton helpers the kernels share: the exp and tanh every log-prob kernel uses (float32 and
float64), the floors that keep online log-sum-exp updates finite, and the float32 rounding of the
host-side hyper-parameters. kernels/logprobs.py explains the numerics; kernels/linear_logprobs.py
reuses them.
"""

from __future__ import annotations

import struct

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
# Logits are clamped to this before the online update: keeps every difference of maxima
# finite (no -inf - -inf = NaN, no 0 * -inf), and s * (m_old - m_new) stays < 3e38 for any
# realistic count. A row whose (soft-capped) logits are all <= -1e30 is treated as all -inf.
FLOOR = tl.constexpr(-1.0e30)
# exp(-200) is 0 in fp32: below this, p is exactly 0 and clamping keeps p * (a + b d) finite
# when u = -inf.
D_MIN = tl.constexpr(-200.0)
# Below this |x| tanh comes from an odd polynomial: 1 - 2 / (e^2x + 1) cancels near 0.
TANH_SMALL = tl.constexpr(0.55)
# float64 compute (float64 logits): -inf becomes -DBL_MAX (the clamp only keeps -inf - -inf out);
# u - m, m_old - m_new and u - lse are clamped at -1000 (e^-1000 is 0 in float64, as e^-200 is in
# float32): they may overflow to -inf at |logits| ~ 1e308, and 0 * -inf is NaN.
FLOOR64 = tl.constexpr(-1.7976931348623157e308)
D_MIN64 = tl.constexpr(-1000.0)


@triton.jit
def expm1_small_f64(y):
    """expm1(y) for float64 0 <= y <= 1.1, to a few ulp (e^y - 1 would cancel near 0).

    y / 16 (exact) keeps the Taylor series short: to a^9 / 9! the remainder is < 1e-17
    relative; then expm1(2a) = expm1(a) (expm1(a) + 2) four times, each a product of positive
    numbers (no cancellation, about an ulp each)."""
    a = y * 0.0625
    p = tl.fma(a, 1.0 / 9.0, 1.0)
    p = tl.fma(a * (1.0 / 8.0), p, 1.0)
    p = tl.fma(a * (1.0 / 7.0), p, 1.0)
    p = tl.fma(a * (1.0 / 6.0), p, 1.0)
    p = tl.fma(a * (1.0 / 5.0), p, 1.0)
    p = tl.fma(a * 0.25, p, 1.0)
    p = tl.fma(a * (1.0 / 3.0), p, 1.0)
    p = tl.fma(a * 0.5, p, 1.0)
    e = a * p
    e = e * (e + 2.0)
    e = e * (e + 2.0)
    e = e * (e + 2.0)
    e = e * (e + 2.0)
    return e


@triton.jit
def tanh_and_sech2_f64(x):
    """float64 (tanh(x), 1 - tanh(x)^2) to a few ulp, from ``tl.exp`` only (runs under
    TRITON_INTERPRET). Large |x|: t = e^-2|x|, tanh = (1 - t) / (1 + t), sech^2 = 4 t / (1 + t)^2
    (1 - t >= 0.66: no cancellation). Small |x|: with E = expm1(2|x|), tanh = E / (E + 2)."""
    ax = tl.abs(x)
    t = tl.exp(ax * -2.0)
    r = 1.0 / (1.0 + t)
    big = (1.0 - t) * r
    is_small = ax < TANH_SMALL  # False for NaN: NaN flows through the exp branch
    e = expm1_small_f64(tl.where(is_small, ax * 2.0, 0.0))
    small = e / (e + 2.0)
    th = tl.where(is_small, small, big)
    sech2 = tl.where(is_small, tl.fma(-small, small, 1.0), 4.0 * t * r * r)
    return tl.where(x < 0, -th, th), sech2


@triton.jit
def tanh_and_sech2(x):
    """Returns (tanh(x), 1 - tanh(x)^2), both to a few fp32 ulp (a few float64 ulp for float64
    x: ``tanh_and_sech2_f64``).

    libdevice.tanh does not run under TRITON_INTERPRET, so the CPU tests could not cover it.
    Large |x|: t = e^-2|x| in (0, 1] never overflows, tanh = (1 - t) / (1 + t), and sech^2 =
    4 t / (1 + t)^2 stays accurate where tanh saturates and 1 - tanh^2 would keep only its
    rounding error. Small |x|, where 1 - t cancels (most logits / c): an odd polynomial.
    """
    if x.dtype == tl.float64:
        return tanh_and_sech2_f64(x)
    ax = tl.abs(x)
    t = tl.exp2(ax * (-2.0 * LOG2E))
    r = 1.0 / (1.0 + t)
    big = (1.0 - t) * r
    big = tl.where(x < 0, -big, big)
    is_small = ax < TANH_SMALL  # False for NaN: NaN flows through the exp branch
    xs = tl.where(is_small, x, 0.0)  # keeps the unused polynomial from overflowing
    x2 = xs * xs
    # Least-squares fit of (tanh(x)/x - 1)/x^2 on [0, 0.55] in x^2: max rel. error 6.4e-8.
    poly = tl.fma(x2, -0.006272607482969761, 0.02107025310397148)
    poly = tl.fma(poly, x2, -0.053851865231990814)
    poly = tl.fma(poly, x2, 0.13332580029964447)
    poly = tl.fma(poly, x2, -0.33333316445350647)
    small = tl.fma(xs * x2, poly, xs)
    th = tl.where(is_small, small, big)
    sech2 = tl.where(is_small, tl.fma(-small, small, 1.0), 4.0 * t * r * r)
    return th, sech2


@triton.jit
def exp_(x):
    """e^x: exp2 of x log2(e) in float32 (the fast path); ``tl.exp`` in float64, where the
    rounding of x log2(e) would cost |x| ulps."""
    if x.dtype == tl.float64:
        return tl.exp(x)
    else:
        return tl.exp2(x * LOG2E)


@triton.jit
def to_out(g, dtype: tl.constexpr, ROUND_BF16: tl.constexpr):
    if ROUND_BF16:
        # TRITON_INTERPRET's fp32 -> bf16 cast truncates (the GPU's rounds to nearest even), so
        # the CPU tests would see bf16 grads an ulp off. Round the bits first; the cast is then
        # exact. Only traced under the interpreter.
        bits = g.to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        g = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
    return g.to(dtype)


@triton.jit
def span(cu_ptr, row, T, PACKED: tl.constexpr):
    """(start, length) of sequence ``row`` (int64): the packed segment ``[cu[row], cu[row + 1])``, or a
    padded row (start 0, length T). Launchers pass T = 0 and row strides of 0 for the packed layout, so a
    token's offset is ``start + t + row * row_stride`` in both layouts."""
    if PACKED:
        start = tl.load(cu_ptr + row).to(tl.int64)
        length = tl.load(cu_ptr + row + 1).to(tl.int64) - start
    else:
        start = row * 0
        length = T.to(tl.int64)
    return start, length


@triton.jit
def softplus(x):
    """log(1 + e^x) without overflow at any |x|; the log1p of e = e^-|x| <= 1 recovers the rounding of
    1 + e (u - 1 - e), accurate where e is tiny (float32 and float64)."""
    e = tl.exp(-tl.abs(x))
    u = 1.0 + e
    return tl.maximum(x, 0.0) + tl.log(u) - ((u - 1.0) - e) / u


@triton.jit
def sigmoid(x):
    """The logistic function from one exp of -|x| (no overflow)."""
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def f32_recip(x: float) -> float:
    """fp32(1 / fp32(x)), the reciprocal PyTorch multiplies by when it divides a float tensor by
    a Python scalar: the kernels' u = z * (1/T) are then PyTorch's fp32 z / T bit for bit, and
    their error against the float64 reference tracks PyTorch's own. (Rounding the float64
    quotient to fp32 is the correctly rounded fp32 quotient: 53 >= 2 * 24 + 2.)"""
    return f32(1.0 / f32(x))



@triton.jit
def nan_max(a, b):
    """tl.maximum that returns NaN for a NaN operand (tl.maximum's default returns the other
    one): a clamp or a PPO max must not turn a NaN log-prob into a finite loss (the NaN policy
    of tests/test_bad_inputs.py)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def nan_min(a, b):
    """tl.minimum that returns NaN for a NaN operand (see nan_max)."""
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)
