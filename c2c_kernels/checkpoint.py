"""Published fuser checkpoints <-> packed weights.

A checkpoint directory holds, per projector ``i``, ``projector_{i}.json`` (class and init
args) and ``projector_{i}.pt`` (a state dict with a key and a value fuser), plus
``projector_config.json``, the layer map ``{receiver: {sharer: {receiver_layer:
[[sharer_layer, projector], ...]}}}``. At load every fuser is packed once into the stacked
:class:`FuserWeights` (fuser ``2*i`` is projector ``i``'s keys, ``2*i + 1`` its values).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace

import torch

from .weights import FuserWeights

PROJECTOR_CLASS = "C2CProjector"
REQUIRED_ARGS = ("source_dim", "target_dim", "source_num_heads", "target_num_heads",
                 "hidden_dim", "intermediate_dim", "num_layers")
SIDES = ("key", "value")
# State-dict buffers that are carried through a round trip but take no part in inference.
PASSTHROUGH_BUFFERS = ("gate_temperature",)


class CheckpointError(ValueError):
    """A checkpoint file is missing or does not hold what the published format says."""


@dataclass(frozen=True)
class FuserParams:
    """The weights one receiver layer uses: views into the checkpoint's stacks."""

    weights: FuserWeights
    key_fuser: int
    value_fuser: int
    key_open: bool
    value_open: bool


@dataclass(frozen=True)
class FusedLayer:
    receiver_layer: int
    sharer_layer: int
    projector: int
    params: FuserParams
    receiver: int = 0
    sharer: int = 1


@dataclass
class Checkpoint:
    weights: FuserWeights
    gate_open: tuple[bool, ...]  # per fuser, read once at load so no call syncs on it
    projector_args: list[dict]
    mapping: dict[int, dict[int, dict[int, list[tuple[int, int]]]]]
    buffers: list[dict[str, torch.Tensor]] = field(default_factory=list)

    @property
    def layers(self) -> list[FusedLayer]:
        out = []
        for receiver, sharers in self.mapping.items():
            for sharer, layer_map in sharers.items():
                for receiver_layer, pairs in sorted(layer_map.items()):
                    for sharer_layer, projector in pairs:
                        out.append(FusedLayer(receiver_layer, sharer_layer, projector,
                                              self.params(projector), receiver, sharer))
        return out

    def params(self, projector: int) -> FuserParams:
        k, v = 2 * projector, 2 * projector + 1
        return FuserParams(self.weights, k, v, self.gate_open[k], self.gate_open[v])

    @property
    def num_projectors(self) -> int:
        return len(self.projector_args)

    def to(self, device=None, dtype=None) -> "Checkpoint":
        """A copy on ``device`` with weights in ``dtype`` (gate logits stay fp32)."""
        return replace(self, weights=self.weights.to(device=device, dtype=dtype))


def _read_json(path: str):
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _expected_shapes(args: dict) -> dict[str, tuple[int, ...]]:
    ks = args["source_dim"] * args["source_num_heads"]
    kt = args["target_dim"] * args["target_num_heads"]
    h, i, n, ht = args["hidden_dim"], args["intermediate_dim"], args["num_layers"], args["target_num_heads"]
    shapes = {}
    for side in SIDES:
        shapes[f"{side}_in.weight"] = (h, ks + kt)
        shapes[f"{side}_in.bias"] = (h,)
        blocks = [(f"{side}_mlp1.blocks.0", i), (f"{side}_scalar_mlp2.blocks.0", h)]
        blocks += [(f"{side}_proj_mlp2.blocks.{b}", i) for b in range(n - 2)]
        for prefix, inner in blocks:
            shapes[f"{prefix}.norm.weight"] = (h,)
            shapes[f"{prefix}.w1.weight"] = (inner, h)
            shapes[f"{prefix}.w2.weight"] = (h, inner)
        shapes[f"{side}_scalar_head.weight"] = (ht, h)
        shapes[f"{side}_scalar_head.bias"] = (ht,)
        shapes[f"{side}_proj_out.weight"] = (kt, h)
        shapes[f"{side}_proj_out.bias"] = (kt,)
        shapes[f"{side}_gate_logit"] = ()
    return shapes


def _check_state(path: str, state: dict, args: dict) -> None:
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    shapes = _expected_shapes(args)
    missing = sorted(set(shapes) - set(state))
    unknown = sorted(set(state) - set(shapes) - set(PASSTHROUGH_BUFFERS))
    if missing:
        raise CheckpointError(f"{path}: missing keys {missing}")
    if unknown:
        raise CheckpointError(f"{path}: unexpected keys {unknown} (not in the {PROJECTOR_CLASS} format)")
    for key, shape in shapes.items():
        got = tuple(state[key].shape)
        ok = got == shape or (shape == () and state[key].numel() == 1)
        if not ok:
            raise CheckpointError(f"{path}: {key} has shape {list(got)}, expected {list(shape)} "
                                  f"from the init_args in the projector's json")


