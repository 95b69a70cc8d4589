"""fs.save / fs.load / fs.latest in one process without a process group (the multi-process
cases are tests/parallel/test_serialization.py): round trips of real training state,
structure errors naming the path, non-finite refusal, atomic commit and ``latest``,
tampered / truncated / foreign files that never run code, and async saves that snapshot."""

from __future__ import annotations

import json
import os
import pickle
import re
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fsharding as fs
from fsharding import optim
from fsharding import serialization as ser

# DCP's note that a process without a group saves alone (fs.save silences it on the main
# thread only: an async save's thread, and plain dcp.save here, still say it)
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _gf():
    def loss(p, b):
        return ((b["x"] @ p["w"] + p["b"] - b["y"]) ** 2).mean()

    return fs.value_and_grad(loss)


def _step():
    opt = optim.chain(
        optim.clip_by_global_norm(1.0),
        optim.adamw(optim.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 10), weight_decay=0.1),
    )
    return fs.train_step(_gf(), opt, loss_scale=fs.DynamicLossScale(period=2))


def _batch(i):
    g = torch.Generator().manual_seed(100 + i)
    return {"x": torch.randn(8, 4, generator=g), "y": torch.randn(8, 3, generator=g)}


def _state():
    step = _step()
    params, opt_state = step.init({"w": torch.randn(4, 3), "b": torch.zeros(3)})
    params, opt_state, _ = step.step(params, opt_state, _batch(0))
    gen = torch.Generator().manual_seed(7)
    tree = {
        "params": params,
        "opt_state": opt_state,
        "rng": gen.get_state(),
        "step": 1,
        "lr": 0.25,
        "name": "run-a",
        "flag": True,
        "nothing": None,
        "half": torch.randn(2, 3).to(torch.bfloat16),
        "ids": torch.arange(5),
        "mask": torch.tensor([True, False]),
    }
    return step, tree, gen


def _clone(tree):
    return fs.tree.map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)


def _assert_equal(a, b):
    fs.tree.check_same_structure(a, b)
    for (path, x), y in zip(fs.tree.leaves_with_path(a), fs.tree.leaves(b)):
        assert type(x) is type(y), path
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), path
        else:
            assert x == y, path


def test_round_trip_training_state_into_new_buffers(tmp_path):
    step, tree, gen = _state()
    weight = torch.nn.Linear(4, 3).weight  # an nn.Parameter sharing storage with like
    like = dict(tree, params={"w": weight.data.t(), "b": tree["params"]["b"]})
    like["params"]["w"].zero_()
    before = _clone(like)
    path = fs.save(tmp_path / "ckpt", tree, step=1)
    assert path == str(tmp_path / "ckpt") and fs.latest(tmp_path) == path
    out = fs.load(path, like)
    _assert_equal(out, tree)
    assert isinstance(out["opt_state"], fs.TrainState)
    assert out["opt_state"].loss_scale == tree["opt_state"].loss_scale
    _assert_equal(like, before)  # like never written (the Parameter neither)
    assert torch.equal(weight.data.t(), before["params"]["w"])
    like_keys = {fs.tree.storage_key(x) for x in fs.tree.leaves(like) if torch.is_tensor(x)}
    for x in fs.tree.leaves(out):
        if torch.is_tensor(x):
            assert fs.tree.storage_key(x) not in like_keys
            assert fs.tree.storage_key(x) not in {
                fs.tree.storage_key(t) for t in fs.tree.leaves(tree) if torch.is_tensor(t)
            }
    # the generator resumes where it was; training resumes bitwise
    g2 = torch.Generator()
    g2.set_state(out["rng"])
    assert torch.equal(torch.randn(5, generator=g2), torch.randn(5, generator=gen))
    p1, s1, p2, s2 = tree["params"], tree["opt_state"], out["params"], out["opt_state"]
    for i in range(1, 4):
        p1, s1, m1 = step.step(p1, s1, _batch(i))
        p2, s2, m2 = step.step(p2, s2, _batch(i))
        assert torch.equal(m1["loss"], m2["loss"])
    _assert_equal((p1, s1), (p2, s2))


