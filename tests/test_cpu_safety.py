"""Safety of the native CPU backend (csrc/cpu): slots out of range raise the named ValueError
with nothing written, duplicated receiver slots follow c2c_kernels.slots (last valid token
wins in fuse and merge, project returns every token), empty pools are refused, and both GEMM
engines agree with the reference when every workspace is poisoned with NaN."""
import os
import subprocess
import sys

import pytest
import torch

from c2c_kernels import backends, reference
from c2c_kernels import slots as slot_rules
from c2c_kernels.status import slot_error
from c2c_kernels.testing import TOLERANCES, assert_storage_close, at_thread_counts, make_case, reference_fused

pytestmark = pytest.mark.skipif(backends.reason("cpu") is not None,
                                reason=f"cpu backend unavailable: {backends.reason('cpu')}")

OPS = ("fuse", "project", "merge")


def cpu():
    return backends.get("cpu")


def snapshot(case):
    return [t.clone() for t in case.receiver.storage + case.sharer.storage]


def assert_unchanged(case, before):
    for got, want in zip(case.receiver.storage + case.sharer.storage, before):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), "a cache changed"


def corrections(case, sharers: int = 2, seed: int = 0):
    """S * R random fp32 corrections for merge."""
    g = torch.Generator().manual_seed(seed)
    t, kt, ht = case.receiver_slots.shape[0], case.weights.receiver_width, case.weights.receiver_heads
    n = len(case.receiver_caches) * sharers
    return ([torch.randn(t, kt, generator=g) for _ in range(n)],
            [torch.rand(t, ht, generator=g) for _ in range(n)])


def call(op: str, case, projections=None, head_scales=None):
    if op == "fuse":
        return torch.ops.c2c.fuse(*case.args(), "cpu", False)
    if op == "project":
        return torch.ops.c2c.project(*case.args(), "cpu", False)
    if projections is None:
        projections, head_scales = corrections(case)
    return torch.ops.c2c.merge(case.receiver_caches, case.receiver_slots, projections, head_scales, "cpu", False)


def shaped(slots: torch.Tensor, form: str, dtype) -> torch.Tensor:
    """The same values as int32/int64, contiguous or as a strided slice of a larger tensor."""
    slots = slots.to(dtype)
    if form == "strided":
        out = torch.stack([slots, torch.full_like(slots, -7)], 1)[:, 0]
        assert not out.is_contiguous()
        return out
    return slots


# (argument, where the bad value goes, the bad value given the pool's rows and the slot dtype)
BAD = {
    "receiver_just_past_end": ("receiver_slots", lambda rows, dt: rows),
    "receiver_far": ("receiver_slots", lambda rows, dt: 2**40 if dt == torch.int64 else 2**31 - 1),
    "sharer_just_past_end": ("sharer_slots", lambda rows, dt: rows),
    "sharer_far": ("sharer_slots", lambda rows, dt: 2**40 if dt == torch.int64 else 2**31 - 1),
    "sharer_negative": ("sharer_slots", lambda rows, dt: -2),
    "sharer_very_negative": ("sharer_slots", lambda rows, dt: -2**40 if dt == torch.int64 else -2**31),
}


@pytest.mark.parametrize("form", ["contiguous", "strided"])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("op,bad", [(op, bad) for op in OPS for bad in BAD
                                    if op != "merge" or BAD[bad][0] == "receiver_slots"])  # merge reads no sharer
def test_out_of_range_slot_raises_with_nothing_written(op, bad, slot_dtype, form):
    argument, value_of = BAD[bad]
    case = make_case(layout="vllm_hnd", seed=31, seq_lens=(6, 5), padding=3)
    valid = torch.nonzero(case.receiver_slots >= 0).flatten().tolist()
    first, later = valid[2], valid[-1]
    view = case.receiver_caches[0] if argument == "receiver_slots" else case.sharer_caches[0]
    rows = slot_rules.rows(view)
    value = value_of(rows, slot_dtype)
    rs, ss = case.receiver_slots.clone(), case.sharer_slots.clone()
    target = rs if argument == "receiver_slots" else ss
    target[first] = value
    target[later] = value  # a later offence: the first one is reported
    case.receiver_slots, case.sharer_slots = shaped(rs, form, slot_dtype), shaped(ss, form, slot_dtype)
    before = snapshot(case)
    with pytest.raises(ValueError) as err:
        call(op, case)
    assert str(err.value) == str(slot_error(argument, first, value, rows))
    assert_unchanged(case, before)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64], ids=str)
