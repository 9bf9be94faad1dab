"""The training entry points: :func:`fuse_rows` (gathered rows), :func:`fuse_caches` (cache
views + slots) and :class:`FuserTrainer`, an ``nn.Module`` holding the stacked fuser weights
as parameters with the dropout and the gate-temperature schedule of the published recipe."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from .. import ops as c2c_ops
from ..reference import annealed_temperature, slot_coords
from ..weights import FuserWeights
from . import torch_ops
from .autograd import FuserTrainingFunction, Run

BACKENDS = ("auto", "torch", "triton")


def _fail(msg: str):
    raise ValueError(msg)


def default_compute_dtype(rows_dtype: torch.dtype, weights_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """GEMM dtype when none is given: the rows' (cache) dtype on a GPU; fp32 on the CPU, where
    16-bit GEMMs without bf16 matrix units run ~100x slower than fp32 ones (fp64 stays fp64)."""
    if torch.float64 in (rows_dtype, weights_dtype):
        return torch.float64
    return rows_dtype if device.type == "cuda" else torch.float32


def _ops_for(backend: str, device: torch.device, compute_dtype: torch.dtype):
    if backend not in BACKENDS:
        _fail(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and compute_dtype != torch.float64 else "torch"
    if backend == "torch":
        return torch_ops
    from . import kernels  # imports triton
    from .kernels._launch import interpreting
    if compute_dtype == torch.float64:
        _fail("compute_dtype: the Triton kernels take fp32/fp16/bf16; use backend='torch' for float64")
    if device.type != "cuda" and not interpreting():
        _fail(f"backend: 'triton' needs CUDA tensors (rows are on {device}; TRITON_INTERPRET=1 runs it on the CPU)")
    return kernels


def _row_list(name: str, rows, count: int | None) -> list[Tensor]:
    if isinstance(rows, Tensor):
        if rows.dim() == 2:
            rows = [rows]
        elif rows.dim() == 3:
            rows = list(rows.unbind(0))
        else:
            _fail(f"{name}: expected [T, width], [R, T, width] or a list of [T, width], got {list(rows.shape)}")
    rows = list(rows)
    if count is not None and len(rows) != count:
        _fail(f"{name}: {len(rows)} entries, expected one per fuser ({count})")
    return rows


def check_rows(sharer_rows: list[Tensor], receiver_rows: list[Tensor], weights: FuserWeights, fusers) -> None:
    """Clear errors, naming the argument, for what the training path would otherwise fail on."""
    p, ks, kt = weights.num_fusers, weights.sharer_width, weights.receiver_width
    if not fusers:
        _fail("fusers: expected at least one fuser index")
    for i, f in enumerate(fusers):
        if not 0 <= f < p:
            _fail(f"fusers[{i}] = {f} is out of range: the weights stack {p} fusers")
    tokens = receiver_rows[0].shape[0] if receiver_rows and isinstance(receiver_rows[0], Tensor) else None
    for name, rows, width in (("sharer_rows", sharer_rows, ks), ("receiver_rows", receiver_rows, kt)):
        for i, t in enumerate(rows):
            if not isinstance(t, Tensor) or t.dim() != 2:
                _fail(f"{name}[{i}]: expected a [T, {width}] tensor, got "
                      f"{list(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
            if t.shape[1] != width:
                _fail(f"{name}[{i}]: width {t.shape[1]}, the fuser expects {width}")
            if t.shape[0] != tokens:
                _fail(f"{name}[{i}]: {t.shape[0]} tokens, expected {tokens} like receiver_rows[0]")
            if t.device != weights.device:
                _fail(f"{name}[{i}]: on {t.device}, expected {weights.device} (the weights' device)")
            if not t.is_floating_point():
                _fail(f"{name}[{i}]: dtype {t.dtype}, expected a floating dtype")
    if len({t.dtype for t in receiver_rows}) > 1:
        _fail("receiver_rows: every entry must have one dtype (the fused rows are stacked)")


def fuse_rows(sharer_rows, receiver_rows, weights: FuserWeights, fusers, *, training: bool = True,
              dropout_p: float = 0.1, temperature: float = 1.0, generator: torch.Generator | None = None,
              compute_dtype: torch.dtype | None = None, backend: str = "auto",
              recompute: bool | None = None, gate_dtype: torch.dtype | None = None) -> Tensor:
    """Fused receiver rows, differentiable in every weight of ``weights``.

    ``sharer_rows`` ``[T, Ks]``, ``receiver_rows`` ``[T, Kt]`` with ``fusers`` an int, or
    ``[R, T, K]`` tensors / lists of R rows with ``fusers`` a list. Returns ``[T, Kt]`` or
    ``[R, T, Kt]`` in the receiver rows' dtype: ``x + G * sigmoid(a) * y`` per head, with
    dropout ``dropout_p`` after each FFN and the Gumbel-sigmoid gate at ``temperature`` when
    ``training`` (the reference's draws from ``generator``, in its order), else the inference
    fuser. The sharer rows are constants; receiver rows that require a gradient get one (the
    previous fuser's output in sequential multi-sharer fusion).

    ``compute_dtype`` is the GEMM dtype (:func:`default_compute_dtype`); ``recompute`` (default:
    on a GPU, not on the CPU) recomputes each FFN's first GEMM in the backward instead of
    keeping its output (see ``docs/training.md`` for the bytes kept either way).
    ``gate_dtype`` (default None: fp32) draws the Gumbel noise and computes the soft gate in
    that dtype, as the research recipe does in bf16 (``docs/training.md``).
    """
    single = isinstance(fusers, int)
    fusers = [fusers] if single else [int(f) for f in fusers]
    c2c_ops.check_weights(_stand_in(weights, torch.float32))  # shapes and devices agree
    sharer_rows = _row_list("sharer_rows", sharer_rows, len(fusers))
    receiver_rows = _row_list("receiver_rows", receiver_rows, len(fusers))
    check_rows(sharer_rows, receiver_rows, weights, fusers)
    if not 0.0 <= dropout_p < 1.0:
        _fail(f"dropout_p: expected a probability in [0, 1), got {dropout_p}")
    if training and not (temperature > 0.0 and math.isfinite(temperature)):
        _fail(f"temperature: expected a positive finite temperature, got {temperature}")
    device = weights.device
    if compute_dtype is None:
        compute_dtype = default_compute_dtype(receiver_rows[0].dtype, weights.dtype, device)
    if recompute is None:
        recompute = device.type == "cuda"
    if gate_dtype is not None and gate_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        _fail(f"gate_dtype: expected None, torch.bfloat16, torch.float16 or torch.float32, got {gate_dtype!r}")
    run = Run(tuple(fusers), training, float(dropout_p), float(temperature), compute_dtype,
              _ops_for(backend, device, compute_dtype), generator, bool(recompute), gate_dtype)
    out = FuserTrainingFunction.apply(run, [r.detach() for r in sharer_rows], *receiver_rows, *weights)
    return out[0] if single else out


def _stand_in(weights: FuserWeights, dtype: torch.dtype) -> list[Tensor]:
    """Zero-memory tensors with the weights' shapes in ``dtype``, for ``ops``' checks (trained
    weights may be fp32 master copies of a bf16 cache's fuser, or float64 for gradcheck)."""
    return [torch.zeros((), dtype=torch.float32 if name == "gate_logit" else dtype, device=t.device).expand(t.shape)
            for name, t in zip(FuserWeights._fields, weights)]


def gather_rows(views: Sequence[Tensor], slots: Tensor, valid: Tensor) -> list[Tensor]:
    """``[T, H*D]`` rows of each view at ``slots``; padding tokens read slot 0 (no host sync)."""
    safe = torch.where(valid, slots.long(), torch.zeros((), dtype=torch.long, device=slots.device))
    out = []
    for view in views:
        page, entry = slot_coords(view, safe)
        out.append(view[page, entry].reshape(len(safe), -1))
    return out


def fuse_caches(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights: FuserWeights, fusers,
                **kwargs) -> Tensor:
    """:func:`fuse_rows` on cache views + slots (the arguments of ``torch.ops.c2c.fuse``).

    Returns the fused rows ``[R, T, Kt]`` (the caches are not written); rows of padding tokens
    (negative receiver slot) are 0 and pass no gradient. Dropout and Gumbel noise are drawn for
    all ``T`` tokens, padding included.
    """
    fusers = [int(f) for f in fusers]
    c2c_ops.check_fuse_args(receiver_caches, sharer_caches, receiver_slots, sharer_slots,
                            _stand_in(weights, receiver_caches[0].dtype if receiver_caches else weights.dtype),
                            fusers)
    valid = receiver_slots >= 0
    fused = fuse_rows(gather_rows(sharer_caches, sharer_slots, valid),
                      gather_rows(receiver_caches, receiver_slots, valid), weights, fusers, **kwargs)
    return fused * valid.to(fused.dtype)[None, :, None]


class FuserTrainer(nn.Module):
    """Trainable fusers: the 14 stacked tensors of a :class:`FuserWeights` as parameters.

    ``forward(sharer_rows, receiver_rows, fusers)`` returns the fused receiver rows (see
    :func:`fuse_rows`); ``forward_caches`` takes cache views + slots. Training mode
    (``.train()``, the default) uses dropout and the Gumbel-sigmoid gate at
    :attr:`temperature`, which anneals geometrically from ``start_temperature`` to
    ``end_temperature`` over ``total_steps`` calls of :meth:`advance`. ``.eval()`` is the
    inference fuser. :meth:`export` returns plain weights for ``c2c.fuse``.

    ``param_dtype`` (default: the weights' dtype) is what the optimizer updates; use fp32
    master weights for bf16 training and set ``compute_dtype=torch.bfloat16`` (the default on
    a GPU when the rows are bf16). The gate logits keep their own dtype (fp32, float64 for
    float64 weights) unless ``gate_dtype`` is given: then the gate logits, the temperature and
    the Gumbel noise are in ``gate_dtype`` (the research recipe's bf16; see
    ``docs/training.md``). ``total_steps`` is the research class's ``anneal_steps``.
    """

    def __init__(self, weights: FuserWeights, *, dropout_p: float = 0.1, total_steps: int = 1000,
                 start_temperature: float = 1.0, end_temperature: float = 0.001,
                 param_dtype: torch.dtype | None = None, compute_dtype: torch.dtype | None = None,
                 backend: str = "auto", recompute: bool | None = None, gate_dtype: torch.dtype | None = None):
        super().__init__()
        if not 0.0 <= dropout_p < 1.0:
            _fail(f"dropout_p: expected a probability in [0, 1), got {dropout_p}")
        if not (start_temperature > 0 and end_temperature > 0):
            _fail(f"start_temperature/end_temperature: expected positive values, got "
                  f"{start_temperature}/{end_temperature}")
        if not (isinstance(total_steps, int) and total_steps >= 1):
            _fail(f"total_steps: expected a positive number of optimizer steps, got {total_steps!r}")
        for name, t in zip(FuserWeights._fields, weights):
            dtype = t.dtype if name == "gate_logit" and param_dtype != torch.float64 else (param_dtype or t.dtype)
            if name == "gate_logit" and gate_dtype is not None:
                dtype = gate_dtype
            self.register_parameter(name, nn.Parameter(t.detach().to(dtype).clone()))
        self.gate_dtype = gate_dtype
        self.dropout_p, self.total_steps = dropout_p, total_steps
        self.start_temperature, self.end_temperature = start_temperature, end_temperature
        self.compute_dtype, self.backend, self.recompute = compute_dtype, backend, recompute
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @property
    def weights(self) -> FuserWeights:
        """The parameters as a FuserWeights (differentiable: gradients reach the parameters)."""
        return FuserWeights(*(getattr(self, name) for name in FuserWeights._fields))

    def export(self, dtype: torch.dtype | None = None) -> FuserWeights:
        """A detached copy for the inference ops (gate logits in fp32, float64 ones kept)."""
        weights = FuserWeights(*(t.detach().clone() for t in self.weights))
        gate = weights.gate_logit
        out = weights.to(dtype=dtype or self.w_in_sharer.dtype)
        return out._replace(gate_logit=gate) if gate.dtype == torch.float64 else out

    @property
    def temperature(self) -> float:
        """The gate temperature of the current step (rounded to ``gate_dtype`` when given,
        as the research recipe's temperature buffer is)."""
        t = annealed_temperature(int(self.step), self.total_steps, self.start_temperature, self.end_temperature)
        return float(torch.tensor(t, dtype=self.gate_dtype)) if self.gate_dtype is not None else t

    def advance(self, steps: int = 1) -> None:
        """Move the temperature schedule on (call once per optimizer step)."""
        self.step += steps

    def forward(self, sharer_rows, receiver_rows, fusers, *, generator: torch.Generator | None = None) -> Tensor:
        return fuse_rows(sharer_rows, receiver_rows, self.weights, fusers, **self._options(generator))

    def forward_caches(self, receiver_caches, sharer_caches, receiver_slots, sharer_slots, fusers, *,
                       generator: torch.Generator | None = None) -> Tensor:
        return fuse_caches(receiver_caches, sharer_caches, receiver_slots, sharer_slots, self.weights, fusers,
                           **self._options(generator))

    def _options(self, generator):
        return dict(training=self.training, dropout_p=self.dropout_p, temperature=self.temperature,
                    generator=generator, compute_dtype=self.compute_dtype, backend=self.backend,
                    recompute=self.recompute, gate_dtype=self.gate_dtype)
