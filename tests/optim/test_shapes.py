"""Per-leaf shape (and dtype/device) checks before any kernel runs (issue 9 point 1): a grad
of the wrong shape must raise naming the first bad path, never corrupt memory or broadcast
silently — on every update path (each transform, apply_updates(_), fused, donated or not)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import optree
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from optim_trees import make_tree, tree_specs

from fsharding import optim
from fsharding import tree as tree_lib
from fsharding.optim import _leaves

P = {"a": torch.ones(2), "w": torch.ones(3)}


def _grads(w_shape):
    return {"a": torch.ones(2), "w": torch.ones(w_shape)}


# every exported transform / alias that sees a per-leaf tree besides the updates
TXS = {
    "adam": lambda: optim.adam(0.1),
    "adamw": lambda: optim.adamw(0.1, weight_decay=0.1),
    "adam_eps_root": lambda: optim.adam(0.1, eps_root=1e-8),  # the foreach fallback
    "sgd": lambda: optim.sgd(0.1),
    "sgd_momentum": lambda: optim.sgd(0.1, momentum=0.9, nesterov=True),
    "lion": lambda: optim.lion(0.1),
    "lamb": lambda: optim.lamb(0.1),
    "scale_by_adam": lambda: optim.scale_by_adam(),
    "scale_by_lion": lambda: optim.scale_by_lion(),
    "trace": lambda: optim.trace(0.9),
    "add_decayed_weights": lambda: optim.add_decayed_weights(0.1),
    "scale_by_trust_ratio": lambda: optim.scale_by_trust_ratio(),
    "apply_if_finite": lambda: optim.apply_if_finite(optim.adam(0.1), 2),
    "clip_adamw": lambda: optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(0.1)),
}


@pytest.mark.parametrize("donate", [False, True], ids=["plain", "donated"])
@pytest.mark.parametrize("shape", [(1,), (1000,), (3, 1)], ids=["bcast", "big", "2d"])
@pytest.mark.parametrize("name", sorted(TXS))
def test_wrong_grad_shape_raises_naming_the_path(name, shape, donate):
    tx = TXS[name]()
    state = tx.init(P)
    g = _grads(shape)
    before = {k: v.clone() for k, v in g.items()}
    with optim.donation() if donate else _null():
        with pytest.raises(ValueError) as e:
            tx.update(g, state, P)
    msg = str(e.value)
    assert "['w']" in msg and str(tuple(shape)) in msg and "(3,)" in msg, msg
    api = {"clip_adamw": "optim.chain", "apply_if_finite": "optim.adam"}.get(name, name)
    assert msg.startswith(f"optim.{api.split('_')[0]}".replace("optim.optim.", "optim.")), msg
    assert all(torch.equal(g[k], before[k]) for k in g)  # nothing ran


@pytest.mark.parametrize("fn", ["apply_updates", "apply_updates_"])
@pytest.mark.parametrize("shape", [(1,), (2, 3), (1000,)])
def test_apply_updates_refuses_other_shapes(fn, shape):
    p = {"a": torch.ones(2), "w": torch.ones(3)}
    with pytest.raises(ValueError, match=rf"optim\.{fn}: updates leaf \['w'\] has shape"):
        getattr(optim, fn)(p, _grads(shape))
    assert torch.equal(p["w"], torch.ones(3))


def test_apply_updates_refuses_float_updates_into_integer_params():
    with pytest.raises(TypeError, match=r"params leaf \['n'\] is torch.int64"):
        optim.apply_updates({"n": torch.tensor([1, 2])}, {"n": torch.tensor([0.4, 0.4])})


def test_state_of_other_shapes_raises():
    tx = optim.adam(0.1)
    state = tx.init({"a": torch.ones(2), "w": torch.ones(4)})
    with pytest.raises(ValueError, match=r"state.mu leaf \['w'\] has shape \(4,\)"):
        tx.update(_grads((3,)), state, P)


def test_params_of_other_shapes_raise_in_adamw():
    tx = optim.adamw(0.1)
    state = tx.init(P)
    with pytest.raises(ValueError, match=r"params leaf \['w'\] has shape \(4,\)"):
        tx.update(_grads((3,)), state, {"a": torch.ones(2), "w": torch.ones(4)})


def test_check_is_cheap_on_100_leaves():
    import time

    params = {f"l{i}": torch.zeros(4) for i in range(100)}
    grads = {k: torch.ones(4) for k in params}
    gl = list(grads.values())
    pl = list(params.values())
    t0 = time.perf_counter()
    for _ in range(200):
        _leaves.check_leaves("optim.adam", gl, pl, grads, ("updates", "params"))
    per = (time.perf_counter() - t0) / 200
    assert per < 2e-3, per  # measured ~30 us per 100 leaves


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_oversized_grad_in_a_subprocess_raises_instead_of_corrupting_memory():
    code = textwrap.dedent(
        """
        import torch
        from fsharding import optim
        p = {"w": torch.ones(3)}
        tx = optim.adam(0.1)
        s = tx.init(p)
        for _ in range(20):
            try:
                tx.update({"w": torch.ones(100_000)}, s, p)
            except ValueError as e:
                msg = str(e)
            else:
                raise SystemExit("no error")
        print("OK", msg)
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("OK"), (r.returncode, r.stdout, r.stderr)
    assert "['w']" in r.stdout


@given(spec=tree_specs, data=st.data())
def test_any_bad_leaf_is_named_property(spec, data):
    """For a random tree and a random leaf given a wrong shape, every alias raises naming
    exactly that leaf's path (never a broadcast, never a crash)."""
    params = make_tree(spec, 0, torch.float32)
    paths = [p for p, _ in tree_lib.leaves_with_path(params)]
    if not paths:
        return
    i = data.draw(st.integers(0, len(paths) - 1))
    grads = make_tree(spec, 1, torch.float32)
    flat, treedef = optree.tree_flatten(grads)
    bad = flat[i]
    flat[i] = torch.ones(*bad.shape, 2) if data.draw(st.booleans()) else torch.ones(bad.numel() + 1)
    grads = optree.tree_unflatten(treedef, flat)
    name = data.draw(st.sampled_from(sorted(TXS)))
    tx = TXS[name]()
    with pytest.raises(ValueError) as e:
        tx.update(grads, tx.init(params), params)
    assert f"leaf {paths[i]} has shape {tuple(flat[i].shape)}" in str(e.value), str(e.value)
