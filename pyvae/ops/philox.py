"""Philox4x32-10 in PyTorch: the counter-based noise every op that draws randomness uses, bit for bit
the stream of ``csrc/common/philox.h`` (CPU and CUDA kernels) and of Triton's ``tl.philox`` /
``tl.uint_to_uniform_float``. The references of the ops compute their noise with it (the oracle the
kernels are tested against). uint32 values are held in int64 tensors."""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
SEED_LIMIT = 2**63 - 1
"""Seeds (Philox keys) are in [0, SEED_LIMIT]."""


def _mulhilo32(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * b for uint32 values held in int64, without int64 overflow."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    ahi, alo = a * b_hi, a * b_lo  # each < 2^48
    hi = (ahi + (alo >> 16)) >> 16
    lo = (alo + ((ahi & 0xFFFF) << 16)) & MASK32
    return hi, lo


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """The four 32-bit words of Philox4x32-10 for counter (c0, c1, c2, c3) and key (k0, k1)."""
    for _ in range(10):
        hi_b, lo_b = _mulhilo32(c2, 0xCD9E8D57)
        hi_a, lo_a = _mulhilo32(c0, 0xD2511F53)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + 0x9E3779B9) & MASK32
        k1 = (k1 + 0xBB67AE85) & MASK32
    return c0, c1, c2, c3


def philox_group(seed: torch.Tensor, group: torch.Tensor, sample) -> tuple:
    """``philox_group`` of csrc/common/philox.h: the block of 64-bit counter ``group`` (int64
    tensor) in stream ``sample``, keyed by the 0-d int64 ``seed``."""
    c0, c1 = group & MASK32, group >> 32
    c2 = torch.as_tensor(sample, dtype=torch.int64, device=group.device).expand_as(c0)
    return philox4x32_10(c0, c1, c2, torch.zeros_like(c0), seed & MASK32, (seed >> 32) & MASK32)


def uniform(bits: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float: the uint32 read as int32, negatives folded by ~x, times a
    scale; float32 in [0, 1)."""
    folded = torch.where(bits >= 2**31, MASK32 - bits, bits)
    return folded.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def draw_seed(device: torch.device | str) -> torch.Tensor:
    """A fresh key from PyTorch's generator for ``device``, as a 0-d int64 tensor on that device.

    Drawn by a device-side random op, so it never synchronises with the GPU, and a CUDA graph that
    captured it draws a fresh key on every replay (as PyTorch's own random ops do). The references
    use it; the CPU and CUDA ops draw inside the op, the Triton ops the same way as here.
    """
    return torch.randint(0, SEED_LIMIT, (), dtype=torch.int64, device=device)


def check_seed(seed) -> None:
    """TypeError / ValueError unless ``seed`` is None or an int in [0, 2**63 - 1]."""
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be None or an int, got {type(seed).__name__}")
    if not 0 <= seed <= SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2**63 - 1], got {seed}")
