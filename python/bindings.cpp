// The extension module c2c_kernels._C: the native op schemas, and the op layer's host-side
// helpers (its Python functions).
//
// Each backend registers its implementation of the ops for its dispatch key in its own file
// (python/cpu_ops.cpp, python/cuda_ops.cpp); arguments are validated in Python
// (c2c_kernels/ops.py) before these run, and the C++ side re-checks only what memory safety
// needs.
#include <Python.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <cstdint>
#include <exception>
#include <vector>

TORCH_LIBRARY(c2c_native, m) {
  // Entry i fuses sharer_caches[i] into receiver_caches[i] with fuser fusers[i] of the stacked
  // weights (the 14 tensors of c2c_kernels.FuserWeights, in order). In place.
  m.def(
      "fuse(Tensor(a!)[] receiver_caches, Tensor[] sharer_caches, Tensor receiver_slots, "
      "Tensor sharer_slots, Tensor[] weights, int[] fusers) -> ()");
  // The corrections without writing them: (projection [R, T, Ht*Dt], head_scale [R, T, Ht]), fp32.
  m.def(
      "project(Tensor[] receiver_caches, Tensor[] sharer_caches, Tensor receiver_slots, "
      "Tensor sharer_slots, Tensor[] weights, int[] fusers) -> (Tensor, Tensor)");
  // x += sum_j head_scale * projection over S sharers (projections[r * S + j]), in place.
  m.def(
      "merge(Tensor(a!)[] receiver_caches, Tensor receiver_slots, Tensor[] projections, "
      "Tensor[] head_scales) -> ()");
}

// ---- host-side helpers of the op layer -------------------------------------------------------
// Called once per op call, so written against the Python C API: tens of nanoseconds per tensor
// instead of the microseconds of reading the same attributes from Python.
//
// fingerprint() describes everything the op layer's argument checks read from the cache views
// and weights, so that a call whose description equals one already checked needs only its
// per-call checks (the slots). It is a description, not an identity: a view re-pointed with
// set_(), a resized storage or another dtype gives another description.

