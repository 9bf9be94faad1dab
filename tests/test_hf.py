"""The Hugging Face integration: C2C generation with tiny random models and local tokenizers.

The pipeline under test (batched, padded, vectorised alignment, slots, ``c2c.fuse_all``) is
checked against an independent one written here: each prompt alone, no padding, alignment by
Python loops, the fuser applied with :func:`c2c_kernels.reference.fuser_forward` to the same
caches, and a plain greedy loop. These tests pin the character-coverage alignment
(``alignment="offsets"``); tests/test_hf_fidelity.py pins the research pipeline's defaults.
"""
import importlib.util
import os
import types

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import c2c_kernels as c2c  # noqa: E402
from c2c_kernels import reference  # noqa: E402
from c2c_kernels.integrations import alignment, hf, hf_bench  # noqa: E402
from c2c_kernels.integrations.memory import peak_memory  # noqa: E402
from c2c_kernels.integrations.tiny import tiny_model, tiny_tokenizer  # noqa: E402
from c2c_kernels.bench.workloads import WORKLOADS  # noqa: E402
from c2c_kernels.testing import TOLERANCES, backend_params  # noqa: E402

BACKENDS = backend_params(include_reference=True)
TEXTS = ["the lazy fox reads café caches", "fused héllo", "a", "1234 + 5678 = 6912 over the dog"]
NEW_TOKENS = 6
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tokenizers():
    return tiny_tokenizer("bytelevel", 320), tiny_tokenizer("metaspace", 200)


def build(tokenizers, device="cpu", dtype=torch.float32, sharers=2, gates_open=True):
    """Receiver (Qwen3, 2 layers); sharer 0 (Llama, 3 layers, its own tokenizer, last-aligned);
    sharer 1 (Qwen2, 3 layers, the receiver's tokenizer, an arbitrary layer map)."""
    receiver_tok, sharer_tok = tokenizers
    receiver = tiny_model("qwen3", receiver_tok, 2, dtype=dtype, device=device, seed=1)
    llama = tiny_model("llama", sharer_tok, 3, dtype=dtype, device=device, seed=2)
    qwen2 = tiny_model("qwen2", receiver_tok, 3, dtype=dtype, device=device, seed=3)
    kw = dict(hidden_dim=32, intermediate_dim=48, dtype=dtype, device=device)
    entries = [hf.Sharer(llama, hf.random_checkpoint(receiver, llama, seed=4, gates_open=gates_open, **kw),
                         sharer_tok),
               hf.Sharer(qwen2, hf.random_checkpoint(receiver, qwen2, layer_map={0: 2, 1: 0}, seed=5,
                                                     gates_open=[True, False, True, True], **kw))]
    return receiver, receiver_tok, entries[:sharers]


# ---- the independent pipeline ----------------------------------------------------------------

def naive_columns(r_offsets, s_offsets):
    """The alignment rule of alignment.py, token by token, on one unpadded prompt."""
    out = []
    for start, end in r_offsets:
        wanted = [j for j, (_, s_end) in enumerate(s_offsets) if (s_end > start if end > start else s_end >= start)]
        out.append(wanted[0] if wanted else len(s_offsets) - 1)
    return out


def encode(tokenizer, text):
    enc = tokenizer(text, return_offsets_mapping=True, return_tensors="pt")
    return enc["input_ids"], enc["offset_mapping"][0].tolist()


def layer_rows(cache, layer, side):
    """``[N, H, D]`` rows of one layer of a batch-1 cache (a view: writes reach the cache)."""
    return hf.layouts.dynamic_cache_views(cache)[layer][side][0]


def add_rows(rows, delta):
    rows.copy_((rows.float() + delta.view(rows.shape)).to(rows.dtype))


