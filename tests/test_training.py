"""Training the fuser: gradients against the reference's autograd, gradcheck in float64, seeded
and replayed draws, the cache-view entry point, the module, and a short training run."""
import math

import pytest
import torch

from c2c_kernels import random_weights, reference
from c2c_kernels.testing import make_case
from c2c_kernels.training import FuserTrainer, fuse_caches, fuse_rows, saved_bytes_per_token
from c2c_kernels.weights import FuserWeights

CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """The shapes here are tiny: with several threads, OpenMP barriers (and a busy machine)
    dominate every op. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# (backend, device); the Triton kernels run in the interpreter on machines without a GPU.
PATHS = [
    pytest.param("torch", "cpu", id="torch-cpu"),
    pytest.param("triton", "cpu", id="triton-cpu", marks=pytest.mark.skipif(CUDA, reason="interpreter: CPU only")),
    pytest.param("torch", "cuda", id="torch-cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="no GPU")]),
    pytest.param("triton", "cuda", id="triton-cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="no GPU")]),
]

SHAPES = {
    # sharer (heads, dim), receiver (heads, dim), hidden, intermediate, num_layers, tokens, fusers of P=3
    "base": dict(sharer=(2, 8), receiver=(4, 6), hidden=32, inter=24, layers=3, tokens=7, fusers=[2, 0]),
    "gqa_deep": dict(sharer=(2, 4), receiver=(8, 4), hidden=16, inter=40, layers=5, tokens=5, fusers=[1]),
    "odd_repeated_fuser": dict(sharer=(3, 5), receiver=(3, 5), hidden=20, inter=12, layers=3, tokens=9, fusers=[0, 0]),
    "one_token": dict(sharer=(1, 8), receiver=(2, 8), hidden=16, inter=16, layers=4, tokens=1, fusers=[1, 2]),
}
TRAINING = dict(training=True, dropout_p=0.3, temperature=0.7)
MODES = {"train": TRAINING, "train_no_dropout": dict(TRAINING, dropout_p=0.0),
         "cold_gate": dict(TRAINING, temperature=0.05), "eval": dict(training=False)}

# fp32: the same math up to the order of fp32 sums (GEMM blocking, fused reductions).
FP32_TOL = dict(atol=2e-5, rtol=1e-4)
# bf16, as ||got - want|| / ||want|| per tensor. With fp32 compute (the CPU default) only the
# stored results are rounded (2^-9 relative each); with bf16 compute (the GPU default) every
# GEMM input and every kept activation is rounded to bf16, about ten roundings deep along the
# backward chain: measured ~1%, allowed 3%. Elementwise bounds do not fit 16-bit gradients:
# sums of many terms cancel, so single entries can carry large relative errors.
BF16_NORM_TOL = {torch.float32: 1e-2, torch.bfloat16: 3e-2}


def make_problem(shape, dtype=torch.float32, device="cpu", seed=0, gates_open=True):
    cfg = SHAPES[shape] if isinstance(shape, str) else shape
    (hs, ds), (ht, dt) = cfg["sharer"], cfg["receiver"]
    w = random_weights(cfg.get("stacked", 3), hs, ds, ht, dt, cfg["hidden"], cfg["inter"], cfg["layers"], dtype=dtype, device=device,
                       seed=seed, gates_open=gates_open)
    g = torch.Generator().manual_seed(seed + 1)
    r, t = len(cfg["fusers"]), cfg["tokens"]
    sharer = [torch.randn(t, hs * ds, generator=g).to(device, dtype) for _ in range(r)]
    receiver = [torch.randn(t, ht * dt, generator=g).to(device, dtype) for _ in range(r)]
    probe = torch.randn(r, t, ht * dt, generator=g).to(device)
    return w, sharer, receiver, cfg["fusers"], probe


def leaves(weights):
    return FuserWeights(*(t.detach().clone().requires_grad_() for t in weights))


def reference_run(weights, sharer, receiver, fusers, probe, seed=5, training=True, dropout_p=0.1, temperature=1.0):
    """Reference outputs [R, T, Kt] (fp32), weight gradients of <probe, out>, generator state after."""
    w = leaves(weights)
    g = torch.Generator(device=probe.device).manual_seed(seed)
    outs = []
    for s, x, f in zip(sharer, receiver, fusers):
        y, a, gate = reference.fuser_forward(s, x, w, f, training=training, dropout_p=dropout_p,
                                             temperature=temperature, generator=g)
        outs.append(reference.fused_rows(x, y, a, gate, w.receiver_heads))
    out = torch.stack(outs)
    (out * probe).sum().backward()
    # The hard gate (eval) is not differentiable: no gradient there means zero.
    return out.detach(), [torch.zeros_like(t) if t.grad is None else t.grad for t in w], g.get_state()


def c2c_run(weights, sharer, receiver, fusers, probe, seed=5, **kwargs):
    w = leaves(weights)
    g = torch.Generator(device=probe.device).manual_seed(seed)
    out = fuse_rows(sharer, receiver, w, fusers, generator=g, **kwargs)
    state = g.get_state()
    (out.float() * probe).sum().backward()
    return out.detach(), [t.grad for t in w], state


def relative_error(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("backend,device", PATHS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "keep_hidden"])
def test_fp32_gradients_match_reference(backend, device, mode, shape, recompute):
    if backend == "triton" and device == "cpu" and (mode != "train" or not recompute) and shape != "base":
        pytest.skip("interpreter time: the Triton path runs every mode on one shape")
    w, s, x, fusers, probe = make_problem(shape, device=device)
    want, want_grads, want_state = reference_run(w, s, x, fusers, probe, **MODES[mode])
    got, got_grads, got_state = c2c_run(w, s, x, fusers, probe, backend=backend, recompute=recompute,
                                        compute_dtype=torch.float32, **MODES[mode])
    torch.testing.assert_close(got, want, **FP32_TOL)
    assert torch.equal(got_state, want_state), "the generator did not advance exactly as the reference's"
    for name, g, r in zip(FuserWeights._fields, got_grads, want_grads):
        assert g.dtype == r.dtype, name
        torch.testing.assert_close(g, r, **FP32_TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend,device", PATHS)
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=["fp32_compute", "bf16_compute"])
@pytest.mark.parametrize("shape", ["base", "gqa_deep"])
def test_bf16_gradients_match_reference(backend, device, compute_dtype, shape):
    """bf16 weights and rows; the reference computes in fp32 from them."""
    w, s, x, fusers, probe = make_problem(shape, dtype=torch.bfloat16, device=device, seed=2)
    want, want_grads, _ = reference_run(w, s, x, fusers, probe, **TRAINING)
    got, got_grads, _ = c2c_run(w, s, x, fusers, probe, backend=backend, compute_dtype=compute_dtype, **TRAINING)
    assert got.dtype == torch.bfloat16
    tol = BF16_NORM_TOL[compute_dtype]
    assert relative_error(got, want) < tol, f"fused rows: relative error {relative_error(got, want):.3g}"
    for name, g, r in zip(FuserWeights._fields, got_grads, want_grads):
        assert g.dtype == r.dtype, name
        assert relative_error(g, r) < tol, f"{name}: relative error {relative_error(g, r):.3g} >= {tol}"


@pytest.mark.parametrize("mode,recompute", [("train", True), ("train", False), ("eval", True)])
def test_gradcheck_float64(mode, recompute):
    """Every weight of two stacked fusers (one used twice), dropout and the soft gate on."""
    tiny = dict(sharer=(1, 2), receiver=(2, 2), hidden=4, inter=3, layers=3, tokens=2, fusers=[1, 0, 1], stacked=2)
    w, s, x, fusers, _ = make_problem(tiny, dtype=torch.float64, seed=7)
    params = [t.detach().double().requires_grad_() for t in w]  # gate_logit too
    options = dict(MODES[mode], temperature=1.5) if mode == "train" else MODES[mode]

    def fused(*p):
        g = torch.Generator().manual_seed(11)  # the same draws on every evaluation
        return fuse_rows(s, x, FuserWeights(*p), fusers, generator=g, backend="torch", recompute=recompute, **options)

    assert torch.autograd.gradcheck(fused, params, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="no GPU")
def test_generator_must_match_the_device():
    w, s, x, fusers, _ = make_problem("base", device="cuda")
    with pytest.raises(ValueError, match="generator"):
        fuse_rows(s, x, w, fusers, generator=torch.Generator())


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(CUDA, reason="CPU"))])
def test_same_seed_same_draws(backend):
    """Dropout masks and Gumbel noise come from the generator: the same seed gives the same
    fused rows and gradients (bit for bit), another seed other ones, and the backward replays
    the draws without advancing the caller's generator."""
    w, s, x, fusers, probe = make_problem("base")
    options = dict(dropout_p=0.5, temperature=2.0, backend=backend)
    a = c2c_run(w, s, x, fusers, probe, seed=1, **options)
    b = c2c_run(w, s, x, fusers, probe, seed=1, **options)
    c = c2c_run(w, s, x, fusers, probe, seed=2, **options)
    assert torch.equal(a[0], b[0]) and all(torch.equal(g, h) for g, h in zip(a[1], b[1]))
    assert not torch.allclose(a[0], c[0])
    # With p = 0.5 a different mask would move the output by O(1): the reference's masks are used.
    torch.testing.assert_close(a[0], reference_run(w, s, x, fusers, probe, seed=1, dropout_p=0.5, temperature=2.0)[0],
                               **FP32_TOL)

    g = torch.Generator().manual_seed(3)
    out = fuse_rows(s, x, leaves(w), fusers, generator=g, **options)
    after_forward = g.get_state()
    (out * probe).sum().backward()
    assert torch.equal(g.get_state(), after_forward), "the backward advanced the caller's generator"

    torch.manual_seed(9)  # no generator: the default one, seeded the usual way
    first = fuse_rows(s, x, w, fusers, **options)
    torch.manual_seed(9)
    assert torch.equal(first, fuse_rows(s, x, w, fusers, **options))


