"""The CUDA C++ backend beyond the shared matrix of test_ops.py (which runs its fuse on every
layout, dtype and shape once a GPU is visible).

Without a GPU: the extension registers CUDA kernels for the three native ops (when it was
built with CUDA) and the backend says why it cannot run; and the tests below that need no
stream or graph run the same sources on the CPU emulator (backend "cuda_emulator", see
csrc/cuda/emulator). With a GPU they run on the device as well: the standalone merge on every
layout, its 16-byte and scalar paths, project, the sentinel, entry groups and token chunks,
wide rows, bitwise determinism; plus a non-default stream and CUDA-graph capture and replay.
"""
import pytest
import torch

from c2c_kernels import _native, backends, reference
from c2c_kernels.testing import LAYOUTS, TOLERANCES, make_case

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The merge rounds once, like the reference; only the fp32 operation order (a fused
# multiply-add) differs, which can move a result by one unit in the last place of the dtype.
MERGE_TOLERANCES = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _gpu_skip_reason():
    if not torch.cuda.is_available():
        return "no GPU"
    return backends.reason("cuda")


requires_cuda_backend = pytest.mark.skipif(_gpu_skip_reason() is not None, reason=str(_gpu_skip_reason()))


def _emulator_skip_reason():
    return backends.reason("cuda_emulator")


# (backend, device): the CUDA sources on the GPU, and the same sources on the CPU emulator.
TARGETS = [
    pytest.param("cuda", "cuda", id="gpu", marks=pytest.mark.skipif(_gpu_skip_reason() is not None,
                                                                   reason=str(_gpu_skip_reason()))),
    pytest.param("cuda_emulator", "cpu", id="emulator",
                 marks=pytest.mark.skipif(_emulator_skip_reason() is not None, reason=str(_emulator_skip_reason()))),
]


# ---- without a GPU -----------------------------------------------------------------------------

@pytest.mark.skipif(not _native.has_cuda_kernels(),
                    reason="c2c_kernels._C was built without CUDA kernels (C2C_NO_CUDA=1 or no CUDA toolkit)")
@pytest.mark.parametrize("op", ["fuse", "project", "merge", "prepare_slots"])
def test_extension_registers_cuda_kernels(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"c2c_native::{op}", "CUDA")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_backend_unavailable_without_gpu_says_why():
    reason = backends.reason("cuda")
    assert isinstance(reason, str) and ("CUDA" in reason or "native extension" in reason), reason
    assert "cuda" not in backends.available()
    case = make_case(seed=1)
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available: .+"):
        torch.ops.c2c.fuse(*case.args(), "cuda", False)


def test_cpu_tensors_are_refused_with_a_clear_error():
    """Unavailable (no GPU) or on the wrong device: an error naming the backend, never a crash."""
    case = make_case(seed=2)
    with pytest.raises((RuntimeError, ValueError), match="backend 'cuda'"):
        torch.ops.c2c.fuse(*case.args(), "cuda", False)
    with pytest.raises((RuntimeError, ValueError), match="backend 'cuda'"):
        torch.ops.c2c.merge(case.receiver_caches, case.receiver_slots,
                            [torch.zeros(len(case.receiver_slots), 32)] * len(case.receiver_caches),
                            [torch.zeros(len(case.receiver_slots), 4)] * len(case.receiver_caches), "cuda", False)


# ---- with a GPU --------------------------------------------------------------------------------

def merge_inputs(receiver_caches, receiver_slots, sharers, *, seed=0, closed_entry=None):
    """Random fp32 corrections, S sharers per entry; every gate of one entry closed if asked."""
    g = torch.Generator().manual_seed(seed)
    t, ht, dt = receiver_slots.shape[0], receiver_caches[0].shape[2], receiver_caches[0].shape[3]
    device = receiver_slots.device
    projections, head_scales = [], []
    for entry in range(len(receiver_caches)):
        for _ in range(sharers):
            projections.append(torch.randn(t, ht * dt, generator=g).to(device))
            scale = torch.rand(t, ht, generator=g) * (entry != closed_entry)
            head_scales.append(scale.to(device))
    return projections, head_scales


def restore(storage, saved):
    for t, s in zip(storage, saved):
        t.copy_(s)


def whole_storage(view):
    """Every element of the memory under a view, as one flat tensor aliasing it."""
    return torch.empty(0, dtype=view.dtype, device=view.device).set_(view.untyped_storage())


def slot_rows_mask(views, slots):
    """Per storage (by address): a flat bool mask of the elements in the rows of the valid slots."""
    masks = {}
    valid = slots[slots >= 0].long()
    for view in views:
        key = view.untyped_storage().data_ptr()
        if key not in masks:
            masks[key] = torch.zeros(whole_storage(view).numel(), dtype=torch.bool, device=view.device)
        rows = torch.as_strided(masks[key], view.shape, view.stride(), view.storage_offset())
        rows[valid // view.shape[1], valid % view.shape[1]] = True
    return masks


def check_merge(backend, views, slots, projections, head_scales, dtype):
    """The CUDA merge against the reference on the same start: the slots' rows within tolerance,
    every other element of the storages bit for bit unchanged."""
    storages = {v.untyped_storage().data_ptr(): whole_storage(v) for v in views}
    start = {k: t.clone() for k, t in storages.items()}
    torch.ops.c2c.merge(views, slots, projections, head_scales, backend, False)
    got = {k: t.clone() for k, t in storages.items()}
    for k, t in storages.items():
        t.copy_(start[k])
    reference.merge(views, slots, projections, head_scales)
    tol = MERGE_TOLERANCES[dtype]
    for key, rows in slot_rows_mask(views, slots).items():
        torch.testing.assert_close(got[key][rows].float(), storages[key][rows].float(), atol=tol, rtol=tol)
        assert torch.equal(got[key][~rows], start[key][~rows]), "an element outside the receiver slots changed"


def check_fuse(backend, case, dtype):
    expected = case.clone_receiver()
    reference.fuse(expected.receiver_caches, expected.sharer_caches, expected.receiver_slots,
                   expected.sharer_slots, expected.weights, expected.fusers)
    torch.ops.c2c.fuse(*case.args(), backend, False)
    tol = TOLERANCES[dtype]
    for got, want in zip(case.receiver.storage, expected.receiver.storage):
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sharers", [1, 3])
def test_merge_every_layout(backend, device, layout, dtype, sharers):
    case = make_case(layout=layout, dtype=dtype, device=device, seed=4, receiver_heads=4, receiver_dim=16,
                     seq_lens=(9, 5, 1), padding=3)
    projections, head_scales = merge_inputs(case.receiver_caches, case.receiver_slots, sharers, seed=4,
                                            closed_entry=1)
    check_merge(backend, case.receiver_caches, case.receiver_slots, projections, head_scales, dtype)


def _paged(pages, page_size, heads, head_dim, dtype, device, *, misalign=False, seed=0):
    """A FlashInfer-NHD-like [pages, page_size, heads, head_dim] cache; `misalign` starts it one
    element past a 16-byte boundary, so only the scalar path may touch it."""
    g = torch.Generator().manual_seed(seed)
    numel = pages * page_size * heads * head_dim
    flat = torch.randn(numel + 1, generator=g).to(device, dtype)
    return (flat[1:] if misalign else flat[:numel]).view(pages, page_size, heads, head_dim)


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("path", ["vector", "scalar_misaligned", "scalar_odd_head_dim", "vector_strided_projection",
                                  "transposed_projection"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_vector_and_scalar_paths(backend, device, path, dtype):
    head_dim = 6 if path == "scalar_odd_head_dim" else 16
    pages, page_size, heads = 6, 4, 3
    views = [_paged(pages, page_size, heads, head_dim, dtype, device, misalign=path == "scalar_misaligned", seed=layer)
             for layer in range(2)]
    slots = torch.tensor([5, -1, 0, 17, 9, 22, -1, 3, 12], device=device)
    t, width = len(slots), heads * head_dim
    g = torch.Generator().manual_seed(7)
    if path == "vector_strided_projection":  # rows of a wider tensor: row stride 2 * width
        projections = [torch.randn(t, 2 * width, generator=g).to(device)[:, :width] for _ in views]
    elif path == "transposed_projection":  # non-unit column stride: the backend makes it dense
        projections = [torch.randn(width, t, generator=g).to(device).T for _ in views]
    else:
        projections = [torch.randn(t, width, generator=g).to(device) for _ in views]
    head_scales = [torch.rand(t, heads, generator=g).to(device) for _ in views]
    check_merge(backend, views, slots, projections, head_scales, dtype)


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fuse_realistic_widths(backend, device, dtype):
    """Head dims and widths of real models (16-byte paths everywhere), GQA both ways."""
    case = make_case(layout="vllm_nhd", sharer_layout="flashinfer_hnd", dtype=dtype, device=device, seed=15,
                     layers=3, receiver_heads=8, receiver_dim=128, sharer_heads=2, sharer_dim=64, page_size=16,
                     hidden=256, intermediate=512, seq_lens=(130, 61, 200), padding=5)
    check_fuse(backend, case, dtype)


@pytest.mark.parametrize("backend,device", TARGETS)
def test_fuse_many_entries_and_token_chunks(backend, device, monkeypatch):
    """More entries than one launch's parameter block holds, and a workspace small enough to
    split the tokens into chunks (597 tokens: as many chunks as 256-token ones, 3 of 199)."""
    monkeypatch.setenv("C2C_CUDA_WORKSPACE_BYTES", "1")
    case = make_case(layout="sglang", device=device, seed=17, layers=34, hidden=32, intermediate=16,
                     seq_lens=(300, 290), padding=7)
    check_fuse(backend, case, torch.float32)


@requires_cuda_backend
def test_fuse_runs_on_the_current_stream():
    case = make_case(dtype=torch.bfloat16, device="cuda", seed=18)
    expected = case.clone_receiver()
    reference.fuse(expected.receiver_caches, expected.sharer_caches, expected.receiver_slots,
                   expected.sharer_slots, expected.weights, expected.fusers)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.ops.c2c.fuse(*case.args(), "cuda", False)
    side.synchronize()
    for got, want in zip(case.receiver.storage, expected.receiver.storage):
        torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2)


@requires_cuda_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_graph_capture_and_replay(dtype):
    case = make_case(layout="vllm_nhd", dtype=dtype, device="cuda", seed=21, padding=2,
                     gates_open=[True, True, False, True])
    start = [t.clone() for t in case.receiver.storage]
    expected = case.clone_receiver()
    reference.fuse(expected.receiver_caches, expected.sharer_caches, expected.receiver_slots,
                   expected.sharer_slots, expected.weights, expected.fusers)
    side = torch.cuda.Stream()  # warm up (cuBLAS handles, allocator) off the capture
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.ops.c2c.fuse(*case.args(), "cuda", False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.c2c.fuse(*case.args(), "cuda", False)
    results = []
    for _ in range(2):
        restore(case.receiver.storage, start)
        graph.replay()
        torch.cuda.synchronize()
        results.append([t.clone() for t in case.receiver.storage])
    tol = TOLERANCES[dtype]
    for got, want in zip(results[0], expected.receiver.storage):
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    for first, second in zip(*results):
        assert torch.equal(first, second), "two replays differ"


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bitwise_deterministic(backend, device, dtype):
    case = make_case(layout="flashinfer_nhd", dtype=dtype, device=device, seed=23, receiver_dim=16, hidden=128,
                     intermediate=96, seq_lens=(40, 17))
    start = [t.clone() for t in case.receiver.storage]
    runs = []
    for _ in range(3):
        restore(case.receiver.storage, start)
        torch.ops.c2c.fuse(*case.args(), backend, False)
        projection, head_scale = torch.ops.c2c.project(*case.args(), backend, False)
        runs.append(([t.clone() for t in case.receiver.storage], projection, head_scale))
    for storage, projection, head_scale in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(storage, runs[0][0])), "fuse differs between runs"
        assert torch.equal(projection, runs[0][1]) and torch.equal(head_scale, runs[0][2]), "project differs"


# ---- the backend's own checks, below the op layer ------------------------------------------------

def _native(backend):
    """fuse / project / merge of the CUDA sources, called directly (the op layer's checks skipped)."""
    if backend == "cuda":
        return torch.ops.c2c_native
    return backends.get("cuda_emulator")._build()


NATIVE_ERRORS = {
    "weight_count": (lambda a: a.update(weights=a["weights"][:13]), "weights: expected the 14 stacked tensors"),
    "fuser_range": (lambda a: a.update(fusers=[99] + a["fusers"][1:]), r"fusers\[0\] = 99 is out of range"),
    "entry_count": (lambda a: a.update(sharer_caches=a["sharer_caches"][:1]),
                    "must have one entry per fused cache"),
    "slot_count": (lambda a: a.update(sharer_slots=a["sharer_slots"][:-1]),
                   "sharer_slots: .* expected one per receiver slot"),
    "slot_dtype": (lambda a: a.update(receiver_slots=a["receiver_slots"].float()), "expected int32 or int64"),
    "head_dim_stride": (lambda a: a["receiver_caches"].__setitem__(0, a["receiver_caches"][0].transpose(2, 3)),
                        "the head_dim stride must be 1"),
    "cache_dtype": (lambda a: a["receiver_caches"].__setitem__(0, a["receiver_caches"][0].double()),
                    r"receiver_caches\[0\]: dtype"),
    "receiver_width": (lambda a: a.update(receiver_caches=[v[:, :, :2] for v in a["receiver_caches"]]),
                       "dims do not match the fuser's receiver width"),
    "geometry": (lambda a: a["receiver_caches"].__setitem__(1, a["receiver_caches"][1][:-1]),
                 "every entry must share one pool geometry"),
}


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("error", NATIVE_ERRORS)
def test_native_checks_name_the_argument(backend, device, error):
    """Called directly, the native ops still refuse bad input with an error naming the argument
    (the op layer checks first in normal use), and write nothing."""
    case = make_case(layout="vllm_nhd", device=device, seed=31)
    args = dict(zip(["receiver_caches", "sharer_caches", "receiver_slots", "sharer_slots", "weights", "fusers"],
                    [list(case.receiver_caches), list(case.sharer_caches), case.receiver_slots, case.sharer_slots,
                     list(case.weights), list(case.fusers)]))
    mutate, message = NATIVE_ERRORS[error]
    mutate(args)
    before = [t.clone() for t in case.receiver.storage]
    with pytest.raises(RuntimeError, match=message):
        _native(backend).fuse(*args.values())
    assert all(torch.equal(a, b) for a, b in zip(case.receiver.storage, before))


@pytest.mark.parametrize("backend,device", TARGETS)
def test_native_merge_checks(backend, device):
    case = make_case(device=device, seed=32)
    t, heads, dim = len(case.receiver_slots), case.receiver_caches[0].shape[2], case.receiver_caches[0].shape[3]
    entries = len(case.receiver_caches)
    good_y = [torch.zeros(t, heads * dim, device=device)] * entries
    good_a = [torch.zeros(t, heads, device=device)] * entries
    with pytest.raises(RuntimeError, match=r"projections\[0\]: expected float32"):
        _native(backend).merge(case.receiver_caches, case.receiver_slots, [y[:, 1:] for y in good_y], good_a)
    with pytest.raises(RuntimeError, match=r"head_scales\[0\]: expected float32"):
        _native(backend).merge(case.receiver_caches, case.receiver_slots, good_y, [a.double() for a in good_a])
    with pytest.raises(RuntimeError, match="expected S \\* .* entries each"):
        _native(backend).merge(case.receiver_caches, case.receiver_slots, good_y[:-1], good_a[:-1])


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("hidden", [1000, 2056])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fuse_wide_rows(backend, device, hidden, dtype):
    """Rows wider than one warp's share: the row epilogue's block reduction spans several
    warps (4 and 9), the last one partly idle."""
    case = make_case(device=device, dtype=dtype, seed=33, layers=1, hidden=hidden, intermediate=40,
                     seq_lens=(6, 3), padding=1)
    check_fuse(backend, case, dtype)


@pytest.mark.parametrize("backend,device", TARGETS)
def test_native_refuses_rows_wider_than_the_row_kernel(backend, device):
    case = make_case(device=device, seed=34, layers=1, hidden=8193, intermediate=8, seq_lens=(2,), padding=0)
    with pytest.raises(RuntimeError, match="hidden width 8193 is above the CUDA backend's limit of 8192"):
        _native(backend).fuse(*case.args())


# ---- the input GEMM over [S; X], the row epilogue's two kernels, the chunk plan ------------------

@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("hidden,dtype", [(36, torch.bfloat16), (200, torch.float16), (512, torch.bfloat16),
                                          (264, torch.float32)], ids=["36-bf16", "200-fp16", "512-bf16", "264-fp32"])
def test_fuse_row_epilogue_paths(backend, device, hidden, dtype):
    """Rows of whole 16-byte vectors take the warp-per-row epilogue with 1, 2 or 4 vectors per
    lane (some lanes idle, and warps past the last token); a width that is not (36 bf16) takes
    the block-per-row one."""
    case = make_case(device=device, dtype=dtype, seed=40, layers=1, hidden=hidden, intermediate=24,
                     seq_lens=(5, 2), padding=2)
    check_fuse(backend, case, dtype)


@pytest.mark.parametrize("backend,device", TARGETS)
def test_fuse_sees_in_place_weight_updates(backend, device):
    """The [S; X] GEMM's concatenated W_in is kept per weight stack between calls: an in-place
    update of either half (an optimizer step, a reload) must reach the next call."""
    case = make_case(device=device, seed=41)
    torch.ops.c2c.fuse(*case.args(), backend, False)
    with torch.no_grad():
        case.weights.w_in_sharer.mul_(-0.5)
        case.weights.w_in_receiver.add_(0.25)
    check_fuse(backend, case, torch.float32)


@pytest.mark.parametrize("backend,device", TARGETS)
def test_fuse_w_in_as_one_tensor(backend, device):
    """W_in's halves as column slices of one [P, H, Ks + Kt] tensor: the GEMM reads it in place."""
    case = make_case(device=device, seed=42, dtype=torch.bfloat16)
    w = case.weights
    joined = torch.cat([w.w_in_sharer, w.w_in_receiver], 2)
    ks = w.w_in_sharer.shape[2]
    case.weights = w._replace(w_in_sharer=joined[..., :ks], w_in_receiver=joined[..., ks:])
    check_fuse(backend, case, torch.bfloat16)


@pytest.mark.parametrize("backend,device", TARGETS)
def test_fuse_inference_tensor_weights(backend, device):
    """Weights made under torch.inference_mode() carry no version counter, so no concatenated
    W_in is kept for them: the input GEMM runs as two over the same [S; X] rows."""
    case = make_case(device=device, seed=43)
    with torch.inference_mode():
        case.weights = type(case.weights)(*(t.clone() for t in case.weights))
    check_fuse(backend, case, torch.float32)


@pytest.mark.skipif(_emulator_skip_reason() is not None, reason=str(_emulator_skip_reason()))
def test_workspace_runs_16384_tokens_in_two_chunks(monkeypatch):
    """The first benchmark workload (24 layers x K and V, sharer 2x64, receiver 8x128,
    H = I = 1024, bf16) at 16384 tokens: at most 2 chunks on GPUs of 80 GB and more (each chunk
    re-reads every weight), with the workspace capped at 1/16 of the device and at 6 GiB."""
    monkeypatch.delenv("C2C_CUDA_WORKSPACE_BYTES", raising=False)
    plan = backends.get("cuda_emulator").chunk_plan
    for memory in (80 * 10**9, 141 * 10**9, 0):  # 0: unknown (the emulator), the cap alone
        tokens, chunks, workspace = plan(48, 16384, 128, 1024, 1024, 1024, 8, 2, memory)
        assert chunks <= 2 and tokens == -(-16384 // chunks), (memory, tokens, chunks)  # even chunks
        assert workspace <= min(6 << 30, memory // 16 or 6 << 30), (memory, workspace)
    tokens, chunks, workspace = plan(48, 16384, 128, 1024, 1024, 1024, 8, 2, 24 * 10**9)
    assert workspace <= 24 * 10**9 // 16 and chunks * tokens >= 16384
    monkeypatch.setenv("C2C_CUDA_WORKSPACE_BYTES", "1")  # the override; chunks of 256 tokens at the least
    assert plan(48, 16384, 128, 1024, 1024, 1024, 8, 2, 0)[:2] == (256, 64)
    assert plan(48, 597, 128, 1024, 1024, 1024, 8, 2, 0)[:2] == (199, 3)


@requires_cuda_backend
def test_cuda_graph_capture_with_weights_first_seen_in_capture():
    """Weights no eager call has seen: the capture makes no concatenated W_in (no allocation
    while capturing) and runs the input GEMM as two; replays match the reference."""
    case = make_case(layout="vllm_nhd", dtype=torch.bfloat16, device="cuda", seed=44, padding=2)
    warm = make_case(layout="vllm_nhd", dtype=torch.bfloat16, device="cuda", seed=45, padding=2)
    start = [t.clone() for t in case.receiver.storage]
    expected = case.clone_receiver()
    reference.fuse(expected.receiver_caches, expected.sharer_caches, expected.receiver_slots,
                   expected.sharer_slots, expected.weights, expected.fusers)
    side = torch.cuda.Stream()  # warm up (cuBLAS handles, allocator) with other weights
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.ops.c2c.fuse(*warm.args(), "cuda", False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.c2c.fuse(*case.args(), "cuda", False)
    restore(case.receiver.storage, start)
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(case.receiver.storage, expected.receiver.storage):
        torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.skipif(_emulator_skip_reason() is not None, reason=str(_emulator_skip_reason()))
def test_input_weight_cache_holds_one_copy_per_live_stack():
    """A call keeps one concatenated W_in for its weight stack; an in-place update replaces it
    (no outdated copy stays), freed weights release it, and inference-mode weights get none."""
    import gc
    native = backends.get("cuda_emulator")._build()
    gc.collect()
    before = native.input_weight_cache_entries()
    case = make_case(seed=46)
    torch.ops.c2c.fuse(*case.args(), "cuda_emulator", False)
    assert native.input_weight_cache_entries() == before + 1
    with torch.no_grad():
        case.weights.w_in_receiver.mul_(2.0)
    torch.ops.c2c.fuse(*case.args(), "cuda_emulator", False)
    assert native.input_weight_cache_entries() == before + 1
    del case
    gc.collect()
    assert native.input_weight_cache_entries() == before
    case = make_case(seed=47)
    with torch.inference_mode():
        case.weights = type(case.weights)(*(t.clone() for t in case.weights))
    torch.ops.c2c.fuse(*case.args(), "cuda_emulator", False)
    assert native.input_weight_cache_entries() == before
