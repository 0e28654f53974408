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
//               next_value starts at bootstrap[b] (EGAE) or 0.
//   discounted: running = r_t + gamma * running at valid t, carried across masked t;
//               ret_t = running at valid t, 0 at masked t (verl's REINFORCE++ returns).
//   group_index: dense group numbers (first-occurrence order) for N keys, each a row of
//               integers (int64 ids: one; numpy '<U' strings: W UCS4 code points; Python
//               strings: their UTF-32 code points, concatenated, with offsets). One
//               sequential pass with an open-addressing table on a 64-bit row hash and exact
//               row comparison, plus a fast path for a key equal to the previous one (GRPO
//               batches store each group's samples next to each other).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

namespace {

void check_float_input(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf, "rlkern.advantages: ", name,
              " must be float32/bfloat16/float16, got ", s);
}

// Grain: a few rows per task; each row is a serial scan of T steps.
int64_t row_grain(int64_t T) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(T, 1)); }

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

template <typename S, typename M>
void gae_rows(const Rows& rows, const S* r, const S* v, const M* mk, const float* bootstrap, double gamma, double lam,
              float* a, float* o) {
  const double gl = gamma * lam;
  at::parallel_for(0, rows.B, row_grain(rows.T), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const S* rr = r + rows.begin(b, rows.r_stride);
      const S* vv = v + rows.begin(b, rows.v_stride);
      const M* mm = mk + rows.begin(b, rows.m_stride);
      float* aa = a + rows.begin(b, rows.T);
      float* oo = o + rows.begin(b, rows.T);
      double next_value = bootstrap ? static_cast<double>(bootstrap[b]) : 0.0;
      double last = 0.0;
      for (int64_t t = rows.length(b) - 1; t >= 0; --t) {
        if (valid(mm, t)) {
          const double vt = static_cast<double>(static_cast<float>(vv[t]));
          last = static_cast<double>(static_cast<float>(rr[t])) + gamma * next_value - vt + gl * last;
          next_value = vt;
          aa[t] = static_cast<float>(last);
          oo[t] = static_cast<float>(last + vt);
        } else {
          aa[t] = 0.f;
          oo[t] = 0.f;
        }
      }
    }
  });
}

