"""C2C generation with Hugging Face ``transformers`` models, on top of ``c2c.fuse_all``.

    import c2c_kernels as c2c
    from c2c_kernels.integrations.hf import C2CModel, Sharer

    fuser = c2c.load_checkpoint("path/to/fuser")
    c2c_model = C2CModel(receiver, receiver_tokenizer, [Sharer(sharer, fuser, sharer_tokenizer)])
    print(c2c_model.generate_text(["Why is the sky blue?"], max_new_tokens=64))

The pipeline is the one C2C fusers are trained for: every model prefills the same prompt, the
receiver's cache rows of the prompt (all but each prompt's last token) are fused in place,
then the receiver decodes, starting with that last token, on the fused cache. The caches are
fused through zero-copy views (:func:`c2c_kernels.layouts.dynamic_cache_views`): nothing
clones a cache. ``transformers`` itself is only needed by the caller, who brings the models.
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
from .alignment import align_offsets, identity_alignment

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


@dataclass
class PromptBatch:
    """Token ids of a batch of prompts for the receiver and for each sharer.

    ``sharer_columns[j]`` is ``[B, N]``: the column of sharer ``j``'s tokens that each receiver
    column reads (:mod:`.alignment`). Padding may be on either side.
    """

    input_ids: Tensor  # [B, N] receiver tokens
    attention_mask: Tensor  # [B, N]
    sharer_input_ids: list[Tensor]  # [B, Ns_j] per sharer
    sharer_attention_masks: list[Tensor]
    sharer_columns: list[Tensor]  # [B, N] int64 per sharer

    @classmethod
    def same_tokens(cls, input_ids: Tensor, attention_mask: Tensor | None = None,
                    num_sharers: int = 1) -> "PromptBatch":
        """Every model reads the same token ids (one tokenizer, or a benchmark)."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        columns = identity_alignment(mask)
        return cls(input_ids, mask, [input_ids] * num_sharers, [mask] * num_sharers, [columns] * num_sharers)

    def to(self, device) -> "PromptBatch":
        return PromptBatch(self.input_ids.to(device), self.attention_mask.to(device),
                           [t.to(device) for t in self.sharer_input_ids],
                           [t.to(device) for t in self.sharer_attention_masks],
                           [t.to(device) for t in self.sharer_columns])


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


# ---- prefill and decode ----------------------------------------------------------------------


