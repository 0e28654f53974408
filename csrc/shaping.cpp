// rlkern CPU kernels of the reward-shaping family (the ops, their formulas and the papers:
// rlkern/ops/shaping.py; oracle: rlkern/reference/shaping.py).
//
// cpp_ensemble_rewards: one task per row of [B, K] reward-model scores (mean, WCO min, UWO mean -
// coef * population variance, weighted sum). cpp_shape_rewards: samples are bucketed by their dense
// group number (a counting sort, O(N)); each group is one task that reads its members' scores and
// the method's auxiliary value (length, log-likelihood, exit position, tool calls, budget; HBPO's
// reward also reads the budgets as aux2) and writes the shaped rewards, or HBPO's advantages. Inputs arrive contiguous in the compute type (double for float64 input, float
// otherwise; the op converts); group statistics run in double.
#include "common.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

namespace {

constexpr double kPi = 3.14159265358979323846;

// method codes: the order of rlkern.reference.shaping.ENSEMBLE_METHODS / SHAPE_METHODS
enum Ensemble : int64_t { kMean = 0, kWco = 1, kUwo = 2, kWeighted = 3 };
enum Shape : int64_t { kGrpoLambda = 0, kUnlikeliness = 1, kSGrpo = 2, kOtc = 3, kHbpo = 4, kHbpoAdvantage = 5 };

template <typename S>
void ensemble_rows(const S* r, const S* w, S* out, int64_t B, int64_t K, int64_t method, double coef) {
  at::parallel_for(0, B, 256, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const S* row = r + b * K;
      double acc = 0.0;
      if (method == kWco) {
        // NaN wins (as torch.min): a comparison with NaN is false, so it is tested explicitly
        acc = K ? std::numeric_limits<double>::infinity() : std::numeric_limits<double>::quiet_NaN();
        for (int64_t k = 0; k < K; ++k) {
          const double v = row[k];
          if (std::isnan(v) || v < acc) acc = v;
          if (std::isnan(v)) break;
        }
      } else if (method == kWeighted) {
        for (int64_t k = 0; k < K; ++k) acc += static_cast<double>(row[k]) * static_cast<double>(w[k]);
      } else {
        for (int64_t k = 0; k < K; ++k) acc += row[k];
        const double mean = acc / static_cast<double>(K);  // K = 0: NaN, as torch.mean of nothing
        acc = mean;
        if (method == kUwo) {
          // two passes: the variance of close scores would cancel as E[x^2] - E[x]^2
          double var = 0.0;
          for (int64_t k = 0; k < K; ++k) var += (row[k] - mean) * (row[k] - mean);
          acc = mean - coef * var / static_cast<double>(K);
        }
      }
      out[b] = static_cast<S>(acc);
    }
  });
}

at::Tensor ensemble_cpu(const at::Tensor& rewards, const std::optional<at::Tensor>& weights, int64_t method,
                        double coef) {
  TORCH_CHECK(rewards.dim() == 2 && rewards.is_contiguous(), "cpp_ensemble_rewards: rewards must be contiguous [B, K]");
  const int64_t B = rewards.size(0), K = rewards.size(1);
  at::Tensor out = at::empty({B}, rewards.options());
  AT_DISPATCH_FLOATING_TYPES(rewards.scalar_type(), "cpp_ensemble_rewards", [&] {
    const scalar_t* w = nullptr;
    if (method == kWeighted) {
      TORCH_CHECK(weights.has_value() && weights->numel() == K && weights->scalar_type() == rewards.scalar_type() &&
                      weights->is_contiguous(),
                  "cpp_ensemble_rewards: weights must be contiguous [K] of rewards' dtype");
      w = weights->data_ptr<scalar_t>();
    }
    ensemble_rows<scalar_t>(rewards.data_ptr<scalar_t>(), w, out.data_ptr<scalar_t>(), B, K, method, coef);
  });
  return out;
}

// Samples bucketed by dense group number (a counting sort, O(N)): group g's members are
// members[starts[g] .. starts[g + 1]), in rising sample order.
struct Groups {
  std::vector<int64_t> starts, members;
};

Groups bucket_by_group(const at::Tensor& inverse, int64_t N, const char* op) {
  TORCH_CHECK(inverse.scalar_type() == at::kLong && inverse.numel() == N && inverse.is_contiguous(), op,
              ": inverse must be contiguous int64 [N]");
  Groups out{std::vector<int64_t>(N + 1, 0), std::vector<int64_t>(N)};
  const int64_t* inv = inverse.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK(inv[i] >= 0 && inv[i] < N, op, ": group numbers must be in [0, N)");
    ++out.starts[inv[i] + 1];
  }
  for (int64_t g = 0; g < N; ++g) out.starts[g + 1] += out.starts[g];
  std::vector<int64_t> fill(out.starts.begin(), out.starts.end() - 1);
  for (int64_t i = 0; i < N; ++i) out.members[fill[inv[i]]++] = i;
  return out;
}

