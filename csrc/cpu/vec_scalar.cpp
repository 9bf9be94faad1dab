// Portable row kernels (any CPU), and the runtime choice between them and the vectorised ones.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cpu/vec.h"

namespace c2c::cpu {
namespace {

void load(const void* src, Dt dt, float* dst, int64_t n) {
  switch (dt) {
    case Dt::F32:
      std::memcpy(dst, src, n * sizeof(float));
      break;
    case Dt::BF16: {
      auto s = static_cast<const c10::BFloat16*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(s[i]);
      break;
    }
    case Dt::F16: {
      auto s = static_cast<const c10::Half*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(s[i]);
      break;
    }
  }
}

void store(const float* src, void* dst, Dt dt, int64_t n) {
  switch (dt) {
    case Dt::F32:
      std::memcpy(dst, src, n * sizeof(float));
      break;
    case Dt::BF16: {
      auto d = static_cast<c10::BFloat16*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = c10::BFloat16(src[i]);
      break;
    }
    case Dt::F16: {
      auto d = static_cast<c10::Half*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = c10::Half(src[i]);
      break;
    }
  }
}

float add_sum_sq(float* z, const float* o, int64_t n) {
  float acc = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    z[i] += o[i];
    acc += z[i] * z[i];
  }
  return acc;
}

float sum_sq(const float* x, int64_t n) {
  float acc = 0.f;
  for (int64_t i = 0; i < n; ++i) acc += x[i] * x[i];
  return acc;
}

void scale_mul(const float* z, float r, const float* s, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = z[i] * r * s[i];
}

void add(float* z, const float* o, int64_t n) {
  for (int64_t i = 0; i < n; ++i) z[i] += o[i];
}

void gelu(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = 0.5f * x[i] * (1.f + std::erf(x[i] * 0.70710678118654752f));
}

float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

void axpy(float a, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

void row_dots(const float* x, int64_t ldx, int64_t rows, const float* w, int64_t nw, int64_t n, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < nw; ++j) out[r * nw + j] = dot(x + r * ldx, w + j * n, n);
  }
}

}  // namespace

const VecOps& vec_scalar() {
  static const VecOps ops{"scalar", load, store, add_sum_sq, sum_sq, scale_mul, add, gelu, dot, axpy, row_dots};
  return ops;
}

const VecOps& vec() {
  static const VecOps* chosen = [] {
    const char* env = std::getenv("C2C_CPU_VEC");
    const std::string want = env != nullptr ? env : "";
    if (want == "scalar") return &vec_scalar();
    const VecOps* v = want == "avx2" ? nullptr : vec_avx512();
    if (v == nullptr) v = vec_avx2();
    if (v == nullptr) v = vec_neon();
    return v != nullptr ? v : &vec_scalar();
  }();
  return *chosen;
}

}  // namespace c2c::cpu
