"""The op layer as other projects use it: opcheck, torch.compile, per-layer and all-layer entry
points, several sharers, closed gates."""
import dataclasses

import pytest
import torch

import c2c_kernels as c2c
from c2c_kernels import backends, compat, reference
from c2c_kernels.testing import TOLERANCES, backend_params, make_cache, make_case

CPU_BACKENDS = [p for p in backend_params(include_reference=True) if p.values[1] == "cpu"]


def checkpoint_for(case):
    return c2c.make_checkpoint(case.weights, {0: 0, 1: 1}, sharer_heads=case.sharer.kv[0][0].shape[2])


@pytest.mark.parametrize("backend,device", CPU_BACKENDS)
def test_opcheck(backend, device):
    case = make_case(seed=31, seq_lens=(3, 2), padding=1)
    torch.library.opcheck(torch.ops.c2c.fuse.default, (*case.args(), backend, False))
    torch.library.opcheck(torch.ops.c2c.project.default, (*case.args(), backend, False))
    projection, head_scale = torch.ops.c2c.project(*case.args(), backend, False)
    torch.library.opcheck(torch.ops.c2c.merge.default,
                          (case.receiver_caches, case.receiver_slots, list(projection.unbind(0)),
                           list(head_scale.unbind(0)), backend, False))


@pytest.mark.parametrize("backend,device", CPU_BACKENDS)
def test_compile_fullgraph(backend, device):
    case = make_case(seed=32)
    expected = case.clone_receiver()
    reference.fuse(expected.receiver_caches, expected.sharer_caches, expected.receiver_slots,
                   expected.sharer_slots, expected.weights, expected.fusers)
    ckpt = checkpoint_for(case)

    # On torch whose inductor miscompiles in-place list ops (c2c_kernels/compat.py) the ops refuse
    # inductor; aot_eager still checks that fuse_all traces whole and computes the same caches.
    compiler = "aot_eager" if compat.inductor_list_mutation_broken() else "inductor"

    @torch.compile(fullgraph=True, backend=compiler)
    def step(receiver_kv, sharer_kv, receiver_slots, sharer_slots):
        c2c.fuse_all(ckpt, receiver_kv, sharer_kv, receiver_slots, sharer_slots, backend=backend)

    step(case.receiver.kv, case.sharer.kv, case.receiver_slots, case.sharer_slots)
    for got, want in zip(case.receiver.storage, expected.receiver.storage):
        torch.testing.assert_close(got, want, atol=TOLERANCES[torch.float32], rtol=TOLERANCES[torch.float32])


def test_per_layer_fuse_equals_fuse_all():
    case = make_case(seed=33, layout="hf", sharer_layout="sglang")
    other = case.clone_receiver()
    ckpt = checkpoint_for(case)
    c2c.fuse_all(ckpt, case.receiver.kv, case.sharer.kv, case.receiver_slots, case.sharer_slots)
    for layer in ckpt.layers:
        rk, rv = other.receiver.kv[layer.receiver_layer]
        sk, sv = other.sharer.kv[layer.sharer_layer]
        c2c.fuse(rk, rv, sk, sv, other.receiver_slots, other.sharer_slots, layer.params)
    for got, want in zip(other.receiver.storage, case.receiver.storage):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_closed_gates_do_no_work(monkeypatch):
    case = make_case(seed=34, gates_open=[False, True, False, False])
    ckpt = checkpoint_for(case)
    seen = []
    module = backends.resolve("auto", torch.device("cpu"))
    real = module.fuse
    monkeypatch.setattr(module, "fuse", lambda rc, sc, rs, ss, w, fusers: (seen.append(list(fusers)), real(rc, sc, rs, ss, w, fusers)))
    before = [t.clone() for t in case.receiver.storage]
    c2c.fuse_all(ckpt, case.receiver.kv, case.sharer.kv, case.receiver_slots, case.sharer_slots)
    assert seen == [[1]]
    layer0 = ckpt.layers[0]
    assert not layer0.params.key_open and layer0.params.value_open
    # A layer with both gates closed is not even dispatched.
    c2c.fuse(*case.receiver.kv[1], *case.sharer.kv[1], case.receiver_slots, case.sharer_slots, ckpt.layers[1].params)
    assert seen == [[1]]
    # Only layer 0's values changed.
    assert torch.equal(case.receiver.storage[1], before[1])
    assert torch.equal(case.receiver.storage[0][0], before[0][0])
    assert not torch.equal(case.receiver.storage[0][1], before[0][1])


def test_closed_gate_given_to_a_backend_is_a_no_op():
    """Backends apply the gate on the device too, so a direct op call with a closed fuser is exact."""
    case = make_case(seed=35, gates_open=[False, False, True, True])
    before = [t.clone() for t in case.receiver.storage]
    torch.ops.c2c.fuse(*case.args(), "auto", False)
    assert torch.equal(case.receiver.storage[0], before[0])


