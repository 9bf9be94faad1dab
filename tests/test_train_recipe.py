"""``c2c-train``: the research recipe end to end, on tiny random models and a tiny synthetic
dataset written here (CPU, no network).

The trainer is checked against an independent plain-PyTorch implementation of the same recipe:
one conversation at a time (no padding, no batching), the receiver and the sharer prefilled on
the instruction tokens but the last, every mapped layer's K and V rows fused with
``reference.fuser_forward`` under autograd (draws from the example's generator, fusers in
receiver-layer order, keys before values), the fused rows put in a fresh ``DynamicCache``, and
the receiver's own causal-LM loss (``labels=``) on the final section; AdamW, the linear
schedule with warmup and ``clip_grad_norm_`` written out here.
"""
import json
import math
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import c2c_kernels as c2c  # noqa: E402
from c2c_kernels import reference  # noqa: E402
from c2c_kernels.integrations import alignment, hf  # noqa: E402
from c2c_kernels.integrations.tiny import tiny_model, tiny_tokenizer  # noqa: E402
from c2c_kernels.training import data as data_mod  # noqa: E402
from c2c_kernels.training.loop import C2CTrainer, fresh_checkpoint  # noqa: E402
from c2c_kernels.training.recipe import Recipe, lr_factor  # noqa: E402
from c2c_kernels.weights import FuserWeights  # noqa: E402

