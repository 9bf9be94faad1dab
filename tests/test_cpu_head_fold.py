"""The CPU backend's head fold (docs/cpu.md, "Head fold"): the weight branch's logits computed as
``u W_head^T + g V^T`` with ``V = W_head W2h`` folded once per pair of weight stacks and cached,
instead of running the ``[tokens, H] x [H, H]`` W2h GEMM. Pins: the folded logits are the
reference's on every engine, dtype and odd shape; the cache notices weights written in place
and never serves a stale fold; inference tensors (no version counter) are never cached;
``C2C_CPU_HEAD_FOLD=0`` runs the GEMM and gives the same result."""
import pytest
import torch

from c2c_kernels import backends, reference
from c2c_kernels.testing import TOLERANCES, assert_storage_close, make_case, reference_fused

pytestmark = pytest.mark.skipif(backends.reason("cpu") is not None,
                                reason=f"cpu backend unavailable: {backends.reason('cpu')}")

ENGINES = ["fp32", "native", "brgemm", "packed"]
# odd hidden widths, one and three receiver heads, token counts that are not a multiple of the
# 4-row blocking of the logit kernel nor of the 8-row tasks
SHAPES = {
    "even": dict(hidden=64, intermediate=48, receiver_heads=4, receiver_dim=8, seq_lens=(9, 4, 6)),
    "odd": dict(hidden=45, intermediate=33, receiver_heads=3, receiver_dim=5, sharer_dim=7, seq_lens=(13, 2)),
    "one_head": dict(hidden=37, intermediate=24, receiver_heads=1, receiver_dim=6, seq_lens=(11,)),
}


def cpu():
    return backends.get("cpu")


def _project(case):
    return torch.ops.c2c.project(*case.args(), "cpu", False)


