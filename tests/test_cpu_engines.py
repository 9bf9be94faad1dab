"""The CPU backend's GEMM engines and the choice between them (docs/cpu.md): every engine
forced on whatever CPU runs the tests agrees with the reference (speed lives in benchmarks),
and the automatic choice is measured once per (dtype, token class, hidden) and then cached,
while C2C_CPU_GEMM forces an engine without measuring."""
import os

import pytest
import torch

from c2c_kernels import backends, reference
from c2c_kernels.testing import TOLERANCES, assert_storage_close, make_case, reference_fused

pytestmark = pytest.mark.skipif(backends.reason("cpu") is not None,
                                reason=f"cpu backend unavailable: {backends.reason('cpu')}")

# C2C_CPU_GEMM value -> name
ENGINES = {"fp32": "fp32", "native": "native16", "brgemm": "brgemm", "packed": "packed"}


def cpu():
    return backends.get("cpu")


def _packed_available(dtype=torch.bfloat16):
    """Whether the packed engine runs ``dtype`` here (torch with mkldnn, oneDNN taking the dtype
    on this CPU); where not, forcing it runs native16 and config says so."""
    old = os.environ.get("C2C_CPU_GEMM")
    os.environ["C2C_CPU_GEMM"] = "packed"
    try:
        return cpu().config(dtype).startswith("gemm=packed")
    finally:
        if old is None:
            del os.environ["C2C_CPU_GEMM"]
        else:
            os.environ["C2C_CPU_GEMM"] = old


needs_packed = pytest.mark.skipif(backends.reason("cpu") is None and not _packed_available(),
                                  reason="torch without mkldnn: no packed engine")


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
    if engine == "packed" and not _packed_available(dtype):
        pytest.skip(f"no packed engine for {dtype} here")
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
        if value == "packed" and not _packed_available():
            continue
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


def _project(case):
    return torch.ops.c2c.project(*case.args(), "cpu", False)


def _reference_project(case):
    return reference.project(case.receiver_caches, case.sharer_caches, case.receiver_slots, case.sharer_slots,
                             case.weights, case.fusers)


