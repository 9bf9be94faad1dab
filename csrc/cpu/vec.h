// Row kernels of the CPU backend: dtype conversion, RMS-norm pieces, exact GELU, dot products.
//
// Every function works on contiguous runs of one row (a few thousand elements at most, so the
// row stays in L1 across the calls that make up one epilogue). The vectorised implementations
// are one source (vec_at.h, through at::vec::Vectorized<float>) compiled once per instruction
// set: AVX-512 and AVX2 (vec_isa_avx512.cpp, vec_isa_avx2.cpp: only that code is compiled for
// the wider target, so the extension still builds and loads on any x86-64) and NEON
// (vec_isa_neon.cpp, 64-bit ARM); portable scalar code (vec_scalar.cpp) is the fallback. `vec()`
// picks one at first use from what the CPU supports.
#pragma once

#include <cstdint>

namespace c2c::cpu {

// Element types of caches, weights and buffers.
enum class Dt : int { F32 = 0, BF16 = 1, F16 = 2 };

inline int64_t dt_size(Dt dt) { return dt == Dt::F32 ? 4 : 2; }

struct VecOps {
  const char* name;
  // dst[i] = float(src[i]) for src of type dt.
  void (*load)(const void* src, Dt dt, float* dst, int64_t n);
  // dst[i] = dt(src[i]), rounded to nearest even.
  void (*store)(const float* src, void* dst, Dt dt, int64_t n);
  // z[i] += o[i]; returns sum of z[i]^2 (after the add).
  float (*add_sum_sq)(float* z, const float* o, int64_t n);
  // Sum of x[i]^2.
  float (*sum_sq)(const float* x, int64_t n);
  // out[i] = z[i] * r * s[i].
  void (*scale_mul)(const float* z, float r, const float* s, float* out, int64_t n);
  // z[i] += o[i].
  void (*add)(float* z, const float* o, int64_t n);
  // x[i] = x[i] * 0.5 * (1 + erf(x[i] / sqrt(2))): exact (erf) GELU, |error| < 2e-7 * |x|.
  void (*gelu)(float* x, int64_t n);
  // sum of a[i] * b[i].
  float (*dot)(const float* a, const float* b, int64_t n);
  // y[i] += a * x[i].
  void (*axpy)(float a, const float* x, float* y, int64_t n);
  // out[r * nw + j] = sum_i x[r * ldx + i] * w[j * n + i] for rows r < rows, j < nw: a few rows
  // against a few weight rows (the head logits), each weight row read once per block of rows.
  // Every out element is summed in the same order as dot(), whatever the blocking.
  void (*row_dots)(const float* x, int64_t ldx, int64_t rows, const float* w, int64_t nw, int64_t n, float* out);
};

const VecOps& vec_scalar();
// nullptr when this build has no such kernels or the CPU lacks the instruction set.
const VecOps* vec_avx512();  // AVX-512 F/BW/VL/DQ (+ AVX2, FMA, F16C)
const VecOps* vec_avx2();    // AVX2, FMA, F16C
const VecOps* vec_neon();    // 64-bit ARM
// The implementation to use on this CPU: the widest of the above it has. C2C_CPU_VEC=scalar,
// =avx2 or =avx512 forces one (read once; a set the CPU lacks falls back to the next narrower).
const VecOps& vec();

}  // namespace c2c::cpu
