"""The random draws of training mode, made exactly as ``reference.fuser_forward`` makes them.

Per fused entry, in this order: one uniform ``[T, H]`` per dropout (FFN_1, the weight branch's
FFN, then the projection blocks), then the Gumbel noise ``[T, Ht]``. Drawing the same tensors
from the same generator in the same order gives the reference's masks and noise bit for bit.

The backward does not keep the masks: it snapshots the generator state (a few bytes on CUDA,
about 5 KB on the CPU) when the forward starts and replays the draws from a copy of it.
"""
from __future__ import annotations

import torch

from ..reference import gumbel_noise


def resolve_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    """The generator the draws come from: the one given, else the device's default one."""
    if generator is not None:
        if generator.device.type != device.type:
            raise ValueError(f"generator: a {generator.device.type} generator cannot draw the noise of "
                             f"rows on {device}")
        return generator
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[index]
    return torch.default_generator


def snapshot(generator: torch.Generator) -> torch.Tensor:
    return generator.get_state()


def replay(state: torch.Tensor, device: torch.device) -> torch.Generator:
    """A fresh generator that continues from ``state`` (the original is left alone)."""
    copy = torch.Generator(device=device)
    copy.set_state(state)
    return copy


def dropout_keep(generator, tokens: int, width: int, p: float, device) -> torch.Tensor | None:
    """One dropout's keep mask (uint8, 1 = kept), or None without dropout (no draw is made)."""
    if p <= 0.0:
        return None
    uniform = torch.rand((tokens, width), generator=generator, device=device)
    return (uniform >= p).view(torch.uint8)


def gumbel(generator, tokens: int, heads: int, device) -> torch.Tensor:
    return gumbel_noise((tokens, heads), generator=generator, device=device)


def soft_gate(gate_logit: torch.Tensor, noise: torch.Tensor, temperature: float) -> torch.Tensor:
    """``sigmoid((g + gumbel) / tau)``, the same ops as the reference (bit-identical). The
    noise is widened to a float64 logit's dtype (a 0-d logit would not promote it)."""
    return torch.sigmoid((gate_logit + noise.to(torch.promote_types(gate_logit.dtype, noise.dtype))) / temperature)


def research_soft_gate(gate_logit: torch.Tensor, generator, tokens: int, heads: int, device, temperature: float,
                       dtype: torch.dtype) -> torch.Tensor:
    """The soft gate in the research recipe's dtypes: the uniform draw, the Gumbel transform,
    the gate logit, the temperature buffer and the sigmoid all in ``dtype`` (bf16 in the
    published runs). One ``[T, H]`` draw from ``generator``, in the place of :func:`gumbel`'s."""
    u = torch.rand((tokens, heads), generator=generator, device=device, dtype=dtype)
    g = -torch.log(-torch.log(u + 1e-20) + 1e-20)
    tau = torch.tensor(temperature, dtype=dtype, device=device)
    return torch.sigmoid((gate_logit.to(dtype) + g) / tau)
