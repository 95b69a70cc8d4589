"""fs.memory_report: measured bytes of model state, saved activations and communication.

One process: saved activations against hand-counted tensors (remat keeps only inputs;
accumulate's peak is one microbatch). Two gloo ranks: logical collective bytes against
their definitions, DP ≈ 2Ψ and ZeRO-3 per block ≈ 3Ψ (times (N-1)/N, exactly up to the
padding of uneven shards and a few scalars), and per-rank model state of stages 1-3
against the single-process figures.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fsharding as fs
from fsharding import optim
from fsharding.memory import MemoryReport, memory_report
from fsharding.models.gpt import GPT, Block, GPTConfig
from fsharding.parallel.gather import gather
from tests.dist_utils import run

CFG = GPTConfig(vocab_size=7, seq_len=5, d_model=6, n_layers=3, n_heads=2, mlp_ratio=2)


# ----------------------------------------------------------------------------- one process


def test_saved_activations_grads_and_state_in_one_process():
    def loss_fn(w, b):
        return torch.tanh(b @ w).sum()

    w, x = torch.randn(8, 8), torch.randn(16, 8)
    for fn, saved in (
        (loss_fn, 2 * 16 * 8 * 4),  # x (for w's grad) and tanh's output
        (fs.remat(loss_fn), 16 * 8 * 4),  # the region's inputs only (w is a param)
    ):
        step = fs.train_step(fs.value_and_grad(fn), optim.sgd(0.1, momentum=0.9))
        params, opt_state = step.init(w)
        r = memory_report(step, params, opt_state, x)
        assert isinstance(r, MemoryReport) and (r.rank, r.world_size) == (0, 1)
        assert r.saved_activations == saved
        assert r.params == r.grads == r.backward_grads == 8 * 8 * 4
        assert r.opt_state == 8 * 8 * 4 and r.model_state == 3 * 8 * 8 * 4
        assert r.comm_total == 0 and r.gathered_params == 0
    # a peak, not a total: with 2 microbatches one microbatch's graph is alive at a time
    # (its rows of x are a view: x's whole storage counts, plus one microbatch's tanh)
    step = fs.train_step(fs.accumulate(fs.value_and_grad(loss_fn), steps=2), optim.sgd(0.1))
    params, opt_state = step.init(w)
    r = memory_report(step, params, opt_state, x)
    assert r.saved_activations == 16 * 8 * 4 + 8 * 8 * 4
    text = str(r)
    assert "saved activations (peak)" in text and "768 B" in text


def test_pipeline_stages_in_one_process():
    """fs.pipeline on a one-rank axis (both stages here): each stage's saved activations
    (the stages' sum of peaks bounds the report's peak), the activations stage 1 held
    (GPipe: all m microbatches of x @ w1), no point-to-point traffic."""
    w1, w2, x = torch.randn(8, 8), torch.randn(8, 3), torch.randn(16, 8)
    stages = [lambda p, x: torch.tanh(x @ p), lambda p, h: h @ p]
    f = fs.pipeline(
        stages,
        lambda y, t: ((y - t) ** 2).mean(),
        mesh=fs.Mesh(pp=1),
        microbatches=4,
        virtual_stages=2,
        schedule="gpipe",
    )
    step = fs.train_step(lambda p, b, **kw: f(p, *b, **kw), optim.sgd(0.1))
    params, opt_state = step.init([w1, w2])
    r = memory_report(step, params, opt_state, (x, torch.zeros(16, 3)))
    assert set(r.stages) == {0, 1}
    s0, s1 = r.stages[0], r.stages[1]
    # stage 0: x (a view: its whole storage, once) and tanh's output, all 4 microbatches
    assert s0.saved_activations == 16 * 8 * 4 + 16 * 8 * 4
    # stage 1: h @ w2 saves h, a received leaf (excluded); the loss saves y - t
    assert s1.saved_activations == 16 * 3 * 4
    assert s1.received_activations == 16 * 8 * 4 and s0.received_activations == 0
    assert r.saved_activations <= s0.saved_activations + s1.saved_activations
    assert all(st.p2p_sent == st.p2p_received == st.messages_sent == 0 for st in (s0, s1))
    assert "pipeline stages" in str(r)
    # a step that is no pipeline has no stages (and no such table)
    plain = fs.train_step(fs.value_and_grad(lambda p, x: (x @ p).sum()), optim.sgd(0.1))
    r = memory_report(plain, *plain.init(w1), x)
    assert r.stages == {} and "pipeline" not in str(r)


def test_memory_report_rejects_a_non_step():
    with pytest.raises(TypeError, match="step must be the Step"):
        memory_report(lambda p: p, {}, (), None)


# ----------------------------------------------------------------------------- 2 ranks


def loss_of(apply):
    def loss_fn(p, b):
        return F.cross_entropy(apply(p, b["x"]).flatten(0, 1), b["y"].flatten())

    return loss_fn


def padded_bytes(params, world) -> int:
    """Bytes of the params with dim 0 padded to a multiple of ``world`` (collective size)."""
    return sum(
        math.ceil(p.shape[0] / world) * world * p[0].numel() * p.element_size()
        for p in params.values()
    )


def collectives_worker():
    import torch.distributed as dist

    from fsharding.memory import _CommCounter

    world = dist.get_world_size()
    counter = _CommCounter()
    x = torch.ones(1000)
    with counter:
        dist.all_reduce(x)
        dist.all_gather_into_tensor(torch.empty(world * 1000), x)
        dist.reduce_scatter_tensor(torch.empty(500), torch.ones(500 * world))
        C = torch.ops._c10d_functional
        name = dist.group.WORLD.group_name
        C.wait_tensor(C.all_gather_into_tensor(x, world, name))
        C.wait_tensor(C.all_reduce(x, "sum", name))
    return counter.bytes, counter.calls


def memory_worker():
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = fs.Mesh(dp=world)
    model = GPT(CFG, seed=0)
    g = torch.Generator().manual_seed(1)
    batch = {
        "x": torch.randint(0, 7, (2 * world, 5), generator=g),
        "y": torch.randint(0, 7, (2 * world, 5), generator=g),
    }
    local = {k: v[2 * rank : 2 * rank + 2] for k, v in batch.items()}
    opt = optim.sgd(0.1, momentum=0.9)  # state: one param-shaped trace
    reports = {}
    apply, params = fs.functional(model)
    single = fs.train_step(fs.value_and_grad(loss_of(apply)), opt)
    reports["single"] = memory_report(single, *single.init(params), batch)
    for stage in (0, 1, 2, 3):
        step = fs.zero(fs.value_and_grad(loss_of(apply)), opt, mesh=mesh, stage=stage)
        reports[stage] = memory_report(step, *step.init(params), local)
    apply, params = fs.functional(model, wrap={Block: lambda f: fs.remat(gather(f))})
    step = fs.zero(fs.value_and_grad(loss_of(apply)), opt, mesh=mesh, stage=3, gather="blocks")
    reports["blocks"] = memory_report(step, *step.init(params), local)
    return {k: _plain(r) for k, r in reports.items()}, collectives_worker()


def _plain(r: MemoryReport) -> dict:
    return {f: getattr(r, f) for f in r.__dataclass_fields__} | {"text": str(r)}


def test_memory_report_on_2_ranks():
    world = 2
    res = run(memory_worker, world, timeout=180)
    model = GPT(CFG, seed=0)
    params = dict(model.named_parameters())
    psi = sum(p.numel() * 4 for p in params.values())
    psi_pad = padded_bytes(params, world)
    blocks = [dict(b.named_parameters()) for b in model.blocks]
    outside = {k: v for k, v in params.items() if not k.startswith("blocks.")}
    f = (world - 1) / world  # the (N-1)/N of ring collectives
    print(f"Ψ = {psi} B ({psi_pad} B padded to {world} ranks)")
    for reports, (coll_bytes, coll_calls) in res:
        # the definitions: all-reduce 2B(N-1)/N, all-gather B(N-1), reduce-scatter B(N-1)/N
        want = {
            "all_reduce": 2 * (2 * 4000 * f),
            "all_gather": 2 * 4000,
            "reduce_scatter": 4000 * f,
        }
        assert coll_bytes == want
        assert coll_calls == {"all_reduce": 2, "all_gather": 2, "reduce_scatter": 1}
        single = reports["single"]
        assert single["comm_bytes"] == {} and single["params"] == psi
        for key in (0, 1, 2, 3, "blocks"):
            print(f"--- {key}\n{reports[key]['text']}")
        # DP (stage 0): all-reduce of the grads, 2Ψ(N-1)/N, + the loss (summed in float64)
        dp = reports[0]["comm_bytes"]
        assert dp == {"all_reduce": 2 * (psi + 8) * f}
        assert abs(sum(dp.values()) / (psi * f) - 2) < 0.01
        # ZeRO-1 (and 2): reduce-scatter the grads, all-gather the updated params: 2Ψ
        for stage in (1, 2):
            z = reports[stage]["comm_bytes"]
            assert z["reduce_scatter"] == z["all_gather"] == psi_pad * f, stage
            assert abs(sum(z.values()) / (psi * f) - 2) < 0.05, stage
        # ZeRO-3 per block with remat: gather forward and again in backward, reduce-scatter
        z3 = reports["blocks"]["comm_bytes"]
        pad_blocks = sum(padded_bytes(b, world) for b in blocks)
        pad_outside = padded_bytes(outside, world)
        assert z3["all_gather"] == (2 * pad_blocks + pad_outside) * f  # outside: once
        assert z3["reduce_scatter"] == psi_pad * f
        ratio = sum(z3.values()) / (psi * f)
        assert 2.7 < ratio < 3.2, ratio  # 3Ψ minus the once-gathered outside, plus padding
        # model state per rank: stage 1 shards opt state and the reduced grads, 2 the same,
        # 3 the params too; the ranks' shards partition each leaf (no padding stored)
        sharding = {
            1: ("opt_state", "grads"),
            2: ("opt_state", "grads"),
            3: ("opt_state", "grads", "params"),
            "blocks": ("opt_state", "grads", "params"),
        }
        for stage, sharded in sharding.items():
            for field in ("params", "grads", "opt_state"):
                mine = reports[stage][field]
                if field in sharded:
                    assert mine < 0.6 * single[field], (stage, field)
                else:
                    assert mine == single[field], (stage, field)
        assert reports[3]["backward_grads"] == psi  # boundary: full grads out of grad_fn
        assert reports[3]["gathered_params"] == psi > reports["blocks"]["gathered_params"]
    for stage in (1, 2, 3, "blocks"):
        for field in ("grads", "opt_state"):
            assert sum(r[stage][field] for r, _ in res) == res[0][0]["single"][field]
    assert sum(r["blocks"]["params"] for r, _ in res) == psi
