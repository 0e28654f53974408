// rlkern CPU kernel: token log-probs + entropy, forward and backward (torch.ops.rlkern.logprobs_*).
//
// Per row of logits z[V] and label y (oracle: rlkern/reference/logprobs.py):
//   u = softcap(z) / T,  lse = log sum exp u,  logp = min(u_y - lse, 0),  H = lse - sum p u.
// Forward: each row is read from memory once, in L1-sized chunks: a max pass, then an exp pass over
// the in-cache chunk accumulating s = sum e^{u-m} and t = sum e^{u-m} (u-m) relative to the running
// max m (rebased when m grows; the next chunks are prefetched meanwhile), so lse = m + ln s and
// H = ln s - t/s stay exact for |logits| ~ 1e4. Backward: one read and one write per element
// (in-place safe: each vector is read before it is written). The vocab loops use AVX2/FMA/F16C
// intrinsics chosen at runtime (exp2/tanh of our own); a scalar path covers other CPUs.
//
// Shard mode (vocab_start >= 0, vocabulary-parallel callers: rlkern/ops/vocab_parallel.py): the
// [N, V] logits are columns [vocab_start, vocab_start + V) of a larger vocabulary and labels are
// global ids; "in shard" means 0 <= y - vocab_start < V. The forward returns this shard's lse and
// entropy, and as logp u_y - lse_shard for in-shard labels (-inf when the shard's row is all
// -inf), 0 for every other label (no NaN: out-of-shard is normal). The backward takes the GLOBAL
// lse and entropy: every row whose label is not ignore_index gets the softmax terms, the one-hot
// term only lands when the label is in the shard.
// Narrow ATen headers rather than <ATen/ATen.h>: the same API for far less compile time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>


