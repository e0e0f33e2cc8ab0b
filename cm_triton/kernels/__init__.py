"""Fused Triton kernels: optional accelerators of the reference primitives.

Same names and signatures as ``cm_triton.reference.primitives``; importing this package needs
``triton`` (``cm_triton.dispatch`` only imports it when Triton is available).
"""

from cm_triton.kernels.inv_root import gram_inv_sqrt
from cm_triton.kernels.newton_schulz import msign
from cm_triton.reference.rule import Primitives

KERNELS = Primitives(msign=msign, gram_inv_sqrt=gram_inv_sqrt)

__all__ = ["msign", "gram_inv_sqrt", "KERNELS"]
