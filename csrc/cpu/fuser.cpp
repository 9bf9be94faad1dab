// The fuser pipeline of the CPU backend (docs/fuser.md), one fuser at a time over all valid
// tokens. Each stage is one method of FuserRun, named as the Triton stage files
// (c2c_kernels/backends/triton) and the CUDA backend's Pipeline (csrc/cuda/fuse.cu):
//
//   gather             s, x rows through the slots (any strides) into dense [M, Ks], [M, Kt]
//   input_gemm         u = s W_in_s^T + x W_in_r^T (+ b_in)      -> row pass: bias, RMS, norm
//   ffn_1              h = gelu(n W1^T) (GELU while each column block is hot), u += h W2^T
//                                                                -> row pass: RMS, both norms
//   weight_branch      g = gelu(n_h Wh1^T); scale = G sigmoid(u W_head^T + g V^T + b_head), with
//                      V = W_head Wh2 folded once per checkpoint (head_fold.h), so the
//                      [M, H] x [H, H] Wh2 GEMM is not run (unfolded: w = u + g Wh2^T first)
//   projection_blocks  u += gelu(n W1^T) W2^T                    -> row pass: RMS, next norm
//   output             y = u W_out^T + b_out; x += scale * y per head, written to the cache
//
// Engine::F32 keeps every activation fp32 and accumulates the FFN outputs straight into the
// residual stream u (GEMM beta = 1). Engine::Native16 feeds the GEMMs 16-bit activations and
// keeps the residual stream fp32 (outputs come back 16-bit, added in the row passes).
// Engine::Brgemm feeds 16-bit activations and accumulates fp32 outputs into u, as F32 does.
// Engine::Packed is laid out as Native16 (16-bit GEMM inputs and outputs), GELU fused.
#include "cpu/fuser.h"

#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <utility>

#include "cpu/head_fold.h"
#include "cpu/profile.h"
#include "fuser_weights.h"

