"""The Hugging Face client against the research C2C pipeline's semantics.

Expected values are derived here, by hand or by an independent step-by-step pipeline (one
prompt at a time, plain ``DynamicCache``, fusion with ``c2c.fuse`` per layer on the reference
backend), from the rules the research code follows:

- token alignment: each receiver token re-tokenized by the sharer, one piece kept ("first" or
  "longest"), special tokens by role, then by spelling, else the unknown token;
- chat messages: each model's own template, template sections padded at their end to equal
  length, message sections mapped token by token, only message tokens fused, positions counting
  the section padding;
- sections (``kv_cache_index``): prefilled one after another, each fused before the next is
  prefilled, the last never fused at prefill; a bitmask picks the sharers of a section;
- ``include_response``: the final section and every decoded token are computed on the clean
  receiver cache, fused with the first sharer's rows of the same tokens, and the receiver's
  forward attends to and stores the fused rows (every layer's new rows come from the clean
  computation).
"""
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import c2c_kernels as c2c  # noqa: E402
from c2c_kernels import layouts  # noqa: E402
from c2c_kernels.integrations import alignment, hf  # noqa: E402
from c2c_kernels.integrations.tiny import tiny_model, tiny_tokenizer  # noqa: E402
from c2c_kernels.testing import TOLERANCES  # noqa: E402

TOL = 5 * TOLERANCES[torch.float32]  # fused rows within the fp32 tolerance; attention moves logits about as much


# ---- toy tokenizers whose alignment can be checked by hand -----------------------------------

def toy_receiver():
    """Whole words; ChatML-like template ``<r>{content}</r>`` + ``<a>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "hello": 3, "ab": 4, "zzz": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    out.add_special_tokens({"additional_special_tokens": ["<r>", "</r>", "<a>", "<mark>"]})  # ids 6, 7, 8, 9
    out.add_tokens(["  "])  # id 10: two spaces, which the sharer tokenizes to nothing
    out.chat_template = ("{% for m in messages %}<r>{{ m['content'] }}</r>{% endfor %}"
                         "{% if add_generation_prompt %}<a>{% endif %}")
    return out


def toy_sharer(with_pad=True):
    """Unigram pieces: "hello" -> "he" + "llo", "ab" -> "a" + "b"; template
    ``<s><u>{content}</u>`` + ``<x><a>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "</s>", "<s>", "<u>", "</u>", "<x>", "<a>", "<mark>", "h", "e", "l", "o", "a", "b", "z",
              "he", "llo"]
    scores = [(p, -1.0 if len(p) > 1 and not p.startswith("<") else -5.0) for p in pieces]
    tok = Tokenizer(models.Unigram(scores, unk_id=0))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kw = dict(pad_token="<s>") if with_pad else {}
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", bos_token="<s>", **kw)
    out.add_special_tokens({"additional_special_tokens": ["<u>", "</u>", "<x>", "<a>", "<mark>"]})
    out.chat_template = ("<s><u>{% for m in messages %}{{ m['content'] }}</u>{% endfor %}"
                         "{% if add_generation_prompt %}<x><a>{% endif %}")
    return out


S = {p: i for i, p in enumerate(["<unk>", "</s>", "<s>", "<u>", "</u>", "<x>", "<a>", "<mark>", "h", "e", "l", "o",
                                 "a", "b", "z", "he", "llo"])}  # the sharer's ids


def test_token_map_both_strategies_and_special_tokens():
    r, s = toy_receiver(), toy_sharer()
    #        hello ab zzz <eos> <pad> <unk> <mark> <r> "  "
    ids = [3, 4, 5, 1, 0, 2, 9, 6, 10]
    # hello -> [he, llo]: first "he", longest "llo"; ab -> [a, b]: a tie, the first; zzz -> [z, z, z];
    # <eos>/<pad>/<unk> by role (the sharer pads with <s>); <mark> by spelling; <r> unknown to the
    # sharer -> its unknown token; "  " re-tokenizes to nothing -> the unknown token.
    tail = [S["</s>"], S["<s>"], S["<unk>"], S["<mark>"], S["<unk>"], S["<unk>"]]
    assert alignment.TokenMap(r, s, "first")(ids) == [S["he"], S["a"], S["z"]] + tail
    assert alignment.TokenMap(r, s, "longest")(ids) == [S["llo"], S["a"], S["z"]] + tail
    # A sharer without a pad token pads with its EOS token, so the receiver's pad maps there.
    assert alignment.TokenMap(r, toy_sharer(with_pad=False))([0]) == [S["</s>"]]
    # The device table agrees with the per-token map, and ids the tokenizer lacks are unknown.
    table = alignment.TokenMap(r, s, "longest").table(13)
    assert table.tolist()[:11] == alignment.TokenMap(r, s, "longest")(list(range(11)))
    assert table.tolist()[11:] == [S["<unk>"]] * 2
    with pytest.raises(ValueError, match="strategy"):
        alignment.TokenMap(r, s, "middle")


