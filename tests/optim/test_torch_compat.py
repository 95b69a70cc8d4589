"""Exact state conversion to/from torch.optim: convert, continue training, compare."""

from __future__ import annotations

import optree
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from optim_trees import bitwise_equal, grads_for, leaves, make_tree, max_rel_err

from fsharding import optim

TOL = 1e-10

OPTIMIZERS = {
    "adam": lambda: optim.adam(1e-2, b1=0.8, eps=1e-7),
    "adamw": lambda: optim.adamw(1e-2, weight_decay=0.2),
    "adamw_mask": lambda: optim.adamw(
        1e-2, weight_decay=0.2, mask=lambda p: optree.tree_map(lambda x: x.ndim > 1, p)
    ),
    "adamw_schedule": lambda: optim.adamw(optim.linear_schedule(1e-2, 1e-3, 12)),
    "sgd": lambda: optim.sgd(0.05),
    "sgd_momentum": lambda: optim.sgd(0.05, momentum=0.9),
    "sgd_nesterov": lambda: optim.sgd(0.05, momentum=0.9, nesterov=True),
    "in_chain": lambda: optim.chain(optim.clip_by_global_norm(1.0), optim.adam(1e-2)),
}
# insertion order differs from optree's sorted order on purpose
SPEC = {"z": (3, 2), "a": (4,), "m": {"y": (2, 2), "b": (5,)}}


def _params(seed=0):
    return make_tree(SPEC, seed)


def _torch_params(params):
    return optree.tree_map(lambda p: torch.nn.Parameter(p.detach().clone()), params)


def _torch_run(tx, opt, tparams, grads, start):
    """Continues a torch optimizer, moving the lr along tx's schedule like fsharding."""
    for k, g in enumerate(grads):
        lr = optim.learning_rate(tx, _fake_state(tx, start + k))
        for group in opt.param_groups:
            group["lr"] = lr
        for p, gg in zip(leaves(tparams), leaves(g)):
            p.grad = gg.clone()
        opt.step()


def _fake_state(tx, count):
    state = tx.init({"x": torch.zeros(1)})
    return optree.tree_map(
        lambda x: count if isinstance(x, int) and not isinstance(x, bool) else x, state
    )


def _fs_run(tx, params, state, grads):
    for g in grads:
        u, state = tx.update(g, state, params)
        params = optim.apply_updates(params, u)
    return params, state


def _clip_if_chain(name, grads):
    # the torch side has no clipping: feed both sides grads already below the clip norm
    return [optree.tree_map(lambda x: x * 0.01, g) for g in grads] if name == "in_chain" else grads


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fsharding_to_torch_continue_training(name):
    tx = OPTIMIZERS[name]()
    params = _params()
    grads = _clip_if_chain(name, grads_for(SPEC, 12, 1))
    params, state = _fs_run(tx, params, tx.init(params), grads[:5])
    sd = optim.to_torch_state_dict(state, params, tx)
    if name.startswith("adam"):  # exact copies, keyed in insertion order
        mu = state[0].mu if name != "in_chain" else state[1][0].mu
        assert torch.equal(sd["state"][0]["exp_avg"], mu["z"])
        assert sd["state"][0]["step"].item() == 5.0
        assert sd["state"][0]["exp_avg"].data_ptr() != mu["z"].data_ptr()
    tparams = _torch_params(params)
    opt = optim.torch_optimizer(tx, tparams)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == optim.learning_rate(tx, state)
    _torch_run(tx, opt, tparams, grads[5:], start=5)
    ours, _ = _fs_run(tx, params, state, grads[5:])
    assert max_rel_err(ours, [p.detach() for p in leaves(tparams)]) < TOL
    assert max_rel_err(params, leaves(ours)) > 1e-4  # training went on


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_torch_to_fsharding_continue_training(name):
    tx = OPTIMIZERS[name]()
    params = _params()
    grads = _clip_if_chain(name, grads_for(SPEC, 12, 2))
    tparams = _torch_params(params)
    opt = optim.torch_optimizer(tx, tparams)
    _torch_run(tx, opt, tparams, grads[:5], start=0)
    now = optree.tree_map(lambda p: p.detach().clone(), tparams)
    state = optim.from_torch_state_dict(opt.state_dict(), now, tx, count=5)
    assert optree.tree_structure(state) == optree.tree_structure(tx.init(now))
    _torch_run(tx, opt, tparams, grads[5:], start=5)
    ours, _ = _fs_run(tx, now, state, grads[5:])
    assert max_rel_err(ours, [p.detach() for p in leaves(tparams)]) < TOL


