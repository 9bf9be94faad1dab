"""Token alignment between a receiver's and a sharer's tokenization of the same prompt.

Two rules, one per way of building the sharer's input:

- **Research alignment** (the default of :class:`~c2c_kernels.integrations.hf.C2CModel`, the
  one published fusers were trained with): the sharer reads one token per receiver token.
  :class:`TokenMap` maps each receiver token by re-tokenizing its text with the sharer
  tokenizer; :func:`align_messages` lays chat messages out section by section (each model's
  own template, template sections padded to equal length, message tokens mapped).
- **Character coverage** (:func:`align_offsets`): each model tokenizes the text itself, and each
  receiver token reads the sharer token that covers its first character.

Character coverage, in detail. Offsets are the ``(start, end)`` character spans a fast tokenizer
returns with ``return_offsets_mapping=True``. Two cases need a rule of their own:

- no sharer token covers the character (the sharer's pre-tokenizer dropped it, e.g. a space):
  the receiver token reads the next sharer token;
- the receiver token is zero-width (a special token such as BOS, span ``(c, c)``): it reads the
  first sharer token that ends at or after ``c``: at the start of the text the sharer's own
  BOS when it has one (else its first token), elsewhere the sharer token that ends at ``c``.

A receiver token past the end of the sharer's text reads the sharer's last token. Padding
(mask 0) may sit on either side of either batch; padded receiver tokens get column 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


def _check(name: str, offsets: torch.Tensor, mask: torch.Tensor) -> None:
    if offsets.dim() != 3 or offsets.shape[-1] != 2:
        raise ValueError(f"{name}_offsets: expected [batch, tokens, 2] character spans, got {list(offsets.shape)}")
    if tuple(mask.shape) != tuple(offsets.shape[:2]):
        raise ValueError(f"{name}_mask: shape {list(mask.shape)} does not match {name}_offsets "
                         f"{list(offsets.shape[:2])}")


def align_offsets(receiver_offsets: torch.Tensor, receiver_mask: torch.Tensor,
                  sharer_offsets: torch.Tensor, sharer_mask: torch.Tensor) -> torch.Tensor:
    """The sharer column each receiver token reads: ``[B, Nr]`` int64.

    ``*_offsets`` are ``[B, N, 2]`` spans, ``*_mask`` ``[B, N]`` attention masks (1 = token).
    One ``searchsorted`` over the batch; no host sync.
    """
    _check("receiver", receiver_offsets, receiver_mask)
    _check("sharer", sharer_offsets, sharer_mask)
    if receiver_offsets.shape[0] != sharer_offsets.shape[0]:
        raise ValueError(f"sharer_offsets: batch {sharer_offsets.shape[0]}, expected the receiver's "
                         f"{receiver_offsets.shape[0]} (one sharer tokenization per prompt)")
    if sharer_offsets.shape[1] == 0:
        raise ValueError("sharer_offsets: the sharer tokenization holds no tokens")
    r_mask, s_mask = receiver_mask.bool(), sharer_mask.bool()
    start = receiver_offsets[..., 0].long()
    zero_width = receiver_offsets[..., 1].long() <= start
    # Running maximum of the sharer's span ends: sorted, with left padding (-1) never chosen
    # and right padding repeating the last end; "first end > c" is then a searchsorted.
    ends = torch.where(s_mask, sharer_offsets[..., 1].long(), -1).cummax(dim=-1).values
    after = torch.searchsorted(ends, start.contiguous(), right=True)  # first end > start
    at = torch.searchsorted(ends, start.contiguous(), right=False)  # first end >= start
    column = torch.where(zero_width, at, after)
    positions = torch.arange(s_mask.shape[1], device=s_mask.device)
    last_real = torch.where(s_mask, positions, 0).amax(dim=-1, keepdim=True)
    column = torch.minimum(column, last_real)
    return torch.where(r_mask, column, 0)


def identity_alignment(mask: torch.Tensor) -> torch.Tensor:
    """Same tokenizer on both sides: receiver column ``n`` reads sharer column ``n``."""
    b, n = mask.shape
    return torch.arange(n, device=mask.device).expand(b, n)


# ---- one sharer token per receiver token (the rule published fusers were trained with) --------

STRATEGIES = ("first", "longest")


def pad_id(tokenizer) -> int:
    """The id a tokenizer pads with: its pad token, else its EOS token."""
    pad = tokenizer.pad_token_id
    pad = tokenizer.eos_token_id if pad is None else pad
    if pad is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__}: needs a pad or an EOS token to pad sections")
    return pad


def token_text(tokenizer, token_id: int) -> str:
    """A token's text as the tokenizer decodes it alone (special tokens kept, spaces untouched)."""
    return tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)


