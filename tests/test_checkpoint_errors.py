"""Every malformed field of a checkpoint directory raises CheckpointError naming the file and
the field: never a raw TypeError / AttributeError / UnicodeDecodeError, never a silent coercion."""
import json
import math
import os

import pytest
import torch

import c2c_kernels as c2c
from c2c_kernels.checkpoint import CheckpointError
from c2c_kernels.testing import SMALL_ARGS, write_published_checkpoint


@pytest.fixture
def ckpt_dir(tmp_path):
    write_published_checkpoint(str(tmp_path), SMALL_ARGS, {3: 1, 4: 2}, seed=3)
    return str(tmp_path)


def _edit_json(ckpt_dir, name, fn):
    path = os.path.join(ckpt_dir, name)
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(fn(data), f)  # allow_nan: NaN is written as the bare literal json.load accepts


def _with_arg(name, value):
    return lambda d: {"class": d["class"], "init_args": dict(d["init_args"], **{name: value})}


@pytest.mark.parametrize("name,value", [
    ("num_layers", "3"), ("num_layers", 3.0), ("num_layers", None), ("num_layers", math.nan),
    ("num_layers", True), ("num_layers", [3]), ("hidden_dim", "64"), ("source_dim", "16"),
    ("target_num_heads", 4.0), ("intermediate_dim", -48), ("source_num_heads", 0),
])
def test_bad_init_arg(ckpt_dir, name, value):
    _edit_json(ckpt_dir, "projector_1.json", _with_arg(name, value))
    with pytest.raises(CheckpointError, match=rf"projector_1\.json: (init_args\.)?{name} is"):
        c2c.load_checkpoint(ckpt_dir)


def test_init_args_not_an_object(ckpt_dir):
    _edit_json(ckpt_dir, "projector_0.json", lambda d: {"class": d["class"], "init_args": [1, 2]})
    with pytest.raises(CheckpointError, match=r"projector_0\.json: missing the 'init_args' object"):
        c2c.load_checkpoint(ckpt_dir)


def test_huge_num_layers_is_refused_quickly(ckpt_dir):
    _edit_json(ckpt_dir, "projector_0.json", _with_arg("num_layers", 10**30))
    with pytest.raises(CheckpointError, match=r"projector_0\.pt: missing keys: num_layers = 1000000000000000000000000000000"):
        c2c.load_checkpoint(ckpt_dir)


@pytest.mark.parametrize("raw,match", [
    (5, r"expected a non-empty object"),
    ([[3, 1, 0]], r"expected a non-empty object"),
    ({"0": [1, 2]}, r"receiver 0's entry is \[1, 2\] \(a list\), expected an object"),
    ({"0": None}, r"receiver 0's entry is None \(a NoneType\), expected an object"),
    ({"0": {"1": 7}}, r"receiver 0, sharer 1's entry is 7 \(a int\), expected an object"),
    ({"0": {"1": {"3": 1}}}, r"receiver layer 3: expected a list of \[sharer_layer, projector\] pairs, got 1"),
    ({"0": {"1": {"3": "10"}}}, r"receiver layer 3: expected a list of \[sharer_layer, projector\] pairs"),
    ({"0": {"1": {"3": [[1, 1.9]]}}}, r"receiver layer 3: projector index is 1\.9 \(a float\)"),
    ({"0": {"1": {"3": [[1, True]]}}}, r"receiver layer 3: projector index is True \(a bool\)"),
    ({"0": {"1": {"3": [[1, 1.0]]}}}, r"receiver layer 3: projector index is 1\.0 \(a float\)"),
    ({"0": {"1": {"3": [[1, None]]}}}, r"receiver layer 3: projector index is None"),
    ({"0": {"1": {"3": [[1, "0"]]}}}, r"receiver layer 3: projector index is '0' \(a str\)"),
    ({"0": {"1": {"3": [[False, 0]]}}}, r"receiver layer 3: sharer layer is False \(a bool\)"),
    ({"0": {"1": {"3": [[2.5, 0]]}}}, r"receiver layer 3: sharer layer is 2\.5 \(a float\)"),
    ({"0": {"1": {"3": [[-1, 0]]}}}, r"receiver layer 3: sharer layer -1 is negative"),
    ({"0": {"1": {"3": []}}}, r"receiver layer 3: empty list"),
    ({"0": {"1": {"3": [[1, 0, 2]]}}}, r"expected \[sharer_layer, projector\] pairs, got \[1, 0, 2\]"),
    ({"0": {"1": {"3.0": [[1, 0]]}}}, r"receiver layer '3\.0' is not an integer"),
    ({"0": {"1": {"-3": [[1, 0]]}}}, r"receiver layer '-3' is not an integer"),
    ({"0": {"1": {" 3": [[1, 0]]}}}, r"receiver layer ' 3' is not an integer"),
    ({"0": {"x": {"3": [[1, 0]]}}}, r"sharer index 'x' is not an integer"),
    ({"true": {"1": {"3": [[1, 0]]}}}, r"receiver index 'true' is not an integer"),
    ({"0": {"1": {"3": [[1, 0]], "03": [[2, 1]]}}}, r"receiver layer 3 appears twice"),
])
def test_bad_layer_map(ckpt_dir, raw, match):
    _edit_json(ckpt_dir, "projector_config.json", lambda d: raw)
    with pytest.raises(CheckpointError, match=r"projector_config\.json: .*" + match):
        c2c.load_checkpoint(ckpt_dir)


