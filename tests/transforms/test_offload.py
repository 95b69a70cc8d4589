"""fs.offload on functions: bitwise the same values and grads, saved tensors really on the
target (copies / files), params never copied, each storage once, files cleaned up."""

from __future__ import annotations

import os
import tempfile

import optree
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.checkpoint import checkpoint

import fsharding as fs
from fsharding.transforms.offload import _recording, offload
from fsharding.transforms.remat import remat

# --------------------------------------------------------------------------------------
# a family of functions with shared storages, views and tensors saved twice
# --------------------------------------------------------------------------------------


@st.composite
def problems(draw):
    n, d, h = draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(2, 6))
    depth = draw(st.integers(0, 3))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    params = {
        "w": r(d, h),
        "b": r(h),
        "blocks": [{"u": r(h, h), "s": r(())} for _ in range(depth)],
    }
    batch = {"x": r(n, d), "y": [r(n, h)]}
    return params, batch


def model(p, batch):
    h = torch.tanh(batch["x"] @ p["w"] + p["b"])
    for blk in p["blocks"]:
        a = torch.sigmoid(h @ blk["u"])  # sigmoid saves its output a
        h = torch.tanh(h * a[:, :1] + a.narrow(1, 1, 1) * a * blk["s"])  # views of a
    return ((h - batch["y"][0]) * (h - batch["y"][0])).sum()  # saved twice


def leaf_aliases(tree):
    return optree.tree_map(lambda t: t.detach().requires_grad_(True), tree)


