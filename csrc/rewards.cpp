// rlkern CPU kernels of the reward family (the ops, their formulas and the papers:
// rlkern/ops/rewards.py; oracle: rlkern/reference/rewards.py).
//
// cpp_sample_rewards: one value per sample from two per-sample inputs, element-wise (DAPO's soft
// overlong punishment of a score by its length; GiGPO's episode + omega * step advantage).
// cpp_kl_rewards: one task per row of [B, T] (or of packed [total] with cu_seqlens): finds the
// row's last response token, writes -kl_coef * KL on the response tokens (verl's kl_penalty
// estimators, computed in double) and adds the row's score on that last token. Inputs arrive contiguous in the compute type (double for
// float64 input, float otherwise; the op converts), the mask as bool. cpp_action_rewards: UI-R1's
// rule-based reward of parsed GUI actions, element-wise.
#include "common.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdint>

namespace {

// the order of rlkern.reference.rewards.SAMPLE_METHODS / KL_ESTIMATORS
enum Sample : int64_t { kOverlong = 0, kGigpo = 1 };
enum Estimator : int64_t { kK1 = 0, kAbs = 1, kK2 = 2, kK3 = 3 };

template <typename S>
void sample_impl(const S* a, const S* b, S* out, int64_t N, int64_t method, double p0, double p1, double p2) {
  at::parallel_for(0, N, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      double v;
      if (method == kOverlong) {
        // p0 = max_length, p1 = cache_length, p2 = penalty factor
        const double excess = static_cast<double>(b[i]) - (p0 - p1);
        v = static_cast<double>(a[i]) + p2 * std::max(std::min(-excess / p1, 0.0), -1.0);
      } else {
        v = static_cast<double>(a[i]) + p0 * static_cast<double>(b[i]);
      }
      out[i] = static_cast<S>(v);
    }
  });
}

at::Tensor sample_cpu(const at::Tensor& a, const at::Tensor& b, int64_t method, double p0, double p1, double p2) {
  TORCH_CHECK(a.dim() == 1 && a.is_contiguous() && b.sizes() == a.sizes() && b.is_contiguous() &&
                  b.scalar_type() == a.scalar_type(),
              "cpp_sample_rewards: a and b must be contiguous [N] of one dtype");
  TORCH_CHECK(method == kOverlong || method == kGigpo, "cpp_sample_rewards: unknown method ", method);
  at::Tensor out = at::empty_like(a);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "cpp_sample_rewards", [&] {
    sample_impl<scalar_t>(a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), a.numel(), method,
                          p0, p1, p2);
  });
  return out;
}

template <int64_t E>
inline double kl_value(double lp, double ref) {
  const double d = lp - ref;
  if constexpr (E == kK1) {
    return d;
  } else if constexpr (E == kAbs) {
    return std::abs(d);
  } else if constexpr (E == kK2) {
    return 0.5 * d * d;
  } else {
    // verl's low_var_kl: the log-ratio clamped to [-20, 20] before exp, the value to [-10, 10]
    const double k = std::min(std::max(-d, -20.0), 20.0);
    return std::min(std::max(std::exp(k) - k - 1.0, -10.0), 10.0);
  }
}

// One row: the estimator and the clamp are template parameters so the token loop is branch-free
// (a select on the mask) and the compiler vectorizes it; the row's score is added afterwards.
#if RLK_X86_SIMD
// low_var_kl (k3) in AVX2, 4 tokens at a time in double: the compiler does not vectorize the scalar
// loop (std::exp), which made it 8x slower than torch's SLEEF exp. Clamps as max(lo, x) / min(hi, x)
// return x when it is NaN (as std::max / std::min in kl_value do). Returns the tokens done.
template <typename S>
RLK_INL __m256d load4(const S* p) {
  if constexpr (std::is_same_v<S, double>) return _mm256_loadu_pd(p);
  else return _mm256_cvtps_pd(_mm_loadu_ps(p));
}

template <typename S>
RLK_INL void store4(S* p, __m256d v) {
  if constexpr (std::is_same_v<S, double>) _mm256_storeu_pd(p, v);
  else _mm_storeu_ps(p, _mm256_cvtpd_ps(v));
}

RLK_INL __m256d clamp4(__m256d x, double lo, double hi) {
  return _mm256_min_pd(_mm256_set1_pd(hi), _mm256_max_pd(_mm256_set1_pd(lo), x));
}

