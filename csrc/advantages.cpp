// rlkern CPU kernels of the advantage family (torch.ops.rlkern.advantages_*_kernel).
//
// Oracle: rlkern/reference/advantages.py. Every recurrence runs backwards over one row of a
// padded [B, T] batch, rows in parallel; sums are carried in double so that T = 20000 with
// gamma = lam = 1 keeps fp32 accuracy in the outputs.
//
//   gae:        for valid t (mask != 0), right to left, with next_value and last_gae carried
//               across masked positions unchanged (verl's compute_gae_advantage_return):
//                 delta_t = r_t + gamma * next_value - v_t
//                 last_gae = delta_t + gamma * lam * last_gae;  next_value = v_t
//                 adv_t = last_gae,  ret_t = last_gae + v_t;  masked t: adv_t = ret_t = 0.
//               next_value starts at bootstrap[b] (EGAE: V(s_{l-1}) of a truncated row) or 0.
//   discounted: running = r_t + gamma * running at valid t, carried across masked t;
//               ret_t = running at valid t, 0 at masked t (verl's REINFORCE++ returns).
//   group_index: dense group numbers (first-occurrence order) for N keys, each a row of
//               integers (int64 ids: one; numpy '<U' strings: W UCS4 code points; Python
//               strings: their UTF-32 code points, concatenated, with offsets). Row hashes
//               (64-bit) in parallel, then one sequential pass into an open-addressing table
//               that keeps each slot's hash (rows are compared only on equal hashes), plus a
//               fast path for a key equal to the previous one (GRPO batches often store each
//               group's samples next to each other). The joined form
//               takes N strings concatenated with a 0 separator (ASCII bytes or UTF-32 code
//               points), so Python hands over one buffer and no per-string lengths.
//   group_normalize: GRPO-family (s - mean_g) / (std_g + eps) from dense group numbers, with
//               the per-group sums accumulated serially in double (same order at any thread
//               count: the numbers do not depend on it) and the per-token broadcast
//               value * mask (padded [N, T] or packed [total] with cu_seqlens) in parallel.
//   group_baseline: RLOO, OPO (length-weighted), GPG and the plain group-mean baseline, the
//               same two passes and broadcast.
//   optimal_token_baseline: verl's OTB (and its multi-turn twin) per group of rows, one task
//               per group: reward-to-go and cumulative path weights per row, per-position group
//               sums, then advantages; see otb_group.
//   remax, grpo_passk, bnpo: the op layer's _remax_op / _passk_op / _bnpo_op in double (see
//               remax_rows, passk_values, bnpo_values).
// float64 input is read, computed and written in float64; every other float input gives float32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>


namespace {

void check_float_input(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf || s == at::kDouble, "rlkern.advantages: ", name,
              " must be float32/bfloat16/float16/float64, got ", s);
}

// The scans' value and output types: float64 input is read and written as float64; the
// 16-bit floats and float32 are read as float32 (their exact value) and written as float32.
template <typename S>
using OutOf = std::conditional_t<std::is_same<S, double>::value, double, float>;

template <typename S>
inline double load(S x) {
  return static_cast<double>(static_cast<OutOf<S>>(x));
}

at::ScalarType out_type(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// Grain: a few rows per task; each row is a serial scan of T steps.
int64_t row_grain(int64_t T) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(T, 1)); }

using rlkern::empty_output;

template <typename M>
inline bool valid(const M* m, int64_t t) {
  return m[t] != M(0);
}

// Row b of a padded [B, T] batch, or segment b of a packed [total] batch (cu_seqlens [B + 1]).
struct Rows {
  int64_t B, T;                 // T: padded length (packed: unused)
  const int32_t* cu = nullptr;  // packed layout when set
  int64_t r_stride = 0, v_stride = 0, m_stride = 0;
  int64_t begin(int64_t b, int64_t stride) const { return cu ? cu[b] : b * stride; }
  int64_t length(int64_t b) const { return cu ? cu[b + 1] - cu[b] : T; }
};

template <typename S, typename M, typename O = OutOf<S>>
void gae_rows(const Rows& rows, const S* r, const S* v, const M* mk, const double* bootstrap, double gamma, double lam,
              O* a, O* o) {
  const double gl = gamma * lam;
  at::parallel_for(0, rows.B, row_grain(rows.T), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const S* rr = r + rows.begin(b, rows.r_stride);
      const S* vv = v + rows.begin(b, rows.v_stride);
      const M* mm = mk + rows.begin(b, rows.m_stride);
      O* aa = a + rows.begin(b, rows.T);
      O* oo = o + rows.begin(b, rows.T);
      double next_value = bootstrap ? bootstrap[b] : 0.0;
      double last = 0.0;
      for (int64_t t = rows.length(b) - 1; t >= 0; --t) {
        if (valid(mm, t)) {
          const double vt = load(vv[t]);
          last = load(rr[t]) + gamma * next_value - vt + gl * last;
          next_value = vt;
          aa[t] = static_cast<O>(last);
          oo[t] = static_cast<O>(last + vt);
        } else {
          aa[t] = O(0);
          oo[t] = O(0);
        }
      }
    }
  });
}

template <typename S, typename M, typename O = OutOf<S>>
void discounted_rows(const Rows& rows, const S* r, const M* mk, double gamma, O* o) {
  at::parallel_for(0, rows.B, row_grain(rows.T), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const S* rr = r + rows.begin(b, rows.r_stride);
      const M* mm = mk + rows.begin(b, rows.m_stride);
      O* oo = o + rows.begin(b, rows.T);
      double running = 0.0;
      for (int64_t t = rows.length(b) - 1; t >= 0; --t) {
        if (valid(mm, t)) {
          running = load(rr[t]) + gamma * running;
          oo[t] = static_cast<O>(running);
        } else {
          oo[t] = O(0);
        }
      }
    }
  });
}

// Calls f.template operator()<S, M>() for the runtime value and mask dtypes.
template <typename F>
void dispatch_value_mask(at::ScalarType value_type, at::ScalarType mask_type, F&& f) {
  auto with_mask = [&](auto value_tag) {
    using S = decltype(value_tag);
    rlkern::dispatch_mask(mask_type, "rlkern.advantages", [&](auto mask_tag) { f(S{}, mask_tag); });
  };
  switch (value_type) {
    case at::kDouble: return with_mask(double{});
    case at::kFloat: return with_mask(float{});
    case at::kBFloat16: return with_mask(at::BFloat16{});
    case at::kHalf: return with_mask(at::Half{});
    default: TORCH_CHECK(false, "rlkern.advantages: unsupported value dtype ", value_type);
  }
}

const double* bootstrap_ptr(const std::optional<at::Tensor>& bootstrap, int64_t B, at::Tensor& holder) {
  if (!bootstrap.has_value()) return nullptr;
  TORCH_CHECK(bootstrap->dim() == 1 && bootstrap->size(0) == B, "rlkern.advantages: bootstrap must be [", B,
              "], got ", bootstrap->sizes());
  // float32 values first (the kernels' precision for every input but float64), then exact in double
  holder = (bootstrap->scalar_type() == at::kDouble ? *bootstrap : bootstrap->to(at::kFloat)).to(at::kDouble)
               .contiguous();
  return holder.data_ptr<double>();
}

// Layout of rewards: [B, T] (cu_seqlens None) or packed [total] with cu_seqlens int32 [B + 1].
Rows make_rows(const at::Tensor& rewards, const std::optional<at::Tensor>& cu_seqlens, at::Tensor& cu_holder) {
  Rows rows;
  if (cu_seqlens.has_value()) {
    TORCH_CHECK(rewards.dim() == 1, "rlkern.advantages: packed rewards must be [total], got ", rewards.sizes());
    TORCH_CHECK(cu_seqlens->dim() == 1 && cu_seqlens->size(0) >= 1 && cu_seqlens->scalar_type() == at::kInt,
                "rlkern.advantages: cu_seqlens must be int32 [B + 1], got ", cu_seqlens->scalar_type(), " ",
                cu_seqlens->sizes());
    cu_holder = cu_seqlens->contiguous();
    rows.cu = cu_holder.data_ptr<int32_t>();
    rows.B = cu_holder.size(0) - 1;
    rows.T = rows.B > 0 ? std::max<int64_t>(1, rewards.numel() / rows.B) : 1;
    TORCH_CHECK(rows.cu[0] == 0 && rows.cu[rows.B] == rewards.numel(),
                "rlkern.advantages: cu_seqlens must run from 0 to ", rewards.numel());
    for (int64_t b = 0; b < rows.B; ++b)
      TORCH_CHECK(rows.cu[b + 1] >= rows.cu[b], "rlkern.advantages: cu_seqlens must be non-decreasing");
    TORCH_CHECK(rewards.numel() <= 1 || rewards.stride(0) == 1, "rlkern.advantages: packed rewards must be contiguous");
  } else {
    TORCH_CHECK(rewards.dim() == 2, "rlkern.advantages: rewards must be [B, T], got ", rewards.sizes());
    rows.B = rewards.size(0);
    rows.T = rewards.size(1);
  }
  TORCH_CHECK(rewards.device().is_cpu(), "rlkern.advantages: rewards must be a CPU tensor");
  check_float_input(rewards, "rewards");
  return rows;
}

void check_like(const at::Tensor& t, const at::Tensor& rewards, const char* name) {
  TORCH_CHECK(t.sizes() == rewards.sizes(), "rlkern.advantages: ", name, " must have the shape of rewards ",
              rewards.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), "rlkern.advantages: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, "rlkern.advantages: ", name,
              " needs a contiguous last dim");
}

int64_t row_stride(const at::Tensor& t) { return t.dim() == 2 ? t.stride(0) : 0; }

