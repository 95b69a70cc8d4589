"""fs.zero starts its gradient reduction inside backward (gather="boundary", stages 0-3).

Proof that it happens: the collectives dispatched *while the grad function runs* are
counted (one per bucket from the second step on; the first step only probes). Proof that
it is safe: the params after every step equal a single-process run, also

* for grad functions whose returned grads are not the tapped ones (accumulation, in-place
  post-processing), where overlap must switch itself off — also when only one rank starts
  editing, in a step that already launched its buckets (every rank falls back together);
* when a param gets a grad on one rank only (its bucket is complete in backward there and
  launched after backward elsewhere: the ranks must still issue the same collectives in
  the same order, or buckets get summed with the wrong partners).

And that it leaves gloo nothing to do at exit: every collective returns once gloo's worker
has dropped the work (``collectives.settle``); a Work object left referenced would make
settle give up after 2 s with a RuntimeWarning, which no step may raise.
"""

from __future__ import annotations

import warnings

import torch

import fsharding as fs
from fsharding import optim
from tests.dist_utils import run
from tests.parallel.test_zero import global_batches, loss_fn, make_params

STEPS = 4


def _params(extra: bool) -> dict:
    g = torch.Generator().manual_seed(5)
    more = {"extra": torch.randn(6, 3, generator=g)} if extra else {}  # see _rank0_only
    return {**make_params(), **more}


def _rank():
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else -1


def _doubled(p, b):
    """A grad function that edits the tapped grads in place after backward."""
    loss, g = fs.value_and_grad(loss_fn)(p, b)
    for v in g.values():
        v.mul_(2.0)
    return loss, g


_CALLS = [0]


def _late_edit_on_last_rank(p, b):
    """From its 3rd call on, the last rank touches a grad in place (same values, but the
    version counter moves): the other ranks' checks pass, its own does not."""
    loss, g = fs.value_and_grad(loss_fn)(p, b)
    _CALLS[0] += 1
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if _CALLS[0] >= 3 and _rank() == world - 1:
        g["w1"].add_(0.0)
    return loss, g


def _rank0_only(p, b):
    """``extra`` enters the loss on rank 0 only (data-dependent use, e.g. MoE experts)."""
    loss = loss_fn(p, b)
    return loss + 1e-2 * (p["extra"] ** 2).sum() if _rank() == 0 else loss


def _grad_fns(world: int) -> dict:
    """name -> (grad_fn on the ranks, the single-process equivalent on the global batch)."""
    vg = fs.value_and_grad(loss_fn)
    mean_extra = lambda p, b: loss_fn(p, b) + 1e-2 / world * (p["extra"] ** 2).sum()  # noqa: E731
    return {
        "plain": (vg, vg),
        "accumulate": (fs.accumulate(vg, steps=2), vg),
        "doubled in place": (_doubled, _doubled),
        "late edit on one rank": (_late_edit_on_last_rank, vg),
        "rank 0 only": (fs.value_and_grad(_rank0_only), fs.value_and_grad(mean_extra)),
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
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        out = _steps(world)
    out["settle warnings"] = [str(w.message) for w in caught if "settle" in str(w.message)]
    return out


def _steps(world: int) -> dict:
    from fsharding.parallel import _buckets, _overlap

    assert not _overlap.enabled(torch.distributed.group.WORLD)  # gloo: off by default
    _overlap.ENABLED = True  # (NCCL's default) tested here, on gloo
    _buckets.BUCKET_BYTES = 64  # a bucket per leaf: several collectives to overlap
    rank = _rank()
    # 4 ranks: hybrid sharding, reduce-scatter over "shard" in backward, then the replicas
    mesh = fs.Mesh(dp=2) if world == 2 else fs.Mesh({"replicate": 2, "shard": 2})
    axis = "dp" if world == 2 else ("replicate", "shard")
    batches = global_batches(4 * world)
    out = {}
    for name, (grad_fn, ref_fn) in _grad_fns(world).items():
        ref = fs.train_step(ref_fn, optim.adam(1e-2))
        extra = name == "rank 0 only"
        ref_params, ref_state = ref.init(_params(extra))
        refs = []
        for b in batches[:STEPS]:
            ref_params, ref_state, _ = ref.step(ref_params, ref_state, b)
            refs.append({k: v.clone() for k, v in ref_params.items()})
        for stage in (0, 1, 2, 3):
            log: list[int] = []
            _CALLS[0] = 0
            gf = _counting(grad_fn, log)
            step = fs.zero(gf, optim.adam(1e-2), mesh=mesh, stage=stage, axis=axis)
            params, state = step.init(_params(extra))
            for i, b in enumerate(batches[:STEPS]):
                local = {k: v[rank * 4 : rank * 4 + 4] for k, v in b.items()}
                params, state, _ = step.step(params, state, local, donate=i % 2 == 1)
                full = step.gather(params)
                for k, v in refs[i].items():
                    what = f"{name}, stage {stage}, step {i}, {k}"
                    assert torch.allclose(full[k], v, rtol=1e-5, atol=1e-6), what
            out[(name, stage)] = log
    # the buckets the step uses: every leaf flattened (stage 0), sharded leaves (1-3)
    for extra in (False, True):
        leaves = fs.tree.leaves(_params(extra))
        lays = [
            _buckets.LeafLayout(i, tuple(x.shape), x.dtype, 2)
            for i, x in enumerate(x for x in leaves if x.dim() >= 1)
        ]
        flat, sharded = _buckets.flat_buckets(leaves), _buckets.make_buckets(lays)
        out[("buckets", extra)] = (len(flat), len(sharded))
    return out


def test_zero_reduces_grads_during_backward_and_only_when_that_is_exact():
    for world in (2, 4):
        every = run(_worker, world, world)
        assert all(not r["settle warnings"] for r in every), [r["settle warnings"] for r in every]
        logs = every[0]  # rank 0's counts
        for stage in (0, 1, 2, 3):
            counts = {}
            for extra in (False, True):
                flat, sharded = logs[("buckets", extra)]
                assert flat >= 2 and sharded >= 2  # several buckets, so some could come late
                # stage 0 under hybrid sharding reduces over two groups: not overlapped
                counts[extra] = (flat if world == 2 else 0) if stage == 0 else sharded
            n = counts[False]
            # first step probes (nothing launched inside grad_fn), then every bucket's
            # collective is launched before grad_fn returns (on rank 0 "extra" has a grad)
            assert logs[("plain", stage)] == [0] + [n] * (STEPS - 1), (world, stage)
            m = counts[True]
            assert logs[("rank 0 only", stage)] == [0] + [m] * (STEPS - 1), (world, stage)
            # not the tapped grads: overlap switched off after the probe, results exact
            assert logs[("accumulate", stage)] == [0] * STEPS, (world, stage)
            assert logs[("doubled in place", stage)] == [0] * STEPS, (world, stage)
            # one rank's check fails in step 3 after every rank launched: all fall back
            assert logs[("late edit on one rank", stage)] == [0, n, n, 0], (world, stage)
