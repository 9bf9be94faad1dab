"""The packed weight format every backend reads, and its schema.

A *fuser* is one projector side (keys or values). All fusers of a checkpoint have the same
shapes, so their weights are stacked along a leading fuser dimension ``P`` once, at load
time: a backend computes any subset of fusers in one launch per stage, and the weights of a
single layer are zero-copy ``select`` views of the stacks.

Linear weights keep the ``nn.Linear`` layout ``[out_features, in_features]``: row-major with
the reduction dimension contiguous, which is what both cuBLAS (``B^T``) and Triton tiles want.

:data:`FIELDS` is the one description of the stacks: their order, symbolic shapes, which stay
fp32, and the published state-dict key each is packed from. :class:`FuserWeights`, the op
layer's shape checks (``ops.check_weights``), checkpoint packing (``checkpoint.py``) and the
random test checkpoints (``testing.py``) derive from it; the native code reads the same order
from ``csrc/fuser_weights.h`` (``tests/test_weight_schema.py`` keeps the two in step).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class Dim:
    """A symbolic dimension: its name in error messages, and the stack axis it is read from."""

    name: str
    field: str
    axis: int


# Read from the fields in this order (the op layer checks those fields' ranks in this order).
DIMS: dict[str, Dim] = {
    "P": Dim("fusers", "w_in_sharer", 0),
    "H": Dim("hidden", "w_in_sharer", 1),
    "Ks": Dim("sharer_width", "w_in_sharer", 2),  # Hs * Ds
    "B": Dim("blocks", "ffn_w1", 1),  # n - 1 FFN blocks: FFN_1, then the projection blocks
    "I": Dim("intermediate", "ffn_w1", 2),
    "Ht": Dim("receiver_heads", "w_head", 1),
    "Kt": Dim("receiver_width", "w_in_receiver", 2),  # Ht * Dt
}


@dataclass(frozen=True)
class Field:
    """One stacked tensor.

    ``key`` is the published state-dict key of one fuser's tensor: ``{side}`` is ``key`` or
    ``value``; ``{block}`` (fields shaped ``[P, B, ...]``) is each FFN block's module in turn
    (:func:`ffn_blocks`). Fields with ``split`` share one published tensor, concatenated along
    its last dimension in field order. ``scale``/``mean`` say how random test weights are drawn
    (matrices ``scale * randn / sqrt(fan_in)``, vectors ``mean + 0.1 * randn``).
    """

    name: str
    shape: tuple[str, ...]
    key: str
    fp32: bool = False  # kept float32 whatever the weights' dtype
    split: bool = False
    scale: float = 1.0
    mean: float = 0.0

    @property
    def stacked(self) -> bool:
        """Stacked over the FFN blocks (``[P, B, ...]``)."""
        return self.shape[1:2] == ("B",)


_HEAD_BLOCK = "{side}_scalar_mlp2.blocks.0"

FIELDS: tuple[Field, ...] = (
    Field("w_in_sharer", ("P", "H", "Ks"), "{side}_in.weight", split=True),  # sharer half of W_in
    Field("w_in_receiver", ("P", "H", "Kt"), "{side}_in.weight", split=True),  # receiver half
    Field("b_in", ("P", "H"), "{side}_in.bias"),
    Field("ffn_norm", ("P", "B", "H"), "{block}.norm.weight", mean=1.0),
    Field("ffn_w1", ("P", "B", "I", "H"), "{block}.w1.weight"),
    Field("ffn_w2", ("P", "B", "H", "I"), "{block}.w2.weight", scale=0.5),
    Field("head_norm", ("P", "H"), _HEAD_BLOCK + ".norm.weight", mean=1.0),  # the weight branch's FFN
    Field("head_w1", ("P", "H", "H"), _HEAD_BLOCK + ".w1.weight"),
    Field("head_w2", ("P", "H", "H"), _HEAD_BLOCK + ".w2.weight", scale=0.5),
    Field("w_head", ("P", "Ht", "H"), "{side}_scalar_head.weight"),  # one logit per receiver head
    Field("b_head", ("P", "Ht"), "{side}_scalar_head.bias"),
    Field("w_out", ("P", "Kt", "H"), "{side}_proj_out.weight", scale=0.5),
    Field("b_out", ("P", "Kt"), "{side}_proj_out.bias"),
    Field("gate_logit", ("P",), "{side}_gate_logit", fp32=True),  # hard gate at inference: open iff > 0
)
FIELD_NAMES = tuple(f.name for f in FIELDS)
FIELD_SHAPES = {f.name: f.shape for f in FIELDS}
# The fields the dimensions are read from, in the order the op layer checks their ranks.
DIM_FIELDS = tuple(dict.fromkeys(d.field for d in DIMS.values()))
# The published class's module order, which its state dicts follow (test checkpoints are drawn
# in this order, so their random values do not depend on the field order above).
_MODULE_ORDER = ("_in.", "_mlp1.", "_scalar_mlp2.", "_proj_mlp2.", "_scalar_head.", "_proj_out.", "_gate_logit")


def ffn_blocks(side: str, blocks: int) -> list[str]:
    """The published modules of the ``B`` FFN blocks stacked in ``ffn_*``: FFN_1, then the
    ``n - 2`` projection blocks."""
    return [f"{side}_mlp1.blocks.0"] + [f"{side}_proj_mlp2.blocks.{b}" for b in range(blocks - 1)]


def research_dims(args) -> dict[str, int]:
    """The dimensions (all but ``P``) that a projector's init args fix."""
    return {"H": args["hidden_dim"], "I": args["intermediate_dim"], "B": args["num_layers"] - 1,
            "Ks": args["source_dim"] * args["source_num_heads"],
            "Kt": args["target_dim"] * args["target_num_heads"], "Ht": args["target_num_heads"]}


