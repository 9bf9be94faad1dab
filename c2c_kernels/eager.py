"""The baseline the kernels are measured against: the fuser as research code runs it.

Per-layer ``nn.Module``s in the model dtype, on HF ``[B, H, N, D]`` caches: transposes and
reshapes to token rows, a concat of sharer and receiver rows, every FFN step as its own op,
new K/V tensors returned (the caller puts them back into its cache). This is what a user
replaces with ``c2c.fuse_all``; it is not the definition of correct (see ``reference.py``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import Checkpoint
from .reference import RMS_EPS
from .weights import FuserWeights


class _RMSNorm(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, z):
        variance = z.float().pow(2).mean(-1, keepdim=True)
        return (z.float() * torch.rsqrt(variance + RMS_EPS)).to(z.dtype) * self.weight


class _FFN(nn.Module):
    def __init__(self, norm, w1, w2):
        super().__init__()
        self.norm = _RMSNorm(norm)
        self.w1 = nn.Linear(w1.shape[1], w1.shape[0], bias=False, device="meta")
        self.w2 = nn.Linear(w2.shape[1], w2.shape[0], bias=False, device="meta")
        self.w1.weight = nn.Parameter(w1, requires_grad=False)
        self.w2.weight = nn.Parameter(w2, requires_grad=False)

    def forward(self, z):
        return z + self.w2(F.gelu(self.w1(self.norm(z))))


def _linear(weight, bias):
    layer = nn.Linear(weight.shape[1], weight.shape[0], device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=False)
    layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


class EagerFuser(nn.Module):
    """One fuser (keys or values) as an ``nn.Module``, sharing the stacked weights' memory."""

    def __init__(self, weights: FuserWeights, index: int):
        super().__init__()
        w = FuserWeights(*(t[index] for t in weights))
        self.input = _linear(torch.cat([w.w_in_sharer, w.w_in_receiver], 1), w.b_in)  # the concat layout of W_in
        self.mlp1 = _FFN(w.ffn_norm[0], w.ffn_w1[0], w.ffn_w2[0])
        self.scalar_mlp = _FFN(w.head_norm, w.head_w1, w.head_w2)
        self.scalar_head = _linear(w.w_head, w.b_head)
        self.proj_mlp = nn.ModuleList(_FFN(w.ffn_norm[b], w.ffn_w1[b], w.ffn_w2[b]) for b in range(1, w.ffn_w1.shape[0]))
        self.proj_out = _linear(w.w_out, w.b_out)
        self.register_buffer("gate_logit", w.gate_logit.clone())

    def forward(self, sharer: torch.Tensor, receiver: torch.Tensor) -> torch.Tensor:
        """``sharer [B, Hs, N, Ds]``, ``receiver [B, Ht, N, Dt]`` -> fused receiver ``[B, Ht, N, Dt]``."""
        b, ht, n, dt = receiver.shape
        s = sharer.transpose(1, 2).reshape(b, n, -1)
        x = receiver.transpose(1, 2).reshape(b, n, -1)
        u = self.mlp1(self.input(torch.cat([s, x], dim=-1)))
        head = torch.sigmoid(self.scalar_head(self.scalar_mlp(u)))  # [B, N, Ht]
        p = u
        for block in self.proj_mlp:
            p = block(p)
        y = self.proj_out(p).view(b, n, ht, dt).transpose(1, 2)
        gate = (self.gate_logit > 0).to(receiver.dtype)
        return receiver + gate * head.transpose(1, 2).unsqueeze(-1) * y


class EagerC2C(nn.Module):
    """Every layer of a checkpoint, K and V, as the research code loops over them."""

    def __init__(self, ckpt: Checkpoint):
        super().__init__()
        self.layers = [(layer.receiver_layer, layer.sharer_layer) for layer in ckpt.layers]
        self.fusers = nn.ModuleList()
        for layer in ckpt.layers:
            self.fusers.append(EagerFuser(ckpt.weights, layer.params.key_fuser))
            self.fusers.append(EagerFuser(ckpt.weights, layer.params.value_fuser))

    @torch.no_grad()
    def forward(self, receiver_kv, sharer_kv):
        """HF caches as lists of ``(K, V)`` ``[B, H, N, D]``; returns the new receiver list."""
        out = list(receiver_kv)
        for i, (rl, sl) in enumerate(self.layers):
            k = self.fusers[2 * i](sharer_kv[sl][0], receiver_kv[rl][0])
            v = self.fusers[2 * i + 1](sharer_kv[sl][1], receiver_kv[rl][1])
            out[rl] = (k, v)
        return out
