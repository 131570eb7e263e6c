"""VectorQuantizer layer: a codebook, nearest-code quantisation with the straight-through
gradient, and either learned codes (codebook loss) or exponential-moving-average updates."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..ops.vq import VQResult, _stats_of_own_search, vector_quantize


class VectorQuantizer(nn.Module):
    """Quantise the last dimension of its input to the nearest of ``num_codes`` codes.

    ``ema_decay=None``: the codebook is a parameter trained by the codebook loss (VQ-VAE, van den
    Oord et al. 2017). ``ema_decay=0.99`` (say): the codebook is a buffer updated in training mode
    from deterministic per-code counts and sums (:func:`pyvae.codebook_stats`) with Laplace
    smoothing, starting from one pseudo-observation per code at its initial position (so unused
    codes stay put), and the returned loss is ``beta * commitment_loss`` only. ``forward`` returns a
    :class:`pyvae.ops.VQResult`; ``state_dict`` holds the codebook (and the EMA statistics).

    Under data parallelism (``torch.distributed`` initialised, more than one process) the EMA
    counts and sums are summed over the processes (``all_reduce``) before each update, so every
    replica keeps the same codebook, the one a single process would compute from the whole batch;
    ``sync_ema=False`` turns that off. The update reads nothing back to the host.
    """

    def __init__(self, num_codes: int, dim: int, *, beta: float = 0.25, ema_decay: float | None = None,
                 eps: float = 1e-5, precision: str = "exact", backend: str = "auto", sync_ema: bool = True) -> None:
        super().__init__()
        self.num_codes, self.dim, self.beta, self.ema_decay, self.eps = num_codes, dim, beta, ema_decay, eps
        self.precision, self.backend, self.sync_ema = precision, backend, sync_ema
        init = torch.randn(num_codes, dim) / dim ** 0.5
        if ema_decay is None:
            self.codebook = nn.Parameter(init)
        else:
            # The EMA starts as if each code had one observation at its initial position: a code
            # unused so far stays where it is (ema_sums / ema_counts), instead of being divided by
            # the smoothing eps and thrown ~1/eps away, as zero initial counts would do.
            self.register_buffer("codebook", init)
            self.register_buffer("ema_counts", torch.ones(num_codes))
            self.register_buffer("ema_sums", init.clone())

    def forward(self, x: torch.Tensor) -> VQResult:
        ema_step = self.ema_decay is not None and self.training
        # The EMA step rewrites the codebook in place; autograd keeps the codes this forward used
        # (for the commitment gradient), so it gets a snapshot (K x D, small next to the search).
        codebook = self.codebook.clone() if ema_step else self.codebook
        result = vector_quantize(x, codebook, beta=self.beta, precision=self.precision, backend=self.backend)
        if self.ema_decay is None:
            return result
        if ema_step:
            self._ema_update(x.detach(), result.indices)
        return result._replace(loss=self.beta * result.commitment_loss)

    @torch.no_grad()
    def _ema_update(self, x: torch.Tensor, indices: torch.Tensor) -> None:
        counts, sums = _stats_of_own_search(x, indices, self.num_codes, backend=self.backend)
        if self.sync_ema and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            stats = torch.cat([counts.unsqueeze(1), sums], dim=1)  # one collective for both
            dist.all_reduce(stats)
            counts, sums = stats[:, 0], stats[:, 1:]
        decay = self.ema_decay
        self.ema_counts.mul_(decay).add_(counts, alpha=1 - decay)
        self.ema_sums.mul_(decay).add_(sums.to(self.ema_sums.dtype), alpha=1 - decay)
        total = self.ema_counts.sum()
        smoothed = (self.ema_counts + self.eps) / (total + self.num_codes * self.eps) * total
        self.codebook.copy_(self.ema_sums / smoothed.unsqueeze(1))

    def extra_repr(self) -> str:
        ema = f", ema_decay={self.ema_decay}" if self.ema_decay is not None else ""
        return f"num_codes={self.num_codes}, dim={self.dim}, beta={self.beta}{ema}, backend={self.backend!r}"