def reference_prompt(receiver, receiver_tok, sharers, text, mode, device):
    """Greedy tokens and logits of one prompt, fused with reference.fuser_forward."""
    ids, offsets = encode(receiver_tok, text)
    ids = ids.to(device)
    arg = hf.cache_argument(receiver)
    if ids.shape[1] == 1:
        cache = None
    else:
        cache = hf.output_cache(receiver(input_ids=ids[:, :-1], use_cache=True))
        corrections = {}
        for sharer in sharers:
            tok = sharer.tokenizer or receiver_tok
            s_ids, s_offsets = encode(tok, text)
            columns = naive_columns(offsets[:-1], s_offsets) if sharer.tokenizer else list(range(ids.shape[1] - 1))
            s_cache = hf.output_cache(sharer.model(input_ids=s_ids.to(device), use_cache=True))
            ckpt = sharer.checkpoint
            for layer in ckpt.layers:
                for side, fuser in enumerate((layer.params.key_fuser, layer.params.value_fuser)):
                    x = layer_rows(cache, layer.receiver_layer, side)
                    s = layer_rows(s_cache, layer.sharer_layer, side)[columns]
                    y, a, gate = reference.fuser_forward(s.flatten(1), x.flatten(1), ckpt.weights, fuser)
                    heads = ckpt.weights.receiver_heads
                    delta = ((gate * torch.sigmoid(a)).unsqueeze(-1) * y.view(len(columns), heads, -1)).flatten(1)
                    if mode == "sequential":
                        add_rows(x, delta)
                    else:
                        key = (layer.receiver_layer, side)
                        corrections[key] = corrections.get(key, 0) + delta
        for (layer, side), delta in corrections.items():
            add_rows(layer_rows(cache, layer, side), delta)
    tokens, logits, step = [], [], ids[:, -1:]
    for _ in range(NEW_TOKENS):
        kwargs = {} if cache is None else {arg: cache}
        out = receiver(input_ids=step, use_cache=True, **kwargs)
        cache = hf.output_cache(out)
        logits.append(out.logits[0, -1])
        step = out.logits[:, -1:].argmax(-1)
        tokens.append(int(step))
    return tokens, torch.stack(logits)


def generated(output, prompt_columns):
    return output.sequences[:, prompt_columns:], torch.stack(output.logits, 1)


# ---- alignment -------------------------------------------------------------------------------

@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("swap", [False, True], ids=["bytelevel-to-metaspace", "metaspace-to-bytelevel"])
def test_alignment_matches_token_by_token_rule(tokenizers, padding_side, swap):
    r_tok, s_tok = tokenizers[::-1] if swap else tokenizers
    texts = TEXTS + ["  leading spaces", "naïve", "x"]
    r = hf.tokenize(r_tok, texts, padding_side=padding_side, offsets=True)
    s = hf.tokenize(s_tok, texts, padding_side=padding_side, offsets=True)
    columns = alignment.align_offsets(r["offset_mapping"], r["attention_mask"], s["offset_mapping"],
                                      s["attention_mask"])
    for b, text in enumerate(texts):
        r_cols = r["attention_mask"][b].nonzero().flatten()
        s_cols = s["attention_mask"][b].nonzero().flatten()
        want = naive_columns(encode(r_tok, text)[1], encode(s_tok, text)[1])
        got = columns[b, r_cols] - s_cols[0]  # sharer column -> index among its real tokens
        assert got.tolist() == want, text
        assert (columns[b][r["attention_mask"][b] == 0] == 0).all()


def test_alignment_rules():
    #            gap at 3 (space)    zero-width at 9     past the end
    r_offsets = [[(0, 3), (3, 4), (4, 9), (9, 9), (12, 14)]]
    s_offsets = [[(0, 0), (0, 3), (4, 6), (6, 9), (9, 9), (9, 11), (0, 0)]]  # BOS ... EOS-like pad
    s_mask = [[1, 1, 1, 1, 1, 1, 0]]
    got = alignment.align_offsets(torch.tensor(r_offsets), torch.ones(1, 5), torch.tensor(s_offsets),
                                  torch.tensor(s_mask))
    # 'abc' -> s1; ' ' (no sharer token) -> the next, s2; 'defgh' -> s2 (covers 4); zero-width at
    # 9 -> s3, which ends there; char 12, past the sharer's text -> its last real token s5, not the pad.
    assert got.tolist() == [[1, 2, 2, 3, 5]]
    bos = alignment.align_offsets(torch.tensor([[(0, 0), (0, 2)]]), torch.ones(1, 2),
                                  torch.tensor([[(0, 0), (0, 0), (0, 1), (1, 2)]]), torch.tensor([[0, 1, 1, 1]]))
    assert bos.tolist() == [[1, 2]]  # BOS to the sharer's BOS (behind one left pad), 'ab' to 'a'


