// rlkern CPU kernels of the token-level preference ops (the ops and their semantics:
// rlkern/ops/preference_tokens.py; oracle: rlkern/reference/preference_tokens.py).
//
// cpp_preference_token_sums: one task per pair (rows i and i + B of the concatenated batch: chosen
// rows first, then rejected) reduces the token log-probs to what the sequence-level loss reads:
// the weighted sums of the policy's and the token-level reference's log-probs, the plain masked
// sums (sft), the token counts and WPO's pair weight. A token's weight is mask * LD-DPO's factor
// (tokens past the pair's shared length scaled by ld_alpha) * TGDPO's factor (1 +- alpha * r_t).
// With LD-DPO a first pass counts both rows (the shared length is the smaller count).
// cpp_preference_token_sums_backward spreads the sequences' gradients over their tokens with the
// same weights. cpp_dpo_token_rewards: RTO's per-token PPO reward, one task per row.
//
// Layout: padded [R, T] (row strides given, last dim contiguous) or packed [total] with
// cu_seqlens int32 [R + 1]. Masks arrive as bool (the op converts others). The auxiliary token
// tensors (reference log-probs, WPO adjustment, token rewards, old log-probs) have the log-probs'
// dtype or the compute type (the op converts others). Compute type: double for float64 input,
// float otherwise; the per-row sums run in double.
#include "common.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>

namespace {

template <typename S>
using Acc = std::conditional_t<std::is_same_v<S, double>, double, float>;

constexpr int64_t kGrain = 1;

// The layout of the token tensors (csrc/common.h): token j of row r sits at off(r, stride) + j.
using Layout = rlkern::TokenRows;

// A token tensor read at row r: base pointer and row stride (0 / unused when packed).
template <typename T>
struct Tok {
  const T* p = nullptr;
  int64_t stride = 0;
  const T* row(const Layout& l, int64_t r) const { return p ? p + l.off(r, stride) : nullptr; }
};

template <typename T>
Tok<T> tok(const std::optional<at::Tensor>& t) {
  Tok<T> out;
  if (t.has_value()) {
    TORCH_CHECK(t->dim() == 1 || t->stride(-1) == 1 || t->size(-1) <= 1, "rlkern: token tensors need stride(-1) 1");
    out.p = t->data_ptr<T>();
    out.stride = t->dim() == 2 ? t->stride(0) : 0;
  }
  return out;
}

const bool* mask_row(const std::optional<at::Tensor>& m, const Layout& l, int64_t r) {
  if (!m.has_value()) return nullptr;
  const int64_t stride = m->dim() == 2 ? m->stride(0) : 0;
  return m->data_ptr<bool>() + l.off(r, stride);
}

// The token weight factors of one row: LD-DPO past the shared length, TGDPO's 1 + sign * alpha * r.
struct Weights {
  bool ld;
  double ld_alpha, shared, tg_alpha_signed;
};

// Masked sums of a row in kLanes independent accumulators of the compute type (a select, never
// x * 0: a masked NaN stays out), so the loop needs no reassociation to vectorize (cloned for
// AVX2 where GCC can); the lanes are added in double at the end.
constexpr int kLanes = 16;

// v ? x : 0 as an AND of x's bits with an all-ones / all-zeros word: integer lanes every SIMD
// level has (a blend on a bool loaded from memory kept the loop scalar), and a masked NaN or inf
// still becomes +0.
template <typename A>
inline A keep_if(A x, bool v) {
  using Bits = std::conditional_t<sizeof(A) == 8, uint64_t, uint32_t>;
  Bits b;
  std::memcpy(&b, &x, sizeof(A));
  b &= Bits(0) - Bits(v);
  std::memcpy(&x, &b, sizeof(A));
  return x;
}

template <typename T, typename U, bool HAS_MASK, bool HAS_REF, bool HAS_ADJ>
RLKERN_VECTOR_CLONES void plain_sums_impl(const T* x, const U* ref, const U* adj, const bool* m, int64_t len,
                                          double* out) {
  // double lanes whatever the compute type: a row's sum runs over thousands of tokens, and the
  // rewards metrics are differences of two such sums (tests/test_fuzz.py bounds them by PyTorch's
  // own fp32 error); each input converts to double exactly.
  using A = double;
  A ls[kLanes] = {}, lr[kLanes] = {}, la[kLanes] = {}, lc[kLanes] = {};
  const int64_t full = len - len % kLanes;
  for (int64_t j = 0; j < full; j += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const bool v = HAS_MASK ? m[j + k] : true;
      const A xv = keep_if(static_cast<A>(x[j + k]), v);
      ls[k] += xv;
      lc[k] += A(v);
      if (HAS_REF) lr[k] += keep_if(static_cast<A>(ref[j + k]), v);
      if (HAS_ADJ) la[k] += keep_if(xv - static_cast<A>(adj[j + k]), v);
    }
  }
  for (int64_t j = full; j < len; ++j) {
    const bool v = HAS_MASK ? m[j] : true;
    const A xv = v ? static_cast<A>(x[j]) : A(0);
    ls[0] += xv;
    lc[0] += v ? A(1) : A(0);
    if (HAS_REF) lr[0] += v ? static_cast<A>(ref[j]) : A(0);
    if (HAS_ADJ) la[0] += v ? xv - static_cast<A>(adj[j]) : A(0);
  }
  for (int k = 0; k < kLanes; ++k) {
    out[0] += ls[k];
    out[1] += lr[k];
    out[2] += la[k];
    out[3] += lc[k];
  }
}