namespace {

using at::BFloat16;
using at::Half;

constexpr int64_t kChunk = 4096;  // elements per forward chunk (<= 16 KiB of floats, in L1 between passes)
constexpr float kInf = std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------------
// Per-call constants and row I/O.

struct Cfg {
  float inv_t;     // 1/T rounded to float
  float inv_t_lo;  // 1/T - inv_t: inv_t + inv_t_lo is 1/T to ~double precision
  float sgn;       // sign(T): the forward's running "max" is taken over sgn * softcap(z)
  float cap, inv_cap;  // softcap c and 1/c (c == 0: off)
  int64_t ignore;
  int64_t vstart;  // -1: the logits are the whole vocabulary; >= 0: first column's global id
};

// Position of global label y in this row's columns: y itself, or y - vstart in shard mode
// (negative labels stay negative; no overflow for any int64 y).
inline int64_t local_label(const Cfg& c, int64_t y) { return c.vstart >= 0 && y >= 0 ? y - c.vstart : y; }

Cfg make_cfg(double temperature, double softcap, int64_t ignore_index, int64_t vocab_start) {
  Cfg c;
  const double inv = 1.0 / temperature;
  c.inv_t = static_cast<float>(inv);
  c.inv_t_lo = static_cast<float>(inv - static_cast<double>(c.inv_t));
  c.sgn = temperature > 0 ? 1.f : -1.f;
  c.cap = softcap > 0 ? static_cast<float>(softcap) : 0.f;
  c.inv_cap = softcap > 0 ? static_cast<float>(1.0 / softcap) : 0.f;
  c.ignore = ignore_index;
  c.vstart = vocab_start;
  return c;
}

template <typename O>  // output type: float, or double for float64 logits
struct FwdArgsT {
  const void* logits;
  int64_t stride, V;
  const void* labels;
  bool labels64;
  O *logp, *ent;  // ent may be null
  double* lse;       // float64: the backward's p = exp(u - lse) keeps fp32 accuracy at large |u|
  Cfg c;
};

using FwdArgs = FwdArgsT<float>;

template <typename G>  // upstream gradients and saved entropy: float, or double for float64 logits
struct BwdArgsT {
  const void* logits;
  void* grad;
  int64_t stride, gstride, V;
  const void* labels;
  bool labels64;
  const G *gl, *gh, *ent;  // gh / ent null when the entropy has no gradient
  const double* lse;
  Cfg c;
};
using BwdArgs = BwdArgsT<float>;

inline int64_t label_at(const void* p, bool is64, int64_t i) {
  return is64 ? static_cast<const int64_t*>(p)[i] : static_cast<int64_t>(static_cast<const int32_t*>(p)[i]);
}

inline float scalar_w(float z, const Cfg& c, bool cap) { return cap ? c.cap * std::tanh(z * c.inv_cap) : z; }

// Final per-row outputs. y: global label, yl: its column here; live: the row has a finite max (not
// all -inf, V > 0); logp_raw = u_y - lse; S, T: sum e^d and sum e^d d for d = u - (any per-row
// offset), so H = ln S - T / S; T NaN: the row has a NaN logit, and lse, logp (unless ignored) and
// H are NaN. A label outside the columns is NaN, or 0 in shard mode (another shard holds it).
template <typename O>
inline void finish_fwd(const FwdArgsT<O>& a, int64_t i, int64_t y, int64_t yl, bool live, double lse,
                       double logp_raw, double S, double T) {
  const int64_t V = a.V;
  const bool shard = a.c.vstart >= 0;
  const bool ignored = y == a.c.ignore;
  const bool in_range = yl >= 0 && yl < V;
  const O nan = std::numeric_limits<O>::quiet_NaN();
  const O outside = shard ? O(0) : nan;
  if (!live && T == T) {  // all -inf row (or V == 0): uniform by convention, lse = -inf
    const double logv = std::log(static_cast<double>(std::max<int64_t>(V, 1)));
    a.lse[i] = -kInf;
    // A shard's all -inf row is not the whole row: its label has probability 0 unless every
    // shard is -inf, which the combine step decides (it ignores this value then).
    const O dead_logp = shard ? O(-kInf) : static_cast<O>(-logv);
    a.logp[i] = ignored ? O(0) : (in_range ? dead_logp : outside);
    if (a.ent) a.ent[i] = static_cast<O>(logv);
    return;
  }
  if (T != T) lse = logp_raw = T;  // NaN logits (t is NaN whenever some x is)
  a.lse[i] = lse;
  if (a.ent) {  // >= 0 (rounding gives -6e-8 on peaked rows); NaN stays NaN
    const double H = std::log(S) - T / S;
    a.ent[i] = static_cast<O>(H < 0 ? 0.0 : H);
  }
  a.logp[i] = ignored ? O(0) : (in_range ? static_cast<O>(logp_raw > 0 ? 0.0 : logp_raw) : outside);
}

// ---------------------------------------------------------------------------------------------
// float64 logits: every step in double (outputs and the upstream gradients float64 too), one
// pass for the row max and one for the sums (the rows are re-read from cache).

inline double w64(double z, double cap) { return cap > 0 ? cap * std::tanh(z / cap) : z; }

// a * b rounded to double and never fused into a following add: C++ lets GCC contract
// a * b - c into an FMA, which keeps the rounding residual of a * b. d = u - m must be 0 at the
// row max (the residual reaches 1e292 at |u| ~ 1e308, where e^d overflows), and every float64
// path must form the same u = z * inv_t.
inline double mul_rounded(double a, double b) {
  double u = a * b;
#if RLK_X86_SIMD
  __asm__("" : "+x"(u));
#elif defined(__GNUC__) || defined(__clang__)
  __asm__("" : "+m"(u));
#endif
  return u;
}

// S += sum e^d, T += sum e^d d over columns [j0, V), d = max(u - m, -708) as in the AVX2 pass (a
// NaN d, from a NaN logit or +inf - +inf, reaches T).
inline void sums_f64(const double* row, int64_t j0, int64_t V, double inv_t, double cap, double m, double& S,
                     double& T) {
  for (int64_t j = j0; j < V; ++j) {
    double d = mul_rounded(w64(row[j], cap), inv_t) - m;
    d = d < -708.0 ? -708.0 : d;  // NaN stays NaN
    const double e = std::exp(d);
    S += e;
    T += e * d;
  }
}

// Row i's outputs from its max m (-inf: an all -inf row), sums and NaN flag.
inline void finish_row_f64(const FwdArgsT<double>& a, int64_t i, const double* row, double inv_t, double cap,
                           double m, double S, double T, bool nan) {
  const int64_t y = label_at(a.labels, a.labels64, i);
  const int64_t yl = local_label(a.c, y);
  double lse = -kInf, logp = 0;
  if (m > -kInf) {
    lse = m + std::log(S);
    if (yl >= 0 && yl < a.V) logp = (mul_rounded(w64(row[yl], cap), inv_t) - m) - std::log(S);
  }
  finish_fwd(a, i, y, yl, m > -kInf, lse, logp, S, nan ? std::numeric_limits<double>::quiet_NaN() : T);
}

void fwd_rows_f64(const FwdArgsT<double>& a, double temperature, double cap, int64_t r0, int64_t r1) {
  const int64_t V = a.V;
  const double inv_t = 1.0 / temperature;
  for (int64_t i = r0; i < r1; ++i) {
    const double* row = static_cast<const double*>(a.logits) + i * a.stride;
    double m = -kInf;
    bool nan = false;
    for (int64_t j = 0; j < V; ++j) {
      const double u = mul_rounded(w64(row[j], cap), inv_t);
      nan |= u != u;
      m = u > m ? u : m;
    }
    double S = 0, T = 0;
    if (m > -kInf) sums_f64(row, 0, V, inv_t, cap, m, S, T);
    finish_row_f64(a, i, row, inv_t, cap, m, S, T, nan);
  }
}

// One row of the float64 backward: its logits and gradient, lse and upstream terms, the label's
// column; live false: an all -inf row, whose gradient is zeroed here.
struct RowF64 {
  const double* z;
  double* g;
  double lse, gl, gh, H;
  int64_t yl;
  bool here, live;
};

inline RowF64 row_f64(const BwdArgsT<double>& a, int64_t i) {
  const Cfg& c = a.c;
  RowF64 r;
  r.z = static_cast<const double*>(a.logits) + i * a.stride;
  r.g = static_cast<double*>(a.grad) + i * a.gstride;
  r.lse = a.lse[i];
  r.live = r.lse != -kInf;
  if (!r.live) {
    std::fill(r.g, r.g + a.V, 0.0);
    return r;
  }
  const int64_t y = label_at(a.labels, a.labels64, i);
  r.yl = local_label(c, y);
  r.here = y != c.ignore && r.yl >= 0 && r.yl < a.V;  // as in bwd_rows_scalar
  const bool row_live = r.here || (c.vstart >= 0 && y != c.ignore);
  r.gl = row_live ? a.gl[i] : 0.0;
  r.gh = a.gh ? a.gh[i] : 0.0;
  r.H = a.gh ? a.ent[i] : 0.0;
  return r;
}

// Gradient of column j of a live row whose logit is z (the label's one-hot term with expm1 for
// 1 - p near 1).
inline double grad_at_f64(const RowF64& r, int64_t j, double z, double inv_t, double cap) {
  double w = z, sech2 = 1;
  if (cap > 0) {
    const double x = z / cap;
    w = cap * std::tanh(x);
    const double e = std::exp(-2.0 * std::abs(x));
    sech2 = 4 * e / ((1 + e) * (1 + e));
  }
  const double d = mul_rounded(w, inv_t) - r.lse;
  const double p = std::exp(d);
  double g = (j == r.yl && r.here) ? r.gl * -std::expm1(d) : -r.gl * p;
  if (p > 0) g -= r.gh * p * (d + r.H);
  return g * inv_t * sech2;
}

// Gradient columns [j0, j1) of a live row (column by column: g may alias z, in-place backward).
inline void grad_f64(const RowF64& r, int64_t j0, int64_t j1, double inv_t, double cap) {
  for (int64_t j = j0; j < j1; ++j) r.g[j] = grad_at_f64(r, j, r.z[j], inv_t, cap);
}

void bwd_rows_f64(const BwdArgsT<double>& a, double temperature, double cap, int64_t r0, int64_t r1) {
  const double inv_t = 1.0 / temperature;
  for (int64_t i = r0; i < r1; ++i) {
    const RowF64 r = row_f64(a, i);
    if (r.live) grad_f64(r, 0, a.V, inv_t, cap);
  }
}

// ---------------------------------------------------------------------------------------------
// Portable scalar path (CPUs without AVX2, or RLKERN_NO_SIMD=1).

template <typename T>
void fwd_rows_scalar(const FwdArgs& a, int64_t r0, int64_t r1) {
  const Cfg& c = a.c;
  const bool cap = c.cap > 0;
  const int64_t V = a.V;
  const double inv_t = static_cast<double>(c.inv_t) + c.inv_t_lo;
  std::vector<float> buf(static_cast<size_t>(std::min(V, kChunk)));
  for (int64_t i = r0; i < r1; ++i) {
    const T* row = static_cast<const T*>(a.logits) + i * a.stride;
    float vref = -kInf;  // running max of sgn * w
    double S = 0, Tt = 0;
    bool nan = false;
    for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
      const int64_t n = std::min(kChunk, V - c0);
      float cm = -kInf;
      for (int64_t j = 0; j < n; ++j) {
        const float w = scalar_w(static_cast<float>(row[c0 + j]), c, cap);
        buf[j] = w;
        nan |= w != w;
        cm = std::max(cm, c.sgn * w);
      }
      if (!(cm > -kInf)) continue;
      if (cm > vref) {
        if (vref > -kInf) {
          const double delta = (static_cast<double>(vref) - cm) * std::abs(inv_t);
          const double r = std::exp(delta);
          Tt = r * (Tt + S * delta);
          S *= r;
        }
        vref = cm;
      }
      const float wref = c.sgn * vref;
      for (int64_t j = 0; j < n; ++j) {
        const float d = (buf[j] - wref) * c.inv_t;
        const double e = std::exp(static_cast<double>(d));
        S += e;
        if (e > 0 || d != d) Tt += e * d;
      }
    }
    const int64_t y = label_at(a.labels, a.labels64, i);
    const int64_t yl = local_label(c, y);
    double lse = -kInf, logp = 0;
    if (vref > -kInf) {
      const float wref = c.sgn * vref;
      lse = wref * inv_t + std::log(S);
      if (yl >= 0 && yl < V) {
        logp = static_cast<double>((scalar_w(static_cast<float>(row[yl]), c, cap) - wref) * c.inv_t) - std::log(S);
      }
    }
    finish_fwd(a, i, y, yl, vref > -kInf, lse, logp, S, nan ? std::numeric_limits<double>::quiet_NaN() : Tt);
  }
}