template <typename S, bool CLIP>
RLK_TGT int64_t k3_row_avx2(const S* lp, const S* ref, const bool* mask, S* out, int64_t T, double coef,
                            double kl_clip) {
  const __m256d neg_coef = _mm256_set1_pd(-coef), one = _mm256_set1_pd(1.0);
  int64_t t = 0;
  for (; t + 4 <= T; t += 4) {
    const __m256d k = clamp4(_mm256_sub_pd(load4(ref + t), load4(lp + t)), -20.0, 20.0);  // -(lp - ref)
    __m256d kl = clamp4(_mm256_sub_pd(_mm256_sub_pd(rlkern::v_exp_pd_in_range(k), k), one), -10.0, 10.0);
    if constexpr (CLIP) kl = clamp4(kl, -kl_clip, kl_clip);
    int32_t m4;
    std::memcpy(&m4, mask + t, 4);
    const __m256i m = _mm256_cmpgt_epi64(_mm256_cvtepu8_epi64(_mm_cvtsi32_si128(m4)), _mm256_setzero_si256());
    store4(out + t, _mm256_blendv_pd(_mm256_setzero_pd(), _mm256_mul_pd(neg_coef, kl), _mm256_castsi256_pd(m)));
  }
  return t;
}
#endif

template <typename S, int64_t E, bool CLIP>
RLKERN_VECTOR_CLONES void kl_row(const S* lp, const S* ref, const bool* mask, S* out, int64_t T, double coef,
                                 double kl_clip) {
  int64_t done = 0;
#if RLK_X86_SIMD
  if constexpr (E != kK1 && E != kAbs && E != kK2) {
    if (rlkern::simd_ok()) done = k3_row_avx2<S, CLIP>(lp, ref, mask, out, T, coef, kl_clip);
  }
#endif
  for (int64_t t = done; t < T; ++t) {
    double kl = kl_value<E>(static_cast<double>(lp[t]), static_cast<double>(ref[t]));
    if constexpr (CLIP) kl = std::min(std::max(kl, -kl_clip), kl_clip);
    out[t] = mask[t] ? static_cast<S>(-coef * kl) : static_cast<S>(0);
  }
}

template <typename S, int64_t E, bool CLIP>
void kl_rows(const S* score, const S* lp, const S* ref, const bool* mask, S* out, int64_t B, rlkern::TokenRows rows,
             double coef, double kl_clip, double low, double high) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(rows.cu ? 1024 : rows.T, 1));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t row = rows.start(b), T = rows.len(b);
      kl_row<S, E, CLIP>(lp + row, ref + row, mask + row, out + row, T, coef, kl_clip);
      int64_t last = T - 1;
      while (last >= 0 && !mask[row + last]) --last;
      if (last < 0) continue;
      // the last token again in double: -coef * KL + the clamped score, rounded once (a NaN score stays NaN)
      double kl = kl_value<E>(static_cast<double>(lp[row + last]), static_cast<double>(ref[row + last]));
      if constexpr (CLIP) kl = std::min(std::max(kl, -kl_clip), kl_clip);
      out[row + last] = static_cast<S>(-coef * kl + std::min(std::max(static_cast<double>(score[b]), low), high));
    }
  });
}

template <typename S, int64_t E>
void kl_dispatch_clip(const S* score, const S* lp, const S* ref, const bool* mask, S* out, int64_t B,
                      rlkern::TokenRows rows, double coef, double kl_clip, double low, double high) {
  if (kl_clip >= 0.0)
    kl_rows<S, E, true>(score, lp, ref, mask, out, B, rows, coef, kl_clip, low, high);
  else
    kl_rows<S, E, false>(score, lp, ref, mask, out, B, rows, coef, kl_clip, low, high);
}

at::Tensor kl_cpu(const at::Tensor& scores, const at::Tensor& logprobs, const at::Tensor& ref, const at::Tensor& mask,
                  const std::optional<at::Tensor>& cu_seqlens, int64_t estimator, double coef, double kl_clip,
                  double low, double high) {
  TORCH_CHECK(logprobs.is_contiguous() && ref.sizes() == logprobs.sizes() && ref.is_contiguous() &&
                  ref.scalar_type() == logprobs.scalar_type(),
              "cpp_kl_rewards: logprobs and ref_logprobs must be contiguous, one shape and dtype");
  at::Tensor holder;
  const rlkern::TokenRows rows = rlkern::make_token_rows(logprobs, cu_seqlens, holder, "cpp_kl_rewards");
  const int64_t B = rows.rows;
  TORCH_CHECK(scores.dim() == 1 && scores.numel() == B && scores.is_contiguous() &&
                  scores.scalar_type() == logprobs.scalar_type(),
              "cpp_kl_rewards: scores must be contiguous [B] of logprobs' dtype");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous() && mask.sizes() == logprobs.sizes(),
              "cpp_kl_rewards: mask must be contiguous bool of logprobs' shape");
  TORCH_CHECK(estimator >= kK1 && estimator <= kK3, "cpp_kl_rewards: unknown estimator ", estimator);
  at::Tensor out = at::empty_like(logprobs);
  AT_DISPATCH_FLOATING_TYPES(logprobs.scalar_type(), "cpp_kl_rewards", [&] {
    const scalar_t* s = scores.data_ptr<scalar_t>();
    const scalar_t* lp = logprobs.data_ptr<scalar_t>();
    const scalar_t* rf = ref.data_ptr<scalar_t>();
    const bool* m = mask.data_ptr<bool>();
    scalar_t* o = out.data_ptr<scalar_t>();
    switch (estimator) {
      case kK1: kl_dispatch_clip<scalar_t, kK1>(s, lp, rf, m, o, B, rows, coef, kl_clip, low, high); break;
      case kAbs: kl_dispatch_clip<scalar_t, kAbs>(s, lp, rf, m, o, B, rows, coef, kl_clip, low, high); break;
      case kK2: kl_dispatch_clip<scalar_t, kK2>(s, lp, rf, m, o, B, rows, coef, kl_clip, low, high); break;
      default: kl_dispatch_clip<scalar_t, kK3>(s, lp, rf, m, o, B, rows, coef, kl_clip, low, high); break;
    }
  });
  return out;
}

