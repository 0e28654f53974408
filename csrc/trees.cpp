// rlkern CPU kernels: values and advantages over a forest given as parent indices
// (torch.ops.rlkern.cpp_tree_values / cpp_tree_advantages; oracle: rlkern/reference/trees.py).
//
// One O(M) structure pass orders the nodes breadth-first, level by level, so that the children of
// every position occupy a contiguous range of positions (in increasing node index, the summation
// order of the reference): child_begin[] is then one CSR offset array over positions. Values are
// one bottom-up pass (deepest level first; ARPO's per-tree M2 of the leaf rewards merged in the
// same pass); advantages, values and keep come from one final pass
// (level by level for TreePO, whose subgroup sums are carried down; one flat pass for the others).
// Every pass is parallel: within a level, or split by node index (the children lists by node).
// All arithmetic is in double; outputs are float32 (float64 for float64 rewards). A bad parent
// array raises ValueError (c10::ValueError) naming the first offending node, with the messages of
// the reference's check_forest (and check_depth for max_depth).
//
// Speed: with shuffled node order the structure passes are streams of cache misses (counting
// children, filling the children lists, the breadth-first walk, the final scatter to node order),
// each costing more the larger the arrays (~2 ns in 4 MiB, ~8 ns in 64 MiB on the 2-core CI VM).
// So the passes prefetch the addresses they need a few iterations ahead, store positions as int32
// when M < 2^31, and touch as few random cache lines per node as they can: a node's entry in its
// parent's children list carries its reward and its own children's range, and the outputs of a
// node are scattered as one record. The scratch arrays come from a small process-wide cache
// (ScratchCache): fresh tens of MiB per call cost more in page faults than the passes themselves
// on some hosts.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace {

constexpr int64_t kGrain = 4096;

// Scratch memory. Buffers of 256 KiB and more are 2 MiB aligned and backed by 2 MiB pages where
// the kernel allows it (THP "madvise" mode: fewer TLB misses on the random accesses), and kept
// for the next call once released, up to kCacheBytes in all (best fit, at most 4x the request):
// every scratch array of a forest of about two million nodes (~70 bytes a node for SPO, ~115 for
// TreePO). What does not fit is allocated and freed again.
class ScratchCache {
 public:
  static ScratchCache& instance() {
    static ScratchCache* cache = new ScratchCache();  // never destroyed: no exit-order issues
    return *cache;
  }

  std::pair<void*, size_t> take(size_t bytes) {
    // Under AddressSanitizer (RLKERN_SANITIZE=address, benches/sanitize_cpu.sh) every buffer is a
    // fresh malloc of exactly the size asked for: a reused or rounded-up buffer would hide an
    // over-read past the request, or a read of a buffer already given back, from ASan.
    if (bytes < kSmall || kSanitized) return {checked(std::malloc(bytes), bytes), 0};
    {
      std::lock_guard<std::mutex> lock(mutex_);
      size_t best = free_.size();
      for (size_t k = 0; k < free_.size(); ++k) {
        const size_t cap = free_[k].second;
        if (cap >= bytes && cap <= 4 * bytes && (best == free_.size() || cap < free_[best].second)) best = k;
      }
      if (best != free_.size()) {
        const auto hit = free_[best];
        free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(best));
        held_ -= hit.second;
        return hit;
      }
    }
    const size_t cap = (bytes + kHuge - 1) / kHuge * kHuge;
    void* p = std::aligned_alloc(kHuge, cap);
#ifdef MADV_HUGEPAGE
    if (p) madvise(p, cap, MADV_HUGEPAGE);
#endif
    return {checked(p, cap), cap};
  }

  void give(void* p, size_t cap) {
    if (cap == 0) {  // a small buffer
      std::free(p);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (held_ + cap <= kCacheBytes) {
        free_.emplace_back(p, cap);
        held_ += cap;
        return;
      }
    }
    std::free(p);
  }

 private:
#if defined(__SANITIZE_ADDRESS__)
  static constexpr bool kSanitized = true;
#else
  static constexpr bool kSanitized = false;
#endif
  static constexpr size_t kSmall = size_t(1) << 18;
  static constexpr size_t kHuge = size_t(1) << 21;
  static constexpr size_t kCacheBytes = size_t(256) << 20;

  static void* checked(void* p, size_t bytes) {
    TORCH_CHECK(p, "rlkern.trees: out of memory allocating ", bytes, " bytes");
    return p;
  }

  std::mutex mutex_;
  std::vector<std::pair<void*, size_t>> free_;
  size_t held_ = 0;
};

