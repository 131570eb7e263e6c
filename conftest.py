"""Shared by tests/ and bench/.

The tests run against this checkout: pytest puts the repository root on sys.path, so `import pyvae`
is ./pyvae (its kernels/ bound as pyvae.kernels by pyvae/__init__.py), and the editable install
(`pip install --no-build-isolation -e .`, which `./run.sh test` keeps up to date) has built the
extension pyvae._C into it and makes child processes import the same pyvae. Without that extension
`import pyvae` fails here with the command that builds it (PYVAE_REQUIRE_NATIVE=1 unless set: the
suite never runs on the torch backend alone by accident; PYVAE_REQUIRE_NATIVE=0 allows it).

Every test starts from generators seeded by its own id (torch's, Python's and NumPy's global ones,
and the ``gen`` fixture, a CPU torch.Generator that input-building helpers take explicitly), so its
data does not depend on which tests ran before it, and a failure repeats when the test runs alone.
"""
import os
import random
import zlib

import numpy as np
import pytest
import torch

os.environ.setdefault("PYVAE_REQUIRE_NATIVE", "1")


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
