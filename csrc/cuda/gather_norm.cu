// The memory-bound steps around the fuser's GEMMs:
//  - gather: cache rows through the slots (token alignment included: the sharer slots carry
//    it) into dense [entry, token, heads*dim] tiles the batched GEMMs read directly;
//  - row epilogue: bias + residual + RMSNorm after a GEMM, one pass per row, writing the fp32
//    residual stream and the next GEMM's normalised input(s) without re-reading anything;
//  - GELU in place on the FFN's inner activations (exact erf form);
//  - bias epilogue: bias (+ hard gate and sigmoid for the head logits) into fp32 outputs.
#include <algorithm>

#include "cuda/common.cuh"
#include "fuser_weights.h"  // kRmsEps

namespace c2c::cuda {
namespace {

constexpr int kGatherThreads = 256;
constexpr int kElementwiseThreads = 256;
constexpr int kRowItems = 8;  // row values a thread keeps in registers: rows up to 8 * 1024 wide

// ---- gather -----------------------------------------------------------------------------

// grid: (ceil(tokens * heads * chunks / kGatherThreads), entries), one 16-byte chunk per thread
// (or the same chunk element by element when the view is not 16-byte aligned).
template <typename T>
__global__ void __launch_bounds__(kGatherThreads) gather_rows_kernel(const __grid_constant__ GatherParams<T> p) {
  constexpr int V = vector_width<T>();
  RowChunk rc;
  if (!this_thread_chunk<V>(p.tokens, p.heads, p.head_dim, rc)) return;
  const int entry = blockIdx.y;
  const int32_t first = rc.chunk * V;
  const int64_t width = static_cast<int64_t>(p.heads) * p.head_dim;
  T* out = p.out + (static_cast<int64_t>(entry) * p.tokens + rc.token) * width +
           static_cast<int64_t>(rc.head) * p.head_dim + first;
  // A padding token's rows are zero (and its sharer slot, possibly garbage, is never read); so
  // are the rows of a slot outside the pool: it is never addressed.
  int64_t slot = -1;
  if (load_slot(p.receiver_slots, rc.token) >= 0) slot = load_slot(p.slots, rc.token);
  const bool padding = slot < 0 || slot >= p.rows;
  if (p.vectorized[entry]) {
    uint4 word = make_uint4(0, 0, 0, 0);
    if (!padding) {
      const T* row = slot_row(p.views[entry], slot, rc.head) + first;
      C2C_CHECK_ALIGNED16(row);
      word = *reinterpret_cast<const uint4*>(row);
    }
    C2C_CHECK_ALIGNED16(out);
    *reinterpret_cast<uint4*>(out) = word;
    return;
  }
  const int32_t count = min(V, p.head_dim - first);
  if (padding) {
    for (int k = 0; k < count; ++k) out[k] = from_float<T>(0.f);
    return;
  }
  const T* row = slot_row(p.views[entry], slot, rc.head) + first;
  for (int k = 0; k < count; ++k) out[k] = row[k];
}

// ---- row epilogue -----------------------------------------------------------------------

// Sum over the block, the same order on every run (no atomics): warp shuffles, then warp 0.
__device__ __forceinline__ float block_sum(float value) {
  __shared__ float warp_sums[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  const int warps = (blockDim.x + 31) / 32;
  value = lane < warps ? warp_sums[lane] : 0.f;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;  // every warp reduced the same partial sums in the same order
}

// grid: (tokens, entries), one block per row; each thread keeps kRowItems values of the row.
template <typename T>
__global__ void __launch_bounds__(1024) row_epilogue_kernel(const __grid_constant__ RowEpilogueParams<T> p) {
  const int64_t row = (static_cast<int64_t>(p.entry_begin) + blockIdx.y) * p.tokens + blockIdx.x;
  const int64_t offset = row * p.width;
  const int64_t fuser = p.fusers.fuser[blockIdx.y];
  float z[kRowItems];
  float sum_squares = 0.f;
#pragma unroll
  for (int k = 0; k < kRowItems; ++k) {
    const int i = threadIdx.x + k * blockDim.x;
    z[k] = 0.f;
    if (i < p.width) {
      // Same order as the reference: (GEMM output + bias), then + residual.
      float v = p.delta != nullptr ? to_float(p.delta[offset + i]) : 0.f;
      if (p.bias != nullptr) v += to_float(p.bias[fuser * p.bias_fuser_stride + i]);
      if (p.residual != nullptr) v = p.residual[offset + i] + v;
      z[k] = v;
      sum_squares += v * v;
      if (p.residual_out != nullptr) p.residual_out[offset + i] = v;
      if (p.plain_out != nullptr) p.plain_out[offset + i] = from_float<T>(v);
    }
  }
  if (p.norm_out[0] == nullptr) return;
  const float inv_rms = rsqrtf(block_sum(sum_squares) / static_cast<float>(p.width) + kRmsEps);
#pragma unroll
  for (int n = 0; n < 2; ++n) {
    if (p.norm_out[n] == nullptr) continue;
    const T* scale = p.norm_scale[n] + fuser * p.norm_fuser_stride[n];
#pragma unroll
    for (int k = 0; k < kRowItems; ++k) {
      const int i = threadIdx.x + k * blockDim.x;
      if (i < p.width) p.norm_out[n][offset + i] = from_float<T>(z[k] * inv_rms * to_float(scale[i]));
    }
  }
}

// ---- GELU -------------------------------------------------------------------------------

__device__ __forceinline__ float gelu_erf(float x) { return x * 0.5f * (1.f + erff(x * 0.70710678118654752f)); }

// grid: ceil(vectors / kElementwiseThreads); the last count % V elements go to the first threads.
template <typename T>
__global__ void __launch_bounds__(kElementwiseThreads) gelu_kernel(T* data, int64_t vectors, int64_t count) {
  constexpr int V = vector_width<T>();
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index < vectors) {
    float v[V];
    load_vector<V>(data + index * V, v);
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = gelu_erf(v[k]);
    store_vector<V>(data + index * V, v);
  }
  const int64_t tail = vectors * V + index;
  if (tail < count) data[tail] = from_float<T>(gelu_erf(to_float(data[tail])));
}

// ---- bias epilogue ----------------------------------------------------------------------

// grid: (ceil(tokens * width / kElementwiseThreads), entries).
template <typename T>
__global__ void __launch_bounds__(kElementwiseThreads) bias_epilogue_kernel(const __grid_constant__ BiasEpilogueParams<T> p) {
  const uint32_t index = blockIdx.x * blockDim.x + threadIdx.x;
  if (index >= static_cast<uint32_t>(p.tokens) * p.width) return;
  const int32_t token = index / p.width;
  const int32_t column = index - token * p.width;
  const int64_t entry = static_cast<int64_t>(p.entry_begin) + blockIdx.y;
  float* out = p.out + entry * p.out_entry_stride + token * p.out_row_stride + column;
  if (p.skip.data != nullptr) {
    const int64_t slot = load_slot(p.skip, token);
    if (slot < 0 || slot >= p.skip_rows) {
      *out = 0.f;
      return;
    }
  }
  const int64_t fuser = p.fusers.fuser[blockIdx.y];
  float v = to_float(p.in[(entry * p.tokens + token) * p.width + column]);
  if (p.bias != nullptr) v += to_float(p.bias[fuser * p.bias_fuser_stride + column]);
  if (p.gate != nullptr) {
    // The hard gate, read here on the device: the host never learns whether it is open.
    const bool open = p.gate[fuser * p.gate_stride] > 0.f;
    v = open ? 1.f / (1.f + expf(-v)) : 0.f;
  }
  *out = v;
}

}  // namespace

template <typename T>
void launch_gather(const GatherParams<T>& params, int entries, cudaStream_t stream) {
  constexpr int V = vector_width<T>();
  const int64_t work = static_cast<int64_t>(params.tokens) * params.heads * ((params.head_dim + V - 1) / V);
  if (work == 0 || entries == 0) return;
  const dim3 grid(static_cast<unsigned>((work + kGatherThreads - 1) / kGatherThreads), entries);
  C2C_LAUNCH(grid, kGatherThreads, stream, gather_rows_kernel<T>)(params);
}

// One block per row, a warp multiple of threads with at most kRowItems values each; the
// host guarantees width <= kRowItems * 1024.
template <typename T>
void launch_row_epilogue(const RowEpilogueParams<T>& params, int entries, cudaStream_t stream) {
  if (params.tokens == 0 || entries == 0) return;
  const int per_thread_rows = (params.width + kRowItems - 1) / kRowItems;
  const int threads = std::min(1024, std::max(32, (per_thread_rows + 31) / 32 * 32));
  const dim3 grid(params.tokens, entries);
  C2C_LAUNCH(grid, threads, stream, row_epilogue_kernel<T>)(params);
}

template <typename T>
void launch_bias_epilogue(const BiasEpilogueParams<T>& params, int entries, cudaStream_t stream) {
  const int64_t work = static_cast<int64_t>(params.tokens) * params.width;
  if (work == 0 || entries == 0) return;
  const dim3 grid(static_cast<unsigned>((work + kElementwiseThreads - 1) / kElementwiseThreads), entries);
  C2C_LAUNCH(grid, kElementwiseThreads, stream, bias_epilogue_kernel<T>)(params);
}

template <typename T>
void launch_gelu(T* data, int64_t count, cudaStream_t stream) {
  constexpr int V = vector_width<T>();
  const int64_t vectors = count / V;
  const int64_t threads = std::max(vectors, count - vectors * V);  // the tail needs count % V threads
  if (threads == 0) return;
  const int64_t blocks = (threads + kElementwiseThreads - 1) / kElementwiseThreads;
  C2C_LAUNCH(static_cast<unsigned>(blocks), kElementwiseThreads, stream, gelu_kernel<T>)(data, vectors, count);
}

#define C2C_INSTANTIATE(T)                                                                  \
  template void launch_gather<T>(const GatherParams<T>&, int, cudaStream_t);               \
  template void launch_row_epilogue<T>(const RowEpilogueParams<T>&, int, cudaStream_t);    \
  template void launch_bias_epilogue<T>(const BiasEpilogueParams<T>&, int, cudaStream_t);  \
  template void launch_gelu<T>(T*, int64_t, cudaStream_t);
C2C_INSTANTIATE(float)
C2C_INSTANTIATE(__half)
C2C_INSTANTIATE(__nv_bfloat16)
#undef C2C_INSTANTIATE

}  // namespace c2c::cuda