template <typename T>
void bwd_rows_scalar(const BwdArgs& a, int64_t r0, int64_t r1) {
  const Cfg& c = a.c;
  const bool cap = c.cap > 0;
  const int64_t V = a.V;
  for (int64_t i = r0; i < r1; ++i) {
    const T* zr = static_cast<const T*>(a.logits) + i * a.stride;
    T* gr = static_cast<T*>(a.grad) + i * a.gstride;
    const double lse = a.lse[i];
    if (lse == -kInf) {
      std::fill(gr, gr + V, T(0.f));
      continue;
    }
    const int64_t y = label_at(a.labels, a.labels64, i);
    const int64_t yl = local_label(c, y);
    // here: the one-hot term lands in this row; row_live: the softmax terms apply (in shard mode
    // every non-ignored row, wherever its label lives).
    const bool here = y != c.ignore && yl >= 0 && yl < V;
    const bool row_live = here || (c.vstart >= 0 && y != c.ignore);
    const double gl = row_live ? a.gl[i] : 0.f;
    const double gh = a.gh ? a.gh[i] : 0.f;
    const double H = a.gh ? a.ent[i] : 0.f;
    const double inv_t = static_cast<double>(c.inv_t) + c.inv_t_lo;
    for (int64_t j = 0; j < V; ++j) {
      const double z = static_cast<float>(zr[j]);
      double w = z, sech2 = 1;
      if (cap) {
        const float x = static_cast<float>(z) * c.inv_cap;
        w = c.cap * std::tanh(x);
        const double e = std::exp(-2.0 * std::abs(static_cast<double>(x)));
        sech2 = 4 * e / ((1 + e) * (1 + e));
      }
      const double d = w * inv_t - lse;
      const double p = std::exp(d);
      double g = (j == yl && here) ? gl * -std::expm1(d) : -gl * p;
      if (p > 0) g -= gh * p * (d + H);
      g *= inv_t;
      g *= sech2;
      gr[j] = T(static_cast<float>(g));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// AVX2 + FMA + F16C path.

#if RLK_X86_SIMD

RLK_INL __m256 v_load(const float* p) { return _mm256_loadu_ps(p); }
RLK_INL __m256 v_load(const BFloat16* p) {
  const __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
}
RLK_INL __m256 v_load(const Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

RLK_INL void v_store(float* p, __m256 x) { _mm256_storeu_ps(p, x); }
// Round to nearest even. NaNs stay NaN: the kernel's NaNs are the default NaN or come from bf16
// inputs, whose low 16 bits are 0, so the rounding increment never carries out of the payload.
RLK_INL __m128i v_pack(BFloat16*, __m256 x) {
  const __m256i b = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}
RLK_INL __m128i v_pack(Half*, __m256 x) { return _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT); }
template <typename T>
RLK_INL void v_store(T* p, __m256 x) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), v_pack(p, x));
}
RLK_INL float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}
RLK_INL double hsum_d(__m256 v) {
  __m256d d = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  __m128d h = _mm_add_pd(_mm256_castpd256_pd128(d), _mm256_extractf128_pd(d, 1));
  h = _mm_add_sd(h, _mm_unpackhi_pd(h, h));
  return _mm_cvtsd_f64(h);
}

// x = n + f with |f| <= 1/2 (n by the 1.5*2^23 shifter: n is in the low mantissa bits of *fx), and
// the degree-5 polynomial q(f) with 2^f = 1 + f q(f) (the degree-6 minimax of 2^f, 0.93 ulp).
RLK_INL __m256 exp2_split(__m256 x, __m256* fx) {
  const __m256 shifter = _mm256_set1_ps(12582912.f);
  *fx = _mm256_add_ps(x, shifter);
  return _mm256_sub_ps(x, _mm256_sub_ps(*fx, shifter));
}

RLK_INL __m256 exp2_q(__m256 f) {
  __m256 y = _mm256_set1_ps(1.5353361959569156e-4f);
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.3398875016719103e-3f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(9.61843691766262e-3f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(5.5503323674201965e-2f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(0.24022647738456726f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(0.6931471824645996f));
  return y;
}

// 2^x: x = n + f (|f| <= 1/2, n by the 1.5*2^23 shifter), degree-6 minimax for 2^f (0.93 ulp),
// n added to the exponent bits. Callers clamp x to >= -160 (with max(-160, x), which lets NaN
// through) and keep x < 127. The result is exactly 0 for x < -127 (so -inf gives 0); in
// [-127, -126) it is a value below 2^-126 (a denormal), negligible against any sum it enters.
RLK_INL __m256 v_exp2(__m256 x) {
  __m256 fx;
  const __m256 f = exp2_split(x, &fx);
  const __m256 y = _mm256_fmadd_ps(exp2_q(f), f, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_add_epi32(_mm256_castps_si256(y), _mm256_slli_epi32(_mm256_castps_si256(fx), 23));
  return _mm256_castsi256_ps(_mm256_max_epi32(e, _mm256_setzero_si256()));  // underflow wraps negative
}

RLK_INL __m256 clamp_lo(__m256 x) { return _mm256_max_ps(_mm256_set1_ps(-160.f), x); }

constexpr float kLog2e = 1.44269504088896341f;
constexpr double kLn2 = 0.69314718055994530942;

// tanh(x) = -m / (1 + e) with e = e^{-2|x|}, m = e - 1 (sign restored), 1 - tanh^2 = 4 e / (1 + e)^2:
// one division, no cancellation near 0 or at large |x|. With a = -2|x| log2(e) in [-125, 0] = n + f:
// e = 2^n (2^f - 1) + 2^n and m = 2^n (2^f - 1) + (2^n - 1), 2^f - 1 from the exp2 polynomial.
RLK_INL __m256 v_tanh(__m256 x, __m256* sech2) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256 a = _mm256_max_ps(_mm256_set1_ps(-125.f), _mm256_mul_ps(_mm256_andnot_ps(sign, x), _mm256_set1_ps(-2 * kLog2e)));
  __m256 fx;
  const __m256 f = exp2_split(a, &fx);
  const __m256 y = _mm256_mul_ps(exp2_q(f), f);  // 2^f - 1
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 p2n = _mm256_castsi256_ps(
      _mm256_add_epi32(_mm256_slli_epi32(_mm256_castps_si256(fx), 23), _mm256_castps_si256(one)));  // 2^n
  const __m256 e = _mm256_fmadd_ps(p2n, y, p2n);                    // e^{-2|x|}
  const __m256 m = _mm256_fmadd_ps(p2n, y, _mm256_sub_ps(p2n, one));  // e^{-2|x|} - 1
  const __m256 d = _mm256_add_ps(one, e);
  const __m256 r = _mm256_div_ps(one, d);
  __m256 q = _mm256_mul_ps(m, r);
  q = _mm256_fmadd_ps(_mm256_fnmadd_ps(q, d, m), r, q);  // one residual step: q = m / d to ~1 ulp
  if (sech2) *sech2 = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(4.f), e), _mm256_mul_ps(r, r));
  return _mm256_xor_ps(q, _mm256_andnot_ps(x, sign));  // -q carries sign(x)
}

