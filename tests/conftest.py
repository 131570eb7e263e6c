"""Shared test setup: Triton runs in its CPU interpreter when there is no GPU (set before Triton
is imported), and fixtures listing the devices and backends to test on."""
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import pyvae  # noqa: E402


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def device_backends() -> list[tuple[str, str]]:
    """Every (device, backend) pair that works on this machine."""
    return [(d, b) for d in devices() for b in pyvae.backends.available(d)]


def run_with_cpu_isa(isa: str, script: str, cwd, *args: str) -> subprocess.CompletedProcess:
    """Runs `script` in a fresh Python whose CPU kernels use at most the `isa` SIMD paths
    (PYVAE_CPU_ISA is read once per process, hence the subprocess)."""
    if "cpu" not in pyvae.backends.available("cpu"):
        pytest.skip("extension not built")
    return subprocess.run([sys.executable, "-c", script, *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYVAE_CPU_ISA": isa})


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
