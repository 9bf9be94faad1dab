// GEMM engines of the CPU backend and the choice between them (see gemm.h).
#include "cpu/gemm.h"

#include "cpu/common.h"
#include "cpu/profile.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/Utils.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/native/CPUBlas.h>
#include <c10/core/StorageImpl.h>
#include <c10/util/intrusive_ptr.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <list>
#include <map>
#include <mutex>
#include <tuple>
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

bool cap(const char* name) {
  static const auto caps = at::cpu::get_cpu_capabilities();
  auto it = caps.find(name);
  return it != caps.end() && it->second.isBool() && it->second.toBool();
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
    // beta = 0, as BLAS specifies. oneDNN's AMX kernels for 16-bit GEMMs have been caught
    // reading memory outside the operands they were given (whole K tiles of A past a row's
    // last column), where a NaN survives a multiply by 0: A is dense here (see gemm()), and
    // on AMX CPUs C is zeroed first too. Elsewhere the poisoned-workspace tests check that
    // the kernels read nothing of C, and the pass (a parallel region per GEMM) is skipped.
    static const bool amx = cap("amx_bf16") || cap("amx_fp16") || cap("amx_tile");
    if (c.dt != Dt::F32 && amx) {
      const prof::Scope scope(prof::ZeroC);
      ct.zero_();
    }
    at::mm_out(ct, at_, wt);
  }
}

int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::max<int64_t>(1, std::atoll(v)) : fallback;
}

constexpr int64_t kAlign = 16;  // column ranges start on multiples of 16 (cache lines of fp32)

// ---- Engine::Brgemm ------------------------------------------------------------------------

constexpr int64_t kBrN = 32;       // columns of C per micro-kernel call (one packed block of W)
constexpr int64_t kBrM = 32;       // rows of C per micro-kernel call
constexpr int64_t kBrChunk = 128;  // columns per task (the epilogue's range)

template <typename T>
void brgemm_range(int64_t m, int64_t n0, int64_t n1, int64_t k, Mat a, Mat w, Mat c, bool accumulate,
                  std::vector<T>& wt, std::vector<T>& packed) {
  const c10::ScalarType st = c10::CppTypeToScalarType<T>::value;
  // The VNNI micro-kernel (AMX) takes K in pairs; odd K takes the plain layout.
  static const bool could_pack = at::native::cpublas::could_pack(st);
  const bool vnni = could_pack && k % 2 == 0;
  const T* a_p = static_cast<const T*>(a.p);
  float* c_p = static_cast<float*>(c.p);
  for (int64_t j0 = n0; j0 < n1; j0 += kBrN) {
    const int64_t nb = std::min(kBrN, n1 - j0);
    // B = W[j0 : j0 + nb, :]^T as a row-major [K, nb] block (the micro-kernel's layout).
    if (static_cast<int64_t>(wt.size()) < k * nb) wt.resize(k * nb);
    for (int64_t j = 0; j < nb; ++j) {
      const T* row = static_cast<const T*>(offset(w, j0 + j, 0).p);
      for (int64_t kk = 0; kk < k; ++kk) wt[kk * nb + j] = row[kk];
    }
    const T* b = wt.data();
    if (vnni) {
      if (static_cast<int64_t>(packed.size()) < (k + 1) * nb) packed.resize((k + 1) * nb);
      at::native::cpublas::pack(k, nb, nb, nb, st, st, wt.data(), packed.data());
      b = packed.data();
    }
    for (int64_t i0 = 0; i0 < m; i0 += kBrM) {
      const int64_t mb = std::min(kBrM, m - i0);
      at::native::cpublas::brgemm(mb, nb, k, a.ld, nb, c.ld, accumulate, a_p + i0 * a.ld, b,
                                  c_p + i0 * c.ld + j0, vnni);
    }
  }
  at::native::cpublas::brgemm_release(vnni);
}

