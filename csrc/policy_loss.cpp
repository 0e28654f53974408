// rlkern CPU kernel: fused policy loss (torch.ops.rlkern.cpp_policy_loss / policy_loss_backward).
//
// Oracle: rlkern/reference/policy_loss.py; GPU twin: kernels/policy_loss.py (same outputs, same
// stats layout). One task per sequence (at::parallel_for over B):
//   forward:  one read of the sequence's tokens (two for GSPO and level="sequence", whose ratio is
//             the sequence mean log-ratio) -> per-sequence partial sums, stats[b, :] = (policy
//             loss, entropy, KL, mask count, the six metric sums, the mean log-ratio, and for
//             level="sequence" ppo / sapo the sum of m is_w d l / d lr that the backward spreads
//             over the sequence); geo_mean (GMPO) writes its sequence loss -mean(A) exp(mean of
//             the clipped log-ratios) in column 0. Then, on the calling thread, the aggregation
//             over the B rows: the loss, the 8 metrics, and stats[B, :2] = (token count,
//             non-empty sequences) for the backward.
//   backward: one read, one write: d loss / d logprobs = m * (c_pol * is_w * dl/dlp + c_kl *
//             dkl/dlp) and d loss / d entropy = m * c_ent, the per-sequence coefficients c_* =
//             aggregation weight of the sequence x coefficient x upstream gradient.
// The token loops run on float vectors (GCC vector extensions, no intrinsics): every branch of
// the reference is a lane select, exp is a polynomial of our own, and inputs are zeroed at
// masked-out tokens so the sums need no select. The same source is compiled twice: 8 lanes for
// AVX2+FMA (chosen at runtime, as csrc/logprobs.cpp) and 4 lanes for the baseline ISA (SSE2,
// NEON); RLKERN_NO_SIMD=1 forces the baseline. Token math in float, as the fp32 reference; sums
// in float over 64-vector chunks, then in double. float64 input runs the same loops on double
// vectors (4 lanes AVX2, 2 baseline; Simd<T, W>) with a double exp, and returns float64 loss,
// metrics, stats and gradients; every other dtype computes in float.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.h"

// No target of its own: inlined into both the AVX2 and the baseline entry points.
#define RLK_VEC __attribute__((always_inline)) static inline
// GCC notes that functions taking or returning 32/64-byte vectors have an ABI that depends on
// -mavx; every such function here is always inlined, so no call crosses that boundary.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace {

// k*Seq: the loss at level="sequence" (TRL's importance_sampling_level): every token's ratio is
// exp of its sequence's mean log-ratio, and the gradient goes through that mean.
enum class Loss {
  kPpo, kGspo, kCispo, kReinforce, kSapo, kDro, kDppoTv, kDppoKl, kClipCov, kKlCov, kGeoMean, kPpoSeq, kCispoSeq,
  kSapoSeq
};

constexpr Loss token_form(Loss l) {
  return l == Loss::kPpoSeq ? Loss::kPpo : l == Loss::kCispoSeq ? Loss::kCispo : l == Loss::kSapoSeq ? Loss::kSapo : l;
}
constexpr bool seq_level(Loss l) { return l == Loss::kPpoSeq || l == Loss::kCispoSeq || l == Loss::kSapoSeq; }
// The losses whose ratio is a sequence mean of log-ratios, computed in a first read of the sequence.
constexpr bool two_pass(Loss l) { return l == Loss::kGspo || seq_level(l); }
// Sequence-level ppo / sapo: the gradient reaches a token only through its sequence's mean
// log-ratio: d loss / d logprob_t = m_t / max(sum m, 1) * sum_t' m_t' is_w_t' d l_t' / d lr.
constexpr bool through_mean(Loss l) { return l == Loss::kPpoSeq || l == Loss::kSapoSeq; }
enum class Kl { kK1, kAbs, kK2, kK3, kK3Unclamped };
// kNone: every token counts (packed); kReal: a float mask in the loops' float type
enum class MaskKind { kNone, kU8, kI32, kI64, kReal };

// Columns of the stats tensor, named as rlkern/reference/policy_loss.py's STAT_FIELDS (the
// schema op below reports them; a test compares); row B holds (count, sequences).
constexpr int kPolicy = 0, kEntropy = 1, kKl = 2, kCount = 3, kCf = 4, kLo = 5, kHi = 6, kDcf = 7, kAkl = 8,
              kRatio = 9, kSlr = 10, kDseq = 11, kNumStats = 12;
constexpr const char* kStatFields[kNumStats] = {"policy",  "entropy",  "kl",        "count",
                                                "clipfrac", "clipfrac_low", "clipfrac_high", "dual_clipfrac",
                                                "approx_kl", "ratio", "seq_log_ratio", "seq_grad"};
constexpr int kSums = 10;  // columns 0..9 are masked sums
constexpr float kLogRatioBound = 20.f, kGspoMax = 10.f, kK3Bound = 10.f;
constexpr double kMeanEps = 1e-8;  // verl's masked_mean denominator: sum(mask) + 1e-8
constexpr int64_t kFlushEvery = 64;  // vectors summed in float before a flush into double

Loss parse_loss(const std::string& s, const std::string& level) {
  if (level == "sequence") {
    if (s == "ppo") return Loss::kPpoSeq;
    if (s == "cispo") return Loss::kCispoSeq;
    if (s == "sapo") return Loss::kSapoSeq;
    TORCH_CHECK(false, "rlkern.policy_loss: level='sequence' applies to ppo, cispo and sapo, got '", s, "'");
  }
  TORCH_CHECK(level == "token", "rlkern.policy_loss: level must be 'token' or 'sequence', got '", level, "'");
  if (s == "ppo") return Loss::kPpo;
  if (s == "gspo") return Loss::kGspo;
  if (s == "cispo") return Loss::kCispo;
  if (s == "reinforce" || s == "gpg") return Loss::kReinforce;
  if (s == "sapo") return Loss::kSapo;
  if (s == "dro") return Loss::kDro;
  if (s == "dppo_tv") return Loss::kDppoTv;
  if (s == "dppo_kl") return Loss::kDppoKl;
  if (s == "clip_cov") return Loss::kClipCov;
  if (s == "kl_cov") return Loss::kKlCov;
  if (s == "geo_mean") return Loss::kGeoMean;
  TORCH_CHECK(false, "rlkern.policy_loss: the C++ kernel has no loss '", s, "'");
}

void parse_kl(const std::string& s, Kl* kind, bool* straight_through, const char* op = "rlkern.policy_loss") {
  std::string base = s;
  *straight_through = !s.empty() && s.back() == '+';
  if (*straight_through) base.pop_back();
  if (base == "k1" || base == "kl") *kind = Kl::kK1;
  else if (base == "abs") *kind = Kl::kAbs;
  else if (base == "k2" || base == "mse") *kind = Kl::kK2;
  else if (base == "k3" || base == "low_var_kl") *kind = Kl::kK3;
  else if (base == "k3_unclamped") *kind = Kl::kK3Unclamped;
  else TORCH_CHECK(false, op, ": unknown kl_estimator '", s, "'");
}

enum class Agg { kTokenMean, kTokenSum, kSeqSum, kSeqMean, kSeqSumNorm };

Agg parse_agg(const std::string& s, const char* what, const char* op = "rlkern.policy_loss") {
  if (s == "token-mean") return Agg::kTokenMean;
  if (s == "token-sum") return Agg::kTokenSum;
  if (s == "seq-mean-token-sum") return Agg::kSeqSum;
  if (s == "seq-mean-token-mean") return Agg::kSeqMean;
  if (s == "seq-mean-token-sum-norm") return Agg::kSeqSumNorm;
  TORCH_CHECK(false, op, ": unknown ", what, " '", s, "'");
}

// Positions in the float hyper-parameter list, named as rlkern/reference/policy_loss.py's
// HYPER_FIELDS (the schema op below reports them; a test compares). NaN means "not given".
enum HyperField {
  kClipLow, kClipHigh, kDualClip, kKlCoef, kEntropyCoef, kDpSize, kLossScaleFactor, kTauPos, kTauNeg, kDroBeta,
  kPpoKlCoef, kGlobalTokens, kGlobalSeqs, kKlBias, kNumHyper
};
constexpr const char* kHyperFields[kNumHyper] = {
    "clip_low", "clip_high", "dual_clip", "kl_coef", "entropy_coef", "dp_size", "loss_scale_factor",
    "tau_pos", "tau_neg", "dro_beta", "ppo_kl_coef", "global_tokens", "global_seqs", "kl_bias_correction"};

// "hyper: f1,f2,...; stats: c1,c2,...": this parser's field orders, for the schema test.
std::string policy_loss_schema() {
  std::string out = "hyper:";
  for (int k = 0; k < kNumHyper; ++k) out += (k ? "," : "") + std::string(kHyperFields[k]);
  out += "; stats:";
  for (int k = 0; k < kNumStats; ++k) out += (k ? "," : "") + std::string(kStatFields[k]);
  return out;
}

struct Hyper {
  double clip_low, clip_high, dual;  // read by the token loops as their float type
  bool has_dual;
  double tau_pos, tau_neg, dro_beta, ppo_kl_coef;
  double kl_coef, ent_coef, dp, lsf;
  bool has_lsf;
  bool kl_bias;  // TRL's use_bias_correction_kl: the KL estimate times the (unclamped) importance ratio
  std::optional<double> global_tokens, global_seqs;  // when given as numbers
};

std::optional<double> given(double x) { return std::isnan(x) ? std::nullopt : std::optional<double>(x); }

