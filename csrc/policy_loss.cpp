// rlkern CPU kernel: fused policy loss (torch.ops.rlkern.policy_loss_stats / policy_loss_grad).
//
// Oracle: rlkern/reference/policy_loss.py. One task per sequence (at::parallel_for over B):
//   stats: one read of the sequence's tokens (two for GSPO, whose ratio is the sequence mean
//          log-ratio) -> the per-sequence partial sums [B, 11] (policy loss, entropy, KL, mask
//          count, the six metric sums, GSPO's mean log-ratio); rlkern.ops turns them into the
//          aggregated loss and the metrics with [B]-sized ops.
//   grad:  one read, one write: d loss / d logprobs = m * (c_pol[b] * is_w * dl/dlp + c_kl[b] *
//          dkl/dlp) and d loss / d entropy = m * c_ent[b], with the per-sequence coefficients
//          (aggregation weight times grad and coefficient) computed by rlkern.ops.
// Accumulation in double; token math in float, as the fp32 reference.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

namespace {

enum class Loss { kPpo, kGspo, kCispo, kReinforce, kSapo, kDro, kDppoTv, kDppoKl, kClipCov, kKlCov };
enum class Kl { kK1, kAbs, kK2, kK3 };

// Columns of the stats tensor (rlkern/ops/policy_loss.py S_*).
constexpr int kPolicy = 0, kEntropy = 1, kKl = 2, kCount = 3, kCf = 4, kLo = 5, kHi = 6, kDcf = 7, kAkl = 8,
              kRatio = 9, kSlr = 10, kNumStats = 11;
constexpr float kLogRatioBound = 20.f, kGspoMax = 10.f, kK3Bound = 10.f;

Loss parse_loss(const std::string& s) {
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
  TORCH_CHECK(false, "rlkern.policy_loss: the C++ kernel has no loss '", s, "'");
}

void parse_kl(const std::string& s, Kl* kind, bool* straight_through) {
  std::string base = s;
  *straight_through = !s.empty() && s.back() == '+';
  if (*straight_through) base.pop_back();
  if (base == "k1" || base == "kl") *kind = Kl::kK1;
  else if (base == "abs") *kind = Kl::kAbs;
  else if (base == "k2" || base == "mse") *kind = Kl::kK2;
  else if (base == "k3" || base == "low_var_kl") *kind = Kl::kK3;
  else TORCH_CHECK(false, "rlkern.policy_loss: unknown kl_estimator '", s, "'");
}

struct Hyper {
  float clip_low, clip_high, dual;
  bool has_dual;
  float tau_pos, tau_neg, dro_beta, ppo_kl_coef;
};

Hyper parse_hyper(const std::vector<double>& h) {
  TORCH_CHECK(h.size() >= 11, "rlkern.policy_loss: hyper must have 11 entries, got ", h.size());
  Hyper x;
  x.clip_low = static_cast<float>(h[0]);
  x.clip_high = static_cast<float>(h[1]);
  x.has_dual = !std::isnan(h[2]);
  x.dual = x.has_dual ? static_cast<float>(h[2]) : std::numeric_limits<float>::infinity();
  x.tau_pos = static_cast<float>(h[7]);
  x.tau_neg = static_cast<float>(h[8]);
  x.dro_beta = std::isnan(h[9]) ? 0.f : static_cast<float>(h[9]);
  x.ppo_kl_coef = static_cast<float>(h[10]);
  return x;
}

struct Args {
  const float *lp, *old, *adv, *ref, *ent, *isw, *sel;  // ref/ent/isw/sel may be null
  const void* mask;                                      // null: every token counts (packed)
  const int64_t* cu;                                     // null: padded
  int64_t T;                                             // padded width
  bool adv_per_seq;
  Loss loss;
  Kl kl;
  bool kl_st;
  Hyper h;
};

struct Token {
  float l, dl;                          // policy loss and d l / d logprob (before is_weights)
  float cf, lo, hi, dcf, akl, ratio;    // metric values
};

inline float clampf(float x, float lo, float hi) { return std::min(std::max(x, lo), hi); }

// One token of the policy loss: value, derivative and metric flags (reference _token_terms).
inline Token policy_token(const Args& a, float lp, float old, float A, float slr, float sel) {
  const Hyper& h = a.h;
  const float lo_b = 1.f - h.clip_low, hi_b = 1.f + h.clip_high;
  const float lr = lp - old;
  Token t{0, 0, 0, 0, 0, 0, 0, 0};
  const bool clamped = a.loss == Loss::kPpo || a.loss == Loss::kCispo || a.loss == Loss::kSapo ||
                       a.loss == Loss::kDppoTv || a.loss == Loss::kDppoKl;
  const float lrc = clamped ? clampf(lr, -kLogRatioBound, kLogRatioBound) : lr;
  // clamp passes the gradient on the closed interval, as torch.clamp does
  const bool in_bounds = !clamped || (lr >= -kLogRatioBound && lr <= kLogRatioBound);
  float r = std::exp(lrc);
  float dr = in_bounds ? r : 0.f;
  t.akl = -lrc;
  switch (a.loss) {
    case Loss::kGspo:
      r = std::exp(std::min(slr, kGspoMax));
      dr = slr <= kGspoMax ? r : 0.f;
      [[fallthrough]];
    case Loss::kPpo:
    case Loss::kClipCov: {
      const float l1 = -A * r, l2 = -A * clampf(r, lo_b, hi_b);
      const bool clipped = l2 > l1;
      t.l = std::max(l1, l2);
      t.dl = clipped ? 0.f : -A * dr;
      t.cf = clipped;
      t.lo = clipped && A < 0;
      t.hi = clipped && A > 0;
      if (a.loss == Loss::kPpo && h.has_dual && A < 0) {
        const float l3 = -A * h.dual;
        if (t.l > l3) {
          t.l = l3;
          t.dl = 0.f;
          t.dcf = 1.f;
        } else if (t.l == l3) {
          t.dl *= 0.5f;  // torch.minimum splits the gradient of a tie
        }
      }
      if (a.loss == Loss::kClipCov) {
        t.l *= 1.f - sel;
        t.dl *= 1.f - sel;
        t.cf = sel;
      }
      break;
    }
    case Loss::kCispo: {
      const float cr = clampf(r, lo_b, hi_b);
      t.l = -cr * A * lp;
      t.dl = -cr * A;
      t.cf = r != cr;
      t.lo = r < lo_b;
      t.hi = r > hi_b;
      break;
    }
    case Loss::kReinforce:
      t.l = -A * lp;
      t.dl = -A;
      break;
    case Loss::kSapo: {
      const float tau = A > 0 ? h.tau_pos : h.tau_neg;
      const float s = 1.f / (1.f + std::exp(-tau * (r - 1.f)));
      t.l = -s * (4.f / tau) * A;
      t.dl = -A * 4.f * s * (1.f - s) * dr;
      break;
    }
    case Loss::kDro:
      t.l = -(lp * A - 0.5f * h.dro_beta * lr * lr);
      t.dl = -(A - h.dro_beta * lr);
      break;
    case Loss::kDppoTv:
    case Loss::kDppoKl: {
      const float tr = std::min(r, h.dual);
      const float p = std::exp(lp), po = std::exp(old);
      bool up_ok, down_ok;
      if (a.loss == Loss::kDppoTv) {
        up_ok = (p - po) <= h.clip_high;
        down_ok = (p - po) >= -h.clip_low;
      } else {
        const float bkl = po * (old - lp) + (1.f - po) * std::log((1.f - po + 1e-8f) / (1.f - p + 1e-8f));
        up_ok = bkl <= h.clip_high || p <= po;
        down_ok = bkl <= h.clip_low || p >= po;
      }
      const float valid = (A > 0 ? up_ok : down_ok) ? 1.f : 0.f;
      t.l = -A * tr * lp * valid;
      t.dl = -A * tr * valid;
      t.cf = 1.f - valid;
      t.lo = A <= 0 ? 1.f - valid : 0.f;
      t.hi = A > 0 ? 1.f - valid : 0.f;
      t.dcf = r > h.dual ? valid : 0.f;
      break;
    }
    case Loss::kKlCov: {
      const float sgn = lr > 0 ? 1.f : (lr < 0 ? -1.f : 0.f);
      t.l = -A * r + sel * (h.ppo_kl_coef * std::abs(lr));
      t.dl = -A * r + sel * h.ppo_kl_coef * sgn;
      t.akl = std::abs(lr);
      break;
    }
  }
  t.ratio = r;
  return t;
}

// KL estimate and its derivative in logprob (verl kl_penalty; '+' keeps k2's gradient).
inline void kl_token(const Args& a, float lp, float ref, float* value, float* deriv) {
  const float diff = lp - ref;
  switch (a.kl) {
    case Kl::kK1:
      *value = diff;
      *deriv = 1.f;
      break;
    case Kl::kAbs:
      *value = std::abs(diff);
      *deriv = diff > 0 ? 1.f : (diff < 0 ? -1.f : 0.f);
      break;
    case Kl::kK2:
      *value = 0.5f * diff * diff;
      *deriv = diff;
      break;
    case Kl::kK3: {
      const float x = clampf(-diff, -kLogRatioBound, kLogRatioBound);
      const float e = std::exp(x);
      const float v = e - x - 1.f;
      *value = clampf(v, -kK3Bound, kK3Bound);
      const bool live = -diff >= -kLogRatioBound && -diff <= kLogRatioBound && v >= -kK3Bound && v <= kK3Bound;
      *deriv = live ? 1.f - e : 0.f;
      break;
    }
  }
  if (a.kl_st) *deriv = diff;
}

template <typename M>
inline float mask_at(const void* m, int64_t i) {
  return m ? static_cast<float>(static_cast<const M*>(m)[i]) : 1.f;
}

inline void seq_range(const Args& a, int64_t b, int64_t* begin, int64_t* end) {
  if (a.cu) {
    *begin = a.cu[b];
    *end = a.cu[b + 1];
  } else {
    *begin = b * a.T;
    *end = (b + 1) * a.T;
  }
}

template <typename M>
float gspo_seq_log_ratio(const Args& a, int64_t begin, int64_t end) {
  double num = 0, den = 0;
  for (int64_t i = begin; i < end; ++i) {
    const float m = mask_at<M>(a.mask, i);
    if (m != 0.f) num += static_cast<double>(m) * (a.lp[i] - a.old[i]);
    den += m;
  }
  return static_cast<float>(num / std::max(den, 1.0));
}

template <typename M>
void stats_seqs(const Args& a, float* stats, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    int64_t begin, end;
    seq_range(a, b, &begin, &end);
    const float slr = a.loss == Loss::kGspo ? gspo_seq_log_ratio<M>(a, begin, end) : 0.f;
    double acc[kNumStats] = {0};
    for (int64_t i = begin; i < end; ++i) {
      const float m = mask_at<M>(a.mask, i);
      if (m == 0.f) continue;
      const float A = a.adv_per_seq ? a.adv[b] : a.adv[i];
      const Token t = policy_token(a, a.lp[i], a.old[i], A, slr, a.sel ? a.sel[i] : 0.f);
      const float w = a.isw ? a.isw[i] : 1.f;
      acc[kPolicy] += static_cast<double>(m) * (t.l * w);
      acc[kCount] += m;
      acc[kCf] += m * t.cf;
      acc[kLo] += m * t.lo;
      acc[kHi] += m * t.hi;
      acc[kDcf] += m * t.dcf;
      acc[kAkl] += static_cast<double>(m) * t.akl;
      acc[kRatio] += static_cast<double>(m) * t.ratio;
      if (a.ref) {
        float v, d;
        kl_token(a, a.lp[i], a.ref[i], &v, &d);
        acc[kKl] += static_cast<double>(m) * v;
      }
      if (a.ent) acc[kEntropy] += static_cast<double>(m) * a.ent[i];
    }
    acc[kSlr] = slr;
    for (int k = 0; k < kNumStats; ++k) stats[b * kNumStats + k] = static_cast<float>(acc[k]);
  }
}

