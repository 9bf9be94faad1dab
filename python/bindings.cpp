// The native op schemas. Each backend registers its implementation for its dispatch key in
// its own file (python/cpu_ops.cpp, python/cuda_ops.cpp); arguments are validated in Python
// (c2c_kernels/ops.py) before these run, and the C++ side re-checks only what memory safety
// needs.
#include <torch/library.h>

TORCH_LIBRARY(c2c_native, m) {
  // Entry i fuses sharer_caches[i] into receiver_caches[i] with fuser fusers[i] of the stacked
  // weights (the 14 tensors of c2c_kernels.FuserWeights, in order). In place.
  m.def(
      "fuse(Tensor(a!)[] receiver_caches, Tensor[] sharer_caches, Tensor receiver_slots, "
      "Tensor sharer_slots, Tensor[] weights, int[] fusers) -> ()");
  // The corrections without writing them: (projection [R, T, Ht*Dt], head_scale [R, T, Ht]), fp32.
  m.def(
      "project(Tensor[] receiver_caches, Tensor[] sharer_caches, Tensor receiver_slots, "
      "Tensor sharer_slots, Tensor[] weights, int[] fusers) -> (Tensor, Tensor)");
  // x += sum_j head_scale * projection over S sharers (projections[r * S + j]), in place.
  m.def(
      "merge(Tensor(a!)[] receiver_caches, Tensor receiver_slots, Tensor[] projections, "
      "Tensor[] head_scales) -> ()");
}

// Python imports c2c_kernels._C to run the registrations above.
#include <Python.h>
static PyModuleDef c2c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&c2c_module); }
