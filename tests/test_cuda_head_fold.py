"""The CUDA backend's head fold (csrc/cuda/fuse.cu, docs/cuda.md): the weight branch's logits
computed from ``[u; g]`` against ``[W_head, V]``, ``V = W_head W2h`` folded once per pair of
weight stacks (fp32) and cached, instead of running the ``[tokens, H] x [H, H]`` W2h GEMM. Pins:
fuse and project are the reference's for odd widths (the element-by-element kernel), vector
widths (the 16-byte one), one to eight heads and every dtype; an in-place write to ``w_head``
or ``head_w2`` reaches the next call (never a stale fold); inference-mode weights (no version
counter) are not folded and run the unfolded branch; ``C2C_CUDA_HEAD_FOLD=0`` runs it unfolded
and agrees. Runs on the CPU emulator (and on a GPU when one is visible)."""
import gc

import pytest
import torch

from c2c_kernels import backends, reference
from c2c_kernels.testing import TOLERANCES, make_case


def _gpu_skip_reason():
    if not torch.cuda.is_available():
        return "no GPU"
    return backends.reason("cuda")


EMULATOR_REASON = backends.reason("cuda_emulator")
requires_emulator = pytest.mark.skipif(EMULATOR_REASON is not None, reason=str(EMULATOR_REASON))

TARGETS = [
    pytest.param("cuda", "cuda", id="gpu", marks=pytest.mark.skipif(_gpu_skip_reason() is not None,
                                                                   reason=str(_gpu_skip_reason()))),
    pytest.param("cuda_emulator", "cpu", id="emulator", marks=requires_emulator),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# hidden 37: odd, the element-by-element kernel, narrower than the [S; X] rows (Ks + Kt = 64);
# hidden 72: whole 16-byte vectors in every dtype, wider than the [S; X] rows (the folded
# workspace has no w buffer, so its rows buffer is the narrower one).
HIDDEN = [37, 72]
# A transposed or stale V, or a missing W_head u term, moves a head scale by O(0.1); fp32
# rounding differences stay far below this.
FP32_HEAD_SCALE_TOL = 2e-5


def _folds():
    """Live cached folds (emulator only; None on a GPU, which has no counter to read)."""
    if EMULATOR_REASON is not None:
        return None
    gc.collect()  # freed weights of earlier cases drop out
    return backends.get("cuda_emulator").head_fold_cache_entries()


def _assert_new_fold(backend, before):
    if backend == "cuda_emulator":
        after = _folds()
        assert after == before + 1 or before == after == 4, (before, after)  # 4: the cache's capacity


def _case(device, dtype, hidden, heads, seed, **kw):
    return make_case(layout="vllm_nhd", dtype=dtype, device=device, seed=seed, layers=1, hidden=hidden,
                     intermediate=24, receiver_heads=heads, receiver_dim=8, sharer_heads=2, sharer_dim=16,
                     seq_lens=(7, 3), padding=3, **kw)


def _check(backend, case, dtype):
    """fuse and project against the reference from the same start: the caches' rows, the
    projection and the head scales (tighter for fp32, where a wrong fold cannot hide)."""
    expected = case.clone_receiver()
    reference.fuse(expected.receiver_caches, expected.sharer_caches, expected.receiver_slots,
                   expected.sharer_slots, expected.weights, expected.fusers)
    want_p, want_a = reference.project(case.receiver_caches, case.sharer_caches, case.receiver_slots,
                                       case.sharer_slots, case.weights, case.fusers)
    got_p, got_a = torch.ops.c2c.project(*case.args(), backend, False)
    torch.ops.c2c.fuse(*case.args(), backend, False)
    tol = TOLERANCES[dtype]
    head_tol = FP32_HEAD_SCALE_TOL if dtype == torch.float32 else tol
    torch.testing.assert_close(got_a.cpu(), want_a.cpu(), atol=head_tol, rtol=head_tol)
    torch.testing.assert_close(got_p.cpu(), want_p.cpu(), atol=tol, rtol=tol)
    for got, want in zip(case.receiver.storage, expected.receiver.storage):
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.fixture(autouse=True)
def fold_on(monkeypatch):
    monkeypatch.delenv("C2C_CUDA_HEAD_FOLD", raising=False)


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("heads", [1, 3, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_folded_fuse_and_project_match_the_reference(backend, device, hidden, heads, dtype):
    case = _case(device, dtype, hidden, heads, seed=60 + heads)
    before = _folds()
    _check(backend, case, dtype)
    _assert_new_fold(backend, before)


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("field,update", [
    ("w_head", lambda t: t.mul_(-0.5)),
    ("w_head", lambda t: t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(5)).to(t) * 0.2)),
    ("head_w2", lambda t: t.mul_(3.0)),
    ("head_w2", lambda t: t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(6)).to(t) * 0.2)),
], ids=["w_head-mul", "w_head-copy", "head_w2-mul", "head_w2-copy"])
def test_in_place_weight_updates_reach_the_next_call(backend, device, field, update):
    """The fold is cached per weight stack pair: a write in place (an optimizer step, a reload)
    must give a new fold on the next call, and replace the stale one rather than add to it."""
    case = _case(device, torch.float32, 40, 3, seed=70)
    before = _folds()
    torch.ops.c2c.project(*case.args(), backend, False)
    _assert_new_fold(backend, before)
    with torch.no_grad():
        update(getattr(case.weights, field))
    _check(backend, case, torch.float32)
    _assert_new_fold(backend, before)  # still one fold for this pair of stacks


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inference_tensor_weights_run_unfolded(backend, device, dtype):
    """Inference tensors carry no version counter, so no fold can be kept for them: the weight
    branch runs its W2h GEMM, and the results are still the reference's."""
    case = _case(device, dtype, 72, 8, seed=71)
    with torch.inference_mode():
        case.weights = type(case.weights)(*(t.clone() for t in case.weights))
    before = _folds()
    _check(backend, case, dtype)
    assert _folds() == before


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fold_on_and_off_agree(backend, device, hidden, dtype, monkeypatch):
    """C2C_CUDA_HEAD_FOLD=0 (read per call) runs the weight branch unfolded, folding nothing;
    both paths are the reference's and agree with each other."""
    case = _case(device, dtype, hidden, 8, seed=72)
    monkeypatch.setenv("C2C_CUDA_HEAD_FOLD", "0")
    before = _folds()
    off_p, off_a = torch.ops.c2c.project(*case.args(), backend, False)
    assert _folds() == before
    monkeypatch.delenv("C2C_CUDA_HEAD_FOLD")
    on_p, on_a = torch.ops.c2c.project(*case.args(), backend, False)
    _assert_new_fold(backend, before)
    tol = TOLERANCES[dtype]
    head_tol = FP32_HEAD_SCALE_TOL if dtype == torch.float32 else tol
    torch.testing.assert_close(on_a, off_a, atol=head_tol, rtol=head_tol)
    torch.testing.assert_close(on_p, off_p, atol=tol, rtol=tol)
    monkeypatch.setenv("C2C_CUDA_HEAD_FOLD", "0")  # the unfolded fuse too, with the fold kept
    _check(backend, case, dtype)
    _assert_new_fold(backend, before)