def test_content_spans_and_token_ranges():
    # A match must be followed by a special token ("<") or the end of the text...
    assert alignment.content_spans("<r>ab\n</r>ab<x>", ["ab"]) == [(10, 12)]
    # ...else the first occurrence after the previous message is taken.
    assert alignment.content_spans("x ab y ab z", ["ab", "ab"]) == [(2, 4), (7, 9)]
    assert alignment.content_spans("<r>hello ab</r><a>", ["", "hello ab"]) == [(3, 11)]
    offsets = [(0, 3), (3, 8), (9, 11), (11, 15), (15, 18)]
    assert alignment.token_ranges(offsets, [(3, 11)]) == [(1, 3)]
    assert alignment.token_ranges(offsets, [(4, 10)]) == [(1, 3)]  # partial tokens belong to the message


@pytest.mark.parametrize("strategy", ["first", "longest"])
def test_messages_aligned_section_by_section(strategy):
    r, s = toy_receiver(), toy_sharer()
    messages = [{"role": "user", "content": "hello ab <mark>"}]
    got = alignment.align_messages(r, [s], messages, strategy=strategy)
    # receiver: <r> | hello ab <mark> | </r> <a>          (templates of 1 and 2 tokens)
    # sharer:   <s> <u> | (mapped) | </u> <x> <a>          (templates of 2 and 3 tokens)
    hello = S["he"] if strategy == "first" else S["llo"]
    assert got.input_ids == [6, 0, 3, 4, 9, 7, 8, 0]
    assert got.pads == [False, True, False, False, False, False, False, True]
    assert got.sharer_input_ids == [[S["<s>"], S["<u>"], hello, S["a"], S["<mark>"], S["</u>"], S["<x>"], S["<a>"]]]
    assert got.sharer_pads == [[False] * 8]
    assert got.sections == [(0, 2, -1), (2, 5, 1), (5, 8, -1)]  # only the message is fused
    bare = toy_sharer(with_pad=False)
    alignment.align_messages(r, [bare], messages, strategy=strategy)
    assert bare.pad_token is None  # the tokenizers are read, never changed
    r.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        alignment.align_messages(r, [s], messages)


def tiny_pair(sharers=1, same_tokenizer=False, layer_map=None, seed=0):
    receiver_tok = tiny_tokenizer("bytelevel", 320)
    sharer_tok = receiver_tok if same_tokenizer else tiny_tokenizer("metaspace", 200)
    receiver = tiny_model("qwen3", receiver_tok, 2, seed=1 + seed)
    entries = []
    for j in range(sharers):
        family = ("llama", "qwen2")[j]
        tok = sharer_tok if j == 0 else receiver_tok
        model = tiny_model(family, tok, 3, seed=2 + j + seed)
        ckpt = hf.random_checkpoint(receiver, model, layer_map=layer_map, hidden_dim=32, intermediate_dim=48,
                                    seed=4 + j + seed)
        entries.append(hf.Sharer(model, ckpt, None if tok is receiver_tok else tok))
    return receiver, receiver_tok, entries


