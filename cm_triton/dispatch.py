"""The one place that chooses: the backend, kernel or torch per phase, and the per-device
defaults (spec §2.1, §5).

``resolve_primitives`` maps ``backend`` and a device to a ``Primitives``. For the Triton
backend each phase of ``reference.phases.PhaseOps`` runs its kernel where the kernel takes the
tensors (``kernels.streams_take`` / ``maps_take``: dtype, and heads up to ``MAX_HEAD_DIM`` for
the dh x dh algebra) and, on CUDA, where the cost model expects it to win
(``cost_model.use_kernel``); otherwise the reference's. The kernels themselves never choose.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os

import torch

from cm_triton.cost_model import use_kernel
from cm_triton.options import CMOptions
from cm_triton.reference.phases import REFERENCE_PHASES, PhaseOps
from cm_triton.reference.rule import REFERENCE, Primitives

__all__ = [
    "use_kernel",
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


def resolve_primitives(backend: str, device: torch.device) -> Primitives:
    """Map ``backend`` ("auto" | "reference" | "triton") and a device to primitives.

    "auto": Triton kernels for CUDA tensors when Triton imports, the reference otherwise.
    "triton": the kernels, or a RuntimeError saying why they cannot run here.
    """
    if backend == "reference":
        return REFERENCE
    usable = triton_available() and (device.type == "cuda" or interpreting())
    if backend == "auto":
        if not (usable and device.type == "cuda"):
            return REFERENCE
    elif not triton_available():
        raise RuntimeError("backend='triton' needs the triton package, which is not installed")
    elif not usable:
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before cm_triton "
            f"is imported to run the kernels on the CPU; got tensors on {device}"
        )
    return _triton_primitives()


@functools.cache
def _triton_primitives() -> Primitives:
    """The Triton backend: per phase, the kernel where it takes the call, else the reference
    (built once)."""
    from cm_triton import kernels as k

    ref = REFERENCE_PHASES

    def pick(phase, kernel, reference, arg, takes, dims):
        def run(*args, **kwargs):
            x = args[arg]
            if takes(x, *args) and use_kernel(phase, *dims(x), x.device):
                return kernel(*args, **kwargs)
            return reference(*args, **kwargs)

        run.__name__ = run.__qualname__ = kernel.__name__
        run.__doc__ = kernel.__doc__
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
        stream=pick("stream", k.stream, ref.stream, 0, big, heads),
        stream_grams=pick("stream", k.stream_grams, ref.stream_grams, 0, big, heads),
        cross_grams=pick("stream", k.cross_grams, ref.cross_grams, 0, big, heads),
        first_maps=pick("maps", k.first_maps, ref.first_maps, 0, small, mats),
        restart_gram=pick("restart", k.restart_gram, ref.restart_gram, 2, big, heads),
        last_maps=pick("maps", k.last_maps, ref.last_maps, 0, small, mats),
        apply_update=pick("apply", k.apply_update, ref.apply_update, 0, big, heads),
        inv_sqrt=pick("inv_sqrt", k.inv_sqrt, ref.inv_sqrt, 0, quintic, mats),
        bytes_bound=True,
    )
    return Primitives(msign=REFERENCE.msign, phases=ops, in_place=True)


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
