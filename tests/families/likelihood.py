"""The cases of the likelihoods (op family ``likelihood``; see families/__init__.py)."""
import math

import torch

import pyvae
from pyvae._constants import LikelihoodFlag as flag
from pyvae.ops.likelihood import _cb_log_norm, likelihood_reference

from . import DTYPES, HUGE, OnCPU, arg, draw_values, pick, worst

_GRAD_PRED = flag.GRAD_PRED
LOSSES = {"bernoulli": pyvae.bernoulli_nll, "continuous_bernoulli": pyvae.continuous_bernoulli_nll,
          "gaussian": pyvae.gaussian_nll}


def example(a: torch.Tensor, b: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    return pyvae.bernoulli_nll(a, b.sigmoid(), backend=backend)


def sanitize(device: str, trim: bool) -> None:
    """Every loss, mixed dtypes, odd and long rows (split into column blocks), strided inputs, every
    logvar layout, with and without gradients."""
    dtype_pairs = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float16)]
    for shape in pick([(3, 1), (2, 7), (4, 3, 5, 5), (2, 20001), (1, 40000)], [(3, 1), (4, 3, 5, 5), (2, 20001)], trim):
        for pred_dtype, target_dtype in pick(dtype_pairs, dtype_pairs[:2], trim):
            pred = (3 * torch.randn(shape, device=device)).to(pred_dtype).requires_grad_()
            target = torch.rand(shape, device=device).to(target_dtype).requires_grad_()
            logvars = [None, torch.zeros(1, *shape[1:], device=device, requires_grad=True),
                       torch.zeros(shape, device=device, requires_grad=True)]
            for reduction in ("none", "per_sample", "batchmean"):
                for fn in (pyvae.bernoulli_nll, pyvae.continuous_bernoulli_nll):
                    out = fn(pred, target, reduction=reduction, backend=device)
                    out.backward(torch.ones_like(out))
                    with torch.no_grad():
                        fn(pred[:, ::2] if shape[-1] > 1 else pred, target[:, ::2] if shape[-1] > 1 else target,
                           reduction=reduction, backend=device)
                for logvar in logvars:
                    out = pyvae.gaussian_nll(pred, target, logvar, reduction=reduction, backend=device)
                    out.backward(torch.ones_like(out))
            # an upstream gradient of 2: the in-place scaling runs (for 1 it returns at once)
            out = pyvae.gaussian_nll(pred, target, logvars[1], reduction="sum", backend=device)
            out.backward(torch.full_like(out, 2.0))


def triton_launches(ops, t) -> None:
    """Every Triton kernel variant of the family: its launchers called on meta tensors."""
    for dtype in DTYPES:
        for loss in ("bernoulli", "gaussian", "continuous_bernoulli"):
            for cols in (3 * 32 * 32, 65537):
                pred, target = t(40, cols, dtype=dtype), t(40, cols)
                logvars = [None] if loss != "gaussian" else [None, t(1, cols), t(40, cols)]
                for logvar in logvars:
                    grads = flag.GRAD_PRED | flag.GRAD_TARGET | (flag.GRAD_LOGVAR if logvar is not None else 0)
                    for mode in (flag.GROUP_LOGVAR_GRAD, 0, flag.PER_ELEMENT):
                        ops.likelihood_forward(loss, pred, target, logvar, 0.0, 0.0, mode | grads, 1.0)
        ops.scale_grad_(t(1000, dtype=dtype), t(1))


# ------------------------------------------------------------------------------ bad calls
BAD_CALLS = [
    ("likelihood_forward", lambda: ("bernoulli", arg(4, 3), OnCPU(arg(4, 3)), None, 0.0, 0.0, _GRAD_PRED, 1.0),
     ValueError, "same device"),
    ("likelihood_forward", lambda: ("bernoulli", arg(4, 6), arg(4, 5), None, 0.0, 0.0, _GRAD_PRED, 1.0),
     ValueError, "same shape"),
    ("likelihood_forward", lambda: ("bernoulli", arg(4, 6), arg(6, 4), None, 0.0, 0.0, _GRAD_PRED, 1.0),
     ValueError, "same shape"),
    ("likelihood_forward", lambda: ("poisson", arg(4, 6), arg(4, 6), None, 0.0, 0.0, _GRAD_PRED, 1.0),
     ValueError, "loss must be"),
    ("likelihood_forward", lambda: ("gaussian", arg(4, 6, dtype=torch.float64), arg(4, 6), None, 0.0, 0.0, _GRAD_PRED,
                                    1.0), TypeError, "prediction must be float32"),
    ("likelihood_forward", lambda: ("gaussian", arg(4, 6), arg(4, 6), arg(3, 6), 0.0, 0.0,
                                    _GRAD_PRED | flag.GRAD_LOGVAR, 1.0),
     ValueError, "logvar of shape [3, 6] does not broadcast"),
    ("likelihood_forward", lambda: ("gaussian", arg(()), arg(()), None, 0.0, 0.0, _GRAD_PRED, 1.0),
     ValueError, "batch dimension"),
    ("likelihood_forward", lambda: ("gaussian", arg(4, 6), arg(4, 6), None, 0.0, 0.0, flag.GRAD_LOGVAR, 1.0),
     ValueError, "logvar is None"),
    ("likelihood_forward", lambda: ("gaussian", arg(4, 6), arg(4, 6), None, 0.0, 0.0, flag.ALL + 1, 1.0),
     ValueError, "flags must be a combination"),
    ("scale_grad_", lambda: (arg(4, 6).t(), torch.tensor(2.0)), ValueError, "grad must be contiguous"),
    ("scale_grad_", lambda: (arg(4, 6), torch.tensor([2.0, 3.0])), ValueError, "single float32 value"),
    ("scale_grad_", lambda: (arg(4, 6, dtype=torch.float64), torch.tensor(2.0)), TypeError, "grad must be float32"),
]