CONVERSATIONS = [
    [{"role": "user", "content": "the quick brown fox"}, {"role": "assistant", "content": "jumps over the lazy dog"}],
    [{"role": "user", "content": "caches are fused"}, {"role": "assistant", "content": "without copies, one layer"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a fuser reads"},
     {"role": "assistant", "content": "the sharer cache"}],
    [{"role": "user", "content": "large language models"}, {"role": "assistant", "content": "talk through caches"}],
]
FUSER = dict(hidden_dim=16, intermediate_dim=24)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizers():
    return tiny_tokenizer("bytelevel", 320), tiny_tokenizer("metaspace", 200)


@pytest.fixture(scope="module")
def models(tokenizers):
    receiver_tok, sharer_tok = tokenizers
    receiver = tiny_model("qwen3", receiver_tok, 2, seed=1)
    same_tok_sharer = tiny_model("qwen2", receiver_tok, 3, seed=3)
    own_tok_sharer = tiny_model("llama", sharer_tok, 3, seed=2)
    return receiver, same_tok_sharer, own_tok_sharer


def make_trainer(models, tokenizers, recipe=None, sharers=("same",), seed=0, **kwargs):
    receiver, same, own = models
    receiver_tok, sharer_tok = tokenizers
    pairs = [(same, None) if s == "same" else (own, sharer_tok) for s in sharers]
    ckpts = [fresh_checkpoint(receiver, m, seed=seed + j, **FUSER) for j, (m, _) in enumerate(pairs)]
    # a research init has closed gates and a zero output path nowhere; open the gates a little so
    # the fused rows matter from the first step
    ckpts = [c.with_weights(c.weights._replace(gate_logit=torch.full_like(c.weights.gate_logit, 0.5))) for c in ckpts]
    recipe = recipe or Recipe(batch_size=2, lr=1e-2, warmup_ratio=0.0, anneal_steps=10)
    return C2CTrainer(receiver, receiver_tok, pairs, ckpts, recipe, **kwargs), ckpts


# ---- the independent implementation -------------------------------------------------------------

def reference_example(receiver, sharer, tok, params, ckpt, messages, seed, temperature, dropout, training=True):
    """``(summed response loss, label count)`` of one conversation, research-style."""
    full = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    instruction = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    ids = tok(full, add_special_tokens=False)["input_ids"]
    n_instr = len(tok(instruction, add_special_tokens=False)["input_ids"])
    labels = torch.tensor([[-100] * n_instr + ids[n_instr:]])
    ids = torch.tensor([ids])
    fused = n_instr - 1
    from transformers import DynamicCache
    with torch.no_grad():
        s_cache = sharer(input_ids=ids[:, :fused], use_cache=True).past_key_values
        r_cache = receiver(input_ids=ids[:, :fused], use_cache=True).past_key_values
    r_layers = hf.layouts.dynamic_cache_views(r_cache)
    s_layers = hf.layouts.dynamic_cache_views(s_cache)
    gen = torch.Generator().manual_seed(seed) if training else None
    new = {}
    heads = r_layers[0][0].shape[2]
    for layer in ckpt.layers:  # receiver layers ascending, keys then values
        for side in (0, 1):
            x = r_layers[layer.receiver_layer][side][0].reshape(fused, -1)
            s = s_layers[layer.sharer_layer][side][0].reshape(fused, -1)
            proj, logits, gate = reference.fuser_forward(s, x, params, 2 * layer.projector + side, training=training,
                                                         dropout_p=dropout, temperature=temperature, generator=gen)
            scale = (gate * torch.sigmoid(logits)).reshape(fused, heads, 1)
            rows = x.reshape(fused, heads, -1) + scale * proj.reshape(fused, heads, -1)
            new[(layer.receiver_layer, side)] = rows.reshape(1, fused, heads, -1).transpose(1, 2)
    cache = DynamicCache()
    for layer, (k, v) in enumerate(r_layers):
        cache.update(new.get((layer, 0), k.transpose(1, 2)), new.get((layer, 1), v.transpose(1, 2)), layer)
    out = receiver(input_ids=ids[:, fused:], labels=labels[:, fused:], use_cache=True,
                   **{hf.cache_argument(receiver): cache})
    count = int((labels[:, fused + 1:] != -100).sum())
    return out.loss * count, count


class ReferenceRun:
    """The recipe in plain PyTorch: AdamW, linear warmup/decay, clipping, the temperature."""

    def __init__(self, models, tokenizer, ckpt, recipe, total):
        self.receiver, self.sharer = models[0], models[1]
        self.tok, self.ckpt, self.recipe = tokenizer, ckpt, recipe
        self.params = FuserWeights(*(t.detach().clone().float().requires_grad_() for t in ckpt.weights))
        self.opt = torch.optim.AdamW(list(self.params), lr=recipe.lr, weight_decay=recipe.weight_decay)
        warmup = int(recipe.warmup_ratio * total)

        def factor(step):  # transformers' get_linear_schedule_with_warmup
            if step < warmup:
                return float(step) / float(max(1, warmup))
            return max(0.0, float(total - step) / float(max(1, total - warmup)))

        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, factor)
        self.step = 0

    def temperature(self):
        args = self.ckpt.training_args()
        steps = self.recipe.anneal_steps or args["anneal_steps"]
        ratio = min(self.step / steps, 1.0)
        return args["initial_temperature"] * (args["final_temperature"] / args["initial_temperature"]) ** ratio

    def train_step(self, window):
        losses = []
        dropout = self.ckpt.training_args()["dropout"] if self.recipe.dropout is None else self.recipe.dropout
        tau = self.temperature()
        for micro in window:
            total, count = 0.0, 0
            for seed, conv in micro:
                loss, n = reference_example(self.receiver, self.sharer, self.tok, self.params, self.ckpt, conv, seed,
                                            tau, dropout)
                total, count = total + loss, count + n
            (total / count / self.recipe.grad_accum).backward()
            losses.append(float(total.detach()) / count)
        torch.nn.utils.clip_grad_norm_(list(self.params), self.recipe.max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad()
        self.step += 1
        return sum(losses) / len(losses)


def window_of(indices, batch_size=2, epoch=0, seed=42):
    micro = [[(data_mod.example_seed(seed, epoch, i), CONVERSATIONS[i]) for i in indices[a:a + batch_size]]
             for a in range(0, len(indices), batch_size)]
    return micro


def assert_weights_close(trainer_fuser, params, rtol=1e-4, atol=1e-6):
    for name, want in zip(FuserWeights._fields, params):
        torch.testing.assert_close(getattr(trainer_fuser, name).detach(), want.detach(), rtol=rtol, atol=atol,
                                   msg=lambda m: f"{name}: {m}")


def test_one_step_and_twenty_steps_match_plain_pytorch(models, tokenizers):
    recipe = Recipe(batch_size=2, lr=1e-2, warmup_ratio=0.1, anneal_steps=10)
    trainer, (ckpt,) = make_trainer(models, tokenizers, recipe)
    total = 20
    trainer.plan(total * 2)
    assert trainer.total == total
    ref = ReferenceRun(models, tokenizers[0], ckpt, recipe, total)
    start = [t.clone() for t in ref.params]
    # step 0 of the schedule has lr 0 (warmup): check the loss, then a real step
    for step in range(total):
        window = [window_of([step % 4, (step + 1) % 4], epoch=step)[0]]
        got = trainer.train_step(window)
        want = ref.train_step(window)
        assert abs(got["loss"] - want) <= 1e-6 * max(1.0, abs(want)), (step, got["loss"], want)
        if step in (0, 1):
            assert_weights_close(trainer.fusers[0], ref.params)
    assert_weights_close(trainer.fusers[0], ref.params, rtol=1e-3, atol=1e-5)
    assert not torch.allclose(ref.params.w_out, start[FuserWeights._fields.index("w_out")])


def test_gradient_reaches_every_parameter_through_the_receiver(models, tokenizers):
    trainer, _ = make_trainer(models, tokenizers)
    trainer.model.train()
    loss, count = trainer.loss(CONVERSATIONS[:2], [1, 2])
    (loss / count).backward()
    for name, p in trainer.fusers[0].named_parameters():
        assert p.grad is not None and float(p.grad.abs().max()) > 0, name


def test_sequential_sharers_pass_gradient_through_the_chain(models, tokenizers):
    """The first sharer's fusers feed the second's (sequential mode): their W_out must get the
    gradient of the loss through the second fuser (it was 0 when fused rows were detached)."""
    recipe = Recipe(batch_size=2, mode="sequential", warmup_ratio=0.0)
    trainer, _ = make_trainer(models, tokenizers, recipe, sharers=("same", "same"))
    trainer.model.train()
    loss, count = trainer.loss(CONVERSATIONS[:2], [3, 4])
    (loss / count).backward()
    for j, fuser in enumerate(trainer.fusers):
        assert float(fuser.w_out.grad.abs().max()) > 0, f"sharer {j}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sequential_rows_gradient_matches_reference_chain(backend):
    """fuse_rows chained (the second fuser reads the first's output) against reference autograd."""
    if backend == "triton":
        pytest.importorskip("triton")
    from c2c_kernels.training import fuse_rows
    w = c2c.random_weights(2, 2, 4, 2, 6, 16, 16, 3, seed=3)
    g = torch.Generator().manual_seed(0)
    s1, s2, x = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g), torch.randn(5, 12, generator=g)
    probe = torch.randn(5, 12, generator=g)

    def leaves():
        return FuserWeights(*(t.clone().requires_grad_() for t in w))

    a, b = leaves(), leaves()
    first = fuse_rows(s1, x, a, 0, generator=torch.Generator().manual_seed(1), backend=backend)
    second = fuse_rows(s2, first, b, 1, generator=torch.Generator().manual_seed(2), backend=backend)
    (second * probe).sum().backward()
    ra, rb = leaves(), leaves()

    def ref(s, rows, params, f, seed):
        proj, logits, gate = reference.fuser_forward(s, rows, params, f, training=True,
                                                     generator=torch.Generator().manual_seed(seed))
        return reference.fused_rows(rows, proj, logits, gate, 2)

    (ref(s2, ref(s1, x, ra, 0, 1), rb, 1, 2) * probe).sum().backward()
    assert float(ra.w_out.grad[0].abs().max()) > 0
    for name, got, want in zip(FuserWeights._fields, a, ra):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=2e-5, msg=lambda m: f"{name}: {m}")


