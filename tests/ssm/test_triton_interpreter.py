"""The interpreter as the interpreted kernel tests run it (`tests/triton_interpreter.py`: reductions and scans a
slice at a time, the language patched once per launch) gives the interpreter's own results bit for bit: a forward
and a reverse linear scan, as the scan kernels' `tl.associative_scan` runs it, `tl.flip` (a reduction per level,
and a call into Triton's standard library, whose module the launch has not patched) and a reduction to a scalar,
each run once as the tests run them and once with the interpreter's originals; and the launch leaves
`triton.language` as it found it."""
from __future__ import annotations

import pytest
import torch

from nnunet_segmamba.ssm import triton_common

INTERPRETING = triton_common.interpreting()
interpreted = pytest.mark.skipif(not INTERPRETING, reason="needs TRITON_INTERPRET=1 (test_kernels_under_interpreter "
                                                          "runs this file so)")

if INTERPRETING:
    import triton
    import triton.language as tl

    @triton.jit
    def _linear_combine(a1, b1, a2, b2):
        return a1 * a2, b1 * a2 + b2

    @triton.jit
    def _larger_magnitude(a, b):
        return tl.where(tl.abs(b) > tl.abs(a), b, a)

    @triton.jit
    def _reductions_and_scans(a_ptr, b_ptr, h_ptr, g_ptr, f_ptr, m_ptr, s_ptr, R: tl.constexpr, C: tl.constexpr):
        r = tl.arange(0, R)[:, None]
        c = tl.arange(0, C)[None, :]
        a = tl.load(a_ptr + r * C + c)
        b = tl.load(b_ptr + r * C + c)
        _, h = tl.associative_scan((a, b), axis=1, combine_fn=_linear_combine)
        _, g = tl.associative_scan((a, b), axis=1, combine_fn=_linear_combine, reverse=True)
        tl.store(h_ptr + r * C + c, h)
        tl.store(g_ptr + r * C + c, g)
        tl.store(f_ptr + r * C + c, tl.flip(b, 1))
        tl.store(m_ptr + tl.arange(0, R), tl.reduce(b, 1, _larger_magnitude))
        tl.store(s_ptr, tl.reduce(tl.reshape(b, (R * C,)), 0, _larger_magnitude))


def _run(a, b):
    rows, cols = a.shape
    h, g, f = torch.empty_like(a), torch.empty_like(a), torch.empty_like(a)
    m, s = torch.empty(rows), torch.empty(1)
    _reductions_and_scans[(1,)](a, b, h, g, f, m, s, R=rows, C=cols)
    return {"scan": h, "reverse scan": g, "flip": f, "reduction along rows": m, "reduction to a scalar": s}


@interpreted
def test_faster_interpreter_gives_the_interpreters_results(monkeypatch):
    import triton_interpreter
    from triton.runtime import interpreter

    assert interpreter.ScanOps.generic_scan is triton_interpreter.scan_by_slices, "not installed (tests/conftest.py)"
    assert interpreter.ReduceOps.generic_reduce is triton_interpreter.reduce_by_slices
    assert interpreter._patch_lang is triton_interpreter.patch_language_once
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(4, 16, generator=gen) * 0.5 + 0.5  # decays, as the scan's
    b = torch.randn(4, 16, generator=gen)
    load = tl.load
    as_tests_run = _run(a, b)
    assert tl.load is load and tl.core.is_builtin(tl.load), "the launch left triton.language patched"
    monkeypatch.setattr(interpreter.ScanOps, "generic_scan", triton_interpreter.original("ScanOps"))
    monkeypatch.setattr(interpreter.ReduceOps, "generic_reduce", triton_interpreter.original("ReduceOps"))
    monkeypatch.setattr(interpreter, "_patch_lang", triton_interpreter.original("_patch_lang"))
    monkeypatch.setattr(interpreter.GridExecutor, "__call__", triton_interpreter.original("GridExecutor.__call__"))
    as_triton_runs = _run(a, b)
    for name, result in as_tests_run.items():
        assert torch.equal(result, as_triton_runs[name]), name
    # and what they compute
    assert torch.equal(as_tests_run["flip"], b.flip(1))
    expected = torch.zeros(4, 16, dtype=torch.float64)
    state = torch.zeros(4, dtype=torch.float64)
    for t in range(16):
        state = a[:, t].double() * state + b[:, t].double()
        expected[:, t] = state
    torch.testing.assert_close(as_tests_run["scan"].double(), expected, rtol=1e-5, atol=1e-6)
    largest = b.gather(1, b.abs().argmax(1, keepdim=True)).squeeze(1)
    assert torch.equal(as_tests_run["reduction along rows"], largest)
    assert torch.equal(as_tests_run["reduction to a scalar"], b.flatten()[b.abs().argmax()].reshape(1))


def test_kernels_under_interpreter(run_under_triton_interpreter):
    """Run this file's interpreted test on CPU through Triton's interpreter."""
    run_under_triton_interpreter(__file__, "test_faster_interpreter_gives_the_interpreters_results")
