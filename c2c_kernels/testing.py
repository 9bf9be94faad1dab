"""Input builders shared by the tests, the benchmarks and ``c2c-bench``: caches in every engine
layout, ragged requests, padding and token-alignment gathers, from a seed."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import backends, layouts

LAYOUTS = ("hf", "vllm_nhd", "vllm_hnd", "flashinfer_nhd", "flashinfer_hnd",
           "flashinfer_interleaved", "sglang")


def __getattr__(name: str):
    # The workload table lives with the benchmarks (c2c_kernels.bench.workloads, which imports
    # this module); the old name stays importable, resolved on first use to avoid the cycle.
    if name == "WORKLOADS":
        from .bench.workloads import WORKLOADS
        return WORKLOADS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def backend_params(include_reference: bool = False, device_types=("cpu", "cuda")):
    """``pytest.param(backend, device)`` for every pair of :func:`c2c_kernels.backends.test_matrix`;
    pairs that cannot run here are kept and skipped, so the report says what did not run and why."""
    import pytest
    return [pytest.param(e.backend, e.device, id=f"{e.backend}-{e.device}",
                         marks=[pytest.mark.skip(reason=e.skip)] if e.skip else [])
            for e in backends.test_matrix(device_types, include_reference=include_reference)]


@dataclass
class Cache:
    """One model's cache: per-layer ``(K, V)`` 4-D views, the tensors that own the memory, and
    the slot of every token (request-major)."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    storage: list[torch.Tensor]
    slots: torch.Tensor
    seq_lens: list[int]


