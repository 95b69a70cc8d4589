"""fs.zero starts its gradient reduction inside backward (gather="boundary", stages 0-3).

Proof that it happens: the collectives dispatched *while the grad function runs* are
counted (one per bucket from the second step on; the first step only probes). Proof that
it is safe: the params after every step equal a single-process run, also for grad
functions whose returned grads are not the tapped ones (accumulation, in-place
post-processing), where overlap must switch itself off.
"""

from __future__ import annotations

import torch

import fsharding as fs
from fsharding import optim
from tests.dist_utils import run
from tests.transforms.test_zero import global_batches, loss_fn, make_params

STEPS = 4


def _doubled(p, b):
    """A grad function that edits the tapped grads in place after backward."""
    loss, g = fs.value_and_grad(loss_fn)(p, b)
    for v in g.values():
        v.mul_(2.0)
    return loss, g


def _grad_fns():
    return {
        "plain": fs.value_and_grad(loss_fn),
        "accumulate": fs.accumulate(fs.value_and_grad(loss_fn), steps=2),
        "doubled in place": _doubled,
    }


def _counting(grad_fn, log):
    from fsharding.memory import _CommCounter

    def counted(p, b):
        with _CommCounter() as c:
            out = grad_fn(p, b)
        log.append(sum(c.calls.values()))
        return out

    return counted


def _worker(world: int) -> dict:
    from fsharding.transforms import zero_layout, zero_overlap

    assert not zero_overlap.enabled(torch.distributed.group.WORLD)  # gloo: off by default
    zero_overlap.ENABLED = True  # (NCCL's default) tested here, on gloo
    zero_layout.BUCKET_BYTES = 64  # a bucket per leaf: several collectives to overlap
    rank = torch.distributed.get_rank()
    # 4 ranks: hybrid sharding, reduce-scatter over "shard" in backward, then the replicas
    mesh = fs.Mesh(dp=2) if world == 2 else fs.Mesh({"replicate": 2, "shard": 2})
    axis = "dp" if world == 2 else ("replicate", "shard")
    batches = global_batches(4 * world)
    out = {}
    for name, grad_fn in _grad_fns().items():
        ref = fs.train_step(grad_fn, optim.adam(1e-2))
        ref_params, ref_state = ref.init(make_params())
        refs = []
        for b in batches[:STEPS]:
            ref_params, ref_state, _ = ref.step(ref_params, ref_state, b)
            refs.append({k: v.clone() for k, v in ref_params.items()})
        for stage in (0, 1, 2, 3):
            log: list[int] = []
            gf = _counting(grad_fn, log)
            step = fs.zero(gf, optim.adam(1e-2), mesh=mesh, stage=stage, axis=axis)
            params, state = step.init(make_params())
            for i, b in enumerate(batches[:STEPS]):
                local = {k: v[rank * 4 : rank * 4 + 4] for k, v in b.items()}
                params, state, _ = step.step(params, state, local, donate=i % 2 == 1)
                full = step.gather(params)
                for k, v in refs[i].items():
                    what = f"{name}, stage {stage}, step {i}, {k}"
                    assert torch.allclose(full[k], v, rtol=1e-5, atol=1e-6), what
            out[(name, stage)] = log
    # the buckets the step uses: every leaf flattened (stage 0), sharded leaves (1-3)
    leaves = fs.tree.leaves(make_params())
    lays = [
        zero_layout.LeafLayout(i, tuple(x.shape), x.dtype, 2)
        for i, x in enumerate(x for x in leaves if x.dim() >= 1)
    ]
    out["buckets"] = (len(zero_layout.flat_buckets(leaves)), len(zero_layout.make_buckets(lays)))
    return out


def test_zero_reduces_grads_during_backward_and_only_when_that_is_exact():
    for world in (2, 4):
        logs = run(_worker, world, world)[0]
        flat, sharded = logs["buckets"]
        assert flat >= 2 and sharded >= 2  # several buckets, so some could come late
        for stage in (0, 1, 2, 3):
            per_step = logs[("plain", stage)]
            # stage 0 under hybrid sharding reduces over two groups: not overlapped
            expected = (flat if world == 2 else 0) if stage == 0 else sharded
            # first step probes (nothing launched inside grad_fn), then every bucket's
            # collective is launched before grad_fn returns
            assert per_step == [0] + [expected] * (STEPS - 1), (world, stage, per_step)
            # not the tapped grads: overlap switched off after the probe, results still exact
            assert logs[("accumulate", stage)] == [0] * STEPS, (world, stage)
            assert logs[("doubled in place", stage)] == [0] * STEPS, (world, stage)
