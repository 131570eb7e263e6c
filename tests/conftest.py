"""pytest setup of tests/: Triton runs in its CPU interpreter when there is no GPU (set before Triton
is imported), and gpu-marked tests skip without a CUDA device. Shared cases and helpers are in
cases.py; the per-test seeding in the repository's conftest.py."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