template <bool CAP>
RLK_INL __m256 v_w(__m256 z, __m256 cap, __m256 inv_cap) {
  if (!CAP) return z;
  return _mm256_mul_ps(cap, v_tanh(_mm256_mul_ps(z, inv_cap), nullptr));
}

RLK_INL __m256 tail_mask(int64_t rem) {
  return _mm256_castsi256_ps(
      _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(rem)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}

template <typename T>
inline void load_tail(float* dst, const T* src, int64_t rem) {
  for (int64_t k = 0; k < 8; ++k) dst[k] = k < rem ? static_cast<float>(src[k]) : 0.f;
}

// x = w log2(e) / T + c (<= ~0: c is minus the running max of w log2(e) / T), e = 2^x;
// s += e, t += e x. -inf clamps to -160 (e = 0, e x = 0).
RLK_INL void v_acc(__m256 w, __m256 k2, __m256 c, __m256& s, __m256& t) {
  const __m256 x = clamp_lo(_mm256_fmadd_ps(w, k2, c));
  const __m256 e = v_exp2(x);
  s = _mm256_add_ps(s, e);
  t = _mm256_fmadd_ps(e, x, t);
}

// Pass 1 over a chunk: convert (+ softcap) into buf when BUF, return max of sgn * w. The partial
// last vector always goes to buf[nv, nv + 8), padded so that it contributes e = 0.
template <typename T, bool CAP, bool BUF, bool NEG>
RLK_INL float chunk_max(const T* p, int64_t nv, int64_t rem, float* buf, __m256 vcap, __m256 vinvcap) {
  alignas(32) float tmp[8];
  const __m256 pad = _mm256_set1_ps(NEG ? kInf : -kInf);
  __m256 m0 = pad, m1 = pad;
  int64_t j = 0;
  for (; j + 16 <= nv; j += 16) {
    const __m256 w0 = v_w<CAP>(v_load(p + j), vcap, vinvcap);
    const __m256 w1 = v_w<CAP>(v_load(p + j + 8), vcap, vinvcap);
    if (BUF) {
      _mm256_store_ps(buf + j, w0);
      _mm256_store_ps(buf + j + 8, w1);
    }
    m0 = NEG ? _mm256_min_ps(m0, w0) : _mm256_max_ps(m0, w0);
    m1 = NEG ? _mm256_min_ps(m1, w1) : _mm256_max_ps(m1, w1);
  }
  for (; j < nv; j += 8) {
    const __m256 w0 = v_w<CAP>(v_load(p + j), vcap, vinvcap);
    if (BUF) _mm256_store_ps(buf + j, w0);
    m0 = NEG ? _mm256_min_ps(m0, w0) : _mm256_max_ps(m0, w0);
  }
  if (rem) {
    load_tail(tmp, p + nv, rem);
    const __m256 w0 = _mm256_blendv_ps(pad, v_w<CAP>(_mm256_load_ps(tmp), vcap, vinvcap), tail_mask(rem));
    _mm256_store_ps(buf + nv, w0);
    m0 = NEG ? _mm256_min_ps(m0, w0) : _mm256_max_ps(m0, w0);
  }
  if (NEG) return hmax(_mm256_mul_ps(_mm256_min_ps(m0, m1), _mm256_set1_ps(-1.f)));  // -min w
  return hmax(_mm256_max_ps(m0, m1));
}

// Forward rows. In log2 units, x_j = fl(w_j k2 + c) with k2 = log2(e) / T and c = -fl(w_m k2) for
// the running argmax w_m of u; s = sum 2^x, t = sum 2^x x. The offset x_m = w_m k2 + c (a rounding
// residual) cancels in logp and H; lse = u_m + ln s - x_m ln 2 (u_m = w_m / T in double).
template <typename T, bool CAP>
RLK_TGT void fwd_rows_avx2(const FwdArgs& a, int64_t r0, int64_t r1) {
  constexpr bool kBuf = CAP || !std::is_same<T, float>::value;  // keep converted w in buf
  alignas(32) float buf[kChunk + 8];
  const Cfg& c = a.c;
  const int64_t V = a.V;
  const bool neg = c.sgn < 0;
  const __m256 vcap = _mm256_set1_ps(c.cap), vinvcap = _mm256_set1_ps(c.inv_cap);
  const float k2f = static_cast<float>(static_cast<double>(c.inv_t) * kLog2e);
  const __m256 k2 = _mm256_set1_ps(k2f);
  for (int64_t i = r0; i < r1; ++i) {
    const T* row = static_cast<const T*>(a.logits) + i * a.stride;
    float vref = -kInf;  // running max of sgn * w
    float off = 0.f;     // c
    double S = 0, Tt = 0;  // Tt in natural units (t ln 2)
    bool nan = false;      // a NaN logit (a NaN that escaped the max shows up in Tt)
    for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
      const T* p = row + c0;
      const int64_t n = std::min(kChunk, V - c0);
      const int64_t nv = n & ~int64_t(7), rem = n - nv;
      // pass 1: convert (+ softcap) and chunk max; the chunk lands in L1.
      const float cm = neg ? chunk_max<T, CAP, kBuf, true>(p, nv, rem, buf, vcap, vinvcap)
                           : chunk_max<T, CAP, kBuf, false>(p, nv, rem, buf, vcap, vinvcap);
      nan |= cm != cm;
      if (!(cm > -kInf)) {  // chunk contributes nothing (all -inf), or all NaN (the max drops NaN)
        for (int64_t j = 0; j < n && !nan; ++j) nan = static_cast<float>(p[j]) != static_cast<float>(p[j]);
        continue;
      }
      if (cm > vref) {
        const float off_new = -(c.sgn * cm) * k2f;
        if (vref > -kInf) {  // rebase s, t onto the new offset: x' = x + delta
          const double delta = static_cast<double>(off_new) - off;
          const double r = std::exp2(delta);
          Tt = r * (Tt + S * delta * kLn2);
          S *= r;
        }
        vref = cm;
        off = off_new;
      }
      // pass 2: exp-accumulate the in-cache chunk, prefetching (into L2) the chunk after next so
      // that memory traffic overlaps this compute.
      const __m256 vc = _mm256_set1_ps(off);
      const float* q = kBuf ? buf : reinterpret_cast<const float*>(p);
      const char* nxt = reinterpret_cast<const char*>(p + 2 * kChunk);
      __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0, t0 = s0, t1 = s0, t2 = s0, t3 = s0;
      int64_t j = 0;
      for (; j + 32 <= nv; j += 32) {
        _mm_prefetch(nxt + j * sizeof(T), _MM_HINT_T1);
        if (sizeof(T) == 4) _mm_prefetch(nxt + j * sizeof(T) + 64, _MM_HINT_T1);
        v_acc(_mm256_loadu_ps(q + j), k2, vc, s0, t0);
        v_acc(_mm256_loadu_ps(q + j + 8), k2, vc, s1, t1);
        v_acc(_mm256_loadu_ps(q + j + 16), k2, vc, s2, t2);
        v_acc(_mm256_loadu_ps(q + j + 24), k2, vc, s3, t3);
      }
      for (; j < nv; j += 8) v_acc(_mm256_loadu_ps(q + j), k2, vc, s0, t0);
      if (rem) v_acc(_mm256_load_ps(buf + nv), k2, vc, s1, t1);
      S += hsum_d(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
      Tt += hsum_d(_mm256_add_ps(_mm256_add_ps(t0, t1), _mm256_add_ps(t2, t3))) * kLn2;
    }
    const int64_t y = label_at(a.labels, a.labels64, i);
    const int64_t yl = local_label(c, y);
    double lse = -kInf, dy = 0;
    if (vref > -kInf) {
      const double wm = c.sgn * vref;
      const double xm = wm * k2f + off;  // exact in double
      lse = wm * (static_cast<double>(c.inv_t) + c.inv_t_lo) + std::log(S) - xm * kLn2;
      if (yl >= 0 && yl < V) {  // same vector transform and fma as the row, so x_y matches
        const __m256 wy = v_w<CAP>(_mm256_set1_ps(static_cast<float>(row[yl])), vcap, vinvcap);
        dy = _mm256_cvtss_f32(_mm256_fmadd_ps(wy, k2, _mm256_set1_ps(off))) * kLn2 - std::log(S);
      }
    }
    finish_fwd(a, i, y, yl, vref > -kInf, lse, dy, S, nan ? std::numeric_limits<double>::quiet_NaN() : Tt);
  }
}

// Backward in log2 units: x = (u - lse) log2(e) = w (Khi + Klo) - lse log2(e) (Chi + Clo), each pair a
// float split of a double, so x is accurate to ~1 ulp of itself even for |logits| ~ 1e4; p = 2^x,
// dL/dz = p (A + B x) [* (1 - tanh^2)] with A = -(g_l + g_H H) / T, B = -g_H ln2 / T. The label
// element is patched afterwards from the logit saved before the row was written.
// k: 0 cap, 1 1/cap, 2 Khi, 3 Klo, 4 Chi, 5 Clo, 6 A, 7 B.
template <bool CAP>
RLK_INL __m256 v_xw(__m256 z, const __m256* k, __m256* s2) {
  __m256 w = z;
  if (CAP) w = _mm256_mul_ps(k[0], v_tanh(_mm256_mul_ps(z, k[1]), s2));
  return clamp_lo(_mm256_add_ps(_mm256_fmadd_ps(w, k[2], k[4]), _mm256_fmadd_ps(w, k[3], k[5])));
}

template <bool CAP>
RLK_INL __m256 v_grad(__m256 z, const __m256* k) {
  __m256 s2 = _mm256_setzero_ps();
  const __m256 x = v_xw<CAP>(z, k, &s2);
  const __m256 g = _mm256_mul_ps(v_exp2(x), _mm256_fmadd_ps(k[7], x, k[6]));
  return CAP ? _mm256_mul_ps(g, s2) : g;
}

// Elements [j, j + cnt) with cnt < 8 of one row, through a padded vector.
template <typename T, bool CAP>
RLK_TGT inline void bwd_partial(const T* zr, T* gr, int64_t j, int64_t cnt, const __m256* k) {
  alignas(32) float tmp[8];
  if (cnt <= 0) return;
  load_tail(tmp, zr + j, cnt);
  _mm256_store_ps(tmp, v_grad<CAP>(_mm256_load_ps(tmp), k));
  for (int64_t t = 0; t < cnt; ++t) gr[j + t] = T(tmp[t]);
}

template <typename T, bool CAP>
RLK_INL void bwd_row(const T* zr, T* gr, int64_t V, const __m256* k) {
  int64_t j = 0;
  for (; j + 16 <= V; j += 16) {  // both vectors are read before either is written (in-place)
    _mm_prefetch(reinterpret_cast<const char*>(zr + j) + 4096, _MM_HINT_T0);
    const __m256 z0 = v_load(zr + j), z1 = v_load(zr + j + 8);
    v_store(gr + j, v_grad<CAP>(z0, k));
    v_store(gr + j + 8, v_grad<CAP>(z1, k));
  }
  for (; j + 8 <= V; j += 8) v_store(gr + j, v_grad<CAP>(v_load(zr + j), k));
  bwd_partial<T, CAP>(zr, gr, j, V - j, k);
}

template <typename T, bool CAP>
RLK_TGT void bwd_rows_avx2(const BwdArgs& a, int64_t r0, int64_t r1) {
  const Cfg& c = a.c;
  const int64_t V = a.V;
  const double K = (static_cast<double>(c.inv_t) + c.inv_t_lo) * kLog2e;
  // khi rounded toward zero so that klo has the sign of K and is non-zero: -inf logits then give
  // -inf + -inf, never -inf + inf or -inf * 0.
  float khi = static_cast<float>(K);
  if (std::abs(static_cast<double>(khi)) > std::abs(K)) khi = std::nextafter(khi, 0.f);
  float klo = static_cast<float>(K - khi);
  if (klo == 0.f) klo = std::copysign(std::numeric_limits<float>::min(), khi);
  __m256 k[8];
  k[0] = _mm256_set1_ps(c.cap);
  k[1] = _mm256_set1_ps(c.inv_cap);
  k[2] = _mm256_set1_ps(khi);
  k[3] = _mm256_set1_ps(klo);
  for (int64_t i = r0; i < r1; ++i) {
    const T* zr = static_cast<const T*>(a.logits) + i * a.stride;
    T* gr = static_cast<T*>(a.grad) + i * a.gstride;
    const double lse = a.lse[i];
    if (lse == -kInf) {  // all -inf row: zero gradient
      std::memset(static_cast<void*>(gr), 0, static_cast<size_t>(V) * sizeof(T));
      continue;
    }
    const int64_t y = label_at(a.labels, a.labels64, i);
    const int64_t yl = local_label(c, y);
    const bool here = y != c.ignore && yl >= 0 && yl < V;  // the one-hot term lands in this row
    const bool row_live = here || (c.vstart >= 0 && y != c.ignore);  // the softmax terms apply
    const float gl = row_live ? a.gl[i] : 0.f;
    const float gh = a.gh ? a.gh[i] : 0.f;
    const float H = a.gh ? a.ent[i] : 0.f;
    const float zy = here ? static_cast<float>(zr[yl]) : 0.f;  // read before the row is overwritten
    const double C = -static_cast<double>(lse) * kLog2e;
    const float chi = static_cast<float>(C);
    k[4] = _mm256_set1_ps(chi);
    k[5] = _mm256_set1_ps(static_cast<float>(C - chi));
    k[6] = _mm256_set1_ps(-(gl + gh * H) * c.inv_t);
    k[7] = _mm256_set1_ps(static_cast<float>(-gh * c.inv_t * kLn2));
    bwd_row<T, CAP>(zr, gr, V, k);
    if (here) {
      __m256 s2 = _mm256_set1_ps(1.f);
      const __m256 x = v_xw<CAP>(_mm256_set1_ps(zy), k, &s2);
      const double dy = static_cast<double>(_mm256_cvtss_f32(x)) * kLn2;
      const double py = _mm256_cvtss_f32(v_exp2(x));
      double g = -static_cast<double>(gl) * std::expm1(dy);
      if (py > 0) g -= static_cast<double>(gh) * py * (dy + H);
      g *= static_cast<double>(c.inv_t) * _mm256_cvtss_f32(s2);
      gr[yl] = T(static_cast<float>(g));
    }
  }
}

// float64 rows (softcap off), 4 lanes: e^x by rlkern::v_exp_pd_in_range (csrc/common.h).
using rlkern::v_exp_pd_in_range;

// e^x for any x <= 0 (x < -708 and -inf give 0).
RLK_INL __m256d v_exp_pd(__m256d x) {
  const __m256d lo = _mm256_set1_pd(-708.0);
  const __m256d under = _mm256_cmp_pd(x, lo, _CMP_LT_OQ);
  return _mm256_andnot_pd(under, v_exp_pd_in_range(_mm256_max_pd(x, lo)));
}

RLK_INL double hsum_pd(__m256d v) {
  const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

// u = z * inv_t rounded once, as every float64 path forms it; UNIT: inv_t == 1, u = z. d = u - m
// is then rounded separately (no FMA: z * inv_t - m would keep the rounding residual of m, which
// is not 0 at the max and reaches 1e292 at |u| ~ 1e308, where e^d overflows).
// (GCC would contract _mm256_mul_pd then _mm256_sub_pd into an FMA too: the empty asm stops it.)
template <bool UNIT>
RLK_INL __m256d v_u(__m256d z, __m256d it) {
  if (UNIT) return z;
  __m256d u = _mm256_mul_pd(z, it);
  __asm__("" : "+x"(u));
  return u;
}

// max z of a row (NEG: min z, for a negative temperature), so max u = fl(that z * inv_t). NaN
// never enters: max_pd returns its second operand, the running value, when the first is NaN.
template <bool NEG>
RLK_INL __m256d v_ext(__m256d z, __m256d m) {
  return NEG ? _mm256_min_pd(z, m) : _mm256_max_pd(z, m);
}

template <bool NEG>
RLK_INL double ext_pd(const double* row, int64_t V) {
  const double init = NEG ? kInf : -kInf;
  __m256d m0 = _mm256_set1_pd(init), m1 = m0;
  int64_t j = 0;
  for (; j + 8 <= V; j += 8) {
    m0 = v_ext<NEG>(_mm256_loadu_pd(row + j), m0);
    m1 = v_ext<NEG>(_mm256_loadu_pd(row + j + 4), m1);
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, v_ext<NEG>(m0, m1));
  double out = init;
  for (int k = 0; k < 4; ++k) out = NEG ? std::min(out, lanes[k]) : std::max(out, lanes[k]);
  for (; j < V; ++j) out = NEG ? (row[j] < out ? row[j] : out) : (row[j] > out ? row[j] : out);  // NaN: kept out
  return out;
}

// The forward: a max pass (one max per 4 doubles, at memory speed), then a pass accumulating
// S = sum e^d and T = sum e^d d, d = max(u - m, -708) (NaN-propagating: a NaN logit, or +inf
// - +inf, makes T NaN, which finish_fwd turns into NaN outputs; terms below e^-708 add nothing
// the row's largest, 1, would notice). The sum pass is compute-bound on the row in L2; it
// prefetches the next row into L2 meanwhile, so that row's max pass does not wait on memory.
template <bool NEG, bool UNIT>
RLK_TGT void fwd_rows_f64_avx2_t(const FwdArgsT<double>& a, double inv_t, int64_t r0, int64_t r1) {
  const int64_t V = a.V;
  const __m256d it = _mm256_set1_pd(inv_t), zero = _mm256_setzero_pd(), lo = _mm256_set1_pd(-708.0);
  for (int64_t i = r0; i < r1; ++i) {
    const double* row = static_cast<const double*>(a.logits) + i * a.stride;
    const double m = mul_rounded(ext_pd<NEG>(row, V), inv_t);
    double S = 0, T = 0;
    bool nan = false;
    if (m > -kInf) {
      const __m256d vm = _mm256_set1_pd(m);
      __m256d s0 = zero, t0 = zero, s1 = zero, t1 = zero;  // two chains: the adds do not wait on each other
      const char* next = reinterpret_cast<const char*>(i + 1 < r1 ? row + a.stride : row);
      int64_t j = 0;
      for (; j + 8 <= V; j += 8) {
        _mm_prefetch(next + j * sizeof(double), _MM_HINT_T1);
        const __m256d d0 = _mm256_max_pd(lo, _mm256_sub_pd(v_u<UNIT>(_mm256_loadu_pd(row + j), it), vm));
        const __m256d d1 = _mm256_max_pd(lo, _mm256_sub_pd(v_u<UNIT>(_mm256_loadu_pd(row + j + 4), it), vm));
        const __m256d e0 = v_exp_pd_in_range(d0), e1 = v_exp_pd_in_range(d1);
        s0 = _mm256_add_pd(s0, e0);
        s1 = _mm256_add_pd(s1, e1);
        t0 = _mm256_fmadd_pd(e0, d0, t0);
        t1 = _mm256_fmadd_pd(e1, d1, t1);
      }
      S = hsum_pd(_mm256_add_pd(s0, s1));
      T = hsum_pd(_mm256_add_pd(t0, t1));
      for (; j < V; ++j) {
        double d = mul_rounded(row[j], inv_t) - m;
        d = d < -708.0 ? -708.0 : d;  // NaN stays NaN
        const double e = std::exp(d);
        S += e;
        T += e * d;
      }
      nan = T != T;
    } else {  // all -inf, all NaN or a mix (the max skips NaN), or V == 0
      for (int64_t j = 0; j < V && !nan; ++j) nan = row[j] != row[j];
    }
    finish_row_f64(a, i, row, inv_t, 0.0, m, S, T, nan);
  }
}

RLK_TGT void fwd_rows_f64_avx2(const FwdArgsT<double>& a, double temperature, int64_t r0, int64_t r1) {
  const double inv_t = 1.0 / temperature;
  if (inv_t == 1.0) return fwd_rows_f64_avx2_t<false, true>(a, inv_t, r0, r1);
  if (inv_t > 0) return fwd_rows_f64_avx2_t<false, false>(a, inv_t, r0, r1);
  fwd_rows_f64_avx2_t<true, false>(a, inv_t, r0, r1);
}

template <bool UNIT>
RLK_TGT void bwd_rows_f64_avx2_t(const BwdArgsT<double>& a, double inv_t, int64_t r0, int64_t r1) {
  const int64_t V = a.V;
  const __m256d it = _mm256_set1_pd(inv_t), zero = _mm256_setzero_pd();
  for (int64_t i = r0; i < r1; ++i) {
    const RowF64 r = row_f64(a, i);
    if (!r.live) continue;
    // g = -(gl + gh (d + H)) p inv_t, p = e^d (the entropy term only where p > 0)
    const __m256d vl = _mm256_set1_pd(r.lse), vgl = _mm256_set1_pd(r.gl), vgh = _mm256_set1_pd(r.gh),
                  vh = _mm256_set1_pd(r.H), nit = _mm256_set1_pd(-inv_t);
    // The label's column, exactly, from its logit read before the vector loop overwrites it
    // (g aliases z in the in-place backward, which linear_token_logprobs' tiles use).
    const int64_t vec_end = V / 4 * 4;
    const bool label_in_vec = r.here && r.yl < vec_end;
    const double label_grad = label_in_vec ? grad_at_f64(r, r.yl, r.z[r.yl], inv_t, 0.0) : 0.0;
    int64_t j = 0;
    for (; j < vec_end; j += 4) {
      const __m256d d = _mm256_sub_pd(v_u<UNIT>(_mm256_loadu_pd(r.z + j), it), vl);
      const __m256d p = v_exp_pd(d);
      const __m256d ent = _mm256_and_pd(_mm256_cmp_pd(p, zero, _CMP_GT_OQ),
                                        _mm256_mul_pd(vgh, _mm256_add_pd(d, vh)));
      _mm256_storeu_pd(r.g + j, _mm256_mul_pd(_mm256_mul_pd(_mm256_add_pd(vgl, ent), p), nit));
    }
    grad_f64(r, j, V, inv_t, 0.0);
    if (label_in_vec) r.g[r.yl] = label_grad;
  }
}

RLK_TGT void bwd_rows_f64_avx2(const BwdArgsT<double>& a, double temperature, int64_t r0, int64_t r1) {
  const double inv_t = 1.0 / temperature;
  if (inv_t == 1.0) return bwd_rows_f64_avx2_t<true>(a, inv_t, r0, r1);
  bwd_rows_f64_avx2_t<false>(a, inv_t, r0, r1);
}

#endif  // RLK_X86_SIMD

using rlkern::simd_ok;

// ---------------------------------------------------------------------------------------------
// Dispatch.

using FwdFn = void (*)(const FwdArgs&, int64_t, int64_t);
using BwdFn = void (*)(const BwdArgs&, int64_t, int64_t);

template <typename T>
FwdFn pick_fwd(bool cap) {
#if RLK_X86_SIMD
  if (simd_ok()) return cap ? &fwd_rows_avx2<T, true> : &fwd_rows_avx2<T, false>;
#endif
  (void)cap;
  return &fwd_rows_scalar<T>;
}

template <typename T>
BwdFn pick_bwd(bool cap) {
#if RLK_X86_SIMD
  if (simd_ok()) return cap ? &bwd_rows_avx2<T, true> : &bwd_rows_avx2<T, false>;
#endif
  (void)cap;
  return &bwd_rows_scalar<T>;
}

void check_logits(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2, "rlkern.logprobs: logits must be 2-D [N, V], got ", logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16 ||
                  logits.scalar_type() == at::kHalf || logits.scalar_type() == at::kDouble,
              "rlkern.logprobs: logits must be float32, bfloat16, float16 or float64, got ", logits.scalar_type());
  TORCH_CHECK(logits.size(1) <= 1 || logits.stride(1) == 1,
              "rlkern.logprobs: logits must have a contiguous last dim (stride(1) == 1), got strides ",
              logits.strides());
}

void check_labels(const at::Tensor& labels, int64_t n) {
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == n, "rlkern.logprobs: labels must be [N] with N = ", n,
              ", got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt,
              "rlkern.logprobs: labels must be int32 or int64, got ", labels.scalar_type());
}

