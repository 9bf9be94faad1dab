"""The training forward and backward of a list of fused entries, as one autograd Function.

Entry ``i`` fuses ``sharer_rows[i]`` into ``receiver_rows[i]`` with fuser ``fusers[i]`` of the
stacked weights. The sharer rows are constants (the sharer is frozen and runs without
gradients). The receiver rows get a gradient when they require one: in sequential
multi-sharer fusion they are the previous fuser's output, and its weights must see the loss
through this fuser (``dx = dout + dU0 W_in_receiver``: the residual and the input Linear). The
gradient of every stacked weight is returned (fusers not in the call get zeros; a fuser used
by several entries gets the sum).

What the forward keeps for the backward, per entry (``B = n - 1`` FFN blocks on the projection
path, compute dtype of ``e`` bytes): the residual stream at every block boundary, ``u0`` (the
input Linear's output), ``u1 .. u_B`` (the projection path) and ``w`` (the weight branch's
output): ``(B + 2) * H`` values; the projection ``y`` (``Kt`` values) and the head logits
(``Ht`` fp32). That is :func:`saved_bytes_per_token`. The rows themselves are referenced, not
copied. Dropout masks and Gumbel noise are not kept: the generator's state is, and the
backward draws them again. Inside each FFN block nothing is kept: the backward recomputes the
norm and the first GEMM from the block input. With ``recompute=False`` (the CPU default, where
FLOPs are scarcer than memory) each block also keeps its hidden pre-activation ``W1 rmsnorm(z)``
(``I`` values, ``H`` for the weight branch) and the backward skips that GEMM.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
from torch.autograd.function import once_differentiable

from ..weights import FuserWeights
from . import noise
from .blocks import bias_grad, block_backward, block_forward, linear, weight_grad
from .torch_ops import accumulation_dtype


@dataclass(frozen=True)
class Run:
    """The non-tensor arguments of one call."""

    fusers: tuple[int, ...]
    training: bool
    dropout_p: float
    temperature: float
    compute_dtype: torch.dtype
    ops: ModuleType
    generator: torch.Generator | None
    recompute: bool = True  # False: keep each FFN's hidden pre-activation (no recompute GEMM)
    # None: the Gumbel noise and the soft gate in fp32 (the package's default); a 16-bit dtype:
    # the research recipe's dtypes (noise drawn, gate logit and temperature rounded, gate
    # computed in it), for reproducing a bf16 research run.
    gate_dtype: torch.dtype | None = None

    @property
    def p(self) -> float:
        return self.dropout_p if self.training else 0.0


def saved_bytes_per_token(weights: FuserWeights, compute_dtype: torch.dtype, recompute: bool = True) -> int:
    """Bytes the forward keeps per token per fuser (one fused entry), rows not counted."""
    e = torch.empty((), dtype=compute_dtype).element_size()
    acc = torch.empty((), dtype=accumulation_dtype(compute_dtype)).element_size()
    h, blocks = weights.hidden_dim, weights.num_blocks
    values = (blocks + 2) * h + weights.receiver_width
    if not recompute:  # the hidden pre-activation of every FFN (the weight branch's is H wide)
        values += blocks * weights.intermediate_dim + h
    return e * values + acc * weights.receiver_heads


# The GEMM operands are cast to the compute dtype (a no-op when they already have it); norm
# scales and the gate logit are read in their own dtype, in fp32 arithmetic.
_KEEP_DTYPE = {"ffn_norm", "head_norm", "gate_logit"}


class CastWeights:
    """One fuser's weights with the GEMM operands in the compute dtype. Casts go into buffers
    reused by every entry of a call (fresh large buffers cost page faults on a CPU)."""

    def __init__(self, weights: FuserWeights, dtype: torch.dtype):
        self.weights, self.dtype, self.buffers = weights, dtype, {}

    def __call__(self, f: int) -> FuserWeights:
        out = []
        for name, t in zip(FuserWeights._fields, self.weights):
            t = t[f]
            if name not in _KEEP_DTYPE and t.dtype != self.dtype:
                buffer = self.buffers.get(name)
                t = self.buffers.setdefault(name, t.to(self.dtype)) if buffer is None else buffer.copy_(t)
            out.append(t)
        return FuserWeights(*out)


def _draw_keeps(run: Run, gen, tokens: int, hidden: int, blocks: int, device):
    """Dropout masks for FFN_1, the weight branch, projection blocks 1 .. B-1 (draw order)."""
    return [noise.dropout_keep(gen, tokens, hidden, run.p, device) for _ in range(blocks + 1)]


def _gate(run: Run, gate_logit, gen, tokens: int, heads: int, device) -> torch.Tensor:
    """The gate per (token, head): Gumbel-sigmoid when training, else the hard gate."""
    acc = accumulation_dtype(run.compute_dtype)
    if run.training and run.gate_dtype is not None:
        return noise.research_soft_gate(gate_logit, gen, tokens, heads, device, run.temperature,
                                        run.gate_dtype).to(acc).contiguous()
    if run.training:
        g = noise.soft_gate(gate_logit, noise.gumbel(gen, tokens, heads, device), run.temperature)
        return g.to(acc).contiguous()
    return (gate_logit > 0).to(acc).expand(tokens, heads).contiguous()


def _entry_forward(run: Run, w: FuserWeights, s, x, gen, out) -> list[torch.Tensor]:
    """Writes the entry's fused rows into ``out``; returns what the backward needs (see
    :func:`_unpack`): ``[u0, u1 .. u_B, w, y, logits]`` plus, without recompute, the hidden
    pre-activations of FFN_1, the weight branch and the projection blocks."""
    ops, dtype, p = run.ops, run.compute_dtype, run.p
    tokens, width, device = s.shape[0], w.b_in.shape[0], s.device
    hiddens = []

    def block(z, norm, w1, w2):
        keep = noise.dropout_keep(gen, tokens, width, p, device)
        out, hidden = block_forward(ops, z, norm, w1, w2, keep, p, keep_hidden=not run.recompute)
        hiddens.append(hidden)
        return out

    u0 = torch.addmm(w.b_in, s.to(dtype), w.w_in_sharer.t()).addmm_(x.to(dtype), w.w_in_receiver.t())
    # Draw order of the reference: FFN_1, weight branch, projection blocks, Gumbel noise.
    u1 = block(u0, w.ffn_norm[0], w.ffn_w1[0], w.ffn_w2[0])
    head = block(u1, w.head_norm, w.head_w1, w.head_w2)
    logits = linear(head, w.w_head, w.b_head).to(accumulation_dtype(dtype))
    path = [u1]
    for b in range(1, w.ffn_w1.shape[0]):
        path.append(block(path[-1], w.ffn_norm[b], w.ffn_w1[b], w.ffn_w2[b]))
    y = linear(path[-1], w.w_out, w.b_out)
    gate = _gate(run, w.gate_logit, gen, tokens, logits.shape[1], device)
    ops.gated_merge(x, y, logits, gate, out)
    return [u0, *path, head, y, logits] + ([] if run.recompute else hiddens)


def _unpack(blocks: int, saved):
    """``(u0, path [u1 .. u_B], head, y, logits, hiddens)``; hiddens are Nones with recompute."""
    u0, rest = saved[0], saved[1:]
    path, (head, y, logits), hiddens = rest[:blocks], rest[blocks:blocks + 3], rest[blocks + 3:]
    return u0, path, head, y, logits, list(hiddens) or [None] * (blocks + 1)


class GradSink:
    """The stacked weight gradients, filled in place entry by entry: a fuser's first entry
    writes its rows (a GEMM straight into them when the dtypes allow), later ones add to
    them; rows of fusers outside the call are zeroed. No per-entry gradient is stacked,
    copied or zero-filled (large fresh buffers cost page faults on a CPU)."""

    def __init__(self, weights: FuserWeights, needed, fusers):
        self.grads = {name: torch.empty_like(t) if need else None
                      for name, t, need in zip(FuserWeights._fields, weights, needed)}
        unused = sorted(set(range(weights.num_fusers)) - set(fusers))
        for g in self.grads.values():
            if g is not None and unused:
                g[unused] = 0
        self.written: set = set()
        # fp32 scratch per weight shape for GEMMs whose gradient is stored in 16 bits
        self.scratch = {}
        if any(g is not None and g.dtype != accumulation_dtype(g.dtype) for g in self.grads.values()):
            self.scratch = {tuple(t.shape[-2:]): torch.empty(t.shape[-2:], dtype=accumulation_dtype(t.dtype),
                                                             device=t.device)
                            for t in weights if t.dim() >= 3}

    def _target(self, name, f, block):
        grad = self.grads[name]
        if grad is None:
            return None, False
        key = (name, f, block)
        first = key not in self.written
        self.written.add(key)
        return (grad[f] if block is None else grad[f][block]), first

    def gemm(self, name, f, dy, x, block=None) -> None:
        """``+= dy.T @ x`` (fp32-accumulated)."""
        target, first = self._target(name, f, block)
        if target is None:
            return
        if target.dtype == dy.dtype == x.dtype == accumulation_dtype(dy.dtype):
            torch.mm(dy.t(), x, out=target) if first else target.addmm_(dy.t(), x)
        else:
            self.add(name, f, weight_grad(dy, x, self.scratch.get(tuple(target.shape))), block, target=(target, first))

    def add(self, name, f, value, block=None, target=None) -> None:
        target, first = target or self._target(name, f, block)
        if target is not None:
            target.copy_(value) if first else target.add_(value)

    def result(self):
        return [self.grads[name] for name in FuserWeights._fields]


class _BlockGrads:
    """One FFN block's view of the sink: gradient ``k`` goes to ``names[k]`` (block ``b``)."""

    def __init__(self, sink: GradSink, f: int, b, names):
        self.sink, self.f, self.b, self.names = sink, f, b, names

    def gemm(self, k, dy, x):
        self.sink.gemm(self.names[k], self.f, dy, x, self.b)

    def add(self, k, value):
        self.sink.add(self.names[k], self.f, value, self.b)


