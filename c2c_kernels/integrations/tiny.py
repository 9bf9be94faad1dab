"""Tiny tokenizers and randomly initialised models, built locally (nothing is downloaded).

Used by the tests, the example's ``--demo`` and the benchmark's smoke run. The two tokenizer
kinds split text differently, as a Qwen (byte-level BPE, no BOS) and a Llama-style
(metaspace BPE with a BOS token) tokenizer do, so the alignment between them is not trivial,
and each has a chat template in its family's style (different markers, different lengths).
"""
from __future__ import annotations

import torch

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a fuser reads the sharer cache and writes the receiver cache in place",
    "caches are fused without copies, one layer after another",
    "large language models talk through their key value caches",
    "héllo wörld, naïve café! 1234 + 5678 = 6912",
]


# Chat templates in the style of each family: ChatML markers for the byte-level (Qwen-like)
# tokenizer, header/end-of-turn markers after a BOS for the metaspace (Llama-like) one.
CHAT_TEMPLATES = {
    "bytelevel": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "metaspace": ("<s>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                  "{{ m['content'] }}<|eot_id|>{% endfor %}"
                  "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
}
CHAT_MARKERS = {"bytelevel": ["<|im_start|>", "<|im_end|>"],
                "metaspace": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}


def tiny_tokenizer(kind: str = "bytelevel", vocab_size: int = 320, *, chat: bool = True):
    """A fast tokenizer trained on :data:`CORPUS`: ``"bytelevel"`` or ``"metaspace"`` (adds BOS).
    ``chat``: with its chat markers (added special tokens) and :data:`CHAT_TEMPLATES` template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bytelevel":
        specials = ["<pad>", "<eos>"]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    elif kind == "metaspace":
        specials = ["<unk>", "<s>", "</s>"]
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet = []
    else:
        raise ValueError(f"kind: expected 'bytelevel' or 'metaspace', got {kind!r}")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 2, trainer)
    if kind == "bytelevel":
        out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    else:
        bos = ("<s>", tok.token_to_id("<s>"))
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[bos])
        out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                      pad_token="</s>")
    if chat:
        out.add_special_tokens({"additional_special_tokens": CHAT_MARKERS[kind]})
        out.chat_template = CHAT_TEMPLATES[kind]
    return out


# Three small families with distinct KV geometries (heads x dim), like a receiver and its sharers.
TINY_FAMILIES = {
    "qwen3": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "llama": dict(hidden_size=48, intermediate_size=96, num_attention_heads=6, num_key_value_heads=3, head_dim=8),
    "qwen2": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=1),
}


def model_config(family: str, **overrides):
    """A ``transformers`` config of ``family`` (``qwen3``, ``llama``, ``qwen2``) with ``overrides``."""
    import transformers

    classes = {"qwen3": "Qwen3Config", "llama": "LlamaConfig", "qwen2": "Qwen2Config"}
    if family not in classes:
        raise ValueError(f"family: expected one of {sorted(classes)}, got {family!r}")
    return getattr(transformers, classes[family])(**overrides)


def random_model(config, *, dtype=torch.float32, device="cpu", seed: int = 0):
    """A causal LM with random weights from ``config``, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, **{dtype_keyword(): dtype})
    return model.eval()


def dtype_keyword() -> str:
    """``dtype`` since transformers 4.56, ``torch_dtype`` before (deprecated since)."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def tiny_model(family: str, tokenizer, num_layers: int, *, dtype=torch.float32, device="cpu", seed: int = 0):
    """A tiny random causal LM of ``family`` whose vocabulary is ``tokenizer``'s."""
    overrides = dict(TINY_FAMILIES[family], num_hidden_layers=num_layers, vocab_size=len(tokenizer),
                     max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                     eos_token_id=tokenizer.eos_token_id, bos_token_id=getattr(tokenizer, "bos_token_id", None),
                     tie_word_embeddings=False, initializer_range=0.1)
    return random_model(model_config(family, **overrides), dtype=dtype, device=device, seed=seed)
