// rlkern CPU kernels: values and advantages over a forest given as parent indices
// (torch.ops.rlkern.trees_values / trees_advantages; oracle: rlkern/reference/trees.py).
//
// One O(M) structure pass orders the nodes breadth-first, level by level, so that the children of
// every node occupy a contiguous range of positions (in increasing node index, the summation order
// of the reference). Values are then one bottom-up pass (deepest level first) and advantages one
// top-down pass; both are parallel within a level. All arithmetic is in double; outputs are
// float32 (float64 for float64 rewards). A bad parent array raises ValueError (c10::ValueError)
// naming the first offending node, with the messages of the reference's check_forest.
//
// Speed: with shuffled node order every structure pass is a stream of cache misses (counting
// children, filling the children lists, the breadth-first walk, the final scatter), so the passes
// prefetch the addresses they will need a few iterations ahead, store positions as int32 when
// M < 2^31, and back their scratch arrays by 2 MiB pages (fewer TLB misses). Building the order is
// most of the cost: trees_advantages can also return the values from the same build.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace {

constexpr int64_t kGrain = 4096;

// Scratch arrays are read at random (parents, children lists): on Linux they are backed by 2 MiB
// pages where the kernel allows it (THP "madvise" mode), which removes most TLB misses.
struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
template <typename T>
using Buffer = std::unique_ptr<T[], FreeDeleter>;

template <typename T>
Buffer<T> uninit(int64_t n) {
  constexpr size_t kHuge = size_t(1) << 21;
  const size_t bytes = sizeof(T) * static_cast<size_t>(n > 0 ? n : 1);
  void* p = nullptr;
  if (bytes >= 2 * kHuge) {
    p = std::aligned_alloc(kHuge, (bytes + kHuge - 1) / kHuge * kHuge);
#ifdef MADV_HUGEPAGE
    if (p) madvise(p, (bytes + kHuge - 1) / kHuge * kHuge, MADV_HUGEPAGE);
#endif
  }
  if (!p) p = std::malloc(bytes);
  TORCH_CHECK(p, "rlkern.trees: out of memory allocating ", bytes, " bytes");
  return Buffer<T>(static_cast<T*>(p));
}

// Every pass below walks one array in order and touches another at random; the random addresses
// are known a few iterations ahead, so they are prefetched (the loops are too irregular for the
// out-of-order core to overlap the misses by itself).
constexpr int64_t kAhead = 16;
template <typename T>
inline void prefetch(const T* p, bool write = false) {
#if defined(__GNUC__) || defined(__clang__)
  if (write) __builtin_prefetch(p, 1, 1); else __builtin_prefetch(p, 0, 1);
#endif
}

// Positions are breadth-first: level d occupies [level[d], level[d+1]); the children of the node
// at position q occupy [first_child[q], first_child[q] + nchild[q]).
// I: int32_t when M < 2^31 (half the memory traffic of these mostly random-access arrays),
// else int64_t; index arithmetic is int64 throughout.
template <typename I>
struct Order {
  int64_t m = 0;
  Buffer<I> node;        // node id at each position
  Buffer<I> parent_pos;  // position of the parent, -1 for roots
  Buffer<I> first_child;
  Buffer<I> nchild;
  std::vector<int64_t> level;
};

std::string cycle_message(const int64_t* parent, int64_t m, int64_t start) {
  std::vector<int64_t> seen(m, -1);
  int64_t j = start;
  for (int64_t step = 0; seen[j] < 0; ++step) {
    seen[j] = step;
    j = parent[j];
  }
  std::string path = std::to_string(j);
  for (int64_t k = parent[j]; k != j; k = parent[k]) path += " -> " + std::to_string(k);
  path += " -> " + std::to_string(j);
  return "parent: node " + std::to_string(start) +
         " does not lead to a root, its parent chain enters the cycle " + path;
}

// Leaf rewards as double, gathered while the order is built (read at leaves only).
struct LeafReward {
  const void* data;
  at::ScalarType type;
  void prefetch(int64_t i) const {
    if (type == at::kDouble) ::prefetch(static_cast<const double*>(data) + i);
    else ::prefetch(static_cast<const float*>(data) + i);
  }
  double at(int64_t i) const {
    return type == at::kDouble ? static_cast<const double*>(data)[i] : static_cast<const float*>(data)[i];
  }
};

