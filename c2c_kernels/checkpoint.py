"""Published fuser checkpoints <-> packed weights.

A checkpoint directory holds, per projector ``i``, ``projector_{i}.json`` (class and init
args) and ``projector_{i}.pt`` (a state dict with a key and a value fuser), plus
``projector_config.json``, the layer map ``{receiver: {sharer: {receiver_layer:
[[sharer_layer, projector], ...]}}}``. At load every fuser is packed once into the stacked
:class:`FuserWeights` (fuser ``2*i`` is projector ``i``'s keys, ``2*i + 1`` its values).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from .ops import CACHE_DTYPES
from .weights import FuserWeights, pack_side, published_layout, research_dims, unpack_side

PROJECTOR_CLASS = "C2CProjector"
# Init arguments that fix the tensor shapes. The first two have no default in the research
# class; the others fall back to its defaults when a projector's json omits them.
REQUIRED_ARGS = ("source_dim", "target_dim")
ARG_DEFAULTS = {"source_num_heads": 1, "target_num_heads": 1, "intermediate_dim": 1024,
                "hidden_dim": 1024, "num_layers": 3}
SHAPE_ARGS = REQUIRED_ARGS + tuple(ARG_DEFAULTS)
SIDES = ("key", "value")
# State-dict buffers that are carried through a round trip but take no part in inference.
PASSTHROUGH_BUFFERS = ("gate_temperature",)
# Training init args of the research class (its defaults when a projector's json omits them):
# the dropout after each FFN and the gate temperature's geometric schedule.
TRAINING_ARG_DEFAULTS = {"dropout": 0.1, "initial_temperature": 1.0, "final_temperature": 0.001,
                         "anneal_steps": 1929}
PAIRS = ("first", "all")


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


class FrozenDict(dict):
    """A read-only dict: a checkpoint's layer map and args cannot be edited in place, so what
    was planned from them stays true. Edit with ``ckpt.replace(mapping=...)``."""

    def _read_only(self, *args, **kwargs):
        raise TypeError("this mapping belongs to a Checkpoint and is read-only; build an edited "
                        "checkpoint with ckpt.replace(mapping=...) (or projector_args=...)")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _read_only
    __ior__ = _read_only

    def __reduce__(self):
        return (FrozenDict, (dict(self),))

    def __deepcopy__(self, memo):
        return FrozenDict({copy.deepcopy(k, memo): copy.deepcopy(v, memo) for k, v in self.items()})


def _version(t: torch.Tensor):
    return None if t.is_inference() else t._version  # inference tensors have no counter


class _GateStamp:
    """The open/closed bit of every fuser, read from ``tensor`` when its version counter was
    ``version``. Any in-place write to the tensor bumps the counter, so a stale stamp is seen
    without looking at the (device) values."""

    __slots__ = ("tensor", "version", "bits")

    def __init__(self, tensor: torch.Tensor, bits: tuple[bool, ...] | None = None):
        self.tensor, self.version = tensor, _version(tensor)
        self.bits = _read_gate_bits(tensor) if bits is None else tuple(bits)

    def matches(self, tensor: torch.Tensor) -> bool:
        return self.tensor is tensor and self.version == _version(tensor)


def _read_gate_bits(gate: torch.Tensor) -> tuple[bool, ...]:
    if gate.device.type == "meta":  # no values: plan every fuser (the kernels gate again anyway)
        return (True,) * gate.numel()
    return tuple(bool(g > 0) for g in gate.detach().float().cpu().tolist())


class _Derived:
    """What fusion needs from a checkpoint, computed once from its (immutable) layer map and
    gate bits: the layer list and, per sharer, the plan ``fuse_all`` runs."""

    __slots__ = ("bits", "layers", "sharers", "plans")


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A loaded fuser checkpoint: stacked weights, per-projector init args, the layer map.

    Immutable, so the plan ``fuse_all`` runs is computed once, here, and is never stale: the
    layer map and args are read-only (an in-place edit raises ``TypeError``); edit with
    :meth:`replace` (``dataclasses.replace`` works too), which builds a new checkpoint.
    Having no cache to fill at call time also keeps ``fuse_all`` traceable by
    ``torch.compile(fullgraph=True)``.

    The gate logits are tensors, so they can still be written in place (e.g.
    ``ckpt.weights.gate_logit[i] = 1.0`` to re-open a fuser). The open/closed bits are read once
    (one host sync) and stamped with the tensor's version counter; the next :meth:`fusion_plan`,
    :attr:`layers` or :attr:`gate_open` sees the bump and re-reads them, so a re-opened gate is
    fused. Writes through ``.data`` bypass the counter and are not seen; a compiled ``fuse_all``
    keeps the plan it was traced with. :class:`FuserParams` taken before an edit are snapshots.

    ``pairs`` says what a receiver layer mapped to several ``(sharer_layer, projector)`` pairs
    fuses: ``"first"`` (the default, what the research pipeline does) only the first pair;
    ``"all"`` every pair, in file order, each on the rows the previous one wrote (what a loop
    over ``ckpt.layers`` with :func:`c2c_kernels.fuse` does). The layer map keeps every pair
    either way, and :func:`save_checkpoint` writes them all.
    """

    weights: FuserWeights
    projector_args: tuple[Mapping[str, Any], ...]
    mapping: Mapping[int, Mapping[int, Mapping[int, tuple[tuple[int, int], ...]]]]
    buffers: tuple[Mapping[str, torch.Tensor], ...] = ()
    pairs: str = "first"
    # Private: gate bits already known for ``weights.gate_logit`` (checked against the tensor
    # and its version counter before use, so ``replace`` cannot carry stale bits over).
    _gate_stamp: _GateStamp | None = field(default=None, repr=False)

    def __post_init__(self):
        def fail(msg):
            raise ValueError(msg)

        w = self.weights
        if not isinstance(w, FuserWeights):
            fail(f"weights: expected a FuserWeights, got {type(w).__name__}")
        if w.dtype not in CACHE_DTYPES:
            fail(f"weights: dtype {w.dtype} is not supported by the fusion backends (expected one of "
                 f"{list(CACHE_DTYPES)}); cast the weights first")
        if self.pairs not in PAIRS:
            fail(f"pairs: expected one of {list(PAIRS)}, got {self.pairs!r}")
        args = tuple(FrozenDict(a) for a in self.projector_args)
        if w.num_fusers != 2 * len(args):
            fail(f"weights hold {w.num_fusers} fusers; {len(args)} projectors need {2 * len(args)}")
        mapping = _normalize_mapping(self.mapping, len(args), "mapping", fail, json_keys=False)
        buffers = tuple(FrozenDict(b) for b in self.buffers)
        gate = w.gate_logit
        stamp = self._gate_stamp
        known = stamp.bits if stamp is not None and stamp.matches(gate) else None
        if gate.is_inference():
            # Inference tensors have no version counter: own a normal copy (P floats) so that
            # in-place gate edits stay visible.
            with torch.inference_mode(False):
                gate = gate.clone()
            w = w._replace(gate_logit=gate)
        stamp = _GateStamp(gate, known)
        for name, value in (("weights", w), ("projector_args", args), ("mapping", mapping),
                            ("buffers", buffers), ("_gate_stamp", stamp)):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_derived", self._derive(stamp.bits))

    def _derive(self, bits: tuple[bool, ...]) -> _Derived:
        d = _Derived()
        d.bits = bits
        layers = []
        for receiver, sharers in self.mapping.items():
            for sharer, layer_map in sharers.items():
                for receiver_layer, pairs in sorted(layer_map.items()):
                    for sharer_layer, projector in (pairs[:1] if self.pairs == "first" else pairs):
                        k, v = 2 * projector, 2 * projector + 1
                        params = FuserParams(self.weights, k, v, bits[k], bits[v])
                        layers.append(FusedLayer(receiver_layer, sharer_layer, projector, params,
                                                 receiver, sharer))
        d.layers = tuple(layers)
        d.sharers = tuple(sorted({layer.sharer for layer in layers}))
        d.plans = {s: _plan_rounds([layer for layer in layers if layer.sharer == s]) for s in d.sharers}
        if len(d.sharers) <= 1:
            d.plans[None] = d.plans[d.sharers[0]] if d.sharers else ()
        return d

    def _refresh(self) -> _Derived:
        """Re-read the gate bits if ``weights.gate_logit`` was written since they were read."""
        gate = self.weights.gate_logit
        if not self._gate_stamp.matches(gate):
            stamp = _GateStamp(gate)
            object.__setattr__(self, "_gate_stamp", stamp)
            if stamp.bits != self._derived.bits:
                object.__setattr__(self, "_derived", self._derive(stamp.bits))
        return self._derived

    def fusion_plan(self, sharer: int | None = None):
        """What :func:`c2c_kernels.fuse_all` runs for ``sharer`` (None: the checkpoint's only
        sharer): rounds of ``(receiver_layer, side, sharer_layer, fuser)`` for every open
        fuser, side 0 = keys, 1 = values. No receiver view appears twice in one round; a round
        is one op call, and rounds run in order (several only with ``pairs="all"``)."""
        # Under tracing the plan is a constant of the graph (reading the version counter of a
        # fake tensor means nothing).
        d = self._derived if torch.compiler.is_compiling() else self._refresh()
        if sharer is None and len(d.sharers) > 1:
            raise ValueError(f"checkpoint maps sharers {list(d.sharers)}: pass sharer= to pick one")
        return d.plans.get(sharer, ())

    @property
    def layers(self) -> tuple[FusedLayer, ...]:
        """Every fused ``(receiver layer, sharer layer, projector)``, receiver layers ascending
        (with ``pairs="all"``, a layer's pairs in file order)."""
        return self._refresh().layers

    @property
    def gate_open(self) -> tuple[bool, ...]:
        """Per fuser: is its gate open (logit > 0)."""
        return self._refresh().bits

    def params(self, projector: int) -> FuserParams:
        k, v = 2 * projector, 2 * projector + 1
        bits = self.gate_open
        return FuserParams(self.weights, k, v, bits[k], bits[v])

    @property
    def num_projectors(self) -> int:
        return len(self.projector_args)

    def replace(self, **changes) -> "Checkpoint":
        """A new checkpoint with some fields changed (``mapping=``, ``pairs=``, ...)."""
        return dataclasses.replace(self, **changes)

    def training_args(self) -> dict[str, Any]:
        """``dropout``, ``initial_temperature``, ``final_temperature`` and ``anneal_steps`` from
        the projectors' json (the research class's defaults for any it omits); every projector
        of a checkpoint must agree, as one trainer schedule drives them all."""
        out = None
        for i, args in enumerate(self.projector_args):
            got = {}
            for name, default in TRAINING_ARG_DEFAULTS.items():
                value = args.get(name, default)
                numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
                if name == "anneal_steps":
                    if type(value) is not int or value < 1:
                        raise CheckpointError(f"projector_{i}: init_args.anneal_steps is {_describe(value)}, "
                                              f"expected an integer >= 1")
                elif name == "dropout":
                    if not (numeric and 0.0 <= value < 1.0):
                        raise CheckpointError(f"projector_{i}: init_args.dropout is {_describe(value)}, "
                                              f"expected a probability in [0, 1)")
                elif not (numeric and value > 0):
                    raise CheckpointError(f"projector_{i}: init_args.{name} is {_describe(value)}, "
                                          f"expected a positive number")
                got[name] = value
            if out is not None and got != out:
                raise CheckpointError(f"projector_{i}: training args {got} differ from projector_0's {out}; one "
                                      f"schedule trains every projector of a checkpoint")
            out = got
        return dict(TRAINING_ARG_DEFAULTS) if out is None else out

    def with_weights(self, weights: FuserWeights, *, gate_temperature: float | None = None,
                     training_args: Mapping[str, Any] | None = None) -> "Checkpoint":
        """This checkpoint with other weights (e.g. a trainer's, ``FuserTrainer.export()``): the
        documented way to export trained fusers. ``gate_temperature`` is written as every
        projector's ``gate_temperature`` buffer (the research class's current temperature, which
        its loader restores); ``training_args`` (``dropout``, ``initial_temperature``,
        ``final_temperature``, ``anneal_steps``) update each projector's json. Float64 gate
        logits are cast to fp32 here (the fusion ops take fp32 gates): keep the trainer for
        float64 work."""
        if not isinstance(weights, FuserWeights):
            raise ValueError(f"weights: expected a FuserWeights, got {type(weights).__name__}")
        if weights.num_fusers != self.weights.num_fusers:
            raise ValueError(f"weights: {weights.num_fusers} fusers, this checkpoint holds {self.weights.num_fusers}")
        for name, new, old in zip(FuserWeights._fields, weights, self.weights):
            if new.shape != old.shape:
                raise ValueError(f"weights.{name}: shape {list(new.shape)}, this checkpoint's is {list(old.shape)}")
        weights = FuserWeights(*weights).to(dtype=weights.dtype)  # gate logits fp32
        unknown = sorted(set(training_args or {}) - set(TRAINING_ARG_DEFAULTS))
        if unknown:
            raise ValueError(f"training_args: unknown names {unknown} (expected some of {list(TRAINING_ARG_DEFAULTS)})")
        args = tuple({**a, **(training_args or {})} for a in self.projector_args)
        buffers = [dict(b) for b in self.buffers] + [{} for _ in range(len(args) - len(self.buffers))]
        if gate_temperature is not None:
            if not (isinstance(gate_temperature, (int, float)) and gate_temperature > 0):
                raise ValueError(f"gate_temperature: expected a positive number, got {gate_temperature!r}")
            dtype = weights.dtype
            buffers = [{**b, "gate_temperature": torch.tensor(float(gate_temperature), dtype=dtype)} for b in buffers]
        return dataclasses.replace(self, weights=weights, projector_args=args, buffers=tuple(buffers),
                                   _gate_stamp=None)

    def to(self, device=None, dtype=None) -> "Checkpoint":
        """A copy on ``device`` with weights in ``dtype`` (gate logits stay fp32)."""
        _check_dtype_arg(dtype)
        bits = self.gate_open  # the cast keeps every logit's sign: no need to read them again
        weights = self.weights.to(device=device, dtype=dtype)
        return dataclasses.replace(self, weights=weights, _gate_stamp=_GateStamp(weights.gate_logit, bits))