template <typename S, typename M>
void discounted_rows(const Rows& rows, const S* r, const M* mk, double gamma, float* o) {
  at::parallel_for(0, rows.B, row_grain(rows.T), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const S* rr = r + rows.begin(b, rows.r_stride);
      const M* mm = mk + rows.begin(b, rows.m_stride);
      float* oo = o + rows.begin(b, rows.T);
      double running = 0.0;
      for (int64_t t = rows.length(b) - 1; t >= 0; --t) {
        if (valid(mm, t)) {
          running = static_cast<double>(static_cast<float>(rr[t])) + gamma * running;
          oo[t] = static_cast<float>(running);
        } else {
          oo[t] = 0.f;
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
    switch (mask_type) {
      case at::kBool: return f(S{}, bool{});
      case at::kByte: return f(S{}, uint8_t{});
      case at::kInt: return f(S{}, int32_t{});
      case at::kLong: return f(S{}, int64_t{});
      case at::kFloat: return f(S{}, float{});
      case at::kDouble: return f(S{}, double{});
      default: TORCH_CHECK(false, "rlkern.advantages: mask must be bool/uint8/int32/int64/float32/float64, got ",
                           mask_type);
    }
  };
  switch (value_type) {
    case at::kFloat: return with_mask(float{});
    case at::kBFloat16: return with_mask(at::BFloat16{});
    case at::kHalf: return with_mask(at::Half{});
    default: TORCH_CHECK(false, "rlkern.advantages: unsupported value dtype ", value_type);
  }
}

const float* bootstrap_ptr(const std::optional<at::Tensor>& bootstrap, int64_t B, at::Tensor& holder) {
  if (!bootstrap.has_value()) return nullptr;
  TORCH_CHECK(bootstrap->dim() == 1 && bootstrap->size(0) == B, "rlkern.advantages: bootstrap must be [", B,
              "], got ", bootstrap->sizes());
  holder = bootstrap->to(at::kFloat).contiguous();
  return holder.data_ptr<float>();
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
  TORCH_CHECK(t.numel() <= 1 || t.stride(-1) == 1, "rlkern.advantages: ", name, " needs a contiguous last dim");
}

int64_t row_stride(const at::Tensor& t) { return t.dim() == 2 ? t.stride(0) : 0; }

std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                           const at::Tensor& mask, const std::optional<at::Tensor>& bootstrap,
                                           const std::optional<at::Tensor>& cu_seqlens, double gamma, double lam) {
  at::Tensor cu_holder;
  Rows rows = make_rows(rewards, cu_seqlens, cu_holder);
  check_like(values, rewards, "values");
  check_like(mask, rewards, "mask");
  TORCH_CHECK(values.scalar_type() == rewards.scalar_type(), "rlkern.advantages_gae_kernel: values dtype ",
              values.scalar_type(), " != rewards dtype ", rewards.scalar_type());
  rows.r_stride = row_stride(rewards);
  rows.v_stride = row_stride(values);
  rows.m_stride = row_stride(mask);
  auto opts = rewards.options().dtype(at::kFloat);
  at::Tensor adv = at::empty(rewards.sizes(), opts), ret = at::empty(rewards.sizes(), opts);
  if (rewards.numel() == 0) return {adv, ret};
  at::Tensor holder;
  const float* boot = bootstrap_ptr(bootstrap, rows.B, holder);
  dispatch_value_mask(rewards.scalar_type(), mask.scalar_type(), [&](auto s, auto m) {
    using S = decltype(s);
    using M = decltype(m);
    gae_rows<S, M>(rows, rewards.data_ptr<S>(), values.data_ptr<S>(), mask.data_ptr<M>(), boot, gamma, lam,
                   adv.data_ptr<float>(), ret.data_ptr<float>());
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
  at::Tensor ret = at::empty(rewards.sizes(), rewards.options().dtype(at::kFloat));
  if (rewards.numel() == 0) return ret;
  dispatch_value_mask(rewards.scalar_type(), mask.scalar_type(), [&](auto s, auto m) {
    using S = decltype(s);
    using M = decltype(m);
    discounted_rows<S, M>(rows, rewards.data_ptr<S>(), mask.data_ptr<M>(), gamma, ret.data_ptr<float>());
  });
  return ret;
}

// Masked whitening (verl's masked_whiten) over all elements of x with float64 statistics:
// mean = sum / (n + 1e-8), var = sum (x - mean)^2 / (n + 1e-8) * n / (n - 1),
// out = (x - mean) / sqrt(var + 1e-8) (+ mean unless shift_mean), 0 at masked if zero_masked.
template <typename M>
void whiten_flat(const float* x, const M* m, int64_t n, bool shift_mean, bool zero_masked, float* out) {
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
      out[i] = keep ? static_cast<float>((x[i] - mean) * rstd + add) : 0.f;
    }
  });
}

template <typename F>
void dispatch_mask(at::ScalarType mask_type, F&& f) {
  switch (mask_type) {
    case at::kBool: return f(bool{});
    case at::kByte: return f(uint8_t{});
    case at::kInt: return f(int32_t{});
    case at::kLong: return f(int64_t{});
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    default: TORCH_CHECK(false, "rlkern.advantages: mask must be bool/uint8/int32/int64/float32/float64, got ",
                         mask_type);
  }
}

at::Tensor whiten_cpu(const at::Tensor& values, const at::Tensor& mask, bool shift_mean, bool zero_masked) {
  TORCH_CHECK(values.scalar_type() == at::kFloat, "rlkern.advantages_whiten_kernel: values must be float32, got ",
              values.scalar_type());
  TORCH_CHECK(values.sizes() == mask.sizes(), "rlkern.advantages_whiten_kernel: mask must have the shape of values ",
              values.sizes(), ", got ", mask.sizes());
  TORCH_CHECK(values.device().is_cpu() && mask.device().is_cpu(), "rlkern.advantages_whiten_kernel: CPU tensors only");
  const at::Tensor x = values.contiguous();
  const at::Tensor mk = mask.contiguous();
  at::Tensor out = at::empty(values.sizes(), values.options());
  dispatch_mask(mk.scalar_type(), [&](auto tag) {
    using M = decltype(tag);
    whiten_flat<M>(x.data_ptr<float>(), mk.data_ptr<M>(), x.numel(), shift_mean, zero_masked, out.data_ptr<float>());
  });
  return out;
}

