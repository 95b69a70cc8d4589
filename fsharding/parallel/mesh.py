"""Meshes and partition specs: the vocabulary of SPMD code (``fs.Mesh``, ``fs.P``,
``fs.from_local``).

A :class:`Mesh` names the axes of the processes (``fs.Mesh(dp=2, tp=2)``); a :class:`P`
(PartitionSpec) says which tensor dim is split over which axes (``fs.P("dp", None)``: dim 0
over ``"dp"``, dim 1 whole). ``fs.shard``, the collectives and ``fs.zero`` take both.

In a plain process with no process group, a mesh whose axes all have size 1 is a *local
mesh*: no ``DeviceMesh`` exists (torch cannot build one without a group), collectives are
identities and ``fs.shard`` runs its function once. The same code then runs unchanged under
``torchrun`` or ``fs.launch`` with bigger axes.

For library code built on a mesh: ``mesh.group(axis)`` is the ``ProcessGroup`` of one axis
(None on a local mesh), ``mesh.device_mesh`` the torch ``DeviceMesh`` (None on a local
mesh), ``mesh[axis]`` the sub-mesh (a :class:`Mesh`; its ``device_mesh`` is the 1-D
``DeviceMesh`` that DTensors sharded over that axis live on), ``mesh.coordinate`` this
rank's index along each axis; :func:`check_spec`, :func:`check_spec_shape` and
:func:`placements` check a spec against a mesh and a tensor and turn it into DTensor
placements (``fs.shard`` and ``fs.from_local`` share them).
"""

from __future__ import annotations

import atexit
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

__all__ = ["Mesh", "P", "from_local"]

AxisEntry = str | tuple[str, ...] | None


class P(tuple):
    """A PartitionSpec: for each tensor dim, the mesh axes it is split over.

    Entries are an axis name, None (the dim is not split) or a tuple of axis names (the dim
    is split over several axes, the first one major). Missing trailing entries mean None.
    A ``P`` is a pytree *leaf*, so one spec can stand for a whole argument (a prefix).

    Example:
        >>> import optree
        >>> import fsharding as fs
        >>> spec = fs.P("dp", None, ("dp2", "tp"))
        >>> spec, spec[0], len(spec), spec.axes
        (P('dp', None, ('dp2', 'tp')), 'dp', 3, ('dp', 'dp2', 'tp'))
        >>> optree.tree_leaves({"w": fs.P("dp")})
        [P('dp',)]
    """

    def __new__(cls, *entries: AxisEntry) -> P:
        norm: list[AxisEntry] = []
        for e in entries:
            if isinstance(e, (tuple, list)) and not isinstance(e, P):
                if not all(isinstance(a, str) for a in e):
                    raise TypeError(f"fs.P: a tuple entry must hold axis names (str), got {e!r}.")
                e = None if len(e) == 0 else (e[0] if len(e) == 1 else tuple(e))
            elif e is not None and not isinstance(e, str):
                raise TypeError(
                    f"fs.P: each entry must be an axis name (str), None or a tuple of axis "
                    f"names; got {e!r} of type {type(e).__name__}."
                )
            norm.append(e)
        self = super().__new__(cls, norm)
        seen = self.axes
        dups = sorted({a for a in seen if seen.count(a) > 1})
        if dups:
            raise ValueError(
                f"fs.P: axis {dups[0]!r} appears more than once in {self!r}; a mesh axis can "
                f"split at most one dim of a tensor."
            )
        return self

    def __getnewargs__(self) -> tuple[Any, ...]:
        return tuple(self)

    def __repr__(self) -> str:
        return "P(" + ", ".join(repr(e) for e in self) + ("," if len(self) == 1 else "") + ")"

    @property
    def axes(self) -> tuple[str, ...]:
        """Every axis name the spec mentions, in order."""
        return tuple(a for e in self for a in entry_axes(e))


