"""Every argument check of the op layer: bad input gets an error naming the argument."""
import pytest
import torch

import c2c_kernels as c2c
from c2c_kernels.testing import make_case


@pytest.fixture
def case():
    return make_case(seed=21)


def call(case, **over):
    args = dict(zip(("receiver_caches", "sharer_caches", "receiver_slots", "sharer_slots", "weights", "fusers"),
                    case.args()))
    args.update(over)
    backend = args.pop("backend", "reference")
    check = args.pop("check_slots", False)
    torch.ops.c2c.fuse(*args.values(), backend, check)


def test_wrong_cache_dtype(case):
    bad = [t.to(torch.float16) for t in case.receiver_caches]
    with pytest.raises(ValueError, match=r"receiver_caches\[0\]: dtype torch.float16, expected torch.float32"):
        call(case, receiver_caches=bad)


def test_wrong_head_count(case):
    wrong = [t[:, :, :2] for t in case.receiver_caches]
    with pytest.raises(ValueError, match=r"receiver_caches\[0\]: 2 heads x 8 dims, the fuser expects 4 heads x 8"):
        call(case, receiver_caches=wrong)


def test_wrong_sharer_width(case):
    wrong = [t[..., :8] for t in case.sharer_caches]
    with pytest.raises(ValueError, match=r"sharer_caches\[0\]: 2 heads x 8 dims, the fuser expects heads x dim = 32"):
        call(case, sharer_caches=wrong)


def test_not_4d(case):
    with pytest.raises(ValueError, match=r"sharer_caches\[1\]: expected a 4-D \[page, entry, head, dim\] view"):
        call(case, sharer_caches=[case.sharer_caches[0], case.sharer_caches[1][0]] + case.sharer_caches[2:])


def test_non_unit_last_stride(case):
    big = torch.zeros(*case.receiver_caches[0].shape[:3], 16)
    with pytest.raises(ValueError, match=r"receiver_caches\[0\]: the head_dim stride is 2, expected 1"):
        call(case, receiver_caches=[big[..., ::2]] + case.receiver_caches[1:])


def test_geometry_mismatch(case):
    other = torch.zeros(case.receiver_caches[0].shape[0] + 1, *case.receiver_caches[0].shape[1:])
    with pytest.raises(ValueError, match=r"receiver_caches\[1\]: shape .* differs from receiver_caches\[0\]"):
        call(case, receiver_caches=[case.receiver_caches[0], other] + case.receiver_caches[2:])


def test_list_lengths(case):
    with pytest.raises(ValueError, match="one entry per fused cache: got 4, 3 and 4"):
        call(case, sharer_caches=case.sharer_caches[:3])


def test_fuser_out_of_range(case):
    with pytest.raises(ValueError, match=r"fusers\[2\] = 9 is out of range: the weights stack 4 fusers"):
        call(case, fusers=[0, 1, 9, 3])


def test_slot_dtype_and_shape(case):
    with pytest.raises(ValueError, match="receiver_slots: dtype torch.float32, expected int32 or int64"):
        call(case, receiver_slots=case.receiver_slots.float())
    with pytest.raises(ValueError, match="sharer_slots: expected a 1-D tensor of slots"):
        call(case, sharer_slots=case.sharer_slots.view(1, -1))
    with pytest.raises(ValueError, match=r"sharer_slots: 9 slots, expected one per receiver slot \(10\)"):
        call(case, sharer_slots=case.sharer_slots[:-1])


def test_device_mismatch(case):
    with pytest.raises(ValueError, match="receiver_slots: on meta, expected cpu"):
        call(case, receiver_slots=case.receiver_slots.to("meta"))


def test_weights_checked(case):
    w = list(case.weights)
    w[11] = w[11][:, :-1]
    with pytest.raises(ValueError, match=r"weights.w_out: expected shape \[4, 32, 64\], got \[4, 31, 64\]"):
        call(case, weights=w)
    w = list(case.weights)
    w[13] = w[13].half()
    with pytest.raises(ValueError, match="weights.gate_logit: dtype torch.float16, expected torch.float32"):
        call(case, weights=w)
    with pytest.raises(ValueError, match="weights: expected the 14 stacked tensors"):
        call(case, weights=list(case.weights)[:5])


def test_same_view_twice(case):
    with pytest.raises(ValueError, match=r"receiver_caches\[1\] shares memory with receiver_caches\[0\]"):
        call(case, receiver_caches=[case.receiver_caches[0]] * 2 + case.receiver_caches[2:])


