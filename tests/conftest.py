import os

import torch

# Triton kernels run in the interpreter on machines without a GPU; this must be set before any
# @triton.jit function is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The CUDA backend's sources also run on the CPU emulator (built on first use, then cached).
os.environ.setdefault("C2C_CUDA_EMULATOR", "1")

import pytest  # noqa: E402

import c2c_kernels  # noqa: E402,F401  (registers torch.ops.c2c)
from c2c_kernels import backends  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_params(include_reference: bool = False):
    """(backend, device) pairs to test; unavailable ones are kept and skipped, so the report
    says what did not run and why."""
    names = ["reference"] if include_reference else []
    names += ["cpu", "triton", "cuda", "cuda_emulator"]
    params = []
    for device in ["cpu", "cuda"]:
        for name in names:
            module = backends._load(name)
            reason = None
            if device == "cuda" and not torch.cuda.is_available():
                reason = "no GPU"
            elif isinstance(module, str):
                reason = module
            elif device not in module.DEVICES:
                reason = f"{name} does not run on {device}"
            if reason and device == "cuda" and name == "cpu":
                continue
            if reason and device == "cpu" and name == "cuda":
                continue
            if device == "cuda" and name == "cuda_emulator":
                continue
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            params.append(pytest.param(name, device, id=f"{name}-{device}", marks=marks))
    return params
