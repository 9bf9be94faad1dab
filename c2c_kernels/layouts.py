"""Each engine's KV cache as 4-D ``[page, entry, head, dim]`` views plus slots, without copies.

A slot ``s`` addresses page ``s // view.size(1)``, entry ``s % view.size(1)``; a negative
receiver slot is padding. Every function here returns views (``permute``, ``unbind``,
``unsqueeze``, indexing with ints) of the caller's storage, never copies, so writing through
them writes the engine's cache. Slot builders return int64 unless they pass an engine's own
slot tensor through (which may be int32).
"""
from __future__ import annotations

import torch

Views = tuple[torch.Tensor, torch.Tensor]


# ---- Hugging Face transformers ---------------------------------------------------------------

def hf_views(keys: torch.Tensor, values: torch.Tensor) -> Views:
    """``[B, H, N, D]`` keys and values (one layer of a ``DynamicCache``) -> ``[B, N, H, D]`` views."""
    for name, t in (("keys", keys), ("values", values)):
        if t.dim() != 4:
            raise ValueError(f"{name}: expected a [batch, heads, tokens, head_dim] tensor, got shape {list(t.shape)}")
    return keys.permute(0, 2, 1, 3), values.permute(0, 2, 1, 3)


def dynamic_cache_views(cache) -> list[Views]:
    """Per-layer views of a ``DynamicCache`` (the ``layers`` API of current ``transformers``,
    the ``key_cache``/``value_cache`` lists of older releases) or of a list of ``(K, V)``."""
    if hasattr(cache, "layers"):
        pairs = [(layer.keys, layer.values) for layer in cache.layers]
    elif hasattr(cache, "key_cache"):
        pairs = list(zip(cache.key_cache, cache.value_cache))
    else:
        pairs = list(cache)
    return [hf_views(k, v) for k, v in pairs]


def hf_slots(attention_mask: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Slots ``b * N + n`` of an HF cache for a ``[B, N]`` attention mask; masked positions
    (left or right padding) get -1. ``tokens`` (bool ``[B, N]``) narrows the fused tokens
    further, e.g. to the prompt."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask: expected [batch, tokens], got shape {list(attention_mask.shape)}")
    b, n = attention_mask.shape
    slots = torch.arange(b * n, device=attention_mask.device).view(b, n)
    keep = attention_mask.bool() if tokens is None else attention_mask.bool() & tokens.bool()
    return torch.where(keep, slots, -1).reshape(-1)


# ---- vLLM (flash-attention backend) ----------------------------------------------------------

def vllm_views(kv_cache: torch.Tensor) -> Views:
    """``kv_cache[2, blocks, block_size, H, D]`` (NHD, or HND by strides) -> K and V views."""
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(f"kv_cache: expected [2, blocks, block_size, heads, head_dim], got {list(kv_cache.shape)}")
    k, v = kv_cache.unbind(0)
    return k, v


def vllm_hnd_cache(num_blocks, block_size, heads, head_dim, **kw) -> torch.Tensor:
    """A vLLM HND cache: logical shape ``[2, blocks, block_size, H, D]``, heads before entries in memory."""
    return torch.empty(2, num_blocks, heads, block_size, head_dim, **kw).permute(0, 1, 3, 2, 4)


def vllm_slot_mapping(block_table: torch.Tensor, positions: torch.Tensor, requests: torch.Tensor,
                      block_size: int) -> torch.Tensor:
    """vLLM's ``slot_mapping``: ``block_table[r, pos // bs] * bs + pos % bs``; a negative
    position gives a padding slot (-1)."""
    pos = positions.long().clamp_min(0)
    blocks = block_table[requests.long(), pos // block_size].long()
    return torch.where(positions >= 0, blocks * block_size + pos % block_size, -1)


# ---- FlashInfer -----------------------------------------------------------------------------

def flashinfer_views(paged_kv_cache, layout: str = "NHD") -> Views:
    """A FlashInfer paged cache as K and V views.

    Accepts ``(k, v)`` each ``[pages, page_size, H, D]`` (NHD) or ``[pages, H, page_size, D]``
    (HND), or one interleaved tensor ``[pages, 2, page_size, H, D]`` / ``[pages, 2, H, page_size, D]``.
    """
    if layout not in ("NHD", "HND"):
        raise ValueError(f"layout: expected 'NHD' or 'HND', got {layout!r}")
    if isinstance(paged_kv_cache, torch.Tensor):
        if paged_kv_cache.dim() != 5 or paged_kv_cache.shape[1] != 2:
            raise ValueError(f"paged_kv_cache: expected [pages, 2, ...] (5-D), got {list(paged_kv_cache.shape)}")
        k, v = paged_kv_cache[:, 0], paged_kv_cache[:, 1]
    else:
        k, v = paged_kv_cache
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"paged_kv_cache {name}: expected a 4-D page tensor, got {list(t.shape)}")
    if layout == "HND":
        k, v = k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
    return k, v


def flashinfer_slots(kv_indptr: torch.Tensor, kv_indices: torch.Tensor, page_size: int,
                     batch_indices: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Slot of token ``positions[t]`` of request ``batch_indices[t]``:
    ``kv_indices[kv_indptr[b] + pos // ps] * ps + pos % ps`` (as FlashInfer appends)."""
    b, pos = batch_indices.long(), positions.long()
    pages = kv_indices[kv_indptr[b].long() + pos // page_size].long()
    return pages * page_size + pos % page_size


def flashinfer_batch_positions(kv_indptr: torch.Tensor, kv_last_page_len: torch.Tensor, page_size: int,
                               num_tokens: torch.Tensor | None = None):
    """``(batch_indices, positions)`` of every token held by each request (or of its last
    ``num_tokens[b]`` tokens, e.g. the ones just appended). One host sync for the total."""
    pages = (kv_indptr[1:] - kv_indptr[:-1]).long()
    seq_lens = torch.where(pages > 0, (pages - 1) * page_size + kv_last_page_len.long(), 0)
    counts = seq_lens if num_tokens is None else num_tokens.long()
    batch = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    starts = torch.cumsum(counts, 0) - counts
    offset = torch.arange(len(batch), device=counts.device) - starts[batch]
    return batch, seq_lens[batch] - counts[batch] + offset


# ---- SGLang ---------------------------------------------------------------------------------

def sglang_views(k_buffer: torch.Tensor, v_buffer: torch.Tensor) -> Views:
    """One layer of SGLang's token pool, ``[size, H, D]`` each -> page-size-1 views. Slots are
    ``out_cache_loc`` / ``req_to_token[r, pos]`` as they are (slot 0 is SGLang's dummy)."""
    for name, t in (("k_buffer", k_buffer), ("v_buffer", v_buffer)):
        if t.dim() != 3:
            raise ValueError(f"{name}: expected [size, heads, head_dim], got {list(t.shape)}")
    return k_buffer.unsqueeze(1), v_buffer.unsqueeze(1)
