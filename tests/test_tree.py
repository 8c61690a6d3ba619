"""tree: flattening, refusals with key paths, aliasing rules, skeleton validation."""

from __future__ import annotations

import collections
import enum
import re

import numpy as np
import pytest
import torch

import aptckpt
from aptckpt import tree
from aptckpt.errors import FormatError, UnsupportedObjectError


def roundtrip(state):
    flat = tree.flatten(state)
    return tree.rebuild(flat.skeleton, [leaf.tensor for leaf in flat.tensors])


@pytest.mark.parametrize(
    ("state", "path"),
    [
        ({"a": {1, torch.ones(1)}}, "state['a']"),
        ({"a": [np.array(["x"])]}, "state['a'][0]"),
        ({"a": [np.ones(2, dtype=">f8")]}, "state['a'][0]"),
        ({"a": np.longdouble(1)}, "state['a']"),
        ({"opt": {"state": {0: object()}}}, "state['opt']['state'][0]"),
        ({"nt": collections.namedtuple("P", "x")(1)}, "state['nt']"),
        ({"dd": collections.defaultdict(lambda: 0)}, "state['dd']"),
        (
            {"q4": torch.quantize_per_tensor(torch.ones(2, 2), 1.0, 0, torch.quint4x2).t()},
            "state['q4']",
        ),
        ({"m": torch.empty(2, device="meta")}, "state['m']"),
        ({"int4": torch.empty(2, dtype=torch.int4)}, "state['int4']"),
        ({"fn": len}, "state['fn']"),
        ({"mod": torch.nn.Linear(1, 1)}, "state['mod']"),
        ({("a",): {torch.ones(1).data_ptr(): [slice(1)]}}, "state[('a',)]"),
    ],
)
def test_refuses_unstorable_objects_with_key_path(state, path):
    with pytest.raises(UnsupportedObjectError, match=re.escape(path)) as info:
        tree.flatten(state)
    assert info.value.key_path.startswith(path)


def test_refuses_tensor_as_dict_key_and_cycles_and_deep_nesting():
    with pytest.raises(UnsupportedObjectError, match="dict key"):
        tree.flatten({torch.ones(1): 1})
    cyclic: list = []
    cyclic.append(cyclic)
    with pytest.raises(UnsupportedObjectError, match="cycle"):
        tree.flatten({"c": cyclic})
    deep: list = []
    node = deep
    for _ in range(300):
        node.append([])
        node = node[0]
    with pytest.raises(UnsupportedObjectError, match="nesting deeper"):
        tree.flatten(deep)


def test_error_message_names_the_fix():
    with pytest.raises(UnsupportedObjectError, match="supported: dict"):
        tree.flatten({"x": object()})
    with pytest.raises(UnsupportedObjectError, match="materialise"):
        tree.flatten({"x": torch.ones(2, device="meta")})
    with pytest.raises(UnsupportedObjectError, match=r"_asdict\(\)"):
        tree.flatten({"x": collections.namedtuple("P", "x")(1)})
    with pytest.raises(UnsupportedObjectError, match="builtin type"):
        tree.flatten({"x": collections.defaultdict(lambda: 0)})


def test_subclasses_of_plain_types_store_their_value():
    class Color(enum.IntEnum):
        RED = 3

    out = roundtrip({"enum": Color.RED, "b": True})
    assert out == {"enum": 3, "b": True}
    assert type(out["enum"]) is int and type(out["b"]) is bool


def test_big_ints_beyond_4300_digits():
    huge = 7**20000  # str() of this exceeds Python's default digit limit
    assert roundtrip([huge, -huge, 2**64, -(2**63) - 1]) == [huge, -huge, 2**64, -(2**63) - 1]


def test_same_object_and_equal_views_alias_others_do_not():
    w = torch.randn(4, 4)
    a, b = w.detach(), w.detach()  # two objects, same memory and view: tied weights
    flat = tree.flatten({"a": a, "b": b, "c": w[:2], "d": w.t(), "e": w})
    assert len(flat.tensors) == 3  # {a, b, e}, w[:2], w.t()
    assert [leaf.key_path for leaf in flat.tensors] == ["state['a']", "state['c']", "state['d']"]


