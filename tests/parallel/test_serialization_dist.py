"""fs.save / fs.load across world sizes and ZeRO stages, on gloo ranks through fs.launch.

A GPT's ZeRO-3 training state (AdamW) saved on 4 ranks loads on 4 ranks (training resumes
bitwise), on 2 ranks into a stage-3 layout and in this process (no process group) into
``fs.train_step``'s plain tensors (values exactly the gathered originals, training resumes
to float tolerance). A pipeline's stages saved under distinct keys load in one process.
Errors on one rank raise on every rank; a rank killed mid-save leaves the previous
checkpoint as ``fs.latest``.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.nn.functional as F

import fsharding as fs
from fsharding import optim
from fsharding import serialization as ser
from fsharding.models import GPT, GPTConfig
from tests.dist_utils import raises, run

# vocab 37: embedding and head rows shard unevenly over 2 and 4 ranks
CFG = GPTConfig(vocab_size=37, seq_len=8, d_model=16, n_layers=2, n_heads=2)
ROWS = 8  # global batch


def make():
    apply, params = fs.functional(GPT(CFG, seed=0))

    def loss(p, b):
        return F.cross_entropy(apply(p, b["x"]).flatten(0, 1), b["y"].flatten())

    return fs.value_and_grad(loss), params


def make_opt():
    return optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, weight_decay=0.1))


def batch(i, rank=0, world=1):
    g = torch.Generator().manual_seed(1000 + i)
    b = {k: torch.randint(0, CFG.vocab_size, (ROWS, CFG.seq_len), generator=g) for k in "xy"}
    n = ROWS // world
    return {k: v[rank * n : (rank + 1) * n] for k, v in b.items()}


def full(tree):
    return fs.tree.map(lambda x: x.full_tensor() if fs.tree.is_dtensor(x) else x, tree)


def local_clone(tree):
    return [fs.tree.local_tensor(x).clone() for x in fs.tree.leaves(tree) if torch.is_tensor(x)]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def zero3(world):
    gf, params = make()
    step = fs.zero(gf, make_opt(), mesh=fs.Mesh(dp=world), stage=3)
    return step, *step.init(params)


def train(step, params, state, steps, rank, world, donate=False):
    losses = []
    for i in steps:
        params, state, m = step.step(params, state, batch(i, rank, world), donate=donate)
        losses.append(m["loss"].item())
    return params, state, losses


def four_ranks(d):
    """Save ZeRO-3 state at step 2 (sync, and async while training donates in place)."""
    from torch.distributed.tensor import DTensor, Shard

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    step, params, state = zero3(world)
    params, state, _ = train(step, params, state, range(2), rank, world)
    tree = {"params": params, "opt_state": state, "step": 2}
    assert isinstance(params["head.weight"], DTensor)
    fs.save(f"{d}/step-2", tree, step=2)
    saved = full(tree)
    fut = fs.save(f"{d}/async-2", tree, async_=True, step=2)
    # the uninterrupted run goes on at once, updating in place (donate) during the write
    p1, s1, losses = train(step, params, state, range(2, 5), rank, world, donate=True)
    assert fut.result(timeout=60) == f"{d}/async-2"
    # resume on the same world size: bitwise the same
    like = dict(zip(("params", "opt_state"), zero3(world)[1:]), step=0)
    before = local_clone(like)
    got = fs.load(f"{d}/step-2", like)
    assert same(local_clone(like), before), "load wrote into like"
    for path, x in fs.tree.leaves_with_path(got):
        if isinstance(x, DTensor):
            assert x.placements == (Shard(0),), path
    assert got["step"] == 2
    p2, s2, losses2 = train(step, got["params"], got["opt_state"], range(2, 5), rank, world)
    assert losses2 == losses
    assert same(local_clone((p2, s2)), local_clone((p1, s1)))
    final = full(p1)  # a collective: every rank
    return {"saved": saved, "losses": losses, "final": final} if rank == 0 else None


def two_ranks(d, ref):
    """Load the 4-rank checkpoints into a 2-rank stage-3 layout; pipeline stages under
    distinct keys; errors on one rank raise on both."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    step, params, state = zero3(world)
    like = {"params": params, "opt_state": state, "step": 0}
    before = local_clone(like)
    got = fs.load(f"{d}/step-2", like)
    assert same(local_clone(like), before), "load wrote into like"
    exact = full(got)
    assert same(local_clone(exact), local_clone(ref["saved"])), "values differ from the saved"
    assert same(local_clone(full(fs.load(f"{d}/async-2", like))), local_clone(ref["saved"]))
    fs.save(f"{d}/on-2", got)  # 4 -> 2 -> 1: saved again here, loaded in one process
    p, _, losses = train(step, got["params"], got["opt_state"], range(2, 5), rank, world)
    final = full(p)
    # stage 3 -> stage 0: sharded DTensors -> plain full tensors on every rank
    gf, params0 = make()
    p0, s0 = fs.zero(gf, make_opt(), mesh=fs.Mesh(dp=world), stage=0).init(params0)
    plain = fs.load(f"{d}/step-2", {"params": p0, "opt_state": s0, "step": 0})
    assert not any(fs.tree.is_dtensor(x) for x in fs.tree.leaves(plain))
    assert same(local_clone(plain), local_clone(ref["saved"]))

    # a 2-stage pipeline: each rank saves its own stage and generator state
    gen = torch.Generator().manual_seed(rank)
    mine = {f"stage{rank}": {"w": torch.full((rank + 2, 3), float(rank))},
            "rng": {f"rank{rank}": gen.get_state()}, "schedule": "1f1b"}  # fmt: skip
    fs.save(f"{d}/pipe", mine, step=7)
    back = fs.load(f"{d}/pipe", mine)  # each rank its own keys: the union covers the file
    assert torch.equal(back[f"stage{rank}"]["w"], mine[f"stage{rank}"]["w"])

    # a leaf with fewer rows than ranks: rank 1's ZeRO-3 shard of b is empty (the
    # non-finite check raised on it); saved and loaded exactly
    tiny = fs.zero(fs.value_and_grad(lambda p, b: (p["w"].sum() + p["b"].sum()) * b.sum()),
                   optim.adamw(1e-3), mesh=fs.Mesh(dp=world), stage=3)  # fmt: skip
    tp, ts = tiny.init({"w": torch.ones(4, 3), "b": torch.ones(1)})
    tp, ts, _ = tiny.step(tp, ts, torch.ones(2))
    empty_shard = tp["b"].to_local().numel() == 0
    fs.save(f"{d}/tiny", {"params": tp, "opt": ts})
    back = fs.load(f"{d}/tiny", {"params": tp, "opt": ts})
    assert same(local_clone(full(back)), local_clone(full({"params": tp, "opt": ts})))

    # errors on one rank raise on every rank, nothing is committed
    errors = {"empty_shard": empty_shard}
    # per-rank generator states under one key: taken as replicated, the values differ
    gen = torch.Generator().manual_seed(100 + rank)
    errors["replica"] = raises(
        lambda: fs.save(f"{d}/rng", {"rng": gen.get_state(), "x": torch.ones(2)}),
        fs.CheckpointError,
    )
    errors["path"] = raises(
        lambda: fs.save(f"{d}/bad" if rank == 0 else f"{d}/other", {"x": 1}), fs.CheckpointError
    )
    nan = torch.ones(4) if rank == 0 else torch.tensor([1.0, float("nan")])
    errors["nan"] = raises(lambda: fs.save(f"{d}/nan", {f"r{rank}": nan}), fs.CheckpointError)
    writer = ser._dcp_classes()[0]
    original = writer.write_data
    if rank == 1:

        def boom(self, plan, planner):
            raise OSError("disk full on rank 1")

        writer.write_data = boom
    errors["write"] = raises(lambda: fs.save(f"{d}/w", {"x": params}), fs.CheckpointError)
    writer.write_data = original
    other = like if rank == 0 else dict(like, extra=torch.zeros(1))
    errors["load"] = raises(lambda: fs.load(f"{d}/step-2", other), fs.CheckpointError)
    errors["listing"] = sorted(os.listdir(d))

    # an async save still writing when fn returns: fs.launch drains it before the group
    # is destroyed (it was never committed)
    def slow(self, plan, planner):
        time.sleep(1.0)
        return original(self, plan, planner)

    writer.write_data = slow
    w = fs.from_local(torch.full((2,), float(rank)), fs.Mesh(dp=world), fs.P("dp"))
    fs.save(f"{d}/async-end", {"w": w, "n": 5}, async_=True)  # no result()
    return {"exact": exact, "losses": losses, "final": final, "errors": errors}