void check_temperature(double temperature) {
  TORCH_CHECK(temperature != 0 && std::isfinite(temperature), "rlkern.logprobs: temperature must be finite and non-zero, got ",
              temperature);
}

void check_vocab_start(int64_t vocab_start) {
  TORCH_CHECK(vocab_start >= -1, "rlkern.logprobs: vocab_start must be -1 (not sharded) or >= 0, got ", vocab_start);
}

at::Tensor row_vec(const at::Tensor& t, int64_t n, const char* name, at::ScalarType dtype = at::kFloat) {
  TORCH_CHECK(t.device().type() == at::kCPU, "rlkern.logprobs: ", name, " must be on the CPU like the logits");
  TORCH_CHECK(t.numel() == n, "rlkern.logprobs: ", name, " must have N = ", n, " elements, got ", t.sizes());
  return t.reshape({n}).to(dtype).contiguous();
}

int64_t grain_for(int64_t V) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)); }

// Row ranges over torch's intra-op threads (setup.py compiles with -fopenmp, which the inline
// at::parallel_for needs to run in parallel).
template <typename F>
void parallel_rows(int64_t n, int64_t grain, const F& f) {
  at::parallel_for(0, n, grain, f);
}

// The forward's arguments; outputs of type O (float, or double for float64 logits).
template <typename O>
FwdArgsT<O> fwd_args(const at::Tensor& logits, const at::Tensor& lab, at::Tensor& logp, at::Tensor& ent,
                     at::Tensor& lse, bool with_entropy, const Cfg& c) {
  FwdArgsT<O> a;
  a.logits = logits.data_ptr();
  a.stride = logits.stride(0);
  a.V = logits.size(1);
  a.labels = lab.data_ptr();
  a.labels64 = lab.scalar_type() == at::kLong;
  a.logp = logp.data_ptr<O>();
  a.ent = with_entropy ? ent.data_ptr<O>() : nullptr;
  a.lse = lse.data_ptr<double>();
  a.c = c;
  return a;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_fwd_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                                double temperature, double softcap,
                                                                int64_t ignore_index, bool with_entropy,
                                                                int64_t vocab_start) {
  check_logits(logits);
  const int64_t N = logits.size(0), V = logits.size(1);
  check_labels(labels, N);
  check_temperature(temperature);
  check_vocab_start(vocab_start);
  TORCH_CHECK(labels.device().type() == at::kCPU, "rlkern.logprobs: labels must be on the CPU like the logits");
  const bool f64 = logits.scalar_type() == at::kDouble;
  const auto fopt = logits.options().dtype(f64 ? at::kDouble : at::kFloat);
  at::Tensor logp = at::empty({N}, fopt);
  at::Tensor ent = at::empty({with_entropy ? N : 0}, fopt);
  at::Tensor lse = at::empty({N}, logits.options().dtype(at::kDouble));
  if (N == 0) return {logp, ent, lse};
  const at::Tensor lab = labels.contiguous();
  const Cfg c = make_cfg(temperature, softcap, ignore_index, vocab_start);
  if (f64) {
    const FwdArgsT<double> a = fwd_args<double>(logits, lab, logp, ent, lse, with_entropy, c);
    parallel_rows(N, grain_for(V), [&](int64_t b, int64_t e) {
#if RLK_X86_SIMD
      if (simd_ok() && softcap <= 0) return fwd_rows_f64_avx2(a, temperature, b, e);
#endif
      fwd_rows_f64(a, temperature, softcap, b, e);
    });
    return {logp, ent, lse};
  }
  const FwdArgs a = fwd_args<float>(logits, lab, logp, ent, lse, with_entropy, c);
  const bool cap = a.c.cap > 0;
  FwdFn fn = logits.scalar_type() == at::kFloat     ? pick_fwd<float>(cap)
             : logits.scalar_type() == at::kBFloat16 ? pick_fwd<BFloat16>(cap)
                                                     : pick_fwd<Half>(cap);
  parallel_rows(N, grain_for(V), [&](int64_t b, int64_t e) { fn(a, b, e); });
  return {logp, ent, lse};
}