std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                           const at::Tensor& mask, const std::optional<at::Tensor>& bootstrap,
                                           const std::optional<at::Tensor>& cu_seqlens, double gamma, double lam) {
  at::Tensor cu_holder;
  Rows rows = make_rows(rewards, cu_seqlens, cu_holder);
  check_like(values, rewards, "values");
  check_like(mask, rewards, "mask");
  TORCH_CHECK(values.scalar_type() == rewards.scalar_type(), "rlkern.cpp_gae: values dtype ",
              values.scalar_type(), " != rewards dtype ", rewards.scalar_type());
  rows.r_stride = row_stride(rewards);
  rows.v_stride = row_stride(values);
  rows.m_stride = row_stride(mask);
  auto opts = rewards.options().dtype(out_type(rewards));
  at::Tensor adv = empty_output(rewards.sizes(), opts), ret = empty_output(rewards.sizes(), opts);
  if (rewards.numel() == 0) return {adv, ret};
  at::Tensor holder;
  const double* boot = bootstrap_ptr(bootstrap, rows.B, holder);
  dispatch_value_mask(rewards.scalar_type(), mask.scalar_type(), [&](auto s, auto m) {
    using S = decltype(s);
    using M = decltype(m);
    using O = OutOf<S>;
    gae_rows<S, M>(rows, rewards.data_ptr<S>(), values.data_ptr<S>(), mask.data_ptr<M>(), boot, gamma, lam,
                   adv.data_ptr<O>(), ret.data_ptr<O>());
  });
  return {adv, ret};
}

at::Tensor discounted_cpu(const at::Tensor& rewards, const at::Tensor& mask,
                          const std::optional<at::Tensor>& cu_seqlens, double gamma) {
  at::Tensor cu_holder;
  Rows rows = make_rows(rewards, cu_seqlens, cu_holder);
  check_like(mask, rewards, "mask");
  rows.r_stride = row_stride(rewards);
  rows.m_stride = row_stride(mask);
  at::Tensor ret = empty_output(rewards.sizes(), rewards.options().dtype(out_type(rewards)));
  if (rewards.numel() == 0) return ret;
  dispatch_value_mask(rewards.scalar_type(), mask.scalar_type(), [&](auto s, auto m) {
    using S = decltype(s);
    using M = decltype(m);
    discounted_rows<S, M>(rows, rewards.data_ptr<S>(), mask.data_ptr<M>(), gamma, ret.data_ptr<OutOf<S>>());
  });
  return ret;
}

// Masked whitening (verl's masked_whiten) over all elements of x with float64 statistics:
// mean = sum / (n + 1e-8), var = sum (x - mean)^2 / (n + 1e-8) * n / (n - 1),
// out = (x - mean) / sqrt(var + 1e-8) (+ mean unless shift_mean), 0 at masked if zero_masked.
template <typename X, typename M>
void whiten_flat(const X* x, const M* m, int64_t n, bool shift_mean, bool zero_masked, X* out) {
  const int64_t chunk = 1 << 16;
  const int64_t chunks = (n + chunk - 1) / chunk;
  std::vector<double> cnt(chunks, 0.0), sum(chunks, 0.0), sq(chunks, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double k = 0.0, s = 0.0;
      for (int64_t i = c * chunk, e = std::min(n, (c + 1) * chunk); i < e; ++i) {
        if (valid(m, i)) {
          k += 1.0;
          s += x[i];
        }
      }
      cnt[c] = k;
      sum[c] = s;
    }
  });
  double count = 0.0, total = 0.0;
  for (int64_t c = 0; c < chunks; ++c) {
    count += cnt[c];
    total += sum[c];
  }
  TORCH_CHECK_VALUE(count >= 2, "masked_whiten: whitening needs at least 2 valid tokens in the mask, got ",
                    static_cast<int64_t>(count));
  const double mean = total / (count + 1e-8);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double q = 0.0;
      for (int64_t i = c * chunk, e = std::min(n, (c + 1) * chunk); i < e; ++i) {
        if (valid(m, i)) {
          const double d = x[i] - mean;
          q += d * d;
        }
      }
      sq[c] = q;
    }
  });
  double ss = 0.0;
  for (int64_t c = 0; c < chunks; ++c) ss += sq[c];
  const double var = ss / (count + 1e-8) * count / (count - 1.0);
  const double rstd = 1.0 / std::sqrt(var + 1e-8);
  const double add = shift_mean ? 0.0 : mean;
  at::parallel_for(0, n, chunk, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const bool keep = !zero_masked || valid(m, i);
      out[i] = keep ? static_cast<X>((x[i] - mean) * rstd + add) : X(0);
    }
  });
}


at::Tensor whiten_cpu(const at::Tensor& values, const at::Tensor& mask, bool shift_mean, bool zero_masked) {
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble,
              "rlkern.cpp_masked_whiten: values must be float32 or float64, got ", values.scalar_type());
  TORCH_CHECK(values.sizes() == mask.sizes(), "rlkern.cpp_masked_whiten: mask must have the shape of values ",
              values.sizes(), ", got ", mask.sizes());
  TORCH_CHECK(values.device().is_cpu() && mask.device().is_cpu(), "rlkern.cpp_masked_whiten: CPU tensors only");
  const at::Tensor x = values.contiguous();
  const at::Tensor mk = mask.contiguous();
  at::Tensor out = empty_output(values.sizes(), values.options());
  rlkern::dispatch_mask(mk.scalar_type(), "rlkern.advantages", [&](auto tag) {
    using M = decltype(tag);
    if (x.scalar_type() == at::kDouble) {
      whiten_flat<double, M>(x.data_ptr<double>(), mk.data_ptr<M>(), x.numel(), shift_mean, zero_masked,
                             out.data_ptr<double>());
    } else {
      whiten_flat<float, M>(x.data_ptr<float>(), mk.data_ptr<M>(), x.numel(), shift_mean, zero_masked,
                            out.data_ptr<float>());
    }
  });
  return out;
}

// Outcome value of each row times its mask: out[b, t] = value[b] * mask[b, t] (verl's
// scores.unsqueeze(-1) * response_mask, one pass), padded [B, T] (row stride m_stride) or
// packed [total] (segment b = [cu[b], cu[b + 1])). value is already rounded to O.
template <typename O, typename M>
void broadcast_rows(const O* value, const M* m, int64_t B, int64_t T, int64_t m_stride, const int32_t* cu, O* out) {
  const int64_t grain = cu ? std::max<int64_t>(1, 16384 / std::max<int64_t>(1, cu[B] / std::max<int64_t>(B, 1)))
                           : row_grain(T);
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t begin = cu ? cu[b] : b * T, n = cu ? cu[b + 1] - cu[b] : T;
      const M* mm = m + (cu ? begin : b * m_stride);
      O* oo = out + begin;
      const O v = value[b];
      if constexpr (std::is_same_v<M, int64_t>) {
        // int64 -> float has no SSE/AVX2 conversion: a row of 0/1 goes through int32 (exact)
        uint64_t above_one = 0;
        for (int64_t t = 0; t < n; ++t) above_one |= static_cast<uint64_t>(mm[t]) > 1;
        if (!above_one) {
          for (int64_t t = 0; t < n; ++t) oo[t] = v * static_cast<O>(static_cast<int32_t>(mm[t]));
          continue;
        }
      }
      for (int64_t t = 0; t < n; ++t) oo[t] = v * static_cast<O>(mm[t]);
    }
  });
}

// Checks the token layout of an outcome op's mask: padded [B, T] (cu_seqlens None) or packed
// [total] with cu_seqlens int32 [B + 1]; returns the output shape.
std::vector<int64_t> token_layout(const at::Tensor& mask, const std::optional<at::Tensor>& cu_seqlens, int64_t B,
                                  const char* op, at::Tensor& cu_holder) {
  TORCH_CHECK(mask.device().is_cpu(), op, ": mask must be a CPU tensor");
  if (cu_seqlens.has_value()) {
    TORCH_CHECK(mask.dim() == 1, op, ": packed mask must be [total], got ", mask.sizes());
    TORCH_CHECK(cu_seqlens->dim() == 1 && cu_seqlens->size(0) == B + 1 && cu_seqlens->scalar_type() == at::kInt,
                op, ": cu_seqlens must be int32 [", B + 1, "], got ", cu_seqlens->scalar_type(), " ",
                cu_seqlens->sizes());
    cu_holder = cu_seqlens->contiguous();
    const int32_t* cu = cu_holder.data_ptr<int32_t>();
    TORCH_CHECK(cu[0] == 0 && cu[B] == mask.numel(), op, ": cu_seqlens must run from 0 to ", mask.numel());
    for (int64_t b = 0; b < B; ++b) TORCH_CHECK(cu[b + 1] >= cu[b], op, ": cu_seqlens must be non-decreasing");
    return {mask.numel()};
  }
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == B, op, ": mask must be [", B, ", T], got ", mask.sizes());
  return {B, mask.size(1)};
}

template <typename O>
void broadcast_dispatch(const O* value, const at::Tensor& mask, const int32_t* cu, int64_t B, O* out) {
  const at::Tensor mk = mask.dim() == 2 && mask.size(1) > 1 && mask.stride(1) != 1 ? mask.contiguous()
                        : mask.dim() == 1                                          ? mask.contiguous()
                                                                                   : mask;
  const int64_t T = mk.dim() == 2 ? mk.size(1) : 0;
  const int64_t m_stride = mk.dim() == 2 ? mk.stride(0) : 0;
  if (mk.numel() == 0) return;
  rlkern::dispatch_mask(mk.scalar_type(), "rlkern.advantages", [&](auto tag) {
    using M = decltype(tag);
    broadcast_rows<O, M>(value, mk.data_ptr<M>(), B, T, m_stride, cu, out);
  });
}

at::Tensor broadcast_cpu(const at::Tensor& scores, const at::Tensor& mask,
                         const std::optional<at::Tensor>& cu_seqlens) {
  TORCH_CHECK(scores.dim() == 1 && (scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble),
              "rlkern.cpp_outcome_to_tokens: scores must be float32/float64 [B], got ", scores.scalar_type(), " ",
              scores.sizes());
  TORCH_CHECK(scores.device().is_cpu(), "rlkern.cpp_outcome_to_tokens: scores must be a CPU tensor");
  const int64_t B = scores.size(0);
  at::Tensor cu_holder;
  const auto shape = token_layout(mask, cu_seqlens, B, "rlkern.cpp_outcome_to_tokens", cu_holder);
  const at::Tensor s = scores.contiguous();
  at::Tensor out = empty_output(shape, scores.options());
  const int32_t* cu = cu_holder.defined() ? cu_holder.data_ptr<int32_t>() : nullptr;
  if (s.scalar_type() == at::kFloat)
    broadcast_dispatch<float>(s.data_ptr<float>(), mask, cu, B, out.data_ptr<float>());
  else
    broadcast_dispatch<double>(s.data_ptr<double>(), mask, cu, B, out.data_ptr<double>());
  return out;
}