class TokenMap:
    """Maps each receiver token to one sharer token.

    A receiver token's text is re-tokenized by the sharer tokenizer (no special tokens added);
    one piece: that token; several: the first (``strategy="first"``) or the one whose text is
    longest, the earliest on ties (``"longest"``); none: the sharer's unknown token (id 0 if it
    has none). A special receiver token maps to the sharer token of the same role (pad, EOS,
    BOS, unknown; when one id plays several roles the later role in that order wins), else to
    the sharer token spelled the same, else to the unknown token as above. A tokenizer without a
    pad token pads with its EOS token.
    """

    def __init__(self, receiver_tokenizer, sharer_tokenizer, strategy: str = "first"):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
        self.receiver, self.sharer, self.strategy = receiver_tokenizer, sharer_tokenizer, strategy
        self._special = set(receiver_tokenizer.all_special_ids)
        roles = {}
        for role in ("pad", "eos", "bos", "unk"):
            receiver_id = _role_id(receiver_tokenizer, role)
            if receiver_id is not None:
                roles[receiver_id] = _role_id(sharer_tokenizer, role)
        self._roles = roles
        self._memo: dict[int, int] = {}

    def _unknown(self) -> int:
        return self.sharer.unk_token_id or 0

    def _special_token(self, token_id: int, text: str) -> int:
        if self._roles.get(token_id) is not None:
            return self._roles[token_id]
        by_text = self.sharer.convert_tokens_to_ids(text)
        if by_text is not None and by_text != self.sharer.unk_token_id:
            return by_text
        return self._unknown()

    def _pick(self, pieces: list[int]) -> int:
        if not pieces:
            return self._unknown()
        if len(pieces) == 1 or self.strategy == "first":
            return pieces[0]
        best, best_len = pieces[0], 0
        for piece in pieces:
            length = len(token_text(self.sharer, piece))
            if length > best_len:
                best, best_len = piece, length
        return best

    def one(self, token_id: int) -> int:
        """The sharer token of one receiver token."""
        token_id = int(token_id)
        if token_id not in self._memo:
            text = token_text(self.receiver, token_id)
            if token_id in self._special:
                self._memo[token_id] = self._special_token(token_id, text)
            else:
                self._memo[token_id] = self._pick(self.sharer.encode(text, add_special_tokens=False))
        return self._memo[token_id]

    def __call__(self, token_ids) -> list[int]:
        """The sharer token of each receiver token (one each, same order)."""
        return [self.one(t) for t in (token_ids.tolist() if isinstance(token_ids, torch.Tensor) else token_ids)]

    def table(self, size: int, device=None) -> torch.Tensor:
        """``[size]`` int64: the sharer token of every receiver id below ``size`` (ids the
        tokenizer does not know decode to nothing: the unknown token). Built once, so decoded
        tokens are mapped on the device without a host round trip."""
        known = min(size, len(self.receiver))
        texts = self.receiver.batch_decode([[i] for i in range(known)], skip_special_tokens=False,
                                           clean_up_tokenization_spaces=False)
        pieces = self.sharer(texts, add_special_tokens=False)["input_ids"] if texts else []
        out = []
        for token_id, (text, ids) in enumerate(zip(texts, pieces)):
            mapped = self._special_token(token_id, text) if token_id in self._special else self._pick(ids)
            self._memo.setdefault(token_id, mapped)
            out.append(mapped)
        out += [self._unknown()] * (size - known)
        return torch.tensor(out, dtype=torch.long, device=device)


