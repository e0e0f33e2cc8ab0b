"""The one place that chooses a backend and the per-device defaults (spec §2.1, §5)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import torch

from cm_triton.cost_model import use_kernel
from cm_triton.options import CMOptions
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
    from cm_triton.kernels import KERNELS

    return KERNELS


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
