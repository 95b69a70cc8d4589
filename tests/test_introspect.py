"""fs.saved_activations / fs.print_saved_activations: what backward keeps, checked against an
independent saved-tensor-hook measurement and hand-computed sizes."""

from __future__ import annotations

import optree
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from fsharding.introspect import SavedActivations, print_saved_activations, saved_activations
from fsharding.transforms import policies as P
from fsharding.transforms.remat import checkpoint_name, remat


def hook_measure(fn, params, *args):
    """Independent reference: unique storages packed by saved-tensor hooks during a plain
    forward, params (and nn.Parameters) excluded; every float argument differentiable."""
    params, args = optree.tree_map(lambda t: t.detach().requires_grad_(), (params, args))
    excluded = {t.untyped_storage().data_ptr() for t in optree.tree_leaves(params)}
    storages = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in excluded and not isinstance(t, nn.Parameter):
            storages[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(params, *args)
    return sum(storages.values())


def mlp(params, x, mask):
    for w, b in params:
        x = F.gelu(F.linear(x, w, b)) * mask
    return F.log_softmax(x, -1).sum()


@given(
    n=st.integers(1, 8),
    widths=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    seed=st.integers(0, 3),
)
def test_totals_match_saved_tensor_hooks_on_plain_functions(n, widths, seed):
    g = torch.Generator().manual_seed(seed)
    dims = [widths[0], *widths]
    params = [
        (torch.randn(o, i, generator=g), torch.randn(o, generator=g))
        for i, o in zip(dims, dims[1:])
    ]
    x, mask = torch.randn(n, dims[0], generator=g), torch.rand(n, 1, generator=g)
    report = saved_activations(mlp, params, x, mask)
    assert report.saved_bytes == hook_measure(mlp, params, x, mask)
    assert report.param_bytes == sum(w.nbytes for w, _ in params)  # biases are not saved
    assert report.offloaded_bytes == report.recomputed_bytes == 0


def test_hand_computed_sizes_and_dedup():
    w, x = torch.randn(6, 6), torch.randn(5, 6)
    # x is saved (for w's grad), tanh saves its output; the second matmul saves that same
    # output again (one storage) and w (a parameter).
    report = saved_activations(lambda w, x: torch.tanh(torch.tanh(x @ w) @ w).sum(), w, x)
    assert report.saved_bytes == 3 * 5 * 6 * 4
    assert report.param_bytes == 6 * 6 * 4
    kinds = [(e.op, e.kind) for e in report.entries]
    assert kinds.count(("tanh", "activation")) == 2 and ("args[1]", "input") in kinds
    # A view keeps its whole storage: slicing a 100-element row still costs 100 floats.
    big = torch.randn(10, 100)
    r = saved_activations(lambda p, big: (big * 2)[:, :1].sin().sum(), {}, big)
    assert r.saved_bytes == big.nbytes  # sin saves a 10-element view of mul's output
    assert [(e.op, e.shape) for e in r.entries] == [("mul", (10, 1))]


def test_remat_statuses_and_totals():
    w, x = torch.randn(16, 16), torch.randn(4, 16)

    def f(w, x):
        h = checkpoint_name(torch.tanh(x @ w), "h")
        return torch.tanh(h @ w).sum()

    plain = saved_activations(f, w, x)
    full = saved_activations(remat(f), w, x)
    named = saved_activations(remat(f, policy=P.save_only_these_names("h")), w, x)
    off = saved_activations(
        remat(
            f,
            policy=P.save_and_offload_only_these_names(
                names_which_can_be_saved=[], names_which_can_be_offloaded=["h"]
            ),
        ),
        w,
        x,
    )
    act = 4 * 16 * 4
    assert plain.saved_bytes == 3 * act and plain.recomputed_bytes == 0
    assert full.saved_bytes == act and full.recomputed_bytes == 2 * act  # x kept; 2 recomputed
    assert named.saved_bytes == 2 * act
    assert [e.op for e in named.entries if e.status == "saved" and e.kind == "activation"] == [
        "checkpoint_name[h]"
    ]
    assert off.saved_bytes == act and off.offloaded_bytes == act
    assert {e.status for e in full.entries} == {"saved", "recomputed"}


def test_params_excluded_including_module_parameters():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    report = saved_activations(lambda p, x: model(x).sum(), {}, x)
    assert report.saved_bytes == 3 * 4 * 4 + 3 * 8 * 4  # x, tanh output
    params = [(e.op, e.shape) for e in report.entries if e.kind == "param"]
    assert params == [("Parameter", (4, 8)), ("Parameter", (8, 2))]  # weights, as w.t()
    assert report.param_bytes == (8 * 4 + 2 * 8) * 4


def test_print_table_and_returned_report(capsys):
    w, x = torch.randn(3, 3), torch.randn(2, 3)
    report = print_saved_activations(lambda w, x: torch.sigmoid(x @ w).sum(), w, x)
    out = capsys.readouterr().out
    assert isinstance(report, SavedActivations)
    assert str(report) == out.rstrip("\n")
    header, rule, *rows, total = out.strip().splitlines()
    assert header.split() == ["op", "shape", "dtype", "bytes", "status", "kind"]
    assert set(rule) == {"-"}
    assert any(r.split()[0] == "sigmoid" and "(2, 3)" in r and "24 B" in r for r in rows)
    assert total.startswith("saved 48 B, offloaded 0 B, recomputed 0 B; parameters 36 B")


def test_caller_tensors_untouched_and_errors():
    w, x = torch.randn(3, 3), torch.randn(2, 3)
    saved_activations(lambda w, x: (x @ w).sum(), w, x)
    assert not w.requires_grad and not x.requires_grad and w.grad is None
    with pytest.raises(TypeError, match="fs.saved_activations: fn must be callable"):
        saved_activations(3, w)