// The backward's arguments: upstream gradients and the saved entropy as G (float, or double for
// float64 logits), lse as double; converted copies live in ``keep``.
template <typename G>
BwdArgsT<G> bwd_args(const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy,
                     const at::Tensor& logits, const at::Tensor& lab, const at::Tensor& lse,
                     const std::optional<at::Tensor>& entropy, at::Tensor& grad_logits, const Cfg& c,
                     std::vector<at::Tensor>& keep) {
  const int64_t N = logits.size(0);
  const auto g_type = std::is_same<G, double>::value ? at::kDouble : at::kFloat;
  keep.push_back(row_vec(grad_logprobs, N, "grad_logprobs", g_type));
  keep.push_back(row_vec(lse, N, "lse", at::kDouble));
  BwdArgsT<G> a;
  a.logits = logits.data_ptr();
  a.grad = grad_logits.data_ptr();
  a.stride = logits.stride(0);
  a.gstride = grad_logits.stride(0);
  a.V = logits.size(1);
  a.labels = lab.data_ptr();
  a.labels64 = lab.scalar_type() == at::kLong;
  a.gl = keep[keep.size() - 2].data_ptr<G>();
  a.lse = keep.back().data_ptr<double>();
  a.gh = a.ent = nullptr;
  if (grad_entropy.has_value()) {
    keep.push_back(row_vec(*grad_entropy, N, "grad_entropy", g_type));
    keep.push_back(row_vec(*entropy, N, "entropy", g_type));
    a.gh = keep[keep.size() - 2].data_ptr<G>();
    a.ent = keep.back().data_ptr<G>();
  }
  a.c = c;
  return a;
}