template <typename T>
void brgemm_gemm(int64_t m, int64_t n, int64_t k, Mat a, Mat w, Mat c, bool accumulate,
                 c10::function_ref<void(int64_t, int64_t)> epilogue) {
  const int64_t tasks = (n + kBrChunk - 1) / kBrChunk;
  parallel_tasks(tasks, [&](int64_t task) {
    thread_local std::vector<T> wt, packed;
    const int64_t n0 = task * kBrChunk, n1 = std::min(n, n0 + kBrChunk);
    brgemm_range<T>(m, n0, n1, k, a, w, c, accumulate, wt, packed);
    if (epilogue) epilogue(n0, n1);
  });
}


// ---- Engine::Packed ------------------------------------------------------------------------

// The two mkldnn ops, called through the dispatcher (boxed: their C++ signatures are not part
// of torch's API). Looked up once; missing ops (or torch without mkldnn) leave the engine
// unavailable.
struct PackedOps {
  std::optional<c10::OperatorHandle> reorder, linear;
  bool ok = false;
};

const PackedOps& packed_ops() {
  static const PackedOps ops = [] {
    PackedOps o;
    if (!at::hasMKLDNN()) return o;
    auto& d = c10::Dispatcher::singleton();
    o.reorder = d.findSchema({"mkldnn::_reorder_linear_weight", ""});
    o.linear = d.findSchema({"mkldnn::_linear_pointwise", ""});
    o.ok = o.reorder.has_value() && o.linear.has_value();
    return o;
  }();
  return ops;
}

// W [n, k] (dense rows, leading dimension w.ld) reordered into oneDNN's layout for m rows of A.
at::Tensor pack_weight(int64_t m, int64_t n, int64_t k, Mat w) {
  const PackedOps& ops = packed_ops();
  TORCH_CHECK(ops.ok, "c2c cpu: the packed engine needs torch built with mkldnn (mkldnn::_linear_pointwise)");
  // A dense copy: the reorder must not see the rest of the stack, and the packed tensor must
  // not alias the caller's memory.
  at::Tensor wt = as_tensor(w, n, k).contiguous();
  if (wt.data_ptr() == w.p) wt = wt.clone();
  torch::jit::Stack st{c10::IValue(wt), c10::IValue(m)};
  ops.reorder->callBoxed(st);
  return st.at(0).toTensor();
}

// The packed copies, keyed by the weight matrix's address and shape, the identity of the
// tensor it points into (storage, data pointer, sizes, strides, dtype) and that tensor's
// version counter, and the token class (oneDNN picks the layout for a row count). Entries hold
// their source storage weakly: the weights' memory is never kept alive here, an entry whose
// storage is gone is dropped, and a new storage at a freed one's address cannot match (the
// weak reference keeps the StorageImpl object itself, and so its address, reserved). A weight
// written in place bumps the version and misses; writes that bypass the version counter
// (through .data or an inference tensor) are not seen, so inference tensors are never cached.
struct PackedKey {
  const void* p;
  int64_t n, k, ld;
  const void* storage;
  const void* data;
  std::vector<int64_t> sizes, strides;
  int dtype;
  int64_t version;
  int cls;
  bool operator<(const PackedKey& o) const {
    return std::tie(p, n, k, ld, storage, data, sizes, strides, dtype, version, cls) <
           std::tie(o.p, o.n, o.k, o.ld, o.storage, o.data, o.sizes, o.strides, o.dtype, o.version, o.cls);
  }
};

struct PackedEntry {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  at::Tensor packed;
  int64_t bytes;
  std::list<PackedKey>::iterator lru;
};

struct PackedCache {
  std::mutex mu;
  std::map<PackedKey, PackedEntry> map;
  std::list<PackedKey> lru;  // most recently used first
  int64_t bytes = 0;
  // Calls so far of weights not packed yet (see packed_weight); holds nothing alive.
  std::map<PackedKey, int64_t> seen;

  void erase(std::map<PackedKey, PackedEntry>::iterator it) {
    bytes -= it->second.bytes;
    lru.erase(it->second.lru);
    map.erase(it);
  }
};

PackedCache& packed_cache() {
  static PackedCache c;
  return c;
}

