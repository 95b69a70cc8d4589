"""``fs.launch`` and ``fs.LaunchError``: run one function on N fresh local processes, each in
a process group (the caller's side, then the child's side: ``_child_main``).

For tests, notebooks and single-machine experiments (multi-node runs use ``torchrun``).
Each rank is a *fresh* interpreter started with ``subprocess`` (never ``fork``, and never a
re-import of the caller's ``__main__``): ``fn`` and ``args`` travel with cloudpickle, so
functions and lambdas defined in a notebook or a script work. Rank ``r`` joins a default
process group over a ``FileStore`` in a private temporary directory before ``fn`` runs.

Failures are reported by cause, not by symptom: every rank records its exception with a
timestamp, and :class:`LaunchError` names the rank that failed *first*. (A naive launcher
usually surfaces the victim's "Connection reset by peer" from a rank that was waiting in
a collective for the rank that really failed.)

The caller never joins the group: its ``torch.distributed`` state, RNG, thread settings
and environment are untouched, and no thread is started (output is relayed from the
calling thread).
"""

from __future__ import annotations

import codecs
import ctypes
import os
import pickle
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from fsharding import _compat

__all__ = ["launch", "LaunchError"]

_GRACE_S = 1.0  # after the first failure, how long the other ranks may record theirs
_POLL_S = 0.02


class LaunchError(RuntimeError):
    """A rank of :func:`launch` raised or exited, or the launch timed out.

    The message begins ``rank R raised <Type>: <message>`` for the rank whose exception
    came first in time, followed by its traceback and one line per other failed rank.

    Attributes:
        rank: the first failing rank, or None when the launch timed out.
        tracebacks: ``{rank: traceback text}`` of every failed rank, first failure first.
    """

    def __init__(
        self, message: str, rank: int | None = None, tracebacks: dict[int, str] | None = None
    ) -> None:
        super().__init__(message)
        self.rank = rank
        self.tracebacks = dict(tracebacks or {})

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.args[0], self.rank, self.tracebacks))


def launch(
    fn: Callable[..., Any],
    nprocs: int,
    *args: Any,
    timeout: float = 300.0,
    backend: str | None = None,
) -> list[Any]:
    """Runs ``fn(*args)`` on ``nprocs`` fresh processes and returns each rank's result.

    Each child gets a default process group (``backend=None``: NCCL with ``cuda:rank``
    when the machine has at least ``nprocs`` GPUs, else gloo), rendezvous through a
    ``FileStore`` in a private temporary directory, ``init_process_group(timeout=timeout)``,
    the torchrun variables ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``LOCAL_WORLD_SIZE``, and
    ``OMP_NUM_THREADS=max(1, cpu_count // nprocs)`` unless the caller's environment sets it.
    Children's stdout and stderr are relayed to the caller's ``sys.stdout``/``sys.stderr``
    (so prints show in a notebook cell). Return CPU tensors or plain values: results are
    cloudpickled back to the caller, which has no process group and maybe no GPU.
    Work ``fn`` leaves running (an ``fs.save(..., async_=True)`` not yet committed) is
    finished after ``fn`` returns, before the rank's process group is destroyed.

    Args:
        fn: the function every rank runs; any callable cloudpickle can serialise.
        nprocs: number of processes (ranks), at least 1.
        *args: positional arguments for ``fn``, the same on every rank.
        timeout: seconds for the whole launch (startup included) and the process group's
            collective timeout. On expiry every child is killed.
        backend: ``"gloo"``, ``"nccl"`` or any backend string of ``init_process_group``;
            None picks as above.

    Returns:
        ``[result of rank 0, result of rank 1, ...]``.

    Raises:
        LaunchError: a rank raised or exited before returning, or ``timeout`` passed. Every
            child is killed first; raised within ``timeout + 10`` seconds.
        TypeError: ``fn`` or ``args`` cannot be pickled, or a bad ``nprocs``/``timeout``.

    Example:
        >>> import fsharding as fs
        >>> def work(scale):
        ...     import torch, torch.distributed as dist
        ...     t = torch.tensor([float(dist.get_rank())])
        ...     dist.all_reduce(t)
        ...     return scale * t.item()
        >>> fs.launch(work, 2, 10.0, timeout=60)
        [10.0, 10.0]
    """
    if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
        raise TypeError(f"fs.launch: nprocs must be an int >= 1, got {nprocs!r}.")
    if not isinstance(timeout, (int, float)) or not timeout > 0:
        raise TypeError(
            f"fs.launch: timeout must be a positive number of seconds, got {timeout!r}."
        )
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"fs.launch: backend must be None or a str like 'gloo', got {backend!r}.")
    import cloudpickle  # (imported on first use, not by `import fsharding`)

    workdir = tempfile.mkdtemp(prefix="fsharding-launch-")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        try:
            blob = cloudpickle.dumps((fn, args))
        except Exception as e:
            raise TypeError(
                f"fs.launch: fn and args must be picklable with cloudpickle; pickling failed "
                f"with {type(e).__name__}: {e}. Pass plain data (tensors, numbers, pytrees) "
                f"and create process-bound objects (groups, files, CUDA state) inside fn."
            ) from None
        with open(os.path.join(workdir, "payload.pkl"), "wb") as f:
            pickle.dump(list(sys.path), f)
            f.write(blob)
        os.mkdir(os.path.join(workdir, "errors"))
        os.mkdir(os.path.join(workdir, "results"))
        pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        boot = (
            f"import sys; sys.path.insert(0, {pkg_root!r}); "
            f"from fsharding.parallel.launch import _child_main; _child_main()"
        )
        for rank in range(nprocs):
            cmd = [sys.executable, "-c", boot, workdir, str(rank), str(nprocs)]
            cmd += [backend or "", repr(float(timeout)), str(os.getpid())]
            procs.append(
                subprocess.Popen(
                    cmd,
                    env=_child_env(rank, nprocs),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    start_new_session=True,  # its own process group: we kill grandchildren too
                )
            )
        return _supervise(procs, workdir, float(timeout))
    finally:
        _kill(procs)
        for p in procs:
            for stream in (p.stdout, p.stderr):
                if stream is not None:
                    stream.close()
        shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------------------
