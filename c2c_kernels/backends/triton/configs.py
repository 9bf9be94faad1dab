"""Tile configurations of the GEMM stages: Hopper, Ampere and the interpreter.

Every GEMM stage multiplies ``T`` token rows (T = all tokens of the call, 1 to a few thousand)
by a ``[N, K]`` weight with N, K around 1024. Short prompts are bound by streaming the weights,
so small-T configs use 64-row tiles (the smallest wgmma) and narrow columns to keep every SM
busy; long prompts are bound by the tensor cores, so large-T configs use the usual 128-wide
tiles with deep pipelines. The autotuner picks among the configs left for a call's token
bucket and GPU (pruned by architecture, bucket and shared memory), once per bucket, N, K and
dtype; the bucket keeps a serving loop with varying T from re-tuning at every new length.
"""
from __future__ import annotations

import torch
import triton

from ._common import INTERPRET

# (BM, BN, BK, num_warps, num_stages)
HOPPER = (
    (64, 64, 128, 4, 4), (64, 128, 64, 4, 4), (64, 32, 128, 4, 5),  # weight-streaming, small T
    (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 128, 128, 8, 3), (64, 128, 128, 4, 3),
)
AMPERE = (
    (64, 64, 64, 4, 4), (64, 32, 128, 4, 4), (64, 128, 32, 4, 4),
    (128, 128, 32, 4, 4), (128, 64, 64, 4, 3), (128, 256, 32, 8, 3),
)
# The interpreter runs every program in Python: one config, few large tiles.
INTERPRETER = ((64, 64, 64, 4, 1),)

GROUP_M = 8
LOGIT_BN = 128  # the head-logit stage's column tile: the output stage sums one partial per tile
MERGE_BLOCK = (32, 128)  # the standalone merge is elementwise: (rows, columns) per program


def token_bucket(tokens: int) -> int:
    """The autotuning key for the token count: 64, 256, 1024 or 4096."""
    for bucket in (64, 256, 1024):
        if tokens <= bucket:
            return bucket
    return 4096


def _config(bm, bn, bk, warps, stages) -> triton.Config:
    return triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": GROUP_M}, num_warps=warps,
                         num_stages=stages)


def configs(fixed_bn: int | None = None) -> list[triton.Config]:
    """Every candidate (pruned per call by ``prune``); ``fixed_bn`` forces the column tile."""
    table = INTERPRETER if INTERPRET else HOPPER + AMPERE
    seen, out = set(), []
    for bm, bn, bk, warps, stages in table:
        key = (bm, fixed_bn or bn, bk, warps, stages)
        if key not in seen:
            seen.add(key)
            out.append(_config(*key))
    return out


def _device_limits(device: torch.device) -> tuple[bool, int]:
    """(is Hopper or newer, shared memory per block in bytes)."""
    major, _ = torch.cuda.get_device_capability(device)
    props = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)
    return major >= 9, props["max_shared_mem"]


def _smem(bm, bn, bk, stages, element_size) -> int:
    """Shared memory of the pipelined operand tiles (activations are stored in the weight dtype)."""
    return stages * (bm + bn) * bk * element_size


def prune(configs_, named_args, **kwargs):
    """Keep the configs of this GPU's architecture that fit its shared memory and the bucket."""
    if INTERPRET or len(configs_) == 1:
        return configs_
    weights = named_args["w_ptr"]
    hopper, smem_limit = _device_limits(weights.device)
    arch = {(bm, bk, w, s) for bm, _, bk, w, s in (HOPPER if hopper else AMPERE)}
    bucket = named_args["m_bucket"]
    size = weights.element_size()
    kept = [c for c in configs_
            if (c.kwargs["BM"], c.kwargs["BK"], c.num_warps, c.num_stages) in arch
            and _smem(c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"], c.num_stages, size) <= smem_limit]
    small = [c for c in kept if c.kwargs["BM"] == 64]
    large = [c for c in kept if c.kwargs["BM"] > 64]
    chosen = small if bucket <= 64 else small + large if bucket <= 256 else large or small
    return chosen or kept or configs_[:1]


def fixed(tokens: int, device: torch.device, element_size: int) -> dict:
    """One config without benchmarking, for the stage that writes the caches in place (the
    autotuner would apply the update once per timed run)."""
    if INTERPRET:
        bm, bn, bk, warps, stages = INTERPRETER[0]
    else:
        hopper, smem_limit = _device_limits(device)
        small = tokens <= 64
        if hopper:
            bm, bn, bk, warps, stages = (64, 64, 128, 4, 4) if small else (128, 128, 64, 8, 4)
        else:
            bm, bn, bk, warps, stages = (64, 64, 64, 4, 4) if small else (128, 128, 32, 4, 4)
        while stages > 2 and _smem(bm, bn, bk, stages, element_size) > smem_limit:
            stages -= 1
    return {"BM": bm, "BN": bn, "BK": bk, "GROUP_M": GROUP_M, "num_warps": warps, "num_stages": stages}
