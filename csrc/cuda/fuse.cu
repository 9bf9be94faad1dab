// Orchestration of the CUDA backend: torch.ops.c2c_native.fuse / project / merge on CUDA.
//
// A call's tokens go through the fuser in chunks (a bounded workspace), every stage batched
// over all entries of the call:
//   gather sharer and receiver rows side by side -> [R, n, Ks + Kt]       (gather_norm.cu)
//   u = [S; X] W_in^T (one GEMM), u += b_in, norm_a = RMSNorm_0(u)        (batched_linear.cu + row epilogue)
//   FFN_1; then the weight branch and the projection branch (n - 2 FFN blocks, W_out), each
//   FFN = GEMM, GELU, GEMM adding into the residual stream (beta = 1), and a row epilogue only
//   where a norm follows. The weight branch's second GEMM is folded into the head weights
//   (V = W_head W2h, "head fold" below): W1h GEMM, GELU, then one warp-per-row kernel for the
//   logits from [u; g] against [W_head; V], bias, gate and sigmoid; weights it cannot fold run
//   it unfolded (W1h, GELU, W2h into w = u, W_head, the bias/gate/sigmoid pass)
//   merge into the cache (fuse) or write the fp32 projection (project)  (merge.cu)
// The residual stream and every activation are stored in the cache dtype (fp32 inside each
// kernel), as in the Triton backend. docs/cuda.md counts the bytes and launches per stage.
// All launches go to the current stream; nothing waits for the device or copies host data to
// it, so a call can be captured in a CUDA graph. The hard gate is read by the kernels.

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "cuda/batched_linear.h"
#include "cuda/call.h"
#include "cuda/fuse_cuda.h"
#include "cuda/runtime.h"
#include "cuda/torch_params.h"
#include "cuda/workspace.h"

namespace c2c::cuda {
namespace {

// Activations of one token chunk stay under this many bytes, unless the environment variable
// C2C_CUDA_WORKSPACE_BYTES says otherwise: the smaller of kWorkspaceCap and 1/16 of the
// device's memory. Each chunk re-reads every weight, so chunks should be few: the first
// benchmark workload (48 entries, about 0.5 MB of activations per token, docs/cuda.md) runs
// 16384 tokens in 2 chunks on a GPU of 80 GB or more. Whatever the budget, a call is split
// into no more chunks than kMinChunkTokens-token ones would make (smaller batched GEMMs lose
// their efficiency).
constexpr int64_t kWorkspaceCap = int64_t{6} << 30;
constexpr int64_t kMinChunkTokens = 256;

int64_t workspace_budget(int64_t device_memory) {
  const char* value = std::getenv("C2C_CUDA_WORKSPACE_BYTES");
  const long long parsed = value != nullptr ? std::strtoll(value, nullptr, 10) : 0;
  if (parsed > 0) return parsed;
  return device_memory > 0 ? std::min(kWorkspaceCap, device_memory / 16) : kWorkspaceCap;
}

// Where a chunk's results go: merged into the receiver caches, or written to project's outputs.
struct Sink {
  bool merge;
  at::Tensor projection;  // [R, T, Kt] fp32 (project only)
  at::Tensor head_scale;  // [R, T, Ht] fp32 (project only)
};

// Dense activation buffers of one token chunk, [R, n, width] each, all in the cache dtype but
// head_scale. `rows` holds the [S; X] input rows, then (the input consumed) the unfolded
// weight branch's w, then the W_out output; `u` is the residual stream. With the head fold
// there is no w and no 16-bit logits buffer: the head-logits kernel writes head_scale.
struct Workspace {
  at::Tensor rows, u, norm_a, norm_b, inner, logits, head_scale;

  static int64_t rows_width(const Call& c, bool folded) {
    const int64_t input = c.sharer_heads * c.sharer_head_dim + c.heads * c.head_dim;
    return folded ? input : std::max(input, c.hidden);
  }

  static int64_t bytes_per_row(const Call& c, int64_t element, bool folded) {
    return bytes_per_row(c.sharer_heads * c.sharer_head_dim, c.heads * c.head_dim, c.hidden, c.inner, c.heads,
                         element, folded);
  }

  static int64_t bytes_per_row(int64_t sharer_width, int64_t receiver_width, int64_t hidden, int64_t inner,
                               int64_t heads, int64_t element, bool folded) {
    const int64_t input = sharer_width + receiver_width;  // >= receiver_width: W_out's output fits
    if (folded) return element * (input + 3 * hidden + std::max(inner, hidden)) + 4 * heads;
    return element * (std::max(input, hidden) + 3 * hidden + std::max(inner, hidden) + heads) + 4 * heads;
  }

