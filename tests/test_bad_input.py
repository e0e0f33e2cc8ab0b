"""Spec §6.8: a bad call raises an error naming the argument and modifies nothing."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import ov_tensors, qk_tensors

from cm_triton import cm_ov, cm_qk

QK_NAMES = ("q_w", "k_w", "q_grad", "k_grad", "m_q", "m_k")
OV_NAMES = ("v_w", "o_w", "v_grad", "o_grad", "m_v", "m_o")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern, so NaN == NaN and -0.0 != 0.0 (torch.equal would not do that)."""
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
    return t.detach().clone().view(ints)


def _call_expect(fn, tensors, match, exc=(ValueError, TypeError), **kw):
    before = [_bits(t) if isinstance(t, torch.Tensor) else t for t in tensors]
    with pytest.raises(exc, match=match):
        fn(*tensors, **kw)
    for b, t in zip(before, tensors):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":  # meta holds no values
            assert torch.equal(_bits(t), b), "a tensor was modified by a call that raised"


def _qk(dtype=torch.float32):
    return list(qk_tensors(4, 2, 8, 19, dtype=dtype))


def _ov(dtype=torch.float32):
    return list(ov_tensors(4, 2, 8, 19, dtype=dtype))


KW = dict(head_dim=8, eta=0.1)


@pytest.mark.parametrize("i", range(2, 6))
def test_wrong_shape_names_the_argument(i):
    ts = _qk()
    ts[i] = ts[i][:, :-1]
    _call_expect(cm_qk, ts, QK_NAMES[i], **KW)


def test_joint_needs_one_width_for_both_factors():
    # Per-head legs never mix the two factors' input widths (the Grams are dh x dh), but
    # method="joint" stacks both factors' rows under one sign.
    ts = _qk()
    for i in (0, 2, 4):  # q_w, q_grad, m_q 18 wide; k 19 wide
        ts[i] = ts[i][:, :-1].contiguous()
    _call_expect(cm_qk, ts, "q_w and k_w", **KW, method="joint")
    ts = _ov()
    for i in (1, 3, 5):  # o_w, o_grad, m_o with 18 rows; v_w 19 columns
        ts[i] = ts[i][:-1].contiguous()
    _call_expect(cm_ov, ts, "o_w's 18 rows", **KW, method="joint")


@pytest.mark.parametrize("i", range(2, 6))
def test_ov_wrong_shape_names_the_argument(i):
    ts = _ov()
    ts[i] = ts[i][:-1]
    _call_expect(cm_ov, ts, OV_NAMES[i], **KW)


def test_ov_width_mismatch():
    ts = _ov()
    ts[1] = torch.randn(18, ts[1].shape[1])  # o_w alone changed: its gradient no longer fits
    _call_expect(cm_ov, ts, "o_grad", **KW)


def test_not_2d_and_not_tensor():
    ts = _qk()
    ts[0] = ts[0].unsqueeze(0)
    _call_expect(cm_qk, ts, "q_w must be 2-D", **KW)
    ts = _qk()
    ts[3] = ts[3].tolist()
    _call_expect(cm_qk, ts, "k_grad must be a torch.Tensor", **KW)
    ts = _qk()
    ts[4] = ts[4].to(torch.int64)
    _call_expect(cm_qk, ts, "m_q must be a floating-point", **KW)


@pytest.mark.parametrize("head_dim", [5, 0, -8, 8.0, True, None])
def test_head_dim_not_dividing_or_invalid(head_dim):
    _call_expect(cm_qk, _qk(), "head_dim", head_dim=head_dim, eta=0.1)
    _call_expect(cm_ov, _ov(), "head_dim", head_dim=head_dim, eta=0.1)


def test_query_heads_not_a_multiple_of_kv_heads():
    q, k, gq, gk, mq, mk = qk_tensors(3, 2, 8, 19, dtype=torch.float32)
    _call_expect(cm_qk, [q, k, gq, gk, mq, mk], "q_w has 3 heads.*2 KV heads of k_w", **KW)
    v, o, gv, go, mv, mo = ov_tensors(3, 2, 8, 19, dtype=torch.float32)
    _call_expect(cm_ov, [v, o, gv, go, mv, mo], "o_w has 3 heads.*v_w", **KW)