def entry_axes(entry: AxisEntry) -> tuple[str, ...]:
    """The axis names of one spec entry (``None`` -> ``()``, ``"dp"`` -> ``("dp",)``)."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


_created_group = None  # the default group Mesh itself initialised (from torchrun's env)


def _init_from_env() -> None:
    """``init_process_group`` from torchrun's environment, once per process."""
    global _created_group
    if "nccl" in _default_backend():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(_default_backend())
    _created_group = dist.distributed_c10d._get_default_group()

    def _destroy() -> None:  # only the group this module created, and only if still current
        try:
            if dist.is_initialized() and dist.distributed_c10d._get_default_group() is (
                _created_group
            ):
                dist.destroy_process_group()
        except Exception:
            pass

    atexit.register(_destroy)


def _default_backend() -> str:
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() > 0 else "gloo"


def _device_type() -> str:
    backend = str(dist.get_backend()).lower()
    return "cuda" if "nccl" in backend and torch.cuda.is_available() else "cpu"


class Mesh:
    """A named grid of processes: ``fs.Mesh(dp=2, tp=2)`` or ``fs.Mesh({"dp": 2, "tp": 2})``.

    With a process group, the mesh is a torch ``DeviceMesh`` over the default group
    (``"cuda"`` for NCCL, ``"cpu"`` for gloo); the product of the axis sizes must equal the
    world size. With no group but torchrun's ``RANK``/``WORLD_SIZE`` set (world size > 1),
    the first mesh calls ``init_process_group`` (and destroys that group at exit; a group it
    did not create is never destroyed). With no group, all axes of size 1 give a *local
    mesh*. Building a multi-axis mesh creates sub-groups: every rank must build it.

    Args:
        axes: ``{axis name: size}`` in major-to-minor order (rank = row-major index).
        **kwargs: more axes, after those of ``axes``.

    Raises:
        ValueError: no axes, a bad name or size, or the mesh size differs from the world
            size (on every rank, before any communication).
        RuntimeError: an axis is bigger than 1 but there is no process group.

    Example:
        >>> import fsharding as fs
        >>> mesh = fs.Mesh(dp=1)
        >>> mesh, mesh.shape, mesh.size, mesh.is_local, mesh.coordinate
        (Mesh(dp=1, local), {'dp': 1}, 1, True, {'dp': 0})
        >>> print(mesh.device_mesh, mesh.group("dp"))
        None None
    """

    __slots__ = ("_shape", "_device_mesh")

    def __init__(self, axes: Mapping[str, int] | None = None, /, **kwargs: int) -> None:
        shape = dict(axes or {})
        for name, size in kwargs.items():
            if name in shape:
                raise ValueError(f"fs.Mesh: axis {name!r} is given twice.")
            shape[name] = size
        _check_axes(shape)
        self._shape = shape
        self._device_mesh = None
        size = math.prod(shape.values())
        if not (dist.is_available() and dist.is_initialized()):
            env_world = int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 0
            if env_world > 1 or (env_world == 1 and size > 1):
                _init_from_env()
            elif size == 1:
                return  # a local mesh
            else:
                raise RuntimeError(
                    f"fs.Mesh: the mesh {dict(shape)} has {size} positions but this process "
                    f"has no process group. Run under torchrun or fs.launch(fn, nprocs={size}), "
                    "or use axes of size 1 for a local mesh."
                )
        world = dist.get_world_size()
        if size != world:
            raise ValueError(
                f"fs.Mesh: the mesh {dict(shape)} has {size} positions but the world size is "
                f"{world}. Pick axis sizes whose product is {world}."
            )
        self._device_mesh = init_device_mesh(
            _device_type(), tuple(shape.values()), mesh_dim_names=tuple(shape)
        )

    @classmethod
    def from_device_mesh(cls, device_mesh: Any) -> Mesh:
        """Wraps an existing torch ``DeviceMesh`` that has ``mesh_dim_names``.

        Example:
            >>> import fsharding as fs
            >>> from torch.distributed.device_mesh import init_device_mesh
            >>> dm = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))  # doctest: +SKIP
            >>> fs.Mesh.from_device_mesh(dm)  # doctest: +SKIP
            Mesh(dp=2, tp=2)
        """
        names = getattr(device_mesh, "mesh_dim_names", None)
        if not names:
            raise ValueError(
                "fs.Mesh.from_device_mesh: the DeviceMesh has no mesh_dim_names; build it with "
                "init_device_mesh(..., mesh_dim_names=('dp', ...))."
            )
        self = object.__new__(cls)
        self._shape = dict(zip(names, device_mesh.mesh.shape))
        self._device_mesh = device_mesh
        return self

    # -- properties ---------------------------------------------------------------------

    @property
    def axis_names(self) -> tuple[str, ...]:
        """The axis names, major to minor."""
        return tuple(self._shape)

    @property
    def shape(self) -> dict[str, int]:
        """``{axis name: size}`` (a copy)."""
        return dict(self._shape)

    @property
    def size(self) -> int:
        """The number of positions (processes) of the mesh."""
        return math.prod(self._shape.values())

    @property
    def is_local(self) -> bool:
        """True for a local mesh (no process group, no DeviceMesh)."""
        return self._device_mesh is None

    @property
    def device_mesh(self) -> Any:
        """The torch ``DeviceMesh``, or None on a local mesh."""
        return self._device_mesh

    @property
    def device_type(self) -> str:
        """``"cuda"`` or ``"cpu"``: where the mesh's collectives run (``"cpu"`` if local)."""
        return "cpu" if self._device_mesh is None else self._device_mesh.device_type

    @property
    def coordinate(self) -> dict[str, int]:
        """This rank's index along each axis (all 0 on a local mesh)."""
        if self._device_mesh is None:
            return dict.fromkeys(self._shape, 0)
        return dict(zip(self._shape, self._device_mesh.get_coordinate()))

    def group(self, axis: str) -> Any:
        """The ``ProcessGroup`` of ``axis`` (the ranks that differ only along it), or None
        on a local mesh. Pass it to ``torch.distributed`` or its functional collectives."""
        self._check_axis(axis, "fs.Mesh.group")
        return None if self._device_mesh is None else self._device_mesh.get_group(axis)

    def __getitem__(self, axes: str | tuple[str, ...]) -> Mesh:
        """The sub-mesh over ``axes`` that contains this rank (a :class:`Mesh`)."""
        names = (axes,) if isinstance(axes, str) else tuple(axes)
        for a in names:
            self._check_axis(a, "fs.Mesh[...]")
        if self._device_mesh is None:
            sub = object.__new__(Mesh)
            sub._shape = {a: self._shape[a] for a in names}
            sub._device_mesh = None
            return sub
        return Mesh.from_device_mesh(self._device_mesh[names])

    def _check_axis(self, axis: Any, api: str) -> None:
        if axis not in self._shape:
            raise ValueError(f"{api}: unknown axis {axis!r}; the mesh has axes {self.axis_names}.")

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v}" for k, v in self._shape.items())
        return f"Mesh({inner}{', local' if self.is_local else ''})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mesh):
            return NotImplemented
        same_axes = tuple(self._shape.items()) == tuple(other._shape.items())
        return same_axes and (
            self._device_mesh is other._device_mesh or self._device_mesh == other._device_mesh
        )

    def __hash__(self) -> int:
        return hash(tuple(self._shape.items()))


