// Kernel parameter blocks of the CUDA backend, shared by the host code that fills them
// (fuse.cu, through torch) and the kernels that read them (merge.cu, gather_norm.cu).
//
// Per-entry pointers and strides travel by value inside these structs, never through a
// device buffer: a launch then needs no host->device copy, so it can be captured in a CUDA
// graph and replayed. Each struct stays under the classic 4 KiB kernel-parameter limit; the
// host splits calls with more entries into several launches.
#pragma once

#include <cstdint>

#include "cache_view.h"
#include "cuda/device_types.h"

namespace c2c::cuda {

// A 1-D slot tensor, int32 or int64, with any stride. Padding is a negative value. The kernels
// also skip a slot >= the pool's rows: they never address memory outside a view, even when
// called without c2c_native::prepare_slots (which records such slots as errors).
struct SlotList {
  const void* data;
  int64_t stride;
  bool is_int64;
};

// ---- gather: cache rows through slots into a dense [entry, token, heads*dim] tile ----------

constexpr int kGatherMaxEntries = 64;

template <typename T>
struct GatherParams {
  CacheView<T> views[kGatherMaxEntries];
  bool vectorized[kGatherMaxEntries];  // 16-byte accesses are legal for this view (and for `out`)
  T* out;                  // token t of entry e at out + e * out_entry_stride + t * out_row_stride
  int64_t out_entry_stride;  // (the sharer and receiver rows share one [S; X] row: the input GEMM's)
  int64_t out_row_stride;
  SlotList slots;                      // where each token's row lives in these views
  SlotList receiver_slots;             // padding marker: a negative receiver slot gives a zero row
  int64_t rows;                        // pool rows of every view (one geometry); slots past it give zero rows
  int32_t tokens;
  int32_t heads;
  int32_t head_dim;
};

// ---- per-entry fuser indices for the row-wise epilogues ------------------------------------

constexpr int kMaxEntriesPerLaunch = 128;

struct FuserTable {
  int32_t fuser[kMaxEntriesPerLaunch];  // fuser of the launch's entry blockIdx.y
};

// One row of `width` values per (entry, token), rows entry-major in dense buffers:
//   z = in + bias[fuser]                           (fp32; a missing bias counts as 0)
//   out = T(z) (may be `in` itself),  norm_out[k] = T(rmsnorm(z) * norm_scale[k][fuser])
// The residual stream lives in the cache dtype, as the Triton backend's: the FFNs' second GEMM
// adds into it (beta = 1), so only a norm or a bias needs a pass of its own.
template <typename T>
struct RowEpilogueParams {
  const T* in;
  const T* bias;
  int64_t bias_fuser_stride;
  T* out;
  T* norm_out[2];
  const T* norm_scale[2];
  int64_t norm_fuser_stride[2];
  int32_t entry_begin;  // entry of blockIdx.y == 0 in the dense buffers
  int32_t tokens;
  int32_t width;
  FuserTable fusers;
};

// out[e, t, i] = f(in[e, t, i] + bias[fuser, i]) in fp32, f = identity, or, when `gate` is set,
// G * sigmoid(.) with the hard gate G = (gate[fuser] > 0) read on the device.
template <typename T>
struct BiasEpilogueParams {
  const T* in;  // dense [entries, tokens, width]
  const T* bias;
  int64_t bias_fuser_stride;
  const float* gate;
  int64_t gate_stride;
  float* out;
  int64_t out_entry_stride;
  int64_t out_row_stride;
  SlotList skip;       // when skip.data is set: a token whose slot is < 0 or >= skip_rows gets 0
  int64_t skip_rows;   // (project's rows of padding and skipped tokens are zero)
  int32_t entry_begin;
  int32_t tokens;
  int32_t width;
  FuserTable fusers;
};

// ---- head logits with the weight branch's W2h folded in (fuse.cu, "head fold") ----------------

// For one row (entry, token) of the dense u and g buffers (`width` = H values each):
//   a[h] = sum_i u[i] A[h, i] + sum_i g[i] A[h, H + i] + bias[h]   (fp32),
//   out[h] = G * sigmoid(a[h]), G = (gate[fuser] > 0) read on the device,
// A = [W_head, V] the fuser's fp32 [Ht, 2H] fold (V = W_head W2h). Replaces the W2h GEMM, the
// W_head GEMM and the bias/gate/sigmoid pass of the unfolded weight branch.
template <typename T>
struct HeadLogitsParams {
  const T* u;       // dense [entries, tokens, width]: the weight branch's residual input
  const T* g;       // dense [entries, tokens, width]: gelu(W1h head_norm(u))
  const float* fold;  // [P, heads, 2 * width] fp32, row-major
  const T* bias;
  int64_t bias_fuser_stride;
  const float* gate;
  int64_t gate_stride;
  float* out;
  int64_t out_entry_stride;
  int64_t out_row_stride;
  SlotList skip;       // as BiasEpilogueParams: project's rows of padding get 0
  int64_t skip_rows;
  int32_t entry_begin;
  int32_t tokens;
  int32_t width;
  int32_t heads;
  FuserTable fusers;
};

// ---- the gated merge: x[h] += sum_j scale_j[h] * (projection_j[h] + bias_j[h]) -------------

constexpr int kMergeMaxEntries = 24;
constexpr int kMergeMaxSources = 48;

// One sharer's correction for one receiver entry. P is float (c2c::merge) or the cache dtype
// (the projection GEMM output inside c2c::fuse, whose bias is added here instead).
template <typename T, typename P>
struct MergeSource {
  const P* projection;  // [tokens, heads*head_dim], unit column stride
  int64_t projection_row_stride;
  const float* head_scale;  // [tokens, heads], unit column stride
  int64_t head_scale_row_stride;
  const T* bias;  // [heads*head_dim] or null
};

template <typename T, typename P>
struct MergeParams {
  CacheView<T> views[kMergeMaxEntries];
  bool vectorized[kMergeMaxEntries];  // 16-byte accesses legal for the view and its sources
  MergeSource<T, P> sources[kMergeMaxSources];  // entry e's sharer j at e * sharers + j
  SlotList slots;
  int64_t rows;  // pool rows of every view (one geometry); a slot past it is skipped
  int32_t tokens;
  int32_t sharers;
  int32_t heads;
  int32_t head_dim;
};

static_assert(sizeof(GatherParams<float>) <= 4096, "gather parameters exceed 4 KiB");
static_assert(sizeof(RowEpilogueParams<float>) <= 4096, "row epilogue parameters exceed 4 KiB");
static_assert(sizeof(BiasEpilogueParams<float>) <= 4096, "bias epilogue parameters exceed 4 KiB");
static_assert(sizeof(MergeParams<float, float>) <= 4096, "merge parameters exceed 4 KiB");
static_assert(sizeof(HeadLogitsParams<float>) <= 4096, "head logits parameters exceed 4 KiB");

// ---- launchers (explicitly instantiated for float, __half and __nv_bfloat16) ---------------

// Elements one thread moves per access: 16 bytes of the cache dtype.
template <typename T>
constexpr int vector_width() {
  return 16 / static_cast<int>(sizeof(T));
}

template <typename T>
void launch_gather(const GatherParams<T>& params, int entries, cudaStream_t stream);

// `vectorized`: every row pointer (in, out, norm_out, bias and norm_scale rows) is 16-byte
// aligned and width a multiple of vector_width<T>(): one warp per row, 16-byte accesses.
template <typename T>
void launch_row_epilogue(const RowEpilogueParams<T>& params, int entries, bool vectorized, cudaStream_t stream);

template <typename T>
void launch_bias_epilogue(const BiasEpilogueParams<T>& params, int entries, cudaStream_t stream);

// In place: x = gelu(x) (exact erf form) over `count` elements of a 16-byte-aligned buffer.
template <typename T>
void launch_gelu(T* data, int64_t count, cudaStream_t stream);

// `vectorized`: u, g and the fold 16-byte aligned and width a multiple of vector_width<T>():
// the u and g rows are read once into registers with 16-byte loads; else element by element.
template <typename T>
void launch_head_logits(const HeadLogitsParams<T>& params, int entries, bool vectorized, cudaStream_t stream);

template <typename T, typename P>
void launch_merge(const MergeParams<T, P>& params, int entries, cudaStream_t stream);

}  // namespace c2c::cuda
