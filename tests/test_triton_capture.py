"""CUDA-graph capture of the Triton backend's parallel multi-sharer mode (``fuse_all`` with
several checkpoints: ``c2c::project`` per sharer, then one ``c2c::merge``).

The merge reaches the projections through a device table of their addresses (tables.py). In a
capture, ``project`` allocates its outputs from the graph's pool, at addresses the eager warm-up
never saw, so the table cannot come from the warm-up: it is written on the device by launches
the capture records (their arguments hold the addresses), and each replay rewrites it. On the
CPU (the interpreter) a capture is simulated by reporting one, which pins that mechanism: no
refusal, the table kept for good, reused by later captures of the same tensors, and rewritten
before an eager call can read it if no replay has written it yet.
"""
import pytest
import torch

import c2c_kernels as c2c
from c2c_kernels import backends, reference
from c2c_kernels.testing import assert_storage_close, make_case, reference_fused

TRITON_REASON = backends.reason("triton")
CPU_OK = TRITON_REASON is None and "cpu" in backends.devices("triton")
CUDA_OK = torch.cuda.is_available() and TRITON_REASON is None and "cuda" in backends.devices("triton")


def _projections(case, device, seed):
    g = torch.Generator().manual_seed(seed)
    entries, tokens = len(case.receiver_caches), case.receiver_slots.shape[0]
    width, heads = case.weights.receiver_width, case.weights.receiver_heads
    projections = list(torch.randn(2 * entries, tokens, width, generator=g).to(device).unbind(0))
    head_scales = list(torch.rand(2 * entries, tokens, heads, generator=g).to(device).unbind(0))
    return projections, head_scales


@pytest.mark.skipif(not CPU_OK, reason="triton interpreter not enabled")
def test_merge_table_first_met_during_capture_is_written_on_the_device(monkeypatch):
    from c2c_kernels.backends.triton import tables
    case = make_case(seed=71, padding=2)
    launches = []
    fill = tables._fill_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args):
                launches.append(args[0].data_ptr())
                return fill[grid](*args)
            return launch

    monkeypatch.setattr(tables, "_fill_kernel", Spy())
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda *a, **k: pytest.fail("a table went through the host"))
    warm = _projections(case, "cpu", 1)  # kept alive: the next ones get new addresses
    torch.ops.c2c.merge(case.receiver_caches, case.receiver_slots, *warm, "triton", False)

    # "Capture": fresh projections, as project allocates them inside a capture.
    projections, head_scales = _projections(case, "cpu", 2)
    expected = case.clone_receiver()
    reference.merge(expected.receiver_caches, expected.receiver_slots, projections, head_scales)
    monkeypatch.setattr(tables, "_capturing", lambda device: True)
    before, captured = len(launches), len(tables._captured)
    torch.ops.c2c.merge(case.receiver_caches, case.receiver_slots, projections, head_scales, "triton", False)
    assert len(launches) > before, "the new contribution table was not written by fill launches"
    assert len(tables._captured) > captured, "a table used in a capture must be kept for good"
    assert_storage_close(case, expected, torch.float32)  # the interpreter ran the launches at once

    # A second capture of the same tensors reuses the table: nothing rebuilt.
    before = len(launches)
    _, contributions, _ = tables.merge_tables(case.receiver_caches, projections, head_scales)
    assert len(launches) == before
    # After the capture, an eager call with these tensors rewrites the table first (in a real
    # capture the recorded launches only run at replay), once.
    monkeypatch.setattr(tables, "_capturing", lambda device: False)
    _, again, _ = tables.merge_tables(case.receiver_caches, projections, head_scales)
    assert again is contributions and launches[before:] and launches[-1] >= contributions.data_ptr()
    assert contributions[0, 0].item() == projections[0].data_ptr()
    before = len(launches)
    tables.merge_tables(case.receiver_caches, projections, head_scales)
    assert len(launches) == before


@pytest.mark.skipif(not CPU_OK, reason="triton interpreter not enabled")
def test_table_values_round_trip_through_the_fill_kernel():
    """Addresses above 2^31 and every position of a launch's FILL values, and a second launch."""
    from c2c_kernels.backends.triton import tables
    values = [(1 << 47) + 16 * i + (i % 3) * (1 << 31) for i in range(tables.FILL + 5)] + [0, 1, (1 << 62) - 1]
    flat = torch.full((2 * tables.FILL,), -7, dtype=torch.int64)
    tables._write(flat, values)
    assert flat[:len(values)].tolist() == values
    with pytest.raises(ValueError, match="outside"):
        tables._write(flat, [-1])


# ---- GPU --------------------------------------------------------------------------------------

def _workload_case(seed):
    from c2c_kernels.bench.workloads import WORKLOADS
    (_, r_heads, r_dim), (_, s_heads, s_dim) = WORKLOADS["qwen3-0.6b+qwen2.5-0.5b"]
    return make_case(layout="vllm_nhd", layers=2, receiver_heads=r_heads, receiver_dim=r_dim, sharer_heads=s_heads,
                     sharer_dim=s_dim, hidden=1024, intermediate=1024, seq_lens=(200, 56), page_size=16,
                     dtype=torch.bfloat16, device="cuda", seed=seed, padding=8)


@pytest.mark.skipif(not CUDA_OK, reason="no GPU")
def test_parallel_fuse_all_is_captured_and_replayed():
    case = _workload_case(72)
    ckpt = c2c.make_checkpoint(case.weights, {0: 0, 1: 1}, sharer_heads=case.sharer.kv[0][0].shape[2])
    shuffled = case.sharer_slots.clone()
    valid = torch.nonzero(case.receiver_slots >= 0).squeeze(1)
    shuffled[valid] = case.sharer_slots[valid.flip(0)]

    def run():
        c2c.fuse_all([ckpt, ckpt], case.receiver.kv, [case.sharer.kv, case.sharer.kv], case.receiver_slots,
                     [case.sharer_slots, shuffled], mode="parallel", backend="triton")

    def expected_now():
        expected = case.clone_receiver()
        parts = [reference.project(expected.receiver_caches, expected.sharer_caches, expected.receiver_slots, ss,
                                   case.weights, case.fusers) for ss in (case.sharer_slots, shuffled)]
        entries = len(case.receiver_caches)
        reference.merge(expected.receiver_caches, expected.receiver_slots,
                        [p[0][i] for i in range(entries) for p in parts],
                        [p[1][i] for i in range(entries) for p in parts])
        return expected

    pristine = [t.clone() for t in case.receiver.storage]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # warm-up: autotuning, compilation, entry tables
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for scale in (1.0, 0.5):  # replays follow new cache contents in the same tensors
        for t, p in zip(case.receiver.storage, pristine):
            t.copy_(p * scale)
        expected = expected_now()
        graph.replay()
        torch.cuda.synchronize()
        assert_storage_close(case, expected, torch.bfloat16)


@pytest.mark.skipif(not CUDA_OK, reason="no GPU")
def test_new_caches_during_capture_are_fused_at_replay():
    """Caches never seen eagerly (same shapes, so the autotuner is warm) may be captured."""
    case = _workload_case(73)
    torch.ops.c2c.fuse(*case.args(), "triton", False)
    other = case.clone_receiver()
    pristine = [t.clone() for t in other.receiver.storage]
    expected = reference_fused(other.clone_receiver())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.c2c.fuse(*other.args(), "triton", False)
    for t, p in zip(other.receiver.storage, pristine):
        t.copy_(p)
    graph.replay()
    torch.cuda.synchronize()
    assert_storage_close(other, expected, torch.bfloat16)