#if RLK_X86_SIMD
// AVX2: eight tokens a step, the mask as an AND with all-ones / all-zeros lanes (a masked NaN never
// reaches a sum), float lanes added in double at the end (the float compute type only).
RLK_INL __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
RLK_INL __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
RLK_INL __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
RLK_INL __m256 mask8(const bool* m) {
  const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(m)));
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(w, _mm256_setzero_si256()));
}
RLK_INL double hsum8(__m256 v) {
  alignas(32) float f[8];
  _mm256_store_ps(f, v);
  double t = 0;
  for (float x : f) t += x;
  return t;
}

// Eight float tokens a step, added into double lanes (two __m256d per sum): the float products are
// exact in double, so a row's sum has the rounding of a double sum, not of eight float lanes.
RLK_INL void add8(__m256d& lo, __m256d& hi, __m256 v) {
  lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
  hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
}
RLK_INL double hsum4x2(__m256d lo, __m256d hi) {
  alignas(32) double d[4];
  _mm256_store_pd(d, _mm256_add_pd(lo, hi));
  return (d[0] + d[1]) + (d[2] + d[3]);
}

template <typename T, typename U>
RLK_TGT void plain_sums_avx2(const T* x, const U* ref, const U* adj, const bool* m, int64_t len, double* out) {
  __m256d s0 = _mm256_setzero_pd(), s1 = s0, r0 = s0, r1 = s0, a0 = s0, a1 = s0;
  __m256 c = _mm256_setzero_ps();
  const __m256 ones = _mm256_set1_ps(1.0f);
  const __m256 all = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  const int64_t full = len - len % 8;
  for (int64_t j = 0; j < full; j += 8) {
    const __m256 mk = m ? mask8(m + j) : all;
    const __m256 xv = load8(x + j);
    add8(s0, s1, _mm256_and_ps(xv, mk));
    c = _mm256_add_ps(c, _mm256_and_ps(ones, mk));  // counts: exact in float up to 2^24 per lane
    if (ref) add8(r0, r1, _mm256_and_ps(load8(ref + j), mk));
    if (adj) add8(a0, a1, _mm256_and_ps(_mm256_sub_ps(xv, load8(adj + j)), mk));
  }
  out[0] += hsum4x2(s0, s1);
  out[1] += hsum4x2(r0, r1);
  out[2] += hsum4x2(a0, a1);
  out[3] += hsum8(c);
  for (int64_t j = full; j < len; ++j) {
    if (m && !m[j]) continue;
    const double xv = double(static_cast<float>(x[j]));
    out[0] += xv;
    if (ref) out[1] += double(static_cast<float>(ref[j]));
    if (adj) out[2] += xv - double(static_cast<float>(adj[j]));
    out[3] += 1.0;
  }
}
#endif

