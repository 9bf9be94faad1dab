"""``c2c.merge`` per backend: adding precomputed corrections into the receiver cache, in place
(a pure memory-bound step: read projection and scale, read-modify-write the rows)."""
import pytest

from c2c_kernels import merge, project
from c2c_kernels.bench.timing import synchronized
from bench_project import _views


@pytest.mark.backends(op="merge")
def test_merge(benchmark, inputs_for, device, backend, tokens):
    inputs = inputs_for(device, tokens)
    receivers, sharers = _views(inputs)
    projection, head_scale = project(receivers, sharers, inputs.receiver_slots, inputs.sharer_slots,
                                     inputs.ckpt.weights, list(range(inputs.fusers)), backend="reference")
    projections, head_scales = list(projection.unbind(0)), list(head_scale.unbind(0))
    row_bytes = receivers[0].shape[2] * receivers[0].shape[3] * receivers[0].element_size()
    benchmark.group = f"merge {device} {tokens} tokens"
    benchmark.extra_info.update(bytes=len(receivers) * inputs.total_tokens * (2 * row_bytes + 4 * projection.shape[2]))
    benchmark(synchronized(lambda: merge(receivers, inputs.receiver_slots, projections, head_scales,
                                         backend=backend), device))
