"""The cases of reparameterize + KL (op family ``reparam_kl``; see families/__init__.py)."""
import math

import torch

import pyvae
from pyvae.ops.reparam_kl import reference_eps, reparameterize_kl_reference

from . import DTYPES, TRIMMED_DTYPES, OnCPU, arg, draw_values, pick

LN2 = math.log(2.0)
_SEED = torch.tensor(3, dtype=torch.int64)


def example(a: torch.Tensor, b: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    return pyvae.reparameterize_kl(a, b, seed=1, backend=backend)[1].sum()


def sanitize(device: str, trim: bool) -> None:
    """Odd and even row lengths, packed and unpacked loads, every dtype, several samples, per-element
    and per-row sums, strided inputs, with and without each gradient, with and without a prior of
    every layout."""
    for shape in pick([(3, 1), (5, 7), (2, 32), (4, 1023), (2, 4097), (129, 36)], [(3, 1), (5, 7), (2, 4097)], trim):
        for dtype in pick(DTYPES, TRIMMED_DTYPES, trim):
            for strided in (False, True):
                both = torch.randn(*shape[:-1], 2 * shape[-1], device=device, dtype=dtype)
                mu, logvar = both.chunk(2, -1) if strided else (both[..., : shape[-1]].contiguous(),
                                                                both[..., shape[-1]:].contiguous())
                mu, logvar = mu.detach().requires_grad_(), logvar.detach().requires_grad_()
                for n_samples in (1, 3):
                    for reduction in ("none", "per_sample", "mean"):
                        z, kl = pyvae.reparameterize_kl(mu, logvar, n_samples=n_samples, reduction=reduction,
                                                        backend=device)
                        torch.autograd.backward([z, kl], [torch.randn_like(z), torch.randn_like(kl)])
                z, kl = pyvae.reparameterize_kl(mu, logvar, backend=device)
                z.sum().backward()  # grad_kl absent
                z, kl = pyvae.reparameterize_kl(mu, logvar, backend=device)
                kl.sum().backward()  # grad_z absent
                # a Gaussian prior: full and strided (packed and unpacked loads), one row ([Z]: row
                # stride 0), one value per row ([..., 1]: column stride 0), either tensor alone
                full = torch.randn(*shape[:-1], 2 * shape[-1], device=device, dtype=dtype).chunk(2, -1)[0]
                priors = [(full.contiguous(), full), (torch.randn(shape[-1], device=device, dtype=dtype), None),
                          (None, torch.randn(*shape[:-1], 1, device=device, dtype=dtype))]
                for prior_mu, prior_logvar in priors:
                    prior_mu = prior_mu.detach().requires_grad_() if prior_mu is not None else None
                    prior_logvar = prior_logvar.detach().requires_grad_() if prior_logvar is not None else None
                    for n_samples, reduction in ((1, "none"), (3, "per_sample")):
                        z, kl = pyvae.reparameterize_kl(mu, logvar, prior_mu=prior_mu, prior_logvar=prior_logvar,
                                                        n_samples=n_samples, reduction=reduction, backend=device)
                        torch.autograd.backward([z, kl], [torch.randn_like(z), torch.randn_like(kl)])
                    z, kl = pyvae.reparameterize_kl(mu, logvar, prior_mu=prior_mu, prior_logvar=prior_logvar,
                                                    backend=device)
                    z.sum().backward()  # grad_kl absent: the prior plays no part
                # the packed ops: one [rows, 2, Z] tensor, clamped or not, the gradient of z.sum()
                # read in place (stride 0)
                params = both.view(*shape[:-1], 2, shape[-1]).detach().requires_grad_()
                for bounds in ((None, None), (-0.5, 0.5)):
                    z, kl = pyvae.reparameterize_kl_packed(params, dim=-2, logvar_min=bounds[0], logvar_max=bounds[1],
                                                           reduction="none", backend=device)
                    torch.autograd.backward([z, kl], [torch.randn_like(z), torch.randn_like(kl)])
                    z, kl = pyvae.reparameterize_kl_packed(params, dim=-2, logvar_min=bounds[0], logvar_max=bounds[1],
                                                           backend=device)
                    (z.sum() + kl.sum()).backward()


def triton_launches(ops, t) -> None:
    """Every Triton kernel variant of the family: its launchers called on meta tensors."""
    for dtype in DTYPES:
        for cols in (1024, 7, 100000):  # whole short rows per program, ragged, rows longer than a block
            mu = t(64, cols, dtype=dtype)
            for seed in (None, 5):
                ops.reparam_kl_forward(mu, mu, seed, 2, False)
            ops.reparam_kl_forward(mu, mu, 5, 1, True)
            seed = t((), dtype=torch.int64)
            for grad_z, grad_kl in ((t(2, 64, cols, dtype=dtype), t(64, cols)), (t(1, 64, cols, dtype=dtype), None),
                                    (None, t(64, cols))):
                ops.reparam_kl_backward(mu, mu, seed, grad_z, grad_kl)
            # a Gaussian prior: full, one row for the batch ([Z]: stride 0), one value per row
            # ([B, 1]: column stride 0), or either tensor alone
            for prior_mu, prior_logvar in ((mu, t(cols, dtype=dtype)), (t(64, 1, dtype=dtype), None), (None, mu)):
                ops.reparam_kl_forward(mu, mu, 5, 2, False, prior_mu, prior_logvar)
                ops.reparam_kl_forward(mu, mu, None, 1, True, prior_mu, prior_logvar)
                for grad_z in (t(1, 64, cols, dtype=dtype), None):
                    ops.reparam_kl_backward(mu, mu, seed, grad_z, t(64, cols), prior_mu, prior_logvar,
                                            prior_mu is not None, prior_logvar is not None)
            # the packed ops, clamped or not
            params = t(64, 2, cols, dtype=dtype)
            for bounds in ((None, None), (-30.0, 20.0)):
                ops.reparam_kl_packed_forward(params, None, False, *bounds)
                ops.reparam_kl_packed_forward(params, 5, True, *bounds)
                for grad_z, grad_kl in ((t(64, cols, dtype=dtype), t(64, cols)), (None, t(64, cols)),
                                        (t(64, cols, dtype=dtype), None)):
                    ops.reparam_kl_packed_backward(params, seed, grad_z, grad_kl, *bounds)


# ------------------------------------------------------------------------------ bad calls
BAD_CALLS = [
    ("reparam_kl_forward", lambda: (arg(4, 3), OnCPU(arg(4, 3)), 1, 1, False), ValueError, "same device"),
    ("reparam_kl_forward", lambda: (arg(2, 3), arg(2, 4), 1, 1, False), ValueError, "same shape"),
    ("reparam_kl_forward", lambda: (arg(2, 3), arg(2, 3, dtype=torch.float16), 1, 1, False), TypeError, "same dtype"),
    ("reparam_kl_forward", lambda: (arg(2, 3, dtype=torch.float64), arg(2, 3, dtype=torch.float64), 1, 1, False),
     TypeError, "float32, float16 or bfloat16, got Double"),
    ("reparam_kl_forward", lambda: (arg(()), arg(()), 1, 1, False), ValueError, "at least one dimension"),
    ("reparam_kl_forward", lambda: (arg(2, 3), arg(2, 3), -1, 1, False), ValueError, "seed must be in"),
    ("reparam_kl_forward", lambda: (arg(2, 3), arg(2, 3), 1, 0, False), ValueError, "n_samples must be >= 1"),
    ("reparam_kl_forward", lambda: (arg(2, 3), arg(2, 3), 1, 1, False, arg(3, 3)), ValueError, "does not broadcast"),
    ("reparam_kl_forward", lambda: (arg(2, 3), arg(2, 3), 1, 1, False, None, arg(3, dtype=torch.float16)),
     TypeError, "prior_logvar must have the dtype of mu"),
    # a grad_z or grad_kl of the wrong shape would be read past its end
    ("reparam_kl_backward", lambda: (arg(4, 3), arg(4, 3), _SEED, arg(2, 3, 3), None), ValueError, "grad_z must have shape"),
    ("reparam_kl_backward", lambda: (arg(4, 3), arg(4, 3), _SEED, arg(1, 4, 2), None), ValueError, "grad_z must have shape"),
    ("reparam_kl_backward", lambda: (arg(4, 3), arg(4, 3), _SEED, arg(1, 4, 3, dtype=torch.float16), None),
     TypeError, "grad_z must have the dtype"),
    ("reparam_kl_backward", lambda: (arg(4, 3), arg(4, 3), _SEED, None, arg(3, 4)), ValueError, "grad_kl must have the shape"),
    ("reparam_kl_backward", lambda: (arg(4, 3), arg(4, 3), _SEED, None, arg(4, 3, dtype=torch.float16)),
     TypeError, "grad_kl must be float32"),
    ("reparam_kl_backward", lambda: (arg(4, 3), arg(4, 3), _SEED.int(), None, arg(4, 3)), ValueError, "one-element int64"),
    ("reparam_kl_backward", lambda: (arg(4, 3), arg(4, 3), _SEED, None, arg(4, 3), None, None, True, False),
     ValueError, "prior_mu_grad needs a prior_mu"),
    ("reparam_kl_packed_forward", lambda: (arg(4, 3, 5), 1, False), ValueError, "params must have shape [..., 2, Z]"),
    ("reparam_kl_packed_forward", lambda: (arg(5), 1, False), ValueError, "params must have shape [..., 2, Z]"),
    ("reparam_kl_packed_forward", lambda: (arg(4, 2, 5, dtype=torch.float64), 1, False), TypeError,
     "params must be float32, float16 or bfloat16, got Double"),
    ("reparam_kl_packed_forward", lambda: (arg(4, 2, 5), -1, False), ValueError, "seed must be in"),
    ("reparam_kl_packed_forward", lambda: (arg(4, 2, 5), 1, False, 2.0, 1.0), ValueError,
     "logvar_min must be <= logvar_max"),
    ("reparam_kl_packed_forward", lambda: (arg(4, 2, 5), 1, False, float("nan")), ValueError,
     "logvar_min and logvar_max must not be NaN"),
    ("reparam_kl_packed_backward", lambda: (arg(4, 2, 3), _SEED, arg(1, 4, 3), None), ValueError,
     "grad_z must have the shape of z, [4, 3], got [1, 4, 3]"),
    ("reparam_kl_packed_backward", lambda: (arg(4, 2, 3), _SEED, arg(4, 3, dtype=torch.float16), None), TypeError,
     "grad_z must have the dtype of params"),
    ("reparam_kl_packed_backward", lambda: (arg(4, 2, 3), _SEED, None, arg(4, 2, 3)), ValueError,
     "grad_kl must have the shape of z"),
    ("reparam_kl_packed_backward", lambda: (arg(4, 2, 3), _SEED, None, arg(4, 3, dtype=torch.float16)), TypeError,
     "grad_kl must be float32"),
    ("reparam_kl_packed_backward", lambda: (arg(4, 2, 3), _SEED.int(), None, None), ValueError, "one-element int64"),
    ("reparam_kl_packed_backward", lambda: (arg(4, 2, 3), _SEED, None, None, None, float("nan")), ValueError,
     "must not be NaN"),
]


# ------------------------------------------------------------------------------ property cases
PROPERTY_EXAMPLES = (80, 20)


def property_case(pair, draw):
    if draw.sample(["mu, logvar", "packed"], "form") == "packed":
        return _packed_property_case(pair, draw)
    from cases import LAYOUTS, REDUCTIONS, interpreted, make_tensor, reduce_like
    from tolerances import SUM, VALUE, assert_close_scaled, noise_scale

    device, backend = pair
    small = interpreted(pair)
    # rows beyond one program's BLOCK_R, rows longer than one 2048-element chunk of groups of 4
    z_dim = draw.sample([1, 2, 3, 7, 33] + ([2049] if small else [8195]), "Z")
    lead = draw.sample_list([0, 1, 2, 3, 5] if small or z_dim > 33 else [0, 1, 3, 70], "leading dims", max_size=2)
    shape = (*lead, z_dim)
    dtype = draw.sample(DTYPES, "dtype")
    gen = torch.Generator().manual_seed(draw.integers(0, 2**32 - 1, "data seed"))
    mu = make_tensor(shape, dtype, draw.sample(LAYOUTS, "mu layout"), gen,
                     **draw_values(draw, dtype, "mu"), device=device)
    logvar = make_tensor(shape, dtype, draw.sample(LAYOUTS, "logvar layout"), gen,
                         **draw_values(draw, dtype, "logvar"), device=device)
    prior_shapes = {"none": None, "full": shape, "per dim": (z_dim,), "per dim [1, Z]": (1, z_dim),
                    "per sample": (*lead, 1)}
    if len(shape) < 2:
        del prior_shapes["per dim [1, Z]"]  # a prior may not have more dims than mu
    prior_form = draw.sample(list(prior_shapes), "prior")
    prior_mu = prior_logvar = None
    if prior_form != "none":
        which = draw.sample(["both", "mu", "logvar"], "prior tensors")
        pshape = prior_shapes[prior_form]
        layout = draw.sample(LAYOUTS, "prior layout")
        if which != "logvar":
            prior_mu = make_tensor(pshape, dtype, layout, gen, **draw_values(draw, dtype, "prior_mu"), device=device)
        if which != "mu":
            prior_logvar = make_tensor(pshape, dtype, layout, gen, **draw_values(draw, dtype, "prior_logvar"),
                                       device=device)
    n_samples = draw.sample([1, 2], "n_samples")
    reduction = draw.sample(REDUCTIONS, "reduction")
    seed = draw.integers(0, 2**63 - 1, "seed")

    z, kl = pyvae.reparameterize_kl(mu, logvar, prior_mu=prior_mu, prior_logvar=prior_logvar, n_samples=n_samples,
                                    seed=seed, reduction=reduction, backend=backend)

    mu64, lv64 = mu.double().cpu(), logvar.double().cpu()
    pmu64 = prior_mu.double().cpu() if prior_mu is not None else None
    plv64 = prior_logvar.double().cpu() if prior_logvar is not None else None
    z_ref, kl_el = reparameterize_kl_reference(mu64, lv64, torch.tensor(seed), n_samples, "none", pmu64, plv64)
    z_ref = z_ref[0] if n_samples == 1 else z_ref
    eps = reference_eps(seed, shape, n_samples, torch.float64)
    assert z.dtype == dtype
    assert_close_scaled(z, z_ref, dtype, VALUE, noise_scale(mu64, lv64, eps[0] if n_samples == 1 else eps), "z")

    if pmu64 is None and plv64 is None:
        kl_scale = 0.5 * (1 + lv64.abs() + mu64 ** 2 + torch.exp(lv64))
    else:
        zero = torch.zeros((), dtype=torch.float64)
        pmu, plv = (pmu64 if pmu64 is not None else zero), (plv64 if plv64 is not None else zero)
        x = lv64 - plv
        u = (mu64 - pmu) * torch.exp(-0.5 * (plv + LN2))
        kl_scale = u * u + torch.exp(x - LN2) + 0.5 * (x.abs() + 1)
    rows = mu.numel() // z_dim if z_dim else 0

    def reduce(values):
        out = reduce_like(values, reduction, rows)
        return out.reshape(shape[:-1]) if reduction == "per_sample" else out

    assert kl.dtype == torch.float32
    # each element is formed in float32 (inf where its float64 value overflows), then summed
    assert_close_scaled(kl, reduce(kl_el.float().double()), dtype, SUM, reduce(kl_scale), f"kl ({reduction})")


def _packed_property_case(pair, draw):
    """reparameterize_kl_packed: params [..., 2, Z] of any layout, clamped on either side or not,
    against the float64 reference of its two halves (the log-variance clamped first)."""
    from cases import LAYOUTS, REDUCTIONS, interpreted, make_tensor, reduce_like
    from tolerances import SUM, VALUE, assert_close_scaled, noise_scale

    device, backend = pair
    small = interpreted(pair)
    z_dim = draw.sample([1, 3, 8, 33] + ([2049] if small else [8195]), "Z")
    lead = draw.sample_list([1, 2, 5] if small or z_dim > 33 else [1, 3, 70], "leading dims", max_size=2)
    shape = (*lead, 2, z_dim)
    dtype = draw.sample(DTYPES, "dtype")
    gen = torch.Generator().manual_seed(draw.integers(0, 2**32 - 1, "data seed"))
    params = make_tensor(shape, dtype, draw.sample(LAYOUTS, "params layout"), gen,
                         **draw_values(draw, dtype, "params"), device=device)
    bounds = draw.sample([(None, None), (-30.0, 20.0), (-1.0, None), (None, 0.5), (0.0, 0.0)], "logvar bounds")
    reduction = draw.sample(REDUCTIONS, "reduction")
    seed = draw.integers(0, 2**63 - 1, "seed")

    z, kl = pyvae.reparameterize_kl_packed(params, dim=len(lead), logvar_min=bounds[0], logvar_max=bounds[1],
                                           seed=seed, reduction=reduction, backend=backend)

    mu64, lv64 = params.double().cpu().unbind(-2)
    if bounds != (None, None):
        lv64 = lv64.clamp(*bounds)
    z_ref, kl_el = reparameterize_kl_reference(mu64, lv64, torch.tensor(seed), 1, "none")
    eps = reference_eps(seed, mu64.shape, 1, torch.float64)[0]
    latent = (*lead, 1, z_dim)
    assert z.dtype == dtype and z.shape == latent
    assert_close_scaled(z.reshape(mu64.shape), z_ref[0], dtype, VALUE, noise_scale(mu64, lv64, eps), "z")
    kl_scale = 0.5 * (1 + lv64.abs() + mu64 ** 2 + torch.exp(lv64))
    rows = mu64.numel() // z_dim

    def reduce(values):
        out = reduce_like(values, reduction, rows)
        return out.reshape(tuple(lead)) if reduction == "per_sample" else out.reshape(latent) if reduction == "none" else out

    assert kl.dtype == torch.float32
    assert_close_scaled(kl, reduce(kl_el.float().double()), dtype, SUM, reduce(kl_scale), f"kl ({reduction})")