template <typename T, typename U>
void plain_sums(const T* x, const U* ref, const U* adj, const bool* m, int64_t len, double& s, double& sref,
                double& saln, double& count) {
  double out[4] = {0, 0, 0, 0};
#if RLK_X86_SIMD
  if constexpr (std::is_same_v<Acc<T>, float>) {
    if (rlkern::simd_ok()) {
      plain_sums_avx2(x, ref, adj, m, len, out);
      s = out[0];
      sref = out[1];
      saln = out[2];
      count = out[3];
      return;
    }
  }
#endif
  const int code = (m ? 4 : 0) | (ref ? 2 : 0) | (adj ? 1 : 0);
  switch (code) {
    case 0: plain_sums_impl<T, U, false, false, false>(x, ref, adj, m, len, out); break;
    case 1: plain_sums_impl<T, U, false, false, true>(x, ref, adj, m, len, out); break;
    case 2: plain_sums_impl<T, U, false, true, false>(x, ref, adj, m, len, out); break;
    case 3: plain_sums_impl<T, U, false, true, true>(x, ref, adj, m, len, out); break;
    case 4: plain_sums_impl<T, U, true, false, false>(x, ref, adj, m, len, out); break;
    case 5: plain_sums_impl<T, U, true, false, true>(x, ref, adj, m, len, out); break;
    case 6: plain_sums_impl<T, U, true, true, false>(x, ref, adj, m, len, out); break;
    default: plain_sums_impl<T, U, true, true, true>(x, ref, adj, m, len, out); break;
  }
  s = out[0];
  sref = out[1];
  saln = out[2];
  count = out[3];
}

template <typename T, typename U>
void sums_kernel(const at::Tensor& lp, const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& ref,
                 const std::optional<at::Tensor>& adj, const std::optional<at::Tensor>& rewards, const Layout& l,
                 bool ld, double ld_alpha, double tg_alpha, at::Tensor& sums, at::Tensor& raw, at::Tensor& ref_sums,
                 at::Tensor& lengths, at::Tensor& wpo) {
  using A = Acc<T>;
  const Tok<T> x = tok<T>(lp);
  const Tok<U> rf = tok<U>(ref), ad = tok<U>(adj), rw = tok<U>(rewards);
  A* o_sum = sums.data_ptr<A>();
  A* o_raw = raw.data_ptr<A>();
  A* o_ref = ref_sums.data_ptr<A>();
  A* o_len = lengths.data_ptr<A>();
  A* o_wpo = wpo.data_ptr<A>();
  const int64_t B = l.rows / 2;
  at::parallel_for(0, B, kGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      double shared = 0;
      if (ld) {
        double n[2] = {0, 0};
        for (int side = 0; side < 2; ++side) {
          const int64_t r = i + side * B;
          const bool* m = mask_row(mask, l, r);
          const int64_t len = l.len(r);
          if (!m) {
            n[side] = double(len);
            continue;
          }
          int64_t c = 0;
          for (int64_t j = 0; j < len; ++j) c += m[j] ? 1 : 0;
          n[side] = double(c);
        }
        shared = std::min(n[0], n[1]);
      }
      double wpo_mean[2] = {0, 0};
      for (int side = 0; side < 2; ++side) {
        const int64_t r = i + side * B;
        const bool* m = mask_row(mask, l, r);
        const T* xr = x.row(l, r);
        const U* rr = rf.row(l, r);
        const U* ar = ad.row(l, r);
        const U* tr = rw.row(l, r);
        const double sign_alpha = side == 0 ? tg_alpha : -tg_alpha;
        const int64_t len = l.len(r);
        double s = 0, sr = 0, sref = 0, saln = 0, pos = 0;
        if (!ld && !tr) {  // every weight is the mask: branch-free lane sums the compiler vectorizes
          plain_sums(xr, rr, ar, m, len, s, sref, saln, pos);
          sr = s;
          o_sum[r] = A(s);
          o_raw[r] = A(sr);
          o_ref[r] = A(sref);
          o_len[r] = A(pos);
          wpo_mean[side] = saln / std::max(pos, 1.0);
          continue;
        }
        for (int64_t j = 0; j < len; ++j) {
          if (m && !m[j]) continue;
          pos += 1;
          const double v = double(static_cast<A>(xr[j]));
          double w = (ld && pos > shared) ? ld_alpha : 1.0;
          if (tr) w *= 1.0 + sign_alpha * double(static_cast<A>(tr[j]));
          s += w * v;
          sr += v;
          if (rr) sref += w * double(static_cast<A>(rr[j]));
          if (ar) saln += v - double(static_cast<A>(ar[j]));
        }
        o_sum[r] = A(s);
        o_raw[r] = A(sr);
        o_ref[r] = A(sref);
        o_len[r] = A(pos);
        wpo_mean[side] = saln / std::max(pos, 1.0);
      }
      // WPO: exp(mean aligned log-prob) of chosen times rejected, one exp (never exp(a) * exp(b)
      // overflowing where the product is finite)
      o_wpo[i] = A(std::exp(wpo_mean[0] + wpo_mean[1]));
    }
  });
}

