"""fs.policies: JAX's remat policies answering save / recompute / offload per aten op."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fsharding.transforms import policies as P
from fsharding.transforms.remat import _check_policy, checkpoint_name, remat

aten = torch.ops.aten
NAME = torch.ops.fsharding.checkpoint_name.default
T = torch.ones(2, 2)


class _Ops(TorchDispatchMode):
    """Records the aten ops a function runs below autograd (what a policy is asked about)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def _ops_of(fn, *args) -> list:
    with _Ops() as mode:
        fn(*args)
    return mode.ops


def test_everything_and_nothing():
    for op in (aten.mm.default, aten.gelu.default, NAME):
        assert P.everything_saveable(op, T, T) is True
        assert P.nothing_saveable(op, T, T) is False


DOTS_NO_BATCH = [aten.mm.default, aten.addmm.default, aten.mv.default, aten.addmv.default]
BATCHED = [
    aten.bmm.default,
    aten.baddbmm.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten.convolution.default,
]
# out= overloads (as torch.compile'd code calls them) write a caller's buffer: not saved.
OTHERS = [aten.gelu.default, aten.add.Tensor, aten.native_layer_norm.default, NAME, aten.mm.out]


@pytest.mark.parametrize("op", DOTS_NO_BATCH + BATCHED + OTHERS, ids=str)
def test_dots_policies_by_op(op):
    assert P.dots_saveable(op) is (op in DOTS_NO_BATCH + BATCHED)
    assert P.dots_with_no_batch_dims_saveable(op) is (op in DOTS_NO_BATCH)


def test_dots_see_the_ops_torch_really_runs():
    # What the dispatcher shows for common layers (eager, CPU): a linear on a 3-D input is
    # addmm on a flattened view (no batch dims, as in JAX), q @ k^T is bmm, SDPA is fused.
    x, w = torch.randn(2, 3, 4), torch.randn(5, 4)
    linear_ops = _ops_of(lambda: F.linear(x, w, torch.zeros(5)))
    assert any(P.dots_with_no_batch_dims_saveable(op) for op in linear_ops)
    q = torch.randn(2, 2, 3, 4)
    bmm_ops = _ops_of(lambda: q @ q.transpose(-1, -2))
    assert any(P.dots_saveable(op) for op in bmm_ops)
    assert not any(P.dots_with_no_batch_dims_saveable(op) for op in bmm_ops)
    sdpa_ops = _ops_of(lambda: F.scaled_dot_product_attention(q, q, q))
    assert any(P.dots_saveable(op) for op in sdpa_ops)
    assert not any(P.dots_with_no_batch_dims_saveable(op) for op in sdpa_ops)
    conv_ops = _ops_of(lambda: F.conv1d(torch.randn(1, 2, 5), torch.randn(3, 2, 2)))
    assert any(P.dots_saveable(op) for op in conv_ops)
    gelu_ops = _ops_of(lambda: F.gelu(x))
    assert not any(P.dots_saveable(op) for op in gelu_ops)


def test_name_of():
    assert P.name_of(NAME, T, "h") == "h"
    assert P.name_of(aten.mm.default, T, T) is None


def test_save_only_these_names():
    p = P.save_only_these_names("a", "b")
    assert p(NAME, T, "a") is True and p(NAME, T, "b") is True
    assert p(NAME, T, "c") is False
    assert p(aten.mm.default, T, T) is False  # unnamed values are recomputed


def test_save_any_names_but_these():
    p = P.save_any_names_but_these("a")
    assert p(NAME, T, "a") is False
    assert p(NAME, T, "z") is True
    assert p(aten.mm.default, T, T) is False


def test_save_and_offload_only_these_names():
    p = P.save_and_offload_only_these_names(
        names_which_can_be_saved=["s"], names_which_can_be_offloaded=("o1", "o2")
    )
    assert p(NAME, T, "s") is True
    assert p(NAME, T, "o2") == P.Offloadable("device", "cpu")
    assert p(NAME, T, "other") is False
    assert p(aten.mm.default, T, T) is False


def test_overlapping_names_raise():
    with pytest.raises(ValueError, match=r"must not overlap.*\['b'\]"):
        P.save_and_offload_only_these_names(
            names_which_can_be_saved=["a", "b"], names_which_can_be_offloaded=["b"]
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"offload_src": "cpu"}, "src must be 'device'"),
        ({"offload_dst": "disk"}, "dst must be 'cpu'"),
        ({"names_which_can_be_saved": "abc"}, "got the string 'abc'"),
        ({"names_which_can_be_saved": [1]}, "names must be strings"),
    ],
)
def test_bad_offload_arguments_raise(kwargs, match):
    base = {"names_which_can_be_saved": ["a"], "names_which_can_be_offloaded": ["b"]}
    with pytest.raises((ValueError, TypeError), match=match):
        P.save_and_offload_only_these_names(**{**base, **kwargs})


def test_policies_are_frozen_values():
    p = P.save_only_these_names("a", "b")
    assert p == P.save_only_these_names("b", "a") and hash(p) == hash(
        P.save_only_these_names("a", "b")
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.names = frozenset()
    with pytest.raises(TypeError, match="names must be strings"):
        P.save_only_these_names(3)


def test_check_rejects_non_policies():
    assert _check_policy(None) is P.nothing_saveable
    with pytest.raises(TypeError, match=r"factory.*save_only_these_names\(\.\.\.\)"):
        _check_policy(P.save_only_these_names)
    with pytest.raises(TypeError, match=r"factory.*save_only_these_names\(\.\.\.\)"):
        remat(policy=P.save_only_these_names)
    for bad in (3, "dots_saveable", P.Offloadable):
        with pytest.raises(TypeError, match="policy must be a callable"):
            _check_policy(bad)


def test_custom_policy_sees_names_and_ops():
    # Any callable in the same vocabulary works: here, offload the named value, save mm.
    seen = []

    def policy(op, *args, **kwargs):
        seen.append(P.name_of(op, *args) or str(op))
        if P.name_of(op, *args) == "h":
            return P.Offloadable()
        return op is aten.mm.default

    w = torch.randn(3, 3, requires_grad=True)
    out = remat(lambda w: checkpoint_name(torch.tanh(w @ w), "h").sum(), policy=policy)(w)
    out.backward()
    assert "h" in seen and "aten.mm.default" in seen
    ref = w.detach().requires_grad_()
    torch.tanh(ref @ ref).sum().backward()
    assert torch.equal(w.grad, ref.grad)
