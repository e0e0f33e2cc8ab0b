"""Small builders shared by the tests."""

from __future__ import annotations

import collections
import contextlib
import importlib
import importlib.util
import itertools
import os

import pytest
import torch

IN_CI = os.environ.get("CI") == "true"


def optional(module: str):
    """Import an optional test dependency (transformers, timm, peft, accelerate, lightning,
    triton): without it the calling module's tests are skipped, except in CI (``CI=true``),
    where a missing one fails the run instead of silently testing less."""
    if IN_CI:
        return importlib.import_module(module)
    return pytest.importorskip(module)


def needs(module: str) -> pytest.MarkDecorator:
    """``pytestmark`` for tests that need ``module``: skipped without it, except in CI, where
    collecting them fails."""
    if importlib.util.find_spec(module) is None and IN_CI:
        raise ImportError(f"{module} is a test dependency CI must have (CI=true)")
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"{module} is not installed")  # fmt: skip


FLAG_AXES = {
    "method": ("half_split", "joint"),
    "isotropic": (False, True),
    "whitening": ("both", "pre", "post", "none"),
    "connection": ("none", "frobenius", "frobenius_scalar", "scale_aware", "scale_aware_scalar"),
    "momentum_reproject": (False, True),
    "per_mat_renorm": (False, True),
}


def flag_product(ov: bool = False):
    """Every combination of the variant flags (spec §4), as kwargs dicts."""
    axes = dict(FLAG_AXES, **({"hybrid": (True, False)} if ov else {}))
    for values in itertools.product(*axes.values()):
        yield dict(zip(axes, values))


def flag_id(flags: dict) -> str:
    return "-".join(f"{v}" if not isinstance(v, bool) else (k if v else f"no_{k}")
                    for k, v in flags.items())  # fmt: skip


def qk_tensors(hq, hkv, dh, d, dtype=torch.float64, device="cpu", momentum=True):
    """(q_w, k_w, q_grad, k_grad, m_q, m_k) with nonzero momentum so reprojection matters."""
    g = torch.Generator().manual_seed(1000 * hq + 100 * hkv + dh + d)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)

    q, k = r(hq * dh, d), r(hkv * dh, d)
    gq, gk = r(hq * dh, d), r(hkv * dh, d)
    mq = r(hq * dh, d) if momentum else torch.zeros_like(q)
    mk = r(hkv * dh, d) if momentum else torch.zeros_like(k)
    return q, k, gq, gk, mq, mk


def ov_tensors(hq, hkv, dh, d, dtype=torch.float64, device="cpu", momentum=True):
    """(v_w, o_w, v_grad, o_grad, m_v, m_o)."""
    q, k, gq, gk, mq, mk = qk_tensors(hq, hkv, dh, d, dtype, device, momentum)
    return k, q.T.contiguous(), gk, gq.T.contiguous(), mk, mq.T.contiguous()


def clones(ts):
    return [t.clone() for t in ts]


KERNELS = {
    "gram": ("streaming", "_gram_kernel"),
    "map": ("streaming", "_map_kernel"),
    "maps": ("algebra", "_maps_kernel"),
    "inv_sqrt": ("algebra", "_inv_sqrt_kernel"),
}


@contextlib.contextmanager
def _kernels_replaced(wrap):
    """Within it, each kernel of ``KERNELS`` is ``wrap(name, kernel)`` (restored after)."""
    import importlib

    saved = []
    for name, (mod, attr) in KERNELS.items():
        module = importlib.import_module(f"cm_triton.kernels.{mod}")
        saved.append((module, attr, getattr(module, attr)))
        setattr(module, attr, wrap(name, getattr(module, attr)))
    try:
        yield
    finally:
        for module, attr, fn in saved:
            setattr(module, attr, fn)


@contextlib.contextmanager
def kernel_launches():
    """Count the launches of each Triton kernel of ``cm_triton.kernels`` inside the block:
    yields a Counter keyed by ``KERNELS``' names (``gram``: the stream and an explicit sign's
    Grams; ``map``: the apply, the restart and the forming pass; ``maps``/``inv_sqrt``: the
    dh x dh algebra)."""
    counts: collections.Counter = collections.Counter()

    class Counted:
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            counts[self.name] += 1
            return self.fn[grid]

    with _kernels_replaced(Counted):
        yield counts


# Each kernel's outputs, by argument name, and when they are written (the constexprs).
STUB_OUTPUTS = {
    "gram": lambda kw: ("gram_ptr",) + (("mo_ptr",) if kw.get("WRITE_M") else ()),
    "map": lambda kw: ("gram_ptr",) if kw.get("MODE") == 1 else ("wo_ptr",),
    "maps": lambda kw: ("t_ptr", "r_ptr", "scratch_ptr"),
    "inv_sqrt": lambda kw: ("z_ptr", "scratch_ptr"),
}


@contextlib.contextmanager
def stub_kernels():
    """Within it, the Triton kernels compute nothing: a launch zero-fills its outputs (outside
    any dispatch mode, so a step counter sees none of it) and is counted; every torch op
    around the launches is the kernel path's own. For counting a step's costs at widths the
    interpreter is too slow for: its values are zeros, its copies, reads and ops are real.
    Yields the launch Counter, as ``kernel_launches``."""
    from torch.utils._python_dispatch import _disable_current_modes

    counts: collections.Counter = collections.Counter()

    class Stub:
        def __init__(self, name, fn):
            self.name, self.names = name, fn.arg_names

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                counts[self.name] += 1
                bound = dict(zip(self.names, args), **kwargs)
                with _disable_current_modes(), torch.no_grad():
                    for out in STUB_OUTPUTS[self.name](kwargs):
                        bound[out].zero_()

            return launch

    with _kernels_replaced(Stub):
        yield counts


def compare_steps(fn, make, shape, kw_a: dict, kw_b: dict, rtol: float,
                  dtype=torch.float32, device="cpu") -> None:  # fmt: skip
    """Call ``fn`` (cm_qk / cm_ov) on two copies of ``make``'s tensors with ``kw_a`` and
    ``kw_b``; both steps of the weights and both new momentum buffers must agree to ``rtol``
    (relative Frobenius; a zero reference step must stay exactly zero)."""
    hq, hkv, dh, d = shape
    ts = make(hq, hkv, dh, d, dtype=dtype, device=device)
    a, b = clones(ts), clones(ts)
    fn(*a, head_dim=dh, eta=0.1, **kw_a)
    fn(*b, head_dim=dh, eta=0.1, **kw_b)
    for i in (0, 1, 4, 5):
        step_a, step_b = (a[i] - ts[i]).double(), (b[i] - ts[i]).double()
        if step_b.norm() == 0:
            assert step_a.norm() == 0, i
        else:
            assert (step_a - step_b).norm() / step_b.norm() < rtol, i


def spectrum_slices(kind: str, b: int, m: int, n: int, seed: int = 0) -> torch.Tensor:
    """``(b, m, n)`` float64 slices with a prescribed singular spectrum: ``"gaussian"``,
    ``"cond1e2"`` (log-spaced from 1 to 1e-2; likewise 1e4, 1e6) or ``"rank_half"``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, m, n, generator=g, dtype=torch.float64)
    if kind == "gaussian":
        return x
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    if kind == "rank_half":
        s = torch.cat([torch.ones(m // 2), torch.zeros(m - m // 2)]).double()
    else:
        cond = float(kind.removeprefix("cond"))
        s = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), m, dtype=torch.float64)
    return (u * s) @ vh
