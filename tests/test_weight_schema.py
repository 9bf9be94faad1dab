"""The fuser weight schema is written once per language: c2c_kernels.weights.FIELDS in Python,
csrc/fuser_weights.h for the native backends. These tests fail when the two disagree, and
when a field is added to the Python schema without everything derived from it following."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from c2c_kernels import ops, reference, weights
from c2c_kernels.checkpoint import SIDES, _expected_shapes
from c2c_kernels.testing import SMALL_ARGS, random_published_state
from c2c_kernels.weights import DIMS, FIELDS, FuserWeights, pack_side, research_dims, unpack_side

HEADER = Path(__file__).resolve().parent.parent / "csrc" / "fuser_weights.h"


def header_fields(text: str) -> list[tuple[str, str, int, bool]]:
    """The X(Enum, name, rank, fp32) entries of C2C_FUSER_WEIGHTS, in order."""
    body = re.search(r"#define C2C_FUSER_WEIGHTS\(X\)(.*?)\n\s*\n", text, re.S)
    assert body, "C2C_FUSER_WEIGHTS not found in csrc/fuser_weights.h"
    entries = re.findall(r"X\(\s*(\w+)\s*,\s*(\w+)\s*,\s*(\d+)\s*,\s*(true|false)\s*\)", body.group(1))
    return [(enum, name, int(rank), fp32 == "true") for enum, name, rank, fp32 in entries]


def python_fields(fields) -> list[tuple[str, str, int, bool]]:
    camel = lambda name: "".join(part[:1].upper() + part[1:] for part in name.split("_"))  # noqa: E731
    return [(camel(f.name), f.name, len(f.shape), f.fp32) for f in fields]


def test_header_matches_python_schema():
    """Same fields, same order (the enum indices), same ranks, same fp32 fields."""
    assert header_fields(HEADER.read_text()) == python_fields(FIELDS)


@pytest.mark.parametrize("change", ["append", "drop", "swap", "fp32", "rank"])
def test_a_one_sided_change_is_caught(change):
    """The comparison above is not vacuous: a field added, removed, reordered or retyped in
    the Python schema only makes it fail."""
    fields = list(FIELDS)
    if change == "append":
        fields.append(weights.Field("w_low_rank", ("P", "H", "I"), "{side}_low_rank.weight"))
    elif change == "drop":
        fields.pop(5)
    elif change == "swap":
        fields[9], fields[10] = fields[10], fields[9]
    elif change == "fp32":
        fields[2] = dataclasses.replace(fields[2], fp32=True)
    else:
        fields[2] = dataclasses.replace(fields[2], shape=("P", "B", "H"))
    assert header_fields(HEADER.read_text()) != python_fields(fields)


def test_rms_eps_is_the_reference_one():
    m = re.search(r"constexpr float kRmsEps = ([0-9.eE+-]+)f;", HEADER.read_text())
    assert m and float(m.group(1)) == reference.RMS_EPS


def test_native_code_names_weights_through_the_header():
    """No native file keeps its own list: the enum lives in fuser_weights.h only, and the CPU
    backend indexes the stacks by name."""
    csrc = HEADER.parent
    for path in [*csrc.rglob("*.h"), *csrc.rglob("*.cu"), *csrc.rglob("*.cpp"), *csrc.rglob("*.cuh")]:
        if path != HEADER:
            assert not re.search(r"\bkWInSharer\s*,\s*kWInReceiver\b", path.read_text()), \
                f"{path} declares its own weight enum"
    fuser = (csrc / "cpu" / "fuser.cpp").read_text()
    assert not re.search(r"\bt\[\d+\]", fuser), "csrc/cpu/fuser.cpp indexes a weight stack by number"


def test_schema_is_self_consistent():
    names = [f.name for f in FIELDS]
    assert FuserWeights._fields == tuple(names) == weights.FIELD_NAMES
    for f in FIELDS:
        assert f.shape[0] == "P" and set(f.shape) <= set(DIMS), f
    for symbol, d in DIMS.items():
        assert weights.FIELD_SHAPES[d.field][d.axis] == symbol, symbol


def test_random_weights_fill_every_field():
    w = weights.random_weights(3, 2, 8, 4, 4, hidden_dim=32, intermediate_dim=24, num_layers=4,
                               dtype=torch.float16)
    ops.check_weights(list(w))  # every field present with the schema's shape and dtype
    assert [t.dtype for t in w] == [torch.float32 if f.fp32 else torch.float16 for f in FIELDS]
    dims = {s: w.dim(s) for s in DIMS}
    assert dims == {"P": 3, "H": 32, "Ks": 16, "B": 3, "I": 24, "Ht": 4, "Kt": 16}


def test_rank_errors_name_the_symbolic_shape():
    """check_weights' rank messages come from the schema's dimension names."""
    w = list(weights.random_weights(2, 2, 8, 4, 4, hidden_dim=32, intermediate_dim=24))
    w[4] = w[4][:, 0]
    with pytest.raises(ValueError, match=r"weights.ffn_w1: expected \[fusers, blocks, intermediate, hidden\], "
                                         r"got \[2, 24, 32\]"):
        ops.check_weights(w)
    w = list(weights.random_weights(2, 2, 8, 4, 4, hidden_dim=32, intermediate_dim=24))
    w[1] = w[1][0]
    with pytest.raises(ValueError, match=r"weights.w_in_receiver: expected \[fusers, hidden, receiver_width\]"):
        ops.check_weights(w)


@pytest.mark.parametrize("num_layers", [3, 5])
def test_published_state_round_trips_through_the_schema(num_layers):
    """Every published key is packed into some field and unpacked back, bit for bit; the test
    checkpoints list exactly the keys the loader expects."""
    args = dict(SMALL_ARGS, num_layers=num_layers)
    state = random_published_state(args, seed=2, gate_logits=(0.25, -1.5))
    expected = _expected_shapes(args)
    assert set(state) - {"gate_temperature"} == set(expected)
    dims = research_dims(args)
    for side in SIDES:
        packed = pack_side(state, side, dims)
        assert [tuple(t.shape) for t in packed] == [tuple(dims[s] for s in f.shape[1:]) for f in FIELDS]
        back = unpack_side(packed, side)
        assert list(back) == [k for k in expected if k.startswith(f"{side}_")]
        for key, t in back.items():
            assert torch.equal(t, state[key].reshape(t.shape)), key