def _plan_rounds(layers) -> tuple:
    rounds, seen = [], {}
    for layer in layers:
        p = layer.params
        for side, fuser, is_open in ((0, p.key_fuser, p.key_open), (1, p.value_fuser, p.value_open)):
            if not is_open:
                continue
            key = (layer.receiver_layer, side)
            n = seen[key] = seen.get(key, -1) + 1
            if n == len(rounds):
                rounds.append([])
            rounds[n].append((layer.receiver_layer, side, layer.sharer_layer, fuser))
    return tuple(tuple(r) for r in rounds)


def _check_dtype_arg(dtype) -> None:
    if dtype is not None and dtype not in CACHE_DTYPES:
        raise ValueError(f"dtype: expected None or one of {list(CACHE_DTYPES)} (the dtypes the fusion "
                         f"backends take), got {dtype!r}")


def _describe(value) -> str:
    return f"{value!r} (a {type(value).__name__})"


def _read_json(path: str):
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not valid UTF-8 ({e})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: not valid JSON (nested too deeply)") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from None


def _check_args(path: str, args) -> dict:
    """The init args with the research class's defaults filled in, each shape arg checked."""
    if not isinstance(args, dict):
        raise CheckpointError(f"{path}: missing the 'init_args' object")
    absent = [k for k in REQUIRED_ARGS if k not in args]
    if absent:
        raise CheckpointError(f"{path}: init_args lacks {absent}")
    filled = dict(args)
    for name in SHAPE_ARGS:
        value = filled.setdefault(name, ARG_DEFAULTS.get(name))
        lowest = 3 if name == "num_layers" else 1
        # bool is an int subclass and 3.0 is not an index: both refused, never coerced.
        if type(value) is not int:
            raise CheckpointError(f"{path}: init_args.{name} is {_describe(value)}, expected an integer >= {lowest}")
        if value < lowest:
            raise CheckpointError(f"{path}: {name} is {value}, expected >= {lowest}")
    return filled


