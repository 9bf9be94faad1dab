"""Every backend against the reference over layouts, dtypes and shapes; in-place sentinels."""
import pytest
import torch

from c2c_kernels import reference
from c2c_kernels.testing import (LAYOUTS, TOLERANCES, assert_storage_close, backend_params, make_case,
                                 reference_fused)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = backend_params(include_reference=True)


def run_and_compare(backend, case, dtype):
    """Run ``backend`` and the reference on copies of one case; compare every byte of storage."""
    expected = reference_fused(case)
    sharer_before = [t.clone() for t in case.sharer.storage]
    torch.ops.c2c.fuse(*case.args(), backend, False)
    assert_storage_close(case, expected, dtype)
    for got, want in zip(case.sharer.storage, sharer_before):
        assert torch.equal(got, want), "the sharer cache was written"


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layouts_and_dtypes(backend, device, layout, dtype):
    case = make_case(layout=layout, sharer_layout="flashinfer_hnd" if layout == "hf" else "hf",
                     dtype=dtype, device=device, seed=3)
    run_and_compare(backend, case, dtype)


SHAPES = {
    # GQA both ways, odd head dims and counts, page size 1 and 16, ragged requests.
    "gqa": dict(receiver_heads=8, receiver_dim=8, sharer_heads=2, sharer_dim=8),
    "odd": dict(receiver_heads=3, receiver_dim=6, sharer_heads=5, sharer_dim=3, hidden=40, intermediate=24,
                seq_lens=(7, 1, 4), page_size=3, sharer_page_size=5),
    "page1": dict(page_size=1, sharer_page_size=1, seq_lens=(4, 4)),
    "page16": dict(page_size=16, sharer_page_size=16, seq_lens=(17, 2, 33)),
    "deep": dict(num_layers=5, layers=1),
    "one_token": dict(seq_lens=(1,), padding=0),
    "all_padding_but_one": dict(seq_lens=(1,), padding=6),
    "tokenizer_alignment": dict(seq_lens=(6, 2), sharer_seq_lens=(3, 9), align=True),
    "identity_alignment": dict(align=False),
    "int32_slots": dict(slot_dtypes=(torch.int32, torch.int32)),
    "mixed_slots": dict(slot_dtypes=(torch.int32, torch.int64)),
    "closed_gates": dict(gates_open=[True, False, False, True]),
}


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_shapes(backend, device, shape):
    case = make_case(device=device, seed=5, **SHAPES[shape])
    run_and_compare(backend, case, torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sentinel_touches_only_given_slots(backend, device, dtype):
    """Rows at the given receiver slots change; every other byte of both pools stays put."""
    case = make_case(layout="flashinfer_interleaved", dtype=dtype, device=device, seed=9, padding=3)
    before = [t.clone() for t in case.receiver.storage]
    sharer_before = [t.clone() for t in case.sharer.storage]
    torch.ops.c2c.fuse(*case.args(), backend, False)
    touched = torch.zeros_like(before[0], dtype=torch.bool)  # [pages, 2, page_size, H, D]
    valid = case.receiver_slots[case.receiver_slots >= 0].long()
    ps = before[0].shape[2]
    touched[valid // ps, :, valid % ps] = True
    for got, was in zip(case.receiver.storage, before):
        assert torch.equal(got[~touched], was[~touched]), "an element outside the receiver slots changed"
        assert not torch.equal(got[touched], was[touched]), "the receiver rows did not change"
    for got, was in zip(case.sharer.storage, sharer_before):
        assert torch.equal(got, was)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_strided_views(backend, device):
    """Views cut out of bigger tensors (a head slice and every other page) work in place."""
    case = make_case(layout="vllm_nhd", device=device, seed=13, receiver_heads=4, page_size=4)
    big = torch.randn(2, 2 * case.receiver_caches[0].shape[0], 4, 6, 8, device=device)
    views = [big[i, ::2, :, 1:5] for i in range(2)]
    case.receiver_caches = views + case.receiver_caches[2:]
    case.receiver.storage = [big] + case.receiver.storage[1:]
    before = big.clone()
    run_and_compare(backend, case, torch.float32)
    untouched = torch.ones_like(big, dtype=torch.bool)
    untouched[:, ::2, :, 1:5] = False
    assert torch.equal(big[untouched], before[untouched])


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_project_matches_reference(backend, device, dtype):
    """c2c::project: the corrections equal the reference's, a closed gate gives a zero head
    scale, fusers may come in any order, and the cache is not written."""
    case = make_case(layout="vllm_hnd", dtype=dtype, device=device, seed=42, padding=3,
                     gates_open=[True, False, True, True])
    case.fusers = [1, 2, 0, 3]
    before = [t.clone() for t in case.receiver.storage]
    projection, head_scale = torch.ops.c2c.project(*case.args(), backend, False)
    want_projection, want_scale = reference.project(case.receiver_caches, case.sharer_caches, case.receiver_slots,
                                                    case.sharer_slots, case.weights, case.fusers)
    valid = case.receiver_slots >= 0  # padding rows may hold anything
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(projection[:, valid], want_projection[:, valid], atol=tol, rtol=tol)
    torch.testing.assert_close(head_scale[:, valid], want_scale[:, valid], atol=tol, rtol=tol)
    assert torch.all(head_scale[0, valid] == 0), "a closed gate must give a zero head scale"
    for got, was in zip(case.receiver.storage, before):
        assert torch.equal(got, was), "project wrote the cache"
