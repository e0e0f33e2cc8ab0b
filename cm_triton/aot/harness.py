"""The stand-in driver, the ``aot_compile`` context manager and the records' tables."""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import json
import math
import os
import shutil
import tempfile
import time
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

from cm_triton.aot.child import compile_with_timeout
from cm_triton.aot.cubin import (
    cubin_resource_usage,
    dot_kinds,
    narrow_program_offsets,
    parse_ptxas_log,
)
from cm_triton.aot.targets import LIMITS, TargetLimits, occupancy


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