def _role_id(tokenizer, role: str):
    if role == "pad" and tokenizer.pad_token_id is None:
        return tokenizer.eos_token_id
    return getattr(tokenizer, f"{role}_token_id")


# ---- chat messages, aligned section by section ----------------------------------------------


def content_spans(text: str, contents: Sequence[str]) -> list[tuple[int, int]]:
    """Character spans of the message contents in a templated ``text``, searched in order.

    A match counts when a special token (``<``) or the end of the text follows it; without
    such a match the first occurrence after the previous message (else anywhere) is taken,
    unless it sits inside a ``begin_of_text`` marker. Empty contents have no span.
    """
    spans, start = [], 0
    for content in contents:
        if not isinstance(content, str) or not content:
            continue
        span = None
        at = text.find(content, start)
        while at >= 0:
            end = at + len(content)
            if end == len(text) or text[end] == "<":
                span = (at, end)
                break
            at = text.find(content, at + 1)
        if span is None:
            at = text.find(content, start)
            at = text.find(content) if at < 0 else at
            if at < 0:
                continue
            before = text[max(0, at - 10):at]
            if "<" in before and ">" not in before and "begin_of_text" in text[max(0, at - 20):at + 20]:
                continue
            span = (at, at + len(content))
        spans.append(span)
        start = span[1]
    return spans


def token_ranges(offsets: Sequence[tuple[int, int]], spans) -> list[tuple[int, int]]:
    """Token ranges of character spans: from the first token ending after the span's start to
    the first token (from there) starting at or after its end."""
    ranges, n = [], len(offsets)
    for s, e in spans:
        a = 0
        while a < n and offsets[a][1] <= s:
            a += 1
        b = a
        while b < n and offsets[b][0] < e:
            b += 1
        ranges.append((a, b))
    return ranges


def _sections(total: int, ranges) -> list[tuple[bool, int, int]]:
    """Alternating (is_message, start, end) sections; empty template sections are dropped."""
    out, prev = [], 0
    for s, e in ranges:
        if prev < s:
            out.append((False, prev, s))
        out.append((True, s, e))
        prev = e
    if prev < total:
        out.append((False, prev, total))
    return out