def make_cache(layout: str, num_layers: int, heads: int, head_dim: int, seq_lens: list[int], *,
               page_size: int = 16, dtype=torch.float32, device="cpu", seed: int = 0,
               spare_pages: int = 2) -> Cache:
    """A filled cache holding ``seq_lens[r]`` tokens per request, pages in shuffled order."""
    g = torch.Generator().manual_seed(seed)
    if layout == "hf":
        n = max(seq_lens) + 1  # one unused position after the longest request
        storage = [torch.randn(2, len(seq_lens), heads, n, head_dim, generator=g).to(device, dtype)
                   for _ in range(num_layers)]
        kv = [layouts.hf_views(s[0], s[1]) for s in storage]
        slots = torch.cat([torch.arange(length) + r * n for r, length in enumerate(seq_lens)])
        return Cache(kv, storage, slots.to(device), list(seq_lens))
    if layout == "sglang":
        page_size = 1
    pages_per_req = [-(-length // page_size) for length in seq_lens]
    num_pages = sum(pages_per_req) + spare_pages
    order = torch.randperm(num_pages, generator=g)
    slots, next_page = [], 0
    for length, count in zip(seq_lens, pages_per_req):
        table = order[next_page:next_page + count]
        next_page += count
        pos = torch.arange(length)
        slots.append(table[pos // page_size] * page_size + pos % page_size)
    slots = torch.cat(slots) if slots else torch.zeros(0, dtype=torch.long)

    def fill(shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    storage, kv = [], []
    for _ in range(num_layers):
        if layout in ("vllm_nhd", "vllm_hnd"):
            if layout == "vllm_hnd":  # same logical shape, heads before entries in memory
                t = fill((2, num_pages, heads, page_size, head_dim)).permute(0, 1, 3, 2, 4)
            else:
                t = fill((2, num_pages, page_size, heads, head_dim))
            storage.append(t)
            kv.append(layouts.vllm_views(t))
        elif layout == "flashinfer_nhd":
            pair = (fill((num_pages, page_size, heads, head_dim)), fill((num_pages, page_size, heads, head_dim)))
            storage += list(pair)
            kv.append(layouts.flashinfer_views(pair, "NHD"))
        elif layout == "flashinfer_hnd":
            pair = (fill((num_pages, heads, page_size, head_dim)), fill((num_pages, heads, page_size, head_dim)))
            storage += list(pair)
            kv.append(layouts.flashinfer_views(pair, "HND"))
        elif layout == "flashinfer_interleaved":
            t = fill((num_pages, 2, page_size, heads, head_dim))
            storage.append(t)
            kv.append(layouts.flashinfer_views(t, "NHD"))
        elif layout == "sglang":
            k, v = fill((num_pages, heads, head_dim)), fill((num_pages, heads, head_dim))
            storage += [k, v]
            kv.append(layouts.sglang_views(k, v))
        else:
            raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    return Cache(kv, storage, slots.to(device), list(seq_lens))


def alignment_slots(receiver: Cache, sharer: Cache, *, seed: int = 0, shuffle: bool = True) -> torch.Tensor:
    """Sharer slot for every receiver token: token ``t`` of request ``r`` reads a sharer token
    of the same request (identity when the lengths match and ``shuffle`` is off; otherwise
    repeated and out-of-order tokens, like a tokenizer alignment)."""
    g = torch.Generator().manual_seed(seed + 7)
    out, r_start, s_start = [], 0, 0
    for r_len, s_len in zip(receiver.seq_lens, sharer.seq_lens):
        if shuffle or r_len != s_len:
            idx = torch.randint(0, s_len, (r_len,), generator=g)
        else:
            idx = torch.arange(r_len)
        out.append(sharer.slots.cpu()[s_start + idx])
        r_start, s_start = r_start + r_len, s_start + s_len
    return torch.cat(out).to(sharer.slots.device)


def with_padding(receiver_slots: torch.Tensor, sharer_slots: torch.Tensor, count: int, *, seed: int = 0,
                 slot_dtypes=(torch.int64, torch.int64)):
    """Insert ``count`` padding tokens (receiver slot -1, sharer slot garbage) at random places."""
    g = torch.Generator().manual_seed(seed + 11)
    t = receiver_slots.numel() + count
    pad = torch.zeros(t, dtype=torch.bool)
    pad[torch.randperm(t, generator=g)[:count]] = True
    rs = torch.full((t,), -1, dtype=torch.long)
    ss = torch.full((t,), 10**6, dtype=torch.long)  # never read: its receiver slot is padding
    rs[~pad], ss[~pad] = receiver_slots.cpu(), sharer_slots.cpu()
    dev = receiver_slots.device
    return rs.to(dev, slot_dtypes[0]), ss.to(dev, slot_dtypes[1])


@dataclass
class Case:
    """Arguments of one ``c2c::fuse`` call plus what a test needs to judge it."""

    receiver: Cache
    sharer: Cache
    receiver_caches: list[torch.Tensor]
    sharer_caches: list[torch.Tensor]
    receiver_slots: torch.Tensor
    sharer_slots: torch.Tensor
    weights: object  # FuserWeights
    fusers: list[int]

    def args(self):
        return (self.receiver_caches, self.sharer_caches, self.receiver_slots, self.sharer_slots,
                list(self.weights), self.fusers)

    def clone_receiver(self) -> "Case":
        """The same case on a deep copy of the receiver storage (views rebuilt on the copy)."""
        import copy
        return copy.deepcopy(self)


def make_case(*, layout: str = "vllm_nhd", sharer_layout: str | None = None, layers: int = 2,
              receiver_heads: int = 4, receiver_dim: int = 8, sharer_heads: int = 2, sharer_dim: int = 16,
              seq_lens=(5, 3), sharer_seq_lens=None, page_size: int = 4, sharer_page_size: int | None = None,
              hidden: int = 64, intermediate: int = 48, num_layers: int = 3, padding: int = 2,
              align: bool = True, gates_open=True, slot_dtypes=(torch.int64, torch.int64),
              dtype=torch.float32, device="cpu", seed: int = 0) -> Case:
    """A small random case: ``layers`` receiver layers, K and V each (fusers 0 .. 2*layers-1)."""
    receiver = make_cache(layout, layers, receiver_heads, receiver_dim, list(seq_lens), page_size=page_size,
                          dtype=dtype, device=device, seed=seed)
    sharer = make_cache(sharer_layout or layout, layers, sharer_heads, sharer_dim,
                        list(sharer_seq_lens or seq_lens), page_size=sharer_page_size or page_size,
                        dtype=dtype, device=device, seed=seed + 1)
    sharer_slots = alignment_slots(receiver, sharer, seed=seed, shuffle=align)
    receiver_slots, sharer_slots = with_padding(receiver.slots, sharer_slots, padding, seed=seed,
                                                slot_dtypes=slot_dtypes)
    from .weights import random_weights
    weights = random_weights(2 * layers, sharer_heads, sharer_dim, receiver_heads, receiver_dim, hidden,
                             intermediate, num_layers, dtype=dtype, device=device, seed=seed + 2,
                             gates_open=gates_open)
    receiver_caches = [view for kv in receiver.kv for view in kv]
    sharer_caches = [view for kv in sharer.kv for view in kv]
    return Case(receiver, sharer, receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights,
                list(range(2 * layers)))


# Tolerances of a backend against the fp32 reference, per cache dtype. Fused backends round the
# hidden activations to the cache dtype between GEMMs (tensor cores and AMX take 16-bit
# inputs): four GEMMs deep, each rounding at 2^-11 (fp16) or 2^-8 (bf16) relative, plus the
# final rounding of the cache row itself.
TOLERANCES = {torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def random_published_state(args: dict, *, seed: int = 0, gate_logits=(1.0, 1.0)) -> dict:
    """A state dict in the published ``C2CProjector`` format with random weights (both sides),
    every tensor the weight schema (c2c_kernels.weights.FIELDS) lists, drawn in published order."""
    from .weights import published_layout, research_dims
    g = torch.Generator().manual_seed(seed)
    dims = research_dims(args)

    state = {}
    for side, gate in zip(("key", "value"), gate_logits):
        for entry in published_layout(dims, side):
            shape, f = entry.shape, entry.field
            if len(shape) == 2:  # a Linear weight [out, in]
                state[entry.key] = torch.randn(*shape, generator=g) / shape[1] ** 0.5 * f.scale
            elif len(shape) == 1:  # a bias or norm scale
                state[entry.key] = f.mean + 0.1 * torch.randn(shape[0], generator=g)
            else:  # the gate logit
                state[entry.key] = torch.tensor(float(gate))
    state["gate_temperature"] = torch.tensor(1.0)
    return state


def write_published_checkpoint(directory: str, args: dict, layer_map: dict[int, int], *, seed: int = 0,
                               gate_logits=None) -> None:
    """A checkpoint directory in the published format: one projector per mapped receiver layer."""
    import json
    import os
    os.makedirs(directory, exist_ok=True)
    for p, _ in enumerate(sorted(layer_map)):
        with open(os.path.join(directory, f"projector_{p}.json"), "w") as f:
            json.dump({"class": "C2CProjector", "init_args": args}, f)
        gates = gate_logits[p] if gate_logits is not None else (1.0, 1.0)
        torch.save(random_published_state(args, seed=seed + p, gate_logits=gates),
                   os.path.join(directory, f"projector_{p}.pt"))
    mapping = {"0": {"1": {str(layer): [[layer_map[layer], p]] for p, layer in enumerate(sorted(layer_map))}}}
    with open(os.path.join(directory, "projector_config.json"), "w") as f:
        json.dump(mapping, f)


SMALL_ARGS = {"source_dim": 16, "target_dim": 8, "source_num_heads": 2, "target_num_heads": 4,
              "hidden_dim": 64, "intermediate_dim": 48, "num_layers": 3, "dropout": 0.1,
              "initial_temperature": 1.0, "final_temperature": 0.001}


def reference_fused(case: Case) -> Case:
    """A copy of ``case`` whose receiver cache the reference has fused: what a backend must give."""
    from . import reference
    expected = case.clone_receiver()
    reference.fuse(expected.receiver_caches, expected.sharer_caches, expected.receiver_slots,
                   expected.sharer_slots, expected.weights, expected.fusers)
    return expected


def assert_storage_close(got: Case, want: Case, tol) -> None:
    """Every element of the two cases' receiver storage agrees within ``tol`` (a float, or a
    dtype whose entry of ``TOLERANCES`` to use)."""
    if isinstance(tol, torch.dtype):
        tol = TOLERANCES[tol]
    for g, w in zip(got.receiver.storage, want.receiver.storage):
        torch.testing.assert_close(g.float(), w.float(), atol=tol, rtol=tol)


def at_thread_counts(case: "Case", run, counts=(1, 2, 3)) -> list[list[torch.Tensor]]:
    """The receiver storage after ``run(copy of case)`` at each intra-op thread count (the
    thread count is restored afterwards)."""
    results, threads = [], torch.get_num_threads()
    try:
        for n in counts:
            torch.set_num_threads(n)
            c = case.clone_receiver()
            run(c)
            results.append([t.clone() for t in c.receiver.storage])
    finally:
        torch.set_num_threads(threads)
    return results
