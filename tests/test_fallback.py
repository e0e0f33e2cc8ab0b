"""A first step that cannot fail the user (``dispatch.Guard``): on CUDA under
``backend="auto"`` each kernel phase is checked against the reference the first time it runs a
configuration; a kernel that fails to compile or launch, or computes something else, warns
once (naming the phase) and that phase runs on the reference from then on.

"auto" guards only on CUDA; here the guarded primitives are built directly
(``dispatch.build_primitives(kernels, guarded=True)``) and run through Triton's interpreter,
with a failing or a wrong kernel injected in place of a real one.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from helpers import kernel_launches, needs, qk_tensors

from cm_triton.dispatch import Guard, build_primitives, resolve_primitives
from cm_triton.options import CMOptions
from cm_triton.reference import REFERENCE
from cm_triton.reference.rule import pair_step

pytestmark = needs("triton")

PHASES = ("stream", "stream_grams", "cross_grams", "first_maps", "restart_gram", "last_maps",
          "apply_update", "inv_sqrt")  # fmt: skip


@pytest.fixture(autouse=True)
def _fresh_verdicts():
    Guard.reset()
    yield
    Guard.reset()


def _kernels():
    from cm_triton.kernels import KERNEL_PHASES

    return KERNEL_PHASES


def _failing(name):
    def launch(*args, **kwargs):
        raise RuntimeError(f"injected: out of resources in {name}")

    return launch


def _wrong(fn):
    def run(*args, **kwargs):  # the kernel's own result, 1% off
        out = fn(*args, **kwargs)
        return [x * 1.01 for x in out] if isinstance(out, tuple) else out * 1.01

    return run


def _pair(prims, hybrid=False, **flags):
    """One CM step of a GQA pair (4 query heads, 2 KV heads of 16, width 48) on ``prims``."""
    q, k, gq, gk, mq, mk = qk_tensors(4, 2, 16, 48, dtype=torch.float32)
    heads = [x.unflatten(0, (-1, 16))[None] for x in (q, k, gq, gk, mq, mk)]
    opts = CMOptions(eta=0.1, ns_method="gram", inv_root="quintic", **flags)
    return pair_step(*heads, opts, hybrid, prims)


def test_every_kernel_failing_gives_the_reference_step_bit_for_bit():
    # Each phase's kernel raises (a compile error, an out-of-resources launch, a grid too
    # large): every phase warns once, naming itself, and the step is the reference's.
    broken = dataclasses.replace(_kernels(), **{n: _failing(n) for n in PHASES})
    with pytest.warns(RuntimeWarning) as caught:
        got = _pair(build_primitives(broken, guarded=True))
    want = _pair(REFERENCE)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    named = {n for n in PHASES for w in caught if f"the {n} kernel failed" in str(w.message)}
    assert {"stream", "first_maps", "restart_gram", "last_maps", "apply_update",
            "inv_sqrt"} <= named, [str(w.message) for w in caught]  # fmt: skip
    assert all("injected: out of resources" in str(w.message) for w in caught)


def test_a_wrong_kernel_is_caught_and_its_phase_runs_on_the_reference():
    # The apply kernel computes a 1% wrong update: beyond its tolerance (an O(1e-5) bound
    # here), so the apply phase moves to the reference; the others stay kernels. The step
    # then equals kernels-with-the-reference's-apply bit for bit, and the next step warns no
    # more and launches no apply kernel.
    kernels = _kernels()
    wrong = dataclasses.replace(kernels, apply_update=_wrong(kernels.apply_update))
    guarded = build_primitives(wrong, guarded=True)
    with pytest.warns(RuntimeWarning, match="the apply_update kernel failed .* differs from the"):
        got = _pair(guarded)
    mixed = build_primitives(dataclasses.replace(kernels, apply_update=REFERENCE.phases.
                                                 apply_update))  # fmt: skip
    want = _pair(mixed)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert set(Guard.failed) == {"apply_update"}
    with warnings.catch_warnings(), kernel_launches() as n:
        warnings.simplefilter("error", RuntimeWarning)  # a guard warning would fail
        again = _pair(guarded)
    assert all(torch.equal(a, b) for a, b in zip(again, want))
    with kernel_launches() as every:
        _pair(build_primitives(kernels))
    # The map kernel serves the restart and the apply pass: two legs' applies are gone.
    assert n["map"] == every["map"] - 2 and n["gram"] == every["gram"], (dict(n), dict(every))


def test_correct_kernels_pass_the_check_and_then_run_alone():
    # Real kernels: no warning, the kernels' own result (bit for bit the unguarded backend's),
    # and a configuration checked once: the second step computes no reference.
    plain = build_primitives(_kernels())
    guarded = build_primitives(_kernels(), guarded=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a guard warning would fail
        first = _pair(guarded, hybrid=True)
        second = _pair(guarded, hybrid=True)
    want = _pair(plain, hybrid=True)
    assert all(torch.equal(a, b) for a, b in zip(first, want))
    assert all(torch.equal(a, b) for a, b in zip(second, want))
    assert not Guard.failed and len(Guard.trusted) >= 5


def test_backend_triton_raises_instead():
    broken = dataclasses.replace(_kernels(), stream=_failing("stream"))
    with pytest.raises(RuntimeError, match="injected"):
        _pair(build_primitives(broken))


def test_rocm_uses_the_reference_unless_asked(monkeypatch):
    # A ROCm build of torch calls its AMD GPUs "cuda"; the kernels (tf32x3 dots) are built
    # for NVIDIA: "auto" keeps the reference there.
    monkeypatch.setattr(torch.version, "hip", "6.2.0", raising=False)
    assert resolve_primitives("auto", torch.device("cuda")) is REFERENCE
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    assert resolve_primitives("reference", torch.device("cuda")) is REFERENCE