template <typename I>
Order<I> build_order(const at::Tensor& parent_t, const LeafReward& reward, double* leaf_r) {
  const int64_t m = parent_t.size(0);
  const int64_t* parent = parent_t.data_ptr<int64_t>();
  Order<I> o;
  o.m = m;
  // Children lists by node (CSR): start[p + 1] counts p's children, then becomes its end.
  auto start = uninit<I>(m + 1);
  std::fill(start.get(), start.get() + m + 1, 0);
  int64_t nroots = 0;
  for (int64_t i = 0; i < m; ++i) {
    if (i + kAhead < m) {
      const int64_t pa = parent[i + kAhead];
      if (pa >= 0 && pa < m) prefetch(start.get() + pa + 1, true);
    }
    const int64_t p = parent[i];
    if (p >= 0 && p < m) {
      ++start[p + 1];
    } else {
      TORCH_CHECK_VALUE(p == -1, "parent[", i, "] = ", p,
                        " is out of range: a parent must be -1 (a root) or a node in [0, ", m, ")");
      ++nroots;
    }
  }
  TORCH_CHECK_VALUE(m == 0 || nroots > 0,
                    "parent has no root (no entry is -1): every node lies on or below a cycle");
  for (int64_t i = 0; i < m; ++i) start[i + 1] += start[i];
  auto kids = uninit<I>(m - nroots);
  o.node = uninit<I>(m);
  o.parent_pos = uninit<I>(m);
  o.first_child = uninit<I>(m);
  o.nchild = uninit<I>(m);
  // Scanning i downwards and decrementing the ends leaves every list in increasing node index
  // (the summation order of the reference) and start[p + 1] at the begin of p's list.
  int64_t r = nroots;
  for (int64_t i = m - 1; i >= 0; --i) {
    if (i >= kAhead && parent[i - kAhead] >= 0) prefetch(start.get() + parent[i - kAhead] + 1, true);
    const int64_t p = parent[i];
    if (p >= 0) {
      kids[--start[p + 1]] = static_cast<I>(i);
    } else {
      o.node[--r] = static_cast<I>(i);
      o.parent_pos[r] = -1;
    }
  }
  for (int64_t i = 0; i < m; ++i) start[i] = start[i + 1];
  start[m] = m - nroots;
  // Breadth-first, one level at a time: the children of the node at position q are written to
  // [first_child[q], first_child[q] + nchild[q]), right after the level being read.
  o.level.push_back(0);
  int64_t ls = 0, le = nroots;
  while (le > ls) {
    o.level.push_back(le);
    int64_t next = le;
    for (int64_t q = ls; q < le; ++q) {
      // two stages: the CSR entry of the node 2 * kAhead ahead, then its children and reward
      if (q + 2 * kAhead < le) prefetch(start.get() + o.node[q + 2 * kAhead]);
      if (q + kAhead < le) {
        const int64_t na = o.node[q + kAhead];
        prefetch(kids.get() + start[na]);
        reward.prefetch(na);
      }
      const int64_t n = o.node[q];
      const int64_t b = start[n], c = start[n + 1] - b;
      o.first_child[q] = static_cast<I>(next);
      o.nchild[q] = static_cast<I>(c);
      if (c == 0) leaf_r[q] = reward.at(n);
      for (int64_t j = 0; j < c; ++j) {
        o.node[next + j] = kids[b + j];
        o.parent_pos[next + j] = static_cast<I>(q);
      }
      next += c;
    }
    ls = le;
    le = next;
  }
  if (le < m) {  // some nodes are never reached from a root: report the smallest one
    std::vector<char> reached(m, 0);
    for (int64_t q = 0; q < le; ++q) reached[o.node[q]] = 1;
    int64_t first = 0;
    while (reached[first]) ++first;
    TORCH_CHECK_VALUE(false, cycle_message(parent, m, first));
  }
  return o;
}

template <typename I>
int64_t num_levels(const Order<I>& o) { return static_cast<int64_t>(o.level.size()) - 1; }

// Runs fn(q) for every position of level d, in parallel.
template <typename I, typename F>
void for_level(const Order<I>& o, int64_t d, F fn) {
  at::parallel_for(o.level[d], o.level[d + 1], kGrain, [&](int64_t b, int64_t e) {
    for (int64_t q = b; q < e; ++q) fn(q);
  });
}

// float64 and float32 rewards are read in place; half types through a float32 copy.
at::Tensor reward_view(const at::Tensor& reward) {
  const auto t = reward.scalar_type();
  return t == at::kDouble || t == at::kFloat ? reward : reward.to(at::kFloat);
}

