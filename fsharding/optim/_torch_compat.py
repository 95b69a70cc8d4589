"""Exact conversion of Adam / AdamW / SGD state to and from ``torch.optim``.

The optimizer is the fsharding transform ``tx`` itself (built by ``optim.adam``,
``optim.adamw`` or ``optim.sgd``, possibly inside an ``optim.chain`` with stateless parts such
as ``clip_by_global_norm``): it carries its hyperparameters, so nothing is repeated.

=====================================  =================================================
fsharding                              torch.optim
=====================================  =================================================
``optim.adam(lr, b1, b2, eps)``        ``Adam(lr, betas=(b1, b2), eps=eps)``
``optim.adamw(lr, ..., weight_decay,   ``AdamW(lr, betas, eps, weight_decay)``; with a mask,
mask)``                                two param groups: decayed, then not decayed (wd 0)
``optim.sgd(lr, momentum, nesterov)``  ``SGD(lr, momentum=momentum or 0, nesterov)``
``ScaleByAdamState(count, mu, nu)``    per param ``{"step": float(count), "exp_avg": mu,
                                       "exp_avg_sq": nu}`` (no entry before the first step)
``TraceState(trace)``                  per param ``{"momentum_buffer": trace}``
=====================================  =================================================

**Parameter order.** torch state dicts key params by their index in param-group order.
``params`` is the dict from ``fs.functional`` (keyed like ``named_parameters()``): params are
numbered in its *insertion* order (nested containers walked in insertion order too), within
each param group. Build the torch optimizer with :func:`torch_optimizer` (same groups, same
order) to load a converted state. A schedule has no torch.optim equivalent: the state dict's
``lr`` is the rate the next fsharding update would use (attach a torch LR scheduler to go on
scheduling). Converted tensors are copies: neither side ever aliases the other's state.
"""

from __future__ import annotations

from typing import Any

import optree
import torch

from fsharding import tree as _tree
from fsharding.optim import _checks, _leaves
from fsharding.optim import base as _base
from fsharding.optim._moments import ScaleByAdamState, TraceState
from fsharding.optim._transforms import ScaleByScheduleState

__all__ = ["from_torch_state_dict", "to_torch_state_dict", "torch_optimizer"]

PyTree = Any


# --------------------------------------------------------------------------------------
# finding the optimizer inside tx
# --------------------------------------------------------------------------------------


def _find(tx: _base.GradientTransformation, state: Any, api: str):
    """(recipe, sub_state, replace) for the one adam/adamw/sgd inside ``tx``."""
    found = _search(tx, state)
    if len(found) != 1:
        what = "none" if not found else f"{len(found)}"
        raise ValueError(
            f"{api}: tx must contain exactly one optimizer built by optim.adam, optim.adamw "
            f"or optim.sgd (alone or inside optim.chain), found {what}. Build tx with those "
            "aliases; other transforms have no torch.optim equivalent."
        )
    if found[0][0].get("state_dtype") is not None:
        raise ValueError(
            f"{api}: tx keeps its state in {found[0][0]['state_dtype']} (mu_dtype / "
            "accumulator_dtype), which torch.optim has no option for (its state has the "
            "params' dtype). Build tx without it to convert."
        )
    return found[0]


def _search(tx: Any, state: Any) -> list:
    recipe = getattr(tx.update, "torch_recipe", None)
    if recipe is not None:
        return [(recipe, state, lambda new: new)]
    parts = getattr(tx.update, "parts", None)
    out = []
    for i, part in enumerate(parts or ()):
        sub = state[i] if isinstance(state, tuple) and len(state) == len(parts) else None
        for r, s, rep in _search(part, sub):
            out.append((r, s, _replace_at(state, i, rep)))
    return out


def _replace_at(state: Any, i: int, inner: Any):
    return lambda new: (*state[:i], inner(new), *state[i + 1 :])


# --------------------------------------------------------------------------------------
# parameter order and groups
# --------------------------------------------------------------------------------------