def _expected_shapes(args: dict) -> dict[str, tuple[int, ...]]:
    dims = research_dims(args)
    return {e.key: e.shape for side in SIDES for e in published_layout(dims, side)}


def _fp32_keys(args: dict) -> set[str]:
    """The published keys of the fp32 fields (the gate logits): any float dtype is taken."""
    dims = research_dims(args)
    return {e.key for side in SIDES for e in published_layout(dims, side) if e.field.fp32}


def _check_state(path: str, state, args: dict, cast: bool) -> None:
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    bad_keys = [k for k in state if not isinstance(k, str)]
    if bad_keys:
        raise CheckpointError(f"{path}: state dict keys must be strings, got {bad_keys[0]!r}")
    # num_layers sets how many blocks to expect: bound it by what the file holds before
    # listing them (a huge value must not loop).
    blocks = 2 * args["num_layers"]
    if 3 * blocks > len(state):
        raise CheckpointError(f"{path}: missing keys: num_layers = {args['num_layers']} needs {blocks} FFN "
                              f"blocks of 3 tensors, the state dict holds {len(state)} entries in all")
    shapes = _expected_shapes(args)
    missing = sorted(set(shapes) - set(state))
    unknown = sorted(set(state) - set(shapes) - set(PASSTHROUGH_BUFFERS))
    if missing:
        raise CheckpointError(f"{path}: missing keys {missing}")
    if unknown:
        raise CheckpointError(f"{path}: unexpected keys {unknown} (not in the {PROJECTOR_CLASS} format)")
    for key in [*shapes, *(k for k in PASSTHROUGH_BUFFERS if k in state)]:
        t = state[key]
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{path}: {key} is {type(t).__name__}, expected a tensor")
        if t.layout != torch.strided or not t.is_floating_point():
            raise CheckpointError(f"{path}: {key} has dtype {t.dtype} ({t.layout}), expected a dense "
                                  f"floating-point tensor")
    for key, shape in shapes.items():
        got = tuple(state[key].shape)
        ok = got == shape or (shape == () and state[key].numel() == 1)
        if not ok:
            raise CheckpointError(f"{path}: {key} has shape {list(got)}, expected {list(shape)} "
                                  f"from the init_args in the projector's json")
    if not cast:
        # Without dtype= the stored dtype is the kernels' dtype: it must be one they take.
        fp32 = _fp32_keys(args)
        for key in shapes:
            dtype = state[key].dtype
            if dtype not in CACHE_DTYPES and key not in fp32:
                raise CheckpointError(f"{path}: {key} is {dtype}, which the fusion backends do not take "
                                      f"(one of {list(CACHE_DTYPES)}); load with dtype= to cast")