at::ScalarType acc_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// The auxiliary dtype: the log-probs' or the compute type (see the header).
bool aux_is_acc(const at::Tensor& lp, std::initializer_list<const std::optional<at::Tensor>*> aux) {
  bool is_acc = false;
  for (auto* t : aux) {
    if (!t->has_value()) continue;
    const at::ScalarType s = (*t)->scalar_type();
    if (s == lp.scalar_type()) continue;
    TORCH_CHECK(s == acc_type(lp), "rlkern: auxiliary token tensors must have the log-probs' dtype or ",
                acc_type(lp), ", got ", s);
    is_acc = true;
  }
  if (is_acc) {
    for (auto* t : aux)
      TORCH_CHECK(!t->has_value() || (*t)->scalar_type() == acc_type(lp),
                  "rlkern: auxiliary token tensors must share one dtype");
  }
  return is_acc;
}

void check_mask(const std::optional<at::Tensor>& mask, const at::Tensor& lp, const char* op) {
  if (!mask.has_value()) return;
  TORCH_CHECK(mask->scalar_type() == at::kBool, op, ": mask must be bool");
  TORCH_CHECK(mask->sizes() == lp.sizes(), op, ": mask must have the log-probs' shape");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_sums_cpu(
    const at::Tensor& logprobs, const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& ref,
    const std::optional<at::Tensor>& adj, const std::optional<at::Tensor>& rewards,
    const std::optional<at::Tensor>& cu_seqlens, double ld_alpha, bool ld, double tg_alpha) {
  const char* op = "cpp_preference_token_sums";
  at::Tensor holder;
  const Layout l = rlkern::make_token_rows(logprobs, cu_seqlens, holder, op);
  TORCH_CHECK(l.rows % 2 == 0, op, ": the rows must be 2B (chosen, then rejected), got ", l.rows);
  check_mask(mask, logprobs, op);
  const auto opts = logprobs.options().dtype(acc_type(logprobs));
  at::Tensor sums = at::empty({l.rows}, opts), raw = at::empty({l.rows}, opts), ref_sums = at::empty({l.rows}, opts);
  at::Tensor lengths = at::empty({l.rows}, opts), wpo = at::empty({l.rows / 2}, opts);
  const bool acc = aux_is_acc(logprobs, {&ref, &adj, &rewards});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logprobs.scalar_type(), "cpp_preference_token_sums", [&] {
    using A = Acc<scalar_t>;
    if (acc)
      sums_kernel<scalar_t, A>(logprobs, mask, ref, adj, rewards, l, ld, ld_alpha, tg_alpha, sums, raw, ref_sums,
                               lengths, wpo);
    else
      sums_kernel<scalar_t, scalar_t>(logprobs, mask, ref, adj, rewards, l, ld, ld_alpha, tg_alpha, sums, raw,
                                      ref_sums, lengths, wpo);
  });
  return {sums, raw, ref_sums, lengths, wpo};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_sums_meta(
    const at::Tensor& logprobs, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>& cu_seqlens,
    double, bool, double) {
  const int64_t rows = cu_seqlens.has_value() ? cu_seqlens->size(0) - 1 : logprobs.size(0);
  const auto opts = logprobs.options().dtype(acc_type(logprobs));
  return {at::empty({rows}, opts), at::empty({rows}, opts), at::empty({rows}, opts), at::empty({rows}, opts),
          at::empty({rows / 2}, opts)};
}

template <typename T, typename U>
void sums_backward_kernel(const at::Tensor& g_sums, const at::Tensor& g_raw, const std::optional<at::Tensor>& mask,
                          const std::optional<at::Tensor>& rewards, const at::Tensor& lengths, const Layout& l,
                          bool ld, double ld_alpha, double tg_alpha, at::Tensor& grad) {
  using A = Acc<T>;
  const Tok<U> rw = tok<U>(rewards);
  const A* gs = g_sums.data_ptr<A>();
  const A* gr = g_raw.data_ptr<A>();
  const A* n = lengths.data_ptr<A>();
  T* out = grad.data_ptr<T>();
  const int64_t B = l.rows / 2;
  const int64_t out_stride = l.cu ? 0 : l.T;
  at::parallel_for(0, l.rows, kGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const bool* m = mask_row(mask, l, r);
      const U* tr = rw.row(l, r);
      T* o = out + l.off(r, out_stride);
      const int64_t other = r < B ? r + B : r - B;
      const double shared = ld ? std::min(double(n[r]), double(n[other])) : 0.0;
      const double sign_alpha = r < B ? tg_alpha : -tg_alpha;
      const double a = gs[r], b = gr[r];
      const int64_t len = l.len(r);
      if (!ld && !tr) {  // weight = mask: one value per row, a select the compiler vectorizes
        const T g = T(A(a + b)), zero = T(0);
        if (m)
          for (int64_t j = 0; j < len; ++j) o[j] = m[j] ? g : zero;
        else
          for (int64_t j = 0; j < len; ++j) o[j] = g;
        continue;
      }
      double pos = 0;
      for (int64_t j = 0; j < len; ++j) {
        if (m && !m[j]) {
          o[j] = T(0);
          continue;
        }
        pos += 1;
        double w = (ld && pos > shared) ? ld_alpha : 1.0;
        if (tr) w *= 1.0 + sign_alpha * double(static_cast<A>(tr[j]));
        o[j] = T(A(a * w + b));
      }
    }
  });
}