// At most C2C_CPU_PACK_MB (default 4096) MiB of packed weights, least recently used dropped
// first: one packed copy of each 16-bit weight matrix per token class in use.
int64_t packed_cap() {
  static const int64_t cap = env_int("C2C_CPU_PACK_MB", 4096) << 20;
  return cap;
}

int token_class(int64_t tokens);

// Packing a 1024 x 1024 bf16 matrix takes about as long as 20 GEMMs of 64 tokens with it
// (oneDNN's reorder, about 8 ms on 2 AVX-512 cores): a checkpoint of 48 fusers costs seconds.
// A process that fuses one prompt would pay that for nothing, so a weight is packed at its
// C2C_CPU_PACK_AFTER-th call (default 2, read per call; 1 packs at the first); until then
// the call runs native16 on the plain weight (packed_weight returns an undefined tensor).
int64_t pack_after() { return std::max<int64_t>(1, env_int("C2C_CPU_PACK_AFTER", 2)); }

at::Tensor packed_weight(int64_t m, int64_t n, int64_t k, Mat w) {
  const at::Tensor* src = w.src;
  if (src == nullptr || !src->defined() || src->is_inference() || !src->has_storage()) return pack_weight(m, n, k, w);
  c10::StorageImpl* const storage = src->storage().unsafeGetStorageImpl();
  PackedKey key{w.p, n, k, w.ld, storage, src->data_ptr(), src->sizes().vec(), src->strides().vec(),
                static_cast<int>(src->scalar_type()), src->_version(), token_class(m)};
  PackedCache& pc = packed_cache();
  {
    std::lock_guard<std::mutex> lock(pc.mu);
    auto it = pc.map.find(key);
    if (it != pc.map.end()) {
      if (!it->second.storage.expired() && it->second.storage._unsafe_get_target() == storage) {
        pc.lru.splice(pc.lru.begin(), pc.lru, it->second.lru);
        return it->second.packed;
      }
      pc.erase(it);
    }
    const int64_t calls = ++pc.seen[key];
    if (calls < pack_after()) {
      if (pc.seen.size() > 65536) pc.seen.clear();  // keys of freed weights: bounded, not leaked
      return {};
    }
    pc.seen.erase(key);
  }
  at::Tensor packed = pack_weight(m, n, k, w);
  std::lock_guard<std::mutex> lock(pc.mu);
  if (pc.map.count(key) != 0) return pc.map.at(key).packed;
  // Drop entries of freed storages and older versions of this weight, then the least recently
  // used ones while over the cap.
  for (auto it = pc.map.begin(); it != pc.map.end();) {
    const PackedKey& kk = it->first;
    const bool old_version = kk.p == key.p && kk.storage == key.storage && kk.version != key.version;
    if (it->second.storage.expired() || old_version) {
      auto next = std::next(it);
      pc.erase(it);
      it = next;
    } else {
      ++it;
    }
  }
  const int64_t bytes = n * k * dt_size(w.dt);
  while (!pc.lru.empty() && pc.bytes + bytes > packed_cap()) pc.erase(pc.map.find(pc.lru.back()));
  if (bytes > packed_cap()) return packed;
  pc.lru.push_front(key);
  pc.map.emplace(key, PackedEntry{c10::weak_intrusive_ptr<c10::StorageImpl>(c10::intrusive_ptr<c10::StorageImpl>::unsafe_reclaim_from_nonowning(storage)), packed,
                                  bytes, pc.lru.begin()});
  pc.bytes += bytes;
  return packed;
}

// A W^T (gelu'd when `gelu`) with W packed, A dense, in a new [m, n] tensor (oneDNN's inner
// product allocates its output).
at::Tensor packed_product(int64_t m, int64_t k, Mat a, const at::Tensor& pw, bool gelu) {
  torch::jit::Stack st{c10::IValue(as_tensor(a, m, k)),
                       c10::IValue(pw),
                       c10::IValue(),
                       c10::IValue(gelu ? "gelu" : "none"),
                       c10::IValue(c10::List<std::optional<c10::Scalar>>()),
                       c10::IValue(gelu ? "none" : "")};
  packed_ops().linear->callBoxed(st);
  return st.at(0).toTensor();
}