# ---- labels, sections, data ----------------------------------------------------------------------

def test_response_only_labels_and_fused_positions_one_tokenizer(tokenizers):
    tok = tokenizers[0]
    conv = CONVERSATIONS[2]
    prompt = alignment.training_prompt(tok, [None], conv)
    full = tok(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False)["input_ids"]
    instr = tok(tok.apply_chat_template(conv[:-1], tokenize=False, add_generation_prompt=True),
                add_special_tokens=False)["input_ids"]
    n = len(instr)
    assert prompt.input_ids == full
    assert prompt.labels == [-100] * n + full[n:]
    # fused: the instruction tokens but the last; final section: the last instruction token on
    assert prompt.sections == [(0, n - 1, 1), (n - 1, len(full), -1)]
    text = tok.decode([t for t in prompt.labels if t != -100])
    assert "the sharer cache" in text and "a fuser reads" not in text


def test_labels_and_sections_two_tokenizers(tokenizers):
    receiver_tok, sharer_tok = tokenizers
    conv = CONVERSATIONS[0]
    prompt = alignment.training_prompt(receiver_tok, [sharer_tok], conv)
    aligned = alignment.align_messages(receiver_tok, [sharer_tok], conv, add_generation_prompt=False)
    message_sections = [(a, e) for a, e, m in aligned.sections if m > 0]
    response_start, response_end = message_sections[-1]
    assert prompt.input_ids == aligned.input_ids and prompt.sharer_input_ids == aligned.sharer_input_ids
    # only the instruction's message tokens are fused; the final section starts one token before the response
    fused = [(a, e) for a, e, m in prompt.sections if m > 0]
    assert fused == message_sections[:-1]
    assert prompt.sections[-1] == (response_start - 1, len(prompt.input_ids), -1)
    labelled = [c for c, t in enumerate(prompt.labels) if t != -100]
    assert labelled[0] == response_start
    assert all(not prompt.pads[c] for c in labelled)
    assert receiver_tok.decode(prompt.input_ids[response_start:response_end]).strip() == conv[-1]["content"]