at::Tensor token_sums_backward_cpu(const at::Tensor& g_sums, const at::Tensor& g_raw, const at::Tensor& logprobs,
                                   const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& rewards,
                                   const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& lengths,
                                   double ld_alpha, bool ld, double tg_alpha) {
  const char* op = "cpp_preference_token_sums_backward";
  at::Tensor holder;
  const Layout l = rlkern::make_token_rows(logprobs, cu_seqlens, holder, op);
  check_mask(mask, logprobs, op);
  const at::ScalarType acc = acc_type(logprobs);
  TORCH_CHECK(g_sums.scalar_type() == acc && g_raw.scalar_type() == acc && lengths.scalar_type() == acc, op,
              ": gradients and lengths must be ", acc);
  TORCH_CHECK(g_sums.numel() == l.rows && g_raw.numel() == l.rows && lengths.numel() == l.rows, op,
              ": gradients and lengths must be [R]");
  at::Tensor grad = at::empty(logprobs.sizes(), logprobs.options());
  const at::Tensor gs = g_sums.contiguous(), gr = g_raw.contiguous(), n = lengths.contiguous();
  const bool is_acc = aux_is_acc(logprobs, {&rewards});
  const at::ScalarType type = logprobs.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, type, "cpp_preference_token_sums_backward", [&] {
    using A = Acc<scalar_t>;
    if (is_acc)
      sums_backward_kernel<scalar_t, A>(gs, gr, mask, rewards, n, l, ld, ld_alpha, tg_alpha, grad);
    else
      sums_backward_kernel<scalar_t, scalar_t>(gs, gr, mask, rewards, n, l, ld, ld_alpha, tg_alpha, grad);
  });
  return grad;
}

at::Tensor token_sums_backward_meta(const at::Tensor&, const at::Tensor&, const at::Tensor& logprobs,
                                    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                    const std::optional<at::Tensor>&, const at::Tensor&, double, bool, double) {
  return at::empty(logprobs.sizes(), logprobs.options());
}