inline uint64_t mix64(uint64_t h) {
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdULL;
  h ^= h >> 33;
  h *= 0xc4ceb9fe1a85ec53ULL;
  h ^= h >> 33;
  return h;
}

// 8 bytes per multiply (a string of 36 UCS4 code points is 18 words), one final avalanche.
inline uint64_t hash_bytes(const unsigned char* p, int64_t n) {
  uint64_t h = 0x9e3779b97f4a7c15ULL ^ static_cast<uint64_t>(n);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    h = (h ^ w) * 0x100000001b3ULL;
    h ^= h >> 29;
  }
  if (i < n) {
    uint64_t w = 0;
    std::memcpy(&w, p + i, static_cast<size_t>(n - i));
    h = (h ^ w) * 0x100000001b3ULL;
  }
  return mix64(h);
}

// Row i of the keys is keys[start(i), start(i) + len(i)): fixed width W without offsets, else
// [offsets[i], offsets[i+1] - gap) (strings of any length, concatenated; gap = 1 when a
// separator follows each string). Hashes are computed first (in parallel for many rows), then inserted serially
// into an open-addressing table that keeps each slot's hash, so a probe compares the strings
// (a random read) only when the 64-bit hashes agree.
template <typename K>
void group_index_rows(const K* keys, const int64_t* offsets, int64_t gap, int64_t N, int64_t W, int64_t* out) {
  auto start = [&](int64_t i) { return offsets ? offsets[i] : i * W; };
  auto len = [&](int64_t i) { return offsets ? offsets[i + 1] - offsets[i] - gap : W; };
  auto same = [&](int64_t i, int64_t j) {
    const int64_t n = len(i);
    // n == 0 first: empty keys may sit in an empty tensor whose data pointer is null, and
    // memcmp(null, null, 0) is undefined behaviour (UBSan reported it: benches/sanitize_cpu.sh)
    return n == len(j) && (n == 0 || std::memcmp(keys + start(i), keys + start(j), n * sizeof(K)) == 0);
  };
  std::vector<uint64_t> hash(N);
  // ~10 ns a row: threads only pay off past ~10^5 rows (below, a parallel region's wake-up
  // costs more than it saves on the shared 2-core machine)
  at::parallel_for(0, N, int64_t{1} << 17, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      hash[i] = hash_bytes(reinterpret_cast<const unsigned char*>(keys + start(i)), len(i) * sizeof(K));
  });
  int64_t cap = 16;
  while (cap < 2 * N) cap <<= 1;
  std::vector<int64_t> slot_rep(cap, -1);  // sample index representing the group in this slot
  std::vector<uint64_t> slot_hash(cap);
  int64_t groups = 0;
  for (int64_t i = 0; i < N; ++i) {
    if (i > 0 && hash[i] == hash[i - 1] && same(i, i - 1)) {
      out[i] = out[i - 1];
      continue;
    }
    const uint64_t h = hash[i];
    int64_t s = static_cast<int64_t>(h & static_cast<uint64_t>(cap - 1));
    while (true) {
      const int64_t rep = slot_rep[s];
      if (rep < 0) {
        slot_rep[s] = i;
        slot_hash[s] = h;
        out[i] = groups++;
        break;
      }
      if (slot_hash[s] == h && same(rep, i)) {
        out[i] = out[rep];
        break;
      }
      s = (s + 1) & (cap - 1);
    }
  }
}

// keys [N] or [N, W] (one row per sample), or with offsets [N + 1] int64: keys [total], row i
// = keys[offsets[i]:offsets[i + 1]].
at::Tensor group_index_cpu(const at::Tensor& keys, const std::optional<at::Tensor>& offsets) {
  TORCH_CHECK(keys.device().is_cpu(), "rlkern.cpp_group_index: keys must be a CPU tensor");
  at::Tensor k, off;
  int64_t N, W = 0;
  if (offsets.has_value()) {
    TORCH_CHECK(keys.dim() == 1, "rlkern.cpp_group_index: ragged keys must be [total], got ", keys.sizes());
    TORCH_CHECK(offsets->dim() == 1 && offsets->size(0) >= 1 && offsets->scalar_type() == at::kLong,
                "rlkern.cpp_group_index: offsets must be int64 [N + 1], got ", offsets->sizes(), " ",
                offsets->scalar_type());
    k = keys.contiguous();
    off = offsets->contiguous();
    N = off.size(0) - 1;
    const int64_t* o = off.data_ptr<int64_t>();
    TORCH_CHECK(o[0] == 0 && o[N] == k.numel(), "rlkern.cpp_group_index: offsets must run from 0 to ",
                k.numel());
    for (int64_t i = 0; i < N; ++i)
      TORCH_CHECK(o[i + 1] >= o[i], "rlkern.cpp_group_index: offsets must be non-decreasing");
  } else {
    TORCH_CHECK(keys.dim() == 1 || keys.dim() == 2,
                "rlkern.cpp_group_index: keys must be [N] or [N, W], got ", keys.sizes());
    k = keys.dim() == 1 ? keys.reshape({-1, 1}).contiguous() : keys.contiguous();
    N = k.size(0);
    W = k.size(1);
  }
  at::Tensor out = at::empty({N}, keys.options().dtype(at::kLong));
  if (N == 0) return out;
  int64_t* o = out.data_ptr<int64_t>();
  const int64_t* offs = off.defined() ? off.data_ptr<int64_t>() : nullptr;
  switch (k.scalar_type()) {
    case at::kLong: group_index_rows(k.data_ptr<int64_t>(), offs, 0, N, W, o); break;
    case at::kInt: group_index_rows(k.data_ptr<int32_t>(), offs, 0, N, W, o); break;
    case at::kByte: group_index_rows(k.data_ptr<uint8_t>(), offs, 0, N, W, o); break;
    default: TORCH_CHECK(false, "rlkern.cpp_group_index: keys must be int64/int32/uint8, got ", k.scalar_type());
  }
  return out;
}

// n strings joined with a 0 separator ([total] uint8 ASCII bytes or int32 UTF-32 code points,
// exactly n - 1 zeros) -> dense group numbers [n]. Another count of zeros (a string holding
// "\0") raises ValueError: the caller then passes lengths to cpp_group_index.
template <typename K>
void split_joined(const K* keys, int64_t total, int64_t n, int64_t* offsets) {
  int64_t i = 0;
  offsets[0] = 0;
  if constexpr (sizeof(K) == 1) {
    const K* p = keys;
    const K* end = keys + total;
    // p < end: an empty buffer (one empty string) may have a null data pointer, and
    // memchr(null, 0, 0) is undefined behaviour (UBSan reported it: benches/sanitize_cpu.sh)
    while (p < end) {
      const void* hit = std::memchr(p, 0, static_cast<size_t>(end - p));
      if (!hit) break;
      TORCH_CHECK_VALUE(i + 1 < n, "rlkern.cpp_group_index_joined: more than ", n - 1, " separators");
      p = static_cast<const K*>(hit) + 1;
      offsets[++i] = p - keys;
    }
  } else {
    for (int64_t t = 0; t < total; ++t) {
      if (keys[t] == 0) {
        TORCH_CHECK_VALUE(i + 1 < n, "rlkern.cpp_group_index_joined: more than ", n - 1, " separators");
        offsets[++i] = t + 1;
      }
    }
  }
  TORCH_CHECK_VALUE(i == n - 1, "rlkern.cpp_group_index_joined: expected ", n - 1,
                    " separators, got ", i);
  offsets[n] = total + 1;  // a virtual separator after the last string
}

at::Tensor group_index_joined_cpu(const at::Tensor& joined, int64_t n) {
  TORCH_CHECK(joined.device().is_cpu() && joined.dim() == 1,
              "rlkern.cpp_group_index_joined: joined must be a 1-D CPU tensor, got ", joined.sizes());
  TORCH_CHECK(n >= 0, "rlkern.cpp_group_index_joined: n must be >= 0, got ", n);
  // n strings hold n - 1 separators: checked before n sizes any allocation (a huge n would
  // otherwise ask for n * 8 bytes), and n = 0 only for an empty buffer (tests/test_fuzz_cpp.py).
  TORCH_CHECK_VALUE(n <= joined.numel() + 1 && (n > 0 || joined.numel() == 0),
                    "rlkern.cpp_group_index_joined: ", n, " strings cannot be split out of ", joined.numel(),
                    " elements (expected n - 1 separators)");
  at::Tensor out = at::empty({n}, joined.options().dtype(at::kLong));
  if (n == 0) return out;
  const at::Tensor k = joined.contiguous();
  std::vector<int64_t> offsets(n + 1);
  auto run = [&](auto tag) {
    using K = decltype(tag);
    const K* keys = k.data_ptr<K>();
    split_joined<K>(keys, k.numel(), n, offsets.data());
    group_index_rows<K>(keys, offsets.data(), 1, n, 0, out.data_ptr<int64_t>());
  };
  switch (k.scalar_type()) {
    case at::kByte: run(uint8_t{}); break;
    case at::kInt: run(int32_t{}); break;
    default: TORCH_CHECK(false, "rlkern.cpp_group_index_joined: joined must be uint8/int32, got ",
                         k.scalar_type());
  }
  return out;
}