def _insertion_order(tree: PyTree) -> list[int]:
    """Positions of ``tree``'s optree leaves, listed in insertion (named_parameters) order."""
    index = {p: i for i, p in enumerate(optree.tree_paths(tree))}
    order: list[int] = []

    def walk(node: Any, prefix: tuple) -> None:
        if node is not None and optree.tree_structure(node).is_leaf():
            order.append(index[prefix])
            return
        if isinstance(node, dict):
            items = list(node.items())
        else:
            one = optree.tree_flatten_one_level(node)
            items = list(zip(one.entries, one.children))
        for k, child in items:
            walk(child, (*prefix, k))

    walk(tree, ())
    return order


def _groups(recipe: dict, params: PyTree, api: str) -> list[tuple[list[int], dict]]:
    """torch param groups as (optree leaf positions in torch order, group options)."""
    order = _insertion_order(params)
    if recipe["kind"] != "adamw" or recipe["mask"] is None:
        return [(order, {})]
    decays = _checks.mask_leaves(api, recipe["mask"], params)
    groups = [
        ([i for i in order if decays[i]], {}),
        ([i for i in order if not decays[i]], {"weight_decay": 0.0}),
    ]
    return [g for g in groups if g[0]]


def _lr(recipe: dict, sub: Any) -> float:
    lr = recipe["lr"]
    if not callable(lr):
        return float(lr)
    last = sub[-1] if isinstance(sub, tuple) and sub else None
    return float(lr(int(last.count) if isinstance(last, ScaleByScheduleState) else 0))


def _torch_class(recipe: dict, lr: float, api: str):
    kind = recipe["kind"]
    if kind in ("adam", "adamw"):
        if recipe["eps_root"]:
            raise ValueError(
                f"{api}: eps_root={recipe['eps_root']!r} has no torch.optim equivalent; "
                "convert an optimizer built with eps_root=0.0."
            )
        opts = {"lr": lr, "betas": (recipe["b1"], recipe["b2"]), "eps": recipe["eps"]}
        if kind == "adam":
            return torch.optim.Adam, {**opts, "weight_decay": 0.0}
        return torch.optim.AdamW, {**opts, "weight_decay": float(recipe["weight_decay"])}
    momentum = float(recipe["momentum"] or 0.0)
    return torch.optim.SGD, {
        "lr": lr,
        "momentum": momentum,
        "nesterov": recipe["nesterov"] and momentum > 0.0,
    }