def _entry_backward(run: Run, w: FuserWeights, f: int, s, x, saved, dout, gen, sink, dx=None):
    """Adds one entry's gradients (fuser ``f``) into ``sink``; with ``dx`` (the residual's
    gradient, ``dout`` in fp32) also the receiver rows' gradient, in place into ``dx``."""
    ops, dtype, p = run.ops, run.compute_dtype, run.p
    tokens, device = s.shape[0], s.device
    blocks = w.ffn_w1.shape[0]
    u0, path, head, y, logits, hiddens = _unpack(blocks, saved)
    keeps = _draw_keeps(run, gen, tokens, u0.shape[1], blocks, device)
    gate = _gate(run, w.gate_logit, gen, tokens, logits.shape[1], device)

    dy, d_logits, d_gate = ops.gated_merge_backward(dout, y, logits, gate, dtype)
    if run.training:  # d sigmoid((g + noise) / tau) / dg = G (1 - G) / tau
        sink.add("gate_logit", f, (d_gate * gate * (1 - gate)).sum() / run.temperature)
    else:  # the hard gate is a step: no gradient
        sink.add("gate_logit", f, torch.zeros((), dtype=d_gate.dtype, device=device))
    sink.gemm("w_out", f, dy, path[-1])
    sink.add("b_out", f, bias_grad(dy))
    d_path = (dy @ w.w_out).to(d_gate.dtype)
    del dy

    def block(b, z, d_out, norm, w1, w2, k, names):  # k: the block's place in the draw order
        return block_backward(ops, z, d_out, norm, w1, w2, keeps[k], p, _BlockGrads(sink, f, b, names), hiddens[k])

    ffn = ("ffn_norm", "ffn_w1", "ffn_w2")
    for b in reversed(range(1, blocks)):
        d_path = block(b, path[b - 1], d_path, w.ffn_norm[b], w.ffn_w1[b], w.ffn_w2[b], b + 1, ffn)

    d_logits_c = d_logits.to(dtype)
    sink.gemm("w_head", f, d_logits_c, head)
    sink.add("b_head", f, d_logits.sum(0))
    d_u1 = block(None, path[0], (d_logits_c @ w.w_head).to(d_path.dtype), w.head_norm, w.head_w1, w.head_w2,
                 1, ("head_norm", "head_w1", "head_w2"))
    d_u1 += d_path
    del d_path
    d_u0 = block(0, u0, d_u1, w.ffn_norm[0], w.ffn_w1[0], w.ffn_w2[0], 0, ffn)
    d_u0_c = d_u0.to(dtype)
    sink.gemm("w_in_sharer", f, d_u0_c, s.to(dtype))
    sink.gemm("w_in_receiver", f, d_u0_c, x.to(dtype))
    sink.add("b_in", f, d_u0.sum(0))
    if dx is not None:
        dx += (d_u0_c @ w.w_in_receiver).to(dx.dtype)