  Workspace(const Call& c, int64_t tokens, const at::TensorOptions& options, bool folded) {
    const int64_t r = c.entries;
    rows = workspace_empty({r * tokens * rows_width(c, folded)}, options);
    u = workspace_empty({r * tokens * c.hidden}, options);
    norm_a = workspace_empty({r * tokens * c.hidden}, options);
    norm_b = workspace_empty({r * tokens * c.hidden}, options);
    inner = workspace_empty({r * tokens * std::max(c.inner, c.hidden)}, options);
    if (!folded) logits = workspace_empty({r * tokens * c.heads}, options);
    head_scale = workspace_empty({r * tokens * c.heads}, options.dtype(at::kFloat));
  }
};

// The first `tokens` rows' worth of a flat buffer as a dense [R, tokens, width] tensor.
at::Tensor dense(const at::Tensor& flat, int64_t entries, int64_t tokens, int64_t width) {
  return flat.narrow(0, 0, entries * tokens * width).view({entries, tokens, width});
}

template <typename T>
const T* ptr(const at::Tensor& t) {
  return static_cast<const T*>(t.data_ptr());
}
template <typename T>
T* mutable_ptr(const at::Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

FuserTable fuser_table(const Call& c, int64_t begin, int64_t count) {
  FuserTable table{};
  for (int64_t i = 0; i < count; ++i) table.fuser[i] = static_cast<int32_t>(c.fusers[begin + i]);
  return table;
}

// ---- W_in as one [P, H, Ks + Kt] matrix ---------------------------------------------------
//
// The input GEMM over [S; X] needs W_in's two halves (fuser_weights.h stores them as two
// stacks) side by side. When the stacks already are column slices of one tensor that is a
// view; otherwise the concatenation is made once per weight stack and kept while both halves
// are alive and unmodified: same storage (held weakly, so a freed stack's address cannot be
// mistaken for it), data pointer, shape, strides and version counter (every in-place update
// through autograd-visible tensors bumps it). Without a usable copy (inference tensors carry
// no version counter; no allocation during a CUDA graph capture) the GEMM runs as two, over
// the column slices of the same [S; X] rows.

struct HalfKey {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  const void* data = nullptr;
  std::vector<int64_t> sizes, strides;
  int64_t version = -1;

  static bool trackable(const at::Tensor& t) { return !t.is_inference(); }

  explicit HalfKey(const at::Tensor& t)
      : storage(t.storage().getWeakStorageImpl()),
        data(t.data_ptr()),
        sizes(t.sizes().vec()),
        strides(t.strides().vec()),
        version(t._version()) {}

  bool matches(const at::Tensor& t) const {
    const c10::intrusive_ptr<c10::StorageImpl> alive = storage.lock();
    return alive && alive.get() == t.storage().unsafeGetStorageImpl() && data == t.data_ptr() &&
           t.sizes().equals(sizes) && t.strides().equals(strides) && version == t._version();
  }
};

// A tensor derived from two weight stacks (W_in's concatenation, the head fold below), kept
// while both are alive and unmodified.
struct DerivedEntry {
  HalfKey first, second;
  at::Tensor value;
};

// At most this many pairs of weight stacks keep a derived tensor (the oldest is dropped first).
constexpr size_t kDerivedCacheEntries = 4;

// One cache per derived tensor, never destroyed: its tensors must not be freed after the
// allocator at exit.
struct DerivedCache {
  std::mutex mutex;
  std::vector<DerivedEntry> entries;
  // Tensors a CUDA graph captured: the graph replays their addresses, so they stay allocated
  // for the process even after their entry goes (weights updated in place, freed, or the entry
  // evicted by other weights). A graph captured before an in-place update replays the old
  // fold: capture again after updating weights (docs/cuda.md).
  std::vector<at::Tensor> captured;

  static DerivedCache& concatenated_input() {
    static DerivedCache* cache = new DerivedCache();
    return *cache;
  }

  static DerivedCache& head_fold() {
    static DerivedCache* cache = new DerivedCache();
    return *cache;
  }

  // Drops the entries of freed weight stacks.
  void prune() {
    entries.erase(std::remove_if(entries.begin(), entries.end(),
                                 [](const DerivedEntry& e) { return e.first.storage.expired() || e.second.storage.expired(); }),
                  entries.end());
  }

  // Live entries (freed ones dropped first).
  int64_t size() {
    const std::lock_guard<std::mutex> lock(mutex);
    prune();
    return static_cast<int64_t>(entries.size());
  }

  // The tensor derived from (a, b): the cached one, or make() kept for the next calls; undefined
  // when it cannot be kept (inference tensors, or a new one needed while `stream` is captured).
  template <typename Make>
  at::Tensor get(const at::Tensor& a, const at::Tensor& b, cudaStream_t stream, Make make) {
    if (!HalfKey::trackable(a) || !HalfKey::trackable(b)) return {};
    const std::lock_guard<std::mutex> lock(mutex);
    prune();
    const bool capturing = stream_capturing(stream);
    for (const DerivedEntry& e : entries) {
      if (!e.first.matches(a) || !e.second.matches(b)) continue;
      const bool kept = std::any_of(captured.begin(), captured.end(),
                                    [&](const at::Tensor& t) { return t.is_same(e.value); });
      if (capturing && !kept) captured.push_back(e.value);
      return e.value;
    }
    if (capturing) return {};
    // An outdated tensor of the same stacks goes (an update in place made it stale).
    const auto same_stacks = [&](const DerivedEntry& e) {
      return e.first.storage.lock().get() == a.storage().unsafeGetStorageImpl() ||
             e.second.storage.lock().get() == b.storage().unsafeGetStorageImpl();
    };
    entries.erase(std::remove_if(entries.begin(), entries.end(), same_stacks), entries.end());
    if (entries.size() >= kDerivedCacheEntries) entries.erase(entries.begin());
    // Made on the current stream, as the rest of the call; no autograd history (it would hold
    // the stacks alive).
    const at::NoGradGuard no_grad;
    at::Tensor value = make();
    entries.push_back(DerivedEntry{HalfKey(a), HalfKey(b), value});
    return value;
  }
};

at::Tensor concatenated_input_weight(const Call& c, cudaStream_t stream) {
  const at::Tensor& ws = c.w[kWInSharer];
  const at::Tensor& wr = c.w[kWInReceiver];
  const int64_t ks = ws.size(2), kt = wr.size(2);
  // Already one tensor: the receiver half starts Ks columns after the sharer half, rows alike.
  const bool one_tensor = ws.size(0) == wr.size(0) && ws.size(1) == wr.size(1) && ws.stride(0) == wr.stride(0) &&
                          ws.stride(1) == wr.stride(1) && ws.stride(2) == 1 && wr.stride(2) == 1 &&
                          ws.storage().is_alias_of(wr.storage()) &&
                          static_cast<const char*>(wr.data_ptr()) ==
                              static_cast<const char*>(ws.data_ptr()) + ks * ws.element_size();
  if (one_tensor) return ws.as_strided({ws.size(0), ws.size(1), ks + kt}, ws.strides(), ws.storage_offset());
  return DerivedCache::concatenated_input().get(ws, wr, stream, [&] { return at::cat({ws, wr}, 2); });
}

// ---- head fold: the weight branch's W2h GEMM folded into the head weights -------------------
//
// The weight branch's w = u + W2h g (g = gelu(W1h head_norm(u))) is only used through the
// head logits a = W_head w + b_head, so a = W_head u + V g + b_head with V = W_head W2h, an
// [Ht, H] matrix per fuser: the [T, H] x [H, H] W2h GEMM (about 12% of the fuser's FLOPs), the
// w = u copy and the W_head GEMM give way to one row kernel (launch_head_logits). The fold is
// [W_head, V] as one fp32 [P, Ht, 2H] tensor (rows the kernel reads with 16-byte loads), V
// accumulated in fp64 from the stored weights (no TF32, whatever torch's setting) and kept in
// fp32: rounding it to 16 bits would cost accuracy, and it is small (64 KiB per fuser at
// Ht = 8, H = 1024). Cached as W_in's concatenation is; weights it cannot be kept for run the
// branch unfolded, and so does every call with C2C_CUDA_HEAD_FOLD=0 (read per call).

bool head_fold_enabled() {
  const char* value = std::getenv("C2C_CUDA_HEAD_FOLD");
  return value == nullptr || std::strcmp(value, "0") != 0;
}

at::Tensor head_fold(const Call& c, cudaStream_t stream) {
  if (!head_fold_enabled()) return {};
  const at::Tensor& w_head = c.w[kWHead];  // [P, Ht, H]
  const at::Tensor& w2 = c.w[kHeadW2];     // [P, H, H] (out, in)
  return DerivedCache::head_fold().get(w_head, w2, stream, [&] {
    const int64_t fusers = w_head.size(0), heads = w_head.size(1), hidden = w_head.size(2);
    at::Tensor fold = at::empty({fusers, heads, 2 * hidden}, w_head.options().dtype(at::kFloat));
    fold.narrow(2, 0, hidden).copy_(w_head);
    for (int64_t f = 0; f < fusers; ++f) {  // one fuser at a time: an [H, H] fp64 temporary
      fold[f].narrow(1, hidden, hidden).copy_(at::mm(w_head[f].to(at::kDouble), w2[f].to(at::kDouble)));
    }
    return fold;
  });
}

// Checks that a launch's flat thread index (32-bit in the kernels) cannot overflow.
void check_index_range(int64_t work, const char* what) {
  TORCH_CHECK(work < (int64_t{1} << 31), "c2c: ", what, " covers ", work,
              " elements in one launch, above the CUDA backend's limit of 2^31; split the call");
}

template <typename T>
class Pipeline {
 public:
  Pipeline(const Call& c, const at::Tensor& input_weight, const at::Tensor& fold, cudaStream_t stream)
      : c_(c), input_weight_(input_weight), fold_(fold), stream_(stream) {}

  // One token chunk through the stages, named as the Triton stage files
  // (c2c_kernels/backends/triton) and the CPU backend's FuserRun (csrc/cpu/fuser.cpp).
  void run_chunk(int64_t first, int64_t tokens, const Workspace& ws, const Sink& sink) {
    n_ = tokens;
    const Chunk x = chunk(ws);
    const int64_t ks = c_.sharer_heads * c_.sharer_head_dim;
    gather(c_.sharers, c_.sharer_slots, first, x.rows, 0, c_.sharer_heads, c_.sharer_head_dim);
    gather(c_.receivers, c_.receiver_slots, first, x.rows, ks, c_.heads, c_.head_dim);
    input_gemm(x);                          // triton: input_gemm.py
    ffn_1(x, ws);                           // ffn_up.py, ffn_down.py
    weight_branch(first, x, ws, sink);      // ffn_up.py, ffn_down.py (head logits)
    projection_blocks(x, ws);               // ffn_up.py, ffn_down.py
    output(first, x, ws.head_scale, sink);  // output_gemm.py
  }

 private:
  // The workspace's buffers as dense [R, n, width] tensors for this chunk.
  struct Chunk {
    at::Tensor rows, w, projection, u, norm_a, norm_b, logits;
  };

  Chunk chunk(const Workspace& ws) const {
    const int64_t h = c_.hidden;
    const int64_t k = c_.sharer_heads * c_.sharer_head_dim + c_.heads * c_.head_dim;
    const int64_t kt = c_.heads * c_.head_dim;
    // w and the 16-bit logits exist only unfolded (the folded workspace has no room for w).
    const bool folded = fold_.defined();
    return Chunk{dense(ws.rows, c_.entries, n_, k),
                 folded ? at::Tensor() : dense(ws.rows, c_.entries, n_, h),
                 dense(ws.rows, c_.entries, n_, kt),
                 dense(ws.u, c_.entries, n_, h),
                 dense(ws.norm_a, c_.entries, n_, h),
                 dense(ws.norm_b, c_.entries, n_, h),
                 folded ? at::Tensor() : dense(ws.logits, c_.entries, n_, c_.heads)};
  }

  // u = [S; X] W_in^T, one GEMM (K = Ks + Kt) when W_in is one matrix, else two over the
  // column slices of the same rows; then u += b_in in place, norm_a = RMSNorm_0(u).
  void input_gemm(const Chunk& x) {
    if (input_weight_.defined()) {
      batched_linear(x.u, x.rows, input_weight_, c_.runs, false);
    } else {
      const int64_t ks = c_.sharer_heads * c_.sharer_head_dim, kt = c_.heads * c_.head_dim;
      batched_linear(x.u, x.rows.narrow(2, 0, ks), c_.w[kWInSharer], c_.runs, false);
      batched_linear(x.u, x.rows.narrow(2, ks, kt), c_.w[kWInReceiver], c_.runs, true);
    }
    RowEpilogueParams<T> in{};
    in.in = ptr<T>(x.u);
    in.bias = ptr<T>(c_.w[kBIn]);
    in.bias_fuser_stride = c_.w[kBIn].stride(0);
    in.out = mutable_ptr<T>(x.u);
    set_norm(in, 0, x.norm_a, c_.w[kFfnNorm], 0);
    row_epilogue(in);
  }

  // FFN_1 adds into u; then u feeds both branches: norm_a = head_norm(u), norm_b =
  // ffn_norm_1(u), and, unfolded, w = u, the weight branch's own residual (the projection
  // branch keeps u; the folded head logits read u itself).
  void ffn_1(const Chunk& x, const Workspace& ws) {
    ffn(x.norm_a, c_.w[kFfnW1].select(1, 0), c_.w[kFfnW2].select(1, 0), ws, x.u);
    RowEpilogueParams<T> split{};
    split.in = ptr<T>(x.u);
    split.out = fold_.defined() ? nullptr : mutable_ptr<T>(x.w);
    set_norm(split, 0, x.norm_a, c_.w[kHeadNorm], -1);
    set_norm(split, 1, x.norm_b, c_.w[kFfnNorm], 1);
    row_epilogue(split);
  }

  // Weight branch: w = u + FFN_w(u), head_scale = G * sigmoid(W_head w + b_head): into the
  // workspace (fuse) or project's output. Folded: g = gelu(W1h norm_a), then the logits from
  // [u; g] against [W_head, V] with bias, gate and sigmoid in one row kernel.
  void weight_branch(int64_t first, const Chunk& x, const Workspace& ws, const Sink& sink) {
    if (fold_.defined()) return folded_weight_branch(first, x, ws, sink);
    ffn(x.norm_a, c_.w[kHeadW1], c_.w[kHeadW2], ws, x.w);
    batched_linear(x.logits, x.w, c_.w[kWHead], c_.runs, false);
    BiasEpilogueParams<T> scale{};
    scale.in = ptr<T>(x.logits);
    scale.bias = ptr<T>(c_.w[kBHead]);
    scale.bias_fuser_stride = c_.w[kBHead].stride(0);
    set_head_scale(scale, first, ws, sink);
    bias_epilogue(scale, c_.heads);
  }

  void folded_weight_branch(int64_t first, const Chunk& x, const Workspace& ws, const Sink& sink) {
    const at::Tensor g = dense(ws.inner, c_.entries, n_, c_.hidden);
    batched_linear(g, x.norm_a, c_.w[kHeadW1], c_.runs, false);
    launch_gelu(mutable_ptr<T>(g), g.numel(), stream_);
    C2C_KERNEL_LAUNCH_CHECK();
    HeadLogitsParams<T> p{};
    p.u = ptr<T>(x.u);
    p.g = ptr<T>(g);
    p.fold = ptr<float>(fold_);
    p.bias = ptr<T>(c_.w[kBHead]);
    p.bias_fuser_stride = c_.w[kBHead].stride(0);
    set_head_scale(p, first, ws, sink);
    p.tokens = static_cast<int32_t>(n_);
    p.width = static_cast<int32_t>(c_.hidden);
    p.heads = static_cast<int32_t>(c_.heads);
    // The dense u and g rows are `hidden` wide: whole aligned vectors when hidden is a multiple
    // of V (the fold's rows, 2 * hidden fp32 values, then too).
    constexpr int64_t V = vector_width<T>();
    const bool vectorized = c_.hidden % V == 0 && aligned16(p.u) && aligned16(p.g) && aligned16(p.fold);
    for_each_entry_group(c_.entries, kMaxEntriesPerLaunch, [&](int64_t begin, int64_t count) {
      p.entry_begin = static_cast<int32_t>(begin);
      p.fusers = fuser_table(c_, begin, count);
      launch_head_logits(p, static_cast<int>(count), vectorized, stream_);
      C2C_KERNEL_LAUNCH_CHECK();
    });
  }

  // Projection branch: p = u, then blocks 1 .. B-1 add into u; a block's norm for the next
  // one is the only row pass left (none after the last: u is W_out's input as it stands).
  void projection_blocks(const Chunk& x, const Workspace& ws) {
    for (int64_t b = 1; b < c_.blocks; ++b) {
      ffn(x.norm_b, c_.w[kFfnW1].select(1, b), c_.w[kFfnW2].select(1, b), ws, x.u);
      if (b + 1 < c_.blocks) {
        RowEpilogueParams<T> block{};
        block.in = ptr<T>(x.u);
        set_norm(block, 0, x.norm_b, c_.w[kFfnNorm], b + 1);
        row_epilogue(block);
      }
    }
  }

  // y = W_out p; merged into the cache (fuse) or written with b_out as fp32 (project).
  void output(int64_t first, const Chunk& x, const at::Tensor& head_scale, const Sink& sink) {
    const int64_t kt = c_.heads * c_.head_dim;
    // The input rows and w (unfolded) are consumed: the projection reuses their buffer.
    const at::Tensor& projection = x.projection;
    batched_linear(projection, x.u, c_.w[kWOut], c_.runs, false);
    if (sink.merge) {
      merge_projection(first, projection, head_scale);
      return;
    }
    BiasEpilogueParams<T> out{};
    out.in = ptr<T>(projection);
    out.bias = ptr<T>(c_.w[kBOut]);
    out.bias_fuser_stride = c_.w[kBOut].stride(0);
    out.out = mutable_ptr<float>(sink.projection) + first * kt;
    out.out_entry_stride = c_.tokens * kt;
    out.out_row_stride = kt;
    out.skip = slot_list(c_.receiver_slots, first);  // project's padding rows get 0
    out.skip_rows = pool_rows(c_.receivers[0]);
    bias_epilogue(out, kt);
  }

  // Rows of `views` into columns [column, column + heads * head_dim) of the dense `out` rows.
  void gather(const std::vector<at::Tensor>& views, const at::Tensor& slots, int64_t first, const at::Tensor& out,
              int64_t column, int64_t heads, int64_t head_dim) {
    constexpr int64_t V = vector_width<T>();
    check_index_range(n_ * heads * head_dim, "a gather");
    const int64_t row_stride = out.size(2);
    for_each_entry_group(c_.entries, kGatherMaxEntries, [&](int64_t begin, int64_t count) {
      GatherParams<T> p{};
      p.out = mutable_ptr<T>(out) + begin * n_ * row_stride + column;
      p.out_entry_stride = n_ * row_stride;
      p.out_row_stride = row_stride;
      const bool out_vectorizable = aligned16(p.out) && row_stride % V == 0;
      for (int64_t i = 0; i < count; ++i) {
        p.views[i] = cache_view<T>(views[begin + i]);
        p.vectorized[i] = vectorizable<T>(views[begin + i]) && out_vectorizable;
      }
      p.slots = slot_list(slots, first);
      p.receiver_slots = slot_list(c_.receiver_slots, first);
      p.rows = pool_rows(views[begin]);
      p.tokens = static_cast<int32_t>(n_);
      p.heads = static_cast<int32_t>(heads);
      p.head_dim = static_cast<int32_t>(head_dim);
      launch_gather(p, static_cast<int>(count), stream_);
      C2C_KERNEL_LAUNCH_CHECK();
    });
  }

  // project's rows of padding (and of slots outside the pool) are zero, as the reference's.
  // Where G sigmoid(a) goes (BiasEpilogueParams or HeadLogitsParams): the workspace's
  // head_scale for the merge, or project's output, whose padding rows get 0.
  template <typename P>
  void set_head_scale(P& p, int64_t first, const Workspace& ws, const Sink& sink) {
    p.gate = ptr<float>(c_.w[kGateLogit]);
    p.gate_stride = c_.w[kGateLogit].stride(0);
    if (sink.merge) {
      p.out = mutable_ptr<float>(ws.head_scale);
      p.out_entry_stride = n_ * c_.heads;
    } else {
      p.out = mutable_ptr<float>(sink.head_scale) + first * c_.heads;
      p.out_entry_stride = c_.tokens * c_.heads;
      p.skip = slot_list(c_.receiver_slots, first);
      p.skip_rows = pool_rows(c_.receivers[0]);
    }
    p.out_row_stride = c_.heads;
  }

  // norm_out[k] = RMSNorm(z) * scale, scale = weights[fuser] (block < 0) or weights[fuser, block].
  void set_norm(RowEpilogueParams<T>& p, int k, const at::Tensor& out, const at::Tensor& scales, int64_t block) {
    p.norm_out[k] = mutable_ptr<T>(out);
    p.norm_scale[k] = ptr<T>(scales) + (block < 0 ? 0 : block * scales.stride(1));
    p.norm_fuser_stride[k] = scales.stride(0);
  }

  // 16-byte row accesses are legal for p: every row pointer aligned, every per-fuser stride a
  // whole number of vectors (the dense buffers' rows are `hidden` wide).
  static bool row_vectorizable(const RowEpilogueParams<T>& p, int64_t width) {
    constexpr int64_t V = vector_width<T>();
    bool ok = width % V == 0 && aligned16(p.in) && aligned16(p.out);
    if (p.bias != nullptr) ok = ok && aligned16(p.bias) && p.bias_fuser_stride % V == 0;
    for (int k = 0; k < 2; ++k) {
      if (p.norm_out[k] == nullptr) continue;
      ok = ok && aligned16(p.norm_out[k]) && aligned16(p.norm_scale[k]) && p.norm_fuser_stride[k] % V == 0;
    }
    return ok;
  }

  void row_epilogue(RowEpilogueParams<T> p) {
    p.tokens = static_cast<int32_t>(n_);
    p.width = static_cast<int32_t>(c_.hidden);
    const bool vectorized = row_vectorizable(p, c_.hidden);
    for_each_entry_group(c_.entries, kMaxEntriesPerLaunch, [&](int64_t begin, int64_t count) {
      p.entry_begin = static_cast<int32_t>(begin);
      p.fusers = fuser_table(c_, begin, count);
      launch_row_epilogue(p, static_cast<int>(count), vectorized, stream_);
      C2C_KERNEL_LAUNCH_CHECK();
    });
  }

  void bias_epilogue(BiasEpilogueParams<T> p, int64_t width) {
    check_index_range(n_ * width, "a bias epilogue");
    p.tokens = static_cast<int32_t>(n_);
    p.width = static_cast<int32_t>(width);
    for_each_entry_group(c_.entries, kMaxEntriesPerLaunch, [&](int64_t begin, int64_t count) {
      p.entry_begin = static_cast<int32_t>(begin);
      p.fusers = fuser_table(c_, begin, count);
      launch_bias_epilogue(p, static_cast<int>(count), stream_);
      C2C_KERNEL_LAUNCH_CHECK();
    });
  }

  // residual += W2 gelu(W1 x) for every entry, the second GEMM accumulating in place (beta =
  // 1: one rounding of the sum); w1 [P, I, H], w2 [P, H, I].
  void ffn(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, const Workspace& ws,
           const at::Tensor& residual) {
    const at::Tensor inner = dense(ws.inner, c_.entries, n_, w1.size(1));
    batched_linear(inner, x, w1, c_.runs, false);
    launch_gelu(mutable_ptr<T>(inner), inner.numel(), stream_);
    C2C_KERNEL_LAUNCH_CHECK();
    batched_linear(residual, inner, w2, c_.runs, true);
  }

  // x += head_scale * (projection + b_out) at the receiver slots of this chunk.
  void merge_projection(int64_t first, const at::Tensor& projection, const at::Tensor& head_scale) {
    constexpr int64_t V = vector_width<T>();
    const int64_t kt = c_.heads * c_.head_dim;
    check_index_range(n_ * c_.heads * ((c_.head_dim + V - 1) / V), "a merge");
    const at::Tensor& b_out = c_.w[kBOut];
    for_each_entry_group(c_.entries, kMergeMaxEntries, [&](int64_t begin, int64_t count) {
      MergeParams<T, T> p{};
      for (int64_t i = 0; i < count; ++i) {
        const int64_t e = begin + i;
        MergeSource<T, T>& src = p.sources[i];
        src.projection = ptr<T>(projection) + e * n_ * kt;
        src.projection_row_stride = kt;
        src.head_scale = ptr<float>(head_scale) + e * n_ * c_.heads;
        src.head_scale_row_stride = c_.heads;
        src.bias = ptr<T>(b_out) + c_.fusers[e] * b_out.stride(0);
        p.views[i] = cache_view<T>(c_.receivers[e]);
        // The projection rows are dense and 16-byte aligned when the head rows are whole vectors.
        p.vectorized[i] = vectorizable<T>(c_.receivers[e]) && aligned16(src.projection) && aligned16(src.bias);
      }
      p.slots = slot_list(c_.receiver_slots, first);
      p.rows = pool_rows(c_.receivers[begin]);
      p.tokens = static_cast<int32_t>(n_);
      p.sharers = 1;
      p.heads = static_cast<int32_t>(c_.heads);
      p.head_dim = static_cast<int32_t>(c_.head_dim);
      launch_merge(p, static_cast<int>(count), stream_);
      C2C_KERNEL_LAUNCH_CHECK();
    });
  }

  const Call& c_;
  const at::Tensor input_weight_;  // W_in as [P, H, Ks + Kt], or undefined: two GEMMs
  const at::Tensor fold_;          // [W_head, V] as fp32 [P, Ht, 2H], or undefined: unfolded
  cudaStream_t stream_;
  int64_t n_ = 0;
};

// Tokens per chunk: the fewest chunks the workspace budget allows (chunks of kMinChunkTokens
// at the least), the tokens then spread evenly over them, so that the workspace is no larger
// than those chunks need (16384 tokens in 2 chunks: 2 x 8192, not 12729 + 3655).
int64_t chunk_tokens(int64_t tokens, int64_t bytes_per_token, int64_t device_memory) {
  const int64_t most = std::max(kMinChunkTokens, workspace_budget(device_memory) / bytes_per_token);
  const int64_t chunks = (tokens + most - 1) / most;
  return (tokens + chunks - 1) / chunks;
}

// Runs the fuser over all tokens of the call in workspace-bounded chunks.
void run(const Call& c, const Sink& sink) {
  if (c.entries == 0 || c.tokens == 0) return;
  const at::TensorOptions options = c.w[kWInSharer].options();
  const cudaStream_t stream = current_stream();
  const at::Tensor input_weight = concatenated_input_weight(c, stream);
  const at::Tensor fold = head_fold(c, stream);
  const bool folded = fold.defined();
  const int64_t chunk = chunk_tokens(
      c.tokens, c.entries * Workspace::bytes_per_row(c, c.w[kWInSharer].element_size(), folded), device_memory_bytes());
  const Workspace ws(c, chunk, options, folded);
  dispatch_cache_dtype(c.w[kWInSharer].scalar_type(), "weights", [&](auto tag) {
    using T = typename decltype(tag)::type;
    Pipeline<T> pipeline(c, input_weight, fold, stream);
    for (int64_t first = 0; first < c.tokens; first += chunk) {
      pipeline.run_chunk(first, std::min(chunk, c.tokens - first), ws, sink);
    }
  });
}

}  // namespace

int64_t input_weight_cache_entries() { return DerivedCache::concatenated_input().size(); }

int64_t head_fold_cache_entries() { return DerivedCache::head_fold().size(); }

int64_t captured_derived_tensors() {
  int64_t n = 0;
  for (DerivedCache* c : {&DerivedCache::concatenated_input(), &DerivedCache::head_fold()}) {
    const std::lock_guard<std::mutex> lock(c->mutex);
    n += static_cast<int64_t>(c->captured.size());
  }
  return n;
}

std::tuple<int64_t, int64_t, int64_t> chunk_plan(int64_t entries, int64_t tokens, int64_t sharer_width,
                                                 int64_t receiver_width, int64_t hidden, int64_t inner, int64_t heads,
                                                 int64_t element_size, int64_t device_memory, bool folded) {
  TORCH_CHECK(entries > 0 && tokens > 0, "chunk_plan: entries and tokens must be positive");
  const int64_t per_token =
      entries * Workspace::bytes_per_row(sharer_width, receiver_width, hidden, inner, heads, element_size, folded);
  const int64_t chunk = chunk_tokens(tokens, per_token, device_memory);
  return {chunk, (tokens + chunk - 1) / chunk, chunk * per_token};
}

void fuse(const std::vector<at::Tensor>& receiver_caches, const std::vector<at::Tensor>& sharer_caches,
          const at::Tensor& receiver_slots, const at::Tensor& sharer_slots, const std::vector<at::Tensor>& weights,
          const std::vector<int64_t>& fusers) {
  const DeviceGuard guard(receiver_slots.device());
  const Call c = unpack(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers);
  run(c, Sink{true, {}, {}});
}

std::tuple<at::Tensor, at::Tensor> project(const std::vector<at::Tensor>& receiver_caches,
                                           const std::vector<at::Tensor>& sharer_caches,
                                           const at::Tensor& receiver_slots, const at::Tensor& sharer_slots,
                                           const std::vector<at::Tensor>& weights,
                                           const std::vector<int64_t>& fusers) {
  const DeviceGuard guard(receiver_slots.device());
  const Call c = unpack(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers);
  const auto fp32 = receiver_slots.options().dtype(at::kFloat);
  const int64_t kt = c.w[kWOut].size(1);
  Sink sink{false, workspace_empty({c.entries, c.tokens, kt}, fp32),
            workspace_empty({c.entries, c.tokens, c.heads}, fp32)};
  run(c, sink);
  return {sink.projection, sink.head_scale};
}

}  // namespace c2c::cuda