# ------------------------------------------------------------------------------ property cases
PROPERTY_EXAMPLES = (60, 50)


# Not -100: for logvar in about (-176, -88.7) exp(-logvar) overflows float32 while the loss itself
# may not (test_gaussian_nll_tiny_variance below); the huge values (exp(-logvar) = inf or 0 in
# float64 too) and ±inf stay in the pool.
GAUSSIAN_LOGVAR_MODERATE = 50.0
LOGVAR_FORMS = ["none", "float", "scalar tensor", "per channel", "per channel, no batch dim", "per pixel",
                "per pixel, expanded", "per element", "per sample"]


def _logvar_shape(form, shape):
    ones = (1,) * (len(shape) - 2)
    return {"scalar tensor": (), "per channel": (1, shape[1], *ones) if len(shape) > 1 else (1,),
            "per channel, no batch dim": (shape[1], *ones) if len(shape) > 1 else (),
            "per pixel": (1, *shape[1:]), "per pixel, expanded": (1, *shape[1:]),
            "per element": shape, "per sample": (shape[0], *(1,) * (len(shape) - 1))}[form]


def property_case(pair, draw):
    from cases import LAYOUTS, REDUCTIONS, interpreted, make_tensor, reduce_like
    from tolerances import SUM, VALUE, assert_close_scaled

    device, backend = pair
    small = interpreted(pair)
    loss = draw.sample(list(LOSSES), "loss")
    big = draw.boolean("past the 16384-column block")
    # 17: past a 16-row logvar group
    batch = draw.sample(([1] if small else [1, 2, 3]) if big else [0, 1, 2, 3, 17], "B")
    if big:
        rest = draw.sample([(16385,)] if small else [(16385,), (2, 8193), (32769,)], "rest")
    else:
        rest = tuple(draw.sample_list([1, 2, 3, 7], "rest", min_size=0, max_size=3))
    shape = (batch, *rest)
    pred_dtype = draw.sample(DTYPES, "pred dtype")
    target_dtype = draw.sample(DTYPES, "target dtype")
    gen = torch.Generator().manual_seed(draw.integers(0, 2**32 - 1, "data seed"))
    # logits of scale 0.3 sit around the continuous Bernoulli's switch to its Taylor series at |l| = 0.25
    pred_scale = draw.sample([1.0, 0.3] if loss == "gaussian" else [3.0, 0.3], "pred scale")
    pred = make_tensor(shape, pred_dtype, draw.sample(LAYOUTS, "pred layout"), gen,
                       **draw_values(draw, pred_dtype, "pred", huge=HUGE, scale=pred_scale), device=device)
    target = make_tensor(shape, target_dtype, draw.sample(LAYOUTS, "target layout"), gen,
                         **draw_values(draw, target_dtype, "target", huge=HUGE, scale=0.25, shift=0.5), device=device)
    reduction = draw.sample(REDUCTIONS, "reduction")
    kwargs, logvar, fixed, constant = {}, None, 0.0, 0.0
    dtype = worst(pred_dtype, target_dtype)
    if loss == "gaussian":
        full = draw.boolean("full")
        constant = 0.5 * math.log(2 * math.pi) if full else 0.0
        form = draw.sample(LOGVAR_FORMS, "logvar form")
        if form == "float":
            fixed = draw.sample([-0.7, 0.0, 2.5], "fixed logvar")
            kwargs["logvar"] = fixed
        elif form != "none":
            lv_dtype = draw.sample(DTYPES, "logvar dtype")
            lv_shape = _logvar_shape(form, shape)
            layout = "contiguous" if form == "scalar tensor" else draw.sample(LAYOUTS, "lv layout")
            logvar = make_tensor(lv_shape, lv_dtype, layout, gen, device=device,
                                 **draw_values(draw, lv_dtype, "logvar", huge=HUGE, moderate=GAUSSIAN_LOGVAR_MODERATE,
                                               scale=0.5))
            if form == "per pixel, expanded":
                logvar = logvar.expand(shape)
            kwargs["logvar"] = logvar
            dtype = worst(dtype, lv_dtype)
        kwargs["full"] = full

    out = LOSSES[loss](pred, target, reduction=reduction, backend=backend, **kwargs)

    p64, t64 = pred.double().cpu(), target.double().cpu()
    lv64 = logvar.double().cpu() if logvar is not None else None
    # each element is formed in float32 (inf where its float64 value overflows), then summed
    values = likelihood_reference(loss, p64, t64, lv64, fixed, constant).expand(shape).float().double()
    if loss == "gaussian":
        v = lv64 if lv64 is not None else torch.tensor(fixed, dtype=torch.float64)
        scale = 0.5 * ((t64 - p64) ** 2 * torch.exp(-v) + v.abs()) + constant
    else:
        scale = torch.nn.functional.softplus(p64) + (t64 * p64).abs()
        if loss == "continuous_bernoulli":
            scale = scale + _cb_log_norm(p64).abs()
    scale = scale.expand(shape)
    cols = math.prod(rest)
    assert out.dtype == torch.float32
    assert_close_scaled(out, reduce_like(values, reduction, batch), dtype, VALUE if reduction == "none" else SUM,
                        reduce_like(scale, reduction, batch) + (0 if reduction == "none" else cols * SUM[dtype][0]
                                                                / SUM[dtype][1]), f"{loss} nll ({reduction})")
