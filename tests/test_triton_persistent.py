"""Persistent GEMM stages of the Triton backend: each launch has at most one program per CTA the
GPU holds at once (SMs times the config's CTAs per SM), and every program loops over tiles
with a stride of the grid. In the interpreter the grid is capped at a few programs
(configs.INTERPRET_PROGRAMS), so the test shapes run more tiles than programs: every tile must
be computed exactly once, whatever the grid (one program doing all tiles included)."""
import pytest
import torch

from c2c_kernels import backends, reference
from c2c_kernels.testing import assert_storage_close, make_case, reference_fused

pytestmark = pytest.mark.skipif(backends.reason("triton") is not None or "cpu" not in backends.devices("triton"),
                                reason="triton interpreter not enabled")


def _record_grids(monkeypatch, programs_cap):
    """Cap the interpreter's grid at ``programs_cap`` and record (tiles, programs) per launch."""
    from c2c_kernels.backends.triton import configs
    monkeypatch.setattr(configs, "INTERPRET_PROGRAMS", programs_cap)
    grids, programs = [], configs.programs

    def spy(tiles, meta, device):
        grids.append((tiles, programs(tiles, meta, device)))
        return grids[-1][1]
    monkeypatch.setattr(configs, "programs", spy)
    return grids


@pytest.mark.parametrize("programs_cap", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fuse_with_fewer_programs_than_tiles(monkeypatch, programs_cap, dtype):
    grids = _record_grids(monkeypatch, programs_cap)
    # 4 entries, 2 token tiles of 64 (70 + 3 tokens + padding): 8 tiles per GEMM launch.
    case = make_case(seed=91, dtype=dtype, seq_lens=(70, 3), padding=3)
    expected = reference_fused(case)
    torch.ops.c2c.fuse(*case.args(), "triton", False)
    assert_storage_close(case, expected, dtype)
    # input GEMM, FFN_1 (up, down), weight branch (up, with the head logits: its W_2 is folded
    # into W_head), 1 projection block (up, down), output.
    assert len(grids) == 7, grids
    assert all(p == min(t, programs_cap) for t, p in grids), grids
    assert all(t > p for t, p in grids), "every launch should have more tiles than programs"


@pytest.mark.parametrize("programs_cap", [1, 3])
def test_project_with_fewer_programs_than_tiles(monkeypatch, programs_cap):
    grids = _record_grids(monkeypatch, programs_cap)
    # 2 token tiles, and receiver rows 64 wide: the head scales come from column tile 0 only.
    case = make_case(seed=92, seq_lens=(60, 9), padding=2, receiver_heads=4, receiver_dim=32)
    projection, head_scale = torch.ops.c2c.project(*case.args(), "triton", False)
    expected_projection, expected_scale = reference.project(case.receiver_caches, case.sharer_caches,
                                                            case.receiver_slots, case.sharer_slots, case.weights,
                                                            case.fusers)
    torch.testing.assert_close(projection, expected_projection, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(head_scale, expected_scale, atol=2e-4, rtol=2e-4)
    assert grids and all(t > p == programs_cap for t, p in grids), grids


def test_grid_is_sms_times_ctas_per_sm(monkeypatch):
    """On a GPU: min(tiles, SMs x CTAs per SM), the SM count from the device properties."""
    from c2c_kernels.backends.triton import configs
    monkeypatch.setattr(configs, "INTERPRET", False)
    monkeypatch.setattr(configs, "_sm_count", lambda index: 132)
    device = torch.device("cuda", 0)
    assert configs.programs(23 * 132, {"CTAS_PER_SM": 1}, device) == 132
    assert configs.programs(23 * 132, {"CTAS_PER_SM": 2}, device) == 264
    assert configs.programs(40, {"CTAS_PER_SM": 2}, device) == 40
    # CTAs per SM: by shared memory (two 96 KB pipelines fit in 227 KB, two 128 KB ones do not)
    # and by registers at 255 per thread (two 4-warp CTAs always fit, two 8-warp ones not).
    four = configs._config(64, 128, 64, 4, 4)  # 96 KB of bf16 tiles
    assert configs._ctas_per_sm(four, 2, 232448) == 2
    assert configs._ctas_per_sm(four, 2, 166912) == 1
    assert configs._ctas_per_sm(configs._config(64, 64, 128, 4, 4), 2, 232448) == 1  # 128 KB
    assert configs._ctas_per_sm(configs._config(128, 128, 64, 8, 3), 2, 232448) == 1
