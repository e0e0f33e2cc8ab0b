"""Fused Triton kernels: optional accelerators of the reference primitives.

Same names and signatures as ``cm_triton.reference.primitives``; importing this package needs
``triton`` (``cm_triton.dispatch`` only imports it when Triton is available).
"""

from torch import Tensor

from cm_triton.kernels.inv_root import gram_inv_sqrt
from cm_triton.kernels.newton_schulz import msign
from cm_triton.reference import legs
from cm_triton.reference.rule import Primitives


def partner_roots(p: Tensor, s: Tensor, damping: float, method: str = "newton"):
    """``reference.partner_roots`` through the fused Gram + inverse-root kernel.

    Shapes: ``p (B, Hq, dh, d_p), s (B, Hkv, dh, d_s) -> r_s, r_p (B, Hkv, dh, dh)``; groups
    never straddle a batch entry, so B folds into the heads.
    """
    b, hkv = s.shape[:2]
    r_s, _ = gram_inv_sqrt(s.flatten(0, 1), damping, 1, method)
    r_p, _ = gram_inv_sqrt(p.flatten(0, 1), damping, p.shape[1] // hkv, method)
    return r_s.unflatten(0, (b, hkv)), r_p.unflatten(0, (b, hkv))


KERNELS = Primitives(roots=partner_roots, whitened_sign=legs.whitened_sign, msign=msign)

__all__ = ["msign", "gram_inv_sqrt", "partner_roots", "KERNELS"]
