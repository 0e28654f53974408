// rlkern CPU kernels of the group preference family (torch.ops.rlkern.cpp_group_preference_stats,
// cpp_group_weights, cpp_srpo_loss; the ops and their formulas: rlkern/ops/preference_groups.py; oracle:
// rlkern/reference/preference_groups.py).
//
// The samples are bucketed by their dense group number (a counting sort, stable: members keep
// their batch order, which is the rank tie-break of TPO), then every group is walked over its
// member pairs. The loss kernel writes per-sample statistics that rlkern/ops/preference_groups.py
// (_finish) reduces to the loss, the gradient and the metrics, the same reduction as the Triton
// kernel's: rows 0 loss part, 1 its derivative in logps_i, 2 n_i - 1, 3 wins (s_i > s_j), 4 wins
// ranked right (also r_i > r_j), 5 clipped ordered pairs (p3o), 6 the k3 term (trpa), 7 its
// derivative. Compute type: double for float64 input, float otherwise.
#include "common.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

template <typename S>
using Acc = std::conditional_t<std::is_same_v<S, double>, double, float>;

// Loss type codes: LOSS_TYPES in rlkern/reference/preference_groups.py; weight methods: WEIGHT_METHODS
// there, with W_WIN_RATE_MATRIX for win_rate given a preference matrix.
enum LossType { TPO, P3O, TRPA, BRAIN, N_LOSS_TYPES };
enum Method { W_WIN_RATE, W_RSO, W_BRAIN, W_WIN_RATE_MATRIX };
constexpr int N_STATS = 8;
constexpr int64_t kGroupGrain = 64;  // groups per parallel task: a group is a few to a few dozen samples

using rlkern::sigmoid;
using rlkern::softplus;

// Members of each group, in batch order: members[start[g] .. start[g + 1]).
struct Buckets {
  std::vector<int64_t> start, members;
};

Buckets bucket(const int64_t* inv, int64_t n) {
  Buckets b;
  b.start.assign(n + 2, 0);
  b.members.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(inv[i] >= 0 && inv[i] < n, "group_preference_loss: group numbers must be in [0, N), got ",
                      inv[i]);
    ++b.start[inv[i] + 1];
  }
  for (int64_t g = 0; g <= n; ++g) b.start[g + 1] += b.start[g];
  std::vector<int64_t> fill(b.start.begin(), b.start.end() - 1);
  for (int64_t i = 0; i < n; ++i) b.members[fill[inv[i]]++] = i;
  return b;
}

// P3O's clipped term max(-A rho, -A clip(rho)) of one ordered pair, its derivative in the pair's
// log-ratio difference, and whether the clipped side was taken.
template <typename T>
inline T p3o_term(T adv, T lrho, T eps, T& d, bool& clipped) {
  const T rho = std::exp(lrho);
  const T u = -adv * rho;
  const T c = -adv * std::min(std::max(rho, T(1) - eps), T(1) + eps);
  clipped = c > u;
  d = clipped ? T(0) : -adv * rho;
  return clipped ? c : u;
}

