// The fuser pipeline of the CPU backend (fuser.md), one fuser at a time over all valid tokens.
//
//   gather      s, x rows through the slots (any strides) into dense [M, Ks], [M, Kt]
//   input       u = s W_in_s^T + x W_in_r^T (+ b_in)            -> row pass: bias, RMS, norm
//   FFN_1       h = gelu(n W1^T) (GELU while each column block is hot), u += h W2^T
//                                                               -> row pass: RMS, both norms
//   head        w = u + gelu(n_h Wh1^T) Wh2^T; scale = G sigmoid(w W_head^T + b_head)  (one pass)
//   proj blocks u += gelu(n W1^T) W2^T                          -> row pass: RMS, next norm
//   output      y = u W_out^T + b_out; x += scale * y per head, written to the cache (one pass)
//
// Engine::F32 keeps every activation fp32 and accumulates the FFN outputs straight into the
// residual stream u (GEMM beta = 1). Engine::Native16 feeds the GEMMs 16-bit activations and
// keeps the residual stream fp32 (outputs come back 16-bit, added in the row passes).
#include "cpu/fuser.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <utility>

namespace c2c::cpu {

constexpr float kRmsEps = 1e-6f;

StackedWeights::StackedWeights(const std::vector<at::Tensor>& weights) : t(weights) {
  TORCH_CHECK(t.size() == 14, "c2c cpu: expected the 14 stacked FuserWeights tensors, got ", t.size());
  TORCH_CHECK(t[0].dim() == 3 && t[1].dim() == 3 && t[4].dim() == 4 && t[9].dim() == 3 && t[11].dim() == 3,
              "c2c cpu: malformed FuserWeights");
  fusers = t[0].size(0);
  hidden = t[0].size(1);
  sharer_width = t[0].size(2);
  receiver_width = t[1].size(2);
  blocks = t[4].size(1);
  intermediate = t[4].size(2);
  receiver_heads = t[9].size(1);
  dtype = t[0].scalar_type();
  for (size_t i = 0; i < 13; ++i) {
    TORCH_CHECK(t[i].scalar_type() == dtype && t[i].device().is_cpu(), "c2c cpu: weights must share one dtype on CPU");
    TORCH_CHECK(t[i].size(0) == fusers, "c2c cpu: every weight stack needs ", fusers, " fusers");
  }
  TORCH_CHECK(t[13].scalar_type() == at::kFloat && t[13].dim() == 1 && t[13].size(0) == fusers,
              "c2c cpu: gate_logit must be float32 [fusers]");
  TORCH_CHECK(blocks >= 2 && receiver_width % receiver_heads == 0, "c2c cpu: malformed FuserWeights (num_layers >= 3)");
  // Fusers are addressed by pointer arithmetic below: each stack must be dense. Stacks from
  // load_checkpoint, random_weights and FuserWeights.select are; anything else is copied here.
  for (size_t i = 0; i < 13; ++i) {
    if (!t[i].is_contiguous()) t[i] = t[i].contiguous();
  }
}

const char* StackedWeights::at(size_t i, int64_t fuser, int64_t block) const {
  const at::Tensor& s = t[i];
  return static_cast<const char*>(s.data_ptr()) + (fuser * s.stride(0) + block * (s.dim() == 4 ? s.stride(1) : 0)) *
                                                      static_cast<int64_t>(s.element_size());
}

bool StackedWeights::gate_open(int64_t fuser) const {
  return t[13].data_ptr<float>()[fuser * t[13].stride(0)] > 0.f;
}

namespace {

// The small parameters of one fuser (norm scales, biases, head weights) as fp32: pointers
// into the stacks for fp32 weights, widened copies for 16-bit ones.
struct SmallParams {
  std::vector<float> store;
  const float *b_in, *ffn_norm, *head_norm, *w_head, *b_head, *b_out;