void logprobs_bwd_cpu(const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy,
                      const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                      const std::optional<at::Tensor>& entropy, double temperature, double softcap,
                      int64_t ignore_index, at::Tensor& grad_logits, int64_t vocab_start) {
  check_logits(logits);
  const int64_t N = logits.size(0), V = logits.size(1);
  check_labels(labels, N);
  check_temperature(temperature);
  check_vocab_start(vocab_start);
  TORCH_CHECK(!grad_entropy.has_value() || entropy.has_value(),
              "rlkern.cpp_token_logprobs_backward: grad_entropy needs the forward's entropy (both given or both None)");
  TORCH_CHECK(grad_logits.sizes() == logits.sizes() && grad_logits.scalar_type() == logits.scalar_type(),
              "rlkern.cpp_token_logprobs_backward: grad_logits must match logits in shape and dtype");
  TORCH_CHECK(V <= 1 || grad_logits.stride(1) == 1, "rlkern.cpp_token_logprobs_backward: grad_logits needs a contiguous last dim");
  TORCH_CHECK(grad_logits.device().type() == at::kCPU, "rlkern.cpp_token_logprobs_backward: grad_logits must be on the CPU");
  TORCH_CHECK(labels.device().type() == at::kCPU, "rlkern.logprobs: labels must be on the CPU like the logits");
  if (N == 0 || V == 0) return;
  const at::Tensor lab = labels.contiguous();
  const Cfg c = make_cfg(temperature, softcap, ignore_index, vocab_start);
  std::vector<at::Tensor> keep;
  if (logits.scalar_type() == at::kDouble) {
    const BwdArgsT<double> a =
        bwd_args<double>(grad_logprobs, grad_entropy, logits, lab, lse, entropy, grad_logits, c, keep);
    parallel_rows(N, grain_for(V), [&](int64_t b, int64_t e) {
#if RLK_X86_SIMD
      if (simd_ok() && softcap <= 0) return bwd_rows_f64_avx2(a, temperature, b, e);
#endif
      bwd_rows_f64(a, temperature, softcap, b, e);
    });
    return;
  }
  const BwdArgs a = bwd_args<float>(grad_logprobs, grad_entropy, logits, lab, lse, entropy, grad_logits, c, keep);
  const bool cap = a.c.cap > 0;
  BwdFn fn = logits.scalar_type() == at::kFloat     ? pick_bwd<float>(cap)
             : logits.scalar_type() == at::kBFloat16 ? pick_bwd<BFloat16>(cap)
                                                     : pick_bwd<Half>(cap);
  parallel_rows(N, grain_for(V), [&](int64_t b, int64_t e) { fn(a, b, e); });
}