def _edit_state(ckpt_dir, i, fn):
    path = os.path.join(ckpt_dir, f"projector_{i}.pt")
    torch.save(fn(torch.load(path)), path)


@pytest.mark.parametrize("key,value,match", [
    ("key_in.bias", [0.0] * 64, r"key_in\.bias is list, expected a tensor"),
    ("value_gate_logit", 1.0, r"value_gate_logit is float, expected a tensor"),
    ("key_proj_out.bias", "zeros", r"key_proj_out\.bias is str, expected a tensor"),
    ("gate_temperature", 1.0, r"gate_temperature is float, expected a tensor"),
    ("key_in.bias", torch.zeros(64, dtype=torch.int32), r"key_in\.bias has dtype torch\.int32"),
    ("value_proj_out.weight", torch.zeros(32, 64, dtype=torch.int64), r"value_proj_out\.weight has dtype torch\.int64"),
    ("key_gate_logit", torch.tensor(True), r"key_gate_logit has dtype torch\.bool"),
    ("value_in.bias", torch.zeros(64, dtype=torch.complex64), r"value_in\.bias has dtype torch\.complex64"),
    ("key_in.bias", torch.zeros(64).to_sparse(), r"key_in\.bias has dtype torch\.float32 \(torch\.sparse_coo\)"),
])
@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
def test_bad_state_value(ckpt_dir, key, value, match):
    """Refused at load, not when the first fuse finds an integer weight."""
    _edit_state(ckpt_dir, 1, lambda s: dict(s, **{key: value}))
    with pytest.raises(CheckpointError, match=r"projector_1\.pt: " + match):
        c2c.load_checkpoint(ckpt_dir)


