"""Layer tables: a batch's per-layer tensors read where they live, without a stack.

A ``LayerRows`` stands for the ``(L, *shape)`` stack of L equal-strided tensors (a batch's
weights or gradients) without forming it. The kernels read entry ``l`` at ``first + offsets[l]``
(``offsets``: element distances from layer 0, a small int64 table on the device owned by the
plan, ``OffsetTable``, as a grouped GEMM's pointer table), so nothing is stacked. Everything
else sees an ordinary tensor:

- view ops that keep the layer axis (``unsqueeze``, ``transpose``, ``permute``, ``view``,
  ``slice``, ``select`` of a later axis) give a ``LayerRows`` again, taken on layer 0 (the
  other layers share its strides, so their offsets are unchanged): a few ops whatever ``L``;
- any other op sees the stack, formed once (``materialize``) and in the reported dtype: the
  reference path's arithmetic, and its copy, exactly as if the engine had stacked.

So a phase that a kernel takes reads the layers in place, and one that it does not still
computes the same values (``tests/test_tables.py``). Plumbing only: no math here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

__all__ = ["LayerRows", "layer_rows", "OffsetTable", "stride_offsets", "device_constant", "FORMED"]

aten = torch.ops.aten

# Device tables are never built from host data inside a step: on CUDA that is a host-to-device
# copy from pageable memory (the stream waits for it) and a CUDA graph refuses it while
# capturing. So a table is either made once and kept for the life of the process (constants,
# stride offsets: bounded by the distinct schedules and shapes a process uses, never freed, so
# a plan or a captured graph can always point to it), or written on the device with its values
# as kernel arguments (``OffsetTable``: a plan's per-operand layer offsets).
_CONSTANTS: dict[tuple, Tensor] = {}
_STRIDES: dict[tuple, Tensor] = {}
# Bytes (inputs and outputs) of the stacks formed for ops the kernels did not take, by op: a
# dispatch mode does not see them (they run inside this subclass's dispatch), so counters of
# a step's copies (tests/step_costs.py) add these.
FORMED: Counter = Counter()


def device_constant(values: Sequence, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``values`` (numbers, or tuples of them, flattened) as a 1-D ``dtype`` tensor on
    ``device``: built once per distinct table and device (the first call copies it from the
    host), then the same tensor for the life of the process (a kernel's coefficient schedule
    or pair list)."""
    flat = tuple(v for x in values for v in (x if isinstance(x, (tuple, list)) else (x,)))
    key = (torch.device(device), dtype, flat)
    table = _CONSTANTS.get(key)
    if table is None:
        table = _CONSTANTS[key] = torch.tensor(flat, dtype=dtype, device=device)
    return table


def stride_offsets(device: torch.device, count: int, stride: int) -> Tensor:
    """``(count,)`` int64 ``[0, stride, 2 stride, ...]`` on ``device`` (a stacked operand's batch
    entries): made on the device (``arange``, no host data), once per distinct table, kept."""
    key = (torch.device(device), count, stride)
    table = _STRIDES.get(key)
    if table is None:
        table = _STRIDES[key] = torch.arange(count, dtype=torch.int64, device=device) * stride
    return table


class OffsetTable:
    """One operand's layer offsets on the device, owned by a plan (``engine.Batch``): the
    same tensor every step, rewritten only when the layers moved (gradients set to None and
    made anew may land elsewhere), and then on the device with the offsets as the arguments
    of one ``_foreach_add_`` (scalars travel in the kernel's arguments: no host-to-device copy,
    no sync, legal while a CUDA graph captures). Its address never changes while the plan
    lives, so a captured graph that reads it stays valid as long as the layers stay put (as
    ``capturable=True`` asks)."""

    def __init__(self) -> None:
        self.values: tuple[int, ...] | None = None
        self.table: Tensor | None = None
        self.writes = 0  # how often the layers moved (and the table was rewritten)

    def __call__(self, device: torch.device, offsets: tuple[int, ...]) -> Tensor:
        t = self.table
        if t is None or t.device != device or t.numel() != len(offsets):
            t = self.table = torch.zeros(len(offsets), dtype=torch.int64, device=device)
            self.values = (0,) * len(offsets)
        if offsets != self.values:
            torch._foreach_add_(list(t.zero_().unbind(0)), list(offsets))
            self.values = offsets
            self.writes += 1
        return t


def _dim(d: int, n: int) -> int:
    return d + n if d < 0 else d


def _keeps_layers(func, args) -> bool:
    """Whether a view op leaves the layer axis (0) as it is."""
    x, n = args[0], args[0].dim()
    if func in (aten.alias.default, aten.detach.default):
        return True
    if func is aten.unsqueeze.default:
        return _dim(args[1], n + 1) != 0
    if func is aten.transpose.int:
        return _dim(args[1], n) != 0 and _dim(args[2], n) != 0
    if func is aten.permute.default:
        return _dim(args[1][0], n) == 0
    if func in (aten.view.default, aten._unsafe_view.default):
        return len(args[1]) > 0 and args[1][0] == x.shape[0]
    if func in (aten.slice.Tensor, aten.select.int):
        return _dim(args[1] if len(args) > 1 else 0, n) != 0
    return False