namespace {

// The dispatch keys of a plain dense CPU, CUDA or meta tensor (with or without autograd
// metadata, inference tensors included). Anything else (a Python subclass's or mode's key,
// functorch and functionalization wrappers, sparse, quantized, nested, conjugate or negative
// views, other devices) is left to the dispatcher and the full checks.
uint64_t plain_keys() {
  static const uint64_t keys =
      c10::DispatchKeySet({c10::DispatchKey::CPU, c10::DispatchKey::CUDA, c10::DispatchKey::Meta,
                           c10::DispatchKey::ADInplaceOrView, c10::DispatchKey::AutogradCPU,
                           c10::DispatchKey::AutogradCUDA, c10::DispatchKey::AutogradMeta,
                           c10::DispatchKey::AutocastCPU, c10::DispatchKey::AutocastCUDA})
          .raw_repr();
  return keys;
}

// A torch.Tensor (or nn.Parameter: the same object to C++) that is a plain strided tensor with a
// storage and no autograd requirement; nullptr otherwise.
const at::Tensor* plain(PyObject* obj) {
  if (!THPVariable_CheckExact(obj)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (!t.defined()) return nullptr;
  c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  // Every bit (functionality and backend) of the tensor's key set among the plain ones.
  if ((impl->key_set().raw_repr() & ~plain_keys()) != 0 || impl->layout() != c10::kStrided ||
      !impl->has_storage() || impl->requires_grad()) {
    return nullptr;
  }
  return &t;
}

// Appends one tensor's description; returns its address (what the hash mixes: equality is
// decided on the whole description).
int64_t put_tensor(std::vector<int64_t>& out, const at::Tensor& t) {
  c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  const c10::Device device = impl->device();
  const c10::IntArrayRef sizes = impl->sizes(), strides = impl->strides();
  const auto dim = static_cast<int64_t>(sizes.size());
  // The address the checks read (data_ptr()) and the storage it lies in: which storage, where
  // its memory starts and how large it is. Read without materializing copy-on-write storage.
  const c10::Storage& storage = impl->storage();
  const auto base = reinterpret_cast<int64_t>(storage.data_ptr().get());
  const int64_t address = base + impl->storage_offset() * static_cast<int64_t>(impl->itemsize());
  const size_t at = out.size();
  out.resize(at + 5 + 2 * dim);
  int64_t* w = out.data() + at;
  // dtype, device type and index, rank: one word.
  *w++ = (static_cast<int64_t>(impl->dtype().toScalarType()) << 32) |
         (static_cast<int64_t>(device.type()) << 16) | (static_cast<int64_t>(device.index() + 1) << 8) | dim;
  for (int64_t d = 0; d < dim; ++d) *w++ = sizes[d];
  for (int64_t d = 0; d < dim; ++d) *w++ = strides[d];
  *w++ = address;
  *w++ = reinterpret_cast<int64_t>(storage.unsafeGetStorageImpl());
  *w++ = base;
  *w++ = static_cast<int64_t>(storage.nbytes());
  return address;
}

// fingerprint(tensor_lists, ints, plain) -> (hash, bytes) | None
//   tensor_lists: a tuple of sequences of tensors, described in full;
//   ints: a sequence of Python ints, described by value;
//   plain: a tuple of tensors only required to be plain (the slots: new every call, and checked
//          by the caller every time).
// None when an item is not a plain tensor (or not an int): such calls take the full path.
PyObject* fingerprint_of(PyObject* lists, PyObject* ints, PyObject* plains);

PyObject* fingerprint(PyObject*, PyObject* args) {
  PyObject *lists, *ints, *plains;
  if (!PyArg_ParseTuple(args, "O!OO!", &PyTuple_Type, &lists, &ints, &PyTuple_Type, &plains)) return nullptr;
  try {
    return fingerprint_of(lists, ints, plains);
  } catch (const std::exception&) {  // a tensor c10 cannot describe plainly: the full path decides
    PyErr_Clear();
    Py_RETURN_NONE;
  }
}

// A new reference to PySequence_Fast(obj), released when it goes out of scope (also when a
// c10 error unwinds through fingerprint_of).
struct FastSequence {
  PyObject* seq;
  explicit FastSequence(PyObject* obj) : seq(PySequence_Fast(obj, "expected a sequence")) {}
  ~FastSequence() { Py_XDECREF(seq); }
  FastSequence(const FastSequence&) = delete;
  FastSequence& operator=(const FastSequence&) = delete;
};

PyObject* fingerprint_of(PyObject* lists, PyObject* ints, PyObject* plains) {
  thread_local std::vector<int64_t> words;
  words.clear();
  uint64_t h = 0x9E3779B97F4A7C15ull;
  const auto mix = [&h](int64_t v) { h = (h ^ static_cast<uint64_t>(v)) * 0xBF58476D1CE4E5B9ull; };
  const Py_ssize_t num_lists = PyTuple_GET_SIZE(lists);
  for (Py_ssize_t l = 0; l <= num_lists; ++l) {
    const bool tensors = l < num_lists;
    const FastSequence fast(tensors ? PyTuple_GET_ITEM(lists, l) : ints);
    if (fast.seq == nullptr) {
      PyErr_Clear();
      Py_RETURN_NONE;
    }
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast.seq);
    PyObject** items = PySequence_Fast_ITEMS(fast.seq);
    words.push_back(-1 - n);  // a list and its length
    mix(n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (tensors) {
        const at::Tensor* t = plain(items[i]);
        if (t == nullptr) Py_RETURN_NONE;
        mix(put_tensor(words, *t));
        continue;
      }
      int overflow = 0;
      // bool and other int-likes are left to the full checks.
      const long long v = PyLong_CheckExact(items[i]) ? PyLong_AsLongLongAndOverflow(items[i], &overflow) : -1;
      if (!PyLong_CheckExact(items[i]) || overflow || (v == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        Py_RETURN_NONE;
      }
      words.push_back(v);
      mix(v);
    }
  }
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(plains); ++i) {
    if (plain(PyTuple_GET_ITEM(plains, i)) == nullptr) Py_RETURN_NONE;
  }
  PyObject* key = PyBytes_FromStringAndSize(reinterpret_cast<const char*>(words.data()),
                                            static_cast<Py_ssize_t>(words.size() * sizeof(int64_t)));
  if (key == nullptr) return nullptr;
  PyObject* hash = PyLong_FromUnsignedLongLong(h);
  if (hash == nullptr) {
    Py_DECREF(key);
    return nullptr;
  }
  PyObject* out = PyTuple_Pack(2, hash, key);
  Py_DECREF(hash);
  Py_DECREF(key);
  return out;
}

// Whether nothing in this thread's dispatcher state asks for more than the op's kernel: no
// Python dispatch mode, functorch transform, functionalization or JIT tracer (each adds a key
// to the thread-local include set).
PyObject* dispatch_is_plain(PyObject*, PyObject*) {
  const uint64_t included = c10::impl::tls_local_dispatch_key_set().included_.raw_repr();
  if ((included & ~c10::default_included_set.raw_repr()) == 0) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

PyMethodDef methods[] = {
    {"fingerprint", fingerprint, METH_VARARGS,
     "fingerprint(tensor_lists, ints, plain) -> (hash, bytes) or None: what the op layer's checks read."},
    {"dispatch_is_plain", dispatch_is_plain, METH_NOARGS,
     "True when no dispatch mode, functorch transform, functionalization or tracer is active in this thread."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

// Python imports c2c_kernels._C to run the registrations above; its functions are the helpers.
static PyModuleDef c2c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&c2c_module); }
