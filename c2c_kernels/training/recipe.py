"""The research training recipe, as data and small pure functions: hyperparameters
(:class:`Recipe`), the learning-rate schedule, the research initialisation of fresh fusers and
the response-only loss. ``docs/training.md`` lists each default and where it comes from.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..integrations.alignment import IGNORE_INDEX
from ..weights import FuserWeights

LOSS_NORMALIZATIONS = ("micro_batch", "tokens")
MODES = ("parallel", "sequential")


@dataclass
class Recipe:
    """Every hyperparameter of a run; the defaults are the research recipe's.

    ``anneal_steps``, ``initial_temperature``, ``final_temperature`` and ``dropout`` default to
    None: read from the checkpoint's ``projector_{i}.json`` (the research class's defaults,
    1929 / 1.0 / 0.001 / 0.1, for a fresh fuser or a json that omits them).

    ``loss_normalization``: ``"micro_batch"`` (the research loop): each micro-batch's mean
    token loss, divided by ``grad_accum``; ``"tokens"``: the summed token loss of the whole
    accumulation window over its label count, so that N micro-batches give exactly the
    gradient of one batch of N whatever their lengths.
    """

    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    grad_accum: int = 1
    batch_size: int = 4
    epochs: int = 1
    max_steps: int | None = None
    max_length: int = 2048
    seed: int = 42
    anneal_steps: int | None = None
    initial_temperature: float | None = None
    final_temperature: float | None = None
    dropout: float | None = None
    mode: str = "parallel"
    loss_normalization: str = "micro_batch"
    research_dtypes: bool = False  # bf16 gate logits, noise and temperature (the research runs)
    param_dtype: torch.dtype = torch.float32
    compute_dtype: torch.dtype | None = None
    backend: str = "auto"
    recompute: bool | None = None
    save_every: int = 0  # optimizer steps between periodic checkpoints (0: final only)
    padding_side: str = "left"

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        def fail(name, expected):
            raise ValueError(f"{name}: expected {expected}, got {getattr(self, name)!r}")

        for name in ("lr", "max_grad_norm"):
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) > 0):
                fail(name, "a positive number")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            fail("weight_decay", "a number >= 0")
        if not (isinstance(self.warmup_ratio, (int, float)) and 0 <= self.warmup_ratio <= 1):
            fail("warmup_ratio", "a fraction in [0, 1]")
        for name in ("grad_accum", "batch_size", "epochs", "max_length"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                fail(name, "an integer >= 1")
        if self.max_steps is not None and not (isinstance(self.max_steps, int) and self.max_steps >= 1):
            fail("max_steps", "None or an integer >= 1")
        if self.anneal_steps is not None and not (isinstance(self.anneal_steps, int) and self.anneal_steps >= 1):
            fail("anneal_steps", "None or an integer >= 1")
        for name in ("initial_temperature", "final_temperature"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                fail(name, "None or a positive number")
        if self.dropout is not None and not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            fail("dropout", "None or a probability in [0, 1)")
        if self.mode not in MODES:
            fail("mode", f"one of {list(MODES)}")
        if self.loss_normalization not in LOSS_NORMALIZATIONS:
            fail("loss_normalization", f"one of {list(LOSS_NORMALIZATIONS)}")
        if not (isinstance(self.save_every, int) and self.save_every >= 0):
            fail("save_every", "an integer >= 0")
        if self.padding_side not in ("left", "right"):
            fail("padding_side", "'left' or 'right'")

    def replace(self, **changes) -> "Recipe":
        return dataclasses.replace(self, **changes)


def total_steps(batches_per_epoch: int, recipe: Recipe) -> int:
    """Optimizer steps of a run: ``ceil(batches / grad_accum)`` per epoch (the last window of an
    epoch may be short, as in the research loop), capped by ``max_steps``."""
    steps = math.ceil(batches_per_epoch / recipe.grad_accum) * recipe.epochs
    return min(steps, recipe.max_steps) if recipe.max_steps is not None else steps


def warmup_steps(total: int, warmup_ratio: float) -> int:
    return int(warmup_ratio * total)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """The linear schedule with warmup (``transformers``' ``get_linear_schedule_with_warmup``):
    ``step / warmup`` while warming up, then linear decay to 0 at ``total``. ``step`` is the
    number of optimizer steps taken before the one this factor applies to."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def research_init(num_fusers: int, sharer_heads: int, sharer_head_dim: int, receiver_heads: int,
                  receiver_head_dim: int, hidden_dim: int = 1024, intermediate_dim: int = 1024, num_layers: int = 3,
                  *, generator: torch.Generator | None = None, dtype=torch.float32, device="cpu") -> FuserWeights:
    """Fresh fusers initialised as the research class initialises its modules: every Linear
    (weight and bias) uniform in ``+-1/sqrt(fan_in)`` (PyTorch's ``nn.Linear`` default; the input
    Linear's fan-in is ``Ks + Kt``, sharer and receiver rows concatenated), RMSNorm scales 1,
    gate logits 0 (a closed hard gate until training opens it)."""
    if num_layers < 3:
        raise ValueError(f"num_layers: expected >= 3 (docs/fuser.md), got {num_layers}")
    ks, kt = sharer_heads * sharer_head_dim, receiver_heads * receiver_head_dim
    h, i, b, p = hidden_dim, intermediate_dim, num_layers - 1, num_fusers

    def uniform(*shape, fan_in):
        bound = 1.0 / math.sqrt(fan_in)
        return (torch.rand(*shape, generator=generator, dtype=torch.float64) * 2 - 1).mul_(bound).float()

    w_in = uniform(p, h, ks + kt, fan_in=ks + kt)
    weights = FuserWeights(
        w_in_sharer=w_in[..., :ks].contiguous(), w_in_receiver=w_in[..., ks:].contiguous(),
        b_in=uniform(p, h, fan_in=ks + kt),
        ffn_norm=torch.ones(p, b, h), ffn_w1=uniform(p, b, i, h, fan_in=h), ffn_w2=uniform(p, b, h, i, fan_in=i),
        head_norm=torch.ones(p, h), head_w1=uniform(p, h, h, fan_in=h), head_w2=uniform(p, h, h, fan_in=h),
        w_head=uniform(p, receiver_heads, h, fan_in=h), b_head=uniform(p, receiver_heads, fan_in=h),
        w_out=uniform(p, kt, h, fan_in=h), b_out=uniform(p, kt, fan_in=h),
        gate_logit=torch.zeros(p),
    )
    return weights.to(device=device, dtype=dtype)


def response_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(summed token loss, label count)`` of a causal LM: column ``c``'s logits predict
    ``labels[:, c + 1]``; -100 has no loss. In fp32, as ``transformers``' causal-LM loss."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"labels: shape {list(labels.shape)}, expected {list(logits.shape[:2])} like the logits")
    target = labels[:, 1:].reshape(-1)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), target,
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((target != IGNORE_INDEX).sum())
