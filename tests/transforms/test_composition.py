"""Random nestings of remat, offload, amp and accumulate equal the plain function's loss and
grads, and each layer visibly did its work.

Each transform is a rewrite (DESIGN.md, principle 2), so any nesting of them computes the
untransformed function's loss and grads:

* without a half-precision amp: equal to the plain float32 function to float32 accumulation
  order (rtol 1e-5, atol 1e-6; remat and offload alone are bitwise, accumulate reorders sums);
* with amp in bf16 / fp16 somewhere in the nesting: within amp's stated error of the plain
  function run in **float64** (``test_amp.TOLERANCE``): loss within 1e-2 / 1e-3 relative,
  all grads together within 5e-2 / 1e-2 relative L2 (each leaf's error counted against the
  norm of all grads, so a tiny leaf does not need digits it never had).

Proof of work, so that an identity implementation of a layer fails: a remat that saves less
than everything runs the function again in backward; an offload that is not inside such a
remat moves saved tensors (counted by ``offload._recording``); a half-precision amp is
farther from float64 than float32 rounding could explain (> 1e-5 relative). (An offload
right around a recomputing remat has nothing to move: the region keeps only its inputs,
the offload's own arguments, unless an amp outside passes in cast copies of the params.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import fsharding as fs
from fsharding.transforms.offload import _recording

POLICIES = [
    fs.policies.nothing_saveable,
    fs.policies.dots_saveable,
    fs.policies.everything_saveable,  # calls the function unchanged: no recomputation
]
# amp's stated error against float64 (tests/transforms/test_amp.py: TOLERANCE):
# (loss relative, grads relative L2 over all params)
HALF_TOLERANCE = {"bf16": (1e-2, 5e-2), "fp16": (1e-3, 1e-2)}
FP32_TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def loss_fn(p, batch, calls=None):
    if calls is not None:
        calls.append(1)
    h = F.layer_norm(batch["x"] @ p["w1"] + p["b1"], (p["b1"].shape[0],))
    h = torch.tanh(h) @ p["w2"]
    return F.cross_entropy(h, batch["y"])


def problem(seed, rows, d, h, c):
    g = torch.Generator().manual_seed(seed)
    params = {
        "w1": torch.randn(d, h, generator=g) / d**0.5,
        "b1": torch.randn(h, generator=g) * 0.1,
        "w2": torch.randn(h, c, generator=g) / h**0.5,
    }
    batch = {"x": torch.randn(rows, d, generator=g), "y": torch.randint(0, c, (rows,), generator=g)}
    return params, batch


@st.composite
def nestings(draw):
    layers = draw(
        st.lists(st.sampled_from(["remat", "offload_cpu", "offload_dir", "amp"]), max_size=4)
    )
    return layers, draw(st.integers(0, 2)), draw(st.sampled_from(["fp32", "bf16", "fp16"]))


def build(layers, policy_i, amp_policy, tmp_path_factory, calls):
    """The nesting (``layers`` innermost first) around ``loss_fn``, and what it must show."""
    f = lambda p, batch: loss_fn(p, batch, calls)  # noqa: E731
    # saves: the nesting so far saves tensors it made itself. offload copies every saved
    # tensor except autograd leaves (params, the batch) and params' views; so an offload
    # right around a recomputing remat (which keeps only its inputs) has nothing to move,
    # unless an amp outside it passes in cast copies of the params ("waiting").
    recomputes = offloads = waiting = False
    saves, half = True, None
    for layer in layers:  # innermost first
        if layer == "remat":
            f = fs.remat(f, policy=POLICIES[policy_i])
            if POLICIES[policy_i] is not fs.policies.everything_saveable:
                recomputes = True
                saves = False  # only the region's inputs: the arguments
                offloads = waiting = False  # an offload inside a recomputed region: no effect
        elif layer.startswith("offload"):
            to = "cpu" if layer == "offload_cpu" else tmp_path_factory.mktemp("offload")
            f = fs.offload(f, to=to)
            offloads |= saves
            waiting |= not saves
        elif amp_policy == "fp32":
            f = fs.amp(f, policy=amp_policy)  # casts float32 arguments to themselves
        else:
            f = fs.amp(f, policy=amp_policy)
            saves, half = True, amp_policy  # the casts it makes are saved inside
            offloads |= waiting
    return f, recomputes, offloads, half


def _flat(grads, names):
    return torch.cat([grads[k].double().flatten() for k in names])


@given(nestings(), st.sampled_from([1, 2, 4]), st.integers(0, 10**6))
def test_random_nestings_equal_plain_loss_and_grads(tmp_path_factory, nesting, k, seed):
    layers, policy_i, amp_policy = nesting
    params, batch = problem(seed, rows=8, d=5, h=8, c=3)
    calls = []
    f, recomputes, offloads, half = build(layers, policy_i, amp_policy, tmp_path_factory, calls)
    grad_fn = fs.accumulate(fs.value_and_grad(f), steps=k)
    with _recording() as log:
        loss, grads = grad_fn(params, batch)

    assert loss.dtype == torch.float32
    assert all(grads[n].dtype == params[n].dtype for n in params)
    # proof of work
    assert len(calls) == (2 * k if recomputes else k), (layers, len(calls))
    assert (len(log) > 0) == offloads, (layers, log)

    names = sorted(params)
    if half is None:
        ref_loss, ref_grads = fs.value_and_grad(loss_fn)(params, batch)
        torch.testing.assert_close(loss, ref_loss, **FP32_TOLERANCE)
        for n in names:
            torch.testing.assert_close(grads[n], ref_grads[n], **FP32_TOLERANCE)
        return
    params64 = fs.tree.map(torch.Tensor.double, params)
    batch64 = {"x": batch["x"].double(), "y": batch["y"]}
    ref_loss, ref_grads = fs.value_and_grad(loss_fn)(params64, batch64)
    loss_tol, grad_tol = HALF_TOLERANCE[half]
    assert abs(loss.double() - ref_loss).item() <= loss_tol * abs(ref_loss.item())
    ref_norm = _flat(ref_grads, names).norm().item()
    for n in names:  # each leaf, against the norm of all grads
        err = (grads[n].double() - ref_grads[n]).norm().item()
        assert err <= grad_tol * ref_norm, (n, err / ref_norm, layers)
    rel = (_flat(grads, names) - _flat(ref_grads, names)).norm().item() / ref_norm
    assert 1e-5 < rel <= grad_tol, (rel, layers)  # and it did compute in half precision


def test_remat_of_amp_and_amp_of_remat_against_float64():
    # The two orders named in DESIGN.md, explicitly, on one problem: the same loss and
    # grads as each other (bitwise: recomputation runs in the forward's precision) and
    # within bf16's stated error of the plain float64 function.
    params, batch = problem(7, rows=16, d=6, h=12, c=4)
    calls = []
    f = lambda p, b: loss_fn(p, b, calls)  # noqa: E731
    a = fs.value_and_grad(fs.remat(fs.amp(f, policy="bf16")))(params, batch)
    assert len(calls) == 2
    b = fs.value_and_grad(fs.amp(fs.remat(f), policy="bf16"))(params, batch)
    assert len(calls) == 4
    plain_amp = fs.value_and_grad(fs.amp(f, policy="bf16"))(params, batch)
    for got in (a, b):
        assert torch.equal(got[0], plain_amp[0])
        assert all(torch.equal(got[1][n], plain_amp[1][n]) for n in params)
    params64 = fs.tree.map(torch.Tensor.double, params)
    ref_loss, ref_grads = fs.value_and_grad(loss_fn)(params64, {**batch, "x": batch["x"].double()})
    names = sorted(params)
    rel = (_flat(a[1], names) - _flat(ref_grads, names)).norm() / _flat(ref_grads, names).norm()
    assert abs(a[0].double() - ref_loss) <= 1e-2 * abs(ref_loss)
    assert 1e-5 < rel.item() <= 5e-2
