"""Triton's interpreter as the interpreted kernel tests run it: its reductions and scans a slice at a time, and
`triton.language` patched once per kernel launch.

For `tl.associative_scan` and `tl.reduce` with a combine function of its own (`tl.flip` is one: a reduction per
level), Triton's interpreter calls the combine function once per element, through the whole of `tl`'s semantic
layer each time; in the kernel tests that CI runs interpreted, those calls take most of the time (the Triton scan's
backward spent 31.7 of its 49.6 s in `tl.flip` and 17.5 s in `tl.associative_scan`, profiled). The combine
function is elementwise, so the same calls, in the same order along the axis, can take every element of one step
at once: the functions below walk the axis and hand the combine function whole slices. Each element goes through
the same operations, in the same order and with the same rounding to the operands' dtype between steps, as in the
interpreter's own loops: the results are equal bit for bit (`tests/ssm/test_triton_interpreter.py` checks them
against the originals).

The interpreter also patches `triton.language` again at every call of a `@triton.jit` helper from a kernel (each
call walks every member of the language's modules), although the kernel's launch has patched the same modules for
the whole launch and restores them at its end: in the causal conv's interpreted tests, 85 of their 145 s, profiled.
`patch_language_once` skips the repeats within a launch, so every module is patched as before, once.
"""
from __future__ import annotations

import inspect

import numpy as np

_INSTALLED = {}
# within a kernel's launch: the language modules patched since it began (ids), else None
_patched_in_launch = None


def _results(ret) -> tuple:
    return ret if isinstance(ret, tuple) else (ret,)


def _data(value):
    # a combine function may return a tensor or a Python constant
    return value.handle.data if hasattr(value, "handle") else value


def scan_by_slices(self, input):
    """`ScanOps.generic_scan`, one combine call per step along the axis."""
    axis = self.axis
    data = [arg.handle.data for arg in input]
    out = [np.empty_like(d) for d in data]
    first = (slice(None),) * axis + (0,)
    for o, d in zip(out, data):
        o[first] = d[first]
    for k in range(1, data[0].shape[axis]):
        at = (slice(None),) * axis + (k,)
        step = tuple(self.to_tensor(d[at], arg.dtype) for d, arg in zip(data, input))
        before = (slice(None),) * axis + (k - 1,)
        acc = tuple(self.to_tensor(o[before], arg.dtype) for o, arg in zip(out, input))
        for o, value in zip(out, _results(self.combine_fn.fn(*acc, *step))):
            o[at] = np.reshape(_data(value), o[at].shape)
    return [self.to_tensor(o, arg.dtype) for o, arg in zip(out, input)]


def reduce_by_slices(self, input):
    """`ReduceOps.generic_reduce`, one combine call per step along the axis."""
    original_axis = self.axis
    input, axis = self.unravel(input, self.axis)
    data = [arg.handle.data for arg in input]
    shape = data[0].shape
    out = [np.array(np.take(d, 0, axis=axis), dtype=d.dtype) for d in data]
    for k in range(1, shape[axis]):
        acc = tuple(self.to_tensor(o, arg.dtype) for o, arg in zip(out, input))
        step = tuple(self.to_tensor(np.take(d, k, axis=axis), arg.dtype) for d, arg in zip(data, input))
        out = [np.array(np.reshape(_data(value), o.shape), dtype=o.dtype)
               for o, value in zip(out, _results(self.combine_fn.fn(*acc, *step)))]
    ret = []
    for o, arg in zip(out, input):
        if self.keep_dims:
            o = np.expand_dims(o, axis) if original_axis is not None else np.reshape(o, (1,) * len(shape))
        elif original_axis is None:
            o = o.item()
        ret.append(self.to_tensor(o, arg.dtype))
    return ret


class _NothingToRestore:
    def restore(self) -> None:
        pass


def patch_language_once(fn):
    """The interpreter's `_patch_lang(fn)`, except within a kernel's launch for modules the launch has patched."""
    global _patched_in_launch
    patch = _INSTALLED["_patch_lang"]
    if _patched_in_launch is None:
        return patch(fn)
    from triton import language as tl

    modules = {id(value) for value in fn.__globals__.values() if inspect.ismodule(value) and value in (tl, tl.core)}
    if modules <= _patched_in_launch:
        return _NothingToRestore()
    _patched_in_launch |= modules
    return patch(fn)


def _launch(self, *args, **kwargs):
    # `GridExecutor.__call__`: patches the kernel's language modules, runs the grid, restores them
    global _patched_in_launch
    outer, _patched_in_launch = _patched_in_launch, set()
    try:
        return _INSTALLED["GridExecutor.__call__"](self, *args, **kwargs)
    finally:
        _patched_in_launch = outer


def install() -> bool:
    """Puts the slice-at-a-time loops and the patching once per launch into Triton's interpreter; False (and
    nothing changed) where it lacks what they replace."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    targets = {"ScanOps": ("generic_scan", scan_by_slices), "ReduceOps": ("generic_reduce", reduce_by_slices)}
    if not (all(hasattr(getattr(interpreter, cls, None), name) for cls, (name, _) in targets.items())
            and callable(getattr(interpreter, "_patch_lang", None)) and hasattr(interpreter, "GridExecutor")):
        return False
    for cls, (name, function) in targets.items():
        owner = getattr(interpreter, cls)
        _INSTALLED.setdefault(cls, getattr(owner, name))
        setattr(owner, name, function)
    _INSTALLED.setdefault("_patch_lang", interpreter._patch_lang)
    _INSTALLED.setdefault("GridExecutor.__call__", interpreter.GridExecutor.__call__)
    interpreter._patch_lang = patch_language_once
    interpreter.GridExecutor.__call__ = _launch
    return True


def original(name: str):
    """What `install` replaced: the interpreter's own loop of class `name` ("ScanOps" or "ReduceOps"), or its
    "_patch_lang" or "GridExecutor.__call__"; None where nothing was installed."""
    return _INSTALLED.get(name)
