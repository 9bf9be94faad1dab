"""Loading, repacking and saving the published fuser format, and every way it can be wrong."""
import copy
import dataclasses
import json
import os
import pickle

import pytest
import torch

import c2c_kernels as c2c
from c2c_kernels.checkpoint import CheckpointError, last_aligned_map
from c2c_kernels.testing import SMALL_ARGS, random_published_state, write_published_checkpoint


@pytest.fixture
def ckpt_dir(tmp_path):
    write_published_checkpoint(str(tmp_path), SMALL_ARGS, {3: 1, 4: 2, 5: 3}, seed=1,
                               gate_logits=[(1.0, 2.0), (-1.0, 0.5), (0.3, -0.2)])
    return str(tmp_path)


def test_load_packs_layers(ckpt_dir):
    ckpt = c2c.load_checkpoint(ckpt_dir)
    assert ckpt.num_projectors == 3
    assert ckpt.weights.num_fusers == 6
    assert [(l.receiver_layer, l.sharer_layer, l.projector) for l in ckpt.layers] == [(3, 1, 0), (4, 2, 1), (5, 3, 2)]
    assert ckpt.gate_open == (True, True, False, True, True, False)
    layer = ckpt.layers[1]
    assert (layer.params.key_fuser, layer.params.value_fuser) == (2, 3)
    assert (layer.params.key_open, layer.params.value_open) == (False, True)
    state = torch.load(os.path.join(ckpt_dir, "projector_1.pt"))
    w = ckpt.weights
    torch.testing.assert_close(torch.cat([w.w_in_sharer[3], w.w_in_receiver[3]], 1), state["value_in.weight"])
    torch.testing.assert_close(w.ffn_w1[2, 1], state["key_proj_mlp2.blocks.0.w1.weight"])
    torch.testing.assert_close(w.head_w2[2], state["key_scalar_mlp2.blocks.0.w2.weight"])


def test_round_trip(ckpt_dir, tmp_path_factory):
    ckpt = c2c.load_checkpoint(ckpt_dir)
    out = str(tmp_path_factory.mktemp("saved"))
    c2c.save_checkpoint(ckpt, out)
    again = c2c.load_checkpoint(out)
    for a, b in zip(ckpt.weights, again.weights):
        assert torch.equal(a, b)
    assert again.mapping == ckpt.mapping and again.projector_args == ckpt.projector_args
    for i in range(3):
        original = torch.load(os.path.join(ckpt_dir, f"projector_{i}.pt"))
        saved = torch.load(os.path.join(out, f"projector_{i}.pt"))
        assert original.keys() == saved.keys()
        for k in original:
            assert torch.equal(original[k].reshape(-1), saved[k].reshape(-1)), k


def test_to_dtype_and_device_keeps_gates_fp32(ckpt_dir):
    ckpt = c2c.load_checkpoint(ckpt_dir, dtype=torch.bfloat16)
    assert ckpt.weights.dtype == torch.bfloat16
    assert ckpt.weights.gate_logit.dtype == torch.float32
    assert ckpt.to(dtype=torch.float16).weights.ffn_w2.dtype == torch.float16
    assert ckpt.to(device="meta").weights.device.type == "meta"
    assert ckpt.gate_open == (True, True, False, True, True, False)


def test_layer_params_are_views_of_the_stacks(ckpt_dir):
    ckpt = c2c.load_checkpoint(ckpt_dir)
    assert ckpt.layers[0].params.weights.w_out.data_ptr() == ckpt.weights.w_out.data_ptr()


def test_last_aligned_map():
    """The research helper's rule: ends aligned, the index clamped into the sharer, so every
    receiver layer is fused (a deeper receiver's first layers all read sharer layer 0)."""
    assert last_aligned_map(28, 24) == {**{l: 0 for l in range(4)}, **{l: l - 4 for l in range(4, 28)}}
    assert last_aligned_map(28, 16)[11] == 0 and last_aligned_map(28, 16)[12] == 0
    assert last_aligned_map(28, 16)[13] == 1 and len(last_aligned_map(28, 16)) == 28
    assert last_aligned_map(2, 3) == {0: 1, 1: 2}
    assert last_aligned_map(28, 36) == {l: l + 8 for l in range(28)}
    assert last_aligned_map(3, 1) == {0: 0, 1: 0, 2: 0}
    assert last_aligned_map(0, 5) == {} and last_aligned_map(5, 0) == {}
    # Only valid partner indices: the map of receiver layers that have a same-offset partner.
    assert last_aligned_map(28, 24, clamp=False) == {l: l - 4 for l in range(4, 28)}
    with pytest.raises(ValueError, match="sharer_layers: expected a non-negative integer"):
        last_aligned_map(4, 2.0)


