"""The one place that chooses a backend for the accelerable primitives (spec §5)."""

from __future__ import annotations

import importlib.util
import os

import torch

from cm_triton.reference.rule import REFERENCE, Primitives

__all__ = ["triton_available", "interpreting", "resolve_primitives", "resolve_ns_dtype"]


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


def resolve_ns_dtype(ns_dtype: torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """Newton-Schulz iteration dtype: bf16 by default on CUDA, the compute dtype elsewhere."""
    if ns_dtype is None and device.type == "cuda":
        return torch.bfloat16
    return ns_dtype
