// AVX2 + FMA + F16C row kernels (see vec.h). Only this file's functions use those ISAs: each
// carries a target attribute, and the dispatcher checks the CPU first, so the extension still
// loads on CPUs without AVX2. Nothing but <immintrin.h> and C headers is included, so no inline
// library function gets compiled for AVX2 by accident.
#include <cstdint>
#include <cstring>

#include "cpu/vec.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define C2C_HAVE_AVX2_KERNELS 1
#include <immintrin.h>
#endif

namespace c2c::cpu {

#if defined(C2C_HAVE_AVX2_KERNELS)
#define C2C_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace {

// ---- loads and stores of 8 elements --------------------------------------------------------

C2C_AVX2 inline __m256 bf16x8_to_f32(__m128i v) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

// Round to nearest even, NaN stays NaN (as c10::BFloat16 does).
C2C_AVX2 inline __m128i f32x8_to_bf16(__m256 x) {
  const __m256i xi = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(xi, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(xi, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

C2C_AVX2 inline __m256 load8(const void* p, Dt dt) {
  switch (dt) {
    case Dt::BF16:
      return bf16x8_to_f32(_mm_loadu_si128(static_cast<const __m128i*>(p)));
    case Dt::F16:
      return _mm256_cvtph_ps(_mm_loadu_si128(static_cast<const __m128i*>(p)));
    default:
      return _mm256_loadu_ps(static_cast<const float*>(p));
  }
}

C2C_AVX2 inline void store8(__m256 v, void* p, Dt dt) {
  switch (dt) {
    case Dt::BF16:
      _mm_storeu_si128(static_cast<__m128i*>(p), f32x8_to_bf16(v));
      break;
    case Dt::F16:
      _mm_storeu_si128(static_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      break;
    default:
      _mm256_storeu_ps(static_cast<float*>(p), v);
  }
}

// The last r < 8 elements, through a zero-padded buffer (same rounding as the full vectors).
C2C_AVX2 inline __m256 load_tail(const void* p, Dt dt, int64_t r) {
  alignas(32) unsigned char buf[32] = {0};
  std::memcpy(buf, p, r * dt_size(dt));
  return load8(buf, dt);
}

C2C_AVX2 inline void store_tail(__m256 v, void* p, Dt dt, int64_t r) {
  alignas(32) unsigned char buf[32];
  store8(v, buf, dt);
  std::memcpy(p, buf, r * dt_size(dt));
}

C2C_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// ---- math ----------------------------------------------------------------------------------

// exp(x) for x <= 0 (Cephes polynomial, ~1 ulp); used by erf only.
C2C_AVX2 inline __m256 exp_neg(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_round_ps(fx, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}

// erf(x), Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), as ATen's vectorized erf.
C2C_AVX2 inline __m256 erf8(__m256 x) {
  const __m256 sign = _mm256_and_ps(x, _mm256_set1_ps(-0.f));
  const __m256 a = _mm256_xor_ps(x, sign);
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), a, one));
  __m256 r = _mm256_fmadd_ps(_mm256_set1_ps(1.061405429f), t, _mm256_set1_ps(-1.453152027f));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(1.421413741f));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(-0.284496736f));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(0.254829592f));
  const __m256 e = exp_neg(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(a, a)));
  const __m256 y = _mm256_fnmadd_ps(_mm256_mul_ps(r, t), e, one);  // 1 - r t exp(-x^2)
  return _mm256_xor_ps(y, sign);
}

C2C_AVX2 inline __m256 gelu8(__m256 x) {
  const __m256 e = erf8(_mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f)));
  return _mm256_mul_ps(_mm256_mul_ps(x, _mm256_set1_ps(0.5f)), _mm256_add_ps(e, _mm256_set1_ps(1.f)));
}

// ---- the row kernels -----------------------------------------------------------------------

C2C_AVX2 void load(const void* src, Dt dt, float* dst, int64_t n) {
  const auto* s = static_cast<const unsigned char*>(src);
  const int64_t es = dt_size(dt);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load8(s + i * es, dt));
  if (i < n) store_tail(load_tail(s + i * es, dt, n - i), dst + i, Dt::F32, n - i);
}

C2C_AVX2 void store(const float* src, void* dst, Dt dt, int64_t n) {
  auto* d = static_cast<unsigned char*>(dst);
  const int64_t es = dt_size(dt);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8(_mm256_loadu_ps(src + i), d + i * es, dt);
  if (i < n) store_tail(load_tail(src + i, Dt::F32, n - i), d + i * es, dt, n - i);
}

C2C_AVX2 float add_sum_sq(float* z, const float* o, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 a = _mm256_add_ps(_mm256_loadu_ps(z + i), _mm256_loadu_ps(o + i));
    const __m256 b = _mm256_add_ps(_mm256_loadu_ps(z + i + 8), _mm256_loadu_ps(o + i + 8));
    _mm256_storeu_ps(z + i, a);
    _mm256_storeu_ps(z + i + 8, b);
    acc0 = _mm256_fmadd_ps(a, a, acc0);
    acc1 = _mm256_fmadd_ps(b, b, acc1);
  }
  for (; i < n; i += 8) {
    const int64_t r = n - i < 8 ? n - i : 8;
    const __m256 a = _mm256_add_ps(load_tail(z + i, Dt::F32, r), load_tail(o + i, Dt::F32, r));
    store_tail(a, z + i, Dt::F32, r);
    acc0 = _mm256_fmadd_ps(a, a, acc0);
  }
  return hsum(_mm256_add_ps(acc0, acc1));
}

C2C_AVX2 float sum_sq(const float* x, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
    acc0 = _mm256_fmadd_ps(a, a, acc0);
    acc1 = _mm256_fmadd_ps(b, b, acc1);
  }
  for (; i < n; i += 8) {
    const __m256 a = load_tail(x + i, Dt::F32, n - i < 8 ? n - i : 8);
    acc0 = _mm256_fmadd_ps(a, a, acc0);
  }
  return hsum(_mm256_add_ps(acc0, acc1));
}

C2C_AVX2 void scale_mul(const float* z, float r, const float* s, float* out, int64_t n) {
  const __m256 rv = _mm256_set1_ps(r);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(z + i), rv), _mm256_loadu_ps(s + i)));
  for (; i < n; ++i) out[i] = z[i] * r * s[i];
}

C2C_AVX2 void add(float* z, const float* o, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(z + i, _mm256_add_ps(_mm256_loadu_ps(z + i), _mm256_loadu_ps(o + i)));
  for (; i < n; ++i) z[i] += o[i];
}

C2C_AVX2 void gelu(float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, gelu8(_mm256_loadu_ps(x + i)));
  if (i < n) store_tail(gelu8(load_tail(x + i, Dt::F32, n - i)), x + i, Dt::F32, n - i);
}

C2C_AVX2 float dot(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i < n; i += 8) {
    const int64_t r = n - i < 8 ? n - i : 8;
    acc0 = _mm256_fmadd_ps(load_tail(a + i, Dt::F32, r), load_tail(b + i, Dt::F32, r), acc0);
  }
  return hsum(_mm256_add_ps(acc0, acc1));
}

C2C_AVX2 void axpy(float a, const float* x, float* y, int64_t n) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
}

}  // namespace

const VecOps* vec_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  static const VecOps ops{"avx2", load, store, add_sum_sq, sum_sq, scale_mul, add, gelu, dot, axpy};
  return ok ? &ops : nullptr;
}

#else  // not x86-64 GCC/Clang: the portable kernels only

const VecOps* vec_avx2() { return nullptr; }

#endif

}  // namespace c2c::cpu