// C (+)= A W^T (gelu'd when `gelu`) with W packed; A and C dense.
void packed_run(int64_t m, int64_t n, int64_t k, Mat a, const at::Tensor& pw, Mat c, bool accumulate, bool gelu) {
  const at::Tensor out = packed_product(m, k, a, pw, gelu);
  at::Tensor ct = as_tensor(c, m, n);
  if (accumulate) {
    ct.add_(out);
  } else {
    ct.copy_(out);
  }
}

// ---- the engine choice ---------------------------------------------------------------------

// Token classes: decode-sized, short prefill, long prefill, very long.
int token_class(int64_t tokens) { return tokens <= 16 ? 0 : tokens <= 128 ? 1 : tokens <= 1024 ? 2 : 3; }
const char* const kClassNames[] = {"tokens<=16", "tokens<=128", "tokens<=1024", "tokens>1024"};

struct Chooser {
  std::mutex mu;
  std::map<std::tuple<int, int, int64_t>, Engine> chosen;
  std::vector<std::string> log;
};

Chooser& chooser() {
  static Chooser c;
  return c;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}


// Times, on every candidate engine, what a fuser's FFN block asks of it: one tokens x hidden x
// hidden GEMM plus one with the FFN-up's exact GELU (as its own epilogue or, for the packed
// engine, oneDNN's post-op), in interleaved rounds (a burst of load from other processes then
// hits all of them alike; the first round only warms up), on fixed pseudo-random data (the
// global RNG is left alone); checks each plain result against the fp32 engine's, and returns
// the fastest that agrees. The prior stays unless another engine is 1.1x faster (best round)
// and also faster in at least three of the four timed rounds. Brgemm is a candidate only where
// ATen has its micro-kernel (cpublas::could_pack: AMX); elsewhere its portable fallback is
// orders of magnitude slower and not worth timing.
Engine measure(c10::ScalarType dtype, int64_t tokens, int64_t hidden, std::string& line) {
  const Dt dt = dt_of(dtype);
  const int64_t m = std::max<int64_t>(1, std::min<int64_t>(tokens, 256)), k = hidden, n = hidden;
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor a32 = at::empty({m, k}, f32), w32 = at::empty({n, k}, f32);
  float* ap = a32.data_ptr<float>();
  float* wp = w32.data_ptr<float>();
  for (int64_t i = 0; i < m * k; ++i) ap[i] = static_cast<float>((i * 7919) % 2003) / 1001.f - 1.f;
  for (int64_t i = 0; i < n * k; ++i) wp[i] = (static_cast<float>((i * 104729) % 4099) / 2049.f - 1.f) * 0.05f;
  at::Tensor a16 = a32.to(dtype), w16 = w32.to(dtype);
  a32 = a16.to(at::kFloat);  // every engine multiplies the same (16-bit) values
  const Mat w{w16.data_ptr(), dt, k};
  bool candidate[kEngines] = {true, true, at::native::cpublas::could_pack(dtype), packed_available(dtype)};
  // The packed engine is timed on a weight packed once beforehand, as its cache serves calls.
  const at::Tensor pw = candidate[static_cast<int>(Engine::Packed)] ? pack_weight(m, n, k, w) : at::Tensor();
  constexpr int kRounds = 5;  // the first only warms up
  at::Tensor out[kEngines], out_gelu[kEngines];
  double times[kEngines], round_times[kEngines][kRounds];
  bool ok[kEngines];
  for (int e = 0; e < kEngines; ++e) {
    times[e] = std::numeric_limits<double>::infinity();
    ok[e] = false;
    const auto opts = at::TensorOptions().dtype(scalar_type(c_dtype(static_cast<Engine>(e), dt)));
    if (candidate[e]) out[e] = at::empty({m, n}, opts), out_gelu[e] = at::empty({m, n}, opts);
  }
  for (int round = 0; round < kRounds; ++round) {
    for (int e = 0; e < kEngines; ++e) {
      if (!candidate[e]) continue;
      const Engine engine = static_cast<Engine>(e);
      const Dt ad = a_dtype(engine, dt), cd = c_dtype(engine, dt);
      const Mat a{ad == Dt::F32 ? a32.data_ptr() : a16.data_ptr(), ad, k}, cm{out[e].data_ptr(), cd, n},
          cg{out_gelu[e].data_ptr(), cd, n};
      const auto t0 = std::chrono::steady_clock::now();
      if (engine == Engine::Packed) {
        packed_run(m, n, k, a, pw, cm, false, false);
        packed_run(m, n, k, a, pw, cg, false, true);
      } else {
        gemm(engine, m, n, k, a, w, cm, false);
        gemm(engine, m, n, k, a, w, cg, false, [&](int64_t n0, int64_t n1) { gelu_columns(cg, m, n0, n1); });
      }
      const double t = seconds_since(t0);
      round_times[e][round] = t;
      if (round > 0) times[e] = std::min(times[e], t);
    }
  }
  const at::Tensor ref = out[0].to(at::kFloat), ref_gelu = out_gelu[0].to(at::kFloat);
  const double scale = ref.abs().max().item<double>();
  for (int e = 0; e < kEngines; ++e) {
    if (!candidate[e]) continue;
    const double err = std::max((out[e].to(at::kFloat) - ref).abs().max().item<double>(),
                                (out_gelu[e].to(at::kFloat) - ref_gelu).abs().max().item<double>());
    ok[e] = std::isfinite(err) && err <= 2e-2 * scale + 1e-3;
  }
  int best = -1;
  for (int e = 0; e < kEngines; ++e) {
    if (ok[e] && (best < 0 || times[e] < times[best])) best = e;
  }
  const Engine prior = prior_engine(dtype);
  const int p = static_cast<int>(prior);
  // The prior stays unless another engine is 1.1x faster in its best round and faster in at
  // least three of the four timed rounds (a burst of load on a shared machine can make one
  // round of the prior slow, hardly three); one that disagrees is never taken (the fp32 engine
  // is the reference, so best >= 0 unless it produced NaN).
  int rounds_won = 0;
  if (best >= 0 && best != p) {
    for (int round = 1; round < kRounds; ++round) rounds_won += round_times[best][round] < round_times[p][round];
  }
  const bool replace = best >= 0 && best != p && times[best] * 1.1 <= times[p] && rounds_won >= 3;
  Engine pick = ok[p] && !replace ? prior : best >= 0 ? static_cast<Engine>(best) : Engine::F32;
  char buf[128];
  std::snprintf(buf, sizeof(buf), "%s %s hidden=%lld: %s (GEMM + GELU GEMM %lldx%lldx%lld,", c10::toString(dtype),
                kClassNames[token_class(tokens)], static_cast<long long>(hidden), engine_name(pick),
                static_cast<long long>(m), static_cast<long long>(n), static_cast<long long>(k));
  line = buf;
  for (int e = 0; e < kEngines; ++e) {
    if (!candidate[e]) {
      line += std::string(" ") + engine_name(static_cast<Engine>(e)) +
              (e == static_cast<int>(Engine::Packed) ? " not timed (no mkldnn)," : " not timed (no micro-kernel),");
      continue;
    }
    std::snprintf(buf, sizeof(buf), " %s %.3f ms%s,", engine_name(static_cast<Engine>(e)), times[e] * 1e3,
                  ok[e] ? "" : " WRONG");
    line += buf;
  }
  line += std::string(" prior ") + engine_name(prior) + ")";
  return pick;
}

}  // namespace