def test_model_lays_out_messages_and_counts_section_padding():
    receiver, receiver_tok, entries = tiny_pair()
    model = hf.C2CModel(receiver, receiver_tok, entries, backend="reference")
    messages = [{"role": "user", "content": "the lazy fox"}]
    want = alignment.align_messages(receiver_tok, [entries[0].tokenizer], messages)
    batch = model.tokenize(messages)
    n = len(want.input_ids)
    assert batch.input_ids[0].tolist() == want.input_ids
    assert batch.sharer_input_ids[0][0].tolist() == want.sharer_input_ids[0]
    assert batch.attention_mask[0].tolist() == [int(not p) for p in want.pads]
    assert batch.position_ids[0].tolist() == list(range(n))  # pads counted, as the research inputs do
    assert batch.sections == [want.sections]
    # A raw text with two tokenizers: every receiver token mapped, all but the last fused.
    text = model.tokenize("the lazy fox")
    ids = receiver_tok("the lazy fox")["input_ids"]
    assert text.input_ids[0].tolist() == ids
    assert text.sharer_input_ids[0][0].tolist() == model.token_map(0)(ids)
    assert text.sections == [[(0, len(ids) - 1, 1), (len(ids) - 1, len(ids), -1)]]
    # One tokenizer: the receiver's template tokenized as text, every token but the last fused.
    same_receiver, tok, same = tiny_pair(same_tokenizer=True)
    single = hf.C2CModel(same_receiver, tok, same).tokenize(messages)
    ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))["input_ids"]
    assert single.input_ids[0].tolist() == ids and single.sections == [[(0, len(ids) - 1, 1),
                                                                         (len(ids) - 1, len(ids), -1)]]
    with pytest.raises(ValueError, match="prompts: mixes"):
        model.tokenize(["text", messages])


# ---- the independent step-by-step pipeline ---------------------------------------------------

class ReplacingCache:
    """Made on first use: a DynamicCache that stores ``rows`` instead of the computed new rows."""

    cls = None

    @classmethod
    def make(cls):
        if cls.cls is None:
            from transformers import DynamicCache

            class Replacing(DynamicCache):
                rows = None

                def update(self, k, v, layer, *args, **kwargs):
                    if self.rows is not None:
                        k, v = self.rows[layer]
                    return super().update(k, v, layer, *args, **kwargs)

            cls.cls = Replacing
        return cls.cls()


def forward(model, ids, mask, pos, cache, head=False):
    arg = hf.cache_argument(model)
    out = (model if head else model.base_model)(input_ids=ids, attention_mask=mask, position_ids=pos,
                                                use_cache=True, **{arg: cache})
    return out


def kv_layers(cache):
    return [(k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)) for k, v in layouts.dynamic_cache_views(cache)]


def copy_cache(cache):
    out = ReplacingCache.make()
    for i, (k, v) in enumerate(kv_layers(cache)):
        out.update(k.clone(), v.clone(), i)
    return out


def fused_rows(ckpt, rows, sharer_rows):
    """``rows`` ([(K, V)] per receiver layer, [1, H, T, D]) fused with ``sharer_rows`` (same
    layout, per sharer layer) by ``c2c.fuse`` per mapped layer on the reference backend."""
    out = [(k.clone(), v.clone()) for k, v in rows]
    t = rows[0][0].shape[2]
    slots = torch.arange(t)
    for layer in ckpt.layers:
        k, v = out[layer.receiver_layer]
        sk, sv = sharer_rows[layer.sharer_layer]
        c2c.fuse(*layouts.hf_views(k, v), *layouts.hf_views(sk.contiguous(), sv.contiguous()), slots, slots,
                 layer.params, backend="reference")
    return out


def fuse_section(cache, a, b, sharers, selection, sharer_caches, mode):
    """Fuse columns [a, b) of a batch-1 cache in place, research style."""
    chosen = [j for j in range(len(sharers)) if selection & (1 << j)]
    layers = kv_layers(cache)
    clean = [(k[:, :, a:b].clone(), v[:, :, a:b].clone()) for k, v in layers]
    current = clean
    deltas = None
    for j in chosen:
        s_rows = [(k[:, :, a:b], v[:, :, a:b]) for k, v in kv_layers(sharer_caches[j])]
        fused = fused_rows(sharers[j].checkpoint, current if mode == "sequential" else clean, s_rows)
        if mode == "sequential":
            current = fused
        else:
            d = [(fk - ck, fv - cv) for (fk, fv), (ck, cv) in zip(fused, clean)]
            deltas = d if deltas is None else [(x + dk, y + dv) for (x, y), (dk, dv) in zip(deltas, d)]
    final = current if mode == "sequential" else [(ck + dk, cv + dv) for (ck, cv), (dk, dv) in zip(clean, deltas)]
    for (k, v), (fk, fv) in zip(layers, final):
        k[:, :, a:b], v[:, :, a:b] = fk, fv