template <typename T, typename U>
void rewards_kernel(const at::Tensor& lp, const at::Tensor& ref, const std::optional<at::Tensor>& mask,
                    const std::optional<at::Tensor>& old, const std::optional<at::Tensor>& seq, const Layout& l,
                    double beta, double kl_coef, double seq_coef, at::Tensor& out) {
  using A = Acc<T>;
  const Tok<T> x = tok<T>(lp);
  const Tok<U> rf = tok<U>(ref), od = tok<U>(old);
  const A* sr = seq.has_value() ? seq->data_ptr<A>() : nullptr;
  A* o_all = out.data_ptr<A>();
  const int64_t out_stride = l.cu ? 0 : l.T;
  at::parallel_for(0, l.rows, kGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const bool* m = mask_row(mask, l, r);
      const T* xr = x.row(l, r);
      const U* rr = rf.row(l, r);
      const U* orow = od.row(l, r);
      A* o = o_all + l.off(r, out_stride);
      const int64_t len = l.len(r);
      int64_t last = -1;
      for (int64_t j = 0; j < len; ++j) {
        if (m && !m[j]) {
          o[j] = A(0);
          continue;
        }
        last = j;
        const A ref_j = static_cast<A>(rr[j]);
        A v = A(beta) * (static_cast<A>(xr[j]) - ref_j);
        if (orow) v -= A(kl_coef) * (static_cast<A>(orow[j]) - ref_j);
        o[j] = v;
      }
      if (sr && last >= 0) o[last] += A(seq_coef) * sr[r];
    }
  });
}

at::Tensor dpo_token_rewards_cpu(const at::Tensor& logprobs, const at::Tensor& ref,
                                 const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& old,
                                 const std::optional<at::Tensor>& seq, const std::optional<at::Tensor>& cu_seqlens,
                                 double beta, double kl_coef, double seq_coef) {
  const char* op = "cpp_dpo_token_rewards";
  at::Tensor holder;
  const Layout l = rlkern::make_token_rows(logprobs, cu_seqlens, holder, op);
  check_mask(mask, logprobs, op);
  TORCH_CHECK(ref.sizes() == logprobs.sizes(), op, ": ref_logprobs must have the log-probs' shape");
  const at::ScalarType acc = acc_type(logprobs);
  if (seq.has_value())
    TORCH_CHECK(seq->scalar_type() == acc && seq->is_contiguous() && seq->numel() == l.rows, op,
                ": sequence_rewards must be contiguous [R] ", acc);
  at::Tensor out = at::empty(logprobs.sizes(), logprobs.options().dtype(acc));
  const std::optional<at::Tensor> ref_opt = ref;
  const bool is_acc = aux_is_acc(logprobs, {&ref_opt, &old});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logprobs.scalar_type(), "cpp_dpo_token_rewards", [&] {
    using A = Acc<scalar_t>;
    if (is_acc)
      rewards_kernel<scalar_t, A>(logprobs, ref, mask, old, seq, l, beta, kl_coef, seq_coef, out);
    else
      rewards_kernel<scalar_t, scalar_t>(logprobs, ref, mask, old, seq, l, beta, kl_coef, seq_coef, out);
  });
  return out;
}

at::Tensor dpo_token_rewards_meta(const at::Tensor& logprobs, const at::Tensor&, const std::optional<at::Tensor>&,
                                  const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                  const std::optional<at::Tensor>&, double, double, double) {
  return at::empty(logprobs.sizes(), logprobs.options().dtype(acc_type(logprobs)));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rlkern, m) {
  m.def(
      "cpp_preference_token_sums(Tensor logprobs, Tensor? mask, Tensor? ref_logprobs, Tensor? wpo_adjustment, "
      "Tensor? token_rewards, Tensor? cu_seqlens, float ld_alpha, bool ld, float tgdpo_alpha) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cpp_preference_token_sums_backward(Tensor grad_sums, Tensor grad_raw, Tensor logprobs, Tensor? mask, "
      "Tensor? token_rewards, Tensor? cu_seqlens, Tensor lengths, float ld_alpha, bool ld, float tgdpo_alpha) "
      "-> Tensor");
  m.def(
      "cpp_dpo_token_rewards(Tensor logprobs, Tensor ref_logprobs, Tensor? mask, Tensor? old_logprobs, "
      "Tensor? sequence_rewards, Tensor? cu_seqlens, float beta, float kl_coef, float sequence_reward_coef) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(rlkern, CPU, m) {
  m.impl("cpp_preference_token_sums", &token_sums_cpu);
  m.impl("cpp_preference_token_sums_backward", &token_sums_backward_cpu);
  m.impl("cpp_dpo_token_rewards", &dpo_token_rewards_cpu);
}

TORCH_LIBRARY_IMPL(rlkern, Meta, m) {
  m.impl("cpp_preference_token_sums", &token_sums_meta);
  m.impl("cpp_preference_token_sums_backward", &token_sums_backward_meta);
  m.impl("cpp_dpo_token_rewards", &dpo_token_rewards_meta);
}