def test_gate_logit_gradient_through_gumbel_sigmoid():
    """dL/dg = sum over (token, head) of dL/dG * G (1 - G) / tau, with G = sigmoid((g + noise) / tau)."""
    w, s, x, fusers, probe = make_problem("base")
    w = w._replace(gate_logit=torch.tensor([0.3, -0.2, 0.1]))
    tau = 0.5
    _, grads, _ = c2c_run(w, s, x, fusers, probe, seed=4, dropout_p=0.0, temperature=tau)
    g = torch.Generator().manual_seed(4)
    want = torch.zeros(3)
    for si, xi, pi, f in zip(s, x, probe, fusers):
        y, a, _ = reference.fuser_forward(si, xi, w, f)  # eval: no draws; dropout is off anyway
        gate = torch.sigmoid((w.gate_logit[f] + reference.gumbel_noise(a.shape, generator=g)) / tau)
        d_gate = (pi.view(len(xi), -1, y.shape[1] // a.shape[1]) * y.view(len(xi), a.shape[1], -1)).sum(-1) * torch.sigmoid(a)
        want[f] += (d_gate * gate * (1 - gate)).sum() / tau
    torch.testing.assert_close(grads[-1], want, **FP32_TOL)


def test_closed_gate_eval_has_no_gate_gradient_and_leaves_rows():
    w, s, x, fusers, probe = make_problem("base", gates_open=False)
    out, grads, _ = c2c_run(w, s, x, fusers, probe, training=False)
    torch.testing.assert_close(out, torch.stack(x))
    assert all(float(g.abs().max()) == 0 for g in grads), "a closed hard gate passes no gradient"


@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "keep_hidden"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_saved_bytes_match_docs(recompute, dtype):
    """What autograd keeps is what ``saved_bytes_per_token`` (and docs/training.md) says."""
    w, s, x, fusers, _ = make_problem("gqa_deep", dtype=dtype)
    params = leaves(w)
    storages, total = {t.untyped_storage().data_ptr() for t in [*params, *s, *x]}, 0
    seen = set()

    def pack(t):
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in storages and ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fuse_rows(s, x, params, fusers, compute_dtype=dtype, recompute=recompute)
    assert total == saved_bytes_per_token(w, dtype, recompute) * len(x[0]) * len(fusers)


def test_fuse_caches_matches_rows_and_skips_padding():
    case = make_case(layout="vllm_nhd", sharer_layout="hf", seed=3, padding=3)
    valid = case.receiver_slots >= 0
    probe = torch.randn(len(case.fusers), len(case.receiver_slots), case.weights.receiver_width,
                        generator=torch.Generator().manual_seed(0))
    w = leaves(case.weights)
    out = fuse_caches(case.receiver_caches, case.sharer_caches, case.receiver_slots, case.sharer_slots, w,
                      case.fusers, training=False)
    (out * probe).sum().backward()
    out = out.detach()
    assert float(out[:, ~valid].abs().max()) == 0, "padding rows must be zero"
    projection, head_scale = reference.project(case.receiver_caches, case.sharer_caches, case.receiver_slots,
                                                case.sharer_slots, case.weights, case.fusers)
    rows = [reference.gather_rows(v, case.receiver_slots[valid]) for v in case.receiver_caches]
    for i, x in enumerate(rows):
        want = reference.fused_rows(x, projection[i, valid], torch.logit(head_scale[i, valid]), torch.ones(()),
                                    case.weights.receiver_heads)
        torch.testing.assert_close(out[i, valid], want, **FP32_TOL)
    sharer = [reference.gather_rows(v, case.sharer_slots[valid]) for v in case.sharer_caches]
    w_rows = leaves(case.weights)
    (fuse_rows(sharer, rows, w_rows, case.fusers, training=False) * probe[:, valid]).sum().backward()
    for name, g, r in zip(FuserWeights._fields, [t.grad for t in w], [t.grad for t in w_rows]):
        torch.testing.assert_close(g, r, **FP32_TOL, msg=lambda m: f"{name}: {m}")


def test_fuse_caches_errors_name_the_argument():
    case = make_case(seed=1)
    with pytest.raises(ValueError, match="sharer_slots"):
        fuse_caches(case.receiver_caches, case.sharer_caches, case.receiver_slots, case.sharer_slots[:-1],
                    case.weights, case.fusers)
    with pytest.raises(ValueError, match=r"fusers\[1\]"):
        fuse_caches(case.receiver_caches[:2], case.sharer_caches[:2], case.receiver_slots, case.sharer_slots,
                    case.weights, [0, 99])


@pytest.mark.parametrize("call,match", [
    (lambda w, s, x: fuse_rows(s, [t[:, :-1] for t in x], w, [2, 0]), r"receiver_rows\[0\]: width"),
    (lambda w, s, x: fuse_rows(s, x, w, [2, 3]), r"fusers\[1\] = 3"),
    (lambda w, s, x: fuse_rows(s, x[:1], w, [2, 0]), "receiver_rows: 1 entries"),
    (lambda w, s, x: fuse_rows([s[0][:3], s[1]], x, w, [2, 0]), r"sharer_rows\[0\]: 3 tokens"),
    (lambda w, s, x: fuse_rows(s, x, w._replace(w_out=w.w_out[:, 1:]), [2, 0]), "weights.w_out"),
    (lambda w, s, x: fuse_rows(s, x, w, [2, 0], dropout_p=1.0), "dropout_p"),
    (lambda w, s, x: fuse_rows(s, x, w, [2, 0], temperature=0.0), "temperature"),
    (lambda w, s, x: fuse_rows(s, x, w, [2, 0], backend="cuda"), "backend"),
])
def test_errors_name_the_argument(call, match):
    w, s, x, _, _ = make_problem("base")
    with pytest.raises(ValueError, match=match):
        call(w, s, x)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(CUDA, reason="CPU"))])
