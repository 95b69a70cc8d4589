"""fsharding.tree: structure checks name paths, nbytes counts storages once, all_finite."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fsharding import tree


class S(NamedTuple):
    mu: object
    nu: object


def trees(leaf=st.integers(0, 9), depth: int = 3):
    return st.recursive(
        leaf,
        lambda sub: st.one_of(
            st.lists(sub, max_size=3),
            st.dictionaries(st.sampled_from("abcde"), sub, max_size=3),
            st.builds(S, sub, sub),
        ),
        max_leaves=8,
    )


@given(trees())
def test_map_leaves_roundtrip(t):
    doubled = tree.map(lambda x: 2 * x, t)
    assert tree.leaves(doubled) == [2 * x for x in tree.leaves(t)]
    assert tree.unflatten(tree.structure(t), tree.leaves(t)) == t
    assert tree.first_difference(t, doubled) is None


@given(trees(), trees())
def test_first_difference_names_a_real_difference(a, b):
    where = tree.first_difference(a, b)
    same = tree.structure(a) == tree.structure(b)
    assert (where is None) == same
    if not same:
        with pytest.raises(ValueError, match="differ in pytree structure at"):
            tree.check_same_structure(a, b)


def test_first_difference_paths():
    assert tree.first_difference({"a": 1, "b": {"c": 1}}, {"a": 1, "b": {"d": 1}}).startswith(
        "['b']['c']"
    )
    assert tree.first_difference({"w": S(1, [1, 2])}, {"w": S(1, [1, 2, 3])}).startswith(
        "['w'].nu[2]"
    )
    assert tree.first_difference([1, (2,)], [1, [2]]).startswith("[1] (tuple vs list)")
    with pytest.raises(ValueError, match=r"params and grads differ .* at \['x'\]"):
        tree.check_same_structure({"x": 1}, {"x": [1]}, names=("params", "grads"))


def test_map_checks_structure():
    with pytest.raises(ValueError, match=r"\['b'\]"):
        tree.map(lambda x, y: x + y, {"a": 1, "b": 2}, {"a": 1, "c": 2})


def test_leaves_with_path_keystr():
    paths = [p for p, _ in tree.leaves_with_path({"a": [1, S(2, 3)], "b": None})]
    assert paths == ["['a'][0]", "['a'][1].mu", "['a'][1].nu"]


def test_nbytes_counts_each_storage_once():
    w = torch.zeros(10, 10)
    t = {"w": w, "view": w[2:4], "t": w.t(), "b": torch.zeros(3, dtype=torch.float64), "n": 3}
    assert tree.nbytes(t) == 400 + 24
    assert tree.nbytes({}) == 0


@given(st.lists(st.integers(1, 5), min_size=1, max_size=4), st.data())
def test_all_finite(sizes, data):
    leaves = [torch.randn(s) for s in sizes]
    assert bool(tree.all_finite(leaves))
    bad = data.draw(st.sampled_from([float("inf"), float("-inf"), float("nan")]))
    i = data.draw(st.integers(0, len(sizes) - 1))
    leaves[i][data.draw(st.integers(0, sizes[i] - 1))] = bad
    assert not bool(tree.all_finite({"x": leaves, "i": torch.arange(3)}))


def test_all_finite_no_overflow_in_low_precision():
    big = torch.full((1000,), 60000.0, dtype=torch.float16)  # sum would overflow fp16
    assert bool(tree.all_finite([big]))


def test_missing_key_names_the_missing_path_either_way():
    # issue 9: `updates` missing key `b` used to report "differ ... at ['w']"
    params = {"b": 1, "w": 2}
    updates = {"w": 2}
    for a, b, names in (
        (params, updates, ("params", "updates")),
        (updates, params, ("updates", "params")),
    ):
        with pytest.raises(ValueError) as e:
            tree.check_same_structure(a, b, names=names)
        msg = str(e.value)
        assert "at ['b']" in msg and "['w']" not in msg.split(" (")[0], msg
        assert "missing from updates" in msg, msg
    # an extra key is named as extra
    where = tree.first_difference({"w": 1}, {"w": 1, "x": 2}, names=("params", "updates"))
    assert where.startswith("['x']") and "missing from params" in where, where
    # nested, and list lengths
    where = tree.first_difference({"a": {"k": 1, "m": 2}}, {"a": {"m": 2}})
    assert where.startswith("['a']['k']"), where
    assert tree.first_difference([1, 2, 3], [1, 2]).startswith("[2]")


def test_storage_key_and_nbytes_see_the_storage_of_an_empty_view():
    # An empty view keeps its whole storage alive: it is that storage (as before the one
    # storage_key helper), while a fresh empty tensor and a meta tensor have no storage.
    x = torch.zeros(1000)
    assert tree.storage_key(x[5:5]) == tree.storage_key(x) is not None
    assert tree.nbytes({"e": x[5:5]}) == 4000
    assert tree.nbytes({"e": x[5:5], "x": x[1:]}) == 4000
    assert tree.storage_key(torch.zeros(0)) is None
    assert tree.storage_key(torch.empty(3, device="meta")) is None
    assert tree.storage_key(3.0) is None


_FINITE_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64,
                  torch.float8_e4m3fn, torch.float8_e5m2]  # fmt: skip


@given(
    st.lists(
        st.tuples(
            st.sampled_from(_FINITE_DTYPES),
            st.integers(0, 4),
            st.sampled_from([None, float("nan"), float("inf"), float("-inf")]),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_all_finite_empty_and_low_precision_leaves_against_reference(specs):
    # empty leaves (a ZeRO-3 rank's empty shard) and dtypes _foreach_norm lacks (float8)
    leaves = []
    for dtype, n, bad in specs:
        x = torch.linspace(-2, 2, n)
        if bad is not None and n:
            x[n // 2] = bad
        leaves.append(x.to(dtype))
    want = all(bool(torch.isfinite(x if x.is_complex() else x.float()).all()) for x in leaves)
    got = tree.all_finite({"leaves": leaves, "ints": torch.arange(3)})
    assert got.dtype == torch.bool and got.dim() == 0
    assert bool(got) == want


def test_all_finite_one_fused_reduction_for_usual_leaves(monkeypatch):
    calls = []
    norm = torch._foreach_norm

    def counted(tensors, *a):
        calls.append(len(tensors))
        return norm(tensors, *a)

    monkeypatch.setattr(torch, "_foreach_norm", counted)
    leaves = [torch.ones(3), torch.ones(2, dtype=torch.bfloat16), torch.empty(0), torch.ones(1)]
    assert bool(tree.all_finite(leaves)) and calls == [3]  # one op, the empty leaf skipped
    assert bool(tree.all_finite([torch.empty(0, 3)])) and calls == [3]
