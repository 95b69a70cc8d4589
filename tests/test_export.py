"""fs.export: safetensors files + index, read back by the `safetensors` package (the
independent reader), by `nn.Module.load_state_dict(strict=True)` in a fresh process and by
transformers' `from_pretrained`; streamed (peak memory about the largest tensor, measured
as peak RSS); atomic; bad input named by path, on every rank.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

import fsharding as fs
from fsharding import optim
from fsharding.models import GPT, GPTConfig
from tests.dist_utils import raises, run

try:  # until fsharding/serialization.py re-exports it as fs.export
    export = fs.export
except AttributeError:  # pragma: no cover
    from fsharding._export import export

MiB = 2**20


def read_export(d: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of an export and its weight map, with safetensors and json only."""
    d = Path(d)
    index = d / "model.safetensors.index.json"
    if index.exists():
        doc = json.loads(index.read_text())
        weight_map = doc["weight_map"]
        files = sorted(set(weight_map.values()))
        assert not (d / "model.safetensors").exists(), "a stale single file next to an index"
    else:
        files = ["model.safetensors"]
        weight_map = None
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(d / f), "pt") as h:
            assert h.metadata() == {"format": "pt"}
        part = load_file(str(d / f))
        assert not set(part) & set(out), f"{f}: a name stored twice"
        out.update(part)
        if weight_map is not None:
            assert {n for n, g in weight_map.items() if g == f} == set(part)
    if weight_map is not None:
        total = sum(t.numel() * t.element_size() for t in out.values())
        assert doc["metadata"]["total_size"] == total
    return out, weight_map or {n: "model.safetensors" for n in out}