// Outcome score of each row times its mask: out[b, t] = scores[b] * mask[b, t] (verl's
// scores.unsqueeze(-1) * response_mask, one pass).
at::Tensor broadcast_cpu(const at::Tensor& scores, const at::Tensor& mask) {
  TORCH_CHECK(scores.dim() == 1 && scores.scalar_type() == at::kFloat,
              "rlkern.advantages_broadcast_kernel: scores must be float32 [B], got ", scores.scalar_type(), " ",
              scores.sizes());
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == scores.size(0),
              "rlkern.advantages_broadcast_kernel: mask must be [B, T], got ", mask.sizes());
  const at::Tensor s = scores.contiguous();
  const at::Tensor mk = mask.contiguous();
  const int64_t B = mk.size(0), T = mk.size(1);
  at::Tensor out = at::empty({B, T}, scores.options());
  dispatch_mask(mk.scalar_type(), [&](auto tag) {
    using M = decltype(tag);
    const M* m = mk.data_ptr<M>();
    const float* sp = s.data_ptr<float>();
    float* o = out.data_ptr<float>();
    at::parallel_for(0, B, row_grain(T), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t t = 0; t < T; ++t) o[b * T + t] = sp[b] * static_cast<float>(m[b * T + t]);
    });
  });
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
// [offsets[i], offsets[i+1]) (strings of any length, concatenated).
template <typename K>
void group_index_rows(const K* keys, const int64_t* offsets, int64_t N, int64_t W, int64_t* out) {
  auto start = [&](int64_t i) { return offsets ? offsets[i] : i * W; };
  auto len = [&](int64_t i) { return offsets ? offsets[i + 1] - offsets[i] : W; };
  auto same = [&](int64_t i, int64_t j) {
    const int64_t n = len(i);
    return n == len(j) && std::memcmp(keys + start(i), keys + start(j), n * sizeof(K)) == 0;
  };
  int64_t cap = 16;
  while (cap < 2 * N) cap <<= 1;
  std::vector<int64_t> slot_rep(cap, -1);  // sample index representing the group in this slot
  std::vector<int64_t> rep_group(N);       // group number of a representative sample
  int64_t groups = 0;
  for (int64_t i = 0; i < N; ++i) {
    if (i > 0 && same(i, i - 1)) {
      out[i] = out[i - 1];
      continue;
    }
    const uint64_t h = hash_bytes(reinterpret_cast<const unsigned char*>(keys + start(i)), len(i) * sizeof(K));
    int64_t s = static_cast<int64_t>(h & static_cast<uint64_t>(cap - 1));
    while (true) {
      const int64_t rep = slot_rep[s];
      if (rep < 0) {
        slot_rep[s] = i;
        rep_group[i] = groups;
        out[i] = groups++;
        break;
      }
      if (same(rep, i)) {
        out[i] = rep_group[rep];
        break;
      }
      s = (s + 1) & (cap - 1);
    }
  }
}

