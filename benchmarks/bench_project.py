"""``c2c.project`` per backend: the fuser network without the merge into the cache."""
import pytest

from c2c_kernels import project
from c2c_kernels.bench.timing import synchronized


def _views(inputs):
    receivers = [view for kv in inputs.receiver.kv for view in kv]
    sharers = [view for kv in inputs.sharer.kv for view in kv]
    return receivers, sharers


@pytest.mark.backends(op="project")
def test_project(benchmark, inputs_for, device, backend, tokens):
    inputs = inputs_for(device, tokens)
    receivers, sharers = _views(inputs)
    fusers = list(range(inputs.fusers))
    benchmark.group = f"project {device} {tokens} tokens"
    benchmark.extra_info.update(flops=inputs.flops())
    benchmark(synchronized(lambda: project(receivers, sharers, inputs.receiver_slots, inputs.sharer_slots,
                                           inputs.ckpt.weights, fusers, backend=backend), device))
