"""Alias of :mod:`cm_triton` under the original release's module name, so that
``from compositional_muon import cm_qk, cm_ov`` keeps working unchanged."""

from cm_triton import *  # noqa: F401,F403
from cm_triton import __all__, __version__  # noqa: F401
