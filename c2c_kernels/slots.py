"""What a call does with its slots: the one definition every backend implements.

For token ``t`` with receiver slot ``r = receiver_slots[t]`` and sharer slot
``s = sharer_slots[t]``, in pools of ``receiver_rows`` / ``sharer_rows`` rows
(``pages * page_size`` of the views):

1. ``r < 0``: padding. Nothing is read or written for ``t``; ``project`` returns zero rows.
2. ``r >= receiver_rows``: an error on ``receiver_slots`` (index ``t``, value ``r``).
3. a sharer is read (``fuse``/``project``) and not ``0 <= s < sharer_rows``: an error on
   ``sharer_slots`` (index ``t``, value ``s``).
   A token with an error is skipped like padding. CPU backends raise the first error (lowest
   ``t``) at once, before anything is written; GPU backends skip it, record one of them in the
   status buffer (:mod:`c2c_kernels.status`) and raise it later.
4. Duplicated receiver slots: every valid token computes its correction from the rows as they
   were when the call began; ``fuse``/``merge`` write only the **last** valid token with that
   slot (the others are dropped, as if the rows had been written in token order); ``project``
   returns every valid token's rows.

:func:`prepare` is the plain-PyTorch statement of these rules (a host sync); GPU backends
compute the same ``(receiver, sharer)`` slots in one small kernel and hand them to their
kernels, which then only skip negative receiver slots.
"""
from __future__ import annotations

import torch

from .status import ARGUMENTS, RECEIVER_SLOTS, SHARER_SLOTS


def rows(view: torch.Tensor) -> int:
    """Rows of a ``[page, entry, head, dim]`` pool: the valid slots are ``[0, rows)``."""
    return view.shape[0] * view.shape[1]


def prepare(receiver_slots: torch.Tensor, sharer_slots: torch.Tensor | None, receiver_rows: int,
            sharer_rows: int, *, dedupe: bool):
    """``(receiver, sharer, errors)``: int64 ``[T]`` slots where every skipped token (padding,
    error, or, with ``dedupe``, a receiver slot that a later valid token writes) has receiver
    slot ``-1`` and sharer slot 0, and ``errors``: ``[(argument, index, value, limit)]`` in
    token order (argument as in :data:`c2c_kernels.status.ARGUMENTS`)."""
    r = receiver_slots.long().cpu()
    s = sharer_slots.long().cpu() if sharer_slots is not None else torch.zeros_like(r)
    valid = r >= 0
    bad_r = valid & (r >= receiver_rows)
    bad_s = valid & ~bad_r & ((s < 0) | (s >= sharer_rows)) if sharer_slots is not None else torch.zeros_like(valid)
    errors = []
    for t in torch.nonzero(bad_r | bad_s).flatten().tolist():
        if bad_r[t]:
            errors.append((RECEIVER_SLOTS, t, int(r[t]), receiver_rows))
        else:
            errors.append((SHARER_SLOTS, t, int(s[t]), sharer_rows))
    valid &= ~(bad_r | bad_s)
    if dedupe:
        # Valid tokens ordered by (slot, token) with a stable sort: the last of each run of equal
        # slots is the one that writes.
        idx = torch.nonzero(valid).flatten()
        order = torch.sort(r[idx], stable=True)
        last = torch.ones_like(order.values, dtype=torch.bool)
        last[:-1] = order.values[1:] != order.values[:-1]
        valid = torch.zeros_like(valid)
        valid[idx[order.indices[last]]] = True
    out_r = torch.where(valid, r, torch.full_like(r, -1))
    out_s = torch.where(valid, s, torch.zeros_like(s))
    return out_r.to(receiver_slots.device), out_s.to(receiver_slots.device), errors


def raise_first(errors) -> None:
    """Raise the first error of :func:`prepare` as the named ``ValueError`` every backend uses."""
    if errors:
        from .status import slot_error
        argument, index, value, limit = errors[0]
        raise slot_error(ARGUMENTS[argument], index, value, limit)
