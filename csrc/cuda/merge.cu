// The gated merge, in place at the receiver slots:
//   x[h] += sum_j G_j * sigmoid(a_j[h]) * y_j[h]      (head_scale_j = G_j * sigmoid(a_j), fp32)
// summed in fp32 over the S sharers of an entry and rounded to the cache dtype once.
//
// One thread owns one 16-byte chunk of one head row of one token of one entry, so a warp
// covers consecutive chunks of a token's row: with NHD pages that is one contiguous run of
// memory. The 16-byte path needs 16-byte aligned rows (base, strides, head_dim and the
// projection rows); the host decides per entry and otherwise takes the scalar path, which
// walks the same chunk one element at a time and is correct for any strides.
#include "cuda/common.cuh"

namespace c2c::cuda {
namespace {

constexpr int kMergeThreads = 256;

template <bool kVectorized, typename T, typename P>
__device__ __forceinline__ void merge_chunk(const MergeParams<T, P>& p, int entry, const RowChunk& rc, int64_t slot,
                                            float first_scale) {
  constexpr int V = vector_width<T>();
  const int32_t first = rc.chunk * V;
  const int32_t count = kVectorized ? V : min(V, p.head_dim - first);
  const int64_t column = static_cast<int64_t>(rc.head) * p.head_dim + first;
  T* row = slot_row(p.views[entry], slot, rc.head) + first;

  float x[V] = {};  // lanes past `count` (scalar path) stay unused
  if constexpr (kVectorized) {
    load_vector<V>(row, x);
  } else {
    for (int k = 0; k < count; ++k) x[k] = to_float(row[k]);
  }
  bool changed = false;
  for (int32_t j = 0; j < p.sharers; ++j) {
    const MergeSource<T, P>& src = p.sources[entry * p.sharers + j];
    const float scale = j == 0 ? first_scale : src.head_scale[rc.token * src.head_scale_row_stride + rc.head];
    // A closed gate contributes exactly 0: skip it, and leave the row unwritten when every
    // sharer of the entry is closed.
    if (scale == 0.f) continue;
    changed = true;
    const P* projection = src.projection + rc.token * src.projection_row_stride + column;
    float y[V] = {};
    if constexpr (kVectorized) {
      load_vector<V>(projection, y);
    } else {
      for (int k = 0; k < count; ++k) y[k] = to_float(projection[k]);
    }
    if (src.bias != nullptr) {
      float b[V] = {};
      if constexpr (kVectorized) {
        load_vector<V>(src.bias + column, b);
      } else {
        for (int k = 0; k < count; ++k) b[k] = to_float(src.bias[column + k]);
      }
#pragma unroll
      for (int k = 0; k < V; ++k) y[k] += b[k];
    }
#pragma unroll
    for (int k = 0; k < V; ++k) x[k] += scale * y[k];
  }
  if (!changed) return;
  if constexpr (kVectorized) {
    store_vector<V>(row, x);
  } else {
    for (int k = 0; k < count; ++k) row[k] = from_float<T>(x[k]);
  }
}

// grid: (ceil(tokens * heads * chunks / kMergeThreads), entries); the parameter block stays in
// parameter memory (__grid_constant__) although it is indexed by the entry at run time.
template <typename T, typename P>
__global__ void __launch_bounds__(kMergeThreads) gated_merge_kernel(const __grid_constant__ MergeParams<T, P> p) {
  RowChunk rc;
  if (!this_thread_chunk<vector_width<T>()>(p.tokens, p.heads, p.head_dim, rc)) return;
  const int entry = blockIdx.y;
  // The slot and the first sharer's scale are independent loads: issue both before waiting,
  // then the cache row and the projection row, so a thread waits on two round trips.
  const int64_t slot = load_slot(p.slots, rc.token);
  const MergeSource<T, P>& first = p.sources[entry * p.sharers];
  const float first_scale = first.head_scale[rc.token * first.head_scale_row_stride + rc.head];
  if (slot < 0 || slot >= p.rows) return;  // padding or outside the pool: never read or written
  if (p.vectorized[entry]) {
    merge_chunk<true>(p, entry, rc, slot, first_scale);
  } else {
    merge_chunk<false>(p, entry, rc, slot, first_scale);
  }
}

}  // namespace

template <typename T, typename P>
void launch_merge(const MergeParams<T, P>& params, int entries, cudaStream_t stream) {
  constexpr int V = vector_width<T>();
  const int64_t work = static_cast<int64_t>(params.tokens) * params.heads * ((params.head_dim + V - 1) / V);
  if (work == 0 || entries == 0) return;
  const dim3 grid(static_cast<unsigned>((work + kMergeThreads - 1) / kMergeThreads), entries);
  C2C_LAUNCH(grid, kMergeThreads, stream, gated_merge_kernel<T, P>)(params);
}

template void launch_merge<float, float>(const MergeParams<float, float>&, int, cudaStream_t);
template void launch_merge<__half, float>(const MergeParams<__half, float>&, int, cudaStream_t);
template void launch_merge<__half, __half>(const MergeParams<__half, __half>&, int, cudaStream_t);
template void launch_merge<__nv_bfloat16, float>(const MergeParams<__nv_bfloat16, float>&, int, cudaStream_t);
template void launch_merge<__nv_bfloat16, __nv_bfloat16>(const MergeParams<__nv_bfloat16, __nv_bfloat16>&, int,
                                                         cudaStream_t);

}  // namespace c2c::cuda
