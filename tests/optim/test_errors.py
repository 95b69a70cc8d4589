"""Errors a user can act on (issue 9): an uncalled schedule factory as a learning rate raises
at construction; a chain state from another optimizer names the chain and what it expected;
structure errors name the path that actually differs."""

from __future__ import annotations

import pytest
import torch

from fsharding import optim

FACTORIES = [
    optim.cosine_decay_schedule,
    optim.warmup_cosine_decay_schedule,
    optim.linear_schedule,
    optim.constant_schedule,
    optim.exponential_decay,
    optim.piecewise_constant_schedule,
    optim.join_schedules,
]


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    "alias",
    [optim.adam, optim.adamw, optim.sgd, optim.lion, optim.lamb, optim.scale_by_learning_rate],
)
def test_uncalled_schedule_factory_raises_at_construction(alias, factory):
    with pytest.raises(TypeError) as e:
        alias(factory)
    msg = str(e.value)
    assert f"optim.{factory.__name__}" in msg and "call it" in msg, msg
    assert msg.startswith(f"optim.{alias.__name__}:"), msg


def test_scale_by_schedule_refuses_an_uncalled_factory_and_a_bad_schedule():
    with pytest.raises(TypeError, match=r"optim\.scale_by_schedule: .*optim\.linear_schedule"):
        optim.scale_by_schedule(optim.linear_schedule)
    with pytest.raises(TypeError, match=r"schedule\(0\) returned 'x'"):
        optim.adam(lambda step: "x")


def test_a_real_schedule_and_a_tensor_schedule_still_work():
    p = {"w": torch.ones(2)}
    for lr in (optim.cosine_decay_schedule(0.1, 10), lambda s: torch.tensor(0.1)):
        tx = optim.sgd(lr)
        u, _ = tx.update({"w": torch.ones(2)}, tx.init(p), p)
        torch.testing.assert_close(u["w"], torch.full((2,), -0.1))


def test_chain_state_from_another_optimizer_names_the_chain_and_what_it_expected():
    p = {"w": torch.ones(2)}
    g = {"w": torch.ones(2)}
    adamw, lion, sgd = optim.adamw(0.1), optim.lion(0.1), optim.sgd(0.1, momentum=0.9)
    adamw.init(p)
    lion_state = lion.init(p)
    sgd_state = sgd.init(p)
    # same length, other state types: would silently run adamw on lion's momentum
    with pytest.raises(TypeError) as e:
        adamw.update(g, lion_state, p)
    msg = str(e.value)
    assert msg.startswith("optim.adamw:") and "ScaleByAdamState" in msg, msg
    assert "ScaleByLionState" in msg and "another optimizer" in msg, msg
    # other length
    with pytest.raises(ValueError) as e:
        adamw.update(g, sgd_state, p)
    msg = str(e.value)
    assert msg.startswith("optim.adamw:") and "3 states" in msg and "length 2" in msg, msg
    assert "TraceState" in msg, msg
    # a user chain is named as one, with its parts' states
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adam(0.1))
    tx.init(p)
    with pytest.raises(ValueError, match=r"optim\.chain: .*2 states"):
        tx.update(g, sgd_state[:1], p)


def test_missing_update_key_names_it():
    tx = optim.adamw(0.1)
    p = {"b": torch.ones(1), "w": torch.ones(2)}
    s = tx.init(p)
    with pytest.raises(ValueError, match=r"at \['b'\] \(missing from updates"):
        tx.update({"w": torch.ones(2)}, s, p)
    with pytest.raises(ValueError, match=r"at \['b'\] \(missing from updates"):
        optim.apply_updates(p, {"w": torch.ones(2)})