@pytest.mark.parametrize("i", range(1, 6))
def test_dtype_mismatch(i):
    ts = _qk()
    ts[i] = ts[i].double()
    _call_expect(cm_qk, ts, QK_NAMES[i], **KW)


def test_device_mismatch():
    ts = _qk()
    ts[2] = ts[2].to("meta")
    _call_expect(cm_qk, ts, "q_grad is on meta", **KW)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("i", [2, 3])
def test_non_finite_gradient(bad, i):
    ts = _qk()
    ts[i][1, 2] = bad
    _call_expect(cm_qk, ts, f"{QK_NAMES[i]} contains non-finite", **KW)
    ts = _ov()
    ts[i][1, 2] = bad
    _call_expect(cm_ov, ts, f"{OV_NAMES[i]} contains non-finite", **KW)


@pytest.mark.parametrize(
    "kw, name",
    [
        ({"method": "split"}, "method"),
        ({"whitening": "left"}, "whitening"),
        ({"connection": "levi_civita"}, "connection"),
        ({"inv_root": "cholesky"}, "inv_root"),
        ({"backend": "cuda"}, "backend"),
        ({"isotropic": "yes"}, "isotropic"),
        ({"hybrid": 1}, "hybrid"),
        ({"eta": -0.1}, "eta"),
        ({"eta": math.nan}, "eta"),
        ({"beta": 1.0}, "beta"),
        ({"beta": -0.1}, "beta"),
        ({"damping": -1e-3}, "damping"),
        ({"weight_decay": math.inf}, "weight_decay"),
        ({"ns_coefficients": ()}, "ns_coefficients"),
        ({"ns_coefficients": ((1.0, 2.0),)}, "ns_coefficients"),
        ({"ns_coefficients": ((1.0, math.nan, 0.0),)}, "ns_coefficients"),
        ({"ns_dtype": torch.int8}, "ns_dtype"),
    ],
    ids=str,
)
def test_bad_options_name_the_argument(kw, name):
    args = {**KW, **kw}
    _call_expect(cm_qk, _qk(), name, **args)
    _call_expect(cm_ov, _ov(), name, **args)


def test_aliased_written_tensors():
    ts = _qk()
    ts[4] = ts[0]  # momentum buffer is the weight itself
    _call_expect(cm_qk, ts, "q_w and m_q share memory", **KW)
    ts = _qk()
    ts[5] = ts[1][:, :]  # a view of the same memory
    _call_expect(cm_qk, ts, "k_w and m_k share memory", **KW)
    ts = _qk()
    ts[4] = torch.zeros(1, 19).expand(32, 19)
    _call_expect(cm_qk, ts, "m_q has overlapping memory", **KW)


def test_disjoint_views_of_one_buffer_are_fine():
    # Views are fine if correct: q and k as disjoint row ranges of one fused buffer.
    q, k, gq, gk, mq, mk = _qk()
    fused = torch.cat([q, k])
    cm_qk(fused[:32], fused[32:], gq, gk, mq, mk, **KW)
    q2, k2 = q.clone(), k.clone()
    cm_qk(q2, k2, gq, gk, *_qk()[4:], **KW)
    torch.testing.assert_close(fused[:32], q2, rtol=0, atol=0)
    torch.testing.assert_close(fused[32:], k2, rtol=0, atol=0)


def test_triton_backend_without_interpreter_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from cm_triton import dispatch

    if dispatch.triton_available():
        _call_expect(
            cm_qk, _qk(), "backend='triton' needs CUDA", RuntimeError, backend="triton", **KW
        )
    else:
        _call_expect(cm_qk, _qk(), "needs the triton package", RuntimeError, backend="triton", **KW)


def test_bf16_weights_compute_in_fp32_and_write_back_once():
    ts = _qk(torch.bfloat16)
    ref = [t.float() for t in ts]
    cm_qk(*ts, **KW)
    cm_qk(*ref, **KW)
    assert ts[0].dtype == torch.bfloat16
    # The only difference is the single final cast of the fp32 result: <= 1 bf16 ulp (2^-8 rel).
    torch.testing.assert_close(ts[0].float(), ref[0].bfloat16().float(), rtol=0, atol=0)
