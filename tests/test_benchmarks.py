"""Smoke runs of the prepared benchmark scripts that CI cannot run for real (no GPU here)."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _table_rows(report: str, section: str) -> dict[str, list[str]]:
    body = report.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("variant", "---") and len(cells) > 1:
            rows[cells[0]] = cells[1:]
    return rows


def test_gpu_memory_script_runs_on_cpu_and_its_checks_pass(tmp_path):
    out = tmp_path / "gpu.md"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_memory.py"), "--device", "cpu"]
    cmd += ["--preset", "tiny", "--batch", "2", "--steps", "1", "--warmup", "0", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = out.read_text()
    assert "FAIL" not in report and report.count("PASS") >= 10
    mem = _table_rows(report, "Memory per transform")
    saved = {name: float(cells[2]) for name, cells in mem.items() if cells[2] != "–"}
    # The transforms did something: fewer bytes saved on the device than without them.
    assert saved["remat(nothing_saveable)"] < saved["remat(dots_saveable)"] < saved["none"]
    assert saved["offload(to='cpu')"] < saved["none"] / 4
    assert float(mem["offload(to='cpu')"][3]) > saved["none"] / 2  # ... because they went to host
    assert float(mem["remat(nothing_saveable)"][1]) < float(mem["none"][1])  # peak memory
    speed = _table_rows(report, "bf16 vs fp32 step time")
    assert len(speed) == 6 and all(float(cells[0]) > 0 for cells in speed.values())


# --------------------------------------------------------------------------- CPU benchmarks
# The headline benchmarks on the tiny preset (seconds): like-for-like baselines (fused
# AdamW), memory measured the same way on both sides, params compared after the run.

import importlib.util  # noqa: E402
import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

BENCH = os.path.join(ROOT, "benchmarks")


def _bench(script: str, tmp_path, *args: str, timeout: int = 600) -> dict:
    out = tmp_path / f"{script}.json"
    cmd = [sys.executable, os.path.join(BENCH, script), *args, "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def _common():
    """``benchmarks/common.py`` (BENCH_COMMON_DIR: another copy, e.g. an older revision)."""
    where = os.environ.get("BENCH_COMMON_DIR", BENCH)
    spec = importlib.util.spec_from_file_location("bench_common", os.path.join(where, "common.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_common"] = mod  # (dataclasses look their module up)
    spec.loader.exec_module(mod)
    return mod


def test_peak_live_counts_a_tracked_tensor_only_while_it_lives():
    # torch's loop frees the previous step's .grad at zero_grad(set_to_none=True): a probe
    # that keeps the tracked tensors alive counts them for the whole step (the §1 artefact).
    common = _common()
    box = [torch.zeros(2**18)]  # 1 MiB, tracked at entry, freed inside the region

    def step():
        box.clear()
        b = torch.ones(2**18)  # 1 MiB made by an op
        del b

    peak = common.peak_live_mib(step, list(box))  # (not inside assert: pytest keeps args)
    assert peak == pytest.approx(1.0)
    box.append(torch.zeros(2**18))
    peak = common.peak_live_mib(step, lambda: list(box))
    assert peak == pytest.approx(1.0)
    keep = torch.zeros(2**18)  # still held: counted with the op's output
    peak = common.peak_live_mib(lambda: torch.ones(2**18), [keep])
    assert peak == pytest.approx(2.0)


def test_param_deviation_is_relative_to_the_update():
    common = _common()
    init = {"w": torch.ones(4), "b": torch.zeros(4)}
    ref = {"w": torch.full((4,), 0.9), "b": torch.full((4,), 0.1)}  # moved 0.1 each
    got = {"w": torch.full((4,), 0.9), "b": torch.tensor([0.1, 0.1, 0.1, 0.11])}
    d, leaf = common.param_deviation(got, ref, init)
    assert leaf == "b" and d == pytest.approx(0.01 / (0.1 * 8**0.5), rel=1e-6)
    assert common.param_deviation(ref, ref, init) == (0.0, "w")
    with pytest.raises(KeyError, match="different params"):
        common.param_deviation({"w": ref["w"]}, ref, init)


def test_bench_step_fused_baseline_same_memory_accounting(tmp_path):
    res = _bench(
        "bench_step.py", tmp_path, "--preset", "tiny", "--batch", "2", "--steps", "2",
        "--warmup", "1", "--threads", "1",
    )  # fmt: skip
    rows, checks = res["rows"], res["checks"]
    names = list(rows)
    assert names[0] == "nn.Module + AdamW(fused)"  # the baseline: the kernel fs.adamw runs
    assert "fs.train_step (donate)" in rows and any("foreach" in n for n in names[1:])
    for name, c in checks.items():  # same work, params after the run included
        assert c["ok"] and c["params"] <= 1e-3 and len(checks) == 3, (name, c)
    # Memory measured the same way on both sides: the torch row is the peak of one step that
    # starts with params + AdamW state and no .grad (the loop frees them at zero_grad),
    # measured here independently; the old probe kept the previous step's grads alive.
    expected = _torch_step_peak_mib()
    torch_peak = rows["nn.Module + AdamW(fused)"]["peak live MiB"]
    assert torch_peak == pytest.approx(expected, abs=0.02), (torch_peak, expected)
    fs_peak = rows["fs.train_step (donate)"]["peak live MiB"]
    grads = sum(p.numel() * 4 for p in _tiny_model().parameters()) / 2**20
    assert abs(fs_peak - torch_peak) < grads  # (same order; the difference is reported)


def _tiny_model():
    from fsharding.models import GPT, GPTConfig

    return GPT(GPTConfig.preset("tiny"), seed=0)


def _torch_step_peak_mib() -> float:
    """Peak live MiB of one nn.Module + AdamW(fused) step of GPT tiny (batch 2), grads None
    at entry: PeakLiveMemory from the benchmark's common, the loop written here."""
    import torch.nn.functional as F

    common = _common()
    model = _tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=True)  # fmt: skip
    ids = torch.randint(0, 256, (2, 65), generator=torch.Generator().manual_seed(0))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.get_total_norm([p.grad for p in model.parameters()], foreach=True)
        opt.step()

    step()
    opt.zero_grad(set_to_none=True)
    state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    tracked = [*model.parameters(), *state]
    del state
    return common.peak_live_mib(step, lambda: tracked)


