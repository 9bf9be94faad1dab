"""End-to-end time to first token of C2C generation with ``transformers`` models, and the
fusion of decoded tokens.

:func:`ttft_rows`: one row = both prefills, the fusion and the first decode step
(:meth:`C2CModel.first_token_logits`), timed for the fused kernels against the same pipeline
with the reference fuser, and the receiver alone as the floor. :func:`decode_rows`: the fusion
of one decode step with ``include_response`` (B requests, one new row each, every mapped layer
in one ``fuse_all`` call). Models are randomly initialised from the published configs of the
benchmark pairs (:data:`c2c_kernels.bench.workloads.WORKLOADS`): timing does not depend on weight
values, and nothing is downloaded.
"""
from __future__ import annotations

import statistics

import torch

from ..bench import timing
from .hf import C2CModel, DecodeFusion, PromptBatch, Sharer, kv_geometry, random_checkpoint
from .memory import peak_memory
from .tiny import model_config, random_model

# Published configs of the models the workloads name (architecture fields only).
MODELS = {
    "qwen3-0.6b": ("qwen3", dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936)),
    "qwen3-1.7b": ("qwen3", dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936)),
    "qwen3-4b": ("qwen3", dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                               num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936)),
    "qwen3-8b": ("qwen3", dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                               num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936)),
    "qwen2.5-0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, vocab_size=151936)),
    "qwen2.5-1.5b": ("qwen2", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                   num_attention_heads=12, num_key_value_heads=2, vocab_size=151936)),
    "qwen2.5-7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, vocab_size=152064)),
    "llama3.2-1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                  num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256)),
}


