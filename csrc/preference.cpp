// rlkern CPU kernel of the sequence-level preference loss (torch.ops.rlkern.cpp_preference_loss;
// the op and its semantics: rlkern/ops/preference.py; oracle: rlkern/reference/preference.py).
//
// One pass over the B pairs computes the loss (TRL 1.16's DPO loss of every loss type, summed over
// the loss types with their weights), its gradient in the chosen and rejected log-probs, and the
// metrics; the backward of the op only scales the saved gradient. aot / aot_unpaired pair sorted
// values: their pass walks the stable sort orders. Compute type: double for float64 input, float
// otherwise (half types are widened); sums over pairs in double.
#include "common.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <vector>

namespace {


template <typename S>
using Acc = std::conditional_t<std::is_same_v<S, double>, double, float>;

// Loss type codes: the order of LOSS_TYPES in rlkern/reference/preference.py.
enum LossType {
  SIGMOID, HINGE, IPO, EXO_PAIR, NCA_PAIR, ROBUST, BCO_PAIR, SPPO_HARD, AOT, AOT_UNPAIRED, APO_ZERO, APO_DOWN,
  DISCOPOP, SFT, SIGMOID_NORM, SIMPO, ORPO, SPPO, XPO, VPO, INPO, CPL, STEP_APO, TPO_NLL, N_LOSS_TYPES
};
// f-divergence codes: the order of F_DIVERGENCES there.
enum FDiv { REVERSE_KL, FORWARD_KL, JS, ALPHA };
// Hyper-parameter list: beta, label_smoothing, f-divergence code, alpha, discopop tau, alpha clamp,
// simpo gamma, xpo alpha, vpo alpha, inpo tau, inpo eta, cpl lambda, AlphaPO alpha, averaged metrics flag.
constexpr int N_HYPER = 14;
// METRIC_KEYS, then ORPO's log_odds_ratio and log_odds_chosen (0 without orpo).
constexpr int N_METRICS = 8;
// Pairs per chunk of the parallel passes: threads take whole chunks and the chunks' partial sums are
// added in chunk order, so the result does not depend on the number of threads.
constexpr int64_t CHUNK = 1024;

using rlkern::sigmoid;  // csrc/common.h: overflow-free softplus / sigmoid, shared with the group losses
using rlkern::softplus;

// softplus(-x) and sigmoid(-x) from one exp: the sigmoid loss and its derivative.
template <typename T>
inline void softplus_sigmoid_neg(T x, T& sp, T& sg) {
  const T e = std::exp(-std::abs(x));
  const T inv = T(1) / (T(1) + e);
  sp = std::max(-x, T(0)) + std::log1p(e);
  sg = x >= 0 ? e * inv : inv;
}

template <typename T>
struct Hyper {
  T beta, ls, alpha, tau, clamp, gamma, xpo_alpha, vpo_alpha, inpo_tau, inpo_eta, cpl_lambda, alpha_po;
  int fdiv;
};

// AlphaPO's reward (1 - e^(-alpha x)) / alpha of a log-prob x and its derivative e^(-alpha x)
// (rlkern/reference/preference.py alphapo); the identity at alpha = 0.
template <typename T>
inline T alphapo(T x, T alpha, T& d) {
  if (alpha == T(0)) {
    d = T(1);
    return x;
  }
  d = std::exp(-alpha * x);
  return -std::expm1(-alpha * x) / alpha;
}

// The research list's pair losses (rlkern/ops/preference.py docstring): a pair's loss and its
// derivatives in the chosen, rejected and extra log-probs. c, r: the policy's log-probs; lc, lr: the
// log-ratios; rc, rr: the reference's; e: the extra log-prob (xpo / vpo: sampled); ac, ar: the
// per-pair constants (sppo win rates, inpo iterate log-probs, step_apo advantages).
template <typename T>
__attribute__((always_inline)) inline T paper_loss(int type, T c, T r, T rc, T rr, T e, T ac, T ar, const Hyper<T>& h,
                                                   T& gc, T& gr, T& ge) {
  const T beta = h.beta;
  const T lc = c - rc, lr = r - rr;
  gc = gr = ge = 0;
  switch (type) {
    case SPPO: {  // (lc - (P_c - 1/2) / beta)^2 + (lr - (P_r - 1/2) / beta)^2
      const T a = lc - (ac - T(0.5)) / beta, b = lr - (ar - T(0.5)) / beta;
      gc = T(2) * a;
      gr = T(2) * b;
      return a * a + b * b;
    }
    case XPO:
    case VPO: {  // softplus(-beta (lc - lr)) + k * e, k = xpo_alpha or -vpo_alpha * beta
      T loss, sg;
      softplus_sigmoid_neg(beta * (lc - lr), loss, sg);
      gc = -beta * sg;
      gr = beta * sg;
      ge = type == XPO ? h.xpo_alpha : -h.vpo_alpha * beta;
      return loss + ge * e;
    }
    case INPO: {  // (h - eta / 2)^2, h = (c - r) - eta tau (rc - rr) - (1 - eta tau) (ac - ar)
      const T et = h.inpo_eta * h.inpo_tau;
      const T v = (c - r) - et * (rc - rr) - (T(1) - et) * (ac - ar) - h.inpo_eta / T(2);
      gc = T(2) * v;
      gr = -T(2) * v;
      return v * v;
    }
    case CPL: {  // softplus(-beta (c - lambda r)), reference-free
      T loss, sg;
      softplus_sigmoid_neg(beta * (c - h.cpl_lambda * r), loss, sg);
      gc = -beta * sg;
      gr = beta * h.cpl_lambda * sg;
      return loss;
    }
    case STEP_APO: {  // softplus(-beta (A_c lc - A_r lr))
      T loss, sg;
      softplus_sigmoid_neg(beta * (ac * lc - ar * lr), loss, sg);
      gc = -beta * ac * sg;
      gr = beta * ar * sg;
      return loss;
    }
    default:
      return 0;
  }
}

// f'(pi / ref) as a function of the log-ratio, and its derivative.
template <typename T>
__attribute__((always_inline)) inline void score(T lr, const Hyper<T>& h, T& s, T& ds) {
  switch (h.fdiv) {
    case FORWARD_KL: {
      const T e = std::exp(-lr);
      s = T(1) - e;
      ds = e;
      return;
    }
    case JS:
      s = T(M_LN2) - softplus(-lr);
      ds = sigmoid(-lr);
      return;
    case ALPHA:
      if (std::abs(h.alpha - T(1)) >= T(1e-6)) {
        const T t = (h.alpha - T(1)) * lr;
        const T tc = std::min(t, h.clamp);
        const T e = std::exp(tc);
        s = (e - T(1)) / (h.alpha - T(1));
        ds = t <= h.clamp ? e : T(0);  // torch.clamp passes the gradient at the bound
        return;
      }
      [[fallthrough]];
    default:
      s = lr;
      ds = T(1);
  }
}

// log(1 - e^x) for x < 0, accurate on both sides of -ln 2 (as the reference's log1mexp).
template <typename T>
inline T log1mexp(T x) {
  return x < -T(M_LN2) ? std::log1p(-std::exp(x)) : std::log(-std::expm1(x));
}

// d/dx of (1 - ls) * softplus(-x) + ls * softplus(x): the smoothed logistic loss of aot / robust.
template <typename T>
inline T smoothed_grad(T x, T ls) {
  return -(T(1) - ls) * sigmoid(-x) + ls * sigmoid(x);
}

// One pair's loss of one (non-sorting, non-sft) loss type and its derivatives in the chosen and
// rejected log-ratios lc, lr; nc, nr the completion lengths clamped to >= 1.
template <typename T>
__attribute__((always_inline)) inline T pair_loss(int type, T lc, T lr, T nc, T nr, const Hyper<T>& h, T& gc, T& gr) {
  T sc, dsc, sr, dsr;
  score(lc, h, sc, dsc);
  score(lr, h, sr, dsr);
  if (h.alpha_po != T(0) && (type == SIGMOID || type == HINGE)) {  // AlphaPO on the summed log-probs
    sc = alphapo(lc, h.alpha_po, dsc);
    sr = alphapo(lr, h.alpha_po, dsr);
  }
  const T beta = h.beta;
  const T x = beta * (sc - sr);
  T dx = 0;  // d loss / d x for the losses of x = beta * (sc - sr)
  T loss = 0;
  gc = gr = 0;
  switch (type) {
    case SIGMOID: {
      T sg;
      softplus_sigmoid_neg(x, loss, sg);
      dx = -sg;
      break;
    }
    case HINGE:
      loss = std::max(T(1) - x, T(0));
      dx = T(1) - x > 0 ? T(-1) : T(0);
      break;
    case IPO:
    case SIGMOID_NORM: {
      T u = sc / nc - sr / nr;
      T dac = dsc / nc, dar = dsr / nr;  // du / dlc, -du / dlr
      if (type == IPO && h.alpha_po != T(0)) {  // AlphaPO on the averaged log-probs
        T fa, fb;
        u = alphapo(lc / nc, h.alpha_po, fa) - alphapo(lr / nr, h.alpha_po, fb);
        dac = fa / nc;
        dar = fb / nr;
      }
      T du;
      if (type == IPO) {
        const T v = u - T(1) / (T(2) * beta);
        loss = v * v;
        du = T(2) * v;
      } else {
        loss = softplus(-beta * u);
        du = -beta * sigmoid(-beta * u);
      }
      gc = du * dac;
      gr = -du * dar;
      return loss;
    }
    case EXO_PAIR: {
      const T q = sigmoid(x), p = sigmoid(-x);
      const T log_pw = std::log1p(-h.ls), log_pl = std::log(h.ls);
      loss = q * (-softplus(-x) - log_pw) + p * (-softplus(x) - log_pl);
      dx = q * p * (x - log_pw + log_pl);
      break;
    }
    case ROBUST:
      loss = ((T(1) - h.ls) * softplus(-x) - h.ls * softplus(x)) / (T(1) - T(2) * h.ls);
      dx = (-(T(1) - h.ls) * sigmoid(-x) - h.ls * sigmoid(x)) / (T(1) - T(2) * h.ls);
      break;
    case DISCOPOP: {
      const T m = sigmoid(x / h.tau);
      const T sp = softplus(-x);
      const T e = std::exp(-x - softplus(-x / h.tau));  // exp(-x) * m without inf * 0
      loss = sp * (T(1) - m) + e;
      dx = -sigmoid(-x) * (T(1) - m) - sp * m * (T(1) - m) / h.tau + e * (-T(1) + (T(1) - m) / h.tau);
      break;
    }
    case SIMPO: {  // CPO's simpo: smoothed logistic of beta * (length-averaged margin) - gamma
      T fa, fb;
      const T y = beta * (alphapo(lc / nc, h.alpha_po, fa) - alphapo(lr / nr, h.alpha_po, fb)) - h.gamma;
      loss = (T(1) - h.ls) * softplus(-y) + h.ls * softplus(y);
      const T dy = beta * smoothed_grad(y, h.ls);
      gc = dy * fa / nc;
      gr = -dy * fb / nr;
      return loss;
    }
    case ORPO: {  // beta * softplus(-log odds ratio) of the length-averaged log-probs a, b
      const T a = lc / nc, b = lr / nr;
      const T lo = (a - b) - (log1mexp(a) - log1mexp(b));
      T sg;
      softplus_sigmoid_neg(lo, loss, sg);
      loss *= beta;
      // d lo / d a = 1 / (1 - e^a) = -1 / expm1(a)
      gc = beta * sg / std::expm1(a) / nc;
      gr = -beta * sg / std::expm1(b) / nr;
      return loss;
    }
    case NCA_PAIR: {
      const T a = beta * lc, b = beta * lr;
      loss = softplus(-a) + T(0.5) * softplus(a) + T(0.5) * softplus(b);
      gc = beta * (-sigmoid(-a) + T(0.5) * sigmoid(a));
      gr = beta * T(0.5) * sigmoid(b);
      return loss;
    }
    case BCO_PAIR: {
      const T a = beta * lc, b = beta * lr;
      loss = softplus(-a) + softplus(b);
      gc = -beta * sigmoid(-a);
      gr = beta * sigmoid(b);
      return loss;
    }
    case SPPO_HARD: {
      const T a = lc - T(0.5) / beta, b = lr + T(0.5) / beta;
      gc = T(2) * a;
      gr = T(2) * b;
      return a * a + b * b;
    }
    case APO_ZERO: {
      const T a = sigmoid(beta * lc), b = sigmoid(beta * lr);
      gc = -beta * a * (T(1) - a);
      gr = beta * b * (T(1) - b);
      return T(1) - a + b;
    }
    case APO_DOWN: {
      const T a = sigmoid(beta * lc), b = sigmoid(beta * (lc - lr));
      gc = beta * a * (T(1) - a) - beta * b * (T(1) - b);
      gr = beta * b * (T(1) - b);
      return a + T(1) - b;
    }
    default:
      break;
  }
  gc = beta * dx * dsc;
  gr = -beta * dx * dsr;
  return loss;
}

template <typename S>
void preference_kernel(const at::Tensor& chosen, const at::Tensor& rejected, const at::Tensor& extra,
                       const at::Tensor& ref_chosen, const at::Tensor& ref_rejected, const at::Tensor& aux_chosen,
                       const at::Tensor& aux_rejected, const at::Tensor& extra_lengths,
                       const at::Tensor& chosen_lengths,
                       const at::Tensor& rejected_lengths, const at::Tensor& pair_weights,
                       const std::vector<int64_t>& types, const std::vector<double>& weights,
                       const std::vector<double>& hyper, at::Tensor& loss_out, at::Tensor& grad_c_out,
                       at::Tensor& grad_r_out, at::Tensor& grad_e_out, at::Tensor& metrics_out) {
  using T = Acc<S>;
  const int64_t n = chosen.numel();
  const S* c = chosen.data_ptr<S>();
  const S* r = rejected.data_ptr<S>();
  const T* rc = ref_chosen.data_ptr<T>();
  const T* rr = ref_rejected.data_ptr<T>();
  const T* lenc = chosen_lengths.data_ptr<T>();
  const T* lenr = rejected_lengths.data_ptr<T>();
  const T* pw = pair_weights.data_ptr<T>();
  const S* ex = extra.data_ptr<S>();
  const T* ac = aux_chosen.data_ptr<T>();
  const T* ar = aux_rejected.data_ptr<T>();
  const T* lene = extra_lengths.data_ptr<T>();
  T* gc = grad_c_out.data_ptr<T>();
  T* gr = grad_r_out.data_ptr<T>();
  T* ge = grad_e_out.data_ptr<T>();
  const Hyper<T> h{T(hyper[0]), T(hyper[1]), T(hyper[3]),  T(hyper[4]),  T(hyper[5]),  T(hyper[6]),
                   T(hyper[7]), T(hyper[8]), T(hyper[9]),  T(hyper[10]), T(hyper[11]), T(hyper[12]),
                   int(hyper[2])};
  const double inv_n = 1.0 / double(std::max<int64_t>(n, 1));
  std::fill(gc, gc + n, T(0));
  std::fill(gr, gr + n, T(0));
  std::fill(ge, ge + n, T(0));
  double total = 0;

  // sft: one token-mean NLL for every pair, and the mean of the pair weights it is scaled by.
  double sum_c = 0, sum_len = 0, sum_w = 0;
  const bool has_sft = std::find(types.begin(), types.end(), int64_t(SFT)) != types.end();
  for (int64_t i = 0; has_sft && i < n; ++i) {
    sum_c += double(T(c[i]));
    sum_len += double(lenc[i]);
    sum_w += double(pw[i]);
  }
  sum_len = std::max(sum_len, 1.0);
  // tpo_nll: the same over the gold (extra) log-probs and lengths
  double sum_e = 0, sum_elen = 0, sum_ew = 0;
  const bool has_tpo = std::find(types.begin(), types.end(), int64_t(TPO_NLL)) != types.end();
  for (int64_t i = 0; has_tpo && i < n; ++i) {
    sum_e += double(T(ex[i]));
    sum_elen += double(lene[i]);
    sum_ew += double(pw[i]);
  }
  sum_elen = std::max(sum_elen, 1.0);

  // The per-pair loss types: one pass over the pairs, every such type per pair (in the list's order).
  std::vector<std::pair<int, double>> per_pair;
  for (size_t k = 0; k < types.size(); ++k) {
    const int type = int(types[k]);
    if (type != SFT && type != TPO_NLL && type != AOT && type != AOT_UNPAIRED) per_pair.emplace_back(type, weights[k]);
  }
  const int64_t chunks = (n + CHUNK - 1) / CHUNK;
  if (!per_pair.empty()) {
    std::vector<double> part(chunks, 0.0);
    // One chunk's pairs. kind: a loss type code known at compile time (a one-type list, the common call:
    // the switches of pair_loss / paper_loss fold away), or -1 for a list walked per pair.
    auto chunk_sum = [&](auto kind, int64_t ch) -> double {
      constexpr int K = decltype(kind)::value;
      double acc = 0;
      for (int64_t i = ch * CHUNK, e = std::min(n, (ch + 1) * CHUNK); i < e; ++i) {
        const T ci = T(c[i]), ri = T(r[i]);
        const T lc = ci - rc[i], lr = ri - rr[i];
        const T nci = std::max(lenc[i], T(1)), nri = std::max(lenr[i], T(1));
        auto one = [&](int type, double w) {
          T dc, dr, de = 0;
          const T l = type >= SPPO ? paper_loss<T>(type, ci, ri, rc[i], rr[i], T(ex[i]), ac[i], ar[i], h, dc, dr, de)
                                   : pair_loss<T>(type, lc, lr, nci, nri, h, dc, dr);
          const T scale = T(w * inv_n) * pw[i];
          acc += double(l) * double(pw[i]) * w * inv_n;
          gc[i] += scale * dc;
          gr[i] += scale * dr;
          ge[i] += scale * de;
        };
        if constexpr (K >= 0) {
          one(K, per_pair[0].second);
        } else {
          for (const auto& [type, w] : per_pair) one(type, w);
        }
      }
      return acc;
    };
    auto run = [&](auto kind) {
      at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t ch = c0; ch < c1; ++ch) part[ch] = chunk_sum(kind, ch);
      });
    };