Hyper parse_hyper(const std::vector<double>& h) {
  TORCH_CHECK(h.size() == kNumHyper, "rlkern.policy_loss: hyper must have ", kNumHyper, " entries, got ", h.size());
  Hyper x;
  x.clip_low = h[kClipLow];
  x.clip_high = h[kClipHigh];
  x.has_dual = !std::isnan(h[kDualClip]);
  x.dual = x.has_dual ? h[kDualClip] : std::numeric_limits<double>::infinity();
  x.kl_coef = h[kKlCoef];
  x.ent_coef = h[kEntropyCoef];
  x.dp = h[kDpSize];
  x.has_lsf = !std::isnan(h[kLossScaleFactor]);
  x.lsf = h[kLossScaleFactor];
  x.tau_pos = h[kTauPos];
  x.tau_neg = h[kTauNeg];
  x.dro_beta = std::isnan(h[kDroBeta]) ? 0.0 : h[kDroBeta];
  x.ppo_kl_coef = h[kPpoKlCoef];
  x.global_tokens = given(h[kGlobalTokens]);
  x.global_seqs = given(h[kGlobalSeqs]);
  x.kl_bias = h[kKlBias] != 0.0;
  return x;
}

// A token input: float32, or bfloat16 read in place (no widened copy; other dtypes are widened
// to float32 first); float64 in the double loops. Null when not given.
struct In {
  const void* p = nullptr;
  bool bf16 = false;
  explicit operator bool() const { return p != nullptr; }
};

// A gradient output: float32, or bfloat16 written in place; float64 in the double loops.
struct Out {
  void* p = nullptr;
  bool bf16 = false;
};

struct Args {
  In lp, old, adv, ref, ent, isw, sel;  // ref/ent/isw/sel may be null; adv unused when adv_per_seq
  const void* adv_seq;                  // [B] when adv_per_seq, in the loops' float type
  const void* mask;
  MaskKind mask_kind;
  const int64_t* cu;  // null: padded
  int64_t T;          // padded width
  bool adv_per_seq;
  Kl kl;
  bool kl_st;
  Hyper h;
};

// ---------------------------------------------------------------------------------------------
// The token loops on W-lane vectors of T = float (W = 8: AVX2, W = 4: SSE2 / NEON) or T = double
// (W = 4, 2), as static members of Simd<T, W>. Comparisons give int lanes (of T's width) of
// 0 / -1; `m ? a : b` selects per lane.

template <typename T, int W>
struct Lanes;  // T vectors of W lanes; the integer lanes of their comparisons (i, u) and of the loads
template <>
struct Lanes<float, 8> {
  typedef float f __attribute__((vector_size(32)));
  typedef int32_t i __attribute__((vector_size(32)));
  typedef uint32_t u __attribute__((vector_size(32)));
  typedef int32_t i32 __attribute__((vector_size(32)));
  typedef int64_t i64 __attribute__((vector_size(64)));
  typedef uint8_t u8 __attribute__((vector_size(8)));
  typedef uint16_t u16 __attribute__((vector_size(16)));
};
template <>
struct Lanes<float, 4> {
  typedef float f __attribute__((vector_size(16)));
  typedef int32_t i __attribute__((vector_size(16)));
  typedef uint32_t u __attribute__((vector_size(16)));
  typedef int32_t i32 __attribute__((vector_size(16)));
  typedef int64_t i64 __attribute__((vector_size(32)));
  typedef uint8_t u8 __attribute__((vector_size(4)));
  typedef uint16_t u16 __attribute__((vector_size(8)));
};
template <>
struct Lanes<double, 4> {
  typedef double f __attribute__((vector_size(32)));
  typedef int64_t i __attribute__((vector_size(32)));
  typedef uint64_t u __attribute__((vector_size(32)));
  typedef int32_t i32 __attribute__((vector_size(16)));
  typedef int64_t i64 __attribute__((vector_size(32)));
  typedef uint8_t u8 __attribute__((vector_size(4)));
  typedef uint16_t u16 __attribute__((vector_size(8)));
};
template <>
struct Lanes<double, 2> {
  typedef double f __attribute__((vector_size(16)));
  typedef int64_t i __attribute__((vector_size(16)));
  typedef uint64_t u __attribute__((vector_size(16)));
  typedef int32_t i32 __attribute__((vector_size(8)));
  typedef int64_t i64 __attribute__((vector_size(16)));
  typedef uint8_t u8 __attribute__((vector_size(2)));
  typedef uint16_t u16 __attribute__((vector_size(4)));
};

template <typename T, int W>
struct Simd {
  using vf = typename Lanes<T, W>::f;
  using vi = typename Lanes<T, W>::i;
  using vi32 = typename Lanes<T, W>::i32;
  using vi64 = typename Lanes<T, W>::i64;
  using vu = typename Lanes<T, W>::u;
  using vu8 = typename Lanes<T, W>::u8;
  using vu16 = typename Lanes<T, W>::u16;
  using I = std::conditional_t<std::is_same_v<T, float>, int32_t, int64_t>;  // a lane of vi
  static constexpr bool kF32 = std::is_same_v<T, float>;
  static constexpr int kW = W;

  RLK_VEC vf splat(T x) { return vf{} + x; }
  RLK_VEC vf lanes_true(vi m) { return reinterpret_cast<vf>(m & reinterpret_cast<vi>(splat(T(1)))); }  // 1 / 0
  // std::max / std::min semantics (a NaN first argument comes back), as the reference's clamps.
  RLK_VEC vf vmax(vf a, vf b) { return a < b ? b : a; }
  RLK_VEC vf vmin(vf a, vf b) { return b < a ? b : a; }
  RLK_VEC vf vclamp(vf x, T lo, T hi) { return vmin(vmax(x, splat(lo)), splat(hi)); }
  RLK_VEC vf vand(vf x, vi m) { return reinterpret_cast<vf>(reinterpret_cast<vi>(x) & m); }  // x or +0
  RLK_VEC vf vabs(vf x) { return reinterpret_cast<vf>(reinterpret_cast<vi>(x) & std::numeric_limits<I>::max()); }
  RLK_VEC vf vsign(vf x) { return x > T(0) ? splat(T(1)) : (x < T(0) ? splat(T(-1)) : splat(T(0))); }

  // e^x: x = n ln2 + r (|r| <= ln2 / 2, ln2 split in two so n ln2 is exact), e^r by its Taylor
  // series to r^7 (truncation < 1e-8 relative), 2^n applied as two exponent-field factors so
  // that results down to the denormals stay right. With x clamped to [-104, 88.8] (a NaN passes
  // the clamp), x > ln(FLT_MAX) overflows to inf in the last product, x < -103.97 rounds to 0, and
  // NaN stays NaN (whatever 2^n its garbage n gives).
  RLK_VEC vf vexp(vf x) {
    if constexpr (!kF32) return vexp_double(x);
    const vf shifter = splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
    const vf xc = vmin(vmax(x, splat(-104.f)), splat(88.8f));
    const vf fn = (xc * 1.44269504088896341f + shifter) - shifter;
    vf r = xc - fn * 0.693145751953125f;  // ln2's top 16 bits: fn * hi is exact
    r = r - fn * 1.428606765330187e-06f;
    // Estrin's scheme: 4 dependent steps instead of Horner's 8
    const vf r2 = r * r, r4 = r2 * r2;
    const vf p01 = r + 1.f, p23 = r * (1.f / 6.f) + 0.5f;
    const vf p45 = r * (1.f / 120.f) + 1.f / 24.f, p67 = r * (1.f / 5040.f) + 1.f / 720.f;
    const vf p = (p23 * r2 + p01) + (p67 * r2 + p45) * r4;
    const vi n = __builtin_convertvector(fn, vi);
    const vi n1 = n >> 1;
    const vi n2 = n - n1;
    const vf s1 = reinterpret_cast<vf>((n1 + 127) << 23), s2 = reinterpret_cast<vf>((n2 + 127) << 23);
    return p * s1 * s2;
  }

  // e^x in double, as vexp: ln2 split as fdlibm's ln2_hi (32 significant bits, so n ln2_hi is
  // exact) and ln2_lo, e^r by its Taylor series to r^13 (truncation < 1e-17 relative for
  // |r| <= ln2 / 2), n read from the low bits of x log2(e) + 1.5 * 2^52 (no double -> int64
  // conversion before AVX-512), 2^n as two exponent-field factors. x clamped to [-746, 710]:
  // above ln(DBL_MAX) the last product overflows to inf, below -745.2 it rounds to 0.
  RLK_VEC vf vexp_double(vf x) {
    const vf shifter = splat(T(6755399441055744.0));  // 1.5 * 2^52
    const vf xc = vmin(vmax(x, splat(T(-746.0))), splat(T(710.0)));
    const vf t = xc * T(1.4426950408889634) + shifter;
    const vf fn = t - shifter;
    vf r = xc - fn * T(6.93147180369123816490e-01);
    r = r - fn * T(1.90821492927058770002e-10);
    const vf r2 = r * r, r4 = r2 * r2, r8 = r4 * r4;
    // Estrin's scheme over the coefficients 1 / k!
    const vf p01 = r + T(1), p23 = r * T(1.0 / 6) + T(0.5);
    const vf p45 = r * T(1.0 / 120) + T(1.0 / 24), p67 = r * T(1.0 / 5040) + T(1.0 / 720);
    const vf p89 = r * T(1.0 / 362880) + T(1.0 / 40320), p1011 = r * T(1.0 / 39916800) + T(1.0 / 3628800);
    const vf p1213 = r * T(1.0 / 6227020800.0) + T(1.0 / 479001600);
    const vf q0 = p23 * r2 + p01, q1 = p67 * r2 + p45, q2 = p1011 * r2 + p89;
    const vf p = (q1 * r4 + q0) + (p1213 * r4 + q2) * r8;
    const vi n = reinterpret_cast<vi>(t) - reinterpret_cast<vi>(shifter);
    const vi n1 = n >> 1;
    const vi n2 = n - n1;
    const vf s1 = reinterpret_cast<vf>((n1 + 1023) << 52), s2 = reinterpret_cast<vf>((n2 + 1023) << 52);
    return p * s1 * s2;
  }

  // ln, lane by lane (only dppo_kl's binary KL needs it).
  RLK_VEC vf vlog(vf x) {
    T buf[kW];
    std::memcpy(buf, &x, sizeof(buf));
    for (int j = 0; j < kW; ++j) buf[j] = std::log(buf[j]);
    std::memcpy(&x, buf, sizeof(buf));
    return x;
  }