// GELU over columns [n0, n1) of C as the fuser's FFN-up epilogue does it (16-bit C widened,
// GELU'd and rounded back).
void gelu_columns(Mat c, int64_t m, int64_t n0, int64_t n1) {
  const VecOps& v = vec();
  for (int64_t r = 0; r < m; ++r) {
    void* p = offset(c, r, n0).p;
    if (c.dt == Dt::F32) {
      v.gelu(static_cast<float*>(p), n1 - n0);
    } else {
      float* s = scratch(0, n1 - n0);
      v.load(p, c.dt, s, n1 - n0);
      v.gelu(s, n1 - n0);
      v.store(s, p, c.dt, n1 - n0);
    }
  }
}

const char* engine_name(Engine engine) {
  switch (engine) {
    case Engine::F32:
      return "fp32";
    case Engine::Native16:
      return "native16";
    case Engine::Packed:
      return "packed";
    default:
      return "brgemm";
  }
}

Engine prior_engine(c10::ScalarType dtype) {
  if (dtype == at::kFloat) return Engine::F32;
  static const bool bf16 = cap("amx_bf16") || cap("avx512_bf16");
  static const bool fp16 = cap("amx_fp16") || cap("avx512_fp16");
  if (!(dtype == at::kBFloat16 ? bf16 : fp16)) return Engine::F32;
  // The packed engine runs the same oneDNN kernels as native16 without re-reading the weights'
  // plain layout on every call, with GELU fused: where it can run, it is the better guess.
  return packed_available(dtype) ? Engine::Packed : Engine::Native16;
}