# the caller's side
# --------------------------------------------------------------------------------------


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _child_env(rank: int, nprocs: int) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, _cpu_count() // nprocs)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    for key, value in (("RANK", rank), ("LOCAL_RANK", rank)):
        env[key] = str(value)
    for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        env[key] = str(nprocs)
    return env


def _kill(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                p.kill()
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


class _Relay:
    """Copies children's stdout/stderr to the caller's, from the calling thread."""

    def __init__(self, procs: list[subprocess.Popen[bytes]]) -> None:
        self.sel = selectors.DefaultSelector()
        for p in procs:
            for stream, target in ((p.stdout, "stdout"), (p.stderr, "stderr")):
                dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
                self.sel.register(stream, selectors.EVENT_READ, (target, dec))

    def pump(self, wait: float) -> None:
        if not self.sel.get_map():
            time.sleep(wait)
            return
        for key, _ in self.sel.select(timeout=wait):
            data = os.read(key.fd, 1 << 16)
            target, dec = key.data
            if not data:
                self.sel.unregister(key.fileobj)
            text = dec.decode(data, final=not data)
            out = getattr(sys, target)
            if text and out is not None:
                try:
                    out.write(text)
                    out.flush()
                except Exception:  # a closed or exotic stream must not break the launch
                    pass

    def drain(self, limit: float) -> None:
        end = time.monotonic() + limit
        while self.sel.get_map() and time.monotonic() < end:
            self.pump(0.05)
        self.sel.close()


def _supervise(procs: list[subprocess.Popen[bytes]], workdir: str, timeout: float) -> list[Any]:
    nprocs = len(procs)
    err_dir, res_dir = os.path.join(workdir, "errors"), os.path.join(workdir, "results")
    relay = _Relay(procs)
    deadline = time.monotonic() + timeout
    last_alive = [time.monotonic()] * nprocs  # a lower bound of each exit time
    exits: dict[int, tuple[float, int]] = {}
    failed_at = None
    timed_out = False
    while True:
        relay.pump(_POLL_S)
        now = time.monotonic()
        for r, p in enumerate(procs):
            code = p.poll()
            if code is None:
                last_alive[r] = now
            elif r not in exits:
                exits[r] = (last_alive[r], code)
        bad_exit = any(
            code != 0 or not os.path.exists(os.path.join(res_dir, str(r)))
            for r, (_, code) in exits.items()
        )
        if failed_at is None and (bad_exit or os.listdir(err_dir)):
            failed_at = now
        if failed_at is not None and (len(exits) == nprocs or now - failed_at > _GRACE_S):
            break
        if failed_at is None and len(exits) == nprocs:
            break
        if now > deadline:
            timed_out = True
            break
    _kill(procs)
    relay.drain(2.0)
    failures = _read_failures(err_dir, res_dir, exits)
    if failures:
        raise _launch_error(failures)
    if timed_out:
        running = [r for r in range(nprocs) if r not in exits]
        raise LaunchError(
            f"fs.launch timed out after {timeout:g} s with ranks {running} still running "
            f"(a collective waiting for a peer that never joined, or fn slower than the "
            f"timeout); every child was killed. Pass a larger timeout= if fn is just slow.",
            rank=None,
        )
    results = []
    for r in range(nprocs):
        with open(os.path.join(res_dir, str(r)), "rb") as f:
            results.append(pickle.load(f))
    return results


def _read_failures(
    err_dir: str, res_dir: str, exits: dict[int, tuple[float, int]]
) -> list[dict[str, Any]]:
    records: dict[int, dict[str, Any]] = {}
    for name in os.listdir(err_dir):
        if name.isdigit():
            with open(os.path.join(err_dir, name), "rb") as f:
                records[int(name)] = pickle.load(f)
    for r, (t, code) in exits.items():
        if r in records or (code == 0 and os.path.exists(os.path.join(res_dir, str(r)))):
            continue
        how = f"code {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
        summary = f"rank {r} exited with {how} before fn returned (no exception recorded)"
        records[r] = {"rank": r, "time": t, "summary": summary, "traceback": summary}
    # A silent exit is only seen when the parent polls, so under load a victim's "peer
    # closed the connection" may carry an earlier time: such errors rank after other causes.
    return sorted(records.values(), key=lambda rec: (_is_lost_peer(rec), rec["time"], rec["rank"]))


_LOST_PEER = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "remote worker crashing",
    "socket closed",
)


