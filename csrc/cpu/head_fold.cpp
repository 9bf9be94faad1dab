#include "cpu/head_fold.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/intrusive_ptr.h>

#include <cstdlib>
#include <cstring>
#include <list>
#include <mutex>
#include <tuple>
#include <vector>

#include "fuser_weights.h"

namespace c2c::cpu {
namespace {

// One weight stack's identity: its storage, where the stack starts in it, its shape, and its
// version counter (bumped by every in-place write that goes through autograd's bookkeeping,
// also under no_grad: copy_, mul_, an optimizer step).
struct StackId {
  const void* storage;
  const void* data;
  std::vector<int64_t> sizes, strides;
  int dtype;
  int64_t version;
  auto tie() const { return std::tie(storage, data, sizes, strides, dtype, version); }
  bool operator==(const StackId& o) const { return tie() == o.tie(); }
};

StackId stack_id(const at::Tensor& t) {
  return {t.storage().unsafeGetStorageImpl(), t.data_ptr(), t.sizes().vec(), t.strides().vec(),
          static_cast<int>(t.scalar_type()), t._version()};
}

c10::weak_intrusive_ptr<c10::StorageImpl> weak_storage(const at::Tensor& t) {
  return c10::weak_intrusive_ptr<c10::StorageImpl>(
      c10::intrusive_ptr<c10::StorageImpl>::unsafe_reclaim_from_nonowning(t.storage().unsafeGetStorageImpl()));
}

// The folds of one pair of stacks (W_head, W2h): V for every fuser, filled as fusers are
// first run. The storages are held weakly: the cache never keeps a checkpoint alive, and a
// freed storage's address cannot be matched by a new one while the weak reference holds it.
struct Entry {
  StackId head, w2;
  c10::weak_intrusive_ptr<c10::StorageImpl> head_storage, w2_storage;
  at::Tensor fold;          // [P, Ht, H] fp32
  std::vector<char> done;   // per fuser
  bool matches(const StackId& h, const StackId& w, const at::Tensor& ht, const at::Tensor& wt) const {
    return head == h && w2 == w && !head_storage.expired() && !w2_storage.expired() &&
           head_storage._unsafe_get_target() == ht.storage().unsafeGetStorageImpl() &&
           w2_storage._unsafe_get_target() == wt.storage().unsafeGetStorageImpl();
  }
};

// A handful of checkpoints at a time (a serving process holds one or two); least recently
// used first out.
constexpr size_t kMaxEntries = 8;
std::mutex mu;
std::list<Entry>& entries() {
  static std::list<Entry> e;  // most recently used first
  return e;
}

bool cacheable(const at::Tensor& t) { return t.defined() && t.has_storage() && !t.is_inference(); }

void compute(const StackedWeights& w, int64_t f, const float* w_head, const at::Tensor& out) {
  const int64_t H = w.hidden, Ht = w.receiver_heads;
  const at::Tensor head = at::from_blob(const_cast<float*>(w_head), {Ht, H}, at::TensorOptions().dtype(at::kFloat));
  const at::Tensor w2 = at::from_blob(const_cast<char*>(w.at(kHeadW2, f)), {H, H},
                                      at::TensorOptions().dtype(w.dtype)).to(at::kFloat);
  at::mm_out(const_cast<at::Tensor&>(out), head, w2);  // V[h, i] = sum_o W_head[h, o] W2h[o, i]
}

}  // namespace

bool head_fold_enabled() {
  const char* v = std::getenv("C2C_CPU_HEAD_FOLD");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

at::Tensor head_fold(const StackedWeights& w, int64_t f, const float* w_head, int64_t tokens) {
  if (!head_fold_enabled()) return {};
  const int64_t P = w.fusers, H = w.hidden, Ht = w.receiver_heads;
  const at::Tensor& ht = w.t[kWHead];
  const at::Tensor& wt = w.t[kHeadW2];
  if (!cacheable(ht) || !cacheable(wt)) {
    if (tokens < 2 * Ht) return {};
    at::Tensor v = at::empty({Ht, H}, at::TensorOptions().dtype(at::kFloat));
    compute(w, f, w_head, v);
    return v;
  }
  const StackId hid = stack_id(ht), wid = stack_id(wt);
  std::lock_guard<std::mutex> lock(mu);
  std::list<Entry>& es = entries();
  auto it = es.begin();
  for (; it != es.end(); ++it) {
    if (it->matches(hid, wid, ht, wt)) break;
  }
  if (it == es.end()) {
    // Drop entries whose storages are gone and older versions of these stacks.
    for (auto e = es.begin(); e != es.end();) {
      const bool stale = e->head_storage.expired() || e->w2_storage.expired() ||
                         (e->head.storage == hid.storage && e->head.data == hid.data) ||
                         (e->w2.storage == wid.storage && e->w2.data == wid.data);
      e = stale ? es.erase(e) : std::next(e);
    }
    if (es.size() >= kMaxEntries) es.pop_back();
    // Normal tensors even under torch.inference_mode: the folds of later fusers are written
    // into this one by later calls, which may run outside it.
    const c10::InferenceMode normal(false);
    es.push_front(Entry{hid, wid, weak_storage(ht), weak_storage(wt),
                        at::empty({P, Ht, H}, at::TensorOptions().dtype(at::kFloat)), std::vector<char>(P, 0)});
    it = es.begin();
  } else if (it != es.begin()) {
    es.splice(es.begin(), es, it);
    it = es.begin();
  }
  at::Tensor v = it->fold[f];
  if (!it->done[f]) {
    compute(w, f, w_head, v);
    it->done[f] = 1;
  }
  return v;
}

std::string head_fold_info(bool clear) {
  std::lock_guard<std::mutex> lock(mu);
  std::list<Entry>& es = entries();
  int64_t bytes = 0, fusers = 0;
  for (const Entry& e : es) {
    bytes += e.fold.numel() * 4;
    for (char d : e.done) fusers += d;
  }
  const std::string out = "entries=" + std::to_string(es.size()) + " bytes=" + std::to_string(bytes) +
                          " fusers=" + std::to_string(fusers);
  if (clear) es.clear();
  return out;
}

}  // namespace c2c::cpu