def test_bench_memory_remat_same_path_ratio_and_params_check(tmp_path):
    res = _bench(
        "bench_memory.py", tmp_path, "--preset", "tiny", "--only", "b", "--steps", "2",
        "--warmup", "1", "--max-rounds", "2", "--retries", "0", "--threads", "2", "--no-write",
    )  # fmt: skip
    b = res["b"]
    goals = {(r["variant"], r["reference"]): r["goal"] for r in b["ratios"]}
    # fs.remat against torch's checkpoint on the same path (fs.functional's wrap), with a goal
    assert goals[("fs remat(nothing_saveable)", "fs.functional + torch checkpoint (decomp.)")]
    assert goals[("fs remat(dots_saveable)", "fs.functional + torch SAC (decomp.)")]
    for name, row in b["rows"].items():  # loss / grad norm / params after the run, all ok
        dl, dg, dp = (float(x) for x in row["check"].split(" ok")[0].split(" / "))
        assert row["check"].endswith("ok (fp32)") and dp <= 1e-3, (name, row["check"])
    # the remat rows saved less than eager and match torch's checkpoint byte for byte
    rows = b["rows"]
    assert rows["fs remat(nothing_saveable)"]["saved MiB"] < rows["eager nn.Module"]["saved MiB"]
    assert rows["fs remat(nothing_saveable)"]["saved MiB"] == pytest.approx(
        rows["torch checkpoint per block"]["saved MiB"]
    )


def test_bench_rss_fresh_processes_gc_on_and_off(tmp_path):
    figs = _bench(
        "bench_rss.py", tmp_path, "--preset", "tiny", "--steps", "5",
        "--variants", "selfcheck-cycle,eager,remat,zero0",
        "--mmap-threshold", "65536",  # freed blocks leave RSS: GC on holds 1-2 cycles' worth
        timeout=900,
    )  # fmt: skip
    assert set(figs) == {"selfcheck-cycle", "eager", "remat", "zero0"}
    for k, f in figs.items():
        assert f["on"]["gc_was_off"] is False and f["off"]["gc_was_off"] is True, k
        for mode in ("on", "off"):
            assert f[mode]["peak_rss"] > f[mode]["base_rss"] > 0, (k, mode)
        if k != "selfcheck-cycle":  # tensors a step needs are in the process's RSS
            assert 0 < f["on"]["peak_live"] < f["on"]["peak_rss"] - 0.5 * f["on"]["base_rss"]
    pids = {f[m]["pid"] for k, f in figs.items() if k in ("eager", "remat") for m in f}
    assert len(pids) == 4  # every 1-process run in a fresh interpreter
    assert len(figs["zero0"]["on"]["peak_rss_per_rank"]) == 2  # per rank of the 2
    # The harness sees memory held by reference cycles: 5 steps x 16 MiB with GC off, at
    # most two with GC on.
    leak = figs["selfcheck-cycle"]
    assert leak["off"]["peak_rss"] - leak["on"]["peak_rss"] > 2.5 * 16