  // Loads and stores of n <= W elements (lanes past n read as 0). The full-vector case is a
  // separate branch so that its copies have a constant size (one vector move, not a memcpy call).
  template <typename E, typename V>
  RLK_VEC V load_n(const E* p, int64_t n) {
    V v = {};
    if (n == kW) std::memcpy(&v, p, kW * sizeof(E));
    else std::memcpy(&v, p, static_cast<size_t>(n) * sizeof(E));
    return v;
  }

  RLK_VEC vf load(const T* p, int64_t n) { return load_n<T, vf>(p, n); }

  RLK_VEC void store(T* p, vf v, int64_t n) {
    if (n == kW) std::memcpy(p, &v, sizeof(v));
    else std::memcpy(p, &v, static_cast<size_t>(n) * sizeof(T));
  }

  // bfloat16 is the top half of a float32 (float loops only: the double loops read float64)
  RLK_VEC vf load_in(const In& x, int64_t i, int64_t n) {
    if constexpr (kF32) {
      if (x.bf16) {
        const vu16 h = load_n<uint16_t, vu16>(static_cast<const uint16_t*>(x.p) + i, n);
        return reinterpret_cast<vf>(__builtin_convertvector(h, vu) << 16);
      }
    }
    return load(static_cast<const T*>(x.p) + i, n);
  }

  RLK_VEC void store_out(const Out& o, int64_t i, vf v, int64_t n) {
    if constexpr (kF32) {
      if (o.bf16) {
        store_bf16(static_cast<uint16_t*>(o.p) + i, v, n);
        return;
      }
    }
    store(static_cast<T*>(o.p) + i, v, n);
  }

  // float32 -> bfloat16 rounded to nearest even (as torch's .to(torch.bfloat16)); NaN stays a quiet NaN
  RLK_VEC void store_bf16(uint16_t* p, vf v, int64_t n) {
    const vu bits = reinterpret_cast<vu>(v);
    const vu rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    const vu out = v != v ? vu{} + 0x7fc0u : rounded;
    const vu16 h = __builtin_convertvector(out, vu16);
    if (n == kW) std::memcpy(p, &h, sizeof(h));
    else std::memcpy(p, &h, static_cast<size_t>(n) * sizeof(uint16_t));
  }

  // n <= W bytes -> int32 lanes. Each lane takes the 32-bit word holding its byte and shifts it
  // into place (one variable shift with AVX2); GCC's own byte-vector widening goes lane by lane.
  RLK_VEC vi widen_bytes(const uint8_t* p, int64_t n) {
    uint32_t words[kW / 4] = {};
    if (n == kW) std::memcpy(words, p, kW);
    else std::memcpy(words, p, static_cast<size_t>(n));
    vi w, shift;
    for (int j = 0; j < kW; ++j) {
      w[j] = static_cast<int32_t>(words[j / 4]);
      shift[j] = 8 * (j % 4);
    }
    return (w >> shift) & 0xff;
  }

  RLK_VEC vf load_mask(const Args& a, int64_t i, int64_t n) {
    switch (a.mask_kind) {
      case MaskKind::kNone: {
        vi lane = {};
        for (int j = 0; j < kW; ++j) lane[j] = j;
        return lanes_true(lane < static_cast<I>(n));
      }
      case MaskKind::kU8:
        if constexpr (kF32) {
          return __builtin_convertvector(widen_bytes(static_cast<const uint8_t*>(a.mask) + i, n), vf);
        } else {
          return __builtin_convertvector((load_n<uint8_t, vu8>(static_cast<const uint8_t*>(a.mask) + i, n)), vf);
        }
      case MaskKind::kI32:
        return __builtin_convertvector((load_n<int32_t, vi32>(static_cast<const int32_t*>(a.mask) + i, n)), vf);
      case MaskKind::kI64:
        if constexpr (kF32) {  // via int32 lanes (GCC converts int64 -> float lane by lane); |weight| < 2^31
          return __builtin_convertvector(
              __builtin_convertvector((load_n<int64_t, vi64>(static_cast<const int64_t*>(a.mask) + i, n)), vi), vf);
        } else {
          return __builtin_convertvector((load_n<int64_t, vi64>(static_cast<const int64_t*>(a.mask) + i, n)), vf);
        }
      default:
        return load(static_cast<const T*>(a.mask) + i, n);
    }
  }

  RLK_VEC double hsum(vf v) {
    double s = 0;
    for (int j = 0; j < kW; ++j) s += v[j];
    return s;
  }

  // ---------------------------------------------------------------------------------------------
  // Token math (reference _token_terms), W tokens at a time.

  struct Token {
    vf l, dl;                          // policy loss and d l / d logprob (before is_weights)
    vf cf, lo, hi, dcf, akl, ratio;    // metric values
  };

  // slr: the sequence's mean log-ratio (GSPO and the level="sequence" losses). For those the
  // log-ratio of every token is slr, unclamped, and dl is d l / d slr (cispo: d l / d logprob).
  // geo_mean: l is the token's sign-clipped log-ratio (its sequence's geometric mean ratio is
  // exp of their mean), dl its derivative in logprob.
  template <Loss L0>
  RLK_VEC Token policy_token(const Hyper& h, vf lp, vf old, vf A, T slr, vf sel) {
    constexpr Loss L = token_form(L0);
    const vf zero = {};
    const T clip_low = static_cast<T>(h.clip_low), clip_high = static_cast<T>(h.clip_high);
    const T dual = static_cast<T>(h.dual), tau_pos = static_cast<T>(h.tau_pos), tau_neg = static_cast<T>(h.tau_neg);
    const T dro_beta = static_cast<T>(h.dro_beta), ppo_kl_coef = static_cast<T>(h.ppo_kl_coef);
    const T lo_b = T(1) - clip_low, hi_b = T(1) + clip_high;
    const vf lr = seq_level(L0) ? splat(slr) : lp - old;
    Token t{zero, zero, zero, zero, zero, zero, zero, zero};
    constexpr bool clamped = !seq_level(L0) && (L == Loss::kPpo || L == Loss::kCispo || L == Loss::kSapo ||
                                                L == Loss::kDppoTv || L == Loss::kDppoKl);
    const vf lrc = clamped ? vclamp(lr, -kLogRatioBound, kLogRatioBound) : lr;
    vf r, dr;
    if constexpr (L == Loss::kGspo) {  // the sequence ratio, straight-through on the token's own logprob
      const T rs = std::exp(std::min(slr, T(kGspoMax)));
      r = splat(rs);
      dr = splat(slr <= kGspoMax ? rs : T(0));
    } else if constexpr (L != Loss::kReinforce && L != Loss::kDro) {
      r = vexp(lrc);
      // clamp passes the gradient on the closed interval, as torch.clamp does
      dr = clamped ? ((lr >= -kLogRatioBound) & (lr <= kLogRatioBound) ? r : zero) : r;
    } else {
      r = vexp(lr);
      dr = r;
    }
    t.akl = -lrc;
    if constexpr (L == Loss::kPpo || L == Loss::kGspo || L == Loss::kClipCov) {
      const vf l1 = -A * r, l2 = -A * vclamp(r, lo_b, hi_b);
      const vi clipped = l2 > l1;
      t.l = vmax(l1, l2);
      t.dl = clipped ? zero : -A * dr;
      t.cf = lanes_true(clipped);
      t.lo = lanes_true(clipped & (A < T(0)));
      t.hi = lanes_true(clipped & (A > T(0)));
      if constexpr (L == Loss::kPpo) {
        if (h.has_dual) {
          const vf l3 = -A * dual;
          const vi neg = A < T(0);
          const vi over = neg & (t.l > l3);
          t.dl = over ? zero : ((neg & (t.l == l3)) ? t.dl * T(0.5) : t.dl);  // torch.minimum splits a tie
          t.l = over ? l3 : t.l;
          t.dcf = lanes_true(over);
        }
      }
      if constexpr (L == Loss::kClipCov) {
        t.l *= T(1) - sel;
        t.dl *= T(1) - sel;
        t.cf = sel;
      }
    } else if constexpr (L == Loss::kCispo) {
      const vf cr = vclamp(r, lo_b, hi_b);
      t.l = -cr * A * lp;
      t.dl = -cr * A;
      t.cf = lanes_true(r != cr);
      // the halves: the clip against A's sign (TRL's cispo_clip_ratio is the A > 0 half)
      t.lo = lanes_true((r < lo_b) & (A < T(0)));
      t.hi = lanes_true((r > hi_b) & (A > T(0)));
    } else if constexpr (L == Loss::kReinforce) {
      t.l = -A * lp;
      t.dl = -A;
    } else if constexpr (L == Loss::kSapo) {
      const vf tau = A > T(0) ? splat(tau_pos) : splat(tau_neg);
      const vf s = T(1) / (T(1) + vexp(-tau * (r - T(1))));
      t.l = -s * (T(4) / tau) * A;
      t.dl = -A * T(4) * s * (T(1) - s) * dr;
    } else if constexpr (L == Loss::kDro) {
      t.l = -(lp * A - T(0.5) * dro_beta * lr * lr);
      t.dl = -(A - dro_beta * lr);
    } else if constexpr (L == Loss::kDppoTv || L == Loss::kDppoKl) {
      const vf tr = vmin(r, splat(dual));
      const vf p = vexp(lp), po = vexp(old);
      vi up_ok, down_ok;
      if constexpr (L == Loss::kDppoTv) {
        up_ok = (p - po) <= clip_high;
        down_ok = (p - po) >= -clip_low;
      } else {
        const vf bkl = po * (old - lp) + (T(1) - po) * vlog((T(1) - po + T(1e-8)) / (T(1) - p + T(1e-8)));
        up_ok = (bkl <= clip_high) | (p <= po);
        down_ok = (bkl <= clip_low) | (p >= po);
      }
      const vi pos = A > T(0);
      const vf valid = lanes_true(pos ? up_ok : down_ok);
      t.l = -A * tr * lp * valid;
      t.dl = -A * tr * valid;
      t.cf = T(1) - valid;
      t.lo = pos ? zero : T(1) - valid;
      t.hi = pos ? T(1) - valid : zero;
      t.dcf = r > dual ? valid : zero;
    } else if constexpr (L == Loss::kGeoMean) {
      const vf sgn = vsign(A);
      const vf lrc2 = vclamp(lr, -clip_low, clip_high);
      const vi pos = A > T(0), neg = A < T(0), clipped = lr != lrc2;
      t.l = sgn * vmin(sgn * lr, sgn * lrc2);
      // lr is the min where the clip does not bind for A's sign (the ends of the range included,
      // as torch.clamp passes the gradient there); 0 where A = 0
      t.dl = lanes_true((pos & (lr <= clip_high)) | (neg & (lr >= -clip_low)));
      t.cf = t.hi = lanes_true(clipped & pos);  // verl: pg_clipfrac counts A > 0 only
      t.lo = t.dcf = lanes_true(clipped & neg);
    } else {  // kl_cov
      t.l = -A * r + sel * (ppo_kl_coef * vabs(lr));
      t.dl = -A * r + sel * ppo_kl_coef * vsign(lr);
      t.akl = vabs(lr);
    }
    t.ratio = r;
    return t;
  }

