"""fs.offload on optimizers: bitwise the same params as the in-memory optimizer, state really
in files, streamed in chunks of at most chunk_bytes, and a measured drop in peak RSS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap

import optree
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fsharding as fs
from fsharding import optim
from fsharding.optim.offload import DiskLeaf
from fsharding.transforms.offload import offload

OPTIMIZERS = {
    "adamw": lambda: optim.adamw(
        1e-2, weight_decay=0.1, mask=lambda p: optree.tree_map(lambda x: x.ndim > 1, p)
    ),
    "adam_schedule": lambda: optim.adam(optim.linear_schedule(1e-2, 1e-3, 5)),
    "sgd_nesterov": lambda: optim.sgd(0.1, momentum=0.9, nesterov=True),
    "lion": lambda: optim.lion(1e-3, weight_decay=0.01),
    "chain": lambda: optim.chain(optim.clip(0.5), optim.trace(0.8), optim.scale(-0.1)),
}


@st.composite
def param_trees(draw):
    shapes = st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple)
    tree = {f"p{i}": draw(shapes) for i in range(draw(st.integers(1, 4)))}
    if draw(st.booleans()):
        tree["nested"] = [draw(shapes), draw(shapes)]
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return optree.tree_map(
        lambda s: torch.randn(s, generator=g, dtype=dtype),
        tree,
        is_leaf=lambda x: isinstance(x, tuple),
    ), g


def run(tx, params, grads_seq, *, donate=False):
    state = tx.init(params)
    for grads in grads_seq:
        if donate:
            with optim.donation():
                updates, state = tx.update(grads, state, params)
        else:
            updates, state = tx.update(grads, state, params)
        params = optim.apply_updates(params, updates)
    return params, state, updates


def bitwise_equal(a, b):
    la, lb = optree.tree_leaves(a), optree.tree_leaves(b)
    same = lambda x, y: torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y  # noqa: E731
    return len(la) == len(lb) and all(same(x, y) for x, y in zip(la, lb))


def materialize(state):
    return optree.tree_map(lambda x: x.load() if isinstance(x, DiskLeaf) else x, state)


@settings(max_examples=16)
@given(
    param_trees(),
    st.sampled_from(sorted(OPTIMIZERS)),
    st.sampled_from(["cpu", "disk"]),
    st.sampled_from([40, 3000, 64 * 2**20]),
)
def test_offloaded_optimizer_gives_bitwise_the_same_params(problem, name, kind, chunk_bytes):
    params, g = problem
    grads_seq = [
        optree.tree_map(lambda p: torch.randn(p.shape, generator=g, dtype=p.dtype), params)
        for _ in range(3)
    ]
    tx = OPTIMIZERS[name]()
    ref_params, ref_state, ref_updates = run(tx, params, grads_seq)
    with tempfile.TemporaryDirectory() as d:
        otx = offload(tx, to="cpu" if kind == "cpu" else d, chunk_bytes=chunk_bytes)
        out_params, state, updates = run(otx, params, grads_seq)
        assert bitwise_equal(out_params, ref_params)
        assert bitwise_equal(materialize(state), ref_state)  # same structure, counts, moments
        assert optim.learning_rate(otx, state) == optim.learning_rate(tx, ref_state)
        for u, r, p in zip(*map(optree.tree_leaves, (updates, ref_updates, params))):
            assert u.device == p.device and u.dtype == r.dtype and not u.requires_grad
        disk_leaves = [x for x in optree.tree_leaves(state) if isinstance(x, DiskLeaf)]
        if kind == "cpu":
            assert not disk_leaves
        else:  # state really in files: every per-param tensor, nothing of it in memory
            assert fs.tree.nbytes(state) == 0
            per_param = [x for x in optree.tree_leaves(ref_state) if isinstance(x, torch.Tensor)]
            assert len(disk_leaves) == len(per_param)
            assert sorted(os.path.join(d, f) for f in os.listdir(d)) == sorted(
                x.path for x in disk_leaves
            )
            assert sum(os.path.getsize(x.path) for x in disk_leaves) == fs.tree.nbytes(ref_state)
            del state, disk_leaves  # (refcounting frees them at once: no gc.collect)
            assert os.listdir(d) == []  # files go with the state


def test_disk_state_is_streamed_in_chunks_of_at_most_chunk_bytes(tmp_path):
    seen, shapes = [], set()
    tx = optim.adamw(1e-3)

    def spy_update(updates, state, params=None):
        shapes.update(tuple(u.shape) for u in optree.tree_leaves(updates) if u.numel())
        seen.append(
            sum(
                x.numel() * x.element_size()
                for x in optree.tree_leaves(state)
                if isinstance(x, torch.Tensor) and x.dim() > 0
            )
        )
        return tx.update(updates, state, params)

    spy = optim.GradientTransformation(tx.init, spy_update)
    # w: runs of 64 rows (lcm(10, 128) = 640 elements); v: flat ranges (rows of 350 elements
    # align only every 22400); b: whole.
    params = {"w": torch.randn(640, 10), "v": torch.randn(3, 50, 7), "b": torch.randn(10)}
    grads = optree.tree_map(torch.randn_like, params)
    chunk_bytes = 8000  # 1000 elements of Adam state (mu and nu, 8 bytes each)
    otx = offload(spy, to=tmp_path, chunk_bytes=chunk_bytes)
    state = otx.init(params)
    updates, state = otx.update(grads, state, params)
    assert max(seen) <= chunk_bytes
    assert sum(seen) == 2 * 4 * sum(p.numel() for p in params.values())
    assert len(seen) >= 8 * (640 * 10 + 3 * 50 * 7 + 10) // chunk_bytes
    assert shapes == {(64, 10), (1, 1, 896), (1, 1, 1050 - 896), (10,)}  # ndim kept
    ref, _ = tx.update(grads, tx.init(params), params)
    assert bitwise_equal(updates, ref)


def test_update_is_pure_and_donation_writes_in_place(tmp_path):
    tx = optim.adam(1e-2)
    params = {"w": torch.randn(20, 3)}
    grads = {"w": torch.randn(20, 3)}
    otx = offload(tx, to=tmp_path, chunk_bytes=64)
    state0 = otx.init(params)
    before = materialize(state0)
    u1, s1 = otx.update(grads, state0, params)
    u2, s2 = otx.update(grads, state0, params)  # the old state is still valid
    assert bitwise_equal(materialize(state0), before)
    assert bitwise_equal((u1, materialize(s1)), (u2, materialize(s2)))
    assert s1[0].mu["w"].path != state0[0].mu["w"].path
    with optim.donation():
        u3, s3 = otx.update(grads, state0, params)
    assert s3[0].mu["w"] is state0[0].mu["w"]  # written in place, same files
    assert bitwise_equal((u3, materialize(s3)), (u1, materialize(s1)))


def test_train_step_with_offloaded_adamw_matches_in_memory(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))
    apply, params = fs.functional(model)
    grad_fn = fs.value_and_grad(lambda p, b: ((apply(p, b["x"]) - b["y"]) ** 2).mean())
    sched = optim.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 10)
    batches = [{"x": torch.randn(8, 6), "y": torch.randn(8, 3)} for _ in range(4)]
    results = []
    for tx in (
        optim.adamw(sched, weight_decay=0.1),
        offload(optim.adamw(sched, weight_decay=0.1), to=tmp_path, chunk_bytes=256),
    ):
        step = fs.train_step(grad_fn, tx)
        p, s = step.init(params)
        lrs = []
        for i, b in enumerate(batches):
            p, s, m = step.step(p, s, b, donate=i % 2 == 1)
            lrs.append(m["lr"])
        results.append((p, lrs))
    assert bitwise_equal(results[0][0], results[1][0])
    assert results[0][1] == results[1][1]


def test_offload_of_amp_streams_the_fp32_master_weights_too(tmp_path):
    from fsharding.transforms.amp import amp

    params = {"w": torch.randn(20, 8).bfloat16(), "b": torch.randn(8).bfloat16()}
    grads = [optree.tree_map(torch.randn_like, params) for _ in range(3)]
    ref_params, ref_state, _ = run(amp(optim.adamw(1e-2), policy="bf16"), params, grads)
    otx = offload(amp(optim.adamw(1e-2), policy="bf16"), to=tmp_path, chunk_bytes=100)
    out_params, state, updates = run(otx, params, grads)
    assert bitwise_equal(out_params, ref_params)
    assert bitwise_equal(materialize(state), ref_state)
    assert all(isinstance(x, DiskLeaf) for x in optree.tree_leaves(state.master))
    # amp's float32 updates come back as they are (a cast to bf16 would round twice).
    assert all(u.dtype == torch.float32 for u in optree.tree_leaves(updates))


def test_global_transforms_are_refused_for_disk_and_exact_on_cpu(tmp_path):
    params = {"w": torch.randn(10, 4)}
    grads = [{"w": torch.randn(10, 4) * 5}]
    for tx in (
        optim.chain(optim.clip_by_global_norm(1.0), optim.adam(1e-2)),
        optim.lamb(1e-2),
        optim.apply_if_finite(optim.adam(1e-2), 3),
    ):
        with pytest.raises(ValueError, match="fs.offload: .*element-wise.*chain"):
            offload(tx, to=tmp_path)
        assert bitwise_equal(
            run(offload(tx, to="cpu"), params, grads)[0], run(tx, params, grads)[0]
        )
    # Documented pattern: clip outside, offload the element-wise part.
    good = optim.chain(optim.clip_by_global_norm(1.0), offload(optim.adam(1e-2), to=tmp_path))
    ref = optim.chain(optim.clip_by_global_norm(1.0), optim.adam(1e-2))
    assert bitwise_equal(run(good, params, grads)[0], run(ref, params, grads)[0])


def test_data_dependent_scalar_state_is_detected(tmp_path):
    # Not element-wise and not on the list: its scalar state differs between chunks.
    def init(params):
        return {"max": 0.0}

    def update(updates, state, params=None):
        m = max(
            [state["max"]]
            + [float(u.abs().max()) for u in optree.tree_leaves(updates) if u.numel()]
        )
        return updates, {"max": m}

    tx = optim.GradientTransformation(init, update)
    otx = offload(tx, to=tmp_path, chunk_bytes=16)
    with pytest.raises(
        RuntimeError,
        match=r"fs.offload: optimizer state leaf \['max'\] came out "
        "different for different chunks",
    ):
        otx.update({"w": torch.arange(300.0)}, otx.init({"w": torch.zeros(300)}), None)


def test_state_of_another_optimizer_is_rejected(tmp_path):
    tx = optim.adam(1e-3)
    params = {"w": torch.randn(4, 3)}
    otx = offload(tx, to=tmp_path)
    with pytest.raises(ValueError, match="(?i)fs.offload: .*pass the state returned by"):
        otx.update(params, tx.init(params), params)
    with pytest.raises(ValueError, match="fs.offload: the optimizer state does not match"):
        otx.update({"w": torch.randn(5, 3)}, otx.init(params), None)


# --------------------------------------------------------------------------------------
# memory, measured in separate processes
# --------------------------------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import json, os, sys, threading, time
    import torch
    import fsharding as fs
    from fsharding import optim
    from fsharding.transforms.offload import offload

    mode, d, out, dim = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    torch.manual_seed(0)

    def rss_anon():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024

    peak, stop = [0], [False]
    def sample():
        while not stop[0]:
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.0005)

    lin = lambda: torch.nn.Linear(dim, dim)
    model = torch.nn.Sequential(lin(), torch.nn.Tanh(), lin())
    apply, params = fs.functional(model)
    del model
    grad_fn = fs.value_and_grad(lambda p, b: (apply(p, b) ** 2).mean())
    tx = optim.adamw(1e-3, weight_decay=0.1)
    if mode == "disk":
        tx = offload(tx, to=d, chunk_bytes=2 * 2**20)
    step = fs.train_step(grad_fn, tx)
    batch = torch.randn(4, dim)
    base = rss_anon()
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    params, opt_state = step.init(params)
    for _ in range(2):
        params, opt_state, _ = step.step(params, opt_state, batch)
    stop[0] = True
    t.join()
    peak[0] = max(peak[0], rss_anon())
    torch.save(params, out)
    state_bytes = 8 * sum(p.numel() for p in params.values())
    print(json.dumps({"base": base, "peak": peak[0], "state_bytes": state_bytes}))
    """
)