def test_batch_layout_keeps_labels_with_their_tokens(models, tokenizers):
    trainer, _ = make_trainer(models, tokenizers, sharers=("own",))
    batch = trainer.encode(CONVERSATIONS[:3])
    for b, conv in enumerate(CONVERSATIONS[:3]):
        prompt = alignment.training_prompt(tokenizers[0], [tokenizers[1]], conv)
        mask = batch.attention_mask[b].bool()
        want = [t for t, pad in zip(prompt.labels, prompt.pads) if not pad]
        assert batch.labels[b][mask].tolist() == want


def test_training_prompt_errors():
    tok = tiny_tokenizer("bytelevel", 320)
    with pytest.raises(ValueError, match="role 'assistant'"):
        alignment.training_prompt(tok, [None], [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ValueError, match="at least two"):
        alignment.training_prompt(tok, [None], [{"role": "assistant", "content": "a"}])


def test_jsonl_and_sharegpt_records(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATIONS[0]}) + "\n\n" + json.dumps(
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}) + "\n")
    convs = data_mod.load_conversations(str(path))
    assert convs[0] == CONVERSATIONS[0]
    assert convs[1] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "no messages"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: no 'messages'"):
        data_mod.load_conversations(str(bad))


def test_hf_dataset_records_are_read(monkeypatch):
    """A Hugging Face dataset (anything indexable with a split) is read record by record."""
    convs = data_mod.load_conversations({"train": [{"messages": CONVERSATIONS[1]}]})
    assert convs == [CONVERSATIONS[1]]
    with pytest.raises(ValueError, match="splits"):
        data_mod.load_conversations({"test": []})


# ---- schedule, clipping, accumulation, temperature -------------------------------------------------

def test_warmup_decay_schedule_values():
    total, warmup = 20, 2
    assert [lr_factor(s, warmup, total) for s in range(4)] == [0.0, 0.5, 1.0, 17 / 18]
    assert lr_factor(total, warmup, total) == 0.0 and lr_factor(total + 3, warmup, total) == 0.0
    recipe = Recipe(batch_size=1, grad_accum=2, epochs=2)
    from c2c_kernels.training.recipe import total_steps
    assert total_steps(5, recipe) == 6  # ceil(5 / 2) per epoch, the short window included


def test_lr_and_temperature_after_each_step(models, tokenizers):
    recipe = Recipe(batch_size=2, lr=1e-3, warmup_ratio=0.5, anneal_steps=3, initial_temperature=2.0,
                    final_temperature=0.02)
    trainer, _ = make_trainer(models, tokenizers, recipe)
    trainer.plan(8)  # 4 steps, 2 of warmup
    lrs, temps = [], []
    for step in range(4):
        temps.append(trainer.temperature)
        stats = trainer.train_step([window_of([step, (step + 1) % 4])[0]])
        lrs.append(stats["lr"])
        assert stats["temperature"] == trainer.temperature
    assert lrs == pytest.approx([0.0, 0.5e-3, 1e-3, 0.5e-3])
    want = [2.0 * (0.01 ** min(k / 3, 1.0)) for k in range(5)]
    assert temps == pytest.approx(want[:4])
    assert trainer.temperature == pytest.approx(want[4])