  // KL estimate and its derivative in logprob (verl kl_penalty; '+' keeps k2's gradient).
  RLK_VEC void kl_token(const Args& a, vf lp, vf ref, vf* value, vf* deriv) {
    const vf diff = lp - ref;
    switch (a.kl) {
      case Kl::kK1:
        *value = diff;
        *deriv = splat(T(1));
        break;
      case Kl::kAbs:
        *value = vabs(diff);
        *deriv = vsign(diff);
        break;
      case Kl::kK2:
        *value = T(0.5) * diff * diff;
        *deriv = diff;
        break;
      case Kl::kK3:
      case Kl::kK3Unclamped: {  // k3 (verl's bounds) / k3_unclamped (TRL's beta term: none)
        const bool bounded = a.kl == Kl::kK3;
        const vf x = bounded ? vclamp(-diff, -kLogRatioBound, kLogRatioBound) : -diff;
        const vf e = vexp(x);
        vf v = e - x - T(1);
        if constexpr (std::is_same_v<T, float>) {
          // e - x - 1 cancels for small |x| (error ~ ulp(1), relative ~1e-7 / (x^2 / 2)): below
          // |x| = 0.5 the Taylor series x^2/2 + x^3/6 + ... + x^9/9! (truncation < 3e-9
          // relative there) keeps k3 within a few float ulp. Double needs no series.
          const vf series = x * x * (T(1. / 2) + x * (T(1. / 6) + x * (T(1. / 24) + x * (T(1. / 120) +
                            x * (T(1. / 720) + x * (T(1. / 5040) + x * (T(1. / 40320) + x * T(1. / 362880))))))));
          v = vabs(x) < T(0.5) ? series : v;
        }
        if (!bounded) {
          *value = v;
          *deriv = T(1) - e;
          break;
        }
        *value = vclamp(v, -kK3Bound, kK3Bound);
        const vi live = (-diff >= -kLogRatioBound) & (-diff <= kLogRatioBound) & (v >= -kK3Bound) & (v <= kK3Bound);
        *deriv = live ? T(1) - e : splat(T(0));
        break;
      }
    }
    if (a.kl_st) *deriv = diff;
  }

  RLK_VEC void seq_range(const Args& a, int64_t b, int64_t* begin, int64_t* end) {
    if (a.cu) {
      *begin = a.cu[b];
      *end = a.cu[b + 1];
    } else {
      *begin = b * a.T;
      *end = (b + 1) * a.T;
    }
  }

  RLK_VEC T seq_log_ratio(const Args& a, int64_t begin, int64_t end) {
    vf num = {}, den = {};
    for (int64_t i = begin; i < end; i += kW) {
      const int64_t n = std::min<int64_t>(kW, end - i);
      const vf m = load_mask(a, i, n);
      num += m * vand(load_in(a.lp, i, n) - load_in(a.old, i, n), m != T(0));
      den += m;
    }
    return static_cast<T>(hsum(num) / std::max(hsum(den), 1.0));
  }

  // The inputs of n tokens, 0 at masked-out ones (and past n): every token value is then finite
  // there and m * value is 0, so a NaN/inf at a masked-out token never leaks into a sum (verl's
  // masked_sum) and the sums need no select.
  struct Loaded {
    vf m, lp, old, A, sel, ref, ent, isw;
    vi live;
  };

  RLK_VEC Loaded load_token(const Args& a, int64_t b, int64_t i, int64_t n) {
    Loaded x;
    x.m = load_mask(a, i, n);
    x.live = x.m != T(0);
    x.lp = vand(load_in(a.lp, i, n), x.live);
    x.old = vand(load_in(a.old, i, n), x.live);
    x.A = vand(a.adv_per_seq ? splat(static_cast<const T*>(a.adv_seq)[b]) : load_in(a.adv, i, n), x.live);
    x.sel = a.sel ? vand(load_in(a.sel, i, n), x.live) : vf{};
    x.ref = a.ref ? vand(load_in(a.ref, i, n), x.live) : vf{};
    x.ent = a.ent ? vand(load_in(a.ent, i, n), x.live) : vf{};
    x.isw = a.isw ? vand(load_in(a.isw, i, n), x.live) : splat(T(1));
    return x;
  }

  // kl_bias_correction's ratio: exp of the raw log-ratio (TRL's coef_1, unclamped), or at
  // level="sequence" of the sequence mean log-ratio.
  template <Loss L>
  RLK_VEC vf kl_ratio(const Loaded& x, T slr) {
    if constexpr (seq_level(L)) return splat(std::exp(slr));
    return vexp(x.lp - x.old);
  }

  template <Loss L>
  RLK_VEC void stats_body(const Args& a, T* stats, int64_t b0, int64_t b1) {
    const vf zero = {};
    for (int64_t b = b0; b < b1; ++b) {
      int64_t begin, end;
      seq_range(a, b, &begin, &end);
      const T slr = two_pass(L) ? seq_log_ratio(a, begin, end) : T(0);
      double sums[kSums] = {0};
      vf acc[kSums];
      for (auto& v : acc) v = zero;
      // through_mean: sum of m is_w dl; geo_mean: sums of m A and of m log(is_w + 1e-10)
      double dseq = 0, adv_sum = 0, log_isw_sum = 0;
      vf acc_dseq = zero, acc_adv = zero, acc_log_isw = zero;
      int64_t pending = 0;
      for (int64_t i = begin; i < end; i += kW) {
        const int64_t n = std::min<int64_t>(kW, end - i);
        const Loaded x = load_token(a, b, i, n);
        const Token t = policy_token<L>(a.h, x.lp, x.old, x.A, slr, x.sel);
        if constexpr (L == Loss::kGeoMean) {  // the sequence's weights enter through its geometric mean
          acc[kPolicy] += x.m * t.l;
          acc_adv += x.m * x.A;
          if (a.isw) acc_log_isw += x.m * vlog(x.isw + T(1e-10));
        } else {
          acc[kPolicy] += x.m * (t.l * x.isw);
          if constexpr (through_mean(L)) acc_dseq += x.m * (t.dl * x.isw);
        }
        acc[kCount] += x.m;
        acc[kCf] += x.m * t.cf;
        acc[kLo] += x.m * t.lo;
        acc[kHi] += x.m * t.hi;
        acc[kDcf] += x.m * t.dcf;
        acc[kAkl] += x.m * t.akl;
        acc[kRatio] += x.m * t.ratio;
        if (a.ref) {
          vf v = {}, d = {};
          kl_token(a, x.lp, x.ref, &v, &d);
          if (a.h.kl_bias) v *= kl_ratio<L>(x, slr);
          acc[kKl] += x.m * v;
        }
        acc[kEntropy] += x.m * x.ent;
        if (++pending == kFlushEvery || i + kW >= end) {
          for (int k = 0; k < kSums; ++k) {
            sums[k] += hsum(acc[k]);
            acc[k] = zero;
          }
          dseq += hsum(acc_dseq);
          adv_sum += hsum(acc_adv);
          log_isw_sum += hsum(acc_log_isw);
          acc_dseq = acc_adv = acc_log_isw = zero;
          pending = 0;
        }
      }
      T* out = stats + b * kNumStats;
      for (int k = 0; k < kSums; ++k) out[k] = static_cast<T>(sums[k]);
      out[kSlr] = slr;
      out[kDseq] = static_cast<T>(dseq);
      if constexpr (L == Loss::kGeoMean) {  // verl: -mean(A) exp(mean clipped lr) [exp(mean log is_w)]
        const double den = sums[kCount] + kMeanEps;
        double seq_loss = -(adv_sum / den) * std::exp(sums[kPolicy] / den);
        if (a.isw) seq_loss *= std::exp(log_isw_sum / den);
        out[kPolicy] = static_cast<T>(seq_loss);
        out[kSlr] = static_cast<T>(sums[kPolicy] / den);
      }
    }
  }

