"""Pure-torch reference of Compositional Muon: the truth the kernels are tested against."""

from cm_triton.reference.connections import connect
from cm_triton.reference.primitives import (
    apply_root,
    gram,
    gram_inv_sqrt,
    inv_sqrt,
    msign,
    partner_roots,
)
from cm_triton.reference.rule import REFERENCE, Primitives, pair_step

__all__ = [
    "msign",
    "inv_sqrt",
    "gram",
    "gram_inv_sqrt",
    "partner_roots",
    "apply_root",
    "connect",
    "pair_step",
    "Primitives",
    "REFERENCE",
]
