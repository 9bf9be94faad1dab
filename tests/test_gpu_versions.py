"""The versions the package supports (c2c_kernels.compat): the declared torch range, torch.compile
on the torch versions whose inductor miscompiles in-place list ops, and the Triton interpreter's
numpy limit."""
import os
import re

import pytest
import torch

import c2c_kernels as c2c
from c2c_kernels import compat, reference
from c2c_kernels.testing import LAYOUTS, TOLERANCES, make_case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("version,broken", [("2.10.0", False), ("2.11.0+cu130", True), ("2.11.0", True),
                                            ("2.12.1+cu130", True), ("2.13.0+cpu", False),
                                            ("2.14.1+cu130", False), ("3.0.0a0", False)])
def test_broken_inductor_versions(version, broken):
    assert compat.inductor_list_mutation_broken(version) is broken
    if broken:
        assert "torch >= 2.13" in compat.inductor_refusal("c2c::fuse", version)


def test_version_parsing():
    assert compat.major_minor("2.11.0+cu130") == (2, 11)
    with pytest.raises(ValueError, match="version"):
        compat.major_minor("nightly")


def test_setup_declares_the_supported_torch():
    with open(os.path.join(ROOT, "setup.py")) as f:
        text = f.read()
    lowest = ".".join(map(str, compat.MIN_TORCH))
    assert re.search(rf'"torch>={re.escape(lowest)}[,"]', text), f"setup.py must require torch>={lowest}"
    assert compat.major_minor() >= compat.MIN_TORCH


def _compiled_fuse_all(layout, compile_backend):
    case = make_case(seed=32, layout=layout, sharer_layout="flashinfer_hnd" if layout == "hf" else "hf")
    expected = case.clone_receiver()
    reference.fuse(expected.receiver_caches, expected.sharer_caches, expected.receiver_slots,
                   expected.sharer_slots, expected.weights, expected.fusers)
    ckpt = c2c.make_checkpoint(case.weights, {0: 0, 1: 1}, sharer_heads=case.sharer.kv[0][0].shape[2])

    # Not fullgraph: this pins what the compiler does with the op, whatever the Python around it.
    @torch.compile(backend=compile_backend)
    def step(receiver_kv, sharer_kv, receiver_slots, sharer_slots):
        c2c.fuse_all(ckpt, receiver_kv, sharer_kv, receiver_slots, sharer_slots, backend="reference")

    torch._dynamo.reset()
    # No cached graph: the refusal is made while lowering, which a cache hit would skip.
    with torch._inductor.config.patch(force_disable_caches=True):
        step(case.receiver.kv, case.sharer.kv, case.receiver_slots, case.sharer_slots)
    return case, expected


@pytest.mark.parametrize("layout", LAYOUTS)
def test_compiled_fuse_all_is_right_or_refused(layout):
    """torch 2.11/2.12's inductor returned caches off by up to 1e38 for the hf, vLLM and FlashInfer
    NHD layouts (it copies a view that shares a storage from the wrong address): refused there
    with a clear error, right everywhere else."""
    if compat.inductor_list_mutation_broken():
        with pytest.raises(Exception, match=r"c2c::fuse: torch.compile's inductor backend miscompiles"):
            _compiled_fuse_all(layout, "inductor")
        return
    case, expected = _compiled_fuse_all(layout, "inductor")
    tol = TOLERANCES[torch.float32]
    for got, want in zip(case.receiver.storage, expected.receiver.storage):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("layout", ["hf", "vllm_nhd"])
def test_aot_eager_compile_is_right_on_every_torch(layout):
    case, expected = _compiled_fuse_all(layout, "aot_eager")
    for got, want in zip(case.receiver.storage, expected.receiver.storage):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_triton_interpreter_numpy_limit(monkeypatch):
    import numpy
    import triton

    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    assert "numpy<2.4" in compat.triton_interpreter_problem()
    monkeypatch.setattr(numpy, "__version__", "2.3.5")
    assert compat.triton_interpreter_problem() is None
    monkeypatch.setattr(triton, "__version__", "3.8.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    assert compat.triton_interpreter_problem() is None