def test_alignment_errors():
    with pytest.raises(ValueError, match="receiver_offsets"):
        alignment.align_offsets(torch.zeros(1, 3), torch.ones(1, 3), torch.zeros(1, 2, 2), torch.ones(1, 2))
    with pytest.raises(ValueError, match="sharer_mask"):
        alignment.align_offsets(torch.zeros(1, 3, 2), torch.ones(1, 3), torch.zeros(1, 2, 2), torch.ones(1, 3))
    with pytest.raises(ValueError, match="batch"):
        alignment.align_offsets(torch.zeros(1, 3, 2), torch.ones(1, 3), torch.zeros(2, 2, 2), torch.ones(2, 2))


# ---- generation against the independent pipeline ---------------------------------------------

SCENARIOS = {  # padding side, sharers, mode
    "one-sharer-left": ("left", 1, "parallel"),
    "two-sharers-parallel-right": ("right", 2, "parallel"),
    "two-sharers-sequential-left": ("left", 2, "sequential"),
}


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_generation_matches_reference_pipeline(tokenizers, backend, device, scenario):
    padding_side, sharers, mode = SCENARIOS[scenario]
    receiver, receiver_tok, entries = build(tokenizers, device, sharers=sharers)
    model = hf.C2CModel(receiver, receiver_tok, entries, mode=mode, backend=backend, check_slots=True,
                        alignment="offsets")
    batch = model.tokenize(TEXTS, padding_side=padding_side)
    columns = hf.split_last_token(batch.input_ids, batch.attention_mask)[0].shape[1] + 1
    options = dict(max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True,
                   output_logits=True)
    tokens, logits = generated(model.generate(batch, **options), columns)
    _, unfused_logits = generated(model.generate(batch, fuse=False, **options), columns)
    with torch.no_grad():
        for b, text in enumerate(TEXTS):
            want_tokens, want_logits = reference_prompt(receiver, receiver_tok, entries, text, mode, device)
            eos = want_tokens.index(receiver_tok.eos_token_id) + 1 if receiver_tok.eos_token_id in want_tokens \
                else NEW_TOKENS
            assert tokens[b, :eos].tolist() == want_tokens[:eos], text
            # A backend's fused rows may differ from the reference by TOLERANCES[fp32]; attention
            # over them moves the logits by about as much, so allow a few times that.
            tol = 5 * TOLERANCES[torch.float32]
            torch.testing.assert_close(logits[b, :eos], want_logits[:eos], atol=tol, rtol=tol)
            if len(encode(receiver_tok, text)[1]) > 1:  # the fusion changed what the receiver says
                assert (logits[b, 0] - unfused_logits[b, 0]).abs().max() > 1e-2, text


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bf16_fused_cache_matches_reference(tokenizers, backend, device):
    receiver, receiver_tok, entries = build(tokenizers, device, dtype=torch.bfloat16)
    batch = hf.C2CModel(receiver, receiver_tok, entries).tokenize(TEXTS, padding_side="right")
    states = [hf.C2CModel(receiver, receiver_tok, entries, backend=b).prefill(batch) for b in (backend, "reference")]
    mask = states[0].attention_mask[:, :-1].bool()
    tol = TOLERANCES[torch.bfloat16]
    for (k, v), (k_ref, v_ref) in zip(*(hf.layouts.dynamic_cache_views(s.cache) for s in states)):
        for got, want in ((k, k_ref), (v, v_ref)):
            torch.testing.assert_close(got[mask].float(), want[mask].float(), atol=tol, rtol=tol)


def test_closed_gates_and_one_token_prompts_match_the_receiver_alone(tokenizers):
    receiver, receiver_tok, entries = build(tokenizers, sharers=1, gates_open=False)
    model = hf.C2CModel(receiver, receiver_tok, entries, backend="reference")
    for texts in (TEXTS, ["a", "b"]):
        batch = model.tokenize(texts)
        torch.testing.assert_close(model.first_token_logits(batch), model.first_token_logits(batch, fuse=False),
                                   atol=0, rtol=0)
    assert model.prefill(model.tokenize(["a", "b"])).cache is None


def test_published_checkpoint_and_text_api(tokenizers, tmp_path):
    receiver, receiver_tok, entries = build(tokenizers, sharers=1)
    c2c.save_checkpoint(entries[0].checkpoint, str(tmp_path))
    loaded = c2c.load_checkpoint(str(tmp_path))
    texts = TEXTS[:2]
    options = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    got = hf.C2CModel(receiver, receiver_tok, [hf.Sharer(entries[0].model, loaded, entries[0].tokenizer)],
                      backend="reference").generate_text(texts, **options)
    want = hf.C2CModel(receiver, receiver_tok, entries, backend="reference").generate_text(texts, **options)
    assert got == want and all(isinstance(t, str) for t in got)