namespace c2c::cpu {

StackedWeights::StackedWeights(const std::vector<at::Tensor>& weights) : t(weights) {
  TORCH_CHECK(t.size() == kNumWeights, "c2c cpu: expected the ", int(kNumWeights),
              " stacked FuserWeights tensors, got ", t.size());
  for (int i = 0; i < kNumWeights; ++i) {
    TORCH_CHECK(t[i].dim() == kWeightRank[i], "c2c cpu: malformed FuserWeights (weights.", kWeightNames[i], ")");
  }
  fusers = t[kWInSharer].size(0);
  hidden = t[kWInSharer].size(1);
  sharer_width = t[kWInSharer].size(2);
  receiver_width = t[kWInReceiver].size(2);
  blocks = t[kFfnW1].size(1);
  intermediate = t[kFfnW1].size(2);
  receiver_heads = t[kWHead].size(1);
  dtype = t[kWInSharer].scalar_type();
  for (int i = 0; i < kNumWeights; ++i) {
    if (kWeightFp32[i]) {
      TORCH_CHECK(t[i].scalar_type() == at::kFloat && t[i].device().is_cpu() && t[i].size(0) == fusers, "c2c cpu: weights.",
                  kWeightNames[i], " must be float32 [fusers]");
      continue;
    }
    TORCH_CHECK(t[i].scalar_type() == dtype && t[i].device().is_cpu(), "c2c cpu: weights must share one dtype on CPU");
    TORCH_CHECK(t[i].size(0) == fusers, "c2c cpu: every weight stack needs ", fusers, " fusers");
  }
  TORCH_CHECK(blocks >= 2 && receiver_width % receiver_heads == 0, "c2c cpu: malformed FuserWeights (num_layers >= 3)");
  // Fusers are addressed by pointer arithmetic below: each stack must be dense. Stacks from
  // load_checkpoint and random_weights are; anything else is copied here. (The fp32 gate
  // logits are read with their own stride.)
  for (int i = 0; i < kNumWeights; ++i) {
    if (!kWeightFp32[i] && !t[i].is_contiguous()) t[i] = t[i].contiguous();
  }
}

const char* StackedWeights::at(size_t i, int64_t fuser, int64_t block) const {
  const at::Tensor& s = t[i];
  return static_cast<const char*>(s.data_ptr()) + (fuser * s.stride(0) + block * (s.dim() == 4 ? s.stride(1) : 0)) *
                                                      static_cast<int64_t>(s.element_size());
}

bool StackedWeights::gate_open(int64_t fuser) const {
  return t[kGateLogit].data_ptr<float>()[fuser * t[kGateLogit].stride(0)] > 0.f;
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
    // (stack, element count) in the order of the members above.
    const std::pair<size_t, int64_t> parts[] = {{kBIn, H},      {kFfnNorm, B * H}, {kHeadNorm, H},
                                                {kWHead, Ht * H}, {kBHead, Ht},     {kBOut, Kt}};
    const float** dst[] = {&b_in, &ffn_norm, &head_norm, &w_head, &b_head, &b_out};
    if (dt != Dt::F32) {
      int64_t total = 0;
      for (const auto& p : parts) total += p.second;
      store.resize(total);
      poison(store.data(), total);
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

// Workspace i with room for rows x cols elements (uninitialised; NaN when poisoning, also
// when it is reused, since a stale value from an earlier fuser would hide a missing write).
at::Tensor& buffer(std::vector<at::Tensor>& ws, size_t i, int64_t rows, int64_t cols, c10::ScalarType dtype) {
  if (ws.size() <= i) ws.resize(i + 1);
  at::Tensor& b = ws[i];
  if (!b.defined() || b.scalar_type() != dtype || b.numel() < rows * cols) {
    // A normal tensor even when the call runs under torch.inference_mode: the workspace
    // outlives the call, and a later call outside it poisons it in place (fill_).
    const c10::InferenceMode normal(false);
    b = at::empty({rows * cols}, at::TensorOptions().dtype(dtype));
  }
  if (poisoning()) b.fill_(std::numeric_limits<float>::quiet_NaN());
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

// One fuser over the M valid tokens of a call: its weights, the activation buffers and the
// stages, in the order run_fuser calls them.
class FuserRun {
 public:
  FuserRun(const StackedWeights& w, int64_t f, Engine engine, const Tokens& tokens, std::vector<at::Tensor>& ws)
      : w_(w), f_(f), engine_(engine), tokens_(tokens), M(tokens.size()), H(w.hidden), I(w.intermediate),
        B(w.blocks), Ks(w.sharer_width), Kt(w.receiver_width), Ht(w.receiver_heads), Dh(Kt / Ht),
        cdt(dt_of(w.dtype)), ad(a_dtype(engine, cdt)), cd(c_dtype(engine, cdt)), f32(ad == Dt::F32),
        acc(cd == Dt::F32), sp(w, f), fold(head_fold(w, f, sp.w_head, M)), gate(w.gate_open(f) ? 1.f : 0.f) {
    const c10::ScalarType ast = f32 ? at::kFloat : w.dtype;  // dtype of GEMM inputs
    const c10::ScalarType cst = acc ? at::kFloat : w.dtype;  // dtype of GEMM outputs
    // Buffers (reused across fusers of a call).
    gs = Mat{buffer(ws, 0, M, Ks, ast).data_ptr(), ad, Ks};
    gx = Mat{buffer(ws, 1, M, Kt, ast).data_ptr(), ad, Kt};
    u = buffer(ws, 2, M, H, at::kFloat).data_ptr<float>();
    U = Mat{u, Dt::F32, H};
    na = Mat{buffer(ws, 3, M, H, ast).data_ptr(), ad, H};
    nb = Mat{buffer(ws, 4, M, H, ast).data_ptr(), ad, H};
    // The hidden activations of the FFN blocks ([M, I]) and of the head branch ([M, H]) share
    // one buffer, each stored densely (leading dimension = its own width). A GEMM input with
    // unwritten padding columns (ld > K) is a trap: 16-bit oneDNN kernels on AMX read whole
    // K tiles of A, past a row's last column, and a NaN there spreads into the result.
    void* const hid_p = buffer(ws, 5, M, std::max(I, H), ast).data_ptr();
    hid_ffn = Mat{hid_p, ad, I};
    hid_head = Mat{hid_p, ad, H};
    O = Mat{buffer(ws, 6, M, H, cst).data_ptr(), cd, H};
    Y = Mat{buffer(ws, 7, M, Kt, cst).data_ptr(), cd, Kt};
    scale = buffer(ws, 8, M, Ht, at::kFloat).data_ptr<float>();
    if (acc && !f32) {
      // Brgemm: fp32 outputs of the up-projections, GELU'd into the 16-bit hid by the epilogue.
      void* const hid32_p = buffer(ws, 9, M, std::max(I, H), at::kFloat).data_ptr();
      hid_ffn32 = Mat{hid32_p, Dt::F32, I};
      hid_head32 = Mat{hid32_p, Dt::F32, H};
    }
  }

  // The sharer and receiver rows of the valid tokens.
  void gather(const CacheView<char>& sv, const CacheView<char>& rv) {
    const prof::Scope scope(prof::Gather);
    const VecOps& v = vec();
    const int64_t es = dt_size(cdt);
    for_rows(M, [&](int64_t m) {
      for (int32_t h = 0; h < sv.heads; ++h) {
        const char* src = sv.row(tokens_.sharer[m], h);
        void* dst = offset(gs, m, int64_t{h} * sv.head_dim).p;
        if (ad == cdt) std::memcpy(dst, src, sv.head_dim * es); else v.load(src, cdt, static_cast<float*>(dst), sv.head_dim);
      }
      for (int32_t h = 0; h < rv.heads; ++h) {
        const char* src = rv.row(tokens_.receiver[m], h);
        void* dst = offset(gx, m, int64_t{h} * rv.head_dim).p;
        if (ad == cdt) std::memcpy(dst, src, rv.head_dim * es); else v.load(src, cdt, static_cast<float*>(dst), rv.head_dim);
      }
    });
  }

  // Input Linear; row pass: u = . + b_in, na = norm_0(u).
  void input_gemm() {
    const VecOps& v = vec();
    {
      const prof::Scope scope(prof::GemmInput);
      if (acc || !packed_into(O, H, Ks, gs, mat(kWInSharer, Ks), false)) {
        gemm(engine_, M, H, Ks, gs, mat(kWInSharer, Ks), acc ? U : O, false);
      }
      gemm(engine_, M, H, Kt, gx, mat(kWInReceiver, Kt), acc ? U : O, true);
    }
    const prof::Scope scope(prof::Norms);
    for_rows(M, [&](int64_t m) {
      float* ur = u + m * H;
      if (!acc) v.load(offset(O, m, 0).p, cd, ur, H);
      const float r = rms_inv(v.add_sum_sq(ur, sp.b_in, H), H);
      norm_into(ur, r, ffn_norm(0), na, m, H);
    });
  }

  // FFN_1; row pass: both branch norms (na = head_norm(u), nb = ffn_norm_1(u)).
  void ffn_1() {
    ffn_block(na, 0);
    const prof::Scope scope(prof::Norms);
    for_rows(M, [&](int64_t m) {
      const float r = rms_inv(residual(m), H);
      const float* ur = u + m * H;
      norm_into(ur, r, sp.head_norm, na, m, H);
      if (B > 1) norm_into(ur, r, ffn_norm(1), nb, m, H);
    });
  }

  // Weight branch: w = u + FFN_w; a = w W_head^T + b_head; scale = G sigmoid(a). Folded:
  // a = u W_head^T + g V^T + b_head with g the GELU'd hidden row (as the Wh2 GEMM would read it).
  void weight_branch() {
    const VecOps& v = vec();
    {
      const prof::Scope scope(prof::GemmUp);
      up_gemm(na, mat(kHeadW1, H), H, hid_head, hid_head32);
    }
    if (fold.defined()) {
      // Blocks of kRowGrain tokens: u and g rows (g widened to fp32 once: the F32 engine's
      // hidden rows and Brgemm's fp32 GELU outputs are used as they are) against W_head and V.
      const prof::Scope scope(prof::HeadLogits);
      const float* vf = fold.data_ptr<float>();
      const bool g32 = hid_head.dt == Dt::F32 || acc;
      const Mat g = hid_head.dt == Dt::F32 ? hid_head : acc ? hid_head32 : hid_head;
      parallel_tasks((M + kRowGrain - 1) / kRowGrain, [&](int64_t task) {
        const int64_t m0 = task * kRowGrain, rows = std::min(kRowGrain, M - m0);
        float* lu = scratch(0, rows * Ht);
        float* lg = scratch(1, rows * Ht);
        float* gr = static_cast<float*>(offset(g, m0, 0).p);
        if (!g32) {
          gr = scratch(2, rows * H);
          for (int64_t r = 0; r < rows; ++r) v.load(offset(hid_head, m0 + r, 0).p, ad, gr + r * H, H);
        }
        v.row_dots(u + m0 * H, H, rows, sp.w_head, Ht, H, lu);
        v.row_dots(gr, H, rows, vf, Ht, H, lg);
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t h = 0; h < Ht; ++h) {
            const float a = lu[r * Ht + h] + lg[r * Ht + h] + sp.b_head[h];
            scale[(m0 + r) * Ht + h] = gate / (1.f + std::exp(-a));
          }
        }
      });
      return;
    }
    {
      const prof::Scope scope(prof::GemmDown);
      gemm(engine_, M, H, H, hid_head, mat(kHeadW2, H), O, false);
    }
    const prof::Scope scope(prof::HeadLogits);
    for_rows(M, [&](int64_t m) {
      float* wr = scratch(2, H);
      v.load(offset(O, m, 0).p, cd, wr, H);
      v.add(wr, u + m * H, H);
      for (int64_t h = 0; h < Ht; ++h) {
        const float a = v.dot(wr, sp.w_head + h * H, H) + sp.b_head[h];
        scale[m * Ht + h] = gate / (1.f + std::exp(-a));
      }
    });
  }

  // Projection blocks 1 .. B-1; row pass: the next norm (or u as the 16-bit input of W_out).
  void projection_blocks() {
    const VecOps& v = vec();
    for (int64_t b = 1; b < B; ++b) {
      ffn_block(nb, b);
      const bool last = b == B - 1;
      if (f32 && last) break;  // u is already the fp32 input of W_out
      const prof::Scope scope(prof::Norms);
      for_rows(M, [&](int64_t m) {
        const float* ur = u + m * H;
        if (last) {
          if (!acc) v.add(u + m * H, row_f32(O, m, H, 1), H);
          v.store(ur, offset(nb, m, 0).p, ad, H);
        } else {
          norm_into(ur, rms_inv(residual(m), H), ffn_norm(b + 1), nb, m, H);
        }
      });
    }
  }

  // Output Linear and the gated merge into the receiver rows (or the fp32 corrections for
  // project).
  void output(const CacheView<char>& rv, const Sink& sink) {
    const VecOps& v = vec();
    {
      const prof::Scope scope(prof::GemmOutput);
      if (acc || !packed_into(Y, Kt, H, nb, mat(kWOut, H), false)) gemm(engine_, M, Kt, H, f32 ? U : nb, mat(kWOut, H), Y, false);
    }
    const prof::Scope scope(prof::Merge);
    for_rows(M, [&](int64_t m) {
      float* yr = row_f32(Y, m, Kt, 0);
      v.add(yr, sp.b_out, Kt);
      const float* sr = scale + m * Ht;
      if (sink.receiver == nullptr) {
        const int64_t t = tokens_.index[m];
        std::memcpy(sink.projection + t * Kt, yr, Kt * sizeof(float));
        std::memcpy(sink.head_scale + t * Ht, sr, Ht * sizeof(float));
        return;
      }
      float* xr = row_f32(gx, m, Kt, 1);
      for (int32_t h = 0; h < rv.heads; ++h) {
        float* xh = xr + int64_t{h} * Dh;
        v.axpy(sr[h], yr + int64_t{h} * Dh, xh, Dh);
        v.store(xh, rv.row(tokens_.receiver[m], h), cdt, Dh);
      }
    });
  }

 private:
  // Stack `i` of fuser f_ (FFN `block` for the [P, B, ...] stacks): a row-major [out, in]
  // matrix, leading dimension = in.
  Mat mat(Weight i, int64_t ld, int64_t block = 0) const {
    // With its stack named, so Engine::Packed can cache the packed copy (gemm.h).
    return Mat{const_cast<char*>(w_.at(i, f_, block)), cdt, ld, &w_.t[i]};
  }
  const float* ffn_norm(int64_t b) const { return sp.ffn_norm + b * H; }

  // C = gelu(A W^T) into `hid` (16-bit for Native16 and Brgemm, fp32 for F32); Brgemm computes
  // fp32 into `hid32` and its epilogue rounds the GELU'd block into hid.
  void up_gemm(const Mat& a, const Mat& w, int64_t n, Mat& hid, const Mat& hid32) {
    if (engine_ == Engine::Packed) {
      // GELU as oneDNN's post-op, on the fp32 accumulators (one rounding to 16 bits, not two).
      packed_into(hid, n, H, a, w, true);
    } else if (acc && !f32) {
      gemm(engine_, M, n, H, a, w, hid32, false, [&](int64_t n0, int64_t n1) { gelu_cols(hid32, n0, n1, &hid); });
    } else {
      gemm(engine_, M, n, H, a, w, hid, false, [&](int64_t n0, int64_t n1) { gelu_cols(hid, n0, n1); });
    }
  }

  // GELU on a finished column block of `hid` (runs inside the GEMM's thread); with `out`, the
  // result goes there (16-bit) instead.
  void gelu_cols(const Mat& hid, int64_t n0, int64_t n1, const Mat* out = nullptr) const {
    const prof::Scope scope(prof::Gelu);
    if (out == nullptr) return gelu_columns(hid, M, n0, n1);
    const VecOps& v = vec();
    for (int64_t m = 0; m < M; ++m) {
      void* p = offset(hid, m, n0).p;
      v.gelu(static_cast<float*>(p), n1 - n0);
      v.store(static_cast<float*>(p), offset(*out, m, n0).p, out->dt, n1 - n0);
    }
  }

  // FFN block `b` on u whose normed input is `n` (ffn_up, then ffn_down): the W2 product lands
  // in u (F32) or O.
  void ffn_block(const Mat& n, int64_t b) {
    {
      const prof::Scope scope(prof::GemmUp);
      up_gemm(n, mat(kFfnW1, H, b), I, hid_ffn, hid_ffn32);
    }
    const prof::Scope scope(prof::GemmDown);
    if (acc || !packed_into(O, H, I, hid_ffn, mat(kFfnW2, I, b), false)) {
      gemm(engine_, M, H, I, hid_ffn, mat(kFfnW2, I, b), acc ? U : O, acc);
    }
  }

  // Engine::Packed: `c` (a 16-bit activation buffer) becomes oneDNN's own output tensor,
  // kept until the buffer's next GEMM or the end of this fuser: one [M, N] copy per GEMM
  // fewer. False when the engine is another one (the caller runs the GEMM).
  bool packed_into(Mat& c, int64_t n, int64_t k, const Mat& a, const Mat& w, bool gelu) {
    if (engine_ != Engine::Packed) return false;
    at::Tensor out = gemm_packed_out(M, n, k, a, w, gelu);
    if (out.defined()) {
      c = Mat{out.data_ptr(), c.dt, n};
      outputs_[&c] = std::move(out);  // the buffer's previous output is done with
      return true;
    }
    // W not packed yet (its first call): native16 into c as it stands, GELU as a pass.
    if (gelu) {
      gemm(Engine::Native16, M, n, k, a, w, c, false, [&](int64_t n0, int64_t n1) { gelu_cols(c, n0, n1); });
    } else {
      gemm(Engine::Native16, M, n, k, a, w, c, false);
    }
    return true;
  }

  // u (+= O for Native16); returns the sum of squares of the new u row.
  float residual(int64_t m) const {
    const VecOps& v = vec();
    float* ur = u + m * H;
    if (acc) return v.sum_sq(ur, H);
    return v.add_sum_sq(ur, row_f32(O, m, H, 1), H);
  }

  const StackedWeights& w_;
  const int64_t f_;
  const Engine engine_;
  const Tokens& tokens_;
  const int64_t M, H, I, B, Ks, Kt, Ht, Dh;
  const Dt cdt;     // the cache and weight dtype
  const Dt ad, cd;  // dtypes of GEMM inputs (A) and outputs (C)
  const bool f32;   // GEMM inputs fp32 (Engine::F32)
  const bool acc;   // GEMM outputs fp32, accumulated into u (Engine::F32, Engine::Brgemm)
  const SmallParams sp;
  const at::Tensor fold;  // V = W_head Wh2, fp32 [Ht, H]; undefined: run the Wh2 GEMM
  const float gate;
  Mat gs{}, gx{}, U{}, na{}, nb{}, hid_ffn{}, hid_head{}, hid_ffn32{}, hid_head32{}, O{}, Y{};
  std::map<const Mat*, at::Tensor> outputs_;  // Engine::Packed's GEMM output per buffer (packed_into)
  float* u = nullptr;      // the fp32 residual stream [M, H]
  float* scale = nullptr;  // G * sigmoid(a) [M, Ht]
};

}  // namespace

void run_fuser(const StackedWeights& w, int64_t f, Engine engine, const at::Tensor& receiver,
               const at::Tensor& sharer, const Tokens& tokens, const Sink& sink, std::vector<at::Tensor>& ws) {
  if (tokens.size() == 0) return;
  prof::Scope params(prof::Params);
  FuserRun run(w, f, engine, tokens, ws);
  params.stop();
  const CacheView<char> sv = byte_view(sharer), rv = byte_view(receiver);
  run.gather(sv, rv);
  run.input_gemm();         // triton: input_gemm.py
  run.ffn_1();              // ffn_up.py, ffn_down.py
  run.weight_branch();      // ffn_up.py, ffn_down.py (head logits)
  run.projection_blocks();  // ffn_up.py, ffn_down.py
  run.output(rv, sink);     // output_gemm.py
}

}  // namespace c2c::cpu
