"""fs.zero stages 0-3 against a single-process fs.train_step on the same global batch.

Each launch runs every stage on 2 (or 4) gloo ranks and compares, in the ranks, with a
single-process reference computed on the global batch (identical on every rank). The 4-rank
launch adds hybrid sharding (a replicate x shard mesh) and gather="blocks" on a GPT with
uneven shapes; errors are checked to raise on every rank (no hang).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import fsharding as fs
from fsharding import optim
from tests.dist_utils import raises, run

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


SEEN_DTYPES: list = []  # the param dtypes the nested case's loss computed with


def bf16_probe_loss(p, batch):
    SEEN_DTYPES.append(p["w1"].dtype)
    return loss_fn(p, batch)


def grad_fns():
    vg = fs.value_and_grad(loss_fn)
    return {
        "plain": vg,
        # bf16 compute (fp32 params and grads) inside remat inside accumulate
        "nested": fs.accumulate(
            fs.value_and_grad(fs.amp(fs.remat(bf16_probe_loss), policy="bf16")), steps=2
        ),
    }


# Tolerances against the float32 single-process reference. bf16 computes with 8 bits of
# mantissa: measured on this problem (single process, 5 steps) the loss is within 1e-3
# relative, the grad norm 4e-3, the params 8e-4 absolute; allowed: about 5x that.
TOL = {
    "plain": {"loss": (1e-5, 1e-6), "norm": (1e-6, 1e-7), "params": (1e-5, 1e-6)},
    "nested": {"loss": (5e-3, 0.0), "norm": (2e-2, 0.0), "params": (0.0, 5e-3)},
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
            deviation = []
            for i, b in enumerate(batches):
                lo = rank * rows_per_rank
                local = {k: v[lo : lo + rows_per_rank] for k, v in b.items()}
                before = fs.tree.leaves((params, state))
                kept = [fs.tree.local_tensor(x).clone() for x in before if torch.is_tensor(x)]
                params, state, m = step.step(params, state, local, donate=(i % 2 == 1))
                if i % 2 == 0:  # not donated: the inputs are left untouched
                    assert all(
                        torch.equal(fs.tree.local_tensor(x), k)
                        for x, k in zip([x for x in before if torch.is_tensor(x)], kept)
                    )
                if stage == 3 and i % 2 == 1 and name == "plain":
                    # donated: shards updated in place keep their DTensor objects; else new
                    after = fs.tree.leaves((params, state))
                    dts = [(a, b) for a, b in zip(before, after) if isinstance(a, DTensor)]
                    assert dts and all(a is b for a, b in dts)
                elif stage == 3 and name == "plain":
                    assert not any(
                        a is b
                        for a, b in zip(before, fs.tree.leaves((params, state)))
                        if isinstance(a, DTensor)
                    )
                (lr, la), (nr, na) = TOL[name]["loss"], TOL[name]["norm"]
                torch.testing.assert_close(m["loss"], ref_losses[i], rtol=lr, atol=la)
                torch.testing.assert_close(m["grad_norm"], ref_norms[i], rtol=nr, atol=na)
                assert m["lr"] == pytest.approx(optim.linear_schedule(3e-2, 1e-2, STEPS)(i))
                deviation.append(abs(float(m["loss"]) - float(ref_losses[i])))
            if name == "nested":  # bf16 really ran: seen by the loss, and off float32's
                assert set(SEEN_DTYPES) == {torch.bfloat16} and max(deviation) > 1e-6
            SEEN_DTYPES.clear()
            full = step.gather(params)
            pr, pa = TOL[name]["params"]
            for k in ref_params:
                assert type(full[k]) is torch.Tensor
                torch.testing.assert_close(full[k], ref_params[k], rtol=pr, atol=pa)
            out[(stage, name)] = sizes
    # LAMB: per-leaf norms (trust ratio) of sharded leaves are the norms of whole leaves
    lamb = lambda: optim.lamb(1e-1, weight_decay=0.1)  # noqa: E731
    ref = fs.train_step(fs.value_and_grad(loss_fn), lamb())
    ref_p, ref_s = ref.init(make_params())
    for b in batches:
        ref_p, ref_s, _ = ref.step(ref_p, ref_s, b)
    for stage in (s for s in stages if s >= 1):
        step = fs.zero(fs.value_and_grad(loss_fn), lamb(), mesh=mesh, stage=stage)
        params, state = step.init(make_params())
        for i, b in enumerate(batches):
            lo = rank * rows_per_rank
            local = {k: v[lo : lo + rows_per_rank] for k, v in b.items()}
            params, state, _ = step.step(params, state, local, donate=(i % 2 == 1))
        full = step.gather(params)
        for k in ref_p:
            torch.testing.assert_close(full[k], ref_p[k], rtol=1e-5, atol=1e-6, msg=k)
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


def hsdp_worker(rows_per_rank):
    """Hybrid sharding on a (replicate=2, shard=2) mesh: every stage against the
    single-process reference on the 4-rank global batch, state sharded over "shard" only."""
    from torch.distributed.tensor import DTensor

    mesh = fs.Mesh({"replicate": 2, "shard": 2})
    rank = torch.distributed.get_rank()
    batches = global_batches(rows_per_rank * 4)
    ref_params, ref_norms, ref_losses, _ = reference(batches)
    sizes = {}
    for stage in (0, 1, 2, 3):
        vg = fs.value_and_grad(loss_fn)
        step = fs.zero(vg, make_opt(), mesh=mesh, stage=stage, axis=("replicate", "shard"))
        params, state = step.init(make_params())
        for leaf in fs.tree.leaves((params, state)):
            if isinstance(leaf, DTensor):
                assert leaf.device_mesh.mesh_dim_names == ("shard",)
        sizes[stage] = (fs.tree.nbytes(params), fs.tree.nbytes(state))
        for i, b in enumerate(batches):
            lo = rank * rows_per_rank
            local = {k: v[lo : lo + rows_per_rank] for k, v in b.items()}
            params, state, m = step.step(params, state, local)
            torch.testing.assert_close(m["loss"], ref_losses[i], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(m["grad_norm"], ref_norms[i], rtol=1e-6, atol=1e-7)
        full = step.gather(params)
        for k in ref_params:
            torch.testing.assert_close(full[k], ref_params[k], rtol=1e-5, atol=1e-6)
    return sizes


def gpt_blocks_worker(axis):
    """The GPT of test_gather under stage 3 gather='blocks' on 4 ranks (uneven shapes)."""
    from tests.parallel import test_gather as tg

    world = torch.distributed.get_world_size()
    mesh = fs.Mesh({"dp": world}) if axis == "dp" else fs.Mesh({"replicate": 2, "shard": 2})
    rank = torch.distributed.get_rank()
    model = tg.GPT(tg.CFG, seed=0)
    batches = tg.gpt_batches(tg.ROWS * world)
    ref_p, ref_losses, ref_norms = tg.gpt_reference(model, batches)
    shard_axis = axis if isinstance(axis, str) else axis[-1]
    apply, params = fs.functional(
        model, wrap={tg.Block: lambda f: fs.remat(tg.gather(f, axis=shard_axis))}
    )
    vg = fs.value_and_grad(tg.loss_of(apply))
    step = fs.zero(vg, tg.make_opt(), mesh=mesh, stage=3, axis=axis, gather="blocks")
    q, _, losses, norms, _ = tg.run_zero(step, params, batches, rank)
    for i in range(tg.STEPS):
        torch.testing.assert_close(losses[i], ref_losses[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(norms[i], ref_norms[i], rtol=1e-5, atol=1e-6)
    full = step.gather(q)
    for k, v in ref_p.items():
        torch.testing.assert_close(full[k], v, rtol=1e-5, atol=1e-6, msg=k)
    if axis != "dp":  # fs.gather must name the shard axis
        apply, params = fs.functional(model, wrap={tg.Block: tg.gather(axis="replicate")})
        vg = fs.value_and_grad(tg.loss_of(apply))
        step = fs.zero(vg, tg.make_opt(), mesh=mesh, stage=3, axis=axis, gather="blocks")
        q, s = step.init(params)
        local = {k: v[: tg.ROWS] for k, v in batches[0].items()}
        msg = raises(lambda: step.step(q, s, local), ValueError)
        assert "fs.zero shards params over 'shard'; pass axis='shard'" in msg, msg
    return fs.tree.nbytes(q)


def four_rank_worker():
    out = {"stage3": worker((3,), 2), "hsdp": hsdp_worker(1)}
    out["gpt_dp"] = gpt_blocks_worker("dp")
    out["gpt_hsdp"] = gpt_blocks_worker(("replicate", "shard"))
    return out


def test_zero_on_4_ranks_stage3_hsdp_and_blocks():
    res = run(four_rank_worker, 4, timeout=240)
    full_params = fs.tree.nbytes(make_params())
    full_opt = 2 * full_params  # adam's mu and nu
    for r in res:  # ~1/4 each, within the padding of uneven dims (e.g. 7 rows -> 2,2,2,1)
        assert r["stage3"][(3, "plain")]["params"] < 0.4 * full_params
        assert r["stage3"][(3, "plain")]["opt"] < 0.4 * full_opt
        # HSDP shards over "shard" (2 ranks): ~1/2 of the state, replicated over "replicate"
        (p0, s0), s1, p3 = r["hsdp"][0], r["hsdp"][1][1], r["hsdp"][3][0]
        assert p0 == full_params and 0.4 * s0 < s1 < 0.65 * s0 and 0.4 * p0 < p3 < 0.65 * p0
    # blocks: each rank holds 1/4 of the GPT (dp=4) or 1/2 (HSDP, shard=2)
    assert sum(r["gpt_dp"] for r in res) == sum(r["gpt_hsdp"] for r in res) // 2


def bad_input_worker():
    world = torch.distributed.get_world_size()
    mesh = fs.Mesh(dp=world)
    vg = fs.value_and_grad(loss_fn)
    opt = make_opt()
    msgs = {}
    for name, kwargs in {
        "stage": {"stage": 4},
        "axis": {"stage": 1, "axis": "tp"},
        "repeat": {"stage": 1, "axis": ("dp", "dp")},
        "gather": {"stage": 3, "gather": "layers"},
        "blocks_stage": {"stage": 1, "gather": "blocks"},
    }.items():
        msgs[name] = raises(lambda kw=kwargs: fs.zero(vg, opt, mesh=mesh, **kw), ValueError)
    msgs["mesh"] = raises(lambda: fs.Mesh(dp=world + 1), ValueError)
    step = fs.zero(vg, opt, mesh=mesh, stage=3)
    meta = {k: v.to("meta") for k, v in make_params().items()}
    msgs["init_fn"] = raises(
        lambda: step.init(meta, init_fn=lambda path, m: torch.zeros(2)), ValueError
    )
    params, state = step.init(make_params())
    b = {k: v[:2] for k, v in global_batches(2)[0].items()}
    msgs["full"] = raises(lambda: step.step(make_params(), state, b), ValueError)
    # gather="blocks" with a loss that never calls fs.gather: shards reach the math
    blocks = fs.zero(vg, opt, mesh=mesh, stage=3, gather="blocks")
    params, state = blocks.init(make_params())
    msgs["no_gather_crash"] = raises(lambda: blocks.step(params, state, b), RuntimeError)
    elementwise = fs.value_and_grad(lambda p, b: sum((x**2).sum() for x in p.values()))
    blocks = fs.zero(elementwise, opt, mesh=mesh, stage=3, gather="blocks")
    params, state = blocks.init(make_params())
    msgs["no_gather"] = raises(lambda: blocks.step(params, state, b), ValueError)
    # fs.gather naming an axis the mesh does not have
    from fsharding.parallel.gather import gather

    wrong = fs.value_and_grad(lambda p, b: gather(loss_fn, axis="tp")(p, b))
    blocks = fs.zero(wrong, opt, mesh=mesh, stage=3, gather="blocks")
    params, state = blocks.init(make_params())
    msgs["gather_axis"] = raises(lambda: blocks.step(params, state, b), ValueError)
    torch.distributed.barrier()  # every rank got here: no hang
    return msgs


def test_zero_bad_input_raises_on_every_rank():
    res = run(bad_input_worker, 2)
    for msgs in res:
        assert "stage must be 0, 1, 2 or 3" in msgs["stage"]
        assert "axis='tp' is not an axis" in msgs["axis"]
        assert "repeats an axis" in msgs["repeat"]
        assert "gather must be 'boundary' or 'blocks'" in msgs["gather"]
        assert "gather='blocks' needs stage 2 or 3" in msgs["blocks_stage"]
        assert "has 3 positions but the world size is 2" in msgs["mesh"]
        assert "init_fn returned torch.float32 (2,) for params leaf ['b1']" in msgs["init_fn"]
        assert "params leaf ['b1'] has local shape (5,)" in msgs["full"]
        assert "before gathering any params" in msgs["no_gather_crash"]
        assert "gathered no params" in msgs["no_gather"]
        assert "unknown axis 'tp'" in msgs["gather_axis"]


def test_zero_on_a_local_mesh_equals_plain_pytorch():
    """A local mesh (one process) against torch.optim.AdamW + clip_grad_norm_ on an
    nn.Module (an independent reference), every stage, meta init through init_fn too."""
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            p = make_params()
            self.emb, self.w1, self.b1, self.w2 = (nn.Parameter(p[k]) for k in list(p)[:4])
            self.scale = nn.Parameter(p["scale"])

    batches = global_batches(4)
    sched = optim.linear_schedule(3e-2, 1e-2, STEPS)
    for stage in (0, 1, 2, 3):
        for meta in (False, True):
            net = Net().double()
            decay = [net.emb, net.w1, net.w2]
            torch_opt = torch.optim.AdamW(
                [{"params": decay}, {"params": [net.b1, net.scale], "weight_decay": 0.0}],
                lr=3e-2,
                weight_decay=0.1,
            )
            step = fs.zero(fs.value_and_grad(loss_fn), make_opt(), mesh=fs.Mesh(dp=1), stage=stage)
            init = {k: v.double() for k, v in make_params().items()}
            if meta:
                params, state = step.init(
                    {k: v.to("meta") for k, v in init.items()},
                    init_fn=lambda path, m, init=init: init[path[2:-2]].clone(),
                )
            else:
                params, state = step.init(init)
            for i, b in enumerate(batches):
                params, state, m = step.step(params, state, b, donate=i % 2 == 1)
                for g in torch_opt.param_groups:
                    g["lr"] = sched(i)
                torch_opt.zero_grad()
                loss = loss_fn(dict(net.named_parameters()), b)
                loss.backward()
                grads = [p.grad for p in net.parameters()]
                norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
                if norm > 0.5:  # optax's rule (torch's clip_grad_norm_ divides by norm + 1e-6)
                    torch._foreach_mul_(grads, float(0.5 / norm))
                torch_opt.step()
                torch.testing.assert_close(m["loss"], loss.detach(), rtol=1e-10, atol=0)
                torch.testing.assert_close(m["grad_norm"], norm, rtol=1e-10, atol=0)
            full = step.gather(params)
            for k, v in net.named_parameters():
                torch.testing.assert_close(full[k], v.detach(), rtol=1e-10, atol=1e-12, msg=k)


@given(
    shapes=st.lists(
        st.lists(st.integers(0, 5), min_size=1, max_size=3).map(tuple), min_size=1, max_size=4
    ),
    world=st.integers(1, 4),
    bucket_bytes=st.sampled_from([16, 2**20]),
)
def test_layout_round_trips_like_the_collectives(shapes, world, bucket_bytes):
    """The bucket packing, with the collectives simulated in one process: gathering every
    rank's rows gives the full tensors; reduce-scattering full tensors gives each rank its
    rows of the sum (uneven dims, empty trailing ranks, several buckets)."""
    from fsharding.parallel import _buckets as L

    g = torch.Generator().manual_seed(len(shapes) * 10 + world)
    fulls = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    lays = [L.LeafLayout(i, s, torch.float64, world) for i, s in enumerate(shapes)]
    for b in L.make_buckets(lays, bucket_bytes):
        mine = [fulls[lay.index] for lay in b.layouts]
        segs = [
            b.gather_input([L.shard_rows(t, lay, r) for t, lay in zip(mine, b.layouts)], "cpu")
            for r in range(world)
        ]
        for t, got in zip(mine, b.unpack_gathered(torch.cat(segs))):
            assert torch.equal(got, t)
        total = sum(b.scatter_input([t * (r + 1) for t in mine], "cpu") for r in range(world))
        for r in range(world):
            seg = total.view(world, b.numel)[r]
            for t, lay, got in zip(mine, b.layouts, b.unpack_scattered(seg, r)):
                lo, hi = lay.rows(r)
                want = (t * sum(range(1, world + 1)))[lo:hi]
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
                assert got.shape == lay.local_shape(r)