# ---- the cache-level entry point -------------------------------------------------------------

def prefilled_caches(tokenizers, entries, receiver, receiver_tok):
    model = hf.C2CModel(receiver, receiver_tok, entries)
    batch = model.tokenize(TEXTS, padding_side="right")
    ids, mask, _ = hf.split_last_token(batch.input_ids, batch.attention_mask)
    with torch.no_grad():
        cache = hf.prefill(receiver, ids, mask.long())
        sharer_cache = hf.prefill(entries[0].model, batch.sharer_input_ids[0], batch.sharer_attention_masks[0])
    return cache, mask, sharer_cache, batch.sharer_columns[0][:, :ids.shape[1]]


def test_older_cache_api_and_in_place_without_clones(tokenizers):
    receiver, receiver_tok, entries = build(tokenizers, sharers=1)
    ckpt = entries[0].checkpoint
    cache, mask, sharer_cache, columns = prefilled_caches(tokenizers, entries, receiver, receiver_tok)
    kv = hf.layouts.dynamic_cache_views(cache)
    pointers = [(k.data_ptr(), v.data_ptr()) for k, v in kv]
    clean = [k.clone() for k, _ in kv]
    # The same rows behind the per-layer key_cache/value_cache lists of older transformers.
    older = types.SimpleNamespace(key_cache=[k.permute(0, 2, 1, 3).clone() for k, _ in kv],
                                  value_cache=[v.permute(0, 2, 1, 3).clone() for _, v in kv])

    _, peak = peak_memory(lambda: hf.fuse_prompt_cache(ckpt, cache, mask, sharer_cache, columns,
                                                       backend="reference"), "cpu")
    hf.fuse_prompt_cache(ckpt, older, mask, sharer_cache, columns, backend="reference")
    after = hf.layouts.dynamic_cache_views(cache)
    assert [(k.data_ptr(), v.data_ptr()) for k, v in after] == pointers  # written where it was
    for (k, v), k_old, v_old, k_clean in zip(after, older.key_cache, older.value_cache, clean):
        assert torch.equal(k, k_old.permute(0, 2, 1, 3)) and torch.equal(v, v_old.permute(0, 2, 1, 3))
        assert not torch.equal(k[mask], k_clean[mask]) and torch.equal(k[~mask], k_clean[~mask])

    # What the integration allocates on top of the op itself: slot tensors, no cache copies.
    sharer_kv = hf.layouts.dynamic_cache_views(sharer_cache)
    sharer_slots = (torch.arange(mask.shape[0]).unsqueeze(1) * sharer_kv[0][0].shape[1] + columns).reshape(-1)
    _, op_peak = peak_memory(lambda: c2c.fuse_all(ckpt, after, sharer_kv, hf.layouts.hf_slots(mask), sharer_slots,
                                                  backend="reference"), "cpu")
    cache_size = sum(t.numel() * t.element_size() for pair in after for t in pair)
    assert peak <= op_peak + 16 * 1024, (peak, op_peak, cache_size)


