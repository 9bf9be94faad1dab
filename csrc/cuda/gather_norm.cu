// The memory-bound steps around the fuser's GEMMs:
//  - gather: cache rows through the slots (token alignment included: the sharer slots carry
//    it) into dense rows the batched GEMMs read directly (the sharer and receiver rows of a
//    token side by side: the input GEMM's [S; X] row);
//  - row epilogue: bias + RMSNorm after a GEMM, one pass per row, writing the residual stream
//    and the next GEMM's normalised input(s) without re-reading anything; one warp per row with
//    16-byte accesses where the rows allow it, else one block per row;
//  - GELU in place on the FFN's inner activations (exact erf form);
//  - bias epilogue: bias (+ hard gate and sigmoid for the head logits) into fp32 outputs;
//  - head logits with the weight branch's W2h folded in: u and g rows against [W_head, V],
//    bias, gate and sigmoid, into the fp32 head scale (fuse.cu, "head fold").
#include <algorithm>

#include "cuda/common.cuh"
#include "fuser_weights.h"  // kRmsEps

namespace c2c::cuda {
namespace {

constexpr int kGatherThreads = 256;
constexpr int kElementwiseThreads = 256;
constexpr int kRowItems = 8;  // row values a thread keeps in registers: rows up to 8 * 1024 wide
constexpr int kRowWarps = 4;  // rows (one per warp) of a block of the warp-per-row epilogue
constexpr int kRowMaxVectors = 8;  // 16-byte vectors a lane keeps: rows up to 256 vectors wide

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
  T* out = p.out + entry * p.out_entry_stride + rc.token * p.out_row_stride +
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

// z = in + bias as fp32; out = T(z); the sum of squares of the values this thread saw.
template <typename T>
__device__ __forceinline__ float row_value(const RowEpilogueParams<T>& p, int64_t offset, int64_t fuser, int i,
                                           float& z) {
  // Same order as the reference: GEMM output + bias.
  z = to_float(p.in[offset + i]);
  if (p.bias != nullptr) z += to_float(p.bias[fuser * p.bias_fuser_stride + i]);
  if (p.out != nullptr) p.out[offset + i] = from_float<T>(z);
  return z * z;
}

// grid: (tokens, entries), one block per row; each thread keeps kRowItems values of the row.
// For rows the warp kernel below cannot take (unaligned, or wider than it keeps in registers).
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
    if (i < p.width) sum_squares += row_value(p, offset, fuser, i, z[k]);
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

// Sum over the 32 lanes of a warp, the same order on every run.
__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// grid: (ceil(tokens / kRowWarps), entries), one warp per row: lane l holds the 16-byte vectors
// l, l + 32, ... (kVectors of them at most) in registers, so a row is read once and written
// once with coalesced 16-byte accesses, and the norm needs only warp shuffles (no shared
// memory, no barrier). The host guarantees width % V == 0, width <= 32 * kVectors * V and
// 16-byte aligned rows (launch_row_epilogue's `vectorized`).
template <typename T, int kVectors>
__global__ void __launch_bounds__(kRowWarps * 32) row_epilogue_warp_kernel(const __grid_constant__ RowEpilogueParams<T> p) {
  constexpr int V = vector_width<T>();
  const int lane = threadIdx.x % 32;
  const int32_t token = blockIdx.x * kRowWarps + threadIdx.x / 32;
  // A warp past the last token still joins the shuffles (with zeros) and writes nothing.
  const bool live = token < p.tokens;
  const int64_t offset = ((static_cast<int64_t>(p.entry_begin) + blockIdx.y) * p.tokens + token) * p.width;
  const int64_t fuser = p.fusers.fuser[blockIdx.y];
  const int vectors = p.width / V;
  float z[kVectors][V];
  float sum_squares = 0.f;
#pragma unroll
  for (int k = 0; k < kVectors; ++k) {
    const int column = (lane + 32 * k) * V;
#pragma unroll
    for (int j = 0; j < V; ++j) z[k][j] = 0.f;
    if (!live || lane + 32 * k >= vectors) continue;
    load_vector<V>(p.in + offset + column, z[k]);
    if (p.bias != nullptr) {
      float b[V];
      load_vector<V>(p.bias + fuser * p.bias_fuser_stride + column, b);
#pragma unroll
      for (int j = 0; j < V; ++j) z[k][j] += b[j];
    }
    if (p.out != nullptr) store_vector<V>(p.out + offset + column, z[k]);
#pragma unroll
    for (int j = 0; j < V; ++j) sum_squares += z[k][j] * z[k][j];
  }
  if (p.norm_out[0] == nullptr) return;
  const float inv_rms = rsqrtf(warp_sum(sum_squares) / static_cast<float>(p.width) + kRmsEps);
  if (!live) return;
#pragma unroll
  for (int n = 0; n < 2; ++n) {
    if (p.norm_out[n] == nullptr) continue;
    const T* scale = p.norm_scale[n] + fuser * p.norm_fuser_stride[n];
#pragma unroll
    for (int k = 0; k < kVectors; ++k) {
      const int column = (lane + 32 * k) * V;
      if (lane + 32 * k >= vectors) continue;
      float g[V];
      load_vector<V>(scale + column, g);
#pragma unroll
      for (int j = 0; j < V; ++j) g[j] *= z[k][j] * inv_rms;
      store_vector<V>(p.norm_out[n] + offset + column, g);
    }
  }
}

// ---- head logits with the W2h GEMM folded in ----------------------------------------------

// The fp32 head scale of head h of a row: bias, hard gate (read on the device), sigmoid; 0 for
// a token project skips.
template <typename T>
__device__ __forceinline__ void store_head_scale(const HeadLogitsParams<T>& p, int64_t entry, int32_t token,
                                                 int64_t fuser, int h, float logit, bool skipped) {
  float* out = p.out + entry * p.out_entry_stride + token * p.out_row_stride + h;
  if (skipped) {
    *out = 0.f;
    return;
  }
  float v = logit;
  if (p.bias != nullptr) v += to_float(p.bias[fuser * p.bias_fuser_stride + h]);
  if (p.gate != nullptr) v = p.gate[fuser * p.gate_stride] > 0.f ? 1.f / (1.f + expf(-v)) : 0.f;
  *out = v;
}

// One 16-byte word of T values as fp32.
template <typename T>
__device__ __forceinline__ void unpack_word(const uint4& word, float (&out)[vector_width<T>()]) {
  alignas(16) T elems[vector_width<T>()];
  *reinterpret_cast<uint4*>(elems) = word;
#pragma unroll
  for (int k = 0; k < vector_width<T>(); ++k) out[k] = to_float(elems[k]);
}

// Rows of one warp of the head-logits kernel: each fold word a lane loads (from L1/L2) serves
// this many rows, so the fold's L1 traffic per row (Ht x 2H x 4 B: 64 KiB at Ht = 8, H = 1024)
// is divided by it; the lane keeps 2 kVectors words per row, 64 registers at the most.
template <int kVectors>
constexpr int head_logit_rows() {
  return kVectors <= 2 ? 4 : kVectors <= 4 ? 2 : 1;
}

// grid: (ceil(tokens / (kRowWarps * head_logit_rows)), entries), one warp per head_logit_rows
// consecutive rows (as row_epilogue_warp_kernel, more rows per warp). kVectors > 0: lane l
// keeps the 16-byte words l, l + 32, ... of each row's u and g in registers (each row read
// once from memory, coalesced); then per head its share of the dot products against the
// fold's rows (fp32, small: from L1/L2), summed by warp shuffles. kVectors == 0: rows that are
// not whole aligned vectors or too wide, element by element, one row per warp (u and g re-read
// per head, from L1). The same summation order on every run.
template <typename T, int kVectors>
__global__ void __launch_bounds__(kRowWarps * 32) head_logits_kernel(const __grid_constant__ HeadLogitsParams<T> p) {
  constexpr int V = vector_width<T>();
  constexpr int kRows = kVectors > 0 ? head_logit_rows<kVectors>() : 1;
  constexpr int kWords = kVectors > 0 ? kVectors : 1;
  const int lane = threadIdx.x % 32;
  const int32_t first = (blockIdx.x * kRowWarps + threadIdx.x / 32) * kRows;
  const int64_t entry = static_cast<int64_t>(p.entry_begin) + blockIdx.y;
  const int64_t fuser = p.fusers.fuser[blockIdx.y];
  const float* fold = p.fold + fuser * p.heads * 2 * static_cast<int64_t>(p.width);
  const int vectors = p.width / V;
  bool skipped[kRows], live[kRows];
  int64_t offset[kRows];
  uint4 u[kRows][kWords], g[kRows][kWords];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int32_t token = first + r;
    skipped[r] = false;
    if (token < p.tokens && p.skip.data != nullptr) {
      const int64_t slot = load_slot(p.skip, token);
      skipped[r] = slot < 0 || slot >= p.skip_rows;
    }
    // A row past the last token (or a skipped one) joins the shuffles with zeros.
    live[r] = token < p.tokens && !skipped[r];
    offset[r] = (entry * p.tokens + token) * p.width;
#pragma unroll
    for (int k = 0; k < kVectors; ++k) {
      u[r][k] = g[r][k] = make_uint4(0, 0, 0, 0);
      if (!live[r] || lane + 32 * k >= vectors) continue;
      const int column = (lane + 32 * k) * V;
      C2C_CHECK_ALIGNED16(p.u + offset[r] + column);
      C2C_CHECK_ALIGNED16(p.g + offset[r] + column);
      u[r][k] = *reinterpret_cast<const uint4*>(p.u + offset[r] + column);
      g[r][k] = *reinterpret_cast<const uint4*>(p.g + offset[r] + column);
    }
  }
  for (int h = 0; h < p.heads; ++h) {
    const float* w_head = fold + h * 2 * static_cast<int64_t>(p.width);
    const float* v_row = w_head + p.width;
    float sum[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) sum[r] = 0.f;
    if (kVectors > 0) {
#pragma unroll
      for (int k = 0; k < kVectors; ++k) {
        if (lane + 32 * k >= vectors) continue;
        const int column = (lane + 32 * k) * V;
        float a[V], b[V];
        load_vector<V>(w_head + column, a);
        load_vector<V>(v_row + column, b);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          float x[V], y[V];
          unpack_word<T>(u[r][k], x);  // zero for a row that is not live
          unpack_word<T>(g[r][k], y);
#pragma unroll
          for (int j = 0; j < V; ++j) sum[r] += x[j] * a[j];
#pragma unroll
          for (int j = 0; j < V; ++j) sum[r] += y[j] * b[j];
        }
      }
    } else if (live[0]) {
      for (int i = lane; i < p.width; i += 32) {
        sum[0] += to_float(p.u[offset[0] + i]) * w_head[i];
        sum[0] += to_float(p.g[offset[0] + i]) * v_row[i];
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const float logit = warp_sum(sum[r]);
      if (first + r < p.tokens && lane == h % 32) store_head_scale(p, entry, first + r, fuser, h, logit, skipped[r]);
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

template <typename T, int kVectors>
void launch_row_epilogue_warps(const RowEpilogueParams<T>& params, int entries, cudaStream_t stream) {
  const dim3 grid((params.tokens + kRowWarps - 1) / kRowWarps, entries);
  C2C_LAUNCH(grid, kRowWarps * 32, stream, row_epilogue_warp_kernel<T, kVectors>)(params);
}

// One warp per row when the rows are whole aligned vectors and fit a lane's registers; else
// one block per row, a warp multiple of threads with at most kRowItems values each (the host
// guarantees width <= kRowItems * 1024).
template <typename T>
void launch_row_epilogue(const RowEpilogueParams<T>& params, int entries, bool vectorized, cudaStream_t stream) {
  if (params.tokens == 0 || entries == 0) return;
  constexpr int V = vector_width<T>();
  const int lane_vectors = (params.width / V + 31) / 32;
  if (vectorized && params.width % V == 0 && lane_vectors <= kRowMaxVectors) {
    if (lane_vectors <= 1) return launch_row_epilogue_warps<T, 1>(params, entries, stream);
    if (lane_vectors <= 2) return launch_row_epilogue_warps<T, 2>(params, entries, stream);
    if (lane_vectors <= 4) return launch_row_epilogue_warps<T, 4>(params, entries, stream);
    return launch_row_epilogue_warps<T, kRowMaxVectors>(params, entries, stream);
  }
  const int per_thread_rows = (params.width + kRowItems - 1) / kRowItems;
  const int threads = std::min(1024, std::max(32, (per_thread_rows + 31) / 32 * 32));
  const dim3 grid(params.tokens, entries);
  C2C_LAUNCH(grid, threads, stream, row_epilogue_kernel<T>)(params);
}

template <typename T, int kVectors>
void launch_head_logits_warps(const HeadLogitsParams<T>& params, int entries, cudaStream_t stream) {
  constexpr int kBlockRows = kRowWarps * (kVectors > 0 ? head_logit_rows<kVectors>() : 1);
  const dim3 grid((params.tokens + kBlockRows - 1) / kBlockRows, entries);
  C2C_LAUNCH(grid, kRowWarps * 32, stream, head_logits_kernel<T, kVectors>)(params);
}

template <typename T>
void launch_head_logits(const HeadLogitsParams<T>& params, int entries, bool vectorized, cudaStream_t stream) {
  if (params.tokens == 0 || entries == 0 || params.heads == 0) return;
  constexpr int V = vector_width<T>();
  const int lane_vectors = (params.width / V + 31) / 32;
  if (vectorized && params.width % V == 0 && lane_vectors <= kRowMaxVectors) {
    if (lane_vectors <= 1) return launch_head_logits_warps<T, 1>(params, entries, stream);
    if (lane_vectors <= 2) return launch_head_logits_warps<T, 2>(params, entries, stream);
    if (lane_vectors <= 4) return launch_head_logits_warps<T, 4>(params, entries, stream);
    return launch_head_logits_warps<T, kRowMaxVectors>(params, entries, stream);
  }
  launch_head_logits_warps<T, 0>(params, entries, stream);
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
  template void launch_row_epilogue<T>(const RowEpilogueParams<T>&, int, bool, cudaStream_t); \
  template void launch_bias_epilogue<T>(const BiasEpilogueParams<T>&, int, cudaStream_t);  \
  template void launch_gelu<T>(T*, int64_t, cudaStream_t);                                 \
  template void launch_head_logits<T>(const HeadLogitsParams<T>&, int, bool, cudaStream_t);
C2C_INSTANTIATE(float)
C2C_INSTANTIATE(__half)
C2C_INSTANTIATE(__nv_bfloat16)
#undef C2C_INSTANTIATE

}  // namespace c2c::cuda