def positions(attention_mask: Tensor) -> Tensor:
    """Position ids that count only real tokens (as ``generate`` derives them)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def prefill(model, input_ids: Tensor, attention_mask: Tensor, cache=None):
    """Run the decoder stack (no LM head) over the tokens; returns the filled cache."""
    kwargs = {} if cache is None else {cache_argument(model): cache}
    output = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=positions(attention_mask), use_cache=True, **kwargs)
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


class C2CModel:
    """A receiver model that decodes on its cache fused with one or more sharers' caches.

    ``mode`` combines several sharers (``"parallel"``: every correction from the clean cache;
    ``"sequential"``: one after another); ``backend`` picks the fusion kernels.
    """

    def __init__(self, receiver, tokenizer, sharers: Sequence[Sharer], *, mode: str = "parallel",
                 backend: str = "auto", check_slots: bool = False):
        if mode not in ("parallel", "sequential"):
            raise ValueError(f"mode: expected 'parallel' or 'sequential', got {mode!r}")
        self.receiver, self.tokenizer, self.sharers = receiver, tokenizer, list(sharers)
        self.mode, self.backend, self.check_slots = mode, backend, check_slots
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

    # -- inputs --

    def tokenize(self, texts: Sequence[str], *, padding_side: str = "left",
                 add_special_tokens: bool = True) -> PromptBatch:
        """Tokenize ``texts`` for the receiver and each sharer and align the tokenizations."""
        if self.tokenizer is None:
            raise ValueError("tokenizer: this C2CModel has none; pass token ids as a PromptBatch instead of texts")
        if isinstance(texts, str):
            texts = [texts]
        different = [s.tokenizer is not None and s.tokenizer is not self.tokenizer for s in self.sharers]
        enc = tokenize(self.tokenizer, texts, padding_side=padding_side, offsets=any(different),
                       add_special_tokens=add_special_tokens)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        sharer_ids, sharer_masks, columns = [], [], []
        for sharer, own in zip(self.sharers, different):
            if not own:
                sharer_ids.append(ids), sharer_masks.append(mask), columns.append(identity_alignment(mask))
                continue
            s_enc = tokenize(sharer.tokenizer, texts, padding_side=padding_side, offsets=True,
                             add_special_tokens=add_special_tokens)
            sharer_ids.append(s_enc["input_ids"]), sharer_masks.append(s_enc["attention_mask"])
            columns.append(align_offsets(enc["offset_mapping"], mask, s_enc["offset_mapping"],
                                         s_enc["attention_mask"]))
        return PromptBatch(ids, mask, sharer_ids, sharer_masks, columns).to(self.receiver.device)

    def _batch(self, prompts) -> PromptBatch:
        if isinstance(prompts, PromptBatch):
            if len(prompts.sharer_columns) != len(self.sharers):
                raise ValueError(f"prompts: holds tokens for {len(prompts.sharer_columns)} sharers, the model "
                                 f"has {len(self.sharers)}")
            return prompts
        return self.tokenize(prompts)

    # -- the pipeline --

    @torch.no_grad()
    def prefill(self, prompts, *, fuse: bool = True, backend: str | None = None) -> Prefilled:
        """Prefill every model on the prompts (texts or a :class:`PromptBatch`) and fuse the
        receiver's prompt rows in place. ``fuse=False`` gives the receiver-only baseline."""
        batch = self._batch(prompts)
        ids, prompt_mask, last = split_last_token(batch.input_ids, batch.attention_mask)
        cache = None
        if ids.shape[1]:
            cache = prefill(self.receiver, ids, prompt_mask.long())
            if fuse and self.sharers:
                sharer_caches = [prefill(s.model, s_ids, s_mask) for s, s_ids, s_mask in
                                 zip(self.sharers, batch.sharer_input_ids, batch.sharer_attention_masks)]
                columns = [c[:, :ids.shape[1]] for c in batch.sharer_columns]
                fuse_prompt_cache(self.checkpoints, cache, prompt_mask, sharer_caches, columns, mode=self.mode,
                                  backend=backend or self.backend, check_slots=self.check_slots)
        input_ids = torch.cat([ids, last], 1)
        attention_mask = torch.cat([prompt_mask.long(), torch.ones_like(last)], 1)
        return Prefilled(cache, input_ids, attention_mask)

    @torch.no_grad()
    def first_token_logits(self, prompts, **prefill_kwargs) -> Tensor:
        """Logits ``[B, vocab]`` of the first generated token: prefills, fusion, one decode step."""
        state = self.prefill(prompts, **prefill_kwargs)
        kwargs = {} if state.cache is None else {cache_argument(self.receiver): state.cache}
        output = self.receiver(input_ids=state.input_ids[:, -1:], attention_mask=state.attention_mask,
                               position_ids=state.attention_mask.sum(-1, keepdim=True) - 1, use_cache=True,
                               **kwargs)
        return output.logits[:, -1]

    def generate(self, prompts, *, fuse: bool = True, backend: str | None = None, **generate_kwargs):
        """``receiver.generate`` on the fused cache; any generation option passes through. The
        returned sequences start with :attr:`Prefilled.input_ids` (its ``cached_columns + 1``
        columns), then the new tokens."""
        state = self.prefill(prompts, fuse=fuse, backend=backend)
        if state.cache is not None:
            generate_kwargs[cache_argument(self.receiver)] = state.cache
        return self.receiver.generate(input_ids=state.input_ids, attention_mask=state.attention_mask,
                                      **generate_kwargs)

    def generate_text(self, texts: Sequence[str], *, padding_side: str = "left", **generate_kwargs) -> list[str]:
        """Generate from texts; returns only the new text of each prompt."""
        batch = self.tokenize(texts, padding_side=padding_side)
        output = self.generate(batch, **generate_kwargs)
        sequences = output if isinstance(output, Tensor) else output.sequences
        prompt_columns = split_last_token(batch.input_ids, batch.attention_mask)[0].shape[1] + 1
        return self.tokenizer.batch_decode(sequences[:, prompt_columns:], skip_special_tokens=True)


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
]
