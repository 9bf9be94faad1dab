"""Generate with a receiver model whose cache is fused with a sharer's (C2C), on transformers.

With a published fuser and its two models:

    python examples/hf_generate.py --receiver Qwen/Qwen3-0.6B --sharer Qwen/Qwen2.5-0.5B-Instruct \
        --fuser path/to/fuser_dir --prompt "Why is the sky blue?"

Prompts are sent as chat messages (each one a user turn, through each model's own chat
template, as the research pipeline does); ``--raw`` sends them as plain text.
``--include-response`` also fuses the final prompt token and every generated token.

Offline, with tiny random models, tokenizers and fusers built on the spot (the output is noise,
the pipeline is the real one):

    python examples/hf_generate.py --demo
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

import c2c_kernels as c2c
from c2c_kernels.integrations.hf import C2CModel, Sharer, random_checkpoint
from c2c_kernels.integrations.memory import peak_memory

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_models(args, device, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from c2c_kernels.integrations.tiny import dtype_keyword

    def load(name):
        model = AutoModelForCausalLM.from_pretrained(name, **{dtype_keyword(): dtype}).to(device).eval()
        return model, AutoTokenizer.from_pretrained(name)

    receiver, receiver_tok = load(args.receiver)
    sharer, sharer_tok = load(args.sharer)
    fuser = c2c.load_checkpoint(args.fuser, device=device, dtype=dtype)
    return receiver, receiver_tok, sharer, sharer_tok, fuser


def demo_models(device, dtype):
    from c2c_kernels.integrations.tiny import tiny_model, tiny_tokenizer

    receiver_tok, sharer_tok = tiny_tokenizer("bytelevel"), tiny_tokenizer("metaspace", 200)
    receiver = tiny_model("qwen3", receiver_tok, 2, dtype=dtype, device=device, seed=1)
    sharer = tiny_model("llama", sharer_tok, 3, dtype=dtype, device=device, seed=2)
    # Write the fuser in the published format and load it back, as a downloaded one would be.
    with tempfile.TemporaryDirectory() as directory:
        c2c.save_checkpoint(random_checkpoint(receiver, sharer, hidden_dim=64, intermediate_dim=64), directory)
        fuser = c2c.load_checkpoint(directory, device=device, dtype=dtype)
    return receiver, receiver_tok, sharer, sharer_tok, fuser


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--receiver", help="receiver model (hub name or directory)")
    parser.add_argument("--sharer", help="sharer model (hub name or directory)")
    parser.add_argument("--fuser", help="fuser checkpoint directory (projector_*.json/.pt, projector_config.json)")
    parser.add_argument("--demo", action="store_true", help="tiny random models, nothing downloaded")
    parser.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--backend", default="auto", help="fusion backend (auto, triton, cuda, cpu, reference)")
    parser.add_argument("--padding-side", choices=("left", "right"), default="left")
    parser.add_argument("--raw", action="store_true", help="send the prompts as plain text, not chat messages")
    parser.add_argument("--include-response", action="store_true",
                        help="fuse the final prompt token and every generated token too")
    parser.add_argument("--alignment", choices=("research", "offsets"), default="research",
                        help="token alignment between different tokenizers")
    parser.add_argument("--strategy", choices=("first", "longest"), default="first",
                        help="which sharer piece a receiver token reads (research alignment)")
    args = parser.parse_args(argv)
    if not args.demo and not (args.receiver and args.sharer and args.fuser):
        parser.error("pass --receiver, --sharer and --fuser, or --demo")
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    receiver, receiver_tok, sharer, sharer_tok, fuser = (demo_models(device, dtype) if args.demo
                                                         else load_models(args, device, dtype))
    texts_in = args.prompt or ["the quick brown fox reads the sharer cache", "fused caches"]
    prompts = texts_in if args.raw else [[{"role": "user", "content": t}] for t in texts_in]

    c2c_model = C2CModel(receiver, receiver_tok, [Sharer(sharer, fuser, sharer_tok)], backend=args.backend,
                         alignment=args.alignment, strategy=args.strategy, include_response=args.include_response)
    batch = c2c_model.tokenize(prompts, padding_side=args.padding_side)
    logits, peak = peak_memory(lambda: c2c_model.first_token_logits(batch), device)
    print(f"prefill + fusion + first token: peak {peak / 2**10:.0f} KiB above the models "
          f"({batch.input_ids.shape[1]} prompt columns, caches fused in place, never cloned)")
    for fuse in (True, False):
        start = time.perf_counter()
        texts = c2c_model.generate_text(prompts, padding_side=args.padding_side, fuse=fuse,
                                        max_new_tokens=args.max_new_tokens, do_sample=False)
        label = "C2C" if fuse else "receiver alone"
        print(f"--- {label} ({time.perf_counter() - start:.2f} s)")
        for prompt, text in zip(texts_in, texts):
            print(f"{prompt!r} -> {text!r}")


if __name__ == "__main__":
    main()