def _break(ckpt_dir, name, fn):
    path = os.path.join(ckpt_dir, name)
    if name.endswith(".json"):
        with open(path) as f:
            data = json.load(f)
        data = fn(data)
        with open(path, "w") as f:
            json.dump(data, f)
    else:
        torch.save(fn(torch.load(path)), path)
    return path


def test_error_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        c2c.load_checkpoint(str(tmp_path / "nope"))


def test_error_empty_directory(tmp_path):
    with pytest.raises(CheckpointError, match="projector_0.json"):
        c2c.load_checkpoint(str(tmp_path))


def test_error_missing_pt(ckpt_dir):
    os.remove(os.path.join(ckpt_dir, "projector_1.pt"))
    with pytest.raises(CheckpointError, match=r"projector_1\.pt: file not found"):
        c2c.load_checkpoint(ckpt_dir)


def test_error_missing_config(ckpt_dir):
    os.remove(os.path.join(ckpt_dir, "projector_config.json"))
    with pytest.raises(CheckpointError, match=r"projector_config\.json: file not found"):
        c2c.load_checkpoint(ckpt_dir)


def test_error_unknown_class(ckpt_dir):
    _break(ckpt_dir, "projector_0.json", lambda d: dict(d, **{"class": "OtherProjector"}))
    with pytest.raises(CheckpointError, match=r"projector_0\.json: class 'OtherProjector' is not supported"):
        c2c.load_checkpoint(ckpt_dir)


def test_error_missing_init_arg(ckpt_dir):
    """source_dim and target_dim have no default in the research class."""
    _break(ckpt_dir, "projector_0.json", lambda d: {"class": d["class"],
                                                     "init_args": {k: v for k, v in d["init_args"].items() if k != "target_dim"}})
    with pytest.raises(CheckpointError, match=r"init_args lacks \['target_dim'\]"):
        c2c.load_checkpoint(ckpt_dir)


def test_omitted_init_args_take_the_research_defaults(tmp_path):
    """source/target_num_heads 1, intermediate_dim 1024, hidden_dim 1024, num_layers 3 when the
    json omits them, as the research loader does (it calls the class with the stored args)."""
    full = {"source_dim": 16, "target_dim": 8, "source_num_heads": 1, "target_num_heads": 1,
            "hidden_dim": 32, "intermediate_dim": 1024, "num_layers": 3}
    write_published_checkpoint(str(tmp_path), full, {0: 0, 1: 1}, seed=4)
    for i in range(2):
        _break(str(tmp_path), f"projector_{i}.json",
               lambda d: {"class": d["class"], "init_args": {"source_dim": 16, "target_dim": 8, "hidden_dim": 32}})
    ckpt = c2c.load_checkpoint(str(tmp_path))
    w = ckpt.weights
    assert (w.intermediate_dim, w.num_blocks, w.receiver_heads, w.sharer_width, w.hidden_dim) == (1024, 2, 1, 16, 32)
    assert all(dict(args, dropout=None) == dict(full, dropout=None) for args in ckpt.projector_args)
    # A default that disagrees with the stored tensors is a shape error naming the default.
    _break(str(tmp_path), "projector_0.json",
           lambda d: {"class": d["class"], "init_args": {"source_dim": 16, "target_dim": 8}})
    with pytest.raises(CheckpointError, match=r"projector_0\.pt: key_in\.weight has shape \[32, 24\], expected \[1024, 24\]"):
        c2c.load_checkpoint(str(tmp_path))