  template <Loss L>
  RLK_VEC void grad_body(const Args& a, const T* stats, const T* coefs, const Out& g_lp, const Out& g_ent,
                         int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t begin, end;
      seq_range(a, b, &begin, &end);
      const T slr = stats[b * kNumStats + kSlr];
      const T kl_seq = stats[b * kNumStats + kKl] / std::max(stats[b * kNumStats + kCount], T(1));
      const T c_pol = coefs[b * 3], c_kl = coefs[b * 3 + 1], c_ent = coefs[b * 3 + 2];
      for (int64_t i = begin; i < end; i += kW) {
        const int64_t n = std::min<int64_t>(kW, end - i);
        const Loaded x = load_token(a, b, i, n);
        vf g;
        if constexpr (through_mean(L)) {
          g = splat(c_pol);
        } else {
          const Token t = policy_token<L>(a.h, x.lp, x.old, x.A, slr, x.sel);
          g = L == Loss::kGeoMean ? c_pol * t.dl : c_pol * t.dl * x.isw;
        }
        if (a.ref && c_kl != T(0)) {
          vf v = {}, d = {};
          kl_token(a, x.lp, x.ref, &v, &d);
          if (!a.h.kl_bias) {
            g += c_kl * d;
          } else if constexpr (seq_level(L)) {
            // d/d lp_t of r_b sum_s m_s kl_s, r_b = exp(mean lr): m_t (r_b dkl_t + (sum_s m_s kl_s r_b) / max(n, 1)),
            // the second sum being the forward's corrected KL column
            g += c_kl * (kl_ratio<L>(x, slr) * d + kl_seq);
          } else {  // d (r kl) / d lp = r (dkl + kl), r = exp(lr)
            g += c_kl * kl_ratio<L>(x, slr) * (d + v);
          }
        }
        store_out(g_lp, i, vand(x.m * g, x.live), n);
        if (g_ent.p) store_out(g_ent, i, vand(x.m * c_ent, x.live), n);
      }
    }
  }

  // ---------------------------------------------------------------------------------------------
  // kl_penalty and aggregate (rlkern/ops/policy_loss/aggregate.py): the same loads and KL math.

  // Tokens [i0, i1) of a flat kl_penalty: the estimate, or with `grad` its derivative in logprob
  // times the upstream gradient.
  RLK_VEC void kl_body(const Args& a, const In& grad, const Out& out, int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i += kW) {
      const int64_t n = std::min<int64_t>(kW, i1 - i);
      vf v = {}, d = {};
      kl_token(a, load_in(a.lp, i, n), load_in(a.ref, i, n), &v, &d);
      store_out(out, i, grad ? d * load_in(grad, i, n) : v, n);
    }
  }

  // Sequences [b0, b1): sums[2 b] = sum of m * v over the tokens where m != 0 (a NaN / inf value
  // at a masked-out token never leaks, as the reference's where), sums[2 b + 1] = sum of m.
  // Without a.lp (the backward needs the counts only) the values are not read.
  RLK_VEC void agg_sums_body(const Args& a, double* sums, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t begin, end;
      seq_range(a, b, &begin, &end);
      double kept = 0, count = 0;
      vf acc_kept = {}, acc_count = {};
      int64_t pending = 0;
      for (int64_t i = begin; i < end; i += kW) {
        const int64_t n = std::min<int64_t>(kW, end - i);
        const vf m = load_mask(a, i, n);
        if (a.lp) acc_kept += m * vand(load_in(a.lp, i, n), m != T(0));
        acc_count += m;
        if (++pending == kFlushEvery || i + kW >= end) {
          kept += hsum(acc_kept);
          count += hsum(acc_count);
          acc_kept = acc_count = vf{};
          pending = 0;
        }
      }
      sums[2 * b] = kept;
      sums[2 * b + 1] = count;
    }
  }

  // Sequences [b0, b1) of aggregate_backward: d loss / d v = (m != 0 ? m : 0) * coefs[b].
  RLK_VEC void agg_grad_body(const Args& a, const T* coefs, const Out& out, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t begin, end;
      seq_range(a, b, &begin, &end);
      const vf c = splat(coefs[b]);
      for (int64_t i = begin; i < end; i += kW) {
        const int64_t n = std::min<int64_t>(kW, end - i);
        const vf m = load_mask(a, i, n);
        store_out(out, i, vand(m * c, m != T(0)), n);
      }
    }
  }
};  // struct Simd

// The two compilations of each loop (per float type), and the runtime choice between them.
template <typename T>
constexpr int kAvx2W = 32 / sizeof(T);
template <typename T>
constexpr int kBaseW = 16 / sizeof(T);  // 16-byte vectors: SSE2 on any x86-64, NEON on arm64
template <typename T>
using StatsFn = void (*)(const Args&, T*, int64_t, int64_t);
template <typename T>
using GradFn = void (*)(const Args&, const T*, const T*, const Out&, const Out&, int64_t, int64_t);

template <typename T, Loss L>
void stats_base(const Args& a, T* s, int64_t b0, int64_t b1) {
  Simd<T, kBaseW<T>>::template stats_body<L>(a, s, b0, b1);
}
template <typename T, Loss L>
void grad_base(const Args& a, const T* s, const T* c, const Out& g, const Out& ge, int64_t b0, int64_t b1) {
  Simd<T, kBaseW<T>>::template grad_body<L>(a, s, c, g, ge, b0, b1);
}

#if RLK_X86_SIMD
template <typename T, Loss L>
RLK_TGT void stats_avx2(const Args& a, T* s, int64_t b0, int64_t b1) {
  Simd<T, kAvx2W<T>>::template stats_body<L>(a, s, b0, b1);
}
template <typename T, Loss L>
RLK_TGT void grad_avx2(const Args& a, const T* s, const T* c, const Out& g, const Out& ge, int64_t b0, int64_t b1) {
  Simd<T, kAvx2W<T>>::template grad_body<L>(a, s, c, g, ge, b0, b1);
}

#endif
using rlkern::simd_ok;

template <typename T, Loss L>
std::pair<StatsFn<T>, GradFn<T>> pick() {
#if RLK_X86_SIMD
  if (simd_ok()) return {&stats_avx2<T, L>, &grad_avx2<T, L>};
#endif
  return {&stats_base<T, L>, &grad_base<T, L>};
}

template <typename T>
std::pair<StatsFn<T>, GradFn<T>> pick(Loss loss) {
  switch (loss) {
    case Loss::kPpo: return pick<T, Loss::kPpo>();
    case Loss::kGspo: return pick<T, Loss::kGspo>();
    case Loss::kCispo: return pick<T, Loss::kCispo>();
    case Loss::kReinforce: return pick<T, Loss::kReinforce>();
    case Loss::kSapo: return pick<T, Loss::kSapo>();
    case Loss::kDro: return pick<T, Loss::kDro>();
    case Loss::kDppoTv: return pick<T, Loss::kDppoTv>();
    case Loss::kDppoKl: return pick<T, Loss::kDppoKl>();
    case Loss::kClipCov: return pick<T, Loss::kClipCov>();
    case Loss::kKlCov: return pick<T, Loss::kKlCov>();
    case Loss::kGeoMean: return pick<T, Loss::kGeoMean>();
    case Loss::kPpoSeq: return pick<T, Loss::kPpoSeq>();
    case Loss::kCispoSeq: return pick<T, Loss::kCispoSeq>();
    case Loss::kSapoSeq: return pick<T, Loss::kSapoSeq>();
  }
  TORCH_CHECK(false, "rlkern.policy_loss: bad loss id");
}

// The kl_penalty / aggregate loops, compiled as the policy loss's.
template <typename T>
struct AggFns {
  void (*kl)(const Args&, const In&, const Out&, int64_t, int64_t);
  void (*sums)(const Args&, double*, int64_t, int64_t);
  void (*grad)(const Args&, const T*, const Out&, int64_t, int64_t);
};

template <typename T, int W>
struct AggLoops {
  static void kl(const Args& a, const In& g, const Out& o, int64_t i0, int64_t i1) {
    Simd<T, W>::kl_body(a, g, o, i0, i1);
  }
  static void sums(const Args& a, double* s, int64_t b0, int64_t b1) { Simd<T, W>::agg_sums_body(a, s, b0, b1); }
  static void grad(const Args& a, const T* c, const Out& o, int64_t b0, int64_t b1) {
    Simd<T, W>::agg_grad_body(a, c, o, b0, b1);
  }
};

#if RLK_X86_SIMD
template <typename T>
struct AggLoopsAvx2 {
  RLK_TGT static void kl(const Args& a, const In& g, const Out& o, int64_t i0, int64_t i1) {
    Simd<T, kAvx2W<T>>::kl_body(a, g, o, i0, i1);
  }
  RLK_TGT static void sums(const Args& a, double* s, int64_t b0, int64_t b1) {
    Simd<T, kAvx2W<T>>::agg_sums_body(a, s, b0, b1);
  }
  RLK_TGT static void grad(const Args& a, const T* c, const Out& o, int64_t b0, int64_t b1) {
    Simd<T, kAvx2W<T>>::agg_grad_body(a, c, o, b0, b1);
  }
};
#endif

template <typename T>
AggFns<T> pick_agg() {
#if RLK_X86_SIMD
  if (simd_ok()) return {&AggLoopsAvx2<T>::kl, &AggLoopsAvx2<T>::sums, &AggLoopsAvx2<T>::grad};
#endif
  using Base = AggLoops<T, kBaseW<T>>;
  return {&Base::kl, &Base::sums, &Base::grad};
}

// ---------------------------------------------------------------------------------------------
// Aggregation over the B rows (rlkern/ops/policy_loss.py _seq_weights, in double).

struct Norms {
  Agg agg, ent_agg;
  bool ent_local;  // entropy_agg given: its own mode over the local batch, dp 1 (TRL)
  double dp, width_or_lsf;
  std::optional<double> global_tokens, global_seqs;
  double tokens = 0, seqs = 0;  // local sums of the mask and of non-empty sequences
};

double safe(double d) { return d == 0 ? 1.0 : d; }

double seq_weight(Agg agg, double count, double dp, double tokens, double seqs, double scale) {
  switch (agg) {
    case Agg::kTokenMean: return dp / safe(tokens);
    case Agg::kTokenSum: return dp;
    default: break;
  }
  double w = count > 0 ? dp / safe(seqs) : 0.0;
  if (agg == Agg::kSeqMean) w /= count + kMeanEps;
  if (agg == Agg::kSeqSumNorm) w /= scale;
  return w;
}

// (policy/kl weight, entropy weight) of sequence b.
std::pair<double, double> weights(const Norms& n, double count) {
  const double tokens = n.global_tokens ? *n.global_tokens : n.tokens;
  const double seqs = n.global_seqs ? *n.global_seqs : n.seqs;
  const double w = seq_weight(n.agg, count, n.dp, tokens, seqs, n.width_or_lsf);
  if (!n.ent_local) return {w, w};
  return {w, seq_weight(n.ent_agg, count, 1.0, n.tokens, n.seqs, n.width_or_lsf)};
}