def _pack_side(state: dict, side: str, args: dict) -> list[torch.Tensor]:
    return pack_side(state, side, research_dims(args))


def _unpack_side(weights: FuserWeights, fuser: int, side: str) -> dict[str, torch.Tensor]:
    return unpack_side((t[fuser].detach().cpu() for t in weights), side)


_DECIMAL = re.compile(r"[0-9]+")


def _normalize_mapping(raw, num_projectors: int, where: str, fail: Callable[[str], None], *,
                       json_keys: bool) -> FrozenDict:
    """``{receiver: {sharer: {layer: ((sharer_layer, projector), ...)}}}`` as read-only dicts
    and tuples of ints, every index checked; ``fail(message)`` raises. With ``json_keys`` the
    keys are JSON object keys (decimal strings), else ints."""

    def index(value, what):
        # bool is an int subclass, and 1.9 or 1.0 is not an index: refuse, never coerce.
        if type(value) is not int:
            fail(f"{where}: {what} is {_describe(value)}, expected an integer >= 0")
        if value < 0:
            fail(f"{where}: {what} {value} is negative")
        return value

    def key(value, what):
        if json_keys:
            if not (isinstance(value, str) and _DECIMAL.fullmatch(value)):
                fail(f"{where}: {what} {value!r} is not an integer >= 0")
            return int(value)
        return index(value, what)

    def obj(value, what):
        if not isinstance(value, Mapping):
            fail(f"{where}: {what} is {_describe(value)}, expected an object "
                 f"{{receiver: {{sharer: {{receiver_layer: [[sharer_layer, projector], ...]}}}}}}")
        return value

    def put(out, k, value, what):
        if k in out:  # "3" and "03" name one layer
            fail(f"{where}: {what} {k} appears twice")
        out[k] = value

    mapping = {}
    for r_key, sharers in obj(raw, "the layer map").items():
        r = key(r_key, "receiver index")
        by_sharer = {}
        for s_key, layers in obj(sharers, f"receiver {r}'s entry").items():
            s = key(s_key, "sharer index")
            by_layer = {}
            for l_key, pairs in obj(layers, f"receiver {r}, sharer {s}'s entry").items():
                layer = key(l_key, "receiver layer")
                at = f"receiver layer {layer}"
                if not isinstance(pairs, (list, tuple)):
                    fail(f"{where}: {at}: expected a list of [sharer_layer, projector] pairs, got {_describe(pairs)}")
                entries = []
                for pair in pairs:
                    if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                        fail(f"{where}: {at}: expected [sharer_layer, projector] pairs, got {pair!r}")
                    sharer_layer = index(pair[0], f"{at}: sharer layer")
                    projector = index(pair[1], f"{at}: projector index")
                    if projector >= num_projectors:
                        fail(f"{where}: {at} names projector {projector}, but the "
                             f"directory holds projector_0 .. projector_{num_projectors - 1}")
                    entries.append((sharer_layer, projector))
                if not entries:
                    fail(f"{where}: {at}: empty list of [sharer_layer, projector] pairs")
                put(by_layer, layer, tuple(entries), f"receiver {r}, sharer {s}: receiver layer")
            put(by_sharer, s, FrozenDict(by_layer), f"receiver {r}: sharer index")
        put(mapping, r, FrozenDict(by_sharer), "receiver index")
    return FrozenDict(mapping)