def _pack_side(state: dict, side: str, args: dict) -> list[torch.Tensor]:
    ks = args["source_dim"] * args["source_num_heads"]
    n = args["num_layers"]
    w_in = state[f"{side}_in.weight"]
    blocks = [f"{side}_mlp1.blocks.0"] + [f"{side}_proj_mlp2.blocks.{b}" for b in range(n - 2)]
    head = f"{side}_scalar_mlp2.blocks.0"
    return [
        w_in[:, :ks], w_in[:, ks:], state[f"{side}_in.bias"],
        torch.stack([state[f"{b}.norm.weight"] for b in blocks]),
        torch.stack([state[f"{b}.w1.weight"] for b in blocks]),
        torch.stack([state[f"{b}.w2.weight"] for b in blocks]),
        state[f"{head}.norm.weight"], state[f"{head}.w1.weight"], state[f"{head}.w2.weight"],
        state[f"{side}_scalar_head.weight"], state[f"{side}_scalar_head.bias"],
        state[f"{side}_proj_out.weight"], state[f"{side}_proj_out.bias"],
        state[f"{side}_gate_logit"].reshape(()).float(),
    ]


def _unpack_side(weights: FuserWeights, fuser: int, side: str) -> dict[str, torch.Tensor]:
    w = [t[fuser].detach().cpu() for t in weights]
    (w_in_s, w_in_r, b_in, ffn_norm, ffn_w1, ffn_w2, head_norm, head_w1, head_w2,
     w_head, b_head, w_out, b_out, gate) = w
    state = {f"{side}_in.weight": torch.cat([w_in_s, w_in_r], 1), f"{side}_in.bias": b_in}
    blocks = [f"{side}_mlp1.blocks.0"] + [f"{side}_proj_mlp2.blocks.{b}" for b in range(ffn_w1.shape[0] - 1)]
    for b, prefix in enumerate(blocks):
        state.update({f"{prefix}.norm.weight": ffn_norm[b], f"{prefix}.w1.weight": ffn_w1[b],
                      f"{prefix}.w2.weight": ffn_w2[b]})
    head = f"{side}_scalar_mlp2.blocks.0"
    state.update({f"{head}.norm.weight": head_norm, f"{head}.w1.weight": head_w1,
                  f"{head}.w2.weight": head_w2,
                  f"{side}_scalar_head.weight": w_head, f"{side}_scalar_head.bias": b_head,
                  f"{side}_proj_out.weight": w_out, f"{side}_proj_out.bias": b_out,
                  f"{side}_gate_logit": gate.clone()})
    return {k: v.contiguous() for k, v in state.items()}


def _parse_mapping(path: str, raw, num_projectors: int):
    def as_int(key, what):
        try:
            value = int(key)
        except (TypeError, ValueError):
            raise CheckpointError(f"{path}: {what} {key!r} is not an integer") from None
        if value < 0:
            raise CheckpointError(f"{path}: {what} {key!r} is negative")
        return value

    if not isinstance(raw, dict) or not raw:
        raise CheckpointError(f"{path}: expected a non-empty object {{receiver: {{sharer: {{layer: [[sharer_layer, projector], ...]}}}}}}")
    mapping = {}
    for r_key, sharers in raw.items():
        r = as_int(r_key, "receiver index")
        mapping[r] = {}
        for s_key, layers in (sharers or {}).items():
            s = as_int(s_key, "sharer index")
            mapping[r][s] = {}
            for l_key, pairs in (layers or {}).items():
                layer = as_int(l_key, "receiver layer")
                entries = []
                for pair in pairs:
                    if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                        raise CheckpointError(f"{path}: receiver layer {layer}: expected "
                                              f"[sharer_layer, projector] pairs, got {pair!r}")
                    sharer_layer, projector = (as_int(v, "index") for v in pair)
                    if projector >= num_projectors:
                        raise CheckpointError(
                            f"{path}: receiver layer {layer} names projector {projector}, but the "
                            f"directory holds projector_0 .. projector_{num_projectors - 1}")
                    entries.append((sharer_layer, projector))
                mapping[r][s][layer] = entries
    return mapping