// An uninitialized array of n T's from the cache, returned to it on destruction.
template <typename T>
class Scratch {
 public:
  Scratch() = default;
  explicit Scratch(int64_t n) {
    const auto got = ScratchCache::instance().take(sizeof(T) * static_cast<size_t>(std::max<int64_t>(n, 1)));
    data_ = static_cast<T*>(got.first);
    cap_ = got.second;
  }
  Scratch(Scratch&& other) noexcept : data_(std::exchange(other.data_, nullptr)), cap_(other.cap_) {}
  Scratch& operator=(Scratch&& other) noexcept {
    std::swap(data_, other.data_);
    std::swap(cap_, other.cap_);
    return *this;
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch() {
    if (data_) ScratchCache::instance().give(data_, cap_);
  }
  T* get() const { return data_; }
  T& operator[](int64_t i) const { return data_[i]; }

 private:
  T* data_ = nullptr;
  size_t cap_ = 0;
};

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
// at position q occupy [child_begin[q], child_begin[q + 1]).
// I: int32_t when M < 2^31 (half the memory traffic of these mostly random-access arrays),
// else int64_t; index arithmetic is int64 throughout.
template <typename I>
struct Order {
  int64_t m = 0;
  Scratch<I> node;         // [M] node id at each position
  Scratch<I> parent_pos;   // [M] position of the parent, -1 for roots
  Scratch<I> child_begin;  // [M + 1]
  Scratch<I> root_pos;     // [M] position of the root, only when asked for
  std::vector<int64_t> level;

  int64_t num_levels() const { return static_cast<int64_t>(level.size()) - 1; }
  int64_t num_children(int64_t q) const { return child_begin[q + 1] - child_begin[q]; }
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

// A float32 or float64 [M] array read as double (leaf weights).
struct DoubleView {
  const void* data;
  bool is_double;
  void prefetch(int64_t i) const {
    if (is_double) ::prefetch(static_cast<const double*>(data) + i);
    else ::prefetch(static_cast<const float*>(data) + i);
  }
  double at(int64_t i) const {
    return is_double ? static_cast<const double*>(data)[i] : static_cast<const float*>(data)[i];
  }
};

// float64 and float32 tensors are read in place; half types through a float32 copy.
at::Tensor readable(const at::Tensor& t) {
  const auto type = t.scalar_type();
  return type == at::kDouble || type == at::kFloat ? t.contiguous() : t.to(at::kFloat).contiguous();
}
DoubleView view(const at::Tensor& readable_t) {
  return {readable_t.data_ptr(), readable_t.scalar_type() == at::kDouble};
}

// Calls fn(c) for c in [0, chunks) on the intra-op threads, handing the chunks out one at a time:
// a thread that shares its core with another process takes fewer of them (fixed shares would
// leave the other threads waiting for it at the end of every pass).
template <typename F>
void for_each_chunk(int64_t chunks, F fn) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), chunks);
  if (threads <= 1 || at::in_parallel_region()) {
    for (int64_t c = 0; c < chunks; ++c) fn(c);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < chunks;
         c = next.fetch_add(1, std::memory_order_relaxed)) {
      fn(c);
    }
  });
}

// Runs fn(b, e) over chunks of kGrain positions of [begin, end), in parallel.
template <typename F>
void parallel(int64_t begin, int64_t end, F fn) {
  for_each_chunk((end - begin + kGrain - 1) / kGrain,
                 [&](int64_t c) { fn(begin + c * kGrain, std::min(end, begin + (c + 1) * kGrain)); });
}

// An entry of the children lists: a child, the range of its own children in the lists and its
// reward, all read in node order while the lists are filled, so that the breadth-first walk
// reads nothing at random but the lists themselves.
template <typename I, typename R>
struct Child {
  I node;
  I begin;
  I end;
  R reward;
};

