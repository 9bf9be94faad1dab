// torch.ops.c2c_native.merge on CUDA: the parallel-mode merge of S sharers' fp32 corrections
// (c2c::project outputs) into the receiver caches, one launch per group of entries.

#include "cuda/fuse_cuda.h"
#include "cuda/runtime.h"
#include "cuda/torch_params.h"

namespace c2c::cuda {
namespace {

template <typename T>
void merge_typed(const std::vector<at::Tensor>& receivers, const at::Tensor& receiver_slots,
                 const std::vector<at::Tensor>& projections, const std::vector<at::Tensor>& head_scales,
                 int64_t sharers, cudaStream_t stream) {
  constexpr int64_t V = vector_width<T>();
  const int64_t entries = static_cast<int64_t>(receivers.size());
  const int64_t tokens = receiver_slots.size(0), heads = receivers[0].size(2), head_dim = receivers[0].size(3);
  TORCH_CHECK(tokens * heads * ((head_dim + V - 1) / V) < (int64_t{1} << 31), "receiver_slots: ", tokens,
              " tokens are too many for one CUDA merge launch; split the call");
  // Entries are grouped so that a group's sources fit one parameter block.
  const int64_t group = std::min<int64_t>(kMergeMaxEntries, kMergeMaxSources / sharers);
  for_each_entry_group(entries, group, [&](int64_t begin, int64_t count) {
    MergeParams<T, float> p{};
    for (int64_t i = 0; i < count; ++i) {
      const at::Tensor& view = receivers[begin + i];
      bool vectorized = vectorizable<T>(view);
      for (int64_t j = 0; j < sharers; ++j) {
        const at::Tensor& y = projections[(begin + i) * sharers + j];
        const at::Tensor& a = head_scales[(begin + i) * sharers + j];
        MergeSource<T, float>& src = p.sources[i * sharers + j];
        src.projection = static_cast<const float*>(y.data_ptr());
        src.projection_row_stride = y.stride(0);
        src.head_scale = static_cast<const float*>(a.data_ptr());
        src.head_scale_row_stride = a.stride(0);
        src.bias = nullptr;
        vectorized = vectorized && aligned16(src.projection) && (tokens <= 1 || y.stride(0) % 4 == 0);
      }
      p.views[i] = cache_view<T>(view);
      p.vectorized[i] = vectorized;
    }
    p.slots = slot_list(receiver_slots, 0);
    p.rows = pool_rows(receivers[begin]);
    p.tokens = static_cast<int32_t>(tokens);
    p.sharers = static_cast<int32_t>(sharers);
    p.heads = static_cast<int32_t>(heads);
    p.head_dim = static_cast<int32_t>(head_dim);
    launch_merge(p, static_cast<int>(count), stream);
    C2C_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

void merge(const std::vector<at::Tensor>& receiver_caches, const at::Tensor& receiver_slots,
           const std::vector<at::Tensor>& projections, const std::vector<at::Tensor>& head_scales) {
  const int64_t entries = static_cast<int64_t>(receiver_caches.size());
  if (entries == 0 || receiver_slots.numel() == 0) return;
  const DeviceGuard guard(receiver_slots.device());
  const at::Tensor& first = receiver_caches[0];
  const at::Device device = first.device();
  TORCH_CHECK(device.type() == kKernelDevice, "receiver_caches[0]: expected a ", kKernelDevice, " tensor, got ", device);
  TORCH_CHECK(projections.size() % entries == 0 && head_scales.size() == projections.size() && !projections.empty(),
              "projections and head_scales: expected S * ", entries, " entries each (S sharers per receiver entry), got ",
              projections.size(), " and ", head_scales.size());
  const int64_t sharers = static_cast<int64_t>(projections.size()) / entries;
  TORCH_CHECK(sharers <= kMergeMaxSources, "projections: ", sharers, " sharers per entry, the CUDA merge sums at most ",
              kMergeMaxSources, " in one pass");
  for (int64_t i = 0; i < entries; ++i) {
    check_cache_view(receiver_caches[i], "receiver_caches", i, first.scalar_type(), device);
    TORCH_CHECK(receiver_caches[i].sizes() == first.sizes(), "receiver_caches[", i,
                "]: every entry must share one pool geometry");
  }
  check_slots(receiver_slots, "receiver_slots", device);
  const int64_t tokens = receiver_slots.size(0), heads = first.size(2), width = heads * first.size(3);
  // The kernels walk a projection row and a head-scale row with unit stride.
  std::vector<at::Tensor> y(projections.size()), a(head_scales.size());
  for (size_t k = 0; k < projections.size(); ++k) {
    TORCH_CHECK(projections[k].dim() == 2 && projections[k].size(0) == tokens && projections[k].size(1) == width &&
                    projections[k].scalar_type() == at::kFloat && projections[k].device() == device,
                "projections[", k, "]: expected float32 [", tokens, ", ", width, "] on ", device);
    TORCH_CHECK(head_scales[k].dim() == 2 && head_scales[k].size(0) == tokens && head_scales[k].size(1) == heads &&
                    head_scales[k].scalar_type() == at::kFloat && head_scales[k].device() == device,
                "head_scales[", k, "]: expected float32 [", tokens, ", ", heads, "] on ", device);
    y[k] = unit_inner_stride(projections[k]);
    a[k] = unit_inner_stride(head_scales[k]);
  }
  const cudaStream_t stream = current_stream();
  dispatch_cache_dtype(first.scalar_type(), "receiver_caches", [&](auto tag) {
    using T = typename decltype(tag)::type;
    merge_typed<T>(receiver_caches, receiver_slots, y, a, sharers, stream);
  });
}

}  // namespace c2c::cuda