template <typename M>
void grad_seqs(const Args& a, const float* stats, const float* coefs, float* g_lp, float* g_ent, int64_t b0,
               int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    int64_t begin, end;
    seq_range(a, b, &begin, &end);
    const float slr = stats[b * kNumStats + kSlr];
    const float c_pol = coefs[b * 3], c_kl = coefs[b * 3 + 1], c_ent = coefs[b * 3 + 2];
    for (int64_t i = begin; i < end; ++i) {
      const float m = mask_at<M>(a.mask, i);
      if (m == 0.f) {
        g_lp[i] = 0.f;
        if (g_ent) g_ent[i] = 0.f;
        continue;
      }
      const float A = a.adv_per_seq ? a.adv[b] : a.adv[i];
      const Token t = policy_token(a, a.lp[i], a.old[i], A, slr, a.sel ? a.sel[i] : 0.f);
      float g = c_pol * t.dl * (a.isw ? a.isw[i] : 1.f);
      if (a.ref && c_kl != 0.f) {
        float v, d;
        kl_token(a, a.lp[i], a.ref[i], &v, &d);
        g += c_kl * d;
      }
      g_lp[i] = m * g;
      if (g_ent) g_ent[i] = m * c_ent;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor plumbing.

at::Tensor as_float(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

struct Prepared {
  Args a;
  std::vector<at::Tensor> keep;  // owners of the converted buffers
  at::Tensor mask;
  int64_t B = 0;
};

Prepared prepare(const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
                 const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& ref_logprobs,
                 const std::optional<at::Tensor>& entropy, const std::optional<at::Tensor>& is_weights,
                 const std::optional<at::Tensor>& select, const std::optional<at::Tensor>& cu_seqlens,
                 const std::string& loss, const std::string& kl_estimator, const std::vector<double>& hyper) {
  Prepared p;
  const bool packed = cu_seqlens.has_value();
  TORCH_CHECK(packed ? logprobs.dim() == 1 : logprobs.dim() == 2,
              "rlkern.policy_loss: logprobs must be [B, T] or packed [total] with cu_seqlens, got ", logprobs.sizes());
  const int64_t n = logprobs.numel();
  auto same = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.sizes() == logprobs.sizes(), "rlkern.policy_loss: ", name, " must have the shape of logprobs ",
                logprobs.sizes(), ", got ", t.sizes());
    at::Tensor f = as_float(t);
    p.keep.push_back(f);
    return f.data_ptr<float>();
  };
  auto opt = [&](const std::optional<at::Tensor>& t, const char* name) -> const float* {
    return t.has_value() ? same(*t, name) : nullptr;
  };
  Args& a = p.a;
  a.lp = same(logprobs, "logprobs");
  a.old = same(old_logprobs, "old_logprobs");
  a.ref = opt(ref_logprobs, "ref_logprobs");
  a.ent = opt(entropy, "entropy");
  a.isw = opt(is_weights, "is_weights");
  a.sel = opt(select, "select");
  if (packed) {
    at::Tensor cu = cu_seqlens->to(at::kLong).contiguous();
    p.keep.push_back(cu);
    a.cu = cu.data_ptr<int64_t>();
    p.B = cu.numel() - 1;
    a.T = 0;
    TORCH_CHECK(p.B >= 0 && a.cu[0] == 0 && a.cu[p.B] == n, "rlkern.policy_loss: cu_seqlens must run from 0 to ", n);
  } else {
    a.cu = nullptr;
    p.B = logprobs.size(0);
    a.T = logprobs.size(1);
  }
  // advantages of the shape of logprobs are per token, [B] per sequence (as rlkern.ops decides)
  a.adv_per_seq = advantages.sizes() != logprobs.sizes();
  if (a.adv_per_seq) {
    TORCH_CHECK(advantages.numel() == p.B, "rlkern.policy_loss: per-sequence advantages must be [B]");
    at::Tensor f = as_float(advantages);
    p.keep.push_back(f);
    a.adv = f.data_ptr<float>();
  } else {
    a.adv = same(advantages, "advantages");
  }
  if (mask.has_value()) {
    TORCH_CHECK(mask->sizes() == logprobs.sizes(), "rlkern.policy_loss: mask must have the shape of logprobs");
    const auto st = mask->scalar_type();
    p.mask = (st == at::kFloat || st == at::kBool || st == at::kByte || st == at::kInt || st == at::kLong)
                 ? mask->contiguous()
                 : as_float(*mask);
    a.mask = p.mask.data_ptr();
  } else {
    a.mask = nullptr;
  }
  a.loss = parse_loss(loss);
  parse_kl(kl_estimator, &a.kl, &a.kl_st);
  a.h = parse_hyper(hyper);
  return p;
}

template <typename F>
void dispatch_mask(const Prepared& p, F&& f) {
  if (!p.a.mask) return f(static_cast<float*>(nullptr));
  switch (p.mask.scalar_type()) {
    case at::kBool: return f(static_cast<bool*>(nullptr));
    case at::kByte: return f(static_cast<uint8_t*>(nullptr));
    case at::kInt: return f(static_cast<int32_t*>(nullptr));
    case at::kLong: return f(static_cast<int64_t*>(nullptr));
    default: return f(static_cast<float*>(nullptr));
  }
}

int64_t grain(const Prepared& p, int64_t n) {
  const int64_t per_seq = std::max<int64_t>(1, n / std::max<int64_t>(p.B, 1));
  return std::max<int64_t>(1, 8192 / per_seq);
}

at::Tensor policy_loss_stats_cpu(const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                                 const at::Tensor& advantages, const std::optional<at::Tensor>& mask,
                                 const std::optional<at::Tensor>& ref_logprobs, const std::optional<at::Tensor>& entropy,
                                 const std::optional<at::Tensor>& is_weights, const std::optional<at::Tensor>& select,
                                 const std::optional<at::Tensor>& cu_seqlens, std::string loss,
                                 std::string kl_estimator, std::vector<double> hyper) {
  Prepared p = prepare(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, is_weights, select, cu_seqlens,
                       loss, kl_estimator, hyper);
  at::Tensor stats = at::zeros({p.B, kNumStats}, logprobs.options().dtype(at::kFloat));
  float* out = stats.data_ptr<float>();
  dispatch_mask(p, [&](auto* tag) {
    using M = std::remove_pointer_t<decltype(tag)>;
    at::parallel_for(0, p.B, grain(p, logprobs.numel()), [&](int64_t b0, int64_t b1) { stats_seqs<M>(p.a, out, b0, b1); });
  });
  return stats;
}

std::tuple<at::Tensor, at::Tensor> policy_loss_grad_cpu(
    const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& ref_logprobs,
    const std::optional<at::Tensor>& entropy, const std::optional<at::Tensor>& is_weights,
    const std::optional<at::Tensor>& select, const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& stats,
    const at::Tensor& coefs, std::string loss, std::string kl_estimator, std::vector<double> hyper) {
  Prepared p = prepare(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, is_weights, select, cu_seqlens,
                       loss, kl_estimator, hyper);
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == p.B && stats.size(1) == kNumStats,
              "rlkern.policy_loss_grad: stats must be [B, 11], got ", stats.sizes());
  TORCH_CHECK(coefs.dim() == 2 && coefs.size(0) == p.B && coefs.size(1) == 3,
              "rlkern.policy_loss_grad: coefs must be [B, 3], got ", coefs.sizes());
  const at::Tensor st = as_float(stats), cf = as_float(coefs);
  const auto fopt = logprobs.options().dtype(at::kFloat);
  at::Tensor g_lp = at::empty(logprobs.sizes(), fopt);
  at::Tensor g_ent = entropy.has_value() ? at::empty(logprobs.sizes(), fopt) : at::empty({0}, fopt);
  float* glp = g_lp.data_ptr<float>();
  float* gent = entropy.has_value() ? g_ent.data_ptr<float>() : nullptr;
  dispatch_mask(p, [&](auto* tag) {
    using M = std::remove_pointer_t<decltype(tag)>;
    at::parallel_for(0, p.B, grain(p, logprobs.numel()), [&](int64_t b0, int64_t b1) {
      grad_seqs<M>(p.a, st.data_ptr<float>(), cf.data_ptr<float>(), glp, gent, b0, b1);
    });
  });
  if (logprobs.scalar_type() != at::kFloat) g_lp = g_lp.to(logprobs.scalar_type());
  if (entropy.has_value() && entropy->scalar_type() != at::kFloat) g_ent = g_ent.to(entropy->scalar_type());
  return {g_lp, g_ent};
}