// The group kernels' shared edges: input checks, the scores dtype dispatch, and the output
// (per-sample values rounded to float32, or kept in float64 for float64 scores, then value * mask
// broadcast to the tokens if a mask is given).
void check_group_inputs(const at::Tensor& scores, const at::Tensor& inverse, const std::optional<at::Tensor>& mask,
                        const std::optional<at::Tensor>& cu_seqlens, const char* op) {
  TORCH_CHECK(scores.device().is_cpu() && scores.dim() == 1, op, ": scores must be a 1-D CPU tensor, got ",
              scores.sizes());
  TORCH_CHECK(inverse.dim() == 1 && inverse.size(0) == scores.size(0) && inverse.scalar_type() == at::kLong &&
                  inverse.device().is_cpu(),
              op, ": inverse must be int64 [", scores.size(0), "], got ", inverse.scalar_type(), " ", inverse.sizes());
  TORCH_CHECK(!cu_seqlens.has_value() || mask.has_value(), op, ": cu_seqlens needs a packed mask");
}

template <typename F>
void dispatch_scores(const at::Tensor& scores, const char* op, F&& fn) {
  const at::Tensor x = scores.contiguous();
  switch (x.scalar_type()) {
    case at::kFloat: fn(x.data_ptr<float>()); break;
    case at::kDouble: fn(x.data_ptr<double>()); break;
    case at::kBFloat16: fn(x.data_ptr<at::BFloat16>()); break;
    case at::kHalf: fn(x.data_ptr<at::Half>()); break;
    default: TORCH_CHECK(false, op, ": scores must be float32/float64/bfloat16/float16, got ", x.scalar_type());
  }
}

at::Tensor group_output(const at::Tensor& scores, const std::vector<double>& value,
                        const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& cu_seqlens,
                        const char* op) {
  const int64_t N = static_cast<int64_t>(value.size());
  const auto opts = scores.options().dtype(out_type(scores));
  at::Tensor per_sample = at::empty({N}, opts);
  auto run = [&](auto tag) -> at::Tensor {
    using O = decltype(tag);
    O* rounded = per_sample.data_ptr<O>();
    for (int64_t i = 0; i < N; ++i) rounded[i] = static_cast<O>(value[i]);
    if (!mask.has_value()) return per_sample;
    at::Tensor cu_holder;
    const auto shape = token_layout(*mask, cu_seqlens, N, op, cu_holder);
    at::Tensor out = empty_output(shape, opts);
    broadcast_dispatch<O>(rounded, *mask, cu_holder.defined() ? cu_holder.data_ptr<int32_t>() : nullptr, N,
                          out.data_ptr<O>());
    return out;
  };
  return scores.scalar_type() == at::kDouble ? run(double{}) : run(float{});
}

enum class StdMode { kUnbiased, kPopulation, kNone };
enum class ScaleMode { kGroup, kBatch, kNone };

// Per-sample GRPO-family value in double (the op layer's _group_normalize_op, same formulas):
//   mean_g = sum_g / n_g,  m2_g = sum_g (x - mean_g)^2 (two passes, no cancellation)
//   singleton "verl": a group of one has mean 0, std 1;  "zero": its value is 0
//   spread = sqrt(m2_g / (n_g - 1)) (unbiased) or sqrt(m2_g / n_g) (population), or the batch's
//   std over all N samples (scale "batch"; 0 for N < 2); value = (x - mean) / (spread + eps),
//   or x - mean without std / with scale "none".
//   skip_nan: a NaN score counts in no group or batch statistic and its value is 0 (TRL).
template <typename S>
void group_values(const S* x, const int64_t* inv, int64_t N, double eps, StdMode std_mode, ScaleMode scale,
                  bool singleton_verl, bool skip_nan, double* value) {
  std::vector<double> count(N, 0.0), sum(N, 0.0), m2(N, 0.0);
  auto skipped = [&](int64_t i) { return skip_nan && std::isnan(load(x[i])); };
  int64_t scored = 0;
  for (int64_t i = 0; i < N; ++i) {
    const int64_t g = inv[i];
    TORCH_CHECK(g >= 0 && g < N, "rlkern.cpp_group_normalize: group numbers must lie in [0, ", N,
                "), got ", g);
    if (skipped(i)) continue;
    ++scored;
    count[g] += 1.0;
    sum[g] += load(x[i]);
  }
  for (int64_t g = 0; g < N; ++g) sum[g] /= std::max(count[g], 1.0);  // sum -> mean
  for (int64_t i = 0; i < N; ++i) {
    if (skipped(i)) continue;
    const double d = load(x[i]) - sum[inv[i]];
    m2[inv[i]] += d * d;
  }
  const bool divide = std_mode != StdMode::kNone && scale != ScaleMode::kNone;
  const bool unbiased = std_mode == StdMode::kUnbiased;
  double batch_spread = 0.0;
  if (divide && scale == ScaleMode::kBatch && scored > 1) {
    double total = 0.0;
    for (int64_t i = 0; i < N; ++i)
      if (!skipped(i)) total += load(x[i]);
    const double mean = total / static_cast<double>(scored);
    double ss = 0.0;
    for (int64_t i = 0; i < N; ++i) {
      if (skipped(i)) continue;
      const double d = load(x[i]) - mean;
      ss += d * d;
    }
    batch_spread = std::sqrt(ss / static_cast<double>(unbiased ? scored - 1 : scored));
  }
  at::parallel_for(0, N, int64_t{1} << 18, [&](int64_t i0, int64_t i1) {  // a few ns a sample: see group_index_rows
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t g = inv[i];
      if (skipped(i)) {
        value[i] = 0.0;
        continue;
      }
      const bool single = count[g] <= 1.0;
      if (single && !singleton_verl) {
        value[i] = 0.0;
        continue;
      }
      const double mean = single ? 0.0 : sum[g];
      const double centered = load(x[i]) - mean;
      if (!divide) {
        value[i] = centered;
        continue;
      }
      double spread = batch_spread;
      if (scale == ScaleMode::kGroup)
        spread = single ? 1.0 : std::sqrt(m2[g] / std::max(unbiased ? count[g] - 1.0 : count[g], 1.0));
      value[i] = centered / (spread + eps);
    }
  });
}

// scores [N] float32/float64/bfloat16/float16, inverse [N] int64 dense group numbers; without
// mask -> [N]; with mask [N, T] (any mask dtype, multiplied by its value) -> [N, T]; with mask
// [total] and cu_seqlens int32 [N + 1] -> [total], value * mask. float32 out (float64 for
// float64 scores).
at::Tensor group_normalize_cpu(const at::Tensor& scores, const at::Tensor& inverse,
                               const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& cu_seqlens,
                               double eps, c10::string_view std_name, c10::string_view scale_name,
                               c10::string_view singleton, bool skip_nan) {
  const char* op = "rlkern.cpp_group_normalize";
  check_group_inputs(scores, inverse, mask, cu_seqlens, op);
  const StdMode std_mode = std_name == "unbiased"     ? StdMode::kUnbiased
                           : std_name == "population" ? StdMode::kPopulation
                                                      : StdMode::kNone;
  TORCH_CHECK(std_mode != StdMode::kNone || std_name == "none", op, ": std must be unbiased/population/none");
  const ScaleMode scale = scale_name == "group" ? ScaleMode::kGroup
                          : scale_name == "batch" ? ScaleMode::kBatch
                                                  : ScaleMode::kNone;
  TORCH_CHECK(scale != ScaleMode::kNone || scale_name == "none", op, ": scale must be group/batch/none");
  TORCH_CHECK(singleton == "verl" || singleton == "zero", op, ": singleton must be verl/zero");
  const int64_t N = scores.size(0);
  const at::Tensor inv = inverse.contiguous();
  std::vector<double> value(N);
  dispatch_scores(scores, op, [&](const auto* x) {
    group_values(x, inv.data_ptr<int64_t>(), N, eps, std_mode, scale, singleton == "verl", skip_nan, value.data());
  });
  return group_output(scores, value, mask, cu_seqlens, op);
}

// Group baselines (the op layer's _group_baseline_op, same formulas, in double), per sample:
//   rloo:     n / (n - 1) * (x - mean_g) = (n x - sum_g) / (n - 1); a group of one keeps x
//             ("rloo_raw", verl rloo) or gets 0 ("rloo_zero", verl rloo_vectorized)
//   mean:     x - mean_g (mean 0 for a group of one)
//   weighted: x - sum_g(w x) / sum_g(w) (0 baseline for a group of one; OPO with w = lengths)
//   gpg:      alpha (x - mean_g) / f_norm with alpha = N / max(#{x != 0}, 1)
// then, with a mask, value * mask broadcast to tokens as group_normalize.
enum class BaselineMode { kRlooRaw, kRlooZero, kMean, kWeighted, kGpg };

template <typename S>
void baseline_values(const S* x, const int64_t* inv, const double* w, int64_t N, BaselineMode mode, double f_norm,
                     double* value) {
  std::vector<double> count(N, 0.0), sum(N, 0.0), wsum(N, 0.0), wx(N, 0.0);
  int64_t nonzero = 0;
  for (int64_t i = 0; i < N; ++i) {
    const int64_t g = inv[i];
    TORCH_CHECK(g >= 0 && g < N, "rlkern.cpp_group_baseline: group numbers must lie in [0, ", N,
                "), got ", g);
    const double xi = load(x[i]);
    count[g] += 1.0;
    sum[g] += xi;
    nonzero += xi != 0.0;
    if (w != nullptr) {
      wsum[g] += w[i];
      wx[g] += w[i] * xi;
    }
  }
  const double alpha = static_cast<double>(N) / static_cast<double>(std::max<int64_t>(nonzero, 1));
  at::parallel_for(0, N, int64_t{1} << 18, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t g = inv[i];
      const double xi = load(x[i]);
      const bool single = count[g] <= 1.0;
      switch (mode) {
        case BaselineMode::kRlooRaw:
        case BaselineMode::kRlooZero:
          value[i] = !single ? (count[g] * xi - sum[g]) / (count[g] - 1.0)
                             : (mode == BaselineMode::kRlooRaw ? xi : 0.0);
          break;
        case BaselineMode::kWeighted: value[i] = xi - (single ? 0.0 : wx[g] / wsum[g]); break;
        case BaselineMode::kMean: value[i] = xi - (single ? 0.0 : sum[g] / count[g]); break;
        case BaselineMode::kGpg: value[i] = alpha * (xi - (single ? 0.0 : sum[g] / count[g])) / f_norm; break;
      }
    }
  });
}

