"""Each engine's cache reaches the 4-D view without a copy, and its slots address the right rows."""
import pytest
import torch

from c2c_kernels import layouts
from c2c_kernels.reference import gather_rows


def shares_memory(view, owner):
    start, end = owner.data_ptr(), owner.data_ptr() + owner.untyped_storage().nbytes()
    return start <= view.data_ptr() < end


def test_hf_views_and_slots():
    k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    kv, vv = layouts.hf_views(k, v)
    assert kv.shape == (2, 5, 3, 4) and shares_memory(kv, k) and shares_memory(vv, v)
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 0, 0]])  # left and right padding
    slots = layouts.hf_slots(mask)
    assert slots.tolist() == [-1, 1, 2, 3, 4, 5, 6, 7, -1, -1]
    rows = gather_rows(kv, slots[slots >= 0])
    assert torch.equal(rows[0], k[0, :, 1].reshape(-1))
    assert torch.equal(rows[5], k[1, :, 1].reshape(-1))  # slot 6 = batch 1, token 1
    prompt = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    assert layouts.hf_slots(mask, prompt).tolist() == [-1, 1, 2, -1, -1, 5, 6, 7, -1, -1]


def test_dynamic_cache_views_accepts_all_cache_apis():
    pairs = [(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)) for _ in range(2)]

    class Layer:
        def __init__(self, k, v):
            self.keys, self.values = k, v

    class NewCache:
        layers = [Layer(k, v) for k, v in pairs]

    class OldCache:
        key_cache = [k for k, _ in pairs]
        value_cache = [v for _, v in pairs]

    for cache in (NewCache(), OldCache(), pairs):
        views = layouts.dynamic_cache_views(cache)
        assert len(views) == 2
        assert views[1][0].data_ptr() == pairs[1][0].data_ptr() and views[1][0].shape == (1, 3, 2, 4)


@pytest.mark.parametrize("hnd", [False, True])
def test_vllm_views_and_slot_mapping(hnd):
    bs = 16
    if hnd:
        kv = layouts.vllm_hnd_cache(6, bs, 2, 8)
        kv.copy_(torch.randn(kv.shape))
    else:
        kv = torch.randn(2, 6, bs, 2, 8)
    k, v = layouts.vllm_views(kv)
    assert k.shape == (6, bs, 2, 8) and shares_memory(k, kv) and shares_memory(v, kv)
    if hnd:
        assert k.stride(2) > k.stride(1)  # heads before entries in memory
    block_table = torch.tensor([[4, 1], [2, 0]])
    positions = torch.tensor([0, 17, 3, -1])
    requests = torch.tensor([0, 0, 1, 1])
    slots = layouts.vllm_slot_mapping(block_table, positions, requests, bs)
    assert slots.tolist() == [4 * bs, 1 * bs + 1, 2 * bs + 3, -1]
    rows = gather_rows(k, slots[:3])
    assert torch.equal(rows[1], kv[0, 1, 1].reshape(-1))


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("interleaved", [False, True])
def test_flashinfer_views_and_slots(layout, interleaved):
    ps, pages, h, d = 4, 5, 2, 8
    page_shape = (ps, h, d) if layout == "NHD" else (h, ps, d)
    if interleaved:
        cache = torch.randn(pages, 2, *page_shape)
        owner = cache
    else:
        cache = (torch.randn(pages, *page_shape), torch.randn(pages, *page_shape))
        owner = cache[0]
    k, v = layouts.flashinfer_views(cache, layout)
    assert k.shape == (pages, ps, h, d) and shares_memory(k, owner)
    kv_indptr = torch.tensor([0, 2, 3])
    kv_indices = torch.tensor([3, 0, 4])
    kv_last_page_len = torch.tensor([2, 4])  # request 0 holds 6 tokens, request 1 holds 4
    batch, pos = layouts.flashinfer_batch_positions(kv_indptr, kv_last_page_len, ps)
    assert batch.tolist() == [0] * 6 + [1] * 4 and pos.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]
    slots = layouts.flashinfer_slots(kv_indptr, kv_indices, ps, batch, pos)
    assert slots.tolist() == [12, 13, 14, 15, 0, 1, 16, 17, 18, 19]
    # The last two tokens of each request, as just appended.
    batch, pos = layouts.flashinfer_batch_positions(kv_indptr, kv_last_page_len, ps, torch.tensor([2, 2]))
    assert pos.tolist() == [4, 5, 2, 3]
    raw_k = cache[:, 0] if interleaved else cache[0]
    expected = raw_k[0, 1] if layout == "NHD" else raw_k[0, :, 1]
    assert torch.equal(gather_rows(k, torch.tensor([1]))[0], expected.reshape(-1))


def test_sglang_views():
    kb, vb = torch.randn(10, 2, 8), torch.randn(10, 2, 8)
    k, v = layouts.sglang_views(kb, vb)
    assert k.shape == (10, 1, 2, 8) and k.data_ptr() == kb.data_ptr()
    assert torch.equal(gather_rows(k, torch.tensor([7]))[0], kb[7].reshape(-1))


def test_layout_errors():
    with pytest.raises(ValueError, match="keys: expected a \\[batch, heads, tokens, head_dim\\]"):
        layouts.hf_views(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4, 5))
    with pytest.raises(ValueError, match="kv_cache: expected \\[2, blocks"):
        layouts.vllm_views(torch.zeros(3, 1, 1, 1, 1))
    with pytest.raises(ValueError, match="layout: expected 'NHD' or 'HND'"):
        layouts.flashinfer_views(torch.zeros(1, 2, 1, 1, 1), "XYZ")
    with pytest.raises(ValueError, match="k_buffer: expected \\[size, heads, head_dim\\]"):
        layouts.sglang_views(torch.zeros(1, 1), torch.zeros(1, 1, 1))
