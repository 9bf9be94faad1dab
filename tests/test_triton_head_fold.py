"""The weight branch's second GEMM folded into the head weights (Triton backend).

The branch's output ``w = u + W_2h gelu(W_1h rmsnorm(u))`` is only used through
``a = W_head w + b_head``, so the backend keeps ``V = W_head W_2h`` (fp32, per checkpoint,
folded.py) and its FFN-up writes the logits straight from the GELU tile: ``a = W_head u + V g +
b_head``. Pinned here: the fold's values (fp64 truth, odd hidden widths, 1/3/8 heads), that it is
fresh after in-place edits of either source, that the residual's ``W_head u`` share is there
(``W_2h = 0``), and odd / GQA-like shapes through the whole fuse and project against the
reference. ``head_scale`` from ``c2c::project`` is ``sigmoid(a)`` for an open gate: the logits
are checked through it."""
import pytest
import torch

from c2c_kernels import backends, reference
from c2c_kernels.testing import TOLERANCES, assert_storage_close, make_case, reference_fused

pytest.importorskip("triton")
needs_interpreter = pytest.mark.skipif(
    backends.reason("triton") is not None or "cpu" not in backends.devices("triton"),
    reason="triton interpreter not enabled")


def _fold_truth(w):
    return torch.stack([w.w_head[i].double() @ w.head_w2[i].double() for i in range(w.w_head.shape[0])])


def _project(case):
    got = torch.ops.c2c.project(*case.args(), "triton", False)
    want = reference.project(case.receiver_caches, case.sharer_caches, case.receiver_slots, case.sharer_slots,
                             case.weights, case.fusers)
    return got, want


def _assert_scales_close(got, want, tol):
    torch.testing.assert_close(got[0], want[0], atol=tol, rtol=tol)  # projection
    torch.testing.assert_close(got[1], want[1], atol=tol, rtol=tol)  # head_scale = sigmoid(a)