#define RLK_ONE_TYPE(K) \
  case K:               \
    run(std::integral_constant<int, K>{}); \
    break;
    if (per_pair.size() == 1) {
      switch (per_pair[0].first) {
        RLK_ONE_TYPE(SIGMOID) RLK_ONE_TYPE(HINGE) RLK_ONE_TYPE(IPO) RLK_ONE_TYPE(EXO_PAIR) RLK_ONE_TYPE(NCA_PAIR)
        RLK_ONE_TYPE(ROBUST) RLK_ONE_TYPE(BCO_PAIR) RLK_ONE_TYPE(SPPO_HARD) RLK_ONE_TYPE(APO_ZERO)
        RLK_ONE_TYPE(APO_DOWN) RLK_ONE_TYPE(DISCOPOP) RLK_ONE_TYPE(SIGMOID_NORM) RLK_ONE_TYPE(SIMPO)
        RLK_ONE_TYPE(ORPO) RLK_ONE_TYPE(SPPO) RLK_ONE_TYPE(XPO) RLK_ONE_TYPE(VPO) RLK_ONE_TYPE(INPO) RLK_ONE_TYPE(CPL)
        RLK_ONE_TYPE(STEP_APO)
        default:
          run(std::integral_constant<int, -1>{});
      }
    } else {
      run(std::integral_constant<int, -1>{});
    }
