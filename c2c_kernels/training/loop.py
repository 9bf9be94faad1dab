"""The training run: :class:`C2CTrainer` trains the fusers of one receiver and its sharers with
the research recipe (:class:`~.recipe.Recipe`), writes checkpoints in the published format and
resumes from them. ``c2c-train`` (:mod:`.cli`) is this class on the command line.

    trainer = C2CTrainer(receiver, tokenizer, [(sharer, sharer_tokenizer)], [load_checkpoint(d)])
    trainer.fit(load_conversations("data.jsonl"), "out")     # out/checkpoint-<step>, out/final

Under ``torchrun`` (a ``torch.distributed`` process group initialised) every rank takes its
share of each global batch and the fusers' gradients are averaged over ranks before clipping
(what DDP does), or, with ``fsdp=True``, the fusers are sharded with FSDP2's ``fully_shard``.
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Sequence

import torch
import torch.distributed as dist

from ..checkpoint import Checkpoint, last_aligned_map, make_checkpoint, read_fuser_weights, save_checkpoint
from ..integrations import hf
from ..weights import FuserWeights
from . import data as data_mod
from .pipeline import TrainingForward, layout_checkpoint
from .recipe import Recipe, lr_factor, research_init, total_steps, warmup_steps
from .trainer import FuserTrainer

STATE_FILE = "training_state.pt"


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class PeakMemory:
    """Per-step peak memory: the CUDA allocator's peak on a GPU; on the CPU the process's peak
    resident set (Linux ``VmHWM``, reset per step through ``/proc/self/clear_refs``), else None."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None


def fresh_checkpoint(receiver, sharer, *, hidden_dim: int = 1024, intermediate_dim: int = 1024, num_layers: int = 3,
                     seed: int = 0, layer_map: dict[int, int] | None = None, training_args: dict | None = None
                     ) -> Checkpoint:
    """A fuser checkpoint for two models with the research initialisation (:func:`.recipe.research_init`)
    and the last-aligned layer map (or ``layer_map``)."""
    r_layers, r_heads, r_dim = hf.kv_geometry(receiver)
    s_layers, s_heads, s_dim = hf.kv_geometry(sharer)
    layer_map = last_aligned_map(r_layers, s_layers) if layer_map is None else dict(layer_map)
    weights = research_init(2 * len(layer_map), s_heads, s_dim, r_heads, r_dim, hidden_dim, intermediate_dim,
                            num_layers, generator=torch.Generator().manual_seed(seed))
    ckpt = make_checkpoint(weights, layer_map, s_heads)
    return ckpt.with_weights(weights, training_args=training_args or ckpt.training_args())


