// Orchestration of the CUDA backend: torch.ops.c2c_native.fuse / project / merge on CUDA.
//
// A call's tokens go through the fuser in chunks (a bounded workspace), every stage batched
// over all entries of the call:
//   gather sharer and receiver rows -> [R, n, Ks], [R, n, Kt]          (gather_norm.cu)
//   u = S Wis^T + X Wir^T (+ b_in, RMSNorm)                             (batched_linear.cu + row epilogue)
//   FFN_1; then the weight branch (FFN_w, W_head, gate, sigmoid) and the projection branch
//   (n - 2 FFN blocks, W_out), each FFN = GEMM, GELU, GEMM, fused residual/RMSNorm epilogue
//   merge into the cache (fuse) or write the fp32 projection (project)  (merge.cu)
// All launches go to the current stream; nothing waits for the device or copies host data to
// it, so a call can be captured in a CUDA graph. The hard gate is read by the kernels.

#include <algorithm>
#include <cstdlib>

#include "cuda/batched_linear.h"
#include "cuda/call.h"
#include "cuda/fuse_cuda.h"
#include "cuda/runtime.h"
#include "cuda/torch_params.h"
#include "cuda/workspace.h"

namespace c2c::cuda {
namespace {

// Activations of one token chunk stay under this many bytes (the GEMMs are efficient long
// before: with 48 entries and H = I = 1024 a chunk still holds about 1500 tokens), unless
// the environment variable C2C_CUDA_WORKSPACE_BYTES says otherwise. A chunk holds at least
// kMinChunkTokens tokens, below which the batched GEMMs lose their efficiency.
constexpr int64_t kWorkspaceBytes = int64_t{1} << 30;
constexpr int64_t kMinChunkTokens = 256;

int64_t workspace_budget() {
  const char* value = std::getenv("C2C_CUDA_WORKSPACE_BYTES");
  const long long parsed = value != nullptr ? std::strtoll(value, nullptr, 10) : 0;
  return parsed > 0 ? parsed : kWorkspaceBytes;
}

// Where a chunk's results go: merged into the receiver caches, or written to project's outputs.
struct Sink {
  bool merge;
  at::Tensor projection;  // [R, T, Kt] fp32 (project only)
  at::Tensor head_scale;  // [R, T, Ht] fp32 (project only)
};

// Dense activation buffers of one token chunk, [R, n, width] each.
struct Workspace {
  at::Tensor sharer_rows, receiver_rows, gemm_out, residual, norm_a, norm_b, inner, logits, head_scale;

  static int64_t bytes_per_row(const Call& c, int64_t element) {
    const int64_t ks = c.sharer_heads * c.sharer_head_dim, kt = c.heads * c.head_dim;
    return element * (ks + kt + 3 * c.hidden + std::max(c.inner, c.hidden) + c.heads) + 4 * (c.hidden + c.heads);
  }

