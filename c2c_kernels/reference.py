"""The definition of correct: the fuser of ``docs/fuser.md`` in plain PyTorch, fp32 throughout.

Every backend is tested against these functions. They favour clarity over speed: rows are
gathered with advanced indexing (a copy), padding is dropped with a boolean mask (a host
sync), and everything is computed in fp32 and rounded to the cache dtype once.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from . import slots as _slots
from .weights import FuserWeights

RMS_EPS = 1e-6


def rms_norm(z: torch.Tensor, scale: torch.Tensor, eps: float = RMS_EPS) -> torch.Tensor:
    return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps) * scale


def ffn_block(z, norm, w1, w2, *, dropout_p: float = 0.0, generator=None) -> torch.Tensor:
    """``z + dropout(W2 gelu(W1 rmsnorm(z)))``: pre-norm, exact GELU, bias-free Linears."""
    out = F.gelu(rms_norm(z, norm) @ w1.T) @ w2.T
    if dropout_p > 0.0:
        keep = torch.rand(out.shape, generator=generator, device=out.device) >= dropout_p
        out = out * keep / (1.0 - dropout_p)
    return z + out


def gumbel_noise(shape, generator=None, device=None) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, device=device)
    return -torch.log(-torch.log(u + 1e-20) + 1e-20)


def annealed_temperature(step: int, total_steps: int, start: float = 1.0, end: float = 0.001) -> float:
    """Geometric annealing of the gate temperature from ``start`` to ``end``."""
    frac = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return start * (end / start) ** frac


def fuser_forward(
    sharer_rows: torch.Tensor,
    receiver_rows: torch.Tensor,
    weights: FuserWeights,
    index: int,
    *,
    training: bool = False,
    dropout_p: float = 0.1,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
):
    """One fuser on flattened rows.

    ``sharer_rows`` is ``[T, Hs*Ds]``, ``receiver_rows`` ``[T, Ht*Dt]``. Returns
    ``(projection [T, Ht*Dt], head_logits [T, Ht], gate)`` in fp32, where ``gate`` is a 0-d
    hard gate in eval mode and a ``[T, Ht]`` Gumbel-sigmoid gate in training mode.
    """
    w = FuserWeights(*(t[index].float() for t in weights))
    p = dropout_p if training else 0.0
    s, x = sharer_rows.float(), receiver_rows.float()

    u = s @ w.w_in_sharer.T + x @ w.w_in_receiver.T + w.b_in
    u = ffn_block(u, w.ffn_norm[0], w.ffn_w1[0], w.ffn_w2[0], dropout_p=p, generator=generator)

    head = ffn_block(u, w.head_norm, w.head_w1, w.head_w2, dropout_p=p, generator=generator)
    head_logits = head @ w.w_head.T + w.b_head

    proj = u
    for b in range(1, w.ffn_w1.shape[0]):
        proj = ffn_block(proj, w.ffn_norm[b], w.ffn_w1[b], w.ffn_w2[b], dropout_p=p, generator=generator)
    projection = proj @ w.w_out.T + w.b_out

    if training:
        noise = gumbel_noise(head_logits.shape, generator=generator, device=head_logits.device)
        gate = torch.sigmoid((w.gate_logit + noise) / temperature)
    else:
        gate = (w.gate_logit > 0).float()
    return projection, head_logits, gate


def fused_rows(receiver_rows, projection, head_logits, gate, receiver_heads: int) -> torch.Tensor:
    """``x[h] + G * sigmoid(a[h]) * y[h]`` on flattened rows, fp32."""
    t = receiver_rows.shape[0]
    scale = (gate * torch.sigmoid(head_logits)).reshape(t, receiver_heads, 1)
    x = receiver_rows.float().reshape(t, receiver_heads, -1)
    return (x + scale * projection.reshape(t, receiver_heads, -1)).reshape(t, -1)


# ---- the cache-level ops, as ``torch.ops.c2c`` defines them --------------------------------

def slot_coords(view: torch.Tensor, slots: torch.Tensor):
    """(page, entry) of each slot in a 4-D ``[page, entry, head, dim]`` view."""
    slots = slots.long()
    return slots // view.shape[1], slots % view.shape[1]


def gather_rows(view: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    page, entry = slot_coords(view, slots)
    return view[page, entry].reshape(len(slots), view.shape[2] * view.shape[3])


def project(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights: FuserWeights, fusers):
    """Per entry ``i``: the projection and the gated head scale ``G*sigmoid(a)`` (fp32).

    Returns ``(projection [R, T, Ht*Dt], head_scale [R, T, Ht])``; rows of padding tokens are 0.
    Slots follow :mod:`c2c_kernels.slots` (an out-of-range slot raises, naming it).
    """
    t, ht, kt = receiver_slots.shape[0], weights.receiver_heads, weights.receiver_width
    dev = receiver_slots.device
    projection = torch.zeros(len(fusers), t, kt, device=dev)
    head_scale = torch.zeros(len(fusers), t, ht, device=dev)
    if not fusers or t == 0 or dev.type == "meta":
        return projection, head_scale
    rs, ss, errors = _slots.prepare(receiver_slots, sharer_slots, _slots.rows(receiver_caches[0]),
                                    _slots.rows(sharer_caches[0]), dedupe=False)
    _slots.raise_first(errors)
    valid = rs >= 0
    rs, ss = rs[valid], ss[valid]
    if rs.numel() == 0:
        return projection, head_scale
    for i, (rc, sc, f) in enumerate(zip(receiver_caches, sharer_caches, fusers)):
        y, a, gate = fuser_forward(gather_rows(sc, ss), gather_rows(rc, rs), weights, f)
        projection[i, valid] = y
        head_scale[i, valid] = gate * torch.sigmoid(a)
    return projection, head_scale


def merge(receiver_caches, receiver_slots, projections, head_scales):
    """``x += sum_j head_scale_j * projection_j`` per head, at the receiver slots, in place.

    ``projections`` / ``head_scales`` hold ``S * R`` entries (sharer-major within each
    receiver entry: entry ``r`` gets ``projections[r * S + j]``), each ``[T, Ht*Dt]`` /
    ``[T, Ht]``. The sum is formed in fp32 and rounded to the cache dtype once. Of several
    tokens with one receiver slot only the last is written (:mod:`c2c_kernels.slots`).
    """
    r = len(receiver_caches)
    s = len(projections) // r if r else 0
    if r == 0 or receiver_slots.numel() == 0 or receiver_slots.device.type == "meta":
        return
    rs, _, errors = _slots.prepare(receiver_slots, None, _slots.rows(receiver_caches[0]), 0, dedupe=True)
    _slots.raise_first(errors)
    valid = rs >= 0
    rs = rs[valid]
    if rs.numel() == 0:
        return
    for i, rc in enumerate(receiver_caches):
        page, entry = slot_coords(rc, rs)
        x = rc[page, entry].float()  # [T, Ht, Dt]
        for j in range(s):
            y = projections[i * s + j][valid].float().reshape(x.shape)
            a = head_scales[i * s + j][valid].float().reshape(*x.shape[:2], 1)
            x = x + a * y
        rc[page, entry] = x.to(rc.dtype)


def fuse(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights: FuserWeights, fusers):
    """Project then merge, one sharer: the semantics of ``torch.ops.c2c.fuse``.

    Every entry reads the receiver rows as they were when the call began.
    """
    projection, head_scale = project(
        receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers)
    merge(receiver_caches, receiver_slots, list(projection.unbind(0)), list(head_scale.unbind(0)))


def flops_per_token(weights: FuserWeights) -> int:
    """Multiply-adds x 2 of one fuser for one token (the GEMMs; elementwise work ignored)."""
    h, i, b = weights.hidden_dim, weights.intermediate_dim, weights.num_blocks
    macs = h * (weights.sharer_width + weights.receiver_width)  # input Linear
    macs += b * 2 * h * i  # FFN_1 and the projection blocks
    macs += 2 * h * h + h * weights.receiver_heads  # weight branch
    macs += h * weights.receiver_width  # output Linear
    return 2 * macs


def weight_bytes(weights: FuserWeights, fusers=None) -> int:
    per = sum(t[0].numel() * t.element_size() for t in weights)
    return per * (weights.num_fusers if fusers is None else len(fusers))


__all__ = [
    "rms_norm", "ffn_block", "gumbel_noise", "annealed_temperature", "fuser_forward",
    "fused_rows", "gather_rows", "project", "merge", "fuse", "flops_per_token", "weight_bytes",
]