// UI-R1's rule-based reward, per sample: [types match] + [point inside the box] + format.
template <typename S>
void action_impl(const int64_t* pt, const int64_t* tt, const S* xy, const S* box, const S* fmt, S* out, int64_t N) {
  at::parallel_for(0, N, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const double x = xy[2 * i], y = xy[2 * i + 1];
      const double x1 = box[4 * i], y1 = box[4 * i + 1], x2 = box[4 * i + 2], y2 = box[4 * i + 3];
      // a NaN anywhere fails the comparisons: no coordinate reward
      const bool inside = x >= x1 && x <= x2 && y >= y1 && y <= y2;
      out[i] = static_cast<S>((pt[i] == tt[i] ? 1.0 : 0.0) + (inside ? 1.0 : 0.0) + static_cast<double>(fmt[i]));
    }
  });
}

at::Tensor action_cpu(const at::Tensor& pred_types, const at::Tensor& true_types, const at::Tensor& points,
                      const at::Tensor& boxes, const at::Tensor& fmt) {
  const int64_t N = pred_types.numel();
  TORCH_CHECK(pred_types.scalar_type() == at::kLong && true_types.scalar_type() == at::kLong &&
                  pred_types.is_contiguous() && true_types.is_contiguous() && true_types.numel() == N,
              "cpp_action_rewards: types must be contiguous int64 [N]");
  TORCH_CHECK(points.is_contiguous() && points.numel() == 2 * N && boxes.is_contiguous() && boxes.numel() == 4 * N &&
                  fmt.is_contiguous() && fmt.numel() == N && boxes.scalar_type() == points.scalar_type() &&
                  fmt.scalar_type() == points.scalar_type(),
              "cpp_action_rewards: points [N, 2], boxes [N, 4], format [N] contiguous of one dtype");
  at::Tensor out = at::empty({N}, points.options());
  AT_DISPATCH_FLOATING_TYPES(points.scalar_type(), "cpp_action_rewards", [&] {
    action_impl<scalar_t>(pred_types.data_ptr<int64_t>(), true_types.data_ptr<int64_t>(), points.data_ptr<scalar_t>(),
                          boxes.data_ptr<scalar_t>(), fmt.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), N);
  });
  return out;
}

at::Tensor action_meta(const at::Tensor& pred_types, const at::Tensor&, const at::Tensor& points, const at::Tensor&,
                       const at::Tensor&) {
  return at::empty({pred_types.numel()}, points.options());
}

at::Tensor sample_meta(const at::Tensor& a, const at::Tensor&, int64_t, double, double, double) {
  return at::empty_like(a);
}

at::Tensor kl_meta(const at::Tensor&, const at::Tensor& logprobs, const at::Tensor&, const at::Tensor&,
                   const std::optional<at::Tensor>&, int64_t, double, double, double, double) {
  return at::empty_like(logprobs);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rlkern, m) {
  m.def("cpp_sample_rewards(Tensor a, Tensor b, int method, float p0, float p1, float p2) -> Tensor");
  m.def("cpp_kl_rewards(Tensor scores, Tensor logprobs, Tensor ref_logprobs, Tensor mask, Tensor? cu_seqlens, "
        "int estimator, "
        "float kl_coef, float kl_clip, float low, float high) -> Tensor");
  m.def("cpp_action_rewards(Tensor pred_types, Tensor true_types, Tensor points, Tensor boxes, Tensor format) -> Tensor");
}

TORCH_LIBRARY_IMPL(rlkern, CPU, m) {
  m.impl("cpp_sample_rewards", &sample_cpu);
  m.impl("cpp_kl_rewards", &kl_cpu);
  m.impl("cpp_action_rewards", &action_cpu);
}

TORCH_LIBRARY_IMPL(rlkern, Meta, m) {
  m.impl("cpp_sample_rewards", &sample_meta);
  m.impl("cpp_kl_rewards", &kl_meta);
  m.impl("cpp_action_rewards", &action_meta);
}