def _two_sharers(seed):
    case = make_case(seed=seed, seq_lens=(4, 3))
    second = make_cache("flashinfer_nhd", 3, 4, 4, [2, 5], page_size=2, seed=seed + 5)
    from c2c_kernels.testing import alignment_slots
    slots2 = alignment_slots(case.receiver, second, seed=seed)
    rs = case.receiver_slots
    ss2 = torch.zeros_like(rs)
    ss2[rs >= 0] = slots2
    w2 = c2c.random_weights(2, 4, 4, 4, 8, hidden_dim=32, intermediate_dim=16, seed=seed + 6)
    ckpt1 = checkpoint_for(case)
    ckpt2 = c2c.make_checkpoint(w2, {1: 2}, sharer_heads=4)  # only receiver layer 1 from sharer layer 2
    return case, second, ss2, ckpt1, ckpt2


def test_several_sharers_parallel():
    case, second, ss2, ckpt1, ckpt2 = _two_sharers(36)
    expected = case.clone_receiver()
    p1, a1 = reference.project(expected.receiver_caches, expected.sharer_caches, expected.receiver_slots,
                               expected.sharer_slots, ckpt1.weights, [0, 1, 2, 3])
    p2, a2 = reference.project(expected.receiver_caches[2:], [second.kv[2][0], second.kv[2][1]],
                               expected.receiver_slots, ss2, ckpt2.weights, [0, 1])
    projections = [p1[0], p1[1], p1[2], p2[0], p1[3], p2[1]]
    scales = [a1[0], a1[1], a1[2], a2[0], a1[3], a2[1]]
    # Layer 0 gets one correction each; layer 1's K and V get two, summed from the clean rows.
    reference.merge(expected.receiver_caches[:2], expected.receiver_slots, projections[:2], scales[:2])
    reference.merge(expected.receiver_caches[2:], expected.receiver_slots, projections[2:], scales[2:])
    c2c.fuse_all([ckpt1, ckpt2], case.receiver.kv, [case.sharer.kv, second.kv], case.receiver_slots,
                 [case.sharer_slots, ss2], mode="parallel")
    for got, want in zip(case.receiver.storage, expected.receiver.storage):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_several_sharers_sequential():
    case, second, ss2, ckpt1, ckpt2 = _two_sharers(37)
    expected = case.clone_receiver()
    reference.fuse(expected.receiver_caches, expected.sharer_caches, expected.receiver_slots,
                   expected.sharer_slots, ckpt1.weights, [0, 1, 2, 3])
    reference.fuse(expected.receiver_caches[2:], [second.kv[2][0], second.kv[2][1]], expected.receiver_slots,
                   ss2, ckpt2.weights, [0, 1])
    c2c.fuse_all([ckpt1, ckpt2], case.receiver.kv, [case.sharer.kv, second.kv], case.receiver_slots,
                 [case.sharer_slots, ss2], mode="sequential")
    for got, want in zip(case.receiver.storage, expected.receiver.storage):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="mode: expected 'parallel' or 'sequential'"):
        c2c.fuse_all([ckpt1, ckpt2], case.receiver.kv, [case.sharer.kv, second.kv], case.receiver_slots,
                     [case.sharer_slots, ss2], mode="both")


def test_empty_calls_are_no_ops():
    case = make_case(seed=38)
    empty = torch.zeros(0, dtype=torch.long)
    torch.ops.c2c.fuse(case.receiver_caches, case.sharer_caches, empty, empty, list(case.weights), case.fusers,
                       "auto", False)
    torch.ops.c2c.fuse([], [], case.receiver_slots, case.sharer_slots, list(case.weights), [], "auto", False)


def test_auto_picks_a_native_backend_when_built():
    name = backends.resolve("auto", torch.device("cpu")).__name__.rsplit(".", 1)[-1]
    assert name == ("cpu" if "cpu" in backends.available("cpu") else "reference")


def _fused(case, fn):
    """``fn`` run on a fresh copy of ``case``'s receiver: the copy, fused."""
    copy = case.clone_receiver()
    fn(copy)
    return copy


def _assert_same_storage(got, want, tol=1e-5):
    for g, w in zip(got.receiver.storage, want.receiver.storage):
        torch.testing.assert_close(g, w, atol=tol, rtol=tol)


def _run(ckpt, **kw):
    return lambda c: c2c.fuse_all(ckpt, c.receiver.kv, c.sharer.kv, c.receiver_slots, c.sharer_slots, **kw)