def reference_run(receiver, sharers, ids, sharer_ids, mask, sharer_masks, pos, sections, *, steps, mode="parallel",
                  include_response=False, tables=None, fuse=True):
    """One prompt (batch 1, no batch padding): greedy tokens, logits, and the final caches."""
    a_final = sections[-1][0]
    with torch.no_grad():
        # The sharers prefill the sections before the final one (the final one is decoded with
        # the receiver when include_response is on).
        sharer_caches = [ReplacingCache.make() if a_final == 0 else hf.output_cache(
            forward(s.model, s_ids[:, :a_final], s_mask[:, :a_final], pos[:, :a_final], ReplacingCache.make()))
            for s, s_ids, s_mask in zip(sharers, sharer_ids, sharer_masks)]
        cache, clean = ReplacingCache.make(), None
        for a, b, selection in sections[:-1]:
            cache = hf.output_cache(forward(receiver, ids[:, a:b], mask[:, :b], pos[:, a:b], cache))
            clean = copy_cache(cache)
            if fuse and selection > 0:
                fuse_section(cache, a, b, sharers, selection, sharer_caches, mode)
        a, b, _ = sections[-1]
        clean = clean if clean is not None else ReplacingCache.make()

        def step(x, m, p, s_x, s_mask, s_pos):
            if include_response and fuse:
                s_cache = hf.output_cache(forward(sharers[0].model, s_x, s_mask, s_pos, sharer_caches[0]))
                t = x.shape[1]
                new = [(k[:, :, -t:], v[:, :, -t:]) for k, v in kv_layers(
                    hf.output_cache(forward(receiver, x, m, p, clean)))]
                s_rows = [(k[:, :, -t:], v[:, :, -t:]) for k, v in kv_layers(s_cache)]
                cache.rows = fused_rows(sharers[0].checkpoint, new, s_rows)
            out = forward(receiver, x, m, p, cache, head=True)
            cache.rows = None
            return out.logits[:, -1]

        logits = [step(ids[:, a:b], mask, pos[:, a:b], sharer_ids[0][:, a:b] if sharer_ids else None,
                       sharer_masks[0] if sharer_masks else None, pos[:, a:b])]
        tokens = []
        for i in range(steps):
            token = logits[-1].argmax(-1, keepdim=True)
            tokens.append(int(token))
            if i + 1 == steps:
                break
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            s_x, s_mask = None, None
            if sharer_masks:
                s_x = token if tables is None else tables[token]
                sharer_masks = [torch.cat([sharer_masks[0], torch.ones_like(token)], 1)]
                s_mask = sharer_masks[0]
            p = pos[:, -1:] + 1 + i
            logits.append(step(token, mask, p, s_x, s_mask, p))
    return tokens, torch.cat(logits), cache


def batch_rows(batch, b):
    """Prompt ``b`` of a batch without its batch padding: (ids, sharer ids, masks, positions, sections)."""
    keep = torch.zeros(batch.input_ids.shape[1], dtype=torch.bool)
    for a, e, _ in batch.sections[b]:
        keep[a:e] = True
    columns = keep.nonzero().flatten()
    shift = {int(c): i for i, c in enumerate(columns)}
    sections = [(shift[a], shift[e - 1] + 1, m) for a, e, m in batch.sections[b]]
    pick = (lambda t: t[b:b + 1, columns])
    return (pick(batch.input_ids), [pick(t) for t in batch.sharer_input_ids], pick(batch.attention_mask),
            [pick(t) for t in batch.sharer_attention_masks], pick(batch.position_ids), sections)


# ---- sections --------------------------------------------------------------------------------