def flat(tree, prefix=""):
    """Reference flattening: nested dict/list keys joined with '.'."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    out = {}
    for k, v in items:
        out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


# --------------------------------------------------------------------------------------
# (1) round trip of random pytrees and dtypes, one process
# --------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool]


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=3))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        t = torch.rand(shape, generator=g) > 0.5
    elif dtype == torch.int64:
        t = torch.randint(-(2**62), 2**62, shape, generator=g)
    else:
        t = (torch.randn(shape, generator=g) * 100).to(dtype)
    if t.dim() >= 2 and draw(st.booleans()):
        t = t.transpose(0, 1)  # a non-contiguous view
    return t


keys = st.text("abcxyz_", min_size=1, max_size=3)
trees = st.dictionaries(
    keys,
    st.one_of(
        tensors(),
        st.dictionaries(keys, tensors(), min_size=1, max_size=3),
        st.lists(tensors(), min_size=1, max_size=3),
    ),
    min_size=1,
    max_size=6,
)


@given(
    tree=trees,
    max_shard_size=st.integers(1, 400),
    dtype=st.sampled_from([None, torch.bfloat16, torch.float64]),
)
def test_round_trip_random_trees(tree, max_shard_size, dtype, tmp_path_factory):
    d = tmp_path_factory.mktemp("rt")
    weight_map = export(d, tree, max_shard_size=max_shard_size, dtype=dtype)
    got, on_disk_map = read_export(d)
    want = flat(tree)
    assert set(got) == set(want) == set(weight_map)
    assert weight_map == on_disk_map
    for name, t in want.items():
        expected = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        assert got[name].dtype == expected.dtype, name
        assert got[name].shape == expected.shape, name
        assert torch.equal(got[name], expected), name
    # HF's sharding rule: a file exceeds max_shard_size only when it holds one tensor.
    per_file: dict[str, list[int]] = {}
    for name, f in weight_map.items():
        per_file.setdefault(f, []).append(got[name].numel() * got[name].element_size())
    for f, sizes in per_file.items():
        assert len(sizes) == 1 or sum(sizes) <= max_shard_size, (f, sizes)
    n = len(per_file)
    assert (n == 1) == (d / "model.safetensors").exists()
    assert all(f == "model.safetensors" if n == 1 else re.fullmatch(
        rf"model-\d{{5}}-of-{n:05d}\.safetensors", f) for f in per_file)  # fmt: skip
    # nothing but the export in the directory (no temporary file left behind)
    expected_files = set(per_file) | ({"model.safetensors.index.json"} if n > 1 else set())
    assert set(os.listdir(d)) == expected_files


def test_inputs_are_not_changed_and_grads_ignored(tmp_path):
    w = torch.randn(3, 4, requires_grad=True)
    before = w.detach().clone()
    export(tmp_path, {"w": w, "n": None}, dtype=torch.float16)
    got, _ = read_export(tmp_path)
    assert set(got) == {"w"} and torch.equal(got["w"], before.half())
    assert torch.equal(w.detach(), before) and w.dtype == torch.float32


def test_reexport_replaces_the_previous_one(tmp_path):
    big = {f"w{i}": torch.full((4,), float(i)) for i in range(4)}
    export(tmp_path, big, max_shard_size=16)  # 4 files + index
    assert len(os.listdir(tmp_path)) == 5
    export(tmp_path, {"v": torch.ones(2)})  # one file: the index and old shards go
    assert os.listdir(tmp_path) == ["model.safetensors"]
    export(tmp_path, big, max_shard_size=32)  # 2 files: model.safetensors goes
    got, wm = read_export(tmp_path)
    assert set(got) == set(big) and len(set(wm.values())) == 2
    other = tmp_path / "notes.txt"
    other.write_text("kept")
    export(tmp_path, {"v": torch.ones(2)})
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors", "notes.txt"]


def test_a_crash_leaves_no_half_file(tmp_path, monkeypatch):
    import fsharding._export as impl

    old = {"a": torch.zeros(8), "b": torch.zeros(8)}
    export(tmp_path, old)
    calls = []
    real = impl._write_tensor

    def failing(out, t):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        real(out, t)

    monkeypatch.setattr(impl, "_write_tensor", failing)
    new = {"a": torch.ones(8), "b": torch.ones(8)}
    with pytest.raises(OSError, match="disk full"):
        export(tmp_path, new)  # one file: the old one stays whole under its name
    assert os.listdir(tmp_path) == ["model.safetensors"]
    got, _ = read_export(tmp_path)
    assert torch.equal(got["a"], old["a"]) and torch.equal(got["b"], old["b"])
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        export(tmp_path, new, max_shard_size=32)  # several files: no export visible
    files = os.listdir(tmp_path)
    assert "model.safetensors.index.json" not in files and "model.safetensors" not in files
    assert not [f for f in files if f.startswith(".")], files  # temporary files removed
    monkeypatch.setattr(impl, "_write_tensor", real)
    export(tmp_path, new, max_shard_size=32)
    got, _ = read_export(tmp_path)
    assert torch.equal(got["a"], new["a"])


def test_bad_input_names_the_path(tmp_path):
    t = torch.ones(2)
    cases = [
        (t, TypeError, "params must be a dict"),
        ([], TypeError, "params must be a dict"),
        ([{"a": t}, t], TypeError, r"list of such dicts .* got list of \['dict', 'a torch"),
        ([{"a": t}, {"a": t}], ValueError, r"params\[1\]\['a'\] and params\[0\]\['a'\]"),
        ({"a": {"b": 3}}, TypeError, r"params\['a'\]\['b'\] is int"),
        ({"a": [t, "x"]}, TypeError, r"params\['a'\]\[1\] is str"),
        ({"a": {1: t}}, TypeError, r"params\['a'\] has the key 1 \(int\)"),
        ({"a.b": t, "a": {"b": t}}, ValueError, r"params\['a'\]\['b'\] and params\['a.b'\]"),
        ({"m": torch.ones(2, device="meta")}, ValueError, r"params\['m'\] is a meta tensor"),
        ({"s": torch.eye(2).to_sparse()}, ValueError, r"params\['s'\] has layout"),
        ({"": t}, ValueError, "would be named ''"),
        ({"c": torch.ones(2, dtype=torch.complex128)}, ValueError, "safetensors cannot hold"),
    ]
    for params, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            export(tmp_path / "out", params)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(FileExistsError, match="is an existing file"):
        export(f, {"a": t})
    for size, exc in (
        ("5 parsecs", ValueError),
        (0, ValueError),
        (1.5, TypeError),
        (True, TypeError),
    ):
        with pytest.raises(exc, match="max_shard_size"):
            export(tmp_path / "out", {"a": t}, max_shard_size=size)
    with pytest.raises(TypeError, match="dtype must be a floating"):
        export(tmp_path / "out", {"a": t}, dtype=torch.int8)
    with pytest.raises(TypeError, match="module must be"):
        export(tmp_path / "out", {"a": t}, module={"a": t})
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")
    # a failed call leaves a previous export untouched
    export(tmp_path / "ok", {"a": t})
    with pytest.raises(TypeError):
        export(tmp_path / "ok", {"a": 1})
    assert torch.equal(read_export(tmp_path / "ok")[0]["a"], t)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA tensors need a GPU")
def test_cuda_tensors(tmp_path):
    params = {"w": torch.randn(5, 3, device="cuda"), "i": torch.arange(4, device="cuda")}
    export(tmp_path, params, dtype=torch.bfloat16)
    got, _ = read_export(tmp_path)
    assert torch.equal(got["w"], params["w"].bfloat16().cpu())
    assert torch.equal(got["i"], params["i"].cpu())


def test_a_list_of_stage_dicts_is_one_export(tmp_path):
    """A pipeline rank's virtual stages (a list of dicts keyed by the model's names)."""
    stages = [{"blocks.0.w": torch.ones(2)}, {"blocks.2.w": torch.zeros(3), "head.b": None}]
    assert export(tmp_path, stages) == {
        "blocks.0.w": "model.safetensors",
        "blocks.2.w": "model.safetensors",
    }
    got, _ = read_export(tmp_path)
    assert torch.equal(got["blocks.0.w"], torch.ones(2))
    assert torch.equal(got["blocks.2.w"], torch.zeros(3))


def test_max_shard_size_strings():
    from fsharding._export import _parse_size

    assert _parse_size("5GB") == 5 * 10**9
    assert _parse_size("2GiB") == 2 * 2**30
    assert _parse_size("500mb") == 500 * 10**6
    assert _parse_size(123) == 123


# --------------------------------------------------------------------------------------
# (3) a Hugging Face GPT-2: from_pretrained and load_state_dict(strict=True)
# --------------------------------------------------------------------------------------


def test_hf_gpt2_from_pretrained_and_strict_load(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        vocab_size=97,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    apply, params = fs.functional(model)
    assert "lm_head.weight" not in params  # tied: listed once, under the embedding's name
    g = torch.Generator().manual_seed(3)
    # values the module does not hold: the export must write params, not the module
    params = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in params.items()}
    ids = torch.randint(0, 97, (2, 11), generator=g)
    with torch.no_grad():
        want = apply(params, ids).logits

    hf_dir = tmp_path / "hf"
    export(hf_dir, params, max_shard_size=40_000)  # several files + index
    assert (hf_dir / "model.safetensors.index.json").exists()
    cfg.save_pretrained(hf_dir)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        got = loaded(ids).logits
    assert torch.equal(got, want)
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()

    sd_dir = tmp_path / "sd"
    export(sd_dir, params, module=model)  # + the tied alias and persistent buffers
    tensors, _ = read_export(sd_dir)
    assert set(tensors) == set(model.state_dict())
    assert torch.equal(tensors["lm_head.weight"], params["transformer.wte.weight"])
    fresh = transformers.GPT2LMHeadModel(cfg).eval()
    fresh.load_state_dict(tensors, strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, want)
    cfg.save_pretrained(sd_dir)
    from_pre = transformers.GPT2LMHeadModel.from_pretrained(sd_dir).eval()
    with torch.no_grad():
        assert torch.equal(from_pre(ids).logits, want)


def test_module_adds_persistent_buffers_only(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)
            self.bn = torch.nn.BatchNorm1d(2)
            self.register_buffer("scratch", torch.zeros(3), persistent=False)

    net = Net()
    net.bn.running_mean += 1.5
    _, params = fs.functional(net)
    export(tmp_path, params, module=net)
    got, _ = read_export(tmp_path)
    assert set(got) == set(net.state_dict())  # running stats, num_batches_tracked; no scratch
    assert torch.equal(got["bn.running_mean"], net.bn.running_mean)
    Net().load_state_dict(got, strict=True)


# --------------------------------------------------------------------------------------
# (2) ZeRO-3 GPT on 2 ranks, (4) streaming memory, pipeline subsets, errors on every rank
# --------------------------------------------------------------------------------------

N_BIG, ROWS, COLS = 16, 2048, 1024  # 16 float32 tensors of 8 MiB: 128 MiB in all


def big_shard(i: int, rank: int) -> torch.Tensor:
    """Rows [rank * ROWS/2, (rank + 1) * ROWS/2) of the i-th big tensor."""
    g = torch.Generator().manual_seed(1000 + 2 * i + rank)
    return torch.randn(ROWS // 2, COLS, generator=g)


def _status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {
        k: int(re.search(rf"{k}:\s+(\d+) kB", text).group(1)) * 1024 for k in ("VmRSS", "VmHWM")
    }


GPT_CFG = GPTConfig(vocab_size=61, seq_len=16, d_model=32, n_layers=2, n_heads=2)


def _worker(root: str):
    import gc
    import warnings

    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard

    # every collective's buffers released in time (fsharding's settle() warns otherwise)
    warnings.filterwarnings("error", message="fsharding settle", category=RuntimeWarning)
    rank = dist.get_rank()
    out: dict = {}
    mesh = fs.Mesh(dp=2)

    # (4) streaming: first, while this process is fresh. Warm up (imports, gloo buffers).
    warm = {"w": DTensor.from_local(torch.ones(2, 3), mesh.device_mesh, [Shard(0)])}
    export(f"{root}/warm", warm)
    big = {
        f"layer{i}.weight": DTensor.from_local(big_shard(i, rank), mesh.device_mesh, [Shard(0)])
        for i in range(N_BIG)
    }
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset this process's peak RSS
    base = _status()["VmRSS"]
    export(f"{root}/big", big, max_shard_size=40 * MiB)
    out["peak_delta"] = _status()["VmHWM"] - base
    del big, warm
    gc.collect()

    # plain tensors, each rank its own names (a pipeline's layout), cast to bf16 on the way
    plain = {f"stage{rank}.p{i}": big_shard(i, rank) for i in range(N_BIG)}  # 16 x 4 MiB
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    base = _status()["VmRSS"]
    export(f"{root}/cast", plain, dtype=torch.bfloat16, max_shard_size=40 * MiB)
    out["cast_peak_delta"] = _status()["VmHWM"] - base
    del plain
    gc.collect()

    # (2) ZeRO-3 on a GPT: train 2 steps, export the DTensor params.
    model = GPT(GPT_CFG, seed=0)
    apply, params = fs.functional(model)

    def loss_fn(p, batch):
        return F.cross_entropy(apply(p, batch["x"]).flatten(0, 1), batch["y"].flatten())

    step = fs.zero(fs.value_and_grad(loss_fn), optim.adamw(3e-2), mesh=mesh, stage=3)
    params, opt_state = step.init(params)
    g = torch.Generator().manual_seed(10 + rank)
    for _ in range(2):
        batch = {k: torch.randint(0, 61, (2, 16), generator=g) for k in ("x", "y")}
        params, opt_state, _ = step.step(params, opt_state, batch)
    assert all(isinstance(v, DTensor) for v in params.values())
    out["zero_map"] = export(f"{root}/zero", params, max_shard_size=40_000)
    export(f"{root}/zero_bf16", params, dtype=torch.bfloat16)  # cast on the shards
    full = step.gather(params)
    ids = torch.arange(2 * 16).reshape(2, 16) % 61
    with torch.no_grad():
        out["zero_logits"] = apply(full, ids)
    out["zero_full"] = full

    # pipeline: rank 0 holds the embeddings and block 0, rank 1 block 1 and the head
    mine = {
        k: v
        for k, v in full.items()
        if (k.startswith(("tok_emb", "pos_emb", "blocks.0.")) == (rank == 0))
    }
    out["pipe_map"] = export(f"{root}/pipe", mine, max_shard_size=40_000)
    out["pipe_mine"] = sorted(mine)

    # bad input on one rank raises on every rank, and a good call works after it
    bad = {"w": torch.ones(2)} if rank == 0 else {"w": torch.ones(2), "x": {"y": 3}}
    out["err_leaf"] = raises(lambda: export(f"{root}/bad", bad), TypeError)
    clash = {"w": torch.full((2,), float(rank))}  # one name, two values: not a replica
    out["err_replica"] = raises(lambda: export(f"{root}/bad", clash), ValueError)
    shape = {"w": torch.ones(2 + rank)}
    out["err_shape"] = raises(lambda: export(f"{root}/bad", shape), ValueError)
    out["replica_map"] = export(f"{root}/replica", {"w": torch.ones(2), f"r{rank}": torch.ones(1)})

    # HSDP-like replicas: each rank holds "h" as a DTensor on its own one-rank mesh; only
    # the writer's mesh gathers it (rank 1 reads nothing)
    import fsharding._export as impl

    sub = fs.Mesh(replicate=2, shard=1)["shard"].device_mesh
    replica = {"h": DTensor.from_local(torch.full((3,), 7.0), sub, [Shard(0)])}
    from torch.distributed.tensor import Replicate

    replica["r"] = DTensor.from_local(torch.arange(4.0), mesh.device_mesh, [Replicate()])
    calls, real = [], impl._materialize
    impl._materialize = lambda leaf: calls.append(leaf) or real(leaf)
    try:
        out["hsdp_map"] = export(f"{root}/hsdp", replica)
    finally:
        impl._materialize = real
    out["hsdp_gathers"] = len(calls)

    # a write failing on one rank (rank 1's disk is full) raises on both, no export visible
    real_write = impl._write_tensor

    def full_disk(f, t):
        raise OSError(28, "No space left on device (simulated)")

    export(f"{root}/fail", mine, max_shard_size=40_000)  # a good export first
    if rank == 1:
        impl._write_tensor = full_disk
    try:
        out["err_write"] = raises(
            lambda: export(f"{root}/fail", mine, max_shard_size=40_000), OSError
        )
    finally:
        impl._write_tensor = real_write
    return out


def _reload_in_fresh_process(*directories: Path) -> list[torch.Tensor]:
    """For each directory, GPT(...).load_state_dict(strict=True) from its files and the
    logits on fixed ids, in one new interpreter that reads the files with json and
    safetensors only (fsharding is imported just for the model class)."""
    script = f"""
