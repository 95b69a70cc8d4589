"""fs.zero stages 0-3 against a single-process fs.train_step on the same global batch.

Each launch runs every stage on 2 (or 4) gloo ranks and compares, in the ranks, with a
single-process reference computed on the global batch (identical on every rank).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fsharding as fs
from fsharding import optim
from tests.dist_utils import run

STEPS = 5


def make_params(seed: int = 0) -> dict:
    """Uneven shapes on purpose: 7x3 and a bias of 5 do not divide by 2 or 4."""
    g = torch.Generator().manual_seed(seed)
    return {
        "emb": torch.randn(7, 3, generator=g),
        "w1": torch.randn(3, 5, generator=g) * 0.5,
        "b1": torch.randn(5, generator=g) * 0.1,
        "w2": torch.randn(5, 7, generator=g) * 0.5,
        "scale": torch.tensor(1.3),  # 0-dim: kept replicated
    }


def loss_fn(p, batch):
    h = torch.tanh(p["emb"][batch["x"]] @ p["w1"] + p["b1"])
    logits = (h @ p["w2"]) * p["scale"]
    return F.cross_entropy(logits, batch["y"])


def global_batches(n_rows: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [
        {
            "x": torch.randint(0, 7, (n_rows,), generator=g),
            "y": torch.randint(0, 7, (n_rows,), generator=g),
        }
        for _ in range(STEPS)
    ]


def make_opt():
    mask = lambda p: {k: v.dim() > 1 for k, v in p.items()}  # no decay on biases / scalars
    return optim.chain(
        optim.clip_by_global_norm(0.5),
        optim.adamw(optim.linear_schedule(3e-2, 1e-2, STEPS), weight_decay=0.1, mask=mask),
    )


def grad_fns():
    vg = fs.value_and_grad(loss_fn)
    return {
        "plain": vg,
        "nested": fs.accumulate(
            fs.value_and_grad(fs.amp(fs.remat(loss_fn), policy="fp32")), steps=2
        ),
    }


def reference(batches):
    step = fs.train_step(fs.value_and_grad(loss_fn), make_opt())
    params, state = step.init(make_params())
    norms, losses = [], []
    for b in batches:
        params, state, m = step.step(params, state, b)
        norms.append(m["grad_norm"])
        losses.append(m["loss"])
    return params, norms, losses, state


def worker(stages, rows_per_rank):
    from torch.distributed.tensor import DTensor, Shard

    mesh = fs.Mesh(dp=torch.distributed.get_world_size())
    world, rank = mesh.size, mesh.coordinate["dp"]
    batches = global_batches(rows_per_rank * world)
    ref_params, ref_norms, ref_losses, ref_state = reference(batches)
    ref_init = fs.train_step(fs.value_and_grad(loss_fn), make_opt()).init(make_params())
    out = {}
    for stage in stages:
        for name, gf in grad_fns().items():
            if name == "nested" and stage not in (0, 3):
                continue
            step = fs.zero(gf, make_opt(), mesh=mesh, stage=stage)
            params, state = step.init(make_params())
            # exactly train_step's structure; sharded leaves are DTensor Shard(0), global shape
            fs.tree.check_same_structure(ref_init, (params, state), names=("train_step", "zero"))
            for path, leaf in fs.tree.leaves_with_path((params, state)):
                if isinstance(leaf, DTensor):
                    assert leaf.placements == (Shard(0),), path
            if stage == 3:
                assert isinstance(params["w1"], DTensor) and params["w1"].shape == (3, 5)
                assert not isinstance(params["scale"], DTensor)
            sizes = {"params": fs.tree.nbytes(params), "opt": fs.tree.nbytes(state)}
            for i, b in enumerate(batches):
                lo = rank * rows_per_rank
                local = {k: v[lo : lo + rows_per_rank] for k, v in b.items()}
                params, state, m = step.step(params, state, local, donate=(i % 2 == 1))
                torch.testing.assert_close(m["loss"], ref_losses[i], rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(m["grad_norm"], ref_norms[i], rtol=1e-6, atol=1e-7)
                assert m["lr"] == pytest.approx(optim.linear_schedule(3e-2, 1e-2, STEPS)(i))
            full = step.gather(params)
            for k in ref_params:
                assert type(full[k]) is torch.Tensor
                torch.testing.assert_close(full[k], ref_params[k], rtol=1e-5, atol=1e-6)
            out[(stage, name)] = sizes
    return out


def test_zero_stages_match_single_process_on_2_ranks():
    res = run(worker, 2, (0, 1, 2, 3), 4, timeout=240)
    full_opt = res[0][(0, "plain")]["opt"]
    full_params = res[0][(0, "plain")]["params"]
    for r in res:
        # stage 1+ shard the optimizer state; stage 3 the params too (1/N within padding)
        assert r[(1, "plain")]["opt"] < 0.65 * full_opt
        assert r[(3, "plain")]["params"] < 0.65 * full_params
        assert r[(2, "plain")]["params"] == full_params  # stage 2 keeps full params
    # both ranks together hold each shard once (+ replicated scalars)
    assert sum(r[(3, "plain")]["params"] for r in res) <= full_params + 2 * 4


def test_zero_stage3_on_4_ranks():
    res = run(worker, 4, (3,), 2, timeout=240)
    full_params = fs.tree.nbytes(make_params())
    full_opt = 2 * full_params  # adam's mu and nu
    for r in res:  # ~1/4 each, within the padding of uneven dims (e.g. 7 rows -> 2,2,2,1)
        assert r[(3, "plain")]["params"] < 0.4 * full_params
        assert r[(3, "plain")]["opt"] < 0.4 * full_opt


def bad_input_worker():
    mesh = fs.Mesh(dp=torch.distributed.get_world_size())
    vg = fs.value_and_grad(loss_fn)
    msgs = []
    for kwargs in ({"stage": 4}, {"stage": 1, "axis": "tp"}):
        try:
            fs.zero(vg, make_opt(), mesh=mesh, **kwargs)
        except ValueError as e:
            msgs.append(str(e))
    torch.distributed.barrier()  # every rank got here: no hang
    return msgs


def test_zero_bad_input_raises_on_every_rank():
    res = run(bad_input_worker, 2)
    for msgs in res:
        assert "stage must be 0, 1, 2 or 3" in msgs[0]
        assert "axis='tp' is not an axis" in msgs[1]


def test_zero_local_mesh_is_train_step():
    mesh = fs.Mesh(dp=1)
    batches = global_batches(4)
    ref_params, _, _, _ = reference(batches)
    step = fs.zero(fs.value_and_grad(loss_fn), make_opt(), mesh=mesh, stage=3)
    params, state = step.init(make_params())
    for b in batches:
        params, state, _ = step.step(params, state, b)
    for k in ref_params:
        torch.testing.assert_close(params[k], ref_params[k], rtol=0, atol=0)
