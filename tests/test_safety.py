"""Property-based safety tests: every backend, pools carved from sentinel-filled guard arenas.

Hypothesis draws pool geometries (page size, pages, NHD or HND order, gaps between rows and
pages, K and V in separate, interleaved or stacked memory), dtypes, slot patterns (padding,
duplicates, out-of-range on either side, repeated and shuffled sharer slots), slot tensors
(int32/int64, contiguous, strided, expanded) and the op. Each backend must then:

- match the reference on the rows it writes (the slot rules of ``c2c_kernels.slots``),
- leave every other byte of the arenas, and all of the sharer memory, bit-identical,
- on bad slots: CPU backends raise the first error with nothing written; GPU-style backends
  (Triton, the CUDA sources) skip the token and ``raise_pending_errors()`` reports it.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import c2c_kernels as c2c
from c2c_kernels import reference, slots, status
from c2c_kernels.testing import TOLERANCES, backend_params

CPU_BACKENDS = [p for p in backend_params(include_reference=True) if p.values[1] == "cpu"]
DEFERRED = {"triton", "cuda", "cuda_emulator"}  # record slot errors on the device, raise later
SLOW = {"triton", "cuda_emulator"}  # interpreter / emulator: fewer examples
EXAMPLES = int(os.environ.get("C2C_SAFETY_EXAMPLES", "0"))


def _settings(backend):
    n = EXAMPLES or (30 if backend in SLOW else 150)
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---- guard arenas ----------------------------------------------------------------------------

def _pools(draw, pages, page_size, heads, dim, dtype, layers, seed):
    """``layers`` (K, V) views inside sentinel-filled arenas; returns (kv, arenas)."""
    order = draw(st.sampled_from(["NHD", "HND"]))
    row_gap = draw(st.integers(0, 3))
    page_gap = draw(st.integers(0, 5))
    kv_mode = draw(st.sampled_from(["separate", "interleaved", "stacked"]))
    lead = draw(st.integers(0, 4))
    if order == "NHD":
        entry_stride, head_stride = heads * dim + row_gap, dim
        block = page_size * entry_stride
    else:
        head_stride, entry_stride = page_size * dim + row_gap, dim
        block = heads * head_stride
    page_stride = block + page_gap + (block if kv_mode == "interleaved" else 0)
    span = pages * page_stride
    g = torch.Generator().manual_seed(seed)
    kv, arenas = [], []
    for _ in range(layers):
        views = []
        if kv_mode == "separate":
            bufs = [torch.full((lead + span + 7,), -777.0, dtype=dtype) for _ in range(2)]
            offsets = [(0, lead), (1, lead)]
        else:
            bufs = [torch.full((lead + 2 * span + 7,), -777.0, dtype=dtype)]
            offsets = [(0, lead), (0, lead + (block if kv_mode == "interleaved" else span))]
        for b, off in offsets:
            v = bufs[b].as_strided((pages, page_size, heads, dim), (page_stride, entry_stride, head_stride, 1), off)
            v.copy_(torch.randn(v.shape, generator=g).to(dtype))
            views.append(v)
        kv.append(tuple(views))
        arenas += bufs
    return kv, arenas


def _slot_tensor(draw, values, dtype):
    t = torch.tensor(values, dtype=dtype)
    form = draw(st.sampled_from(["contiguous", "strided", "expanded"] if len(set(values)) == 1 and values
                                else ["contiguous", "strided"]))
    if form == "strided":  # every other element of a larger tensor, junk in between
        wide = torch.full((2 * len(values),), 10**6, dtype=dtype)
        wide[::2] = t
        return wide[::2]
    if form == "expanded":
        return t[:1].expand(len(values))
    return t


def _slots(draw, n, rows, bad_ok, padding_ok, dtype):
    big = 2**31 - 1 if dtype == torch.int32 else 2**40
    choices = [st.integers(0, rows - 1)]
    if padding_ok:
        choices.append(st.sampled_from([-1, -7]))
    if bad_ok:
        choices.append(st.sampled_from([rows, rows + 3, big] + ([] if padding_ok else [-2])))
    return [draw(st.one_of(*choices)) for _ in range(n)]


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    ht, dt = draw(st.sampled_from([(2, 4), (4, 2), (1, 8), (3, 2)]))
    hs, ds = draw(st.sampled_from([(1, 4), (2, 2), (2, 4), (3, 3)]))
    layers = draw(st.integers(1, 2))
    r_page, s_page = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    r_pages, s_pages = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    receiver, r_arenas = _pools(draw, r_pages, r_page, ht, dt, dtype, layers, seed)
    share = draw(st.booleans()) and hs * ds == ht * dt and (hs, ds) == (ht, dt)
    if share:  # the sharer reads the receiver's own memory (overlap: corrections from clean rows)
        sharer, s_arenas, s_page, s_pages = receiver, [], r_page, r_pages
    else:
        sharer, s_arenas = _pools(draw, s_pages, s_page, hs, ds, dtype, layers, seed + 1)
    n = draw(st.integers(1, 10))
    bad = draw(st.booleans())
    rdt, sdt = draw(st.sampled_from([torch.int32, torch.int64])), draw(st.sampled_from([torch.int32, torch.int64]))
    r_rows, s_rows = r_pages * r_page, s_pages * s_page
    rs = _slot_tensor(draw, _slots(draw, n, r_rows, bad, True, rdt), rdt)
    ss = _slot_tensor(draw, _slots(draw, n, s_rows, bad, False, sdt), sdt)
    op = draw(st.sampled_from(["fuse", "fuse", "project", "merge"]))
    weights = c2c.random_weights(2 * layers, hs, ds, ht, dt, hidden_dim=16, intermediate_dim=12,
                                 dtype=dtype, seed=seed, gates_open=draw(st.sampled_from([True, [True, False] * layers])))
    return dict(dtype=dtype, receiver=receiver, sharer=sharer, arenas=r_arenas + s_arenas, s_arenas=s_arenas,
                rs=rs, ss=ss, op=op, weights=weights, layers=layers, seed=seed)


# ---- running and checking ---------------------------------------------------------------------

def _entries(case):
    rc = [v for kv in case["receiver"] for v in kv]
    sc = [v for kv in case["sharer"] for v in kv]
    return rc, sc, list(range(len(rc)))


def _corrections(case):
    rc, _, _ = _entries(case)
    g = torch.Generator().manual_seed(case["seed"])
    t, ht, kt = case["rs"].shape[0], rc[0].shape[2], rc[0].shape[2] * rc[0].shape[3]
    return ([torch.randn(t, kt, generator=g) for _ in rc], [torch.rand(t, ht, generator=g) for _ in rc])


def _run(case, backend):
    rc, sc, fusers = _entries(case)
    w, rs, ss = list(case["weights"]), case["rs"], case["ss"]
    if case["op"] == "fuse":
        torch.ops.c2c.fuse(rc, sc, rs, ss, w, fusers, backend, False)
    elif case["op"] == "project":
        return torch.ops.c2c.project(rc, sc, rs, ss, w, fusers, backend, False)
    else:
        p, a = _corrections(case)
        torch.ops.c2c.merge(rc, rs, p, a, backend, False)
    return None


def _expected(case):
    """The arenas (and project's outputs) the slot rules ask for, from the reference backend run
    on the prepared (clean) slots of a copy of the arenas."""
    rc, sc, fusers = _entries(case)
    r_rows, s_rows = slots.rows(rc[0]), slots.rows(sc[0])
    dedupe = case["op"] != "project"
    rs, ss, errors = slots.prepare(case["rs"], None if case["op"] == "merge" else case["ss"], r_rows, s_rows,
                                   dedupe=dedupe)
    saved = [a.clone() for a in case["arenas"]]
    out = None
    if case["op"] == "fuse":
        reference.fuse(rc, sc, rs, ss, case["weights"], fusers)
    elif case["op"] == "project":
        out = reference.project(rc, sc, rs, ss, case["weights"], fusers)
    else:
        reference.merge(rc, rs, *_corrections(case))
    expected = [a.clone() for a in case["arenas"]]
    for a, s in zip(case["arenas"], saved):
        a.copy_(s)
    return expected, out, errors


def _written_mask(case):
    """True at every arena element of a receiver row the call may write."""
    rc, _, _ = _entries(case)
    r_rows = slots.rows(rc[0])
    rs = case["rs"].long()
    rs = rs[(rs >= 0) & (rs < r_rows)]
    marks = []
    for a in case["arenas"]:
        marks.append(torch.zeros(a.shape, dtype=torch.bool))
    lookup = {a.data_ptr(): m for a, m in zip(case["arenas"], marks)}
    for v in rc:
        base = v._base if v._base is not None else v
        m = lookup[base.data_ptr()].as_strided(v.shape, v.stride(), v.storage_offset())
        page, entry = rs // v.shape[1], rs % v.shape[1]
        m[page, entry] = True
    return marks


def _bits(t):
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def _check(case, backend):
    expected, expected_out, errors = _expected(case)
    before = [a.clone() for a in case["arenas"]]
    status.clear()
    if errors and backend not in DEFERRED:
        argument, index, value, limit = errors[0]
        with pytest.raises(ValueError, match=rf"^{status.ARGUMENTS[argument]}\[{index}\] = {value}\b"):
            _run(case, backend)
        for got, was in zip(case["arenas"], before):
            assert torch.equal(_bits(got), _bits(was)), "a call that raised wrote memory"
        return
    out = _run(case, backend)
    if errors:
        with pytest.raises(ValueError, match="recorded on the device") as info:
            status.raise_pending_errors()
        reported = {(status.ARGUMENTS[a], i, v) for a, i, v, _ in errors}
        assert any(info.value.args[0].startswith(f"{a}[{i}] = {v}") for a, i, v in reported), info.value
        status.raise_pending_errors()  # cleared: no second raise
    tol = TOLERANCES[case["dtype"]]
    marks = _written_mask(case)
    for got, want, was, mark in zip(case["arenas"], expected, before, marks):
        untouched = ~mark  # the sharer arenas are never marked: bit-identical as a whole
        assert torch.equal(_bits(got)[untouched], _bits(was)[untouched]), "memory outside the written rows changed"
        torch.testing.assert_close(got[mark].float(), want[mark].float(), atol=tol, rtol=tol)
    if expected_out is not None:
        for got_t, want_t in zip(out, expected_out):
            skipped = _skipped_tokens(case)
            assert torch.equal(got_t[:, skipped], torch.zeros_like(got_t[:, skipped])), \
                "project returned non-zero rows for padding or skipped tokens"
            torch.testing.assert_close(got_t, want_t, atol=tol, rtol=tol)


def _skipped_tokens(case):
    rc, sc, _ = _entries(case)
    rs, _, _ = slots.prepare(case["rs"], case["ss"], slots.rows(rc[0]), slots.rows(sc[0]), dedupe=False)
    return rs < 0


@pytest.mark.parametrize("backend,device", CPU_BACKENDS)
def test_guard_arenas(backend, device):
    @_settings(backend)
    @given(case=cases())
    def run(case):
        _check(case, backend)
    run()


# ---- one regression test per defect class (deterministic, all CPU backends) -----------------

def _simple(dtype=torch.float32, layers=1, n=6):
    g = torch.Generator().manual_seed(0)
    w = c2c.random_weights(2 * layers, 2, 4, 2, 4, hidden_dim=16, intermediate_dim=12, dtype=dtype)
    rk = [torch.randn(3, 4, 2, 4, generator=g).to(dtype) for _ in range(2 * layers)]
    sk = [torch.randn(5, 2, 2, 4, generator=g).to(dtype) for _ in range(2 * layers)]
    rs = torch.tensor([0, 5, -1, 7, 2, 11][:n])
    ss = torch.tensor([1, 9, 3, 0, 4, 2][:n])
    return w, rk, sk, rs, ss


@pytest.mark.parametrize("backend,device", CPU_BACKENDS)
def test_all_padding_batch(backend, device):
    w, rk, sk, rs, ss = _simple()
    before = [t.clone() for t in rk]
    rs = torch.full_like(rs, -1)
    torch.ops.c2c.fuse(rk, sk, rs, ss, list(w), [0, 1], backend, False)
    assert all(torch.equal(a, b) for a, b in zip(rk, before))
    p, a = torch.ops.c2c.project(rk, sk, rs, ss, list(w), [0, 1], backend, False)
    assert not p.any() and not a.any()


@pytest.mark.parametrize("backend,device", CPU_BACKENDS)
def test_duplicate_receiver_slots_last_wins(backend, device):
    w, rk, sk, rs, ss = _simple()
    rs = torch.tensor([4, 4, -1, 9, 4, 9])
    want = [t.clone() for t in rk]
    reference.fuse(want, sk, torch.tensor([-1, -1, -1, -1, 4, 9]), ss, w, [0, 1])
    torch.ops.c2c.fuse(rk, sk, rs, ss, list(w), [0, 1], backend, False)
    for got, exp in zip(rk, want):
        torch.testing.assert_close(got, exp, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("backend,device", CPU_BACKENDS)
def test_strided_and_expanded_slots(backend, device):
    w, rk, sk, rs, ss = _simple()
    want = [t.clone() for t in rk]
    reference.fuse(want, sk, rs.contiguous(), ss, w, [0, 1])
    wide = torch.stack([rs, torch.full_like(rs, 10**6)], 1).flatten()
    torch.ops.c2c.fuse(rk, sk, wide[::2], ss, list(w), [0, 1], backend, False)
    for got, exp in zip(rk, want):
        torch.testing.assert_close(got, exp, atol=2e-4, rtol=2e-4)
    # one sharer row for every token (stride 0)
    w, rk, sk, rs, ss = _simple()
    want = [t.clone() for t in rk]
    reference.fuse(want, sk, rs, torch.full_like(ss, 3), w, [0, 1])
    torch.ops.c2c.fuse(rk, sk, rs, torch.tensor([3]).expand(len(rs)), list(w), [0, 1], backend, False)
    for got, exp in zip(rk, want):
        torch.testing.assert_close(got, exp, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("backend,device", CPU_BACKENDS)
def test_sharer_view_overlapping_receiver_reads_clean_rows(backend, device):
    """Entry 1's sharer is entry 0's receiver: it must read the rows as they were at the start."""
    g = torch.Generator().manual_seed(1)
    w = c2c.random_weights(2, 2, 4, 2, 4, hidden_dim=16, intermediate_dim=12)
    pool = [torch.randn(3, 4, 2, 4, generator=g) for _ in range(2)]
    other = torch.randn(3, 4, 2, 4, generator=g)
    rs = torch.tensor([0, 5, 7, 2])
    want = [t.clone() for t in pool]
    snapshot = want[0].clone()
    reference.fuse(want, [other, snapshot], rs, rs, w, [0, 1])
    torch.ops.c2c.fuse(pool, [other, pool[0]], rs, rs, list(w), [0, 1], backend, False)
    for got, exp in zip(pool, want):
        torch.testing.assert_close(got, exp, atol=2e-4, rtol=2e-4)


def test_overlapping_and_expanded_receiver_views_are_refused():
    w, rk, sk, rs, ss = _simple()
    flat = torch.randn(200)
    k = flat[:96].view(3, 4, 2, 4)
    v = flat[8:104].view(3, 4, 2, 4)  # overlaps k
    with pytest.raises(ValueError, match=r"receiver_caches\[1\] shares memory with receiver_caches\[0\]"):
        torch.ops.c2c.fuse([k, v], sk, rs, ss, list(w), [0, 1], "reference", False)
    same_other_stride = rk[0].as_strided((3, 4, 2, 4), (32, 8, 4, 1))  # same memory, another view object
    with pytest.raises(ValueError, match="shares memory"):
        torch.ops.c2c.fuse([rk[0], same_other_stride], sk, rs, ss, list(w), [0, 1], "reference", False)
    expanded = torch.randn(1, 4, 2, 4).expand(3, 4, 2, 4)
    with pytest.raises(ValueError, match=r"receiver_caches\[0\]: .* share memory \(an expanded"):
        torch.ops.c2c.fuse([expanded, rk[1]], sk, rs, ss, list(w), [0, 1], "reference", False)
    # interleaved K/V of one page pool share no element: accepted
    pages = torch.randn(3, 2, 4, 2, 4)
    torch.ops.c2c.fuse([pages[:, 0], pages[:, 1]], sk, rs, ss, list(w), [0, 1], "reference", False)


def test_empty_pools_are_refused():
    w, rk, sk, rs, ss = _simple()
    for bad, name in ((torch.zeros(0, 4, 2, 4), "receiver_caches"), (torch.zeros(3, 0, 2, 4), "receiver_caches")):
        with pytest.raises(ValueError, match=rf"{name}\[0\]: an empty pool"):
            torch.ops.c2c.fuse([bad, bad.clone()], sk, rs, ss, list(w), [0, 1], "reference", False)
    empty = torch.zeros(0, 2, 2, 4)
    with pytest.raises(ValueError, match=r"sharer_caches\[0\]: an empty pool"):
        torch.ops.c2c.fuse(rk, [empty, empty], rs, ss, list(w), [0, 1], "reference", False)


def test_check_slots_raises_pending_device_errors():
    buf = status.buffer("cpu")
    buf.copy_(torch.tensor([1, status.SHARER_SLOTS, 3, -5, 40, 0, 0, 0]))
    w, rk, sk, rs, ss = _simple()
    with pytest.raises(ValueError, match=r"sharer_slots\[3\] = -5 .*recorded on the device"):
        torch.ops.c2c.fuse(rk, sk, rs, ss, list(w), [0, 1], "reference", True)
    c2c.raise_pending_errors()  # cleared
