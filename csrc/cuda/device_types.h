// The CUDA names the kernels and their parameter blocks use: the toolkit's, or, in a build
// with C2C_CUDA_EMULATOR, the CPU emulator's stand-ins (cuda/emulator/emulator.h) that let
// the same kernel sources run on the host for tests.
#pragma once

#if defined(C2C_CUDA_EMULATOR)
#include "cuda/emulator/emulator.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// kernel<<<grid, block, 0, stream>>>; a macro so that the emulator can run the same line.
// The kernel comes last because a template's argument list may hold commas.
#define C2C_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<grid, block, 0, stream>>>
// A 16-byte access's address; the emulator checks it, the GPU would fault on a bad one.
#define C2C_CHECK_ALIGNED16(pointer) ((void)0)
#endif
