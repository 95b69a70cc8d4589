"""``fs.zero``: data-parallel training steps with ZeRO stages 0-3.

The same ``Step(init, step, gather)`` as ``fs.train_step``, data parallel over one mesh
axis. Compute runs on plain local tensors with explicit bucketed collectives; DTensor is
used only for what is *stored* sharded (params at stage 3, optimizer state at stages 1-3),
so checkpoints and placements are standard.

Schedule of one step (N ranks on ``axis``; Ψ = parameter bytes; logical bytes per rank):

========  ==========================================  ==================================
stage     communication                               stored per rank
========  ==========================================  ==================================
0 (DDP)   all-reduce grads (2Ψ)                        params, grads, opt state
1         all-reduce grads, all-gather params (3Ψ)    params, opt state / N
2         reduce-scatter grads, all-gather params     params, (grads, opt state) / N
          (2Ψ)
3         all-gather params at the ``grad_fn``        (params, grads, opt state) / N
          boundary, reduce-scatter grads (2Ψ)
========  ==========================================  ==================================

Gradient accumulation composes by nesting: ``fs.zero(fs.accumulate(g, steps=k), ...)``
accumulates the k microbatches locally and reduces once per step at every stage.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import optree
import torch
import torch.distributed as dist

from fsharding import tree as _tree
from fsharding.optim import base as _optim
from fsharding.step import Step, TrainState, train_step
from fsharding.transforms import zero_layout as _lay

__all__ = ["zero"]

PyTree = Any


def _dtensor_api():
    from torch.distributed.tensor import DTensor, Shard

    return DTensor, Shard


def _axis_group(mesh: Any, axis: str) -> tuple[Any, Any]:
    """(process group, 1-D DeviceMesh) of ``axis``, or (None, None) on a local mesh."""
    names = tuple(getattr(mesh, "axis_names", ()))
    if axis not in names:
        raise ValueError(
            f"fs.zero: axis={axis!r} is not an axis of the mesh; its axes are {list(names)}. "
            "Pass axis= one of them (e.g. fs.Mesh(dp=2) and axis='dp')."
        )
    if mesh.device_mesh is None:
        return None, None
    return mesh.group(axis), mesh[axis].device_mesh


def zero(
    grad_fn: Callable[..., tuple[torch.Tensor, PyTree]],
    optimizer: _optim.GradientTransformation,
    *,
    mesh: Any,
    stage: int,
    axis: str = "dp",
    loss_scale: Any = None,
) -> Step:
    """A data-parallel training step with ZeRO sharding of model state over ``axis``.

    Args:
        grad_fn: ``grad_fn(params, batch) -> (loss, grads)`` on *full* params and the
            rank-local batch (e.g. ``fs.value_and_grad(loss_fn)``, possibly inside
            ``fs.accumulate``); every rank's batch has the same size.
        optimizer: an ``optim.GradientTransformation``. At stages 1-3 it runs on each rank's
            shards; ``optim.clip_by_global_norm`` still sees the global norm.
        mesh: an ``fs.Mesh``; a local mesh (no process group) gives ``fs.train_step``.
        stage: 0 (grads all-reduced, DDP), 1 (+ optimizer state sharded), 2 (+ grads
            reduce-scattered; no full-size gradient kept between steps), 3 (+ params stored
            sharded, gathered at the ``grad_fn`` boundary).
        axis: the mesh axis to shard over.
        loss_scale: an initial ``fs.LossScale`` (fp16); the finite check is all-reduced, so
            every rank skips the same steps.

    Returns:
        ``Step(init, step, gather)``. ``init(params, *, init_fn=None)`` takes full params
        (identical on every rank) or meta-device params with ``init_fn(path, meta) -> full
        leaf`` (called one leaf at a time, so stage 3 never holds a full replica); it
        returns params and opt_state with exactly ``fs.train_step(...).init``'s pytree
        structure, sharded leaves being ``DTensor``s with placement ``Shard(0)`` and the
        leaf's global shape. ``step`` returns the global-batch mean loss on every rank.
        ``gather(params)`` returns full plain tensors, identical on every rank.

    Raises:
        ValueError: bad ``stage`` or ``axis``.

    Example:
        >>> import torch, fsharding as fs
        >>> from fsharding import optim
        >>> mesh = fs.Mesh(dp=1)  # local mesh: one process, no process group
        >>> f = fs.value_and_grad(lambda p, b: (p["w"] * b).sum())
        >>> step = fs.zero(f, optim.sgd(0.1), mesh=mesh, stage=3)
        >>> params, opt_state = step.init({"w": torch.ones(2)})
        >>> params, opt_state, m = step.step(params, opt_state, torch.ones(2))
        >>> params["w"].tolist()
        [0.8999999761581421, 0.8999999761581421]
    """
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        raise ValueError(f"fs.zero: stage must be 0, 1, 2 or 3, got {stage!r}.")
    group, dmesh = _axis_group(mesh, axis)
    if group is None or dist.get_world_size(group) == 1:
        local = train_step(grad_fn, optimizer, loss_scale=loss_scale)

        def init_local(params: PyTree, *, init_fn: Callable | None = None) -> tuple:
            return local.init(_materialize(params, init_fn))

        return Step(init=init_local, step=local.step, gather=local.gather)
    return _ZeRO(grad_fn, optimizer, group, dmesh, stage, loss_scale).as_step()


def _materialize(params: PyTree, init_fn: Callable | None) -> PyTree:
    def one(path: str, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.device.type == "meta":
            if init_fn is None:
                raise ValueError(
                    f"fs.zero.init: params leaf {path} is on the meta device; pass "
                    "init_fn=lambda path, meta: <full tensor> to initialise it."
                )
            return init_fn(path, x)
        return x

    pairs = _tree.leaves_with_path(params)
    return _tree.unflatten(_tree.structure(params), [one(p, x) for p, x in pairs])


class _ZeRO:
    """The distributed implementation behind :func:`zero` (one instance per Step)."""

    def __init__(self, grad_fn, optimizer, group, dmesh, stage, loss_scale) -> None:
        self.grad_fn, self.opt, self.group, self.dmesh = grad_fn, optimizer, group, dmesh
        self.stage, self.loss_scale = stage, loss_scale
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.treedef = None

    # -- layout -----------------------------------------------------------------------

    def _plan(self, params: PyTree) -> None:
        leaves, treedef = optree.tree_flatten(params)
        self.treedef = treedef
        self.paths = [p for p, _ in _tree.leaves_with_path(params)]
        self.sharded = [isinstance(x, torch.Tensor) and x.dim() >= 1 for x in leaves]
        self.layouts: list[_lay.LeafLayout | None] = []
        k = 0
        for x, sh in zip(leaves, self.sharded):
            if sh:
                self.layouts.append(_lay.LeafLayout(k, tuple(x.shape), x.dtype, self.world))
                k += 1
            else:
                self.layouts.append(None)
        self.buckets = _lay.make_buckets([lay for lay in self.layouts if lay is not None])
        self.device = leaves[0].device if leaves else torch.device("cpu")

    def _to_dtensor(self, local: torch.Tensor, lay: _lay.LeafLayout) -> torch.Tensor:
        DTensor, Shard = _dtensor_api()
        full = torch.empty(lay.shape, device="meta")
        return DTensor.from_local(
            local, self.dmesh, [Shard(0)], run_check=False, shape=lay.shape, stride=full.stride()
        )

    def _local(self, x: Any) -> Any:
        return _tree.local_tensor(x) if isinstance(x, torch.Tensor) else x

    def _shard_leaves(self, leaves: list) -> list:
        return [
            _lay.shard_rows(x, lay, self.rank) if lay is not None else x
            for x, lay in zip(leaves, self.layouts)
        ]

    def _wrap_state(self, state: Any, local_params: list) -> Any:
        """DTensor-wrap the param-shaped subtrees of an optimizer state built on shards."""

        def is_param_tree(node: Any) -> bool:
            if optree.tree_structure(node) != self.treedef:
                return False
            return all(
                isinstance(a, torch.Tensor) and a.shape == b.shape
                for a, b in zip(optree.tree_leaves(node), local_params)
            )

        def wrap(node: Any) -> Any:
            leaves = optree.tree_leaves(node)
            out = [
                self._to_dtensor(x, lay) if lay is not None else x
                for x, lay in zip(leaves, self.layouts)
            ]
            return optree.tree_unflatten(self.treedef, out)

        return optree.tree_map(
            lambda n: wrap(n) if is_param_tree(n) else n,
            state,
            is_leaf=is_param_tree,
        )

    def _unwrap_state(self, state: Any) -> Any:
        return optree.tree_map(self._local, state)

    # -- init / gather ----------------------------------------------------------------

    def init(self, params: PyTree, *, init_fn: Callable | None = None) -> tuple[PyTree, Any]:
        pairs = _tree.leaves_with_path(params)
        for path, x in pairs:
            if not _tree.is_floating(x):
                raise TypeError(
                    f"fs.zero.init: params leaf {path} is not a floating tensor ({x!r}); keep "
                    "integer or constant values out of params."
                )
        meta = [isinstance(x, torch.Tensor) and x.device.type == "meta" for _, x in pairs]
        if any(meta) and init_fn is None:
            raise ValueError(
                f"fs.zero.init: params leaf {pairs[meta.index(True)][0]} is on the meta device; "
                "pass init_fn=lambda path, meta: <full tensor> to initialise it leaf by leaf."
            )
        self._plan(params)
        if any(meta):
            self.device = next(
                (x.device for _, x in pairs if x.device.type != "meta"), torch.device("cpu")
            )
        local, full = [], []
        for (path, x), lay, is_meta in zip(pairs, self.layouts, meta):
            t = init_fn(path, x) if is_meta else x.detach()
            if self.stage == 3 and lay is not None:
                local.append(_lay.shard_rows(t, lay, self.rank))
                full.append(None)
            else:
                full.append(t)
                local.append(_lay.shard_rows(t, lay, self.rank) if lay is not None else t)
            del t
        if self.stage == 0:
            params_out = optree.tree_unflatten(self.treedef, full)
            opt = self.opt.init(params_out)
        else:
            opt = self._wrap_state(self.opt.init(self._tree(local)), local)
            if self.stage == 3:
                params_out = self._tree(
                    [
                        self._to_dtensor(x, lay) if lay is not None else x
                        for x, lay in zip(local, self.layouts)
                    ]
                )
            else:
                params_out = optree.tree_unflatten(self.treedef, full)
        if self.loss_scale is not None:
            return params_out, TrainState(opt=opt, loss_scale=self.loss_scale)
        return params_out, opt

    def _tree(self, leaves: list) -> PyTree:
        return optree.tree_unflatten(self.treedef, leaves)

    def _gather_full(self, local: list) -> list:
        shards = [x for x, lay in zip(local, self.layouts) if lay is not None]
        fulls = _lay.all_gather_buckets(self.buckets, shards, self.group, self.device)
        return [fulls[lay.index] if lay is not None else x for x, lay in zip(local, self.layouts)]

    def gather(self, params: PyTree) -> PyTree:
        if self.stage != 3:
            return optree.tree_map(self._local, params)
        local = [self._local(x) for x in optree.tree_leaves(params)]
        return self._tree(self._gather_full(local))

    # -- step -------------------------------------------------------------------------

    def _check(self, params: PyTree, api: str) -> None:
        if self.treedef is None:
            raise RuntimeError(f"{api}: call init(params) before step.")
        if optree.tree_structure(params) != self.treedef:
            _tree.check_same_structure(
                self._tree([0] * self.treedef.num_leaves),
                params,
                names=("init's params", "params"),
                api=api,
            )

    def _mean(self, x: torch.Tensor) -> torch.Tensor:
        y = x.detach().clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=self.group)
        return y / self.world

    def step(self, params: PyTree, opt_state: Any, batch: Any, *, donate: bool = False):
        self._check(params, "fs.zero.step")
        opt, scale = (
            (opt_state.opt, opt_state.loss_scale)
            if self.loss_scale is not None
            else (opt_state, None)
        )
        local_params = [self._local(x) for x in optree.tree_leaves(params)]
        full_params = self._gather_full(local_params) if self.stage == 3 else local_params
        kw = {"loss_scale": scale} if scale is not None else {}
        loss, grads = self.grad_fn(self._tree(full_params), batch, **kw)
        _tree.check_same_structure(params, grads, names=("params", "grads"), api="fs.zero.step")
        del full_params
        g = optree.tree_leaves(grads)
        del grads
        if self.stage <= 1:
            g = _lay.all_reduce_mean(g, self.group)
            grad_norm = _optim.global_norm(g)
            if self.stage == 1:
                g = self._shard_leaves(g)
        else:
            rep = [i for i, lay in enumerate(self.layouts) if lay is None]
            shards = _lay.reduce_scatter_buckets(
                self.buckets,
                [x for x, lay in zip(g, self.layouts) if lay is not None],
                self.group,
                self.device,
            )
            reps = _lay.all_reduce_mean([g[i] for i in rep], self.group) if rep else []
            g = [shards[lay.index] if lay is not None else None for lay in self.layouts]
            for i, r in zip(rep, reps):
                g[i] = r
            grad_norm = self._sharded_norm(g)
        metrics: dict[str, Any] = {"loss": self._mean(loss), "grad_norm": grad_norm}
        opt_local = self._unwrap_state(opt) if self.stage >= 1 else opt
        lr = _optim.learning_rate(self.opt, opt_local)
        if lr is not None:
            metrics["lr"] = lr
        if scale is not None:
            finite = _tree.all_finite(g).to(torch.int32)
            dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=self.group)
            finite = bool(finite)
            metrics["loss_scale"] = scale.loss_scale
            metrics["skipped"] = not finite
            new_scale = scale.adjust(finite)
            if not finite:
                return params, TrainState(opt=opt, loss_scale=new_scale), metrics
        p_local = local_params if self.stage in (0, 3) else self._shard_leaves(local_params)
        new_opt, new_p = self._update(g, opt_local, p_local, donate)
        if self.stage == 0:
            params_out = self._tree(new_p)
        elif self.stage == 3:
            params_out = self._tree(
                [
                    self._to_dtensor(x, lay) if lay is not None else x
                    for x, lay in zip(new_p, self.layouts)
                ]
            )
        else:
            params_out = self._tree(self._gather_full(new_p))
        if self.stage >= 1:
            new_opt = self._wrap_state(new_opt, new_p)
        if scale is not None:
            return params_out, TrainState(opt=new_opt, loss_scale=new_scale), metrics
        return params_out, new_opt, metrics

    def _update(self, g: list, opt: Any, p: list, donate: bool) -> tuple[Any, list]:
        ptree, gtree = self._tree(p), self._tree(g)
        reducer = (
            _optim.sharded_norm(self._sq_reduce) if self.stage >= 1 else contextlib.nullcontext()
        )
        donating = _optim.donation() if donate else contextlib.nullcontext()
        with reducer, donating:
            updates, new_opt = self.opt.update(gtree, opt, ptree)
        apply = _optim.apply_updates_ if donate else _optim.apply_updates
        return new_opt, optree.tree_leaves(apply(ptree, updates))

    def _sq_reduce(self, sq_per_leaf: list[torch.Tensor]) -> torch.Tensor:
        """Global sum of squares from per-leaf local sums (sharded leaves summed over ranks)."""
        if len(sq_per_leaf) == len(self.layouts):
            shard = [s for s, lay in zip(sq_per_leaf, self.layouts) if lay is not None]
            rep = [s for s, lay in zip(sq_per_leaf, self.layouts) if lay is None]
        else:
            shard, rep = sq_per_leaf, []
        total = torch.stack(shard).sum() if shard else torch.zeros(())
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return total + (torch.stack(rep).sum().to(total.dtype) if rep else 0.0)

    def _sharded_norm(self, g: list) -> torch.Tensor:
        sq = [_tree.local_tensor(x).double().square().sum() for x in g]
        return (
            self._sq_reduce(sq)
            .sqrt()
            .to(torch.float64 if any(x.dtype == torch.float64 for x in g) else torch.float32)
        )

    def as_step(self) -> Step:
        return Step(init=self.init, step=self.step, gather=self.gather)