def test_no_tokens(backend):
    w, s, x, fusers, _ = make_problem("base")
    params = leaves(w)
    out = fuse_rows([t[:0] for t in s], [t[:0] for t in x], params, fusers, backend=backend)
    assert out.shape == (2, 0, w.receiver_width)
    out.sum().backward()
    assert all(float(t.grad.abs().max()) == 0 for t in params)


def test_trainer_schedule_eval_and_export():
    w, s, x, fusers, _ = make_problem("base")
    trainer = FuserTrainer(w, total_steps=10, start_temperature=1.0, end_temperature=0.001)
    assert sorted(n for n, _ in trainer.named_parameters()) == sorted(FuserWeights._fields)
    assert trainer.temperature == 1.0
    trainer.advance(5)
    assert math.isclose(trainer.temperature, 0.001 ** 0.5)
    trainer.advance(100)
    assert math.isclose(trainer.temperature, 0.001)
    assert int(trainer.state_dict()["step"]) == 105
    trainer.eval()
    want = torch.stack([reference.fused_rows(xi, *reference.fuser_forward(si, xi, w, f), w.receiver_heads)
                        for si, xi, f in zip(s, x, fusers)])
    torch.testing.assert_close(trainer(s, x, fusers), want, **FP32_TOL)
    exported = trainer.export(torch.bfloat16)
    assert exported.dtype == torch.bfloat16 and exported.gate_logit.dtype == torch.float32
    torch.testing.assert_close(exported.w_out, w.w_out.bfloat16())
    master = FuserTrainer(w.to(dtype=torch.bfloat16), param_dtype=torch.float32)
    assert master.w_in_sharer.dtype == torch.float32


