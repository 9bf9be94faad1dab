"""The whole fuse (every fused layer, K and V, in one ``c2c.fuse_all``) per backend, and the
research-style eager fuser on the same rows for comparison."""
import pytest

from c2c_kernels.bench import runners
from c2c_kernels.bench.timing import synchronized


@pytest.mark.backends(extra=(runners.EAGER,))
def test_fuse(benchmark, inputs_for, device, backend, tokens):
    inputs = inputs_for(device, tokens)
    benchmark.group = f"fuse {device} {tokens} tokens"
    benchmark.extra_info.update(flops=inputs.flops(), bytes=inputs.bytes())
    benchmark(synchronized(runners.make_call(backend, inputs), device))