// One group: `idx` holds its members' sample numbers in rising order; `b` the budgets (HBPO).
template <typename S>
void shape_group(const S* s, const S* a, const S* b, S* out, const int64_t* idx, int64_t g, int64_t method, double p0,
                 double p1, double p2) {
  if (method == kHbpo) {  // per sample: p0 = L_max, p1 = beta, p2 = alpha
    for (int64_t t = 0; t < g; ++t) {
      const int64_t i = idx[t];
      const double si = s[i], n = a[i], budget = b[i];
      double r = std::isnan(si) ? si : 0.0;
      if (si > 0 && n <= p0)
        r = n > budget ? p1 * std::cos(kPi * n / (2.0 * p0)) - p2 * std::fabs(n - budget)
                       : p1 * std::cos(kPi * budget / (2.0 * p0));
      out[i] = static_cast<S>(r);
    }
    return;
  }
  if (method == kHbpoAdvantage) {  // s = rewards, a = budgets; p0 = L_max, p1 = beta, p2 = eps
    if (g == 1) {  // verl's group of one: mean 0, std 1, no subgroup term
      out[idx[0]] = static_cast<S>(s[idx[0]] / (1.0 + p2));
      return;
    }
    double mean = 0.0, var = 0.0;
    for (int64_t t = 0; t < g; ++t) mean += s[idx[t]];
    mean /= static_cast<double>(g);
    for (int64_t t = 0; t < g; ++t) var += (s[idx[t]] - mean) * (s[idx[t]] - mean);
    const double std = std::sqrt(var / static_cast<double>(g - 1));  // unbiased, as torch.std
    for (int64_t t = 0; t < g; ++t) {
      const int64_t i = idx[t];
      double sub = 0.0, count = 0.0;
      for (int64_t u = 0; u < g; ++u)
        if (a[idx[u]] == a[i]) sub += s[idx[u]], count += 1.0;
      out[i] = static_cast<S>((s[i] - mean) / (std + p2) + sub / count - p1 * std::cos(kPi * a[i] / (2.0 * p0)));
    }
    return;
  }
  std::vector<int64_t> correct;
  for (int64_t t = 0; t < g; ++t)
    if (s[idx[t]] > 0) correct.push_back(idx[t]);  // NaN is not > 0
  for (int64_t t = 0; t < g; ++t) out[idx[t]] = s[idx[t]];
  const int64_t k = static_cast<int64_t>(correct.size());
  if (method == kGrpoLambda) {
    if (k == 0 || static_cast<double>(k) / static_cast<double>(g) < p0) return;
    double mean = 0.0, var = 0.0;
    for (int64_t i : correct) mean += a[i];
    mean /= static_cast<double>(k);
    for (int64_t i : correct) var += (a[i] - mean) * (a[i] - mean);
    const double std = std::sqrt(var / static_cast<double>(k));
    for (int64_t i : correct) {
      const double z = (a[i] - mean) / (std + p2);
      out[i] = static_cast<S>(s[i] * (1.0 - p1 / (1.0 + std::exp(-z))));
    }
  } else if (method == kUnlikeliness || method == kSGrpo) {
    // rank among the correct members: by log-likelihood falling (unlikeliness) or exit position
    // rising (S-GRPO); ties by sample number (stable_sort keeps the rising order of idx)
    std::stable_sort(correct.begin(), correct.end(), [&](int64_t x, int64_t y) {
      return method == kUnlikeliness ? a[x] > a[y] : a[x] < a[y];
    });
    for (int64_t r = 0; r < k; ++r) {
      const int64_t i = correct[r];
      const double factor = method == kUnlikeliness
                                ? 1.0 - p0 * static_cast<double>(g - r) / static_cast<double>(g)
                                : std::pow(p0, static_cast<double>(r));
      out[i] = static_cast<S>(s[i] * factor);
    }
  } else {  // kOtc
    double n = 0.0;
    if (k) {
      n = std::numeric_limits<double>::infinity();
      for (int64_t i : correct) n = std::min(n, static_cast<double>(a[i]));
    }
    for (int64_t t = 0; t < g; ++t) {
      const int64_t i = idx[t];
      const double m = a[i];
      double tool;
      if (n == 0.0 && m == 0.0) tool = 1.0;
      else if (n == 0.0) tool = std::cos(m * kPi / (2.0 * m + p0));
      else tool = std::sin(2.0 * n * m / (m + n) * kPi / (2.0 * n));
      out[i] = static_cast<S>(p1 * tool * s[i]);
    }
  }
}

