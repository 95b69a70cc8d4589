"""fs.Mesh, fs.P, fs.from_local: local meshes in this process, DeviceMeshes on gloo ranks."""

from __future__ import annotations

import pickle
import socket

import optree
import pytest
import torch
import torch.distributed as dist

from fsharding.parallel.mesh import Mesh, P, from_local
from tests.dist_utils import raises, run

# --------------------------------------------------------------------------------------
# P
# --------------------------------------------------------------------------------------


def test_partition_spec_is_a_leaf_and_normalises_entries():
    spec = P("dp", None, ("dp2", "tp"), ("x",), ())
    assert spec == ("dp", None, ("dp2", "tp"), "x", None)
    assert spec.axes == ("dp", "dp2", "tp", "x")
    assert repr(P("dp")) == "P('dp',)" and repr(P()) == "P()"
    assert optree.tree_leaves({"a": P("dp"), "b": [P()]}) == [P("dp"), P()]
    assert optree.tree_structure(P("dp", None)).is_leaf()
    again = pickle.loads(pickle.dumps(spec))
    assert again == spec and type(again) is P


def test_partition_spec_rejects_bad_entries():
    with pytest.raises(TypeError, match="entry must be an axis name"):
        P(0)
    with pytest.raises(TypeError, match="tuple entry must hold axis names"):
        P(("dp", 1))
    with pytest.raises(ValueError, match="axis 'dp' appears more than once"):
        P("dp", ("tp", "dp"))


# --------------------------------------------------------------------------------------
# local meshes
# --------------------------------------------------------------------------------------


def test_local_mesh_without_a_process_group(monkeypatch):
    monkeypatch.setenv("RANK", "0")  # torchrun with one process: still local, no group
    monkeypatch.setenv("WORLD_SIZE", "1")
    mesh = Mesh({"dp": 1}, tp=1)
    assert not dist.is_initialized()
    assert mesh.is_local and mesh.device_mesh is None and mesh.group("tp") is None
    assert mesh.axis_names == ("dp", "tp") and mesh.shape == {"dp": 1, "tp": 1}
    assert mesh.size == 1 and mesh.coordinate == {"dp": 0, "tp": 0}
    assert mesh.device_type == "cpu" and repr(mesh) == "Mesh(dp=1, tp=1, local)"
    sub = mesh["tp"]
    assert sub.is_local and sub.shape == {"tp": 1}
    assert mesh == Mesh(dp=1, tp=1) and mesh != Mesh(tp=1, dp=1)
    assert hash(mesh) == hash(Mesh(dp=1, tp=1))
    x = torch.ones(2, 3)
    assert from_local(x, mesh, P("dp", "tp")) is x


def test_mesh_errors():
    with pytest.raises(ValueError, match="at least one axis"):
        Mesh()
    with pytest.raises(ValueError, match="axis 'dp' needs a size >= 1"):
        Mesh(dp=0)
    with pytest.raises(ValueError, match="axis 'dp' needs a size"):
        Mesh(dp=2.0)
    with pytest.raises(ValueError, match="axis 'dp' is given twice"):
        Mesh({"dp": 1}, dp=1)
    with pytest.raises(RuntimeError, match=r"no process group.*fs.launch\(fn, nprocs=4\)"):
        Mesh(dp=2, tp=2)
    mesh = Mesh(dp=1)
    with pytest.raises(ValueError, match=r"unknown axis 'tp'; the mesh has axes \('dp',\)"):
        mesh.group("tp")
    with pytest.raises(ValueError, match="unknown axis 'tp'"):
        mesh["tp"]
    with pytest.raises(TypeError, match="must be fs.P"):
        from_local(torch.ones(2), mesh, ("dp",))
    with pytest.raises(ValueError, match="unknown axis 'tp'"):
        from_local(torch.ones(2), mesh, P("tp"))
    with pytest.raises(ValueError, match="2 entries but x has 1 dims"):
        from_local(torch.ones(2), mesh, P("dp", None))
    assert not dist.is_initialized()


# --------------------------------------------------------------------------------------
# DeviceMeshes on gloo ranks
# --------------------------------------------------------------------------------------


def _mesh_worker():
    from torch.distributed.tensor import Replicate, Shard

    import fsharding.parallel.mesh as fsm

    rank = dist.get_rank()
    mesh = Mesh(dp=2, tp=2)
    d, t = divmod(rank, 2)
    assert not mesh.is_local and mesh.device_type == "cpu" and mesh.size == 4
    assert mesh.coordinate == {"dp": d, "tp": t}
    assert dist.get_process_group_ranks(mesh.group("tp")) == [2 * d, 2 * d + 1]
    assert dist.get_process_group_ranks(mesh.group("dp")) == [t, 2 + t]
    sub = mesh["dp"]
    assert sub.shape == {"dp": 2} and sub.coordinate == {"dp": d}
    assert sub.device_mesh.mesh.tolist() == [t, 2 + t]
    assert Mesh.from_device_mesh(mesh.device_mesh) == mesh
    assert Mesh(dp=4).coordinate == {"dp": rank}
    assert fsm._created_group is None  # the group came from fs.launch: never ours to destroy

    # per-rank data: no communication, layout from the spec
    block = torch.full((2, 3), float(rank))
    a = from_local(block, mesh, P("dp"))
    assert tuple(a.placements) == (Shard(0), Replicate()) and a.shape == (4, 3)
    b = from_local(block, mesh, P(("dp", "tp"), None))
    assert tuple(b.placements) == (Shard(0), Shard(0))
    assert b.full_tensor()[:, 0].tolist() == [0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0]
    c = from_local(block, mesh, P(None, "tp"))
    assert tuple(c.placements) == (Replicate(), Shard(1)) and c.shape == (2, 6)

    # errors on every rank, no hang (the all_reduce after them completes)
    errors = [
        raises(lambda: Mesh(dp=3), ValueError),
        raises(lambda: Mesh(dp=1, tp=1), ValueError),
        raises(lambda: from_local(block, mesh, P(("tp", "dp"))), ValueError),
    ]
    total = torch.ones(1)
    dist.all_reduce(total)
    assert total.item() == 4
    return errors


@pytest.mark.timeout(150)
def test_device_mesh_on_four_ranks():
    for errors in run(_mesh_worker, 4):
        assert "the mesh {'dp': 3} has 3 positions but the world size is 4" in errors[0]
        assert "has 1 positions but the world size is 4" in errors[1]
        assert "out of mesh order ('dp', 'tp')" in errors[2] and "('dp', 'tp')" in errors[2]


def _torchrun_env_worker(port: int):
    import fsharding.parallel.mesh as fsm
    from fsharding.parallel.collectives import psum
    from fsharding.parallel.shard import shard

    dist.destroy_process_group()  # pretend torchrun started us: env set, no group yet
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    mesh = Mesh(dp=2)
    group = dist.distributed_c10d._get_default_group()
    assert dist.is_initialized() and fsm._created_group is group
    assert Mesh(dp=2).device_mesh is not None
    assert dist.distributed_c10d._get_default_group() is group  # initialised once
    f = shard(lambda x: psum(x, "dp"), mesh=mesh, in_specs=P("dp"), out_specs=P())
    return f(torch.arange(4.0)).tolist(), dist.get_backend()


@pytest.mark.timeout(120)
def test_mesh_initialises_the_group_from_torchrun_env():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert run(_torchrun_env_worker, 2, port) == [([2.0, 4.0], "gloo")] * 2