def test_slot_ranges_only_when_asked(case):
    rs = case.receiver_slots.clone()
    rs[torch.nonzero(rs >= 0)[0]] = 10**5
    with pytest.raises(ValueError, match=r"receiver_slots\[\d+\] = 100000 is out of range \[0, \d+\) for the receiver pool"):
        call(case, receiver_slots=rs, check_slots=True)
    dup = case.receiver_slots.clone()
    valid = torch.nonzero(dup >= 0).flatten()
    dup[valid[1]] = dup[valid[0]]
    with pytest.raises(ValueError, match="receiver_slots: a slot appears more than once"):
        call(case, receiver_slots=dup, check_slots=True)
    ss = case.sharer_slots.clone()
    ss[valid[0]] = -3
    with pytest.raises(ValueError, match=r"sharer_slots\[\d+\] = -3 for a non-padding token is out of range \[0, \d+\)"):
        call(case, sharer_slots=ss, check_slots=True)


def test_padding_sharer_slots_are_not_range_checked(case):
    call(case, check_slots=True)  # with_padding puts 10**6 at padding tokens' sharer slots


def test_unknown_and_unavailable_backend(case):
    with pytest.raises(ValueError, match="backend: expected one of"):
        call(case, backend="tpu")
    if not torch.cuda.is_available():
        with pytest.raises((RuntimeError, ValueError), match="backend 'cuda'"):
            call(case, backend="cuda")


def test_kv_pairing(case):
    ckpt = c2c.make_checkpoint(case.weights, {0: 0, 1: 1}, sharer_heads=2)
    rk, rv = case.receiver.kv[0]
    sk, sv = case.sharer.kv[0]
    with pytest.raises(ValueError, match="receiver: keys view .* and values view .* differ"):
        c2c.fuse(rk, rv[:1], sk, sv, case.receiver_slots, case.sharer_slots, ckpt.layers[0].params)


def test_fuse_all_layer_count(case):
    ckpt = c2c.make_checkpoint(case.weights, {0: 0, 1: 1}, sharer_heads=2)
    with pytest.raises(ValueError, match="receiver_kv: the checkpoint fuses receiver layer 1, but only 1 layers were given"):
        c2c.fuse_all(ckpt, case.receiver.kv[:1], case.sharer.kv, case.receiver_slots, case.sharer_slots)


def test_merge_errors(case):
    proj = torch.zeros(case.receiver_slots.numel(), 32)
    scale = torch.zeros(case.receiver_slots.numel(), 4)
    rc = case.receiver_caches[:1]
    with pytest.raises(ValueError, match=r"projections\[0\]: expected \[10, 32\]"):
        c2c.merge(rc, case.receiver_slots, [proj[:, :5]], [scale])
    with pytest.raises(ValueError, match="expected float32"):
        c2c.merge(rc, case.receiver_slots, [proj.half()], [scale])
    with pytest.raises(ValueError, match="expected S \\* 2 entries"):
        c2c.merge(case.receiver_caches[:2], case.receiver_slots, [proj] * 3, [scale] * 3)


def test_errors_leave_caches_untouched(case):
    before = [t.clone() for t in case.receiver.storage]
    with pytest.raises(ValueError):
        call(case, fusers=[0, 1, 2, 99])
    for got, was in zip(case.receiver.storage, before):
        assert torch.equal(got, was)


def test_view_past_the_end_of_a_shrunk_storage(case):
    """torch does not re-check a view when its storage is resized smaller: the kernels would read
    and write past the end of the allocation. Refused, for receivers and sharers, fuse and merge."""
    rk = case.receiver_caches
    rk[1].untyped_storage().resize_(rk[1].untyped_storage().nbytes() // 2)
    with pytest.raises(ValueError, match=r"receiver_caches\[1\]: the view .* reaches past the end of its storage"):
        call(case)
    proj = torch.zeros(case.receiver_slots.numel(), 32)
    scale = torch.zeros(case.receiver_slots.numel(), 4)
    with pytest.raises(ValueError, match=r"receiver_caches\[1\]: the view .* reaches past the end of its storage"):
        c2c.merge(rk[:2], case.receiver_slots, [proj, proj], [scale, scale])
    fresh = make_case(seed=22)
    fresh.sharer_caches[3].untyped_storage().resize_(0)  # layer 1: K and V share one pool
    with pytest.raises(ValueError, match=r"sharer_caches\[2\]: the view .* reaches past the end of its storage \(0 bytes\)"):
        call(fresh)
