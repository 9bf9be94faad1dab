// CPU implementations of torch.ops.c2c_native (kernels in csrc/cpu).
#include <torch/library.h>

#include "cpu/fuse_cpu.h"

TORCH_LIBRARY_FRAGMENT(c2c_native, m) {
  // How the CPU backend computes caches of `dtype` on this machine (GEMM engine, row kernels,
  // threads): for benchmarks and bug reports.
  m.def("cpu_config(ScalarType dtype) -> str", &c2c::cpu::config);
  // Per-stage times for benchmarks (c2c_kernels.backends.cpu.stage_times).
  m.def("cpu_stage_times(bool enable) -> str", &c2c::cpu::stage_times);
  // The GEMM engine choice (measured at first use per dtype and shape class, cached).
  m.def("cpu_choose_engine(ScalarType dtype, int tokens, int hidden) -> str", &c2c::cpu::choose_engine_name);
  m.def("cpu_engine_choices(bool clear) -> str", &c2c::cpu::engine_choices);
  // The packed engine's cache of oneDNN-packed weights ("entries=N bytes=B").
  m.def("cpu_packed_cache(bool clear) -> str", &c2c::cpu::packed_cache);
  // The cached folds V = W_head Wh2 of the weight branch ("entries=N bytes=B fusers=F").
  m.def("cpu_head_fold_cache(bool clear) -> str", &c2c::cpu::head_fold_cache);
}

TORCH_LIBRARY_IMPL(c2c_native, CPU, m) {
  m.impl("fuse", &c2c::cpu::fuse);
  m.impl("project", &c2c::cpu::project);
  m.impl("merge", &c2c::cpu::merge);
}