@pytest.mark.parametrize("heads", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fold_is_w_head_times_w2_in_fp32(heads, dtype):
    """V = W_head @ W_2h per fuser, [P, Ht, H], kept fp32 and within fp32 rounding of the fp64
    product of the stored weights (a V rounded to 16 bits, or summed in TF32, is 1e-3 off)."""
    from c2c_kernels.backends.triton import folded
    case = make_case(seed=120 + heads, receiver_heads=heads, receiver_dim=4, hidden=67, intermediate=33,
                     dtype=dtype)
    w = case.weights
    fold = folded.folded(w)
    assert fold.head_v.dtype == torch.float32
    assert fold.head_v.shape == (w.w_head.shape[0], heads, 67)
    truth = _fold_truth(w)
    torch.testing.assert_close(fold.head_v.double(), truth, rtol=1e-6, atol=1e-6 * truth.abs().max().item())
    assert folded.folded(w) is fold, "unchanged weights must reuse their fold"


@needs_interpreter
@pytest.mark.parametrize("edit", ["w_head", "head_w2", "head_w2_view"])
def test_in_place_edit_after_a_call_gives_the_new_logits(edit):
    """The fold is keyed on both sources' version counters: an in-place edit of W_head or W_2h
    (of the whole stack, or of one fuser through a view) after a call is seen by the next call."""
    from c2c_kernels.backends.triton import folded
    case = make_case(seed=131, padding=1)
    w = case.weights
    got, want = _project(case)
    _assert_scales_close(got, want, TOLERANCES[torch.float32])
    stale = got[1].clone()
    fold = folded.folded(w)

    if edit == "w_head":
        w.w_head.mul_(-2.0)
    elif edit == "head_w2":
        w.head_w2.mul_(-3.0)
    else:
        w.head_w2[1].mul_(-3.0)  # fuser 1 only, through a view of the stack
    assert folded.folded(w) is not fold
    got, want = _project(case)
    changed = (want[1] - stale).abs().amax(dim=(1, 2))
    assert changed.max() > 100 * TOLERANCES[torch.float32], "the edit should move the logits"
    _assert_scales_close(got, want, TOLERANCES[torch.float32])
    torch.testing.assert_close(folded.folded(w).head_v.double(), _fold_truth(w), rtol=1e-6, atol=1e-6)

    # The in-place path reads the same fold.
    expected = reference_fused(case)
    torch.ops.c2c.fuse(*case.args(), "triton", False)
    assert_storage_close(case, expected, torch.float32)


@needs_interpreter
def test_zero_w2_logits_follow_w_head():
    """With W_2h = 0 the logits are W_head u + b_head: the residual's share, which the FFN-up
    adds from the raw z columns of each tile. Editing W_head must move them, and a zero W_head
    leaves exactly the bias."""
    case = make_case(seed=137, padding=2)
    w = case.weights
    w.head_w2.zero_()
    got, want = _project(case)
    _assert_scales_close(got, want, TOLERANCES[torch.float32])
    before = got[1].clone()

    w.w_head.copy_(torch.randn(w.w_head.shape, generator=torch.Generator().manual_seed(5)) * 0.3)
    got, want = _project(case)
    assert (want[1] - before).abs().max() > 100 * TOLERANCES[torch.float32]
    _assert_scales_close(got, want, TOLERANCES[torch.float32])

    w.w_head.zero_()
    got, _ = _project(case)
    used = case.receiver_slots >= 0
    bias = torch.sigmoid(w.b_head.float())[:, None, :].expand(-1, int(used.sum()), -1)
    torch.testing.assert_close(got[1][:, used], bias, atol=1e-6, rtol=1e-6)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("receiver_heads,receiver_dim,sharer_heads,sharer_dim,hidden", [
    (3, 6, 1, 10, 131),  # odd heads and widths; hidden 131: a second, 3-column logit tile
    (8, 4, 2, 8, 67),    # 8 receiver heads, 2 sharer heads
    (1, 12, 3, 4, 45),   # one receiver head
])
def test_odd_shapes_through_the_whole_fuse(dtype, receiver_heads, receiver_dim, sharer_heads, sharer_dim, hidden):
    case = make_case(seed=141 + hidden, dtype=dtype, receiver_heads=receiver_heads, receiver_dim=receiver_dim,
                     sharer_heads=sharer_heads, sharer_dim=sharer_dim, hidden=hidden, intermediate=37,
                     seq_lens=(6, 3), padding=2)
    got, want = _project(case)
    _assert_scales_close(got, want, TOLERANCES[dtype])
    again = torch.ops.c2c.project(*case.args(), "triton", False)
    assert torch.equal(again[1], got[1]), "the partial logits are summed in a fixed order"

    expected = reference_fused(case)
    torch.ops.c2c.fuse(*case.args(), "triton", False)
    assert_storage_close(case, expected, dtype)


def test_folds_a_capture_used_outlive_their_cache_entry(monkeypatch):
    """A CUDA graph replays the addresses it captured: a cached fold used while capturing must
    stay allocated after its entry goes (weights updated in place, or evicted by other
    checkpoints), else a replay reads freed memory. Stand-in capture on the CPU: kept once,
    and still held after the entry was replaced and the cache filled with other checkpoints."""
    from c2c_kernels.backends.triton import folded

    case = make_case(dtype=torch.float32, seed=93, hidden=40, intermediate=24, seq_lens=(5,))
    warm = folded.folded(case.weights)  # the eager warm-up caches it
    kept = len(folded._captured)
    monkeypatch.setattr(folded, "_capturing", lambda t: True)
    assert folded.folded(case.weights) is warm
    assert folded.folded(case.weights) is warm  # captured twice: kept once
    monkeypatch.setattr(folded, "_capturing", lambda t: False)
    assert len(folded._captured) == kept + 1 and folded._captured[-1] is warm
    with torch.no_grad():
        case.weights.head_w2.mul_(0.5)
    assert folded.folded(case.weights) is not warm  # the stale entry is not served
    for seed in range(folded.MAX_FOLDS + 1):  # other checkpoints evict every older entry
        folded.folded(make_case(dtype=torch.float32, seed=100 + seed, hidden=40, intermediate=24).weights)
    assert all(entry[1] is not warm for entry in folded._folds.values())
    assert folded._captured[-1] is warm  # still allocated for the graph