def torch_optimizer(
    tx: _base.GradientTransformation, params: PyTree, **torch_kwargs: Any
) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimizer equivalent to ``tx`` over the tensors of ``params``.

    Param groups and order are the ones :func:`to_torch_state_dict` writes (see the module
    docstring); the learning rate is ``lr`` or ``schedule(0)``.

    Args:
        tx: built by ``optim.adam``, ``optim.adamw`` or ``optim.sgd`` (maybe in a chain).
        params: the tensors to optimize (e.g. ``dict(model.named_parameters())``); torch
            steps them in place.
        **torch_kwargs: extra torch options, e.g. ``foreach=True``.

    Example:
        >>> import torch
        >>> from fsharding import optim
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = optim.torch_optimizer(optim.adamw(1e-3), dict(model.named_parameters()))
        >>> type(opt).__name__, opt.param_groups[0]["weight_decay"]
        ('AdamW', 0.0001)
    """
    api = "optim.torch_optimizer"
    recipe, _, _ = _find(tx, None, api)
    leaves = optree.tree_leaves(params)
    cls, opts = _torch_class(recipe, _lr(recipe, None), api)
    groups = [
        {"params": [leaves[i] for i in idx], **extra} for idx, extra in _groups(recipe, params, api)
    ]
    return cls(groups, **{**opts, **torch_kwargs})


# --------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------


def _scalar_dtype() -> torch.dtype:  # torch.optim's dtype for "step"
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def to_torch_state_dict(opt_state: Any, params: PyTree, tx: _base.GradientTransformation) -> dict:
    """``opt_state`` as a state dict for ``torch_optimizer(tx, params).load_state_dict``.

    Args:
        opt_state: ``tx``'s state.
        params: the params ``opt_state`` belongs to (fixes the param order).
        tx: the optimizer (see the module docstring).

    Returns:
        ``{"state": {index: {...}}, "param_groups": [...]}``, the tensors copied.

    Raises:
        ValueError: ``tx`` has no torch equivalent, or state and params differ in structure
            (naming the first differing path).

    Example:
        >>> import torch
        >>> from fsharding import optim
        >>> tx, p = optim.adam(1e-3), {"w": torch.ones(2)}
        >>> _, s = tx.update({"w": torch.ones(2)}, tx.init(p), p)
        >>> sd = optim.to_torch_state_dict(s, p, tx)
        >>> sorted(sd["state"][0]), sd["state"][0]["step"].item()
        (['exp_avg', 'exp_avg_sq', 'step'], 1.0)
    """
    api = "optim.to_torch_state_dict"
    recipe, sub, _ = _find(tx, opt_state, api)
    if sub is None:
        raise ValueError(f"{api}: opt_state does not have the structure of tx.init(params).")
    detached = optree.tree_map(lambda p: p.detach(), params)
    sd = torch_optimizer(tx, detached).state_dict()
    lr = _lr(recipe, sub)
    for g in sd["param_groups"]:
        g["lr"] = lr
    index = [i for idx, _ in _groups(recipe, params, api) for i in idx]
    pl, pdef = optree.tree_flatten(params)
    state: dict[int, dict[str, Any]] = {}
    if recipe["kind"] in ("adam", "adamw"):
        adam = sub[0]
        mu = _leaves.leaves_like(adam.mu, pdef, params, ("params", "opt_state mu"), api, pl)
        nu = _leaves.leaves_like(adam.nu, pdef, params, ("params", "opt_state nu"), api, pl)
        if int(adam.count) > 0:
            for k, i in enumerate(index):
                state[k] = {
                    "step": torch.tensor(float(adam.count), dtype=_scalar_dtype()),
                    "exp_avg": mu[i].detach().clone(),
                    "exp_avg_sq": nu[i].detach().clone(),
                }
    elif isinstance(sub[0], TraceState):
        tr = _leaves.leaves_like(sub[0].trace, pdef, params, ("params", "opt_state trace"), api, pl)
        for k, i in enumerate(index):
            state[k] = {"momentum_buffer": tr[i].detach().clone()}
    return {"state": state, "param_groups": sd["param_groups"]}


def _check_groups(sd: dict, ours: list, recipe: dict, api: str) -> None:
    groups = sd.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(ours):
        got = len(groups) if isinstance(groups, list) else repr(type(groups).__name__)
        raise ValueError(
            f"{api}: state_dict has {got} param groups, tx and params give {len(ours)}. Build "
            "the torch optimizer with optim.torch_optimizer(tx, params)."
        )
    _, want = _torch_class(recipe, 0.0, api)
    for gi, (g, (idx, extra)) in enumerate(zip(groups, ours)):
        if len(g["params"]) != len(idx):
            raise ValueError(
                f"{api}: param group {gi} of state_dict has {len(g['params'])} params, params "
                f"give {len(idx)}. Pass the params the torch optimizer was built on."
            )
        for key, value in {**want, **extra}.items():
            got = tuple(g[key]) if key == "betas" else g.get(key)
            if key != "lr" and got != value:
                raise ValueError(
                    f"{api}: param group {gi} has {key}={got!r} but tx has {value!r}; build tx "
                    "with the torch optimizer's hyperparameters."
                )
        for flag in ("amsgrad", "maximize"):
            if g.get(flag):
                raise ValueError(f"{api}: {flag}=True has no fsharding equivalent.")
        if g.get("dampening"):
            raise ValueError(f"{api}: SGD dampening={g['dampening']!r} is not supported (0).")


def from_torch_state_dict(
    state_dict: dict, params: PyTree, tx: _base.GradientTransformation, *, count: int | None = None
) -> Any:
    """The state of ``tx`` equal to a ``torch.optim`` Adam/AdamW/SGD ``state_dict``.

    Args:
        state_dict: ``optimizer.state_dict()`` of ``torch_optimizer(tx, params)`` (or an
            optimizer built with the same groups and order).
        params: the fsharding params (fixes order, shapes, dtypes and devices).
        tx: the optimizer whose state to build.
        count: the step count for SGD, which torch does not store (needed only when the
            learning rate is a schedule; default 0 otherwise). Adam's count is its ``step``.

    Returns:
        A state with the structure of ``tx.init(params)``; tensors are copies.

    Raises:
        ValueError: hyperparameters, groups, shapes or per-param steps disagree.

    Example:
        >>> import torch
        >>> from fsharding import optim
        >>> tx, p = optim.sgd(0.1, momentum=0.9), {"w": torch.ones(2)}
        >>> opt = optim.torch_optimizer(tx, {"w": torch.nn.Parameter(torch.ones(2))})
        >>> s = optim.from_torch_state_dict(opt.state_dict(), p, tx)
        >>> s[0].trace["w"].tolist()
        [0.0, 0.0]
    """
    api = "optim.from_torch_state_dict"
    template = tx.init(params)
    recipe, sub, replace = _find(tx, template, api)
    ours = _groups(recipe, params, api)
    _check_groups(state_dict, ours, recipe, api)
    pl, pdef = optree.tree_flatten(params)
    paths = [p for p, _ in _tree.leaves_with_path(params)]
    torch_index = [k for g in state_dict["param_groups"] for k in g["params"]]
    ours_index = [i for idx, _ in ours for i in idx]
    entries = state_dict.get("state", {})

    def tensor(k: int, i: int, key: str) -> torch.Tensor | None:
        st = entries.get(k, entries.get(str(k), {}))
        v = st.get(key)
        if v is None:
            return None
        if tuple(v.shape) != tuple(pl[i].shape):
            raise ValueError(
                f"{api}: state of param {k} ({paths[i]}) has {key} of shape {tuple(v.shape)}, "
                f"the param has shape {tuple(pl[i].shape)}."
            )
        return v.detach().to(device=pl[i].device, dtype=pl[i].dtype, copy=True)

    last = sub[-1]
    if recipe["kind"] in ("adam", "adamw"):
        mu = optree.tree_leaves(sub[0].mu)
        nu = optree.tree_leaves(sub[0].nu)
        steps = {}
        for k, i in zip(torch_index, ours_index):
            m, v = tensor(k, i, "exp_avg"), tensor(k, i, "exp_avg_sq")
            st = entries.get(k, entries.get(str(k), {}))
            if "max_exp_avg_sq" in st:
                raise ValueError(f"{api}: amsgrad state has no fsharding equivalent.")
            steps[paths[i]] = int(float(st["step"])) if "step" in st else 0
            if m is not None:
                mu[i], nu[i] = m, v
        counts = set(steps.values())
        if len(counts) > 1:
            a, b = sorted(counts)[:2]
            pa = next(p for p, c in steps.items() if c == a)
            pb = next(p for p, c in steps.items() if c == b)
            raise ValueError(
                f"{api}: params were stepped different numbers of times ({pa}: {a}, {pb}: {b}); "
                "fsharding keeps one step count per optimizer."
            )
        n = counts.pop() if counts else 0
        if count is not None and count != n:
            raise ValueError(f"{api}: count={count!r} disagrees with the torch step {n}.")
        first = ScaleByAdamState(
            n, optree.tree_unflatten(pdef, mu), optree.tree_unflatten(pdef, nu)
        )
    else:
        n = 0 if count is None else _checks.integer(api, "count", count)
        if count is None and isinstance(last, ScaleByScheduleState):
            raise ValueError(
                f"{api}: torch.optim.SGD stores no step count and tx has a learning-rate "
                "schedule; pass count=<number of steps taken>."
            )
        first = sub[0]
        if isinstance(first, TraceState):
            tr = optree.tree_leaves(first.trace)
            for k, i in zip(torch_index, ours_index):
                b = tensor(k, i, "momentum_buffer")
                if b is not None:
                    tr[i] = b
            first = TraceState(optree.tree_unflatten(pdef, tr))
    if isinstance(last, ScaleByScheduleState):
        last = ScaleByScheduleState(n)
    return replace((first, *sub[1:-1], last))
