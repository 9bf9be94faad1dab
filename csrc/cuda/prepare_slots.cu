// torch.ops.c2c_native.prepare_slots: the slot rules of c2c_kernels/slots.py in one launch.
//
// From the user's slots (int32 or int64, any stride, 0 included) it writes the contiguous int64
// (receiver, sharer) slots that fuse / project / merge then run on, equal to slots.prepare():
//   - padding (receiver slot < 0) and tokens with an out-of-range slot get receiver -1 and
//     sharer 0, so the kernels after it skip them like padding;
//   - an out-of-range slot is recorded in the status buffer (c2c_kernels/status.py):
//     [flag, argument, index, value, limit, ...], flag set 0 -> 1 by compare-and-swap, and only
//     the thread that set it writes the rest; the host learns of it later (no sync here);
//   - with `dedupe` (fuse, merge) a token is dropped when a later valid token has the same
//     receiver slot: the last one writes, and the row it reads is the one the call began with.
// Current stream, no host sync, outputs from the caching allocator: graph-capturable once the
// status buffer exists.
#include <climits>
#include <optional>
#include <tuple>

#include "cuda/common.cuh"
#include "cuda/fuse_cuda.h"
#include "cuda/runtime.h"
#include "cuda/torch_params.h"
#include "cuda/workspace.h"

