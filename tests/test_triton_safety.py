"""The Triton backend's slot safety (c2c_kernels.slots is the contract), in the interpreter.

The prepare-slots kernel against ``slots.prepare`` on random patterns (padding, duplicates,
out-of-range slots on both sides, int32/int64, strided and stride-0 slot tensors); out-of-range
slots skipped and reported later through the status buffer, with nothing outside the valid rows
touched (the receiver pools live inside sentinel-filled guard arenas); fuse, project, merge and
parallel ``fuse_all`` on strided and expanded slots; zero ``project`` rows for skipped tokens;
and every workspace of the pipeline NaN-poisoned without changing a result.
"""
import re

import pytest
import torch

import c2c_kernels as c2c
from c2c_kernels import backends, layouts, reference, slots, status, workspace
from c2c_kernels.testing import assert_storage_close, make_case

pytestmark = pytest.mark.skipif(backends.reason("triton") is not None or "cpu" not in backends.devices("triton"),
                                reason="triton interpreter not enabled")

GUARD = 1024  # sentinel elements on each side of a receiver pool
SENTINEL = 777.0


@pytest.fixture(autouse=True)
def clean_status():
    status.clear()
    yield
    status.clear()


def strided(values: torch.Tensor, step: int = 3) -> torch.Tensor:
    """The same values as a non-contiguous view (every ``step``-th element of a garbage-filled tensor)."""
    big = torch.full((values.numel() * step + 1,), 10**6, dtype=values.dtype)
    big[1::step] = values
    view = big[1::step]
    assert view.stride(0) == step and torch.equal(view, values)
    return view


def expanded(value: int, tokens: int, dtype=torch.int64) -> torch.Tensor:
    t = torch.tensor([value], dtype=dtype).expand(tokens)
    assert t.stride(0) == 0
    return t


def prep(case, dedupe):
    """``slots.prepare`` for a case (the reference is then run on these contiguous slots)."""
    r, s, errors = slots.prepare(case.receiver_slots, case.sharer_slots, slots.rows(case.receiver_caches[0]),
                                 slots.rows(case.sharer_caches[0]), dedupe=dedupe)
    return r, s, errors


def in_arena(case):
    """Move the receiver pools (vllm_nhd storage) into the middle of sentinel-filled buffers, so
    that a write past a pool lands where the test sees it. Returns the buffers."""
    arenas, storage, kv = [], [], []
    for t in case.receiver.storage:
        arena = torch.full((t.numel() + 2 * GUARD,), SENTINEL, dtype=t.dtype)
        inner = arena[GUARD:GUARD + t.numel()].view(t.shape)
        inner.copy_(t)
        arenas.append(arena)
        storage.append(inner)
        kv.append(layouts.vllm_views(inner))
    case.receiver.storage, case.receiver.kv = storage, kv
    case.receiver_caches = [view for pair in kv for view in pair]
    return arenas


def allowed_elements(arena, shape, receiver_slots):
    """True on the elements of the rows at the valid ``receiver_slots`` of both K and V pools."""
    allowed = torch.zeros(arena.shape, dtype=torch.bool)
    inner = allowed[GUARD:GUARD + arena.numel() - 2 * GUARD].view(shape)
    for view in layouts.vllm_views(inner):
        valid = receiver_slots[receiver_slots >= 0].long()
        view[valid // view.shape[1], valid % view.shape[1]] = True
    return allowed


# ---- the prepare-slots kernel ------------------------------------------------------------------

KINDS = ["contiguous", "strided", "expanded-receiver", "expanded-sharer"]


def as_slots(values: torch.Tensor, dtype) -> torch.Tensor:
    """``values`` in ``dtype``, far values clamped into int32 (still out of every pool)."""
    if dtype == torch.int32:
        values = values.clamp(-2**31, 2**31 - 1)
    return values.to(dtype)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtypes", [(torch.int64, torch.int64), (torch.int32, torch.int64),
                                    (torch.int64, torch.int32)], ids=["i64-i64", "i32-i64", "i64-i32"])
