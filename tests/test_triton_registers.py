"""Register use of the cache-gathering Triton kernels on unaligned views (VEC=1), compiled for
sm_90a without a GPU (the stand-in H200 of c2c_kernels.compile_check) and read back with ptxas.

On a view that is not 16-byte aligned every element of a gathered tile carries its own 64-bit
address. With 64/128-wide K tiles and a runtime head dim / page size the input GEMM used 255
registers and spilled up to ~5 KB per thread, the in-place output epilogue up to ~2 KB. Every
config the autotuner may pick there (and the fixed in-place config) must now compile without
spills, in bf16 and fp16, at a short and a long prompt.
"""
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")

pytestmark = pytest.mark.skipif(not os.path.exists(PTXAS), reason=f"no ptxas in the triton wheel ({PTXAS})")

# Runs without TRITON_INTERPRET (conftest sets it): launches the two cache-touching GEMM stages
# and the merge on stand-in tensors of the first workload's geometry with vec=1, records every
# compiled kernel and prints ptxas's registers and spill bytes for each as JSON.
PROBE = r"""
import json, re, subprocess, sys, tempfile, types
import torch, triton.runtime.jit as jit
from c2c_kernels.compile_check.driver import stand_in_h200, stand_in_tensor
from c2c_kernels.backends.triton import cache_merge, input_gemm, output_gemm
from c2c_kernels.backends.triton._common import TL_DTYPES

compiled = []
_compile = jit.JITFunction._do_compile
def _spy(self, key, signature, device, constexprs, options, attrs, warmup):
    kernel = _compile(self, key, signature, device, constexprs, options, attrs, warmup)
    names = self.arg_names
    cx = {names[p[0]]: str(v) for p, v in constexprs.items() if isinstance(p, tuple) and len(p) == 1}
    compiled.append((self.__name__, cx, kernel))
    return kernel
jit.JITFunction._do_compile = _spy

P, R, H, HEADS, DIM, S_HEADS, S_DIM, PAGE = 4, 4, 1024, 8, 128, 2, 64, 16
with stand_in_h200():
    for dtype in (torch.bfloat16, torch.float16):
        t = lambda *shape, dt=dtype: stand_in_tensor(shape, dt)
        w = types.SimpleNamespace(w_in_sharer=t(P, H, S_HEADS * S_DIM), w_in_receiver=t(P, H, HEADS * DIM),
                                  b_in=t(P, H), w_out=t(P, HEADS * DIM, H), b_out=t(P, HEADS * DIM),
                                  b_head=t(P, HEADS), gate_logit=t(P))
        table = t(R, 9, dt=torch.int64)
        receiver, sharer = t(256, PAGE, HEADS, DIM), t(256, PAGE, S_HEADS, S_DIM)
        cd = TL_DTYPES[dtype]
        for tokens in (64, 1024):
            slots = t(tokens, dt=torch.int64)
            input_gemm.launch(table, slots, slots, receiver, sharer, w, t(R, tokens, H),
                              t(R, tokens, H // 32, dt=torch.float32), cache_dtype=cd,
                              dot_dtype=cd, receiver_vec=1, sharer_vec=1)
            output_gemm.launch(table, slots, receiver, t(R, tokens, H), w, t(R, 8, tokens, HEADS, dt=torch.float32),
                               cache_dtype=cd, dot_dtype=cd, vec=1)
            cache_merge.launch(t(R, 4, dt=torch.int64), t(R * 2, 6, dt=torch.int64), slots, receiver, 2,
                               cache_dtype=cd, vec=1, unit_columns=True)
rows = []
for name, cx, kernel in compiled:
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(kernel.asm["ptx"])
        f.flush()
        err = subprocess.run([sys.argv[1], "-v", "--gpu-name=sm_90a", f.name, "-o", "/dev/null"],
                             capture_output=True, text=True).stderr
    rows.append(dict(kernel=name, constexprs=cx, registers=int(re.search(r"Used (\d+) registers", err).group(1)),
                     spill_bytes=int(re.search(r"(\d+) bytes spill stores", err).group(1))))
print(json.dumps(rows))
"""


def test_unaligned_gather_kernels_do_not_spill(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", PROBE, PTXAS], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    gemms = [r for r in rows if r["kernel"] == "input_gemm_kernel"]
    assert len({r["constexprs"]["BM"] + "x" + r["constexprs"]["BN"] for r in gemms}) >= 3, \
        "the autotuner's candidates for the input GEMM were not all compiled"
    assert {r["kernel"] for r in rows} >= {"input_gemm_kernel", "output_gemm_kernel", "merge_kernel"}
    from c2c_kernels.backends.triton import configs
    for r in gemms:
        assert int(r["constexprs"]["BK"]) <= configs.UNALIGNED_BK, r
    spilled = [r for r in rows if r["spill_bytes"]]
    assert not spilled, "\n".join(f"{r['kernel']} {r['constexprs']}: {r['registers']} registers, "
                                  f"{r['spill_bytes']} B spilled" for r in spilled)