def test_meta_like_loads_onto_cpu(tmp_path):
    _, tree, _ = _state()
    path = fs.save(tmp_path / "c", tree)
    like = fs.tree.map(lambda x: x.to("meta") if torch.is_tensor(x) else x, tree)
    out = fs.load(path, like)
    _assert_equal(out, tree)
    assert all(x.device.type == "cpu" for x in fs.tree.leaves(out) if torch.is_tensor(x))


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda t: t.pop("step"), ["leaf ['step']", "lacks"]),
        (lambda t: t.update(extra=torch.zeros(1)), ["['extra']", "missing from the checkpoint"]),
        (lambda t: t.update(half=torch.zeros(3, 2, dtype=torch.bfloat16)), ["['half']", "shape"]),
        (lambda t: t.update(ids=torch.arange(5.0)), ["['ids']", "int64", "float32"]),
        (lambda t: t.update(name=3), ["['name']", "str", "int"]),
        (lambda t: t.update(step=torch.zeros(())), ["['step']", "int in", "tensor in like"]),
        (lambda t: t.update(nothing=torch.zeros(1)), ["['nothing']", "missing"]),
        (lambda t: t.update(lr=[1.0]), ["['lr'][0]", "missing"]),
        (lambda t: t.update(flag=object()), ["['flag']", "object"]),
    ],
)
def test_structure_mismatch_names_the_path(tmp_path, change, words):
    _, tree, _ = _state()
    path = fs.save(tmp_path / "c", tree)
    like = dict(tree)
    change(like)
    with pytest.raises(fs.CheckpointError) as e:
        fs.load(path, like)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_nonfinite_and_bad_leaves_are_refused(tmp_path):
    _, tree, _ = _state()
    prev = fs.save(tmp_path / "a", tree, step=1)
    cases = {
        "['params']['w']": dict(tree, params={"w": torch.tensor([1.0, float("nan")])}),
        "['half']": dict(tree, half=torch.tensor([7e4]).half() * 2),  # fp16 overflow: inf
        "['lr']": dict(tree, lr=float("inf")),
        "['obj']": dict(tree, obj=object()),
        "['m']": dict(tree, m=torch.empty(2, device="meta")),
    }
    for i, (where, bad) in enumerate(cases.items()):
        with pytest.raises(fs.CheckpointError, match=re.escape(f"leaf {where}")):
            fs.save(tmp_path / f"b{i}", bad, step=2)
        assert not (tmp_path / f"b{i}").exists()
    assert fs.latest(tmp_path) == prev and sorted(os.listdir(tmp_path)) == ["a"]
    # explicit permission writes the values as they are
    nan = dict(tree, lr=float("nan"), params={"w": torch.tensor([1.0, float("nan")])})
    out = fs.load(fs.save(tmp_path / "n", nan, allow_nonfinite=True), nan)
    assert torch.isnan(out["params"]["w"][1]) and out["lr"] != out["lr"]


def test_existing_path_and_bad_step_are_refused(tmp_path):
    fs.save(tmp_path / "a", {"x": 1})
    with pytest.raises(fs.CheckpointError, match="exists"):
        fs.save(tmp_path / "a", {"x": 2})
    with pytest.raises(fs.CheckpointError, match="step"):
        fs.save(tmp_path / "b", {"x": 2}, step=-1)
    assert fs.load(tmp_path / "a", {"x": 0}) == {"x": 1}