// scores [N] float32/float64/bfloat16/float16, inverse [N] int64 dense group numbers, weights [N]
// (mode "weighted" only, any float dtype); without mask -> [N]; with mask [N, T] or packed
// [total] with cu_seqlens int32 [N + 1] -> value * mask of the mask's shape.
at::Tensor group_baseline_cpu(const at::Tensor& scores, const at::Tensor& inverse,
                              const std::optional<at::Tensor>& weights, const std::optional<at::Tensor>& mask,
                              const std::optional<at::Tensor>& cu_seqlens, c10::string_view mode_name,
                              double param) {
  const char* op = "rlkern.cpp_group_baseline";
  check_group_inputs(scores, inverse, mask, cu_seqlens, op);
  const BaselineMode mode = mode_name == "rloo_raw"   ? BaselineMode::kRlooRaw
                            : mode_name == "rloo_zero" ? BaselineMode::kRlooZero
                            : mode_name == "mean"      ? BaselineMode::kMean
                            : mode_name == "weighted"  ? BaselineMode::kWeighted
                                                       : BaselineMode::kGpg;
  TORCH_CHECK(mode != BaselineMode::kGpg || mode_name == "gpg", op,
              ": mode must be rloo_raw/rloo_zero/mean/weighted/gpg, got ", mode_name);
  TORCH_CHECK((mode == BaselineMode::kWeighted) == weights.has_value(), op, ": weights go with mode 'weighted' only");
  const int64_t N = scores.size(0);
  at::Tensor w;
  if (weights.has_value()) {
    TORCH_CHECK(weights->dim() == 1 && weights->size(0) == N && weights->device().is_cpu(), op,
                ": weights must be a CPU tensor [", N, "], got ", weights->sizes());
    w = weights->to(at::kDouble).contiguous();
  }
  const at::Tensor inv = inverse.contiguous();
  std::vector<double> value(N);
  dispatch_scores(scores, op, [&](const auto* x) {
    baseline_values(x, inv.data_ptr<int64_t>(), w.defined() ? w.data_ptr<double>() : nullptr, N, mode, param,
                    value.data());
  });
  return group_output(scores, value, mask, cu_seqlens, op);
}

// Optimal Token Baseline (verl's compute_optimal_token_baseline_advantage and its multi-turn
// twin; the same formulas as the op layer's _otb_torch). In double:
//   y_t = r_t m_t,  G_t = sum_{j >= t} y_j (reward-to-go, at every position),
//   w_t = (1 - 2 exp(logp_t) + sum_pi2_t) rho_t^2,  W_t = sum_{j <= t} w_j m_j,  weighted_t = W_t m_t,
//   slot of a token: its position (padded: column; packed: index in its sequence), with
//   multi_turn the number of valid tokens before it (its index among the row's valid tokens),
//   B_s = sum over the group's tokens in slot s of G weighted / (sum of weighted + eps),
//   adv_t = m_t ? G_t - (slot < zero_from ? B_slot : 0) : 0, where zero_from is 0 in a group
//   of one (with multi_turn only rows holding a valid token count), the second-longest valid
//   length for a unique longest row under handle_zero_tail, else unbounded.
// One task per group (members from a counting sort of the dense group numbers, batch order),
// so a group's sums run in the same order at any thread count. A task keeps G (double) and the
// valid flags of its group's tokens (9 bytes a token, L2-sized for GRPO groups) and writes both
// outputs in a second pass over them. The two recurrences (G backwards, W forwards) are serial
// per row (four tokens per dependent add); the rest runs in vectorized loops over chunks of a
// row that stay in L1, exp included.

constexpr int64_t kOtbChunk = 512;

// GCC (12+: x86-64-v3 as a clone target) builds the exp loop for AVX2+FMA and for the baseline
// ISA and picks one when the library loads, by the CPU's features.

// out[i] = exp(x[i]) within 1 ulp of std::exp (x = k ln2 + r with a two-part ln2, |r| <= ln2/2,
// Taylor series of degree 13: truncation < 1e-17) in a loop without branches or float compares,
// so that it vectorizes (glibc's exp is a call per element, ~3 ns; this loop ~0.9 ns with AVX2).
// k comes from the mantissa of x / ln2 + 1.5 * 2^52; a k outside [-1022, 1023] (|x| > ~708,
// inf, NaN) flags the chunk, whose arguments outside [-708, 709] are then redone by std::exp.
// out must not alias x.
RLKERN_VECTOR_CLONES void exp_chunk(const double* x, double* out, int64_t n) {
  uint64_t outside = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double v = x[i];
    const double kd = v * 1.4426950408889634 + 0x1.8p52;
    const double k = kd - 0x1.8p52;
    const double r = (v - k * 6.93147180369123816490e-01) - k * 1.90821492927058770002e-10;
    double p = 1.0 / 6227020800.0;
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    uint64_t bits;
    std::memcpy(&bits, &kd, sizeof(bits));
    const uint64_t biased = bits - 0x4338000000000000ULL + 1022;  // k + 1022 (mod 2^64)
    outside |= (biased >> 11) | ((biased + 2) >> 11);
    bits = (bits << 52) + 0x3ff0000000000000ULL;  // 2^k
    double scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    out[i] = p * scale;
  }
  if (outside)
    for (int64_t i = 0; i < n; ++i)
      if (!(x[i] >= -708.0 && x[i] <= 709.0)) out[i] = std::exp(x[i]);
}

// A float token-shaped input (float32/float64/bfloat16/float16): padded [B, T] with a row
// stride, or packed [total] (row_stride 0, rows from cu_seqlens).
struct TokenInput {
  const void* data = nullptr;
  at::ScalarType type = at::kFloat;
  int64_t row_stride = 0;
};

// n values from element `begin` of `in` -> out, as double.
void load_chunk(const TokenInput& in, int64_t begin, int64_t n, double* out) {
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* p = static_cast<const T*>(in.data) + begin;
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<double>(p[i]);
  };
  switch (in.type) {
    case at::kFloat: return run(float{});
    case at::kDouble: return run(double{});
    case at::kBFloat16: return run(at::BFloat16{});
    case at::kHalf: return run(at::Half{});
    default: TORCH_CHECK(false, "rlkern.cpp_optimal_token_baseline: unsupported dtype ", in.type);
  }
}

// Backward pass over one row: g[t] = G_t, flags[t] = valid; returns the number of valid tokens.
// The running sum advances four tokens per add (the partial sums of a block are off the
// chain), so the loop is not bound by add latency; G then differs from the strict
// right-to-left order only in float64 rounding.
template <typename S, typename Valid>
int64_t otb_returns(const S* r, Valid valid, int64_t len, double* g, uint8_t* flags) {
  double running = 0.0;
  int64_t count = 0, t = len - 1;
  auto term = [r](int64_t u, bool ok) { return load(r[u]) * (ok ? 1.0 : 0.0); };
  for (; t >= 3; t -= 4) {
    const bool k3 = valid(t), k2 = valid(t - 1), k1 = valid(t - 2), k0 = valid(t - 3);
    const double y3 = term(t, k3), y2 = term(t - 1, k2), y1 = term(t - 2, k1), y0 = term(t - 3, k0);
    const double s2 = y3 + y2, s1 = s2 + y1, s0 = s1 + y0;
    g[t] = running + y3;
    g[t - 1] = running + s2;
    g[t - 2] = running + s1;
    running += s0;
    g[t - 3] = running;
    flags[t] = k3;
    flags[t - 1] = k2;
    flags[t - 2] = k1;
    flags[t - 3] = k0;
    count += int64_t{k3} + k2 + k1 + k0;
  }
  for (; t >= 0; --t) {
    const bool ok = valid(t);
    running += term(t, ok);
    g[t] = running;
    flags[t] = ok;
    count += ok;
  }
  return count;
}

struct OtbBatch {
  Rows rows;
  at::ScalarType value_type = at::kFloat, mask_type = at::kBool;
  const void* rewards = nullptr;
  const void* mask = nullptr;  // nullptr: every token valid
  TokenInput logp, sum_pi2, rho;
  bool has_rho = false, multi_turn = false, zero_tail = false;
  double eps = 0.0;
};

// G and valid flags of row b (length len) into g / flags; returns its valid count.
int64_t otb_row_returns(const OtbBatch& p, int64_t b, int64_t len, double* g, uint8_t* flags) {
  const Rows& rows = p.rows;
  if (!p.mask) {
    int64_t count = 0;
    dispatch_value_mask(p.value_type, at::kBool, [&](auto s, auto) {  // the mask type is unused here
      using S = decltype(s);
      const S* r = static_cast<const S*>(p.rewards) + rows.begin(b, rows.r_stride);
      count = otb_returns(r, [](int64_t) { return true; }, len, g, flags);
    });
    return count;
  }
  int64_t count = 0;
  dispatch_value_mask(p.value_type, p.mask_type, [&](auto s, auto m) {
    using S = decltype(s);
    using M = decltype(m);
    const S* r = static_cast<const S*>(p.rewards) + rows.begin(b, rows.r_stride);
    const M* mk = static_cast<const M*>(p.mask) + rows.begin(b, rows.m_stride);
    count = otb_returns(r, [mk](int64_t t) { return mk[t] != M(0); }, len, g, flags);
  });
  return count;
}

struct OtbScratch {
  std::vector<double> returns, num, den, w, q;
  std::vector<uint8_t> valid;
  std::vector<int64_t> offset, length, zero_from;
};