def apply_template(tokenizer, messages, *, add_generation_prompt: bool = True, enable_thinking: bool = False):
    """``(text, ids, offsets)`` of a tokenizer's own chat template over ``messages`` (no special
    tokens added beyond the template's)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__}: has no chat template; set "
                         f"tokenizer.chat_template or pass raw text")
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt,
                                         enable_thinking=enable_thinking)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return text, list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


@dataclass
class AlignedPrompt:
    """One prompt laid out for the receiver and every sharer, column by column.

    ``input_ids`` and each ``sharer_input_ids[j]`` have the same length: column ``n`` of a
    sharer is the token whose cache row the fuser reads for receiver column ``n``. ``pads`` /
    ``sharer_pads`` mark tokens inserted to equalise section lengths (masked out of attention,
    counted by positions). ``sections`` are ``(start, end, sharers)`` in order, covering every
    column: ``sharers`` is a bitmask (bit ``j``: sharer ``j``) or -1 for no fusion; the last
    section is never fused at prefill. ``labels`` (training prompts only) holds the token each
    column is trained to predict there, -100 where there is no loss (:func:`training_prompt`).
    """

    input_ids: list[int]
    sharer_input_ids: list[list[int]]
    pads: list[bool]
    sharer_pads: list[list[bool]]
    sections: list[tuple[int, int, int]]
    labels: list[int] | None = None


def all_sharers(count: int) -> int:
    """The bitmask that selects ``count`` sharers."""
    return (1 << count) - 1


def sections_from_mask(fused: Sequence[bool], sharers: int) -> list[tuple[int, int, int]]:
    """Sections split where ``fused`` changes: fused runs select ``sharers``, the others -1."""
    out, start = [], 0
    for n in range(1, len(fused) + 1):
        if n == len(fused) or fused[n] != fused[start]:
            out.append((start, n, sharers if fused[start] else -1))
            start = n
    return out


def final_section_from(sections: Sequence[tuple[int, int, int]], start: int, total: int) -> list[tuple[int, int, int]]:
    """``sections`` cut at column ``start``: what lies before keeps its selection, and
    ``[start, total)`` becomes the final, unfused section (the research pipeline's
    ``kv_cache_index``: every column from the last instruction token on is selection -1)."""
    if not 0 <= start < total:
        raise ValueError(f"start: column {start} is outside the prompt's {total} columns")
    out = [(a, min(e, start), m) for a, e, m in sections if a < start]
    return out + [(start, total, -1)]


def whole_prompt(input_ids: list[int], sharer_input_ids: list[list[int]], sharers: int, *,
                 final_start: int | None = None) -> AlignedPrompt:
    """The tokens before ``final_start`` (default: every token but the last) fused, the rest in
    the final section (a single-tokenizer prompt, or a raw text mapped token by token)."""
    n = len(input_ids)
    if n == 0:
        raise ValueError("input_ids: a prompt needs at least one token")
    start = n - 1 if final_start is None else final_start
    sections = final_section_from([(0, n, sharers)], start, n)
    return AlignedPrompt(list(input_ids), [list(s) for s in sharer_input_ids], [False] * n,
                         [[False] * n for _ in sharer_input_ids], sections)


IGNORE_INDEX = -100  # a label without loss (the value the research recipe and transformers use)


def training_prompt(receiver_tokenizer, sharer_tokenizers: Sequence, messages, *, strategy: str = "first",
                    enable_thinking: bool = False, maps: Sequence[TokenMap | None] | None = None,
                    max_length: int | None = None) -> AlignedPrompt:
    """A conversation laid out for training: the research recipe's instruction / response split.

    The last message is the response (role ``assistant``); everything before it is the
    instruction. The final section starts at the instruction's last token, so the fused
    columns are the instruction tokens except the last; labels are the response tokens (every
    token from the response on; section padding has no label), -100 elsewhere.

    One tokenizer (every sharer reads the receiver's tokens): the receiver's chat template over
    the whole conversation, tokenized as text without added special tokens; the instruction is
    the template over all but the last message with the generation prompt. Several tokenizers:
    the conversation laid out by :func:`align_messages` (no generation prompt); only message
    sections are fused, and the response starts at the last message section. ``max_length``
    keeps the first columns only (labels too), as the research dataset truncates.
    """
    messages = list(messages)
    if len(messages) < 2 or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError("messages: expected a conversation of at least two {'role', 'content'} messages "
                         "(the instruction, then the response)")
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"messages: the last message is the response and must have role 'assistant', got "
                         f"{messages[-1]['role']!r}")
    if maps is None:
        maps = [None if t is None or t is receiver_tokenizer else TokenMap(receiver_tokenizer, t, strategy)
                for t in sharer_tokenizers]
    kw = dict(enable_thinking=enable_thinking)
    sharers = all_sharers(len(maps))
    if all(m is None for m in maps):
        _, ids, _ = apply_template(receiver_tokenizer, messages, add_generation_prompt=False, **kw)
        _, instruction, _ = apply_template(receiver_tokenizer, messages[:-1], add_generation_prompt=True, **kw)
        response = len(instruction)
        prompt = whole_prompt(ids, [ids] * len(maps), sharers, final_start=max(response - 1, 0))
    else:
        prompt = align_messages(receiver_tokenizer, sharer_tokenizers, messages, strategy=strategy,
                                add_generation_prompt=False, enable_thinking=enable_thinking, maps=maps)
        starts = [a for a, _, m in prompt.sections if m > 0]
        if not starts:
            raise ValueError("messages: the chat template holds no message sections to align")
        response = starts[-1]
        prompt.sections = final_section_from(prompt.sections, max(response - 1, 0), len(prompt.input_ids))
    if response >= len(prompt.input_ids):
        raise ValueError("messages: the response tokenizes to no tokens after the instruction")
    prompt.labels = [IGNORE_INDEX if c < response or pad else t
                     for c, (t, pad) in enumerate(zip(prompt.input_ids, prompt.pads))]
    if max_length is not None and len(prompt.input_ids) > max_length:
        prompt = truncate(prompt, max_length)
    return prompt


def truncate(prompt: AlignedPrompt, length: int) -> AlignedPrompt:
    """The first ``length`` columns of a prompt (sections clipped; the final section may start
    earlier than its own start when the cut falls before it)."""
    if not (isinstance(length, int) and length >= 1):
        raise ValueError(f"length: expected an integer >= 1, got {length!r}")
    sections = [(a, min(e, length), m) for a, e, m in prompt.sections if a < length]
    if sections[-1][2] > 0:  # the cut fell in a fused section: its last column becomes the final one
        a, e, m = sections.pop()
        sections += ([(a, e - 1, m)] if e - 1 > a else []) + [(e - 1, e, -1)]
    return AlignedPrompt(prompt.input_ids[:length], [ids[:length] for ids in prompt.sharer_input_ids],
                         prompt.pads[:length], [p[:length] for p in prompt.sharer_pads], sections,
                         None if prompt.labels is None else prompt.labels[:length])


def align_messages(receiver_tokenizer, sharer_tokenizers: Sequence, messages, *, strategy: str = "first",
                   add_generation_prompt: bool = True, enable_thinking: bool = False,
                   maps: Sequence[TokenMap | None] | None = None) -> AlignedPrompt:
    """Chat ``messages`` laid out for the receiver and the sharers, section by section.

    Every model applies its own chat template. Template sections keep each model's own tokens
    and are padded at their end to the longest of them; message sections hold the receiver's
    tokens and, for each sharer, one mapped token per receiver token (:class:`TokenMap`; a
    sharer whose tokenizer is None or the receiver's reads the receiver's tokens). Message
    sections are fused with every sharer, template sections are not.
    """
    if maps is None:
        maps = [None if t is None or t is receiver_tokenizer else TokenMap(receiver_tokenizer, t, strategy)
                for t in sharer_tokenizers]
    kw = dict(add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking)
    contents = [m.get("content") for m in messages]
    r_text, r_ids, r_offsets = apply_template(receiver_tokenizer, messages, **kw)
    r_sections = _sections(len(r_ids), token_ranges(r_offsets, content_spans(r_text, contents)))
    own = []  # per sharer: (ids, sections) of its own template, None when it reads the receiver's tokens
    for j, (tok, token_map) in enumerate(zip(sharer_tokenizers, maps)):
        if token_map is None:
            own.append(None)
            continue
        text, ids, offsets = apply_template(tok, messages, **kw)
        sections = _sections(len(ids), token_ranges(offsets, content_spans(text, contents)))
        if [m for m, _, _ in sections] != [m for m, _, _ in r_sections]:
            raise ValueError(f"messages: the chat templates of the receiver and of sharer {j} split them into "
                             f"different sections ({len(r_sections)} vs {len(sections)}); they cannot be aligned")
        own.append((ids, sections))
    ids, pads, fused = [], [], []
    s_ids = [[] for _ in maps]
    s_pads = [[] for _ in maps]
    for k, (is_message, a, b) in enumerate(r_sections):
        piece = r_ids[a:b]
        if is_message:
            length = len(piece)
            for j, token_map in enumerate(maps):
                s_ids[j] += piece if token_map is None else token_map(piece)
                s_pads[j] += [False] * length
        else:
            lengths = [len(piece)] + [len(piece) if o is None else o[1][k][2] - o[1][k][1] for o in own]
            length = max(lengths)
            for j, o in enumerate(own):
                own_piece = piece if o is None else o[0][o[1][k][1]:o[1][k][2]]
                tok = receiver_tokenizer if o is None else sharer_tokenizers[j]
                s_ids[j] += own_piece + [pad_id(tok)] * (length - len(own_piece))
                s_pads[j] += [False] * len(own_piece) + [True] * (length - len(own_piece))
        ids += piece + [pad_id(receiver_tokenizer)] * (length - len(piece))
        pads += [False] * len(piece) + [True] * (length - len(piece))
        fused += [is_message] * length
    if not ids:
        raise ValueError("messages: the chat template produced no tokens")
    return AlignedPrompt(ids, s_ids, pads, s_pads, sections_from_mask(fused, all_sharers(len(maps))))