class C2CTrainer:
    """Trains the fusers between a frozen receiver and frozen sharers.

    ``sharers``: ``(model, tokenizer)`` pairs (tokenizer None: the receiver's tokens).
    ``checkpoints``: one per sharer (published or :func:`fresh_checkpoint`). Every projector
    parameter trains; both LLMs are frozen (their ``requires_grad`` is turned off).
    ``distributed=False`` runs alone even inside an initialised process group.
    """

    def __init__(self, receiver, tokenizer, sharers: Sequence, checkpoints: Sequence[Checkpoint],
                 recipe: Recipe | None = None, *, strategy: str = "first", fsdp: bool = False,
                 export_dtype: torch.dtype | None = None, log=None, distributed: bool = True):
        recipe = recipe or Recipe()
        if len(checkpoints) != len(sharers):
            raise ValueError(f"checkpoints: {len(checkpoints)}, expected one per sharer ({len(sharers)})")
        self.receiver, self.tokenizer, self.recipe = receiver, tokenizer, recipe
        self.device = receiver.device
        for model in [receiver, *(m for m, _ in sharers)]:
            model.requires_grad_(False)
            model.eval()  # the LLMs' own dropout stays off, as in the research runs
        args = checkpoints[0].training_args()
        for ckpt in checkpoints[1:]:
            if ckpt.training_args() != args:
                raise ValueError("checkpoints: their projectors' training args differ; pass them in the recipe")
        self.schedule = {
            "anneal_steps": recipe.anneal_steps or args["anneal_steps"],
            "initial_temperature": recipe.initial_temperature or args["initial_temperature"],
            "final_temperature": recipe.final_temperature or args["final_temperature"],
            "dropout": args["dropout"] if recipe.dropout is None else recipe.dropout,
        }
        self.checkpoints = list(checkpoints)
        gate_dtype = torch.bfloat16 if recipe.research_dtypes else None
        param_dtype = torch.bfloat16 if recipe.research_dtypes else recipe.param_dtype
        self.export_dtype = export_dtype
        fusers = [FuserTrainer(ckpt.weights.to(device=self.device), dropout_p=self.schedule["dropout"],
                               total_steps=self.schedule["anneal_steps"],
                               start_temperature=self.schedule["initial_temperature"],
                               end_temperature=self.schedule["final_temperature"], param_dtype=param_dtype,
                               compute_dtype=recipe.compute_dtype, backend=recipe.backend,
                               recompute=recipe.recompute, gate_dtype=gate_dtype)
                  for ckpt in checkpoints]
        client = hf.C2CModel(receiver, tokenizer,
                             [hf.Sharer(m, layout_checkpoint(c, receiver.device, receiver.dtype), t)
                              for (m, t), c in zip(sharers, checkpoints)],
                             mode=recipe.mode, strategy=strategy)
        self.model = TrainingForward(client, fusers, recipe.mode)
        self.rank, self.world = _distributed() if distributed else (0, 1)
        self.fsdp = fsdp
        if fsdp:
            from torch.distributed.fsdp import fully_shard
            for fuser in fusers:
                fully_shard(fuser, reshard_after_forward=False)
        self.params = [p for p in self.model.fusers.parameters()]
        # One group, weight decay on every parameter, the gate logits included (the research
        # recipe's three groups all share lr and weight decay).
        self.optimizer = torch.optim.AdamW(self.params, lr=recipe.lr, weight_decay=recipe.weight_decay)
        self.total = None
        self.scheduler = None
        self.step = 0
        self.memory = PeakMemory(self.device)
        self.log = log

    # -- pieces --

    @property
    def fusers(self) -> list[FuserTrainer]:
        return list(self.model.fusers)

    @property
    def temperature(self) -> float:
        return self.fusers[0].temperature

    def plan(self, num_examples: int) -> int:
        """Set the schedule for ``num_examples`` training conversations; returns the total steps."""
        per_rank_batch = self.recipe.batch_size * self.world
        self.total = total_steps(math.ceil(num_examples / per_rank_batch), self.recipe)
        warmup = warmup_steps(self.total, self.recipe.warmup_ratio)
        total = self.total
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lambda s: lr_factor(s, warmup, total))
        return self.total

    def encode(self, conversations) -> hf.PromptBatch:
        return self.model.client.tokenize_training(conversations, padding_side=self.recipe.padding_side,
                                                   max_length=self.recipe.max_length)

    def generators(self, seeds: Sequence[int]) -> list[torch.Generator]:
        return [torch.Generator(device=self.device).manual_seed(s) for s in seeds]

    def loss(self, conversations, seeds: Sequence[int] | None = None):
        """``(summed response loss, label count)`` of conversations, with the fusers in their
        current mode (training: ``seeds`` give each conversation's draws)."""
        batch = self.encode(conversations)
        gens = self.generators(seeds) if self.model.training else None
        return self.model(batch, gens)

    # -- one optimizer step --

    def train_step(self, window: Sequence[Sequence[tuple[int, dict]]]) -> dict:
        """One optimizer step over a window of micro-batches (lists of ``(seed, conversation)``
        for this rank). Returns the step's statistics."""
        if self.scheduler is None:
            raise ValueError("plan: call trainer.plan(num_examples) (or fit) before train_step")
        recipe = self.recipe
        self.model.train()
        self.memory.reset()
        start = time.perf_counter()
        encoded = [(self.encode([c for _, c in micro]), [s for s, _ in micro]) for micro in window if micro]
        counts = [int((b.labels[:, 1:] != -100).sum()) for b, _ in encoded]
        total_count = sum(counts)
        if recipe.loss_normalization == "tokens" and self.world > 1:
            t = torch.tensor([total_count], dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            total_count = int(t.item())
        losses, tokens = [], 0
        for batch, seeds in encoded:
            loss_sum, count = self.model(batch, self.generators(seeds))
            tokens += int(batch.attention_mask.sum())
            if recipe.loss_normalization == "tokens":
                scaled = loss_sum / max(total_count, 1) * self.world
            else:
                scaled = loss_sum / max(count, 1) / recipe.grad_accum
            losses.append(float(loss_sum.detach()) / max(count, 1))
            scaled.backward()
        if self.world > 1 and not self.fsdp:
            for p in self.params:  # DDP's reduction: the mean of the ranks' gradients
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad /= self.world
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, recipe.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        for fuser in self.fusers:  # the gate temperature after each optimizer step
            fuser.advance()
        seconds = time.perf_counter() - start
        loss = sum(losses) / max(len(losses), 1)
        if self.world > 1:  # the reported loss is the mean over ranks
            t = torch.tensor([loss], dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            loss = float(t.item()) / self.world
        return {"step": self.step, "loss": loss, "lr": lr,
                "temperature": self.temperature, "grad_norm": float(grad_norm), "tokens": tokens,
                "tokens_per_s": tokens / max(seconds, 1e-9), "peak_memory": self.memory.peak()}

    # -- the run --

    def windows(self, conversations, epoch: int):
        """This rank's micro-batches of an epoch, grouped in optimizer-step windows."""
        recipe = self.recipe
        order = data_mod.epoch_order(len(conversations), recipe.seed, epoch)
        global_batches = data_mod.batches(order, recipe.batch_size * self.world)
        micro = []
        for batch in global_batches:
            mine = batch[self.rank::self.world]
            micro.append([(data_mod.example_seed(recipe.seed, epoch, i), conversations[i]) for i in mine])
        return [micro[i:i + recipe.grad_accum] for i in range(0, len(micro), recipe.grad_accum)]

    def fit(self, conversations, out_dir: str, *, resume: str | None = None, progress: bool = True) -> str:
        """Train on ``conversations``; write ``out_dir/checkpoint-<step>`` every ``save_every``
        steps and ``out_dir/final``. ``resume``: a checkpoint directory written by this class.
        Returns the final checkpoint's directory."""
        conversations = list(conversations)
        self.plan(len(conversations))
        if resume is not None:
            self.resume(resume)
        bar = _progress(self.total, self.step, progress and self.rank == 0)
        try:
            done = self.step
            for epoch in range(self.recipe.epochs):
                for window in self.windows(conversations, epoch):
                    if done > 0:  # already taken before the resume
                        done -= 1
                        continue
                    if self.step >= self.total:
                        break
                    stats = self.train_step(window)
                    bar(stats)
                    if self.log is not None and self.rank == 0:
                        self.log(stats)
                    if self.recipe.save_every and self.step % self.recipe.save_every == 0:
                        self.save(os.path.join(out_dir, f"checkpoint-{self.step}"))
        finally:
            bar(None)
        final = os.path.join(out_dir, "final")
        self.save(final)
        return final

    # -- checkpoints --

    def export(self) -> list[Checkpoint]:
        """The trained checkpoints (one per sharer): published format, the current gate
        temperature and the schedule in each projector's json."""
        out = []
        for fuser, ckpt in zip(self.fusers, self.checkpoints):
            weights = FuserWeights(*(_full(getattr(fuser, name)).detach().cpu().clone()
                                     for name in FuserWeights._fields))
            dtype = self.export_dtype or weights.w_in_sharer.dtype
            weights = weights.to(dtype=dtype) if weights.w_in_sharer.dtype != dtype else weights
            out.append(ckpt.with_weights(weights, gate_temperature=fuser.temperature, training_args=self.schedule))
        return out

    def save(self, directory: str) -> None:
        """The checkpoints (``directory`` itself for one sharer, ``directory/sharer_<j>`` for
        several) and ``training_state.pt`` (step, optimizer, scheduler) for :meth:`resume`."""
        exported = self.export()
        optimizer_state = self.optimizer.state_dict()
        if self.rank != 0:
            return
        for j, ckpt in enumerate(exported):
            save_checkpoint(ckpt, directory if len(exported) == 1 else os.path.join(directory, f"sharer_{j}"))
        torch.save({"step": self.step, "optimizer": optimizer_state, "scheduler": self.scheduler.state_dict(),
                    "schedule": self.schedule, "total": self.total}, os.path.join(directory, STATE_FILE))

    def resume(self, directory: str) -> None:
        """Continue from a checkpoint :meth:`save` wrote: weights, optimizer, scheduler, step."""
        path = os.path.join(directory, STATE_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"resume: {path} not found (resume from a checkpoint directory written by c2c-train)")
        state = torch.load(path, map_location="cpu", weights_only=False)
        for j, fuser in enumerate(self.fusers):
            sub = directory if len(self.fusers) == 1 else os.path.join(directory, f"sharer_{j}")
            weights = read_fuser_weights(sub)
            with torch.no_grad():
                for name, value in zip(FuserWeights._fields, weights):
                    param = getattr(fuser, name)
                    _load_into(param, value)
            fuser.step.fill_(state["step"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _load_into(param, value) -> None:
    if hasattr(param, "full_tensor"):  # an FSDP2 shard: copy this rank's slice
        from torch.distributed.tensor import distribute_tensor
        param.copy_(distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements))
    else:
        param.copy_(value.to(device=param.device, dtype=param.dtype))


def _progress(total: int, initial: int, enabled: bool):
    """A progress bar (tqdm when installed, else a line per step on stderr) showing loss,
    learning rate, temperature, tokens/s and peak memory."""
    if not enabled:
        return lambda stats: None
    try:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=initial, desc="c2c-train", file=sys.stderr)
    except ImportError:
        bar = None

    def update(stats):
        if stats is None:
            if bar is not None:
                bar.close()
            return
        memory = stats["peak_memory"]
        fields = {"loss": f"{stats['loss']:.4f}", "lr": f"{stats['lr']:.2e}", "temp": f"{stats['temperature']:.4g}",
                  "tok/s": f"{stats['tokens_per_s']:.0f}",
                  "peak": "n/a" if memory is None else f"{memory / 2**20:.0f}MiB"}
        if bar is not None:
            bar.set_postfix(fields, refresh=False)
            bar.update(1)
        else:
            print(f"step {stats['step']}/{total} " + " ".join(f"{k}={v}" for k, v in fields.items()),
                  file=sys.stderr)

    return update