@needs_packed
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_packed_sees_weights_written_in_place(monkeypatch, dtype):
    """The packed copies are cached per weight stack and version: a stack written in place after
    a call (same pointer, sizes, strides and dtype) must be packed again, not served stale."""
    if not _packed_available(dtype):
        pytest.skip(f"no packed engine for {dtype} here")
    monkeypatch.setenv("C2C_CPU_GEMM", "packed")
    monkeypatch.setenv("C2C_CPU_PACK_AFTER", "1")  # pack at the first call
    cpu().packed_cache(clear=True)
    case = make_case(layout="flashinfer_hnd", dtype=dtype, seed=33, hidden=48, intermediate=40, seq_lens=(7, 5))
    got_p, got_a = _project(case)
    want_p, want_a = _reference_project(case)
    torch.testing.assert_close(got_p, want_p, atol=5e-2, rtol=5e-2)
    entries = cpu().packed_cache()["entries"]
    assert entries > 0
    assert _project(case)[0].equal(got_p)  # served from the cache: nothing packed anew
    assert cpu().packed_cache()["entries"] == entries
    with torch.no_grad():  # every GEMM weight of every fuser changes, pointers stay
        for name in ("w_in_sharer", "w_in_receiver", "ffn_w1", "ffn_w2", "head_w1", "head_w2", "w_out"):
            stack = getattr(case.weights, name)
            ptr = stack.data_ptr()
            stack.copy_(torch.flip(stack, dims=[-1]) * 1.5)
            assert stack.data_ptr() == ptr
    want_p, want_a = _reference_project(case)
    assert not torch.allclose(want_p, got_p, atol=5e-2, rtol=5e-2)  # the change is visible
    got_p, got_a = _project(case)
    torch.testing.assert_close(got_p, want_p, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(got_a, want_a, atol=5e-2, rtol=5e-2)
    # the stale versions were dropped, not kept beside the new ones
    assert cpu().packed_cache()["entries"] == entries
    cpu().packed_cache(clear=True)
    assert cpu().packed_cache() == {"entries": 0, "bytes": 0}


@needs_packed
@pytest.mark.parametrize("after", [2, 3])
def test_packed_packs_a_weight_at_its_second_call(monkeypatch, after):
    """Packing costs about 20 GEMMs of 64 tokens per matrix: a weight is packed at its
    C2C_CPU_PACK_AFTER-th call (default 2), the calls before run native16 on the plain weight
    (GELU as a pass), so one-shot use never pays for packing. Every call is right."""
    monkeypatch.setenv("C2C_CPU_GEMM", "packed")
    if after != 2:
        monkeypatch.setenv("C2C_CPU_PACK_AFTER", str(after))
    else:
        monkeypatch.delenv("C2C_CPU_PACK_AFTER", raising=False)
    cpu().packed_cache(clear=True)
    case = make_case(layout="vllm_hnd", dtype=torch.bfloat16, seed=35, hidden=48, intermediate=40, seq_lens=(9, 4))
    want_p, want_a = _reference_project(case)
    for call in range(1, after + 2):
        got_p, got_a = _project(case)
        torch.testing.assert_close(got_p, want_p, atol=5e-2, rtol=5e-2)
        torch.testing.assert_close(got_a, want_a, atol=5e-2, rtol=5e-2)
        entries = cpu().packed_cache()["entries"]
        if call < after:
            assert entries == 0, (call, entries)
        else:
            assert entries > 0, (call, entries)
    cpu().packed_cache(clear=True)


@needs_packed
def test_packed_does_not_cache_inference_tensors(monkeypatch):
    """Inference tensors have no version counter: forced packed still computes right, uncached."""
    monkeypatch.setenv("C2C_CPU_GEMM", "packed")
    cpu().packed_cache(clear=True)
    case = make_case(dtype=torch.bfloat16, seed=34, hidden=40, intermediate=24, seq_lens=(6, 3))
    want_p, _ = _reference_project(case)
    with torch.inference_mode():
        case.weights = type(case.weights)(*[t.clone() for t in case.weights])
        got_p, _ = _project(case)
    torch.testing.assert_close(got_p, want_p, atol=5e-2, rtol=5e-2)
    assert cpu().packed_cache()["entries"] == 0


@needs_packed
def test_forced_packed_falls_back_where_unavailable(monkeypatch):
    """fp16 needs AVX512-FP16 or AVX-NE-CONVERT in oneDNN: without them, forcing packed runs
    native16 (never an error from inside a call)."""
    monkeypatch.setenv("C2C_CPU_GEMM", "packed")
    for dtype in (torch.float16, torch.bfloat16):
        want = "packed" if _packed_available(dtype) else "native16"
        assert cpu().choose_engine(dtype, 40, 96) == want


@needs_packed
def test_chooser_times_the_packed_engine(auto_engine):
    cpu().choose_engine(torch.bfloat16, 40, 96)
    log = cpu().engine_choices()
    assert len(log) == 1 and " packed " in log[0] and "packed not timed" not in log[0], log


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_prior_is_packed_wherever_it_runs_and_the_chooser_times_gelu(auto_engine, dtype):
    """The CPU flags' prior for 16-bit caches: packed where oneDNN runs the dtype here (same
    kernels as native16, weights pre-packed, GELU fused), native16 where only the flags say the
    CPU has 16-bit units, fp32 otherwise; the chooser times a plain and a GELU GEMM per engine."""
    prior = cpu().config(dtype).split("CPU-flag prior ")[1].split(")")[0]
    assert prior in ("packed", "native16", "fp32"), prior
    if prior == "packed":
        assert _packed_available(dtype)
    if _packed_available(dtype):
        assert prior != "native16", "packed runs here, so it is the prior where the flags give a 16-bit one"
    cpu().choose_engine(dtype, 40, 96)
    (line,) = cpu().engine_choices()
    assert "(GEMM + GELU GEMM 40x96x96," in line and f"prior {prior})" in line, line
