"""The one place that chooses: the backend, kernel or torch per phase, and the per-device
defaults (spec §2.1, §5).

``resolve_primitives`` maps ``backend`` and a device to a ``Primitives``. For the Triton
backend each phase of ``reference.phases.PhaseOps`` runs its kernel where the kernel takes the
tensors (``kernels.streams_take`` / ``maps_take``: dtype, and heads up to ``MAX_HEAD_DIM`` for
the dh x dh algebra) and, on CUDA, where the cost model expects it to win
(``cost_model.use_kernel``); otherwise the reference's. The kernels themselves never choose.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import logging
import math
import os
import warnings

import torch

from cm_triton.cost_model import use_kernel
from cm_triton.options import CMOptions
from cm_triton.reference.phases import REFERENCE_PHASES, PhaseOps
from cm_triton.reference.rule import REFERENCE, Primitives
from cm_triton.tables import LayerRows

logger = logging.getLogger("cm_triton")

__all__ = [
    "use_kernel",
    "Guard",
    "build_primitives",
    "checked",
    "guard_tolerance",
    "DEVICE_DEFAULTS",
    "triton_available",
    "interpreting",
    "resolve_primitives",
    "resolve_ns_dtype",
    "resolve_options",
]

# Defaults per device type, each from a measurement or a labelled estimate:
# - ns_method "gram" (fp32, restart after 3 steps): error against float64 at the level of fp32
#   Newton-Schulz iterations (worst 6e-5 vs 7.5e-5 over Gaussian .. condition 1e6 and
#   rank-deficient (8, 128, 2048) slices) at 0.3-0.45x their CPU time
#   (bench/results/accuracy.md). On CUDA the same arithmetic gives the same accuracy; the speed
#   side there is the cost model's estimate (bench/results/cost_model.md), not a measurement.
# - inv_root "quintic": as accurate as the release's 25-step Newton in 7 steps (2.7x fewer
#   products); on this 2-core CPU the whole step is the same with eigh (46.1 vs 45.7 ms at
#   (8, 64, 512), 286 vs 288 ms at (16, 64, 1024)), and eigh loses accuracy beyond condition
#   1e4 (bench/results/accuracy.md); on CUDA matmul-only beats cuSOLVER's per-matrix eigh
#   loop for head dims above 32 (an estimate, not measured).
# - ns_dtype: bf16 on CUDA for the Newton-Schulz signs that remain (the hybrid O sign, as
#   cuBLAS runs it), the compute dtype elsewhere.
DEVICE_DEFAULTS = {
    "cpu": {"ns_method": "gram", "inv_root": "quintic", "ns_dtype": None},
    "cuda": {"ns_method": "gram", "inv_root": "quintic", "ns_dtype": torch.bfloat16},
}


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it is optional)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_CHECKED = False  # the check tool (python -m cm_triton.check): guarded kernels everywhere


@contextlib.contextmanager
def checked():
    """Within it, every kernel backend ("auto" on CUDA, "triton" anywhere the kernels run,
    the interpreter included) resolves to the guarded kernels: each configuration is checked
    against the reference (``Guard.verdicts``). For ``python -m cm_triton.check``."""
    global _CHECKED
    saved, _CHECKED = _CHECKED, True
    try:
        yield
    finally:
        _CHECKED = saved


def is_rocm() -> bool:
    """True on a ROCm build of torch, whose AMD GPUs call themselves "cuda"."""
    return getattr(torch.version, "hip", None) is not None


def resolve_primitives(backend: str, device: torch.device) -> Primitives:
    """Map ``backend`` ("auto" | "reference" | "triton") and a device to primitives.

    "auto": Triton kernels for NVIDIA CUDA tensors when Triton imports, each kernel phase
    checked against the reference the first time it runs a configuration (``guarded``): one
    that fails to compile or launch, or differs beyond its tolerance, warns once and runs on
    the reference from then on. The reference otherwise (CPU; ROCm, whose "cuda" devices the
    kernels are not built for, unless ``backend="triton"`` asks).
    "triton": the kernels unguarded (a failure raises), or a RuntimeError saying why they
    cannot run here.
    """
    if backend == "reference":
        return REFERENCE
    usable = triton_available() and (device.type == "cuda" or interpreting())
    if backend == "auto":
        if not (usable and device.type == "cuda") or is_rocm():
            return REFERENCE
        return _triton_primitives(guarded=True)
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package, which is not installed")
    if not usable:
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before cm_triton "
            f"is imported to run the kernels on the CPU; got tensors on {device}"
        )
    return _triton_primitives(guarded=_CHECKED)


@functools.cache
def _triton_primitives(guarded: bool = False) -> Primitives:
    """The Triton backend (built once per kind)."""
    from cm_triton import kernels as k

    return build_primitives(k.KERNEL_PHASES, guarded)


# Which phase each PhaseOps field is, for the cost model and the guard's tolerance.
PHASE_OF = {"stream": "stream", "stream_grams": "stream", "cross_grams": "stream",
            "first_maps": "maps", "last_maps": "maps", "restart_gram": "restart",
            "apply_update": "apply", "inv_sqrt": "inv_sqrt"}  # fmt: skip


def build_primitives(kernels: PhaseOps, guarded: bool = False) -> Primitives:
    """Per phase, the kernel of ``kernels`` where it takes the call (dtypes, sizes; on CUDA,
    where the cost model expects it to win), else the reference; ``guarded``: each kernel
    checked against the reference on the first call of each configuration (``Guard``)."""
    from cm_triton import kernels as k

    ref = REFERENCE_PHASES

    def pick(name, arg, takes, dims):
        kernel, reference = getattr(kernels, name), getattr(ref, name)
        run_kernel = Guard(name, kernel, reference, arg) if guarded else kernel

        def run(*args, **kwargs):
            x = args[arg]
            stacked = sum(isinstance(a, LayerRows) for a in args)  # torch would stack these
            if takes(x, *args) and use_kernel(PHASE_OF[name], *dims(x), x.device, stacked):
                return run_kernel(*args, **kwargs)
            return reference(*args, **kwargs)

        run.__name__ = run.__qualname__ = kernel.__name__
        run.__doc__ = kernel.__doc__
        run.kernel, run.reference = run_kernel, reference  # what the chooser picks from
        return run

    def big(x, *args):  # every big operand of the call (the tensors shaped like the first)
        return k.streams_take(*(a for a in args if isinstance(a, torch.Tensor)
                                and a.shape == x.shape))  # fmt: skip

    def small(x, *args):
        return k.maps_take(x)

    def quintic(x, *args):
        return len(args) > 1 and args[1] == "quintic" and k.maps_take(x)

    def heads(x):  # (B, H, R, n) -> the cost model's (B, H, dh, n)
        return (x.shape[0], x.numel() // (x.shape[0] * x.shape[-2] * x.shape[-1]) if x.dim() > 2
                else 1, x.shape[-2], x.shape[-1])  # fmt: skip

    def mats(x):  # (..., r, r) -> one batch of N matrices
        return 1, x.numel() // max(1, x.shape[-1] ** 2), x.shape[-1], x.shape[-1]

    ops = PhaseOps(
        stream=pick("stream", 0, big, heads),
        stream_grams=pick("stream_grams", 0, big, heads),
        cross_grams=pick("cross_grams", 0, big, heads),
        first_maps=pick("first_maps", 0, small, mats),
        restart_gram=pick("restart_gram", 2, big, heads),
        last_maps=pick("last_maps", 0, small, mats),
        apply_update=pick("apply_update", 0, big, heads),
        inv_sqrt=pick("inv_sqrt", 0, quintic, mats),
        bytes_bound=True,
    )
    return Primitives(msign=REFERENCE.msign, phases=ops, in_place=True)


# -- the first-call check ------------------------------------------------------------------
U32 = 2.0**-24  # fp32 unit roundoff
DOT_ERROR = 2.0**-21  # one tf32x3 product against an fp32 one: the dropped lo*lo term and the
# tf32 rounding of the two remainders, each ~2^-22 relative (the interpreter's fp32: 0)


def guard_tolerance(phase: str, rows: int, width: int) -> float:
    """Relative Frobenius difference (per matrix slice) a correct kernel may show against the
    reference, from the first-order bound of two fp32 evaluation orders: a dot of k terms
    errs by at most ``(k u + DOT_ERROR) sum |a_i b_i|`` (u = 2^-24) in each, and a Gram of R
    rows has ``||X X^T||_F >= ||X||_F^2 / sqrt(R)``, so ``2 (k u + DOT_ERROR) sqrt(R)``
    per product; the dh x dh algebra chains 37 products (the maps) or 28 (the inverse root),
    each bounded so. A kernel that is wrong (a bad compile, a race, the wrong arithmetic) is
    off by O(1); rounding stays orders of magnitude below these bounds.
    """
    per = 2 * (rows + width) * U32 + 2 * DOT_ERROR
    chain = {"first_maps": 37, "last_maps": 37, "inv_sqrt": 28}.get(phase, 2)
    return chain * per * math.sqrt(rows)


def _call_key(args: tuple, kwargs: dict) -> tuple:
    """What selects a kernel's compiled configuration: tensors' shapes, strides and dtypes,
    flags and schedules; of a float only whether it is zero (a step or decay of 0 is a
    configuration of its own, its value is not)."""

    def one(v):
        if isinstance(v, torch.Tensor):
            return ("T", tuple(v.shape), v.stride(), v.dtype, type(v).__name__)
        if isinstance(v, float):
            return ("f", v == 0.0)
        if isinstance(v, dict):
            return tuple((k, one(x)) for k, x in v.items())
        if isinstance(v, (tuple, list)):
            return tuple(one(x) for x in v)
        return v

    return one(args) + one(sorted(kwargs.items()))


def _outputs(result) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, dict):
        return [result[k] for k in sorted(result)]
    return [t for x in result for t in _outputs(x)]


def _slice_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Worst relative Frobenius difference over the trailing matrices; NaN/Inf: infinite."""
    a = got.double().reshape(-1, *got.shape[-2:]) if got.dim() >= 2 else got.double()[None]
    b = want.double().reshape(a.shape)
    num = (a - b).flatten(1).norm(dim=1)
    den = b.flatten(1).norm(dim=1)
    err = torch.where(den > 0, num / den.clamp_min(1e-300), num)
    worst = err.max().item()
    return worst if math.isfinite(worst) else math.inf