@requires_emulator
def test_folded_workspace_has_no_w_buffer(monkeypatch):
    """The workspace per entry and token (docs/cuda.md): folded, 2 (Ks + Kt + 3 H + max(I, H))
    + 4 Ht bytes in bf16, no w row and no 16-bit logits; unfolded, 2 (max(Ks + Kt, H) + 3 H +
    max(I, H) + Ht) + 4 Ht. The first workload at 16384 tokens on an H200: 2 chunks of 8192."""
    monkeypatch.delenv("C2C_CUDA_WORKSPACE_BYTES", raising=False)
    plan = backends.get("cuda_emulator").chunk_plan
    assert plan(48, 16384, 128, 1024, 1024, 1024, 8, 2, 141 * 10**9) == (8192, 2, 8192 * 48 * 10528)
    assert plan(48, 16384, 128, 1024, 1024, 1024, 8, 2, 141 * 10**9, head_fold=False) == (8192, 2, 8192 * 48 * 10544)
    # H wider than the [S; X] rows: only the unfolded branch needs rows H wide
    assert plan(1, 1, 32, 32, 96, 24, 4, 4, 0)[2] == 4 * (64 + 3 * 96 + 96) + 16
    assert plan(1, 1, 32, 32, 96, 24, 4, 4, 0, head_fold=False)[2] == 4 * (96 + 3 * 96 + 96 + 4) + 16


@requires_emulator
def test_folds_a_capture_used_outlive_their_cache_entry():
    """A CUDA graph replays the addresses it captured: a fold (or concatenated W_in) used while
    capturing must stay allocated after its cache entry goes (weights updated in place, or
    evicted by other weights), or a replay reads freed memory. Stand-in capture on the
    emulator: first use inside a capture is not cached (no allocation while capturing), a cached
    one is kept for the graph, once, and survives the entry's replacement."""
    emu = backends.get("cuda_emulator")
    case = _case("cpu", torch.bfloat16, 72, 8, seed=91)
    args = (case.receiver_caches, case.sharer_caches, case.receiver_slots, case.sharer_slots,
            list(case.weights), case.fusers)
    kept = emu.captured_derived_tensors()
    emu.set_emulated_capture(True)
    try:
        torch.ops.c2c.project(*args, "cuda_emulator", False)  # weights first seen while capturing
        assert emu.captured_derived_tensors() == kept  # nothing cached, nothing kept
    finally:
        emu.set_emulated_capture(False)
    torch.ops.c2c.project(*args, "cuda_emulator", False)  # the eager warm-up caches them
    emu.set_emulated_capture(True)
    try:
        for _ in range(2):  # captured twice: kept once
            torch.ops.c2c.project(*args, "cuda_emulator", False)
    finally:
        emu.set_emulated_capture(False)
    grown = emu.captured_derived_tensors()
    assert grown >= kept + 1, (kept, grown)  # the head fold (and the concatenated W_in where kept)
    with torch.no_grad():
        case.weights.head_w2.mul_(0.5)  # the entry goes stale and is replaced at the next call
    want_p, want_a = reference.project(case.receiver_caches, case.sharer_caches, case.receiver_slots,
                                       case.sharer_slots, case.weights, case.fusers)
    got_p, got_a = torch.ops.c2c.project(*args, "cuda_emulator", False)
    torch.testing.assert_close(got_a, want_a, atol=2e-2, rtol=2e-2)
    assert emu.captured_derived_tensors() == grown  # the captured tensor is still held