def test_errors_name_the_argument(tokenizers):
    receiver, receiver_tok, entries = build(tokenizers)
    llama, qwen2 = entries[0].model, entries[1].model
    wrong_map = hf.random_checkpoint(receiver, llama, layer_map={0: 0}, hidden_dim=32, intermediate_dim=48)
    wrong_map = wrong_map.replace(mapping={0: {1: {5: [(0, 0)]}}})
    with pytest.raises(ValueError, match=r"sharers\[0\].checkpoint: fuses receiver layer 5"):
        hf.C2CModel(receiver, receiver_tok, [hf.Sharer(llama, wrong_map)])
    with pytest.raises(ValueError, match=r"sharers\[0\].checkpoint: its fusers read sharer rows"):
        hf.C2CModel(receiver, receiver_tok, [hf.Sharer(llama, entries[1].checkpoint)])
    with pytest.raises(ValueError, match=r"sharers\[0\].index = 7"):
        hf.C2CModel(receiver, receiver_tok, [hf.Sharer(llama, entries[0].checkpoint, index=7)])
    with pytest.raises(ValueError, match=r"sharers\[1\].model: on cpu in torch.bfloat16"):
        hf.C2CModel(receiver, receiver_tok, [entries[0], hf.Sharer(qwen2.to(torch.bfloat16), entries[1].checkpoint)])
    qwen2.to(torch.float32)
    with pytest.raises(ValueError, match="layer_map"):
        hf.random_checkpoint(receiver, llama, layer_map={2: 0})
    model = hf.C2CModel(receiver, receiver_tok, entries)
    with pytest.raises(ValueError, match=r"texts\[1\]"):
        model.tokenize(["fine", ""])
    with pytest.raises(ValueError, match="padding_side"):
        model.tokenize(["fine"], padding_side="middle")
    with pytest.raises(ValueError, match="attention_mask: row 1 holds no tokens"):
        hf.split_last_token(torch.ones(2, 3, dtype=torch.long), torch.tensor([[1, 1, 1], [0, 0, 0]]))
    with pytest.raises(ValueError, match="prompts: holds tokens for 1 sharers"):
        model.prefill(hf.PromptBatch.same_tokens(torch.ones(1, 3, dtype=torch.long)))
    cache, mask, sharer_cache, columns = prefilled_caches(tokenizers, entries[:1], receiver, receiver_tok)
    with pytest.raises(ValueError, match="receiver_cache: layer 0 holds"):
        hf.fuse_prompt_cache(entries[0].checkpoint, cache, mask[:, 1:], sharer_cache, columns[:, 1:])
    with pytest.raises(ValueError, match=r"sharer_columns\[0\]"):
        hf.fuse_prompt_cache(entries[0].checkpoint, cache, mask, sharer_cache, columns[:1])


# ---- benchmark and example -------------------------------------------------------------------

def test_benchmark_models_have_the_workload_geometry():
    for workload, (receiver_kv, sharer_kv) in WORKLOADS.items():
        receiver, sharer = hf_bench.workload_configs(workload)
        assert (hf.kv_geometry(receiver), hf.kv_geometry(sharer)) == (receiver_kv, sharer_kv), workload
        tiny = hf_bench.workload_configs(workload, tiny=True)
        assert [hf.kv_geometry(c)[1:] for c in tiny] == [receiver_kv[1:], sharer_kv[1:]]


def test_time_to_first_token_rows():
    rows = hf_bench.ttft_rows(tiny=True, batch=2, prompt_tokens=8, repeats=1, warmup=0, backends=("reference",),
                              device="cpu")
    assert [r["variant"] for r in rows] == ["fused (reference)", "receiver only"]
    assert all(r["median_ms"] > 0 and r["peak_mib"] > 0 for r in rows)
    assert rows[0]["vs_reference"] == 1.0


def test_decode_fusion_rows():
    rows = hf_bench.decode_rows(batches=(1, 2), backends=("reference",), device="cpu", repeats=1, warmup=0,
                                fuser_hidden=32, fuser_intermediate=32)
    assert [(r["variant"], r["batch"]) for r in rows] == [("fused (reference)", 1), ("fused (reference)", 2)]
    assert all(r["median_us"] > 0 and r["weights_mib"] > 0 and r["vs_reference"] == 1.0 for r in rows)


def test_peak_memory_replays_allocations():
    def work():
        a = torch.ones(1 << 20)  # 4 MiB
        b = a * 2  # 8 MiB live
        del a
        c = torch.empty(3 << 20)  # 4 + 12 = 16 MiB live: the peak
        del c
        return b.sum()

    _, peak = peak_memory(work, "cpu")
    assert 16 << 20 <= peak < (16 << 20) + 4096


def test_fusion_memory_row():
    row = hf_bench.fusion_memory("qwen3-0.6b+llama3.2-1b", prompt_tokens=4, backend="reference", device="cpu",
                                 fuser_hidden=32, fuser_intermediate=32)
    assert row["receiver_cache_mib"] == 28 * 2 * 8 * 4 * 128 * 4 / 2**20  # layers, K+V, heads, tokens, dim, fp32
    assert row["integration_peak_mib"] - row["op_peak_mib"] < 16 / 1024  # slots only, no cache copies


def test_example_runs_offline(capsys):
    spec = importlib.util.spec_from_file_location("hf_generate", os.path.join(ROOT, "examples", "hf_generate.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--demo", "--backend", "reference", "--max-new-tokens", "3", "--padding-side", "right"])
    out = capsys.readouterr().out
    assert "--- C2C" in out and "--- receiver alone" in out and "never cloned" in out
    example.main(["--demo", "--backend", "reference", "--max-new-tokens", "2", "--raw", "--include-response",
                  "--strategy", "longest"])
    assert "--- C2C" in capsys.readouterr().out
