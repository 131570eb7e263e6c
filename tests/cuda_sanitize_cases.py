"""A small run of every CUDA kernel, for compute-sanitizer (bench/gpu_check.sh): odd and even row
lengths, packed and unpacked loads, every dtype, several samples, per-element and per-row sums,
strided inputs, with and without each gradient, with and without a prior of every layout. Not a
pytest module (no test_ prefix)."""
import torch

import pyvae


def main() -> None:
    torch.manual_seed(0)
    for shape in [(3, 1), (5, 7), (2, 32), (4, 1023), (2, 4097), (129, 36)]:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for strided in (False, True):
                both = torch.randn(*shape[:-1], 2 * shape[-1], device="cuda", dtype=dtype)
                mu, logvar = both.chunk(2, -1) if strided else (both[..., : shape[-1]].contiguous(),
                                                                both[..., shape[-1]:].contiguous())
                mu, logvar = mu.detach().requires_grad_(), logvar.detach().requires_grad_()
                for n_samples in (1, 3):
                    for reduction in ("none", "per_sample", "mean"):
                        z, kl = pyvae.reparameterize_kl(mu, logvar, n_samples=n_samples, reduction=reduction,
                                                        backend="cuda")
                        torch.autograd.backward([z, kl], [torch.randn_like(z), torch.randn_like(kl)])
                z, kl = pyvae.reparameterize_kl(mu, logvar, backend="cuda")
                z.sum().backward()  # grad_kl absent
                z, kl = pyvae.reparameterize_kl(mu, logvar, backend="cuda")
                kl.sum().backward()  # grad_z absent
                # a Gaussian prior: full and strided (packed and unpacked loads), one row ([Z]: row
                # stride 0), one value per row ([..., 1]: column stride 0), either tensor alone
                full = torch.randn(*shape[:-1], 2 * shape[-1], device="cuda", dtype=dtype).chunk(2, -1)[0]
                priors = [(full.contiguous(), full), (torch.randn(shape[-1], device="cuda", dtype=dtype), None),
                          (None, torch.randn(*shape[:-1], 1, device="cuda", dtype=dtype))]
                for prior_mu, prior_logvar in priors:
                    prior_mu = prior_mu.detach().requires_grad_() if prior_mu is not None else None
                    prior_logvar = prior_logvar.detach().requires_grad_() if prior_logvar is not None else None
                    for n_samples, reduction in ((1, "none"), (3, "per_sample")):
                        z, kl = pyvae.reparameterize_kl(mu, logvar, prior_mu=prior_mu, prior_logvar=prior_logvar,
                                                        n_samples=n_samples, reduction=reduction, backend="cuda")
                        torch.autograd.backward([z, kl], [torch.randn_like(z), torch.randn_like(kl)])
                    z, kl = pyvae.reparameterize_kl(mu, logvar, prior_mu=prior_mu, prior_logvar=prior_logvar,
                                                    backend="cuda")
                    z.sum().backward()  # grad_kl absent: the prior plays no part
    # likelihoods: every loss, mixed dtypes, odd and long rows (split into column blocks), strided
    # inputs, every logvar layout, with and without gradients
    for shape in [(3, 1), (2, 7), (4, 3, 5, 5), (2, 20001), (1, 40000)]:
        for pred_dtype, target_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                         (torch.float16, torch.float16)):
            pred = (3 * torch.randn(shape, device="cuda")).to(pred_dtype).requires_grad_()
            target = torch.rand(shape, device="cuda").to(target_dtype).requires_grad_()
            logvars = [None, torch.zeros(1, *shape[1:], device="cuda", requires_grad=True),
                       torch.zeros(shape, device="cuda", requires_grad=True)]
            for reduction in ("none", "per_sample", "batchmean"):
                for fn in (pyvae.bernoulli_nll, pyvae.continuous_bernoulli_nll):
                    out = fn(pred, target, reduction=reduction, backend="cuda")
                    out.backward(torch.ones_like(out))
                    with torch.no_grad():
                        fn(pred[:, ::2] if shape[-1] > 1 else pred, target[:, ::2] if shape[-1] > 1 else target,
                           reduction=reduction, backend="cuda")
                for logvar in logvars:
                    out = pyvae.gaussian_nll(pred, target, logvar, reduction=reduction, backend="cuda")
                    out.backward(torch.ones_like(out))
            # an upstream gradient of 2: the in-place scaling runs (for 1 it returns at once)
            out = pyvae.gaussian_nll(pred, target, logvars[1], reduction="sum", backend="cuda")
            out.backward(torch.full_like(out, 2.0))
    # vector quantisation: odd D and K, ragged tiles, every dtype, strided x, skewed code usage
    for n, k, d in [(1, 1, 3), (70, 5, 7), (129, 65, 33), (300, 1000, 64)]:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            x = torch.randn(n, 2 * d, device="cuda").to(dtype)[:, ::2].requires_grad_()
            codebook = torch.randn(k, d, device="cuda").to(dtype).requires_grad_()
            for precision in ("exact", "fast"):
                r = pyvae.vector_quantize(x, codebook, precision=precision, backend="cuda")
                (r.quantized.float().sum() + r.loss).backward()
            skewed = torch.zeros(n, dtype=torch.int64, device="cuda")
            skewed[: n // 3] = torch.arange(n // 3, device="cuda") % k
            pyvae.codebook_stats(x.detach(), skewed, k, backend="cuda")
    torch.cuda.synchronize()
    print("sanitize cases done")


if __name__ == "__main__":
    main()
