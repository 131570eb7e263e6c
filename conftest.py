"""Shared by tests/ and bench/.

Run tests and benchmarks against the installed pyvae, never the source folder of the same name
(which has neither the built extension nor pyvae.kernels): drop the repository root that
`python -m pytest` and pytest's rootdir handling put on sys.path.

Every test starts from generators seeded by its own id (torch's, Python's and NumPy's global ones,
and the ``gen`` fixture, a CPU torch.Generator that input-building helpers take explicitly), so its
data does not depend on which tests ran before it, and a failure repeats when the test runs alone.
"""
import random
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

_ROOT = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]
sys.modules.pop("pyvae", None)


def _seed_of(request) -> int:
    return zlib.crc32(request.node.nodeid.encode())


@pytest.fixture(autouse=True)
def _seed_global_generators(request):
    seed = _seed_of(request)
    torch.manual_seed(seed)  # the CPU and every CUDA device's generator
    random.seed(seed)
    np.random.seed(seed)


@pytest.fixture
def gen(request) -> torch.Generator:
    """A CPU generator seeded by the test's id: draw on the CPU, then move to the test's device
    (the same values on every device)."""
    return torch.Generator().manual_seed(_seed_of(request))