class Published(NamedTuple):
    """One published tensor of a side: its key, shape, and the field parts it holds."""

    key: str
    shape: tuple[int, ...]
    parts: tuple[tuple[int, int | None], ...]  # (field index, FFN block or None)
    field: Field  # the first field it feeds (its init)


def published_layout(dims, side: str) -> list[Published]:
    """Every published tensor of one side, in the published module order."""
    out: dict[str, list] = {}
    for i, f in enumerate(FIELDS):
        per = [dims[s] for s in f.shape[1 + f.stacked:]]
        blocks = ffn_blocks(side, dims["B"]) if f.stacked else [None]
        for b, module in enumerate(blocks):
            key = f.key.format(side=side, block=module)
            if key in out:  # a split tensor: widen its last dimension
                if not (f.split and out[key][3].split):
                    raise ValueError(f"weight schema: {f.name} reuses the published key {key!r} without split=True")
                out[key][1][-1] += per[-1]
                out[key][2].append((i, None))
            else:
                out[key] = [key, list(per), [(i, b if f.stacked else None)], f]

    def rank(entry):
        key = entry[0]
        # A module the published class did not have (a new variant's) goes last.
        module = next((m for m, part in enumerate(_MODULE_ORDER) if part in key), len(_MODULE_ORDER))
        block = entry[2][0][1]
        return module, block or 0

    return [Published(k, tuple(s), tuple(p), f) for k, s, p, f in sorted(out.values(), key=rank)]


def pack_side(state, side: str, dims) -> list[torch.Tensor]:
    """One fuser's tensors, in field order, from a (checked) published state dict."""
    out = []
    for f in FIELDS:
        if f.stacked:
            t = torch.stack([state[f.key.format(side=side, block=m)] for m in ffn_blocks(side, dims["B"])])
        else:
            t = state[f.key.format(side=side)]
        if f.split:
            offset = sum(dims[g.shape[-1]] for g in FIELDS[:FIELDS.index(f)] if g.split and g.key == f.key)
            t = t[..., offset:offset + dims[f.shape[-1]]]
        if len(f.shape) == 1:
            t = t.reshape(())
        out.append(t.float() if f.fp32 else t)
    return out


def unpack_side(tensors, side: str) -> dict[str, torch.Tensor]:
    """The published state dict of one fuser from its tensors (field order, ``P`` dropped)."""
    tensors = list(tensors)
    dims = {s: tensors[FIELD_NAMES.index(d.field)].shape[d.axis - 1] for s, d in DIMS.items() if s != "P"}
    state = {}
    for entry in published_layout(dims, side):
        parts = [tensors[i] if b is None else tensors[i][b] for i, b in entry.parts]
        if len(parts) > 1:
            state[entry.key] = torch.cat(parts, -1)
        else:  # a 0-d gate logit is copied out of its stack; the others stay views until saved
            state[entry.key] = parts[0].clone() if parts[0].dim() == 0 else parts[0]
    return {k: v.contiguous() for k, v in state.items()}


_DIM_AT = {s: (FIELD_NAMES.index(d.field), d.axis) for s, d in DIMS.items()}
# For the op layer's per-call check (c2c_kernels.ops.check_weights), precomputed: the stack
# and axis of each dimension (in DIMS order), and (stack, rank) of the stacks they are read from.
DIM_AT = tuple(_DIM_AT.values())
DIM_RANKS = tuple((FIELD_NAMES.index(name), len(FIELD_SHAPES[name])) for name in DIM_FIELDS)