def test_clipping_bounds_the_update(models, tokenizers):
    """With max_grad_norm tiny, the gradient AdamW sees has that norm (SGD-like check through
    the step's reported pre-clip norm and the parameters' grads before zeroing)."""
    recipe = Recipe(batch_size=2, max_grad_norm=1e-3, warmup_ratio=0.0)
    trainer, _ = make_trainer(models, tokenizers, recipe)
    trainer.plan(4)
    seen = {}
    original = trainer.optimizer.step

    def spy(*args, **kwargs):
        seen["norm"] = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in trainer.params))
        return original(*args, **kwargs)

    trainer.optimizer.step = spy
    stats = trainer.train_step(window_of([0, 1]))
    assert stats["grad_norm"] > 1e-3
    assert seen["norm"] == pytest.approx(1e-3, rel=1e-4)


@pytest.mark.parametrize("normalization", ["tokens", "micro_batch"])
def test_accumulation_equals_one_batch(models, tokenizers, normalization):
    """N micro-batches of one conversation == one batch of N (draws are per example)."""
    indices = [0, 1, 3] if normalization == "tokens" else [0, 0, 0]
    recipe = Recipe(batch_size=3, grad_accum=1, loss_normalization=normalization, warmup_ratio=0.0)
    one, _ = make_trainer(models, tokenizers, recipe)
    one.plan(3)
    one.train_step(window_of(indices, batch_size=3))
    accum, _ = make_trainer(models, tokenizers, recipe.replace(batch_size=1, grad_accum=3))
    accum.plan(3)
    accum.train_step(window_of(indices, batch_size=1))
    for name in FuserWeights._fields:
        torch.testing.assert_close(getattr(accum.fusers[0], name), getattr(one.fusers[0], name), rtol=1e-4,
                                   atol=1e-6, msg=lambda m: f"{name}: {m}")


# ---- checkpoints ---------------------------------------------------------------------------------

def test_resume_equals_uninterrupted_run(models, tokenizers, tmp_path):
    recipe = Recipe(batch_size=1, grad_accum=1, warmup_ratio=0.25, save_every=2, anneal_steps=4)
    straight, _ = make_trainer(models, tokenizers, recipe)
    straight.fit(CONVERSATIONS, str(tmp_path / "a"), progress=False)
    resumed, _ = make_trainer(models, tokenizers, recipe)
    resumed.fit(CONVERSATIONS, str(tmp_path / "b"), resume=str(tmp_path / "a" / "checkpoint-2"), progress=False)
    assert resumed.step == straight.step == 4
    assert resumed.temperature == straight.temperature
    for name in FuserWeights._fields:
        torch.testing.assert_close(getattr(resumed.fusers[0], name), getattr(straight.fusers[0], name), rtol=0,
                                   atol=0, msg=lambda m: f"{name}: {m}")


# The research class's constructor arguments (rosetta/model/projector.py, C2CProjector): a json's
# init_args must be among them for the research loader (``cls(**init_args)``) to build it.
RESEARCH_INIT_ARGS = {"source_dim", "target_dim", "source_num_heads", "target_num_heads", "intermediate_dim",
                      "hidden_dim", "num_layers", "dropout", "initial_temperature", "final_temperature",
                      "anneal_steps", "dtype", "zero_init"}