def test_zero3_state_across_world_sizes_stages_and_pipeline(tmp_path):
    d = str(tmp_path)
    ref = run(four_ranks, 4, d, timeout=180)[0]
    assert fs.latest(d) in (f"{d}/step-2", f"{d}/async-2")
    two = run(two_ranks, 2, d, ref, timeout=180)

    # this process has no process group: load into fs.train_step's plain layout
    assert not torch.distributed.is_initialized()
    gf, params = make()
    step = fs.train_step(gf, make_opt())
    p0, s0 = step.init(params)
    like = {"params": p0, "opt_state": s0, "step": 0}
    before = local_clone(like)
    assert fs.latest(d) == f"{d}/pipe"  # step 7
    got = fs.load(f"{d}/async-2", like)  # written while the ranks trained on in place
    assert same(local_clone(like), before)
    assert same(local_clone(got), local_clone(ref["saved"]))  # exactly the gathered state
    fs.tree.check_same_structure(got, ref["saved"])
    assert same(local_clone(fs.load(f"{d}/on-2", like)), local_clone(ref["saved"]))
    p, _, losses = train(step, got["params"], got["opt_state"], range(2, 5), 0, 1)
    for name, res in (("1 process", (losses, p)), ("2 ranks", (two[0]["losses"], two[0]["final"]))):
        torch.testing.assert_close(res[0], ref["losses"], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(res[1], ref["final"], rtol=1e-4, atol=1e-5, msg=name)

    # the pipeline's two stages in one process
    state = torch.Generator().get_state()
    pipe = fs.load(
        f"{d}/pipe",
        {"stage0": {"w": torch.empty(2, 3, device="meta")}, "stage1": {"w": torch.empty(3, 3)},
         "rng": {"rank0": torch.empty_like(state, device="meta"), "rank1": state},
         "schedule": ""},
    )  # fmt: skip
    assert torch.equal(pipe["stage1"]["w"], torch.ones(3, 3)) and pipe["schedule"] == "1f1b"
    assert torch.equal(pipe["stage0"]["w"], torch.zeros(2, 3))
    for r in (0, 1):
        g = torch.Generator()
        g.set_state(pipe["rng"][f"rank{r}"])
        want = torch.rand(3, generator=torch.Generator().manual_seed(r))
        assert torch.equal(torch.rand(3, generator=g), want)

    errors = [t["errors"] for t in two]
    assert errors[1]["empty_shard"]
    for e in errors:
        assert "['rng'] holds different values on rank 0 and rank 1" in e["replica"]
        assert "rng_rank" in e["replica"]
        assert "different paths" in e["path"]
        assert "['r1'] holds NaN" in e["nan"]
        assert "disk full on rank 1" in e["write"]
        assert "['extra']" in e["load"]
    assert "rank 1" in errors[0]["nan"] and "rank 1" in errors[0]["load"]
    listing = errors[0]["listing"]
    assert set(listing) == {"step-2", "async-2", "on-2", "pipe", "tiny"}, listing
    end = fs.load(f"{d}/async-end", {"w": torch.empty(4, device="meta"), "n": 0})
    assert torch.equal(end["w"], torch.tensor([0.0, 0.0, 1.0, 1.0])) and end["n"] == 5


def killed(d):
    rank = torch.distributed.get_rank()
    mesh = fs.Mesh(dp=2)
    w = fs.from_local(torch.full((3, 2), float(rank)), mesh, fs.P("dp"))
    fs.save(f"{d}/step-1", {"w": w, "n": 1}, step=1)
    if rank == 1:
        writer = ser._dcp_classes()[0]

        def die(self, plan, planner):
            os._exit(3)

        writer.write_data = die
    fs.save(f"{d}/step-2", {"w": w * 2, "n": 2}, step=2)


@pytest.mark.timeout(120)
def test_rank_killed_mid_save_leaves_the_previous_checkpoint(tmp_path):
    d = str(tmp_path)
    with pytest.raises(fs.LaunchError, match="rank 1"):
        run(killed, 2, d, timeout=60)
    assert fs.latest(d) == f"{d}/step-1"
    assert not os.path.exists(f"{d}/step-2")
    assert [n for n in os.listdir(d) if n.startswith(".step-2.partial-")]  # left, ignored
    got = fs.load(fs.latest(d), {"w": torch.empty(6, 2, device="meta"), "n": 0})
    assert torch.equal(got["w"], torch.cat([torch.zeros(3, 2), torch.ones(3, 2)]))
    assert got["n"] == 1