class Guard:
    """A kernel checked against the reference the first time it runs each configuration.

    A compile or launch error, or a result beyond ``guard_tolerance``, warns once (the phase,
    the GPU, the Triton version and the error) and sends that phase to the reference for the
    rest of the process; a configuration that passed runs the kernel alone from then on. The
    check reads the difference back (a host sync): on a configuration's first call only.
    """

    failed: dict[str, str] = {}  # phase -> why, process-wide
    trusted: set = set()  # (phase, configuration) that passed
    verdicts: list[dict] = []  # every check made: phase, shapes, status, detail (the report)

    def __init__(self, name: str, kernel, reference, arg: int = 0) -> None:
        self.name, self.kernel, self.reference, self.arg = name, kernel, reference, arg
        self.__name__ = getattr(kernel, "__name__", name)

    @classmethod
    def reset(cls) -> None:
        """Forget every verdict (tests; a process that changed GPU or Triton)."""
        cls.failed.clear()
        cls.trusted.clear()
        cls.verdicts.clear()

    def __call__(self, *args, **kwargs):
        if self.name in Guard.failed:
            return self.reference(*args, **kwargs)
        key = (self.name, _call_key(args, kwargs))
        if key in Guard.trusted:
            return self.kernel(*args, **kwargs)
        shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
        verdict = {"phase": self.name, "shapes": shapes, "dtype": str(args[self.arg].dtype)}
        Guard.verdicts.append(verdict)
        try:
            got = self.kernel(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any failure of the kernel sends it away
            verdict.update(status="error", detail=f"{type(e).__name__}: {e}")
            self._fail(args, verdict["detail"])
            return self.reference(*args, **kwargs)
        want = self.reference(*args, **kwargs)
        err, tol = self._difference(got, want, args)
        verdict.update(error=err, tolerance=tol)
        if not err <= tol:
            verdict.update(status="wrong", detail=f"its result differs from the reference by "
                                                  f"{err:.3g} (relative; the tolerance is "
                                                  f"{tol:.3g})")  # fmt: skip
            self._fail(args, verdict["detail"])
            return want
        verdict["status"] = "ok"
        Guard.trusted.add(key)
        return got

    def _difference(self, got, want, args) -> tuple[float, float]:
        outs, refs = _outputs(got), _outputs(want)
        if self.name == "apply_update":  # the update itself, not the decayed weight
            w, decay = args[0], float(args[6])
            outs = [o - decay * w for o in outs]
            refs = [r - decay * w for r in refs]
        x = args[self.arg]  # the big operand (its width is the reduction length), or a Gram
        small = self.name in ("first_maps", "last_maps", "inv_sqrt")
        tol = guard_tolerance(self.name, x.shape[-2], 0 if small else x.shape[-1])
        if len(outs) != len(refs):
            return math.inf, tol
        err = max((_slice_error(o, r) for o, r in zip(outs, refs) if o.numel()), default=0.0)
        return err, tol

    def _fail(self, args, why: str) -> None:
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        where = (torch.cuda.get_device_name(device) if device is not None
                 and device.type == "cuda" else str(device))  # fmt: skip
        import triton

        message = (f"cm_triton: the {self.name} kernel failed on {where} (Triton "
                   f"{triton.__version__}): {why}. The {self.name} phase runs on the "
                   f"pure-torch reference from now on (backend='triton' would raise).")  # fmt: skip
        Guard.failed[self.name] = why
        logger.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _defaults(device: torch.device) -> dict:
    return DEVICE_DEFAULTS["cuda" if device.type == "cuda" else "cpu"]


def resolve_ns_dtype(ns_dtype: torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """Newton-Schulz iteration dtype: bf16 by default on CUDA, the compute dtype elsewhere."""
    return _defaults(device)["ns_dtype"] if ns_dtype is None else ns_dtype


def resolve_ns_method(ns_method: str | None, device: torch.device) -> str:
    """``ns_method=None`` -> the device's default (``DEVICE_DEFAULTS``)."""
    return _defaults(device)["ns_method"] if ns_method is None else ns_method


def resolve_options(opts: CMOptions, device: torch.device) -> CMOptions:
    """``opts`` with every per-device default made concrete for tensors on ``device``."""
    defaults = _defaults(device)
    return dataclasses.replace(
        opts,
        ns_dtype=resolve_ns_dtype(opts.ns_dtype, device),
        ns_method=resolve_ns_method(opts.ns_method, device),
        inv_root=defaults["inv_root"] if opts.inv_root == "auto" else opts.inv_root,
    )
