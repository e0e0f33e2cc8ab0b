"""Ahead-of-time compile harness: what would this package launch, and what does it cost on chip?

Without a GPU, ``aot_compile`` makes every ``@triton.jit`` launch made by ordinary Python code
compile for a chosen NVIDIA target instead of running, and records per launch the kernel, its
specialisation, grid and options, the compile time, and the cubin's resource usage (registers,
stack/spill bytes, local and shared memory) read with the ``cuobjdump`` shipped in the Triton
wheel, plus an occupancy estimate for the target::

    import torch
    from triton_aot import aot_compile, format_table
    from cm_triton.kernels import msign

    with aot_compile(target=("cuda", 90), timeout_s=120) as records:
        msign(torch.randn(16, 64, 2048))  # CPU tensors: the launch is compiled, not run
    print(format_table(records))

How (Triton 3.6; file/line references in ``/work/notes/compile/report.md``):

* a stand-in driver is made active (``triton.runtime.driver.set_active``): it reports the target
  (``get_current_target``, also read by ``tl`` code through ``language/target_info.py``), a
  device key of its own (so ``JITFunction.device_caches`` never mixes with a real device) and
  device properties for the target;
* ``knobs.runtime.jit_cache_hook`` receives the exact signature, constexprs, specialisation
  attributes and options ``JITFunction.run`` built from the launch's arguments. The hook compiles
  them itself, in a forked child with a timeout, and returns True, which makes
  ``JITFunction._do_compile`` return None and ``run`` return before the launch. Nothing runs, so
  outputs stay as allocated (uninitialised) and code after the launch goes on;
* ``JITFunction.run`` is wrapped while active only to see the launch grid (and optionally force
  compile options), and ``Autotuner._bench`` so that an autotuned kernel compiles (and records)
  every config once instead of benchmarking it.

Tensor arguments may be CPU (or meta) tensors: Triton's specialisation only reads ``dtype`` and
``data_ptr() % 16``, which CPU tensors answer like CUDA ones for the same layout.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import inspect
import io
import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime import driver as _driver_config
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

__all__ = [
    "TargetLimits",
    "LIMITS",
    "limits_for",
    "Occupancy",
    "occupancy",
    "ResourceUsage",
    "parse_res_usage",
    "cubin_resource_usage",
    "parse_ptxas_log",
    "dot_kinds",
    "narrow_program_offsets",
    "CompileOutcome",
    "compile_with_timeout",
    "aot_compile",
    "format_table",
    "DEFAULT_COLUMNS",
]

# ---------------------------------------------------------------------------------------------
# Per-target hardware limits and occupancy
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TargetLimits:
    """Per-SM / per-block limits of one NVIDIA GPU, as the CUDA occupancy calculator uses them.

    Shared memory sizes are bytes; ``max_smem_per_block`` is the opt-in maximum (what Triton may
    request as dynamic shared memory), ``reserved_smem_per_block`` the 1 KB the driver keeps per
    block on sm_80+. Registers are allocated per warp in units of ``reg_alloc_unit``.
    """

    name: str
    arch: int
    sm_count: int
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    max_regs_per_block: int = 65536
    reg_alloc_unit: int = 256
    max_threads_per_sm: int = 2048
    max_threads_per_block: int = 1024
    max_blocks_per_sm: int = 32
    smem_per_sm: int = 228 * 1024
    max_smem_per_block: int = 227 * 1024
    reserved_smem_per_block: int = 1024
    warp_size: int = 32
    sm_clock_khz: int = 0
    mem_clock_khz: int = 0
    mem_bus_width: int = 0

    @property
    def max_warps_per_sm(self) -> int:
        return self.max_threads_per_sm // self.warp_size


LIMITS: dict[int, TargetLimits] = {
    90: TargetLimits(
        name="H100 SXM (sm_90)", arch=90, sm_count=132, max_threads_per_sm=2048,
        smem_per_sm=228 * 1024, max_smem_per_block=227 * 1024,
        sm_clock_khz=1_980_000, mem_clock_khz=2_619_000, mem_bus_width=5120,
    ),
    80: TargetLimits(
        name="A100 SXM (sm_80)", arch=80, sm_count=108, max_threads_per_sm=2048,
        smem_per_sm=164 * 1024, max_smem_per_block=163 * 1024,
        sm_clock_khz=1_410_000, mem_clock_khz=1_593_000, mem_bus_width=5120,
    ),
}  # fmt: skip
"""Limits per compute capability (H200 has the same SM as H100 SXM: 132 SMs, 228 KB)."""


def limits_for(arch: int) -> TargetLimits:
    """The ``TargetLimits`` of compute capability ``arch`` (80 or 90)."""
    try:
        return LIMITS[arch]
    except KeyError:
        raise KeyError(f"no hardware limits for sm_{arch}; known: {sorted(LIMITS)}") from None


@dataclasses.dataclass(frozen=True)
class Occupancy:
    """Resident programs (thread blocks) per SM and which resource limits them.

    ``blocks_per_sm`` is 0 when one program does not fit at all (a launch would fail);
    ``limiter`` is one of "regs", "smem", "warps", "blocks" or "does not fit: ...".
    """

    blocks_per_sm: int
    limiter: str
    by_regs: int
    by_smem: int
    by_warps: int
    warps_per_sm: int
    occupancy: float  # resident warps / max warps per SM


def occupancy(
    regs: int,
    smem_bytes: int,
    num_warps: int,
    limits: TargetLimits,
    *,
    add_reserved: bool = True,
) -> Occupancy:
    """Programs per SM from registers per thread, shared memory per block and warps per block.

    Follows the CUDA occupancy calculator: registers are allocated per warp, rounded up to
    ``reg_alloc_unit``; each block also takes ``reserved_smem_per_block`` of shared memory,
    unless ``add_reserved`` is False because ``smem_bytes`` already holds it (sm_90 cubins
    declare the reserved 1 KB as static shared memory, ``.nv.reservedSmem``).
    ``smem_bytes`` is what the kernel itself uses (Triton's dynamic + the cubin's static).
    """
    threads = num_warps * limits.warp_size
    regs_per_warp = _round_up(max(regs, 1) * limits.warp_size, limits.reg_alloc_unit)
    problems = []
    if regs > limits.max_regs_per_thread:
        problems.append(f"{regs} regs/thread > {limits.max_regs_per_thread}")
    if regs_per_warp * num_warps > limits.max_regs_per_block:
        problems.append(f"{regs_per_warp * num_warps} regs/block > {limits.max_regs_per_block}")
    reserved = limits.reserved_smem_per_block if add_reserved else 0
    if smem_bytes + reserved > limits.max_smem_per_block + limits.reserved_smem_per_block:
        problems.append(f"{smem_bytes} B smem > {limits.max_smem_per_block}")
    if threads > limits.max_threads_per_block:
        problems.append(f"{threads} threads > {limits.max_threads_per_block}")
    by_regs = (limits.regs_per_sm // regs_per_warp) // num_warps
    by_smem = limits.smem_per_sm // (smem_bytes + reserved)
    by_warps = limits.max_warps_per_sm // num_warps
    bounds = {"regs": by_regs, "smem": by_smem, "warps": by_warps}
    bounds["blocks"] = limits.max_blocks_per_sm
    limiter = min(bounds, key=lambda k: bounds[k])
    blocks = 0 if problems else bounds[limiter]
    if problems:
        limiter = "does not fit: " + "; ".join(problems)
    return Occupancy(
        blocks_per_sm=blocks,
        limiter=limiter,
        by_regs=by_regs,
        by_smem=by_smem,
        by_warps=by_warps,
        warps_per_sm=blocks * num_warps,
        occupancy=blocks * num_warps / limits.max_warps_per_sm,
    )


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


# ---------------------------------------------------------------------------------------------
# Reading the cubin (cuobjdump -res-usage) and ptxas -v
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ResourceUsage:
    """One function's line of ``cuobjdump -res-usage``.

    ``regs``: registers per thread; ``stack``: stack frame bytes per thread (spilled registers
    live here: > 0 means spills); ``local``: other local memory bytes per thread; ``shared``:
    static shared memory bytes (Triton's shared memory is dynamic and is not counted here);
    ``raw``: every ``KEY:value`` pair of the line.
    """

    regs: int
    stack: int
    shared: int
    local: int
    raw: dict[str, int]


_FUNCTION_RE = re.compile(r"^\s*Function\s+(.+?)\s*:\s*$")
_PAIR_RE = re.compile(r"([A-Za-z_]+(?:\[\d+\])?)\s*:\s*(\d+)")


def parse_res_usage(text: str) -> dict[str, ResourceUsage]:
    """Parse ``cuobjdump -res-usage`` output into ``{function name: ResourceUsage}``.

    Robust to the pairs being on the header line or on the following lines, to extra or
    reordered keys, and to the ``Common:`` block and ``Fatbin``/``ELF`` banners (ignored).
    """
    out: dict[str, ResourceUsage] = {}
    current: str | None = None
    pairs: dict[str, int] = {}

    def flush() -> None:
        if current is not None and pairs:
            out[current] = ResourceUsage(
                regs=pairs.get("REG", 0),
                stack=pairs.get("STACK", 0),
                shared=pairs.get("SHARED", 0),
                local=pairs.get("LOCAL", 0),
                raw=dict(pairs),
            )

    for line in text.splitlines():
        header = _FUNCTION_RE.match(line)
        if header is None and re.match(r"^\s*Function\s+\S+:", line):
            # "Function name: REG:.. STACK:.." on one line
            name, _, rest = line.strip()[len("Function") :].partition(":")
            flush()
            current, pairs = name.strip(), {}
            pairs.update({k: int(v) for k, v in _PAIR_RE.findall(rest)})
            continue
        if header is not None:
            flush()
            current, pairs = header.group(1), {}
            continue
        if re.match(r"^\s*(Common|Fatbin|Resource usage|=+)", line):
            flush()
            current, pairs = None, {}
            continue
        if current is not None:
            pairs.update({k: int(v) for k, v in _PAIR_RE.findall(line)})
    flush()
    return out


def _tool(name: str) -> str:
    """Path of a CUDA tool shipped in the Triton wheel (``triton/backends/nvidia/bin``)."""
    tool = getattr(knobs.nvidia, name.replace("-", "_"))
    return tool.path


def cubin_resource_usage(cubin: bytes | str | os.PathLike[str]) -> dict[str, ResourceUsage]:
    """Resource usage of every function in a cubin (bytes or a path), via ``cuobjdump``."""
    with contextlib.ExitStack() as stack:
        if isinstance(cubin, bytes):
            tmp = stack.enter_context(tempfile.NamedTemporaryFile(suffix=".cubin"))
            tmp.write(cubin)
            tmp.flush()
            path = tmp.name
        else:
            path = os.fspath(cubin)
        res = subprocess.run(
            [_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True
        )
    return parse_res_usage(res.stdout)


_PTXAS_STACK_RE = re.compile(
    r"(\d+)\s+bytes stack frame,\s*(\d+)\s+bytes spill stores,\s*(\d+)\s+bytes spill loads"
)
_PTXAS_REGS_RE = re.compile(r"Used\s+(\d+)\s+registers")


def parse_ptxas_log(text: str) -> dict[str, dict[str, int]]:
    """Parse ``ptxas -v`` output: ``{function: {stack_frame, spill_stores, spill_loads, regs}}``."""
    out: dict[str, dict[str, int]] = {}
    current: str | None = None
    for line in text.splitlines():
        m = re.search(r"Function properties for\s+(\S+)", line) or re.search(
            r"Compiling entry function '([^']+)'", line
        )
        if m:
            current = m.group(1)
            out.setdefault(current, {})
            continue
        if current is None:
            continue
        if m := _PTXAS_STACK_RE.search(line):
            out[current].update(
                stack_frame=int(m.group(1)),
                spill_stores=int(m.group(2)),
                spill_loads=int(m.group(3)),
            )
        if m := _PTXAS_REGS_RE.search(line):
            out[current]["regs"] = int(m.group(1))
    return out


_DOT_RE = re.compile(r"=\s*(ttng\.warp_group_dot|tt\.dot)\b[^\n]*?->\s*tensor<[^,>]*,\s*#(\w+)")


def dot_kinds(ttgir: str) -> dict[str, int]:
    """How each dot in a TTGIR module is lowered: ``{"wgmma"|"mma"|"fma"|...: count}``.

    ``ttng.warp_group_dot`` is Hopper wgmma; a ``tt.dot`` whose result has an ``#mma`` layout is
    mma.sync (tensor cores); a ``#blocked`` result is the FMA fallback (fp32 ``ieee`` dots), which
    keeps both operands in registers. Counts dots in the IR, not executions.
    """
    out: dict[str, int] = {}
    for op, layout in _DOT_RE.findall(ttgir):
        if op == "ttng.warp_group_dot":
            kind = "wgmma"
        elif layout.startswith("mma"):
            kind = "mma"
        elif layout.startswith("blocked"):
            kind = "fma"
        else:
            kind = layout
        out[kind] = out.get(kind, 0) + 1
    return out


_DEF_RE = re.compile(r"^\s*(%[\w.$-]+)(?::\d+)?\s*=\s*([\w.]+)(.*)$")
_FOR_RE = re.compile(r"^\s*(?:%[\w.$-]+(?::\d+)?\s*=\s*)?scf\.for\s+(%[\w.$-]+)\s*=(.*)$")
_USE_RE = re.compile(r"%[\w.$-]+")
_PID_OPS = ("tt.get_program_id", "tt.get_num_programs")


def narrow_program_offsets(ttir: str) -> list[str]:
    """The scalar pointer offsets of a TTIR module that are 32-bit and computed from a program
    id: each line ``tt.addptr %p, %off : !tt.ptr<...>, i32`` whose ``%off`` derives (through
    any ops, loop bounds included) from ``tt.get_program_id`` / ``tt.get_num_programs``.

    Such an offset (a head's, a batch entry's, a scratch block's: ``pid * stride``) grows with
    the launch and wraps past 2^31 on large batches; offsets of one tile (tensors) stay bounded
    by one block's extent. An empty list: every program-derived scalar offset is 64-bit.
    """
    defs: dict[str, list[list[str]]] = {}
    for line in ttir.splitlines():
        m = _FOR_RE.match(line)
        if m:  # the induction variable derives from the loop's bounds and step
            defs.setdefault(m.group(1), []).append(["scf.for", *_USE_RE.findall(m.group(2))])
        m = _DEF_RE.match(line)
        if m:
            body = m.group(3).split(" : ")[0].split(" loc(")[0]
            uses = [u.split("#")[0] for u in _USE_RE.findall(body)]
            defs.setdefault(m.group(1), []).append([m.group(2), *uses])
    memo: dict[str, bool] = {}

    def from_pid(name: str) -> bool:
        if name not in memo:
            memo[name] = False  # cycles (loop-carried values) end here
            memo[name] = any(
                d[0] in _PID_OPS or any(from_pid(u) for u in d[1:]) for d in defs.get(name, [])
            )
        return memo[name]

    out = []
    for line in ttir.splitlines():
        if "tt.addptr" not in line:
            continue
        types = line.split(" : ", 1)[-1].split(" loc(")[0]
        ptr_type, _, off_type = types.rpartition(", ")
        if not ptr_type.startswith("!tt.ptr") or off_type.strip() != "i32":
            continue
        operands = _USE_RE.findall(line.split("tt.addptr", 1)[1].split(" : ")[0])
        if len(operands) == 2 and from_pid(operands[1]):
            out.append(line.strip())
    return out


# ---------------------------------------------------------------------------------------------
# Compiling one specialisation in a child process, with a timeout
# ---------------------------------------------------------------------------------------------


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

    def inspect_stages(backend: Any, stages: dict, options: Any, language: Any, cap: Any) -> None:
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


# ---------------------------------------------------------------------------------------------
# The stand-in driver
# ---------------------------------------------------------------------------------------------


class _AotUtils:
    """The part of ``CudaUtils`` launch code may query: device properties of the target."""

    def __init__(self, limits: TargetLimits | None) -> None:
        self._limits = limits

    def get_device_properties(self, device: Any) -> dict[str, int]:
        lim = self._limits
        if lim is None:
            raise RuntimeError("aot_compile: no device properties for this target")
        return {
            "max_shared_mem": lim.max_smem_per_block,
            "max_num_regs": lim.regs_per_sm,
            "multiprocessor_count": lim.sm_count,
            "warpSize": lim.warp_size,
            "sm_clock_rate": lim.sm_clock_khz,
            "mem_clock_rate": lim.mem_clock_khz,
            "mem_bus_width": lim.mem_bus_width,
        }

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"aot_compile: driver.utils.{name} needs a GPU (nothing is launched)")


class _AotDriver(DriverBase):
    """Active driver while ``aot_compile`` runs: reports the target, launches nothing."""

    def __init__(self, target: GPUTarget, device_key: str, limits: TargetLimits | None) -> None:
        super().__init__()
        self.target = target
        self.device_key = device_key
        self.utils = _AotUtils(limits)

    @classmethod
    def is_active(cls) -> bool:
        return False  # never picked by triton's own driver discovery

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise RuntimeError("aot_compile: no launcher is built (nothing is launched)")

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> str:
        return self.device_key

    def set_current_device(self, device: Any) -> None:
        pass

    def get_current_stream(self, device: Any = None) -> int:
        return 0

    def get_active_torch_device(self) -> Any:
        import torch

        return torch.device("cpu")

    def get_benchmarker(self) -> Callable[..., list[float]]:
        def bench(kernel_call: Callable[[], Any], quantiles: Any = None, **_: Any) -> list[float]:
            kernel_call()
            return [0.0, 0.0, 0.0] if quantiles is not None else 0.0

        return bench

    def get_device_interface(self) -> Any:
        raise RuntimeError("aot_compile: no device interface without a GPU")

    def get_empty_cache_for_benchmark(self) -> Any:
        raise RuntimeError("aot_compile: nothing is benchmarked")


# ---------------------------------------------------------------------------------------------
# The context manager
# ---------------------------------------------------------------------------------------------

_LAUNCH: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "aot_launch", default=None
)
_ACTIVE: list[bool] = []


def _as_target(target: GPUTarget | tuple[str, int] | int) -> GPUTarget:
    if isinstance(target, GPUTarget):
        return target
    if isinstance(target, int):
        return GPUTarget("cuda", target, 32)
    backend, arch = target
    return GPUTarget(backend, int(arch), 32)


@contextlib.contextmanager
def aot_compile(
    target: GPUTarget | tuple[str, int] | int = ("cuda", 90),
    *,
    timeout_s: float | None = 120.0,
    options: Mapping[str, Any] | None = None,
    dedupe: bool = True,
    artifacts_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    verbose: bool = False,
) -> Iterator[list[dict[str, Any]]]:
    """While active, every Triton JIT launch compiles for ``target`` instead of running.

    Yields the list that receives one record (a dict) per launch, in launch order. Keys:

    * what: ``kernel``, ``module``, ``target`` ("sm_90"), ``arch``, ``caller`` (file:line of the
      launch), ``constexprs`` (incl. ints specialised to 1), ``signature`` (Triton types),
      ``divisible_by_16`` (args specialised as 16-aligned), ``num_warps``, ``num_stages``,
      ``num_ctas``, ``maxnreg``, ``launch_options`` (the launch's values of forced options);
    * launch: ``grid`` (3-tuple), ``programs``, ``warmup``, ``cached`` (deduplicated);
    * compile: ``status`` ("ok" | "timeout" | "error"), ``error``, ``compile_s`` (triton.compile
      in the child), ``wall_s``, ``stage_s`` (per stage: ast->ttir, ttir, ttgir, llir, ptx,
      cubin = ptxas), ``dots`` (see ``dot_kinds``), ``ptxas_log``, ``artifacts`` (paths);
    * cubin: ``regs``, ``stack_bytes`` (> 0: spills), ``local_bytes``, ``spill_stores_bytes`` /
      ``spill_loads_bytes`` (ptxas -v), ``spills`` (bool), ``smem_dynamic_bytes`` (Triton's),
      ``smem_static_bytes`` (cubin), ``smem_bytes`` (sum), ``smem_reserved_in_static``,
      ``res_usage`` (every cuobjdump pair), ``n_regs`` / ``n_spills`` (what Triton's
      ``CompiledKernel`` would report after loading on a GPU: NUM_REGS, LOCAL_SIZE_BYTES / 4);
    * occupancy (targets in ``LIMITS``): ``blocks_per_sm`` (0: does not fit), ``occupancy``,
      ``occupancy_limiter``, ``waves`` (programs / (blocks_per_sm * SMs)).

    Args:
        target: ``GPUTarget``, ``("cuda", 90)`` or ``90``.
        timeout_s: per-compile limit (None: no limit); a compile past it is killed (with its
            ptxas) and recorded with ``status="timeout"``.
        options: compile options forced on every launch (e.g. ``{"num_warps": 8}``), to ask
            "what if"; the launch's own values are kept in the record's ``launch_options``.
        dedupe: a launch whose specialisation was already compiled in this context is recorded
            (``cached=True``, same figures) without compiling again.
        artifacts_dir: if given, each compile's ttgir/ptx/cubin are written there.
        cache_dir: Triton's cache directory while active; default a fresh temporary one, so
            compile times are real and nothing is written to ``~/.triton/cache``.
        verbose: print one line per record.

    Not re-entrant and not thread-safe (it swaps process-global Triton state).
    Launch code after the kernel call runs on the untouched (uninitialised) outputs.
    """
    if _ACTIVE:
        raise RuntimeError("aot_compile is already active")
    if knobs.runtime.interpret:
        raise RuntimeError("aot_compile needs TRITON_INTERPRET unset (the interpreter compiles)")
    gpu_target = _as_target(target)
    limits = LIMITS.get(gpu_target.arch) if gpu_target.backend == "cuda" else None
    device_key = f"aot:{gpu_target.backend}:{gpu_target.arch}:{os.getpid()}:{time.monotonic_ns()}"
    records: list[dict[str, Any]] = []
    done: dict[tuple[str, str], dict[str, Any]] = {}
    touched: dict[int, JITFunction] = {}
    autotuner_caches: dict[int, tuple[Autotuner, dict]] = {}
    forced = dict(options or {})
    art_dir = Path(artifacts_dir) if artifacts_dir is not None else None
    if art_dir is not None:
        art_dir.mkdir(parents=True, exist_ok=True)

    def hook(*, key: Any, repr: str, fn: Any, compile: dict, is_manual_warmup: bool,
             already_compiled: bool) -> bool:  # fmt: skip
        jit_fn: JITFunction = fn.jit_function
        touched[id(jit_fn)] = jit_fn
        launch = _LAUNCH.get() or {}
        done_key = (jit_fn.cache_key, str(key))
        if dedupe and done_key in done:
            rec = dict(done[done_key], cached=True, wall_s=0.0)
        else:
            rec = _compile_launch(jit_fn, compile, gpu_target, timeout_s, art_dir)
            done[done_key] = rec
            rec = dict(rec, cached=False)
        rec.update(_launch_fields(jit_fn, launch, rec, limits))
        records.append(rec)
        if verbose:
            print(format_table([rec], header=False), flush=True)
        return True  # JITFunction._do_compile returns None: run() returns before launching

    orig_run = JITFunction.run
    orig_bench = Autotuner._bench

    def run(self: JITFunction, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        launch_options = {k: kwargs[k] for k in forced if k in kwargs}
        kwargs.update(forced)
        token = _LAUNCH.set(
            dict(grid=grid, args=args, kwargs=kwargs, warmup=warmup,
                 launch_options=launch_options, caller=_caller())
        )  # fmt: skip
        try:
            return orig_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            _LAUNCH.reset(token)

    def bench(self: Autotuner, *args: Any, config: Any, **meta: Any) -> list[float]:
        # Compile (and record) the config; its pre/post hooks are not run, nothing is timed.
        autotuner_caches.setdefault(id(self), (self, dict(self.cache)))
        self.fn.run(*args, **dict(meta, **config.all_kwargs()))
        return [0.0, 0.0, 0.0]

    prev_active = _driver_config._active
    tmp_cache = None
    with contextlib.ExitStack() as stack:
        _ACTIVE.append(True)
        stack.callback(_ACTIVE.clear)
        stack.enter_context(knobs.runtime.scope())
        stack.enter_context(knobs.cache.scope())
        if cache_dir is None:
            tmp_cache = tempfile.mkdtemp(prefix="aot-triton-cache-")
            stack.callback(shutil.rmtree, tmp_cache, True)
        knobs.cache.dir = os.fspath(cache_dir) if cache_dir is not None else tmp_cache
        knobs.runtime.jit_cache_hook = hook
        _driver_config.set_active(_AotDriver(gpu_target, device_key, limits))
        JITFunction.run = run  # type: ignore[method-assign]
        Autotuner._bench = bench  # type: ignore[method-assign]
        try:
            yield records
        finally:
            JITFunction.run = orig_run  # type: ignore[method-assign]
            Autotuner._bench = orig_bench  # type: ignore[method-assign]
            _driver_config._active = prev_active
            for jit_fn in touched.values():
                jit_fn.device_caches.pop(device_key, None)
            for tuner, cache in autotuner_caches.values():
                tuner.cache = cache  # forget the configs "chosen" without benchmarking


def _caller() -> str:
    """First stack frame outside Triton and this module: where the launch was made."""
    here = os.path.abspath(__file__)
    triton_dir = os.path.dirname(os.path.abspath(triton.__file__))
    frame = inspect.currentframe()
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if path != here and not path.startswith(triton_dir):
            return f"{path}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


def _param_name(jit_fn: JITFunction, path: Sequence[int]) -> str:
    name = jit_fn.arg_names[path[0]]
    return name + "".join(f"[{i}]" for i in path[1:])


def _compile_launch(
    jit_fn: JITFunction,
    compile: dict[str, Any],
    target: GPUTarget,
    timeout_s: float | None,
    art_dir: Path | None,
) -> dict[str, Any]:
    """Compile what the hook was handed; the record's compile and cubin fields."""
    constants = compile["constants"]
    attrs = compile["configs"][0]
    # Same options the launch would compile with (JITFunction.preload's recipe).
    opts = json.loads(compile["specialization_data"])["options"]
    opts = {k: tuple(v) if isinstance(v, list) else v for k, v in opts.items()}
    src = jit_fn.ASTSource(jit_fn, compile["signature"], constants, attrs)
    outcome = compile_with_timeout(src, target, opts, timeout_s)
    signature = dict(compile["signature"])
    rec: dict[str, Any] = {
        "kernel": jit_fn.__name__,
        "module": jit_fn.module,
        "target": f"sm_{target.arch}" if target.backend == "cuda" else str(target),
        "arch": target.arch,
        "status": outcome.status,
        "error": outcome.error,
        "constexprs": {_param_name(jit_fn, k): _plain(v) for k, v in constants.items()},
        "signature": signature,
        "divisible_by_16": sorted(
            _param_name(jit_fn, k)
            for k, v in attrs.items()
            if any(a == ["tt.divisibility", 16] or tuple(a) == ("tt.divisibility", 16) for a in v)
        ),
        "num_warps": opts.get("num_warps"),
        "num_stages": opts.get("num_stages"),
        "num_ctas": opts.get("num_ctas"),
        "maxnreg": opts.get("maxnreg"),
        "compile_s": round(outcome.compile_s, 3),
        "wall_s": round(outcome.wall_s, 3),
        "stage_s": {k: round(v, 3) for k, v in outcome.stage_s.items()},
        "regs": None,
        "stack_bytes": None,
        "local_bytes": None,
        "spill_stores_bytes": None,
        "spill_loads_bytes": None,
        "spills": None,
        "smem_dynamic_bytes": None,
        "smem_static_bytes": None,
        "smem_bytes": None,
        "n_regs": None,
        "n_spills": None,
        "dots": None,
        "ptxas_log": outcome.ptxas_log,
        "artifacts": {},
    }
    if outcome.status != "ok":
        return rec
    meta = outcome.metadata
    name = meta.get("name", jit_fn.__name__)
    usage = cubin_resource_usage(outcome.asm["cubin"]).get(name)
    ptxas = parse_ptxas_log(outcome.ptxas_log).get(name, {})
    rec["num_warps"] = meta.get("num_warps", rec["num_warps"])
    rec["num_stages"] = meta.get("num_stages", rec["num_stages"])
    rec["smem_dynamic_bytes"] = int(meta.get("shared", 0))
    if usage is not None:
        rec.update(
            regs=usage.regs, stack_bytes=usage.stack, local_bytes=usage.local,
            smem_static_bytes=usage.shared, res_usage=usage.raw,
        )  # fmt: skip
    rec["dots"] = dot_kinds(str(outcome.asm.get("ttgir", "")))
    rec["narrow_offsets"] = narrow_program_offsets(str(outcome.asm.get("ttir", "")))
    rec["spill_stores_bytes"] = ptxas.get("spill_stores")
    rec["spill_loads_bytes"] = ptxas.get("spill_loads")
    if rec["regs"] is None and "regs" in ptxas:
        rec["regs"] = ptxas["regs"]
    rec["smem_bytes"] = rec["smem_dynamic_bytes"] + (rec["smem_static_bytes"] or 0)
    # sm_90 ptxas declares the driver's reserved 1 KB per block inside the static shared memory.
    rec["smem_reserved_in_static"] = (
        b"reservedSmem" in outcome.asm["cubin"] and (rec["smem_static_bytes"] or 0) >= 1024
    )
    rec["spills"] = bool(
        (rec["stack_bytes"] or 0) + (rec["local_bytes"] or 0) + (rec["spill_stores_bytes"] or 0)
    )
    # Triton's CompiledKernel.n_regs / n_spills are only set when a GPU loads the cubin
    # (driver.utils.load_binary: NUM_REGS and LOCAL_SIZE_BYTES / 4); these are their equivalents.
    rec["n_regs"] = rec["regs"]
    rec["n_spills"] = ((rec["stack_bytes"] or 0) + (rec["local_bytes"] or 0)) // 4
    if art_dir is not None:
        stem = f"{name}-{meta.get('hash', 'x')[:10]}-sm{target.arch}"
        for ext, text in outcome.asm.items():
            path = art_dir / f"{stem}.{ext}"
            path.write_bytes(text if isinstance(text, bytes) else text.encode())
            rec["artifacts"][ext] = str(path)
        (art_dir / f"{stem}.ptxas.log").write_text(outcome.ptxas_log)
    return rec


def _plain(v: Any) -> Any:
    """Constexpr values as plain Python (tl.constexpr, dtypes and functions as text)."""
    v = getattr(v, "value", v)
    if isinstance(v, (bool, int, float, str, type(None))):
        return v
    return str(v)


def _launch_fields(
    jit_fn: JITFunction,
    launch: Mapping[str, Any],
    rec: Mapping[str, Any],
    limits: TargetLimits | None,
) -> dict[str, Any]:
    """The per-launch part of a record: grid, programs, occupancy and waves."""
    grid = launch.get("grid")
    if callable(grid):
        try:
            bound = jit_fn.signature.bind_partial(
                *launch.get("args", ()),
                **{k: v for k, v in launch.get("kwargs", {}).items() if k in jit_fn.arg_names},
            )
            bound.apply_defaults()
            grid = grid(dict(bound.arguments))
        except Exception as e:  # noqa: BLE001 - a grid we cannot evaluate is only reported
            grid = f"<callable grid: {e}>"
    if isinstance(grid, Sequence) and not isinstance(grid, str):
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        programs: int | None = math.prod(grid)
    else:
        programs = None
    out: dict[str, Any] = {
        "grid": grid,
        "programs": programs,
        "warmup": launch.get("warmup"),
        "launch_options": dict(launch.get("launch_options", {})),
        "caller": launch.get("caller", "?"),
        "blocks_per_sm": None,
        "occupancy_limiter": None,
        "occupancy": None,
        "waves": None,
    }
    if limits is not None and rec.get("status") == "ok" and rec.get("regs") is not None:
        occ = occupancy(
            rec["regs"], rec["smem_bytes"], rec["num_warps"], limits,
            add_reserved=not rec.get("smem_reserved_in_static", False),
        )  # fmt: skip
        out.update(
            blocks_per_sm=occ.blocks_per_sm, occupancy_limiter=occ.limiter,
            occupancy=round(occ.occupancy, 3),
        )  # fmt: skip
        if programs is not None and occ.blocks_per_sm:
            out["waves"] = round(programs / (occ.blocks_per_sm * limits.sm_count), 3)
    return out


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

DEFAULT_COLUMNS: tuple[str, ...] = (
    "kernel", "config", "target", "status", "regs", "stack_bytes", "spill_stores_bytes",
    "smem_bytes", "num_warps", "num_stages", "compile_s", "programs", "blocks_per_sm",
)  # fmt: skip


def _cell(rec: Mapping[str, Any], col: str, config_keys: Sequence[str] | None) -> str:
    if col == "config":
        cx = rec.get("constexprs", {})
        keys = config_keys if config_keys is not None else list(cx)
        return " ".join(f"{k}={cx[k]}" for k in keys if k in cx)
    v = rec.get(col)
    if col == "status" and rec.get("cached"):
        return f"{v} (cached)"
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def format_table(
    records: Sequence[Mapping[str, Any]],
    columns: Sequence[str] = DEFAULT_COLUMNS,
    *,
    config_keys: Sequence[str] | None = None,
    header: bool = True,
    extra: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """A Markdown table of records. ``config`` shows the constexprs (or only ``config_keys``);
    ``extra`` adds columns given as ``{title: one value per record}``."""
    cols = list(columns) + list(extra or {})
    rows = []
    for i, rec in enumerate(records):
        row = [_cell(rec, c, config_keys) for c in columns]
        row += [str(vals[i]) for vals in (extra or {}).values()]
        rows.append(row)
    lines = []
    if header:
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "|".join("---" for _ in cols) + "|")
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
