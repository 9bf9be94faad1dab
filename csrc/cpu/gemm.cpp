// GEMM engines of the CPU backend (see gemm.h).
#include "cpu/gemm.h"

#include "cpu/common.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/Utils.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace c2c::cpu {
namespace {

c10::ScalarType scalar_type(Dt dt) {
  switch (dt) {
    case Dt::BF16:
      return at::kBFloat16;
    case Dt::F16:
      return at::kHalf;
    default:
      return at::kFloat;
  }
}

// A non-owning [rows, cols] tensor over m (transposed: [cols, rows] with strides (1, ld)).
at::Tensor as_tensor(Mat m, int64_t rows, int64_t cols, bool transposed = false) {
  const auto opts = at::TensorOptions().dtype(scalar_type(m.dt));
  if (transposed) return at::from_blob(m.p, {cols, rows}, {1, m.ld}, opts);
  return at::from_blob(m.p, {rows, cols}, {m.ld, 1}, opts);
}

// One ATen GEMM on the given blocks; runs on the calling thread inside a parallel region.
void mm_block(int64_t m, int64_t n, int64_t k, Mat a, Mat w, Mat c, bool accumulate) {
  at::Tensor ct = as_tensor(c, m, n);
  const at::Tensor at_ = as_tensor(a, m, k), wt = as_tensor(w, n, k, /*transposed=*/true);
  if (accumulate) {
    at::addmm_out(ct, ct, at_, wt);
  } else {
    // C is uninitialised workspace. The fp32 BLAS (MKL/OpenBLAS sgemm) never reads C when
    // beta = 0, as BLAS specifies. The 16-bit GEMM goes through oneDNN's AMX/AVX512 kernels,
    // which have been caught reading memory outside the operands they were given (whole K
    // tiles of A past a row's last column), where a NaN survives a multiply by 0. A and C
    // are dense here (see gemm()), and C is zeroed first, so nothing a kernel may read of
    // C holds a NaN; the cost is one pass over C, small next to the GEMM.
    if (c.dt != Dt::F32) ct.zero_();
    at::mm_out(ct, at_, wt);
  }
}

bool cap(const char* name) {
  static const auto caps = at::cpu::get_cpu_capabilities();
  auto it = caps.find(name);
  return it != caps.end() && it->second.isBool() && it->second.toBool();
}

int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::max<int64_t>(1, std::atoll(v)) : fallback;
}

constexpr int64_t kAlign = 16;  // column ranges start on multiples of 16 (cache lines of fp32)

}  // namespace

Engine choose_engine(c10::ScalarType dtype) {
  if (dtype == at::kFloat) return Engine::F32;
  if (const char* env = std::getenv("C2C_CPU_GEMM")) {
    if (std::strcmp(env, "fp32") == 0) return Engine::F32;
    if (std::strcmp(env, "native") == 0) return Engine::Native16;
  }
  static const bool bf16 = cap("amx_bf16") || cap("avx512_bf16");
  static const bool fp16 = cap("amx_fp16") || cap("avx512_fp16");
  return (dtype == at::kBFloat16 ? bf16 : fp16) ? Engine::Native16 : Engine::F32;
}

const char* engine_name(Engine engine) { return engine == Engine::F32 ? "fp32" : "native16"; }

void gemm(Engine engine, int64_t m, int64_t n, int64_t k, Mat a, Mat w, Mat c, bool accumulate,
          c10::function_ref<void(int64_t, int64_t)> epilogue) {
  if (m == 0 || n == 0) return;
  // The 16-bit path gets dense A and C (see mm_block and the hid buffer in fuser.cpp): no
  // padding bytes between rows that a library kernel could read as part of a tile.
  TORCH_CHECK(engine == Engine::F32 || (a.ld == k && c.ld == n), "c2c cpu: the native16 GEMM needs dense operands (",
              "A ld ", a.ld, " for K ", k, ", C ld ", c.ld, " for N ", n, ")");
  const int64_t threads = at::get_num_threads();
  // Column ranges of about equal size, one per thread.
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, (n + kAlign - 1) / kAlign));
  const int64_t per = ((n + parts - 1) / parts + kAlign - 1) / kAlign * kAlign;

  // C2C_CPU_SPLIT=0: leave the threading of fp32 GEMMs to BLAS (for comparisons).
  const char* split = std::getenv("C2C_CPU_SPLIT");
  const bool blas_threads = split != nullptr && split[0] == '0';
  if (engine == Engine::Native16 || (w.dt == Dt::F32 && (parts == 1 || blas_threads))) {
    // One ATen GEMM over everything, threaded inside BLAS; then the epilogue, threaded here.
    mm_block(m, n, k, a, w, c, accumulate);
    if (epilogue) {
      parallel_tasks(parts, [&](int64_t p) {
        const int64_t n0 = p * per, n1 = std::min(n, n0 + per);
        if (n0 < n1) epilogue(n0, n1);
      });
    }
    return;
  }

  if (w.dt == Dt::F32) {
    // fp32 weights: each thread owns a column range of C (reads its rows of W once) and runs
    // its epilogue while that range is still in its cache.
    parallel_tasks(parts, [&](int64_t p) {
      const int64_t n0 = p * per, n1 = std::min(n, n0 + per);
      if (n0 >= n1) return;
      mm_block(m, n1 - n0, k, a, offset(w, n0, 0), offset(c, 0, n0), accumulate);
      if (epilogue) epilogue(n0, n1);
    });
    return;
  }

  // 16-bit weights, fp32 activations: widen `rows` rows of W at a time (about 1 MiB of fp32)
  // into a per-thread buffer and multiply that block in fp32. Smaller blocks stay in L2 but
  // make BLAS pack A once more per block; at 512 tokens 256 rows of 1024 measured best.
  const int64_t rows = std::min(env_int("C2C_CPU_WBLOCK", std::max<int64_t>(64, (1 << 18) / k)), per);
  const int64_t blocks = (n + rows - 1) / rows;
  const VecOps& v = vec();
  parallel_tasks(blocks, [&](int64_t blk) {
    thread_local std::vector<float> buf;
    if (static_cast<int64_t>(buf.size()) < rows * k) buf.resize(rows * k);
    poison(buf.data(), rows * k);
    const int64_t n0 = blk * rows, n1 = std::min(n, n0 + rows);
    for (int64_t j = n0; j < n1; ++j) v.load(offset(w, j, 0).p, w.dt, buf.data() + (j - n0) * k, k);
    mm_block(m, n1 - n0, k, a, Mat{buf.data(), Dt::F32, k}, offset(c, 0, n0), accumulate);
    if (epilogue) epilogue(n0, n1);
  });
}

}  // namespace c2c::cpu
