"""Validated variant flags of Compositional Muon (spec §3-§4), as one frozen object."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cm_triton.schedules import POLAR_EXPRESS_8

METHODS = ("half_split", "joint")
WHITENINGS = ("both", "pre", "post", "none")
CONNECTIONS = ("none", "frobenius", "frobenius_scalar", "scale_aware", "scale_aware_scalar")
INV_ROOTS = ("auto", "newton", "quintic", "eigh")
NS_METHODS = ("ns", "gram")
BACKENDS = ("auto", "reference", "triton")
NS_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
GQA_BUDGETS = ("group", "per_query")


def _choice(name: str, value: object, allowed: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _real(name: str, value: object, *, low: float = 0.0, high: float = math.inf, high_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or value > high or (high_open and value == high):
        bound = f"[{low}, {high})" if high_open else f"[{low}, {high}]"
        raise ValueError(f"{name} must lie in {bound}, got {value!r}")


def _flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")


@dataclass(frozen=True)
class CMOptions:
    """Every variant flag of one CM call; validated on construction (spec §4).

    ``ns_method=None``, ``inv_root="auto"`` and ``ns_dtype=None`` are resolved per device by
    ``cm_triton.dispatch.resolve_options`` before any math runs.
    """

    eta: float
    beta: float = 0.95
    nesterov: bool = False
    damping: float = 1e-2
    weight_decay: float = 0.0
    method: str = "half_split"
    isotropic: bool = False
    hybrid: bool = True
    whitening: str = "both"
    connection: str = "none"
    momentum_reproject: bool = False
    per_mat_renorm: bool = False
    ns_coefficients: tuple[tuple[float, float, float], ...] = POLAR_EXPRESS_8
    ns_dtype: torch.dtype | None = None
    ns_method: str | None = None
    ns_restart: int = 3
    inv_root: str = "auto"
    backend: str = "auto"
    gqa_budget: str = "group"

    def __post_init__(self) -> None:
        _real("eta", self.eta)
        _real("beta", self.beta, high=1.0, high_open=True)
        _real("damping", self.damping)
        _real("weight_decay", self.weight_decay)
        for name in ("nesterov", "isotropic", "hybrid", "momentum_reproject", "per_mat_renorm"):
            _flag(name, getattr(self, name))
        _choice("method", self.method, METHODS)
        _choice("whitening", self.whitening, WHITENINGS)
        _choice("connection", self.connection, CONNECTIONS)
        _choice("inv_root", self.inv_root, INV_ROOTS)
        if self.ns_method is not None:
            _choice("ns_method", self.ns_method, NS_METHODS)
        _choice("backend", self.backend, BACKENDS)
        _choice("gqa_budget", self.gqa_budget, GQA_BUDGETS)
        if self.ns_dtype is not None and self.ns_dtype not in NS_DTYPES:
            raise ValueError(f"ns_dtype must be None or one of {NS_DTYPES}, got {self.ns_dtype!r}")
        coeffs = self.ns_coefficients
        try:
            coeffs = tuple(tuple(float(c) for c in step) for step in coeffs)
        except (TypeError, ValueError):
            raise ValueError(
                f"ns_coefficients must be a sequence of (a, b, c) triples, got {coeffs!r}"
            ) from None
        if not coeffs or any(len(s) != 3 or not all(map(math.isfinite, s)) for s in coeffs):
            raise ValueError(
                f"ns_coefficients must be a non-empty sequence of finite (a, b, c) triples, "
                f"got {self.ns_coefficients!r}"
            )
        object.__setattr__(self, "ns_coefficients", coeffs)
        r = self.ns_restart
        if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < len(coeffs):
            raise ValueError(
                f"ns_restart must be an int in [0, {len(coeffs)}) (the step after which the "
                f"Gram iteration restarts; 0: never), got {r!r}"
            )

    @property
    def budget(self) -> float:
        """Step budget b of each factor: 1/2 for half_split, 1 for joint (spec §3)."""
        return 0.5 if self.method == "half_split" else 1.0

    def budgets(self, group_size: int) -> tuple[float, float]:
        """``(b_P, b_S)``: the per-query factor's budget and the shared factor's, under GQA
        with ``group_size`` = G query heads per KV head (spec §1). ``"group"``: both b (the
        summed partner Gram already holds each composite to b); ``"per_query"``: the shared
        factor b / G, as microsoft/dion's port does (more conservative by exactly G)."""
        b = self.budget
        return b, (b / group_size if self.gqa_budget == "per_query" else b)
