"""Compiling one specialisation in a forked child process, with a timeout."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import pickle
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget


@dataclasses.dataclass
class CompileOutcome:
    """What one compile produced. ``status``: "ok", "timeout" or "error"."""

    status: str  # "ok", "timeout" (error names the stage it was killed in) or "error"
    compile_s: float  # triton.compile wall time in the child (wall_s when it did not finish)
    wall_s: float  # fork to result, as seen by the parent
    error: str | None = None
    stage_s: dict[str, float] = dataclasses.field(default_factory=dict)
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    asm: dict[str, str | bytes] = dataclasses.field(default_factory=dict)
    ptxas_log: str = ""


def _child_compile(
    src: Any, target: GPUTarget, options: dict[str, Any], progress: Path
) -> dict[str, Any]:
    """Runs in the forked child: ``triton.compile`` with per-stage timing and the ptxas log.

    Each stage's start and end are appended to ``progress`` (``start NAME T`` / ``end NAME T``,
    seconds since the compile began), so a killed compile still tells which stage it was in.
    """
    stage_s: dict[str, float] = {}
    log = io.StringIO()
    t0 = time.perf_counter()

    def mark(what: str, name: str) -> None:
        with open(progress, "a") as f:
            f.write(f"{what} {name} {time.perf_counter() - t0:.3f}\n")

    def inspect_stages(*args: Any) -> Any:
        # Triton 3.6 calls it as (backend, stages, options, language, capability) when the
        # stages are made; Triton 3.7+ also calls it with no argument for a (key, hash) to
        # add to the compile's cache key.
        if not args:
            return "cm_triton.aot:timed", "cm_triton.aot:timed"
        stages = args[1]
        for name, fn in list(stages.items()):
            stages[name] = _timed_stage(name, fn, stage_s, log, mark)

    knobs.runtime.add_stages_inspection_hook = inspect_stages
    knobs.nvidia.dump_ptxas_log = True  # make_cubin prints ptxas -v; _timed_stage captures it
    knobs.compilation.always_compile = True
    mark("start", "ast->ttir")  # lasts until the first lowering stage ("ttir") starts
    kernel = triton.compile(src, target=target, options=options)
    compile_s = time.perf_counter() - t0
    stage_s["ast->ttir"] = compile_s - sum(stage_s.values())
    meta = kernel.metadata._asdict()
    meta["target"] = f"{meta['target'].backend}:{meta['target'].arch}"
    meta = {k: v for k, v in meta.items() if _jsonable(v)}
    asm = {k: kernel.asm[k] for k in ("ttir", "ttgir", "llir", "ptx", "cubin") if k in kernel.asm}
    return dict(
        status="ok", compile_s=compile_s, stage_s=stage_s, metadata=meta, asm=asm,
        ptxas_log=log.getvalue(),
    )  # fmt: skip


def _timed_stage(
    name: str,
    fn: Callable[[Any, dict], Any],
    stage_s: dict[str, float],
    log: io.StringIO,
    mark: Callable[[str, str], None],
) -> Callable[[Any, dict], Any]:
    def run(src: Any, metadata: dict) -> Any:
        mark("start", name)
        t0 = time.perf_counter()
        try:
            if name == "cubin":
                with contextlib.redirect_stdout(log):
                    return fn(src, metadata)
            return fn(src, metadata)
        finally:
            stage_s[name] = time.perf_counter() - t0
            mark("end", name)

    return run


def _read_progress(progress: Path) -> tuple[dict[str, float], str | None]:
    """Finished stages' durations and the stage still running, from the child's progress file."""
    starts: dict[str, float] = {}
    done: dict[str, float] = {}
    running = None
    with contextlib.suppress(OSError):
        for line in progress.read_text().splitlines():
            what, name, t = line.split()
            if what == "start":
                if running is not None:  # a stage without an end mark ended when this began
                    done[running] = float(t) - starts[running]
                starts[name], running = float(t), name
            elif name in starts:
                done[name], running = float(t) - starts[name], None
    return done, running


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def compile_with_timeout(
    src: Any, target: GPUTarget, options: Mapping[str, Any], timeout_s: float | None
) -> CompileOutcome:
    """``triton.compile(src, target, options)`` in a forked child; kill it after ``timeout_s``.

    The child puts itself in a new process group, so a timeout kills ptxas (its grandchild) as
    well. Forking (not spawning) means ``src`` (an ``ASTSource`` holding the live JITFunction)
    needs no pickling, and a compiler crash (segfault, abort) is reported, not fatal.
    """
    with tempfile.TemporaryDirectory(prefix="aot-") as tmp:
        result_path = Path(tmp) / "result.pkl"
        progress = Path(tmp) / "progress"
        sys.stdout.flush()
        sys.stderr.flush()
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # child
            code = 0
            try:
                os.setpgid(0, 0)
                res = _child_compile(src, target, dict(options), progress)
            except BaseException as e:  # noqa: BLE001 - everything is reported to the parent
                code = 1
                res = dict(
                    status="error", error=f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
                )
            try:
                with open(result_path, "wb") as f:
                    pickle.dump(res, f)
            finally:
                os._exit(code)
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)  # both sides set it: no race with the child's setpgid
        status = _wait(pid, timeout_s)
        wall = time.perf_counter() - t0
        if status is None:
            stage_s, running = _read_progress(progress)
            return CompileOutcome(
                "timeout", wall, wall, stage_s=stage_s,
                error=f"compile exceeded {timeout_s} s (killed in stage {running or '?'})",
            )  # fmt: skip
        if not result_path.exists():
            return CompileOutcome("error", wall, wall, error=f"compiler process died ({status})")
        with open(result_path, "rb") as f:
            res = pickle.load(f)
    if res["status"] != "ok":
        return CompileOutcome("error", wall, wall, error=res["error"])
    return CompileOutcome(wall_s=wall, **res)


def _wait(pid: int, timeout_s: float | None) -> str | None:
    """Wait for ``pid``; None after killing its process group on timeout, else how it ended."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    delay = 0.005
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                if os.WIFSIGNALED(status):
                    return f"killed by signal {os.WTERMSIG(status)}"
                return f"exit code {os.WEXITSTATUS(status)}"
            if deadline is not None and time.monotonic() > deadline:
                _kill_group(pid)
                return None
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
    except BaseException:
        _kill_group(pid)
        raise


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