@pytest.mark.parametrize("dedupe", [True, False], ids=["dedupe", "keep-duplicates"])
def test_prepared_slots_equal_slots_prepare(kind, dtypes, dedupe):
    from c2c_kernels.backends.triton import slot_prep
    g = torch.Generator().manual_seed(100 * KINDS.index(kind) + 10 * (dtypes[0] == torch.int32)
                                      + 2 * (dtypes[1] == torch.int32) + dedupe)
    for trial in range(6):
        tokens = int(torch.randint(1, 3 * slot_prep.BLOCK, (1,), generator=g))
        receiver_rows = int(torch.randint(4, 24, (1,), generator=g))
        sharer_rows = int(torch.randint(1, 20, (1,), generator=g))
        # Padding, duplicates and out-of-range slots on both sides, a few far ones.
        r = torch.randint(-3, receiver_rows + 3, (tokens,), generator=g)
        s = torch.randint(-2, sharer_rows + 2, (tokens,), generator=g)
        r[torch.rand(tokens, generator=g) < 0.05] = 2**40
        s[torch.rand(tokens, generator=g) < 0.05] = -2**40
        r, s = as_slots(r, dtypes[0]), as_slots(s, dtypes[1])
        if kind == "strided":
            r, s = strided(r), strided(s, 2)
        elif kind == "expanded-receiver":
            r = expanded(int(r[0]), tokens, dtypes[0])
        elif kind == "expanded-sharer":
            s = expanded(int(s[0]), tokens, dtypes[1])
        for sharer in (s, None) if dedupe else (s,):  # merge prepares without sharer slots
            status.clear()
            want_r, want_s, errors = slots.prepare(r, sharer, receiver_rows, sharer_rows, dedupe=dedupe)
            got_r, got_s = slot_prep.prepare(r, sharer, receiver_rows, sharer_rows, dedupe=dedupe)
            assert got_r.dtype == got_s.dtype == torch.int64 and got_r.is_contiguous() and got_s.is_contiguous()
            assert torch.equal(got_r, want_r), (kind, trial, r, sharer)
            assert torch.equal(got_s, want_s), (kind, trial, r, sharer)
            flag, *recorded = status.buffer("cpu")[:5].tolist()
            assert flag == (1 if errors else 0)
            if errors:
                assert tuple(recorded) in errors, "the recorded error is none of the call's errors"


# ---- out-of-range slots: skipped, reported later ---------------------------------------------

@pytest.mark.parametrize("side", ["receiver", "sharer"])
def test_out_of_range_slot_is_skipped_and_reported_later(side):
    case = make_case(seed=61, padding=2)
    arenas = in_arena(case)
    rows_r, rows_s = slots.rows(case.receiver_caches[0]), slots.rows(case.sharer_caches[0])
    token = int(torch.nonzero(case.receiver_slots >= 0)[3])
    if side == "receiver":  # K's row past the pool is V's memory, V's lies in the guard
        value, limit, argument = rows_r + 3, rows_r, "receiver_slots"
        case.receiver_slots[token] = value
    else:
        value, limit, argument = rows_s + 2, rows_s, "sharer_slots"
        case.sharer_slots[token] = value
    before = [a.clone() for a in arenas]
    sharer_before = [t.clone() for t in case.sharer.storage]
    expected = case.clone_receiver()
    expected.receiver_slots[token] = -1  # what the call must do: skip the token
    expected = _reference_fuse(expected)

    torch.ops.c2c.fuse(*case.args(), "triton", False)

    for arena, was in zip(arenas, before):
        allowed = allowed_elements(arena, case.receiver.storage[0].shape, expected.receiver_slots)
        assert torch.equal(arena[~allowed], was[~allowed]), "an element outside the valid rows changed"
    for got, was in zip(case.sharer.storage, sharer_before):
        assert torch.equal(got, was)
    assert_storage_close(case, expected, torch.float32)
    message = str(status.slot_error(argument, token, value, limit, later=True))
    with pytest.raises(ValueError, match=re.escape(message)):
        status.raise_pending_errors()
    status.raise_pending_errors()  # reported once, then clear
    assert status.buffer("cpu").tolist() == [0] * status.SIZE