// Builds the order; leaf_r[q] receives the reward of every position q (only leaves' are used).
// R: float or double, the type of reward. max_depth >= 0: a deeper node raises ValueError.
template <typename I, typename R>
Order<I> build_order(const at::Tensor& parent_t, const R* reward, double* leaf_r, bool with_root,
                     int64_t max_depth) {
  const int64_t m = parent_t.size(0);
  const int64_t* parent = parent_t.data_ptr<int64_t>();
  Order<I> o;
  o.m = m;
  // Children lists by node (CSR: node p's children are kids[start[p], start[p + 1])), built in
  // parallel without atomics: part t owns the nodes [lo_t, hi_t) and counts them, as children,
  // into its own array cursor[t]; an exclusive scan in (parent, part) order turns the counts into
  // start and into each part's write cursors, so that every list is in increasing node index.
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>({at::get_num_threads(), m / kGrain, 8}));
  auto owned = [&](int64_t part) { return std::make_pair(m * part / parts, m * (part + 1) / parts); };
  std::vector<Scratch<I>> cursor;
  for (int64_t t = 0; t < parts; ++t) cursor.emplace_back(m);
  std::vector<int64_t> roots(parts + 1, 0), first_bad(parts, -1);
  at::parallel_for(0, parts, 1, [&](int64_t pb, int64_t pe) {
    for (int64_t t = pb; t < pe; ++t) {
      I* count = cursor[t].get();
      std::fill(count, count + m, I(0));
      const auto [lo, hi] = owned(t);
      for (int64_t i = lo; i < hi; ++i) {
        if (i + kAhead < hi) {
          const int64_t pa = parent[i + kAhead];
          if (pa >= 0 && pa < m) prefetch(count + pa, true);
        }
        const int64_t p = parent[i];
        if (p >= 0 && p < m) {
          ++count[p];
        } else if (p == -1) {
          ++roots[t + 1];
        } else if (first_bad[t] < 0) {
          first_bad[t] = i;
        }
      }
    }
  });
  for (int64_t t = 0; t < parts; ++t) {
    const int64_t i = first_bad[t];
    TORCH_CHECK_VALUE(i < 0, "parent[", i, "] = ", i < 0 ? 0 : parent[i],
                      " is out of range: a parent must be -1 (a root) or a node in [0, ", m, ")");
  }
  for (int64_t t = 0; t < parts; ++t) roots[t + 1] += roots[t];
  const int64_t nroots = roots[parts];
  TORCH_CHECK_VALUE(m == 0 || nroots > 0,
                    "parent has no root (no entry is -1): every node lies on or below a cycle");
  // The scan, in parallel over ranges of parents: their sums, then the offsets.
  Scratch<I> start(m + 1);
  std::vector<int64_t> chunk_sum(parts + 1, 0);
  at::parallel_for(0, parts, 1, [&](int64_t pb, int64_t pe) {
    for (int64_t c = pb; c < pe; ++c) {
      const auto [lo, hi] = owned(c);
      int64_t s = 0;
      for (int64_t t = 0; t < parts; ++t) {
        const I* count = cursor[t].get();
        for (int64_t p = lo; p < hi; ++p) s += count[p];
      }
      chunk_sum[c + 1] = s;
    }
  });
  for (int64_t c = 0; c < parts; ++c) chunk_sum[c + 1] += chunk_sum[c];
  at::parallel_for(0, parts, 1, [&](int64_t pb, int64_t pe) {
    for (int64_t c = pb; c < pe; ++c) {
      const auto [lo, hi] = owned(c);
      int64_t run = chunk_sum[c];
      for (int64_t p = lo; p < hi; ++p) {
        start[p] = static_cast<I>(run);
        for (int64_t t = 0; t < parts; ++t) {
          I& x = cursor[t][p];
          const int64_t n = x;
          x = static_cast<I>(run);
          run += n;
        }
      }
    }
  });
  start[m] = static_cast<I>(m - nroots);
  Scratch<Child<I, R>> kids(m - nroots);
  o.node = Scratch<I>(m);
  o.parent_pos = Scratch<I>(m);
  o.child_begin = Scratch<I>(m + 1);
  if (with_root) o.root_pos = Scratch<I>(m);
  Scratch<I> list_begin(m);  // where the children of the node at position q start in kids
  // Fill the lists; roots take positions [0, nroots) in increasing node index, with their
  // children's counts in child_begin[q + 1] (a scan per level makes them offsets).
  at::parallel_for(0, parts, 1, [&](int64_t pb, int64_t pe) {
    for (int64_t t = pb; t < pe; ++t) {
      I* write = cursor[t].get();
      const auto [lo, hi] = owned(t);
      int64_t r = roots[t];
      for (int64_t i = lo; i < hi; ++i) {
        // two stages: the write cursor 2 * kAhead ahead, then the list entry it points to
        if (i + 2 * kAhead < hi && parent[i + 2 * kAhead] >= 0) prefetch(write + parent[i + 2 * kAhead], true);
        if (i + kAhead < hi && parent[i + kAhead] >= 0) prefetch(kids.get() + write[parent[i + kAhead]], true);
        const int64_t p = parent[i];
        if (p >= 0) {
          kids[write[p]++] = {static_cast<I>(i), start[i], start[i + 1], reward[i]};
        } else {
          o.node[r] = static_cast<I>(i);
          o.parent_pos[r] = -1;
          if (with_root) o.root_pos[r] = static_cast<I>(r);
          leaf_r[r] = reward[i];
          list_begin[r] = start[i];
          o.child_begin[r + 1] = static_cast<I>(start[i + 1] - start[i]);
          ++r;
        }
      }
    }
  });
  // Breadth-first, one level at a time: turn the level's children counts into child_begin, then
  // copy the children lists of the level into the next one (with the next counts).
  auto scan = [&](int64_t ls, int64_t le) {  // child_begin[ls] is known; the counts follow it
    int64_t next = o.child_begin[ls];
    for (int64_t q = ls; q < le; ++q) o.child_begin[q + 1] = static_cast<I>(next += o.child_begin[q + 1]);
  };
  o.child_begin[0] = static_cast<I>(nroots);
  scan(0, nroots);
  o.level.push_back(0);
  int64_t ls = 0, le = nroots;
  while (le > ls) {
    o.level.push_back(le);
    parallel(ls, le, [&](int64_t b, int64_t e) {
      for (int64_t q = b; q < e; ++q) {
        if (q + kAhead < e) {  // the children list kAhead ahead, if any (half the positions are leaves)
          const int64_t ca = o.num_children(q + kAhead);
          if (ca > 0) {
            prefetch(kids.get() + list_begin[q + kAhead]);
            prefetch(kids.get() + list_begin[q + kAhead] + ca - 1);
          }
        }
        const int64_t f = o.child_begin[q], c = o.child_begin[q + 1] - f, kb = list_begin[q];
        for (int64_t j = 0; j < c; ++j) {
          const Child<I, R> kid = kids[kb + j];
          const int64_t x = f + j;
          o.node[x] = kid.node;
          o.parent_pos[x] = static_cast<I>(q);
          if (with_root) o.root_pos[x] = o.root_pos[q];
          leaf_r[x] = kid.reward;
          list_begin[x] = kid.begin;
          o.child_begin[x + 1] = static_cast<I>(kid.end - kid.begin);
        }
      }
    });
    const int64_t next = o.child_begin[le];
    scan(le, next);
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
  if (max_depth >= 0 && o.num_levels() - 1 > max_depth) {  // report the smallest deeper node
    int64_t first = m, depth = 0;
    for (int64_t d = max_depth + 1; d < o.num_levels(); ++d) {
      for (int64_t q = o.level[d]; q < o.level[d + 1]; ++q) {
        if (o.node[q] < first) {
          first = o.node[q];
          depth = d;
        }
      }
    }
    TORCH_CHECK_VALUE(false, "max_depth=", max_depth, " but node ", first, " is at depth ", depth);
  }
  return o;
}

