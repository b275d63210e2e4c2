"""Settings and fixtures for the whole test suite."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("TRITON_INTERPRET") == "1":
    # the interpreted kernel tests' reductions and scans a slice at a time, and triton.language patched once per
    # launch: the same results, bit for bit, in a fraction of the time (tests/triton_interpreter.py says why)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import triton_interpreter

    triton_interpreter.install()


@pytest.fixture
def one_thread():
    """torch on one thread for the test: the scan's many small operations gain nothing from a second thread on
    a busy 2-core machine, and lose a lot."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def write_medmnist_npz():
    """Writes a small MedMNIST-style .npz (train/val/test images and labels, labels cycling over the classes)."""
    import numpy as np

    def _write(path: Path, rgb: bool = False, num_classes: int = 3, n: int = 12) -> Path:
        rng = np.random.default_rng(0)
        shape = (n, 28, 28, 3) if rgb else (n, 28, 28)
        arrays = {}
        for split in ("train", "val", "test"):
            arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
            arrays[f"{split}_labels"] = (np.arange(n) % num_classes).reshape(n, 1).astype(np.uint8)
        np.savez(path, **arrays)
        return path

    return _write


@pytest.fixture
def one_multiprocessor(monkeypatch):
    """The Triton scan's channel splits as on a GPU of one multiprocessor: `programs_per_sm` is then the number of
    programs the splits aim at, so that a test's split count is the same on every GPU and under the interpreter
    (which counts one). `_d_split`'s cache is emptied around the test, as it holds splits of the real count."""
    from nnunet_segmamba.ssm import triton_scan

    triton_scan._d_split.cache_clear()
    monkeypatch.setattr(triton_scan, "_sm_count", lambda device_index: 1)
    yield
    triton_scan._d_split.cache_clear()


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


@pytest.fixture
def run_under_triton_interpreter():
    """Runs tests of a file again in subprocesses, on CPU through Triton's interpreter (TRITON_INTERPRET=1 must be
    set before triton decorates the kernels), and asserts that they pass with none skipped: a skip there would
    hide an untested kernel path. This is how CI, which has no GPU, checks the Triton kernels' arithmetic.
    Skips where the interpreter cannot run: without triton, inside such a run, and for a known Triton bug."""
    triton = pytest.importorskip("triton")
    import numpy

    from nnunet_segmamba.ssm import triton_common

    if triton_common.interpreting():
        pytest.skip("already interpreting")
    if _major_minor(triton.__version__) < (3, 7) and _major_minor(numpy.__version__) >= (2, 4):
        # the interpreter, not the kernels: Triton < 3.7 takes int() of a 1-element array for a loop bound that is
        # a kernel argument, which NumPy >= 2.4 refuses (triton-lang/triton#9171, fixed in 3.7)
        pytest.skip(f"Triton {triton.__version__}'s interpreter fails with NumPy {numpy.__version__} on runtime loop "
                    f"bounds (fixed in Triton 3.7); the compiled kernels are tested on CUDA")

    def run(test_file: str, select: str, min_passed: int = 1) -> str:
        # the interpreter computes on one core: the selected tests are split over one process per core, each on one
        # thread, which run side by side (`pytest_collection_modifyitems` keeps each process's share)
        shards = max(1, min(4, os.cpu_count() or 1))
        processes = []
        for index in range(shards):
            env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
                       **{SHARD_VARIABLE: f"{index}/{shards}"})  # the interpreter takes CPU tensors
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file), "-k", select,
                 "-m", "not gpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                cwd=Path(__file__).resolve().parents[1]))
        counts, summaries = {}, []
        try:
            for process in processes:
                stdout, stderr = process.communicate(timeout=900)
                # 5: nothing left for this process (fewer tests than processes)
                assert process.returncode in (0, 5), stdout[-6000:] + stderr[-3000:]
                summary = stdout.strip().splitlines()[-1]
                summaries.append(summary)
                for number, word in re.findall(r"(\d+) (passed|skipped|failed|error)", summary):
                    counts[word] = counts.get(word, 0) + int(number)
        finally:
            for process in processes:
                process.kill()
                process.wait()
        summary = "; ".join(summaries)
        assert counts.get("passed", 0) >= min_passed and counts.get("skipped", 0) == 0, summary
        return summary

    return run


# "i/n": this pytest process runs the i-th of n interleaved shares of the selected tests
SHARD_VARIABLE = "NNUNET_SEGMAMBA_TEST_SHARD"


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected
def pytest_collection_modifyitems(config, items):
    shard = os.environ.get(SHARD_VARIABLE)
    if not shard:
        return
    index, count = (int(part) for part in shard.split("/"))
    config.hook.pytest_deselected(items=[item for position, item in enumerate(items) if position % count != index])
    items[:] = items[index::count]