int forced_engine(c10::ScalarType dtype) {
  if (dtype == at::kFloat) return static_cast<int>(Engine::F32);
  const char* env = std::getenv("C2C_CPU_GEMM");
  if (env == nullptr) return -1;
  if (std::strcmp(env, "fp32") == 0) return static_cast<int>(Engine::F32);
  if (std::strcmp(env, "native") == 0) return static_cast<int>(Engine::Native16);
  if (std::strcmp(env, "brgemm") == 0) return static_cast<int>(Engine::Brgemm);
  // Where oneDNN cannot run the dtype here, the packed engine falls back to native16.
  if (std::strcmp(env, "packed") == 0) return static_cast<int>(packed_available(dtype) ? Engine::Packed : Engine::Native16);
  return -1;  // "auto" or anything else
}

Engine choose_engine(c10::ScalarType dtype, int64_t tokens, int64_t hidden) {
  const int forced = forced_engine(dtype);
  if (forced >= 0) return static_cast<Engine>(forced);
  Chooser& ch = chooser();
  const auto key = std::make_tuple(static_cast<int>(dtype), token_class(tokens), hidden);
  std::lock_guard<std::mutex> lock(ch.mu);
  auto it = ch.chosen.find(key);
  if (it != ch.chosen.end()) return it->second;
  std::string line;
  const Engine e = measure(dtype, tokens, hidden, line);
  ch.chosen.emplace(key, e);
  ch.log.push_back(line);
  return e;
}

std::string engine_log(bool clear) {
  Chooser& ch = chooser();
  std::lock_guard<std::mutex> lock(ch.mu);
  std::string out;
  for (const auto& l : ch.log) out += l + "\n";
  if (clear) {
    ch.chosen.clear();
    ch.log.clear();
  }
  return out;
}

