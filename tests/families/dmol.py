"""The cases of the discretized mixture of logistics (op family ``dmol``; see families/__init__.py)."""
import torch

import pyvae
from pyvae.ops.dmol import dmol_num_params

from . import DTYPES, TRIMMED_DTYPES, OnCPU, arg, pick

# the gradient's tolerance: float32 arithmetic, then the rounding to params' dtype
GRAD = {torch.float32: (1e-4, 3e-5), torch.float16: (4e-3, 2e-3), torch.bfloat16: (3e-2, 1.6e-2)}


def example(a: torch.Tensor, b: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    # 4 grey images of 2 pixels, one component: params [4, 3, 2], x [4, 1, 2]
    return pyvae.discretized_mix_logistic_nll(a[:, :6].reshape(4, 3, 2), b[:, None, :2].clamp(-1, 1), num_mix=1,
                                              backend=backend)


def random_case(batch, positions, num_mix, channels, *, layout="channels_first", num_classes=256,
                dtype=torch.float32, device="cpu", scale=1.0, generator=None):
    """(params, x as class indices) of a random problem; positions a tuple (H, W), (T,) or ()."""
    p = dmol_num_params(num_mix, channels)
    if layout == "channels_first":
        shape_p, shape_x = (batch, p, *positions), (batch, channels, *positions)
    else:
        shape_p, shape_x = (batch, *positions, p), (batch, *positions, channels)
    params = (scale * torch.randn(shape_p, generator=generator)).to(device=device, dtype=dtype)
    x = torch.randint(0, num_classes, shape_x, generator=generator).to(device)
    return params, x


def sanitize(device: str, trim: bool) -> None:
    """RGB and grey, both layouts, every dtype, 8- and 16-bit classes, ragged position blocks, every
    reduction, with and without the gradient."""
    shapes = pick([((2, 5, 7), 3), ((3, 4097), 1), ((1, 16, 16), 3), ((2, 1), 1)], [((2, 5, 7), 3), ((3, 4097), 1)],
                  trim)
    for (batch, *positions), channels in shapes:
        for dtype in pick(DTYPES, TRIMMED_DTYPES, trim):
            for layout in ("channels_first", "channels_last"):
                for num_classes in (256, 65536):
                    params, x = random_case(batch, tuple(positions), 3, channels, layout=layout,
                                            num_classes=num_classes, dtype=dtype, device=device)
                    params.requires_grad_()
                    for reduction in ("none", "per_sample", "batchmean"):
                        out = pyvae.discretized_mix_logistic_nll(params, x, num_mix=3, num_classes=num_classes,
                                                                 layout=layout, reduction=reduction, backend=device)
                        out.backward(torch.ones_like(out))
                    with torch.no_grad():
                        pyvae.discretized_mix_logistic_nll(params, x, num_mix=3, num_classes=num_classes,
                                                           layout=layout, backend=device)
                    pyvae.discretized_mix_logistic_sample(params.detach(), num_mix=3, channels=channels,
                                                          layout=layout, backend=device)


def triton_launches(ops, t) -> None:
    """Every Triton kernel variant of the family: its launchers called on meta tensors."""
    for dtype in DTYPES:
        for channels in (1, 3):
            for layout_last in (False, True):
                p = dmol_num_params(10, channels)
                shape_p, shape_x = ((16, 64, 64, p), (16, 64, 64, channels)) if layout_last else \
                    ((16, p, 64, 64), (16, channels, 64, 64))
                for per_position in (False, True):
                    for want_grad in (False, True):
                        ops.dmol_forward(t(*shape_p, dtype=dtype), t(*shape_x), 10, 256, layout_last, per_position,
                                         want_grad, 1.0)
                ops.dmol_sample(t(*shape_p, dtype=dtype), t((), dtype=torch.int64), 10, channels, layout_last, 1.0)


# ------------------------------------------------------------------------------ bad calls
BAD_CALLS = [
    ("dmol_forward", lambda: (arg(2, 30, 4), OnCPU(arg(2, 3, 4)), 3, 256, False, False, False, 1.0),
     ValueError, "same device"),
    ("dmol_forward", lambda: (arg(2, 30, 4), arg(2, 3, 4), 0, 256, False, False, False, 1.0),
     ValueError, "num_mix must be >= 1"),
    ("dmol_forward", lambda: (arg(2, 30, 4), arg(2, 3, 4), 3, 1, False, False, False, 1.0),
     ValueError, "num_classes must be in [2, 65536], got 1"),
    ("dmol_forward", lambda: (arg(2, 30, 4), arg(2, 3, 4), 3, 65537, False, False, False, 1.0),
     ValueError, "num_classes must be in [2, 65536]"),
    ("dmol_forward", lambda: (arg(2, 30, 4, 1), arg(2, 3, 4), 3, 256, False, False, False, 1.0),
     ValueError, "same number of dims"),
    ("dmol_forward", lambda: (arg(30), arg(3), 3, 256, False, False, False, 1.0), ValueError, "at least 2"),
    ("dmol_forward", lambda: (arg(2, 20, 4), arg(2, 2, 4), 2, 256, False, False, False, 1.0),
     ValueError, "x must have 1 or 3 channels (dim 1), got shape [2, 2, 4]"),
    ("dmol_forward", lambda: (arg(2, 29, 4), arg(2, 3, 4), 3, 256, False, False, False, 1.0),
     ValueError, "params must have x's shape with 30 parameters in dim 1, got [2, 29, 4] for x [2, 3, 4]"),
    ("dmol_forward", lambda: (arg(2, 4, 10), arg(2, 4, 1), 3, 256, True, False, False, 1.0),
     ValueError, "with 9 parameters in dim 2, got [2, 4, 10]"),
    ("dmol_forward", lambda: (arg(2, 30, 5), arg(2, 3, 4), 3, 256, False, False, False, 1.0),
     ValueError, "params must have x's shape"),
    ("dmol_forward", lambda: (arg(2, 30, 4, dtype=torch.float64), arg(2, 3, 4), 3, 256, False, False, False, 1.0),
     TypeError, "params must be float32, float16 or bfloat16, got Double"),
    ("dmol_forward", lambda: (arg(2, 30, 4), torch.zeros(2, 3, 4, dtype=torch.int64), 3, 256, False, False, False,
                              1.0), TypeError, "x must be float32, float16 or bfloat16, got Long"),
    ("dmol_sample", lambda: (arg(2, 30, 4), torch.tensor(3), 0, 3, False, 1.0), ValueError, "num_mix must be >= 1"),
    ("dmol_sample", lambda: (arg(2, 30, 4), torch.tensor(3), 3, 2, False, 1.0), ValueError,
     "channels must be 1 or 3, got 2"),
    ("dmol_sample", lambda: (arg(30), torch.tensor(3), 3, 3, False, 1.0), ValueError, "at least 2 dims"),
    ("dmol_sample", lambda: (arg(2, 29, 4), torch.tensor(3), 3, 3, False, 1.0), ValueError,
     "params must have 30 parameters in dim 1, got [2, 29, 4]"),
    ("dmol_sample", lambda: (arg(2, 4, 30), torch.tensor(3), 3, 3, False, 1.0), ValueError, "30 parameters in dim 1"),
    ("dmol_sample", lambda: (arg(2, 30, 4), torch.tensor(3).int(), 3, 3, False, 1.0), ValueError,
     "seed must be a one-element int64 tensor"),
    ("dmol_sample", lambda: (arg(2, 30, 4), OnCPU(torch.tensor(3)), 3, 3, False, 1.0), ValueError,
     "seed must be on the device of params"),
    ("dmol_sample", lambda: (arg(2, 30, 4), torch.tensor(3), 3, 3, False, -0.5), ValueError,
     "temperature must be >= 0, got -0.5"),
    ("dmol_sample", lambda: (arg(2, 30, 4, dtype=torch.float64), torch.tensor(3), 3, 3, False, 1.0), TypeError,
     "params must be float32, float16 or bfloat16, got Double"),
]


# ------------------------------------------------------------------------------ property cases
PROPERTY_EXAMPLES = (40, 10)


def property_case(pair, draw):
    from cases import interpreted
    from tolerances import SUM, assert_close_scaled

    device, backend = pair
    small = interpreted(pair)
    channels = draw.sample([1, 3], "C")
    num_mix = draw.sample([1, 2, 5] if small else [1, 2, 5, 10], "M")
    positions = draw.sample([(), (1,), (7,), (3, 5)] + ([] if small else [(4097,), (9, 33)]), "positions")
    batch = draw.sample([0, 1, 2, 3], "B")
    layout = draw.sample(["channels_first", "channels_last"], "layout")
    num_classes = draw.sample([2, 3, 17, 256, 65536], "classes")
    dtype = draw.sample(DTYPES, "dtype")
    scale = draw.sample([0.1, 1.0, 3.0], "scale")
    reduction = draw.sample(["none", "per_sample", "sum", "batchmean", "mean"], "reduction")
    gen = torch.Generator().manual_seed(draw.integers(0, 2**32 - 1, "data seed"))
    params, x = random_case(batch, positions, num_mix, channels, layout=layout, num_classes=num_classes, dtype=dtype,
                            device=device, scale=scale, generator=gen)
    if draw.boolean("strided params"):  # every other element of a wider tensor
        params = torch.stack([params, torch.zeros_like(params)], -1)[..., 0]
    params.requires_grad_()
    kwargs = dict(num_mix=num_mix, num_classes=num_classes, layout=layout)
    out = pyvae.discretized_mix_logistic_nll(params, x, reduction=reduction, backend=backend, **kwargs)
    out.backward(torch.ones_like(out))
    p64 = params.detach().double().cpu().requires_grad_()
    ref = pyvae.discretized_mix_logistic_nll(p64, x.cpu(), reduction=reduction, backend="torch", **kwargs)
    ref.backward(torch.ones_like(ref))
    assert out.dtype == torch.float32 and out.shape == ref.shape
    # float32 arithmetic on the same parameters: errors relative to each position's NLL (its terms
    # are of that size), summed as the reduction sums; 1000 times that where a bin's mass is within
    # 0.1% of the threshold of the mid-bin density (float32 and float64 may pick different formulas)
    # The data grid is float32 in the kernels (exact in the reference): its rounding, times a
    # component's inverse scale s (up to e^7), moves the standardised values, and the gradients
    # (s times a function of them) by s^2 ulps.
    near, inv_scale = conditioning(p64.detach(), x.cpu(), **kwargs)
    per_position = pyvae.discretized_mix_logistic_nll(p64.detach(), x.cpu(), reduction="none", backend="torch",
                                                      **kwargs).abs() + 1.0 + 0.01 * inv_scale
    per_position = per_position * (1.0 + 1000.0 * near)
    flat = per_position.flatten(1) if per_position.dim() > 1 else per_position[:, None]
    magnitude = {"none": per_position, "per_sample": flat.sum(1), "sum": flat.sum(),
                 "batchmean": flat.sum() / max(batch, 1), "mean": flat.sum() / max(x.numel(), 1)}[reduction]
    assert_close_scaled(out, ref.detach(), torch.float32, SUM, magnitude, f"nll ({reduction})")
    # a gradient is a posterior (exp of a difference of log-probabilities of that size: its error
    # grows with the NLL) times a component's derivative; then rounded to params' dtype
    position_dim = -1 if layout == "channels_last" else 1
    largest = p64.grad.abs().amax(position_dim)  # per position
    grad_scale = largest * (1.0 + per_position / 10) + 0.02 * inv_scale ** 2 * largest.clamp(max=1.0)
    assert_close_scaled(params.grad, p64.grad, dtype, GRAD, grad_scale.unsqueeze(position_dim), "gradient")


def conditioning(params, x, *, num_mix, num_classes, layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position (float64): 1 where a bin's float64 log-mass lies within 1e-3 of the log of the
    mid-bin threshold for some component and channel (else 0), and the largest inverse scale."""
    from pyvae.kernels.contracts.dmol import LOG_MID_MASS_MIN, LOG_SCALE_MIN
    from pyvae.ops.dmol import coupled_means, data_grid, split_params

    last = layout == "channels_last"
    params_cl = params if last else params.movedim(1, -1)
    x_cl = data_grid(x if last else x.movedim(1, -1), num_classes, torch.float64).double()
    _, means, log_scales, coeffs = split_params(params_cl, num_mix, x_cl.shape[-1])
    centered = x_cl[..., None] - coupled_means(means, coeffs, x_cl)
    inv_scale = torch.exp(-log_scales.clamp(min=LOG_SCALE_MIN))
    half = 1.0 / (num_classes - 1)
    log_mass = -torch.nn.functional.softplus(-inv_scale * (centered + half)) \
        - torch.nn.functional.softplus(inv_scale * (centered - half)) + torch.log(-torch.expm1(-2 * half * inv_scale))
    near = ((log_mass - LOG_MID_MASS_MIN).abs() < 1e-3).flatten(-2).any(-1).double()
    return near, inv_scale.flatten(-2).amax(-1) if inv_scale.numel() else inv_scale.flatten(-2).sum(-1)
