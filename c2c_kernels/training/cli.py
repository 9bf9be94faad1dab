"""``c2c-train``: train C2C fusers with the research recipe.

    c2c-train --receiver Qwen/Qwen3-0.6B --sharer Qwen/Qwen2.5-0.5B-Instruct --data train.jsonl --out runs/a
    torchrun --nproc-per-node 8 -m c2c_kernels.training --receiver ... (same flags)

``--fuser DIR`` starts from a published checkpoint (default: fresh fusers, research init);
``--resume DIR`` continues a run from one of its checkpoints. Every recipe hyperparameter is a
flag (see ``--help`` and ``docs/training.md``).
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from .recipe import LOSS_NORMALIZATIONS, MODES, Recipe

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="c2c-train", description="Train C2C fusers (the research recipe).")
    p.add_argument("--receiver", required=True, help="receiver model (Hugging Face name or path)")
    p.add_argument("--sharer", required=True, action="append",
                   help="sharer model (repeat for several sharers, fused in --mode)")
    p.add_argument("--data", required=True, help="JSONL of {'messages': [...]} or a Hugging Face dataset path")
    p.add_argument("--out", required=True, help="output directory (checkpoint-<step>/, final/)")
    p.add_argument("--fuser", action="append", default=None,
                   help="published fuser checkpoint to start from, one per sharer (default: research init)")
    p.add_argument("--resume", default=None, help="checkpoint directory of an earlier run to continue from")
    p.add_argument("--split", default="train", help="dataset split (Hugging Face datasets)")
    d = Recipe()
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="conversations per micro-batch per rank")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--max-length", type=int, default=d.max_length)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--anneal-steps", type=int, default=None, help="default: the checkpoint's json, else 1929")
    p.add_argument("--initial-temperature", type=float, default=None)
    p.add_argument("--final-temperature", type=float, default=None)
    p.add_argument("--dropout", type=float, default=None)
    p.add_argument("--mode", choices=MODES, default=d.mode, help="several sharers: parallel or sequential")
    p.add_argument("--loss-normalization", choices=LOSS_NORMALIZATIONS, default=d.loss_normalization)
    p.add_argument("--research-dtypes", action="store_true",
                   help="bf16 parameters, gate logits, noise and temperature, as the research runs")
    p.add_argument("--param-dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--model-dtype", choices=sorted(DTYPES), default="bfloat16",
                   help="dtype of the (frozen) receiver and sharers")
    p.add_argument("--export-dtype", choices=sorted(DTYPES), default=None,
                   help="dtype of the written checkpoints (default: the parameters')")
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--hidden-dim", type=int, default=1024, help="fresh fusers: hidden width")
    p.add_argument("--intermediate-dim", type=int, default=1024, help="fresh fusers: FFN width")
    p.add_argument("--num-layers", type=int, default=3, help="fresh fusers: num_layers of the research class")
    p.add_argument("--device", default=None, help="default: cuda (the local rank's) when available, else cpu")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the fusers with FSDP2")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--log", default=None, help="append each step's statistics as JSON lines to this file")
    return p


def recipe_from(args) -> Recipe:
    return Recipe(lr=args.lr, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
                  max_grad_norm=args.max_grad_norm, grad_accum=args.grad_accum, batch_size=args.batch_size,
                  epochs=args.epochs, max_steps=args.max_steps, max_length=args.max_length, seed=args.seed,
                  anneal_steps=args.anneal_steps, initial_temperature=args.initial_temperature,
                  final_temperature=args.final_temperature, dropout=args.dropout, mode=args.mode,
                  loss_normalization=args.loss_normalization, research_dtypes=args.research_dtypes,
                  param_dtype=DTYPES[args.param_dtype], save_every=args.save_every)


def _device(args) -> torch.device:
    if args.device is not None:
        return torch.device(args.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _init_distributed(device: torch.device) -> None:
    import torch.distributed as dist

    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def load_model(name: str, dtype, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..integrations.tiny import dtype_keyword

    model = AutoModelForCausalLM.from_pretrained(name, **{dtype_keyword(): dtype}).to(device).eval()
    return model, AutoTokenizer.from_pretrained(name)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    recipe = recipe_from(args)
    if args.fuser is not None and len(args.fuser) != len(args.sharer):
        raise SystemExit(f"c2c-train: --fuser given {len(args.fuser)} times, expected once per --sharer "
                         f"({len(args.sharer)})")
    from ..checkpoint import load_checkpoint
    from .data import load_conversations
    from .loop import C2CTrainer, fresh_checkpoint

    device = _device(args)
    _init_distributed(device)
    conversations = load_conversations(args.data, split=args.split)
    model_dtype = DTYPES[args.model_dtype]
    receiver, tokenizer = load_model(args.receiver, model_dtype, device)
    sharers, checkpoints = [], []
    for j, name in enumerate(args.sharer):
        model, tok = load_model(name, model_dtype, device)
        same = tok.get_vocab() == tokenizer.get_vocab()
        sharers.append((model, None if same else tok))
        if args.fuser is not None:
            checkpoints.append(load_checkpoint(args.fuser[j], dtype=DTYPES[args.param_dtype]))
        else:
            checkpoints.append(fresh_checkpoint(receiver, model, hidden_dim=args.hidden_dim,
                                                intermediate_dim=args.intermediate_dim, num_layers=args.num_layers,
                                                seed=args.seed + j))
    log = None
    if args.log is not None:
        def log(stats, path=args.log):
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(stats) + "\n")
    trainer = C2CTrainer(receiver, tokenizer, sharers, checkpoints, recipe, fsdp=args.fsdp,
                         export_dtype=DTYPES[args.export_dtype] if args.export_dtype else None, log=log)
    final = trainer.fit(conversations, args.out, resume=args.resume, progress=not args.no_progress)
    if trainer.rank == 0:
        print(f"c2c-train: wrote {final}")
    return 0
