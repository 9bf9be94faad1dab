"""Launch geometry and compile-time constants of the Triton backend, in the interpreter: tokens
on grid axis x of the merge (axes y and z stop at 65535 programs), the head dim and a
power-of-two page size as constexprs (a cache whose page is a whole sequence, whose size changes
with every length, keeps the runtime division: no recompilation per length), both paths right."""
import pytest
import torch
import triton

from c2c_kernels import backends, reference
from c2c_kernels.testing import assert_storage_close, make_case, reference_fused

pytestmark = pytest.mark.skipif(backends.reason("triton") is not None or "cpu" not in backends.devices("triton"),
                                reason="triton interpreter not enabled")


class _Spy:
    """Stands in for a ``@triton.jit`` kernel: records each launch's grid and keyword constants."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_merge_puts_tokens_on_grid_axis_x(monkeypatch):
    from c2c_kernels.backends.triton import cache_merge, configs
    spy = _Spy(cache_merge.merge_kernel)
    monkeypatch.setattr(cache_merge, "merge_kernel", spy)
    case = make_case(seed=81, seq_lens=(40, 30), padding=2)  # 72 tokens, 32 columns
    tokens, width = case.receiver_slots.shape[0], case.weights.receiver_width
    g = torch.Generator().manual_seed(3)
    projections = list(torch.randn(len(case.receiver_caches), tokens, width, generator=g).unbind(0))
    heads = case.weights.receiver_heads
    head_scales = list(torch.rand(len(case.receiver_caches), tokens, heads, generator=g).unbind(0))
    expected = case.clone_receiver()
    reference.merge(expected.receiver_caches, expected.receiver_slots, projections, head_scales)
    torch.ops.c2c.merge(case.receiver_caches, case.receiver_slots, projections, head_scales, "triton", False)
    assert_storage_close(case, expected, torch.float32)
    (grid, meta), = spy.launches
    bm, bn = configs.MERGE_BLOCK
    assert grid == (triton.cdiv(tokens, bm), triton.cdiv(width, bn), len(case.receiver_caches))
    assert meta["HEAD_DIM"] == case.receiver_caches[0].shape[3] and meta["PAGE_SIZE"] == 4


@pytest.mark.parametrize("page_size,constexpr", [(4, 4), (5, 0)])
def test_page_size_constexpr_and_runtime_paths(monkeypatch, page_size, constexpr):
    from c2c_kernels.backends.triton import _common, input_gemm, output_gemm
    assert _common.page_constexpr(page_size) == constexpr
    spies = {}
    for module, name in ((input_gemm, "_tuned"), (output_gemm, "output_gemm_kernel")):
        spies[name] = _Spy(getattr(module, name))
        monkeypatch.setattr(module, name, spies[name])
    case = make_case(seed=82, page_size=page_size, sharer_page_size=8, receiver_dim=8, sharer_dim=16)
    expected = reference_fused(case)
    torch.ops.c2c.fuse(*case.args(), "triton", False)
    assert_storage_close(case, expected, torch.float32)
    (_, meta), = spies["_tuned"].launches
    assert (meta["RECEIVER_PAGE_SIZE"], meta["SHARER_PAGE_SIZE"]) == (constexpr, 8)
    assert (meta["RECEIVER_HEAD_DIM"], meta["SHARER_HEAD_DIM"]) == (8, 16)
    (_, meta), = spies["output_gemm_kernel"].launches
    assert (meta["PAGE_SIZE"], meta["HEAD_DIM"]) == (constexpr, 8)


def test_folded_norm_gain_is_cached_and_stale_safe():
    """The FFN-up weight with the RMSNorm gain folded in is computed once per checkpoint, and
    again when the gain or the weight changes in place or is replaced (never a stale fold)."""
    from c2c_kernels.backends.triton import folded
    case = make_case(seed=83, dtype=torch.bfloat16)
    w = case.weights
    first = folded.folded(w)
    assert folded.folded(w) is first, "the same weights must reuse their fold"
    want = (w.ffn_w1.float() * w.ffn_norm.float()[:, :, None, :]).to(w.dtype)
    assert torch.equal(first.ffn_w1, want)
    assert torch.equal(first.head_w1, (w.head_w1.float() * w.head_norm.float()[:, None, :]).to(w.dtype))

    expected = reference_fused(case)
    torch.ops.c2c.fuse(*case.args(), "triton", False)
    assert_storage_close(case, expected, torch.bfloat16)

    w.ffn_norm.mul_(1.5)  # in place: the version counter moves
    w.head_norm[1].add_(0.25)  # through a view of the same stack
    second = folded.folded(w)
    assert second is not first
    assert torch.equal(second.ffn_w1, (w.ffn_w1.float() * w.ffn_norm.float()[:, :, None, :]).to(w.dtype))
    assert torch.equal(second.head_w1, (w.head_w1.float() * w.head_norm.float()[:, None, :]).to(w.dtype))
    case = make_case(seed=84, dtype=torch.bfloat16)
    case.weights = w
    expected = reference_fused(case)
    torch.ops.c2c.fuse(*case.args(), "triton", False)
    assert_storage_close(case, expected, torch.bfloat16)


@pytest.mark.parametrize("sharer_dim,receiver_dim,one_loop", [
    (32, 8, True),   # both views vectorised; sharer width 96: its second K step is masked at 96
    (6, 8, False),   # the sharer view is not vectorisable (head dim 6): a loop per side
    (6, 6, False),   # neither is
])
def test_input_gemm_runs_one_k_loop_over_sharer_and_receiver(monkeypatch, sharer_dim, receiver_dim, one_loop):
    """Aligned views: one pipelined K loop over the sharer then the receiver columns (per step a
    scalar choice of view and weight), instead of a loop per side that drains the pipeline."""
    from c2c_kernels.backends.triton import input_gemm
    calls = {"one": 0, "per_side": 0}

    def counted(name, fn):
        def call(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return call
    monkeypatch.setattr(input_gemm, "_one_k_loop", counted("one", input_gemm._one_k_loop))
    monkeypatch.setattr(input_gemm, "_gathered_times_weight",
                        counted("per_side", input_gemm._gathered_times_weight))
    case = make_case(seed=83, sharer_heads=3, sharer_dim=sharer_dim, receiver_dim=receiver_dim)
    expected = reference_fused(case)
    torch.ops.c2c.fuse(*case.args(), "triton", False)
    assert_storage_close(case, expected, torch.float32)
    tiles = len(case.fusers)  # one token tile and one hidden tile per entry
    assert calls == ({"one": tiles, "per_side": 0} if one_loop else {"one": 0, "per_side": 2 * tiles}), calls
