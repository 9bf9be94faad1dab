"""The backend registry: each backend's metadata lives in its module, and everything that lists
backends (``auto``, ``available()``, the test matrix, the benchmarks, c2c-bench) derives from
``backends.REGISTRY`` plus that metadata, so a new backend is a module plus one entry."""
import sys
import types

import pytest
import torch

import c2c_kernels  # noqa: F401  (registers torch.ops.c2c)
from c2c_kernels import backends, reference
from c2c_kernels.testing import assert_storage_close, backend_params, make_case, reference_fused


@pytest.fixture
def registry(monkeypatch):
    """A registry the test may extend; the caches of the real one are restored afterwards."""
    for cache in ("_imported", "_loaded", "_auto"):
        monkeypatch.setattr(backends, cache, {})
    monkeypatch.setattr(backends, "REGISTRY", dict(backends.REGISTRY))
    return backends.REGISTRY


def add_fake_backend(monkeypatch, registry, name="fake", **metadata):
    """A backend that runs the reference fuse: a module plus one registry entry."""
    module = types.ModuleType(f"fake_backends.{name}")
    module.DEVICES = ("cpu",)
    module.unavailable = lambda: None
    module.fuse = reference.fuse
    for key, value in metadata.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    registry[name] = module.__name__
    return module


def test_auto_order_comes_from_module_metadata():
    assert backends.auto_order("cpu") == ("cpu", "reference")
    assert backends.auto_order("cuda") == ("triton", "cuda", "reference")
    assert backends.auto_order("meta") == ("reference",)


def test_emulator_is_test_only():
    assert backends.is_emulator("cuda_emulator")
    assert not any(backends.is_emulator(n) for n in backends.names() if n != "cuda_emulator")
    assert "cuda_emulator" not in backends.names(emulators=False)
    assert "cuda_emulator" not in backends.auto_order("cpu")


def test_unknown_name_is_a_clear_error():
    with pytest.raises(ValueError, match=r"backend: expected one of \['auto', 'reference'.*got 'nope'"):
        backends.get("nope")
    with pytest.raises(ValueError, match=r"backend: expected one of"):
        backends.reason("nope")


def test_get_and_reason_agree():
    for name in backends.names(emulators=False):
        why = backends.reason(name)
        if why is None:
            assert backends.get(name).DEVICES == backends.devices(name)
        else:
            with pytest.raises(backends.BackendUnavailable, match="is not available"):
                backends.get(name)


def test_matrix_lists_every_backend_on_each_target():
    matrix = backends.test_matrix(include_reference=True)
    assert {e.backend for e in matrix} == set(backends.names())
    for e in matrix:
        assert e.device in backends.targets(e.backend)
        if e.device == "cuda" and not torch.cuda.is_available():
            assert e.skip == "no GPU"
    assert "reference" not in {e.backend for e in backends.test_matrix(include_reference=False)}
    ids = [p.id for p in backend_params(include_reference=True)]
    assert ids == [f"{e.backend}-{e.device}" for e in matrix]


def test_a_new_backend_is_a_module_and_one_entry(monkeypatch, registry):
    add_fake_backend(monkeypatch, registry, AUTO={"cpu": -1})
    assert "fake" in backends.names()
    assert "fake" in backends.available("cpu")
    assert backends.auto_order("cpu")[0] == "fake"
    assert ("fake", "cpu", None) in backends.test_matrix()
    assert backends.implements("fake", "fuse") and not backends.implements("fake", "merge")
    assert "fake" not in [e.backend for e in backends.test_matrix(op="merge")]
    case = make_case(seed=3)
    want = reference_fused(case)
    torch.ops.c2c.fuse(*case.args(), "fake", False)  # through the op layer, as a user call goes
    assert_storage_close(case, want, 1e-6)


def test_an_emulator_stays_out_of_auto_and_available(monkeypatch, registry):
    add_fake_backend(monkeypatch, registry, name="fake_emulator", EMULATOR=True, AUTO={"cpu": -1})
    assert "fake_emulator" not in backends.auto_order("cpu")
    assert "fake_emulator" not in backends.available("cpu")
    assert "fake_emulator" in backends.available("cpu", emulators=True)
    assert ("fake_emulator", "cpu", None) in backends.test_matrix()


def test_unavailable_backend_is_skipped_with_its_reason(monkeypatch, registry):
    add_fake_backend(monkeypatch, registry, TARGETS=("cpu", "cuda"), unavailable=lambda: "needs a frobnicator")
    assert "fake" not in backends.available()
    assert backends.reason("fake") == "needs a frobnicator"
    skips = {e.device: e.skip for e in backends.test_matrix() if e.backend == "fake"}
    assert skips["cpu"] == "needs a frobnicator"
    assert skips["cuda"] == ("needs a frobnicator" if torch.cuda.is_available() else "no GPU")
    with pytest.raises(RuntimeError, match="backend 'fake' is not available: needs a frobnicator"):
        backends.resolve("fake", torch.device("cpu"))