def test_latest_orders_by_step_then_time_and_ignores_partial_and_foreign(tmp_path):
    assert fs.latest(tmp_path / "missing") is None and fs.latest(tmp_path) is None
    fs.save(tmp_path / "x", {"v": 0})  # no step: -1
    assert fs.latest(tmp_path).endswith("x")
    fs.save(tmp_path / "step-10", {"v": 10}, step=10)
    fs.save(tmp_path / "step-9", {"v": 9}, step=9)  # later, but an older step
    assert fs.latest(tmp_path).endswith("step-10")
    fs.save(tmp_path / "again-10", {"v": 11}, step=10)  # same step: commit time decides
    assert fs.latest(tmp_path).endswith("again-10")
    # a partial save (hidden, no marker), a foreign dir, a newer format: all ignored
    os.makedirs(tmp_path / ".step-99.partial-abc")
    (tmp_path / "foreign").mkdir()
    future = fs.save(tmp_path / "future", {"v": 99}, step=99)
    meta = json.loads((tmp_path / "future" / "fsharding.json").read_text())
    (tmp_path / "future" / "fsharding.json").write_text(json.dumps(dict(meta, version=99)))
    assert fs.latest(tmp_path).endswith("again-10")
    with pytest.raises(fs.CheckpointError, match="version 99"):
        fs.load(future, {"v": 0})
    with pytest.raises(fs.CheckpointError, match="not an fsharding checkpoint"):
        fs.load(tmp_path / ".step-99.partial-abc", {"v": 0})


def _fail_writes(monkeypatch, exc=OSError("disk full")):
    writer = ser._dcp_classes()[0]

    def boom(self, plan, planner):
        raise exc

    monkeypatch.setattr(writer, "write_data", boom)


def test_failed_write_leaves_previous_checkpoint_and_like(tmp_path, monkeypatch):
    _, tree, _ = _state()
    prev = fs.save(tmp_path / "s1", tree, step=1)
    like = _clone(tree)
    _fail_writes(monkeypatch)
    with pytest.raises(fs.CheckpointError, match="disk full") as e:
        fs.save(tmp_path / "s2", tree, step=2)
    assert isinstance(e.value, Exception)  # DCP's CheckpointException is a BaseException
    assert os.listdir(tmp_path) == ["s1"]  # nothing visible, partial dir removed
    monkeypatch.undo()
    assert fs.latest(tmp_path) == prev
    _assert_equal(fs.load(prev, like), tree)
    _assert_equal(like, tree)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _md(path):
    with open(path / ".metadata", "rb") as f:
        return pickle.load(f)  # our own fresh file: trusted here


def _write_md(path, md):
    with open(path / ".metadata", "wb") as f:
        pickle.dump(md, f)


def test_tampered_files_never_run_code(tmp_path):
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    marker = tmp_path / "pwned"
    tree = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}
    evil = pickle.dumps(_Evil(marker))
    # the payload is live: plain pickle runs it
    pickle.loads(evil)
    assert marker.exists()
    marker.unlink()

    def fresh(name):
        return tmp_path / os.path.basename(fs.save(tmp_path / name, tree))

    # 1. .metadata replaced by a pickle that calls os.system
    p = fresh("meta")
    (p / ".metadata").write_bytes(evil)
    with pytest.raises(fs.CheckpointError, match=r"\.metadata.*system"):
        fs.load(p, tree)
    # 2. a data entry that is a torch.save of the payload (weights_only refuses it)
    p = fresh("data")
    md = _md(p)
    rel = next(iter(md.storage_data.values())).relative_path
    blob = (p / rel).read_bytes()
    bad = tmp_path / "bad.pt"
    torch.save({"x": _Evil(marker)}, bad)
    payload = bad.read_bytes()
    (p / rel).write_bytes(payload + blob)  # every entry shifted by len(payload)
    for info in md.storage_data.values():
        info.offset += len(payload)
    first = min(md.storage_data.values(), key=lambda i: i.offset)
    first.offset, first.length = 0, len(payload)
    _write_md(p, md)
    with pytest.raises(fs.CheckpointError, match=rf"{rel}.*not a plain tensor"):
        fs.load(p, tree)
    # 3. metadata claiming a byte entry (DCP would torch.load it with weights_only=False)
    p = fresh("bytes")
    md = _md(p)
    md.state_dict_metadata["w"] = BytesStorageMetadata()
    _write_md(p, md)
    with pytest.raises(fs.CheckpointError, match=r"\.metadata.*BytesStorageMetadata"):
        fs.load(p, tree)
    # 4. a storage entry pointing outside the checkpoint
    p = fresh("escape")
    md = _md(p)
    next(iter(md.storage_data.values())).relative_path = "../bad.pt"
    _write_md(p, md)
    with pytest.raises(fs.CheckpointError, match="plain file slice"):
        fs.load(p, tree)
    assert not marker.exists()