def test_an_alias_is_found_among_every_tensor_that_starts_at_its_address():
    w = torch.randn(4, 4)
    state = {
        "w": w,
        "flat": w.view(16),  # same start, other shape
        "t": w.t(),  # same start, other strides
        "ints": w.view(torch.int32),  # same start and shape, other dtype
        "grad": w.detach().requires_grad_(),  # other requires_grad
        "again": [w.view(16), (w.t(), w.view(torch.int32))],  # aliases of the 2nd..4th
        "tail": w[1:],  # another start
    }
    flat = tree.flatten(state)
    assert [leaf.key_path for leaf in flat.tensors] == [
        "state['w']",
        "state['flat']",
        "state['t']",
        "state['ints']",
        "state['grad']",
        "state['tail']",
    ]
    again = flat.skeleton[1][11][1]
    assert again[0] == ["tensor", 1] and again[1][1] == [["tensor", 2], ["tensor", 3]]


def test_an_empty_tensor_reached_twice_is_one_tensor():
    e = torch.empty(0)
    flat = tree.flatten({"a": e, "b": e, "c": torch.empty(0)})
    assert [leaf.key_path for leaf in flat.tensors] == ["state['a']", "state['c']"]


def test_a_per_rank_tensor_is_never_an_alias_of_a_shared_one():
    w = torch.randn(3)
    state = {"w": w, "mine": aptckpt.per_rank([w, w.detach()]), "again": w.detach()}
    flat = tree.flatten(state, sharding=lambda t, path: None)
    assert [leaf.key_path for leaf in flat.tensors] == ["state['w']", "state['mine'][0]"]
    assert flat.ranked == frozenset({1})


def test_empty_tensors_never_alias_by_pointer():
    flat = tree.flatten([torch.empty(0), torch.empty(0, 3)])
    assert len(flat.tensors) == 2


def test_parameter_is_flagged():
    p = torch.nn.Parameter(torch.ones(2))
    (leaf,) = tree.flatten({"p": p}).tensors
    assert leaf.is_parameter


def test_ordered_dict_metadata_kept():
    sd = torch.nn.BatchNorm1d(3).state_dict()
    out = roundtrip(sd)
    assert type(out) is collections.OrderedDict
    assert out._metadata == sd._metadata


@pytest.mark.parametrize(
    "skeleton",
    [
        ["nope", 1],
        ["tensor", 5],
        ["tensor", True],
        ["dict", [1]],
        ["dict", [["list", []], 1]],
        ["dtype", "float99"],
        ["int", "zz"],
        ["size", ["a"]],
        {"a": 1},
        [],
        ["list"],
    ],
)
def test_rebuild_rejects_malformed_skeletons(skeleton):
    with pytest.raises(FormatError):
        tree.rebuild(skeleton, [torch.ones(1)] if skeleton == ["tensor", 5] else [])


def test_rebuild_rejects_unreferenced_tensor():
    with pytest.raises(FormatError, match="never referenced"):
        tree.rebuild(["list", []], [torch.ones(1)])


def test_key_paths_never_raise_on_garbage():
    assert tree.key_paths(["dict", ["a", ["tensor", 0], "b"]], 2) == ["state['a']", "tensor #1"]
    assert tree.key_paths({"x": 1}, 1) == ["tensor #0"]


def test_conjugate_and_negative_views_are_not_aliases_of_their_base():
    x = torch.randn(3, dtype=torch.complex64)
    flat = tree.flatten({"x": x, "xc": x.conj(), "xn": torch._neg_view(x), "x2": x.detach()})
    assert len(flat.tensors) == 3  # x and x.detach() are one tensor; the lazy views are not


def test_select_rank_picks_each_ranks_value_and_falls_back_to_rank_0():
    skeleton = [
        "dict",
        ["a", ["ranks", [1, 2]], "b", ["list", [["ranks", [["tensor", 0], ["tensor", 1]]]]]],
    ]
    assert tree.select_rank(skeleton, 1) == (
        ["dict", ["a", 2, "b", ["list", [["tensor", 1]]]]],
        False,
    )
    assert tree.select_rank(skeleton, 5) == (
        ["dict", ["a", 1, "b", ["list", [["tensor", 0]]]]],
        True,
    )
    assert tree.skeleton_version(skeleton) == 4
    assert tree.key_paths(skeleton, 2) == ["state['b'][0]@rank0", "state['b'][0]@rank1"]


def test_per_rank_is_transparent_without_a_process_group():
    flat = tree.flatten({"r": aptckpt.per_rank(3), "t": aptckpt.PerRank(torch.ones(1))})
    assert flat.skeleton == ["dict", ["r", 3, "t", ["tensor", 0]]]
    assert flat.ranked == frozenset()
