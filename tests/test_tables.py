"""Layer tables (``cm_triton.tables``): a batch's layers read where they live.

The kernels read a ``LayerRows`` through its offsets (no stack); every other op sees the stack,
formed once and counted. A step on the kernels' backend reads the weights and gradients in
place and equals the reference step.
"""

from __future__ import annotations

import pytest
import torch
from step_costs import Llama

from cm_triton import CompositionalMuon, param_groups
from cm_triton.tables import FORMED, LayerRows, OffsetTable, layer_rows


def _layers(n=3, shape=(12, 8)):
    return [torch.randn(*shape) for _ in range(n)]


def _heads(x: torch.Tensor) -> torch.Tensor:  # (L, 12, 8) -> (L, 1, 3, 8, 4): a chain of views
    return x.unflatten(1, (3, 4)).transpose(-1, -2).unsqueeze(1)


def test_views_keep_reading_the_layers_in_place():
    layers = _layers()
    rows = layer_rows(layers, torch.float32, OffsetTable())
    before = FORMED["stack"]
    v = _heads(rows)
    assert isinstance(v, LayerRows) and FORMED["stack"] == before  # nothing formed
    assert v.first.untyped_storage().data_ptr() == layers[0].untyped_storage().data_ptr()
    assert torch.equal(v.offsets, rows.offsets)
    assert torch.equal(v.materialize(), _heads(torch.stack(layers)))
    # each entry is at first + offsets[l] (in elements), with first's strides
    size = layers[0].element_size()
    for layer, off in zip(layers, v.offsets.tolist()):
        assert layer.data_ptr() - layers[0].data_ptr() == off * size


def test_any_other_op_sees_the_stack_formed_once():
    layers = _layers()
    rows = layer_rows(layers, torch.float32, OffsetTable())
    stack = torch.stack(layers)
    before = FORMED["stack"]
    a = _heads(rows) * 2
    b = rows.sum(-1)
    assert type(a) is torch.Tensor and torch.equal(a, _heads(stack) * 2)
    assert torch.equal(b, stack.sum(-1))
    # one stack for both ops (views share it): its bytes read and written
    assert FORMED["stack"] - before == 2 * stack.numel() * stack.element_size()


def test_a_narrower_dtype_is_formed_in_the_reported_one():
    layers = [x.to(torch.bfloat16) for x in _layers()]
    rows = layer_rows(layers, torch.float32, OffsetTable())
    assert rows.dtype == torch.float32 and rows.first.dtype == torch.bfloat16
    assert torch.equal(rows + 0, torch.stack(layers).float())


def test_layers_of_other_strides_are_not_tabled():
    a, b = _layers(2, (8, 8))
    assert layer_rows([a, b.mT], torch.float32, OffsetTable()) is None
    assert layer_rows([a, b.double()], torch.float32, OffsetTable()) is None
    assert layer_rows([a, b], torch.float32, OffsetTable()) is not None


def test_the_kernels_read_layer_rows_as_they_read_the_stack():
    # The same kernel, the same arithmetic: bit-equal whether it reads the stack or the layers.
    from cm_triton.kernels import streaming

    torch.manual_seed(0)
    ws, gs = _layers(3, (32, 40)), _layers(3, (32, 40))
    m = torch.randn(3, 2, 16, 40)

    def heads(x):
        return x.unflatten(1, (2, 16))

    rows_w, rows_g = (
        heads(layer_rows(ws, torch.float32, OffsetTable())),
        heads(layer_rows(gs, torch.float32, OffsetTable())),
    )
    stack_w, stack_g = heads(torch.stack(ws)), heads(torch.stack(gs))
    m_a, grams_a = streaming.stream_grams(rows_w, rows_g, m, 0.9, True, ("ww", "dd", "wd"))
    m_b, grams_b = streaming.stream_grams(stack_w, stack_g, m, 0.9, True, ("ww", "dd", "wd"))
    assert torch.equal(m_a, m_b)
    for k in grams_a:
        assert torch.equal(grams_a[k], grams_b[k])
    t = torch.randn(3, 2, 16, 16)
    a = streaming.apply_update(rows_w, t, rows_g, m_a, 0.9, True, 0.99, 0.1)
    b = streaming.apply_update(stack_w, t, stack_g, m_b, 0.9, True, 0.99, 0.1)
    assert torch.equal(a, b)


def _train(backend: str, dtype=torch.float32, steps=3, **kw):
    torch.manual_seed(0)
    model = Llama(n=2, d=64, hq=4, hkv=2).to(dtype)  # dh 16; SwiGLU 172 wide: Muon's Gram form
    opt = CompositionalMuon(param_groups(model), lr=0.02, backend=backend, **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        opt.step()
    return [p.detach().float() for p in model.parameters()], opt


@pytest.mark.usefixtures("no_overflow_check")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_step_on_the_kernels_equals_the_reference(dtype):
    # fp32: the kernels and torch sum in different orders (rounding ~1e-7 relative, then
    # amplified through the Newton-Schulz polynomial's steps): 1e-4 as the kernel parity tests
    # (test_kernels.FP32_RTOL). bf16 weights: each step rounds to bf16 (the reference Muon
    # also rounds decay W to bf16 before the update), so the two may differ by a bf16 ulp
    # (2^-7 relative at most) per step: 3 steps, 3 * 2^-7.
    ref, _ = _train("reference", dtype)
    tri, opt = _train("triton", dtype)
    rtol = 1e-4 if dtype == torch.float32 else 3 * 2**-7
    for a, b in zip(ref, tri):
        assert ((a - b).abs().max() / a.abs().max()).item() <= rtol


def test_an_offsets_table_is_rewritten_in_place_only_when_the_layers_move():
    # The plan's table keeps its address (a captured graph may point to it); the offsets are
    # written on the device (kernel arguments), only when they changed.
    a, b, c = (torch.randn(4, 6) for _ in range(3))
    table = OffsetTable()
    first = layer_rows([a, b], torch.float32, table).offsets
    address, writes = first.data_ptr(), table.writes
    assert first.tolist() == [0, (b.data_ptr() - a.data_ptr()) // 4]
    assert layer_rows([a, b], torch.float32, table).offsets is first and table.writes == writes
    moved = layer_rows([a, c], torch.float32, table).offsets
    assert moved.data_ptr() == address and table.writes == writes + 1
    assert moved.tolist() == [0, (c.data_ptr() - a.data_ptr()) // 4]