def test_two_pairs_for_one_receiver_layer():
    """Receiver layer 0 mapped to (sharer 0, projector 0) then (sharer 1, projector 1): by default
    only the first pair is fused, as in the research pipeline (this used to raise "is the same
    view"); pairs="all" fuses both in order, as a per-layer loop over ckpt.layers does."""
    case = make_case(seed=41, seq_lens=(4, 3))
    ckpt = dataclasses.replace(checkpoint_for(case), mapping={0: {1: {0: [(0, 0), (1, 1)], 1: [(1, 1)]}}})
    first = _fused(case, _run(ckpt))
    want = case.clone_receiver()  # layer 0 from projector 0, layer 1 from projector 1
    reference.fuse(want.receiver_caches, want.sharer_caches, want.receiver_slots, want.sharer_slots,
                   want.weights, want.fusers)
    _assert_same_storage(first, want, TOLERANCES[torch.float32])

    every = ckpt.replace(pairs="all")
    loop = case.clone_receiver()
    for layer in every.layers:
        c2c.fuse(*loop.receiver.kv[layer.receiver_layer], *loop.sharer.kv[layer.sharer_layer],
                 loop.receiver_slots, loop.sharer_slots, layer.params, backend="reference")
    _assert_same_storage(_fused(case, _run(every, backend="reference")), loop)
    assert not torch.equal(loop.receiver.storage[0], first.receiver.storage[0])

    # Parallel mode: every pair's correction from the clean rows, summed.
    par = _fused(case, lambda c: c2c.fuse_all([every], c.receiver.kv, [c.sharer.kv], c.receiver_slots,
                                              [c.sharer_slots], mode="parallel", backend="reference"))
    want = case.clone_receiver()
    rc, sc = want.receiver_caches, want.sharer_caches
    p, a = reference.project(rc + rc[:2], sc[:2] + sc[2:] + sc[2:], want.receiver_slots, want.sharer_slots,
                             want.weights, [0, 1, 2, 3, 2, 3])
    reference.merge(rc[:2], want.receiver_slots, [p[0], p[4], p[1], p[5]], [a[0], a[4], a[1], a[5]])
    reference.merge(rc[2:], want.receiver_slots, [p[2], p[3]], [a[2], a[3]])
    _assert_same_storage(par, want)


def test_mapping_edits_are_never_stale():
    """fuse_all's plan is derived from the layer map: editing the map in place raises (it would
    have been ignored), and an edited copy is fused as edited, after the original was used."""
    case = make_case(seed=42)
    ckpt = checkpoint_for(case)
    _fused(case, _run(ckpt))  # plans the original
    with pytest.raises(TypeError, match=r"read-only; build an edited checkpoint with ckpt\.replace"):
        ckpt.mapping[0][1] = {1: [(1, 1)]}
    only_layer_1 = ckpt.replace(mapping={0: {1: {1: [(1, 1)]}}})
    got = _fused(case, _run(only_layer_1))
    want = case.clone_receiver()
    reference.fuse(want.receiver_caches[2:], want.sharer_caches[2:], want.receiver_slots, want.sharer_slots,
                   want.weights, [2, 3])
    _assert_same_storage(got, want, TOLERANCES[torch.float32])
    assert torch.equal(got.receiver.storage[0], case.receiver.storage[0])


def test_gate_reopened_in_place_is_fused():
    """A closed gate re-opened by writing ckpt.weights.gate_logit is fused by the next call
    (the plan was built while it was closed); one closed in place is skipped again."""
    case = make_case(seed=43, gates_open=[False, True, True, True])
    ckpt = checkpoint_for(case)
    before = _fused(case, _run(ckpt))
    assert torch.equal(before.receiver.storage[0][0], case.receiver.storage[0][0])  # keys: closed
    with torch.no_grad():
        ckpt.weights.gate_logit[0] = 0.9
        ckpt.weights.gate_logit[3] = -0.9
    got = _fused(case, _run(ckpt))
    want = case.clone_receiver()
    reference.fuse(want.receiver_caches, want.sharer_caches, want.receiver_slots, want.sharer_slots,
                   ckpt.weights, [0, 1, 2, 3])
    _assert_same_storage(got, want, TOLERANCES[torch.float32])
    assert not torch.equal(got.receiver.storage[0][0], case.receiver.storage[0][0])
    assert ckpt.fusion_plan() == (((0, 0, 0, 0), (0, 1, 0, 1), (1, 0, 1, 2)),)


def test_plan_traces_without_graph_breaks():
    """fuse_all (several rounds, several checkpoints) under dynamo with fullgraph=True: the plan
    is a constant of the checkpoint, nothing is cached at call time."""
    case = make_case(seed=44, seq_lens=(3, 2))
    ckpt = dataclasses.replace(checkpoint_for(case), mapping={0: {1: {0: [(0, 0), (1, 1)], 1: [(1, 1)]}}},
                               pairs="all")
    want = _fused(case, _run(ckpt, backend="reference"))

    @torch.compile(fullgraph=True, backend="eager")
    def step(receiver_kv, sharer_kv, receiver_slots, sharer_slots):
        c2c.fuse_all(ckpt, receiver_kv, sharer_kv, receiver_slots, sharer_slots, backend="reference")
        c2c.fuse_all([ckpt, ckpt], receiver_kv, [sharer_kv, sharer_kv], receiver_slots,
                     [sharer_slots, sharer_slots], backend="reference")

    got = case.clone_receiver()
    attributes = {k: id(v) for k, v in vars(ckpt).items()}
    step(got.receiver.kv, got.sharer.kv, got.receiver_slots, got.sharer_slots)
    assert {k: id(v) for k, v in vars(ckpt).items()} == attributes  # no call-time cache on the checkpoint
    c2c.fuse_all([ckpt, ckpt], want.receiver.kv, [want.sharer.kv, want.sharer.kv], want.receiver_slots,
                 [want.sharer_slots, want.sharer_slots], backend="reference")
    _assert_same_storage(got, want)