def test_truncated_and_foreign_files_name_the_file(tmp_path):
    import torch.distributed.checkpoint as dcp

    tree = {"w": torch.arange(6.0), "n": 3}
    for name, victim in (("a", ".metadata"), ("b", "fsharding.json"), ("c", "data")):
        p = tmp_path / name
        fs.save(p, tree)
        if victim == "data":
            victim = next(f for f in os.listdir(p) if f.endswith(".distcp"))
        data = (p / victim).read_bytes()
        (p / victim).write_bytes(data[: len(data) // 2])
        with pytest.raises(fs.CheckpointError, match=victim.replace(".", r"\.")):
            fs.load(p, tree)
    dcp.save({"w": torch.zeros(6)}, checkpoint_id=tmp_path / "plain", no_dist=True)
    with pytest.raises(fs.CheckpointError, match="fsharding.json not found.*not an fsharding"):
        fs.load(tmp_path / "plain", tree)
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "fsharding.json").write_text('{"format": "other"}')
    with pytest.raises(fs.CheckpointError, match="not an fsharding checkpoint index"):
        fs.load(tmp_path / "json", tree)


def test_async_save_snapshots_before_in_place_updates(tmp_path, monkeypatch):
    step, tree, _ = _state()
    expected = _clone(tree)
    writer = ser._dcp_classes()[0]
    original = writer.write_data
    go = threading.Event()

    def held(self, plan, planner):
        assert go.wait(30)
        return original(self, plan, planner)

    monkeypatch.setattr(writer, "write_data", held)
    fut = fs.save(tmp_path / "a", tree, async_=True, step=1)
    assert not fut.done() and fs.latest(tmp_path) is None  # not visible before the commit
    # a donating step updates params and optimizer state in place meanwhile
    ids = [fs.tree.storage_key(x) for x in fs.tree.leaves(tree["params"])]
    params, opt_state, _ = step.step(tree["params"], tree["opt_state"], _batch(5), donate=True)
    assert [fs.tree.storage_key(x) for x in fs.tree.leaves(params)] == ids  # really in place
    tree["ids"].add_(100)
    assert not torch.equal(tree["params"]["w"], expected["params"]["w"])
    go.set()
    assert fut.result(timeout=60) == str(tmp_path / "a")
    assert fs.latest(tmp_path) == str(tmp_path / "a")
    _assert_equal(fs.load(tmp_path / "a", expected), expected)


def test_async_failure_raises_from_result(tmp_path, monkeypatch):
    _fail_writes(monkeypatch)
    fut = fs.save(tmp_path / "a", {"w": torch.ones(2)}, async_=True)
    with pytest.raises(fs.CheckpointError, match="disk full"):
        fut.result(timeout=60)
    assert os.listdir(tmp_path) == []


_leaf = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.text(max_size=5),
    st.none(),
    st.tuples(
        st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.int32, torch.uint8]),
        st.lists(st.integers(0, 3), max_size=3),
    ).map(lambda a: (torch.rand(a[1]) * 100).to(a[0])),
)
_trees = st.recursive(
    _leaf,
    lambda kids: st.one_of(
        st.lists(kids, max_size=3).map(tuple),
        st.dictionaries(st.text("abc.[]'", min_size=1, max_size=3), kids, max_size=3),
    ),
    max_leaves=8,
)


