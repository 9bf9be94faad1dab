"""The differentiable C2C forward that training runs: the Hugging Face client's pipeline with
its in-place, no-grad fusion replaced by the fused autograd Function.

The client (:class:`~c2c_kernels.integrations.hf.C2CModel`) lays the prompts out, prefills the
sharers, and prefills the receiver section by section; this module only supplies the fusion
step it calls after each chunk (``_prefill_sections(fuse_tokens=...)``): the fused rows come
out of :class:`~c2c_kernels.training.FuserTrainer` (the fused autograd Function) and replace
the cache's rows out of place, so the receiver's later forwards attend to rows that carry the
fusers' graph. Sections, alignment, sharer selection, chunking and the multi-sharer modes are
the client's; the loss is the receiver's causal-LM loss on the response labels.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .. import layouts
from ..checkpoint import Checkpoint
from ..integrations import hf
from ..weights import FuserWeights
from .recipe import response_loss
from .trainer import FuserTrainer


def layout_checkpoint(ckpt: Checkpoint, device, dtype) -> Checkpoint:
    """``ckpt``'s layer map and shapes over zero-size stand-in weights: what the client needs to
    lay prompts out and check the models, without a second copy of the fusers."""
    stand_in = FuserWeights(*(torch.zeros((), dtype=torch.float32 if name == "gate_logit" else dtype,
                                          device=device).expand(t.shape)
                              for name, t in zip(FuserWeights._fields, ckpt.weights)))
    return ckpt.replace(weights=stand_in, _gate_stamp=None)


def fused_entries(ckpt: Checkpoint) -> list[list[tuple[tuple[int, int], int, int]]]:
    """Rounds of ``((receiver_layer, side), sharer_layer, fuser)`` in the order the fusers run
    (receiver layers ascending, keys before values; with ``pairs="all"`` a layer's later pairs
    in later rounds, each on the rows the previous one wrote). Training runs every fuser, open
    or closed: the soft gate of a closed one still passes gradient."""
    rounds, seen = [], {}
    for layer in ckpt.layers:
        for side in (0, 1):
            key = (layer.receiver_layer, side)
            n = seen[key] = seen.get(key, -1) + 1
            if n == len(rounds):
                rounds.append([])
            rounds[n].append((key, layer.sharer_layer, 2 * layer.projector + side))
    return rounds


class TrainingForward(nn.Module):
    """Fusers (one :class:`FuserTrainer` per sharer) and the client that runs them.

    :meth:`forward` ``(batch, generators) -> (summed response loss, label count)``; with
    ``return_logits`` also the logits of the final chunk (the columns from ``tail`` on).
    ``generators[b]`` draws prompt ``b``'s dropout masks and Gumbel noise (one per prompt, so
    the draws of an example do not depend on the batch it is in); None in eval mode.
    """

    def __init__(self, client: hf.C2CModel, fusers: Sequence[FuserTrainer], mode: str = "parallel"):
        super().__init__()
        if len(fusers) != len(client.sharers):
            raise ValueError(f"fusers: {len(fusers)}, expected one per sharer ({len(client.sharers)})")
        if mode not in ("parallel", "sequential"):
            raise ValueError(f"mode: expected 'parallel' or 'sequential', got {mode!r}")
        self.client = client
        self.fusers = nn.ModuleList(fusers)
        self.mode = mode
        self._rounds = [fused_entries(ckpt) for ckpt in client.checkpoints]
        self._generators = None

    def forward(self, batch: hf.PromptBatch, generators: Sequence[torch.Generator] | None = None, *,
                return_logits: bool = False):
        client = self.client
        if batch.labels is None:
            raise ValueError("batch: carries no labels (build it with C2CModel.tokenize_training)")
        if self.training and (generators is None or len(generators) != batch.input_ids.shape[0]):
            raise ValueError("generators: training draws each prompt's noise from its own generator; pass one per "
                             "prompt")
        n = len(client.sharers)
        sections = batch.row_sections(n)
        tail = min(row[-1][0] for row in sections)
        with torch.no_grad():  # the sharers are frozen and run without gradients
            sharer_caches = client._sharer_caches(batch, range(n))
        self._generators = generators
        try:
            cache, _ = client._prefill_sections(batch, tail, fuse=True, backend="auto", sharer_caches=sharer_caches,
                                                fuse_tokens=self._fuse_tokens)
        finally:
            self._generators = None
        kwargs = {hf.cache_argument(client.receiver): cache} if tail else {}
        output = client.receiver(input_ids=batch.input_ids[:, tail:], attention_mask=batch.attention_mask,
                                 position_ids=batch.receiver_positions()[:, tail:], use_cache=bool(tail), **kwargs)
        loss, count = response_loss(output.logits, batch.labels[:, tail:])
        return (loss, count, output.logits) if return_logits else (loss, count)

    # -- the fusion step of one chunk --

    def _fuse_tokens(self, cache, length: int, tokens, sharer_caches, batch: hf.PromptBatch, backend) -> None:
        client = self.client
        device = client.receiver.device
        receiver_kv = layouts.dynamic_cache_views(cache)  # [B, N, H, D] per layer
        for selection, cells in sorted(tokens.items()):
            chosen = hf.selected_sharers(selection, len(client.sharers))
            if not chosen or not cells:
                continue
            by_row: dict[int, list[int]] = {}
            for b, c in cells:
                by_row.setdefault(b, []).append(c)
            rows_all, cols_all, fused_all = [], [], {}
            for b in sorted(by_row):
                rows = torch.full((len(by_row[b]),), b, dtype=torch.long, device=device)
                cols = torch.tensor(by_row[b], dtype=torch.long, device=device)
                fused = self._fuse_row(receiver_kv, rows, cols, chosen, sharer_caches, batch,
                                       None if self._generators is None else self._generators[b])
                rows_all.append(rows), cols_all.append(cols)
                for key, value in fused.items():
                    fused_all.setdefault(key, []).append(value)
            rows, cols = torch.cat(rows_all), torch.cat(cols_all)
            for layer in sorted({key[0] for key in fused_all}):
                new = []
                for side in (0, 1):
                    view = receiver_kv[layer][side]
                    if (layer, side) in fused_all:
                        values = torch.cat(fused_all[(layer, side)]).view(len(rows), *view.shape[2:])
                        view = view.index_put((rows, cols), values.to(view.dtype))
                    new.append(view.permute(0, 2, 1, 3))
                hf.set_layer(cache, layer, *new)

    def _fuse_row(self, receiver_kv, rows, cols, chosen, sharer_caches, batch, generator) -> dict:
        """The fused rows ``[T, H*D]`` of one prompt's tokens, per ``(layer, side)``."""
        clean = {}

        def rows_of(key):
            if key not in clean:
                clean[key] = receiver_kv[key[0]][key[1]][rows, cols].reshape(len(rows), -1)
            return clean[key]

        current, deltas = {}, {}
        for j in chosen:
            sharer_kv = layouts.dynamic_cache_views(sharer_caches[j])
            s_cols = batch.sharer_columns[j][rows, cols].long()
            for entries in self._rounds[j]:
                if self.mode == "parallel":
                    # Every sharer's correction from the rows as prefilled (a layer's later pairs
                    # of one checkpoint still chain on its earlier ones).
                    x = [current.get((j, key), rows_of(key)) for key, _, _ in entries]
                else:
                    x = [current.get(key, rows_of(key)) for key, _, _ in entries]
                s = [sharer_kv[sl][key[1]][rows, s_cols].reshape(len(rows), -1) for key, sl, _ in entries]
                out = self.fusers[j](s, x, [f for _, _, f in entries], generator=generator)
                for i, (key, _, _) in enumerate(entries):
                    if self.mode == "parallel":
                        current[(j, key)] = out[i]
                    else:
                        current[key] = out[i]
        if self.mode == "sequential":
            return current
        if len(chosen) == 1:  # one sharer: its rows as they are (no x + (out - x) rounding)
            return {key: value for (_, key), value in current.items()}
        fused = {}
        for (j, key), value in current.items():
            x = rows_of(key)
            acc = torch.promote_types(x.dtype, torch.float32)
            deltas[key] = deltas.get(key, 0) + (value.to(acc) - x.to(acc))
        for key, delta in deltas.items():
            x = rows_of(key)
            fused[key] = (x.to(delta.dtype) + delta).to(x.dtype)
        return fused