class FuserTrainingFunction(torch.autograd.Function):
    """``apply(run, sharer_rows, *receiver_rows, *weights) -> fused rows [R, T, Kt]``.

    ``sharer_rows`` is a list of R ``[T, Ks]`` tensors (constants); ``receiver_rows`` are R
    ``[T, Kt]`` tensors, passed as separate arguments so that autograd sees them (a gradient
    flows to those that require one); ``weights`` the 14 stacked tensors of a FuserWeights.
    The output has the receiver rows' dtype.
    """

    @staticmethod
    def forward(ctx, run: Run, sharer_rows, *inputs):
        count = len(run.fusers)
        receiver_rows, params = inputs[:count], inputs[count:]
        weights = FuserWeights(*params)
        x0 = receiver_rows[0]
        device = x0.device
        gen = noise.resolve_generator(run.generator, device) if run.training else None
        ctx.rng_state = noise.snapshot(gen) if gen is not None else None
        out = torch.empty(count, *x0.shape, dtype=x0.dtype, device=device)
        saved = []
        cast = CastWeights(weights, run.compute_dtype)
        ctx.entries = run.fusers if x0.shape[0] else ()  # no tokens: nothing to compute
        for i, f in enumerate(ctx.entries):
            s, x = sharer_rows[i].detach(), receiver_rows[i].detach().contiguous()
            saved += [s, x, *_entry_forward(run, cast(f), s, x, gen, out[i])]
        ctx.run = run
        ctx.per_entry = len(saved) // max(len(ctx.entries), 1)
        ctx.save_for_backward(*params, *saved)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        run, n = ctx.run, len(FuserWeights._fields)
        count = len(run.fusers)
        saved = ctx.saved_tensors
        weights = FuserWeights(*saved[:n])
        row_needs = ctx.needs_input_grad[2:2 + count]
        sink = GradSink(weights, ctx.needs_input_grad[2 + count:], ctx.entries)
        gen = noise.replay(ctx.rng_state, grad_out.device) if ctx.rng_state is not None else None
        cast = CastWeights(weights, run.compute_dtype)
        row_grads = [None] * count
        for i, f in enumerate(ctx.entries):
            s, x, *entry = saved[n + i * ctx.per_entry: n + (i + 1) * ctx.per_entry]
            # The residual's gradient, taken before the backward may reuse ``dout`` as scratch.
            dx = grad_out[i].to(accumulation_dtype(run.compute_dtype), copy=True) if row_needs[i] else None
            dout = grad_out[i].to(x.dtype).contiguous()
            _entry_backward(run, cast(f), f, s, x, entry, dout, gen, sink, dx)
            row_grads[i] = None if dx is None else dx.to(x.dtype)
        if not ctx.entries:  # no tokens: the rows' gradient is the (empty) output gradient
            row_grads = [grad_out[i] if need else None for i, need in enumerate(row_needs)]
        return (None, None, *row_grads, *sink.result())
