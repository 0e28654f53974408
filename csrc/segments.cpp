// rlkern CPU kernels of the SPO-chain ops on packed token sequences: cut points, segment
// advantages with the probability mask, and the spread of per-node values over packed tokens
// (torch.ops.rlkern.cpp_spo_cutpoints / cpp_segment_advantages / cpp_broadcast_to_tokens; the ops
// and their semantics: rlkern/ops/segments.py; oracle: rlkern/reference/trees.py).
//
// The two sequence ops are one left-to-right walk per sequence, sequences in parallel; the
// broadcast fills the output, then writes every segment's value over its range, segments in
// parallel (they do not overlap: the op layer checks that on CPU tensors). Compute type: double
// for float64 input, float otherwise (half types are widened); outputs float32 (float64 for
// float64 input), exactly what the PyTorch backend computes: the comparisons exp(logprob) <
// threshold are made in the compute type, against the threshold rounded to it.
#include "common.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>

namespace {

using rlkern::empty_output;

template <typename S>
using Acc = std::conditional_t<std::is_same_v<S, double>, double, float>;

at::ScalarType out_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// f(S{}) for every float dtype an op takes.
template <typename F>
void dispatch_float(const at::Tensor& t, const char* op, const char* name, F&& f) {
  switch (t.scalar_type()) {
    case at::kDouble: return f(double{});
    case at::kFloat: return f(float{});
    case at::kHalf: return f(at::Half{});
    case at::kBFloat16: return f(at::BFloat16{});
    default: TORCH_CHECK_TYPE(false, op, ": ", name, " must be a float tensor, got ", t.scalar_type());
  }
}

void check_packed(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 1, op, ": ", name, " must be packed [T], got shape ", t.sizes());
}

// Sequences per parallel chunk: about kTokens tokens each on average.
int64_t seq_grain(int64_t batch, int64_t total) {
  constexpr int64_t kTokens = 32768;
  return std::max<int64_t>(1, batch * kTokens / std::max<int64_t>(total, 1));
}

// cu_seqlens as int64 [B + 1], checked (0 = cu[0] <= ... <= cu[B] = total): O(B), so that a direct
// call with bad offsets raises instead of reading out of bounds.
at::Tensor offsets(const at::Tensor& cu_seqlens, int64_t total, const char* op) {
  TORCH_CHECK_VALUE(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1, op, ": cu_seqlens must be [B + 1], got shape ",
                    cu_seqlens.sizes());
  TORCH_CHECK_TYPE(cu_seqlens.scalar_type() == at::kLong || cu_seqlens.scalar_type() == at::kInt, op,
                   ": cu_seqlens must be int32 or int64, got ", cu_seqlens.scalar_type());
  at::Tensor cu = cu_seqlens.to(at::kLong).contiguous();
  const int64_t* c = cu.data_ptr<int64_t>();
  const int64_t batch = cu.numel() - 1;
  TORCH_CHECK_VALUE(c[0] == 0 && c[batch] == total, op, ": cu_seqlens must start at 0 and end at ", total, ", got ",
                    c[0], " and ", c[batch]);
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK_VALUE(c[b] <= c[b + 1], op, ": cu_seqlens must be non-decreasing, got ", c[b], " > ", c[b + 1],
                      " at ", b);
  }
  return cu;
}

// ---------------------------------------------------------------------------------------------
// Cut points: every interval-th low-probability token of a sequence, starting with the first.

template <typename S>
void spo_cutpoints_impl(const S* lp, const int64_t* cu, int64_t batch, int64_t total, Acc<S> threshold,
                        int64_t interval, bool* out) {
  using A = Acc<S>;
  at::parallel_for(0, batch, seq_grain(batch, total), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t until = 0;  // low-probability tokens to skip before the next cut
      for (int64_t t = cu[b]; t < cu[b + 1]; ++t) {
        const bool low = std::exp(static_cast<A>(lp[t])) < threshold;
        out[t] = low && until == 0;
        if (low) until = until == 0 ? interval - 1 : until - 1;
      }
    }
  });
}

