"""A small run of every CUDA kernel, for compute-sanitizer (bench/gpu_check.sh): odd and even row
lengths, packed and unpacked loads, every dtype, several samples, per-element and per-row KL,
strided inputs, with and without each gradient. Not a pytest module (no test_ prefix)."""
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
    torch.cuda.synchronize()
    print("sanitize cases done")


if __name__ == "__main__":
    main()
