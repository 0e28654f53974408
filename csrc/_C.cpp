// rlkern._C: importing this module runs the TORCH_LIBRARY_FRAGMENT(rlkern, ...) registrations
// of every family file in csrc/. No pybind11: a bare module keeps each translation unit small.
#include <Python.h>
#include <torch/library.h>

namespace {

bool built_with_cuda() {
#ifdef RLKERN_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rlkern, m) {
  m.def("_built_with_cuda() -> bool", &built_with_cuda);
}

extern "C" __attribute__((visibility("default"))) PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
