"""Slot safety of the CUDA sources (on a GPU, and on the CPU emulator everywhere): the
prepare-slots kernel computes exactly ``c2c_kernels.slots.prepare()``; out-of-range slots are
skipped (nothing outside the given rows changes, in pools carved from a sentinel-filled larger
buffer) and reported once through the status buffer; duplicated receiver slots are written once,
by the last valid token; ``project`` returns zero rows for padding and skipped tokens; empty pools
(page size 0) never divide by zero; and the kernels stay exact with every workspace poisoned.
``scripts/asan_cuda_emulator.sh`` runs this file under AddressSanitizer (slots up to 2**40)."""
import os
import subprocess
import sys

import pytest
import torch

from c2c_kernels import backends, reference, slots, status
from c2c_kernels.testing import TOLERANCES
from c2c_kernels.weights import random_weights


def _skip_reason(name, device):
    if device == "cuda" and not torch.cuda.is_available():
        return "no GPU"
    return backends.reason(name)


TARGETS = [pytest.param(name, device, id=tag, marks=pytest.mark.skipif(_skip_reason(name, device) is not None,
                                                                        reason=str(_skip_reason(name, device))))
           for name, device, tag in [("cuda", "cuda", "gpu"), ("cuda_emulator", "cpu", "emulator")]]

SENTINEL = 4096.0  # exact in every cache dtype; a kernel reading it gives a wrong result, one writing it is caught
GUARD = 64  # sentinel elements before and after each pool (a multiple of 16 bytes: the vector paths stay on)


@pytest.fixture(autouse=True)
def _clean_status():
    status.clear()
    yield
    status.clear()


# ---- prepare_slots against slots.prepare() ----------------------------------------------------

def slot_tensor(values, dtype, kind, device):
    """`values` as a slot tensor: contiguous, every other element of a larger tensor, or (all
    values equal) an expanded stride-0 tensor."""
    t = torch.tensor(values, dtype=dtype)
    if kind == "strided":
        big = torch.full((2 * len(values) + 1,), 7, dtype=dtype)
        big[1::2] = t
        return big.to(device)[1::2]
    if kind == "stride0":
        assert len(set(values)) <= 1
        return torch.tensor(values[:1] or [0], dtype=dtype).to(device).expand(len(values))
    return t.to(device)