// Meta: shapes only.
std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_fwd_meta(const at::Tensor& logits, const at::Tensor& labels,
                                                                 double, double, int64_t, bool with_entropy,
                                                                 int64_t) {
  check_logits(logits);
  const int64_t N = logits.size(0);
  check_labels(labels, N);
  const auto fopt = logits.options().dtype(logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  return {at::empty({N}, fopt), at::empty({with_entropy ? N : 0}, fopt), at::empty({N}, logits.options().dtype(at::kDouble))};
}

void logprobs_bwd_meta(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor& logits,
                       const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, double, double, int64_t,
                       at::Tensor& grad_logits, int64_t) {
  TORCH_CHECK(grad_logits.sizes() == logits.sizes() && grad_logits.scalar_type() == logits.scalar_type(),
              "rlkern.cpp_token_logprobs_backward: grad_logits must match logits in shape and dtype");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rlkern, m) {
  m.def(
      "cpp_token_logprobs(Tensor logits, Tensor labels, float temperature, float softcap, int ignore_index, "
      "bool with_entropy, int vocab_start=-1) -> (Tensor, Tensor, Tensor)");
  m.def(
      "cpp_token_logprobs_backward(Tensor grad_logprobs, Tensor? grad_entropy, Tensor logits, Tensor labels, Tensor lse, "
      "Tensor? entropy, float temperature, float softcap, int ignore_index, Tensor(a!) grad_logits, "
      "int vocab_start=-1) -> ()");
}

TORCH_LIBRARY_IMPL(rlkern, CPU, m) {
  m.impl("cpp_token_logprobs", &logprobs_fwd_cpu);
  m.impl("cpp_token_logprobs_backward", &logprobs_bwd_cpu);
}

TORCH_LIBRARY_IMPL(rlkern, Meta, m) {
  m.impl("cpp_token_logprobs", &logprobs_fwd_meta);
  m.impl("cpp_token_logprobs_backward", &logprobs_bwd_meta);
}
