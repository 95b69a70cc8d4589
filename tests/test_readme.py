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