// GRPO-lambda's top-lambda selection as a threshold: the correctness ratio of the
// ceil(fraction * G)-th best of the batch's G groups (inf when that count is 0; ties at the cut all
// pass). The 1e-9 keeps a product like 0.3 * 10 = 3.0000000000000004 from rounding up.
double top_fraction_cut(const std::vector<double>& ratios, double fraction) {
  const auto count = static_cast<int64_t>(std::ceil(fraction * static_cast<double>(ratios.size()) - 1e-9));
  if (count < 1) return std::numeric_limits<double>::infinity();
  std::vector<double> sorted(ratios);
  std::nth_element(sorted.begin(), sorted.begin() + (count - 1), sorted.end(), std::greater<double>());
  return sorted[count - 1];
}

at::Tensor shape_cpu(const at::Tensor& scores, const std::optional<at::Tensor>& aux, const std::optional<at::Tensor>& aux2,
                     const at::Tensor& inverse, int64_t method, double p0, double p1, double p2, double p3) {
  TORCH_CHECK(scores.dim() == 1 && scores.is_contiguous(), "cpp_shape_rewards: scores must be contiguous [N]");
  const int64_t N = scores.numel();
  const Groups grouped = bucket_by_group(inverse, N, "cpp_shape_rewards");
  const std::vector<int64_t>& starts = grouped.starts;
  const std::vector<int64_t>& members = grouped.members;
  at::Tensor out = at::empty({N}, scores.options());
  if (N == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "cpp_shape_rewards", [&] {
    const scalar_t* a = nullptr;
    std::vector<scalar_t> zeros;
    if (aux.has_value()) {
      TORCH_CHECK(aux->numel() == N && aux->scalar_type() == scores.scalar_type() && aux->is_contiguous(),
                  "cpp_shape_rewards: aux must be contiguous [N] of scores' dtype");
      a = aux->data_ptr<scalar_t>();
    } else {
      zeros.assign(N, scalar_t(0));
      a = zeros.data();
    }
    const scalar_t* b = a;
    if (method == kHbpo) {
      TORCH_CHECK(aux2.has_value() && aux2->numel() == N && aux2->scalar_type() == scores.scalar_type() &&
                      aux2->is_contiguous(),
                  "cpp_shape_rewards: aux2 (budgets) must be contiguous [N] of scores' dtype");
      b = aux2->data_ptr<scalar_t>();
    }
    const scalar_t* s = scores.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    double threshold = p0;
    if (method == kGrpoLambda && p3 >= 0) {
      std::vector<double> ratios;
      for (int64_t g = 0; g < N; ++g) {
        if (starts[g + 1] == starts[g]) continue;
        int64_t k = 0;
        for (int64_t t = starts[g]; t < starts[g + 1]; ++t) k += s[members[t]] > 0;
        ratios.push_back(static_cast<double>(k) / static_cast<double>(starts[g + 1] - starts[g]));
      }
      threshold = top_fraction_cut(ratios, p3);
    }
    at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g)
        if (starts[g + 1] > starts[g])
          shape_group<scalar_t>(s, a, b, o, members.data() + starts[g], starts[g + 1] - starts[g], method, threshold, p1,
                                    p2);
    });
  });
  return out;
}

