"""The resource check of compiled GPU kernels (tests/kernel_resources.py): cuobjdump's report is
read right, the device limits fail what is above them, and the CUDA kernels this build compiled
are within them. (The Triton kernels are checked by tests/triton_gpu_compile.py.)"""
import pytest

import kernel_resources
from kernel_resources import KIB, Usage, parse

# cuobjdump --dump-resource-usage of an object with two architectures (shortened)
FATBIN = """
Fatbin elf code:
================
arch = sm_80
code version = [1,8]

Resource usage:
 Common:
  GLOBAL:0
 Function _ZN5pyvae4cuda12scale_kernelEPfi:
  REG:16 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:385 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _ZN5pyvae4cuda13nearest_kernelEv:
  REG:99 STACK:64 SHARED:16896 LOCAL:8 CONSTANT[0]:502 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin elf code:
================
arch = sm_90a
code version = [1,8]

Resource usage:
 Function _ZN5pyvae4cuda12scale_kernelEPfi:
  REG:21 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:385 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_cuobjdump_report_is_parsed_per_architecture():
    assert parse(FATBIN) == [
        Usage(80, "_ZN5pyvae4cuda12scale_kernelEPfi", 16, 0, 0, 0),
        Usage(80, "_ZN5pyvae4cuda13nearest_kernelEv", 99, 16896, 64, 8),
        Usage(90, "_ZN5pyvae4cuda12scale_kernelEPfi", 21, 1024, 0, 0),
    ]
    cubin = " Function _k:\n  REG:40 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:400\n"
    assert parse(cubin, arch=90) == [Usage(90, "_k", 40, 0, 0, 0)]
    with pytest.raises(ValueError, match="pass arch"):
        parse(cubin)


def test_limits_fail_what_does_not_fit_the_device():
    fits_hopper_only = Usage(80, "k", 64, 200 * KIB, 0, 0)
    assert fits_hopper_only.problems() == [f"shared {200 * KIB} B > {163 * KIB} B"]
    assert Usage(90, "k", 64, 200 * KIB, 0, 0).problems() == []
    assert Usage(90, "k", 64, 228 * KIB, 0, 0).problems() == [f"shared {228 * KIB} B > {227 * KIB} B"]
    assert Usage(90, "k", 256, 0, 0, 0).problems() == ["256 registers per thread > 255"]
    # 200 registers fit one thread, but not 512 threads of a block (64K registers per block)
    assert Usage(90, "k", 200, 0, 0, 0).problems(threads=256) == []
    assert Usage(90, "k", 200, 0, 0, 0).problems(threads=512) == ["200 registers x 512 threads > 65536 per block"]
    assert Usage(90, "k", 200, 0, 64, 0).uses_local_memory and not Usage(90, "k", 200, 0, 0, 0).uses_local_memory


def test_built_cuda_kernels_fit_the_devices(capsys):
    try:
        kernel_resources.cuobjdump()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    binaries = kernel_resources.build_binaries()
    if not binaries:
        pytest.skip("no CUDA kernels were compiled in this build (no nvcc)")
    assert kernel_resources.main([]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert all(kernel_resources.resource_usage(path) for path in binaries)  # each binary holds kernels
    assert ", 0 above a limit" in out
