"""The FFN-up weights with the RMSNorm gain folded in: ``W_1 diag(g)``, per checkpoint, cached.

``rmsnorm(z) W_1^T = rstd(z) * z (W_1 diag(g))^T``: with the gain folded into the weight, the
FFN-up kernel feeds its A tile (the stored activations) to the tensor cores as loaded, instead
of scaling every A tile by ``g`` in registers on every K step. The fold is computed once per set
of weights (in fp32, rounded once to the weight dtype) and kept. Stale-safe: the key holds each
source tensor's address, shape, strides and version counter, and a hit also needs the very
tensors (weak references: a freed checkpoint's address reused by another one is a miss), so
weights modified in place or replaced get a new fold. At most MAX_FOLDS sets are kept (each
costs one more copy of W_1 and of the head branch's W_1). The eager warm-up call before a
CUDA-graph capture fills the cache; weights first seen inside a capture are folded by the graph
itself at every replay, and not cached.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import NamedTuple

import torch

MAX_FOLDS = 4
_folds: OrderedDict[tuple, tuple] = OrderedDict()  # key -> (weak refs to the sources, Folded)


class Folded(NamedTuple):
    ffn_w1: torch.Tensor  # [P, B, I, H]: ffn_w1 * ffn_norm[:, :, None, :]
    head_w1: torch.Tensor  # [P, H, H]: head_w1 * head_norm[:, None, :]


def _owner(t: torch.Tensor) -> torch.Tensor:
    return t if t._base is None else t._base  # a view made per call still names its stack


def _key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), t.device, t.dtype, tuple(t.shape), t.stride(), t._version)


def _fold(w: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    out = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    for i in range(w.shape[0]):  # one fuser at a time: a small fp32 temporary
        out[i] = (w[i].float() * gain[i].float().unsqueeze(-2)).to(w.dtype)
    return out


def folded(weights) -> Folded:
    """``weights.ffn_w1`` and ``weights.head_w1`` with their norm gains folded in."""
    sources = (weights.ffn_w1, weights.ffn_norm, weights.head_w1, weights.head_norm)
    key = tuple(_key(t) for t in sources)
    hit = _folds.get(key)
    if hit is not None and all(ref() is _owner(t) for ref, t in zip(hit[0], sources)):
        _folds.move_to_end(key)
        return hit[1]
    fold = Folded(_fold(weights.ffn_w1, weights.ffn_norm), _fold(weights.head_w1, weights.head_norm))
    if weights.ffn_w1.is_cuda and torch.cuda.is_current_stream_capturing():
        return fold  # computed by the graph at each replay, never in memory before: not cached
    _folds[key] = (tuple(weakref.ref(_owner(t)) for t in sources), fold)
    _folds.move_to_end(key)
    if len(_folds) > MAX_FOLDS:
        _folds.popitem(last=False)
    return fold