def test_sections_are_fused_before_the_next_is_prefilled():
    receiver, tok, entries = tiny_pair(sharers=2, same_tokenizer=True)
    model = hf.C2CModel(receiver, tok, entries, backend="reference")
    ids = torch.tensor([tok("the lazy fox reads the sharer cache")["input_ids"]])
    n = ids.shape[1]
    # kv_cache_index: sharer 0 | no fusion | sharer 1 | both | final token
    cuts = [0, 3, 5, 8, n - 1, n]
    selections = [1, -1, 2, 3, -1]
    index = [torch.tensor([[s, 0]] * (b - a)).unsqueeze(0) for a, b, s in zip(cuts, cuts[1:], selections)]
    batch = hf.PromptBatch.from_kv_cache_index(ids, index, num_sharers=2)
    assert batch.sections == [[(a, b, s) for a, b, s in zip(cuts, cuts[1:], selections)]]
    got = model.prefill(batch)
    s_ids, mask, pos = [ids, ids], torch.ones_like(ids), torch.arange(n).unsqueeze(0)
    _, _, want = reference_run(receiver, entries, ids, s_ids, mask, [mask, mask], pos, batch.sections[0], steps=1)
    for (k, v), (k_ref, v_ref) in zip(kv_layers(got.cache), kv_layers(want)):
        torch.testing.assert_close(k, k_ref[:, :, :n - 1], atol=TOL, rtol=TOL)
        torch.testing.assert_close(v, v_ref[:, :, :n - 1], atol=TOL, rtol=TOL)
    # The same fusions applied after one prefill of the whole prompt give a different cache:
    # later sections' rows would be computed on an unfused cache.
    with torch.no_grad():
        once = hf.output_cache(forward(receiver, ids[:, :n - 1], mask[:, :n - 1], pos[:, :n - 1],
                                       ReplacingCache.make()))
        s_caches = [hf.output_cache(forward(e.model, ids, mask, pos, ReplacingCache.make())) for e in entries]
        for a, b, s in batch.sections[0][:-1]:
            if s > 0:
                fuse_section(once, a, b, entries, s, s_caches, "parallel")
    k_once, k_got = kv_layers(once)[1][0], kv_layers(got.cache)[1][0]
    assert (k_once[:, :, 5:] - k_got[:, :, 5:]).abs().max() > 100 * TOL
    torch.testing.assert_close(k_once[:, :, :3], k_got[:, :, :3], atol=TOL, rtol=TOL)  # the first section agrees


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_messages_with_two_tokenizers_generate_as_the_research_pipeline(mode, padding_side):
    receiver, tok, entries = tiny_pair(sharers=2)
    model = hf.C2CModel(receiver, tok, entries, backend="reference", mode=mode)
    conversations = [[{"role": "user", "content": "the lazy fox reads café caches"}],
                     [{"role": "system", "content": "a fuser"}, {"role": "user", "content": "fused héllo"}]]
    batch = model.tokenize(conversations, padding_side=padding_side)
    out = model.generate(batch, max_new_tokens=4, return_dict_in_generate=True, output_logits=True)
    n = batch.input_ids.shape[1]
    for b in range(len(conversations)):
        ids, s_ids, mask, s_masks, pos, sections = batch_rows(batch, b)
        tokens, logits, _ = reference_run(receiver, entries, ids, s_ids, mask, s_masks, pos, sections, steps=4,
                                          mode=mode)
        assert out.sequences[b, n:].tolist() == tokens
        torch.testing.assert_close(torch.stack(out.logits, 1)[b], logits, atol=TOL, rtol=TOL)


# ---- decoded tokens --------------------------------------------------------------------------

@pytest.mark.parametrize("layer_map", [None, {1: 2}], ids=["all-layers", "layer-1-only"])
def test_include_response_matches_a_step_by_step_reference(layer_map):
    receiver, tok, entries = tiny_pair(same_tokenizer=True, layer_map=layer_map)
    model = hf.C2CModel(receiver, tok, entries, backend="reference", include_response=True)
    texts = ["the lazy fox reads the sharer cache", "fused caches"]
    batch = model.tokenize(texts)
    steps = 5
    out = model.generate(batch, max_new_tokens=steps, return_dict_in_generate=True, output_logits=True)
    plain = model.generate(batch, max_new_tokens=steps, include_response=False, return_dict_in_generate=True,
                           output_logits=True)
    n = batch.input_ids.shape[1]
    for b in range(len(texts)):
        ids, s_ids, mask, s_masks, pos, sections = batch_rows(batch, b)
        tokens, logits, _ = reference_run(receiver, entries, ids, s_ids, mask, s_masks, pos, sections, steps=steps,
                                          include_response=True)
        assert out.sequences[b, n:].tolist() == tokens
        torch.testing.assert_close(torch.stack(out.logits, 1)[b], logits, atol=TOL, rtol=TOL)
        # Fusing the final prompt token already changes the first generated token's logits.
        assert (out.logits[0][b] - plain.logits[0][b]).abs().max() > 1e-2


