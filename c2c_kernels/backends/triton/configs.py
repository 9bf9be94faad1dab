"""Tile configurations of the GEMM stages: Hopper, Ampere and the interpreter.

Every GEMM stage multiplies ``T`` token rows (T = all tokens of the call, 1 to a few thousand)
by a ``[N, K]`` weight with N, K around 1024. Short prompts are bound by streaming the weights,
so small-T configs use 64-row tiles (the smallest wgmma) and narrow columns to keep every SM
busy; long prompts are bound by the tensor cores, so large-T configs use the usual 128-wide
tiles with deep pipelines. The autotuner picks among the configs left for a call's token
bucket and GPU (pruned by architecture, bucket and shared memory), once per bucket, N, K and
dtype; the bucket keeps a serving loop with varying T from re-tuning at every new length.
Each list is ordered best guess first: that config is used without benchmarking for small
layers (N*K <= 256*256, where the choice hardly matters but compiling every candidate would)
and for everything when ``C2C_TRITON_AUTOTUNE=0``.
"""
from __future__ import annotations

import functools
import os

import torch
import triton

from ._common import INTERPRET

AUTOTUNE = os.environ.get("C2C_TRITON_AUTOTUNE", "1") != "0"

# (BM, BN, BK, num_warps, num_stages)
HOPPER = (
    (64, 64, 128, 4, 4), (64, 128, 64, 4, 4), (64, 32, 128, 4, 5),  # weight-streaming, small T
    (128, 128, 64, 8, 4), (128, 128, 128, 8, 3), (128, 64, 64, 8, 4), (64, 128, 128, 4, 3),
    # A 96 KB pipeline: a shorter fill per tile where K is short.
    (128, 128, 64, 8, 3),
)
AMPERE = (
    (64, 64, 64, 4, 4), (64, 32, 128, 4, 4), (64, 128, 32, 4, 4),
    (128, 128, 32, 8, 4), (128, 64, 64, 8, 4), (128, 128, 64, 8, 3),
)
# fp32 weights (accuracy tests on a GPU): tf32x3 dots need three times the operand tiles.
FP32 = ((64, 64, 32, 4, 3),)
# The interpreter runs every program in Python: one config, few large tiles.
INTERPRETER = ((64, 64, 64, 4, 1),)

GROUP_M = 8
# K tile of the cache-gathering GEMM when a view is not 16-byte aligned (VEC=1): every element of
# the A tile then carries its own 64-bit address, and 64- or 128-wide K tiles spill (ptxas: 255
# registers and up to 5 KB of spills per thread on sm_90a).
UNALIGNED_BK = 32
# Programs of a persistent GEMM launch in the interpreter: fewer than the tiles of the test
# shapes, so each program loops over several tiles there too.
INTERPRET_PROGRAMS = 3
# The column tile of the weight branch's FFN-up (ffn_up.launch_head_logits), which stores one
# partial head logit per tile: the output stage sums hidden / LOGIT_BN partials in a fixed order.
LOGIT_BN = 128
MERGE_BLOCK = (32, 128)  # the standalone merge is elementwise: (rows, columns) per program


def token_bucket(tokens: int) -> int:
    """The autotuning key for the token count: 64, 256, 1024 or 4096."""
    for bucket in (64, 256, 1024):
        if tokens <= bucket:
            return bucket
    return 4096


def _config(bm, bn, bk, warps, stages, ctas=1) -> triton.Config:
    return triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": GROUP_M, "CTAS_PER_SM": ctas},
                         num_warps=warps, num_stages=stages)


def configs(fixed_bn: int | None = None) -> list[triton.Config]:
    """Every candidate (pruned per call by ``prune``); ``fixed_bn`` forces the column tile.
    Each config remembers the families (hopper, ampere, fp32) it came from."""
    if INTERPRET:
        bm, bn, bk, warps, stages = INTERPRETER[0]
        return [_config(bm, fixed_bn or bn, bk, warps, stages)]
    families: dict[tuple, set] = {}
    for family, table in (("hopper", HOPPER), ("ampere", AMPERE), ("fp32", FP32)):
        for bm, bn, bk, warps, stages in table:
            families.setdefault((bm, fixed_bn or bn, bk, warps, stages), set()).add(family)
    out = []
    for key, names in families.items():
        config = _config(*key)
        config.families = names
        out.append(config)
    return out