// Runs fn(b, e) over chunks of level d's positions, in parallel.
template <typename I, typename F>
void for_level(const Order<I>& o, int64_t d, F fn) {
  parallel(o.level[d], o.level[d + 1], fn);
}

// SPO-tree value: mean of the children's values, exactly their common value when all are equal
// (v holds the rewards of the leaves already). With scale, also 1 / (population std of the
// children's values + epsilon) of every internal position (SPO "grpo").
template <typename I>
void mean_children(const Order<I>& o, double* v, double* scale, double epsilon) {
  for (int64_t d = o.num_levels() - 1; d >= 0; --d) {
    for_level(o, d, [&](int64_t b, int64_t e) {
      for (int64_t q = b; q < e; ++q) {
        const int64_t k = o.num_children(q);
        if (k == 0) continue;
        const double* c = v + o.child_begin[q];
        double s = 0.0;
        bool equal = true;
        for (int64_t j = 0; j < k; ++j) {
          s += c[j];
          equal = equal && c[j] == c[0];
        }
        const double base = equal ? c[0] : s / static_cast<double>(k);
        v[q] = base;
        if (scale) {
          double ss = 0.0;
          for (int64_t j = 0; j < k; ++j) ss += (c[j] - base) * (c[j] - base);
          scale[q] = 1.0 / (std::sqrt(ss / static_cast<double>(k)) + epsilon);
        }
      }
    });
  }
}

