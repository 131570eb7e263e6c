"""The GPU checks' cases of the likelihoods (op family ``likelihood``; see gpu_cases/__init__.py)."""
import torch

import pyvae
from pyvae._constants import LikelihoodFlag as flag

from . import DTYPES, TRIMMED_DTYPES, pick


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
