"""`projection_weight_grad_triton` against a float64 einsum: the Mamba projections' weight gradient for every
layout the layer hands it (contiguous, a transposed positions-first gradient, a row slice as x), splits that cut
through a batch element's positions, and sizes that are not multiples of the tiles.

On this CPU-only suite the kernel runs under Triton's interpreter (`test_kernel_under_interpreter` runs this file's
interpreted tests again in subprocesses, see tests/ssm/test_triton_conv.py); the GPU test runs it on CUDA in half
precision and through the layer's compiled backward.
"""
from __future__ import annotations

import pytest
import torch

from nnunet_segmamba.ssm import triton_common

INTERPRETING = triton_common.interpreting()
CUDA = torch.cuda.is_available() and triton_common.TRITON_AVAILABLE


def _operands(layout, batch, out, inner, length, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    if layout == "contiguous":
        return r(batch, out, length), r(batch, inner, length)
    if layout == "positions_first":  # out_proj: the gradient arrives (batch, L, out); in_proj: x is (batch, L, in)
        return r(batch, length, out).transpose(1, 2), r(batch, length, inner).transpose(1, 2)
    if layout == "row_slice":  # dt_proj: x is the first rows of the x_proj output
        return r(batch, out, length), r(batch, inner + 5, length)[:, 1:inner + 1]
    raise ValueError(layout)


def _check(layout, batch, out, inner, length, splits, dtype, device, rtol):
    from nnunet_segmamba.ssm.triton_projection import projection_weight_grad_triton

    grad, x = _operands(layout, batch, out, inner, length, dtype, device)
    got = projection_weight_grad_triton(grad, x, splits)
    want = torch.einsum("bol,bil->oi", grad.double(), x.double())
    assert got.dtype == torch.float32 and got.shape == (out, inner)
    err = ((got.double() - want).abs().max() / want.abs().max()).item()
    assert err < rtol, (layout, batch, out, inner, length, splits, err)


@pytest.mark.skipif(not INTERPRETING, reason="runs under the Triton interpreter (test_kernel_under_interpreter)")
@pytest.mark.parametrize("layout", ["contiguous", "positions_first", "row_slice"])
@pytest.mark.parametrize("splits", [None, 1, 3])
def test_interpreted_weight_gradient(layout, splits):
    # 3 cases of 150 positions: 3 blocks of 64 each, the last one partly masked; out and in not tile multiples
    _check(layout, 3, 35, 20, 150, splits, torch.float32, "cpu", 1e-5)


@pytest.mark.skipif(not INTERPRETING, reason="runs under the Triton interpreter (test_kernel_under_interpreter)")
def test_interpreted_weight_gradient_with_several_tiles():
    # out and in over one 64-wide tile each: a (2, 2) grid of output tiles
    _check("contiguous", 2, 70, 65, 64, None, torch.float32, "cpu", 1e-5)


def test_kernel_under_interpreter(run_under_triton_interpreter):
    """Run this file's interpreted tests on CPU through Triton's interpreter (how CI checks the kernel)."""
    run_under_triton_interpreter(__file__, "interpreted", min_passed=10)


def test_mismatched_operands_are_refused_with_their_shapes():
    from nnunet_segmamba.ssm.triton_projection import projection_weight_grad_triton

    with pytest.raises(ValueError, match="share a dtype"):
        projection_weight_grad_triton(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(1, 2, 3\).*\(1, 2, 4\)"):
        projection_weight_grad_triton(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device and triton")
@pytest.mark.parametrize("layout", ["contiguous", "positions_first", "row_slice"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_weight_gradient_on_cuda(layout, dtype):
    # the hippocampus patch's first stage in size; half-precision operands summed in float32
    rtol = 1e-5 if dtype == torch.float32 else 1e-3
    _check(layout, 7, 35, 96, 18432, None, dtype, "cuda", rtol)
    torch.library.opcheck(torch.ops.nnunet_segmamba.projection_weight_grad.default,
                          _operands(layout, 2, 35, 96, 300, dtype, "cuda"))
