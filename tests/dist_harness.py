"""Persistent multi-process gloo harness for the distributed tests.

One ``DistPool`` = ``world_size`` worker processes, forked ONCE, each holding an initialised
gloo process group. Test cases are plain module-level functions that run on every rank:

    def case_allreduce(scale):                 # runs in every worker, PG already initialised
        t = torch.ones(3) * (dist.get_rank() + 1)
        dist.all_reduce(t)
        return t * scale                        # returned to the parent, one value per rank

    def test_allreduce(dist_pool):              # dist_pool: module-scoped, params (2, 4)
        results = dist_pool.run(case_allreduce, 2.0)   # list indexed by rank
        ...

Why fork: the parent (pytest) has already imported torch / torch._dynamo / the package
(~3-4 s here), a forked child inherits them and only pays for init_process_group (ms).
``spawn`` re-imports everything in every child (world_size x ~3.5 s on 2 cores).

Contract / behaviour
- ``get_pool(world_size)``: a started pool, cached for the session (closed at exit).
- Cases must be picklable by reference: module-level functions (no lambdas/closures), args and
  results picklable with plain ``pickle`` (tensors are fine). A DTensor result is refused
  with a clear error (it would unpickle in the parent with a mesh but no process group):
  return ``.full_tensor()`` (a collective: on every rank) or ``.to_local()``.
- Every rank runs the case with ``torch.manual_seed(seed)`` first (default 0): identical models.
- A case that raises on any rank -> ``WorkerError`` in the parent, whose message holds the
  remote traceback of every failed rank. Ranks that do not answer within ``grace_s`` after the
  first failure (typically stuck in a collective the failed rank never joined) are reported
  as hung. After ANY failure all workers are killed and the next ``run`` re-forks them
  (~0.05 s), so a failed case cannot poison the next one.
- A case that exceeds ``timeout_s`` on any rank -> ``WorkerTimeout``; a dead worker (crash,
  os._exit, OOM kill) -> ``WorkerError`` naming the rank and exit code.
- Collectives in workers also time out after ``collective_timeout_s`` (gloo honours
  ``init_process_group(timeout=...)``) so a stuck worker eventually frees itself too.
- Rendezvous via a FileStore in a fresh temp file: no port to pick, no TCP race.
- Workers: ``torch.set_num_threads(1)`` (2 shared cores; also sidesteps the OpenMP-after-fork
  hazard when the parent has already run parallel ops), ``os._exit`` at the end so pytest's
  atexit hooks / capture plugins are not run in the children.
"""

from __future__ import annotations

import atexit
import datetime
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import signal
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

# Import heavy modules in the parent so that forked workers inherit them (spawn ignores this).
import torch
import torch._dynamo  # noqa: F401
import torch.distributed as dist
import torch.distributed.tensor  # noqa: F401  (DTensor, device mesh)

import cm_triton  # noqa: F401,E402  (the package under test: inherited by the workers)

__all__ = [
    "DistPool",
    "WorkerError",
    "WorkerTimeout",
    "CollectiveCounter",
    "MATMUL_OPS",
    "step_flops",
    "get_pool",
    "close_all_pools",
]


class WorkerError(AssertionError):
    """A case raised on at least one rank; ``str()`` holds the remote traceback(s)."""


class WorkerTimeout(WorkerError):
    """A case (or worker startup) did not finish within its timeout."""


# ------------------------------------------------------------------------------- worker side
def _worker_main(
    rank: int, world: int, store_path: str, conn, collective_timeout_s: float, env: dict[str, str]
) -> None:
    os.environ.update(env)
    # Let the parent interrupt us (pytest's KeyboardInterrupt must not be raised in workers).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store_path}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=collective_timeout_s),
        )
        conn.send_bytes(pickle.dumps(("ready", os.getpid())))
    except BaseException as e:  # noqa: BLE001
        conn.send_bytes(pickle.dumps(("err", _format(e))))
        os._exit(1)
    while True:
        try:
            msg = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):  # parent went away
            break
        if msg is None:
            break
        fn, args, kwargs, seed = msg
        try:
            if seed is not None:
                torch.manual_seed(seed)
            out = ("ok", fn(*args, **kwargs))
            if _has_dtensor(out[1]):
                out = (
                    "err",
                    f"rank {rank}: {getattr(fn, '__qualname__', fn)} returned a DTensor;"
                    " return .full_tensor() (collective: on every rank) or .to_local()",
                )
        except BaseException as e:  # noqa: BLE001 - report everything, incl. SystemExit
            out = ("err", _format(e))
        try:
            payload = pickle.dumps(out)
        except Exception as e:  # noqa: BLE001
            payload = pickle.dumps(("err", f"rank {rank}: result is not picklable: {e!r}"))
        try:
            conn.send_bytes(payload)
        except (BrokenPipeError, OSError):
            break
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    finally:
        os._exit(0)