def random_pattern(g, tokens, receiver_rows, sharer_rows, dtype):
    """Receiver and sharer slot values mixing padding, duplicates and out-of-range slots on both
    sides, up to the dtype's extremes (2**40 for int64)."""
    far = 2 ** 40 if dtype == torch.int64 else 2 ** 31 - 1
    low = -(2 ** 40) if dtype == torch.int64 else -(2 ** 31)
    r, s = [], []
    for _ in range(tokens):
        kind = int(torch.randint(0, 10, (1,), generator=g))
        dup_range = max(1, min(receiver_rows, tokens // 2))
        if kind < 2:
            r.append([-1, low, -7][int(torch.randint(0, 3, (1,), generator=g))])
        elif kind < 3:
            r.append([receiver_rows, receiver_rows + 3, far][int(torch.randint(0, 3, (1,), generator=g))])
        elif receiver_rows > 0:
            r.append(int(torch.randint(0, dup_range, (1,), generator=g)))
        else:
            r.append(0)
        kind = int(torch.randint(0, 10, (1,), generator=g))
        if kind < 2:
            s.append([-1, sharer_rows, far, low][int(torch.randint(0, 4, (1,), generator=g))])
        else:
            s.append(int(torch.randint(0, max(sharer_rows, 1), (1,), generator=g)))
    return r, s


def run_prepare(backend, r, s, receiver_rows, sharer_rows, dedupe):
    return backends.get(backend).prepare(r, s, receiver_rows, sharer_rows, dedupe=dedupe)


def check_prepare(backend, device, r, s, receiver_rows, sharer_rows, dedupe):
    want_r, want_s, errors = slots.prepare(r, s, receiver_rows, sharer_rows, dedupe=dedupe)
    status.clear()
    got_r, got_s = run_prepare(backend, r, s, receiver_rows, sharer_rows, dedupe)
    assert got_r.dtype == torch.int64 and got_s.dtype == torch.int64 and got_r.is_contiguous()
    assert torch.equal(got_r.cpu(), want_r.cpu()), (got_r, want_r)
    assert torch.equal(got_s.cpu(), want_s.cpu()), (got_s, want_s)
    flag, argument, index, value, limit = status.buffer(device)[:5].tolist()
    if not errors:
        assert flag == 0
        return
    assert flag == 1 and (argument, index, value, limit) in errors
    # One block of tokens (or blocks run in order, as on the emulator): the first in token order.
    if device == "cpu" or len(r) <= 128:
        assert (argument, index, value, limit) == errors[0]


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("kind", ["contiguous", "strided"])
@pytest.mark.parametrize("dedupe", [True, False])
@pytest.mark.parametrize("seed,tokens,receiver_rows,sharer_rows", [
    (0, 1, 4, 4), (1, 9, 12, 5), (2, 40, 30, 17), (3, 40, 3, 1), (4, 300, 200, 90), (5, 130, 0, 8)])
def test_prepare_matches_the_definition(backend, device, dtype, kind, dedupe, seed, tokens, receiver_rows,
                                        sharer_rows):
    """Random padding, duplicates and out-of-range slots on both sides, any dtype and stride,
    token counts across the kernel's 128-token blocks and tiles, an empty receiver pool."""
    g = torch.Generator().manual_seed(seed)
    r, s = random_pattern(g, tokens, receiver_rows, sharer_rows, dtype)
    check_prepare(backend, device, slot_tensor(r, dtype, kind, device), slot_tensor(s, dtype, kind, device),
                  receiver_rows, sharer_rows, dedupe)


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("receiver,sharer", [(5, 2), (-1, 99), (5, -3), (50, 0), (5, 2 ** 31 - 1)])
@pytest.mark.parametrize("dedupe", [True, False])
def test_prepare_stride_zero(backend, device, dtype, receiver, sharer, dedupe):
    """Expanded (stride-0) slots: every token has the same slots, so with dedupe only the last is kept."""
    tokens = 140
    r = slot_tensor([receiver] * tokens, dtype, "stride0", device)
    s = slot_tensor([sharer] * tokens, dtype, "stride0", device)
    assert r.stride(0) == 0
    check_prepare(backend, device, r, s, 24, 10, dedupe)


@pytest.mark.parametrize("backend,device", TARGETS)
def test_prepare_without_sharer_slots(backend, device):
    """merge's form: only receiver slots, every sharer slot 0; a recorded error is not overwritten."""
    r = torch.tensor([3, 9, -1, 3, 40, 9, 2 ** 40], device=device)
    check_prepare(backend, device, r, None, 10, 0, True)
    status.clear()
    run_prepare(backend, r, None, 10, 0, True)
    run_prepare(backend, torch.tensor([-5, 11], device=device), None, 10, 0, True)
    assert status.buffer(device)[:5].tolist() == [1, status.RECEIVER_SLOTS, 4, 40, 10]


# ---- whole calls in guard arenas --------------------------------------------------------------

class Arena:
    """A [pages, page_size, heads, dim] pool inside a larger buffer of sentinels."""

    def __init__(self, pages, page_size, heads, dim, dtype, device, g):
        numel = pages * page_size * heads * dim
        self.buffer = torch.full((numel + 2 * GUARD,), SENTINEL, dtype=dtype)
        self.buffer[GUARD:GUARD + numel] = torch.randn(numel, generator=g).to(dtype)
        self.buffer = self.buffer.to(device)
        self.view = self.buffer[GUARD:GUARD + numel].view(pages, page_size, heads, dim)

    def rows_mask(self, receiver_slots):
        """Elements of the buffer in the rows of the given (prepared, -1 = none) slots."""
        mask = torch.zeros_like(self.buffer, dtype=torch.bool)
        valid = receiver_slots[receiver_slots >= 0].long()
        rows = mask[GUARD:GUARD + self.view.numel()].view(self.view.shape)
        rows[valid // self.view.shape[1], valid % self.view.shape[1]] = True
        return mask


def make_pools(dtype, device, *, seed, receiver_pages=4, sharer_pages=3, page_size=4, layers=1):
    g = torch.Generator().manual_seed(seed)
    receivers = [Arena(receiver_pages, page_size, 2, 8, dtype, device, g) for _ in range(2 * layers)]
    sharers = [Arena(sharer_pages, page_size, 2, 16, dtype, device, g) for _ in range(2 * layers)]
    weights = random_weights(2 * layers, 2, 16, 2, 8, 32, 24, 3, dtype=dtype, device=device, seed=seed)
    return receivers, sharers, weights, list(range(2 * layers))


def views(arenas):
    return [a.view for a in arenas]


def expected_fuse(receivers, sharers, weights, fusers, r, s):
    """The reference on copies, with the slots slots.prepare() gives (skipped tokens dropped)."""
    pr, ps, errors = slots.prepare(r, s, slots.rows(receivers[0].view), slots.rows(sharers[0].view), dedupe=True)
    copies = [a.buffer.clone() for a in receivers]
    copy_views = [c[GUARD:GUARD + a.view.numel()].view(a.view.shape) for c, a in zip(copies, receivers)]
    reference.fuse(copy_views, views(sharers), pr, ps, weights, fusers)
    return copies, pr, errors


def check_only_rows_changed(receivers, start, want, prepared, dtype):
    for arena, before, expect in zip(receivers, start, want):
        rows = arena.rows_mask(prepared)
        got = arena.buffer
        assert torch.equal(got[~rows], before[~rows]), "an element outside the written rows changed"
        tol = TOLERANCES[dtype]
        torch.testing.assert_close(got[rows].float(), expect[rows].float(), atol=tol, rtol=tol)


BAD_SLOTS = {
    # (receiver slots, sharer slots, the error recorded: argument, index, value, limit)
    "receiver_past_end": ([0, 5, 16, -1, 9], [1, 2, 3, 4, 5], (1, 2, 16, 16)),
    "receiver_far": ([0, 2 ** 40, 7, 3, 9], [1, 2, 3, 4, 5], (1, 1, 2 ** 40, 16)),
    "sharer_negative": ([0, 5, 6, -1, 9], [1, 2, -3, 999, 5], (2, 2, -3, 12)),
    "sharer_far": ([0, 5, 6, 8, 9], [1, 2 ** 40, 3, 12, 5], (2, 1, 2 ** 40, 12)),
    "both": ([15, -2 ** 40, 2 ** 40, 4, 9], [11, 7, 3, -1, 5], (1, 2, 2 ** 40, 16)),
}


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("case", BAD_SLOTS)
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64], ids=str)
def test_out_of_range_slots_are_skipped_and_reported_once(backend, device, case, slot_dtype):
    r_values, s_values, error = BAD_SLOTS[case]
    if slot_dtype == torch.int32 and any(abs(v) >= 2 ** 31 for v in r_values + s_values):
        pytest.skip("int32 cannot hold these slots")
    dtype = torch.float32
    receivers, sharers, weights, fusers = make_pools(dtype, device, seed=41)
    r = torch.tensor(r_values, dtype=slot_dtype, device=device)
    s = torch.tensor(s_values, dtype=slot_dtype, device=device)
    want, prepared, errors = expected_fuse(receivers, sharers, weights, fusers, r, s)
    assert errors[0] == error
    start = [a.buffer.clone() for a in receivers]
    sharer_start = [a.buffer.clone() for a in sharers]
    backends.get(backend).fuse(views(receivers), views(sharers), r, s, weights, fusers)
    check_only_rows_changed(receivers, start, want, prepared, dtype)
    assert all(torch.equal(a.buffer, b) for a, b in zip(sharers, sharer_start)), "the sharer memory changed"
    argument, index, value, limit = error
    name = status.ARGUMENTS[argument]
    with pytest.raises(ValueError, match=rf"{name}\[{index}\] = {value}.* out of range \[0, {limit}\)"):
        status.raise_pending_errors(device)
    status.raise_pending_errors(device)  # raised once, then cleared


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_duplicate_receiver_slots_last_valid_token_wins(backend, device, dtype):
    """Each row is corrected once, from the rows the call began with, by the last valid token
    with its slot (out-of-range tokens do not count); before, the merge added the correction
    of every duplicate to the row."""
    receivers, sharers, weights, fusers = make_pools(dtype, device, seed=43)
    r = torch.tensor([3, 7, 3, -1, 7, 3, 12, 12, 5], device=device)
    s = torch.tensor([0, 1, 2, 3, 4, 5, 6, 99, 7], device=device)  # the last 12 has a bad sharer slot
    want, prepared, _ = expected_fuse(receivers, sharers, weights, fusers, r, s)
    assert prepared.tolist() == [-1, -1, -1, -1, 7, 3, 12, -1, 5]
    start = [a.buffer.clone() for a in receivers]
    backends.get(backend).fuse(views(receivers), views(sharers), r, s, weights, fusers)
    check_only_rows_changed(receivers, start, want, prepared, dtype)


@pytest.mark.parametrize("backend,device", TARGETS)
def test_merge_duplicates_and_out_of_range(backend, device):
    """The standalone merge: a duplicated slot gets one correction (the last token's), an
    out-of-range slot none, and nothing outside the rows changes."""
    receivers, _, _, _ = make_pools(torch.float32, device, seed=44)
    r = torch.tensor([3, 7, 3, 16, 2 ** 40, -1, 3], device=device)
    g = torch.Generator().manual_seed(44)
    t, width = len(r), 2 * 8
    projections = [torch.randn(t, width, generator=g).to(device) for _ in receivers]
    head_scales = [torch.rand(t, 2, generator=g).to(device) for _ in receivers]
    pr, _, errors = slots.prepare(r, None, 16, 0, dedupe=True)
    want = [a.buffer.clone() for a in receivers]
    reference.merge([w[GUARD:GUARD + a.view.numel()].view(a.view.shape) for w, a in zip(want, receivers)], pr,
                    projections, head_scales)
    start = [a.buffer.clone() for a in receivers]
    backends.get(backend).merge(views(receivers), r, projections, head_scales)
    check_only_rows_changed(receivers, start, want, pr, torch.float32)
    with pytest.raises(ValueError, match=r"receiver_slots\[3\] = 16 is out of range \[0, 16\)"):
        status.raise_pending_errors(device)


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_project_rows_of_padding_and_skipped_tokens_are_zero(backend, device, dtype):
    receivers, sharers, weights, fusers = make_pools(dtype, device, seed=45)
    r = torch.tensor([-1, 4, 16, 4, -3, 9, 2, 11], device=device)
    s = torch.tensor([5, 1, 2, 3, 4, 12, -1, 6], device=device)  # tokens 5 and 6: bad sharer slots
    projection, head_scale = backends.get(backend).project(views(receivers), views(sharers), r, s, weights,
                                                             fusers)
    skipped = torch.tensor([True, False, True, False, True, True, True, False])
    assert torch.equal(projection[:, skipped].cpu(), torch.zeros_like(projection[:, skipped].cpu()))
    assert torch.equal(head_scale[:, skipped].cpu(), torch.zeros_like(head_scale[:, skipped].cpu()))
    # every valid token, duplicates included (project does not dedupe), against the reference
    pr, ps, _ = slots.prepare(r, s, 16, 12, dedupe=False)
    want_projection, want_head_scale = reference.project(views(receivers), views(sharers), pr, ps, weights, fusers)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(projection.cpu(), want_projection.cpu(), atol=tol, rtol=tol)
    torch.testing.assert_close(head_scale.cpu(), want_head_scale.cpu(), atol=tol, rtol=tol)


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("kind", ["strided", "stride0"])
def test_fuse_honours_slot_strides(backend, device, kind):
    receivers, sharers, weights, fusers = make_pools(torch.float32, device, seed=46)
    if kind == "strided":
        r_values, s_values = [2, 9, -1, 14, 0, 6], [11, 3, 0, 5, 8, 1]
    else:
        r_values, s_values = [6] * 5, [10] * 5
    r = slot_tensor(r_values, torch.int32, kind, device)
    s = slot_tensor(s_values, torch.int64, kind, device)
    assert not r.is_contiguous() or r.stride(0) == 0
    want, prepared, _ = expected_fuse(receivers, sharers, weights, fusers, torch.tensor(r_values, device=device),
                                      torch.tensor(s_values, device=device))
    start = [a.buffer.clone() for a in receivers]
    backends.get(backend).fuse(views(receivers), views(sharers), r, s, weights, fusers)
    check_only_rows_changed(receivers, start, want, prepared, torch.float32)


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("op", ["fuse", "project", "merge"])
def test_empty_pools_never_divide_by_zero(backend, device, op):
    """Page size 0 or no pages (the op layer rejects them; the backend must still be safe on its
    own): every non-padding token is out of range, skipped and reported, nothing is written."""
    receivers, sharers, weights, fusers = make_pools(torch.float32, device, seed=47)
    empty = [v[:, :0] for v in views(receivers)]  # page size 0
    no_pages = [v[:0] for v in views(sharers)]
    r = torch.tensor([0, -1, 5], device=device)
    s = torch.tensor([1, 0, 2], device=device)
    start = [a.buffer.clone() for a in receivers + sharers]
    module = backends.get(backend)
    if op == "fuse":
        module.fuse(empty, views(sharers), r, s, weights, fusers)
        module.fuse(views(receivers), no_pages, r, s, weights, fusers)
        expect = r"receiver_slots\[0\] = 0 is out of range \[0, 0\)"
    elif op == "project":
        projection, head_scale = module.project(empty, no_pages, r, s, weights, fusers)
        assert not projection.any() and not head_scale.any()
        expect = r"receiver_slots\[0\] = 0 is out of range \[0, 0\)"
    else:
        module.merge(empty, r, [torch.ones(3, 16, device=device)] * 2, [torch.ones(3, 2, device=device)] * 2)
        expect = r"receiver_slots\[0\] = 0 is out of range \[0, 0\)"
    assert all(torch.equal(a.buffer, b) for a, b in zip(receivers + sharers, start))
    with pytest.raises(ValueError, match=expect):
        status.raise_pending_errors(device)


# ---- poisoned workspaces ----------------------------------------------------------------------

_POISON_SCRIPT = """
import torch
from c2c_kernels import backends, reference
from c2c_kernels.testing import make_case
module = backends.get("cuda_emulator")
assert module._build().poisoning() == {expect}
case = make_case(seed=5, seq_lens=(7, 2), padding=3)
args = lambda c: (c.receiver_caches, c.sharer_caches, c.receiver_slots, c.sharer_slots, c.weights, c.fusers)
projection, head_scale = module.project(*args(case))
want_p, want_s = reference.project(*args(case))
torch.testing.assert_close(projection, want_p, atol=2e-4, rtol=2e-4)
torch.testing.assert_close(head_scale, want_s, atol=2e-4, rtol=2e-4)
expected = case.clone_receiver()
reference.fuse(*args(expected))
module.fuse(*args(case))
for got, want in zip(case.receiver.storage, expected.receiver.storage):
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
print("ok")
"""


@pytest.mark.skipif(_skip_reason("cuda_emulator", "cpu") is not None, reason=str(_skip_reason("cuda_emulator", "cpu")))
@pytest.mark.parametrize("poison", ["0", "1"])
def test_emulator_poisons_workspaces_when_asked(poison):
    """C2C_POISON_WORKSPACES is read once per process, so each setting runs in its own process:
    the native side reports the mode, and fuse and project stay exact with every workspace
    (and project's outputs) filled with NaN before use."""
    env = dict(os.environ, C2C_POISON_WORKSPACES=poison, C2C_CUDA_EMULATOR="1")
    script = _POISON_SCRIPT.format(expect=poison == "1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr
