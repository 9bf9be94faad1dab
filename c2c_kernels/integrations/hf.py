"""C2C generation with Hugging Face ``transformers`` models, on top of ``c2c.fuse_all``.

    import c2c_kernels as c2c
    from c2c_kernels.integrations.hf import C2CModel, Sharer

    fuser = c2c.load_checkpoint("path/to/fuser")
    c2c_model = C2CModel(receiver, receiver_tokenizer, [Sharer(sharer, fuser, sharer_tokenizer)])
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    print(c2c_model.generate_text([messages], max_new_tokens=64))

The pipeline is the one C2C fusers are trained with (the research pipeline; ``docs/hf.md``
lists each behaviour and the test that pins it): prompts are laid out for every model
(:mod:`.alignment`), the receiver prefills them section by section and each fused section is
fused in place, from the sharers' caches, before the next section is prefilled; then the
receiver decodes on the fused cache. With ``include_response=True`` the final section and every
decoded token are fused too, one ``c2c.fuse_all`` call per step (:class:`DecodeFusion`). Caches
are fused through zero-copy views (:func:`c2c_kernels.layouts.dynamic_cache_views`); the only
copy is the clean receiver cache ``include_response`` decodes on. ``transformers`` itself is only
needed by the caller, who brings the models.
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from .. import layouts
from ..api import fuse_all
from ..checkpoint import Checkpoint, last_aligned_map, make_checkpoint
from ..weights import random_weights
from .alignment import (IGNORE_INDEX, STRATEGIES, AlignedPrompt, TokenMap, align_messages, align_offsets,
                        all_sharers, apply_template, identity_alignment, pad_id, training_prompt, whole_prompt)

# ---- transformers API differences ------------------------------------------------------------


def cache_argument(model) -> str:
    """The keyword a model's ``forward``/``generate`` take the cache by: ``cache`` in current
    ``transformers``, ``past_key_values`` in older releases."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(output):
    """The cache of a model output, under its current or its older name."""
    cache = output.get("cache")
    return cache if cache is not None else output["past_key_values"]


def kv_geometry(model_or_config) -> tuple[int, int, int]:
    """``(layers, KV heads, head dim)`` of a model or its config."""
    config = getattr(model_or_config, "config", model_or_config)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


# ---- prompts ---------------------------------------------------------------------------------


Section = tuple  # (start column, end column, sharer bitmask or -1)


@dataclass
class PromptBatch:
    """Token ids of a batch of prompts for the receiver and for each sharer.

    ``sharer_columns[j]`` is ``[B, N]``: the column of sharer ``j``'s tokens that each receiver
    column reads (:mod:`.alignment`). Padding may be anywhere a mask says so.

    ``position_ids`` (``[B, N]``; None: counted over ``attention_mask``) may count tokens the
    mask hides (the section padding of :func:`.alignment.align_messages`); ``sharer_position_ids``
    likewise per sharer (None: the receiver's when the sharer's columns are the receiver's,
    else counted over its mask). ``sections[b]`` lists prompt ``b``'s ``(start, end, sharers)``
    column ranges in order (the research pipeline's ``kv_cache_index``: ``sharers`` is a
    bitmask, bit ``j`` = sharer ``j``, or -1 for none); the last one is the prompt's final
    section, not fused at prefill. None: every token but the last, fused with every sharer.
    ``labels`` (``[B, N]``, training batches only): the token each column is trained to
    predict, -100 for none (:func:`.alignment.training_prompt`).
    """

    input_ids: Tensor  # [B, N] receiver tokens
    attention_mask: Tensor  # [B, N]
    sharer_input_ids: list[Tensor]  # [B, Ns_j] per sharer
    sharer_attention_masks: list[Tensor]
    sharer_columns: list[Tensor]  # [B, N] int64 per sharer
    position_ids: Tensor | None = None
    sharer_position_ids: list[Tensor] | None = None
    sections: list[list[Section]] | None = None
    labels: Tensor | None = None

    @classmethod
    def same_tokens(cls, input_ids: Tensor, attention_mask: Tensor | None = None,
                    num_sharers: int = 1) -> "PromptBatch":
        """Every model reads the same token ids (one tokenizer, or a benchmark)."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        columns = identity_alignment(mask)
        return cls(input_ids, mask, [input_ids] * num_sharers, [mask] * num_sharers, [columns] * num_sharers)

    @classmethod
    def from_kv_cache_index(cls, input_ids, kv_cache_index, *, attention_mask=None, position_ids=None,
                            sharer_input_ids=None, sharer_attention_masks=None,
                            num_sharers: int = 1) -> "PromptBatch":
        """A batch from the research pipeline's inputs: ``kv_cache_index`` is its list of
        ``[B, length, 2]`` tensors, one per section, whose ``[b, 0, 0]`` is prompt ``b``'s
        selection (-1: no fusion, > 0: sharer bitmask). Sharers read the receiver's ids unless
        ``sharer_input_ids`` (aligned column by column, ``[B, N]`` each) are given."""
        batch, tokens = input_ids.shape
        lengths = [int(k.shape[1]) for k in kv_cache_index]
        if not lengths or sum(lengths) != tokens:
            raise ValueError(f"kv_cache_index: its sections hold {sum(lengths)} tokens, input_ids has {tokens}")
        selections = [k[:, 0, 0].tolist() if k.shape[1] else [-1] * batch for k in kv_cache_index]
        sections, start = [[] for _ in range(batch)], 0
        for length, selection in zip(lengths, selections):
            for b in range(batch):
                if length:
                    sections[b].append((start, start + length, int(selection[b]) if selection[b] > 0 else -1))
            start += length
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        if sharer_input_ids is None:
            sharer_input_ids, sharer_attention_masks = [input_ids] * num_sharers, [mask] * num_sharers
        elif sharer_attention_masks is None:
            sharer_attention_masks = [torch.ones_like(s) for s in sharer_input_ids]
        for j, ids in enumerate(sharer_input_ids):
            if tuple(ids.shape) != (batch, tokens):
                raise ValueError(f"sharer_input_ids[{j}]: shape {list(ids.shape)}, expected [{batch}, {tokens}] "
                                 f"(one sharer token per receiver token)")
        columns = identity_alignment(mask)
        return cls(input_ids, mask, list(sharer_input_ids), list(sharer_attention_masks),
                   [columns] * len(sharer_input_ids), position_ids, None, sections)

    def to(self, device) -> "PromptBatch":
        move = (lambda t: None if t is None else t.to(device))
        return PromptBatch(self.input_ids.to(device), self.attention_mask.to(device),
                           [t.to(device) for t in self.sharer_input_ids],
                           [t.to(device) for t in self.sharer_attention_masks],
                           [t.to(device) for t in self.sharer_columns], move(self.position_ids),
                           None if self.sharer_position_ids is None else [move(t) for t in self.sharer_position_ids],
                           self.sections, move(self.labels))

    # -- derived --

    def receiver_positions(self) -> Tensor:
        return positions(self.attention_mask) if self.position_ids is None else self.position_ids

    def sharer_positions(self, j: int) -> Tensor:
        if self.sharer_position_ids is not None and self.sharer_position_ids[j] is not None:
            return self.sharer_position_ids[j]
        if self.sharer_input_ids[j].shape == self.input_ids.shape and self.position_ids is not None:
            return self.position_ids
        return positions(self.sharer_attention_masks[j])

    def row_sections(self, num_sharers: int) -> list[list[Section]]:
        """Every prompt's sections (the default when ``sections`` is None), checked."""
        batch, tokens = self.input_ids.shape
        if self.sections is None:
            mask = self.attention_mask.bool().cpu()
            out = []
            for b in range(batch):
                real = mask[b].nonzero().flatten().tolist()
                if not real:
                    raise ValueError(f"attention_mask: row {b} holds no tokens; every prompt needs at least one")
                first, last = real[0], real[-1]
                out.append(([(first, last, all_sharers(num_sharers))] if last > first else []) + [(last, last + 1, -1)])
            return out
        if len(self.sections) != batch:
            raise ValueError(f"sections: {len(self.sections)} rows, expected one per prompt ({batch})")
        for b, row in enumerate(self.sections):
            prev = 0
            if not row:
                raise ValueError(f"sections[{b}]: empty; every prompt needs at least its final section")
            for start, end, _ in row:
                if not (prev <= start < end <= tokens):
                    raise ValueError(f"sections[{b}]: ({start}, {end}) is not an ordered, non-empty range of the "
                                     f"{tokens} columns")
                prev = end
        return [list(row) for row in self.sections]


def _layout(lengths: Sequence[tuple[int, int]], padding_side: str):
    """Columns of each prompt's body (all but its final section) and final section: every final
    section ends in the last column, every body ends before the first final section starts;
    ``padding_side`` puts the bodies' padding before them ("left") or after them ("right")."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side: expected 'left' or 'right', got {padding_side!r}")
    body_max = max(b for b, _ in lengths)
    total = body_max + max(t for _, t in lengths)
    return total, [((body_max - b) if padding_side == "left" else 0, total - t) for b, t in lengths]


def _place(rows, lengths, offsets, total: int, fill, dtype=torch.long) -> Tensor:
    out = torch.full((len(rows), total), fill, dtype=dtype)
    for b, (row, (body, _), (at_body, at_tail)) in enumerate(zip(rows, lengths, offsets)):
        row = torch.as_tensor(row, dtype=dtype)
        out[b, at_body:at_body + body] = row[:body]
        out[b, at_tail:at_tail + row.numel() - body] = row[body:]
    return out


def batch_aligned(prompts: Sequence[AlignedPrompt], pad: int, sharer_pads: Sequence[int], *,
                  padding_side: str = "left") -> PromptBatch:
    """A :class:`PromptBatch` of aligned prompts: sharer columns are the receiver's; positions
    count section padding and skip batch padding (see :func:`_layout`)."""
    lengths = [(p.sections[-1][0], len(p.input_ids) - p.sections[-1][0]) for p in prompts]
    total, offsets = _layout(lengths, padding_side)
    place = (lambda rows, fill, dtype=torch.long: _place(rows, lengths, offsets, total, fill, dtype))
    ids = place([p.input_ids for p in prompts], pad)
    mask = place([[not x for x in p.pads] for p in prompts], 0)
    counted = place([[1] * len(p.input_ids) for p in prompts], 0)
    position_ids = (counted.cumsum(-1) - 1).clamp_min(0)
    sharers = len(sharer_pads)
    s_ids = [place([p.sharer_input_ids[j] for p in prompts], sharer_pads[j]) for j in range(sharers)]
    s_masks = [place([[not x for x in p.sharer_pads[j]] for p in prompts], 0) for j in range(sharers)]
    sections = []
    for p, (body, _), (at_body, at_tail) in zip(prompts, lengths, offsets):
        sections.append([(a + (at_body if a < body else at_tail - body), e + (at_body if a < body else at_tail - body),
                          m) for a, e, m in p.sections])
    columns = identity_alignment(mask)
    labels = None
    if all(p.labels is not None for p in prompts):
        labels = place([p.labels for p in prompts], IGNORE_INDEX)
    return PromptBatch(ids, mask, s_ids, s_masks, [columns] * sharers, position_ids, [position_ids] * sharers,
                       sections, labels)


def tokenize(tokenizer, texts: Sequence[str], *, padding_side: str = "left", offsets: bool = False,
             add_special_tokens: bool = True):
    """``tokenizer(texts)`` padded on ``padding_side``, as tensors (with offsets if asked)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side: expected 'left' or 'right', got {padding_side!r}")
    if offsets and not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"tokenizer {type(tokenizer).__name__}: aligning two tokenizers needs character "
                         f"offsets, which only fast tokenizers return (use_fast=True)")
    saved = tokenizer.padding_side
    tokenizer.padding_side = padding_side
    try:
        enc = tokenizer(list(texts), padding=True, return_tensors="pt", return_offsets_mapping=offsets,
                        add_special_tokens=add_special_tokens)
    finally:
        tokenizer.padding_side = saved
    empty = (enc["attention_mask"].sum(-1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"texts[{empty[0]}]: tokenizes to no tokens; every prompt needs at least one")
    return enc


def _is_messages(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(
        isinstance(m, dict) and "role" in m for m in prompt)


def _prompt_list(prompts) -> tuple[list, bool]:
    """``(prompts, are_messages)`` from a text, a list of texts, one conversation (a list of
    ``{"role", "content"}``) or a list of conversations."""
    if isinstance(prompts, str):
        return [prompts], False
    if _is_messages(prompts):
        return [list(prompts)], True
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts: empty; pass a text, a list of texts, or chat messages")
    if all(isinstance(p, str) for p in prompts):
        return prompts, False
    if all(_is_messages(p) for p in prompts):
        return [list(p) for p in prompts], True
    for i, p in enumerate(prompts):
        if not (isinstance(p, str) or _is_messages(p)):
            raise ValueError(f"prompts[{i}]: expected a text or a list of {{'role', 'content'}} messages, got "
                             f"{type(p).__name__}")
    raise ValueError("prompts: mixes texts and chat messages; pass one kind per batch")


# ---- the fusion of a prefilled cache ---------------------------------------------------------


def _layer_views(cache, name: str, batch: int, tokens: int | None):
    kv = layouts.dynamic_cache_views(cache)
    if not kv:
        raise ValueError(f"{name}: the cache holds no layers (was it prefilled?)")
    tokens = kv[0][0].shape[1] if tokens is None else tokens
    for i, (k, _) in enumerate(kv):
        if k.shape[0] != batch or k.shape[1] != tokens:
            raise ValueError(f"{name}: layer {i} holds {k.shape[0]} sequences x {k.shape[1]} tokens, expected "
                             f"{batch} x {tokens} (sliding-window or compressed caches are not supported)")
    return kv


def fuse_prompt_cache(checkpoints: Checkpoint | Sequence[Checkpoint], receiver_cache, fused_mask: Tensor,
                      sharer_caches, sharer_columns, *, mode: str = "parallel", backend: str = "auto",
                      check_slots: bool = False) -> None:
    """Fuse the sharers' caches into the prefilled receiver cache, in place.

    ``receiver_cache`` is a ``DynamicCache`` (either cache API) or a list of ``(K, V)``, each
    ``[B, H, N, D]``; ``fused_mask`` ``[B, N]`` marks the tokens to fuse (prompt tokens, not
    padding). ``sharer_caches[j]`` / ``sharer_columns[j]`` (``[B, N]``) give sharer ``j``'s cache
    and the column each receiver column reads. One checkpoint per sharer; with several,
    ``mode`` is as in :func:`c2c_kernels.fuse_all`.
    """
    single = isinstance(checkpoints, Checkpoint)
    ckpts = [checkpoints] if single else list(checkpoints)
    if single:
        sharer_caches, sharer_columns = [sharer_caches], [sharer_columns]
    if not (len(sharer_caches) == len(sharer_columns) == len(ckpts)):
        raise ValueError(f"checkpoints, sharer_caches and sharer_columns: expected one entry per sharer, got "
                         f"{len(ckpts)}, {len(sharer_caches)} and {len(sharer_columns)}")
    if fused_mask.dim() != 2:
        raise ValueError(f"fused_mask: expected [batch, tokens], got {list(fused_mask.shape)}")
    batch, tokens = fused_mask.shape
    receiver_kv = _layer_views(receiver_cache, "receiver_cache", batch, tokens)
    receiver_slots = layouts.hf_slots(fused_mask)
    sharer_kvs, sharer_slots = [], []
    for j, (cache, columns) in enumerate(zip(sharer_caches, sharer_columns)):
        kv = _layer_views(cache, f"sharer_caches[{j}]", batch, None)
        if tuple(columns.shape) != (batch, tokens):
            raise ValueError(f"sharer_columns[{j}]: shape {list(columns.shape)}, expected [{batch}, {tokens}] "
                             f"like fused_mask")
        rows = torch.arange(batch, device=columns.device).unsqueeze(1) * kv[0][0].shape[1]
        sharer_kvs.append(kv)
        sharer_slots.append((rows + columns.long()).reshape(-1))
    if single:
        fuse_all(ckpts[0], receiver_kv, sharer_kvs[0], receiver_slots, sharer_slots[0], backend=backend,
                 check_slots=check_slots)
    else:
        fuse_all(ckpts, receiver_kv, sharer_kvs, receiver_slots, sharer_slots, mode=mode, backend=backend,
                 check_slots=check_slots)


def selected_sharers(selection: int, count: int) -> list[int]:
    """The sharers a section's selection names: bit ``j`` of a positive bitmask is sharer ``j``
    (the research pipeline's ``kv_cache_index``); -1 names none."""
    return [j for j in range(count) if selection > 0 and selection & (1 << j)]


# ---- caches ----------------------------------------------------------------------------------

_CACHE_CLASS = None


def fusing_cache():
    """An empty ``DynamicCache`` whose next ``update`` can store given rows instead of the ones
    the model computed: set ``cache.replacement = [(K, V) per layer]`` (``[B, H, T, D]`` each)
    before a forward over ``T`` tokens. Every attention layer of ``transformers`` writes its new
    rows through ``cache.update`` before attending, so the forward attends to the replacement
    rows (the fused rows of the tokens it is computing) and stores them."""
    global _CACHE_CLASS
    if _CACHE_CLASS is None:
        from transformers import DynamicCache

        class FusingCache(DynamicCache):
            replacement = None

            def update(self, key_states, value_states, layer_idx, *args, **kwargs):
                if self.replacement is not None:
                    key_states, value_states = self.replacement[layer_idx]
                return super().update(key_states, value_states, layer_idx, *args, **kwargs)

        _CACHE_CLASS = FusingCache
    return _CACHE_CLASS()


def set_layer(cache, layer: int, keys: Tensor, values: Tensor) -> None:
    """Replace one layer's ``[B, H, N, D]`` keys and values of a ``DynamicCache`` (either cache
    API) by other tensors, e.g. fused rows that carry an autograd graph: the next forward
    appends to them and attends to them."""
    if hasattr(cache, "layers"):
        cache.layers[layer].keys, cache.layers[layer].values = keys, values
    elif hasattr(cache, "key_cache"):
        cache.key_cache[layer], cache.value_cache[layer] = keys, values
    else:
        raise ValueError(f"cache: a {type(cache).__name__} is not a DynamicCache")


def _hf_layers(cache) -> list[tuple[Tensor, Tensor]]:
    """``(K, V)`` ``[B, H, N, D]`` per layer (views of the cache's own tensors)."""
    return [(k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)) for k, v in layouts.dynamic_cache_views(cache)]


def clone_cache(cache):
    """A :func:`fusing_cache` holding copies of ``cache``'s rows."""
    out = fusing_cache()
    for layer, (k, v) in enumerate(_hf_layers(cache)):
        out.update(k.clone(), v.clone(), layer)
    return out


# ---- prefill and decode ----------------------------------------------------------------------


def positions(attention_mask: Tensor) -> Tensor:
    """Position ids that count only real tokens (as ``generate`` derives them)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def prefill(model, input_ids: Tensor, attention_mask: Tensor, cache=None, *, position_ids: Tensor | None = None):
    """Run the decoder stack (no LM head) over the tokens; returns the filled cache.
    ``attention_mask`` covers the cached columns and the new ones; ``position_ids`` the new ones
    (default: counted over the mask)."""
    if position_ids is None:
        position_ids = positions(attention_mask)[:, -input_ids.shape[1]:]
    kwargs = {} if cache is None else {cache_argument(model): cache}
    output = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=True, **kwargs)
    return output_cache(output)


def split_last_token(input_ids: Tensor, attention_mask: Tensor):
    """``(prompt_ids, prompt_mask, last_tokens)``: each prompt minus its last token (masked out,
    trailing all-padding columns dropped), and that last token ``[B, 1]``."""
    mask = attention_mask.bool()
    columns = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask, columns, -1).amax(-1, keepdim=True)
    empty = (last < 0).flatten().nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"attention_mask: row {empty[0]} holds no tokens; every prompt needs at least one")
    prompt_mask = mask & (columns != last)
    kept = int(torch.where(prompt_mask, columns + 1, 0).max()) if mask.numel() else 0
    return input_ids[:, :kept], prompt_mask[:, :kept], input_ids.gather(1, last.clamp_min(0))


@dataclass
class Prefilled:
    """A fused receiver cache and the inputs that continue it.

    ``input_ids``/``attention_mask`` are the prompt columns the cache holds followed by each
    prompt's last token: pass them with the cache to ``generate``, which feeds only that last
    token. ``cache`` is None when every prompt is one token long (nothing to fuse).
    """

    cache: Any
    input_ids: Tensor
    attention_mask: Tensor

    @property
    def cached_columns(self) -> int:
        return self.input_ids.shape[1] - 1


@dataclass
class Sharer:
    """A sharer model, the fuser checkpoint that maps it into the receiver, and its tokenizer
    (None: it reads the receiver's tokens). ``index`` picks the sharer of a checkpoint whose
    layer map names several (None: the checkpoint maps exactly one)."""

    model: Any
    checkpoint: Checkpoint
    tokenizer: Any = None
    index: int | None = None


def _one_sharer(ckpt: Checkpoint, index: int | None, name: str) -> Checkpoint:
    named = sorted({s for sharers in ckpt.mapping.values() for s in sharers})
    if index is None:
        if len(named) != 1:
            raise ValueError(f"{name}: the checkpoint maps sharers {named}; pass Sharer(index=...) to pick one")
        return ckpt
    if index not in named:
        raise ValueError(f"{name}.index = {index}: the checkpoint maps sharers {named}")
    mapping = {r: {index: sharers[index]} for r, sharers in ckpt.mapping.items() if index in sharers}
    return dataclasses.replace(ckpt, mapping=mapping)


def _check_fit(ckpt: Checkpoint, receiver, sharer, name: str) -> None:
    """The checkpoint's layer map and widths against both models, before any prompt runs."""
    r_layers, r_heads, r_dim = kv_geometry(receiver)
    s_layers, s_heads, s_dim = kv_geometry(sharer)
    w = ckpt.weights
    if (w.receiver_heads, w.receiver_width) != (r_heads, r_heads * r_dim):
        raise ValueError(f"{name}.checkpoint: its fusers write {w.receiver_heads} heads x "
                         f"{w.receiver_width // w.receiver_heads} dims, the receiver has {r_heads} x {r_dim}")
    if w.sharer_width != s_heads * s_dim:
        raise ValueError(f"{name}.checkpoint: its fusers read sharer rows of {w.sharer_width} values, the "
                         f"sharer model has {s_heads} KV heads x {s_dim} = {s_heads * s_dim}")
    for layer in ckpt.layers:
        if layer.receiver_layer >= r_layers:
            raise ValueError(f"{name}.checkpoint: fuses receiver layer {layer.receiver_layer}, the receiver "
                             f"has {r_layers} layers")
        if layer.sharer_layer >= s_layers:
            raise ValueError(f"{name}.checkpoint: reads sharer layer {layer.sharer_layer}, the sharer has "
                             f"{s_layers} layers")


class DecodeFusion:
    """The fusion of the newest row of every request, for all mapped layers at once.

    Holds fixed buffers: ``receiver_rows[l]`` (``[B, H, T, D]`` K and V of every receiver
    layer: the rows to fuse, then the fused rows) and the sharer rows the fusers read.
    :meth:`load` copies rows in from caches, :meth:`fuse` runs one ``c2c.fuse_all`` call over
    the buffers with fixed slots: no host sync, and, the buffers and slots being fixed, it can
    be captured in a CUDA graph and replayed after each :meth:`load`.
    """

    def __init__(self, checkpoints: Sequence[Checkpoint], receiver, sharers: Sequence, batch: int, *,
                 tokens: int = 1, mode: str = "parallel", backend: str = "auto", check_slots: bool = False,
                 device=None, dtype=None):
        """``receiver`` / ``sharers``: models or their configs (then pass ``device`` and ``dtype``)."""
        layers, heads, dim = kv_geometry(receiver)
        device = receiver.device if device is None else torch.device(device)
        dtype = receiver.dtype if dtype is None else dtype
        self.checkpoints, self.mode, self.backend, self.check_slots = list(checkpoints), mode, backend, check_slots
        self.batch, self.tokens = batch, tokens
        self.receiver_rows = [(torch.empty(batch, heads, tokens, dim, device=device, dtype=dtype),
                               torch.empty(batch, heads, tokens, dim, device=device, dtype=dtype))
                              for _ in range(layers)]
        self.sharer_rows = []
        for ckpt, model in zip(self.checkpoints, sharers):
            s_layers, s_heads, s_dim = kv_geometry(model)
            needed = {layer.sharer_layer for layer in ckpt.layers}
            self.sharer_rows.append([
                (torch.empty(batch, s_heads, tokens, s_dim, device=device, dtype=dtype),
                 torch.empty(batch, s_heads, tokens, s_dim, device=device, dtype=dtype)) if i in needed else None
                for i in range(s_layers)])
        self.slots = torch.arange(batch * tokens, device=device)
        self._receiver_views = [layouts.hf_views(k, v) for k, v in self.receiver_rows]
        self._sharer_views = [[None if kv is None else layouts.hf_views(*kv) for kv in rows]
                              for rows in self.sharer_rows]

    def load(self, receiver_cache, sharer_caches, *, start: int | None = None,
             sharer_columns: Sequence[Tensor] | None = None) -> None:
        """Copy the receiver rows of columns ``[start, start + T)`` (default: the last ``T``)
        of every layer, and for each sharer the rows of ``sharer_columns[j]`` (``[B, T]``;
        default: its last ``T`` columns)."""
        t = self.tokens
        for (k_buf, v_buf), (k, v) in zip(self.receiver_rows, _hf_layers(receiver_cache)):
            a = k.shape[2] - t if start is None else start
            k_buf.copy_(k[:, :, a:a + t]), v_buf.copy_(v[:, :, a:a + t])
        for j, (rows, cache) in enumerate(zip(self.sharer_rows, sharer_caches)):
            layers = _hf_layers(cache)
            for i, kv in enumerate(rows):
                if kv is None:
                    continue
                k, v = layers[i]
                if sharer_columns is None:
                    kv[0].copy_(k[:, :, -t:]), kv[1].copy_(v[:, :, -t:])
                else:
                    index = sharer_columns[j].long()[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
                    kv[0].copy_(k.gather(2, index)), kv[1].copy_(v.gather(2, index))

    def fuse(self, receiver_slots: Tensor | None = None) -> None:
        """One ``c2c.fuse_all`` over the buffers. ``receiver_slots`` (``b * T + t``, -1 to skip;
        default: every row) narrows the fused rows."""
        slots = self.slots if receiver_slots is None else receiver_slots
        if len(self.checkpoints) == 1:
            fuse_all(self.checkpoints[0], self._receiver_views, self._sharer_views[0], slots, self.slots,
                     backend=self.backend, check_slots=self.check_slots)
        else:
            fuse_all(self.checkpoints, self._receiver_views, self._sharer_views, slots,
                     [self.slots] * len(self.checkpoints), mode=self.mode, backend=self.backend,
                     check_slots=self.check_slots)


GENERATION_OPTIONS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
                      "eos_token_id", "pad_token_id", "return_dict_in_generate", "output_logits", "output_scores")


class C2CModel:
    """A receiver model that decodes on its cache fused with one or more sharers' caches.

    By default it reproduces the research C2C pipeline (see ``docs/hf.md``): prompts given as
    texts or chat messages are laid out with ``alignment="research"`` (each model's chat
    template, message-by-message alignment, one sharer token per receiver token chosen by
    ``strategy``), prefilled section by section with each section fused before the next is
    prefilled, and, with ``include_response=True``, the final prompt section and every decoded
    token are fused too (by ``response_sharers``, default the first sharer, as the research
    code does). ``alignment="offsets"`` keeps the character-coverage alignment of
    :func:`.alignment.align_offsets`. ``mode`` combines several sharers (``"parallel"``: every
    correction from the clean cache; ``"sequential"``: one after another); ``backend`` picks
    the fusion kernels.
    """

    def __init__(self, receiver, tokenizer, sharers: Sequence[Sharer], *, mode: str = "parallel",
                 backend: str = "auto", check_slots: bool = False, alignment: str = "research",
                 strategy: str = "first", include_response: bool = False,
                 response_sharers: Sequence[int] = (0,)):
        if mode not in ("parallel", "sequential"):
            raise ValueError(f"mode: expected 'parallel' or 'sequential', got {mode!r}")
        if alignment not in ("research", "offsets"):
            raise ValueError(f"alignment: expected 'research' or 'offsets', got {alignment!r}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
        self.receiver, self.tokenizer, self.sharers = receiver, tokenizer, list(sharers)
        self.mode, self.backend, self.check_slots = mode, backend, check_slots
        self.alignment, self.strategy, self.include_response = alignment, strategy, include_response
        response_sharers = list(response_sharers)
        for j in response_sharers:
            if not (isinstance(j, int) and 0 <= j < max(len(self.sharers), 1)):
                raise ValueError(f"response_sharers: {j} is not a sharer index (the model has "
                                 f"{len(self.sharers)} sharers)")
        self.response_sharers = response_sharers[:len(self.sharers)]
        device, dtype = receiver.device, receiver.dtype
        self.checkpoints = []
        for j, sharer in enumerate(self.sharers):
            name = f"sharers[{j}]"
            if (sharer.model.device, sharer.model.dtype) != (device, dtype):
                raise ValueError(f"{name}.model: on {sharer.model.device} in {sharer.model.dtype}, the receiver "
                                 f"on {device} in {dtype}; the fusers read both caches in one dtype and device")
            ckpt = _one_sharer(sharer.checkpoint, sharer.index, name)
            _check_fit(ckpt, receiver, sharer.model, name)
            if (ckpt.weights.device, ckpt.weights.dtype) != (device, dtype):
                ckpt = ckpt.to(device=device, dtype=dtype)  # once, not per prompt
            self.checkpoints.append(ckpt)
        self._maps: dict[int, TokenMap] = {}
        self._tables: dict[int, Tensor] = {}

    # -- inputs --

    def _own_tokenizer(self, j: int) -> bool:
        tok = self.sharers[j].tokenizer
        return tok is not None and tok is not self.tokenizer

    def token_map(self, j: int) -> TokenMap | None:
        """Sharer ``j``'s :class:`TokenMap` (None: it reads the receiver's tokens)."""
        if not self._own_tokenizer(j):
            return None
        if j not in self._maps:
            self._maps[j] = TokenMap(self.tokenizer, self.sharers[j].tokenizer, self.strategy)
        return self._maps[j]

    def _table(self, j: int, size: int) -> Tensor | None:
        """Sharer ``j``'s token of every receiver id, on the device (decoded tokens)."""
        token_map = self.token_map(j)
        if token_map is None:
            return None
        if j not in self._tables or self._tables[j].numel() < size:
            self._tables[j] = token_map.table(size, self.receiver.device)
        return self._tables[j]

    def tokenize(self, prompts, *, padding_side: str = "left", add_special_tokens: bool = True,
                 add_generation_prompt: bool = True, enable_thinking: bool = False) -> PromptBatch:
        """Lay prompts out for the receiver and every sharer.

        ``prompts``: a text, a list of texts, one conversation (a list of ``{"role",
        "content"}`` messages) or a list of conversations. Texts are tokenized as they are
        (``add_special_tokens``); conversations through each tokenizer's chat template
        (``add_generation_prompt``, ``enable_thinking``). Every prompt's final section ends in
        the last column; ``padding_side`` places the padding of the rest.
        """
        if self.tokenizer is None:
            raise ValueError("tokenizer: this C2CModel has none; pass token ids as a PromptBatch instead of texts")
        items, are_messages = _prompt_list(prompts)
        n = len(self.sharers)
        own = [self._own_tokenizer(j) for j in range(n)]
        sharer_pads = [pad_id(self.sharers[j].tokenizer) if own[j] else pad_id(self.tokenizer) for j in range(n)]
        template = dict(add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking)
        if are_messages and (self.alignment == "offsets" or not any(own)):
            # One tokenizer (or character coverage): the receiver's templated text is the prompt.
            items = [apply_template(self.tokenizer, m, **template)[0] for m in items]
        if self.alignment == "offsets" and any(own):
            return self._tokenize_offsets(items, padding_side, add_special_tokens, sharer_pads)
        prompts_out = []
        for i, item in enumerate(items):
            if are_messages and any(own):
                prompt = align_messages(self.tokenizer, [s.tokenizer for s in self.sharers], item,
                                        strategy=self.strategy, maps=[self.token_map(j) for j in range(n)],
                                        **template)
            else:
                ids = self.tokenizer(item, add_special_tokens=add_special_tokens)["input_ids"]
                if not ids:
                    raise ValueError(f"texts[{i}]: tokenizes to no tokens; every prompt needs at least one")
                mapped = [ids if self.token_map(j) is None else self.token_map(j)(ids) for j in range(n)]
                prompt = whole_prompt(ids, mapped, all_sharers(n))
            prompts_out.append(prompt)
        return batch_aligned(prompts_out, pad_id(self.tokenizer), sharer_pads,
                             padding_side=padding_side).to(self.receiver.device)

    def tokenize_training(self, conversations, *, padding_side: str = "left", enable_thinking: bool = False,
                          max_length: int | None = None) -> PromptBatch:
        """Lay conversations out for training (:func:`.alignment.training_prompt`): the last
        message is the response; the batch carries ``labels`` and the sections the research
        recipe trains with, for the receiver and every sharer, as :meth:`tokenize` lays prompts
        out (same alignment, same token maps, same batch layout)."""
        if self.tokenizer is None:
            raise ValueError("tokenizer: this C2CModel has none; training needs the receiver's tokenizer")
        if self.alignment != "research":
            raise ValueError("alignment: training follows the research alignment; build the model with "
                             "alignment='research'")
        if _is_messages(conversations):
            conversations = [conversations]
        n = len(self.sharers)
        own = [self._own_tokenizer(j) for j in range(n)]
        sharer_pads = [pad_id(self.sharers[j].tokenizer) if own[j] else pad_id(self.tokenizer) for j in range(n)]
        prompts = [training_prompt(self.tokenizer, [s.tokenizer for s in self.sharers], list(c),
                                   strategy=self.strategy, enable_thinking=enable_thinking,
                                   maps=[self.token_map(j) for j in range(n)], max_length=max_length)
                   for c in conversations]
        return batch_aligned(prompts, pad_id(self.tokenizer), sharer_pads,
                             padding_side=padding_side).to(self.receiver.device)

    def _tokenize_offsets(self, texts, padding_side, add_special_tokens, sharer_pads) -> PromptBatch:
        enc = [self.tokenizer(t, add_special_tokens=add_special_tokens, return_offsets_mapping=True) for t in texts]
        for i, e in enumerate(enc):
            if not e["input_ids"]:
                raise ValueError(f"texts[{i}]: tokenizes to no tokens; every prompt needs at least one")
        n = len(self.sharers)
        prompts = [whole_prompt(e["input_ids"], [e["input_ids"]] * n, all_sharers(n)) for e in enc]
        batch = batch_aligned(prompts, pad_id(self.tokenizer), sharer_pads, padding_side=padding_side)
        lengths = [(len(e["input_ids"]) - 1, 1) for e in enc]
        total, offsets = _layout(lengths, padding_side)
        r_offsets = torch.stack([_place([[o[side] for o in e["offset_mapping"]] for e in enc], lengths, offsets,
                                        total, 0) for side in (0, 1)], -1)
        for j in range(n):
            if not self._own_tokenizer(j):
                continue
            s_enc = tokenize(self.sharers[j].tokenizer, texts, padding_side=padding_side, offsets=True,
                             add_special_tokens=add_special_tokens)
            batch.sharer_input_ids[j], batch.sharer_attention_masks[j] = s_enc["input_ids"], s_enc["attention_mask"]
            batch.sharer_columns[j] = align_offsets(r_offsets, batch.attention_mask, s_enc["offset_mapping"],
                                                    s_enc["attention_mask"])
            batch.sharer_position_ids[j] = positions(s_enc["attention_mask"])
        return batch.to(self.receiver.device)

    def _batch(self, prompts) -> PromptBatch:
        if isinstance(prompts, PromptBatch):
            if len(prompts.sharer_columns) != len(self.sharers):
                raise ValueError(f"prompts: holds tokens for {len(prompts.sharer_columns)} sharers, the model "
                                 f"has {len(self.sharers)}")
            return prompts
        return self.tokenize(prompts)

    # -- the pipeline --

    def _sharer_caches(self, batch: PromptBatch, which) -> list:
        return [prefill(self.sharers[j].model, batch.sharer_input_ids[j], batch.sharer_attention_masks[j],
                        fusing_cache(), position_ids=batch.sharer_positions(j)) if j in which else None
                for j in range(len(self.sharers))]

    def _fuse_tokens(self, cache, length: int, tokens, sharer_caches, batch, backend) -> None:
        """Fuse receiver tokens ``{bitmask: [(row, column), ...]}`` of a cache of ``length`` columns."""
        device = self.receiver.device
        receiver_kv = layouts.dynamic_cache_views(cache)
        for selection, cells in sorted(tokens.items()):
            chosen = selected_sharers(selection, len(self.sharers))
            if not chosen or not cells:
                continue
            rows = torch.tensor([r for r, _ in cells], device=device)
            cols = torch.tensor([c for _, c in cells], device=device)
            receiver_slots = rows * length + cols
            kvs, slots = [], []
            for j in chosen:
                kv = layouts.dynamic_cache_views(sharer_caches[j])
                kvs.append(kv)
                slots.append(rows * kv[0][0].shape[1] + batch.sharer_columns[j][rows, cols].long())
            if len(chosen) == 1:
                fuse_all(self.checkpoints[chosen[0]], receiver_kv, kvs[0], receiver_slots, slots[0],
                         backend=backend, check_slots=self.check_slots)
            else:
                fuse_all([self.checkpoints[j] for j in chosen], receiver_kv, kvs, receiver_slots, slots,
                         mode=self.mode, backend=backend, check_slots=self.check_slots)

    def _prefill_sections(self, batch: PromptBatch, end: int, *, fuse: bool, backend: str,
                          attention_mask: Tensor | None = None, sharer_caches=None, shadow: bool = False,
                          fuse_tokens=None):
        """Prefill receiver columns ``[0, end)`` section by section: each fused section is fused
        (in place, from ``sharer_caches``) before any later column is prefilled; final sections
        are prefilled, never fused. With ``shadow``, also returns the research pipeline's clean
        copy: the fused cache with each prompt's last fused-or-not body section as prefilled.
        ``fuse_tokens`` replaces the fusion step (same arguments as :meth:`_fuse_tokens`): the
        trainer's differentiable fusion runs in exactly these chunks, on exactly these tokens."""
        sections = batch.row_sections(len(self.sharers))
        mask = batch.attention_mask if attention_mask is None else attention_mask
        host_mask = mask.bool().cpu()
        pos = batch.receiver_positions()
        ends = {end}
        fused_at = {}  # chunk end -> {bitmask: [(row, column)]}
        last_body = {}  # row -> (start, end) of its last body section
        for b, row in enumerate(sections):
            if len(row) > 1:
                last_body[b] = row[-2][:2]
            for start, stop, selection in row[:-1]:
                if stop > end or not (fuse and selection > 0 and self.sharers):
                    continue
                ends.add(stop)
                cells = [(b, c) for c in range(start, stop) if host_mask[b, c]]
                fused_at.setdefault(stop, {}).setdefault(selection, []).extend(cells)
        cache, saved, a = fusing_cache(), [], 0
        for stop in sorted(e for e in ends if e > 0):
            cache = prefill(self.receiver, batch.input_ids[:, a:stop], mask[:, :stop], cache,
                            position_ids=pos[:, a:stop])
            tokens = fused_at.get(stop)
            if tokens:
                if shadow:  # keep the rows the research pipeline's clean cache holds unfused
                    keep = [(b, c) for cells in tokens.values() for b, c in cells
                            if b in last_body and last_body[b][1] == stop]
                    if keep:
                        rows = torch.tensor([b for b, _ in keep], device=mask.device)
                        cols = torch.tensor([c for _, c in keep], device=mask.device)
                        saved.append((rows, cols, [(k[rows, :, cols].clone(), v[rows, :, cols].clone())
                                                   for k, v in _hf_layers(cache)]))
                (fuse_tokens or self._fuse_tokens)(cache, stop, tokens, sharer_caches, batch, backend)
            a = stop
        clean = None
        if shadow:
            clean = clone_cache(cache) if a else fusing_cache()
            for rows, cols, layers in saved:
                for (k, v), (k_rows, v_rows) in zip(_hf_layers(clean), layers):
                    k[rows, :, cols], v[rows, :, cols] = k_rows, v_rows
        return cache, clean

    def _has_position_gaps(self, batch: PromptBatch) -> bool:
        if batch.position_ids is None:
            return False
        mask = batch.attention_mask.bool()
        return bool((batch.position_ids != positions(batch.attention_mask))[mask].any())

    @torch.no_grad()
    def prefill(self, prompts, *, fuse: bool = True, backend: str | None = None) -> Prefilled:
        """Prefill every model on the prompts (texts, messages or a :class:`PromptBatch`),
        section by section, fusing the receiver's fused sections in place; the cache holds every
        column but each prompt's last token. ``fuse=False`` gives the receiver-only baseline.
        The result continues with ``receiver.generate``, which counts positions over the
        attention mask; prompts whose positions also count section padding (chat messages with
        two tokenizers) are refused here: use :meth:`generate` or :meth:`first_token_logits`."""
        batch = self._batch(prompts)
        if self._has_position_gaps(batch):
            raise ValueError("prompts: their positions count section padding, which transformers' generate "
                             "cannot continue from a Prefilled state; use C2CModel.generate or "
                             "first_token_logits")
        ids, prompt_mask, last = split_last_token(batch.input_ids, batch.attention_mask)
        cache = None
        if ids.shape[1]:
            sharer_caches = self._sharer_caches(batch, range(len(self.sharers)) if fuse else ())
            cache, _ = self._prefill_sections(batch, ids.shape[1], fuse=fuse, backend=backend or self.backend,
                                              attention_mask=prompt_mask.long(), sharer_caches=sharer_caches)
        input_ids = torch.cat([ids, last], 1)
        attention_mask = torch.cat([prompt_mask.long(), torch.ones_like(last)], 1)
        return Prefilled(cache, input_ids, attention_mask)

    def _own_loop(self, batch: PromptBatch, fuse: bool, include_response: bool) -> bool:
        return (fuse and include_response and bool(self.sharers)) or self._has_position_gaps(batch)

    @torch.no_grad()
    def first_token_logits(self, prompts, *, fuse: bool = True, backend: str | None = None,
                           include_response: bool | None = None) -> Tensor:
        """Logits ``[B, vocab]`` of the first generated token: prefills, fusion, final section."""
        batch = self._batch(prompts)
        include = self.include_response if include_response is None else include_response
        if self._own_loop(batch, fuse, include):
            return self._start(batch, fuse=fuse, include_response=include, backend=backend or self.backend)["logits"]
        state = self.prefill(batch, fuse=fuse, backend=backend)
        kwargs = {} if state.cache is None else {cache_argument(self.receiver): state.cache}
        output = self.receiver(input_ids=state.input_ids[:, -1:], attention_mask=state.attention_mask,
                               position_ids=state.attention_mask.sum(-1, keepdim=True) - 1, use_cache=True,
                               **kwargs)
        return output.logits[:, -1]

    def _start(self, batch: PromptBatch, *, fuse: bool, include_response: bool, backend: str) -> dict:
        """Prefill and fuse the prompts, run their final sections; the decoding state."""
        b, n = batch.input_ids.shape
        sections = batch.row_sections(len(self.sharers))
        finals = [row[-1] for row in sections]
        if any(stop != n for _, stop, _ in finals):
            raise ValueError("prompts: every prompt's final section must end in the last column (C2CModel.tokenize "
                             "lays prompts out so) to decode them together")
        include = include_response and fuse and bool(self.sharers)
        responders = self.response_sharers if include else []
        tail = min(start for start, _, _ in finals) if include else n - 1
        if include and any(len(row) > 1 and row[-2][1] > tail for row in sections):
            raise ValueError("prompts: with include_response, every prompt's earlier sections must end before any "
                             "prompt's final section starts (C2CModel.tokenize lays prompts out so)")
        needed = range(len(self.sharers)) if fuse else ()
        sharer_caches = self._sharer_caches(batch, needed)
        cache, clean = self._prefill_sections(batch, tail, fuse=fuse, backend=backend, sharer_caches=sharer_caches,
                                              shadow=include)
        mask, pos = batch.attention_mask, batch.receiver_positions()
        arg = cache_argument(self.receiver)
        if include:
            # The research decode path: the clean cache computes the new rows, the fusers fuse
            # them, and the receiver's forward attends to and stores the fused rows.
            prefill(self.receiver, batch.input_ids[:, tail:], mask, clean, position_ids=pos[:, tail:])
            fusion = DecodeFusion([self.checkpoints[j] for j in responders], self.receiver,
                                  [self.sharers[j].model for j in responders], b, tokens=n - tail, mode=self.mode,
                                  backend=backend, check_slots=self.check_slots)
            fusion.load(clean, [sharer_caches[j] for j in responders], start=tail,
                        sharer_columns=[batch.sharer_columns[j][:, tail:] for j in responders])
            fusion.fuse(layouts.hf_slots(mask[:, tail:]))
            cache.replacement = fusion.receiver_rows
        try:
            output = self.receiver(input_ids=batch.input_ids[:, tail:], attention_mask=mask,
                                   position_ids=pos[:, tail:], use_cache=True, **{arg: cache})
        finally:
            cache.replacement = None
        state = dict(cache=cache, clean=clean, sharer_caches=sharer_caches, responders=responders,
                     logits=output.logits[:, -1], mask=mask, next_position=pos.amax(-1, keepdim=True) + 1,
                     sharer_masks={j: batch.sharer_attention_masks[j] for j in responders},
                     sharer_next={j: batch.sharer_positions(j).amax(-1, keepdim=True) + 1 for j in responders})
        return state

    def _decode(self, batch: PromptBatch, *, fuse: bool, include_response: bool, backend: str,
                max_new_tokens: int | None = None, do_sample: bool = False, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
                eos_token_id=None, pad_token_id=None, return_dict_in_generate: bool = False,
                output_logits: bool = False, output_scores: bool = False):
        """The package's own decode loop (as the research pipeline's ``generate``)."""
        from transformers.generation import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                             TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

        if max_new_tokens is None or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: expected a number >= 0, got {max_new_tokens!r}")
        config = getattr(self.receiver, "generation_config", None) or self.receiver.config
        eos = getattr(config, "eos_token_id", None) if eos_token_id is None else eos_token_id
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        pad = getattr(config, "pad_token_id", None) if pad_token_id is None else pad_token_id
        pad = (eos[0] if eos else 0) if pad is None else pad
        processors = LogitsProcessorList()
        if repetition_penalty not in (None, 1.0):
            processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
        if do_sample:
            if temperature not in (None, 1.0):
                processors.append(TemperatureLogitsWarper(temperature))
            if top_k:
                processors.append(TopKLogitsWarper(top_k))
            if top_p not in (None, 1.0):
                processors.append(TopPLogitsWarper(top_p))
        state = self._start(batch, fuse=fuse, include_response=include_response, backend=backend)
        b = batch.input_ids.shape[0]
        device = batch.input_ids.device
        arg = cache_argument(self.receiver)
        responders = state["responders"]
        fusion = None
        if responders:
            fusion = DecodeFusion([self.checkpoints[j] for j in responders], self.receiver,
                                  [self.sharers[j].model for j in responders], b, mode=self.mode, backend=backend,
                                  check_slots=self.check_slots)
            vocab = self.receiver.get_output_embeddings().weight.shape[0]
            tables = {j: self._table(j, vocab) for j in responders}
        sequences, logits_out, scores_out = batch.input_ids, [], []
        mask, logits = state["mask"], state["logits"]
        finished = torch.zeros(b, dtype=torch.bool, device=device)
        ones = torch.ones(b, 1, dtype=mask.dtype, device=device)
        s_masks = dict(state["sharer_masks"])
        for step in range(max_new_tokens):
            scores = processors(sequences, logits.float())
            logits_out.append(logits), scores_out.append(scores)
            if do_sample:
                token = torch.multinomial(torch.softmax(scores, -1), 1).squeeze(1)
            else:
                token = scores.argmax(-1)
            if eos:
                token = torch.where(finished, torch.full_like(token, pad), token)
                finished |= torch.isin(token, torch.tensor(eos, device=device))
            sequences = torch.cat([sequences, token[:, None]], 1)
            if step + 1 == max_new_tokens or (eos and bool(finished.all())):
                break
            x, mask = token[:, None], torch.cat([mask, ones], 1)
            position = state["next_position"] + step
            if fusion is not None:
                # Ordered as the research decode step: the sharers and the clean receiver cache
                # take the token, one fuse_all fuses its rows, the receiver attends to them.
                sharer_caches = []
                for j in responders:
                    s_masks[j] = torch.cat([s_masks[j], ones.to(s_masks[j].dtype)], 1)
                    s_x = x if tables[j] is None else tables[j][x]
                    prefill(self.sharers[j].model, s_x, s_masks[j], state["sharer_caches"][j],
                            position_ids=state["sharer_next"][j] + step)
                    sharer_caches.append(state["sharer_caches"][j])
                prefill(self.receiver, x, mask, state["clean"], position_ids=position)
                fusion.load(state["clean"], sharer_caches)
                fusion.fuse()
                state["cache"].replacement = fusion.receiver_rows
            try:
                output = self.receiver(input_ids=x, attention_mask=mask, position_ids=position, use_cache=True,
                                       **{arg: state["cache"]})
            finally:
                state["cache"].replacement = None
            logits = output.logits[:, -1]
        if not return_dict_in_generate:
            return sequences
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        return GenerateDecoderOnlyOutput(sequences=sequences, logits=tuple(logits_out) if output_logits else None,
                                         scores=tuple(scores_out) if output_scores else None)

    def generate(self, prompts, *, fuse: bool = True, backend: str | None = None,
                 include_response: bool | None = None, **generate_kwargs):
        """Generate on the fused cache. The returned sequences start with the prompt columns,
        then the new tokens.

        When the pipeline needs no more than ``transformers`` offers (no ``include_response``,
        positions that count only attended tokens), this is ``receiver.generate`` on the fused
        cache and every generation option passes through; otherwise the package's own loop runs
        (the research pipeline's), with the options in :data:`GENERATION_OPTIONS`.
        """
        batch = self._batch(prompts)
        include = self.include_response if include_response is None else include_response
        backend = backend or self.backend
        if self._own_loop(batch, fuse, include):
            unknown = sorted(set(generate_kwargs) - set(GENERATION_OPTIONS))
            if unknown:
                raise ValueError(f"generate_kwargs: {unknown} are not supported by the C2C decode loop (used with "
                                 f"include_response or section padding); supported: {list(GENERATION_OPTIONS)}")
            return self._decode(batch, fuse=fuse, include_response=include, backend=backend, **generate_kwargs)
        state = self.prefill(batch, fuse=fuse, backend=backend)
        if state.cache is not None:
            generate_kwargs[cache_argument(self.receiver)] = state.cache
        return self.receiver.generate(input_ids=state.input_ids, attention_mask=state.attention_mask,
                                      **generate_kwargs)

    def generate_text(self, prompts, *, padding_side: str = "left", add_generation_prompt: bool = True,
                      enable_thinking: bool = False, **generate_kwargs) -> list[str]:
        """Generate from texts or chat messages; returns only the new text of each prompt."""
        batch = self.tokenize(prompts, padding_side=padding_side, add_generation_prompt=add_generation_prompt,
                              enable_thinking=enable_thinking)
        output = self.generate(batch, **generate_kwargs)
        sequences = output if isinstance(output, Tensor) else output.sequences
        return self.tokenizer.batch_decode(sequences[:, batch.input_ids.shape[1]:], skip_special_tokens=True)


# ---- fusers for a pair of models -------------------------------------------------------------


def random_checkpoint(receiver, sharer, *, layer_map: dict[int, int] | None = None, hidden_dim: int = 1024,
                      intermediate_dim: int = 1024, num_layers: int = 3, seed: int = 0,
                      dtype=torch.float32, device="cpu", gates_open=True) -> Checkpoint:
    """A checkpoint of random fusers fitted to two models (or configs): the last-aligned layer
    map by default, any ``{receiver_layer: sharer_layer}`` map otherwise. For tests and
    benchmarks; real use loads a trained one with :func:`c2c_kernels.load_checkpoint`."""
    r_layers, r_heads, r_dim = kv_geometry(receiver)
    s_layers, s_heads, s_dim = kv_geometry(sharer)
    layer_map = last_aligned_map(r_layers, s_layers) if layer_map is None else dict(layer_map)
    for r, s in layer_map.items():
        if not (0 <= r < r_layers and 0 <= s < s_layers):
            raise ValueError(f"layer_map: {r} -> {s} is outside the receiver's {r_layers} / the sharer's "
                             f"{s_layers} layers")
    weights = random_weights(2 * len(layer_map), s_heads, s_dim, r_heads, r_dim, hidden_dim, intermediate_dim,
                             num_layers, dtype=dtype, device=device, seed=seed, gates_open=gates_open)
    return make_checkpoint(weights, layer_map, s_heads)


__all__ = [
    "C2CModel", "Sharer", "PromptBatch", "Prefilled", "fuse_prompt_cache", "prefill", "split_last_token",
    "tokenize", "positions", "random_checkpoint", "kv_geometry", "cache_argument", "output_cache",
    "DecodeFusion", "GENERATION_OPTIONS", "batch_aligned", "fusing_cache", "clone_cache", "selected_sharers",
    "set_layer",
]