def _on_one(func, args) -> tuple:
    """The op's arguments for layer 0 alone (a ``(1, ...)`` tensor)."""
    if func in (aten.view.default, aten._unsafe_view.default):
        return (1, *args[1][1:]), *args[2:]
    return tuple(args[1:])


def _apply(func, t: Tensor, rest: tuple):
    """``func(t, *rest)``; a ``view`` as ``reshape`` (the wrapper reports contiguous strides,
    so reshape asked for a view the formed stack's strides may not allow)."""
    if func in (aten.view.default, aten._unsafe_view.default):
        return t.reshape(rest[0])
    return func(t, *rest)


def _same_storage(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class LayerRows(torch.Tensor):
    """``(L, *shape)``: entry ``l`` is ``view(layers[l])`` for L equal-strided layers.

    ``first`` is layer 0's entry (a view of it: the kernels' pointer and strides), ``offsets``
    each entry's element distance from it; ``dtype`` the dtype the stack is reported and
    formed in (the compute dtype; the layers may be narrower: the kernels convert on load).
    """

    _layers: tuple[Tensor, ...]
    _view: Callable[[Tensor], Tensor]
    first: Tensor
    offsets: Tensor
    aligned: bool

    @staticmethod
    def __new__(cls, layers, view, first, offsets, aligned, dtype, formed=None):
        out = torch.Tensor._make_wrapper_subclass(
            cls, (len(layers), *first.shape), dtype=dtype, device=first.device
        )
        out._layers, out._view, out.first, out.offsets = tuple(layers), view, first, offsets
        out.aligned = aligned  # every entry a whole number of 16 bytes from entry 0
        out._formed = [] if formed is None else formed  # the stack, shared by derived views
        return out

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self) -> str:  # the default repr would format (materialize) the values
        shape, n = tuple(self.shape), len(self._layers)
        return f"LayerRows(shape={shape}, dtype={self.dtype}, layers={n})"

    @property
    def layers(self) -> list[Tensor]:
        """The L stored tensors (as gathered, before any view)."""
        return list(self._layers)

    def materialize(self) -> Tensor:
        """The stack itself, in the reported dtype: formed once per gathered set of layers
        (shared with every view taken of it) and its bytes counted in ``FORMED``."""
        if not self._formed:
            stack = torch.stack(self._layers)
            FORMED["stack"] += 2 * stack.numel() * stack.element_size()  # read and write
            self._formed.append(stack)
        out = self._view(self._formed[0])
        if out.dtype != self.dtype:
            FORMED["_to_copy"] += out.numel() * (out.element_size() + self.itemsize)
        return out.to(self.dtype)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        x = args[0] if args else None
        if isinstance(x, LayerRows) and not kwargs and _keeps_layers(func, args):
            try:
                one = func(x.first.unsqueeze(0), *_on_one(func, args))
            except RuntimeError:  # not a view of these strides: the stack below
                one = None
            if one is not None and _same_storage(one, x.first):
                rest, prev = tuple(args[1:]), x._view

                def view(stack: Tensor, func=func, rest=rest, prev=prev) -> Tensor:
                    return _apply(func, prev(stack), rest)

                return LayerRows(x._layers, view, one[0], x.offsets, x.aligned, x.dtype,
                                 x._formed)  # fmt: skip

        def unwrap(t):
            return t.materialize() if isinstance(t, LayerRows) else t

        args, kwargs = pytree.tree_map(unwrap, (args, kwargs))
        if kwargs:
            return func(*args, **kwargs)
        return _apply(func, args[0], tuple(args[1:]))


def layer_rows(
    layers: Sequence[Tensor], dtype: torch.dtype, table: OffsetTable
) -> LayerRows | None:
    """``layers`` (L equal-shaped tensors) as a ``LayerRows`` reported in ``dtype``, its offsets
    in ``table``, or None where they cannot be read through one table (different strides,
    dtypes or devices)."""
    first = layers[0]
    if any(t.stride() != first.stride() or t.dtype != first.dtype or t.device != first.device
           or t.shape != first.shape for t in layers):  # fmt: skip
        return None
    size = first.element_size()
    deltas = [t.data_ptr() - first.data_ptr() for t in layers]  # bytes from layer 0
    if any(d % size for d in deltas):
        return None
    aligned = all(d % 16 == 0 for d in deltas)
    offsets = table(first.device, tuple(d // size for d in deltas))
    return LayerRows(layers, lambda stack: stack, first, offsets, aligned, dtype)
