"""Deterministic costs of one optimizer step, counted on the CPU (shared by
``tests/test_step_costs.py`` and ``bench/step_costs.py``).

A ``TorchDispatchMode`` sees every aten op a step dispatches and its tensors: the bytes of the
copying ops (each op's inputs and outputs, in units of the model's parameter bytes), the host
reads of tensor values (``_local_scalar_dense``: ``bool()``, ``.item()``, ``.tolist()``; each is
a device sync on CUDA), the number of ops, and the launches: the ops that do device work (not
views, not allocations: on CUDA each launches at least one kernel; a ``_foreach`` op may launch
a few, one per chunk of its list) plus the Triton kernels' launches. Copies that Triton's
interpreter makes of a kernel's arguments (it has no GPU memory to launch in) are not the
package's and are left out.
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from dataclasses import dataclass

import torch
from helpers import kernel_launches, stub_kernels
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from cm_triton.dispatch import triton_available
from cm_triton.tables import FORMED

COPIES = ("stack", "cat", "clone", "copy_", "_foreach_copy_", "_to_copy", "index_select",
          "contiguous")  # fmt: skip
HOST_READS = ("_local_scalar_dense", "nonzero", "equal", "is_nonzero")
# Tensors built from host data (``torch.tensor``, ``torch.as_tensor`` of a list): on CUDA each
# is a host-to-device copy from pageable memory (the stream waits for it), refused while a
# stream is capturing a CUDA graph.
HOST_BUILT = ("lift_fresh", "lift_fresh_copy")
# Ops that launch nothing on CUDA besides views: allocations and metadata.
NO_WORK = ("empty", "empty_like", "empty_strided", "lift_fresh", "_local_scalar_dense",
           "set_", "resize_")  # fmt: skip


def _in_interpreter() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.endswith("triton/runtime/interpreter.py"):
            return True
        frame = frame.f_back
    return False


def _host_to_device(name: str, args: tuple, out) -> bool:
    """A copy from a CPU tensor into a tensor on another device (``.to(device)``,
    ``copy_``): a host-to-device transfer."""
    if name not in ("_to_copy", "copy_") or not args or not isinstance(args[0], torch.Tensor):
        return False
    src = args[1] if name == "copy_" else args[0]
    dst = args[0] if name == "copy_" else out
    return src.device.type == "cpu" and dst.device.type != "cpu"


class StepCounter(TorchDispatchMode):
    """Copy bytes by op, host reads by op, and the op and device-work op counts of what
    runs inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: Counter = Counter()
        self.reads: Counter = Counter()
        self.built: Counter = Counter()  # host-built tensors and host-to-device copies, by op
        self.ops = 0
        self.device_ops = 0  # not views, not allocations (NO_WORK)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in COPIES and _in_interpreter():
            return out
        self.ops += 1
        if not func.is_view and name not in NO_WORK:
            self.device_ops += 1
        if name in HOST_READS:
            self.reads[name] += 1
        if (name in HOST_BUILT or _host_to_device(name, args, out)) and not _in_interpreter():
            self.built[name] += 1
        if name in COPIES:
            leaves = tree_flatten((args, kwargs, out))[0]
            tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
            self.copies[name] += sum(t.numel() * t.element_size() for t in tensors)
        return out


class Attention(nn.Module):
    def __init__(self, d: int, hq: int, hkv: int, dh: int) -> None:
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = hq, hkv, dh
        self.q_proj = nn.Linear(d, hq * dh, bias=False)
        self.k_proj = nn.Linear(d, hkv * dh, bias=False)
        self.v_proj = nn.Linear(d, hkv * dh, bias=False)
        self.o_proj = nn.Linear(hq * dh, d, bias=False)


class Mlp(nn.Module):  # SwiGLU's three matrices
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)


class Layer(nn.Module):
    def __init__(self, d: int, hq: int, hkv: int, dh: int, hidden: int) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(d)
        self.self_attn = Attention(d, hq, hkv, dh)
        self.post_attention_layernorm = nn.RMSNorm(d)
        self.mlp = Mlp(d, hidden)


class Llama(nn.Module):
    """A Llama-shaped model's parameters (no forward: the costs need only gradients): ``n``
    layers of width ``d``, ``hq`` query / ``hkv`` KV heads of ``d // hq``, a SwiGLU MLP of
    ``hidden`` (default 688 d / 256), an embedding and an output head of ``vocab`` rows. The
    defaults are the issue's measurement: 4 layers, d 256, 8/2 heads."""

    def __init__(self, n: int = 4, d: int = 256, vocab: int = 64, hq: int = 8, hkv: int = 2,
                 hidden: int | None = None) -> None:  # fmt: skip
        super().__init__()
        hidden = hidden or 688 * d // 256
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Layer(d, hq, hkv, d // hq, hidden) for _ in range(n))
        self.norm = nn.RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """What torch.optim.Muon steps in a ``Llama``: the 2-D matrices but the embedding and the
    output head (AdamW's)."""
    return [p for n, p in model.named_parameters()
            if p.ndim == 2 and n not in ("embed_tokens.weight", "lm_head.weight")]  # fmt: skip


@dataclass
class Costs:
    copies: float  # copy bytes / parameter bytes
    by_op: dict[str, float]
    reads: int
    built: dict[str, int]  # tensors built from host data / host-to-device copies, by op
    ops: int
    launches: int  # device-work ops plus Triton launches (a CUDA step's launches, at least)
    triton: dict[str, int]  # the Triton launches by kernel (helpers.KERNELS' names)
    optimizer: object = None  # the optimizer that stepped


def _launches():
    """Count the Triton launches (``helpers.kernel_launches``) where triton is installed."""
    return kernel_launches() if triton_available() else contextlib.nullcontext(Counter())


def step_costs(model: nn.Module, make_optimizer, steps_before: int = 1,
               moving_grads: bool = True, stub: bool = False) -> Costs:  # fmt: skip
    """The costs of a steady-state step (after ``steps_before`` steps made the state) of
    ``make_optimizer(model)``, with random gradients: new tensors every step
    (``moving_grads``, as ``zero_grad(set_to_none=True)`` makes them), else written into the
    same tensors (as ``zero_grad(set_to_none=False)`` and ``capturable=True`` keep them).
    ``stub``: the kernels compute nothing (``helpers.stub_kernels``), for real widths."""
    gen = torch.Generator().manual_seed(0)
    opt = make_optimizer(model)
    kernels = stub_kernels() if stub else contextlib.nullcontext()
    with kernels:
        for _ in range(steps_before + 1):
            for p in model.parameters():
                if moving_grads or p.grad is None:
                    p.grad = torch.randn(p.shape, generator=gen)
                else:
                    p.grad.copy_(torch.randn(p.shape, generator=gen))
            if _ < steps_before:
                opt.step()
    counter = StepCounter()
    formed = Counter(FORMED)
    with stub_kernels() if stub else _launches() as launched, counter:
        opt.step()
    # Stacks formed inside LayerRows' own dispatch (the mode cannot see them): counted there.
    counter.copies.update(Counter(FORMED) - formed)
    pbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    by_op = {k: v / pbytes for k, v in counter.copies.items()}
    triton = dict(launched)
    return Costs(sum(by_op.values()), by_op, sum(counter.reads.values()), dict(counter.built),
                 counter.ops,
                 counter.device_ops + sum(triton.values()), triton, opt)  # fmt: skip
