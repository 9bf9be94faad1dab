"""The packed weight format every backend reads.

A *fuser* is one projector side (keys or values). All fusers of a checkpoint have the same
shapes, so their weights are stacked along a leading fuser dimension ``P`` once, at load
time: a backend computes any subset of fusers in one launch per stage, and the weights of a
single layer are zero-copy ``select`` views of the stacks.

Linear weights keep the ``nn.Linear`` layout ``[out_features, in_features]``: row-major with
the reduction dimension contiguous, which is what both cuBLAS (``B^T``) and Triton tiles want.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class FuserWeights(NamedTuple):
    """Stacked weights of ``P`` fusers. Shapes use ``Ks = Hs*Ds``, ``Kt = Ht*Dt``."""

    w_in_sharer: torch.Tensor  # [P, H, Ks]     sharer half of the input Linear
    w_in_receiver: torch.Tensor  # [P, H, Kt]   receiver half of the input Linear
    b_in: torch.Tensor  # [P, H]
    ffn_norm: torch.Tensor  # [P, B, H]         B = n - 1 blocks: FFN_1, then the projection blocks
    ffn_w1: torch.Tensor  # [P, B, I, H]
    ffn_w2: torch.Tensor  # [P, B, H, I]
    head_norm: torch.Tensor  # [P, H]           the weight branch's FFN (inner width H)
    head_w1: torch.Tensor  # [P, H, H]
    head_w2: torch.Tensor  # [P, H, H]
    w_head: torch.Tensor  # [P, Ht, H]          one logit per receiver head
    b_head: torch.Tensor  # [P, Ht]
    w_out: torch.Tensor  # [P, Kt, H]
    b_out: torch.Tensor  # [P, Kt]
    gate_logit: torch.Tensor  # [P] fp32        hard gate at inference: open iff > 0

    @property
    def num_fusers(self) -> int:
        return self.w_in_sharer.shape[0]

    @property
    def hidden_dim(self) -> int:
        return self.w_in_sharer.shape[1]

    @property
    def intermediate_dim(self) -> int:
        return self.ffn_w1.shape[2]

    @property
    def num_blocks(self) -> int:
        """FFN blocks on the projection path (FFN_1 plus the ``n - 2`` projection blocks)."""
        return self.ffn_w1.shape[1]

    @property
    def sharer_width(self) -> int:
        return self.w_in_sharer.shape[2]

    @property
    def receiver_width(self) -> int:
        return self.w_in_receiver.shape[2]

    @property
    def receiver_heads(self) -> int:
        return self.w_head.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.w_in_sharer.dtype

    @property
    def device(self) -> torch.device:
        return self.w_in_sharer.device

    def to(self, device=None, dtype=None) -> "FuserWeights":
        """Move/cast every stack; the gate logits stay fp32 (only their sign matters)."""
        return FuserWeights(*(
            t.to(device=device, dtype=torch.float32 if name == "gate_logit" else dtype)
            for name, t in zip(self._fields, self)
        ))



def random_weights(
    num_fusers: int,
    sharer_heads: int,
    sharer_head_dim: int,
    receiver_heads: int,
    receiver_head_dim: int,
    hidden_dim: int = 1024,
    intermediate_dim: int = 1024,
    num_layers: int = 3,
    *,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    seed: int = 0,
    gates_open: bool | list[bool] = True,
) -> FuserWeights:
    """Random fuser weights scaled like a trained fuser (activations stay O(1)).

    Used by tests and benchmarks: nothing is downloaded.
    """
    if num_layers < 3:
        raise ValueError(f"num_layers must be >= 3 (fuser.md), got {num_layers}")
    g = torch.Generator().manual_seed(seed)
    ks, kt = sharer_heads * sharer_head_dim, receiver_heads * receiver_head_dim
    h, i, b, p = hidden_dim, intermediate_dim, num_layers - 1, num_fusers

    def lin(*shape):
        return torch.randn(*shape, generator=g) / shape[-1] ** 0.5

    def vec(*shape, scale=0.1, mean=0.0):
        return mean + scale * torch.randn(*shape, generator=g)

    if isinstance(gates_open, bool):
        gates_open = [gates_open] * p
    if len(gates_open) != p:
        raise ValueError(f"gates_open has {len(gates_open)} entries, expected {p}")
    gate = torch.tensor([1.0 if o else -1.0 for o in gates_open]) * (0.5 + torch.rand(p, generator=g))
    w = FuserWeights(
        w_in_sharer=lin(p, h, ks) / 2**0.5,
        w_in_receiver=lin(p, h, kt) / 2**0.5,
        b_in=vec(p, h),
        ffn_norm=vec(p, b, h, mean=1.0),
        ffn_w1=lin(p, b, i, h),
        ffn_w2=lin(p, b, h, i) * 0.5,
        head_norm=vec(p, h, mean=1.0),
        head_w1=lin(p, h, h),
        head_w2=lin(p, h, h) * 0.5,
        w_head=lin(p, receiver_heads, h),
        b_head=vec(p, receiver_heads),
        w_out=lin(p, kt, h) * 0.5,
        b_out=vec(p, kt),
        gate_logit=gate,
    )
    return w.to(device=device, dtype=dtype)
