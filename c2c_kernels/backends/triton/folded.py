"""Per-checkpoint folds of the stored weights, computed once and cached.

Two folds, both exact rewrites of the fuser's math:

- The FFN-up weights with the RMSNorm gain folded in, ``W_1 diag(g)``:
  ``rmsnorm(z) W_1^T = rstd(z) * z (W_1 diag(g))^T``. The FFN-up kernel feeds its A tile (the
  stored activations) to the tensor cores as loaded, instead of scaling every A tile by ``g`` in
  registers on every K step. Computed in fp32, rounded once to the weight dtype.
- The weight branch's second GEMM folded into the head weights, ``V = W_head W_2h``: the branch's
  output ``w = u + W_2h g`` (``g = gelu(W_1h rmsnorm(u))``) is only used through
  ``a = W_head w + b_head``, so ``a = W_head u + V g + b_head``. ``V`` is ``[P, Ht, H]``: with it
  the ``[tokens, H] x [H, H]`` GEMM of ``W_2h`` disappears (ffn_up.py's head-logit variant
  multiplies its GELU tile by ``V`` instead of storing it). ``V`` is accumulated in fp64 (no
  TF32 whatever torch's matmul precision setting) and kept in fp32: it is small (32 KB per
  fuser at Ht = 8, H = 1024) and rounding it to 16 bits would cost accuracy.

Stale-safe: the key holds each source tensor's address, shape, strides and version counter,
and a hit also needs the very tensors (weak references: a freed checkpoint's address reused by
another one is a miss), so weights modified in place or replaced get new folds. At most
MAX_FOLDS sets are kept (each costs one more copy of W_1 and of the head branch's W_1, and
``V``). The eager warm-up call before a CUDA-graph capture fills the cache; weights first seen
inside a capture are folded by the graph itself at every replay, and not cached. A cached fold
used while capturing is also kept in ``_captured`` for the process: the graph replays its
addresses, so it must stay allocated after its cache entry goes (weights updated in place,
freed, or evicted by other checkpoints). Such a graph replays the fold it captured: capture
again after updating weights in place.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import NamedTuple

import torch

MAX_FOLDS = 4
_folds: OrderedDict[tuple, tuple] = OrderedDict()  # key -> (weak refs to the sources, Folded)
_captured: list = []  # Folded sets a CUDA-graph capture used: never freed (see above)


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


class Folded(NamedTuple):
    ffn_w1: torch.Tensor  # [P, B, I, H]: ffn_w1 * ffn_norm[:, :, None, :]
    head_w1: torch.Tensor  # [P, H, H]: head_w1 * head_norm[:, None, :]
    head_v: torch.Tensor  # [P, Ht, H] fp32: w_head @ head_w2


def _owner(t: torch.Tensor) -> torch.Tensor:
    return t if t._base is None else t._base  # a view made per call still names its stack


def _key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), t.device, t.dtype, tuple(t.shape), t.stride(), t._version)


def _fold(w: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    out = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    for i in range(w.shape[0]):  # one fuser at a time: a small fp32 temporary
        out[i] = (w[i].float() * gain[i].float().unsqueeze(-2)).to(w.dtype)
    return out


def _head_fold(w_head: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``V[p] = w_head[p] @ w2[p]``, ``[P, Ht, H]`` fp32, one fuser at a time (an ``[H, H]``
    fp64 temporary, not ``P`` of them)."""
    out = torch.empty(w_head.shape, dtype=torch.float32, device=w_head.device)
    for i in range(w_head.shape[0]):
        out[i] = (w_head[i].double() @ w2[i].double()).float()
    return out


def folded(weights) -> Folded:
    """``weights.ffn_w1`` and ``weights.head_w1`` with their norm gains folded in, and the head
    weights times the weight branch's second FFN weight."""
    sources = (weights.ffn_w1, weights.ffn_norm, weights.head_w1, weights.head_norm, weights.w_head,
               weights.head_w2)
    key = tuple(_key(t) for t in sources)
    hit = _folds.get(key)
    capturing = _capturing(weights.ffn_w1)
    if hit is not None and all(ref() is _owner(t) for ref, t in zip(hit[0], sources)):
        _folds.move_to_end(key)
        if capturing and not any(f is hit[1] for f in _captured):
            _captured.append(hit[1])
        return hit[1]
    fold = Folded(_fold(weights.ffn_w1, weights.ffn_norm), _fold(weights.head_w1, weights.head_norm),
                  _head_fold(weights.w_head, weights.head_w2))
    if capturing:
        return fold  # computed by the graph at each replay, never in memory before: not cached
    _folds[key] = (tuple(weakref.ref(_owner(t)) for t in sources), fold)
    _folds.move_to_end(key)
    if len(_folds) > MAX_FOLDS:
        _folds.popitem(last=False)
    return fold
