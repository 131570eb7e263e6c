"""A small run of every CUDA kernel, for compute-sanitizer (bench/gpu_check.sh): odd and even row
lengths, packed and unpacked loads, every dtype, several samples, per-element and per-row sums,
strided inputs, with and without each gradient, with and without a prior of every layout. Not a
pytest module (no test_ prefix).

    python tests/cuda_sanitize_cases.py [--trim] [--cpu] [FAMILY...]   (default: every family of pyvae.registry)

The cases of op family ``<name>`` are ``<name>_cases(trim)`` below; ``--trim`` keeps the shapes
that reach every code path (one element per row, ragged rows, rows longer than a block) and two
dtypes (float32, and bfloat16 for the 16-bit paths), so that racecheck fits a short GPU session.
``--cpu`` runs the same cases on the cpu backend: a check of this script where there is no GPU.
"""
import sys

import torch

import pyvae
from pyvae import registry

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRIMMED_DTYPES = (torch.float32, torch.bfloat16)
DEVICE = "cuda"  # the device of every tensor, and the backend of every call (main's --cpu: "cpu")


def _pick(cases: list, trimmed: list, trim: bool) -> list:
    return trimmed if trim else cases


def reparam_kl_cases(trim: bool) -> None:
    for shape in _pick([(3, 1), (5, 7), (2, 32), (4, 1023), (2, 4097), (129, 36)], [(3, 1), (5, 7), (2, 4097)], trim):
        for dtype in _pick(DTYPES, TRIMMED_DTYPES, trim):
            for strided in (False, True):
                both = torch.randn(*shape[:-1], 2 * shape[-1], device=DEVICE, dtype=dtype)
                mu, logvar = both.chunk(2, -1) if strided else (both[..., : shape[-1]].contiguous(),
                                                                both[..., shape[-1]:].contiguous())
                mu, logvar = mu.detach().requires_grad_(), logvar.detach().requires_grad_()
                for n_samples in (1, 3):
                    for reduction in ("none", "per_sample", "mean"):
                        z, kl = pyvae.reparameterize_kl(mu, logvar, n_samples=n_samples, reduction=reduction,
                                                        backend=DEVICE)
                        torch.autograd.backward([z, kl], [torch.randn_like(z), torch.randn_like(kl)])
                z, kl = pyvae.reparameterize_kl(mu, logvar, backend=DEVICE)
                z.sum().backward()  # grad_kl absent
                z, kl = pyvae.reparameterize_kl(mu, logvar, backend=DEVICE)
                kl.sum().backward()  # grad_z absent
                # a Gaussian prior: full and strided (packed and unpacked loads), one row ([Z]: row
                # stride 0), one value per row ([..., 1]: column stride 0), either tensor alone
                full = torch.randn(*shape[:-1], 2 * shape[-1], device=DEVICE, dtype=dtype).chunk(2, -1)[0]
                priors = [(full.contiguous(), full), (torch.randn(shape[-1], device=DEVICE, dtype=dtype), None),
                          (None, torch.randn(*shape[:-1], 1, device=DEVICE, dtype=dtype))]
                for prior_mu, prior_logvar in priors:
                    prior_mu = prior_mu.detach().requires_grad_() if prior_mu is not None else None
                    prior_logvar = prior_logvar.detach().requires_grad_() if prior_logvar is not None else None
                    for n_samples, reduction in ((1, "none"), (3, "per_sample")):
                        z, kl = pyvae.reparameterize_kl(mu, logvar, prior_mu=prior_mu, prior_logvar=prior_logvar,
                                                        n_samples=n_samples, reduction=reduction, backend=DEVICE)
                        torch.autograd.backward([z, kl], [torch.randn_like(z), torch.randn_like(kl)])
                    z, kl = pyvae.reparameterize_kl(mu, logvar, prior_mu=prior_mu, prior_logvar=prior_logvar,
                                                    backend=DEVICE)
                    z.sum().backward()  # grad_kl absent: the prior plays no part


def likelihood_cases(trim: bool) -> None:
    # every loss, mixed dtypes, odd and long rows (split into column blocks), strided inputs, every
    # logvar layout, with and without gradients
    dtype_pairs = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float16)]
    for shape in _pick([(3, 1), (2, 7), (4, 3, 5, 5), (2, 20001), (1, 40000)], [(3, 1), (4, 3, 5, 5), (2, 20001)], trim):
        for pred_dtype, target_dtype in _pick(dtype_pairs, dtype_pairs[:2], trim):
            pred = (3 * torch.randn(shape, device=DEVICE)).to(pred_dtype).requires_grad_()
            target = torch.rand(shape, device=DEVICE).to(target_dtype).requires_grad_()
            logvars = [None, torch.zeros(1, *shape[1:], device=DEVICE, requires_grad=True),
                       torch.zeros(shape, device=DEVICE, requires_grad=True)]
            for reduction in ("none", "per_sample", "batchmean"):
                for fn in (pyvae.bernoulli_nll, pyvae.continuous_bernoulli_nll):
                    out = fn(pred, target, reduction=reduction, backend=DEVICE)
                    out.backward(torch.ones_like(out))
                    with torch.no_grad():
                        fn(pred[:, ::2] if shape[-1] > 1 else pred, target[:, ::2] if shape[-1] > 1 else target,
                           reduction=reduction, backend=DEVICE)
                for logvar in logvars:
                    out = pyvae.gaussian_nll(pred, target, logvar, reduction=reduction, backend=DEVICE)
                    out.backward(torch.ones_like(out))
            # an upstream gradient of 2: the in-place scaling runs (for 1 it returns at once)
            out = pyvae.gaussian_nll(pred, target, logvars[1], reduction="sum", backend=DEVICE)
            out.backward(torch.full_like(out, 2.0))


def vq_cases(trim: bool) -> None:
    # odd D and K, ragged tiles, every dtype, strided x, skewed code usage
    for n, k, d in _pick([(1, 1, 3), (70, 5, 7), (129, 65, 33), (300, 1000, 64)], [(1, 1, 3), (129, 65, 33)], trim):
        for dtype in _pick(DTYPES, TRIMMED_DTYPES, trim):
            x = torch.randn(n, 2 * d, device=DEVICE).to(dtype)[:, ::2].requires_grad_()
            codebook = torch.randn(k, d, device=DEVICE).to(dtype).requires_grad_()
            for precision in ("exact", "fast"):
                r = pyvae.vector_quantize(x, codebook, precision=precision, backend=DEVICE)
                (r.quantized.float().sum() + r.loss).backward()
            skewed = torch.zeros(n, dtype=torch.int64, device=DEVICE)
            skewed[: n // 3] = torch.arange(n // 3, device=DEVICE) % k
            pyvae.codebook_stats(x.detach(), skewed, k, backend=DEVICE)


def main(argv: list[str]) -> int:
    global DEVICE
    trim, DEVICE = "--trim" in argv, "cpu" if "--cpu" in argv else "cuda"
    families = [registry.family(name) for name in argv if not name.startswith("--")] or registry.FAMILIES
    torch.manual_seed(0)
    for family in families:
        globals()[family.sanitize_cases](trim)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        print(f"sanitize cases done: {family.name}{' (trimmed)' if trim else ''}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