// TW-GRPO token weights: one task per (group, position t) sums, over the vocabulary, the members'
// exp(d) - d - 1 with d = clamp(mean log-prob - log-prob, -11, 11) (masked positions read as the
// uniform -log V); then per group the min-max normalization over t. Log-probs are read in their
// dtype (bf16/fp16/fp32/fp64), every sum runs in double.
template <typename S>
void token_weights_impl(const S* lp, const uint8_t* mask, double* out, const std::vector<int64_t>& starts,
                        const std::vector<int64_t>& members, const std::vector<int64_t>& groups, int64_t T, int64_t V,
                        double max_weight) {
  const double uniform = -std::log(static_cast<double>(V));
  const int64_t G = static_cast<int64_t>(groups.size());
  std::vector<double> kl(static_cast<size_t>(G * T));
  at::parallel_for(0, G * T, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> mean(static_cast<size_t>(V));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t gi = task / T, t = task % T, g = groups[gi];
      const int64_t first = starts[g], last = starts[g + 1];
      const double size = static_cast<double>(last - first);
      std::fill(mean.begin(), mean.end(), 0.0);
      for (int64_t u = first; u < last; ++u) {
        const int64_t i = members[u];
        const S* row = lp + (i * T + t) * V;
        if (mask[i * T + t]) {
          for (int64_t v = 0; v < V; ++v) mean[v] += static_cast<double>(row[v]);
        } else {
          for (int64_t v = 0; v < V; ++v) mean[v] += uniform;
        }
      }
      for (int64_t v = 0; v < V; ++v) mean[v] /= size;
      double acc = 0.0;
      for (int64_t u = first; u < last; ++u) {
        const int64_t i = members[u];
        const S* row = lp + (i * T + t) * V;
        const bool keep = mask[i * T + t] != 0;
        for (int64_t v = 0; v < V; ++v) {
          const double d = std::min(11.0, std::max(-11.0, mean[v] - (keep ? static_cast<double>(row[v]) : uniform)));
          acc += std::exp(d) - d - 1.0;
        }
      }
      kl[static_cast<size_t>(task)] = acc / size;
    }
  });
  for (int64_t gi = 0; gi < G; ++gi) {
    const double* k = kl.data() + gi * T;
    double lo = k[0], hi = k[0];
    for (int64_t t = 1; t < T; ++t) lo = std::min(lo, k[t]), hi = std::max(hi, k[t]);
    const int64_t g = groups[gi];
    for (int64_t u = starts[g]; u < starts[g + 1]; ++u) {
      const int64_t i = members[u];
      for (int64_t t = 0; t < T; ++t)
        out[i * T + t] = mask[i * T + t] ? 1.0 + (max_weight - 1.0) * (k[t] - lo) / (hi - lo + 1e-8) : 0.0;
    }
  }
}

at::Tensor token_weights_cpu(const at::Tensor& logprobs, const at::Tensor& mask, const at::Tensor& inverse,
                             double max_weight) {
  TORCH_CHECK(logprobs.dim() == 3 && logprobs.is_contiguous(), "cpp_token_weights: logprobs must be contiguous [N, T, V]");
  const int64_t N = logprobs.size(0), T = logprobs.size(1), V = logprobs.size(2);
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous() && mask.numel() == N * T,
              "cpp_token_weights: mask must be contiguous bool [N, T]");
  const Groups grouped = bucket_by_group(inverse, N, "cpp_token_weights");
  const std::vector<int64_t>& starts = grouped.starts;
  at::Tensor acc = at::zeros({N, T}, logprobs.options().dtype(at::kDouble));
  if (N == 0 || T == 0 || V == 0) return acc.to(logprobs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  std::vector<int64_t> groups;
  for (int64_t g = 0; g < N; ++g)
    if (starts[g + 1] > starts[g]) groups.push_back(g);
  const auto* m = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logprobs.scalar_type(), "cpp_token_weights", [&] {
    token_weights_impl<scalar_t>(logprobs.data_ptr<scalar_t>(), m, acc.data_ptr<double>(), starts, grouped.members,
                                 groups, T, V, max_weight);
  });
  return logprobs.scalar_type() == at::kDouble ? acc : acc.to(at::kFloat);
}

at::Tensor token_weights_meta(const at::Tensor& logprobs, const at::Tensor&, const at::Tensor&, double) {
  return at::empty({logprobs.size(0), logprobs.size(1)},
                   logprobs.options().dtype(logprobs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
}

at::Tensor ensemble_meta(const at::Tensor& rewards, const std::optional<at::Tensor>&, int64_t, double) {
  return at::empty({rewards.size(0)}, rewards.options());
}

at::Tensor shape_meta(const at::Tensor& scores, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                      const at::Tensor&, int64_t, double, double, double, double) {
  return at::empty_like(scores);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rlkern, m) {
  m.def("cpp_ensemble_rewards(Tensor rewards, Tensor? weights, int method, float coef) -> Tensor");
  m.def("cpp_token_weights(Tensor logprobs, Tensor mask, Tensor inverse, float max_weight) -> Tensor");
  m.def("cpp_shape_rewards(Tensor scores, Tensor? aux, Tensor? aux2, Tensor inverse, int method, float p0, float p1, float p2, "
        "float p3) -> Tensor");
}

TORCH_LIBRARY_IMPL(rlkern, CPU, m) {
  m.impl("cpp_ensemble_rewards", &ensemble_cpu);
  m.impl("cpp_shape_rewards", &shape_cpu);
  m.impl("cpp_token_weights", &token_weights_cpu);
}

TORCH_LIBRARY_IMPL(rlkern, Meta, m) {
  m.impl("cpp_ensemble_rewards", &ensemble_meta);
  m.impl("cpp_shape_rewards", &shape_meta);
  m.impl("cpp_token_weights", &token_weights_meta);
}
