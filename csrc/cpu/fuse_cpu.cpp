// Entry points of the CPU backend: torch.ops.c2c_native.{fuse, project, merge} on CPU tensors.
// Arguments were validated in c2c_kernels/ops.py; only what memory safety needs is re-checked.
#include "cpu/fuse_cpu.h"

#include <ATen/Parallel.h>

#include <cstdlib>
#include <cstring>

#include "cpu/common.h"
#include "cpu/fuser.h"
#include "cpu/gemm.h"
#include "cpu/head_fold.h"
#include "cpu/profile.h"
#include "cpu/vec.h"

namespace c2c::cpu {
namespace {

// One slot tensor addresses every entry, so every view of a list must have the same rows:
// the slots are checked once, against entry 0's pool.
void check_one_pool(const char* name, const std::vector<at::Tensor>& views) {
  for (size_t i = 1; i < views.size(); ++i) {
    TORCH_CHECK_VALUE(views[i].size(0) == views[0].size(0) && views[i].size(1) == views[0].size(1), "c2c cpu: ", name,
                      "[", i, "] has ", views[i].size(0), " pages x ", views[i].size(1), " entries, ", name, "[0] ",
                      views[0].size(0), " x ", views[0].size(1), "; one slot tensor addresses every entry");
  }
}

void check_entries(const std::vector<at::Tensor>& receiver_caches, const std::vector<at::Tensor>& sharer_caches,
                   const StackedWeights& w, const std::vector<int64_t>& fusers) {
  TORCH_CHECK(receiver_caches.size() == sharer_caches.size() && receiver_caches.size() == fusers.size(),
              "c2c cpu: receiver_caches, sharer_caches and fusers differ in length");
  for (size_t i = 0; i < fusers.size(); ++i) {
    TORCH_CHECK(fusers[i] >= 0 && fusers[i] < w.fusers, "c2c cpu: fusers[", i, "] out of range");
    const at::Tensor &rc = receiver_caches[i], &sc = sharer_caches[i];
    TORCH_CHECK(rc.dim() == 4 && sc.dim() == 4, "c2c cpu: cache views must be 4-D");
    TORCH_CHECK(rc.scalar_type() == w.dtype && sc.scalar_type() == w.dtype, "c2c cpu: caches must have the weights' dtype");
    TORCH_CHECK(rc.size(2) == w.receiver_heads && rc.size(2) * rc.size(3) == w.receiver_width,
                "c2c cpu: receiver_caches[", i, "] does not match the fuser's receiver heads x dim");
    TORCH_CHECK(sc.size(2) * sc.size(3) == w.sharer_width, "c2c cpu: sharer_caches[", i,
                "] does not match the fuser's sharer width");
  }
  check_one_pool("receiver_caches", receiver_caches);
  check_one_pool("sharer_caches", sharer_caches);
}

// Workspace buffers of the calling thread, kept across calls (no fresh pages to fault in on
// every call) unless they grew past kKeepBytes.
constexpr int64_t kKeepBytes = int64_t{64} << 20;

std::vector<at::Tensor>& thread_workspace() {
  thread_local std::vector<at::Tensor> ws;
  return ws;
}

void trim_workspace() {
  auto& ws = thread_workspace();
  int64_t bytes = 0;
  for (const auto& t : ws) bytes += t.defined() ? t.nbytes() : 0;
  if (bytes > kKeepBytes) ws.clear();
}

// run(entry) for each of `entries`, one after another, each GEMM and row pass using every
// intra-op thread. (Running entries one per thread at once, with single-threaded GEMMs, was
// tried and did not measure faster on a shared 2-core machine.) Entries write distinct receiver
// views and each reads only its own, so the order does not matter.
template <typename F>
void for_entries(const std::vector<int64_t>& entries, const F& run) {
  for (int64_t i : entries) run(i);
  trim_workspace();
}

// The engine of a call. Inference tensors have no version counter, so the packed engine could
// not cache their packed copies (it would pack on every call): the chooser's pick of it falls
// back to native16 for them (a forced one still runs, packing per call).
Engine call_engine(const StackedWeights& w, int64_t tokens) {
  const Engine e = choose_engine(w.dtype, tokens, w.hidden);
  if (e != Engine::Packed || forced_engine(w.dtype) >= 0) return e;
  for (const auto& t : w.t) {
    if (t.is_inference()) return Engine::Native16;
  }
  return e;
}

}  // namespace

void fuse(const std::vector<at::Tensor>& receiver_caches, const std::vector<at::Tensor>& sharer_caches,
          const at::Tensor& receiver_slots, const at::Tensor& sharer_slots, const std::vector<at::Tensor>& weights,
          const std::vector<int64_t>& fusers) {
  prof::count_call();
  const StackedWeights w(weights);
  check_entries(receiver_caches, sharer_caches, w, fusers);
  if (fusers.empty()) return;
  // Bad slots raise even when every gate is closed: the call is wrong either way.
  const Tokens tokens = valid_tokens(receiver_slots, pool_rows(receiver_caches[0]), &sharer_slots,
                                     pool_rows(sharer_caches[0]), /*dedupe=*/true);
  bool any_open = false;
  for (int64_t f : fusers) any_open = any_open || w.gate_open(f);
  if (!any_open) return;  // closed gates: no work at all
  const Engine engine = call_engine(w, tokens.size());
  // Entries write distinct receiver views and each reads only its own, so running them in any
  // order (or at once) still has every entry read the rows as they were when the call began.
  std::vector<int64_t> open;
  for (size_t i = 0; i < fusers.size(); ++i) {
    if (w.gate_open(fusers[i])) open.push_back(static_cast<int64_t>(i));
  }
  for_entries(open, [&](int64_t i) {
    Sink sink;
    sink.receiver = &receiver_caches[i];
    run_fuser(w, fusers[i], engine, receiver_caches[i], sharer_caches[i], tokens, sink, thread_workspace());
  });
}

std::tuple<at::Tensor, at::Tensor> project(const std::vector<at::Tensor>& receiver_caches,
                                           const std::vector<at::Tensor>& sharer_caches,
                                           const at::Tensor& receiver_slots, const at::Tensor& sharer_slots,
                                           const std::vector<at::Tensor>& weights,
                                           const std::vector<int64_t>& fusers) {
  prof::count_call();
  const StackedWeights w(weights);
  check_entries(receiver_caches, sharer_caches, w, fusers);
  const int64_t r = static_cast<int64_t>(fusers.size()), t = receiver_slots.size(0);
  auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor projection = at::zeros({r, t, w.receiver_width}, opts);
  at::Tensor head_scale = at::zeros({r, t, w.receiver_heads}, opts);
  if (r == 0 || t == 0) return {projection, head_scale};
  // Every valid token gets its rows, duplicated receiver slots included.
  const Tokens tokens = valid_tokens(receiver_slots, pool_rows(receiver_caches[0]), &sharer_slots,
                                     pool_rows(sharer_caches[0]), /*dedupe=*/false);
  const Engine engine = call_engine(w, tokens.size());
  float* const proj = projection.data_ptr<float>();
  float* const scale = head_scale.data_ptr<float>();
  // A closed gate still gets its projection (head_scale 0), as the reference returns it.
  std::vector<int64_t> all(r);
  for (int64_t i = 0; i < r; ++i) all[i] = i;
  for_entries(all, [&](int64_t i) {
    Sink sink;
    sink.projection = proj + i * t * w.receiver_width;
    sink.head_scale = scale + i * t * w.receiver_heads;
    run_fuser(w, fusers[i], engine, receiver_caches[i], sharer_caches[i], tokens, sink, thread_workspace());
  });
  return {projection, head_scale};
}

void merge(const std::vector<at::Tensor>& receiver_caches, const at::Tensor& receiver_slots,
           const std::vector<at::Tensor>& projections, const std::vector<at::Tensor>& head_scales) {
  const int64_t r = static_cast<int64_t>(receiver_caches.size());
  if (r == 0) return;
  TORCH_CHECK(projections.size() % r == 0 && head_scales.size() == projections.size(),
              "c2c cpu: expected S * R projections and head_scales");
  const int64_t s = static_cast<int64_t>(projections.size()) / r;
  check_one_pool("receiver_caches", receiver_caches);
  // Of several tokens with one receiver slot only the last is merged (one write per row).
  const Tokens tokens = valid_tokens(receiver_slots, pool_rows(receiver_caches[0]), nullptr, 0, /*dedupe=*/true);
  const int64_t m_count = tokens.size(), t = receiver_slots.size(0);
  if (m_count == 0 || s == 0) return;

  std::vector<CacheView<char>> views;
  const Dt cdt = dt_of(receiver_caches[0].scalar_type());
  for (const auto& rc : receiver_caches) {
    TORCH_CHECK(rc.scalar_type() == receiver_caches[0].scalar_type() && rc.sizes() == receiver_caches[0].sizes(),
                "c2c cpu: receiver_caches must share one dtype and shape");
    views.push_back(byte_view(rc));
  }
  const int64_t ht = views[0].heads, dh = views[0].head_dim, kt = ht * dh;
  // Row pointers and row strides of the fp32 corrections (rows must be unit-stride).
  std::vector<at::Tensor> keep;
  std::vector<const float*> proj(projections.size()), scale(projections.size());
  std::vector<int64_t> proj_ld(projections.size()), scale_ld(projections.size());
  for (size_t j = 0; j < projections.size(); ++j) {
    at::Tensor p = projections[j], a = head_scales[j];
    TORCH_CHECK(p.scalar_type() == at::kFloat && a.scalar_type() == at::kFloat, "c2c cpu: corrections must be float32");
    TORCH_CHECK(p.dim() == 2 && p.size(0) == t && p.size(1) == kt && a.dim() == 2 && a.size(0) == t && a.size(1) == ht,
                "c2c cpu: projections[", j, "] / head_scales[", j, "] have the wrong shape");
    if (kt > 1 && p.stride(1) != 1) keep.push_back(p = p.contiguous());
    if (ht > 1 && a.stride(1) != 1) keep.push_back(a = a.contiguous());
    proj[j] = p.data_ptr<float>();
    scale[j] = a.data_ptr<float>();
    proj_ld[j] = p.stride(0);
    scale_ld[j] = a.stride(0);
  }

  const VecOps& v = vec();
  // x += sum_j a_j * y_j per head, in fp32, rounded once; tasks are (entry, token block).
  for_rows(r * m_count, [&](int64_t idx) {
    float* x = scratch(0, dh);
    {
      const int64_t i = idx / m_count, m = idx % m_count, tok = tokens.index[m];
      for (int64_t h = 0; h < ht; ++h) {
        char* row = views[i].row(tokens.receiver[m], static_cast<int32_t>(h));
        v.load(row, cdt, x, dh);
        for (int64_t j = i * s; j < (i + 1) * s; ++j) {
          v.axpy(scale[j][tok * scale_ld[j] + h], proj[j] + tok * proj_ld[j] + h * dh, x, dh);
        }
        v.store(x, row, cdt, dh);
      }
    }
  });
}

std::string stage_times(bool enable) { return prof::take(enable); }

std::string choose_engine_name(c10::ScalarType dtype, int64_t tokens, int64_t hidden) {
  dt_of(dtype);  // refuses other dtypes
  TORCH_CHECK_VALUE(tokens >= 0 && hidden > 0, "c2c cpu: expected tokens >= 0 and hidden > 0, got ", tokens, " and ",
                    hidden);
  return engine_name(choose_engine(dtype, tokens, hidden));
}

std::string engine_choices(bool clear) { return engine_log(clear); }

std::string packed_cache(bool clear) { return packed_cache_info(clear); }

std::string head_fold_cache(bool clear) { return head_fold_info(clear); }

std::string config(c10::ScalarType dtype) {
  dt_of(dtype);
  const int forced = forced_engine(dtype);
  std::string gemm;
  if (forced >= 0) {
    const Engine engine = static_cast<Engine>(forced);
    gemm = engine_name(engine);
    if (engine == Engine::F32 && dtype != at::kFloat) gemm += " (16-bit weights widened to fp32 per block)";
    if (engine == Engine::Native16) gemm += " (ATen/oneDNN 16-bit GEMM)";
    if (engine == Engine::Brgemm) gemm += " (ATen cpublas::brgemm, fp32 outputs)";
    if (engine == Engine::Packed) gemm += " (oneDNN inner product on cached packed weights, GELU fused)";
    if (engine == Engine::Native16 && std::getenv("C2C_CPU_GEMM") != nullptr &&
        std::strcmp(std::getenv("C2C_CPU_GEMM"), "packed") == 0) {
      gemm += " (packed unavailable for this dtype here)";
    }
  } else {
    gemm = std::string("auto (measured at first use per token class; CPU-flag prior ") +
           engine_name(prior_engine(dtype)) + ")";
  }
  return "gemm=" + gemm + " vec=" + vec().name + " threads=" + std::to_string(at::get_num_threads()) +
         " head_fold=" + (head_fold_enabled() ? "on" : "off") +
         (poisoning() ? " workspaces=poisoned" : "");
}

}  // namespace c2c::cpu
