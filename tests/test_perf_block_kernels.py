"""The block kernels compute what their PyTorch formulas compute, and those formulas' backwards
are the gradients."""

import pytest
import torch
import torch.nn.functional as F

from tunelab.train import block_kernels as bk


@pytest.fixture
def formulas(monkeypatch):
    """Run a call with the PyTorch formulas instead of the kernels."""

    def run(function, *args):
        with monkeypatch.context() as m:
            m.setattr(bk, "_takes", lambda *tensors: None)
            m.setattr(bk, "block_kernels", lambda: None)
            return function(*args)

    return run


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_the_kernels_build_on_this_machine():
    assert bk.block_kernels() is not None  # CI has g++: the fallback would hide a kernel that no longer compiles


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_kernels_equal_the_formulas(dtype, formulas):
    tokens, width, heads, dim = 37, 96, 3, 16
    x, weight = randn(tokens, width), randn(width, dtype=torch.bfloat16, seed=1)
    (out, r), (expected_out, expected_r) = bk.rms_norm(x, weight, 1e-5, dtype), formulas(bk.rms_norm, x, weight, 1e-5, dtype)
    assert out.dtype == expected_out.dtype == dtype
    assert torch.allclose(r, expected_r, rtol=1e-6)
    ulp = 2**-7 if dtype == torch.bfloat16 else 1e-6  # one rounding apart at most
    assert torch.allclose(out.float(), expected_out.float(), rtol=ulp, atol=1e-6)
    d_y, d_res = randn(tokens, width, dtype=dtype, seed=2), randn(tokens, width, seed=3)
    assert torch.allclose(bk.rms_norm_backward(d_y, x, r, weight, d_res), formulas(bk.rms_norm_backward, d_y, x, r, weight, d_res), rtol=1e-5, atol=1e-5)
    q = randn(tokens, heads, dim, dtype=dtype, seed=4)
    angles = randn(tokens, dim // 2, seed=5).repeat(1, 2)
    cos, sin = angles.cos(), angles.sin()
    assert torch.allclose(bk.rope(q, cos, sin), formulas(bk.rope, q, cos, sin), atol=1e-6)
    d = randn(tokens, heads, dim, seed=6)
    assert torch.allclose(bk.rope_backward(d, cos, sin, dtype).float(), formulas(bk.rope_backward, d, cos, sin, dtype).float(), rtol=ulp, atol=1e-6)
    gate, up, d_h = (randn(tokens, 3 * width, dtype=dtype, seed=s) for s in (7, 8, 9))
    exact = dtype == torch.bfloat16  # bf16: the same roundings, so the same bits
    tolerance = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-5, "atol": 1e-6}
    assert torch.allclose(bk.silu_mul(gate, up), formulas(bk.silu_mul, gate, up), **tolerance)
    for mine, theirs in zip(bk.silu_mul_backward(d_h, gate, up), formulas(bk.silu_mul_backward, d_h, gate, up)):
        assert torch.allclose(mine, theirs, **tolerance)


@pytest.mark.parametrize("count", [1, 6, 4096, 201 * 97])  # whole 64-bit words and a partial last one
@pytest.mark.parametrize("seed", [0, -(2**63), 2**63 - 1, 12345])
def test_dropout_bits_equal_the_formula(count, seed, formulas):
    dropped = 3277  # p = 0.05
    keep = bk.keep_bits(count, seed, dropped, torch.device("cpu"))
    assert keep.dtype == torch.bool and torch.equal(keep, formulas(bk.keep_bits, count, seed, dropped, torch.device("cpu")))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dropout_masking_equals_the_formulas(dtype, formulas, monkeypatch):
    x, y, out = randn(37, 96, dtype=dtype), randn(37, 96, dtype=dtype, seed=1), randn(37, 96, dtype=dtype, seed=2)
    keep = randn(37, 96, seed=3) > -1.0
    expected = [formulas(bk.masked_scale, x, keep, scale) for scale in (1.0, 1 / 0.95)] + [formulas(bk.masked_add_, out.clone(), y, keep)]
    assert torch.equal(expected[0], torch.where(keep, x, 0))  # scale 1: the kept values exactly
    with monkeypatch.context() as m:
        m.setattr(torch, "where", None)  # the kernels, not the formulas, compute these
        kernels = [bk.masked_scale(x, keep, scale) for scale in (1.0, 1 / 0.95)] + [bk.masked_add_(out.clone(), y, keep)]
    assert all(torch.equal(a, b) for a, b in zip(kernels, expected))


def test_the_formulas_backwards_are_the_gradients():
    x = randn(5, 8, dtype=torch.float64).requires_grad_()
    weight = randn(8, dtype=torch.float64, seed=1)
    d = randn(5, 8, dtype=torch.float64, seed=2)
    y, r = bk.rms_norm(x, weight, 1e-6, torch.float64)  # float64: the formulas, not the kernels
    (expected,) = torch.autograd.grad(y, x, d)
    assert torch.allclose(bk.rms_norm_backward(d, x.detach(), r.detach(), weight, torch.zeros_like(d)), expected, atol=1e-12)
    q = randn(5, 3, 8, dtype=torch.float64, seed=3).requires_grad_()
    angles = randn(5, 4, dtype=torch.float64, seed=4).repeat(1, 2)
    d = randn(5, 3, 8, dtype=torch.float64, seed=5)
    (expected,) = torch.autograd.grad(bk.rope(q, angles.cos(), angles.sin()), q, d)
    assert torch.allclose(bk.rope_backward(d, angles.cos(), angles.sin(), torch.float64), expected, atol=1e-12)
    gate, up = (randn(5, 8, dtype=torch.float64, seed=s).requires_grad_() for s in (6, 7))
    d = randn(5, 8, dtype=torch.float64, seed=8)
    expected = torch.autograd.grad(F.silu(gate) * up, (gate, up), d)
    h, d_gate, d_up = bk.silu_mul_backward(d, gate.detach(), up.detach())
    assert torch.allclose(h, F.silu(gate) * up) and torch.allclose(d_gate, expected[0]) and torch.allclose(d_up, expected[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_activation_kernels_read_and_write_column_blocks(dtype):
    """gate and up as column blocks of one stacked product, the gradients written into column blocks
    of another (``stacked_projections``): the same bits as on contiguous tensors, nothing written
    outside the blocks."""
    tokens, width = 37, 96
    wide = randn(tokens, 2 * width + 5, dtype=dtype)
    gate, up = wide[:, :width], wide[:, width : 2 * width]
    d_h = randn(tokens, width, dtype=dtype, seed=1)
    assert bk._takes_rows(gate, up) is not None  # the kernels, not the formulas
    assert torch.equal(bk.silu_mul(gate, up), bk.silu_mul(gate.contiguous(), up.contiguous()))
    out = torch.zeros(tokens, 2 * width + 5, dtype=dtype)
    h, d_gate, d_up = bk.silu_mul_backward(d_h, gate, up, out=(out[:, :width], out[:, width : 2 * width]))
    expected = bk.silu_mul_backward(d_h, gate.contiguous(), up.contiguous())
    assert d_gate.data_ptr() == out.data_ptr()
    assert all(torch.equal(a, b) for a, b in zip((h, out[:, :width], out[:, width : 2 * width]), expected))
    assert not out[:, 2 * width :].any()
