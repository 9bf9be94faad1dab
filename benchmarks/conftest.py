"""Shared inputs of the microbenchmarks: the first workload of docs/fuser.md, built with the same
builders as c2c-bench and the tests. A CPU runs one fused layer in fp32 (kept short); a GPU
runs every fused layer in bf16.

A benchmark marked ``@pytest.mark.backends(op=..., extra=(...))`` is parametrized over
``device, backend, tokens`` from the backend registry (see :func:`backend_params`); the
``inputs_for`` fixture builds its inputs."""
from __future__ import annotations

import pytest
import torch

from c2c_kernels import backends
from c2c_kernels.bench.workloads import WORKLOADS, build_inputs, named_workload

WORKLOAD = next(iter(WORKLOADS))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SETTINGS = {
    "cpu": dict(layers=1, dtype=torch.float32, tokens=(64, 512)),
    "cuda": dict(layers=None, dtype=torch.bfloat16, tokens=(64, 512, 4096)),
}


def pytest_configure(config):
    config.addinivalue_line("markers", "backends(op=None, extra=()): parametrize device, backend, tokens over "
                                       "the usable backends that implement op, plus extra contenders")


def pytest_generate_tests(metafunc):
    marker = metafunc.definition.get_closest_marker("backends")
    if marker is not None:
        metafunc.parametrize("device,backend,tokens", backend_params(*marker.args, **marker.kwargs))


def backend_params(op: str | None = None, extra: tuple[str, ...] = ()):
    """``(device, backend, tokens)`` for every usable backend (emulators and the reference left
    out) that implements ``op`` itself (a backend without it would time the reference's), plus
    ``extra`` contenders."""
    params = []
    for device in DEVICES:
        names = [*extra, *(n for n in backends.available(device) if n != backends.FALLBACK
                           and (op is None or backends.implements(n, op)))]
        for name in names:
            for tokens in SETTINGS[device]["tokens"]:
                params.append(pytest.param(device, name, tokens, id=f"{device}-{name}-{tokens}"))
    return params


_inputs: dict = {}


def _inputs_for(device: str, tokens: int):
    key = (device, tokens)
    if key not in _inputs:
        workload = named_workload(WORKLOAD)
        s = SETTINGS[device]
        _inputs[key] = build_inputs(workload, layers=s["layers"] or workload.fused_layers, tokens=tokens,
                                    dtype=s["dtype"], layout="paged", device=device)
    return _inputs[key]


@pytest.fixture(scope="session")
def inputs_for():
    """``inputs_for(device, tokens)``: inputs of one ``fuse_all`` call, built once per session
    and kept: tests of one token count come from several files, and building a GPU workload
    takes seconds."""
    return _inputs_for
