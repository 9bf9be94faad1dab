"""One optimizer step (forward, backward, AdamW) of the first workload's fusers: time and the
activation memory kept for the backward, c2c training vs the eager reference and
``torch.compile`` of it. Not part of the test run.

    python benchmarks/bench_training.py                  # CPU: 1 fused layer (K and V), 256 tokens
    python benchmarks/bench_training.py --device cuda    # all fused layers, 4 sequences x 2048 tokens
    python benchmarks/bench_training.py --end-to-end     # c2c-train's loss + backward, receiver included

Rows: ``c2c`` (``c2c_kernels.training``: torch ops on the CPU, Triton kernels on a GPU),
``reference`` (``reference.fuser_forward`` in training mode under autograd: fp32 compute,
every activation kept), ``reference+compile`` (the same per-entry function through
``torch.compile``) and, on a GPU, ``research`` (per-fuser ``nn.Module``s in the model dtype, as
the research code trains). ``saved`` is what autograd keeps for the backward (counted with
saved-tensor hooks, parameters and input rows excluded); on a GPU ``peak`` is the allocator's
peak during the step above what was allocated before it.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics

import torch
import torch.nn.functional as F
from torch import nn

from c2c_kernels import random_weights, reference
from c2c_kernels.bench import timing
from c2c_kernels.bench.workloads import WORKLOADS
from c2c_kernels.training import FuserTrainer, saved_bytes_per_token
from c2c_kernels.weights import FuserWeights

WORKLOAD = "qwen3-0.6b+qwen2.5-0.5b"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class SavedBytes:
    """Bytes autograd keeps for the backward, each storage counted once."""

    def __init__(self, exclude):
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.seen, self.total = set(), 0

    def pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.exclude and ptr not in self.seen:
            self.seen.add(ptr)
            self.total += t.untyped_storage().nbytes()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def reference_entry(s, x, weights, temperature, generator, heads):
    """One entry through the reference; ``weights`` is a one-fuser stack (``t[f:f+1]``), so
    ``torch.compile`` sees the same shapes for every fuser and compiles once."""
    y, a, gate = reference.fuser_forward(s, x, weights, 0, training=True, dropout_p=0.1,
                                         temperature=temperature, generator=generator)
    return reference.fused_rows(x, y, a, gate, heads)


class ResearchFuser(nn.Module):
    """One fuser as research code trains it: Linears and norms in the model dtype, a concat,
    dropout modules, a Gumbel-sigmoid gate (all activations kept by autograd)."""

    def __init__(self, w: FuserWeights, f: int):
        super().__init__()
        p = [nn.Parameter(t[f].detach().clone()) for t in w]
        (self.w_in_s, self.w_in_r, self.b_in, self.ffn_norm, self.ffn_w1, self.ffn_w2, self.head_norm,
         self.head_w1, self.head_w2, self.w_head, self.b_head, self.w_out, self.b_out, self.gate_logit) = p

    @staticmethod
    def block(z, norm, w1, w2):
        normed = (z.float() * torch.rsqrt(z.float().pow(2).mean(-1, keepdim=True) + reference.RMS_EPS)).to(z.dtype) * norm
        return z + F.dropout(F.linear(F.gelu(F.linear(normed, w1)), w2), 0.1, True)

    def forward(self, s, x, temperature, heads):
        u = F.linear(torch.cat([s, x], -1), torch.cat([self.w_in_s, self.w_in_r], 1), self.b_in)
        u = self.block(u, self.ffn_norm[0], self.ffn_w1[0], self.ffn_w2[0])
        a = F.linear(self.block(u, self.head_norm, self.head_w1, self.head_w2), self.w_head, self.b_head)
        p = u
        for b in range(1, self.ffn_w1.shape[0]):
            p = self.block(p, self.ffn_norm[b], self.ffn_w1[b], self.ffn_w2[b])
        y = F.linear(p, self.w_out, self.b_out)
        gate = torch.sigmoid((self.gate_logit + reference.gumbel_noise(a.shape, device=a.device)) / temperature)
        t = x.shape[0]
        return (x.view(t, heads, -1) + (gate * torch.sigmoid(a)).to(x.dtype).unsqueeze(-1) * y.view(t, heads, -1)).view(t, -1)


def make_inputs(args, dtype, device):
    (_, ht, dt), (_, hs, ds) = WORKLOADS[WORKLOAD]
    fusers = 2 * args.layers
    tokens = args.sequences * args.tokens
    w = random_weights(fusers, hs, ds, ht, dt, 1024, 1024, 3, dtype=dtype, device=device, seed=0)
    g = torch.Generator().manual_seed(1)
    sharer = torch.randn(fusers, tokens, hs * ds, generator=g).to(device, dtype)
    receiver = torch.randn(fusers, tokens, ht * dt, generator=g).to(device, dtype)
    target = torch.randn(fusers, tokens, ht * dt, generator=g).to(device)
    return w, sharer, receiver, target, ht


def step_functions(impl, args, dtype, device):
    """(step, params, rows) of one implementation; ``step()`` runs one optimizer step."""
    w, sharer, receiver, target, heads = make_inputs(args, dtype, device)
    fusers = list(range(w.num_fusers))

    if impl == "c2c":
        trainer = FuserTrainer(w, dropout_p=0.1, total_steps=100)
        params = list(trainer.parameters())

        def forward():
            return trainer(sharer, receiver, fusers)
        after = trainer.advance
    elif impl in ("reference", "reference+compile"):
        weights = FuserWeights(*(nn.Parameter(t.clone()) for t in w))
        params = list(weights)
        entry = torch.compile(reference_entry) if impl.endswith("compile") else reference_entry
        generator = None if impl.endswith("compile") else torch.Generator(device=device).manual_seed(0)

        def forward():
            return torch.stack([entry(sharer[i], receiver[i], FuserWeights(*(t[f:f + 1] for t in weights)),
                                      1.0, generator, heads) for i, f in enumerate(fusers)])
        after = None
    else:  # research
        modules = nn.ModuleList(ResearchFuser(w, f) for f in fusers)
        params = list(modules.parameters())

        def forward():
            return torch.stack([m(sharer[i], receiver[i], 1.0, heads) for i, m in enumerate(modules)])
        after = None

    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(saved: SavedBytes | None = None):
        opt.zero_grad()
        if saved is None:
            out = forward()
        else:
            with saved.hooks():
                out = forward()
        F.mse_loss(out.float(), target).backward()
        opt.step()
        if after:
            after()
    return step, params, [sharer, receiver], w


def measure(impls, args, dtype, device):
    """{impl: (median wall s, median process CPU s, saved bytes, peak bytes)}: each impl warmed
    up and measured for memory on its own, then timed in interleaved rounds (a shared machine's
    load drifts; interleaving spreads it evenly)."""
    steps, saved, peak = {}, {}, {}
    for impl in impls:
        step, params, rows, _ = step_functions(impl, args, dtype, device)
        step()  # warm-up (and compilation); optimizer state allocated
        counter = SavedBytes(params + rows)
        timing.synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        step(counter)
        timing.synchronize(device)
        peak[impl] = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else None
        saved[impl], steps[impl] = counter.total, step
    wall, cpu = {impl: [] for impl in impls}, {impl: [] for impl in impls}
    for _ in range(args.steps):
        for impl in impls:
            sample = timing.measure(steps[impl], device)
            wall[impl].append(sample.wall_s)
            cpu[impl].append(sample.cpu_s)
    return {impl: (statistics.median(wall[impl]), statistics.median(cpu[impl]), saved[impl], peak[impl])
            for impl in impls}


class EagerFusers(FuserTrainer):
    """The same parameters, fused by ``reference.fuser_forward`` under plain autograd (every
    activation kept): the eager baseline of the end-to-end measurement."""

    def forward(self, sharer_rows, receiver_rows, fusers, *, generator=None):
        heads = self.w_head.shape[1]
        out = []
        for s, x, f in zip(sharer_rows, receiver_rows, fusers):
            y, a, gate = reference.fuser_forward(s, x, self.weights, f, training=self.training,
                                                 dropout_p=self.dropout_p, temperature=self.temperature,
                                                 generator=generator)
            out.append(reference.fused_rows(x, y, a, gate, heads).to(x.dtype))
        return torch.stack(out)


def end_to_end(args, device):
    """``c2c-train``'s micro-batch (sharer prefill, receiver prefill with the fused rows, the
    final section's loss, the backward) with the fused autograd Function vs eager autograd
    fusers on the same pipeline: what autograd keeps (receiver activations included), the
    step's peak memory and time."""
    from c2c_kernels.integrations import tiny
    from c2c_kernels.training import C2CTrainer, Recipe, fresh_checkpoint
    from c2c_kernels.training.loop import PeakMemory

    tok = tiny.tiny_tokenizer("bytelevel", 320)
    size = dict(hidden_size=args.model_hidden, intermediate_size=2 * args.model_hidden, num_attention_heads=8,
                num_key_value_heads=2, head_dim=64, num_hidden_layers=args.model_layers, vocab_size=len(tok),
                max_position_embeddings=4096, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    receiver = tiny.random_model(tiny.model_config("qwen3", **size), device=device, seed=1)
    sharer = tiny.random_model(tiny.model_config("qwen3", **size), device=device, seed=2)
    words = " ".join(tiny.CORPUS).split()
    def text(start, count):
        return " ".join(words[(start + k) % len(words)] for k in range(count))

    convs = [[{"role": "user", "content": text(i, args.tokens // 2)},
              {"role": "assistant", "content": text(3 * i, args.tokens // 4)}] for i in range(args.sequences)]
    ckpt = fresh_checkpoint(receiver, sharer)
    rows = []
    for impl in ("c2c", "eager"):
        trainer = C2CTrainer(receiver, tok, [(sharer, None)], [ckpt], Recipe(batch_size=args.sequences))
        if impl == "eager":
            fused = trainer.model.fusers[0]
            eager = EagerFusers(ckpt.weights, dropout_p=fused.dropout_p, total_steps=fused.total_steps)
            trainer.model.fusers[0] = eager
        trainer.model.train()
        batch = trainer.encode(convs)
        params = list(trainer.model.fusers.parameters())

        def step(counter=None):
            gens = trainer.generators(range(args.sequences))
            hooks = counter.hooks() if counter is not None else contextlib.nullcontext()
            with hooks:
                loss, count = trainer.model(batch, gens)
            (loss / count).backward()
            for p in params:
                p.grad = None

        step()
        counter = SavedBytes(params)
        memory = PeakMemory(device)
        memory.reset()
        step(counter)
        peak = memory.peak()
        samples = [timing.measure(step, device) for _ in range(args.steps)]
        rows.append((impl, counter.total, peak, statistics.median(s.cpu_s for s in samples)))
    tokens = int(batch.attention_mask.sum())
    print(f"end to end: receiver and sharer {args.model_layers} layers x {args.model_hidden} hidden, "
          f"{2 * len(ckpt.layers)} fusers (H = I = 1024), {args.sequences} conversations, {tokens} tokens, {device}")
    print("| fusers | saved MiB (receiver included) | peak MiB | step ms (process CPU) |")
    print("|---|---|---|---|")
    for impl, saved, peak, cpu in rows:
        print(f"| {impl} | {saved / 2**20:.1f} | {'' if peak is None else f'{peak / 2**20:.0f}'} | {cpu * 1e3:.0f} |")
    print(f"saved by the fused backward: {rows[1][1] / max(rows[0][1], 1):.2f}x less kept")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), nargs="+", default=["bf16", "fp32"])
    parser.add_argument("--layers", type=int, help="fused layers (K and V each); default 1 on CPU, all on GPU")
    parser.add_argument("--sequences", type=int)
    parser.add_argument("--tokens", type=int, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--impl", nargs="+", default=None,
                        help="c2c reference reference+compile research (default: all that fit the device)")
    parser.add_argument("--end-to-end", action="store_true",
                        help="c2c-train's whole micro-batch, receiver forward included, c2c vs eager fusers")
    parser.add_argument("--model-layers", type=int, default=4, help="--end-to-end: layers of each model")
    parser.add_argument("--model-hidden", type=int, default=256, help="--end-to-end: hidden size of each model")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.end_to_end:
        if args.threads:
            torch.set_num_threads(args.threads)
        args.sequences = args.sequences or 2
        args.tokens = args.tokens or 128
        return end_to_end(args, device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU here")
    gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    (lt, _, _), (ls, _, _) = WORKLOADS[WORKLOAD]
    args.layers = args.layers or (min(lt, ls) if gpu else 1)
    args.sequences = args.sequences or (4 if gpu else 2)
    args.tokens = args.tokens or (2048 if gpu else 128)
    # Research-style bf16 on a CPU without bf16 matrix units runs its GEMMs ~100x slower; it is
    # a GPU row (and an fp32 CPU row).
    impls = args.impl or ["c2c", "reference", "reference+compile", "research"]
    tokens = args.sequences * args.tokens
    print(f"{WORKLOAD}: {2 * args.layers} fusers, {args.sequences} x {args.tokens} tokens, {device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| impl | dtype | step ms (wall) | step ms (process CPU) | saved MiB | saved B/token/fuser | peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for name in args.dtype:
        dtype = DTYPES[name]
        # Research-style bf16 on a CPU without bf16 matrix units runs its GEMMs ~100x slower.
        run = [i for i in impls if not (i == "research" and dtype != torch.float32 and not gpu)]
        for impl, (wall, cpu, saved, peak) in measure(run, args, dtype, device).items():
            print(f"| {impl} | {name} | {wall * 1e3:.0f} | {cpu * 1e3:.0f} | {saved / 2**20:.1f} | "
                  f"{saved / (tokens * 2 * args.layers):.0f} | {'' if peak is None else f'{peak / 2**20:.0f}'} |",
                  flush=True)
    (_, ht, dt), (_, hs, ds) = WORKLOADS[WORKLOAD]
    w = random_weights(1, hs, ds, ht, dt, 1024, 1024, 3)
    for name in args.dtype:
        cd = DTYPES[name] if gpu else torch.float32
        print(f"c2c keeps {saved_bytes_per_token(w, cd, recompute=gpu)} B/token/fuser for {name} weights "
              f"({cd} compute, recompute={gpu}; docs/training.md)")


if __name__ == "__main__":
    main()