// A normalizer given as a 0-dim tensor, else as a number in the hyper list, else none.
std::optional<double> opt_scalar(const std::optional<at::Tensor>& t, std::optional<double> number, const char* name) {
  if (!t.has_value()) return number;
  TORCH_CHECK(t->numel() == 1, "rlkern.policy_loss: ", name, " must be a single number, got shape ", t->sizes());
  return t->item<double>();
}

Norms make_norms(const Hyper& h, const std::string& agg, const std::string& entropy_agg, int64_t width,
                 const std::optional<at::Tensor>& global_tokens, const std::optional<at::Tensor>& global_seqs) {
  Norms n;
  n.agg = parse_agg(agg, "agg");
  n.ent_local = !entropy_agg.empty();
  n.ent_agg = n.ent_local ? parse_agg(entropy_agg, "entropy_agg") : n.agg;
  n.dp = h.dp;
  n.width_or_lsf = h.has_lsf ? h.lsf : static_cast<double>(width);
  n.global_tokens = opt_scalar(global_tokens, h.global_tokens, "global_tokens");
  n.global_seqs = opt_scalar(global_seqs, h.global_seqs, "global_seqs");
  return n;
}

// ---------------------------------------------------------------------------------------------
// Tensor plumbing.

// The loops' float type: double for float64 logprobs, float for every other dtype (the dtype of
// the loss, metrics and stats, as rlkern/ops/policy_loss.py _out_dtype).
at::ScalarType compute_type(const at::Tensor& logprobs) {
  return logprobs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor as_type(const at::Tensor& t, at::ScalarType ct) { return t.to(ct).contiguous(); }

// A token input as the loops read it: bfloat16 in place in the float loops, else converted to
// the compute type (contiguous); `keep` owns the converted buffer.
In read_in(const at::Tensor& t, at::ScalarType ct, std::vector<at::Tensor>* keep) {
  In in;
  in.bf16 = ct == at::kFloat && t.scalar_type() == at::kBFloat16;
  at::Tensor f = in.bf16 ? t.contiguous() : as_type(t, ct);
  keep->push_back(f);
  in.p = f.data_ptr();
  return in;
}

// A mask: bytes, int32 and int64 read as they are, every other dtype as a weight in the compute type.
void read_mask(const at::Tensor& mask, at::ScalarType ct, Args* a, std::vector<at::Tensor>* keep) {
  at::Tensor m;
  switch (mask.scalar_type()) {
    case at::kBool:  // stored as bytes 0 / 1
    case at::kByte: m = mask.contiguous(); a->mask_kind = MaskKind::kU8; break;
    case at::kInt: m = mask.contiguous(); a->mask_kind = MaskKind::kI32; break;
    case at::kLong: m = mask.contiguous(); a->mask_kind = MaskKind::kI64; break;
    default: m = as_type(mask, ct); a->mask_kind = MaskKind::kReal; break;
  }
  keep->push_back(m);
  a->mask = m.data_ptr();
}

// Packed offsets, checked to run from 0 to n without decreasing; returns B.
int64_t read_cu(const at::Tensor& cu_seqlens, int64_t n, Args* a, std::vector<at::Tensor>* keep, const char* op) {
  at::Tensor cu = cu_seqlens.to(at::kLong).contiguous();
  keep->push_back(cu);
  a->cu = cu.data_ptr<int64_t>();
  a->T = 0;
  const int64_t B = cu.numel() - 1;
  TORCH_CHECK(B >= 0 && a->cu[0] == 0 && a->cu[B] == n, op, ": cu_seqlens must run from 0 to ", n);
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(a->cu[b] <= a->cu[b + 1], op, ": cu_seqlens must not decrease");
  return B;
}

struct Prepared {
  Args a;
  Loss loss;
  std::vector<at::Tensor> keep;  // owners of the converted buffers
  int64_t B = 0, width = 1;
};

Prepared prepare(const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
                 const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& ref_logprobs,
                 const std::optional<at::Tensor>& entropy, const std::optional<at::Tensor>& is_weights,
                 const std::optional<at::Tensor>& select, const std::optional<at::Tensor>& cu_seqlens,
                 const std::string& loss, const std::string& kl_estimator, const std::string& level,
                 const std::vector<double>& hyper) {
  Prepared p;
  const at::ScalarType ct = compute_type(logprobs);
  const bool packed = cu_seqlens.has_value();
  TORCH_CHECK(packed ? logprobs.dim() == 1 : logprobs.dim() == 2,
              "rlkern.policy_loss: logprobs must be [B, T] or packed [total] with cu_seqlens, got ", logprobs.sizes());
  const int64_t n = logprobs.numel();
  auto same = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.sizes() == logprobs.sizes(), "rlkern.policy_loss: ", name, " must have the shape of logprobs ",
                logprobs.sizes(), ", got ", t.sizes());
    return read_in(t, ct, &p.keep);
  };
  auto opt = [&](const std::optional<at::Tensor>& t, const char* name) -> In {
    return t.has_value() ? same(*t, name) : In{};
  };
  Args& a = p.a;
  a.lp = same(logprobs, "logprobs");
  a.old = same(old_logprobs, "old_logprobs");
  a.ref = opt(ref_logprobs, "ref_logprobs");
  a.ent = opt(entropy, "entropy");
  a.isw = opt(is_weights, "is_weights");
  a.sel = opt(select, "select");
  if (packed) {
    p.B = read_cu(*cu_seqlens, n, &a, &p.keep, "rlkern.policy_loss");
  } else {
    a.cu = nullptr;
    p.B = logprobs.size(0);
    a.T = logprobs.size(1);
    p.width = a.T;
  }
  // advantages of the shape of logprobs are per token, [B] per sequence (as rlkern.ops decides)
  a.adv_per_seq = advantages.sizes() != logprobs.sizes();
  if (a.adv_per_seq) {
    TORCH_CHECK(advantages.numel() == p.B, "rlkern.policy_loss: per-sequence advantages must be [B]");
    at::Tensor f = as_type(advantages, ct);
    p.keep.push_back(f);
    a.adv_seq = f.data_ptr();
  } else {
    a.adv = same(advantages, "advantages");
  }
  a.mask = nullptr;
  a.mask_kind = MaskKind::kNone;
  if (mask.has_value()) {
    TORCH_CHECK(mask->sizes() == logprobs.sizes(), "rlkern.policy_loss: mask must have the shape of logprobs");
    read_mask(*mask, ct, &a, &p.keep);
  }
  p.loss = parse_loss(loss, level);
  parse_kl(kl_estimator, &a.kl, &a.kl_st);
  a.h = parse_hyper(hyper);
  return p;
}

int64_t grain(const Prepared& p, int64_t n) {
  const int64_t per_seq = std::max<int64_t>(1, n / std::max<int64_t>(p.B, 1));
  return std::max<int64_t>(1, 8192 / per_seq);
}