template <typename S>
void stats_kernel(const at::Tensor& logps, const at::Tensor& ref, const at::Tensor& old, const at::Tensor& scores,
                  const at::Tensor& inverse, int64_t loss_type, double beta_d, double eps_d, at::Tensor& out) {
  using T = Acc<S>;
  const int64_t n = logps.numel();
  const S* x = logps.data_ptr<S>();
  const T* rf = ref.data_ptr<T>();
  const T* ol = old.data_ptr<T>();
  const T* sc = scores.data_ptr<T>();
  T* o = out.data_ptr<T>();
  std::fill(o, o + N_STATS * n, T(0));
  const T beta = T(beta_d), eps = T(eps_d);
  const Buckets b = bucket(inverse.data_ptr<int64_t>(), n);
  std::vector<T> r(n), xo(n), aux(n);
  for (int64_t i = 0; i < n; ++i) {
    r[i] = beta * (T(x[i]) - rf[i]);
    xo[i] = T(x[i]) - ol[i];
  }
  // groups in parallel: each writes only its own members' outputs and aux entries
  at::parallel_for(0, n, kGroupGrain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t lo = b.start[g], hi = b.start[g + 1], size = hi - lo;
      if (size == 0) continue;
      const int64_t* m = b.members.data() + lo;
      if (loss_type == TPO) {  // aux: 1 / log2(1 + tau), tau the descending rank of r (ties: batch order)
        for (int64_t a = 0; a < size; ++a) {
          int64_t above = 0;
          for (int64_t c = 0; c < size; ++c)
            above += r[m[c]] > r[m[a]] || (r[m[c]] == r[m[a]] && c < a);
          aux[m[a]] = T(1) / std::log2(T(2 + above));
        }
      }
      T amax = -std::numeric_limits<T>::infinity(), bmax = amax;
      double asum = 0, bsum = 0;
      if (loss_type == BRAIN) {  // the group's log-sum-exps of the posterior weights and of e^(x - old)
        for (int64_t a = 0; a < size; ++a) {
          const int64_t i = m[a];
          aux[i] = rf[i] - ol[i] + sc[i] / beta;
          amax = std::max(amax, aux[i]);
          bmax = std::max(bmax, xo[i]);
        }
        for (int64_t a = 0; a < size; ++a) {
          asum += std::exp(double(aux[m[a]] - amax));
          bsum += std::exp(double(xo[m[a]] - bmax));
        }
      }
      for (int64_t a = 0; a < size; ++a) {
        const int64_t i = m[a];
        double loss = 0, grad = 0;
        int64_t wins = 0, right = 0, clipped = 0;
        for (int64_t c = 0; c < size; ++c) {
          const int64_t j = m[c];
          if (j == i) continue;
          const bool win = sc[i] > sc[j], lose = sc[j] > sc[i];
          const T d = r[i] - r[j];
          wins += win;
          right += win && d > 0;
          if (loss_type == TPO || loss_type == TRPA) {
            T lam = T(1);
            if (loss_type == TPO) lam = std::abs(std::exp2(sc[i]) - std::exp2(sc[j])) * std::abs(aux[i] - aux[j]);
            if (win) {
              loss += double(lam * softplus(-d));
              grad -= double(lam * beta * sigmoid(-d));
            } else if (lose) {
              grad += double(lam * beta * sigmoid(d));
            }
          } else if (loss_type == P3O) {
            const T adv = sc[i] - sc[j];
            T dij, dji;
            bool cij, cji;
            loss += double(p3o_term(adv, xo[i] - xo[j], eps, dij, cij));
            p3o_term(-adv, xo[j] - xo[i], eps, dji, cji);
            grad += double(dij) - double(dji);
            clipped += cij;
          }
        }
        if (loss_type == BRAIN) {
          const double alpha = std::exp(double(aux[i] - amax)) / asum;
          const double base = std::exp(double(xo[i] - bmax)) / bsum;
          loss = -alpha * double(x[i]) + (double(bmax) + std::log(bsum) - std::log(double(size))) / double(size);
          grad = base - alpha;
        }
        o[i] = T(loss);
        o[n + i] = T(grad);
        o[2 * n + i] = T(size - 1);
        o[3 * n + i] = T(wins);
        o[4 * n + i] = T(right);
        o[5 * n + i] = T(clipped);
        if (loss_type == TRPA) {  // k3 = e^(ref - x) - (ref - x) - 1 and its derivative 1 - e^(ref - x)
          const T lr = rf[i] - T(x[i]);
          const T e = std::exp(lr);
          o[6 * n + i] = e - lr - T(1);
          o[7 * n + i] = T(1) - e;
        }
      }
    }
  });
}

void check_aux(const at::Tensor& t, int64_t n, at::ScalarType acc, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.numel() == n, "group_preference_loss: ", name, " must be [", n, "], got ",
                    t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == acc, "group_preference_loss: ", name, " must be ", acc, ", got ",
                   t.scalar_type());
}

at::Tensor group_preference_stats_cpu(const at::Tensor& logps, const at::Tensor& ref, const at::Tensor& old,
                                      const at::Tensor& scores, const at::Tensor& inverse, int64_t loss_type,
                                      at::ArrayRef<double> hyper) {
  TORCH_CHECK_VALUE(logps.dim() == 1, "group_preference_loss: logps must be [N], got shape ", logps.sizes());
  TORCH_CHECK_VALUE(loss_type >= 0 && loss_type < N_LOSS_TYPES, "group_preference_loss: unknown loss type code ",
                    loss_type);
  TORCH_CHECK_VALUE(hyper.size() == 2, "group_preference_loss: hyper must be [beta, clip_eps]");
  const int64_t n = logps.numel();
  const at::ScalarType acc = logps.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check_aux(ref, n, acc, "ref_logps");
  check_aux(old, n, acc, "old_logps");
  check_aux(scores, n, acc, "scores");
  TORCH_CHECK_VALUE(inverse.dim() == 1 && inverse.numel() == n && inverse.scalar_type() == at::kLong,
                    "group_preference_loss: group numbers must be int64 [", n, "]");
  at::Tensor out = at::empty({N_STATS, n}, logps.options().dtype(acc));
  const at::Tensor x = logps.contiguous(), rf = ref.contiguous(), ol = old.contiguous(), sc = scores.contiguous();
  const at::Tensor inv = inverse.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logps.scalar_type(), "group_preference_loss", [&] {
    stats_kernel<scalar_t>(x, rf, ol, sc, inv, loss_type, hyper[0], hyper[1], out);
  });
  return out;
}