def _check_axes(shape: dict[str, Any]) -> None:
    if not shape:
        raise ValueError("fs.Mesh: give at least one axis, e.g. fs.Mesh(dp=2).")
    for name, size in shape.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"fs.Mesh: axis names must be non-empty str, got {name!r}.")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"fs.Mesh: axis {name!r} needs a size >= 1 (int), got {size!r}.")


# --------------------------------------------------------------------------------------
# specs against a mesh and a tensor (shared with fs.shard)
# --------------------------------------------------------------------------------------


def check_spec(spec: Any, mesh: Mesh, api: str, where: str) -> P:
    """Checks that ``spec`` is a ``P`` whose axes belong to ``mesh``; returns it."""
    if not isinstance(spec, P):
        raise TypeError(
            f"{api}: the spec for {where} must be fs.P(...), got {spec!r} of type "
            f"{type(spec).__name__}. Use fs.P() for a replicated value."
        )
    for a in spec.axes:
        if a not in mesh.axis_names:
            raise ValueError(
                f"{api}: the spec {spec!r} for {where} names unknown axis {a!r}; the mesh "
                f"has axes {mesh.axis_names}."
            )
    return spec


def check_spec_shape(spec: P, mesh: Mesh, shape: Iterable[int], api: str, where: str) -> None:
    """Checks that ``spec`` fits a tensor of ``shape``: rank and divisibility."""
    shape = tuple(shape)
    if len(spec) > len(shape):
        raise ValueError(
            f"{api}: the spec {spec!r} for {where} has {len(spec)} entries but the tensor has "
            f"{len(shape)} dims (shape {shape}). Drop trailing entries."
        )
    for dim, entry in enumerate(spec):
        n = math.prod(mesh.shape[a] for a in entry_axes(entry))
        if shape[dim] % n:
            raise ValueError(
                f"{api}: {where} has size {shape[dim]} in dim {dim} (shape {shape}), not "
                f"divisible by {n}, the size of axis {entry!r} in {spec!r}. Pad the tensor or "
                f"pick sizes that divide."
            )


