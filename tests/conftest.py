import os

# The kernels run on the CPU through Triton's interpreter; it must be on before triton.jit runs.
os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

try:  # the interpreter checks every int32 add and mul of index arithmetic for overflow
    from triton.runtime import interpreter as _interpreter
except ImportError:  # no triton: the kernel tests skip themselves
    _interpreter = None
if _interpreter is not None and os.environ["TRITON_INTERPRET"] == "1":
    # Off for the tests: their tensors are a few thousand elements, so no int32 index can come
    # near 2^31 and the check can never fire, yet it is 40% of the interpreter's time on the
    # kernel flag product. Compiled kernels check overflow only under debug, as now here; the
    # kernels' large-size offsets are int64 (tables.py), which the check skips anyway.
    _builder = _interpreter.interpreter_builder
    _builder.options = dataclasses.replace(_builder.options, sanitize_overflow=False)

# Under pytest-xdist (the README's ``-n auto``) each worker takes its share of the cores, so
# that torch's threads do not oversubscribe them.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
