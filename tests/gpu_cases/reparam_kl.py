"""The GPU checks' cases of reparameterize + KL (op family ``reparam_kl``; see gpu_cases/__init__.py)."""
import torch

import pyvae

from . import DTYPES, TRIMMED_DTYPES, pick


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