  SmallParams(const StackedWeights& w, int64_t f) {
    const int64_t H = w.hidden, B = w.blocks, Ht = w.receiver_heads, Kt = w.receiver_width;
    const Dt dt = dt_of(w.dtype);
    // (stack index, element count) in the order of the members above.
    const std::pair<size_t, int64_t> parts[] = {{2, H}, {3, B * H}, {6, H}, {9, Ht * H}, {10, Ht}, {12, Kt}};
    const float** dst[] = {&b_in, &ffn_norm, &head_norm, &w_head, &b_head, &b_out};
    if (dt != Dt::F32) {
      int64_t total = 0;
      for (const auto& p : parts) total += p.second;
      store.resize(total);
    }
    int64_t off = 0;
    for (size_t i = 0; i < 6; ++i) {
      const void* src = w.at(parts[i].first, f);
      if (dt == Dt::F32) {
        *dst[i] = static_cast<const float*>(src);
      } else {
        vec().load(src, dt, store.data() + off, parts[i].second);
        *dst[i] = store.data() + off;
        off += parts[i].second;
      }
    }
  }
};

at::Tensor& buffer(std::vector<at::Tensor>& ws, size_t i, int64_t rows, int64_t cols, c10::ScalarType dtype) {
  if (ws.size() <= i) ws.resize(i + 1);
  at::Tensor& b = ws[i];
  if (!b.defined() || b.scalar_type() != dtype || b.numel() < rows * cols) {
    b = at::empty({rows * cols}, at::TensorOptions().dtype(dtype));
  }
  return b;
}

// A row of a buffer as fp32: the row itself when it is fp32, else widened into scratch `which`.
inline float* row_f32(Mat m, int64_t row, int64_t n, int which) {
  void* p = offset(m, row, 0).p;
  if (m.dt == Dt::F32) return static_cast<float*>(p);
  float* s = scratch(which, n);
  vec().load(p, m.dt, s, n);
  return s;
}

// out row = z * rsqrt(mean(z^2) + eps) * scale, written in out's dtype.
inline void norm_into(const float* z, float r, const float* scale, Mat out, int64_t row, int64_t n) {
  void* p = offset(out, row, 0).p;
  if (out.dt == Dt::F32) {
    vec().scale_mul(z, r, scale, static_cast<float*>(p), n);
  } else {
    float* s = scratch(3, n);
    vec().scale_mul(z, r, scale, s, n);
    vec().store(s, p, out.dt, n);
  }
}

inline float rms_inv(float sum_sq, int64_t n) { return 1.f / std::sqrt(sum_sq / static_cast<float>(n) + kRmsEps); }

}  // namespace

void run_fuser(const StackedWeights& w, int64_t f, Engine engine, const at::Tensor& receiver,
               const at::Tensor& sharer, const Tokens& tokens, const Sink& sink, std::vector<at::Tensor>& ws) {
  const int64_t M = tokens.size();
  if (M == 0) return;
  const int64_t H = w.hidden, I = w.intermediate, B = w.blocks, Ks = w.sharer_width, Kt = w.receiver_width;
  const int64_t Ht = w.receiver_heads, Dh = Kt / Ht;
  const Dt cdt = dt_of(w.dtype);
  const bool f32 = engine == Engine::F32;
  const Dt ad = f32 ? Dt::F32 : cdt;  // dtype of GEMM inputs and outputs
  const c10::ScalarType ast = f32 ? at::kFloat : w.dtype;
  const VecOps& v = vec();

  // Weights of fuser f: row-major matrices [out, in] (leading dimension = in).
  auto mat = [&](size_t i, int64_t ld, int64_t block = 0) {
    return Mat{const_cast<char*>(w.at(i, f, block)), cdt, ld};
  };
  const Mat w_in_s = mat(0, Ks), w_in_r = mat(1, Kt), head_w1 = mat(7, H), head_w2 = mat(8, H), w_out = mat(11, H);
  auto w1 = [&](int64_t b) { return mat(4, H, b); };
  auto w2 = [&](int64_t b) { return mat(5, I, b); };
  const SmallParams sp(w, f);
  const float gate = w.gate_open(f) ? 1.f : 0.f;
  const float* b_in_p = sp.b_in;
  const float* head_norm_p = sp.head_norm;
  const float* w_head_p = sp.w_head;
  const float* b_head_p = sp.b_head;
  const float* b_out_p = sp.b_out;
  auto norm_p = [&](int64_t b) { return sp.ffn_norm + b * H; };

  // Buffers (reused across fusers of a call).
  const Mat gs{buffer(ws, 0, M, Ks, ast).data_ptr(), ad, Ks};
  const Mat gx{buffer(ws, 1, M, Kt, ast).data_ptr(), ad, Kt};
  float* u = buffer(ws, 2, M, H, at::kFloat).data_ptr<float>();
  const Mat U{u, Dt::F32, H};
  const Mat na{buffer(ws, 3, M, H, ast).data_ptr(), ad, H};
  const Mat nb{buffer(ws, 4, M, H, ast).data_ptr(), ad, H};
  const int64_t hid_w = std::max(I, H);
  const Mat hid{buffer(ws, 5, M, hid_w, ast).data_ptr(), ad, hid_w};
  const Mat O{buffer(ws, 6, M, H, ast).data_ptr(), ad, H};
  const Mat Y{buffer(ws, 7, M, Kt, ast).data_ptr(), ad, Kt};
  float* scale = buffer(ws, 8, M, Ht, at::kFloat).data_ptr<float>();

  // GELU on a finished column block of hid (runs inside the GEMM's thread).
  auto gelu_cols = [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; ++m) {
      void* p = offset(hid, m, n0).p;
      if (ad == Dt::F32) {
        v.gelu(static_cast<float*>(p), n1 - n0);
      } else {
        float* s = scratch(0, n1 - n0);
        v.load(p, ad, s, n1 - n0);
        v.gelu(s, n1 - n0);
        v.store(s, p, ad, n1 - n0);
      }
    }
  };

