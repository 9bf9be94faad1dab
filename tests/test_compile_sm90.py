"""Every Triton kernel of the package compiles for sm_90a without a GPU, through the package's own
host code (c2c_kernels.compile_check: a stand-in Triton driver for an H200). The interpreter
reads any Python global in a kernel, so a kernel that cannot compile for a GPU (e.g. a plain
float constant in gelu.py) passed every CPU test until this one."""
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")

pytestmark = pytest.mark.skipif(not os.path.exists(PTXAS), reason=f"no ptxas in the triton wheel ({PTXAS})")


def _compile_check(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # conftest sets it
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile, do not reuse
    out = tmp_path / "launches.json"
    proc = subprocess.run([sys.executable, "-m", "c2c_kernels.compile_check", *args, "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


def test_every_kernel_compiles_for_sm90a(tmp_path):
    report, stdout = _compile_check(tmp_path, "--quick")
    assert not report["failures"]
    kernels = {row["kernel"] for row in report["rows"]}
    training = {"_gelu_kernel", "_gelu_backward_kernel", "_dropout_add_kernel", "_dropout_grad_kernel",
                "_gated_merge_kernel", "_gated_merge_backward_kernel", "_rms_norm_kernel",
                "_rms_norm_backward_kernel"}
    assert training <= kernels, sorted(training - kernels)
    # fuse, project and merge ran their real pipelines (GEMM stages, slot preparation, merge).
    assert {"input_gemm_kernel", "ffn_up_kernel", "ffn_down_kernel", "output_gemm_kernel",
            "prepare_slots_kernel"} <= kernels, sorted(kernels)
    assert any("merge" in k and not k.startswith("_gated") for k in kernels), sorted(kernels)
    # Nothing over the H200's shared memory per block.
    assert max(row["shared"] for row in report["rows"]) <= 232448
    print(stdout.splitlines()[-1])


def test_a_plain_global_in_a_kernel_fails_to_compile(tmp_path):
    """The stand-in driver really compiles: the bug the interpreter hid is caught."""
    code = (
        "import torch, triton, triton.language as tl\n"
        "from c2c_kernels.compile_check.driver import stand_in_h200, stand_in_tensor\n"
        "C = 0.5\n"
        "@triton.jit\n"
        "def k(x_ptr, n, BLOCK: tl.constexpr):\n"
        "    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)\n"
        "    tl.store(x_ptr + o, tl.load(x_ptr + o, mask=o < n) * C, mask=o < n)\n"
        "with stand_in_h200() as driver:\n"
        "    k[(1,)](stand_in_tensor((100,), torch.float32), 100, BLOCK=128)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    # The script runs from tmp_path: import the package from this checkout, installed or not.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    script = tmp_path / "plain_global.py"  # @triton.jit reads the kernel's source from its file
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "global variable" in proc.stderr.lower() or "constexpr" in proc.stderr
