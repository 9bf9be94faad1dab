"""The Triton backend beyond the shared op matrix of test_ops.py.

On a machine without a GPU these run in the Triton interpreter on small shapes (conftest sets
TRITON_INTERPRET=1): fuser indices in any order and repeated, c2c::project and c2c::merge
against the reference, a closed gate handed to the backend, the per-call pointer tables. With
a GPU: workload-sized shapes, every dtype on paged caches, CUDA-graph capture and replay (also
of the slot preparation), and the sentinel check on big paged pools. Slot safety (the
prepare-slots kernel, out-of-range, strided and duplicate slots) is in test_triton_safety.py.
"""
import pytest
import torch

from c2c_kernels import backends, reference
from c2c_kernels.bench.workloads import WORKLOADS
from c2c_kernels.testing import assert_storage_close, make_case, reference_fused

TRITON_REASON = backends.reason("triton")
triton_backend = backends.get("triton") if TRITON_REASON is None else None
CPU_OK = TRITON_REASON is None and "cpu" in backends.devices("triton")
CUDA_OK = torch.cuda.is_available() and TRITON_REASON is None and "cuda" in backends.devices("triton")
DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(not CPU_OK, reason="triton interpreter not enabled")),
           pytest.param("cuda", marks=pytest.mark.skipif(not CUDA_OK, reason="no GPU"))]
needs_gpu = pytest.mark.skipif(not CUDA_OK, reason="no GPU")


def fuse(case):
    torch.ops.c2c.fuse(*case.args(), "triton", False)


# ---- interpreter (CPU) and GPU --------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fusers_out_of_order_and_repeated(device, dtype):
    """Entries may name any fuser of the stack, in any order, the same one several times."""
    case = make_case(layers=2, device=device, dtype=dtype, seed=41)  # a stack of 4 fusers
    case.fusers = [3, 0, 3, 2]
    expected = reference_fused(case)
    fuse(case)
    assert_storage_close(case, expected, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,columns", [(torch.float32, 1), (torch.bfloat16, 1), (torch.float32, 2)],
                         ids=["float32", "bfloat16", "strided-columns"])
