"""Input builders shared by the tests, the benchmarks and ``c2c-bench``: caches in every engine
layout, ragged requests, padding and token-alignment gathers, from a seed."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import layouts

LAYOUTS = ("hf", "vllm_nhd", "vllm_hnd", "flashinfer_nhd", "flashinfer_hnd",
           "flashinfer_interleaved", "sglang")

# The benchmark workloads of fuser.md: (receiver layers, heads, dim), (sharer layers, heads, dim).
WORKLOADS = {
    "qwen3-0.6b+qwen2.5-0.5b": ((28, 8, 128), (24, 2, 64)),
    "qwen3-0.6b+llama3.2-1b": ((28, 8, 128), (16, 8, 64)),
    "qwen3-0.6b+qwen3-4b": ((28, 8, 128), (36, 8, 128)),
    "qwen3-1.7b+qwen2.5-1.5b": ((28, 8, 128), (28, 2, 128)),
    "qwen3-8b+qwen2.5-7b": ((36, 8, 128), (28, 4, 128)),
}


@dataclass
class Cache:
    """One model's cache: per-layer ``(K, V)`` 4-D views, the tensors that own the memory, and
    the slot of every token (request-major)."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    storage: list[torch.Tensor]
    slots: torch.Tensor
    seq_lens: list[int]


def make_cache(layout: str, num_layers: int, heads: int, head_dim: int, seq_lens: list[int], *,
               page_size: int = 16, dtype=torch.float32, device="cpu", seed: int = 0,
               spare_pages: int = 2) -> Cache:
    """A filled cache holding ``seq_lens[r]`` tokens per request, pages in shuffled order."""
    g = torch.Generator().manual_seed(seed)
    if layout == "hf":
        n = max(seq_lens) + 1  # one unused position after the longest request
        storage = [torch.randn(2, len(seq_lens), heads, n, head_dim, generator=g).to(device, dtype)
                   for _ in range(num_layers)]
        kv = [layouts.hf_views(s[0], s[1]) for s in storage]
        slots = torch.cat([torch.arange(length) + r * n for r, length in enumerate(seq_lens)])
        return Cache(kv, storage, slots.to(device), list(seq_lens))
    if layout == "sglang":
        page_size = 1
    pages_per_req = [-(-length // page_size) for length in seq_lens]
    num_pages = sum(pages_per_req) + spare_pages
    order = torch.randperm(num_pages, generator=g)
    slots, next_page = [], 0
    for length, count in zip(seq_lens, pages_per_req):
        table = order[next_page:next_page + count]
        next_page += count
        pos = torch.arange(length)
        slots.append(table[pos // page_size] * page_size + pos % page_size)
    slots = torch.cat(slots) if slots else torch.zeros(0, dtype=torch.long)

    def fill(shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    storage, kv = [], []
    for _ in range(num_layers):
        if layout in ("vllm_nhd", "vllm_hnd"):
            if layout == "vllm_hnd":  # same logical shape, heads before entries in memory
                t = fill((2, num_pages, heads, page_size, head_dim)).permute(0, 1, 3, 2, 4)
            else:
                t = fill((2, num_pages, page_size, heads, head_dim))
            storage.append(t)
            kv.append(layouts.vllm_views(t))
        elif layout == "flashinfer_nhd":
            pair = (fill((num_pages, page_size, heads, head_dim)), fill((num_pages, page_size, heads, head_dim)))
            storage += list(pair)
            kv.append(layouts.flashinfer_views(pair, "NHD"))
        elif layout == "flashinfer_hnd":
            pair = (fill((num_pages, heads, page_size, head_dim)), fill((num_pages, heads, page_size, head_dim)))
            storage += list(pair)
            kv.append(layouts.flashinfer_views(pair, "HND"))
        elif layout == "flashinfer_interleaved":
            t = fill((num_pages, 2, page_size, heads, head_dim))
            storage.append(t)
            kv.append(layouts.flashinfer_views(t, "NHD"))
        elif layout == "sglang":
            k, v = fill((num_pages, heads, head_dim)), fill((num_pages, heads, head_dim))
            storage += [k, v]
            kv.append(layouts.sglang_views(k, v))
        else:
            raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    return Cache(kv, storage, slots.to(device), list(seq_lens))


def alignment_slots(receiver: Cache, sharer: Cache, *, seed: int = 0, shuffle: bool = True) -> torch.Tensor:
    """Sharer slot for every receiver token: token ``t`` of request ``r`` reads a sharer token
    of the same request (identity when the lengths match and ``shuffle`` is off; otherwise
    repeated and out-of-order tokens, like a tokenizer alignment)."""
    g = torch.Generator().manual_seed(seed + 7)
    out, r_start, s_start = [], 0, 0
    for r_len, s_len in zip(receiver.seq_lens, sharer.seq_lens):
        if shuffle or r_len != s_len:
            idx = torch.randint(0, s_len, (r_len,), generator=g)
        else:
            idx = torch.arange(r_len)
        out.append(sharer.slots.cpu()[s_start + idx])
        r_start, s_start = r_start + r_len, s_start + s_len
    return torch.cat(out).to(sharer.slots.device)


def with_padding(receiver_slots: torch.Tensor, sharer_slots: torch.Tensor, count: int, *, seed: int = 0,
                 slot_dtypes=(torch.int64, torch.int64)):
    """Insert ``count`` padding tokens (receiver slot -1, sharer slot garbage) at random places."""
    g = torch.Generator().manual_seed(seed + 11)
    t = receiver_slots.numel() + count
    pad = torch.zeros(t, dtype=torch.bool)
    pad[torch.randperm(t, generator=g)[:count]] = True
    rs = torch.full((t,), -1, dtype=torch.long)
    ss = torch.full((t,), 10**6, dtype=torch.long)  # never read: its receiver slot is padding
    rs[~pad], ss[~pad] = receiver_slots.cpu(), sharer_slots.cpu()
    dev = receiver_slots.device
    return rs.to(dev, slot_dtypes[0]), ss.to(dev, slot_dtypes[1])
