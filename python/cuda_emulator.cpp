// The CUDA backend's host code and kernels built for the CPU emulator (csrc/cuda/emulator):
// the same fuse / project / merge / prepare_slots as torch.ops.c2c_native on CUDA, taking CPU
// tensors.
// Loaded by c2c_kernels/backends/cuda_emulator.py, for tests.
#include <torch/extension.h>

#include "cuda/fuse_cuda.h"
#include "cuda/runtime.h"
#include "cuda/workspace.h"

namespace c2c::cuda::emulator {
std::vector<float> selftest(const std::string& name, int64_t blocks, int64_t threads);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "csrc/cuda run on the CPU emulator";
  m.def("fuse", &c2c::cuda::fuse);
  m.def("project", &c2c::cuda::project);
  m.def("merge", &c2c::cuda::merge);
  m.def("prepare_slots", &c2c::cuda::prepare_slots, "the slots of c2c_kernels.slots.prepare(), on the emulator",
        pybind11::arg("receiver_slots"), pybind11::arg("sharer_slots"), pybind11::arg("receiver_rows"),
        pybind11::arg("sharer_rows"), pybind11::arg("dedupe"), pybind11::arg("status"));
  m.def("chunk_plan", &c2c::cuda::chunk_plan,
        "(tokens per chunk, chunks, workspace bytes) of a fuse / project call of these shapes",
        pybind11::arg("entries"), pybind11::arg("tokens"), pybind11::arg("sharer_width"),
        pybind11::arg("receiver_width"), pybind11::arg("hidden"), pybind11::arg("inner"), pybind11::arg("heads"),
        pybind11::arg("element_size"), pybind11::arg("device_memory"), pybind11::arg("head_fold") = true);
  m.def("input_weight_cache_entries", &c2c::cuda::input_weight_cache_entries,
        "weight stacks whose concatenated W_in is kept (live ones only)");
  m.def("head_fold_cache_entries", &c2c::cuda::head_fold_cache_entries,
        "weight stack pairs whose head fold [W_head, W_head W2h] is kept (live ones only)");
  m.def("captured_derived_tensors", &c2c::cuda::captured_derived_tensors,
        "derived weight tensors kept alive because a (stand-in) CUDA-graph capture used them");
  m.def(
      "set_emulated_capture", [](bool on) { c2c::cuda::emulated_capture() = on; },
      "stand in for a CUDA-graph capture: the host code takes its capture paths");
  m.def("poisoning", &c2c::cuda::poison_workspaces, "whether C2C_POISON_WORKSPACES=1 was set (read once)");
  m.def("selftest", &c2c::cuda::emulator::selftest, "run one of the emulator's own test kernels");
}
