// Every header at::vec (ATen/cpu/vec/vec.h) includes outside its own files, included before a
// vec_isa_*.cpp file switches the compiler's target: their inline functions are then compiled
// for the default target there as everywhere else in the extension (one definition each), and
// only at::vec's own code, in per-ISA namespaces, sees the wider instruction set. (sleef.h is
// left to at::vec: it only declares functions, and declares the wide ones only once the
// target has them.)
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <complex>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>  // every intrinsic, each under its own target (GCC)
#endif

#include <ATen/AccumulateType.h>
#include <ATen/Config.h>
#include <ATen/NumericUtils.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/TypeCast.h>
#include <c10/util/complex.h>
#include <c10/util/irange.h>
#if __has_include(<ATen/native/quantized/AffineQuantizerBase.h>)
#include <ATen/native/quantized/AffineQuantizerBase.h>
#endif