def test_merge_several_sharers(device, dtype, columns):
    """Parallel mode: S corrections per entry, from strided projection views, summed in order."""
    case = make_case(layout="flashinfer_interleaved", device=device, dtype=dtype, seed=43, padding=2)
    entries, sharers, tokens = len(case.receiver_caches), 2, case.receiver_slots.shape[0]
    width, heads = case.weights.receiver_width, case.weights.receiver_heads
    g = torch.Generator().manual_seed(7)
    rows = torch.randn(tokens, entries * sharers, width * columns, generator=g).to(device)
    projections = rows[..., ::columns].unbind(1)  # views: row stride != width, column stride `columns`
    head_scales = list(torch.rand(entries * sharers, tokens, heads, generator=g).to(device).unbind(0))
    expected = case.clone_receiver()
    reference.merge(expected.receiver_caches, expected.receiver_slots, list(projections), head_scales)
    torch.ops.c2c.merge(case.receiver_caches, case.receiver_slots, list(projections), head_scales, "triton", False)
    assert_storage_close(case, expected, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_closed_gate_given_to_the_backend_leaves_the_cache_bit_identical(device):
    case = make_case(device=device, dtype=torch.bfloat16, seed=44, gates_open=[True, False, False, True])
    before = [t.clone() for t in case.receiver.storage]
    triton_backend.fuse(case.receiver_caches, case.sharer_caches, case.receiver_slots, case.sharer_slots,
                        case.weights, case.fusers)  # straight to the backend: no gate filtering above it
    k0, v0 = case.receiver.kv[0]
    k1, v1 = case.receiver.kv[1]
    b_k0, b_v0 = before[0].unbind(0)  # vLLM NHD storage: [2, pages, page, heads, dim] per layer
    b_k1, b_v1 = before[1].unbind(0)
    assert torch.equal(v0, b_v0) and torch.equal(k1, b_k1), "a closed gate changed its cache"
    assert not torch.equal(k0, b_k0) and not torch.equal(v1, b_v1), "an open gate left its cache alone"


@pytest.mark.parametrize("device", DEVICES)
def test_pointer_tables_are_reused_per_set_of_caches(device):
    from c2c_kernels.backends.triton import tables
    case = make_case(device=device, seed=45)
    first = tables.entry_table(case.receiver_caches, case.sharer_caches, case.fusers).rows
    again = tables.entry_table(case.receiver_caches, case.sharer_caches, case.fusers).rows
    assert again is first, "the same caches must reuse the uploaded table"
    swapped = tables.entry_table(case.receiver_caches[::-1], case.sharer_caches[::-1], case.fusers).rows
    assert swapped is not first
    rc = case.receiver_caches[1]
    assert swapped[2].tolist()[1:5] == [rc.data_ptr(), rc.stride(0), rc.stride(1), rc.stride(2)]


@pytest.mark.skipif(TRITON_REASON is not None, reason="triton not importable")
@pytest.mark.parametrize("gpu", ["hopper", "ampere-a100", "ampere-small-smem"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_config_choice(monkeypatch, gpu, dtype):
    """The GPU-side tile choice (it only runs with a GPU, so it is exercised here by hand)."""
    from c2c_kernels.backends.triton import configs
    hopper, smem = {"hopper": (True, 232448), "ampere-a100": (False, 166912),
                    "ampere-small-smem": (False, 101376)}[gpu]
    monkeypatch.setattr(configs, "INTERPRET", False)
    monkeypatch.setattr(configs, "_device_limits", lambda device: (hopper, smem))
    monkeypatch.setattr(configs, "AUTOTUNE", True)
    candidates = configs.configs()
    weights = torch.empty(4, 1024, 1024, dtype=dtype)
    size = weights.element_size()
    for tokens in (1, 64, 200, 1024, 5000):
        kept = configs.prune(candidates, {"w_ptr": weights, "m_bucket": configs.token_bucket(tokens)})
        assert kept, "no config left"
        for c in kept:
            bm, bn, bk = c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"]
            assert (bm + bn) * bk * size * c.num_stages <= smem
            assert c.kwargs["BM"] == 64 or tokens > 64, "short prompts stream weights with 64-row tiles"
            tile = dict(c.kwargs, CTAS_PER_SM=1), c.num_warps, c.num_stages
            assert tile in [(d.kwargs, d.num_warps, d.num_stages) for d in candidates]
            # The persistent grid's CTAs per SM: as many as fit (at most 2) in shared memory.
            ctas = c.kwargs["CTAS_PER_SM"]
            assert 1 <= ctas <= 2 and (ctas == 1 or 2 * (bm + bn) * bk * size * c.num_stages <= smem)
        if dtype == torch.float32:
            assert len(kept) == 1
        elif tokens > 1024:
            assert all(c.kwargs["BM"] == 128 for c in kept)
        small = configs.prune(candidates, {"w_ptr": weights[:, :64, :64], "m_bucket": 4096})
        assert len(small) == 1, "tiny layers are not benchmarked"
        for head_dim in (64, 128, 96):
            fixed = configs.fixed(tokens, head_dim, torch.device("cpu"), size)
            assert (fixed["BM"] + fixed["BN"]) * fixed["BK"] * size * fixed["num_stages"] <= smem
            if head_dim % 64 == 0 and size == 2:
                assert head_dim % fixed["BN"] == 0, "the in-place epilogue should see one head per tile"
            # unaligned views: the epilogue's per-element cache addresses leave room for a narrow
            # K tile only (sm_90a, runtime page size: 120 B spilled with BK=64 in the persistent loop)
            assert configs.fixed(tokens, head_dim, torch.device("cpu"), size, vec=1)["BK"] <= configs.UNALIGNED_BK
    # Unaligned views (vec 1): the gathering GEMM's K tile is cut (every A element has its own
    # 64-bit address: wider tiles spill), and the in-place epilogue's column tile halved.
    for tokens in (64, 1024):
        bucket = configs.token_bucket(tokens)
        aligned = configs.prune(candidates, {"w_ptr": weights, "m_bucket": bucket}, SHARER_VEC=8, RECEIVER_VEC=8)
        assert size == 4 or any(c.kwargs["BK"] > configs.UNALIGNED_BK for c in aligned)
        for vecs in ((1, 8), (8, 1)):
            narrow = configs.prune(candidates, {"w_ptr": weights, "m_bucket": bucket},
                                   SHARER_VEC=vecs[0], RECEIVER_VEC=vecs[1])
            assert narrow and all(c.kwargs["BK"] <= configs.UNALIGNED_BK for c in narrow)
            assert len({(c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"], c.num_stages) for c in narrow}) == len(narrow)
        if size == 2 and hopper:
            assert configs.fixed(tokens, 128, torch.device("cpu"), size, vec=1)["BN"] == 64
    logit_candidates = configs.configs(configs.LOGIT_BN)
    assert {c.kwargs["BN"] for c in logit_candidates} == {configs.LOGIT_BN}


# ---- GPU only ---------------------------------------------------------------------------------

def workload_case(layout, dtype, seq_lens, layers=2, seed=50, **kw):
    """Real head geometry of the first benchmark workload, hidden 1024, a few layers."""
    (_, r_heads, r_dim), (_, s_heads, s_dim) = WORKLOADS["qwen3-0.6b+qwen2.5-0.5b"]
    return make_case(layout=layout, layers=layers, receiver_heads=r_heads, receiver_dim=r_dim,
                     sharer_heads=s_heads, sharer_dim=s_dim, hidden=1024, intermediate=1024,
                     seq_lens=seq_lens, page_size=16, dtype=dtype, device="cuda", seed=seed, **kw)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("seq_lens", [(37,), (700, 301), (512,) * 4], ids=["short", "ragged", "paged4x512"])
def test_workload_shapes(dtype, seq_lens):
    case = workload_case("vllm_nhd", dtype, seq_lens, padding=5)
    expected = reference_fused(case)
    fuse(case)
    assert_storage_close(case, expected, dtype)


@needs_gpu
@pytest.mark.parametrize("layout", ["hf", "vllm_hnd", "flashinfer_interleaved", "sglang"])
def test_workload_layouts(layout):
    case = workload_case(layout, torch.bfloat16, (300, 90), padding=7)
    expected = reference_fused(case)
    fuse(case)
    assert_storage_close(case, expected, torch.bfloat16)


@needs_gpu
def test_sentinel_on_big_paged_pools():
    case = workload_case("flashinfer_interleaved", torch.bfloat16, (400, 129, 33), padding=9)
    before = [t.clone() for t in case.receiver.storage]
    sharer_before = [t.clone() for t in case.sharer.storage]
    fuse(case)
    touched = torch.zeros_like(before[0], dtype=torch.bool)  # [pages, 2, page_size, H, D]
    valid = case.receiver_slots[case.receiver_slots >= 0].long()
    touched[valid // 16, :, valid % 16] = True
    for got, was in zip(case.receiver.storage, before):
        assert torch.equal(got[~touched], was[~touched]), "an element outside the receiver slots changed"
    for got, was in zip(case.sharer.storage, sharer_before):
        assert torch.equal(got, was)


@needs_gpu
def test_cuda_graph_capture_and_replay():
    """Warm up, capture one fuse, then replay on fresh cache contents and new slots."""
    case = workload_case("vllm_nhd", torch.bfloat16, (200, 56), padding=8)
    pristine = [t.clone() for t in case.receiver.storage]
    fuse(case)  # warm-up: autotuning, compilation and the pointer table
    torch.cuda.synchronize()
    for t, p in zip(case.receiver.storage, pristine):
        t.copy_(p)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fuse(case)
    for t, p in zip(case.receiver.storage, pristine):  # capturing does not run the kernels
        t.copy_(p)
    expected = reference_fused(case)
    graph.replay()
    torch.cuda.synchronize()
    assert_storage_close(case, expected, torch.bfloat16)

    # New contents and a new token alignment in the same static tensors: the replay follows them.
    valid = torch.nonzero(case.receiver_slots >= 0).squeeze(1)
    new_sharer_slots = case.sharer_slots.clone()
    new_sharer_slots[valid] = case.sharer_slots[valid[torch.randperm(valid.numel(), device="cuda")]]
    case.sharer_slots.copy_(new_sharer_slots)
    for t, p in zip(case.receiver.storage, pristine):
        t.copy_(p * 0.5)
    expected = reference_fused(case)
    graph.replay()
    torch.cuda.synchronize()
    assert_storage_close(case, expected, torch.bfloat16)


@needs_gpu
def test_cuda_graph_replay_prepares_strided_slots_again():
    """The slot preparation is part of the graph: a replay reads the static (here strided) slot
    tensor anew, skips a slot made out of range after the capture and records it."""
    from c2c_kernels import slots, status
    case = workload_case("vllm_nhd", torch.bfloat16, (200, 56), padding=8)
    tokens = case.receiver_slots.numel()
    backing = torch.full((2 * tokens,), -1, dtype=case.receiver_slots.dtype, device="cuda")
    backing[::2] = case.receiver_slots
    case.receiver_slots = backing[::2]
    pristine = [t.clone() for t in case.receiver.storage]
    fuse(case)  # warm-up: compilation, tables and the status buffer, outside the capture
    torch.cuda.synchronize()
    status.raise_pending_errors()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fuse(case)
    for t, p in zip(case.receiver.storage, pristine):
        t.copy_(p)

    token = int(torch.nonzero(case.receiver_slots >= 0)[5])
    bad = slots.rows(case.receiver_caches[0]) + 7
    backing[2 * token] = bad
    expected = case.clone_receiver()
    expected.receiver_slots = case.receiver_slots.clone()
    expected.receiver_slots[token] = -1
    expected = reference_fused(expected)
    graph.replay()
    torch.cuda.synchronize()
    assert_storage_close(case, expected, torch.bfloat16)
    with pytest.raises(ValueError, match=rf"receiver_slots\[{token}\] = {bad} "):
        status.raise_pending_errors()
    status.raise_pending_errors()  # reported once
