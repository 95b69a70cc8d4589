"""Rank-side harness of ``bench_zero.py``, shared by the torch/fsharding and DeepSpeed launches.

Everything here runs inside one rank of a 2-process gloo group (``fs.launch`` or
``torchrun``), one thread per rank. It holds the workload (ANCHORS.md's GPT "small", AdamW
lr 3e-3, betas (0.9, 0.95), wd 0.1, fp32; ``FS_BENCH_PRESET=tiny`` in the environment for
smoke tests), the torch DDP variant every launch re-runs as its baseline (torch AdamW
``fused=True``: the kernel fsharding's adamw runs), the alternating timing loop with
per-phase timers, the contention probe, the params check and the memory probes (peak RSS
with Python's cyclic GC on or off, peak live tensors). It imports neither fsharding's
transforms nor DeepSpeed, so both launches can use it.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fsharding.models.gpt import GPT, GPTConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import PeakLiveMemory, cpu_busy_jiffies, own_jiffies, param_deviation  # noqa: E402

LR, BETAS, EPS, WD = 3e-3, (0.9, 0.95), 1e-8, 0.1
MIB = 2**20


def set_threads() -> None:
    """One thread per rank; silences torch's deprecation notices (fsharding's own code
    still calls ``all_gather_into_tensor`` / ``reduce_scatter_tensor``)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)


def preset() -> str:
    """The GPT preset of every launch: ``FS_BENCH_PRESET`` (inherited by the ranks), else
    ``"small"`` (the ANCHORS workload)."""
    return os.environ.get("FS_BENCH_PRESET", "small")


def model() -> GPT:
    return GPT(GPTConfig.preset(preset()), seed=0)


