"""What c2c-bench measures: the workloads of docs/fuser.md (or a custom shape) built into the inputs
of one ``fuse_all`` call with the shared test builders, and the FLOPs and bytes of that call.

Weights are random (``random_weights``, from a seed): nothing is downloaded. Only the first
``layers`` fused layers of a workload are built; the cost of a call is linear in that count.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..checkpoint import Checkpoint, last_aligned_map, make_checkpoint
from ..reference import flops_per_token, weight_bytes
from ..testing import LAYOUTS, Cache, alignment_slots, make_cache
from ..weights import random_weights

# Short names for the two cache families; any engine layout of testing.LAYOUTS is accepted too.
LAYOUT_ALIASES = {"contiguous": "hf", "paged": "vllm_nhd"}
LAYOUT_CHOICES = (*LAYOUT_ALIASES, *LAYOUTS)
PAGE_SIZE = 16

# The benchmark workloads of docs/fuser.md: (receiver layers, heads, dim), (sharer layers, heads, dim).
WORKLOADS = {
    "qwen3-0.6b+qwen2.5-0.5b": ((28, 8, 128), (24, 2, 64)),
    "qwen3-0.6b+llama3.2-1b": ((28, 8, 128), (16, 8, 64)),
    "qwen3-0.6b+qwen3-4b": ((28, 8, 128), (36, 8, 128)),
    "qwen3-1.7b+qwen2.5-1.5b": ((28, 8, 128), (28, 2, 128)),
    "qwen3-8b+qwen2.5-7b": ((36, 8, 128), (28, 4, 128)),
}


@dataclass(frozen=True)
class Workload:
    """A receiver/sharer pair: ``(layers, kv heads, head dim)`` each, and the fuser's size."""

    name: str
    receiver: tuple[int, int, int]
    sharer: tuple[int, int, int]
    hidden: int = 1024
    intermediate: int = 1024
    depth: int = 3  # the fuser's num_layers

    @property
    def fused_layers(self) -> int:
        """Receiver layers with a partner under the last-aligned map, unclamped: the workloads of
        docs/fuser.md count only those (24 for the first pair), as every earlier figure did."""
        return len(last_aligned_map(self.receiver[0], self.sharer[0], clamp=False))


def named_workload(name: str) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"workload: expected one of {list(WORKLOADS)}, got {name!r}")
    receiver, sharer = WORKLOADS[name]
    return Workload(name, receiver, sharer)


@dataclass
class Inputs:
    """One ``fuse_all`` call: checkpoint, both caches, slots, and its cost model."""

    workload: Workload
    layers: int
    requests: int
    tokens: int  # per request
    layout: str
    ckpt: Checkpoint
    receiver: Cache
    sharer: Cache
    receiver_slots: torch.Tensor
    sharer_slots: torch.Tensor
    pristine: Cache  # the receiver as built: timed runs fuse into `receiver` over and over

    @property
    def total_tokens(self) -> int:
        return self.requests * self.tokens

    @property
    def fusers(self) -> int:
        return 2 * self.layers  # keys and values of every layer

    @property
    def dtype(self) -> torch.dtype:
        return self.ckpt.weights.dtype

    @property
    def device(self) -> torch.device:
        return self.ckpt.weights.device

    def flops(self) -> int:
        """GEMM FLOPs of the call (elementwise work ignored)."""
        return flops_per_token(self.ckpt.weights) * self.total_tokens * self.fusers

    def weight_bytes(self) -> int:
        return weight_bytes(self.ckpt.weights, range(self.fusers))

    def bytes(self) -> int:
        """The least a call must move: every weight once, each sharer row read, each receiver
        row read and written, and the slots. The same for every backend, so GB/s compare."""
        w = self.ckpt.weights
        row = w.sharer_width + 2 * w.receiver_width
        cache = self.fusers * self.total_tokens * row * w.w_in_sharer.element_size()
        slots = self.total_tokens * (self.receiver_slots.element_size() + self.sharer_slots.element_size())
        return self.weight_bytes() + cache + slots

    def fresh_receiver(self) -> Cache:
        """A copy of the receiver cache as built (views rebuilt on the copy)."""
        return copy.deepcopy(self.pristine)

    def hf_inputs(self, receiver: Cache | None = None):
        """Receiver and sharer rows as research code holds them: per layer ``(K, V)``
        contiguous ``[requests, heads, tokens, dim]`` tensors (a gather, done once)."""
        receiver = receiver or self.pristine
        return (_as_hf(receiver, self.receiver_slots, self.requests, self.tokens),
                _as_hf(self.sharer, self.sharer_slots, self.requests, self.tokens))


def _as_hf(cache: Cache, slots: torch.Tensor, requests: int, tokens: int):
    out = []
    for kv in cache.kv:
        pair = []
        for view in kv:
            s = slots.long()
            rows = view[s // view.shape[1], s % view.shape[1]]  # [T, H, D]
            pair.append(rows.reshape(requests, tokens, *rows.shape[1:]).transpose(1, 2).contiguous())
        out.append(tuple(pair))
    return out


_weights_cache: dict = {}


def weights_for(workload: Workload, layers: int, dtype: torch.dtype, device, seed: int = 0):
    """The stacked weights of the first ``layers`` fused layers (K and V), kept for reuse
    across token counts (generating a full workload's weights takes seconds)."""
    key = (workload, layers, dtype, str(device), seed)
    if key not in _weights_cache:
        _weights_cache.clear()  # one set alive at a time: full workloads hold GBs
        _, rh, rd = workload.receiver
        _, sh, sd = workload.sharer
        _weights_cache[key] = random_weights(
            2 * layers, sh, sd, rh, rd, workload.hidden, workload.intermediate, workload.depth,
            dtype=dtype, device=device, seed=seed)
    return _weights_cache[key]


def build_inputs(workload: Workload, *, layers: int, tokens: int, requests: int = 1,
                 dtype=torch.bfloat16, layout: str = "contiguous", device="cpu", seed: int = 0) -> Inputs:
    """Inputs of ``requests`` prompts of ``tokens`` tokens each, same tokenizer on both sides
    (sharer token t feeds receiver token t: the research code's case, so eager runs too)."""
    if not 1 <= layers <= workload.fused_layers:
        raise ValueError(f"layers: {workload.name} has {workload.fused_layers} fused layers, got {layers}")
    engine_layout = LAYOUT_ALIASES.get(layout, layout)
    if engine_layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {list(LAYOUT_CHOICES)}, got {layout!r}")
    weights = weights_for(workload, layers, dtype, device, seed)
    sharer_heads = workload.sharer[1]
    ckpt = make_checkpoint(weights, {layer: layer for layer in range(layers)}, sharer_heads)
    seq_lens = [tokens] * requests
    receiver = make_cache(engine_layout, layers, *workload.receiver[1:], seq_lens, page_size=PAGE_SIZE,
                          dtype=dtype, device=device, seed=seed + 1)
    sharer = make_cache(engine_layout, layers, *workload.sharer[1:], seq_lens, page_size=PAGE_SIZE,
                        dtype=dtype, device=device, seed=seed + 2)
    sharer_slots = alignment_slots(receiver, sharer, shuffle=False)
    return Inputs(workload, layers, requests, tokens, layout, ckpt, receiver, sharer, receiver.slots,
                  sharer_slots, copy.deepcopy(receiver))