@settings(max_examples=15)
@given(tree=_trees)
def test_round_trip_property(tmp_path_factory, tree):
    path = fs.save(tmp_path_factory.mktemp("h") / "c", tree)
    like = fs.tree.map(lambda x: torch.empty_like(x) if torch.is_tensor(x) else x, tree)
    _assert_equal(fs.load(path, like), tree)


def _bits(x):
    return x.view(torch.uint8) if x.dtype.itemsize == 1 else x


def test_empty_and_float8_leaves_save_and_load(tmp_path):
    # empty leaves (a ZeRO-3 rank's shard of a leaf with fewer rows than ranks) and dtypes
    # torch._foreach_norm lacks: the non-finite check used to raise on both
    tree = {
        "e": torch.empty(0, 3),
        "eb": torch.empty(0, dtype=torch.bfloat16),
        "f8": torch.tensor([1.0, -0.5, 448.0]).to(torch.float8_e4m3fn),
        "f8b": torch.tensor([2.0, -3.0]).to(torch.float8_e5m2),
        "x": torch.arange(3.0),
    }
    path = fs.save(tmp_path / "a", tree)
    out = fs.load(path, fs.tree.map(torch.empty_like, tree))
    for k, x in tree.items():
        assert out[k].dtype == x.dtype and torch.equal(_bits(out[k]), _bits(x)), k
    nan = dict(tree, f8=torch.tensor([1.0, float("nan")]).to(torch.float8_e4m3fn))
    with pytest.raises(fs.CheckpointError, match=re.escape("leaf ['f8'] holds NaN")):
        fs.save(tmp_path / "b", nan)


def _chunk(offsets, sizes):
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    return ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))


def test_chunks_must_tile_and_entries_must_match_their_chunk(tmp_path):
    import io

    from torch.distributed.checkpoint.metadata import MetadataIndex

    tree = {"w": torch.arange(4.0), "n": 3}
    like = {"w": torch.zeros(4), "n": 0}

    def fresh(name):
        return tmp_path / os.path.basename(fs.save(tmp_path / name, tree))

    def tampered(name, edit):
        p = fresh(name)
        md = _md(p)
        edit(md, p)
        _write_md(p, md)
        return p

    def chunks(*cs):
        def edit(md, p):
            w = md.state_dict_metadata["['w']"]
            w.chunks = [_chunk(*c) for c in cs]
            info = next(iter(md.storage_data.values()))  # an entry for every chunk
            md.storage_data = {MetadataIndex("['w']", torch.Size(c[0])): info for c in cs}

        return edit

    cases = {
        "short": (chunks(([0], [2])), "chunks hold 2 elements, the tensor 4"),  # was garbage
        "overlap": (chunks(([0], [3]), ([2], [1])), "overlap"),
        "outside": (chunks(([0], [2]), ([3], [2])), "exceeds"),
        "rank": (chunks(([0, 0], [4, 1])), "for a 1-dim tensor"),
    }
    for name, (edit, words) in cases.items():
        p = tampered(name, edit)
        with pytest.raises(fs.CheckpointError, match=r"\.metadata.*" + re.escape(words)):
            fs.load(p, like)
    # a data entry rewritten with another dtype or size (copy_ used to cast it silently)
    for name, value in (("dtype", torch.tensor([7, 8, 9, 10])), ("size", torch.arange(5.0))):

        def entry(md, p, value=value):
            buf = io.BytesIO()
            torch.save(value, buf)
            info = next(iter(md.storage_data.values()))
            (p / info.relative_path).write_bytes(buf.getvalue())
            info.offset, info.length = 0, len(buf.getvalue())

        p = tampered(name, entry)
        with pytest.raises(fs.CheckpointError, match=r"__0_0\.distcp: entry \['w'\] is a torch"):
            fs.load(p, like)


