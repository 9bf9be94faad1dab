"""The reference against an independent formula written straight off the published state dict."""
import pytest
import torch
import torch.nn.functional as F

import c2c_kernels as c2c
from c2c_kernels import reference
from c2c_kernels.testing import SMALL_ARGS, write_published_checkpoint


def independent_fuser(state, side, s, x, args):
    """docs/fuser.md, read literally: concat, Linear, pre-norm FFNs, two branches, hard gate, merge."""
    h = args["hidden_dim"]

    def block(z, prefix):
        normed = F.rms_norm(z, (h,), state[f"{prefix}.norm.weight"], eps=1e-6)
        return z + F.linear(F.gelu(F.linear(normed, state[f"{prefix}.w1.weight"])), state[f"{prefix}.w2.weight"])

    u = F.linear(torch.cat([s, x], -1), state[f"{side}_in.weight"], state[f"{side}_in.bias"])
    u = block(u, f"{side}_mlp1.blocks.0")
    a = F.linear(block(u, f"{side}_scalar_mlp2.blocks.0"), state[f"{side}_scalar_head.weight"],
                 state[f"{side}_scalar_head.bias"])
    p = u
    for b in range(args["num_layers"] - 2):
        p = block(p, f"{side}_proj_mlp2.blocks.{b}")
    y = F.linear(p, state[f"{side}_proj_out.weight"], state[f"{side}_proj_out.bias"])
    gate = 1.0 if state[f"{side}_gate_logit"].item() > 0 else 0.0
    ht = args["target_num_heads"]
    out = x.view(-1, ht, args["target_dim"]) + gate * torch.sigmoid(a).unsqueeze(-1) * y.view(-1, ht, args["target_dim"])
    return out.reshape(x.shape)


@pytest.mark.parametrize("num_layers", [3, 4])
@pytest.mark.parametrize("gates", [(1.0, 1.0), (1.0, -1.0)])
def test_reference_equals_independent_formula(tmp_path, num_layers, gates):
    args = dict(SMALL_ARGS, num_layers=num_layers)
    write_published_checkpoint(str(tmp_path), args, {0: 0}, seed=4, gate_logits=[gates])
    state = torch.load(tmp_path / "projector_0.pt")
    ckpt = c2c.load_checkpoint(str(tmp_path))
    g = torch.Generator().manual_seed(0)
    s = torch.randn(7, 32, generator=g)
    x = torch.randn(7, 32, generator=g)
    for side, fuser in (("key", 0), ("value", 1)):
        y, a, gate = reference.fuser_forward(s, x, ckpt.weights, fuser)
        got = reference.fused_rows(x, y, a, gate, args["target_num_heads"])
        torch.testing.assert_close(got, independent_fuser(state, side, s, x, args), atol=1e-5, rtol=1e-5)


def test_training_mode_is_seeded_and_matches_formula():
    w = c2c.random_weights(1, 2, 4, 2, 4, hidden_dim=16, intermediate_dim=8)
    s, x = torch.randn(5, 8), torch.randn(5, 8)

    def run(seed, **kw):
        return reference.fuser_forward(s, x, w, 0, training=True, generator=torch.Generator().manual_seed(seed), **kw)

    a1, a2, b = run(1), run(1), run(2)
    for t1, t2 in zip(a1, a2):
        assert torch.equal(t1, t2)
    assert not torch.equal(a1[0], b[0]), "different seeds gave the same dropout masks"
    # No dropout: projection and logits equal eval mode, and the gate is the Gumbel-sigmoid formula
    # with the noise drawn from the same generator.
    y, a, gate = run(3, dropout_p=0.0, temperature=0.5)
    y_eval, a_eval, _ = reference.fuser_forward(s, x, w, 0)
    torch.testing.assert_close(y, y_eval)
    torch.testing.assert_close(a, a_eval)
    u = torch.rand(a.shape, generator=torch.Generator().manual_seed(3))
    noise = -torch.log(-torch.log(u + 1e-20) + 1e-20)
    torch.testing.assert_close(gate, torch.sigmoid((w.gate_logit[0] + noise) / 0.5))
    assert gate.shape == a.shape  # one draw per (token, head)


def test_dropout_scales_kept_units():
    z = torch.zeros(4000, 8)
    out = reference.ffn_block(z + 1.0, torch.ones(8), torch.eye(8), torch.eye(8), dropout_p=0.5,
                              generator=torch.Generator().manual_seed(0))
    delta = out - 1.0
    kept = delta != 0
    assert 0.45 < kept.float().mean() < 0.55
    torch.testing.assert_close(delta[kept], torch.full_like(delta[kept], 2 * F.gelu(torch.tensor(1.0)).item()),
                               atol=1e-2, rtol=1e-2)


def test_temperature_schedule_is_geometric():
    assert reference.annealed_temperature(0, 100) == pytest.approx(1.0)
    assert reference.annealed_temperature(100, 100) == pytest.approx(0.001)
    assert reference.annealed_temperature(50, 100) == pytest.approx(0.001 ** 0.5)
    assert reference.annealed_temperature(500, 100) == pytest.approx(0.001)


def test_flops_match_fuser_md():
    """docs/fuser.md: the first pair's fuser (H = I = 1024, n = 3) costs ~17 MFLOP per token and
    holds ~8.5 M parameters."""
    w = c2c.random_weights(1, 2, 64, 8, 128, dtype=torch.bfloat16)
    assert 16e6 < reference.flops_per_token(w) < 18e6
    params = sum(t[0].numel() for t in w)
    assert 8.0e6 < params < 9.0e6
