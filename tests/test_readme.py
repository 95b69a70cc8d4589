"""The README's quickstart runs as written, and its two set-up commands are the CI's."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def test_quickstart_runs():
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["metrics"]["loss"] > 0


def test_set_up_commands():
    commands = re.findall(r"```bash\n(pip install torch==2\.13\.0 .*?)\n```", README)
    assert len(commands) == 2, commands
    assert commands[0].endswith("python -m fsharding.train")
    assert commands[1].endswith("python -m pytest -q")
    assert commands[1] in (ROOT / ".ci" / "run").read_text()