def test_include_response_fuses_each_step_in_one_call(monkeypatch):
    receiver, tok, entries = tiny_pair(sharers=2)
    model = hf.C2CModel(receiver, tok, entries, backend="reference", include_response=True)
    calls = []
    original = hf.fuse_all

    def counting(ckpt, receiver_kv, *args, **kwargs):
        calls.append(len(receiver_kv[0][0].shape) and receiver_kv[0][0].shape[1])
        return original(ckpt, receiver_kv, *args, **kwargs)

    monkeypatch.setattr(hf, "fuse_all", counting)
    steps = 4
    messages = [{"role": "user", "content": "the lazy fox"}]
    model.generate(messages, max_new_tokens=steps)
    # the message section (both sharers, one call), the final section, then one call per decode step
    assert len(calls) == 1 + 1 + (steps - 1)
    assert calls[2:] == [1] * (steps - 1)  # one row per request in every decode call


def test_include_response_with_two_tokenizers_maps_decoded_tokens():
    receiver, tok, entries = tiny_pair()
    model = hf.C2CModel(receiver, tok, entries, backend="reference", include_response=True, strategy="longest")
    messages = [{"role": "user", "content": "the lazy fox reads café caches"}]
    batch = model.tokenize(messages)
    out = model.generate(batch, max_new_tokens=4, return_dict_in_generate=True, output_logits=True)
    ids, s_ids, mask, s_masks, pos, sections = batch_rows(batch, 0)
    table = model.token_map(0).table(receiver.get_output_embeddings().weight.shape[0])
    tokens, logits, _ = reference_run(receiver, entries, ids, s_ids, mask, s_masks, pos, sections, steps=4,
                                      include_response=True, tables=table)
    assert out.sequences[0, ids.shape[1]:].tolist() == tokens
    torch.testing.assert_close(torch.stack(out.logits, 1)[0], logits, atol=TOL, rtol=TOL)