#undef RLK_ONE_TYPE
    for (int64_t ch = 0; ch < chunks; ++ch) total += part[ch];
  }

  std::vector<int64_t> order_a, order_b;
  std::vector<T> key_a, key_b;
  for (size_t k = 0; k < types.size(); ++k) {
    const int type = int(types[k]);
    const double w = weights[k];
    if (type == SFT) {
      total += w * (-sum_c / sum_len) * sum_w * inv_n;
      const T g = T(w * (-1.0 / sum_len) * sum_w * inv_n);
      for (int64_t i = 0; i < n; ++i) gc[i] += g;
    } else if (type == TPO_NLL) {
      total += w * (-sum_e / sum_elen) * sum_ew * inv_n;
      const T g = T(w * (-1.0 / sum_elen) * sum_ew * inv_n);
      for (int64_t i = 0; i < n; ++i) ge[i] += g;
    } else if (type == AOT || type == AOT_UNPAIRED) {
      // loss at sorted position j: smoothed logistic of beta * (sort(a)[j] - sort(b)[j]); a's element
      // of rank j gets +d, b's element of rank j gets -d. aot: a = c - r, b = ref_c - ref_r, so b is a
      // constant; aot_unpaired: a = c - ref_c, b = r - ref_r.
      key_a.resize(n);
      key_b.resize(n);
      for (int64_t i = 0; i < n; ++i) {
        const T tc = T(c[i]), tr = T(r[i]);
        key_a[i] = type == AOT ? tc - tr : tc - rc[i];
        key_b[i] = type == AOT ? rc[i] - rr[i] : tr - rr[i];
      }
      order_a.resize(n);
      order_b.resize(n);
      std::iota(order_a.begin(), order_a.end(), 0);
      std::iota(order_b.begin(), order_b.end(), 0);
      // NaN-last stable order, as torch.sort(stable=True)
      auto less = [](const std::vector<T>& key) {
        return [&key](int64_t i, int64_t j) {
          const T a = key[i], b = key[j];
          if (std::isnan(a)) return false;
          if (std::isnan(b)) return true;
          return a < b;
        };
      };
      std::stable_sort(order_a.begin(), order_a.end(), less(key_a));
      std::stable_sort(order_b.begin(), order_b.end(), less(key_b));
      for (int64_t j = 0; j < n; ++j) {
        const int64_t ia = order_a[j], ib = order_b[j];
        const T x = h.beta * (key_a[ia] - key_b[ib]);
        const T pj = pw[j];  // aot rejects pair weights in the op; the position's weight otherwise
        total += w * double((T(1) - h.ls) * softplus(-x) + h.ls * softplus(x)) * double(pj) * inv_n;
        const T d = T(w * inv_n) * pj * h.beta * smoothed_grad(x, h.ls);
        if (type == AOT) {
          gc[ia] += d;
          gr[ia] -= d;
        } else {
          gc[ia] += d;
          gr[ib] -= d;
        }
      }
    }
  }

  // simpo / orpo / a reference-free ipo: the CPO / ORPO / TPO trainers log length-averaged log-probs
  // (the op decides: hyper[13])
  const bool averaged = hyper[13] != 0.0;
  const bool has_orpo = std::find(types.begin(), types.end(), int64_t(ORPO)) != types.end();
  std::vector<std::array<double, N_METRICS>> mpart(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t ch = c0; ch < c1; ++ch) {
      std::array<double, N_METRICS> m{};
      for (int64_t i = ch * CHUNK, e = std::min(n, (ch + 1) * CHUNK); i < e; ++i) {
        const T ci = averaged ? T(c[i]) / std::max(lenc[i], T(1)) : T(c[i]);
        const T ri = averaged ? T(r[i]) / std::max(lenr[i], T(1)) : T(r[i]);
        T unused;
        // AlphaPO logs beta times its rewards (reference-free: the ref slots are 0)
        const T cr = h.beta * alphapo(ci - rc[i], h.alpha_po, unused);
        const T rj = h.beta * alphapo(ri - rr[i], h.alpha_po, unused);
        m[0] += cr;
        m[1] += rj;
        m[2] += cr - rj;
        m[3] += cr > rj ? 1.0 : 0.0;
        m[4] += ci;
        m[5] += ri;
        if (has_orpo) {  // ORPO's log odds ratio of the averaged log-probs
          const T lo = (ci - ri) - (log1mexp(ci) - log1mexp(ri));
          m[6] -= softplus(-lo);
          m[7] += lo;
        }
      }
      mpart[ch] = m;
    }
  });
  double m[N_METRICS] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t ch = 0; ch < chunks; ++ch) {
    for (int k = 0; k < N_METRICS; ++k) m[k] += mpart[ch][k];
  }
  T* mo = metrics_out.data_ptr<T>();
  for (int k = 0; k < N_METRICS; ++k) mo[k] = T(m[k] * inv_n);
  loss_out.data_ptr<T>()[0] = T(total);
}