// Per-token baseline terms of row b (tokens [0, len), G in g, flags in v) added to num / den.
void otb_row_sums(const OtbBatch& p, int64_t b, int64_t len, const double* g, const uint8_t* v, OtbScratch& s) {
  double* w = s.w.data();
  double* q = s.q.data();
  double* num = s.num.data();
  double* den = s.den.data();
  double cumulative = 0.0;
  int64_t seen = 0;
  for (int64_t c0 = 0; c0 < len; c0 += kOtbChunk) {
    const int64_t n = std::min(kOtbChunk, len - c0);
    load_chunk(p.logp, p.rows.begin(b, p.logp.row_stride) + c0, n, q);
    exp_chunk(q, w, n);
    load_chunk(p.sum_pi2, p.rows.begin(b, p.sum_pi2.row_stride) + c0, n, q);
    for (int64_t i = 0; i < n; ++i) w[i] = (1.0 - 2.0 * w[i]) + q[i];
    if (p.has_rho) {
      load_chunk(p.rho, p.rows.begin(b, p.rho.row_stride) + c0, n, q);
      for (int64_t i = 0; i < n; ++i) w[i] *= q[i] * q[i];
    }
    // W advances four tokens per add, as G in otb_returns
    const double* gc = g + c0;
    const uint8_t* vc = v + c0;
    auto scan = [&](auto&& add) {
      int64_t i = 0;
      for (; i + 4 <= n; i += 4) {
        const double a0 = w[i] * (vc[i] ? 1.0 : 0.0), a1 = w[i + 1] * (vc[i + 1] ? 1.0 : 0.0);
        const double a2 = w[i + 2] * (vc[i + 2] ? 1.0 : 0.0), a3 = w[i + 3] * (vc[i + 3] ? 1.0 : 0.0);
        const double p1 = a0 + a1, p2 = p1 + a2, p3 = p2 + a3;
        add(i, cumulative + a0);
        add(i + 1, cumulative + p1);
        add(i + 2, cumulative + p2);
        cumulative += p3;
        add(i + 3, cumulative);
      }
      for (; i < n; ++i) {
        cumulative += w[i] * (vc[i] ? 1.0 : 0.0);
        add(i, cumulative);
      }
    };
    if (p.multi_turn) {
      scan([&](int64_t i, double big_w) {
        const double weighted = big_w * (vc[i] ? 1.0 : 0.0);
        seen += vc[i];
        const int64_t slot = seen > 0 ? seen - 1 : 0;
        num[slot] += gc[i] * weighted;
        den[slot] += weighted;
      });
    } else {
      double* nc = num + c0;
      double* dc = den + c0;
      scan([&](int64_t i, double big_w) {
        const double weighted = big_w * (vc[i] ? 1.0 : 0.0);
        nc[i] += gc[i] * weighted;
        dc[i] += weighted;
      });
    }
  }
}

// x where valid, else +0 (torch.where(valid, x, 0): also for x = inf / NaN), by a bit mask so
// that the loops vectorize.
inline float masked(float x, uint8_t valid) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  bits &= 0u - static_cast<uint32_t>(valid);
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

inline double masked(double x, uint8_t valid) {
  uint64_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  bits &= 0ull - static_cast<uint64_t>(valid);
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

// Outputs of row b: returns G, advantages (G - baseline) at valid tokens, 0 elsewhere; the
// baseline is 0 from slot `limit` on. O: float, or double for float64 rewards.
template <typename O>
void otb_row_outputs(bool multi_turn, int64_t len, const double* g, const uint8_t* v, const double* base,
                     int64_t limit, O* a, O* o) {
  for (int64_t t = 0; t < len; ++t) o[t] = static_cast<O>(g[t]);
  if (multi_turn) {
    int64_t seen = 0;
    for (int64_t t = 0; t < len; ++t) {
      seen += v[t];
      const int64_t slot = seen > 0 ? seen - 1 : 0;
      a[t] = masked(static_cast<O>(g[t] - (slot < limit ? base[slot] : 0.0)), v[t]);
    }
    return;
  }
  const int64_t cut = std::min(len, limit);
  for (int64_t t = 0; t < cut; ++t) a[t] = masked(static_cast<O>(g[t] - base[t]), v[t]);
  for (int64_t t = cut; t < len; ++t) a[t] = masked(o[t], v[t]);
}

// One group: members[0, n) (rows in batch order).
template <typename O>
void otb_group(const OtbBatch& p, const int64_t* members, int64_t n, OtbScratch& s, O* adv, O* ret) {
  const Rows& rows = p.rows;
  int64_t width = 1, tokens = 0;
  s.offset.resize(n + 1);
  for (int64_t k = 0; k < n; ++k) {
    s.offset[k] = tokens;
    const int64_t len = rows.length(members[k]);
    tokens += len;
    width = std::max(width, len);
  }
  s.offset[n] = tokens;
  s.returns.resize(tokens);
  s.valid.resize(tokens);
  s.num.assign(width, 0.0);
  s.den.assign(width, 0.0);
  s.length.resize(n);
  for (int64_t k = 0; k < n; ++k) {
    const int64_t b = members[k], len = rows.length(b);
    double* g = s.returns.data() + s.offset[k];
    uint8_t* v = s.valid.data() + s.offset[k];
    s.length[k] = otb_row_returns(p, b, len, g, v);
    otb_row_sums(p, b, len, g, v, s);
  }
  // zero_from per member: slots >= zero_from get baseline 0
  int64_t counted = 0, longest = -1;
  for (int64_t k = 0; k < n; ++k) {
    if (p.multi_turn && s.length[k] == 0) continue;
    ++counted;
    longest = std::max(longest, s.length[k]);
  }
  s.zero_from.assign(n, counted > 1 ? std::numeric_limits<int64_t>::max() : 0);
  if (p.zero_tail && counted > 1) {
    int64_t n_longest = 0, at = -1, second = -1;
    for (int64_t k = 0; k < n; ++k) {
      const bool member = !p.multi_turn || s.length[k] > 0;
      if (member && s.length[k] == longest) {
        ++n_longest;
        at = k;
      } else if (member) {
        second = std::max(second, s.length[k]);
      }
    }
    if (n_longest == 1) s.zero_from[at] = second;
  }
  double* base = s.num.data();
  for (int64_t t = 0; t < width; ++t) base[t] /= s.den[t] + p.eps;
  for (int64_t k = 0; k < n; ++k) {
    const int64_t b = members[k], begin = rows.begin(b, rows.T);
    otb_row_outputs(p.multi_turn, rows.length(b), s.returns.data() + s.offset[k], s.valid.data() + s.offset[k], base,
                    s.zero_from[k], adv + begin, ret + begin);
  }
}

TokenInput float_input(const at::Tensor& t, const at::Tensor& rewards, const char* name) {
  check_like(t, rewards, name);
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf,
              "rlkern.cpp_optimal_token_baseline: ", name, " must be float32/float64/bfloat16/float16, "
              "got ", s);
  return {t.data_ptr(), s, row_stride(t)};
}

// rewards float32/float64/bfloat16/float16 [B, T], or packed
// [total] with cu_seqlens int32 [B + 1]; mask (None: every token valid; nonzero = valid),
// old_log_probs, sum_pi_squared, rollout_is_weights (optional): rewards' shape, any float dtype,
// last dim contiguous; inverse [B] int64 dense group numbers in [0, B). Returns (advantages,
// returns) of rewards' shape, float32 (float64 for float64 rewards: read, summed and written in double).
std::tuple<at::Tensor, at::Tensor> otb_cpu(const at::Tensor& rewards, const std::optional<at::Tensor>& mask,
                                           const at::Tensor& inverse, const at::Tensor& old_log_probs,
                                           const at::Tensor& sum_pi_squared,
                                           const std::optional<at::Tensor>& rollout_is_weights,
                                           const std::optional<at::Tensor>& cu_seqlens, bool handle_zero_tail,
                                           double eps, bool multi_turn) {
  const char* op = "rlkern.cpp_optimal_token_baseline";
  OtbBatch p;
  at::Tensor cu_holder, mask_holder;
  p.rows = make_rows(rewards, cu_seqlens, cu_holder);
  const int64_t B = p.rows.B;
  TORCH_CHECK(inverse.dim() == 1 && inverse.size(0) == B && inverse.scalar_type() == at::kLong &&
                  inverse.device().is_cpu(),
              op, ": inverse must be int64 [", B, "], got ", inverse.scalar_type(), " ", inverse.sizes());
  check_like(rewards, rewards, "rewards");
  p.value_type = rewards.scalar_type();
  p.rewards = rewards.data_ptr();
  p.rows.r_stride = row_stride(rewards);
  if (mask.has_value()) {
    check_like(*mask, rewards, "mask");
    // half-precision masks (rare) as bool: the row kernels read bool/int/float32/float64 masks
    mask_holder = mask->scalar_type() == at::kHalf || mask->scalar_type() == at::kBFloat16 ? mask->ne(0) : *mask;
    p.mask = mask_holder.data_ptr();
    p.mask_type = mask_holder.scalar_type();
    p.rows.m_stride = row_stride(mask_holder);
  }
  p.logp = float_input(old_log_probs, rewards, "old_log_probs");
  p.sum_pi2 = float_input(sum_pi_squared, rewards, "sum_pi_squared");
  p.has_rho = rollout_is_weights.has_value();
  if (p.has_rho) p.rho = float_input(*rollout_is_weights, rewards, "rollout_is_weights");
  p.multi_turn = multi_turn;
  p.zero_tail = handle_zero_tail;
  p.eps = eps;
  const auto opts = rewards.options().dtype(out_type(rewards));
  at::Tensor adv = empty_output(rewards.sizes(), opts), ret = empty_output(rewards.sizes(), opts);
  if (B == 0) return {adv, ret};
  // counting sort of the rows by group: group g's members are order[start[g], start[g + 1])
  const at::Tensor inv = inverse.contiguous();
  const int64_t* group = inv.data_ptr<int64_t>();
  std::vector<int64_t> start(B + 1, 0), order(B), groups;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(group[b] >= 0 && group[b] < B, op, ": group numbers must lie in [0, ", B, "), got ", group[b]);
    ++start[group[b] + 1];
  }
  for (int64_t g = 0; g < B; ++g) {
    if (start[g + 1] > 0) groups.push_back(g);
    start[g + 1] += start[g];
  }
  std::vector<int64_t> next(start.begin(), start.end() - 1);
  for (int64_t b = 0; b < B; ++b) order[next[group[b]]++] = b;
  auto run = [&](auto tag) {
    using O = decltype(tag);
    O* a = adv.data_ptr<O>();
    O* o = ret.data_ptr<O>();
    at::parallel_for(0, static_cast<int64_t>(groups.size()), 1, [&](int64_t i0, int64_t i1) {
      OtbScratch scratch;
      scratch.w.resize(kOtbChunk);
      scratch.q.resize(kOtbChunk);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t g = groups[i];
        otb_group<O>(p, order.data() + start[g], start[g + 1] - start[g], scratch, a, o);
      }
    });
  };
  if (rewards.scalar_type() == at::kDouble)
    run(double{});
  else
    run(float{});
  return {adv, ret};
}

