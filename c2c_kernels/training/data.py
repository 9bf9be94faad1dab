"""Training data: conversations of chat messages, from a JSONL file or a Hugging Face
``datasets`` dataset, and the order they are visited in.

A conversation is a list of ``{"role", "content"}`` messages whose last one is the response
(role ``assistant``). A JSONL line holds ``{"messages": [...]}``; ShareGPT-style
``{"conversations": [{"from": "human"|"gpt", "value": ...}]}`` is read too (system turns
kept, roles renamed). Tokenization and labels are the Hugging Face client's
(:meth:`c2c_kernels.integrations.hf.C2CModel.tokenize_training`).
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import torch

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _message(m: Any, where: str) -> dict:
    if not isinstance(m, dict):
        raise ValueError(f"{where}: expected a {{'role', 'content'}} object, got {type(m).__name__}")
    if "role" in m and "content" in m:
        role, content = m["role"], m["content"]
    elif "from" in m and "value" in m:
        role, content = _ROLES.get(m["from"], m["from"]), m["value"]
    else:
        raise ValueError(f"{where}: expected keys 'role' and 'content' (or 'from' and 'value'), got {sorted(m)}")
    if not isinstance(role, str) or not isinstance(content, str):
        raise ValueError(f"{where}: role and content must be strings")
    return {"role": role, "content": content}


def conversation(record: Any, where: str) -> list[dict]:
    """The messages of one record (``messages`` or ``conversations``), checked."""
    if isinstance(record, dict):
        raw = record.get("messages", record.get("conversations"))
        if raw is None:
            raise ValueError(f"{where}: no 'messages' (or 'conversations') field; keys are {sorted(record)}")
    else:
        raw = record
    if not isinstance(raw, (list, tuple)) or len(raw) < 2:
        raise ValueError(f"{where}: expected a list of at least two messages (instruction, then response)")
    messages = [_message(m, f"{where}.messages[{i}]") for i, m in enumerate(raw)]
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last message is the response and must have role 'assistant', got "
                         f"{messages[-1]['role']!r}")
    return messages


def read_jsonl(path: str) -> list[list[dict]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
            out.append(conversation(record, f"{path}:{n}"))
    if not out:
        raise ValueError(f"{path}: holds no conversations")
    return out


def load_conversations(source, *, split: str = "train") -> list[list[dict]]:
    """Conversations from ``source``: a ``.jsonl`` / ``.json`` lines file, a directory saved by
    ``datasets`` (``save_to_disk``), a ``datasets`` name or local dataset script/directory, an
    in-memory dataset, or a list of records."""
    if isinstance(source, (list, tuple)):
        return [conversation(r, f"data[{i}]") for i, r in enumerate(source)]
    if isinstance(source, str) and os.path.isfile(source) and source.endswith((".jsonl", ".json")):
        return read_jsonl(source)
    if isinstance(source, str):
        try:
            import datasets
        except ImportError:
            raise ValueError(f"data: {source!r} is not a .jsonl file, and reading a Hugging Face dataset needs the "
                             f"'datasets' package (pip install datasets)") from None
        saved = any(os.path.exists(os.path.join(source, name)) for name in ("dataset_info.json", "dataset_dict.json"))
        source = datasets.load_from_disk(source) if os.path.isdir(source) and saved else datasets.load_dataset(source)
    if isinstance(source, dict):  # a DatasetDict: pick the split
        if split not in source:
            raise ValueError(f"data: the dataset has splits {sorted(source)}, not {split!r}")
        source = source[split]
    return [conversation(source[i], f"data[{i}]") for i in range(len(source))]


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """The example order of an epoch: a permutation drawn from ``(seed, epoch)`` alone, so a
    resumed run and every rank of a distributed run see the same order."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(count, generator=g).tolist()


def example_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one example's dropout masks and Gumbel noise: fixed by the run's seed, the
    epoch and the example's index, not by the batch it lands in, so N micro-batches draw what
    one batch of N draws, and a resumed or distributed run draws what one process draws."""
    return (seed * 1_000_003 + epoch) * 10_000_019 + index


def batches(order: Sequence[int], batch_size: int) -> list[list[int]]:
    return [list(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]