// TreeRL value V = lsum / lcnt (stored in v: read up to three times per position later), from
// the leaf sums and counts below every position (lsum holds the rewards of the leaves already).
// With m2 (ARPO), also the sum of squared deviations of the leaf rewards below every position
// from their mean V, merged from the children's as Chan et al.'s pairwise update does:
// M2(q) = sum_c M2(c) + L(c) (V(c) - V(q))^2. A sum of squares minus L V^2 would cancel
// catastrophically for rewards far from 0 (a reward model's 1000 +- 0.1); this stays exact to
// rounding, and the children's V and M2 are read where the sums just read them.
template <typename I>
void mean_leaves(const Order<I>& o, double* lsum, I* lcnt, double* v, double* m2 = nullptr) {
  for (int64_t d = o.num_levels() - 1; d >= 0; --d) {
    for_level(o, d, [&](int64_t b, int64_t e) {
      for (int64_t q = b; q < e; ++q) {
        const int64_t k = o.num_children(q);
        if (k == 0) {
          lcnt[q] = 1;
          v[q] = lsum[q];
          if (m2) m2[q] = 0.0;
          continue;
        }
        const int64_t f = o.child_begin[q];
        double s = 0.0;
        int64_t n = 0;
        for (int64_t j = 0; j < k; ++j) {
          s += lsum[f + j];
          n += lcnt[f + j];
        }
        lsum[q] = s;
        lcnt[q] = static_cast<I>(n);
        const double mean = s / static_cast<double>(n);
        v[q] = mean;
        if (m2) {
          double ss = 0.0;
          for (int64_t j = 0; j < k; ++j) {
            const double d = v[f + j] - mean;
            ss += m2[f + j] + static_cast<double>(lcnt[f + j]) * d * d;
          }
          m2[q] = ss;
        }
      }
    });
  }
}