namespace c2c::cuda {
namespace {

// Argument codes of the status buffer (c2c_kernels/status.py).
constexpr int64_t kReceiverSlotsArgument = 1;
constexpr int64_t kSharerSlotsArgument = 2;

// Tokens per block, which is also the tile of later tokens a block compares at once. Small
// blocks spread the quadratic duplicate scan over more SMs.
constexpr int kPrepareThreads = 128;

struct PrepareSlotsParams {
  SlotList receiver;
  SlotList sharer;  // data null: no sharer (merge); every sharer slot counts as valid
  int64_t receiver_rows;
  int64_t sharer_rows;
  int64_t* out_receiver;
  int64_t* out_sharer;
  int64_t* status;  // int64 [8], see the head of this file
  int32_t tokens;
  bool dedupe;
};

// 0 when token t is padding or in range, else the argument code of its offending slot.
__device__ __forceinline__ int64_t slot_error(const PrepareSlotsParams& p, int64_t r, int64_t s) {
  if (r < 0) return 0;
  if (r >= p.receiver_rows) return kReceiverSlotsArgument;
  if (p.sharer.data != nullptr && (s < 0 || s >= p.sharer_rows)) return kSharerSlotsArgument;
  return 0;
}

// Receiver slot of token k if it is written (not padding, no error), else -1.
__device__ __forceinline__ int64_t valid_receiver(const PrepareSlotsParams& p, int64_t k) {
  const int64_t r = load_slot(p.receiver, k);
  const int64_t s = p.sharer.data != nullptr ? load_slot(p.sharer, k) : 0;
  return r >= 0 && slot_error(p, r, s) == 0 ? r : -1;
}

// grid: ceil(tokens / kPrepareThreads) blocks of kPrepareThreads, one token per thread. Every
// thread of a block reaches every barrier (threads past the last token included).
//
// Cost of the duplicate scan: each token compares its slot with every later token's, through
// shared-memory tiles: T^2 / 2 compares, 1.3e8 at 16384 tokens (about 128 blocks of ~8k
// iterations of a load-compare-or; tens of microseconds), about 10^5 at a 512-token decode
// batch, where one launch's fixed cost dominates.
__global__ void __launch_bounds__(kPrepareThreads) prepare_slots_kernel(const __grid_constant__ PrepareSlotsParams p) {
  __shared__ int64_t later[kPrepareThreads];
  __shared__ int first_error;
  const int64_t block_first = static_cast<int64_t>(blockIdx.x) * blockDim.x;
  const int64_t t = block_first + threadIdx.x;
  const bool in_grid = t < p.tokens;
  int64_t r = -1, s = 0, error = 0;
  if (in_grid) {
    r = load_slot(p.receiver, t);
    s = p.sharer.data != nullptr ? load_slot(p.sharer, t) : 0;
    error = slot_error(p, r, s);
  }
  const bool valid = in_grid && r >= 0 && error == 0;

  // The block's lowest offending token tries to record itself, so a launch within one block
  // records the first error in token order, as the CPU backends raise it.
  if (threadIdx.x == 0) first_error = INT_MAX;
  __syncthreads();
  if (error != 0) atomicMin(&first_error, static_cast<int>(t));
  __syncthreads();
  if (error != 0 && first_error == t) {
    auto* flag = reinterpret_cast<unsigned long long*>(p.status);
    if (atomicCAS(flag, 0ull, 1ull) == 0ull) {
      const bool receiver = error == kReceiverSlotsArgument;
      p.status[1] = error;
      p.status[2] = t;
      p.status[3] = receiver ? r : s;
      p.status[4] = receiver ? p.receiver_rows : p.sharer_rows;
    }
  }

  bool dropped = false;
  if (p.dedupe) {
    for (int64_t base = block_first; base < p.tokens; base += blockDim.x) {
      const int64_t k = base + threadIdx.x;
      __syncthreads();  // the previous tile has been read by every thread
      later[threadIdx.x] = k == t ? (valid ? r : -1) : (k < p.tokens ? valid_receiver(p, k) : -1);
      __syncthreads();
      if (valid && !dropped) {
        const int count = static_cast<int>(min(static_cast<int64_t>(blockDim.x), p.tokens - base));
        // Within the thread's own tile only the tokens after it count.
        for (int j = base == block_first ? static_cast<int>(threadIdx.x) + 1 : 0; j < count; ++j) {
          dropped = dropped || later[j] == r;
        }
      }
    }
  }
  if (in_grid) {
    const bool keep = valid && !dropped;
    p.out_receiver[t] = keep ? r : -1;
    p.out_sharer[t] = keep ? s : 0;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> prepare_slots(const at::Tensor& receiver_slots,
                                                 const std::optional<at::Tensor>& sharer_slots, int64_t receiver_rows,
                                                 int64_t sharer_rows, bool dedupe, const at::Tensor& status) {
  const at::Device device = receiver_slots.device();
  TORCH_CHECK(device.type() == kKernelDevice, "receiver_slots: expected a ", kKernelDevice, " tensor, got ", device);
  const DeviceGuard guard(device);
  check_slots(receiver_slots, "receiver_slots", device);
  if (sharer_slots.has_value()) {
    check_slots(*sharer_slots, "sharer_slots", device);
    TORCH_CHECK(sharer_slots->size(0) == receiver_slots.size(0), "sharer_slots: ", sharer_slots->size(0),
                " slots, expected one per receiver slot (", receiver_slots.size(0), ")");
  }
  TORCH_CHECK(receiver_rows >= 0 && sharer_rows >= 0, "prepare_slots: pool row counts must be >= 0, got ",
              receiver_rows, " and ", sharer_rows);
  TORCH_CHECK(status.scalar_type() == at::kLong && status.dim() == 1 && status.numel() >= 5 &&
                  status.is_contiguous() && status.device() == device,
              "status: expected the contiguous int64 [8] status buffer on ", device, ", got ", status.scalar_type(),
              " ", status.sizes(), " on ", status.device());
  const int64_t tokens = receiver_slots.size(0);
  TORCH_CHECK(tokens < INT_MAX, "receiver_slots: ", tokens, " tokens, above the CUDA backend's limit of 2^31 - 1");
  const auto options = receiver_slots.options().dtype(at::kLong);
  at::Tensor receiver = workspace_empty({tokens}, options);
  at::Tensor sharer = workspace_empty({tokens}, options);
  if (tokens == 0) return {receiver, sharer};
  PrepareSlotsParams p{};
  p.receiver = slot_list(receiver_slots, 0);
  p.sharer = sharer_slots.has_value() ? slot_list(*sharer_slots, 0) : SlotList{nullptr, 0, true};
  p.receiver_rows = receiver_rows;
  p.sharer_rows = sharer_rows;
  p.out_receiver = receiver.data_ptr<int64_t>();
  p.out_sharer = sharer.data_ptr<int64_t>();
  p.status = status.data_ptr<int64_t>();
  p.tokens = static_cast<int32_t>(tokens);
  p.dedupe = dedupe;
  const unsigned blocks = static_cast<unsigned>((tokens + kPrepareThreads - 1) / kPrepareThreads);
  C2C_LAUNCH(blocks, kPrepareThreads, current_stream(), prepare_slots_kernel)(p);
  C2C_KERNEL_LAUNCH_CHECK();
  return {receiver, sharer};
}

}  // namespace c2c::cuda
