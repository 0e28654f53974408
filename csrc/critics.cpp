// rlkern CPU kernels of the critic / value-based ops (the ops and their semantics:
// rlkern/ops/critics.py; oracle: rlkern/reference/critics.py).
//
// cpp_soft_bellman: OREO's soft Bellman residuals, one task per row. A first pass counts the row's
// valid tokens (T_b); a reverse pass carries the suffix sum S_t = sum_{i >= t} (logprobs_i -
// ref_logprobs_i) and writes, per valid token, the residual's scaled gradients
// grad_v = 2 e_t / T_b (e_t = V_t - R_b + beta S_t) and grad_k = (1 - exp(ref_t - logprobs_t)) / T_b,
// and per row sum_t e_t^2 / T_b and sum_t k3_t / T_b. The backward (rlkern/ops/critics.py) only
// scales these saved gradients.
//
// cpp_running_reward_norm: PPO-max's reward normalization with running statistics (below).
// cpp_step_advantage_loss: Direct Advantage Policy Optimization's step-level loss (below).
// cpp_constrained_rewards: CGPO's constrained reward (CRPG) and per-group selections (CRRAFT, CODPO).
//
// Layout: padded [R, T] contiguous or packed [total] with cu_seqlens int32 [R + 1]. The token
// tensors share one dtype, the mask is bool (the op converts). Compute type: double for float64
// input, float otherwise; the per-row sums run in double.
#include "common.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

template <typename S>
using Acc = std::conditional_t<std::is_same_v<S, double>, double, float>;

using Rows = rlkern::TokenRows;

void check_same(const at::Tensor& x, const at::Tensor& y, const char* op, const char* name) {
  TORCH_CHECK(y.sizes() == x.sizes() && y.scalar_type() == x.scalar_type(), op, ": ", name,
              " must have logprobs' shape and dtype");
}

at::ScalarType acc_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

