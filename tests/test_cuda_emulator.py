"""The CPU emulator that runs csrc/cuda in CI (csrc/cuda/emulator): its barriers and shuffles
give the right block sums, its atomics are atomic, and the faults a GPU would raise are reported, not run through."""
import pytest

from c2c_kernels import backends

EMULATOR_REASON = backends.reason("cuda_emulator")
emulator = backends.get("cuda_emulator") if EMULATOR_REASON is None else None
requires_emulator = pytest.mark.skipif(EMULATOR_REASON is not None, reason=str(EMULATOR_REASON))


@requires_emulator
@pytest.mark.parametrize("blocks,threads", [(1, 32), (3, 64), (2, 96), (2, 1024), (5, 160)])
def test_block_sum_through_barriers_and_shuffles(blocks, threads):
    values = [float(i % 7) - 2.0 for i in range(blocks * threads)]
    want = [sum(values[b * threads:(b + 1) * threads]) for b in range(blocks)]
    assert emulator.selftest("block_sum", blocks, threads) == want


@requires_emulator
@pytest.mark.parametrize("blocks,threads", [(1, 1), (1, 32), (4, 96)])
def test_atomics(blocks, threads):
    """atomicCAS lets exactly one thread of the grid set a flag and counts through a CAS loop;
    atomicMin keeps the minimum over every thread (status buffers and prepare_slots use both)."""
    assert emulator.selftest("atomics", blocks, threads) == [1.0, 1.0, 0.0]


@requires_emulator
@pytest.mark.parametrize("name,blocks,threads,message", [
    ("misaligned", 1, 1, "misaligned 16-byte access at csrc/cuda/common.cuh:\\d+, block \\(0, 0, 0\\), thread \\(0, 0, 0\\)"),
    ("late_barrier", 2, 32, "__syncthreads in a block of a kernel whose first block met no barrier"),
    ("exited_lane", 1, 32, "__shfl_xor_sync with a lane that did not take part"),
    ("throwing", 1, 8, "exception in a kernel thread: thread 3 failed"),
    ("launch", 1, 1025, "1025 threads per block"),
    ("launch", 0, 32, "grid \\(0, 1, 1\\), outside CUDA's limits"),
])
def test_faults_are_reported(name, blocks, threads, message):
    with pytest.raises(RuntimeError, match=f"cuda emulator: .*{message}"):
        emulator.selftest(name, blocks, threads)


@requires_emulator
def test_a_fault_does_not_leak_into_the_next_launch():
    with pytest.raises(RuntimeError):
        emulator.selftest("misaligned", 1, 1)
    assert emulator.selftest("block_sum", 1, 64) == [sum(float(i % 7) - 2.0 for i in range(64))]


@requires_emulator
def test_not_in_available_and_never_auto():
    import torch
    assert "cuda_emulator" not in backends.available()
    assert "cuda_emulator" in backends.available("cpu", emulators=True)
    assert backends.resolve("auto", torch.device("cpu")).__name__.split(".")[-1] != "cuda_emulator"


def test_builds_when_asked():
    """With C2C_CUDA_EMULATOR=1 (set by conftest) a failed build fails here rather than
    quietly skipping every emulator test."""
    import os
    if os.environ.get("C2C_CUDA_EMULATOR") != "1":
        pytest.skip("C2C_CUDA_EMULATOR is not 1")
    reason = backends.reason("cuda_emulator")
    assert reason is None, reason
