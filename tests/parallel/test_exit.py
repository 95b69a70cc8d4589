"""Exit under torchrun / gloo: no SIGABRT ("terminate called without an active exception").

gloo runs each collective on a worker thread that drops the finished work, with its
references to the collective's tensors, a little after the caller's wait returns; on torch
>= 2.9 dropping the last C++ reference to a tensor Python has seen takes the GIL, which
ends the worker thread inside a noexcept destructor (std::terminate) once the interpreter
is finalizing. fsharding's collectives therefore return only after the work has let go:
checked here directly (deterministic), and by repeated torchrun runs in test_torchrun.py.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run

ROUNDS = 40


def _counts_worker() -> dict[str, list[tuple[int, int, int]]]:
    import torch.distributed as dist

    from fsharding.parallel import collectives as C

    group = dist.group.WORLD
    ops = {
        "all_reduce": lambda x: C._raw_all_reduce(x, "sum", group),
        "all_gather": lambda x: C._raw_all_gather(x, 0, group),
        "reduce_scatter": lambda x: C._raw_reduce_scatter(x, 0, group),
        "all_to_all": lambda x: C._Permute.apply(x, ((0, 1), (1, 0)), dist.get_rank(), 2, group),
    }
    seen = {}
    for name, op in ops.items():
        seen[name] = []
        for i in range(ROUNDS):
            x = torch.full((4,), float(i))
            before = x._use_count()
            out = op(x)
            # no work object may still hold the result or the input when the call returns
            seen[name].append((out._use_count(), x._use_count(), before))
    return seen


@pytest.mark.timeout(150)
def test_gloo_collectives_return_after_the_worker_dropped_the_work():
    for rank, seen in enumerate(run(_counts_worker, 2)):
        for name, rounds in seen.items():
            late = [i for i, (out, x, before) in enumerate(rounds) if out != 1 or x != before]
            assert not late, (rank, name, [rounds[i] for i in late])


def test_settle_waits_for_a_reference_held_elsewhere():
    import threading
    import time

    from fsharding.parallel.collectives import settle, use_counts

    t = torch.ones(3)
    before = use_counts([t])
    held = [t.view(3)]  # a C++ reference (the view's base), dropped by another thread

    def drop():
        time.sleep(0.05)
        held.clear()

    th = threading.Thread(target=drop)
    th.start()
    t0 = time.monotonic()
    settle(before)
    waited = time.monotonic() - t0
    th.join()
    assert t._use_count() == before[0][1] and 0.03 < waited < 1.0


def test_settle_lives_in_compat_and_is_importable_from_collectives():
    # optim/ (below parallel/) needs it too: one function, reachable from both layers
    from fsharding import _compat
    from fsharding.parallel import collectives

    assert collectives.settle is _compat.settle and collectives.use_counts is _compat.use_counts
