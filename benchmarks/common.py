"""Side-by-side benchmark runner and memory probes shared by every benchmark.

Every benchmark compares variants *in one run*: variants alternate step by step (so drift
and contention hit all of them alike), each gets warm-up steps, then >= 10 timed steps; we
report medians, the spread (IQR / median) and ratios to the baseline (the first variant).
Contention is measured: other processes' share of the CPU during the timed steps.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import platform
import statistics
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import optree
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ----------------------------------------------------------------------------- timing


@dataclasses.dataclass
class Variant:
    """One contender: ``setup()`` returns a ``step()`` closure (state lives in the closure).

    ``memory()`` (optional) returns a dict of extra figures (e.g. peak live MiB), measured
    outside the timed steps.
    """

    name: str
    setup: Callable[[], Callable[[], Any]]
    memory: Callable[[], dict[str, float]] | None = None


@dataclasses.dataclass
class Result:
    name: str
    times: list[float]
    extra: dict[str, float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def spread(self) -> float:
        q = statistics.quantiles(self.times, n=4)
        return (q[2] - q[0]) / self.median


def cpu_busy_jiffies() -> int:
    """Jiffies every CPU spent busy since boot (for the contention of a timed run)."""
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    vals = [int(x) for x in parts]
    return sum(vals) - vals[3] - vals[4]  # minus idle and iowait


def own_jiffies() -> int:
    """Jiffies this process spent on a CPU, its waited-for children included."""
    with open(f"/proc/{os.getpid()}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])


def run_side_by_side(
    variants: list[Variant], *, warmup: int = 3, steps: int = 10, rounds: int = 1
) -> tuple[list[Result], float]:
    """Runs every variant's step alternately; returns results and the contention share.

    Contention = other processes' busy CPU time / total CPU time available during the
    timed steps (0.0 on a quiet machine).
    """
    steppers = [v.setup() for v in variants]
    for _ in range(warmup):
        for s in steppers:
            s()
    times: list[list[float]] = [[] for _ in variants]
    busy0, own0, wall0 = cpu_busy_jiffies(), own_jiffies(), time.perf_counter()
    for _ in range(rounds):
        for _ in range(steps):
            for i, s in enumerate(steppers):
                gc.collect()
                t0 = time.perf_counter()
                s()
                times[i].append(time.perf_counter() - t0)
    busy, own = cpu_busy_jiffies() - busy0, own_jiffies() - own0
    wall = time.perf_counter() - wall0
    hz = os.sysconf("SC_CLK_TCK")
    contention = max(0.0, (busy - own) / hz) / (wall * (os.cpu_count() or 1))
    results = []
    for v, ts in zip(variants, times):
        extra = v.memory() if v.memory is not None else {}
        results.append(Result(v.name, ts, extra))
    del steppers
    return results, contention


def markdown_table(results: list[Result], *, extra_keys: Iterable[str] = ()) -> str:
    """A markdown table: median ms, spread, ratio to the first variant, extra columns."""
    base = results[0].median
    keys = list(extra_keys)
    head = "| variant | median ms/step | spread (IQR/median) | × " + results[0].name + " |"
    head += "".join(f" {k} |" for k in keys)
    lines = [head, "|" + " --- |" * (4 + len(keys))]
    for r in results:
        row = f"| {r.name} | {r.median * 1e3:.1f} | {r.spread * 100:.1f}% | {r.median / base:.3f} |"
        for k in keys:
            v = r.extra.get(k)
            row += f" {v:.1f} |" if isinstance(v, float) else f" {v if v is not None else '–'} |"
        lines.append(row)
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}"
    )


# ----------------------------------------------------------------------------- memory


class PeakLiveMemory(TorchDispatchMode):
    """Peak bytes of live storages during a region (ANCHORS.md's "peak live memory").

    Counts every storage an aten op produces (and the storages of ``track`` given at entry,
    e.g. params and optimizer state) until it is really freed (weakref finalizer on the
    untyped storage). Independent of how a library keeps residuals.
    """

    def __init__(self, track: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._seen: set[int] = set()
        for t in track:
            self._add(t)

    def _add(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor):
            return
        t = getattr(t, "_local_tensor", t)  # a DTensor holds its shard's storage
        if t.device.type == "meta":
            return
        st = t.untyped_storage()
        key = id(st)
        if key in self._seen:
            return
        self._seen.add(key)
        n = st.nbytes()
        self.current += n
        self.peak = max(self.peak, self.current)
        weakref.finalize(st, self._free, key, n)

    def _free(self, key: int, n: int) -> None:
        self._seen.discard(key)
        self.current -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # An output that shares an input's storage (a view, detach, an in-place op) produces
        # nothing: otherwise storages made before the region (params) would count whenever
        # the code views them (w.t(), detach) and not when it only reads them (autocast's
        # casts) — the artefact that put fs.amp at 148.9 vs autocast's 108.2 MiB.
        inputs = {
            id(getattr(t, "_local_tensor", t).untyped_storage())
            for t in optree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and t.device.type != "meta"
        }
        stack = [out]
        while stack:
            x = stack.pop()
            if isinstance(x, torch.Tensor):
                local = getattr(x, "_local_tensor", x)
                if local.device.type == "meta" or id(local.untyped_storage()) not in inputs:
                    self._add(x)
            elif isinstance(x, (list, tuple)):
                stack.extend(x)
        return out


def peak_live_mib(
    fn: Callable[[], Any],
    track: Callable[[], Iterable[torch.Tensor]] | Iterable[torch.Tensor] = (),
) -> float:
    """Runs ``fn`` once under :class:`PeakLiveMemory`; returns the peak in MiB.

    ``track``: the tensors alive at entry (params, optimizer state), or a callable that
    returns them. The probe keeps no reference to them: a tracked tensor that ``fn`` frees
    (torch's ``.grad`` set to None by ``zero_grad``) stops counting when it is freed.
    Pass a callable, or a list nobody else holds; a list kept by the caller keeps its
    tensors alive, and counted, for the whole region.
    """
    gc.collect()
    probe = PeakLiveMemory(track() if callable(track) else track)
    del track
    with probe:
        fn()
        gc.collect()
    return probe.peak / 2**20


def rss_mib() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB, from /proc/self/status."""
    cur = peak = 0.0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    return cur, peak


def param_deviation(
    params: dict[str, torch.Tensor],
    reference: dict[str, torch.Tensor],
    init: dict[str, torch.Tensor],
) -> tuple[float, str]:
    """How far a run's params end from the reference run's, relative to how far it moved.

    ``||p - p_ref|| / ||p_ref - p_init||`` over all leaves together (float64), and the leaf
    where that ratio is worst. All three are full (unsharded) plain tensors with the same
    names. The "same work" check on the state a run leaves behind: float reordering between
    two correct runs gives ~1e-5 after a few AdamW steps on GPT tiny, while 1% more lr
    gives 1.4e-2 and weight decay left out 7e-3. (Relative to ``||p_ref||`` instead, a
    leaf that starts at zero, such as a bias, would flag plain reordering.)

    Raises:
        KeyError: the runs do not hold the same names.
    """
    if set(params) != set(reference) or set(init) != set(reference):
        diff = sorted((set(reference) ^ set(params)) | (set(reference) ^ set(init)))[:5]
        raise KeyError(f"param_deviation: the runs hold different params, e.g. {diff}")
    num = den = 0.0
    worst, name = -1.0, ""
    for k, ref in reference.items():
        r = ref.detach().double()
        d = float((params[k].detach().double() - r).norm() ** 2)
        m = float((r - init[k].detach().double()).norm() ** 2)
        num, den = num + d, den + m
        ratio = (d / m) ** 0.5 if m > 0 else (0.0 if d == 0 else float("inf"))
        if ratio > worst:
            worst, name = ratio, k
    return ((num / den) ** 0.5 if den > 0 else 0.0 if num == 0 else float("inf")), name


# ----------------------------------------------------------------------------- saved tensors


def _is_param_like(t: torch.Tensor) -> bool:
    """An autograd leaf that requires grad (a parameter), or a view of one."""
    base = t._base if t._base is not None else t
    return base.is_leaf and base.requires_grad


class SavedTensorsProbe:
    """Saved-for-backward bytes through ``saved_tensors_hooks`` (ANCHORS.md's method).

    ``total``: bytes of the storages packed while the probe was active, each counted once
    while autograd holds it, parameters excluded (over one forward: "saved activations").
    ``peak``: the most bytes autograd held at once (a storage counts while any saved tensor
    packed from it is alive: over a whole step, e.g. accumulation's microbatch loop).
    Tensors packed by an inner hook (checkpoint, offload) or cached by selective
    checkpointing are not seen: use it on regions that install no hooks of their own, or
    add the caches separately.
    """

    def __init__(self) -> None:
        self.total = 0
        self.current = 0
        self.peak = 0
        self._live: dict[int, list[int]] = {}  # storage address -> [holders, nbytes]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor) -> Any:
        if t.device.type == "meta" or _is_param_like(t):
            return t
        st = t.untyped_storage()
        key = st.data_ptr() if st.nbytes() else -id(st)
        entry = self._live.get(key)
        if entry is None or entry[0] == 0:  # a storage not held yet (an address may recur)
            entry = self._live[key] = [0, st.nbytes()]
            self.total += entry[1]
            self.current += entry[1]
            self.peak = max(self.peak, self.current)
        entry[0] += 1
        # Detached: a holder of ``t`` itself would make a reference cycle through autograd
        # for saved outputs (tensor -> grad_fn -> saved variable -> holder), which gc
        # cannot break: the graph of a forward that is never differentiated would leak.
        holder = _SavedHolder(t.detach())
        weakref.finalize(holder, self._release, entry)
        return holder

    def _release(self, entry: list[int]) -> None:
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]

    @staticmethod
    def _unpack(x: Any) -> torch.Tensor:
        return x.t if isinstance(x, _SavedHolder) else x

    def __enter__(self) -> SavedTensorsProbe:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


class _SavedHolder:
    __slots__ = ("t", "__weakref__")

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


def saved_tensors_mib(fn: Callable[[], Any]) -> tuple[float, float]:
    """Runs ``fn`` under a :class:`SavedTensorsProbe`; returns (total MiB, peak MiB)."""
    gc.collect()
    with SavedTensorsProbe() as probe:
        out = fn()
        del out
        gc.collect()
    return probe.total / 2**20, probe.peak / 2**20


# ----------------------------------------------------------------------------- quiet rounds


def run_side_by_side_quiet(
    variants: list[Variant],
    *,
    warmup: int = 3,
    steps: int = 10,
    max_rounds: int = 40,
    threshold: float = 0.10,
    min_quiet: int | None = None,
) -> tuple[list[Result], float, list[float]]:
    """:func:`run_side_by_side` for a shared machine: keeps only uncontended rounds.

    A round is one step of every variant, in turn. Contention (other processes' share of
    the CPU, as in :func:`run_side_by_side`) is measured per round; rounds run until
    ``steps`` of them had contention <= ``threshold`` or ``max_rounds`` ran. Each result's
    ``times`` are its steps in the quiet rounds, in round order (all rounds if fewer than
    ``min_quiet``, default ``steps``, were quiet), so every variant is timed under the same
    conditions and ``a.times[i] / b.times[i]`` is a paired ratio.

    Returns:
        (results, contention over all timed rounds, contention of each round).
    """
    steppers = [v.setup() for v in variants]
    for _ in range(warmup):
        for s in steppers:
            s()
    hz, ncpu = os.sysconf("SC_CLK_TCK"), os.cpu_count() or 1
    rounds: list[tuple[float, list[float]]] = []
    busy_all = own_all = wall_all = 0.0
    quiet = 0
    while quiet < steps and len(rounds) < max_rounds:
        busy0, own0, wall0 = cpu_busy_jiffies(), own_jiffies(), time.perf_counter()
        ts = []
        for s in steppers:
            gc.collect()
            t0 = time.perf_counter()
            s()
            ts.append(time.perf_counter() - t0)
        busy, own = cpu_busy_jiffies() - busy0, own_jiffies() - own0
        wall = time.perf_counter() - wall0
        c = max(0.0, (busy - own) / hz) / (wall * ncpu)
        busy_all, own_all, wall_all = busy_all + busy, own_all + own, wall_all + wall
        rounds.append((c, ts))
        quiet += c <= threshold
    keep = [ts for c, ts in rounds if c <= threshold]
    if len(keep) < (steps if min_quiet is None else min_quiet):
        keep = [ts for _, ts in rounds]
    contention = max(0.0, (busy_all - own_all) / hz) / (wall_all * ncpu)
    results = []
    for i, v in enumerate(variants):
        extra = v.memory() if v.memory is not None else {}
        results.append(Result(v.name, [ts[i] for ts in keep], extra))
    del steppers
    return results, contention, [c for c, _ in rounds]