def test_fields_of_the_wrong_type_and_deep_json_raise_checkpoint_errors(tmp_path):
    tree = {"w": torch.arange(4.0), "n": 3}
    like = {"w": torch.zeros(4), "n": 0}

    def edit_w(field, value):
        return lambda md: setattr(md.state_dict_metadata["['w']"], field, value)

    def edit_info(field, value):
        return lambda md: setattr(next(iter(md.storage_data.values())), field, value)

    edits = {
        "size": edit_w("size", 4),
        "properties": edit_w("properties", None),
        "chunks": edit_w("chunks", "abc"),
        "offsets": lambda md: setattr(md.state_dict_metadata["['w']"].chunks[0], "offsets", "0"),
        "lengths": edit_info("length", "12"),
        "offset": edit_info("offset", 1.5),
        "storage key": lambda md: setattr(md, "storage_data", {"k": None}),
        "no fields": lambda md: md.__dict__.clear(),
    }
    for name, edit in edits.items():
        p = tmp_path / os.path.basename(fs.save(tmp_path / name.replace(" ", "-"), tree))
        md = _md(p)
        edit(md)
        _write_md(p, md)
        with pytest.raises(fs.CheckpointError, match=re.escape(str(p / ".metadata"))):
            fs.load(p, like)
    # a deeply nested fsharding.json: RecursionError became a CheckpointError; latest skips it
    good = fs.save(tmp_path / "good", tree, step=1)
    deep = tmp_path / os.path.basename(fs.save(tmp_path / "deep", tree, step=2))
    (deep / "fsharding.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(fs.CheckpointError, match="fsharding.json is unreadable"):
        fs.load(deep, like)
    assert fs.latest(tmp_path) == good


@pytest.mark.timeout(60)
def test_fifos_and_symlinks_are_refused_never_followed(tmp_path):
    tree = {"w": torch.arange(4.0), "n": 3}
    like = {"w": torch.zeros(4), "n": 0}
    other = fs.save(tmp_path / "other", {"w": torch.arange(4.0) * 10, "n": 3}, step=1)
    data = next(f for f in os.listdir(other) if f.endswith(".distcp"))
    for i, name in enumerate((".metadata", "fsharding.json", data)):
        for kind in ("fifo", "symlink"):
            step = 3 if name == "fsharding.json" else 2  # newer: latest must skip these
            p = tmp_path / os.path.basename(fs.save(tmp_path / f"{kind}{i}", tree, step=step))
            (p / name).unlink()
            if kind == "fifo":
                os.mkfifo(p / name)  # open() of a FIFO blocks until a writer comes
                words = "not a regular file"
            else:
                os.symlink(os.path.join(other, name), p / name)  # a valid file elsewhere
                words = "cannot be opened (a symlink"
            pattern = re.escape(f"{p / name}") + ".*" + re.escape(words)
            with pytest.raises(fs.CheckpointError, match=pattern):
                fs.load(p, like)
    assert fs.latest(tmp_path) == str(tmp_path / "symlink2")  # the step-3 indexes skipped


def test_side_group_is_remade_for_a_new_default_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", store=dist.FileStore(str(tmp_path / "s1"), 1), rank=0, world_size=1
    )
    old = ser._side_group()
    assert ser._side_group() is old  # one per default group
    dist.destroy_process_group()  # destroys every group, old included
    dist.init_process_group(
        "gloo", store=dist.FileStore(str(tmp_path / "s2"), 1), rank=0, world_size=1
    )
    try:
        # the new default group reusing the old one's id (as CPython may) must not revive it
        ser._side_groups[id(dist.group.WORLD)] = old
        new = ser._side_group()
        assert new is not old and ser._registered(new) and not ser._registered(old)
        t = torch.ones(1)
        dist.all_reduce(t, group=new)
        assert t.item() == 1.0
    finally:
        dist.destroy_process_group()
        ser._side_groups.clear()
