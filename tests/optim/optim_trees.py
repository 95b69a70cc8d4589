"""Shared test helpers for tests/optim: random pytrees of tensors and torch.optim drivers."""

from __future__ import annotations

import optree
import torch
from hypothesis import strategies as st

# A tree *spec*: nested dicts / lists whose leaves are shapes; materialised with a seed.
_shapes = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)
_keys = st.sampled_from(["w", "b", "a", "z", "emb", "ln", "k"])
tree_specs = st.recursive(
    _shapes,
    lambda children: (
        st.dictionaries(_keys, children, min_size=1, max_size=3)
        | st.lists(children, min_size=1, max_size=3)
    ),
    max_leaves=5,
)


def is_shape(x) -> bool:
    return isinstance(x, tuple)


def make_tree(spec, seed: int, dtype=torch.float64, scale: float = 1.0):
    """Materialises ``spec`` with normal tensors drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return optree.tree_map(
        lambda s: torch.randn(s, generator=gen, dtype=dtype) * scale, spec, is_leaf=is_shape
    )


def leaves(tree):
    return optree.tree_leaves(tree)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item() if a.numel() else 0.0


def max_rel_err(tree, tensors) -> float:
    return max((rel_err(a, b) for a, b in zip(leaves(tree), tensors)), default=0.0)


def run_fs(tx, params, grads_seq):
    """Runs an fsharding optimizer over a sequence of grads; returns (params, state)."""
    from fsharding import optim

    state = tx.init(params)
    for g in grads_seq:
        updates, state = tx.update(g, state, params)
        params = optim.apply_updates(params, updates)
    return params, state


def run_torch(make_opt, params, grads_seq, lr_at=None):
    """Runs a torch.optim optimizer over the same grads (leaves in optree order)."""
    ps = [torch.nn.Parameter(p.detach().clone()) for p in leaves(params)]
    opt = make_opt(ps)
    for step, g in enumerate(grads_seq):
        if lr_at is not None:
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
        for p, gg in zip(ps, leaves(g)):
            p.grad = gg.clone()
        opt.step()
    return [p.detach() for p in ps]


def grads_for(spec, n: int, seed: int, dtype=torch.float64):
    return [make_tree(spec, seed * 1000 + i + 1, dtype) for i in range(n)]


def snapshot(tree):
    return optree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)


def bitwise_equal(a, b) -> bool:
    la, lb = optree.tree_leaves(a), optree.tree_leaves(b)
    if optree.tree_structure(a) != optree.tree_structure(b):
        return False
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor):
            if not (x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True
