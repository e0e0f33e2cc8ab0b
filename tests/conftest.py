import os

# The kernels run on the CPU through Triton's interpreter; it must be on before triton.jit runs.
os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses  # noqa: E402
import inspect  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

try:  # the interpreter checks every int32 add and mul of index arithmetic for overflow
    from triton.runtime import interpreter as _interpreter
except ImportError:  # no triton: the kernel tests skip themselves
    _interpreter = None


def _patch_device_calls_once() -> None:
    """Speed of the kernel tests: Triton's interpreter re-patches ``triton.language`` (a scan
    of its members, ~0.15 ms) at every call of a ``@triton.jit`` helper inside a kernel, which
    the launch itself already patched: ~30% of the flag products' time. The kernels' helpers
    live in the kernels' own modules, with the launch's ``tl``, so their calls skip it (Triton's
    own helpers, which read ``triton.language.core``, keep it).
    Applied only where Triton's ``InterpretedFunction.__call__`` is the one this was written
    against (3.6, 3.9: patch, rewrite, call); otherwise the interpreter is left as it is."""
    cls = getattr(_interpreter, "InterpretedFunction", None)
    call = vars(cls).get("__call__") if cls is not None else None
    if call is None or "_patch_lang(self.fn)" not in inspect.getsource(call):
        return

    def device_call(self, *args, **kwargs):
        if not self.fn.__module__.startswith("cm_triton."):  # triton.language's own helpers
            return call(self, *args, **kwargs)  # see triton.language.core: patched apart
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise _interpreter.InterpreterError(repr(e)) from e

    cls.__call__ = device_call


if _interpreter is not None and os.environ["TRITON_INTERPRET"] == "1":
    _patch_device_calls_once()


@pytest.fixture
def no_overflow_check():
    """The interpreter's int32 overflow check off for one test: the kernels' flag products,
    where it is 40% of the interpreter's time and cannot fire. What it guards is covered
    elsewhere: every offset made from a program id (a batch entry's, a head's, a scratch
    block's) is int64, which the compile gate reads in each kernel's TTIR
    (``cm_triton.aot.narrow_program_offsets``); what stays int32 is one tile's offsets inside one
    head, bounded at launch (``kernels.common.tile_extent``); the other kernel tests run with
    the check on, on the same kernels."""
    if _interpreter is None or os.environ["TRITON_INTERPRET"] != "1":
        yield
        return
    builder = _interpreter.interpreter_builder
    saved = builder.options
    builder.options = dataclasses.replace(saved, sanitize_overflow=False)
    try:
        yield
    finally:
        builder.options = saved


# Under pytest-xdist (the README's ``-n auto``) each worker takes its share of the cores, so
# that torch's threads do not oversubscribe them.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
