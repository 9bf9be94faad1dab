"""The static performance report (benchmarks/static_report.py) and its CI gate.

The gate compiles the CI subset (first workload, bf16, 64 and 1024 tokens, contiguous views
aligned and not, sm_90a) through the package's own host code and fails on any spill in a
configuration the autotuner may pick, on a GEMM without warpgroup MMA, or on shared memory
above the SM's limit. The report's arithmetic (CTAs per SM, waves) and parsers are pinned on
synthetic inputs."""
import json
import os
import signal
import subprocess
import sys

import pytest

from c2c_kernels.compile_check import occupancy as occ
from c2c_kernels.compile_check import resources
from c2c_kernels.compile_check.static_report import config_label, table, triton_rows, violations

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H200, A100 = occ.ARCHS["sm_90a"], occ.ARCHS["sm_80"]


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # conftest sets it
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
    return env


def _run(cmd, timeout):
    """``cmd`` in a session of its own: on a timeout its compilers (ptxas, nvcc) end with it."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _have_triton_tools():
    try:
        import triton
    except ImportError:
        return False
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")) \
        and resources.tool("cuobjdump") is not None


needs_tools = pytest.mark.skipif(not _have_triton_tools(), reason="no ptxas/cuobjdump in the triton wheel")


# ----------------------------------------------------------------------------- arithmetic

@pytest.mark.parametrize("arch,registers,shared,threads,expected,limit", [
    # 128 regs x 32 lanes = 4096 per warp: 4 warps per sub-partition, 16 per SM, 2 CTAs of 8 warps
    (H200, 128, 0, 256, 2, "registers"),
    # 255 regs round up to 8192 per warp: 2 warps per sub-partition, 8 per SM, 2 CTAs of 4 warps
    (H200, 255, 0, 128, 2, "registers"),
    # 132096 B + 1 KB reserved = 133120 B per CTA: one fits in 233472 B
    (H200, 100, 132096, 128, 1, "shared"),
    (H200, 100, 99328, 128, 2, "shared"),
    # 32 regs, 128 threads: 16 CTAs by threads (64 warps), 16 by registers; the threads limit
    # is reported after registers at a tie
    (H200, 32, 0, 128, 16, "registers"),
    # tiny CTAs: the 32-CTA cap
    (H200, 16, 0, 32, 32, "ctas"),
    # A100: 167936 B per SM
    (A100, 100, 82944, 128, 2, "shared"),
    (A100, 100, 99328, 128, 1, "shared"),
])
def test_ctas_per_sm(arch, registers, shared, threads, expected, limit):
    got = occ.occupancy(arch, registers=registers, shared_bytes=shared, threads=threads)
    assert (got.ctas_per_sm, got.limited_by) == (expected, limit)


def test_a_cta_that_cannot_fit_gets_zero():
    assert occ.occupancy(H200, registers=64, shared_bytes=232448 + 1, threads=128).ctas_per_sm == 0
    assert occ.occupancy(A100, registers=64, shared_bytes=166912 + 1, threads=128).ctas_per_sm == 0
    # 1024 threads x 65 registers: 2304 registers per warp x 32 warps > 65536 per CTA
    assert occ.occupancy(H200, registers=65, shared_bytes=0, threads=1024).ctas_per_sm == 0
    assert occ.occupancy(H200, registers=64, shared_bytes=0, threads=1024).ctas_per_sm == 1
    with pytest.raises(ValueError, match="threads"):
        occ.occupancy(H200, registers=32, shared_bytes=0, threads=0)


def test_waves():
    assert occ.waves(3072, 132, 1) == pytest.approx(23.2727, abs=1e-4)  # 48 fusers x 64 tiles, 1 CTA/SM
    assert occ.full_waves(3072, 132, 1) == 24
    assert occ.waves(768, 132, 2) == pytest.approx(2.9091, abs=1e-4)
    assert occ.full_waves(264, 132, 2) == 1  # exactly one full wave
    assert occ.waves(100, 132, 0) is None
    with pytest.raises(ValueError, match="sms"):
        occ.waves(1, 0, 1)
    with pytest.raises(ValueError, match="arch"):
        occ.arch("sm_75")


def _launch(tokens, grid, registers=100, spills=0, shared=98304, bm=64, first=True, mma=("wgmma",), gemm=True,
            warps=4, dtype="bf16", h="h1"):
    return dict(kernel="k", constexprs={"DOT_DTYPE": "bf16", "stride_w_k": "1", "BM": str(bm), "BN": "64"},
                num_warps=warps, num_stages=4, dtype=dtype, registers=registers, spills=spills, shared=shared,
                static_shared=1024, gemm=gemm, mma=list(mma), hash=h, workload="w", first_workload=first,
                layout="hf", variant="aligned", tokens=tokens, grid=[grid, 1, 1])


def test_rows_take_the_worst_specialisation_and_the_first_workloads_grid():
    launches = [_launch(64, 768), _launch(64, 768, registers=140, h="h2"),  # two binaries of one config
                _launch(1024, 12288), _launch(1024, 50000, first=False),  # another workload: not waved
                _launch(64, 384, bm=128)]
    rows = {r["config"]: r for r in triton_rows("sm_90a", launches, tokens=(64, 1024, 16384))}
    assert set(rows) == {"BM=64 BN=64 warps=4 stages=4", "BM=128 BN=64 warps=4 stages=4"}
    r = rows["BM=64 BN=64 warps=4 stages=4"]
    assert (r["registers"], r["shared_bytes"], r["binaries"], r["threads"]) == (140, 99328, 2, 128)
    assert r["ctas_per_sm"] == 2  # 99328 + 1024 reserved: two fit in 233472 B; 140 regs x 4 warps fit 3
    assert r["grid_64"] == 768 and r["waves_64"] == pytest.approx(2.91)
    assert r["grid_1024"] == 12288 and r["waves_1024"] == pytest.approx(46.55)
    assert r["grid_16384"] is None and r["waves_16384"] is None  # not a candidate there
    assert r["candidate_at_tokens"] == [64, 1024] and r["wgmma"] is True


def test_gate_flags_spills_missing_wgmma_and_shared():
    rows = triton_rows("sm_90a", [_launch(64, 10, spills=16, h="a")]) + \
        triton_rows("sm_90a", [_launch(64, 10, bm=32, mma=("mma",), h="b")]) + \
        triton_rows("sm_80", [_launch(64, 10, bm=16, shared=200000, mma=("mma",), h="c")]) + \
        triton_rows("sm_80", [_launch(64, 10, bm=8, spills=8, mma=("mma",), h="d")]) + \
        triton_rows("sm_90a", [_launch(64, 10, bm=4, gemm=False, mma=(), h="e")])
    found = violations(rows)
    assert len(found) == 3, found
    assert found[0].startswith("spill: triton k [BM=64") and "16 B" in found[0]
    assert found[1].startswith("no wgmma: triton k [BM=32")
    assert found[2].startswith("shared: triton k [BM=16") and "sm_80" in found[2] and "166912 B" in found[2]
    # spills on sm_80 and a kernel without a GEMM are no violations
    assert "BM=8" not in " ".join(found) and "BM=4" not in " ".join(found)
    text = table(rows)
    assert "NO" in text and "waves@1024" in text.splitlines()[0]


def test_config_label_leaves_out_dtypes_and_unit_strides():
    assert config_label({"CACHE_DTYPE": "triton.language.bfloat16", "DOT_DTYPE": "fp16", "stride_w_k": "1",
                         "VEC": "8", "BM": "128"}, 8, 3) == "VEC=8 BM=128 warps=8 stages=3"


# ----------------------------------------------------------------------------- parsers

def test_parsers_read_cuobjdump_and_ptxas_output():
    usage = ("Resource usage:\n Common:\n  GLOBAL:0\n Function _Z1kIfEvv:\n"
             "  REG:46 STACK:8 SHARED:1024 LOCAL:24 CONSTANT[0]:3672 TEXTURE:0 SURFACE:0 SAMPLER:0\n"
             " Function other:\n  REG:12 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:8\n")
    got = resources.parse_resource_usage(usage)
    k = got["_Z1kIfEvv"]
    assert (k.registers, k.stack_bytes, k.local_bytes, k.static_shared, k.spill_bytes) == (46, 8, 24, 1024, 32)
    assert got["other"].registers == 12
    elf = (".nv.info._Z1kIfEvv\n\tAttribute:\tEIATTR_MAX_THREADS\n\tFormat:\tEIFMT_SVAL\n"
           "\tValue:\t0x100 0x1 0x1 \n.nv.info.other\n\tAttribute:\tEIATTR_REGCOUNT\n\tValue:\t0xc\n")
    assert resources.parse_max_threads(elf) == {"_Z1kIfEvv": 256}
    sass = ("\t\tFunction : gemm\n /*0010*/ HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;\n"
            "\t\tFunction : old\n /*0010*/ HMMA.16816.F32.BF16 R4, R8, R12, R4 ;\n"
            "\t\tFunction : none\n FFMA R1, R2, R3 ;\n")
    assert resources.parse_sass_mma(sass) == {"gemm": {"HGMMA"}, "old": {"HMMA"}, "none": set()}
    log = ("ptxas info    : Compiling entry function '_Z1kIfEvv' for 'sm_90a'\n"
           "ptxas info    : Function properties for _Z1kIfEvv\n"
           "    16 bytes stack frame, 12 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 1028 bytes smem, 3672 bytes cmem[0]\n")
    assert resources.parse_ptxas_log(log) == {"_Z1kIfEvv": dict(stack=16, spill_stores=12, spill_loads=12,
                                                                registers=255, smem=1028)}
    assert resources.split_kernel_name(
        "void c2c::cuda::(anonymous namespace)::gated_merge_kernel<__nv_bfloat16, float>"
        "(c2c::cuda::MergeParams<__nv_bfloat16, float>)") == ("gated_merge_kernel", "<__nv_bfloat16, float>")


# ----------------------------------------------------------------------------- the real compiler

PROBE = """
import json, sys, torch, triton, triton.language as tl
from c2c_kernels.compile_check.driver import GPUS, stand_in_gpu, stand_in_tensor

