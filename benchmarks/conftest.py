"""Shared inputs of the microbenchmarks: the first workload of fuser.md, built with the same
builders as c2c-bench and the tests. A CPU runs one fused layer in fp32 (kept short); a GPU
runs every fused layer in bf16."""
from __future__ import annotations

import pytest
import torch

from c2c_kernels import backends
from c2c_kernels.bench.workloads import build_inputs, named_workload
from c2c_kernels.testing import WORKLOADS

WORKLOAD = next(iter(WORKLOADS))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SETTINGS = {
    "cpu": dict(layers=1, dtype=torch.float32, tokens=(64, 512)),
    "cuda": dict(layers=None, dtype=torch.bfloat16, tokens=(64, 512, 4096)),
}


def backend_params(op: str | None = None, extra: tuple[str, ...] = ()):
    """``(device, backend, tokens)`` for every available backend that implements ``op`` itself
    (a backend without it would time the reference's), plus ``extra`` contenders."""
    params = []
    for device in DEVICES:
        names = [*extra, *(n for n in backends.available(device) if n != "reference")]
        for name in names:
            if op and name not in extra and not hasattr(backends._load(name), op):
                continue
            for tokens in SETTINGS[device]["tokens"]:
                params.append(pytest.param(device, name, tokens, id=f"{device}-{name}-{tokens}"))
    return params


_inputs: dict = {}


def inputs_for(device: str, tokens: int):
    """Inputs of one ``fuse_all`` call, built once per session and kept: tests of one token
    count come from several files, and building a GPU workload takes seconds."""
    key = (device, tokens)
    if key not in _inputs:
        workload = named_workload(WORKLOAD)
        s = SETTINGS[device]
        _inputs[key] = build_inputs(workload, layers=s["layers"] or workload.fused_layers, tokens=tokens,
                                    dtype=s["dtype"], layout="paged", device=device)
    return _inputs[key]


def synchronized(call, device: str):
    """pytest-benchmark reads a wall clock: a GPU call counts only once it has finished."""
    if device != "cuda":
        return call

    def run():
        out = call()
        torch.cuda.synchronize()
        return out
    return run