at::Tensor spo_cutpoints_cpu(const at::Tensor& logprobs, const at::Tensor& cu_seqlens, double threshold,
                             int64_t interval) {
  constexpr const char* op = "spo_cutpoints";
  check_packed(logprobs, op, "logprobs");
  TORCH_CHECK_VALUE(interval >= 1, op, ": interval must be an int >= 1, got ", interval);
  const int64_t total = logprobs.numel();
  const at::Tensor cu = offsets(cu_seqlens, total, op);
  const at::Tensor lp = logprobs.contiguous();
  at::Tensor out = empty_output({total}, logprobs.options().dtype(at::kBool));
  dispatch_float(lp, op, "logprobs", [&](auto s) {
    using S = decltype(s);
    spo_cutpoints_impl<S>(lp.data_ptr<S>(), cu.data_ptr<int64_t>(), cu.numel() - 1, total,
                          static_cast<Acc<S>>(threshold), interval, out.data_ptr<bool>());
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Segment advantages: token t of segment [t_k, t_{k+1}) gets V_{k+1} - V_k (V_{K+1}: the final
// reward), tokens before the first start 0; then the probability mask.

template <typename A, typename V, typename L>
void segment_advantages_impl(const bool* start, const V* cut, const A* reward, const int64_t* cu, int64_t batch,
                             int64_t total, const L* lp, A threshold, A* adv, bool* mask) {
  at::parallel_for(0, batch, seq_grain(batch, total), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t end = cu[b + 1];
      const auto put = [&](int64_t u, int64_t v, A a) {  // tokens [u, v) get a, masked
        if (lp == nullptr) {
          std::fill(adv + u, adv + v, a);
          std::fill(mask + u, mask + v, true);
          return;
        }
        for (int64_t i = u; i < v; ++i) {
          const bool keep = std::exp(static_cast<A>(lp[i])) < threshold;
          mask[i] = keep;
          adv[i] = keep ? a : A(0);
        }
      };
      int64_t t = cu[b];
      while (t < end && !start[t]) ++t;
      put(cu[b], t, A(0));
      while (t < end) {  // t opens a segment
        int64_t next = t + 1;
        while (next < end && !start[next]) ++next;
        const A value_next = next < end ? static_cast<A>(cut[next]) : reward[b];
        put(t, next, value_next - static_cast<A>(cut[t]));
        t = next;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> segment_advantages_cpu(const at::Tensor& segment_start,
                                                          const at::Tensor& cut_values,
                                                          const at::Tensor& final_reward,
                                                          const at::Tensor& cu_seqlens,
                                                          const std::optional<at::Tensor>& logprobs,
                                                          double threshold) {
  constexpr const char* op = "segment_advantages";
  check_packed(segment_start, op, "segment_start");
  TORCH_CHECK_TYPE(segment_start.scalar_type() == at::kBool, op, ": segment_start must be bool, got ",
                   segment_start.scalar_type());
  const int64_t total = segment_start.numel();
  check_packed(cut_values, op, "cut_values");
  TORCH_CHECK_VALUE(cut_values.numel() == total, op, ": cut_values must be [T] = [", total, "], got ",
                    cut_values.sizes());
  const at::Tensor cu = offsets(cu_seqlens, total, op);
  const int64_t batch = cu.numel() - 1;
  TORCH_CHECK_VALUE(final_reward.dim() == 1 && final_reward.numel() == batch, op, ": final_reward must be [B] = [",
                    batch, "], got ", final_reward.sizes());
  if (logprobs) {
    check_packed(*logprobs, op, "logprobs");
    TORCH_CHECK_VALUE(logprobs->numel() == total, op, ": logprobs must be [T] = [", total, "], got ",
                      logprobs->sizes());
  }
  const auto type = out_type(cut_values);
  const at::Tensor starts = segment_start.contiguous();
  const at::Tensor cut = cut_values.contiguous();
  const at::Tensor reward = final_reward.to(type).contiguous();
  const at::Tensor lp = logprobs ? logprobs->contiguous() : cut;
  at::Tensor adv = empty_output({total}, cut_values.options().dtype(type));
  at::Tensor mask = empty_output({total}, cut_values.options().dtype(at::kBool));
  dispatch_float(cut, op, "cut_values", [&](auto v) {
    using V = decltype(v);
    using A = Acc<V>;
    dispatch_float(lp, op, "logprobs", [&](auto l) {
      using L = decltype(l);
      segment_advantages_impl<A, V, L>(starts.data_ptr<bool>(), cut.data_ptr<V>(), reward.data_ptr<A>(),
                                       cu.data_ptr<int64_t>(), batch, total, logprobs ? lp.data_ptr<L>() : nullptr,
                                       static_cast<A>(threshold), adv.data_ptr<A>(), mask.data_ptr<bool>());
    });
  });
  return {adv, mask};
}

// ---------------------------------------------------------------------------------------------
// Node values -> packed tokens.

at::Tensor index_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt,
                   "broadcast_to_tokens: ", name, " must be int32 or int64, got ", t.scalar_type());
  return t.to(at::kLong).contiguous();
}

at::Tensor broadcast_to_tokens_cpu(const at::Tensor& node_values, const at::Tensor& segment_start,
                                   const at::Tensor& segment_end, int64_t num_tokens,
                                   const std::optional<at::Tensor>& node_index, double fill) {
  constexpr const char* op = "broadcast_to_tokens";
  TORCH_CHECK_VALUE(node_values.dim() == 1, op, ": node_values must be [M], got shape ", node_values.sizes());
  TORCH_CHECK_VALUE(segment_start.dim() == 1 && segment_start.sizes() == segment_end.sizes(), op,
                    ": segment_start and segment_end must both be [S], got ", segment_start.sizes(), " and ",
                    segment_end.sizes());
  TORCH_CHECK_VALUE(num_tokens >= 0, op, ": num_tokens must be an int >= 0, got ", num_tokens);
  const int64_t m = node_values.numel(), segments = segment_start.numel();
  if (node_index) {
    TORCH_CHECK_VALUE(node_index->sizes() == segment_start.sizes(), op, ": node_index must have shape ",
                      segment_start.sizes(), ", got ", node_index->sizes());
  } else {
    TORCH_CHECK_VALUE(segments == m, op, ": without node_index there must be one segment per node: ", m,
                      " nodes, ", segments, " segments");
  }
  const at::Tensor start = index_tensor(segment_start, "segment_start");
  const at::Tensor end = index_tensor(segment_end, "segment_end");
  const at::Tensor index = node_index ? index_tensor(*node_index, "node_index") : start;
  const at::Tensor values = node_values.contiguous();
  at::Tensor out = empty_output({num_tokens}, node_values.options().dtype(out_type(node_values)));
  dispatch_float(values, op, "node_values", [&](auto s) {
    using S = decltype(s);
    using A = Acc<S>;
    const S* v = values.data_ptr<S>();
    const int64_t* st = start.data_ptr<int64_t>();
    const int64_t* en = end.data_ptr<int64_t>();
    const int64_t* ix = node_index ? index.data_ptr<int64_t>() : nullptr;
    A* o = out.data_ptr<A>();
    const A f = static_cast<A>(fill);
    at::parallel_for(0, num_tokens, 32768, [&](int64_t t0, int64_t t1) { std::fill(o + t0, o + t1, f); });
    at::parallel_for(0, segments, seq_grain(segments, num_tokens), [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t s0 = st[k], s1 = en[k];
        TORCH_CHECK_VALUE(0 <= s0 && s0 <= s1 && s1 <= num_tokens, op, ": segment ", k, " = [", s0, ", ", s1,
                          ") is not within [0, num_tokens=", num_tokens, "]");
        const int64_t n = ix ? ix[k] : k;
        TORCH_CHECK_VALUE(0 <= n && n < m, op, ": node_index[", k, "] = ", n, " is not a node in [0, ", m, ")");
        std::fill(o + s0, o + s1, static_cast<A>(v[n]));
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Meta

at::Tensor spo_cutpoints_meta(const at::Tensor& logprobs, const at::Tensor& /*cu_seqlens*/, double /*threshold*/,
                              int64_t /*interval*/) {
  return at::empty(logprobs.sizes(), logprobs.options().dtype(at::kBool));
}

std::tuple<at::Tensor, at::Tensor> segment_advantages_meta(const at::Tensor& segment_start,
                                                           const at::Tensor& cut_values,
                                                           const at::Tensor& /*final_reward*/,
                                                           const at::Tensor& /*cu_seqlens*/,
                                                           const std::optional<at::Tensor>& /*logprobs*/,
                                                           double /*threshold*/) {
  return {at::empty(segment_start.sizes(), cut_values.options().dtype(out_type(cut_values))),
          at::empty(segment_start.sizes(), cut_values.options().dtype(at::kBool))};
}

at::Tensor broadcast_to_tokens_meta(const at::Tensor& node_values, const at::Tensor& /*segment_start*/,
                                    const at::Tensor& /*segment_end*/, int64_t num_tokens,
                                    const std::optional<at::Tensor>& /*node_index*/, double /*fill*/) {
  return at::empty({num_tokens}, node_values.options().dtype(out_type(node_values)));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rlkern, m) {
  m.def("cpp_spo_cutpoints(Tensor logprobs, Tensor cu_seqlens, float threshold, int interval) -> Tensor");
  m.def(
      "cpp_segment_advantages(Tensor segment_start, Tensor cut_values, Tensor final_reward, Tensor cu_seqlens, "
      "Tensor? logprobs, float threshold) -> (Tensor, Tensor)");
  m.def(
      "cpp_broadcast_to_tokens(Tensor node_values, Tensor segment_start, Tensor segment_end, int num_tokens, "
      "Tensor? node_index, float fill) -> Tensor");
}

TORCH_LIBRARY_IMPL(rlkern, CPU, m) {
  m.impl("cpp_spo_cutpoints", &spo_cutpoints_cpu);
  m.impl("cpp_segment_advantages", &segment_advantages_cpu);
  m.impl("cpp_broadcast_to_tokens", &broadcast_to_tokens_cpu);
}

TORCH_LIBRARY_IMPL(rlkern, Meta, m) {
  m.impl("cpp_spo_cutpoints", &spo_cutpoints_meta);
  m.impl("cpp_segment_advantages", &segment_advantages_meta);
  m.impl("cpp_broadcast_to_tokens", &broadcast_to_tokens_meta);
}
