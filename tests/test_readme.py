"""The README's quickstart runs as written and learns, and its two set-up commands are the
CI's."""

from __future__ import annotations

import math
import pathlib
import re

import pytest
import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quickstart_runs_and_learns(seed):
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks, "README has no python example"
    torch.manual_seed(seed)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert math.isfinite(float(namespace["metrics"]["loss"]))
    # Judge on 4096 fresh examples of the README's own task, not on the last (noisy) batch:
    # the trained model must be far below chance (cross-entropy log 4 = 1.386, accuracy
    # 1/4) and far below the same model before training.
    batch = namespace["sample"](4096)
    apply, params = namespace["apply"], namespace["params"]
    with torch.no_grad():
        logits = apply(params, batch["x"])
        untrained = namespace["model"](batch["x"])  # the module keeps its initial weights
    loss = F.cross_entropy(logits, batch["y"]).item()
    start = F.cross_entropy(untrained, batch["y"]).item()
    accuracy = (logits.argmax(-1) == batch["y"]).float().mean().item()
    assert loss < 0.35 * math.log(4), (loss, start)
    assert loss < 0.35 * start, (loss, start)
    assert accuracy > 0.85, accuracy


def test_set_up_commands():
    commands = re.findall(r"```bash\n(pip install torch==2\.13\.0 .*?)\n```", README)
    assert len(commands) == 2, commands
    assert commands[0].endswith("python -m fsharding.train")
    assert commands[1].endswith("python -m pytest -q")
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def _deepspeed_row(key: str) -> str:
    rows = [r for r in README.splitlines() if r.startswith(f"| {key} ")]
    assert len(rows) == 1, (key, rows)
    return rows[0]


def test_deepspeed_bf16_row_is_bf16_weights_with_fp32_masters_and_runs():
    # DeepSpeed's bf16 stores bf16 weights and keeps fp32 master copies: pure_bf16 plus
    # fs.amp(optimizer), not the autocast-style "bf16" policy (fp32 weights).
    row = _deepspeed_row("`bf16` (bf16 weights, fp32 master weights)")
    for piece in (
        'fs.Policy.parse("pure_bf16").cast_to_param(params)',
        'fs.amp(loss_fn, policy="pure_bf16")',
        'fs.amp(opt, policy="pure_bf16")',
    ):
        assert piece in row, piece
    import fsharding as fs
    from fsharding import optim

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))
    apply, params = fs.functional(model)
    params = fs.Policy.parse("pure_bf16").cast_to_param(params)
    loss_fn = lambda p, b: F.cross_entropy(apply(p, b["x"]), b["y"])  # noqa: E731
    opt = optim.adamw(1e-2)
    step = fs.train_step(
        fs.value_and_grad(fs.amp(loss_fn, policy="pure_bf16")), fs.amp(opt, policy="pure_bf16")
    )
    p, state = step.init(params)
    batch = {"x": torch.randn(64, 8), "y": torch.randint(0, 3, (64,))}
    first = None
    for _ in range(30):
        p, state, metrics = step.step(p, state, batch)
        first = float(metrics["loss"]) if first is None else first
    assert all(v.dtype == torch.bfloat16 for v in p.values())
    masters = fs.tree.leaves(state.master)
    assert masters and all(m.dtype == torch.float32 for m in masters)
    assert float(metrics["loss"]) < 0.9 * first  # it trains (memorises the fixed batch)


def test_checkpoint_example_runs_after_the_quickstart(tmp_path, monkeypatch):
    section = README.split("## Checkpoints", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the Checkpoints section has one python example"
    quickstart = re.findall(r"```python\n(.*?)```", README, re.S)[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(quickstart, "README.md", "exec"), namespace)
    trained = {k: v.clone() for k, v in namespace["params"].items()}
    opt_before = namespace["opt_state"]
    exec(compile(blocks[0], "README.md#checkpoints", "exec"), namespace)
    state = namespace["state"]
    assert state["step"] == 200 and (tmp_path / "ckpt" / "step-000200").is_dir()
    for k, v in trained.items():  # a new tree holding the saved values
        assert torch.equal(namespace["params"][k], v) and namespace["params"][k] is not v
    count = lambda s: s[1][0].count  # noqa: E731  (adamw's Adam state in the chain)
    assert count(namespace["opt_state"]) == count(opt_before) == 200
    from safetensors.torch import load_file

    fresh = torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 4)
    )  # the quickstart's model, untrained
    fresh.load_state_dict(load_file(tmp_path / "exported" / "model.safetensors"), strict=True)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, trained[k]), k


def test_checkpoint_commands_name_real_flags():
    from fsharding import train

    section = README.split("## Checkpoints", 1)[1].split("\n## ", 1)[0]
    lines = re.findall(r"```bash\n(.*?)```", section, re.S)[0].strip().splitlines()
    assert len(lines) == 3
    for line in lines:
        argv = line.split("#")[0].split("fsharding.train", 1)[1].split()
        args = train.parse_args(argv)  # exits on an unknown flag or a bad combination
        assert args.resume or args.export


def test_main_job_commands_name_real_flags_and_enough_ranks():
    from fsharding import train

    section = README.split("## The main job", 1)[1].split("\n## ", 1)[0]
    lines = re.findall(r"```bash\n(.*?)```", section, re.S)[0].strip().splitlines()
    pipelines = 0
    for line in lines:
        argv = line.split("#")[0].split("fsharding.train", 1)[1].split()
        args = train.parse_args(argv)  # exits on an unknown flag or a bad combination
        if args.pipeline is not None or args.zero is not None:
            nproc = int(re.search(r"torchrun --nproc-per-node (\d+) ", line).group(1))
            assert nproc % (args.pipeline or 1) == 0, line
            pipelines += args.pipeline is not None
    assert pipelines == 2


def test_tutorials_are_listed_in_order():
    section = README.split("## Tutorials", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(
        r"^(\d+)\. \[`(\d\d)_(\w+)\.ipynb`\]\(tutorials/\2_\3\.ipynb\)", section, re.M
    )
    notebooks = sorted(p.name for p in (ROOT / "tutorials").glob("[0-9][0-9]_*.ipynb"))
    assert [f"{n}_{name}.ipynb" for _, n, name in listed] == notebooks
    assert [int(i) for i, _, _ in listed] == [int(n) for _, n, _ in listed]
    assert [int(i) for i, _, _ in listed] == list(range(1, len(listed) + 1))