@settings(max_examples=10)
@given(seed=st.integers(0, 2**16), steps=st.integers(0, 4), name=st.sampled_from(list(OPTIMIZERS)))
def test_state_round_trip_is_exact(seed, steps, name):
    tx = OPTIMIZERS[name]()
    params = _params(seed)
    _, state = _fs_run(tx, params, tx.init(params), grads_for(SPEC, steps, seed))
    sd = optim.to_torch_state_dict(state, params, tx)
    back = optim.from_torch_state_dict(sd, params, tx, count=steps)
    assert bitwise_equal(back, state)


def test_bf16_params_convert_with_their_dtype():
    tx = optim.adamw(1e-2)
    params = {"w": torch.randn(4, 4).to(torch.bfloat16)}
    _, state = _fs_run(tx, params, tx.init(params), [{"w": torch.randn(4, 4).bfloat16()}])
    back = optim.from_torch_state_dict(optim.to_torch_state_dict(state, params, tx), params, tx)
    assert back[0].mu["w"].dtype == torch.bfloat16 and bitwise_equal(back, state)


def test_errors():
    params = _params()
    sgd = optim.sgd(optim.constant_schedule(0.1), momentum=0.9)
    opt = optim.torch_optimizer(sgd, _torch_params(params))
    with pytest.raises(ValueError, match=r"SGD stores no step count .* pass count="):
        optim.from_torch_state_dict(opt.state_dict(), params, sgd)
    assert optim.from_torch_state_dict(opt.state_dict(), params, sgd, count=7)[1].count == 7

    with pytest.raises(ValueError, match=r"eps_root=1e-08 has no torch\.optim equivalent"):
        optim.torch_optimizer(optim.adam(1e-3, eps_root=1e-8), _torch_params(params))
    with pytest.raises(ValueError, match=r"exactly one optimizer built by optim\.adam"):
        optim.torch_optimizer(optim.lion(1e-3), _torch_params(params))

    adam = optim.adam(1e-3)
    other = torch.optim.Adam(leaves(_torch_params(params)), lr=1e-3, betas=(0.5, 0.999))
    with pytest.raises(ValueError, match=r"param group 0 has betas=\(0\.5, 0\.999\) but tx has"):
        optim.from_torch_state_dict(other.state_dict(), params, adam)
    fewer = torch.optim.Adam(leaves(_torch_params(params))[:2], lr=1e-3)
    with pytest.raises(
        ValueError, match=r"param group 0 of state_dict has 2 params, params give 4"
    ):
        optim.from_torch_state_dict(fewer.state_dict(), params, adam)

    tparams = _torch_params(params)
    opt = optim.torch_optimizer(adam, tparams)
    for p in leaves(tparams):
        p.grad = torch.ones_like(p)
    opt.step()
    leaves(tparams)[0].grad = None
    opt.step()  # one param stepped once, the others twice
    with pytest.raises(ValueError, match=r"stepped different numbers of times \(\['a'\]: 1"):
        optim.from_torch_state_dict(opt.state_dict(), params, adam)

    state = adam.init(params)
    with pytest.raises(ValueError, match=r"params and opt_state mu differ .* at \['m'\]"):
        optim.to_torch_state_dict(state, {"z": params["z"], "a": params["a"], "m": {}}, adam)