def _measure(mode, d, out, dim):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    res = subprocess.run(
        [sys.executable, "-c", WORKER, mode, d, out, str(dim)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_disk_offloaded_adam_state_lowers_peak_anonymous_rss(tmp_path):
    dim = 2048  # two 2048x2048 layers: 8.4M params, 67 MB of Adam state (mu and nu)
    mem = _measure("memory", str(tmp_path), str(tmp_path / "a.pt"), dim)
    disk = _measure("disk", str(tmp_path), str(tmp_path / "b.pt"), dim)
    state = mem["state_bytes"]
    saved = (mem["peak"] - mem["base"]) - (disk["peak"] - disk["base"])
    assert saved >= 0.8 * state, (mem, disk)
    assert bitwise_equal(torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt"))
    assert sorted(os.listdir(tmp_path)) == ["a.pt", "b.pt"]  # state files removed at exit


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_params_get_updates_on_their_device_with_state_on_cpu_or_disk(tmp_path):
    params = {"w": torch.randn(64, 8, device="cuda"), "b": torch.randn(8, device="cuda")}
    grads = [optree.tree_map(torch.randn_like, params) for _ in range(2)]
    tx = optim.adamw(1e-2, weight_decay=0.1)
    cpu_params = optree.tree_map(lambda p: p.cpu(), params)
    ref, _, _ = run(tx, cpu_params, [optree.tree_map(lambda g: g.cpu(), gs) for gs in grads])
    for to in ("cpu", tmp_path):
        otx = offload(tx, to=to, chunk_bytes=256)
        out, state, updates = run(otx, params, grads)
        assert all(u.device.type == "cuda" for u in optree.tree_leaves(updates))
        assert all(
            x.device.type == "cpu"
            for x in optree.tree_leaves(materialize(state))
            if isinstance(x, torch.Tensor)
        )
        # The update ran on CPU: bitwise the CPU optimizer's result.
        assert bitwise_equal(optree.tree_map(lambda p: p.cpu(), out), ref)