def _stack_shapes(sizes: tuple) -> tuple[tuple[int, ...], ...]:
    at = dict(zip(DIMS, sizes))
    return tuple(tuple(at[s] for s in f.shape) for f in FIELDS)


_cached_stack_shapes = functools.lru_cache(maxsize=64)(_stack_shapes)


def stack_shapes(sizes: tuple) -> tuple[tuple[int, ...], ...]:
    """Every field's shape for the dimension sizes ``sizes`` (in :data:`DIMS` order)."""
    try:
        return _cached_stack_shapes(sizes)
    except TypeError:  # symbolic sizes (torch.compile with dynamic shapes) are not hashable
        return _stack_shapes(sizes)


_Stacks = NamedTuple("_Stacks", [(f.name, torch.Tensor) for f in FIELDS])


class FuserWeights(_Stacks):
    """Stacked weights of ``P`` fusers: one tensor per :data:`FIELDS` entry, in that order
    (shapes there; ``Ks = Hs*Ds``, ``Kt = Ht*Dt``, ``B = n - 1`` FFN blocks)."""

    __slots__ = ()

    def dim(self, symbol: str) -> int:
        """The size of a symbolic dimension of :data:`DIMS` (``"H"``, ``"Kt"``, ...)."""
        field, axis = _DIM_AT[symbol]
        return self[field].shape[axis]

    @property
    def num_fusers(self) -> int:
        return self.dim("P")

    @property
    def hidden_dim(self) -> int:
        return self.dim("H")

    @property
    def intermediate_dim(self) -> int:
        return self.dim("I")

    @property
    def num_blocks(self) -> int:
        """FFN blocks on the projection path (FFN_1 plus the ``n - 2`` projection blocks)."""
        return self.dim("B")

    @property
    def sharer_width(self) -> int:
        return self.dim("Ks")

    @property
    def receiver_width(self) -> int:
        return self.dim("Kt")

    @property
    def receiver_heads(self) -> int:
        return self.dim("Ht")

    @property
    def dtype(self) -> torch.dtype:
        return self.w_in_sharer.dtype

    @property
    def device(self) -> torch.device:
        return self.w_in_sharer.device

    def to(self, device=None, dtype=None) -> "FuserWeights":
        """Move/cast every stack; the fp32 fields (the gate logits: only their sign matters) stay fp32."""
        return FuserWeights(*(
            t.to(device=device, dtype=torch.float32 if f.fp32 else dtype) for f, t in zip(FIELDS, self)
        ))


def random_weights(
    num_fusers: int,
    sharer_heads: int,
    sharer_head_dim: int,
    receiver_heads: int,
    receiver_head_dim: int,
    hidden_dim: int = 1024,
    intermediate_dim: int = 1024,
    num_layers: int = 3,
    *,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    seed: int = 0,
    gates_open: bool | list[bool] = True,
) -> FuserWeights:
    """Random fuser weights scaled like a trained fuser (activations stay O(1)).

    Used by tests and benchmarks: nothing is downloaded.
    """
    if num_layers < 3:
        raise ValueError(f"num_layers must be >= 3 (docs/fuser.md), got {num_layers}")
    g = torch.Generator().manual_seed(seed)
    ks, kt = sharer_heads * sharer_head_dim, receiver_heads * receiver_head_dim
    h, i, b, p = hidden_dim, intermediate_dim, num_layers - 1, num_fusers

    def lin(*shape):
        return torch.randn(*shape, generator=g) / shape[-1] ** 0.5

    def vec(*shape, scale=0.1, mean=0.0):
        return mean + scale * torch.randn(*shape, generator=g)

    if isinstance(gates_open, bool):
        gates_open = [gates_open] * p
    if len(gates_open) != p:
        raise ValueError(f"gates_open has {len(gates_open)} entries, expected {p}")
    gate = torch.tensor([1.0 if o else -1.0 for o in gates_open]) * (0.5 + torch.rand(p, generator=g))
    w = FuserWeights(
        w_in_sharer=lin(p, h, ks) / 2**0.5,
        w_in_receiver=lin(p, h, kt) / 2**0.5,
        b_in=vec(p, h),
        ffn_norm=vec(p, b, h, mean=1.0),
        ffn_w1=lin(p, b, i, h),
        ffn_w2=lin(p, b, h, i) * 0.5,
        head_norm=vec(p, h, mean=1.0),
        head_w1=lin(p, h, h),
        head_w2=lin(p, h, h) * 0.5,
        w_head=lin(p, receiver_heads, h),
        b_head=vec(p, receiver_heads),
        w_out=lin(p, kt, h) * 0.5,
        b_out=vec(p, kt),
        gate_logit=gate,
    )
    return w.to(device=device, dtype=dtype)