def test_decode_options_and_errors():
    receiver, tok, entries = tiny_pair()
    model = hf.C2CModel(receiver, tok, entries, backend="reference", include_response=True)
    with pytest.raises(ValueError, match=r"generate_kwargs: \['num_beams'\]"):
        model.generate("the lazy fox", max_new_tokens=2, num_beams=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate("the lazy fox")
    torch.manual_seed(0)
    texts = model.generate_text([[{"role": "user", "content": "the fox"}]], max_new_tokens=3, do_sample=True,
                                top_k=5, top_p=0.9, temperature=0.7)
    assert len(texts) == 1 and isinstance(texts[0], str)
    with pytest.raises(ValueError, match="alignment"):
        hf.C2CModel(receiver, tok, entries, alignment="bytes")
    with pytest.raises(ValueError, match="response_sharers"):
        hf.C2CModel(receiver, tok, entries, response_sharers=[3])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: CUDA-graph capture and sync checks")
def test_decode_fusion_is_capturable_without_host_sync():
    receiver_tok = tiny_tokenizer("bytelevel", 320)
    receiver = tiny_model("qwen3", receiver_tok, 2, device="cuda", dtype=torch.bfloat16, seed=1)
    sharer = tiny_model("qwen2", receiver_tok, 3, device="cuda", dtype=torch.bfloat16, seed=2)
    ckpt = hf.random_checkpoint(receiver, sharer, hidden_dim=64, intermediate_dim=64, dtype=torch.bfloat16,
                                device="cuda")
    batch = 8
    fusion = hf.DecodeFusion([ckpt], receiver, [sharer], batch)

    def fill(seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        for rows in [fusion.receiver_rows] + fusion.sharer_rows:
            for kv in rows:
                if kv is not None:
                    for t in kv:
                        t.copy_(torch.randn(t.shape, generator=g, device="cuda", dtype=t.dtype))

    fill(0)
    fusion.fuse()  # warm up (kernel compilation) outside the capture
    torch.cuda.synchronize()
    fill(1)
    want = [(k.clone(), v.clone()) for k, v in fusion.receiver_rows]
    torch.cuda.set_sync_debug_mode("error")
    try:
        fusion.fuse()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    eager = [(k.clone(), v.clone()) for k, v in fusion.receiver_rows]
    for (k, v), (k0, v0) in zip(fusion.receiver_rows, want):
        k.copy_(k0), v.copy_(v0)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fusion.fuse()
    torch.cuda.current_stream().wait_stream(stream)
    for (k, v), (k0, v0) in zip(fusion.receiver_rows, want):
        k.copy_(k0), v.copy_(v0)
    with torch.cuda.graph(graph):
        fusion.fuse()
    for (k, v), (k0, v0) in zip(fusion.receiver_rows, want):
        k.copy_(k0), v.copy_(v0)
    graph.replay()
    torch.cuda.synchronize()
    for (k, v), (ke, ve) in zip(fusion.receiver_rows, eager):
        assert torch.equal(k, ke) and torch.equal(v, ve)


def test_own_decode_loop_agrees_with_transformers_generate():
    receiver, tok, entries = tiny_pair(sharers=2)
    model = hf.C2CModel(receiver, tok, entries, backend="reference")
    batch = model.tokenize(["the lazy fox reads the sharer cache", "fused caches"], padding_side="right")
    options = dict(max_new_tokens=4, return_dict_in_generate=True, output_logits=True)
    hf_out = model.generate(batch, do_sample=False, **options)  # no section padding: transformers' generate
    own = model._decode(batch, fuse=True, include_response=False, backend="reference", **options)
    assert torch.equal(hf_out.sequences, own.sequences)
    torch.testing.assert_close(torch.stack(hf_out.logits, 1), torch.stack(own.logits, 1), atol=TOL, rtol=TOL)


def test_research_inputs_are_checked():
    ids = torch.arange(6).view(1, 6)
    index = [torch.tensor([[[1, 0]] * 4]), torch.tensor([[[-1, 0]] * 1])]
    with pytest.raises(ValueError, match="kv_cache_index: its sections hold 5 tokens, input_ids has 6"):
        hf.PromptBatch.from_kv_cache_index(ids, index)
    with pytest.raises(ValueError, match=r"sharer_input_ids\[0\]: shape \[1, 6\], expected \[1, 5\]"):
        hf.PromptBatch.from_kv_cache_index(ids[:, :5], index, sharer_input_ids=[ids])
    batch = hf.PromptBatch.from_kv_cache_index(ids[:, :5], index)
    assert batch.sections == [[(0, 4, 1), (4, 5, -1)]]
    batch.sections = [[(0, 4, 1), (3, 5, -1)]]
    with pytest.raises(ValueError, match=r"sections\[0\]: \(3, 5\)"):
        batch.row_sections(1)
    batch.sections = [[(0, 4, 1)], []]
    with pytest.raises(ValueError, match="sections: 2 rows"):
        batch.row_sections(1)


def test_include_response_decodes_on_the_research_clean_cache_after_several_sections():
    # The clean cache the research code decodes on holds every fused section but the last one
    # before the final section fused: section 0 fused, section 2 as prefilled.
    receiver, tok, entries = tiny_pair(same_tokenizer=True)
    model = hf.C2CModel(receiver, tok, entries, backend="reference", include_response=True)
    ids = torch.tensor([tok("the lazy fox reads the sharer cache")["input_ids"]])
    n = ids.shape[1]
    cuts, selections = [0, 4, 6, n - 1, n], [1, -1, 1, -1]
    index = [torch.tensor([[s, 0]] * (b - a)).unsqueeze(0) for a, b, s in zip(cuts, cuts[1:], selections)]
    batch = hf.PromptBatch.from_kv_cache_index(ids, index)
    out = model.generate(batch, max_new_tokens=3, return_dict_in_generate=True, output_logits=True)
    mask, pos = torch.ones_like(ids), torch.arange(n).unsqueeze(0)
    tokens, logits, _ = reference_run(receiver, entries, ids, [ids], mask, [mask], pos, batch.sections[0], steps=3,
                                      include_response=True)
    assert out.sequences[0, n:].tolist() == tokens
    torch.testing.assert_close(torch.stack(out.logits, 1)[0], logits, atol=TOL, rtol=TOL)