@triton.jit
def dot_kernel(a_ptr, b_ptr, c_ptr, N: tl.constexpr):
    r = tl.arange(0, N)
    a = tl.load(a_ptr + r[:, None] * N + r[None, :])
    b = tl.load(b_ptr + r[:, None] * N + r[None, :])
    tl.store(c_ptr + r[:, None] * N + r[None, :], tl.dot(a, b))

@triton.jit
def spill_kernel(x_ptr, y_ptr, M: tl.constexpr, N: tl.constexpr):
    # a 32 x 64 fp32 tile held by one warp across two reductions: 64 live values per thread,
    # launched with at most 32 registers
    r, c = tl.arange(0, M), tl.arange(0, N)
    x = tl.load(x_ptr + r[:, None] * N + c[None, :])
    y = x - tl.max(x, 1)[:, None]
    tl.store(y_ptr + r[:, None] * N + c[None, :], y * tl.sum(y, 1)[:, None] + x)

out = {}
for arch in sys.argv[1:]:
    with stand_in_gpu(GPUS[arch]) as d:
        t = lambda *s, dt=torch.bfloat16: stand_in_tensor(s, dt)
        dot_kernel[(1,)](t(64, 64), t(64, 64), t(64, 64, dt=torch.float32), N=64, num_warps=4)
        spill_kernel[(1,)](t(32, 64, dt=torch.float32), t(32, 64, dt=torch.float32), M=32, N=64, num_warps=1,
                           maxnreg=32)
    out[arch] = [dict(kernel=l.kernel, registers=l.registers, spills=l.spills, gemm=l.gemm, mma=list(l.mma))
                 for l in d.launches]