def test_out_of_range_slot_gives_zero_project_rows():
    case = make_case(seed=62, padding=2)
    token = int(torch.nonzero(case.receiver_slots >= 0)[1])
    case.sharer_slots[token] = -5
    projection, head_scale = torch.ops.c2c.project(*case.args(), "triton", False)
    assert torch.all(projection[:, token] == 0) and torch.all(head_scale[:, token] == 0)
    with pytest.raises(ValueError, match=re.escape(f"sharer_slots[{token}] = -5 for a non-padding token")):
        status.raise_pending_errors()


# ---- strided and expanded slots, duplicates ----------------------------------------------------

def _reference_fuse(case):
    reference.fuse(case.receiver_caches, case.sharer_caches, case.receiver_slots, case.sharer_slots,
                   case.weights, case.fusers)
    return case


def _slot_variant(case, kind):
    """Give the case strided or stride-0 slot tensors (values as ``kind`` says)."""
    rs, ss = case.receiver_slots, case.sharer_slots
    if kind == "strided":
        case.receiver_slots, case.sharer_slots = strided(rs.int()), strided(ss, 2)
    elif kind == "expanded-sharer":  # every token reads one sharer row
        case.sharer_slots = expanded(int(ss[rs >= 0][0]), rs.numel())
    elif kind == "expanded-receiver":  # every token has the same receiver slot: the last one writes
        case.receiver_slots = expanded(int(rs[rs >= 0][0]), rs.numel(), torch.int32)
    return case


@pytest.mark.parametrize("kind", ["strided", "expanded-sharer", "expanded-receiver"])
def test_fuse_with_strided_and_expanded_slots(kind):
    case = _slot_variant(make_case(seed=63, padding=2), kind)
    expected = case.clone_receiver()
    expected.receiver_slots, expected.sharer_slots, _ = prep(case, dedupe=True)
    _reference_fuse(expected)
    torch.ops.c2c.fuse(*case.args(), "triton", False)
    assert_storage_close(case, expected, torch.float32)