def rank_batch(data: dict, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``i``'s rank-local batch: this rank's rows of the global batch of 8."""
    r, n = dist.get_rank(), dist.get_world_size()
    x, y = data["x"][i], data["y"][i]
    per = x.shape[0] // n
    return x[r * per : (r + 1) * per], y[r * per : (r + 1) * per]


def lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def torch_adamw(params: Iterable[torch.Tensor], fused: bool = True) -> torch.optim.AdamW:
    """torch AdamW, ``fused=True`` (the ``torch._fused_adam_`` kernel fsharding's adamw
    runs: every headline baseline) or ``foreach=True`` (ANCHORS' older baseline, extra
    rows)."""
    kw = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, **kw)


class Phases:
    """Per-step wall time of named phases (ms), for the breakdown columns.

    Regions nest (a collective inside ``grad_fn``'s backward): each phase gets its
    *exclusive* time, so the phases of a step add up to at most the step.
    """

    def __init__(self) -> None:
        self.cur: dict[str, float] = {}
        self.steps: list[dict[str, float]] = []
        self._stack: list[float] = []  # time spent in nested regions, per open region

    def add(self, name: str, seconds: float) -> None:
        self.cur[name] = self.cur.get(name, 0.0) + seconds * 1e3

    def region(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self._stack.append(0.0)
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            dt = time.perf_counter() - t0
            self.add(name, dt - self._stack.pop())
            if self._stack:
                self._stack[-1] += dt

    def timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)  # keeps attributes such as optim's learning_rate / parts
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            return self.region(name, fn, *args, **kwargs)

        return wrapped

    def end_step(self) -> None:
        self.steps.append(self.cur)
        self.cur = {}


@dataclasses.dataclass
class Stepper:
    """One variant in a rank: ``step(i) -> (loss, grad_norm)`` with its own state.

    ``state_mib()`` is the model state per rank (params + grads + optimizer state, local
    shards, each storage once); ``phases`` the per-step phase times.
    """

    step: Callable[[int], tuple[float, float]]
    state_mib: Callable[[], float]
    phases: Phases
    #: full (unsharded) params by name, identical on every rank (a collective for sharded
    #: variants: every rank calls it); None: not checked (DeepSpeed)
    params: Callable[[], dict[str, torch.Tensor]] | None = None
    #: the tensors the variant holds between steps (params, optimizer state; torch's .grad
    #: are set to None first, as the next step's zero_grad would): peak live's baseline
    live: Callable[[], list[torch.Tensor]] | None = None


def storage_mib(tensors: Iterable[Any]) -> float:
    """MiB of the distinct storages behind ``tensors`` (DTensors count their local shard)."""
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        t = getattr(t, "_local_tensor", t)
        st = t.untyped_storage()
        key = (st.data_ptr(), st.nbytes())
        if key not in seen and st.nbytes():
            seen.add(key)
            total += st.nbytes()
    return total / MIB


def torch_stepper(
    module: torch.nn.Module, wrapped: torch.nn.Module, data: dict, fused: bool = True
) -> Stepper:
    """A ``torch.nn.Module`` training loop (DDP or FSDP2 wrapper around ``module``)."""
    params = list(module.parameters())
    opt = torch_adamw(params, fused=fused)
    ph = Phases()

    def step(i: int) -> tuple[float, float]:
        x, y = rank_batch(data, i)
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = lm_loss(wrapped(x), y)
        loss.backward()
        t1 = time.perf_counter()
        gn = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        if hasattr(gn, "full_tensor"):
            gn = gn.full_tensor()
        opt.step()
        ph.add("fwd+bwd", t1 - t0)
        ph.add("opt", time.perf_counter() - t1)
        return float(loss.detach()), float(gn)

    def state() -> float:
        ts = [*params, *(p.grad for p in params)]
        ts += [v for s in opt.state.values() for v in s.values() if v.dim() > 0]
        return storage_mib(ts)

    def full_params() -> dict[str, torch.Tensor]:
        out = {}
        for k, p in module.named_parameters():
            p = p.detach()
            out[k] = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2: DTensor
        return out

    def live() -> list[torch.Tensor]:
        opt.zero_grad(set_to_none=True)
        return [*params, *(v for s in opt.state.values() for v in s.values())]

    return Stepper(step, state, ph, full_params, live)


def ddp(data: dict, fused: bool = True) -> Stepper:
    """torch DDP + torch.optim.AdamW(fused=True): the baseline of every launch
    (``fused=False``: AdamW(foreach=True), an extra row)."""
    from torch.nn.parallel import DistributedDataParallel

    m = model()
    return torch_stepper(m, DistributedDataParallel(m), data, fused=fused)


# ----------------------------------------------------------------------------- timing


def run_alternating(
    steppers: list[Stepper], *, warmup: int, steps: int
) -> tuple[list[list[float]], list[list[tuple[float, float]]], float]:
    """Steps every variant alternately, all ranks in lock step (a barrier before each step).

    Returns (per-variant step seconds — max over ranks, per-variant (loss, grad_norm)
    trajectories over warm-up and timed steps — rank means, contention). Contention is the
    other processes' share of all CPUs during the timed steps: machine busy time minus
    every rank's own CPU time (so the peer rank does not count as contention).
    """
    traj: list[list[tuple[float, float]]] = [[] for _ in steppers]
    for i in range(warmup):
        for k, s in enumerate(steppers):
            dist.barrier()
            traj[k].append(s.step(i))
    for s in steppers:  # phases of timed steps only
        s.phases.steps.clear()
        s.phases.cur = {}
    times: list[list[float]] = [[] for _ in steppers]
    dist.barrier()
    busy0, own0, wall0 = cpu_busy_jiffies(), own_jiffies(), time.perf_counter()
    for i in range(warmup, warmup + steps):
        for k, s in enumerate(steppers):
            gc.collect()
            dist.barrier()
            t0 = time.perf_counter()
            traj[k].append(s.step(i))
            times[k].append(time.perf_counter() - t0)
            s.phases.end_step()
    dist.barrier()
    busy, own = cpu_busy_jiffies() - busy0, own_jiffies() - own0
    wall = time.perf_counter() - wall0
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (busy, own, wall, times, traj))
    busy0_, _, wall_, _, _ = everyone[0]
    own_all = sum(e[1] for e in everyone)
    hz = os.sysconf("SC_CLK_TCK")
    contention = max(0.0, (busy0_ - own_all) / hz) / (wall_ * (os.cpu_count() or 1))
    times = [
        [max(e[3][k][j] for e in everyone) for j in range(steps)] for k in range(len(steppers))
    ]
    n = len(everyone)
    traj = [
        [
            (sum(e[4][k][j][0] for e in everyone) / n, sum(e[4][k][j][1] for e in everyone) / n)
            for j in range(warmup + steps)
        ]
        for k in range(len(steppers))
    ]
    return times, traj, contention


def phase_medians(ph: Phases) -> dict[str, float]:
    names = sorted({k for s in ph.steps for k in s})
    return {k: statistics.median(s.get(k, 0.0) for s in ph.steps) for k in names}


# ----------------------------------------------------------------------------- memory


def proc_status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status (Linux only)")


def memory_run(
    build: Callable[[], Stepper], steps: int, *, gc_off: bool = False, live: bool = False
) -> dict[str, float]:
    """One variant alone in fresh processes: RSS before building it, peak RSS (VmHWM)
    after ``steps`` steps, per rank (keys ``<name>_r<rank>``).

    ``gc_off``: Python's cyclic collector disabled for the build and the steps
    (``gc.disable()``, as torchtitan's training loop does; it collects generation 1 every
    50 steps, so for ``steps`` < 50 this is its loop): memory reachable only from
    reference cycles stays until the end. ``live``: after the RSS reading, one more step
    under ``common.PeakLiveMemory`` (GC on; at entry the tensors ``Stepper.live`` returns):
    ``peak_live`` MiB. The probe sees what aten ops allocate during the step: buffers made
    before it (DDP's gradient buckets, allocated when DDP wraps the model) are not counted.
    """
    gc.collect()
    base = proc_status_mib("VmRSS")
    was = gc.isenabled()
    if gc_off:
        gc.disable()
    try:
        s = build()
        for i in range(steps):
            dist.barrier()
            s.step(i)
        gc_was_off = not gc.isenabled()
        peak = proc_status_mib("VmHWM")
    finally:
        if was:
            gc.enable()
    out = {"base_rss": base, "peak_rss": peak, "state": s.state_mib()}
    out["gc_was_off"] = float(gc_was_off)
    if live and s.live is not None:
        dist.barrier()
        out["peak_live"] = peak_live_step(s, steps)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, out)
    return {f"{k}_r{r}": v for r, e in enumerate(everyone) for k, v in e.items()}


def peak_live_step(s: Stepper, i: int) -> float:
    """Peak live MiB of step ``i`` of ``s`` (``common.PeakLiveMemory``, ``s.live()`` at
    entry, nothing else held by the probe)."""
    gc.collect()
    probe = PeakLiveMemory(s.live())
    with probe:
        s.step(i)
        gc.collect()
    return probe.peak / MIB


def param_check(steppers: list[Stepper], ref_path: str | None) -> list[tuple[float, str] | None]:
    """Per stepper: ``common.param_deviation`` of its full params after the run from the
    one-process eager reference's (``ref_path``: a ``torch.save`` of ``{"params": ...,
    "init": ...}``); None where the stepper cannot give full params. Every rank calls it
    (gathering sharded params is a collective)."""
    if ref_path is None:
        return [None for _ in steppers]
    ref = torch.load(ref_path)
    out: list[tuple[float, str] | None] = []
    for s in steppers:
        if s.params is None:
            out.append(None)
            continue
        full = {k: v.detach() for k, v in s.params().items()}
        out.append(param_deviation(full, ref["params"], ref["init"]))
        del full
    return out