  // 1. Gather the sharer and receiver rows of the valid tokens.
  const CacheView<char> sv = byte_view(sharer), rv = byte_view(receiver);
  const int64_t es = dt_size(cdt);
  for_rows(M, [&](int64_t m) {
    for (int32_t h = 0; h < sv.heads; ++h) {
      const char* src = sv.row(tokens.sharer[m], h);
      void* dst = offset(gs, m, int64_t{h} * sv.head_dim).p;
      if (ad == cdt) std::memcpy(dst, src, sv.head_dim * es); else v.load(src, cdt, static_cast<float*>(dst), sv.head_dim);
    }
    for (int32_t h = 0; h < rv.heads; ++h) {
      const char* src = rv.row(tokens.receiver[m], h);
      void* dst = offset(gx, m, int64_t{h} * rv.head_dim).p;
      if (ad == cdt) std::memcpy(dst, src, rv.head_dim * es); else v.load(src, cdt, static_cast<float*>(dst), rv.head_dim);
    }
  });

  // 2. Input Linear; row pass: u = . + b_in, n = norm_0(u).
  const Mat in_out = f32 ? U : O;
  gemm(engine, M, H, Ks, gs, w_in_s, in_out, false);
  gemm(engine, M, H, Kt, gx, w_in_r, in_out, true);
  for_rows(M, [&](int64_t m) {
    float* ur = u + m * H;
    if (!f32) v.load(offset(O, m, 0).p, ad, ur, H);
    const float r = rms_inv(v.add_sum_sq(ur, b_in_p, H), H);
    norm_into(ur, r, norm_p(0), na, m, H);
  });

  // One FFN block on u whose normed input is `n`; the W2 product lands in u (F32) or O.
  auto ffn = [&](Mat n, const Mat& wa, const Mat& wb, int64_t inner) {
    gemm(engine, M, inner, H, n, wa, hid, false, gelu_cols);
    gemm(engine, M, H, inner, hid, wb, f32 ? U : O, f32);
  };
  // u (+= O for Native16), returns sum of squares of the new u row.
  auto residual = [&](int64_t m) {
    float* ur = u + m * H;
    if (f32) return v.sum_sq(ur, H);
    return v.add_sum_sq(ur, row_f32(O, m, H, 1), H);
  };

  // 3. FFN_1; row pass: both branch norms.
  ffn(na, w1(0), w2(0), I);
  for_rows(M, [&](int64_t m) {
    const float r = rms_inv(residual(m), H);
    const float* ur = u + m * H;
    norm_into(ur, r, head_norm_p, na, m, H);
    if (B > 1) norm_into(ur, r, norm_p(1), nb, m, H);
  });

  // 4. Weight branch: w = u + FFN_w; a = w W_head^T + b_head; scale = G sigmoid(a).
  gemm(engine, M, H, H, na, head_w1, hid, false, gelu_cols);
  gemm(engine, M, H, H, hid, head_w2, O, false);
  for_rows(M, [&](int64_t m) {
    float* wr = scratch(2, H);
    if (f32) std::memcpy(wr, offset(O, m, 0).p, H * sizeof(float)); else v.load(offset(O, m, 0).p, ad, wr, H);
    v.add(wr, u + m * H, H);
    for (int64_t h = 0; h < Ht; ++h) {
      const float a = v.dot(wr, w_head_p + h * H, H) + b_head_p[h];
      scale[m * Ht + h] = gate / (1.f + std::exp(-a));
    }
  });

  // 5. Projection blocks; row pass: the next norm (or, for Native16, u as the 16-bit input of W_out).
  for (int64_t b = 1; b < B; ++b) {
    ffn(nb, w1(b), w2(b), I);
    const bool last = b == B - 1;
    if (f32 && last) break;  // u is already the fp32 input of W_out
    for_rows(M, [&](int64_t m) {
      const float* ur = u + m * H;
      if (last) {
        v.add(u + m * H, row_f32(O, m, H, 1), H);
        v.store(ur, offset(nb, m, 0).p, ad, H);
      } else {
        norm_into(ur, rms_inv(residual(m), H), norm_p(b + 1), nb, m, H);
      }
    });
  }

  // 6. Output Linear and the gated merge (or the fp32 corrections for project).
  gemm(engine, M, Kt, H, f32 ? U : nb, w_out, Y, false);
  for_rows(M, [&](int64_t m) {
    float* yr = row_f32(Y, m, Kt, 0);
    v.add(yr, b_out_p, Kt);
    const float* sr = scale + m * Ht;
    if (sink.receiver == nullptr) {
      const int64_t t = tokens.index[m];
      std::memcpy(sink.projection + t * Kt, yr, Kt * sizeof(float));
      std::memcpy(sink.head_scale + t * Ht, sr, Ht * sizeof(float));
      return;
    }
    float* xr = row_f32(gx, m, Kt, 1);
    for (int32_t h = 0; h < rv.heads; ++h) {
      float* xh = xr + int64_t{h} * Dh;
      v.axpy(sr[h], yr + int64_t{h} * Dh, xh, Dh);
      v.store(xh, rv.row(tokens.receiver[m], h), cdt, Dh);
    }
  });
}

}  // namespace c2c::cpu
