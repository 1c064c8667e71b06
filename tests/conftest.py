"""Test configuration shared by the whole suite.

CUDA kernels run under Numba's CUDA simulator unless ``SYMGRAD_REAL_GPU=1`` is set: the
simulator must be switched on before anything imports ``numba``, so this module sets the
environment variable at import time, before the tests import ``generated`` or ``numba``.
With ``SYMGRAD_REAL_GPU=1`` the same CUDA tests run on the real device, and the tests
marked ``gpu`` (larger shapes, too slow for the simulator) run as well.
"""

from __future__ import annotations

import os
import sys
import zlib
from pathlib import Path

# Under pytest-xdist (``-n auto``) each worker gets its share of the cores for BLAS and
# OpenMP, so that two workers on two cores do not each start two threads. Set before
# anything imports numpy, which reads it once.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _threads = str(max(1, (os.cpu_count() or 1) // _WORKERS))
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(_var, _threads)

REAL_GPU = os.environ.get("SYMGRAD_REAL_GPU") == "1"
if not REAL_GPU:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
for _p in (str(REPO), str(TESTS)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

TARGETS = ("cpu", "cuda")
DTYPES = (np.float32, np.float64)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs CUDA kernels (under the simulator unless SYMGRAD_REAL_GPU=1)")


def pytest_collection_modifyitems(config, items):
    if REAL_GPU:
        return
    skip_gpu = pytest.mark.skip(reason="needs a real GPU: set SYMGRAD_REAL_GPU=1")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(params=TARGETS)
def target(request):
    """The kernel target: "cpu", or "cuda" (the simulator unless SYMGRAD_REAL_GPU=1)."""
    return request.param


@pytest.fixture(params=DTYPES, ids=lambda d: np.dtype(d).name)
def dtype(request):
    return request.param


@pytest.fixture
def rng(request):
    """A NumPy generator seeded from the test's id: reproducible, different per test."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


SPECS = TESTS / "specs"


@pytest.fixture(scope="session")
def build_spec(tmp_path_factory):
    """``build_spec(path)`` -> the module ``codegen.build`` makes of a TOML spec, built
    once per session into its own temporary directory."""
    built = {}

    def build(path):
        import codegen

        path = Path(path)
        if path not in built:
            out = tmp_path_factory.mktemp(f"build_{path.stem}")
            built[path] = codegen.build(str(path), str(out))
        return built[path]

    return build
