"""Each op family's cases of the tests and checks that every family goes through, one module per
family (``families.<name>``, imported from tests/, named by pyvae.registry):

    BAD_CALLS                bad calls of its ops, each ``(op, make_args, exception type, words of
                             the message)``: every backend refuses them before any kernel runs, with
                             the same message word for word (tests/test_backends.py)
    property_case(pair, draw)  one hypothesis example on a (device, backend) pair, checked against
                             the float64 reference (tests/test_properties.py); PROPERTY_EXAMPLES =
                             (native, triton): how many examples, the second under the Triton interpreter
    example(a, b, backend="auto")  a call of the family's API on two [4, 8] float tensors, to a scalar
                             (the tests that run every family: torch.compile in a fresh process, one
                             family's backend turned off)

    sanitize(device, trim)   a small run of each of the family's CUDA kernels, for compute-sanitizer
                             (tests/cuda_sanitize_cases.py; ``device`` is the tensors' device and the
                             backend of every call; ``trim`` keeps the shapes that reach every code
                             path and the dtypes in TRIMMED_DTYPES)
    triton_launches(ops, t)  every Triton kernel variant its launchers ask for (tests/triton_gpu_compile.py:
                             ``ops.<op>`` calls the launcher of the op's Triton twin, ``t(*shape, dtype=)``
                             makes a meta tensor)

The modules import the test helpers (cases, tolerances) inside the functions that use them, so that
importing one runs nothing but pyvae's import (the subprocess tests, the GPU scripts).
"""
from typing import NamedTuple

import torch


DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRIMMED_DTYPES = (torch.float32, torch.bfloat16)  # bfloat16 for the 16-bit paths


def pick(cases: list, trimmed: list, trim: bool) -> list:
    """The cases of a full run, or those of a trimmed one."""
    return trimmed if trim else cases


# ------------------------------------------------------------------------------ bad calls
def arg(*shape, dtype=torch.float32) -> torch.Tensor:
    """A random CPU tensor, an argument of a bad call (the test moves it to the device it runs on)."""
    return torch.randn(*shape, dtype=dtype)


class OnCPU(NamedTuple):
    """An argument a bad call keeps on the CPU while the others go to the device tested: a call
    across two devices (run where that device is a GPU)."""
    tensor: torch.Tensor


# ------------------------------------------------------------------------------ property cases
# What a property case draws from (``draw``, tests/test_properties.py): hypothesis behind
#   draw.sample(options, label), draw.sample_list(options, label, min_size=0, max_size=...),
#   draw.integers(lo, hi, label), draw.boolean(label)
# so that these modules import no hypothesis (the GPU checks import them where it may be absent).
SCALES = [1e-3, 1.0, 30.0]  # of the normal values; 30 reaches exp overflow in logvar's tails
# "Huge" where values are multiplied or summed (likelihoods, VQ): their products and squares stay
# finite in float32, so a float32 sum's overflow does not depend on the order of its terms. Where
# terms are never negative, the huge values are a quarter of the dtype's largest (the default).
HUGE = 1e15


def draw_values(draw, dtype, label, *, huge=None, moderate=100.0, scale=None, shift=0.0) -> dict:
    """Keyword arguments of cases.make_tensor: normal values of a drawn scale, plus a few special
    values, or every element drawn from the special values (so that e.g. target == prediction happens)."""
    from cases import special_values

    pool = special_values(dtype, huge, moderate)
    mode = draw.sample(["normal", "specials", "pool"], f"{label} values")
    kwargs = {"scale": scale if scale is not None else draw.sample(SCALES, f"{label} scale"), "shift": shift}
    if mode == "specials":
        kwargs["specials"] = draw.sample_list(pool, f"{label} specials", min_size=1, max_size=4)
    elif mode == "pool":
        kwargs["fill_from"] = pool
    return kwargs


def worst(*dtypes):
    """The dtype with the loosest tolerance."""
    from tolerances import VALUE

    return max(dtypes, key=lambda d: VALUE[d][0])
