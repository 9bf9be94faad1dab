"""The CPU backend's GEMM engines and the choice between them (docs/cpu.md): every engine
forced on whatever CPU runs the tests agrees with the reference (speed lives in benchmarks),
and the automatic choice is measured once per (dtype, token class, hidden) and then cached,
while C2C_CPU_GEMM forces an engine without measuring."""
import pytest
import torch

from c2c_kernels import backends, reference
from c2c_kernels.testing import TOLERANCES, assert_storage_close, make_case, reference_fused

pytestmark = pytest.mark.skipif(backends.reason("cpu") is not None,
                                reason=f"cpu backend unavailable: {backends.reason('cpu')}")

ENGINES = {"fp32": "fp32", "native": "native16", "brgemm": "brgemm"}  # C2C_CPU_GEMM value -> name


def cpu():
    return backends.get("cpu")


@pytest.fixture
def auto_engine(monkeypatch):
    """No forced engine and no remembered choice."""
    monkeypatch.delenv("C2C_CPU_GEMM", raising=False)
    cpu().engine_choices(clear=True)
    yield
    cpu().engine_choices(clear=True)


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [
    dict(hidden=96, intermediate=80, seq_lens=(9, 4, 6), padding=3),
    # odd widths (K not a multiple of 2: no VNNI pairs), more tokens than one micro-kernel block
    dict(hidden=45, intermediate=33, receiver_dim=7, sharer_dim=5, seq_lens=(40, 3), padding=2),
], ids=["even", "odd"])
def test_forced_engine_matches_the_reference(monkeypatch, engine, dtype, shape):
    monkeypatch.setenv("C2C_CPU_GEMM", engine)
    assert cpu().config(dtype).startswith("gemm=" + ENGINES[engine])
    assert cpu().choose_engine(dtype, 64, 96) == ENGINES[engine]
    case = make_case(layout="flashinfer_hnd", sharer_layout="vllm_nhd", dtype=dtype, seed=31, **shape)
    expected = reference_fused(case)
    want_p, want_a = reference.project(case.receiver_caches, case.sharer_caches, case.receiver_slots,
                                       case.sharer_slots, case.weights, case.fusers)
    got_p, got_a = torch.ops.c2c.project(*case.args(), "cpu", False)
    torch.testing.assert_close(got_p, want_p, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(got_a, want_a, atol=5e-2, rtol=5e-2)
    torch.ops.c2c.fuse(*case.args(), "cpu", False)
    assert_storage_close(case, expected, TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_choice_is_measured_once_per_class(auto_engine, dtype):
    first = cpu().choose_engine(dtype, 40, 96)
    assert first in ENGINES.values()
    assert cpu().choose_engine(dtype, 100, 96) == first  # same class (17..128 tokens): cached
    log = cpu().engine_choices()
    assert len(log) == 1 and f": {first} (" in log[0] and "tokens<=128 hidden=96" in log[0], log
    cpu().choose_engine(dtype, 4, 96)      # decode class
    cpu().choose_engine(dtype, 40, 64)     # another hidden width
    assert len(cpu().engine_choices()) == 3
    assert cpu().choose_engine(dtype, 40, 96) == first
    assert len(cpu().engine_choices()) == 3
    assert cpu().config(dtype).startswith("gemm=auto")


def test_clear_forgets_the_choices(auto_engine):
    cpu().choose_engine(torch.bfloat16, 40, 96)
    assert len(cpu().engine_choices(clear=True)) == 1
    assert cpu().engine_choices() == []
    cpu().choose_engine(torch.bfloat16, 40, 96)
    assert len(cpu().engine_choices()) == 1


def test_forcing_skips_the_measurement(auto_engine, monkeypatch):
    for value, name in ENGINES.items():
        monkeypatch.setenv("C2C_CPU_GEMM", value)
        assert cpu().choose_engine(torch.bfloat16, 40, 96) == name
    assert cpu().engine_choices() == []
    monkeypatch.setenv("C2C_CPU_GEMM", "auto")
    assert cpu().choose_engine(torch.bfloat16, 40, 96) in ENGINES.values()
    assert len(cpu().engine_choices()) == 1


def test_fp32_caches_always_take_the_fp32_engine(auto_engine, monkeypatch):
    assert cpu().choose_engine(torch.float32, 512, 1024) == "fp32"
    monkeypatch.setenv("C2C_CPU_GEMM", "native")
    assert cpu().choose_engine(torch.float32, 512, 1024) == "fp32"
    assert cpu().engine_choices() == []


def test_fuse_measures_its_class_at_first_call(auto_engine):
    """A call runs the chooser for its own (dtype, token class, hidden): 6 valid tokens, H = 40."""
    case = make_case(dtype=torch.bfloat16, seed=32, seq_lens=(4, 2), padding=3, hidden=40, intermediate=24)
    expected = reference_fused(case)
    torch.ops.c2c.fuse(*case.args(), "cpu", False)
    log = cpu().engine_choices()
    assert len(log) == 1 and "tokens<=16 hidden=40" in log[0], log
    assert_storage_close(case, expected, TOLERANCES[torch.bfloat16])


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="hidden > 0"):
        cpu().choose_engine(torch.bfloat16, 4, 0)
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        cpu().choose_engine(torch.int32, 4, 8)
