"""The cases of finite scalar quantization (op family ``fsq``; see families/__init__.py), and the
helpers its tests share: the distance of a value from its rounding boundary, and z drawn away from
the boundaries."""
import torch

import pyvae
from pyvae.kernels.contracts.fsq import dim_constants
from pyvae.ops.fsq import NAN_INDEX, fsq_backward_reference, fsq_reference

from . import DTYPES, TRIMMED_DTYPES, OnCPU, arg, draw_values, pick

# (levels, preserve_symmetry): the four of the issue (the FSQ paper's 2^12 and 2^16 codebooks, one
# of odd levels, a symmetric one with a level of 2), then one level, many levels, and large ones
LEVEL_SETS = [((8, 5, 5, 5), False), ((8, 8, 8, 6, 5), False), ((7, 5, 5, 5, 5), False), ((2, 3, 4), True),
              ((5,), False), ((2, 2, 2, 2, 2, 2, 2, 3, 4, 5), True), ((1000, 1000), False), ((8, 5, 5, 5), True)]
# below this distance (in levels) from a rounding boundary, float32 and float64 arithmetic (tanh to
# an ulp or so, the constants rounded to float32) may round to neighbouring levels
BOUNDARY_MARGIN = 1e-4


def example(a: torch.Tensor, b: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    codes, _ = pyvae.finite_scalar_quantize(a[:, :4], (8, 5, 5, 5), backend=backend)
    return (codes * b[:, :4]).sum()


def boundary_distance(z: torch.Tensor, levels, preserve_symmetry: bool) -> torch.Tensor:
    """Each value's distance, in levels (float64), from the nearest point where its level changes:
    a half-integer of the plain bound's ``tanh(z + shift) * half_l - offset``, an integer of the
    symmetric bound's ``(L - 1)(tanh(z) + 1) / 2 + 0.5``. NaN for NaN."""
    z = z.detach().double().cpu()
    c = dim_constants(levels, preserve_symmetry)
    shift = torch.tensor([d.shift for d in c], dtype=torch.float64)
    scale = torch.tensor([d.scale for d in c], dtype=torch.float64)
    offset = torch.tensor([d.offset for d in c], dtype=torch.float64)
    t = torch.tanh(z + shift)
    if preserve_symmetry:
        v = scale * (t + 1) * 0.5 + 0.5
        return (v - torch.round(v)).abs()
    v = t * scale - offset
    return ((v - torch.floor(v)) - 0.5).abs()


def away_from_boundaries(shape, levels, preserve_symmetry: bool, *, scale: float = 1.5, dtype=torch.float32,
                         generator=None) -> torch.Tensor:
    """Normal values times ``scale`` in ``dtype``, each redrawn while (once rounded to ``dtype``) it
    lies within BOUNDARY_MARGIN of a rounding boundary, so that every backend must give the exact
    level: such values are about 2e-4 of a normal draw."""
    z = (scale * torch.randn(shape, generator=generator)).to(dtype)
    for _ in range(50):
        near = boundary_distance(z, levels, preserve_symmetry) < BOUNDARY_MARGIN
        if not near.any():
            return z
        z[near] = (scale * torch.randn(int(near.sum()), generator=generator)).to(dtype)
    raise AssertionError("could not draw values away from the rounding boundaries")


def sanitize(device: str, trim: bool) -> None:
    """Every dtype, the plain and the symmetric bound, one to ten levels, ragged blocks of rows,
    contiguous and strided z, with and without the indices, and the backward."""
    shapes = pick([(1,), (7,), (300,), (2, 4097)], [(7,), (2, 4097)], trim)
    level_sets = pick(LEVEL_SETS, LEVEL_SETS[:4], trim)
    for lead in shapes:
        for dtype in pick(DTYPES, TRIMMED_DTYPES, trim):
            for levels, symmetric in level_sets:
                d = len(levels)
                for strided in (False, True):
                    wide = torch.randn(*lead, 2 * d, device=device, dtype=dtype)
                    z = (wide[..., ::2] if strided else wide[..., :d].contiguous()).detach().requires_grad_()
                    for want in (True, False):
                        codes, _ = pyvae.finite_scalar_quantize(z, levels, preserve_symmetry=symmetric,
                                                                return_indices=want, backend=device)
                        codes.backward(torch.randn_like(codes))


def triton_launches(ops, t) -> None:
    """Every Triton kernel variant of the family: its launchers called on meta tensors (one compiled
    kernel per set of levels: those of LEVEL_SETS)."""
    for dtype in DTYPES:
        for levels, symmetric in LEVEL_SETS:
            z = t(65536, len(levels), dtype=dtype)
            for want in (True, False):
                ops.fsq_forward(z, list(levels), symmetric, want)
            ops.fsq_backward(z, t(65536, len(levels), dtype=dtype), list(levels), symmetric)


# ------------------------------------------------------------------------------ bad calls
BAD_CALLS = [
    ("fsq_forward", lambda: (arg(4, 4), [], False, True), ValueError, "levels must not be empty"),
    ("fsq_forward", lambda: (arg(4, 4), [8, 5, 1, 5], False, True), ValueError,
     "levels must each be >= 2, got [8, 5, 1, 5]"),
    ("fsq_forward", lambda: (arg(4, 3), [2, 3, 4], False, True), ValueError,
     "levels of 2 need preserve_symmetry=True, got [2, 3, 4]"),
    ("fsq_forward", lambda: (arg(4, 3), [2048, 1024, 1024], False, True), ValueError,
     "levels must multiply to less than 2^31 (indices are int32), got [2048, 1024, 1024]"),
    ("fsq_forward", lambda: (arg(4, 5), [8, 5, 5, 5], False, True), ValueError,
     "z must have len(levels) = 4 values in its last dim, got shape [4, 5]"),
    ("fsq_forward", lambda: (torch.tensor(0.5), [8], False, False), ValueError,
     "z must have len(levels) = 1 values in its last dim, got shape []"),
    ("fsq_forward", lambda: (arg(4, 4, dtype=torch.float64), [8, 5, 5, 5], False, True), TypeError,
     "z must be float32, float16 or bfloat16, got Double"),
    ("fsq_forward", lambda: (torch.zeros(4, 4, dtype=torch.int32), [8, 5, 5, 5], False, True), TypeError,
     "z must be float32, float16 or bfloat16, got Int"),
    ("fsq_backward", lambda: (arg(4, 3), arg(4, 3), [4, 4, 1], True), ValueError,
     "levels must each be >= 2, got [4, 4, 1]"),
    ("fsq_backward", lambda: (arg(4, 3), arg(4, 3), [8, 5, 5, 5], False), ValueError,
     "z must have len(levels) = 4 values in its last dim, got shape [4, 3]"),
    ("fsq_backward", lambda: (arg(4, 4), arg(4, 5), [8, 5, 5, 5], False), ValueError,
     "grad_codes must have z's shape [4, 4], got [4, 5]"),
    ("fsq_backward", lambda: (arg(4, 4), arg(4, 4, dtype=torch.float16), [8, 5, 5, 5], False), TypeError,
     "grad_codes must have z's dtype (Float), got Half"),
    ("fsq_backward", lambda: (arg(4, 4), OnCPU(arg(4, 4)), [8, 5, 5, 5], False), ValueError,
     "grad_codes must be on the device of z"),
]


# ------------------------------------------------------------------------------ property cases
PROPERTY_EXAMPLES = (60, 12)


def property_case(pair, draw):
    """Random leading shapes (empty included), layouts, dtypes, values (NaN, inf, huge, tiny) and
    levels, with and without indices: codes, indices and the gradient against the float64
    reference; a value within BOUNDARY_MARGIN of a rounding boundary may be one level off (and its
    row's index then differs)."""
    from cases import LAYOUTS, interpreted, make_tensor
    from tolerances import VALUE, assert_close_scaled

    device, backend = pair
    small = interpreted(pair)
    levels, symmetric = draw.sample(LEVEL_SETS, "levels")
    lead = draw.sample([(0,), (1,), (7,), (3, 5)] + ([] if small else [(4097,), (2, 300)]), "leading shape")
    dtype = draw.sample(DTYPES, "dtype")
    layout = draw.sample(list(LAYOUTS), "layout")
    want = draw.boolean("indices")
    gen = torch.Generator().manual_seed(draw.integers(0, 2**32 - 1, "data seed"))
    shape = (*lead, len(levels))
    z = make_tensor(shape, dtype, layout, gen, **draw_values(draw, dtype, "z"), device=device).requires_grad_()
    codes, indices = pyvae.finite_scalar_quantize(z, levels, preserve_symmetry=symmetric, return_indices=want,
                                                  backend=backend)
    grad_codes = make_tensor(shape, dtype, "contiguous", gen, device=device)
    (grad,) = torch.autograd.grad(codes, z, grad_codes)
    z64 = z.detach().double().cpu()
    expected_codes, expected_indices = fsq_reference(z64, levels, symmetric)
    assert codes.dtype == dtype and codes.shape == z.shape
    near = boundary_distance(z64, levels, symmetric) < BOUNDARY_MARGIN
    far = codes.detach().cpu().where(~near, expected_codes.to(dtype))  # near a boundary: compared below
    assert_close_scaled(far, expected_codes, dtype, VALUE, 1.0, "codes")
    atol, rtol = VALUE[dtype]
    one_level = 1.0 / torch.tensor([d.center for d in dim_constants(levels, symmetric)], dtype=torch.float64)
    off = (codes.detach().cpu().double() - expected_codes).abs()
    assert (off <= one_level + atol + rtol)[near].all(), "codes near a boundary: more than one level off"
    if want:
        assert indices.dtype == torch.int32 and indices.shape == z.shape[:-1]
        exact = ~near.any(-1)
        assert torch.equal(indices.cpu()[exact], expected_indices[exact]), "indices"
        nan_rows = z64.isnan().any(-1)
        assert (indices.cpu()[nan_rows] == NAN_INDEX).all() and (indices.cpu()[~nan_rows] >= 0).all()
    else:
        assert indices is None
    expected_grad = fsq_backward_reference(z64, grad_codes.double().cpu(), levels, symmetric)
    grad_scale = torch.tensor([d.grad_scale for d in dim_constants(levels, symmetric)], dtype=torch.float64)
    assert_close_scaled(grad, expected_grad, dtype, VALUE, grad_codes.double().cpu().abs() * grad_scale, "gradient")