void gemm(Engine engine, int64_t m, int64_t n, int64_t k, Mat a, Mat w, Mat c, bool accumulate,
          c10::function_ref<void(int64_t, int64_t)> epilogue) {
  if (m == 0 || n == 0) return;
  // The 16-bit path gets dense A and C (see mm_block and the hid buffer in fuser.cpp): no
  // padding bytes between rows that a library kernel could read as part of a tile.
  TORCH_CHECK((engine != Engine::Native16 && engine != Engine::Packed) || (a.ld == k && c.ld == n), "c2c cpu: the ",
              engine_name(engine), " GEMM needs dense operands (A ld ", a.ld, " for K ", k, ", C ld ", c.ld, " for N ", n, ")");
  if (engine == Engine::Packed) {
    TORCH_CHECK(a.dt == w.dt && c.dt == w.dt && a.dt != Dt::F32, "c2c cpu: the packed engine takes 16-bit A, W and C");
    const at::Tensor pw = packed_weight(m, n, k, w);
    if (!pw.defined()) return gemm(Engine::Native16, m, n, k, a, w, c, accumulate, epilogue);  // not packed yet
    packed_run(m, n, k, a, pw, c, accumulate, false);
    if (epilogue) {
      const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (n + kAlign - 1) / kAlign));
      const int64_t per = ((n + parts - 1) / parts + kAlign - 1) / kAlign * kAlign;
      parallel_tasks(parts, [&](int64_t p) {
        const int64_t n0 = p * per, n1 = std::min(n, n0 + per);
        if (n0 < n1) epilogue(n0, n1);
      });
    }
    return;
  }
  if (engine == Engine::Brgemm) {
    TORCH_CHECK(a.dt == w.dt && a.dt != Dt::F32 && c.dt == Dt::F32, "c2c cpu: the brgemm engine takes 16-bit A and W, fp32 C");
    if (a.dt == Dt::BF16) {
      brgemm_gemm<at::BFloat16>(m, n, k, a, w, c, accumulate, epilogue);
    } else {
      brgemm_gemm<at::Half>(m, n, k, a, w, c, accumulate, epilogue);
    }
    return;
  }
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
    prof::Scope widen(prof::Widen);
    for (int64_t j = n0; j < n1; ++j) v.load(offset(w, j, 0).p, w.dt, buf.data() + (j - n0) * k, k);
    widen.stop();
    mm_block(m, n1 - n0, k, a, Mat{buf.data(), Dt::F32, k}, offset(c, 0, n0), accumulate);
    if (epilogue) epilogue(n0, n1);
  });
}

at::Tensor gemm_packed_out(int64_t m, int64_t n, int64_t k, Mat a, Mat w, bool gelu) {
  if (m == 0 || n == 0) return {};
  TORCH_CHECK(a.ld == k && a.dt == w.dt && a.dt != Dt::F32, "c2c cpu: the packed engine takes dense 16-bit A");
  const at::Tensor pw = packed_weight(m, n, k, w);
  if (!pw.defined()) return {};  // not packed yet
  at::Tensor out = packed_product(m, k, a, pw, gelu);
  TORCH_CHECK(out.is_contiguous() && out.size(0) == m && out.size(1) == n, "c2c cpu: unexpected oneDNN output");
  return out;
}


bool packed_available(c10::ScalarType dtype) {
  if (!packed_ops().ok || (dtype != at::kBFloat16 && dtype != at::kHalf)) return false;
  // oneDNN's 16-bit paths need CPU support torch checks at packing time (fp16: AVX512-FP16 or
  // AVX-NE-CONVERT; bf16: AVX-512): one probe per dtype, a refusal makes the engine unavailable.
  static const auto probe = [](c10::ScalarType st) {
    try {
      at::Tensor w = at::ones({16, 16}, at::TensorOptions().dtype(st));
      const Mat wm{w.data_ptr(), dt_of(st), 16};
      at::Tensor a = at::ones({2, 16}, at::TensorOptions().dtype(st)), c = at::empty({2, 16}, a.options());
      packed_run(2, 16, 16, Mat{a.data_ptr(), dt_of(st), 16}, pack_weight(2, 16, 16, wm), Mat{c.data_ptr(), dt_of(st), 16},
                 false, false);
      return c.to(at::kFloat).eq(16.f).all().item<bool>();
    } catch (const c10::Error&) {
      return false;
    }
  };
  static const bool bf16 = probe(at::kBFloat16), fp16 = probe(at::kHalf);
  return dtype == at::kBFloat16 ? bf16 : fp16;
}

std::string packed_cache_info(bool clear) {
  PackedCache& pc = packed_cache();
  std::lock_guard<std::mutex> lock(pc.mu);
  const std::string out = "entries=" + std::to_string(pc.map.size()) + " bytes=" + std::to_string(pc.bytes);
  if (clear) {
    pc.map.clear();
    pc.lru.clear();
    pc.seen.clear();
    pc.bytes = 0;
  }
  return out;
}

}  // namespace c2c::cpu