def test_run_headlines_commands_use_existing_options():
    # The lead runs benchmarks/run_headlines.sh once, on a quiet machine: a misspelt option
    # would cost that run. Every option it passes must be one its script accepts.
    import re

    text = open(os.path.join(BENCH, "run_headlines.sh")).read().replace("\\\n", " ")
    assert subprocess.run(["bash", "-n", os.path.join(BENCH, "run_headlines.sh")]).returncode == 0
    calls = re.findall(r"python (benchmarks/\w+\.py)([^\n]*)", text)
    scripts = {s for s, _ in calls}
    assert scripts == {
        "benchmarks/bench_step.py", "benchmarks/bench_memory.py", "benchmarks/bench_zero.py",
        "benchmarks/bench_rss.py",
    }  # fmt: skip
    helps = {}
    for s in scripts:
        proc = subprocess.run([sys.executable, s, "--help"], capture_output=True, text=True,
                              cwd=ROOT, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        helps[s] = proc.stdout
    for s, args in calls:
        for opt in re.findall(r"--[a-z][a-z0-9-]*", args):
            assert opt in helps[s], (s, opt)
    for opt in ("--ds-variants", "--ds-adam"):  # (passed through the DS=(...) array)
        assert opt in text and opt in helps["benchmarks/bench_zero.py"], opt
    # ... and every headline has its command: fused baselines, the amp rows, GC on and off
    assert re.search(r"--only b\b", text) and re.search(r"--only d\b", text)  # remat, amp
    assert "--memory-gc both" in text and "--write" in text
    assert "ddp,ddp-foreach,zero0,zero1,zero2,fsdp2" in text and "bench_rss.py" in text


def test_bench_zero_fused_baselines_and_params_check(tmp_path):
    res = _bench(
        "bench_zero.py", tmp_path, "--preset", "tiny", "--steps", "2", "--warmup", "1",
        "--retries", "0", "--ds-variants", "", "--variants",
        "ddp,ddp-foreach,zero0,fsdp2,zero3-blocks-reshard", timeout=900,
    )  # fmt: skip
    rows = res["rows"]
    assert list(rows) == ["ddp", "ddp-foreach", "zero0", "fsdp2", "zero3-blocks-reshard"]
    assert "AdamW(fused)" in rows["ddp"]["label"] and "AdamW(fused)" in rows["fsdp2"]["label"]
    assert "foreach" in rows["ddp-foreach"]["label"] and "extra row" in rows["ddp-foreach"]["label"]
    for k, r in rows.items():  # every variant ends with eager's params (full, gathered)
        assert r["params_dev"] is not None and r["params_dev"] <= 1e-3, (k, r)
        assert r["loss_dev"] <= 1e-4 and r["grad_norm_dev"] <= 1e-3, (k, r)
    assert rows["zero3-blocks-reshard"]["state_mib"] < 0.6 * rows["ddp"]["state_mib"]


# --------------------------------------------------------------------------- pipeline, checkpoints
# bench_pipeline.py and bench_checkpoint.py on GPT tiny: the rows exist, their same-work
# checks ran (the scripts exit non-zero otherwise), and the figures measure something.

DS_PYTHON = "/work/dsvenv/bin/python"


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, BENCH)
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(BENCH)
    return mod


@pytest.mark.timeout(120)
def test_bench_pipeline_fs_vs_torch_same_work_and_gpipe_holds_more(tmp_path):
    res = _bench(
        "bench_pipeline.py", tmp_path, "--preset", "tiny", "--steps", "2", "--warmup", "1",
        "--retries", "0", "--ds-variants", "", "--variants", "torch-1f1b,fs-1f1b,fs-gpipe",
        "--memory", "--memory-steps", "1", "--memory-variants", "fs-1f1b,fs-gpipe", timeout=300,
    )  # fmt: skip
    rows = res["rows"]
    assert list(rows) == ["torch-1f1b", "fs-1f1b", "fs-gpipe"]
    assert "Schedule1F1B" in rows["torch-1f1b"]["label"]
    assert rows["torch-1f1b"]["ratio"] == 1.0
    for k, r in rows.items():  # the same work as the one-process eager reference
        assert r["loss_dev"] <= 1e-4 and r["grad_norm_dev"] <= 1e-3, (k, r)
        assert r["params_dev"] <= 1e-3 and r["median_ms"] > 0, (k, r)
        assert r["ratio"] == pytest.approx(r["median_ms"] / rows["torch-1f1b"]["median_ms"])
    for k in ("fs-1f1b", "fs-gpipe"):  # each alone in a fresh launch: per rank
        r = rows[k]
        assert len(r["peak_rss"]) == 2 and "peak_rss" not in rows["torch-1f1b"]
        assert all(p > b > 0 for p, b in zip(r["peak_rss"], r["base_rss"])), (k, r)
    # peak live measures the schedule: GPipe holds all 8 microbatches' activations on rank 0,
    # 1F1B at most 2 (rank 0 of 2); 8 x 64 tokens x 128 wide x 3 blocks is several MiB
    assert rows["fs-gpipe"]["peak_live"][0] > rows["fs-1f1b"]["peak_live"][0] + 1.0, rows


