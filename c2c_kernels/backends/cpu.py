"""The native CPU backend (``csrc/cpu``): fused gather, norms, activations and merge around
ATen GEMMs, multi-threaded. Needs the compiled extension ``c2c_kernels._C``.

How it computes (docs/cpu.md; ``config(dtype)``): fp32 caches run ATen's fp32 GEMM (MKL)
split by columns over the intra-op threads. 16-bit caches have four GEMM engines: ``fp32``
(weights widened to fp32 one block at a time, fp32 BLAS), ``native16`` (ATen's 16-bit GEMM,
oneDNN), ``brgemm`` (ATen's cpublas::brgemm micro-kernel, fp32 outputs) and ``packed``
(oneDNN inner product on weights packed once and cached, GELU fused; where torch has mkldnn). The first call of
each (dtype, token class, hidden width) times one GEMM on each, checks it against fp32, and
keeps the fastest for the process (``engine_choices()``); the CPU flags give the prior.
Environment knobs, for tests and benchmarks: ``C2C_CPU_GEMM=fp32|native|brgemm|packed`` (forces the
16-bit engine, read on every call), ``C2C_CPU_VEC=scalar`` (portable row kernels, read once),
``C2C_CPU_WBLOCK`` (weight rows widened per block), ``C2C_CPU_SPLIT=0`` (leave fp32 GEMM
threading to BLAS).
"""
from __future__ import annotations

import torch

from .. import _native

DEVICES = ("cpu",)
AUTO = {"cpu": 0}  # auto's first choice on the CPU


def unavailable():
    return _native.unavailable()


def config(dtype: torch.dtype = torch.bfloat16) -> str:
    """How caches of ``dtype`` are computed on this machine (GEMM engine, row kernels, threads)."""
    return torch.ops.c2c_native.cpu_config(dtype)


def choose_engine(dtype: torch.dtype, tokens: int, hidden: int) -> str:
    """The GEMM engine (``fp32``, ``native16``, ``brgemm`` or ``packed``) a call on ``dtype`` caches with
    ``tokens`` valid tokens and fuser width ``hidden`` runs; measured and cached at the first
    call of its class unless ``C2C_CPU_GEMM`` forces one."""
    return torch.ops.c2c_native.cpu_choose_engine(dtype, tokens, hidden)


def engine_choices(clear: bool = False) -> list[str]:
    """One line per measured (dtype, token class, hidden): GEMM times per engine and the choice.
    ``clear`` forgets the choices (the next call of each class measures again)."""
    return [line for line in torch.ops.c2c_native.cpu_engine_choices(clear).splitlines() if line]


def _fields(text: str, cast) -> dict:
    """``"a=1 b=2"`` (how the native counters report) as ``{"a": cast("1"), "b": cast("2")}``."""
    return {key: cast(value) for key, value in (item.split("=") for item in text.split())}


def packed_cache(clear: bool = False) -> dict[str, int]:
    """The ``packed`` engine's cache of oneDNN-packed weights: ``entries`` and ``bytes`` held
    (one packed copy of each 16-bit weight matrix it ran, per token class; bounded by
    ``C2C_CPU_PACK_MB``, default 4096). ``clear`` empties it."""
    return _fields(torch.ops.c2c_native.cpu_packed_cache(clear), int)


def head_fold_cache(clear: bool = False) -> dict[str, int]:
    """The cached folds ``V = W_head W2h`` of the weight branch (docs/cpu.md, "Head fold"):
    ``entries`` (pairs of weight stacks), ``bytes`` held and ``fusers`` folded so far.
    ``clear`` empties it. ``C2C_CPU_HEAD_FOLD=0`` runs the W2h GEMM instead (read per call)."""
    return _fields(torch.ops.c2c_native.cpu_head_fold_cache(clear), int)


def stage_times(enable: bool = True) -> dict[str, float]:
    """Seconds spent per stage by the fuse/project calls since the last call (summed over the
    entries of a call, which may run one per thread at once), plus ``calls``;
    resets the counters, and collects from now on while ``enable`` (off at start). Keys:
    gather, params, gemm_input, gemm_up (GELU epilogue included), gemm_down, gemm_output,
    norms, head_logits, merge; gelu_thread_s and widen_thread_s are thread-seconds spent inside
    the GEMM stages, zero_c the 16-bit GEMM outputs zeroed inside them."""
    return _fields(torch.ops.c2c_native.cpu_stage_times(enable), float)


def fuse(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers):
    torch.ops.c2c_native.fuse(receiver_caches, sharer_caches, receiver_slots, sharer_slots, list(weights), fusers)


def project(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers):
    return torch.ops.c2c_native.project(receiver_caches, sharer_caches, receiver_slots, sharer_slots,
                                        list(weights), fusers)


def merge(receiver_caches, receiver_slots, projections, head_scales):
    torch.ops.c2c_native.merge(receiver_caches, receiver_slots, projections, head_scales)
