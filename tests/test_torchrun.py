"""Multi-node launch is plain torchrun: two launchers on loopback equal one process."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest
import torch

JOB = pathlib.Path(__file__).with_name("torchrun_job.py")
ROOT = JOB.parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(240)
def test_two_torchrun_nodes_on_loopback_match_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    ref = tmp_path / "ref.json"
    subprocess.run([sys.executable, str(JOB), str(ref)], env=env, check=True, timeout=120)
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
            "--nproc-per-node", "1", "--node-rank", str(node), "--master-addr", "127.0.0.1",
            "--master-port", str(port), str(JOB), str(tmp_path / f"node{node}.json"),
        ]  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT))
    try:
        codes = [p.wait(timeout=200) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert codes == [0, 0]
    want = json.loads(ref.read_text())
    for node in (0, 1):
        got = json.loads((tmp_path / f"node{node}.json").read_text())
        assert got["losses"] == pytest.approx(want["losses"], rel=1e-5)
        for k, v in want["params"].items():
            torch.testing.assert_close(
                torch.tensor(got["params"][k]), torch.tensor(v), rtol=1e-5, atol=1e-6
            )


EXIT_JOB = JOB.with_name("torchrun_exit_job.py")
EXIT_RUNS, EXIT_PARALLEL = 20, 2


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_torchrun_runs_exit_cleanly_every_time(tmp_path):
    # before the fix: SIGABRT at exit ("terminate called without an active exception",
    # torchrun rc 1) in a fraction of runs; gloo's worker thread dropped the last work
    # while the interpreter was finalizing
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    failed, running = [], []

    def finish(p, log):
        try:
            code = p.wait(timeout=300)
        except subprocess.TimeoutExpired:
            p.kill()
            code = "timeout"
        if code != 0:
            failed.append((code, log.read_text()[-2000:]))

    try:
        for i in range(EXIT_RUNS):
            log = tmp_path / f"run{i}.log"
            cmd = [
                sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(EXIT_JOB),
            ]  # fmt: skip
            with open(log, "w") as out:
                p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
            running.append((p, log))
            if len(running) == EXIT_PARALLEL:
                finish(*running.pop(0))
        while running:
            finish(*running.pop(0))
    finally:
        for p, _ in running:
            p.kill()
    assert not failed, f"{len(failed)} of {EXIT_RUNS} torchrun runs failed; first: {failed[0]}"