// keys [N] or [N, W] (one row per sample), or with offsets [N + 1] int64: keys [total], row i
// = keys[offsets[i]:offsets[i + 1]].
at::Tensor group_index_cpu(const at::Tensor& keys, const std::optional<at::Tensor>& offsets) {
  TORCH_CHECK(keys.device().is_cpu(), "rlkern.advantages_group_index_kernel: keys must be a CPU tensor");
  at::Tensor k, off;
  int64_t N, W = 0;
  if (offsets.has_value()) {
    TORCH_CHECK(keys.dim() == 1, "rlkern.advantages_group_index_kernel: ragged keys must be [total], got ", keys.sizes());
    TORCH_CHECK(offsets->dim() == 1 && offsets->size(0) >= 1 && offsets->scalar_type() == at::kLong,
                "rlkern.advantages_group_index_kernel: offsets must be int64 [N + 1], got ", offsets->sizes(), " ",
                offsets->scalar_type());
    k = keys.contiguous();
    off = offsets->contiguous();
    N = off.size(0) - 1;
    const int64_t* o = off.data_ptr<int64_t>();
    TORCH_CHECK(o[0] == 0 && o[N] == k.numel(), "rlkern.advantages_group_index_kernel: offsets must run from 0 to ",
                k.numel());
    for (int64_t i = 0; i < N; ++i)
      TORCH_CHECK(o[i + 1] >= o[i], "rlkern.advantages_group_index_kernel: offsets must be non-decreasing");
  } else {
    TORCH_CHECK(keys.dim() == 1 || keys.dim() == 2,
                "rlkern.advantages_group_index_kernel: keys must be [N] or [N, W], got ", keys.sizes());
    k = keys.dim() == 1 ? keys.reshape({-1, 1}).contiguous() : keys.contiguous();
    N = k.size(0);
    W = k.size(1);
  }
  at::Tensor out = at::empty({N}, keys.options().dtype(at::kLong));
  if (N == 0) return out;
  int64_t* o = out.data_ptr<int64_t>();
  const int64_t* offs = off.defined() ? off.data_ptr<int64_t>() : nullptr;
  switch (k.scalar_type()) {
    case at::kLong: group_index_rows(k.data_ptr<int64_t>(), offs, N, W, o); break;
    case at::kInt: group_index_rows(k.data_ptr<int32_t>(), offs, N, W, o); break;
    case at::kByte: group_index_rows(k.data_ptr<uint8_t>(), offs, N, W, o); break;
    default: TORCH_CHECK(false, "rlkern.advantages_group_index_kernel: keys must be int64/int32/uint8, got ", k.scalar_type());
  }
  return out;
}

// Meta: shapes only.
std::tuple<at::Tensor, at::Tensor> gae_meta(const at::Tensor& rewards, const at::Tensor&, const at::Tensor&,
                                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double,
                                            double) {
  auto opts = rewards.options().dtype(at::kFloat);
  return {at::empty(rewards.sizes(), opts), at::empty(rewards.sizes(), opts)};
}

at::Tensor discounted_meta(const at::Tensor& rewards, const at::Tensor&, const std::optional<at::Tensor>&, double) {
  return at::empty(rewards.sizes(), rewards.options().dtype(at::kFloat));
}

at::Tensor whiten_meta(const at::Tensor& values, const at::Tensor&, bool, bool) {
  return at::empty(values.sizes(), values.options());
}

at::Tensor broadcast_meta(const at::Tensor& scores, const at::Tensor& mask) {
  return at::empty(mask.sizes(), scores.options());
}

at::Tensor group_index_meta(const at::Tensor& keys, const std::optional<at::Tensor>& offsets) {
  const int64_t N = offsets.has_value() ? offsets->size(0) - 1 : keys.size(0);
  return at::empty({N}, keys.options().dtype(at::kLong));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rlkern, m) {
  m.def("advantages_gae_kernel(Tensor rewards, Tensor values, Tensor mask, Tensor? bootstrap, Tensor? cu_seqlens, "
        "float gamma, float lam) -> (Tensor, Tensor)");
  m.def("advantages_discounted_kernel(Tensor rewards, Tensor mask, Tensor? cu_seqlens, float gamma) -> Tensor");
  m.def("advantages_group_index_kernel(Tensor keys, Tensor? offsets) -> Tensor");
  m.def("advantages_whiten_kernel(Tensor values, Tensor mask, bool shift_mean, bool zero_masked) -> Tensor");
  m.def("advantages_broadcast_kernel(Tensor scores, Tensor mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(rlkern, CPU, m) {
  m.impl("advantages_gae_kernel", &gae_cpu);
  m.impl("advantages_discounted_kernel", &discounted_cpu);
  m.impl("advantages_group_index_kernel", &group_index_cpu);
  m.impl("advantages_whiten_kernel", &whiten_cpu);
  m.impl("advantages_broadcast_kernel", &broadcast_cpu);
}

TORCH_LIBRARY_IMPL(rlkern, Meta, m) {
  m.impl("advantages_gae_kernel", &gae_meta);
  m.impl("advantages_discounted_kernel", &discounted_meta);
  m.impl("advantages_group_index_kernel", &group_index_meta);
  m.impl("advantages_whiten_kernel", &whiten_meta);
  m.impl("advantages_broadcast_kernel", &broadcast_meta);
}