// The forward after prepare: the token loops in T, the aggregation over the B rows in double.
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(Prepared& p, Norms& norms, const at::Tensor& logprobs) {
  const auto fopt = logprobs.options().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor stats = at::zeros({p.B + 1, kNumStats}, fopt);
  T* st = stats.data_ptr<T>();
  const StatsFn<T> fn = pick<T>(p.loss).first;
  at::parallel_for(0, p.B, grain(p, logprobs.numel()), [&](int64_t b0, int64_t b1) { fn(p.a, st, b0, b1); });

  double sums[kSums] = {0};
  for (int64_t b = 0; b < p.B; ++b) {
    const T* row = st + b * kNumStats;
    norms.tokens += row[kCount];
    norms.seqs += row[kCount] > 0 ? 1.0 : 0.0;
  }
  const Hyper& h = p.a.h;
  const bool with_kl = p.a.ref && h.kl_coef != 0, with_ent = p.a.ent && h.ent_coef != 0;
  double total = 0;
  for (int64_t b = 0; b < p.B; ++b) {
    const T* row = st + b * kNumStats;
    for (int k = 0; k < kSums; ++k) sums[k] += row[k];
    const auto [w, w_ent] = weights(norms, row[kCount]);
    // geo_mean: row[kPolicy] is the sequence's loss; verl takes a plain mean over the B rows
    total += (p.loss == Loss::kGeoMean ? 1.0 / safe(static_cast<double>(p.B)) : w) * row[kPolicy];
    if (with_kl) total += h.kl_coef * w * row[kKl];
    if (with_ent) total -= h.ent_coef * w_ent * row[kEntropy];
  }
  st[p.B * kNumStats + 0] = static_cast<T>(norms.tokens);
  st[p.B * kNumStats + 1] = static_cast<T>(norms.seqs);
  at::Tensor loss_out = at::empty({}, fopt);
  at::Tensor metrics = at::empty({8}, fopt);
  loss_out.data_ptr<T>()[0] = static_cast<T>(total);
  T* mt = metrics.data_ptr<T>();
  const int cols[8] = {kCf, kLo, kHi, kDcf, kAkl, kRatio, kKl, kEntropy};
  for (int k = 0; k < 8; ++k) mt[k] = static_cast<T>(sums[cols[k]] / (norms.tokens + kMeanEps));
  return {loss_out, metrics, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> policy_loss_forward_cpu(
    const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& ref_logprobs,
    const std::optional<at::Tensor>& entropy, const std::optional<at::Tensor>& is_weights,
    const std::optional<at::Tensor>& select, const std::optional<at::Tensor>& cu_seqlens,
    const std::optional<at::Tensor>& global_tokens, const std::optional<at::Tensor>& global_seqs, std::string loss,
    std::string agg, std::string entropy_agg, std::string kl_estimator, std::string level, std::vector<double> hyper) {
  Prepared p = prepare(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, is_weights, select, cu_seqlens,
                       loss, kl_estimator, level, hyper);
  Norms norms = make_norms(p.a.h, agg, entropy_agg, p.width, global_tokens, global_seqs);
  if (compute_type(logprobs) == at::kDouble) return forward_impl<double>(p, norms, logprobs);
  return forward_impl<float>(p, norms, logprobs);
}

// The backward after prepare: per-sequence coefficients in double, the token loops in T.
template <typename T>
std::tuple<at::Tensor, at::Tensor> backward_impl(Prepared& p, Norms& norms, const at::Tensor& grad_loss,
                                                 const at::Tensor& logprobs, const std::optional<at::Tensor>& entropy,
                                                 const at::Tensor& stats) {
  const auto fopt = logprobs.options().dtype(c10::CppTypeToScalarType<T>::value);
  const at::Tensor st = as_type(stats, c10::CppTypeToScalarType<T>::value);
  const T* s = st.data_ptr<T>();
  norms.tokens = s[p.B * kNumStats + 0];
  norms.seqs = s[p.B * kNumStats + 1];
  const Hyper& h = p.a.h;
  const double g = grad_loss.item<double>();
  const double kl = p.a.ref ? h.kl_coef : 0.0, ent = entropy.has_value() ? h.ent_coef : 0.0;
  std::vector<T> coefs(static_cast<size_t>(3 * p.B));
  for (int64_t b = 0; b < p.B; ++b) {
    const T* row = s + b * kNumStats;
    const auto [w, w_ent] = weights(norms, row[kCount]);
    double c_pol = w * g;
    if (p.loss == Loss::kGeoMean) {  // d (mean_b seq loss) / d (sum of m * clipped lr) of row b
      c_pol = g * row[kPolicy] / (safe(static_cast<double>(p.B)) * (row[kCount] + kMeanEps));
    } else if (through_mean(p.loss)) {  // d loss / d logprob_t = m_t * this
      c_pol = w * g * row[kDseq] / std::max<double>(row[kCount], 1.0);
    }
    coefs[3 * b] = static_cast<T>(c_pol);
    coefs[3 * b + 1] = static_cast<T>(w * kl * g);
    coefs[3 * b + 2] = static_cast<T>(-w_ent * ent * g);
  }
  // gradients in the inputs' dtype: float32 / float64 and bfloat16 written by the kernel, others converted
  auto grad_out = [&](const at::Tensor& like, at::Tensor* t, Out* o) {
    o->bf16 = std::is_same_v<T, float> && like.scalar_type() == at::kBFloat16;
    *t = at::empty(like.sizes(), o->bf16 ? fopt.dtype(at::kBFloat16) : fopt);
    o->p = t->data_ptr();
  };
  at::Tensor g_lp, g_ent = at::empty({0}, fopt);
  Out glp, gent;
  grad_out(logprobs, &g_lp, &glp);
  if (entropy.has_value()) grad_out(*entropy, &g_ent, &gent);
  const GradFn<T> fn = pick<T>(p.loss).second;
  at::parallel_for(0, p.B, grain(p, logprobs.numel()),
                   [&](int64_t b0, int64_t b1) { fn(p.a, s, coefs.data(), glp, gent, b0, b1); });
  if (g_lp.scalar_type() != logprobs.scalar_type()) g_lp = g_lp.to(logprobs.scalar_type());
  if (entropy.has_value() && g_ent.scalar_type() != entropy->scalar_type()) g_ent = g_ent.to(entropy->scalar_type());
  return {g_lp, g_ent};
}

std::tuple<at::Tensor, at::Tensor> policy_loss_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& logprobs, const at::Tensor& old_logprobs,
    const at::Tensor& advantages, const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& ref_logprobs,
    const std::optional<at::Tensor>& entropy, const std::optional<at::Tensor>& is_weights,
    const std::optional<at::Tensor>& select, const std::optional<at::Tensor>& cu_seqlens,
    const std::optional<at::Tensor>& global_tokens, const std::optional<at::Tensor>& global_seqs,
    const at::Tensor& stats, std::string loss, std::string agg, std::string entropy_agg, std::string kl_estimator,
    std::string level, std::vector<double> hyper) {
  Prepared p = prepare(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, is_weights, select, cu_seqlens,
                       loss, kl_estimator, level, hyper);
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == p.B + 1 && stats.size(1) == kNumStats,
              "rlkern.cpp_policy_loss_backward: stats must be [B + 1, ", kNumStats, "] from the forward, got ",
              stats.sizes());
  Norms norms = make_norms(p.a.h, agg, entropy_agg, p.width, global_tokens, global_seqs);
  if (compute_type(logprobs) == at::kDouble) {
    return backward_impl<double>(p, norms, grad_loss, logprobs, entropy, stats);
  }
  return backward_impl<float>(p, norms, grad_loss, logprobs, entropy, stats);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> policy_loss_forward_meta(
    const at::Tensor& logprobs, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>& cu_seqlens, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, std::string, std::string, std::string, std::string, std::string,
    std::vector<double>) {
  const int64_t B = cu_seqlens.has_value() ? cu_seqlens->size(0) - 1 : logprobs.size(0);
  const auto fopt = logprobs.options().dtype(compute_type(logprobs));
  return {at::empty({}, fopt), at::empty({8}, fopt), at::empty({B + 1, kNumStats}, fopt)};
}

std::tuple<at::Tensor, at::Tensor> policy_loss_backward_meta(
    const at::Tensor&, const at::Tensor& logprobs, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>& entropy,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const at::Tensor&, std::string, std::string,
    std::string, std::string, std::string, std::vector<double>) {
  at::Tensor g_ent = entropy.has_value() ? at::empty(logprobs.sizes(), entropy->options())
                                         : at::empty({0}, logprobs.options().dtype(compute_type(logprobs)));
  return {at::empty(logprobs.sizes(), logprobs.options()), g_ent};
}


// ---------------------------------------------------------------------------------------------
// kl_penalty and aggregate: the bodies of rlkern/ops/policy_loss/aggregate.py's custom ops
// (torch.ops.rlkern.cpp_kl_penalty, cpp_kl_penalty_backward, cpp_aggregate,
// cpp_aggregate_backward; GPU twins in kernels/policy_loss.py, oracle
// rlkern/reference/policy_loss.py). Compute type as the policy loss: double for float64 input,
// else float (half inputs converted, bfloat16 read in place).

// An output of `like`'s shape and dtype `dt` as the loops write it: contiguous, bfloat16 in place
// in the float loops, else the compute type.
Out out_buffer(const at::Tensor& like, at::ScalarType dt, at::ScalarType ct, at::Tensor* buf) {
  Out o;
  o.bf16 = ct == at::kFloat && dt == at::kBFloat16;
  *buf = at::empty(like.sizes(), like.options().dtype(o.bf16 ? at::kBFloat16 : ct));
  o.p = buf->data_ptr();
  return o;
}

// The buffer in dtype `dt` and in the layout of at::empty_like(like) (the fake implementations'),
// which differs from the buffer's only for a dense non-contiguous `like` (a transpose).
at::Tensor finish_out(const at::Tensor& like, const at::Tensor& buf, at::ScalarType dt) {
  if (like.is_contiguous()) return buf.scalar_type() == dt ? buf : buf.to(dt);
  return at::empty_like(like, like.options().dtype(dt)).copy_(buf);
}

constexpr int64_t kKlGrain = 16384;  // tokens per parallel task

at::Tensor kl_run(const char* op, const at::Tensor* grad, const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                  const std::string& kl_estimator) {
  TORCH_CHECK(ref_logprobs.sizes() == logprobs.sizes(), op, ": ref_logprobs must have the shape of logprobs ",
              logprobs.sizes(), ", got ", ref_logprobs.sizes());
  const at::ScalarType ct = compute_type(logprobs);
  std::vector<at::Tensor> keep;
  Args a{};
  parse_kl(kl_estimator, &a.kl, &a.kl_st, op);
  a.lp = read_in(logprobs, ct, &keep);
  a.ref = read_in(ref_logprobs, ct, &keep);
  In g;
  if (grad) {
    TORCH_CHECK(grad->sizes() == logprobs.sizes(), op, ": grad must have the shape of logprobs ", logprobs.sizes(),
                ", got ", grad->sizes());
    g = read_in(*grad, ct, &keep);
  }
  // the estimate in the compute type; its gradient in logprobs' dtype
  const at::ScalarType dt = grad ? logprobs.scalar_type() : ct;
  at::Tensor buf;
  const Out o = out_buffer(logprobs, dt, ct, &buf);
  const int64_t n = logprobs.numel();
  if (ct == at::kDouble) {
    const auto fn = pick_agg<double>().kl;
    at::parallel_for(0, n, kKlGrain, [&](int64_t i0, int64_t i1) { fn(a, g, o, i0, i1); });
  } else {
    const auto fn = pick_agg<float>().kl;
    at::parallel_for(0, n, kKlGrain, [&](int64_t i0, int64_t i1) { fn(a, g, o, i0, i1); });
  }
  return finish_out(logprobs, buf, dt);
}

at::Tensor kl_penalty_cpu(const at::Tensor& logprobs, const at::Tensor& ref_logprobs, std::string kl_estimator) {
  return kl_run("rlkern.cpp_kl_penalty", nullptr, logprobs, ref_logprobs, kl_estimator);
}

at::Tensor kl_penalty_backward_cpu(const at::Tensor& grad, const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                                   std::string kl_estimator) {
  return kl_run("rlkern.cpp_kl_penalty_backward", &grad, logprobs, ref_logprobs, kl_estimator);
}

at::Tensor kl_penalty_meta(const at::Tensor& logprobs, const at::Tensor&, std::string) {
  return at::empty_like(logprobs, logprobs.options().dtype(compute_type(logprobs)));
}

at::Tensor kl_penalty_backward_meta(const at::Tensor&, const at::Tensor& logprobs, const at::Tensor&, std::string) {
  return at::empty_like(logprobs);
}

// One aggregate call: values [B, T] with a mask, or packed [total] with cu_seqlens (mask optional).
struct AggCall {
  Args a{};
  std::vector<at::Tensor> keep;
  int64_t B = 0;
  double width = 1;  // seq-mean-token-sum-norm's divisor without loss_scale_factor: T padded, 1 packed
  Agg agg = Agg::kTokenMean;
  double dp = 1, scale = 1;
  std::optional<double> global_tokens, global_seqs;
};

std::optional<double> agg_scalar(const char* op, const std::optional<at::Tensor>& t, const char* name) {
  if (!t.has_value()) return std::nullopt;
  TORCH_CHECK(t->numel() == 1, op, ": ", name, " must be a single number, got shape ", t->sizes());
  return t->item<double>();
}

AggCall agg_prepare(const char* op, const at::Tensor& values, const std::optional<at::Tensor>& mask,
                    const std::optional<at::Tensor>& cu_seqlens, const std::optional<at::Tensor>& global_tokens,
                    const std::optional<at::Tensor>& global_seqs, const std::string& agg, double dp_size,
                    double loss_scale_factor, bool read_values) {
  AggCall c;
  const at::ScalarType ct = compute_type(values);
  const bool packed = cu_seqlens.has_value();
  TORCH_CHECK(packed ? values.dim() == 1 : values.dim() == 2, op,
              ": values must be [B, T] or packed [total] with cu_seqlens, got ", values.sizes());
  TORCH_CHECK(packed || mask.has_value(), op, ": mask is required for padded [B, T] values");
  Args& a = c.a;
  if (read_values) a.lp = read_in(values, ct, &c.keep);
  a.mask_kind = MaskKind::kNone;
  if (mask.has_value()) {
    TORCH_CHECK(mask->sizes() == values.sizes(), op, ": mask must have the shape of values ", values.sizes(),
                ", got ", mask->sizes());
    read_mask(*mask, ct, &a, &c.keep);
  }
  if (packed) {
    c.B = read_cu(*cu_seqlens, values.numel(), &a, &c.keep, op);
  } else {
    c.B = values.size(0);
    a.T = values.size(1);
    c.width = static_cast<double>(a.T);
  }
  c.agg = parse_agg(agg, "agg", op);
  c.dp = dp_size;
  c.scale = std::isnan(loss_scale_factor) ? c.width : loss_scale_factor;
  c.global_tokens = agg_scalar(op, global_tokens, "global_tokens");
  c.global_seqs = agg_scalar(op, global_seqs, "global_seqs");
  return c;
}

// The modes whose weights need the mask's sums (token-sum, and token-mean over a given global_tokens, do not).
bool needs_counts(const AggCall& c) {
  return c.agg != Agg::kTokenSum && !(c.agg == Agg::kTokenMean && c.global_tokens.has_value());
}

// sums [B, 2] (masked value sum, mask sum) per sequence, in double.
template <typename T>
std::vector<double> agg_sums(const AggCall& c, int64_t n) {
  std::vector<double> sums(static_cast<size_t>(2 * c.B), 0.0);
  const auto fn = pick_agg<T>().sums;
  const int64_t per_seq = std::max<int64_t>(1, n / std::max<int64_t>(c.B, 1));
  at::parallel_for(0, c.B, std::max<int64_t>(1, 8192 / per_seq),
                   [&](int64_t b0, int64_t b1) { fn(c.a, sums.data(), b0, b1); });
  return sums;
}

// d loss / d (masked token sum of sequence b), as rlkern/ops/policy_loss/_autograd.py seq_weights.
std::vector<double> agg_weights(const AggCall& c, const std::vector<double>& sums) {
  double tokens = 0, seqs = 0;
  for (int64_t b = 0; b < c.B && !sums.empty(); ++b) {
    tokens += sums[2 * b + 1];
    seqs += sums[2 * b + 1] > 0 ? 1.0 : 0.0;
  }
  if (c.global_tokens) tokens = *c.global_tokens;
  if (c.global_seqs) seqs = *c.global_seqs;
  std::vector<double> w(static_cast<size_t>(c.B));
  for (int64_t b = 0; b < c.B; ++b) {
    w[b] = seq_weight(c.agg, sums.empty() ? 0.0 : sums[2 * b + 1], c.dp, tokens, seqs, c.scale);
  }
  return w;
}

template <typename T>
at::Tensor aggregate_impl(const AggCall& c, const at::Tensor& values) {
  const std::vector<double> sums = agg_sums<T>(c, values.numel());
  const std::vector<double> w = agg_weights(c, sums);
  double total = 0;
  for (int64_t b = 0; b < c.B; ++b) total += w[b] * sums[2 * b];
  at::Tensor out = at::empty({}, values.options().dtype(c10::CppTypeToScalarType<T>::value));
  out.data_ptr<T>()[0] = static_cast<T>(total);
  return out;
}

at::Tensor aggregate_cpu(const at::Tensor& values, const std::optional<at::Tensor>& mask,
                         const std::optional<at::Tensor>& cu_seqlens, const std::optional<at::Tensor>& global_tokens,
                         const std::optional<at::Tensor>& global_seqs, std::string agg, double dp_size,
                         double loss_scale_factor) {
  const AggCall c = agg_prepare("rlkern.cpp_aggregate", values, mask, cu_seqlens, global_tokens, global_seqs, agg,
                                dp_size, loss_scale_factor, true);
  if (compute_type(values) == at::kDouble) return aggregate_impl<double>(c, values);
  return aggregate_impl<float>(c, values);
}

template <typename T>
at::Tensor aggregate_backward_impl(const AggCall& c, const at::Tensor& grad, const at::Tensor& values) {
  const std::vector<double> sums = needs_counts(c) ? agg_sums<T>(c, values.numel()) : std::vector<double>{};
  const std::vector<double> w = agg_weights(c, sums);
  const double g = grad.item<double>();
  std::vector<T> coefs(static_cast<size_t>(c.B));
  for (int64_t b = 0; b < c.B; ++b) coefs[b] = static_cast<T>(w[b] * g);
  constexpr at::ScalarType ct = c10::CppTypeToScalarType<T>::value;
  at::Tensor buf;
  const Out o = out_buffer(values, values.scalar_type(), ct, &buf);
  const auto fn = pick_agg<T>().grad;
  const int64_t per_seq = std::max<int64_t>(1, values.numel() / std::max<int64_t>(c.B, 1));
  at::parallel_for(0, c.B, std::max<int64_t>(1, 8192 / per_seq),
                   [&](int64_t b0, int64_t b1) { fn(c.a, coefs.data(), o, b0, b1); });
  return finish_out(values, buf, values.scalar_type());
}

at::Tensor aggregate_backward_cpu(const at::Tensor& grad, const at::Tensor& values,
                                  const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& cu_seqlens,
                                  const std::optional<at::Tensor>& global_tokens,
                                  const std::optional<at::Tensor>& global_seqs, std::string agg, double dp_size,
                                  double loss_scale_factor) {
  const char* op = "rlkern.cpp_aggregate_backward";
  TORCH_CHECK(grad.numel() == 1, op, ": grad must be a single number, got shape ", grad.sizes());
  const AggCall c = agg_prepare(op, values, mask, cu_seqlens, global_tokens, global_seqs, agg, dp_size,
                                loss_scale_factor, false);
  if (compute_type(values) == at::kDouble) return aggregate_backward_impl<double>(c, grad, values);
  return aggregate_backward_impl<float>(c, grad, values);
}

at::Tensor aggregate_meta(const at::Tensor& values, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                          const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, std::string, double,
                          double) {
  return at::empty({}, values.options().dtype(compute_type(values)));
}

at::Tensor aggregate_backward_meta(const at::Tensor&, const at::Tensor& values, const std::optional<at::Tensor>&,
                                   const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                   const std::optional<at::Tensor>&, std::string, double, double) {
  return at::empty_like(values);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rlkern, m) {
  m.def("cpp_policy_loss_schema() -> str", &policy_loss_schema);
  m.def(
      "cpp_policy_loss(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor? mask, "
      "Tensor? ref_logprobs, Tensor? entropy, Tensor? is_weights, Tensor? select, Tensor? cu_seqlens, "
      "Tensor? global_tokens, Tensor? global_seqs, str loss, str agg, str entropy_agg, str kl_estimator, "
      "str level, float[] hyper) -> (Tensor, Tensor, Tensor)");
  m.def(
      "cpp_policy_loss_backward(Tensor grad_loss, Tensor logprobs, Tensor old_logprobs, Tensor advantages, "
      "Tensor? mask, Tensor? ref_logprobs, Tensor? entropy, Tensor? is_weights, Tensor? select, "
      "Tensor? cu_seqlens, Tensor? global_tokens, Tensor? global_seqs, Tensor stats, str loss, str agg, "
      "str entropy_agg, str kl_estimator, str level, float[] hyper) -> (Tensor, Tensor)");
  m.def("cpp_kl_penalty(Tensor logprobs, Tensor ref_logprobs, str kl_estimator) -> Tensor");
  m.def("cpp_kl_penalty_backward(Tensor grad, Tensor logprobs, Tensor ref_logprobs, str kl_estimator) -> Tensor");
  m.def(
      "cpp_aggregate(Tensor values, Tensor? mask, Tensor? cu_seqlens, Tensor? global_tokens, Tensor? global_seqs, "
      "str agg, float dp_size, float loss_scale_factor) -> Tensor");
  m.def(
      "cpp_aggregate_backward(Tensor grad, Tensor values, Tensor? mask, Tensor? cu_seqlens, Tensor? global_tokens, "
      "Tensor? global_seqs, str agg, float dp_size, float loss_scale_factor) -> Tensor");
}

TORCH_LIBRARY_IMPL(rlkern, CPU, m) {
  m.impl("cpp_policy_loss", &policy_loss_forward_cpu);
  m.impl("cpp_policy_loss_backward", &policy_loss_backward_cpu);
  m.impl("cpp_kl_penalty", &kl_penalty_cpu);
  m.impl("cpp_kl_penalty_backward", &kl_penalty_backward_cpu);
  m.impl("cpp_aggregate", &aggregate_cpu);
  m.impl("cpp_aggregate_backward", &aggregate_backward_cpu);
}

TORCH_LIBRARY_IMPL(rlkern, Meta, m) {
  m.impl("cpp_policy_loss", &policy_loss_forward_meta);
  m.impl("cpp_policy_loss_backward", &policy_loss_backward_meta);
  m.impl("cpp_kl_penalty", &kl_penalty_meta);
  m.impl("cpp_kl_penalty_backward", &kl_penalty_backward_meta);
  m.impl("cpp_aggregate", &aggregate_meta);
  m.impl("cpp_aggregate_backward", &aggregate_backward_meta);
}
