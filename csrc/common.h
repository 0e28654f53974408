// What the C++ kernels share: the x86 SIMD target macros, the run-time SIMD check, the mask
// dtype dispatch and the token-shaped output allocation (docs/architecture.md, Adding an op
// family: a second use of a helper moves it here).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <optional>

#if defined(__linux__)
#include <sys/mman.h>
#endif

// x86 with GCC or Clang: hand-written AVX2 paths, compiled for that target only and chosen at run
// time (rlkern_simd_ok); everything else runs the portable scalar loops.
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define RLK_X86_SIMD 1
#include <immintrin.h>
#define RLK_TGT __attribute__((target("avx2,fma,f16c")))
#define RLK_INL __attribute__((target("avx2,fma,f16c"), always_inline)) inline
#else
#define RLK_X86_SIMD 0
#endif

// GCC >= 12 on x86-64 Linux: loops the compiler vectorizes itself, cloned for x86-64-v3 (AVX2)
// and the baseline, picked by the loader.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && defined(__linux__)
#define RLKERN_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define RLKERN_VECTOR_CLONES
#endif

namespace rlkern {

// Whether the AVX2 paths run: the CPU has AVX2, FMA and F16C, and RLKERN_NO_SIMD=1 is not set
// (the tests use it to run the baseline loops).
inline bool simd_ok() {
#if RLK_X86_SIMD
  static const bool ok = [] {
    const char* env = std::getenv("RLKERN_NO_SIMD");
    if (env && env[0] == '1') return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return ok;
#else
  return false;
#endif
}

#if RLK_X86_SIMD
// e^x in float64, 4 lanes, for -708 <= x <= 708: n = round(x / ln 2) by the
// 1.5 * 2^52 shifter (whose low bits then hold n + 1023, the exponent field of 2^n), r = x - n ln 2
// (Cody-Waite, ln 2 in two parts: r is exact to ~1 ulp for every n), e^r by a degree-11 minimax
// polynomial on |r| <= ln2/2 (relative error 3e-18; fit by Remez on the relative error), times 2^n.
// Measured against a long double exp: under 0.7 ulp (the Taylor series to r^12 it replaces: 1.6).
// NaN in, NaN out (callers rely on it: a NaN logit reaches T).
RLK_INL __m256d v_exp_pd_in_range(__m256d x) {
  const __m256d shifter = _mm256_set1_pd(6755399441055744.0 + 1023.0);  // 1.5 * 2^52 + bias
  const __m256d nf = _mm256_fmadd_pd(x, _mm256_set1_pd(1.4426950408889634), shifter);
  const __m256d n = _mm256_sub_pd(nf, shifter);
  __m256d r = _mm256_fnmadd_pd(n, _mm256_set1_pd(6.93147180369123816490e-01), x);
  r = _mm256_fnmadd_pd(n, _mm256_set1_pd(1.90821492927058770002e-10), r);
  static constexpr double kC[12] = {1.0,
                                    1.0,
                                    0.5000000000000018,
                                    0.1666666666666617,
                                    0.04166666666649277,
                                    0.00833333333355927,
                                    0.0013888888951223987,
                                    0.00019841269432679237,
                                    2.4801486521427463e-05,
                                    2.7557622530872255e-06,
                                    2.7632293279459877e-07,
                                    2.4994304884817207e-08};
  __m256d p = _mm256_set1_pd(kC[11]);
  for (int k = 10; k >= 0; --k) p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(kC[k]));
  const __m256i bits = _mm256_slli_epi64(_mm256_castpd_si256(nf), 52);  // n + 1023 in [1, 2045]
  return _mm256_mul_pd(p, _mm256_castsi256_pd(bits));
}
#endif

// f(M{}) with M the C++ type of a mask dtype: bool, every integer, every float dtype.
template <typename F>
void dispatch_mask(at::ScalarType mask_type, const char* op, F&& f) {
  switch (mask_type) {
    case at::kBool: return f(bool{});
    case at::kByte: return f(uint8_t{});
    case at::kChar: return f(int8_t{});
    case at::kShort: return f(int16_t{});
    case at::kInt: return f(int32_t{});
    case at::kLong: return f(int64_t{});
    case at::kHalf: return f(at::Half{});
    case at::kBFloat16: return f(at::BFloat16{});
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    default: TORCH_CHECK(false, op, ": mask must be bool, an integer or a float dtype, got ", mask_type);
  }
}

// Token-shaped outputs are written once, in full, right after allocation: for large ones the
// first-touch page faults cost more than the kernel's own memory traffic (a 32 MiB fill on a
// 2-core CPU: ~8 ms of 4 KiB faults, ~2 ms as 2 MiB pages). The 2 MiB-aligned interior of a
// buffer >= 8 MiB is advised as transparent huge pages (a hint: without THP it is a no-op).
inline at::Tensor empty_output(at::IntArrayRef shape, const at::TensorOptions& opts) {
  at::Tensor out = at::empty(shape, opts);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t huge = uintptr_t{2} << 20;
  const uintptr_t bytes = out.nbytes();
  if (bytes >= 4 * huge) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t begin = (p + huge - 1) & ~(huge - 1), end = (p + bytes) & ~(huge - 1);
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#endif
  return out;
}

// softplus(x) = log(1 + e^x) = -logsigmoid(-x) without overflow at any |x|, and the logistic
// sigmoid from one exp of -|x|: the preference losses' building blocks (csrc/preference.cpp,
// csrc/preference_groups.cpp).
template <typename T>
inline T softplus(T x) {
  return std::max(x, T(0)) + std::log1p(std::exp(-std::abs(x)));
}

template <typename T>
inline T sigmoid(T x) {
  if (x >= 0) return T(1) / (T(1) + std::exp(-x));
  const T e = std::exp(x);
  return e / (T(1) + e);
}

// The row layout of token tensors: padded [R, T], or packed [total] with int32 cu_seqlens [R + 1].
// Row r spans len(r) tokens from start(r) of the flat index space (r * T when padded), or from
// off(r, row_stride) for a padded tensor with its own row stride.
struct TokenRows {
  int64_t rows = 0, T = 0;
  const int32_t* cu = nullptr;
  int64_t start(int64_t r) const { return cu ? int64_t(cu[r]) : r * T; }
  int64_t len(int64_t r) const { return cu ? int64_t(cu[r + 1]) - cu[r] : T; }
  int64_t off(int64_t r, int64_t row_stride) const { return cu ? int64_t(cu[r]) : r * row_stride; }
};

// Checks x against the layout (cu_seqlens from 0 to x.numel(), non-decreasing); holder keeps the
// contiguous cu_seqlens alive while the returned rows point into it.
inline TokenRows make_token_rows(const at::Tensor& x, const std::optional<at::Tensor>& cu, at::Tensor& holder,
                                 const char* op) {
  TokenRows l;
  if (cu.has_value()) {
    TORCH_CHECK(x.dim() == 1, op, ": packed input must be [total]");
    TORCH_CHECK(cu->dim() == 1 && cu->size(0) >= 1 && cu->scalar_type() == at::kInt, op,
                ": cu_seqlens must be int32 [R + 1]");
    holder = cu->contiguous();
    l.cu = holder.data_ptr<int32_t>();
    l.rows = holder.size(0) - 1;
    TORCH_CHECK(l.cu[0] == 0 && l.cu[l.rows] == x.numel(), op, ": cu_seqlens must run from 0 to ", x.numel());
    for (int64_t r = 0; r < l.rows; ++r) TORCH_CHECK(l.cu[r + 1] >= l.cu[r], op, ": cu_seqlens must be non-decreasing");
  } else {
    TORCH_CHECK(x.dim() == 2, op, ": padded input must be [R, T]");
    l.rows = x.size(0);
    l.T = x.size(1);
  }
  return l;
}

}  // namespace rlkern