void check_aux(const at::Tensor& t, const at::Tensor& chosen, at::ScalarType acc, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == chosen.sizes(), "preference_loss: ", name, " must have shape ", chosen.sizes(),
                    ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == acc, "preference_loss: ", name, " must be ", acc, ", got ", t.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> preference_loss_cpu(
    const at::Tensor& chosen, const at::Tensor& rejected, const at::Tensor& extra, const at::Tensor& ref_chosen,
    const at::Tensor& ref_rejected, const at::Tensor& aux_chosen, const at::Tensor& aux_rejected,
    const at::Tensor& extra_lengths, const at::Tensor& chosen_lengths, const at::Tensor& rejected_lengths,
    const at::Tensor& pair_weights, at::IntArrayRef loss_types, at::ArrayRef<double> loss_weights,
    at::ArrayRef<double> hyper) {
  TORCH_CHECK_VALUE(chosen.dim() == 1, "preference_loss: chosen_logps must be [B], got shape ", chosen.sizes());
  TORCH_CHECK_VALUE(rejected.sizes() == chosen.sizes(), "preference_loss: rejected_logps must have shape ",
                    chosen.sizes(), ", got ", rejected.sizes());
  TORCH_CHECK_TYPE(rejected.scalar_type() == chosen.scalar_type(),
                   "preference_loss: rejected_logps must have chosen_logps' dtype ", chosen.scalar_type(), ", got ",
                   rejected.scalar_type());
  TORCH_CHECK_VALUE(loss_types.size() == loss_weights.size() && !loss_types.empty(),
                    "preference_loss: loss_types and loss_weights must be non-empty and of one length");
  TORCH_CHECK_VALUE(hyper.size() == N_HYPER, "preference_loss: hyper must have ", N_HYPER, " entries");
  for (int64_t t : loss_types) {
    TORCH_CHECK_VALUE(t >= 0 && t < N_LOSS_TYPES, "preference_loss: unknown loss type code ", t);
  }
  const at::ScalarType acc = chosen.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check_aux(ref_chosen, chosen, acc, "ref_chosen_logps");
  check_aux(ref_rejected, chosen, acc, "ref_rejected_logps");
  check_aux(chosen_lengths, chosen, acc, "chosen_lengths");
  check_aux(rejected_lengths, chosen, acc, "rejected_lengths");
  check_aux(pair_weights, chosen, acc, "pair_weights");
  check_aux(aux_chosen, chosen, acc, "aux_chosen");
  check_aux(aux_rejected, chosen, acc, "aux_rejected");
  check_aux(extra_lengths, chosen, acc, "extra_lengths");
  TORCH_CHECK_VALUE(extra.sizes() == chosen.sizes(), "preference_loss: extra must have shape ", chosen.sizes(),
                    ", got ", extra.sizes());
  TORCH_CHECK_TYPE(extra.scalar_type() == chosen.scalar_type(), "preference_loss: extra must have chosen_logps' dtype ",
                   chosen.scalar_type(), ", got ", extra.scalar_type());
  const auto opts = chosen.options().dtype(acc);
  at::Tensor loss = at::empty({}, opts);
  at::Tensor grad_c = at::empty(chosen.sizes(), opts);
  at::Tensor grad_r = at::empty(chosen.sizes(), opts);
  at::Tensor grad_e = at::empty(chosen.sizes(), opts);
  at::Tensor metrics = at::empty({N_METRICS}, opts);
  const std::vector<int64_t> types(loss_types.begin(), loss_types.end());
  const std::vector<double> weights(loss_weights.begin(), loss_weights.end());
  const std::vector<double> hyp(hyper.begin(), hyper.end());
  const at::Tensor c = chosen.contiguous(), r = rejected.contiguous();
  const at::Tensor rc = ref_chosen.contiguous(), rr = ref_rejected.contiguous();
  const at::Tensor lc = chosen_lengths.contiguous(), lr = rejected_lengths.contiguous();
  const at::Tensor pw = pair_weights.contiguous();
  const at::Tensor ex = extra.contiguous(), ac = aux_chosen.contiguous(), ar = aux_rejected.contiguous();
  const at::Tensor le = extra_lengths.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, chosen.scalar_type(), "preference_loss", [&] {
    preference_kernel<scalar_t>(c, r, ex, rc, rr, ac, ar, le, lc, lr, pw, types, weights, hyp, loss, grad_c, grad_r,
                                grad_e, metrics);
  });
  return {loss, grad_c, grad_r, grad_e, metrics};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> preference_loss_meta(
    const at::Tensor& chosen, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, at::IntArrayRef, at::ArrayRef<double>, at::ArrayRef<double>) {
  const at::ScalarType acc = chosen.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = chosen.options().dtype(acc);
  return {at::empty({}, opts), at::empty(chosen.sizes(), opts), at::empty(chosen.sizes(), opts),
          at::empty(chosen.sizes(), opts), at::empty({N_METRICS}, opts)};
}


// KTO (TRL 1.16 KTOTrainer, rlkern/ops/preference.py kto_loss): one pass over the M KL completions
// for the detached reference point kl = max(mean(kl_logps - ref_kl_logps), 0), one over the B
// completions for the loss, its gradient and the metrics. loss_type 0: kto, 1: apo_zero_unpaired,
// 2: bco (rlkern/ops/preference.py bco_loss: the reference point is the caller's running mean of the
// rewards delta, given as the mean of kl_logps - ref_kl_logps without the clamp, in reward units).
// hyper: beta, desirable_weight, undesirable_weight; weights: the undesirable completions' extra
// per-completion weights (BCO's UDM density ratios; ones otherwise).
constexpr int N_KTO_METRICS = 6;

template <typename S>
void kto_kernel(const at::Tensor& policy, const at::Tensor& ref, const at::Tensor& labels, const at::Tensor& weights,
                const at::Tensor& kl_logps,
                const at::Tensor& ref_kl_logps, int64_t loss_type, const std::vector<double>& hyper,
                at::Tensor& loss_out, at::Tensor& grad_out, at::Tensor& metrics_out) {
  using T = Acc<S>;
  const int64_t n = policy.numel(), m = kl_logps.numel();
  const S* x = policy.data_ptr<S>();
  const T* rf = ref.data_ptr<T>();
  const T* lab = labels.data_ptr<T>();
  const T* pw = weights.data_ptr<T>();
  const T* kx = kl_logps.data_ptr<T>();
  const T* kr = ref_kl_logps.data_ptr<T>();
  T* g = grad_out.data_ptr<T>();
  const T beta = T(hyper[0]), dw = T(hyper[1]), uw = T(hyper[2]);
  double kl_sum = 0;
  for (int64_t j = 0; loss_type != 1 && j < m; ++j) kl_sum += double(kx[j] - kr[j]);
  const double point = m > 0 && loss_type != 1 ? kl_sum / double(m) : 0.0;
  const T kl = T(loss_type == 2 ? point : std::max(point, 0.0));
  const double inv_n = 1.0 / double(std::max<int64_t>(n, 1));
  double total = 0, rc = 0, rr = 0, lc = 0, lrj = 0, nc = 0, nr = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T xi = T(x[i]);
    const T lr = xi - rf[i];
    const bool good = lab[i] != T(0);
    // kto: desirable 1 - sigmoid(z), undesirable 1 - sigmoid(-z) = sigmoid(z), z = beta * (lr - kl);
    // apo_zero_unpaired: the same with kl = 0
    T l, d;
    if (loss_type == 2) {  // bco: softplus(-z) / softplus(z), z = beta * lr - delta
      const T z = beta * lr - kl;
      if (good) {
        l = dw * softplus(-z);
        d = -dw * beta * sigmoid(-z);
      } else {
        l = uw * pw[i] * softplus(z);
        d = uw * pw[i] * beta * sigmoid(z);
      }
    } else {
      const T z = beta * (lr - kl);
      const T s = sigmoid(z);
      const T ds = beta * s * (T(1) - s);
      l = good ? dw * (T(1) - s) : uw * pw[i] * s;
      d = good ? -dw * ds : uw * pw[i] * ds;
    }
    if (good) {
      rc += double(beta * lr);
      lc += double(xi);
      nc += 1;
    } else {
      rr += double(beta * lr);
      lrj += double(xi);
      nr += 1;
    }
    total += double(l);
    g[i] = T(double(d) * inv_n);
  }
  T* mo = metrics_out.data_ptr<T>();
  const double mrc = rc / std::max(nc, 1.0), mrr = rr / std::max(nr, 1.0);
  mo[0] = kl;
  mo[1] = T(mrc);
  mo[2] = T(mrr);
  mo[3] = nc > 0 && nr > 0 ? T(mrc - mrr) : T(0);
  mo[4] = T(lc / std::max(nc, 1.0));
  mo[5] = T(lrj / std::max(nr, 1.0));
  loss_out.data_ptr<T>()[0] = T(total * inv_n);
}