def test_stride_zero_slot_tensors(op, slot_dtype):
    """Expanded (stride-0) slot tensors: an out-of-range value is reported at token 0; an
    in-range one is a receiver slot every token shares, of which only the last is written."""
    case = make_case(seed=32, seq_lens=(4, 3), padding=0)
    t = case.receiver_slots.shape[0]
    rows = slot_rules.rows(case.receiver_caches[0])
    rs = torch.tensor([rows + 3], dtype=slot_dtype).expand(t)
    assert rs.stride(0) == 0
    bad = make_case(seed=32, seq_lens=(4, 3), padding=0)
    bad.receiver_slots = rs
    bad.sharer_slots = bad.sharer_slots.to(slot_dtype)
    before = snapshot(bad)
    with pytest.raises(ValueError) as err:
        call(op, bad)
    assert str(err.value) == str(slot_error("receiver_slots", 0, rows + 3, rows))
    assert_unchanged(bad, before)

    slot = int(case.receiver_slots[2])
    case.receiver_slots = torch.tensor([slot], dtype=slot_dtype).expand(t)
    case.sharer_slots = case.sharer_slots.to(slot_dtype)
    last_only = torch.full((t,), -1, dtype=torch.long)
    last_only[-1] = slot
    check_duplicates(op, case, last_only)


def dedupe_last(receiver_slots: torch.Tensor) -> torch.Tensor:
    """The receiver slots with every valid token but the last of each slot turned into padding."""
    rs = receiver_slots.long().clone()
    seen = set()
    for t in reversed(range(rs.shape[0])):
        r = int(rs[t])
        if r < 0:
            continue
        if r in seen:
            rs[t] = -1
        seen.add(r)
    return rs