// ReMax (the op layer's _remax_op), per row right to left in double, O the output type:
//   m_t = the mask's value as O (a weight, not mask != 0),  G_t = sum_{u >= t} r_u m_t,
//   returns_t = O(G_t),  adv_t = returns_t - O(baseline_b) * m_t, rounded in O as the op layer.
// A packed segment sums within itself (the op layer's PyTorch path takes differences of one
// batch-wide suffix sum: the same numbers up to float64 rounding of the batch total).
template <typename S, typename M, typename O = OutOf<S>>
void remax_rows(const Rows& rows, const S* r, const M* mk, const O* base, O* a, O* o) {
  at::parallel_for(0, rows.B, row_grain(rows.T), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const S* rr = r + rows.begin(b, rows.r_stride);
      const M* mm = mk + rows.begin(b, rows.m_stride);
      O* aa = a + rows.begin(b, rows.T);
      O* oo = o + rows.begin(b, rows.T);
      const O bb = base[b];
      double running = 0.0;
      for (int64_t t = rows.length(b) - 1; t >= 0; --t) {
        const O m = static_cast<O>(mm[t]);
        running += static_cast<double>(rr[t]) * static_cast<double>(m);
        const O ret = static_cast<O>(running);
        oo[t] = ret;
        aa[t] = ret - bb * m;
      }
    }
  });
}

// rewards float32/float64/bfloat16/float16 [B, T], or packed [total] with cu_seqlens int32
// [B + 1]; reward_baselines [B] any float dtype; mask: rewards' shape, any mask dtype. Returns
// (advantages, returns) of rewards' shape, float32 (float64 for float64 rewards).
std::tuple<at::Tensor, at::Tensor> remax_cpu(const at::Tensor& rewards, const at::Tensor& reward_baselines,
                                             const at::Tensor& mask, const std::optional<at::Tensor>& cu_seqlens) {
  const char* op = "rlkern.cpp_remax";
  at::Tensor cu_holder;
  Rows rows = make_rows(rewards, cu_seqlens, cu_holder);
  check_like(rewards, rewards, "rewards");
  check_like(mask, rewards, "mask");
  TORCH_CHECK(reward_baselines.dim() == 1 && reward_baselines.size(0) == rows.B && reward_baselines.device().is_cpu(),
              op, ": reward_baselines must be a CPU tensor [", rows.B, "], got ", reward_baselines.sizes());
  check_float_input(reward_baselines, "reward_baselines");
  rows.r_stride = row_stride(rewards);
  rows.m_stride = row_stride(mask);
  const auto opts = rewards.options().dtype(out_type(rewards));
  at::Tensor adv = empty_output(rewards.sizes(), opts), ret = empty_output(rewards.sizes(), opts);
  if (rewards.numel() == 0) return {adv, ret};
  const at::Tensor base = reward_baselines.to(out_type(rewards)).contiguous();
  dispatch_value_mask(rewards.scalar_type(), mask.scalar_type(), [&](auto s, auto m) {
    using S = decltype(s);
    using M = decltype(m);
    using O = OutOf<S>;
    remax_rows<S, M>(rows, rewards.data_ptr<S>(), mask.data_ptr<M>(), base.data_ptr<O>(), adv.data_ptr<O>(),
                     ret.data_ptr<O>());
  });
  return {adv, ret};
}

// Dense group numbers inv [N] -> per-group counts (checked to lie in [0, N)).
std::vector<double> group_counts(const int64_t* inv, int64_t N, const char* op) {
  std::vector<double> count(N, 0.0);
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK(inv[i] >= 0 && inv[i] < N, op, ": group numbers must lie in [0, ", N, "), got ", inv[i]);
    count[inv[i]] += 1.0;
  }
  return count;
}

// Pass@k GRPO (the op layer's _passk_op), per group in double: the group's best sample (the
// first at the maximum) gets gap = max - second max, divided by (unbiased std + eps) with
// norm_by_std; every other sample 0. Maxima propagate NaN, as torch's amax. A group of fewer than
// 2 samples raises ValueError (the op layer's message).
template <typename S>
void passk_values(const S* x, const int64_t* inv, int64_t N, double eps, bool norm_by_std, double* value) {
  const std::vector<double> count = group_counts(inv, N, "rlkern.cpp_grpo_passk");
  double smallest = std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < N; ++i) smallest = std::min(smallest, count[inv[i]]);
  TORCH_CHECK_VALUE(N == 0 || smallest >= 2.0, "grpo_passk: every group needs at least 2 samples (Pass@k compares "
                    "the best two); smallest group has ", static_cast<int64_t>(smallest));
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<double> mean(N, 0.0), m2(N, 0.0), best(N, -inf), second(N, -inf);
  std::vector<int64_t> first(N, N);
  auto nan_max = [](double a, double b) { return std::isnan(a) || std::isnan(b) ? std::nan("") : std::max(a, b); };
  for (int64_t i = 0; i < N; ++i) {
    mean[inv[i]] += load(x[i]);
    best[inv[i]] = nan_max(best[inv[i]], load(x[i]));
  }
  for (int64_t g = 0; g < N; ++g) mean[g] /= std::max(count[g], 1.0);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t g = inv[i];
    const double xi = load(x[i]), d = xi - mean[g];
    m2[g] += d * d;
    if (xi == best[g] && first[g] == N) first[g] = i;
  }
  for (int64_t i = 0; i < N; ++i)
    if (first[inv[i]] != i) second[inv[i]] = nan_max(second[inv[i]], load(x[i]));
  for (int64_t i = 0; i < N; ++i) {
    const int64_t g = inv[i];
    double gap = best[g] - second[g];
    if (norm_by_std) gap /= std::sqrt(m2[g] / std::max(count[g] - 1.0, 1.0)) + eps;
    value[i] = first[g] == i ? gap : 0.0;
  }
}

// scores [N] float32/float64/bfloat16/float16, inverse [N] int64 dense group numbers -> [N]
// float32 (float64 for float64 scores).
at::Tensor passk_cpu(const at::Tensor& scores, const at::Tensor& inverse, double eps, bool norm_by_std) {
  const char* op = "rlkern.cpp_grpo_passk";
  check_group_inputs(scores, inverse, std::nullopt, std::nullopt, op);
  const int64_t N = scores.size(0);
  const at::Tensor inv = inverse.contiguous();
  std::vector<double> value(N);
  dispatch_scores(scores, op, [&](const auto* x) {
    passk_values(x, inv.data_ptr<int64_t>(), N, eps, norm_by_std, value.data());
  });
  return group_output(scores, value, std::nullopt, std::nullopt, op);
}

// Python's repr of a finite double (the op layer's f-string, so that the C++ message is the same):
// the shortest digits that read back to x, positional for decimal exponents in [-4, 16), else
// d.ddde+XX.
std::string python_repr(double x) {
  if (x == 0.0) return std::signbit(x) ? "-0.0" : "0.0";
  char buf[48];
  for (int digits = 1; digits <= 17; ++digits) {
    std::snprintf(buf, sizeof(buf), "%.*e", digits - 1, x);
    if (std::strtod(buf, nullptr) == x) break;
  }
  std::string text(buf);
  const bool negative = text[0] == '-';
  if (negative) text.erase(0, 1);
  const size_t e = text.find('e');
  const int exponent = std::atoi(text.c_str() + e + 1);
  std::string digits;
  for (size_t i = 0; i < e; ++i)
    if (text[i] != '.') digits += text[i];
  while (digits.size() > 1 && digits.back() == '0') digits.pop_back();
  std::string out;
  if (exponent >= 16 || exponent < -4) {
    out = digits.substr(0, 1) + (digits.size() > 1 ? "." + digits.substr(1) : "");
    std::snprintf(buf, sizeof(buf), "e%c%02d", exponent < 0 ? '-' : '+', std::abs(exponent));
    out += buf;
  } else if (exponent < 0) {
    out = "0." + std::string(-exponent - 1, '0') + digits;
  } else if (static_cast<int>(digits.size()) <= exponent + 1) {
    out = digits + std::string(exponent + 1 - digits.size(), '0') + ".0";
  } else {
    out = digits.substr(0, exponent + 1) + "." + digits.substr(exponent + 1);
  }
  return negative ? "-" + out : out;
}

// torch.xlogy: 0 where x == 0 (unless y is NaN), else x log(y).
inline double xlogy(double x, double y) { return std::isnan(y) ? y : x == 0.0 ? 0.0 : x * std::log(y); }

