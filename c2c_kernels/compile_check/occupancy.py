"""What one SM of a GPU holds: the per-architecture limits and the occupancy arithmetic of the
static report (CTAs resident per SM from registers, shared memory and threads per CTA; waves
of a grid). The rules are those of CUDA's occupancy calculator (registers are allocated per
warp in units of 256 across four SM sub-partitions; every CTA also takes 1 KB of shared memory
the system reserves on sm_80 and newer; shared memory is allocated in 128-byte units)."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    name: str  # the ptxas/nvcc target: sm_90a, sm_80
    capability: tuple[int, int]
    gpu: str  # the GPU the stand-in driver reports for it
    sms: int
    smem_per_block: int  # the most one CTA may ask for (opt-in), bytes
    smem_per_sm: int  # the largest shared-memory carveout of one SM, bytes
    smem_reserved_per_block: int = 1024  # taken by the system from every resident CTA
    smem_unit: int = 128
    regs_per_sm: int = 65536
    regs_per_block: int = 65536
    max_regs_per_thread: int = 255
    reg_unit: int = 256  # registers are allocated per warp in units of this many
    sub_partitions: int = 4
    max_threads_per_sm: int = 2048
    max_threads_per_block: int = 1024
    max_ctas_per_sm: int = 32
    warp_size: int = 32


ARCHS = {
    "sm_90a": Arch("sm_90a", (9, 0), "NVIDIA H200", sms=132, smem_per_block=232448, smem_per_sm=233472),
    "sm_80": Arch("sm_80", (8, 0), "NVIDIA A100", sms=108, smem_per_block=166912, smem_per_sm=167936),
}


def arch(name: str) -> Arch:
    if name not in ARCHS:
        raise ValueError(f"arch: expected one of {list(ARCHS)}, got {name!r}")
    return ARCHS[name]


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


@dataclass(frozen=True)
class Occupancy:
    ctas_per_sm: int
    limited_by: str  # registers, shared, threads, ctas, or why none fits


def occupancy(a: Arch, *, registers: int, shared_bytes: int, threads: int) -> Occupancy:
    """CTAs of ``threads`` threads, ``registers`` per thread and ``shared_bytes`` of shared memory
    (static + dynamic) that fit on one SM at once; 0 when one CTA does not fit at all."""
    if threads < 1 or registers < 0 or shared_bytes < 0:
        raise ValueError(f"occupancy: expected threads >= 1 and non-negative registers and shared_bytes, "
                         f"got threads={threads}, registers={registers}, shared_bytes={shared_bytes}")
    if threads > a.max_threads_per_block:
        return Occupancy(0, f"threads {threads} > {a.max_threads_per_block}")
    if registers > a.max_regs_per_thread:
        return Occupancy(0, f"registers {registers} > {a.max_regs_per_thread}")
    if shared_bytes > a.smem_per_block:
        return Occupancy(0, f"shared {shared_bytes} B > {a.smem_per_block} B")
    warps = -(-threads // a.warp_size)
    limits = {"threads": a.max_threads_per_sm // a.warp_size // warps, "ctas": a.max_ctas_per_sm}
    regs_per_warp = _round_up(max(registers, 1) * a.warp_size, a.reg_unit)
    # The hardware checks a CTA's registers as if its warps were spread over every sub-partition.
    if regs_per_warp * _round_up(warps, a.sub_partitions) > a.regs_per_block:
        return Occupancy(0, f"registers {registers} x {threads} threads > {a.regs_per_block}")
    warps_per_partition = (a.regs_per_sm // a.sub_partitions) // regs_per_warp
    limits["registers"] = warps_per_partition * a.sub_partitions // warps
    per_cta = _round_up(shared_bytes + a.smem_reserved_per_block, a.smem_unit)
    limits["shared"] = a.smem_per_sm // per_cta
    name = min(limits, key=lambda k: (limits[k], ("registers", "shared", "threads", "ctas").index(k)))
    return Occupancy(limits[name], name)


def waves(ctas: int, sms: int, ctas_per_sm: int) -> float | None:
    """Rounds of ``sms * ctas_per_sm`` resident CTAs a grid of ``ctas`` takes; the fraction shows
    the last, partly filled wave (23.27: 23 full waves and one 27% full). None when nothing fits."""
    if ctas < 0 or sms < 1:
        raise ValueError(f"waves: expected ctas >= 0 and sms >= 1, got ctas={ctas}, sms={sms}")
    if ctas_per_sm < 1:
        return None
    return ctas / (sms * ctas_per_sm)


def full_waves(ctas: int, sms: int, ctas_per_sm: int) -> int | None:
    w = waves(ctas, sms, ctas_per_sm)
    return None if w is None else math.ceil(w - 1e-9)
