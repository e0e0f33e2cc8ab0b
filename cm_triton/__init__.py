"""cm_triton: Compositional Muon for transformer attention, with fused Triton kernels."""

from cm_triton.discovery import param_groups
from cm_triton.functional import cm_ov, cm_qk
from cm_triton.optim import CompositionalMuon
from cm_triton.options import CMOptions
from cm_triton.schedules import INV_SQRT_NEWTON, INV_SQRT_QUINTIC, MUON_CLASSIC_5, POLAR_EXPRESS_8

__version__ = "0.4.0"

__all__ = [
    "cm_qk",
    "cm_ov",
    "CompositionalMuon",
    "param_groups",
    "CMOptions",
    "POLAR_EXPRESS_8",
    "MUON_CLASSIC_5",
    "INV_SQRT_NEWTON",
    "INV_SQRT_QUINTIC",
    "__version__",
]
