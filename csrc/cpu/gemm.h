// The GEMMs of the CPU backend: C[M, N] (+)= A[M, K] @ W[N, K]^T around ATen's BLAS, with a
// per-column-range epilogue that runs while that part of C is still in cache.
#pragma once

#include <c10/util/FunctionRef.h>
#include <c10/core/ScalarType.h>

#include <cstdint>

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
};

// The engine for caches of `dtype` on this CPU. C2C_CPU_GEMM=fp32 or =native overrides the
// choice for 16-bit dtypes (read on every call, for tests and benchmarks).
Engine choose_engine(c10::ScalarType dtype);
const char* engine_name(Engine engine);

// A row-major matrix operand: element (i, j) at p + (i * ld + j) * dt_size(dt).
struct Mat {
  void* p;
  Dt dt;
  int64_t ld;
};

inline Mat offset(Mat m, int64_t row, int64_t col) {
  return Mat{static_cast<char*>(m.p) + (row * m.ld + col) * dt_size(m.dt), m.dt, m.ld};
}

// C = A W^T (or C += A W^T when `accumulate`), all M x N x K. Engine::F32 wants A and C fp32
// and W of any dtype; Engine::Native16 wants all three in one 16-bit dtype, A and C dense
// (ld == k, ld == n), and C is zeroed before a non-accumulating GEMM (see gemm.cpp). Uses every
// intra-op thread. When given, `epilogue(n0, n1)` is called once for each column range
// [n0, n1) of C after that range is final; ranges cover [0, N) and may run concurrently.
//
// Threading: Engine::F32 splits the columns of C between the threads, each running a
// single-threaded BLAS call on its rows of W (16-bit W in blocks of C2C_CPU_WBLOCK rows,
// default ~1 MiB of fp32, handed out dynamically); C2C_CPU_SPLIT=0 leaves fp32 GEMMs to
// BLAS's own threading instead. Engine::Native16 makes one ATen call and lets oneDNN thread.
void gemm(Engine engine, int64_t m, int64_t n, int64_t k, Mat a, Mat w, Mat c, bool accumulate,
          c10::function_ref<void(int64_t, int64_t)> epilogue = nullptr);

}  // namespace c2c::cpu