def synthetic_batches(steps, teacher, tokens, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        s = [torch.randn(tokens, teacher.sharer_width, generator=g) for _ in range(2)]
        x = [torch.randn(tokens, teacher.receiver_width, generator=g) for _ in range(2)]
        target = torch.stack([reference.fused_rows(xi, *reference.fuser_forward(si, xi, teacher, f),
                                                   teacher.receiver_heads) for si, xi, f in zip(s, x, (0, 1))])
        yield s, x, target


def test_short_training_run_matches_reference():
    """Adam on synthetic data (a teacher fuser's outputs): the loss falls, step for step as
    with the reference's autograd from the same start and seeds."""
    teacher = random_weights(2, 2, 8, 4, 8, 32, 32, 3, seed=20)
    start = random_weights(2, 2, 8, 4, 8, 32, 32, 3, seed=21)
    steps, total = 40, 40
    trainer = FuserTrainer(start, dropout_p=0.1, total_steps=total)
    ref_w = leaves(start)
    opt_c2c = torch.optim.Adam(trainer.parameters(), lr=1e-2)
    opt_ref = torch.optim.Adam(list(ref_w), lr=1e-2)
    gen_c2c, gen_ref = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    losses_c2c, losses_ref = [], []
    for step, (s, x, target) in enumerate(synthetic_batches(steps, teacher, 48, seed=1)):
        tau = reference.annealed_temperature(step, total)
        assert math.isclose(trainer.temperature, tau)
        loss = torch.nn.functional.mse_loss(trainer(s, x, [0, 1], generator=gen_c2c), target)
        opt_c2c.zero_grad()
        loss.backward()
        opt_c2c.step()
        trainer.advance()
        losses_c2c.append(loss.item())

        out = []
        for si, xi, f in zip(s, x, (0, 1)):
            y, a, gate = reference.fuser_forward(si, xi, ref_w, f, training=True, dropout_p=0.1, temperature=tau,
                                                 generator=gen_ref)
            out.append(reference.fused_rows(xi, y, a, gate, ref_w.receiver_heads))
        loss = torch.nn.functional.mse_loss(torch.stack(out), target)
        opt_ref.zero_grad()
        loss.backward()
        opt_ref.step()
        losses_ref.append(loss.item())
    first, last = sum(losses_c2c[:5]) / 5, sum(losses_c2c[-5:]) / 5
    assert last < 0.5 * first, f"the loss did not fall: {first:.4g} -> {last:.4g}"
    torch.testing.assert_close(torch.tensor(losses_c2c), torch.tensor(losses_ref), rtol=1e-4, atol=1e-7)