import json, sys, torch
from pathlib import Path
from safetensors.torch import load_file
from fsharding.models import GPT, GPTConfig
for d in map(Path, {[str(d) for d in directories]!r}):
    index = json.loads((d / "model.safetensors.index.json").read_text())
    state = {{}}
    for f in sorted(set(index["weight_map"].values())):
        state.update(load_file(str(d / f)))
    model = GPT(GPTConfig(**{GPT_CFG.__dict__!r}), seed=123)
    model.load_state_dict(state, strict=True)
    ids = torch.arange(2 * 16).reshape(2, 16) % 61
    with torch.no_grad():
        torch.save(model(ids), d / "fresh_logits.pt")
"""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
    return [torch.load(d / "fresh_logits.pt") for d in directories]


@pytest.mark.timeout(300)
def test_two_ranks_zero3_gpt_streaming_pipeline_errors(tmp_path, monkeypatch):
    # Peak RSS measures live memory only if freed memory goes back to the OS: glibc keeps
    # freed blocks of a few MiB in its heap (a gather-and-drop loop grew RSS by 40-60 MiB,
    # most of it reusable free space). With a fixed mmap threshold every tensor of 1 MiB or
    # more is its own mapping, returned when freed, so VmHWM - VmRSS is the true peak.
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(MiB))
    r0, r1 = run(_worker, 2, str(tmp_path), timeout=240.0)

    # (4) streaming: peak RSS growth during the export of 16 x 8 MiB DTensors (4 MiB shards)
    largest, total = ROWS * COLS * 4, N_BIG * ROWS * COLS * 4
    peaks = [r0["peak_delta"], r1["peak_delta"]]
    print(
        f"export streaming: model {total / MiB:.0f} MiB, largest tensor {largest / MiB:.0f} MiB,"
        f" peak RSS delta rank0 {peaks[0] / MiB:.1f} MiB, rank1 {peaks[1] / MiB:.1f} MiB"
    )
    assert max(peaks) < 3 * largest, peaks  # materializing the model would take > 128 MiB
    # the same for plain tensors cast to bf16: about one cast tensor, not all of them
    cast_largest = ROWS // 2 * COLS * 2
    cast_peaks = [r0["cast_peak_delta"], r1["cast_peak_delta"]]
    print(
        f"export cast streaming: {2 * N_BIG} tensors of {cast_largest / MiB:.0f} MiB in bf16, "
        f"peak RSS delta rank0 {cast_peaks[0] / MiB:.1f} MiB, rank1 {cast_peaks[1] / MiB:.1f} MiB"
    )
    assert max(cast_peaks) < 3 * cast_largest, cast_peaks  # casting all first: 32 MiB
    got, _ = read_export(tmp_path / "cast")
    for i in range(N_BIG):
        for r in (0, 1):
            assert torch.equal(got[f"stage{r}.p{i}"], big_shard(i, r).bfloat16()), (i, r)
    got, weight_map = read_export(tmp_path / "big")
    assert len(set(weight_map.values())) == 4  # 40 MiB files of 8 MiB tensors: 5 per file
    for i in range(N_BIG):
        want = torch.cat([big_shard(i, 0), big_shard(i, 1)])
        assert torch.equal(got[f"layer{i}.weight"], want), i

    # (2) ZeRO-3 GPT: files = gathered params; a fresh process reloads it strictly
    assert r0["zero_map"] == r1["zero_map"]
    got, _ = read_export(tmp_path / "zero")
    full = r0["zero_full"]
    assert set(got) == set(full) == set(GPT(GPT_CFG).state_dict())
    for k, v in full.items():
        assert torch.equal(got[k], v), k
    assert len(set(r0["zero_map"].values())) > 1
    got, _ = read_export(tmp_path / "zero_bf16")
    for k, v in full.items():
        assert torch.equal(got[k], v.bfloat16()), k
    zero_logits, pipe_logits = _reload_in_fresh_process(tmp_path / "zero", tmp_path / "pipe")
    assert torch.equal(zero_logits, r0["zero_logits"])
    assert torch.equal(r0["zero_logits"], r1["zero_logits"])

    # pipeline: each rank wrote its own stage's files; one index names them all
    assert r0["pipe_map"] == r1["pipe_map"]
    files0 = {r0["pipe_map"][n] for n in r0["pipe_mine"]}
    files1 = {r1["pipe_map"][n] for n in r1["pipe_mine"]}
    assert files0 and files1 and not files0 & files1
    got, _ = read_export(tmp_path / "pipe")
    assert set(got) == set(full)
    assert torch.equal(pipe_logits, r0["zero_logits"])

    # errors: raised on both ranks, naming the rank and the path
    for r in (r0, r1):
        assert "params['x']['y'] is int" in r["err_leaf"]
        assert "not a replica" not in r["err_replica"] and "different values" in r["err_replica"]
        assert "'w'" in r["err_shape"] and "differ" in r["err_shape"]
    assert r0["err_leaf"].startswith("rank 1: fs.export")
    assert "No space left" in r0["err_write"] and r0["err_write"].startswith("rank 1:")
    assert "No space left" in r1["err_write"]
    left = os.listdir(tmp_path / "fail")  # rank 0's new files, but no index
    assert "model.safetensors.index.json" not in left and not [f for f in left if f[0] == "."]
    # a replicated name is written once; per-rank names by their rank
    assert r0["replica_map"] == r1["replica_map"]
    got, wm = read_export(tmp_path / "replica")
    assert set(got) == {"w", "r0", "r1"} and len(set(wm.values())) == 2
    assert (r0["hsdp_gathers"], r1["hsdp_gathers"]) == (2, 1)  # rank 1: "r" only
    got, _ = read_export(tmp_path / "hsdp")
    assert torch.equal(got["h"], torch.full((3,), 7.0)) and torch.equal(got["r"], torch.arange(4.0))