def placements(spec: P, mesh: Mesh, api: str, where: str) -> list[Any]:
    """The DTensor placements of ``spec`` on ``mesh.device_mesh`` (one per mesh axis)."""
    from torch.distributed.tensor import Replicate, Shard  # (a second to import: on first use)

    out: list[Any] = [Replicate()] * len(mesh.axis_names)
    for dim, entry in enumerate(spec):
        axes = entry_axes(entry)
        order = [mesh.axis_names.index(a) for a in axes]
        if order != sorted(order):
            raise ValueError(
                f"{api}: the spec entry {entry!r} for {where} lists axes out of mesh order "
                f"{mesh.axis_names}; DTensor shards a dim over several axes major-first in mesh "
                f"order. Write {tuple(sorted(axes, key=mesh.axis_names.index))!r}."
            )
        for i in order:
            out[i] = Shard(dim)
    return out


def from_local(x: torch.Tensor, mesh: Mesh, spec: P) -> torch.Tensor:
    """Declares ``x`` to be this rank's block of a global tensor laid out as ``spec``.

    No communication: every rank passes its own block (all blocks of one shape), and the
    result is a DTensor on ``mesh.device_mesh`` whose placements follow ``spec``
    (``Shard(dim)`` for each axis naming a dim, ``Replicate()`` for unmentioned axes). Pass
    it to ``fs.shard``: ``fn`` then sees ``x`` itself as its block. Differentiable. On a
    local mesh the block is the whole tensor and ``x`` is returned unchanged.

    Args:
        x: this rank's block.
        mesh: the mesh.
        spec: how the global tensor is split; a dim over several axes lists them in mesh
            order.

    Returns:
        A DTensor, or ``x`` on a local mesh.

    Raises:
        ValueError, TypeError: a spec that is not a ``P``, names unknown axes, is longer
            than ``x.ndim``, or lists a dim's axes out of mesh order.

    Example:
        >>> import torch, fsharding as fs
        >>> x = torch.ones(2, 3)
        >>> fs.from_local(x, fs.Mesh(dp=1), fs.P("dp")) is x
        True
    """
    api = "fs.from_local"
    if not isinstance(mesh, Mesh):
        raise TypeError(f"{api}: mesh must be an fs.Mesh, got {type(mesh).__name__}.")
    check_spec(spec, mesh, api, "x")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{api}: x must be a torch.Tensor, got {type(x).__name__}.")
    if len(spec) > x.ndim:
        raise ValueError(
            f"{api}: the spec {spec!r} has {len(spec)} entries but x has {x.ndim} dims "
            f"(shape {tuple(x.shape)}). Drop trailing entries."
        )
    if mesh.is_local:
        return x
    from torch.distributed.tensor import DTensor  # (a second to import: on first use)

    return DTensor.from_local(
        x, mesh.device_mesh, placements(spec, mesh, api, "x"), run_check=False
    )
