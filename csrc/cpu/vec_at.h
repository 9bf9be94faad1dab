// The row kernels of vec.h through at::vec::Vectorized<float>, for one instruction set. Included
// only by the vec_isa_*.cpp files, each of which selects at::vec's implementation
// (CPU_CAPABILITY) and the compiler's target for its own translation unit first, and names the
// namespace (C2C_VEC_NS) so the sets never share a symbol. Nothing here is called unless the
// dispatcher (vec_scalar.cpp) found the instruction set on the CPU.
#ifndef C2C_VEC_NS
#error "include cpu/vec_at.h from a vec_isa_*.cpp file only"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <cstring>

#include "cpu/vec.h"

namespace c2c::cpu::C2C_VEC_NS {
namespace {

using at::vec::Vectorized;
using FVec = Vectorized<float>;
constexpr int64_t kW = FVec::size();  // floats per vector
constexpr int64_t kW2 = 2 * kW;       // 16-bit elements per vector (converted as two float vectors)

inline int64_t rest(int64_t n, int64_t i, int64_t w) { return n - i < w ? n - i : w; }

// n <= 2 kW 16-bit elements of type T at src, widened into dst.
template <typename T>
inline void widen(const T* src, float* dst, int64_t n) {
  const auto v = Vectorized<T>::loadu(src, n);
  const auto [lo, hi] = at::vec::convert_to_float<T>(v);
  lo.store(dst, n < kW ? n : kW);
  if (n > kW) hi.store(dst + kW, n - kW);
}

// n <= 2 kW floats at src rounded (to nearest even) into dst.
template <typename T>
inline void narrow(const float* src, T* dst, int64_t n) {
  const FVec lo = FVec::loadu(src, n < kW ? n : kW);
  const FVec hi = n > kW ? FVec::loadu(src + kW, n - kW) : FVec(0.f);
  at::vec::convert_from_float<T>(lo, hi).store(dst, n);
}

void load(const void* src, Dt dt, float* dst, int64_t n) {
  if (dt == Dt::F32) {
    std::memcpy(dst, src, n * sizeof(float));
  } else if (dt == Dt::BF16) {
    const auto* s = static_cast<const c10::BFloat16*>(src);
    for (int64_t i = 0; i < n; i += kW2) widen(s + i, dst + i, rest(n, i, kW2));
  } else {
    const auto* s = static_cast<const c10::Half*>(src);
    for (int64_t i = 0; i < n; i += kW2) widen(s + i, dst + i, rest(n, i, kW2));
  }
}

void store(const float* src, void* dst, Dt dt, int64_t n) {
  if (dt == Dt::F32) {
    std::memcpy(dst, src, n * sizeof(float));
  } else if (dt == Dt::BF16) {
    auto* d = static_cast<c10::BFloat16*>(dst);
    for (int64_t i = 0; i < n; i += kW2) narrow(src + i, d + i, rest(n, i, kW2));
  } else {
    auto* d = static_cast<c10::Half*>(dst);
    for (int64_t i = 0; i < n; i += kW2) narrow(src + i, d + i, rest(n, i, kW2));
  }
}

// Sum of the lanes (in a fixed order, so results do not depend on the call).
inline float hsum(const FVec& v) {
  float lanes[kW];
  v.store(lanes);
  float s = 0.f;
  for (int64_t i = 0; i < kW; ++i) s += lanes[i];
  return s;
}

float add_sum_sq(float* z, const float* o, int64_t n) {
  FVec acc(0.f);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const FVec a = FVec::loadu(z + i) + FVec::loadu(o + i);
    a.store(z + i);
    acc = at::vec::fmadd(a, a, acc);
  }
  if (i < n) {
    const FVec a = FVec::loadu(z + i, n - i) + FVec::loadu(o + i, n - i);  // zero-filled lanes
    a.store(z + i, n - i);
    acc = at::vec::fmadd(a, a, acc);
  }
  return hsum(acc);
}

float sum_sq(const float* x, int64_t n) {
  FVec acc(0.f);
  for (int64_t i = 0; i < n; i += kW) {
    const FVec a = FVec::loadu(x + i, rest(n, i, kW));
    acc = at::vec::fmadd(a, a, acc);
  }
  return hsum(acc);
}

void scale_mul(const float* z, float r, const float* s, float* out, int64_t n) {
  const FVec rv(r);
  for (int64_t i = 0; i < n; i += kW) {
    const int64_t c = rest(n, i, kW);
    (FVec::loadu(z + i, c) * rv * FVec::loadu(s + i, c)).store(out + i, c);
  }
}

void add(float* z, const float* o, int64_t n) {
  for (int64_t i = 0; i < n; i += kW) {
    const int64_t c = rest(n, i, kW);
    (FVec::loadu(z + i, c) + FVec::loadu(o + i, c)).store(z + i, c);
  }
}

void gelu(float* x, int64_t n) {
  const FVec half(0.5f), one(1.f), inv_sqrt2(0.70710678118654752f);
  for (int64_t i = 0; i < n; i += kW) {
    const int64_t c = rest(n, i, kW);
    const FVec v = FVec::loadu(x + i, c);
    (v * half * (one + (v * inv_sqrt2).erf())).store(x + i, c);
  }
}

float dot(const float* a, const float* b, int64_t n) {
  FVec acc(0.f);
  for (int64_t i = 0; i < n; i += kW) {
    const int64_t c = rest(n, i, kW);
    acc = at::vec::fmadd(FVec::loadu(a + i, c), FVec::loadu(b + i, c), acc);
  }
  return hsum(acc);
}

void axpy(float a, const float* x, float* y, int64_t n) {
  const FVec av(a);
  for (int64_t i = 0; i < n; i += kW) {
    const int64_t c = rest(n, i, kW);
    at::vec::fmadd(av, FVec::loadu(x + i, c), FVec::loadu(y + i, c)).store(y + i, c);
  }
}

// Four rows at a time against each weight row: one load of w per four FMAs. Each row keeps
// one accumulator and walks i in the order dot() does, so results match dot() bit for bit.
void row_dots(const float* x, int64_t ldx, int64_t rows, const float* w, int64_t nw, int64_t n, float* out) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    const float* x0 = x + r * ldx;
    const float *x1 = x0 + ldx, *x2 = x1 + ldx, *x3 = x2 + ldx;
    for (int64_t j = 0; j < nw; ++j) {
      const float* wj = w + j * n;
      FVec a0(0.f), a1(0.f), a2(0.f), a3(0.f);
      for (int64_t i = 0; i < n; i += kW) {
        const int64_t c = rest(n, i, kW);
        const FVec wv = FVec::loadu(wj + i, c);
        a0 = at::vec::fmadd(FVec::loadu(x0 + i, c), wv, a0);
        a1 = at::vec::fmadd(FVec::loadu(x1 + i, c), wv, a1);
        a2 = at::vec::fmadd(FVec::loadu(x2 + i, c), wv, a2);
        a3 = at::vec::fmadd(FVec::loadu(x3 + i, c), wv, a3);
      }
      float* o = out + r * nw + j;
      o[0] = hsum(a0);
      o[nw] = hsum(a1);
      o[2 * nw] = hsum(a2);
      o[3 * nw] = hsum(a3);
    }
  }
  for (; r < rows; ++r) {
    for (int64_t j = 0; j < nw; ++j) out[r * nw + j] = dot(x + r * ldx, w + j * n, n);
  }
}

}  // namespace

const VecOps& ops() {
  static const VecOps o{C2C_VEC_NAME, load, store, add_sum_sq, sum_sq, scale_mul, add, gelu, dot, axpy, row_dots};
  return o;
}

}  // namespace c2c::cpu::C2C_VEC_NS