at::Tensor policy_loss_stats_meta(const at::Tensor& logprobs, const at::Tensor&, const at::Tensor&,
                                  const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                  const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                  const std::optional<at::Tensor>&, const std::optional<at::Tensor>& cu_seqlens,
                                  std::string, std::string, std::vector<double>) {
  const int64_t B = cu_seqlens.has_value() ? cu_seqlens->size(0) - 1 : logprobs.size(0);
  return at::empty({B, kNumStats}, logprobs.options().dtype(at::kFloat));
}

std::tuple<at::Tensor, at::Tensor> policy_loss_grad_meta(
    const at::Tensor& logprobs, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>& entropy, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
    std::string, std::string, std::vector<double>) {
  at::Tensor g_ent = entropy.has_value() ? at::empty(logprobs.sizes(), entropy->options())
                                         : at::empty({0}, logprobs.options().dtype(at::kFloat));
  return {at::empty(logprobs.sizes(), logprobs.options()), g_ent};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rlkern, m) {
  m.def(
      "policy_loss_stats(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor? mask, "
      "Tensor? ref_logprobs, Tensor? entropy, Tensor? is_weights, Tensor? select, Tensor? cu_seqlens, "
      "str loss, str kl_estimator, float[] hyper) -> Tensor");
  m.def(
      "policy_loss_grad(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor? mask, "
      "Tensor? ref_logprobs, Tensor? entropy, Tensor? is_weights, Tensor? select, Tensor? cu_seqlens, "
      "Tensor stats, Tensor coefs, str loss, str kl_estimator, float[] hyper) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rlkern, CPU, m) {
  m.impl("policy_loss_stats", &policy_loss_stats_cpu);
  m.impl("policy_loss_grad", &policy_loss_grad_cpu);
}

TORCH_LIBRARY_IMPL(rlkern, Meta, m) {
  m.impl("policy_loss_stats", &policy_loss_stats_meta);
  m.impl("policy_loss_grad", &policy_loss_grad_meta);
}