// SPO-tree value: mean of the children's values, exactly their common value when all are equal.
template <typename I>
void mean_children(const Order<I>& o, const double* r, double* v) {
  for (int64_t d = num_levels(o) - 1; d >= 0; --d) {
    for_level(o, d, [&](int64_t q) {
      const int64_t k = o.nchild[q];
      if (k == 0) {
        v[q] = r[q];
        return;
      }
      const double* c = v + o.first_child[q];
      double s = 0.0;
      bool equal = true;
      for (int64_t j = 0; j < k; ++j) {
        s += c[j];
        equal = equal && c[j] == c[0];
      }
      v[q] = equal ? c[0] : s / static_cast<double>(k);
    });
  }
}

// TreeRL value: mean reward of the leaves below; also the leaf sums and counts.
template <typename I>
void mean_leaves(const Order<I>& o, const double* r, double* v, double* lsum, int64_t* lcnt) {
  for (int64_t d = num_levels(o) - 1; d >= 0; --d) {
    for_level(o, d, [&](int64_t q) {
      const int64_t k = o.nchild[q];
      if (k == 0) {
        v[q] = lsum[q] = r[q];
        lcnt[q] = 1;
        return;
      }
      const int64_t f = o.first_child[q];
      double s = 0.0;
      int64_t n = 0;
      for (int64_t j = 0; j < k; ++j) {
        s += lsum[f + j];
        n += lcnt[f + j];
      }
      lsum[q] = s;
      lcnt[q] = n;
      v[q] = s / static_cast<double>(n);
    });
  }
}

at::ScalarType out_type(const at::Tensor& reward) {
  return reward.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Writes per-position doubles to a node-ordered output tensor.
template <typename I>
void scatter_out(const Order<I>& o, const double* x, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "trees_scatter_out", [&] {
    scalar_t* y = out.data_ptr<scalar_t>();
    at::parallel_for(0, o.m, kGrain, [&](int64_t b, int64_t e) {
      for (int64_t q = b; q < e; ++q) {
        if (q + kAhead < e) prefetch(y + o.node[q + kAhead], true);
        y[o.node[q]] = static_cast<scalar_t>(x[q]);
      }
    });
  });
}

void check_inputs(const at::Tensor& parent, const at::Tensor& reward) {
  TORCH_CHECK(parent.dim() == 1 && parent.scalar_type() == at::kLong && parent.is_contiguous(),
              "rlkern.trees: parent must be a contiguous [M] int64 tensor");
  TORCH_CHECK(reward.dim() == 1 && reward.size(0) == parent.size(0) && reward.is_contiguous() &&
                  at::isFloatingType(reward.scalar_type()),
              "rlkern.trees: reward must be a contiguous float tensor of shape [M] = ", parent.sizes());
}

template <typename I>
at::Tensor values_impl(const at::Tensor& parent, const at::Tensor& reward, int64_t mode) {
  const at::Tensor rw = reward_view(reward);
  auto r = uninit<double>(parent.size(0));
  const Order<I> o = build_order<I>(parent, {rw.data_ptr(), rw.scalar_type()}, r.get());
  auto v = uninit<double>(o.m);
  if (mode == 0) {
    mean_children(o, r.get(), v.get());
  } else {
    auto lsum = uninit<double>(o.m);
    auto lcnt = uninit<int64_t>(o.m);
    mean_leaves(o, r.get(), v.get(), lsum.get(), lcnt.get());
  }
  at::Tensor out = at::empty({o.m}, reward.options().dtype(out_type(reward)));
  scatter_out(o, v.get(), out);
  return out;
}

// RLKERN_TREES_INDEX64=1 forces the int64 instantiation (the tests run it on small forests).
bool fits_int32(const at::Tensor& parent) {
  static const bool force64 = [] {
    const char* env = std::getenv("RLKERN_TREES_INDEX64");
    return env != nullptr && env[0] == '1';
  }();
  return !force64 && parent.size(0) < std::numeric_limits<int32_t>::max();
}

// mode: 0 = mean_children (SPO-tree), 1 = mean_leaves (TreeRL).
at::Tensor trees_values_cpu(const at::Tensor& parent, const at::Tensor& reward, int64_t mode) {
  check_inputs(parent, reward);
  TORCH_CHECK(mode == 0 || mode == 1, "rlkern.trees: unknown values mode ", mode);
  return fits_int32(parent) ? values_impl<int32_t>(parent, reward, mode) : values_impl<int64_t>(parent, reward, mode);
}