def _device_limits(device: torch.device) -> tuple[bool, int]:
    """(is Hopper or newer, shared memory per block in bytes)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _limits_of(index)


@functools.lru_cache(maxsize=None)
def _limits_of(index: int) -> tuple[bool, int]:
    major, _ = torch.cuda.get_device_capability(index)
    props = triton.runtime.driver.active.utils.get_device_properties(index)
    return major >= 9, props["max_shared_mem"]


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(index)["multiprocessor_count"]


def programs(tiles: int, meta: dict, device: torch.device) -> int:
    """Grid of a persistent GEMM launch: one program per CTA that fits on the GPU at once (SMs
    times the config's CTAS_PER_SM), each looping over tiles with a stride of the grid, so the
    pipeline fill is paid once per program instead of once per tile (a 1024-token call has about
    23 waves of 128x128 tiles on 132 SMs); fewer when there are fewer tiles."""
    if INTERPRET:
        return min(tiles, INTERPRET_PROGRAMS)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return min(tiles, _sm_count(index) * meta["CTAS_PER_SM"])


def _ctas_per_sm(c, element_size, smem_limit) -> int:
    """CTAs of config ``c`` surely resident together on one SM (at most 2): by shared memory,
    and by registers at the most a thread may take (255, allocated as 256; 64K per SM). The
    persistent GEMMs take 150-240 registers with 8 warps, so two 8-warp CTAs are not counted on."""
    by_smem = smem_limit // _smem(c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"], c.num_stages, element_size)
    by_regs = 65536 // (c.num_warps * 32 * 256)
    return max(1, min(2, by_smem, by_regs))


def _with_ctas(c, element_size, smem_limit) -> triton.Config:
    out = _config(c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"], c.num_warps, c.num_stages,
                  _ctas_per_sm(c, element_size, smem_limit))
    out.families = getattr(c, "families", set())
    return out


def _smem(bm, bn, bk, stages, element_size) -> int:
    """Shared memory of the pipelined operand tiles (activations are stored in the weight dtype)."""
    return stages * (bm + bn) * bk * element_size


def prune(configs_, named_args, **kwargs):
    """Keep the configs of this GPU and dtype that fit its shared memory and the token bucket,
    each with the CTAs per SM it gets (the persistent grid's size, see ``programs``)."""
    if INTERPRET:
        return configs_
    weights = named_args["w_ptr"]
    size = weights.element_size()
    hopper, smem_limit = _device_limits(weights.device)
    family = "fp32" if size == 4 else "hopper" if hopper else "ampere"
    kept = [c for c in configs_ if family in getattr(c, "families", ())
            and _smem(c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"], c.num_stages, size) <= smem_limit]
    if kwargs.get("SHARER_VEC") == 1 or kwargs.get("RECEIVER_VEC") == 1:
        kept = _narrow_k(kept)
    bucket = named_args["m_bucket"]
    small = [c for c in kept if c.kwargs["BM"] == 64]
    large = [c for c in kept if c.kwargs["BM"] > 64]
    chosen = small if bucket <= 64 else small + large if bucket <= 256 else large or small
    chosen = chosen or kept or configs_[:1]
    tiny = named_args["w_ptr"].shape[-1] * named_args["w_ptr"].shape[-2] <= 256 * 256
    chosen = chosen if AUTOTUNE and not tiny else chosen[:1]
    return [_with_ctas(c, size, smem_limit) for c in chosen]


def _narrow_k(configs_):
    """The configs with their K tile cut to UNALIGNED_BK (shared memory only shrinks), deduplicated."""
    out, seen = [], set()
    for c in configs_:
        key = (c.kwargs["BM"], c.kwargs["BN"], min(c.kwargs["BK"], UNALIGNED_BK), c.num_warps, c.num_stages)
        if key not in seen:
            seen.add(key)
            narrowed = _config(*key)
            narrowed.families = getattr(c, "families", set())
            out.append(narrowed)
    return out


def fixed(tokens: int, head_dim: int, device: torch.device, element_size: int, vec: int = 8) -> dict:
    """One config without benchmarking, for the stage that writes the caches in place (the
    autotuner would apply the update once per timed run). Its column tile divides the head dim
    when it can, so the epilogue needs one head logit per token instead of one per column
    (the per-column gather of 128x128 tiles spills registers)."""
    smem_limit = None
    if INTERPRET:
        bm, bn, bk, warps, stages = INTERPRETER[0]
    elif element_size == 4:
        bm, bn, bk, warps, stages = FP32[0]
        _, smem_limit = _device_limits(device)
    else:
        hopper, smem_limit = _device_limits(device)
        # Unaligned views (vec 1) gather the epilogue's receiver tile element by element:
        # 128-wide column tiles spill there.
        bn = 128 if head_dim % 128 == 0 and tokens > 64 and vec > 1 else 64
        if tokens <= 64:
            bm, bk, warps, stages = (64, 128, 4, 4) if hopper else (64, 64, 4, 4)
        else:
            bm, bk, warps, stages = (128, 64, 8, 4) if hopper else (128, 64 if bn == 64 else 32, 8, 4)
        if vec == 1:  # the epilogue's cache tile has per-element addresses: a narrow K tile (no spills)
            bk = min(bk, UNALIGNED_BK)
        while stages > 2 and _smem(bm, bn, bk, stages, element_size) > smem_limit:
            stages -= 1
    config = _config(bm, bn, bk, warps, stages)
    ctas = 1 if smem_limit is None else _ctas_per_sm(config, element_size, smem_limit)
    return {**config.kwargs, "CTAS_PER_SM": ctas, "num_warps": warps, "num_stages": stages}
