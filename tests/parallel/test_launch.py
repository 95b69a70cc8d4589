"""fs.launch: results, cloudpickle, the caller left alone, the first failure named, timeouts."""

from __future__ import annotations

import os
import threading
import time
import uuid

import pytest
import torch
import torch.distributed as dist

from fsharding.parallel.launch import LaunchError, launch


def _state():
    return (
        torch.get_rng_state(),
        torch.get_num_threads(),
        threading.active_count(),
        dict(os.environ),
    )


@pytest.mark.timeout(120)
def test_returns_per_rank_values_and_leaves_the_caller_alone(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    # the caller has its own (one-process) group: launch must neither join nor change it
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        group = dist.distributed_c10d._get_default_group()
        before = _state()
        offset = 5
        scale = lambda r: r * 10  # noqa: E731 - a lambda argument travels by cloudpickle

        marker = str(tmp_path / "drained")

        def work(fn):  # a closure defined in a test: pickled by value
            import torch.distributed as dist

            from fsharding import _compat

            rank = dist.get_rank()
            # work left running when fn returns (as an async fs.save): a collective on its
            # own group after a delay; launch drains it before destroying the group
            side = dist.new_group(backend="gloo")

            def late():
                time.sleep(0.5)
                v = torch.full((1,), rank + 1.0)
                dist.all_reduce(v, group=side)
                with open(f"{marker}-{rank}", "w") as f:
                    f.write(str(v.item()))

            pending = threading.Thread(target=late)
            pending.start()
            _compat.register_drain(pending.join)
            print(f"hello from rank {rank}")
            t = torch.full((2,), float(rank))
            dist.all_reduce(t)
            return {
                "value": fn(rank) + offset,
                "world": dist.get_world_size(),
                "backend": dist.get_backend(),
                "sum": t,
                "omp": (os.environ["OMP_NUM_THREADS"], torch.get_num_threads()),
                "env": (os.environ["RANK"], os.environ["WORLD_SIZE"]),
            }

        results = launch(work, 2, scale, timeout=60)
        assert _state()[1:] == before[1:] and torch.equal(_state()[0], before[0])
        assert dist.is_initialized() and dist.distributed_c10d._get_default_group() is group
        assert dist.get_world_size() == 1
    finally:
        dist.destroy_process_group()
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert [r["value"] for r in results] == [5, 15]
    for rank, r in enumerate(results):
        assert r["world"] == 2 and r["backend"] == "gloo" and r["env"] == (str(rank), "2")
        assert torch.equal(r["sum"], torch.ones(2)) and r["omp"] == (str(threads), threads)
    for rank in range(2):  # the work left running finished, collective included
        assert open(f"{marker}-{rank}").read() == "3.0"
    out = capsys.readouterr().out
    assert "hello from rank 0" in out and "hello from rank 1" in out


def _raise_while_peer_waits(raiser: int):
    rank = dist.get_rank()
    if rank == raiser:
        time.sleep(1.0)  # the peer is blocked in the all_reduce by now
        raise ValueError(f"boom on rank {rank}")
    dist.all_reduce(torch.ones(1))  # fails only once the raiser is gone
    return rank


@pytest.mark.timeout(120)
@pytest.mark.parametrize("raiser", [1, 0])
def test_the_first_failing_rank_is_named_not_its_victim(raiser):
    start = time.monotonic()
    with pytest.raises(LaunchError) as info:
        launch(_raise_while_peer_waits, 2, raiser, timeout=60)
    err = info.value
    assert str(err).startswith(f"rank {raiser} raised ValueError: boom on rank {raiser}")
    assert err.rank == raiser and next(iter(err.tracebacks)) == raiser
    assert "ValueError: boom" in err.tracebacks[raiser]
    if len(err.tracebacks) == 2:  # the victim recorded its connection error: listed after
        assert "Then, on other ranks" in str(err) and f"rank {1 - raiser} raised" in str(err)
    assert time.monotonic() - start < 40


def _exit_while_peer_waits():
    if dist.get_rank() == 1:
        time.sleep(1.0)
        os._exit(3)
    dist.all_reduce(torch.ones(1))


@pytest.mark.timeout(120)
def test_a_rank_exiting_without_an_exception_is_named():
    with pytest.raises(LaunchError, match=r"^rank 1 exited with code 3 before fn returned") as e:
        launch(_exit_while_peer_waits, 2, timeout=60)
    assert e.value.rank == 1


def _alive_with(marker: str) -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if marker.encode() in f.read():
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


@pytest.mark.timeout(60)
def test_timeout_kills_every_child(monkeypatch):
    marker = f"FSHARDING_TEST_{uuid.uuid4().hex}"
    monkeypatch.setenv(marker, "1")  # inherited by the children only: finds them in /proc
    start = time.monotonic()
    with pytest.raises(LaunchError, match=r"^fs.launch timed out after 4 s") as e:
        launch(time.sleep, 2, 600, timeout=4)
    assert time.monotonic() - start < 4 + 10
    assert e.value.rank is None
    assert _alive_with(marker) == []


def test_bad_arguments_raise_before_spawning():
    lock = threading.Lock()
    with pytest.raises(TypeError, match="picklable with cloudpickle"):
        launch(lambda: lock, 2)
    with pytest.raises(TypeError, match="nprocs must be an int >= 1"):
        launch(print, 0)
    with pytest.raises(TypeError, match="timeout must be a positive number"):
        launch(print, 1, timeout=0)
    with pytest.raises(TypeError, match="backend must be None or a str"):
        launch(print, 1, backend=1)


def test_launch_error_pickles_with_its_fields():
    import pickle

    err = pickle.loads(pickle.dumps(LaunchError("rank 1 raised X: y", 1, {1: "tb"})))
    assert (str(err), err.rank, err.tracebacks) == ("rank 1 raised X: y", 1, {1: "tb"})
