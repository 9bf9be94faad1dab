// The fuser weight schema as the native code sees it: the stacked tensors of
// c2c_kernels.weights.FIELDS (c2c_kernels.FuserWeights), in that order, shared by the CPU and
// CUDA backends. tests/test_weight_schema.py reads this file and fails when the list below and
// the Python schema disagree (names, order, ranks, fp32 fields), so a new field is added in
// both places. Shapes (symbols of c2c_kernels.weights.DIMS): see the Python schema.
#pragma once

namespace c2c {

// X(Enum, python_name, rank, fp32): rank counts the leading fuser dimension P; fp32 fields
// stay float32 whatever the weights' dtype.
#define C2C_FUSER_WEIGHTS(X)              \
  X(WInSharer, w_in_sharer, 3, false)     \
  X(WInReceiver, w_in_receiver, 3, false) \
  X(BIn, b_in, 2, false)                  \
  X(FfnNorm, ffn_norm, 3, false)          \
  X(FfnW1, ffn_w1, 4, false)              \
  X(FfnW2, ffn_w2, 4, false)              \
  X(HeadNorm, head_norm, 2, false)        \
  X(HeadW1, head_w1, 3, false)            \
  X(HeadW2, head_w2, 3, false)            \
  X(WHead, w_head, 3, false)              \
  X(BHead, b_head, 2, false)              \
  X(WOut, w_out, 3, false)                \
  X(BOut, b_out, 2, false)                \
  X(GateLogit, gate_logit, 1, true)

// Index of each stack in the weights list a native op receives.
enum Weight : int {
#define C2C_WEIGHT_ENUM(e, name, rank, fp32) k##e,
  C2C_FUSER_WEIGHTS(C2C_WEIGHT_ENUM)
#undef C2C_WEIGHT_ENUM
  kNumWeights
};

inline constexpr const char* kWeightNames[kNumWeights] = {
#define C2C_WEIGHT_NAME(e, name, rank, fp32) #name,
    C2C_FUSER_WEIGHTS(C2C_WEIGHT_NAME)
#undef C2C_WEIGHT_NAME
};

inline constexpr int kWeightRank[kNumWeights] = {
#define C2C_WEIGHT_RANK(e, name, rank, fp32) rank,
    C2C_FUSER_WEIGHTS(C2C_WEIGHT_RANK)
#undef C2C_WEIGHT_RANK
};

inline constexpr bool kWeightFp32[kNumWeights] = {
#define C2C_WEIGHT_FP32(e, name, rank, fp32) fp32,
    C2C_FUSER_WEIGHTS(C2C_WEIGHT_FP32)
#undef C2C_WEIGHT_FP32
};

// RMSNorm's epsilon, in every native kernel (c2c_kernels.reference.RMS_EPS in Python).
constexpr float kRmsEps = 1e-6f;

}  // namespace c2c