def test_state_with_non_string_keys(ckpt_dir):
    _edit_state(ckpt_dir, 0, lambda s: dict(s) | {7: torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"projector_0\.pt: state dict keys must be strings, got 7"):
        c2c.load_checkpoint(ckpt_dir)


@pytest.mark.parametrize("name", ["projector_config.json", "projector_0.json", "projector_1.json"])
def test_json_not_utf8(ckpt_dir, name):
    with open(os.path.join(ckpt_dir, name), "wb") as f:
        f.write(b'{"0": "\xff\xfe caf\xe9"}')
    with pytest.raises(CheckpointError, match=rf"{name.replace('.', '[.]')}: not valid UTF-8"):
        c2c.load_checkpoint(ckpt_dir)


def test_json_nested_too_deeply(ckpt_dir):
    with open(os.path.join(ckpt_dir, "projector_config.json"), "w") as f:
        f.write("[" * 200000)
    with pytest.raises(CheckpointError, match=r"projector_config\.json: not valid JSON"):
        c2c.load_checkpoint(ckpt_dir)


def test_float64_weights_refused_at_load(ckpt_dir):
    """The backends take fp32/fp16/bf16 only, so float64 is refused when loading, not at fuse."""
    with pytest.raises(ValueError, match=r"dtype: expected None or one of .* got torch\.float64"):
        c2c.load_checkpoint(ckpt_dir, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"dtype: expected None or one of .* got 'bf16'"):
        c2c.load_checkpoint(ckpt_dir, dtype="bf16")
    ckpt = c2c.load_checkpoint(ckpt_dir)
    with pytest.raises(ValueError, match=r"dtype: .* got torch\.float64"):
        ckpt.to(dtype=torch.float64)
    with pytest.raises(ValueError, match=r"weights: dtype torch\.float64 is not supported"):
        c2c.make_checkpoint(ckpt.weights.to(dtype=torch.float64), {3: 1, 4: 2}, sharer_heads=2)
    # A checkpoint stored in float64 (what the research code can write) needs dtype= ...
    _edit_state(ckpt_dir, 0, lambda s: {k: v.double() for k, v in s.items()})
    _edit_state(ckpt_dir, 1, lambda s: {k: v.double() for k, v in s.items()})
    with pytest.raises(CheckpointError, match=r"projector_0\.pt: key_in\.weight is torch\.float64, .*load with dtype="):
        c2c.load_checkpoint(ckpt_dir)
    # ... and loads with it, gates exact.
    cast = c2c.load_checkpoint(ckpt_dir, dtype=torch.float32)
    assert cast.weights.dtype == torch.float32 and cast.weights.gate_logit.dtype == torch.float32
    for a, b in zip(cast.weights, ckpt.weights):
        torch.testing.assert_close(a, b)


def test_mixed_dtypes_need_a_cast(ckpt_dir):
    _edit_state(ckpt_dir, 1, lambda s: {k: v.half() for k, v in s.items()})
    with pytest.raises(CheckpointError, match=r"projector_1\.pt: key_in\.weight is torch\.float16, but .*"
                                              r"projector_0\.pt: key_in\.weight is torch\.float32"):
        c2c.load_checkpoint(ckpt_dir)
    assert c2c.load_checkpoint(ckpt_dir, dtype=torch.bfloat16).weights.dtype == torch.bfloat16


def test_tiny_gate_logit_survives_a_16_bit_cast(ckpt_dir):
    """Gate logits stay fp32 whatever dtype= says: a cast to fp16 would flush 1e-10 to 0 (closed)."""
    _edit_state(ckpt_dir, 0, lambda s: dict(s, key_gate_logit=torch.tensor(1e-10)))
    ckpt = c2c.load_checkpoint(ckpt_dir, dtype=torch.float16)
    assert ckpt.gate_open[0] and ckpt.weights.gate_logit.dtype == torch.float32


# Values that a hand-edited or corrupted file may hold where an integer or an object belongs.
WEIRD = [None, True, False, 1.5, 2.0, math.nan, math.inf, "3", "", [], [1], {}, {"a": 1}, -1, 0, 10**30]


def _leaves(node, path=()):
    yield path
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, path + (i,))


def _set(node, path, value):
    if not path:
        return value
    node = json.loads(json.dumps(node))
    target = node
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = value
    return node


@pytest.mark.parametrize("name", ["projector_0.json", "projector_config.json"])
def test_no_raw_exception_escapes(ckpt_dir, name):
    """Every position of the json, replaced by every odd value: the load succeeds or raises
    CheckpointError naming the file (a loop over cases, not hypothesis: it is not installed)."""
    path = os.path.join(ckpt_dir, name)
    with open(path) as f:
        original = json.load(f)
    tried = 0
    for leaf in _leaves(original):
        for value in WEIRD:
            with open(path, "w") as f:
                json.dump(_set(original, leaf, value), f)
            try:
                c2c.load_checkpoint(ckpt_dir)
            except CheckpointError as e:
                assert name in str(e) or "projector_0.pt" in str(e), (leaf, value, e)
            tried += 1
    assert tried > 100