def _reference_project(case):
    return reference.project(case.receiver_caches, case.sharer_caches, case.receiver_slots, case.sharer_slots,
                             case.weights, case.fusers)


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.delenv("C2C_CPU_HEAD_FOLD", raising=False)
    cpu().head_fold_cache(clear=True)
    yield
    cpu().head_fold_cache(clear=True)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_fp32_logits_are_the_reference(shape):
    """fp32 everywhere: the folded head scales agree with the reference to fp32 rounding (a
    transposed or stale V, or a missing u W_head term, would be off by O(1))."""
    case = make_case(layout="vllm_hnd", dtype=torch.float32, seed=51, padding=3, **SHAPES[shape])
    got_p, got_a = _project(case)
    want_p, want_a = _reference_project(case)
    assert cpu().head_fold_cache()["fusers"] == len(case.fusers)  # the fold ran
    torch.testing.assert_close(got_a, want_a, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got_p, want_p, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", ["even", "odd"])
def test_every_engine_folds_right(monkeypatch, engine, dtype, shape):
    monkeypatch.setenv("C2C_CPU_GEMM", engine)
    case = make_case(layout="flashinfer_nhd", sharer_layout="sglang", dtype=dtype, seed=52, **SHAPES[shape])
    expected = reference_fused(case)
    want_p, want_a = _reference_project(case)
    got_p, got_a = _project(case)
    assert cpu().head_fold_cache()["fusers"] == len(case.fusers)
    torch.testing.assert_close(got_a, want_a, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got_p, want_p, atol=5e-2, rtol=5e-2)
    torch.ops.c2c.fuse(*case.args(), "cpu", False)
    assert_storage_close(case, expected, TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fold_off_runs_the_gemm_and_agrees(monkeypatch, dtype):
    case = make_case(dtype=dtype, seed=53, hidden=40, intermediate=24, seq_lens=(10, 7))
    folded_p, folded_a = _project(case)
    assert "head_fold=on" in cpu().config(dtype)
    monkeypatch.setenv("C2C_CPU_HEAD_FOLD", "0")
    cpu().head_fold_cache(clear=True)
    plain_p, plain_a = _project(case)
    assert "head_fold=off" in cpu().config(dtype)
    assert cpu().head_fold_cache()["fusers"] == 0
    want_p, want_a = _reference_project(case)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    for got in (folded_a, plain_a):
        torch.testing.assert_close(got, want_a, atol=tol, rtol=tol)
    torch.testing.assert_close(folded_p, plain_p, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("stack", ["w_head", "head_w2"])
def test_weights_written_in_place_are_folded_anew(stack):
    case = make_case(dtype=torch.float32, seed=55, hidden=40, intermediate=24, seq_lens=(9, 5))
    _project(case)
    entries = cpu().head_fold_cache()
    assert entries["entries"] == 1 and entries["fusers"] == len(case.fusers)
    t = getattr(case.weights, stack)
    ptr = t.data_ptr()
    with torch.no_grad():
        t.copy_(torch.flip(t, dims=[-1]) * -1.5)  # same memory, new values, version bumped
    assert t.data_ptr() == ptr
    want_p, want_a = _reference_project(case)
    got_p, got_a = _project(case)
    torch.testing.assert_close(got_a, want_a, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got_p, want_p, atol=2e-4, rtol=2e-4)
    # the stale fold was dropped, not kept beside the new one
    assert cpu().head_fold_cache()["entries"] == 1


def test_cache_is_reused_and_cleared():
    # fp32: one engine, so the two calls must agree bit for bit (16-bit caches may switch from
    # native16 to packed between the first and second call, see C2C_CPU_PACK_AFTER)
    case = make_case(dtype=torch.float32, seed=56, hidden=40, intermediate=24, seq_lens=(6, 3))
    first = _project(case)
    info = cpu().head_fold_cache()
    assert info == {"entries": 1, "bytes": len(case.fusers) * 4 * 40 * 4, "fusers": len(case.fusers)}
    second = _project(case)
    assert cpu().head_fold_cache() == info
    assert all(a.equal(b) for a, b in zip(first, second))
    assert cpu().head_fold_cache(clear=True) == info
    assert cpu().head_fold_cache()["entries"] == 0


@pytest.mark.parametrize("tokens", [3, 40])
def test_inference_tensors_are_never_cached(tokens):
    """No version counter: an in-place write could not be seen. Long calls fold per call, short
    ones (fewer than 2 Ht tokens, where folding costs more than the GEMM) run the GEMM."""
    case = make_case(dtype=torch.float32, seed=57, hidden=40, intermediate=24, receiver_heads=4,
                     seq_lens=(tokens,), padding=0)
    want_p, want_a = _reference_project(case)
    with torch.inference_mode():
        case.weights = type(case.weights)(*[t.clone() for t in case.weights])
        got_p, got_a = _project(case)
    torch.testing.assert_close(got_a, want_a, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got_p, want_p, atol=2e-4, rtol=2e-4)
    assert cpu().head_fold_cache()["entries"] == 0


def test_a_first_call_under_inference_mode_leaves_nothing_inference_behind():
    """Serving code often runs under torch.inference_mode with weights loaded outside it. The
    fold cache and the per-thread workspaces made by such a call are written in place by later
    calls outside it (the folds of other fusers, the NaN poisoning of the debug mode): they must
    be normal tensors, or those calls fail."""
    case = make_case(dtype=torch.bfloat16, seed=58, hidden=40, intermediate=24, seq_lens=(12, 9))
    want_p, want_a = _reference_project(case)
    first = case.fusers[:1]
    with torch.inference_mode():
        torch.ops.c2c.project(case.receiver_caches[:1], case.sharer_caches[:1], case.receiver_slots,
                              case.sharer_slots, list(case.weights), first, "cpu", False)
    assert cpu().head_fold_cache() == {"entries": 1, "bytes": len(case.fusers) * 4 * 40 * 4, "fusers": 1}
    got_p, got_a = _project(case)  # the other fusers' folds land in the entry made above
    assert cpu().head_fold_cache()["fusers"] == len(case.fusers)
    torch.testing.assert_close(got_a, want_a, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got_p, want_p, atol=5e-2, rtol=5e-2)
    # a longer call grows the workspaces made under inference mode; this one reuses them
    long_case = make_case(dtype=torch.bfloat16, seed=59, hidden=40, intermediate=24, seq_lens=(30, 20))
    with torch.inference_mode():
        _project(long_case)
    expected = reference_fused(case)
    torch.ops.c2c.fuse(*case.args(), "cpu", False)
    assert_storage_close(case, expected, TOLERANCES[torch.bfloat16])