def saved_storages(fn, *args):
    """Independent reference: (data_ptr, version, nbytes) of every non-parameter tensor
    autograd saves while ``fn`` runs, and the number of saves."""
    calls = []

    def pack(t):
        base = t._base if t._base is not None else t
        if not (base.is_leaf and base.requires_grad):
            st = t.untyped_storage()
            calls.append((st.data_ptr(), t._version, st.nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, calls


def bitwise_equal(a, b):
    la, lb = optree.tree_leaves(a), optree.tree_leaves(b)
    return len(la) == len(lb) and all(torch.equal(x, y) for x, y in zip(la, lb))


# --------------------------------------------------------------------------------------
# equivalence and proof of work
# --------------------------------------------------------------------------------------


@given(problems(), st.sampled_from(["cpu", "disk"]))
def test_offload_is_bitwise_identical_and_moves_every_activation_once(problem, kind):
    params, batch = problem
    ref_loss, ref_grads = fs.value_and_grad(model)(params, batch)
    with tempfile.TemporaryDirectory() as d:
        to = "cpu" if kind == "cpu" else d
        with _recording() as log:
            loss, grads = fs.value_and_grad(offload(model, to=to))(params, batch)
        assert torch.equal(loss, ref_loss) and bitwise_equal(grads, ref_grads)

        # Proof of work: exactly the distinct activation storages were offloaded, once each.
        _, calls = saved_storages(model, leaf_aliases(params), batch)
        inputs = {t.untyped_storage().data_ptr() for t in optree.tree_leaves(batch)}
        expected = {(p, v): n for p, v, n in calls if p not in inputs}
        assert len(log) == len(expected) > 0
        assert sum(n for _, n, _ in log) == sum(expected.values())
        assert len(calls) > len(log)  # the tensor saved twice was packed once
        param_ptrs = {t.untyped_storage().data_ptr() for t in optree.tree_leaves(params)}
        assert not param_ptrs & {ptr for ptr, _, _ in log}
        if kind == "disk":
            assert all(path is not None and path.startswith(d) for _, _, path in log)
        else:
            assert all(path is None for _, _, path in log)
        assert os.listdir(d) == []  # every file removed after backward

        # Files exist between forward and backward, one per storage, and go with backward.
        if kind == "disk":
            pp = leaf_aliases(params)
            with _recording() as log:
                out = offload(model, to=d)(pp, batch)
            files = sorted(os.path.join(d, f) for f in os.listdir(d))
            assert files == sorted(path for _, _, path in log)
            assert [os.path.getsize(path) for _, n, path in log] == [n for _, n, _ in log]
            got = torch.autograd.grad(out, optree.tree_leaves(pp))
            assert bitwise_equal(list(got), optree.tree_leaves(ref_grads))
            assert os.listdir(d) == []


def test_cpu_copy_is_distinct_so_the_original_storage_is_freed():
    refs = []

    def f(w, x):
        h = (x @ w).exp()  # exp saves its output h
        refs.append(StorageWeakRef(h.untyped_storage()))
        return h.sum()

    w = torch.randn(3, 3, requires_grad=True)
    x = torch.randn(2, 3)
    loss = f(w, x)
    assert not refs[-1].expired()  # plain autograd keeps h alive until backward
    with _recording() as log:
        loss_off = offload(f, to="cpu")(w, x)
    assert refs[-1].expired()  # the graph holds only the distinct CPU copy
    assert len(log) == 1 and log[0][1] == 2 * 3 * 4
    (g_ref,) = torch.autograd.grad(loss, w)
    (g_off,) = torch.autograd.grad(loss_off, w)
    assert torch.equal(g_ref, g_off)


def test_params_held_by_a_module_or_passed_in_are_never_copied():
    lin = torch.nn.Linear(4, 5)
    p = leaf_aliases({"v": torch.randn(5, 2)})
    x = torch.randn(3, 4)

    def f(p, x):
        return torch.tanh(lin(x) @ p["v"]).sum()  # linear saves lin.weight.t(), mm saves v

    with _recording() as log:
        loss = offload(f, to="cpu")(p, x)
    params = [lin.weight, lin.bias, p["v"]]
    assert {ptr for ptr, _, _ in log}.isdisjoint(t.data_ptr() for t in params)
    assert [n for _, n, _ in log] == [3 * 5 * 4, 3 * 2 * 4]  # lin(x) and the tanh output
    expected = torch.autograd.grad(f(p, x), [p["v"], lin.weight])
    assert bitwise_equal(list(torch.autograd.grad(loss, [p["v"], lin.weight])), list(expected))
    with _recording() as log:
        offload(lambda w, x: (x @ w.t()).sum(), to="cpu")(lin.weight, x)
    assert log == []  # only a param and an input were saved: nothing to move


def test_non_float_and_bf16_saved_tensors_round_trip_exactly(tmp_path):
    emb = torch.randn(10, 4, dtype=torch.bfloat16)
    ids = torch.tensor([[1, 2, 9], [0, 0, 3]])

    def f(emb, ids):
        h = emb[ids]  # index saves the int64 indices
        mask = h > 0  # where saves the bool mask
        return torch.where(mask, h.float().exp(), h.float() * 3).sum()

    ref = fs.value_and_grad(f)(emb, ids)
    for to in ("cpu", tmp_path):
        with _recording() as log:
            out = fs.value_and_grad(offload(f, to=to))(emb, ids)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
        assert len(log) >= 2
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------
# cleanup
# --------------------------------------------------------------------------------------


def test_files_removed_when_forward_raises_and_unpacking_then_fails_clearly(tmp_path):
    w = torch.randn(4, 4, requires_grad=True)
    leaked = []

    def bad(w, x):
        y = torch.tanh(x @ w).exp()
        leaked.append(y)
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        offload(bad, to=tmp_path)(w, torch.randn(2, 4))
    # The partial graph is still alive (leaked[0] holds it), yet its files are gone.
    assert leaked[0].grad_fn is not None and os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError, match="fs.offload: .*forward pass raised"):
        leaked[0].sum().backward()


def test_files_removed_when_the_graph_is_freed_without_backward(tmp_path):
    w = torch.randn(4, 4, requires_grad=True)
    loss = offload(lambda w, x: torch.tanh(x @ w).exp().sum(), to=tmp_path)(w, torch.ones(3, 4))
    assert len(os.listdir(tmp_path)) == 2
    del loss
    assert os.listdir(tmp_path) == []


def test_retain_graph_backward_twice_reads_the_files_again(tmp_path):
    w = torch.randn(4, 4, requires_grad=True)
    x = torch.randn(3, 4)
    f = lambda w, x: torch.tanh(x @ w).pow(3).sum()  # noqa: E731
    (ref,) = torch.autograd.grad(f(w, x), w)
    loss = offload(f, to=tmp_path)(w, x)
    (g1,) = torch.autograd.grad(loss, w, retain_graph=True)
    assert len(os.listdir(tmp_path)) == 1  # tanh's output, saved by tanh and by pow: once
    (g2,) = torch.autograd.grad(loss, w)
    assert torch.equal(g1, ref) and torch.equal(g2, ref)
    del loss
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------
# composition with remat
# --------------------------------------------------------------------------------------


def _block_and_counter():
    calls = []

    def block(p, x):
        calls.append(1)
        return torch.tanh(x @ p["w"]) @ p["v"]

    return block, calls


def _loss(block):
    return lambda p, x: block(p, torch.sin(x * p["a"])).pow(2).sum()


PARAMS = {"w": torch.randn(5, 6), "v": torch.randn(6, 5), "a": torch.randn(5)}


@pytest.mark.parametrize("kind", ["cpu", "disk"])
def test_offload_of_remat_keeps_only_the_region_inputs(kind, tmp_path):
    block, calls = _block_and_counter()
    x = torch.randn(4, 5)
    ref = fs.value_and_grad(_loss(block))(PARAMS, x)
    calls.clear()
    f = offload(remat(block), to="cpu" if kind == "cpu" else tmp_path)
    with _recording() as log:
        out = fs.value_and_grad(_loss(f))(PARAMS, x)
    assert len(calls) == 2  # recomputed
    assert bitwise_equal(out, ref)
    assert [n for _, n, _ in log] == [4 * 5 * 4]  # the region's input x only, not w or v
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("wrap", ["fs.remat", "torch.utils.checkpoint"])
def test_offload_inside_remat_has_no_effect_and_recompute_still_happens(wrap, tmp_path):
    block, calls = _block_and_counter()
    x = torch.randn(4, 5)
    ref = fs.value_and_grad(_loss(block))(PARAMS, x)
    calls.clear()
    inner = offload(block, to=tmp_path)
    if wrap == "fs.remat":
        f = remat(inner)
    else:
        f = lambda p, x: checkpoint(inner, p, x, use_reentrant=False)  # noqa: E731
    with _recording() as log:
        out = fs.value_and_grad(_loss(f))(PARAMS, x)
    assert len(calls) == 2 and log == []  # the region was recomputed, nothing offloaded
    assert bitwise_equal(out, ref)


@pytest.mark.parametrize("kind", ["cpu", "disk"])
def test_cpu_checkpointing_of_gpt_blocks_through_functional_wrap(kind, tmp_path):
    import torch.nn.functional as F

    from fsharding.models.gpt import GPT, Block, GPTConfig

    model = GPT(GPTConfig.preset("tiny"))  # 2 blocks, d_model 128
    ids = torch.randint(0, 256, (2, 17))

    def loss_of(wrap):
        apply, params = fs.functional(model, wrap=wrap)
        return lambda p, ids: F.cross_entropy(
            apply(p, ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()
        ), params

    loss, params = loss_of(None)
    ref = fs.value_and_grad(loss)(params, ids)
    to = "cpu" if kind == "cpu" else tmp_path
    loss, _ = loss_of({Block: lambda f: offload(remat(f), to=to)})
    with _recording() as log:
        out = fs.value_and_grad(loss)(params, ids)
    assert bitwise_equal(out, ref)
    assert [n for _, n, _ in log] == [2 * 16 * 128 * 4] * 2  # each block's input, nothing else
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------
# API
# --------------------------------------------------------------------------------------


def test_usable_as_call_decorator_and_decorator_factory(tmp_path):
    def f(w):
        """Doc."""
        return torch.tanh(w).exp().sum()

    w = torch.randn(3)
    expected = fs.grad(f)(w)
    dec = offload(f)

    @offload
    def g(w):
        return torch.tanh(w).exp().sum()

    @offload(to=tmp_path)
    def h(w):
        return torch.tanh(w).exp().sum()

    for fn in (dec, g, h):
        with _recording() as log:
            assert torch.equal(fs.grad(fn)(w), expected)
        assert len(log) == 2
    assert dec.__name__ == "f" and dec.__doc__ == "Doc." and dec.__wrapped__ is f
    assert h.__name__ == "h"


def test_bad_arguments_raise_clear_errors(tmp_path):
    f = lambda x: x.sum()  # noqa: E731
    missing = tmp_path / "missing"
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for to in (missing, str(a_file), "cuda", "disk"):
        with pytest.raises(ValueError, match=r"fs.offload: to=.* existing directory"):
            offload(f, to=to)
    for to in (3, None, torch.device("cpu"), b"/tmp"):
        with pytest.raises(TypeError, match="fs.offload: to must be 'cpu' or a str/os.PathLike"):
            offload(f, to=to)
    for cb in (0, -1):
        with pytest.raises(ValueError, match="fs.offload: chunk_bytes must be > 0"):
            offload(f, chunk_bytes=cb)
    for cb in (1.5, True, "64MiB"):
        with pytest.raises(TypeError, match="fs.offload: chunk_bytes must be an int"):
            offload(f, chunk_bytes=cb)
    with pytest.raises(TypeError, match="fs.offload: the first argument must be a function"):
        offload(3)
    with pytest.raises(ValueError, match="existing directory"):
        offload(to=missing)  # checked before any function is given


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_activations_go_to_host_memory_and_free_device_memory(tmp_path):
    w = torch.randn(512, 256, device="cuda", requires_grad=True)
    x = torch.randn(512, 256, device="cuda")
    f = lambda w, x: torch.tanh(torch.tanh(x * w) * w).pow(2).sum()  # noqa: E731 (elementwise)
    (ref,) = torch.autograd.grad(f(w, x), w)
    for to in ("cpu", tmp_path):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        plain = f(w, x)
        held_plain = torch.cuda.memory_allocated() - before
        del plain
        with _recording() as log:
            loss = offload(f, to=to)(w, x)
        held = torch.cuda.memory_allocated() - before
        assert len(log) == 2 and held < held_plain - 512 * 256 * 4
        (g,) = torch.autograd.grad(loss, w)
        assert torch.equal(g, ref) and g.device.type == "cuda"
    assert os.listdir(tmp_path) == []