def test_error_invalid_json(ckpt_dir):
    with open(os.path.join(ckpt_dir, "projector_2.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(CheckpointError, match=r"projector_2\.json: not valid JSON"):
        c2c.load_checkpoint(ckpt_dir)


def test_error_bad_shape(ckpt_dir):
    def shrink(state):
        state["value_proj_out.weight"] = state["value_proj_out.weight"][:-1]
        return state
    _break(ckpt_dir, "projector_2.pt", shrink)
    with pytest.raises(CheckpointError, match=r"projector_2\.pt: value_proj_out\.weight has shape \[31, 64\], expected \[32, 64\]"):
        c2c.load_checkpoint(ckpt_dir)


def test_error_missing_and_unknown_keys(ckpt_dir):
    _break(ckpt_dir, "projector_0.pt", lambda s: {k: v for k, v in s.items() if k != "key_scalar_head.bias"})
    with pytest.raises(CheckpointError, match=r"missing keys \['key_scalar_head.bias'\]"):
        c2c.load_checkpoint(ckpt_dir)
    _break(ckpt_dir, "projector_0.pt", lambda s: dict(random_published_state(SMALL_ARGS), extra=torch.zeros(1)))
    with pytest.raises(CheckpointError, match=r"unexpected keys \['extra'\]"):
        c2c.load_checkpoint(ckpt_dir)


def test_error_not_a_state_dict(ckpt_dir):
    torch.save([1, 2], os.path.join(ckpt_dir, "projector_0.pt"))
    with pytest.raises(CheckpointError, match="expected a state dict"):
        c2c.load_checkpoint(ckpt_dir)


def test_error_corrupt_pt(ckpt_dir):
    with open(os.path.join(ckpt_dir, "projector_0.pt"), "wb") as f:
        f.write(b"garbage")
    with pytest.raises(CheckpointError, match="cannot be read"):
        c2c.load_checkpoint(ckpt_dir)


def test_error_mapping_names_missing_projector(ckpt_dir):
    _break(ckpt_dir, "projector_config.json", lambda d: {"0": {"1": {"3": [[1, 7]]}}})
    with pytest.raises(CheckpointError, match=r"receiver layer 3 names projector 7, but the directory holds projector_0 \.\. projector_2"):
        c2c.load_checkpoint(ckpt_dir)


def test_error_mapping_malformed(ckpt_dir):
    _break(ckpt_dir, "projector_config.json", lambda d: {"0": {"1": {"x": [[1, 0]]}}})
    with pytest.raises(CheckpointError, match="receiver layer 'x' is not an integer"):
        c2c.load_checkpoint(ckpt_dir)
    _break(ckpt_dir, "projector_config.json", lambda d: {"0": {"1": {"3": [[1]]}}})
    with pytest.raises(CheckpointError, match=r"expected \[sharer_layer, projector\] pairs"):
        c2c.load_checkpoint(ckpt_dir)


def test_error_projectors_with_different_shapes(ckpt_dir):
    _break(ckpt_dir, "projector_1.json", lambda d: {"class": d["class"], "init_args": dict(d["init_args"], hidden_dim=32)})
    with pytest.raises(CheckpointError, match=r"projector_1\.json: shapes differ from projector_0"):
        c2c.load_checkpoint(ckpt_dir)


def test_error_too_shallow(ckpt_dir):
    _break(ckpt_dir, "projector_0.json", lambda d: {"class": d["class"], "init_args": dict(d["init_args"], num_layers=2)})
    with pytest.raises(CheckpointError, match="num_layers is 2, expected >= 3"):
        c2c.load_checkpoint(ckpt_dir)


def _paired_dir(ckpt_dir):
    """Receiver layer 3 mapped to two (sharer layer, projector) pairs, as the research format allows."""
    _break(ckpt_dir, "projector_config.json", lambda d: {"0": {"1": {"3": [[1, 0], [3, 2]], "4": [[2, 1]]}}})
    return ckpt_dir


def test_two_pairs_for_one_receiver_layer(ckpt_dir):
    """The research pipeline fuses only the first pair of a receiver layer; pairs="all" keeps
    every pair (in file order) as an explicit option. Both keep the full map for saving."""
    ckpt = c2c.load_checkpoint(_paired_dir(ckpt_dir))
    assert ckpt.pairs == "first"
    assert [(l.receiver_layer, l.sharer_layer, l.projector) for l in ckpt.layers] == [(3, 1, 0), (4, 2, 1)]
    assert ckpt.mapping[0][1][3] == ((1, 0), (3, 2))
    every = c2c.load_checkpoint(ckpt_dir, pairs="all")
    assert [(l.receiver_layer, l.sharer_layer, l.projector) for l in every.layers] == [(3, 1, 0), (3, 3, 2), (4, 2, 1)]
    assert [(l.receiver_layer, l.projector) for l in ckpt.replace(pairs="all").layers] == [(3, 0), (3, 2), (4, 1)]
    # Rounds: no receiver view twice in one op call.
    assert [len(r) for r in ckpt.fusion_plan()] == [3]  # gate of projector 2 is closed for values
    assert [[(e[0], e[3]) for e in r] for r in every.fusion_plan()] == [[(3, 0), (3, 1), (4, 3)], [(3, 4)]]
    with pytest.raises(ValueError, match=r"pairs: expected one of \['first', 'all'\], got 'both'"):
        c2c.load_checkpoint(ckpt_dir, pairs="both")


def test_checkpoint_is_immutable(ckpt_dir):
    """In-place edits of what the fusion plan is derived from raise, naming the way to edit."""
    ckpt = c2c.load_checkpoint(ckpt_dir)
    with pytest.raises(TypeError, match=r"read-only; build an edited checkpoint with ckpt\.replace\(mapping=\.\.\.\)"):
        ckpt.mapping[0][1][5] = [(0, 0)]
    with pytest.raises(TypeError, match="read-only"):
        ckpt.mapping[0][1] = {5: [(0, 0)]}
    with pytest.raises(TypeError, match="read-only"):
        del ckpt.mapping[0]
    with pytest.raises(TypeError, match="read-only"):
        ckpt.projector_args[0]["hidden_dim"] = 32
    with pytest.raises(dataclasses.FrozenInstanceError):
        ckpt.mapping = {}
    with pytest.raises(AttributeError):
        ckpt.mapping[0][1][3].append((0, 0))  # pairs are tuples
    edited = ckpt.replace(mapping={0: {1: {5: [(0, 0)]}}})
    assert [(l.receiver_layer, l.sharer_layer) for l in edited.layers] == [(5, 0)]
    assert [(l.receiver_layer, l.sharer_layer) for l in ckpt.layers] == [(3, 1), (4, 2), (5, 3)]
    with pytest.raises(ValueError, match=r"mapping: receiver layer 5: projector index is 0\.5"):
        ckpt.replace(mapping={0: {1: {5: [(0, 0.5)]}}})
    for clone in (copy.deepcopy(ckpt), pickle.loads(pickle.dumps(ckpt))):
        assert clone.mapping == ckpt.mapping and clone.gate_open == ckpt.gate_open


def test_gate_edited_in_place_is_seen(ckpt_dir):
    """The gate bits are read once, then re-read only when the tensor's version counter moves."""
    ckpt = c2c.load_checkpoint(ckpt_dir)
    assert ckpt.gate_open == (True, True, False, True, True, False)
    with torch.no_grad():
        ckpt.weights.gate_logit[2] = 0.7
        ckpt.weights.gate_logit[0] = -0.7
    assert ckpt.gate_open == (False, True, True, True, True, False)
    assert ckpt.layers[1].params.key_open and not ckpt.layers[0].params.key_open
    # A copy made after the edit (same tensor, newer version) does not reuse the old bits.
    with torch.no_grad():
        ckpt.weights.gate_logit[5] = 1.0
    assert ckpt.replace(pairs="all").gate_open[5]
    # Loaded under inference_mode: the checkpoint owns a gate tensor that tracks versions.
    with torch.inference_mode():
        frozen = c2c.load_checkpoint(ckpt_dir).to(dtype=torch.bfloat16)
        assert frozen.gate_open[2] is False
        frozen.weights.gate_logit[2] = 1.0
        assert frozen.gate_open[2] is True
