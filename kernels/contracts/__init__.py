"""The contract of each of pyvae's ops: its input checks and its outputs, one module per op family
(``pyvae.kernels.contracts.<name>``, named by :mod:`pyvae.registry`).

For each op ``<op>`` of a family (its ops and helper ops), that module defines

    check_<op>(*args, dtypes=KERNEL_DTYPES)   the checks the C++ op makes at its boundary
                                              (``csrc/<name>_ops.cpp``), with the same exception
                                              types and messages (a test compares them word for word)
    new_<op>_outputs(*args)                   its outputs, uninitialised: shapes, dtypes, device
                                              (not for an in-place op, whose name ends in ``_``)

with the op's own arguments. They are the one statement of what an op takes and returns in Python:
the fake kernel of each C++ op is :func:`fake_kernel` of them (registered by
:func:`pyvae.backends.load_op_family`), each Triton twin checks and allocates through them before it
launches (and under torch.compile, that is its fake), and the torch backend checks through them with
``dtypes=REFERENCE_DTYPES`` (it serves float64 as well). A direct call of any backend's op with a
wrong device, dtype or shape is refused before any kernel reads memory.

No Triton here, and nothing of pyvae but the constants it shares with the C++ kernels: kernels/ sits
below pyvae.ops in the data flow.
"""
from __future__ import annotations

from types import ModuleType
from typing import Callable, Sequence

import torch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""What the fused kernels (cpu, cuda, triton) read."""
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)
"""What the torch backend reads (the float64 reference)."""

# c10's names of the dtypes, as the C++ messages print them
_C10_NAMES = {torch.float32: "Float", torch.float16: "Half", torch.bfloat16: "BFloat16", torch.float64: "Double",
              torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
              torch.bool: "Bool", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble"}


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype as c10 prints it: Float, Half, Long."""
    return _C10_NAMES.get(dtype, str(dtype))


def sizes(t: torch.Tensor) -> str:
    """A shape as c10 prints IntArrayRef: [2, 3]."""
    return "[" + ", ".join(map(str, t.shape)) + "]"


def check_dtype(t: torch.Tensor, name: str, dtypes: Sequence[torch.dtype] = KERNEL_DTYPES) -> None:
    """TypeError unless ``t`` has one of ``dtypes``: "x must be float32, float16 or bfloat16, got Double"."""
    if t.dtype not in dtypes:
        names = [str(d).removeprefix("torch.") for d in dtypes]
        raise TypeError(f"{name} must be {', '.join(names[:-1])} or {names[-1]}, got {dtype_name(t.dtype)}")


def float32_values(dtypes: Sequence[torch.dtype]) -> tuple[torch.dtype, ...]:
    """The dtypes of a value the kernels take in float32 (a loss's gradient, a scale): float32, and
    float64 too where ``dtypes`` has it (the torch backend computes float64 inputs in float64)."""
    return (torch.float32, torch.float64) if torch.float64 in dtypes else (torch.float32,)


def broadcasts(small: torch.Tensor, big: torch.Tensor) -> bool:
    """Whether ``small`` broadcasts to ``big``'s shape (at::is_expandable_to)."""
    return small.dim() <= big.dim() and all(s in (1, b) for s, b in zip(reversed(small.shape), reversed(big.shape)))


def fake_kernel(contract: ModuleType, op: str) -> Callable:
    """The fake (meta) kernel of op ``op`` from its family's contract module: its checks, then its
    outputs (None for an in-place op)."""
    check = getattr(contract, f"check_{op}")
    new_outputs = getattr(contract, f"new_{op}_outputs", None)

    def fake(*args, **kwargs):
        check(*args, **kwargs)
        return new_outputs(*args, **kwargs) if new_outputs is not None else None

    fake.__name__ = f"{op}_fake"
    return fake