at::ScalarType out_type(const at::Tensor& reward) {
  return reward.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// What the final pass writes for one node. The outputs of a node lie far apart and the nodes come
// in random order: writing one record per node (one cache miss instead of up to three) and then
// copying the records into the outputs in node order costs about half as much.
template <typename scalar_t>
struct alignas(16) NodeRecord {
  scalar_t adv;
  scalar_t value;
  bool keep;
};

// The node-ordered outputs, written at random by position: records (advantages, copied into the
// output tensors afterwards in node order), else the values alone, else nothing.
template <typename scalar_t>
struct Outputs {
  NodeRecord<scalar_t>* records;
  scalar_t* values;

  void prefetch_node(int64_t n) const {
    if (records) prefetch(records + n, true);
    else if (values) prefetch(values + n, true);
  }
  void put(int64_t n, double a, bool k, double v) const {
    if (records) records[n] = {static_cast<scalar_t>(a), static_cast<scalar_t>(v), k};
    else values[n] = static_cast<scalar_t>(v);
  }
};

// Calls fn(q, n) for positions [b, e) and their node ids, prefetching the outputs at node ids.
template <typename I, typename scalar_t, typename F>
inline void each_position(const Order<I>& o, const Outputs<scalar_t>& out, int64_t b, int64_t e, F fn) {
  for (int64_t q = b; q < e; ++q) {
    if (q + kAhead < e) out.prefetch_node(o.node[q + kAhead]);
    fn(q, static_cast<int64_t>(o.node[q]));
  }
}

// Writes every node's value and advantage(q, parent position, root position), kept; roots get
// 0, not kept (TreeRL and ARPO, over the mean-leaves values).
template <typename I, typename scalar_t, typename F>
void non_root_advantages(const Order<I>& o, const Outputs<scalar_t>& out, const double* value, F advantage) {
  parallel(0, o.m, [&](int64_t b, int64_t e) {
    each_position(o, out, b, e, [&](int64_t q, int64_t n) {
      const int64_t p = o.parent_pos[q];
      if (p < 0) out.put(n, 0.0, false, value[q]);
      else out.put(n, advantage(q, p, static_cast<int64_t>(o.root_pos[q])), true, value[q]);
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

template <typename I, typename scalar_t>
void values_impl(const at::Tensor& parent, const at::Tensor& reward, int64_t mode, int64_t max_depth,
                 scalar_t* values) {
  const int64_t m = parent.size(0);
  Scratch<double> r(m);  // rewards of the leaves, then values (mean_children) or leaf sums
  const Order<I> o = build_order<I, scalar_t>(parent, reward.data_ptr<scalar_t>(), r.get(), false, max_depth);
  Scratch<double> v;
  if (mode == 0) {
    mean_children(o, r.get(), nullptr, 0.0);
  } else {
    v = Scratch<double>(m);
    Scratch<I> lcnt(m);
    mean_leaves(o, r.get(), lcnt.get(), v.get());
  }
  const double* value = mode == 0 ? r.get() : v.get();
  const Outputs<scalar_t> dst{nullptr, values};
  parallel(0, m, [&](int64_t b, int64_t e) {
    each_position(o, dst, b, e, [&](int64_t q, int64_t n) { dst.put(n, 0.0, false, value[q]); });
  });
}

// RLKERN_TREES_INDEX64=1 forces the int64 instantiation (the tests run it on small forests).
bool fits_int32(const at::Tensor& parent) {
  static const bool force64 = [] {
    const char* env = std::getenv("RLKERN_TREES_INDEX64");
    return env != nullptr && env[0] == '1';
  }();
  return !force64 && parent.size(0) < std::numeric_limits<int32_t>::max();
}

// mode: 0 = mean_children (SPO-tree), 1 = mean_leaves (TreeRL); max_depth: -1 or a bound on the
// depth of every node (a deeper one raises ValueError).
at::Tensor trees_values_cpu(const at::Tensor& parent, const at::Tensor& reward, int64_t mode, int64_t max_depth) {
  check_inputs(parent, reward);
  TORCH_CHECK(mode == 0 || mode == 1, "rlkern.trees: unknown values mode ", mode);
  const at::Tensor rw = readable(reward);
  at::Tensor out = at::empty({parent.size(0)}, reward.options().dtype(out_type(reward)));
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "trees_values", [&] {
    if (fits_int32(parent)) values_impl<int32_t>(parent, rw, mode, max_depth, out.data_ptr<scalar_t>());
    else values_impl<int64_t>(parent, rw, mode, max_depth, out.data_ptr<scalar_t>());
  });
  return out;
}

// Whitening statistics (verl's masked_whiten over the kept positions, weighted): total weight,
// mean and sum of squared deviations. Each chunk of positions gets exact two-pass moments while
// it is in cache; the chunks are then combined in position order (Chan et al.'s pairwise update),
// so the result does not depend on the number of threads.
struct Moments {
  double weight = 0.0, mean = 0.0, m2 = 0.0;

  void add(const Moments& other) {
    if (!(other.weight > 0.0)) return;
    const double total = weight + other.weight, delta = other.mean - mean;
    mean += delta * (other.weight / total);
    m2 += other.m2 + delta * delta * (weight * other.weight / total);
    weight = total;
  }
  // (mean, 1 / sqrt(Bessel-corrected variance + 1e-8)); (0, 1) when nothing is kept
  std::pair<double, double> whitening() const {
    if (!(weight > 0.0)) return {0.0, 1.0};
    const double var = weight > 1.0 ? m2 / weight * weight / (weight - 1.0) : 0.0;
    return {mean, 1.0 / std::sqrt(var + 1e-8)};
  }
};

// Moments of a over the kept positions [b, e), weighted by weights[node] (1 without weights).
template <typename I>
Moments chunk_moments(const I* node, const double* a, const bool* kept, const DoubleView* weights, int64_t b,
                      int64_t e) {
  auto weight = [&](int64_t q) { return kept[q] ? (weights ? weights->at(node[q]) : 1.0) : 0.0; };
  double w = 0.0, s = 0.0;
  for (int64_t q = b; q < e; ++q) {
    const double wq = weight(q);  // a is 0 where not kept
    w += wq;
    s += wq * a[q];
  }
  Moments out;
  if (!(w > 0.0)) return out;
  out.weight = w;
  out.mean = s / w;
  for (int64_t q = b; q < e; ++q) out.m2 += weight(q) * (a[q] - out.mean) * (a[q] - out.mean);
  return out;
}

// method: 0 spo_rloo, 1 spo_grpo, 2 treerl, 3 treepo, 4 arpo.
// Also returns the values the advantages are built from when with_values (else an empty tensor):
// the forest's order is the costly part, so values + advantages in one call cost one build.
template <typename I, typename scalar_t>
void advantages_impl(const at::Tensor& parent, const at::Tensor& reward, int64_t method, bool leaf_rloo,
                     bool group_size_weighting, bool whiten, const std::optional<at::Tensor>& leaf_weights,
                     double epsilon, int64_t max_depth, const Outputs<scalar_t>& out) {
  const int64_t m = parent.size(0);
  // SPO: values; TreeRL / TreePO: leaf sums (V = lsum / lcnt).
  Scratch<double> v(m);
  const Order<I> o = build_order<I, scalar_t>(parent, reward.data_ptr<scalar_t>(), v.get(), method == 2 || method == 4,
                                              max_depth);

  if (method <= 1) {
    Scratch<double> scale;
    if (method == 1) scale = Scratch<double>(m);
    mean_children(o, v.get(), scale.get(), epsilon);
    // A(n) = V(n) - V(parent), over the std of the siblings' values for grpo; keep = A != 0.
    parallel(0, m, [&](int64_t b, int64_t e) {
      each_position(o, out, b, e, [&](int64_t q, int64_t n) {
        const int64_t p = o.parent_pos[q];
        double a = 0.0;
        if (p >= 0) a = method == 1 ? (v[q] - v[p]) * scale[p] : v[q] - v[p];
        out.put(n, a, p >= 0 && a != 0.0, v[q]);
      });
    });
    return;
  }

  Scratch<I> lcnt(m);
  Scratch<double> value(m);
  Scratch<double> m2;
  if (method == 4) m2 = Scratch<double>(m);
  mean_leaves(o, v.get(), lcnt.get(), value.get(), m2.get());
  const double* lsum = v.get();
  if (method == 4) {
    // ARPO (hard attribution): the mean over the leaves below n of GRPO's leaf advantages over
    // the tree, (V(n) - mean) / (Bessel std + epsilon); a tree of one leaf has mean 0 and std 1
    // (rlkern.grpo's group of one). Both come from the root's leaf count, V and M2.
    non_root_advantages(o, out, value.get(), [&](int64_t q, int64_t, int64_t root) {
      const int64_t leaves = lcnt[root];
      const double mean = leaves > 1 ? value[root] : 0.0;
      const double spread = leaves > 1 ? std::sqrt(m2[root] / static_cast<double>(leaves - 1)) : 1.0;
      return (value[q] - mean) / (spread + epsilon);
    });
    return;
  }
  if (method == 2) {
    non_root_advantages(o, out, value.get(), [&](int64_t q, int64_t p, int64_t root) {
      const double vq = value[q];
      double a = ((vq - value[root]) + (vq - value[p])) / std::sqrt(static_cast<double>(lcnt[q]));
      if (leaf_rloo) {
        // Leaves re-centred on the other leaves of the tree: every value becomes
        // n/(n-1) * (V - V_root), so the advantage scales by n/(n-1) (0 for a single leaf).
        const double leaves = static_cast<double>(lcnt[root]);
        a = leaves > 1.0 ? a * leaves / (leaves - 1.0) : 0.0;
      }
      return a;
    });
    return;
  }

  // TreePO: sums over the subgroups (ancestors with more than one leaf, and the root) on the
  // path to each position, carried down level by level; a leaf's advantage is its reward minus
  // their (weighted) mean. Unwhitened, the outputs are written on the way down; whitened, the
  // advantages wait in a until the statistics over all leaves are known, gathered on the way
  // down too, per chunk of kGrain positions of a level.
  Scratch<double> csum(m), wsum(m);
  Scratch<double> a;
  Scratch<bool> kept;
  at::Tensor wt;
  DoubleView weights_view{};
  const DoubleView* weights = nullptr;
  if (whiten) {
    a = Scratch<double>(m);
    kept = Scratch<bool>(m);
    if (leaf_weights.has_value()) {
      TORCH_CHECK(leaf_weights->dim() == 1 && leaf_weights->size(0) == m, "rlkern.trees: leaf_weights must be [M]");
      wt = readable(*leaf_weights);
      weights_view = view(wt);
      weights = &weights_view;
    }
  }
  std::vector<Moments> moments;  // per chunk, in position order
  for (int64_t d = 0; d < o.num_levels(); ++d) {
    const int64_t lo = o.level[d], hi = o.level[d + 1], chunks = (hi - lo + kGrain - 1) / kGrain;
    const size_t first_chunk = moments.size();
    moments.resize(first_chunk + (whiten ? chunks : 0));
    for_each_chunk(chunks, [&](int64_t chunk) {
      const int64_t b = lo + chunk * kGrain, e = std::min(hi, b + kGrain);
      each_position(o, whiten ? Outputs<scalar_t>{nullptr, nullptr} : out, b, e, [&](int64_t q, int64_t n) {
        const int64_t p = o.parent_pos[q];
        const int64_t leaves = lcnt[q];
        // The root's group is always used, with mean 0 when it holds a single trajectory (the
        // official code, like verl's REINFORCE++-baseline); deeper groups only when they hold
        // more than one.
        const bool include = p < 0 || leaves > 1;
        const double term = leaves > 1 ? (group_size_weighting ? lsum[q] : value[q]) : 0.0;
        const double weight = group_size_weighting ? static_cast<double>(leaves) : 1.0;
        csum[q] = (p < 0 ? 0.0 : csum[p]) + (include ? term : 0.0);
        wsum[q] = (p < 0 ? 0.0 : wsum[p]) + (include ? weight : 0.0);
        const bool trajectory = p >= 0 && o.num_children(q) == 0;  // internal nodes and roots: none
        // a leaf's value is its reward (read there rather than lsum: one stream fewer)
        const double x = trajectory ? value[q] - csum[p] / wsum[p] : 0.0;
        if (whiten) {
          a[q] = x;
          kept[q] = trajectory;
        } else {
          out.put(n, x, trajectory, value[q]);
        }
      });
      if (whiten) moments[first_chunk + chunk] = chunk_moments(o.node.get(), a.get(), kept.get(), weights, b, e);
    });
  }
  if (!whiten) return;
  Moments total;
  for (const Moments& chunk : moments) total.add(chunk);
  const auto [mean, inv_std] = total.whitening();
  parallel(0, m, [&](int64_t b, int64_t e) {
    each_position(o, out, b, e, [&](int64_t q, int64_t n) {
      out.put(n, kept[q] ? (a[q] - mean) * inv_std : 0.0, kept[q], value[q]);
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> trees_advantages_cpu(
    const at::Tensor& parent, const at::Tensor& reward, int64_t method, bool leaf_rloo, bool group_size_weighting,
    bool whiten, const std::optional<at::Tensor>& leaf_weights, double epsilon, bool with_values, int64_t max_depth) {
  check_inputs(parent, reward);
  TORCH_CHECK(method >= 0 && method <= 4, "rlkern.trees: unknown advantage method ", method);
  const int64_t m = parent.size(0);
  const at::Tensor rw = readable(reward);
  const auto type = reward.options().dtype(out_type(reward));
  at::Tensor adv = at::empty({m}, type);
  at::Tensor keep = at::empty({m}, reward.options().dtype(at::kBool));
  at::Tensor values = at::empty({with_values ? m : 0}, type);
  AT_DISPATCH_FLOATING_TYPES(adv.scalar_type(), "trees_advantages", [&] {
    Scratch<NodeRecord<scalar_t>> records(m);
    const Outputs<scalar_t> out{records.get(), nullptr};
    if (fits_int32(parent)) {
      advantages_impl<int32_t, scalar_t>(parent, rw, method, leaf_rloo, group_size_weighting, whiten,
                                         leaf_weights, epsilon, max_depth, out);
    } else {
      advantages_impl<int64_t, scalar_t>(parent, rw, method, leaf_rloo, group_size_weighting, whiten,
                                         leaf_weights, epsilon, max_depth, out);
    }
    scalar_t* a = adv.data_ptr<scalar_t>();
    bool* k = keep.data_ptr<bool>();
    scalar_t* v = with_values ? values.data_ptr<scalar_t>() : nullptr;
    parallel(0, m, [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) {
        a[n] = records[n].adv;
        k[n] = records[n].keep;
      }
      if (v) for (int64_t n = b; n < e; ++n) v[n] = records[n].value;
    });
  });
  return {adv, keep, values};
}

at::Tensor trees_values_meta(const at::Tensor& parent, const at::Tensor& reward, int64_t /*mode*/,
                             int64_t /*max_depth*/) {
  return at::empty({parent.size(0)}, reward.options().dtype(out_type(reward)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> trees_advantages_meta(
    const at::Tensor& parent, const at::Tensor& reward, int64_t /*method*/, bool /*leaf_rloo*/,
    bool /*group_size_weighting*/, bool /*whiten*/, const std::optional<at::Tensor>& /*leaf_weights*/,
    double /*epsilon*/, bool with_values, int64_t /*max_depth*/) {
  const auto type = reward.options().dtype(out_type(reward));
  return {at::empty({parent.size(0)}, type), at::empty({parent.size(0)}, reward.options().dtype(at::kBool)),
          at::empty({with_values ? parent.size(0) : 0}, type)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rlkern, m) {
  m.def("cpp_tree_values(Tensor parent, Tensor reward, int mode, int max_depth=-1) -> Tensor");
  m.def(
      "cpp_tree_advantages(Tensor parent, Tensor reward, int method, bool leaf_rloo, bool group_size_weighting, "
      "bool whiten, Tensor? leaf_weights, float epsilon, bool with_values, int max_depth=-1) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rlkern, CPU, m) {
  m.impl("cpp_tree_values", &trees_values_cpu);
  m.impl("cpp_tree_advantages", &trees_advantages_cpu);
}

TORCH_LIBRARY_IMPL(rlkern, Meta, m) {
  m.impl("cpp_tree_values", &trees_values_meta);
  m.impl("cpp_tree_advantages", &trees_advantages_meta);
}
