"""The native CPU backend (csrc/cpu) beyond the shared op tests: thread counts, both GEMM
engines, project and merge against the reference, realistic widths, odd slot tensors, and the
portable (non-AVX2) row kernels."""
import os
import subprocess
import sys

import pytest
import torch

from c2c_kernels import backends, reference
from c2c_kernels.testing import TOLERANCES, assert_storage_close, at_thread_counts, make_case, reference_fused

pytestmark = pytest.mark.skipif(backends.reason("cpu") is not None,
                                reason=f"cpu backend unavailable: {backends.reason('cpu')}")

# The first workload's geometry (fuser.md): receiver 8x128, sharer 2x64, H = I = 1024, n = 3.
REAL = dict(receiver_heads=8, receiver_dim=128, sharer_heads=2, sharer_dim=64, hidden=1024, intermediate=1024,
            layers=1, page_size=16, sharer_page_size=16)


def run_cpu(case):
    torch.ops.c2c.fuse(*case.args(), "cpu", False)


@pytest.fixture
def gemm_engine(monkeypatch, request):
    monkeypatch.setenv("C2C_CPU_GEMM", request.param)
    return request.param


@pytest.mark.parametrize("gemm_engine", ["fp32", "native", "brgemm", "packed"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_both_gemm_engines(gemm_engine, dtype):
    """16-bit caches through the fp32 engine (weights widened per block), ATen's 16-bit GEMMs,
    the brgemm micro-kernel and oneDNN on packed weights (native16 where it cannot run)."""
    case = make_case(layout="flashinfer_hnd", sharer_layout="vllm_nhd", dtype=dtype, seed=21, hidden=96,
                     intermediate=80, seq_lens=(9, 4, 6), padding=3)
    expected = reference_fused(case)
    run_cpu(case)
    assert_storage_close(case, expected, TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_realistic_widths(dtype):
    """The first workload's widths (H = I = 1024, 8x128 from 2x64), ragged, padded, aligned."""
    case = make_case(layout="vllm_nhd", dtype=dtype, seed=4, seq_lens=(37, 20), sharer_seq_lens=(30, 25),
                     padding=5, **REAL)
    expected = reference_fused(case)
    run_cpu(case)
    assert_storage_close(case, expected, TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_thread_counts_agree(dtype):
    """1, 2 and 3 intra-op threads give the same rows (up to GEMM summation order)."""
    case = make_case(layout="flashinfer_interleaved", dtype=dtype, seed=8, seq_lens=(23, 17), padding=4,
                     **{**REAL, "hidden": 256, "intermediate": 192})
    results = at_thread_counts(case, run_cpu)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_project_matches_reference(dtype):
    """Projection and head scale (fp32) of every entry, zero rows at padding, closed gates included."""
    case = make_case(dtype=dtype, seed=6, seq_lens=(6, 5), padding=3, gates_open=[True, False, True, False])
    want_p, want_a = reference.project(case.receiver_caches, case.sharer_caches, case.receiver_slots,
                                       case.sharer_slots, case.weights, case.fusers)
    got_p, got_a = torch.ops.c2c.project(*case.args(), "cpu", False)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got_p, want_p, atol=tol, rtol=tol)
    torch.testing.assert_close(got_a, want_a, atol=tol, rtol=tol)
    pad = case.receiver_slots < 0
    assert torch.all(got_p[:, pad] == 0) and torch.all(got_a[:, pad] == 0)
    assert torch.all(got_a[1] == 0) and torch.all(got_a[3] == 0), "a closed gate must give head_scale 0"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_merge_several_sharers(dtype):
    """x += sum over S = 3 sharers, strided correction rows, padding skipped."""
    case = make_case(layout="vllm_hnd", dtype=dtype, seed=12, seq_lens=(7, 3), padding=2)
    t, kt, ht = case.receiver_slots.shape[0], case.weights.receiver_width, case.weights.receiver_heads
    r, s = len(case.receiver_caches), 3
    g = torch.Generator().manual_seed(1)
    big = torch.randn(r * s, t, 2 * kt, generator=g)
    projections = [big[i, :, ::2] for i in range(r * s)]  # strided rows
    head_scales = [torch.rand(t, ht, generator=g) for _ in range(r * s)]
    expected = case.clone_receiver()
    reference.merge(expected.receiver_caches, expected.receiver_slots, projections, head_scales)
    torch.ops.c2c.merge(case.receiver_caches, case.receiver_slots, projections, head_scales, "cpu", False)
    assert_storage_close(case, expected, TOLERANCES[dtype] if dtype != torch.float32 else 1e-6)


def test_project_then_merge_equals_fuse():
    case = make_case(dtype=torch.float32, seed=14, seq_lens=(5, 8), padding=2)
    fused = case.clone_receiver()
    run_cpu(fused)
    p, a = torch.ops.c2c.project(*case.args(), "cpu", False)
    torch.ops.c2c.merge(case.receiver_caches, case.receiver_slots, list(p.unbind(0)), list(a.unbind(0)), "cpu", False)
    assert_storage_close(case, fused, 1e-6)


def test_odd_slot_tensors_and_repeated_sharer_rows():
    """Strided int32 receiver slots, int64 sharer slots where every token reads one sharer row."""
    case = make_case(layout="sglang", seed=15, seq_lens=(6, 6), padding=2)
    rs = torch.stack([case.receiver_slots.int(), torch.zeros_like(case.receiver_slots.int())], 1)[:, 0]
    assert not rs.is_contiguous()
    valid = case.receiver_slots >= 0
    first = case.sharer_slots[valid][0]
    case.sharer_slots = torch.where(valid, first, case.sharer_slots)
    case.receiver_slots = rs
    expected = reference_fused(case)
    run_cpu(case)
    assert_storage_close(case, expected, TOLERANCES[torch.float32])


def test_all_padding_and_all_closed_change_nothing():
    case = make_case(seed=16, gates_open=False)
    before = [t.clone() for t in case.receiver.storage]
    run_cpu(case)
    assert all(torch.equal(a, b) for a, b in zip(case.receiver.storage, before))
    case = make_case(seed=17)
    case.receiver_slots = torch.full_like(case.receiver_slots, -1)
    before = [t.clone() for t in case.receiver.storage]
    run_cpu(case)
    assert all(torch.equal(a, b) for a, b in zip(case.receiver.storage, before))


def test_large_activations_gelu_tails():
    """Inputs far out on both GELU tails and huge RMS values stay finite and match."""
    case = make_case(seed=18, seq_lens=(5,), padding=0)
    for t in case.receiver.storage + case.sharer.storage:
        t.mul_(40.0)
    expected = reference_fused(case)
    run_cpu(case)
    for got in case.receiver.storage:
        assert torch.isfinite(got).all()
    for got, want in zip(case.receiver.storage, expected.receiver.storage):
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-4)


_ROW_KERNEL_SCRIPT = r"""
import sys, torch, c2c_kernels
from c2c_kernels import backends
from c2c_kernels.testing import assert_storage_close, make_case, reference_fused
print(backends.get("cpu").config(torch.float32))
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    # widths that leave a tail after every vector width (7, 5, 40 + 8 x 7, 24)
    case = make_case(layout="flashinfer_nhd", dtype=dtype, seed=19, seq_lens=(5, 9), padding=2,
                     receiver_dim=7, sharer_dim=5, hidden=40, intermediate=24)
    expected = reference_fused(case)
    torch.ops.c2c.fuse(*case.args(), "cpu", False)
    assert_storage_close(case, expected, dtype)
print("ok")
"""


def _row_kernels(vec: str) -> str:
    env = {**os.environ, "C2C_CPU_VEC": vec, "C2C_CPU_GEMM": "fp32"}
    out = subprocess.run([sys.executable, "-c", _ROW_KERNEL_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
    return out.stdout


def test_portable_row_kernels():
    """C2C_CPU_VEC=scalar (chosen once per process) runs the portable code path."""
    assert "vec=scalar" in _row_kernels("scalar")


@pytest.mark.parametrize("vec", ["avx2", "auto"])
def test_vectorised_row_kernels(vec):
    """The at::vec row kernels of each instruction set this CPU has (AVX2 forced; the widest by
    default), tails included; on a CPU without them the next narrower set (or scalar) runs."""
    line = _row_kernels(vec)
    caps = torch.backends.cpu.get_cpu_capability()
    if vec == "avx2" and caps in ("AVX2", "AVX512"):
        assert "vec=avx2 (at::vec)" in line
    if vec == "auto" and caps == "AVX512":
        assert "vec=avx512 (at::vec)" in line


def test_config_reports_the_engine(monkeypatch):
    cpu = backends.resolve("cpu", torch.device("cpu"))
    assert cpu.config(torch.float32).startswith("gemm=fp32")
    monkeypatch.setenv("C2C_CPU_GEMM", "native")
    assert cpu.config(torch.bfloat16).startswith("gemm=native16")
    monkeypatch.setenv("C2C_CPU_GEMM", "fp32")
    assert cpu.config(torch.float16).startswith("gemm=fp32")
    monkeypatch.setenv("C2C_CPU_GEMM", "brgemm")
    assert cpu.config(torch.bfloat16).startswith("gemm=brgemm")
    monkeypatch.setenv("C2C_CPU_GEMM", "packed")
    assert cpu.config(torch.bfloat16).startswith(("gemm=packed", "gemm=native16 (packed unavailable"))
    monkeypatch.delenv("C2C_CPU_GEMM")
    assert cpu.config(torch.bfloat16).startswith("gemm=auto")
    assert f"threads={torch.get_num_threads()}" in cpu.config(torch.float32)