def load_checkpoint(directory: str, device=None, dtype=None) -> Checkpoint:
    """Load a published fuser directory and pack its weights for the kernels."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: not a directory")
    count = 0
    while os.path.exists(os.path.join(directory, f"projector_{count}.json")):
        count += 1
    if count == 0:
        raise CheckpointError(f"{directory}: no projector_0.json found (expected projector_{{i}}.json/.pt files)")
    args_list, sides, buffers = [], [], []
    for i in range(count):
        json_path = os.path.join(directory, f"projector_{i}.json")
        meta = _read_json(json_path)
        if not isinstance(meta, dict) or meta.get("class") != PROJECTOR_CLASS:
            got = meta.get("class") if isinstance(meta, dict) else type(meta).__name__
            raise CheckpointError(f"{json_path}: class {got!r} is not supported (expected {PROJECTOR_CLASS!r})")
        args = meta.get("init_args")
        if not isinstance(args, dict):
            raise CheckpointError(f"{json_path}: missing the 'init_args' object")
        absent = [k for k in REQUIRED_ARGS if k not in args]
        if absent:
            raise CheckpointError(f"{json_path}: init_args lacks {absent}")
        if args["num_layers"] < 3:
            raise CheckpointError(f"{json_path}: num_layers is {args['num_layers']}, expected >= 3")
        if args_list and any(args[k] != args_list[0][k] for k in REQUIRED_ARGS):
            diff = {k: (args_list[0][k], args[k]) for k in REQUIRED_ARGS if args[k] != args_list[0][k]}
            raise CheckpointError(f"{json_path}: shapes differ from projector_0 {diff}; all projectors "
                                  f"of one checkpoint must share shapes to be stacked")
        pt_path = os.path.join(directory, f"projector_{i}.pt")
        if not os.path.isfile(pt_path):
            raise CheckpointError(f"{pt_path}: file not found")
        try:
            state = torch.load(pt_path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for corrupt files
            raise CheckpointError(f"{pt_path}: cannot be read as a torch state dict ({e})") from None
        _check_state(pt_path, state, args)
        args_list.append(args)
        sides += [_pack_side(state, side, args) for side in SIDES]
        buffers.append({k: state[k] for k in PASSTHROUGH_BUFFERS if k in state})
    weights = FuserWeights(*(torch.stack(ts).contiguous() for ts in zip(*sides)))
    config_path = os.path.join(directory, "projector_config.json")
    mapping = _parse_mapping(config_path, _read_json(config_path), count)
    gate_open = tuple(bool(g > 0) for g in weights.gate_logit.tolist())
    ckpt = Checkpoint(weights, gate_open, args_list, mapping, buffers)
    return ckpt.to(device=device, dtype=dtype) if (device is not None or dtype is not None) else ckpt


def save_checkpoint(ckpt: Checkpoint, directory: str) -> None:
    """Write ``ckpt`` in the published format (round-trips through :func:`load_checkpoint`)."""
    os.makedirs(directory, exist_ok=True)
    for i, args in enumerate(ckpt.projector_args):
        with open(os.path.join(directory, f"projector_{i}.json"), "w") as f:
            json.dump({"class": PROJECTOR_CLASS, "init_args": args}, f, indent=2)
        state = {}
        for j, side in enumerate(SIDES):
            state.update(_unpack_side(ckpt.weights, 2 * i + j, side))
        if i < len(ckpt.buffers):
            state.update(ckpt.buffers[i])
        torch.save(state, os.path.join(directory, f"projector_{i}.pt"))
    raw = {str(r): {str(s): {str(layer): [list(p) for p in pairs] for layer, pairs in lm.items()}
                    for s, lm in sharers.items()} for r, sharers in ckpt.mapping.items()}
    with open(os.path.join(directory, "projector_config.json"), "w") as f:
        json.dump(raw, f, indent=2)


def last_aligned_map(receiver_layers: int, sharer_layers: int) -> dict[int, int]:
    """Receiver layer ``l`` reads sharer layer ``l + (Ls - Lt)`` when that index is valid."""
    offset = sharer_layers - receiver_layers
    return {l: l + offset for l in range(receiver_layers) if 0 <= l + offset < sharer_layers}


def make_checkpoint(weights: FuserWeights, layer_map: dict[int, int], sharer_heads: int,
                    receiver: int = 0, sharer: int = 1, dropout: float = 0.1) -> Checkpoint:
    """A checkpoint from packed weights (``2 * len(layer_map)`` fusers, one projector per layer)."""
    if weights.num_fusers != 2 * len(layer_map):
        raise ValueError(f"weights hold {weights.num_fusers} fusers; the layer map needs {2 * len(layer_map)}")
    ht = weights.receiver_heads
    projector_args = {
        "source_dim": weights.sharer_width // sharer_heads, "target_dim": weights.receiver_width // ht,
        "source_num_heads": sharer_heads, "target_num_heads": ht,
        "hidden_dim": weights.hidden_dim, "intermediate_dim": weights.intermediate_dim,
        "num_layers": weights.num_blocks + 1, "dropout": dropout,
    }
    mapping = {receiver: {sharer: {l: [(s, p)] for p, (l, s) in enumerate(sorted(layer_map.items()))}}}
    gate_open = tuple(bool(g > 0) for g in weights.gate_logit.tolist())
    return Checkpoint(weights, gate_open, [dict(projector_args) for _ in layer_map], mapping,
                      [{} for _ in layer_map])