def _has_dtensor(obj: Any) -> bool:
    from torch.distributed.tensor import DTensor
    from torch.utils._pytree import tree_leaves

    return any(isinstance(x, DTensor) for x in tree_leaves(obj))


def _format(e: BaseException) -> str:
    return "".join(traceback.format_exception(type(e), e, e.__traceback__))


# ------------------------------------------------------------------------------- parent side
class DistPool:
    """``world_size`` persistent gloo workers; ``run(fn, *a, **kw)`` -> per-rank results."""

    def __init__(
        self,
        world_size: int,
        *,
        start_method: str = "fork",
        timeout_s: float = 120.0,
        collective_timeout_s: float = 60.0,
        grace_s: float = 1.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.world_size = world_size
        self.start_method = start_method
        self.timeout_s = timeout_s
        self.collective_timeout_s = collective_timeout_s
        self.grace_s = grace_s
        self.env = {"OMP_NUM_THREADS": "1", **(env or {})}
        self._procs: list = []
        self._conns: list = []
        self._store_path: str | None = None
        self.startup_s: float | None = None  # wall time of the last start()
        self.starts = 0

    # -- lifecycle -----------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def start(self) -> DistPool:
        t0 = time.perf_counter()
        ctx = mp.get_context(self.start_method)
        fd, self._store_path = tempfile.mkstemp(prefix="gloo_store_")
        os.close(fd)
        os.unlink(self._store_path)  # FileStore wants to create it; a stale file breaks rendezvous
        for rank in range(self.world_size):
            parent_end, child_end = ctx.Pipe(duplex=True)
            p = ctx.Process(
                target=_worker_main,
                name=f"dist-worker-{rank}",
                daemon=True,
                args=(
                    rank,
                    self.world_size,
                    self._store_path,
                    child_end,
                    self.collective_timeout_s,
                    self.env,
                ),
            )
            p.start()
            child_end.close()
            self._procs.append(p)
            self._conns.append(parent_end)
        replies = self._collect(self.timeout_s, what="startup (init_process_group)")
        errs = {r: v for r, (k, v) in replies.items() if k != "ready"}
        if errs or len(replies) < self.world_size:
            self._kill()
            raise WorkerError(self._describe("startup failed", replies))
        self.startup_s = time.perf_counter() - t0
        self.starts += 1
        return self

    def close(self) -> None:
        for c in self._conns:
            try:
                c.send_bytes(pickle.dumps(None))
            except OSError:
                pass
        deadline = time.monotonic() + 10
        for p in self._procs:
            p.join(max(0.0, deadline - time.monotonic()))
        self._kill()

    def _kill(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.kill()
        for p in self._procs:
            p.join(5)
        for c in self._conns:
            c.close()
        self._procs, self._conns = [], []
        if self._store_path and os.path.exists(self._store_path):
            os.unlink(self._store_path)

    def __enter__(self) -> DistPool:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- running cases -------------------------------------------------------------------
    def run(
        self,
        fn: Callable,
        *args: Any,
        timeout_s: float | None = None,
        seed: int | None = 0,
        **kwargs: Any,
    ) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; return the results, indexed by rank."""
        if not self.alive:
            self._kill()
            self.start()
        msg = pickle.dumps((fn, args, kwargs, seed))
        for c in self._conns:
            c.send_bytes(msg)
        replies = self._collect(timeout_s or self.timeout_s, what=getattr(fn, "__name__", fn))
        if len(replies) == self.world_size and all(k == "ok" for k, _ in replies.values()):
            return [replies[r][1] for r in range(self.world_size)]
        __tracebackhide__ = True  # pytest: show the remote traceback, not this frame
        complete = len(replies) == self.world_size
        # After any failure the process groups cannot be trusted (a rank may be stuck in, or
        # half-way out of, a collective): kill; the next run() re-forks (~0.05 s).
        self._kill()
        errs = [k for k, _ in replies.values() if k == "err"]
        cls = WorkerError if errs else WorkerTimeout
        raise cls(
            self._describe(
                f"case {getattr(fn, '__qualname__', fn)!r} failed"
                + ("" if complete else " (hung ranks killed)"),
                replies,
            )
        )

    def _collect(self, timeout_s: float, what: Any) -> dict[int, tuple[str, Any]]:
        """Read one reply per rank. After the first error, the others get ``grace_s``."""
        replies: dict[int, tuple[str, Any]] = {}
        deadline = time.monotonic() + timeout_s
        pending = set(range(len(self._conns)))
        while pending:
            now = time.monotonic()
            if now >= deadline:
                break
            for r in sorted(pending):
                c, p = self._conns[r], self._procs[r]
                if c.poll(0):
                    try:
                        replies[r] = pickle.loads(c.recv_bytes())
                    except (EOFError, OSError):
                        replies[r] = ("dead", f"rank {r} closed its pipe (exit code {p.exitcode})")
                    pending.discard(r)
                    if replies[r][0] != "ok" and replies[r][0] != "ready":
                        deadline = min(deadline, time.monotonic() + self.grace_s)
                elif not p.is_alive():
                    replies[r] = ("dead", f"rank {r} died (exit code {p.exitcode}) during {what}")
                    pending.discard(r)
                    deadline = min(deadline, time.monotonic() + self.grace_s)
            if pending:
                mp.connection.wait(
                    [self._conns[r] for r in pending] + [self._procs[r].sentinel for r in pending],
                    timeout=min(0.5, max(0.0, deadline - time.monotonic())),
                )
        return replies

    def _describe(self, head: str, replies: dict[int, tuple[str, Any]]) -> str:
        parts = [f"{head} [world_size={self.world_size}]"]
        for r in range(self.world_size):
            kind, val = replies.get(r, ("timeout", "no reply (hung, probably in a collective)"))
            if kind in ("ok", "ready"):
                continue
            parts.append(f"\n----- rank {r}: {kind} -----\n{val}")
        return "".join(parts)


# ------------------------------------------------------------------------ collective counting
from torch.distributed.tensor import DTensor  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402


class CollectiveCounter(TorchDispatchMode):
    """Counts collective ops seen at the dispatcher: the c10d ops behind torch.distributed.*
    (c10d::allreduce_, c10d::_allgather_base_, ...) AND the functional collectives that DTensor
    redistribution uses (_c10d_functional::all_gather_into_tensor, ...). Install it only around
    opt.step() to count only the optimizer's collectives (FSDP2's are issued in fwd/bwd)."""

    NAMESPACES = ("c10d", "_c10d_functional", "c10d_functional", "_c10d_functional_autograd")
    NOT_COMM = ("wait_tensor", "_wrap_tensor_autograd", "monitored_barrier_")

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.culprits: list[tuple[str, str]] = []  # (collective, DTensor op that caused it)
        self._dtensor_op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            # Modes run BEFORE subclasses; returning NotImplemented lets DTensor desugar the op
            # into local ops + collectives, which then come back through this mode (the trick
            # CommDebugMode uses). Without it, redistributions inside DTensor ops are invisible.
            self._dtensor_op = str(func)
            return NotImplemented
        if (
            isinstance(func, torch._ops.OpOverload)
            and func.namespace in self.NAMESPACES
            and func._opname not in self.NOT_COMM
        ):
            name = f"{func.namespace}::{func._opname}"
            self.ops.append(name)
            self.culprits.append((name, self._dtensor_op))
        return func(*args, **(kwargs or {}))

    def counts(self, prefix: str = "") -> dict[str, int]:
        from collections import Counter

        return dict(Counter(o for o in self.ops if o.startswith(prefix)))

    @property
    def explicit(self):  # torch.distributed.* calls (c10d::), i.e. what the optimizer issued
        return sum(1 for o in self.ops if o.startswith("c10d::"))

    @property
    def implicit(self):  # functional collectives: DTensor redistribution, funcol calls
        return sum(1 for o in self.ops if not o.startswith("c10d::"))


# ---------------------------------------------------------------------------- flop counting
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def step_flops(step: Callable[[], Any], counter: str = "profiler") -> dict[str, int]:
    """Flops of the ops ``step()`` runs, counted from their shapes (deterministic).

    ``"profiler"``: ``torch.profiler.profile(with_flops=True)``, ``{"total": every event's,
    "matmul": MATMUL_OPS'}``; it counts mm / addmm / bmm / baddbmm as 2 m n k (k the reduced
    size), mul / add as one flop per element, other ops (eigh, reductions, copies) as nothing.
    ``"dispatch"``: ``torch.utils.flop_counter.FlopCounterMode``, ``{"matmul": ...}``: the same
    2 m n k matmul formulas at ~1/5 of the profiler's overhead (~0.15 s instead of ~0.7 s for
    a tiny model's step on this loaded 2-core machine), for tests."""
    if counter == "dispatch":
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as mode:
            step()
        return {"matmul": mode.get_total_flops()}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        step()
    events = prof.events()
    return {
        "total": sum(e.flops for e in events),
        "matmul": sum(e.flops for e in events if e.name in MATMUL_OPS),
    }


# ------------------------------------------------------------------------------- pytest glue
_POOLS: dict[tuple[int, str], DistPool] = {}


def get_pool(world_size: int, start_method: str = "fork", **kw: Any) -> DistPool:
    """A started pool for ``world_size`` (cached; reused while alive)."""
    key = (world_size, start_method)
    pool = _POOLS.get(key)
    if pool is None:
        pool = _POOLS[key] = DistPool(world_size, start_method=start_method, **kw)
    if not pool.alive:
        pool._kill()
        pool.start()
    return pool


def close_all_pools() -> None:
    while _POOLS:
        _, pool = _POOLS.popitem()
        pool.close()


atexit.register(close_all_pools)  # parent only: workers leave through os._exit