def test_export_round_trip_and_research_format(models, tokenizers, tmp_path):
    recipe = Recipe(batch_size=2, lr=1e-2, warmup_ratio=0.0, anneal_steps=7)
    trainer, _ = make_trainer(models, tokenizers, recipe)
    final = trainer.fit(CONVERSATIONS, str(tmp_path / "run"), progress=False)
    # the research loader's format: projector_{i}.json / .pt, projector_config.json
    files = sorted(os.listdir(final))
    n = len(trainer.checkpoints[0].projector_args)
    assert files == sorted([f"projector_{i}.{e}" for i in range(n) for e in ("json", "pt")]
                           + ["projector_config.json", "training_state.pt"])
    meta = json.load(open(os.path.join(final, "projector_0.json")))
    assert meta["class"] == "C2CProjector" and set(meta["init_args"]) <= RESEARCH_INIT_ARGS
    assert meta["init_args"]["anneal_steps"] == 7
    state = torch.load(os.path.join(final, "projector_0.pt"), weights_only=True)
    # the current temperature, not the loaded one
    assert float(state["gate_temperature"]) == pytest.approx(trainer.temperature)
    assert trainer.temperature < 1.0
    # loads in c2c.load_checkpoint; the client on it gives the trainer's eval-mode outputs
    ckpt = c2c.load_checkpoint(final)
    for name, value in zip(FuserWeights._fields, ckpt.weights):
        torch.testing.assert_close(value, getattr(trainer.fusers[0], name).detach(), rtol=0, atol=0)
    assert ckpt.training_args()["anneal_steps"] == 7
    receiver, same, _ = models
    client = hf.C2CModel(receiver, tokenizers[0], [hf.Sharer(same, ckpt)], backend="reference")
    batch = trainer.encode(CONVERSATIONS[:2])
    trainer.model.eval()
    with torch.no_grad():
        _, _, logits = trainer.model(batch, None, return_logits=True)
        tail = batch.input_ids.shape[1] - logits.shape[1]
        cache, _ = client._prefill_sections(batch, tail, fuse=True, backend="reference",
                                            sharer_caches=client._sharer_caches(batch, [0]))
        want = receiver(input_ids=batch.input_ids[:, tail:], attention_mask=batch.attention_mask,
                        position_ids=batch.receiver_positions()[:, tail:],
                        **{hf.cache_argument(receiver): cache}).logits
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-5)


def test_float64_gate_logits_are_kept_for_training(tmp_path):
    w = c2c.random_weights(2, 1, 4, 2, 4, 8, 8, 3, seed=1)
    ckpt = c2c.checkpoint.make_checkpoint(w, {0: 0}, 1)
    c2c.save_checkpoint(ckpt, str(tmp_path))
    for i in range(1):
        path = tmp_path / f"projector_{i}.pt"
        state = torch.load(path, weights_only=True)
        state = {k: v.double() for k, v in state.items()}
        state["key_gate_logit"] = torch.tensor(1e-40, dtype=torch.float64)  # zero in fp32
        torch.save(state, path)
    weights = c2c.checkpoint.read_fuser_weights(str(tmp_path))
    assert weights.gate_logit.dtype == torch.float64 and float(weights.gate_logit[0]) == 1e-40
    assert weights.w_out.dtype == torch.float64


def test_training_args_are_read_from_the_json(tmp_path, models, tokenizers):
    receiver, same, _ = models
    ckpt = fresh_checkpoint(receiver, same, **FUSER)
    assert ckpt.training_args() == {"dropout": 0.1, "initial_temperature": 1.0, "final_temperature": 0.001,
                                    "anneal_steps": 1929}
    edited = ckpt.with_weights(ckpt.weights, training_args={"anneal_steps": 5, "dropout": 0.0})
    c2c.save_checkpoint(edited, str(tmp_path))
    loaded = c2c.load_checkpoint(str(tmp_path))
    assert loaded.training_args()["anneal_steps"] == 5
    trainer = C2CTrainer(receiver, tokenizers[0], [(same, None)], [loaded], Recipe())
    assert trainer.fusers[0].total_steps == 5 and trainer.fusers[0].dropout_p == 0.0
    with pytest.raises(ValueError, match="anneal_steps"):
        ckpt.with_weights(ckpt.weights, training_args={"anneal_steps": 0}).training_args()


def test_research_dtypes_option(models, tokenizers):
    trainer, _ = make_trainer(models, tokenizers, Recipe(batch_size=2, research_dtypes=True, warmup_ratio=0.0))
    fuser = trainer.fusers[0]
    assert fuser.gate_logit.dtype == torch.bfloat16 and fuser.w_out.dtype == torch.bfloat16
    trainer.plan(4)
    stats = trainer.train_step(window_of([0, 1]))
    assert math.isfinite(stats["loss"])
    assert trainer.temperature == float(torch.tensor(trainer.temperature, dtype=torch.bfloat16))