@pytest.mark.parametrize("kind", ["strided", "expanded-sharer", "expanded-receiver"])
def test_project_and_merge_with_strided_and_expanded_slots(kind):
    case = _slot_variant(make_case(seed=64, padding=2), kind)
    r, s, _ = prep(case, dedupe=False)
    want_p, want_a = reference.project(case.receiver_caches, case.sharer_caches, r, s, case.weights, case.fusers)
    got_p, got_a = torch.ops.c2c.project(*case.args(), "triton", False)
    torch.testing.assert_close(got_p, want_p, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(got_a, want_a, atol=2e-4, rtol=2e-4)

    expected = case.clone_receiver()
    merged, _, _ = slots.prepare(case.receiver_slots, None, slots.rows(case.receiver_caches[0]), 0, dedupe=True)
    reference.merge(expected.receiver_caches, merged, list(want_p.unbind(0)), list(want_a.unbind(0)))
    torch.ops.c2c.merge(case.receiver_caches, case.receiver_slots, list(got_p.unbind(0)), list(got_a.unbind(0)),
                        "triton", False)
    assert_storage_close(case, expected, torch.float32)


def test_parallel_fuse_all_with_strided_slots():
    """fuse_all with several sharers goes project -> merge: both on non-contiguous slots."""
    case = make_case(seed=65, padding=2)
    ckpt = c2c.make_checkpoint(case.weights, {0: 0, 1: 1}, sharer_heads=case.sharer.kv[0][0].shape[2])
    shuffled = case.sharer_slots.clone()
    valid = torch.nonzero(case.receiver_slots >= 0).squeeze(1)
    shuffled[valid] = case.sharer_slots[valid.flip(0)]
    expected = case.clone_receiver()
    parts = [reference.project(expected.receiver_caches, expected.sharer_caches, expected.receiver_slots, ss,
                               case.weights, case.fusers) for ss in (case.sharer_slots, shuffled)]
    reference.merge(expected.receiver_caches, expected.receiver_slots,
                    [p[0][i] for i in range(4) for p in parts], [p[1][i] for i in range(4) for p in parts])
    c2c.fuse_all([ckpt, ckpt], case.receiver.kv, [case.sharer.kv, case.sharer.kv], strided(case.receiver_slots),
                 [strided(case.sharer_slots.int()), strided(shuffled, 2)], mode="parallel", backend="triton")
    assert_storage_close(case, expected, torch.float32)


def test_duplicate_receiver_slot_last_valid_token_writes():
    """Duplicated receiver slots: the last *valid* token with the slot writes; a later duplicate
    whose sharer slot is out of range is skipped and does not hide the earlier one."""
    case = make_case(seed=66, padding=0, seq_lens=(6, 4))
    rs, ss = case.receiver_slots, case.sharer_slots
    rs[7], rs[2] = rs[1], rs[1]  # slot of token 1 also at tokens 2 and 7; token 7 is invalid
    ss[7] = slots.rows(case.sharer_caches[0])
    rs[5] = rs[9]  # and a plain duplicate: token 9 writes
    expected = case.clone_receiver()
    expected.receiver_slots, expected.sharer_slots, errors = prep(case, dedupe=True)
    assert expected.receiver_slots[[1, 2, 5, 7, 9]].tolist() == [-1, int(rs[1]), -1, -1, int(rs[9])]
    _reference_fuse(expected)
    torch.ops.c2c.fuse(*case.args(), "triton", False)
    assert_storage_close(case, expected, torch.float32)
    with pytest.raises(ValueError, match=re.escape("sharer_slots[7]")):
        status.raise_pending_errors()


# ---- project's skipped rows, poisoned workspaces -----------------------------------------------

@pytest.mark.parametrize("poison", [False, True], ids=["plain", "poisoned"])
def test_project_padding_rows_are_exactly_zero(poison, monkeypatch):
    monkeypatch.setattr(workspace, "_poison", poison)
    case = make_case(seed=67, padding=5, dtype=torch.bfloat16)
    projection, head_scale = torch.ops.c2c.project(*case.args(), "triton", False)
    pad = case.receiver_slots < 0
    assert torch.equal(projection[:, pad], torch.zeros_like(projection[:, pad]))
    assert torch.equal(head_scale[:, pad], torch.zeros_like(head_scale[:, pad]))
    want_p, want_a = reference.project(case.receiver_caches, case.sharer_caches, case.receiver_slots,
                                       case.sharer_slots, case.weights, case.fusers)
    torch.testing.assert_close(projection, want_p, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(head_scale, want_a, atol=5e-2, rtol=5e-2)


def test_every_pipeline_buffer_is_a_poisoned_workspace(monkeypatch):
    """Every scratch buffer comes from workspace.empty, so the debug mode NaN-fills it; the
    results stay those of the reference (no element is read before it is written)."""
    monkeypatch.setattr(workspace, "_poison", True)
    made = []
    original = workspace.empty

    def spy(*shape, dtype, device):
        t = original(*shape, dtype=dtype, device=device)
        made.append(t)
        return t

    monkeypatch.setattr(workspace, "empty", spy)
    case = make_case(seed=68, padding=3, layout="flashinfer_interleaved")
    expected = _reference_fuse(case.clone_receiver())
    torch.ops.c2c.fuse(*case.args(), "triton", False)
    assert_storage_close(case, expected, torch.float32)
    floats = [t for t in made if t.is_floating_point()]
    ints = [t for t in made if not t.is_floating_point()]
    assert len(floats) >= 4 and len(ints) == 2, "u, z, the FFN inner buffer, the logits and the prepared slots"
    tokens, entries = case.receiver_slots.numel(), len(case.fusers)
    assert sum(t.numel() for t in floats) >= 2 * entries * tokens * case.weights.hidden_dim