// BNPO (the op layer's _bnpo_op), in double: s = (x - min_value) / (max_value - min_value),
// p_g = the group's mean of s (0 for a group of one; outside [0, 1] raises ValueError with the op
// layer's message), mu / var = mean and unbiased variance of p over the groups (0 / 1 with one
// group), k = mu (1 - mu) / var - 1, alpha = max(1 + k mu / 3, 1), beta = max(1 + k (1 - mu) / 3, 1),
// weight_g = clamp(1 / BetaPDF(p_g; alpha, beta), 0, 1e6) (1 where var <= 0), value = weight (s - p).
template <typename S>
void bnpo_values(const S* x, const int64_t* inv, int64_t N, double min_value, double max_value, double* value) {
  const std::vector<double> count = group_counts(inv, N, "rlkern.cpp_bnpo");
  const double range = max_value - min_value;
  std::vector<double> p(N, 0.0), weight(N, 1.0);
  std::vector<int64_t> reps;  // the groups, in the order of their first samples
  std::vector<uint8_t> seen(N, 0);
  for (int64_t i = 0; i < N; ++i) {
    p[inv[i]] += (load(x[i]) - min_value) / range;
    if (!seen[inv[i]]) {
      seen[inv[i]] = 1;
      reps.push_back(inv[i]);
    }
  }
  bool outside = false;
  for (const int64_t g : reps) {
    p[g] = count[g] > 1.0 ? p[g] / count[g] : 0.0;
    outside |= p[g] < 0.0 || p[g] > 1.0;
  }
  TORCH_CHECK_VALUE(!outside, "bnpo: group success rates must lie in [0, 1] after (s - ", python_repr(min_value),
                    ") / (", python_repr(max_value), " - ", python_repr(min_value), "); adjust min_value/max_value");
  const double groups = static_cast<double>(reps.size());
  double mu = 0.0, var = 1.0;
  if (groups > 1.0) {
    double total = 0.0, ss = 0.0;
    for (const int64_t g : reps) total += p[g];
    mu = total / groups;
    for (const int64_t g : reps) ss += (p[g] - mu) * (p[g] - mu);
    var = ss / (groups - 1.0);
  }
  if (var > 0.0) {
    const double k = mu * (1.0 - mu) / var - 1.0;
    // std::max(NaN, 1) is NaN, as torch.clamp
    const double alpha = std::max(1.0 + k * mu / 3.0, 1.0), beta = std::max(1.0 + k * (1.0 - mu) / 3.0, 1.0);
    const double log_norm = std::lgamma(alpha) + std::lgamma(beta) - std::lgamma(alpha + beta);
    for (const int64_t g : reps) {
      const double log_pdf = xlogy(alpha - 1.0, p[g]) + xlogy(beta - 1.0, 1.0 - p[g]) - log_norm;
      const double w = std::exp(-log_pdf);
      weight[g] = std::isnan(w) ? w : std::min(std::max(w, 0.0), 1e6);
    }
  }
  for (int64_t i = 0; i < N; ++i) value[i] = weight[inv[i]] * ((load(x[i]) - min_value) / range - p[inv[i]]);
}

// scores [N] float32/float64/bfloat16/float16, inverse [N] int64 dense group numbers -> [N]
// float32 (float64 for float64 scores).
at::Tensor bnpo_cpu(const at::Tensor& scores, const at::Tensor& inverse, double min_value, double max_value) {
  const char* op = "rlkern.cpp_bnpo";
  check_group_inputs(scores, inverse, std::nullopt, std::nullopt, op);
  TORCH_CHECK(max_value > min_value, op, ": max_value must exceed min_value");
  const int64_t N = scores.size(0);
  const at::Tensor inv = inverse.contiguous();
  std::vector<double> value(N);
  dispatch_scores(scores, op, [&](const auto* x) {
    bnpo_values(x, inv.data_ptr<int64_t>(), N, min_value, max_value, value.data());
  });
  return group_output(scores, value, std::nullopt, std::nullopt, op);
}

// Meta: shapes only.
std::tuple<at::Tensor, at::Tensor> gae_meta(const at::Tensor& rewards, const at::Tensor&, const at::Tensor&,
                                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double,
                                            double) {
  auto opts = rewards.options().dtype(out_type(rewards));
  return {at::empty(rewards.sizes(), opts), at::empty(rewards.sizes(), opts)};
}

at::Tensor discounted_meta(const at::Tensor& rewards, const at::Tensor&, const std::optional<at::Tensor>&, double) {
  return at::empty(rewards.sizes(), rewards.options().dtype(out_type(rewards)));
}

at::Tensor whiten_meta(const at::Tensor& values, const at::Tensor&, bool, bool) {
  return at::empty(values.sizes(), values.options());
}

at::Tensor broadcast_meta(const at::Tensor& scores, const at::Tensor& mask, const std::optional<at::Tensor>&) {
  return at::empty(mask.sizes(), scores.options());
}

at::Tensor group_index_joined_meta(const at::Tensor& joined, int64_t n) {
  return at::empty({n}, joined.options().dtype(at::kLong));
}

at::Tensor group_normalize_meta(const at::Tensor& scores, const at::Tensor&, const std::optional<at::Tensor>& mask,
                                const std::optional<at::Tensor>&, double, c10::string_view, c10::string_view,
                                c10::string_view, bool) {
  const auto opts = scores.options().dtype(out_type(scores));
  return mask.has_value() ? at::empty(mask->sizes(), opts) : at::empty(scores.sizes(), opts);
}

at::Tensor group_baseline_meta(const at::Tensor& scores, const at::Tensor&, const std::optional<at::Tensor>&,
                               const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>&,
                               c10::string_view, double) {
  const auto opts = scores.options().dtype(out_type(scores));
  return mask.has_value() ? at::empty(mask->sizes(), opts) : at::empty(scores.sizes(), opts);
}

at::Tensor group_index_meta(const at::Tensor& keys, const std::optional<at::Tensor>& offsets) {
  const int64_t N = offsets.has_value() ? offsets->size(0) - 1 : keys.size(0);
  return at::empty({N}, keys.options().dtype(at::kLong));
}

std::tuple<at::Tensor, at::Tensor> otb_meta(const at::Tensor& rewards, const std::optional<at::Tensor>&,
                                            const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool,
                                            double, bool) {
  const auto opts = rewards.options().dtype(out_type(rewards));
  return {at::empty(rewards.sizes(), opts), at::empty(rewards.sizes(), opts)};
}


std::tuple<at::Tensor, at::Tensor> remax_meta(const at::Tensor& rewards, const at::Tensor&, const at::Tensor&,
                                              const std::optional<at::Tensor>&) {
  const auto opts = rewards.options().dtype(out_type(rewards));
  return {at::empty(rewards.sizes(), opts), at::empty(rewards.sizes(), opts)};
}

at::Tensor passk_meta(const at::Tensor& scores, const at::Tensor&, double, bool) {
  return at::empty(scores.sizes(), scores.options().dtype(out_type(scores)));
}

at::Tensor bnpo_meta(const at::Tensor& scores, const at::Tensor&, double, double) {
  return at::empty(scores.sizes(), scores.options().dtype(out_type(scores)));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rlkern, m) {
  m.def("cpp_gae(Tensor rewards, Tensor values, Tensor mask, Tensor? bootstrap, Tensor? cu_seqlens, "
        "float gamma, float lam) -> (Tensor, Tensor)");
  m.def("cpp_discounted_returns(Tensor rewards, Tensor mask, Tensor? cu_seqlens, float gamma) -> Tensor");
  m.def("cpp_group_index(Tensor keys, Tensor? offsets) -> Tensor");
  m.def("cpp_masked_whiten(Tensor values, Tensor mask, bool shift_mean, bool zero_masked) -> Tensor");
  m.def("cpp_outcome_to_tokens(Tensor scores, Tensor mask, Tensor? cu_seqlens=None) -> Tensor");
  m.def("cpp_group_index_joined(Tensor joined, int n) -> Tensor");
  m.def("cpp_group_normalize(Tensor scores, Tensor inverse, Tensor? mask, Tensor? cu_seqlens, "
        "float eps, str std, str scale, str singleton, bool skip_nan=False) -> Tensor");
  m.def("cpp_group_baseline(Tensor scores, Tensor inverse, Tensor? weights, Tensor? mask, "
        "Tensor? cu_seqlens, str mode, float param) -> Tensor");
  m.def("cpp_optimal_token_baseline(Tensor rewards, Tensor? mask, Tensor inverse, Tensor old_logprobs, "
        "Tensor sum_pi_squared, Tensor? rollout_is_weights, Tensor? cu_seqlens, bool handle_zero_tail, float eps, "
        "bool multi_turn) -> (Tensor, Tensor)");
  m.def("cpp_remax(Tensor rewards, Tensor reward_baselines, Tensor mask, Tensor? cu_seqlens) -> "
        "(Tensor, Tensor)");
  m.def("cpp_grpo_passk(Tensor scores, Tensor inverse, float eps, bool norm_by_std) -> Tensor");
  m.def("cpp_bnpo(Tensor scores, Tensor inverse, float min_value, float max_value) -> Tensor");
}

TORCH_LIBRARY_IMPL(rlkern, CPU, m) {
  m.impl("cpp_gae", &gae_cpu);
  m.impl("cpp_discounted_returns", &discounted_cpu);
  m.impl("cpp_group_index", &group_index_cpu);
  m.impl("cpp_masked_whiten", &whiten_cpu);
  m.impl("cpp_outcome_to_tokens", &broadcast_cpu);
  m.impl("cpp_group_index_joined", &group_index_joined_cpu);
  m.impl("cpp_group_normalize", &group_normalize_cpu);
  m.impl("cpp_group_baseline", &group_baseline_cpu);
  m.impl("cpp_optimal_token_baseline", &otb_cpu);
  m.impl("cpp_remax", &remax_cpu);
  m.impl("cpp_grpo_passk", &passk_cpu);
  m.impl("cpp_bnpo", &bnpo_cpu);
}

TORCH_LIBRARY_IMPL(rlkern, Meta, m) {
  m.impl("cpp_gae", &gae_meta);
  m.impl("cpp_discounted_returns", &discounted_meta);
  m.impl("cpp_group_index", &group_index_meta);
  m.impl("cpp_masked_whiten", &whiten_meta);
  m.impl("cpp_outcome_to_tokens", &broadcast_meta);
  m.impl("cpp_group_index_joined", &group_index_joined_meta);
  m.impl("cpp_group_normalize", &group_normalize_meta);
  m.impl("cpp_group_baseline", &group_baseline_meta);
  m.impl("cpp_optimal_token_baseline", &otb_meta);
  m.impl("cpp_remax", &remax_meta);
  m.impl("cpp_grpo_passk", &passk_meta);
  m.impl("cpp_bnpo", &bnpo_meta);
}