// method: 0 spo_rloo, 1 spo_grpo, 2 treerl, 3 treepo.
// Also returns the values the advantages are built from when with_values (else an empty tensor):
// the forest's order is the costly part, so values + advantages in one call cost one build.
template <typename I>
std::tuple<at::Tensor, at::Tensor, at::Tensor> advantages_impl(
    const at::Tensor& parent, const at::Tensor& reward, int64_t method, bool leaf_rloo, bool group_size_weighting,
    bool whiten, const std::optional<at::Tensor>& leaf_weights, double epsilon, bool with_values) {
  const at::Tensor rw = reward_view(reward);
  auto r = uninit<double>(parent.size(0));
  const Order<I> o = build_order<I>(parent, {rw.data_ptr(), rw.scalar_type()}, r.get());
  const int64_t m = o.m;
  auto v = uninit<double>(m);
  auto a = uninit<double>(m);
  auto keep_pos = uninit<bool>(m);
  const int64_t levels = num_levels(o);

  if (method <= 1) {
    mean_children(o, r.get(), v.get());
    const bool grpo = method == 1;
    // Children's advantages from their parent's value (the mean over all of its children).
    for (int64_t d = 0; d < levels; ++d) {
      for_level(o, d, [&](int64_t q) {
        if (o.parent_pos[q] < 0) {
          a[q] = 0.0;
          keep_pos[q] = false;
        }
        const int64_t k = o.nchild[q];
        if (k == 0) return;
        const double* c = v.get() + o.first_child[q];
        const double base = v[q];
        double scale = 1.0;
        if (grpo) {
          double ss = 0.0;
          for (int64_t j = 0; j < k; ++j) ss += (c[j] - base) * (c[j] - base);
          scale = 1.0 / (std::sqrt(ss / static_cast<double>(k)) + epsilon);
        }
        for (int64_t j = 0; j < k; ++j) {
          const double x = grpo ? (c[j] - base) * scale : c[j] - base;
          a[o.first_child[q] + j] = x;
          keep_pos[o.first_child[q] + j] = x != 0.0;
        }
      });
    }
  } else {
    auto lsum = uninit<double>(m);
    auto lcnt = uninit<int64_t>(m);
    mean_leaves(o, r.get(), v.get(), lsum.get(), lcnt.get());
    if (method == 2) {
      auto root = uninit<int64_t>(m);  // position of each position's root
      for (int64_t d = 0; d < levels; ++d) {
        for_level(o, d, [&](int64_t q) {
          const int64_t p = o.parent_pos[q];
          if (p < 0) {
            root[q] = q;
            a[q] = 0.0;
            keep_pos[q] = false;
            return;
          }
          root[q] = root[p];
          const double vr = v[root[q]];
          double x = ((v[q] - vr) + (v[q] - v[p])) / std::sqrt(static_cast<double>(lcnt[q]));
          if (leaf_rloo) {
            // Leaves re-centred on the other leaves of the tree: every value becomes
            // n/(n-1) * (V - V_root), so the advantage scales by n/(n-1) (0 for a single leaf).
            const double n = static_cast<double>(lcnt[root[q]]);
            x = n > 1.0 ? x * n / (n - 1.0) : 0.0;
          }
          a[q] = x;
          keep_pos[q] = true;
        });
      }
    } else {
      // TreePO: sums over the subgroups (ancestors with more than one leaf, and the root) on the
      // path to each node; a leaf's advantage is its reward minus their (weighted) mean.
      auto csum = uninit<double>(m);
      auto wsum = uninit<double>(m);
      for (int64_t d = 0; d < levels; ++d) {
        for_level(o, d, [&](int64_t q) {
          const int64_t p = o.parent_pos[q];
          // The root's group is always used, with mean 0 when it holds a single trajectory
          // (the official code, like verl's REINFORCE++-baseline); deeper groups only when they
          // hold more than one.
          const bool include = p < 0 || lcnt[q] > 1;
          const double term = lcnt[q] > 1 ? (group_size_weighting ? lsum[q] : v[q]) : 0.0;
          const double weight = group_size_weighting ? static_cast<double>(lcnt[q]) : 1.0;
          csum[q] = (p < 0 ? 0.0 : csum[p]) + (include ? term : 0.0);
          wsum[q] = (p < 0 ? 0.0 : wsum[p]) + (include ? weight : 0.0);
          if (o.nchild[q] != 0 || p < 0) {  // internal nodes and roots carry no trajectory
            a[q] = 0.0;
            keep_pos[q] = false;
            return;
          }
          a[q] = r[q] - csum[p] / wsum[p];
          keep_pos[q] = true;
        });
      }
      if (whiten) {
        const double* w = nullptr;
        at::Tensor wt;
        if (leaf_weights.has_value()) {
          wt = leaf_weights->to(at::kDouble).contiguous();
          TORCH_CHECK(wt.dim() == 1 && wt.size(0) == m, "rlkern.trees: leaf_weights must be [M]");
          w = wt.data_ptr<double>();
        }
        double total = 0.0, s = 0.0;
        for (int64_t q = 0; q < m; ++q) {
          if (!keep_pos[q]) continue;
          const double wq = w ? w[o.node[q]] : 1.0;
          total += wq;
          s += wq * a[q];
        }
        if (total > 0.0) {
          const double mean = s / total;
          double ss = 0.0;
          for (int64_t q = 0; q < m; ++q) {
            if (!keep_pos[q]) continue;
            const double wq = w ? w[o.node[q]] : 1.0;
            ss += wq * (a[q] - mean) * (a[q] - mean);
          }
          const double var = total > 1.0 ? ss / total * total / (total - 1.0) : 0.0;
          const double scale = 1.0 / std::sqrt(var + 1e-8);
          at::parallel_for(0, m, kGrain, [&](int64_t b, int64_t e) {
            for (int64_t q = b; q < e; ++q) a[q] = keep_pos[q] ? (a[q] - mean) * scale : 0.0;
          });
        }
      }
    }
  }
  at::Tensor adv = at::empty({m}, reward.options().dtype(out_type(reward)));
  at::Tensor keep = at::empty({m}, reward.options().dtype(at::kBool));
  scatter_out(o, a.get(), adv);
  bool* kp = keep.data_ptr<bool>();
  at::parallel_for(0, m, kGrain, [&](int64_t b, int64_t e) {
    for (int64_t q = b; q < e; ++q) {
      if (q + kAhead < e) prefetch(kp + o.node[q + kAhead], true);
      kp[o.node[q]] = keep_pos[q];
    }
  });
  at::Tensor values = at::empty({with_values ? m : 0}, reward.options().dtype(out_type(reward)));
  if (with_values) scatter_out(o, v.get(), values);
  return {adv, keep, values};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> trees_advantages_cpu(
    const at::Tensor& parent, const at::Tensor& reward, int64_t method, bool leaf_rloo, bool group_size_weighting,
    bool whiten, const std::optional<at::Tensor>& leaf_weights, double epsilon, bool with_values) {
  check_inputs(parent, reward);
  TORCH_CHECK(method >= 0 && method <= 3, "rlkern.trees: unknown advantage method ", method);
  return fits_int32(parent)
             ? advantages_impl<int32_t>(parent, reward, method, leaf_rloo, group_size_weighting, whiten, leaf_weights,
                                        epsilon, with_values)
             : advantages_impl<int64_t>(parent, reward, method, leaf_rloo, group_size_weighting, whiten, leaf_weights,
                                        epsilon, with_values);
}

at::Tensor trees_values_meta(const at::Tensor& parent, const at::Tensor& reward, int64_t /*mode*/) {
  return at::empty({parent.size(0)}, reward.options().dtype(out_type(reward)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> trees_advantages_meta(
    const at::Tensor& parent, const at::Tensor& reward, int64_t /*method*/, bool /*leaf_rloo*/,
    bool /*group_size_weighting*/, bool /*whiten*/, const std::optional<at::Tensor>& /*leaf_weights*/,
    double /*epsilon*/, bool with_values) {
  const auto type = reward.options().dtype(out_type(reward));
  return {at::empty({parent.size(0)}, type), at::empty({parent.size(0)}, reward.options().dtype(at::kBool)),
          at::empty({with_values ? parent.size(0) : 0}, type)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rlkern, m) {
  m.def("trees_values(Tensor parent, Tensor reward, int mode) -> Tensor");
  m.def(
      "trees_advantages(Tensor parent, Tensor reward, int method, bool leaf_rloo, bool group_size_weighting, "
      "bool whiten, Tensor? leaf_weights, float epsilon, bool with_values) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rlkern, CPU, m) {
  m.impl("trees_values", &trees_values_cpu);
  m.impl("trees_advantages", &trees_advantages_cpu);
}

TORCH_LIBRARY_IMPL(rlkern, Meta, m) {
  m.impl("trees_values", &trees_values_meta);
  m.impl("trees_advantages", &trees_advantages_meta);
}