at::Tensor group_preference_stats_meta(const at::Tensor& logps, const at::Tensor&, const at::Tensor&,
                                       const at::Tensor&, const at::Tensor&, int64_t, at::ArrayRef<double>) {
  const at::ScalarType acc = logps.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::empty({N_STATS, logps.size(0)}, logps.options().dtype(acc));
}

// group_weights: scores [N] (or the [N, N] preference matrix with W_WIN_RATE_MATRIX), ref / old [N] in the
// compute type (zeros when the caller has none).
template <typename T>
void weights_kernel(const T* sc, const T* rf, const T* ol, const int64_t* inv, int64_t n, int64_t method, T beta,
                    T* out) {
  const Buckets b = bucket(inv, n);
  at::parallel_for(0, n, kGroupGrain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t lo = b.start[g], hi = b.start[g + 1], size = hi - lo;
      if (size == 0) continue;
      const int64_t* m = b.members.data() + lo;
      if (method == W_WIN_RATE || method == W_WIN_RATE_MATRIX) {
        for (int64_t a = 0; a < size; ++a) {
          const int64_t i = m[a];
          double won = 0;
          for (int64_t c = 0; c < size; ++c) {
            const int64_t j = m[c];
            if (j == i) continue;
            won += method == W_WIN_RATE_MATRIX ? double(sc[i * n + j])
                   : sc[i] > sc[j]              ? 1.0
                   : sc[i] == sc[j]             ? 0.5
                                                : 0.0;
          }
          out[i] = size > 1 ? T(won / double(size - 1)) : T(0.5);
        }
        continue;
      }
      // rso: exp((s - max s) / beta); brain: softmax of ref - old + s / beta
      T top = -std::numeric_limits<T>::infinity();
      for (int64_t a = 0; a < size; ++a) {
        const int64_t i = m[a];
        top = std::max(top, method == W_RSO ? sc[i] : rf[i] - ol[i] + sc[i] / beta);
      }
      double sum = 0;
      for (int64_t a = 0; a < size; ++a) {
        const int64_t i = m[a];
        const T v = method == W_RSO ? (sc[i] - top) / beta : rf[i] - ol[i] + sc[i] / beta - top;
        out[i] = std::exp(v);
        sum += double(out[i]);
      }
      if (method == W_BRAIN)
        for (int64_t a = 0; a < size; ++a) out[m[a]] = T(double(out[m[a]]) / sum);
    }
  });
}