def test_cli_trains_and_writes_a_loadable_checkpoint(tmp_path, models, tokenizers, monkeypatch):
    from c2c_kernels.training import cli
    receiver, same, _ = models
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    loaded = {"r": (receiver, tokenizers[0]), "s": (same, tokenizers[0])}
    monkeypatch.setattr(cli, "load_model", lambda name, dtype, device: loaded[name])
    out = tmp_path / "out"
    assert cli.main(["--receiver", "r", "--sharer", "s", "--data", str(path), "--out", str(out), "--batch-size", "2",
                     "--hidden-dim", "16", "--intermediate-dim", "24", "--no-progress", "--device", "cpu",
                     "--log", str(tmp_path / "log.jsonl")]) == 0
    ckpt = c2c.load_checkpoint(str(out / "final"))
    assert ckpt.num_projectors == 2
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and {"loss", "lr", "temperature", "tokens_per_s", "peak_memory"} <= set(lines[0])


def test_with_weights_errors_name_the_argument(models):
    receiver, same, _ = models
    ckpt = fresh_checkpoint(receiver, same, **FUSER)
    with pytest.raises(ValueError, match="weights: 2 fusers"):
        ckpt.with_weights(c2c.random_weights(2, 1, 8, 2, 16, 16, 24, 3))
    with pytest.raises(ValueError, match=r"weights.w_out: shape"):
        ckpt.with_weights(ckpt.weights._replace(w_out=ckpt.weights.w_out[:, :1]))
    with pytest.raises(ValueError, match="gate_temperature"):
        ckpt.with_weights(ckpt.weights, gate_temperature=0.0)
    with pytest.raises(ValueError, match="training_args: unknown"):
        ckpt.with_weights(ckpt.weights, training_args={"lr": 1.0})


def test_recipe_errors_name_the_argument():
    with pytest.raises(ValueError, match="grad_accum"):
        Recipe(grad_accum=0)
    with pytest.raises(ValueError, match="mode"):
        Recipe(mode="both")
    with pytest.raises(ValueError, match="loss_normalization"):
        Recipe(loss_normalization="mean")


def test_max_length_truncates_like_the_research_dataset(tokenizers):
    tok = tokenizers[0]
    conv = CONVERSATIONS[0]
    whole = alignment.training_prompt(tok, [None], conv)
    n = len(whole.input_ids)
    cut = alignment.training_prompt(tok, [None], conv, max_length=n - 2)
    assert cut.input_ids == whole.input_ids[:n - 2] and cut.labels == whole.labels[:n - 2]
    assert cut.sections == [whole.sections[0], (whole.sections[1][0], n - 2, -1)]
    # a cut inside the fused instruction: its last kept token becomes the final section
    short = alignment.training_prompt(tok, [None], conv, max_length=3)
    assert short.sections == [(0, 2, 1), (2, 3, -1)] and short.labels == [-100] * 3


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
@pytest.mark.parametrize("sharers", [("own",), ("same", "own")], ids=["own-tokenizer", "two-sharers"])
def test_eval_forward_matches_the_client_on_exported_checkpoints(models, tokenizers, tmp_path, sharers, mode):
    """Sections, alignment, sharer selection and multi-sharer modes are the client's: the
    trainer in eval mode gives the logits of C2CModel (inference ops) on its exported checkpoints."""
    recipe = Recipe(batch_size=2, mode=mode)
    trainer, _ = make_trainer(models, tokenizers, recipe, sharers=sharers)
    trainer.plan(4)
    trainer.save(str(tmp_path))
    receiver, same, own = models
    entries = []
    for j, s in enumerate(sharers):
        path = tmp_path if len(sharers) == 1 else tmp_path / f"sharer_{j}"
        ckpt = c2c.load_checkpoint(str(path))
        entries.append(hf.Sharer(same, ckpt) if s == "same" else hf.Sharer(own, ckpt, tokenizers[1]))
    client = hf.C2CModel(receiver, tokenizers[0], entries, backend="reference", mode=mode)
    batch = trainer.encode(CONVERSATIONS[:3])
    trainer.model.eval()
    with torch.no_grad():
        _, _, logits = trainer.model(batch, None, return_logits=True)
        tail = batch.input_ids.shape[1] - logits.shape[1]
        cache, _ = client._prefill_sections(batch, tail, fuse=True, backend="reference",
                                            sharer_caches=client._sharer_caches(batch, range(len(sharers))))
        want = receiver(input_ids=batch.input_ids[:, tail:], attention_mask=batch.attention_mask,
                        position_ids=batch.receiver_positions()[:, tail:],
                        **{hf.cache_argument(receiver): cache}).logits
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-5)