def _parse_mapping(path: str, raw, num_projectors: int) -> FrozenDict:
    def fail(msg):
        raise CheckpointError(msg)

    if not isinstance(raw, dict) or not raw:
        fail(f"{path}: expected a non-empty object {{receiver: {{sharer: {{layer: [[sharer_layer, "
             f"projector], ...]}}}}}}, got {type(raw).__name__}")
    return _normalize_mapping(raw, num_projectors, path, fail, json_keys=True)


def load_checkpoint(directory: str, device=None, dtype=None, *, pairs: str = "first") -> Checkpoint:
    """Load a published fuser directory and pack its weights for the kernels.

    ``dtype`` casts the weights (None keeps the stored dtype, which must then be fp32, fp16 or
    bf16: the backends take nothing else, so float64 is refused here, not at the first fuse).
    ``pairs`` (``"first"``/``"all"``): see :class:`Checkpoint`. Anything malformed in the
    files raises :class:`CheckpointError` naming the file and the field.
    """
    _check_dtype_arg(dtype)
    if pairs not in PAIRS:
        raise ValueError(f"pairs: expected one of {list(PAIRS)}, got {pairs!r}")
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: not a directory")
    count = 0
    while os.path.exists(os.path.join(directory, f"projector_{count}.json")):
        count += 1
    if count == 0:
        raise CheckpointError(f"{directory}: no projector_0.json found (expected projector_{{i}}.json/.pt files)")
    args_list, sides, buffers = [], [], []
    first_dtype = None
    for i in range(count):
        json_path = os.path.join(directory, f"projector_{i}.json")
        meta = _read_json(json_path)
        if not isinstance(meta, dict) or meta.get("class") != PROJECTOR_CLASS:
            got = meta.get("class") if isinstance(meta, dict) else type(meta).__name__
            raise CheckpointError(f"{json_path}: class {got!r} is not supported (expected {PROJECTOR_CLASS!r})")
        args = _check_args(json_path, meta.get("init_args"))
        if args_list and any(args[k] != args_list[0][k] for k in SHAPE_ARGS):
            diff = {k: (args_list[0][k], args[k]) for k in SHAPE_ARGS if args[k] != args_list[0][k]}
            raise CheckpointError(f"{json_path}: shapes differ from projector_0 {diff}; all projectors "
                                  f"of one checkpoint must share shapes to be stacked")
        pt_path = os.path.join(directory, f"projector_{i}.pt")
        if not os.path.isfile(pt_path):
            raise CheckpointError(f"{pt_path}: file not found")
        try:
            state = torch.load(pt_path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for corrupt files
            raise CheckpointError(f"{pt_path}: cannot be read as a torch state dict ({e})") from None
        _check_state(pt_path, state, args, cast=dtype is not None)
        if dtype is None:  # one stack per weight: every projector must agree on the dtype
            fp32 = _fp32_keys(args)
            for key, t in state.items():
                if key in PASSTHROUGH_BUFFERS or key in fp32:
                    continue
                if first_dtype is None:
                    first_dtype = (t.dtype, pt_path, key)
                elif t.dtype != first_dtype[0]:
                    raise CheckpointError(f"{pt_path}: {key} is {t.dtype}, but {first_dtype[1]}: "
                                          f"{first_dtype[2]} is {first_dtype[0]}; load with dtype= to cast")
        args_list.append(args)
        sides += [_pack_side(state, side, args) for side in SIDES]
        buffers.append({k: state[k] for k in PASSTHROUGH_BUFFERS if k in state})
    weights = FuserWeights(*(torch.stack(ts).contiguous() for ts in zip(*sides)))
    if dtype is not None:
        weights = weights.to(dtype=dtype)  # the gate logits stay fp32: a cast could flip a tiny one to 0
    config_path = os.path.join(directory, "projector_config.json")
    mapping = _parse_mapping(config_path, _read_json(config_path), count)
    ckpt = Checkpoint(weights, args_list, mapping, buffers, pairs)
    return ckpt.to(device=device) if device is not None else ckpt


def read_fuser_weights(directory: str) -> FuserWeights:
    """The stacked weights of a published directory in their stored dtypes, for training: any
    floating dtype (float64 too) is kept, and float64 gate logits stay float64 (the inference
    loader, :func:`load_checkpoint`, makes every gate logit fp32 for the fusion ops). The
    files are checked as :func:`load_checkpoint` checks them."""
    ckpt_args = []
    sides = []
    i = 0
    while os.path.exists(os.path.join(directory, f"projector_{i}.json")):
        json_path = os.path.join(directory, f"projector_{i}.json")
        meta = _read_json(json_path)
        if not isinstance(meta, dict) or meta.get("class") != PROJECTOR_CLASS:
            raise CheckpointError(f"{json_path}: class is not {PROJECTOR_CLASS!r}")
        args = _check_args(json_path, meta.get("init_args"))
        if ckpt_args and any(args[k] != ckpt_args[0][k] for k in SHAPE_ARGS):
            raise CheckpointError(f"{json_path}: shapes differ from projector_0; all projectors of one checkpoint "
                                  f"must share shapes to be stacked")
        pt_path = os.path.join(directory, f"projector_{i}.pt")
        try:
            state = torch.load(pt_path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"{pt_path}: file not found") from None
        except Exception as e:  # torch raises several types for corrupt files
            raise CheckpointError(f"{pt_path}: cannot be read as a torch state dict ({e})") from None
        _check_state(pt_path, state, args, cast=True)
        for side in SIDES:
            packed = _pack_side(state, side, args)
            stored = state[f"{side}_gate_logit"]
            if stored.dtype == torch.float64:
                packed[-1] = stored.reshape(())
            sides.append(packed)
        ckpt_args.append(args)
        i += 1
    if not sides:
        raise CheckpointError(f"{directory}: no projector_0.json found (expected projector_{{i}}.json/.pt files)")
    stacks = []
    for ts in zip(*sides):
        dtypes = {t.dtype for t in ts}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        stacks.append(torch.stack([t.to(dtype) for t in ts]).contiguous())
    return FuserWeights(*stacks)


def save_checkpoint(ckpt: Checkpoint, directory: str) -> None:
    """Write ``ckpt`` in the published format (round-trips through :func:`load_checkpoint`).
    Every pair of the layer map is written, whatever ``ckpt.pairs`` says."""
    os.makedirs(directory, exist_ok=True)
    for i, args in enumerate(ckpt.projector_args):
        with open(os.path.join(directory, f"projector_{i}.json"), "w", encoding="utf-8") as f:
            json.dump({"class": PROJECTOR_CLASS, "init_args": dict(args)}, f, indent=2)
        state = {}
        for j, side in enumerate(SIDES):
            state.update(_unpack_side(ckpt.weights, 2 * i + j, side))
        if i < len(ckpt.buffers):
            state.update(ckpt.buffers[i])
        torch.save(state, os.path.join(directory, f"projector_{i}.pt"))
    raw = {str(r): {str(s): {str(layer): [list(p) for p in pairs] for layer, pairs in lm.items()}
                    for s, lm in sharers.items()} for r, sharers in ckpt.mapping.items()}
    with open(os.path.join(directory, "projector_config.json"), "w", encoding="utf-8") as f:
        json.dump(raw, f, indent=2)


def last_aligned_map(receiver_layers: int, sharer_layers: int, *, clamp: bool = True) -> dict[int, int]:
    """The research pipeline's "last aligned" layer map (one sharer layer per receiver layer).

    The last layers line up: receiver layer ``l`` reads sharer layer ``l + (Ls - Lt)``. With
    ``clamp`` (the default, what published fusers were trained with) that index is clamped to
    ``[0, Ls)``, so every receiver layer is fused: when the receiver is deeper, its first
    ``Lt - Ls`` layers all read sharer layer 0. ``clamp=False`` keeps only receiver layers whose
    partner index is valid.
    """
    for name, value in (("receiver_layers", receiver_layers), ("sharer_layers", sharer_layers)):
        if type(value) is not int or value < 0:
            raise ValueError(f"{name}: expected a non-negative integer, got {value!r}")
    if receiver_layers == 0 or sharer_layers == 0:
        return {}
    offset = sharer_layers - receiver_layers
    if not clamp:
        return {l: l + offset for l in range(receiver_layers) if 0 <= l + offset < sharer_layers}
    return {l: min(max(l + offset, 0), sharer_layers - 1) for l in range(receiver_layers)}


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
    return Checkpoint(weights, [dict(projector_args) for _ in layer_map], mapping, [{} for _ in layer_map])
