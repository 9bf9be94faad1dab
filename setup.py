"""Builds c2c_kernels and its native extension c2c_kernels._C.

The extension always holds the CPU kernels (csrc/cpu). When torch was built with CUDA and a
CUDA toolkit is found it also compiles csrc/cuda for Hopper (sm_90a) and a portable target
(compute_80 PTX, JIT-compiled on any newer GPU); set TORCH_CUDA_ARCH_LIST to override, or
C2C_NO_CUDA=1 to skip. Install with `pip install --no-build-isolation -e .` so the build uses
the torch that is installed (an isolated build would pick another one).
"""
import glob
import os

# torch derives CUDA_HOME from the nvcc on PATH, which may be a wrapper outside the toolkit.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/include/cuda_runtime.h"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0+PTX;9.0a")

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_wanted() -> bool:
    if os.environ.get("C2C_NO_CUDA") == "1":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _extension():
    with_cuda = _cuda_wanted()
    sources = ["python/bindings.cpp", "python/cpu_ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    cxx = ["-O3"]  # torch picks the C++ standard its headers need
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not with_cuda:
        return cpp_extension.CppExtension("c2c_kernels._C", sources, include_dirs=include_dirs,
                                          extra_compile_args={"cxx": cxx})
    sources += ["python/cuda_ops.cpp", *sorted(glob.glob("csrc/cuda/*.cu"))]
    try:  # torch's CUDA headers include cuBLAS/cuSPARSE headers, shipped in the nvidia-* wheels
        import nvidia
        include_dirs += [p for p in (os.path.join(d, "cu13", "include") for d in nvidia.__path__)
                         if os.path.isdir(p)]
    except ImportError:
        pass
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    if os.environ.get("C2C_PTXAS_VERBOSE") == "1":
        nvcc.append("-Xptxas=-v")
    return cpp_extension.CUDAExtension(
        "c2c_kernels._C", sources, include_dirs=include_dirs,
        define_macros=[("C2C_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc})


setup(
    name="c2c-kernels",
    version="0.1.0",
    description="Fast Cache-to-Cache (C2C) KV-cache fusion: Triton and CUDA kernels with a PyTorch op layer",
    packages=find_packages(include=["c2c_kernels", "c2c_kernels.*"]),
    python_requires=">=3.10",
    # torch: 2.11 is the lowest one tested (CI: scripts/ci_lowest_torch.sh), 2.14 the highest; on
    # 2.11 and 2.12 torch.compile's inductor refuses the in-place ops (c2c_kernels/compat.py).
    install_requires=["torch>=2.11,<2.15", "numpy"],
    extras_require={
        "triton": ["triton>=3.6"],  # triton < 3.8's interpreter (CPU tests) needs numpy<2.4
        "test": ["pytest", "pytest-benchmark", "expecttest"],
        "bench": ["matplotlib", "tqdm"],
        "hf": ["transformers>=4.51", "tokenizers"],  # tested with 4.51.3 and 5.24.0
    },
    entry_points={"console_scripts": ["c2c-bench=c2c_kernels.bench:main",
                                     "c2c-train=c2c_kernels.training.cli:main"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
