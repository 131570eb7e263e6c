"""The GPU checks' cases of vector quantisation (op family ``vq``; see gpu_cases/__init__.py)."""
import torch

import pyvae

from . import DTYPES, TRIMMED_DTYPES, pick


def sanitize(device: str, trim: bool) -> None:
    """Odd D and K, ragged tiles, every dtype, strided x, skewed code usage."""
    for n, k, d in pick([(1, 1, 3), (70, 5, 7), (129, 65, 33), (300, 1000, 64)], [(1, 1, 3), (129, 65, 33)], trim):
        for dtype in pick(DTYPES, TRIMMED_DTYPES, trim):
            x = torch.randn(n, 2 * d, device=device).to(dtype)[:, ::2].requires_grad_()
            codebook = torch.randn(k, d, device=device).to(dtype).requires_grad_()
            for precision in ("exact", "fast"):
                r = pyvae.vector_quantize(x, codebook, precision=precision, backend=device)
                (r.quantized.float().sum() + r.loss).backward()
            skewed = torch.zeros(n, dtype=torch.int64, device=device)
            skewed[: n // 3] = torch.arange(n // 3, device=device) % k
            pyvae.codebook_stats(x.detach(), skewed, k, backend=device)


def triton_launches(ops, t) -> None:
    """Every Triton kernel variant of the family: its launchers called on meta tensors."""
    for dtype in DTYPES:
        for e_dtype in (dtype, torch.float32):
            for dim in (64, 37, 3, 1000):
                for exact in (True, False):
                    ops.nearest_code(t(300, dim, dtype=dtype), t(500, dim, dtype=e_dtype), exact)
        for dim in (64, 300):
            ops.codebook_stats(t(300, dim, dtype=dtype), t(300, dtype=torch.int64), 50)