print(json.dumps(out))
"""


@needs_tools
def test_stand_in_driver_reads_registers_spills_and_wgmma_from_the_cubin(tmp_path):
    """The figures the gate judges come from the compiled code: a tl.dot is warpgroup MMA on
    sm_90a and mma.sync on sm_80, and a tile too large for the registers it may use spills."""
    script = tmp_path / "probe.py"  # @triton.jit reads the kernel's source from its file
    script.write_text(PROBE)
    for arch, mma in (("sm_90a", ["wgmma"]), ("sm_80", ["mma"])):
        # one architecture per process: Triton keeps a function's target once it compiled it
        proc = _run([sys.executable, str(script), arch], timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        dot, spill = json.loads(proc.stdout.splitlines()[-1])[arch]
        assert dot["gemm"] is True and dot["mma"] == mma and 0 < dot["registers"] <= 255, (arch, dot)
        # ptxas spills into the stack frame (cuobjdump's STACK, not LOCAL): the report counts both
        assert spill["gemm"] is False and spill["spills"] > 0 and spill["registers"] <= 32, (arch, spill)


@needs_tools
def test_static_report_gate_on_the_ci_subset(tmp_path):
    """CI's gate. Every Triton row is a configuration the autotuner may pick for the first
    workload (or the one config a fixed stage uses): none may spill on sm_90a, every GEMM must
    use wgmma, and nothing may ask for more shared memory than an SM gives one CTA. Triton's
    disk cache is reused (its key covers source, options and compiler), so a second run takes
    seconds; CUDA files that include torch's headers are read from build/static_report only."""
    out = tmp_path / "static.json"
    proc = _run([sys.executable, os.path.join(ROOT, "benchmarks", "static_report.py"), "--subset", "--json", str(out)],
                timeout=900)
    assert out.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert not report["failures"], report["failures"]
    rows = report["rows"]
    triton = [r for r in rows if r["backend"] == "triton"]
    gemms = [r for r in triton if r["gemm"]]
    assert gemms and {r["arch"] for r in triton} == {"sm_90a"}
    # both token buckets were compiled: the small-T and the large-T candidates
    assert any(64 in r["candidate_at_tokens"] for r in gemms) and any(1024 in r["candidate_at_tokens"] for r in gemms)
    assert all(r["waves_64"] is not None or r["waves_1024"] is not None for r in gemms)
    built = [c for c in report["cuda_sources"] if c["status"] in ("cached", "compiled")]
    assert all(c["status"] != "failed" for c in report["cuda_sources"]), report["cuda_sources"]
    assert bool(built) == any(r["backend"] == "cuda" for r in rows), report["cuda_sources"]
    assert report["violations"] == [], "static gate:\n" + "\n".join(report["violations"])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