def test_bench_pipeline_check_fails_loudly_on_other_work():
    bp = _bench_module("bench_pipeline")
    ref = [(5.0, 2.0), (4.0, 1.5)]  # (loss, global grad norm) per step
    out = {
        "loss": [[5.0, 4.0]],
        "grad_norm": [[[2.0, 2.0], [1.5, 1.5]]],  # every rank's, per step
        "params_dev": [(0.0, "w")],
    }
    assert bp.check("same", out, 0, ref)["loss_dev"] == 0.0
    for bad in (
        {**out, "loss": [[5.0, 4.01]]},  # a different loss at step 2
        {**out, "grad_norm": [[[2.0, 2.0], [1.5, 1.6]]]},  # rank 1 saw other grads
        {**out, "params_dev": [(2e-3, "w")]},  # params end elsewhere
        {**out, "loss": [[5.0, None]]},  # no loss reported
    ):
        with pytest.raises(AssertionError):
            bp.check("other", bad, 0, ref)


@pytest.mark.timeout(120)
def test_bench_checkpoint_fs_vs_dcp_state_roundtrips_and_sizes(tmp_path):
    res = _bench(
        "bench_checkpoint.py", tmp_path, "--preset", "tiny", "--repeats", "3", "--dir",
        str(tmp_path), "--ds-python", "", timeout=300,
    )  # fmt: skip
    ops = res["ops"]
    assert set(ops) == {"fs.save", "fs.load", "dcp.save", "dcp.load", "fs.export"}
    for op, o in ops.items():
        assert o["time"]["n"] == 3 and o["time"]["median"] > 0, op
        assert len(o["delta"]) == 2, op
    from fsharding.models import GPT, GPTConfig

    params = list(GPT(GPTConfig.preset("tiny")).parameters())
    full = sum(p.numel() * 4 for p in params) / 2**20
    sizes = res["sizes"]
    assert sizes["full_params"] == pytest.approx(full)
    assert sizes["largest_tensor"] == pytest.approx(max(p.numel() * 4 for p in params) / 2**20)
    assert sizes["local_params"] == pytest.approx(full / 2, rel=0.05)  # ZeRO-3: a half each
    # params + AdamW mu + nu on disk (both formats; + DCP's metadata), the export the params
    for k in ("fs", "dcp"):
        assert 3 * full <= res["disk"][k] <= 3 * full + 1.0, (k, res["disk"])
    assert full <= res["disk"]["export"] <= full + 0.1, res["disk"]
    assert all(v >= 0 for v in res["evicted_resident"].values())  # fincore answered


@pytest.mark.timeout(600)
@pytest.mark.skipif(not os.path.exists(DS_PYTHON), reason="DeepSpeed's virtualenv is absent")
def test_bench_checkpoint_deepspeed_rows_same_state(tmp_path):
    res = _bench(
        "bench_checkpoint.py", tmp_path, "--preset", "tiny", "--repeats", "3", "--dir",
        str(tmp_path), "--ds-exports", "get_fp32", timeout=600,
    )  # fmt: skip
    # (the script asserts that DeepSpeed's load restores its zeroed partitions and that its
    # zero_to_fp32 export holds fs.export's params: same model, batch and AdamW step)
    assert {"ds.save", "ds.load"} <= set(res["ops"])
    assert set(res["ds_exports"]) == {"get_fp32"}
    for how, e in res["ds_exports"].items():
        assert e["time"]["n"] == 3 and e["time"]["median"] > 0, how


def test_run_headlines_pipeline_commands_use_existing_options():
    # The quiet run of §6 / §7 happens once: every option the wrapper passes must exist, and
    # its processes must carry "run_headlines.sh" (the pause signal for everyone else).
    import re

    path = os.path.join(BENCH, "run_headlines_pipeline.sh")
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    text = open(path).read().replace("\\\n", " ")
    assert re.search(r"exec -a run_headlines\.sh ", text)
    calls = dict(re.findall(r"python (benchmarks/\w+\.py)([^\n]*)", text))
    pipe, ckpt = "benchmarks/bench_pipeline.py", "benchmarks/bench_checkpoint.py"
    assert set(calls) == {pipe, ckpt}
    helps = {}
    for s in calls:
        proc = subprocess.run([sys.executable, s, "--help"], capture_output=True, text=True,
                              cwd=ROOT, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        helps[s] = proc.stdout
    for s, args in calls.items():
        assert "--write" in args, s
        for opt in re.findall(r"--[a-z][a-z0-9-]*", args):
            assert opt in helps[s], (s, opt)
    # (the options of NO_DEEPSPEED=1, passed through the PDS / CDS arrays)
    assert "--ds-variants" in text and "--ds-variants" in helps[pipe]
    assert "--ds-python" in text and "--ds-python" in helps[ckpt]
