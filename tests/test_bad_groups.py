"""Bad attention layouts, group keys and options added with the layouts and the distributed
plans: each raises at construction, naming what is wrong, and nothing is modified."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cm_triton import CompositionalMuon, param_groups
from cm_triton.layouts import Heads, Layout, get_layout, register_layout


def _w(*shape):
    return nn.Parameter(torch.randn(*shape))


def test_a_layout_must_cover_every_row_exactly_once():
    lay = get_layout("qkv_blocks", 4, 2, 8)
    lay.check([torch.Size((64, 32)), torch.Size((32, 32))])  # [q; k; v] = 32 + 16 + 16 rows
    with pytest.raises(ValueError, match="covered by nothing"):
        Layout(q=Heads(0, 0, (4, 8), (slice(0, 2),)), k=Heads(1, 0, (2, 8))).check(
            [torch.Size((32, 16)), torch.Size((16, 16))]
        )
    with pytest.raises(ValueError, match="covered twice"):
        Layout(q=Heads(0, 0, (4, 8)), k=Heads(0, 0, (4, 8))).check([torch.Size((32, 16))])
    with pytest.raises(ValueError, match="views axis 0 of parameter 0"):
        lay.check([torch.Size((60, 32)), torch.Size((32, 32))])


def test_bad_attention_groups_name_the_problem():
    fused, out = _w(64, 32), _w(32, 32)
    before = [fused.detach().clone(), out.detach().clone()]
    group = {"kind": "attention", "layout": "qkv_blocks", "params": [fused, out],
             "head_dim": 8, "num_heads": 4, "num_kv_heads": 2}  # fmt: skip
    CompositionalMuon([dict(group)])
    for change, match in (({"layout": "nope"}, "unknown attention layout 'nope'"),
                          ({"num_kv_heads": 3}, "not a multiple of the 3 KV heads"),
                          ({"num_heads": 0}, "num_heads"),
                          ({"head_dim": 5}, "views axis 0"),
                          ({"method": "joint", "params": [fused, _w(24, 32)]},
                           r"joint.*widths must match \(24 vs 32\)")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            CompositionalMuon([dict(group, **change)])
    assert torch.equal(fused, before[0]) and torch.equal(out, before[1])


def test_bad_muon_shapes_and_options():
    with pytest.raises(ValueError, match="'shape' must be one of"):
        CompositionalMuon([{"kind": "muon", "params": [_w(4, 4)], "shape": "tensor"}])
    with pytest.raises(ValueError, match="'experts' needs 3-D"):
        CompositionalMuon([{"kind": "muon", "params": [_w(4, 4)], "shape": "experts"}])
    with pytest.raises(ValueError, match="o_sign"):
        CompositionalMuon([{"kind": "muon", "params": [_w(4, 4)]}], o_sign="scatter")
    with pytest.raises(ValueError, match="unrecognised"):
        param_groups(nn.Linear(4, 4), unrecognised="loud")
    with pytest.raises(ValueError, match="ns_method"):
        CompositionalMuon([{"kind": "muon", "params": [_w(4, 4)]}], ns_method="svd")
    with pytest.raises(ValueError, match="ns_restart"):
        CompositionalMuon([{"kind": "muon", "params": [_w(4, 4)]}], ns_restart=8)


def test_register_layout_checks_its_arguments():
    with pytest.raises(ValueError, match="non-empty string"):
        register_layout("", lambda hq, hkv, dh: None)
    with pytest.raises(TypeError, match="callable"):
        register_layout("x", 3)
