"""Token alignment between two tokenizations of the same text, vectorised over a batch.

Each receiver token reads the sharer token that covers its first character. Offsets are the
``(start, end)`` character spans a fast tokenizer returns with ``return_offsets_mapping=True``.
Two cases need a rule of their own:

- no sharer token covers the character (the sharer's pre-tokenizer dropped it, e.g. a space):
  the receiver token reads the next sharer token;
- the receiver token is zero-width (a special token such as BOS, span ``(c, c)``): it reads the
  first sharer token that ends at or after ``c``: at the start of the text the sharer's own
  BOS when it has one (else its first token), elsewhere the sharer token that ends at ``c``.

A receiver token past the end of the sharer's text reads the sharer's last token. Padding
(mask 0) may sit on either side of either batch; padded receiver tokens get column 0.
"""
from __future__ import annotations

import torch


def _check(name: str, offsets: torch.Tensor, mask: torch.Tensor) -> None:
    if offsets.dim() != 3 or offsets.shape[-1] != 2:
        raise ValueError(f"{name}_offsets: expected [batch, tokens, 2] character spans, got {list(offsets.shape)}")
    if tuple(mask.shape) != tuple(offsets.shape[:2]):
        raise ValueError(f"{name}_mask: shape {list(mask.shape)} does not match {name}_offsets "
                         f"{list(offsets.shape[:2])}")


def align_offsets(receiver_offsets: torch.Tensor, receiver_mask: torch.Tensor,
                  sharer_offsets: torch.Tensor, sharer_mask: torch.Tensor) -> torch.Tensor:
    """The sharer column each receiver token reads: ``[B, Nr]`` int64.

    ``*_offsets`` are ``[B, N, 2]`` spans, ``*_mask`` ``[B, N]`` attention masks (1 = token).
    One ``searchsorted`` over the batch; no host sync.
    """
    _check("receiver", receiver_offsets, receiver_mask)
    _check("sharer", sharer_offsets, sharer_mask)
    if receiver_offsets.shape[0] != sharer_offsets.shape[0]:
        raise ValueError(f"sharer_offsets: batch {sharer_offsets.shape[0]}, expected the receiver's "
                         f"{receiver_offsets.shape[0]} (one sharer tokenization per prompt)")
    if sharer_offsets.shape[1] == 0:
        raise ValueError("sharer_offsets: the sharer tokenization holds no tokens")
    r_mask, s_mask = receiver_mask.bool(), sharer_mask.bool()
    start = receiver_offsets[..., 0].long()
    zero_width = receiver_offsets[..., 1].long() <= start
    # Running maximum of the sharer's span ends: sorted, with left padding (-1) never chosen
    # and right padding repeating the last end; "first end > c" is then a searchsorted.
    ends = torch.where(s_mask, sharer_offsets[..., 1].long(), -1).cummax(dim=-1).values
    after = torch.searchsorted(ends, start.contiguous(), right=True)  # first end > start
    at = torch.searchsorted(ends, start.contiguous(), right=False)  # first end >= start
    column = torch.where(zero_width, at, after)
    positions = torch.arange(s_mask.shape[1], device=s_mask.device)
    last_real = torch.where(s_mask, positions, 0).amax(dim=-1, keepdim=True)
    column = torch.minimum(column, last_real)
    return torch.where(r_mask, column, 0)


def identity_alignment(mask: torch.Tensor) -> torch.Tensor:
    """Same tokenizer on both sides: receiver column ``n`` reads sharer column ``n``."""
    b, n = mask.shape
    return torch.arange(n, device=mask.device).expand(b, n)
