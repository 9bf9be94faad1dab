"""The op layer's host-cost machinery (c2c_kernels/ops.py): the check cache keyed by a fingerprint
of the views and weights, and eager calls that skip the dispatcher. A stale cache is a
correctness bug, so every way a validated view or weight can change under the same Python
objects must be re-checked; and the dispatcher must still run whenever it could do something."""
import sys
import types
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import c2c_kernels as c2c
from c2c_kernels import backends, ops
from c2c_kernels.checkpoint import make_checkpoint

pytestmark = pytest.mark.skipif(ops._fingerprint is None, reason="the native extension c2c_kernels._C is not built")


class Recorder:
    """A backend that computes nothing and records which of its ops ran."""

    DEVICES = ("cpu",)

    def __init__(self):
        self.calls = []

    def fuse(self, *args):
        self.calls.append("fuse")

    def project(self, receiver_caches, sharer_caches, receiver_slots, sharer_slots, w, fusers):
        self.calls.append("project")
        t = receiver_slots.shape[0]
        return (torch.zeros(len(fusers), t, w.receiver_width), torch.zeros(len(fusers), t, w.receiver_heads))

    def merge(self, *args):
        self.calls.append("merge")


@pytest.fixture
def recorder(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(backends, "resolve", lambda name, device: rec)
    ops.clear_check_cache()
    yield rec
    ops.clear_check_cache()


@pytest.fixture
def full_checks(monkeypatch):
    """How many calls ran the full checks (they start with the weights)."""
    count = types.SimpleNamespace(n=0)
    check = ops.check_weights

    def counted(weights):
        count.n += 1
        return check(weights)
    monkeypatch.setattr(ops, "check_weights", counted)
    return count


def small(layers=2):
    """Two pools per layer (K, V) of 3 pages x 4 entries x 2 heads x 4 on both sides (one geometry,
    so a sharer view can be re-pointed at receiver memory), and weights for 2 * layers fusers."""
    g = torch.Generator().manual_seed(0)
    w = c2c.random_weights(2 * layers, 2, 4, 2, 4, hidden_dim=16, intermediate_dim=12)
    receiver = [tuple(torch.randn(3, 4, 2, 4, generator=g) for _ in range(2)) for _ in range(layers)]
    sharer = [tuple(torch.randn(3, 4, 2, 4, generator=g) for _ in range(2)) for _ in range(layers)]
    rs = torch.tensor([0, 5, 7, 2])
    return w, receiver, sharer, rs, rs.clone()


def fuse(w, receiver, sharer, rs, ss, fusers=None, **kw):
    receivers = [v for kv in receiver for v in kv]
    sharers = [v for kv in sharer for v in kv]
    ops.call_fuse(receivers, sharers, rs, ss, w, list(range(len(receivers))) if fusers is None else fusers, **kw)


def test_views_checked_once_then_only_the_slots(recorder, full_checks):
    w, receiver, sharer, rs, ss = small()
    fuse(w, receiver, sharer, rs, ss)
    fuse(w, receiver, sharer, rs, ss)
    # New view objects over the same memory, new lists and new slots: the same description.
    fuse(w, [tuple(v[:] for v in kv) for kv in receiver], [tuple(v[:] for v in kv) for kv in sharer],
         rs.clone(), torch.tensor([1, 1, 1, 1]))
    assert full_checks.n == 1
    assert recorder.calls == ["fuse"] * 3


def _set_onto_other_receiver(w, receiver, sharer):
    receiver[0][1].set_(receiver[0][0])  # the values view now shares the keys' memory


def _set_onto_float16(w, receiver, sharer):
    receiver[1][0].data = receiver[1][0].data.half()


def _shrink_storage(w, receiver, sharer):
    receiver[1][1].untyped_storage().resize_(64)


def _expand_in_place(w, receiver, sharer):
    v = receiver[0][0]
    v.as_strided_(v.shape, (0, *v.stride()[1:]))  # every page the same memory


def _resize_in_place(w, receiver, sharer):
    sharer[1][0].resize_(3, 4, 1, 8)


def _replace_weight_storage(w, receiver, sharer):
    w.w_out.set_(torch.zeros(w.w_out.shape[0], 4, w.w_out.shape[2]))


def _weight_dtype(w, receiver, sharer):
    w.b_in.data = w.b_in.data.double()


@pytest.mark.parametrize("mutate,error", [
    (_set_onto_other_receiver, r"receiver_caches\[1\] shares memory with receiver_caches\[0\]"),
    (_set_onto_float16, r"receiver_caches\[2\]: dtype torch.float16, expected torch.float32"),
    (_shrink_storage, r"receiver_caches\[3\]: .* reaches past the end of its storage \(64 bytes\)"),
    (_expand_in_place, r"receiver_caches\[0\]: .* share memory \(an expanded"),
    (_resize_in_place, r"sharer_caches\[2\]: shape \[3, 4, 1, 8\] differs from sharer_caches\[0\]"),
    (_replace_weight_storage, r"weights.w_out: expected shape \[4, 8, 16\], got \[4, 4, 16\]"),
    (_weight_dtype, r"weights.b_in: dtype torch.float64, expected torch.float32"),
], ids=lambda p: p.__name__.strip("_") if callable(p) else "")
def test_mutated_views_and_weights_are_checked_again(recorder, full_checks, mutate, error):
    """Each mutation keeps every Python object and changes what the checks read: the next call
    must run the checks again and refuse it (an identity-keyed cache would let it through)."""
    w, receiver, sharer, rs, ss = small()
    fuse(w, receiver, sharer, rs, ss)
    fuse(w, receiver, sharer, rs, ss)
    assert full_checks.n == 1
    mutate(w, receiver, sharer)
    with pytest.raises(ValueError, match=error):
        fuse(w, receiver, sharer, rs, ss)
    assert full_checks.n == 2
    assert recorder.calls == ["fuse"] * 2


def test_grown_storage_is_checked_again(recorder, full_checks):
    """A storage resized larger moves its memory: checked again, and still accepted."""
    w, receiver, sharer, rs, ss = small()
    fuse(w, receiver, sharer, rs, ss)
    storage = receiver[0][0].untyped_storage()
    before = receiver[0][0].data_ptr()
    storage.resize_(storage.nbytes() * 64)
    assert receiver[0][0].data_ptr() != before
    fuse(w, receiver, sharer, rs, ss)
    fuse(w, receiver, sharer, rs, ss)
    assert full_checks.n == 2
    assert recorder.calls == ["fuse"] * 3


def test_sharer_repointed_at_receiver_memory_changes_the_plan(recorder):
    """Whether a sharer view overlaps a receiver view is cached too: re-pointing one with set_()
    must switch the call to project-then-merge (every entry reads the clean rows)."""
    w, receiver, sharer, rs, ss = small()
    fuse(w, receiver, sharer, rs, ss)
    sharer[1][1].set_(receiver[0][0])
    fuse(w, receiver, sharer, rs, ss)
    sharer[1][1].set_(torch.zeros(3, 4, 2, 4))
    fuse(w, receiver, sharer, rs, ss)
    assert recorder.calls == ["fuse", "project", "merge", "fuse"]


def test_fusers_are_part_of_the_description(recorder, full_checks):
    w, receiver, sharer, rs, ss = small()
    fuse(w, receiver, sharer, rs, ss, fusers=[0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"fusers\[3\] = 4 is out of range"):
        fuse(w, receiver, sharer, rs, ss, fusers=[0, 1, 2, 4])
    fuse(w, receiver, sharer, rs, ss, fusers=[3, 2, 1, 0])
    assert full_checks.n == 3


def test_slots_are_checked_on_every_call(recorder, full_checks):
    w, receiver, sharer, rs, ss = small()
    fuse(w, receiver, sharer, rs, ss)
    with pytest.raises(ValueError, match=r"receiver_slots: dtype torch.int16, expected int32 or int64"):
        fuse(w, receiver, sharer, rs.to(torch.int16), ss)
    with pytest.raises(ValueError, match=r"sharer_slots: 3 slots, expected one per receiver slot \(4\)"):
        fuse(w, receiver, sharer, rs, ss[:3])
    with pytest.raises(ValueError, match=r"sharer_slots: expected a 1-D tensor of slots"):
        fuse(w, receiver, sharer, rs, ss.view(2, 2))
    assert full_checks.n == 1
    assert recorder.calls == ["fuse"]


def test_merge_receivers_are_cached_and_rechecked(recorder):
    w, receiver, sharer, rs, ss = small(layers=1)
    caches = list(receiver[0])
    proj, scale = torch.zeros(4, 8), torch.zeros(4, 2)
    ops.call_merge(caches, rs, [proj, proj], [scale, scale])
    ops.call_merge(caches, rs, [proj, proj], [scale, scale])
    with pytest.raises(ValueError, match=r"projections\[1\]: expected \[4, 8\]"):
        ops.call_merge(caches, rs, [proj, proj[:2]], [scale, scale])
    caches[1].set_(caches[0])
    with pytest.raises(ValueError, match=r"receiver_caches\[1\] shares memory with receiver_caches\[0\]"):
        ops.call_merge(caches, rs, [proj, proj], [scale, scale])
    assert recorder.calls == ["merge", "merge"]


def test_cache_holds_no_tensors(recorder):
    w, receiver, sharer, rs, ss = small()
    fuse(w, receiver, sharer, rs, ss)
    refs = [weakref.ref(w.w_in_sharer), weakref.ref(receiver[0][0]), weakref.ref(sharer[1][1])]
    del w, receiver, sharer
    assert [r() for r in refs] == [None] * 3


@pytest.fixture
def dispatched(monkeypatch):
    """How many calls went through the registered op (torch.ops.c2c.fuse)."""
    class Spy:
        def __init__(self, op):
            self.op, self.default, self.n = op, op.default, 0

        def __call__(self, *args):
            self.n += 1
            return self.op(*args)
    spy = Spy(torch.ops.c2c.fuse)
    monkeypatch.setattr(torch.ops.c2c, "fuse", spy)
    return spy


class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_dispatcher_skipped_only_in_plain_eager(recorder, dispatched):
    w, receiver, sharer, rs, ss = small()

    def through_dispatcher(**kw):
        before = dispatched.n
        fuse(w, receiver, sharer, kw.pop("rs", rs), ss, **kw)
        return dispatched.n > before

    assert not through_dispatcher()
    with torch.inference_mode():
        assert not through_dispatcher()
    assert through_dispatcher(check_slots=True)  # the debug check syncs: no shortcut
    mode = Ops()
    with mode:
        assert through_dispatcher()
    assert "c2c.fuse.default" in mode.seen
    with torch.profiler.profile() as prof:
        assert through_dispatcher()
    assert any(e.name == "c2c::fuse" for e in prof.events())
    w.w_out.requires_grad_(True)  # autograd is the dispatcher's business
    assert through_dispatcher()
    w.w_out.requires_grad_(False)

    class Sub(torch.Tensor):
        pass
    assert through_dispatcher(rs=rs.as_subclass(Sub))  # a subclass may define __torch_function__
    assert not through_dispatcher()
    assert recorder.calls == ["fuse"] * 8


def test_meta_calls_check_without_a_backend(recorder):
    w, receiver, sharer, rs, ss = small()
    meta = lambda kv: [tuple(v.to("meta") for v in pair) for pair in kv]  # noqa: E731
    wm, rm, sm = w.to(device="meta"), meta(receiver), meta(sharer)
    fuse(wm, rm, sm, rs.to("meta"), ss.to("meta"))
    with pytest.raises(ValueError, match=r"sharer_slots: on cpu, expected meta"):
        fuse(wm, rm, sm, rs.to("meta"), ss)
    rm[1] = (rm[1][0], rm[1][1].half())
    with pytest.raises(ValueError, match=r"receiver_caches\[3\]: dtype torch.float16"):
        fuse(wm, rm, sm, rs.to("meta"), ss.to("meta"))
    assert recorder.calls == []


def test_without_the_native_helpers_every_call_is_checked(recorder, full_checks, dispatched, monkeypatch):
    monkeypatch.setattr(ops, "_fingerprint", None)
    w, receiver, sharer, rs, ss = small()
    fuse(w, receiver, sharer, rs, ss)
    fuse(w, receiver, sharer, rs, ss)
    assert full_checks.n == 2 and dispatched.n == 2


def test_fingerprint_describes_not_identifies():
    x = torch.randn(3, 4, 2, 4)
    key = ops._fingerprint(([x[0:2], x[1:3]],), [0, 1], ())
    assert key == ops._fingerprint(((x[0:2], x[1:3]),), (0, 1), ())  # other objects, same description
    assert key != ops._fingerprint(([x[0:2], x[1:3]],), [0, 2], ())
    assert key != ops._fingerprint(([x[0:2], x[0:2]],), [0, 1], ())
    assert key != ops._fingerprint(([x[0:2]], [x[1:3]]), [0, 1], ())  # the list structure counts
    for not_plain in (torch.randn(2, requires_grad=True), torch.randn(2).to_sparse(),
                      torch.randn(2).as_subclass(type("Sub", (torch.Tensor,), {})), 3):
        assert ops._fingerprint(([not_plain],), [], ()) is None
        assert ops._fingerprint(([],), [], (not_plain,)) is None
    assert ops._fingerprint(([],), [True], ()) is None  # bool is not an index


def _calls_during(fn):
    count = [0]

    def profile(frame, event, arg):
        if event in ("call", "c_call"):
            count[0] += 1
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count[0]


def test_cached_call_does_no_python_work_per_fuser(recorder):
    """The host cost target (<= 40 us over 48 fusers, benchmarks/bench_host_cost.py) rests on a
    cached call doing a fixed number of Python calls: the per-view work is one native call."""
    counts = []
    for layers in (2, 24):
        w, receiver, sharer, rs, ss = small(layers)
        ckpt = make_checkpoint(w, {layer: layer for layer in range(layers)}, sharer_heads=2)
        c2c.fuse_all(ckpt, receiver, sharer, rs, ss)
        counts.append(_calls_during(lambda: c2c.fuse_all(ckpt, receiver, sharer, rs, ss)))
    assert counts[0] == counts[1], counts
    assert recorder.calls == ["fuse"] * 4
