"""The cases of the GPU checks, one module per op family (``gpu_cases.<name>``, named by
pyvae.registry), each with two functions:

    sanitize(device, trim)   a small run of each of the family's CUDA kernels, for compute-sanitizer
                             (tests/cuda_sanitize_cases.py; ``device`` is the tensors' device and the
                             backend of every call; ``trim`` keeps the shapes that reach every code
                             path and the dtypes in TRIMMED_DTYPES)
    triton_launches(ops, t)  every Triton kernel variant its launchers ask for (tests/triton_gpu_compile.py:
                             ``ops.<op>`` calls the launcher of the op's Triton twin, ``t(*shape, dtype=)``
                             makes a meta tensor)
"""
import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRIMMED_DTYPES = (torch.float32, torch.bfloat16)  # bfloat16 for the 16-bit paths


def pick(cases: list, trimmed: list, trim: bool) -> list:
    """The cases of a full run, or those of a trimmed one."""
    return trimmed if trim else cases