  Workspace(const Call& c, int64_t tokens, const at::TensorOptions& options) {
    const int64_t r = c.entries;
    const auto fp32 = options.dtype(at::kFloat);
    sharer_rows = workspace_empty({r * tokens * c.sharer_heads * c.sharer_head_dim}, options);
    receiver_rows = workspace_empty({r * tokens * c.heads * c.head_dim}, options);
    gemm_out = workspace_empty({r * tokens * c.hidden}, options);
    residual = workspace_empty({r * tokens * c.hidden}, fp32);
    norm_a = workspace_empty({r * tokens * c.hidden}, options);
    norm_b = workspace_empty({r * tokens * c.hidden}, options);
    inner = workspace_empty({r * tokens * std::max(c.inner, c.hidden)}, options);
    logits = workspace_empty({r * tokens * c.heads}, options);
    head_scale = workspace_empty({r * tokens * c.heads}, fp32);
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

// Checks that a launch's flat thread index (32-bit in the kernels) cannot overflow.
void check_index_range(int64_t work, const char* what) {
  TORCH_CHECK(work < (int64_t{1} << 31), "c2c: ", what, " covers ", work,
              " elements in one launch, above the CUDA backend's limit of 2^31; split the call");
}

template <typename T>
class Pipeline {
 public:
  Pipeline(const Call& c, cudaStream_t stream) : c_(c), stream_(stream) {}

  // One token chunk through the stages, named as the Triton stage files
  // (c2c_kernels/backends/triton) and the CPU backend's FuserRun (csrc/cpu/fuser.cpp).
  void run_chunk(int64_t first, int64_t tokens, const Workspace& ws, const Sink& sink) {
    n_ = tokens;
    const Chunk x = chunk(ws);
    gather(c_.sharers, c_.sharer_slots, first, x.sharer_rows, c_.sharer_heads, c_.sharer_head_dim);
    gather(c_.receivers, c_.receiver_slots, first, x.receiver_rows, c_.heads, c_.head_dim);
    input_gemm(x);                          // triton: input_gemm.py
    ffn_1(x, ws);                           // ffn_up.py, ffn_down.py
    weight_branch(first, x, ws, sink);      // ffn_up.py, ffn_down.py (head logits)
    projection_blocks(x, ws);               // ffn_up.py, ffn_down.py
    output(first, x, ws.head_scale, sink);  // output_gemm.py
  }

 private:
  // The workspace's buffers as dense [R, n, width] tensors for this chunk.
  struct Chunk {
    at::Tensor sharer_rows, receiver_rows, gemm_out, residual, norm_a, norm_b, logits;
  };

  Chunk chunk(const Workspace& ws) const {
    const int64_t ks = c_.sharer_heads * c_.sharer_head_dim, kt = c_.heads * c_.head_dim, h = c_.hidden;
    return Chunk{dense(ws.sharer_rows, c_.entries, n_, ks), dense(ws.receiver_rows, c_.entries, n_, kt),
                 dense(ws.gemm_out, c_.entries, n_, h),     dense(ws.residual, c_.entries, n_, h),
                 dense(ws.norm_a, c_.entries, n_, h),       dense(ws.norm_b, c_.entries, n_, h),
                 dense(ws.logits, c_.entries, n_, c_.heads)};
  }

  // u = S Wis^T + X Wir^T + b_in; residual = u; norm_a = RMSNorm_0(u)
  void input_gemm(const Chunk& x) {
    batched_linear(x.gemm_out, x.sharer_rows, c_.w[kWInSharer], c_.runs, false);
    batched_linear(x.gemm_out, x.receiver_rows, c_.w[kWInReceiver], c_.runs, true);
    RowEpilogueParams<T> in{};
    in.delta = ptr<T>(x.gemm_out);
    in.bias = ptr<T>(c_.w[kBIn]);
    in.bias_fuser_stride = c_.w[kBIn].stride(0);
    in.residual_out = mutable_ptr<float>(x.residual);
    set_norm(in, 0, x.norm_a, c_.w[kFfnNorm], 0);
    row_epilogue(in);
  }

  // FFN_1, then u feeds both branches: norm_a = head_norm(u), norm_b = ffn_norm_1(u)
  void ffn_1(const Chunk& x, const Workspace& ws) {
    ffn(x.norm_a, c_.w[kFfnW1].select(1, 0), c_.w[kFfnW2].select(1, 0), ws, x.gemm_out);
    RowEpilogueParams<T> split{};
    split.residual = ptr<float>(x.residual);
    split.delta = ptr<T>(x.gemm_out);
    split.residual_out = mutable_ptr<float>(x.residual);
    set_norm(split, 0, x.norm_a, c_.w[kHeadNorm], -1);
    set_norm(split, 1, x.norm_b, c_.w[kFfnNorm], 1);
    row_epilogue(split);
  }

  // Weight branch: w = u + FFN_w(u) (the residual stays u for the projection branch),
  // head_scale = G * sigmoid(W_head w + b_head): into the workspace (fuse) or project's output.
  void weight_branch(int64_t first, const Chunk& x, const Workspace& ws, const Sink& sink) {
    ffn(x.norm_a, c_.w[kHeadW1], c_.w[kHeadW2], ws, x.gemm_out);
    RowEpilogueParams<T> head{};
    head.residual = ptr<float>(x.residual);
    head.delta = ptr<T>(x.gemm_out);
    head.plain_out = mutable_ptr<T>(x.norm_a);
    row_epilogue(head);
    batched_linear(x.logits, x.norm_a, c_.w[kWHead], c_.runs, false);
    BiasEpilogueParams<T> scale{};
    scale.in = ptr<T>(x.logits);
    scale.bias = ptr<T>(c_.w[kBHead]);
    scale.bias_fuser_stride = c_.w[kBHead].stride(0);
    scale.gate = ptr<float>(c_.w[kGateLogit]);
    scale.gate_stride = c_.w[kGateLogit].stride(0);
    if (sink.merge) {
      scale.out = mutable_ptr<float>(ws.head_scale);
      scale.out_entry_stride = n_ * c_.heads;
    } else {
      scale.out = mutable_ptr<float>(sink.head_scale) + first * c_.heads;
      scale.out_entry_stride = c_.tokens * c_.heads;
      skip_padding(scale, first);
    }
    scale.out_row_stride = c_.heads;
    bias_epilogue(scale, c_.heads);
  }

  // Projection branch: p = u, then blocks 1 .. B-1; the last writes p into norm_b in the cache
  // dtype (the input of W_out).
  void projection_blocks(const Chunk& x, const Workspace& ws) {
    for (int64_t b = 1; b < c_.blocks; ++b) {
      ffn(x.norm_b, c_.w[kFfnW1].select(1, b), c_.w[kFfnW2].select(1, b), ws, x.gemm_out);
      RowEpilogueParams<T> block{};
      block.residual = ptr<float>(x.residual);
      block.delta = ptr<T>(x.gemm_out);
      if (b + 1 < c_.blocks) {
        block.residual_out = mutable_ptr<float>(x.residual);
        set_norm(block, 0, x.norm_b, c_.w[kFfnNorm], b + 1);
      } else {
        block.plain_out = mutable_ptr<T>(x.norm_b);
      }
      row_epilogue(block);
    }
  }

  // y = W_out p; merged into the cache (fuse) or written with b_out as fp32 (project).
  void output(int64_t first, const Chunk& x, const at::Tensor& head_scale, const Sink& sink) {
    const int64_t kt = c_.heads * c_.head_dim;
    const at::Tensor projection = x.receiver_rows;  // the receiver rows are consumed: reuse the buffer
    batched_linear(projection, x.norm_b, c_.w[kWOut], c_.runs, false);
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
    skip_padding(out, first);
    bias_epilogue(out, kt);
  }

  void gather(const std::vector<at::Tensor>& views, const at::Tensor& slots, int64_t first, const at::Tensor& out,
              int64_t heads, int64_t head_dim) {
    check_index_range(n_ * heads * head_dim, "a gather");
    for_each_entry_group(c_.entries, kGatherMaxEntries, [&](int64_t begin, int64_t count) {
      GatherParams<T> p{};
      for (int64_t i = 0; i < count; ++i) {
        p.views[i] = cache_view<T>(views[begin + i]);
        p.vectorized[i] = vectorizable<T>(views[begin + i]) && aligned16(out.data_ptr());
      }
      p.out = mutable_ptr<T>(out) + begin * n_ * heads * head_dim;
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
  void skip_padding(BiasEpilogueParams<T>& p, int64_t first) {
    p.skip = slot_list(c_.receiver_slots, first);
    p.skip_rows = pool_rows(c_.receivers[0]);
  }

  // norm_out[k] = RMSNorm(z) * scale, scale = weights[fuser] (block < 0) or weights[fuser, block].
  void set_norm(RowEpilogueParams<T>& p, int k, const at::Tensor& out, const at::Tensor& scales, int64_t block) {
    p.norm_out[k] = mutable_ptr<T>(out);
    p.norm_scale[k] = ptr<T>(scales) + (block < 0 ? 0 : block * scales.stride(1));
    p.norm_fuser_stride[k] = scales.stride(0);
  }

  void row_epilogue(RowEpilogueParams<T> p) {
    p.tokens = static_cast<int32_t>(n_);
    p.width = static_cast<int32_t>(c_.hidden);
    for_each_entry_group(c_.entries, kMaxEntriesPerLaunch, [&](int64_t begin, int64_t count) {
      p.entry_begin = static_cast<int32_t>(begin);
      p.fusers = fuser_table(c_, begin, count);
      launch_row_epilogue(p, static_cast<int>(count), stream_);
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

  // out = W2 gelu(W1 x) for every entry; w1 [P, I, H], w2 [P, H, I].
  void ffn(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, const Workspace& ws,
           const at::Tensor& out) {
    const at::Tensor inner = dense(ws.inner, c_.entries, n_, w1.size(1));
    batched_linear(inner, x, w1, c_.runs, false);
    launch_gelu(mutable_ptr<T>(inner), inner.numel(), stream_);
    C2C_KERNEL_LAUNCH_CHECK();
    batched_linear(out, inner, w2, c_.runs, false);
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
  cudaStream_t stream_;
  int64_t n_ = 0;
};

// Runs the fuser over all tokens of the call in workspace-bounded chunks.
void run(const Call& c, const Sink& sink) {
  if (c.entries == 0 || c.tokens == 0) return;
  const at::TensorOptions options = c.w[kWInSharer].options();
  const int64_t per_token = c.entries * Workspace::bytes_per_row(c, c.w[kWInSharer].element_size());
  const int64_t chunk = std::min(c.tokens, std::max(kMinChunkTokens, workspace_budget() / per_token));
  const Workspace ws(c, chunk, options);
  const cudaStream_t stream = current_stream();
  dispatch_cache_dtype(c.w[kWInSharer].scalar_type(), "weights", [&](auto tag) {
    using T = typename decltype(tag)::type;
    Pipeline<T> pipeline(c, stream);
    for (int64_t first = 0; first < c.tokens; first += chunk) {
      pipeline.run_chunk(first, std::min(chunk, c.tokens - first), ws, sink);
    }
  });
}

}  // namespace

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