at::Tensor group_weights_cpu(const at::Tensor& scores, const at::Tensor& ref, const at::Tensor& old,
                             const at::Tensor& inverse, int64_t method, double beta) {
  const int64_t n = inverse.numel();
  TORCH_CHECK_VALUE(method >= W_WIN_RATE && method <= W_WIN_RATE_MATRIX, "group_weights: unknown method code ", method);
  TORCH_CHECK_VALUE(inverse.dim() == 1 && inverse.scalar_type() == at::kLong, "group_weights: group numbers must be "
                    "int64 [N]");
  TORCH_CHECK_VALUE(method == W_WIN_RATE_MATRIX ? scores.sizes() == at::IntArrayRef({n, n}) : scores.sizes() ==
                    at::IntArrayRef({n}), "group_weights: scores has shape ", scores.sizes());
  const at::ScalarType acc = scores.scalar_type();
  TORCH_CHECK_TYPE(acc == at::kFloat || acc == at::kDouble, "group_weights: scores must be float32/float64");
  TORCH_CHECK_VALUE(ref.numel() == n && old.numel() == n && ref.scalar_type() == acc && old.scalar_type() == acc,
                    "group_weights: ref_logps and old_logps must be [N] of scores' dtype");
  at::Tensor out = at::empty({n}, scores.options());
  const at::Tensor sc = scores.contiguous(), rf = ref.contiguous(), ol = old.contiguous(), inv = inverse.contiguous();
  AT_DISPATCH_FLOATING_TYPES(acc, "group_weights", [&] {
    weights_kernel<scalar_t>(sc.data_ptr<scalar_t>(), rf.data_ptr<scalar_t>(), ol.data_ptr<scalar_t>(),
                             inv.data_ptr<int64_t>(), n, method, scalar_t(beta), out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor group_weights_meta(const at::Tensor& scores, const at::Tensor&, const at::Tensor&,
                              const at::Tensor& inverse, int64_t, double) {
  return at::empty({inverse.size(0)}, scores.options());
}

// SRPO (rlkern/ops/preference_groups.py srpo_loss): per pair, h = beta * (logps - ref) over the six
// columns (chosen, rejected, chosen | rejected, rejected | rejected, chosen | chosen, rejected | chosen);
// self-improvement (1/2 - (h2 - h3))^2 + (1/2 - (h4 - h5))^2, generative (h2 + h0 - h5 - h1 - 1)^2, the
// loss the mean of (1 - alpha) generative + alpha self-improvement; one pass writes the loss, the
// gradient and the metrics (mean self-improvement, mean generative, mean h0 - h1).
constexpr int N_SRPO_METRICS = 3;

template <typename S>
void srpo_kernel(const at::Tensor& logps, const at::Tensor& ref, double beta_d, double alpha_d, at::Tensor& loss_out,
                 at::Tensor& grad_out, at::Tensor& metrics_out) {
  using T = Acc<S>;
  const int64_t n = logps.size(0);
  const S* x = logps.data_ptr<S>();
  const T* rf = ref.data_ptr<T>();
  T* g = grad_out.data_ptr<T>();
  const T beta = T(beta_d), alpha = T(alpha_d);
  const double inv_n = 1.0 / double(std::max<int64_t>(n, 1));
  double total = 0, improve_sum = 0, gen_sum = 0, margin_sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    T h[6];
    for (int k = 0; k < 6; ++k) h[k] = beta * (T(x[6 * i + k]) - rf[6 * i + k]);
    const T u = T(0.5) - (h[2] - h[3]), v = T(0.5) - (h[4] - h[5]);
    const T w = h[2] + h[0] - h[5] - h[1] - T(1);
    const T improve = u * u + v * v, gen = w * w;
    total += double((T(1) - alpha) * gen + alpha * improve);
    improve_sum += double(improve);
    gen_sum += double(gen);
    margin_sum += double(h[0] - h[1]);
    // d/dh of the pair's loss, times beta (dh/dlogps), over n (the mean)
    const T s = beta * T(inv_n);
    const T dw = T(2) * (T(1) - alpha) * w * s, du = -T(2) * alpha * u * s, dv = -T(2) * alpha * v * s;
    T* gi = g + 6 * i;
    gi[0] = dw;
    gi[1] = -dw;
    gi[2] = dw + du;
    gi[3] = -du;
    gi[4] = dv;
    gi[5] = -dw - dv;
  }
  loss_out.data_ptr<T>()[0] = T(total * inv_n);
  T* mo = metrics_out.data_ptr<T>();
  mo[0] = T(improve_sum * inv_n);
  mo[1] = T(gen_sum * inv_n);
  mo[2] = T(margin_sum * inv_n);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> srpo_loss_cpu(const at::Tensor& logps, const at::Tensor& ref,
                                                             double beta, double alpha) {
  TORCH_CHECK_VALUE(logps.dim() == 2 && logps.size(1) == 6, "srpo_loss: logps must be [B, 6], got shape ",
                    logps.sizes());
  const at::ScalarType acc = logps.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_VALUE(ref.sizes() == logps.sizes(), "srpo_loss: ref_logps must have shape ", logps.sizes(), ", got ",
                    ref.sizes());
  TORCH_CHECK_TYPE(ref.scalar_type() == acc, "srpo_loss: ref_logps must be ", acc, ", got ", ref.scalar_type());
  const auto opts = logps.options().dtype(acc);
  at::Tensor loss = at::empty({}, opts);
  at::Tensor grad = at::empty(logps.sizes(), opts);
  at::Tensor metrics = at::empty({N_SRPO_METRICS}, opts);
  const at::Tensor x = logps.contiguous(), rf = ref.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logps.scalar_type(), "srpo_loss", [&] {
    srpo_kernel<scalar_t>(x, rf, beta, alpha, loss, grad, metrics);
  });
  return {loss, grad, metrics};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> srpo_loss_meta(const at::Tensor& logps, const at::Tensor&, double,
                                                              double) {
  const at::ScalarType acc = logps.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = logps.options().dtype(acc);
  return {at::empty({}, opts), at::empty(logps.sizes(), opts), at::empty({N_SRPO_METRICS}, opts)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rlkern, m) {
  m.def(
      "cpp_group_preference_stats(Tensor logps, Tensor ref_logps, Tensor old_logps, Tensor scores, Tensor inverse, "
      "int loss_type, float[] hyper) -> Tensor");
  m.def(
      "cpp_group_weights(Tensor scores, Tensor ref_logps, Tensor old_logps, Tensor inverse, int method, float beta) "
      "-> Tensor");
  m.def("cpp_srpo_loss(Tensor logps, Tensor ref_logps, float beta, float alpha) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rlkern, CPU, m) {
  m.impl("cpp_group_preference_stats", &group_preference_stats_cpu);
  m.impl("cpp_group_weights", &group_weights_cpu);
  m.impl("cpp_srpo_loss", &srpo_loss_cpu);
}

TORCH_LIBRARY_IMPL(rlkern, Meta, m) {
  m.impl("cpp_group_preference_stats", &group_preference_stats_meta);
  m.impl("cpp_group_weights", &group_weights_meta);
  m.impl("cpp_srpo_loss", &srpo_loss_meta);
}
