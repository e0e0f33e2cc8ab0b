"""Ahead-of-time compile harness: what would this package launch, and what does it cost on chip?

Without a GPU, ``aot_compile`` makes every ``@triton.jit`` launch made by ordinary Python code
compile for a chosen NVIDIA target instead of running, and records per launch the kernel, its
specialisation, grid and options, the compile time, and the cubin's resource usage (registers,
stack/spill bytes, local and shared memory) read with the ``cuobjdump`` shipped in the Triton
wheel, plus an occupancy estimate for the target::

    import torch
    from cm_triton.aot import aot_compile, format_table
    from cm_triton.kernels import msign

    with aot_compile(target=("cuda", 90), timeout_s=120) as records:
        msign(torch.randn(16, 64, 2048))  # CPU tensors: the launch is compiled, not run
    print(format_table(records))

How (Triton 3.6; file/line references in ``/work/notes/compile/report.md``):

* a stand-in driver is made active (``triton.runtime.driver.set_active``): it reports the target
  (``get_current_target``, also read by ``tl`` code through ``language/target_info.py``), a
  device key of its own (so ``JITFunction.device_caches`` never mixes with a real device) and
  device properties for the target;
* ``knobs.runtime.jit_cache_hook`` receives the exact signature, constexprs, specialisation
  attributes and options ``JITFunction.run`` built from the launch's arguments. The hook compiles
  them itself, in a forked child with a timeout, and returns True, which makes
  ``JITFunction._do_compile`` return None and ``run`` return before the launch. Nothing runs, so
  outputs stay as allocated (uninitialised) and code after the launch goes on;
* ``JITFunction.run`` is wrapped while active only to see the launch grid (and optionally force
  compile options), and ``Autotuner._bench`` so that an autotuned kernel compiles (and records)
  every config once instead of benchmarking it.

Tensor arguments may be CPU (or meta) tensors: Triton's specialisation only reads ``dtype`` and
``data_ptr() % 16``, which CPU tensors answer like CUDA ones for the same layout.
"""

from cm_triton.aot.child import CompileOutcome, compile_with_timeout
from cm_triton.aot.cubin import (
    ResourceUsage,
    cubin_resource_usage,
    dot_kinds,
    narrow_program_offsets,
    parse_ptxas_log,
    parse_res_usage,
)
from cm_triton.aot.harness import DEFAULT_COLUMNS, aot_compile, format_table
from cm_triton.aot.targets import LIMITS, Occupancy, TargetLimits, limits_for, occupancy

__all__ = [
    "TargetLimits",
    "LIMITS",
    "limits_for",
    "Occupancy",
    "occupancy",
    "ResourceUsage",
    "parse_res_usage",
    "cubin_resource_usage",
    "parse_ptxas_log",
    "dot_kinds",
    "narrow_program_offsets",
    "CompileOutcome",
    "compile_with_timeout",
    "aot_compile",
    "format_table",
    "DEFAULT_COLUMNS",
]