template <typename S>
void soft_bellman_kernel(const at::Tensor& lp_t, const at::Tensor& ref_t, const at::Tensor& v_t, const bool* mask,
                         const at::Tensor& rew_t, const Rows& l, double beta_d, at::Tensor& sq_t, at::Tensor& kl_t,
                         at::Tensor& len_t, at::Tensor& gv_t, at::Tensor& gk_t) {
  using A = Acc<S>;
  const S* lp = lp_t.data_ptr<S>();
  const S* ref = ref_t.data_ptr<S>();
  const S* v = v_t.data_ptr<S>();
  const A* rew = rew_t.data_ptr<A>();
  A* sq = sq_t.data_ptr<A>();
  A* kl = kl_t.data_ptr<A>();
  A* len = len_t.data_ptr<A>();
  A* gv = gv_t.data_ptr<A>();
  A* gk = gk_t.data_ptr<A>();
  const A beta = A(beta_d);
  at::parallel_for(0, l.rows, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t s = l.start(r), n = l.len(r);
      int64_t count = 0;
      for (int64_t j = 0; j < n; ++j) count += mask ? mask[s + j] : 1;
      const A inv = count > 0 ? A(1) / A(count) : A(0);
      const A reward = rew[r];
      A suffix = 0;
      double sq_sum = 0, kl_sum = 0;
      for (int64_t j = n - 1; j >= 0; --j) {
        const int64_t i = s + j;
        if (mask && !mask[i]) {  // never read: a masked token's values may be garbage or NaN
          gv[i] = 0;
          gk[i] = 0;
          continue;
        }
        const A a = A(lp[i]), b = A(ref[i]);
        suffix += a - b;
        const A e = A(v[i]) - reward + beta * suffix;
        const A d = b - a;
        const A ed = std::exp(d);
        gv[i] = A(2) * e * inv;
        gk[i] = (A(1) - ed) * inv;
        sq_sum += double(e) * double(e);
        kl_sum += double(ed - d - A(1));
      }
      sq[r] = A(sq_sum * double(inv));
      kl[r] = A(kl_sum * double(inv));
      len[r] = A(count);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_bellman_cpu(
    const at::Tensor& logprobs, const at::Tensor& ref, const at::Tensor& values, const std::optional<at::Tensor>& mask,
    const at::Tensor& rewards, const std::optional<at::Tensor>& cu_seqlens, double beta) {
  const char* op = "cpp_soft_bellman";
  at::Tensor holder;
  const Rows l = rlkern::make_token_rows(logprobs, cu_seqlens, holder, op);
  check_same(logprobs, ref, op, "ref_logprobs");
  check_same(logprobs, values, op, "values");
  TORCH_CHECK(logprobs.is_contiguous() && ref.is_contiguous() && values.is_contiguous(), op,
              ": token tensors must be contiguous");
  const at::ScalarType acc = acc_type(logprobs);
  TORCH_CHECK(rewards.dim() == 1 && rewards.size(0) == l.rows && rewards.scalar_type() == acc &&
                  rewards.is_contiguous(),
              op, ": rewards must be contiguous [R] in the compute type");
  const bool* m = nullptr;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->sizes() == logprobs.sizes() && mask->is_contiguous(), op,
                ": mask must be contiguous bool of logprobs' shape");
    m = mask->data_ptr<bool>();
  }
  const auto opts = logprobs.options().dtype(acc);
  at::Tensor sq = at::empty({l.rows}, opts), kl = at::empty({l.rows}, opts), len = at::empty({l.rows}, opts);
  at::Tensor gv = rlkern::empty_output(logprobs.sizes(), opts), gk = rlkern::empty_output(logprobs.sizes(), opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logprobs.scalar_type(), "cpp_soft_bellman", [&] {
    soft_bellman_kernel<scalar_t>(logprobs, ref, values, m, rewards, l, beta, sq, kl, len, gv, gk);
  });
  return {sq, kl, len, gv, gk};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_bellman_meta(
    const at::Tensor& logprobs, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const at::Tensor& rewards, const std::optional<at::Tensor>&, double) {
  const auto opts = logprobs.options().dtype(acc_type(logprobs));
  const int64_t rows = rewards.size(0);
  return {at::empty({rows}, opts), at::empty({rows}, opts), at::empty({rows}, opts),
          at::empty(logprobs.sizes(), opts), at::empty(logprobs.sizes(), opts)};
}

// PPO-max's running reward normalization: one task (B is a batch of sequence rewards). The batch's
// mean and M2 (two passes, double) are merged into the running (count, mean, M2) by Chan et al.'s
// parallel update, then every reward is normalized by the merged statistics and clipped.
template <typename S>
void reward_norm_kernel(const S* r, int64_t m, const double* stats, double clip, double eps, Acc<S>* out,
                        double* next) {
  double n = stats[0], mean = stats[1], m2 = stats[2];
  if (m > 0) {
    double sum = 0;
    for (int64_t i = 0; i < m; ++i) sum += double(r[i]);
    const double bmean = sum / double(m);
    double bm2 = 0;
    for (int64_t i = 0; i < m; ++i) {
      const double d = double(r[i]) - bmean;
      bm2 += d * d;
    }
    const double total = n + double(m), delta = bmean - mean;
    mean += delta * double(m) / total;
    m2 += bm2 + delta * delta * n * double(m) / total;
    n = total;
  }
  const double scale = 1.0 / ((n > 0 ? std::sqrt(m2 / n) : 0.0) + eps);
  for (int64_t i = 0; i < m; ++i) {
    const double x = (double(r[i]) - mean) * scale;
    out[i] = Acc<S>(std::min(std::max(x, -clip), clip));
  }
  next[0] = n;
  next[1] = mean;
  next[2] = m2;
}

std::tuple<at::Tensor, at::Tensor> running_reward_norm_cpu(const at::Tensor& rewards, const at::Tensor& stats,
                                                           double clip, double eps) {
  const char* op = "cpp_running_reward_norm";
  TORCH_CHECK(rewards.dim() == 1 && rewards.is_contiguous(), op, ": rewards must be contiguous [B]");
  TORCH_CHECK(stats.scalar_type() == at::kDouble && stats.numel() == 3 && stats.is_contiguous(), op,
              ": stats must be contiguous float64 [3]");
  at::Tensor out = at::empty(rewards.sizes(), rewards.options().dtype(acc_type(rewards)));
  at::Tensor next = at::empty({3}, stats.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rewards.scalar_type(), "cpp_running_reward_norm", [&] {
    reward_norm_kernel<scalar_t>(rewards.data_ptr<scalar_t>(), rewards.numel(), stats.data_ptr<double>(), clip, eps,
                                 out.data_ptr<Acc<scalar_t>>(), next.data_ptr<double>());
  });
  return {out, next};
}

std::tuple<at::Tensor, at::Tensor> running_reward_norm_meta(const at::Tensor& rewards, const at::Tensor& stats, double,
                                                            double) {
  return {at::empty(rewards.sizes(), rewards.options().dtype(acc_type(rewards))), at::empty({3}, stats.options())};
}

// CGPO over a mixture of judges: one pass computes each sample's calibrated reward c and whether
// every judge passes; a second keeps, per group (dense ids in [0, B)), the first satisfied sample
// of highest c and the first violating sample of lowest c (strict comparisons: ties keep the
// earlier index, as the Triton kernel's pairwise rule does).
template <typename S>
void constrained_kernel(const S* r, const int64_t* g, const bool* judges, int64_t J, const S* base, int64_t B,
                        Acc<S>* out, bool* chosen, bool* rejected) {
  using A = Acc<S>;
  std::vector<A> c(B);
  std::vector<char> sat(B);
  std::vector<int64_t> best(B, -1), worst(B, -1);
  for (int64_t i = 0; i < B; ++i) {
    const A x = A(r[i]);
    c[i] = base ? A(1) / (A(1) + std::exp(A(base[i]) - x)) : x;
    bool ok = true;
    for (int64_t j = 0; j < J; ++j) ok = ok && judges[i * J + j];
    sat[i] = ok;
    out[i] = ok ? c[i] : A(0);
    chosen[i] = false;
    rejected[i] = false;
  }
  for (int64_t i = 0; i < B; ++i) {
    TORCH_CHECK(g[i] >= 0 && g[i] < B, "cpp_constrained_rewards: group ids must be dense in [0, B)");
    int64_t& b = sat[i] ? best[g[i]] : worst[g[i]];
    if (b < 0 || (sat[i] ? c[i] > c[b] : c[i] < c[b])) b = i;
  }
  for (int64_t k = 0; k < B; ++k) {
    if (best[k] >= 0) chosen[best[k]] = true;
    if (worst[k] >= 0) rejected[worst[k]] = true;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> constrained_rewards_cpu(const at::Tensor& rewards,
                                                                       const at::Tensor& groups,
                                                                       const at::Tensor& judges,
                                                                       const std::optional<at::Tensor>& baseline) {
  const char* op = "cpp_constrained_rewards";
  TORCH_CHECK(rewards.dim() == 1 && rewards.is_contiguous(), op, ": rewards must be contiguous [B]");
  const int64_t B = rewards.size(0);
  TORCH_CHECK(groups.scalar_type() == at::kLong && groups.numel() == B && groups.is_contiguous(), op,
              ": groups must be contiguous int64 [B]");
  TORCH_CHECK(judges.scalar_type() == at::kBool && judges.dim() == 2 && judges.size(0) == B && judges.is_contiguous(),
              op, ": judges must be contiguous bool [B, J]");
  if (baseline.has_value())
    TORCH_CHECK(baseline->sizes() == rewards.sizes() && baseline->scalar_type() == rewards.scalar_type() &&
                    baseline->is_contiguous(),
                op, ": baseline_rewards must be contiguous, rewards' shape and dtype");
  at::Tensor out = at::empty({B}, rewards.options().dtype(acc_type(rewards)));
  at::Tensor chosen = at::empty({B}, rewards.options().dtype(at::kBool));
  at::Tensor rejected = at::empty({B}, rewards.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rewards.scalar_type(), "cpp_constrained_rewards", [&] {
    constrained_kernel<scalar_t>(rewards.data_ptr<scalar_t>(), groups.data_ptr<int64_t>(), judges.data_ptr<bool>(),
                                 judges.size(1), baseline.has_value() ? baseline->data_ptr<scalar_t>() : nullptr, B,
                                 out.data_ptr<Acc<scalar_t>>(), chosen.data_ptr<bool>(), rejected.data_ptr<bool>());
  });
  return {out, chosen, rejected};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> constrained_rewards_meta(const at::Tensor& rewards, const at::Tensor&,
                                                                        const at::Tensor&,
                                                                        const std::optional<at::Tensor>&) {
  return {at::empty(rewards.sizes(), rewards.options().dtype(acc_type(rewards))),
          at::empty(rewards.sizes(), rewards.options().dtype(at::kBool)),
          at::empty(rewards.sizes(), rewards.options().dtype(at::kBool))};
}

// Direct Advantage Policy Optimization's step loss, one task per row. A step ends at a valid
// token with step_ends set, or at the row's last valid token. Pass 0 finds the last valid token and
// counts the steps (K); pass 1 sums each step's log-ratio and writes g_k = 2 beta e_k / K,
// e_k = beta * sum - A_k, at the step's end token; pass 2 (reverse) copies each end's g_k to the
// step's other tokens (masked tokens get 0).
template <typename S>
void step_loss_kernel(const S* lp, const S* ref, const S* adv, const bool* ends, const bool* mask, const Rows& l,
                      double beta_d, Acc<S>* sq, Acc<S>* ratio, Acc<S>* steps, Acc<S>* grad) {
  using A = Acc<S>;
  const A beta = A(beta_d);
  at::parallel_for(0, l.rows, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t s = l.start(r), n = l.len(r);
      int64_t last = -1, count = 0;
      for (int64_t j = 0; j < n; ++j) {
        if (mask && !mask[s + j]) continue;
        last = j;
        count += ends[s + j] ? 1 : 0;
      }
      if (last >= 0 && !ends[s + last]) ++count;
      const A inv = count > 0 ? A(1) / A(count) : A(0);
      A acc = 0;
      double sq_sum = 0, ratio_sum = 0;
      for (int64_t j = 0; j <= last; ++j) {
        const int64_t i = s + j;
        if (mask && !mask[i]) continue;
        acc += A(lp[i]) - A(ref[i]);
        if (ends[i] || j == last) {
          const A e = beta * acc - A(adv[i]);
          grad[i] = A(2) * beta * e * inv;
          sq_sum += double(e) * double(e);
          ratio_sum += double(beta * acc);
          acc = 0;
        }
      }
      A cur = 0;
      for (int64_t j = n - 1; j >= 0; --j) {
        const int64_t i = s + j;
        const bool valid = (!mask || mask[i]) && j <= last;
        if (valid && (ends[i] || j == last)) cur = grad[i];
        grad[i] = valid ? cur : A(0);
      }
      sq[r] = A(sq_sum * double(inv));
      ratio[r] = A(ratio_sum * double(inv));
      steps[r] = A(count);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> step_advantage_loss_cpu(
    const at::Tensor& logprobs, const at::Tensor& ref, const at::Tensor& adv, const at::Tensor& ends,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& cu_seqlens, double beta) {
  const char* op = "cpp_step_advantage_loss";
  at::Tensor holder;
  const Rows l = rlkern::make_token_rows(logprobs, cu_seqlens, holder, op);
  check_same(logprobs, ref, op, "ref_logprobs");
  check_same(logprobs, adv, op, "advantages");
  TORCH_CHECK(logprobs.is_contiguous() && ref.is_contiguous() && adv.is_contiguous(), op,
              ": token tensors must be contiguous");
  TORCH_CHECK(ends.scalar_type() == at::kBool && ends.sizes() == logprobs.sizes() && ends.is_contiguous(), op,
              ": step_ends must be contiguous bool of logprobs' shape");
  const bool* m = nullptr;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->sizes() == logprobs.sizes() && mask->is_contiguous(), op,
                ": mask must be contiguous bool of logprobs' shape");
    m = mask->data_ptr<bool>();
  }
  const auto opts = logprobs.options().dtype(acc_type(logprobs));
  at::Tensor sq = at::empty({l.rows}, opts), ratio = at::empty({l.rows}, opts), steps = at::empty({l.rows}, opts);
  at::Tensor grad = rlkern::empty_output(logprobs.sizes(), opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logprobs.scalar_type(), "cpp_step_advantage_loss", [&] {
    using A = Acc<scalar_t>;
    step_loss_kernel<scalar_t>(logprobs.data_ptr<scalar_t>(), ref.data_ptr<scalar_t>(), adv.data_ptr<scalar_t>(),
                               ends.data_ptr<bool>(), m, l, beta, sq.data_ptr<A>(), ratio.data_ptr<A>(),
                               steps.data_ptr<A>(), grad.data_ptr<A>());
  });
  return {sq, ratio, steps, grad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> step_advantage_loss_meta(
    const at::Tensor& logprobs, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>& cu_seqlens, double) {
  const auto opts = logprobs.options().dtype(acc_type(logprobs));
  const int64_t rows = cu_seqlens.has_value() ? cu_seqlens->size(0) - 1 : logprobs.size(0);
  return {at::empty({rows}, opts), at::empty({rows}, opts), at::empty({rows}, opts),
          at::empty(logprobs.sizes(), opts)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rlkern, m) {
  m.def(
      "cpp_soft_bellman(Tensor logprobs, Tensor ref_logprobs, Tensor values, Tensor? mask, Tensor rewards, "
      "Tensor? cu_seqlens, float beta) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("cpp_running_reward_norm(Tensor rewards, Tensor stats, float clip, float eps) -> (Tensor, Tensor)");
  m.def(
      "cpp_constrained_rewards(Tensor rewards, Tensor groups, Tensor judges, Tensor? baseline_rewards) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "cpp_step_advantage_loss(Tensor logprobs, Tensor ref_logprobs, Tensor advantages, Tensor step_ends, "
      "Tensor? mask, Tensor? cu_seqlens, float beta) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rlkern, CPU, m) {
  m.impl("cpp_soft_bellman", &soft_bellman_cpu);
  m.impl("cpp_running_reward_norm", &running_reward_norm_cpu);
  m.impl("cpp_constrained_rewards", &constrained_rewards_cpu);
  m.impl("cpp_step_advantage_loss", &step_advantage_loss_cpu);
}

TORCH_LIBRARY_IMPL(rlkern, Meta, m) {
  m.impl("cpp_soft_bellman", &soft_bellman_meta);
  m.impl("cpp_running_reward_norm", &running_reward_norm_meta);
  m.impl("cpp_constrained_rewards", &constrained_rewards_meta);
  m.impl("cpp_step_advantage_loss", &step_advantage_loss_meta);
}