def _is_lost_peer(rec: dict[str, Any]) -> bool:
    """True for an error that a lost peer causes (a victim, not a cause)."""
    text = rec["summary"].lower()
    return any(p in text for p in _LOST_PEER)


def _launch_error(failures: list[dict[str, Any]]) -> LaunchError:
    first = failures[0]
    lines = [first["summary"], ""]
    if first["traceback"] != first["summary"]:  # an exit without exception has no traceback
        lines += [f"Traceback of rank {first['rank']}:", first["traceback"]]
    if len(failures) > 1:
        lines.append("Then, on other ranks (often caused by the first failure):")
        lines += [f"  {rec['summary'].splitlines()[0]}" for rec in failures[1:]]
    tracebacks = {rec["rank"]: rec["traceback"] for rec in failures}
    return LaunchError("\n".join(lines).rstrip(), rank=first["rank"], tracebacks=tracebacks)


# --------------------------------------------------------------------------------------
# the child's side
# --------------------------------------------------------------------------------------


def _atomic_write(path: str, data: bytes) -> None:
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def _init_group(workdir: str, rank: int, nprocs: int, backend: str, timeout: float) -> Any:
    if not backend:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        backend = "nccl" if gpus >= nprocs else "gloo"
    kwargs: dict[str, Any] = {}
    if "nccl" in backend:
        torch.cuda.set_device(rank)
        kwargs["device_id"] = torch.device("cuda", rank)
    store = dist.FileStore(os.path.join(workdir, "store"), nprocs)
    dist.init_process_group(
        backend,
        store=store,
        rank=rank,
        world_size=nprocs,
        timeout=timedelta(seconds=timeout),
        **kwargs,
    )
    return store


def _die_with_parent(parent: int) -> None:
    """Linux: SIGKILL this rank when the caller dies (e.g. a restarted notebook kernel)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass
    if os.getppid() != parent:  # the caller died before prctl
        os._exit(1)


def _child_main() -> None:
    workdir, rank, nprocs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    backend, timeout = sys.argv[4], float(sys.argv[5])
    _die_with_parent(int(sys.argv[6]))
    code = 0
    try:
        with open(os.path.join(workdir, "payload.pkl"), "rb") as f:
            caller_path = pickle.load(f)
            sys.path[:] = caller_path + [p for p in sys.path if p not in caller_path]
            fn, args = pickle.load(f)  # cloudpickle output loads with plain pickle
        store = _init_group(workdir, rank, nprocs, backend, timeout)
        result = fn(*args)
        # work fn left running (an async fs.save) finishes while the group is alive
        _compat.drain()
        import cloudpickle

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        _atomic_write(os.path.join(workdir, "results", str(rank)), cloudpickle.dumps(result))
        # A store barrier (not a collective: it cannot collide with fn's own traffic) so no
        # rank closes its sockets while a peer may still be reading from them.
        store.set(f"fsharding/done/{rank}", b"1")
        store.wait([f"fsharding/done/{r}" for r in range(nprocs)])
        dist.destroy_process_group()
    except BaseException as e:  # noqa: B036 - SystemExit/KeyboardInterrupt are failures too
        when = time.monotonic()
        code = 1
        summary = f"rank {rank} raised {type(e).__name__}: {e}"
        record = {
            "rank": rank,
            "time": when,
            "summary": summary,
            "traceback": "".join(traceback.format_exception(type(e), e, e.__traceback__)),
        }
        try:
            _atomic_write(os.path.join(workdir, "errors", str(rank)), pickle.dumps(record))
        except Exception:
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)  # skip interpreter teardown: a peer's dead sockets must not hang exit