def check_duplicates(op, case, deduped):
    """The cpu result of `op` on `case` against the reference on `deduped` receiver slots
    (project: against the reference on the slots as given, every valid token's rows)."""
    dtype = case.receiver_caches[0].dtype
    tol = TOLERANCES[dtype]
    if op == "project":
        want_p, want_a = reference.project(case.receiver_caches, case.sharer_caches, case.receiver_slots,
                                           case.sharer_slots, case.weights, case.fusers)
        got_p, got_a = call("project", case)
        torch.testing.assert_close(got_p, want_p, atol=tol, rtol=tol)
        torch.testing.assert_close(got_a, want_a, atol=tol, rtol=tol)
        pad = case.receiver_slots < 0
        assert torch.all(got_p[:, pad] == 0) and torch.all(got_a[:, pad] == 0)
        return
    expected = case.clone_receiver()
    expected.receiver_slots = deduped.to(case.receiver_slots.dtype)
    if op == "fuse":
        reference.fuse(expected.receiver_caches, expected.sharer_caches, expected.receiver_slots,
                       expected.sharer_slots, expected.weights, expected.fusers)
        call("fuse", case)
    else:
        p, a = corrections(case, seed=5)
        reference.merge(expected.receiver_caches, expected.receiver_slots, p, a)
        call("merge", case, p, a)
    assert_storage_close(case, expected, tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_duplicate_receiver_slots_last_valid_token_wins(op, dtype):
    """Tokens 1, 4 and 6 share a receiver slot, tokens 2 and 7 another (7 padding-free, 2 not
    last): fuse and merge write each row once, with the last token's result; project returns
    every valid token's rows."""
    case = make_case(layout="flashinfer_nhd", dtype=dtype, seed=33, seq_lens=(6, 5), padding=2)
    rs = case.receiver_slots.clone()
    valid = torch.nonzero(rs >= 0).flatten().tolist()
    a, b = rs[valid[1]].item(), rs[valid[2]].item()
    for i in (4, 6):
        rs[valid[i]] = a
    rs[valid[7]] = b
    case.receiver_slots = rs
    deduped = dedupe_last(rs)
    assert int((deduped >= 0).sum()) == len(valid) - 3
    check_duplicates(op, case, deduped)


def test_duplicates_are_deterministic_across_thread_counts():
    """Many tokens on few rows: the same bits whatever the number of threads."""
    case = make_case(seed=34, seq_lens=(9, 8), padding=1, hidden=32, intermediate=24)
    rs = case.receiver_slots.clone()
    valid = rs >= 0
    rs[valid] = rs[valid][torch.arange(int(valid.sum())) % 3]
    case.receiver_slots = rs
    results = at_thread_counts(case, lambda c: call("fuse", c))
    for other in results[1:]:
        assert all(torch.equal(x, y) for x, y in zip(other, results[0]))
    check_duplicates("fuse", case, dedupe_last(rs))


def test_reported_error_is_the_lowest_token():
    """A bad sharer slot at token 2 is reported before a bad receiver slot at token 5; at one
    token, a bad receiver slot is reported (its sharer slot is then never read)."""
    case = make_case(seed=35, seq_lens=(5, 4), padding=0)
    r_rows, s_rows = slot_rules.rows(case.receiver_caches[0]), slot_rules.rows(case.sharer_caches[0])
    case.sharer_slots[2] = s_rows
    case.receiver_slots[5] = r_rows + 1
    with pytest.raises(ValueError) as err:
        call("fuse", case)
    assert str(err.value) == str(slot_error("sharer_slots", 2, s_rows, s_rows))
    case.receiver_slots[2] = -5 - r_rows  # padding now: its bad sharer slot is ignored
    case.receiver_slots[1] = r_rows
    case.sharer_slots[1] = -1
    with pytest.raises(ValueError) as err:
        call("project", case)
    assert str(err.value) == str(slot_error("receiver_slots", 1, r_rows, r_rows))


def test_bad_slots_raise_even_with_every_gate_closed():
    case = make_case(seed=36, gates_open=False)
    rows = slot_rules.rows(case.receiver_caches[0])
    i = int(torch.nonzero(case.receiver_slots >= 0)[0])
    case.receiver_slots[i] = rows
    with pytest.raises(ValueError) as err:
        call("fuse", case)
    assert str(err.value) == str(slot_error("receiver_slots", i, rows, rows))


@pytest.mark.parametrize("which", ["receiver", "sharer"])
@pytest.mark.parametrize("empty", ["no_pages", "page_size_0"])
def test_empty_pools_are_refused_by_the_native_kernels(which, empty):
    """Below the op layer (which refuses empty pools itself): a valid token in a pool of 0
    rows is out of range, never a division by a page size of 0; all padding does nothing."""
    case = make_case(seed=37, seq_lens=(3, 2), padding=1)
    views = case.receiver_caches if which == "receiver" else case.sharer_caches
    shape = list(views[0].shape)
    shape[0 if empty == "no_pages" else 1] = 0
    empty_views = [torch.zeros(shape, dtype=v.dtype) for v in views]
    if which == "receiver":
        case.receiver_caches = empty_views
    else:
        case.sharer_caches = empty_views
    argument = "receiver_slots" if which == "receiver" else "sharer_slots"
    i = int(torch.nonzero(case.receiver_slots >= 0)[0])
    value = int((case.receiver_slots if which == "receiver" else case.sharer_slots)[i])
    args = (case.receiver_caches, case.sharer_caches, case.receiver_slots, case.sharer_slots,
            list(case.weights), case.fusers)
    for fn in (cpu().fuse, cpu().project):
        with pytest.raises(ValueError) as err:
            fn(*args)
        assert str(err.value) == str(slot_error(argument, i, value, 0))
    if which == "receiver":
        p, a = corrections(case)
        with pytest.raises(ValueError) as err:
            cpu().merge(case.receiver_caches, case.receiver_slots, p, a)
        assert str(err.value) == str(slot_error(argument, i, value, 0))
    padding = torch.full_like(case.receiver_slots, -1)
    cpu().fuse(case.receiver_caches, case.sharer_caches, padding, case.sharer_slots, list(case.weights), case.fusers)
    p, a = cpu().project(case.receiver_caches, case.sharer_caches, padding, case.sharer_slots, list(case.weights),
                         case.fusers)
    assert not p.any() and not a.any()


def test_entries_with_different_pools_are_refused_by_the_native_kernels():
    """One slot tensor addresses every entry: the kernels check each entry's pool matches."""
    case = make_case(seed=38, seq_lens=(3, 2))
    small = case.receiver_caches[1][:-1]
    receiver = [case.receiver_caches[0], small] + case.receiver_caches[2:]
    with pytest.raises(ValueError, match=r"receiver_caches\[1\]"):
        cpu().fuse(receiver, case.sharer_caches, case.receiver_slots, case.sharer_slots, list(case.weights),
                   case.fusers)
    p, a = corrections(case)
    with pytest.raises(ValueError, match=r"receiver_caches\[1\]"):
        cpu().merge(receiver, case.receiver_slots, p, a)


# ---- both GEMM engines with poisoned workspaces ----------------------------------------------

# (hidden, intermediate): I < H and I > H put the FFN and head activations in one buffer with
# different widths (the case that gave NaN on AMX machines); 80 and 48 are not multiples of 32.
WIDTHS = {"i_lt_h": (96, 80), "i_gt_h": (48, 112), "i_eq_h": (64, 64)}


def engine_case(dtype, widths):
    hidden, intermediate = WIDTHS[widths]
    return make_case(layout="flashinfer_hnd", sharer_layout="vllm_nhd", dtype=dtype, seed=41, hidden=hidden,
                     intermediate=intermediate, seq_lens=(9, 4, 6), padding=3, receiver_dim=12, sharer_dim=10)


def check_engine_case(dtype, widths):
    case = engine_case(dtype, widths)
    expected = reference_fused(case)
    want_p, want_a = reference.project(case.receiver_caches, case.sharer_caches, case.receiver_slots,
                                       case.sharer_slots, case.weights, case.fusers)
    got_p, got_a = call("project", case)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(got_p, want_p, atol=tol, rtol=tol)
    torch.testing.assert_close(got_a, want_a, atol=tol, rtol=tol)
    call("fuse", case)
    for t in case.receiver.storage:
        assert torch.isfinite(t).all(), "NaN or inf in the fused cache"
    assert_storage_close(case, expected, tol)


def test_poisoning_follows_the_environment():
    """The native workspaces are poisoned exactly when C2C_POISON_WORKSPACES=1 (tests/conftest.py)."""
    poisoned = os.environ.get("C2C_POISON_WORKSPACES") == "1"
    assert ("workspaces=poisoned" in cpu().config(torch.float32)) == poisoned


@pytest.mark.parametrize("widths", list(WIDTHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("engine", ["fp32", "native", "brgemm", "packed"])
def test_gemm_engines_match_the_reference(monkeypatch, engine, dtype, widths):
    """Every engine (the session poisons workspaces, see tests/conftest.py); fp32 caches always
    take the fp32 engine; packed runs native16 where oneDNN cannot take the dtype here."""
    monkeypatch.setenv("C2C_CPU_GEMM", engine)
    if dtype != torch.float32:
        names = {"fp32": ("fp32",), "native": ("native16",), "packed": ("packed", "native16")}.get(engine, (engine,))
        assert cpu().config(dtype).startswith(tuple("gemm=" + n for n in names))
    check_engine_case(dtype, widths)


_POISON_SCRIPT = r"""
import os, torch
from c2c_kernels import backends
import test_cpu_safety as t
cpu = backends.get("cpu")
assert "workspaces=poisoned" in cpu.config(torch.float32), cpu.config(torch.float32)
for engine in ("fp32", "native", "brgemm", "packed"):
    os.environ["C2C_CPU_GEMM"] = engine
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for widths in t.WIDTHS:
            t.check_engine_case(dtype, widths)
print("ok")
"""


def test_gemm_engines_under_poisoned_workspaces():
    """The engine matrix in a process that poisons every workspace (the variable is read once),
    whatever this session does: a read of unwritten workspace memory gives NaN, and fails."""
    env = {**os.environ, "C2C_POISON_WORKSPACES": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", _POISON_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
