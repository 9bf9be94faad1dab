// The GEMMs of the CPU backend: C[M, N] (+)= A[M, K] @ W[N, K]^T through one of three engines,
// with a per-column-range epilogue that runs while that part of C is still in cache; and the
// choice of engine per (dtype, shape class), measured at first use (docs/cpu.md).
#pragma once

#include <c10/util/FunctionRef.h>
#include <c10/core/ScalarType.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

#include "cpu/vec.h"

namespace c2c::cpu {

// How the GEMMs of one call are computed.
enum class Engine {
  // Activations and outputs fp32; fp32 weights are used as they are, 16-bit weights are
  // widened to fp32 one block of rows at a time (per thread, in L2) and fed to the fp32 BLAS.
  // On CPUs without native 16-bit matrix units this beats ATen's 16-bit GEMM many times over.
  F32,
  // Activations, outputs and weights all in the 16-bit cache dtype, through ATen's 16-bit
  // GEMM (oneDNN: AMX or AVX512-BF16/FP16 where the CPU has them).
  Native16,
  // 16-bit activations and weights, fp32 outputs (accumulated straight into the fp32 residual
  // stream, no 16-bit rounding of GEMM outputs): ATen's cpublas::brgemm micro-kernel, the one
  // Inductor's CPU GEMM template uses, on blocks of W transposed (and packed into VNNI pairs
  // where cpublas::could_pack says the CPU has a micro-kernel, i.e. AMX) per thread.
  Brgemm,
  // Activations, outputs and weights in the 16-bit cache dtype through oneDNN's inner product
  // (mkldnn::_linear_pointwise) on weights reordered once into oneDNN's blocked layout
  // (mkldnn::_reorder_linear_weight) and cached (see packed_cache_info); the FFN-up GEMMs run
  // GELU as oneDNN's post-op on the fp32 accumulators. Where torch lacks mkldnn or these ops,
  // the engine is unavailable (packed_available).
  Packed,
};

constexpr int kEngines = 4;
const char* engine_name(Engine engine);

// The engine for a call on caches of `dtype` with `tokens` valid tokens and fuser hidden
// width `hidden`. fp32 caches always take Engine::F32. For 16-bit caches C2C_CPU_GEMM=fp32,
// =native, =brgemm or =packed forces one (=packed runs native16 where unavailable) (read on every call); otherwise the first call of each
// (dtype, token class, hidden) times one hidden x hidden GEMM on every engine, checks each
// result against the fp32 one, and keeps the fastest, cached for the process. The CPU's flags
// give the prior (prior_engine), which another engine must beat by 1.1x (and in three of four
// timed rounds) to be chosen; the timed work is one plain GEMM plus one with the FFN-up's GELU.
Engine choose_engine(c10::ScalarType dtype, int64_t tokens, int64_t hidden);
// The engine the CPU flags suggest: where AMX or AVX512 has the dtype, Packed if it can run
// the dtype here (packed_available), else Native16; F32 otherwise.
Engine prior_engine(c10::ScalarType dtype);
// The engine C2C_CPU_GEMM forces for 16-bit `dtype`, or -1.
int forced_engine(c10::ScalarType dtype);
// One line per measured (dtype, token class, hidden): the times and the choice. `clear`
// forgets every choice (the next call of each class measures again).
std::string engine_log(bool clear);

// A row-major matrix operand: element (i, j) at p + (i * ld + j) * dt_size(dt).
// For a weight, `src` may name the tensor p points into (Engine::Packed caches its packed
// copy under that tensor's identity and version; without it every call packs anew).
struct Mat {
  void* p;
  Dt dt;
  int64_t ld;
  const at::Tensor* src = nullptr;
};

inline Mat offset(Mat m, int64_t row, int64_t col) {
  return Mat{static_cast<char*>(m.p) + (row * m.ld + col) * dt_size(m.dt), m.dt, m.ld};
}

// The dtypes an engine's GEMMs take: A (activations) and C (outputs), for 16-bit caches `cdt`.
inline Dt a_dtype(Engine e, Dt cdt) { return e == Engine::F32 ? Dt::F32 : cdt; }
inline Dt c_dtype(Engine e, Dt cdt) { return e == Engine::Native16 || e == Engine::Packed ? cdt : Dt::F32; }

// C = A W^T (or C += A W^T when `accumulate`), all M x N x K. A and C in the engine's dtypes
// (a_dtype, c_dtype), W of the cache dtype (or fp32 for Engine::F32). Engine::Native16 wants
// A and C dense (ld == k, ld == n). Uses every intra-op thread. When given,
// `epilogue(n0, n1)` is called once for each column range [n0, n1) of C after that range is
// final; ranges cover [0, N) and may run concurrently.
//
// Threading: Engine::F32 and Engine::Brgemm split the columns of C between the threads (blocks
// handed out dynamically), each thread converting its rows of W (widened to fp32 in blocks of
// C2C_CPU_WBLOCK rows, default ~1 MiB; or transposed/packed for brgemm) and running its
// epilogue on them; C2C_CPU_SPLIT=0 leaves fp32-weight GEMMs to BLAS's own threading instead.
// Engine::Native16 makes one ATen call and lets oneDNN thread.
void gemm(Engine engine, int64_t m, int64_t n, int64_t k, Mat a, Mat w, Mat c, bool accumulate,
          c10::function_ref<void(int64_t, int64_t)> epilogue = nullptr);

// Exact (erf) GELU in place over columns [n0, n1) of rows [0, m) of C (16-bit C widened,
// GELU'd and rounded back): the FFN-up epilogue of the engines without a fused GELU.
void gelu_columns(Mat c, int64_t m, int64_t n0, int64_t n1);

// Engine::Packed without the copy into a workspace: A W^T (gelu'd when `gelu`) in the dense
// [m, n] tensor oneDNN allocates, or an undefined tensor when W is not packed yet (its first
// call, see C2C_CPU_PACK_AFTER: the caller then runs gemm). A dense.
at::Tensor gemm_packed_out(int64_t m, int64_t n, int64_t k, Mat a, Mat w, bool gelu);

// Whether Engine::Packed can run `dtype` here: torch built with mkldnn (at::hasMKLDNN()), the
// mkldnn::_reorder_linear_weight / mkldnn::_linear_pointwise ops registered, and oneDNN taking
// the dtype on this CPU (probed once). C2C_CPU_GEMM=packed runs native16 where it cannot.
bool packed_available(c10::ScalarType dtype);
// The packed-weight cache: entries and bytes held; `clear` empties it.
std::string packed_cache_info(bool clear);

}  // namespace c2c::cpu
