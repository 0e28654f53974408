// DAPO's dynamic-sampling filter (rlkern/ops/advantages/dynamic_sampling.py): which samples belong
// to a group that carries a learning signal. A group is dropped when it has more than one sample
// and every score in it is the same (verl's recipe drops a group whose reward std is 0); a group of
// one and a group holding a NaN are kept (np.std is NaN there, which is not 0).
//
// One pass: the first score of each group is its representative, a later score that differs from
// it (or is NaN, or the representative is NaN) marks the group as varying. Comparisons are exact
// (as rlkern's "equal scores give advantage exactly 0"), in the scores' own dtype widened to double.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace {

template <typename S>
void keep_values(const S* x, const int64_t* inv, int64_t N, bool* keep) {
  std::vector<int64_t> count(N, 0);
  std::vector<double> rep(N, 0.0);
  std::vector<char> varies(N, 0);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t g = inv[i];
    TORCH_CHECK(g >= 0 && g < N, "rlkern.cpp_dynamic_sampling_mask: group numbers must lie in [0, ", N, "), got ", g);
    const double xi = static_cast<double>(x[i]);
    if (count[g] == 0) {
      rep[g] = xi;
      varies[g] = std::isnan(xi) ? 1 : 0;
    } else if (!(xi == rep[g])) {  // NaN compares unequal: such a group is kept
      varies[g] = 1;
    }
    count[g] += 1;
  }
  for (int64_t i = 0; i < N; ++i) {
    const int64_t g = inv[i];
    keep[i] = count[g] <= 1 || varies[g] != 0;
  }
}

// scores [N] float16/bfloat16/float32/float64 (CPU), inverse [N] int64 dense group numbers in
// [0, N) -> keep [N] bool.
at::Tensor dynamic_sampling_mask_cpu(const at::Tensor& scores, const at::Tensor& inverse) {
  const char* op = "rlkern.cpp_dynamic_sampling_mask";
  TORCH_CHECK(scores.dim() == 1 && inverse.dim() == 1 && scores.size(0) == inverse.size(0), op,
              ": scores and inverse must be [N], got ", scores.sizes(), " and ", inverse.sizes());
  TORCH_CHECK(scores.device().is_cpu() && inverse.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(inverse.scalar_type() == at::kLong, op, ": inverse must be int64, got ", inverse.scalar_type());
  const int64_t N = scores.size(0);
  const at::Tensor x = scores.contiguous();
  const at::Tensor inv = inverse.contiguous();
  at::Tensor keep = at::empty({N}, scores.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cpp_dynamic_sampling_mask", [&] {
    keep_values(x.data_ptr<scalar_t>(), inv.data_ptr<int64_t>(), N, keep.data_ptr<bool>());
  });
  return keep;
}

at::Tensor dynamic_sampling_mask_meta(const at::Tensor& scores, const at::Tensor&) {
  return at::empty(scores.sizes(), scores.options().dtype(at::kBool));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rlkern, m) {
  m.def("cpp_dynamic_sampling_mask(Tensor scores, Tensor inverse) -> Tensor");
}

TORCH_LIBRARY_IMPL(rlkern, CPU, m) {
  m.impl("cpp_dynamic_sampling_mask", &dynamic_sampling_mask_cpu);
}

TORCH_LIBRARY_IMPL(rlkern, Meta, m) {
  m.impl("cpp_dynamic_sampling_mask", &dynamic_sampling_mask_meta);
}