def workload_configs(workload: str, *, tiny: bool = False):
    """Receiver and sharer configs of a workload (``"receiver+sharer"``). ``tiny`` keeps each
    model's KV geometry (heads x dim) but shrinks depth, width and vocabulary, for a smoke run."""
    names = workload.split("+")
    if len(names) != 2 or any(n not in MODELS for n in names):
        raise ValueError(f"workload: expected 'receiver+sharer' from {sorted(MODELS)}, got {workload!r}")
    configs = []
    for name in names:
        family, fields = MODELS[name]
        fields = dict(fields, max_position_embeddings=8192, tie_word_embeddings=False)
        if tiny:
            _, kv_heads, head_dim = kv_geometry(model_config(family, **fields))
            fields.update(num_hidden_layers=max(2, fields["num_hidden_layers"] // 7), hidden_size=64,
                          intermediate_size=128, num_attention_heads=kv_heads, head_dim=head_dim, vocab_size=512)
        configs.append(model_config(family, **fields))
    return configs


def _timed(fn, device, repeats: int, warmup: int) -> list[float]:
    """Wall seconds of ``repeats`` calls after ``warmup`` (the device synchronized around each)."""
    return [s.wall_s for s in timing.repeat(fn, device, repeats=repeats, warmup=warmup)]


def time_to_first_token(model: C2CModel, prompts: PromptBatch, *, fuse: bool = True, backend: str | None = None,
                        repeats: int = 5, warmup: int = 1) -> dict:
    """Median/min seconds of prefills + fusion + first decode step, and its peak memory."""
    device = model.receiver.device

    def run():
        return model.first_token_logits(prompts, fuse=fuse, backend=backend)

    times = _timed(run, device, repeats, warmup)
    _, peak = peak_memory(run, device)
    return {"median_s": statistics.median(times), "min_s": min(times), "peak_bytes": peak}


def ttft_rows(workload: str = "qwen3-0.6b+qwen2.5-0.5b", *, batch: int = 1, prompt_tokens: int = 512,
              device=None, dtype=None, backends=("auto", "reference"), repeats: int = 5, warmup: int = 1,
              tiny: bool = False, fuser_hidden: int = 1024, fuser_intermediate: int = 1024,
              seed: int = 0) -> list[dict]:
    """The benchmark rows of one workload: one per fusion backend, plus the receiver alone.

    Defaults to CUDA and bf16 when a GPU is present, else CPU and fp32. Each row holds
    ``workload, variant, batch, prompt_tokens, median_ms, min_ms, peak_mib`` and, for fused
    variants, ``vs_reference`` (the reference pipeline's median over this one's).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    receiver_config, sharer_config = workload_configs(workload, tiny=tiny)
    receiver = random_model(receiver_config, dtype=dtype, device=device, seed=seed)
    sharer = random_model(sharer_config, dtype=dtype, device=device, seed=seed + 1)
    hidden, inner = (64, 64) if tiny else (fuser_hidden, fuser_intermediate)
    ckpt = random_checkpoint(receiver, sharer, hidden_dim=hidden, intermediate_dim=inner, dtype=dtype,
                             device=device, seed=seed + 2)
    c2c_model = C2CModel(receiver, None, [Sharer(sharer, ckpt)])
    vocab = min(receiver_config.vocab_size, sharer_config.vocab_size)
    generator = torch.Generator().manual_seed(seed + 3)
    ids = torch.randint(0, vocab, (batch, prompt_tokens), generator=generator).to(device)
    prompts = PromptBatch.same_tokens(ids)
    variants = [(f"fused ({b})", True, b) for b in backends] + [("receiver only", False, None)]
    rows = []
    for name, fuse, backend in variants:
        result = time_to_first_token(c2c_model, prompts, fuse=fuse, backend=backend, repeats=repeats,
                                     warmup=warmup)
        rows.append({"workload": workload, "variant": name, "batch": batch, "prompt_tokens": prompt_tokens,
                     "device": device.type, "dtype": str(dtype).replace("torch.", ""),
                     "median_ms": 1e3 * result["median_s"], "min_ms": 1e3 * result["min_s"],
                     "peak_mib": result["peak_bytes"] / 2**20})
    reference = next((r["median_ms"] for r in rows if r["variant"] == "fused (reference)"), None)
    for row in rows:
        if reference and row["variant"].startswith("fused"):
            row["vs_reference"] = reference / row["median_ms"]
    return rows


def fusion_memory(workload: str = "qwen3-0.6b+qwen2.5-0.5b", *, batch: int = 1, prompt_tokens: int = 512,
                  backend: str = "auto", device=None, dtype=None, fuser_hidden: int = 1024,
                  fuser_intermediate: int = 1024, seed: int = 0) -> dict:
    """Peak memory of fusing a prefilled HF-layout cache of the workload's geometry, against the
    caches' own size. ``integration_peak_mib`` is :func:`fuse_prompt_cache` (views, slots,
    alignment gather); ``op_peak_mib`` the bare ``c2c.fuse_all`` call on prebuilt views and
    slots: the difference is all the integration adds. No models are built."""
    from ..api import fuse_all
    from ..checkpoint import last_aligned_map, make_checkpoint
    from ..layouts import dynamic_cache_views, hf_slots
    from ..bench.workloads import WORKLOADS
    from ..weights import random_weights
    from .hf import fuse_prompt_cache
    from .memory import cache_bytes

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    (r_layers, r_heads, r_dim), (s_layers, s_heads, s_dim) = WORKLOADS[workload]
    layer_map = last_aligned_map(r_layers, s_layers)
    weights = random_weights(2 * len(layer_map), s_heads, s_dim, r_heads, r_dim, fuser_hidden, fuser_intermediate,
                             dtype=dtype, device=device, seed=seed)
    ckpt = make_checkpoint(weights, layer_map, s_heads)

    def cache(layers, heads, dim):
        return [(torch.randn(batch, heads, prompt_tokens, dim, device=device, dtype=dtype),
                 torch.randn(batch, heads, prompt_tokens, dim, device=device, dtype=dtype)) for _ in range(layers)]

    receiver, sharer = cache(r_layers, r_heads, r_dim), cache(s_layers, s_heads, s_dim)
    mask = torch.ones(batch, prompt_tokens, dtype=torch.bool, device=device)
    columns = torch.arange(prompt_tokens, device=device).expand(batch, prompt_tokens)
    _, integration_peak = peak_memory(
        lambda: fuse_prompt_cache(ckpt, receiver, mask, sharer, columns, backend=backend), device)
    receiver_kv, sharer_kv = dynamic_cache_views(receiver), dynamic_cache_views(sharer)
    receiver_slots = hf_slots(mask)
    sharer_slots = (torch.arange(batch, device=device).unsqueeze(1) * prompt_tokens + columns).reshape(-1)
    _, op_peak = peak_memory(
        lambda: fuse_all(ckpt, receiver_kv, sharer_kv, receiver_slots, sharer_slots, backend=backend), device)
    return {"workload": workload, "backend": backend, "batch": batch, "prompt_tokens": prompt_tokens,
            "dtype": str(dtype).replace("torch.", ""), "receiver_cache_mib": cache_bytes(receiver) / 2**20,
            "sharer_cache_mib": cache_bytes(sharer) / 2**20, "integration_peak_mib": integration_peak / 2**20,
            "op_peak_mib": op_peak / 2**20}


def decode_rows(workload: str = "qwen3-0.6b+qwen2.5-0.5b", *, batches=(1, 8, 64), device=None, dtype=None,
                backends=("auto", "reference"), repeats: int = 20, warmup: int = 3, graph: bool = True,
                fuser_hidden: int = 1024, fuser_intermediate: int = 1024, seed: int = 0) -> list[dict]:
    """The decode-step fusion of ``include_response``: for each batch size ``B``, one
    :meth:`DecodeFusion.fuse` (one new row per request, every mapped layer, one ``fuse_all``
    call) per backend, plus, on CUDA, the same call replayed from a CUDA graph. Each row holds
    ``workload, variant, batch, median_us, min_us, weights_mib`` (the fuser weights every step
    reads), ``weights_gbps`` (those bytes over the median time) and, for fused variants,
    ``vs_reference``. No models are built (their configs give the cache geometry)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    receiver_config, sharer_config = workload_configs(workload)
    ckpt = random_checkpoint(receiver_config, sharer_config, hidden_dim=fuser_hidden,
                             intermediate_dim=fuser_intermediate, dtype=dtype, device=device, seed=seed)
    weight_bytes = sum(t.numel() * t.element_size() for t in ckpt.weights if isinstance(t, torch.Tensor))
    rows = []
    for batch in batches:
        timed = []
        for backend in backends:
            fusion = DecodeFusion([ckpt], receiver_config, [sharer_config], batch, backend=backend, device=device,
                                  dtype=dtype)
            generator = torch.Generator(device=device).manual_seed(seed + batch)
            for pair in [fusion.receiver_rows] + fusion.sharer_rows:
                for kv in pair:
                    for t in (kv or ()):
                        t.copy_(torch.randn(t.shape, generator=generator, device=device, dtype=dtype))
            timed.append((f"fused ({backend})", _timed(fusion.fuse, device, repeats, warmup)))
            if graph and device.type == "cuda" and backend != "reference":
                stream = torch.cuda.Stream(device)
                stream.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(stream):
                    fusion.fuse()  # compile and warm up outside the capture
                torch.cuda.current_stream(device).wait_stream(stream)
                cuda_graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(cuda_graph):
                    fusion.fuse()
                timed.append((f"fused ({backend}, graph)", _timed(cuda_graph.replay, device, repeats, warmup)))
        for name, times in timed:
            median = statistics.median(times)
            rows.append({"workload": workload, "variant": name, "batch": batch, "device": device.type,
                         "dtype": str(dtype).replace("torch.", ""), "median_us": 1e6 * median,
                         "min_us": 1e6 * min(times), "weights_mib": weight_bytes / 2**20,
                         "weights_gbps": weight_bytes / median / 1e9})
        reference = next((r["median_us"] for r in rows if r["batch"] == batch and r["variant"] == "fused (reference)"),
                         None)
        for row in rows:
            if reference and row["batch"] == batch:
                row["vs_reference"] = reference / row["median_us"]
    return rows