void check_kto(const at::Tensor& t, at::IntArrayRef sizes, at::ScalarType acc, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == sizes, "kto_loss: ", name, " must have shape ", sizes, ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == acc, "kto_loss: ", name, " must be ", acc, ", got ", t.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kto_loss_cpu(const at::Tensor& policy, const at::Tensor& ref,
                                                            const at::Tensor& labels, const at::Tensor& weights,
                                                            const at::Tensor& kl_logps,
                                                            const at::Tensor& ref_kl_logps, int64_t loss_type,
                                                            at::ArrayRef<double> hyper) {
  TORCH_CHECK_VALUE(policy.dim() == 1, "kto_loss: policy_logps must be [B], got shape ", policy.sizes());
  TORCH_CHECK_VALUE(loss_type >= 0 && loss_type <= 2, "kto_loss: unknown loss type code ", loss_type);
  TORCH_CHECK_VALUE(hyper.size() == 3, "kto_loss: hyper must have 3 entries");
  const at::ScalarType acc = policy.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check_kto(ref, policy.sizes(), acc, "ref_logps");
  check_kto(labels, policy.sizes(), acc, "labels");
  check_kto(weights, policy.sizes(), acc, "weights");
  TORCH_CHECK_VALUE(kl_logps.dim() == 1, "kto_loss: kl_logps must be [M], got shape ", kl_logps.sizes());
  check_kto(kl_logps, kl_logps.sizes(), acc, "kl_logps");
  check_kto(ref_kl_logps, kl_logps.sizes(), acc, "ref_kl_logps");
  const auto opts = policy.options().dtype(acc);
  at::Tensor loss = at::empty({}, opts);
  at::Tensor grad = at::empty(policy.sizes(), opts);
  at::Tensor metrics = at::empty({N_KTO_METRICS}, opts);
  const std::vector<double> hyp(hyper.begin(), hyper.end());
  const at::Tensor x = policy.contiguous(), rf = ref.contiguous(), lab = labels.contiguous(), pw = weights.contiguous();
  const at::Tensor kx = kl_logps.contiguous(), kr = ref_kl_logps.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, policy.scalar_type(), "kto_loss", [&] {
    kto_kernel<scalar_t>(x, rf, lab, pw, kx, kr, loss_type, hyp, loss, grad, metrics);
  });
  return {loss, grad, metrics};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kto_loss_meta(const at::Tensor& policy, const at::Tensor&,
                                                             const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                             const at::Tensor&,
                                                             int64_t, at::ArrayRef<double>) {
  const at::ScalarType acc = policy.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = policy.options().dtype(acc);
  return {at::empty({}, opts), at::empty(policy.sizes(), opts), at::empty({N_KTO_METRICS}, opts)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rlkern, m) {
  m.def(
      "cpp_preference_loss(Tensor chosen_logps, Tensor rejected_logps, Tensor extra_logps, Tensor ref_chosen_logps, "
      "Tensor ref_rejected_logps, Tensor aux_chosen, Tensor aux_rejected, Tensor extra_lengths, "
      "Tensor chosen_lengths, Tensor rejected_lengths, Tensor pair_weights, "
      "int[] loss_types, float[] loss_weights, float[] hyper) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cpp_kto_loss(Tensor policy_logps, Tensor ref_logps, Tensor labels, Tensor weights, Tensor kl_logps, "
      "Tensor ref_kl_logps, "
      "int loss_type, float[] hyper) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rlkern, CPU, m) {
  m.impl("cpp_preference_loss", &preference_loss_cpu);
  m.impl("cpp_kto_loss", &kto_loss_cpu);
}

TORCH_LIBRARY_IMPL(rlkern, Meta, m) {
  m.impl("cpp_preference_loss", &preference_loss_meta);
  m.impl("cpp_kto_loss", &kto_loss_meta);
}
